//! What Tandem answers (and what upstreams answer it): whole answers,
//! streamed chunks, model lists.
//!
//! Read leniently: OpenAI-compatible servers differ in what they leave out
//! (`id`, `created`, `object`, `usage`...), and a missing bookkeeping field
//! is no reason to lose an answer, so every field that is not the answer
//! itself has a default.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::generate::{FinishReason, TokenLogprob, ToolCall, ToolCallDelta, Usage};

/// A whole chat answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// A unique id.
    #[serde(default)]
    pub id: String,
    /// The object type (`chat.completion`, ...).
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model asked for (or that answered).
    #[serde(default)]
    pub model: String,
    /// The answers (one).
    #[serde(default)]
    pub choices: Vec<ChatChoice>,
    /// Tokens read and written.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Fields Tandem does not interpret (`system_fingerprint`,
    /// `service_tier`...), passed on from an upstream.
    #[serde(flatten, default)]
    pub extra: Map<String, Value>,
}

/// One choice of a chat answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    /// The choice's position.
    #[serde(default)]
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// Return per-token log-probabilities.
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    /// Why the answer ended.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The assistant's message in an answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[serde(default)]
    pub role: String,
    /// The text, or content parts.
    #[serde(default)]
    pub content: Option<String>,
    /// The tools the model called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Other fields (`refusal`, `reasoning_content`...), passed through.
    #[serde(flatten, default)]
    pub extra: Map<String, Value>,
}

/// Per-token log-probabilities of a choice.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChoiceLogprobs {
    /// The text, or content parts.
    #[serde(default)]
    pub content: Option<Vec<TokenLogprob>>,
}

/// One chunk of a streamed chat answer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// A unique id.
    #[serde(default)]
    pub id: String,
    /// The object type (`chat.completion`, ...).
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model asked for (or that answered).
    #[serde(default)]
    pub model: String,
    /// The answers (one).
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Tokens read and written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Fields Tandem does not interpret (`system_fingerprint`,
    /// `service_tier`...), passed on from an upstream.
    #[serde(flatten, default)]
    pub extra: Map<String, Value>,
}

/// One choice of a chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// The choice's position.
    #[serde(default)]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default)]
    pub delta: ChunkDelta,
    /// Return per-token log-probabilities.
    #[serde(default)]
    pub logprobs: Option<ChoiceLogprobs>,
    /// Why the answer ended.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to the message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkDelta {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The text, or content parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pieces of tool calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Other fields (`refusal`, `reasoning_content`...), passed through.
    #[serde(flatten, default)]
    pub extra: Map<String, Value>,
}

/// `/v1/completions` answer; streaming sends the same object per chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// A unique id.
    #[serde(default)]
    pub id: String,
    /// The object type (`chat.completion`, ...).
    #[serde(default)]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model asked for (or that answered).
    #[serde(default)]
    pub model: String,
    /// The answers (one).
    #[serde(default)]
    pub choices: Vec<CompletionChoice>,
    /// Tokens read and written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Fields Tandem does not interpret (`system_fingerprint`,
    /// `service_tier`...), passed on from an upstream.
    #[serde(flatten, default)]
    pub extra: Map<String, Value>,
}

/// One choice of a completion.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The choice's position.
    #[serde(default)]
    pub index: u32,
    /// The text of a text part.
    #[serde(default)]
    pub text: String,
    /// Return per-token log-probabilities.
    #[serde(default)]
    pub logprobs: Option<LegacyLogprobs>,
    /// Why the answer ended.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
}

/// The legacy completions API's column-wise logprobs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LegacyLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Each token's log-probability.
    pub token_logprobs: Vec<f32>,
    /// Alternatives per token, 0 to 20.
    pub top_logprobs: Vec<Map<String, Value>>,
    /// Where each token starts in the answer, in bytes.
    pub text_offset: Vec<usize>,
}

impl LegacyLogprobs {
    /// Appends `tokens`, whose text starts at byte `offset` of the answer.
    pub fn extend(&mut self, tokens: &[TokenLogprob], mut offset: usize) {
        for t in tokens {
            self.tokens.push(t.token.clone());
            self.token_logprobs.push(t.logprob);
            let mut top = Map::new();
            for alt in &t.top_logprobs {
                top.insert(alt.token.clone(), Value::from(alt.logprob));
            }
            self.top_logprobs.push(top);
            self.text_offset.push(offset);
            offset += t.token.len();
        }
    }
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    /// The object type (`chat.completion`, ...).
    pub object: String,
    /// The models.
    pub data: Vec<ModelCard>,
}

/// One model of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    /// A unique id.
    pub id: String,
    /// The object type (`chat.completion`, ...).
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Who serves it.
    pub owned_by: String,
}
