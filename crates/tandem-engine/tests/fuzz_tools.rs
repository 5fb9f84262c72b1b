//! Property test over arbitrary Unicode for reading tool calls out of a
//! model's text: the reader is total (no panic), every call it returns names
//! an offered tool with object arguments, and the streamed reading — the text
//! arriving in any chunks — gives the same calls and words as reading the
//! whole answer.
//!
//! CI runs a short form; `PROPTEST_CASES=1000000 cargo test --release -p
//! tandem-engine --test fuzz_tools` is the long run.

use futures::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use tandem_api::{Delta, Event, EventStream, Finish, FinishReason, ToolCall, Usage};
use tandem_engine::tools::{ToolRequest, calls_from, parse};

const FRAGMENTS: &[&str] = &[
    "<tool_call>",
    "</tool_call>",
    "<tool_",
    "[TOOL_CALLS]",
    "<|python_tag|>",
    "```",
    "```json\n",
    "```python\n",
    "\n",
    " ",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}",
    "{\"name\": \"get_time\", \"parameters\": {}}",
    "{\"name\": \"rm_rf\", \"arguments\": {}}",
    "{\"function\": {\"name\": \"get_time\", \"arguments\": \"{\\\"tz\\\": 1}\"}}",
    "{\"name\": \"get_weather\", \"arguments\": \"not json\"}",
    "Sure, let me check.",
    "日本語",
    "🇩🇪",
    "\u{301}",
];

fn tools() -> ToolRequest {
    let extra = json!({"tools": [
        {"type": "function", "function": {"name": "get_weather"}},
        {"type": "function", "function": {"name": "get_time"}},
    ]});
    ToolRequest::from_extra(extra.as_object().expect("object"))
        .expect("valid")
        .expect("tools")
}

fn text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => proptest::sample::select(FRAGMENTS).prop_map(str::to_owned),
        1 => any::<String>(),
    ];
    proptest::collection::vec(piece, 0..10).prop_map(|v| v.concat())
}

/// `text` cut at the given char positions, as a stream of engine events.
fn events(text: &str, cuts: &[usize]) -> EventStream {
    let chars: Vec<char> = text.chars().collect();
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (chars.len() + 1)).collect();
    at.push(0);
    at.push(chars.len());
    at.sort_unstable();
    at.dedup();
    let mut out: Vec<Result<Event, tandem_api::ApiError>> = at
        .windows(2)
        .map(|w| {
            Ok(Event::Delta(Delta::text(
                chars[w[0]..w[1]].iter().collect::<String>(),
            )))
        })
        .collect();
    out.push(Ok(Event::Finish(Finish {
        reason: FinishReason::Stop,
        usage: Usage::new(1, 1),
    })));
    Box::pin(futures::stream::iter(out))
}

proptest! {
    #![proptest_config(ProptestConfig {
        // An explicit count would override PROPTEST_CASES: read it here.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn reading_calls_is_total_and_streaming_agrees(t in text(), cuts in proptest::collection::vec(any::<usize>(), 0..8)) {
        let req = tools();
        let whole = parse(&t, &req);
        for c in &whole.calls {
            prop_assert!(c.name == "get_weather" || c.name == "get_time");
            prop_assert!(serde_json::from_str::<Value>(&c.arguments).is_ok_and(|v| v.is_object()));
        }
        if whole.calls.is_empty() {
            prop_assert_eq!(&whole.content, &t);
        }

        let (content, calls, reason) = futures::executor::block_on(async {
            let mut s = calls_from(events(&t, &cuts), req.clone());
            let mut content = String::new();
            let mut calls: Vec<ToolCall> = Vec::new();
            let mut reason = None;
            while let Some(ev) = s.next().await {
                match ev.expect("no error") {
                    Event::Delta(d) => {
                        content.push_str(&d.text);
                        for p in &d.tool_calls {
                            ToolCall::assemble(&mut calls, p);
                        }
                    }
                    Event::Finish(f) => reason = Some(f.reason),
                }
            }
            (content, calls, reason)
        });
        let names: Vec<&str> = calls.iter().map(|c| c.function.name.as_str()).collect();
        let want: Vec<&str> = whole.calls.iter().map(|c| c.name.as_str()).collect();
        prop_assert_eq!(names, want);
        for (got, want) in calls.iter().zip(&whole.calls) {
            prop_assert_eq!(&got.function.arguments, &want.arguments);
        }
        if whole.calls.is_empty() {
            prop_assert_eq!(content, t);
            prop_assert_eq!(reason, Some(FinishReason::Stop));
        } else {
            prop_assert_eq!(content.trim(), whole.content.trim());
            prop_assert_eq!(reason, Some(FinishReason::ToolCalls));
        }
    }
}
