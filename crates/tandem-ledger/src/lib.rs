//! The egress ledger: one JSON line for every request that left the device
//! (upstream, model, a hash of the exact bytes sent, which PII classes were
//! redacted, bytes, tokens, cost), each line chained to the one before by
//! sha256. Editing, dropping or reordering a line breaks the chain, which
//! [`verify`] reports; the hash of the last line (the head) can be kept
//! elsewhere to also detect a truncated tail.
//!
//! Writes never block a request: entries go to a writer thread that appends
//! them in order, flushing after each batch and syncing to disk at least
//! every [`SYNC_INTERVAL`].
//!
//! Not here: deciding what to record (that is the router's dispatcher).

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Upper bound on how long an entry waits before reaching the disk.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// After an entry arrives, the writer waits this long for more, so that at
/// high request rates one write serves many entries.
const GATHER: Duration = Duration::from_millis(5);

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A file operation failed.
    #[error("ledger {path}: {source}")]
    Io {
        /// The ledger file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An entry does not belong where it is.
    #[error("ledger line {line}: {reason}")]
    Broken {
        /// The line, from 1.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// What a caller records about one request that left the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Egress {
    /// The request it served.
    pub request_id: String,
    /// The gateway key the request came with, by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The upstream's configured name.
    pub upstream: String,
    /// The model asked of it.
    pub model: String,
    /// sha256 of the request body as sent (after redaction).
    pub payload_sha256: String,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// PII classes that were replaced by placeholders, with counts.
    #[serde(default)]
    pub redacted: BTreeMap<String, u32>,
    /// Attempts made.
    pub attempts: u32,
    /// `ok`, `error: ...`, `handoff: ...`.
    pub outcome: String,
    /// Prompt tokens billed.
    pub prompt_tokens: u32,
    /// Completion tokens billed.
    pub completion_tokens: u32,
    /// What it cost, USD.
    pub cost_usd: f64,
}

/// A line of the ledger: the record plus its place in the chain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the chain, from 0.
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// What left.
    #[serde(flatten)]
    pub egress: Egress,
    /// `hash` of the previous line (zeros for the first).
    pub prev: String,
    /// sha256 over `prev` and this line without `hash`.
    pub hash: String,
}

#[derive(Serialize)]
struct Unhashed<'a> {
    seq: u64,
    time_ms: u64,
    #[serde(flatten)]
    egress: &'a Egress,
    prev: &'a str,
}

fn chain_hash(seq: u64, time_ms: u64, egress: &Egress, prev: &str) -> String {
    let body = serde_json::to_vec(&Unhashed {
        seq,
        time_ms,
        egress,
        prev,
    })
    .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(&body);
    hex::encode(h.finalize())
}

/// Hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LedgerError + '_ {
    move |source| LedgerError::Io {
        path: path.display().to_string(),
        source,
    }
}

enum Msg {
    Record(Box<Egress>),
    Flush(mpsc::Sender<()>),
}

/// A handle to an open ledger. Cheap to clone; the writer thread stops when
/// the last handle is dropped, after writing everything sent to it.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Msg>,
    path: PathBuf,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

/// The last complete line of a file, read from its end.
fn last_line(file: &mut File) -> std::io::Result<Option<String>> {
    let len = file.seek(SeekFrom::End(0))?;
    let mut pos = len;
    let mut tail = Vec::new();
    while pos > 0 {
        let step = pos.min(4096);
        pos -= step;
        file.seek(SeekFrom::Start(pos))?;
        let mut buf = vec![0u8; step as usize];
        file.read_exact(&mut buf)?;
        buf.extend_from_slice(&tail);
        tail = buf;
        let trimmed = tail.strip_suffix(b"\n").unwrap_or(&tail);
        if let Some(i) = trimmed.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(
                String::from_utf8_lossy(&trimmed[i + 1..]).into_owned(),
            ));
        }
    }
    let trimmed = tail.strip_suffix(b"\n").unwrap_or(&tail);
    Ok((!trimmed.is_empty()).then(|| String::from_utf8_lossy(trimmed).into_owned()))
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, continuing its chain.
    pub fn open(path: impl Into<PathBuf>) -> Result<Ledger, LedgerError> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(&path))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let (mut seq, mut prev) = (0u64, GENESIS.to_owned());
        if let Some(line) = last_line(&mut file).map_err(io_err(&path))? {
            let e: Entry = serde_json::from_str(&line).map_err(|e| LedgerError::Broken {
                line: 0,
                reason: format!("last line is not a ledger entry: {e}"),
            })?;
            seq = e.seq + 1;
            prev = e.hash;
        }
        let (tx, rx) = mpsc::channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("tandem-ledger".into())
            .spawn(move || writer(file, thread_path, rx, seq, prev))
            .map_err(io_err(&path))?;
        Ok(Ledger { tx, path })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; never blocks.
    pub fn record(&self, egress: Egress) {
        if self.tx.send(Msg::Record(Box::new(egress))).is_err() {
            tracing::error!("ledger writer has stopped; an egress record was lost");
        }
    }

    /// Waits until everything recorded so far is on disk.
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn writer(file: File, path: PathBuf, rx: mpsc::Receiver<Msg>, mut seq: u64, mut prev: String) {
    let mut out = std::io::BufWriter::new(file);
    let mut last_sync = Instant::now();
    let mut dirty = false;
    let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
    loop {
        let first = if dirty {
            match rx.recv_timeout(SYNC_INTERVAL.saturating_sub(last_sync.elapsed())) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    sync(&mut out, &path);
                    return;
                }
            }
        } else {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            }
        };
        // Let more entries arrive, then take them all: one write and one
        // sync serve many. Sleeping (rather than waiting on the channel)
        // matters: senders wake a parked receiver with a system call each.
        let mut batch: Vec<Msg> = first.into_iter().collect();
        if !batch.iter().any(|m| matches!(m, Msg::Flush(_))) {
            std::thread::sleep(GATHER);
        }
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        for m in batch {
            match m {
                Msg::Record(egress) => {
                    let time_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let hash = chain_hash(seq, time_ms, &egress, &prev);
                    let entry = Entry {
                        seq,
                        time_ms,
                        egress: *egress,
                        prev: std::mem::take(&mut prev),
                        hash,
                    };
                    match serde_json::to_string(&entry) {
                        Ok(line) => {
                            if let Err(e) = writeln!(out, "{line}") {
                                tracing::error!("ledger {}: {e}", path.display());
                            }
                        }
                        Err(e) => tracing::error!("ledger entry not encodable: {e}"),
                    }
                    prev = entry.hash;
                    seq += 1;
                    dirty = true;
                }
                Msg::Flush(done) => waiting.push(done),
            }
        }
        if let Err(e) = out.flush() {
            tracing::error!("ledger {}: {e}", path.display());
        }
        if !waiting.is_empty() || last_sync.elapsed() >= SYNC_INTERVAL {
            sync(&mut out, &path);
            last_sync = Instant::now();
            dirty = false;
            for w in waiting.drain(..) {
                let _ = w.send(());
            }
        }
    }
}

fn sync(out: &mut std::io::BufWriter<File>, path: &Path) {
    let _ = out.flush();
    if let Err(e) = out.get_ref().sync_data() {
        tracing::error!("ledger {}: {e}", path.display());
    }
}

/// Reads every entry of a ledger file.
pub fn read(path: &Path) -> Result<Vec<Entry>, LedgerError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mut entries = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(io_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        entries.push(
            serde_json::from_str(&line).map_err(|e| LedgerError::Broken {
                line: i + 1,
                reason: format!("not a ledger entry: {e}"),
            })?,
        );
    }
    Ok(entries)
}

/// The outcome of checking a ledger's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries checked.
    pub entries: usize,
    /// Hash of the last entry; keep it elsewhere to detect truncation later.
    pub head: String,
}

/// Checks that every line hashes correctly and chains to the one before.
pub fn verify(path: &Path) -> Result<Verified, LedgerError> {
    let entries = read(path)?;
    let mut prev = GENESIS.to_owned();
    for (i, e) in entries.iter().enumerate() {
        let line = i + 1;
        if e.seq != i as u64 {
            return Err(LedgerError::Broken {
                line,
                reason: format!("sequence number {} where {i} was expected", e.seq),
            });
        }
        if e.prev != prev {
            return Err(LedgerError::Broken {
                line,
                reason:
                    "does not chain to the line before (a line was removed, reordered or edited)"
                        .into(),
            });
        }
        if chain_hash(e.seq, e.time_ms, &e.egress, &e.prev) != e.hash {
            return Err(LedgerError::Broken {
                line,
                reason: "its contents do not match its hash (the line was edited)".into(),
            });
        }
        prev = e.hash.clone();
    }
    Ok(Verified {
        entries: entries.len(),
        head: prev,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(i: u32) -> Egress {
        Egress {
            request_id: format!("r{i}"),
            upstream: "cloud".into(),
            model: "m".into(),
            payload_sha256: sha256_hex(format!("body {i}").as_bytes()),
            bytes_out: 100 + u64::from(i),
            bytes_in: 50,
            redacted: [("email".to_string(), 1)].into_iter().collect(),
            attempts: 1,
            outcome: "ok".into(),
            prompt_tokens: 10,
            completion_tokens: 5,
            cost_usd: 0.000_123,
            key: None,
        }
    }

    #[test]
    fn chain_survives_reopen_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let l = Ledger::open(&path).unwrap();
        for i in 0..3 {
            l.record(egress(i));
        }
        l.flush();
        drop(l);
        let l = Ledger::open(&path).unwrap();
        l.record(egress(3));
        l.flush();
        let v = verify(&path).unwrap();
        assert_eq!(v.entries, 4);
        let entries = read(&path).unwrap();
        assert_eq!(entries[3].seq, 3);
        assert_eq!(entries[3].prev, entries[2].hash);
        assert_eq!(v.head, entries[3].hash);
    }

    #[test]
    fn tampering_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let l = Ledger::open(&path).unwrap();
        for i in 0..4 {
            l.record(egress(i));
        }
        l.flush();
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let edited = original.replacen("\"bytes_out\":101", "\"bytes_out\":1", 1);
        std::fs::write(&path, &edited).unwrap();
        let e = verify(&path).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("edited"), "{e}");

        let dropped = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        std::fs::write(&path, dropped).unwrap();
        assert!(verify(&path).unwrap_err().to_string().contains("line 2"));

        std::fs::write(&path, original).unwrap();
        assert_eq!(verify(&path).unwrap().entries, 4);
    }
}
