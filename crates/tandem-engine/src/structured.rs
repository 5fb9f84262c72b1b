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
    /// A regular expression the whole answer matches.
    Regex(String),
    /// A context-free grammar a client wrote: GBNF (llama.cpp's `grammar`,
    /// vLLM's `guided_grammar` for xgrammar), read by [`crate::gbnf`]; or,
    /// without a `::=`, Lark (vLLM's `guided_grammar` for llguidance).
    Bnf(String),
    /// One of the above asked by an extension field (see
    /// [`tandem_api::GUIDED_FIELDS`]), which errors name.
    Field(&'static str, Box<Grammar>),
}

impl Grammar {
    fn param(&self) -> &'static str {
        match self {
            Grammar::Lark(_) => "tool_choice",
            Grammar::Field(field, _) => field,
            Grammar::Schema(_) | Grammar::Regex(_) | Grammar::Bnf(_) => "response_format",
        }
    }

    /// What it is, for errors.
    fn noun(&self) -> &'static str {
        match self {
            Grammar::Schema(_) | Grammar::Lark(_) => "schema",
            Grammar::Regex(_) => "regular expression",
            Grammar::Bnf(_) => "grammar",
            Grammar::Field(_, inner) => inner.noun(),
        }
    }

    /// What the compiler gets, or why nothing can be compiled.
    fn top_level(&self) -> Result<TopLevelGrammar, String> {
        Ok(match self {
            Grammar::Schema(schema) => {
                let mut schema = schema.clone();
                prepare(&mut schema);
                if let Value::Object(m) = &mut schema {
                    m.entry("x-guidance").or_insert_with(json_options);
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(src) => TopLevelGrammar::from_lark(src.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Bnf(src) if src.contains("::=") => TopLevelGrammar::from_lark(
                crate::gbnf::to_lark(src).map_err(|e| format!("its GBNF cannot be read: {e}"))?,
            ),
            Grammar::Bnf(src) => TopLevelGrammar::from_lark(src.clone()),
            Grammar::Field(_, inner) => return inner.top_level(),
        })
    }

    /// The text whose numbers decide whether the number guard may mask
    /// beside this grammar; `None` where the answer is not JSON.
    fn json_text(&self) -> Option<String> {
        match self {
            Grammar::Schema(schema) => Some(schema.to_string()),
            Grammar::Lark(src) => Some(src.clone()),
            Grammar::Regex(_) | Grammar::Bnf(_) => None,
            Grammar::Field(_, inner) => inner.json_text(),
        }
    }

    /// The same schema with whitespace unbounded, for a start another
    /// model wrote; `None` where there is nothing to loosen.
    fn loosened(&self) -> Option<Grammar> {
        match self {
            Grammar::Schema(Value::Object(m)) if !m.contains_key("x-guidance") => {
                let mut m = m.clone();
                m.insert("x-guidance".into(), json!({"whitespace_flexible": true}));
                Some(Grammar::Schema(Value::Object(m)))
            }
            Grammar::Field(field, inner) => {
                inner.loosened().map(|g| Grammar::Field(field, Box::new(g)))
            }
            _ => None,
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

/// The grammar a request asks for: `response_format`, or one of the
/// extension fields vLLM's and llama.cpp's servers take
/// ([`tandem_api::GUIDED_FIELDS`]); `None` for text. Two of them at once
/// are a 400: which one the answer should keep to is not said.
pub fn requested(extra: &Map<String, Value>) -> Result<Option<Grammar>, ApiError> {
    let format = response_format(extra)?;
    let mut given = tandem_api::GUIDED_FIELDS
        .iter()
        .filter_map(|&k| extra.get(k).filter(|v| !v.is_null()).map(|v| (k, v)));
    let Some((field, v)) = given.next() else {
        return Ok(format);
    };
    if let Some((other, _)) = given.next() {
        return Err(ApiError::invalid_param(
            other,
            format!("`{field}` and `{other}` both constrain the answer: send one"),
        ));
    }
    if format.is_some() {
        return Err(ApiError::invalid_param(
            field,
            format!("`response_format` and `{field}` both constrain the answer: send one"),
        ));
    }
    Ok(Some(Grammar::Field(field, Box::new(guided(field, v)?))))
}

/// What an extension field asks for, as its server reads it.
fn guided(field: &str, v: &Value) -> Result<Grammar, ApiError> {
    let bad = |what: &str| ApiError::invalid_param(field, format!("`{field}` must be {what}"));
    let text = |v: &Value| v.as_str().map(str::to_owned).ok_or_else(|| bad("a string"));
    let schema = |v: &Value| match v {
        Value::Object(_) => Ok(v.clone()),
        Value::Bool(true) => Ok(json!({})),
        Value::String(s) => serde_json::from_str::<Value>(s)
            .ok()
            .filter(Value::is_object)
            .ok_or_else(|| bad("a JSON schema (an object, or its text)")),
        _ => Err(bad("a JSON schema (an object, or its text)")),
    };
    let choice = |v: &Value| {
        let options: Vec<&str> = v
            .as_array()
            .filter(|a| !a.is_empty())
            .and_then(|a| a.iter().map(Value::as_str).collect())
            .ok_or_else(|| bad("a non-empty list of strings"))?;
        let escaped: Vec<String> = options.iter().map(|o| escape_regex(o)).collect();
        Ok::<_, ApiError>(Grammar::Regex(format!("(?:{})", escaped.join("|"))))
    };
    match field {
        "guided_json" | "json_schema" => Ok(Grammar::Schema(schema(v)?)),
        "guided_regex" => Ok(Grammar::Regex(text(v)?)),
        "guided_choice" => choice(v),
        "guided_grammar" | "grammar" => Ok(Grammar::Bnf(text(v)?)),
        "structured_outputs" => {
            let m = v
                .as_object()
                .ok_or_else(|| bad("an object with one of json, regex, choice or grammar"))?;
            match (
                m.get("json"),
                m.get("regex"),
                m.get("choice"),
                m.get("grammar"),
            ) {
                (Some(j), None, None, None) => Ok(Grammar::Schema(schema(j)?)),
                (None, Some(r), None, None) => Ok(Grammar::Regex(text(r)?)),
                (None, None, Some(c), None) => choice(c),
                (None, None, None, Some(g)) => Ok(Grammar::Bnf(text(g)?)),
                (None, None, None, None)
                    if m.get("json_object").and_then(Value::as_bool) == Some(true) =>
                {
                    Ok(Grammar::Schema(json!({"type": "object"})))
                }
                _ => Err(bad("an object with one of json, regex, choice or grammar")),
            }
        }
        _ => Err(bad("a known constraint")),
    }
}

/// `s` as a regular expression that matches it literally.
fn escape_regex(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
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
    /// [`NUMBER_GUARD`] compiled, in its initial state (each use clones it).
    guard: OnceLock<Result<llguidance::TokenParser, String>>,
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

    /// The matchers that keep the answer inside `grammar` (the grammar's,
    /// then the number guard's where it applies: a token must pass every
    /// one), or a 400 naming what in it cannot be enforced.
    ///
    /// `written` is the start of the answer already given (a continued
    /// answer: another side's, handed over mid-stream): the grammar reads it
    /// first, so the model goes on from where it stands rather than open a
    /// second value after it. A start the grammar cannot continue is a 400:
    /// nothing written after it would parse.
    ///
    /// Where every number the grammar names fits [`NUMBER_GUARD`], the
    /// guard masks beside it: a grammar bounds no digits, and a small model
    /// left to it writes numbers of sixty digits, or `1.0E+38475`, which
    /// parse as infinity. A start the guard would not have written (a
    /// longer number from another model) leaves the rest unguarded.
    pub fn matchers(
        &self,
        model: &LlamaModel,
        grammar: &Grammar,
        written: &str,
    ) -> Result<Vec<Matcher>, ApiError> {
        let start = self
            .factory(model)?
            .tok_env()
            .tok_trie()
            .greedy_tokenize(written.as_bytes());
        let mut matcher = Matcher::new(Ok(self.parser(model, grammar)?));
        if let Err(e) = matcher.consume_tokens(&start) {
            // Another model may indent deeper than [`json_options`] lets a
            // small one: its start is read again with whitespace unbounded.
            let mut again = match grammar.loosened() {
                Some(g) => Matcher::new(Ok(self.parser(model, &g)?)),
                None => matcher,
            };
            if again.consume_tokens(&start).is_err() {
                return Err(ApiError::invalid_param(
                    grammar.param(),
                    format!("the answer to continue does not keep to this grammar: {e}"),
                ));
            }
            matcher = again;
        }
        if !grammar.json_text().is_some_and(|t| numbers_fit_guard(&t)) {
            return Ok(vec![matcher]);
        }
        let Some(guard) = self.guard(model) else {
            return Ok(vec![matcher]);
        };
        let mut guard = Matcher::new(Ok(guard));
        if guard.consume_tokens(&start).is_err() {
            return Ok(vec![matcher]);
        }
        Ok(vec![matcher, guard])
    }

    /// A fresh parser of [`NUMBER_GUARD`]; `None` (and a warning, once) if
    /// it does not compile, and answers go unguarded rather than refused.
    fn guard(&self, model: &LlamaModel) -> Option<llguidance::TokenParser> {
        let factory = self.factory(model).ok()?;
        let kept = self.guard.get_or_init(|| {
            let parsed = factory
                .create_parser(TopLevelGrammar::from_regex(NUMBER_GUARD))
                .map_err(|e| e.to_string());
            if let Err(e) = &parsed {
                tracing::warn!(error = %e, "the number guard does not compile");
            }
            parsed
        });
        kept.as_ref().ok().cloned()
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
        let refused = |e: &str| {
            ApiError::invalid_param(
                grammar.param(),
                format!(
                    "this {} cannot be enforced on the local model: {e}",
                    grammar.noun()
                ),
            )
        };
        let top = grammar.top_level().map_err(|e| refused(&e))?;
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
        // Checked only here, so that a kept grammar is not walked again: its
        // refusal is kept like the compiler's.
        let parser = match embedded_schemas(grammar).iter().find_map(inexact_constant) {
            Some(n) => Err(format!(
                "the constant {n} is an integer beyond 2^53, which the grammar would write as another"
            )),
            None => factory.create_parser(top).map_err(|e| e.to_string()),
        };
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

/// The JSON schemas in a grammar: the schema itself, or each one a Lark
/// grammar embeds after `%json`.
fn embedded_schemas(grammar: &Grammar) -> Vec<Value> {
    match grammar {
        Grammar::Schema(schema) => vec![schema.clone()],
        Grammar::Regex(_) | Grammar::Bnf(_) => vec![],
        Grammar::Field(_, inner) => embedded_schemas(inner),
        Grammar::Lark(src) => src
            .match_indices("%json")
            .filter_map(|(at, tag)| {
                let rest = src.get(at + tag.len()..)?;
                serde_json::Deserializer::from_str(rest)
                    .into_iter::<Value>()
                    .next()?
                    .ok()
            })
            .collect(),
    }
}

/// The first `const` or `enum` integer in `schema` beyond 2^53. The
/// grammar compiler holds a constant as a double and would have the model
/// write `12345678901234567890` as `12345678901234567000`, another number,
/// which fails the schema: such a schema is refused instead.
fn inexact_constant(schema: &Value) -> Option<String> {
    fn beyond(v: &Value) -> Option<String> {
        match v {
            Value::Number(n) => {
                let big = n
                    .as_u64()
                    .map(|u| u > 1 << 53)
                    .or(n.as_i64().map(|i| i < -(1 << 53)));
                big.unwrap_or(false).then(|| n.to_string())
            }
            Value::Array(items) => items.iter().find_map(beyond),
            Value::Object(m) => m.values().find_map(beyond),
            _ => None,
        }
    }
    let mut schema = schema.clone();
    let mut found = None;
    each_schema(&mut schema, &mut |m| {
        if found.is_none() {
            found = ["const", "enum"]
                .iter()
                .find_map(|k| m.get(*k).and_then(beyond));
        }
    });
    found
}

/// A number as [`NUMBER_GUARD`] lets a model write it: at most 15 digits
/// before the point and 15 after, and an exponent of at most two digits —
/// so that each is a finite double whose integral part is exact (llama.cpp
/// bounds its grammars' numbers to 16 digits a part, for the same reason).
macro_rules! guarded_number {
    () => {
        r"-?[0-9]{1,15}(?:\.[0-9]{1,15})?(?:[eE][+\-]?[0-9]{1,2})?"
    };
}

/// The whole of an answer as the number guard reads it: strings, whatever
/// their content; numbers as [`guarded_number!`] has them, each ended by
/// what ends a JSON value (`,`, `]`, `}`, whitespace) or by the answer's
/// end; and any other character that cannot be part of a number (`e` and
/// `E` alone, as in `true`). Masked beside a JSON grammar, it leaves the
/// grammar's answers except those with a longer number.
pub(crate) const NUMBER_GUARD: &str = concat!(
    r#"(?:"(?:[^"\\]|\\.)*"|[^0-9"eE.\-]|[eE]|"#,
    guarded_number!(),
    r"[,\]}\s])*(?:",
    guarded_number!(),
    ")?"
);

/// Whether a grammar may be guarded: the guard could otherwise leave it
/// nothing to write (a dead end the sampler cannot see).
///
/// - Every number written in its text must be a digit shorter, a part,
///   than the guard allows, and under 1e14 (nothing nonzero under 1e-14):
///   a `const`, an `enum` value or a bound that is not could need digits
///   the guard forbids — between two bounds of 14 decimals there is always
///   a number of 15 within the guard.
/// - It must not say `multipleOf`: a number of 15 digits that is not yet a
///   multiple needs more, which the guard forbids.
///
/// Numbers and words inside its strings count too, which only ever leaves
/// a grammar unguarded that could have been guarded.
pub(crate) fn numbers_fit_guard(text: &str) -> bool {
    if text.contains("multipleOf") {
        return false;
    }
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let run = |i: &mut usize| {
        let from = *i;
        while digit(*i) {
            *i += 1;
        }
        *i - from
    };
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        let from = i;
        let int = run(&mut i);
        let mut frac = 0;
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            i += 1;
            frac = run(&mut i);
        }
        let mut exp = 0;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            let sign = usize::from(matches!(b.get(i + 1), Some(b'+' | b'-')));
            if digit(i + 1 + sign) {
                i += 1 + sign;
                exp = run(&mut i);
            }
        }
        if int > 14 || frac > 14 || exp > 2 {
            return false;
        }
        let size = text.get(from..i).and_then(|t| t.parse::<f64>().ok());
        if size.is_some_and(|v| v != 0.0 && !(1e-14..1e14).contains(&v)) {
            return false;
        }
    }
    true
}

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

    #[test]
    fn a_constant_beyond_2_53_is_found_in_a_schema_or_a_forced_call() {
        let schema = json!({"properties": {"a": {"enum": [1, {"x": 9007199254740993u64}]}}});
        assert_eq!(inexact_constant(&schema), Some("9007199254740993".into()));
        let exact = json!({"const": 9007199254740992u64, "enum": [-9007199254740992i64, 0.1]});
        assert_eq!(inexact_constant(&exact), None);
        // Data that is not a constant, and a property named `const`.
        let data = json!({"properties": {"const": {"type": "integer"}},
            "default": 12345678901234567890u64, "maximum": 1e300});
        assert_eq!(inexact_constant(&data), None);

        let extra = json!({"tool_choice": "required", "tools": [
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                "properties": {"id": {"const": 12345678901234567890u64}}}}},
            {"type": "function", "function": {"name": "g", "parameters": {"type": "object",
                "properties": {"n": {"type": "integer"}}}}}]});
        let tools = crate::tools::ToolRequest::from_extra(extra.as_object().unwrap()).unwrap();
        for syntax in [crate::tools::Syntax::Hermes, crate::tools::Syntax::Json] {
            let lark = Grammar::Lark(tools.as_ref().unwrap().grammar(syntax).unwrap());
            let found: Vec<_> = embedded_schemas(&lark)
                .iter()
                .filter_map(inexact_constant)
                .collect();
            assert_eq!(found, ["12345678901234567890"], "{lark:?}");
        }
    }

    fn guard() -> regex::Regex {
        regex::Regex::new(&format!("^(?:{NUMBER_GUARD})$")).unwrap()
    }

    #[test]
    fn the_number_guard_passes_json_whose_numbers_fit_and_no_other() {
        let g = guard();
        for fits in [
            r#"{"a": 1, "b": [2.5, -3e7, 0.333333333333333], "t": true, "f": false, "n": null}"#,
            r#"{"digits in a string": "12345678901234567890 1e999 \" 1234567890123456789"}"#,
            "123456789012345",
            "-1.5E+99",
            "{\n  \"x\" : 4.2e-10\n}",
            "[]",
            r#"<tool_call>
{"name": "f", "arguments": {"n": 42}}
</tool_call>"#,
        ] {
            assert!(g.is_match(fits), "{fits}");
        }
        for long in [
            "1234567890123456",
            r#"{"a": 0.1234567890123456}"#,
            r#"{"ratio": 1.0E+38475}"#,
            "[1e100]",
            r#"{"a": 1e+000}"#,
            r#"{"count": 3600000000000000000000000000000000000000001}"#,
        ] {
            assert!(!g.is_match(long), "{long}");
        }
    }

    #[test]
    fn a_grammar_naming_a_number_the_guard_forbids_goes_unguarded() {
        for fits in [
            r#"{"type": "integer", "minimum": -99999999999999, "maximum": 5}"#,
            r#"{"enum": [0.5, 1e-14, 0], "description": "from 2024-01-15, v2.0.1"}"#,
            r#"{"exclusiveMinimum": 0.12345678901234, "exclusiveMaximum": 0.12345678901235}"#,
        ] {
            assert!(numbers_fit_guard(fits), "{fits}");
        }
        for not in [
            r#"{"const": 12345678901234567890}"#,
            r#"{"type": "integer", "minimum": 1e20}"#,
            r#"{"type": "number", "exclusiveMinimum": 1e-16}"#,
            r#"{"enum": [0.1234567890123456]}"#,
            r#"{"const": 1e+100}"#,
            r#"{"const": 100000000000000}"#,
            r#"{"exclusiveMinimum": 0.123456789012345, "exclusiveMaximum": 0.123456789012346}"#,
            r#"{"type": "integer", "multipleOf": 3}"#,
        ] {
            assert!(!numbers_fit_guard(not), "{not}");
        }
    }

    proptest::proptest! {
        /// Whatever a client puts in a constraint field, it is read as that
        /// field's constraint or refused with a 400 naming the field.
        #[test]
        fn any_constraint_field_is_read_or_refused_by_name(
            field in proptest::sample::select(tandem_api::GUIDED_FIELDS),
            v in json_doc(),
        ) {
            let extra = json!({ field: v.clone() });
            match requested(extra.as_object().unwrap()) {
                Ok(Some(Grammar::Field(f, _))) => proptest::prop_assert_eq!(f, field),
                Ok(other) => proptest::prop_assert!(v.is_null(), "{:?} for {}", other, v),
                Err(e) => {
                    proptest::prop_assert_eq!(e.status, 400);
                    proptest::prop_assert_eq!(e.param.as_deref(), Some(field));
                }
            }
        }

        /// A `guided_choice` admits each of its options, whatever they
        /// hold, and nothing else.
        #[test]
        fn a_choice_admits_exactly_its_options(
            options in proptest::collection::vec(".{0,12}", 1..4),
            other in ".{0,12}",
        ) {
            let Ok(Grammar::Regex(rx)) = guided("guided_choice", &json!(options)) else {
                panic!("not a regex")
            };
            let re = regex::Regex::new(&format!("^{rx}$")).unwrap();
            for o in &options {
                proptest::prop_assert!(re.is_match(o), "{o:?} by {rx}");
            }
            proptest::prop_assert_eq!(re.is_match(&other), options.contains(&other), "{:?} by {}", other, rx);
        }

        /// Every number the guard lets a model write is a finite double,
        /// exact in its integral part.
        #[test]
        fn a_guarded_number_is_a_finite_double(
            n in proptest::string::string_regex(guarded_number!()).unwrap(),
        ) {
            let v: f64 = n.parse().unwrap();
            proptest::prop_assert!(v.is_finite(), "{n}");
            let int: String = n.split(['.', 'e', 'E']).next().unwrap_or("").into();
            let exact = int.trim_start_matches('-').parse::<u64>().unwrap();
            proptest::prop_assert!(exact < 1 << 53, "{n}");
            proptest::prop_assert!(guard().is_match(&format!("[{n}]")), "{n}");
        }

        /// Any JSON whose numbers fit, compact or pretty, passes the guard;
        /// one number of 16 digits put anywhere in it fails it.
        #[test]
        fn json_passes_the_guard_unless_a_number_is_too_long(
            doc in json_doc(),
            spot in 0usize..64,
        ) {
            let g = guard();
            let compact = doc.to_string();
            let pretty = serde_json::to_string_pretty(&doc).unwrap();
            proptest::prop_assert!(g.is_match(&compact), "{compact}");
            proptest::prop_assert!(g.is_match(&pretty), "{pretty}");
            let mut long = doc.clone();
            let sixteen = json!(1234567890123456u64);
            if !plant(&mut long, &mut spot.clone(), &sixteen) {
                long = json!([long, sixteen]);
            }
            proptest::prop_assert!(!g.is_match(&long.to_string()), "{long}");
        }
    }

    fn json_doc() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|n| json!(n)),
            (-1e9f64..1e9).prop_map(|x| json!((x * 1e4).round() / 1e4)),
            ".*".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Puts `v` in the `spot`-th container of `doc` (depth first); false
    /// if it has fewer.
    fn plant(doc: &mut Value, spot: &mut usize, v: &Value) -> bool {
        let here = *spot == 0;
        *spot = spot.wrapping_sub(1);
        match doc {
            Value::Array(a) if here => a.push(v.clone()),
            Value::Object(m) if here => drop(m.insert("planted".into(), v.clone())),
            Value::Array(a) => return a.iter_mut().any(|d| plant(d, spot, v)),
            Value::Object(m) => return m.values_mut().any(|d| plant(d, spot, v)),
            _ => {
                *spot = spot.wrapping_add(1);
                return false;
            }
        }
        true
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
