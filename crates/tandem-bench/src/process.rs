//! Tandem servers as separate processes (this binary, started again), for
//! benchmarks and the demo that need a device and a cloud side at once.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Kills the child process when dropped.
pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `url/healthz` answers, or the process exits (an error).
pub async fn wait_healthy(url: &str, child: &mut Child) -> anyhow::Result<()> {
    wait_for(url, "/healthz", child).await
}

/// Waits until `url` + `path` answers with a success, or the process
/// exits (an error).
pub async fn wait_for(url: &str, path: &str, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let client = reqwest::Client::new();
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            bail!("the server at {url} exited ({status}); run it alone to see why");
        }
        if client
            .get(format!("{url}{path}"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{url} did not come up in time")
}

/// Starts this binary with `args`.
pub fn spawn(args: &[&str]) -> anyhow::Result<Server> {
    spawn_on(None, args)
}

/// Starts this binary with `args`, pinned to one CPU core when asked
/// (through `taskset`, so the pin holds for all of its threads).
pub fn spawn_on(core: Option<usize>, args: &[&str]) -> anyhow::Result<Server> {
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let mut cmd = match core {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(exe);
            cmd
        }
        None => Command::new(exe),
    };
    let child = cmd
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting a server")?;
    Ok(Server(child))
}
