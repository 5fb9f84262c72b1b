//! The operator's dashboard: its live feed read by an HTTP client, and the
//! page itself driven in headless Chromium (Playwright) while an application
//! sends requests. A device Tandem (SmolLM2) has a cloud-role Tandem as its
//! upstream, keys (one admin) and an egress ledger.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_ledger::Ledger;
use tandem_router::Dispatcher;
use tandem_router::access::{KeyConfig, hash_key};
use tandem_testkit::{PLAYWRIGHT, SMOLLM2, TestServer, node_with, post_json, shared_engine};

const ADMIN: &str = "sk-admin-0123456789";
const USER: &str = "sk-user-0123456789";

struct Setup {
    device: TestServer,
    dispatcher: Arc<Dispatcher>,
    _cloud: TestServer,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let engine = shared_engine(SMOLLM2, 1024, 2);
    let cloud =
        TestServer::start(Dispatcher::builder().local(engine.clone()).build().unwrap()).await;
    let mut u = UpstreamConfig::new("cloud", &cloud.url("/v1"), &[SMOLLM2]);
    u.price_input_per_mtok = 1.0;
    u.price_output_per_mtok = 2.0;
    let key = |name: &str, secret: &str, admin: bool| KeyConfig {
        name: name.into(),
        hash: hash_key(secret),
        privacy: None,
        daily_budget_usd: None,
        rate_limit_per_minute: None,
        admin,
    };
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(
        dir.path().join("ledger.jsonl"),
        tandem_ledger::LedgerKey::from_secret([5; 32]),
    )
    .unwrap();
    let dispatcher = Dispatcher::builder()
        .local(engine)
        .cloud(CloudBackend::new(u).unwrap())
        .keys(vec![key("operator", ADMIN, true), key("app", USER, false)])
        .ledger(ledger)
        .build()
        .unwrap();
    let device = TestServer::start(dispatcher.clone()).await;
    Setup {
        device,
        dispatcher,
        _cloud: cloud,
        _dir: dir,
    }
}

async fn ask(s: &Setup, prompt: &str, headers: &[(&str, &str)]) -> tandem_testkit::Reply {
    let auth = format!("Bearer {USER}");
    let mut h = vec![("authorization", auth.as_str())];
    h.extend_from_slice(headers);
    let body = json!({
        "model": "tandem/auto",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 6,
        "temperature": 0,
    });
    let r = post_json(&s.device.url("/v1/chat/completions"), &body, &h).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r
}

/// Reads server-sent events until `n` have arrived: (event name, data).
async fn read_events(
    body: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    buf: &mut String,
    n: usize,
) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    while out.len() < n {
        while let Some(cut) = buf.find("\n\n") {
            let block: String = buf.drain(..cut + 2).collect();
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if !data.is_empty() {
                out.push((name, serde_json::from_str(&data).unwrap()));
            }
        }
        if out.len() >= n {
            break;
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("the feed went quiet")
            .expect("the feed ended")
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_streams_each_request_without_its_text_and_needs_an_admin_key() {
    let s = setup().await;
    let client = reqwest::Client::new();
    let get = |path: &str, key: Option<&str>| {
        let mut r = client.get(s.device.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    // The page is open to anyone (it holds nothing); its data is not.
    let page = get("/ui", None).await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
    assert!(page.text().await.unwrap().contains("/ui/api/feed"));
    for path in ["/ui/api/feed", "/ui/api/state", "/ui/api/ledger"] {
        assert_eq!(get(path, None).await.unwrap().status(), 401, "{path}");
        assert_eq!(get(path, Some(USER)).await.unwrap().status(), 403, "{path}");
    }

    ask(&s, "What is the capital of France?", &[]).await;
    let feed = get("/ui/api/feed", Some(ADMIN)).await.unwrap();
    assert_eq!(feed.status(), 200);
    let mut body = feed.bytes_stream();
    let mut buf = String::new();
    let snap = read_events(&mut body, &mut buf, 1).await;
    assert_eq!(snap[0].0, "snapshot");
    assert_eq!(snap[0].1["events"].as_array().unwrap().len(), 1);
    assert_eq!(snap[0].1["totals"]["requests"]["local"], 1);

    // Live: a cloud answer with personal data redacted, then a refusal.
    let overrides = json!({"battery_pct": 5.0, "charging": false});
    s.dispatcher
        .signals()
        .set_overrides(serde_json::from_value(overrides).unwrap());
    let t = Instant::now();
    let r = ask(
        &s,
        "My email is jane.doe@example.com; say hello.",
        &[("x-tandem-privacy", "redact")],
    )
    .await;
    let live = read_events(&mut body, &mut buf, 1).await;
    let waited = t.elapsed();
    let e = &live[0].1;
    assert_eq!(live[0].0, "request");
    assert_eq!(e["request_id"], r.header("x-request-id"));
    assert_eq!(
        (e["side"].as_str(), e["decided_by"].as_str()),
        (Some("cloud"), Some("device"))
    );
    assert_eq!(e["status"], "ok");
    assert_eq!(e["key"], "app");
    assert_eq!(e["redacted"]["email"], 1);
    assert!(e["cost_usd"].as_f64().unwrap() > 0.0, "{e}");
    assert!(e["ttft_ms"].as_f64().unwrap() > 0.0 && e["completion_tokens"].as_u64().unwrap() > 0);
    assert!(e["features"]["prompt_tokens"].as_u64().unwrap() > 0, "{e}");
    assert_eq!(e["view"]["device"]["battery_pct"], 5.0);
    assert!(
        !e.to_string().contains("jane.doe"),
        "the event carries the text: {e}"
    );
    assert!(
        !e.to_string().contains("hello"),
        "the event carries the text: {e}"
    );
    s.dispatcher.signals().clear_overrides();

    // Offline, a prompt longer than the device's context has nowhere to go.
    s.dispatcher
        .signals()
        .set_overrides(serde_json::from_value(json!({"cloud_reachable": false})).unwrap());
    let long = "the quick brown fox jumps over the lazy dog ".repeat(400);
    let refused = post_json(
        &s.device.url("/v1/chat/completions"),
        &json!({"model": "tandem/auto", "messages": [{"role": "user", "content": long}], "max_tokens": 4}),
        &[("authorization", &format!("Bearer {USER}")), ("x-request-id", "refused-1")],
    )
    .await;
    s.dispatcher.signals().clear_overrides();
    assert!(refused.status >= 400, "{}", refused.text());
    let e = &read_events(&mut body, &mut buf, 1).await[0].1;
    assert_eq!(e["request_id"], "refused-1");
    assert_eq!(
        (e["status"].as_str(), e["side"].as_str()),
        (Some("refused"), Some("none")),
        "{e}"
    );
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .starts_with(&refused.status.to_string()),
        "{e}"
    );
    assert!(!e.to_string().contains("quick brown"), "{e}");

    let state: Value = get("/ui/api/state", Some(ADMIN))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(state["totals"]["requests"]["cloud"], 1, "{state}");
    assert_eq!(state["totals"]["redacted"]["email"], 1);
    assert!(
        state["backends"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "cloud")
    );
    let ledger: Value = get("/ui/api/ledger?n=5", Some(ADMIN))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ledger["verification"]["ok"], true, "{ledger}");
    let tail = ledger["tail"].as_array().unwrap();
    assert!(
        tail.iter()
            .any(|e| e["outcome"] == "ok" && e["redacted"]["email"] == 1),
        "{ledger}"
    );
    eprintln!("feed: a request's event arrived {waited:?} after it was sent");

    // Stopping the server ends the feed rather than waiting out the grace.
    let t = Instant::now();
    s.device.stop().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser_follows_requests_and_overrides() {
    let modules = node_with(&[PLAYWRIGHT]);
    let s = setup().await;
    let shots =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/dashboard.mjs");
    let base = s.device.url("");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(script)
            .env("NODE_PATH", &modules)
            .env("TANDEM_URL", base)
            .env("ADMIN_KEY", ADMIN)
            .env("USER_KEY", USER)
            .env("CHROMIUM", "/usr/bin/chromium")
            .env("SHOTS", &shots)
            .output()
            .expect("run node (scripts/install-deps test installs it)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the dashboard test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
    eprintln!("dashboard: {figures}");
    assert_eq!(figures["feed_ms"].as_array().map(Vec::len), Some(3));
    assert_eq!(
        figures["page_bytes"].as_u64().unwrap() as usize,
        tandem_server_page_len()
    );
}

fn tandem_server_page_len() -> usize {
    include_str!("../src/ui/index.html").len()
}
