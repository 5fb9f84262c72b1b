//! Tandem's benchmarks, each measuring Tandem against its real peer in the
//! same run and printing ratios: the local engine against a bare llama.cpp
//! loop ([`engine`]), the gateway against LiteLLM ([`gateway`]), the learned
//! router's decision time ([`router`]), accuracy against cloud share for
//! the router and the cascade ([`cascade`], drawn by [`chart`]), and edge–cloud speculative
//! decoding against cloud-only generation ([`speculative`]),
//! personal-data detection against Presidio ([`privacy`]), tool calls and
//! structured outputs, constrained against free decoding ([`tools`]), and
//! the engine served over HTTP against llama.cpp's own server ([`server`]),
//! a soak under a faulty upstream ([`soak`]), and the dashboard page's
//! weight and first paint in a browser ([`ui`]).
//!
//! `tandem bench` calls [`run`]. Nothing here is on a request path; timing
//! assertions belong here, never in tests.

#![warn(missing_docs)]

pub mod cascade;
pub mod chart;
pub mod engine;
mod engine_runs;
pub mod gateway;
pub mod privacy;
pub mod process;
pub mod router;
pub mod server;
mod setup;
pub mod shared;
pub mod soak;
pub mod speculative;
pub mod tools;
pub mod ui;

use clap::Args;

/// `tandem bench [engine|gateway|router|cascade|spec]`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// Which benchmark; the engine's by default.
    #[command(subcommand)]
    pub what: Option<BenchKind>,
    /// The engine benchmark's options, when no subcommand is given.
    #[command(flatten)]
    pub engine: engine::EngineBench,
}

/// The benchmarks.
#[derive(clap::Subcommand)]
pub enum BenchKind {
    /// The engine against a plain llama.cpp loop (the default).
    Engine(engine::EngineBench),
    /// Latency Tandem adds to cloud requests, against LiteLLM.
    Gateway(gateway::GatewayArgs),
    /// Time the learned router takes to decide.
    Router(router::RouterBenchArgs),
    /// Accuracy and cloud share: local only, cloud only, router, cascade.
    Cascade(cascade::CascadeArgs),
    /// Edge–cloud speculative decoding against cloud-only generation.
    Spec(speculative::SpecArgs),
    /// Personal-data detection against Presidio: recall, false positives,
    /// latency, and strict mode end to end.
    Privacy(privacy::PrivacyArgs),
    /// Tool calls and structured outputs on the local model: valid shares,
    /// accuracy, and constrained against free decoding speed.
    Tools(tools::ToolsArgs),
    /// The engine served over HTTP against llama.cpp's own server: time to
    /// first token cold and on a conversation's next turn.
    Server(server::ServerBenchArgs),
    /// Mixed traffic against a device Tandem whose upstream fails in turn:
    /// every request's fate, handoffs, and the server's memory over time.
    Soak(soak::SoakArgs),
    /// The dashboard page: its weight and time to first paint in headless
    /// Chromium.
    Ui(ui::UiArgs),
    /// Keys, rate limits and budgets in Redis against in process, and two
    /// gateway replicas against one.
    Shared(shared::SharedArgs),
}

/// Runs the benchmark `args` names.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        None => engine::run(args.engine).await,
        Some(BenchKind::Engine(e)) => engine::run(e).await,
        Some(BenchKind::Gateway(g)) => tokio::task::spawn_blocking(move || gateway::run(g)).await?,
        Some(BenchKind::Router(r)) => router::run(r).await,
        Some(BenchKind::Cascade(c)) => cascade::run(c).await,
        Some(BenchKind::Spec(s)) => speculative::run(s).await,
        Some(BenchKind::Privacy(p)) => privacy::run(p).await,
        Some(BenchKind::Tools(t)) => tools::run(t).await,
        Some(BenchKind::Server(s)) => server::run(s).await,
        Some(BenchKind::Soak(s)) => soak::run(s).await,
        Some(BenchKind::Ui(u)) => ui::run(u).await,
        Some(BenchKind::Shared(s)) => tokio::task::spawn_blocking(move || shared::run(s)).await?,
    }
}
