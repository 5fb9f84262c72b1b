//! Hybrid serving with real servers on loopback: a device Tandem (SmolLM2),
//! a cloud-role Tandem (Qwen2.5 0.5B), and between them a capturing
//! upstream that records every byte leaving the device and injects faults.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tandem_backends::{Choices, CloudBackend, Continuation, UpstreamConfig};
use tandem_engine::{EngineConfig, LocalEngine, Threads};
use tandem_ledger::Ledger;
use tandem_policy::{PolicyConfig, PrivacyMode, Rule};
use tandem_router::Dispatcher;
use tandem_router::access::{KeyConfig, hash_key};
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::{QWEN_05B, Reply, SMOLLM2, TestServer, model_path, post_json, shared_engine};

fn ledger_key() -> tandem_ledger::LedgerKey {
    tandem_ledger::LedgerKey::from_secret([3; 32])
}

fn device_engine() -> LocalEngine {
    shared_engine(SMOLLM2, 1024, 4)
}

fn cloud_engine() -> LocalEngine {
    shared_engine(QWEN_05B, 2048, 4)
}

/// Cloud first, so that only the rule under test keeps a request home.
fn cloud_first() -> PolicyConfig {
    let mut p = PolicyConfig::default();
    p.rules.retain(|r| *r != Rule::PreferLocal);
    p.rules.push(Rule::PreferCloud);
    p
}

fn upstream(base_url: &str) -> UpstreamConfig {
    let mut u = UpstreamConfig::new("cloud", base_url, &[QWEN_05B]);
    u.price_input_per_mtok = 1.0;
    u.price_output_per_mtok = 2.0;
    u.continuation = Continuation::Prefill;
    u.ttft_timeout_ms = 60_000;
    u.breaker_cooldown_ms = 60_000;
    u
}

struct Hybrid {
    device: TestServer,
    capture: CaptureUpstream,
    dispatcher: Arc<Dispatcher>,
    ledger: std::path::PathBuf,
    _cloud: TestServer,
    _dir: tempfile::TempDir,
}

struct Setup {
    mode: Mode,
    policy: PolicyConfig,
    upstream: Box<dyn FnOnce(&mut UpstreamConfig)>,
    keys: Vec<KeyConfig>,
    local: LocalEngine,
    api_key: Option<String>,
}

impl Setup {
    fn new(mode: Mode) -> Self {
        Self {
            mode,
            policy: cloud_first(),
            upstream: Box::new(|_| {}),
            keys: vec![],
            local: device_engine(),
            api_key: None,
        }
    }

    async fn start(self) -> Hybrid {
        let cloud =
            TestServer::start(Dispatcher::builder().local(cloud_engine()).build().unwrap()).await;
        let capture = CaptureUpstream::start(Some(cloud.url("/v1")), self.mode).await;
        let mut u = upstream(&capture.base_url());
        (self.upstream)(&mut u);
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.jsonl");
        let dispatcher = Dispatcher::builder()
            .local(self.local)
            .cloud(CloudBackend::with_api_key(u, self.api_key).unwrap())
            .policy(self.policy)
            .keys(self.keys)
            .ledger(Ledger::open(&ledger, ledger_key()).unwrap())
            .build()
            .unwrap();
        let device = TestServer::start(dispatcher.clone()).await;
        Hybrid {
            device,
            capture,
            dispatcher,
            ledger,
            _cloud: cloud,
            _dir: dir,
        }
    }
}

impl Hybrid {
    async fn chat(&self, prompt: &str, headers: &[(&str, &str)], extra: Value) -> Reply {
        let mut body = json!({
            "model": "tandem/auto",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 12,
            "temperature": 0,
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        post_json(&self.device.url("/v1/chat/completions"), &body, headers).await
    }

    /// A streamed answer: its text, and whether it ended properly.
    async fn stream(
        &self,
        prompt: &str,
        headers: &[(&str, &str)],
        extra: Value,
    ) -> (String, Vec<Value>, bool) {
        let mut body = json!({
            "model": "tandem/auto",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24,
            "temperature": 0,
            "stream": true,
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let mut r = reqwest::Client::new()
            .post(self.device.url("/v1/chat/completions"))
            .json(&body);
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let text = r.send().await.unwrap().text().await.unwrap();
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        let done = data.last() == Some(&"[DONE]");
        let chunks: Vec<Value> = data
            .iter()
            .filter(|d| **d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let content = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        (content, chunks, done)
    }

    async fn metrics(&self) -> String {
        reqwest::get(self.device.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The ledger's outcome entries (each follows its `sending` entry).
    fn ledger(&self) -> Vec<tandem_ledger::Entry> {
        self.dispatcher.ledger().unwrap().flush();
        tandem_ledger::read(&self.ledger)
            .unwrap()
            .into_iter()
            .filter(|e| e.egress.outcome != tandem_ledger::SENDING)
            .collect()
    }

    fn set_signals(&self, o: Value) {
        self.dispatcher
            .signals()
            .set_overrides(serde_json::from_value(o).unwrap());
    }
}

/// Prompts carrying personal data or secrets, and the value that must not leave.
fn pii_catalogue() -> Vec<(&'static str, &'static str)> {
    vec![
        (
            "Reply to jane.doe@example.com about the invoice.",
            "jane.doe@example.com",
        ),
        (
            "Call me on +44 20 7946 0958 after lunch.",
            "+44 20 7946 0958",
        ),
        (
            "My card is 4111 1111 1111 1111, is it valid?",
            "4111 1111 1111 1111",
        ),
        (
            "Pay to IBAN DE89 3704 0044 0532 0130 00 today.",
            "DE89 3704 0044 0532 0130 00",
        ),
        ("My SSN is 123-45-6789, keep it safe.", "123-45-6789"),
        ("The server 10.20.30.40 keeps rebooting.", "10.20.30.40"),
        (
            "Why does key sk-proj-AbCdEfGhIjKlMnOpQrStUvWx123 fail?",
            "sk-proj-AbCdEfGhIjKlMnOpQrStUvWx123",
        ),
        (
            "Use password = Tr0ub4dor&3xyz for the demo.",
            "Tr0ub4dor&3xyz",
        ),
        ("My NI number is AB 12 34 56 C.", "AB 12 34 56 C"),
    ]
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn strict_mode_keeps_every_pii_prompt_on_the_device() {
    let h = Setup::new(Mode::Forward).start().await;
    for (prompt, secret) in pii_catalogue() {
        let r = h
            .chat(
                prompt,
                &[("x-tandem-privacy", "strict")],
                json!({"max_tokens": 4}),
            )
            .await;
        assert_eq!(r.status, 200, "{prompt}: {}", r.body);
        assert_eq!(r.header("x-tandem-backend"), "local", "{prompt}");
        assert!(
            r.header("x-tandem-reasons")
                .contains("privacy: strict mode"),
            "{prompt}"
        );
        assert!(
            !contains(&h.capture.all_bytes(), secret),
            "{secret} left the device"
        );
    }
    assert!(
        h.capture.captured().is_empty(),
        "nothing at all left in strict mode"
    );
    // The same path is live: a prompt without personal data goes out.
    let r = h
        .chat(
            "Name a primary colour.",
            &[("x-tandem-privacy", "strict")],
            json!({}),
        )
        .await;
    assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(h.capture.captured().len(), 1);
    assert_eq!(h.ledger().len(), 1);
}

#[tokio::test]
async fn redact_mode_sends_placeholders_and_restores_the_answer() {
    let h = Setup::new(Mode::Echo).start().await;
    for (i, (prompt, secret)) in pii_catalogue().into_iter().enumerate() {
        let r = h
            .chat(prompt, &[("x-tandem-privacy", "redact")], json!({}))
            .await;
        assert_eq!(r.status, 200, "{prompt}: {}", r.body);
        assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
        assert!(!r.header("x-tandem-redacted").is_empty(), "{prompt}");
        // The upstream echoed placeholders; the client sees the originals.
        assert!(r.text().contains(secret), "{prompt} -> {}", r.text());
        let (streamed, _, done) = h
            .stream(prompt, &[("x-tandem-privacy", "redact")], json!({}))
            .await;
        assert!(done);
        assert!(streamed.contains(secret), "streamed: {streamed}");
        assert_eq!(streamed, r.text());
        let sent = h.capture.all_bytes();
        assert!(!contains(&sent, secret), "{secret} left the device");
        let last = h.capture.captured().last().unwrap().json();
        assert!(
            last["messages"][0]["content"]
                .as_str()
                .unwrap()
                .contains('['),
            "case {i}: {last}"
        );
    }
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 2 * pii_catalogue().len());
    assert!(ledger.iter().all(|e| !e.egress.redacted.is_empty()));
    assert!(
        h.metrics()
            .await
            .contains("tandem_pii_redactions_total{class=\"email\"}")
    );
}

/// Choice index -> (text, finish_reason) of a streamed answer's chunks.
fn by_choice(chunks: &[Value]) -> std::collections::BTreeMap<u64, (String, Option<String>)> {
    let mut out = std::collections::BTreeMap::<u64, (String, Option<String>)>::new();
    for choice in chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
    {
        let e = out.entry(choice["index"].as_u64().unwrap()).or_default();
        e.0.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        if let Some(f) = choice["finish_reason"].as_str() {
            e.1 = Some(f.to_owned());
        }
    }
    out
}

#[tokio::test]
async fn several_choices_leave_as_one_request_and_come_back_restored() {
    let h = Setup::new(Mode::Echo).start().await;
    let secret = "maria.keller@example.com";
    let prompt = format!("Write to {secret} about the invoice.");
    let redact = [("x-tandem-privacy", "redact")];
    let r = h.chat(&prompt, &redact, json!({"n": 3})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
    let sent = h.capture.captured();
    assert_eq!(sent.len(), 1, "one request for three choices");
    assert_eq!(sent[0].json()["n"], 3);
    assert!(
        !contains(&h.capture.all_bytes(), secret),
        "{secret} left the device"
    );
    let choices = r.body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{}", r.body);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i as u64);
        let want = match i {
            0 => format!("ECHO: {prompt}"),
            i => format!("ECHO {i}: {prompt}"),
        };
        // Each choice's placeholders are restored, as the first's are.
        assert_eq!(c["message"]["content"], want.as_str(), "{}", r.body);
        assert_eq!(c["message"]["reasoning_content"], "Echoing.");
        assert_eq!(c["finish_reason"], "stop");
    }
    // The prompt counted (and billed) once, the completions together.
    assert_eq!(r.body["usage"]["prompt_tokens"], 10, "{}", r.body);
    assert_eq!(r.body["usage"]["completion_tokens"], 15, "{}", r.body);
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 1, "one exchange in the ledger");

    let (_, chunks, done) = h
        .stream(
            &prompt,
            &redact,
            json!({"n": 3, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert!(done);
    assert_eq!(
        h.capture.captured().len(),
        2,
        "one request for three streamed choices"
    );
    let streamed = by_choice(&chunks);
    assert_eq!(streamed.len(), 3, "{chunks:?}");
    for (i, c) in choices.iter().enumerate() {
        let (text, finish) = &streamed[&(i as u64)];
        assert_eq!(text, c["message"]["content"].as_str().unwrap());
        assert_eq!(finish.as_deref(), Some("stop"));
    }
    let usage = chunks
        .iter()
        .rev()
        .find(|c| c["usage"].is_object())
        .expect("usage chunk");
    assert_eq!(usage["usage"]["completion_tokens"], 15, "{usage}");
    assert_eq!(h.ledger().len(), 2);

    // An upstream set to take one choice per request gets one request each.
    let h = Setup {
        upstream: Box::new(|u| u.choices = Choices::Separate),
        ..Setup::new(Mode::Echo)
    }
    .start()
    .await;
    let r = h.chat("Name a colour.", &[], json!({"n": 2})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let sent = h.capture.captured();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|c| c.json().get("n").is_none()));
    assert_eq!(r.body["choices"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        r.body["choices"][1]["message"]["content"],
        "ECHO: Name a colour."
    );
}

#[tokio::test]
async fn several_choices_from_a_cloud_tandem_come_from_one_request() {
    // A real model upstream: the cloud-role Tandem draws both choices.
    let h = Setup::new(Mode::Forward).start().await;
    let r = h
        .chat(
            "Write one sentence about the sea.",
            &[],
            json!({"n": 2, "temperature": 1.0, "seed": 5, "max_tokens": 16}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
    let sent = h.capture.captured();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].json()["n"], 2);
    let choices = r.body["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 2, "{}", r.body);
    for c in choices {
        assert!(
            !c["message"]["content"].as_str().unwrap_or("").is_empty(),
            "{}",
            r.body
        );
    }
    let u = &r.body["usage"];
    assert!(
        u["completion_tokens"].as_u64().unwrap() > 16,
        "both choices counted: {u}"
    );
}

#[tokio::test]
async fn several_choices_cut_mid_stream_are_each_continued_locally() {
    let h = Setup::new(Mode::KillAfter(6)).start().await;
    let (_, chunks, done) = h
        .stream(
            "Write a short poem about the sea.",
            &[],
            json!({"n": 2, "max_tokens": 40}),
        )
        .await;
    assert!(done, "the client saw one complete stream: {chunks:?}");
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{chunks:?}"
    );
    assert_eq!(h.capture.captured().len(), 1);
    let streamed = by_choice(&chunks);
    assert_eq!(streamed.len(), 2, "{chunks:?}");
    for (i, (text, finish)) in &streamed {
        assert!(finish.is_some(), "choice {i} finished: {chunks:?}");
        assert!(text.len() > 8, "choice {i} went on after the cut: {text:?}");
    }
    let m = h.metrics().await;
    assert!(
        m.contains("tandem_handoffs_total{from=\"cloud\",to=\"local\",cause=\"upstream_error\"} 2"),
        "{m}"
    );
}

#[tokio::test]
async fn cloud_killed_mid_stream_is_continued_locally() {
    let h = Setup::new(Mode::KillAfter(4)).start().await;
    let (text, chunks, done) = h
        .stream(
            "Write a short poem about the sea.",
            &[],
            json!({"max_tokens": 40}),
        )
        .await;
    assert!(done, "the client saw one complete stream: {chunks:?}");
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{chunks:?}"
    );
    // What the cloud sent before the cut (the last piece may have died with
    // the connection): the client's answer begins with it, and goes on.
    let before = h.capture.captured()[0].forwarded_text();
    let common = text
        .char_indices()
        .zip(before.chars())
        .take_while(|((_, a), b)| a == b)
        .count();
    assert!(
        common >= 3,
        "{text:?} does not start with the cloud's {before:?}"
    );
    assert!(
        text.len() > before.len(),
        "the local model went on: {text:?}"
    );
    let m = h.metrics().await;
    assert!(
        m.contains("tandem_handoffs_total{from=\"cloud\",to=\"local\",cause=\"upstream_error\"} 1"),
        "{m}"
    );
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 1);
    assert!(
        ledger[0].egress.outcome.starts_with("handoff to local"),
        "{:?}",
        ledger[0].egress
    );
}

/// `text`, a streamed answer the cloud began and the device finished
/// after one handoff, is the cloud's start and one value of `schema`.
async fn finished_as_one_value(h: &Hybrid, text: &str, schema: &Value) {
    let before = h.capture.captured()[0].forwarded_text();
    assert!(
        before.len() >= 3 && text.starts_with(&before[..3]),
        "{text:?} after {before:?}"
    );
    let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(
        jsonschema::validator_for(schema).unwrap().is_valid(&v),
        "{v}"
    );
    let m = h.metrics().await;
    assert!(
        m.contains("tandem_handoffs_total{from=\"cloud\",to=\"local\",cause=\"upstream_error\"} 1"),
        "{m}"
    );
}

/// A JSON answer cut mid-stream is finished by the device as the same
/// value: the device's grammar reads what the client already has first, so
/// the whole parses and keeps to the schema (before, the device opened a
/// second object after the cloud's half one).
#[tokio::test]
async fn a_json_answer_cut_mid_stream_is_finished_as_one_value() {
    let h = Setup::new(Mode::KillAfter(6)).start().await;
    let schema = json!({"type": "object",
        "properties": {"name": {"type": "string"}, "born": {"type": "integer"},
                       "fields": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "born", "fields"], "additionalProperties": false});
    let extra = json!({"max_tokens": 80, "response_format": {"type": "json_schema",
        "json_schema": {"name": "scientist", "strict": true, "schema": schema}}});
    let prompt = "Marie Curie, born 1867, worked in physics and chemistry. Describe her as JSON.";
    let (text, chunks, done) = h.stream(prompt, &[], extra).await;
    assert!(done, "one complete stream: {chunks:?}");
    assert!(
        chunks.iter().all(|c| c.get("error").is_none()),
        "{chunks:?}"
    );
    finished_as_one_value(&h, &text, &schema).await;
}

/// The same after a bare prompt (`/v1/completions`): the device's grammar
/// reads the cloud's half as answer, not as more prompt.
#[tokio::test]
async fn a_json_completion_cut_mid_stream_is_finished_as_one_value() {
    let h = Setup::new(Mode::KillAfter(6)).start().await;
    let schema = json!({"type": "object",
        "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
        "required": ["name", "born"], "additionalProperties": false});
    let body = json!({"model": "tandem/auto", "max_tokens": 60, "temperature": 0, "stream": true,
        "prompt": "Marie Curie was born in 1867. As JSON with her name and year of birth:\n",
        "response_format": {"type": "json_schema",
            "json_schema": {"name": "scientist", "strict": true, "schema": schema}}});
    let raw = reqwest::Client::new()
        .post(h.device.url("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(raw.trim_end().ends_with("data: [DONE]"), "{raw}");
    assert!(!raw.contains("\"error\""), "{raw}");
    let text = tandem_testkit::sse_text(&raw);
    finished_as_one_value(&h, &text, &schema).await;
}

#[tokio::test]
async fn slow_cloud_past_its_ttft_timeout_is_answered_locally() {
    let mut s = Setup::new(Mode::Delay(Duration::from_secs(3)));
    s.upstream = Box::new(|u| {
        u.ttft_timeout_ms = 400;
        u.request_timeout_ms = 400;
    });
    let h = s.start().await;
    for streaming in [false, true] {
        if streaming {
            let (text, _, done) = h.stream("Name a fruit.", &[], json!({})).await;
            assert!(done && !text.is_empty());
        } else {
            let r = h.chat("Name a fruit.", &[], json!({})).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-tandem-backend"), "local");
            assert!(
                r.header("x-tandem-failover").starts_with("cloud -> local"),
                "{:?}",
                r.headers
            );
        }
    }
    let m = h.metrics().await;
    assert!(
        m.contains("tandem_failovers_total{from=\"cloud\",to=\"local\",cause=\"timeout\"} 2"),
        "{m}"
    );
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 2);
    assert!(ledger.iter().all(|e| e.egress.outcome.starts_with("error")));
}

#[tokio::test]
async fn server_errors_are_retried_then_answered_locally() {
    let h = Setup::new(Mode::Fail {
        status: 500,
        times: 1000,
    })
    .start()
    .await;
    let r = h.chat("Name a fruit.", &[], json!({})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-tandem-backend"), "local");
    assert_eq!(h.capture.captured().len(), 3, "one try and two retries");
    let ledger = h.ledger();
    assert_eq!(ledger[0].egress.attempts, 3);
    assert_eq!(
        ledger[0].egress.bytes_out,
        3 * h.capture.captured()[0].body.len() as u64
    );
}

#[tokio::test]
async fn rate_limited_cloud_is_retried_until_it_answers() {
    let h = Setup::new(Mode::Fail {
        status: 429,
        times: 2,
    })
    .start()
    .await;
    let r = h.chat("Name a fruit.", &[], json!({})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
    assert!(!r.text().is_empty());
    let ledger = h.ledger();
    assert_eq!(
        (ledger[0].egress.attempts, ledger[0].egress.outcome.as_str()),
        (3, "ok")
    );
    assert!(ledger[0].egress.cost_usd > 0.0);
}

#[tokio::test]
async fn unreachable_cloud_fails_over_then_is_skipped() {
    let mut s = Setup::new(Mode::Forward);
    s.upstream = Box::new(|u| {
        u.base_url = "http://127.0.0.1:9/v1".into();
        u.breaker_failures = 2;
        u.max_retries = 1;
    });
    let h = s.start().await;
    for _ in 0..2 {
        let r = h.chat("Name a fruit.", &[], json!({})).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-tandem-backend"), "local");
        assert!(
            r.header("x-tandem-failover").contains("connection failed"),
            "{:?}",
            r.headers
        );
    }
    // The breaker is open: the cloud is no longer even tried.
    let r = h.chat("Name a fruit.", &[], json!({})).await;
    assert_eq!(r.header("x-tandem-backend"), "local");
    assert!(
        r.header("x-tandem-reasons").contains("circuit open"),
        "{:?}",
        r.headers
    );
    assert!(r.header("x-tandem-failover").is_empty());
    // And what only the cloud could do gets a clear error.
    let long = "words and more words ".repeat(300);
    let r = h.chat(&long, &[], json!({})).await;
    assert_eq!(r.status, 503, "{}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("circuit open") && msg.contains("exceeds the local context"),
        "{msg}"
    );
    let health: Value = reqwest::get(h.device.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["backends"][1]["breaker"], "open");
}

#[tokio::test]
async fn local_failure_mid_stream_is_continued_in_the_cloud() {
    // A private engine: aborting it must not disturb other tests.
    let mut cfg = EngineConfig::new(SMOLLM2, model_path(SMOLLM2));
    cfg.context = Some(1024);
    cfg.threads = Threads::Fixed(1);
    let local = LocalEngine::load(cfg).unwrap();
    let mut s = Setup::new(Mode::Forward);
    s.policy = PolicyConfig::default();
    s.local = local.clone();
    let h = s.start().await;
    let resp = reqwest::Client::new()
        .post(h.device.url("/v1/chat/completions"))
        .json(&json!({
            "model": "tandem/auto",
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            "max_tokens": 60, "temperature": 0, "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-tandem-backend"], "local");
    let mut body = resp.bytes_stream();
    let mut raw = Vec::new();
    while raw.windows(2).filter(|w| w == b"\n\n").count() < 6 {
        raw.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    // The device sheds its work (say it overheats): the answer moves.
    local.abort_all("device too hot");
    while let Some(chunk) = body.next().await {
        raw.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8_lossy(&raw);
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(!text.contains("\"error\""), "{text}");
    let sent = h.capture.captured();
    assert_eq!(sent.len(), 1, "the cloud was asked to continue");
    let req = sent[0].json();
    assert_eq!(req["continue_final_message"], true);
    let partial = req["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(partial["role"], "assistant");
    assert!(!partial["content"].as_str().unwrap().is_empty());
    let m = h.metrics().await;
    assert!(
        m.contains("tandem_handoffs_total{from=\"local\",to=\"cloud\""),
        "{m}"
    );
}

#[tokio::test]
async fn dry_run_explains_without_generating() {
    let h = Setup::new(Mode::Forward).start().await;
    let v: Value = reqwest::Client::new()
        .post(h.device.url("/v1/tandem/route"))
        .header("x-tandem-privacy", "strict")
        .json(&json!({"messages": [{"role": "user", "content": "Email bob@corp.example.com the report"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["backend"], "local");
    // Classes and counts, never the values.
    assert_eq!(v["features"]["pii"], json!({"email": 1}));
    let reasons = v["decision"]["reasons"].as_array().unwrap();
    assert!(
        reasons
            .iter()
            .any(|r| r["rule"] == "privacy" && r["effect"] == "forbid")
    );
    assert!(h.capture.captured().is_empty());
    assert!(!h.metrics().await.contains("tandem_requests_total{"));
}

/// vLLM's and llama.cpp's constraint fields are not OpenAI's API, and some
/// servers ignore them (Ollama): they go only to an upstream that declares
/// it applies them, and otherwise stay on the device or are refused by
/// name, never answered unconstrained.
#[tokio::test]
async fn constraint_fields_go_only_where_they_are_applied() {
    let yes_no = json!({"guided_choice": ["yes", "no"], "max_tokens": 4});
    let prompt = "Is the sky blue? Answer yes or no.";
    let h = Setup::new(Mode::Forward).start().await;
    // Routed: the cloud comes first, but it does not apply the field.
    let r = h.chat(prompt, &[], yes_no.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-backend"), "local", "{}", r.body);
    let answer = r.body["choices"][0]["message"]["content"].clone();
    assert!(answer == "yes" || answer == "no", "{answer}");
    // Named: a 400 naming the field, not a silently different answer.
    let mut named = yes_no.clone();
    named["model"] = json!(QWEN_05B);
    let r = h.chat(prompt, &[], named.clone()).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "guided_choice", "{}", r.body);
    let why = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("`constraint_fields`"), "{why}");
    // A GBNF grammar is applied on the device, as llama.cpp's server
    // applies it.
    let gbnf = json!({"grammar": "root ::= \"yes\" | \"no\"", "max_tokens": 4});
    let r = h.chat(prompt, &[], gbnf).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-backend"), "local", "{}", r.body);
    let answer = r.body["choices"][0]["message"]["content"].clone();
    assert!(answer == "yes" || answer == "no", "{answer}");
    // One the device cannot read (a token reference names one model's
    // vocabulary), which the upstream does not declare: refused.
    let tokens = json!({"grammar": "root ::= <[1000]>"});
    let r = h.chat(prompt, &[], tokens).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "no_backend_allowed", "{}", r.body);
    assert!(h.capture.captured().is_empty(), "nothing left the device");

    // Declared (a cloud-role Tandem applies them): sent as they are. This
    // one also says it does not apply `logit_bias`, as Ollama does not.
    let mut s = Setup::new(Mode::Forward);
    s.upstream = Box::new(|u| {
        u.constraint_fields = ["guided_json", "guided_regex", "guided_choice"]
            .map(String::from)
            .to_vec();
        u.lacks = vec![tandem_api::Feature::LogitBias];
    });
    let h = s.start().await;
    let bias = json!({"logit_bias": {"15": -100}, "max_tokens": 4});
    let r = h.chat(prompt, &[], bias.clone()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-backend"), "local", "{}", r.body);
    let mut named_bias = bias;
    named_bias["model"] = json!(QWEN_05B);
    let r = h.chat(prompt, &[], named_bias).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.body["error"]["param"], "logit_bias", "{}", r.body);
    let why = r.body["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("`lacks`"), "{why}");
    assert!(h.capture.captured().is_empty());
    for body in [yes_no, named] {
        let r = h.chat(prompt, &[], body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-tandem-backend"), "cloud:cloud", "{}", r.body);
        let answer = r.body["choices"][0]["message"]["content"].clone();
        assert!(answer == "yes" || answer == "no", "{answer}");
    }
    let sent = h.capture.captured();
    assert_eq!(sent.len(), 2);
    for c in sent {
        assert_eq!(c.json()["guided_choice"], json!(["yes", "no"]));
    }
}

/// `tandem upstreams check`'s probes tell an upstream that applies the
/// constraint fields (a Tandem) from one that ignores them all (an echo,
/// as a server that knows none of them would answer).
#[tokio::test]
async fn the_probe_finds_what_an_upstream_applies() {
    use tandem_api::Feature;
    use tandem_backends::probe::{self, Verdict};
    let cloud =
        TestServer::start(Dispatcher::builder().local(cloud_engine()).build().unwrap()).await;
    let tandem = CloudBackend::new(UpstreamConfig::new(
        "tandem",
        &cloud.url("/v1"),
        &[QWEN_05B],
    ))
    .unwrap();
    // Configured as unable to continue, which the probe does not take on
    // trust: a Tandem finishes an object begun elsewhere.
    let found = probe::constraints(&tandem, QWEN_05B).await.unwrap();
    assert_eq!(
        probe::suggested(&found, &[]),
        probe::Suggested {
            constraint_fields: vec![
                "guided_json",
                "guided_regex",
                "guided_choice",
                "guided_grammar",
                "structured_outputs",
                "json_schema",
                "grammar"
            ],
            lacks: vec![],
            continuation: Continuation::Prefill,
        },
        "{found:?}"
    );
    assert!(
        found.iter().all(|f| matches!(f.verdict, Verdict::Applied)),
        "{found:?}"
    );

    let echo = CaptureUpstream::start(None, Mode::Echo).await;
    let ignoring =
        CloudBackend::new(UpstreamConfig::new("echo", &echo.base_url(), &["m"])).unwrap();
    let found = probe::constraints(&ignoring, "m").await.unwrap();
    assert!(
        found
            .iter()
            .all(|f| matches!(f.verdict, Verdict::Ignored(_))),
        "{found:?}"
    );
    assert_eq!(
        probe::suggested(&found, &[]),
        probe::Suggested {
            constraint_fields: vec![],
            lacks: vec![Feature::JsonSchema, Feature::JsonObject],
            continuation: Continuation::None,
        }
    );
    // What it received: the probes' own texts, nothing else.
    for c in echo.captured() {
        assert_eq!(
            c.json()["messages"][0]["content"],
            "Name a colour. Answer in one word."
        );
    }

    // A server that repeats the start in a whole answer but not in a
    // stream (as llama.cpp's does): an answer begun elsewhere is asked for
    // streamed, so it continues as a Tandem does.
    let repeating = CaptureUpstream::start(Some(cloud.url("/v1")), Mode::RepeatStart).await;
    let llama_like = CloudBackend::new(UpstreamConfig::new(
        "llama-like",
        &repeating.base_url(),
        &[QWEN_05B],
    ))
    .unwrap();
    let found = probe::constraints(&llama_like, QWEN_05B).await.unwrap();
    assert_eq!(
        probe::suggested(&found, &[]).continuation,
        Continuation::Prefill,
        "{found:?}"
    );
    let asked = repeating.captured();
    let last = asked.last().map(|c| c.json()).unwrap_or_default();
    assert_eq!(last["continue_final_message"], true, "{last}");
    assert_eq!(last["stream"], true, "{last}");
    assert_eq!(last["stream_options"]["include_usage"], true, "{last}");

    let mut gone = UpstreamConfig::new("gone", "http://127.0.0.1:9/v1", &["m"]);
    gone.max_retries = 0;
    let gone = CloudBackend::new(gone).unwrap();
    assert!(probe::constraints(&gone, "m").await.is_err());
}

#[tokio::test]
async fn keys_carry_privacy_budgets_and_rate_limits() {
    let (strict_key, careful_key) = (
        "tdm_strict_test_key_0123456789",
        "tdm_budget_test_key_0123456789",
    );
    let mut s = Setup::new(Mode::Forward);
    s.keys = vec![
        KeyConfig {
            name: "strict-app".into(),
            hash: hash_key(strict_key),
            privacy: Some(PrivacyMode::Strict),
            daily_budget_usd: None,
            rate_limit_per_minute: None,
            admin: false,
        },
        KeyConfig {
            name: "careful-app".into(),
            hash: hash_key(careful_key),
            privacy: None,
            daily_budget_usd: Some(1e-9),
            rate_limit_per_minute: Some(2),
            admin: false,
        },
    ];
    let h = s.start().await;
    let anon = h.chat("Name a fruit.", &[], json!({})).await;
    assert_eq!(anon.status, 401);
    let strict_auth = format!("Bearer {strict_key}");
    // The key's strict mode holds even if the request asks for less.
    let r = h
        .chat(
            "Mail jane.doe@example.com the notes.",
            &[("authorization", &strict_auth), ("x-tandem-privacy", "off")],
            json!({"max_tokens": 4}),
        )
        .await;
    assert_eq!(
        (r.status, r.header("x-tandem-backend").as_str()),
        (200, "local")
    );
    let careful_auth = format!("Bearer {careful_key}");
    let first = h
        .chat(
            "Name a fruit.",
            &[("authorization", &careful_auth)],
            json!({}),
        )
        .await;
    assert_eq!(first.header("x-tandem-backend"), "cloud:cloud");
    let second = h
        .chat(
            "Name a fruit.",
            &[("authorization", &careful_auth)],
            json!({}),
        )
        .await;
    assert_eq!(second.header("x-tandem-backend"), "local", "budget spent");
    assert!(second.header("x-tandem-reasons").contains("budget"));
    let third = h
        .chat(
            "Name a fruit.",
            &[("authorization", &careful_auth)],
            json!({}),
        )
        .await;
    assert_eq!(third.status, 429);
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 1);
    assert_eq!(ledger[0].egress.key.as_deref(), Some("careful-app"));
}

#[tokio::test]
async fn metrics_and_ledger_say_what_happened() {
    let h = Setup::new(Mode::Forward).start().await;
    h.set_signals(json!({"cloud_reachable": false}));
    let local = h.chat("Name a fruit.", &[], json!({})).await;
    assert_eq!(local.header("x-tandem-backend"), "local");
    h.dispatcher.signals().clear_overrides();
    let cloud = h.chat("Name a fruit.", &[], json!({})).await;
    assert_eq!(cloud.header("x-tandem-backend"), "cloud:cloud");
    let m = h.metrics().await;
    for needle in [
        "tandem_requests_total{backend=\"local\",reason=\"only_option\"} 1",
        "tandem_requests_total{backend=\"cloud:cloud\",reason=\"prefer_cloud\"} 1",
        "tandem_tokens_total{side=\"local\",kind=\"completion\"}",
        "tandem_tokens_total{side=\"cloud\",kind=\"prompt\"}",
        "tandem_cost_usd_total",
        "tandem_cost_saved_usd_total",
        "tandem_ttft_seconds_count{backend=\"local\"} 1",
        "tandem_request_duration_seconds_count{backend=\"cloud:cloud\"} 1",
    ] {
        assert!(m.contains(needle), "missing {needle}:\n{m}");
    }
    let ledger = h.ledger();
    assert_eq!(ledger.len(), 1);
    let e = &ledger[0].egress;
    assert_eq!(
        (e.upstream.as_str(), e.model.as_str(), e.outcome.as_str()),
        ("cloud", QWEN_05B, "ok")
    );
    let sent = &h.capture.captured()[0];
    assert_eq!(e.payload_sha256, tandem_ledger::sha256_hex(&sent.body));
    assert_eq!(e.bytes_out, sent.body.len() as u64);
    assert!(e.bytes_in > 0 && e.completion_tokens > 0);
    let spent: f64 = m
        .lines()
        .find(|l| l.starts_with("tandem_cost_usd_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((spent - e.cost_usd).abs() < 1e-12);
    // The `sending` entry was on disk before the request left; both verify.
    let all = tandem_ledger::read(&h.ledger).unwrap();
    assert_eq!(all[0].egress.outcome, tandem_ledger::SENDING);
    assert_eq!(all[0].egress.request_id, e.request_id);
    // It already names the body that then left.
    assert_eq!(all[0].egress.payload_sha256, e.payload_sha256);
    let v = tandem_ledger::verify(&h.ledger, &ledger_key(), None).unwrap();
    assert_eq!((v.entries, v.unfinished), (2, 0));
}

#[tokio::test(flavor = "current_thread")]
async fn upstream_api_key_never_appears_in_errors_metrics_or_logs() {
    let secret = "sk-upstream-SECRET-0123456789abcdef";
    let logs = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || LogSink(sink.clone()))
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut s = Setup::new(Mode::Fail {
        status: 401,
        times: 1000,
    });
    s.api_key = Some(secret.into());
    let h = s.start().await;
    // A request naming the cloud model has no fallback: the client sees the
    // upstream's refusal.
    let r = h
        .chat("Name a fruit.", &[], json!({"model": QWEN_05B}))
        .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(!r.body.to_string().contains(secret));
    let sent = &h.capture.captured()[0];
    assert_eq!(
        sent.headers["authorization"],
        format!("Bearer {secret}"),
        "the key is used"
    );
    assert!(!h.metrics().await.contains(secret));
    assert!(!format!("{:?}", h.dispatcher.clouds()[0]).contains(secret));
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(!logged.is_empty());
    assert!(!logged.contains(secret), "{logged}");
    assert!(
        h.ledger()
            .iter()
            .all(|e| !serde_json::to_string(e).unwrap().contains(secret))
    );
}

struct LogSink(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
