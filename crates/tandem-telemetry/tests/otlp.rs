//! Traces as a collector receives them: a device Tandem (SmolLM2) with a
//! cloud-role Tandem upstream exports over OTLP/HTTP (protobuf) to a
//! receiver this test runs on loopback, which decodes every span.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};
use prost::Message;
use serde_json::json;
use tandem_backends::{CloudBackend, UpstreamConfig};
use tandem_router::Dispatcher;
use tandem_telemetry::{Telemetry, TelemetryConfig};
use tandem_testkit::{SMOLLM2, TestServer, post_json, shared_engine};

/// A collector: keeps each export's bytes.
async fn receiver() -> (String, Arc<Mutex<Vec<Bytes>>>) {
    let got: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let keep = got.clone();
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().unwrap().push(body);
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), got)
}

fn value(v: &Option<AnyValue>) -> serde_json::Value {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => json!(s),
        Some(any_value::Value::IntValue(i)) => json!(i),
        Some(any_value::Value::DoubleValue(d)) => json!(d),
        Some(any_value::Value::BoolValue(b)) => json!(b),
        Some(any_value::Value::ArrayValue(a)) => {
            json!(
                a.values
                    .iter()
                    .map(|v| value(&Some(v.clone())))
                    .collect::<Vec<_>>()
            )
        }
        _ => serde_json::Value::Null,
    }
}

fn attr(attrs: &[KeyValue], key: &str) -> serde_json::Value {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .map_or(serde_json::Value::Null, |kv| value(&kv.value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_a_trace_with_genai_attributes_and_nothing_personal() {
    let (collector, got) = receiver().await;
    let engine = shared_engine(SMOLLM2, 1024, 2);
    // The cloud's model is the device's, loaded apart: it verifies the
    // device's drafts in a session of its own.
    let cloud = TestServer::start(
        Dispatcher::builder()
            .local(shared_engine(SMOLLM2, 1024, 1))
            .build()
            .unwrap(),
    )
    .await;
    let mut u = UpstreamConfig::new("cloud", &cloud.url("/v1"), &[SMOLLM2]);
    u.price_input_per_mtok = 1.0;
    u.price_output_per_mtok = 2.0;
    let d = Dispatcher::builder()
        .local(engine)
        .cloud(CloudBackend::new(u).unwrap())
        .build()
        .unwrap();
    let config = TelemetryConfig {
        otlp_endpoint: Some(collector),
        ..TelemetryConfig::default()
    };
    let telemetry = Arc::new(Telemetry::start(&config, d.activity()).unwrap().unwrap());
    let device = TestServer::start(d.clone()).await;
    let ask = |prompt: &'static str, headers: Vec<(&'static str, &'static str)>| {
        let url = device.url("/v1/chat/completions");
        async move {
            let body = json!({
                "model": "tandem/auto",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 6, "temperature": 0,
            });
            let r = post_json(&url, &body, &headers).await;
            assert_eq!(r.status, 200, "{}", r.text());
            r.header("x-request-id")
        }
    };
    let local = ask("What is the capital of France?", vec![]).await;
    d.signals().set_overrides(
        serde_json::from_value(json!({"battery_pct": 5.0, "charging": false})).unwrap(),
    );
    let cloudy = ask(
        "My email is jane.doe@example.com, greet me.",
        vec![("x-tandem-privacy", "redact")],
    )
    .await;
    let drafted = ask(
        "Count from one to five.",
        vec![("x-tandem-mode", "speculative")],
    )
    .await;
    d.signals().clear_overrides();
    let cascaded = ask("Name a colour.", vec![("x-tandem-mode", "cascade")]).await;

    // Events reach the exporter's task asynchronously; wait for the third.
    let mut spans: Vec<Span> = Vec::new();
    let mut service = serde_json::Value::Null;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let t = telemetry.clone();
        tokio::task::spawn_blocking(move || t.flush())
            .await
            .unwrap()
            .unwrap();
        spans.clear();
        for body in got.lock().unwrap().iter() {
            let req = ExportTraceServiceRequest::decode(body.as_ref()).expect("protobuf");
            for rs in req.resource_spans {
                if let Some(r) = &rs.resource {
                    service = attr(&r.attributes, "service.name");
                }
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
        }
        if spans.iter().filter(|s| s.parent_span_id.is_empty()).count() >= 4 {
            break;
        }
    }
    assert_eq!(service, "tandem");
    let root = |id: &str| {
        spans
            .iter()
            .find(|s| s.parent_span_id.is_empty() && attr(&s.attributes, "tandem.request_id") == id)
            .unwrap_or_else(|| panic!("no trace for {id}: {} spans", spans.len()))
    };
    let children = |r: &Span| -> Vec<&Span> {
        spans
            .iter()
            .filter(|s| s.parent_span_id == r.span_id && s.trace_id == r.trace_id)
            .collect()
    };

    let r = root(&local);
    assert_eq!(r.name, "chat tandem/auto");
    assert_eq!(r.kind, SpanKind::Server as i32);
    assert_eq!(attr(&r.attributes, "gen_ai.operation.name"), "chat");
    assert_eq!(attr(&r.attributes, "gen_ai.request.model"), "tandem/auto");
    assert_eq!(attr(&r.attributes, "gen_ai.response.model"), SMOLLM2);
    assert_eq!(attr(&r.attributes, "tandem.side"), "local");
    assert_eq!(attr(&r.attributes, "tandem.decided_by"), "prefer_local");
    assert_eq!(attr(&r.attributes, "gen_ai.request.max_tokens"), 6);
    assert!(
        attr(&r.attributes, "gen_ai.usage.output_tokens")
            .as_i64()
            .unwrap()
            > 0
    );
    let kids = children(r);
    assert!(kids.iter().any(|s| s.name == "tandem.decide"), "{kids:?}");
    assert!(kids.iter().any(|s| s.kind == SpanKind::Client as i32
        && attr(&s.attributes, "gen_ai.provider.name") == "tandem.local"
        && attr(&s.attributes, "tandem.outcome") == "ok"));

    let r = root(&cloudy);
    assert_eq!(attr(&r.attributes, "tandem.side"), "cloud");
    assert_eq!(attr(&r.attributes, "tandem.decided_by"), "device");
    assert_eq!(attr(&r.attributes, "tandem.redacted.email"), 1);
    assert!(attr(&r.attributes, "tandem.cost_usd").as_f64().unwrap() > 0.0);
    let reasons = attr(&r.attributes, "tandem.reasons");
    assert!(reasons.to_string().contains("battery at 5%"), "{reasons}");
    let leg = children(r)
        .into_iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .expect("a cloud leg");
    assert_eq!(attr(&leg.attributes, "gen_ai.provider.name"), "cloud");
    assert!(leg.start_time_unix_nano >= r.start_time_unix_nano);
    assert!(leg.end_time_unix_nano <= r.end_time_unix_nano);

    let r = root(&drafted);
    assert_eq!(attr(&r.attributes, "tandem.speculative"), "on");
    // The exchange is settled before the answer's end reaches the client.
    assert!(attr(&r.attributes, "tandem.cost_usd").as_f64().unwrap() > 0.0);
    let leg = children(r)
        .into_iter()
        .find(|s| attr(&s.attributes, "tandem.backend") == "cloud:cloud (speculative)")
        .expect("the speculative leg");
    let rounds = attr(&leg.attributes, "tandem.speculative.rounds")
        .as_i64()
        .unwrap();
    assert!(rounds >= 1);
    let traced: Vec<&Span> = children(leg)
        .into_iter()
        .filter(|s| s.name == "tandem.speculative.round")
        .collect();
    assert_eq!(traced.len() as i64, rounds.min(256));
    // The rounds add up to the leg's totals.
    let sum = |k: &str| -> i64 {
        traced
            .iter()
            .map(|s| attr(&s.attributes, k).as_i64().unwrap())
            .sum()
    };
    for k in ["tandem.speculative.drafted", "tandem.speculative.accepted"] {
        assert_eq!(sum(k), attr(&leg.attributes, k).as_i64().unwrap(), "{k}");
    }
    assert!(sum("tandem.speculative.drafted") >= 1);

    let r = root(&cascaded);
    let verdict = r
        .events
        .iter()
        .find(|e| e.name == "tandem.cascade")
        .expect("cascade event");
    let v = attr(&verdict.attributes, "tandem.verdict");
    assert!(
        v.as_str().unwrap().starts_with("kept") || v.as_str().unwrap().starts_with("escalated")
    );
    let first = children(r)
        .into_iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .min_by_key(|s| s.start_time_unix_nano)
        .expect("the device's attempt");
    assert_eq!(attr(&first.attributes, "tandem.backend"), "local");

    let all: Vec<u8> = got
        .lock()
        .unwrap()
        .iter()
        .flat_map(|b| b.to_vec())
        .collect();
    let text = String::from_utf8_lossy(&all);
    for secret in ["jane.doe", "example.com", "greet me", "capital of France"] {
        assert!(!text.contains(secret), "`{secret}` reached the collector");
    }
    let telemetry = Arc::try_unwrap(telemetry).expect("one holder");
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();
}
