//! `tandem`: a thin binary wiring Tandem's libraries together.

mod chat;
mod config;
mod demo;
mod models;
mod ops;
mod router_cmd;
mod router_label;
mod router_read;
mod serve;
mod top;
mod upstreams;

use clap::{Args, Parser, Subcommand};
use tandem_engine::Threads;

#[derive(Parser)]
#[command(
    name = "tandem",
    version,
    about = "Hybrid AI runtime: local models on this device, the cloud as backup",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI-compatible API (pulls the model if missing).
    Serve(serve::ServeArgs),
    /// Chat with a model in the terminal, answers streamed.
    Chat(chat::ChatArgs),
    /// Answer one prompt and exit.
    Run(chat::RunArgs),
    /// Fetch a model into the cache: a catalog name, hf:owner/repo/file.gguf,
    /// an HTTPS URL or a local path.
    Pull(models::PullArgs),
    /// List the catalog and what is installed.
    Models(models::ModelsArgs),
    /// Benchmarks against the peers in the same run.
    Bench(tandem_bench::BenchArgs),
    /// Explain routing decisions of a running Tandem.
    #[command(subcommand)]
    Route(ops::RouteCommand),
    /// Show or override the signals a running Tandem routes on.
    #[command(subcommand)]
    Signals(ops::SignalsCommand),
    /// List or verify the egress ledger.
    #[command(subcommand)]
    Ledger(ops::LedgerCommand),
    /// Make gateway API keys.
    #[command(subcommand)]
    Keys(ops::KeysCommand),
    /// Inspect or clear the semantic cache.
    #[command(subcommand)]
    Cache(ops::CacheCommand),
    /// Train and evaluate the learned router.
    #[command(subcommand)]
    Router(router_cmd::RouterCommand),
    /// Follow a running Tandem's requests live in the terminal (the
    /// dashboard's feed; /ui in a browser).
    Top(top::TopArgs),
    /// Ask the configured upstreams what they apply (`upstreams check`).
    #[command(subcommand)]
    Upstreams(upstreams::UpstreamsCommand),
    /// Start a device and a cloud Tandem on this machine and show requests
    /// being placed on each.
    Demo(demo::DemoArgs),
}

/// Engine settings shared by every command that loads a model.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct EngineArgs {
    /// Inference threads: `auto` (default) follows the machine's load.
    #[arg(long, env = "TANDEM_THREADS")]
    pub threads: Option<Threads>,
    /// Tokens per request (prompt + answer); default: model's, at most 4096.
    #[arg(long = "ctx")]
    pub context: Option<u32>,
    /// Requests decoded together in one batch (default 4).
    #[arg(long)]
    pub parallel: Option<u32>,
    /// Layers to offload to a GPU (needs a build with a GPU feature).
    #[arg(long)]
    pub gpu_layers: Option<u32>,
}

/// The configuration and the device model, for the commands that run the
/// device model over a file of prompts.
#[derive(Args, Debug, Clone, Default)]
pub struct DeviceArgs {
    /// Configuration file (default: $TANDEM_CONFIG, or $TANDEM_HOME/tandem.toml).
    #[arg(long, short = 'c')]
    pub config: Option<std::path::PathBuf>,
    /// The device model (default: the configuration's first local model).
    #[arg(long)]
    pub device: Option<String>,
}

impl DeviceArgs {
    /// The configuration and the device model's name: `--device`, else the
    /// configuration's first local model, else the catalog's default.
    pub fn load(&self) -> anyhow::Result<(config::Config, String)> {
        let (cfg, _) = config::load(self.config.as_deref())?;
        let device = self
            .device
            .clone()
            .or_else(|| cfg.local.models.first().cloned())
            .unwrap_or_else(|| tandem_catalog::DEFAULT_MODEL.to_owned());
        Ok((cfg, device))
    }
}

impl EngineArgs {
    /// As the engine takes them.
    pub fn options(&self) -> tandem_engine::EngineOptions {
        tandem_engine::EngineOptions {
            threads: self.threads,
            context: self.context,
            parallel: self.parallel,
            gpu_layers: self.gpu_layers,
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new("info,llama-cpp-2=warn,tower_http=warn")
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing();
    // I/O only (inference has its own threads), so a few workers suffice;
    // on a small machine fewer workers also means fewer cross-thread
    // wake-ups per request. TANDEM_WORKERS overrides.
    let workers = std::env::var("TANDEM_WORKERS")
        .ok()
        .and_then(|w| w.parse::<usize>().ok())
        .filter(|&w| w > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(2, |n| n.get())
                .min(4)
        });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(a) => rt.block_on(serve::run(a)),
        Command::Chat(a) => rt.block_on(chat::chat(a)),
        Command::Run(a) => rt.block_on(chat::run(a)),
        Command::Pull(a) => rt.block_on(models::pull(a)),
        Command::Models(a) => models::list(a),
        Command::Bench(a) => rt.block_on(tandem_bench::run(a)),
        Command::Route(c) => rt.block_on(ops::route(c)),
        Command::Signals(c) => rt.block_on(ops::signals(c)),
        Command::Ledger(c) => ops::ledger(c),
        Command::Keys(c) => ops::keys(c),
        Command::Router(c) => rt.block_on(router_cmd::run(c)),
        Command::Cache(c) => rt.block_on(ops::cache(c)),
        Command::Demo(a) => rt.block_on(demo::run(a)),
        Command::Top(a) => rt.block_on(top::top(a)),
        Command::Upstreams(c) => rt.block_on(upstreams::run(c)),
    }
}
