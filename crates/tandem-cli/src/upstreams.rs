//! `tandem upstreams check`: asks each configured upstream which fields
//! that constrain an answer it applies, and prints the configuration lines
//! that declare it.

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use tandem_backends::CloudBackend;
use tandem_backends::probe::{self, Verdict};

#[derive(Subcommand)]
pub enum UpstreamsCommand {
    /// Probe each upstream (or one) with fixed questions under each
    /// constraint field and `response_format`, and say what it applied,
    /// ignored or refused. Sends nothing but the probes' own texts.
    Check(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// Configuration file (default: $TANDEM_CONFIG, or $TANDEM_HOME/tandem.toml).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Only this upstream (its `name`).
    #[arg(long)]
    pub name: Option<String>,
    /// The model to ask (default: the upstream's default model).
    #[arg(long)]
    pub model: Option<String>,
}

pub async fn run(cmd: UpstreamsCommand) -> anyhow::Result<()> {
    let UpstreamsCommand::Check(a) = cmd;
    let (cfg, _) = crate::config::load(a.config.as_deref())?;
    let chosen: Vec<_> = cfg
        .upstreams
        .into_iter()
        .filter(|u| a.name.as_ref().is_none_or(|n| *n == u.name))
        .collect();
    if chosen.is_empty() {
        bail!(
            "no upstream {}in the configuration",
            a.name.map_or_else(String::new, |n| format!("named `{n}` "))
        );
    }
    let mut unasked = Vec::new();
    for u in chosen {
        let name = u.name.clone();
        let model = a
            .model
            .clone()
            .or_else(|| u.default_model.clone())
            .or_else(|| u.models.first().cloned())
            .unwrap_or_default();
        let backend = CloudBackend::new(u).map_err(anyhow::Error::msg)?;
        println!("[[upstreams]] {name}, model {model}:");
        let findings = match probe::constraints(&backend, &model).await {
            Ok(f) => f,
            Err(e) => {
                println!("  could not ask it: {e}");
                unasked.push(name);
                continue;
            }
        };
        for f in &findings {
            let what = match &f.verdict {
                Verdict::Applied => "applied".to_owned(),
                Verdict::Ignored(t) => format!("IGNORED: answered {:?}", clip(t)),
                Verdict::Refused(e) => format!("refused: {}", clip(e)),
                Verdict::Unsure(t) => format!("UNSURE: cut by max_tokens at {:?}", clip(t)),
            };
            let field = match f.feature {
                tandem_api::Feature::Continuation => "continuation",
                other => other.param(),
            };
            println!("  {field:<19} {:<44} {what}", f.feature.describe());
        }
        let configured = backend.config();
        let s = probe::suggested(&findings, &configured.lacks);
        println!("  declare it with (a line marked # differs from the configuration):");
        // Lists are compared as sets: their order means nothing.
        let line = |key: &str, found: Vec<String>, now: Vec<String>, list: bool| {
            let show = |v: &[String]| match (list, v) {
                (false, [one]) => format!("{one:?}"),
                _ => format!("{v:?}"),
            };
            let sorted = |v: &[String]| {
                let mut v = v.to_vec();
                v.sort();
                v
            };
            let mark = if sorted(&found) == sorted(&now) {
                String::new()
            } else {
                format!("   # configured: {}", show(&now))
            };
            println!("    {key} = {}{mark}", show(&found));
        };
        let names = |v: Vec<serde_json::Result<serde_json::Value>>| -> Vec<String> {
            v.into_iter()
                .filter_map(Result::ok)
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        };
        let features =
            |fs: &[tandem_api::Feature]| names(fs.iter().map(serde_json::to_value).collect());
        line(
            "constraint_fields",
            s.constraint_fields
                .iter()
                .map(|f| (*f).to_owned())
                .collect(),
            configured.constraint_fields.clone(),
            true,
        );
        line(
            "lacks",
            features(&s.lacks),
            features(&configured.lacks),
            true,
        );
        line(
            "continuation",
            names(vec![serde_json::to_value(s.continuation)]),
            names(vec![serde_json::to_value(configured.continuation)]),
            false,
        );
        if findings
            .iter()
            .any(|f| matches!(f.verdict, Verdict::Unsure(_)))
        {
            println!("  (an UNSURE line is neither: try it by hand with a larger max_tokens)");
        }
    }
    if !unasked.is_empty() {
        bail!("could not ask {}", unasked.join(", "));
    }
    Ok(())
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(60).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}
