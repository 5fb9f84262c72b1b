//! Tandem's HTTP face: OpenAI's API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`), Tandem's own routes (`/v1/tandem/route`
//! for dry runs, `/v1/tandem/signals`, `/v1/tandem/spec/sessions` for
//! devices' speculative decoding), `/metrics`, `/healthz`, and the
//! operator's dashboard at `/ui`.
//!
//! Handlers only translate: wire request → [`tandem_api::GenerateRequest`]
//! → [`Dispatcher`] → wire response, with the routing decision in
//! `x-tandem-*` headers. Authentication, limits, tracing and panic safety
//! are tower layers; every error leaves as OpenAI's error JSON.

#![warn(missing_docs)]

mod conn;
mod error;
mod guard;
mod handlers;
mod keys;
mod sse;
mod ui;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tandem_api::ApiError;
use tandem_router::Dispatcher;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use error::{HttpError, OpenAiJson};

/// Bytes of the dashboard page (`/ui`), markup, style and script together.
pub const UI_PAGE_BYTES: usize = ui::PAGE.len();

/// Limits of the HTTP server. Every one is bounded by default; the
/// README's table lists them.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a connection may take to send a request's headers, and how
    /// long a kept-alive connection may sit idle before the next one
    /// (nginx's `client_header_timeout` and `keepalive_timeout`).
    pub header_timeout: Duration,
    /// How long a request's whole body may take to arrive; slower is a 408
    /// and the connection is closed.
    pub body_timeout: Duration,
    /// Open connections at most; one more gets a 503 and is closed
    /// (nginx's `limit_conn`).
    pub max_connections: usize,
    /// The longest a streamed answer may run before it is ended with an
    /// error event.
    pub stream_deadline: Duration,
    /// On shutdown, how long open requests (streams included) may take to
    /// finish before their connections are cut.
    pub shutdown_grace: Duration,
    /// Host names served besides loopback names and IP literals when no API
    /// keys are configured (`*` for any); guards against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the API (CORS); loopback origins are
    /// always allowed when no keys are configured, `*` allows any.
    pub cors_origins: Vec<String>,
    /// Texts one `/v1/embeddings` request may carry.
    pub max_embedding_inputs: usize,
    /// Word pieces one `/v1/embeddings` request may carry in all (each
    /// text counts at most the embedder's window).
    pub max_embedding_tokens: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(60),
            max_connections: 512,
            stream_deadline: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(10),
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
            max_embedding_inputs: 128,
            max_embedding_tokens: 16_384,
        }
    }
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) started: u64,
    config: ServerConfig,
    /// Turns true when the server starts shutting down: long-lived feeds end.
    pub(crate) closing: tokio::sync::watch::Receiver<bool>,
    close: Arc<tokio::sync::watch::Sender<bool>>,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    /// State over `dispatcher`.
    pub fn new(dispatcher: Arc<Dispatcher>, config: ServerConfig) -> Self {
        let (close, closing) = tokio::sync::watch::channel(false);
        Self {
            dispatcher,
            started: unix_now(),
            config,
            closing,
            close: Arc::new(close),
        }
    }

    /// The dispatcher requests go to.
    pub fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.dispatcher
    }
}

/// Every endpoint, as an unknown URL's error lists them (a test checks
/// that each one is routed).
pub const ENDPOINTS: &[&str] = &[
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "GET /v1/models",
    "GET /v1/models/{id}",
    "POST /v1/tandem/route",
    "GET|PUT|DELETE /v1/tandem/signals",
    "GET|DELETE /v1/tandem/cache",
    "POST /v1/tandem/spec/sessions",
    "POST /v1/tandem/spec/sessions/{id}/verify",
    "DELETE /v1/tandem/spec/sessions/{id}",
    "GET /metrics",
    "GET /healthz",
    "GET /ui",
    "GET /ui/api/feed",
    "GET /ui/api/state",
    "GET /ui/api/ledger",
];

async fn unknown_route(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::not_found(format!(
        "Unknown request URL: {method} {}. Tandem serves: {}.",
        uri.path(),
        ENDPOINTS.join(", ")
    )))
}

async fn wrong_method(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::new(
        405,
        tandem_api::ErrorKind::InvalidRequestError,
        format!("{method} is not allowed on {}", uri.path()),
    ))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    HttpError(ApiError::internal(
        "internal error while handling the request",
    ))
    .into_response()
}

/// Checks the gateway key (when keys are configured) and passes the caller
/// on to handlers.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    match state
        .dispatcher
        .access()
        .authenticate(header.as_deref())
        .await
    {
        Ok(caller) => {
            if let Some(c) = caller {
                req.extensions_mut().insert(c);
            }
            next.run(req).await
        }
        Err(e) => HttpError(e).into_response(),
    }
}

/// The full application: routes plus layers.
pub fn app(state: AppState) -> Router {
    let limit = state.config.max_body_bytes;
    let protected = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{id}", get(handlers::get_model))
        .route("/v1/tandem/route", post(handlers::explain_route))
        .route(
            "/v1/tandem/signals",
            get(handlers::get_signals)
                .put(handlers::put_signals)
                .delete(handlers::clear_signals),
        )
        .route("/v1/embeddings", post(handlers::embeddings))
        .route(
            "/v1/tandem/cache",
            get(handlers::cache_info).delete(handlers::clear_cache),
        )
        .route("/v1/tandem/spec/sessions", post(handlers::spec_open))
        .route(
            "/v1/tandem/spec/sessions/{id}/verify",
            post(handlers::spec_verify),
        )
        .route(
            "/v1/tandem/spec/sessions/{id}",
            axum::routing::delete(handlers::spec_close),
        )
        .route("/v1/tandem/keys", get(keys::list).post(keys::create))
        .route(
            "/v1/tandem/keys/{name}",
            axum::routing::patch(keys::update).delete(keys::revoke),
        )
        .route("/metrics", get(handlers::metrics))
        .route("/ui/api/feed", get(ui::feed))
        .route("/ui/api/state", get(ui::state))
        .route("/ui/api/ledger", get(ui::ledger))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    let cors = guard::cors(
        &state.config.cors_origins,
        state.dispatcher.access().is_open(),
    );
    Router::new()
        .merge(protected)
        .route("/healthz", get(handlers::health))
        .route("/ui", get(ui::page))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), guard::body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::browsers,
        ))
        .layer(cors)
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets open requests finish within
/// [`ServerConfig::shutdown_grace`] and cuts what is left.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let config = state.config.clone();
    let close = state.close.clone();
    let shutdown = async move {
        shutdown.await;
        let _ = close.send(true);
    };
    conn::serve(listener, app(state), &config, shutdown).await
}
