//! The operator's view of requests: each one, when it ends, becomes a
//! [`RequestEvent`] — where it ran, why, how fast, what it cost, what was
//! redacted — broadcast to live subscribers (the dashboard's feed,
//! `tandem top`) and kept in a bounded ring of recent ones, with running
//! [`Totals`].
//!
//! No text of a request or an answer is ever in an event: only counts,
//! classes, names of models and rules, and timings. A request's path
//! through the dispatcher is noted on its [`Trace`], which every leg can
//! reach through the [`RequestContext`](crate::RequestContext).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use serde::Serialize;
use tandem_api::{ApiError, Event, EventStream, GenerateRequest};
use tandem_policy::{Decision, Features, View};
use tokio::sync::broadcast;

use crate::{RequestContext, RouteInfo};

/// Events kept for a page that opens late.
pub const RECENT: usize = 1000;

/// Events a slow subscriber may fall behind before it skips ahead.
const CHANNEL: usize = 1024;

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Answered to the end.
    Ok,
    /// No backend was allowed to serve it (privacy, budget, offline).
    Refused,
    /// Failed: the error's status says how.
    Error,
    /// The client went away before the end.
    Cancelled,
}

/// One side's part in answering a request.
#[derive(Debug, Clone, Serialize)]
pub struct LegTiming {
    /// `local` or `cloud:<upstream>`.
    pub backend: String,
    /// The model it ran.
    pub model: String,
    /// When it started, ms after the request arrived.
    pub start_ms: f64,
    /// When it ended, ms after the request arrived.
    pub end_ms: f64,
    /// `ok`, `escalated`, `handoff`, `error: <cause>`, `dropped`…
    pub outcome: String,
}

/// Speculative decoding's work for one answer.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpeculativeTally {
    /// Verification rounds.
    pub rounds: u64,
    /// Tokens drafted on the device.
    pub drafted: u64,
    /// Of those, accepted by the cloud model.
    pub accepted: u64,
    /// The first rounds one by one (at most 256).
    pub traced: Vec<Round>,
}

/// One verification round.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Round {
    /// When it started, ms after the request arrived.
    pub start_ms: f64,
    /// When the cloud's verdict was in.
    pub end_ms: f64,
    /// Tokens drafted.
    pub drafted: u32,
    /// Of those, accepted.
    pub accepted: u32,
}

/// One request, as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct RequestEvent {
    /// Increasing per gateway, from 1.
    pub seq: u64,
    /// When it arrived, Unix milliseconds.
    pub at_ms: u64,
    /// `x-request-id`.
    pub request_id: String,
    /// The gateway key's name, when keys are configured.
    pub key: Option<String>,
    /// `chat` or `text_completion` (OpenTelemetry's `gen_ai.operation.name`).
    pub operation: &'static str,
    /// The model the client asked for.
    pub model_asked: String,
    /// The model that answered (empty when none did).
    pub model: String,
    /// `local`, `cloud:<upstream>`, `cache`, or empty when none answered.
    pub backend: String,
    /// `local`, `cloud`, `cache` or `none`.
    pub side: &'static str,
    /// The rule that decided.
    pub decided_by: String,
    /// Every rule's effect, as the `x-tandem-reasons` header has them.
    pub reasons: Vec<String>,
    /// The learned router's score and the threshold it was held to.
    pub difficulty: Option<(f32, f32)>,
    /// Microseconds spent deciding.
    pub decision_us: u64,
    /// Personal-data classes replaced before leaving, with counts (never values).
    pub redacted: BTreeMap<String, u32>,
    /// Semantic cache outcome.
    pub cache: Option<String>,
    /// The cascade's verdict.
    pub cascade: Option<String>,
    /// Speculative decoding, when asked for.
    pub speculative: Option<String>,
    /// The side that failed before the first token, and why.
    pub failover: Option<String>,
    /// Which of several upstreams serving the model was chosen, and why.
    pub replica: Option<String>,
    /// The side that broke off mid-answer and the one that continued.
    pub handoff: Option<String>,
    /// What remembered cascade outcomes said.
    pub memory: Option<String>,
    /// Streamed to the client.
    pub stream: bool,
    /// `max_tokens` as asked.
    pub max_tokens: Option<u32>,
    /// Why the answer ended (`stop`, `length`, `tool_calls`…).
    pub finish_reason: Option<String>,
    /// Each side that worked on the answer, in order.
    pub legs: Vec<LegTiming>,
    /// Speculative decoding's rounds, when the answer was drafted here.
    pub speculative_tally: Option<SpeculativeTally>,
    /// How it ended.
    pub status: Status,
    /// The HTTP status of a failure and its code (never the message, which
    /// may quote the request).
    pub error: Option<String>,
    /// Time to the first piece of answer, ms.
    pub ttft_ms: Option<f64>,
    /// Time to the end, ms.
    pub duration_ms: f64,
    /// Prompt tokens, as the answering side counted them.
    pub prompt_tokens: u32,
    /// Answer tokens.
    pub completion_tokens: u32,
    /// Answer tokens per second after the first.
    pub tokens_per_s: Option<f64>,
    /// Spent on upstreams for it, USD.
    pub cost_usd: f64,
    /// What the cloud would have charged for a local answer, USD.
    pub saved_usd: f64,
    /// The decision as the dry run shows it: what the request needs…
    pub features: Option<Features>,
    /// …and the state of the world the policy saw.
    pub view: Option<View>,
    /// The policy's decision.
    pub decision: Option<Decision>,
}

/// Running sums since the gateway started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    /// Requests ended, by side (`local`, `cloud`, `cache`, `none`).
    pub requests: BTreeMap<String, u64>,
    /// Requests refused by the policy.
    pub refused: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests the client left.
    pub cancelled: u64,
    /// Cascaded requests escalated to the cloud.
    pub escalated: u64,
    /// Requests with a failover or a handoff.
    pub moved: u64,
    /// Spent on upstreams, USD.
    pub cost_usd: f64,
    /// Saved by answering on the device, USD.
    pub saved_usd: f64,
    /// Tokens by side, prompt and answer together.
    pub tokens: BTreeMap<String, u64>,
    /// Personal-data values replaced, by class.
    pub redacted: BTreeMap<String, u64>,
}

impl Totals {
    fn add(&mut self, e: &RequestEvent) {
        *self.requests.entry(e.side.into()).or_default() += 1;
        match e.status {
            Status::Refused => self.refused += 1,
            Status::Error => self.errors += 1,
            Status::Cancelled => self.cancelled += 1,
            Status::Ok => {}
        }
        if e.cascade
            .as_deref()
            .is_some_and(|c| c.starts_with("escalated"))
        {
            self.escalated += 1;
        }
        if e.failover.is_some() || e.handoff.is_some() {
            self.moved += 1;
        }
        self.cost_usd += e.cost_usd;
        self.saved_usd += e.saved_usd;
        *self.tokens.entry(e.side.into()).or_default() +=
            u64::from(e.prompt_tokens) + u64::from(e.completion_tokens);
        for (class, n) in &e.redacted {
            *self.redacted.entry(class.clone()).or_default() += u64::from(*n);
        }
    }
}

/// Where requests' events go.
pub struct Activity {
    tx: broadcast::Sender<Arc<RequestEvent>>,
    recent: Mutex<(VecDeque<Arc<RequestEvent>>, Totals)>,
    seq: AtomicU64,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activity").finish_non_exhaustive()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// No events yet.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(CHANNEL).0,
            recent: Mutex::new((VecDeque::with_capacity(RECENT), Totals::default())),
            seq: AtomicU64::new(0),
        }
    }

    /// Events from now on. A subscriber that falls more than a thousand
    /// behind is told how many it missed and goes on from the newest.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RequestEvent>> {
        self.tx.subscribe()
    }

    /// The latest events, oldest first, and the totals, read together so
    /// a subscriber taken before this call can drop what it already has
    /// (by `seq`).
    pub fn snapshot(&self) -> (Vec<Arc<RequestEvent>>, Totals) {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        (r.0.iter().cloned().collect(), r.1.clone())
    }

    fn publish(&self, mut e: RequestEvent) {
        let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        // Numbered under the lock, so the ring and the feed agree on order.
        e.seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        r.1.add(&e);
        let e = Arc::new(e);
        if r.0.len() == RECENT {
            r.0.pop_front();
        }
        r.0.push_back(e.clone());
        // No subscriber is not an error.
        let _ = self.tx.send(e);
    }

    /// Starts watching a request that has just arrived.
    pub(crate) fn begin(self: &Arc<Self>, req: &GenerateRequest, ctx: &RequestContext) -> Watch {
        Watch {
            activity: self.clone(),
            t0: Instant::now(),
            trace: ctx.trace.clone(),
            event: RequestEvent {
                seq: 0,
                at_ms: unix_ms(),
                request_id: ctx.request_id.clone(),
                key: ctx.caller.as_ref().map(|c| c.config.name.clone()),
                operation: match req.input {
                    tandem_api::Input::Chat { .. } => "chat",
                    _ => "text_completion",
                },
                model_asked: req.model.clone(),
                model: String::new(),
                backend: String::new(),
                side: "none",
                decided_by: String::new(),
                reasons: Vec::new(),
                difficulty: None,
                decision_us: 0,
                redacted: BTreeMap::new(),
                cache: None,
                cascade: None,
                speculative: None,
                failover: None,
                replica: None,
                handoff: None,
                memory: None,
                stream: req.stream,
                max_tokens: req.max_tokens,
                finish_reason: None,
                legs: Vec::new(),
                speculative_tally: None,
                status: Status::Cancelled,
                error: None,
                ttft_ms: None,
                duration_ms: 0.0,
                prompt_tokens: 0,
                completion_tokens: 0,
                tokens_per_s: None,
                cost_usd: 0.0,
                saved_usd: 0.0,
                features: None,
                view: None,
                decision: None,
            },
            sent: false,
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the dispatcher notes about one request on its way: shared by the
/// request's legs, read when the request ends.
#[derive(Debug, Clone, Default)]
pub struct Trace(Arc<Mutex<Notes>>);

#[derive(Debug)]
struct Notes {
    t0: Instant,
    legs: Vec<LegTiming>,
    speculative: Option<SpeculativeTally>,
    features: Option<Features>,
    view: Option<View>,
    cost_usd: f64,
    saved_usd: f64,
    handoff: Option<String>,
    answered_by: Option<(String, String)>,
    /// Classes replaced by a leg that took over after the headers were sent.
    redacted: BTreeMap<String, u32>,
}

impl Default for Notes {
    fn default() -> Self {
        Self {
            t0: Instant::now(),
            legs: Vec::new(),
            speculative: None,
            features: None,
            view: None,
            cost_usd: 0.0,
            saved_usd: 0.0,
            handoff: None,
            answered_by: None,
            redacted: BTreeMap::new(),
        }
    }
}

impl Trace {
    /// A side started working on the answer.
    pub(crate) fn leg_started(&self, backend: &str, model: &str) {
        let mut n = self.lock();
        let at = n.t0.elapsed().as_secs_f64() * 1e3;
        n.legs.push(LegTiming {
            backend: backend.to_owned(),
            model: model.to_owned(),
            start_ms: at,
            end_ms: f64::NAN,
            outcome: String::new(),
        });
    }

    /// The latest side still working has stopped, with `outcome`.
    pub(crate) fn leg_ended(&self, outcome: &str) {
        let mut n = self.lock();
        let at = n.t0.elapsed().as_secs_f64() * 1e3;
        if let Some(l) = n.legs.iter_mut().rev().find(|l| l.end_ms.is_nan()) {
            l.end_ms = at;
            l.outcome = outcome.to_owned();
        }
    }

    pub(crate) fn speculated(
        &self,
        mut tally: SpeculativeTally,
        rounds: &[(Instant, Instant, u32, u32)],
    ) {
        let mut n = self.lock();
        let ms = |t: Instant| t.saturating_duration_since(n.t0).as_secs_f64() * 1e3;
        tally.traced = rounds
            .iter()
            .map(|&(start, end, drafted, accepted)| Round {
                start_ms: ms(start),
                end_ms: ms(end),
                drafted,
                accepted,
            })
            .collect();
        n.speculative = Some(tally);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Notes> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn decided(&self, features: &Features, view: &View) {
        let mut n = self.lock();
        n.features = Some(features.clone());
        n.view = Some(view.clone());
    }

    pub(crate) fn spent(&self, usd: f64) {
        self.lock().cost_usd += usd;
    }

    pub(crate) fn saved(&self, usd: f64) {
        self.lock().saved_usd += usd;
    }

    pub(crate) fn handed_off(&self, from: &str, to: &str, cause: &str) {
        self.lock().handoff = Some(format!("{from} -> {to}: {cause}"));
    }

    /// The leg that finished the answer, which after a handoff is not the
    /// one the headers named.
    pub(crate) fn answered(&self, backend: &str, model: &str) {
        self.lock().answered_by = Some((backend.to_owned(), model.to_owned()));
    }

    pub(crate) fn redacted(&self, classes: &BTreeMap<String, u32>) {
        let mut n = self.lock();
        for (c, k) in classes {
            *n.redacted.entry(c.clone()).or_default() += k;
        }
    }
}

/// One request being watched; publishes its event exactly once, when the
/// request ends however it ends (dropped unfinished: the client left).
pub(crate) struct Watch {
    activity: Arc<Activity>,
    t0: Instant,
    trace: Trace,
    event: RequestEvent,
    sent: bool,
}

fn side_of(backend: &str) -> &'static str {
    match backend {
        "local" => "local",
        "cache" => "cache",
        b if b.starts_with("cloud") => "cloud",
        _ => "none",
    }
}

impl Watch {
    fn route(&mut self, route: &RouteInfo) {
        let e = &mut self.event;
        e.backend.clone_from(&route.backend);
        e.side = side_of(&route.backend);
        e.model.clone_from(&route.model);
        e.decided_by = route.decision.decided_by.to_owned();
        e.reasons = route
            .decision
            .reasons
            .iter()
            .map(ToString::to_string)
            .collect();
        e.difficulty = route.difficulty;
        e.decision_us = route.decision_us;
        e.redacted.clone_from(&route.redacted);
        e.cache = route.cache.map(|c| c.to_string());
        e.cascade.clone_from(&route.cascade);
        e.speculative = route.speculative.as_ref().map(ToString::to_string);
        e.failover.clone_from(&route.failover);
        e.replica.clone_from(&route.replica);
        e.memory.clone_from(&route.memory);
        e.decision = Some(route.decision.clone());
    }

    /// The request failed before an answer started.
    pub(crate) fn failed(mut self, err: &ApiError) {
        self.event.status = if err.status == 403
            || err.code.as_deref().is_some_and(|c| {
                matches!(
                    c,
                    "privacy_violation"
                        | "budget_exceeded"
                        | "cloud_unavailable"
                        | "no_backend_allowed"
                )
            }) {
            Status::Refused
        } else {
            Status::Error
        };
        self.event.error = Some(error_label(err));
        self.publish();
    }

    /// Follows the answer's events to their end, passing them on unchanged.
    pub(crate) fn follow(mut self, mut stream: EventStream, route: &RouteInfo) -> EventStream {
        self.route(route);
        Box::pin(async_stream::stream! {
            let mut watch = self;
            while let Some(event) = stream.next().await {
                match &event {
                    Ok(Event::Delta(d)) => {
                        if watch.event.ttft_ms.is_none() && !d.is_empty() {
                            watch.event.ttft_ms = Some(watch.t0.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    Ok(Event::Finish(f)) => {
                        watch.event.status = Status::Ok;
                        watch.event.finish_reason = serde_json::to_value(f.reason)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned));
                        watch.event.prompt_tokens = f.usage.prompt_tokens;
                        watch.event.completion_tokens = f.usage.completion_tokens;
                    }
                    Err(e) => {
                        watch.event.status = Status::Error;
                        watch.event.error = Some(error_label(e));
                    }
                }
                let end = !matches!(event, Ok(Event::Delta(_)));
                yield event;
                if end {
                    break;
                }
            }
            if watch.event.status == Status::Cancelled && watch.event.error.is_none() {
                // The stream ended without a finish: the answer broke off.
                watch.event.status = Status::Error;
                watch.event.error = Some("502 the answer ended without finishing".into());
            }
            watch.publish();
        })
    }

    fn publish(&mut self) {
        if std::mem::replace(&mut self.sent, true) {
            return;
        }
        let mut e = self.event.clone();
        e.duration_ms = self.t0.elapsed().as_secs_f64() * 1e3;
        // An answer whose text arrived all at once (held back by a stop
        // sequence, or from the cache) has no decoding speed to show.
        if let Some(ttft) = e.ttft_ms
            && e.completion_tokens > 1
            && e.duration_ms - ttft >= 10.0
        {
            e.tokens_per_s =
                Some(f64::from(e.completion_tokens - 1) / ((e.duration_ms - ttft) / 1e3));
        }
        let n = self.trace.lock();
        // A side still marked as working stopped when the request did.
        let offset = n.t0.saturating_duration_since(self.t0).as_secs_f64() * 1e3;
        e.legs = n
            .legs
            .iter()
            .map(|l| {
                let mut l = l.clone();
                l.start_ms += offset;
                if l.end_ms.is_nan() {
                    l.end_ms = e.duration_ms;
                    l.outcome = match e.status {
                        Status::Ok => "ok",
                        Status::Cancelled => "cancelled",
                        _ => "error",
                    }
                    .into();
                } else {
                    l.end_ms += offset;
                }
                l
            })
            .collect();
        e.speculative_tally = n.speculative.clone().map(|mut t| {
            for r in &mut t.traced {
                r.start_ms += offset;
                r.end_ms += offset;
            }
            t
        });
        e.features = n.features.clone();
        e.view = n.view.clone();
        e.cost_usd = n.cost_usd;
        e.saved_usd = n.saved_usd;
        e.handoff.clone_from(&n.handoff);
        if let Some((backend, model)) = &n.answered_by {
            e.backend.clone_from(backend);
            e.side = side_of(backend);
            e.model.clone_from(model);
        }
        for (c, k) in &n.redacted {
            let v = e.redacted.entry(c.clone()).or_default();
            *v = (*v).max(*k);
        }
        drop(n);
        self.activity.publish(e);
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Published already, or the client left mid-answer.
        self.publish();
    }
}

fn error_label(e: &ApiError) -> String {
    match e.code.as_deref() {
        Some(code) => format!("{} {code}", e.status),
        None => {
            let kind = serde_json::to_value(e.kind).ok();
            format!(
                "{} {}",
                e.status,
                kind.as_ref().and_then(|k| k.as_str()).unwrap_or("error")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_api::{Delta, Finish, Usage};

    fn route(backend: &str) -> RouteInfo {
        RouteInfo {
            backend: backend.into(),
            model: "m".into(),
            decision: Decision {
                side: tandem_api::Locality::Local,
                fallback: None,
                redact: false,
                reasons: Vec::new(),
                decided_by: "default",
            },
            redacted: BTreeMap::new(),
            failover: None,
            replica: None,
            decision_us: 7,
            difficulty: None,
            reading: None,
            cache: None,
            memory: None,
            cascade: None,
            speculative: None,
        }
    }

    fn request() -> GenerateRequest {
        GenerateRequest {
            choices: 1,
            model: "tandem/auto".into(),
            input: tandem_api::Input::text("hi"),
            sampling: tandem_api::Sampling::default(),
            max_tokens: Some(8),
            stop: Vec::new(),
            logprobs: None,
            stream: true,
            include_usage: false,
            extra: Default::default(),
        }
    }

    #[tokio::test]
    async fn an_answer_becomes_one_event_with_its_timings_and_tokens() {
        let a = Arc::new(Activity::new());
        let mut rx = a.subscribe();
        let ctx = RequestContext::default();
        ctx.trace.saved(0.25);
        let events: Vec<Result<Event, ApiError>> = vec![
            Ok(Event::Delta(Delta::text("hel"))),
            Ok(Event::Delta(Delta::text("lo"))),
            Ok(Event::Finish(Finish {
                reason: tandem_api::FinishReason::Stop,
                usage: Usage::new(5, 3),
            })),
        ];
        let s = a
            .begin(&request(), &ctx)
            .follow(Box::pin(futures::stream::iter(events)), &route("local"));
        let got: Vec<_> = s.collect().await;
        assert_eq!(got.len(), 3, "the events pass through unchanged");
        let e = rx.recv().await.expect("one event");
        assert_eq!((e.seq, e.side, e.status), (1, "local", Status::Ok));
        assert_eq!((e.prompt_tokens, e.completion_tokens), (5, 3));
        assert!(e.ttft_ms.is_some());
        assert!((e.saved_usd - 0.25).abs() < 1e-9);
        let (recent, totals) = a.snapshot();
        assert_eq!(recent.len(), 1);
        assert_eq!(totals.requests.get("local"), Some(&1));
        assert_eq!(totals.tokens.get("local"), Some(&8));
    }

    #[tokio::test]
    async fn a_client_that_leaves_and_a_refusal_are_events_too() {
        let a = Arc::new(Activity::new());
        let ctx = RequestContext::default();
        let events: Vec<Result<Event, ApiError>> = vec![Ok(Event::Delta(Delta::text("x")))];
        let mut s = a.begin(&request(), &ctx).follow(
            Box::pin(futures::stream::iter(events).chain(futures::stream::pending())),
            &route("cloud:up"),
        );
        let _ = s.next().await;
        drop(s);
        a.begin(&request(), &ctx)
            .failed(&ApiError::forbidden("no").with_code("privacy_violation"));
        let (recent, totals) = a.snapshot();
        let statuses: Vec<_> = recent.iter().map(|e| (e.side, e.status)).collect();
        assert_eq!(
            statuses,
            [("cloud", Status::Cancelled), ("none", Status::Refused)]
        );
        assert_eq!(recent[1].error.as_deref(), Some("403 privacy_violation"));
        assert_eq!((totals.cancelled, totals.refused), (1, 1));
    }

    #[test]
    fn the_ring_keeps_the_latest() {
        let a = Arc::new(Activity::new());
        let ctx = RequestContext::default();
        for _ in 0..RECENT + 5 {
            a.begin(&request(), &ctx).failed(&ApiError::internal("x"));
        }
        let (recent, totals) = a.snapshot();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent.first().map(|e| e.seq), Some(6));
        assert_eq!(totals.errors, (RECENT + 5) as u64);
    }
}
