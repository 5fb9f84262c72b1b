//! The dashboard's weight and speed as a browser sees them: `/ui` served by
//! Tandem from its binary, loaded again and again in headless Chromium
//! (driven by Playwright's `playwright-core`, installed once under
//! `$TANDEM_HOME/bench/node`), each time in a fresh browser context, so
//! nothing is cached. Printed: the page's bytes (it fetches nothing else)
//! and the median and worst time to first contentful paint, to
//! DOMContentLoaded and to the load event.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;
use clap::Args;
use serde_json::Value;

/// `tandem bench ui`'s options.
#[derive(Args)]
pub struct UiArgs {
    /// Page loads.
    #[arg(long, default_value_t = 20)]
    pub loads: usize,
    /// The Chromium to drive.
    #[arg(long, default_value = "/usr/bin/chromium")]
    pub chromium: PathBuf,
}

const SCRIPT: &str = r#"
const { chromium } = require("playwright-core");
(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM, args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"] });
  for (let i = 0; i < Number(process.env.LOADS); i++) {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    let bytes = 0, others = 0;
    page.on("response", async (r) => {
      const kind = r.request().resourceType();
      if (kind === "document") { try { bytes += (await r.body()).length; } catch (e) {} }
      else if (!["fetch", "xhr", "eventsource"].includes(kind)) others++;
    });
    await page.goto(process.env.URL, { waitUntil: "load" });
    await page.waitForFunction(() => performance.getEntriesByName("first-contentful-paint").length > 0, null, { timeout: 5000 });
    const t = await page.evaluate(() => {
      const n = performance.getEntriesByType("navigation")[0];
      const p = performance.getEntriesByName("first-contentful-paint")[0];
      return { fcp: p.startTime, dcl: n.domContentLoadedEventEnd, load: n.loadEventEnd };
    });
    console.log(JSON.stringify({ ...t, bytes, others }));
    await context.close();
  }
  await browser.close();
})().catch((e) => { console.error(String(e)); process.exit(1); });
"#;

fn stats(xs: &mut [f64]) -> (f64, f64) {
    xs.sort_by(f64::total_cmp);
    let median = xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN);
    (median, xs.last().copied().unwrap_or(f64::NAN))
}

/// Runs the benchmark.
pub async fn run(a: UiArgs) -> anyhow::Result<()> {
    if !a.chromium.is_file() {
        bail!(
            "no Chromium at {} (scripts/install-deps test installs Debian's)",
            a.chromium.display()
        );
    }
    let home = tandem_catalog::default_home().join("bench").join("node");
    eprintln!(
        "Playwright's driver: {} under {}",
        tandem_testkit::PLAYWRIGHT,
        home.display()
    );
    let modules = tokio::task::spawn_blocking(move || {
        tandem_testkit::node_modules_in(&home, &[tandem_testkit::PLAYWRIGHT])
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    // A gateway with no backend: the page and its data routes are all there is.
    let dispatcher = tandem_router::Dispatcher::builder()
        .build()
        .map_err(anyhow::Error::msg)?;
    let server = tandem_testkit::TestServer::start(dispatcher).await;
    let url = server.url("/ui");
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("load.cjs");
    std::fs::write(&script, SCRIPT)?;
    let (loads, chromium) = (a.loads.max(1), a.chromium.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(&script)
            .env("NODE_PATH", &modules)
            .env("URL", &url)
            .env("LOADS", loads.to_string())
            .env("CHROMIUM", &chromium)
            .output()
    })
    .await??;
    server.stop().await;
    if !out.status.success() {
        bail!(
            "the browser run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let runs: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let field = |k: &str| -> Vec<f64> { runs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let (mut fcp, mut dcl, mut load) = (field("fcp"), field("dcl"), field("load"));
    let bytes = runs.first().and_then(|r| r["bytes"].as_u64()).unwrap_or(0);
    let others: u64 = runs.iter().filter_map(|r| r["others"].as_u64()).sum();
    let (fcp_med, fcp_max) = stats(&mut fcp);
    let (dcl_med, dcl_max) = stats(&mut dcl);
    let (load_med, load_max) = stats(&mut load);
    println!(
        "dashboard /ui, served from the binary, {} loads in fresh browser contexts (headless Chromium)",
        runs.len()
    );
    println!(
        "page: {bytes} bytes as received ({} in the binary); scripts, styles, fonts or images fetched besides: {others}",
        tandem_server::UI_PAGE_BYTES
    );
    println!("                          median      worst");
    println!("first contentful paint  {fcp_med:7.0} ms {fcp_max:7.0} ms");
    println!("DOMContentLoaded        {dcl_med:7.0} ms {dcl_max:7.0} ms");
    println!("load event              {load_med:7.0} ms {load_max:7.0} ms");
    Ok(())
}
