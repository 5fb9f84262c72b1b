//! `tandem top`: the dashboard's live feed in a terminal — each request as
//! it ends (where it ran, the rule that placed it, speed, cost, what was
//! redacted) and the running totals.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use serde_json::Value;

use crate::ops::Remote;

#[derive(Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub remote: Remote,
    /// Print the recent requests and the totals, then exit.
    #[arg(long)]
    pub once: bool,
    /// One JSON event per line (the feed's own), for scripts.
    #[arg(long)]
    pub json: bool,
    /// Print the totals again every this many seconds while requests come (0: never).
    #[arg(long, default_value_t = 30)]
    pub totals_every: u64,
}

pub async fn top(a: TopArgs) -> anyhow::Result<()> {
    let mut printed_header = false;
    let mut last_seq = 0u64;
    loop {
        let resp = a
            .remote
            .request(reqwest::Method::GET, "/ui/api/feed")
            .header("accept", "text/event-stream")
            .send()
            .await
            .with_context(|| format!("cannot reach Tandem at {}", a.remote.url))?;
        let status = resp.status();
        if status.as_u16() == 401 || status.as_u16() == 403 {
            bail!("{status}: the feed needs an admin key (--key or TANDEM_API_KEY)");
        }
        if !status.is_success() {
            bail!("{status} from {}/ui/api/feed", a.remote.url);
        }
        let mut body = resp.bytes_stream();
        let mut buf = String::new();
        let mut totals = Value::Null;
        let mut last_totals = Instant::now();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(cut) = buf.find("\n\n") {
                let block: String = buf.drain(..cut + 2).collect();
                let Some((name, data)) = parse_block(&block) else {
                    continue;
                };
                match name.as_str() {
                    "snapshot" => {
                        totals = data["totals"].clone();
                        let events = data["events"].as_array().cloned().unwrap_or_default();
                        let fresh: Vec<&Value> = events
                            .iter()
                            .filter(|e| e["seq"].as_u64().unwrap_or(0) > last_seq)
                            .collect();
                        if !a.json {
                            println!("{}", totals_line(&a.remote.url, &totals));
                            if !printed_header {
                                println!("{}", header());
                                printed_header = true;
                            }
                        }
                        // A terminal shows the latest screenful; a script gets all.
                        let skip = if a.json || a.once {
                            0
                        } else {
                            fresh.len().saturating_sub(20)
                        };
                        for e in fresh.into_iter().skip(skip) {
                            last_seq = last_seq.max(e["seq"].as_u64().unwrap_or(0));
                            print_event(e, a.json);
                        }
                        if a.once {
                            return Ok(());
                        }
                    }
                    "request" => {
                        last_seq = last_seq.max(data["seq"].as_u64().unwrap_or(0));
                        add_totals(&mut totals, &data);
                        print_event(&data, a.json);
                        if !a.json
                            && a.totals_every > 0
                            && last_totals.elapsed() >= Duration::from_secs(a.totals_every)
                        {
                            println!("{}", totals_line(&a.remote.url, &totals));
                            last_totals = Instant::now();
                        }
                    }
                    "lagged" if !a.json => {
                        println!(
                            "… {} requests missed (the terminal fell behind)",
                            data["missed"]
                        );
                    }
                    _ => {}
                }
            }
        }
        // The server ends feeds at shutdown and after its stream deadline.
        if !a.json {
            eprintln!("(feed ended; reconnecting)");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn parse_block(block: &str) -> Option<(String, Value)> {
    let mut name = String::from("message");
    let mut data = String::new();
    for line in block.lines() {
        if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    serde_json::from_str(&data).ok().map(|v| (name, v))
}

fn add_totals(t: &mut Value, e: &Value) {
    if !t.is_object() {
        return;
    }
    let side = e["side"].as_str().unwrap_or("none");
    let n = t["requests"][side].as_u64().unwrap_or(0);
    t["requests"][side] = (n + 1).into();
    let bump = |t: &mut Value, k: &str| {
        let n = t[k].as_u64().unwrap_or(0);
        t[k] = (n + 1).into();
    };
    match e["status"].as_str() {
        Some("refused") => bump(t, "refused"),
        Some("error") => bump(t, "errors"),
        _ => {}
    }
    if e["cascade"]
        .as_str()
        .is_some_and(|c| c.starts_with("escalated"))
    {
        bump(t, "escalated");
    }
    for k in ["cost_usd", "saved_usd"] {
        let sum = t[k].as_f64().unwrap_or(0.0) + e[k].as_f64().unwrap_or(0.0);
        t[k] = sum.into();
    }
    if let Some(r) = e["redacted"].as_object() {
        for (class, n) in r {
            let sum = t["redacted"][class].as_u64().unwrap_or(0) + n.as_u64().unwrap_or(0);
            t["redacted"][class] = sum.into();
        }
    }
}

fn usd(x: f64) -> String {
    if x == 0.0 {
        "$0".into()
    } else if x >= 0.01 {
        format!("${x:.2}")
    } else {
        format!("${x:.6}")
    }
}

fn totals_line(url: &str, t: &Value) -> String {
    let count = |k: &str| t["requests"][k].as_u64().unwrap_or(0);
    let (local, cloud, cache, none) = (
        count("local"),
        count("cloud"),
        count("cache"),
        count("none"),
    );
    let answered = local + cloud + cache;
    let share = if answered > 0 {
        format!(" ({:.0}%)", 100.0 * local as f64 / answered as f64)
    } else {
        String::new()
    };
    let redacted: Vec<String> = t["redacted"]
        .as_object()
        .map(|m| m.iter().map(|(c, n)| format!("{c}×{n}")).collect())
        .unwrap_or_default();
    format!(
        "Tandem at {url}: {} requests — {local} on the device{share}, {cloud} in the cloud, {cache} from the cache, {none} not answered · spent {} · saved {} · escalated {} · refused {} · failed {} · redacted {}",
        answered + none,
        usd(t["cost_usd"].as_f64().unwrap_or(0.0)),
        usd(t["saved_usd"].as_f64().unwrap_or(0.0)),
        t["escalated"].as_u64().unwrap_or(0),
        t["refused"].as_u64().unwrap_or(0),
        t["errors"].as_u64().unwrap_or(0),
        if redacted.is_empty() {
            "none".into()
        } else {
            redacted.join(" ")
        },
    )
}

fn header() -> String {
    format!(
        "{:<8}  {:<7} {:<26} {:<13} {:>7} {:>6} {:>9} {:>9}  WHY / MARKS",
        "UTC", "SIDE", "MODEL", "RULE", "TTFT", "TOK/S", "TOKENS", "COST"
    )
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

fn print_event(e: &Value, json: bool) {
    if json {
        println!("{e}");
        return;
    }
    println!("{}", event_line(e));
}

fn event_line(e: &Value) -> String {
    let secs = e["at_ms"].as_u64().unwrap_or(0) / 1000 % 86_400;
    let time = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    let side = match e["side"].as_str().unwrap_or("none") {
        "none" => e["status"].as_str().unwrap_or("none"),
        s => s,
    };
    let model = e["model"]
        .as_str()
        .filter(|m| !m.is_empty())
        .or(e["model_asked"].as_str())
        .unwrap_or("");
    let rule = e["decided_by"].as_str().unwrap_or("");
    let ttft = e["ttft_ms"]
        .as_f64()
        .map_or("–".to_owned(), |t| format!("{t:.0}ms"));
    let tps = e["tokens_per_s"]
        .as_f64()
        .map_or("–".to_owned(), |t| format!("{t:.0}"));
    let tokens = format!(
        "{}+{}",
        e["prompt_tokens"].as_u64().unwrap_or(0),
        e["completion_tokens"].as_u64().unwrap_or(0)
    );
    let mut why: Vec<String> = Vec::new();
    if let Some(err) = e["error"].as_str() {
        why.push(err.to_owned());
    }
    // The deciding rule's own words.
    for r in e["reasons"].as_array().into_iter().flatten() {
        if let Some(rest) = r
            .as_str()
            .and_then(|r| r.strip_prefix(&format!("{rule}: ")))
        {
            why.push(rest.rsplit_once(" (").map_or(rest, |(w, _)| w).to_owned());
        }
    }
    for (k, label) in [
        ("cache", "cache"),
        ("cascade", ""),
        ("speculative", "speculative"),
        ("failover", "failover"),
        ("handoff", "handoff"),
    ] {
        if let Some(v) = e[k].as_str() {
            why.push(if label.is_empty() {
                v.to_owned()
            } else {
                format!("{label} {v}")
            });
        }
    }
    if let Some(r) = e["redacted"].as_object().filter(|r| !r.is_empty()) {
        let classes: Vec<String> = r.iter().map(|(c, n)| format!("{c}×{n}")).collect();
        why.push(format!("redacted {}", classes.join(" ")));
    }
    if e["status"] == "cancelled" {
        why.push("client left".into());
    }
    format!(
        "{time:<8}  {:<7} {:<26} {:<13} {ttft:>7} {tps:>6} {tokens:>9} {:>9}  {}",
        clip(side, 7),
        clip(model, 26),
        clip(rule, 13),
        usd(e["cost_usd"].as_f64().unwrap_or(0.0)),
        why.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_line_says_where_why_and_what_was_redacted() {
        let e = json!({
            "seq": 3, "at_ms": 3_723_000u64, "side": "cloud", "status": "ok",
            "model": "gpt-4o-mini", "model_asked": "tandem/auto", "decided_by": "device",
            "reasons": ["device: battery at 8% and not charging (-> cloud)", "prefer_local: local first (prefers local)"],
            "ttft_ms": 412.4, "tokens_per_s": 51.0, "prompt_tokens": 20, "completion_tokens": 9,
            "cost_usd": 0.00005, "redacted": {"email": 1}
        });
        let line = event_line(&e);
        assert!(line.starts_with("01:02:03  cloud"), "{line}");
        assert!(
            line.contains("battery at 8% and not charging; redacted email×1"),
            "{line}"
        );
        assert!(!line.contains("local first"), "{line}");
        let mut t = json!({"requests": {}, "refused": 0, "errors": 0, "escalated": 0, "cost_usd": 0.0, "saved_usd": 0.0, "redacted": {}});
        add_totals(&mut t, &e);
        let s = totals_line("http://x", &t);
        assert!(
            s.contains("1 requests — 0 on the device (0%), 1 in the cloud"),
            "{s}"
        );
        assert!(s.contains("redacted email×1"), "{s}");
    }

    #[test]
    fn blocks_parse_with_or_without_a_space_after_the_colon() {
        assert_eq!(
            parse_block("event: request\ndata:{\"a\":1}\n\n").map(|(n, v)| (n, v["a"].clone())),
            Some(("request".into(), json!(1)))
        );
        assert!(parse_block(": keep-alive\n\n").is_none());
    }
}
