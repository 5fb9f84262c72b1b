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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub backend: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub side: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub from: String,
    pub to: String,
    pub cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

fn latency_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RouteLabels, Counter>,
    pub refused: Family<OutcomeLabels, Counter>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cost_usd: Counter<f64, AtomicU64>,
    pub cost_saved_usd: Counter<f64, AtomicU64>,
    pub ttft: Family<BackendLabels, Histogram, fn() -> Histogram>,
    pub duration: Family<BackendLabels, Histogram, fn() -> Histogram>,
    pub failovers: Family<MoveLabels, Counter>,
    pub handoffs: Family<MoveLabels, Counter>,
    pub redactions: Family<ClassLabels, Counter>,
    pub cache: Family<OutcomeLabels, Counter>,
    pub cascade: Family<OutcomeLabels, Counter>,
    /// Speculative decoding on the device: rounds, drafted and accepted
    /// tokens, and tokens of answer.
    pub spec: Family<KindLabels, Counter>,
    /// Where a speculative answer's time goes: drafting, whole rounds, and
    /// the target's passes within them.
    pub spec_seconds: Family<KindLabels, Counter<f64, AtomicU64>>,
    /// Verification rounds served to devices (the cloud role).
    pub spec_verified: Counter,
    pub local_active: Gauge,
    pub local_queued: Gauge,
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
        Self {
            registry,
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
            local_active,
            local_queued,
        }
    }

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
