//! Soak and chaos: mixed traffic at a bounded rate against a device Tandem
//! (a separate process, with its real local model) whose cloud upstream
//! misbehaves in turn — server errors, rate limits, stalls past the TTFT
//! timeout, connections cut mid-stream. It reports every request's fate
//! (answered, refused with a clear error, failed with a clear error, hung,
//! dropped), the handoffs and failovers the server counted, and the
//! server's resident memory over the run.
//!
//! The goal: nothing hung or dropped, every failure a clear error, and RSS
//! flat after warm-up (growth ≤ 5 %).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{Value, json};
use tandem_testkit::capture::{CaptureUpstream, Mode};

use crate::process;

/// `tandem bench soak`.
#[derive(Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long the traffic runs.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Requests started per second.
    #[arg(long, default_value_t = 3.0)]
    pub rate: f64,
    /// Requests open at once at most (more are skipped, and counted).
    #[arg(long, default_value_t = 12)]
    pub concurrency: usize,
    /// The device's model.
    #[arg(long, default_value = "smollm2-135m-instruct")]
    pub model: String,
    /// Seconds between changes of the upstream's behaviour.
    #[arg(long, default_value_t = 15)]
    pub fault_every: u64,
}

/// The upstream's behaviours, in turn.
fn faults() -> Vec<(&'static str, Mode)> {
    vec![
        ("healthy", Mode::Forward),
        (
            "500s",
            Mode::Fail {
                status: 500,
                times: 12,
            },
        ),
        ("cut mid-stream", Mode::KillAfter(4)),
        ("healthy", Mode::Forward),
        ("stalls past TTFT", Mode::Delay(Duration::from_secs(5))),
        (
            "429s",
            Mode::Fail {
                status: 429,
                times: 6,
            },
        ),
    ]
}

#[derive(Default)]
struct Tally {
    outcomes: BTreeMap<String, u64>,
    started: u64,
    skipped: u64,
}

impl Tally {
    fn count(&mut self, what: String) {
        *self.outcomes.entry(what).or_default() += 1;
    }
}

/// One request of the mix: what it is, and its body.
fn request(i: u64, model: &str) -> (&'static str, &'static str, Option<Value>, bool) {
    let chat = "/v1/chat/completions";
    let ask = |m: &str, stream: bool, text: String| {
        json!({"model": m, "stream": stream, "max_tokens": 24, "temperature": 0.7,
            "messages": [{"role": "user", "content": text}]})
    };
    match fastrand::u32(0..100) {
        0..30 => (
            "local stream",
            chat,
            Some(ask(
                model,
                true,
                format!("Tell me one fact about the number {i}."),
            )),
            true,
        ),
        30..45 => (
            "local",
            chat,
            Some(ask(model, false, format!("Name a color. ({i})"))),
            false,
        ),
        45..55 => (
            "cloud stream",
            chat,
            Some(ask(
                "cloud-echo",
                true,
                format!("request {i}: {}", "words travel far ".repeat(8)),
            )),
            true,
        ),
        // Placed in the cloud first (the soak's policy prefers it), so the
        // faults make failovers and mid-stream handoffs to the device.
        55..70 => (
            "auto stream",
            chat,
            Some(ask(
                "tandem/auto",
                true,
                format!("Say something about {i}. {}", "again ".repeat(6)),
            )),
            true,
        ),
        70..80 => (
            "auto",
            chat,
            Some(ask("tandem/auto", false, format!("What is {i} plus 2?"))),
            false,
        ),
        80..88 => (
            "malformed",
            chat,
            Some(json!({"model": model, "messages": i})),
            false,
        ),
        88..94 => (
            "completion",
            "/v1/completions",
            Some(
                json!({"model": model, "prompt": format!("Once upon a time {i}"), "max_tokens": 16}),
            ),
            false,
        ),
        _ => ("models", "/v1/models", None, false),
    }
}

/// What became of one request.
async fn fate(client: &reqwest::Client, base: &str, i: u64, model: &str) -> String {
    let (kind, path, body, stream) = request(i, model);
    let send = match &body {
        Some(b) => client.post(format!("{base}{path}")).json(b).send().await,
        None => client.get(format!("{base}{path}")).send().await,
    };
    let r = match send {
        Ok(r) => r,
        Err(e) if e.is_timeout() => return format!("{kind}: HUNG (no answer in 90 s)"),
        Err(e) => return format!("{kind}: DROPPED ({e})"),
    };
    let status = r.status().as_u16();
    let failover = r.headers().contains_key("x-tandem-failover");
    let text = match r.text().await {
        Ok(t) => t,
        Err(e) if e.is_timeout() => return format!("{kind}: HUNG mid-answer"),
        Err(e) => return format!("{kind}: DROPPED mid-answer ({e})"),
    };
    let error_code = |v: &Value| {
        let e = &v["error"];
        e["code"]
            .as_str()
            .or_else(|| e["type"].as_str())
            .map(str::to_owned)
    };
    if status >= 400 {
        return match serde_json::from_str::<Value>(&text)
            .ok()
            .as_ref()
            .and_then(error_code)
        {
            Some(code) => format!("{kind}: {status} {code}"),
            None => format!("{kind}: {status} WITHOUT an error body"),
        };
    }
    if stream {
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        if let Some(code) = events.iter().find_map(error_code) {
            return format!("{kind}: stream ended with error {code}");
        }
        if !text.contains("data: [DONE]") {
            return format!("{kind}: stream ended WITHOUT [DONE] or an error");
        }
    }
    if failover {
        format!("{kind}: ok after failover")
    } else {
        format!("{kind}: ok")
    }
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn counter_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Runs the soak and prints its report.
pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    let echo = CaptureUpstream::start(None, Mode::Echo).await;
    let front = CaptureUpstream::start(Some(echo.base_url()), Mode::Forward).await;
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
port = {port}

[local]
models = ["{model}"]
parallel = 4
ctx = 4096

[[upstreams]]
name = "cloud"
base_url = "{cloud}"
models = ["cloud-echo"]
ttft_timeout_ms = 2000
idle_timeout_ms = 2000
max_retries = 1
breaker_cooldown_ms = 3000
continuation = "prefill"

[router]
rules = ["named_model", "privacy", "capability", "network", "budget", "load", "device", "latency", "difficulty", "prefer_cloud"]

[ledger]
path = "{dir}/ledger.jsonl"
key_path = "{dir}/keys/ledger.key"

[signals]
probe_interval_ms = 2000
"#,
            model = args.model,
            cloud = front.base_url(),
            dir = dir.path().display(),
        ),
    )?;
    let mut server = process::spawn(&["serve", "--config", &config.to_string_lossy()])?;
    let base = format!("http://127.0.0.1:{port}");
    process::wait_healthy(&base, &mut server.0).await?;
    let pid = server.0.id();
    println!(
        "soak: {} s of mixed traffic at {}/s (at most {} open) against a device Tandem (pid {pid}, {}); the upstream changes behaviour every {} s",
        args.seconds, args.rate, args.concurrency, args.model, args.fault_every
    );

    let rss: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let t0 = Instant::now();
    let sampler = {
        let rss = rss.clone();
        tokio::spawn(async move {
            loop {
                if let Some(kb) = rss_kb(pid) {
                    rss.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((t0.elapsed().as_secs_f64(), kb));
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let chaos = {
        let every = Duration::from_secs(args.fault_every.max(1));
        tokio::spawn(async move {
            for (name, mode) in faults().into_iter().cycle() {
                tracing::info!("upstream now: {name}");
                front.set_mode(mode);
                tokio::time::sleep(every).await;
            }
        })
    };

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(90))
        .build()?;
    let tally: Arc<Mutex<Tally>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(0.01)));
    let end = t0 + Duration::from_secs(args.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    let mut i = 0u64;
    while Instant::now() < end {
        tick.tick().await;
        i += 1;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tally.lock().unwrap_or_else(|p| p.into_inner()).skipped += 1;
            continue;
        };
        tally.lock().unwrap_or_else(|p| p.into_inner()).started += 1;
        let (client, base, tally, model) = (
            client.clone(),
            base.clone(),
            tally.clone(),
            args.model.clone(),
        );
        tasks.spawn(async move {
            let what = fate(&client, &base, i, &model).await;
            tally.lock().unwrap_or_else(|p| p.into_inner()).count(what);
            drop(slot);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    chaos.abort();
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    sampler.abort();
    let rss = rss.lock().unwrap_or_else(|p| p.into_inner()).clone();
    drop(server);

    let tally = tally.lock().unwrap_or_else(|p| p.into_inner());
    println!(
        "\nrequests started {}, skipped at the concurrency bound {}",
        tally.started, tally.skipped
    );
    let mut bad = 0;
    for (what, n) in &tally.outcomes {
        let flagged = what.contains("HUNG") || what.contains("DROPPED") || what.contains("WITHOUT");
        if flagged {
            bad += n;
        }
        println!(
            "  {n:>6}  {what}{}",
            if flagged {
                "   <-- not a clear answer"
            } else {
                ""
            }
        );
    }
    println!(
        "server counted: failovers {}, mid-stream handoffs {}",
        counter_sum(&metrics, "tandem_failovers_total"),
        counter_sum(&metrics, "tandem_handoffs_total")
    );
    for l in metrics.lines().filter(|l| {
        l.starts_with("tandem_failovers_total") || l.starts_with("tandem_handoffs_total")
    }) {
        println!("  {l}");
    }
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        let warm_at = args.seconds as f64 * 0.2;
        let warm = rss
            .iter()
            .find(|(t, _)| *t >= warm_at)
            .map_or(first.1, |(_, kb)| *kb);
        let max = rss.iter().map(|(_, kb)| *kb).max().unwrap_or(0);
        let growth = (last.1 as f64 / warm.max(1) as f64 - 1.0) * 100.0;
        println!(
            "server RSS: start {:.1} MiB, after warm-up ({warm_at:.0} s) {:.1} MiB, end {:.1} MiB, max {:.1} MiB; growth after warm-up {growth:+.1}% (goal ≤ 5%)",
            first.1 as f64 / 1024.0,
            warm as f64 / 1024.0,
            last.1 as f64 / 1024.0,
            max as f64 / 1024.0
        );
    }
    println!(
        "{}",
        if bad == 0 {
            "every request was answered or refused with a clear error".to_owned()
        } else {
            format!("{bad} request(s) hung, were dropped or ended without a clear error")
        }
    );
    Ok(())
}
