//! Route handlers: translate between the wire and the dispatcher.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tandem_api::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChoiceLogprobs,
    Completion, CompletionChoice, CompletionRequest, LegacyLogprobs, ModelCard, ModelList,
};
use tandem_api::speculative::{SpecOpen, SpecOpened, VerifyRequest, VerifyResponse};
use tandem_api::{Answer, ApiError, EmbeddingRequest, GenerateRequest};
use tandem_router::access::Caller;
use tandem_router::signals::Overrides;
use tandem_router::{Mode, RequestContext, RouteInfo};

use crate::error::{HttpError, OpenAiJson};
use crate::sse::{self, StreamMeta};
use crate::{AppState, unix_now};

/// A random id. Not for secrets: ids only need to be unique, and a
/// per-thread generator costs no system call.
fn random_hex() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A Tandem header that must be read exactly: present but not text is a
/// 400, never silently the default.
fn strict_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            ApiError::invalid_request(format!("header {name}: the value is not readable text"))
                .with_param(name)
        }),
    }
}

/// Tandem's request headers: privacy mode, latency goal, quality knob.
fn context(
    headers: &HeaderMap,
    caller: Option<axum::Extension<Arc<Caller>>>,
) -> Result<RequestContext, ApiError> {
    let bad = |name: &str, why: String| {
        ApiError::invalid_request(format!("header {name}: {why}")).with_param(name)
    };
    let privacy = strict_header(headers, "x-tandem-privacy")?
        .map(|v| v.parse().map_err(|e: String| bad("x-tandem-privacy", e)))
        .transpose()?;
    let latency_goal_ms = strict_header(headers, "x-tandem-latency-goal-ms")?
        .map(|v| {
            v.parse::<u32>().map_err(|_| {
                bad(
                    "x-tandem-latency-goal-ms",
                    format!("`{v}` is not a number of milliseconds"),
                )
            })
        })
        .transpose()?;
    let quality = strict_header(headers, "x-tandem-quality")?
        .map(|v| {
            v.parse::<f32>()
                .ok()
                .filter(|q| (0.0..=1.0).contains(q))
                .ok_or_else(|| bad("x-tandem-quality", format!("`{v}` is not between 0 and 1")))
        })
        .transpose()?;
    let cache_skip = match strict_header(headers, "x-tandem-cache")? {
        None | Some("use") => false,
        Some("skip") => true,
        Some(v) => {
            return Err(bad(
                "x-tandem-cache",
                format!("`{v}` is not `use` or `skip`"),
            ));
        }
    };
    let mode = strict_header(headers, "x-tandem-mode")?
        .map(|v| v.parse::<Mode>().map_err(|e| bad("x-tandem-mode", e)))
        .transpose()?;
    let request_id = header(headers, "x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(random_hex);
    Ok(RequestContext {
        request_id,
        caller: caller.map(|axum::Extension(c)| c),
        privacy,
        latency_goal_ms,
        quality,
        cache_skip,
        mode,
        trace: Default::default(),
    })
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    // Header values must be visible ASCII; anything else is dropped.
    let clean: String = value
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&clean) {
        h.insert(HeaderName::from_static(name), v);
    }
}

/// The decision, in headers every response carries.
fn route_headers(route: &RouteInfo, request_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    set(&mut h, "x-request-id", request_id);
    set(&mut h, "x-tandem-backend", &route.backend);
    set(&mut h, "x-tandem-model", &route.model);
    set(&mut h, "x-tandem-decided-by", route.decision.decided_by);
    let reasons: Vec<String> = route
        .decision
        .reasons
        .iter()
        .map(ToString::to_string)
        .collect();
    set(&mut h, "x-tandem-reasons", &reasons.join("; "));
    set(
        &mut h,
        "x-tandem-decision-us",
        &route.decision_us.to_string(),
    );
    if !route.redacted.is_empty() {
        let r: Vec<String> = route
            .redacted
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        set(&mut h, "x-tandem-redacted", &r.join(","));
    }
    if let Some(f) = &route.failover {
        set(&mut h, "x-tandem-failover", f);
    }
    if let Some(r) = &route.replica {
        set(&mut h, "x-tandem-replica", r);
    }
    if let Some((score, threshold)) = route.difficulty {
        set(
            &mut h,
            "x-tandem-difficulty",
            &format!("{score:.3}; threshold {threshold:.3}"),
        );
    }
    if let Some((model, ms)) = &route.reading {
        set(
            &mut h,
            "x-tandem-router-reading",
            &format!("{model}; {ms:.0} ms"),
        );
    }
    if let Some(c) = &route.cache {
        set(&mut h, "x-tandem-cache", &c.to_string());
    }
    if let Some(m) = &route.memory {
        set(&mut h, "x-tandem-router-memory", m);
    }
    if let Some(c) = &route.cascade {
        set(&mut h, "x-tandem-cascade", c);
    }
    if let Some(s) = &route.speculative {
        set(&mut h, "x-tandem-speculative", &s.to_string());
    }
    h
}

struct Started {
    /// One answer per choice.
    events: Vec<tandem_api::EventStream>,
    headers: HeaderMap,
    meta: StreamMeta,
    streaming: bool,
}

/// Starts one answer; `choice` is its index when it is one of several.
async fn start(
    state: &AppState,
    req: GenerateRequest,
    headers: &HeaderMap,
    caller: Option<axum::Extension<Arc<Caller>>>,
    id_prefix: &str,
    choice: Option<u32>,
) -> Result<Started, HttpError> {
    let mut ctx = context(headers, caller)?;
    if let Some(i) = choice {
        // Each choice is a draw of its own, not a cached answer.
        ctx.cache_skip = true;
        if i > 0 {
            ctx.request_id = format!("{}-{i}", ctx.request_id);
        }
    }
    let request_id = ctx.request_id.clone();
    let requested = req.model.clone();
    let logprobs = req.logprobs.is_some();
    let include_usage = req.include_usage;
    let streaming = req.stream;
    let d = state.dispatcher.dispatch(req, ctx).await?;
    let mut headers = route_headers(&d.route, &request_id);
    // The body names the model that answered, as OpenAI names a dated
    // snapshot for an alias; the name the client used stays in a header.
    let model = if d.route.model.is_empty() {
        requested.clone()
    } else {
        d.route.model.clone()
    };
    if model != requested {
        set(&mut headers, "x-tandem-requested-model", &requested);
    }
    let deadline = state.config.stream_deadline;
    Ok(Started {
        events: std::iter::once(d.stream)
            .chain(d.more)
            .map(|s| with_deadline(s, deadline))
            .collect(),
        headers,
        meta: StreamMeta {
            id: new_id(id_prefix),
            created: unix_now(),
            model,
            logprobs,
            include_usage,
        },
        streaming,
    })
}

/// `n` answers to `req`, started together. The first is routed as any
/// request, asking for all `n`: an upstream that takes `n` answers them
/// all from that one request (the prompt sent, and billed, once). Those it
/// did not answer go by name to the model that took the first (so they are
/// not routed again) and skip the answer cache, so each is a draw of its
/// own; a client's seed becomes seed, seed + 1, ... so that seeded choices
/// differ and stay repeatable.
async fn start_n(
    state: &AppState,
    req: GenerateRequest,
    headers: &HeaderMap,
    caller: Option<axum::Extension<Arc<Caller>>>,
    id_prefix: &str,
    n: u32,
) -> Result<Started, HttpError> {
    if n <= 1 {
        return start(state, req, headers, caller, id_prefix, None).await;
    }
    let mut first = start(
        state,
        req.clone(),
        headers,
        caller.clone(),
        id_prefix,
        Some(0),
    )
    .await?;
    let answered = u32::try_from(first.events.len()).unwrap_or(u32::MAX);
    let others = (answered..n).map(|i| {
        let mut r = req.clone();
        r.choices = 1;
        r.model = first.meta.model.clone();
        r.sampling.seed = r.sampling.seed.map(|s| s.wrapping_add(i));
        start(state, r, headers, caller.clone(), id_prefix, Some(i))
    });
    for other in futures::future::try_join_all(others).await? {
        first.events.extend(other.events);
    }
    Ok(first)
}

/// Every choice's whole answer, their usage together, and the answer-level
/// fields (`system_fingerprint`...) of the first.
async fn whole_choices(
    events: Vec<tandem_api::EventStream>,
) -> Result<
    (
        Vec<Answer>,
        tandem_api::Usage,
        serde_json::Map<String, Value>,
    ),
    ApiError,
> {
    let answers = futures::future::try_join_all(events.into_iter().map(Answer::collect)).await?;
    let usage = sse::total_usage(&answers.iter().map(|a| a.finish.usage).collect::<Vec<_>>());
    let response = answers
        .first()
        .map(|a| a.response.clone())
        .unwrap_or_default();
    Ok((answers, usage, response))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Option<axum::Extension<Arc<Caller>>>,
    OpenAiJson(body): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, HttpError> {
    let n = body.choices()?;
    let req = body.into_generate()?;
    let s = start_n(&state, req, &headers, caller, "chatcmpl", n).await?;
    if s.streaming {
        return Ok((s.headers, sse::chat(s.events, s.meta)).into_response());
    }
    let (answers, usage, response) = whole_choices(s.events).await?;
    let logprobs = s.meta.logprobs;
    let body = ChatCompletion {
        id: s.meta.id,
        object: "chat.completion".into(),
        created: s.meta.created,
        model: s.meta.model,
        choices: answers
            .into_iter()
            .zip(0u32..)
            .map(|(answer, index)| ChatChoice {
                index,
                message: AssistantMessage {
                    role: "assistant".into(),
                    // With tool calls and no text, OpenAI's content is null.
                    content: (!answer.text.is_empty() || answer.tool_calls.is_empty())
                        .then_some(answer.text),
                    tool_calls: (!answer.tool_calls.is_empty()).then_some(answer.tool_calls),
                    extra: answer.extra,
                },
                logprobs: logprobs.then_some(ChoiceLogprobs {
                    content: Some(answer.tokens),
                }),
                finish_reason: Some(answer.finish.reason),
            })
            .collect(),
        usage: Some(usage),
        extra: response,
    };
    Ok((s.headers, Json(body)).into_response())
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Option<axum::Extension<Arc<Caller>>>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, HttpError> {
    let n = body.choices()?;
    let req = body.into_generate()?;
    let s = start_n(&state, req, &headers, caller, "cmpl", n).await?;
    if s.streaming {
        return Ok((s.headers, sse::completion(s.events, s.meta)).into_response());
    }
    let (answers, usage, response) = whole_choices(s.events).await?;
    let want_logprobs = s.meta.logprobs;
    let body = Completion {
        id: s.meta.id,
        object: "text_completion".into(),
        created: s.meta.created,
        model: s.meta.model,
        choices: answers
            .into_iter()
            .zip(0u32..)
            .map(|(answer, index)| CompletionChoice {
                index,
                logprobs: want_logprobs.then(|| {
                    let mut l = LegacyLogprobs::default();
                    l.extend(&answer.tokens, 0);
                    l
                }),
                text: answer.text,
                finish_reason: Some(answer.finish.reason),
            })
            .collect(),
        usage: Some(usage),
        extra: response,
    };
    Ok((s.headers, Json(body)).into_response())
}

/// The routing decision for a chat request, without generating.
pub async fn explain_route(
    State(state): State<AppState>,
    headers: HeaderMap,
    caller: Option<axum::Extension<Arc<Caller>>>,
    OpenAiJson(body): OpenAiJson<ChatCompletionRequest>,
) -> Result<Json<tandem_router::Explanation>, HttpError> {
    let mut body = body;
    if body.model.is_none() {
        body.model = Some(state.dispatcher.policy().virtual_model.clone());
    }
    let req = body.into_generate()?;
    let ctx = context(&headers, caller)?;
    // The learned router embeds the prompt: milliseconds of CPU, kept off
    // the async workers.
    let d = state.dispatcher.clone();
    let explained = tokio::task::spawn_blocking(move || d.explain(&req, &ctx))
        .await
        .map_err(|_| ApiError::internal("the routing task failed"))??;
    Ok(Json(explained))
}

/// Ends an answer that runs past `limit` with an error (streamed or not),
/// dropping the backend's stream so its work stops too.
fn with_deadline(
    events: tandem_api::EventStream,
    limit: std::time::Duration,
) -> tandem_api::EventStream {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut events = events;
    async_stream::stream! {
        loop {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(e)) => yield e,
                Ok(None) => break,
                Err(_) => {
                    yield Err(ApiError::new(
                        504,
                        tandem_api::ErrorKind::ServerError,
                        format!(
                            "the answer ran past the server's deadline of {} s and was ended",
                            limit.as_secs_f64()
                        ),
                    )
                    .with_code("deadline_exceeded"));
                    break;
                }
            }
        }
    }
    .boxed()
}

/// `POST /v1/embeddings`.
pub async fn embeddings(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<EmbeddingRequest>,
) -> Result<Response, HttpError> {
    let d = &state.dispatcher;
    let Some(embedder) = d.embedder() else {
        return Err(ApiError::model_not_found(&body.model).into());
    };
    if body.model != d.embedder_name() {
        return Err(ApiError::model_not_found(&body.model).into());
    }
    let job = body.into_job(embedder.dim())?;
    let (texts, base64) = (job.texts, job.base64);
    let limits = &state.config;
    if texts.len() > limits.max_embedding_inputs {
        return Err(ApiError::invalid_request(format!(
            "`input` has {} items; this server embeds at most {} per request",
            texts.len(),
            limits.max_embedding_inputs
        ))
        .with_param("input")
        .into());
    }
    let (vectors, tokens) = d.embed_within(texts, limits.max_embedding_tokens).await?;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                use base64::Engine;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": d.embedder_name(),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

/// `GET /v1/tandem/cache`: how many answers the semantic cache holds.
pub async fn cache_info(State(state): State<AppState>) -> Result<Json<Value>, HttpError> {
    let Some(c) = state.dispatcher.cache() else {
        return Err(ApiError::not_found("the semantic cache is off").into());
    };
    Ok(Json(json!({
        "entries": c.len(),
        "max_entries": c.config().max_entries,
        "similarity": c.config().similarity,
        "path": c.path(),
    })))
}

/// `DELETE /v1/tandem/cache`: forgets every cached answer, on disk too.
pub async fn clear_cache(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    let Some(c) = state.dispatcher.cache() else {
        return Err(ApiError::not_found("the semantic cache is off").into());
    };
    let n = c
        .clear()
        .map_err(|e| ApiError::internal(format!("clearing the cache: {e}")))?;
    Ok(Json(json!({"cleared": n})))
}

/// `POST /v1/tandem/spec/sessions`: a session on a local target model
/// that verifies a device's drafts.
pub async fn spec_open(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<SpecOpen>,
) -> Result<Json<SpecOpened>, HttpError> {
    let d = &state.dispatcher;
    Ok(Json(d.verifier().open(d.session_models(), body).await?))
}

/// `POST /v1/tandem/spec/sessions/{id}/verify`: one round.
pub async fn spec_verify(
    State(state): State<AppState>,
    Path(id): Path<String>,
    OpenAiJson(body): OpenAiJson<VerifyRequest>,
) -> Result<Json<VerifyResponse>, HttpError> {
    let d = &state.dispatcher;
    Ok(Json(d.verifier().verify(&id, body).await?))
}

/// `DELETE /v1/tandem/spec/sessions/{id}`.
pub async fn spec_close(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, HttpError> {
    state.dispatcher.verifier().close(&id)?;
    Ok(Json(json!({"session": id, "deleted": true})))
}

fn cards(state: &AppState) -> Vec<ModelCard> {
    let created = state.started;
    let mut seen = std::collections::HashSet::new();
    let card = |id: String, owned_by: String| ModelCard {
        id,
        object: "model".into(),
        created,
        owned_by,
    };
    let mut out = vec![card(
        state.dispatcher.policy().virtual_model.clone(),
        "tandem-router".into(),
    )];
    for b in state.dispatcher.backends() {
        for m in b.models() {
            if seen.insert(m.id.clone()) {
                out.push(card(m.id, m.owned_by));
            }
        }
    }
    if state.dispatcher.embedder().is_some() {
        out.push(card(
            state.dispatcher.embedder_name().to_owned(),
            "tandem".into(),
        ));
    }
    out
}

pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list".into(),
        data: cards(&state),
    })
}

pub async fn get_model(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelCard>, HttpError> {
    cards(&state)
        .into_iter()
        .find(|c| c.id == id)
        .map(Json)
        .ok_or_else(|| HttpError(ApiError::model_not_found(&id)))
}

/// `GET /healthz`: liveness for anyone; the backends, breakers and device
/// state only for a valid key when keys are configured.
pub async fn health(State(state): State<AppState>, headers: HeaderMap) -> Json<Value> {
    let d = &state.dispatcher;
    let access = d.access();
    if !access.is_open() && access.identify(header(&headers, "authorization")).is_none() {
        return Json(json!({"status": "ok"}));
    }
    let network = d.signals().network();
    let backends = crate::ui::backends(&state);
    Json(json!({
        "status": "ok",
        "backends": backends,
        "device": d.signals().device(),
        "metered": network.metered,
        "shared_state": d.shared().map(|s| s.status()),
    }))
}

pub(crate) fn require_admin(
    caller: &Option<axum::Extension<Arc<Caller>>>,
    state: &AppState,
) -> Result<(), ApiError> {
    if state.dispatcher.access().is_open() || caller.as_ref().is_some_and(|c| c.config.admin) {
        Ok(())
    } else {
        Err(ApiError::forbidden("this needs an admin key"))
    }
}

pub async fn get_signals(State(state): State<AppState>) -> Json<Value> {
    let s = state.dispatcher.signals();
    Json(json!({
        "device": s.device(),
        "network": s.network(),
        "overrides": s.overrides(),
    }))
}

/// Sets signal overrides (merged with those already set).
pub async fn put_signals(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
    OpenAiJson(o): OpenAiJson<Overrides>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    state.dispatcher.signals().set_overrides(o);
    Ok(get_signals(State(state)).await)
}

pub async fn clear_signals(
    State(state): State<AppState>,
    caller: Option<axum::Extension<Arc<Caller>>>,
) -> Result<Json<Value>, HttpError> {
    require_admin(&caller, &state)?;
    state.dispatcher.signals().clear_overrides();
    Ok(get_signals(State(state)).await)
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.dispatcher.render_metrics(),
    )
        .into_response()
}
