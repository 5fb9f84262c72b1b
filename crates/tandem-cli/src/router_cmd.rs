//! `tandem router train` and `tandem router eval`: the learned router from
//! labelled prompts (RouteLLM's JSONL format), evaluated on prompts the
//! training never saw.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Deserialize;
use tandem_embed::Embedder;
use tandem_policy::learned::{ModelKind, RouterModel, TrainConfig, text_features};
use tandem_train::{self as learned, Calibration, Example};

pub const EMBEDDER: &str = "all-minilm-l6-v2";

#[derive(Subcommand)]
pub enum RouterCommand {
    /// Train a router on a labelled JSONL file; evaluates on a held-out split.
    Train(TrainArgs),
    /// Evaluate a router on prompts it was not trained on.
    Eval(EvalArgs),
}

#[derive(Args)]
pub struct TrainArgs {
    /// JSONL with id, source, prompt, weak_correct, strong_correct.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the router (default: $TANDEM_HOME/router.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value = "all")]
    pub model: ModelKind,
    /// Share of prompts held out of training, per source.
    #[arg(long, default_value_t = 0.2)]
    pub holdout: f32,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    #[arg(long, default_value_t = 0.05)]
    pub temperature: f32,
    #[arg(long, default_value_t = 10.0)]
    pub lambda: f32,
    #[arg(long, default_value_t = 0.05)]
    pub topic_temperature: f32,
    /// `quality=0.95` (share of the strong model's accuracy) or `share=0.4`
    /// (share sent to the cloud).
    #[arg(long, default_value = "quality=0.95")]
    pub calibrate: String,
}

#[derive(Args)]
pub struct EvalArgs {
    #[arg(long)]
    pub data: PathBuf,
    /// Default: $TANDEM_HOME/router.json.
    #[arg(long)]
    pub router: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Deserialize)]
struct Row {
    id: String,
    source: String,
    prompt: String,
    #[serde(default)]
    subject: Option<String>,
    weak_correct: bool,
    strong_correct: bool,
}

/// Loads an embedding model from the catalog, pulling it if needed.
pub async fn load_embedder(name: &str) -> anyhow::Result<Embedder> {
    let r = tandem_catalog::resolve(name).await?;
    let dir = r.path.parent().context("model folder")?.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || Embedder::load(&dir)).await??)
}

fn read_rows(path: &Path) -> anyhow::Result<(Vec<Row>, String)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .read_to_end(&mut bytes)?;
    let hash = tandem_ledger::sha256_hex(&bytes);
    let mut rows = Vec::new();
    for (i, line) in bytes.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push(
            serde_json::from_str::<Row>(&line)
                .with_context(|| format!("{} line {}", path.display(), i + 1))?,
        );
    }
    Ok((rows, hash))
}

/// Embeds every prompt, reusing a cache keyed by the file's hash.
fn embed_rows(embedder: &Embedder, rows: &[Row], hash: &str) -> anyhow::Result<Vec<Vec<f32>>> {
    let dim = embedder.dim();
    let cache = tandem_catalog::default_home()
        .join("cache")
        .join(format!("embeddings-{EMBEDDER}-{}.f32", &hash[..16]));
    if let Ok(bytes) = std::fs::read(&cache)
        && bytes.len() == rows.len() * dim * 4
    {
        return Ok(bytes
            .chunks_exact(dim * 4)
            .map(|row| {
                row.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect());
    }
    let bar = indicatif::ProgressBar::new(rows.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "embedding prompts [{bar:32}] {pos}/{len} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(16) {
        let texts: Vec<&str> = chunk.iter().map(|r| r.prompt.as_str()).collect();
        out.extend(embedder.embed(&texts)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = cache.with_extension("partial");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for v in &out {
        for x in v {
            f.write_all(&x.to_le_bytes())?;
        }
    }
    f.flush()?;
    drop(f);
    std::fs::rename(&tmp, &cache)?;
    Ok(out)
}

fn examples(embedder: &Embedder, path: &Path) -> anyhow::Result<Vec<Example>> {
    let (rows, hash) = read_rows(path)?;
    if rows.is_empty() {
        bail!("{} has no prompts", path.display());
    }
    let vectors = embed_rows(embedder, &rows, &hash)?;
    Ok(rows
        .into_iter()
        .zip(vectors)
        .map(|(r, embedding)| Example {
            features: text_features(&r.prompt),
            topic: r.subject.clone().unwrap_or_else(|| r.source.clone()),
            id: r.id,
            source: r.source,
            embedding,
            weak: r.weak_correct,
            strong: r.strong_correct,
        })
        .collect())
}

fn parse_calibration(s: &str) -> anyhow::Result<Calibration> {
    let (k, v) = s
        .split_once('=')
        .context("--calibrate is quality=X or share=X")?;
    let v: f32 = v.parse().context("--calibrate value")?;
    if !(0.0..=1.0).contains(&v) {
        bail!("--calibrate value must be between 0 and 1");
    }
    match k {
        "quality" => Ok(Calibration::Quality(v)),
        "share" => Ok(Calibration::CloudShare(v)),
        _ => bail!("--calibrate is quality=X or share=X"),
    }
}

fn print_metrics(overall: &learned::Metrics, per: &[(String, learned::Metrics)]) {
    println!(
        "{:<10} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>9} {:>13} {:>12}",
        "source",
        "prompts",
        "weak",
        "strong",
        "APGR",
        "CPT50",
        "CPT80",
        "local@95",
        "random APGR",
        "random local"
    );
    let row = |name: &str, m: &learned::Metrics| {
        println!(
            "{:<10} {:>7} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>6.3} {:>9.3} {:>13.3} {:>12.3}",
            name,
            m.prompts,
            m.weak_accuracy,
            m.strong_accuracy,
            m.apgr,
            m.cpt50,
            m.cpt80,
            m.local_share_at_95,
            m.random_apgr,
            m.random_local_share_at_95
        );
    };
    row("all", overall);
    for (s, m) in per {
        row(s, m);
    }
}

pub async fn run(cmd: RouterCommand) -> anyhow::Result<()> {
    let e = load_embedder(EMBEDDER).await?;
    match cmd {
        RouterCommand::Train(a) => {
            let calibration = parse_calibration(&a.calibrate)?;
            let data = tokio::task::block_in_place(|| examples(&e, &a.data))?;
            let (train_set, test) = learned::split(data, a.holdout, a.seed);
            let config = TrainConfig {
                kind: a.model,
                k: a.k,
                temperature: a.temperature,
                ridge_lambda: a.lambda,
                topic_temperature: a.topic_temperature,
            };
            eprintln!(
                "training a {:?} router on {} prompts ({} held out)...",
                a.model,
                train_set.len(),
                test.len()
            );
            if train_set.is_empty() {
                bail!("nothing left to train on: lower --holdout");
            }
            let model =
                tokio::task::block_in_place(|| learned::train(&train_set, config, calibration));
            if test.is_empty() {
                println!("trained on every prompt; nothing held out to evaluate on");
            } else {
                let (overall, per) = learned::evaluate(&model, &test);
                println!(
                    "held-out evaluation ({} prompts the training never saw):",
                    test.len()
                );
                print_metrics(&overall, &per);
            }
            println!(
                "threshold {:.3} (calibrated for {} on the training prompts)",
                model.threshold, model.calibrated_for
            );
            let out = a.out.unwrap_or_else(tandem_catalog::router_path);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&out, serde_json::to_vec(&model)?)?;
            println!("router written to {}", out.display());
        }
        RouterCommand::Eval(a) => {
            let path = a.router.unwrap_or_else(tandem_catalog::router_path);
            let bytes = std::fs::read(&path).with_context(|| {
                format!(
                    "reading {} (train a router first: tandem router train --data FILE)",
                    path.display()
                )
            })?;
            let model: RouterModel = serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not a router file", path.display()))?;
            let data = tokio::task::block_in_place(|| examples(&e, &a.data))?;
            let (overall, per) = tokio::task::block_in_place(|| learned::evaluate(&model, &data));
            if overall.prompts == 0 {
                bail!(
                    "the router was trained on every prompt of this file: nothing unseen to evaluate"
                );
            }
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"overall": overall, "per_source": per})
                    )?
                );
            } else {
                println!(
                    "evaluation on {} prompts the router was not trained on:",
                    overall.prompts
                );
                print_metrics(&overall, &per);
            }
        }
    }
    Ok(())
}
