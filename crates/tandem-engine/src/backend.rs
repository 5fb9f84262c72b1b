//! The engine as the router sees it: a [`Backend`] on the device, and a
//! [`SessionModel`] for speculative decoding.

use std::sync::Arc;

use futures::future::BoxFuture;
use llama_cpp_2::token::LlamaToken;
use tandem_api::{
    ApiError, Backend, Capabilities, GenerateRequest, KvSession, Load, Locality, ModelInfo,
    Prepared, Sampling, SessionModel, Started,
};

use crate::{LocalEngine, capabilities};

impl Backend for LocalEngine {
    fn name(&self) -> &str {
        "local"
    }

    fn locality(&self) -> Locality {
        Locality::Local
    }

    fn models(&self) -> Vec<ModelInfo> {
        vec![ModelInfo {
            id: self.inner.id.clone(),
            context_length: Some(self.inner.ctx_per_seq),
            owned_by: "tandem-local".into(),
        }]
    }

    fn model_for(&self, _requested: &str) -> String {
        self.inner.id.clone()
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.inner.templater)
    }

    fn load(&self) -> Load {
        let s = self.stats();
        Load {
            active: s.active,
            queued: s.queued,
            capacity: Some(s.parallel),
        }
    }

    fn count_prompt_tokens(&self, req: &GenerateRequest) -> Option<u32> {
        let text = self.render_request(req).ok()?;
        Some(self.count_tokens(&text) as u32)
    }

    fn refusal(&self, req: &GenerateRequest) -> Option<String> {
        LocalEngine::refusal(self, req)
    }

    fn start(&self, req: GenerateRequest) -> BoxFuture<'static, Started> {
        let result = self.submit(req);
        Box::pin(async move { Started::local(result) })
    }

    fn sessions(&self) -> Option<Arc<dyn SessionModel>> {
        Some(Arc::new(self.clone()))
    }

    fn read_prompt(
        &self,
        text: &str,
        layer: Option<u32>,
    ) -> Option<BoxFuture<'static, Result<Vec<f32>, ApiError>>> {
        Some(LocalEngine::read_prompt(self, text, layer))
    }

    fn reading_width(&self, layer: Option<u32>) -> Option<usize> {
        LocalEngine::reading_width(self, layer)
    }
}

impl SessionModel for LocalEngine {
    fn model_id(&self) -> &str {
        &self.inner.id
    }

    fn vocab_hash(&self) -> &str {
        LocalEngine::vocab_hash(self)
    }

    fn n_vocab(&self) -> i32 {
        self.inner.model.n_vocab()
    }

    fn prepare(&self, req: &GenerateRequest) -> Result<Prepared, ApiError> {
        self.inner.prepare(req)
    }

    fn effective_sampling(&self, s: &Sampling) -> Sampling {
        LocalEngine::effective_sampling(self, s)
    }

    fn is_eog(&self, token: i32) -> bool {
        self.inner.model.vocab().is_eog(LlamaToken(token))
    }

    fn token_bytes(&self, token: i32, out: &mut Vec<u8>) {
        out.clear();
        self.inner
            .model
            .vocab()
            .token_to_piece_into(LlamaToken(token), out, false, None);
    }

    fn open_session(&self) -> BoxFuture<'static, Result<Box<dyn KvSession>, ApiError>> {
        let this = self.clone();
        Box::pin(async move {
            let s = LocalEngine::open_session(&this).await?;
            Ok(Box::new(s) as Box<dyn KvSession>)
        })
    }
}
