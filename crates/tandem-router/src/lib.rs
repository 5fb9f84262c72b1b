//! Tandem's router: decides, per request and in microseconds, whether the
//! work runs on the device or in the cloud, explains the decision, and
//! carries it out — with failover before the first token and hand-over of a
//! half-streamed answer after it.
//!
//! - [`pii`]: finding personal data and secrets; reversible placeholders.
//! - [`signals`]: device, network and spending state, overridable.
//! - [`policy`]: the decision itself, a pure function.
//! - [`learned`]: the learned difficulty router (training and evaluation).
//! - [`cache`]: the semantic answer cache.
//! - [`access`]: gateway keys, rate limits, daily spending.
//! - [`dispatch`]: executing decisions across backends; ledger and metrics.
//! - [`speculative`]: drafting on the device for a cloud model to verify.
//! - [`verifier`]: the cloud side of it, sessions on a local target model.
//! - [`metrics`]: the Prometheus registry of one gateway.
//!
//! Not here: HTTP (the server) or how tokens are produced (the backends).

pub mod access;
pub mod cache;
pub mod dispatch;
pub mod learned;
pub mod metrics;
pub mod pii;
pub mod policy;
pub mod signals;
pub mod speculative;
pub mod verifier;

pub use dispatch::{
    Dispatched, Dispatcher, DispatcherBuilder, Explanation, PrivacyConfig, RequestContext,
    RouteInfo, Scorer,
};
pub use policy::{Decision, PolicyConfig, PrivacyMode, Rule, Side};
pub use speculative::SpeculativeConfig;
