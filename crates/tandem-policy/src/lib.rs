//! Tandem's decisions, as pure functions of a request and a snapshot of the
//! world: where a request runs and why ([`decide`]), what personal data it
//! carries and how it is replaced and restored ([`privacy`]), the state the
//! decision reads ([`signals`]), and the learned router's model that scores
//! how hard a prompt is ([`learned`], [`scoring`]), and what the cascade's
//! outcomes add to it ([`memory`]), which routed prompts are kept for
//! labelling ([`sample`]), how many requests may go out under a
//! cloud share ([`share`]), and the order in which upstreams that
//! serve the same model are tried ([`balance`]).
//!
//! Not here, on purpose: anything that does I/O or waits — reading the
//! device, probing upstreams, running models, writing the ledger. That is
//! the router's job (`tandem-router`), which gathers the inputs, asks
//! these functions, and carries the answer out. Everything here is tested
//! without a model, a network or a runtime.

#![warn(missing_docs)]

pub mod balance;
mod decision;
pub mod learned;
pub mod memory;
pub mod privacy;
pub mod sample;
pub mod scoring;
pub mod share;
pub mod signals;

pub use decision::{
    CloudView, Decision, Effect, Features, LocalView, PolicyConfig, Reason, Refusal, RefusalKind,
    Rule, Spend, View, decide, difficulty_can_change, threshold_for_quality,
};
pub use privacy::{PrivacyConfig, PrivacyMode};
pub use scoring::Scorer;
