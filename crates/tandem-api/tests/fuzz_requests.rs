//! Property test of reading request bodies: JSON shaped like OpenAI's
//! requests (every field, with values of every type, nested), then bytes
//! flipped, inserted and removed, read as a chat, completion, embeddings and
//! speculative request and checked into Tandem's own request. Reading is
//! total: an error, never a panic.
//!
//! CI runs a short form; `PROPTEST_CASES=10000000 cargo test --release -p
//! tandem-api --test fuzz_requests` is the long run.

use proptest::prelude::*;
use serde_json::{Map, Value};
use tandem_api::EmbeddingRequest;
use tandem_api::openai::{ChatCompletionRequest, CompletionRequest};
use tandem_api::speculative::{SpecOpen, VerifyRequest};

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "role",
    "content",
    "name",
    "tool_calls",
    "tool_call_id",
    "type",
    "text",
    "image_url",
    "function",
    "arguments",
    "stream",
    "stream_options",
    "include_usage",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repeat_penalty",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
    "n",
    "ignore_eos",
    "tools",
    "tool_choice",
    "response_format",
    "json_schema",
    "schema",
    "logit_bias",
    "prompt",
    "echo",
    "best_of",
    "suffix",
    "input",
    "dimensions",
    "encoding_format",
    "tokens",
    "draft",
    "vocab_hash",
    "sampling",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop_oneof![
            Just("user".to_owned()),
            Just("assistant".to_owned()),
            Just("tool".to_owned()),
            Just("text".to_owned()),
            Just("json_schema".to_owned()),
            any::<String>(),
        ]
        .prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(FIELDS), inner), 0..8).prop_map(
                |kv| Value::Object(
                    kv.into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<Map<_, _>>()
                )
            ),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::collection::vec((proptest::sample::select(FIELDS), value()), 0..10),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..3),
    )
        .prop_map(|(fields, edits)| {
            let obj: Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let mut bytes = serde_json::to_vec(&Value::Object(obj)).unwrap_or_default();
            for (at, b, op) in edits {
                let n = bytes.len();
                match op {
                    0 if n > 0 => bytes[at % n] = b,
                    1 => bytes.insert(at % (n + 1), b),
                    _ if n > 0 => {
                        bytes.remove(at % n);
                    }
                    _ => {}
                }
            }
            bytes
        })
}

fn cases() -> u32 {
    // An explicit count would override PROPTEST_CASES: read it here.
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn reading_requests_is_total(bytes in body()) {
        if let Ok(r) = serde_json::from_slice::<ChatCompletionRequest>(&bytes) {
            let _ = r.into_generate();
        }
        if let Ok(r) = serde_json::from_slice::<CompletionRequest>(&bytes) {
            let _ = r.into_generate();
        }
        if let Ok(r) = serde_json::from_slice::<EmbeddingRequest>(&bytes) {
            let _ = r.into_job(384);
        }
        let _ = serde_json::from_slice::<SpecOpen>(&bytes);
        let _ = serde_json::from_slice::<VerifyRequest>(&bytes);
    }
}
