//! Gateway API keys and daily spending.
//!
//! Keys are stored only as sha256 hashes; each may carry its own privacy
//! mode, daily budget and rate limit. With no keys configured the gateway
//! is open — which is why it then listens on loopback only unless told
//! otherwise.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tandem_api::ApiError;

use tandem_policy::PrivacyMode;

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
    bucket: Mutex<Bucket>,
}

impl Caller {
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

/// The configured keys.
#[derive(Debug, Default)]
pub struct Access {
    by_hash: HashMap<String, Arc<Caller>>,
}

impl Access {
    /// Checks each key's hash.
    pub fn new(keys: &[KeyConfig]) -> Result<Access, String> {
        let mut by_hash = HashMap::new();
        for k in keys {
            let hex = k
                .hash
                .strip_prefix("sha256:")
                .ok_or_else(|| format!("key `{}`: hash must start with sha256:", k.name))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("key `{}`: hash must be 64 hex digits", k.name));
            }
            let cap = f64::from(k.rate_limit_per_minute.unwrap_or(0).max(1));
            by_hash.insert(
                format!("sha256:{}", hex.to_ascii_lowercase()),
                Arc::new(Caller {
                    config: k.clone(),
                    bucket: Mutex::new(Bucket {
                        tokens: cap,
                        last: Instant::now(),
                    }),
                }),
            );
        }
        Ok(Access { by_hash })
    }

    /// No keys: anyone may call.
    pub fn is_open(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The caller whose key `authorization` carries, without spending a
    /// rate-limit token (for read-only views such as `/healthz`).
    pub fn identify(&self, authorization: Option<&str>) -> Option<Arc<Caller>> {
        let key = authorization.and_then(bearer)?;
        self.by_hash.get(&hash_key(key)).cloned()
    }

    /// Checks the `Authorization` header. `Ok(None)`: no keys configured.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<Option<Arc<Caller>>, ApiError> {
        if self.is_open() {
            return Ok(None);
        }
        let key = authorization.and_then(bearer).ok_or_else(|| {
            ApiError::unauthorized("missing API key: send `Authorization: Bearer <key>`")
        })?;
        let caller = self
            .by_hash
            .get(&hash_key(key))
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("invalid API key"))?;
        if !caller.take_token() {
            return Err(ApiError::rate_limited(format!(
                "rate limit of {} requests per minute reached for key `{}`",
                caller.config.rate_limit_per_minute.unwrap_or(0),
                caller.config.name
            )));
        }
        Ok(Some(caller))
    }
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
}

/// Cloud spending of the current UTC day, overall and per key.
#[derive(Debug, Default)]
pub struct SpendTracker {
    state: Mutex<SpendState>,
}

impl SpendTracker {
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

    /// Adds spending of `key` (if any).
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

    /// (all keys, this key) spent today.
    pub fn today(&self, key: Option<&str>) -> (f64, f64) {
        let s = self.lock();
        (
            s.total,
            key.and_then(|k| s.by_key.get(k)).copied().unwrap_or(0.0),
        )
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
        assert_eq!(access.authenticate(None).unwrap_err().status, 401);
        assert_eq!(
            access.authenticate(Some("Bearer nope")).unwrap_err().status,
            401
        );
        let bearer = format!("Bearer {raw}");
        let c = access.authenticate(Some(&bearer)).unwrap().unwrap();
        assert_eq!(c.config.privacy, Some(PrivacyMode::Strict));
        access.authenticate(Some(&bearer)).unwrap();
        assert_eq!(access.authenticate(Some(&bearer)).unwrap_err().status, 429);
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
            assert!(access.authenticate(Some(&h)).is_ok(), "{h}");
        }
        for bad in [
            format!("Basic {raw}"),
            format!("Bearer{raw}"),
            "Bearer ".into(),
        ] {
            assert_eq!(
                access.authenticate(Some(&bad)).unwrap_err().status,
                401,
                "{bad}"
            );
        }
        let wrong_case = format!("Bearer {}", raw.to_uppercase());
        assert_eq!(
            access.authenticate(Some(&wrong_case)).unwrap_err().status,
            401
        );
    }

    #[test]
    fn open_when_no_keys() {
        assert!(
            Access::new(&[])
                .unwrap()
                .authenticate(None)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn spend_accumulates_per_key() {
        let s = SpendTracker::default();
        s.add(Some("a"), 0.5);
        s.add(None, 0.25);
        assert_eq!(s.today(Some("a")), (0.75, 0.5));
        assert_eq!(s.today(Some("b")), (0.75, 0.0));
    }
}
