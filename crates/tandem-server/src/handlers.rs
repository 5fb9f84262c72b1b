//! Route handlers: translate between the wire and the backends.

use axum::Json;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_api::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, ChoiceLogprobs,
    Completion, CompletionChoice, CompletionRequest, LegacyLogprobs, ModelCard, ModelList,
};
use tandem_api::{Answer, ApiError, GenerateRequest};

use crate::error::{HttpError, OpenAiJson};
use crate::sse::{self, StreamMeta};
use crate::{AppState, unix_now};

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

async fn start(
    state: &AppState,
    req: GenerateRequest,
) -> Result<tandem_api::EventStream, HttpError> {
    let backend = state.backend_for(&req.model)?;
    Ok(backend.generate(req).await?)
}

pub async fn chat_completions(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, HttpError> {
    let req = body.into_generate()?;
    let meta = StreamMeta {
        id: new_id("chatcmpl"),
        created: unix_now(),
        model: req.model.clone(),
        logprobs: req.logprobs.is_some(),
        include_usage: req.include_usage,
    };
    let streaming = req.stream;
    let events = start(&state, req).await?;
    if streaming {
        return Ok(sse::chat(events, meta).into_response());
    }
    let answer = Answer::collect(events).await?;
    Ok(Json(ChatCompletion {
        id: meta.id,
        object: "chat.completion".into(),
        created: meta.created,
        model: meta.model,
        choices: vec![ChatChoice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: Some(answer.text),
            },
            logprobs: meta.logprobs.then_some(ChoiceLogprobs {
                content: Some(answer.tokens),
            }),
            finish_reason: Some(answer.finish.reason),
        }],
        usage: Some(answer.finish.usage),
    })
    .into_response())
}

pub async fn completions(
    State(state): State<AppState>,
    OpenAiJson(body): OpenAiJson<CompletionRequest>,
) -> Result<Response, HttpError> {
    let req = body.into_generate()?;
    let meta = StreamMeta {
        id: new_id("cmpl"),
        created: unix_now(),
        model: req.model.clone(),
        logprobs: req.logprobs.is_some(),
        include_usage: req.include_usage,
    };
    let streaming = req.stream;
    let events = start(&state, req).await?;
    if streaming {
        return Ok(sse::completion(events, meta).into_response());
    }
    let answer = Answer::collect(events).await?;
    let logprobs = meta.logprobs.then(|| {
        let mut l = LegacyLogprobs::default();
        l.extend(&answer.tokens, 0);
        l
    });
    Ok(Json(Completion {
        id: meta.id,
        object: "text_completion".into(),
        created: meta.created,
        model: meta.model,
        choices: vec![CompletionChoice {
            index: 0,
            text: answer.text,
            logprobs,
            finish_reason: Some(answer.finish.reason),
        }],
        usage: Some(answer.finish.usage),
    })
    .into_response())
}

fn cards(state: &AppState) -> Vec<ModelCard> {
    let created = state.inner.started;
    let mut seen = std::collections::HashSet::new();
    state
        .backends()
        .iter()
        .flat_map(|b| b.models())
        .filter(|m| seen.insert(m.id.clone()))
        .map(|m| ModelCard {
            id: m.id,
            object: "model".into(),
            created,
            owned_by: m.owned_by,
        })
        .collect()
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

pub async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    let backends: Vec<_> = state
        .backends()
        .iter()
        .map(|b| {
            json!({
                "name": b.name(),
                "locality": b.locality(),
                "models": b.models(),
                "load": b.load(),
            })
        })
        .collect();
    Json(json!({ "status": "ok", "backends": backends }))
}
