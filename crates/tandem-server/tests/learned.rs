//! The learned side of routing, end to end on loopback: `/v1/embeddings`,
//! the learned router as a policy signal, the cascade and the semantic
//! cache. The device runs SmolLM2 and MiniLM; the "cloud" is a capturing
//! upstream that echoes the question, so every byte that leaves is counted.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Value, json};
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_embed::{Embedder, StaticEmbedder, cosine};
use tandem_engine::LocalEngine;
use tandem_policy::learned::{LearnedScorer, ModelKind, TextView, TrainConfig};
use tandem_policy::{PolicyConfig, Rule};
use tandem_router::Dispatcher;
use tandem_router::cache::{CacheConfig, SemanticCache};
use tandem_router::learned::RouterInput;
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::{MINILM, Reply, SMOLLM2, TestServer, post_json, shared_engine, sse_text};
use tandem_train::{Calibration, Example};

fn device_engine() -> LocalEngine {
    shared_engine(SMOLLM2, 1024, 4)
}

fn embedder() -> Arc<Embedder> {
    tandem_testkit::shared_embedder()
}

/// Cloud first, so only the feature under test keeps a request home.
fn cloud_first() -> PolicyConfig {
    let mut p = PolicyConfig::default();
    p.rules.retain(|r| *r != Rule::PreferLocal);
    p.rules.push(Rule::PreferCloud);
    p
}

struct Rig {
    server: TestServer,
    capture: CaptureUpstream,
    dispatcher: Arc<Dispatcher>,
}

async fn rig(policy: PolicyConfig, cache: Option<&Path>, cloud_url: Option<String>) -> Rig {
    rig_with(policy, cache, cloud_url, true).await
}

async fn rig_with(
    policy: PolicyConfig,
    cache: Option<&Path>,
    cloud_url: Option<String>,
    with_embedder: bool,
) -> Rig {
    let capture = CaptureUpstream::start(None, Mode::Echo).await;
    let mut u = UpstreamConfig::new(
        "cloud",
        &cloud_url.unwrap_or_else(|| capture.base_url()),
        &["big-model"],
    );
    u.max_retries = 0;
    u.connect_timeout_ms = 500;
    let mut b = Dispatcher::builder()
        .local(device_engine())
        .cloud(CloudBackend::new(u).unwrap())
        .policy(policy);
    if with_embedder {
        b = b.embedder(MINILM, embedder());
    }
    if let Some(path) = cache {
        let c = SemanticCache::open(CacheConfig::default(), Some(path.to_path_buf())).unwrap();
        b = b.cache(Arc::new(c));
    }
    let dispatcher = b.build().unwrap();
    Rig {
        server: TestServer::start(dispatcher.clone()).await,
        capture,
        dispatcher,
    }
}

impl Rig {
    async fn chat(&self, prompt: &str, headers: &[(&str, &str)]) -> Reply {
        let body = json!({
            "model": "tandem/auto",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 16,
            "temperature": 0,
        });
        post_json(&self.server.url("/v1/chat/completions"), &body, headers).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = post_json(&self.server.url(path), &body, &[]).await;
        (r.status, r.body)
    }

    async fn metrics(&self) -> String {
        reqwest::get(self.server.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn embeddings_endpoint_matches_the_embedder_and_rejects_bad_input() {
    let r = rig(PolicyConfig::default(), None, None).await;
    let texts = ["The cat sat on the mat.", "A feline rested on the rug."];
    let (status, body) = r
        .post("/v1/embeddings", json!({"model": MINILM, "input": texts}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 10);
    let v: Vec<f32> = serde_json::from_value(body["data"][1]["embedding"].clone()).unwrap();
    assert_eq!(v.len(), 384);
    let direct = embedder().embed_one(texts[1]).unwrap();
    assert!(cosine(&v, &direct) > 0.9999);

    // base64: the same floats, little-endian.
    let (_, b64) = r
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": texts[1], "encoding_format": "base64"}),
        )
        .await;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let back: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(cosine(&back, &direct) > 0.9999);

    for (bad, status) in [
        (json!({"model": MINILM, "input": []}), 400),
        (json!({"model": MINILM, "input": ["ok", ""]}), 400),
        (json!({"model": MINILM, "input": [1, 2, 3]}), 400),
        (
            json!({"model": MINILM, "input": "x", "dimensions": 64}),
            400,
        ),
        (
            json!({"model": MINILM, "input": "x", "encoding_format": "int8"}),
            400,
        ),
        (json!({"model": "no-such-model", "input": "x"}), 404),
        (json!({"input": "x"}), 400),
        // OpenAI's 2,048 inputs: more than this server embeds at once.
        (
            json!({"model": MINILM, "input": vec!["a short text"; 2048]}),
            400,
        ),
        // Few inputs, each past the embedder's window: too many tokens.
        (
            json!({"model": MINILM, "input": vec!["many words ".repeat(300); 100]}),
            400,
        ),
    ] {
        let (s, body) = r.post("/v1/embeddings", bad.clone()).await;
        let shown: String = bad.to_string().chars().take(120).collect();
        assert_eq!(s, status, "{shown} -> {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Still serving.
    let (s, _) = r
        .post(
            "/v1/embeddings",
            json!({"model": MINILM, "input": "still here"}),
        )
        .await;
    assert_eq!(s, 200);
    let models = reqwest::get(r.server.url("/v1/models"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(models.contains(MINILM));
}

const HARD: &[&str] = &[
    "What is 347 times 29?",
    "Compute 12.5% of 8,640 and add 391.",
    "A train leaves at 3:40 pm and travels 287 km at 82 km/h. When does it arrive?",
    "Solve for x: 7x - 19 = 4x + 38.",
    "What is the remainder when 98,765 is divided by 37?",
    "If 6 workers build a wall in 14 days, how long do 4 workers take?",
];
const EASY: &[&str] = &[
    "Hello! How are you today?",
    "Say hi to my friend Anna.",
    "Thanks, that was helpful.",
    "Good morning!",
    "Tell me a nice greeting for a birthday card.",
    "What's up?",
];

/// A router trained on `embed`'s vectors: arithmetic is hard for the local
/// model, small talk is easy.
fn train_toy(embed: impl Fn(&str) -> Vec<f32>, dim: usize) -> LearnedScorer {
    let mut data = Vec::new();
    for (i, (text, is_hard)) in HARD
        .iter()
        .map(|t| (t, true))
        .chain(EASY.iter().map(|t| (t, false)))
        .enumerate()
    {
        data.push(Example {
            id: format!("p{i}"),
            source: if is_hard { "math" } else { "chat" }.into(),
            topic: if is_hard { "math" } else { "chat" }.into(),
            embedding: embed(text),
            text: TextView::of(text),
            weak: !is_hard,
            strong: true,
        });
    }
    let cfg = TrainConfig {
        kind: ModelKind::All,
        k: 4,
        ..TrainConfig::default()
    };
    let model = tandem_train::train(&data, cfg, Calibration::CloudShare(0.5));
    LearnedScorer::new(model, dim).unwrap()
}

/// The toy router on the encoder's vectors.
fn toy_router() -> LearnedScorer {
    let e = embedder();
    train_toy(|t| e.embed_one(t).unwrap(), e.dim())
}

/// The toy router on a static table of MiniLM's piece vectors (the rows
/// of every piece the test's prompts use; the others weigh nothing).
fn toy_static_router(also: &[&str]) -> (LearnedScorer, Arc<StaticEmbedder>) {
    let e = embedder();
    let dim = e.dim();
    let vocab = e.tokenizer().get_vocab_size(true);
    let mut table = vec![0f32; vocab * dim];
    let mut weights = vec![0f32; vocab];
    for t in HARD.iter().chain(EASY).chain(also) {
        for id in tandem_embed::pieces(e.tokenizer(), t).unwrap() {
            let i = id as usize;
            table[i * dim..(i + 1) * dim].copy_from_slice(&e.token_vector(id));
            weights[i] = 1.0;
        }
    }
    let s = Arc::new(
        StaticEmbedder::new(e.tokenizer().clone(), dim, &table, &weights, vec![0.0; dim]).unwrap(),
    );
    let t = s.clone();
    (train_toy(move |x| t.embed_one(x).unwrap(), dim), s)
}

#[tokio::test]
async fn the_router_score_places_requests_and_is_explained() {
    // Local first: only the router's score sends anything out.
    let r = rig(PolicyConfig::default(), None, None).await;
    r.dispatcher
        .set_scorer(Arc::new(toy_router()), RouterInput::Embedder);

    let hard = r.chat("What is 481 times 67?", &[]).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    assert_eq!(hard.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(hard.header("x-tandem-decided-by"), "difficulty");
    assert!(hard.header("x-tandem-difficulty").contains("threshold"));
    assert!(hard.text().starts_with("ECHO: "));

    let easy = r.chat("Hi there, nice to meet you!", &[]).await;
    assert_eq!(easy.header("x-tandem-backend"), "local");
    assert_eq!(easy.header("x-tandem-decided-by"), "difficulty");
    assert!(!easy.text().is_empty());

    // The quality knob: 0 asks for no cloud help at all.
    let cheap = r
        .chat("What is 481 times 67?", &[("x-tandem-quality", "0")])
        .await;
    assert_eq!(cheap.header("x-tandem-backend"), "local");

    // The dry run shows the score.
    let (s, explained) = r
        .post(
            "/v1/tandem/route",
            json!({"messages": [{"role": "user", "content": "What is 481 times 67?"}]}),
        )
        .await;
    assert_eq!(s, 200);
    let d = explained["features"]["difficulty"].as_f64().unwrap();
    let t = explained["features"]["difficulty_threshold"]
        .as_f64()
        .unwrap();
    assert!(d >= t, "{explained}");
    assert_eq!(explained["backend"], "cloud:cloud");
    // Only the hard request left the device.
    assert_eq!(r.capture.captured().len(), 1);
}

#[tokio::test]
async fn a_router_with_a_static_table_needs_no_encoder() {
    // No sentence encoder in the dispatcher: the router reads its own table.
    let asked = ["What is 481 times 67?", "Hi there, nice to meet you!"];
    let r = rig_with(PolicyConfig::default(), None, None, false).await;
    let (scorer, table) = toy_static_router(&asked);
    r.dispatcher
        .set_scorer(Arc::new(scorer), RouterInput::Static(table));

    let hard = r.chat(asked[0], &[]).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    assert_eq!(hard.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(hard.header("x-tandem-decided-by"), "difficulty");
    let easy = r.chat(asked[1], &[]).await;
    assert_eq!(easy.status, 200, "{}", easy.body);
    assert_eq!(easy.header("x-tandem-backend"), "local");
    assert_eq!(easy.header("x-tandem-decided-by"), "difficulty");

    let (s, explained) = r
        .post(
            "/v1/tandem/route",
            json!({"messages": [{"role": "user", "content": asked[0]}]}),
        )
        .await;
    assert_eq!(s, 200);
    assert!(
        explained["features"]["difficulty"].as_f64().is_some(),
        "{explained}"
    );
    assert_eq!(explained["backend"], "cloud:cloud");
    // /v1/embeddings has no encoder to run: the model is not served.
    let (s, body) = r
        .post("/v1/embeddings", json!({"model": MINILM, "input": "x"}))
        .await;
    assert_eq!(s, 404, "{body}");
    assert_eq!(r.capture.captured().len(), 1);
}

#[tokio::test]
async fn cascade_escalates_unsure_answers_and_keeps_sure_ones() {
    // A threshold no answer can pass: every answer is escalated.
    let mut strict = PolicyConfig {
        cascade: true,
        cascade_threshold: 0.0,
        ..PolicyConfig::default()
    };
    let r = rig(strict.clone(), None, None).await;
    let out = r.chat("Name a colour.", &[]).await;
    assert_eq!(out.status, 200, "{}", out.body);
    assert!(
        out.header("x-tandem-cascade").starts_with("escalated"),
        "{:?}",
        out.headers
    );
    assert_eq!(out.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(out.text(), "ECHO: Name a colour.");
    assert_eq!(r.capture.captured().len(), 1);

    // Streaming clients get only the answer that passed: the cloud's.
    let body = json!({
        "model": "tandem/auto", "stream": true, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "Name a fruit."}],
    });
    let sse = reqwest::Client::new()
        .post(r.server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let text = sse_text(&sse);
    assert_eq!(text, "ECHO: Name a fruit.");
    assert!(sse.trim_end().ends_with("data: [DONE]"));
    // Escalated at the end or early (after the first 8 tokens): both.
    let m = r.metrics().await;
    let count = |outcome: &str| -> u64 {
        let key = format!("cascade_answers_total{{outcome=\"{outcome}\"}} ");
        m.lines()
            .find_map(|l| l.split_once(&key).map(|(_, n)| n.trim().parse().unwrap()))
            .unwrap_or(0)
    };
    assert_eq!(count("escalated") + count("escalated_early"), 2, "{m}");

    // A threshold every answer passes: the local answer stands, nothing leaves.
    strict.cascade_threshold = -1000.0;
    let r = rig(strict, None, None).await;
    let out = r.chat("Name a colour.", &[]).await;
    assert!(
        out.header("x-tandem-cascade").starts_with("kept"),
        "{:?}",
        out.headers
    );
    assert_eq!(out.header("x-tandem-backend"), "local");
    assert!(!out.text().starts_with("ECHO"));
    assert!(r.capture.captured().is_empty());

    // Per request, by header, with the policy's cascade off.
    let r = rig(PolicyConfig::default(), None, None).await;
    let plain = r.chat("Name a colour.", &[]).await;
    assert!(plain.header("x-tandem-cascade").is_empty());
    let cascaded = r
        .chat("Name a colour.", &[("x-tandem-mode", "cascade")])
        .await;
    assert!(!cascaded.header("x-tandem-cascade").is_empty());
    let bad = r
        .chat("Name a colour.", &[("x-tandem-mode", "sideways")])
        .await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn cache_serves_paraphrases_within_a_partition_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("answers.jsonl");
    let r = rig(cloud_first(), Some(&path), None).await;

    let first = r.chat("What is the capital of France?", &[]).await;
    assert_eq!(first.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(first.header("x-tandem-cache"), "miss");
    let para = r.chat("What's the capital city of France?", &[]).await;
    assert_eq!(para.status, 200);
    assert_eq!(
        para.header("x-tandem-backend"),
        "cache",
        "{:?}",
        para.headers
    );
    assert!(para.header("x-tandem-cache").starts_with("hit"));
    assert_eq!(para.text(), first.text());
    // The rest of the answer too: its message's other fields and its own.
    assert_eq!(first.body["system_fingerprint"], "fp_echo");
    assert_eq!(para.body["system_fingerprint"], "fp_echo");
    assert_eq!(
        para.body["choices"][0]["message"]["reasoning_content"],
        "Echoing."
    );
    assert_eq!(r.capture.captured().len(), 1);

    // Another question is a miss; another privacy partition is a miss.
    let other = r.chat("How tall is Mount Everest?", &[]).await;
    assert_eq!(other.header("x-tandem-cache"), "miss");
    let off = r
        .chat(
            "What is the capital of France?",
            &[("x-tandem-privacy", "off")],
        )
        .await;
    assert_eq!(off.header("x-tandem-backend"), "cloud:cloud");
    // Asked not to, it neither reads nor writes.
    let skip = r
        .chat(
            "What is the capital of France?",
            &[("x-tandem-cache", "skip")],
        )
        .await;
    assert_eq!(skip.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(skip.header("x-tandem-cache"), "skip");
    // Personal data is never cached.
    let pii = r
        .chat("Write to jane.doe@example.com about France.", &[])
        .await;
    assert_eq!(pii.header("x-tandem-cache"), "skip");
    let pii_off = r
        .chat(
            "Write to jane.doe@example.com about Paris.",
            &[("x-tandem-privacy", "off")],
        )
        .await;
    assert_eq!(pii_off.header("x-tandem-cache"), "skip");
    let metrics = r.metrics().await;
    assert!(
        metrics.contains("cache_lookups_total{outcome=\"hit\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("cache_lookups_total{outcome=\"miss\"} 3"),
        "{metrics}"
    );
    let cached_before = r.dispatcher.cache().unwrap().len();
    assert_eq!(cached_before, 3);
    drop(r);

    // A new process with the cloud unreachable: the answer comes from disk.
    let r = rig(
        cloud_first(),
        Some(&path),
        Some("http://127.0.0.1:9/v1".into()),
    )
    .await;
    let offline = r.chat("Which city is the capital of France?", &[]).await;
    assert_eq!(offline.status, 200, "{}", offline.body);
    assert_eq!(
        offline.header("x-tandem-backend"),
        "cache",
        "{:?}",
        offline.headers
    );
    assert_eq!(offline.text(), first.text());
    assert_eq!(offline.body["system_fingerprint"], "fp_echo");
    // The other partition's entry stayed in its partition.
    let offline_off = r
        .chat(
            "What is the capital of France?",
            &[("x-tandem-privacy", "off")],
        )
        .await;
    assert_eq!(offline_off.header("x-tandem-backend"), "cache");

    // Cleared from the API, it is gone in memory and on disk.
    let resp = reqwest::Client::new()
        .delete(r.server.url("/v1/tandem/cache"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["cleared"], 3);
    assert!(!path.exists());
    let after = r.chat("What is the capital of France?", &[]).await;
    assert_ne!(after.header("x-tandem-backend"), "cache");
}

/// Near twins that want other answers — a number or a "not" apart — embed
/// above the similarity bound; the cache must still tell them apart.
#[tokio::test]
async fn cache_never_answers_a_near_twin_with_other_numbers_or_a_negation() {
    let dir = tempfile::tempdir().unwrap();
    let r = rig(cloud_first(), Some(&dir.path().join("answers.jsonl")), None).await;
    let e = embedder();
    let bound = CacheConfig::default().similarity;
    for (cached, twin) in [
        (
            "A train travels at 83 km per hour for 8 hours. How many kilometres does it travel? Reply with only the final number.",
            "A train travels at 81 km per hour for 8 hours. How many kilometres does it travel? Reply with only the final number.",
        ),
        (
            "If x + 51 = 93, what is x? Reply with only the final number.",
            "If x + 51 = 95, what is x? Reply with only the final number.",
        ),
        (
            "Which of these is not a mammal: whale, bat, shark?",
            "Which of these is a mammal: whale, bat, shark?",
        ),
        (
            "Is it safe to take ibuprofen with alcohol?",
            "Is it safe to take ibuprofen without alcohol?",
        ),
    ] {
        let sim = cosine(&e.embed_one(cached).unwrap(), &e.embed_one(twin).unwrap());
        assert!(
            sim >= bound,
            "{sim} for {twin:?}: the vectors alone would tell them apart"
        );
        let first = r.chat(cached, &[]).await;
        assert_eq!(first.header("x-tandem-cache"), "miss");
        let again = r.chat(cached, &[]).await;
        assert!(
            again.header("x-tandem-cache").starts_with("hit"),
            "{cached:?}"
        );
        let other = r.chat(twin, &[]).await;
        assert_eq!(other.header("x-tandem-cache"), "miss", "{twin:?}");
        assert_eq!(other.header("x-tandem-backend"), "cloud:cloud");
    }
}

/// The cascade teaches the router: a kind of prompt the device keeps failing
/// goes straight to the cloud after a few escalations (no device time
/// spent on it), per partition, never for prompts with personal data, and
/// still after a restart.
#[tokio::test]
async fn cascade_outcomes_teach_the_router_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("outcomes.jsonl");
    let asked = "Good morning! Tell me a nice greeting for a birthday card.";
    let private = "Good morning! Write to anna.schmidt@example.org a nice greeting.";
    // Every local answer fails the cascade's bar.
    let policy = PolicyConfig {
        cascade: true,
        cascade_threshold: 0.0,
        ..PolicyConfig::default()
    };
    let base = rig_with(policy.clone(), None, None, false).await;
    let memory = Arc::new(
        tandem_router::memory::OutcomeMemory::open(policy.memory.clone(), Some(file.clone()))
            .unwrap(),
    );
    let d = Dispatcher::builder()
        .local(device_engine())
        .cloud_arc(base.dispatcher.clouds()[0].clone())
        .policy(policy.clone())
        .memory(memory.clone())
        .build()
        .unwrap();
    let (scorer, table) = toy_static_router(&[asked, private]);
    d.set_scorer(Arc::new(scorer), RouterInput::Static(table));
    let server = TestServer::start(d).await;
    let chat = |prompt: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let url = server.url("/v1/chat/completions");
        async move {
            let body = json!({
                "model": "tandem/auto", "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": prompt}],
            });
            post_json(&url, &body, &headers).await
        }
    };

    // The router thinks it easy: the device tries, the cascade escalates.
    let first = chat(asked, vec![]).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.header("x-tandem-cascade").starts_with("escalated"));
    let mut tries = 1;
    loop {
        let r = chat(asked, vec![]).await;
        assert_eq!(r.status, 200, "{}", r.body);
        if r.header("x-tandem-cascade").is_empty() {
            // Learned: straight to the cloud, decided by difficulty.
            assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
            assert_eq!(r.header("x-tandem-decided-by"), "difficulty");
            assert!(
                r.header("x-tandem-router-memory")
                    .contains("100% escalated"),
                "{:?}",
                r.headers
            );
            break;
        }
        tries += 1;
        assert!(tries < 10, "the memory never moved the router");
    }
    assert_eq!(memory.len(), tries);
    // The dry run reads the same memory.
    let explained = post_json(
        &server.url("/v1/tandem/route"),
        &json!({"messages": [{"role": "user", "content": asked}]}),
        &[],
    )
    .await;
    assert_eq!(
        explained.body["backend"], "cloud:cloud",
        "{}",
        explained.body
    );
    // Another partition (privacy mode) learned nothing yet.
    let other = chat(asked, vec![("x-tandem-privacy", "off")]).await;
    assert!(
        other.header("x-tandem-cascade").starts_with("escalated"),
        "{:?}",
        other.headers
    );
    assert_eq!(memory.len(), tries + 1);
    // Personal data is never remembered.
    let p = chat(private, vec![("x-tandem-privacy", "redact")]).await;
    assert_eq!(p.status, 200, "{}", p.body);
    assert_eq!(memory.len(), tries + 1);
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), tries + 1);
    assert!(!text.contains("Good morning") && !text.contains("anna"));

    // After a restart the lesson stands.
    server.stop().await;
    let reopened = Arc::new(
        tandem_router::memory::OutcomeMemory::open(policy.memory.clone(), Some(file)).unwrap(),
    );
    assert_eq!(reopened.len(), tries + 1);
    let d = Dispatcher::builder()
        .local(device_engine())
        .cloud_arc(base.dispatcher.clouds()[0].clone())
        .policy(policy)
        .memory(reopened)
        .build()
        .unwrap();
    let (scorer, table) = toy_static_router(&[asked, private]);
    d.set_scorer(Arc::new(scorer), RouterInput::Static(table));
    let server = TestServer::start(d).await;
    let body = json!({
        "model": "tandem/auto", "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": asked}],
    });
    let r = post_json(&server.url("/v1/chat/completions"), &body, &[]).await;
    assert_eq!(r.header("x-tandem-backend"), "cloud:cloud");
    assert!(r.header("x-tandem-cascade").is_empty());
    server.stop().await;
    base.server.stop().await;
}

/// The router's prior moves the cascade's bar: an answer that would be
/// escalated stays when the router found the prompt easy enough.
#[tokio::test]
async fn the_routers_prior_moves_the_cascades_bar() {
    let asked = ["Good morning! Tell me a nice greeting for a birthday card."];
    let bar = |prior: f32| PolicyConfig {
        cascade: true,
        // No answer reaches this on its own.
        cascade_threshold: 0.0,
        cascade_prior: prior,
        ..PolicyConfig::default()
    };
    for (prior, kept) in [(0.0, false), (1000.0, true)] {
        let r = rig_with(bar(prior), None, None, false).await;
        let (scorer, table) = toy_static_router(&asked);
        r.dispatcher
            .set_scorer(Arc::new(scorer), RouterInput::Static(table));
        let out = r.chat(asked[0], &[]).await;
        assert_eq!(out.status, 200, "{}", out.body);
        let cascade = out.header("x-tandem-cascade");
        assert_eq!(
            cascade.starts_with("kept"),
            kept,
            "prior {prior}: {cascade}"
        );
        assert_eq!(r.capture.captured().is_empty(), kept);
        r.server.stop().await;
    }
}

/// Under a cloud share, the router and the cascade send out no more than
/// that share of the last requests, whatever the thresholds say: the
/// configured ones decide only while it warms up (here the cascade's lets
/// no answer stay), and then the cut learned from the traffic takes over.
#[tokio::test]
async fn the_cloud_share_holds_whatever_the_thresholds() {
    let asked: Vec<&str> = HARD
        .iter()
        .take(5)
        .chain(EASY.iter().take(5))
        .copied()
        .collect();
    for cascade in [true, false] {
        let policy = PolicyConfig {
            cascade,
            // No answer reaches this, whatever the router's prior says.
            cascade_threshold: 5.0,
            cascade_prior: 2.0,
            cloud_share: Some(0.3),
            cloud_share_window: 10,
            ..PolicyConfig::default()
        };
        let r = rig_with(policy, None, None, false).await;
        let (scorer, table) = toy_static_router(&asked);
        r.dispatcher
            .set_scorer(Arc::new(scorer), RouterInput::Static(table));
        let start = r.dispatcher.cloud_share();
        assert_eq!(start.map(|s| (s.share, s.cut)), Some((0.3f32 as f64, None)));
        let mut out = Vec::new();
        for _ in 0..5 {
            let mut n = 0;
            for p in &asked {
                let reply = r.chat(p, &[]).await;
                assert_eq!(reply.status, 200, "{}", reply.body);
                n += usize::from(reply.header("x-tandem-backend") != "local");
            }
            out.push(n);
        }
        let what = if cascade { "cascade" } else { "router" };
        // Warming up: the cascade's threshold sends all out, the router's
        // (calibrated for half) the arithmetic.
        assert_eq!(out[0], if cascade { 10 } else { 5 }, "{what}: {out:?}");
        // Then three in ten over the rounds after it, and not none. (Just
        // after the warm-up, the window is over its share, so the hold
        // aims lower for a while, and then evens out.)
        let after: usize = out[1..].iter().sum();
        assert!(
            (4..=12).contains(&after) && out[1..].iter().all(|&n| n <= 5),
            "{what}: {out:?}"
        );
        assert!(r.dispatcher.cloud_share().is_some_and(|s| s.cut.is_some()));
        // The dry run shows it, and the threshold the router is held to.
        let (s, explained) = r
            .post(
                "/v1/tandem/route",
                json!({"messages": [{"role": "user", "content": HARD[0]}]}),
            )
            .await;
        assert_eq!(s, 200);
        let held = &explained["cloud_share"];
        assert_eq!(held["requests"], 10, "{explained}");
        let cut = held["cut"].as_f64().unwrap_or(f64::NAN);
        let weight = if cascade { 2.0 } else { 1.0 };
        let t = explained["features"]["difficulty_threshold"]
            .as_f64()
            .unwrap_or(f64::NAN);
        assert!((t - cut / weight).abs() < 1e-5, "{explained}");
        // Operators see the share held over the window.
        let m = r.metrics().await;
        let held: f64 = m
            .lines()
            .find_map(|l| l.strip_prefix("tandem_cloud_share_held "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(f64::NAN);
        let last: usize = out[out.len() - 1];
        assert_eq!(held, last as f64 / 10.0, "{m}");
        let captured = r.capture.captured();
        assert_eq!(captured.len(), out.iter().sum::<usize>());
        // By the router alone, what goes out is what it scores hardest.
        if !cascade {
            for c in &captured {
                let body = String::from_utf8_lossy(&c.body);
                assert!(HARD.iter().any(|h| body.contains(h)), "{body}");
            }
        }
        r.server.stop().await;
    }
}

/// Arithmetic (hard for the device) and small talk (easy) in many wordings.
fn many_wordings(n: usize) -> Vec<(String, bool)> {
    const HELLO: [&str; 4] = ["Hello!", "Hi!", "Good morning!", "Hey there."];
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                (
                    format!("What is {} times {}?", 100 + 7 * i, 13 + i % 17),
                    true,
                )
            } else {
                (
                    format!("{} How are you today, friend {i}?", HELLO[(i / 2) % 4]),
                    false,
                )
            }
        })
        .collect()
}

/// The device model's block the probe below reads.
const BLOCK: u32 = 6;

#[tokio::test]
async fn a_router_with_a_probe_reads_each_prompt_with_the_device_model() {
    let engine = device_engine();
    let e = embedder();
    let mut data = Vec::new();
    for (i, (text, hard)) in many_wordings(tandem_train::PROBE_MIN_PROMPTS + 20)
        .into_iter()
        .enumerate()
    {
        // The same reading `tandem router read --layer` takes.
        let reading = engine.read_prompt(&text, Some(BLOCK)).await.unwrap();
        assert_eq!(Some(reading.len()), engine.reading_width(Some(BLOCK)));
        data.push(Example {
            id: format!("p{i}"),
            source: "s".into(),
            topic: "s".into(),
            embedding: e.embed_one(&text).unwrap(),
            text: TextView {
                reading: Some(reading),
                ..TextView::of(&text)
            },
            weak: !hard,
            strong: true,
        });
    }
    // Every request read first; the band is looked at below.
    let cfg = TrainConfig {
        kind: ModelKind::Ensemble,
        probe_lambda: 100.0,
        read_band: 1.0,
        ..TrainConfig::default()
    };
    let mut model = tandem_train::train(&data, cfg, Calibration::CloudShare(0.5));
    let probe = model.probe.as_mut().expect("a probe");
    probe.model = engine.model_id().to_owned();
    probe.layer = Some(BLOCK);

    let r = rig(PolicyConfig::default(), None, None).await;
    let scorer = |m| Arc::new(LearnedScorer::new(m, e.dim()).unwrap());
    r.dispatcher
        .set_scorer(scorer(model.clone()), RouterInput::Embedder);
    let hard = r.chat("What is 481 times 67?", &[]).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    assert_eq!(hard.header("x-tandem-backend"), "cloud:cloud");
    assert_eq!(hard.header("x-tandem-decided-by"), "difficulty");
    let read = hard.header("x-tandem-router-reading");
    assert!(
        read.starts_with(&format!("{} (block {BLOCK}); ", engine.model_id()))
            && read.ends_with(" ms"),
        "{read}"
    );
    let easy = r.chat("Hi there, nice to meet you!", &[]).await;
    assert_eq!(easy.status, 200, "{}", easy.body);
    assert_eq!(easy.header("x-tandem-backend"), "local");
    assert!(!easy.header("x-tandem-router-reading").is_empty());
    assert!(!easy.text().is_empty());
    // The dry run runs no model; it says the request would be read.
    async fn explain(r: &Rig) -> Value {
        let (s, v) = r
            .post(
                "/v1/tandem/route",
                json!({"messages": [{"role": "user", "content": "What is 481 times 67?"}]}),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        v
    }
    let explained = explain(&r).await;
    let said = explained["reading"].as_str().unwrap_or_default();
    assert!(
        said.starts_with(&format!("would be read by {}", engine.model_id())),
        "{explained}"
    );

    // A reading that cannot move a decision is not taken: with no reach,
    // no request is read, and each is decided as without a probe.
    let mut blunt = model.clone();
    blunt.probe.as_mut().unwrap().reach = 0.0;
    r.dispatcher
        .set_scorer(scorer(blunt), RouterInput::Embedder);
    for (text, side) in [
        ("What is 481 times 67?", "cloud:cloud"),
        ("Hi there, nice to meet you!", "local"),
    ] {
        let a = r.chat(text, &[]).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header("x-tandem-router-reading"), "", "{text}");
        assert_eq!(a.header("x-tandem-backend"), side, "{text}");
    }
    let explained = explain(&r).await;
    let said = explained["reading"].as_str().unwrap_or_default();
    assert!(
        said.starts_with("not read: the decision is the same"),
        "{explained}"
    );

    // Nor where another rule decides whatever the difficulty: personal
    // data under strict privacy stays on the device unread, even by the
    // probe that reads every prompt.
    r.dispatcher
        .set_scorer(scorer(model.clone()), RouterInput::Embedder);
    let private = r
        .chat(
            "What is 481 times 67? Send it to jane.doe@example.com",
            &[("x-tandem-privacy", "strict")],
        )
        .await;
    assert_eq!(private.status, 200, "{}", private.body);
    assert_eq!(private.header("x-tandem-backend"), "local");
    assert_eq!(private.header("x-tandem-router-reading"), "");

    // A probe fitted on readings of another width (another layer, another
    // build): the device's readings mean nothing to it, none is taken.
    let mut narrow = model.clone();
    narrow.probe.as_mut().unwrap().weights.truncate(16);
    r.dispatcher
        .set_scorer(scorer(narrow), RouterInput::Embedder);
    let hard = r.chat("What is 481 times 67?", &[]).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    assert_eq!(hard.header("x-tandem-router-reading"), "");
    assert_eq!(hard.header("x-tandem-backend"), "cloud:cloud");
    let explained = explain(&r).await;
    let said = explained["reading"].as_str().unwrap_or_default();
    assert!(said.starts_with("not read: no local model"), "{explained}");

    // A probe of a block the device's model does not have: nothing is read.
    let mut deep = model.clone();
    deep.probe.as_mut().unwrap().layer = Some(999);
    r.dispatcher.set_scorer(scorer(deep), RouterInput::Embedder);
    let hard = r.chat("What is 481 times 67?", &[]).await;
    assert_eq!(hard.header("x-tandem-router-reading"), "");
    assert_eq!(hard.header("x-tandem-backend"), "cloud:cloud");
    let explained = explain(&r).await;
    let said = explained["reading"].as_str().unwrap_or_default();
    assert!(said.contains("(block 999) at width"), "{explained}");

    // The last layer's reading (a probe without a block) is taken on its
    // own thread, as wide as a block's here: the request is read there.
    let mut last = model.clone();
    last.probe.as_mut().unwrap().layer = None;
    r.dispatcher.set_scorer(scorer(last), RouterInput::Embedder);
    let hard = r.chat("What is 481 times 67?", &[]).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    let read = hard.header("x-tandem-router-reading");
    assert!(
        read.starts_with(&format!("{}; ", engine.model_id())),
        "{read}"
    );
    let last_to_cloud = hard.header("x-tandem-backend") == "cloud:cloud";

    // Under a held cloud share, the cut learned from the traffic is the
    // threshold in force, mostly far from the one the router was
    // calibrated at (half the prompts out): prompts are read near the cut,
    // not near the calibrated threshold, and not at all while the hold lets
    // nothing out.
    let reach = 0.1;
    let mut narrow_band = model.clone();
    narrow_band.probe.as_mut().unwrap().reach = reach;
    let held = rig(
        PolicyConfig {
            cloud_share: Some(0.3),
            cloud_share_window: 10,
            ..PolicyConfig::default()
        },
        None,
        None,
    )
    .await;
    held.dispatcher
        .set_scorer(scorer(narrow_band), RouterInput::Embedder);
    let prompts = many_wordings(40);
    for (text, _) in &prompts[..10] {
        assert_eq!(held.chat(text, &[]).await.status, 200);
    }
    let calibrated = f64::from(model.threshold);
    let (mut read_near_cut, mut unread_near_calibrated, mut shut) = (0, 0, 0);
    for (text, _) in &prompts[10..] {
        let (s, explained) = held
            .post(
                "/v1/tandem/route",
                json!({"messages": [{"role": "user", "content": text}]}),
            )
            .await;
        assert_eq!(s, 200, "{explained}");
        let f = &explained["features"];
        let d = f["difficulty"].as_f64().unwrap_or(f64::NAN);
        // An infinite cut (JSON's null): nothing may go out just now.
        let t = f["difficulty_threshold"].as_f64().unwrap_or(f64::INFINITY);
        let said = explained["reading"].as_str().unwrap_or_default();
        let a = held.chat(text, &[]).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let was_read = !a.header("x-tandem-router-reading").is_empty();
        assert_eq!(
            was_read,
            said.starts_with("would be read"),
            "{text}: {said}"
        );
        if t.is_infinite() {
            assert!(!was_read, "{text}: read with nothing let out");
            shut += 1;
        } else if ((d - t).abs() - f64::from(reach)).abs() > 1e-3 {
            assert_eq!(
                was_read,
                (d - t).abs() <= f64::from(reach),
                "{text}: {d} {t}"
            );
        }
        read_near_cut += usize::from(was_read);
        unread_near_calibrated +=
            usize::from(!was_read && (d - calibrated).abs() <= f64::from(reach));
    }
    assert!(
        read_near_cut > 0 && unread_near_calibrated > 0,
        "{read_near_cut} read near the cut, {unread_near_calibrated} left near the calibrated threshold {calibrated}, {shut} while shut"
    );
    held.server.stop().await;

    // The memory of the cascade's outcomes pulls a prompt's difficulty
    // towards its neighbours' before the band is judged: a prompt the
    // router alone puts within reach of the threshold, whose twins were all
    // escalated, is decided without a reading (it goes out whatever the
    // reading says).
    let memory =
        Arc::new(tandem_router::memory::OutcomeMemory::open(Default::default(), None).unwrap());
    let mut narrow_band = model.clone();
    narrow_band.probe.as_mut().unwrap().reach = reach;
    let remembering = Dispatcher::builder()
        .local(device_engine())
        .cloud_arc(r.dispatcher.clouds()[0].clone())
        .embedder(MINILM, e.clone())
        .memory(memory.clone())
        .build()
        .unwrap();
    remembering.set_scorer(scorer(narrow_band), RouterInput::Embedder);
    let server = TestServer::start(remembering).await;
    let route = |text: String| {
        let url = server.url("/v1/tandem/route");
        async move {
            let r = post_json(
                &url,
                &json!({"messages": [{"role": "user", "content": text}]}),
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.body
        }
    };
    let mut near = None;
    for (text, _) in many_wordings(40) {
        let explained = route(text.clone()).await;
        let f = &explained["features"];
        let (d, t) = (
            f["difficulty"].as_f64().unwrap_or(f64::NAN),
            f["difficulty_threshold"].as_f64().unwrap_or(f64::NAN),
        );
        if (d - t).abs() < 0.5 * f64::from(reach) {
            let said = explained["reading"].as_str().unwrap_or_default();
            assert!(said.starts_with("would be read"), "{explained}");
            near = Some(text);
            break;
        }
    }
    let near = near.expect("a prompt within reach of the threshold");
    let v = e.embed_one(&near).unwrap();
    for _ in 0..16 {
        memory.record("|redact", &v, true);
    }
    let explained = route(near.clone()).await;
    let said = explained["reading"].as_str().unwrap_or_default();
    assert!(said.starts_with("not read"), "{explained}");
    let a = post_json(
        &server.url("/v1/chat/completions"),
        &json!({"model": "tandem/auto", "max_tokens": 2,
                "messages": [{"role": "user", "content": near}]}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        !a.header("x-tandem-router-memory").is_empty(),
        "{:?}",
        a.headers
    );
    assert_eq!(a.header("x-tandem-router-reading"), "");
    assert_eq!(a.header("x-tandem-backend"), "cloud:cloud");
    server.stop().await;

    // A probe of a model this device does not run: nothing is read, the
    // other parts decide.
    model.probe.as_mut().unwrap().model = "another-model".into();
    r.dispatcher
        .set_scorer(scorer(model), RouterInput::Embedder);
    let hard = r.chat("What is 481 times 67?", &[]).await;
    assert_eq!(hard.status, 200, "{}", hard.body);
    assert_eq!(hard.header("x-tandem-router-reading"), "");
    assert_eq!(hard.header("x-tandem-backend"), "cloud:cloud");
    // (One more went out through the same upstream from the memory's rig.)
    assert_eq!(r.capture.captured().len(), 6 + usize::from(last_to_cloud));
}

/// `[router.sample]`: routed prompts kept for `tandem router label`, over
/// HTTP as clients send them. A prompt with personal data is never kept
/// (under any privacy mode), a prompt is kept once, and requests that name
/// a model (not routed) or only ask the dry run leave nothing.
#[tokio::test]
async fn a_sample_of_routed_prompts_is_kept_without_personal_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("traffic.prompts.jsonl");
    let cfg = tandem_policy::sample::SampleConfig {
        enabled: true,
        rate: 1.0,
        ..Default::default()
    };
    let sample =
        Arc::new(tandem_router::sample::TrafficSample::open(cfg.clone(), path.clone()).unwrap());
    // A device alone: no upstream and no cache, yet the prompts are checked
    // for personal data before any is kept.
    let dispatcher = Dispatcher::builder()
        .local(device_engine())
        .sample(sample.clone())
        .build()
        .unwrap();
    let server = TestServer::start(dispatcher).await;
    let send = |model: &str, prompt: &str, privacy: &str| {
        let body = json!({
            "model": model,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": prompt}
            ],
            "max_tokens": 2,
        });
        let url = server.url("/v1/chat/completions");
        let privacy = privacy.to_owned();
        async move { post_json(&url, &body, &[("x-tandem-privacy", &privacy)]).await }
    };
    let private = [
        "Write to Hans Müller, Hauptstraße 5, 10115 Berlin, confirming his appointment.",
        "My email is jane.doe@example.com, what is 17 + 25?",
    ];
    for p in private {
        for mode in ["strict", "redact", "off"] {
            assert_eq!(send("tandem/auto", p, mode).await.status, 200);
        }
    }
    let clean = "Which planet is known as the Red Planet?";
    for _ in 0..2 {
        assert_eq!(send("tandem/auto", clean, "off").await.status, 200);
    }
    assert_eq!(
        send(SMOLLM2, "Name a river in Egypt.", "off").await.status,
        200
    );
    let dry = post_json(
        &server.url("/v1/tandem/route"),
        &json!({"messages": [{"role": "user", "content": "What is the capital of Peru?"}]}),
        &[],
    )
    .await;
    assert_eq!(dry.status, 200, "{}", dry.body);
    // Operators see how many were kept.
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "tandem_router_sampled_prompts_total 1"),
        "{metrics}"
    );
    server.stop().await;

    let kept: Vec<Value> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["prompt"], clean, "the last user message, as routed");
    assert_eq!(kept[0]["source"], "traffic");
    let all = std::fs::read_to_string(&path).unwrap();
    for secret in ["Müller", "Hauptstra", "jane.doe", "Egypt", "Peru"] {
        assert!(!all.contains(secret), "{secret} was kept");
    }
    assert_eq!(sample.len(), 1);
}
