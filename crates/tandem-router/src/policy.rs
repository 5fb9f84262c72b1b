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

use crate::signals::{DeviceState, NetworkState};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// Requests with personal data or secrets never leave the device.
    Strict,
    /// They may leave with placeholders in place of the data; the answer
    /// gets the originals back.
    Redact,
    Off,
}

impl std::str::FromStr for PrivacyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "strict" => Ok(Self::Strict),
            "redact" => Ok(Self::Redact),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "privacy mode must be strict, redact or off, got `{other}`"
            )),
        }
    }
}

impl PrivacyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Redact => "redact",
            Self::Off => "off",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Local,
    Cloud,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Local => Side::Cloud,
            Side::Cloud => Side::Local,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Local => "local",
            Side::Cloud => "cloud",
        }
    }
}

/// The policy's rules, in the order they are listed in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// A request naming a concrete model goes where that model is.
    NamedModel,
    Privacy,
    Capability,
    Network,
    Budget,
    Device,
    Load,
    Latency,
    /// The learned difficulty score (see the router model).
    Difficulty,
    PreferLocal,
    PreferCloud,
}

impl Rule {
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
    #[serde(default = "d_temp")]
    pub hot_temperature_c: f32,
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
}

impl Default for PolicyConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("defaults parse"))
    }
}

/// What the local side offers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LocalView {
    pub available: bool,
    pub model: String,
    pub context_length: u32,
    pub active: usize,
    pub queued: usize,
    pub capacity: usize,
    /// Measured time to first token for a typical prompt, and decode speed.
    pub prefill_tps: Option<f64>,
    pub decode_tps: Option<f64>,
}

/// One cloud upstream as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CloudView {
    pub name: String,
    pub model: String,
    /// Breaker closed (or half-open) and last probe answered.
    pub available: bool,
    pub breaker_open: bool,
    pub context_length: Option<u32>,
    pub price_input_per_mtok: f64,
    pub price_output_per_mtok: f64,
    pub rtt_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub decode_tps: Option<f64>,
}

/// What the request needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Features {
    /// `Some` when the request names a concrete model on that side.
    pub named: Option<Side>,
    pub privacy: Option<PrivacyMode>,
    /// PII classes found in the request (empty when privacy is off).
    pub pii: Vec<String>,
    pub prompt_tokens: u32,
    pub max_tokens: Option<u32>,
    /// Features the local engine lacks (tools, structured output).
    pub needs: Vec<String>,
    /// Time-to-first-token goal, ms.
    pub latency_goal_ms: Option<u32>,
    /// Difficulty score in [0, 1] from the learned router, if any.
    pub difficulty: Option<f32>,
    /// The learned router's threshold for this request's quality knob.
    pub difficulty_threshold: Option<f32>,
    /// 0..1: higher asks for more quality (lowers the difficulty threshold).
    pub quality: Option<f32>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Spend {
    pub today_usd: f64,
    pub budget_usd: Option<f64>,
    pub key_today_usd: f64,
    pub key_budget_usd: Option<f64>,
}

/// The state of the world, for one decision.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct View {
    pub local: LocalView,
    /// The cloud candidate for this request (first available upstream, or
    /// the one serving the named model).
    pub cloud: Option<CloudView>,
    pub device: DeviceState,
    pub network: NetworkState,
    pub spend: Spend,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    pub rule: &'static str,
    /// `forbid`, `prefer` or `decided`.
    pub effect: &'static str,
    pub side: Side,
    pub detail: String,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match self.effect {
            "forbid" => "not",
            "prefer" => "prefers",
            _ => "->",
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    pub side: Side,
    /// The other side, if the policy allows it and it exists (failover).
    pub fallback: Option<Side>,
    /// Placeholders must replace PII before the request leaves.
    pub redact: bool,
    pub reasons: Vec<Reason>,
    /// The rule whose preference decided (for metrics).
    pub decided_by: &'static str,
}

/// Why no side may serve the request.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub reasons: Vec<Reason>,
    /// HTTP status suggested by the strongest reason.
    pub status: u16,
    pub code: &'static str,
}

impl Refusal {
    pub fn message(&self) -> String {
        let parts: Vec<String> = self
            .reasons
            .iter()
            .filter(|r| r.effect == "forbid")
            .map(ToString::to_string)
            .collect();
        format!("no backend may serve this request: {}", parts.join("; "))
    }
}

enum Effect {
    Forbid(Side, String),
    Prefer(Side, String),
}

fn estimate_cost(f: &Features, c: &CloudView) -> f64 {
    let out = f.max_tokens.unwrap_or(256).min(1024);
    (f64::from(f.prompt_tokens) * c.price_input_per_mtok + f64::from(out) * c.price_output_per_mtok)
        / 1e6
}

fn apply(rule: Rule, f: &Features, v: &View, cfg: &PolicyConfig) -> Vec<Effect> {
    let mut out = Vec::new();
    match rule {
        Rule::NamedModel => {
            if let Some(side) = f.named {
                out.push(Effect::Forbid(
                    side.other(),
                    "the request names a model served on the other side".into(),
                ));
                out.push(Effect::Prefer(side, "the request names this model".into()));
            }
        }
        Rule::Privacy => {
            let mode = f.privacy.unwrap_or(cfg.privacy);
            if !f.pii.is_empty() {
                match mode {
                    PrivacyMode::Strict => out.push(Effect::Forbid(
                        Side::Cloud,
                        format!("strict mode and the request contains {}", f.pii.join(", ")),
                    )),
                    PrivacyMode::Redact | PrivacyMode::Off => {}
                }
            }
        }
        // A request naming a model gets that backend's own, more precise
        // error (context length, unsupported field) instead of a refusal.
        Rule::Capability if f.named.is_some() => {}
        Rule::Capability => {
            if v.local.available && f.prompt_tokens >= v.local.context_length {
                out.push(Effect::Forbid(
                    Side::Local,
                    format!(
                        "prompt of {} tokens exceeds the local context of {}",
                        f.prompt_tokens, v.local.context_length
                    ),
                ));
            } else if v.local.available
                && f.max_tokens
                    .is_some_and(|m| f.prompt_tokens.saturating_add(m) > v.local.context_length)
            {
                out.push(Effect::Prefer(
                    Side::Cloud,
                    format!(
                        "prompt and max_tokens need {} tokens, more than the local context of {}",
                        f.prompt_tokens.saturating_add(f.max_tokens.unwrap_or(0)),
                        v.local.context_length
                    ),
                ));
            }
            if !f.needs.is_empty() {
                out.push(Effect::Forbid(
                    Side::Local,
                    format!("the local model lacks {}", f.needs.join(", ")),
                ));
            }
            if let Some(c) = &v.cloud
                && c.context_length.is_some_and(|ctx| f.prompt_tokens >= ctx)
            {
                out.push(Effect::Forbid(
                    Side::Cloud,
                    format!(
                        "prompt exceeds the cloud model's context of {}",
                        c.context_length.unwrap_or(0)
                    ),
                ));
            }
        }
        Rule::Network => match &v.cloud {
            None => {}
            Some(c) if c.breaker_open => out.push(Effect::Forbid(
                Side::Cloud,
                format!("upstream {} is failing (circuit open)", c.name),
            )),
            Some(c) if !c.available => out.push(Effect::Forbid(
                Side::Cloud,
                format!("upstream {} is unreachable", c.name),
            )),
            Some(_) if v.network.metered && cfg.avoid_metered => out.push(Effect::Prefer(
                Side::Local,
                "the connection is metered".into(),
            )),
            Some(_) => {}
        },
        Rule::Budget => {
            if let Some(b) = v.spend.budget_usd
                && v.spend.today_usd >= b
            {
                out.push(Effect::Forbid(
                    Side::Cloud,
                    format!(
                        "daily budget of ${b:.2} spent (${:.4} today)",
                        v.spend.today_usd
                    ),
                ));
            }
            if let Some(b) = v.spend.key_budget_usd
                && v.spend.key_today_usd >= b
            {
                out.push(Effect::Forbid(
                    Side::Cloud,
                    format!(
                        "this key's daily budget of ${b:.2} spent (${:.4} today)",
                        v.spend.key_today_usd
                    ),
                ));
            }
            if let (Some(c), Some(b)) = (&v.cloud, v.spend.budget_usd) {
                let est = estimate_cost(f, c);
                if v.spend.today_usd + est > b && v.spend.today_usd < b {
                    out.push(Effect::Prefer(
                        Side::Local,
                        format!("estimated ${est:.4} would exceed the daily budget"),
                    ));
                }
            }
        }
        Rule::Load => {
            let l = &v.local;
            if l.available && l.active >= l.capacity && l.queued >= cfg.max_local_queue {
                out.push(Effect::Prefer(
                    Side::Cloud,
                    format!(
                        "local engine saturated: {} running, {} waiting",
                        l.active, l.queued
                    ),
                ));
            }
        }
        Rule::Device => {
            let d = &v.device;
            if let (Some(pct), Some(false)) = (d.battery_pct, d.charging)
                && pct < cfg.low_battery_pct
            {
                out.push(Effect::Prefer(
                    Side::Cloud,
                    format!("battery at {pct:.0}% and not charging"),
                ));
            }
            if let Some(t) = d.temperature_c
                && t >= cfg.hot_temperature_c
            {
                out.push(Effect::Prefer(Side::Cloud, format!("device at {t:.0} C")));
            }
            if let Some(m) = d.free_memory_mb
                && m < cfg.low_memory_mb
            {
                out.push(Effect::Prefer(
                    Side::Cloud,
                    format!("only {m} MB of memory free"),
                ));
            }
            if let (Some(load), Some(cores)) = (d.cpu_load, d.cores)
                && cores > 0
                && load / cores as f32 >= cfg.busy_cpu_share
            {
                out.push(Effect::Prefer(
                    Side::Cloud,
                    format!("other work keeps {load:.1} of {cores} cores busy"),
                ));
            }
        }
        Rule::Latency => {
            if let (Some(goal), Some(c)) = (f.latency_goal_ms, &v.cloud) {
                let goal = f64::from(goal);
                let local = v.local.prefill_tps.map(|tps| {
                    // Waiting requests delay this one by about one prefill each.
                    let wait = v.local.queued as f64 + 1.0;
                    f64::from(f.prompt_tokens) / tps * 1000.0 * wait
                });
                let cloud = match (c.ttft_ms, c.rtt_ms) {
                    (Some(t), _) => Some(t),
                    (None, Some(r)) => Some(r * 2.0),
                    _ => None,
                };
                match (local, cloud) {
                    (Some(l), Some(cl)) if l > goal && cl <= goal => out.push(Effect::Prefer(
                        Side::Cloud,
                        format!("first token expected in {l:.0} ms locally, {cl:.0} ms in the cloud; goal {goal:.0} ms"),
                    )),
                    (Some(l), Some(cl)) if l <= goal && cl > goal => out.push(Effect::Prefer(
                        Side::Local,
                        format!("first token expected in {l:.0} ms locally, {cl:.0} ms in the cloud; goal {goal:.0} ms"),
                    )),
                    _ => {}
                }
            }
        }
        Rule::Difficulty => {
            if let Some(score) = f.difficulty {
                // quality 0.5 keeps the configured threshold; 1 sends
                // everything that is not trivially easy, 0 almost nothing.
                let threshold = f.difficulty_threshold.unwrap_or_else(|| {
                    threshold_for_quality(
                        cfg.difficulty_threshold,
                        f.quality.unwrap_or(0.5).clamp(0.0, 1.0),
                    )
                });
                if score >= threshold {
                    out.push(Effect::Prefer(
                        Side::Cloud,
                        format!("predicted hard for the local model (score {score:.2} >= {threshold:.2})"),
                    ));
                } else {
                    out.push(Effect::Prefer(
                        Side::Local,
                        format!(
                            "predicted easy for the local model (score {score:.2} < {threshold:.2})"
                        ),
                    ));
                }
            }
        }
        Rule::PreferLocal => out.push(Effect::Prefer(Side::Local, "local first".into())),
        Rule::PreferCloud => out.push(Effect::Prefer(Side::Cloud, "cloud first".into())),
    }
    out
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
    let exists = |s: Side| match s {
        Side::Local => v.local.available,
        Side::Cloud => v.cloud.is_some(),
    };
    let mut allowed = [exists(Side::Local), exists(Side::Cloud)];
    let idx = |s: Side| match s {
        Side::Local => 0,
        Side::Cloud => 1,
    };
    let mut reasons = Vec::new();
    let mut prefs: Vec<(Side, &'static str, usize)> = Vec::new();
    for &rule in &cfg.rules {
        for e in apply(rule, f, v, cfg) {
            match e {
                Effect::Forbid(side, detail) => {
                    allowed[idx(side)] = false;
                    reasons.push(Reason {
                        rule: rule.as_str(),
                        effect: "forbid",
                        side,
                        detail,
                    });
                }
                Effect::Prefer(side, detail) => {
                    prefs.push((side, rule.as_str(), reasons.len()));
                    reasons.push(Reason {
                        rule: rule.as_str(),
                        effect: "prefer",
                        side,
                        detail,
                    });
                }
            }
        }
    }
    if !allowed[0] && !allowed[1] {
        if !exists(Side::Local) && !exists(Side::Cloud) {
            reasons.push(Reason {
                rule: "config",
                effect: "forbid",
                side: Side::Local,
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
        let s = if allowed[0] { Side::Local } else { Side::Cloud };
        (s, "only_option", None)
    });
    if let Some(at) = at {
        reasons[at].effect = "decided";
    } else {
        reasons.push(Reason {
            rule: "only_option",
            effect: "decided",
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

fn refusal(reasons: Vec<Reason>) -> Refusal {
    let cloud_why = reasons
        .iter()
        .find(|r| r.effect == "forbid" && r.side == Side::Cloud)
        .map(|r| r.rule);
    let (status, code) = match cloud_why {
        Some("privacy") => (403, "privacy_policy"),
        Some("budget") => (429, "insufficient_quota"),
        Some("network") => (503, "cloud_unavailable"),
        _ => (400, "no_backend_allowed"),
    };
    Refusal {
        reasons,
        status,
        code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> View {
        View {
            local: LocalView {
                available: true,
                model: "small".into(),
                context_length: 4096,
                capacity: 4,
                prefill_tps: Some(200.0),
                decode_tps: Some(60.0),
                ..LocalView::default()
            },
            cloud: Some(CloudView {
                name: "cloud".into(),
                model: "big".into(),
                available: true,
                price_input_per_mtok: 1.0,
                price_output_per_mtok: 2.0,
                ttft_ms: Some(300.0),
                ..CloudView::default()
            }),
            ..View::default()
        }
    }

    fn cfg() -> PolicyConfig {
        PolicyConfig::default()
    }

    #[test]
    fn local_first_by_default_with_cloud_fallback() {
        let d = decide(&Features::default(), &view(), &cfg()).unwrap();
        assert_eq!(d.side, Side::Local);
        assert_eq!(d.fallback, Some(Side::Cloud));
        assert_eq!(d.decided_by, "prefer_local");
    }

    #[test]
    fn strict_privacy_keeps_pii_home_even_when_device_prefers_cloud() {
        let mut v = view();
        v.device.battery_pct = Some(5.0);
        v.device.charging = Some(false);
        let f = Features {
            privacy: Some(PrivacyMode::Strict),
            pii: vec!["email".into()],
            ..Features::default()
        };
        let d = decide(&f, &v, &cfg()).unwrap();
        assert_eq!(d.side, Side::Local);
        assert_eq!(d.fallback, None);
        assert!(
            d.reasons
                .iter()
                .any(|r| r.rule == "privacy" && r.effect == "forbid")
        );
        // Without PII the battery sends it out.
        let d = decide(&Features::default(), &v, &cfg()).unwrap();
        assert_eq!(d.side, Side::Cloud);
        assert_eq!(d.decided_by, "device");
    }

    #[test]
    fn redact_mode_allows_cloud_with_placeholders() {
        let mut v = view();
        v.local.context_length = 100;
        let f = Features {
            privacy: Some(PrivacyMode::Redact),
            pii: vec!["phone".into()],
            prompt_tokens: 500,
            ..Features::default()
        };
        let d = decide(&f, &v, &cfg()).unwrap();
        assert_eq!((d.side, d.redact, d.fallback), (Side::Cloud, true, None));
    }

    #[test]
    fn too_long_and_private_is_refused_with_reasons() {
        let mut v = view();
        v.local.context_length = 100;
        let f = Features {
            privacy: Some(PrivacyMode::Strict),
            pii: vec!["iban".into()],
            prompt_tokens: 500,
            ..Features::default()
        };
        let r = decide(&f, &v, &cfg()).unwrap_err();
        assert_eq!(r.status, 403);
        assert!(
            r.message().contains("iban") && r.message().contains("exceeds"),
            "{}",
            r.message()
        );
    }

    #[test]
    fn offline_budget_and_saturation() {
        let mut v = view();
        v.cloud.as_mut().unwrap().available = false;
        let d = decide(&Features::default(), &v, &cfg()).unwrap();
        assert_eq!((d.side, d.fallback), (Side::Local, None));

        let mut v = view();
        v.spend.budget_usd = Some(1.0);
        v.spend.today_usd = 1.5;
        v.local.active = 4;
        v.local.queued = 9;
        let d = decide(&Features::default(), &v, &cfg()).unwrap();
        assert_eq!(
            d.side,
            Side::Local,
            "budget forbids the cloud the load would prefer"
        );
        assert!(d.reasons.iter().any(|r| r.rule == "budget"));

        let mut v = view();
        v.local.active = 4;
        v.local.queued = 9;
        let d = decide(&Features::default(), &v, &cfg()).unwrap();
        assert_eq!((d.side, d.decided_by), (Side::Cloud, "load"));
    }

    #[test]
    fn latency_goal_and_named_models() {
        let f = Features {
            prompt_tokens: 2000,
            latency_goal_ms: Some(1000),
            ..Features::default()
        };
        let d = decide(&f, &view(), &cfg()).unwrap();
        assert_eq!((d.side, d.decided_by), (Side::Cloud, "latency"));

        let f = Features {
            named: Some(Side::Cloud),
            ..Features::default()
        };
        let d = decide(&f, &view(), &cfg()).unwrap();
        assert_eq!((d.side, d.fallback), (Side::Cloud, None));
        let f = Features {
            named: Some(Side::Cloud),
            privacy: Some(PrivacyMode::Strict),
            pii: vec!["email".into()],
            ..Features::default()
        };
        assert_eq!(decide(&f, &view(), &cfg()).unwrap_err().status, 403);
    }

    #[test]
    fn rule_order_sets_priority_of_preferences() {
        let mut v = view();
        v.device.battery_pct = Some(5.0);
        v.device.charging = Some(false);
        let mut c = cfg();
        c.rules = vec![Rule::PreferLocal, Rule::Device];
        assert_eq!(
            decide(&Features::default(), &v, &c).unwrap().side,
            Side::Local
        );
        c.rules = vec![Rule::Device, Rule::PreferLocal];
        assert_eq!(
            decide(&Features::default(), &v, &c).unwrap().side,
            Side::Cloud
        );
    }

    #[test]
    fn quality_knob_moves_the_threshold() {
        assert_eq!(threshold_for_quality(0.4, 0.5), 0.4);
        assert_eq!(threshold_for_quality(0.4, 1.0), 0.0);
        assert!((threshold_for_quality(0.4, 0.0) - 1.0).abs() < 1e-6);
        assert!(threshold_for_quality(0.4, 0.75) < 0.4);
    }
}
