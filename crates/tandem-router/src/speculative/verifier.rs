//! The cloud role of speculative decoding: sessions on a local target
//! model that check a device's drafts (protocol in [`tandem_api::speculative`]).
//!
//! A session keeps its KV cache between rounds, so a round reads only the
//! tokens the device committed since the last one plus the new draft — in
//! one forward pass — and rolls back whatever it rejected. Sessions idle
//! for longer than the timeout are dropped, freeing their cache.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tandem_api::speculative::{SpecOpen, SpecOpened, SpecSampling, VerifyRequest, VerifyResponse};
use tandem_api::{ApiError, ErrorKind, KvSession, Sampling, SessionModel};

use super::arithmetic::{Dist, verify};

use crate::metrics::Metrics;

/// Most drafted tokens one round may carry.
pub const MAX_DRAFT: usize = 64;

struct Target {
    session: Box<dyn KvSession>,
    sampling: Sampling,
    rng: fastrand::Rng,
    pos: u32,
    passes: u64,
}

struct Entry {
    target: Arc<tokio::sync::Mutex<Target>>,
    last: Instant,
}

/// The verification sessions a cloud-role Tandem holds for devices.
pub struct Verifier {
    sessions: Mutex<HashMap<String, Entry>>,
    idle: Duration,
    sweeping: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

fn conflict(code: &str, message: String) -> ApiError {
    ApiError::new(409, ErrorKind::InvalidRequestError, message).with_code(code)
}

fn check_sampling(s: &Sampling) -> Result<(), ApiError> {
    if let Some(t) = s.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("{t} is not a valid temperature: it must be between 0 and 2"),
        ));
    }
    if let Some(p) = s.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("{p} is not a valid top_p: it must be in (0, 1]"),
        ));
    }
    Ok(())
}

impl Verifier {
    /// Sessions idle for `idle` are dropped; rounds are counted in `metrics`.
    pub fn new(idle: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            idle,
            sweeping: std::sync::atomic::AtomicBool::new(false),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sessions open now.
    pub fn open_sessions(&self) -> usize {
        self.lock().len()
    }

    /// Drops sessions idle for longer than the timeout.
    pub fn sweep(&self) {
        let idle = self.idle;
        self.lock().retain(|_, e| e.last.elapsed() < idle);
    }

    /// Sweeps in the background for as long as the verifier lives.
    fn start_sweeper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        let every = (self.idle / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(v) => v.sweep(),
                    None => return,
                }
            }
        });
    }

    /// Opens a session on the target model `req` names, after checking
    /// that the device's vocabulary is the target's.
    pub async fn open(
        self: &Arc<Self>,
        engines: &[Arc<dyn SessionModel>],
        req: SpecOpen,
    ) -> Result<SpecOpened, ApiError> {
        let engine = engines
            .iter()
            .find(|e| e.model_id() == req.model)
            .ok_or_else(|| ApiError::model_not_found(&req.model))?;
        let sampling = engine.effective_sampling(&req.sampling.to_sampling());
        check_sampling(&sampling)?;
        let ours = engine.vocab_hash().to_owned();
        if req.vocab_hash != ours {
            return Err(conflict(
                "vocab_mismatch",
                format!(
                    "the draft model's vocabulary (hash {}) differs from {}'s (hash {}): speculative decoding needs draft and target to share a tokenizer",
                    short(&req.vocab_hash),
                    req.model,
                    short(&ours)
                ),
            ));
        }
        self.sweep();
        let session = engine.open_session().await?;
        // The id is the session's only credential: unguessable, from the OS.
        let mut secret = [0u8; 16];
        getrandom::fill(&mut secret)
            .map_err(|e| ApiError::internal(format!("no random source for a session id: {e}")))?;
        let id = format!("spec-{}", hex::encode(secret));
        let context_length = session.context_length();
        let target = Target {
            session,
            rng: sampling.seed.map_or_else(fastrand::Rng::new, |s| {
                fastrand::Rng::with_seed(u64::from(s))
            }),
            sampling,
            pos: 0,
            passes: 0,
        };
        self.lock().insert(
            id.clone(),
            Entry {
                target: Arc::new(tokio::sync::Mutex::new(target)),
                last: Instant::now(),
            },
        );
        self.start_sweeper();
        Ok(SpecOpened {
            session: id,
            model: req.model,
            vocab_hash: ours,
            context_length,
            idle_timeout_s: self.idle.as_secs().max(1),
            sampling: Some(SpecSampling::from_sampling(&sampling)),
        })
    }

    /// Ends a session.
    pub fn close(&self, id: &str) -> Result<(), ApiError> {
        self.lock()
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| missing(id))
    }

    /// One round: reads the new tokens and the draft in one pass, keeps
    /// the accepted prefix.
    pub async fn verify(&self, id: &str, req: VerifyRequest) -> Result<VerifyResponse, ApiError> {
        let target = {
            let mut map = self.lock();
            let e = map.get_mut(id).ok_or_else(|| missing(id))?;
            e.last = Instant::now();
            e.target.clone()
        };
        let mut t = target.lock().await;
        if req.pos != t.pos {
            return Err(conflict(
                "position_mismatch",
                format!(
                    "the session holds {} tokens but the round starts at {}",
                    t.pos, req.pos
                ),
            ));
        }
        if req.tokens.is_empty() {
            return Err(ApiError::invalid_param(
                "tokens",
                "a round needs at least one new token",
            ));
        }
        if req.draft.len() > MAX_DRAFT {
            return Err(ApiError::invalid_param(
                "draft",
                format!(
                    "{} drafted tokens; at most {MAX_DRAFT} per round",
                    req.draft.len()
                ),
            ));
        }
        let probs: Vec<Dist> = req.draft_probs;
        if !t.sampling.is_greedy() && probs.len() != req.draft.len() {
            return Err(ApiError::invalid_param(
                "draft_probs",
                "with sampling, every drafted token needs the distribution it was drawn from",
            ));
        }
        let n_new = req.tokens.len();
        let mut all = req.tokens;
        all.extend_from_slice(&req.draft);
        let started = Instant::now();
        let rows = t.session.eval(t.pos, all, req.draft.len() + 1).await?;
        let compute_ms = started.elapsed().as_secs_f64() * 1000.0;
        t.passes += 1;
        self.metrics.spec_verified.inc();
        let Target {
            sampling, rng, pos, ..
        } = &mut *t;
        let verdict = verify(&rows, &req.draft, &probs, sampling, rng);
        *pos += (n_new + verdict.accepted) as u32;
        Ok(VerifyResponse {
            accepted: verdict.accepted as u32,
            next: verdict.next,
            pos: t.pos,
            forward_passes: t.passes,
            compute_ms,
        })
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

fn missing(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "speculative session `{id}` does not exist or has expired"
    ))
    .with_code("session_not_found")
}
