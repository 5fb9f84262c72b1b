//! What an upstream applies of the fields that constrain an answer, found
//! by asking it: `tandem upstreams check` runs these probes and prints the
//! `constraint_fields` and `lacks` lines that say so.
//!
//! Each probe asks an ordinary question ("Name a colour.") under a
//! constraint no model would meet by chance (the answer must be
//! `zebra-42`, or an object holding only `zebra` between 40 and 42). An
//! upstream that applies the field meets it; one that ignores it answers
//! the question; one that refuses it answers an error. No probe carries
//! anything but these fixed texts.

use serde_json::{Value, json};
use tandem_api::openai::ChatCompletionRequest;
use tandem_api::{Answer, ApiError, Backend, Feature};

use crate::CloudBackend;

/// The one answer the probes' choices, regexes and grammars allow.
const TOKEN: &str = "zebra-42";

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The answer kept to the constraint.
    Applied,
    /// The answer ignored it (the text is what came back).
    Ignored(String),
    /// The upstream refused the request (its error).
    Refused(String),
}

/// A probe's feature (its request field is [`Feature::param`]) and what it
/// found.
#[derive(Debug, Clone)]
pub struct Finding {
    /// The feature probed.
    pub feature: Feature,
    /// What the upstream did with it.
    pub verdict: Verdict,
}

fn object_schema() -> Value {
    json!({"type": "object",
           "properties": {"zebra": {"type": "integer", "minimum": 40, "maximum": 42}},
           "required": ["zebra"], "additionalProperties": false})
}

/// A probe: the feature, the request fields that ask for it, and whether an
/// answer kept to it.
type Probe = (Feature, Value, fn(&str) -> bool);

fn probes() -> Vec<Probe> {
    let exact: fn(&str) -> bool = |t| t.trim() == TOKEN;
    let regex: fn(&str) -> bool = |t| {
        t.trim()
            .strip_prefix("zebra-")
            .is_some_and(|d| d.len() == 2 && d.bytes().all(|b| b.is_ascii_digit()))
    };
    let object: fn(&str) -> bool = |t| {
        serde_json::from_str::<Value>(t).is_ok_and(|v| {
            v.as_object().is_some_and(|o| {
                o.len() == 1
                    && o.get("zebra")
                        .and_then(Value::as_i64)
                        .is_some_and(|z| (40..=42).contains(&z))
            })
        })
    };
    let any_object: fn(&str) -> bool =
        |t| serde_json::from_str::<Value>(t).is_ok_and(|v| v.is_object());
    let gbnf = format!("root ::= \"{TOKEN}\"");
    vec![
        (
            Feature::GuidedJson,
            json!({"guided_json": object_schema()}),
            object,
        ),
        (
            Feature::GuidedRegex,
            json!({"guided_regex": "zebra-[0-9]{2}"}),
            regex,
        ),
        (
            Feature::GuidedChoice,
            json!({"guided_choice": [TOKEN]}),
            exact,
        ),
        (
            Feature::GuidedGrammar,
            json!({"guided_grammar": gbnf}),
            exact,
        ),
        (
            Feature::StructuredOutputs,
            json!({"structured_outputs": {"choice": [TOKEN]}}),
            exact,
        ),
        (
            Feature::JsonSchemaField,
            json!({"json_schema": object_schema()}),
            object,
        ),
        (Feature::Grammar, json!({"grammar": gbnf}), exact),
        (
            Feature::JsonSchema,
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "zebra", "strict": true, "schema": object_schema()}}}),
            object,
        ),
        (
            Feature::JsonObject,
            json!({"response_format": {"type": "json_object"}}),
            any_object,
        ),
    ]
}

/// Runs every probe against `model` on `upstream`, one after another; an
/// upstream that cannot be asked (unreachable, failing, a 5xx) is an error,
/// not a finding.
pub async fn constraints(upstream: &CloudBackend, model: &str) -> Result<Vec<Finding>, String> {
    let mut out = Vec::new();
    for (feature, extra, kept) in probes() {
        let mut body = json!({
            "model": upstream.model_for(model),
            "messages": [{"role": "user", "content": "Name a colour. Answer in one word."}],
            "max_tokens": 32,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let verdict = match ask(upstream, body).await {
            Ok(text) if kept(&text) => Verdict::Applied,
            Ok(text) => Verdict::Ignored(text),
            Err(e) if (400..500).contains(&e.status) && e.status != 429 => {
                Verdict::Refused(e.message)
            }
            Err(e) => return Err(e.message),
        };
        out.push(Finding { feature, verdict });
    }
    Ok(out)
}

async fn ask(upstream: &CloudBackend, body: Value) -> Result<String, ApiError> {
    let req: ChatCompletionRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::invalid_request(format!("probe: {e}")))?;
    let req = req.into_generate()?;
    let stream = upstream.start(req).await.result?;
    Answer::collect(stream).await.map(|a| a.text)
}

/// The configuration lines the findings call for: the constraint fields
/// it applied, and the parts of OpenAI's API it ignored (a refusal is not
/// silent, so it needs no line).
pub fn suggested(findings: &[Finding]) -> (Vec<&'static str>, Vec<Feature>) {
    let applied = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Applied && f.feature.is_constraint())
        .map(|f| f.feature.param())
        .collect();
    let lacks = findings
        .iter()
        .filter(|f| matches!(f.verdict, Verdict::Ignored(_)) && !f.feature.is_constraint())
        .map(|f| f.feature)
        .collect();
    (applied, lacks)
}
