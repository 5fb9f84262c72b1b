//! Server-sent events in OpenAI's streaming format: one JSON chunk per
//! `data:` line, a final chunk with the finish reason, an optional usage
//! chunk, then `data: [DONE]`. An error after the stream has started
//! arrives as `data: {"error": ...}` and ends the stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use serde::Serialize;
use serde_json::{Map, Value};
use tandem_api::openai::{
    ChatCompletionChunk, ChoiceLogprobs, ChunkChoice, ChunkDelta, Completion, CompletionChoice,
    LegacyLogprobs,
};
use tandem_api::{ApiError, Event, EventStream, FinishReason, Usage};

/// The events of several answers, as they come, each with its choice index.
fn merged(streams: Vec<EventStream>) -> impl Stream<Item = (u32, Result<Event, ApiError>)> + Send {
    futures::stream::select_all(
        streams
            .into_iter()
            .zip(0u32..)
            .map(|(s, i)| s.map(move |e| (i, e)).boxed()),
    )
}

/// The usage of `n` answers to one prompt: the prompt as read once (as
/// OpenAI counts it), the completions together.
pub fn total_usage(usages: &[Usage]) -> Usage {
    let mut total = usages.first().copied().unwrap_or_default();
    total.completion_tokens = usages.iter().map(|u| u.completion_tokens).sum();
    total.total_tokens = total.prompt_tokens + total.completion_tokens;
    total
}

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

/// One answer per stream, choice `i` from `streams[i]`, interleaved as the
/// pieces come; the stream ends when every choice has finished.
pub fn chat(streams: Vec<EventStream>, meta: StreamMeta) -> SseBody {
    let chunk = move |index: u32,
                      delta: ChunkDelta,
                      logprobs: Option<ChoiceLogprobs>,
                      finish: Option<FinishReason>,
                      usage: Option<Usage>,
                      response: &Map<String, Value>| {
        ChatCompletionChunk {
            id: meta.id.clone(),
            object: "chat.completion.chunk".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: if usage.is_some() {
                Vec::new()
            } else {
                vec![ChunkChoice {
                    index,
                    delta,
                    logprobs,
                    finish_reason: finish,
                }]
            },
            usage,
            extra: response.clone(),
        }
    };
    let (want_logprobs, include_usage) = (meta.logprobs, meta.include_usage);
    let n = streams.len();
    let mut events = merged(streams);
    sse(async_stream::stream! {
        // The upstream's answer-level fields, as last sent, on every chunk
        // from then on (OpenAI repeats `system_fingerprint` in each).
        let mut response = Map::new();
        for index in (0u32..).take(n) {
            yield data(&chunk(
                index,
                ChunkDelta { role: Some("assistant".into()), content: Some(String::new()), ..ChunkDelta::default() },
                None, None, None, &response,
            ));
        }
        let mut usages = Vec::with_capacity(n);
        while let Some((index, event)) = events.next().await {
            match event {
                Ok(Event::Delta(d)) => {
                    if !d.response.is_empty() {
                        response = d.response;
                    }
                    let logprobs = want_logprobs.then_some(ChoiceLogprobs { content: Some(d.tokens) });
                    // OpenAI sends text and tool-call pieces in chunks of
                    // their own; so does Tandem.
                    if !d.text.is_empty() || !d.extra.is_empty() || d.tool_calls.is_empty() {
                        // A piece of reasoning alone carries no content.
                        let content = (!d.text.is_empty() || d.extra.is_empty()).then_some(d.text);
                        yield data(&chunk(
                            index,
                            ChunkDelta { content, extra: d.extra, ..ChunkDelta::default() },
                            logprobs, None, None, &response,
                        ));
                    }
                    if !d.tool_calls.is_empty() {
                        yield data(&chunk(
                            index,
                            ChunkDelta { tool_calls: Some(d.tool_calls), ..ChunkDelta::default() },
                            None, None, None, &response,
                        ));
                    }
                }
                Ok(Event::Finish(f)) => {
                    yield data(&chunk(index, ChunkDelta::default(), None, Some(f.reason), None, &response));
                    usages.push(f.usage);
                    if usages.len() == n {
                        if include_usage {
                            yield data(&chunk(0, ChunkDelta::default(), None, None, Some(total_usage(&usages)), &response));
                        }
                        yield done();
                        return;
                    }
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

/// As [`chat`], for the legacy completions API.
pub fn completion(streams: Vec<EventStream>, meta: StreamMeta) -> SseBody {
    let chunk = move |index: u32,
                      text: String,
                      logprobs: Option<LegacyLogprobs>,
                      finish: Option<FinishReason>,
                      usage: Option<Usage>,
                      response: &Map<String, Value>| {
        Completion {
            id: meta.id.clone(),
            object: "text_completion".into(),
            created: meta.created,
            model: meta.model.clone(),
            choices: if usage.is_some() {
                Vec::new()
            } else {
                vec![CompletionChoice {
                    index,
                    text,
                    logprobs,
                    finish_reason: finish,
                }]
            },
            usage,
            extra: response.clone(),
        }
    };
    let (want_logprobs, include_usage) = (meta.logprobs, meta.include_usage);
    let n = streams.len();
    let mut events = merged(streams);
    sse(async_stream::stream! {
        let mut response = Map::new();
        let mut offsets = vec![0usize; n];
        let mut usages = Vec::with_capacity(n);
        while let Some((index, event)) = events.next().await {
            match event {
                Ok(Event::Delta(d)) => {
                    if !d.response.is_empty() {
                        response = d.response;
                    }
                    let offset = offsets.get_mut(index as usize);
                    let at = offset.as_deref().copied().unwrap_or(0);
                    let logprobs = want_logprobs.then(|| {
                        let mut l = LegacyLogprobs::default();
                        l.extend(&d.tokens, at);
                        l
                    });
                    if let Some(o) = offset {
                        *o += d.text.len();
                    }
                    yield data(&chunk(index, d.text, logprobs, None, None, &response));
                }
                Ok(Event::Finish(f)) => {
                    yield data(&chunk(index, String::new(), None, Some(f.reason), None, &response));
                    usages.push(f.usage);
                    if usages.len() == n {
                        if include_usage {
                            yield data(&chunk(0, String::new(), None, None, Some(total_usage(&usages)), &response));
                        }
                        yield done();
                        return;
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_choices_count_the_prompt_once() {
        let u = |p, c| Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
            prompt_tokens_details: None,
        };
        let t = total_usage(&[u(10, 4), u(10, 6), u(10, 1)]);
        assert_eq!(
            (t.prompt_tokens, t.completion_tokens, t.total_tokens),
            (10, 11, 21)
        );
        assert_eq!(total_usage(&[]), Usage::default());
    }
}
