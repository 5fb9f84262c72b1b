//! Tandem's local engine: runs a GGUF model on this device through
//! llama.cpp and serves it as a [`tandem_api::Backend`].
//!
//! One engine owns one model and one inference thread. Requests are
//! rendered with the model's own chat template and tokenized on the caller's
//! thread, then handed to the inference thread, which decodes every active
//! request together in one batch per step (continuous batching). Each
//! request's events come back on its own channel; dropping the stream stops
//! the request at the next step.
//!
//! Not here: deciding *whether* a request should run locally (that is the
//! router's job) or anything about HTTP.
//!
//! This file holds the engine's configuration and its request path
//! (render, tokenize, check, submit) together: they change together.

#![warn(missing_docs)]

mod backend;
pub mod gbnf;
pub mod load;
pub mod reading;
pub mod runtime;
pub mod sampling;
mod scheduler;
mod session;
pub mod structured;
pub mod tap;
pub mod template;
pub mod tools;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use serde::Serialize;
use tandem_api::{
    ApiError, Capabilities, EventStream, Feature, GenerateRequest, Input, Prepared, Sampling,
    SamplingPreset,
};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::scheduler::{Command, Job, SchedulerConfig};
use crate::session::{SessionCmd, SessionConfig};
use crate::template::ChatTemplate;

pub use session::Session;

/// How many threads llama.cpp may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// The cores other processes leave free, re-read whenever the engine
    /// goes from idle to busy.
    Auto,
    /// Exactly this many.
    Fixed(usize),
}

impl Threads {
    /// How many threads to use now (`monitor` says what other processes
    /// leave free).
    pub fn count(self, monitor: &load::LoadMonitor) -> usize {
        match self {
            Threads::Fixed(n) => n.max(1),
            Threads::Auto => monitor.suggested_threads(),
        }
    }
}

impl std::str::FromStr for Threads {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Threads::Auto),
            n => n
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .map(Threads::Fixed)
                .ok_or_else(|| format!("threads must be `auto` or a positive number, got `{s}`")),
        }
    }
}

/// Everything one engine needs to load.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The name clients use in `model`.
    pub model_id: String,
    /// The GGUF file.
    pub path: PathBuf,
    /// Tokens per request (prompt and answer); default: the model's training
    /// context, at most 4096.
    pub context: Option<u32>,
    /// Requests decoded together; each has its own `context` worth of KV cache.
    pub parallel: u32,
    /// Most prompt tokens read per step.
    pub batch: u32,
    /// Inference threads.
    pub threads: Threads,
    /// Layers offloaded to a GPU (needs a GPU feature at build time).
    pub gpu_layers: u32,
    /// Requests waiting for a slot before new ones are refused with 503.
    pub max_queue: usize,
    /// Speculative-decoding sessions held at once (each keeps `context`
    /// worth of KV cache while open; none is allocated until the first).
    pub sessions: u32,
    /// Sampling for parameters a request leaves out, ahead of what the GGUF
    /// recommends (a catalog entry's pin, say).
    pub sampling: SamplingPreset,
    /// A system message for conversations that bring none.
    pub default_system: Option<String>,
}

impl EngineConfig {
    /// Defaults for the model at `path`, served as `model_id`.
    pub fn new(model_id: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            model_id: model_id.into(),
            path: path.into(),
            context: None,
            parallel: 4,
            batch: 512,
            threads: Threads::Auto,
            gpu_layers: 0,
            max_queue: 64,
            sessions: 4,
            sampling: SamplingPreset::default(),
            default_system: None,
        }
    }
}

impl EngineConfig {
    /// Sampling and system message for what requests leave out.
    pub fn with_preset(mut self, sampling: SamplingPreset, system: Option<String>) -> Self {
        self.sampling = sampling;
        self.default_system = system;
        self
    }

    /// What a user set on the command line or in the configuration.
    pub fn with_options(mut self, o: &EngineOptions) -> Self {
        if let Some(t) = o.threads {
            self.threads = t;
        }
        self.context = o.context.or(self.context);
        self.parallel = o.parallel.unwrap_or(self.parallel);
        self.gpu_layers = o.gpu_layers.unwrap_or(self.gpu_layers);
        self
    }
}

/// The engine settings users give (`--threads`, `--ctx`, `--parallel`,
/// `--gpu-layers`, or `[local]` in the configuration); unset ones keep
/// [`EngineConfig`]'s defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct EngineOptions {
    /// Inference threads.
    pub threads: Option<Threads>,
    /// Tokens per request.
    pub context: Option<u32>,
    /// Requests decoded together.
    pub parallel: Option<u32>,
    /// Layers offloaded to a GPU.
    pub gpu_layers: Option<u32>,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The file is not there.
    #[error("model file {0} not found")]
    NotFound(PathBuf),
    /// llama.cpp could not load it.
    #[error("cannot load model {path}: {reason}")]
    Load {
        /// The file.
        path: PathBuf,
        /// llama.cpp's words.
        reason: String,
    },
    /// No inference context could be made.
    #[error("{0}")]
    Context(String),
    /// The configuration is impossible.
    #[error("invalid engine configuration: {0}")]
    Config(String),
}

/// Live counters, read by health checks, metrics and the router.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests being decoded.
    pub active: AtomicUsize,
    /// Requests waiting for a slot.
    pub queued: AtomicUsize,
    /// Inference threads in use.
    pub threads: AtomicUsize,
    /// Prompt tokens read, ever.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens found in a sequence's cache and not read again, ever.
    pub cached_prompt_tokens: AtomicU64,
    /// Tokens generated, ever.
    pub generated_tokens: AtomicU64,
    /// Requests finished, ever.
    pub completed: AtomicU64,
}

/// [`Stats`] read at one moment.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Requests being decoded.
    pub active: usize,
    /// Requests waiting.
    pub queued: usize,
    /// Requests decoded together at most.
    pub parallel: usize,
    /// Inference threads.
    pub threads: usize,
    /// Prompt tokens read.
    pub prompt_tokens: u64,
    /// Prompt tokens reused from a sequence's cache.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests finished.
    pub completed: u64,
    /// Grammars compiled for constrained answers (a schema or a tool's
    /// parameters seen again is not compiled again).
    pub grammars_compiled: u64,
}

enum Templater {
    Jinja(Box<ChatTemplate>),
    /// llama.cpp's built-in renderer, for templates Jinja could not compile.
    Builtin(LlamaChatTemplate),
    None,
}

struct Inner {
    id: String,
    model: Arc<LlamaModel>,
    templater: Templater,
    bos_text: Option<String>,
    add_bos: bool,
    ctx_per_seq: u32,
    parallel: usize,
    max_queue: usize,
    tx: std::sync::mpsc::Sender<Command>,
    stats: Arc<Stats>,
    session_cfg: SessionConfig,
    /// Complete: every field is set.
    sampling: SamplingPreset,
    default_system: Option<String>,
    /// The session thread, started by the first session.
    sessions: std::sync::Mutex<Option<std::sync::mpsc::Sender<SessionCmd>>>,
    /// The model file (an inner layer's reader maps it again).
    path: std::path::PathBuf,
    /// The reading threads, one per layer read (`None`: the last), each
    /// started by its first reading.
    readers: std::sync::Mutex<HashMap<Option<u32>, std::sync::mpsc::Sender<reading::Job>>>,
    vocab_hash: std::sync::OnceLock<String>,
    constrainer: structured::Constrainer,
}

/// A loaded model with its inference thread. Cheap to clone.
#[derive(Clone)]
pub struct LocalEngine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for LocalEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEngine")
            .field("model", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl LocalEngine {
    /// Loads the model and starts its inference thread. Blocking: call it
    /// from `spawn_blocking` inside async code.
    pub fn load(cfg: EngineConfig) -> Result<LocalEngine, EngineError> {
        if !cfg.path.is_file() {
            return Err(EngineError::NotFound(cfg.path));
        }
        if cfg.parallel == 0 || cfg.batch == 0 {
            return Err(EngineError::Config(
                "parallel and batch must be at least 1".into(),
            ));
        }
        let backend = runtime::backend().map_err(EngineError::Context)?;
        let params = LlamaModelParams::default().with_n_gpu_layers(cfg.gpu_layers);
        let model = LlamaModel::load_from_file(backend, &cfg.path, &params).map_err(|e| {
            EngineError::Load {
                path: cfg.path.clone(),
                reason: e.to_string(),
            }
        })?;
        let model = Arc::new(model);

        let train = model.n_ctx_train().max(1);
        let ctx_per_seq = cfg.context.unwrap_or(train.min(4096)).min(train).max(16);

        let vocab = model.vocab();
        let token_text = |t: LlamaToken| {
            vocab
                .text(t)
                .and_then(|c| c.to_str().ok())
                .map(str::to_owned)
        };
        let bos_text = token_text(vocab.bos());
        let eos_text = token_text(vocab.eos()).unwrap_or_default();
        let add_bos = vocab.should_add_bos();
        let templater = match model.chat_template(None) {
            Err(_) => Templater::None,
            Ok(t) => {
                let compiled = t.to_str().map_err(|e| e.to_string()).and_then(|src| {
                    ChatTemplate::new(src, bos_text.as_deref().unwrap_or(""), &eos_text)
                });
                match compiled {
                    Ok(jinja) => Templater::Jinja(Box::new(jinja)),
                    Err(e) => {
                        tracing::warn!("{e}; using llama.cpp's built-in template support");
                        Templater::Builtin(t)
                    }
                }
            }
        };

        let sampling = cfg
            .sampling
            .or(gguf_sampling(&model))
            .or(SamplingPreset::LLAMA_SERVER);

        let stats = Arc::new(Stats::default());
        let sched = SchedulerConfig {
            ctx_per_seq,
            parallel: cfg.parallel,
            batch: cfg.batch,
            threads: cfg.threads,
        };
        let thread_model = model.clone();
        let thread_stats = stats.clone();
        let tx = runtime::spawn_worker(
            format!("tandem-engine-{}", cfg.model_id),
            move |rx, ready| scheduler::run(thread_model, sched, rx, thread_stats, ready),
        )
        .map_err(EngineError::Context)?;
        tracing::info!(
            model = %cfg.model_id,
            context = ctx_per_seq,
            parallel = cfg.parallel,
            ?sampling,
            "model loaded"
        );
        Ok(LocalEngine {
            inner: Arc::new(Inner {
                id: cfg.model_id,
                model,
                templater,
                bos_text,
                add_bos,
                ctx_per_seq,
                parallel: cfg.parallel as usize,
                max_queue: cfg.max_queue,
                tx,
                stats,
                session_cfg: SessionConfig {
                    ctx_per_seq,
                    slots: cfg.sessions.max(1),
                    batch: cfg.batch,
                    threads: cfg.threads,
                },
                sessions: std::sync::Mutex::new(None),
                path: cfg.path,
                readers: std::sync::Mutex::new(HashMap::new()),
                vocab_hash: std::sync::OnceLock::new(),
                constrainer: structured::Constrainer::default(),
                sampling,
                default_system: cfg.default_system,
            }),
        })
    }

    /// The name clients use for it.
    pub fn model_id(&self) -> &str {
        &self.inner.id
    }

    /// Tokens one request may hold, prompt and answer together.
    pub fn context_length(&self) -> u32 {
        self.inner.ctx_per_seq
    }

    /// What a request that leaves a sampling parameter out gets: the
    /// configured pin, else the GGUF's `general.sampling.*`, else llama.cpp
    /// server's defaults.
    pub fn sampling_preset(&self) -> SamplingPreset {
        self.inner.sampling
    }

    /// `s` with the parameters it leaves out filled from the model's preset.
    pub fn effective_sampling(&self, s: &Sampling) -> Sampling {
        s.with_defaults(&self.inner.sampling)
    }

    /// Whether its GGUF carries a chat template.
    pub fn has_chat_template(&self) -> bool {
        !matches!(self.inner.templater, Templater::None)
    }

    /// Its counters now.
    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            active: s.active.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
            parallel: self.inner.parallel,
            threads: s.threads.load(Ordering::Relaxed),
            prompt_tokens: s.prompt_tokens.load(Ordering::Relaxed),
            cached_prompt_tokens: s.cached_prompt_tokens.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            grammars_compiled: self.inner.constrainer.compilations(),
        }
    }

    /// The exact text the model reads for this input.
    pub fn render(&self, input: &Input) -> Result<String, ApiError> {
        self.inner.render(input, None)
    }

    /// The exact text the model reads for this request (its tools included).
    pub fn render_request(&self, req: &GenerateRequest) -> Result<String, ApiError> {
        self.inner.render(&req.input, template_tools(req))
    }

    /// The token ids of `text` as the model would read it (no BOS).
    pub fn token_ids(&self, text: &str) -> Vec<i32> {
        self.inner
            .tokenize(text, false)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    /// Token count of `text` as the model would read it.
    pub fn count_tokens(&self, text: &str) -> usize {
        self.inner.tokenize(text, false).len()
    }

    /// Ends every running and waiting request with a 503 carrying `reason`
    /// (for example to shed local work when the device overheats); the
    /// router hands those answers to the cloud.
    pub fn abort_all(&self, reason: &str) {
        let _ = self.inner.tx.send(Command::AbortAll(reason.to_owned()));
    }

    /// Starts a generation; events arrive on the returned stream.
    pub fn submit(&self, req: GenerateRequest) -> Result<EventStream, ApiError> {
        self.inner.submit(req)
    }

    /// Why this engine would refuse `req` for what it asks of the answer
    /// (a schema or a tool's parameters its grammar cannot enforce), found
    /// by compiling the grammar without generating. `None` when it would
    /// take it, and when the request is malformed for every side (that is
    /// the request's own error, reported wherever it goes).
    pub fn refusal(&self, req: &GenerateRequest) -> Option<String> {
        let tools = tools::ToolRequest::from_extra(&req.extra).ok()?;
        let grammar = self.inner.grammar(req, tools.as_ref()).ok()??;
        self.inner
            .constrainer
            .check(&self.inner.model, &grammar)
            .err()
            .map(|e| e.message)
    }

    /// Opens a session: a sequence whose KV cache lives until the session
    /// is dropped (see [`Session::eval`]).
    pub async fn open_session(&self) -> Result<Session, ApiError> {
        let tx = {
            let mut guard = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match guard.as_ref() {
                Some(tx) => tx.clone(),
                None => {
                    let tx = session::start(
                        self.inner.model.clone(),
                        self.inner.session_cfg,
                        &self.inner.id,
                        self.inner.stats.clone(),
                    )
                    .map_err(ApiError::unavailable)?;
                    *guard = Some(tx.clone());
                    tx
                }
            }
        };
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(SessionCmd::Open(reply))
            .map_err(|_| ApiError::internal("the session thread has stopped"))?;
        let id = rx
            .await
            .map_err(|_| ApiError::internal("the session thread has stopped"))??;
        Ok(Session {
            id,
            tx,
            context: self.inner.ctx_per_seq,
        })
    }

    /// The model's reading of `text` for the router's probe, on the
    /// reading thread of `layer`: the output of that block
    /// ([`tap::LayerReader::read`]), or with `None` the last layer's
    /// ([`reading::read`]). The prompt is queued now; dropping the future
    /// before its turn skips it.
    pub fn read_prompt(
        &self,
        text: &str,
        layer: Option<u32>,
    ) -> futures::future::BoxFuture<'static, Result<Vec<f32>, ApiError>> {
        let queued = self.reader(layer).and_then(|tx| {
            let (reply, rx) = tokio::sync::oneshot::channel();
            tx.send((text.to_owned(), reply))
                .map_err(|_| ApiError::internal("the reading thread has stopped"))?;
            Ok(rx)
        });
        Box::pin(async move {
            queued?
                .await
                .map_err(|_| ApiError::internal("the reading thread has stopped"))?
                .map_err(ApiError::internal)
        })
    }

    fn reader(
        &self,
        layer: Option<u32>,
    ) -> Result<std::sync::mpsc::Sender<reading::Job>, ApiError> {
        let mut guard = self.inner.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = guard.get(&layer) {
            return Ok(tx.clone());
        }
        let threads = self.inner.session_cfg.threads;
        let tx = match layer {
            None => reading::start(self.inner.model.clone(), threads, &self.inner.id),
            Some(l) => tap::start(self.inner.path.clone(), l, threads, &self.inner.id),
        }
        .map_err(ApiError::unavailable)?;
        guard.insert(layer, tx.clone());
        Ok(tx)
    }

    /// Numbers in a reading at `layer` ([`reading::width`],
    /// [`tap::LayerReader::width`]); `None` when the model has no such
    /// block.
    pub fn reading_width(&self, layer: Option<u32>) -> Option<usize> {
        match layer {
            None => Some(reading::width(&self.inner.model)),
            Some(l) if l < self.inner.model.n_layer() => Some(reading::width_of(
                usize::try_from(self.inner.model.n_embd()).unwrap_or(0),
            )),
            Some(_) => None,
        }
    }

    /// A fingerprint of the vocabulary (every token's text, the special
    /// tokens, the size): two models with equal hashes mean the same thing
    /// by every token id.
    pub fn vocab_hash(&self) -> &str {
        self.inner.vocab_hash.get_or_init(|| {
            use sha2::{Digest, Sha256};
            let vocab = self.inner.model.vocab();
            let mut h = Sha256::new();
            h.update(vocab.n_tokens().to_le_bytes());
            for t in [vocab.bos(), vocab.eos(), vocab.eot()] {
                h.update(t.0.to_le_bytes());
            }
            for t in vocab.tokens() {
                let text = vocab.text(t).map_or(&[][..], |c| c.to_bytes());
                h.update((text.len() as u32).to_le_bytes());
                h.update(text);
            }
            format!("{:x}", h.finalize())
        })
    }
}

/// The sampling a model's authors recommend, from the `general.sampling.*`
/// keys llama.cpp's converter writes (often only some of them).
fn gguf_sampling(model: &LlamaModel) -> SamplingPreset {
    let num = |key: &str| {
        model
            .meta_val_str(key)
            .ok()
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 0.0)
    };
    SamplingPreset {
        temperature: num("general.sampling.temp").map(|v| v as f32),
        top_p: num("general.sampling.top_p").map(|v| v as f32),
        top_k: num("general.sampling.top_k").map(|v| v as u32),
        min_p: num("general.sampling.min_p").map(|v| v as f32),
        repeat_penalty: num("general.sampling.penalty_repeat")
            .filter(|v| *v > 0.0)
            .map(|v| v as f32),
    }
}

/// What a local model supports: chat when it has a template, tools when
/// its template renders them; any model can be held to a grammar (JSON,
/// JSON schema, and vLLM's and llama.cpp's constraint fields, GBNF
/// grammars among them), biased, and continue a partial answer.
fn capabilities(templater: &Templater) -> Capabilities {
    let chat = !matches!(templater, Templater::None);
    let tools = matches!(templater, Templater::Jinja(t) if t.supports_tools());
    Capabilities::of(
        [
            Feature::Continuation,
            Feature::JsonObject,
            Feature::JsonSchema,
            Feature::LogitBias,
            Feature::GuidedJson,
            Feature::GuidedRegex,
            Feature::GuidedChoice,
            Feature::StructuredOutputs,
            Feature::JsonSchemaField,
            Feature::GuidedGrammar,
            Feature::Grammar,
        ]
        .into_iter()
        .chain(chat.then_some(Feature::Chat))
        .chain(tools.then_some(Feature::Tools)),
    )
}

/// The tool definitions a request's template sees: none when the client
/// said `tool_choice: "none"`.
fn template_tools(req: &GenerateRequest) -> Option<&[serde_json::Value]> {
    if req
        .extra
        .get("tool_choice")
        .and_then(serde_json::Value::as_str)
        == Some("none")
    {
        return None;
    }
    req.extra
        .get("tools")
        .and_then(serde_json::Value::as_array)
        .map(Vec::as_slice)
        .filter(|t| !t.is_empty())
}

impl Inner {
    fn render(
        &self,
        input: &Input,
        tools: Option<&[serde_json::Value]>,
    ) -> Result<String, ApiError> {
        match input {
            Input::Text { .. } => Ok(input.bare_text().unwrap_or_default()),
            Input::Chat {
                messages,
                continue_from,
            } => {
                let with_system;
                let messages = match &self.default_system {
                    Some(system) if !messages.iter().any(|m| m.role == "system") => {
                        with_system = std::iter::once(tandem_api::Message::new("system", system))
                            .chain(messages.iter().cloned())
                            .collect::<Vec<_>>();
                        &with_system
                    }
                    _ => messages,
                };
                let mut text = match &self.templater {
                    Templater::Jinja(t) => t.render(messages, tools)?,
                    Templater::Builtin(t) => {
                        let chat = messages
                            .iter()
                            .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(|_| {
                                ApiError::invalid_param("messages", "messages contain NUL bytes")
                            })?;
                        self.model
                            .apply_chat_template(t, &chat, true)
                            .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?
                    }
                    Templater::None => {
                        return Err(ApiError::invalid_param(
                            "model",
                            format!(
                                "model `{}` has no chat template (it is a base model): use /v1/completions",
                                self.id
                            ),
                        ));
                    }
                };
                if let Some(prefix) = continue_from {
                    text.push_str(prefix);
                }
                Ok(text)
            }
        }
    }

    /// The grammar the answer must keep to: a forced call's, else the
    /// response format's; `None` for free text.
    fn grammar(
        &self,
        req: &GenerateRequest,
        tools: Option<&tools::ToolRequest>,
    ) -> Result<Option<structured::Grammar>, ApiError> {
        let syntax = match &self.templater {
            Templater::Jinja(t) => tools::Syntax::of_template(t.source()),
            _ => tools::Syntax::Json,
        };
        // A forced call is the whole answer: its grammar wins over a
        // response format, which then applies to the words of an answer
        // that calls nothing.
        match tools.and_then(|t| t.grammar(syntax)) {
            Some(lark) => Ok(Some(structured::Grammar::Lark(lark))),
            None => structured::requested(&req.extra),
        }
    }

    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), add_bos, true)
    }

    fn prepare(&self, req: &GenerateRequest) -> Result<Prepared, ApiError> {
        if req.model != self.id {
            return Err(ApiError::model_not_found(&req.model));
        }
        // A chat request to a base model gets render's own, better error.
        let needs = Feature::needed_by(req);
        if let Some(f) = capabilities(&self.templater)
            .missing(&needs)
            .into_iter()
            .find(|&f| f != Feature::Chat)
        {
            return Err(ApiError::invalid_param(
                f.param(),
                format!(
                    "{} is not supported by the local model `{}`",
                    f.describe(),
                    self.id
                ),
            ));
        }
        let text = self.render(&req.input, template_tools(req))?;
        // Templates that write the BOS token themselves must not get a second one.
        let add_bos = self.add_bos
            && !self
                .bos_text
                .as_deref()
                .is_some_and(|b| !b.is_empty() && text.starts_with(b));
        let tokens = self.tokenize(&text, add_bos);
        if tokens.is_empty() {
            return Err(ApiError::invalid_param("prompt", "the prompt is empty"));
        }
        let ctx = self.ctx_per_seq;
        let n = tokens.len() as u32;
        if n >= ctx {
            return Err(ApiError::context_length_exceeded(format!(
                "This model's maximum context length is {ctx} tokens. However, your prompt is {n} tokens long, leaving no room for an answer. Please shorten the prompt."
            )));
        }
        if let Some(max) = req.max_tokens
            && max > ctx
        {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!(
                    "max_tokens is too large: {max}. This model supports at most {ctx} tokens of context (prompt and answer)."
                ),
            ));
        }
        let room = ctx - n;
        let max_new = req.max_tokens.map_or(room, |m| m.min(room));
        Ok(Prepared {
            tokens: tokens.into_iter().map(|t| t.0).collect(),
            max_new,
        })
    }

    fn submit(&self, req: GenerateRequest) -> Result<EventStream, ApiError> {
        let Prepared { tokens, max_new } = self.prepare(&req)?;
        let tokens: Vec<LlamaToken> = tokens.into_iter().map(LlamaToken).collect();
        let tools = tools::ToolRequest::from_extra(&req.extra)?;
        let mut constraints = Vec::new();
        if let Some(bias) = sampling::logit_bias(&req.extra, self.model.n_vocab())? {
            constraints.push(bias);
        }
        let grammar = match self.grammar(&req, tools.as_ref())? {
            Some(g) => {
                let written = req.input.written().unwrap_or_default();
                self.constrainer.matchers(&self.model, &g, written)?
            }
            None => Vec::new(),
        };

        let queued = self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let active = self.stats.active.load(Ordering::Relaxed);
        if queued >= self.max_queue && active >= self.parallel {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::unavailable(format!(
                "the local engine is busy: {queued} requests are waiting"
            )));
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = Job {
            tokens,
            sampling: req.sampling.with_defaults(&self.sampling),
            max_new,
            stop: req.stop,
            top_logprobs: req.logprobs.map(|l| l.top),
            constraints,
            grammar,
            tx,
        };
        if self.tx.send(Command::Run(job)).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError::internal("the inference thread has stopped"));
        }
        let events: EventStream = Box::pin(UnboundedReceiverStream::new(rx));
        Ok(match tools {
            Some(t) => tools::calls_from(events, t),
            None => events,
        })
    }
}
