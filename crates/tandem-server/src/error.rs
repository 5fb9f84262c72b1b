//! One error shape on the wire: every failure, from a malformed body to an
//! unknown route or a panic, reaches the client as OpenAI's error JSON.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tandem_api::ApiError;

/// [`ApiError`] as an HTTP response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "{}", self.0.message);
        } else {
            tracing::debug!(status = status.as_u16(), "{}", self.0.message);
        }
        (status, axum::Json(self.0.to_body())).into_response()
    }
}

/// A JSON body read the way OpenAI's API reads it: a 400 that names the
/// field at fault. (When no keys are configured, [`crate::guard`] also
/// requires a JSON content type.)
pub struct OpenAiJson<T>(pub T);

impl<S, T> FromRequest<S> for OpenAiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, HttpError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                HttpError(ApiError::payload_too_large())
            } else {
                HttpError(ApiError::invalid_request(format!(
                    "could not read the request body: {}",
                    r.body_text()
                )))
            }
        })?;
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            None => {
                return Err(HttpError(ApiError::invalid_request(
                    "the request body is empty: expected a JSON object",
                )));
            }
            // serde reads a struct from an array too (by position): `[1]`
            // would silently set the first field.
            Some(b'{') => {}
            Some(_) => {
                return Err(HttpError(ApiError::invalid_request(
                    "invalid JSON body: expected a JSON object",
                )));
            }
        }
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = if path == "." || path.is_empty() {
                format!("invalid JSON body: {inner}")
            } else {
                format!("invalid JSON body at `{path}`: {inner}")
            };
            let mut err = ApiError::invalid_request(message);
            if path != "." && !path.is_empty() {
                err = err.with_param(&path);
            }
            HttpError(err)
        })?;
        // One JSON document and nothing after it but whitespace: a body with
        // trailing bytes was cut or concatenated somewhere, and guessing
        // which part was meant could send the wrong request.
        de.end().map_err(|e| {
            HttpError(ApiError::invalid_request(format!(
                "invalid JSON body: unexpected data after the JSON value ({e})"
            )))
        })?;
        Ok(OpenAiJson(value))
    }
}
