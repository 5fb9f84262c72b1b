//! Tandem's HTTP face: OpenAI's API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`) and `/healthz`, over any set of
//! [`Backend`]s.
//!
//! Handlers only translate: wire request → [`tandem_api::GenerateRequest`]
//! → backend → wire response. Limits, tracing and panic safety are tower
//! layers; every error leaves as OpenAI's error JSON.

mod error;
mod handlers;
mod sse;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::routing::{get, post};
use tandem_api::{ApiError, Backend};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

pub use error::{HttpError, OpenAiJson};

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

/// What handlers share: the backends and which model each serves.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<StateInner>,
}

struct StateInner {
    backends: Vec<Arc<dyn Backend>>,
    by_model: HashMap<String, Arc<dyn Backend>>,
    config: ServerConfig,
    started: u64,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl AppState {
    /// Backends earlier in the list win when two serve the same model name.
    pub fn new(backends: Vec<Arc<dyn Backend>>, config: ServerConfig) -> Self {
        let mut by_model = HashMap::new();
        for b in &backends {
            for m in b.models() {
                by_model.entry(m.id).or_insert_with(|| b.clone());
            }
        }
        Self {
            inner: Arc::new(StateInner {
                backends,
                by_model,
                config,
                started: unix_now(),
            }),
        }
    }

    pub fn backends(&self) -> &[Arc<dyn Backend>] {
        &self.inner.backends
    }

    pub(crate) fn backend_for(&self, model: &str) -> Result<Arc<dyn Backend>, ApiError> {
        self.inner
            .by_model
            .get(model)
            .cloned()
            .ok_or_else(|| ApiError::model_not_found(model))
    }
}

async fn unknown_route(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::not_found(format!(
        "Unknown request URL: {method} {}. Tandem serves /v1/chat/completions, /v1/completions, /v1/models and /healthz.",
        uri.path()
    )))
}

async fn wrong_method(method: Method, uri: Uri) -> HttpError {
    HttpError(ApiError::new(
        405,
        tandem_api::ErrorKind::InvalidRequestError,
        format!("{method} is not allowed on {}", uri.path()),
    ))
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    use axum::response::IntoResponse;
    HttpError(ApiError::internal(
        "internal error while handling the request",
    ))
    .into_response()
}

/// The full application: routes plus layers.
pub fn app(state: AppState) -> Router {
    let limit = state.inner.config.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{id}", get(handlers::get_model))
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
