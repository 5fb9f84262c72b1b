//! Finding personal data and secrets in text, and replacing them with
//! placeholders that can be put back.
//!
//! Patterns are checked for structure where a checksum exists (Luhn for
//! card numbers, mod-97 for IBANs, the control letter of Spanish DNIs, the
//! reserved ranges of US SSNs), which keeps order numbers and dates from
//! being mistaken for them.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv6Addr;

use regex::{Regex, RegexSet};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// How personal data in a request is treated.
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
}

impl PrivacyMode {
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

/// The `[privacy]` section of the configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrivacyConfig {
    /// Classes of the deployment's own (employee numbers, tickets...).
    #[serde(default)]
    pub custom_patterns: Vec<CustomPattern>,
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

/// Checks a match `text[start..end]`; may look at its surroundings.
type Check = fn(&str, usize, usize) -> bool;

struct Class {
    name: String,
    regex: Regex,
    check: Option<Check>,
}

/// The detector: built-in classes plus custom patterns. Build once, share.
pub struct Detector {
    set: RegexSet,
    classes: Vec<Class>,
}

impl std::fmt::Debug for Detector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detector")
            .field(
                "classes",
                &self.classes.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn digits(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

fn luhn(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    let d = digits(s);
    if !(13..=19).contains(&d.len()) {
        return false;
    }
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn iban(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    let compact: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if !(15..=34).contains(&compact.len()) {
        return false;
    }
    let (head, tail) = compact.split_at(4);
    let mut rem: u32 = 0;
    for c in tail.chars().chain(head.chars()) {
        let v = match c {
            '0'..='9' => c as u32 - '0' as u32,
            'A'..='Z' => c as u32 - 'A' as u32 + 10,
            _ => return false,
        };
        for d in if v >= 10 {
            vec![v / 10, v % 10]
        } else {
            vec![v]
        } {
            rem = (rem * 10 + d) % 97;
        }
    }
    rem == 1
}

fn ssn(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    let d = digits(s);
    let area = d[0] * 100 + d[1] * 10 + d[2];
    let group = d[3] * 10 + d[4];
    let serial = d[5] * 1000 + d[6] * 100 + d[7] * 10 + d[8];
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn dni(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    const LETTERS: &[u8] = b"TRWAGMYFPDXBNJZSQVHLCKE";
    let n: u32 = s[..8].parse().unwrap_or(u32::MAX);
    n != u32::MAX && s.as_bytes()[8] == LETTERS[(n % 23) as usize]
}

fn phone(text: &str, start: usize, end: usize) -> bool {
    let n = digits(&text[start..end]).len();
    // A run of digit groups inside a longer number (an account number, an
    // IBAN) is part of that number, not a phone number.
    let seps = [' ', '-', '.'];
    let digit_near = |c: Option<char>| c.is_some_and(|c| c.is_ascii_digit());
    let before = text[..start].trim_end_matches(seps).chars().next_back();
    let after = text[end..].trim_start_matches(seps).chars().next();
    (7..=15).contains(&n) && !digit_near(before) && !digit_near(after)
}

fn ipv6(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    s.parse::<Ipv6Addr>().is_ok() && s.contains(':') && s.len() >= 6
}

fn builtin() -> Vec<(&'static str, &'static str, Option<Check>)> {
    vec![
        // Secrets first: a key may look like other things.
        (
            "secret",
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
            None,
        ),
        (
            "secret",
            r"\b(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}|xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20,})",
            None,
        ),
        (
            "secret",
            r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
            None,
        ),
        (
            "secret",
            r#"(?i)\b(?:api[_-]?key|secret|token|password|passwd|pwd)\b\s*[:=]\s*["']?[^\s"']{8,}"#,
            None,
        ),
        (
            "email",
            r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
            None,
        ),
        (
            "iban",
            r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b",
            Some(iban),
        ),
        ("card_number", r"\b\d(?:[ -]?\d){12,18}\b", Some(luhn)),
        ("national_id", r"\b\d{3}-\d{2}-\d{4}\b", Some(ssn)),
        (
            "national_id",
            r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b",
            None,
        ),
        ("national_id", r"\b\d{8}[A-HJ-NP-TV-Z]\b", Some(dni)),
        (
            "ip_address",
            r"\b(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\b",
            None,
        ),
        (
            "ip_address",
            r"(?i)\b(?:[0-9a-f]{1,4}:){2,7}(?::|[0-9a-f]{1,4})(?::[0-9a-f]{1,4})*\b|(?i)::(?:[0-9a-f]{1,4}:){0,5}[0-9a-f]{1,4}\b",
            Some(ipv6),
        ),
        // International form: +CC then groups.
        (
            "phone",
            r"\+\d{1,3}(?:[\s.-]?\(?\d{1,5}\)?){1,5}\b",
            Some(phone),
        ),
        // North American: (555) 123-4567, 555-123-4567, 555.123.4567.
        (
            "phone",
            r"(?:\(\d{3}\)\s?|\b\d{3}[.-])\d{3}[\s.-]\d{4}\b",
            Some(phone),
        ),
        // National forms with a trunk prefix: 020 7946 0958, 06 12 34 56 78.
        (
            "phone",
            r"\b0[1-9]\d{0,3}(?:[\s.-]\d{2,4}){2,4}\b",
            Some(phone),
        ),
    ]
}

impl Detector {
    /// The built-in classes plus `custom`.
    pub fn new(custom: &[CustomPattern]) -> Result<Detector, String> {
        let mut classes = Vec::new();
        for (name, re, check) in builtin() {
            classes.push(Class {
                name: name.to_owned(),
                regex: Regex::new(re).map_err(|e| format!("built-in pattern {name}: {e}"))?,
                check,
            });
        }
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
            classes.push(Class {
                name: c.name.to_lowercase(),
                regex: Regex::new(&c.regex)
                    .map_err(|e| format!("custom PII pattern `{}`: {e}", c.name))?,
                check: None,
            });
        }
        let set = RegexSet::new(classes.iter().map(|c| c.regex.as_str()))
            .map_err(|e| format!("PII patterns: {e}"))?;
        Ok(Detector { set, classes })
    }

    /// Non-overlapping findings, in text order; on overlap the earlier,
    /// then longer, match wins.
    pub fn find(&self, text: &str) -> Vec<Finding> {
        let hits = self.set.matches(text);
        if !hits.matched_any() {
            return Vec::new();
        }
        let mut all = Vec::new();
        for i in hits.iter() {
            let class = &self.classes[i];
            for m in class.regex.find_iter(text) {
                if class
                    .check
                    .is_none_or(|check| check(text, m.start(), m.end()))
                {
                    all.push(Finding {
                        class: class.name.clone(),
                        start: m.start(),
                        end: m.end(),
                    });
                }
            }
        }
        all.sort_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
        let mut out: Vec<Finding> = Vec::with_capacity(all.len());
        for f in all {
            if out.last().is_none_or(|last| f.start >= last.end) {
                out.push(f);
            }
        }
        out
    }

    /// Whether `text` holds anything found.
    pub fn contains_pii(&self, text: &str) -> bool {
        self.set.is_match(text) && !self.find(text).is_empty()
    }
}

/// Placeholders for one request: the same value gets the same placeholder
/// in every message, and the map turns them back.
#[derive(Debug, Default, Clone)]
pub struct Redaction {
    /// placeholder → original
    originals: HashMap<String, String>,
    by_value: HashMap<String, String>,
    counters: HashMap<String, u32>,
    /// class → values replaced
    pub classes: BTreeMap<String, u32>,
}

impl Redaction {
    /// Nothing was replaced.
    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }

    /// Replaces every finding in `text` with a placeholder.
    pub fn redact(&mut self, detector: &Detector, text: &str) -> String {
        let findings = detector.find(text);
        if findings.is_empty() {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for f in findings {
            out.push_str(&text[at..f.start]);
            let value = &text[f.start..f.end];
            let placeholder = match self.by_value.get(value) {
                Some(p) => p.clone(),
                None => {
                    let n = self.counters.entry(f.class.clone()).or_insert(0);
                    *n += 1;
                    let p = format!("[{}_{}]", f.class.to_uppercase(), n);
                    self.by_value.insert(value.to_owned(), p.clone());
                    self.originals.insert(p.clone(), value.to_owned());
                    *self.classes.entry(f.class.clone()).or_insert(0) += 1;
                    p
                }
            };
            out.push_str(&placeholder);
            at = f.end;
        }
        out.push_str(&text[at..]);
        out
    }

    /// Redacts every string inside a JSON value (extra request fields).
    pub fn redact_json(&mut self, detector: &Detector, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => *s = self.redact(detector, s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| self.redact_json(detector, x)),
            serde_json::Value::Object(o) => {
                o.values_mut().for_each(|x| self.redact_json(detector, x))
            }
            _ => {}
        }
    }

    /// A streaming restorer for answers that may quote placeholders.
    pub fn restorer(&self) -> Restorer {
        Restorer {
            originals: self.originals.clone(),
            held: String::new(),
            max_len: self.originals.keys().map(String::len).max().unwrap_or(0),
        }
    }
}

/// Puts originals back into streamed text. A placeholder split across
/// chunks is held back until it is complete (or clearly is not one).
#[derive(Debug, Clone)]
pub struct Restorer {
    originals: HashMap<String, String>,
    held: String,
    max_len: usize,
}

impl Restorer {
    /// Restores what `chunk` completes; holds back a placeholder's start.
    pub fn push(&mut self, chunk: &str) -> String {
        if self.originals.is_empty() {
            return chunk.to_owned();
        }
        self.held.push_str(chunk);
        let mut out = String::new();
        loop {
            let Some(open) = self.held.find('[') else {
                out.push_str(&self.held);
                self.held.clear();
                return out;
            };
            out.push_str(&self.held[..open]);
            self.held.drain(..open);
            match self.held.find(']') {
                Some(close) => {
                    let candidate = &self.held[..=close];
                    match self.originals.get(candidate) {
                        Some(orig) => out.push_str(orig),
                        None => {
                            // Not ours: emit the bracket and look further on.
                            out.push('[');
                            self.held.drain(..1);
                            continue;
                        }
                    }
                    self.held.drain(..=close);
                }
                None => {
                    let could_be = self.held.len() < self.max_len
                        && self.held[1..]
                            .chars()
                            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
                    if could_be {
                        return out;
                    }
                    out.push('[');
                    self.held.drain(..1);
                }
            }
        }
    }

    /// What is still held back, at the end of the answer.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(d: &Detector, text: &str) -> Vec<String> {
        d.find(text).into_iter().map(|f| f.class).collect()
    }

    #[test]
    fn finds_each_class() {
        let d = Detector::new(&[CustomPattern {
            name: "employee_id".into(),
            regex: r"\bEMP-\d{6}\b".into(),
        }])
        .unwrap();
        let cases = [
            ("mail me at jane.doe@example.co.uk today", "email"),
            ("call +44 20 7946 0958 tomorrow", "phone"),
            ("call (555) 123-4567", "phone"),
            ("card 4111 1111 1111 1111 exp 12/29", "card_number"),
            ("IBAN DE89 3704 0044 0532 0130 00 please", "iban"),
            ("GB82WEST12345698765432", "iban"),
            ("SSN 123-45-6789", "national_id"),
            ("NINO AB 12 34 56 C", "national_id"),
            ("DNI 12345678Z", "national_id"),
            ("server at 192.168.1.20 is down", "ip_address"),
            ("v6 2001:db8:85a3::8a2e:370:7334 too", "ip_address"),
            ("key sk-proj-abcdefghijklmnopqrstuvwxyz123456", "secret"),
            ("AWS AKIAIOSFODNN7EXAMPLE", "secret"),
            ("password = hunter2hunter2", "secret"),
            ("badge EMP-004211", "employee_id"),
        ];
        for (text, class) in cases {
            assert_eq!(classes(&d, text), vec![class.to_string()], "{text}");
        }
    }

    #[test]
    fn checksums_keep_false_positives_out() {
        let d = Detector::new(&[]).unwrap();
        for text in [
            "order 4111 1111 1111 1112 shipped",
            "version 1.2.3 released",
            "the year 2024 and 1999",
            "SSN-like 000-12-3456",
            "DNI 12345678A",
            "IBAN DE88 3704 0044 0532 0130 00",
            "it costs 12.50 euros",
        ] {
            assert!(d.find(text).is_empty(), "{text}: {:?}", d.find(text));
        }
    }

    #[test]
    fn redaction_is_consistent_and_reversible_across_chunks() {
        let d = Detector::new(&[]).unwrap();
        let mut r = Redaction::default();
        let a = r.redact(&d, "Email bob@corp.com or bob@corp.com, not amy@corp.com");
        assert_eq!(a, "Email [EMAIL_1] or [EMAIL_1], not [EMAIL_2]");
        assert_eq!(r.classes.get("email"), Some(&2));
        let mut rest = r.restorer();
        let mut out = String::new();
        for chunk in [
            "I wrote to [EM",
            "AIL_1] and [",
            "EMAIL_2]. [note] ok",
            " [EMAIL_9] end [",
        ] {
            out.push_str(&rest.push(chunk));
        }
        out.push_str(&rest.finish());
        assert_eq!(
            out,
            "I wrote to bob@corp.com and amy@corp.com. [note] ok [EMAIL_9] end ["
        );
    }
}
