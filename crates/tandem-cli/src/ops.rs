//! Operating a running Tandem: `route explain`, `signals`, `cache`, `ledger`, `keys`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

const DEFAULT_URL: &str = "http://127.0.0.1:8080";

#[derive(Args, Clone)]
pub struct Remote {
    /// The Tandem to talk to.
    #[arg(long, default_value = DEFAULT_URL, env = "TANDEM_URL")]
    pub url: String,
    /// Gateway API key, if the server has keys.
    #[arg(long, env = "TANDEM_API_KEY")]
    pub key: Option<String>,
}

impl Remote {
    pub(crate) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = reqwest::Client::new()
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }
}

async fn json_or_error(resp: reqwest::Response) -> anyhow::Result<Value> {
    let status = resp.status();
    let v: Value = resp
        .json()
        .await
        .context("the server's answer is not JSON")?;
    if !status.is_success() {
        bail!(
            "{status}: {}",
            v["error"]["message"].as_str().unwrap_or("unknown error")
        );
    }
    Ok(v)
}

#[derive(Subcommand)]
pub enum RouteCommand {
    /// Show where a prompt would run, and why, without generating.
    Explain(ExplainArgs),
}

#[derive(Args)]
pub struct ExplainArgs {
    pub prompt: String,
    /// Model to ask for (default: the virtual model).
    #[arg(long)]
    pub model: Option<String>,
    /// strict, redact or off.
    #[arg(long)]
    pub privacy: Option<String>,
    #[arg(long)]
    pub latency_goal_ms: Option<u32>,
    #[arg(long)]
    pub quality: Option<f32>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Print the full JSON explanation.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: Remote,
}

pub async fn route(cmd: RouteCommand) -> anyhow::Result<()> {
    let RouteCommand::Explain(a) = cmd;
    let mut body = json!({"messages": [{"role": "user", "content": a.prompt}]});
    if let Some(m) = &a.model {
        body["model"] = json!(m);
    }
    if let Some(m) = a.max_tokens {
        body["max_tokens"] = json!(m);
    }
    let mut req = a
        .remote
        .request(reqwest::Method::POST, "/v1/tandem/route")
        .json(&body);
    if let Some(p) = &a.privacy {
        req = req.header("x-tandem-privacy", p);
    }
    if let Some(l) = a.latency_goal_ms {
        req = req.header("x-tandem-latency-goal-ms", l.to_string());
    }
    if let Some(q) = a.quality {
        req = req.header("x-tandem-quality", q.to_string());
    }
    let v = json_or_error(req.send().await.context("cannot reach Tandem")?).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    match v["backend"].as_str() {
        Some(b) => println!(
            "-> {b} ({}), decided by {}, in {} us",
            v["model"].as_str().unwrap_or("?"),
            v["decision"]["decided_by"].as_str().unwrap_or("?"),
            v["decision_us"]
        ),
        None => println!("refused: {}", v["refusal"].as_str().unwrap_or("?")),
    }
    if let Some(r) = v["replica"].as_str() {
        println!("  upstream {r}");
    }
    if let Some(r) = v["reading"].as_str() {
        println!("  reading: {r}");
    }
    for r in v["decision"]["reasons"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} {:<6} {:<13} {}",
            r["effect"].as_str().unwrap_or(""),
            r["side"].as_str().unwrap_or(""),
            r["rule"].as_str().unwrap_or(""),
            r["detail"].as_str().unwrap_or("")
        );
    }
    let f = &v["features"];
    println!(
        "  request: ~{} prompt tokens, privacy {}, PII found: {}{}",
        f["prompt_tokens"],
        f["privacy"].as_str().unwrap_or("?"),
        // Classes with counts, never the values.
        match f["pii"].as_object() {
            Some(m) if !m.is_empty() => m
                .iter()
                .map(|(class, n)| format!("{class} ×{n}"))
                .collect::<Vec<_>>()
                .join(", "),
            _ => "none".into(),
        },
        match f["difficulty"].as_f64() {
            Some(d) => format!(", difficulty score {d:.2}"),
            None => String::new(),
        }
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum SignalsCommand {
    /// Print the device and network state the router sees.
    Show(Remote),
    /// Override signals (for tests and demos, or when the app knows better).
    Set(SetSignals),
    /// Drop all overrides.
    Clear(Remote),
}

#[derive(Args)]
pub struct SetSignals {
    #[arg(long)]
    pub battery: Option<f32>,
    #[arg(long)]
    pub charging: Option<bool>,
    #[arg(long)]
    pub cpu_load: Option<f32>,
    #[arg(long)]
    pub free_memory_mb: Option<u64>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub metered: Option<bool>,
    #[arg(long)]
    pub cloud_reachable: Option<bool>,
    #[command(flatten)]
    pub remote: Remote,
}

pub async fn signals(cmd: SignalsCommand) -> anyhow::Result<()> {
    let v = match cmd {
        SignalsCommand::Show(r) => {
            json_or_error(
                r.request(reqwest::Method::GET, "/v1/tandem/signals")
                    .send()
                    .await?,
            )
            .await?
        }
        SignalsCommand::Clear(r) => {
            json_or_error(
                r.request(reqwest::Method::DELETE, "/v1/tandem/signals")
                    .send()
                    .await?,
            )
            .await?
        }
        SignalsCommand::Set(s) => {
            let body = json!({
                "battery_pct": s.battery, "charging": s.charging, "cpu_load": s.cpu_load,
                "free_memory_mb": s.free_memory_mb, "temperature_c": s.temperature,
                "metered": s.metered, "cloud_reachable": s.cloud_reachable,
            });
            json_or_error(
                s.remote
                    .request(reqwest::Method::PUT, "/v1/tandem/signals")
                    .json(&body)
                    .send()
                    .await?,
            )
            .await?
        }
    };
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// How many answers the semantic cache holds.
    Show(Remote),
    /// Forget every cached answer. Asks the running server; with none
    /// running, removes the cache file (`--file`, default
    /// `$TANDEM_HOME/cache/answers.jsonl`).
    Clear(ClearCache),
}

#[derive(Args)]
pub struct ClearCache {
    #[arg(long)]
    pub file: Option<PathBuf>,
    #[command(flatten)]
    pub remote: Remote,
}

pub async fn cache(cmd: CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Show(r) => {
            let v = json_or_error(
                r.request(reqwest::Method::GET, "/v1/tandem/cache")
                    .send()
                    .await?,
            )
            .await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        CacheCommand::Clear(c) => {
            match c
                .remote
                .request(reqwest::Method::DELETE, "/v1/tandem/cache")
                .send()
                .await
            {
                Ok(resp) => {
                    let v = json_or_error(resp).await?;
                    println!("cleared {} cached answers", v["cleared"]);
                }
                // Nothing listening: the file is all there is.
                Err(e) if e.is_connect() => {
                    let path = c.file.unwrap_or_else(|| {
                        tandem_catalog::default_home()
                            .join("cache")
                            .join("answers.jsonl")
                    });
                    match std::fs::remove_file(&path) {
                        Ok(()) => println!("removed {}", path.display()),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            println!("no cache at {}", path.display());
                        }
                        Err(e) => {
                            return Err(e).with_context(|| format!("removing {}", path.display()));
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// List what left the device.
    List(LedgerArgs),
    /// Check every entry's MAC and the chain; with --head, that the ledger
    /// still holds the head kept earlier (not truncated, not rewritten).
    Verify(VerifyArgs),
    /// Print the ledger's head (`seq:mac`) after verifying it: keep it
    /// somewhere else and pass it to `verify --head` later.
    Head(VerifyArgs),
}

#[derive(Args)]
pub struct LedgerArgs {
    /// Default: $TANDEM_HOME/ledger.jsonl.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Default: $TANDEM_HOME/ledger.jsonl.
    #[arg(long)]
    pub path: Option<PathBuf>,
    /// The key that chains it. Default: $TANDEM_HOME/keys/ledger.key.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// A head printed by `tandem ledger head` earlier.
    #[arg(long)]
    pub head: Option<String>,
}

fn ledger_path(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(|| crate::config::LedgerSection::default().path())
}

fn verify_ledger(a: VerifyArgs) -> anyhow::Result<(PathBuf, tandem_ledger::Verified)> {
    let path = ledger_path(a.path);
    let key_path = a
        .key
        .unwrap_or_else(|| crate::config::LedgerSection::default().key_path());
    let key = tandem_ledger::LedgerKey::load(&key_path)?;
    let kept = a
        .head
        .map(|h| h.parse::<tandem_ledger::Head>())
        .transpose()
        .map_err(|e| anyhow::anyhow!("--head: {e}"))?;
    match tandem_ledger::verify(&path, &key, kept.as_ref()) {
        Ok(v) => Ok((path, v)),
        Err(e) => bail!("{}: {e}", path.display()),
    }
}

pub fn ledger(cmd: LedgerCommand) -> anyhow::Result<()> {
    match cmd {
        LedgerCommand::Verify(a) => {
            let checked_head = a.head.is_some();
            let (path, v) = verify_ledger(a)?;
            println!(
                "ok: {} entries in {}, every MAC and link intact{}; head {}",
                v.entries,
                path.display(),
                if checked_head {
                    ", the kept head is there"
                } else {
                    ""
                },
                v.head
                    .map_or_else(|| "(empty)".to_owned(), |h| h.to_string())
            );
            if v.unfinished > 0 {
                println!(
                    "{} request(s) were being sent with no outcome recorded (in flight now, or the process stopped)",
                    v.unfinished
                );
            }
            Ok(())
        }
        LedgerCommand::Head(a) => {
            let (path, v) = verify_ledger(a)?;
            match v.head {
                Some(h) => println!("{h}"),
                None => bail!("{} has no entries yet", path.display()),
            }
            Ok(())
        }
        LedgerCommand::List(a) => {
            let path = ledger_path(a.path);
            let entries = tandem_ledger::read(&path)?;
            if a.json {
                for e in entries {
                    println!("{}", serde_json::to_string(&e)?);
                }
                return Ok(());
            }
            println!(
                "{:>5}  {:<24} {:<12} {:<28} {:>8} {:>8} {:>10}  {:<22} OUTCOME",
                "SEQ", "TIME (UTC)", "UPSTREAM", "MODEL", "OUT B", "IN B", "COST $", "REDACTED"
            );
            let mut total = 0.0;
            let mut sent = 0;
            for e in &entries {
                if e.egress.outcome == tandem_ledger::SENDING {
                    continue;
                }
                sent += 1;
                let g = &e.egress;
                total += g.cost_usd;
                let redacted: Vec<String> =
                    g.redacted.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!(
                    "{:>5}  {:<24} {:<12} {:<28} {:>8} {:>8} {:>10.6}  {:<22} {}",
                    e.seq,
                    utc(e.time_ms),
                    g.upstream,
                    g.model,
                    g.bytes_out,
                    g.bytes_in,
                    g.cost_usd,
                    if redacted.is_empty() {
                        "-".into()
                    } else {
                        redacted.join(",")
                    },
                    g.outcome
                );
            }
            println!("{sent} requests left the device; ${total:.6} spent");
            Ok(())
        }
    }
}

fn utc(ms: u64) -> String {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Make a new gateway API key and print its configuration entry.
    New(NewKey),
}

#[derive(Args)]
pub struct NewKey {
    pub name: String,
    /// strict, redact or off.
    #[arg(long)]
    pub privacy: Option<String>,
    #[arg(long)]
    pub daily_budget_usd: Option<f64>,
    #[arg(long)]
    pub rate_limit_per_minute: Option<u32>,
    #[arg(long)]
    pub admin: bool,
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let KeysCommand::New(k) = cmd;
    if let Some(p) = &k.privacy {
        p.parse::<tandem_policy::PrivacyMode>()
            .map_err(anyhow::Error::msg)?;
    }
    let (raw, hash) = tandem_router::access::new_key().map_err(anyhow::Error::msg)?;
    eprintln!(
        "New key for `{}` (shown once; only its hash is stored):",
        k.name
    );
    println!("{raw}");
    eprintln!("\nAdd to tandem.toml:\n");
    eprintln!("[[keys]]\nname = {:?}\nhash = {:?}", k.name, hash);
    if let Some(p) = k.privacy {
        eprintln!("privacy = {p:?}");
    }
    if let Some(b) = k.daily_budget_usd {
        eprintln!("daily_budget_usd = {b}");
    }
    if let Some(r) = k.rate_limit_per_minute {
        eprintln!("rate_limit_per_minute = {r}");
    }
    if k.admin {
        eprintln!("admin = true");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_formatting() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_796_014_861_000), "2026-11-30 05:01:01");
    }
}
