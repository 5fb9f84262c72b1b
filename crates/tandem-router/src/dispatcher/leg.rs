//! One side serving an answer (a *leg*): starting it on a backend — with
//! personal data replaced first when it leaves the device — and supervising
//! its stream: originals restored in the answer, the egress settled, and,
//! when the stream breaks, the answer handed to the other side, which
//! continues from the text the client already has.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tandem_api::{
    ApiError, Event, EventStream, Feature, Finish, GenerateRequest, Input, Locality, Usage,
};
use tandem_policy::Decision;
use tandem_policy::privacy::{Redaction, Restorer, redact_request};

use super::{CacheOutcome, Dispatched, Dispatcher, RequestContext, RouteInfo};
use crate::cache::CacheKey;
use crate::egress::{EgressRecord, Requester};
use crate::metrics::{BackendLabels, ClassLabels, MoveLabels, RouteLabels};

/// Where a request was placed, carried through its modes.
#[derive(Clone)]
pub(super) struct Placement {
    pub local_i: usize,
    pub cloud_i: usize,
    pub t0: Instant,
    pub decision_us: u64,
    /// The policy's prompt length estimate.
    pub prompt_estimate: u32,
    pub difficulty: Option<(f32, f32)>,
    /// Who read the prompt for the router, and in how many ms.
    pub reading: Option<(String, f64)>,
    pub cache: Option<CacheOutcome>,
    /// What the cascade's remembered outcomes said, when they moved the score.
    pub memory: Option<String>,
    /// Every upstream that could serve it, in the order to try them.
    pub cloud_chain: Vec<usize>,
    /// Why the first upstream was chosen over the others.
    pub replica: Option<String>,
    /// Under the cloud share, how its escalation is weighed and the cut
    /// applied to it.
    pub held: Option<Held>,
}

/// A request under the cloud share (`[router] cloud_share`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    /// The router's score's weight in the escalation: `cascade_prior`
    /// under the cascade, 1 without it.
    pub weight: f32,
    /// The cut applied; none while the share is still warming up (the
    /// configured thresholds decide).
    pub cut: Option<f32>,
}

/// A request counted in flight on an upstream for as long as it lives.
pub(crate) struct Flight(Arc<std::sync::atomic::AtomicU32>);

impl Flight {
    fn new(count: &Arc<std::sync::atomic::AtomicU32>) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Flight(count.clone())
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A side that is serving the answer now.
pub(crate) struct Leg {
    pub side: Locality,
    /// `local` or `cloud:<upstream>`.
    pub label: String,
    pub model: String,
    pub stream: EventStream,
    pub restorer: Option<Restorer>,
    /// The ledger duty of a cloud leg.
    pub egress: Option<EgressRecord>,
    /// What was replaced by placeholders before it left.
    pub redacted: std::collections::BTreeMap<String, u32>,
    /// Drafted here and verified in the cloud; the drafting task does its
    /// own accounting.
    pub speculative: bool,
    /// The other choices the backend answered with this one.
    pub more: Vec<EventStream>,
    /// A further choice of another leg's request: that leg accounts for
    /// the exchange.
    pub sibling: bool,
    /// Counts the request as in flight on its upstream.
    pub _flight: Option<Flight>,
}

/// What supervising an answer needs beyond the leg.
pub(super) struct Supervision {
    pub req: GenerateRequest,
    pub ctx: RequestContext,
    pub fallback: Option<Locality>,
    pub redact: bool,
    /// The label the metrics count the answer under.
    pub reason: &'static str,
    pub placement: Placement,
}

impl Supervision {
    /// The supervision of choice `i` of the same request: its own seed (as
    /// a separate request for it would have), and notes kept off the
    /// request's trace, which follows the first choice.
    fn for_choice(&self, i: u32) -> Supervision {
        let mut req = self.req.clone();
        req.choices = 1;
        req.sampling.seed = req.sampling.seed.map(|s| s.wrapping_add(i));
        let mut ctx = self.ctx.clone();
        ctx.request_id = format!("{}-{i}", ctx.request_id);
        ctx.trace = crate::activity::Trace::default();
        Supervision {
            req,
            ctx,
            fallback: self.fallback,
            redact: self.redact,
            reason: self.reason,
            placement: self.placement.clone(),
        }
    }
}

impl Dispatcher {
    fn requester(ctx: &RequestContext) -> Requester {
        Requester {
            request_id: ctx.request_id.clone(),
            key: ctx.caller.as_ref().map(|c| c.config.name.clone()),
            trace: ctx.trace.clone(),
        }
    }

    /// Holds what the request may cost against today's budgets before it
    /// leaves; a budget another request (here or on another replica) has
    /// just used up refuses it with 429 `insufficient_quota`, which the
    /// caller may fail over to the device.
    async fn reserve(
        &self,
        ctx: &RequestContext,
        cloud: &Arc<dyn tandem_api::Backend>,
        req: &GenerateRequest,
        p: &Placement,
    ) -> Result<Option<crate::access::Reservation>, ApiError> {
        let key = ctx.caller.as_ref().map(|c| c.config.name.as_str());
        let budgets = crate::access::Budgets {
            total: self.policy.daily_budget_usd,
            key: ctx.caller.as_ref().and_then(|c| c.config.daily_budget_usd),
        };
        // The most the answer may cost: its prompt and every token it may
        // write, in every choice this request asks of the upstream (the
        // policy's own estimate caps an unbounded answer).
        let completion = req
            .max_tokens
            .unwrap_or(1024)
            .saturating_mul(cloud.choices_per_request(req));
        let usd = cloud.price().cost(p.prompt_estimate, completion);
        if let Some(c) = &ctx.caller {
            c.note_reserved(usd);
            // Held at admission, and enough: no second round trip.
            match c.take_advance() {
                Some(a) if a.covers(usd) => return Ok(Some(a)),
                Some(a) => self.egress.spend.settle(key, Some(a), 0.0),
                None => {}
            }
        }
        match self.egress.spend.reserve(key, usd, budgets).await? {
            Some(r) => Ok(Some(r)),
            None => Err(ApiError::rate_limited(
                "the daily budget is spent (by requests finished and in flight)",
            )
            .with_code("insufficient_quota")),
        }
    }

    /// Gives back a reservation for a request that did not leave.
    fn release(&self, ctx: &RequestContext, r: Option<crate::access::Reservation>) {
        let key = ctx.caller.as_ref().map(|c| c.config.name.as_str());
        self.egress.spend.settle(key, r, 0.0);
    }

    /// The request as it may leave the device, and what was taken out.
    pub(super) fn outgoing(
        &self,
        req: &GenerateRequest,
        redact: bool,
    ) -> Result<(GenerateRequest, Redaction), ApiError> {
        let mut out = req.clone();
        let mut redaction = Redaction::default();
        if redact {
            // A redaction that cannot run sends nothing.
            redact_request(&self.detector, &mut out, &mut redaction).map_err(|e| {
                ApiError::unavailable(e.to_string()).with_code("privacy_unavailable")
            })?;
        }
        for (class, n) in &redaction.classes {
            self.metrics()
                .redactions
                .get_or_create(&ClassLabels {
                    class: class.clone(),
                })
                .inc_by(u64::from(*n));
        }
        Ok((out, redaction))
    }

    /// Starts the answer on one side, noting the attempt on the request's
    /// trace.
    pub(super) async fn start_leg(
        self: &Arc<Self>,
        side: Locality,
        req: &GenerateRequest,
        ctx: &RequestContext,
        redact: bool,
        p: &Placement,
    ) -> Result<Leg, ApiError> {
        let started = self.open_leg(side, req, ctx, redact, p).await;
        match &started {
            Ok(leg) => ctx.trace.leg_started(&leg.label, &leg.model),
            Err(e) => {
                let (label, model) = match side {
                    Locality::Local => (
                        "local".to_owned(),
                        self.local(p.local_i)
                            .map(|l| l.model_for(&req.model))
                            .unwrap_or_default(),
                    ),
                    Locality::Cloud => self.cloud(p.cloud_i).map_or_else(
                        || ("cloud".to_owned(), String::new()),
                        |c| (format!("cloud:{}", c.name()), c.model_for(&req.model)),
                    ),
                };
                ctx.trace.leg_started(&label, &model);
                ctx.trace
                    .leg_ended(&format!("error: {}", crate::metrics::cause_label(e)));
            }
        }
        started
    }

    async fn open_leg(
        self: &Arc<Self>,
        side: Locality,
        req: &GenerateRequest,
        ctx: &RequestContext,
        redact: bool,
        p: &Placement,
    ) -> Result<Leg, ApiError> {
        match side {
            Locality::Local => {
                let engine = self
                    .local(p.local_i)
                    .ok_or_else(|| ApiError::unavailable("no local model is loaded"))?;
                let mut local_req = req.clone();
                local_req.model = engine.model_for(&req.model);
                let model = local_req.model.clone();
                let stream = engine.start(local_req).await.result?;
                Ok(Leg {
                    side,
                    label: "local".into(),
                    model,
                    stream,
                    restorer: None,
                    egress: None,
                    redacted: Default::default(),
                    speculative: false,
                    more: Vec::new(),
                    sibling: false,
                    _flight: None,
                })
            }
            Locality::Cloud => {
                let cloud = self
                    .cloud(p.cloud_i)
                    .ok_or_else(|| ApiError::unavailable("no cloud upstream is configured"))?;
                let (out, redaction) = self.outgoing(req, redact)?;
                // Built once: the ledger's entry names the very bytes sent.
                let out = cloud.outbound(out)?;
                let reservation = self.reserve(ctx, cloud, req, p).await?;
                if let Err(e) = self
                    .egress
                    .sending(
                        &Self::requester(ctx),
                        cloud.name(),
                        &cloud.model_for(&req.model),
                        &redaction.classes,
                        out.payload_sha256().map(str::to_owned),
                    )
                    .await
                {
                    self.release(ctx, reservation);
                    return Err(e);
                }
                // Counted from before the start: a burst sees its own load.
                let flight = self.in_flight.get(p.cloud_i).map(Flight::new);
                let started = cloud.send(out).await;
                let exchange = started
                    .exchange
                    .unwrap_or_else(|| Arc::new(tandem_api::Exchange::new(cloud.name(), "")));
                let mut record = EgressRecord::new(
                    self.egress.clone(),
                    cloud.price(),
                    exchange,
                    redaction.classes.clone(),
                    Self::requester(ctx),
                );
                record.reservation = reservation;
                let more = started.more;
                match started.result {
                    Ok(stream) => {
                        self.signals().record_answer(cloud.name());
                        Ok(Leg {
                            side,
                            label: format!("cloud:{}", cloud.name()),
                            model: cloud.model_for(&req.model),
                            stream,
                            restorer: (!redaction.is_empty()).then(|| redaction.restorer()),
                            egress: Some(record),
                            redacted: redaction.classes,
                            speculative: false,
                            more,
                            sibling: false,
                            _flight: flight,
                        })
                    }
                    Err(e) => {
                        record.settle_failed_start(&e.message);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Drafts on the device and verifies in the cloud (see
    /// [`crate::speculative`]).
    pub(super) async fn start_speculative(
        self: &Arc<Self>,
        req: &GenerateRequest,
        ctx: &RequestContext,
        redact: bool,
        p: &Placement,
    ) -> Result<Leg, ApiError> {
        let drafter = self
            .local(p.local_i)
            .and_then(|l| l.sessions())
            .ok_or_else(|| ApiError::unavailable("no local model can draft"))?;
        let cloud = self
            .cloud(p.cloud_i)
            .ok_or_else(|| ApiError::unavailable("no cloud upstream is configured"))?;
        let verifier = cloud.verifier().ok_or_else(|| {
            ApiError::not_found(format!(
                "upstream `{}` does not verify drafts",
                cloud.name()
            ))
        })?;
        let (out, redaction) = self.outgoing(req, redact)?;
        let model = cloud.model_for(&req.model);
        let reservation = self.reserve(ctx, cloud, req, p).await?;
        if let Err(e) = self
            .egress
            .sending(
                &Self::requester(ctx),
                cloud.name(),
                &model,
                &redaction.classes,
                None,
            )
            .await
        {
            self.release(ctx, reservation);
            return Err(e);
        }
        let stream = crate::speculative::start(crate::speculative::SpecJob {
            egress: self.egress.clone(),
            config: self.speculative.clone(),
            drafter,
            verifier,
            upstream: cloud.name().to_owned(),
            price: cloud.price(),
            target_model: model.clone(),
            req: out,
            redacted: redaction.classes.clone(),
            who: Self::requester(ctx),
            reservation,
        })
        .await
        .inspect_err(|_| self.release(ctx, reservation))?;
        ctx.trace
            .leg_started(&format!("cloud:{} (speculative)", cloud.name()), &model);
        Ok(Leg {
            side: Locality::Cloud,
            label: format!("cloud:{}", cloud.name()),
            model,
            stream,
            restorer: (!redaction.is_empty()).then(|| redaction.restorer()),
            egress: None,
            redacted: redaction.classes,
            speculative: true,
            more: Vec::new(),
            sibling: false,
            _flight: self.in_flight.get(p.cloud_i).map(Flight::new),
        })
    }

    /// Where a leg's answer comes from, for the headers.
    pub(super) fn route_info(&self, leg: &Leg, decision: &Decision, p: &Placement) -> RouteInfo {
        RouteInfo {
            backend: leg.label.clone(),
            model: leg.model.clone(),
            decision: decision.clone(),
            redacted: leg.redacted.clone(),
            failover: None,
            replica: p.replica.clone().filter(|_| leg.side == Locality::Cloud),
            decision_us: p.decision_us,
            difficulty: p.difficulty,
            reading: p.reading.clone(),
            cache: p.cache,
            memory: p.memory.clone(),
            cascade: None,
            speculative: None,
        }
    }

    /// Supervises the leg and, when the answer is one to keep, tees it
    /// into the cache. Further choices the backend answered with it are
    /// supervised each on its own: placeholders restored, a break handed
    /// over, as for the first.
    pub(super) fn run_leg(
        self: &Arc<Self>,
        mut leg: Leg,
        sup: Supervision,
        route: RouteInfo,
        store: Option<(CacheKey, Vec<f32>)>,
    ) -> Dispatched {
        let keep =
            leg.side == Locality::Cloud || self.cache().is_some_and(|c| c.config().local_answers);
        let store = store.filter(|_| keep);
        let more = std::mem::take(&mut leg.more)
            .into_iter()
            .zip(1u32..)
            .map(|(stream, i)| {
                let sibling = Leg {
                    side: leg.side,
                    label: leg.label.clone(),
                    model: leg.model.clone(),
                    stream,
                    restorer: leg.restorer.as_ref().map(Restorer::fresh),
                    egress: None,
                    redacted: leg.redacted.clone(),
                    speculative: false,
                    more: Vec::new(),
                    sibling: true,
                    _flight: None,
                };
                self.supervise(sibling, sup.for_choice(i))
            })
            .collect();
        let stream = self.supervise(leg, sup);
        let stream = self.keep_answer(stream, store, route.backend.clone(), route.model.clone());
        Dispatched {
            stream,
            route,
            more,
        }
    }

    pub(super) fn count_move(&self, failover: bool, from: Locality, to: Locality, e: &ApiError) {
        let m = self.metrics();
        let family = if failover { &m.failovers } else { &m.handoffs };
        family
            .get_or_create(&MoveLabels {
                from: from.as_str().into(),
                to: to.as_str().into(),
                cause: crate::metrics::cause_label(e),
            })
            .inc();
    }

    /// Whether the other side can take over an answer of which `text` was
    /// already sent.
    fn can_take_over(&self, to: Locality, sup: &Supervision, text: &str) -> bool {
        match to {
            Locality::Local => self.local(sup.placement.local_i).is_some(),
            Locality::Cloud => self.cloud(sup.placement.cloud_i).is_some_and(|c| {
                // A completions upstream reads the text already sent as more
                // prompt, so its grammar would start a second value in the
                // middle of the first.
                let shaped_text = matches!(sup.req.input, Input::Text { .. })
                    && Feature::needed_by(&sup.req)
                        .into_iter()
                        .any(Feature::shapes_answer);
                text.is_empty()
                    || (c.capabilities().supports(Feature::Continuation) && !shaped_text)
            }),
        }
    }

    fn supervise(self: &Arc<Self>, leg: Leg, sup: Supervision) -> EventStream {
        let disp = self.clone();
        Box::pin(async_stream::stream! {
            let mut leg = leg;
            let mut text = String::new();
            // Placeholders in tool-call arguments are restored per call:
            // each call's arguments are a stream of their own.
            let mut call_restorers: std::collections::HashMap<u32, tandem_policy::privacy::Restorer> =
                std::collections::HashMap::new();
            // So are the text fields beside the content (`reasoning_content`,
            // `refusal`...), each a stream of its own.
            let mut field_restorers: std::collections::BTreeMap<String, tandem_policy::privacy::Restorer> =
                std::collections::BTreeMap::new();
            let mut called = false;
            let mut first_at: Option<Duration> = None;
            let mut handed_off = false;
            let mut earlier_tokens = 0u32;
            loop {
                let event = leg.stream.next().await;
                match event {
                    Some(Ok(Event::Delta(mut d))) => {
                        if let Some(c) = leg.egress.as_mut() {
                            c.deltas += 1;
                        }
                        if let Some(r) = leg.restorer.as_mut() {
                            d.text = r.push(&d.text);
                            for piece in &mut d.tool_calls {
                                let args = piece.function.as_mut().and_then(|f| f.arguments.as_mut());
                                if let Some(args) = args {
                                    let cr = call_restorers.entry(piece.index).or_insert_with(|| r.for_json());
                                    *args = cr.push(args);
                                }
                            }
                            for (field, value) in d.extra.iter_mut() {
                                if let serde_json::Value::String(piece) = value {
                                    let fr = field_restorers.entry(field.clone()).or_insert_with(|| r.fresh());
                                    *piece = fr.push(piece);
                                } else {
                                    restore_strings(value, r);
                                }
                            }
                            // A piece held back whole says nothing yet.
                            d.extra.retain(|_, v| v.as_str() != Some(""));
                        }
                        called |= !d.tool_calls.is_empty();
                        if d.is_empty() {
                            continue;
                        }
                        first_at.get_or_insert_with(|| sup.placement.t0.elapsed());
                        text.push_str(&d.text);
                        yield Ok(Event::Delta(d));
                    }
                    Some(Ok(Event::Finish(f))) => {
                        if let Some(r) = leg.restorer.as_mut() {
                            let rest = r.finish();
                            if !rest.is_empty() {
                                text.push_str(&rest);
                                yield Ok(Event::Delta(tandem_api::Delta::text(rest)));
                            }
                        }
                        for (field, r) in field_restorers.iter_mut() {
                            let rest = r.finish();
                            if !rest.is_empty() {
                                let mut extra = serde_json::Map::new();
                                extra.insert(field.clone(), serde_json::Value::String(rest));
                                yield Ok(Event::Delta(tandem_api::Delta { extra, ..tandem_api::Delta::default() }));
                            }
                        }
                        let mut held: Vec<_> = call_restorers.iter_mut().map(|(&i, r)| (i, r.finish())).collect();
                        held.sort_by_key(|(i, _)| *i);
                        for (index, rest) in held.into_iter().filter(|(_, r)| !r.is_empty()) {
                            yield Ok(Event::Delta(tandem_api::Delta {
                                tool_calls: vec![tandem_api::ToolCallDelta {
                                    index,
                                    function: Some(tandem_api::FunctionDelta { name: None, arguments: Some(rest) }),
                                    ..tandem_api::ToolCallDelta::default()
                                }],
                                ..tandem_api::Delta::default()
                            }));
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
                        // A choice the upstream left out (it ignored `n`) is
                        // asked of it on its own: nothing of it was sent.
                        if e.code.as_deref() == Some(tandem_api::CHOICE_NOT_ANSWERED)
                            && leg.sibling
                            && text.is_empty()
                        {
                            let redact = leg.side == Locality::Cloud && sup.redact;
                            match disp.start_leg(leg.side, &sup.req, &sup.ctx, redact, &sup.placement).await {
                                Ok(next) => {
                                    leg = next;
                                    continue;
                                }
                                Err(e2) => {
                                    yield Err(e2);
                                    return;
                                }
                            }
                        }
                        // A tool call half sent cannot be continued by
                        // another model: the client gets the error.
                        let to = sup
                            .fallback
                            .filter(|_| !handed_off && !called)
                            .filter(|&to| disp.can_take_over(to, &sup, &text));
                        sup.ctx.trace.leg_ended(&format!("error: {}", crate::metrics::cause_label(&e)));
                        let Some(to) = to else {
                            if let Some(c) = leg.egress.as_mut() {
                                c.settle(&format!("error: {}", e.message), None);
                            }
                            yield Err(e);
                            return;
                        };
                        // Hand the answer over: the other side continues from
                        // the text the client already has.
                        let mut next_req = sup.req.clone();
                        next_req.input.continue_with(&text);
                        let sent = leg.egress.as_ref().map_or(text.len() as u32 / 4, |c| c.deltas);
                        if let Some(m) = next_req.max_tokens.as_mut() {
                            *m = m.saturating_sub(sent.max(text.len() as u32 / 4)).max(1);
                        }
                        let from = leg.side;
                        earlier_tokens = earlier_tokens.saturating_add(sent);
                        if let Some(c) = leg.egress.as_mut() {
                            c.settle(&format!("handoff to {}: {}", to.as_str(), e.message), None);
                        }
                        let redact = to == Locality::Cloud && sup.redact;
                        match disp.start_leg(to, &next_req, &sup.ctx, redact, &sup.placement).await {
                            Ok(next) => {
                                tracing::info!(from = from.as_str(), to = to.as_str(), chars = text.len(), "handoff: {}", e.message);
                                disp.count_move(false, from, to, &e);
                                sup.ctx.trace.handed_off(from.as_str(), to.as_str(), &crate::metrics::cause_label(&e));
                                sup.ctx.trace.redacted(&next.redacted);
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
        if leg.sibling {
            return;
        }
        let total = sup.placement.t0.elapsed();
        sup.ctx.trace.leg_ended("ok");
        if handed_off {
            sup.ctx.trace.answered(&leg.label, &leg.model);
        }
        let m = self.metrics();
        let label = BackendLabels {
            backend: leg.label.clone(),
        };
        if let Some(ttft) = first_at {
            m.ttft.get_or_create(&label).observe(ttft.as_secs_f64());
        }
        m.duration
            .get_or_create(&label)
            .observe(total.as_secs_f64());
        m.requests
            .get_or_create(&RouteLabels {
                backend: leg.label.clone(),
                reason: if handed_off { "handoff" } else { sup.reason }.into(),
            })
            .inc();
        match leg.egress.as_mut() {
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
            None if leg.speculative => {}
            None => {
                m.count_tokens("local", usage.prompt_tokens, usage.completion_tokens);
                // What the same answer would have cost in the cloud.
                if let Some(c) = self.cloud(sup.placement.cloud_i).filter(|_| !handed_off) {
                    let saved = c.price().cost(
                        usage.prompt_tokens.max(sup.placement.prompt_estimate),
                        usage.completion_tokens,
                    );
                    m.cost_saved_usd.inc_by(saved);
                    sup.ctx.trace.saved(saved);
                }
                if let Some(ttft) = first_at
                    && !handed_off
                {
                    self.observe_local(usage.prompt_tokens, usage.completion_tokens, ttft, total);
                }
            }
        }
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
}

/// Placeholders restored in every string inside a structured field of the
/// answer (`annotations`' titles and URLs...). Such fields come whole, not
/// streamed piece by piece, so each string is restored at once.
fn restore_strings(value: &mut serde_json::Value, r: &tandem_policy::privacy::Restorer) {
    match value {
        serde_json::Value::String(s) => {
            let mut one = r.fresh();
            let mut out = one.push(s);
            out.push_str(&one.finish());
            *s = out;
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|v| restore_strings(v, r)),
        serde_json::Value::Object(fields) => {
            fields.values_mut().for_each(|v| restore_strings(v, r))
        }
        _ => {}
    }
}
