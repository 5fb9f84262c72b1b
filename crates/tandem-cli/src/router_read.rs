//! `tandem router read`: the device model's reading of every prompt of a
//! file (`tandem_engine::reading`), for `tandem router train --readings`
//! to fit the router's probe on. Resumable: the output is appended to and
//! prompts already read are skipped.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::DeviceArgs;

/// `tandem router read`'s options.
#[derive(Args)]
pub struct ReadArgs {
    /// JSONL prompts with `id` and `prompt` (the format `train` reads).
    #[arg(long)]
    pub data: PathBuf,
    /// The readings file, appended to (default: the data file's name with
    /// `.readings.jsonl`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Read at most this many prompts in this run.
    #[arg(long)]
    pub limit: Option<usize>,
    /// What to read: the output of block N (0-based), or `last` for the
    /// last layer's (normalised) output. Default: the block a third of the
    /// way through the model (block 8 of qwen2.5-coder-0.5b's 24), whose
    /// probe ranks as well as the last layer's on the shared routing
    /// benchmark for a third of the pass. Repeat to read several blocks in
    /// one pass, each into its own file.
    #[arg(long)]
    pub layer: Vec<Layer>,
    /// Threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// A layer `tandem router read` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    /// The output of a block (0-based).
    Block(u32),
    /// The last layer's normalised output.
    Last,
}

impl std::str::FromStr for Layer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "last" {
            return Ok(Self::Last);
        }
        s.parse()
            .map(Self::Block)
            .map_err(|_| format!("{s:?} is neither a block number nor `last`"))
    }
}

/// One line of a readings file.
#[derive(Serialize, Deserialize)]
pub struct ReadingLine {
    /// The prompt's id in the data file.
    pub id: String,
    /// Catalog name of the model that read it.
    pub model: String,
    /// The block whose output was read (`tandem_engine::tap`); absent for
    /// the last layer's normalised output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    /// [`tandem_engine::reading::read`]'s output, or
    /// [`tandem_engine::tap::LayerReader::read`]'s at `layer`.
    pub reading: Vec<f32>,
}

#[derive(Deserialize)]
struct Prompt {
    id: String,
    prompt: String,
}

/// Where `read` writes the readings at `layer` for `data` unless told:
/// `NAME.readings.jsonl` for the last layer, `NAME.lBLOCK.readings.jsonl`
/// for a block.
pub fn default_out_at(data: &Path, layer: Option<u32>) -> PathBuf {
    let stem = data
        .file_stem()
        .map_or_else(|| "prompts".into(), |s| s.to_string_lossy().into_owned());
    let at = layer.map_or_else(String::new, |l| format!(".l{l}"));
    data.with_file_name(format!("{stem}{at}.readings.jsonl"))
}

/// Every reading in `path` (one model's: a file read by two is refused).
pub fn load(path: &Path) -> anyhow::Result<(String, Vec<ReadingLine>)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut model: Option<String> = None;
    let mut lines = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: ReadingLine = match serde_json::from_str(&line) {
            Ok(r) => r,
            // A run stopped mid-line leaves a torn last line; the next
            // run reads that prompt again.
            Err(_) => continue,
        };
        match &model {
            Some(m) if *m != r.model => bail!(
                "{} line {}: read by {}, the lines before by {m}: one file, one model",
                path.display(),
                i + 1,
                r.model
            ),
            Some(_) => {}
            None => model = Some(r.model.clone()),
        }
        if let Some(first) = lines.first().map(|l: &ReadingLine| l.layer)
            && first != r.layer
        {
            bail!(
                "{} line {}: read at {}, the lines before at {}: one file, one layer",
                path.display(),
                i + 1,
                describe(r.layer),
                describe(first)
            );
        }
        lines.push(r);
    }
    Ok((model.unwrap_or_default(), lines))
}

/// Whether the file's last byte is not a newline.
fn ends_torn(path: &Path) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

/// A readings file to write: where it is, which block it holds (`None`:
/// the last layer) and which prompts it already has.
struct Output {
    path: PathBuf,
    layer: Option<u32>,
    done: HashSet<String>,
}

pub async fn run(a: ReadArgs) -> anyhow::Result<()> {
    let (_, device) = a.device.load()?;
    let resolved = tandem_catalog::resolve(&device).await?;
    let mut asked = a.layer.clone();
    asked.sort_unstable();
    asked.dedup();
    if asked.is_empty() {
        let depth = tokio::task::block_in_place(|| tandem_engine::tap::depth(&resolved.path))
            .map_err(anyhow::Error::msg)?;
        asked.push(default_layer(depth));
    }
    if asked.len() > 1 && a.out.is_some() {
        bail!("--out names one file: with several --layer, each goes to its default file");
    }
    let layers: Vec<u32> = asked
        .iter()
        .filter_map(|l| match l {
            Layer::Block(b) => Some(*b),
            Layer::Last => None,
        })
        .collect();
    if asked.contains(&Layer::Last) && !layers.is_empty() {
        bail!("the last layer is read in a pass of its own: run --layer last on its own");
    }
    let targets: Vec<Option<u32>> = if layers.is_empty() {
        vec![None]
    } else {
        layers.iter().copied().map(Some).collect()
    };
    let mut outputs = Vec::new();
    for layer in targets {
        let path = a
            .out
            .clone()
            .unwrap_or_else(|| default_out_at(&a.data, layer));
        let done: HashSet<String> = if path.is_file() {
            let (model, lines) = load(&path)?;
            if !lines.is_empty() && model != resolved.id {
                bail!(
                    "{} holds readings by {model}, not {}: write to another file (--out)",
                    path.display(),
                    resolved.id
                );
            }
            if let Some(l) = lines.iter().find(|l| l.layer != layer) {
                bail!(
                    "{} holds readings at {}, not {}: write to another file (--out)",
                    path.display(),
                    describe(l.layer),
                    describe(layer)
                );
            }
            lines.into_iter().map(|l| l.id).collect()
        } else {
            HashSet::new()
        };
        outputs.push(Output { path, layer, done });
    }
    let file =
        std::fs::File::open(&a.data).with_context(|| format!("opening {}", a.data.display()))?;
    let mut todo = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let p: Prompt = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", a.data.display(), i + 1))?;
        if outputs.iter().any(|o| !o.done.contains(&p.id)) {
            todo.push(p);
        }
    }
    if let Some(n) = a.limit {
        todo.truncate(n);
    }
    let names = outputs
        .iter()
        .map(|o| o.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if todo.is_empty() {
        println!("every prompt of {} is read in {names}", a.data.display());
        return Ok(());
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "reading {} prompts with {} on {threads} threads into {names}",
        todo.len(),
        resolved.id,
    );
    let mut writers = Vec::new();
    for o in &outputs {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&o.path)
            .with_context(|| format!("opening {}", o.path.display()))?;
        // A torn last line (a run killed mid-write) stays a line of its own,
        // which loading skips.
        if ends_torn(&o.path)? {
            file.write_all(b"\n")?;
        }
        writers.push(std::io::BufWriter::new(file));
    }
    let t0 = std::time::Instant::now();
    let total = todo.len();
    let mut n = 0usize;
    let mut failed: Option<anyhow::Error> = None;
    let model = resolved.id.clone();
    // Takes the readings of the next prompt (one per output); `false` stops.
    let mut each = |r: Result<Vec<Vec<f32>>, String>| {
        let Some(p) = todo.get(n) else {
            return false;
        };
        let written = r.map_err(anyhow::Error::msg).and_then(|readings| {
            for ((o, w), reading) in outputs.iter().zip(&mut writers).zip(readings) {
                if o.done.contains(&p.id) {
                    continue;
                }
                let line = ReadingLine {
                    id: p.id.clone(),
                    model: model.clone(),
                    layer: o.layer,
                    reading,
                };
                writeln!(w, "{}", serde_json::to_string(&line)?)?;
                // Whole lines reach the disk: an interrupted run loses
                // at most the prompt being read.
                w.flush()?;
            }
            Ok(())
        });
        if let Err(e) = written {
            failed = Some(e.context(format!("prompt {}", p.id)));
            return false;
        }
        n += 1;
        if n.is_multiple_of(100) || n == total {
            eprintln!(
                "{n}/{total} read, {:.1} prompts/s",
                n as f64 / t0.elapsed().as_secs_f64()
            );
        }
        true
    };
    let texts = todo.iter().map(|p| p.prompt.as_str());
    tokio::task::block_in_place(|| {
        if layers.is_empty() {
            tandem_engine::reading::read_all(&resolved.path, threads, texts, |r| {
                each(r.map(|x| vec![x]))
            })
            .map_err(anyhow::Error::msg)
        } else {
            let mut reader = tandem_engine::tap::LayerReader::new(&resolved.path, &layers, threads)
                .map_err(anyhow::Error::msg)?;
            for text in texts {
                if !each(reader.read(text)) {
                    break;
                }
            }
            Ok(())
        }
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    println!("{n} prompts read into {names}");
    Ok(())
}

/// The block read unless told: a third of the way through a model of
/// `depth` blocks.
pub fn default_layer(depth: u32) -> Layer {
    Layer::Block(depth / 3)
}

/// "block L" or "the last layer".
fn describe(layer: Option<u32>) -> String {
    layer.map_or_else(|| "the last layer".into(), |l| format!("block {l}"))
}
