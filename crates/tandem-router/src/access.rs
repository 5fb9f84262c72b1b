//! Gateway API keys and daily spending.
//!
//! Keys are stored only as sha256 hashes; each may carry its own privacy
//! mode, daily budget and rate limit. With no keys configured the gateway
//! is open — which is why it then listens on loopback only unless told
//! otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_api::ApiError;

use tandem_policy::PrivacyMode;

use crate::shared::{Admission, Shared};

/// One gateway key, as configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Who it is for (ledger, metrics).
    pub name: String,
    /// `sha256:<hex>` of the key.
    pub hash: String,
    /// Its privacy mode (headers may only tighten it).
    #[serde(default)]
    pub privacy: Option<PrivacyMode>,
    /// Its daily cloud budget, USD.
    #[serde(default)]
    pub daily_budget_usd: Option<f64>,
    /// Requests per minute.
    #[serde(default)]
    pub rate_limit_per_minute: Option<u32>,
    /// May change signal overrides.
    #[serde(default)]
    pub admin: bool,
}

/// A fresh random key (256 bits from the operating system's CSPRNG) and
/// its hash for the configuration.
pub fn new_key() -> Result<(String, String), String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| format!("the operating system's random source failed: {e}"))?;
    let raw = format!("tdm_{}", hex::encode(bytes));
    let hash = hash_key(&raw);
    Ok((raw, hash))
}

/// The key in an `Authorization` header: the auth scheme is matched
/// case-insensitively (RFC 9110 §11.1), the key itself exactly.
fn bearer(header: &str) -> Option<&str> {
    let header = header.trim_start();
    let (scheme, rest) = header.split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|k| !k.is_empty())
}

/// `sha256:<hex>` of a key.
pub fn hash_key(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Caller {
    /// The key's configuration.
    pub config: KeyConfig,
    bucket: Arc<Mutex<Bucket>>,
    /// What this key's last cloud requests were reserved for (f64 bits):
    /// the advance its next admission asks the shared store to hold.
    typical: Arc<std::sync::atomic::AtomicU64>,
    /// Held for this request when it was admitted (shared store only).
    advance: Option<Arc<Advance>>,
}

/// Money the shared store held for one request when it admitted it, so
/// that its cloud leg need not ask again; given back when the request ends
/// without using it.
#[derive(Debug)]
pub struct Advance {
    spend: Arc<SpendTracker>,
    key: String,
    held: Mutex<Option<Reservation>>,
}

impl Advance {
    fn take(&self) -> Option<Reservation> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl Drop for Advance {
    fn drop(&mut self) {
        if let Some(r) = self.take() {
            self.spend.settle(Some(&self.key), Some(r), 0.0);
        }
    }
}

impl Caller {
    /// The money held for this request at admission, if any (taken once).
    pub fn take_advance(&self) -> Option<Reservation> {
        self.advance.as_ref().and_then(|a| a.take())
    }

    /// Notes what a cloud request of this key was reserved for: the next
    /// admission's advance is about the largest of the recent ones.
    pub fn note_reserved(&self, usd: f64) {
        use std::sync::atomic::Ordering::Relaxed;
        let before = f64::from_bits(self.typical.load(Relaxed));
        let next = usd.max(before * 0.95);
        self.typical.store(next.to_bits(), Relaxed);
    }

    fn typical(&self) -> f64 {
        f64::from_bits(self.typical.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn take_token(&self) -> bool {
        let Some(rpm) = self.config.rate_limit_per_minute else {
            return true;
        };
        let cap = f64::from(rpm.max(1));
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * cap / 60.0).min(cap);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The keys: those of the configuration file, those made through the
/// admin API, and — with a shared store — every replica's. With a shared
/// store the store decides (revocation and rate limits hold across
/// replicas); the map here is its last known copy, used while it is away
/// when the gateway fails open.
#[derive(Debug, Default)]
pub struct Access {
    by_hash: RwLock<HashMap<String, Arc<Caller>>>,
    shared: Option<Arc<Shared>>,
    /// Where the spending read with each admission goes.
    spend: Option<Arc<SpendTracker>>,
    /// The gateway's daily budget, which admissions hold advances against.
    budget: Option<f64>,
}

fn checked_hash(k: &KeyConfig) -> Result<String, String> {
    let hex = k
        .hash
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("key `{}`: hash must start with sha256:", k.name))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("key `{}`: hash must be 64 hex digits", k.name));
    }
    Ok(format!("sha256:{}", hex.to_ascii_lowercase()))
}

fn fresh_caller(config: KeyConfig) -> Arc<Caller> {
    let cap = f64::from(config.rate_limit_per_minute.unwrap_or(0).max(1));
    Arc::new(Caller {
        config,
        bucket: Arc::new(Mutex::new(Bucket {
            tokens: cap,
            last: Instant::now(),
        })),
        typical: Arc::default(),
        advance: None,
    })
}

/// A key name people and metrics can read: 1–64 of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "key name `{}` must be 1 to 64 characters of A-Z, a-z, 0-9, `.`, `_`, `-`",
            name.chars().take(64).collect::<String>()
        ));
    }
    Ok(())
}

/// Applies the fields of a JSON object (`privacy`, `daily_budget_usd`,
/// `rate_limit_per_minute`, `admin`; `null` clears a limit) to a key.
pub fn apply_changes(
    key: &KeyConfig,
    changes: &serde_json::Map<String, serde_json::Value>,
) -> Result<KeyConfig, String> {
    let mut v = serde_json::to_value(key).map_err(|e| e.to_string())?;
    for (field, value) in changes {
        match field.as_str() {
            "privacy" | "daily_budget_usd" | "rate_limit_per_minute" | "admin" => {
                v[field] = value.clone();
            }
            "name" | "hash" => {
                return Err(format!(
                    "`{field}` of a key cannot be changed: revoke it and make a new one"
                ));
            }
            other => {
                return Err(format!(
                    "unknown field `{}`: a key has privacy, daily_budget_usd, rate_limit_per_minute, admin",
                    other.chars().take(64).collect::<String>()
                ));
            }
        }
    }
    if v["admin"].is_null() {
        v["admin"] = serde_json::Value::Bool(false);
    }
    let k: KeyConfig = serde_json::from_value(v).map_err(|e| e.to_string())?;
    if k.daily_budget_usd
        .is_some_and(|b| !b.is_finite() || b < 0.0)
    {
        return Err("daily_budget_usd must be a number of dollars, 0 or more".into());
    }
    Ok(k)
}

fn store_error(e: String) -> ApiError {
    ApiError::unavailable(format!("the shared state cannot be reached: {e}"))
        .with_code("shared_state_unavailable")
}

impl Access {
    /// Checks each key's hash.
    pub fn new(keys: &[KeyConfig]) -> Result<Access, String> {
        let mut by_hash = HashMap::new();
        for k in keys {
            check_name(&k.name)?;
            by_hash.insert(checked_hash(k)?, fresh_caller(k.clone()));
        }
        Ok(Access {
            by_hash: RwLock::new(by_hash),
            shared: None,
            spend: None,
            budget: None,
        })
    }

    /// Keys live in a shared store from now on; the spending each
    /// admission reads from it goes to `spend`, and admissions hold an
    /// advance against `budget` (the gateway's) and each key's own.
    pub fn with_shared(
        mut self,
        shared: Arc<Shared>,
        spend: Arc<SpendTracker>,
        budget: Option<f64>,
    ) -> Self {
        self.shared = Some(shared);
        self.spend = Some(spend);
        self.budget = budget;
        self
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Caller>>> {
        self.by_hash.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Caller>>> {
        self.by_hash.write().unwrap_or_else(|p| p.into_inner())
    }

    /// No keys: anyone may call. A gateway sharing state is never open.
    pub fn is_open(&self) -> bool {
        self.shared.is_none() && self.read().is_empty()
    }

    /// The caller whose key `authorization` carries, without spending a
    /// rate-limit token (for read-only views such as `/healthz`).
    pub fn identify(&self, authorization: Option<&str>) -> Option<Arc<Caller>> {
        let key = authorization.and_then(bearer)?;
        self.read().get(&hash_key(key)).cloned()
    }

    /// The caller for `config` under `hash`, keeping the rate-limit state
    /// of the one known before.
    fn remember(&self, hash: &str, config: KeyConfig) -> Arc<Caller> {
        if let Some(c) = self.read().get(hash)
            && serde_json::to_value(&c.config).ok() == serde_json::to_value(&config).ok()
        {
            return c.clone();
        }
        let caller = fresh_caller(config);
        self.write().insert(hash.to_owned(), caller.clone());
        caller
    }

    /// Replaces the known keys with the shared store's (kept for when it
    /// cannot be reached).
    pub(crate) fn mirror(&self, keys: Vec<KeyConfig>) {
        let mut fresh = HashMap::new();
        for k in keys {
            let Ok(hash) = checked_hash(&k) else { continue };
            fresh.insert(hash.clone(), k);
        }
        let mut map = self.write();
        map.retain(|h, _| fresh.contains_key(h));
        for (hash, k) in fresh {
            let same = map.get(&hash).is_some_and(|c| {
                serde_json::to_value(&c.config).ok() == serde_json::to_value(&k).ok()
            });
            if !same {
                map.insert(hash, fresh_caller(k));
            }
        }
    }

    /// Checks the `Authorization` header. `Ok(None)`: no keys configured.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Option<Arc<Caller>>, ApiError> {
        if self.is_open() {
            return Ok(None);
        }
        let key = authorization.and_then(bearer).ok_or_else(|| {
            ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
        })?;
        let hash = hash_key(key);
        if let Some(shared) = &self.shared {
            let day = today();
            // What this key's cloud requests were recently reserved for,
            // held now in the same round trip as the admission.
            let advance = self.read().get(&hash).map_or(0.0, |c| c.typical());
            let ask = crate::shared::AdmitAsk {
                day,
                advance_usd: advance,
                budget: self.budget,
            };
            match shared
                .call_now("admit", shared.store().admit(&hash, &ask))
                .await
            {
                Ok(Admission::Unknown) => {
                    self.write().remove(&hash);
                    return Err(ApiError::unauthorized("invalid API key"));
                }
                Ok(Admission::Limited(config)) => return Err(limited(&config)),
                Ok(Admission::Admitted(config, spent, held)) => {
                    let caller = self.remember(&hash, config);
                    let Some(spend) = &self.spend else {
                        return Ok(Some(caller));
                    };
                    // The policy sees what others spent and hold, not
                    // this request's own advance.
                    spend.observe(
                        day,
                        &caller.config.name,
                        crate::shared::SpendNow {
                            total: spent.total - held,
                            key: spent.key - held,
                        },
                    );
                    if held <= 0.0 {
                        return Ok(Some(caller));
                    }
                    let advance = Arc::new(Advance {
                        spend: spend.clone(),
                        key: caller.config.name.clone(),
                        held: Mutex::new(Some(Reservation {
                            day,
                            usd: held,
                            shared: true,
                        })),
                    });
                    return Ok(Some(Arc::new(Caller {
                        config: caller.config.clone(),
                        bucket: caller.bucket.clone(),
                        typical: caller.typical.clone(),
                        advance: Some(advance),
                    })));
                }
                Err(e) if shared.closed() => return Err(shared.unavailable(&e)),
                // Fail open: this replica's copy of the keys and its own
                // rate count.
                Err(_) => {}
            }
        }
        let caller = self
            .read()
            .get(&hash)
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
        if !caller.take_token() {
            return Err(limited(&caller.config));
        }
        Ok(Some(caller))
    }

    /// Every key (hashes, never the keys themselves), by name.
    pub async fn list(&self) -> Result<Vec<KeyConfig>, ApiError> {
        let mut keys = match &self.shared {
            Some(s) => {
                let keys = s
                    .call("keys", s.store().keys())
                    .await
                    .map_err(store_error)?;
                self.mirror(keys.clone());
                keys
            }
            None => self.read().values().map(|c| c.config.clone()).collect(),
        };
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(keys)
    }

    /// Makes a key named `name` with `changes` applied; returns the key
    /// (shown once) and its configuration. 409 when the name is taken.
    pub async fn create(
        &self,
        name: &str,
        changes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(String, KeyConfig), ApiError> {
        check_name(name).map_err(|e| ApiError::invalid_param("name", e))?;
        let (raw, hash) = new_key().map_err(ApiError::internal)?;
        let blank = KeyConfig {
            name: name.to_owned(),
            hash: hash.clone(),
            privacy: None,
            daily_budget_usd: None,
            rate_limit_per_minute: None,
            admin: false,
        };
        let config = apply_changes(&blank, changes).map_err(ApiError::invalid_request)?;
        let taken = || {
            ApiError::new(
                409,
                tandem_api::ErrorKind::InvalidRequestError,
                format!("a key named `{name}` exists: revoke it first or choose another name"),
            )
            .with_code("key_exists")
        };
        match &self.shared {
            Some(s) => {
                let made = s
                    .call("create key", s.store().create_key(&config))
                    .await
                    .map_err(store_error)?;
                if !made {
                    return Err(taken());
                }
            }
            None => {
                if self.read().values().any(|c| c.config.name == name) {
                    return Err(taken());
                }
            }
        }
        self.write().insert(hash, fresh_caller(config.clone()));
        Ok((raw, config))
    }

    /// Changes a key's limits, privacy mode or admin right.
    pub async fn update(
        &self,
        name: &str,
        changes: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<KeyConfig, ApiError> {
        let current = self
            .list()
            .await?
            .into_iter()
            .find(|k| k.name == name)
            .ok_or_else(|| no_such_key(name))?;
        let config = apply_changes(&current, changes).map_err(ApiError::invalid_request)?;
        if let Some(s) = &self.shared {
            let found = s
                .call("update key", s.store().update_key(&config))
                .await
                .map_err(store_error)?;
            if !found {
                return Err(no_such_key(name));
            }
        }
        let hash = checked_hash(&config).map_err(ApiError::internal)?;
        self.write().insert(hash, fresh_caller(config.clone()));
        Ok(config)
    }

    /// Revokes a key: from now on it is refused (on every replica).
    pub async fn revoke(&self, name: &str) -> Result<(), ApiError> {
        if let Some(s) = &self.shared {
            let found = s
                .call("revoke key", s.store().revoke_key(name))
                .await
                .map_err(store_error)?;
            let known = self.read().values().any(|c| c.config.name == name);
            self.write().retain(|_, c| c.config.name != name);
            return if found || known {
                Ok(())
            } else {
                Err(no_such_key(name))
            };
        }
        let mut map = self.write();
        let before = map.len();
        map.retain(|_, c| c.config.name != name);
        if map.len() == before {
            return Err(no_such_key(name));
        }
        Ok(())
    }
}

fn no_such_key(name: &str) -> ApiError {
    ApiError::not_found(format!(
        "no key named `{}`",
        name.chars().take(64).collect::<String>()
    ))
    .with_code("key_not_found")
}

fn limited(config: &KeyConfig) -> ApiError {
    ApiError::rate_limited(format!(
        "rate limit of {} requests per minute reached for key `{}`",
        config.rate_limit_per_minute.unwrap_or(0),
        config.name
    ))
}

fn today() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0)
}

#[derive(Debug, Default)]
struct SpendState {
    day: u64,
    total: f64,
    by_key: HashMap<String, f64>,
    /// Held by requests in flight, released when they settle.
    reserved: f64,
    reserved_by_key: HashMap<String, f64>,
}

/// Money held for one request that is leaving the device, until it
/// settles.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reservation {
    day: u64,
    usd: f64,
    /// Held in the shared store (else only here).
    shared: bool,
}

impl Reservation {
    /// Whether it holds at least `usd`.
    pub fn covers(&self, usd: f64) -> bool {
        self.usd >= usd
    }
}

/// The budgets that apply to one request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Budgets {
    /// The gateway's daily budget.
    pub total: Option<f64>,
    /// The key's.
    pub key: Option<f64>,
}

/// Cloud spending of the current UTC day, overall and per key — in this
/// process, or in the shared store with a copy here.
///
/// A request reserves what it may cost before it leaves, and is refused
/// when what is spent and reserved already reaches a budget; it settles
/// with what it did cost. So concurrent requests, here or on other
/// replicas, overshoot a budget by at most one request's cost.
#[derive(Debug, Default)]
pub struct SpendTracker {
    state: Mutex<SpendState>,
    shared: Option<Arc<Shared>>,
}

impl SpendTracker {
    /// Spending kept in `shared` (with a copy here).
    pub fn shared(shared: Arc<Shared>) -> Self {
        SpendTracker {
            state: Mutex::default(),
            shared: Some(shared),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpendState> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let d = today();
        if s.day != d {
            *s = SpendState {
                day: d,
                ..SpendState::default()
            };
        }
        s
    }

    /// Adds spending of `key` (if any), here only.
    pub fn add(&self, key: Option<&str>, usd: f64) {
        if usd <= 0.0 {
            return;
        }
        let mut s = self.lock();
        s.total += usd;
        if let Some(k) = key {
            *s.by_key.entry(k.to_owned()).or_insert(0.0) += usd;
        }
    }

    /// (all keys, this key) spent today, as this replica knows it.
    pub fn today(&self, key: Option<&str>) -> (f64, f64) {
        let s = self.lock();
        (
            s.total,
            key.and_then(|k| s.by_key.get(k)).copied().unwrap_or(0.0),
        )
    }

    /// Takes today's spending as the shared store had it when it admitted
    /// a request of `key` (spent and reserved), so that the policy sees
    /// what every replica spent without another round trip.
    pub fn observe(&self, day: u64, key: &str, now: crate::shared::SpendNow) {
        let mut s = self.lock();
        if s.day == day {
            s.total = now.total.max(0.0);
            s.by_key.insert(key.to_owned(), now.key.max(0.0));
        }
    }

    /// Holds `usd` for a request about to leave. `Ok(None)`: a budget is
    /// reached (spent and reserved). With no budget nothing is held.
    pub async fn reserve(
        &self,
        key: Option<&str>,
        usd: f64,
        budgets: Budgets,
    ) -> Result<Option<Reservation>, ApiError> {
        let day = today();
        if budgets.total.is_none() && budgets.key.is_none() {
            return Ok(Some(Reservation {
                day,
                usd: 0.0,
                shared: false,
            }));
        }
        let usd = usd.max(0.0);
        if let Some(shared) = &self.shared {
            match shared
                .call_now(
                    "reserve",
                    shared
                        .store()
                        .reserve(day, key, usd, budgets.total, budgets.key),
                )
                .await
            {
                Ok(true) => {
                    return Ok(Some(Reservation {
                        day,
                        usd,
                        shared: true,
                    }));
                }
                Ok(false) => return Ok(None),
                Err(e) if shared.closed() => return Err(shared.unavailable(&e)),
                Err(_) => {}
            }
        }
        let mut s = self.lock();
        let key_spent = key.and_then(|k| s.by_key.get(k)).copied().unwrap_or(0.0);
        let key_held = key
            .and_then(|k| s.reserved_by_key.get(k))
            .copied()
            .unwrap_or(0.0);
        if budgets.total.is_some_and(|b| s.total + s.reserved >= b)
            || budgets.key.is_some_and(|b| key_spent + key_held >= b)
        {
            return Ok(None);
        }
        s.reserved += usd;
        if let Some(k) = key {
            *s.reserved_by_key.entry(k.to_owned()).or_insert(0.0) += usd;
        }
        Ok(Some(Reservation {
            day,
            usd,
            shared: false,
        }))
    }

    /// Releases a reservation and adds what the request cost: here at
    /// once, in the shared store as soon as it takes it.
    pub fn settle(&self, key: Option<&str>, reservation: Option<Reservation>, usd: f64) {
        let usd = usd.max(0.0);
        let r = reservation.unwrap_or_default();
        {
            let mut s = self.lock();
            if !r.shared && r.usd > 0.0 && s.day == r.day {
                s.reserved = (s.reserved - r.usd).max(0.0);
                if let Some(k) = key
                    && let Some(v) = s.reserved_by_key.get_mut(k)
                {
                    *v = (*v - r.usd).max(0.0);
                }
            }
        }
        self.add(key, usd);
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let held = if r.shared { r.usd } else { 0.0 };
        if held <= 0.0 && usd <= 0.0 {
            return;
        }
        let pending = crate::shared::PendingSpend {
            day: if r.usd > 0.0 { r.day } else { today() },
            key: key.map(str::to_owned),
            reserved: held,
            spent: usd,
        };
        // Settling never waits on the store; what it cannot take now is
        // kept and written when it returns.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let p = pending.clone();
                    let r = shared
                        .call_now(
                            "settle",
                            shared
                                .store()
                                .settle(p.day, p.key.as_deref(), p.reserved, p.spent),
                        )
                        .await;
                    if r.is_err() {
                        shared
                            .pending
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(pending);
                    }
                });
            }
            Err(_) => shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(pending),
        }
    }

    /// Seeds today's spending from ledger entries (so a restart does not
    /// reset the budget).
    pub fn seed_from_ledger(&self, entries: &[tandem_ledger::Entry]) {
        let d = today();
        for e in entries.iter().filter(|e| e.time_ms / 86_400_000 == d) {
            self.add(e.egress.key.as_deref(), e.egress.cost_usd);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(a: &Access, h: Option<&str>) -> Result<Option<Arc<Caller>>, ApiError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(a.authenticate(h))
    }

    #[test]
    fn keys_authenticate_by_hash_and_rate_limit() {
        let (raw, hash) = new_key().expect("random source");
        let access = Access::new(&[KeyConfig {
            name: "app".into(),
            hash,
            privacy: Some(PrivacyMode::Strict),
            daily_budget_usd: None,
            rate_limit_per_minute: Some(2),
            admin: false,
        }])
        .unwrap();
        assert_eq!(auth(&access, None).unwrap_err().status, 401);
        assert_eq!(auth(&access, Some("Bearer nope")).unwrap_err().status, 401);
        let bearer = format!("Bearer {raw}");
        let c = auth(&access, Some(&bearer)).unwrap().unwrap();
        assert_eq!(c.config.privacy, Some(PrivacyMode::Strict));
        auth(&access, Some(&bearer)).unwrap();
        assert_eq!(auth(&access, Some(&bearer)).unwrap_err().status, 429);
    }

    #[test]
    fn the_auth_scheme_is_case_insensitive_and_keys_are_random() {
        let (raw, hash) = new_key().expect("random source");
        let (other, _) = new_key().expect("random source");
        assert_ne!(raw, other);
        assert_eq!(raw.len(), 4 + 64);
        let access = Access::new(&[KeyConfig {
            name: "app".into(),
            hash,
            privacy: None,
            daily_budget_usd: None,
            rate_limit_per_minute: None,
            admin: false,
        }])
        .unwrap();
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let h = format!("{scheme}  {raw} ");
            assert!(auth(&access, Some(&h)).is_ok(), "{h}");
        }
        for bad in [
            format!("Basic {raw}"),
            format!("Bearer{raw}"),
            "Bearer ".into(),
        ] {
            assert_eq!(auth(&access, Some(&bad)).unwrap_err().status, 401, "{bad}");
        }
        let wrong_case = format!("Bearer {}", raw.to_uppercase());
        assert_eq!(auth(&access, Some(&wrong_case)).unwrap_err().status, 401);
    }

    #[test]
    fn open_when_no_keys() {
        assert!(auth(&Access::new(&[]).unwrap(), None).unwrap().is_none());
    }

    #[test]
    fn spend_accumulates_per_key() {
        let s = SpendTracker::default();
        s.add(Some("a"), 0.5);
        s.add(None, 0.25);
        assert_eq!(s.today(Some("a")), (0.75, 0.5));
        assert_eq!(s.today(Some("b")), (0.75, 0.0));
    }

    #[test]
    fn concurrent_requests_overshoot_a_budget_by_at_most_one() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let s = SpendTracker::default();
        let budgets = Budgets {
            total: Some(1.0),
            key: None,
        };
        let r1 = rt.block_on(s.reserve(Some("a"), 0.6, budgets)).unwrap();
        let r2 = rt.block_on(s.reserve(Some("a"), 0.6, budgets)).unwrap();
        assert!(r1.is_some() && r2.is_some());
        // 1.2 is held: a third waits for them, whatever the key.
        assert!(
            rt.block_on(s.reserve(Some("b"), 0.1, budgets))
                .unwrap()
                .is_none()
        );
        s.settle(Some("a"), r1, 0.3);
        // 0.3 spent + 0.6 held is below 1.0: one more may go.
        let r3 = rt.block_on(s.reserve(Some("a"), 0.1, budgets)).unwrap();
        assert!(r3.is_some());
        s.settle(Some("a"), r2, 0.3);
        s.settle(Some("a"), r3, 0.1);
        let r4 = rt.block_on(s.reserve(Some("a"), 0.6, budgets)).unwrap();
        assert!(r4.is_some(), "0.7 spent, nothing held");
        s.settle(Some("a"), r4, 0.6);
        let (total, key) = s.today(Some("a"));
        assert!((total - 1.3).abs() < 1e-9 && (key - 1.3).abs() < 1e-9);
        // Over by less than the last request; nothing more goes.
        assert!(
            rt.block_on(s.reserve(None, 0.0, budgets))
                .unwrap()
                .is_none()
        );
        // No budget: nothing is held, everything passes.
        assert!(
            rt.block_on(s.reserve(None, 5.0, Budgets::default()))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn keys_are_made_changed_and_revoked_through_the_api() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let (_, hash) = new_key().expect("random source");
        let access = Access::new(&[KeyConfig {
            name: "ops".into(),
            hash,
            privacy: None,
            daily_budget_usd: None,
            rate_limit_per_minute: None,
            admin: true,
        }])
        .unwrap();
        let changes: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"rate_limit_per_minute": 1, "privacy": "strict"}"#).unwrap();
        let (raw, made) = rt.block_on(access.create("app", &changes)).unwrap();
        assert_eq!(made.rate_limit_per_minute, Some(1));
        assert_eq!(
            rt.block_on(access.create("app", &changes))
                .unwrap_err()
                .status,
            409
        );
        let bearer = format!("Bearer {raw}");
        auth(&access, Some(&bearer)).unwrap();
        assert_eq!(auth(&access, Some(&bearer)).unwrap_err().status, 429);
        let lift: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(r#"{"rate_limit_per_minute": null}"#).unwrap();
        rt.block_on(access.update("app", &lift)).unwrap();
        auth(&access, Some(&bearer)).unwrap();
        for bad in [
            r#"{"name": "x"}"#,
            r#"{"rate_limit": 3}"#,
            r#"{"admin": "yes"}"#,
        ] {
            let m: serde_json::Map<String, serde_json::Value> = serde_json::from_str(bad).unwrap();
            assert_eq!(
                rt.block_on(access.update("app", &m)).unwrap_err().status,
                400,
                "{bad}"
            );
        }
        assert_eq!(
            rt.block_on(access.create("bad name!", &Default::default()))
                .unwrap_err()
                .status,
            400
        );
        rt.block_on(access.revoke("app")).unwrap();
        assert_eq!(auth(&access, Some(&bearer)).unwrap_err().status, 401);
        assert_eq!(rt.block_on(access.revoke("app")).unwrap_err().status, 404);
    }
}
