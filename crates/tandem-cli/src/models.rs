//! `tandem pull`, `tandem models`, and finding a model's file for the other
//! commands.

use anyhow::{Context, bail};
use clap::Args;
use tandem_catalog::{Catalog, PullOptions, parse_reference};
use tandem_engine::{EngineConfig, LocalEngine};

use crate::EngineArgs;

#[derive(Args)]
pub struct PullArgs {
    /// Catalog name, hf:owner/repo/file.gguf, https://... or a local path.
    pub model: String,
    /// Expected sha256 for a reference outside the catalog.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Re-hash files that are already present.
    #[arg(long)]
    pub verify: bool,
}

#[derive(Args)]
pub struct ModelsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A catalog model (pulled if missing) or a GGUF path, loaded with the
/// catalog's settings and the user's.
pub async fn load_engine(model: &str, args: &EngineArgs) -> anyhow::Result<LocalEngine> {
    let r = tandem_catalog::resolve(model).await?;
    let cfg = EngineConfig::new(r.id, r.path)
        .with_preset(r.sampling, r.system)
        .with_options(&args.options());
    Ok(tokio::task::spawn_blocking(move || LocalEngine::load(cfg)).await??)
}

pub async fn pull(args: PullArgs) -> anyhow::Result<()> {
    let mut catalog = Catalog::load(None)?;
    let opts = PullOptions {
        verify_existing: args.verify,
        ..PullOptions::default()
    };
    if catalog.get(&args.model).is_ok() {
        let path = catalog.pull(&args.model, &opts).await?;
        println!("{} is ready at {}", args.model, path.display());
        return Ok(());
    }
    let Some(mut entry) = parse_reference(&args.model, args.sha256.as_deref()) else {
        bail!(
            "`{}` is neither a catalog model nor a reference (hf:owner/repo/file, https://..., or a file path); `tandem models` lists the catalog",
            args.model
        );
    };
    let hashes = catalog.pull_entry(&entry, &opts).await?;
    if entry.files[0].sha256.is_none() {
        eprintln!(
            "note: no --sha256 given; recorded {} so later pulls are checked against it",
            hashes[0]
        );
        entry.files[0].sha256 = Some(hashes[0].clone());
    }
    let name = entry.name.clone();
    let path = catalog.main_file(&entry);
    catalog
        .add_user_entry(entry)
        .context("recording the model in the catalog")?;
    println!("{name} is ready at {}", path.display());
    println!("serve it with: tandem serve --model {name}");
    Ok(())
}

fn human(bytes: Option<u64>) -> String {
    match bytes {
        None => "-".into(),
        Some(b) if b >= 1 << 30 => format!("{:.2} GB", b as f64 / f64::from(1u32 << 30)),
        Some(b) => format!("{:.0} MB", b as f64 / f64::from(1u32 << 20)),
    }
}

pub fn list(args: ModelsArgs) -> anyhow::Result<()> {
    let catalog = Catalog::load(None)?;
    let rows: Vec<_> = catalog
        .entries()
        .iter()
        .map(|e| {
            let installed = catalog.is_installed(e);
            let size: Option<u64> = if installed {
                let dir = catalog.model_dir(e);
                Some(
                    e.files
                        .iter()
                        .filter_map(|f| std::fs::metadata(dir.join(&f.name)).ok())
                        .map(|m| m.len())
                        .sum(),
                )
            } else {
                e.files.iter().map(|f| f.size).sum()
            };
            (e, installed, size)
        })
        .collect();
    if args.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(e, installed, size)| {
                serde_json::json!({
                    "name": e.name, "kind": e.kind, "installed": installed, "size": size,
                    "description": e.description,
                    "path": installed.then(|| catalog.main_file(e)),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{:<30} {:<11} {:>9}  {:<9}  DESCRIPTION",
        "NAME", "KIND", "SIZE", "INSTALLED"
    );
    for (e, installed, size) in rows {
        println!(
            "{:<30} {:<11} {:>9}  {:<9}  {}",
            e.name,
            format!("{:?}", e.kind).to_lowercase(),
            human(size),
            if installed { "yes" } else { "no" },
            e.description
        );
    }
    println!(
        "\nmodels live in {}",
        catalog.home().join("models").display()
    );
    Ok(())
}
