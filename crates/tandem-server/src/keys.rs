//! The key registry through the API (admin keys only): list, make, change
//! and revoke gateway keys. With a shared store a change holds on every
//! replica; the key itself is shown once, when it is made, and only its
//! hash is kept.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Map, Value, json};
use tandem_api::ApiError;
use tandem_router::access::{Caller, KeyConfig};

use crate::AppState;
use crate::error::{HttpError, OpenAiJson};
use crate::handlers::require_admin;

fn shown(k: &KeyConfig) -> Value {
    json!({
        "name": k.name,
        "hash": k.hash,
        "privacy": k.privacy,
        "daily_budget_usd": k.daily_budget_usd,
        "rate_limit_per_minute": k.rate_limit_per_minute,
        "admin": k.admin,
    })
}

/// `GET /v1/tandem/keys`.
pub async fn list(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    let keys = state.dispatcher.access().list().await?;
    Ok(Json(json!({
        "object": "list",
        "data": keys.iter().map(shown).collect::<Vec<_>>(),
    })))
}

/// `POST /v1/tandem/keys` with `{"name": ..., limits...}`: 201 with the
/// key, shown this once.
pub async fn create(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
    OpenAiJson(mut body): OpenAiJson<Map<String, Value>>,
) -> Result<(StatusCode, Json<Value>), HttpError> {
    require_admin(&caller, &state)?;
    let name = match body.remove("name") {
        Some(Value::String(n)) => n,
        _ => {
            return Err(ApiError::invalid_param("name", "`name` (a string) is required").into());
        }
    };
    let (raw, config) = state.dispatcher.access().create(&name, &body).await?;
    let mut out = shown(&config);
    out["key"] = Value::String(raw);
    Ok((StatusCode::CREATED, Json(out)))
}

/// `PATCH /v1/tandem/keys/{name}`: the fields given replace the key's
/// (`null` lifts a limit).
pub async fn update(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
    Path(name): Path<String>,
    OpenAiJson(body): OpenAiJson<Map<String, Value>>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    let config = state.dispatcher.access().update(&name, &body).await?;
    Ok(Json(shown(&config)))
}

/// `DELETE /v1/tandem/keys/{name}`: refused from now on, everywhere.
pub async fn revoke(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    state.dispatcher.access().revoke(&name).await?;
    Ok(Json(json!({"revoked": name})))
}
