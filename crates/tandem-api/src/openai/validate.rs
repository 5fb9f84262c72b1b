//! Checking a request field by field, with errors that name the field, and
//! turning it into the internal [`GenerateRequest`] — and back into a
//! request for an upstream.

use serde_json::{Map, Value};

use super::{
    ChatCompletionRequest, ChatMessage, CompletionRequest, MAX_TOP_LOGPROBS, MessageContent,
    PromptInput, Stop, StreamOptions,
};
use crate::error::ApiError;
use crate::generate::{GenerateRequest, Input, LogprobRequest, Message, Sampling};

fn check_range(param: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::invalid_param(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
    }
}

fn check_max_tokens(param: &str, v: Option<i64>) -> Result<Option<u32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x >= 1 => Ok(Some(u32::try_from(x).unwrap_or(u32::MAX))),
        Some(x) => Err(ApiError::invalid_param(
            param,
            format!("{param} must be at least 1, got {x}"),
        )),
    }
}

/// OpenAI's limit on `n`.
const MAX_CHOICES: u32 = 128;

fn check_n(n: Option<i64>) -> Result<u32, ApiError> {
    match n {
        None => Ok(1),
        Some(x) if (1..=i64::from(MAX_CHOICES)).contains(&x) => Ok(x as u32),
        Some(x) => Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {x}"),
        )),
    }
}

fn check_stop(stop: Option<Stop>) -> Result<Vec<String>, ApiError> {
    let stop = stop.map(Stop::into_vec).unwrap_or_default();
    if stop.len() > 4 {
        return Err(ApiError::invalid_param(
            "stop",
            "at most 4 stop sequences are allowed",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop sequences must not be empty",
        ));
    }
    Ok(stop)
}

fn required_model(model: Option<String>) -> Result<String, ApiError> {
    match model {
        Some(m) if !m.trim().is_empty() => Ok(m),
        _ => Err(ApiError::invalid_param(
            "model",
            "you must provide a model parameter",
        )),
    }
}

struct SamplingFields {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    seed: Option<i64>,
    presence: Option<f64>,
    frequency: Option<f64>,
    ignore_eos: Option<bool>,
}

fn sampling(f: SamplingFields) -> Result<Sampling, ApiError> {
    let SamplingFields {
        temperature,
        top_p,
        top_k,
        min_p,
        repeat_penalty,
        seed,
        presence,
        frequency,
        ignore_eos,
    } = f;
    let top_k = match top_k {
        None => None,
        Some(k) if k >= 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be 0 or more, got {k}"),
            ));
        }
    };
    let top_p = check_range("top_p", top_p, 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            "top_p must be greater than 0",
        ));
    }
    let repeat_penalty = check_range("repeat_penalty", repeat_penalty, 0.0, 2.0)?;
    if repeat_penalty == Some(0.0) {
        return Err(ApiError::invalid_param(
            "repeat_penalty",
            "repeat_penalty must be greater than 0 (1 turns it off)",
        ));
    }
    Ok(Sampling {
        temperature: check_range("temperature", temperature, 0.0, 2.0)?,
        top_p,
        top_k,
        min_p: check_range("min_p", min_p, 0.0, 1.0)?,
        repeat_penalty,
        // Seeds wider than 32 bits are folded rather than refused: clients
        // often pass random 64-bit values.
        seed: seed.map(|s| (s as u64 ^ ((s as u64) >> 32)) as u32),
        presence_penalty: check_range("presence_penalty", presence, -2.0, 2.0)?.unwrap_or(0.0),
        frequency_penalty: check_range("frequency_penalty", frequency, -2.0, 2.0)?.unwrap_or(0.0),
        ignore_eos: ignore_eos.unwrap_or(false),
    })
}

/// The shape of the message fields OpenAI defines (the rest pass through
/// as they are): a wrong type is a 400 here, not a surprise at the
/// template or the upstream.
fn check_known_fields(param: &str, role: &str, extra: &Map<String, Value>) -> Result<(), ApiError> {
    let field = |name: &str| extra.get(name).filter(|v| !v.is_null());
    let bad = |name: &str, why: &str| {
        Err(ApiError::invalid_param(
            &format!("{param}.{name}"),
            format!("{param}.{name} {why}"),
        ))
    };
    if let Some(id) = field("tool_call_id")
        && !id.is_string()
    {
        return bad("tool_call_id", "must be a string");
    }
    if role == "tool" && field("tool_call_id").is_none() {
        return bad("tool_call_id", "is required in a message with role `tool`");
    }
    if let Some(calls) = field("tool_calls") {
        let ok = calls.as_array().is_some_and(|a| {
            a.iter().all(|c| {
                c.get("function")
                    .and_then(|f| f.get("name"))
                    .is_some_and(Value::is_string)
            })
        });
        if !ok {
            return bad(
                "tool_calls",
                "must be a list of calls, each with a `function` that has a `name`",
            );
        }
    }
    if let Some(r) = field("refusal")
        && !r.is_string()
    {
        return bad("refusal", "must be a string");
    }
    Ok(())
}

impl ChatMessage {
    /// Flattens the content to text; parts that are more than text (images,
    /// audio, files) are kept as sent for upstreams.
    fn into_message(self, index: usize) -> Result<Message, ApiError> {
        let param = format!("messages[{index}]");
        let role = match self.role.as_str() {
            "system" | "user" | "assistant" | "tool" => self.role,
            // OpenAI's newer name for system instructions.
            "developer" => "system".to_owned(),
            other => {
                return Err(ApiError::invalid_param(
                    &param,
                    format!(
                        "unknown role `{other}`: expected system, developer, user, assistant or tool"
                    ),
                ));
            }
        };
        let (content, parts) = match self.content {
            None => (String::new(), None),
            Some(MessageContent::Text(t)) => (t, None),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for (i, part) in parts.iter().enumerate() {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text.push_str(t),
                        ("text", None) => {
                            return Err(ApiError::invalid_param(
                                &format!("{param}.content[{i}].text"),
                                "a part of type `text` needs a `text` string",
                            ));
                        }
                        ("", _) => {
                            return Err(ApiError::invalid_param(
                                &format!("{param}.content[{i}].type"),
                                "a content part needs a `type`",
                            ));
                        }
                        _ => {}
                    }
                }
                let more_than_text = parts.iter().any(|p| p.kind != "text");
                (text, more_than_text.then_some(parts))
            }
        };
        if content.is_empty() && parts.is_none() && role != "assistant" {
            return Err(ApiError::invalid_param(
                &param,
                format!("{param} has empty content"),
            ));
        }
        check_known_fields(&param, &role, &self.extra)?;
        Ok(Message {
            role,
            content,
            name: self.name,
            parts,
            extra: self.extra,
        })
    }
}

impl ChatCompletionRequest {
    /// How many choices are asked for (`n`, 1 when absent), checked.
    pub fn choices(&self) -> Result<u32, ApiError> {
        check_n(self.n)
    }

    /// Checks every field and builds the internal request.
    pub fn into_generate(self) -> Result<GenerateRequest, ApiError> {
        let model = required_model(self.model)?;
        let messages = self.messages.unwrap_or_default();
        if messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must contain at least one message",
            ));
        }
        let mut messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.into_message(i))
            .collect::<Result<Vec<_>, _>>()?;
        let mut extra = self.extra;
        // vLLM's convention for continuing an assistant message: the last
        // message is the partial answer and generation carries on from it.
        let continue_from = match extra.remove("continue_final_message") {
            Some(Value::Bool(true)) => {
                extra.remove("add_generation_prompt");
                match messages.pop() {
                    Some(m) if m.role == "assistant" && !messages.is_empty() => Some(m.content),
                    _ => {
                        return Err(ApiError::invalid_param(
                            "continue_final_message",
                            "continue_final_message needs a final assistant message after at least one other message",
                        ));
                    }
                }
            }
            _ => None,
        };
        let choices = check_n(self.n)?;
        let max_tokens = match self.max_completion_tokens {
            Some(_) => check_max_tokens("max_completion_tokens", self.max_completion_tokens)?,
            None => check_max_tokens("max_tokens", self.max_tokens)?,
        };
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid_param(
                    "top_logprobs",
                    "top_logprobs requires logprobs to be true",
                ));
            }
            (true, top) => {
                let top = top.unwrap_or(0);
                if !(0..=i64::from(MAX_TOP_LOGPROBS)).contains(&top) {
                    return Err(ApiError::invalid_param(
                        "top_logprobs",
                        format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
                    ));
                }
                Some(LogprobRequest { top: top as u8 })
            }
        };
        let stream = self.stream.unwrap_or(false);
        Ok(GenerateRequest {
            choices,
            model,
            input: Input::Chat {
                messages,
                continue_from,
            },
            sampling: sampling(SamplingFields {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                presence: self.presence_penalty,
                frequency: self.frequency_penalty,
                ignore_eos: self.ignore_eos,
            })?,
            max_tokens,
            stop: check_stop(self.stop)?,
            logprobs,
            stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            extra,
        })
    }
}

impl CompletionRequest {
    /// How many choices are asked for (`n`, 1 when absent), checked.
    pub fn choices(&self) -> Result<u32, ApiError> {
        check_n(self.n)
    }

    /// Checks every field and builds the internal request.
    pub fn into_generate(self) -> Result<GenerateRequest, ApiError> {
        let model = required_model(self.model)?;
        let prompt = match self.prompt {
            Some(PromptInput::One(p)) => p,
            Some(PromptInput::Many(mut v)) if v.len() == 1 => v.remove(0),
            Some(PromptInput::Many(_)) => {
                return Err(ApiError::invalid_param(
                    "prompt",
                    "exactly one prompt string is supported",
                ));
            }
            None => {
                return Err(ApiError::invalid_param("prompt", "prompt is required"));
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid_param(
                "prompt",
                "prompt must not be empty",
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::invalid_param("echo", "echo is not supported"));
        }
        let choices = check_n(self.n)?;
        let logprobs = match self.logprobs {
            None => None,
            Some(n) if (0..=5).contains(&n) => Some(LogprobRequest { top: n as u8 }),
            Some(n) => {
                return Err(ApiError::invalid_param(
                    "logprobs",
                    format!("logprobs must be between 0 and 5, got {n}"),
                ));
            }
        };
        Ok(GenerateRequest {
            choices,
            model,
            input: Input::text(prompt),
            sampling: sampling(SamplingFields {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                presence: self.presence_penalty,
                frequency: self.frequency_penalty,
                ignore_eos: self.ignore_eos,
            })?,
            // The legacy API defaults to 16 tokens.
            max_tokens: check_max_tokens("max_tokens", self.max_tokens)?.or(Some(16)),
            stop: check_stop(self.stop)?,
            logprobs,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            extra: self.extra,
        })
    }
}

impl GenerateRequest {
    /// The OpenAI chat request that asks an upstream for the same answer.
    /// Text prompts become a single user message only if the caller wants
    /// that; completions go through [`GenerateRequest::to_completion_request`].
    pub fn to_chat_request(&self, upstream_model: &str) -> ChatCompletionRequest {
        let messages = match &self.input {
            Input::Chat { messages, .. } => messages
                .iter()
                .map(|m| ChatMessage {
                    role: m.role.clone(),
                    content: Some(match &m.parts {
                        Some(parts) => MessageContent::Parts(parts.clone()),
                        None => MessageContent::Text(m.content.clone()),
                    }),
                    name: m.name.clone(),
                    extra: m.extra.clone(),
                })
                .collect(),
            Input::Text { .. } => vec![ChatMessage {
                role: "user".into(),
                content: Some(MessageContent::Text(
                    self.input.bare_text().unwrap_or_default(),
                )),
                name: None,
                extra: Map::new(),
            }],
        };
        ChatCompletionRequest {
            model: Some(upstream_model.to_owned()),
            messages: Some(messages),
            stream: Some(self.stream),
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
            }),
            max_tokens: self.max_tokens.map(i64::from),
            max_completion_tokens: None,
            temperature: self.sampling.temperature.map(f64::from),
            top_p: self.sampling.top_p.map(f64::from),
            top_k: self.sampling.top_k.map(i64::from),
            min_p: self.sampling.min_p.map(f64::from),
            repeat_penalty: self.sampling.repeat_penalty.map(f64::from),
            seed: self.sampling.seed.map(i64::from),
            stop: (!self.stop.is_empty()).then(|| Stop::Many(self.stop.clone())),
            presence_penalty: nonzero(self.sampling.presence_penalty),
            frequency_penalty: nonzero(self.sampling.frequency_penalty),
            logprobs: self.logprobs.map(|_| true),
            top_logprobs: self
                .logprobs
                .and_then(|l| (l.top > 0).then_some(i64::from(l.top))),
            n: (self.choices > 1).then_some(i64::from(self.choices)),
            ignore_eos: self.sampling.ignore_eos.then_some(true),
            extra: self.extra.clone(),
        }
    }

    /// The OpenAI completions request that asks an upstream for the same answer.
    pub fn to_completion_request(&self, upstream_model: &str, prompt: String) -> CompletionRequest {
        CompletionRequest {
            model: Some(upstream_model.to_owned()),
            prompt: Some(PromptInput::One(prompt)),
            stream: Some(self.stream),
            stream_options: self.stream.then_some(StreamOptions {
                include_usage: true,
            }),
            max_tokens: self.max_tokens.map(i64::from),
            temperature: self.sampling.temperature.map(f64::from),
            top_p: self.sampling.top_p.map(f64::from),
            top_k: self.sampling.top_k.map(i64::from),
            min_p: self.sampling.min_p.map(f64::from),
            repeat_penalty: self.sampling.repeat_penalty.map(f64::from),
            seed: self.sampling.seed.map(i64::from),
            stop: (!self.stop.is_empty()).then(|| Stop::Many(self.stop.clone())),
            presence_penalty: nonzero(self.sampling.presence_penalty),
            frequency_penalty: nonzero(self.sampling.frequency_penalty),
            logprobs: self.logprobs.map(|l| i64::from(l.top.min(5))),
            n: (self.choices > 1).then_some(i64::from(self.choices)),
            echo: None,
            ignore_eos: self.sampling.ignore_eos.then_some(true),
            extra: self.extra.clone(),
        }
    }
}

fn nonzero(x: f32) -> Option<f64> {
    (x != 0.0).then_some(f64::from(x))
}
