//! Tool calls through the gateway: an upstream that answers with
//! `tool_calls` (whole, and streamed in pieces, leaving out bookkeeping
//! fields) reaches the client as OpenAI sends it; in redact mode the
//! arguments come back with the originals. A schema the device's grammar
//! cannot enforce goes to the cloud (or is refused by name), never answered
//! unconstrained.

use serde_json::{Value, json};
use tandem_api::ToolCall;
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_router::Dispatcher;
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::scripted::{Scripted, Step};
use tandem_testkit::{TestServer, post_json};

async fn setup() -> (TestServer, CaptureUpstream) {
    let capture = CaptureUpstream::start(None, Mode::EchoTool).await;
    let d = Dispatcher::builder()
        .local_arc(Scripted::local(
            "device",
            vec![Step::Answer(vec!["local".into()])],
        ))
        .cloud(
            CloudBackend::new(UpstreamConfig::new("cloud", &capture.base_url(), &["big"]))
                .expect("upstream"),
        )
        .build()
        .expect("dispatcher");
    (TestServer::start(d).await, capture)
}

const ASK: &str = "Find the account of jane.doe@example.com, she wrote \"urgent\".";

fn body(stream: bool) -> Value {
    json!({
        "model": "tandem/auto",
        "stream": stream,
        "messages": [{"role": "user", "content": ASK}],
        "tools": [{"type": "function", "function": {"name": "lookup",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}],
    })
}

/// The tool calls of a streamed answer, put together as a client does.
async fn streamed_calls(url: &str, privacy: &str) -> (Vec<ToolCall>, String, Vec<Value>) {
    let raw = reqwest::Client::new()
        .post(url)
        .header("x-tandem-privacy", privacy)
        .json(&body(true))
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("body");
    let chunks: Vec<Value> = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let mut calls = Vec::new();
    let mut finish = String::new();
    for c in &chunks {
        if let Some(pieces) = c["choices"][0]["delta"]["tool_calls"].as_array() {
            for p in pieces {
                let p = serde_json::from_value(p.clone()).expect("an OpenAI tool-call delta");
                ToolCall::assemble(&mut calls, &p);
            }
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (calls, finish, chunks)
}

fn arguments_text(call: &ToolCall) -> String {
    let args: Value = serde_json::from_str(&call.function.arguments).expect("arguments are JSON");
    args["text"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn tool_calls_from_the_cloud_reach_the_client_whole_and_streamed() {
    let (device, _capture) = setup().await;
    let url = device.url("/v1/chat/completions");

    let r = post_json(&url, &body(false), &[("x-tandem-privacy", "off")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.header("x-tandem-backend").starts_with("cloud"));
    let choice = &r.body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null(), "{choice}");
    let calls: Vec<ToolCall> =
        serde_json::from_value(choice["message"]["tool_calls"].clone()).expect("tool_calls");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].id, "call_1");
    assert_eq!(calls[0].kind, "function");
    assert_eq!(calls[0].function.name, "lookup");
    assert_eq!(arguments_text(&calls[0]), ASK);
    // Fields Tandem does not interpret pass through; a null says nothing.
    assert_eq!(
        choice["message"]["reasoning_content"],
        format!("Looking up: {ASK}")
    );
    assert!(choice["message"].get("refusal").is_none(), "{choice}");
    // So do the answer's own (`system_fingerprint`, `service_tier`).
    assert_eq!(r.body["system_fingerprint"], "fp_echo", "{:?}", r.body);
    assert_eq!(r.body["service_tier"], "default");

    let (calls, finish, chunks) = streamed_calls(&url, "off").await;
    assert_eq!(finish, "tool_calls");
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(calls[0].id, "call_1");
    assert_eq!(calls[0].function.name, "lookup");
    assert_eq!(arguments_text(&calls[0]), ASK);
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, format!("Looking up: {ASK}"), "{chunks:?}");
    // The fingerprint is on every chunk from the first the upstream sent.
    let from = chunks
        .iter()
        .position(|c| c["system_fingerprint"] == "fp_echo")
        .expect("a chunk with the fingerprint");
    assert!(from <= 1, "{chunks:?}");
    assert!(
        chunks[from..]
            .iter()
            .all(|c| c["system_fingerprint"] == "fp_echo"),
        "{chunks:?}"
    );
    // Every chunk is a complete OpenAI chunk, whatever the upstream left out.
    for c in &chunks {
        assert!(c["id"].as_str().is_some_and(|id| !id.is_empty()), "{c}");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(c["created"].as_u64().is_some_and(|t| t > 0));
    }
}

#[tokio::test]
async fn redacted_tool_call_arguments_come_back_with_the_originals() {
    let (device, capture) = setup().await;
    let url = device.url("/v1/chat/completions");

    let r = post_json(&url, &body(false), &[("x-tandem-privacy", "redact")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let calls: Vec<ToolCall> =
        serde_json::from_value(r.body["choices"][0]["message"]["tool_calls"].clone())
            .expect("tool_calls");
    assert_eq!(arguments_text(&calls[0]), ASK);

    // So does the reasoning beside the call, and a structured field's text.
    assert_eq!(
        r.body["choices"][0]["message"]["reasoning_content"],
        format!("Looking up: {ASK}")
    );
    assert_eq!(
        r.body["choices"][0]["message"]["annotations"][0]["url_citation"]["title"],
        format!("About {ASK}")
    );

    let (calls, _, chunks) = streamed_calls(&url, "redact").await;
    assert_eq!(calls.len(), 1, "{chunks:?}");
    assert_eq!(arguments_text(&calls[0]), ASK);
    let reasoning: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    assert_eq!(reasoning, format!("Looking up: {ASK}"), "{chunks:?}");
    let titles: Vec<&str> = chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["annotations"][0]["url_citation"]["title"].as_str()
        })
        .collect();
    assert_eq!(titles, vec![format!("About {ASK}")], "{chunks:?}");

    // What left had a placeholder, never the address.
    let sent: String = capture
        .captured()
        .iter()
        .map(|c| c.json().to_string())
        .collect();
    assert!(sent.contains("[EMAIL_1]"), "{sent}");
    assert!(!sent.contains("jane.doe@example.com"));
}

#[tokio::test]
async fn several_choices_from_the_cloud_each_carry_the_call() {
    let (device, capture) = setup().await;
    let mut b = body(false);
    b["n"] = json!(2);
    let r = post_json(
        &device.url("/v1/chat/completions"),
        &b,
        &[("x-tandem-privacy", "off")],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let choices = r.body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{:?}", r.body);
    for (c, i) in choices.iter().zip(0..) {
        assert_eq!(c["index"], i);
        assert_eq!(c["finish_reason"], "tool_calls");
        let calls: Vec<ToolCall> =
            serde_json::from_value(c["message"]["tool_calls"].clone()).expect("tool_calls");
        assert_eq!(arguments_text(&calls[0]), ASK);
    }
    // The upstream ignores `n` (it answers one choice): the missing choice
    // is asked of it on its own, and from then on every choice is.
    let sent = capture.captured();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].json()["n"], 2);
    assert!(sent[1].json().get("n").is_none(), "{}", sent[1].json());
    assert!(sent.iter().all(|c| c.json()["model"] == "big"));
    let again = post_json(
        &device.url("/v1/chat/completions"),
        &b,
        &[("x-tandem-privacy", "off")],
    )
    .await;
    assert_eq!(again.body["choices"].as_array().map(Vec::len), Some(2));
    let sent = capture.captured();
    assert_eq!(sent.len(), 4);
    assert!(sent[2..].iter().all(|c| c.json().get("n").is_none()));
}

/// Pydantic writes `uniqueItems: true` for a set, which the device's
/// grammar cannot enforce: `tandem/auto` sends such a request to the cloud
/// and says why; `uniqueItems: false` (a list) constrains nothing and stays
/// on the device; naming the device's model, or with no cloud configured,
/// the request gets the model's own 400.
#[tokio::test]
async fn a_schema_the_device_cannot_enforce_goes_to_the_cloud() {
    use tandem_testkit::{SMOLLM2, shared_engine};
    let capture = CaptureUpstream::start(None, Mode::Echo).await;
    let d = Dispatcher::builder()
        .local(shared_engine(SMOLLM2, 1024, 2))
        .cloud(
            CloudBackend::new(UpstreamConfig::new("cloud", &capture.base_url(), &["big"]))
                .expect("upstream"),
        )
        .build()
        .expect("dispatcher");
    let server = TestServer::start(d).await;
    let ask = |model: &str, unique: bool| {
        json!({
            "model": model,
            "max_tokens": 48,
            "temperature": 0,
            "messages": [{"role": "user", "content": "Name three tags for a photo of the sea."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "tags", "strict": true,
                "schema": {"type": "object", "properties": {"tags": {"type": "array",
                    "items": {"type": "string", "maxLength": 12}, "maxItems": 3, "uniqueItems": unique}},
                    "required": ["tags"], "additionalProperties": false}}},
        })
    };
    let url = server.url("/v1/chat/completions");

    let set = post_json(&url, &ask("tandem/auto", true), &[]).await;
    assert_eq!(set.status, 200, "{}", set.body);
    assert_eq!(set.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(set.header("x-tandem-decided-by"), "only_option");
    let reasons = set.header("x-tandem-reasons");
    assert!(reasons.contains("uniqueItems"), "{reasons}");
    assert_eq!(capture.captured().len(), 1);

    let list = post_json(&url, &ask("tandem/auto", false), &[]).await;
    assert_eq!(list.status, 200, "{}", list.body);
    assert_eq!(list.header("x-tandem-backend"), "local");
    let text = list.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    if list.body["choices"][0]["finish_reason"] == "stop" {
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(v["tags"].as_array().is_some_and(|t| t.len() <= 3), "{v}");
    }
    assert_eq!(capture.captured().len(), 1, "the list stayed on the device");

    // Naming the device's model, or with no cloud to turn to, the
    // device's own 400 names the keyword.
    let device_only = TestServer::start(
        Dispatcher::builder()
            .local(shared_engine(SMOLLM2, 1024, 2))
            .build()
            .expect("dispatcher"),
    )
    .await;
    for (url, model) in [
        (url.clone(), SMOLLM2),
        (device_only.url("/v1/chat/completions"), "tandem/auto"),
    ] {
        let refused = post_json(&url, &ask(model, true), &[]).await;
        assert_eq!(refused.status, 400, "{}", refused.body);
        assert_eq!(refused.body["error"]["param"], "response_format");
        assert!(
            refused.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("uniqueItems")),
            "{}",
            refused.body
        );
    }
}
