//! The malformed-request suite: well over a hundred broken requests across
//! every endpoint, each sent over a real socket. Every one gets a 4xx with
//! OpenAI's error JSON (message and type), and a good request right after
//! it is answered: nothing is a 5xx, a panic, a hang or a dropped
//! connection.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tandem_router::Dispatcher;
use tandem_router::access::{KeyConfig, hash_key};
use tandem_server::ServerConfig;
use tandem_testkit::TestServer;
use tandem_testkit::scripted::{Scripted, Step};

const KEY: &str = "tdm_malformed_suite_key";
const ADMIN: &str = "tdm_malformed_suite_admin";

fn dispatcher(keys: Vec<KeyConfig>) -> Arc<Dispatcher> {
    Dispatcher::builder()
        .local_arc(Scripted::local(
            "device",
            vec![Step::Answer(vec!["fine".into()])],
        ))
        .keys(keys)
        .build()
        .expect("dispatcher")
}

fn key(name: &str, raw: &str, admin: bool) -> KeyConfig {
    KeyConfig {
        name: name.into(),
        hash: hash_key(raw),
        privacy: None,
        daily_budget_usd: None,
        rate_limit_per_minute: None,
        admin,
    }
}

fn limits() -> ServerConfig {
    ServerConfig {
        max_body_bytes: 64 * 1024,
        ..ServerConfig::default()
    }
}

struct Case {
    name: String,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
}

fn case(
    name: &str,
    method: &'static str,
    path: &str,
    body: impl Into<Vec<u8>>,
    status: u16,
) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.into(),
        headers: vec![("content-type", "application/json".into())],
        body: body.into(),
        status,
    }
}

fn with_header(mut c: Case, name: &'static str, value: &str) -> Case {
    c.headers.retain(|(n, _)| *n != name);
    c.headers.push((name, value.into()));
    c
}

/// A good chat body with `field` set to `value` (or removed for null).
fn chat_with(field: &str, value: Value) -> Vec<u8> {
    let mut b = json!({"model": "device", "messages": [{"role": "user", "content": "hi"}]});
    if value.is_null() {
        b.as_object_mut().map(|o| o.remove(field));
    } else {
        b[field] = value;
    }
    serde_json::to_vec(&b).unwrap_or_default()
}

fn completion_with(field: &str, value: Value) -> Vec<u8> {
    let mut b = json!({"model": "device", "prompt": "Once"});
    if value.is_null() {
        b.as_object_mut().map(|o| o.remove(field));
    } else {
        b[field] = value;
    }
    serde_json::to_vec(&b).unwrap_or_default()
}

fn open_cases() -> Vec<Case> {
    let chat = "/v1/chat/completions";
    let cmpl = "/v1/completions";
    let mut cases = vec![
        // Bodies that are not JSON objects.
        case("empty body", "POST", chat, "", 400),
        case("whitespace body", "POST", chat, "  \n ", 400),
        case(
            "truncated JSON",
            "POST",
            chat,
            r#"{"model": "device", "messages": ["#,
            400,
        ),
        case(
            "trailing garbage",
            "POST",
            chat,
            format!(
                "{}xyz",
                String::from_utf8_lossy(&chat_with("n", Value::Null))
            ),
            400,
        ),
        case(
            "two JSON documents",
            "POST",
            chat,
            format!(
                "{0}{0}",
                String::from_utf8_lossy(&chat_with("n", Value::Null))
            ),
            400,
        ),
        case("array body", "POST", chat, "[1, 2]", 400),
        case("string body", "POST", chat, r#""hello""#, 400),
        case("number body", "POST", chat, "42", 400),
        case("null body", "POST", chat, "null", 400),
        case(
            "invalid UTF-8",
            "POST",
            chat,
            b"{\"model\":\"device\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"
                .to_vec(),
            400,
        ),
        case(
            "lone surrogate escape",
            "POST",
            chat,
            r#"{"model":"device","messages":[{"role":"user","content":"\ud800"}]}"#,
            400,
        ),
        case(
            "deeply nested",
            "POST",
            chat,
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            400,
        ),
        case(
            "oversized body",
            "POST",
            chat,
            chat_with("stop", json!("x".repeat(70 * 1024))),
            413,
        ),
        case(
            "duplicate keys of the wrong type",
            "POST",
            chat,
            r#"{"model":"device","model":5,"messages":[{"role":"user","content":"hi"}]}"#,
            400,
        ),
        // Missing or wrong top-level fields.
        case(
            "no model",
            "POST",
            chat,
            chat_with("model", Value::Null),
            400,
        ),
        case(
            "model is a number",
            "POST",
            chat,
            chat_with("model", json!(7)),
            400,
        ),
        case(
            "model is empty",
            "POST",
            chat,
            chat_with("model", json!("")),
            400,
        ),
        case(
            "unknown model",
            "POST",
            chat,
            chat_with("model", json!("gpt-17")),
            404,
        ),
        case(
            "no messages",
            "POST",
            chat,
            chat_with("messages", Value::Null),
            400,
        ),
        case(
            "messages empty",
            "POST",
            chat,
            chat_with("messages", json!([])),
            400,
        ),
        case(
            "messages a string",
            "POST",
            chat,
            chat_with("messages", json!("hi")),
            400,
        ),
        case(
            "message not an object",
            "POST",
            chat,
            chat_with("messages", json!(["hi"])),
            400,
        ),
        case(
            "message without role",
            "POST",
            chat,
            chat_with("messages", json!([{"content": "hi"}])),
            400,
        ),
        case(
            "unknown role",
            "POST",
            chat,
            chat_with("messages", json!([{"role": "robot", "content": "hi"}])),
            400,
        ),
        case(
            "role a number",
            "POST",
            chat,
            chat_with("messages", json!([{"role": 1, "content": "hi"}])),
            400,
        ),
        case(
            "content a number",
            "POST",
            chat,
            chat_with("messages", json!([{"role": "user", "content": 5}])),
            400,
        ),
        case(
            "content an object",
            "POST",
            chat,
            chat_with(
                "messages",
                json!([{"role": "user", "content": {"text": "hi"}}]),
            ),
            400,
        ),
        case(
            "content part of unknown type",
            "POST",
            chat,
            chat_with(
                "messages",
                json!([{"role": "user", "content": [{"type": "video", "url": "x"}]}]),
            ),
            400,
        ),
        case(
            "content part without text",
            "POST",
            chat,
            chat_with(
                "messages",
                json!([{"role": "user", "content": [{"type": "text"}]}]),
            ),
            400,
        ),
        case(
            "tool message without tool_call_id",
            "POST",
            chat,
            chat_with("messages", json!([{"role": "tool", "content": "42"}])),
            400,
        ),
        case(
            "tool_calls not a list",
            "POST",
            chat,
            chat_with(
                "messages",
                json!([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": "f"}]),
            ),
            400,
        ),
        // Sampling and limits.
        case(
            "stream not a bool",
            "POST",
            chat,
            chat_with("stream", json!("yes")),
            400,
        ),
        case(
            "stream_options not an object",
            "POST",
            chat,
            chat_with("stream_options", json!(1)),
            400,
        ),
        case(
            "temperature a string",
            "POST",
            chat,
            chat_with("temperature", json!("hot")),
            400,
        ),
        case(
            "temperature negative",
            "POST",
            chat,
            chat_with("temperature", json!(-0.5)),
            400,
        ),
        case(
            "temperature above 2",
            "POST",
            chat,
            chat_with("temperature", json!(2.5)),
            400,
        ),
        case(
            "top_p above 1",
            "POST",
            chat,
            chat_with("top_p", json!(1.5)),
            400,
        ),
        case(
            "top_p negative",
            "POST",
            chat,
            chat_with("top_p", json!(-0.1)),
            400,
        ),
        case(
            "top_k negative",
            "POST",
            chat,
            chat_with("top_k", json!(-3)),
            400,
        ),
        case(
            "top_k a float",
            "POST",
            chat,
            chat_with("top_k", json!(2.5)),
            400,
        ),
        case(
            "min_p above 1",
            "POST",
            chat,
            chat_with("min_p", json!(3)),
            400,
        ),
        case(
            "repeat_penalty negative",
            "POST",
            chat,
            chat_with("repeat_penalty", json!(-1)),
            400,
        ),
        case(
            "presence_penalty above 2",
            "POST",
            chat,
            chat_with("presence_penalty", json!(3)),
            400,
        ),
        case(
            "frequency_penalty below -2",
            "POST",
            chat,
            chat_with("frequency_penalty", json!(-3)),
            400,
        ),
        case(
            "seed a string",
            "POST",
            chat,
            chat_with("seed", json!("abc")),
            400,
        ),
        // Documented 200: OpenAI takes 64-bit seeds; Tandem folds them to 32.
        case(
            "seed past 32 bits",
            "POST",
            chat,
            chat_with("seed", json!(1u64 << 40)),
            200,
        ),
        case(
            "max_tokens negative",
            "POST",
            chat,
            chat_with("max_tokens", json!(-1)),
            400,
        ),
        case(
            "max_tokens zero",
            "POST",
            chat,
            chat_with("max_tokens", json!(0)),
            400,
        ),
        case(
            "max_tokens a string",
            "POST",
            chat,
            chat_with("max_tokens", json!("10")),
            400,
        ),
        case(
            "max_completion_tokens negative",
            "POST",
            chat,
            chat_with("max_completion_tokens", json!(-5)),
            400,
        ),
        case(
            "stop a number",
            "POST",
            chat,
            chat_with("stop", json!(5)),
            400,
        ),
        case(
            "stop with five strings",
            "POST",
            chat,
            chat_with("stop", json!(["a", "b", "c", "d", "e"])),
            400,
        ),
        case(
            "stop with an empty string",
            "POST",
            chat,
            chat_with("stop", json!([""])),
            400,
        ),
        case(
            "logprobs a string",
            "POST",
            chat,
            chat_with("logprobs", json!("yes")),
            400,
        ),
        case(
            "top_logprobs too many",
            "POST",
            chat,
            chat_with("top_logprobs", json!(50)),
            400,
        ),
        case(
            "top_logprobs without logprobs",
            "POST",
            chat,
            chat_with("top_logprobs", json!(3)),
            400,
        ),
        case("n zero", "POST", chat, chat_with("n", json!(0)), 400),
        case("n a string", "POST", chat, chat_with("n", json!("2")), 400),
        case(
            "ignore_eos a string",
            "POST",
            chat,
            chat_with("ignore_eos", json!("no")),
            400,
        ),
        // Features the scripted device does not have.
        case(
            "tools on a model without them",
            "POST",
            chat,
            chat_with(
                "tools",
                json!([{"type": "function", "function": {"name": "f"}}]),
            ),
            400,
        ),
        case(
            "json_schema on a model without it",
            "POST",
            chat,
            chat_with(
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}),
            ),
            400,
        ),
        case(
            "unknown response format",
            "POST",
            chat,
            chat_with("response_format", json!({"type": "yaml"})),
            400,
        ),
        case(
            "logit_bias on a model without it",
            "POST",
            chat,
            chat_with("logit_bias", json!({"1": 5})),
            400,
        ),
        // Completions.
        case("completions: empty body", "POST", cmpl, "", 400),
        case(
            "completions: no prompt",
            "POST",
            cmpl,
            completion_with("prompt", Value::Null),
            400,
        ),
        case(
            "completions: prompt a number",
            "POST",
            cmpl,
            completion_with("prompt", json!(5)),
            400,
        ),
        case(
            "completions: prompt an object",
            "POST",
            cmpl,
            completion_with("prompt", json!({"text": "x"})),
            400,
        ),
        case(
            "completions: empty prompt list",
            "POST",
            cmpl,
            completion_with("prompt", json!([])),
            400,
        ),
        case(
            "completions: several prompts",
            "POST",
            cmpl,
            completion_with("prompt", json!(["a", "b"])),
            400,
        ),
        case(
            "completions: echo",
            "POST",
            cmpl,
            completion_with("echo", json!(true)),
            400,
        ),
        case(
            "completions: best_of",
            "POST",
            cmpl,
            completion_with("best_of", json!(3)),
            400,
        ),
        case(
            "completions: suffix",
            "POST",
            cmpl,
            completion_with("suffix", json!("end")),
            400,
        ),
        case(
            "completions: logprobs too many",
            "POST",
            cmpl,
            completion_with("logprobs", json!(50)),
            400,
        ),
        case(
            "completions: temperature a string",
            "POST",
            cmpl,
            completion_with("temperature", json!("warm")),
            400,
        ),
        case(
            "completions: max_tokens negative",
            "POST",
            cmpl,
            completion_with("max_tokens", json!(-2)),
            400,
        ),
        case(
            "completions: unknown model",
            "POST",
            cmpl,
            completion_with("model", json!("nope")),
            404,
        ),
        case(
            "completions: trailing garbage",
            "POST",
            cmpl,
            format!(
                "{} }}",
                String::from_utf8_lossy(&completion_with("n", Value::Null))
            ),
            400,
        ),
        // Embeddings (no embedder on this server).
        case("embeddings: empty body", "POST", "/v1/embeddings", "", 400),
        case(
            "embeddings: no model",
            "POST",
            "/v1/embeddings",
            r#"{"input": "x"}"#,
            400,
        ),
        case(
            "embeddings: input a number",
            "POST",
            "/v1/embeddings",
            r#"{"model": "m", "input": 5}"#,
            400,
        ),
        case(
            "embeddings: no embedder",
            "POST",
            "/v1/embeddings",
            r#"{"model": "m", "input": "x"}"#,
            404,
        ),
        // Tandem's own routes.
        case("route: empty body", "POST", "/v1/tandem/route", "", 400),
        case(
            "route: not a request",
            "POST",
            "/v1/tandem/route",
            r#"{"hello": 1}"#,
            400,
        ),
        case(
            "route: bad messages",
            "POST",
            "/v1/tandem/route",
            chat_with("messages", json!(7)),
            400,
        ),
        case(
            "signals: not an object",
            "PUT",
            "/v1/tandem/signals",
            "[1]",
            400,
        ),
        case(
            "signals: battery a string",
            "PUT",
            "/v1/tandem/signals",
            r#"{"battery_pct": "full"}"#,
            400,
        ),
        case(
            "signals: unknown field",
            "PUT",
            "/v1/tandem/signals",
            r#"{"warp_drive": true}"#,
            400,
        ),
        case(
            "signals: trailing garbage",
            "PUT",
            "/v1/tandem/signals",
            r#"{} {}"#,
            400,
        ),
        case("cache: off", "GET", "/v1/tandem/cache", "", 404),
        case(
            "cache: clear when off",
            "DELETE",
            "/v1/tandem/cache",
            "",
            404,
        ),
        case(
            "spec: empty body",
            "POST",
            "/v1/tandem/spec/sessions",
            "",
            400,
        ),
        case(
            "spec: missing fields",
            "POST",
            "/v1/tandem/spec/sessions",
            r#"{"model": "device"}"#,
            400,
        ),
        case(
            "spec: verify an unknown session",
            "POST",
            "/v1/tandem/spec/sessions/spec-nope/verify",
            r#"{"tokens": [1], "draft": []}"#,
            400,
        ),
        case(
            "spec: close an unknown session",
            "DELETE",
            "/v1/tandem/spec/sessions/spec-nope",
            "",
            404,
        ),
        case("models: unknown id", "GET", "/v1/models/gpt-17", "", 404),
        // Routes and methods.
        case("unknown route", "POST", "/v1/nothing", "{}", 404),
        case(
            "unknown route under v1/tandem",
            "GET",
            "/v1/tandem/secrets",
            "",
            404,
        ),
        case("path traversal", "GET", "/v1/../../etc/passwd", "", 404),
        case("GET on chat", "GET", chat, "", 405),
        case("PUT on chat", "PUT", chat, "{}", 405),
        case("DELETE on completions", "DELETE", cmpl, "", 405),
        case("POST on models", "POST", "/v1/models", "{}", 405),
        case("POST on healthz", "POST", "/healthz", "{}", 405),
        case("PATCH on signals", "PATCH", "/v1/tandem/signals", "{}", 405),
        // Tandem's headers, read strictly.
        with_header(
            case(
                "privacy header unknown",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-privacy",
            "loose",
        ),
        with_header(
            case(
                "latency goal not a number",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-latency-goal-ms",
            "soon",
        ),
        with_header(
            case(
                "latency goal negative",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-latency-goal-ms",
            "-5",
        ),
        with_header(
            case(
                "quality above 1",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-quality",
            "1.5",
        ),
        with_header(
            case(
                "quality not a number",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-quality",
            "high",
        ),
        with_header(
            case(
                "cache header unknown",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-cache",
            "maybe",
        ),
        with_header(
            case(
                "mode header unknown",
                "POST",
                chat,
                chat_with("n", Value::Null),
                400,
            ),
            "x-tandem-mode",
            "teleport",
        ),
        // What only a web page sends to an open server.
        with_header(
            case(
                "text/plain body",
                "POST",
                chat,
                chat_with("n", Value::Null),
                415,
            ),
            "content-type",
            "text/plain",
        ),
        with_header(
            case("form body", "POST", chat, chat_with("n", Value::Null), 415),
            "content-type",
            "application/x-www-form-urlencoded",
        ),
        with_header(
            case(
                "multipart body",
                "POST",
                chat,
                chat_with("n", Value::Null),
                415,
            ),
            "content-type",
            "multipart/form-data; boundary=x",
        ),
        with_header(
            case(
                "foreign origin",
                "POST",
                chat,
                chat_with("n", Value::Null),
                403,
            ),
            "origin",
            "https://evil.example",
        ),
        with_header(
            case(
                "null origin",
                "POST",
                chat,
                chat_with("n", Value::Null),
                403,
            ),
            "origin",
            "null",
        ),
        with_header(
            case(
                "rebound host",
                "POST",
                chat,
                chat_with("n", Value::Null),
                403,
            ),
            "host",
            "attacker.example",
        ),
        with_header(
            case("rebound host on healthz", "GET", "/healthz", "", 403),
            "host",
            "attacker.example:8080",
        ),
    ];
    // Every field of a message, of the wrong type.
    for field in ["name", "tool_call_id", "refusal"] {
        cases.push(case(
            &format!("message {field} an array"),
            "POST",
            chat,
            chat_with(
                "messages",
                json!([{"role": "user", "content": "hi", field: [1, 2]}]),
            ),
            400,
        ));
    }
    cases
}

fn keyed_cases() -> Vec<Case> {
    let chat = "/v1/chat/completions";
    let good = chat_with("n", Value::Null);
    vec![
        case("no key", "POST", chat, good.clone(), 401),
        with_header(
            case("wrong key", "POST", chat, good.clone(), 401),
            "authorization",
            "Bearer tdm_wrong",
        ),
        with_header(
            case("basic auth", "POST", chat, good.clone(), 401),
            "authorization",
            &format!("Basic {KEY}"),
        ),
        with_header(
            case("empty bearer", "POST", chat, good.clone(), 401),
            "authorization",
            "Bearer ",
        ),
        with_header(
            case("no scheme", "POST", chat, good.clone(), 401),
            "authorization",
            KEY,
        ),
        with_header(
            case("no key on models", "GET", "/v1/models", "", 401),
            "x-nothing",
            "",
        ),
        with_header(
            case("no key on metrics", "GET", "/metrics", "", 401),
            "x-nothing",
            "",
        ),
        with_header(
            case(
                "no key on route",
                "POST",
                "/v1/tandem/route",
                good.clone(),
                401,
            ),
            "x-nothing",
            "",
        ),
        with_header(
            case("no key on signals", "GET", "/v1/tandem/signals", "", 401),
            "x-nothing",
            "",
        ),
        with_header(
            case(
                "signals set without admin",
                "PUT",
                "/v1/tandem/signals",
                r#"{"battery_pct": 5}"#,
                403,
            ),
            "authorization",
            &format!("Bearer {KEY}"),
        ),
        with_header(
            case(
                "signals cleared without admin",
                "DELETE",
                "/v1/tandem/signals",
                "",
                403,
            ),
            "authorization",
            &format!("Bearer {KEY}"),
        ),
        with_header(
            case("bad body with a good key", "POST", chat, "{", 400),
            "authorization",
            &format!("bearer {KEY}"),
        ),
    ]
}

async fn run(s: &TestServer, cases: Vec<Case>, good_auth: Option<&str>) -> usize {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let good = || {
        let mut r = client
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "device", "messages": [{"role": "user", "content": "hi"}]}));
        if let Some(k) = good_auth {
            r = r.bearer_auth(k);
        }
        r
    };
    let mut failures = Vec::new();
    let n = cases.len();
    for c in cases {
        let mut r = client.request(c.method.parse().expect("method"), s.url(&c.path));
        for (k, v) in &c.headers {
            r = r.header(*k, v);
        }
        let r = r.body(c.body.clone()).send().await;
        let Ok(r) = r else {
            failures.push(format!("{}: no answer: {:?}", c.name, r.err()));
            continue;
        };
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        let error_shape = !message.is_empty() && body["error"]["type"].is_string();
        if status != c.status || (status != 200 && !error_shape) {
            failures.push(format!(
                "{}: expected {}, got {status} {body}",
                c.name, c.status
            ));
        }
        match good().send().await {
            Ok(r) if r.status() == 200 => {}
            other => failures.push(format!(
                "{}: the next good request failed: {:?}",
                c.name,
                other.map(|r| r.status())
            )),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    n
}

#[tokio::test]
async fn every_malformed_request_gets_a_clear_4xx_and_the_server_keeps_serving() {
    let open = TestServer::start_with(dispatcher(Vec::new()), limits()).await;
    let keyed = TestServer::start_with(
        dispatcher(vec![key("app", KEY, false), key("ops", ADMIN, true)]),
        limits(),
    )
    .await;
    let n = run(&open, open_cases(), None).await + run(&keyed, keyed_cases(), Some(KEY)).await;
    assert!(n >= 100, "the suite has {n} cases");
}
