//! The cascade: the local model answers first, with token log-probabilities;
//! the answer reaches the client only if its confidence (mean token
//! log-probability) passes the threshold, otherwise the cloud answers. If
//! the cloud then fails, the local answer stands.
//!
//! The answer is judged early too: after its first few tokens, a confidence
//! already below the early threshold escalates at once and the local
//! generation is dropped (the engine frees its slot), so an escalated
//! request costs the device a few tokens rather than a whole answer.

use std::sync::Arc;

use futures::StreamExt;
use tandem_api::{
    Answer, AnswerSoFar, ApiError, Event, EventStream, GenerateRequest, Locality, LogprobRequest,
};
use tandem_policy::Decision;

use super::leg::{Leg, Placement, Supervision};
use super::{Dispatched, Dispatcher, RequestContext, confidence};
use crate::cache::CacheKey;
use crate::metrics::OutcomeLabels;

impl Dispatcher {
    pub(super) async fn cascade(
        self: &Arc<Self>,
        req: GenerateRequest,
        ctx: RequestContext,
        decision: Decision,
        mut p: Placement,
        store: Option<(CacheKey, Vec<f32>)>,
        recall: Option<(String, Vec<f32>)>,
    ) -> Result<Dispatched, ApiError> {
        let mut local_req = req.clone();
        let client_logprobs = req.logprobs.is_some();
        local_req.logprobs.get_or_insert(LogprobRequest { top: 0 });
        // The router's prior moves the bar: hard-looking prompts need a
        // surer answer to stay on the device, easy-looking ones less.
        let shift = p
            .difficulty
            .map_or(0.0, |(d, t)| self.policy.cascade_prior * (d - t));
        // Under a warmed-up cloud share its cut sets both bars.
        let held = p.held.and_then(|h| {
            h.cut
                .map(|c| tandem_policy::share::bars(c, h.weight).cascade)
        });
        let (whole, first) = match held {
            Some(b) => (b, b),
            None => (
                self.policy.cascade_threshold,
                self.policy
                    .cascade_early_threshold
                    .unwrap_or(self.policy.cascade_threshold),
            ),
        };
        let threshold = whole + shift;
        let early = Early {
            tokens: self.policy.cascade_early_tokens,
            threshold: first + shift,
        };
        let watched = match self
            .start_leg(Locality::Local, &local_req, &ctx, false, &p)
            .await
        {
            Ok(leg) => watch(leg.stream, early).await.map(|w| (w, leg.model)),
            Err(e) => Err(e),
        };
        let mut early_stop = None;
        let local = match watched {
            Ok((Watched::Whole(a), model)) => Ok((*a, model)),
            Ok((Watched::Unsure(c), _)) => {
                early_stop = Some(c);
                Err(ApiError::internal("escalated early"))
            }
            Err(e) => Err(e),
        };
        let confidence = local.as_ref().ok().map(|(a, _)| confidence(&a.tokens));
        let keep = confidence.is_some_and(|c| c >= threshold);
        // The cloud share counts the answer by the lower of its two looks,
        // as they judged it.
        let looked = match (&local, early_stop) {
            (_, Some(c)) => Some(c),
            (Ok((a, _)), None) => confidence.map(|c| {
                let k = early.tokens;
                match a.tokens.get(..k).filter(|_| k > 0) {
                    Some(first) => c.min(super::confidence(first)),
                    None => c,
                }
            }),
            (Err(_), None) => None,
        };
        if let (Some(h), Some(c)) = (p.held, looked) {
            self.hold_record(
                h.weight * p.difficulty.map_or(0.0, |(d, _)| d),
                Some(c),
                !keep,
            );
        }
        // The verdict on the device's answer teaches the router; a local
        // model that failed says nothing about the prompt.
        if let (Some(memory), Some((partition, v))) = (self.memory(), &recall)
            && (early_stop.is_some() || confidence.is_some())
        {
            memory.record(partition, v, !keep);
        }
        ctx.trace.leg_ended(match (&local, early_stop) {
            (_, Some(_)) => "escalated early",
            (Err(_), _) => "error",
            (Ok(_), _) if keep => "kept",
            (Ok(_), _) => "escalated",
        });
        let mut outcome = match (confidence, early_stop) {
            (_, Some(c)) => format!(
                "escalated early: confidence {c:.3} < {:.3} after {} tokens",
                early.threshold, early.tokens
            ),
            (Some(c), _) if keep => format!("kept: confidence {c:.3} >= {threshold:.3}"),
            (Some(c), _) => format!("escalated: confidence {c:.3} < {threshold:.3}"),
            (None, _) => "escalated: the local model failed".to_owned(),
        };
        let mut failover = None;
        let mut local_again = None;
        let mut moves = Vec::new();
        let leg = if keep {
            None
        } else {
            let started = self
                .start_leg(Locality::Cloud, &req, &ctx, decision.redact, &p)
                .await;
            // An escalation, too, goes on to another replica before giving up.
            let started = self
                .across_upstreams(started, &req, &ctx, decision.redact, &mut p, &mut moves)
                .await;
            match started {
                Ok(leg) => Some(leg),
                Err(e) if local.is_ok() => {
                    failover = Some(format!("cloud -> local: {}", e.message));
                    outcome = format!("{outcome}; the cloud failed, so the local answer stands");
                    None
                }
                // Given up on early, the local answer is not there to
                // stand: the device answers after all.
                Err(e) if early_stop.is_some() => {
                    failover = Some(format!("cloud -> local: {}", e.message));
                    outcome =
                        format!("{outcome}; the cloud failed, so the local model answers in full");
                    local_again = Some(
                        self.start_leg(Locality::Local, &req, &ctx, false, &p)
                            .await?,
                    );
                    None
                }
                Err(e) => return Err(e),
            }
        };
        self.metrics()
            .cascade
            .get_or_create(&OutcomeLabels {
                outcome: if early_stop.is_some() {
                    "escalated_early"
                } else if leg.is_some() {
                    "escalated"
                } else {
                    "kept"
                }
                .into(),
            })
            .inc();
        let (leg, fallback) = match (leg, local_again) {
            (Some(leg), _) => (leg, Some(Locality::Local)),
            (None, Some(leg)) => (leg, None),
            (None, None) => {
                let (a, model) = local?;
                let tokens = if client_logprobs {
                    a.tokens
                } else {
                    Vec::new()
                };
                let events = vec![
                    Ok(Event::Delta(tandem_api::Delta {
                        text: a.text,
                        tokens,
                        tool_calls: (0u32..)
                            .zip(&a.tool_calls)
                            .map(|(i, c)| c.as_delta(i))
                            .collect(),
                        extra: a.extra,
                        response: a.response,
                    })),
                    Ok(Event::Finish(a.finish)),
                ];
                (
                    Leg {
                        side: Locality::Local,
                        label: "local".into(),
                        model,
                        stream: Box::pin(futures::stream::iter(events)),
                        restorer: None,
                        egress: None,
                        redacted: Default::default(),
                        speculative: false,
                        more: Vec::new(),
                        sibling: false,
                        _flight: None,
                    },
                    None,
                )
            }
        };
        let mut route = self.route_info(&leg, &decision, &p);
        let all_moves: Vec<String> = moves.into_iter().chain(failover).collect();
        route.failover = (!all_moves.is_empty()).then(|| all_moves.join("; "));
        route.cascade = Some(outcome);
        let sup = Supervision {
            req,
            ctx,
            fallback,
            redact: decision.redact,
            reason: "cascade",
            placement: p,
        };
        Ok(self.run_leg(leg, sup, route, store))
    }
}

/// When the cascade looks at a local answer before its end.
#[derive(Debug, Clone, Copy)]
struct Early {
    /// After this many tokens (0: never).
    tokens: usize,
    /// Escalate below this mean log-probability.
    threshold: f32,
}

/// A local answer read to its end, or given up on early.
enum Watched {
    Whole(Box<Answer>),
    /// The confidence of the first tokens, below the early threshold.
    Unsure(f32),
}

/// Reads the local answer, judging it once its first `early.tokens` tokens
/// are in; dropping the stream on an early escalation stops the generation.
async fn watch(mut stream: EventStream, early: Early) -> Result<Watched, ApiError> {
    let mut so_far = AnswerSoFar::default();
    let mut judged = early.tokens == 0;
    while let Some(event) = stream.next().await {
        match event? {
            Event::Delta(d) => {
                so_far.push(d);
                if !judged && so_far.tokens.len() >= early.tokens {
                    judged = true;
                    let c = confidence(so_far.tokens.get(..early.tokens).unwrap_or_default());
                    if c < early.threshold {
                        return Ok(Watched::Unsure(c));
                    }
                }
            }
            Event::Finish(f) => return Ok(Watched::Whole(Box::new(so_far.finish(f)))),
        }
    }
    Err(ApiError::bad_gateway(
        "the local model ended the answer without finishing it",
    ))
}
