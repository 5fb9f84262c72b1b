//! Everything a request carries that could leave the device: every message's
//! text and name, continuation text, tool calls and their JSON arguments,
//! tool results, content parts, per-message and top-level extra fields (the
//! keys of JSON objects included), stop sequences — scanned and redacted in
//! the same places, so that what is checked is what is sent.

use std::collections::BTreeMap;

use serde_json::Value;
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
                f(&m.content)?;
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
        Input::Text(t) => f(t)?,
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
    match &mut req.input {
        Input::Chat {
            messages,
            continue_from,
        } => {
            for m in messages.iter_mut() {
                m.content = r.redact(detector, &m.content)?;
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
        Input::Text(t) => *t = r.redact(detector, t)?,
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
