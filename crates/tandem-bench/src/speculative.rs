//! `tandem bench spec`: edge–cloud speculative decoding against cloud-only
//! generation, on loopback, with the draft (device) and the target (cloud)
//! each pinned to a core of their own as if on separate hardware, and a
//! proxy between them that adds a chosen round-trip time.
//!
//! For each round-trip time, every prompt is answered twice through the
//! device Tandem — routed to the cloud as usual, then speculatively — both
//! greedy and streamed. Reported: end-to-end tokens per second for the user
//! (first byte of the request to the last token), the target's forward
//! passes per generated token (cloud-only: one per token by construction;
//! speculative: verification rounds, as counted by the cloud), the draft
//! acceptance rate, and whether the answers were identical.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{Server, spawn_on, wait_healthy};

/// `tandem bench spec`'s options.
#[derive(Args)]
pub struct SpecArgs {
    /// The draft model, on the device.
    #[arg(long, default_value = "qwen2.5-coder-0.5b-instruct")]
    pub draft: String,
    /// The target model, in a cloud-role Tandem this command starts.
    #[arg(long, default_value = "qwen2.5-coder-1.5b-instruct")]
    pub target: String,
    /// Round-trip times to inject between device and cloud (ms).
    #[arg(long, value_delimiter = ',', default_value = "0,20,50")]
    pub rtt_ms: Vec<u64>,
    /// Prompts per round trip setting.
    #[arg(long, default_value_t = 4)]
    pub prompts: usize,
    /// Tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Longest draft the adaptive length may choose.
    #[arg(long, default_value_t = 12)]
    pub max_draft: usize,
    /// Shortest draft it may choose (`[speculative] min_draft`).
    #[arg(long, default_value_t = 4)]
    pub min_draft: usize,
    /// Port of the cloud-role Tandem.
    #[arg(long, default_value_t = 8094)]
    pub cloud_port: u16,
    /// Port of the device Tandem.
    #[arg(long, default_value_t = 8095)]
    pub device_port: u16,
}

const PROMPTS: [&str; 8] = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a JavaScript function that returns the sum of an array of numbers.",
    "Explain what a hash map is in two sentences.",
    "Write a Rust function that reverses a vector in place.",
    "Write a SQL query that lists the ten most recent orders from a table named orders.",
    "What is the difference between a process and a thread?",
    "Write a Python class for a stack with push, pop and peek.",
    "Write a bash one-liner that counts the lines of every .py file in a directory.",
];

/// A TCP relay that holds every chunk for half the round-trip time in
/// each direction, keeping order and throughput.
async fn delay_proxy(target: u16, half_rtt_us: Arc<AtomicU64>) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let delay = half_rtt_us.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(pipe(ri, wo, delay.clone()), pipe(ro, wi, delay));
            });
        }
    });
    Ok(port)
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    half_rtt_us: Arc<AtomicU64>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let due =
                        Instant::now() + Duration::from_micros(half_rtt_us.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due.into()).await;
            if to.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

async fn metric(client: &reqwest::Client, base: &str, prefix: &str) -> anyhow::Result<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(tandem_router::metrics::sum(&text, prefix))
}

struct Timed {
    text: String,
    tokens: u32,
    seconds: f64,
}

/// One streamed answer, timed from sending the request to its last byte.
async fn ask(
    client: &reqwest::Client,
    base: &str,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    mode: &str,
) -> anyhow::Result<Timed> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t0 = Instant::now();
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .header("x-tandem-mode", mode)
        .header("x-tandem-cache", "skip")
        .json(&body)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("{mode}: HTTP {}: {}", resp.status(), resp.text().await?);
    }
    if mode == "speculative" {
        let state = resp
            .headers()
            .get("x-tandem-speculative")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if state != "on" {
            bail!("the device did not decode speculatively: {state}");
        }
    }
    let mut raw = Vec::new();
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        raw.extend_from_slice(&c?);
    }
    let seconds = t0.elapsed().as_secs_f64();
    let raw = String::from_utf8_lossy(&raw);
    let mut text = String::new();
    let mut tokens = 0;
    for data in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(e) = v.get("error") {
            bail!("{mode}: the answer broke off: {e}");
        }
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = n as u32;
        }
    }
    Ok(Timed {
        text,
        tokens,
        seconds,
    })
}

fn taskset_works() -> bool {
    std::process::Command::new("taskset")
        .args(["-c", "0", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs the benchmark and prints its table.
pub async fn run(args: SpecArgs) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = cores >= 2 && taskset_works();
    if !pin {
        eprintln!("note: cannot pin draft and target to separate cores here; they share the CPU");
    }
    let prompts: Vec<&str> = PROMPTS
        .iter()
        .copied()
        .cycle()
        .take(args.prompts.max(1))
        .collect();
    let half_rtt = Arc::new(AtomicU64::new(0));
    let proxy = delay_proxy(args.cloud_port, half_rtt.clone()).await?;

    let cloud_url = format!("http://127.0.0.1:{}", args.cloud_port);
    let device_url = format!("http://127.0.0.1:{}", args.device_port);
    eprintln!(
        "starting a cloud-role Tandem with {} on {cloud_url} ...",
        args.target
    );
    let cloud_port = args.cloud_port.to_string();
    // Each side on one core with one thread, one request at a time.
    let one_core = ["--threads", "1", "--parallel", "1", "--ctx", "2048"];
    let cloud_args = [
        &[
            "serve",
            "--role",
            "cloud",
            "--port",
            &cloud_port,
            "--model",
            &args.target,
        ][..],
        &one_core,
    ]
    .concat();
    let mut cloud: Server = spawn_on(pin.then_some(1), &cloud_args)?;
    wait_healthy(&cloud_url, &mut cloud.0).await?;

    let dir = tempfile::tempdir()?;
    let config = dir.path().join("device.toml");
    std::fs::write(
        &config,
        format!(
            r#"[embeddings]
enabled = false

[cache]
enabled = false

[speculative]
max_draft = {max_draft}
min_draft = {min_draft}
verify_timeout_ms = 60000

[[upstreams]]
name = "cloud"
base_url = "http://127.0.0.1:{proxy}/v1"
models = ["{target}"]
ttft_timeout_ms = 120000
"#,
            max_draft = args.max_draft,
            min_draft = args.min_draft,
            target = args.target
        ),
    )?;
    eprintln!(
        "starting a device Tandem with {} on {device_url} ...",
        args.draft
    );
    let device_port = args.device_port.to_string();
    let config_s = config.to_string_lossy().into_owned();
    let device_args = [
        &[
            "serve",
            "--config",
            &config_s,
            "--port",
            &device_port,
            "--model",
            &args.draft,
        ][..],
        &one_core,
    ]
    .concat();
    let mut device: Server = spawn_on(pin.then_some(0), &device_args)?;
    wait_healthy(&device_url, &mut device.0).await?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;
    // One untimed answer each way warms caches and both sessions' threads.
    ask(&client, &device_url, &args.target, "Hi", 4, "route")
        .await
        .context("warm-up (cloud only)")?;
    ask(&client, &device_url, &args.target, "Hi", 4, "speculative")
        .await
        .context("warm-up (speculative)")?;

    struct Row {
        rtt: u64,
        cloud_tps: f64,
        spec_tps: f64,
        passes_per_token: f64,
        acceptance: f64,
        mean_round: f64,
        identical: usize,
        /// Per round: drafting, the whole round trip, the target's pass (ms).
        split: [f64; 3],
    }
    let seconds = |kind: &'static str| {
        let client = client.clone();
        let device_url = device_url.clone();
        async move {
            metric(
                &client,
                &device_url,
                &format!("tandem_speculative_seconds_total{{kind=\"{kind}\"}}"),
            )
            .await
        }
    };
    let mut rows = Vec::new();
    for &rtt in &args.rtt_ms {
        half_rtt.store(rtt * 1000 / 2, Ordering::Relaxed);
        let (mut c_tokens, mut c_secs, mut s_tokens, mut s_secs, mut identical) =
            (0u32, 0.0, 0u32, 0.0, 0);
        let passes0 = metric(
            &client,
            &cloud_url,
            "tandem_speculative_verify_rounds_total",
        )
        .await?;
        let drafted0 = metric(
            &client,
            &device_url,
            "tandem_speculative_total{kind=\"drafted\"}",
        )
        .await?;
        let accepted0 = metric(
            &client,
            &device_url,
            "tandem_speculative_total{kind=\"accepted\"}",
        )
        .await?;
        let split0 = [
            seconds("draft").await?,
            seconds("round").await?,
            seconds("target").await?,
        ];
        for (i, p) in prompts.iter().enumerate() {
            let c = ask(
                &client,
                &device_url,
                &args.target,
                p,
                args.max_tokens,
                "route",
            )
            .await?;
            let s = ask(
                &client,
                &device_url,
                &args.target,
                p,
                args.max_tokens,
                "speculative",
            )
            .await?;
            let same = c.text == s.text;
            identical += usize::from(same);
            eprintln!(
                "rtt {rtt:>3} ms [{}/{}] cloud only {:>5.2} tok/s, speculative {:>5.2} tok/s{}",
                i + 1,
                prompts.len(),
                f64::from(c.tokens) / c.seconds,
                f64::from(s.tokens) / s.seconds,
                if same { "" } else { "  (answers differ)" }
            );
            c_tokens += c.tokens;
            c_secs += c.seconds;
            s_tokens += s.tokens;
            s_secs += s.seconds;
        }
        let passes = metric(
            &client,
            &cloud_url,
            "tandem_speculative_verify_rounds_total",
        )
        .await?
            - passes0;
        let drafted = metric(
            &client,
            &device_url,
            "tandem_speculative_total{kind=\"drafted\"}",
        )
        .await?
            - drafted0;
        let accepted = metric(
            &client,
            &device_url,
            "tandem_speculative_total{kind=\"accepted\"}",
        )
        .await?
            - accepted0;
        let split1 = [
            seconds("draft").await?,
            seconds("round").await?,
            seconds("target").await?,
        ];
        let per_round = |i: usize| 1000.0 * (split1[i] - split0[i]) / passes.max(1.0);
        rows.push(Row {
            split: [per_round(0), per_round(1), per_round(2)],
            rtt,
            cloud_tps: f64::from(c_tokens) / c_secs,
            spec_tps: f64::from(s_tokens) / s_secs,
            passes_per_token: passes / f64::from(s_tokens.max(1)),
            acceptance: if drafted > 0.0 {
                accepted / drafted
            } else {
                0.0
            },
            mean_round: if passes > 0.0 {
                f64::from(s_tokens) / passes
            } else {
                0.0
            },
            identical,
        });
    }
    drop(device);
    drop(cloud);

    println!();
    println!(
        "draft {} (device, {}), target {} (cloud, {}); {} prompts x {} tokens, greedy, streamed",
        args.draft,
        if pin { "core 0" } else { "unpinned" },
        args.target,
        if pin { "core 1" } else { "unpinned" },
        prompts.len(),
        args.max_tokens
    );
    println!(
        "{:>7} {:>14} {:>14} {:>8} {:>18} {:>11} {:>14} {:>10}",
        "rtt ms",
        "cloud tok/s",
        "spec tok/s",
        "ratio",
        "target passes/tok",
        "acceptance",
        "tokens/round",
        "identical"
    );
    for r in &rows {
        println!(
            "{:>7} {:>14.2} {:>14.2} {:>8.2} {:>18.3} {:>11.3} {:>14.2} {:>10}",
            r.rtt,
            r.cloud_tps,
            r.spec_tps,
            r.spec_tps / r.cloud_tps,
            r.passes_per_token,
            r.acceptance,
            r.mean_round,
            format!("{}/{}", r.identical, prompts.len())
        );
    }
    println!();
    println!(
        "{:>7} {:>16} {:>16} {:>20}",
        "rtt ms", "draft ms/round", "round ms", "target pass ms"
    );
    for r in &rows {
        println!(
            "{:>7} {:>16.1} {:>16.1} {:>20.1}",
            r.rtt, r.split[0], r.split[1], r.split[2]
        );
    }
    println!(
        "cloud only: 1 target pass per token. Goals: target passes/token <= 0.4; speculative no slower than cloud only at 20 ms."
    );
    Ok(())
}
