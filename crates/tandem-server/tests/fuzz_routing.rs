//! Property test over arbitrary Unicode for everything that reads a prompt
//! on its way through a device Tandem, end to end on loopback: the
//! personal-data detectors (patterns and the recognizer model), the learned
//! router's static table, lexical terms and surface features, the probe's
//! reading of the prompt by the device model's inner block (through
//! llama.cpp's C API), the sample of routed prompts, and the local model
//! answering. Prompts are arbitrary text mixed with chat-template tokens,
//! digits of other scripts, case mappings that change a text's length and
//! planted personal data, in any message and in text parts, streamed or
//! not, one choice or two, with tools or without, through the cascade or
//! not, under every privacy mode.
//!
//! For each request: an answer or a 4xx in OpenAI's error shape (never a
//! 5xx, a panic or a hang); the dry run (`/v1/tandem/route`) says whether
//! the request is read and, where nothing is read and no cascade runs,
//! where it goes and which rule decides; the cascade's verdict names the
//! side that answered; under `strict` and `redact` no planted value reaches
//! the upstream, and an answer from it (an echo of the question as it
//! arrived, in its text or in a tool call's JSON arguments and its
//! reasoning) reaches the client with every replaced value back, byte for
//! byte, in every choice; every body the upstream received is in the
//! egress ledger (an entry before it left and its outcome, both with the
//! body's hash), and nothing else is; the sample gains whole JSON lines, none with a planted value.
//!
//! CI runs a short form; `PROPTEST_CASES=2000 cargo test -p tandem-server
//! --test fuzz_routing` is the long run (the model and the detectors run
//! optimised in the test profile too).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_embed::{StaticEmbedder, TokenClassifier};
use tandem_policy::PolicyConfig;
use tandem_policy::learned::{LearnedScorer, ModelKind, TextView, TrainConfig};
use tandem_router::learned::RouterInput;
use tandem_router::{Dispatcher, ModelRecognizer};
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::{RAMPART, SMOLLM2, TestServer, model_path, shared_engine};
use tandem_train::{Calibration, Example};

/// Values the pattern detectors find wherever they stand between spaces;
/// none may leave under `strict` or `redact`.
const PLANTED: &[&str] = &[
    "jane.doe@example.com",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "123-45-6789",
    "AKIAIOSFODNN7EXAMPLE",
    "5500\u{a0}0000\u{a0}0000\u{a0}0004",
    "owner%40corp.example",
    // A secret with a backslash: restored into JSON (tool-call arguments),
    // it must be escaped.
    "api_key=Qz8\\Lp3xV9rT",
];

/// Pieces that trip tokenizers, templates, case folding and number
/// readers.
const FRAGMENTS: &[&str] = &[
    "<|im_start|>",
    "<|im_end|>",
    "<|endoftext|>",
    "<s>",
    "</s>",
    "[INST]",
    "\nAnswer:",
    "<tool_call>",
    "What is 481 times 67?",
    "Hi there, nice to meet you!",
    "NOT",
    "EXCEPT",
    "Statement 1 |",
    "٣٤٥",
    "१२३",
    "𝟙𝟚𝟛",
    "İ",
    "ẞ",
    "ΣΑΣ",
    "ﬁ",
    "\u{0}",
    "\u{200d}",
    "\u{202e}",
    "\u{feff}",
    "\u{301}",
    "\r\n",
    "🇩🇪",
    "👩‍👩‍👧",
    "日本語",
    "?1",
    "[EMAIL_1]",
    "{\"a\": [1, 2]}",
];

/// The device model's block the probe reads.
const BLOCK: u32 = 6;

struct Rig {
    rt: tokio::runtime::Runtime,
    server: TestServer,
    capture: CaptureUpstream,
    dispatcher: Arc<Dispatcher>,
    ledger: PathBuf,
    sample: PathBuf,
    _dir: tempfile::TempDir,
}

fn prompts(n: usize) -> Vec<(String, bool)> {
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                (
                    format!("What is {} times {}?", 100 + 7 * i, 13 + i % 17),
                    true,
                )
            } else {
                (format!("Hello! How are you today, friend {i}?"), false)
            }
        })
        .collect()
}

/// A device Tandem whose router reads every prompt with the device
/// model's block `BLOCK` and embeds it with a static table, with the
/// recognizer, a sample of every routed prompt and a capturing upstream.
fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let engine = shared_engine(SMOLLM2, 1024, 4);
        let e = tandem_testkit::shared_embedder();
        let dim = e.dim();
        let train = prompts(tandem_train::PROBE_MIN_PROMPTS + 20);
        // A table of the pieces the training prompts use (the others
        // weigh nothing): arbitrary text still goes through the tokenizer.
        let vocab = e.tokenizer().get_vocab_size(true);
        let mut table = vec![0f32; vocab * dim];
        let mut weights = vec![0f32; vocab];
        for (t, _) in &train {
            for id in tandem_embed::pieces(e.tokenizer(), t).unwrap() {
                let i = id as usize;
                table[i * dim..(i + 1) * dim].copy_from_slice(&e.token_vector(id));
                weights[i] = 1.0;
            }
        }
        let table = Arc::new(
            StaticEmbedder::new(e.tokenizer().clone(), dim, &table, &weights, vec![0.0; dim])
                .unwrap(),
        );
        let data: Vec<Example> = rt.block_on(async {
            let mut data = Vec::new();
            for (i, (text, hard)) in train.iter().enumerate() {
                let reading = engine.read_prompt(text, Some(BLOCK)).await.unwrap();
                data.push(Example {
                    id: format!("p{i}"),
                    source: "s".into(),
                    topic: "s".into(),
                    embedding: table.embed_one(text).unwrap(),
                    text: TextView {
                        reading: Some(reading),
                        ..TextView::of(text)
                    },
                    weak: !hard,
                    strong: true,
                });
            }
            data
        });
        let cfg = TrainConfig {
            kind: ModelKind::All,
            k: 4,
            probe_lambda: 100.0,
            read_band: 1.0,
            lexical_from: 50,
            lexical_min_prompts: 2,
            ..TrainConfig::default()
        };
        let mut model = tandem_train::train(&data, cfg, Calibration::CloudShare(0.5));
        assert!(model.lexical.is_some(), "the lexical part is fitted");
        let probe = model.probe.as_mut().expect("a probe");
        probe.model = engine.model_id().to_owned();
        probe.layer = Some(BLOCK);

        let dir = tempfile::tempdir().unwrap();
        let sample = dir.path().join("traffic.prompts.jsonl");
        let ledger = dir.path().join("ledger.jsonl");
        let (server, capture, dispatcher) = rt.block_on(async {
            let capture = CaptureUpstream::start(None, Mode::Echo).await;
            let mut u = UpstreamConfig::new("cloud", &capture.base_url(), &["big-model"]);
            u.max_retries = 0;
            let cfg = tandem_policy::sample::SampleConfig {
                enabled: true,
                rate: 1.0,
                ..Default::default()
            };
            let kept =
                tandem_router::sample::TrafficSample::open(cfg, sample.clone()).expect("sample");
            let classifier = {
                let dir = model_path(RAMPART);
                Arc::new(TokenClassifier::load(dir.parent().unwrap()).expect("recognizer"))
            };
            let dispatcher = Dispatcher::builder()
                .local(shared_engine(SMOLLM2, 1024, 4))
                .cloud(CloudBackend::new(u).unwrap())
                .policy(PolicyConfig::default())
                .recognizer(Arc::new(ModelRecognizer(classifier)))
                .sample(Arc::new(kept))
                .ledger(
                    tandem_ledger::Ledger::open(
                        &ledger,
                        tandem_ledger::LedgerKey::from_secret([5; 32]),
                    )
                    .unwrap(),
                )
                .build()
                .unwrap();
            dispatcher.set_scorer(
                Arc::new(LearnedScorer::new(model, dim).unwrap()),
                RouterInput::Static(table),
            );
            (
                TestServer::start(dispatcher.clone()).await,
                capture,
                dispatcher,
            )
        });
        Rig {
            rt,
            server,
            capture,
            dispatcher,
            ledger,
            sample,
            _dir: dir,
        }
    })
}

/// The ledger's entries so far, written out first.
fn ledger_entries(r: &Rig) -> Vec<tandem_ledger::Entry> {
    if let Some(l) = r.dispatcher.ledger() {
        l.flush();
    }
    tandem_ledger::read(&r.ledger).expect("a readable ledger")
}

/// A piece of a prompt.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>().prop_map(|s| s.chars().take(24).collect()),
        3 => "\\PC{0,24}",
        3 => proptest::sample::select(FRAGMENTS).prop_map(str::to_owned),
        2 => proptest::sample::select(PLANTED).prop_map(|p| format!(" {p} ")),
        1 => ("[a-z]{1,8} ", 1usize..400).prop_map(|(w, n)| w.repeat(n)),
    ]
}

fn text() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 1..8).prop_map(|p| p.concat())
}

/// A message's content: a string, or text parts cut at `cut` (a share of
/// its characters; a value may straddle the cut).
fn content(t: String, parts: bool, cut: f64) -> Value {
    if parts {
        let n = t.chars().count();
        let at = t
            .char_indices()
            .nth((n as f64 * cut) as usize)
            .map_or(t.len(), |c| c.0);
        let (a, b) = t.split_at(at);
        json!([{"type": "text", "text": a}, {"type": "text", "text": b}])
    } else {
        json!(t)
    }
}

/// Every message's text as the model reads it: its content, or its text
/// parts joined.
fn texts_of(sent: &Value) -> String {
    let mut all = String::new();
    for m in sent["messages"].as_array().into_iter().flatten() {
        match &m["content"] {
            Value::String(s) => all.push_str(s),
            Value::Array(parts) => {
                for p in parts {
                    all.push_str(p["text"].as_str().unwrap_or_default());
                }
            }
            _ => {}
        }
        all.push('\n');
    }
    all
}

/// What an answer says, streamed or not.
struct Said {
    content: String,
    arguments: String,
    reasoning: String,
}

/// Each of the `n` choices' text, first tool call's arguments and
/// reasoning; an error if it is not a well-formed answer with `n` choices.
fn answer_of(raw: &str, stream: bool, n: usize) -> Result<Vec<Said>, String> {
    let mut said: Vec<Said> = (0..n)
        .map(|_| Said {
            content: String::new(),
            arguments: String::new(),
            reasoning: String::new(),
        })
        .collect();
    let mut add = |c: &Value, m: &Value| -> Result<(), String> {
        let i = c["index"].as_u64().unwrap_or(0) as usize;
        let s = said
            .get_mut(i)
            .ok_or_else(|| format!("choice {i} of {n}: {raw}"))?;
        s.content += m["content"].as_str().unwrap_or_default();
        s.reasoning += m["reasoning_content"].as_str().unwrap_or_default();
        s.arguments += m["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap_or_default();
        Ok(())
    };
    if stream {
        if !raw.trim_end().ends_with("data: [DONE]") {
            return Err(format!("a stream without its end: {raw}"));
        }
        for l in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if l == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
            for c in v["choices"].as_array().into_iter().flatten() {
                add(c, &c["delta"])?;
            }
        }
    } else {
        let v: Value = serde_json::from_str(raw).map_err(|e| format!("{e}: {raw}"))?;
        let choices = v["choices"].as_array().cloned().unwrap_or_default();
        if choices.len() != n {
            return Err(format!("{} choices of {n}: {raw}", choices.len()));
        }
        for c in &choices {
            let m = &c["message"];
            if !m["content"].is_string() && !m["tool_calls"].is_array() {
                return Err(format!("no answer: {raw}"));
            }
            add(c, m)?;
        }
    }
    Ok(said)
}

fn error_shaped(v: &Value) -> bool {
    v["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty())
        && v["error"]["type"].is_string()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: tandem_testkit::proptest_cases(48),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_prompt_is_routed_read_and_answered_or_refused_cleanly(
        system in proptest::option::of(text()),
        earlier in proptest::option::of((text(), text())),
        called in proptest::option::of(text()),
        tool in any::<bool>(),
        cascade in any::<bool>(),
        max_tokens in proptest::sample::select(&[2u32, 12][..]),
        user in text(),
        parts in any::<bool>(),
        cut in 0.0f64..1.0,
        stream in any::<bool>(),
        n in prop_oneof![3 => Just(1usize), 1 => Just(2usize)],
        privacy in proptest::sample::select(&["strict", "redact", "off", ""][..]),
    ) {
        let r = rig();
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(json!({"role": "system", "content": s}));
        }
        if let Some((u, a)) = earlier {
            messages.push(json!({"role": "user", "content": u}));
            messages.push(json!({"role": "assistant", "content": a}));
        }
        if let Some(c) = called {
            let arguments = json!({"text": c}).to_string();
            messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "note", "arguments": arguments}}]}));
            messages.push(json!({"role": "tool", "tool_call_id": "c1", "content": c}));
        }
        messages.push(json!({"role": "user", "content": content(user.clone(), parts, cut)}));
        let body = json!({
            "model": "tandem/auto",
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        });
        let mut body = body;
        if n > 1 {
            body["n"] = json!(n);
        }
        if tool {
            body["tools"] = json!([{"type": "function", "function": {"name": "note",
                "parameters": {"type": "object", "properties": {"text": {"type": "string"}}}}}]);
        }
        r.capture.set_mode(if tool { Mode::EchoTool } else { Mode::Echo });
        let mut headers: Vec<(&str, &str)> = if privacy.is_empty() {
            vec![]
        } else {
            vec![("x-tandem-privacy", privacy)]
        };
        if cascade {
            headers.push(("x-tandem-mode", "cascade"));
        }
        let before = r.capture.captured().len();
        let ledger_before = ledger_entries(r).len();
        let kept_before = std::fs::metadata(&r.sample).map_or(0, |m| m.len() as usize);
        let (dry, answer) = r.rt.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap();
            let send = |path: &str| {
                let mut q = client.post(r.server.url(path)).json(&body);
                for (k, v) in &headers {
                    q = q.header(*k, *v);
                }
                q.send()
            };
            let dry = send("/v1/tandem/route").await.expect("the dry run answers");
            let dry = (dry.status().as_u16(), dry.json::<Value>().await.unwrap_or(Value::Null));
            let a = send("/v1/chat/completions").await.expect("the request answers");
            let status = a.status().as_u16();
            let h = a.headers().clone();
            let raw = a.text().await.expect("a whole body");
            (dry, (status, h, raw))
        });
        let (status, h, raw) = answer;
        let header = |n: &str| h.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();

        // An answer, or a refusal in OpenAI's shape; never a server error.
        prop_assert!(status < 500, "{status}: {raw}");
        if status != 200 {
            let v: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
            prop_assert!((400..500).contains(&status) && error_shaped(&v), "{status}: {raw}");
            prop_assert!(dry.0 != 200 || dry.1["refusal"].is_string() || error_shaped(&dry.1),
                "refused, yet the dry run saw no refusal: {} {raw}", dry.1);
        } else {
            let backend = header("x-tandem-backend");
            prop_assert!(backend == "local" || backend == "cloud:cloud", "{backend}");
            prop_assert!(!header("x-tandem-decided-by").is_empty());
            let choices = match answer_of(&raw, stream, n) {
                Ok(a) => a,
                Err(e) => return Err(TestCaseError::fail(e)),
            };
            // The upstream echoes the question as it received it (in its
            // text, or in a tool call's arguments and its reasoning):
            // whatever was replaced on the way out comes back as written,
            // in every choice. Choice i past the first says "ECHO i: " when
            // it came with the first, "ECHO: " when it was asked alone (as
            // it is once the upstream was seen ignoring `n`, which the tool
            // echo does).
            let cloud = backend == "cloud:cloud";
            for (i, got) in choices.into_iter().enumerate().filter(|_| cloud) {
                if tool {
                    let args: Value = serde_json::from_str(&got.arguments)
                        .map_err(|e| TestCaseError::fail(format!("{e}: {}", got.arguments)))?;
                    prop_assert_eq!(args["text"].as_str(), Some(user.as_str()), "{}", got.arguments);
                    prop_assert_eq!(got.reasoning, format!("Looking up: {user}"));
                } else {
                    let alone = format!("ECHO: {user}");
                    let with_first = format!("ECHO {i}: {user}");
                    prop_assert!(got.content == alone || (i > 0 && got.content == with_first),
                        "choice {i}: {:?}", got.content);
                }
            }
            // The dry run says what the request does: read or not, and
            // where a request that is not read goes and why.
            prop_assert_eq!(dry.0, 200, "{}", dry.1);
            let said = dry.1["reading"].as_str().unwrap_or_default().to_owned();
            let read = !header("x-tandem-router-reading").is_empty();
            prop_assert_eq!(read, said.starts_with("would be read"), "{}", said);
            // Under the cascade, the answer kept says where it came from.
            let verdict = header("x-tandem-cascade");
            if verdict.starts_with("kept") {
                prop_assert_eq!(backend.as_str(), "local", "{}", verdict);
            } else if verdict.starts_with("escalated") {
                prop_assert_eq!(backend.as_str(), "cloud:cloud", "{}", verdict);
            }
            if !read && !cascade {
                let by = header("x-tandem-decided-by");
                prop_assert_eq!(dry.1["backend"].as_str(), Some(backend.as_str()), "{}", dry.1);
                prop_assert_eq!(dry.1["decision"]["decided_by"].as_str(), Some(by.as_str()), "{}", dry.1);
            }
        }

        // Nothing planted leaves under a privacy mode.
        if privacy == "strict" || privacy == "redact" {
            for c in r.capture.captured().iter().skip(before) {
                let sent = String::from_utf8_lossy(&c.body).into_owned()
                    + &c.json().to_string()
                    + &texts_of(&c.json());
                for p in PLANTED {
                    prop_assert!(!sent.contains(p), "{p} left under {privacy}: {sent}");
                }
            }
        }
        // What left is in the ledger: each request body the upstream got
        // has an outcome entry with its hash, after an entry written before
        // it left; and nothing else is there.
        let sent: Vec<String> = {
            let mut v: Vec<String> = r.capture.captured().iter().skip(before)
                .filter(|c| c.path.ends_with("/chat/completions"))
                .map(|c| tandem_ledger::sha256_hex(&c.body))
                .collect();
            v.sort();
            v
        };
        let mut entries = ledger_entries(r);
        for _ in 0..40 {
            let new = entries.get(ledger_before..).unwrap_or_default();
            let open = new.iter().filter(|e| e.egress.outcome == tandem_ledger::SENDING).count();
            if 2 * open == new.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            entries = ledger_entries(r);
        }
        let new = entries.get(ledger_before..).unwrap_or_default();
        // A field of the entries written before a request left (`true`)
        // or with its outcome, sorted.
        let field = |sending: bool, f: fn(&tandem_ledger::Egress) -> &String| {
            let mut v: Vec<String> = new.iter()
                .filter(|e| (e.egress.outcome == tandem_ledger::SENDING) == sending)
                .map(|e| f(&e.egress).clone())
                .collect();
            v.sort();
            v
        };
        prop_assert_eq!(&field(false, |e| &e.payload_sha256), &sent,
            "outcome entries against what the upstream got");
        // The entry written before a request leaves already names the body
        // that then left, and pairs with an outcome by request id.
        prop_assert_eq!(&field(true, |e| &e.payload_sha256), &sent,
            "sending entries against what the upstream got");
        let ids = |sending| field(sending, |e| &e.request_id);
        prop_assert_eq!(ids(true), ids(false), "each sending entry has its outcome");
        let lines = std::fs::read_to_string(&r.ledger).unwrap_or_default();
        for p in PLANTED {
            prop_assert!(!lines.contains(p), "{p} in the ledger");
        }

        // The sample gained whole lines, none with a planted value.
        let kept = std::fs::read(&r.sample).unwrap_or_default();
        let kept = String::from_utf8_lossy(kept.get(kept_before..).unwrap_or_default());
        prop_assert!(kept.is_empty() || kept.ends_with('\n'), "{kept}");
        for l in kept.lines() {
            let v: Value = serde_json::from_str(l).expect("a whole JSON line");
            let p = v["prompt"].as_str().expect("a prompt");
            for planted in PLANTED {
                prop_assert!(!p.contains(planted), "{planted} was kept: {p}");
            }
        }
    }
}
