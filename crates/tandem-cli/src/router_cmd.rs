//! `tandem router train` and `tandem router eval`: the learned router from
//! labelled prompts (RouteLLM's JSONL format), evaluated on prompts the
//! training never saw; with `--readings` (from `tandem router read`, in
//! `router_read`), its probe on the device model's readings.

use std::collections::HashMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;
use tandem_embed::{Embedder, StaticEmbedder};
use tandem_policy::learned::{ModelKind, StaticVectors, TextView, TrainConfig};
use tandem_router::learned::{LoadedRouter, RouterInput};
use tandem_train::{self as learned, Calibration, Example};

pub const EMBEDDER: &str = "all-minilm-l6-v2";

#[derive(Subcommand)]
pub enum RouterCommand {
    /// Train a router on a labelled JSONL file; evaluates on a held-out split.
    Train(TrainArgs),
    /// Evaluate a router on prompts it was not trained on.
    Eval(EvalArgs),
    /// Label prompts with the deployed device and cloud models, for `train`.
    Label(crate::router_label::LabelArgs),
    /// Read prompts with the device model, for `train --readings` (the
    /// router's probe).
    Read(crate::router_read::ReadArgs),
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
    /// L2 penalty of the lexical ridge (words and word pairs).
    #[arg(long, default_value_t = 3.0)]
    pub lexical_lambda: f32,
    /// Fewest training prompts the lexical ridge is fitted on.
    #[arg(long, default_value_t = 100, hide = true)]
    pub lexical_from: usize,
    /// The device model's readings of the prompts (`tandem router read`):
    /// adds the probe, fitted on the training prompts that were read. The
    /// router then reads each request with the device model before it
    /// decides.
    #[arg(long)]
    pub readings: Option<PathBuf>,
    /// L2 penalty of the probe (on standardised readings).
    #[arg(long, default_value_t = 30_000.0)]
    pub probe_lambda: f32,
    /// How many parts' worth the probe counts for.
    #[arg(long, default_value_t = 1.0)]
    pub probe_weight: f32,
    /// Read a request only when its difficulty without a reading is within
    /// the distance by which this share of the training prompts' readings
    /// moved their difficulty; 1 reads every request.
    #[arg(long, default_value_t = 0.95)]
    pub read_band: f32,
    /// `quality=0.95` (share of the strong model's accuracy) or `share=0.4`
    /// (share sent to the cloud).
    #[arg(long, default_value = "quality=0.95")]
    pub calibrate: String,
    /// What the router reads prompts through: `static`, a table distilled
    /// from the sentence encoder (a lookup per word piece, microseconds a
    /// prompt), or `encoder`, the encoder itself (tens of milliseconds).
    #[arg(long, value_enum, default_value = "static")]
    pub vectors: Vectors,
    /// Smooth-inverse-frequency constant of the static table's piece
    /// weights (0: every piece weighs the same).
    #[arg(long, default_value_t = 1e-3, hide = true)]
    pub sif: f64,
    /// L2 penalty (per prompt) of the map from the table onto the
    /// encoder's sentence vectors.
    #[arg(long, default_value_t = 1e-4, hide = true)]
    pub map_lambda: f64,
    /// Fewest training prompts the map onto the encoder's vectors is fitted
    /// on (default: one per dimension); with fewer, the table is the
    /// encoder's weighted piece vectors as they are.
    #[arg(long, hide = true)]
    pub map_min_prompts: Option<usize>,
}

/// What a router reads prompts through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Vectors {
    /// A static table distilled from the encoder.
    Static,
    /// The sentence encoder.
    Encoder,
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
    /// Also replay the file in order as traffic, with the memory of the
    /// cascade's outcomes (`[router.memory]`) learning from each prompt
    /// after it is scored, and compare.
    #[arg(long)]
    pub online: bool,
    /// `[router.memory] similarity` for --online.
    #[arg(long)]
    pub memory_similarity: Option<f32>,
    /// `[router.memory] prior` for --online.
    #[arg(long)]
    pub memory_prior: Option<f32>,
    /// The device model's readings of the prompts, for a router with a
    /// probe (`tandem router read`); prompts without one are scored
    /// without the probe.
    #[arg(long)]
    pub readings: Option<PathBuf>,
}

/// Attaches each example's reading from `path`; returns the model that
/// read them, the block they are of (`None`: the last layer) and how many
/// examples got one.
fn attach_readings(
    path: &Path,
    data: &mut [Example],
) -> anyhow::Result<(String, Option<u32>, usize)> {
    let (model, lines) = crate::router_read::load(path)?;
    let layer = lines.first().and_then(|l| l.layer);
    let mut by_id: HashMap<String, Vec<f32>> =
        lines.into_iter().map(|l| (l.id, l.reading)).collect();
    let mut n = 0;
    for e in data.iter_mut() {
        e.text.reading = by_id.remove(&e.id);
        n += usize::from(e.text.reading.is_some());
    }
    Ok((model, layer, n))
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

/// The folder of an embedding model from the catalog, pulling it if
/// needed.
pub async fn encoder_dir(name: &str) -> anyhow::Result<PathBuf> {
    let r = tandem_catalog::resolve(name).await?;
    Ok(r.path.parent().context("model folder")?.to_path_buf())
}

/// Loads an embedding model from the catalog, pulling it if needed.
pub async fn load_embedder(name: &str) -> anyhow::Result<Embedder> {
    let dir = encoder_dir(name).await?;
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

/// The file's prompts as examples embedded by the encoder, and each
/// prompt's text by id.
fn examples(
    embedder: &Embedder,
    path: &Path,
) -> anyhow::Result<(Vec<Example>, HashMap<String, String>)> {
    let (rows, hash) = read_rows(path)?;
    if rows.is_empty() {
        bail!("{} has no prompts", path.display());
    }
    let vectors = embed_rows(embedder, &rows, &hash)?;
    let mut prompts = HashMap::with_capacity(rows.len());
    let examples = rows
        .into_iter()
        .zip(vectors)
        .map(|(r, embedding)| {
            let e = Example {
                text: TextView::of(&r.prompt),
                topic: r.subject.clone().unwrap_or_else(|| r.source.clone()),
                id: r.id,
                source: r.source,
                embedding,
                weak: r.weak_correct,
                strong: r.strong_correct,
            };
            prompts.insert(e.id.clone(), r.prompt);
            e
        })
        .collect();
    Ok((examples, prompts))
}

/// Each vocabulary piece's vector from the encoder, computed once per
/// encoder and kept under `$TANDEM_HOME/cache`.
fn token_table(embedder: &Embedder) -> anyhow::Result<Vec<f32>> {
    let dim = embedder.dim();
    let vocab = embedder.tokenizer().get_vocab_size(true);
    let cache = tandem_catalog::default_home()
        .join("cache")
        .join(format!("pieces-{EMBEDDER}.f32"));
    if let Ok(bytes) = std::fs::read(&cache)
        && bytes.len() == vocab * dim * 4
    {
        return Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect());
    }
    let bar = indicatif::ProgressBar::new(vocab as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "distilling word pieces [{bar:32}] {pos}/{len} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let table = embedder.token_table(|done, _| bar.set_position(done as u64));
    bar.finish_and_clear();
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = cache.with_extension("partial");
    let bytes: Vec<u8> = table.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, &cache)?;
    Ok(table)
}

/// A static table for the training prompts: the encoder's piece vectors,
/// weighted by how rare each piece is among the training prompts, mapped
/// onto the encoder's own sentence vectors of those prompts.
fn distil(
    embedder: &Embedder,
    train: &[Example],
    prompts: &HashMap<String, String>,
    sif: f64,
    lambda: f64,
    min_prompts: usize,
) -> anyhow::Result<StaticEmbedder> {
    let dim = embedder.dim();
    let raw = token_table(embedder)?;
    let tokenizer = embedder.tokenizer().clone();
    let vocab = raw.len() / dim;
    let ids = train
        .iter()
        .map(|e| {
            let text = prompts.get(&e.id).map_or("", String::as_str);
            tandem_embed::pieces(&tokenizer, text)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let weights = if sif > 0.0 {
        let mut counts = vec![0u64; vocab];
        for id in ids.iter().flatten() {
            if let Some(c) = counts.get_mut(*id as usize) {
                *c += 1;
            }
        }
        learned::sif_weights(&counts, sif)
    } else {
        vec![1.0; vocab]
    };
    // With fewer prompts than dimensions the map is underdetermined (only
    // the ridge holds it), and measured it does worse than no map: 320
    // training prompts of the shared benchmark, held-out APGR 0.64 with the
    // map, 0.74 without; at 800 the map wins (0.71 against 0.68). Below one
    // prompt a dimension the pooled pieces are used as they are.
    if train.len() < min_prompts {
        eprintln!(
            "{} training prompts: too few to fit the map onto the encoder's vectors (at least {}); using the weighted piece vectors as they are",
            train.len(),
            min_prompts
        );
        return Ok(StaticEmbedder::new(
            tokenizer,
            dim,
            &raw,
            &weights,
            vec![0.0; dim],
        )?);
    }
    let x: Vec<Vec<f32>> = ids
        .iter()
        .map(|i| tandem_embed::weighted_mean(&raw, &weights, dim, i))
        .collect();
    let y: Vec<Vec<f32>> = train.iter().map(|e| e.embedding.clone()).collect();
    let map = learned::fit_linear_map(&x, &y, lambda)
        .context("the map onto the encoder's vectors could not be fitted")?;
    let folded: Vec<f32> = raw.chunks_exact(dim).flat_map(|r| map.linear(r)).collect();
    Ok(StaticEmbedder::new(
        tokenizer, dim, &folded, &weights, map.bias,
    )?)
}

/// Replaces each example's vector with the static table's.
fn embed_static(
    table: &StaticEmbedder,
    data: &mut [Example],
    prompts: &HashMap<String, String>,
) -> anyhow::Result<()> {
    for e in data {
        let text = prompts.get(&e.id).map_or("", String::as_str);
        e.embedding = table.embed_one(text)?;
    }
    Ok(())
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

/// The probe's band at the calibrated threshold, then under each of
/// [`learned::HELD_SHARES`] (none for a router without a probe).
fn bands(
    model: &tandem_policy::learned::RouterModel,
    data: &[Example],
) -> Vec<learned::BandReport> {
    std::iter::once(None)
        .chain(learned::HELD_SHARES.map(Some))
        .filter_map(|share| learned::band_report(model, data, share))
        .collect()
}

fn print_bands(bands: &[learned::BandReport]) {
    for b in bands {
        let at = match b.share {
            None => format!("the threshold {:.3}", b.threshold),
            Some(s) => format!(
                "a cloud share held at {:.0}% (threshold {:.3})",
                100.0 * s,
                b.threshold
            ),
        };
        println!(
            "reading only within {:.3} of {at}: {:.1}% of {} read prompts read, {:.1}% of decisions as reading all",
            b.reach,
            100.0 * b.read,
            b.prompts,
            100.0 * b.agree
        );
        for (k, name) in ["reading all", "within reach", "reading none"]
            .iter()
            .enumerate()
        {
            println!(
                "  {name:<13} accuracy {:.3}, cloud share {:.3}",
                b.accuracy[k], b.cloud[k]
            );
        }
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
    match cmd {
        RouterCommand::Train(a) => {
            let e = load_embedder(EMBEDDER).await?;
            let calibration = parse_calibration(&a.calibrate)?;
            let (mut data, prompts) = tokio::task::block_in_place(|| examples(&e, &a.data))?;
            let reader = match &a.readings {
                Some(path) => {
                    let (model, layer, n) = attach_readings(path, &mut data)?;
                    if n == 0 {
                        bail!(
                            "{} holds no reading of a prompt of {}",
                            path.display(),
                            a.data.display()
                        );
                    }
                    Some((model, layer))
                }
                None => None,
            };
            let (mut train_set, mut test) = learned::split(data, a.holdout, a.seed);
            let config = TrainConfig {
                kind: a.model,
                k: a.k,
                temperature: a.temperature,
                ridge_lambda: a.lambda,
                topic_temperature: a.topic_temperature,
                lexical_lambda: a.lexical_lambda,
                lexical_from: a.lexical_from,
                probe_lambda: a.probe_lambda,
                probe_weight: a.probe_weight,
                read_band: a.read_band,
                ..TrainConfig::default()
            };
            if train_set.is_empty() {
                bail!("nothing left to train on: lower --holdout");
            }
            let table = match a.vectors {
                Vectors::Static => Some(tokio::task::block_in_place(|| {
                    let min = a.map_min_prompts.unwrap_or(e.dim());
                    let t = distil(&e, &train_set, &prompts, a.sif, a.map_lambda, min)?;
                    embed_static(&t, &mut train_set, &prompts)?;
                    embed_static(&t, &mut test, &prompts)?;
                    anyhow::Ok(t)
                })?),
                Vectors::Encoder => None,
            };
            eprintln!(
                "training a router (--model {}) on {} prompts ({} held out), {} vectors...",
                format!("{:?}", a.model).to_lowercase(),
                train_set.len(),
                test.len(),
                format!("{:?}", a.vectors).to_lowercase()
            );
            if reader.is_some() {
                let read = |v: &[Example]| v.iter().filter(|e| e.text.reading.is_some()).count();
                eprintln!(
                    "readings: {} of {} training prompts, {} of {} held out",
                    read(&train_set),
                    train_set.len(),
                    read(&test),
                    test.len()
                );
            }
            let mut model =
                tokio::task::block_in_place(|| learned::train(&train_set, config, calibration));
            match (&mut model.probe, reader) {
                (Some(p), Some((reader, layer))) => {
                    p.model = reader;
                    p.layer = layer;
                }
                (None, Some(_)) => eprintln!(
                    "too few training prompts were read for a probe (at least {}): trained without one",
                    learned::PROBE_MIN_PROMPTS
                ),
                _ => {}
            }
            if test.is_empty() {
                println!("trained on every prompt; nothing held out to evaluate on");
            } else {
                let (overall, per) = learned::evaluate(&model, &test);
                println!(
                    "held-out evaluation ({} prompts the training never saw):",
                    test.len()
                );
                print_metrics(&overall, &per);
                print_bands(&bands(&model, &test));
            }
            println!(
                "threshold {:.3} (calibrated for {} on the training prompts)",
                model.threshold, model.calibrated_for
            );
            let out = a.out.unwrap_or_else(tandem_catalog::router_path);
            if let Some(dir) = out.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if let Some(t) = table {
                let file = out.with_extension("vectors.safetensors");
                t.save(&file)?;
                let bytes = std::fs::read(&file)?;
                model.vectors = Some(StaticVectors {
                    file: file
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    sha256: tandem_ledger::sha256_hex(&bytes),
                });
                println!("static vectors written to {}", file.display());
            }
            std::fs::write(&out, serde_json::to_vec(&model)?)?;
            println!("router written to {}", out.display());
        }
        RouterCommand::Label(a) => crate::router_label::run(a).await?,
        RouterCommand::Read(a) => crate::router_read::run(a).await?,
        RouterCommand::Eval(a) => {
            let e = load_embedder(EMBEDDER).await?;
            let path = a.router.unwrap_or_else(tandem_catalog::router_path);
            if !path.is_file() {
                bail!(
                    "no router at {} (train one first: tandem router train --data FILE)",
                    path.display()
                );
            }
            let encoder = LoadedRouter::encoder_of(&path).map_err(anyhow::Error::msg)?;
            let tokenizer = encoder_dir(&encoder).await?.join("tokenizer.json");
            let router =
                LoadedRouter::load(&path, &tokenizer, Some(&e)).map_err(anyhow::Error::msg)?;
            let (mut data, prompts) = tokio::task::block_in_place(|| examples(&e, &a.data))?;
            if let Some(path) = &a.readings {
                let (reader, layer, _) = attach_readings(path, &mut data)?;
                if let Some(p) = &router.scorer.model().probe
                    && (p.model != reader || p.layer != layer)
                {
                    let at =
                        |l: Option<u32>| l.map_or_else(String::new, |l| format!(" at block {l}"));
                    bail!(
                        "the router's probe reads {}'s readings{}; {} holds {reader}'s{}",
                        p.model,
                        at(p.layer),
                        path.display(),
                        at(layer)
                    );
                }
            }
            if let RouterInput::Static(t) = &router.input {
                embed_static(t, &mut data, &prompts)?;
            }
            let model = router.scorer.model();
            let (overall, per) = tokio::task::block_in_place(|| learned::evaluate(model, &data));
            let bands = bands(model, &data);
            if overall.prompts == 0 {
                bail!(
                    "the router was trained on every prompt of this file: nothing unseen to evaluate"
                );
            }
            let online = a.online.then(|| {
                let mut cfg = tandem_policy::memory::MemoryConfig::default();
                if let Some(s) = a.memory_similarity {
                    cfg.similarity = s;
                }
                if let Some(p) = a.memory_prior {
                    cfg.prior = p;
                }
                tokio::task::block_in_place(|| learned::evaluate_online(model, &data, &cfg))
            });
            if a.json {
                let mut v = serde_json::json!({"overall": overall, "per_source": per});
                if let Some((calibrated, held)) = bands.split_first() {
                    v["reading_band"] = serde_json::to_value(calibrated)?;
                    v["reading_band_held"] = serde_json::to_value(held)?;
                }
                if let Some((_, with)) = &online {
                    v["online_with_memory"] = serde_json::to_value(with)?;
                }
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "evaluation on {} prompts the router was not trained on:",
                    overall.prompts
                );
                print_metrics(&overall, &per);
                print_bands(&bands);
                if let Some((alone, with)) = &online {
                    println!(
                        "replayed in order as traffic, the memory learning from each outcome:"
                    );
                    print_metrics(alone, &[("+memory".to_owned(), with.clone())]);
                }
            }
        }
    }
    Ok(())
}
