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
        Ok(self.replace(text, findings, &[]).0)
    }

    /// Redacts texts that are read as one (a message's text parts): what
    /// is found across a cut between two of them is found, and its
    /// placeholder goes where it starts, the rest of it removed from the
    /// next ones.
    pub fn redact_pieces(
        &mut self,
        detector: &Detector,
        pieces: &[&str],
    ) -> Result<Vec<String>, Unavailable> {
        let joined = pieces.concat();
        let findings = detector.find(&joined)?;
        if findings.is_empty() {
            return Ok(pieces.iter().map(|p| (*p).to_owned()).collect());
        }
        let cuts: Vec<usize> = pieces
            .iter()
            .scan(0, |at, p| {
                *at += p.len();
                Some(*at)
            })
            .take(pieces.len().saturating_sub(1))
            .collect();
        let (out, cuts) = self.replace(&joined, findings, &cuts);
        let mut from = 0;
        let mut res = Vec::with_capacity(pieces.len());
        for c in cuts.into_iter().chain([out.len()]) {
            res.push(out.get(from..c).unwrap_or_default().to_owned());
            from = c;
        }
        Ok(res)
    }

    /// `text` with `findings` (in order, apart) replaced, and where each
    /// of `cuts` (ascending offsets of `text`) falls in it: a cut inside a
    /// finding falls after its placeholder.
    fn replace(
        &mut self,
        text: &str,
        findings: Vec<super::Finding>,
        cuts: &[usize],
    ) -> (String, Vec<usize>) {
        let mut out = String::with_capacity(text.len());
        let mut mapped = Vec::with_capacity(cuts.len());
        let mut cuts = cuts.iter().copied().peekable();
        let mut at = 0;
        for f in findings {
            while let Some(c) = cuts.next_if(|&c| c <= f.start) {
                mapped.push(out.len() + c.saturating_sub(at));
            }
            out.push_str(text.get(at..f.start).unwrap_or_default());
            let value = text.get(f.start..f.end).unwrap_or_default();
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
            while cuts.next_if(|&c| c < f.end).is_some() {
                mapped.push(out.len());
            }
            at = f.end;
        }
        for c in cuts {
            mapped.push(out.len() + c.saturating_sub(at));
        }
        out.push_str(text.get(at..).unwrap_or_default());
        (out, mapped)
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
