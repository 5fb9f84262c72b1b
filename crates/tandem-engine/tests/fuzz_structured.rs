//! Property test of constrained decoding on a real model: arbitrary JSON
//! schemas of the kinds applications send (objects with optional and
//! required fields, keys in any script or with quotes, enums and consts of
//! mixed types, bounded numbers, strings with lengths or patterns, arrays
//! with bounds, nullable fields, formats, `multipleOf`, nesting, `anyOf`,
//! `oneOf`, `allOf`, `uniqueItems`, Pydantic's `$defs` and `$ref` and its
//! tagged unions, titles
//! and defaults), each asked of the
//! device model (SmolLM2) with `response_format: json_schema`. Every
//! answer that ends on its own parses and validates against the schema
//! with the `jsonschema` crate (independent of the grammar), and its
//! numbers are finite doubles of at most 15 digits a part unless the schema
//! names a longer one or a `multipleOf`; a schema the
//! grammar cannot enforce is a 400 naming `response_format`, never an
//! unconstrained answer; nothing panics or hangs.
//!
//! CI runs a short form; `PROPTEST_CASES=300 cargo test -p tandem-engine
//! --test fuzz_structured` is the long run.

use std::sync::OnceLock;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tandem_api::{Answer, FinishReason, GenerateRequest, Input, Message, Sampling};
use tandem_engine::LocalEngine;
use tandem_testkit::SMOLLM2;

fn engine() -> &'static LocalEngine {
    static E: OnceLock<LocalEngine> = OnceLock::new();
    E.get_or_init(|| tandem_testkit::shared_engine(SMOLLM2, 2048, 1))
}

/// Property names, some that need escaping or are not ASCII.
const KEYS: &[&str] = &[
    "name",
    "age",
    "items",
    "city",
    "ok",
    "with space",
    "quote\"d",
    "back\\slash",
    "ключ",
    "名前",
    "emoji🙂",
    "",
];

/// A number of 16 digits, which the number guard would never let a model
/// write.
const BIG: &str = "1234567890123456";

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"type": "string"})),
        (0u64..4, 1u64..12)
            .prop_map(|(lo, n)| json!({"type": "string", "minLength": lo, "maxLength": lo + n})),
        Just(json!({"type": "string", "pattern": "^[a-z]{2,6}$"})),
        Just(json!({"type": "string", "enum": ["red", "green", "blue \"dark\"", "ünïcode"]})),
        (-50i64..50, 0i64..100)
            .prop_map(|(lo, n)| json!({"type": "integer", "minimum": lo, "maximum": lo + n})),
        Just(json!({"type": "integer"})),
        Just(json!({"type": "number"})),
        (-10i64..10)
            .prop_map(|lo| json!({"type": "number", "minimum": lo, "exclusiveMaximum": lo + 5})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "null"})),
        Just(json!({"const": "fixed"})),
        Just(json!({"enum": [1, "one", true, null]})),
        // Longer than a guarded number: such a schema goes unguarded.
        Just(json!({"enum": [BIG.parse::<u64>().unwrap_or(0), 0.5]})),
        // Within the guard, but only just: 14 digits, and numbers that
        // need 15 decimals.
        Just(
            json!({"type": "integer", "minimum": 10_000_000_000_000u64, "maximum": 99_999_999_999_999u64})
        ),
        Just(
            json!({"type": "number", "exclusiveMinimum": 0.12345678901234, "exclusiveMaximum": 0.12345678901235})
        ),
        Just(json!({"type": ["string", "null"], "maxLength": 8})),
        Just(json!({"type": "string", "format": "date-time"})),
        Just(json!({"type": "string", "format": "date"})),
        Just(json!({"type": "string", "format": "email"})),
        Just(json!({"type": "string", "format": "hostname"})),
        Just(json!({"type": "string", "format": "uuid"})),
        Just(json!({"type": "integer", "multipleOf": 3})),
        Just(json!({"type": "number", "multipleOf": 0.5})),
        Just(
            json!({"type": "string", "title": "Label", "description": "A short label", "default": "x"})
        ),
    ]
}

fn schema() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            (
                proptest::collection::btree_map(proptest::sample::select(KEYS), inner.clone(), 1..4),
                any::<u8>(),
                any::<bool>(),
            )
                .prop_map(|(props, mask, closed)| {
                    let required: Vec<&str> = props
                        .keys()
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << i) != 0)
                        .map(|(_, k)| *k)
                        .collect();
                    let mut o = json!({
                        "type": "object",
                        "properties": props.into_iter().map(|(k, v)| (k.to_owned(), v)).collect::<Map<String, Value>>(),
                        "required": required,
                    });
                    if closed {
                        o["additionalProperties"] = json!(false);
                    }
                    o
                }),
            (inner.clone(), 0u64..3, 1u64..4).prop_map(|(items, lo, n)| {
                json!({"type": "array", "items": items, "minItems": lo, "maxItems": lo + n})
            }),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| json!({"anyOf": [a, b]})),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| json!({"oneOf": [a, b]})),
            inner.clone().prop_map(|a| json!({"allOf": [a]})),
            (inner, any::<bool>()).prop_map(|(items, unique)| {
                json!({"type": "array", "items": items, "uniqueItems": unique, "maxItems": 3})
            }),
        ]
    })
}

/// A schema as applications send it: bare, or in Pydantic's shape, a
/// model that the root refers to by `$ref` from its `$defs`.
fn document() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => schema(),
        1 => schema().prop_map(|t| json!({
            "$defs": {"Item": t},
            "type": "object",
            "properties": {
                "item": {"$ref": "#/$defs/Item"},
                "more": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "maxItems": 2},
            },
            "required": ["item"],
        })),
        // Pydantic's tagged union: `oneOf` over `$ref`s that a required
        // constant tells apart, which the device must enforce.
        1 => (schema(), schema(), any::<bool>()).prop_map(|(a, b, closed)| {
            let model = |tag: &str, field: &str, v: Value| {
                let mut m = json!({"type": "object", "title": tag,
                    "properties": {"kind": {"const": tag, "type": "string"}, field: v},
                    "required": ["kind", field]});
                if closed {
                    m["additionalProperties"] = json!(false);
                }
                m
            };
            json!({
                "$defs": {"A": model("a", "left", a), "B": model("b", "right", b)},
                "type": "object",
                "properties": {"pick": {
                    "oneOf": [{"$ref": "#/$defs/A"}, {"$ref": "#/$defs/B"}],
                    "discriminator": {"propertyName": "kind",
                        "mapping": {"a": "#/$defs/A", "b": "#/$defs/B"}}}},
                "required": ["pick"],
                "additionalProperties": !closed,
            })
        }),
    ]
}

fn request(prompt: &str, schema: &Value, max_tokens: u32) -> GenerateRequest {
    let extra = json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "out", "strict": true, "schema": schema}}});
    GenerateRequest {
        choices: 1,
        model: SMOLLM2.into(),
        input: Input::Chat {
            messages: vec![Message::new("user", prompt)],
            continue_from: None,
        },
        sampling: Sampling::greedy(),
        max_tokens: Some(max_tokens),
        stop: vec![],
        logprobs: None,
        stream: false,
        include_usage: false,
        extra: extra.as_object().cloned().unwrap_or_default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: tandem_testkit::proptest_cases(16),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_answer_that_ends_matches_its_schema(
        schema in document(),
        prompt in proptest::sample::select(&[
            "Describe a person as JSON.",
            "Write a haiku about the sea.",
            "Give me the data.",
            "Réponds en JSON, s'il te plaît. 日本語で。",
        ][..]),
        max_tokens in proptest::sample::select(&[48u32, 160][..]),
    ) {
        let req = request(prompt, &schema, max_tokens);
        let submitted = engine().submit(req);
        let stream = match submitted {
            Ok(s) => s,
            Err(e) => {
                // Refused by name, as a client error.
                prop_assert_eq!(e.status, 400, "{}", e.message);
                prop_assert_eq!(e.param.as_deref(), Some("response_format"), "{}", e.message);
                // What is refused is a set or a `oneOf` that is not a
                // tagged union; a tagged union alone is enforced.
                let text = schema.to_string();
                let tagged = schema.pointer("/properties/pick/discriminator").is_some();
                prop_assert!(
                    !tagged || text.matches("\"oneOf\"").count() > 1
                        || text.contains("\"uniqueItems\":true"),
                    "a tagged union refused: {} for {}", e.message, schema
                );
                return Ok(());
            }
        };
        let a = tandem_testkit::shared_runtime()
            .block_on(Answer::collect(stream))
            .map_err(|e| TestCaseError::fail(format!("{}: {schema}", e.message)))?;
        if a.finish.reason == FinishReason::Length {
            // Cut by max_tokens: a prefix of a valid answer, nothing more to check.
            return Ok(());
        }
        prop_assert_eq!(a.finish.reason, FinishReason::Stop);
        let v: Value = serde_json::from_str(&a.text)
            .map_err(|e| TestCaseError::fail(format!("{e}: {:?} for {schema}", a.text)))?;
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .map_err(|e| TestCaseError::fail(format!("a bad schema {schema}: {e}")))?;
        let errors: Vec<String> = validator
            .iter_errors(&v)
            .map(|e| e.to_string())
            .collect();
        prop_assert!(errors.is_empty(), "{v} against {schema}: {errors:?}");
        // Numbers are guarded unless the schema names a longer one or a
        // `multipleOf`.
        let text = schema.to_string();
        if !text.contains(BIG) && !text.contains("multipleOf") {
            let over = tandem_testkit::oversized_numbers(&a.text);
            prop_assert!(over.is_empty(), "{over:?} in {} for {schema}", a.text);
        }
    }
}
