//! The wire protocol of edge–cloud speculative decoding, spoken between a
//! device Tandem (drafting) and a cloud-role Tandem (verifying):
//!
//! - `POST /v1/tandem/spec/sessions` ([`SpecOpen`] → [`SpecOpened`]) opens
//!   a session on the target model after checking that both sides mean the
//!   same thing by every token id (a vocabulary hash);
//! - `POST /v1/tandem/spec/sessions/{id}/verify` ([`VerifyRequest`] →
//!   [`VerifyResponse`]) sends only what the target has not read yet — the
//!   tokens committed since the last round and this round's draft — and gets
//!   back how many drafted tokens the target accepts and its next token;
//! - `DELETE /v1/tandem/spec/sessions/{id}` ends it (idle sessions expire).

use serde::{Deserialize, Serialize};

/// Sampling parameters the target applies; penalties are not part of it
/// (speculative mode refuses them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct SpecSampling {
    /// Sampling temperature (0: greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Most candidates kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Candidates below this share of the best are dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f32>,
    /// Seed for the target's draws.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u32>,
}

impl SpecSampling {
    /// The parameters of a request's sampling.
    pub fn from_sampling(s: &crate::Sampling) -> Self {
        Self {
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            min_p: s.min_p,
            seed: s.seed,
        }
    }

    /// As the engine's sampling type.
    pub fn to_sampling(self) -> crate::Sampling {
        crate::Sampling {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            seed: self.seed,
            ..crate::Sampling::default()
        }
    }
}

/// `POST /v1/tandem/spec/sessions`: opens a verification session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecOpen {
    /// The target model.
    pub model: String,
    /// The draft model's vocabulary hash; a different one is refused (409).
    pub vocab_hash: String,
    /// The request's sampling.
    #[serde(default)]
    pub sampling: SpecSampling,
}

/// The session the target opened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecOpened {
    /// Its id, for the verify calls.
    pub session: String,
    /// The target model.
    pub model: String,
    /// The target's vocabulary hash.
    pub vocab_hash: String,
    /// Tokens the session may hold.
    pub context_length: u32,
    /// Seconds of idleness after which the session is dropped.
    pub idle_timeout_s: u64,
    /// The sampling the target applies: the request's, with what it left
    /// out taken from the target model's recommended settings. The device
    /// drafts with the same parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SpecSampling>,
}

/// One round (`POST .../{id}/verify`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Tokens the target already holds for this session (from earlier
    /// rounds' responses); a mismatch is refused (409).
    pub pos: u32,
    /// Committed tokens the target has not read: the prompt in the first
    /// round, then the previous round's `next` (and any tail the device
    /// generated alone). At least one.
    pub tokens: Vec<i32>,
    /// Drafted continuation, possibly empty.
    #[serde(default)]
    pub draft: Vec<i32>,
    /// For sampling: per drafted token, the sparse distribution it was drawn
    /// from, as `[token, probability]` pairs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub draft_probs: Vec<Vec<(i32, f32)>>,
}

/// The target's verdict on a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyResponse {
    /// Drafted tokens accepted, a prefix of `draft`.
    pub accepted: u32,
    /// The target's token after the accepted prefix.
    pub next: i32,
    /// Tokens the target now holds (`pos` for the next round).
    pub pos: u32,
    /// The target's forward passes for this session so far.
    pub forward_passes: u64,
    /// Milliseconds the target spent on this round's pass (the rest of the
    /// round trip is network and queueing).
    #[serde(default)]
    pub compute_ms: f64,
}
