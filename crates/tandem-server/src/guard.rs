//! What stands between the socket and the handlers: a deadline on reading
//! the body, and — when no API keys are configured — the checks that keep
//! web pages from using an open server (DNS rebinding through `Host`,
//! cross-site requests through `Origin` and non-JSON "simple" bodies), as
//! Ollama does. CORS headers go only to configured origins.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tandem_api::{ApiError, ErrorKind};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

use crate::AppState;
use crate::error::HttpError;

/// Reads the whole body within [`crate::ServerConfig::body_timeout`] and
/// [`crate::ServerConfig::max_body_bytes`]: a client that trickles its body
/// gets a 408 and loses the connection instead of holding it.
pub(crate) async fn body(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let limit = state.config.max_body_bytes;
    let read = tokio::time::timeout(state.config.body_timeout, axum::body::to_bytes(body, limit));
    match read.await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            // `to_bytes` reports the limit as http-body-util's
            // `LengthLimitError`, which axum does not re-export.
            let too_large =
                std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                    e.source()
                })
                .any(|e| e.to_string().contains("length limit exceeded"));
            if too_large {
                closing(HttpError(ApiError::payload_too_large()).into_response())
            } else {
                closing(
                    HttpError(ApiError::invalid_request(format!(
                        "could not read the request body: {e}"
                    )))
                    .into_response(),
                )
            }
        }
        Err(_) => closing(
            HttpError(ApiError::new(
                408,
                ErrorKind::InvalidRequestError,
                format!(
                    "the request body did not arrive within {} s",
                    state.config.body_timeout.as_secs_f64()
                ),
            ))
            .into_response(),
        ),
    }
}

/// The body was not read to its end: the connection cannot be reused.
fn closing(mut r: Response) -> Response {
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Refuses what only a web page would send to an open (keyless) server.
pub(crate) async fn browsers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.dispatcher.access().is_open()
        && let Err(e) = check_browser(req.method(), req.headers(), &state.config)
    {
        return HttpError(e).into_response();
    }
    next.run(req).await
}

fn check_browser(
    method: &Method,
    headers: &HeaderMap,
    config: &crate::ServerConfig,
) -> Result<(), ApiError> {
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !host_allowed(host, &config.allowed_hosts) {
            return Err(ApiError::forbidden(format!(
                "host `{}` is not served: with no API keys only loopback names and IP addresses are (add it to [server] allowed_hosts)",
                printable(host)
            ))
            .with_code("host_not_allowed"));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origin, &config.cors_origins, true) {
            return Err(ApiError::forbidden(format!(
                "requests from the web origin `{}` are refused: with no API keys only loopback origins are served (add it to [server] cors_origins)",
                printable(origin)
            ))
            .with_code("origin_not_allowed"));
        }
    }
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || headers.contains_key(header::TRANSFER_ENCODING);
    if matches!(*method, Method::POST | Method::PUT | Method::PATCH) && has_body {
        let ct = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !is_json(ct) {
            return Err(ApiError::new(
                415,
                ErrorKind::InvalidRequestError,
                format!(
                    "the body must be sent as `Content-Type: application/json` (got `{}`)",
                    printable(ct)
                ),
            )
            .with_code("unsupported_media_type"));
        }
    }
    Ok(())
}

fn printable(s: &str) -> String {
    s.chars()
        .take(100)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// `name[:port]` or `[v6]:port` → the name.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or("", |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Loopback names and IP literals cannot be rebound by a DNS answer;
/// any other name must be configured.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    name.parse::<std::net::IpAddr>().is_ok()
        || is_loopback_name(&name)
        || allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(&name))
}

fn is_loopback_name(name: &str) -> bool {
    name == "localhost" || name.ends_with(".localhost")
}

/// An origin (`scheme://host[:port]`) a page may call from. With `open`,
/// loopback origins are allowed besides the configured ones.
fn origin_allowed(origin: &str, configured: &[String], open: bool) -> bool {
    if configured
        .iter()
        .any(|c| c == "*" || c.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    if !open {
        return false;
    }
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    if !matches!(scheme, "http" | "https") {
        return false;
    }
    let name = host_name(rest).to_ascii_lowercase();
    is_loopback_name(&name)
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// CORS for the configured origins only (and loopback pages when the server
/// is open, so a local web app can read its answers).
pub(crate) fn cors(configured: &[String], open: bool) -> CorsLayer {
    let configured = configured.to_vec();
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers(Any)
        .expose_headers(Any)
        .max_age(std::time::Duration::from_secs(600));
    layer.allow_origin(AllowOrigin::predicate(move |origin, _| {
        origin
            .to_str()
            .is_ok_and(|o| origin_allowed(o, &configured, open))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let none: Vec<String> = Vec::new();
        for ok in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "10.0.0.7",
            "app.localhost:3000",
            "LOCALHOST.",
        ] {
            assert!(host_allowed(ok, &none), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "",
            "[::1",
        ] {
            assert!(!host_allowed(bad, &none), "{bad}");
        }
        assert!(host_allowed("tandem.lan:8080", &["tandem.lan".into()]));
        assert!(host_allowed("anything", &["*".into()]));
    }

    #[test]
    fn origins() {
        let none: Vec<String> = Vec::new();
        for ok in [
            "http://localhost:3000",
            "https://127.0.0.1",
            "http://[::1]:5173",
        ] {
            assert!(origin_allowed(ok, &none, true), "{ok}");
            assert!(!origin_allowed(ok, &none, false), "{ok}");
        }
        for bad in [
            "https://evil.example",
            "null",
            "http://10.0.0.7",
            "file://localhost",
        ] {
            assert!(!origin_allowed(bad, &none, true), "{bad}");
        }
        let app = vec!["https://app.example/".to_owned()];
        assert!(origin_allowed("https://app.example", &app, false));
    }

    #[test]
    fn json_content_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(ok), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "",
        ] {
            assert!(!is_json(bad), "{bad}");
        }
    }
}
