//! `tandem serve`: load the local model(s), connect the upstreams, and
//! serve the OpenAI-compatible API with the router in front.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use tandem_backends::CloudBackend;
use tandem_catalog::DEFAULT_MODEL;
use tandem_router::Dispatcher;
use tandem_server::AppState;

use crate::EngineArgs;
use crate::config::{self, Config};
use crate::models::load_engine;

/// The personal-data recognizer's catalog name.
pub const PII_MODEL: &str = "rampart-pii";

/// The model a cloud-role Tandem serves by default.
pub const CLOUD_MODEL: &str = "qwen2.5-coder-1.5b-instruct";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// On the device: a small local model, cloud upstreams behind the router.
    Device,
    /// In the cloud: a bigger model that device-side Tandems use as upstream.
    Cloud,
}

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (default: $TANDEM_CONFIG, or $TANDEM_HOME/tandem.toml).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "device")]
    pub role: Role,
    /// Model to serve: a catalog name or a GGUF path. Repeat to serve several.
    #[arg(long = "model", short = 'm')]
    pub models: Vec<String>,
    /// Address to listen on (default 127.0.0.1).
    #[arg(long, env = "TANDEM_HOST")]
    pub host: Option<IpAddr>,
    /// Default 8080 (device) or 8081 (cloud).
    #[arg(long, short = 'p', env = "TANDEM_PORT")]
    pub port: Option<u16>,
    /// Listen on a non-loopback address without API keys configured.
    #[arg(long)]
    pub allow_remote: bool,
    /// No local model: a pure gateway to the configured upstreams.
    #[arg(long)]
    pub no_local: bool,
    /// Largest request body accepted, in bytes.
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    #[command(flatten)]
    pub engine: EngineArgs,
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}

/// Command-line flags win over the file.
fn merge(args: &ServeArgs, cfg: &mut Config) -> anyhow::Result<()> {
    if !args.models.is_empty() {
        cfg.local.models = args.models.clone();
    }
    if args.no_local {
        cfg.local.enabled = false;
    }
    if !cfg.local.enabled {
        cfg.local.models.clear();
        if cfg.upstreams.is_empty() {
            bail!("with no local model there must be at least one [[upstreams]] entry");
        }
    } else if cfg.local.models.is_empty() {
        cfg.local.models = vec![
            match args.role {
                Role::Device => DEFAULT_MODEL,
                Role::Cloud => CLOUD_MODEL,
            }
            .to_owned(),
        ];
    }
    if let Some(h) = args.host {
        cfg.server.host = h;
    }
    if let Some(p) = args.port {
        cfg.server.port = Some(p);
    }
    cfg.server.port.get_or_insert(match args.role {
        Role::Device => 8080,
        Role::Cloud => 8081,
    });
    cfg.server.allow_remote |= args.allow_remote;
    if let Some(b) = args.max_body_bytes {
        cfg.server.max_body_bytes = b;
    }
    if args.role == Role::Cloud && !cfg.upstreams.is_empty() {
        bail!(
            "a cloud-role Tandem serves its own models; remove [[upstreams]] from its configuration"
        );
    }
    Ok(())
}

/// The engine's settings: the command line's, else the configuration's
/// `[local]` ones.
pub fn engine_args(engine: &EngineArgs, cfg: &Config) -> anyhow::Result<EngineArgs> {
    let mut e = *engine;
    e.context = e.context.or(cfg.local.ctx);
    e.parallel = e.parallel.or(cfg.local.parallel);
    e.gpu_layers = e.gpu_layers.or(cfg.local.gpu_layers);
    if e.threads.is_none()
        && let Some(t) = &cfg.local.threads
    {
        e.threads = Some(t.parse().map_err(anyhow::Error::msg)?);
    }
    Ok(e)
}

pub async fn build_dispatcher(
    cfg: &Config,
    engine: &EngineArgs,
) -> anyhow::Result<Arc<Dispatcher>> {
    // The device's CPU load is what the engine measures (other processes'
    // share of the cores); the rest the router reads from the OS.
    let reader: tandem_router::signals::DeviceReader = Arc::new(|| {
        let load = tandem_engine::load::LoadMonitor::global();
        tandem_router::signals::DeviceState {
            cpu_load: Some(load.other_load()),
            cores: Some(load.cores()),
            ..tandem_router::signals::read_device()
        }
    });
    let mut b = Dispatcher::builder()
        .signals(tandem_router::signals::SignalHub::with_reader(reader))
        .policy(cfg.router.clone())
        .speculative(cfg.speculative.clone())
        .privacy(cfg.privacy.clone())
        .keys(cfg.keys.clone());
    if cfg.privacy.recognizer {
        b = match load_recognizer().await {
            Ok(r) => b.recognizer(Arc::new(tandem_router::ModelRecognizer(Arc::new(r)))),
            Err(e) => {
                tracing::warn!(
                    "the personal-data model is unavailable ({e:#}); requests with a privacy mode stay on the device"
                );
                b.recognizer_unavailable(format!(
                    "the personal-data model could not be loaded: {e:#}"
                ))
            }
        };
    }
    for m in &cfg.local.models {
        let e = load_engine(m, engine)
            .await
            .with_context(|| format!("loading model `{m}`"))?;
        b = b.local(e);
    }
    for u in &cfg.upstreams {
        b = b.cloud(CloudBackend::new(u.clone()).map_err(anyhow::Error::msg)?);
    }
    let embedder = if cfg.embeddings.enabled {
        Some(Arc::new(
            crate::router_cmd::load_embedder(&cfg.embeddings.model).await?,
        ))
    } else {
        None
    };
    let router = cfg.embeddings.router.clone().or_else(|| {
        let p = tandem_catalog::router_path();
        p.is_file().then_some(p)
    });
    let mut scorer = None;
    if let Some(path) = router {
        let encoder =
            tandem_router::learned::LoadedRouter::encoder_of(&path).map_err(anyhow::Error::msg)?;
        let tokenizer = crate::router_cmd::encoder_dir(&encoder)
            .await?
            .join("tokenizer.json");
        let r = tandem_router::learned::LoadedRouter::load(&path, &tokenizer, embedder.as_deref())
            .map_err(anyhow::Error::msg)?;
        tracing::info!(
            "learned router: {} (threshold {:.2}, {}, {})",
            path.display(),
            r.scorer.model().threshold,
            r.scorer.model().calibrated_for,
            match r.input {
                tandem_router::learned::RouterInput::Static(_) => "static vectors",
                tandem_router::learned::RouterInput::Embedder => "encoder vectors",
            }
        );
        scorer = Some(r);
    }
    if let Some(embedder) = embedder {
        // Answers worth keeping come from the cloud (or locally, if asked).
        if cfg.cache.enabled && (!cfg.upstreams.is_empty() || cfg.cache.local_answers) {
            let path = cfg.cache.path.clone().unwrap_or_else(|| {
                tandem_catalog::default_home()
                    .join("cache")
                    .join("answers.jsonl")
            });
            let cache =
                tandem_router::cache::SemanticCache::open(cfg.cache.clone(), Some(path.clone()))
                    .with_context(|| format!("opening the cache {}", path.display()))?;
            tracing::info!(
                "semantic cache: {} ({} answers)",
                path.display(),
                cache.len()
            );
            b = b.cache(Arc::new(cache));
        }
        b = b.embedder(&cfg.embeddings.model, embedder);
    }
    if cfg.router.memory.enabled {
        if !cfg.router.cascade {
            tracing::warn!(
                "[router.memory] learns from the cascade's outcomes: with `cascade = false` only requests sent with x-tandem-mode: cascade teach it"
            );
        }
        if scorer.is_none() {
            tracing::warn!(
                "[router.memory] reads prompts through the learned router's vectors: with no router it stays idle (tandem router train)"
            );
        }
        let path = cfg.router.memory.path.clone().unwrap_or_else(|| {
            tandem_catalog::default_home()
                .join("router")
                .join("outcomes.jsonl")
        });
        let memory = tandem_router::memory::OutcomeMemory::open(
            cfg.router.memory.clone(),
            Some(path.clone()),
        )
        .with_context(|| format!("opening the router's memory {}", path.display()))?;
        tracing::info!(
            "router memory: {} ({} outcomes)",
            path.display(),
            memory.len()
        );
        b = b.memory(Arc::new(memory));
    }
    if cfg.router.sample.enabled {
        let s = &cfg.router.sample;
        s.check().map_err(anyhow::Error::msg)?;
        let path = s.path.clone().unwrap_or_else(|| {
            tandem_catalog::default_home()
                .join("router")
                .join("traffic.prompts.jsonl")
        });
        let sample = tandem_router::sample::TrafficSample::open(s.clone(), path.clone())
            .with_context(|| format!("opening the router's sample {}", path.display()))?;
        tracing::info!(
            "router sample: {} ({} of at most {} prompts; keeps {:.1}% of routed prompts without personal data, for `tandem router label --prompts`)",
            path.display(),
            sample.len(),
            s.max_prompts,
            100.0 * s.rate.clamp(0.0, 1.0)
        );
        b = b.sample(Arc::new(sample));
    }
    if cfg.ledger.enabled && !cfg.upstreams.is_empty() {
        let key = tandem_ledger::LedgerKey::load_or_create(&cfg.ledger.key_path())?;
        let ledger = tandem_ledger::Ledger::open(cfg.ledger.path(), key)?;
        for r in ledger.repairs() {
            eprintln!("egress ledger {}: {r}", ledger.path().display());
        }
        b = b.ledger(ledger);
    }
    if cfg.shared.redis_url.is_some() {
        if cfg.keys.iter().all(|k| !k.admin) {
            bail!(
                "[shared] needs at least one admin key in [[keys]] (see `tandem keys new NAME --admin`): \
                 replicas sharing state are never open, and keys are made through the admin API"
            );
        }
        let store = tandem_redis::RedisState::new(&cfg.shared, cfg.cache.max_entries)
            .map_err(anyhow::Error::msg)?;
        eprintln!(
            "shared state: {} (when unreachable: {})",
            tandem_router::shared::SharedStore::describe(&store),
            cfg.shared.on_unavailable.as_str()
        );
        b = b.shared(tandem_router::shared::Shared::new(
            Arc::new(store),
            cfg.shared.clone(),
        ));
    }
    let d = b.build().map_err(anyhow::Error::msg)?;
    d.start_shared().await;
    if let Some(r) = scorer {
        use tandem_policy::scoring::Scorer as _;
        if let Some(reader) = r.scorer.reader() {
            let width = reader.width;
            let who = reader.source();
            match d.locals().iter().find(|l| l.model_for("") == reader.model) {
                Some(l) if l.reading_width(reader.layer) == Some(width) => tracing::info!(
                    "the router's probe has {who} read a prompt when the reading can change the decision (difficulty within {:.3} of the threshold)",
                    reader.reach
                ),
                Some(l) => tracing::warn!(
                    "the router's probe takes readings of {width} numbers by {who}, but {} here reads {}: it decides without them (retrain it on this model's readings)",
                    reader.model,
                    l.reading_width(reader.layer)
                        .map_or_else(|| "none there".to_owned(), |w| w.to_string())
                ),
                None => tracing::warn!(
                    "the router's probe reads prompts with {who}, which is not a local model here: it decides without it"
                ),
            }
        }
        d.set_scorer(Arc::new(r.scorer), r.input);
    }
    d.signals().set_metered(cfg.signals.metered);
    d.start_signals(Duration::from_millis(cfg.signals.probe_interval_ms));
    Ok(d)
}

/// The personal-data model (`rampart-pii`), pulled if missing.
pub async fn load_recognizer() -> anyhow::Result<tandem_embed::TokenClassifier> {
    let r = tandem_catalog::resolve(PII_MODEL).await?;
    let dir = r.path.parent().context("model folder")?.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || tandem_embed::TokenClassifier::load(&dir)).await??)
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let (mut cfg, path) = config::load(args.config.as_deref())?;
    merge(&args, &mut cfg)?;
    if let Some(p) = &path {
        tracing::info!("configuration: {}", p.display());
    }
    let host = cfg.server.host;
    if !host.is_loopback() && cfg.keys.is_empty() {
        if !cfg.server.allow_remote {
            bail!(
                "refusing to listen on {host} with no API keys configured: anyone on the network could use it. \
                 Add [[keys]] (see `tandem keys new`) or pass --allow-remote."
            );
        }
        tracing::warn!("listening on {host} with no API keys: anyone who can reach it can use it");
    }
    let limits = cfg.server.limits()?;
    let engine = engine_args(&args.engine, &cfg)?;
    let dispatcher = build_dispatcher(&cfg, &engine).await?;
    if let Some(l) = dispatcher.ledger() {
        tracing::info!("egress ledger: {}", l.path().display());
    }
    let telemetry = tandem_telemetry::Telemetry::start(&cfg.telemetry, dispatcher.activity())
        .map_err(anyhow::Error::msg)?;
    if let Some(endpoint) = cfg
        .telemetry
        .otlp_endpoint
        .as_deref()
        .filter(|_| telemetry.is_some())
    {
        tracing::info!(
            "traces: OTLP ({}) to {endpoint}",
            cfg.telemetry.otlp_protocol
        );
    }
    let state = AppState::new(dispatcher.clone(), limits);
    let addr = SocketAddr::new(host, cfg.server.port.unwrap_or(8080));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    print_banner(&addr, &dispatcher, args.role);
    tandem_server::serve(listener, state, shutdown_signal()).await?;
    if let Some(t) = telemetry {
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    if let Some(l) = dispatcher.ledger() {
        l.flush();
    }
    Ok(())
}

fn print_banner(addr: &SocketAddr, d: &Dispatcher, role: Role) {
    let base = format!("http://{addr}/v1");
    let locals: Vec<String> = d.locals().iter().map(|l| l.model_for("")).collect();
    let clouds: Vec<String> = d
        .clouds()
        .iter()
        .map(|c| {
            let models: Vec<String> = c.models().into_iter().map(|m| m.id).collect();
            format!("{} ({})", c.name(), models.join(", "))
        })
        .collect();
    println!(
        "Tandem ({}) is serving {} at {base}",
        match role {
            Role::Device if locals.is_empty() => "gateway",
            Role::Device => "device",
            Role::Cloud => "cloud",
        },
        if locals.is_empty() {
            "no local model".to_owned()
        } else {
            locals.join(", ")
        }
    );
    if !clouds.is_empty() {
        println!(
            "cloud upstreams: {}; `{}` lets Tandem choose per request",
            clouds.join(", "),
            d.policy().virtual_model
        );
    }
    let model = if clouds.is_empty() {
        locals.first().map_or(DEFAULT_MODEL, String::as_str)
    } else {
        d.policy().virtual_model.as_str()
    };
    println!();
    println!("Call it with curl:");
    println!(
        "  curl -i {base}/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}]}}'"
    );
    println!();
    println!("or point any OpenAI client at it:");
    println!("  OPENAI_BASE_URL={base} OPENAI_API_KEY=unused python your_app.py");
    println!();
    println!(
        "x-tandem-* response headers say where each request ran and why; metrics at http://{addr}/metrics."
    );
    println!(
        "Dashboard: http://{addr}/ui (live requests, device, upstreams, ledger); `tandem top` in a terminal."
    );
    println!("Press Ctrl-C to stop.");
}
