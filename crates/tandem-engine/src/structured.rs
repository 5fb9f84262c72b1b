//! Constrained decoding: `response_format` (`json_object`, `json_schema`)
//! and forced tool calls become a grammar that masks, at every step, the
//! tokens that would break it — so the answer always parses and matches its
//! schema. Grammars are compiled by llguidance (JSON schema and Lark),
//! whose masks cost tens of microseconds per token against llama.cpp's GBNF
//! sampler's milliseconds on a 150k-token vocabulary.
//!
//! A schema feature llguidance cannot enforce is refused with a 400 naming
//! it, never answered unconstrained.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
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
///
/// Compiled grammars are kept, the most recently used [`KEPT`]: the router
/// compiles a request's grammar to ask whether the device can enforce it,
/// and the sampler then needs the same grammar; and clients send one schema
/// with request after request. A verdict that a grammar cannot be enforced
/// is kept as well.
#[derive(Default)]
pub(crate) struct Constrainer {
    factory: OnceLock<Result<ParserFactory, String>>,
    compiled: Mutex<VecDeque<Compiled>>,
    compilations: AtomicU64,
}

/// How many compiled grammars a [`Constrainer`] keeps.
const KEPT: usize = 16;

/// A grammar compiled once, by the hash of what was compiled.
struct Compiled {
    key: [u8; 32],
    /// A parser in its initial state, never advanced itself: each use takes
    /// a clone (which shares its lexer's cache, so that masks a request
    /// computed are warm for the next), or the compiler's refusal.
    parser: Result<llguidance::TokenParser, String>,
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

    /// How many grammars were compiled, not found kept, ever.
    pub fn compilations(&self) -> u64 {
        self.compilations.load(Ordering::Relaxed)
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
                prepare(&mut schema);
                if let Value::Object(m) = &mut schema {
                    m.entry("x-guidance").or_insert_with(json_options);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
        };
        let refused = |e: &str| {
            ApiError::invalid_param(
                grammar.param(),
                format!("this schema cannot be enforced on the local model: {e}"),
            )
        };
        // The grammar as the compiler gets it, serialised, is the key: two
        // spellings of one schema may compile twice, never share wrongly.
        let key: [u8; 32] = match serde_json::to_vec(&top) {
            Ok(bytes) => Sha256::digest(&bytes).into(),
            Err(e) => return Err(refused(&e.to_string())),
        };
        if let Some(found) = self.take_kept(&key) {
            return found.map_err(|e| refused(&e));
        }
        // Compiled outside the lock: a large grammar takes milliseconds,
        // and other requests' kept grammars should not wait on it.
        let parser = factory.create_parser(top).map_err(|e| e.to_string());
        self.compilations.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut kept) = self.compiled.lock() {
            kept.retain(|c| c.key != key);
            kept.push_front(Compiled {
                key,
                parser: parser.clone(),
            });
            kept.truncate(KEPT);
        }
        parser.map_err(|e| refused(&e))
    }

    /// A kept grammar's parser (a fresh clone) or refusal, moved to the
    /// front as the most recently used.
    fn take_kept(&self, key: &[u8; 32]) -> Option<Result<llguidance::TokenParser, String>> {
        let mut kept = self.compiled.lock().ok()?;
        let at = kept.iter().position(|c| &c.key == key)?;
        let found = kept.remove(at)?;
        let parser = found.parser.clone();
        kept.push_front(found);
        Some(parser)
    }
}

/// What the grammar compiler gets for a schema: the same answers, written
/// so that llguidance takes it and holds it to what a validator checks.
///
/// - `uniqueItems: false` (what Pydantic writes for a list, beside `true`
///   for a set) constrains nothing, and the compiler would refuse it as an
///   unknown key: dropped.
/// - `format: email` and `format: hostname` compile to llguidance's
///   patterns, which leave lengths unbounded: a small model can write 100
///   characters before the `@`, where RFC 5321 and every validator allow
///   64, or a label with `--` in third and fourth place, which must then be
///   punycode. Where the schema has no `pattern` of its own, such a format
///   becomes a [`BOUNDED_EMAIL`] or [`BOUNDED_HOSTNAME`] pattern: every
///   string it admits is valid.
///
/// Only schemas are rewritten, never data (`const`, `enum`, `default`), and
/// never a property that happens to be named like a keyword.
pub(crate) fn prepare(schema: &mut Value) {
    each_schema(schema, &mut |m| {
        if m.get("uniqueItems") == Some(&Value::Bool(false)) {
            m.remove("uniqueItems");
        }
        if m.contains_key("pattern") {
            return;
        }
        let bounded = match m.get("format").and_then(Value::as_str) {
            Some("email") => BOUNDED_EMAIL,
            Some("hostname") => BOUNDED_HOSTNAME,
            _ => return,
        };
        m.remove("format");
        m.insert("pattern".into(), Value::String(format!("^{bounded}$")));
    });
}

/// A domain label: letters and digits in runs of at most 20, joined by
/// single hyphens (so never `--`, nor one at an end), at most 62 long.
macro_rules! label {
    () => {
        "[a-zA-Z0-9]{1,20}(?:-[a-zA-Z0-9]{1,20}){0,2}"
    };
}

/// RFC 5322's dot-atom characters, as llguidance's own email format has them.
macro_rules! atext {
    () => {
        "[a-zA-Z0-9!#$%&'*+\\-/=?^_`{|}~]"
    };
}

/// A host name of one to four labels: at most 251 characters (253 allowed).
pub(crate) const BOUNDED_HOSTNAME: &str = concat!(label!(), "(?:\\.", label!(), "){0,3}");

/// An address whose local part is at most 64 characters (one atom of up to
/// 64, or two to four of up to 15 joined by dots) at a domain of two to
/// four labels: a subset of what RFC 5321 allows, never beyond it.
pub(crate) const BOUNDED_EMAIL: &str = concat!(
    "(?:",
    atext!(),
    "{1,64}|",
    atext!(),
    "{1,15}(?:\\.",
    atext!(),
    "{1,15}){1,3})@",
    label!(),
    "(?:\\.",
    label!(),
    "){1,3}"
);

/// Calls `f` on `schema` and on every schema inside it: the values of the
/// keywords that hold schemas.
fn each_schema(schema: &mut Value, f: &mut impl FnMut(&mut Map<String, Value>)) {
    let Value::Object(m) = schema else {
        return;
    };
    f(m);
    for (key, v) in m.iter_mut() {
        match (key.as_str(), v) {
            (
                "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas",
                Value::Object(subs),
            ) => subs.values_mut().for_each(|s| each_schema(s, f)),
            ("anyOf" | "allOf" | "oneOf" | "prefixItems" | "items", Value::Array(subs)) => {
                subs.iter_mut().for_each(|s| each_schema(s, f))
            }
            (
                "items"
                | "additionalItems"
                | "additionalProperties"
                | "unevaluatedItems"
                | "unevaluatedProperties"
                | "not"
                | "if"
                | "then"
                | "else"
                | "contains"
                | "propertyNames",
                s,
            ) => each_schema(s, f),
            _ => {}
        }
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

    #[test]
    fn prepare_rewrites_schemas_never_data() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": false},
                "uniqueItems": false,
                "format": {"type": "string", "format": "email"},
                "site": {"anyOf": [{"type": "string", "format": "hostname"}, {"type": "null"}]},
                "code": {"type": "string", "format": "email", "pattern": "^a.*$"},
                "fixed": {"const": {"uniqueItems": false, "format": "email"}},
                "when": {"type": "string", "format": "date"}
            },
            "$defs": {"Set": {"type": "array", "uniqueItems": true}},
            "default": {"uniqueItems": false}
        });
        prepare(&mut schema);
        let p = &schema["properties"];
        assert_eq!(
            p["tags"],
            json!({"type": "array", "items": {"type": "string"}})
        );
        // A property named like a keyword is a property: `false` forbids it.
        assert_eq!(p["uniqueItems"], json!(false));
        assert_eq!(p["format"]["pattern"], json!(format!("^{BOUNDED_EMAIL}$")));
        assert_eq!(p["format"].get("format"), None);
        assert_eq!(
            p["site"]["anyOf"][0]["pattern"],
            json!(format!("^{BOUNDED_HOSTNAME}$"))
        );
        // A pattern of the schema's own stands, with the format beside it.
        assert_eq!(p["code"]["format"], json!("email"));
        assert_eq!(
            p["fixed"],
            json!({"const": {"uniqueItems": false, "format": "email"}})
        );
        assert_eq!(p["when"]["format"], json!("date"));
        assert_eq!(schema["$defs"]["Set"]["uniqueItems"], json!(true));
        assert_eq!(schema["default"], json!({"uniqueItems": false}));
    }

    proptest::proptest! {
        /// Whatever the bounded patterns admit, a validator takes: the
        /// rewrite may narrow a format, never widen it.
        #[test]
        fn the_bounded_formats_admit_only_valid_strings(
            email in proptest::string::string_regex(BOUNDED_EMAIL).unwrap(),
            host in proptest::string::string_regex(BOUNDED_HOSTNAME).unwrap(),
        ) {
            let strict = jsonschema::options().should_validate_formats(true);
            let check = |format: &str, s: &str| {
                strict
                    .build(&json!({"type": "string", "format": format}))
                    .map(|v| v.is_valid(&json!(s)))
                    .unwrap_or(false)
            };
            proptest::prop_assert!(check("email", &email), "{email}");
            proptest::prop_assert!(email.split('@').next().is_some_and(|l| l.len() <= 64));
            proptest::prop_assert!(check("hostname", &host), "{host}");
        }
    }
}
