//! The seam between the router and whatever produces tokens: the local
//! engine, an OpenAI-compatible upstream, or a scripted backend in tests.
//!
//! A backend says what it can do ([`Capabilities`]), how busy and how
//! healthy it is ([`Load`], [`Health`]), and starts answers
//! ([`Backend::start`]). Backends that leave the device also return an
//! [`Exchange`]: the record of what was sent, for the egress ledger. Local
//! models that can hold a KV cache across calls ([`SessionModel`]) draft
//! and verify speculative decoding; upstreams that verify drafts
//! ([`DraftVerifier`]) are the other half of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, StreamExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::generate::{Delta, Event, Finish, GenerateRequest, Input, Sampling, TokenLogprob};
use crate::speculative::{SpecOpen, SpecOpened, VerifyRequest, VerifyResponse};

/// The error code of a choice a backend was asked for with others
/// ([`GenerateRequest::choices`]) but did not answer (an upstream that
/// ignores `n`): nothing of it was sent, so it can be asked for on its own.
pub const CHOICE_NOT_ANSWERED: &str = "choice_not_answered";

/// Events of one answer. Dropping the stream cancels the generation.
pub type EventStream = BoxStream<'static, Result<Event, ApiError>>;

/// Which side of the hybrid a backend is on; the router treats the two very
/// differently (only the cloud can see data leave the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locality {
    /// On this device.
    Local,
    /// Behind the network.
    Cloud,
}

impl Locality {
    /// The other side.
    pub fn other(self) -> Locality {
        match self {
            Locality::Local => Locality::Cloud,
            Locality::Cloud => Locality::Local,
        }
    }

    /// `local` or `cloud`, as headers, metrics and reasons write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Locality::Local => "local",
            Locality::Cloud => "cloud",
        }
    }
}

/// One model a backend serves.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    /// The name clients use in `model`.
    pub id: String,
    /// Tokens one request may hold (prompt and answer together), if known.
    pub context_length: Option<u32>,
    /// Who serves it (`/v1/models`' `owned_by`).
    pub owned_by: String,
}

/// How busy a backend is. Local engines have a fixed capacity; cloud
/// upstreams report `capacity: None` (they scale out of sight).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Load {
    /// Answers being generated.
    pub active: usize,
    /// Answers waiting for a slot.
    pub queued: usize,
    /// Answers generated together at most.
    pub capacity: Option<usize>,
}

/// What a circuit breaker says about a backend right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Requests are skipped until the cool-down ends.
    Open,
    /// One trial request decides.
    HalfOpen,
}

/// How a backend has been doing, as measured on real traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Health {
    /// Its circuit breaker, if it has one.
    pub breaker: Option<BreakerState>,
    /// The breaker would not let a request through now.
    pub breaker_open: bool,
    /// Moving average of the time to the first token, ms.
    pub ttft_ms: Option<f64>,
    /// Moving average of the decoding speed, tokens per second.
    pub tokens_per_s: Option<f64>,
}

/// USD per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Price {
    /// Per million prompt tokens.
    pub input_per_mtok: f64,
    /// Per million completion tokens.
    pub output_per_mtok: f64,
}

impl Price {
    /// USD for a request of this size.
    pub fn cost(&self, prompt_tokens: u32, completion_tokens: u32) -> f64 {
        (f64::from(prompt_tokens) * self.input_per_mtok
            + f64::from(completion_tokens) * self.output_per_mtok)
            / 1e6
    }
}

/// What a request needs from the backend that answers it, beyond plain text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Feature {
    /// A conversation (rendered with a chat template), not a bare prompt.
    Chat,
    /// `tools` or `functions`.
    Tools,
    /// `response_format: {"type": "json_object"}`.
    JsonObject,
    /// `response_format: {"type": "json_schema"}`.
    JsonSchema,
    /// A `response_format` of a type Tandem does not know.
    OtherResponseFormat,
    /// Continuing a partial assistant message (a handoff mid-answer).
    Continuation,
    /// `logit_bias`: per-token biases.
    LogitBias,
    /// `best_of` above 1 (completions): several drafts, the best returned.
    BestOf,
    /// `suffix` (completions): text that follows the insertion.
    Suffix,
    /// Image content parts (`image_url`).
    Images,
    /// Audio content parts (`input_audio`).
    Audio,
    /// File content parts (`file`).
    Files,
    /// Content parts of another type than text, image, audio or file.
    OtherContent,
    /// vLLM's `guided_json`: a JSON schema the answer follows.
    GuidedJson,
    /// vLLM's `guided_regex`: a regular expression the answer matches.
    GuidedRegex,
    /// vLLM's `guided_choice`: the answer is one of these strings.
    GuidedChoice,
    /// vLLM's `guided_grammar`: a context-free grammar.
    GuidedGrammar,
    /// vLLM's `structured_outputs` (its newer form of the `guided_*` fields).
    StructuredOutputs,
    /// llama.cpp's top-level `json_schema`.
    JsonSchemaField,
    /// llama.cpp's `grammar`: a GBNF grammar.
    Grammar,
}

impl Feature {
    /// The request field that asks for it (the `param` of a refusal).
    pub fn param(self) -> &'static str {
        match self {
            Feature::Chat => "messages",
            Feature::Tools => "tools",
            Feature::JsonObject | Feature::JsonSchema | Feature::OtherResponseFormat => {
                "response_format"
            }
            Feature::Continuation => "messages",
            Feature::LogitBias => "logit_bias",
            Feature::BestOf => "best_of",
            Feature::Suffix => "suffix",
            Feature::Images | Feature::Audio | Feature::Files | Feature::OtherContent => "messages",
            Feature::GuidedJson => "guided_json",
            Feature::GuidedRegex => "guided_regex",
            Feature::GuidedChoice => "guided_choice",
            Feature::GuidedGrammar => "guided_grammar",
            Feature::StructuredOutputs => "structured_outputs",
            Feature::JsonSchemaField => "json_schema",
            Feature::Grammar => "grammar",
        }
    }

    /// The feature a constraint field of [`GUIDED_FIELDS`](crate::GUIDED_FIELDS)
    /// asks for; `None` for any other name.
    pub fn constraint(field: &str) -> Option<Feature> {
        Some(match field {
            "guided_json" => Feature::GuidedJson,
            "guided_regex" => Feature::GuidedRegex,
            "guided_choice" => Feature::GuidedChoice,
            "guided_grammar" => Feature::GuidedGrammar,
            "structured_outputs" => Feature::StructuredOutputs,
            "json_schema" => Feature::JsonSchemaField,
            "grammar" => Feature::Grammar,
            _ => return None,
        })
    }

    /// Whether it is one of the constraint fields beside OpenAI's API
    /// ([`GUIDED_FIELDS`](crate::GUIDED_FIELDS)), which an upstream applies
    /// only where its configuration declares it.
    pub fn is_constraint(self) -> bool {
        Feature::constraint(self.param()) == Some(self)
    }

    /// Whether it holds the answer to a form (a response format or a
    /// constraint field), which a backend keeps by a grammar.
    pub fn shapes_answer(self) -> bool {
        matches!(
            self,
            Feature::JsonObject | Feature::JsonSchema | Feature::OtherResponseFormat
        ) || self.is_constraint()
    }

    /// Human words for it, as reasons and errors use them.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::Chat => "a chat template",
            Feature::Tools => "tool calling",
            Feature::JsonObject => "JSON mode",
            Feature::JsonSchema => "structured output (json_schema)",
            Feature::OtherResponseFormat => "this response_format",
            Feature::Continuation => "continuing a partial answer",
            Feature::LogitBias => "logit_bias",
            Feature::BestOf => "best_of",
            Feature::Suffix => "suffix (insertion)",
            Feature::Images => "image input",
            Feature::Audio => "audio input",
            Feature::Files => "file input",
            Feature::OtherContent => "content parts other than text",
            Feature::GuidedJson => "vLLM's guided_json",
            Feature::GuidedRegex => "vLLM's guided_regex",
            Feature::GuidedChoice => "vLLM's guided_choice",
            Feature::GuidedGrammar => "vLLM's guided_grammar",
            Feature::StructuredOutputs => "vLLM's structured_outputs",
            Feature::JsonSchemaField => "llama.cpp's json_schema field",
            Feature::Grammar => "a GBNF grammar (llama.cpp's grammar field)",
        }
    }

    /// What `req` needs, in a stable order.
    pub fn needed_by(req: &GenerateRequest) -> Vec<Feature> {
        let mut needs = Vec::new();
        if let Input::Chat {
            messages,
            continue_from,
        } = &req.input
        {
            needs.push(Feature::Chat);
            if continue_from.is_some() {
                needs.push(Feature::Continuation);
            }
            for part in messages.iter().filter_map(|m| m.parts.as_ref()).flatten() {
                let f = match part.kind.as_str() {
                    "text" => continue,
                    "image_url" => Feature::Images,
                    "input_audio" => Feature::Audio,
                    "file" => Feature::Files,
                    _ => Feature::OtherContent,
                };
                if !needs.contains(&f) {
                    needs.push(f);
                }
            }
        }
        let present = |k: &str| req.extra.get(k).is_some_and(|v| !v.is_null());
        if req
            .extra
            .get("tools")
            .is_some_and(|v| v.as_array().is_some_and(|a| !a.is_empty()))
            || present("functions")
        {
            needs.push(Feature::Tools);
        }
        // Asked for but not honoured would be silently different answers:
        // a backend that cannot apply them is not eligible.
        if req
            .extra
            .get("logit_bias")
            .is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()))
        {
            needs.push(Feature::LogitBias);
        }
        if req
            .extra
            .get("best_of")
            .and_then(serde_json::Value::as_f64)
            .is_some_and(|n| n > 1.0)
        {
            needs.push(Feature::BestOf);
        }
        if req
            .extra
            .get("suffix")
            .and_then(serde_json::Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            needs.push(Feature::Suffix);
        }
        // Not part of OpenAI's API: an upstream applies them only where its
        // configuration says so (vLLM, llama.cpp's server, Tandem), and one
        // that ignores them (Ollama) would answer unconstrained.
        needs.extend(
            crate::GUIDED_FIELDS
                .iter()
                .filter(|k| present(k))
                .filter_map(|k| Feature::constraint(k)),
        );
        if let Some(fmt) = req.extra.get("response_format").filter(|v| !v.is_null()) {
            match fmt.get("type").and_then(serde_json::Value::as_str) {
                Some("text") => {}
                Some("json_object") => needs.push(Feature::JsonObject),
                Some("json_schema") => needs.push(Feature::JsonSchema),
                _ => needs.push(Feature::OtherResponseFormat),
            }
        }
        needs
    }
}

/// The features a backend supports, declared by the backend itself (a
/// local model from its chat template, an upstream from its configuration)
/// and asked by the router and the engine alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Supported features, sorted.
    pub features: Vec<Feature>,
}

impl Capabilities {
    /// A backend supporting `features`.
    pub fn of(features: impl IntoIterator<Item = Feature>) -> Capabilities {
        let mut features: Vec<Feature> = features.into_iter().collect();
        features.sort();
        features.dedup();
        Capabilities { features }
    }

    /// Whether `f` is supported.
    pub fn supports(&self, f: Feature) -> bool {
        self.features.binary_search(&f).is_ok()
    }

    /// Those of `needs` that are not supported.
    pub fn missing(&self, needs: &[Feature]) -> Vec<Feature> {
        needs
            .iter()
            .copied()
            .filter(|&f| !self.supports(f))
            .collect()
    }
}

/// What one request to an upstream sent and received: the egress ledger's
/// record. Counters are atomic because a streamed answer keeps adding
/// received bytes after the exchange has been handed over.
#[derive(Debug, Default)]
pub struct Exchange {
    /// The upstream's configured name.
    pub upstream: String,
    /// The model asked of it.
    pub model: String,
    /// sha256 of the body as sent.
    pub payload_sha256: String,
    /// Bytes sent, over every attempt.
    pub bytes_out: AtomicU64,
    /// Bytes received.
    pub bytes_in: AtomicU64,
    /// Attempts made; 0 means nothing left the device.
    pub attempts: AtomicU32,
}

impl Exchange {
    /// An exchange with `upstream` about `model` that has sent nothing yet.
    pub fn new(upstream: &str, model: &str) -> Exchange {
        Exchange {
            upstream: upstream.to_owned(),
            model: model.to_owned(),
            ..Exchange::default()
        }
    }

    /// Adds another exchange of the same session (one round's call).
    pub fn absorb(&mut self, other: Exchange) {
        if self.payload_sha256.is_empty() {
            self.payload_sha256 = other.payload_sha256;
        }
        for (mine, theirs) in [
            (&self.bytes_out, other.bytes_out),
            (&self.bytes_in, other.bytes_in),
        ] {
            mine.fetch_add(theirs.into_inner(), Ordering::Relaxed);
        }
        self.attempts
            .fetch_add(other.attempts.into_inner(), Ordering::Relaxed);
    }

    /// Whether anything was sent.
    pub fn left_the_device(&self) -> bool {
        self.attempts.load(Ordering::Relaxed) > 0
    }
}

/// An answer started by [`Backend::start`].
pub struct Started {
    /// The events, or why the answer could not start.
    pub result: Result<EventStream, ApiError>,
    /// What was sent to reach that outcome, for a backend off the device.
    pub exchange: Option<Arc<Exchange>>,
    /// The other choices' events (choice 1, 2...), when the backend answered
    /// [`GenerateRequest::choices`] from the one request; empty when it
    /// answered the first only. The first choice's finish carries the usage
    /// of them all; theirs count no tokens.
    pub more: Vec<EventStream>,
}

impl Started {
    /// An answer that started (or failed) without leaving the device.
    pub fn local(result: Result<EventStream, ApiError>) -> Started {
        Started {
            result,
            exchange: None,
            more: Vec::new(),
        }
    }
}

/// A request made ready to leave the device: the exact bytes
/// [`Backend::send`] will send, fixed before the egress ledger records them,
/// so that the record written before anything leaves names what leaves.
#[derive(Debug)]
pub struct Outbound {
    req: GenerateRequest,
    body: Option<Vec<u8>>,
    payload_sha256: Option<String>,
}

impl Outbound {
    /// A request whose bytes the backend does not fix beforehand (one that
    /// sends nothing off the device).
    pub fn unbuilt(req: GenerateRequest) -> Outbound {
        Outbound {
            req,
            body: None,
            payload_sha256: None,
        }
    }

    /// A request and the body that will carry it; the hash is taken here,
    /// from the very bytes, so it cannot disagree with them.
    pub fn built(req: GenerateRequest, body: Vec<u8>) -> Outbound {
        let payload_sha256 = Some(hex::encode(Sha256::digest(&body)));
        Outbound {
            req,
            body: Some(body),
            payload_sha256,
        }
    }

    /// The request as the backend will answer it (its choices already
    /// those one request carries).
    pub fn request(&self) -> &GenerateRequest {
        &self.req
    }

    /// The SHA-256 (hex) of the body, when there is one.
    pub fn payload_sha256(&self) -> Option<&str> {
        self.payload_sha256.as_deref()
    }

    /// The request and its body, for sending.
    pub fn into_parts(self) -> (GenerateRequest, Option<Vec<u8>>) {
        (self.req, self.body)
    }
}

/// Anything that produces answers: the local engine, an OpenAI-compatible
/// upstream, a scripted backend in tests. The router holds backends only
/// through this trait.
pub trait Backend: std::fmt::Debug + Send + Sync + 'static {
    /// A short stable name for logs, headers and metrics.
    fn name(&self) -> &str;

    /// On this device or behind the network.
    fn locality(&self) -> Locality;

    /// The models it serves.
    fn models(&self) -> Vec<ModelInfo>;

    /// The model it answers a request for `requested` with: that model if it
    /// serves it, else its default.
    fn model_for(&self, requested: &str) -> String;

    /// What it supports.
    fn capabilities(&self) -> Capabilities;

    /// How busy it is now.
    fn load(&self) -> Load {
        Load::default()
    }

    /// How it has been doing.
    fn health(&self) -> Health {
        Health::default()
    }

    /// What its tokens cost.
    fn price(&self) -> Price {
        Price::default()
    }

    /// A cloud backend that listens on this machine (loopback): what it
    /// does, the device does.
    fn on_this_machine(&self) -> bool {
        false
    }

    /// The request's prompt in this backend's tokens, when it can count
    /// them exactly (a local model renders and tokenizes).
    fn count_prompt_tokens(&self, _req: &GenerateRequest) -> Option<u32> {
        None
    }

    /// Why this backend would refuse `req` for what it asks of the answer,
    /// beyond its [`capabilities`](Self::capabilities) (a local model's
    /// grammar that cannot enforce a schema's keyword), checked without
    /// generating; `None` when it would take it or cannot tell.
    fn refusal(&self, _req: &GenerateRequest) -> Option<String> {
        None
    }

    /// Choices of [`GenerateRequest::choices`] that one [`start`](Self::start)
    /// answers (the others are asked for one by one): all of them for an
    /// upstream that takes `n`, else 1.
    fn choices_per_request(&self, req: &GenerateRequest) -> u32 {
        let _ = req;
        1
    }

    /// Is it reachable, and how long does a round trip take? `None`: there
    /// is nothing to probe (a local model).
    fn probe(&self, _timeout: Duration) -> Option<BoxFuture<'static, Result<Duration, String>>> {
        None
    }

    /// Starts an answer. Errors found before the first token (unknown
    /// model, prompt too long, upstream refused) come back in
    /// [`Started::result`]; errors after it arrive inside the stream.
    fn start(&self, req: GenerateRequest) -> BoxFuture<'static, Started>;

    /// Fixes what [`send`](Self::send) will send for `req`, so that the
    /// egress ledger can record it before it leaves; errors found in
    /// building it (a continuation the upstream cannot take) come back
    /// before anything is sent. By default nothing is fixed.
    fn outbound(&self, req: GenerateRequest) -> Result<Outbound, ApiError> {
        Ok(Outbound::unbuilt(req))
    }

    /// Starts the answer to an [`outbound`](Self::outbound) request,
    /// sending its body as it was fixed.
    fn send(&self, outbound: Outbound) -> BoxFuture<'static, Started> {
        self.start(outbound.into_parts().0)
    }

    /// Starts an answer, without the egress record.
    fn generate(&self, req: GenerateRequest) -> BoxFuture<'static, Result<EventStream, ApiError>> {
        let started = self.start(req);
        Box::pin(async move { started.await.result })
    }

    /// A local model that can hold KV sessions (speculative drafting and
    /// verification), if it is one.
    fn sessions(&self) -> Option<Arc<dyn SessionModel>> {
        None
    }

    /// An upstream that verifies drafts (a cloud-role Tandem), if it is one.
    fn verifier(&self) -> Option<Arc<dyn DraftVerifier>> {
        None
    }

    /// The model's own reading of a prompt (the hidden state after block
    /// `layer`, or with `None` after its last layer, which the router's
    /// probe scores), if it is a local model that reads.
    fn read_prompt(
        &self,
        _text: &str,
        _layer: Option<u32>,
    ) -> Option<BoxFuture<'static, Result<Vec<f32>, ApiError>>> {
        None
    }

    /// How many numbers [`Backend::read_prompt`]'s readings at `layer` hold,
    /// if it reads there.
    fn reading_width(&self, _layer: Option<u32>) -> Option<usize> {
        None
    }
}

/// A request ready to run on a local model: its tokens and limits.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The rendered prompt, tokenized.
    pub tokens: Vec<i32>,
    /// New tokens allowed (the request's `max_tokens` within the context).
    pub max_new: u32,
}

/// Logits of the requested positions, one full vocabulary row each.
pub type Rows = Vec<Vec<f32>>;

/// A local model that keeps sequences whose KV cache lives across calls:
/// the device drafts with one, a cloud-role Tandem verifies with one.
pub trait SessionModel: Send + Sync + 'static {
    /// The name clients use for it.
    fn model_id(&self) -> &str;
    /// A fingerprint of the vocabulary: equal hashes mean every token id
    /// means the same thing.
    fn vocab_hash(&self) -> &str;
    /// Tokens in the vocabulary.
    fn n_vocab(&self) -> i32;
    /// Renders, tokenizes and checks a request.
    fn prepare(&self, req: &GenerateRequest) -> Result<Prepared, ApiError>;
    /// `s` with what it leaves out taken from the model's recommended
    /// settings.
    fn effective_sampling(&self, s: &Sampling) -> Sampling;
    /// Whether the token ends a turn.
    fn is_eog(&self, token: i32) -> bool;
    /// The bytes a token stands for, written to `out`.
    fn token_bytes(&self, token: i32, out: &mut Vec<u8>);
    /// Opens a session; it is closed when dropped.
    fn open_session(&self) -> BoxFuture<'static, Result<Box<dyn KvSession>, ApiError>>;
}

/// One sequence with its own KV cache (see [`SessionModel`]).
pub trait KvSession: Send + Sync {
    /// Tokens it may hold.
    fn context_length(&self) -> u32;
    /// Keeps the first `keep` cached tokens (rolling back the rest), reads
    /// `tokens` in one pass, and returns the logits of the last `rows`
    /// positions.
    fn eval(
        &self,
        keep: u32,
        tokens: Vec<i32>,
        rows: usize,
    ) -> BoxFuture<'static, Result<Rows, ApiError>>;
}

/// The cloud side of speculative decoding, as the device reaches it
/// (protocol in [`crate::speculative`]). Every call adds what it sent and
/// received to `exchange`.
pub trait DraftVerifier: Send + Sync + 'static {
    /// Opens a verification session.
    fn open<'a>(
        &'a self,
        body: &'a SpecOpen,
        exchange: &'a mut Exchange,
    ) -> BoxFuture<'a, Result<SpecOpened, ApiError>>;
    /// One round: the target reads what it lacks and the draft.
    fn verify<'a>(
        &'a self,
        session: &'a str,
        body: &'a VerifyRequest,
        timeout: Duration,
        exchange: &'a mut Exchange,
    ) -> BoxFuture<'a, Result<VerifyResponse, ApiError>>;
    /// Ends a session (best effort).
    fn close<'a>(&'a self, session: &'a str) -> BoxFuture<'a, ()>;
}

/// A whole answer gathered from a stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The text.
    pub text: String,
    /// Per-token log-probabilities, when asked for.
    pub tokens: Vec<TokenLogprob>,
    /// The tools the model called.
    pub tool_calls: Vec<crate::ToolCall>,
    /// Message fields passed through from an upstream (`refusal`,
    /// `reasoning_content`...): streamed text pieces joined, others as last sent.
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Fields of the upstream's answer beside its choices
    /// (`system_fingerprint`...), as last sent.
    pub response: serde_json::Map<String, serde_json::Value>,
    /// How it ended.
    pub finish: Finish,
}

/// An answer being read, delta by delta: what [`Answer::collect`] folds,
/// for callers that judge the answer while it grows (the cascade).
#[derive(Debug, Default)]
pub struct AnswerSoFar {
    /// Text so far.
    pub text: String,
    /// Tokens with log-probabilities so far (when asked for).
    pub tokens: Vec<TokenLogprob>,
    tool_calls: Vec<crate::ToolCall>,
    extra: serde_json::Map<String, serde_json::Value>,
    response: serde_json::Map<String, serde_json::Value>,
}

impl AnswerSoFar {
    /// Adds a delta.
    pub fn push(&mut self, d: Delta) {
        self.text.push_str(&d.text);
        self.tokens.extend(d.tokens);
        for piece in &d.tool_calls {
            crate::ToolCall::assemble(&mut self.tool_calls, piece);
        }
        self.response.extend(d.response);
        for (k, v) in d.extra {
            match (self.extra.get_mut(&k), v) {
                (Some(serde_json::Value::String(have)), serde_json::Value::String(more)) => {
                    have.push_str(&more);
                }
                (_, v) => {
                    self.extra.insert(k, v);
                }
            }
        }
    }

    /// The finished answer.
    pub fn finish(self, finish: Finish) -> Answer {
        Answer {
            text: self.text,
            tokens: self.tokens,
            tool_calls: self.tool_calls,
            extra: self.extra,
            response: self.response,
            finish,
        }
    }
}

impl Answer {
    /// Reads a stream to its end.
    pub async fn collect(mut stream: EventStream) -> Result<Answer, ApiError> {
        let mut so_far = AnswerSoFar::default();
        while let Some(event) = stream.next().await {
            match event? {
                Event::Delta(d) => so_far.push(d),
                Event::Finish(finish) => return Ok(so_far.finish(finish)),
            }
        }
        Err(ApiError::bad_gateway(
            "the backend ended the answer without finishing it",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GUIDED_FIELDS, Input, Sampling};

    fn asking(extra: serde_json::Value) -> GenerateRequest {
        GenerateRequest {
            model: "m".into(),
            input: Input::text("hi"),
            sampling: Sampling::default(),
            max_tokens: None,
            stop: Vec::new(),
            logprobs: None,
            stream: false,
            include_usage: false,
            choices: 1,
            extra: extra.as_object().cloned().unwrap_or_default(),
        }
    }

    #[test]
    fn each_constraint_field_is_a_feature_named_by_it() {
        let mut seen = Vec::new();
        for &field in GUIDED_FIELDS {
            let f = Feature::constraint(field).expect(field);
            assert_eq!(f.param(), field);
            assert!(f.is_constraint());
            assert!(!seen.contains(&f), "{field}");
            seen.push(f);
            let req = asking(serde_json::json!({ field: "x" }));
            assert_eq!(Feature::needed_by(&req), vec![f]);
            // Null is the field left out, as OpenAI's SDKs send it.
            let req = asking(serde_json::json!({ field: null }));
            assert!(Feature::needed_by(&req).is_empty());
        }
        assert_eq!(Feature::constraint("response_format"), None);
        assert!(!Feature::JsonSchema.is_constraint() && !Feature::LogitBias.is_constraint());
    }
}
