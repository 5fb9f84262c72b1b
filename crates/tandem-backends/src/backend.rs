//! An upstream as the router sees it: a [`Backend`] in the cloud, and a
//! [`DraftVerifier`] when it is a cloud-role Tandem.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tandem_api::{
    ApiError, Backend, Capabilities, DraftVerifier, Feature, GenerateRequest, Health, Locality,
    ModelInfo, Outbound, Price, Started,
};

use crate::{CloudBackend, Continuation};

impl Backend for CloudBackend {
    fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    fn locality(&self) -> Locality {
        Locality::Cloud
    }

    fn models(&self) -> Vec<ModelInfo> {
        self.inner
            .cfg
            .models
            .iter()
            .map(|m| ModelInfo {
                id: m.clone(),
                context_length: self.inner.cfg.context_length,
                owned_by: self.inner.cfg.name.clone(),
            })
            .collect()
    }

    fn model_for(&self, requested: &str) -> String {
        self.upstream_model(requested)
    }

    /// An OpenAI-compatible upstream is taken to support the API but what it
    /// `lacks`; continuing a partial answer (`continuation`) and the
    /// constraint fields beyond the API (`constraint_fields`) need saying.
    fn capabilities(&self) -> Capabilities {
        let mut f = vec![
            Feature::Chat,
            Feature::Tools,
            Feature::JsonObject,
            Feature::JsonSchema,
            Feature::OtherResponseFormat,
            Feature::LogitBias,
            Feature::BestOf,
            Feature::Suffix,
            Feature::Images,
            Feature::Audio,
            Feature::Files,
            Feature::OtherContent,
        ];
        if self.inner.cfg.continuation == Continuation::Prefill {
            f.push(Feature::Continuation);
        }
        f.extend(
            self.inner
                .cfg
                .constraint_fields
                .iter()
                .filter_map(|c| Feature::constraint(c)),
        );
        f.retain(|x| !self.inner.cfg.lacks.contains(x));
        Capabilities::of(f)
    }

    fn health(&self) -> Health {
        let lat = self.latency();
        Health {
            breaker: Some(self.inner.breaker.state()),
            breaker_open: !self.inner.breaker.is_available(),
            ttft_ms: lat.ttft_ms,
            tokens_per_s: lat.tokens_per_s,
        }
    }

    fn price(&self) -> Price {
        self.inner.cfg.price()
    }

    fn on_this_machine(&self) -> bool {
        self.inner.on_this_machine
    }

    fn choices_per_request(&self, req: &GenerateRequest) -> u32 {
        self.choices_asked(req)
    }

    fn outbound(&self, req: GenerateRequest) -> Result<Outbound, ApiError> {
        CloudBackend::outbound(self, req)
    }

    fn probe(&self, timeout: Duration) -> Option<BoxFuture<'static, Result<Duration, String>>> {
        let this = self.clone();
        Some(Box::pin(async move {
            CloudBackend::probe(&this, timeout).await
        }))
    }

    /// Built and sent in one go: `send` builds what comes unbuilt.
    fn start(&self, req: GenerateRequest) -> BoxFuture<'static, Started> {
        Backend::send(self, Outbound::unbuilt(req))
    }

    fn send(&self, out: Outbound) -> BoxFuture<'static, Started> {
        let this = self.clone();
        Box::pin(async move {
            let (result, exchange) = CloudBackend::send(&this, out).await;
            let (result, more) = match result.map(Vec::into_iter) {
                Ok(mut choices) => match choices.next() {
                    Some(first) => (Ok(first), choices.collect()),
                    None => (
                        Err(ApiError::internal("an answer with no choice")),
                        Vec::new(),
                    ),
                },
                Err(e) => (Err(e), Vec::new()),
            };
            Started {
                result,
                exchange: Some(exchange),
                more,
            }
        })
    }

    fn verifier(&self) -> Option<Arc<dyn DraftVerifier>> {
        Some(Arc::new(self.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Choices, UpstreamConfig};

    #[test]
    fn loopback_upstreams_are_on_this_machine() {
        let on = |url: &str| {
            let b = CloudBackend::new(UpstreamConfig::new("up", url, &["m"])).expect("backend");
            Backend::on_this_machine(&b)
        };
        for url in [
            "http://127.0.0.1:8081/v1",
            "http://localhost:8081/v1",
            "http://LOCALHOST/v1",
            "http://[::1]:8081/v1",
            "http://127.0.0.2/v1",
        ] {
            assert!(on(url), "{url}");
        }
        for url in [
            "https://api.openai.com/v1",
            "http://10.0.0.5:8081/v1",
            "http://[2001:db8::1]/v1",
            "http://localhost.example.com/v1",
        ] {
            assert!(!on(url), "{url}");
        }
    }

    #[test]
    fn choices_per_request_follow_the_setting() {
        let req: tandem_api::openai::ChatCompletionRequest =
            serde_json::from_value(serde_json::json!({
                "model": "m", "n": 3, "messages": [{"role": "user", "content": "hi"}]
            }))
            .expect("request");
        let req = req.into_generate().expect("valid");
        let mut cfg = UpstreamConfig::new("up", "http://127.0.0.1:9/v1", &["m"]);
        let one_request = CloudBackend::new(cfg.clone()).expect("backend");
        assert_eq!(one_request.choices_per_request(&req), 3);
        one_request
            .inner
            .ignores_n
            .store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(one_request.choices_per_request(&req), 1);
        cfg.choices = Choices::Separate;
        let separate = CloudBackend::new(cfg).expect("backend");
        assert_eq!(separate.choices_per_request(&req), 1);
    }

    #[test]
    fn constraint_fields_are_declared_by_name() {
        let mut cfg = UpstreamConfig::new("up", "http://127.0.0.1:9/v1", &["m"]);
        let plain = CloudBackend::new(cfg.clone()).expect("backend");
        assert!(!plain.capabilities().supports(Feature::GuidedJson));
        cfg.constraint_fields = vec!["guided_json".into(), "grammar".into()];
        let declared = CloudBackend::new(cfg.clone()).expect("backend");
        let c = declared.capabilities();
        assert!(c.supports(Feature::GuidedJson) && c.supports(Feature::Grammar));
        assert!(!c.supports(Feature::GuidedRegex));
        cfg.lacks = vec![Feature::GuidedJson, Feature::LogitBias];
        let lacking = CloudBackend::new(cfg.clone())
            .expect("backend")
            .capabilities();
        assert!(lacking.supports(Feature::Grammar) && lacking.supports(Feature::BestOf));
        assert!(!lacking.supports(Feature::GuidedJson) && !lacking.supports(Feature::LogitBias));
        cfg.constraint_fields = vec!["guided_jsn".into()];
        let Err(err) = CloudBackend::new(cfg) else {
            panic!("an unknown field is refused")
        };
        assert!(
            err.contains("guided_jsn") && err.contains("guided_json"),
            "{err}"
        );
    }

    /// The bytes that reach the upstream are the ones `outbound` fixed and
    /// hashed, even when, in between, another request found the upstream
    /// ignoring `n` (which changes what a new request would ask).
    #[tokio::test]
    async fn what_is_sent_is_what_outbound_fixed() {
        use sha2::{Digest, Sha256};
        let sent_bodies: Arc<std::sync::Mutex<Vec<Vec<u8>>>> = Arc::default();
        let app = {
            let seen = sent_bodies.clone();
            axum::Router::new().route(
                "/v1/chat/completions",
                axum::routing::post(move |body: axum::body::Bytes| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().expect("lock").push(body.to_vec());
                        axum::Json(serde_json::json!({
                            "id": "c", "object": "chat.completion", "created": 0, "model": "m",
                            "choices": [{"index": 0, "finish_reason": "stop",
                                "message": {"role": "assistant", "content": "ok"}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                "total_tokens": 2}
                        }))
                    }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });

        let req: tandem_api::openai::ChatCompletionRequest =
            serde_json::from_value(serde_json::json!({
                "model": "m", "n": 2, "messages": [{"role": "user", "content": "hi"}]
            }))
            .expect("request");
        let req = req.into_generate().expect("valid");
        let cfg = UpstreamConfig::new("up", &format!("http://{addr}/v1"), &["m"]);
        let b = CloudBackend::new(cfg).expect("backend");
        let out = Backend::outbound(&b, req.clone()).expect("outbound");
        assert_eq!(out.request().choices, 2);
        let hash = out.payload_sha256().expect("a hash").to_owned();
        b.inner
            .ignores_n
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let started = Backend::send(&b, out).await;
        assert!(started.result.is_ok());
        let exchange = started.exchange.expect("an exchange");
        assert_eq!(exchange.payload_sha256, hash);
        let seen = sent_bodies.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(hex::encode(Sha256::digest(&seen[0])), hash);
        let sent: serde_json::Value = serde_json::from_slice(&seen[0]).expect("json");
        assert_eq!(sent["n"], 2, "the choices fixed before the flip");

        // Handed over unbuilt, it is built when sent, as things now stand.
        let started = Backend::send(&b, Outbound::unbuilt(req)).await;
        assert!(started.result.is_ok());
        let exchange = started.exchange.expect("an exchange");
        let seen = sent_bodies.lock().expect("lock").clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            hex::encode(Sha256::digest(&seen[1])),
            exchange.payload_sha256
        );
        let sent: serde_json::Value = serde_json::from_slice(&seen[1]).expect("json");
        assert!(sent.get("n").is_none_or(|n| n == 1), "{sent}");
    }
}
