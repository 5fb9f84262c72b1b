//! State that gateway replicas share: the key registry, per-key rate limits,
//! today's spending against budgets, and the semantic cache's entries.
//!
//! One process keeps all of it in memory ([`crate::access`], the cache);
//! several replicas behind a load balancer must agree on it, or each allows
//! the whole budget and rate. [`SharedStore`] is what such a store offers
//! (Redis is one, in `tandem-redis`), and [`Shared`] is the gateway's link
//! to it: every call is bounded by a timeout, its health is tracked for
//! `/healthz` and the metrics, spending that could not be written is kept
//! and written when the store returns, and what happens while it is away
//! is the operator's choice ([`OnUnavailable`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::access::KeyConfig;
use crate::metrics::Metrics;

fn d_prefix() -> String {
    "tandem:".into()
}
fn d_timeout() -> u64 {
    250
}
fn d_sync() -> u64 {
    200
}

/// What a replica does while the shared store cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnavailable {
    /// Keep serving with this replica's own view: the keys it last saw,
    /// rate limits and budgets counted locally; spending is written to the
    /// store when it returns.
    #[default]
    Open,
    /// Refuse keyed requests with 503 `shared_state_unavailable`.
    Closed,
}

impl OnUnavailable {
    /// Its name in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::Open => "open",
            OnUnavailable::Closed => "closed",
        }
    }
}

/// The `[shared]` section of the configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedConfig {
    /// `redis://[user:password@]host:port[/db]`; none: this process keeps
    /// its state to itself.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// What happens while the store is unreachable.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
    /// Prefix of every key Tandem writes, so deployments can share a Redis.
    #[serde(default = "d_prefix")]
    pub prefix: String,
    /// Longest wait for one call to the store before it counts as down.
    #[serde(default = "d_timeout")]
    pub timeout_ms: u64,
    /// How often the key registry and the cache's new entries are read.
    #[serde(default = "d_sync")]
    pub sync_ms: u64,
}

impl Default for SharedConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("defaults parse"))
    }
}

/// What the store says about a key presented by a caller.
#[derive(Debug, Clone)]
pub enum Admission {
    /// No such key (never made, or revoked).
    Unknown,
    /// The key, within its rate limit (one request counted); today's
    /// spending (all keys, this key) as the store has it now; and the
    /// advance held for the request (0: none).
    Admitted(KeyConfig, SpendNow, f64),
    /// The key, over its rate limit (nothing counted).
    Limited(KeyConfig),
}

/// What an admission asks of the store besides the key.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdmitAsk {
    /// The UTC day (days since 1970) whose spending is read.
    pub day: u64,
    /// To hold for the request when a budget applies (0: nothing).
    pub advance_usd: f64,
    /// The gateway's daily budget (the key's is in its configuration).
    pub budget: Option<f64>,
}

/// Today's spending, USD: settled plus reserved by requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SpendNow {
    /// All keys.
    pub total: f64,
    /// The key asked about.
    pub key: f64,
}

/// A new entry of the shared cache log.
#[derive(Debug, Clone)]
pub struct CacheLine {
    /// Its position in the log (read on after it).
    pub id: String,
    /// The replica that wrote it.
    pub origin: String,
    /// The entry, as the cache writes it to its file.
    pub entry: String,
}

/// A store several gateway replicas share. Every operation that changes
/// a limit is atomic in the store, so that replicas racing each other
/// never both take the last of anything.
#[async_trait::async_trait]
pub trait SharedStore: Send + Sync {
    /// Where it is, for people (no credentials).
    fn describe(&self) -> String;
    /// Looks a key up by its hash and, when it has a rate limit, takes one
    /// request from it; reads the spending of the day and, when a budget
    /// applies and is not reached, holds the advance asked for — all in
    /// one round trip.
    async fn admit(&self, hash: &str, ask: &AdmitAsk) -> Result<Admission, String>;
    /// Every key.
    async fn keys(&self) -> Result<Vec<KeyConfig>, String>;
    /// Writes the configuration file's keys (overwriting those of the same
    /// name), except those revoked through the API.
    async fn seed_keys(&self, keys: &[KeyConfig]) -> Result<(), String>;
    /// Adds a key; `false` when its name is taken.
    async fn create_key(&self, key: &KeyConfig) -> Result<bool, String>;
    /// Replaces the key of the same name; `false` when there is none.
    async fn update_key(&self, key: &KeyConfig) -> Result<bool, String>;
    /// Removes a key for good; `false` when there was none.
    async fn revoke_key(&self, name: &str) -> Result<bool, String>;
    /// Spending of UTC day `day` (days since 1970).
    async fn spend(&self, day: u64, key: Option<&str>) -> Result<SpendNow, String>;
    /// Reserves `usd` for a request about to leave when what is spent and
    /// reserved is below each budget given; says whether it did.
    async fn reserve(
        &self,
        day: u64,
        key: Option<&str>,
        usd: f64,
        budget: Option<f64>,
        key_budget: Option<f64>,
    ) -> Result<bool, String>;
    /// Releases a reservation and adds what the request cost.
    async fn settle(
        &self,
        day: u64,
        key: Option<&str>,
        reserved: f64,
        spent: f64,
    ) -> Result<(), String>;
    /// Appends a cache entry to the shared log.
    async fn cache_put(&self, origin: &str, entry: &str) -> Result<(), String>;
    /// Entries after `after` (`"0"`: from the start), at most `max`.
    async fn cache_read(&self, after: &str, max: usize) -> Result<Vec<CacheLine>, String>;
}

/// A settlement the store has not taken yet.
#[derive(Debug, Clone)]
pub(crate) struct PendingSpend {
    pub day: u64,
    pub key: Option<String>,
    pub reserved: f64,
    pub spent: f64,
}

/// What `/healthz` says about the shared store.
#[derive(Debug, Clone, Serialize)]
pub struct SharedStatus {
    /// Where it is.
    pub store: String,
    /// Whether the last call reached it.
    pub reachable: bool,
    /// What this replica does while it cannot.
    pub on_unavailable: &'static str,
    /// Spending written locally, waiting for the store.
    pub pending_spend_updates: usize,
    /// Why the last failed call failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The gateway's link to its shared store.
pub struct Shared {
    store: Arc<dyn SharedStore>,
    config: SharedConfig,
    /// This replica, in the cache log (so it skips its own entries).
    pub(crate) origin: String,
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    pub(crate) pending: Mutex<Vec<PendingSpend>>,
    metrics: Mutex<Option<Arc<Metrics>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("store", &self.store.describe())
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A link to `store`, configured by `config`.
    pub fn new(store: Arc<dyn SharedStore>, config: SharedConfig) -> Arc<Shared> {
        let mut id = [0u8; 8];
        // A clash only makes two replicas skip each other's cache entries.
        let _ = getrandom::fill(&mut id);
        Arc::new(Shared {
            store,
            config,
            origin: hex::encode(id),
            up: AtomicBool::new(true),
            last_error: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            metrics: Mutex::new(None),
        })
    }

    pub(crate) fn attach_metrics(&self, m: Arc<Metrics>) {
        m.shared_up.set(1);
        *self.metrics.lock().unwrap_or_else(|p| p.into_inner()) = Some(m);
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn SharedStore> {
        &self.store
    }

    /// Its configuration.
    pub fn config(&self) -> &SharedConfig {
        &self.config
    }

    /// Whether the last call reached the store.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// For `/healthz`.
    pub fn status(&self) -> SharedStatus {
        SharedStatus {
            store: self.store.describe(),
            reachable: self.is_up(),
            on_unavailable: self.config.on_unavailable.as_str(),
            pending_spend_updates: self.pending.lock().map_or(0, |p| p.len()),
            last_error: self
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .filter(|_| !self.is_up()),
        }
    }

    /// Runs one call to the store within the timeout, noting whether it
    /// answered.
    pub async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        let limit = Duration::from_millis(self.config.timeout_ms.max(1));
        let result = match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
        };
        let metrics = self.metrics.lock().ok().and_then(|m| m.clone());
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "shared state at {} is reachable again",
                        self.store.describe()
                    );
                }
                if let Some(m) = metrics {
                    m.shared_up.set(1);
                }
            }
            Err(e) => {
                if self.up.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "shared state at {} is unreachable ({what}: {e}); {}",
                        self.store.describe(),
                        match self.config.on_unavailable {
                            OnUnavailable::Open => "serving with this replica's own limits",
                            OnUnavailable::Closed => "refusing keyed requests",
                        }
                    );
                }
                if let Some(m) = metrics {
                    m.shared_up.set(0);
                    m.shared_errors.inc();
                }
                if let Ok(mut l) = self.last_error.lock() {
                    *l = Some(format!("{what}: {e}"));
                }
            }
        }
        result
    }

    /// [`Shared::call`] for a request that is waiting: while the store is
    /// known to be away it is not asked (each request would wait out the
    /// timeout); the background reading finds it back.
    pub async fn call_now<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        if !self.is_up() {
            return Err(self
                .last_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "unreachable".into()));
        }
        self.call(what, fut).await
    }

    /// The error a keyed request gets while the store is away and the
    /// replica fails closed.
    pub fn unavailable(&self, e: &str) -> tandem_api::ApiError {
        tandem_api::ApiError::unavailable(format!(
            "the shared state ({}) cannot be reached and this gateway is configured to refuse requests then ([shared] on_unavailable = \"closed\"): {e}",
            self.store.describe()
        ))
        .with_code("shared_state_unavailable")
    }

    /// Fails closed?
    pub fn closed(&self) -> bool {
        self.config.on_unavailable == OnUnavailable::Closed
    }

    /// Writes spending kept while the store was away; keeps what still
    /// fails.
    pub(crate) async fn flush_pending(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if pending.is_empty() {
            return;
        }
        let mut left = Vec::new();
        let mut failed = false;
        for p in pending {
            if failed {
                left.push(p);
                continue;
            }
            let r = self
                .call(
                    "settle",
                    self.store
                        .settle(p.day, p.key.as_deref(), p.reserved, p.spent),
                )
                .await;
            if r.is_err() {
                failed = true;
                left.push(p);
            }
        }
        if !left.is_empty() {
            let mut now = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            left.append(&mut now);
            *now = left;
        }
    }
}
