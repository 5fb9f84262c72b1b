//! `[[upstreams]]` in the configuration file.

use serde::{Deserialize, Serialize};
use tandem_api::Price;

/// How an upstream can continue an assistant message it did not start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Continuation {
    /// It cannot: an answer broken off elsewhere is not handed to it.
    #[default]
    None,
    /// A final assistant message with `continue_final_message: true`
    /// (vLLM, a llama.cpp server, Tandem). Asked for streamed, always.
    Prefill,
}

/// How an upstream answers a request for several choices (`n`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Choices {
    /// All from one request carrying `n` (OpenAI, vLLM, Tandem): the
    /// prompt is sent, and billed, once.
    #[default]
    OneRequest,
    /// One request per choice, for an upstream that refuses `n` or answers
    /// only the first (a llama.cpp server, Ollama).
    Separate,
}

fn d_connect() -> u64 {
    3_000
}
fn d_ttft() -> u64 {
    15_000
}
fn d_idle() -> u64 {
    30_000
}
fn d_request() -> u64 {
    300_000
}
fn d_response_bytes() -> u64 {
    32 * 1024 * 1024
}
fn d_retries() -> u32 {
    2
}
fn d_breaker_failures() -> u32 {
    5
}
fn d_breaker_cooldown() -> u64 {
    10_000
}

/// One upstream, as written in Tandem's configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The name used in headers, metrics and the ledger.
    pub name: String,
    /// The API root, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Environment variable holding the API key (the key itself never
    /// appears in configuration, logs, metrics or errors).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Model names served by this upstream; clients may name them directly.
    pub models: Vec<String>,
    /// The model used when the router sends a virtual-model request here;
    /// default: the first of `models`.
    #[serde(default)]
    pub default_model: Option<String>,
    /// USD per million prompt tokens.
    #[serde(default)]
    pub price_input_per_mtok: f64,
    /// USD per million completion tokens.
    #[serde(default)]
    pub price_output_per_mtok: f64,
    /// Tokens one request may hold, if known (used for capability routing).
    #[serde(default)]
    pub context_length: Option<u32>,
    /// Connecting may take this long.
    #[serde(default = "d_connect")]
    pub connect_timeout_ms: u64,
    /// A streamed answer must start within this time.
    #[serde(default = "d_ttft")]
    pub ttft_timeout_ms: u64,
    /// A stream silent for this long is broken.
    #[serde(default = "d_idle")]
    pub idle_timeout_ms: u64,
    /// A whole (non-streamed) answer must arrive within this time.
    #[serde(default = "d_request")]
    pub request_timeout_ms: u64,
    /// Retries before the first token (connect errors, 429, 5xx).
    #[serde(default = "d_retries")]
    pub max_retries: u32,
    /// Bytes one answer may bring back (a whole body, or all of a stream);
    /// past it the answer is cut off as broken.
    #[serde(default = "d_response_bytes")]
    pub max_response_bytes: u64,
    /// Failures in a row that open the circuit breaker.
    #[serde(default = "d_breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open breaker skips the upstream.
    #[serde(default = "d_breaker_cooldown")]
    pub breaker_cooldown_ms: u64,
    /// Whether it can continue a partial answer.
    #[serde(default)]
    pub continuation: Continuation,
    /// How it answers several choices.
    #[serde(default)]
    pub choices: Choices,
    /// The constraint fields beside `response_format` that it applies
    /// (names from [`tandem_api::GUIDED_FIELDS`]: vLLM's `guided_json`,
    /// `guided_regex`, `guided_choice`, `guided_grammar`,
    /// `structured_outputs`; llama.cpp's `json_schema`, `grammar`). They are
    /// not OpenAI's API and some servers ignore them (Ollama), so a request
    /// carrying one goes only where it is declared.
    #[serde(default)]
    pub constraint_fields: Vec<String>,
    /// Parts of OpenAI's API that it accepts but does not apply (Ollama:
    /// `logit_bias`, `best_of`), by [`tandem_api::Feature`] name: a request
    /// asking for one is not sent to it, rather than answered as if it had
    /// not asked.
    #[serde(default)]
    pub lacks: Vec<tandem_api::Feature>,
}

impl UpstreamConfig {
    /// An upstream with default timeouts, free, serving `models`.
    pub fn new(name: &str, base_url: &str, models: &[&str]) -> Self {
        Self {
            name: name.into(),
            base_url: base_url.into(),
            api_key_env: None,
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            default_model: None,
            price_input_per_mtok: 0.0,
            price_output_per_mtok: 0.0,
            context_length: None,
            connect_timeout_ms: d_connect(),
            ttft_timeout_ms: d_ttft(),
            idle_timeout_ms: d_idle(),
            request_timeout_ms: d_request(),
            max_retries: d_retries(),
            max_response_bytes: d_response_bytes(),
            breaker_failures: d_breaker_failures(),
            breaker_cooldown_ms: d_breaker_cooldown(),
            continuation: Continuation::None,
            choices: Choices::OneRequest,
            constraint_fields: Vec::new(),
            lacks: Vec::new(),
        }
    }

    /// What its tokens cost.
    pub fn price(&self) -> Price {
        Price {
            input_per_mtok: self.price_input_per_mtok,
            output_per_mtok: self.price_output_per_mtok,
        }
    }

    /// USD for a request of this size.
    pub fn cost(&self, prompt_tokens: u32, completion_tokens: u32) -> f64 {
        self.price().cost(prompt_tokens, completion_tokens)
    }
}
