//! Small BERT models on the device, on one CPU encoder ([`bert`]):
//!
//! - [`Embedder`]: sentence embeddings with all-MiniLM-L6-v2 — mean-pooled
//!   over real tokens and L2-normalised, the recipe sentence-transformers
//!   uses, so vectors match the reference model;
//! - [`StaticEmbedder`]: static vectors distilled from that encoder (one
//!   lookup per word piece, no transformer per sentence) for decisions that
//!   must take microseconds, such as the router's;
//! - [`TokenClassifier`]: the personal-data recognizer ("Rampart", a BERT
//!   token classifier read from its 4-bit ONNX export) — which words are
//!   names, street names, cities, postcodes, identifiers — as labelled
//!   byte spans of the input.
//!
//! Tokenization is Hugging Face's `tokenizers` with each model's own
//! `tokenizer.json`. Inputs longer than a model's positions are read in
//! overlapping windows.
//!
//! Not here: what the vectors and labels are used for (routing, caching,
//! privacy: the router and the policy).

#![warn(missing_docs)]

pub mod bert;
mod distilled;
mod onnx;
pub mod quant;

pub use distilled::{StaticEmbedder, pieces, weighted_mean};

use std::path::Path;

use tokenizers::Tokenizer;

pub use crate::bert::Precision;
use crate::bert::{BertWeights, Dense, Encoder, Layer, Norm};

/// Why a model could not be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// The model could not be loaded.
    #[error("text model: {0}")]
    Load(String),
    /// A forward pass failed.
    #[error("text model failed: {0}")]
    Run(String),
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Cores the encoders use per matrix product: `TANDEM_TEXT_THREADS`, else
/// two (the most that pays at these sizes, measured).
pub fn threads() -> usize {
    std::env::var("TANDEM_TEXT_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(2)
        })
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, EmbedError> {
    let mut t = Tokenizer::from_file(path)
        .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
    // Some tokenizer files pad every input to a fixed length; inputs here
    // are run one at a time, unpadded, and cut by hand.
    t.with_padding(None);
    t.with_truncation(None)
        .map_err(|e| EmbedError::Load(format!("{}: {e}", path.display())))?;
    Ok(t)
}

/// The `[CLS]`/`[SEP]` ids around a word-piece sequence.
fn specials(t: &Tokenizer) -> (u32, u32) {
    (
        t.token_to_id("[CLS]").unwrap_or(101),
        t.token_to_id("[SEP]").unwrap_or(102),
    )
}

/// A loaded sentence embedder.
pub struct Embedder {
    encoder: Encoder,
    tokenizer: Tokenizer,
    max_tokens: usize,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("dim", &self.encoder.hidden())
            .finish_non_exhaustive()
    }
}

/// Reads Hugging Face BERT weights (`model.safetensors`, `config.json`).
fn read_safetensors(dir: &Path) -> Result<BertWeights, EmbedError> {
    let load = |e: &dyn std::fmt::Display| EmbedError::Load(format!("{}: {e}", dir.display()));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).map_err(|e| load(&e))?,
    )
    .map_err(|e| load(&e))?;
    let num = |k: &str| {
        config[k]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| load(&k))
    };
    let (hidden, heads, layers, ff) = (
        num("hidden_size")?,
        num("num_attention_heads")?,
        num("num_hidden_layers")?,
        num("intermediate_size")?,
    );
    let eps = config["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32;
    let bytes = std::fs::read(dir.join("model.safetensors")).map_err(|e| load(&e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| load(&e))?;
    let get = |name: &str| -> Result<Vec<f32>, EmbedError> {
        let t = st.tensor(name).map_err(|e| load(&e))?;
        if t.dtype() != safetensors::Dtype::F32 {
            return Err(load(&format!("{name} is not f32")));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let dense = |p: &str, o: usize, i: usize| -> Result<Dense, EmbedError> {
        Ok(Dense::from_torch(
            o,
            i,
            &get(&format!("{p}.weight"))?,
            get(&format!("{p}.bias"))?,
        ))
    };
    let norm = |p: &str| -> Result<Norm, EmbedError> {
        Ok(Norm {
            weight: get(&format!("{p}.weight"))?,
            bias: get(&format!("{p}.bias"))?,
        })
    };
    let mut ls = Vec::with_capacity(layers);
    for i in 0..layers {
        let p = format!("encoder.layer.{i}");
        ls.push(Layer {
            qkv: Dense::concat(&[
                dense(&format!("{p}.attention.self.query"), hidden, hidden)?,
                dense(&format!("{p}.attention.self.key"), hidden, hidden)?,
                dense(&format!("{p}.attention.self.value"), hidden, hidden)?,
            ]),
            output: dense(&format!("{p}.attention.output.dense"), hidden, hidden)?,
            attention_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
            up: dense(&format!("{p}.intermediate.dense"), ff, hidden)?,
            down: dense(&format!("{p}.output.dense"), hidden, ff)?,
            output_norm: norm(&format!("{p}.output.LayerNorm"))?,
        });
    }
    Ok(BertWeights {
        hidden,
        heads,
        words: get("embeddings.word_embeddings.weight")?,
        positions: get("embeddings.position_embeddings.weight")?,
        token_types: get("embeddings.token_type_embeddings.weight")?,
        embedding_norm: norm("embeddings.LayerNorm")?,
        layers: ls,
        eps,
    })
}

impl Embedder {
    /// Loads `model.safetensors`, `config.json` and `tokenizer.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Embedder, EmbedError> {
        let weights = read_safetensors(dir)?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
        Ok(Embedder {
            encoder: Encoder::new(weights, threads()).map_err(EmbedError::Load)?,
            tokenizer,
            // The model was trained on at most 256 word pieces per sentence.
            max_tokens: 256,
        })
    }

    /// Dimensions of its vectors.
    pub fn dim(&self) -> usize {
        self.encoder.hidden()
    }

    fn ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        let e = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Run(e.to_string()))?;
        let mut ids = e.get_ids().to_vec();
        if ids.len() > self.max_tokens {
            let sep = ids.last().copied();
            ids.truncate(self.max_tokens - 1);
            ids.extend(sep);
        }
        Ok(ids)
    }

    /// Word pieces `text` becomes (after truncation).
    pub fn count_tokens(&self, text: &str) -> usize {
        self.ids(text).map(|i| i.len()).unwrap_or(0)
    }

    /// One text's vector.
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let ids = self.ids(text)?;
        let h = self.encoder.hidden();
        let hidden = self.encoder.forward(&ids);
        let n = hidden.len() / h.max(1);
        let mut mean = vec![0f32; h];
        for row in hidden.chunks_exact(h) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += v;
            }
        }
        for m in &mut mean {
            *m /= n.max(1) as f32;
        }
        let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for m in &mut mean {
            *m /= norm;
        }
        Ok(mean)
    }

    /// One L2-normalised vector per text (each read on its own, so memory
    /// stays that of one input whatever the batch).
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        texts.iter().map(|t| self.embed_one(t)).collect()
    }
}

/// A labelled span of a classified text.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    /// The label without its B-/I- prefix (`GIVEN_NAME`, `CITY`...).
    pub label: String,
    /// Byte offset where it starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
    /// The mean probability of the label over its word pieces.
    pub score: f32,
}

/// A word piece's probability of belonging to each group of labels asked
/// for ([`TokenClassifier::masses`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Mass {
    /// Byte offset where the piece starts.
    pub start: usize,
    /// Byte offset where it ends.
    pub end: usize,
    /// One probability per group, in the order asked.
    pub mass: Vec<f32>,
}

/// Word-piece ids of a text and the byte span of each.
pub type Pieces = (Vec<u32>, Vec<(usize, usize)>);

/// A loaded token classifier (the personal-data recognizer).
pub struct TokenClassifier {
    encoder: Encoder,
    head: Dense,
    labels: Vec<String>,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for TokenClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenClassifier")
            .field("labels", &self.labels.len())
            .finish_non_exhaustive()
    }
}

/// Word pieces read together at most; longer inputs are windows of this
/// size overlapping by [`OVERLAP`].
const WINDOW: usize = 256;
/// Pieces shared by neighbouring windows; each piece takes its labels from
/// the window where it sits farthest from an edge.
const OVERLAP: usize = 64;

impl TokenClassifier {
    /// Loads `model_q4.onnx`, `config.json` and `tokenizer.json` from
    /// `dir`, its 4-bit layers computed in integers ([`Precision::Int8`]).
    pub fn load(dir: &Path) -> Result<TokenClassifier, EmbedError> {
        TokenClassifier::load_with(dir, Precision::Int8)
    }

    /// Loads it computing at `precision` ([`Precision::F32`] is the
    /// reference: onnxruntime's logits to float precision).
    pub fn load_with(dir: &Path, precision: Precision) -> Result<TokenClassifier, EmbedError> {
        let load = |e: &dyn std::fmt::Display| EmbedError::Load(format!("{}: {e}", dir.display()));
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json")).map_err(|e| load(&e))?,
        )
        .map_err(|e| load(&e))?;
        let heads = config["num_attention_heads"].as_u64().unwrap_or(12) as usize;
        let eps = config["layer_norm_eps"].as_f64().unwrap_or(1e-12) as f32;
        let id2label = config["id2label"]
            .as_object()
            .ok_or_else(|| load(&"config.json has no id2label"))?;
        let mut labels = vec![String::new(); id2label.len()];
        for (k, v) in id2label {
            let i: usize = k
                .parse()
                .map_err(|_| load(&"id2label keys must be numbers"))?;
            let slot = labels
                .get_mut(i)
                .ok_or_else(|| load(&"id2label has gaps"))?;
            *slot = v.as_str().unwrap_or("O").to_owned();
        }
        let bytes = std::fs::read(dir.join("model_q4.onnx")).map_err(|e| load(&e))?;
        let loaded = onnx::read(&bytes, heads, eps).map_err(|e| load(&e))?;
        if labels.is_empty() || loaded.classifier.outputs != labels.len() {
            return Err(load(
                &"the head's outputs and id2label differ (or are none)",
            ));
        }
        Ok(TokenClassifier {
            encoder: Encoder::with_precision(loaded.weights, threads(), precision)
                .map_err(EmbedError::Load)?,
            head: loaded.classifier,
            labels,
            tokenizer: load_tokenizer(&dir.join("tokenizer.json"))?,
        })
    }

    /// Whether its products run in integers (every layer 4-bit and
    /// [`Precision::Int8`] asked for).
    pub fn quantized(&self) -> bool {
        self.encoder.quantized()
    }

    /// The labels, by id.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The word pieces of `text` with their byte spans, without `[CLS]` and
    /// `[SEP]`.
    pub fn tokenize(&self, text: &str) -> Result<Pieces, EmbedError> {
        let e = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EmbedError::Run(e.to_string()))?;
        Ok((e.get_ids().to_vec(), e.get_offsets().to_vec()))
    }

    /// Logits of each id of `ids` (a whole input with `[CLS]` and `[SEP]`),
    /// `ids.len() × labels`.
    pub fn logits(&self, ids: &[u32]) -> Vec<f32> {
        let hidden = self.encoder.forward(ids);
        let n = hidden.len() / self.encoder.hidden().max(1);
        let mut out = vec![0f32; n * self.head.outputs];
        for (row, o) in hidden
            .chunks_exact(self.encoder.hidden())
            .zip(out.chunks_exact_mut(self.head.outputs))
        {
            o.copy_from_slice(&self.head.bias);
            for (i, x) in row.iter().enumerate() {
                let w = &self.head.weight[i * self.head.outputs..(i + 1) * self.head.outputs];
                for (v, wv) in o.iter_mut().zip(w) {
                    *v += x * wv;
                }
            }
        }
        out
    }

    /// The label probabilities of every word piece of `ids` (no `[CLS]` or
    /// `[SEP]`), `ids.len() × labels`, read in windows: each piece takes
    /// them from the window where it sits farthest from an edge.
    pub fn piece_probabilities(&self, ids: &[u32]) -> Vec<f32> {
        let (cls, sep) = specials(&self.tokenizer);
        let k = self.head.outputs;
        let window = WINDOW
            .min(self.encoder.max_positions().saturating_sub(2))
            .max(8);
        let stride = window - OVERLAP.min(window / 2);
        let mut probs = vec![0f32; ids.len() * k];
        let mut centrality = vec![0usize; ids.len()];
        let mut start = 0;
        loop {
            let end = (start + window).min(ids.len());
            let mut input = Vec::with_capacity(end - start + 2);
            input.push(cls);
            input.extend_from_slice(&ids[start..end]);
            input.push(sep);
            let logits = self.logits(&input);
            for (j, row) in logits.chunks_exact(k).skip(1).take(end - start).enumerate() {
                let i = start + j;
                // How far this piece is from the window's nearer edge.
                let c = (j + 1).min(end - start - j);
                let (Some(best), Some(out)) =
                    (centrality.get_mut(i), probs.get_mut(i * k..(i + 1) * k))
                else {
                    continue;
                };
                if c <= *best {
                    continue;
                }
                *best = c;
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, v) in out.iter_mut().zip(row) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                for o in out.iter_mut() {
                    *o /= sum;
                }
            }
            if end == ids.len() {
                break;
            }
            start += stride;
        }
        probs
    }

    /// The most likely label of every word piece of `ids` (no `[CLS]` or
    /// `[SEP]`), with its probability.
    pub fn label_pieces(&self, ids: &[u32]) -> Vec<(usize, f32)> {
        self.best_labels(&self.piece_probabilities(ids))
    }

    fn best_labels(&self, probs: &[f32]) -> Vec<(usize, f32)> {
        probs
            .chunks_exact(self.head.outputs.max(1))
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (c, &p)| if p > b.1 { (c, p) } else { b },
                    )
            })
            .collect()
    }

    /// The labelled spans and the label masses of `text` from one forward
    /// pass: what [`classify`](Self::classify) and
    /// [`masses`](Self::masses) give, for the price of one.
    pub fn read(
        &self,
        text: &str,
        groups: &[&[&str]],
    ) -> Result<(Vec<Labelled>, Vec<Mass>), EmbedError> {
        let (ids, offsets) = self.tokenize(text)?;
        let probs = self.piece_probabilities(&ids);
        Ok((
            self.spans(&self.best_labels(&probs), &offsets),
            self.group_masses(&probs, &offsets, groups),
        ))
    }

    /// Every word piece of `text` with, for each group of label kinds
    /// (`["GIVEN_NAME", "SURNAME"]`, without `B-`/`I-`), the probability
    /// that the piece is one of them: how much of the model's belief goes
    /// to a kind even where another label wins by a little.
    pub fn masses(&self, text: &str, groups: &[&[&str]]) -> Result<Vec<Mass>, EmbedError> {
        let (ids, offsets) = self.tokenize(text)?;
        Ok(self.group_masses(&self.piece_probabilities(&ids), &offsets, groups))
    }

    fn group_masses(
        &self,
        probs: &[f32],
        offsets: &[(usize, usize)],
        groups: &[&[&str]],
    ) -> Vec<Mass> {
        let k = self.head.outputs.max(1);
        let member: Vec<Vec<bool>> = groups
            .iter()
            .map(|g| {
                self.labels
                    .iter()
                    .map(|l| {
                        let kind = l.split_once('-').map_or(l.as_str(), |(_, kind)| kind);
                        l != "O" && g.contains(&kind)
                    })
                    .collect()
            })
            .collect();
        probs
            .chunks_exact(k)
            .zip(offsets)
            .map(|(row, &(start, end))| Mass {
                start,
                end,
                mass: member
                    .iter()
                    .map(|m| row.iter().zip(m).filter(|(_, x)| **x).map(|(p, _)| p).sum())
                    .collect(),
            })
            .collect()
    }

    /// The labelled spans of `text`: consecutive word pieces with one label
    /// (its `B-` then `I-` pieces) make one span.
    pub fn classify(&self, text: &str) -> Result<Vec<Labelled>, EmbedError> {
        let (ids, offsets) = self.tokenize(text)?;
        Ok(self.spans(&self.label_pieces(&ids), &offsets))
    }

    /// Consecutive pieces of one label joined into spans.
    fn spans(&self, labels: &[(usize, f32)], offsets: &[(usize, usize)]) -> Vec<Labelled> {
        let mut out: Vec<Labelled> = Vec::new();
        let mut pieces = 0usize;
        for ((label, p), &(start, end)) in labels.iter().zip(offsets) {
            let name = self.labels.get(*label).map_or("O", String::as_str);
            let (begin, kind) = match name.split_once('-') {
                Some(("B", k)) => (true, k),
                Some(("I", k)) => (false, k),
                _ => {
                    pieces = 0;
                    continue;
                }
            };
            match out.last_mut() {
                Some(last) if !begin && last.label == kind && pieces > 0 => {
                    last.end = end;
                    last.score = (last.score * pieces as f32 + p) / (pieces + 1) as f32;
                    pieces += 1;
                }
                // A word piece continuing a word ("##") belongs to it, whatever
                // its own prefix says.
                Some(last) if last.label == kind && pieces > 0 && start == last.end => {
                    last.end = end;
                    pieces += 1;
                }
                _ => {
                    out.push(Labelled {
                        label: kind.to_owned(),
                        start,
                        end,
                        score: *p,
                    });
                    pieces = 1;
                }
            }
        }
        out
    }
}
