//! Loading what a benchmark measures, the way `tandem serve` loads it.

use std::sync::Arc;

use anyhow::Context;
use tandem_embed::Embedder;
use tandem_engine::{EngineConfig, EngineOptions, LocalEngine};

/// The embedding model the router and the cache read.
pub const EMBEDDER: &str = "all-minilm-l6-v2";

/// A catalog model (pulled if missing) or a GGUF path, loaded.
pub async fn load_engine(model: &str, opts: &EngineOptions) -> anyhow::Result<LocalEngine> {
    let r = tandem_catalog::resolve(model).await?;
    let cfg = EngineConfig::new(r.id, r.path)
        .with_preset(r.sampling, r.system)
        .with_options(opts);
    Ok(tokio::task::spawn_blocking(move || LocalEngine::load(cfg)).await??)
}

/// The router at `path` with what it reads prompts through (its static
/// table, with the tokenizer of the encoder it was trained with, pulled if
/// missing; or `embedder`).
pub async fn load_router(
    path: &std::path::Path,
    embedder: &Embedder,
) -> anyhow::Result<tandem_router::learned::LoadedRouter> {
    use tandem_router::learned::LoadedRouter;
    let encoder = LoadedRouter::encoder_of(path).map_err(anyhow::Error::msg)?;
    let tokenizer = tandem_catalog::resolve(&encoder)
        .await?
        .path
        .parent()
        .map(|d| d.join("tokenizer.json"))
        .context("model folder")?;
    LoadedRouter::load(path, &tokenizer, Some(embedder)).map_err(anyhow::Error::msg)
}

/// The embedding model, pulled if missing.
pub async fn load_embedder() -> anyhow::Result<Arc<Embedder>> {
    let r = tandem_catalog::resolve(EMBEDDER).await?;
    let dir = r.path.parent().context("model folder")?.to_path_buf();
    Ok(Arc::new(
        tokio::task::spawn_blocking(move || Embedder::load(&dir)).await??,
    ))
}

/// The personal-data recognizer, pulled if missing, computing at
/// `precision` (`tandem serve` uses `Int8`).
pub async fn load_classifier(
    precision: tandem_embed::Precision,
) -> anyhow::Result<tandem_embed::TokenClassifier> {
    let r = tandem_catalog::resolve("rampart-pii").await?;
    let dir = r.path.parent().context("model folder")?.to_path_buf();
    Ok(tokio::task::spawn_blocking(move || {
        tandem_embed::TokenClassifier::load_with(&dir, precision)
    })
    .await??)
}
