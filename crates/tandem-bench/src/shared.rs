//! `tandem bench shared`: what keeping keys, rate limits and budgets in
//! Redis adds to a request, and what a second gateway replica adds to
//! throughput.
//!
//! A real `redis-server` (Debian's package, `scripts/install-deps test`)
//! and the fast stand-in upstream of `tandem bench gateway` run on
//! loopback. Two gateway processes serve the same keyed traffic — a key
//! with a rate limit and a daily budget, so every request is admitted,
//! counted and reserved against (and a key with a rate limit only, which
//! needs one round trip to Redis where a budget needs two) — one keeping
//! that state in process, one
//! in Redis. Both run without the egress ledger, whose synced write before
//! each request leaves (the same for both) would bury the difference in
//! the disk's latency. The same open-loop load goes to each in alternating rounds,
//! and the figure of merit is the p50 added by Redis. Then closed-loop
//! load (a fixed number of clients sending back to back) measures
//! requests per second through one Redis-backed replica and through two.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use serde_json::json;

use crate::gateway::{
    Proc, RunStats, free_port, load_with, median, start_tandem_with, start_upstream,
};

/// `tandem bench shared`'s options.
#[derive(Args, Clone)]
pub struct SharedArgs {
    /// Requests per second in the latency runs.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Alternating rounds; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Clients sending back to back in the throughput runs.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Print the results as JSON.
    #[arg(long)]
    pub json: bool,
}

fn start_redis(dir: &Path) -> anyhow::Result<(Proc, u16)> {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("redis-server is not installed: run `scripts/install-deps test`");
    }
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server")?;
    let proc = Proc(child);
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("redis-server did not come up on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, port))
}

/// Closed loop: `clients` tasks, each sending its next request when the
/// last one is answered, for `seconds`, spread over `urls` in turn.
fn throughput(urls: &[String], key: &str, clients: usize, seconds: u64) -> anyhow::Result<f64> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(clients * 2)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?;
    let body = bytes::Bytes::from(serde_json::to_vec(&json!({
        "model": "bench-model",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
    }))?);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let (client, body, done, failed) =
                (client.clone(), body.clone(), done.clone(), failed.clone());
            let url = urls[i % urls.len()].clone();
            let auth = format!("Bearer {key}");
            rt.spawn(async move {
                while Instant::now() < end {
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("authorization", &auth)
                        .body(body.clone())
                        .send()
                        .await;
                    let ok = match r {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    let counter = if ok { &done } else { &failed };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    rt.block_on(futures::future::join_all(tasks));
    let n = failed.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!("throughput run: {n} requests failed");
    }
    Ok(done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64())
}

#[derive(Debug, Serialize)]
struct Report {
    rate: u32,
    rounds: usize,
    in_process: Vec<RunStats>,
    redis: Vec<RunStats>,
    in_process_p50_ms: f64,
    redis_p50_ms: f64,
    added_p50_ms: f64,
    in_process_p99_ms: f64,
    redis_p99_ms: f64,
    rate_limit_only_added_p50_ms: f64,
    clients: usize,
    one_replica_rps: Vec<f64>,
    two_replicas_rps: Vec<f64>,
    two_over_one: f64,
}

/// Runs the benchmark.
pub fn run(args: SharedArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_redis, port) = start_redis(dir.path())?;
    let (upstream, _up) = start_upstream()?;
    let (admin_raw, admin_hash) = tandem_router::access::new_key().map_err(anyhow::Error::msg)?;
    let (key_raw, key_hash) = tandem_router::access::new_key().map_err(anyhow::Error::msg)?;
    let (rated_raw, rated_hash) = tandem_router::access::new_key().map_err(anyhow::Error::msg)?;
    drop(admin_raw);
    // Limits far above the load: every request is admitted, but each is
    // counted against the rate and reserved against the budget.
    let keys = format!(
        r#"[[keys]]
name = "ops"
hash = "{admin_hash}"
admin = true

[[keys]]
name = "bench"
hash = "{key_hash}"
rate_limit_per_minute = 100000000
daily_budget_usd = 1000000000.0

[[keys]]
name = "rated"
hash = "{rated_hash}"
rate_limit_per_minute = 100000000
"#
    );
    let shared = format!(
        "{keys}\n[shared]\nredis_url = \"redis://127.0.0.1:{port}/\"\non_unavailable = \"closed\"\n"
    );
    let (_local_proc, local_url) =
        start_tandem_with(dir.path(), upstream, "in-process", false, &keys)?;
    let (_redis_proc, redis_url) =
        start_tandem_with(dir.path(), upstream, "redis-a", false, &shared)?;
    let (_second_proc, second_url) =
        start_tandem_with(dir.path(), upstream, "redis-b", false, &shared)?;
    let key = Some(key_raw.as_str());
    for url in [&local_url, &redis_url, &second_url] {
        load_with(url, key, 200, 1, "warm-up")?;
    }
    let mut in_process = Vec::new();
    let mut redis = Vec::new();
    let mut rated_in_process = Vec::new();
    let mut rated_redis = Vec::new();
    for round in 0..args.rounds {
        // Alternate which goes first so drift in the machine's load
        // falls on both.
        let mut runs = vec![
            ("in-process", &local_url, key, 0),
            ("redis", &redis_url, key, 1),
            (
                "in-process, rate limit only",
                &local_url,
                Some(rated_raw.as_str()),
                2,
            ),
            (
                "redis, rate limit only",
                &redis_url,
                Some(rated_raw.as_str()),
                3,
            ),
        ];
        if round % 2 == 1 {
            runs.reverse();
        }
        for (label, url, key, slot) in runs {
            let s = load_with(url, key, args.rate, args.seconds, label)?;
            if !args.json {
                eprintln!(
                    "round {}: {label:28} p50 {:.3} ms  p99 {:.3} ms  errors {}",
                    round + 1,
                    s.p50_ms,
                    s.p99_ms,
                    s.errors
                );
            }
            [
                &mut in_process,
                &mut redis,
                &mut rated_in_process,
                &mut rated_redis,
            ][slot]
                .push(s);
        }
    }
    let mut one = Vec::new();
    let mut two = Vec::new();
    for round in 0..args.rounds {
        let a = throughput(
            std::slice::from_ref(&redis_url),
            &key_raw,
            args.clients,
            args.seconds,
        )?;
        let b = throughput(
            &[redis_url.clone(), second_url.clone()],
            &key_raw,
            args.clients,
            args.seconds,
        )?;
        if !args.json {
            eprintln!(
                "round {}: one replica {a:.0} req/s, two replicas {b:.0} req/s",
                round + 1
            );
        }
        one.push(a);
        two.push(b);
    }
    let p = |v: &[RunStats], f: fn(&RunStats) -> f64| median(v.iter().map(f).collect());
    let report = Report {
        rate: args.rate,
        rounds: args.rounds,
        in_process_p50_ms: p(&in_process, |s| s.p50_ms),
        redis_p50_ms: p(&redis, |s| s.p50_ms),
        added_p50_ms: p(&redis, |s| s.p50_ms) - p(&in_process, |s| s.p50_ms),
        in_process_p99_ms: p(&in_process, |s| s.p99_ms),
        redis_p99_ms: p(&redis, |s| s.p99_ms),
        rate_limit_only_added_p50_ms: p(&rated_redis, |s| s.p50_ms)
            - p(&rated_in_process, |s| s.p50_ms),
        in_process,
        redis,
        clients: args.clients,
        two_over_one: median(two.clone()) / median(one.clone()),
        one_replica_rps: one,
        two_replicas_rps: two,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "keyed requests at {} req/s, median of {} rounds:",
        report.rate, report.rounds
    );
    println!(
        "  limits in process: p50 {:.3} ms, p99 {:.3} ms",
        report.in_process_p50_ms, report.in_process_p99_ms
    );
    println!(
        "  limits in Redis:   p50 {:.3} ms, p99 {:.3} ms",
        report.redis_p50_ms, report.redis_p99_ms
    );
    println!(
        "  added by Redis at p50: {:.3} ms (goal: at most 0.3 ms)",
        report.added_p50_ms
    );
    println!(
        "  a key with a rate limit only (one round trip, no budget to reserve against): {:.3} ms added at p50",
        report.rate_limit_only_added_p50_ms
    );
    println!(
        "throughput with {} clients: one replica {:.0} req/s, two replicas {:.0} req/s ({:.2}x)",
        report.clients,
        median(report.one_replica_rps.clone()),
        median(report.two_replicas_rps.clone()),
        report.two_over_one
    );
    Ok(())
}
