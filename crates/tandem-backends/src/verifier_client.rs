//! The device side of the speculative-decoding protocol
//! ([`tandem_api::speculative`]): JSON calls to a cloud-role Tandem. A round is
//! one small request; it is not retried (the drafting loop decides what a
//! failed round means), but it counts towards the circuit breaker.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use tandem_api::speculative::{SpecOpen, SpecOpened, VerifyRequest, VerifyResponse};
use tandem_api::{ApiError, DraftVerifier, Exchange};

use crate::{CloudBackend, describe};

impl CloudBackend {
    /// Opens a verification session on the upstream. The exchange records
    /// what left for the ledger; each later round adds to it.
    pub async fn spec_open(
        &self,
        body: &SpecOpen,
        exchange: &mut Exchange,
    ) -> Result<SpecOpened, ApiError> {
        let timeout = Duration::from_millis(self.config().ttft_timeout_ms);
        self.spec_call(
            reqwest::Method::POST,
            "/tandem/spec/sessions",
            Some(body),
            timeout,
            exchange,
        )
        .await
    }

    /// One verification round.
    pub async fn spec_verify(
        &self,
        session: &str,
        body: &VerifyRequest,
        timeout: Duration,
        exchange: &mut Exchange,
    ) -> Result<VerifyResponse, ApiError> {
        let path = format!("/tandem/spec/sessions/{session}/verify");
        self.spec_call(reqwest::Method::POST, &path, Some(body), timeout, exchange)
            .await
    }

    /// Ends a session (best effort: the upstream expires idle ones anyway).
    pub async fn spec_close(&self, session: &str) {
        let path = format!("/tandem/spec/sessions/{session}");
        let mut ignored = Exchange::default();
        let _ = self
            .spec_call::<(), serde_json::Value>(
                reqwest::Method::DELETE,
                &path,
                None,
                Duration::from_secs(2),
                &mut ignored,
            )
            .await;
    }

    async fn spec_call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
        exchange: &mut Exchange,
    ) -> Result<R, ApiError> {
        let name = &self.config().name;
        let Some(pass) = self.inner.breaker.admit() else {
            return Err(ApiError::unavailable(format!(
                "upstream `{name}` is failing; skipping it for now (circuit open)"
            )));
        };
        let _trial = crate::TrialGuard::new(pass, || self.inner.breaker.abandon());
        let url = format!("{}{path}", self.config().base_url.trim_end_matches('/'));
        let mut http = self.inner.client.request(method, url).timeout(timeout);
        let method_has_prompt = |p: &str| p.ends_with("/verify");
        if let Some(b) = body {
            let bytes = serde_json::to_vec(b)
                .map_err(|e| ApiError::internal(format!("cannot encode a request: {e}")))?;
            // The ledger keeps the hash of the first body of a session (the
            // one that carries the prompt) and the byte count of all.
            if exchange.payload_sha256.is_empty() && method_has_prompt(path) {
                exchange.payload_sha256 = hex::encode(Sha256::digest(&bytes));
            }
            exchange
                .bytes_out
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            http = http
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(bytes);
        }
        if let Some(k) = &self.inner.key {
            http = http.bearer_auth(&k.0);
        }
        exchange.attempts.fetch_add(1, Ordering::Relaxed);
        let resp = match http.send().await {
            Ok(r) => r,
            Err(e) => {
                self.inner.breaker.failure();
                return Err(if e.is_timeout() {
                    ApiError::gateway_timeout(format!(
                        "upstream `{name}` gave no answer within {} ms",
                        timeout.as_millis()
                    ))
                } else {
                    ApiError::bad_gateway(format!("upstream `{name}`: {}", describe(&e)))
                });
            }
        };
        let status = resp.status();
        let bytes = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                self.inner.breaker.failure();
                return Err(ApiError::bad_gateway(format!(
                    "upstream `{name}`: {}",
                    describe(&e)
                )));
            }
        };
        exchange
            .bytes_in
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if !status.is_success() {
            if status.is_server_error() {
                self.inner.breaker.failure();
            }
            let mut e = ApiError::from_body(status.as_u16(), &bytes);
            e.message = format!("upstream `{name}`: {}", e.message);
            return Err(e);
        }
        self.inner.breaker.success();
        serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::bad_gateway(format!(
                "upstream `{name}` does not speak Tandem's speculative protocol: {e}"
            ))
        })
    }
}

impl DraftVerifier for CloudBackend {
    fn open<'a>(
        &'a self,
        body: &'a SpecOpen,
        exchange: &'a mut Exchange,
    ) -> BoxFuture<'a, Result<SpecOpened, ApiError>> {
        Box::pin(self.spec_open(body, exchange))
    }

    fn verify<'a>(
        &'a self,
        session: &'a str,
        body: &'a VerifyRequest,
        timeout: Duration,
        exchange: &'a mut Exchange,
    ) -> BoxFuture<'a, Result<VerifyResponse, ApiError>> {
        Box::pin(self.spec_verify(session, body, timeout, exchange))
    }

    fn close<'a>(&'a self, session: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(self.spec_close(session))
    }
}
