//! Tandem's internal request and the stream of events every backend returns.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One generation request, already validated, independent of the wire format.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub model: String,
    pub input: Input,
    pub sampling: Sampling,
    /// `None`: until the end of the context or an end-of-generation token.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub logprobs: Option<LogprobRequest>,
    pub stream: bool,
    pub include_usage: bool,
    /// Fields Tandem does not interpret, passed on to OpenAI-compatible upstreams.
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Chat {
        messages: Vec<Message>,
        /// Text the assistant has already said: generation continues it
        /// (used when an answer moves from one backend to another mid-stream).
        continue_from: Option<String>,
    },
    Text(String),
}

impl Input {
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
            Input::Text(t) => vec![t.as_str()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_owned(),
            content: content.into(),
            name: None,
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
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    /// Drops tokens less likely than `min_p` times the most likely one
    /// (llama.cpp and vLLM accept it; OpenAI does not have it).
    pub min_p: Option<f32>,
    /// Divides the logits of tokens already generated (1 = off; llama.cpp's
    /// `repeat_penalty`, vLLM's `repetition_penalty`).
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u32>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Keep generating past end-of-generation tokens (benchmarks; vLLM and
    /// llama.cpp accept the same field).
    pub ignore_eos: bool,
}

impl Sampling {
    pub fn greedy() -> Self {
        Self {
            temperature: Some(0.0),
            ..Self::default()
        }
    }

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogprobRequest {
    /// How many alternatives to report per token (0 = only the chosen one).
    pub top: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ContentFilter,
    ToolCalls,
    FunctionCall,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(default)]
    pub bytes: Option<Vec<u8>>,
}

/// A piece of the answer. `tokens` is filled only when logprobs were asked
/// for; their texts concatenate to `text`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Delta {
    pub text: String,
    pub tokens: Vec<TokenLogprob>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta(Delta),
    /// Always the last event of a successful stream.
    Finish(Finish),
}

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
}
