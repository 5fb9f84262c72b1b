//! `tandem bench gateway`: what Tandem adds to a cloud request's latency.
//!
//! A fast OpenAI-compatible upstream runs on loopback. The same open-loop
//! load (a fixed request rate, latency measured from each request's
//! scheduled send time, so a stall cannot hide queued requests) is sent to
//! it directly, through a Tandem gateway (routing, PII scan, ledger and
//! metrics all on), and through the LiteLLM proxy from PyPI. The figure of
//! merit is the added p99: p99 through a gateway minus p99 direct.
//!
//! `--pin` puts the load generator and the upstream on the first core and
//! the gateway under test on the second.
//!
//! One file on purpose: the load generator, the stand-in upstream, starting
//! both gateways and the report are one measurement, read top to bottom.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;

/// The LiteLLM release measured against.
const LITELLM: &str = "litellm[proxy]==1.80.0";

/// `tandem bench gateway`'s options.
#[derive(Args, Clone)]
pub struct GatewayArgs {
    /// Requests per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u32,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Alternating direct/Tandem runs; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Skip LiteLLM (it is installed from PyPI into $TANDEM_HOME/bench).
    #[arg(long)]
    pub no_litellm: bool,
    /// Also measure both gateways at this lower rate, one LiteLLM can
    /// sustain on a small machine; 0 skips it.
    #[arg(long, default_value_t = 100)]
    pub low_rate: u32,
    /// Pin the load side to core 0 and the gateway to core 1.
    #[arg(long)]
    pub pin: bool,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

static PIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// One run at a fixed rate against one target.
#[derive(Debug, Clone, Serialize)]
pub struct RunStats {
    /// `direct`, `tandem` or `litellm`.
    pub target: String,
    /// CPU time the gateway process used per request (None: direct).
    pub cpu_us_per_request: Option<f64>,
    /// Requests per second asked for.
    pub rate: u32,
    /// Requests sent.
    pub sent: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Requests per second achieved.
    pub achieved_rps: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p90_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// See `p50_ms`.
    pub p999_ms: f64,
    /// The slowest request, ms.
    pub max_ms: f64,
}

/// Kills the child when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const ANSWER: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital of France."},"finish_reason":"stop"}],"usage":{"prompt_tokens":24,"completion_tokens":8,"total_tokens":32}}"#;

/// Core for the load side (generator, upstream), and for the gateway.
fn cores() -> (Option<core_affinity::CoreId>, Option<usize>) {
    if !PIN.load(std::sync::atomic::Ordering::Relaxed) {
        return (None, None);
    }
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    if ids.len() >= 2 {
        (Some(ids[0]), Some(ids[1].id))
    } else {
        (None, None)
    }
}

fn pin_here() {
    if let (Some(core), _) = cores() {
        core_affinity::set_for_current(core);
    }
}

/// `program args...`, under `taskset` on the gateway's core when pinning.
fn gateway_command(program: &Path) -> Command {
    match (cores().1, which_taskset()) {
        (Some(core), Some(taskset)) => {
            let mut c = Command::new(taskset);
            c.arg("-c").arg(core.to_string()).arg(program);
            c
        }
        _ => Command::new(program),
    }
}

fn which_taskset() -> Option<PathBuf> {
    ["/usr/bin/taskset", "/bin/taskset"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// The fast upstream: answers every chat request at once with a canned body.
pub(crate) fn start_upstream() -> anyhow::Result<(SocketAddr, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name("bench-upstream".into())
        .spawn(move || {
            pin_here();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .on_thread_start(pin_here)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route(
                        "/v1/chat/completions",
                        axum::routing::post(|| async {
                            ([("content-type", "application/json")], ANSWER)
                        }),
                    )
                    .route(
                        "/v1/models",
                        axum::routing::get(|| async {
                            axum::Json(json!({"object": "list", "data": []}))
                        }),
                    );
                match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr().map_err(|e| e.to_string()));
                        let _ = axum::serve(l, app).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        })?;
    let addr = rx.recv()?.map_err(anyhow::Error::msg)?;
    Ok((addr, handle))
}

/// Open-loop load: request i is due at start + i/rate whatever happened
/// to the ones before it.
fn load(url: &str, rate: u32, seconds: u64, label: &str) -> anyhow::Result<RunStats> {
    load_with(url, None, rate, seconds, label)
}

/// [`load`] with a gateway key.
pub(crate) fn load_with(
    url: &str,
    key: Option<&str>,
    rate: u32,
    seconds: u64,
    label: &str,
) -> anyhow::Result<RunStats> {
    pin_here();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_thread_start(pin_here)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let body = bytes::Bytes::from(serde_json::to_vec(&json!({
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ],
        "max_tokens": 16,
        "temperature": 0
    }))?);
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1, 60_000_000, 3,
    )?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let n = u64::from(rate) * seconds;
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + period.mul_f64(i as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let (client, url, body, hist, errors, first_error, auth) = (
            client.clone(),
            url.to_owned(),
            body.clone(),
            hist.clone(),
            errors.clone(),
            first_error.clone(),
            key.map(|k| format!("Bearer {k}")).unwrap_or_default(),
        );
        tasks.push(rt.spawn(async move {
            let mut req = client.post(url).header("content-type", "application/json");
            if !auth.is_empty() {
                req = req.header("authorization", auth);
            }
            let outcome = match req.body(body).send().await {
                Ok(r) if r.status().is_success() => {
                    r.bytes().await.map(|_| ()).map_err(|e| e.to_string())
                }
                Ok(r) => Err(format!(
                    "{}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                )),
                Err(e) => Err(e.to_string()),
            };
            let ok = match outcome {
                Ok(()) => true,
                Err(e) => {
                    if let Ok(mut f) = first_error.lock() {
                        f.get_or_insert(e);
                    }
                    false
                }
            };
            let us = due.elapsed().as_micros() as u64;
            if ok {
                if let Ok(mut h) = hist.lock() {
                    let _ = h.record(us.max(1));
                }
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
    }
    rt.block_on(futures::future::join_all(tasks));
    if let Ok(Some(e)) = first_error.lock().map(|f| f.clone()) {
        eprintln!(
            "{label}: {} failed requests, the first: {e}",
            errors.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    let elapsed = start.elapsed().as_secs_f64();
    let h = hist
        .lock()
        .map_err(|_| anyhow::anyhow!("histogram poisoned"))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(RunStats {
        target: label.to_owned(),
        cpu_us_per_request: None,
        rate,
        sent: n,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        achieved_rps: h.len() as f64 / elapsed,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    })
}

/// CPU seconds (user + system, all threads) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks as f64 / 100.0)
}

/// A load run against a gateway process, with the CPU it spent.
fn load_gateway(
    pid: u32,
    url: &str,
    rate: u32,
    seconds: u64,
    label: &str,
) -> anyhow::Result<RunStats> {
    let before = cpu_seconds(pid);
    let mut s = load(url, rate, seconds, label)?;
    if let (Some(b), Some(a)) = (before, cpu_seconds(pid)) {
        let done = s.sent.saturating_sub(s.errors).max(1) as f64;
        s.cpu_us_per_request = Some((a - b) * 1e6 / done);
    }
    Ok(s)
}

pub(crate) fn wait_http(url: &str, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(s) = child.try_wait()? {
            bail!("{url}: the server exited ({s})");
        }
        if std::net::TcpStream::connect_timeout(
            &url.trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .parse()?,
            Duration::from_millis(200),
        )
        .is_ok()
        {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{url} did not come up")
}

fn start_tandem(dir: &Path, upstream: SocketAddr) -> anyhow::Result<(Proc, String)> {
    start_tandem_with(dir, upstream, "gateway", true, "")
}

/// A gateway process named `name` (its files in `dir`), with its egress
/// ledger or not, and `extra` appended to its configuration.
pub(crate) fn start_tandem_with(
    dir: &Path,
    upstream: SocketAddr,
    name: &str,
    ledger: bool,
    extra: &str,
) -> anyhow::Result<(Proc, String)> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            r#"[local]
enabled = false

# The pure gateway path: no embedding, router model or cache per request.
[embeddings]
enabled = false

[[upstreams]]
name = "upstream"
base_url = "http://{upstream}/v1"
models = ["bench-model"]
price_input_per_mtok = 0.15
price_output_per_mtok = 0.60

[ledger]
enabled = {ledger}
path = "{}"

{extra}
"#,
            dir.join(format!("{name}-ledger.jsonl")).display()
        ),
    )?;
    let exe = std::env::current_exe()?;
    let mut child = gateway_command(&exe)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--port", "0"])
        .env("TANDEM_LOG", "warn")
        .envs(
            std::env::var("TANDEM_WORKERS")
                .ok()
                .or_else(|| cores().1.map(|_| "1".into()))
                .map(|w| ("TANDEM_WORKERS", w)),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the Tandem gateway")?;
    let stdout = child.stdout.take().context("gateway stdout")?;
    let mut reader = BufReader::new(stdout);
    let mut first = String::new();
    reader.read_line(&mut first)?;
    // Keep reading: a closed pipe would kill the server at its next print.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("no address in the gateway's banner: {first:?}"))?
        .trim_end_matches("/v1")
        .to_owned();
    let mut proc = Proc(child);
    wait_http(&base, &mut proc.0, Duration::from_secs(30))?;
    Ok((proc, format!("{base}/v1/chat/completions")))
}

fn litellm_python(home: &Path) -> anyhow::Result<PathBuf> {
    let dir = home.join("bench").join("litellm");
    eprintln!(
        "{LITELLM} from PyPI in {} (installed once)...",
        dir.display()
    );
    let python = tandem_catalog::python::venv(&dir, &[LITELLM])?;
    Ok(python.with_file_name("litellm"))
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_litellm(home: &Path, dir: &Path, upstream: SocketAddr) -> anyhow::Result<(Proc, String)> {
    let litellm = litellm_python(home)?;
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: bench-model\n    litellm_params:\n      model: openai/bench-model\n      api_base: http://{upstream}/v1\n      api_key: unused\nlitellm_settings:\n  telemetry: false\n"
        ),
    )?;
    let port = free_port()?;
    let child = gateway_command(&litellm)
        .arg("--config")
        .arg(&config)
        .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
        // Offline machine: use the bundled model-cost map, no telemetry.
        .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        .env("LITELLM_LOG", "ERROR")
        .env("DISABLE_TELEMETRY", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the LiteLLM proxy")?;
    let mut proc = Proc(child);
    let base = format!("http://127.0.0.1:{port}");
    wait_http(&base, &mut proc.0, Duration::from_secs(180))?;
    // Its first requests are slow (imports, connection set-up).
    let _ = load(&format!("{base}/v1/chat/completions"), 20, 3, "warm-up");
    Ok((proc, format!("{base}/v1/chat/completions")))
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

#[derive(Debug, Serialize)]
struct Report {
    rate: u32,
    seconds: u64,
    runs: Vec<RunStats>,
    direct_p99_ms: f64,
    tandem_p99_ms: f64,
    tandem_added_p99_ms: f64,
    tandem_added_p50_ms: f64,
    litellm_p99_ms: Option<f64>,
    litellm_added_p99_ms: Option<f64>,
    litellm_over_tandem: Option<f64>,
    low_rate: Option<LowRate>,
}

#[derive(Debug, Serialize)]
struct LowRate {
    rate: u32,
    direct_p99_ms: f64,
    tandem_added_p99_ms: f64,
    litellm_added_p99_ms: Option<f64>,
}

/// Runs the benchmark and prints its table.
pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    PIN.store(args.pin, std::sync::atomic::Ordering::Relaxed);
    let home = tandem_catalog::default_home();
    let dir = tempfile::tempdir()?;
    let (upstream, _upstream_thread) = start_upstream()?;
    let direct_url = format!("http://{upstream}/v1/chat/completions");
    let (tandem_proc, tandem_url) = start_tandem(dir.path(), upstream)?;
    let tandem_pid = tandem_proc.0.id();
    eprintln!(
        "gateway benchmark: {} requests/s for {} s per run, {} rounds",
        args.rate, args.seconds, args.rounds
    );
    // Warm both paths (connection pools, page cache).
    load(&direct_url, 200, 1, "warm-up")?;
    load(&tandem_url, 200, 1, "warm-up")?;

    let litellm = if args.no_litellm {
        None
    } else {
        Some(start_litellm(&home, dir.path(), upstream)?)
    };
    let mut runs = Vec::new();
    // The low rate first: a proxy that an overload broke would spoil it.
    let mut low_rate = None;
    if args.low_rate > 0 {
        let secs = args.seconds.max(10);
        let d = load(&direct_url, args.low_rate, secs, "direct-low")?;
        let t = load_gateway(tandem_pid, &tandem_url, args.low_rate, secs, "tandem-low")?;
        let l = match &litellm {
            Some((proc, url)) => Some(load_gateway(
                proc.0.id(),
                url,
                args.low_rate,
                secs,
                "litellm-low",
            )?),
            None => None,
        };
        low_rate = Some(LowRate {
            rate: args.low_rate,
            direct_p99_ms: d.p99_ms,
            tandem_added_p99_ms: t.p99_ms - d.p99_ms,
            litellm_added_p99_ms: l.as_ref().map(|l| l.p99_ms - d.p99_ms),
        });
        runs.extend([d, t]);
        runs.extend(l);
    }
    let (mut direct, mut tandem, mut added_p50) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let d = load(&direct_url, args.rate, args.seconds, "direct")?;
        let t = load_gateway(tandem_pid, &tandem_url, args.rate, args.seconds, "tandem")?;
        for s in [&d, &t] {
            eprintln!(
                "round {round}: {:<7} p50 {:.3} ms  p99 {:.3} ms  max {:.2} ms  errors {}{}",
                s.target,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.errors,
                s.cpu_us_per_request
                    .map(|c| format!("  cpu {c:.0} us/request"))
                    .unwrap_or_default()
            );
        }
        direct.push(d.p99_ms);
        tandem.push(t.p99_ms - d.p99_ms);
        added_p50.push(t.p50_ms - d.p50_ms);
        runs.extend([d, t]);
    }
    // Added latency per round (each gateway run against the direct run
    // just before it), then the median over rounds.
    let direct_p99 = median(direct);
    let tandem_added = median(tandem);
    let mut report = Report {
        rate: args.rate,
        seconds: args.seconds,
        direct_p99_ms: direct_p99,
        tandem_p99_ms: direct_p99 + tandem_added,
        tandem_added_p99_ms: tandem_added,
        tandem_added_p50_ms: median(added_p50),
        litellm_p99_ms: None,
        litellm_added_p99_ms: None,
        litellm_over_tandem: None,
        low_rate,
        runs,
    };
    if let Some((proc, url)) = &litellm {
        let s = load_gateway(proc.0.id(), url, args.rate, args.seconds, "litellm")?;
        eprintln!(
            "litellm: p50 {:.3} ms  p99 {:.3} ms  achieved {:.0}/s  errors {}",
            s.p50_ms, s.p99_ms, s.achieved_rps, s.errors
        );
        report.litellm_p99_ms = Some(s.p99_ms);
        report.litellm_added_p99_ms = Some(s.p99_ms - direct_p99);
        report.litellm_over_tandem =
            Some((s.p99_ms - direct_p99) / report.tandem_added_p99_ms.max(0.001));
        report.runs.push(s);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!();
    println!(
        "{:<12} {:>6} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "target",
        "rate",
        "achieved",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "p99.9 ms",
        "max ms",
        "cpu us/req"
    );
    for s in &report.runs {
        println!(
            "{:<12} {:>6} {:>9.0} {:>7} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.2} {:>11}",
            s.target,
            s.rate,
            s.achieved_rps,
            s.errors,
            s.p50_ms,
            s.p90_ms,
            s.p99_ms,
            s.p999_ms,
            s.max_ms,
            s.cpu_us_per_request
                .map(|c| format!("{c:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    println!();
    println!(
        "at {} req/s: Tandem adds {:.3} ms to p99 (median of {} rounds; goal <= 0.3 ms: {})",
        report.rate,
        report.tandem_added_p99_ms,
        args.rounds,
        if report.tandem_added_p99_ms <= 0.3 && report.runs.iter().all(|r| r.errors == 0) {
            "ok"
        } else {
            "NOT MET"
        }
    );
    println!(
        "             (and {:.3} ms to p50)",
        report.tandem_added_p50_ms
    );
    if let (Some(l), Some(x)) = (report.litellm_added_p99_ms, report.litellm_over_tandem) {
        let lite = report.runs.iter().find(|r| r.target == "litellm");
        println!(
            "             LiteLLM adds {l:.3} ms: {x:.0}x Tandem's (goal >= 20x: {}){}",
            if x >= 20.0 { "ok" } else { "NOT MET" },
            lite.filter(|r| r.errors > 0 || r.achieved_rps < 0.95 * f64::from(r.rate))
                .map(|r| format!(
                    "; it served {:.0}/s with {} errors: saturated",
                    r.achieved_rps, r.errors
                ))
                .unwrap_or_default()
        );
    }
    if let Some(low) = &report.low_rate {
        println!(
            "at {} req/s: Tandem adds {:.3} ms{}",
            low.rate,
            low.tandem_added_p99_ms,
            low.litellm_added_p99_ms
                .map(|l| format!(", LiteLLM adds {l:.3} ms"))
                .unwrap_or_default()
        );
    }
    Ok(())
}
