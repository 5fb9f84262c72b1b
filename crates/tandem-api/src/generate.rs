//! Tandem's internal request and the stream of events every backend returns.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::openai::ContentPart;

/// One generation request, already validated, independent of the wire format.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// The model asked for (a concrete name or the virtual model).
    pub model: String,
    /// The conversation or prompt.
    pub input: Input,
    /// Sampling, as the client gave it.
    pub sampling: Sampling,
    /// `None`: until the end of the context or an end-of-generation token.
    pub max_tokens: Option<u32>,
    /// Sequences that end the answer.
    pub stop: Vec<String>,
    /// Per-token log-probabilities, when asked for.
    pub logprobs: Option<LogprobRequest>,
    /// The client wants the answer streamed.
    pub stream: bool,
    /// A streamed answer ends with a usage chunk.
    pub include_usage: bool,
    /// Choices asked for (`n`, at least 1). A backend that answers them all
    /// from one request (an upstream that takes `n`) does so; otherwise the
    /// first is answered and the others are asked for one by one.
    pub choices: u32,
    /// Fields Tandem does not interpret, passed on to OpenAI-compatible upstreams.
    pub extra: Map<String, Value>,
}

/// What the model reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// A conversation, rendered with the model's chat template.
    Chat {
        /// The messages, in order.
        messages: Vec<Message>,
        /// Text the assistant has already said: generation continues it
        /// (used when an answer moves from one backend to another mid-stream).
        continue_from: Option<String>,
    },
    /// A bare prompt (`/v1/completions`).
    Text {
        /// The prompt as the client sent it.
        prompt: String,
        /// Text already written after the prompt: generation continues it
        /// (a mid-stream handoff). Kept apart from the prompt because a
        /// grammar must read it as answer, not as prompt.
        continue_from: Option<String>,
    },
}

impl Input {
    /// A bare prompt, nothing written yet.
    pub fn text(prompt: impl Into<String>) -> Self {
        Input::Text {
            prompt: prompt.into(),
            continue_from: None,
        }
    }

    /// All user-visible text of the input, for detectors and length estimates.
    pub fn text_parts(&self) -> Vec<&str> {
        match self {
            Input::Chat {
                messages,
                continue_from,
            } => messages
                .iter()
                .map(|m| m.content.as_str())
                .chain(continue_from.as_deref())
                .collect(),
            Input::Text {
                prompt,
                continue_from,
            } => std::iter::once(prompt.as_str())
                .chain(continue_from.as_deref())
                .collect(),
        }
    }

    /// For a bare prompt, the text a model reads: the prompt, then the
    /// answer already written after it. `None` for a conversation, whose
    /// text comes from a chat template.
    pub fn bare_text(&self) -> Option<String> {
        match self {
            Input::Text {
                prompt,
                continue_from,
            } => Some(format!(
                "{prompt}{}",
                continue_from.as_deref().unwrap_or_default()
            )),
            Input::Chat { .. } => None,
        }
    }

    /// The answer already written, which generation continues.
    pub fn written(&self) -> Option<&str> {
        match self {
            Input::Chat { continue_from, .. } | Input::Text { continue_from, .. } => {
                continue_from.as_deref()
            }
        }
    }

    /// Makes `more` part of the answer already written, so that another
    /// backend continues after it.
    pub fn continue_with(&mut self, more: &str) {
        let (Input::Chat { continue_from, .. } | Input::Text { continue_from, .. }) = self;
        let mut written = continue_from.take().unwrap_or_default();
        written.push_str(more);
        *continue_from = (!written.is_empty()).then_some(written);
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its text.
    pub content: String,
    /// An optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The content parts as sent, when they are more than text (images,
    /// audio, files): an upstream gets them as they were, in their order.
    /// `content` then holds the text parts joined, which is what a local
    /// model reads; detectors and redaction work on the parts, which are
    /// what leaves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<Vec<ContentPart>>,
    /// Other fields (`tool_calls`, `tool_call_id`...), kept as sent.
    #[serde(default, flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message with only a role and text.
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
            name: None,
            parts: None,
            extra: Map::new(),
        }
    }
}

/// Sampling parameters as the client gave them. `None` means "not given":
/// a local model then uses its own recommended value (see
/// [`SamplingPreset`]), a cloud upstream its own default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Most candidates kept per token (0 = all).
    pub top_k: Option<u32>,
    /// Drops tokens less likely than `min_p` times the most likely one
    /// (llama.cpp and vLLM accept it; OpenAI does not have it).
    pub min_p: Option<f32>,
    /// Divides the logits of tokens already generated (1 = off; llama.cpp's
    /// `repeat_penalty`, vLLM's `repetition_penalty`).
    pub repeat_penalty: Option<f32>,
    /// Seed for a repeatable draw.
    pub seed: Option<u32>,
    /// OpenAI's presence penalty, -2 to 2.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, -2 to 2.
    pub frequency_penalty: f32,
    /// Keep generating past end-of-generation tokens (benchmarks; vLLM and
    /// llama.cpp accept the same field).
    pub ignore_eos: bool,
}

impl Sampling {
    /// Temperature 0: always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: Some(0.0),
            ..Self::default()
        }
    }

    /// Whether sampling always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.temperature == Some(0.0) || self.top_k == Some(1)
    }

    /// The parameters the client left out, taken from `preset`.
    pub fn with_defaults(mut self, preset: &SamplingPreset) -> Sampling {
        self.temperature = self.temperature.or(preset.temperature);
        self.top_p = self.top_p.or(preset.top_p);
        self.top_k = self.top_k.or(preset.top_k);
        self.min_p = self.min_p.or(preset.min_p);
        self.repeat_penalty = self.repeat_penalty.or(preset.repeat_penalty);
        self
    }
}

/// A model's recommended sampling parameters: what a request that leaves
/// them out gets on the local engine. Written by a model's authors into its
/// GGUF (`general.sampling.*`), pinned in a catalog entry, or llama.cpp's
/// server defaults ([`SamplingPreset::LLAMA_SERVER`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingPreset {
    /// Temperature (0 is greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Most candidates kept (0 = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Candidates less likely than this share of the best are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Penalty on repeated tokens (1 = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repeat_penalty: Option<f32>,
}

impl SamplingPreset {
    /// llama.cpp's server defaults: enough truncation of the tail that small
    /// models stay coherent while answers still vary.
    pub const LLAMA_SERVER: SamplingPreset = SamplingPreset {
        temperature: Some(0.8),
        top_p: Some(0.95),
        top_k: Some(40),
        min_p: Some(0.05),
        repeat_penalty: Some(1.0),
    };

    /// `self`, with what it leaves out taken from `fallback`.
    pub fn or(self, fallback: SamplingPreset) -> SamplingPreset {
        SamplingPreset {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
            min_p: self.min_p.or(fallback.min_p),
            repeat_penalty: self.repeat_penalty.or(fallback.repeat_penalty),
        }
    }
}

/// Per-token log-probabilities asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobRequest {
    /// How many alternatives to report per token (0 = only the chosen one).
    pub top: u8,
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended it, or a stop sequence did.
    Stop,
    /// `max_tokens` or the context was reached.
    Length,
    /// A content filter cut it.
    ContentFilter,
    /// The model called tools.
    ToolCalls,
    /// The model called a function (the older API).
    FunctionCall,
}

/// Tokens read and written by one answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens of the prompt.
    pub prompt_tokens: u32,
    /// Tokens of the answer.
    pub completion_tokens: u32,
    /// Both together.
    pub total_tokens: u32,
    /// Of the prompt, the tokens served from a cache (OpenAI's
    /// `usage.prompt_tokens_details.cached_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// What of the prompt came from a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose computation was reused, not redone.
    #[serde(default)]
    pub cached_tokens: u32,
}

impl Usage {
    /// Usage with the total filled in.
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: None,
        }
    }

    /// The same usage, saying that `cached` of its prompt tokens were reused.
    pub fn with_cached(mut self, cached: u32) -> Self {
        self.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: cached,
        });
        self
    }

    /// Prompt tokens served from a cache.
    pub fn cached_tokens(&self) -> u32 {
        self.prompt_tokens_details.map_or(0, |d| d.cached_tokens)
    }
}

/// One generated token with its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// Its text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its bytes (a token may hold part of a character).
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    /// The most likely alternatives at this position.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    /// Its text.
    pub token: String,
    /// Natural log of its probability.
    pub logprob: f32,
    /// Its bytes.
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

/// A piece of the answer. `tokens` is filled only when logprobs were asked
/// for; their texts concatenate to `text`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    /// Text to append to the answer.
    pub text: String,
    /// Its tokens, when log-probabilities were asked for.
    pub tokens: Vec<TokenLogprob>,
    /// Pieces of tool calls, as OpenAI streams them.
    pub tool_calls: Vec<ToolCallDelta>,
    /// Fields of the upstream's message Tandem does not interpret
    /// (`refusal`, `reasoning_content`, `annotations`...), passed on to the
    /// client as they came.
    pub extra: Map<String, Value>,
    /// Fields of the upstream's answer itself, beside its choices
    /// (`system_fingerprint`, `service_tier`...), passed on to the client.
    /// Not content: a delta with only these is empty.
    pub response: Map<String, Value>,
}

impl Delta {
    /// A piece of text alone.
    pub fn text(text: impl Into<String>) -> Delta {
        Delta {
            text: text.into(),
            ..Delta::default()
        }
    }

    /// Whether it carries nothing.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
            && self.tokens.is_empty()
            && self.tool_calls.is_empty()
            && self.extra.is_empty()
    }
}

/// More tool calls than any answer makes: pieces beyond are dropped.
pub const MAX_TOOL_CALLS: usize = 256;

/// A piece of a tool call: the first piece of a call carries its `id`,
/// `type` and function name; later pieces append to its arguments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which call of the answer this piece belongs to.
    #[serde(default)]
    pub index: u32,
    /// The call's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The function's name and a piece of its arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDelta>,
}

/// A piece of a function call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionDelta {
    /// The function's name (first piece).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A piece of the JSON arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// A whole tool call, as a non-streamed answer carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id.
    #[serde(default)]
    pub id: String,
    /// `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// The function and its arguments.
    #[serde(default)]
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

/// A function's name and its JSON arguments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    #[serde(default)]
    pub name: String,
    /// Its arguments, a JSON object as text.
    #[serde(default)]
    pub arguments: String,
}

impl ToolCall {
    /// The call as one streamed piece.
    pub fn as_delta(&self, index: u32) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: Some(self.id.clone()),
            kind: Some(self.kind.clone()),
            function: Some(FunctionDelta {
                name: Some(self.function.name.clone()),
                arguments: Some(self.function.arguments.clone()),
            }),
        }
    }

    /// Streamed pieces put together, by index.
    pub fn assemble(calls: &mut Vec<ToolCall>, piece: &ToolCallDelta) {
        let i = piece.index as usize;
        // Indexes come from the upstream: gaps are filled, and an index no
        // answer has is dropped rather than allocated for.
        if i >= MAX_TOOL_CALLS {
            return;
        }
        if calls.len() <= i {
            calls.resize_with(i + 1, || ToolCall {
                kind: function_kind(),
                ..ToolCall::default()
            });
        }
        let Some(call) = calls.get_mut(i) else {
            return;
        };
        if let Some(id) = &piece.id {
            call.id.clone_from(id);
        }
        if let Some(kind) = &piece.kind {
            call.kind.clone_from(kind);
        }
        if let Some(f) = &piece.function {
            if let Some(name) = &f.name {
                call.function.name.push_str(name);
            }
            if let Some(args) = &f.arguments {
                call.function.arguments.push_str(args);
            }
        }
    }
}

/// How an answer ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    /// Why.
    pub reason: FinishReason,
    /// Tokens read and written.
    pub usage: Usage,
}

/// What a backend's answer stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A piece of the answer.
    Delta(Delta),
    /// Always the last event of a successful stream.
    Finish(Finish),
}

/// Request fields that constrain an answer beside `response_format`, as
/// vLLM's server (`guided_*`, `structured_outputs`) and llama.cpp's
/// (`json_schema`, `grammar`) take them. Any backend that answers such a
/// request must apply them or refuse it: ignored, they would be silently
/// different answers.
pub const GUIDED_FIELDS: &[&str] = &[
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "structured_outputs",
    "json_schema",
    "grammar",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_wins_then_the_preset_in_order() {
        let pin = SamplingPreset {
            temperature: Some(0.2),
            ..SamplingPreset::default()
        };
        let preset = pin.or(SamplingPreset::LLAMA_SERVER);
        assert_eq!(preset.temperature, Some(0.2));
        assert_eq!(preset.top_k, Some(40));
        let asked = Sampling {
            top_k: Some(3),
            ..Sampling::default()
        };
        let s = asked.with_defaults(&preset);
        assert_eq!(
            (s.top_k, s.temperature, s.min_p),
            (Some(3), Some(0.2), Some(0.05))
        );
        assert!(!s.is_greedy());
    }

    #[test]
    fn a_bare_prompt_is_read_with_the_answer_written_after_it() {
        let mut input = Input::text("Q: 2+2? A:");
        assert_eq!(input.bare_text().as_deref(), Some("Q: 2+2? A:"));
        input.continue_with(" 4");
        input.continue_with(", since");
        assert_eq!(input.written(), Some(" 4, since"));
        assert_eq!(input.bare_text().as_deref(), Some("Q: 2+2? A: 4, since"));
        let chat = Input::Chat {
            messages: vec![Message::new("user", "hi")],
            continue_from: Some("Hel".into()),
        };
        assert_eq!(chat.bare_text(), None);
    }
}
