//! A capturing upstream for tests: an OpenAI-compatible endpoint on
//! loopback that records every byte it receives, and either forwards to a
//! real server (a cloud-role Tandem) or misbehaves on purpose.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::StreamExt;
use serde_json::{Value, json};

/// How the upstream answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Pass the request to the target and the answer back.
    Forward,
    /// Forward, but cut the connection after this many SSE events of a
    /// streamed answer.
    KillAfter(usize),
    /// Wait this long, then forward.
    Delay(Duration),
    /// Answer the next `times` requests with `status` (and `Retry-After:
    /// 0`), then forward.
    Fail {
        /// The status.
        status: u16,
        /// How many requests get it.
        times: usize,
    },
    /// Answer with "ECHO: " and the last user message, streamed three
    /// characters a chunk (so placeholders arrive split); with `n`, every
    /// choice past the first says "ECHO i: ", their chunks interleaved.
    Echo,
    /// Answer by calling the request's first tool with the last user
    /// message as its `text` argument: streamed, the arguments come three
    /// characters a chunk; and the answer leaves out `id`, `created` and
    /// `object`, as some OpenAI-compatible servers do, and carries
    /// `reasoning_content` ("Looking up: " and the message, streamed three
    /// characters a chunk) and a null `refusal`, and at the top level
    /// `system_fingerprint` (and, whole, `service_tier`).
    EchoTool,
    /// Forward, but a whole (not streamed) answer to a request that ends
    /// in an assistant message to continue (`continue_final_message`)
    /// comes back with that message's text in front of its own, as a
    /// llama.cpp server answers; its streamed answers carry only what is
    /// new, as that server's do.
    RepeatStart,
    /// Forward the first `requests` requests (counting from the start),
    /// then answer every later one with 503: a cloud that goes away.
    GoneAfter {
        /// Requests forwarded.
        requests: usize,
    },
}

/// One request as received, and what was passed back for it.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The path asked for.
    pub path: String,
    /// The headers.
    pub headers: HeaderMap,
    /// The body, byte for byte.
    pub body: Bytes,
    forwarded: Arc<Mutex<Vec<u8>>>,
}

impl Captured {
    /// The body as JSON (null if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The response bytes sent back to the caller (before any cut).
    pub fn forwarded(&self) -> Vec<u8> {
        self.forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The content of the streamed answer passed back, joined.
    pub fn forwarded_text(&self) -> String {
        crate::sse_text(&String::from_utf8_lossy(&self.forwarded()))
    }
}

struct Shared {
    target: Option<String>,
    mode: Mutex<Mode>,
    captured: Mutex<Vec<Captured>>,
    client: reqwest::Client,
}

/// An upstream on loopback that records every request.
#[derive(Clone)]
pub struct CaptureUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl CaptureUpstream {
    /// `target`: base URL (with `/v1`) requests are forwarded to.
    pub async fn start(target: Option<String>, mode: Mode) -> CaptureUpstream {
        let shared = Arc::new(Shared {
            target,
            mode: Mutex::new(mode),
            captured: Mutex::new(Vec::new()),
            client: reqwest::Client::new(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(handle))
            .route("/v1/completions", post(handle))
            .route("/v1/tandem/spec/sessions", post(handle))
            .route(
                "/v1/tandem/spec/sessions/{*rest}",
                post(handle).delete(handle),
            )
            .route(
                "/v1/models",
                get(|| async { axum::Json(json!({"object": "list", "data": []})) }),
            )
            .with_state(shared.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        CaptureUpstream { addr, shared }
    }

    /// Its OpenAI API root.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Changes how it answers.
    pub fn set_mode(&self, mode: Mode) {
        *self.shared.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }

    /// Every request so far.
    pub fn captured(&self) -> Vec<Captured> {
        self.shared
            .captured
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Everything received, headers and bodies, as one byte string.
    pub fn all_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for c in self.captured() {
            for (k, v) in &c.headers {
                out.extend_from_slice(k.as_str().as_bytes());
                out.extend_from_slice(b": ");
                out.extend_from_slice(v.as_bytes());
                out.push(b'\n');
            }
            out.extend_from_slice(&c.body);
            out.push(b'\n');
        }
        out
    }
}

async fn handle(
    State(s): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let forwarded = Arc::new(Mutex::new(Vec::new()));
    let seen = {
        let mut c = s.captured.lock().unwrap_or_else(|p| p.into_inner());
        c.push(Captured {
            path: uri.path().to_owned(),
            headers: headers.clone(),
            body: body.clone(),
            forwarded: forwarded.clone(),
        });
        c.len()
    };
    let mode = {
        let mut m = s.mode.lock().unwrap_or_else(|p| p.into_inner());
        let now = m.clone();
        if let Mode::Fail { status, times } = &mut *m {
            if *times <= 1 {
                let _ = status;
                *m = Mode::Forward;
            } else {
                *times -= 1;
            }
        }
        now
    };
    let echoed = match mode {
        Mode::Echo => Some(echo(&body)),
        Mode::EchoTool => Some(echo_tool(&body)),
        _ => None,
    };
    // The start a whole answer repeats, for `RepeatStart`.
    let repeated = matches!(mode, Mode::RepeatStart)
        .then(|| serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
        .filter(|req| req["stream"] != true && req["continue_final_message"] == true)
        .and_then(|req| {
            req["messages"]
                .as_array()
                .and_then(|m| m.last())
                .filter(|m| m["role"] == "assistant")
                .and_then(|m| m["content"].as_str())
                .map(str::to_owned)
        });
    let fwd = |kill| forward(&s, method, uri.path().to_owned(), body, kill, forwarded);
    match mode {
        Mode::GoneAfter { requests } if seen > requests => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": {"message": "injected: the cloud is gone", "type": "server_error"}})),
        )
            .into_response(),
        Mode::Fail { status, .. } => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [("retry-after", "0")],
            axum::Json(json!({"error": {"message": "injected failure", "type": "server_error"}})),
        )
            .into_response(),
        Mode::Echo | Mode::EchoTool => {
            echoed.unwrap_or_else(|| StatusCode::INTERNAL_SERVER_ERROR.into_response())
        }
        Mode::Delay(d) => {
            tokio::time::sleep(d).await;
            fwd(None).await
        }
        Mode::Forward | Mode::GoneAfter { .. } => fwd(None).await,
        Mode::KillAfter(n) => fwd(Some(n)).await,
        Mode::RepeatStart => {
            let resp = fwd(None).await;
            match repeated {
                Some(start) => repeat_start(resp, &start).await,
                None => resp,
            }
        }
    }
}

/// `resp`, a whole chat answer, with `start` put in front of each choice's
/// content.
async fn repeat_start(resp: Response, start: &str) -> Response {
    let status = resp.status();
    let Ok(bytes) = axum::body::to_bytes(resp.into_body(), usize::MAX).await else {
        return StatusCode::BAD_GATEWAY.into_response();
    };
    let mut v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    for c in v["choices"].as_array_mut().into_iter().flatten() {
        if let Some(text) = c["message"]["content"].as_str() {
            c["message"]["content"] = Value::String(format!("{start}{text}"));
        }
    }
    (status, axum::Json(v)).into_response()
}

async fn forward(
    s: &Shared,
    method: Method,
    path: String,
    body: Bytes,
    kill_after: Option<usize>,
    record: Arc<Mutex<Vec<u8>>>,
) -> Response {
    let Some(target) = &s.target else {
        return (StatusCode::BAD_GATEWAY, "no target").into_response();
    };
    let url = format!("{}{}", target.trim_end_matches("/v1"), path);
    let resp = match s
        .client
        .request(method, url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let mut upstream = resp.bytes_stream();
    let stream = async_stream::stream! {
        let mut events = 0usize;
        while let Some(chunk) = upstream.next().await {
            match chunk {
                Ok(c) => {
                    // Cut at the n-th event's end even when the upstream sent
                    // many events in one chunk.
                    let mut keep = c.len();
                    let mut kill = false;
                    for (i, w) in c.windows(2).enumerate() {
                        if w == b"\n\n" {
                            events += 1;
                            if kill_after.is_some_and(|n| events >= n) {
                                keep = i + 2;
                                kill = true;
                                break;
                            }
                        }
                    }
                    let c = c.slice(..keep);
                    record.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&c);
                    yield Ok::<Bytes, std::io::Error>(c);
                    if kill {
                        // Let the events already sent reach the client, as
                        // on a real network, before the connection dies.
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        yield Err(std::io::Error::other("injected: connection killed"));
                        return;
                    }
                }
                Err(e) => {
                    yield Err(std::io::Error::other(e.to_string()));
                    return;
                }
            }
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// The text of the request's last user message (its text parts joined,
/// when it has parts).
fn last_user(req: &Value) -> String {
    let content = req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| &m["content"]);
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p["type"] == "text")
            .filter_map(|p| p["text"].as_str())
            .collect(),
        _ => String::new(),
    }
}

fn echo(body: &[u8]) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let last_user = last_user(&req);
    // With `n`, choice i (past the first) says "ECHO i: ".
    let n = req["n"].as_u64().unwrap_or(1).clamp(1, 128);
    let texts: Vec<String> = (0..n)
        .map(|i| match i {
            0 => format!("ECHO: {last_user}"),
            i => format!("ECHO {i}: {last_user}"),
        })
        .collect();
    let model = req["model"].as_str().unwrap_or("echo").to_owned();
    let usage =
        json!({"prompt_tokens": 10, "completion_tokens": 5 * n, "total_tokens": 10 + 5 * n});
    if req["stream"] != json!(true) {
        // With a field of the answer and one of the message beside the
        // content, as OpenAI's and reasoning models' answers have.
        let choices: Vec<Value> = texts
            .iter()
            .zip(0..)
            .map(|(text, i)| {
                json!({"index": i, "message": {"role": "assistant", "content": text,
                    "reasoning_content": "Echoing."}, "finish_reason": "stop"})
            })
            .collect();
        return axum::Json(json!({
            "id": "echo", "object": "chat.completion", "created": 0, "model": model,
            "system_fingerprint": "fp_echo",
            "choices": choices,
            "usage": usage,
        }))
        .into_response();
    }
    let mut sse = String::new();
    let chars: Vec<Vec<char>> = texts.iter().map(|t| t.chars().collect()).collect();
    let longest = chars.iter().map(Vec::len).max().unwrap_or(0);
    // The choices' pieces interleave, three characters a chunk.
    for at in (0..longest).step_by(3) {
        for (i, c) in chars.iter().enumerate() {
            let Some(piece) = c.get(at..(at + 3).min(c.len())) else {
                continue;
            };
            let chunk = json!({
                "id": "echo", "object": "chat.completion.chunk", "created": 0, "model": model,
                "choices": [{"index": i, "delta": {"content": piece.iter().collect::<String>()}, "finish_reason": null}],
            });
            sse.push_str(&format!("data: {chunk}\n\n"));
        }
    }
    for i in 0..n {
        let fin = json!({
            "id": "echo", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}],
        });
        sse.push_str(&format!("data: {fin}\n\n"));
    }
    let use_chunk = json!({"id": "echo", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [], "usage": usage});
    sse.push_str(&format!("data: {use_chunk}\n\ndata: [DONE]\n\n"));
    ([("content-type", "text/event-stream")], sse).into_response()
}

fn echo_tool(body: &[u8]) -> Response {
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let last_user = last_user(&req);
    let name = req["tools"][0]["function"]["name"]
        .as_str()
        .unwrap_or("echo")
        .to_owned();
    let args = json!({"text": last_user}).to_string();
    let reasoning = format!("Looking up: {last_user}");
    // A structured field beside the content, as web-search models add.
    let annotations = json!([{"type": "url_citation", "url_citation": {
        "title": format!("About {last_user}"), "url": "https://example.com/echo",
        "start_index": 0, "end_index": 0}}]);
    let model = req["model"].as_str().unwrap_or("echo").to_owned();
    if req["stream"] != json!(true) {
        return axum::Json(json!({
            "model": model, "system_fingerprint": "fp_echo", "service_tier": "default",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
                "refusal": null, "reasoning_content": reasoning, "annotations": annotations,
                "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": name, "arguments": args}}]},
                "finish_reason": "tool_calls"}],
        }))
        .into_response();
    }
    let mut sse = String::new();
    let chars: Vec<char> = reasoning.chars().collect();
    for piece in chars.chunks(3) {
        let piece: String = piece.iter().collect();
        let chunk = json!({"model": model, "system_fingerprint": "fp_echo", "choices": [{"index": 0,
            "delta": {"role": "assistant", "reasoning_content": piece, "refusal": null}}]});
        sse.push_str(&format!("data: {chunk}\n\n"));
    }
    let first = json!({"model": model, "choices": [{"index": 0, "delta": {"role": "assistant",
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": name, "arguments": ""}}]}}]});
    sse.push_str(&format!("data: {first}\n\n"));
    let chars: Vec<char> = args.chars().collect();
    for piece in chars.chunks(3) {
        let chunk = json!({"model": model, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": piece.iter().collect::<String>()}}]}}]});
        sse.push_str(&format!("data: {chunk}\n\n"));
    }
    let fin = json!({"model": model, "choices": [{"index": 0, "delta": {"annotations": annotations},
        "finish_reason": "tool_calls"}]});
    sse.push_str(&format!("data: {fin}\n\ndata: [DONE]\n\n"));
    ([("content-type", "text/event-stream")], sse).into_response()
}
