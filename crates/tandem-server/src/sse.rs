//! Server-sent events in OpenAI's streaming format: one JSON chunk per
//! `data:` line, a final chunk with the finish reason, an optional usage
//! chunk, then `data: [DONE]`. An error after the stream has started
//! arrives as `data: {"error": ...}` and ends the stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tandem_api::openai::{
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, ChunkDelta, Completion, CompletionChoice,
    LegacyLogprobs,
};
use tandem_api::{ApiError, Event, EventStream, FinishReason, Usage};

pub struct StreamMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub logprobs: bool,
    pub include_usage: bool,
}

fn data(value: &impl Serialize) -> SseEvent {
    match serde_json::to_string(value) {
        Ok(s) => SseEvent::default().data(s),
        Err(e) => SseEvent::default().data(format!(
            r#"{{"error":{{"message":"cannot encode chunk: {e}","type":"server_error"}}}}"#
        )),
    }
}

fn done() -> SseEvent {
    SseEvent::default().data("[DONE]")
}

fn error(e: &ApiError) -> SseEvent {
    data(&e.to_body())
}

fn unfinished() -> ApiError {
    ApiError::bad_gateway("the backend ended the answer without finishing it")
}

type SseBody = Sse<
    axum::response::sse::KeepAliveStream<
        futures::stream::BoxStream<'static, Result<SseEvent, Infallible>>,
    >,
>;

fn sse(s: impl Stream<Item = SseEvent> + Send + 'static) -> SseBody {
    Sse::new(s.map(Ok).boxed()).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

pub fn chat(mut events: EventStream, meta: StreamMeta) -> SseBody {
    let chunk = move |delta: ChunkDelta,
                      logprobs: Option<ChoiceLogprobs>,
                      finish: Option<FinishReason>,
                      usage: Option<Usage>| {
        ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: if usage.is_some() {
                Vec::new()
            } else {
                vec![ChunkChoice {
                    index: 0,
                    delta,
                    logprobs,
                    finish_reason: finish,
                }]
            },
            usage,
        }
    };
    let (want_logprobs, include_usage) = (meta.logprobs, meta.include_usage);
    sse(async_stream::stream! {
        yield data(&chunk(
            ChunkDelta { role: Some("assistant".into()), content: Some(String::new()), ..ChunkDelta::default() },
            None, None, None,
        ));
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Delta(d)) => {
                    let logprobs = want_logprobs.then_some(ChoiceLogprobs { content: Some(d.tokens) });
                    // OpenAI sends text and tool-call pieces in chunks of
                    // their own; so does Tandem.
                    if !d.text.is_empty() || !d.extra.is_empty() || d.tool_calls.is_empty() {
                        // A piece of reasoning alone carries no content.
                        let content = (!d.text.is_empty() || d.extra.is_empty()).then_some(d.text);
                        yield data(&chunk(
                            ChunkDelta { content, extra: d.extra, ..ChunkDelta::default() },
                            logprobs, None, None,
                        ));
                    }
                    if !d.tool_calls.is_empty() {
                        yield data(&chunk(
                            ChunkDelta { tool_calls: Some(d.tool_calls), ..ChunkDelta::default() },
                            None, None, None,
                        ));
                    }
                }
                Ok(Event::Finish(f)) => {
                    yield data(&chunk(ChunkDelta::default(), None, Some(f.reason), None));
                    if include_usage {
                        yield data(&chunk(ChunkDelta::default(), None, None, Some(f.usage)));
                    }
                    yield done();
                    return;
                }
                Err(e) => {
                    yield error(&e);
                    return;
                }
            }
        }
        yield error(&unfinished());
    })
}

pub fn completion(mut events: EventStream, meta: StreamMeta) -> SseBody {
    let chunk = move |text: String,
                      logprobs: Option<LegacyLogprobs>,
                      finish: Option<FinishReason>,
                      usage: Option<Usage>| {
        Completion {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: if usage.is_some() {
                Vec::new()
            } else {
                vec![CompletionChoice {
                    index: 0,
                    text,
                    logprobs,
                    finish_reason: finish,
                }]
            },
            usage,
        }
    };
    let (want_logprobs, include_usage) = (meta.logprobs, meta.include_usage);
    sse(async_stream::stream! {
        let mut offset = 0;
        while let Some(event) = events.next().await {
            match event {
                Ok(Event::Delta(d)) => {
                    let logprobs = want_logprobs.then(|| {
                        let mut l = LegacyLogprobs::default();
                        l.extend(&d.tokens, offset);
                        l
                    });
                    offset += d.text.len();
                    yield data(&chunk(d.text, logprobs, None, None));
                }
                Ok(Event::Finish(f)) => {
                    yield data(&chunk(String::new(), None, Some(f.reason), None));
                    if include_usage {
                        yield data(&chunk(String::new(), None, None, Some(f.usage)));
                    }
                    yield done();
                    return;
                }
                Err(e) => {
                    yield error(&e);
                    return;
                }
            }
        }
        yield error(&unfinished());
    })
}
