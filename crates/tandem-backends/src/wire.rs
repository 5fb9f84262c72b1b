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
    /// Each choice's finish reason, as it came.
    pub finish: std::collections::BTreeMap<u32, FinishReason>,
    pub usage: Option<Usage>,
    /// Chunks with content, a stand-in for tokens when no usage is sent.
    pub content_chunks: u32,
    /// Whether the answer has several choices, told apart by `index`; one
    /// choice is read whatever index an upstream gives it.
    pub several: bool,
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
    /// One SSE `data:` payload. Returns the content it carried, if any,
    /// with the index of the choice it belongs to.
    pub(crate) fn on_data(
        &mut self,
        endpoint: Endpoint,
        data: &str,
    ) -> Result<Vec<(u32, Delta)>, ApiError> {
        let v: Value = serde_json::from_str(data)
            .map_err(|e| ApiError::bad_gateway(format!("upstream sent invalid JSON: {e}")))?;
        if let Some(e) = upstream_error(&v) {
            return Err(e);
        }
        let unexpected = |e: serde_json::Error| {
            ApiError::bad_gateway(format!("upstream sent an unexpected chunk: {e}"))
        };
        let several = self.several;
        let index = |i: u32| if several { i } else { 0 };
        let mut deltas = Vec::new();
        match endpoint {
            Endpoint::Chat => {
                let c: ChatCompletionChunk = serde_json::from_value(v).map_err(unexpected)?;
                if let Some(u) = c.usage {
                    self.usage = Some(u);
                }
                let response = passed_on(c.extra);
                // One choice: the first of the chunk, as before `n` was read.
                let take = if several { c.choices.len() } else { 1 };
                for ch in c.choices.into_iter().take(take) {
                    let i = index(ch.index);
                    if let Some(f) = ch.finish_reason {
                        self.finish.insert(i, f);
                    }
                    let d = Delta {
                        text: ch.delta.content.unwrap_or_default(),
                        tokens: ch.logprobs.and_then(|l| l.content).unwrap_or_default(),
                        tool_calls: ch.delta.tool_calls.unwrap_or_default(),
                        extra: passed_on(ch.delta.extra),
                        response: response.clone(),
                    };
                    if !d.is_empty() {
                        deltas.push((i, d));
                    }
                }
            }
            Endpoint::Completions => {
                let c: Completion = serde_json::from_value(v).map_err(unexpected)?;
                if let Some(u) = c.usage {
                    self.usage = Some(u);
                }
                let response = passed_on(c.extra);
                let take = if several { c.choices.len() } else { 1 };
                for ch in c.choices.into_iter().take(take) {
                    let i = index(ch.index);
                    if let Some(f) = ch.finish_reason {
                        self.finish.insert(i, f);
                    }
                    let tokens = ch.logprobs.map(legacy_to_tokens).unwrap_or_default();
                    if !ch.text.is_empty() || !tokens.is_empty() {
                        deltas.push((
                            i,
                            Delta {
                                text: ch.text,
                                tokens,
                                response: response.clone(),
                                ..Delta::default()
                            },
                        ));
                    }
                }
            }
        }
        if !deltas.is_empty() {
            self.content_chunks += 1;
        }
        Ok(deltas)
    }

    /// The closing events of the choices that finished, once the stream
    /// has ended normally. The first choice's carries the usage of the
    /// whole answer; the others' count no tokens (an upstream counts them
    /// together).
    pub(crate) fn finish(&self) -> Vec<(u32, Event)> {
        let usage = self
            .usage
            .unwrap_or_else(|| Usage::new(0, self.content_chunks));
        shared_usage(self.finish.iter().map(|(&i, &reason)| (i, reason)), usage)
    }
}

/// Finish events for `(index, reason)` pairs, the answer's usage on the
/// lowest index.
fn shared_usage(
    finishes: impl Iterator<Item = (u32, FinishReason)>,
    usage: Usage,
) -> Vec<(u32, Event)> {
    let mut out: Vec<(u32, Event)> = Vec::new();
    for (i, reason) in finishes {
        let usage = if out.is_empty() {
            usage
        } else {
            Usage::new(usage.prompt_tokens, 0)
        };
        out.push((i, Event::Finish(Finish { reason, usage })));
    }
    out
}

/// A whole (non-streamed) answer as events.
/// Fields beyond those Tandem reads (of a message, or of the answer), for
/// the client: the role is Tandem's to set, and a null says nothing.
fn passed_on(mut extra: Map<String, Value>) -> Map<String, Value> {
    extra.remove("role");
    extra.retain(|_, v| !v.is_null());
    extra
}

pub(crate) fn whole_answer(
    endpoint: Endpoint,
    body: &[u8],
    several: bool,
) -> Result<Vec<(u32, Event)>, ApiError> {
    let bad =
        |e: serde_json::Error| ApiError::bad_gateway(format!("unexpected upstream answer: {e}"));
    // The common case parses straight into the answer type; only a body
    // that is not one is looked at for an error object.
    type Choice = (u32, Delta, Option<FinishReason>);
    let parsed: Result<(Vec<Choice>, Option<Usage>), serde_json::Error> = match endpoint {
        Endpoint::Chat => serde_json::from_slice::<ChatCompletion>(body).map(|c| {
            let response = passed_on(c.extra);
            let choices = c
                .choices
                .into_iter()
                .map(|ch| {
                    (
                        ch.index,
                        Delta {
                            text: ch.message.content.unwrap_or_default(),
                            tokens: ch.logprobs.and_then(|l| l.content).unwrap_or_default(),
                            tool_calls: (0u32..)
                                .zip(ch.message.tool_calls.unwrap_or_default())
                                .map(|(i, call)| call.as_delta(i))
                                .collect(),
                            extra: passed_on(ch.message.extra),
                            response: response.clone(),
                        },
                        ch.finish_reason,
                    )
                })
                .collect();
            (choices, c.usage)
        }),
        Endpoint::Completions => serde_json::from_slice::<Completion>(body).map(|c| {
            let response = passed_on(c.extra);
            let choices = c
                .choices
                .into_iter()
                .map(|ch| {
                    (
                        ch.index,
                        Delta {
                            text: ch.text,
                            tokens: ch.logprobs.map(legacy_to_tokens).unwrap_or_default(),
                            response: response.clone(),
                            ..Delta::default()
                        },
                        ch.finish_reason,
                    )
                })
                .collect();
            (choices, c.usage)
        }),
    };
    let (mut choices, usage) = match parsed {
        Ok(answer) => answer,
        Err(e) => {
            let v: Value = serde_json::from_slice(body)
                .map_err(|e| ApiError::bad_gateway(format!("upstream sent invalid JSON: {e}")))?;
            return Err(upstream_error(&v).unwrap_or_else(|| bad(e)));
        }
    };
    if choices.is_empty() {
        return Err(ApiError::bad_gateway("upstream answer has no choices"));
    }
    if several {
        choices.sort_by_key(|c| c.0);
        choices.dedup_by_key(|c| c.0);
    } else {
        choices.truncate(1);
        choices[0].0 = 0;
    }
    let finishes = shared_usage(
        choices
            .iter()
            .map(|(i, _, reason)| (*i, reason.unwrap_or(FinishReason::Stop))),
        usage.unwrap_or_default(),
    );
    Ok(choices
        .into_iter()
        .map(|(i, delta, _)| (i, Event::Delta(delta)))
        .chain(finishes)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_missing_bookkeeping_fields_are_read() {
        let body = br#"{"choices":[{"message":{"content":"Paris"},"finish_reason":"stop"}]}"#;
        let events = whole_answer(Endpoint::Chat, body, false).expect("lenient");
        assert_eq!(events[0], (0, Event::Delta(Delta::text("Paris"))));
        let mut s = StreamState::default();
        let d = s
            .on_data(
                Endpoint::Chat,
                r#"{"choices":[{"delta":{"content":"Pa"}}]}"#,
            )
            .expect("lenient chunk");
        assert_eq!(d, vec![(0, Delta::text("Pa"))]);
        s.on_data(
            Endpoint::Chat,
            r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#,
        )
        .expect("lenient chunk");
        assert!(matches!(s.finish()[..], [(0, Event::Finish(_))]));
        let body = br#"{"choices":[{"text":"4","finish_reason":"length"}]}"#;
        assert!(whole_answer(Endpoint::Completions, body, false).is_ok());
        // What is not an answer is still an error.
        assert!(whole_answer(Endpoint::Chat, br#"{"choices":[]}"#, false).is_err());
    }

    #[test]
    fn several_choices_are_told_apart_and_share_one_usage() {
        let mut s = StreamState {
            several: true,
            ..StreamState::default()
        };
        let d = s
            .on_data(
                Endpoint::Chat,
                r#"{"choices":[{"index":1,"delta":{"content":"b"}},{"index":0,"delta":{"content":"a"}}]}"#,
            )
            .expect("chunk");
        assert_eq!(d, vec![(1, Delta::text("b")), (0, Delta::text("a"))]);
        for data in [
            r#"{"choices":[{"index":1,"delta":{},"finish_reason":"length"}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#,
        ] {
            s.on_data(Endpoint::Chat, data).expect("chunk");
        }
        let f = s.finish();
        assert_eq!(
            f,
            vec![
                (
                    0,
                    Event::Finish(Finish {
                        reason: FinishReason::Stop,
                        usage: Usage::new(7, 5)
                    })
                ),
                (
                    1,
                    Event::Finish(Finish {
                        reason: FinishReason::Length,
                        usage: Usage::new(7, 0)
                    })
                ),
            ]
        );
        // Read as one choice, only the first of each chunk counts.
        let mut one = StreamState::default();
        let d = one
            .on_data(
                Endpoint::Chat,
                r#"{"choices":[{"index":1,"delta":{"content":"b"}},{"index":0,"delta":{"content":"a"}}]}"#,
            )
            .expect("chunk");
        assert_eq!(d, vec![(0, Delta::text("b"))]);

        let body = br#"{"choices":[{"index":1,"text":"y","finish_reason":"stop"},{"index":0,"text":"x","finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
        let events = whole_answer(Endpoint::Completions, body, true).expect("two choices");
        let deltas: Vec<_> = events
            .iter()
            .filter_map(|(i, e)| match e {
                Event::Delta(d) => Some((*i, d.text.clone())),
                Event::Finish(_) => None,
            })
            .collect();
        assert_eq!(deltas, vec![(0, "x".to_owned()), (1, "y".to_owned())]);
        assert!(events.contains(&(
            1,
            Event::Finish(Finish {
                reason: FinishReason::Stop,
                usage: Usage::new(3, 0)
            })
        )));
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
    fn read(chunks: Vec<Vec<u8>>, endpoint: Endpoint, several: bool) -> Vec<String> {
        let stream = without_bom(futures::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, std::io::Error>(bytes::Bytes::from(c))),
        ));
        futures::executor::block_on(async {
            let mut events = Box::pin(stream.eventsource());
            let mut state = StreamState {
                several,
                ..StreamState::default()
            };
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
                for several in [false, true] {
                    let whole = read(vec![bytes.clone()], endpoint, several);
                    let cut = read(chunks.clone(), endpoint, several);
                    prop_assert_eq!(whole, cut);
                    let _ = whole_answer(endpoint, &bytes, several);
                }
            }
        }
    }
}
