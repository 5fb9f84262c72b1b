//! Tandem's router: carries out, per request, where the work runs — on the
//! device or in the cloud — and keeps the answer whole when a side fails.
//!
//! It gathers the inputs the policy reads (the request's features, the
//! signals of the device and network, spending), asks the policy
//! (`tandem-policy`, pure functions), and carries the decision out on
//! backends held through [`tandem_api::Backend`]: with failover before the
//! first token, handoff of a half-streamed answer after it, redaction of
//! what leaves and restoration of what comes back, the cascade, speculative
//! decoding, the semantic cache, and the egress ledger.
//!
//! - [`Dispatcher`]: placing requests and supervising their answers.
//! - [`signals`]: reading the device and probing upstreams, with overrides.
//! - [`cache`]: the semantic answer cache.
//! - [`learned`]: the learned router's file and the vectors it reads.
//! - [`label`]: labels for the router from the device and cloud models.
//! - [`memory`]: the cascade's outcomes, remembered for the router.
//! - [`sample`]: routed prompts kept for labelling.
//! - [`activity`]: each request's event for the operator's live view.
//! - [`access`]: gateway keys, rate limits, daily spending.
//! - [`shared`]: what gateway replicas share (keys, limits, spending, cache) in a store such as Redis.
//! - [`speculative`]: drafting on the device; verification sessions (cloud role).
//! - [`metrics`]: the Prometheus registry of one gateway.
//!
//! Not here: HTTP (the server), how tokens are produced (the backends),
//! and what the decision is (the policy).

#![warn(missing_docs)]

pub mod access;
pub mod activity;
pub mod cache;
mod dispatcher;
mod egress;
mod jsonl;
pub mod label;
pub mod learned;
pub mod memory;
pub mod metrics;
mod recognizer;
pub mod sample;
pub mod shared;
pub mod signals;
pub mod speculative;

pub use dispatcher::{
    CacheOutcome, Dispatched, Dispatcher, DispatcherBuilder, Explanation, Mode, RequestContext,
    RouteInfo, ShareState, Speculation, confidence,
};
pub use recognizer::ModelRecognizer;
pub use speculative::SpeculativeConfig;
