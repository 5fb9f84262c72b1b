//! Gathering, once per request, everything the policy reads: what the
//! request needs ([`Features`]) and how the world looks ([`View`]) — the
//! backends' load, capabilities and health, the device, the network, the
//! spending. The policy itself is a pure function in `tandem-policy`.

use std::collections::BTreeMap;
use std::sync::Arc;

use tandem_api::{ApiError, Feature, GenerateRequest, Locality};
use tandem_policy::balance::{self, Replica};
use tandem_policy::privacy::scan_request;
use tandem_policy::{CloudView, Features, LocalView, PrivacyMode, Spend, View};

use super::{Dispatcher, RequestContext};
use crate::access::Caller;

/// The outcome of checking a request for personal data.
#[derive(Debug, Clone)]
pub(super) enum Checked {
    /// Classes found, with counts.
    Done(BTreeMap<String, u32>),
    /// The detector could not run: why.
    Unchecked(String),
}

impl Checked {
    /// Whether the request may hold personal data as far as anyone knows
    /// (found some, or could not look).
    pub fn maybe_private(&self) -> bool {
        match self {
            Checked::Done(c) => !c.is_empty(),
            Checked::Unchecked(_) => true,
        }
    }
}

/// What [`Dispatcher::plan`] gathers for one request.
pub(super) struct Plan {
    pub features: Features,
    pub view: View,
    /// The side and backend a concrete model name points at.
    pub named: Option<(Locality, usize)>,
    /// The cloud upstream this request would use: the first of `cloud_chain`.
    pub cloud: Option<usize>,
    /// Every upstream that could serve it, in the order to try them.
    pub cloud_chain: Vec<usize>,
    /// Why the first was chosen over the others, when there are others.
    pub replica: Option<String>,
}

/// The local backend a request uses.
pub(super) fn local_index(named: Option<(Locality, usize)>) -> usize {
    match named {
        Some((Locality::Local, i)) => i,
        _ => 0,
    }
}

impl Dispatcher {
    /// The privacy mode a request gets: the key's (or the configured
    /// default), which a header may only tighten when keys exist.
    pub(super) fn privacy_mode(&self, ctx: &RequestContext) -> PrivacyMode {
        let base = ctx
            .caller
            .as_ref()
            .and_then(|c| c.config.privacy)
            .unwrap_or(self.policy.privacy);
        match ctx.privacy {
            Some(h) if ctx.caller.is_some() => base.stricter(h),
            Some(h) => h,
            None => base,
        }
    }

    /// Which side and backend a concrete model name refers to; `None` for
    /// the virtual model.
    fn locate(&self, model: &str) -> Result<Option<(Locality, usize)>, ApiError> {
        if model == self.policy.virtual_model {
            return Ok(None);
        }
        let serves =
            |b: &std::sync::Arc<dyn tandem_api::Backend>| b.models().iter().any(|m| m.id == model);
        if let Some(i) = self.locals.iter().position(serves) {
            return Ok(Some((Locality::Local, i)));
        }
        if let Some(i) = self.clouds.iter().position(serves) {
            return Ok(Some((Locality::Cloud, i)));
        }
        Err(ApiError::model_not_found(model))
    }

    /// What personal data the request carries, everywhere it carries it
    /// (counts per class), or why it could not be checked. Blocking: the
    /// model takes milliseconds; async callers use [`Dispatcher::scan`].
    pub(super) fn scan_now(&self, req: &GenerateRequest) -> Checked {
        match scan_request(&self.detector, req) {
            Ok(s) => Checked::Done(s.classes),
            Err(e) => Checked::Unchecked(e.0),
        }
    }

    /// [`Dispatcher::scan_now`] off the async workers when a model runs.
    /// With no upstream, no cache and no sample of prompts nothing can
    /// leave or be kept, so the model is not run: a device-only Tandem does
    /// not pay for it on every request.
    pub(super) async fn scan(self: &Arc<Self>, req: &GenerateRequest) -> Checked {
        if self.clouds.is_empty() && self.cache().is_none() && self.sample().is_none() {
            return Checked::Unchecked(
                "no upstream is configured: nothing can leave the device".into(),
            );
        }
        if !self.detector_runs_model {
            return self.scan_now(req);
        }
        let (d, r) = (self.clone(), req.clone());
        tokio::task::spawn_blocking(move || d.scan_now(&r))
            .await
            .unwrap_or_else(|_| Checked::Unchecked("the detection task failed".into()))
    }

    fn prompt_tokens(&self, req: &GenerateRequest, local: Option<usize>) -> u32 {
        if let Some(n) = local
            .and_then(|i| self.local(i))
            .and_then(|l| l.count_prompt_tokens(req))
        {
            return n;
        }
        // About four characters a token for English text.
        let chars: usize = req.input.text_parts().iter().map(|p| p.len()).sum();
        (chars / 4) as u32 + 8
    }

    /// The upstreams a request could use, in the order to try them
    /// ([`tandem_policy::balance`]): those serving the named model, or for
    /// the virtual model every upstream, replicas of one model grouped in
    /// the configured order of their models. With the reason for the first
    /// when there is a choice.
    fn cloud_chain(
        &self,
        named: Option<(Locality, usize)>,
        req: &GenerateRequest,
    ) -> (Vec<usize>, Option<String>) {
        let candidates: Vec<usize> = match named {
            Some((Locality::Local, _)) => return (Vec::new(), None),
            Some((Locality::Cloud, _)) => self
                .clouds
                .iter()
                .enumerate()
                .filter(|(_, c)| c.models().iter().any(|m| m.id == req.model))
                .map(|(i, _)| i)
                .collect(),
            None => (0..self.clouds.len()).collect(),
        };
        let mut models: Vec<String> = Vec::new();
        let mut replicas = Vec::with_capacity(candidates.len());
        for &i in &candidates {
            let Some(c) = self.cloud(i) else { continue };
            let model = c.model_for(&req.model);
            let deployment = models.iter().position(|m| *m == model).unwrap_or_else(|| {
                models.push(model);
                models.len() - 1
            });
            let health = c.health();
            let unusable = if health.breaker_open {
                Some("breaker open".to_owned())
            } else if !self.hub.reachable(c.name()) {
                Some("unreachable".to_owned())
            } else {
                None
            };
            replicas.push(Replica {
                name: c.name().to_owned(),
                deployment: deployment as u32,
                unusable,
                in_flight: self
                    .in_flight
                    .get(i)
                    .map_or(0, |f| f.load(std::sync::atomic::Ordering::Relaxed)),
                ttft_ms: health.ttft_ms,
            });
        }
        let order = balance::order(&replicas);
        let chain = order
            .iter()
            .filter_map(|&k| candidates.get(k).copied())
            .collect();
        let why = (replicas.len() > 1).then(|| balance::describe(&replicas, &order));
        (chain, why)
    }

    fn view(
        &self,
        req: &GenerateRequest,
        local: Option<usize>,
        cloud: Option<usize>,
        caller: Option<&Caller>,
    ) -> View {
        let speed = *self.local_speed.lock().unwrap_or_else(|p| p.into_inner());
        let local = local
            .and_then(|i| self.local(i))
            .map_or_else(LocalView::default, |l| {
                let load = l.load();
                self.metrics().local_active.set(load.active as i64);
                self.metrics().local_queued.set(load.queued as i64);
                let model = l.model_for(&req.model);
                LocalView {
                    available: true,
                    context_length: l
                        .models()
                        .iter()
                        .find(|m| m.id == model)
                        .and_then(|m| m.context_length)
                        .unwrap_or(0),
                    model,
                    capabilities: l.capabilities(),
                    active: load.active,
                    queued: load.queued,
                    capacity: load.capacity.unwrap_or(1),
                    prefill_tps: speed.prefill_tps,
                    decode_tps: speed.decode_tps,
                }
            });
        let network = self.hub.network();
        let cloud = cloud.and_then(|i| self.cloud(i)).map(|c| {
            let health = c.health();
            let price = c.price();
            let model = c.model_for(&req.model);
            CloudView {
                name: c.name().to_owned(),
                context_length: c
                    .models()
                    .iter()
                    .find(|m| m.id == model)
                    .and_then(|m| m.context_length),
                model,
                capabilities: c.capabilities(),
                available: self.hub.reachable(c.name()),
                breaker_open: health.breaker_open,
                price_input_per_mtok: price.input_per_mtok,
                price_output_per_mtok: price.output_per_mtok,
                rtt_ms: network.upstreams.get(c.name()).and_then(|p| p.rtt_ms),
                ttft_ms: health.ttft_ms,
                decode_tps: health.tokens_per_s,
                on_this_machine: c.on_this_machine(),
            }
        });
        let key = caller.map(|c| c.config.name.as_str());
        let (today, key_today) = self.egress.spend.today(key);
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
    pub(super) fn plan(
        &self,
        req: &GenerateRequest,
        ctx: &RequestContext,
        checked: &Checked,
    ) -> Result<Plan, ApiError> {
        let named = self.locate(&req.model)?;
        let local = match named {
            Some((Locality::Local, i)) => Some(i),
            Some((Locality::Cloud, _)) => None,
            None => (!self.locals.is_empty()).then_some(0),
        };
        let (cloud_chain, replica) = self.cloud_chain(named, req);
        let cloud = cloud_chain.first().copied();
        let mode = self.privacy_mode(ctx);
        let (pii, pii_unchecked) = match (mode, checked) {
            (PrivacyMode::Off, _) => (BTreeMap::new(), None),
            (_, Checked::Done(c)) => (c.clone(), None),
            (_, Checked::Unchecked(why)) => (BTreeMap::new(), Some(why.clone())),
        };
        let features = Features {
            named: named.map(|(s, _)| s),
            privacy: Some(mode),
            pii,
            pii_unchecked,
            // A request named for the cloud needs no exact local count.
            prompt_tokens: self.prompt_tokens(req, local),
            max_tokens: req.max_tokens,
            needs: Feature::needed_by(req),
            // A schema the device's grammar cannot enforce goes where it
            // can be answered. With no cloud to turn to, or naming the
            // local model, the request gets the model's own 400 instead.
            local_refuses: (named.is_none() && cloud.is_some())
                .then(|| local.and_then(|i| self.locals.get(i)))
                .flatten()
                .and_then(|b| b.refusal(req)),
            latency_goal_ms: ctx.latency_goal_ms,
            difficulty: None,
            difficulty_threshold: None,
            quality: ctx.quality,
        };
        let view = self.view(req, local, cloud, ctx.caller.as_deref());
        Ok(Plan {
            features,
            view,
            named,
            cloud,
            cloud_chain,
            replica,
        })
    }
}
