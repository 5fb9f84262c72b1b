//! Edge–cloud speculative decoding. On the device (`draft`), the local
//! model drafts a few tokens, a cloud-role Tandem's bigger model checks them
//! all in one forward pass ([`Verifier`] on the other side), and the device
//! keeps the accepted prefix plus the target's own next token, streaming
//! them as they are settled. The answer is the target model's: token for
//! token under greedy decoding, in distribution under sampling
//! (`arithmetic`). If the cloud stops answering, the device finishes the
//! answer alone from the same state.

mod arithmetic;
mod draft;
mod verifier;

use serde::{Deserialize, Serialize};
use tandem_api::GenerateRequest;

pub(crate) use draft::{SpecJob, start};
pub use verifier::{MAX_DRAFT, Verifier};

fn d_max_draft() -> usize {
    12
}
fn d_min_draft() -> usize {
    4
}
fn d_verify_timeout() -> u64 {
    10_000
}

/// `[speculative]` in the configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeConfig {
    /// Requests placed in the cloud run speculatively unless they ask
    /// otherwise (`x-tandem-mode`); default: only when asked.
    #[serde(default)]
    pub default: bool,
    /// Longest draft the adaptive length may choose.
    #[serde(default = "d_max_draft")]
    pub max_draft: usize,
    /// Shortest draft it may choose: above 1 trades the device's speed for
    /// fewer cloud passes where a cloud pass costs more per token read.
    #[serde(default = "d_min_draft")]
    pub min_draft: usize,
    /// A round with no answer in this time ends the cloud's part; the
    /// device finishes alone.
    #[serde(default = "d_verify_timeout")]
    pub verify_timeout_ms: u64,
    /// Seconds an idle verification session is kept (cloud role).
    #[serde(default = "d_idle")]
    pub session_idle_s: u64,
}

fn d_idle() -> u64 {
    60
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self {
            default: false,
            max_draft: d_max_draft(),
            min_draft: d_min_draft(),
            verify_timeout_ms: d_verify_timeout(),
            session_idle_s: d_idle(),
        }
    }
}

/// Why a request cannot run speculatively (it then runs as routed).
pub fn ineligible(req: &GenerateRequest) -> Option<&'static str> {
    if req.sampling.presence_penalty != 0.0
        || req.sampling.frequency_penalty != 0.0
        || req.sampling.repeat_penalty.is_some_and(|r| r != 1.0)
    {
        return Some("presence, frequency and repeat penalties");
    }
    if req.logprobs.is_some() {
        return Some("logprobs");
    }
    // The verifier samples without the request's grammar or biases, so a
    // draft it accepts could break them.
    let present = |k: &str| req.extra.get(k).is_some_and(|v| !v.is_null());
    if present("tools") || present("functions") {
        return Some("tools");
    }
    if req
        .extra
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(serde_json::Value::as_str)
        .is_some_and(|t| t != "text")
        || tandem_api::GUIDED_FIELDS.iter().any(|k| present(k))
    {
        return Some("structured outputs");
    }
    if present("logit_bias") {
        return Some("logit biases");
    }
    // The draft model reads only the text.
    if let tandem_api::Input::Chat { messages, .. } = &req.input
        && messages.iter().any(|m| m.parts.is_some())
    {
        return Some("content parts other than text");
    }
    None
}
