//! What a request brings beyond its body ([`RequestContext`]) and what the
//! dispatcher says back about where it went and why ([`RouteInfo`],
//! [`Explanation`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tandem_api::EventStream;
use tandem_policy::{Decision, Features, PrivacyMode, View};

use crate::access::Caller;

/// How an answer is produced (`x-tandem-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Placed by the policy on one side.
    Route,
    /// The device answers first; unsure answers go to the cloud.
    Cascade,
    /// The device drafts, the cloud verifies.
    Speculative,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "route" => Ok(Mode::Route),
            "cascade" => Ok(Mode::Cascade),
            "speculative" => Ok(Mode::Speculative),
            other => Err(format!(
                "`{other}` is not `route`, `cascade` or `speculative`"
            )),
        }
    }
}

/// Who is asking and what they asked for beyond the body (headers).
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    /// `x-request-id`, or a fresh one.
    pub request_id: String,
    /// The gateway key's holder, when keys are configured.
    pub caller: Option<Arc<Caller>>,
    /// `x-tandem-privacy`.
    pub privacy: Option<PrivacyMode>,
    /// `x-tandem-latency-goal-ms`: time-to-first-token goal.
    pub latency_goal_ms: Option<u32>,
    /// `x-tandem-quality`: 0..1.
    pub quality: Option<f32>,
    /// `x-tandem-cache: skip`: neither read nor write the semantic cache.
    pub cache_skip: bool,
    /// `x-tandem-mode`; default: the configuration's (`[router] cascade`,
    /// `[speculative] default`).
    pub mode: Option<Mode>,
    /// What the dispatcher notes on the request's way, for its
    /// [`RequestEvent`](crate::activity::RequestEvent); each dispatch starts
    /// a fresh one.
    pub trace: crate::activity::Trace,
}

/// What the semantic cache did for a request.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum CacheOutcome {
    /// Answered from the cache; the stored prompt was this similar.
    Hit {
        /// Cosine similarity of the two prompts.
        similarity: f32,
    },
    /// Looked up, not found.
    Miss,
    /// Not looked up (asked not to, or the prompt holds personal data).
    Skip,
}

impl std::fmt::Display for CacheOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheOutcome::Hit { similarity } => write!(f, "hit {similarity:.3}"),
            CacheOutcome::Miss => f.write_str("miss"),
            CacheOutcome::Skip => f.write_str("skip"),
        }
    }
}

/// Whether an answer is decoded speculatively.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Speculation {
    /// Drafted on the device, verified in the cloud.
    On,
    /// Asked for, but not possible; why.
    Off(String),
}

impl std::fmt::Display for Speculation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Speculation::On => f.write_str("on"),
            Speculation::Off(why) => write!(f, "off: {why}"),
        }
    }
}

/// Where a request went and why; the server turns it into headers.
#[derive(Debug, Clone, Serialize)]
pub struct RouteInfo {
    /// `local`, `cloud:<upstream>` or `cache`.
    pub backend: String,
    /// The model that produced the answer.
    pub model: String,
    /// The policy's decision.
    pub decision: Decision,
    /// PII classes replaced by placeholders, with counts.
    pub redacted: BTreeMap<String, u32>,
    /// Set when the first side failed before its first token.
    pub failover: Option<String>,
    /// Which of several upstreams serving the model was chosen, and why.
    pub replica: Option<String>,
    /// Microseconds spent deciding.
    pub decision_us: u64,
    /// The learned router's difficulty score and the threshold it was held to.
    pub difficulty: Option<(f32, f32)>,
    /// The model that read the prompt for the router's probe, and how long
    /// the reading took (ms).
    pub reading: Option<(String, f64)>,
    /// What the semantic cache did, when it is on.
    pub cache: Option<CacheOutcome>,
    /// What the cascade's remembered outcomes for similar prompts said.
    pub memory: Option<String>,
    /// What the cascade did: kept the local answer or escalated it.
    pub cascade: Option<String>,
    /// Whether the answer is decoded speculatively, when that was asked.
    pub speculative: Option<Speculation>,
}

/// The outcome of a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// Where it would go (`local` or `cloud:<upstream>`).
    pub backend: Option<String>,
    /// The model that would answer.
    pub model: Option<String>,
    /// The decision, unless refused.
    pub decision: Option<Decision>,
    /// Why it would be refused.
    pub refusal: Option<String>,
    /// Which of several upstreams serving the model would be tried first,
    /// and why.
    pub replica: Option<String>,
    /// What the request needs, as the policy saw it.
    pub features: Features,
    /// The state of the world, as the policy saw it.
    pub view: View,
    /// Microseconds spent deciding.
    pub decision_us: u64,
    /// The cloud share held, if `[router] cloud_share` is set.
    pub cloud_share: Option<ShareState>,
    /// With a router that reads prompts (a probe): whether the request
    /// would be read before deciding, and why. The dry run runs no model,
    /// so its difficulty is always the one without a reading.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reading: Option<String>,
}

/// The cloud share as it stands (`[router] cloud_share`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ShareState {
    /// The share held.
    pub share: f64,
    /// The share of the window's requests that went out, once any is in.
    pub actual: Option<f64>,
    /// The cut applied now; none while it warms up.
    pub cut: Option<f32>,
    /// Requests in the window.
    pub requests: usize,
}

/// An answer under way and where it goes.
pub struct Dispatched {
    /// The answer's events.
    pub stream: EventStream,
    /// The other choices' events (choice 1, 2...), when the backend that
    /// took the first answered [`choices`](tandem_api::GenerateRequest::choices)
    /// from the same request (an upstream that takes `n`); empty when only
    /// the first was answered.
    pub more: Vec<EventStream>,
    /// Where it went and why.
    pub route: RouteInfo,
}
