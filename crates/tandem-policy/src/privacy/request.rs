//! Everything a request carries that could leave the device: every message's
//! text and name, continuation text, tool calls and their JSON arguments,
//! tool results, content parts, per-message and top-level extra fields (the
//! keys of JSON objects included), stop sequences — scanned and redacted in
//! the same places, so that what is checked is what is sent.
//!
//! Images, audio and files cannot be read for personal data: each such part
//! counts as a finding of its own class (`image`, `audio`, `file`), so that
//! strict mode keeps it on the device. Their payloads (`data:` URLs, base64
//! audio and files) are not text and are neither scanned nor rewritten;
//! everything else such a part carries (a URL, a file name) is.

use std::collections::BTreeMap;

use serde_json::{Map, Value};
use tandem_api::openai::ContentPart;
use tandem_api::{GenerateRequest, Input};

use super::{Detector, Redaction, Unavailable};

/// What a request carries, by class: how many findings of each (never the
/// values).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// Class → occurrences.
    pub classes: BTreeMap<String, u32>,
}

impl Scan {
    /// Nothing was found.
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty()
    }
}

/// Calls `f` on every string of a JSON value: values, and the keys of
/// objects.
fn json_strings(
    v: &Value,
    f: &mut dyn FnMut(&str) -> Result<(), Unavailable>,
) -> Result<(), Unavailable> {
    match v {
        Value::String(s) => f(s),
        Value::Array(a) => a.iter().try_for_each(|x| json_strings(x, f)),
        Value::Object(o) => o.iter().try_for_each(|(k, x)| {
            f(k)?;
            json_strings(x, f)
        }),
        _ => Ok(()),
    }
}

/// The class a content part counts as, when it is not text.
fn media_class(part: &ContentPart) -> Option<&'static str> {
    match part.kind.as_str() {
        "text" => None,
        "image_url" => Some("image"),
        "input_audio" => Some("audio"),
        "file" => Some("file"),
        _ => Some("other_content"),
    }
}

/// Whether `key` of the object under `field` of a part is its binary
/// payload, which is not text.
fn is_payload(kind: &str, field: &str, key: &str, value: &Value) -> bool {
    match (kind, field, key) {
        ("image_url", "image_url", "url") => value.as_str().is_some_and(|u| u.starts_with("data:")),
        ("input_audio", "input_audio", "data") | ("file", "file", "file_data") => true,
        _ => false,
    }
}

/// Whether a part's text is read with the message's other text parts, as
/// one text: a value split across two of them is still found.
fn joined(part: &ContentPart) -> bool {
    part.kind == "text" && part.text.is_some()
}

/// The text of a message's text parts, as one.
fn joined_text(parts: &[ContentPart]) -> String {
    parts
        .iter()
        .filter(|p| joined(p))
        .filter_map(|p| p.text.as_deref())
        .collect()
}

/// Every string of a part but the text [`joined`] reads.
fn part_strings(
    part: &ContentPart,
    f: &mut dyn FnMut(&str) -> Result<(), Unavailable>,
) -> Result<(), Unavailable> {
    if let Some(t) = &part.text
        && !joined(part)
    {
        f(t)?;
    }
    for (field, v) in &part.extra {
        f(field)?;
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    f(k)?;
                    if !is_payload(&part.kind, field, k, x) {
                        json_strings(x, f)?;
                    }
                }
            }
            other => json_strings(other, f)?,
        }
    }
    Ok(())
}

/// Redacts every string of a part but the text [`joined`] reads.
fn redact_part(
    detector: &Detector,
    part: &mut ContentPart,
    r: &mut Redaction,
) -> Result<(), Unavailable> {
    let alone = !joined(part);
    if let Some(t) = part.text.as_mut()
        && alone
    {
        *t = r.redact(detector, t)?;
    }
    let extra = std::mem::take(&mut part.extra);
    for (field, mut v) in extra {
        match &mut v {
            Value::Object(o) => {
                let old = std::mem::take(o);
                let mut new = Map::new();
                for (k, mut x) in old {
                    if !is_payload(&part.kind, &field, &k, &x) {
                        redact_json(detector, &mut x, r)?;
                    }
                    new.insert(r.redact(detector, &k)?, x);
                }
                *o = new;
            }
            other => redact_json(detector, other, r)?,
        }
        part.extra.insert(r.redact(detector, &field)?, v);
    }
    Ok(())
}

fn strings(
    req: &GenerateRequest,
    f: &mut dyn FnMut(&str) -> Result<(), Unavailable>,
) -> Result<(), Unavailable> {
    match &req.input {
        Input::Chat {
            messages,
            continue_from,
        } => {
            for m in messages {
                // With parts, the parts are what leaves; `content` is
                // their text again.
                match &m.parts {
                    Some(parts) => {
                        f(&joined_text(parts))?;
                        parts.iter().try_for_each(|p| part_strings(p, f))?;
                    }
                    None => f(&m.content)?,
                }
                if let Some(n) = &m.name {
                    f(n)?;
                }
                for (k, v) in &m.extra {
                    f(k)?;
                    json_strings(v, f)?;
                }
            }
            if let Some(c) = continue_from {
                f(c)?;
            }
        }
        Input::Text {
            prompt,
            continue_from,
        } => {
            f(prompt)?;
            if let Some(c) = continue_from {
                f(c)?;
            }
        }
    }
    for (k, v) in &req.extra {
        f(k)?;
        json_strings(v, f)?;
    }
    req.stop.iter().try_for_each(|s| f(s))
}

/// What `req` carries, or why it could not be checked.
pub fn scan_request(detector: &Detector, req: &GenerateRequest) -> Result<Scan, Unavailable> {
    let mut scan = Scan::default();
    strings(req, &mut |s| {
        for finding in detector.find(s)? {
            *scan.classes.entry(finding.class).or_insert(0) += 1;
        }
        Ok(())
    })?;
    if let Input::Chat { messages, .. } = &req.input {
        let parts = messages.iter().filter_map(|m| m.parts.as_ref()).flatten();
        for class in parts.filter_map(media_class) {
            *scan.classes.entry(class.to_owned()).or_insert(0) += 1;
        }
    }
    Ok(scan)
}

fn redact_json(detector: &Detector, v: &mut Value, r: &mut Redaction) -> Result<(), Unavailable> {
    match v {
        Value::String(s) => {
            *s = r.redact(detector, s)?;
            Ok(())
        }
        Value::Array(a) => a.iter_mut().try_for_each(|x| redact_json(detector, x, r)),
        Value::Object(o) => {
            let old = std::mem::take(o);
            for (k, mut x) in old {
                redact_json(detector, &mut x, r)?;
                o.insert(r.redact(detector, &k)?, x);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Replaces everything [`scan_request`] would find, everywhere, with
/// placeholders recorded in `r`.
pub fn redact_request(
    detector: &Detector,
    req: &mut GenerateRequest,
    r: &mut Redaction,
) -> Result<(), Unavailable> {
    strings(req, &mut |s| {
        r.reserve(s);
        Ok(())
    })?;
    match &mut req.input {
        Input::Chat {
            messages,
            continue_from,
        } => {
            for m in messages.iter_mut() {
                match m.parts.as_mut() {
                    Some(parts) => {
                        let pieces: Vec<&str> = parts
                            .iter()
                            .filter(|p| joined(p))
                            .filter_map(|p| p.text.as_deref())
                            .collect();
                        let mut redacted = r.redact_pieces(detector, &pieces)?.into_iter();
                        let mut text = String::new();
                        for p in parts.iter_mut() {
                            if joined(p) {
                                p.text = redacted.next();
                            }
                            redact_part(detector, p, r)?;
                            if let (Some(t), "text") = (&p.text, p.kind.as_str()) {
                                text.push_str(t);
                            }
                        }
                        m.content = text;
                    }
                    None => m.content = r.redact(detector, &m.content)?,
                }
                if let Some(n) = m.name.as_mut() {
                    *n = r.redact(detector, n)?;
                }
                let extra = std::mem::take(&mut m.extra);
                for (k, mut v) in extra {
                    redact_json(detector, &mut v, r)?;
                    m.extra.insert(r.redact(detector, &k)?, v);
                }
            }
            if let Some(c) = continue_from {
                *c = r.redact(detector, c)?;
            }
        }
        Input::Text {
            prompt,
            continue_from,
        } => {
            *prompt = r.redact(detector, prompt)?;
            if let Some(c) = continue_from {
                *c = r.redact(detector, c)?;
            }
        }
    }
    let extra = std::mem::take(&mut req.extra);
    for (k, mut v) in extra {
        redact_json(detector, &mut v, r)?;
        req.extra.insert(r.redact(detector, &k)?, v);
    }
    for s in req.stop.iter_mut() {
        *s = r.redact(detector, s)?;
    }
    Ok(())
}
