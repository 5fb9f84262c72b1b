//! Cloud backends: any OpenAI-compatible endpoint (OpenAI, vLLM, a
//! llama.cpp server, Ollama, another Tandem) behind [`tandem_api::Backend`].
//!
//! Each upstream gets retries with jittered backoff for failures *before the
//! first token* (connection errors, 429, 5xx, a stream that breaks before
//! any content), a time-to-first-token timeout, an idle timeout between
//! chunks, and a circuit breaker. Every exchange keeps a record of what was
//! sent (a hash of the exact body, bytes, attempts) for the egress ledger.
//! API keys are read from the environment and never printed.
//!
//! Not here: deciding which requests may go to the cloud (the router).

#![warn(missing_docs)]

mod backend;
mod breaker;
mod choices;
mod config;
pub mod probe;
mod verifier_client;
mod wire;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};
use serde::Serialize;
use tandem_api::openai::{ChatMessage, MessageContent};
use tandem_api::{ApiError, Event, EventStream, Exchange, GenerateRequest, Input, Outbound};

pub use breaker::{CircuitBreaker, Pass, TrialGuard};
pub use config::{Choices, Continuation, UpstreamConfig};
pub use tandem_api::BreakerState;
use wire::{Endpoint, StreamState};

/// An API key: usable, but never shown.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Moving averages of an upstream's speed, from answers that completed.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencyStats {
    /// Time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Decoding speed after the first token.
    pub tokens_per_s: Option<f64>,
    /// Answers observed.
    pub samples: u64,
}

impl LatencyStats {
    /// Folds one observation in (weight 0.2 for the new sample).
    pub fn observe(&mut self, ttft: Duration, tokens: u32, decode: Duration) {
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.8 * o + 0.2 * new));
        self.ttft_ms = ewma(self.ttft_ms, ttft.as_secs_f64() * 1000.0);
        if tokens > 1 && decode > Duration::ZERO {
            self.tokens_per_s = ewma(
                self.tokens_per_s,
                f64::from(tokens - 1) / decode.as_secs_f64(),
            );
        }
        self.samples += 1;
    }
}

#[derive(Debug)]
struct Inner {
    cfg: UpstreamConfig,
    /// Endpoint URLs, parsed once: parsing per request shows up in profiles.
    chat_url: reqwest::Url,
    completions_url: reqwest::Url,
    /// The host is a loopback address (read once, from `chat_url`).
    on_this_machine: bool,
    client: reqwest::Client,
    key: Option<Secret>,
    breaker: CircuitBreaker,
    latency: Mutex<LatencyStats>,
    /// Seen answering one choice when asked for several: it is asked for
    /// one at a time from then on.
    ignores_n: Arc<std::sync::atomic::AtomicBool>,
}

/// An OpenAI-compatible upstream. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CloudBackend {
    inner: Arc<Inner>,
}

enum Failure {
    /// Worth another attempt (connection refused, 429, 5xx, early break).
    Retry(ApiError, Option<Duration>),
    /// Counts against the upstream, but retrying would not help.
    Upstream(ApiError),
    /// The upstream refused the request itself (4xx): not its fault.
    Refused(ApiError),
}

fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(after) = retry_after.filter(|d| *d <= Duration::from_secs(5)) {
        return after;
    }
    let base = 100u64.saturating_mul(1 << attempt.min(5)).min(2_000);
    // Full jitter in [base/2, base*3/2): retries from many clients spread out.
    Duration::from_millis(base / 2 + fastrand::u64(0..base.max(1)))
}

fn retry_after(resp: &reqwest::Response) -> Option<Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Describes a transport error without the request's URL or headers.
fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else if e.is_body() || e.is_decode() {
        "the response body broke off".into()
    } else {
        "request failed".into()
    }
}

/// The URL's host is this machine (localhost, 127.0.0.0/8, ::1): work
/// sent there moves none of it off the device.
fn is_loopback(url: &reqwest::Url) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl CloudBackend {
    /// An upstream whose API key (if any) is read from `cfg.api_key_env`.
    pub fn new(cfg: UpstreamConfig) -> Result<CloudBackend, String> {
        let key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(k) if !k.is_empty() => Some(Secret(k)),
                _ => {
                    return Err(format!(
                        "upstream `{}`: environment variable {var} (its API key) is not set",
                        cfg.name
                    ));
                }
            },
        };
        Self::build(cfg, key)
    }

    /// An upstream with its API key given directly (from a secret store,
    /// say) rather than through the environment.
    pub fn with_api_key(cfg: UpstreamConfig, key: Option<String>) -> Result<CloudBackend, String> {
        Self::build(cfg, key.filter(|k| !k.is_empty()).map(Secret))
    }

    fn build(cfg: UpstreamConfig, key: Option<Secret>) -> Result<CloudBackend, String> {
        if cfg.models.is_empty() {
            return Err(format!("upstream `{}` lists no models", cfg.name));
        }
        if let Some(f) = cfg
            .constraint_fields
            .iter()
            .find(|f| tandem_api::Feature::constraint(f).is_none())
        {
            return Err(format!(
                "upstream `{}`: constraint_fields: `{f}` is not one of {}",
                cfg.name,
                tandem_api::GUIDED_FIELDS.join(", ")
            ));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.connect_timeout_ms))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("upstream `{}`: {e}", cfg.name))?;
        let base = cfg.base_url.trim_end_matches('/');
        let parse = |path: &str| {
            reqwest::Url::parse(&format!("{base}{path}"))
                .map_err(|e| format!("upstream `{}`: base_url: {e}", cfg.name))
        };
        let chat_url = parse(Endpoint::Chat.path())?;
        let completions_url = parse(Endpoint::Completions.path())?;
        let on_this_machine = is_loopback(&chat_url);
        Ok(CloudBackend {
            inner: Arc::new(Inner {
                chat_url,
                completions_url,
                on_this_machine,
                breaker: CircuitBreaker::new(
                    cfg.breaker_failures,
                    Duration::from_millis(cfg.breaker_cooldown_ms),
                    // A trial nobody settled (a task cut off) stops
                    // blocking the next once its longest answer would be over.
                    Duration::from_millis(cfg.request_timeout_ms.max(cfg.ttft_timeout_ms)),
                ),
                cfg,
                client,
                key,
                latency: Mutex::new(LatencyStats::default()),
                ignores_n: Arc::default(),
            }),
        })
    }

    /// The same upstream, with the same key, set to continue a partial
    /// answer, so that a probe can find out whether it really does.
    pub(crate) fn prefilling(&self) -> Result<CloudBackend, String> {
        let mut cfg = self.inner.cfg.clone();
        cfg.continuation = Continuation::Prefill;
        Self::build(cfg, self.inner.key.clone())
    }

    /// Its configuration.
    pub fn config(&self) -> &UpstreamConfig {
        &self.inner.cfg
    }

    /// Its circuit breaker.
    pub fn breaker(&self) -> &CircuitBreaker {
        &self.inner.breaker
    }

    /// Its measured speed.
    pub fn latency(&self) -> LatencyStats {
        *self.inner.latency.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The upstream's name for the model this request should get.
    pub fn upstream_model(&self, requested: &str) -> String {
        let cfg = &self.inner.cfg;
        if cfg.models.iter().any(|m| m == requested) {
            requested.to_owned()
        } else {
            cfg.default_model
                .clone()
                .unwrap_or_else(|| cfg.models[0].clone())
        }
    }

    /// Is the upstream reachable, and how long does a round trip take?
    /// Any HTTP answer counts as reachable.
    pub async fn probe(&self, timeout: Duration) -> Result<Duration, String> {
        let url = format!("{}/models", self.inner.cfg.base_url.trim_end_matches('/'));
        let t0 = Instant::now();
        let mut req = self.inner.client.get(url).timeout(timeout);
        if let Some(k) = &self.inner.key {
            req = req.bearer_auth(&k.0);
        }
        match req.send().await {
            Ok(_) => Ok(t0.elapsed()),
            Err(e) => Err(describe(&e)),
        }
    }

    fn endpoint(req: &GenerateRequest) -> Endpoint {
        match req.input {
            Input::Text { .. } => Endpoint::Completions,
            Input::Chat { .. } => Endpoint::Chat,
        }
    }

    /// The JSON body for `req`, whose `model` is already the upstream's.
    fn body(&self, req: &GenerateRequest) -> Result<Vec<u8>, ApiError> {
        let model = req.model.as_str();
        let encode_err = |e: serde_json::Error| {
            ApiError::internal(format!("cannot encode the upstream request: {e}"))
        };
        match &req.input {
            // A completions upstream has no field for an answer begun: it
            // reads the written text as more prompt.
            Input::Text { .. } => {
                let text = req.input.bare_text().unwrap_or_default();
                let mut r = req.to_completion_request(model, text);
                r.stream = Some(req.stream);
                serde_json::to_vec(&r).map_err(encode_err)
            }
            Input::Chat { continue_from, .. } => {
                let mut r = req.to_chat_request(model);
                r.stream = Some(req.stream);
                if let Some(partial) = continue_from {
                    if self.inner.cfg.continuation != Continuation::Prefill {
                        return Err(ApiError::invalid_request(format!(
                            "upstream `{}` cannot continue a partial answer",
                            self.inner.cfg.name
                        )));
                    }
                    if let Some(m) = r.messages.as_mut() {
                        m.push(ChatMessage {
                            role: "assistant".into(),
                            content: Some(MessageContent::Text(partial.clone())),
                            name: None,
                            extra: Default::default(),
                        });
                    }
                    r.extra.insert("continue_final_message".into(), true.into());
                    r.extra.insert("add_generation_prompt".into(), false.into());
                }
                serde_json::to_vec(&r).map_err(encode_err)
            }
        }
    }

    /// Choices of `req` asked of the upstream in one request: all, unless
    /// it is set to take one at a time or was seen ignoring `n`.
    fn choices_asked(&self, req: &GenerateRequest) -> u32 {
        if self.inner.cfg.choices == Choices::Separate
            || self.inner.ignores_n.load(Ordering::Relaxed)
        {
            1
        } else {
            req.choices.max(1)
        }
    }

    /// Fixes the body [`CloudBackend::send`] will send for `req`: the
    /// choices one request asks for (decided here once, so a concurrent
    /// discovery that the upstream ignores `n` cannot change the bytes
    /// after the ledger named them) and the upstream's model.
    pub fn outbound(&self, mut req: GenerateRequest) -> Result<Outbound, ApiError> {
        req.choices = self.choices_asked(&req);
        // An answer begun elsewhere is always asked for streamed: a
        // llama.cpp server continues it in both forms, but its whole
        // answer repeats the start and its stream does not. The events
        // come back the same either way.
        if req.input.written().is_some() {
            req.stream = true;
        }
        req.model = self.upstream_model(&req.model);
        let body = self.body(&req)?;
        Ok(Outbound::built(req, body))
    }

    /// Sends a request as [`outbound`](Self::outbound) fixed it, retrying
    /// what is worth retrying, and returns the answer's events once the
    /// first one has arrived — together with the record of what was sent,
    /// whatever the outcome. Several choices asked of an upstream that
    /// takes `n` come from the one request, one stream each; otherwise only
    /// the first is asked for.
    pub async fn send(&self, out: Outbound) -> (Result<Vec<EventStream>, ApiError>, Arc<Exchange>) {
        let cfg = &self.inner.cfg;
        // Handed over unbuilt (the trait's default): built here, as
        // `outbound` would have.
        let out = match out.payload_sha256() {
            Some(_) => out,
            None => {
                let (req, _) = out.into_parts();
                let model = self.upstream_model(&req.model);
                match self.outbound(req) {
                    Ok(out) => out,
                    Err(e) => return (Err(e), Arc::new(Exchange::new(&cfg.name, &model))),
                }
            }
        };
        let payload_sha256 = out.payload_sha256().unwrap_or_default().to_owned();
        let (req, body) = out.into_parts();
        let body = body.unwrap_or_default();
        let model = req.model.clone();
        let n = req.choices;
        let endpoint = Self::endpoint(&req);
        let exchange = Arc::new(Exchange {
            upstream: cfg.name.clone(),
            model,
            payload_sha256,
            ..Exchange::default()
        });
        let Some(pass) = self.inner.breaker.admit() else {
            return (
                Err(ApiError::unavailable(format!(
                    "upstream `{}` is failing; skipping it for now (circuit open)",
                    cfg.name
                ))),
                exchange,
            );
        };
        // Lives as long as this call and then the answer's stream: a client
        // that goes away mid-trial gives the trial back.
        let trial = {
            let this = self.clone();
            TrialGuard::new(pass, move || this.inner.breaker.abandon())
        };
        let body = Bytes::from(body);
        let mut attempt = 0;
        loop {
            exchange.attempts.fetch_add(1, Ordering::Relaxed);
            exchange
                .bytes_out
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            let result = self
                .attempt(endpoint, body.clone(), req.stream, n > 1, &exchange)
                .await;
            match result {
                Ok(stream) => {
                    let stream = stream.map(move |e| {
                        let _held = &trial;
                        e
                    });
                    let choices =
                        choices::split(stream.boxed(), n, &cfg.name, self.inner.ignores_n.clone());
                    return (Ok(choices), exchange);
                }
                Err(Failure::Retry(e, after)) if attempt < cfg.max_retries => {
                    tracing::debug!(upstream = %cfg.name, attempt, "retrying: {}", e.message);
                    tokio::time::sleep(backoff(attempt, after)).await;
                    attempt += 1;
                }
                Err(Failure::Retry(e, _)) | Err(Failure::Upstream(e)) => {
                    self.inner.breaker.failure();
                    return (Err(e), exchange);
                }
                Err(Failure::Refused(e)) => {
                    // The upstream answered; it is healthy.
                    self.inner.breaker.success();
                    return (Err(e), exchange);
                }
            }
        }
    }

    async fn attempt(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        stream: bool,
        several: bool,
        exchange: &Arc<Exchange>,
    ) -> Result<choices::Indexed, Failure> {
        let cfg = &self.inner.cfg;
        let url = match endpoint {
            Endpoint::Chat => self.inner.chat_url.clone(),
            Endpoint::Completions => self.inner.completions_url.clone(),
        };
        let mut http = self
            .inner
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = &self.inner.key {
            http = http.bearer_auth(&k.0);
        }
        let t0 = Instant::now();
        // A streamed answer must start within the TTFT budget; a whole
        // answer within the request budget.
        let budget = Duration::from_millis(if stream {
            cfg.ttft_timeout_ms
        } else {
            cfg.request_timeout_ms
        });
        let deadline = t0 + budget;
        let name = &cfg.name;
        let timeout_err = || {
            Failure::Upstream(ApiError::gateway_timeout(format!(
                "upstream `{name}` gave no answer within {} ms",
                budget.as_millis()
            )))
        };
        let resp = match tokio::time::timeout_at(deadline.into(), http.send()).await {
            Err(_) => return Err(timeout_err()),
            Ok(Err(e)) => {
                return Err(Failure::Retry(
                    ApiError::bad_gateway(format!("upstream `{name}`: {}", describe(&e))),
                    None,
                ));
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if !status.is_success() {
            let after = retry_after(&resp);
            // An error's message is all that is read of it.
            let body = tokio::time::timeout_at(deadline.into(), capped(resp, ERROR_BODY_BYTES))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            exchange
                .bytes_in
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            let mut e = ApiError::from_body(status.as_u16(), &body);
            e.message = format!("upstream `{name}`: {}", e.message);
            return Err(match status.as_u16() {
                429 | 500..=599 => Failure::Retry(e, after),
                _ => Failure::Refused(e),
            });
        }
        let cap = cfg.max_response_bytes;
        if !stream {
            let body = match tokio::time::timeout_at(deadline.into(), capped(resp, cap)).await {
                Err(_) => return Err(timeout_err()),
                Ok(Err(e)) => {
                    return Err(Failure::Retry(
                        ApiError::bad_gateway(format!("upstream `{name}`: {}", describe(&e))),
                        None,
                    ));
                }
                Ok(Ok(b)) => b,
            };
            exchange
                .bytes_in
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            let events = wire::whole_answer(endpoint, &body, several).map_err(Failure::Upstream)?;
            self.inner.breaker.success();
            if let Some(f) = first_finish(&events) {
                self.observe(t0.elapsed(), f.usage.completion_tokens, Duration::ZERO);
            }
            return Ok(futures::stream::iter(events.into_iter().map(Ok)).boxed());
        }

        let counted = {
            let ex = exchange.clone();
            let upstream = name.clone();
            let mut total = 0u64;
            resp.bytes_stream()
                .inspect(move |chunk| {
                    if let Ok(c) = chunk {
                        ex.bytes_in.fetch_add(c.len() as u64, Ordering::Relaxed);
                    }
                })
                // Past the cap the stream ends, unfinished: the answer is
                // broken off (and handed over) instead of filling memory.
                .take_while(move |chunk| {
                    total += chunk.as_ref().map_or(0, |c| c.len() as u64);
                    let within = total <= cap;
                    if !within {
                        tracing::warn!(upstream = %upstream, "answer cut off past {cap} bytes");
                    }
                    futures::future::ready(within)
                })
        };
        let mut sse = wire::without_bom(counted).eventsource().boxed();
        let mut state = StreamState {
            several,
            ..StreamState::default()
        };
        // Read until the first piece of content (or the end) so that every
        // failure before the first token is still retryable here.
        let ended = |state: &StreamState| {
            let fin = state.finish();
            if first_finish(&fin).is_some() {
                Ok(fin)
            } else {
                Err(Failure::Retry(
                    ApiError::bad_gateway(
                        "the upstream ended the stream before finishing the answer",
                    ),
                    None,
                ))
            }
        };
        let first: Vec<(u32, Event)> = loop {
            let next = match tokio::time::timeout_at(deadline.into(), sse.next()).await {
                Err(_) => return Err(timeout_err()),
                Ok(n) => n,
            };
            match next {
                None => break ended(&state)?,
                Some(Err(_)) => {
                    return Err(Failure::Retry(
                        ApiError::bad_gateway(format!(
                            "upstream `{name}`: the stream broke before the first token"
                        )),
                        None,
                    ));
                }
                Some(Ok(ev)) if ev.data.trim() == "[DONE]" => break ended(&state)?,
                Some(Ok(ev)) => match state.on_data(endpoint, &ev.data) {
                    Ok(deltas) if deltas.is_empty() => continue,
                    Ok(deltas) => {
                        break deltas
                            .into_iter()
                            .map(|(i, d)| (i, Event::Delta(d)))
                            .collect();
                    }
                    Err(e) => return Err(Failure::Upstream(e)),
                },
            }
        };
        let ttft = t0.elapsed();
        // The upstream is answering: that settles a trial now, not after the
        // whole answer (a long stream would hold the breaker half-open).
        self.inner.breaker.success();
        if first_finish(&first).is_some() {
            self.observe(ttft, 0, Duration::ZERO);
            return Ok(futures::stream::iter(first.into_iter().map(Ok)).boxed());
        }
        let this = self.clone();
        let idle = Duration::from_millis(cfg.idle_timeout_ms);
        Ok(Box::pin(rest_of_stream(
            this, sse, state, first, endpoint, idle, ttft,
        )))
    }

    fn observe(&self, ttft: Duration, tokens: u32, decode: Duration) {
        self.inner
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(ttft, tokens, decode);
    }
}

/// The first choice's closing event among `events`.
fn first_finish(events: &[(u32, Event)]) -> Option<&tandem_api::Finish> {
    events.iter().find_map(|(i, e)| match e {
        Event::Finish(f) if *i == 0 => Some(f),
        _ => None,
    })
}

/// Bytes of an upstream's error body read for its message.
const ERROR_BODY_BYTES: u64 = 64 * 1024;

/// A whole body, refused past `cap` bytes (announced or received).
async fn capped(mut resp: reqwest::Response, cap: u64) -> Result<Bytes, reqwest::Error> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = resp.chunk().await? {
        if (body.len() + chunk.len()) as u64 > cap {
            tracing::warn!("an upstream body past {cap} bytes was cut off");
            break;
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

fn rest_of_stream<S, E>(
    this: CloudBackend,
    mut sse: S,
    mut state: StreamState,
    first: Vec<(u32, Event)>,
    endpoint: Endpoint,
    idle: Duration,
    ttft: Duration,
) -> impl Stream<Item = Result<(u32, Event), ApiError>> + Send
where
    S: Stream<Item = Result<eventsource_stream::Event, E>> + Send + Unpin + 'static,
    E: Send,
{
    async_stream::stream! {
        for e in first {
            yield Ok(e);
        }
        let started = Instant::now();
        let name = this.inner.cfg.name.clone();
        let broke = |why: &str| {
            ApiError::bad_gateway(format!("upstream `{name}`: {why}"))
        };
        loop {
            let next = match tokio::time::timeout(idle, sse.next()).await {
                Err(_) => {
                    this.inner.breaker.failure();
                    yield Err(broke(&format!("no data for {} ms", idle.as_millis())));
                    return;
                }
                Ok(n) => n,
            };
            let done = match next {
                None => true,
                Some(Ok(ev)) if ev.data.trim() == "[DONE]" => true,
                Some(Ok(ev)) => match state.on_data(endpoint, &ev.data) {
                    Ok(deltas) => {
                        for (i, d) in deltas {
                            yield Ok((i, Event::Delta(d)));
                        }
                        false
                    }
                    Err(e) => {
                        this.inner.breaker.failure();
                        yield Err(e);
                        return;
                    }
                },
                Some(Err(_)) => {
                    this.inner.breaker.failure();
                    yield Err(broke("the stream broke off"));
                    return;
                }
            };
            if done {
                let fin = state.finish();
                match first_finish(&fin) {
                    Some(f) => {
                        this.inner.breaker.success();
                        this.observe(ttft, f.usage.completion_tokens, started.elapsed());
                        for e in fin {
                            yield Ok(e);
                        }
                    }
                    None => {
                        this.inner.breaker.failure();
                        yield Err(ApiError::bad_gateway(
                            "the upstream ended the stream before finishing the answer",
                        ));
                    }
                }
                return;
            }
        }
    }
}
