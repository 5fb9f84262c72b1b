//! The learned router as requests meet it: a router file, the vectors its
//! prompts are read through, and the scorer the policy consults.
//!
//! A router trained on a static table ([`tandem_embed::StaticEmbedder`],
//! stored beside the router file and pinned by its SHA-256) embeds a prompt
//! in microseconds, on the request's own thread; one trained on the
//! sentence encoder's vectors shares the dispatcher's embedder and its
//! blocking pool.

use std::path::Path;
use std::sync::Arc;

use tandem_embed::{Embedder, StaticEmbedder};
use tandem_policy::Scorer;
use tandem_policy::learned::{LearnedScorer, RouterModel};

/// What the learned router reads a prompt through.
#[derive(Clone)]
pub enum RouterInput {
    /// The dispatcher's sentence embedder.
    Embedder,
    /// The router's own static table.
    Static(Arc<StaticEmbedder>),
}

impl std::fmt::Debug for RouterInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Embedder => f.write_str("Embedder"),
            Self::Static(s) => write!(f, "Static({})", s.dim()),
        }
    }
}

/// A router read from disk with what it embeds prompts with.
pub struct LoadedRouter {
    /// The scorer.
    pub scorer: LearnedScorer,
    /// Its input.
    pub input: RouterInput,
}

impl LoadedRouter {
    /// The catalog name of the encoder the router at `path` was trained
    /// with (whose tokenizer its table needs).
    pub fn encoder_of(path: &Path) -> Result<String, String> {
        #[derive(serde::Deserialize)]
        struct Head {
            embedder: String,
        }
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        serde_json::from_slice::<Head>(&bytes)
            .map(|h| h.embedder)
            .map_err(|e| format!("{} is not a router file: {e}", path.display()))
    }

    /// Reads the router at `path`. `tokenizer` is the sentence encoder's
    /// `tokenizer.json` (a static table is indexed by its word pieces);
    /// `shared` the dispatcher's embedder, which a router without a table
    /// needs.
    pub fn load(
        path: &Path,
        tokenizer: &Path,
        shared: Option<&Embedder>,
    ) -> Result<LoadedRouter, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let model: RouterModel = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is not a router file: {e}", path.display()))?;
        match &model.vectors {
            Some(v) => {
                let file = path
                    .parent()
                    .unwrap_or_else(|| Path::new("."))
                    .join(Path::new(&v.file).file_name().unwrap_or_default());
                let table = std::fs::read(&file)
                    .map_err(|e| format!("reading the router's table {}: {e}", file.display()))?;
                let hash = tandem_ledger::sha256_hex(&table);
                if hash != v.sha256 {
                    return Err(format!(
                        "{} is not the table {} was trained with (SHA-256 {hash}, expected {}): train the router again",
                        file.display(),
                        path.display(),
                        v.sha256
                    ));
                }
                let table = StaticEmbedder::from_bytes(&table, tokenizer)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                Ok(LoadedRouter {
                    scorer: LearnedScorer::new(model, table.dim())?,
                    input: RouterInput::Static(Arc::new(table)),
                })
            }
            None => {
                let e = shared.ok_or_else(|| {
                    format!(
                        "{} reads prompts through {}, which is not loaded: enable [embeddings] or train the router again (tandem router train)",
                        path.display(),
                        model.embedder
                    )
                })?;
                Ok(LoadedRouter {
                    scorer: LearnedScorer::new(model, e.dim())?,
                    input: RouterInput::Embedder,
                })
            }
        }
    }

    /// Scores `text` when the router has its own table (`None`: it needs
    /// the shared embedder's vector, see [`Scorer::score`]).
    pub fn score_static(&self, text: &str) -> Option<Result<f32, String>> {
        match &self.input {
            RouterInput::Static(t) => Some(
                t.embed_one(text)
                    .map(|v| self.scorer.score(&v, text))
                    .map_err(|e| e.to_string()),
            ),
            RouterInput::Embedder => None,
        }
    }
}
