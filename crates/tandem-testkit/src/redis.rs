//! A real `redis-server` (Debian's package, installed by
//! `scripts/install-deps test`) on a free loopback port, in a directory of
//! its own, for tests of gateway replicas that share state. It can be shut
//! down (saving its data) and started again on the same port, as an outage
//! a deployment lives through.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running (or stopped) Redis.
pub struct RedisServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one on a free port. Panics with the reason if it cannot: a
    /// test without its Redis must fail, not pass vacuously.
    pub fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut r = RedisServer {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        r.restart();
        r
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Starts it again (after [`RedisServer::shutdown`]) with the data it
    /// saved.
    pub fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (scripts/install-deps test installs it)");
        self.child = Some(child);
        let t0 = Instant::now();
        while self.ping().is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends one command in Redis's wire protocol and reads the first line
    /// of the answer.
    fn command(&self, args: &[&str]) -> std::io::Result<String> {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes())?;
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line)?;
        Ok(line.trim_end().to_owned())
    }

    fn ping(&self) -> std::io::Result<()> {
        match self.command(&["PING"])? {
            l if l == "+PONG" => Ok(()),
            l => Err(std::io::Error::other(l)),
        }
    }

    /// Saves its data and stops it.
    pub fn shutdown(&mut self) {
        let _ = self.command(&["SHUTDOWN", "SAVE"]);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
