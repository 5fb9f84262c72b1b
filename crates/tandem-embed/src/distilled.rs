//! Static sentence vectors distilled from a sentence encoder, as model2vec
//! makes them: every word piece of the vocabulary is run through the
//! encoder once, on its own, and a sentence is the weighted mean of its
//! pieces' vectors. No transformer runs per sentence: embedding a
//! 128-piece prompt is tokenizing it and adding 128 rows, microseconds
//! instead of the encoder's tens of milliseconds.
//!
//! A table built this way ([`Embedder::token_table`]) lives in another
//! space than the encoder's sentence vectors (one word alone is not a
//! sentence); the trainer maps it onto them with a linear map fitted on
//! real prompts and folds the map into the table (a mean of mapped rows is
//! the map of the mean), so what is stored is ready to use.
//!
//! Stored as safetensors: `table` (i8, vocab × dim), `scales` (f32, one a
//! row), `weights` (f32, each piece's weight in the mean) and `bias` (f32,
//! dim; added after the mean).

use std::path::Path;

use tokenizers::Tokenizer;

use crate::{EmbedError, Embedder, load_tokenizer};

/// A loaded static embedder.
pub struct StaticEmbedder {
    tokenizer: Tokenizer,
    dim: usize,
    table: Vec<i8>,
    scales: Vec<f32>,
    weights: Vec<f32>,
    bias: Vec<f32>,
}

impl std::fmt::Debug for StaticEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticEmbedder")
            .field("dim", &self.dim)
            .field("vocab", &self.scales.len())
            .finish_non_exhaustive()
    }
}

impl Embedder {
    /// One word piece's vector: the encoder's mean output over
    /// `[CLS] piece [SEP]`, not normalised.
    pub fn token_vector(&self, id: u32) -> Vec<f32> {
        let h = self.encoder.hidden();
        let (cls, sep) = crate::specials(&self.tokenizer);
        let hidden = self.encoder.forward(&[cls, id, sep]);
        let n = (hidden.len() / h.max(1)).max(1) as f32;
        let mut row = vec![0f32; h];
        for out in hidden.chunks_exact(h) {
            for (r, v) in row.iter_mut().zip(out) {
                *r += v / n;
            }
        }
        row
    }

    /// Every vocabulary entry's [`Embedder::token_vector`], `vocab × dim`
    /// row-major, on all cores. `progress` is told how many are done.
    pub fn token_table(&self, mut progress: impl FnMut(usize, usize)) -> Vec<f32> {
        use rayon::prelude::*;
        let h = self.encoder.hidden();
        let vocab = self.tokenizer.get_vocab_size(true);
        let mut table = vec![0f32; vocab * h];
        const BLOCK: usize = 512;
        for (b, block) in table.chunks_mut(BLOCK * h).enumerate() {
            block.par_chunks_mut(h).enumerate().for_each(|(i, row)| {
                row.copy_from_slice(&self.token_vector((b * BLOCK + i) as u32))
            });
            progress(((b + 1) * BLOCK).min(vocab), vocab);
        }
        table
    }

    /// The tokenizer (a static embedder built from this encoder uses it).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

/// The word pieces of `text` without `[CLS]`/`[SEP]`.
pub fn pieces(tokenizer: &Tokenizer, text: &str) -> Result<Vec<u32>, EmbedError> {
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| EmbedError::Run(e.to_string()))?
        .get_ids()
        .to_vec())
}

/// The weighted mean of the rows of `ids` in a float table (`vocab × dim`),
/// not normalised: the input of the fitted map. Unknown ids are skipped.
pub fn weighted_mean(table: &[f32], weights: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    let mut sum = vec![0f32; dim];
    let mut total = 0f32;
    for &id in ids {
        let (Some(row), Some(&w)) = (
            table.get(id as usize * dim..(id as usize + 1) * dim),
            weights.get(id as usize),
        ) else {
            continue;
        };
        for (s, v) in sum.iter_mut().zip(row) {
            *s += w * v;
        }
        total += w;
    }
    if total > 0.0 {
        for s in &mut sum {
            *s /= total;
        }
    }
    sum
}

impl StaticEmbedder {
    /// From a float table (`vocab × dim`), each piece's weight in the mean,
    /// and a bias added after it. Rows are stored in 8 bits with a scale.
    pub fn new(
        tokenizer: Tokenizer,
        dim: usize,
        table: &[f32],
        weights: &[f32],
        bias: Vec<f32>,
    ) -> Result<StaticEmbedder, EmbedError> {
        if dim == 0 || !table.len().is_multiple_of(dim) || table.len() / dim != weights.len() {
            return Err(EmbedError::Load(
                "a static table needs vocab × dim values and one weight a row".into(),
            ));
        }
        if bias.len() != dim {
            return Err(EmbedError::Load("the bias must have dim values".into()));
        }
        let mut q = Vec::with_capacity(table.len());
        let mut scales = Vec::with_capacity(weights.len());
        for (row, &w) in table.chunks_exact(dim).zip(weights) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            q.extend(
                row.iter()
                    .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8),
            );
            scales.push(s);
            if !(w.is_finite() && w >= 0.0) {
                return Err(EmbedError::Load(
                    "piece weights must be finite and >= 0".into(),
                ));
            }
        }
        Ok(StaticEmbedder {
            tokenizer,
            dim,
            table: q,
            scales,
            weights: weights.to_vec(),
            bias,
        })
    }

    /// Reads a table written by [`StaticEmbedder::save`] and the encoder's
    /// `tokenizer.json`.
    pub fn load(path: &Path, tokenizer: &Path) -> Result<StaticEmbedder, EmbedError> {
        let bytes = std::fs::read(path)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
        Self::from_bytes(&bytes, tokenizer)
            .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))
    }

    /// As [`StaticEmbedder::load`], from the table file's bytes.
    pub fn from_bytes(bytes: &[u8], tokenizer: &Path) -> Result<StaticEmbedder, EmbedError> {
        let load = |e: &dyn std::fmt::Display| EmbedError::Load(e.to_string());
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| load(&e))?;
        let table = st.tensor("table").map_err(|e| load(&e))?;
        let shape = table.shape().to_vec();
        let [vocab, dim] = shape[..] else {
            return Err(load(&"`table` is not two-dimensional"));
        };
        if table.dtype() != safetensors::Dtype::I8 {
            return Err(load(&"`table` is not i8"));
        }
        let floats = |name: &str, len: usize| -> Result<Vec<f32>, EmbedError> {
            let t = st.tensor(name).map_err(|e| load(&e))?;
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != [len] {
                return Err(load(&format!("`{name}` is not f32 of {len} values")));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let scales = floats("scales", vocab)?;
        let weights = floats("weights", vocab)?;
        let bias = floats("bias", dim)?;
        let tokenizer = load_tokenizer(tokenizer)?;
        if tokenizer.get_vocab_size(true) > vocab {
            return Err(load(&"the tokenizer's vocabulary is larger than the table"));
        }
        Ok(StaticEmbedder {
            tokenizer,
            dim,
            table: table.data().iter().map(|&b| b as i8).collect(),
            scales,
            weights,
            bias,
        })
    }

    /// Writes the table (atomically: a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<(), EmbedError> {
        let io = |e: &dyn std::fmt::Display| EmbedError::Run(format!("{}: {e}", path.display()));
        let vocab = self.scales.len();
        let table: Vec<u8> = self.table.iter().map(|&v| v as u8).collect();
        let le = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (scales, weights, bias) = (le(&self.scales), le(&self.weights), le(&self.bias));
        let views = [
            (
                "table",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::I8,
                    vec![vocab, self.dim],
                    &table,
                )
                .map_err(|e| io(&e))?,
            ),
            (
                "scales",
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![vocab], &scales)
                    .map_err(|e| io(&e))?,
            ),
            (
                "weights",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![vocab],
                    &weights,
                )
                .map_err(|e| io(&e))?,
            ),
            (
                "bias",
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    vec![self.dim],
                    &bias,
                )
                .map_err(|e| io(&e))?,
            ),
        ];
        let bytes = safetensors::serialize(views, None).map_err(|e| io(&e))?;
        let tmp = path.with_extension("partial");
        std::fs::write(&tmp, bytes).map_err(|e| io(&e))?;
        std::fs::rename(&tmp, path).map_err(|e| io(&e))
    }

    /// Dimensions of its vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Word pieces `text` becomes.
    pub fn count_tokens(&self, text: &str) -> usize {
        pieces(&self.tokenizer, text).map_or(0, |p| p.len())
    }

    /// One text's vector, L2-normalised.
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let ids = pieces(&self.tokenizer, text)?;
        let mut v = self.bias.clone();
        let mut total = 0f32;
        let mut sum = vec![0f32; self.dim];
        for &id in &ids {
            let i = id as usize;
            let (Some(row), Some(&s), Some(&w)) = (
                self.table.get(i * self.dim..(i + 1) * self.dim),
                self.scales.get(i),
                self.weights.get(i),
            ) else {
                continue;
            };
            let sw = s * w;
            for (acc, &q) in sum.iter_mut().zip(row) {
                *acc += sw * f32::from(q);
            }
            total += w;
        }
        if total > 0.0 {
            for (o, s) in v.iter_mut().zip(&sum) {
                *o += s / total;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        for x in &mut v {
            *x /= norm;
        }
        Ok(v)
    }
}
