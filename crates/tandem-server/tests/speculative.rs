//! Edge–cloud speculative decoding with real servers on loopback: a device
//! Tandem drafting with Qwen2.5-Coder 0.5B, a cloud-role Tandem verifying
//! with Qwen2.5-Coder 1.5B (the same tokenizer), and between them a
//! capturing upstream that records every round and can make the cloud go
//! away mid-answer.

use futures::StreamExt;
use serde_json::{Value, json};
use tandem_api::SessionModel;
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_engine::LocalEngine;
use tandem_router::Dispatcher;
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::{QWEN_05B, QWEN_15B, SMOLLM2, TestServer, post_json, shared_engine, sse_text};

fn target() -> LocalEngine {
    shared_engine(QWEN_15B, 1024, 1)
}

fn drafter() -> LocalEngine {
    shared_engine(QWEN_05B, 1024, 1)
}

struct Pair {
    device: TestServer,
    cloud: TestServer,
    capture: CaptureUpstream,
    ledger: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// The egress ledger once it has `n` entries (the drafting task writes
    /// it just after the answer's last event).
    async fn ledger(&self, n: usize) -> Vec<tandem_ledger::Entry> {
        for _ in 0..100 {
            let entries: Vec<_> = tandem_ledger::read(&self.ledger)
                .unwrap()
                .into_iter()
                .filter(|e| e.egress.outcome != tandem_ledger::SENDING)
                .collect();
            if entries.len() >= n {
                return entries;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("the ledger never reached {n} entries");
    }
}

async fn pair(draft: LocalEngine, mode: Mode) -> Pair {
    let cloud = TestServer::start(Dispatcher::builder().local(target()).build().unwrap()).await;
    let capture = CaptureUpstream::start(Some(cloud.url("/v1")), mode).await;
    let mut up = UpstreamConfig::new("cloud", &capture.base_url(), &[QWEN_15B]);
    up.ttft_timeout_ms = 120_000;
    // A Tandem applies vLLM's regex field.
    up.constraint_fields = vec!["guided_regex".into()];
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.jsonl");
    let device = Dispatcher::builder()
        .local(draft)
        .cloud(CloudBackend::new(up).unwrap())
        .ledger(
            tandem_ledger::Ledger::open(&ledger, tandem_ledger::LedgerKey::from_secret([5; 32]))
                .unwrap(),
        )
        .build()
        .unwrap();
    Pair {
        device: TestServer::start(device).await,
        cloud,
        capture,
        ledger,
        _dir: dir,
    }
}

fn chat(prompt: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": QWEN_15B,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 40,
        "temperature": 0,
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

const SPECULATIVE: (&str, &str) = ("x-tandem-mode", "speculative");

async fn metric(server: &TestServer, prefix: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    tandem_router::metrics::sum(&text, prefix)
}

fn verify_rounds(capture: &CaptureUpstream) -> Vec<Value> {
    capture
        .captured()
        .into_iter()
        .filter(|c| c.path.ends_with("/verify"))
        .map(|c| c.json())
        .collect()
}

#[tokio::test]
async fn greedy_speculative_answers_are_the_cloud_models_token_for_token() {
    let p = pair(drafter(), Mode::Forward).await;
    let prompts = [
        "Write a Python function that returns the factorial of n.",
        "What is the capital of France? Answer in one sentence.",
        "List three prime numbers greater than 10, separated by commas.",
    ];
    for prompt in prompts {
        let body = chat(prompt, json!({}));
        let cloud_only = post_json(&p.cloud.url("/v1/chat/completions"), &body, &[]).await;
        assert_eq!(cloud_only.status, 200, "{}", cloud_only.body);
        let spec = post_json(&p.device.url("/v1/chat/completions"), &body, &[SPECULATIVE]).await;
        assert_eq!(spec.status, 200, "{}", spec.body);
        assert_eq!(spec.header("x-tandem-speculative"), "on");
        assert_eq!(spec.header("x-tandem-backend"), "cloud:cloud");
        assert_eq!(spec.text(), cloud_only.text(), "prompt: {prompt}");
        assert_eq!(
            spec.body["usage"]["completion_tokens"], cloud_only.body["usage"]["completion_tokens"],
            "prompt: {prompt}"
        );
        assert_eq!(
            spec.body["choices"][0]["finish_reason"],
            cloud_only.body["choices"][0]["finish_reason"]
        );
    }

    // Streamed, the same text arrives in pieces.
    let body = chat(prompts[0], json!({"stream": true}));
    let resp = reqwest::Client::new()
        .post(p.device.url("/v1/chat/completions"))
        .header(SPECULATIVE.0, SPECULATIVE.1)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut raw = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        raw.extend_from_slice(&c.unwrap());
    }
    let raw = String::from_utf8(raw).unwrap();
    let pieces = raw.matches("\"content\":").count();
    assert!(pieces > 3, "{raw}");
    let reference = post_json(
        &p.cloud.url("/v1/chat/completions"),
        &chat(prompts[0], json!({})),
        &[],
    )
    .await;
    assert_eq!(sse_text(&raw), reference.text());

    // Drafts were accepted, so the target ran fewer passes than tokens.
    let rounds = metric(&p.device, "tandem_speculative_total{kind=\"rounds\"}").await;
    let tokens = metric(&p.device, "tandem_speculative_total{kind=\"tokens\"}").await;
    let accepted = metric(&p.device, "tandem_speculative_total{kind=\"accepted\"}").await;
    assert!(rounds > 0.0 && accepted > 0.0, "{rounds} {accepted}");
    assert!(rounds < tokens, "{rounds} rounds for {tokens} tokens");
    assert_eq!(
        metric(&p.cloud, "tandem_speculative_verify_rounds_total").await,
        rounds
    );

    // After a session's first round, a round sends one new token (the
    // target's own from the round before) plus the draft.
    let rounds = verify_rounds(&p.capture);
    let firsts = rounds.iter().filter(|r| r["pos"] == 0).count();
    assert_eq!(firsts, 4, "one session per answer");
    let entries = p.ledger(4).await;
    assert!(
        entries
            .iter()
            .all(|e| e.egress.outcome.starts_with("ok (speculative:")),
        "{:?}",
        entries
            .iter()
            .map(|e| &e.egress.outcome)
            .collect::<Vec<_>>()
    );
    for r in rounds.iter().filter(|r| r["pos"] != 0) {
        assert_eq!(r["tokens"].as_array().map(Vec::len), Some(1), "{r}");
        assert!(r["draft"].as_array().is_some_and(|d| d.len() <= 12));
    }
}

#[tokio::test]
async fn a_draft_model_with_another_tokenizer_is_refused_before_generation() {
    let p = pair(shared_engine(SMOLLM2, 1024, 1), Mode::Forward).await;
    let r = post_json(
        &p.device.url("/v1/chat/completions"),
        &chat("Say hello.", json!({})),
        &[SPECULATIVE],
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "vocab_mismatch");
    let msg = r.body["error"]["message"].as_str().unwrap_or("");
    assert!(msg.contains("share a tokenizer"), "{msg}");
    // Nothing of the prompt left the device.
    assert!(verify_rounds(&p.capture).is_empty());
    assert!(
        !String::from_utf8_lossy(&p.capture.all_bytes()).contains("hello"),
        "the prompt must not be sent"
    );
}

#[tokio::test]
async fn the_device_finishes_alone_when_the_cloud_goes_away_mid_answer() {
    // The session opens and two rounds pass; then the cloud answers 503.
    let p = pair(drafter(), Mode::GoneAfter { requests: 3 }).await;
    let body = chat(
        "Write a Python function that returns the factorial of n.",
        json!({}),
    );
    let r = post_json(&p.device.url("/v1/chat/completions"), &body, &[SPECULATIVE]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["usage"]["completion_tokens"], 40, "{}", r.body);
    assert!(!r.text().is_empty());
    assert_eq!(verify_rounds(&p.capture).len(), 3);
    let handoffs = metric(
        &p.device,
        "tandem_handoffs_total{from=\"cloud\",to=\"local\"",
    )
    .await;
    assert_eq!(handoffs, 1.0);
    // The ledger holds the session: what left, and how it ended.
    let entries = p.ledger(1).await;
    assert_eq!(entries.len(), 1);
    let e = &entries[0].egress;
    assert!(e.outcome.starts_with("handoff to local:"), "{}", e.outcome);
    let sent = p.capture.captured();
    let first_round = sent.iter().find(|c| c.path.ends_with("/verify")).unwrap();
    assert_eq!(
        e.payload_sha256,
        tandem_ledger::sha256_hex(&first_round.body)
    );
    assert_eq!(
        e.bytes_out,
        sent.iter().map(|c| c.body.len() as u64).sum::<u64>()
    );
    assert_eq!((e.upstream.as_str(), e.model.as_str()), ("cloud", QWEN_15B));
    // The part settled before the cloud left is the cloud model's.
    let reference = post_json(&p.cloud.url("/v1/chat/completions"), &body, &[]).await;
    let common = r
        .text()
        .chars()
        .zip(reference.text().chars())
        .take_while(|(a, b)| a == b)
        .count();
    assert!(common >= 2, "{:?} vs {:?}", r.text(), reference.text());
}

#[tokio::test]
async fn sampled_speculative_answers_complete() {
    let p = pair(drafter(), Mode::Forward).await;
    let body = chat(
        "Write a haiku about the sea.",
        json!({"temperature": 0.8, "top_p": 0.95, "seed": 3}),
    );
    let r = post_json(&p.device.url("/v1/chat/completions"), &body, &[SPECULATIVE]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-tandem-speculative"), "on");
    assert!(!r.text().is_empty());
    let rounds = verify_rounds(&p.capture);
    assert!(!rounds.is_empty());
    // Each drafted token travels with the distribution it was drawn from.
    for r in &rounds {
        assert_eq!(
            r["draft"].as_array().map(Vec::len),
            r["draft_probs"].as_array().map(Vec::len).or(Some(0))
        );
    }
    // Features speculative decoding cannot keep exact run as routed.
    let body = chat("Say hi.", json!({"logprobs": true, "max_tokens": 4}));
    let r = post_json(&p.device.url("/v1/chat/completions"), &body, &[SPECULATIVE]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-tandem-speculative"),
        "off: logprobs are not supported"
    );
    // So do vLLM's constraint fields, which the answer still keeps to.
    let body = chat(
        "Say hi.",
        json!({"guided_regex": "(?:hi|hello)", "max_tokens": 4}),
    );
    let r = post_json(&p.device.url("/v1/chat/completions"), &body, &[SPECULATIVE]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.header("x-tandem-speculative"),
        "off: structured outputs are not supported"
    );
    assert!(["hi", "hello"].contains(&r.text().as_str()), "{}", r.body);
}

#[tokio::test]
async fn the_verify_endpoint_refuses_bad_rounds_with_clear_errors() {
    let p = pair(drafter(), Mode::Forward).await;
    let sessions = p.cloud.url("/v1/tandem/spec/sessions");
    let hash = drafter().vocab_hash().to_owned();

    let r = post_json(
        &sessions,
        &json!({"model": "nope", "vocab_hash": hash}),
        &[],
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "model_not_found");
    let r = post_json(
        &sessions,
        &json!({"model": QWEN_15B, "vocab_hash": "0123"}),
        &[],
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["error"]["code"], "vocab_mismatch");
    let r = post_json(&sessions, &json!({"model": QWEN_15B}), &[]).await;
    assert_eq!(r.status, 400, "{}", r.body);

    let opened = post_json(
        &sessions,
        &json!({"model": QWEN_15B, "vocab_hash": hash, "sampling": {"temperature": 0}}),
        &[],
    )
    .await;
    assert_eq!(opened.status, 200, "{}", opened.body);
    let id = opened.body["session"].as_str().unwrap().to_owned();
    let verify = format!("{sessions}/{id}/verify");
    let prompt = drafter()
        .prepare(&tandem_api::GenerateRequest {
            choices: 1,
            model: QWEN_05B.into(),
            input: tandem_api::Input::text("def add(a, b):"),
            sampling: tandem_api::Sampling::greedy(),
            max_tokens: Some(8),
            stop: vec![],
            logprobs: None,
            stream: false,
            include_usage: false,
            extra: Default::default(),
        })
        .unwrap()
        .tokens;

    for (body, status, code) in [
        (
            json!({"pos": 3, "tokens": prompt}),
            409,
            "position_mismatch",
        ),
        (json!({"pos": 0, "tokens": []}), 400, "invalid_value"),
        (
            json!({"pos": 0, "tokens": [999_999_999]}),
            400,
            "invalid_value",
        ),
        (json!({"pos": 0, "tokens": [-1]}), 400, "invalid_value"),
    ] {
        let r = post_json(&verify, &body, &[]).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["code"], code, "{}", r.body);
    }
    let r = post_json(&verify, &json!({"pos": 0, "tokens": "x"}), &[]).await;
    assert_eq!(r.status, 400);
    let r = post_json(
        &verify,
        &json!({"pos": 0, "tokens": [1], "draft": vec![1; 65]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // A good round: the target reads the prompt and a draft in one pass.
    let r = post_json(
        &verify,
        &json!({"pos": 0, "tokens": prompt, "draft": [198]}),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["forward_passes"], 1);
    let accepted = r.body["accepted"].as_u64().unwrap() as usize;
    assert_eq!(r.body["pos"], prompt.len() + accepted);

    let client = reqwest::Client::new();
    let del = client
        .delete(format!("{sessions}/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    let r = post_json(&verify, &json!({"pos": 0, "tokens": [1]}), &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.body["error"]["code"], "session_not_found");
}

#[tokio::test]
async fn an_upstream_that_is_not_a_tandem_answers_as_usual() {
    // An OpenAI-compatible server with no verification endpoint.
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|| async {
            axum::Json(json!({
                "id": "x", "object": "chat.completion", "created": 0, "model": QWEN_15B,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "plain answer"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            }))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let up = UpstreamConfig::new("plain", &format!("http://{addr}/v1"), &[QWEN_15B]);
    let device = Dispatcher::builder()
        .local(drafter())
        .cloud(CloudBackend::new(up).unwrap())
        .build()
        .unwrap();
    let device = TestServer::start(device).await;
    let r = post_json(
        &device.url("/v1/chat/completions"),
        &chat("Say hi.", json!({})),
        &[SPECULATIVE],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.text(), "plain answer");
    assert_eq!(
        r.header("x-tandem-speculative"),
        "off: the upstream does not verify drafts (it is not a Tandem)"
    );
}
