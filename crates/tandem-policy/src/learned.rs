//! The learned router's model, as requests use it: from a prompt's
//! embedding, how much sending it to the strong (cloud) model rather than
//! the weak (local) one is expected to improve the answer.
//!
//! The parts (chosen by measurement on held-out prompts, see the README):
//! - a topic prior: the mean gain of each topic, read through a soft
//!   assignment of the prompt to the topics' centroids — how hard this
//!   *kind* of question is;
//! - ridge regression on the embedding plus a few surface features (length,
//!   how many numbers) — how hard *this* question is within its kind;
//! - similarity-weighted k-nearest neighbours (optional);
//! - a lexical ridge: the same regression over the prompt's words and
//!   word pairs (TF-IDF), which sees what a mean of word vectors blurs —
//!   "NOT", "EXCEPT", "Statement 1", a unit, a kind of problem;
//! - a probe (optional): a ridge on the local model's own reading of the
//!   prompt (its last hidden state, `tandem_engine::reading`) — what *this
//!   model* makes of the question. A request without a reading is scored
//!   by the other parts, on their own scale.
//!
//! Several parts average their ranks. A raw score is turned into its
//! percentile among the training scores, so a threshold of 0.6 means "keep
//! the 60% easiest prompts local". Training and evaluation live in
//! `tandem-train`.

use serde::{Deserialize, Serialize};

use crate::scoring::{Reader, Scorer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
/// Which parts a router combines.
pub enum ModelKind {
    /// Neighbours alone.
    Knn,
    /// Ridge alone.
    Ridge,
    /// The topic prior alone.
    Topics,
    /// Topics and ridge.
    Ensemble,
    /// Topics, ridge and neighbours.
    All,
    /// The lexical ridge alone.
    Lexical,
}

impl ModelKind {
    /// Uses the neighbours.
    pub fn knn(self) -> bool {
        matches!(self, Self::Knn | Self::All)
    }
    /// Uses the ridge.
    pub fn ridge(self) -> bool {
        matches!(self, Self::Ridge | Self::Ensemble | Self::All)
    }
    /// Uses the topic prior.
    pub fn topics(self) -> bool {
        matches!(self, Self::Topics | Self::Ensemble | Self::All)
    }
    /// Uses the lexical ridge.
    pub fn lexical(self) -> bool {
        matches!(self, Self::Lexical | Self::Ensemble | Self::All)
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "knn" => Ok(Self::Knn),
            "ridge" => Ok(Self::Ridge),
            "topics" => Ok(Self::Topics),
            "ensemble" => Ok(Self::Ensemble),
            "all" => Ok(Self::All),
            "lexical" => Ok(Self::Lexical),
            o => Err(format!(
                "model must be knn, ridge, topics, lexical, ensemble or all, got `{o}`"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
/// How a router was trained; the scoring parts read it too.
pub struct TrainConfig {
    /// The parts.
    pub kind: ModelKind,
    /// Neighbours consulted.
    pub k: usize,
    /// Sharpness of the similarity weights: weight = exp(sim / temperature).
    pub temperature: f32,
    /// L2 penalty of the ridge.
    pub ridge_lambda: f32,
    /// Sharpness of the soft assignment to topics.
    #[serde(default = "d_topic_temperature")]
    pub topic_temperature: f32,
    /// L2 penalty of the lexical ridge.
    #[serde(default = "d_lexical_lambda")]
    pub lexical_lambda: f32,
    /// Words and pairs in fewer training prompts than this are not read.
    #[serde(default = "d_lexical_min_prompts")]
    pub lexical_min_prompts: u32,
    /// The lexical ridge is fitted from this many training prompts on
    /// (measured from 100 up, where it helps a little or not at all; below,
    /// few words are in 3 prompts, and 5-fold scores are fitted on a
    /// handful).
    #[serde(default = "d_lexical_from")]
    pub lexical_from: usize,
    /// L2 penalty of the probe (on standardised readings).
    #[serde(default = "d_probe_lambda")]
    pub probe_lambda: f32,
    /// How many parts' worth the probe counts for in the ensemble.
    #[serde(default = "d_probe_weight")]
    pub probe_weight: f32,
    /// A request is read only when its difficulty without a reading is
    /// within [`Probe::reach`] of its threshold: the distance that this
    /// share of the training prompts' readings moved their difficulty less
    /// than. 1 reads every request.
    #[serde(default = "d_read_band")]
    pub read_band: f32,
}

fn d_read_band() -> f32 {
    0.95
}

fn d_probe_lambda() -> f32 {
    30_000.0
}

fn d_probe_weight() -> f32 {
    1.0
}

fn d_topic_temperature() -> f32 {
    0.05
}

fn d_lexical_lambda() -> f32 {
    3.0
}

fn d_lexical_min_prompts() -> u32 {
    3
}

fn d_lexical_from() -> usize {
    100
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Ensemble,
            k: 64,
            temperature: 0.05,
            ridge_lambda: 10.0,
            topic_temperature: d_topic_temperature(),
            lexical_lambda: d_lexical_lambda(),
            lexical_min_prompts: d_lexical_min_prompts(),
            lexical_from: d_lexical_from(),
            probe_lambda: d_probe_lambda(),
            probe_weight: d_probe_weight(),
            read_band: d_read_band(),
        }
    }
}

/// Training prompts, quantised to 8 bits a dimension (unit vectors lose
/// nothing that matters for ranking neighbours).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Neighbours {
    /// Embedding dimension.
    pub dim: usize,
    /// Row-major, `dim` values a prompt.
    #[serde(with = "b64")]
    pub vectors: Vec<i8>,
    /// Each prompt's gain (strong correct minus weak correct).
    pub gains: Vec<f32>,
}

/// Ridge regression of the gain on the embedding and the text features.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ridge {
    /// Over the embedding, then the standardised text features.
    pub weights: Vec<f32>,
    /// The intercept.
    pub bias: f32,
    /// Training mean of each text feature.
    pub feature_mean: Vec<f32>,
    /// Training standard deviation of each text feature.
    pub feature_std: Vec<f32>,
}

/// Topic centroids with each topic's mean gain (shrunk towards the overall
/// mean for topics with few prompts).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topics {
    /// Topic names.
    pub names: Vec<String>,
    /// Embedding dimension.
    pub dim: usize,
    /// Unit centroids, row-major.
    pub centroids: Vec<f32>,
    /// Each topic's mean gain.
    pub gains: Vec<f32>,
}

/// Ridge regression of the gain on the prompt's TF-IDF vector: sublinear
/// term counts times smoothed inverse document frequencies, L2-normalised,
/// over the words and word pairs of at least `min_prompts` training
/// prompts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lexical {
    /// The terms read, sorted ([`TextView::terms`] keys).
    #[serde(with = "b64_u64")]
    pub keys: Vec<u64>,
    /// Each term's inverse document frequency.
    #[serde(with = "b64_f32")]
    pub idf: Vec<f32>,
    /// Each term's weight.
    #[serde(with = "b64_f32")]
    pub weights: Vec<f32>,
    /// The intercept.
    pub bias: f32,
}

impl Lexical {
    /// The prompt's known terms, as (index, TF-IDF value), L2-normalised.
    pub fn row(&self, terms: &[(u64, u32)]) -> Vec<(usize, f32)> {
        let mut row: Vec<(usize, f32)> = terms
            .iter()
            .filter_map(|&(key, count)| {
                let i = self.keys.binary_search(&key).ok()?;
                let idf = *self.idf.get(i)?;
                Some((i, (1.0 + (count as f32).ln()) * idf))
            })
            .collect();
        let norm = row.iter().map(|(_, v)| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            for (_, v) in &mut row {
                *v /= norm;
            }
        }
        row
    }

    /// The predicted gain.
    pub fn score(&self, terms: &[(u64, u32)]) -> f32 {
        self.bias
            + self
                .row(terms)
                .iter()
                .map(|&(i, v)| self.weights.get(i).map_or(0.0, |w| w * v))
                .sum::<f32>()
    }
}

/// What the router reads off a prompt's text besides its embedding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TextView {
    /// Surface features: [`text_features`].
    pub features: Vec<f32>,
    /// Its words (lower-cased runs of two or more letters or digits) and
    /// pairs of neighbouring words, hashed, with their counts, sorted by
    /// hash.
    pub terms: Vec<(u64, u32)>,
    /// The local model's reading of the prompt, when it was read (see
    /// [`Probe`]).
    pub reading: Option<Vec<f32>>,
}

impl TextView {
    /// Reads `text`.
    pub fn of(text: &str) -> TextView {
        TextView {
            features: text_features(text),
            terms: terms(text),
            reading: None,
        }
    }
}

/// A linear probe: ridge regression of the gain on the local model's
/// reading of the prompt. It was fitted on standardised readings; the
/// standardisation is folded into `weights` and `bias`, so scoring is one
/// dot product.
#[derive(Debug, Clone, Serialize, Deserialize)]
// A probe saved before the standardisation was folded in carried `mean`
// and `std` beside weights on standardised readings: refused, not misread.
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// Catalog name of the model whose readings it was fitted on: another
    /// model's readings mean nothing to it.
    pub model: String,
    /// The block whose output it reads (`tandem router read --layer`);
    /// `None`: the last layer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<u32>,
    /// Weights on the raw reading.
    #[serde(with = "b64_f32")]
    pub weights: Vec<f32>,
    /// The intercept.
    pub bias: f32,
    /// How far (in difficulty) a reading can move a request's decision:
    /// one whose difficulty without a reading is farther than this from its
    /// threshold is decided without one ([`TrainConfig::read_band`]).
    #[serde(default = "d_reach")]
    pub reach: f32,
}

fn d_reach() -> f32 {
    1.0
}

impl Probe {
    /// The predicted gain; `None` for a reading of another width.
    pub fn score(&self, reading: &[f32]) -> Option<f32> {
        if reading.len() != self.weights.len() {
            return None;
        }
        let dot: f32 = reading.iter().zip(&self.weights).map(|(x, w)| x * w).sum();
        Some(self.bias + dot)
    }
}

/// FNV-1a: stable across builds and platforms, as a saved router needs.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (n, part) in parts.iter().enumerate() {
        if n > 0 {
            h ^= u64::from(b' ');
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        for &b in part.as_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The hashed words and word pairs of `text` with their counts.
pub fn terms(text: &str) -> Vec<(u64, u32)> {
    let lower = text.to_lowercase();
    let words: Vec<&str> = lower
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| w.chars().nth(1).is_some())
        .collect();
    let mut keys: Vec<u64> = words.iter().map(|w| fnv1a(&[w])).collect();
    keys.extend(words.windows(2).map(fnv1a));
    keys.sort_unstable();
    let mut out: Vec<(u64, u32)> = Vec::with_capacity(keys.len());
    for k in keys {
        match out.last_mut() {
            Some((last, n)) if *last == k => *n += 1,
            _ => out.push((k, 1)),
        }
    }
    out
}

/// A trained router, as saved to disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterModel {
    /// Format version.
    pub version: u32,
    /// Catalog name of the embedding model the router was trained with.
    pub embedder: String,
    /// When set, prompts are embedded with this static table distilled
    /// from `embedder` (a lookup per word piece) rather than by running the
    /// encoder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors: Option<StaticVectors>,
    /// How it was trained.
    pub config: TrainConfig,
    /// The neighbours part.
    pub knn: Option<Neighbours>,
    /// The ridge part.
    pub ridge: Option<Ridge>,
    /// The topic prior.
    #[serde(default)]
    pub topics: Option<Topics>,
    /// The lexical ridge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexical: Option<Lexical>,
    /// The probe on the local model's reading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<Probe>,
    /// Sorted scores of each part on the training prompts, for putting the
    /// parts on one scale in the ensemble.
    pub knn_cdf: Vec<f32>,
    /// See `knn_cdf`.
    pub ridge_cdf: Vec<f32>,
    /// See `knn_cdf`.
    #[serde(default)]
    pub topics_cdf: Vec<f32>,
    /// See `knn_cdf` (scores of each training prompt from a ridge fitted
    /// without it: the lexical ridge nearly fits its own training prompts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lexical_cdf: Vec<f32>,
    /// See `lexical_cdf` (the probe's out-of-fold scores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_cdf: Vec<f32>,
    /// Sorted raw scores of the training prompts (for percentiles); with a
    /// probe, of those that were read, every part counted.
    pub cdf: Vec<f32>,
    /// With a probe: sorted raw scores of the training prompts without it,
    /// for requests that come without a reading.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdf_unread: Vec<f32>,
    /// Percentile above which prompts go to the cloud (calibrated).
    pub threshold: f32,
    /// How the threshold was chosen.
    pub calibrated_for: String,
    /// `quality_thresholds[i]`: the threshold that recovers i% of the gap
    /// between the weak and the strong model on the training prompts. The
    /// per-request quality knob reads it.
    #[serde(default)]
    pub quality_thresholds: Vec<f32>,
    /// Ids of the training prompts: evaluation skips them.
    pub trained_on: Vec<String>,
}

/// A static table stored beside the router file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticVectors {
    /// File name, in the router file's folder.
    pub file: String,
    /// SHA-256 of the file, hex: a router is never paired with another
    /// training's table.
    pub sha256: String,
}

pub(crate) mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[i8], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().map(|&x| x as u8).collect();
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i8>, D::Error> {
        let s = String::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)?;
        Ok(bytes.into_iter().map(|b| b as i8).collect())
    }
}

macro_rules! b64_le {
    ($name:ident, $t:ty) => {
        pub(crate) mod $name {
            use base64::Engine;
            use serde::{Deserialize, Deserializer, Serializer};

            const SIZE: usize = std::mem::size_of::<$t>();

            pub fn serialize<S: Serializer>(v: &[$t], s: S) -> Result<S::Ok, S::Error> {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
            }

            pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<$t>, D::Error> {
                let s = String::deserialize(d)?;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(serde::de::Error::custom)?;
                if bytes.len() % SIZE != 0 {
                    return Err(serde::de::Error::custom("truncated array"));
                }
                Ok(bytes
                    .chunks_exact(SIZE)
                    .map(|c| {
                        let mut a = [0u8; SIZE];
                        a.copy_from_slice(c);
                        <$t>::from_le_bytes(a)
                    })
                    .collect())
            }
        }
    };
}

b64_le!(b64_u64, u64);
b64_le!(b64_f32, f32);

/// 8 bits a dimension, as the neighbours store vectors.
pub fn quantise(v: &[f32]) -> impl Iterator<Item = i8> + '_ {
    v.iter()
        .map(|x| (x * 127.0).round().clamp(-127.0, 127.0) as i8)
}

impl Neighbours {
    /// Similarity-weighted mean gain of the `k` nearest prompts,
    /// optionally leaving one training prompt out.
    pub fn score(&self, q: &[f32], cfg: &TrainConfig, skip: Option<usize>) -> f32 {
        // i16 products summed in i32: the loop below then vectorises to
        // multiply-add instructions.
        let qi: Vec<i16> = quantise(q).map(i16::from).collect();
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(cfg.k + 1);
        for (i, row) in self.vectors.chunks_exact(self.dim).enumerate() {
            if Some(i) == skip {
                continue;
            }
            let dot: i32 = row
                .iter()
                .zip(&qi)
                .map(|(&a, &b)| i32::from(i16::from(a) * b))
                .sum();
            let sim = dot as f32 / (127.0 * 127.0);
            if best.len() == cfg.k && sim <= best[cfg.k - 1].0 {
                continue;
            }
            let at = best.partition_point(|&(s, _)| s >= sim);
            best.insert(at, (sim, i));
            best.truncate(cfg.k);
        }
        let top = best.first().map_or(0.0, |b| b.0);
        let (mut num, mut den) = (0.0f32, 0.0f32);
        for (sim, i) in best {
            let w = ((sim - top) / cfg.temperature).exp();
            num += w * self.gains[i];
            den += w;
        }
        if den > 0.0 { num / den } else { 0.0 }
    }
}

impl Ridge {
    /// The embedding followed by the standardised features.
    pub fn input<'a>(
        &'a self,
        embedding: &'a [f32],
        features: &'a [f32],
    ) -> impl Iterator<Item = f32> + 'a {
        embedding.iter().copied().chain(
            features
                .iter()
                .zip(self.feature_mean.iter().zip(&self.feature_std))
                .map(|(&v, (&m, &sd))| (v - m) / sd),
        )
    }

    /// The predicted gain.
    pub fn score(&self, embedding: &[f32], features: &[f32]) -> f32 {
        self.bias
            + self
                .weights
                .iter()
                .zip(self.input(embedding, features))
                .map(|(w, x)| w * x)
                .sum::<f32>()
    }
}

impl Topics {
    /// Topics with fewer prompts than this lean on the overall mean.
    pub const SHRINK: f32 = 20.0;

    /// Expected gain under a softmax assignment to the topics.
    pub fn score(&self, q: &[f32], temperature: f32) -> f32 {
        let sims: Vec<f32> = self
            .centroids
            .chunks_exact(self.dim)
            .map(|c| c.iter().zip(q).map(|(a, b)| a * b).sum::<f32>())
            .collect();
        let top = sims.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let (mut num, mut den) = (0.0f32, 0.0f32);
        for (s, g) in sims.iter().zip(&self.gains) {
            let w = ((s - top) / temperature).exp();
            num += w * g;
            den += w;
        }
        if den > 0.0 { num / den } else { 0.0 }
    }
}

/// The share of `sorted` below `v`.
pub fn percentile(sorted: &[f32], v: f32) -> f32 {
    if sorted.is_empty() {
        return 0.5;
    }
    sorted.partition_point(|&x| x < v) as f32 / sorted.len() as f32
}

impl RouterModel {
    /// One part alone is its own score; several average their ranks (they
    /// score on different scales), the probe's counted `probe_weight`
    /// times.
    pub fn combine(&self, parts: Parts) -> f32 {
        let parts: Vec<(f32, &[f32], f32)> = [
            (parts.knn, self.knn_cdf.as_slice(), 1.0),
            (parts.ridge, self.ridge_cdf.as_slice(), 1.0),
            (parts.topics, self.topics_cdf.as_slice(), 1.0),
            (parts.lexical, self.lexical_cdf.as_slice(), 1.0),
            (
                parts.probe,
                self.probe_cdf.as_slice(),
                self.config.probe_weight.max(0.0),
            ),
        ]
        .into_iter()
        .filter_map(|(v, cdf, w)| v.map(|v| (v, cdf, w)))
        .collect();
        match parts.as_slice() {
            [] => 0.0,
            [(v, _, _)] => *v,
            many => {
                let total: f32 = many.iter().map(|p| p.2).sum();
                if total <= 0.0 {
                    return 0.0;
                }
                many.iter()
                    .map(|(v, cdf, w)| w * percentile(cdf, *v))
                    .sum::<f32>()
                    / total
            }
        }
    }

    /// The probe's score of a reading, when both exist and fit.
    pub fn probe_score(&self, reading: Option<&[f32]>) -> Option<f32> {
        self.probe.as_ref()?.score(reading?)
    }

    /// Every part's score but the probe's, which is given.
    fn parts(&self, embedding: &[f32], text: &TextView, probe: Option<f32>) -> Parts {
        Parts {
            knn: self
                .knn
                .as_ref()
                .map(|k| k.score(embedding, &self.config, None)),
            ridge: self
                .ridge
                .as_ref()
                .map(|r| r.score(embedding, &text.features)),
            topics: self
                .topics
                .as_ref()
                .map(|t| t.score(embedding, self.config.topic_temperature)),
            lexical: self.lexical.as_ref().map(|l| l.score(&text.terms)),
            probe,
        }
    }

    /// Expected-gain score; higher means the cloud helps more.
    pub fn raw_score(&self, embedding: &[f32], text: &TextView) -> f32 {
        let probe = self.probe_score(text.reading.as_deref());
        self.combine(self.parts(embedding, text, probe))
    }

    /// Difficulty in [0, 1]: the share of training prompts that score lower
    /// (among those scored the same way: with or without a reading).
    pub fn score(&self, embedding: &[f32], text: &TextView) -> f32 {
        self.score_with(embedding, text, text.reading.as_deref())
    }

    /// [`RouterModel::score`] with the reading given apart from the text
    /// (the request path borrows it; `text.reading` is not looked at).
    pub fn score_with(&self, embedding: &[f32], text: &TextView, reading: Option<&[f32]>) -> f32 {
        let probe = self.probe_score(reading);
        let raw = self.combine(self.parts(embedding, text, probe));
        if self.probe.is_some() && probe.is_none() && !self.cdf_unread.is_empty() {
            percentile(&self.cdf_unread, raw)
        } else {
            percentile(&self.cdf, raw)
        }
    }

    /// The threshold for a quality knob in [0, 1]: the share of the gap
    /// between the local and the cloud model to recover.
    pub fn threshold_for_quality(&self, quality: f32) -> f32 {
        if self.quality_thresholds.is_empty() {
            return crate::decision::threshold_for_quality(self.threshold, quality);
        }
        let i = (quality.clamp(0.0, 1.0) * 100.0).round() as usize;
        self.quality_thresholds[i.min(self.quality_thresholds.len() - 1)]
    }
}

/// Each part's score of one prompt (`None`: the router has no such part).
#[derive(Debug, Clone, Copy, Default)]
pub struct Parts {
    /// The neighbours'.
    pub knn: Option<f32>,
    /// The ridge's.
    pub ridge: Option<f32>,
    /// The topic prior's.
    pub topics: Option<f32>,
    /// The lexical ridge's.
    pub lexical: Option<f32>,
    /// The probe's.
    pub probe: Option<f32>,
}

/// The router in the request path (the dispatcher embeds the prompt).
pub struct LearnedScorer {
    model: RouterModel,
}

impl LearnedScorer {
    /// Checks that the router's vectors have the embedder's dimension.
    pub fn new(model: RouterModel, dim: usize) -> Result<Self, String> {
        if model.knn.as_ref().is_some_and(|k| k.dim != dim)
            || model.topics.as_ref().is_some_and(|t| t.dim != dim)
            || model
                .ridge
                .as_ref()
                .is_some_and(|r| r.weights.len() != dim + r.feature_mean.len())
        {
            return Err(format!(
                "the router was trained with {} vectors, not of dimension {dim}",
                model.embedder
            ));
        }
        Ok(Self { model })
    }

    /// The model.
    pub fn model(&self) -> &RouterModel {
        &self.model
    }
}

impl Scorer for LearnedScorer {
    fn score(&self, embedding: &[f32], text: &str) -> f32 {
        self.score_read(embedding, text, None)
    }

    fn reader(&self) -> Option<Reader<'_>> {
        self.model.probe.as_ref().map(|p| Reader {
            model: p.model.as_str(),
            layer: p.layer,
            width: p.weights.len(),
            reach: p.reach,
        })
    }

    fn score_read(&self, embedding: &[f32], text: &str, reading: Option<&[f32]>) -> f32 {
        // The terms are read only when the router has a part that uses them.
        let view = TextView {
            features: text_features(text),
            terms: if self.model.lexical.is_some() {
                terms(text)
            } else {
                Vec::new()
            },
            reading: None,
        };
        self.model.score_with(embedding, &view, reading)
    }

    fn threshold(&self, quality: Option<f32>) -> Option<f32> {
        Some(quality.map_or(self.model.threshold, |q| {
            self.model.threshold_for_quality(q)
        }))
    }
}

/// Surface features of a prompt that the embedding hides: its length and
/// how much arithmetic it holds.
pub fn text_features(text: &str) -> Vec<f32> {
    let mut numbers = 0usize;
    let mut digits = 0usize;
    let mut in_number = false;
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits += 1;
            if !in_number {
                numbers += 1;
            }
            in_number = true;
        } else {
            in_number = false;
        }
    }
    let ln = |n: usize| (1.0 + n as f32).ln();
    vec![
        ln(text.len()),
        ln(numbers),
        ln(digits),
        text.matches('\n').count() as f32 / 10.0,
        ln(text.split_whitespace().count()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_are_words_and_pairs_counted_whatever_the_case() {
        let t = terms("Which is NOT a prime? which is not");
        let count = |parts: &[&str]| {
            t.iter()
                .find(|(k, _)| *k == fnv1a(parts))
                .map_or(0, |(_, n)| *n)
        };
        assert_eq!(count(&["which"]), 2);
        assert_eq!(count(&["not"]), 2);
        assert_eq!(count(&["is", "not"]), 2);
        assert_eq!(count(&["prime", "which"]), 1);
        // One-letter words are not read, and pairs skip over them.
        assert_eq!(count(&["a"]), 0);
        assert_eq!(count(&["not", "prime"]), 1);
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0));
        // Stable across builds: a saved router's keys must still match.
        assert_eq!(fnv1a(&["prime"]), 0x2f11_7324_8c85_8040);
    }

    #[test]
    fn any_text_is_read_and_scored() {
        let mut known = [(fnv1a(&["zürich"]), 1.0), (fnv1a(&["日本語"]), -1.0)];
        known.sort_by_key(|k| k.0);
        let lex = Lexical {
            keys: known.iter().map(|k| k.0).collect(),
            idf: vec![2.0, 2.0],
            weights: known.iter().map(|k| k.1).collect(),
            bias: 0.5,
        };
        assert!((lex.score(&terms("ZÜRICH")) - 1.5).abs() < 1e-6);
        assert!((lex.score(&terms("日本語")) + 0.5).abs() < 1e-6);
        for text in ["", " ", "\u{0}\u{FFFF}", "a", "ß ß ß", "🙂🙂 x"] {
            assert!(lex.score(&terms(text)).is_finite());
        }
        let back: Lexical = serde_json::from_str(&serde_json::to_string(&lex).unwrap()).unwrap();
        assert_eq!(back.keys, lex.keys);
        assert_eq!(back.weights, lex.weights);
    }
}
