//! The server under abuse, over real sockets: slow clients lose their
//! connections within the timeouts, connections over the cap get a 503,
//! answers end at the deadline, shutdown drains within its grace, and an
//! open (keyless) server refuses what only a web page would send.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tandem_router::Dispatcher;
use tandem_router::access::{KeyConfig, hash_key};
use tandem_server::ServerConfig;
use tandem_testkit::TestServer;
use tandem_testkit::scripted::{Scripted, Step};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn scripted(pieces: usize) -> Arc<Dispatcher> {
    scripted_with_keys(pieces, Vec::new())
}

fn scripted_with_keys(pieces: usize, keys: Vec<KeyConfig>) -> Arc<Dispatcher> {
    Dispatcher::builder()
        .local_arc(Scripted::local(
            "device",
            vec![Step::Answer(vec!["word ".to_owned(); pieces])],
        ))
        .keys(keys)
        .build()
        .expect("dispatcher")
}

/// A gateway with one cloud upstream `u` and no local model, serving on
/// loopback.
async fn gateway(mut u: tandem_backends::UpstreamConfig) -> TestServer {
    u.max_retries = 0;
    let cloud = tandem_backends::CloudBackend::new(u).expect("upstream");
    TestServer::start(
        Dispatcher::builder()
            .cloud(cloud)
            .build()
            .expect("dispatcher"),
    )
    .await
}

fn quick() -> ServerConfig {
    ServerConfig {
        header_timeout: Duration::from_millis(400),
        body_timeout: Duration::from_millis(400),
        ..ServerConfig::default()
    }
}

/// Reads until the server closes the connection; what it sent, and how
/// long that took. Fails the test if it stays open for 10 s.
async fn until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "connection still open after 10 s; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[tokio::test]
async fn slow_clients_lose_their_connections_within_the_timeouts() {
    let s = TestServer::start_with(scripted(1), quick()).await;

    // Headers that never end.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let (_, took) = until_closed(&mut c).await;
    assert!(
        took < Duration::from_secs(5),
        "partial headers held {took:?}"
    );

    // A body that never ends: 408 in OpenAI's shape, then closed.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let (reply, took) = until_closed(&mut c).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    assert!(took < Duration::from_secs(5), "partial body held {took:?}");

    // An idle kept-alive connection after a complete exchange.
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let (reply, took) = until_closed(&mut c).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        took < Duration::from_secs(5),
        "idle connection held {took:?}"
    );
}

#[tokio::test]
async fn connections_over_the_cap_get_a_503_and_the_server_recovers() {
    let s = TestServer::start_with(
        scripted(1),
        ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        },
    )
    .await;
    let held: Vec<TcpStream> =
        futures::future::join_all((0..2).map(|_| TcpStream::connect(s.addr)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    // Let the server accept both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(s.addr).await.unwrap();
    let (reply, _) = until_closed(&mut third).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    let body: Value = serde_json::from_str(reply.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit is 2"),
        "{body}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::get(s.url("/healthz")).await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_long_answer_ends_at_the_deadline_with_an_error() {
    let s = TestServer::start_with(
        scripted(5_000),
        ServerConfig {
            stream_deadline: Duration::from_millis(300),
            ..ServerConfig::default()
        },
    )
    .await;
    let started = Instant::now();
    let body = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "device", "stream": true,
            "messages": [{"role": "user", "content": "go on"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(body.contains("word"), "it streamed before the deadline");
    assert!(
        body.contains("deadline_exceeded"),
        "{}",
        &body[body.len().saturating_sub(400)..]
    );
    // Not streamed: the same deadline, as a 504.
    let r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "device", "messages": [{"role": "user", "content": "go on"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
}

#[tokio::test]
async fn shutdown_lets_a_short_stream_finish_and_cuts_a_long_one_after_the_grace() {
    for (pieces, finishes) in [(50, true), (20_000, false)] {
        let s = TestServer::start_with(
            scripted(pieces),
            ServerConfig {
                shutdown_grace: Duration::from_millis(1500),
                ..ServerConfig::default()
            },
        )
        .await;
        let url = s.url("/v1/chat/completions");
        let reader = tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(url)
                .json(&json!({"model": "device", "stream": true,
                    "messages": [{"role": "user", "content": "go on"}]}))
                .send()
                .await
                .unwrap();
            let mut body = String::new();
            let mut r = r;
            while let Ok(Some(chunk)) = r.chunk().await {
                body.push_str(&String::from_utf8_lossy(&chunk));
            }
            body
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let started = Instant::now();
        s.stop().await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
        let body = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the client is not left hanging")
            .unwrap();
        assert_eq!(body.contains("[DONE]"), finishes, "{pieces} pieces");
        if !finishes {
            assert!(
                took >= Duration::from_millis(1400),
                "cut before the grace: {took:?}"
            );
        }
    }
}

async fn send(
    s: &TestServer,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .body(body.to_owned());
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    (status, h, r.json().await.unwrap_or(Value::Null))
}

const CHAT: &str = r#"{"model": "device", "messages": [{"role": "user", "content": "hi"}]}"#;
const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn an_open_server_refuses_web_pages() {
    let s = TestServer::start(scripted(1)).await;
    // A fetch() from another site, as a "simple" request.
    let (status, _, v) = send(
        &s,
        &[
            ("content-type", "text/plain"),
            ("origin", "https://evil.example"),
        ],
        CHAT,
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "origin_not_allowed");
    // DNS rebinding: the page's own origin, and a Host that is a name.
    let (status, _, v) = send(&s, &[JSON, ("host", "rebind.evil.example:8080")], CHAT).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["code"], "host_not_allowed");
    // A form post without an Origin (old browsers, sendBeacon).
    let (status, _, v) = send(
        &s,
        &[("content-type", "application/x-www-form-urlencoded")],
        CHAT,
    )
    .await;
    assert_eq!(status, 415, "{v}");
    // A local web app may call it and read the answer.
    let (status, h, v) = send(&s, &[JSON, ("origin", "http://localhost:5173")], CHAT).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h["access-control-allow-origin"], "http://localhost:5173");
    // What SDKs and curl send.
    let (status, h, v) = send(&s, &[JSON], CHAT).await;
    assert_eq!(status, 200, "{v}");
    assert!(!h.contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn with_keys_cors_goes_to_configured_origins_only_and_healthz_hides_detail() {
    let key = "tdm_0123456789abcdef";
    let keys = vec![KeyConfig {
        name: "app".into(),
        hash: hash_key(key),
        privacy: None,
        daily_budget_usd: None,
        rate_limit_per_minute: None,
        admin: false,
    }];
    let s = TestServer::start_with(
        scripted_with_keys(1, keys),
        ServerConfig {
            cors_origins: vec!["https://app.example".into()],
            ..ServerConfig::default()
        },
    )
    .await;
    let client = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        client
            .request(reqwest::Method::OPTIONS, s.url("/v1/chat/completions"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let ok = preflight("https://app.example").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let other = preflight("https://evil.example").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));

    let auth = format!("bearer {key}");
    let (status, h, v) = send(
        &s,
        &[
            JSON,
            ("authorization", &auth),
            ("origin", "https://app.example"),
        ],
        CHAT,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(h["access-control-allow-origin"], "https://app.example");

    let bare: Value = client
        .get(s.url("/healthz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bare, json!({"status": "ok"}));
    let full: Value = client
        .get(s.url("/healthz"))
        .header("authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(full["backends"][0]["name"], "local", "{full}");
}

/// The breaker's trial request is given back when its client goes away:
/// the cloud is used again as soon as it answers, not after a restart.
#[tokio::test]
async fn the_breaker_recovers_after_a_trial_whose_client_went_away() {
    use tandem_backends::UpstreamConfig;
    use tandem_testkit::capture::{CaptureUpstream, Mode};
    let echo = CaptureUpstream::start(None, Mode::Echo).await;
    let front = CaptureUpstream::start(
        Some(echo.base_url()),
        Mode::Fail {
            status: 500,
            times: 1,
        },
    )
    .await;
    let mut u = UpstreamConfig::new("cloud", &front.base_url(), &["big"]);
    u.breaker_failures = 1;
    u.breaker_cooldown_ms = 50;
    let s = gateway(u).await;
    let ask = json!({"model": "big", "messages": [{"role": "user", "content": "hello"}]});
    let client = reqwest::Client::new();
    let chat = |timeout: Duration| {
        client
            .post(s.url("/v1/chat/completions"))
            .json(&ask)
            .timeout(timeout)
            .send()
    };
    let r = chat(Duration::from_secs(10)).await.unwrap();
    assert_eq!(r.status(), 500, "the failure opens the breaker");
    tokio::time::sleep(Duration::from_millis(80)).await;
    // The trial stalls and its client gives up.
    front.set_mode(Mode::Delay(Duration::from_secs(3)));
    assert!(chat(Duration::from_millis(300)).await.is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    front.set_mode(Mode::Forward);
    let r = chat(Duration::from_secs(10)).await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("hello")
    );
    let health: Value = reqwest::get(s.url("/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["backends"][0]["breaker"], "closed", "{health}");
}

/// An upstream answer larger than the cap is cut off as broken, whole or
/// streamed, instead of being read into memory.
#[tokio::test]
async fn an_oversized_upstream_answer_is_cut_off() {
    use tandem_backends::UpstreamConfig;
    use tandem_testkit::capture::{CaptureUpstream, Mode};
    let echo = CaptureUpstream::start(None, Mode::Echo).await;
    let mut u = UpstreamConfig::new("cloud", &echo.base_url(), &["big"]);
    u.max_response_bytes = 8 * 1024;
    let s = gateway(u).await;
    let client = reqwest::Client::new();
    let ask = |stream: bool, words: usize| {
        client
            .post(s.url("/v1/chat/completions"))
            .json(&json!({"model": "big", "stream": stream,
                "messages": [{"role": "user", "content": "echo ".repeat(words)}]}))
            .send()
    };
    // Within the cap: answered.
    let r = ask(false, 20).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = ask(false, 4_000).await.unwrap();
    assert_eq!(r.status(), 502, "{}", r.text().await.unwrap());
    let streamed = ask(true, 4_000).await.unwrap().text().await.unwrap();
    assert!(
        streamed.contains("\"error\""),
        "{}",
        &streamed[streamed.len().saturating_sub(300)..]
    );
    assert!(!streamed.contains("[DONE]"));
}

/// The fault the soak injects: a connection cut after a few events, even
/// when the upstream sent them all at once, reaches a named-cloud client as
/// an error event (nothing may continue a named model's answer).
#[tokio::test]
async fn a_stream_cut_mid_answer_ends_with_an_error_event() {
    use tandem_backends::UpstreamConfig;
    use tandem_testkit::capture::{CaptureUpstream, Mode};
    let echo = CaptureUpstream::start(None, Mode::Echo).await;
    let front = CaptureUpstream::start(Some(echo.base_url()), Mode::KillAfter(3)).await;
    let s = gateway(UpstreamConfig::new("cloud", &front.base_url(), &["big"])).await;
    let body = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&json!({"model": "big", "stream": true,
            "messages": [{"role": "user", "content": "a long enough message to echo back"}]}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(body.contains("\"ECH\""), "{body}");
    assert!(body.contains("\"error\""), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
}
