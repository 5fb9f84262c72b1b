//! Tandem's HTTP face: OpenAI's API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`), Tandem's own routes (`/v1/tandem/route`
//! for dry runs, `/v1/tandem/signals`, `/v1/tandem/spec/sessions` for
//! devices' speculative decoding), `/metrics` and `/healthz`.
//!
//! Handlers only translate: wire request → [`tandem_api::GenerateRequest`]
//! → [`Dispatcher`] → wire response, with the routing decision in
//! `x-tandem-*` headers. Authentication, limits, tracing and panic safety
//! are tower layers; every error leaves as OpenAI's error JSON.

#![warn(missing_docs)]

mod error;
mod handlers;
mod sse;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

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

/// Limits of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
        }
    }
}

/// What handlers share.
#[derive(Clone)]
pub struct AppState {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) started: u64,
    config: ServerConfig,
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
        Self {
            dispatcher,
            started: unix_now(),
            config,
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
        .and_then(|v| v.to_str().ok());
    match state.dispatcher.access().authenticate(header) {
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
        .route("/metrics", get(handlers::metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
    Router::new()
        .merge(protected)
        .route("/healthz", get(handlers::health))
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// Serves until `shutdown` resolves, then lets open requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
