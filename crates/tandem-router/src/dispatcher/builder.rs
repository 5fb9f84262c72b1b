//! Putting a [`Dispatcher`] together from its parts, checked once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_api::Backend;
use tandem_embed::Embedder;
use tandem_ledger::Ledger;
use tandem_policy::privacy::{Detector, EntityRecognizer};
use tandem_policy::share::ShareHold;
use tandem_policy::{PolicyConfig, PrivacyConfig};

use super::{Dispatcher, Semantics, Speed};
use crate::access::{Access, KeyConfig, SpendTracker};
use crate::cache::SemanticCache;
use crate::egress::Egress;
use crate::memory::OutcomeMemory;
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::signals::SignalHub;
use crate::speculative::{SpeculativeConfig, Verifier};

/// Builds a [`Dispatcher`].
#[derive(Default)]
pub struct DispatcherBuilder {
    locals: Vec<Arc<dyn Backend>>,
    clouds: Vec<Arc<dyn Backend>>,
    policy: PolicyConfig,
    privacy: PrivacyConfig,
    keys: Vec<KeyConfig>,
    ledger: Option<Ledger>,
    hub: Option<SignalHub>,
    embedder: Option<(String, Arc<Embedder>)>,
    cache: Option<Arc<SemanticCache>>,
    memory: Option<Arc<OutcomeMemory>>,
    sample: Option<Arc<crate::sample::TrafficSample>>,
    speculative: SpeculativeConfig,
    recognizer: Option<Result<Arc<dyn EntityRecognizer>, String>>,
    shared: Option<Arc<Shared>>,
}

impl DispatcherBuilder {
    /// The model that finds names and addresses.
    pub fn recognizer(mut self, r: Arc<dyn EntityRecognizer>) -> Self {
        self.recognizer = Some(Ok(r));
        self
    }

    /// The model was asked for (`[privacy] recognizer`) but could not be
    /// had: requests with a privacy mode then fail closed.
    pub fn recognizer_unavailable(mut self, why: impl Into<String>) -> Self {
        self.recognizer = Some(Err(why.into()));
        self
    }

    /// A local backend. The first is the one the router places requests on.
    pub fn local(self, b: impl Backend) -> Self {
        self.local_arc(Arc::new(b))
    }

    /// A local backend already shared.
    pub fn local_arc(mut self, b: Arc<dyn Backend>) -> Self {
        self.locals.push(b);
        self
    }

    /// A cloud backend, in order of preference.
    pub fn cloud(self, b: impl Backend) -> Self {
        self.cloud_arc(Arc::new(b))
    }

    /// A cloud backend already shared.
    pub fn cloud_arc(mut self, b: Arc<dyn Backend>) -> Self {
        self.clouds.push(b);
        self
    }

    /// The `[router]` section.
    pub fn policy(mut self, p: PolicyConfig) -> Self {
        self.policy = p;
        self
    }

    /// The `[privacy]` section.
    pub fn privacy(mut self, p: PrivacyConfig) -> Self {
        self.privacy = p;
        self
    }

    /// Gateway keys; none means open (loopback only, unless told otherwise).
    pub fn keys(mut self, k: Vec<KeyConfig>) -> Self {
        self.keys = k;
        self
    }

    /// The egress ledger; today's spending is read back from it.
    pub fn ledger(mut self, l: Ledger) -> Self {
        self.ledger = Some(l);
        self
    }

    /// The signal hub (default: one reading this machine).
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

    /// The semantic cache (needs an embedder too).
    pub fn cache(mut self, c: Arc<SemanticCache>) -> Self {
        self.cache = Some(c);
        self
    }

    /// The cascade's outcomes, read by the learned router (needs one, and
    /// the cascade, to learn anything).
    pub fn memory(mut self, m: Arc<OutcomeMemory>) -> Self {
        self.memory = Some(m);
        self
    }

    /// Where a sample of routed prompts is kept for labelling
    /// (`[router.sample]`).
    pub fn sample(mut self, s: Arc<crate::sample::TrafficSample>) -> Self {
        self.sample = Some(s);
        self
    }

    /// The `[speculative]` section.
    pub fn speculative(mut self, s: SpeculativeConfig) -> Self {
        self.speculative = s;
        self
    }

    /// Keys, rate limits, spending and the cache's entries kept in a store
    /// shared with other replicas (see [`Dispatcher::start_shared`]).
    pub fn shared(mut self, s: Arc<Shared>) -> Self {
        self.shared = Some(s);
        self
    }

    /// Checks the configuration and builds the dispatcher.
    pub fn build(self) -> Result<Arc<Dispatcher>, String> {
        let spend = Arc::new(match &self.shared {
            Some(s) => SpendTracker::shared(s.clone()),
            None => SpendTracker::default(),
        });
        // With a shared store, spending is the store's (the ledger of one
        // replica is not the deployment's).
        if let Some(l) = self.ledger.as_ref().filter(|_| self.shared.is_none()) {
            match tandem_ledger::read(l.path()) {
                Ok(entries) => spend.seed_from_ledger(&entries),
                Err(e) => return Err(format!("reading the ledger: {e}")),
            }
        }
        let hold = match self.policy.cloud_share {
            Some(share) if !(0.0..=1.0).contains(&share) => {
                return Err(format!(
                    "[router] cloud_share = {share}: it is a share of requests, between 0 and 1"
                ));
            }
            Some(_) if self.policy.cloud_share_window == 0 => {
                return Err("[router] cloud_share_window must be at least 1".into());
            }
            Some(share) => Some(Mutex::new(ShareHold::new(
                share,
                self.policy.cloud_share_window,
            ))),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let mut access = Access::new(&self.keys)?;
        if let Some(s) = &self.shared {
            s.attach_metrics(metrics.clone());
            access = access.with_shared(s.clone(), spend.clone(), self.policy.daily_budget_usd);
        }
        let in_flight = self.clouds.iter().map(|_| Arc::default()).collect();
        let sessions = self.locals.iter().filter_map(|l| l.sessions()).collect();
        Ok(Arc::new(Dispatcher {
            sessions,
            locals: self.locals,
            clouds: self.clouds,
            hub: self.hub.unwrap_or_default(),
            detector_runs_model: matches!(self.recognizer, Some(Ok(_))),
            detector: {
                let d = Detector::new(&self.privacy.custom_patterns)?
                    .with_allow_list(&self.privacy.allow_list);
                match self.recognizer {
                    None => d,
                    Some(Ok(r)) => d.with_recognizer(r),
                    Some(Err(why)) => d.without_recognizer(why),
                }
            },
            policy: self.policy,
            egress: Arc::new(Egress {
                ledger: self.ledger,
                spend,
                metrics: metrics.clone(),
            }),
            access,
            local_speed: Mutex::new(Speed::default()),
            semantics: Semantics {
                embedder: self.embedder,
                embed_slots: tokio::sync::Semaphore::new(
                    std::thread::available_parallelism().map_or(1, |n| n.get()),
                ),
                scorer: Mutex::new(None),
                cache: self.cache,
                memory: self.memory,
                sample: self.sample,
                hold,
            },
            verifier: Arc::new(Verifier::new(
                Duration::from_secs(self.speculative.session_idle_s.max(1)),
                metrics,
            )),
            speculative: self.speculative,
            activity: Arc::new(crate::activity::Activity::new()),
            in_flight,
            shared: self.shared,
            config_keys: self.keys,
        }))
    }
}
