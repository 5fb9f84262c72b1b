//! Test support shared by Tandem's crates: real model files pulled through
//! the real catalog (once per machine; parallel test binaries wait on the
//! catalog's lock), Tandem servers on loopback ports, a capturing upstream
//! that records what leaves and injects faults ([`capture`]), scripted
//! backends for testing without a model ([`scripted`]), a real Redis
//! ([`redis`]), and real clients
//! (Python environments with the `openai` SDK and others).

#![warn(missing_docs)]

pub mod capture;
pub mod redis;
pub mod scripted;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_catalog::{Catalog, PullOptions};
use tandem_engine::{EngineConfig, LocalEngine};
use tandem_router::Dispatcher;
use tandem_server::{AppState, ServerConfig};

/// The default device model.
pub const SMOLLM2: &str = "smollm2-135m-instruct";
/// The cloud role's draft-compatible small model.
pub const QWEN_05B: &str = "qwen2.5-coder-0.5b-instruct";
/// The cloud role's model.
pub const QWEN_15B: &str = "qwen2.5-coder-1.5b-instruct";
/// A base model (completions only).
pub const GEMMA_270M: &str = "gemma-3-270m";
/// The embedder.
pub const MINILM: &str = "all-minilm-l6-v2";
/// The personal-data recognizer.
pub const RAMPART: &str = "rampart-pii";

/// How many cases a property test over a served Tandem runs:
/// `PROPTEST_CASES` when set (the long runs), else `default` (CI's short
/// form). Read here because a count in the test's config would override
/// the variable.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A two-thread runtime for synchronous tests (property tests) that drive
/// async code, made once per test binary so that servers and engines
/// started on it outlive each case.
pub fn shared_runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// The MiniLM sentence embedder, loaded once per test binary.
pub fn shared_embedder() -> Arc<tandem_embed::Embedder> {
    static E: std::sync::OnceLock<Arc<tandem_embed::Embedder>> = std::sync::OnceLock::new();
    E.get_or_init(|| {
        let main = model_path(MINILM);
        Arc::new(
            tandem_embed::Embedder::load(main.parent().expect("model folder")).expect("embedder"),
        )
    })
    .clone()
}

/// Path of a catalog model, pulling it into `$TANDEM_HOME` if needed.
/// Panics with the reason if it cannot be had: a test without its model
/// must fail, not pass vacuously.
pub fn model_path(name: &str) -> PathBuf {
    let name = name.to_owned();
    // A private runtime: callers may be sync tests or inside a runtime.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let catalog = Catalog::load(None).expect("catalog");
            catalog
                .pull(&name, &PullOptions::quiet())
                .await
                .unwrap_or_else(|e| panic!("cannot get test model {name}: {e}"))
        })
    })
    .join()
    .expect("pull thread")
}

/// The engine configuration `tandem serve` would use for a catalog model:
/// its file (pulled if needed), the catalog's sampling pin and default
/// system message.
pub fn engine_config(name: &str) -> EngineConfig {
    let mut cfg = EngineConfig::new(name, model_path(name));
    if let Some(entry) = Catalog::load(None)
        .ok()
        .and_then(|c| c.get(name).ok().cloned())
    {
        cfg.sampling = entry.sampling.unwrap_or_default();
        cfg.default_system = entry.system;
    }
    cfg
}

/// A model loaded once per test binary and shared by its tests, one per
/// (name, context, parallel): loading is the slow part of a test.
pub fn shared_engine(name: &str, context: u32, parallel: u32) -> LocalEngine {
    static ENGINES: Mutex<BTreeMap<(String, u32, u32), LocalEngine>> = Mutex::new(BTreeMap::new());
    let mut engines = ENGINES.lock().unwrap_or_else(|p| p.into_inner());
    engines
        .entry((name.to_owned(), context, parallel))
        .or_insert_with(|| {
            let mut cfg = engine_config(name);
            cfg.context = Some(context);
            cfg.parallel = parallel;
            LocalEngine::load(cfg).unwrap_or_else(|e| panic!("cannot load {name}: {e}"))
        })
        .clone()
}

/// The numbers of a JSON text, outside its strings, as written.
pub fn json_numbers(text: &str) -> Vec<String> {
    let (mut out, mut cur, mut in_str, mut esc) = (Vec::new(), String::new(), false, false);
    for c in text.chars() {
        if in_str {
            (esc, in_str) = (!esc && c == '\\', esc || c != '"');
        } else if c.is_ascii_digit() || "+-.eE".contains(c) && !cur.is_empty() || c == '-' {
            cur.push(c);
            continue;
        } else {
            in_str = c == '"';
        }
        if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    out.extend((!cur.is_empty()).then_some(cur));
    out
}

/// The numbers of a JSON text that a double does not hold exactly enough:
/// infinite once parsed, or with more than 15 digits in a part.
pub fn oversized_numbers(text: &str) -> Vec<String> {
    json_numbers(text)
        .into_iter()
        .filter(|n| {
            let parts = n.trim_start_matches('-').split(['.', 'e', 'E', '+', '-']);
            !n.parse::<f64>().is_ok_and(f64::is_finite) || parts.clone().any(|p| p.len() > 15)
        })
        .collect()
}

/// The text of a streamed chat completion: its SSE events' deltas, joined.
pub fn sse_text(raw: &str) -> String {
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| {
            let choice = &c["choices"][0];
            choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .map(str::to_owned)
        })
        .collect()
}

/// A running Tandem server on an ephemeral loopback port.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// Serves `dispatcher` with default limits.
    pub async fn start(dispatcher: Arc<Dispatcher>) -> TestServer {
        Self::start_with(dispatcher, ServerConfig::default()).await
    }

    /// Serves `dispatcher` with `config`.
    pub async fn start_with(dispatcher: Arc<Dispatcher>, config: ServerConfig) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = AppState::new(dispatcher, config);
        let task = tokio::spawn(async move {
            tandem_server::serve(listener, state, async {
                let _ = rx.await;
            })
            .await
            .expect("server");
        });
        TestServer {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The URL of `path` on it.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Stops it, letting open requests finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// A Python interpreter with `packages` installed, in a virtual environment
/// under `target/` (made once, reused by later runs and other binaries).
pub fn python_with(packages: &[&str]) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-python");
    tandem_catalog::python::venv(&root, packages)
        .unwrap_or_else(|e| panic!("cannot make a Python environment with {packages:?}: {e}"))
}

/// The Playwright driver the browser tests use (`playwright-core` only: it
/// drives the system's Chromium and downloads no browser of its own).
pub const PLAYWRIGHT: &str = "playwright-core@1.64.1";

/// A `node_modules` folder with `packages` (npm specs) installed, under
/// `target/` (made once, reused): the folder to put on `NODE_PATH`.
pub fn node_with(packages: &[&str]) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-node");
    node_modules_in(&root, packages).unwrap_or_else(|e| panic!("{e}"))
}

/// `packages` (npm specs) installed under `root` once (a lock keeps
/// concurrent callers to one install); the `node_modules` folder.
pub fn node_modules_in(root: &std::path::Path, packages: &[&str]) -> Result<PathBuf, String> {
    std::fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let lock = std::fs::File::create(root.join(".lock"))
        .and_then(|l| l.lock().map(|()| l))
        .map_err(|e| format!("locking {}: {e}", root.display()))?;
    let mut names: Vec<&str> = packages.to_vec();
    names.sort_unstable();
    let stamp = root.join(format!(
        "installed-{}",
        names.join("+").replace(
            |c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '.',
            "_"
        )
    ));
    if !stamp.is_file() {
        let out = std::process::Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(root)
            .args(packages)
            .output()
            .map_err(|e| format!("cannot run npm (scripts/install-deps test installs it): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "npm install {packages:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::write(&stamp, b"").map_err(|e| format!("stamping {}: {e}", root.display()))?;
    }
    drop(lock);
    Ok(root.join("node_modules"))
}

/// An HTTP reply read as JSON, with its status and headers.
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body (null if not JSON).
    pub body: serde_json::Value,
}

impl Reply {
    /// A header's value, or "" when absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    }

    /// The first choice's message of a chat completion.
    pub fn text(&self) -> String {
        self.body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    }
}

/// POSTs a JSON body with extra headers.
pub async fn post_json(url: &str, body: &serde_json::Value, headers: &[(&str, &str)]) -> Reply {
    let mut r = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().await.expect("request");
    Reply {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        body: resp.json().await.unwrap_or(serde_json::Value::Null),
    }
}
