//! Reading an upstream's answers back into Tandem's events.

use serde_json::{Map, Value};
use tandem_api::openai::{ChatCompletion, ChatCompletionChunk, Completion, LegacyLogprobs};
use tandem_api::{ApiError, Delta, Event, Finish, FinishReason, TokenLogprob, TopLogprob, Usage};

/// Which endpoint the upstream is answering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }
}

/// A UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The body of an SSE answer without a leading byte order mark (which SSE
/// says to drop): `eventsource-stream` 0.2.3 drops it by slicing one byte
/// off a three-byte character and panics, so one odd upstream could take
/// down the task serving its client. A mark split across chunks is held
/// until it is whole; repeated marks are all dropped.
pub(crate) fn without_bom<S, E>(body: S) -> impl futures::Stream<Item = Result<bytes::Bytes, E>>
where
    S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send,
{
    use futures::StreamExt;
    async_stream::stream! {
        let mut body = Box::pin(body);
        let mut head: Vec<u8> = Vec::new();
        let mut started = false;
        while let Some(item) = body.next().await {
            match item {
                Ok(chunk) if !started => {
                    head.extend_from_slice(&chunk);
                    // Every leading mark goes (the library would choke on a
                    // second one just the same); wait while what is left
                    // could still be the start of one.
                    while head.starts_with(BOM) {
                        head.drain(..BOM.len());
                    }
                    if !BOM.starts_with(&head) {
                        started = true;
                        yield Ok(bytes::Bytes::from(std::mem::take(&mut head)));
                    }
                }
                other => yield other,
            }
        }
        if !started && !BOM.starts_with(&head) {
            yield Ok(bytes::Bytes::from(head));
        }
    }
}

/// State across the chunks of one streamed answer.
#[derive(Debug, Default)]
pub(crate) struct StreamState {
    pub finish: Option<FinishReason>,
    pub usage: Option<Usage>,
    /// Chunks with content, a stand-in for tokens when no usage is sent.
    pub content_chunks: u32,
}

fn legacy_to_tokens(l: LegacyLogprobs) -> Vec<TokenLogprob> {
    l.tokens
        .into_iter()
        .zip(l.token_logprobs)
        .zip(l.top_logprobs)
        .map(|((token, logprob), top)| TokenLogprob {
            bytes: Some(token.as_bytes().to_vec()),
            token,
            logprob,
            top_logprobs: top
                .into_iter()
                .map(|(t, v)| TopLogprob {
                    bytes: Some(t.as_bytes().to_vec()),
                    token: t,
                    logprob: v.as_f64().unwrap_or(f64::NEG_INFINITY) as f32,
                })
                .collect(),
        })
        .collect()
}

fn upstream_error(v: &Value) -> Option<ApiError> {
    let e = v.get("error")?;
    let message = e
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("upstream error")
        .to_owned();
    Some(ApiError::bad_gateway(format!("upstream error: {message}")))
}

impl StreamState {
    /// One SSE `data:` payload. Returns the content it carried, if any.
    pub(crate) fn on_data(
        &mut self,
        endpoint: Endpoint,
        data: &str,
    ) -> Result<Option<Delta>, ApiError> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| ApiError::bad_gateway(format!("upstream sent invalid JSON: {e}")))?;
        if let Some(e) = upstream_error(&v) {
            return Err(e);
        }
        let delta = match endpoint {
            Endpoint::Chat => {
                let c: ChatCompletionChunk = serde_json::from_value(v).map_err(|e| {
                    ApiError::bad_gateway(format!("upstream sent an unexpected chunk: {e}"))
                })?;
                if let Some(u) = c.usage {
                    self.usage = Some(u);
                }
                let response = passed_on(c.extra);
                c.choices.into_iter().next().and_then(|ch| {
                    if let Some(f) = ch.finish_reason {
                        self.finish = Some(f);
                    }
                    let d = Delta {
                        text: ch.delta.content.unwrap_or_default(),
                        tokens: ch.logprobs.and_then(|l| l.content).unwrap_or_default(),
                        tool_calls: ch.delta.tool_calls.unwrap_or_default(),
                        extra: passed_on(ch.delta.extra),
                        response,
                    };
                    (!d.is_empty()).then_some(d)
                })
            }
            Endpoint::Completions => {
                let c: Completion = serde_json::from_value(v).map_err(|e| {
                    ApiError::bad_gateway(format!("upstream sent an unexpected chunk: {e}"))
                })?;
                if let Some(u) = c.usage {
                    self.usage = Some(u);
                }
                let response = passed_on(c.extra);
                c.choices.into_iter().next().and_then(|ch| {
                    if let Some(f) = ch.finish_reason {
                        self.finish = Some(f);
                    }
                    let tokens = ch.logprobs.map(legacy_to_tokens).unwrap_or_default();
                    (!ch.text.is_empty() || !tokens.is_empty()).then_some(Delta {
                        text: ch.text,
                        tokens,
                        response,
                        ..Delta::default()
                    })
                })
            }
        };
        if delta.is_some() {
            self.content_chunks += 1;
        }
        Ok(delta)
    }

    /// The closing event, once the stream has ended normally.
    pub(crate) fn finish(&self) -> Result<Event, ApiError> {
        let reason = self.finish.ok_or_else(|| {
            ApiError::bad_gateway("the upstream ended the stream before finishing the answer")
        })?;
        Ok(Event::Finish(Finish {
            reason,
            usage: self
                .usage
                .unwrap_or_else(|| Usage::new(0, self.content_chunks)),
        }))
    }
}

/// A whole (non-streamed) answer as events.
/// Fields beyond those Tandem reads (of a message, or of the answer), for
/// the client: the role is Tandem's to set, and a null says nothing.
fn passed_on(mut extra: Map<String, Value>) -> Map<String, Value> {
    extra.remove("role");
    extra.retain(|_, v| !v.is_null());
    extra
}

pub(crate) fn whole_answer(endpoint: Endpoint, body: &[u8]) -> Result<Vec<Event>, ApiError> {
    let bad =
        |e: serde_json::Error| ApiError::bad_gateway(format!("unexpected upstream answer: {e}"));
    // The common case parses straight into the answer type; only a body
    // that is not one is looked at for an error object.
    let parsed = match endpoint {
        Endpoint::Chat => serde_json::from_slice::<ChatCompletion>(body).map(|c| {
            let response = passed_on(c.extra);
            c.choices.into_iter().next().map(|ch| {
                (
                    Delta {
                        text: ch.message.content.unwrap_or_default(),
                        tokens: ch.logprobs.and_then(|l| l.content).unwrap_or_default(),
                        tool_calls: (0u32..)
                            .zip(ch.message.tool_calls.unwrap_or_default())
                            .map(|(i, call)| call.as_delta(i))
                            .collect(),
                        extra: passed_on(ch.message.extra),
                        response,
                    },
                    ch.finish_reason,
                    c.usage,
                )
            })
        }),
        Endpoint::Completions => serde_json::from_slice::<Completion>(body).map(|c| {
            let response = passed_on(c.extra);
            c.choices.into_iter().next().map(|ch| {
                (
                    Delta {
                        text: ch.text,
                        tokens: ch.logprobs.map(legacy_to_tokens).unwrap_or_default(),
                        response,
                        ..Delta::default()
                    },
                    ch.finish_reason,
                    c.usage,
                )
            })
        }),
    };
    let (delta, reason, usage) = match parsed {
        Ok(Some(answer)) => answer,
        Ok(None) => return Err(ApiError::bad_gateway("upstream answer has no choices")),
        Err(e) => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_gateway(format!("upstream sent invalid JSON: {e}")))?;
            return Err(upstream_error(&v).unwrap_or_else(|| bad(e)));
        }
    };
    Ok(vec![
        Event::Delta(delta),
        Event::Finish(Finish {
            reason: reason.unwrap_or(FinishReason::Stop),
            usage: usage.unwrap_or_default(),
        }),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_missing_bookkeeping_fields_are_read() {
        let body = br#"{"choices":[{"message":{"content":"Paris"},"finish_reason":"stop"}]}"#;
        let events = whole_answer(Endpoint::Chat, body).expect("lenient");
        assert_eq!(events[0], Event::Delta(Delta::text("Paris")));
        let mut s = StreamState::default();
        let d = s
            .on_data(
                Endpoint::Chat,
                r#"{"choices":[{"delta":{"content":"Pa"}}]}"#,
            )
            .expect("lenient chunk");
        assert_eq!(d.map(|d| d.text), Some("Pa".into()));
        s.on_data(
            Endpoint::Chat,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        )
        .expect("lenient chunk");
        assert!(matches!(s.finish(), Ok(Event::Finish(_))));
        let body = br#"{"choices":[{"text":"4","finish_reason":"length"}]}"#;
        assert!(whole_answer(Endpoint::Completions, body).is_ok());
        // What is not an answer is still an error.
        assert!(whole_answer(Endpoint::Chat, br#"{"choices":[]}"#).is_err());
    }
}

/// Property test of reading upstream answers over arbitrary input: SSE
/// framing (through `eventsource-stream`, the bytes cut into arbitrary
/// chunks), each event's JSON, and whole bodies. Reading is total (an error,
/// never a panic), and cutting the bytes differently never changes what is
/// read. CI runs a short form; `PROPTEST_CASES=10000000 cargo test --release
/// -p tandem-backends fuzz` is the long run.
#[cfg(test)]
mod fuzz {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    use proptest::prelude::*;

    use super::*;

    const PIECES: &[&str] = &[
        "data: ",
        "data:",
        "\n",
        "\r\n",
        "\n\n",
        ": keep-alive\n\n",
        "event: error\n",
        "data: [DONE]\n\n",
        r#"{"choices":[{"index":0,"delta":{"content":"hé"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":"{\"a\""}}]}}]}"#,
        r#"{"choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        r#"{"choices":[{"index":0,"text":"x","logprobs":{"tokens":["x"],"token_logprobs":[-0.1],"top_logprobs":[{"x":-0.1}]}}]}"#,
        r#"{"error":{"message":"boom"}}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"a"},"logprobs":{"content":[{"token":"a","logprob":-1e309,"top_logprobs":[]}]}}]}"#,
        "{",
        "}",
        "\"",
        "\u{0}",
        "\u{FEFF}",
        "🙂",
    ];

    fn text() -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![
                proptest::sample::select(PIECES).prop_map(str::to_owned),
                any::<String>(),
            ],
            0..12,
        )
        .prop_map(|v| v.concat())
    }

    /// What a stream of `chunks` reads as, for both endpoints.
    fn read(chunks: Vec<Vec<u8>>, endpoint: Endpoint) -> Vec<String> {
        let stream = without_bom(futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
        ));
        futures::executor::block_on(async {
            let mut events = Box::pin(stream.eventsource());
            let mut state = StreamState::default();
            let mut out = Vec::new();
            while let Some(e) = events.next().await {
                match e {
                    Ok(ev) if ev.data.trim() == "[DONE]" => break,
                    Ok(ev) => out.push(format!("{:?}", state.on_data(endpoint, &ev.data))),
                    Err(e) => {
                        out.push(format!("framing: {e}"));
                        break;
                    }
                }
            }
            out.push(format!("{:?}", state.finish()));
            out
        })
    }

    fn cases() -> u32 {
        // An explicit count would override PROPTEST_CASES: read it here.
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5_000)
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: cases(),
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        #[test]
        fn reading_answers_is_total_and_chunking_does_not_matter(
            t in text(),
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let bytes = t.into_bytes();
            let mut at: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
            at.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for a in at {
                chunks.push(bytes[from..a].to_vec());
                from = a;
            }
            chunks.push(bytes[from..].to_vec());
            for endpoint in [Endpoint::Chat, Endpoint::Completions] {
                let whole = read(vec![bytes.clone()], endpoint);
                let cut = read(chunks.clone(), endpoint);
                prop_assert_eq!(whole, cut);
                let _ = whole_answer(endpoint, &bytes);
            }
        }
    }
}
