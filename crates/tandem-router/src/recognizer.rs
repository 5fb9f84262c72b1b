//! The personal-data model (`tandem-embed`'s token classifier) as the
//! privacy detector's recognizer of names and addresses.

use std::sync::Arc;

use tandem_embed::{Labelled, Mass, TokenClassifier};
use tandem_policy::privacy::{ADDRESS_LABELS, Entity, EntityRecognizer, NamePiece};

/// A loaded token classifier, recognizing for the detector.
#[derive(Debug, Clone)]
pub struct ModelRecognizer(pub Arc<TokenClassifier>);

/// What the detector asks of every word piece: a name's, a given name's,
/// a place's.
const GROUPS: &[&[&str]] = &[&["GIVEN_NAME", "SURNAME"], &["GIVEN_NAME"], ADDRESS_LABELS];

fn entity(s: Labelled) -> Entity {
    Entity {
        label: s.label,
        start: s.start,
        end: s.end,
        score: s.score,
    }
}

fn piece(m: Mass) -> NamePiece {
    NamePiece {
        start: m.start,
        end: m.end,
        person: m.mass.first().copied().unwrap_or(0.0),
        given: m.mass.get(1).copied().unwrap_or(0.0),
        place: m.mass.get(2).copied().unwrap_or(0.0),
    }
}

/// The error's own words might quote the input: not repeated.
const UNREADABLE: &str = "the personal-data model could not read the text";

impl EntityRecognizer for ModelRecognizer {
    fn recognize(&self, text: &str) -> Result<Vec<Entity>, String> {
        match self.0.classify(text) {
            Ok(spans) => Ok(spans.into_iter().map(entity).collect()),
            Err(_) => Err(UNREADABLE.into()),
        }
    }

    fn name_pieces(&self, text: &str) -> Result<Vec<NamePiece>, String> {
        match self.0.masses(text, GROUPS) {
            Ok(pieces) => Ok(pieces.into_iter().map(piece).collect()),
            Err(_) => Err(UNREADABLE.into()),
        }
    }

    fn read(&self, text: &str) -> Result<(Vec<Entity>, Vec<NamePiece>), String> {
        match self.0.read(text, GROUPS) {
            Ok((spans, pieces)) => Ok((
                spans.into_iter().map(entity).collect(),
                pieces.into_iter().map(piece).collect(),
            )),
            Err(_) => Err(UNREADABLE.into()),
        }
    }
}
