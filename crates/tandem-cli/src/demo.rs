//! `tandem demo`: both sides of hybrid AI on one machine. Starts a
//! cloud-role Tandem with the bigger model and a device Tandem that uses it
//! as its cloud, then sends requests that land on each side and prints
//! where each went and why.

use std::time::Duration;

use clap::Args;
use serde_json::{Value, json};
use tandem_bench::process::{spawn, wait_healthy};
use tandem_catalog::{Catalog, DEFAULT_MODEL, PullOptions};

use crate::serve::CLOUD_MODEL;

#[derive(Args)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 8080)]
    pub device_port: u16,
    #[arg(long, default_value_t = 8081)]
    pub cloud_port: u16,
    /// Stop both servers after the tour instead of leaving them running.
    #[arg(long)]
    pub exit: bool,
}

struct Step {
    title: &'static str,
    prompt: String,
    headers: Vec<(&'static str, &'static str)>,
    signals: Option<Value>,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let catalog = Catalog::load(None)?;
    for m in [DEFAULT_MODEL, CLOUD_MODEL] {
        catalog.pull(m, &PullOptions::default()).await?;
    }
    let home = tandem_catalog::default_home();
    let cloud_url = format!("http://127.0.0.1:{}", args.cloud_port);
    let device_url = format!("http://127.0.0.1:{}", args.device_port);
    let config_path = home.join("demo-device.toml");
    let ledger_path = home.join("demo-ledger.jsonl");
    std::fs::create_dir_all(&home)?;
    std::fs::write(
        &config_path,
        format!(
            r#"# Written by `tandem demo`: a device whose cloud is the Tandem on port {cloud}.
[local]
models = ["{DEFAULT_MODEL}"]
ctx = 1024
parallel = 2

[[upstreams]]
name = "cloud"
base_url = "{cloud_url}/v1"
models = ["{CLOUD_MODEL}"]
price_input_per_mtok = 0.10
price_output_per_mtok = 0.30
continuation = "prefill"
constraint_fields = ["guided_json", "guided_regex", "guided_choice", "structured_outputs", "json_schema"]
ttft_timeout_ms = 60000

[router]
privacy = "redact"

# Each step should show the router's placement, not an earlier answer.
[cache]
enabled = false

[ledger]
path = "{ledger}"

[signals]
probe_interval_ms = 2000
"#,
            cloud = args.cloud_port,
            ledger = ledger_path.display()
        ),
    )?;

    println!("starting the cloud side: {CLOUD_MODEL} on {cloud_url} ...");
    let cloud_port = args.cloud_port.to_string();
    let mut cloud = spawn(&[
        "serve",
        "--role",
        "cloud",
        "--port",
        &cloud_port,
        "--parallel",
        "2",
    ])?;
    wait_healthy(&cloud_url, &mut cloud.0).await?;
    println!("starting the device side: {DEFAULT_MODEL} on {device_url} ...");
    let device_port = args.device_port.to_string();
    let config = config_path.display().to_string();
    let mut device = spawn(&["serve", "--config", &config, "--port", &device_port])?;
    wait_healthy(&device_url, &mut device.0).await?;

    let long_text = "The committee reviewed the quarterly figures in detail, comparing each region's results with the forecast and noting where supply delays, currency movements and staffing changes explained the gaps. ".repeat(45);
    let steps = [
        Step {
            title: "an everyday question",
            prompt: "What is the capital of France? Answer in one word.".into(),
            headers: vec![],
            signals: None,
        },
        Step {
            title: "a document longer than the device's context",
            prompt: format!("Summarize in one sentence:\n{long_text}"),
            headers: vec![],
            signals: None,
        },
        Step {
            title: "battery at 12%, not charging",
            prompt: "Give me one tip for writing clear emails.".into(),
            headers: vec![],
            signals: Some(json!({"battery_pct": 12.0, "charging": false})),
        },
        Step {
            title: "personal data, privacy strict (battery still low)",
            prompt: "Write a one-line reply to jane.doe@example.com confirming the meeting.".into(),
            headers: vec![("x-tandem-privacy", "strict")],
            signals: None,
        },
        Step {
            title: "personal data, privacy redact (battery still low)",
            prompt: "Write a one-line reply to jane.doe@example.com confirming the meeting.".into(),
            headers: vec![("x-tandem-privacy", "redact")],
            signals: None,
        },
        Step {
            title: "the cloud goes offline",
            prompt: "Give me one tip for writing clear emails.".into(),
            headers: vec![],
            signals: Some(json!({"cloud_reachable": false})),
        },
    ];

    let client = reqwest::Client::new();
    println!();
    for (i, step) in steps.iter().enumerate() {
        if let Some(s) = &step.signals {
            client
                .put(format!("{device_url}/v1/tandem/signals"))
                .json(s)
                .send()
                .await?
                .error_for_status()?;
        }
        let mut req = client
            .post(format!("{device_url}/v1/chat/completions"))
            .json(&json!({
                "model": "tandem/auto",
                "messages": [{"role": "user", "content": step.prompt}],
                "max_tokens": 48,
                "temperature": 0,
            }))
            .timeout(Duration::from_secs(300));
        for (k, v) in &step.headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await?;
        let h = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        let (backend, decided, reasons, redacted) = (
            h("x-tandem-backend"),
            h("x-tandem-decided-by"),
            h("x-tandem-reasons"),
            h("x-tandem-redacted"),
        );
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or_default();
        println!("{}. {}", i + 1, step.title);
        if !status.is_success() {
            println!(
                "   refused ({status}): {}",
                body["error"]["message"].as_str().unwrap_or("")
            );
            continue;
        }
        println!("   -> {backend:<12} decided by {decided}");
        for r in reasons.split("; ").filter(|r| !r.contains("(prefers")) {
            println!("      {r}");
        }
        if !redacted.is_empty() {
            println!("      sent with placeholders for: {redacted} (restored in the answer)");
        }
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("")
            .trim();
        let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
        let shown: String = one_line.chars().take(110).collect();
        println!(
            "   answer: {shown}{}",
            if one_line.chars().count() > 110 {
                "..."
            } else {
                ""
            }
        );
        println!();
    }
    client
        .delete(format!("{device_url}/v1/tandem/signals"))
        .send()
        .await?;
    if let Ok(entries) = tandem_ledger::read(&ledger_path) {
        println!(
            "egress ledger {}: {} requests have left the device so far (`tandem ledger list --path {}`)",
            ledger_path.display(),
            entries
                .iter()
                .filter(|e| e.egress.outcome != tandem_ledger::SENDING)
                .count(),
            ledger_path.display()
        );
    }
    if args.exit {
        return Ok(());
    }
    println!();
    println!(
        "Both sides are still running: device {device_url}/v1 (model tandem/auto), cloud {cloud_url}/v1."
    );
    println!(
        "Try `tandem route explain \"...\"`, `tandem signals set --battery 10 --charging false`,"
    );
    println!("or `curl -i {device_url}/v1/chat/completions ...`. Ctrl-C stops both.");
    let _ = tokio::signal::ctrl_c().await;
    drop(device);
    drop(cloud);
    Ok(())
}
