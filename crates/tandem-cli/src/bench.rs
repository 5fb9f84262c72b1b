//! `tandem bench`: engine against a plain llama.cpp loop, and batching gain.

use clap::Args;
use tandem_catalog::DEFAULT_MODEL;
use tandem_engine::bench::{BenchConfig, BenchReport};

use crate::models::resolve;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: Option<BenchKind>,
    #[command(flatten)]
    pub engine: EngineBench,
}

#[derive(clap::Subcommand)]
pub enum BenchKind {
    /// The engine against a plain llama.cpp loop (the default).
    Engine(EngineBench),
    /// Latency Tandem adds to cloud requests, against LiteLLM.
    Gateway(crate::bench_gateway::GatewayArgs),
    /// Time the learned router takes to decide.
    Router(crate::bench_router::RouterBenchArgs),
    /// Accuracy and cloud share: local only, cloud only, router, cascade.
    Cascade(crate::bench_cascade::CascadeArgs),
    /// Edge–cloud speculative decoding against cloud-only generation.
    Spec(crate::bench_spec::SpecArgs),
}

#[derive(Args)]
pub struct EngineBench {
    /// Catalog name or GGUF path.
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Threads for both sides (fixed, so the comparison is fair).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Runs per measurement; medians are reported.
    #[arg(long, default_value_t = 7)]
    pub runs: usize,
    /// Concurrent streams compared with a single one.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print every run's figures.
    #[arg(long, short = 'v')]
    pub verbose: bool,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        None => engine(args.engine).await,
        Some(BenchKind::Engine(e)) => engine(e).await,
        Some(BenchKind::Gateway(g)) => {
            tokio::task::spawn_blocking(move || crate::bench_gateway::run(g)).await?
        }
        Some(BenchKind::Router(r)) => crate::bench_router::run(r).await,
        Some(BenchKind::Cascade(c)) => crate::bench_cascade::run(c).await,
        Some(BenchKind::Spec(s)) => crate::bench_spec::run(s).await,
    }
}

async fn engine(args: EngineBench) -> anyhow::Result<()> {
    let model = resolve(&args.model).await?;
    let cfg = BenchConfig {
        model_id: model.id,
        path: model.path,
        threads: args.threads.max(1),
        prompt_tokens: args.prompt_tokens.max(8),
        gen_tokens: args.gen_tokens.max(2),
        runs: args.runs.max(1),
        streams: args.streams.max(2),
        verbose: args.verbose,
    };
    eprintln!(
        "benchmarking {} ({} runs each; keep the machine otherwise idle)...",
        cfg.model_id, cfg.runs
    );
    let report = tokio::task::spawn_blocking(move || tandem_engine::bench::run(&cfg)).await??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok { "ok" } else { "BELOW GOAL" }
}

fn print_report(r: &BenchReport) {
    println!(
        "model {} | {} threads | prompt {} tokens | {} generated tokens | medians of {} runs (ratios: median of per-run ratios)",
        r.model, r.threads, r.prompt_tokens, r.gen_tokens, r.runs
    );
    println!();
    println!("{:<22} {:>14} {:>14}", "", "prefill tok/s", "decode tok/s");
    println!(
        "{:<22} {:>14.1} {:>14.1}",
        "plain llama.cpp loop", r.reference.prefill_tps, r.reference.decode_tps
    );
    println!(
        "{:<22} {:>14.1} {:>14.1}",
        "tandem engine", r.engine.prefill_tps, r.engine.decode_tps
    );
    println!(
        "{:<22} {:>14.3} {:>14.3}   goal >= 0.97: {} / {}",
        "ratio",
        r.prefill_ratio,
        r.decode_ratio,
        verdict(r.prefill_ratio >= 0.97),
        verdict(r.decode_ratio >= 0.97)
    );
    println!();
    println!(
        "continuous batching: 1 stream {:.1} tok/s, {} streams {:.1} tok/s aggregate, ratio {:.2}   goal >= 2.0: {}",
        r.one_stream_tps,
        r.streams,
        r.many_streams_tps,
        r.concurrency_ratio,
        verdict(r.concurrency_ratio >= 2.0)
    );
    println!(
        "  (bare llama.cpp decoding {} sequences per batch vs 1, same run: {:.2}; the weight format's kernels set this ceiling)",
        r.streams, r.llama_batch_ratio
    );
}
