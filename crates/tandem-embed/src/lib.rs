//! Sentence embeddings on the device: all-MiniLM-L6-v2 (a 6-layer BERT)
//! run with candle, tokenized with Hugging Face's `tokenizers`, mean-pooled
//! over real tokens and L2-normalised — the recipe sentence-transformers
//! uses, so vectors match the reference model.
//!
//! The model's `tokenizer.json` pads every input to 128 tokens; padding is
//! switched off here and batches are padded by hand with an attention mask,
//! or every embedding would drift towards the padding's.
//!
//! Not here: what embeddings are used for (routing, caching: the router).

#![warn(missing_docs)]

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;

/// Why embedding failed.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model could not be loaded.
    #[error("embedding model: {0}")]
    Load(String),
    /// A forward pass failed.
    #[error("embedding failed: {0}")]
    Run(String),
}

fn run_err(e: impl std::fmt::Display) -> EmbedError {
    EmbedError::Run(e.to_string())
}

/// A loaded sentence embedder.
pub struct Embedder {
    model: BertModel,
    tokenizer: Tokenizer,
    device: Device,
    dim: usize,
    max_tokens: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

/// Threads the CPU kernels use (`RAYON_NUM_THREADS`, else every core).
pub fn threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Embedder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Embedder, EmbedError> {
        let load = |e: &dyn std::fmt::Display| EmbedError::Load(format!("{}: {e}", dir.display()));
        let config: Config = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).map_err(|e| load(&e))?,
        )
        .map_err(|e| load(&e))?;
        let mut tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load(&e))?;
        tokenizer.with_padding(None);
        // The model was trained on at most 256 word pieces per sentence.
        let max_tokens = 256;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| load(&e))?;
        let device = Device::Cpu;
        // SAFETY: the file is memory-mapped read-only; the catalog wrote it
        // once under its final name and never changes it afterwards.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &device,
            )
        }
        .map_err(|e| load(&e))?;
        let model = BertModel::load(vb, &config).map_err(|e| load(&e))?;
        Ok(Embedder {
            model,
            tokenizer,
            device,
            dim: config.hidden_size,
            max_tokens,
        })
    }

    /// Dimensions of its vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Word pieces `text` becomes (after truncation).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.len())
            .unwrap_or(0)
    }

    /// One text's vector.
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        self.embed(&[text])?
            .pop()
            .ok_or_else(|| EmbedError::Run("no output".into()))
    }

    /// One L2-normalised vector per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(run_err)?;
        let len = encodings
            .iter()
            .map(|e| e.len())
            .max()
            .unwrap_or(1)
            .clamp(1, self.max_tokens);
        let n = encodings.len();
        let (mut ids, mut types, mut mask) = (
            Vec::with_capacity(n * len),
            Vec::with_capacity(n * len),
            Vec::with_capacity(n * len),
        );
        for e in &encodings {
            let k = e.len().min(len);
            ids.extend(e.get_ids()[..k].iter().copied());
            types.extend(e.get_type_ids()[..k].iter().copied());
            mask.extend(std::iter::repeat_n(1u32, k));
            ids.extend(std::iter::repeat_n(0u32, len - k));
            types.extend(std::iter::repeat_n(0u32, len - k));
            mask.extend(std::iter::repeat_n(0u32, len - k));
        }
        let t = |v: Vec<u32>| Tensor::from_vec(v, (n, len), &self.device).map_err(run_err);
        let (ids, types, mask) = (t(ids)?, t(types)?, t(mask)?);
        let hidden = self
            .model
            .forward(&ids, &types, Some(&mask))
            .map_err(run_err)?;
        // Mean over real tokens only.
        let m = mask
            .to_dtype(DType::F32)
            .and_then(|m| m.unsqueeze(2))
            .map_err(run_err)?;
        let summed = hidden
            .broadcast_mul(&m)
            .and_then(|x| x.sum(1))
            .map_err(run_err)?;
        let counts = m
            .sum(1)
            .and_then(|c| c.clamp(1e-9, f64::MAX))
            .map_err(run_err)?;
        let mean = summed.broadcast_div(&counts).map_err(run_err)?;
        let norm = mean
            .sqr()
            .and_then(|s| s.sum_keepdim(1))
            .and_then(|s| s.sqrt())
            .and_then(|s| s.clamp(1e-12, f64::MAX))
            .map_err(run_err)?;
        let unit = mean.broadcast_div(&norm).map_err(run_err)?;
        unit.to_vec2::<f32>().map_err(run_err)
    }
}
