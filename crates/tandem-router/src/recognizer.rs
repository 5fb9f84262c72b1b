//! The personal-data model (`tandem-embed`'s token classifier) as the
//! privacy detector's recognizer of names and addresses.

use std::sync::Arc;

use tandem_embed::TokenClassifier;
use tandem_policy::privacy::{Entity, EntityRecognizer, NamePiece};

/// The model's labels for parts of an address.
const PLACE: &[&str] = &[
    "STREET_NAME",
    "BUILDING_NUMBER",
    "SECONDARY_ADDRESS",
    "CITY",
    "STATE",
    "ZIP_CODE",
];

/// A loaded token classifier, recognizing for the detector.
#[derive(Debug, Clone)]
pub struct ModelRecognizer(pub Arc<TokenClassifier>);

impl EntityRecognizer for ModelRecognizer {
    fn recognize(&self, text: &str) -> Result<Vec<Entity>, String> {
        match self.0.classify(text) {
            Ok(spans) => Ok(spans
                .into_iter()
                .map(|s| Entity {
                    label: s.label,
                    start: s.start,
                    end: s.end,
                    score: s.score,
                })
                .collect()),
            // The error's own words might quote the input: not repeated.
            Err(_) => Err("the personal-data model could not read the text".into()),
        }
    }

    fn name_pieces(&self, text: &str) -> Result<Vec<NamePiece>, String> {
        match self
            .0
            .masses(text, &[&["GIVEN_NAME", "SURNAME"], &["GIVEN_NAME"], PLACE])
        {
            Ok(pieces) => Ok(pieces
                .into_iter()
                .map(|m| NamePiece {
                    start: m.start,
                    end: m.end,
                    person: m.mass.first().copied().unwrap_or(0.0),
                    given: m.mass.get(1).copied().unwrap_or(0.0),
                    place: m.mass.get(2).copied().unwrap_or(0.0),
                })
                .collect()),
            Err(_) => Err("the personal-data model could not read the text".into()),
        }
    }
}
