//! `tandem bench router`: how long the learned router takes to decide —
//! embedding the prompt, scoring it and running the policy — for prompts of
//! 32 and 128 word pieces, through the sentence encoder and through the
//! router's static table. Measured against the local model's time to first
//! token on the same prompts, which is what a routed local answer would
//! otherwise wait for.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use tandem_api::{Answer, GenerateRequest, Input, Message, Sampling};
use tandem_catalog::DEFAULT_MODEL;
use tandem_engine::EngineOptions;
use tandem_policy::{Features, LocalView, PolicyConfig, PrivacyMode, Scorer, View, decide};
use tandem_router::learned::RouterInput;

use crate::setup::{load_embedder, load_engine, load_router};

/// `tandem bench router`'s options.
#[derive(Args)]
pub struct RouterBenchArgs {
    /// JSONL of prompts (`prompt` field); default: the built-in sample.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The router file (default: $TANDEM_HOME/router.json).
    #[arg(long)]
    pub router: Option<PathBuf>,
    /// Decisions timed (after a warm-up).
    #[arg(long, default_value_t = 300)]
    pub decisions: usize,
    /// The long prompts' length, in the embedder's word pieces (the short
    /// ones have 32).
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Local model for the reference (time to first token).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
}

const SAMPLE: &[&str] = &[
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain the difference between a process and a thread in an operating system, with an example of when you would use each.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
    "Which of the following is a correct statement about the Krebs cycle? A) It occurs in the cytoplasm B) It produces most of the cell's ATP directly C) It releases carbon dioxide D) It requires no enzymes",
    "Translate 'good morning, how are you?' into Spanish.",
    "Summarise the main causes of the First World War in three sentences.",
    "A rectangle has a perimeter of 56 cm and its length is three times its width. What is its area?",
    "Give me a SQL query that returns the ten customers with the highest total order value.",
    "hi",
];

/// `text` repeated until it has at least `n` word pieces (with `[CLS]`
/// and `[SEP]`), then cut word by word to at most `n`.
fn fit(embedder: &tandem_embed::Embedder, text: &str, n: usize) -> String {
    let mut long = text.to_owned();
    while embedder.count_tokens(&long) < n && !text.trim().is_empty() {
        long = format!("{long} {text}");
    }
    let mut words: Vec<&str> = long.split_whitespace().collect();
    let mut out = words.join(" ");
    while embedder.count_tokens(&out) > n && !words.is_empty() {
        words.pop();
        out = words.join(" ");
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: RouterBenchArgs) -> anyhow::Result<()> {
    let embedder = load_embedder().await?;
    let path = args
        .router
        .clone()
        .unwrap_or_else(tandem_catalog::router_path);
    if !path.is_file() {
        anyhow::bail!(
            "no router at {} (train one first: tandem router train --data FILE)",
            path.display()
        );
    }
    let router = load_router(&path, &embedder).await?;
    let table = match &router.input {
        RouterInput::Static(t) => Some(t.clone()),
        RouterInput::Embedder => None,
    };
    let scorer = &router.scorer;
    let base: Vec<String> = match &args.data {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("prompt").and_then(|p| p.as_str()).map(str::to_owned))
            .take(args.decisions)
            .collect(),
        None => SAMPLE.iter().map(|s| (*s).to_owned()).collect(),
    };
    if base.is_empty() {
        anyhow::bail!("no prompts to time");
    }
    let policy = PolicyConfig::default();
    let view = View {
        local: LocalView {
            available: true,
            model: "local".into(),
            context_length: 4096,
            capacity: 4,
            ..LocalView::default()
        },
        ..View::default()
    };
    let decide_with = |v: &[f32], text: &str| {
        let features = Features {
            privacy: Some(PrivacyMode::Redact),
            prompt_tokens: 64,
            difficulty: Some(scorer.score(v, text)),
            difficulty_threshold: scorer.threshold(None),
            ..Features::default()
        };
        std::hint::black_box(decide(&features, &view, &policy).is_ok());
    };
    let time_path = |prompts: &[String], static_path: bool| -> anyhow::Result<Vec<f64>> {
        let one = |text: &str| -> anyhow::Result<f64> {
            let t0 = Instant::now();
            let v = match (&table, static_path) {
                (Some(t), true) => t.embed_one(text)?,
                _ => embedder.embed_one(text)?,
            };
            decide_with(&v, text);
            Ok(t0.elapsed().as_secs_f64() * 1e3)
        };
        for p in prompts.iter().take(10) {
            one(p)?;
        }
        let mut times = (0..args.decisions)
            .map(|i| one(&prompts[i % prompts.len()]))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(times)
    };

    println!(
        "router decision (embedding + score + policy), {} decisions per row over {} prompts, {} threads{}:",
        args.decisions,
        base.len(),
        tandem_embed::threads(),
        if table.is_some() {
            ""
        } else {
            " (this router has no static table: train one with `tandem router train`)"
        }
    );
    println!(
        "  {:<34} {:>7} {:>9} {:>9} {:>9}",
        "vectors", "pieces", "p50 ms", "p99 ms", "max ms"
    );
    let mut static_p99 = 0f64;
    let mut encoder_p99_128 = 0f64;
    for n in [32usize, args.max_tokens.max(1)] {
        let prompts: Vec<String> = base.iter().map(|p| fit(&embedder, p, n)).collect();
        let mut rows = vec![("sentence encoder (MiniLM forward)", false)];
        if table.is_some() {
            rows.push(("static table (distilled)", true));
        }
        for (name, static_path) in rows {
            let times = time_path(&prompts, static_path)?;
            let p99 = percentile(&times, 0.99);
            if static_path {
                static_p99 = static_p99.max(p99);
            } else if n == args.max_tokens.max(1) {
                encoder_p99_128 = p99;
            }
            println!(
                "  {name:<34} {n:>7} {:>9.3} {p99:>9.3} {:>9.3}",
                percentile(&times, 0.5),
                times.last().copied().unwrap_or(0.0)
            );
        }
    }
    if table.is_some() {
        println!(
            "  static p99 (worst row) {static_p99:.3} ms (goal: <= 5 ms); encoder p99 at {} pieces / static = {:.0}x",
            args.max_tokens,
            encoder_p99_128 / static_p99.max(1e-9)
        );
    }
    let prompts: Vec<String> = base
        .iter()
        .map(|p| fit(&embedder, p, args.max_tokens))
        .collect();
    let times = time_path(&prompts, table.is_some())?;
    let p99 = percentile(&times, 0.99);

    // Reference: the local model's time to first token on the same prompts.
    let engine = load_engine(
        &args.model,
        &EngineOptions {
            threads: Some(tandem_engine::Threads::Fixed(2)),
            context: Some(1024),
            parallel: Some(1),
            gpu_layers: None,
        },
    )
    .await?;
    let mut ttfts = Vec::new();
    for p in prompts.iter().cycle().take(prompts.len().clamp(5, 30)) {
        let req = GenerateRequest {
            choices: 1,
            model: engine.model_id().to_owned(),
            input: Input::Chat {
                messages: vec![Message::new("user", p.as_str())],
                continue_from: None,
            },
            sampling: Sampling::greedy(),
            max_tokens: Some(1),
            stop: Vec::new(),
            logprobs: None,
            stream: true,
            include_usage: false,
            extra: Default::default(),
        };
        let t0 = Instant::now();
        Answer::collect(engine.submit(req)?).await?;
        ttfts.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    ttfts.sort_by(f64::total_cmp);
    let ttft50 = percentile(&ttfts, 0.5);
    println!(
        "  local time to first token ({}, 2 threads, {}-piece prompts): p50 {ttft50:.1} ms; router p99 / local TTFT p50 = {:.4}",
        args.model,
        args.max_tokens,
        p99 / ttft50.max(1e-9)
    );
    Ok(())
}
