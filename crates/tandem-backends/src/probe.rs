//! What an upstream applies of the fields that constrain an answer, and
//! whether it continues an answer begun elsewhere, found by asking it:
//! `tandem upstreams check` runs these probes and prints the
//! `constraint_fields`, `lacks` and `continuation` lines that say so.
//!
//! Each probe asks an ordinary question ("Name a colour.") under a
//! constraint no model would meet by chance (the answer must be
//! `zebra-42`, or an object holding only `zebra` between 40 and 42). An
//! upstream that applies the field meets it; one that ignores it answers
//! the question; one that refuses it answers an error. The continuation
//! probe gives it the start of that object to finish: one that continues
//! it writes the rest; one that repeats the start in its answer (as a
//! llama.cpp server does) or starts a new object does not. No probe
//! carries anything but these fixed texts.

use serde_json::{Value, json};
use tandem_api::openai::ChatCompletionRequest;
use tandem_api::{Answer, ApiError, Backend, Feature, FinishReason};

use crate::{CloudBackend, Continuation};

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
    /// The answer was cut by `max_tokens` before it kept to the constraint
    /// (the text so far): applied or not, it cannot tell.
    Unsure(String),
}

/// The start of an answer the continuation probe asks the upstream to
/// finish.
const BEGUN: &str = "{\"zebra\": 4";

/// Room enough for a model that writes a code fence and blank lines
/// before the value, as the grammars of some servers allow.
const MAX_TOKENS: u32 = 128;

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

/// Whether `text`, the answer to the continuation probe, finished the
/// object [`BEGUN`] without repeating it or starting another.
fn continued(text: &str) -> bool {
    !text.trim_start().starts_with('{')
        && serde_json::from_str::<Value>(&format!("{BEGUN}{text}")).is_ok_and(|v| {
            v.get("zebra")
                .and_then(Value::as_i64)
                .is_some_and(|z| (40..=42).contains(&z))
        })
}

/// What an answer (or the error in its place) says of the probe that
/// asked for it; `Err` when it says nothing (the upstream could not be
/// asked: unreachable, failing, a 5xx or 429).
pub fn judge(answer: Result<Answer, ApiError>, kept: fn(&str) -> bool) -> Result<Verdict, String> {
    match answer {
        Ok(a) if kept(&a.text) => Ok(Verdict::Applied),
        Ok(a) if a.finish.reason == FinishReason::Length => Ok(Verdict::Unsure(a.text)),
        Ok(a) => Ok(Verdict::Ignored(a.text)),
        Err(e) if (400..500).contains(&e.status) && e.status != 429 => {
            Ok(Verdict::Refused(e.message))
        }
        Err(e) => Err(e.message),
    }
}

/// Runs every probe against `model` on `upstream`, one after another; an
/// upstream that cannot be asked (unreachable, failing, a 5xx) is an error,
/// not a finding. The last finding is the continuation's
/// ([`Feature::Continuation`]).
pub async fn constraints(upstream: &CloudBackend, model: &str) -> Result<Vec<Finding>, String> {
    let mut out = Vec::new();
    let question = json!({"role": "user", "content": "Name a colour. Answer in one word."});
    for (feature, extra, kept) in probes() {
        let mut body = json!({
            "model": upstream.model_for(model),
            "messages": [question],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let verdict = judge(ask(upstream, body).await, kept)?;
        out.push(Finding { feature, verdict });
    }
    // Under the schema where the upstream applies one, so that an answer
    // that reads as a continuation is one its grammar allowed too.
    let schema_applied = out
        .iter()
        .any(|f| f.feature == Feature::JsonSchema && f.verdict == Verdict::Applied);
    let mut body = json!({
        "model": upstream.model_for(model),
        "messages": [question, {"role": "assistant", "content": BEGUN}],
        "continue_final_message": true,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    });
    if schema_applied {
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "zebra", "strict": true, "schema": object_schema()}});
    }
    let verdict = judge(ask(&upstream.prefilling()?, body).await, continued)?;
    out.push(Finding {
        feature: Feature::Continuation,
        verdict,
    });
    Ok(out)
}

async fn ask(upstream: &CloudBackend, body: Value) -> Result<Answer, ApiError> {
    let req: ChatCompletionRequest = serde_json::from_value(body)
        .map_err(|e| ApiError::invalid_request(format!("probe: {e}")))?;
    let req = req.into_generate()?;
    let stream = upstream.start(req).await.result?;
    Answer::collect(stream).await
}

/// The configuration lines the findings call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggested {
    /// The constraint fields it applied.
    pub constraint_fields: Vec<&'static str>,
    /// The response formats it ignored (a refusal is not silent, so it
    /// needs no line; an unsure finding is left to the operator), after
    /// what the configuration declares that no probe asks about
    /// (`logit_bias`, `best_of`...), which stays as declared.
    pub lacks: Vec<Feature>,
    /// `Prefill` when it finished an answer begun elsewhere.
    pub continuation: Continuation,
}

/// What [`constraints`]' findings call for, where `declared` is the
/// upstream's `lacks` as configured.
pub fn suggested(findings: &[Finding], declared: &[Feature]) -> Suggested {
    let response_format = |f: &&Finding| f.feature.shapes_answer() && !f.feature.is_constraint();
    let unprobed = declared
        .iter()
        .filter(|d| !findings.iter().any(|f| f.feature == **d))
        .copied();
    Suggested {
        constraint_fields: findings
            .iter()
            .filter(|f| f.verdict == Verdict::Applied && f.feature.is_constraint())
            .map(|f| f.feature.param())
            .collect(),
        lacks: unprobed
            .chain(
                findings
                    .iter()
                    .filter(response_format)
                    .filter(|f| matches!(f.verdict, Verdict::Ignored(_)))
                    .map(|f| f.feature),
            )
            .collect(),
        continuation: if findings
            .iter()
            .any(|f| f.feature == Feature::Continuation && f.verdict == Verdict::Applied)
        {
            Continuation::Prefill
        } else {
            Continuation::None
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::{Finish, Usage};

    fn answer(text: &str, reason: FinishReason) -> Result<Answer, ApiError> {
        Ok(Answer {
            text: text.into(),
            tokens: Vec::new(),
            tool_calls: Vec::new(),
            extra: Default::default(),
            response: Default::default(),
            finish: Finish {
                reason,
                usage: Usage::default(),
            },
        })
    }

    #[test]
    fn a_continuation_finishes_the_object_without_repeating_it() {
        // As a Tandem answers: the rest of the object.
        assert!(continued("1}"));
        assert!(continued("2 }"));
        // As a llama.cpp server answers: the start repeated before the rest.
        assert!(!continued("{\"zebra\": 42}"));
        // A second object after the first, a value out of range, prose.
        assert!(!continued(" {\"zebra\": 41}"));
        assert!(!continued("7}"));
        assert!(!continued("Red"));
    }

    #[test]
    fn an_answer_cut_short_is_unsure_and_a_server_error_no_finding() {
        let exact: fn(&str) -> bool = |t| t == TOKEN;
        assert_eq!(
            judge(answer(TOKEN, FinishReason::Length), exact),
            Ok(Verdict::Applied)
        );
        // llama.cpp's grammar lets a model open a code fence and write
        // blank lines first: cut there, the answer says nothing yet.
        assert_eq!(
            judge(answer("```json\n\n      ", FinishReason::Length), exact),
            Ok(Verdict::Unsure("```json\n\n      ".into()))
        );
        assert_eq!(
            judge(answer("Red", FinishReason::Stop), exact),
            Ok(Verdict::Ignored("Red".into()))
        );
        assert_eq!(
            judge(Err(ApiError::invalid_param("grammar", "no")), exact),
            Ok(Verdict::Refused("no".into()))
        );
        assert!(judge(Err(ApiError::bad_gateway("down")), exact).is_err());
        assert!(judge(Err(ApiError::rate_limited("later")), exact).is_err());
    }

    #[test]
    fn only_what_was_seen_is_declared() {
        let f = |feature, verdict| Finding { feature, verdict };
        let found = [
            f(Feature::GuidedJson, Verdict::Ignored("Red".into())),
            f(Feature::JsonSchemaField, Verdict::Applied),
            f(Feature::Grammar, Verdict::Unsure("```".into())),
            f(Feature::JsonSchema, Verdict::Unsure("```".into())),
            f(Feature::JsonObject, Verdict::Ignored("Red".into())),
            f(Feature::Continuation, Verdict::Ignored("{".into())),
        ];
        assert_eq!(
            suggested(&found, &[]),
            Suggested {
                constraint_fields: vec!["json_schema"],
                lacks: vec![Feature::JsonObject],
                continuation: Continuation::None,
            }
        );
        // What no probe asks about stays as declared; what one asks about
        // is what it found.
        assert_eq!(
            suggested(&found, &[Feature::LogitBias, Feature::JsonSchema]).lacks,
            vec![Feature::LogitBias, Feature::JsonObject]
        );
        let mut found = found.to_vec();
        if let Some(last) = found.last_mut() {
            last.verdict = Verdict::Applied;
        }
        assert_eq!(suggested(&found, &[]).continuation, Continuation::Prefill);
    }
}
