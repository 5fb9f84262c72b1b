//! Two Tandem gateways sharing state in a real `redis-server` on loopback:
//! a rate limit and a budget hold across both under concurrent load, a key
//! revoked through one is refused by the other at once, a cache entry
//! written through one is served by the other, and Redis stopped
//! mid-test gives the configured behaviour (fail open with this replica's
//! own limits, or fail closed) and loses no spending when it returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tandem_embed::Embedder;
use tandem_redis::RedisState;
use tandem_router::Dispatcher;
use tandem_router::access::{KeyConfig, new_key};
use tandem_router::cache::{CacheConfig, SemanticCache};
use tandem_router::shared::{OnUnavailable, Shared, SharedConfig, SharedStore};
use tandem_testkit::redis::RedisServer;
use tandem_testkit::scripted::{Scripted, Step};
use tandem_testkit::{MINILM, TestServer};

/// What one answer of the scripted upstream costs: 10 prompt tokens at
/// $1/M and 2 completion tokens at $2/M.
const COST: f64 = 14e-6;

/// A prompt long enough that its estimate (≈ chars / 4) covers the 10
/// tokens the upstream bills.
fn prompt(tag: &str) -> String {
    format!(
        "{tag}: {}",
        "please summarise the weekly report. ".repeat(5)
    )
}

fn embedder() -> Arc<Embedder> {
    tandem_testkit::shared_embedder()
}

struct Admin {
    raw: String,
    config: KeyConfig,
}

fn admin() -> Admin {
    let (raw, hash) = new_key().expect("random source");
    Admin {
        raw,
        config: KeyConfig {
            name: "ops".into(),
            hash,
            privacy: None,
            daily_budget_usd: None,
            rate_limit_per_minute: None,
            admin: true,
        },
    }
}

fn shared_config(redis: &RedisServer, prefix: &str, mode: OnUnavailable) -> SharedConfig {
    SharedConfig {
        redis_url: Some(redis.url()),
        on_unavailable: mode,
        prefix: prefix.into(),
        sync_ms: 50,
        ..SharedConfig::default()
    }
}

struct Gateway {
    server: TestServer,
    cloud: Arc<Scripted>,
}

async fn gateway(
    redis: &RedisServer,
    prefix: &str,
    mode: OnUnavailable,
    admin: &Admin,
    cache: bool,
) -> Gateway {
    let cfg = shared_config(redis, prefix, mode);
    let store = RedisState::new(&cfg, 1000).expect("store");
    let cloud = Scripted::cloud("up", "m", vec![Step::Answer(vec!["a".into(), "b".into()])]);
    let mut b = Dispatcher::builder()
        .cloud_arc(cloud.clone())
        .keys(vec![admin.config.clone()])
        .shared(Shared::new(Arc::new(store), cfg));
    if cache {
        b = b.embedder(MINILM, embedder()).cache(Arc::new(
            SemanticCache::open(CacheConfig::default(), None).expect("cache"),
        ));
    }
    let d = b.build().expect("dispatcher");
    d.start_shared().await;
    Gateway {
        server: TestServer::start(d).await,
        cloud,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn chat(g: &Gateway, key: &str, text: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = client()
        .post(g.server.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "tandem/auto",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": text}],
        }))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, r.json().await.unwrap_or(Value::Null), headers)
}

async fn make_key(g: &Gateway, admin: &Admin, body: Value) -> String {
    let r = client()
        .post(g.server.url("/v1/tandem/keys"))
        .bearer_auth(&admin.raw)
        .json(&body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    assert_eq!(status, 201, "{v}");
    v["key"].as_str().expect("the key, shown once").to_owned()
}

async fn spent(redis: &RedisServer, prefix: &str, key: &str) -> f64 {
    let store =
        RedisState::new(&shared_config(redis, prefix, OnUnavailable::Open), 1000).expect("store");
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        / 86_400;
    store.spend(day, Some(key)).await.expect("redis").key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_and_a_budget_hold_exactly_across_two_replicas() {
    let redis = RedisServer::start();
    let admin = admin();
    let a = gateway(&redis, "t1:", OnUnavailable::Closed, &admin, false).await;
    let b = gateway(&redis, "t1:", OnUnavailable::Closed, &admin, false).await;
    let gateways = [&a, &b];

    // 40 requests at once, half through each replica, against a limit of
    // 20 a minute: each replica alone would let all its 20 through.
    let limited = make_key(
        &a,
        &admin,
        json!({"name": "burst", "rate_limit_per_minute": 20}),
    )
    .await;
    let statuses: Vec<u16> = futures::stream::iter(0..40)
        .map(|i| {
            let url = gateways[i % 2].server.url("/v1/models");
            let key = limited.clone();
            async move {
                client()
                    .get(url)
                    .bearer_auth(key)
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    eprintln!("rate limit 20/min across two replicas: {ok} admitted, {refused} refused");
    // A token refills every 3 s; the burst takes well under that.
    assert!((20..=21).contains(&ok), "{ok} admitted: {statuses:?}");
    assert_eq!(ok + refused, 40);

    // A budget of 9.5 answers: whatever the interleaving, exactly 10
    // answers fit (the tenth crosses it; none after).
    let budget = 9.5 * COST;
    let spender = make_key(
        &b,
        &admin,
        json!({"name": "spender", "daily_budget_usd": budget}),
    )
    .await;
    let results: Vec<(u16, Value)> = futures::stream::iter(0..40)
        .map(|i| {
            let g = gateways[i % 2];
            let key = spender.clone();
            async move {
                let (s, v, _) = chat(g, &key, &prompt(&format!("c{i}"))).await;
                (s, v)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut answered = results.iter().filter(|(s, _)| *s == 200).count();
    for (s, v) in &results {
        assert!(
            *s == 200 || (*s == 429 && v["error"]["code"] == "insufficient_quota"),
            "{s} {v}"
        );
    }
    let in_burst = answered;
    // Reservations of requests in flight are released as they settle:
    // what the burst left unspent is there for the next requests.
    for i in 0..30 {
        let (s, v, _) = chat(gateways[i % 2], &spender, &prompt(&format!("s{i}"))).await;
        if s == 200 {
            answered += 1;
        } else {
            assert_eq!(
                (s, v["error"]["code"].as_str()),
                (429, Some("insufficient_quota"))
            );
            break;
        }
    }
    eprintln!(
        "budget of 9.5 answers: {in_burst} answered in the concurrent burst, {answered} in all"
    );
    assert_eq!(
        answered, 10,
        "exactly the answers that fit the budget, across both"
    );
    let upstream = a.cloud.received().len() + b.cloud.received().len();
    assert_eq!(upstream, 10, "refused requests never reached the upstream");
    // Settling is written after the answer: give it a moment.
    let t0 = Instant::now();
    let mut s = 0.0;
    while t0.elapsed() < Duration::from_secs(2) {
        s = spent(&redis, "t1:", "spender").await;
        if (s - 10.0 * COST).abs() < 1e-9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!((s - 10.0 * COST).abs() < 1e-9, "Redis holds {s}");
    assert!(s <= budget + COST, "overshoot beyond one request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_replica_is_refused_by_the_other_at_once() {
    let redis = RedisServer::start();
    let admin = admin();
    let a = gateway(&redis, "t2:", OnUnavailable::Closed, &admin, false).await;
    let b = gateway(&redis, "t2:", OnUnavailable::Closed, &admin, false).await;
    let key = make_key(&a, &admin, json!({"name": "app", "privacy": "strict"})).await;
    let (s, _, _) = chat(&b, &key, "hello").await;
    assert_eq!(s, 200, "a key made through one replica works on the other");

    // Not an admin: cannot list or make keys.
    let r = client()
        .get(b.server.url("/v1/tandem/keys"))
        .bearer_auth(&key)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 403);
    let listed: Value = client()
        .get(b.server.url("/v1/tandem/keys"))
        .bearer_auth(&admin.raw)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = listed["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["app", "ops"]);
    assert!(
        !listed.to_string().contains(&key),
        "keys are never shown again"
    );

    let r = client()
        .delete(a.server.url("/v1/tandem/keys/app"))
        .bearer_auth(&admin.raw)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let t0 = Instant::now();
    let mut status = 200;
    while t0.elapsed() < Duration::from_secs(2) {
        status = chat(&b, &key, "hello again").await.0;
        if status == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = t0.elapsed();
    eprintln!("revoked on one replica, refused by the other after {took:?}");
    assert_eq!(status, 401);
    assert!(took < Duration::from_secs(1), "{took:?}");
    // A replica started later does not bring it back.
    let c = gateway(&redis, "t2:", OnUnavailable::Closed, &admin, false).await;
    assert_eq!(chat(&c, &key, "hello").await.0, 401);
    assert_eq!(chat(&a, &key, "hello").await.0, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_entry_written_through_one_replica_is_served_by_the_other() {
    let redis = RedisServer::start();
    let admin = admin();
    let a = gateway(&redis, "t3:", OnUnavailable::Closed, &admin, true).await;
    let b = gateway(&redis, "t3:", OnUnavailable::Closed, &admin, true).await;
    let question = "What is the capital of France?";
    let (s, v, h) = chat(&a, &admin.raw, question).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(h["x-tandem-backend"], "cloud:up");
    let t0 = Instant::now();
    let (mut s, mut v, mut h) = chat(&b, &admin.raw, question).await;
    while h["x-tandem-backend"] != "cache" && t0.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(25)).await;
        (s, v, h) = chat(&b, &admin.raw, question).await;
    }
    eprintln!(
        "served from the shared cache by the other replica after {:?}",
        t0.elapsed()
    );
    assert_eq!(s, 200);
    assert_eq!(h["x-tandem-backend"], "cache", "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "ab");
    // Later hits on the other replica never reach its upstream. (While
    // the entry travelled, a miss may have.)
    let before = b.cloud.received().len();
    assert_eq!(
        chat(&b, &admin.raw, question).await.2["x-tandem-backend"],
        "cache"
    );
    assert_eq!(b.cloud.received().len(), before);
    // Partitioned as in one process: another key does not see it.
    let other = make_key(&a, &admin, json!({"name": "other"})).await;
    let (_, _, h) = chat(&b, &other, question).await;
    assert_eq!(h["x-tandem-backend"], "cloud:up");
    // A replica started later loads the shared entries.
    let c = gateway(&redis, "t3:", OnUnavailable::Closed, &admin, true).await;
    assert_eq!(
        chat(&c, &admin.raw, question).await.2["x-tandem-backend"],
        "cache"
    );
    assert!(c.cloud.received().is_empty());
}

async fn health(g: &Gateway, admin: &Admin) -> Value {
    client()
        .get(g.server.url("/healthz"))
        .bearer_auth(&admin.raw)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json")
}

async fn metric(g: &Gateway, admin: &Admin, name: &str) -> String {
    let text = client()
        .get(g.server.url("/metrics"))
        .bearer_auth(&admin.raw)
        .send()
        .await
        .expect("request")
        .text()
        .await
        .expect("text");
    text.lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_test_fails_open_or_closed_as_configured_and_loses_nothing() {
    let mut redis = RedisServer::start();
    let admin = admin();
    let open = gateway(&redis, "t4:", OnUnavailable::Open, &admin, false).await;
    let closed = gateway(&redis, "t4:", OnUnavailable::Closed, &admin, false).await;
    let key = make_key(
        &open,
        &admin,
        json!({"name": "app", "daily_budget_usd": 1.0}),
    )
    .await;
    for g in [&open, &closed] {
        assert_eq!(chat(g, &key, &prompt("before")).await.0, 200);
    }
    assert_eq!(
        health(&open, &admin).await["shared_state"]["reachable"],
        true
    );

    redis.shutdown();
    // Fail open: served with the keys this replica last saw and its own
    // count; what it spends is kept.
    let during = 3;
    for i in 0..during {
        let (s, v, _) = chat(&open, &key, &prompt(&format!("during {i}"))).await;
        assert_eq!(s, 200, "{v}");
    }
    // Each settles just after its answer ends.
    let t0 = Instant::now();
    let mut h = health(&open, &admin).await;
    while h["shared_state"]["pending_spend_updates"] != during
        && t0.elapsed() < Duration::from_secs(2)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        h = health(&open, &admin).await;
    }
    eprintln!("healthz while Redis is down: {}", h["shared_state"]);
    assert_eq!(h["shared_state"]["reachable"], false);
    assert_eq!(h["shared_state"]["on_unavailable"], "open");
    assert_eq!(h["shared_state"]["pending_spend_updates"], during);
    assert_eq!(
        metric(&open, &admin, "tandem_shared_state_up").await,
        "tandem_shared_state_up 0"
    );
    // Fail closed: refused, saying why.
    let (s, v, _) = chat(&closed, &key, &prompt("during")).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (503, Some("shared_state_unavailable")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("on_unavailable")
    );

    redis.restart();
    let t0 = Instant::now();
    loop {
        let h = health(&open, &admin).await;
        if h["shared_state"]["reachable"] == true && h["shared_state"]["pending_spend_updates"] == 0
        {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "not back: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("back and flushed {:?} after Redis returned", t0.elapsed());
    // Each replica learns that Redis is back from its own background sync;
    // until then the closed one keeps refusing.
    while health(&closed, &admin).await["shared_state"]["reachable"] != true {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "closed replica not back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = spent(&redis, "t4:", "app").await;
    assert!(
        (s - f64::from(2 + during) * COST).abs() < 1e-9,
        "Redis holds {s}: the spending of the outage was lost"
    );
    assert_eq!(chat(&closed, &key, &prompt("after")).await.0, 200);
    assert_eq!(
        metric(&open, &admin, "tandem_shared_state_up").await,
        "tandem_shared_state_up 1"
    );
}
