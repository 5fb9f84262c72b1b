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
    /// Threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// One line of a readings file.
#[derive(Serialize, Deserialize)]
pub struct ReadingLine {
    /// The prompt's id in the data file.
    pub id: String,
    /// Catalog name of the model that read it.
    pub model: String,
    /// [`tandem_engine::reading::read`]'s output.
    pub reading: Vec<f32>,
}

#[derive(Deserialize)]
struct Prompt {
    id: String,
    prompt: String,
}

/// Where `read` writes for `data` unless told.
pub fn default_out(data: &Path) -> PathBuf {
    let stem = data
        .file_stem()
        .map_or_else(|| "prompts".into(), |s| s.to_string_lossy().into_owned());
    data.with_file_name(format!("{stem}.readings.jsonl"))
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

pub async fn run(a: ReadArgs) -> anyhow::Result<()> {
    let (_, device) = a.device.load()?;
    let resolved = tandem_catalog::resolve(&device).await?;
    let out = a.out.clone().unwrap_or_else(|| default_out(&a.data));
    let done: HashSet<String> = if out.is_file() {
        let (model, lines) = load(&out)?;
        if !lines.is_empty() && model != resolved.id {
            bail!(
                "{} holds readings by {model}, not {}: write to another file (--out)",
                out.display(),
                resolved.id
            );
        }
        lines.into_iter().map(|l| l.id).collect()
    } else {
        HashSet::new()
    };
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
        if !done.contains(&p.id) {
            todo.push(p);
        }
    }
    if let Some(n) = a.limit {
        todo.truncate(n);
    }
    if todo.is_empty() {
        println!(
            "every prompt of {} is read in {}",
            a.data.display(),
            out.display()
        );
        return Ok(());
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    eprintln!(
        "reading {} prompts with {} on {threads} threads into {} ({} already read)",
        todo.len(),
        resolved.id,
        out.display(),
        done.len()
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .with_context(|| format!("opening {}", out.display()))?;
    // A torn last line (a run killed mid-write) stays a line of its own,
    // which loading skips.
    if ends_torn(&out)? {
        file.write_all(b"\n")?;
    }
    let mut w = std::io::BufWriter::new(file);
    let t0 = std::time::Instant::now();
    let total = todo.len();
    let mut n = 0usize;
    let mut failed: Option<anyhow::Error> = None;
    let model = resolved.id.clone();
    tokio::task::block_in_place(|| {
        tandem_engine::reading::read_all(
            &resolved.path,
            threads,
            todo.iter().map(|p| p.prompt.as_str()),
            |r| {
                let written = r.map_err(anyhow::Error::msg).and_then(|reading| {
                    let line = ReadingLine {
                        id: todo[n].id.clone(),
                        model: model.clone(),
                        reading,
                    };
                    writeln!(w, "{}", serde_json::to_string(&line)?)?;
                    // Whole lines reach the disk: an interrupted run loses
                    // at most the prompt being read.
                    w.flush()?;
                    Ok(())
                });
                if let Err(e) = written {
                    failed = Some(e.context(format!("prompt {}", todo[n].id)));
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
            },
        )
        .map_err(anyhow::Error::msg)
    })?;
    if let Some(e) = failed {
        return Err(e);
    }
    println!("{n} prompts read into {}", out.display());
    Ok(())
}
