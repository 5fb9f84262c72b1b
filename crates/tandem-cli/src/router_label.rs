//! `tandem router label`: labels for the learned router from the device
//! and cloud models this configuration deploys, in the format
//! `tandem router train` reads.
//!
//! It shows what the run will cost before it starts, appends one line per
//! prompt (so an interrupted run resumes where it stopped), and sends
//! nothing the privacy policy keeps on the device.

use std::collections::HashSet;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use serde::Deserialize;
use tandem_api::Backend;
use tandem_policy::PrivacyMode;
use tandem_router::label::{Item, Labeler, Method, Outcome, Reference};
use tandem_router::{Dispatcher, RequestContext};

use crate::{DeviceArgs, EngineArgs};

/// `tandem router label`'s options.
#[derive(Args)]
pub struct LabelArgs {
    /// JSONL prompts: `prompt`, and optionally `id`, `source`, `subject` and
    /// `answer` (a number or a choice letter: both answers are checked
    /// against it; without one, the cloud model judges the device's answer).
    #[arg(long)]
    pub prompts: PathBuf,
    /// The labels file, appended to: a second run resumes where the first
    /// stopped (default: the prompts file's name with `.labels.jsonl`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The cloud model (default: the first upstream's first model).
    #[arg(long)]
    pub cloud: Option<String>,
    /// Longest answer asked of either model, in tokens.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: u32,
    /// Privacy mode of every call (default: the configuration's).
    #[arg(long, value_parser = parse_privacy)]
    pub privacy: Option<PrivacyMode>,
    /// Label at most this many prompts in this run.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Start without asking (needed when there is no terminal to ask on).
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Ask the cloud model to judge prompts that have an `answer` too, and
    /// report how often its verdicts agree with the checks: how far to
    /// trust the labels of prompts without one. One more cloud call each.
    #[arg(long)]
    pub audit_judge: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

fn parse_privacy(s: &str) -> Result<PrivacyMode, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| format!("`{s}` is not a privacy mode (off, redact, strict)"))
}

#[derive(Deserialize)]
struct PromptLine {
    #[serde(default)]
    id: Option<String>,
    prompt: String,
    #[serde(default)]
    answer: Option<serde_json::Value>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    subject: Option<String>,
}

struct Prompt {
    id: String,
    source: String,
    subject: Option<String>,
    item: Item,
}

fn read_prompts(path: &Path) -> anyhow::Result<Vec<Prompt>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("{} line {}", path.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let p: PromptLine = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), i + 1))?;
        let id = p.id.unwrap_or_else(|| format!("line-{}", i + 1));
        if !seen.insert(id.clone()) {
            bail!(
                "{} line {}: the id `{id}` is used twice",
                path.display(),
                i + 1
            );
        }
        out.push(Prompt {
            id,
            source: p.source.unwrap_or_else(|| "labels".into()),
            subject: p.subject,
            item: Item {
                reference: p.answer.as_ref().and_then(Reference::parse),
                prompt: p.prompt,
            },
        });
    }
    Ok(out)
}

/// What an earlier run labelled.
#[derive(Default)]
struct Done {
    ids: HashSet<String>,
    /// The (device, cloud) model pairs the labels came from.
    pairs: HashSet<(String, String)>,
}

/// The ids already labelled. A last line cut short by an interrupted run
/// is dropped from the file so that the run appends after whole lines.
fn done(path: &Path) -> anyhow::Result<Done> {
    #[derive(Deserialize)]
    struct Line {
        id: String,
        #[serde(default)]
        device_model: String,
        #[serde(default)]
        cloud_model: String,
    }
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(Done::default());
    };
    let mut done = Done::default();
    let mut whole = 0;
    for (i, line) in bytes.split_inclusive(|&b| b == b'\n').enumerate() {
        if !line.ends_with(b"\n") {
            break;
        }
        match serde_json::from_slice::<Line>(line) {
            Ok(d) => {
                done.ids.insert(d.id);
                done.pairs.insert((d.device_model, d.cloud_model));
                whole += line.len();
            }
            Err(e) => bail!("{} line {}: {e}", path.display(), i + 1),
        }
    }
    if whole < bytes.len() {
        eprintln!(
            "{}: dropping a line cut short by an interrupted run",
            path.display()
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(whole as u64)?;
    }
    Ok(done)
}

fn backend_serving<'a>(d: &'a Dispatcher, model: &str) -> Option<&'a Arc<dyn Backend>> {
    d.clouds()
        .iter()
        .find(|c| c.models().iter().any(|m| m.id == model))
}

/// What the run will send, estimated before it starts.
struct Estimate {
    prompts: usize,
    judged: usize,
    kept_local: usize,
    input_tokens: u64,
    output_tokens: u64,
}

fn estimate(
    d: &Dispatcher,
    labeler: &Labeler,
    cloud: &str,
    todo: &[&Prompt],
    ctx: &RequestContext,
) -> Estimate {
    let local = d.locals().first();
    let mut e = Estimate {
        prompts: 0,
        judged: 0,
        kept_local: 0,
        input_tokens: 0,
        output_tokens: 0,
    };
    for p in todo {
        let req = labeler.request(cloud, &p.item.prompt, labeler.max_tokens);
        let refused = match d.explain(&req, ctx) {
            Ok(x) => x.refusal.is_some(),
            Err(e) => e.status == 403,
        };
        if refused {
            e.kept_local += 1;
            continue;
        }
        // The device's tokenizer stands in for the cloud's.
        let tokens = local
            .and_then(|l| l.count_prompt_tokens(&req))
            .map_or(p.item.prompt.len() as u64 / 3 + 16, u64::from);
        e.prompts += 1;
        e.input_tokens += tokens;
        e.output_tokens += u64::from(labeler.max_tokens);
        if p.item.reference.is_none() || labeler.audit_judge {
            // The judge reads the prompt and both answers, writes a word.
            e.judged += 1;
            e.input_tokens += tokens + 2 * u64::from(labeler.max_tokens) + 64;
            e.output_tokens += 4;
        }
    }
    e
}

/// `--audit-judge`: the judge's verdicts against the checks, by case.
#[derive(Default)]
struct Audit {
    /// `[device right][cloud right]` → (verdicts "as good", verdicts).
    cases: [[(usize, usize); 2]; 2],
}

impl Audit {
    fn add(&mut self, weak: bool, strong: bool, as_good: bool) {
        let c = &mut self.cases[usize::from(weak)][usize::from(strong)];
        c.0 += usize::from(as_good);
        c.1 += 1;
    }

    fn report(&self) {
        let [[ww, wr], [rw, rr]] = self.cases;
        let total = ww.1 + wr.1 + rw.1 + rr.1;
        if total == 0 {
            println!("judge audit: no checked prompt was judged");
            return;
        }
        // Judged, a label is right when the judge calls the device as good
        // exactly when it is right; where the cloud is wrong too, its
        // answer is no reference, and "worse" turns a tie into a gain.
        let agree = rr.0 + (wr.1 - wr.0) + rw.0 + (ww.1 - ww.0);
        println!(
            "judge audit, {total} checked prompts: the verdict matches the check in {agree} ({:.1}%)",
            100.0 * agree as f64 / total as f64
        );
        println!(
            "  cloud right: device right, called as good {} of {}; device wrong, called worse {} of {}",
            rr.0,
            rr.1,
            wr.1 - wr.0,
            wr.1
        );
        println!(
            "  cloud wrong: device right, called as good {} of {}; both wrong, called worse {} of {} (judged, these would be labelled gains)",
            rw.0,
            rw.1,
            ww.1 - ww.0,
            ww.1
        );
    }
}

fn confirm() -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("no terminal to ask on: pass --yes to start");
    }
    eprint!("Start? [y/N] ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

pub async fn run(a: LabelArgs) -> anyhow::Result<()> {
    let (mut cfg, device) = a.device.load()?;
    if cfg.upstreams.is_empty() {
        bail!("labels compare the device with the cloud: configure an [[upstreams]] entry");
    }
    cfg.local.enabled = true;
    cfg.local.models = vec![device];
    // Each label must come from a model: no cached answer, no cascade or
    // speculative decoding blending the two sides.
    cfg.cache.enabled = false;
    cfg.router.cascade = false;
    cfg.speculative.default = false;
    // The answers would not be used to route: no embedder needed.
    cfg.embeddings.enabled = false;
    cfg.embeddings.router = None;

    let prompts = read_prompts(&a.prompts)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = a
            .prompts
            .file_stem()
            .map_or_else(|| "prompts".into(), |s| s.to_string_lossy().into_owned());
        a.prompts.with_file_name(format!("{stem}.labels.jsonl"))
    });
    let done = done(&out)?;
    let mut todo: Vec<&Prompt> = prompts
        .iter()
        .filter(|p| !done.ids.contains(&p.id))
        .collect();
    if let Some(n) = a.limit {
        todo.truncate(n);
    }
    if todo.is_empty() {
        println!(
            "every prompt of {} is labelled in {}",
            a.prompts.display(),
            out.display()
        );
        return Ok(());
    }

    let engine = crate::serve::engine_args(&a.engine, &cfg)?;
    let d = crate::serve::build_dispatcher(&cfg, &engine).await?;
    let device = d
        .locals()
        .first()
        .map(|l| l.model_for(""))
        .context("no local model")?;
    let cloud = match &a.cloud {
        Some(c) => c.clone(),
        None => d
            .clouds()
            .first()
            .and_then(|c| c.models().first().map(|m| m.id.clone()))
            .context("the first upstream lists no model: pass --cloud")?,
    };
    let Some(upstream) = backend_serving(&d, &cloud) else {
        bail!("no configured upstream serves `{cloud}`");
    };
    // One file, one pair: labels of other models would train the router
    // on strengths that are not this deployment's.
    if let Some((dev, cl)) = done
        .pairs
        .iter()
        .find(|(dev, cl)| dev != &device || cl != &cloud)
    {
        bail!(
            "{} holds labels of `{dev}` against `{cl}`, not `{device}` against `{cloud}`: choose another --out",
            out.display()
        );
    }
    let mut labeler = Labeler::new(d.clone(), &device, &cloud);
    labeler.max_tokens = a.max_tokens;
    labeler.privacy = a.privacy;
    labeler.audit_judge = a.audit_judge;
    let ctx = RequestContext {
        privacy: a.privacy,
        ..RequestContext::default()
    };

    let est = estimate(&d, &labeler, &cloud, &todo, &ctx);
    let price = upstream.price();
    let cost =
        |i: u64, o: u64| (i as f64 * price.input_per_mtok + o as f64 * price.output_per_mtok) / 1e6;
    println!(
        "labelling {} prompts of {} ({} already labelled in {}): device `{device}`, cloud `{cloud}` on upstream `{}`",
        todo.len(),
        a.prompts.display(),
        done.ids.len(),
        out.display(),
        upstream.name()
    );
    println!(
        "sent to the cloud: {} answers and {} judgements, about {} prompt tokens and at most {} answer tokens: at most ${:.4} at ${}/${} per million tokens",
        est.prompts,
        est.judged,
        est.input_tokens,
        est.output_tokens,
        cost(est.input_tokens, est.output_tokens),
        price.input_per_mtok,
        price.output_per_mtok
    );
    if est.kept_local > 0 {
        println!(
            "{} prompts carry data the privacy policy keeps on the device: they are not sent and get no label",
            est.kept_local
        );
    }
    if !a.yes && !confirm()? {
        println!("nothing sent");
        return Ok(());
    }

    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&out)
        .with_context(|| format!("opening {}", out.display()))?;
    let (mut labelled, mut checked, mut weak_right, mut strong_right) = (0usize, 0usize, 0, 0);
    let (mut kept, mut unjudged) = (0usize, 0usize);
    let (mut sent_in, mut sent_out) = (0u64, 0u64);
    let mut audit = Audit::default();
    for (i, p) in todo.iter().enumerate() {
        let outcome = labeler.label(&p.item).await.map_err(|e| {
            anyhow::anyhow!(
                "prompt `{}`: {} ({} labelled so far are kept in {}; run again to resume)",
                p.id,
                e.message,
                labelled,
                out.display()
            )
        })?;
        let shown = match &outcome {
            Outcome::Labeled(l) => {
                labelled += 1;
                checked += usize::from(l.method == Method::Checked);
                weak_right += usize::from(l.weak_correct);
                strong_right += usize::from(l.strong_correct);
                sent_in += l.cloud_tokens.0;
                sent_out += l.cloud_tokens.1;
                let mut row = serde_json::json!({
                    "id": p.id,
                    "source": p.source,
                    "prompt": p.item.prompt,
                    "weak_correct": l.weak_correct,
                    "strong_correct": l.strong_correct,
                    "method": l.method,
                    "device_model": device,
                    "cloud_model": cloud,
                    "device_answer": l.device_answer,
                    "cloud_answer": l.cloud_answer,
                });
                if let Some(s) = &p.subject {
                    row["subject"] = s.clone().into();
                }
                if let Some(v) = l.judge_too {
                    row["judge"] = v.into();
                    audit.add(l.weak_correct, l.strong_correct, v);
                }
                let mut line = serde_json::to_vec(&row)?;
                line.push(b'\n');
                // One write per line, on disk before the next prompt: an
                // interruption loses at most the prompt in flight.
                file.write_all(&line)?;
                file.sync_data()?;
                format!(
                    "device {} cloud {} ({})",
                    if l.weak_correct { "right" } else { "wrong" },
                    if l.strong_correct { "right" } else { "wrong" },
                    match l.method {
                        Method::Checked => "checked",
                        Method::Judged => "judged",
                    }
                )
            }
            Outcome::KeptLocal(_) => {
                kept += 1;
                "kept on the device by the privacy policy: not labelled".into()
            }
            Outcome::Unjudged(why) => {
                unjudged += 1;
                format!("not labelled: {why}")
            }
        };
        eprintln!("[{}/{}] {}: {shown}", i + 1, todo.len(), p.id);
    }
    let pct = |n: usize| 100.0 * n as f64 / labelled.max(1) as f64;
    println!(
        "{labelled} labelled ({checked} checked, {} judged): device right {:.1}%, cloud right {:.1}%",
        labelled - checked,
        pct(weak_right),
        pct(strong_right)
    );
    if kept + unjudged > 0 {
        println!("{kept} kept on the device by the privacy policy, {unjudged} without a verdict");
    }
    if a.audit_judge {
        audit.report();
    }
    println!(
        "the cloud read {sent_in} and wrote {sent_out} tokens: ${:.4}",
        cost(sent_in, sent_out)
    );
    println!(
        "labels in {}; train with: tandem router train --data {}",
        out.display(),
        out.display()
    );
    Ok(())
}
