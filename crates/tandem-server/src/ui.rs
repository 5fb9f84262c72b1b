//! The operator's dashboard: `/ui` is one page built into the binary (no
//! asset fetched from anywhere at run time); what it shows comes from
//! `/ui/api/*`, behind an admin key when keys are configured:
//!
//! - `GET /ui/api/feed`: server-sent events — a `snapshot` (recent requests
//!   and totals) then one `request` event per request as it ends;
//! - `GET /ui/api/state`: the device, each upstream, overrides, totals;
//! - `GET /ui/api/ledger`: the egress ledger's tail and whether its chain
//!   verifies.
//!
//! Overrides are set through `PUT`/`DELETE /v1/tandem/signals`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_api::ApiError;
use tandem_router::access::Caller;
use tokio::sync::broadcast::error::RecvError;

use crate::AppState;
use crate::error::HttpError;
use crate::handlers::require_admin;

/// The page: markup, style and script in one file.
pub const PAGE: &str = include_str!("ui/index.html");

/// `GET /ui`: the page shell. It holds no data, so it needs no key; the
/// data behind it does.
pub async fn page() -> Response {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Nothing but this origin: the page fetches no script, style or font.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    (h, PAGE).into_response()
}

fn event(name: &str, value: &impl serde::Serialize) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(s) => SseEvent::default().event(name).data(s),
        Err(e) => SseEvent::default()
            .event("error")
            .data(format!(r#"{{"message":"cannot encode: {e}"}}"#)),
    }
}

/// `GET /ui/api/feed`.
pub async fn feed(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, HttpError> {
    require_admin(&caller, &state)?;
    let activity = state.dispatcher.activity().clone();
    // Subscribed before the snapshot, so nothing falls between the two;
    // what both hold is sent once.
    let mut rx = activity.subscribe();
    let (recent, totals) = activity.snapshot();
    let mut last = recent.last().map_or(0, |e| e.seq);
    let mut closing = state.closing.clone();
    let deadline = tokio::time::Instant::now() + state.config.stream_deadline;
    let stream = async_stream::stream! {
        let events: Vec<&tandem_router::activity::RequestEvent> = recent.iter().map(|e| &**e).collect();
        yield Ok(event("snapshot", &json!({"events": events, "totals": totals})));
        loop {
            let next = tokio::select! {
                r = rx.recv() => r,
                // The page reconnects; a server shutting down or a feed
                // open past the deadline does not hold a connection.
                _ = closing.wait_for(|c| *c) => break,
                () = tokio::time::sleep_until(deadline) => break,
            };
            match next {
                Ok(e) if e.seq <= last => {}
                Ok(e) => {
                    last = e.seq;
                    yield Ok(event("request", &*e));
                }
                Err(RecvError::Lagged(n)) => {
                    yield Ok(event("lagged", &json!({"missed": n})));
                }
                Err(RecvError::Closed) => break,
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

/// What each backend is doing, as `/healthz` shows it to a key holder.
pub(crate) fn backends(state: &AppState) -> Vec<Value> {
    let d = &state.dispatcher;
    let network = d.signals().network();
    d.backends()
        .map(|b| {
            let name = b.name();
            let mut v = json!({
                "name": name,
                "locality": b.locality(),
                "models": b.models().into_iter().map(|m| m.id).collect::<Vec<_>>(),
                "load": b.load(),
                "capabilities": b.capabilities().features,
            });
            match b.locality() {
                tandem_api::Locality::Local => {
                    let m = b.models();
                    v["model"] = json!(m.first().map(|m| m.id.clone()));
                    v["context_length"] = json!(m.first().and_then(|m| m.context_length));
                }
                tandem_api::Locality::Cloud => {
                    let h = b.health();
                    v["breaker"] = json!(h.breaker);
                    v["reachable"] = json!(d.signals().reachable(name));
                    v["rtt_ms"] = json!(network.upstreams.get(name).and_then(|u| u.rtt_ms));
                    v["latency"] = json!({"ttft_ms": h.ttft_ms, "tokens_per_s": h.tokens_per_s});
                }
            }
            v
        })
        .collect()
}

/// `GET /ui/api/state`.
pub async fn state(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    let d = &state.dispatcher;
    let s = d.signals();
    let (_, totals) = d.activity().snapshot();
    let policy = d.policy();
    Ok(Json(json!({
        "started": state.started,
        "now": crate::unix_now(),
        "device": s.device(),
        "network": s.network(),
        "overrides": s.overrides(),
        "backends": backends(&state),
        "totals": totals,
        "router": {
            "cascade": policy.cascade,
            "learned": d.has_router(),
            "memory": d.memory().map(|m| m.len()),
            "cache": d.cache().is_some(),
        },
        "ledger": d.ledger().map(|l| l.path().display().to_string()),
        "shared_state": d.shared().map(|s| s.status()),
    })))
}

#[derive(Deserialize)]
pub struct LedgerQuery {
    /// Entries from the end.
    #[serde(default = "default_tail")]
    n: usize,
}

fn default_tail() -> usize {
    50
}

/// `GET /ui/api/ledger?n=50`.
pub async fn ledger(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
    Query(q): Query<LedgerQuery>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    let Some(ledger) = state.dispatcher.ledger().cloned() else {
        return Ok(Json(json!({"kept": false})));
    };
    let n = q.n.min(500);
    let (verified, tail) = tokio::task::spawn_blocking(move || ledger.check(n))
        .await
        .map_err(|_| HttpError(ApiError::internal("the ledger check failed")))?;
    let verification = match verified {
        Ok(v) => json!({
            "ok": true,
            "entries": v.entries,
            "unfinished": v.unfinished,
            "head": v.head.map(|h| json!({"seq": h.seq, "hash": h.hash})),
        }),
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    };
    Ok(Json(json!({
        "kept": true,
        "verification": verification,
        "tail": tail,
    })))
}
