//! Placeholders for personal data that leaves the device, and putting the
//! originals back into the answer — also when a placeholder arrives split
//! across streamed chunks.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Detector, Unavailable};

/// Placeholders for one request: the same value gets the same placeholder
/// in every message, and the map turns them back.
#[derive(Debug, Default, Clone)]
pub struct Redaction {
    /// placeholder → original
    originals: HashMap<String, String>,
    by_value: HashMap<String, String>,
    counters: HashMap<String, u32>,
    /// Placeholder-shaped text the request already holds, never handed out:
    /// its echo in the answer must stay as written.
    taken: HashSet<String>,
    /// class → values replaced
    pub classes: BTreeMap<String, u32>,
}

impl Redaction {
    /// Nothing was replaced.
    pub fn is_empty(&self) -> bool {
        self.originals.is_empty()
    }

    /// Keeps the placeholders `text` already spells (`[EMAIL_1]` written by
    /// the user, a template's slot) from being handed out: the answer may
    /// quote them, and they must come back as written, not as a value.
    /// Call it on every text of a request before redacting any.
    pub fn reserve(&mut self, text: &str) {
        let mut rest = text;
        while let Some(open) = rest.find('[') {
            rest = &rest[open..];
            let Some(close) = rest.find(']') else {
                return;
            };
            let inner = &rest[1..close];
            if !inner.is_empty()
                && inner
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                self.taken.insert(rest[..=close].to_owned());
            }
            rest = &rest[1..];
        }
    }

    /// Replaces every finding in `text` with a placeholder.
    pub fn redact(&mut self, detector: &Detector, text: &str) -> Result<String, Unavailable> {
        let findings = detector.find(text)?;
        if findings.is_empty() {
            return Ok(text.to_owned());
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
                    let p = loop {
                        *n += 1;
                        let p = format!("[{}_{}]", f.class.to_uppercase(), n);
                        if !self.taken.contains(&p) {
                            break p;
                        }
                    };
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
        Ok(out)
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

    /// A restorer with the same placeholders and nothing held, for another
    /// stream of text (a message field beside the content).
    pub fn fresh(&self) -> Restorer {
        Restorer {
            held: String::new(),
            ..self.clone()
        }
    }

    /// A restorer with the same placeholders and nothing held, for text
    /// that is JSON (a tool call's arguments): originals go back escaped,
    /// so a value with a quote or a backslash keeps the JSON valid.
    pub fn for_json(&self) -> Restorer {
        let escape = |v: &String| {
            let quoted = serde_json::to_string(v).unwrap_or_default();
            quoted
                .strip_prefix('"')
                .and_then(|q| q.strip_suffix('"'))
                .unwrap_or_default()
                .to_owned()
        };
        Restorer {
            originals: self
                .originals
                .iter()
                .map(|(k, v)| (k.clone(), escape(v)))
                .collect(),
            held: String::new(),
            max_len: self.max_len,
        }
    }

    /// What is still held back, at the end of the answer.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
