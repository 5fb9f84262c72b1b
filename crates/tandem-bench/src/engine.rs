//! `tandem bench engine`: the engine against a plain llama.cpp loop, and
//! the batching gain (the measurement itself is in `engine_runs`).

use clap::Args;
use tandem_catalog::DEFAULT_MODEL;

use crate::engine_runs::{BenchConfig, BenchReport};

/// `tandem bench engine`'s options.
#[derive(Args)]
pub struct EngineBench {
    /// Catalog name or GGUF path.
    #[arg(long, short = 'm', default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Threads for both sides (fixed, so the comparison is fair).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Prompt length.
    #[arg(long, default_value_t = 256)]
    pub prompt_tokens: usize,
    /// Tokens generated per answer.
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
    /// The peer: a plain llama.cpp loop through the same library, or
    /// llama.cpp's own server over HTTP (`tandem bench server`'s table).
    #[arg(long, value_enum, default_value_t = Peer::LlamaLoop)]
    pub against: Peer,
}

/// What the engine is measured against.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Peer {
    /// A plain llama.cpp decoding loop in this process.
    LlamaLoop,
    /// llama.cpp's `llama-server`, built from its pinned source.
    LlamaServer,
}

/// Runs the engine benchmark and prints its report.
pub async fn run(args: EngineBench) -> anyhow::Result<()> {
    if args.against == Peer::LlamaServer {
        return crate::server::run(crate::server::ServerBenchArgs {
            model: args.model,
            rounds: args.runs,
            llama_server: None,
            threads: args.threads,
            gen_tokens: u32::try_from(args.gen_tokens).unwrap_or(u32::MAX),
        })
        .await;
    }
    let model = tandem_catalog::resolve(&args.model).await?;
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
    let report = tokio::task::spawn_blocking(move || crate::engine_runs::run(&cfg)).await??;
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
