//! Prometheus metrics of one gateway: where requests went and why, tokens
//! on each side, money spent and saved, latency, failovers and handoffs.
//! Each gateway owns its registry (no process-global state), so several
//! can run in one process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of answered requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// `local`, `cloud:<name>` or `cache`.
    pub backend: String,
    /// The rule that placed it, or `failover`, `handoff`...
    pub reason: String,
}

/// Labels of token counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `local` or `cloud`.
    pub side: String,
    /// `prompt` or `completion`.
    pub kind: String,
}

/// Labels of latency histograms.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `local` or `cloud:<name>`.
    pub backend: String,
}

/// Labels of failovers and handoffs.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    /// The side that failed.
    pub from: String,
    /// The side that took over.
    pub to: String,
    /// Why, in a few bounded words.
    pub cause: String,
}

/// Labels of redactions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// The personal-data class.
    pub class: String,
}

/// Labels of speculative-decoding counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// What was counted.
    pub kind: String,
}

/// Labels of outcomes (cache, cascade, refusals).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The outcome.
    pub outcome: String,
}

/// The sum of the samples in Prometheus text whose line starts with
/// `prefix` (a metric name, with labels if they narrow it): how tests and
/// benchmarks read `/metrics`.
pub fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A short label for metrics (bounded cardinality).
pub(crate) fn cause_label(e: &tandem_api::ApiError) -> String {
    match (e.status, e.code.as_deref()) {
        (504, _) => "timeout".into(),
        (429, _) => "rate_limited".into(),
        (503, Some("overloaded")) => "unavailable".into(),
        (s, _) if s >= 500 => "upstream_error".into(),
        _ => "refused".into(),
    }
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// One gateway's metrics.
pub struct Metrics {
    registry: Registry,
    /// Requests answered.
    pub requests: Family<RouteLabels, Counter>,
    /// Requests refused by the policy.
    pub refused: Family<OutcomeLabels, Counter>,
    /// Tokens on each side.
    pub tokens: Family<TokenLabels, Counter>,
    /// Spent on upstreams.
    pub cost_usd: Counter<f64, AtomicU64>,
    /// Saved by answering locally.
    pub cost_saved_usd: Counter<f64, AtomicU64>,
    /// Time to first token.
    pub ttft: Family<BackendLabels, Histogram, fn() -> Histogram>,
    /// Time to the last token.
    pub duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    /// Failovers before the first token.
    pub failovers: Family<MoveLabels, Counter>,
    /// Handoffs after it.
    pub handoffs: Family<MoveLabels, Counter>,
    /// Values replaced by placeholders.
    pub redactions: Family<ClassLabels, Counter>,
    /// Cache lookups.
    pub cache: Family<OutcomeLabels, Counter>,
    /// Cascade outcomes.
    pub cascade: Family<OutcomeLabels, Counter>,
    /// Speculative decoding on the device: rounds, drafted and accepted
    /// tokens, and tokens of answer.
    pub spec: Family<KindLabels, Counter>,
    /// Where a speculative answer's time goes: drafting, whole rounds, and
    /// the target's passes within them.
    pub spec_seconds: Family<KindLabels, Counter<f64, AtomicU64>>,
    /// Verification rounds served to devices (the cloud role).
    pub spec_verified: Counter,
    /// Routed prompts kept for labelling (`[router.sample]`).
    pub sampled: Counter,
    /// Local requests being decoded.
    pub local_active: Gauge,
    /// Local requests waiting.
    pub local_queued: Gauge,
    /// 1 while the shared state store answers (and when there is none).
    pub shared_up: Gauge,
    /// Calls to the shared state store that failed or timed out.
    pub shared_errors: Counter,
    /// Under `[router] cloud_share`: the share of the last requests the
    /// router and the cascade decided that went out.
    pub cloud_share: Gauge<f64, AtomicU64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tandem");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by backend and the rule that placed them",
            requests.clone(),
        );
        let refused = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "requests_refused",
            "Requests no backend was allowed to serve, by cause",
            refused.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "tokens",
            "Tokens processed on the device and in the cloud",
            tokens.clone(),
        );
        let cost_usd = Counter::<f64, AtomicU64>::default();
        registry.register(
            "cost_usd",
            "Money spent on cloud upstreams (USD)",
            cost_usd.clone(),
        );
        let cost_saved_usd = Counter::<f64, AtomicU64>::default();
        registry.register(
            "cost_saved_usd",
            "What locally answered requests would have cost in the cloud (USD)",
            cost_saved_usd.clone(),
        );
        let ttft = Family::<BackendLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register("ttft_seconds", "Time to first token", ttft.clone());
        let duration = Family::<BackendLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to last token",
            duration.clone(),
        );
        let failovers = Family::<MoveLabels, Counter>::default();
        registry.register(
            "failovers",
            "Requests moved to the other side before their first token",
            failovers.clone(),
        );
        let handoffs = Family::<MoveLabels, Counter>::default();
        registry.register(
            "handoffs",
            "Answers continued by the other side after breaking off mid-stream",
            handoffs.clone(),
        );
        let redactions = Family::<ClassLabels, Counter>::default();
        registry.register(
            "pii_redactions",
            "Values replaced by placeholders before leaving the device",
            redactions.clone(),
        );
        let cache = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Semantic cache lookups by outcome",
            cache.clone(),
        );
        let cascade = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "cascade_answers",
            "Cascade answers kept local or escalated to the cloud",
            cascade.clone(),
        );
        let spec = Family::<KindLabels, Counter>::default();
        registry.register(
            "speculative",
            "Speculative decoding on the device: rounds, drafted, accepted and answer tokens",
            spec.clone(),
        );
        let spec_seconds = Family::<KindLabels, Counter<f64, AtomicU64>>::default();
        registry.register(
            "speculative_seconds",
            "Speculative decoding time on the device: drafting, verification rounds, and the target's passes within them",
            spec_seconds.clone(),
        );
        let spec_verified = Counter::default();
        registry.register(
            "speculative_verify_rounds",
            "Verification rounds run for devices' speculative sessions",
            spec_verified.clone(),
        );
        let sampled = Counter::default();
        registry.register(
            "router_sampled_prompts",
            "Routed prompts kept for `tandem router label` ([router.sample]; none with personal data)",
            sampled.clone(),
        );
        let local_active = Gauge::default();
        registry.register(
            "local_active",
            "Requests decoding on the device",
            local_active.clone(),
        );
        let local_queued = Gauge::default();
        registry.register(
            "local_queued",
            "Requests waiting for the local engine",
            local_queued.clone(),
        );
        let shared_up = Gauge::default();
        shared_up.set(1);
        registry.register(
            "shared_state_up",
            "Whether the shared state store (Redis) answered the last call; 1 when there is none",
            shared_up.clone(),
        );
        let shared_errors = Counter::default();
        registry.register(
            "shared_state_errors",
            "Calls to the shared state store that failed or timed out",
            shared_errors.clone(),
        );
        let cloud_share = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "cloud_share_held",
            "Under [router] cloud_share: the share of the last requests decided by the router and the cascade that went to the cloud",
            cloud_share.clone(),
        );
        Self {
            registry,
            cloud_share,
            shared_up,
            shared_errors,
            requests,
            refused,
            tokens,
            cost_usd,
            cost_saved_usd,
            ttft,
            duration,
            failovers,
            handoffs,
            redactions,
            cache,
            cascade,
            spec,
            spec_seconds,
            spec_verified,
            sampled,
            local_active,
            local_queued,
        }
    }

    /// Counts one answer's tokens on `side`.
    pub fn count_tokens(&self, side: &str, prompt: u32, completion: u32) {
        self.tokens
            .get_or_create(&TokenLabels {
                side: side.into(),
                kind: "prompt".into(),
            })
            .inc_by(u64::from(prompt));
        self.tokens
            .get_or_create(&TokenLabels {
                side: side.into(),
                kind: "completion".into(),
            })
            .inc_by(u64::from(completion));
    }

    /// Adds to a speculative-decoding counter.
    pub fn count_spec(&self, kind: &str, n: u64) {
        self.spec
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc_by(n);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("metrics encoding failed: {e}");
        }
        out
    }
}
