//! `tandem bench router`: how long the learned router takes to decide —
//! embedding the prompt, scoring it and running the policy — for prompts up
//! to 128 word pieces. Measured against the local model's time to first
//! token on the same prompts, which is what a routed local answer would
//! otherwise wait for.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use tandem_api::{Answer, GenerateRequest, Input, Message, Sampling};
use tandem_catalog::DEFAULT_MODEL;
use tandem_engine::EngineOptions;
use tandem_policy::learned::LearnedScorer;
use tandem_policy::{Features, LocalView, PolicyConfig, PrivacyMode, Scorer, View, decide};

use crate::setup::{load_embedder, load_engine};

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
    /// Longest prompt, in the embedder's word pieces.
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

fn truncate(embedder: &tandem_embed::Embedder, text: &str, max: usize) -> String {
    let mut words: Vec<&str> = text.split_whitespace().collect();
    let mut out = words.join(" ");
    while embedder.count_tokens(&out) > max && !words.is_empty() {
        let keep = words.len() * 9 / 10;
        words.truncate(keep);
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
    let scorer = LearnedScorer::load(&path, embedder.dim())
        .map_err(|e| anyhow::anyhow!("{e}\n(train one first: tandem router train --data FILE)"))?;
    let mut prompts: Vec<String> = match &args.data {
        Some(p) => std::fs::read_to_string(p)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("prompt").and_then(|p| p.as_str()).map(str::to_owned))
            .take(args.decisions)
            .collect(),
        None => SAMPLE.iter().map(|s| (*s).to_owned()).collect(),
    };
    if prompts.is_empty() {
        anyhow::bail!("no prompts to time");
    }
    prompts = prompts
        .iter()
        .map(|p| truncate(&embedder, p, args.max_tokens))
        .collect();
    let tokens: Vec<usize> = prompts.iter().map(|p| embedder.count_tokens(p)).collect();
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
    let decide_one = |text: &str| -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let v = embedder.embed_one(text)?;
        let features = Features {
            privacy: Some(PrivacyMode::Redact),
            prompt_tokens: 64,
            difficulty: Some(scorer.score(&v, text)),
            difficulty_threshold: scorer.threshold(None),
            ..Features::default()
        };
        let d = decide(&features, &view, &policy);
        std::hint::black_box(d.is_ok());
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    for p in prompts.iter().take(10) {
        decide_one(p)?;
    }
    let mut times = Vec::with_capacity(args.decisions);
    let mut by_len: Vec<(usize, f64)> = Vec::with_capacity(args.decisions);
    for i in 0..args.decisions {
        let k = i % prompts.len();
        let ms = decide_one(&prompts[k])?;
        times.push(ms);
        by_len.push((tokens[k], ms));
    }
    times.sort_by(f64::total_cmp);
    let longest = tokens.iter().copied().max().unwrap_or(0);
    let long_times: Vec<f64> = {
        let mut v: Vec<f64> = by_len
            .iter()
            .filter(|(t, _)| *t * 4 >= longest * 3)
            .map(|(_, ms)| *ms)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    };

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
    let p99 = percentile(&times, 0.99);

    println!(
        "router decision (embedding + score + policy), {} decisions over {} prompts of {}-{} word pieces, {} threads:",
        times.len(),
        prompts.len(),
        tokens.iter().min().unwrap_or(&0),
        longest,
        tandem_embed::threads()
    );
    println!(
        "  p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (goal: p99 <= 25 ms)",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        p99,
        times.last().copied().unwrap_or(0.0)
    );
    println!(
        "  longest quarter of prompts: p50 {:.2} ms   p99 {:.2} ms",
        percentile(&long_times, 0.5),
        percentile(&long_times, 0.99)
    );
    println!(
        "  local time to first token ({}, 2 threads): p50 {ttft50:.1} ms; router p99 / local TTFT p50 = {:.2}",
        args.model,
        p99 / ttft50.max(1e-9)
    );
    println!(
        "  (the server starts local generation while the router decides, so a local answer waits for neither)"
    );
    Ok(())
}
