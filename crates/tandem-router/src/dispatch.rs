//! Carrying out decisions: the request goes to the chosen side (redacted
//! first if it leaves the device), and the answer comes back whole even if
//! that side fails — before the first token by failing over, after it by
//! handing the answer to the other side, which continues from the text
//! already sent. Every cloud exchange lands in the egress ledger, and
//! spending, tokens and latency land in the metrics.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tandem_api::{
    Answer, ApiError, Backend, Event, EventStream, Finish, GenerateRequest, Input, LogprobRequest,
    Usage,
};
use tandem_backends::{CloudBackend, Continuation, Exchange};
use tandem_embed::Embedder;
use tandem_engine::LocalEngine;
use tandem_ledger::{Egress, Ledger};

use crate::access::{Access, Caller, KeyConfig, SpendTracker};
use crate::cache::{CacheKey, Cached, SemanticCache};
use crate::metrics::{BackendLabels, ClassLabels, Metrics, MoveLabels, OutcomeLabels, RouteLabels};
use crate::pii::{CustomPattern, Detector, Redaction, Restorer};
use crate::policy::{
    CloudView, Decision, Features, LocalView, PolicyConfig, PrivacyMode, Side, Spend, View, decide,
};
use crate::signals::SignalHub;
use crate::speculative::SpeculativeConfig;
use crate::verifier::Verifier;

/// Scores how hard a request is for the local model, in [0, 1].
pub trait Scorer: Send + Sync {
    /// Difficulty in [0, 1] of what the user asked last (`text`, see
    /// [`crate::learned::routed_text`]) from its embedding.
    fn score(&self, embedding: &[f32], text: &str) -> f32;
    /// The difficulty threshold for the request's quality knob (`None`: the
    /// knob is absent); `None` leaves it to the policy's configured one.
    fn threshold(&self, _quality: Option<f32>) -> Option<f32> {
        None
    }
}

/// Who is asking and what they asked for beyond the body (headers).
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub request_id: String,
    pub caller: Option<Arc<Caller>>,
    /// `x-tandem-privacy`.
    pub privacy: Option<PrivacyMode>,
    /// `x-tandem-latency-goal-ms`: time-to-first-token goal.
    pub latency_goal_ms: Option<u32>,
    /// `x-tandem-quality`: 0..1.
    pub quality: Option<f32>,
    /// `x-tandem-cache: skip`: neither read nor write the semantic cache.
    pub cache_skip: bool,
    /// `x-tandem-mode: cascade` or `route` (default: the policy's `cascade`).
    pub cascade: Option<bool>,
    /// `x-tandem-mode: speculative` (or `route`); default: `[speculative]
    /// default`.
    pub speculative: Option<bool>,
}

/// Where a request went and why; the server turns it into headers.
#[derive(Debug, Clone, Serialize)]
pub struct RouteInfo {
    /// `local` or `cloud:<upstream>`.
    pub backend: String,
    pub model: String,
    pub decision: Decision,
    /// PII classes replaced by placeholders, with counts.
    pub redacted: BTreeMap<String, u32>,
    /// Set when the first side failed before its first token.
    pub failover: Option<String>,
    /// Microseconds spent deciding.
    pub decision_us: u64,
    /// The learned router's difficulty score and the threshold it was held to.
    pub difficulty: Option<(f32, f32)>,
    /// `hit`, `miss` or `skip`, when the semantic cache is on.
    pub cache: Option<String>,
    /// What the cascade did: kept the local answer or escalated it.
    pub cascade: Option<String>,
    /// `on` when the answer is decoded speculatively, or why it is not.
    pub speculative: Option<String>,
}

/// The outcome of a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub backend: Option<String>,
    pub model: Option<String>,
    pub decision: Option<Decision>,
    pub refusal: Option<String>,
    pub features: Features,
    pub view: View,
    pub decision_us: u64,
}

pub struct Dispatched {
    pub stream: EventStream,
    pub route: RouteInfo,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct PrivacyConfig {
    #[serde(default)]
    pub custom_patterns: Vec<CustomPattern>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Speed {
    prefill_tps: Option<f64>,
    decode_tps: Option<f64>,
}

pub struct Dispatcher {
    locals: Vec<LocalEngine>,
    clouds: Vec<CloudBackend>,
    hub: SignalHub,
    detector: Detector,
    policy: PolicyConfig,
    ledger: Option<Ledger>,
    metrics: Metrics,
    spend: SpendTracker,
    access: Access,
    local_speed: Mutex<Speed>,
    scorer: Mutex<Option<Arc<dyn Scorer>>>,
    embedder: Option<Arc<Embedder>>,
    embedder_name: String,
    cache: Option<Arc<SemanticCache>>,
    speculative: SpeculativeConfig,
    verifier: Arc<Verifier>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("locals", &self.locals.len())
            .field("clouds", &self.clouds.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Dispatcher`].
#[derive(Default)]
pub struct DispatcherBuilder {
    locals: Vec<LocalEngine>,
    clouds: Vec<CloudBackend>,
    policy: PolicyConfig,
    privacy: PrivacyConfig,
    keys: Vec<KeyConfig>,
    ledger: Option<Ledger>,
    hub: Option<SignalHub>,
    embedder: Option<(String, Arc<Embedder>)>,
    cache: Option<Arc<SemanticCache>>,
    speculative: SpeculativeConfig,
}

impl DispatcherBuilder {
    /// The first local engine is the one the router places requests on.
    pub fn local(mut self, e: LocalEngine) -> Self {
        self.locals.push(e);
        self
    }
    pub fn cloud(mut self, c: CloudBackend) -> Self {
        self.clouds.push(c);
        self
    }
    pub fn policy(mut self, p: PolicyConfig) -> Self {
        self.policy = p;
        self
    }
    pub fn privacy(mut self, p: PrivacyConfig) -> Self {
        self.privacy = p;
        self
    }
    pub fn keys(mut self, k: Vec<KeyConfig>) -> Self {
        self.keys = k;
        self
    }
    pub fn ledger(mut self, l: Ledger) -> Self {
        self.ledger = Some(l);
        self
    }
    pub fn signals(mut self, hub: SignalHub) -> Self {
        self.hub = Some(hub);
        self
    }
    /// The sentence embedder: `/v1/embeddings`, the learned router and the
    /// semantic cache use it.
    pub fn embedder(mut self, name: &str, e: Arc<Embedder>) -> Self {
        self.embedder = Some((name.to_owned(), e));
        self
    }
    /// Needs an embedder too.
    pub fn cache(mut self, c: Arc<SemanticCache>) -> Self {
        self.cache = Some(c);
        self
    }
    pub fn speculative(mut self, s: SpeculativeConfig) -> Self {
        self.speculative = s;
        self
    }
    pub fn build(self) -> Result<Arc<Dispatcher>, String> {
        let spend = SpendTracker::default();
        if let Some(l) = &self.ledger {
            match tandem_ledger::read(l.path()) {
                Ok(entries) => spend.seed_from_ledger(&entries),
                Err(e) => return Err(format!("reading the ledger: {e}")),
            }
        }
        Ok(Arc::new(Dispatcher {
            locals: self.locals,
            clouds: self.clouds,
            hub: self.hub.unwrap_or_default(),
            detector: Detector::new(&self.privacy.custom_patterns)?,
            policy: self.policy,
            ledger: self.ledger,
            metrics: Metrics::new(),
            spend,
            access: Access::new(&self.keys)?,
            local_speed: Mutex::new(Speed::default()),
            scorer: Mutex::new(None),
            embedder_name: self
                .embedder
                .as_ref()
                .map(|(n, _)| n.clone())
                .unwrap_or_default(),
            embedder: self.embedder.map(|(_, e)| e),
            cache: self.cache,
            verifier: Arc::new(Verifier::new(Duration::from_secs(
                self.speculative.session_idle_s.max(1),
            ))),
            speculative: self.speculative,
        }))
    }
}

fn stricter(a: PrivacyMode, b: PrivacyMode) -> PrivacyMode {
    let rank = |m| match m {
        PrivacyMode::Strict => 2,
        PrivacyMode::Redact => 1,
        PrivacyMode::Off => 0,
    };
    if rank(a) >= rank(b) { a } else { b }
}

/// Request fields that the local engine refuses.
fn local_needs(req: &GenerateRequest) -> Vec<String> {
    let mut needs = Vec::new();
    if req
        .extra
        .get("tools")
        .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    {
        needs.push("tool calling".to_owned());
    }
    if req
        .extra
        .get("response_format")
        .and_then(|v| v.get("type"))
        .and_then(|t| t.as_str())
        .is_some_and(|t| t != "text")
    {
        needs.push("structured output".to_owned());
    }
    needs
}

/// A side that is serving the answer now.
struct Leg {
    side: Side,
    label: String,
    stream: EventStream,
    restorer: Option<Restorer>,
    cloud: Option<CloudLeg>,
    /// Drafted here and verified in the cloud; the drafting task does its
    /// own accounting.
    spec: bool,
}

/// The ledger duty of a cloud leg: recorded once, when the exchange ends —
/// or when the leg is dropped because the client went away.
pub(crate) struct CloudLeg {
    disp: Arc<Dispatcher>,
    upstream: usize,
    exchange: Arc<Exchange>,
    redacted: BTreeMap<String, u32>,
    request_id: String,
    key: Option<String>,
    deltas: u32,
    recorded: bool,
}

impl CloudLeg {
    /// The ledger record of a speculative session: what left is the
    /// prompt's tokens and the drafts, all under one exchange.
    pub(crate) fn speculative(
        disp: &Arc<Dispatcher>,
        upstream: usize,
        exchange: Exchange,
        redacted: BTreeMap<String, u32>,
        request_id: String,
        key: Option<String>,
    ) -> Self {
        Self {
            disp: disp.clone(),
            upstream,
            exchange: Arc::new(exchange),
            redacted,
            request_id,
            key,
            deltas: 0,
            recorded: false,
        }
    }

    pub(crate) fn settle(&mut self, outcome: &str, usage: Option<Usage>) -> f64 {
        if self.recorded {
            return 0.0;
        }
        self.recorded = true;
        self.disp.record_egress(self, outcome, usage)
    }
}

impl Drop for CloudLeg {
    fn drop(&mut self) {
        self.settle("cancelled: the client went away", None);
    }
}

impl Dispatcher {
    pub fn builder() -> DispatcherBuilder {
        DispatcherBuilder::default()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Prometheus text, with the local engine's gauges read now.
    pub fn render_metrics(&self) -> String {
        if let Some(l) = self.locals.first() {
            let s = l.stats();
            self.metrics.local_active.set(s.active as i64);
            self.metrics.local_queued.set(s.queued as i64);
        }
        self.metrics.render()
    }

    pub fn signals(&self) -> &SignalHub {
        &self.hub
    }

    pub fn access(&self) -> &Access {
        &self.access
    }

    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }

    pub fn locals(&self) -> &[LocalEngine] {
        &self.locals
    }

    pub fn clouds(&self) -> &[CloudBackend] {
        &self.clouds
    }

    pub fn set_scorer(&self, scorer: Arc<dyn Scorer>) {
        *self.scorer.lock().unwrap_or_else(|p| p.into_inner()) = Some(scorer);
    }

    fn scorer(&self) -> Option<Arc<dyn Scorer>> {
        self.scorer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn embedder(&self) -> Option<&Arc<Embedder>> {
        self.embedder.as_ref()
    }

    /// The embedding model's name (empty without one).
    pub fn embedder_name(&self) -> &str {
        &self.embedder_name
    }

    pub fn speculative(&self) -> &SpeculativeConfig {
        &self.speculative
    }

    /// Verification sessions this gateway serves to devices (cloud role).
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    pub fn cache(&self) -> Option<&Arc<SemanticCache>> {
        self.cache.as_ref()
    }

    /// Embeds off the async workers (a forward pass takes milliseconds).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ApiError> {
        let e = self
            .embedder
            .clone()
            .ok_or_else(|| ApiError::unavailable("no embedding model is loaded"))?;
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            e.embed(&refs)
        })
        .await
        .map_err(|_| ApiError::internal("the embedding task failed"))?
        .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// Every backend, for `/v1/models` and `/healthz`.
    pub fn backends(&self) -> Vec<&dyn Backend> {
        self.locals
            .iter()
            .map(|l| l as &dyn Backend)
            .chain(self.clouds.iter().map(|c| c as &dyn Backend))
            .collect()
    }

    /// Starts probing the upstreams and reading the device.
    pub fn start_signals(&self, probe_every: Duration) {
        let probes = self
            .clouds
            .iter()
            .map(|c| {
                let name = c.config().name.clone();
                let c = c.clone();
                let probe: crate::signals::Probe = Arc::new(move || {
                    let c = c.clone();
                    Box::pin(async move { c.probe(Duration::from_secs(2)).await })
                });
                (name, probe)
            })
            .collect();
        self.hub
            .spawn_refresh(probes, Duration::from_secs(2), probe_every);
    }

    fn privacy_mode(&self, ctx: &RequestContext) -> PrivacyMode {
        let base = ctx
            .caller
            .as_ref()
            .and_then(|c| c.config.privacy)
            .unwrap_or(self.policy.privacy);
        match ctx.privacy {
            // With keys, a header may only tighten the key's mode.
            Some(h) if ctx.caller.is_some() => stricter(base, h),
            Some(h) => h,
            None => base,
        }
    }

    /// Which side and engine a concrete model name refers to.
    fn locate(&self, model: &str) -> Result<Option<(Side, usize)>, ApiError> {
        if model == self.policy.virtual_model {
            return Ok(None);
        }
        if let Some(i) = self.locals.iter().position(|l| l.model_id() == model) {
            return Ok(Some((Side::Local, i)));
        }
        if let Some(i) = self
            .clouds
            .iter()
            .position(|c| c.config().models.iter().any(|m| m == model))
        {
            return Ok(Some((Side::Cloud, i)));
        }
        Err(ApiError::model_not_found(model))
    }

    fn pii_classes(&self, req: &GenerateRequest) -> Vec<String> {
        let mut classes: Vec<String> = Vec::new();
        let mut add = |text: &str| {
            for f in self.detector.find(text) {
                if !classes.contains(&f.class) {
                    classes.push(f.class);
                }
            }
        };
        for part in req.input.text_parts() {
            add(part);
        }
        fn strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::String(s) => out.push(s),
                serde_json::Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
                serde_json::Value::Object(o) => o.values().for_each(|x| strings(x, out)),
                _ => {}
            }
        }
        let mut extra = Vec::new();
        for v in req.extra.values() {
            strings(v, &mut extra);
        }
        for s in extra {
            add(s);
        }
        classes
    }

    fn prompt_tokens(&self, req: &GenerateRequest, local: Option<&LocalEngine>) -> u32 {
        if let Some(l) = local
            && let Ok(text) = l.render(&req.input)
        {
            return l.count_tokens(&text) as u32;
        }
        // About four characters a token for English text.
        let chars: usize = req.input.text_parts().iter().map(|p| p.len()).sum();
        (chars / 4) as u32 + 8
    }

    /// The cloud upstream a request would use, if any.
    fn cloud_candidate(&self, named: Option<(Side, usize)>) -> Option<usize> {
        if let Some((Side::Cloud, i)) = named {
            return Some(i);
        }
        if self.clouds.is_empty() {
            return None;
        }
        self.clouds
            .iter()
            .position(|c| c.breaker().is_available() && self.hub.reachable(&c.config().name))
            .or(Some(0))
    }

    fn view(
        &self,
        local: Option<&LocalEngine>,
        cloud: Option<usize>,
        caller: Option<&Caller>,
    ) -> View {
        let speed = *self.local_speed.lock().unwrap_or_else(|p| p.into_inner());
        let local = local.map_or_else(LocalView::default, |l| {
            let s = l.stats();
            self.metrics.local_active.set(s.active as i64);
            self.metrics.local_queued.set(s.queued as i64);
            LocalView {
                available: true,
                model: l.model_id().to_owned(),
                context_length: l.context_length(),
                active: s.active,
                queued: s.queued,
                capacity: s.parallel,
                prefill_tps: speed.prefill_tps,
                decode_tps: speed.decode_tps,
            }
        });
        let network = self.hub.network();
        let cloud = cloud.map(|i| {
            let c = &self.clouds[i];
            let cfg = c.config();
            let lat = c.latency();
            let probe = network.upstreams.get(&cfg.name);
            CloudView {
                name: cfg.name.clone(),
                model: c.upstream_model(&self.policy.virtual_model),
                available: self.hub.reachable(&cfg.name),
                breaker_open: !c.breaker().is_available(),
                context_length: cfg.context_length,
                price_input_per_mtok: cfg.price_input_per_mtok,
                price_output_per_mtok: cfg.price_output_per_mtok,
                rtt_ms: probe.and_then(|p| p.rtt_ms),
                ttft_ms: lat.ttft_ms,
                decode_tps: lat.tokens_per_s,
            }
        });
        let key = caller.map(|c| c.config.name.as_str());
        let (today, key_today) = self.spend.today(key);
        View {
            local,
            cloud,
            device: self.hub.device(),
            network,
            spend: Spend {
                today_usd: today,
                budget_usd: self.policy.daily_budget_usd,
                key_today_usd: key_today,
                key_budget_usd: caller.and_then(|c| c.config.daily_budget_usd),
            },
        }
    }

    /// Everything the policy needs, gathered once per request.
    fn plan(&self, req: &GenerateRequest, ctx: &RequestContext) -> Result<Plan, ApiError> {
        let named = self.locate(&req.model)?;
        let local = match named {
            Some((Side::Local, i)) => self.locals.get(i),
            Some((Side::Cloud, _)) => None,
            None => self.locals.first(),
        };
        let cloud = match named {
            Some((Side::Local, _)) => None,
            _ => self.cloud_candidate(named),
        };
        let mode = self.privacy_mode(ctx);
        let pii = if mode == PrivacyMode::Off {
            Vec::new()
        } else {
            self.pii_classes(req)
        };
        let features = Features {
            named: named.map(|(s, _)| s),
            privacy: Some(mode),
            pii,
            // A request named for the cloud needs no exact local count.
            prompt_tokens: self.prompt_tokens(
                req,
                if cloud.is_some() && local.is_none() {
                    None
                } else {
                    local
                },
            ),
            max_tokens: req.max_tokens,
            needs: local_needs(req),
            latency_goal_ms: ctx.latency_goal_ms,
            difficulty: None,
            difficulty_threshold: None,
            quality: ctx.quality,
        };
        let view = self.view(local, cloud, ctx.caller.as_deref());
        Ok(Plan {
            features,
            view,
            named,
            cloud,
        })
    }

    /// Decides without generating.
    pub fn explain(
        &self,
        req: &GenerateRequest,
        ctx: &RequestContext,
    ) -> Result<Explanation, ApiError> {
        let t0 = Instant::now();
        let Plan {
            mut features,
            view,
            named,
            cloud,
        } = self.plan(req, ctx)?;
        if named.is_none()
            && !self.clouds.is_empty()
            && let Some(scorer) = self.scorer()
            && let Some(e) = &self.embedder
            && let Some(text) = crate::learned::routed_text(&req.input)
        {
            match e.embed_one(text) {
                Ok(v) => {
                    features.difficulty = Some(scorer.score(&v, text));
                    features.difficulty_threshold = scorer.threshold(ctx.quality);
                }
                Err(err) => tracing::warn!("router embedding failed: {err}"),
            }
        }
        let result = decide(&features, &view, &self.policy);
        let decision_us = t0.elapsed().as_micros() as u64;
        Ok(match result {
            Ok(d) => {
                let (backend, model) = self.target(d.side, named, cloud, req);
                Explanation {
                    backend: Some(backend),
                    model: Some(model),
                    decision: Some(d),
                    refusal: None,
                    features,
                    view,
                    decision_us,
                }
            }
            Err(r) => Explanation {
                backend: None,
                model: None,
                decision: None,
                refusal: Some(r.message()),
                features,
                view,
                decision_us,
            },
        })
    }

    fn local_index(&self, named: Option<(Side, usize)>) -> usize {
        match named {
            Some((Side::Local, i)) => i,
            _ => 0,
        }
    }

    fn target(
        &self,
        side: Side,
        named: Option<(Side, usize)>,
        cloud: Option<usize>,
        req: &GenerateRequest,
    ) -> (String, String) {
        match side {
            Side::Local => (
                "local".into(),
                self.locals[self.local_index(named)].model_id().to_owned(),
            ),
            Side::Cloud => {
                let c = &self.clouds[cloud.unwrap_or(0)];
                (
                    format!("cloud:{}", c.config().name),
                    c.upstream_model(&req.model),
                )
            }
        }
    }

    /// Places the request and starts the answer.
    pub async fn dispatch(
        self: &Arc<Self>,
        req: GenerateRequest,
        ctx: RequestContext,
    ) -> Result<Dispatched, ApiError> {
        let t0 = Instant::now();
        let Plan {
            mut features,
            view,
            named,
            cloud,
        } = self.plan(&req, &ctx)?;
        let local_i = self.local_index(named);
        let cloud_i = cloud.unwrap_or(0);
        let cascade = named.is_none() && ctx.cascade.unwrap_or(self.policy.cascade);

        // The router and the cache judge one embedding of the last user
        // message; prompts with personal data are kept out of the cache.
        // With no cloud to send it to, a difficulty score changes nothing.
        let scorer = if named.is_none() && !self.clouds.is_empty() {
            self.scorer()
        } else {
            None
        };
        let mut cache_state = None;
        let cache_key = match &self.cache {
            Some(c) if c.config().enabled && self.embedder.is_some() => {
                // With privacy off the policy skips the detector; the cache
                // still must not keep personal data on disk.
                let private = if features.privacy == Some(PrivacyMode::Off) {
                    !self.pii_classes(&req).is_empty()
                } else {
                    !features.pii.is_empty()
                };
                let key = (!ctx.cache_skip && !private)
                    .then(|| {
                        let mode = features.privacy.unwrap_or(self.policy.privacy);
                        let name = ctx.caller.as_ref().map(|c| c.config.name.as_str());
                        CacheKey::new(&req, name, mode.as_str())
                    })
                    .flatten();
                if key.is_none() {
                    cache_state = Some("skip".to_owned());
                    self.count_cache("skip");
                }
                key
            }
            _ => None,
        };
        let text = cache_key.as_ref().map(|k| k.text().to_owned()).or_else(|| {
            scorer
                .as_ref()
                .and_then(|_| crate::learned::routed_text(&req.input).map(str::to_owned))
        });
        let mut early: Option<Leg> = None;
        let embedding = match (text, self.embedder.clone()) {
            (Some(text), Some(e)) => {
                let job = tokio::task::spawn_blocking(move || e.embed_one(&text));
                // Local generation starts while the router thinks when the
                // rules so far keep the request here; a cloud decision or a
                // cache hit drops it (and the engine frees its slot).
                if scorer.is_some()
                    && !cascade
                    && matches!(decide(&features, &view, &self.policy), Ok(d) if d.side == Side::Local)
                {
                    early = self
                        .start_leg(Side::Local, &req, &ctx, false, local_i, cloud_i)
                        .await
                        .ok();
                }
                match job.await {
                    Ok(Ok(v)) => Some(v),
                    Ok(Err(err)) => {
                        tracing::warn!("embedding for routing failed: {err}");
                        None
                    }
                    Err(_) => None,
                }
            }
            _ => None,
        };
        if let (Some(cache), Some(key), Some(v)) = (&self.cache, &cache_key, &embedding) {
            if let Some(hit) = cache.lookup(key, v) {
                self.count_cache("hit");
                return Ok(self.serve_cached(hit, req, ctx, t0));
            }
            cache_state = Some("miss".to_owned());
            self.count_cache("miss");
        }
        if let (Some(s), Some(v), Some(text)) =
            (&scorer, &embedding, crate::learned::routed_text(&req.input))
        {
            features.difficulty = Some(s.score(v, text));
            features.difficulty_threshold = s.threshold(ctx.quality);
        }
        let difficulty = features.difficulty.map(|d| {
            let t = features.difficulty_threshold.unwrap_or_else(|| {
                crate::policy::threshold_for_quality(
                    self.policy.difficulty_threshold,
                    ctx.quality.unwrap_or(0.5),
                )
            });
            (d, t)
        });
        let decision = match decide(&features, &view, &self.policy) {
            Ok(d) => d,
            Err(r) => {
                self.metrics
                    .refused
                    .get_or_create(&OutcomeLabels {
                        outcome: r.code.into(),
                    })
                    .inc();
                let mut e = ApiError::new(
                    r.status,
                    match r.status {
                        403 => tandem_api::ErrorKind::PermissionError,
                        429 => tandem_api::ErrorKind::RateLimitError,
                        503 => tandem_api::ErrorKind::ServiceUnavailable,
                        _ => tandem_api::ErrorKind::InvalidRequestError,
                    },
                    r.message(),
                );
                e.code = Some(r.code.into());
                return Err(e);
            }
        };
        let store = cache_key.zip(embedding);
        if cascade && decision.side == Side::Local && decision.fallback == Some(Side::Cloud) {
            let decision_us = t0.elapsed().as_micros() as u64;
            let prompt_estimate = features.prompt_tokens;
            return self
                .cascade(
                    req,
                    ctx,
                    decision,
                    Placement {
                        local_i,
                        cloud_i,
                        t0,
                        decision_us,
                        prompt_estimate,
                        difficulty,
                        cache_state,
                        store,
                    },
                )
                .await;
        }
        let decision_us = t0.elapsed().as_micros() as u64;
        let prompt_estimate = features.prompt_tokens;

        let mut failover = None;
        let mut speculative = None;
        if ctx.speculative.unwrap_or(self.speculative.default) {
            let why_not = if decision.side != Side::Cloud {
                Some("the request is placed on the device".to_owned())
            } else if self.locals.get(local_i).is_none() {
                Some("there is no local model to draft with".to_owned())
            } else {
                crate::speculative::ineligible(&req).map(|r| format!("{r} are not supported"))
            };
            speculative = Some(why_not.map_or_else(|| "on".to_owned(), |w| format!("off: {w}")));
        }
        let spec = speculative.as_deref() == Some("on");
        // A local start the decision did not keep stops here, before the
        // other side is contacted.
        let first = match early.filter(|_| decision.side == Side::Local) {
            Some(leg) => Ok(leg),
            None if spec => {
                match self
                    .start_spec(&req, &ctx, decision.redact, local_i, cloud_i)
                    .await
                {
                    // An upstream without the verification endpoint (any
                    // OpenAI-compatible server but Tandem) answers as usual.
                    Err(e)
                        if matches!(e.status, 404 | 405)
                            && e.code.as_deref() != Some("model_not_found") =>
                    {
                        speculative = Some(
                            "off: the upstream does not verify drafts (it is not a Tandem)"
                                .to_owned(),
                        );
                        self.start_leg(Side::Cloud, &req, &ctx, decision.redact, local_i, cloud_i)
                            .await
                    }
                    other => other,
                }
            }
            None => {
                self.start_leg(decision.side, &req, &ctx, decision.redact, local_i, cloud_i)
                    .await
            }
        };
        let leg = match (first, decision.fallback) {
            (Ok(leg), _) => leg,
            (Err(e), Some(fb)) if !e.is_client_error() || e.status == 429 => {
                let cause = e.message.clone();
                tracing::info!(
                    from = decision.side.as_str(),
                    to = fb.as_str(),
                    "failover: {cause}"
                );
                self.metrics
                    .failovers
                    .get_or_create(&MoveLabels {
                        from: decision.side.as_str().into(),
                        to: fb.as_str().into(),
                        cause: short_cause(&e),
                    })
                    .inc();
                failover = Some(format!(
                    "{} -> {}: {cause}",
                    decision.side.as_str(),
                    fb.as_str()
                ));
                let redact = fb == Side::Cloud && decision.redact;
                self.start_leg(fb, &req, &ctx, redact, local_i, cloud_i)
                    .await
                    .map_err(|e2| {
                        let mut e2 = e2;
                        e2.message = format!("{} (after: {cause})", e2.message);
                        e2
                    })?
            }
            (Err(e), _) => return Err(e),
        };
        if spec && !leg.spec && speculative.as_deref() == Some("on") {
            speculative = Some("off: the cloud could not be reached".to_owned());
        }
        let (backend, model) = match leg.side {
            Side::Local => (
                "local".to_owned(),
                self.locals[local_i].model_id().to_owned(),
            ),
            Side::Cloud => (
                leg.label.clone(),
                self.clouds[cloud_i].upstream_model(&req.model),
            ),
        };
        let route = RouteInfo {
            backend,
            model,
            redacted: leg
                .cloud
                .as_ref()
                .map(|c| c.redacted.clone())
                .unwrap_or_default(),
            decision: decision.clone(),
            failover: failover.clone(),
            decision_us,
            difficulty,
            cache: cache_state,
            cascade: None,
            speculative,
        };
        let reason = if failover.is_some() {
            "failover"
        } else if leg.spec {
            "speculative"
        } else {
            decision.decided_by
        };
        let sup = Supervision {
            req,
            ctx,
            // A speculative answer falls back to the device by itself.
            fallback: decision
                .fallback
                .filter(|_| failover.is_none() && !leg.spec),
            redact: decision.redact,
            local_i,
            cloud_i,
            reason,
            t0,
            prompt_estimate,
        };
        Ok(self.run_leg(leg, sup, route, store))
    }

    /// Supervises the leg and, when the answer is one to keep, tees it
    /// into the cache.
    fn run_leg(
        self: &Arc<Self>,
        leg: Leg,
        sup: Supervision,
        route: RouteInfo,
        store: Option<(CacheKey, Vec<f32>)>,
    ) -> Dispatched {
        let keep = leg.side == Side::Cloud
            || self
                .cache
                .as_ref()
                .is_some_and(|c| c.config().local_answers);
        let store = store.filter(|_| keep);
        let stream = self.supervise(leg, sup);
        let stream = self.keep_answer(stream, store, route.backend.clone(), route.model.clone());
        Dispatched { stream, route }
    }

    fn count_cache(&self, outcome: &str) {
        self.metrics
            .cache
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// Answers from the cache: one piece of text, then the finish.
    fn serve_cached(
        &self,
        hit: Cached,
        req: GenerateRequest,
        ctx: RequestContext,
        t0: Instant,
    ) -> Dispatched {
        let detail = format!(
            "a prompt this close (similarity {:.3}) was answered before by {}",
            hit.similarity, hit.backend
        );
        let route = RouteInfo {
            backend: "cache".into(),
            model: hit.model.clone(),
            decision: Decision {
                side: Side::Local,
                fallback: None,
                redact: false,
                reasons: vec![crate::policy::Reason {
                    rule: "cache",
                    effect: "decided",
                    side: Side::Local,
                    detail,
                }],
                decided_by: "cache",
            },
            redacted: BTreeMap::new(),
            failover: None,
            decision_us: t0.elapsed().as_micros() as u64,
            difficulty: None,
            cache: Some(format!("hit {:.3}", hit.similarity)),
            cascade: None,
            speculative: None,
        };
        self.metrics
            .requests
            .get_or_create(&RouteLabels {
                backend: "cache".into(),
                reason: "cache".into(),
            })
            .inc();
        let _ = (req, ctx);
        let events = vec![
            Ok(Event::Delta(tandem_api::Delta {
                text: hit.text,
                tokens: Vec::new(),
            })),
            Ok(Event::Finish(Finish {
                reason: hit.finish,
                usage: hit.usage,
            })),
        ];
        Dispatched {
            stream: Box::pin(futures::stream::iter(events)),
            route,
        }
    }

    /// Passes the answer through and keeps it in the cache once it ends.
    fn keep_answer(
        self: &Arc<Self>,
        stream: EventStream,
        store: Option<(CacheKey, Vec<f32>)>,
        backend: String,
        model: String,
    ) -> EventStream {
        let (Some((key, embedding)), Some(cache)) = (store, self.cache.clone()) else {
            return stream;
        };
        Box::pin(async_stream::stream! {
            let mut stream = stream;
            let mut text = String::new();
            while let Some(event) = stream.next().await {
                match &event {
                    Ok(Event::Delta(d)) => text.push_str(&d.text),
                    Ok(Event::Finish(f)) => {
                        cache.insert(&key, embedding.clone(), Cached {
                            text: std::mem::take(&mut text),
                            finish: f.reason,
                            usage: f.usage,
                            backend: backend.clone(),
                            model: model.clone(),
                            similarity: 1.0,
                        });
                    }
                    Err(_) => {}
                }
                yield event;
            }
        })
    }

    /// The local model answers first; the answer reaches the client only if
    /// its confidence (mean token log-probability) passes the threshold,
    /// otherwise the cloud answers.
    async fn cascade(
        self: &Arc<Self>,
        req: GenerateRequest,
        ctx: RequestContext,
        decision: Decision,
        p: Placement,
    ) -> Result<Dispatched, ApiError> {
        let mut local_req = req.clone();
        let client_logprobs = req.logprobs.is_some();
        local_req.logprobs.get_or_insert(LogprobRequest { top: 0 });
        let threshold = self.policy.cascade_threshold;
        let local = match self
            .start_leg(Side::Local, &local_req, &ctx, false, p.local_i, p.cloud_i)
            .await
        {
            Ok(leg) => Answer::collect(leg.stream).await,
            Err(e) => Err(e),
        };
        let confidence = local.as_ref().ok().map(|a| confidence(&a.tokens));
        let keep = confidence.is_some_and(|c| c >= threshold);
        let mut outcome = match confidence {
            Some(c) if keep => format!("kept: confidence {c:.3} >= {threshold:.3}"),
            Some(c) => format!("escalated: confidence {c:.3} < {threshold:.3}"),
            None => "escalated: the local model failed".to_owned(),
        };
        let mut failover = None;
        let leg = if keep {
            None
        } else {
            match self
                .start_leg(
                    Side::Cloud,
                    &req,
                    &ctx,
                    decision.redact,
                    p.local_i,
                    p.cloud_i,
                )
                .await
            {
                Ok(leg) => Some(leg),
                Err(e) if local.is_ok() => {
                    failover = Some(format!("cloud -> local: {}", e.message));
                    outcome = format!("{outcome}; the cloud failed, so the local answer stands");
                    None
                }
                Err(e) => return Err(e),
            }
        };
        self.metrics
            .cascade
            .get_or_create(&OutcomeLabels {
                outcome: if leg.is_some() { "escalated" } else { "kept" }.into(),
            })
            .inc();
        let (leg, fallback) = match leg {
            Some(leg) => (leg, Some(Side::Local)),
            None => {
                let a = local?;
                let tokens = if client_logprobs {
                    a.tokens
                } else {
                    Vec::new()
                };
                let events = vec![
                    Ok(Event::Delta(tandem_api::Delta {
                        text: a.text,
                        tokens,
                    })),
                    Ok(Event::Finish(a.finish)),
                ];
                (
                    Leg {
                        side: Side::Local,
                        label: "local".into(),
                        stream: Box::pin(futures::stream::iter(events)),
                        restorer: None,
                        cloud: None,
                        spec: false,
                    },
                    None,
                )
            }
        };
        let (backend, model) = match leg.side {
            Side::Local => (
                "local".to_owned(),
                self.locals[p.local_i].model_id().to_owned(),
            ),
            Side::Cloud => (
                leg.label.clone(),
                self.clouds[p.cloud_i].upstream_model(&req.model),
            ),
        };
        let route = RouteInfo {
            backend,
            model,
            redacted: leg
                .cloud
                .as_ref()
                .map(|c| c.redacted.clone())
                .unwrap_or_default(),
            decision: decision.clone(),
            failover,
            decision_us: p.decision_us,
            difficulty: p.difficulty,
            cache: p.cache_state,
            cascade: Some(outcome),
            speculative: None,
        };
        let sup = Supervision {
            req,
            ctx,
            fallback,
            redact: decision.redact,
            local_i: p.local_i,
            cloud_i: p.cloud_i,
            reason: "cascade",
            t0: p.t0,
            prompt_estimate: p.prompt_estimate,
        };
        Ok(self.run_leg(leg, sup, route, p.store))
    }

    /// Drafts on the device and verifies in the cloud (see
    /// [`crate::speculative`]).
    async fn start_spec(
        self: &Arc<Self>,
        req: &GenerateRequest,
        ctx: &RequestContext,
        redact: bool,
        local_i: usize,
        cloud_i: usize,
    ) -> Result<Leg, ApiError> {
        let engine = self
            .locals
            .get(local_i)
            .ok_or_else(|| ApiError::unavailable("no local model is loaded"))?
            .clone();
        let cloud = self
            .clouds
            .get(cloud_i)
            .ok_or_else(|| ApiError::unavailable("no cloud upstream is configured"))?;
        let label = format!("cloud:{}", cloud.config().name);
        let (out, redaction) = self.outgoing(req, redact);
        let stream = crate::speculative::start(crate::speculative::SpecJob {
            disp: self.clone(),
            engine,
            cloud_i,
            req: out,
            redacted: redaction.classes.clone(),
            request_id: ctx.request_id.clone(),
            key: ctx.caller.as_ref().map(|c| c.config.name.clone()),
        })
        .await?;
        Ok(Leg {
            side: Side::Cloud,
            label,
            stream,
            restorer: (!redaction.is_empty()).then(|| redaction.restorer()),
            cloud: None,
            spec: true,
        })
    }

    /// The request as it may leave the device, and what was taken out.
    fn outgoing(&self, req: &GenerateRequest, redact: bool) -> (GenerateRequest, Redaction) {
        let mut out = req.clone();
        let mut redaction = Redaction::default();
        if redact {
            self.redact(&mut out, &mut redaction);
        }
        for (class, n) in &redaction.classes {
            self.metrics
                .redactions
                .get_or_create(&ClassLabels {
                    class: class.clone(),
                })
                .inc_by(u64::from(*n));
        }
        (out, redaction)
    }

    async fn start_leg(
        self: &Arc<Self>,
        side: Side,
        req: &GenerateRequest,
        ctx: &RequestContext,
        redact: bool,
        local_i: usize,
        cloud_i: usize,
    ) -> Result<Leg, ApiError> {
        match side {
            Side::Local => {
                let engine = self
                    .locals
                    .get(local_i)
                    .ok_or_else(|| ApiError::unavailable("no local model is loaded"))?;
                let mut local_req = req.clone();
                local_req.model = engine.model_id().to_owned();
                let stream = engine.submit(local_req)?;
                Ok(Leg {
                    side,
                    label: "local".into(),
                    stream,
                    restorer: None,
                    cloud: None,
                    spec: false,
                })
            }
            Side::Cloud => {
                let cloud = self
                    .clouds
                    .get(cloud_i)
                    .ok_or_else(|| ApiError::unavailable("no cloud upstream is configured"))?;
                let (out, redaction) = self.outgoing(req, redact);
                let (result, exchange) = cloud.start(out).await;
                let mut leg = CloudLeg {
                    disp: self.clone(),
                    upstream: cloud_i,
                    exchange,
                    redacted: redaction.classes.clone(),
                    request_id: ctx.request_id.clone(),
                    key: ctx.caller.as_ref().map(|c| c.config.name.clone()),
                    deltas: 0,
                    recorded: false,
                };
                match result {
                    Ok(stream) => Ok(Leg {
                        side,
                        label: format!("cloud:{}", cloud.config().name),
                        stream,
                        restorer: (!redaction.is_empty()).then(|| redaction.restorer()),
                        cloud: Some(leg),
                        spec: false,
                    }),
                    Err(e) => {
                        // Nothing was sent if the request was refused locally
                        // (attempts == 0); otherwise it left and is recorded.
                        if leg
                            .exchange
                            .attempts
                            .load(std::sync::atomic::Ordering::Relaxed)
                            > 0
                        {
                            leg.settle(&format!("error: {}", e.message), None);
                        } else {
                            leg.recorded = true;
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn redact(&self, req: &mut GenerateRequest, r: &mut Redaction) {
        if let Input::Chat {
            messages,
            continue_from,
        } = &mut req.input
        {
            for m in messages.iter_mut() {
                m.content = r.redact(&self.detector, &m.content);
            }
            if let Some(c) = continue_from {
                *c = r.redact(&self.detector, c);
            }
        } else if let Input::Text(t) = &mut req.input {
            *t = r.redact(&self.detector, t);
        }
        for v in req.extra.values_mut() {
            r.redact_json(&self.detector, v);
        }
    }

    fn record_egress(&self, leg: &CloudLeg, outcome: &str, usage: Option<Usage>) -> f64 {
        let cfg = self.clouds[leg.upstream].config();
        let (prompt, completion) = match usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens),
            None => (0, leg.deltas),
        };
        let cost = if usage.is_some() || leg.deltas > 0 {
            cfg.cost(prompt, completion)
        } else {
            0.0
        };
        self.spend.add(leg.key.as_deref(), cost);
        self.metrics.cost_usd.inc_by(cost);
        self.metrics.count_tokens("cloud", prompt, completion);
        if let Some(l) = &self.ledger {
            use std::sync::atomic::Ordering::Relaxed;
            l.record(Egress {
                request_id: leg.request_id.clone(),
                key: leg.key.clone(),
                upstream: leg.exchange.upstream.clone(),
                model: leg.exchange.model.clone(),
                payload_sha256: leg.exchange.payload_sha256.clone(),
                bytes_out: leg.exchange.bytes_out.load(Relaxed),
                bytes_in: leg.exchange.bytes_in.load(Relaxed),
                redacted: leg.redacted.clone(),
                attempts: leg.exchange.attempts.load(Relaxed),
                outcome: outcome.to_owned(),
                prompt_tokens: prompt,
                completion_tokens: completion,
                cost_usd: cost,
            });
        }
        cost
    }

    fn observe_local(&self, prompt: u32, completion: u32, ttft: Duration, total: Duration) {
        let mut s = self.local_speed.lock().unwrap_or_else(|p| p.into_inner());
        let ewma = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| 0.8 * o + 0.2 * new));
        if prompt > 16 && ttft > Duration::ZERO {
            s.prefill_tps = ewma(s.prefill_tps, f64::from(prompt) / ttft.as_secs_f64());
        }
        if completion > 1 && total > ttft {
            s.decode_tps = ewma(
                s.decode_tps,
                f64::from(completion - 1) / (total - ttft).as_secs_f64(),
            );
        }
    }

    fn supervise(self: &Arc<Self>, leg: Leg, sup: Supervision) -> EventStream {
        let disp = self.clone();
        Box::pin(async_stream::stream! {
            let mut leg = leg;
            let mut text = String::new();
            let mut first_at: Option<Duration> = None;
            let mut handed_off = false;
            let mut earlier_tokens = 0u32;
            loop {
                let event = leg.stream.next().await;
                match event {
                    Some(Ok(Event::Delta(mut d))) => {
                        if let Some(c) = leg.cloud.as_mut() {
                            c.deltas += 1;
                        }
                        if let Some(r) = leg.restorer.as_mut() {
                            d.text = r.push(&d.text);
                        }
                        if d.text.is_empty() && d.tokens.is_empty() {
                            continue;
                        }
                        first_at.get_or_insert_with(|| sup.t0.elapsed());
                        text.push_str(&d.text);
                        yield Ok(Event::Delta(d));
                    }
                    Some(Ok(Event::Finish(f))) => {
                        if let Some(r) = leg.restorer.as_mut() {
                            let rest = r.finish();
                            if !rest.is_empty() {
                                text.push_str(&rest);
                                yield Ok(Event::Delta(tandem_api::Delta { text: rest, tokens: vec![] }));
                            }
                        }
                        let mut usage = f.usage;
                        usage.completion_tokens = usage.completion_tokens.saturating_add(earlier_tokens);
                        usage.total_tokens = usage.prompt_tokens.saturating_add(usage.completion_tokens);
                        disp.account(&mut leg, &sup, f.usage, first_at, handed_off);
                        yield Ok(Event::Finish(Finish { reason: f.reason, usage }));
                        return;
                    }
                    broke => {
                        let e = match broke {
                            Some(Err(e)) => e,
                            _ => ApiError::bad_gateway("the answer ended without finishing"),
                        };
                        let to = sup.fallback.filter(|_| !handed_off).filter(|&fb| match fb {
                            Side::Local => !disp.locals.is_empty(),
                            Side::Cloud => disp.clouds.get(sup.cloud_i).is_some_and(|c| {
                                c.config().continuation == Continuation::Prefill || text.is_empty()
                            }),
                        });
                        let Some(to) = to else {
                            if let Some(c) = leg.cloud.as_mut() {
                                c.settle(&format!("error: {}", e.message), None);
                            }
                            yield Err(e);
                            return;
                        };
                        // Hand the answer over: the other side continues from
                        // the text the client already has.
                        let mut next_req = sup.req.clone();
                        if let Input::Chat { continue_from, .. } = &mut next_req.input {
                            let mut prefix = continue_from.clone().unwrap_or_default();
                            prefix.push_str(&text);
                            *continue_from = (!prefix.is_empty()).then_some(prefix);
                        } else if let Input::Text(t) = &mut next_req.input {
                            t.push_str(&text);
                        }
                        if let Some(m) = next_req.max_tokens.as_mut() {
                            let used = leg.cloud.as_ref().map_or(0, |c| c.deltas).max(text.len() as u32 / 4);
                            *m = m.saturating_sub(used).max(1);
                        }
                        let from = leg.side;
                        earlier_tokens = earlier_tokens.saturating_add(
                            leg.cloud.as_ref().map_or(text.len() as u32 / 4, |c| c.deltas),
                        );
                        if let Some(c) = leg.cloud.as_mut() {
                            c.settle(&format!("handoff to {}: {}", to.as_str(), e.message), None);
                        }
                        let redact = to == Side::Cloud && sup.redact;
                        match disp.start_leg(to, &next_req, &sup.ctx, redact, sup.local_i, sup.cloud_i).await {
                            Ok(next) => {
                                tracing::info!(from = from.as_str(), to = to.as_str(), chars = text.len(), "handoff: {}", e.message);
                                disp.metrics.handoffs.get_or_create(&MoveLabels {
                                    from: from.as_str().into(),
                                    to: to.as_str().into(),
                                    cause: short_cause(&e),
                                }).inc();
                                handed_off = true;
                                leg = next;
                            }
                            Err(e2) => {
                                yield Err(ApiError::bad_gateway(format!(
                                    "{}; handing the answer to the {} failed too: {}",
                                    e.message, to.as_str(), e2.message
                                )));
                                return;
                            }
                        }
                    }
                }
            }
        })
    }

    fn account(
        &self,
        leg: &mut Leg,
        sup: &Supervision,
        usage: Usage,
        first_at: Option<Duration>,
        handed_off: bool,
    ) {
        let total = sup.t0.elapsed();
        let label = BackendLabels {
            backend: leg.label.clone(),
        };
        if let Some(ttft) = first_at {
            self.metrics
                .ttft
                .get_or_create(&label)
                .observe(ttft.as_secs_f64());
        }
        self.metrics
            .duration
            .get_or_create(&label)
            .observe(total.as_secs_f64());
        self.metrics
            .requests
            .get_or_create(&RouteLabels {
                backend: leg.label.clone(),
                reason: if handed_off { "handoff" } else { sup.reason }.into(),
            })
            .inc();
        match leg.cloud.as_mut() {
            Some(c) => {
                c.settle(
                    if handed_off {
                        "ok (after handoff)"
                    } else {
                        "ok"
                    },
                    Some(usage),
                );
            }
            // The drafting task accounts for both sides itself.
            None if leg.spec => {}
            None => {
                self.metrics
                    .count_tokens("local", usage.prompt_tokens, usage.completion_tokens);
                // What the same answer would have cost in the cloud.
                if let Some(c) = self.clouds.get(sup.cloud_i).filter(|_| !handed_off) {
                    let saved = c.config().cost(
                        usage.prompt_tokens.max(sup.prompt_estimate),
                        usage.completion_tokens,
                    );
                    self.metrics.cost_saved_usd.inc_by(saved);
                }
                if let Some(ttft) = first_at
                    && !handed_off
                {
                    self.observe_local(usage.prompt_tokens, usage.completion_tokens, ttft, total);
                }
            }
        }
    }
}

/// What [`Dispatcher::plan`] gathers for one request.
/// Where a request was placed, carried into the cascade.
struct Placement {
    local_i: usize,
    cloud_i: usize,
    t0: Instant,
    decision_us: u64,
    prompt_estimate: u32,
    difficulty: Option<(f32, f32)>,
    cache_state: Option<String>,
    store: Option<(CacheKey, Vec<f32>)>,
}

/// Mean log-probability of the answer's tokens: how sure the model was.
pub fn confidence(tokens: &[tandem_api::TokenLogprob]) -> f32 {
    if tokens.is_empty() {
        return f32::NEG_INFINITY;
    }
    tokens.iter().map(|t| t.logprob).sum::<f32>() / tokens.len() as f32
}

struct Plan {
    features: Features,
    view: View,
    /// The side and engine a concrete model name points at.
    named: Option<(Side, usize)>,
    /// The cloud upstream this request would use.
    cloud: Option<usize>,
}

struct Supervision {
    req: GenerateRequest,
    ctx: RequestContext,
    fallback: Option<Side>,
    redact: bool,
    local_i: usize,
    cloud_i: usize,
    reason: &'static str,
    t0: Instant,
    prompt_estimate: u32,
}

/// A short label for metrics (bounded cardinality).
pub(crate) fn short_cause(e: &ApiError) -> String {
    match (e.status, e.code.as_deref()) {
        (504, _) => "timeout".into(),
        (429, _) => "rate_limited".into(),
        (503, Some("overloaded")) => "unavailable".into(),
        (s, _) if s >= 500 => "upstream_error".into(),
        _ => "refused".into(),
    }
}
