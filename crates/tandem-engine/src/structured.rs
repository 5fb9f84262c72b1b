//! Constrained decoding: `response_format` (`json_object`, `json_schema`)
//! and forced tool calls become a grammar that masks, at every step, the
//! tokens that would break it — so the answer always parses and matches its
//! schema. Grammars are compiled by llguidance (JSON schema and Lark),
//! whose masks cost tens of microseconds per token against llama.cpp's GBNF
//! sampler's milliseconds on a 150k-token vocabulary.
//!
//! A schema feature llguidance cannot enforce is refused with a 400 naming
//! it, never answered unconstrained.

use std::sync::OnceLock;

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Map, Value, json};
use tandem_api::ApiError;

/// A grammar an answer must follow, and the request field that asked for it.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON schema (`response_format`).
    Schema(Value),
    /// llguidance's Lark dialect (a forced tool call).
    Lark(String),
}

impl Grammar {
    fn param(&self) -> &'static str {
        match self {
            Grammar::Schema(_) => "response_format",
            Grammar::Lark(_) => "tool_choice",
        }
    }
}

/// JSON layout options for every schema: whitespace between tokens is
/// allowed (models write pretty JSON) but bounded, so that a small model
/// cannot spend its whole answer on newlines.
pub(crate) fn json_options() -> Value {
    json!({ "whitespace_pattern": "[\\x20\\x0A\\x0D\\x09]{0,16}" })
}

/// The grammar a `response_format` asks for; `None` for text.
pub fn response_format(extra: &Map<String, Value>) -> Result<Option<Grammar>, ApiError> {
    let Some(fmt) = extra.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let schema = match fmt.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => {
            let spec = fmt.get("json_schema").ok_or_else(|| {
                ApiError::invalid_param(
                    "response_format.json_schema",
                    "a json_schema response format needs `json_schema` with a `schema`",
                )
            })?;
            match spec.get("schema") {
                None | Some(Value::Null) => json!({}),
                Some(s @ Value::Object(_)) => s.clone(),
                Some(Value::Bool(true)) => json!({}),
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        "response_format.json_schema.schema",
                        "the schema must be a JSON object",
                    ));
                }
            }
        }
        other => {
            return Err(ApiError::invalid_param(
                "response_format",
                format!(
                    "unknown response_format type {}: use text, json_object or json_schema",
                    other.map_or("(missing)".to_owned(), |t| format!("`{t}`"))
                ),
            ));
        }
    };
    Ok(Some(Grammar::Schema(schema)))
}

/// Compiles grammars for one model. The token table it needs is built on
/// first use (a walk over the vocabulary), so engines that never constrain
/// pay nothing.
#[derive(Default)]
pub(crate) struct Constrainer {
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl Constrainer {
    fn factory(&self, model: &LlamaModel) -> Result<&ParserFactory, ApiError> {
        self.factory
            .get_or_init(|| {
                let env = LlamaSampler::llguidance_tok_env(model);
                ParserFactory::new_simple(&env)
                    .map(|mut f| {
                        f.quiet();
                        f
                    })
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| ApiError::internal(format!("constrained decoding is unavailable: {e}")))
    }

    /// A sampler that keeps the answer inside `grammar`, or a 400 naming
    /// what in it cannot be enforced.
    pub fn sampler(&self, model: &LlamaModel, grammar: &Grammar) -> Result<LlamaSampler, ApiError> {
        let parser = self.parser(model, grammar)?;
        Ok(LlamaSampler::from(Matcher::new(Ok(parser))))
    }

    /// Whether `grammar` can be enforced: the 400 [`Constrainer::sampler`]
    /// would give, without a sampler.
    pub fn check(&self, model: &LlamaModel, grammar: &Grammar) -> Result<(), ApiError> {
        self.parser(model, grammar).map(drop)
    }

    fn parser(
        &self,
        model: &LlamaModel,
        grammar: &Grammar,
    ) -> Result<llguidance::TokenParser, ApiError> {
        let factory = self.factory(model)?;
        let top = match grammar {
            Grammar::Schema(schema) => {
                let mut schema = schema.clone();
                without_no_ops(&mut schema);
                if let Value::Object(m) = &mut schema {
                    m.entry("x-guidance").or_insert_with(json_options);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        };
        factory.create_parser(top).map_err(|e| {
            ApiError::invalid_param(
                grammar.param(),
                format!("this schema cannot be enforced on the local model: {e}"),
            )
        })
    }
}

/// Drops keywords that constrain nothing and that the grammar compiler
/// would refuse as unknown: `uniqueItems: false` (what Pydantic writes for
/// a list, beside `true` for a set).
pub(crate) fn without_no_ops(schema: &mut Value) {
    match schema {
        Value::Object(m) => {
            if m.get("uniqueItems") == Some(&Value::Bool(false)) {
                m.remove("uniqueItems");
            }
            for v in m.values_mut() {
                without_no_ops(v);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(without_no_ops),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fmt(v: Value) -> Result<Option<Grammar>, ApiError> {
        response_format(json!({ "response_format": v }).as_object().unwrap())
    }

    #[test]
    fn response_formats_become_schemas() {
        assert_eq!(fmt(json!({"type": "text"})).unwrap(), None);
        assert_eq!(
            fmt(json!({"type": "json_object"})).unwrap(),
            Some(Grammar::Schema(json!({"type": "object"})))
        );
        let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert_eq!(
            fmt(json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": s}}))
                .unwrap(),
            Some(Grammar::Schema(s))
        );
        assert_eq!(fmt(json!({"type": "json_schema"})).unwrap_err().status, 400);
        assert_eq!(fmt(json!({"type": "yaml"})).unwrap_err().status, 400);
        assert_eq!(
            fmt(json!({"type": "json_schema", "json_schema": {"schema": [1]}}))
                .unwrap_err()
                .status,
            400
        );
    }
}
