//! The egress ledger: one JSON line for every request that left the device
//! (upstream, model, a hash of the exact bytes sent, which PII classes were
//! redacted, bytes, tokens, cost), each line chained to the one before by
//! an HMAC-SHA256 under a key that is kept apart from the ledger file
//! ([`LedgerKey`]). Editing, dropping, reordering or re-chaining lines
//! without the key breaks the chain, which [`verify`] reports; the last
//! entry's place and MAC (the [`Head`]) kept elsewhere also catches a
//! truncated tail.
//!
//! A request is recorded twice: an entry with outcome `sending` that is on
//! disk before its bytes leave ([`Ledger::record_durable`]), and one with
//! its outcome after. One process at a time writes a ledger (a file lock);
//! a line torn by a crash is cut off when the ledger is next opened, and
//! the repair is reported.
//!
//! Writes do not block a request (except the durable first entry, and a
//! full queue of [`QUEUE`] entries when the disk stalls): entries go to a
//! writer thread that appends them in order, flushing after each batch and
//! syncing to disk at least every [`SYNC_INTERVAL`].
//!
//! Not here: deciding what to record (that is the router's dispatcher).

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Upper bound on how long an entry waits before reaching the disk.
pub const SYNC_INTERVAL: Duration = Duration::from_millis(50);

/// Records that may wait for the writer thread.
pub const QUEUE: usize = 16_384;

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
    /// The key cannot be had.
    #[error("ledger key {path}: {reason}")]
    Key {
        /// The key file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Another process is writing the ledger.
    #[error(
        "ledger {path} is being written by another process (it is locked): stop that process (a `tandem serve` on the same $TANDEM_HOME?) or give this one its own ledger ([ledger] path, or TANDEM_LEDGER__PATH)"
    )]
    Locked {
        /// The ledger file.
        path: String,
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
    /// Which key chains it ([`LedgerKey::id`]); empty in ledgers written
    /// before entries were keyed.
    #[serde(default)]
    pub key_id: String,
    /// `hash` of the previous line (zeros for the first).
    pub prev: String,
    /// HMAC-SHA256, under the ledger key, over `prev` and this line
    /// without `hash`.
    pub hash: String,
}

#[derive(Serialize)]
struct Unhashed<'a> {
    seq: u64,
    time_ms: u64,
    #[serde(flatten)]
    egress: &'a Egress,
    key_id: &'a str,
    prev: &'a str,
}

fn chain_hash(key: &LedgerKey, seq: u64, time_ms: u64, egress: &Egress, prev: &str) -> String {
    let body = serde_json::to_vec(&Unhashed {
        seq,
        time_ms,
        egress,
        key_id: &key.id,
        prev,
    })
    .unwrap_or_default();
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(prev.as_bytes());
    mac.update(b"\n");
    mac.update(&body);
    hex::encode(mac.finalize().into_bytes())
}

/// The secret that chains a ledger. Keep its file apart from the ledger's
/// (another directory, another owner, another machine for auditors): whoever
/// holds both can rewrite history; whoever holds only the ledger cannot.
#[derive(Clone)]
pub struct LedgerKey {
    secret: [u8; 32],
    id: String,
}

impl std::fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerKey").field("id", &self.id).finish()
    }
}

impl LedgerKey {
    /// A key from 32 secret bytes.
    pub fn from_secret(secret: [u8; 32]) -> LedgerKey {
        let mut h = Sha256::new();
        h.update(b"tandem ledger key id\n");
        h.update(secret);
        let id = hex::encode(&h.finalize()[..8]);
        LedgerKey { secret, id }
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<LedgerKey, String> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| format!("no random source: {e}"))?;
        Ok(Self::from_secret(secret))
    }

    /// Names the key without revealing it (the first 8 bytes of a hash).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the key in `path` (64 hex digits).
    pub fn load(path: &Path) -> Result<LedgerKey, LedgerError> {
        let bad = |reason: String| LedgerError::Key {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let bytes = hex::decode(text.trim()).map_err(|e| bad(format!("not hex: {e}")))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|_| bad("expected 32 bytes (64 hex digits)".into()))?;
        Ok(Self::from_secret(secret))
    }

    /// Reads the key in `path`, or makes one there (readable by its owner
    /// only) if there is none.
    pub fn load_or_create(path: &Path) -> Result<LedgerKey, LedgerError> {
        if path.exists() {
            return Self::load(path);
        }
        let bad = |reason: String| LedgerError::Key {
            path: path.display().to_string(),
            reason,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        }
        let key = Self::generate().map_err(bad)?;
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        match options.open(path) {
            Ok(mut f) => {
                writeln!(f, "{}", hex::encode(key.secret))
                    .and_then(|()| f.sync_all())
                    .map_err(|e| bad(e.to_string()))?;
                Ok(key)
            }
            // Another process made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(bad(e.to_string())),
        }
    }
}

/// A ledger's last entry, by place and MAC: printed by `tandem ledger head`
/// to keep elsewhere, so that [`verify`] can tell a truncated ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The entry's `seq`.
    pub seq: u64,
    /// Its `hash`.
    pub hash: String,
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Head {
    type Err = String;
    fn from_str(s: &str) -> Result<Head, String> {
        let (seq, hash) = s
            .trim()
            .split_once(':')
            .ok_or("a head is `seq:hash`, as `tandem ledger head` prints it")?;
        let seq = seq
            .parse()
            .map_err(|_| format!("`{seq}` is not an entry number"))?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the hash of a head is 64 hex digits".into());
        }
        Ok(Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
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
    /// An entry, and whom to tell once it is on disk (a durable record: it
    /// is one message, so that the writer knows at once not to wait for
    /// more entries before syncing).
    Record(Box<Egress>, Option<mpsc::Sender<()>>),
    Flush(mpsc::Sender<()>),
}

/// A handle to an open ledger. Cheap to clone; the writer thread stops when
/// the last handle is dropped, after writing everything sent to it.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::SyncSender<Msg>,
    path: PathBuf,
    repairs: std::sync::Arc<Vec<String>>,
    key: LedgerKey,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

/// The end of a ledger file: its last complete line, and where bytes after
/// the last newline (a torn write) start, if there are any.
struct Tail {
    last: Option<String>,
    torn: Option<(u64, Vec<u8>)>,
}

/// How much of the end is read: entries are far shorter.
const TAIL_WINDOW: u64 = 1 << 20;

fn read_tail(file: &mut File) -> std::io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    let from = len.saturating_sub(TAIL_WINDOW);
    file.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf)?;
    let (complete, torn) = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => {
            let rest = buf.get(i + 1..).unwrap_or_default();
            let torn = (!rest.is_empty()).then(|| (from + i as u64 + 1, rest.to_vec()));
            (buf.get(..i).unwrap_or_default(), torn)
        }
        None if from == 0 => (&[][..], (!buf.is_empty()).then(|| (0, buf.clone()))),
        // One line longer than the window: not an entry; the caller finds
        // the last "line" unreadable and starts a new ledger.
        None => (&buf[..], None),
    };
    let last = complete
        .rsplit(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .filter(|l| !l.trim().is_empty());
    Ok(Tail { last, torn })
}

/// Waits up to two seconds for the lock: a ledger handed over between two
/// runs of one process (or a writer thread still finishing) is let go
/// within that time; a live second server is not.
fn lock(file: &File, path: &Path) -> Result<(), LedgerError> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::Locked {
                    path: path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(path)(e)),
        }
    }
}

fn open_append(path: &Path) -> Result<File, LedgerError> {
    OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
        .map_err(io_err(path))
}

impl Ledger {
    /// Opens (or creates) the ledger at `path`, continuing its chain under
    /// `key`. A torn last line is cut off; a ledger chained by another key
    /// (or none) is moved aside and a new one started. Both are logged and
    /// listed by [`repairs`](Self::repairs).
    pub fn open(path: impl Into<PathBuf>, key: LedgerKey) -> Result<Ledger, LedgerError> {
        let path = path.into();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err(&path))?;
        }
        let mut repairs = Vec::new();
        let mut file = open_append(&path)?;
        lock(&file, &path)?;
        let mut tail = read_tail(&mut file).map_err(io_err(&path))?;
        if let Some((from, bytes)) = tail.torn.take() {
            // A whole entry that lost only its newline is kept.
            let whole = std::str::from_utf8(&bytes)
                .ok()
                .and_then(|t| serde_json::from_str::<Entry>(t).ok())
                .filter(|e| e.key_id == key.id);
            if whole.is_some() {
                file.write_all(b"\n").map_err(io_err(&path))?;
                tail.last = Some(String::from_utf8_lossy(&bytes).into_owned());
                repairs.push("ended the last entry's line, which a crash left open".into());
            } else {
                file.set_len(from).map_err(io_err(&path))?;
                repairs.push(format!(
                    "cut off a torn last line ({} bytes) left by an interrupted write",
                    bytes.len()
                ));
            }
            file.sync_all().map_err(io_err(&path))?;
        }
        let (mut seq, mut prev) = (0u64, GENESIS.to_owned());
        if let Some(line) = tail.last {
            match serde_json::from_str::<Entry>(&line) {
                Ok(e) if e.key_id == key.id => {
                    seq = e.seq + 1;
                    prev = e.hash;
                }
                found => {
                    let why = match found {
                        Ok(e) if e.key_id.is_empty() => "was written without a key".to_owned(),
                        Ok(e) => format!("is chained by another key ({})", e.key_id),
                        Err(e) => format!("ends with a line that is not an entry ({e})"),
                    };
                    let stamp = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let mut aside = path.clone().into_os_string();
                    aside.push(format!(".{stamp}.retired"));
                    let aside = PathBuf::from(aside);
                    drop(file);
                    std::fs::rename(&path, &aside).map_err(io_err(&path))?;
                    file = open_append(&path)?;
                    lock(&file, &path)?;
                    repairs.push(format!(
                        "the ledger {why}: moved to {} and a new chain started",
                        aside.display()
                    ));
                }
            }
        }
        for r in &repairs {
            tracing::warn!("ledger {}: {r}", path.display());
        }
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let thread_path = path.clone();
        let writer_key = key.clone();
        std::thread::Builder::new()
            .name("tandem-ledger".into())
            .spawn(move || writer(file, thread_path, writer_key, rx, seq, prev))
            .map_err(io_err(&path))?;
        Ok(Ledger {
            tx,
            path,
            repairs: std::sync::Arc::new(repairs),
            key,
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the chain as written so far (after writing out what is
    /// queued) and returns, with the outcome, the last `tail` entries.
    /// Reads the whole file: blocking, call it off async workers.
    pub fn check(&self, tail: usize) -> (Result<Verified, LedgerError>, Vec<Entry>) {
        self.flush();
        match read(&self.path) {
            Ok(mut entries) => {
                let verified = verify_entries(&entries, &self.key, None);
                let keep = entries.split_off(entries.len().saturating_sub(tail));
                (verified, keep)
            }
            Err(e) => (Err(e), Vec::new()),
        }
    }

    /// What [`open`](Self::open) had to repair.
    pub fn repairs(&self) -> &[String] {
        &self.repairs
    }

    /// Queues a record; blocks only when [`QUEUE`] records wait for a disk
    /// that has stopped keeping up (back-pressure rather than unbounded
    /// memory).
    pub fn record(&self, egress: Egress) {
        if self.tx.send(Msg::Record(Box::new(egress), None)).is_err() {
            tracing::error!("ledger writer has stopped; an egress record was lost");
        }
    }

    /// Records and waits until the entry is on disk (a file sync): for the
    /// entry that must exist before bytes leave. Blocks; call it off async
    /// workers.
    pub fn record_durable(&self, egress: Egress) -> Result<(), LedgerError> {
        let (tx, rx) = mpsc::channel();
        if self
            .tx
            .send(Msg::Record(Box::new(egress), Some(tx)))
            .is_ok()
            && rx.recv().is_ok()
        {
            Ok(())
        } else {
            Err(LedgerError::Io {
                path: self.path.display().to_string(),
                source: std::io::Error::other("the ledger writer has stopped"),
            })
        }
    }

    /// Waits until everything recorded so far is on disk; `false` if the
    /// writer has stopped.
    pub fn flush(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        self.tx.send(Msg::Flush(tx)).is_ok() && rx.recv().is_ok()
    }
}

fn writer(
    file: File,
    path: PathBuf,
    key: LedgerKey,
    rx: mpsc::Receiver<Msg>,
    mut seq: u64,
    mut prev: String,
) {
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
        // sync serve many. An entry that a request waits for (durable) or a
        // flush ends the wait at once: the sync then serves what came so far.
        let urgent = |m: &Msg| matches!(m, Msg::Flush(_) | Msg::Record(_, Some(_)));
        let mut batch: Vec<Msg> = first.into_iter().collect();
        if !batch.iter().any(urgent) {
            let deadline = Instant::now() + GATHER;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match rx.recv_timeout(left) {
                    Ok(m) => {
                        let stop = urgent(&m);
                        batch.push(m);
                        if stop {
                            break;
                        }
                    }
                    // Timed out, or every sender is gone (seen next round).
                    Err(_) => break,
                }
            }
        }
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        for m in batch {
            match m {
                Msg::Record(egress, ack) => {
                    waiting.extend(ack);
                    let time_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let hash = chain_hash(&key, seq, time_ms, &egress, &prev);
                    let entry = Entry {
                        seq,
                        time_ms,
                        egress: *egress,
                        key_id: key.id.clone(),
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

/// Reads every entry of a ledger file (without checking the chain: see
/// [`verify`]). A missing file has none.
pub fn read(path: &Path) -> Result<Vec<Entry>, LedgerError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(path)(e)),
    };
    parse(BufReader::new(f)).map_err(|e| match e {
        ParseError::Io(source) => LedgerError::Io {
            path: path.display().to_string(),
            source,
        },
        ParseError::Line(line, reason) => LedgerError::Broken { line, reason },
    })
}

enum ParseError {
    Io(std::io::Error),
    Line(usize, String),
}

/// Entries from any bytes: a line that is not an entry (or not UTF-8) is
/// an error naming it, never a panic.
fn parse(input: impl BufRead) -> Result<Vec<Entry>, ParseError> {
    let mut entries = Vec::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(ParseError::Io)?;
        let text = std::str::from_utf8(&line)
            .map_err(|e| ParseError::Line(i + 1, format!("not UTF-8: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let entry = serde_json::from_str(text)
            .map_err(|e| ParseError::Line(i + 1, format!("not a ledger entry: {e}")))?;
        entries.push(entry);
    }
    Ok(entries)
}

/// Entries read from bytes, as [`read`] reads a file (for tools and fuzzing).
pub fn parse_bytes(bytes: &[u8]) -> Result<Vec<Entry>, LedgerError> {
    parse(bytes).map_err(|e| match e {
        ParseError::Io(source) => LedgerError::Io {
            path: "<bytes>".into(),
            source,
        },
        ParseError::Line(line, reason) => LedgerError::Broken { line, reason },
    })
}

/// The outcome of checking a ledger's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Entries checked.
    pub entries: usize,
    /// The last entry (`None` for an empty ledger); keep it elsewhere to
    /// detect truncation later.
    pub head: Option<Head>,
    /// Requests with a `sending` entry and no outcome after it: the process
    /// stopped while they were out (or they are out now).
    pub unfinished: usize,
}

/// Checks that every entry carries a MAC under `key` and chains to the one
/// before, and — given a `kept` head from earlier — that the ledger still
/// holds that entry unchanged (not truncated, not rewritten).
pub fn verify(path: &Path, key: &LedgerKey, kept: Option<&Head>) -> Result<Verified, LedgerError> {
    verify_entries(&read(path)?, key, kept)
}

/// [`verify`] over entries already read.
pub fn verify_entries(
    entries: &[Entry],
    key: &LedgerKey,
    kept: Option<&Head>,
) -> Result<Verified, LedgerError> {
    let mut prev = GENESIS.to_owned();
    let mut open: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        let line = i + 1;
        let broken = |reason: String| LedgerError::Broken { line, reason };
        if e.seq != i as u64 {
            return Err(broken(format!(
                "sequence number {} where {i} was expected (a line was removed, or the ledger forked)",
                e.seq
            )));
        }
        if e.key_id != key.id {
            return Err(broken(if e.key_id.is_empty() {
                "the entry carries no key: it cannot be told from a forgery".into()
            } else {
                format!(
                    "the entry is chained by key {}, not by this key ({})",
                    e.key_id, key.id
                )
            }));
        }
        if e.prev != prev {
            return Err(broken(
                "does not chain to the line before (a line was removed, reordered or edited)"
                    .into(),
            ));
        }
        if chain_hash(key, e.seq, e.time_ms, &e.egress, &e.prev) != e.hash {
            return Err(broken(
                "its contents do not match its MAC (the line was edited or forged)".into(),
            ));
        }
        let slot = (e.egress.request_id.as_str(), e.egress.upstream.as_str());
        if e.egress.outcome == SENDING {
            *open.entry(slot).or_default() += 1;
        } else if let Some(n) = open.get_mut(&slot) {
            *n = n.saturating_sub(1);
        }
        prev = e.hash.clone();
    }
    if let Some(k) = kept {
        let found = usize::try_from(k.seq).ok().and_then(|i| entries.get(i));
        match found {
            None => {
                return Err(LedgerError::Broken {
                    line: entries.len() + 1,
                    reason: format!(
                        "the ledger was truncated: the head kept earlier (entry {}) is missing; it now ends at entry {}",
                        k.seq,
                        entries.len().saturating_sub(1)
                    ),
                });
            }
            Some(e) if e.hash != k.hash => {
                return Err(LedgerError::Broken {
                    line: e.seq as usize + 1,
                    reason:
                        "this entry differs from the head kept earlier (the ledger was rewritten)"
                            .into(),
                });
            }
            Some(_) => {}
        }
    }
    Ok(Verified {
        entries: entries.len(),
        head: entries.last().map(|e| Head {
            seq: e.seq,
            hash: e.hash.clone(),
        }),
        unfinished: open.values().sum(),
    })
}

/// The outcome of the entry written before a request's bytes leave.
pub const SENDING: &str = "sending";

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

    fn key() -> LedgerKey {
        LedgerKey::from_secret([7; 32])
    }

    fn written(n: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let l = Ledger::open(&path, key()).unwrap();
        for i in 0..n {
            l.record(egress(i));
        }
        assert!(l.flush());
        (dir, path)
    }

    /// What someone without the key can do: rewrite the lines they want
    /// and chain them again, copying the key's id.
    fn rechain(entries: &mut [Entry], forger: &LedgerKey) {
        let mut prev = GENESIS.to_owned();
        for (i, e) in entries.iter_mut().enumerate() {
            e.seq = i as u64;
            e.prev = prev.clone();
            let mut k = forger.clone();
            k.id = e.key_id.clone();
            e.hash = chain_hash(&k, e.seq, e.time_ms, &e.egress, &e.prev);
            prev = e.hash.clone();
        }
    }

    fn write_entries(path: &Path, entries: &[Entry]) {
        let text: String = entries
            .iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn chain_survives_reopen_and_verifies() {
        let (_dir, path) = written(3);
        let l = Ledger::open(&path, key()).unwrap();
        assert!(l.repairs().is_empty());
        l.record(egress(3));
        l.flush();
        let v = verify(&path, &key(), None).unwrap();
        assert_eq!(v.entries, 4);
        let entries = read(&path).unwrap();
        assert_eq!(entries[3].seq, 3);
        assert_eq!(entries[3].prev, entries[2].hash);
        assert_eq!(entries[3].key_id, key().id());
        assert_eq!(v.head.unwrap().hash, entries[3].hash);
    }

    #[test]
    fn tampering_is_detected() {
        let (_dir, path) = written(4);
        let original = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = original.lines().collect();

        let edited = original.replacen("\"bytes_out\":101", "\"bytes_out\":1", 1);
        std::fs::write(&path, &edited).unwrap();
        let e = verify(&path, &key(), None).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("edited"), "{e}");

        let dropped = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        std::fs::write(&path, dropped).unwrap();
        assert!(
            verify(&path, &key(), None)
                .unwrap_err()
                .to_string()
                .contains("line 2")
        );

        std::fs::write(&path, &original).unwrap();
        assert_eq!(verify(&path, &key(), None).unwrap().entries, 4);
        // The wrong key cannot vouch for it either.
        let other = LedgerKey::from_secret([8; 32]);
        assert!(verify(&path, &other, None).is_err());
    }

    #[test]
    fn a_rewrite_rechained_without_the_key_fails() {
        let (_dir, path) = written(60);
        let mut entries = read(&path).unwrap();
        // One line deleted, one edited, the last 50 dropped, chained again
        // as the old ledger was (and with a guessed key).
        entries.remove(3);
        entries[5].egress.bytes_out = 1;
        entries.truncate(entries.len() - 50);
        for forger in [
            LedgerKey::from_secret([0; 32]),
            LedgerKey::generate().unwrap(),
        ] {
            let mut forged = entries.clone();
            rechain(&mut forged, &forger);
            write_entries(&path, &forged);
            let e = verify(&path, &key(), None).unwrap_err().to_string();
            assert!(e.contains("line 1") && e.contains("MAC"), "{e}");
        }
    }

    #[test]
    fn truncation_is_caught_by_a_kept_head() {
        let (_dir, path) = written(10);
        let head = verify(&path, &key(), None).unwrap().head.unwrap();
        let printed: Head = head.to_string().parse().unwrap();
        assert_eq!(printed, head);
        let text = std::fs::read_to_string(&path).unwrap();
        let kept: String = text.lines().take(7).map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, kept).unwrap();
        // Alone, a clean cut at a line boundary still chains...
        assert_eq!(verify(&path, &key(), None).unwrap().entries, 7);
        // ...but not against the head kept before.
        let e = verify(&path, &key(), Some(&head)).unwrap_err().to_string();
        assert!(e.contains("truncated") && e.contains("entry 9"), "{e}");
        // A head from another ledger (a fork) does not match either. Its
        // entries differ: the same entries stamped in the same millisecond
        // (a quick machine writes both ledgers within one) are the same chain.
        let d2 = tempfile::tempdir().unwrap();
        let other = d2.path().join("ledger.jsonl");
        let l = Ledger::open(&other, key()).unwrap();
        for i in 0..7 {
            l.record(egress(100 + i));
        }
        assert!(l.flush());
        drop(l);
        let theirs = verify(&other, &key(), None).unwrap().head.unwrap();
        let mut forked = theirs.clone();
        forked.hash = "ab".repeat(32);
        assert!(verify(&path, &key(), Some(&forked)).is_err());
        assert!(
            verify(&path, &key(), Some(&theirs)).is_err(),
            "a different chain"
        );
    }

    #[test]
    fn a_torn_tail_is_repaired_and_reported() {
        let (_dir, path) = written(3);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":3,"time_ms":17"#).unwrap();
        drop(f);
        assert!(verify(&path, &key(), None).is_err(), "torn before repair");
        let l = Ledger::open(&path, key()).unwrap();
        assert_eq!(l.repairs().len(), 1);
        assert!(l.repairs()[0].contains("torn"), "{:?}", l.repairs());
        l.record(egress(3));
        l.flush();
        drop(l);
        assert_eq!(verify(&path, &key(), None).unwrap().entries, 4);

        // A whole entry that only lost its newline is kept.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.trim_end()).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let l = Ledger::open(&path, key()).unwrap();
        assert!(l.repairs()[0].contains("ended"), "{:?}", l.repairs());
        l.record(egress(4));
        l.flush();
        assert_eq!(verify(&path, &key(), None).unwrap().entries, 5);
    }

    #[test]
    fn one_writer_at_a_time() {
        let (_dir, path) = written(1);
        let first = Ledger::open(&path, key()).unwrap();
        let second = Ledger::open(&path, key());
        assert!(
            matches!(second, Err(LedgerError::Locked { .. })),
            "{second:?}"
        );
        drop(first);
        // The writer thread lets go once its last handle is gone.
        let again = Ledger::open(&path, key()).unwrap();
        again.record(egress(1));
        again.flush();
        assert_eq!(verify(&path, &key(), None).unwrap().entries, 2);
    }

    #[test]
    fn a_ledger_of_another_key_is_set_aside() {
        let (dir, path) = written(2);
        let other = LedgerKey::from_secret([9; 32]);
        let l = Ledger::open(&path, other.clone()).unwrap();
        assert!(l.repairs()[0].contains("another key"), "{:?}", l.repairs());
        l.record(egress(0));
        l.flush();
        assert_eq!(verify(&path, &other, None).unwrap().entries, 1);
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".retired"))
            .collect();
        assert_eq!(aside.len(), 1);
        assert_eq!(verify(&aside[0].path(), &key(), None).unwrap().entries, 2);
    }

    #[test]
    fn sending_entries_without_an_outcome_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.jsonl");
        let l = Ledger::open(&path, key()).unwrap();
        let sending = |i| Egress {
            outcome: SENDING.into(),
            ..egress(i)
        };
        l.record_durable(sending(0)).unwrap();
        l.record(egress(0));
        l.record_durable(sending(1)).unwrap();
        // Durable: on disk before the call returned.
        assert_eq!(read(&path).unwrap().len(), 3);
        assert_eq!(verify(&path, &key(), None).unwrap().unfinished, 1);
    }

    #[test]
    fn keys_are_made_once_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/ledger.key");
        let made = LedgerKey::load_or_create(&path).unwrap();
        let again = LedgerKey::load_or_create(&path).unwrap();
        assert_eq!(made.id(), again.id());
        assert_eq!(made.secret, again.secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "not hex").unwrap();
        assert!(matches!(
            LedgerKey::load(&path),
            Err(LedgerError::Key { .. })
        ));
        assert!(!format!("{made:?}").contains(&hex::encode(made.secret)));
    }
}
