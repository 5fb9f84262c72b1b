//! Finding personal data and secrets in everything a request carries, and
//! replacing them with placeholders that can be put back.
//!
//! Two kinds of recognizer work together. Patterns with checks
//! (`patterns`): emails, payment cards (issuer and Luhn), IBANs (mod 97),
//! national identifiers with their checksums (US SSN, UK NINO, Spanish
//! DNI/NIE, Polish PESEL, French NIR, Italian codice fiscale, Indian Aadhaar
//! and PAN), phone numbers valid for their country (libphonenumber's rules),
//! dates of birth, passport and medical record numbers (by the words around
//! them), IP addresses (not version strings), secrets (known formats, and
//! values of keys that name secrets when they are not code). And a model
//! ([`EntityRecognizer`], the Rampart token classifier) for what patterns
//! cannot see: person names and street addresses, in many languages.
//!
//! Digits of other scripts are folded to ASCII first, so `१२३-४५-६७८९` is an
//! SSN like `123-45-6789`; every check is total, so no input panics; and
//! nothing here logs or returns the text it inspects, only classes and
//! offsets.
//!
//! Failing closed: a detector configured with a recognizer that cannot run
//! reports [`Unavailable`] instead of an incomplete answer; the policy then
//! keeps the request on the device (strict) or refuses to send it (redact).

mod context;
mod entities;
mod normalize;
mod patterns;
mod places;
mod redaction;
mod request;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use redaction::{Redaction, Restorer};
pub use request::{Scan, redact_request, scan_request};

/// How personal data in a request is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Requests with personal data or secrets never leave the device.
    Strict,
    /// They may leave with placeholders in place of the data; the answer
    /// gets the originals back.
    Redact,
    /// No detection: requests leave as they are.
    Off,
}

impl std::str::FromStr for PrivacyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "strict" => Ok(Self::Strict),
            "redact" => Ok(Self::Redact),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "privacy mode must be strict, redact or off, got `{other}`"
            )),
        }
    }
}

impl PrivacyMode {
    /// `strict`, `redact` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Redact => "redact",
            Self::Off => "off",
        }
    }

    /// The stricter of two modes (a header may only tighten a key's mode).
    pub fn stricter(self, other: PrivacyMode) -> PrivacyMode {
        let rank = |m| match m {
            PrivacyMode::Strict => 2,
            PrivacyMode::Redact => 1,
            PrivacyMode::Off => 0,
        };
        if rank(self) >= rank(other) {
            self
        } else {
            other
        }
    }
}

fn d_true() -> bool {
    true
}

/// The `[privacy]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Classes of the deployment's own (employee numbers, tickets...).
    #[serde(default)]
    pub custom_patterns: Vec<CustomPattern>,
    /// Use the personal-data model for names and addresses (default). When
    /// it is on but cannot be loaded, requests with a privacy mode fail
    /// closed rather than leave unchecked.
    #[serde(default = "d_true")]
    pub recognizer: bool,
    /// Words and names that are never personal data in this deployment
    /// (libraries, products, the app's own name: `["Lodash", "Axios"]`),
    /// as Presidio's `allow_list`: a finding whose whole text is one of
    /// them, in any case, is dropped.
    #[serde(default)]
    pub allow_list: Vec<String>,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            custom_patterns: Vec::new(),
            recognizer: true,
            allow_list: Vec::new(),
        }
    }
}

/// A user-defined class, e.g. an employee number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomPattern {
    /// Lower-case class name; the placeholder uses it upper-cased.
    pub name: String,
    /// The regular expression (Rust's `regex` syntax).
    pub regex: String,
}

/// A span of personal data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Its class (`email`, `person`, ...).
    pub class: String,
    /// Byte offset where it starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
}

/// A span a model labelled.
#[derive(Debug, Clone, PartialEq)]
pub struct Entity {
    /// The model's label (`GIVEN_NAME`, `STREET_NAME`, `CITY`...).
    pub label: String,
    /// Byte offset where it starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
    /// The model's confidence, 0 to 1.
    pub score: f32,
}

/// The personal-data model's labels for parts of an address: what the
/// detector joins into addresses, and what reads as a place.
pub const ADDRESS_LABELS: &[&str] = &[
    "STREET_NAME",
    "BUILDING_NUMBER",
    "SECONDARY_ADDRESS",
    "CITY",
    "STATE",
    "ZIP_CODE",
];

/// A word piece and how likely the model finds it part of a person's name.
#[derive(Debug, Clone, PartialEq)]
pub struct NamePiece {
    /// Byte offset where the piece starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
    /// Probability that it is part of a name (given name or surname).
    pub person: f32,
    /// Probability that it is part of a given name.
    pub given: f32,
    /// Probability that it is part of an address (street, town, state,
    /// postcode): a run read as a place is not a name.
    pub place: f32,
}

/// A model that labels spans of text (the personal-data token classifier).
pub trait EntityRecognizer: Send + Sync {
    /// The labelled spans of `text`. An error means the text could not be
    /// checked; the detector then fails closed.
    fn recognize(&self, text: &str) -> Result<Vec<Entity>, String>;

    /// The word pieces of `text` with the model's belief that each is part
    /// of a name, summed over the name labels, so a piece split between
    /// "given name" and "surname" (or narrowly beaten by "no label") still
    /// counts. By default, the labelled spans of [`recognize`](Self::recognize)
    /// at their scores; whole spans never show a word held in pieces, so
    /// the reading where a name is asked for (which wants a rare last
    /// word) takes nothing from a recognizer that keeps the default.
    fn name_pieces(&self, text: &str) -> Result<Vec<NamePiece>, String> {
        Ok(self
            .recognize(text)?
            .into_iter()
            .filter_map(|e| {
                let given = e.label == "GIVEN_NAME";
                let person = given || e.label == "SURNAME";
                let place = entities::is_place_label(&e.label);
                (person || place).then_some(NamePiece {
                    start: e.start,
                    end: e.end,
                    person: if person { e.score } else { 0.0 },
                    given: if given { e.score } else { 0.0 },
                    place: if place { e.score } else { 0.0 },
                })
            })
            .collect())
    }

    /// Both of the above. A model that reads once for both overrides it:
    /// a run read again on its own needs the two.
    fn read(&self, text: &str) -> Result<(Vec<Entity>, Vec<NamePiece>), String> {
        Ok((self.recognize(text)?, self.name_pieces(text)?))
    }
}

/// A detector could not check a text: the reason, never the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the personal-data detector could not run: {}", self.0)
    }
}

/// Findings cached, by text hash: conversations repeat their history every
/// turn, and a message is checked once.
const CACHE_ENTRIES: usize = 4096;

/// The detector: built-in recognizers, custom patterns, and optionally a
/// model. Build once, share.
pub struct Detector {
    patterns: patterns::Patterns,
    recognizer: Option<Arc<dyn EntityRecognizer>>,
    /// A recognizer was asked for but is not there: why.
    missing: Option<String>,
    /// Texts never reported, as [`allow_key`] writes them.
    allowed: HashSet<String>,
    cache: Mutex<HashMap<u64, Vec<Finding>>>,
    hasher: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field("patterns", &self.patterns)
            .field("recognizer", &self.recognizer.is_some())
            .field("missing", &self.missing)
            .field("allowed", &self.allowed.len())
            .finish()
    }
}

impl Detector {
    /// The built-in recognizers plus `custom` patterns; no model.
    pub fn new(custom: &[CustomPattern]) -> Result<Detector, String> {
        for c in custom {
            if c.name.is_empty()
                || !c
                    .name
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            {
                return Err(format!(
                    "custom PII class name `{}` must be letters, digits and underscores",
                    c.name
                ));
            }
        }
        let custom: Vec<(String, String)> = custom
            .iter()
            .map(|c| (c.name.to_lowercase(), c.regex.clone()))
            .collect();
        Ok(Detector {
            patterns: patterns::Patterns::new(&custom)?,
            recognizer: None,
            missing: None,
            allowed: HashSet::new(),
            cache: Mutex::new(HashMap::new()),
            hasher: std::collections::hash_map::RandomState::new(),
        })
    }

    /// Adds a model for names and addresses.
    pub fn with_recognizer(mut self, r: Arc<dyn EntityRecognizer>) -> Detector {
        self.recognizer = Some(r);
        self.missing = None;
        self
    }

    /// Never reports a finding whose whole text is one of `allowed` (case
    /// and runs of white space aside): the deployment's own words that the
    /// model takes for names ("Lodash", "Axios").
    pub fn with_allow_list(mut self, allowed: &[String]) -> Detector {
        self.allowed = allowed
            .iter()
            .map(|a| allow_key(a))
            .filter(|k| !k.is_empty())
            .collect();
        self
    }

    /// Records that the model was asked for but could not be had: every
    /// check then reports [`Unavailable`].
    pub fn without_recognizer(mut self, why: impl Into<String>) -> Detector {
        self.recognizer = None;
        self.missing = Some(why.into());
        self
    }

    /// Whether the detector can check texts (no missing model).
    pub fn available(&self) -> Result<(), Unavailable> {
        match &self.missing {
            Some(why) => Err(Unavailable(why.clone())),
            None => Ok(()),
        }
    }

    fn key(&self, text: &str) -> u64 {
        let mut h = self.hasher.build_hasher();
        h.write(text.as_bytes());
        h.finish()
    }

    /// Non-overlapping findings in `text`, in text order. Where two overlap,
    /// the more specific recognizer wins (a checksum over a phone pattern),
    /// then the longer match.
    pub fn find(&self, text: &str) -> Result<Vec<Finding>, Unavailable> {
        self.available()?;
        if text.trim().is_empty() {
            return Ok(Vec::new());
        }
        let key = self.key(text);
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(hit.clone());
        }
        let folded = normalize::fold(text);
        let mut hits: Vec<patterns::Hit> = self
            .patterns
            .find(&folded.text)
            .into_iter()
            .map(|h| patterns::Hit {
                start: folded.original(h.start),
                end: folded.original(h.end),
                ..h
            })
            .collect();
        if let Some(r) = &self.recognizer {
            // Latin names set in scripts written without spaces ("请联系Jane
            // Doe明天") are read with a space around them, as where they
            // stand apart; what is found maps back to the text.
            let spaced = normalize::spaced(text);
            hits.extend(
                recognized(r.as_ref(), &spaced.text)?
                    .into_iter()
                    .map(|h| patterns::Hit {
                        start: spaced.original(h.start),
                        end: spaced.original(h.end),
                        ..h
                    }),
            );
        }
        let mut out = resolve(text, hits);
        if !self.allowed.is_empty() {
            out.retain(|f| {
                text.get(f.start..f.end)
                    .is_none_or(|s| !self.allowed.contains(&allow_key(s)))
            });
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, out.clone());
        Ok(out)
    }

    /// Whether `text` holds anything the detector finds.
    pub fn contains_pii(&self, text: &str) -> Result<bool, Unavailable> {
        Ok(!self.find(text)?.is_empty())
    }
}

/// How an allowed text is compared: lower case, runs of white space one
/// space.
fn allow_key(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Overlaps resolved (priority, then length), spans snapped to character
/// boundaries, and neighbouring parts of one name or one address (only
/// spaces or hyphens between them, or commas between an address's)
/// joined into one finding.
fn resolve(text: &str, mut hits: Vec<patterns::Hit>) -> Vec<Finding> {
    for h in &mut hits {
        h.start = context::floor_boundary(text, h.start);
        h.end = context::ceil_boundary(text, h.end);
        if h.class == "person" {
            h.end = entities::without_possessive(text, h.start, h.end);
            h.end = entities::without_lower_tail(text, h.start, h.end);
            h.start = entities::without_opening_verb(text, h.start, h.end);
            if entities::never_a_name(text, h.start, h.end) {
                h.end = h.start;
            }
        }
    }
    hits.retain(|h| h.start < h.end);
    hits.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then((b.end - b.start).cmp(&(a.end - a.start)))
            .then(a.start.cmp(&b.start))
    });
    let mut kept: Vec<patterns::Hit> = Vec::with_capacity(hits.len());
    let overlap = |a: &patterns::Hit, b: &patterns::Hit| a.start < b.end && b.start < a.end;
    for h in hits {
        let over: Vec<usize> = (0..kept.len()).filter(|&i| overlap(&kept[i], &h)).collect();
        match over.as_slice() {
            [] => kept.push(h),
            // Two readings of one name or address that overlap (a street
            // with its town, the town with its postcode) are one finding:
            // their union, where it touches nothing else.
            &[i] if kept[i].class == h.class
                && kept[i].priority == h.priority
                && matches!(h.class.as_str(), "person" | "address") =>
            {
                let union = patterns::Hit {
                    start: kept[i].start.min(h.start),
                    end: kept[i].end.max(h.end),
                    ..h
                };
                if kept
                    .iter()
                    .enumerate()
                    .all(|(j, k)| j == i || !overlap(k, &union))
                {
                    kept[i] = union;
                }
            }
            _ => {}
        }
    }
    kept.sort_by_key(|h| h.start);
    let mut out: Vec<Finding> = Vec::with_capacity(kept.len());
    for h in kept {
        if let Some(last) = out.last_mut()
            && last.class == h.class
            && matches!(last.class.as_str(), "person" | "address")
            && text.get(last.end..h.start).is_some_and(|gap| {
                // A comma separates people in a list ("Tom, Lisa"), and
                // joins an address's parts ("12 Main St, Springfield").
                let comma_ok = last.class == "address";
                gap.len() <= 3
                    && gap
                        .chars()
                        .all(|c| c == ' ' || c == '-' || c == ',' && comma_ok)
            })
        {
            last.end = h.end;
            continue;
        }
        out.push(Finding {
            class: h.class,
            start: h.start,
            end: h.end,
        });
    }
    out
}

/// What the recognizer finds in `text`: names and addresses as the model
/// labels them, runs it reads again on their own, and lone names after a
/// verb that takes a person, read again as a request.
fn recognized(r: &dyn EntityRecognizer, text: &str) -> Result<Vec<patterns::Hit>, Unavailable> {
    let entities = r.recognize(text).map_err(Unavailable)?;
    let mut hits = entities::hits(text, &entities);
    for (start, end) in entities::rereads(text, &entities)
        .into_iter()
        .take(entities::MAX_REREADS)
    {
        // A town the model reads as a name where a name is asked
        // for is still a town.
        let Some(span) = text.get(start..end).filter(|s| !places::is_place(s)) else {
            continue;
        };
        let alone = |s: &str| -> Result<(bool, Vec<NamePiece>), Unavailable> {
            let (labels, pieces) = r.read(s).map_err(Unavailable)?;
            let found = entities::person_alone(s, &labels) || entities::name_alone(s, &pieces);
            Ok((found, pieces))
        };
        let (found, pieces) = alone(span)?;
        let keyed = entities::after_name_key(text, start);
        // A given name and two surnames ("Salvador Pedraza Manuel")
        // may read as nothing where its first two words read as a
        // name: the rest of the run is that name's.
        let head = entities::leading_pair(span).and_then(|end| span.get(..end));
        let found = found
            || match head {
                Some(h) => alone(h)?.0,
                None => false,
            }
            || match keyed
                .then_some(entities::NAME_FRAME)
                .or_else(|| entities::name_frame_after(text, start))
            {
                None => false,
                Some(frame) => {
                    // Names the model does not know read as nothing even
                    // alone; written where a name is asked for, they do.
                    // Some only without their diacritics ("Błażej
                    // Potyrała" 0.13 there, "Blazej Potyrala" 1.00).
                    let asked = |s: &normalize::Folded<'_>| {
                        let framed = format!("{frame}{}", s.text);
                        let shift = frame.len();
                        r.name_pieces(&framed).map_err(Unavailable).map(|pieces| {
                            pieces
                                .into_iter()
                                .filter(|p| p.start >= shift && p.end >= p.start)
                                .map(|p| NamePiece {
                                    start: s.original(p.start - shift),
                                    end: s.original(p.end - shift),
                                    ..p
                                })
                                .collect::<Vec<NamePiece>>()
                        })
                    };
                    let plain = normalize::Folded::plain(span);
                    entities::name_where_asked(span, &pieces, &asked(&plain)?, keyed) || {
                        let bare = normalize::fold_letters(span);
                        bare.text != span
                            && entities::name_where_asked(span, &pieces, &asked(&bare)?, keyed)
                    }
                }
            };
        if found {
            let (start, end) = entities::reread_name(text, start, end);
            hits.push(patterns::Hit {
                class: "person".into(),
                start,
                end,
                priority: 1,
            });
        }
    }
    for o in entities::names_after_verbs(text, &entities)
        .into_iter()
        .take(entities::MAX_REREADS)
    {
        let (start, end) = o.word;
        let alone = r.name_pieces(&o.name).map_err(Unavailable)?;
        if !entities::name_when_alone(&alone) {
            continue;
        }
        let in_request = r.recognize(&o.request).map_err(Unavailable)?;
        let mut sure = entities::sure_name_at(&in_request, o.at, o.name.len());
        if let (false, Some(short)) = (sure, &o.short) {
            let in_short = r.recognize(short).map_err(Unavailable)?;
            sure = entities::sure_name_at(&in_short, entities::SHORT_FRAME.len(), o.name.len());
        }
        if sure {
            hits.push(patterns::Hit {
                class: "person".into(),
                start,
                end,
                priority: 1,
            });
        }
    }
    with_given_names(r, text, &mut hits)?;
    Ok(hits)
}

/// Names found without the capitalised word before them that is their
/// given name ([`entities::word_before_name`]) take it when the model,
/// reading the word and the name where a name is asked for, is sure it is
/// one: "Sam Porter" 0.94 there, where "Sam" read in its sentence is 0.11.
fn with_given_names(
    r: &dyn EntityRecognizer,
    text: &str,
    hits: &mut [patterns::Hit],
) -> Result<(), Unavailable> {
    let mut reads = 0;
    let mut seen = Vec::new();
    for h in hits.iter_mut().filter(|h| h.class == "person") {
        for _ in 0..entities::GIVEN_BEFORE {
            let Some(at) = entities::word_before_name(text, h.start) else {
                break;
            };
            // One name found twice (by the labels and a second reading)
            // is read once.
            let Some(span) = text.get(at..h.end).filter(|_| !seen.contains(&(at, h.end))) else {
                break;
            };
            if reads == entities::MAX_REREADS {
                return Ok(());
            }
            reads += 1;
            seen.push((at, h.end));
            let framed = format!("{}{span}", entities::NAME_FRAME);
            let asked = r.name_pieces(&framed).map_err(Unavailable)?;
            if !entities::given_where_asked(span, &asked) {
                break;
            }
            h.start = at;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
