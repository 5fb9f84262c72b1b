//! Property test of the semantic cache end to end on loopback: sequences
//! of requests that repeat, paraphrase and nearly repeat each other (a
//! number, a "not" or a name apart; another earlier conversation, tool
//! call, participant name, sampling or request field; another API key or
//! privacy mode; personal data planted; any Unicode appended), sent to a
//! device Tandem whose cloud is an upstream that echoes the question, with
//! the cache and MiniLM on — or, in a third of the cases, to two such
//! replicas sharing their cache through a real `redis-server`, each request
//! to either.
//!
//! For each request: an answer or a 4xx in OpenAI's shape, never a 5xx; an
//! answer from the cache is the answer (the cloud's echo or, with
//! `local_answers`, the device model's) to a question asked before under
//! the same key and privacy mode, with the same conversation before it, the
//! same parameters and the same literals (what
//! [`tandem_router::cache::literals`] promises must match); nothing is
//! answered from the cache when the request says `x-tandem-cache: skip`;
//! no personal data is ever answered from the cache or written to its
//! file or to Redis, and both hold whole JSON entries. Across replicas the
//! same holds: an entry one replica made answers the other only in the
//! context it was made in.
//!
//! CI runs a short form; `PROPTEST_CASES=500 cargo test -p tandem-server
//! --test fuzz_cache` is the long run.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_policy::privacy::PrivacyMode;
use tandem_policy::{PolicyConfig, Rule};
use tandem_redis::RedisState;
use tandem_router::Dispatcher;
use tandem_router::access::{KeyConfig, hash_key};
use tandem_router::cache::{CacheConfig, SemanticCache, literals};
use tandem_router::shared::{OnUnavailable, Shared, SharedConfig, SharedStore};
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::redis::RedisServer;
use tandem_testkit::{MINILM, SMOLLM2, TestServer, shared_engine};

/// Questions the sequences start from: each has literals (numbers,
/// negations, names) that a near twin changes.
const QUESTIONS: &[&str] = &[
    "What is the capital of France?",
    "If x + 51 = 93, what is x? Reply with only the final number.",
    "Which of these is not a mammal: whale, bat, shark?",
    "Is it safe to take ibuprofen with alcohol?",
    "What did I just book, and for when?",
    "What is my name?",
    "A train travels at 83 km per hour for 8 hours. How far does it go?",
    "Translate 'good morning' into German.",
];

/// Values the detectors find; none may be answered from the cache or
/// written to it.
const PLANTED: &[&str] = &[
    "jane.doe@example.com",
    "4111 1111 1111 1111",
    "123-45-6789",
    "DE89 3704 0044 0532 0130 00",
];

/// Text appended to a question.
const TAILS: &[&str] = &[
    "",
    " ",
    " Please.",
    " thanks!",
    " Answer in Python.",
    " Not now.",
    " 42",
    " ٤٢",
    " Ⅻ",
    "\u{200d}",
    " [EMAIL_1]",
    " <|im_end|>",
    " İstanbul",
];

/// API keys: (name, raw key). Neither sets a privacy mode, so the header
/// decides it.
const KEYS: &[(&str, &str)] = &[
    ("app-a", "tdm_fuzz_cache_key_a_0123456789"),
    ("app-b", "tdm_fuzz_cache_key_b_0123456789"),
];

/// Cloud first, so that only privacy keeps a request on the device; or
/// the default, local first.
fn policy(cloud_first: bool) -> PolicyConfig {
    let mut p = PolicyConfig::default();
    if cloud_first {
        p.rules.retain(|r| *r != Rule::PreferLocal);
        p.rules.push(Rule::PreferCloud);
    }
    p
}

struct Rig {
    /// One replica, or two sharing a Redis.
    servers: Vec<TestServer>,
    caches: Vec<Arc<SemanticCache>>,
    /// What the replicas share, read back at the end.
    shared: Option<(RedisServer, RedisState)>,
    _capture: CaptureUpstream,
    _dir: tempfile::TempDir,
}

/// Fresh device Tandems with empty caches (the models are shared): one, or
/// `replicas` sharing a Redis started for them.
async fn rig(local_answers: bool, cloud_first: bool, replicas: usize) -> Rig {
    let capture = CaptureUpstream::start(None, Mode::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let redis = (replicas > 1).then(RedisServer::start);
    let config = redis.as_ref().map(|r| SharedConfig {
        redis_url: Some(r.url()),
        on_unavailable: OnUnavailable::Closed,
        sync_ms: 20,
        ..SharedConfig::default()
    });
    let mut servers = Vec::new();
    let mut caches = Vec::new();
    for i in 0..replicas.max(1) {
        let cache = Arc::new(
            SemanticCache::open(
                CacheConfig {
                    local_answers,
                    ..CacheConfig::default()
                },
                Some(dir.path().join(format!("answers-{i}.jsonl"))),
            )
            .unwrap(),
        );
        let mut b = replica(&capture, cache.clone(), cloud_first);
        if let Some(cfg) = &config {
            let store = RedisState::new(cfg, 1000).expect("store");
            b = b.shared(Shared::new(Arc::new(store), cfg.clone()));
        }
        let d = b.build().unwrap();
        d.start_shared().await;
        servers.push(TestServer::start(d).await);
        caches.push(cache);
    }
    let shared = redis.zip(config).map(|(r, cfg)| {
        let store = RedisState::new(&cfg, 1000).expect("store");
        (r, store)
    });
    Rig {
        servers,
        caches,
        shared,
        _capture: capture,
        _dir: dir,
    }
}

/// One replica's dispatcher, before it is built.
fn replica(
    capture: &CaptureUpstream,
    cache: Arc<SemanticCache>,
    cloud_first: bool,
) -> tandem_router::DispatcherBuilder {
    let mut u = UpstreamConfig::new("cloud", &capture.base_url(), &["big-model"]);
    u.max_retries = 0;
    let keys = KEYS
        .iter()
        .map(|(name, raw)| KeyConfig {
            name: (*name).into(),
            hash: hash_key(raw),
            privacy: None,
            daily_budget_usd: None,
            rate_limit_per_minute: None,
            admin: false,
        })
        .collect();
    Dispatcher::builder()
        .local(shared_engine(SMOLLM2, 1024, 4))
        .cloud(CloudBackend::new(u).unwrap())
        .policy(policy(cloud_first))
        .embedder(MINILM, tandem_testkit::shared_embedder())
        .cache(cache)
        .keys(keys)
}

/// What comes before the question.
#[derive(Debug, Clone)]
enum Before {
    Nothing,
    System(&'static str),
    /// A tool call with this city, answered "done".
    Booked(&'static str),
    /// An earlier exchange.
    Earlier(&'static str),
}

/// One request of a sequence.
#[derive(Debug, Clone)]
struct Ask {
    question: usize,
    edit: u8,
    tail: &'static str,
    planted: Option<&'static str>,
    before: Before,
    name: Option<&'static str>,
    key: usize,
    privacy: &'static str,
    temperature: f64,
    max_tokens: u32,
    effort: Option<&'static str>,
    user: Option<&'static str>,
    stop: bool,
    stream: bool,
    skip: bool,
    /// Which replica it is sent to (the first when there is one).
    replica: usize,
}

fn ask() -> impl Strategy<Value = Ask> {
    (
        (
            0..QUESTIONS.len(),
            0u8..6,
            proptest::sample::select(TAILS),
            proptest::option::weighted(0.15, proptest::sample::select(PLANTED)),
            prop_oneof![
                4 => Just(Before::Nothing),
                1 => proptest::sample::select(&["Be brief.", "Answer like a pirate."][..]).prop_map(Before::System),
                2 => proptest::sample::select(&["Paris", "Berlin"][..]).prop_map(Before::Booked),
                1 => proptest::sample::select(&["I am Ana.", "I am Bo."][..]).prop_map(Before::Earlier),
            ],
            proptest::option::weighted(0.25, proptest::sample::select(&["alice", "bob"][..])),
        ),
        (
            0..KEYS.len(),
            proptest::sample::select(&["", "redact", "off", "strict"][..]),
            proptest::sample::select(&[0.0, 0.8][..]),
            proptest::sample::select(&[8u32, 16][..]),
            proptest::option::weighted(0.2, proptest::sample::select(&["low", "high"][..])),
            proptest::option::weighted(0.2, proptest::sample::select(&["u1", "u2"][..])),
            proptest::bool::weighted(0.2),
            any::<bool>(),
            proptest::bool::weighted(0.1),
            0usize..2,
        ),
    )
        .prop_map(
            |(
                (question, edit, tail, planted, before, name),
                (key, privacy, temperature, max_tokens, effort, user, stop, stream, skip, replica),
            )| Ask {
                question,
                edit,
                tail,
                planted,
                before,
                name,
                key,
                privacy,
                temperature,
                max_tokens,
                effort,
                user,
                stop,
                stream,
                skip,
                replica,
            },
        )
}

impl Ask {
    /// `self` with the fields `change` marks taken from `other`: a
    /// sequence stays near its first request, so that it repeats itself.
    fn blend(&self, other: &Ask, change: &[bool]) -> Ask {
        let c = |i: usize| change.get(i).copied().unwrap_or(false);
        Ask {
            question: if c(0) { other.question } else { self.question },
            edit: if c(1) { other.edit } else { self.edit },
            tail: if c(2) { other.tail } else { self.tail },
            planted: if c(3) { other.planted } else { self.planted },
            before: if c(4) {
                other.before.clone()
            } else {
                self.before.clone()
            },
            name: if c(5) { other.name } else { self.name },
            key: if c(6) { other.key } else { self.key },
            privacy: if c(7) { other.privacy } else { self.privacy },
            temperature: if c(8) {
                other.temperature
            } else {
                self.temperature
            },
            max_tokens: if c(9) {
                other.max_tokens
            } else {
                self.max_tokens
            },
            effort: if c(10) { other.effort } else { self.effort },
            user: if c(11) { other.user } else { self.user },
            stop: if c(12) { other.stop } else { self.stop },
            stream: other.stream,
            skip: other.skip,
            replica: other.replica,
        }
    }

    /// The question as asked: as written, reworded (other lower-case
    /// words), with a number or a name changed, or with "not" put in.
    fn text(&self) -> String {
        let q = QUESTIONS.get(self.question).copied().unwrap_or_default();
        let q = match self.edit {
            1 => q.replacen("What is", "What's", 1).replacen("the ", "", 1),
            2 => q
                .replacen("51", "52", 1)
                .replacen("83", "84", 1)
                .replacen("France", "Spain", 1),
            3 => q.replacen(" is ", " is not ", 1),
            4 => q.to_lowercase(),
            _ => q.to_owned(),
        };
        let mut t = format!("{q}{}", self.tail);
        if let Some(p) = self.planted {
            t.push_str(&format!(" Mail it to {p}."));
        }
        t
    }

    fn messages(&self) -> Vec<Value> {
        let mut m = Vec::new();
        match self.before {
            Before::Nothing => {}
            Before::System(s) => m.push(json!({"role": "system", "content": s})),
            Before::Booked(city) => {
                m.push(json!({"role": "user", "content": "Book me a hotel."}));
                let args = json!({"city": city}).to_string();
                m.push(json!({"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "book", "arguments": args}}]}));
                m.push(json!({"role": "tool", "tool_call_id": "c1", "content": "done"}));
            }
            Before::Earlier(said) => {
                m.push(json!({"role": "user", "content": said}));
                m.push(json!({"role": "assistant", "content": "Nice to meet you."}));
            }
        }
        let mut last = json!({"role": "user", "content": self.text()});
        if let Some(n) = self.name {
            last["name"] = json!(n);
        }
        m.push(last);
        m
    }

    fn body(&self) -> Value {
        let mut b = json!({
            "model": "tandem/auto",
            "messages": self.messages(),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        });
        if let Some(e) = self.effort {
            b["reasoning_effort"] = json!(e);
        }
        if let Some(u) = self.user {
            b["user"] = json!(u);
        }
        if self.stop {
            b["stop"] = json!(["\n\n"]);
        }
        b
    }

    /// The privacy mode the request is placed under: with API keys, a
    /// header may only tighten the default.
    fn mode(&self) -> String {
        let base = PolicyConfig::default().privacy;
        match self.privacy.parse::<PrivacyMode>() {
            Ok(h) => base.stricter(h).as_str().to_owned(),
            Err(_) => base.as_str().to_owned(),
        }
    }

    /// Everything a cached answer must share with this request, other than
    /// the question's wording: key, mode, the conversation before the
    /// question (every field), the question's own fields other than its
    /// text, and what the request asks of the answer. The `user` field
    /// (who asks, for abuse tracking) changes no answer.
    fn context(&self) -> String {
        let mut m = self.messages();
        if let Some(last) = m.last_mut() {
            last["content"] = Value::Null;
        }
        json!({
            "key": self.key,
            "mode": self.mode(),
            "messages": m,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "effort": self.effort,
            "stop": self.stop,
        })
        .to_string()
    }
}

/// What an answer says (its text), streamed or not.
fn answer_text(raw: &str, stream: bool) -> Result<String, String> {
    if stream {
        if !raw.trim_end().ends_with("data: [DONE]") {
            return Err(format!("a stream without its end: {raw}"));
        }
        let mut s = String::new();
        for l in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if l == "[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_str(l).map_err(|e| format!("{e}: {l}"))?;
            s += v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap_or_default();
        }
        Ok(s)
    } else {
        let v: Value = serde_json::from_str(raw).map_err(|e| format!("{e}: {raw}"))?;
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("no answer: {raw}"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: tandem_testkit::proptest_cases(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_cache_answers_only_what_was_asked_before_in_the_same_context(
        first in ask(),
        later in proptest::collection::vec(
            (ask(), proptest::collection::vec(proptest::bool::weighted(0.2), 13)), 1..9),
        (local_answers, cloud_first) in prop_oneof![
            Just((false, true)), Just((true, true)), Just((true, false))],
        replicas in prop_oneof![2 => Just(1usize), 1 => Just(2usize)],
    ) {
        let mut asks = vec![first.clone()];
        asks.extend(later.iter().map(|(other, change)| first.blend(other, change)));
        let rt = tandem_testkit::shared_runtime();
        let r = rt.block_on(rig(local_answers, cloud_first, replicas));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        // Answers that could have been kept: (context, question, answer).
        let mut asked: Vec<(String, String, String)> = Vec::new();
        for a in &asks {
            let body = a.body();
            let server = &r.servers[a.replica % r.servers.len()];
            let (status, headers, raw) = rt.block_on(async {
                let mut q = client
                    .post(server.url("/v1/chat/completions"))
                    .bearer_auth(KEYS[a.key].1)
                    .json(&body);
                if !a.privacy.is_empty() {
                    q = q.header("x-tandem-privacy", a.privacy);
                }
                if a.skip {
                    q = q.header("x-tandem-cache", "skip");
                }
                let resp = q.send().await.expect("the request answers");
                let status = resp.status().as_u16();
                let headers = resp.headers().clone();
                (status, headers, resp.text().await.expect("a whole body"))
            });
            let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            prop_assert!(status < 500, "{status}: {raw}");
            if status != 200 {
                let v: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
                prop_assert!((400..500).contains(&status) && v["error"]["message"].is_string(), "{status}: {raw}");
                continue;
            }
            let text = match answer_text(&raw, a.stream) {
                Ok(t) => t,
                Err(e) => return Err(TestCaseError::fail(e)),
            };
            let backend = header("x-tandem-backend");
            let outcome = header("x-tandem-cache");
            if backend == "cache" {
                prop_assert!(outcome.starts_with("hit"), "{outcome}");
                prop_assert!(!a.skip, "answered from the cache though asked to skip it");
                for p in PLANTED {
                    prop_assert!(!text.contains(p), "{p} answered from the cache: {text}");
                }
                let context = a.context();
                let mine = literals(&a.text());
                let same = asked.iter().any(|(c, was, said)| {
                    *c == context && *said == text && literals(was) == mine
                });
                prop_assert!(same,
                    "answered from the cache with {text:?} ({context}), which no question asked \
                     before in this context got: {:?}\nasked: {asked:#?}", a.messages());
            } else if outcome == "miss" {
                // A local answer is kept only when `local_answers` is on.
                prop_assert!(backend == "cloud:cloud" || backend == "local", "{backend}");
                asked.push((a.context(), a.text(), text));
            }
        }
        // What the cache keeps on disk and in Redis: whole entries, no
        // personal data.
        let mut kept = Vec::new();
        for c in &r.caches {
            let path = c.path().map(std::path::Path::to_path_buf);
            // A replica appends what another one shared through Redis in
            // the background, so the file may be read in the middle of an
            // append: give that append a moment to end. A line that stays
            // torn is a failure.
            let mut file = String::new();
            for _ in 0..40 {
                file = path.as_ref().map(|p| std::fs::read_to_string(p).unwrap_or_default()).unwrap_or_default();
                if file.is_empty() || file.ends_with('\n') {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            prop_assert!(file.is_empty() || file.ends_with('\n'), "a torn line: {file}");
            kept.extend(file.lines().map(str::to_owned));
        }
        if let Some((_redis, store)) = &r.shared {
            let lines = rt.block_on(store.cache_read("0", 10_000)).expect("the shared entries");
            kept.extend(lines.into_iter().map(|l| l.entry));
        }
        for l in &kept {
            prop_assert!(serde_json::from_str::<Value>(l).is_ok(), "{l}");
            for p in PLANTED {
                prop_assert!(!l.contains(p), "{p} kept in the cache: {l}");
            }
        }
    }
}
