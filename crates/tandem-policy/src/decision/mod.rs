//! The routing policy: a pure function from what a request needs and what
//! the device, network and budget look like now, to where the request runs
//! and why.
//!
//! Rules run in the configured order. A rule may *forbid* a side (privacy,
//! capability, an unreachable cloud, a spent budget): forbids always hold.
//! A rule may *prefer* a side: the first preference, in rule order, for a
//! side that is still allowed decides. Every effect is kept as a reason, so
//! the decision explains itself.

use serde::{Deserialize, Serialize};
use tandem_api::{Capabilities, Feature, Locality};

use crate::privacy::PrivacyMode;
use crate::signals::{DeviceState, NetworkState};

mod rules;
use rules::{Apply, apply};

/// The policy's rules, in the order they are listed in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// A request naming a concrete model goes where that model is.
    NamedModel,
    /// Personal data: `strict` keeps it on the device.
    Privacy,
    /// What each side can serve: context, features.
    Capability,
    /// Upstream reachability and the circuit breaker; metered links.
    Network,
    /// Daily budgets, overall and per key.
    Budget,
    /// Battery, temperature, memory, CPU.
    Device,
    /// The local engine's queue.
    Load,
    /// A time-to-first-token goal.
    Latency,
    /// The learned difficulty score (see the router model).
    Difficulty,
    /// Prefer the device.
    PreferLocal,
    /// Prefer the cloud.
    PreferCloud,
}

impl Rule {
    /// The rule's name in the configuration and in reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NamedModel => "named_model",
            Rule::Privacy => "privacy",
            Rule::Capability => "capability",
            Rule::Network => "network",
            Rule::Budget => "budget",
            Rule::Device => "device",
            Rule::Load => "load",
            Rule::Latency => "latency",
            Rule::Difficulty => "difficulty",
            Rule::PreferLocal => "prefer_local",
            Rule::PreferCloud => "prefer_cloud",
        }
    }
}

fn default_rules() -> Vec<Rule> {
    vec![
        Rule::NamedModel,
        Rule::Privacy,
        Rule::Capability,
        Rule::Network,
        Rule::Budget,
        Rule::Load,
        Rule::Device,
        Rule::Latency,
        Rule::Difficulty,
        Rule::PreferLocal,
    ]
}
fn d_virtual() -> String {
    "tandem/auto".into()
}
fn d_privacy() -> PrivacyMode {
    PrivacyMode::Redact
}
fn d_battery() -> f32 {
    20.0
}
fn d_temp() -> f32 {
    85.0
}
fn d_mem() -> u64 {
    512
}
fn d_cpu() -> f32 {
    0.75
}
fn d_queue() -> usize {
    2
}
fn d_threshold() -> f32 {
    0.5
}
/// Calibrated by `tandem bench cascade` for qwen2.5-coder 0.5B under 1.5B
/// (95% of the larger model's accuracy); other pairs should re-run it.
fn d_cascade() -> f32 {
    -0.75
}
fn d_share_window() -> usize {
    200
}
fn d_cascade_early_tokens() -> usize {
    8
}
fn d_true() -> bool {
    true
}

/// The `[router]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The model name that asks Tandem to choose.
    #[serde(default = "d_virtual")]
    pub virtual_model: String,
    /// The rules, in order of priority.
    #[serde(default = "default_rules")]
    pub rules: Vec<Rule>,
    /// Mode for requests that do not choose one (header or key).
    #[serde(default = "d_privacy")]
    pub privacy: PrivacyMode,
    /// USD per UTC day for all cloud requests together; none: no limit.
    #[serde(default)]
    pub daily_budget_usd: Option<f64>,
    /// Prefer the cloud below this battery level when not charging.
    #[serde(default = "d_battery")]
    pub low_battery_pct: f32,
    /// Prefer the cloud at or above this device temperature.
    #[serde(default = "d_temp")]
    pub hot_temperature_c: f32,
    /// Prefer the cloud below this much free memory.
    #[serde(default = "d_mem")]
    pub low_memory_mb: u64,
    /// Prefer the cloud when other processes keep this share of the cores busy.
    #[serde(default = "d_cpu")]
    pub busy_cpu_share: f32,
    /// Prefer the cloud when this many requests already wait for the local engine.
    #[serde(default = "d_queue")]
    pub max_local_queue: usize,
    /// Prefer the local model on a metered connection.
    #[serde(default = "d_true")]
    pub avoid_metered: bool,
    /// Difficulty above which the cloud is preferred (at quality 0.5).
    #[serde(default = "d_threshold")]
    pub difficulty_threshold: f32,
    /// Whether a request naming a model may be answered elsewhere if that
    /// model's side fails.
    #[serde(default)]
    pub failover_named_models: bool,
    /// Answer locally first and escalate unsure answers to the cloud (per
    /// request: `x-tandem-mode: cascade`).
    #[serde(default)]
    pub cascade: bool,
    /// Mean token log-probability below which a local answer is escalated
    /// (see `tandem bench cascade`).
    #[serde(default = "d_cascade")]
    pub cascade_threshold: f32,
    /// Tokens of the local answer after which the cascade looks at its
    /// confidence so far and escalates at once if it is below
    /// `cascade_early_threshold`, without waiting for the rest (0: only the
    /// whole answer is judged).
    #[serde(default = "d_cascade_early_tokens")]
    pub cascade_early_tokens: usize,
    /// Threshold for that early look (default: `cascade_threshold`).
    #[serde(default)]
    pub cascade_early_threshold: Option<f32>,
    /// How much the learned router's opinion moves the cascade's bar: a
    /// request's answer must reach `cascade_threshold + cascade_prior ×
    /// (difficulty − the router's threshold)` (early look too), so a prompt
    /// the router finds hard needs a surer answer to stay. 0: off.
    #[serde(default)]
    pub cascade_prior: f32,
    /// Hold the share of requests that the learned router and the cascade
    /// send to the cloud to this (0..1), whatever the traffic: the cut is
    /// learned online from the last `cloud_share_window` such requests
    /// (see [`crate::share`]); the thresholds above decide only until
    /// enough of them are in. A request with `x-tandem-quality` is held to
    /// its own threshold instead.
    #[serde(default)]
    pub cloud_share: Option<f32>,
    /// Requests the cloud share is learned from.
    #[serde(default = "d_share_window")]
    pub cloud_share_window: usize,
    /// Learning from the cascade's outcomes (`[router.memory]`).
    #[serde(default)]
    pub memory: crate::memory::MemoryConfig,
    /// Keeping a sample of routed prompts for labelling (`[router.sample]`).
    #[serde(default)]
    pub sample: crate::sample::SampleConfig,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("defaults parse"))
    }
}

/// What the local side offers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LocalView {
    /// A local model is loaded.
    pub available: bool,
    /// Its name.
    pub model: String,
    /// What it supports (from its chat template).
    pub capabilities: Capabilities,
    /// Tokens one request may hold.
    pub context_length: u32,
    /// Requests being decoded.
    pub active: usize,
    /// Requests waiting.
    pub queued: usize,
    /// Requests decoded together at most.
    pub capacity: usize,
    /// Measured time to first token for a typical prompt, and decode speed.
    pub prefill_tps: Option<f64>,
    /// Measured decoding speed.
    pub decode_tps: Option<f64>,
}

/// One cloud upstream as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CloudView {
    /// The upstream's configured name.
    pub name: String,
    /// The model it would answer with.
    pub model: String,
    /// What it supports.
    pub capabilities: Capabilities,
    /// Breaker closed (or half-open) and last probe answered.
    pub available: bool,
    /// Its circuit breaker is open.
    pub breaker_open: bool,
    /// Tokens one request may hold, if known.
    pub context_length: Option<u32>,
    /// USD per million prompt tokens.
    pub price_input_per_mtok: f64,
    /// USD per million completion tokens.
    pub price_output_per_mtok: f64,
    /// Last probe's round trip, ms.
    pub rtt_ms: Option<f64>,
    /// Measured time to first token, ms.
    pub ttft_ms: Option<f64>,
    /// Measured decoding speed.
    pub decode_tps: Option<f64>,
    /// It listens on this machine (loopback): the device's state is no
    /// reason to send work there, as none of it would leave.
    pub on_this_machine: bool,
}

/// What the request needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Features {
    /// `Some` when the request names a concrete model on that side.
    pub named: Option<Locality>,
    /// The privacy mode in force.
    pub privacy: Option<PrivacyMode>,
    /// Personal-data classes found in the request, with how many of each
    /// (empty when privacy is off); never the values.
    pub pii: std::collections::BTreeMap<String, u32>,
    /// The detector could not check the request: why. The privacy rule then
    /// keeps it on the device.
    pub pii_unchecked: Option<String>,
    /// Prompt length in tokens (exact when the local model counted them).
    pub prompt_tokens: u32,
    /// `max_tokens`, if given.
    pub max_tokens: Option<u32>,
    /// What the request needs beyond plain text (tools, structured output...).
    pub needs: Vec<Feature>,
    /// What the local model would refuse in this request although it has
    /// the features (a schema keyword its grammar cannot enforce).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_refuses: Option<String>,
    /// Time-to-first-token goal, ms.
    pub latency_goal_ms: Option<u32>,
    /// Difficulty score in [0, 1] from the learned router, if any.
    pub difficulty: Option<f32>,
    /// The learned router's threshold for this request's quality knob.
    pub difficulty_threshold: Option<f32>,
    /// 0..1: higher asks for more quality (lowers the difficulty threshold).
    pub quality: Option<f32>,
}

/// Cloud spending today.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Spend {
    /// All keys together, USD.
    pub today_usd: f64,
    /// The daily budget, if any.
    pub budget_usd: Option<f64>,
    /// This key's, USD.
    pub key_today_usd: f64,
    /// This key's budget, if any.
    pub key_budget_usd: Option<f64>,
}

/// The state of the world, for one decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct View {
    /// The local side.
    pub local: LocalView,
    /// The cloud candidate for this request (first available upstream, or
    /// the one serving the named model).
    pub cloud: Option<CloudView>,
    /// The device.
    pub device: DeviceState,
    /// The network.
    pub network: NetworkState,
    /// Spending.
    pub spend: Spend,
}

/// What a rule did to a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// The side may not serve the request (forbids always hold).
    Forbid,
    /// The rule would rather the side served it.
    Prefer,
    /// This preference decided.
    Decided,
}

/// One rule's effect, kept so that the decision explains itself.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    /// The rule (`privacy`, `capability`...).
    pub rule: &'static str,
    /// What it did.
    pub effect: Effect,
    /// To which side.
    pub side: Locality,
    /// Why, in words.
    pub detail: String,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match self.effect {
            Effect::Forbid => "not",
            Effect::Prefer => "prefers",
            Effect::Decided => "->",
        };
        write!(
            f,
            "{}: {} ({verb} {})",
            self.rule,
            self.detail,
            self.side.as_str()
        )
    }
}

/// Where a request runs, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The side that serves it.
    pub side: Locality,
    /// The other side, if the policy allows it and it exists (failover).
    pub fallback: Option<Locality>,
    /// Placeholders must replace personal data before the request leaves.
    pub redact: bool,
    /// Every rule's effect, in rule order.
    pub reasons: Vec<Reason>,
    /// The rule whose preference decided (for metrics).
    pub decided_by: &'static str,
}

/// Why no side may serve a request, as a kind the caller can map to its
/// own error (an HTTP status, say).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// Personal data may not leave and the device cannot answer.
    Privacy,
    /// The cloud budget is spent and the device cannot answer.
    Budget,
    /// The cloud is unreachable and the device cannot answer.
    CloudUnavailable,
    /// Nothing configured can serve it.
    NoBackend,
}

impl RefusalKind {
    /// The error code clients see.
    pub fn code(self) -> &'static str {
        match self {
            RefusalKind::Privacy => "privacy_policy",
            RefusalKind::Budget => "insufficient_quota",
            RefusalKind::CloudUnavailable => "cloud_unavailable",
            RefusalKind::NoBackend => "no_backend_allowed",
        }
    }
}

/// Why no side may serve the request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    /// Every rule's effect.
    pub reasons: Vec<Reason>,
    /// The strongest reason's kind.
    pub kind: RefusalKind,
}

impl Refusal {
    /// One sentence naming every forbid.
    pub fn message(&self) -> String {
        let parts: Vec<String> = self
            .reasons
            .iter()
            .filter(|r| r.effect == Effect::Forbid)
            .map(ToString::to_string)
            .collect();
        format!("no backend may serve this request: {}", parts.join("; "))
    }
}

/// Maps the quality knob onto a score threshold: 0.5 is the calibrated
/// threshold, 0 and 1 the extremes.
pub fn threshold_for_quality(calibrated: f32, quality: f32) -> f32 {
    if quality >= 0.5 {
        calibrated * (1.0 - (quality - 0.5) * 2.0)
    } else {
        calibrated + (1.0 - calibrated) * (0.5 - quality) * 2.0
    }
}

/// Decides where a request runs.
pub fn decide(f: &Features, v: &View, cfg: &PolicyConfig) -> Result<Decision, Refusal> {
    let exists = |s: Locality| match s {
        Locality::Local => v.local.available,
        Locality::Cloud => v.cloud.is_some(),
    };
    let mut allowed = [exists(Locality::Local), exists(Locality::Cloud)];
    let idx = |s: Locality| match s {
        Locality::Local => 0,
        Locality::Cloud => 1,
    };
    let mut reasons = Vec::new();
    let mut prefs: Vec<(Locality, &'static str, usize)> = Vec::new();
    // The privacy rule holds whatever the configuration lists: a list
    // without it does not turn privacy off.
    let implied = (!cfg.rules.contains(&Rule::Privacy)).then_some(Rule::Privacy);
    for rule in implied.into_iter().chain(cfg.rules.iter().copied()) {
        for e in apply(rule, f, v, cfg) {
            match e {
                Apply::Forbid(side, detail) => {
                    allowed[idx(side)] = false;
                    reasons.push(Reason {
                        rule: rule.as_str(),
                        effect: Effect::Forbid,
                        side,
                        detail,
                    });
                }
                Apply::Prefer(side, detail) => {
                    prefs.push((side, rule.as_str(), reasons.len()));
                    reasons.push(Reason {
                        rule: rule.as_str(),
                        effect: Effect::Prefer,
                        side,
                        detail,
                    });
                }
            }
        }
    }
    if !allowed[0] && !allowed[1] {
        if !exists(Locality::Local) && !exists(Locality::Cloud) {
            reasons.push(Reason {
                rule: "config",
                effect: Effect::Forbid,
                side: Locality::Local,
                detail: "no backend is configured".into(),
            });
        }
        return Err(refusal(reasons));
    }
    let chosen = prefs
        .iter()
        .find(|(s, _, _)| allowed[idx(*s)])
        .map(|(s, rule, at)| (*s, *rule, Some(*at)));
    let (side, decided_by, at) = chosen.unwrap_or_else(|| {
        let s = if allowed[0] {
            Locality::Local
        } else {
            Locality::Cloud
        };
        (s, "only_option", None)
    });
    if let Some(at) = at {
        reasons[at].effect = Effect::Decided;
    } else {
        reasons.push(Reason {
            rule: "only_option",
            effect: Effect::Decided,
            side,
            detail: "the other side is not allowed".into(),
        });
    }
    let fallback = (allowed[idx(side.other())] && (f.named.is_none() || cfg.failover_named_models))
        .then_some(side.other());
    let mode = f.privacy.unwrap_or(cfg.privacy);
    Ok(Decision {
        side,
        fallback,
        redact: mode == PrivacyMode::Redact && !f.pii.is_empty(),
        reasons,
        decided_by,
    })
}

/// Whether the learned difficulty decides `f` otherwise anywhere between
/// `lo` and `hi` (the span a reading of the prompt could move it over): the
/// question a reading must answer yes to before it is worth its prefill.
/// Only the difficulty rule reads the difficulty, as a step at its
/// threshold, so the two ends of the span tell. Every other rule is weighed
/// as it stands: a request that privacy keeps on the device, or that no
/// cloud can take, is decided whatever its difficulty. `false` when `f` has
/// no difficulty (it counts for nothing here).
pub fn difficulty_can_change(f: &Features, v: &View, cfg: &PolicyConfig, lo: f32, hi: f32) -> bool {
    if f.difficulty.is_none() {
        return false;
    }
    let at = |d: f32| {
        let mut g = f.clone();
        g.difficulty = Some(d);
        decide(&g, v, cfg)
            .map(|d| (d.side, d.fallback))
            .map_err(|r| r.kind)
    };
    at(lo) != at(hi)
}

fn refusal(reasons: Vec<Reason>) -> Refusal {
    let cloud_why = reasons
        .iter()
        .find(|r| r.effect == Effect::Forbid && r.side == Locality::Cloud)
        .map(|r| r.rule);
    let kind = match cloud_why {
        Some("privacy") => RefusalKind::Privacy,
        Some("budget") => RefusalKind::Budget,
        Some("network") => RefusalKind::CloudUnavailable,
        _ => RefusalKind::NoBackend,
    };
    Refusal { reasons, kind }
}

#[cfg(test)]
mod tests;
