//! Tandem's requests as OpenTelemetry traces, exported over OTLP/HTTP to
//! whatever collector an operator runs (the OpenTelemetry Collector,
//! Jaeger, Tempo, Langfuse, Honeycomb…). Off unless `[telemetry]
//! otlp_endpoint` is set.
//!
//! Each request that ends becomes one trace, built from its
//! [`RequestEvent`] (so the dispatcher carries no tracing code of its own):
//!
//! - a root span `chat <model asked>` (kind server) with the GenAI semantic
//!   conventions' attributes (`gen_ai.operation.name`, `gen_ai.request.model`,
//!   `gen_ai.response.model`, `gen_ai.usage.input_tokens`…) and Tandem's
//!   (`tandem.side`, `tandem.decided_by`, `tandem.reasons`, cost, redaction
//!   counts per class), with events for a failover, a handoff and the
//!   cascade's verdict;
//! - a child `tandem.decide` span: the routing decision;
//! - a child span per side that worked on the answer (kind client), with
//!   its outcome (`ok`, `escalated`, `handoff`, `error: timeout`…), and the
//!   speculative rounds on a speculative one.
//!
//! Nothing personal goes into a span: events carry no prompt or answer
//! text, redactions are counts per class, and error messages (which may
//! quote a request) are reduced to status and code.

#![warn(missing_docs)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tandem_router::activity::{Activity, RequestEvent, Status as RequestStatus};
use tokio::sync::broadcast::error::RecvError;

/// The `[telemetry]` section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base URL (`http://localhost:4318`); traces
    /// go to `<it>/v1/traces`. None: no traces (the default).
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` (the default) or `http/json`.
    pub otlp_protocol: String,
    /// Headers sent with each export (a collector's API key, say).
    pub otlp_headers: HashMap<String, String>,
    /// `service.name` of the traces.
    pub service_name: String,
    /// Put the gateway key's name on spans (`tandem.key`); off by default,
    /// as a key's name may name a person.
    pub include_key_names: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: "http/protobuf".into(),
            otlp_headers: HashMap::new(),
            service_name: "tandem".into(),
            include_key_names: false,
        }
    }
}

/// Exports traces while it lives; [`shutdown`](Self::shutdown) sends what
/// is left.
pub struct Telemetry {
    provider: SdkTracerProvider,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

/// OTLP's HTTP client: Tandem's reqwest, run on the server's runtime
/// (the SDK's batch exporter calls from a thread of its own).
#[derive(Debug, Clone)]
struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let http = self.http.clone();
        let job = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let response = http.execute(request).await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            let mut out = http::Response::new(body);
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            Ok::<_, reqwest::Error>(out)
        });
        Ok(job.await??)
    }
}

fn endpoint(base: &str) -> String {
    let base = base.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

impl Telemetry {
    /// Starts exporting `activity`'s requests as configured; `None` when no
    /// endpoint is set. Call from within the server's Tokio runtime.
    pub fn start(
        config: &TelemetryConfig,
        activity: &Arc<Activity>,
    ) -> Result<Option<Telemetry>, String> {
        let Some(base) = config.otlp_endpoint.as_deref() else {
            return Ok(None);
        };
        let protocol = match config.otlp_protocol.as_str() {
            "http/protobuf" => Protocol::HttpBinary,
            "http/json" => Protocol::HttpJson,
            other => {
                return Err(format!(
                    "[telemetry] otlp_protocol `{other}` is not `http/protobuf` or `http/json`"
                ));
            }
        };
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "telemetry must start within the server's runtime".to_owned())?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("telemetry HTTP client: {e}"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Client { http, runtime })
            .with_endpoint(endpoint(base))
            .with_protocol(protocol)
            .with_headers(config.otlp_headers.clone())
            .with_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| format!("[telemetry] OTLP exporter: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(config.service_name.clone())
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("tandem");
        let mut rx = activity.subscribe();
        let keys = config.include_key_names;
        let task = tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(e) => record(&tracer, &e, keys),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("telemetry fell behind: {n} requests not traced");
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
        Ok(Some(Telemetry { provider, task }))
    }

    /// Sends the spans not yet exported and stops. Blocks until the
    /// collector answers or the export times out: call off async workers.
    pub fn shutdown(self) {
        self.task.abort();
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!("telemetry: the last traces were not exported: {e}");
        }
        let _ = self.provider.shutdown();
    }

    /// Sends the spans not yet exported, and waits (blocking) for the
    /// collector.
    pub fn flush(&self) -> Result<(), String> {
        self.provider.force_flush().map_err(|e| e.to_string())
    }
}

fn at(ms_since_epoch: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(ms_since_epoch.max(0.0) / 1e3)
}

fn kv(key: &'static str, value: impl Into<Value>) -> KeyValue {
    KeyValue::new(key, value)
}

/// The part of a text that carries no request content: a failover's
/// "local -> cloud: <message>" keeps only its direction.
fn direction(s: &str) -> String {
    s.split(':').next().unwrap_or_default().trim().to_owned()
}

/// One request's trace, sent to `tracer`'s exporter.
pub fn record(tracer: &SdkTracer, e: &RequestEvent, include_key: bool) {
    let start = e.at_ms as f64;
    let end = start + e.duration_ms;
    let mut attrs = vec![
        kv("gen_ai.operation.name", e.operation),
        kv("gen_ai.request.model", e.model_asked.clone()),
        kv("tandem.request_id", e.request_id.clone()),
        kv("tandem.side", e.side),
        kv("tandem.status", status_name(e.status)),
        kv("tandem.stream", e.stream),
        kv("tandem.cost_usd", e.cost_usd),
        kv("tandem.saved_usd", e.saved_usd),
    ];
    if !e.model.is_empty() {
        attrs.push(kv("gen_ai.response.model", e.model.clone()));
    }
    if !e.backend.is_empty() {
        attrs.push(kv("tandem.backend", e.backend.clone()));
    }
    if e.status == RequestStatus::Ok {
        attrs.push(kv("gen_ai.usage.input_tokens", i64::from(e.prompt_tokens)));
        attrs.push(kv(
            "gen_ai.usage.output_tokens",
            i64::from(e.completion_tokens),
        ));
    }
    if let Some(m) = e.max_tokens {
        attrs.push(kv("gen_ai.request.max_tokens", i64::from(m)));
    }
    if let Some(r) = &e.finish_reason {
        attrs.push(KeyValue::new(
            "gen_ai.response.finish_reasons",
            Value::Array(vec![opentelemetry::StringValue::from(r.clone())].into()),
        ));
    }
    if !e.decided_by.is_empty() {
        attrs.push(kv("tandem.decided_by", e.decided_by.clone()));
        attrs.push(KeyValue::new(
            "tandem.reasons",
            Value::Array(
                e.reasons
                    .iter()
                    .map(|r| opentelemetry::StringValue::from(r.clone()))
                    .collect::<Vec<_>>()
                    .into(),
            ),
        ));
    }
    if let Some((score, threshold)) = e.difficulty {
        attrs.push(kv("tandem.router.score", f64::from(score)));
        attrs.push(kv("tandem.router.threshold", f64::from(threshold)));
    }
    if let Some(t) = e.ttft_ms {
        attrs.push(kv("tandem.ttft_ms", t));
    }
    if let Some(t) = e.tokens_per_s {
        attrs.push(kv("tandem.tokens_per_s", t));
    }
    for (class, n) in &e.redacted {
        attrs.push(KeyValue::new(
            format!("tandem.redacted.{class}"),
            i64::from(*n),
        ));
    }
    if let Some(c) = &e.cache {
        attrs.push(kv("tandem.cache", c.clone()));
    }
    if let Some(r) = &e.replica {
        attrs.push(kv("tandem.replica", r.clone()));
    }
    if let Some(c) = &e.cascade {
        attrs.push(kv("tandem.cascade", c.clone()));
    }
    if let Some(s) = &e.speculative {
        attrs.push(kv("tandem.speculative", direction(s)));
    }
    if let Some(err) = &e.error {
        attrs.push(kv("error.type", err.clone()));
    }
    if include_key && let Some(k) = &e.key {
        attrs.push(kv("tandem.key", k.clone()));
    }
    let mut root = tracer
        .span_builder(format!("{} {}", e.operation, e.model_asked))
        .with_kind(SpanKind::Server)
        .with_start_time(at(start))
        .with_attributes(attrs)
        .start(tracer);
    match e.status {
        RequestStatus::Ok => root.set_status(Status::Ok),
        RequestStatus::Cancelled => {}
        _ => root.set_status(Status::error(e.error.clone().unwrap_or_default())),
    }
    if let Some(f) = &e.failover {
        root.add_event_with_timestamp(
            "tandem.failover",
            at(start),
            vec![kv("tandem.direction", direction(f))],
        );
    }
    if let Some(h) = &e.handoff {
        let mut parts = h.splitn(2, ':');
        let dir = parts.next().unwrap_or_default().trim().to_owned();
        let cause = parts.next().unwrap_or_default().trim().to_owned();
        let when = e
            .legs
            .iter()
            .find(|l| l.outcome.starts_with("error"))
            .map_or(end, |l| start + l.end_ms);
        root.add_event_with_timestamp(
            "tandem.handoff",
            at(when),
            vec![kv("tandem.direction", dir), kv("tandem.cause", cause)],
        );
    }
    if let Some(c) = &e.cascade {
        let when = e.legs.first().map_or(start, |l| start + l.end_ms);
        root.add_event_with_timestamp(
            "tandem.cascade",
            at(when),
            vec![kv("tandem.verdict", c.clone())],
        );
    }
    let cx = Context::new().with_span(root);
    if !e.decided_by.is_empty() || e.status == RequestStatus::Refused {
        let mut d = tracer
            .span_builder("tandem.decide")
            .with_kind(SpanKind::Internal)
            .with_start_time(at(start))
            .with_attributes(vec![
                kv("tandem.decided_by", e.decided_by.clone()),
                kv("tandem.decision_us", e.decision_us as i64),
            ])
            .start_with_context(tracer, &cx);
        d.end_with_timestamp(at(start + e.decision_us as f64 / 1e3));
    }
    for leg in &e.legs {
        let local = leg.backend == "local";
        let provider = leg
            .backend
            .strip_prefix("cloud:")
            .map(|u| u.trim_end_matches(" (speculative)"))
            .unwrap_or("tandem.local")
            .to_owned();
        let mut attrs = vec![
            kv("gen_ai.operation.name", e.operation),
            kv("gen_ai.provider.name", provider),
            kv("gen_ai.request.model", leg.model.clone()),
            kv("tandem.backend", leg.backend.clone()),
            kv("tandem.side", if local { "local" } else { "cloud" }),
            kv("tandem.outcome", leg.outcome.clone()),
        ];
        let speculative = e
            .speculative_tally
            .as_ref()
            .filter(|_| leg.backend.ends_with("(speculative)"));
        if let Some(t) = speculative {
            attrs.push(kv("tandem.speculative.rounds", t.rounds as i64));
            attrs.push(kv("tandem.speculative.drafted", t.drafted as i64));
            attrs.push(kv("tandem.speculative.accepted", t.accepted as i64));
        }
        let s = tracer
            .span_builder(format!("{} {}", e.operation, leg.model))
            .with_kind(SpanKind::Client)
            .with_start_time(at(start + leg.start_ms))
            .with_attributes(attrs)
            .start_with_context(tracer, &cx);
        let leg_cx = cx.with_span(s);
        // Each verification round under the leg that drafted it.
        for r in speculative.map(|t| t.traced.as_slice()).unwrap_or_default() {
            let mut round = tracer
                .span_builder("tandem.speculative.round")
                .with_kind(SpanKind::Internal)
                .with_start_time(at(start + r.start_ms))
                .with_attributes(vec![
                    kv("tandem.speculative.drafted", i64::from(r.drafted)),
                    kv("tandem.speculative.accepted", i64::from(r.accepted)),
                ])
                .start_with_context(tracer, &leg_cx);
            round.end_with_timestamp(at(start + r.end_ms));
        }
        let s = leg_cx.span();
        if leg.outcome.starts_with("error") {
            s.set_status(Status::error(leg.outcome.clone()));
        }
        s.end_with_timestamp(at(start + leg.end_ms));
    }
    cx.span().end_with_timestamp(at(end));
}

fn status_name(s: RequestStatus) -> &'static str {
    match s {
        RequestStatus::Ok => "ok",
        RequestStatus::Refused => "refused",
        RequestStatus::Error => "error",
        RequestStatus::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_gets_the_traces_path_once() {
        assert_eq!(endpoint("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(endpoint("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(
            endpoint("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn a_failover_keeps_its_direction_not_its_message() {
        assert_eq!(
            direction("local -> cloud: the prompt `my secret` is too long"),
            "local -> cloud"
        );
    }

    #[test]
    fn the_section_defaults_to_off() {
        let c = TelemetryConfig::default();
        assert!(c.otlp_endpoint.is_none());
        assert_eq!(c.otlp_protocol, "http/protobuf");
        assert!(!c.include_key_names);
    }
}
