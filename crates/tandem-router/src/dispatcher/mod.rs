//! Carrying out decisions. [`Dispatcher::dispatch`] gathers what the policy
//! needs ([`plan`]), asks it, and starts the answer on the chosen side in
//! the requested mode: routed ([`leg`]: failover before the first token,
//! handoff after it, redaction and restoration), cascaded ([`cascade`]),
//! or speculative ([`crate::speculative`]). Answers may come from and go to
//! the semantic cache ([`cached`]). What leaves the device is accounted by
//! [`crate::egress`].
//!
//! Backends are held only through [`tandem_api::Backend`], so the
//! dispatcher is tested with scripted backends and no model.

mod builder;
mod cached;
mod cascade;
mod leg;
mod plan;
mod route;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_api::{ApiError, Backend, ErrorKind, GenerateRequest, Locality, SessionModel};
use tandem_embed::Embedder;
use tandem_ledger::Ledger;
use tandem_policy::privacy::Detector;
use tandem_policy::share::ShareHold;
use tandem_policy::{Decision, PolicyConfig, RefusalKind, Scorer, decide};

use crate::access::Access;
use crate::activity::Activity;
use crate::cache::SemanticCache;
use crate::egress::Egress;
use crate::learned::RouterInput;
use crate::memory::OutcomeMemory;
use crate::metrics::{Metrics, OutcomeLabels};
use crate::shared::Shared;
use crate::signals::SignalHub;
use crate::speculative::{SpeculativeConfig, Verifier};

pub use builder::DispatcherBuilder;
use leg::Supervision;
use plan::{Checked, Plan};
pub use route::{
    CacheOutcome, Dispatched, Explanation, Mode, RequestContext, RouteInfo, ShareState, Speculation,
};

/// Measured speed of the local model, for the latency rule.
#[derive(Debug, Default, Clone, Copy)]
struct Speed {
    prefill_tps: Option<f64>,
    decode_tps: Option<f64>,
}

/// The embedder and what reads it: the learned router and the cache.
struct Semantics {
    embedder: Option<(String, Arc<Embedder>)>,
    /// Embedding jobs run at once; the rest wait their turn instead of
    /// each taking a blocking thread and the cores.
    embed_slots: tokio::sync::Semaphore,
    scorer: Mutex<Option<(Arc<dyn Scorer>, RouterInput)>>,
    cache: Option<Arc<SemanticCache>>,
    memory: Option<Arc<OutcomeMemory>>,
    /// Routed prompts kept for labelling (`[router.sample]`).
    sample: Option<Arc<crate::sample::TrafficSample>>,
    /// The cloud share held online (`[router] cloud_share`).
    hold: Option<Mutex<ShareHold>>,
}

/// Places requests and carries the decisions out. Build one with
/// [`Dispatcher::builder`]; share it as `Arc<Dispatcher>`.
pub struct Dispatcher {
    locals: Vec<Arc<dyn Backend>>,
    clouds: Vec<Arc<dyn Backend>>,
    /// The local models that hold KV sessions (verification, drafting).
    sessions: Vec<Arc<dyn SessionModel>>,
    hub: SignalHub,
    detector: Detector,
    /// The detector runs a model: scans go off the async workers.
    detector_runs_model: bool,
    policy: PolicyConfig,
    egress: Arc<Egress>,
    access: Access,
    local_speed: Mutex<Speed>,
    semantics: Semantics,
    speculative: SpeculativeConfig,
    verifier: Arc<Verifier>,
    activity: Arc<Activity>,
    /// Requests each cloud upstream is serving now (by index), for the
    /// balancer.
    in_flight: Vec<Arc<std::sync::atomic::AtomicU32>>,
    /// The store replicas share, if any.
    shared: Option<Arc<Shared>>,
    /// The configuration file's keys, written to the shared store.
    config_keys: Vec<crate::access::KeyConfig>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("locals", &self.locals.len())
            .field("clouds", &self.clouds.len())
            .finish_non_exhaustive()
    }
}

impl Dispatcher {
    /// A builder with nothing configured.
    pub fn builder() -> DispatcherBuilder {
        DispatcherBuilder::default()
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.egress.metrics
    }

    /// Prometheus text, with the local engine's gauges read now.
    pub fn render_metrics(&self) -> String {
        if let Some(l) = self.locals.first() {
            let load = l.load();
            self.metrics().local_active.set(load.active as i64);
            self.metrics().local_queued.set(load.queued as i64);
        }
        self.metrics().render()
    }

    /// Each request's event, live and recent, for the operator's view.
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The store replicas share, if any.
    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    /// Connects to the shared store: writes the configuration file's keys,
    /// reads the registry and the cache's entries once (so the first
    /// request finds them), then keeps reading them in the background and
    /// writes spending kept while the store was away. Nothing to do
    /// without a store; a store that cannot be reached now is retried.
    pub async fn start_shared(self: &Arc<Self>) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let mut sync = SharedSync {
            seeded: false,
            cursor: "0".into(),
        };
        sync.round(self, &shared).await;
        let weak = Arc::downgrade(self);
        let every = Duration::from_millis(shared.config().sync_ms.max(10));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(d) = weak.upgrade() else { break };
                sync.round(&d, &shared).await;
            }
        });
    }

    /// The signals the policy reads.
    pub fn signals(&self) -> &SignalHub {
        &self.hub
    }

    /// Gateway keys.
    pub fn access(&self) -> &Access {
        &self.access
    }

    /// The egress ledger, if one is kept.
    pub fn ledger(&self) -> Option<&Ledger> {
        self.egress.ledger.as_ref()
    }

    /// The `[router]` section.
    pub fn policy(&self) -> &PolicyConfig {
        &self.policy
    }

    /// Local backends, the router's first.
    pub fn locals(&self) -> &[Arc<dyn Backend>] {
        &self.locals
    }

    /// Cloud backends, in order of preference.
    pub fn clouds(&self) -> &[Arc<dyn Backend>] {
        &self.clouds
    }

    /// Every backend, for `/v1/models` and `/healthz`.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<dyn Backend>> {
        self.locals.iter().chain(&self.clouds)
    }

    /// Local models that hold KV sessions.
    pub fn session_models(&self) -> &[Arc<dyn SessionModel>] {
        &self.sessions
    }

    /// Sets (or replaces) the learned router and what it reads prompts
    /// through.
    pub fn set_scorer(&self, scorer: Arc<dyn Scorer>, input: RouterInput) {
        *self
            .semantics
            .scorer
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((scorer, input));
    }

    /// Whether a learned router scores requests.
    pub fn has_router(&self) -> bool {
        self.scorer().is_some()
    }

    fn scorer(&self) -> Option<(Arc<dyn Scorer>, RouterInput)> {
        self.semantics
            .scorer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The sentence embedder, if loaded.
    pub fn embedder(&self) -> Option<&Arc<Embedder>> {
        self.semantics.embedder.as_ref().map(|(_, e)| e)
    }

    /// The embedding model's name (empty without one).
    pub fn embedder_name(&self) -> &str {
        self.semantics
            .embedder
            .as_ref()
            .map_or("", |(n, _)| n.as_str())
    }

    /// The `[speculative]` section.
    pub fn speculative(&self) -> &SpeculativeConfig {
        &self.speculative
    }

    /// Verification sessions this gateway serves to devices (cloud role).
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// The semantic cache, if on.
    pub fn cache(&self) -> Option<&Arc<SemanticCache>> {
        self.semantics.cache.as_ref()
    }

    /// What the cascade's outcomes taught the router, if on.
    pub fn memory(&self) -> Option<&Arc<OutcomeMemory>> {
        self.semantics.memory.as_ref()
    }

    /// The sample of routed prompts kept for labelling, if one is kept.
    pub fn sample(&self) -> Option<&Arc<crate::sample::TrafficSample>> {
        self.semantics.sample.as_ref()
    }

    /// Puts a request under the cloud share, if one is held and the
    /// request asks for no quality of its own: once warmed up, the share's
    /// cut replaces the router's threshold (and, in the cascade, the
    /// cascade's; see [`tandem_policy::share::bars`]). Under the cascade
    /// with no prior the router's score is not part of the escalation, so
    /// it decides nothing.
    fn held(
        &self,
        ctx: &RequestContext,
        cascade: bool,
        features: &mut tandem_policy::Features,
    ) -> Option<leg::Held> {
        let hold = self.semantics.hold.as_ref()?;
        if ctx.quality.is_some() || (!cascade && features.difficulty.is_none()) {
            return None;
        }
        let weight = if cascade {
            self.policy.cascade_prior.max(0.0)
        } else {
            1.0
        };
        if weight == 0.0 {
            features.difficulty = None;
        }
        let cut = hold.lock().unwrap_or_else(|e| e.into_inner()).cut();
        if let Some(router) = cut.and_then(|c| tandem_policy::share::bars(c, weight).router)
            && features.difficulty.is_some()
        {
            features.difficulty_threshold = Some(router);
        }
        Some(leg::Held { weight, cut })
    }

    /// Counts a decided request towards the cloud share (see
    /// [`ShareHold::record`]).
    pub(super) fn hold_record(&self, weighted: f32, confidence: Option<f32>, out: bool) {
        if let Some(hold) = &self.semantics.hold {
            let mut h = hold.lock().unwrap_or_else(|e| e.into_inner());
            h.record(weighted, confidence, out);
            if let Some(actual) = h.actual() {
                self.metrics().cloud_share.set(actual);
            }
        }
    }

    /// The cloud share held, what went out of the window and the cut it
    /// applies now, if `[router] cloud_share` is set.
    pub fn cloud_share(&self) -> Option<ShareState> {
        let hold = self.semantics.hold.as_ref()?;
        let h = hold.lock().unwrap_or_else(|e| e.into_inner());
        Some(ShareState {
            share: h.share(),
            actual: h.actual(),
            cut: h.cut(),
            requests: h.len(),
        })
    }

    /// Embeds off the async workers (a forward pass takes milliseconds).
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>, ApiError> {
        self.embed_within(texts, usize::MAX).await.map(|(v, _)| v)
    }

    /// Embeds `texts` if their word pieces (after the model's truncation)
    /// number at most `max_tokens` in all, else a 400 before any is
    /// embedded; returns the vectors and the count.
    pub async fn embed_within(
        &self,
        texts: Vec<String>,
        max_tokens: usize,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        let e = self
            .embedder()
            .cloned()
            .ok_or_else(|| ApiError::unavailable("no embedding model is loaded"))?;
        let _slot = self
            .semantics
            .embed_slots
            .acquire()
            .await
            .map_err(|_| ApiError::unavailable("the embedder is shutting down"))?;
        tokio::task::spawn_blocking(move || {
            let tokens: usize = texts.iter().map(|t| e.count_tokens(t)).sum();
            if tokens > max_tokens {
                return Err(ApiError::invalid_request(format!(
                    "`input` has {tokens} tokens in all; at most {max_tokens} are embedded per request: split it"
                ))
                .with_param("input"));
            }
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            e.embed(&refs)
                .map(|v| (v, tokens))
                .map_err(|e| ApiError::internal(e.to_string()))
        })
        .await
        .map_err(|_| ApiError::internal("the embedding task failed"))?
    }

    /// Starts probing the upstreams and reading the device.
    pub fn start_signals(&self, probe_every: Duration) {
        let probes = self
            .clouds
            .iter()
            .map(|c| {
                let name = c.name().to_owned();
                let c = c.clone();
                let probe: crate::signals::Probe = Arc::new(move || {
                    let c = c.clone();
                    Box::pin(async move {
                        match c.probe(Duration::from_secs(2)) {
                            Some(p) => p.await,
                            None => Ok(Duration::ZERO),
                        }
                    })
                });
                (name, probe)
            })
            .collect();
        self.hub
            .spawn_refresh(probes, Duration::from_secs(2), probe_every);
    }

    /// Decides without generating.
    pub fn explain(
        &self,
        req: &GenerateRequest,
        ctx: &RequestContext,
    ) -> Result<Explanation, ApiError> {
        let t0 = Instant::now();
        let checked = self.scan_now(req);
        let Plan {
            mut features,
            view,
            named,
            cloud,
            replica,
            ..
        } = self.plan(req, ctx, &checked)?;
        let cascade = named.is_none()
            && match ctx.mode {
                Some(m) => m == Mode::Cascade,
                None => self.policy.cascade,
            };
        let mut reading = None;
        let mut scored = None;
        if named.is_none()
            && !self.clouds.is_empty()
            && let Some((scorer, input)) = self.scorer()
            && let Some(text) = tandem_policy::scoring::routed_text(&req.input)
        {
            let v = match &input {
                RouterInput::Static(t) => Some(t.embed_one(text)),
                RouterInput::Embedder => self.embedder().map(|e| e.embed_one(text)),
            };
            match v {
                Some(Ok(v)) => {
                    let d = scorer.score(&v, text);
                    features.difficulty = Some(d);
                    features.difficulty_threshold = scorer.threshold(ctx.quality);
                    scored = Some((scorer, v, d));
                }
                Some(Err(err)) => tracing::warn!("router embedding failed: {err}"),
                None => {}
            }
        }
        // As `place` decides: the memory's pull and the cloud share's cut
        // before the reading (which a dry run only describes).
        let recall = scored
            .as_ref()
            .and_then(|(_, v, _)| self.recall(ctx, &features, v, &checked));
        let pull = |d: f32| recall.as_ref().map_or(d, |r| r.pull(d));
        features.difficulty = features.difficulty.map(pull);
        self.held(ctx, cascade, &mut features);
        if let Some((scorer, _, d)) = &scored
            && let Some(r) = scorer.reader()
        {
            let matters = self.reading_matters(&r, *d, pull, &features, &view);
            reading = Some(self.would_read(&r, *d, matters));
        }
        let result = decide(&features, &view, &self.policy);
        let decision_us = t0.elapsed().as_micros() as u64;
        Ok(match result {
            Ok(d) => {
                let (backend, model) = self.target(d.side, named, cloud, req);
                let replica = replica.filter(|_| d.side == Locality::Cloud);
                Explanation {
                    backend: Some(backend),
                    model: Some(model),
                    decision: Some(d),
                    refusal: None,
                    replica,
                    features,
                    view,
                    decision_us,
                    cloud_share: self.cloud_share(),
                    reading,
                }
            }
            Err(r) => Explanation {
                backend: None,
                model: None,
                decision: None,
                refusal: Some(r.message()),
                replica: None,
                features,
                view,
                decision_us,
                cloud_share: self.cloud_share(),
                reading,
            },
        })
    }

    /// What the memory of outcomes says of a prompt the router scored
    /// (`None`: no memory, no score, or a prompt that may hold personal
    /// data, which is never remembered, not even as a vector).
    fn recall(
        &self,
        ctx: &RequestContext,
        features: &tandem_policy::Features,
        v: &[f32],
        checked: &Checked,
    ) -> Option<Recall> {
        let memory = self.memory()?;
        if features.difficulty.is_none() || checked.maybe_private() {
            return None;
        }
        let partition = self.partition(ctx, features);
        Some(Recall {
            estimate: memory.estimate(&partition, v),
            prior: memory.config().prior,
            partition,
            vector: v.to_vec(),
        })
    }

    /// Whether `reader`'s reading of a request the router scored `unread`
    /// without one can change its decision: the memory's `pull` and the
    /// threshold in force (`features`, after the cloud share's cut) as they
    /// will be, and every other rule as it stands.
    fn reading_matters(
        &self,
        reader: &tandem_policy::scoring::Reader<'_>,
        unread: f32,
        pull: impl Fn(f32) -> f32,
        features: &tandem_policy::Features,
        view: &tandem_policy::View,
    ) -> bool {
        let (lo, hi) = reader.span(unread);
        tandem_policy::difficulty_can_change(features, view, &self.policy, pull(lo), pull(hi))
    }

    /// What a request the router scored `unread` without a reading would
    /// see of `reader` (the rule in `place`), in words.
    fn would_read(
        &self,
        reader: &tandem_policy::scoring::Reader<'_>,
        unread: f32,
        matters: bool,
    ) -> String {
        if self.reading_local(reader).is_none() {
            return format!(
                "not read: no local model here reads as {} at width {} (decided without a reading)",
                reader.source(),
                reader.width
            );
        }
        if matters {
            format!(
                "would be read by {} first: within {:.3} of the router's score {unread:.3} without a reading, the decision can change (the difficulty here is without the reading)",
                reader.source(),
                reader.reach
            )
        } else {
            format!(
                "not read: the decision is the same anywhere within {:.3} of the router's score {unread:.3} without a reading",
                reader.reach
            )
        }
    }

    /// The backend label and model a side would answer with.
    fn target(
        &self,
        side: Locality,
        named: Option<(Locality, usize)>,
        cloud: Option<usize>,
        req: &GenerateRequest,
    ) -> (String, String) {
        match side {
            Locality::Local => {
                let l = self.local(plan::local_index(named));
                (
                    "local".into(),
                    l.map(|l| l.model_for(&req.model)).unwrap_or_default(),
                )
            }
            Locality::Cloud => match self.cloud(cloud.unwrap_or(0)) {
                Some(c) => (format!("cloud:{}", c.name()), c.model_for(&req.model)),
                None => ("cloud".into(), String::new()),
            },
        }
    }

    fn cloud_name(&self, i: usize) -> String {
        self.cloud(i)
            .map_or_else(String::new, |c| c.name().to_owned())
    }

    fn local(&self, i: usize) -> Option<&Arc<dyn Backend>> {
        self.locals.get(i)
    }

    fn cloud(&self, i: usize) -> Option<&Arc<dyn Backend>> {
        self.clouds.get(i)
    }

    /// Places the request and starts the answer. However it ends, the
    /// request becomes one event in [`activity`](Self::activity).
    pub async fn dispatch(
        self: &Arc<Self>,
        req: GenerateRequest,
        mut ctx: RequestContext,
    ) -> Result<Dispatched, ApiError> {
        // A context cloned from an earlier request's starts a trace of its own.
        ctx.trace = crate::activity::Trace::default();
        let watch = self.activity.begin(&req, &ctx);
        match self.place(req, ctx).await {
            Ok(d) => Ok(Dispatched {
                stream: watch.follow(d.stream, &d.route),
                route: d.route,
                more: d.more,
            }),
            Err(e) => {
                watch.failed(&e);
                Err(e)
            }
        }
    }

    async fn place(
        self: &Arc<Self>,
        req: GenerateRequest,
        ctx: RequestContext,
    ) -> Result<Dispatched, ApiError> {
        let t0 = Instant::now();
        let checked = self.scan(&req).await;
        let Plan {
            mut features,
            view,
            named,
            cloud,
            cloud_chain,
            replica,
        } = self.plan(&req, &ctx, &checked)?;
        // A named model that cannot do what is asked is a 400 naming the
        // field, whatever the backend would have done with it (ignoring a
        // field silently gives a different answer). A chat request to a
        // base model is left to the backend's own, more precise error.
        if let Some((side, i)) = named {
            let backend = match side {
                Locality::Local => self.local(i),
                Locality::Cloud => self.cloud(i),
            };
            if let Some((b, f)) = backend.and_then(|b| {
                b.capabilities()
                    .missing(&features.needs)
                    .into_iter()
                    .find(|&f| f != tandem_api::Feature::Chat)
                    .map(|f| (b, f))
            }) {
                // An upstream's support is the operator's declaration: say
                // which setting holds it.
                let setting = match f {
                    _ if side == Locality::Local => None,
                    tandem_api::Feature::Continuation => Some("continuation"),
                    _ if f.is_constraint() => Some("constraint_fields"),
                    _ => Some("lacks"),
                };
                let why = setting.map_or_else(String::new, |k| {
                    format!(" (upstream `{}`, as configured: `{k}`)", b.name())
                });
                return Err(ApiError::invalid_param(
                    f.param(),
                    format!(
                        "{} is not supported by the model `{}`{why}",
                        f.describe(),
                        req.model
                    ),
                ));
            }
        }
        // A routed prompt may be kept for labelling (opt-in); one that may
        // hold personal data never is.
        if named.is_none()
            && let Some(sample) = self.sample()
            && let Some(text) = tandem_policy::scoring::routed_text(&req.input)
            && sample.offer(text, checked.maybe_private())
        {
            self.metrics().sampled.inc();
        }
        let local_i = plan::local_index(named);
        let cloud_i = cloud.unwrap_or(0);
        let mode = match ctx.mode {
            Some(m) => m,
            None if self.policy.cascade => Mode::Cascade,
            None if self.speculative.default => Mode::Speculative,
            None => Mode::Route,
        };
        let cascade = named.is_none() && mode == Mode::Cascade;

        // The router and the cache judge one embedding of the last user
        // message; prompts with personal data are kept out of the cache.
        // With no cloud to send it to, a difficulty score changes nothing.
        let scorer = if named.is_none() && !self.clouds.is_empty() {
            self.scorer()
        } else {
            None
        };
        let (cache_key, mut cache_state) = self.cache_key(&req, &ctx, &features, &checked);
        // A router with its own static table scores here, in microseconds;
        // one that reads the shared embedder waits for its vector below.
        let mut router_vector = None;
        if let Some((_, RouterInput::Static(table))) = &scorer
            && let Some(text) = tandem_policy::scoring::routed_text(&req.input)
        {
            match table.embed_one(text) {
                Ok(v) => router_vector = Some(v),
                Err(err) => tracing::warn!("embedding for routing failed: {err}"),
            }
        }
        let router_waits = matches!(&scorer, Some((_, RouterInput::Embedder)));
        let text = cache_key.as_ref().map(|k| k.text().to_owned()).or_else(|| {
            router_waits
                .then(|| tandem_policy::scoring::routed_text(&req.input).map(str::to_owned))
                .flatten()
        });
        let placement = leg::Placement {
            local_i,
            cloud_i,
            t0,
            decision_us: 0,
            prompt_estimate: features.prompt_tokens,
            difficulty: None,
            reading: None,
            cache: None,
            memory: None,
            cloud_chain,
            replica,
            held: None,
        };
        let mut read_by = None;
        let mut early = None;
        let embedding = match (text, self.embedder().cloned()) {
            (Some(text), Some(e)) => {
                let job = tokio::task::spawn_blocking(move || e.embed_one(&text));
                // Local generation starts while the router thinks when the
                // rules so far keep the request here; a cloud decision or a
                // cache hit drops it (and the engine frees its slot).
                if router_waits
                    && !cascade
                    && matches!(decide(&features, &view, &self.policy), Ok(d) if d.side == Locality::Local)
                {
                    early = self
                        .start_leg(Locality::Local, &req, &ctx, false, &placement)
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
        if let (Some(cache), Some(key), Some(v)) = (self.cache(), &cache_key, &embedding) {
            if let Some(hit) = cache.lookup(key, v) {
                self.count_cache("hit");
                return Ok(self.serve_cached(hit, t0));
            }
            cache_state = Some(CacheOutcome::Miss);
            self.count_cache("miss");
        }
        if router_waits {
            router_vector.clone_from(&embedding);
        }
        // The router's score without a reading, the memory's pull on it and
        // the cloud share's cut all come first: a reading is taken only
        // where, with them, it can change the decision.
        let routed = tandem_policy::scoring::routed_text(&req.input);
        let mut unread = None;
        if let (Some((s, _)), Some(v), Some(text)) = (&scorer, &router_vector, routed) {
            let d = s.score(v, text);
            unread = Some(d);
            features.difficulty = Some(d);
            features.difficulty_threshold = s.threshold(ctx.quality);
        }
        let recall = router_vector
            .as_ref()
            .and_then(|v| self.recall(&ctx, &features, v, &checked));
        let pull = |d: f32| recall.as_ref().map_or(d, |r| r.pull(d));
        features.difficulty = features.difficulty.map(pull);
        let held = self.held(&ctx, cascade, &mut features);
        let mut router = unread;
        if let (Some((s, _)), Some(v), Some(text), Some(d)) =
            (&scorer, &router_vector, routed, unread)
            && let Some(r) = s.reader()
            && self.reading_matters(&r, d, pull, &features, &view)
        {
            // The reading has its own context: a request kept here reads
            // its prompt again to answer.
            let started = Instant::now();
            match self.read_for_router(&r, text).await {
                Some(Ok(reading)) => {
                    read_by = Some((r.source(), started.elapsed().as_secs_f64() * 1e3));
                    let read = s.score_read(v, text, Some(&reading));
                    router = Some(read);
                    features.difficulty = Some(pull(read));
                }
                Some(Err(err)) => {
                    tracing::warn!("reading the prompt for the router failed: {err}");
                }
                None => {}
            }
        }
        let remembered = recall
            .as_ref()
            .and_then(|r| r.estimate)
            .zip(router)
            .map(|(e, d)| {
                format!(
                    "{} similar prompts, {:.0}% escalated; router {d:.3}",
                    e.neighbours,
                    100.0 * e.escalated
                )
            });
        let recall = recall.map(|r| (r.partition, r.vector));
        let difficulty = features.difficulty.map(|d| {
            let t = features.difficulty_threshold.unwrap_or_else(|| {
                tandem_policy::threshold_for_quality(
                    self.policy.difficulty_threshold,
                    ctx.quality.unwrap_or(0.5),
                )
            });
            (d, t)
        });
        ctx.trace.decided(&features, &view);
        let decision = match decide(&features, &view, &self.policy) {
            Ok(d) => d,
            Err(r) => {
                self.metrics()
                    .refused
                    .get_or_create(&OutcomeLabels {
                        outcome: r.kind.code().into(),
                    })
                    .inc();
                return Err(refusal_error(r.kind, r.message()));
            }
        };
        let store = cache_key.zip(embedding);
        let placement = leg::Placement {
            decision_us: t0.elapsed().as_micros() as u64,
            difficulty,
            reading: read_by,
            cache: cache_state,
            memory: remembered,
            held,
            ..placement
        };
        let cascades = cascade
            && decision.side == Locality::Local
            && decision.fallback == Some(Locality::Cloud);
        // The router's own decisions count towards the cloud share; the
        // cascade's are counted when its answer is judged.
        if let Some(h) = held
            && !cascades
            && decision.decided_by == "difficulty"
            && (!cascade || decision.side == Locality::Cloud)
        {
            self.hold_record(
                h.weight * difficulty.map_or(0.0, |(d, _)| d),
                None,
                decision.side == Locality::Cloud,
            );
        }
        if cascades {
            return self
                .cascade(req, ctx, decision, placement, store, recall)
                .await;
        }
        let speculation =
            (mode == Mode::Speculative).then(|| self.speculation(&req, &decision, local_i));
        self.routed(req, ctx, decision, placement, store, early, speculation)
            .await
    }

    /// The local model `reader` names, when it reads at `reader`'s layer
    /// and width.
    fn reading_local(
        &self,
        reader: &tandem_policy::scoring::Reader<'_>,
    ) -> Option<&Arc<dyn Backend>> {
        self.locals.iter().find(|l| {
            l.model_for("") == reader.model && l.reading_width(reader.layer) == Some(reader.width)
        })
    }

    /// The reading `reader` asks for, by [`Dispatcher::reading_local`]
    /// (`None`: no such model here).
    async fn read_for_router(
        &self,
        reader: &tandem_policy::scoring::Reader<'_>,
        text: &str,
    ) -> Option<Result<Vec<f32>, ApiError>> {
        Some(
            self.reading_local(reader)?
                .read_prompt(text, reader.layer)?
                .await,
        )
    }

    /// Whether a request the policy placed can run speculatively.
    fn speculation(
        &self,
        req: &GenerateRequest,
        decision: &Decision,
        local_i: usize,
    ) -> Speculation {
        let why_not = if decision.side != Locality::Cloud {
            Some("the request is placed on the device".to_owned())
        } else if self.local(local_i).and_then(|l| l.sessions()).is_none() {
            Some("there is no local model to draft with".to_owned())
        } else {
            crate::speculative::ineligible(req).map(|r| format!("{r} are not supported"))
        };
        why_not.map_or(Speculation::On, Speculation::Off)
    }

    /// The routed mode: one side, failing over before the first token and
    /// handing off after it.
    #[allow(clippy::too_many_arguments)]
    async fn routed(
        self: &Arc<Self>,
        req: GenerateRequest,
        ctx: RequestContext,
        decision: Decision,
        placement: leg::Placement,
        store: Option<(crate::cache::CacheKey, Vec<f32>)>,
        early: Option<leg::Leg>,
        mut speculation: Option<Speculation>,
    ) -> Result<Dispatched, ApiError> {
        let spec = speculation == Some(Speculation::On);
        // A local start the decision did not keep stops here, before the
        // other side is contacted.
        if early.is_some() && decision.side != Locality::Local {
            ctx.trace
                .leg_ended("dropped: the decision placed it in the cloud");
        }
        let first = match early.filter(|_| decision.side == Locality::Local) {
            Some(leg) => Ok(leg),
            None if spec => {
                match self
                    .start_speculative(&req, &ctx, decision.redact, &placement)
                    .await
                {
                    // An upstream without the verification endpoint (any
                    // OpenAI-compatible server but Tandem) answers as usual.
                    Err(e)
                        if matches!(e.status, 404 | 405)
                            && e.code.as_deref() != Some("model_not_found") =>
                    {
                        speculation = Some(Speculation::Off(
                            "the upstream does not verify drafts (it is not a Tandem)".into(),
                        ));
                        self.start_leg(Locality::Cloud, &req, &ctx, decision.redact, &placement)
                            .await
                    }
                    other => other,
                }
            }
            None => {
                self.start_leg(decision.side, &req, &ctx, decision.redact, &placement)
                    .await
            }
        };
        // Another upstream serving the model (a replica, then another
        // provider) before the other side.
        let mut placement = placement;
        let mut moves: Vec<String> = Vec::new();
        let first = if decision.side == Locality::Cloud && !spec {
            self.across_upstreams(
                first,
                &req,
                &ctx,
                decision.redact,
                &mut placement,
                &mut moves,
            )
            .await
        } else {
            first
        };
        let mut failover = None;
        let leg = match (first, decision.fallback) {
            (Ok(leg), _) => leg,
            (Err(e), Some(fb)) if !e.is_client_error() || e.status == 429 => {
                let cause = e.message.clone();
                tracing::info!(
                    from = decision.side.as_str(),
                    to = fb.as_str(),
                    "failover: {cause}"
                );
                self.count_move(true, decision.side, fb, &e);
                failover = Some(format!(
                    "{} -> {}: {cause}",
                    decision.side.as_str(),
                    fb.as_str()
                ));
                let redact = fb == Locality::Cloud && decision.redact;
                self.start_leg(fb, &req, &ctx, redact, &placement)
                    .await
                    .map_err(|mut e2| {
                        e2.message = format!("{} (after: {cause})", e2.message);
                        e2
                    })?
            }
            (Err(e), _) => return Err(e),
        };
        if spec && !leg.speculative && speculation == Some(Speculation::On) {
            speculation = Some(Speculation::Off("the cloud could not be reached".into()));
        }
        let mut route = self.route_info(&leg, &decision, &placement);
        let all_moves: Vec<String> = moves.iter().chain(&failover).cloned().collect();
        route.failover = (!all_moves.is_empty()).then(|| all_moves.join("; "));
        route.speculative = speculation;
        let reason = if route.failover.is_some() {
            "failover"
        } else if leg.speculative {
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
                .filter(|_| failover.is_none() && !leg.speculative),
            redact: decision.redact,
            reason,
            placement,
        };
        Ok(self.run_leg(leg, sup, route, store))
    }

    /// A cloud start that failed before its first token goes on to the
    /// next upstream of the placement's chain (a replica, then another
    /// provider) until one starts or none is left; each move is noted.
    async fn across_upstreams(
        self: &Arc<Self>,
        first: Result<leg::Leg, ApiError>,
        req: &GenerateRequest,
        ctx: &RequestContext,
        redact: bool,
        placement: &mut leg::Placement,
        moves: &mut Vec<String>,
    ) -> Result<leg::Leg, ApiError> {
        let mut first = first;
        let mut tried = vec![placement.cloud_i];
        while let Err(e) = &first {
            // A spent budget is spent on every upstream.
            if (e.is_client_error() && e.status != 429)
                || e.code.as_deref() == Some("insufficient_quota")
            {
                break;
            }
            let Some(next) = placement
                .cloud_chain
                .iter()
                .copied()
                .find(|i| !tried.contains(i))
            else {
                break;
            };
            let (from, to) = (self.cloud_name(placement.cloud_i), self.cloud_name(next));
            tracing::info!(from, to, "failover to another upstream: {}", e.message);
            self.count_move(true, Locality::Cloud, Locality::Cloud, e);
            moves.push(format!("cloud:{from} -> cloud:{to}: {}", e.message));
            tried.push(next);
            placement.cloud_i = next;
            first = self
                .start_leg(Locality::Cloud, req, ctx, redact, placement)
                .await;
        }
        first
    }

    fn count_cache(&self, outcome: &str) {
        self.metrics()
            .cache
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }
}

/// Where the background reading of the shared store stands.
struct SharedSync {
    seeded: bool,
    /// The last cache log entry read.
    cursor: String,
}

impl SharedSync {
    async fn round(&mut self, d: &Dispatcher, shared: &Shared) {
        if !self.seeded {
            self.seeded = shared
                .call("seed keys", shared.store().seed_keys(&d.config_keys))
                .await
                .is_ok();
            if !self.seeded {
                return;
            }
        }
        let Ok(keys) = shared.call("keys", shared.store().keys()).await else {
            return;
        };
        d.access.mirror(keys);
        shared.flush_pending().await;
        let Some(cache) = d.cache() else { return };
        const BATCH: usize = 500;
        loop {
            let Ok(lines) = shared
                .call("cache read", shared.store().cache_read(&self.cursor, BATCH))
                .await
            else {
                return;
            };
            let n = lines.len();
            for l in lines {
                if l.origin != shared.origin && !cache.absorb(&l.entry) {
                    tracing::warn!("a shared cache entry could not be read; skipped");
                }
                self.cursor = l.id;
            }
            if n < BATCH {
                return;
            }
        }
    }
}

/// The error a refusal reaches the client as.
fn refusal_error(kind: RefusalKind, message: String) -> ApiError {
    let (status, error_kind) = match kind {
        RefusalKind::Privacy => (403, ErrorKind::PermissionError),
        RefusalKind::Budget => (429, ErrorKind::RateLimitError),
        RefusalKind::CloudUnavailable => (503, ErrorKind::ServiceUnavailable),
        RefusalKind::NoBackend => (400, ErrorKind::InvalidRequestError),
    };
    ApiError::new(status, error_kind, message).with_code(kind.code())
}

/// Mean log-probability of the answer's tokens: how sure the model was.
pub fn confidence(tokens: &[tandem_api::TokenLogprob]) -> f32 {
    if tokens.is_empty() {
        return f32::NEG_INFINITY;
    }
    tokens.iter().map(|t| t.logprob).sum::<f32>() / tokens.len() as f32
}

/// What the memory of outcomes says of one prompt the router scored, and
/// where the prompt's own outcome is remembered.
struct Recall {
    /// Its neighbours' escalations, if it has any.
    estimate: Option<tandem_policy::memory::Estimate>,
    /// How many neighbours' worth the router's own score counts for.
    prior: f32,
    /// The partition its outcome is remembered under.
    partition: String,
    /// The router's vector of it.
    vector: Vec<f32>,
}

impl Recall {
    /// The router's difficulty `d`, moved towards what the neighbours did.
    fn pull(&self, d: f32) -> f32 {
        tandem_policy::memory::blend(d, self.estimate, self.prior)
    }
}
