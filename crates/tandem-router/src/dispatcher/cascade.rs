//! The cascade: the local model answers first, with token log-probabilities;
//! the answer reaches the client only if its confidence (mean token
//! log-probability) passes the threshold, otherwise the cloud answers. If
//! the cloud then fails, the local answer stands.

use std::sync::Arc;

use tandem_api::{Answer, ApiError, Event, GenerateRequest, Locality, LogprobRequest};
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
        p: Placement,
        store: Option<(CacheKey, Vec<f32>)>,
    ) -> Result<Dispatched, ApiError> {
        let mut local_req = req.clone();
        let client_logprobs = req.logprobs.is_some();
        local_req.logprobs.get_or_insert(LogprobRequest { top: 0 });
        let threshold = self.policy.cascade_threshold;
        let local = match self
            .start_leg(Locality::Local, &local_req, &ctx, false, &p)
            .await
        {
            Ok(leg) => Answer::collect(leg.stream).await.map(|a| (a, leg.model)),
            Err(e) => Err(e),
        };
        let confidence = local.as_ref().ok().map(|(a, _)| confidence(&a.tokens));
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
                .start_leg(Locality::Cloud, &req, &ctx, decision.redact, &p)
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
        self.metrics()
            .cascade
            .get_or_create(&OutcomeLabels {
                outcome: if leg.is_some() { "escalated" } else { "kept" }.into(),
            })
            .inc();
        let (leg, fallback) = match leg {
            Some(leg) => (leg, Some(Locality::Local)),
            None => {
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
                    },
                    None,
                )
            }
        };
        let mut route = self.route_info(&leg, &decision, &p);
        route.failover = failover;
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
