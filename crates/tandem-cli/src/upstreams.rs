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
        let s = probe::suggested(&findings);
        println!("  declare it with:");
        println!("    constraint_fields = {:?}", s.constraint_fields);
        let name = |v: serde_json::Result<serde_json::Value>| {
            v.ok().and_then(|v| v.as_str().map(str::to_owned))
        };
        let lacks: Vec<String> = s
            .lacks
            .iter()
            .filter_map(|f| name(serde_json::to_value(f)))
            .collect();
        println!("    lacks = {lacks:?}");
        if let Some(c) = name(serde_json::to_value(s.continuation)) {
            println!("    continuation = {c:?}");
        }
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
