//! One model served by three upstream replicas — one failing, one slow, one
//! healthy — each a capturing upstream in front of a cloud-role Tandem: the
//! client never notices the failing one, its breaker takes it out of the
//! rotation, requests spread by load and settle on the fast one, and every
//! answer says which replica served it and why.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_policy::{PolicyConfig, Rule};
use tandem_router::Dispatcher;
use tandem_testkit::capture::{CaptureUpstream, Mode};
use tandem_testkit::{Reply, SMOLLM2, TestServer, post_json, shared_engine};

struct Tier {
    device: TestServer,
    /// a (failing), b (slow), c (healthy).
    replicas: Vec<CaptureUpstream>,
    _cloud: TestServer,
}

async fn tier(modes: [Mode; 3]) -> Tier {
    let engine = shared_engine(SMOLLM2, 1024, 4);
    let cloud =
        TestServer::start(Dispatcher::builder().local(engine.clone()).build().unwrap()).await;
    let mut replicas = Vec::new();
    for m in modes {
        replicas.push(CaptureUpstream::start(Some(cloud.url("/v1")), m).await);
    }
    // Cloud first: the rule under test is the choice among upstreams.
    let mut policy = PolicyConfig::default();
    policy.rules.retain(|r| *r != Rule::PreferLocal);
    policy.rules.push(Rule::PreferCloud);
    let mut b = Dispatcher::builder().local(engine).policy(policy);
    for (name, r) in ["a", "b", "c"].iter().zip(&replicas) {
        let mut u = UpstreamConfig::new(name, &r.base_url(), &[SMOLLM2]);
        u.max_retries = 0;
        u.breaker_failures = 2;
        u.breaker_cooldown_ms = 600_000;
        u.ttft_timeout_ms = 60_000;
        b = b.cloud(CloudBackend::new(u).unwrap());
    }
    let device = TestServer::start(b.build().unwrap()).await;
    Tier {
        device,
        replicas,
        _cloud: cloud,
    }
}

async fn ask(t: &Tier, i: usize) -> Reply {
    let body = json!({
        "model": "tandem/auto",
        "messages": [{"role": "user", "content": format!("Say the number {i}.")}],
        "max_tokens": 4, "temperature": 0,
    });
    let r = post_json(&t.device.url("/v1/chat/completions"), &body, &[]).await;
    assert_eq!(r.status, 200, "the client noticed: {}", r.text());
    r
}

fn served(t: &Tier) -> Vec<usize> {
    t.replicas
        .iter()
        .map(|r| {
            r.captured()
                .iter()
                .filter(|c| c.path.ends_with("/chat/completions"))
                .count()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_replica_is_isolated_and_requests_settle_on_the_fast_one() {
    let t = tier([
        Mode::Fail {
            status: 503,
            times: 1000,
        },
        Mode::Delay(Duration::from_millis(1500)),
        Mode::Forward,
    ])
    .await;
    let first = ask(&t, 0).await;
    let moved = first.header("x-tandem-failover");
    assert!(moved.starts_with("cloud:a -> cloud:"), "{moved}");
    assert!(first.header("x-tandem-backend").starts_with("cloud:"));
    assert_ne!(first.header("x-tandem-backend"), "cloud:a");
    let mut last = first;
    for i in 1..8 {
        last = ask(&t, i).await;
    }
    // Two failures open a's breaker: it saw two requests, no more.
    let [a, b, c]: [usize; 3] = served(&t).try_into().unwrap();
    assert_eq!(
        a, 2,
        "the failing replica kept getting requests: {a}, {b}, {c}"
    );
    assert_eq!(a + b + c, 8 + 2);
    // Once both are measured, the fast one takes the traffic.
    assert!(c >= 6, "the fast replica served {c} of 8 (slow {b})");
    assert_eq!(last.header("x-tandem-backend"), "cloud:c");
    let why = last.header("x-tandem-replica");
    eprintln!("x-tandem-replica: {why}\nserved by a, b, c: {a}, {b}, {c}");
    assert!(why.starts_with("c: 0 in flight, TTFT"), "{why}");
    assert!(why.contains("a: breaker open"), "{why}");
    assert!(last.header("x-tandem-failover").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_spread_over_the_replicas_by_load() {
    let t = Arc::new(
        tier([
            Mode::Delay(Duration::from_millis(800)),
            Mode::Delay(Duration::from_millis(800)),
            Mode::Delay(Duration::from_millis(800)),
        ])
        .await,
    );
    let mut jobs = Vec::new();
    for i in 0..6 {
        let t = t.clone();
        jobs.push(tokio::spawn(async move {
            ask(&t, i).await.header("x-tandem-backend")
        }));
        // Each request is placed before the next arrives.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut backends = Vec::new();
    for j in jobs {
        backends.push(j.await.unwrap());
    }
    let counts = served(&t);
    assert_eq!(counts, [2, 2, 2], "{backends:?}");
}
