//! One error type for every layer, shaped like OpenAI's error JSON so that the
//! server can hand it to clients unchanged.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The `type` field of OpenAI's error object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// 400: the request is malformed or asks for something impossible.
    InvalidRequestError,
    /// 401: no or a wrong API key.
    AuthenticationError,
    /// 403: not allowed (a privacy rule, a non-admin key).
    PermissionError,
    /// 404: no such route, model or session.
    NotFoundError,
    /// 429: a rate limit or budget.
    RateLimitError,
    /// 5xx: a fault here or upstream.
    ServerError,
    /// 503: no capacity now.
    ServiceUnavailable,
}

/// An error that ends a request. `status` is the HTTP status it maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// OpenAI's error type.
    pub kind: ErrorKind,
    /// What went wrong, for a person.
    pub message: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, ...).
    pub code: Option<String>,
}

impl ApiError {
    /// An error of any status.
    pub fn new(status: u16, kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(400, ErrorKind::InvalidRequestError, message)
    }

    /// 400 naming the offending field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid_request(message)
            .with_param(param)
            .with_code("invalid_value")
    }

    /// 404: the model does not exist here.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            404,
            ErrorKind::InvalidRequestError,
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 400: the prompt does not fit the model's context.
    pub fn context_length_exceeded(message: impl Into<String>) -> Self {
        Self::invalid_request(message)
            .with_param("messages")
            .with_code("context_length_exceeded")
    }

    /// 404 with a message of the caller's.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, ErrorKind::NotFoundError, message)
    }

    /// 413: the body is larger than the server accepts.
    pub fn payload_too_large() -> Self {
        Self::new(
            413,
            ErrorKind::InvalidRequestError,
            "The request body is larger than this server accepts.",
        )
        .with_code("payload_too_large")
    }

    /// 401: the API key is missing or wrong.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, ErrorKind::AuthenticationError, message).with_code("invalid_api_key")
    }

    /// 403: not allowed.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(403, ErrorKind::PermissionError, message)
    }

    /// 429: too many requests.
    pub fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(429, ErrorKind::RateLimitError, message).with_code("rate_limit_exceeded")
    }

    /// 503: the work cannot be taken now (engine queue full, no backend left).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, ErrorKind::ServiceUnavailable, message).with_code("overloaded")
    }

    /// 500: a fault on our side; the message must not leak secrets.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, ErrorKind::ServerError, message)
    }

    /// 502: an upstream answered with something we cannot use.
    pub fn bad_gateway(message: impl Into<String>) -> Self {
        Self::new(502, ErrorKind::ServerError, message).with_code("upstream_error")
    }

    /// 504: an upstream did not answer in time.
    pub fn gateway_timeout(message: impl Into<String>) -> Self {
        Self::new(504, ErrorKind::ServerError, message).with_code("upstream_timeout")
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &str) -> Self {
        self.code = Some(code.to_owned());
        self
    }

    /// A 4xx: the request's fault, not the backend's.
    pub fn is_client_error(&self) -> bool {
        (400..500).contains(&self.status)
    }

    /// The JSON body OpenAI clients expect: `{"error": {...}}`.
    pub fn to_body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code.clone(),
            },
        }
    }

    /// Reads an OpenAI-style error body (as sent by an upstream) back.
    pub fn from_body(status: u16, body: &[u8]) -> Self {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(b) => Self {
                status,
                kind: b.error.kind,
                message: b.error.message,
                param: b.error.param,
                code: b.error.code,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let snippet: String = text.chars().take(200).collect();
                Self::new(
                    status,
                    if status >= 500 {
                        ErrorKind::ServerError
                    } else {
                        ErrorKind::InvalidRequestError
                    },
                    format!("upstream returned status {status}: {snippet}"),
                )
            }
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ApiError {}

/// OpenAI's error JSON: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorObject,
}

/// The object inside [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorObject {
    /// What went wrong.
    pub message: String,
    /// OpenAI's `type`.
    #[serde(rename = "type", default = "default_kind")]
    pub kind: ErrorKind,
    /// The request field at fault.
    #[serde(default)]
    pub param: Option<String>,
    /// A machine-readable code.
    #[serde(default, deserialize_with = "code_as_string")]
    pub code: Option<String>,
}

fn default_kind() -> ErrorKind {
    ErrorKind::ServerError
}

/// Some servers send numeric codes; keep them as text.
fn code_as_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let v = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match v {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_round_trips() {
        let e = ApiError::invalid_param("temperature", "temperature must be between 0 and 2");
        let json = serde_json::to_vec(&e.to_body()).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        let back = ApiError::from_body(400, &json);
        assert_eq!(back, e);
    }

    #[test]
    fn non_json_upstream_body_is_summarised() {
        let e = ApiError::from_body(502, b"<html>bad gateway</html>");
        assert_eq!(e.status, 502);
        assert!(e.message.contains("bad gateway"));
    }
}
