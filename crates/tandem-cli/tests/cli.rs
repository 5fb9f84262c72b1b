//! The `tandem` binary as a user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tandem_testkit::{SMOLLM2, model_path};

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

#[test]
fn run_answers_a_prompt() {
    model_path(SMOLLM2);
    let out = tandem()
        .args([
            "run",
            SMOLLM2,
            "What is the capital of France? Answer in one word.",
            "--temperature",
            "0",
            "--max-tokens",
            "20",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn chat_reads_turns_from_stdin() {
    model_path(SMOLLM2);
    let mut child = tandem()
        .args(["chat", "--temperature", "0", "--max-tokens", "20"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "What is the capital of France? Answer in one word.").unwrap();
        writeln!(stdin, "/exit").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Paris"));
}

#[test]
fn models_lists_the_catalog() {
    let out = tandem().args(["models", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    for expected in [
        SMOLLM2,
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "gemma-3-270m",
    ] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
}

#[test]
fn pull_of_a_local_file_checks_its_hash() {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("tiny.gguf");
    std::fs::write(&file, b"not really a model").unwrap();
    let bad = tandem()
        .env("TANDEM_HOME", home.path())
        .args(["pull", file.to_str().unwrap(), "--sha256", &"ab".repeat(32)])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sha256 mismatch"));
    assert!(!home.path().join("models/tiny/tiny.gguf").exists());

    let good = tandem()
        .env("TANDEM_HOME", home.path())
        .args(["pull", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(home.path().join("models/tiny/tiny.gguf").is_file());
    let listed = tandem()
        .env("TANDEM_HOME", home.path())
        .args(["models"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&listed.stdout).contains("tiny"));
}

#[test]
fn serve_prints_how_to_call_it_and_answers() {
    model_path(SMOLLM2);
    let mut child = tandem()
        .args(["serve", "--port", "0", "--parallel", "1", "--ctx", "512"])
        .env("TANDEM_SERVER__SHUTDOWN_GRACE_S", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let banner = lines.next().unwrap().unwrap();
    let base = banner
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {banner:?}"))
        .to_owned();
    let rest: Vec<String> = lines.by_ref().take(4).map(Result::unwrap).collect();
    assert!(rest.join("\n").contains("curl"), "{rest:?}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let v: serde_json::Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{base}/chat/completions"))
            .json(&serde_json::json!({
                "model": SMOLLM2,
                "messages": [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
                "temperature": 0
            }))
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{v}"
    );
    // `tandem top` shows that request, where it ran and why; live, the next.
    let root = base.trim_end_matches("/v1").to_owned();
    let once = tandem()
        .args(["top", "--once", "--url", &root])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&once.stdout);
    assert!(
        once.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&once.stderr)
    );
    assert!(
        shown.contains("1 requests — 1 on the device (100%)"),
        "{shown}"
    );
    assert!(
        shown
            .lines()
            .any(|l| l.contains(" local ") && l.contains(SMOLLM2) && l.contains("named_model")),
        "{shown}"
    );
    let mut live = tandem()
        .args(["top", "--json", "--url", &root])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut live_lines = BufReader::new(live.stdout.take().unwrap()).lines();
    let first: serde_json::Value =
        serde_json::from_str(&live_lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(first["seq"], 1, "{first}");
    let reply = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{base}/chat/completions"))
            .header("x-request-id", "top-live-1")
            .json(&serde_json::json!({
                "model": SMOLLM2, "max_tokens": 4,
                "messages": [{"role": "user", "content": "Say hi."}]
            }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(reply.is_success());
    let next: serde_json::Value =
        serde_json::from_str(&live_lines.next().unwrap().unwrap()).unwrap();
    let _ = live.kill();
    let _ = live.wait();
    assert_eq!(
        (next["request_id"].as_str(), next["side"].as_str()),
        (Some("top-live-1"), Some("local")),
        "{next}"
    );
    assert!(!next.to_string().contains("Say hi"), "{next}");

    // SIGTERM with a long answer streaming: the stream gets the grace
    // period (1 s here), then the server exits cleanly.
    let stream_url = format!("{base}/chat/completions");
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut r = reqwest::Client::new()
                .post(stream_url)
                .json(&serde_json::json!({
                    "model": SMOLLM2, "stream": true, "max_tokens": 400, "ignore_eos": true,
                    "messages": [{"role": "user", "content": "Count to a thousand."}]
                }))
                .send()
                .await
                .unwrap();
            let mut body = String::new();
            while let Ok(Some(c)) = r.chunk().await {
                if body.is_empty() {
                    let _ = started_tx.send(());
                }
                body.push_str(&String::from_utf8_lossy(&c));
            }
            body
        })
    });
    started_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let stopping = std::time::Instant::now();
    send_sigterm(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let took = stopping.elapsed();
    assert!(took < Duration::from_secs(15), "exit took {took:?}");
    let body = reader.join().unwrap();
    assert!(
        !body.contains("[DONE]"),
        "the long answer was cut at the grace"
    );
}

fn send_sigterm(pid: u32) {
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

fn gateway_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("tandem.toml");
    std::fs::write(
        &path,
        "[local]\nenabled = false\n\n[[upstreams]]\nname = \"up\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"m\"]\n",
    )
    .unwrap();
    path
}

#[test]
fn serve_refuses_the_network_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    let out = tandem()
        .env("TANDEM_HOME", dir.path())
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--host",
            "0.0.0.0",
            "--port",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no API keys") && err.contains("--allow-remote"),
        "{err}"
    );
}

#[test]
fn keys_new_prints_a_key_and_its_hash_only() {
    let out = tandem()
        .args(["keys", "new", "app", "--privacy", "strict"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(key.starts_with("tdm_") && key.len() > 30, "{key}");
    let snippet = String::from_utf8_lossy(&out.stderr);
    assert!(snippet.contains("sha256:") && snippet.contains("privacy = \"strict\""));
    assert!(
        !snippet.contains(&key),
        "the key itself is not in the config snippet"
    );
    let bad = tandem()
        .args(["keys", "new", "x", "--privacy", "loose"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn ledger_verify_catches_edits_and_truncation_against_a_kept_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.jsonl");
    let key_path = dir.path().join("elsewhere/ledger.key");
    let key = tandem_ledger::LedgerKey::load_or_create(&key_path).unwrap();
    let l = tandem_ledger::Ledger::open(&path, key).unwrap();
    for i in 0..3 {
        l.record(tandem_ledger::Egress {
            request_id: format!("r{i}"),
            upstream: "up".into(),
            model: "m".into(),
            outcome: "ok".into(),
            bytes_out: 10,
            ..Default::default()
        });
    }
    l.flush();
    let ledger = |args: &[&str]| {
        let mut c = tandem();
        c.arg("ledger")
            .args(args)
            .args(["--path", path.to_str().unwrap()]);
        if args[0] != "list" {
            c.args(["--key", key_path.to_str().unwrap()]);
        }
        c.output().unwrap()
    };
    let ok = ledger(&["verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("3 entries"));
    let head = ledger(&["head"]);
    assert!(head.status.success());
    let head = String::from_utf8_lossy(&head.stdout).trim().to_owned();
    assert!(head.starts_with("2:"), "{head}");
    let listed = ledger(&["list"]);
    assert!(String::from_utf8_lossy(&listed.stdout).contains("3 requests left the device"));

    // The last line cut off: the chain alone still holds, the head does not.
    drop(l);
    let text = std::fs::read_to_string(&path).unwrap();
    let two: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&path, &two).unwrap();
    assert!(ledger(&["verify"]).status.success());
    let cut = ledger(&["verify", "--head", &head]);
    assert!(!cut.status.success());
    assert!(String::from_utf8_lossy(&cut.stderr).contains("truncated"));

    let edited = two.replacen("\"bytes_out\":10", "\"bytes_out\":11", 1);
    std::fs::write(&path, edited).unwrap();
    let bad = ledger(&["verify"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("line 1"));
}

/// Arithmetic only the strong model gets right; small talk both get right.
fn routing_fixture(dir: &std::path::Path) -> std::path::PathBuf {
    routing_fixture_of(dir, 24)
}

/// [`routing_fixture`] with `pairs` prompts of each kind.
fn routing_fixture_of(dir: &std::path::Path, pairs: usize) -> std::path::PathBuf {
    let mut lines = Vec::new();
    for i in 0..pairs {
        let (a, b) = (37 + i * 13, 19 + i * 7);
        lines.push(serde_json::json!({
            "id": format!("hard-{i}"), "source": if i % 2 == 0 { "a" } else { "b" },
            "prompt": format!("Compute {a} * {b} - {} and show the steps.", i * 3),
            "weak_correct": false, "strong_correct": true,
        }));
        let greetings = [
            "Hello there!",
            "Good morning, friend.",
            "Thanks a lot!",
            "Have a nice day.",
        ];
        lines.push(serde_json::json!({
            "id": format!("easy-{i}"), "source": if i % 2 == 0 { "a" } else { "b" },
            "prompt": format!("{} (note {i})", greetings[i % 4]),
            "weak_correct": true, "strong_correct": true,
        }));
    }
    let path = dir.join("routing.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&path, text.join("\n")).unwrap();
    path
}

#[test]
fn router_train_and_eval_report_on_unseen_prompts() {
    tandem_testkit::model_path(tandem_testkit::MINILM);
    let dir = tempfile::tempdir().unwrap();
    let data = routing_fixture(dir.path());
    let router = dir.path().join("router.json");
    let train = ["train", "--k", "4", "--holdout", "0.25"];
    let out = router_ok(&train, &data, "--out", &router);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("APGR") && stdout.contains("local@95"),
        "{stdout}"
    );
    assert!(router.is_file());

    let out = router_ok(&["eval", "--json"], &data, "--router", &router);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Only the 12 held-out prompts are scored, and the classes separate:
    // every easy prompt stays local (with the strong model always right,
    // the easy share is the weak model's accuracy), well above random.
    let o = &v["overall"];
    assert_eq!(o["prompts"], 12, "{v}");
    let f = |k: &str| o[k].as_f64().unwrap();
    assert!(f("local_share_at_95") >= f("weak_accuracy") - 1e-9, "{v}");
    assert!(f("apgr") > f("random_apgr") + 0.05, "{v}");
    assert_eq!(v["per_source"].as_array().unwrap().len(), 2);

    // The router reads prompts through its static table, pinned by hash:
    // a table from elsewhere is refused, not silently used.
    let table = dir.path().join("router.vectors.safetensors");
    let mut bytes = std::fs::read(&table).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&table, &bytes).unwrap();
    let out = router_run(&["eval"], &data, "--router", &router);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not the table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Trained on the encoder's own vectors, a router needs no table.
    std::fs::remove_file(&table).unwrap();
    router_ok(
        &[
            "train",
            "--vectors",
            "encoder",
            "--k",
            "4",
            "--holdout",
            "0.25",
        ],
        &data,
        "--out",
        &router,
    );
    assert!(!table.exists());
    // Replayed as traffic, the memory of outcomes is measured beside it.
    let out = router_ok(&["eval", "--json", "--online"], &data, "--router", &router);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["online_with_memory"]["prompts"], 12, "{v}");
}

#[test]
fn router_read_resumes_and_train_fits_a_probe_on_the_readings() {
    model_path(SMOLLM2);
    tandem_testkit::model_path(tandem_testkit::MINILM);
    let dir = tempfile::tempdir().unwrap();
    let data = routing_fixture_of(dir.path(), 80);
    // By default, a third of the way through SmolLM2's 30 blocks.
    let readings = dir.path().join("routing.l10.readings.jsonl");
    let read = |extra: &[&str]| {
        let out = tandem()
            .args([
                "router",
                "read",
                "--device",
                SMOLLM2,
                "--threads",
                "2",
                "--data",
            ])
            .arg(&data)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(read(&["--limit", "50"]).contains("50 prompts read"));
    // A run stopped mid-line leaves a torn line; the next run reads the
    // rest (that prompt included) and nothing twice.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&readings)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"id\":\"hard-30\",\"model\":\"smo").unwrap();
    drop(f);
    assert!(read(&[]).contains("110 prompts read"), "resumed");
    assert!(read(&[]).contains("every prompt"));
    let text = std::fs::read_to_string(&readings).unwrap();
    let mut ids: Vec<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| {
            assert_eq!(v["model"], SMOLLM2);
            assert_eq!(v["layer"], 10);
            assert!(v["reading"].as_array().unwrap().len() > 100);
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 160);

    let router = dir.path().join("router.json");
    let train = [
        "train",
        "--k",
        "4",
        "--holdout",
        "0.25",
        "--probe-lambda",
        "100",
        "--readings",
    ];
    let mut args: Vec<&str> = train.to_vec();
    let r = readings.to_str().unwrap();
    args.push(r);
    let out = router_ok(&args, &data, "--out", &router);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("readings: 120 of 120 training prompts, 40 of 40 held out"),
        "{stderr}"
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&router).unwrap()).unwrap();
    assert_eq!(saved["probe"]["model"], SMOLLM2);
    assert_eq!(saved["probe"]["layer"], 10);
    let out = router_ok(
        &["eval", "--json", "--readings", r],
        &data,
        "--router",
        &router,
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &v["overall"];
    assert_eq!(o["prompts"], 40, "{v}");
    assert!(
        o["apgr"].as_f64().unwrap() > o["random_apgr"].as_f64().unwrap() + 0.05,
        "{v}"
    );
    // The band at the calibrated threshold, then where held cloud shares
    // put theirs.
    assert_eq!(v["reading_band"]["prompts"], 40, "{v}");
    assert!(v["reading_band"]["share"].is_null(), "{v}");
    let held: Vec<f64> = v["reading_band_held"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["share"].as_f64()).collect())
        .unwrap_or_default();
    assert_eq!(held, [0.2, 0.6], "{v}");
    let stdout = String::from_utf8_lossy(
        &router_ok(&["eval", "--readings", r], &data, "--router", &router).stdout,
    )
    .into_owned();
    assert!(
        stdout.contains("of a cloud share held at 60% (threshold"),
        "{stdout}"
    );

    // Readings by another model are refused, not silently used.
    let other = dir.path().join("other.readings.jsonl");
    std::fs::write(
        &other,
        text.replace(&format!("\"model\":\"{SMOLLM2}\""), "\"model\":\"another\""),
    )
    .unwrap();
    let out = router_run(
        &["eval", "--readings", other.to_str().unwrap()],
        &data,
        "--router",
        &router,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("probe reads"));

    // The last layer's readings (a pass of their own, a file of their own)
    // mean nothing to a probe of block 10.
    let last = dir.path().join("routing.readings.jsonl");
    assert!(read(&["--layer", "last"]).contains("160 prompts read"));
    let text = std::fs::read_to_string(&last).unwrap();
    assert!(text.lines().all(|l| !l.contains("\"layer\"")));
    let out = router_run(
        &["eval", "--readings", last.to_str().unwrap()],
        &data,
        "--router",
        &router,
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at block 10"));

    // Several blocks in one pass, each into its own file, resumed block by
    // block.
    let at = |l: u32| dir.path().join(format!("routing.l{l}.readings.jsonl"));
    assert!(read(&["--layer", "3", "--layer", "6", "--limit", "30"]).contains("30 prompts read"));
    assert!(read(&["--layer", "6", "--layer", "3", "--limit", "10"]).contains("10 prompts read"));
    assert!(read(&["--layer", "6"]).contains("120 prompts read"));
    for (l, n) in [(3, 40), (6, 160)] {
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(at(l))
            .unwrap()
            .lines()
            .map(|x| serde_json::from_str(x).unwrap())
            .collect();
        assert_eq!(lines.len(), n);
        assert!(
            lines
                .iter()
                .all(|v| v["layer"] == l && v["model"] == SMOLLM2)
        );
    }
    // A block the model does not have; a file of one layer taking
    // another's; one --out for several blocks; the last layer beside a
    // block; neither a number nor `last`.
    let l = last.to_str().unwrap();
    for (extra, says) in [
        (vec!["--layer", "999"], "no block 999"),
        (
            vec!["--layer", "3", "--out", l],
            "holds readings at the last layer",
        ),
        (
            vec!["--layer", "3", "--layer", "6", "--out", l],
            "--out names one file",
        ),
        (vec!["--layer", "last", "--layer", "3"], "a pass of its own"),
        (
            vec!["--layer", "middle"],
            "neither a block number nor `last`",
        ),
    ] {
        let out = tandem()
            .args(["router", "read", "--device", SMOLLM2, "--data"])
            .arg(&data)
            .args(&extra)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{extra:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}

/// `tandem router ARGS --data DATA FLAG PATH`.
fn router_run(
    args: &[&str],
    data: &std::path::Path,
    flag: &str,
    path: &std::path::Path,
) -> std::process::Output {
    tandem()
        .arg("router")
        .args(args)
        .arg("--data")
        .arg(data)
        .arg(flag)
        .arg(path)
        .output()
        .unwrap()
}

/// [`router_run`], which must succeed.
fn router_ok(
    args: &[&str],
    data: &std::path::Path,
    flag: &str,
    path: &std::path::Path,
) -> std::process::Output {
    let out = router_run(args, data, flag, path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn cache_clear_without_a_server_removes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("answers.jsonl");
    std::fs::write(&file, "{}\n").unwrap();
    let out = tandem()
        .args(["cache", "clear", "--url", "http://127.0.0.1:9", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!file.exists());
}

/// `tandem router label` against a cloud-role Tandem on loopback, through
/// an upstream that records every byte: the cost is shown before anything
/// is sent, an interrupted run resumes, personal data never leaves, and
/// `tandem router train` reads the labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_label_shows_the_cost_resumes_and_keeps_private_prompts() {
    use tandem_testkit::capture::{CaptureUpstream, Mode};
    use tandem_testkit::{QWEN_05B, TestServer, shared_engine};

    model_path(SMOLLM2);
    let cloud = tandem_router::Dispatcher::builder()
        .local(shared_engine(QWEN_05B, 1024, 1))
        .build()
        .unwrap();
    let server = TestServer::start(cloud).await;
    let upstream = CaptureUpstream::start(Some(server.url("/v1")), Mode::Forward).await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            "[local]\nmodels = [\"{SMOLLM2}\"]\n\n[router]\nprivacy = \"strict\"\n\n\
             [[upstreams]]\nname = \"cloud\"\nbase_url = \"{}\"\nmodels = [\"{QWEN_05B}\"]\n\
             price_input_per_mtok = 2.0\nprice_output_per_mtok = 8.0\n",
            upstream.base_url()
        ),
    )
    .unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let lines = [
        serde_json::json!({"id": "add", "prompt": "What is 17 + 25? Reply with only the number.", "answer": 42}),
        serde_json::json!({"id": "mul", "prompt": "What is 6 times 7? Reply with only the number.", "answer": "42"}),
        serde_json::json!({"id": "mars", "prompt": "Which planet is known as the Red Planet?\nA) Venus\nB) Mars\nC) Jupiter\nD) Saturn\nAnswer with the letter only.", "answer": "B"}),
        serde_json::json!({"id": "private", "prompt": "Write a short note to Hans Müller, Hauptstraße 5, 10115 Berlin (hans.mueller@example.de, +49 30 901820) confirming his appointment."}),
        serde_json::json!({"id": "sky", "prompt": "In one sentence, why is the sky blue?", "source": "chat"}),
    ];
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&prompts, text.join("\n") + "\n").unwrap();
    let labels = dir.path().join("labels.jsonl");
    let label_into = |out: &std::path::Path, extra: &[&str]| {
        let mut c = tandem();
        c.args(["router", "label", "--max-tokens", "32", "--prompts"])
            .arg(&prompts)
            .arg("--out")
            .arg(out)
            .arg("-c")
            .arg(&config)
            .args(extra)
            .stdin(Stdio::null());
        async move {
            tokio::task::spawn_blocking(move || c.output().unwrap())
                .await
                .unwrap()
        }
    };
    let label = |extra: &[&str]| label_into(&labels, extra);

    // No terminal to ask on and no --yes: the estimate, and nothing sent.
    let out = label(&[]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("4 answers and 1 judgements") && stdout.contains("at most $"),
        "{stdout}"
    );
    assert!(stdout.contains("1 prompts carry data"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert!(upstream.captured().is_empty());

    // Two now; an interrupted run leaves a torn last line.
    let out = label(&["--yes", "--limit", "2"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&labels)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"id\":\"mars\",\"sour").unwrap();
    drop(f);
    let out = label(&["--yes"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("(2 already labelled"), "{stdout}");

    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&labels)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["add", "mul", "mars", "sky"], "{rows:?}");
    for r in &rows {
        assert!(
            r["weak_correct"].is_boolean() && r["strong_correct"].is_boolean(),
            "{r}"
        );
        assert_eq!(r["device_model"], SMOLLM2);
        assert_eq!(r["cloud_model"], QWEN_05B);
        let method = if r["id"] == "sky" {
            "judged"
        } else {
            "checked"
        };
        assert_eq!(r["method"], method, "{r}");
    }
    // A checked label is what the answers say.
    let add = &rows[0];
    let last = |s: &str| {
        s.split(|c: char| !c.is_ascii_digit())
            .rfind(|w| !w.is_empty())
            .map(str::to_owned)
    };
    assert_eq!(
        add["strong_correct"].as_bool(),
        Some(last(add["cloud_answer"].as_str().unwrap()).as_deref() == Some("42")),
        "{add}"
    );
    assert_eq!(rows[3]["source"], "chat");

    // What reached the cloud: three answers, one answer and its judgement
    // (which quotes the device's answer); never the private prompt.
    let sent = upstream.captured();
    assert_eq!(sent.len(), 5, "{}", sent.len());
    let all = String::from_utf8_lossy(&upstream.all_bytes()).into_owned();
    for secret in ["Müller", "Hauptstra", "hans.mueller", "901820", "10115"] {
        assert!(!all.contains(secret), "{secret} left the device");
    }
    let judge = sent.last().unwrap().json();
    let judged = judge["messages"][0]["content"].as_str().unwrap();
    assert!(
        judged.contains(rows[3]["device_answer"].as_str().unwrap().trim()),
        "{judged}"
    );

    // --audit-judge: the checked prompts are judged too, and the report
    // sets the verdicts against the checks.
    let audited = dir.path().join("audited.jsonl");
    let out = label_into(&audited, &["--yes", "--limit", "3", "--audit-judge"]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 answers and 3 judgements"), "{stdout}");
    assert!(
        stdout.contains("judge audit, 3 checked prompts: the verdict matches the check in"),
        "{stdout}"
    );
    let audited: Vec<serde_json::Value> = std::fs::read_to_string(&audited)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(audited.len(), 3);
    for r in &audited {
        assert_eq!(r["method"], "checked", "{r}");
        assert!(r["judge"].is_boolean(), "{r}");
    }
    assert_eq!(upstream.captured().len(), 5 + 6);

    // `tandem router train` reads the labels as they are.
    let router = dir.path().join("router.json");
    let train = [
        "train",
        "--vectors",
        "encoder",
        "--k",
        "2",
        "--holdout",
        "0",
    ];
    router_ok(&train, &labels, "--out", &router);
    assert!(router.is_file());

    // A sample of traffic (`[router.sample]`) is a prompt file as it is:
    // no answers, so each is judged.
    let sampled = dir.path().join("traffic.prompts.jsonl");
    let sample = tandem_router::sample::TrafficSample::open(
        tandem_policy::sample::SampleConfig {
            enabled: true,
            rate: 1.0,
            ..Default::default()
        },
        sampled.clone(),
    )
    .unwrap();
    assert!(sample.offer("In one sentence, what is a rainbow?", false));
    assert!(sample.offer("Give me a word that rhymes with cat.", false));
    let mut c = tandem();
    c.args(["router", "label", "--prompts"])
        .arg(&sampled)
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null());
    let out = tokio::task::spawn_blocking(move || c.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 answers and 2 judgements"), "{stdout}");
    server.stop().await;
}

/// `tandem upstreams check` against an upstream that ignores every
/// constraint (it echoes the question) and one that is not there: the lines
/// to declare come out, and an upstream it could not ask fails the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_check_prints_what_to_declare() {
    use tandem_testkit::capture::{CaptureUpstream, Mode};
    let echo = CaptureUpstream::start(None, Mode::Echo).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            "[[upstreams]]\nname = \"echo\"\nbase_url = \"{}\"\nmodels = [\"m\"]\n\
             continuation = \"prefill\"\nlacks = [\"logit_bias\", \"json_object\"]\n\n\
             [[upstreams]]\nname = \"gone\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = [\"m\"]\nmax_retries = 0\n",
            echo.base_url()
        ),
    )
    .unwrap();
    let run = |extra: &'static [&'static str]| {
        let config = config.clone();
        tokio::task::spawn_blocking(move || {
            tandem()
                .args(["upstreams", "check", "-c"])
                .arg(&config)
                .args(extra)
                .env("TANDEM_HOME", config.parent().unwrap())
                .output()
                .unwrap()
        })
    };
    let out = run(&["--name", "echo"]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // What it found, keeping the declared `logit_bias` no probe asks
    // about, and where that differs from the configuration.
    assert!(text.contains("constraint_fields = []\n"), "{text}");
    assert!(
        text.contains(
            r#"lacks = ["logit_bias", "json_schema", "json_object"]   # configured: ["logit_bias", "json_object"]"#
        ),
        "{text}"
    );
    assert!(text.contains("IGNORED"), "{text}");
    assert!(
        text.contains(r#"continuation = "none"   # configured: "prefill""#),
        "{text}"
    );

    let out = run(&[]).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("could not ask it"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("could not ask gone"));
}
