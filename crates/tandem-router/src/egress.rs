//! Accounting for what leaves the device: every exchange with an upstream —
//! a routed cloud answer, a speculative session — is recorded once in the
//! egress ledger, and its cost lands in today's spending and the metrics.
//! Cloud legs and speculative sessions both hold an [`EgressRecord`]; none
//! of them needs the dispatcher for it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tandem_api::{Exchange, Price, Usage};
use tandem_ledger::{Egress as LedgerEntry, Ledger};

use crate::access::{Reservation, SpendTracker};
use crate::metrics::Metrics;

/// Where egress is accounted: the ledger, the spending tracker, the metrics.
#[derive(Debug)]
pub(crate) struct Egress {
    pub ledger: Option<Ledger>,
    pub spend: Arc<SpendTracker>,
    pub metrics: Arc<Metrics>,
}

impl Egress {
    /// Records, durably, that a request is about to leave for `upstream`:
    /// the ledger holds it before the first byte is sent, so a crash
    /// mid-request still leaves a trace — with the hash of the body that
    /// will leave, when one body will (a speculative exchange sends one
    /// per round, each recorded with its outcome). No ledger, nothing to
    /// do; a ledger that cannot write stops the request (fail closed).
    pub async fn sending(
        &self,
        who: &Requester,
        upstream: &str,
        model: &str,
        redacted: &BTreeMap<String, u32>,
        payload_sha256: Option<String>,
    ) -> Result<(), tandem_api::ApiError> {
        let Some(l) = self.ledger.clone() else {
            return Ok(());
        };
        let entry = LedgerEntry {
            request_id: who.request_id.clone(),
            key: who.key.clone(),
            upstream: upstream.to_owned(),
            model: model.to_owned(),
            redacted: redacted.clone(),
            payload_sha256: payload_sha256.unwrap_or_default(),
            outcome: tandem_ledger::SENDING.to_owned(),
            ..LedgerEntry::default()
        };
        tokio::task::spawn_blocking(move || l.record_durable(entry))
            .await
            .map_err(|_| tandem_api::ApiError::internal("the ledger task failed"))?
            .map_err(|e| {
                tandem_api::ApiError::unavailable(format!(
                    "the egress ledger cannot record this request, so it is not sent: {e}"
                ))
            })
    }
}

/// Who asked, for the record.
#[derive(Debug, Clone, Default)]
pub(crate) struct Requester {
    pub request_id: String,
    pub key: Option<String>,
    /// Where the request's cost is noted for the operator's view.
    pub trace: crate::activity::Trace,
}

/// The ledger duty of one exchange: settled once, when the exchange ends —
/// or when it is dropped because the client went away.
pub(crate) struct EgressRecord {
    egress: Arc<Egress>,
    price: Price,
    pub exchange: Arc<Exchange>,
    pub redacted: BTreeMap<String, u32>,
    who: Requester,
    /// Pieces of the answer received, a stand-in for tokens when the
    /// upstream reports no usage.
    pub deltas: u32,
    /// What the budget holds for this exchange until it settles.
    pub reservation: Option<Reservation>,
    settled: bool,
}

impl EgressRecord {
    pub fn new(
        egress: Arc<Egress>,
        price: Price,
        exchange: Arc<Exchange>,
        redacted: BTreeMap<String, u32>,
        who: Requester,
    ) -> Self {
        Self {
            egress,
            price,
            exchange,
            redacted,
            who,
            deltas: 0,
            reservation: None,
            settled: false,
        }
    }

    /// Records the outcome; returns its cost. Later calls do nothing.
    pub fn settle(&mut self, outcome: &str, usage: Option<Usage>) -> f64 {
        if self.settled {
            return 0.0;
        }
        self.settled = true;
        let (prompt, completion) = match usage {
            Some(u) => (u.prompt_tokens, u.completion_tokens),
            None => (0, self.deltas),
        };
        let cost = if usage.is_some() || self.deltas > 0 {
            self.price.cost(prompt, completion)
        } else {
            0.0
        };
        let e = &self.egress;
        e.spend
            .settle(self.who.key.as_deref(), self.reservation.take(), cost);
        e.metrics.cost_usd.inc_by(cost);
        self.who.trace.spent(cost);
        e.metrics.count_tokens("cloud", prompt, completion);
        if let Some(l) = &e.ledger {
            let x = &self.exchange;
            l.record(LedgerEntry {
                request_id: self.who.request_id.clone(),
                key: self.who.key.clone(),
                upstream: x.upstream.clone(),
                model: x.model.clone(),
                payload_sha256: x.payload_sha256.clone(),
                bytes_out: x.bytes_out.load(Relaxed),
                bytes_in: x.bytes_in.load(Relaxed),
                redacted: self.redacted.clone(),
                attempts: x.attempts.load(Relaxed),
                outcome: outcome.to_owned(),
                prompt_tokens: prompt,
                completion_tokens: completion,
                cost_usd: cost,
            });
        }
        cost
    }

    /// Settles a failed start, saying whether anything left the device (its
    /// `sending` entry is already in the ledger and needs an outcome).
    pub fn settle_failed_start(&mut self, message: &str) {
        if self.exchange.left_the_device() {
            self.settle(&format!("error: {message}"), None);
        } else {
            self.settle(&format!("not sent: {message}"), None);
        }
    }
}

impl Drop for EgressRecord {
    fn drop(&mut self) {
        self.settle("cancelled: the client went away", None);
    }
}
