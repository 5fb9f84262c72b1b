//! The learned router: from a prompt's embedding, how much sending it to
//! the strong (cloud) model rather than the weak (local) one is expected to
//! improve the answer.
//!
//! Trained on prompts labelled with whether each model answered correctly
//! (RouteLLM's format). The target is the accuracy gained by routing,
//! `strong_correct - weak_correct`: prompts both models get right, or both
//! get wrong, gain nothing from the cloud and should stay local. The parts,
//! chosen by measurement on held-out prompts (see the README):
//! - a topic prior: the mean gain of each topic (the training file's
//!   `subject`, else its `source`), read through a soft assignment of the
//!   prompt to the topics' centroids — how hard this *kind* of question is;
//! - ridge regression on the embedding plus a few surface features (length,
//!   how many numbers) — how hard *this* question is within its kind;
//! - similarity-weighted k-nearest neighbours (optional; it adds little once
//!   the other two are there and costs a scan of the training prompts).
//!
//! The default ensemble averages the ranks of the topic prior and the ridge.
//!
//! A raw score is turned into its percentile among the training scores, so
//! a threshold of 0.6 means "keep the 60% easiest prompts local".
//! [`evaluate`] computes the field's metrics (APGR, CPT, local share at a
//! quality level) on prompts the training never saw.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// One labelled prompt, embedded.
#[derive(Debug, Clone)]
pub struct Example {
    pub id: String,
    pub source: String,
    /// Topic for the prior: the subject when the data has one, else the source.
    pub topic: String,
    pub embedding: Vec<f32>,
    /// [`text_features`] of the prompt.
    pub features: Vec<f32>,
    pub weak: bool,
    pub strong: bool,
}

impl Example {
    fn gain(&self) -> f32 {
        f32::from(u8::from(self.strong)) - f32::from(u8::from(self.weak))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Knn,
    Ridge,
    Topics,
    /// Topics and ridge.
    Ensemble,
    /// Topics, ridge and neighbours.
    All,
}

impl ModelKind {
    fn knn(self) -> bool {
        matches!(self, Self::Knn | Self::All)
    }
    fn ridge(self) -> bool {
        matches!(self, Self::Ridge | Self::Ensemble | Self::All)
    }
    fn topics(self) -> bool {
        matches!(self, Self::Topics | Self::Ensemble | Self::All)
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

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "knn" => Ok(Self::Knn),
            "ridge" => Ok(Self::Ridge),
            "topics" => Ok(Self::Topics),
            "ensemble" => Ok(Self::Ensemble),
            "all" => Ok(Self::All),
            o => Err(format!(
                "model must be knn, ridge, topics, ensemble or all, got `{o}`"
            )),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub kind: ModelKind,
    pub k: usize,
    /// Sharpness of the similarity weights: weight = exp(sim / temperature).
    pub temperature: f32,
    pub ridge_lambda: f32,
    /// Sharpness of the soft assignment to topics.
    #[serde(default = "d_topic_temperature")]
    pub topic_temperature: f32,
}

fn d_topic_temperature() -> f32 {
    0.05
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Ensemble,
            k: 64,
            temperature: 0.05,
            ridge_lambda: 10.0,
            topic_temperature: d_topic_temperature(),
        }
    }
}

/// Training prompts, quantised to 8 bits a dimension (unit vectors lose
/// nothing that matters for ranking neighbours).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Neighbours {
    dim: usize,
    #[serde(with = "b64")]
    vectors: Vec<i8>,
    gains: Vec<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ridge {
    /// Over the embedding, then the standardised text features.
    weights: Vec<f32>,
    bias: f32,
    feature_mean: Vec<f32>,
    feature_std: Vec<f32>,
}

/// Topic centroids with each topic's mean gain (shrunk towards the overall
/// mean for topics with few prompts).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Topics {
    names: Vec<String>,
    dim: usize,
    centroids: Vec<f32>,
    gains: Vec<f32>,
}

/// A trained router, as saved to disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterModel {
    pub version: u32,
    /// Catalog name of the embedding model the router was trained with.
    pub embedder: String,
    pub config: TrainConfig,
    knn: Option<Neighbours>,
    ridge: Option<Ridge>,
    #[serde(default)]
    topics: Option<Topics>,
    /// Sorted scores of each part on the training prompts, for putting the
    /// parts on one scale in the ensemble.
    knn_cdf: Vec<f32>,
    ridge_cdf: Vec<f32>,
    #[serde(default)]
    topics_cdf: Vec<f32>,
    /// Sorted raw scores of the training prompts (for percentiles).
    cdf: Vec<f32>,
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

mod b64 {
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

fn quantise(v: &[f32]) -> impl Iterator<Item = i8> + '_ {
    v.iter()
        .map(|x| (x * 127.0).round().clamp(-127.0, 127.0) as i8)
}

impl Neighbours {
    fn build(train: &[Example]) -> Self {
        let dim = train.first().map_or(0, |e| e.embedding.len());
        Self {
            dim,
            vectors: train.iter().flat_map(|e| quantise(&e.embedding)).collect(),
            gains: train.iter().map(Example::gain).collect(),
        }
    }

    /// Similarity-weighted mean gain of the `k` nearest prompts,
    /// optionally leaving one training prompt out.
    fn score(&self, q: &[f32], cfg: &TrainConfig, skip: Option<usize>) -> f32 {
        let qi: Vec<i32> = quantise(q).map(i32::from).collect();
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(cfg.k + 1);
        for (i, row) in self.vectors.chunks_exact(self.dim).enumerate() {
            if Some(i) == skip {
                continue;
            }
            let dot: i32 = row.iter().zip(&qi).map(|(&a, &b)| i32::from(a) * b).sum();
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
    /// Least squares with an L2 penalty, by Cholesky on the normal equations.
    fn fit(train: &[Example], lambda: f32) -> Option<Ridge> {
        let first = train.first()?;
        let nf = first.features.len();
        let mut feature_mean = vec![0f32; nf];
        let mut feature_std = vec![0f32; nf];
        for e in train {
            for (m, &v) in feature_mean.iter_mut().zip(&e.features) {
                *m += v / train.len() as f32;
            }
        }
        for e in train {
            for ((sd, &m), &v) in feature_std.iter_mut().zip(&feature_mean).zip(&e.features) {
                *sd += (v - m).powi(2) / train.len() as f32;
            }
        }
        for sd in &mut feature_std {
            *sd = sd.sqrt().max(1e-6);
        }
        let mut r = Ridge {
            weights: Vec::new(),
            bias: 0.0,
            feature_mean,
            feature_std,
        };
        let d = first.embedding.len() + nf;
        let n = d + 1; // weights and the bias
        let mut a = vec![0f64; n * n];
        let mut b = vec![0f64; n];
        let mean_gain = train.iter().map(|e| f64::from(e.gain())).sum::<f64>() / train.len() as f64;
        let mut x = vec![0f64; n];
        for e in train {
            for (xi, v) in x.iter_mut().zip(r.input(&e.embedding, &e.features)) {
                *xi = f64::from(v);
            }
            x[d] = 1.0;
            let y = f64::from(e.gain()) - mean_gain;
            for i in 0..n {
                let xi = x[i];
                b[i] += xi * y;
                let row = &mut a[i * n..(i + 1) * n];
                for j in 0..=i {
                    row[j] += xi * x[j];
                }
            }
        }
        for i in 0..d {
            a[i * n + i] += f64::from(lambda);
        }
        for i in 0..n {
            for j in 0..i {
                a[j * n + i] = a[i * n + j];
            }
        }
        let w = cholesky_solve(&mut a, &b, n)?;
        r.weights = w[..d].iter().map(|&v| v as f32).collect();
        r.bias = (w[d] + mean_gain) as f32;
        Some(r)
    }

    fn input<'a>(
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

    fn score(&self, embedding: &[f32], features: &[f32]) -> f32 {
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
    const SHRINK: f32 = 20.0;

    fn build(train: &[Example]) -> Option<Topics> {
        let dim = train.first()?.embedding.len();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut names = Vec::new();
        let mut sums: Vec<Vec<f32>> = Vec::new();
        let mut gain = Vec::new();
        let mut count = Vec::new();
        for e in train {
            let i = *index.entry(e.topic.as_str()).or_insert_with(|| {
                names.push(e.topic.clone());
                sums.push(vec![0.0; dim]);
                gain.push(0.0f32);
                count.push(0.0f32);
                names.len() - 1
            });
            for (s, &v) in sums[i].iter_mut().zip(&e.embedding) {
                *s += v;
            }
            gain[i] += e.gain();
            count[i] += 1.0;
        }
        let overall = gain.iter().sum::<f32>() / count.iter().sum::<f32>().max(1.0);
        let mut centroids = Vec::with_capacity(names.len() * dim);
        for s in &sums {
            let norm = s.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            centroids.extend(s.iter().map(|x| x / norm));
        }
        let gains = gain
            .iter()
            .zip(&count)
            .map(|(&g, &c)| (g + overall * Self::SHRINK) / (c + Self::SHRINK))
            .collect();
        Some(Topics {
            names,
            dim,
            centroids,
            gains,
        })
    }

    /// Expected gain under a softmax assignment to the topics.
    fn score(&self, q: &[f32], temperature: f32) -> f32 {
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

/// Solves `a x = b` for a symmetric positive definite `a` (overwritten).
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut s = a[j * n + j];
        for k in 0..j {
            s -= a[j * n + k] * a[j * n + k];
        }
        if s <= 0.0 {
            return None;
        }
        let l = s.sqrt();
        a[j * n + j] = l;
        for i in j + 1..n {
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = s / l;
        }
    }
    let mut y = vec![0f64; n];
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * n + k] * y[k];
        }
        y[i] = s / a[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= a[k * n + i] * x[k];
        }
        x[i] = s / a[i * n + i];
    }
    Some(x)
}

fn percentile(sorted: &[f32], v: f32) -> f32 {
    if sorted.is_empty() {
        return 0.5;
    }
    sorted.partition_point(|&x| x < v) as f32 / sorted.len() as f32
}

impl RouterModel {
    /// One part alone is its own score; several average their ranks (they
    /// score on different scales).
    fn combine(&self, knn: Option<f32>, ridge: Option<f32>, topics: Option<f32>) -> f32 {
        let parts: Vec<(f32, &[f32])> = [
            (knn, self.knn_cdf.as_slice()),
            (ridge, self.ridge_cdf.as_slice()),
            (topics, self.topics_cdf.as_slice()),
        ]
        .into_iter()
        .filter_map(|(v, cdf)| v.map(|v| (v, cdf)))
        .collect();
        match parts.as_slice() {
            [] => 0.0,
            [(v, _)] => *v,
            many => {
                many.iter().map(|(v, cdf)| percentile(cdf, *v)).sum::<f32>() / many.len() as f32
            }
        }
    }

    /// Expected-gain score; higher means the cloud helps more. `features`
    /// are the prompt's [`text_features`].
    pub fn raw_score(&self, embedding: &[f32], features: &[f32]) -> f32 {
        let k = self
            .knn
            .as_ref()
            .map(|k| k.score(embedding, &self.config, None));
        let r = self.ridge.as_ref().map(|r| r.score(embedding, features));
        let t = self
            .topics
            .as_ref()
            .map(|t| t.score(embedding, self.config.topic_temperature));
        self.combine(k, r, t)
    }

    /// Difficulty in [0, 1]: the share of training prompts that score lower.
    pub fn score(&self, embedding: &[f32], features: &[f32]) -> f32 {
        percentile(&self.cdf, self.raw_score(embedding, features))
    }

    /// The threshold for a quality knob in [0, 1]: the share of the gap
    /// between the local and the cloud model to recover.
    pub fn threshold_for_quality(&self, quality: f32) -> f32 {
        if self.quality_thresholds.is_empty() {
            return crate::policy::threshold_for_quality(self.threshold, quality);
        }
        let i = (quality.clamp(0.0, 1.0) * 100.0).round() as usize;
        self.quality_thresholds[i.min(self.quality_thresholds.len() - 1)]
    }
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

    pub fn load(path: &std::path::Path, dim: usize) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let model: RouterModel =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::new(model, dim)
    }

    pub fn model(&self) -> &RouterModel {
        &self.model
    }
}

/// The text a router judges: what the user asked last.
pub fn routed_text(input: &tandem_api::Input) -> Option<&str> {
    match input {
        tandem_api::Input::Chat { messages, .. } => messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .or(messages.last())
            .map(|m| m.content.as_str()),
        tandem_api::Input::Text(t) => Some(t.as_str()),
    }
}

impl crate::dispatch::Scorer for LearnedScorer {
    fn score(&self, embedding: &[f32], text: &str) -> f32 {
        self.model.score(embedding, &text_features(text))
    }

    fn threshold(&self, quality: Option<f32>) -> Option<f32> {
        Some(quality.map_or(self.model.threshold, |q| {
            self.model.threshold_for_quality(q)
        }))
    }
}

/// How to pick the threshold.
#[derive(Debug, Clone, Copy)]
pub enum Calibration {
    /// Send this share of prompts to the cloud.
    CloudShare(f32),
    /// Keep as many prompts local as possible while reaching this fraction
    /// of the strong model's accuracy.
    Quality(f32),
}

pub fn train(train: &[Example], config: TrainConfig, calibration: Calibration) -> RouterModel {
    let knn = config.kind.knn().then(|| Neighbours::build(train));
    let ridge = if config.kind.ridge() {
        Ridge::fit(train, config.ridge_lambda)
    } else {
        None
    };
    let topics = if config.kind.topics() {
        Topics::build(train)
    } else {
        None
    };
    let mut model = RouterModel {
        version: 1,
        embedder: "all-minilm-l6-v2".into(),
        config,
        knn,
        ridge,
        topics,
        knn_cdf: Vec::new(),
        ridge_cdf: Vec::new(),
        topics_cdf: Vec::new(),
        cdf: Vec::new(),
        threshold: 0.5,
        calibrated_for: String::new(),
        quality_thresholds: Vec::new(),
        trained_on: train.iter().map(|e| e.id.clone()).collect(),
    };
    // Scores of the training prompts as unseen ones would get them: the
    // neighbours leave the prompt itself out.
    let knn: Option<Vec<f32>> = model.knn.as_ref().map(|k| {
        train
            .iter()
            .enumerate()
            .map(|(i, e)| k.score(&e.embedding, &model.config, Some(i)))
            .collect()
    });
    let ridge: Option<Vec<f32>> = model.ridge.as_ref().map(|r| {
        train
            .iter()
            .map(|e| r.score(&e.embedding, &e.features))
            .collect()
    });
    let topics: Option<Vec<f32>> = model.topics.as_ref().map(|t| {
        train
            .iter()
            .map(|e| t.score(&e.embedding, model.config.topic_temperature))
            .collect()
    });
    let sorted = |v: &Option<Vec<f32>>| {
        let mut s = v.clone().unwrap_or_default();
        s.sort_by(f32::total_cmp);
        s
    };
    model.knn_cdf = sorted(&knn);
    model.ridge_cdf = sorted(&ridge);
    model.topics_cdf = sorted(&topics);
    let raw: Vec<f32> = (0..train.len())
        .map(|i| {
            model.combine(
                knn.as_ref().map(|k| k[i]),
                ridge.as_ref().map(|r| r[i]),
                topics.as_ref().map(|t| t[i]),
            )
        })
        .collect();
    let mut cdf = raw.clone();
    cdf.sort_by(f32::total_cmp);
    model.cdf = cdf;
    let scores: Vec<f32> = raw.iter().map(|&r| percentile(&model.cdf, r)).collect();
    let (threshold, why) = calibrate(&scores, train, calibration);
    model.threshold = threshold;
    model.calibrated_for = why;
    model.quality_thresholds = quality_thresholds(&scores, train);
    model
}

/// For every whole percent of the weak-to-strong gap, the highest threshold
/// whose cloud share recovers it.
fn quality_thresholds(scores: &[f32], data: &[Example]) -> Vec<f32> {
    let c = curve(scores, data);
    let gap = c.strong - c.weak;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    (0..=100)
        .map(|pct| {
            let target = c.weak + gap * f64::from(pct) / 100.0;
            let k = if pct == 0 {
                0
            } else {
                c.acc
                    .iter()
                    .position(|&a| a >= target - 1e-12)
                    .unwrap_or(c.acc.len() - 1)
            };
            if k == 0 {
                1.0 + f32::EPSILON
            } else {
                scores[order[k - 1]]
            }
        })
        .collect()
}

/// The threshold on difficulty scores meeting `calibration` on `data`.
pub fn calibrate(scores: &[f32], data: &[Example], calibration: Calibration) -> (f32, String) {
    match calibration {
        Calibration::CloudShare(share) => {
            let mut sorted = scores.to_vec();
            sorted.sort_by(f32::total_cmp);
            let keep = ((1.0 - share.clamp(0.0, 1.0)) * sorted.len() as f32) as usize;
            let t = sorted.get(keep).copied().unwrap_or(1.0);
            (t, format!("{:.0}% of prompts to the cloud", share * 100.0))
        }
        Calibration::Quality(q) => {
            let c = curve(scores, data);
            let target = f64::from(q) * c.strong;
            // The fewest prompts sent out that reach the target.
            let k = c
                .acc
                .iter()
                .position(|&a| a >= target)
                .unwrap_or(c.acc.len() - 1);
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            let t = if k == 0 {
                1.0 + f32::EPSILON
            } else {
                scores[order[k - 1]]
            };
            (
                t,
                format!("{:.0}% of the strong model's accuracy", q * 100.0),
            )
        }
    }
}

/// Accuracy when the top `k` prompts by score go to the strong model, for
/// every `k` from 0 to n.
struct Curve {
    acc: Vec<f64>,
    weak: f64,
    strong: f64,
}

fn curve(scores: &[f32], data: &[Example]) -> Curve {
    let n = data.len().max(1) as f64;
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let weak: f64 = data
        .iter()
        .map(|e| f64::from(u8::from(e.weak)))
        .sum::<f64>();
    let strong: f64 = data
        .iter()
        .map(|e| f64::from(u8::from(e.strong)))
        .sum::<f64>();
    let mut acc = Vec::with_capacity(data.len() + 1);
    let mut correct = weak;
    acc.push(correct / n);
    for &i in &order {
        correct += f64::from(data[i].gain());
        acc.push(correct / n);
    }
    Curve {
        acc,
        weak: weak / n,
        strong: strong / n,
    }
}

/// The field's metrics for one set of prompts.
#[derive(Debug, Clone, Serialize)]
pub struct Metrics {
    pub prompts: usize,
    pub weak_accuracy: f64,
    pub strong_accuracy: f64,
    /// Mean share of the quality gap recovered, over every cloud share.
    pub apgr: f64,
    /// Smallest cloud share recovering 50% / 80% of the gap.
    pub cpt50: f64,
    pub cpt80: f64,
    /// Largest share kept local with accuracy >= 95% of the strong model's.
    pub local_share_at_95: f64,
    /// The same for a random ordering (mean of several shuffles).
    pub random_apgr: f64,
    pub random_local_share_at_95: f64,
}

fn curve_metrics(c: &Curve) -> (f64, f64, f64, f64) {
    let gap = c.strong - c.weak;
    let n = c.acc.len() - 1;
    let pgr = |a: f64| {
        if gap.abs() < 1e-12 {
            1.0
        } else {
            (a - c.weak) / gap
        }
    };
    let apgr = c.acc.iter().map(|&a| pgr(a)).sum::<f64>() / c.acc.len() as f64;
    let cpt = |x: f64| {
        c.acc
            .iter()
            .position(|&a| pgr(a) >= x)
            .map_or(1.0, |k| k as f64 / n.max(1) as f64)
    };
    let target = 0.95 * c.strong;
    let local = c
        .acc
        .iter()
        .position(|&a| a >= target - 1e-12)
        .map_or(0.0, |k| 1.0 - k as f64 / n.max(1) as f64);
    (apgr, cpt(0.5), cpt(0.8), local)
}

pub fn metrics(scores: &[f32], data: &[Example]) -> Metrics {
    let c = curve(scores, data);
    let (apgr, cpt50, cpt80, local) = curve_metrics(&c);
    let mut rng = fastrand::Rng::with_seed(42);
    let (mut ra, mut rl) = (0.0, 0.0);
    let trials = 20;
    for _ in 0..trials {
        let random: Vec<f32> = (0..data.len()).map(|_| rng.f32()).collect();
        let (a, _, _, l) = curve_metrics(&curve(&random, data));
        ra += a;
        rl += l;
    }
    Metrics {
        prompts: data.len(),
        weak_accuracy: c.weak,
        strong_accuracy: c.strong,
        apgr,
        cpt50,
        cpt80,
        local_share_at_95: local,
        random_apgr: ra / f64::from(trials),
        random_local_share_at_95: rl / f64::from(trials),
    }
}

/// Metrics overall and per source, on `data` (prompts the model was not
/// trained on; others are skipped).
pub fn evaluate(model: &RouterModel, data: &[Example]) -> (Metrics, Vec<(String, Metrics)>) {
    let seen: std::collections::HashSet<&str> =
        model.trained_on.iter().map(String::as_str).collect();
    let unseen: Vec<Example> = data
        .iter()
        .filter(|e| !seen.contains(e.id.as_str()))
        .cloned()
        .collect();
    let scores: Vec<f32> = unseen
        .iter()
        .map(|e| model.score(&e.embedding, &e.features))
        .collect();
    let overall = metrics(&scores, &unseen);
    let mut by_source: HashMap<&str, (Vec<f32>, Vec<Example>)> = HashMap::new();
    for (e, s) in unseen.iter().zip(&scores) {
        let entry = by_source.entry(e.source.as_str()).or_default();
        entry.0.push(*s);
        entry.1.push(e.clone());
    }
    let mut per: Vec<(String, Metrics)> = by_source
        .into_iter()
        .map(|(src, (s, d))| (src.to_owned(), metrics(&s, &d)))
        .collect();
    per.sort_by(|a, b| a.0.cmp(&b.0));
    (overall, per)
}

/// Splits examples into training and held-out sets, stratified by source,
/// deterministically for a seed.
pub fn split(data: Vec<Example>, holdout: f32, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let mut by_source: HashMap<String, Vec<Example>> = HashMap::new();
    for e in data {
        by_source.entry(e.source.clone()).or_default().push(e);
    }
    let mut sources: Vec<_> = by_source.into_iter().collect();
    sources.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = fastrand::Rng::with_seed(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (_, mut rows) in sources {
        rng.shuffle(&mut rows);
        let cut = (rows.len() as f32 * holdout).round() as usize;
        test.extend(rows.drain(..cut));
        train.extend(rows);
    }
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// Two clusters: the "hard" one only the strong model answers.
    fn fixture(n: usize, seed: u64) -> Vec<Example> {
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..n)
            .map(|i| {
                let hard = i % 2 == 0;
                let mut v: Vec<f32> = (0..16).map(|_| rng.f32() * 0.3).collect();
                v[if hard { 0 } else { 1 }] += 1.0;
                let source = if i % 3 == 0 { "a" } else { "b" };
                Example {
                    id: format!("p{i}"),
                    source: source.into(),
                    topic: source.into(),
                    embedding: unit(&v),
                    features: text_features(if hard {
                        "12 + 345 * 6 = ?"
                    } else {
                        "hello there"
                    }),
                    weak: !hard || rng.f32() < 0.1,
                    strong: rng.f32() < 0.9,
                }
            })
            .collect()
    }

    #[test]
    fn learns_to_separate_easy_from_hard() {
        for kind in [
            ModelKind::Knn,
            ModelKind::Ridge,
            ModelKind::Ensemble,
            ModelKind::All,
        ] {
            let (train_set, test) = split(fixture(600, 1), 0.3, 7);
            let cfg = TrainConfig {
                kind,
                k: 16,
                ..TrainConfig::default()
            };
            let m = train(&train_set, cfg, Calibration::Quality(0.95));
            let (overall, per) = evaluate(&m, &test);
            assert!(overall.apgr > 0.7, "{kind:?}: {overall:?}");
            assert!(overall.apgr > overall.random_apgr + 0.15);
            assert!(overall.local_share_at_95 > 0.35, "{kind:?}: {overall:?}");
            assert_eq!(per.len(), 2);
            let hard = unit(&[
                1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
            ]);
            let easy = unit(&[
                0.1, 1.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1,
            ]);
            let (fh, fe) = (
                text_features("12 + 345 * 6 = ?"),
                text_features("hello there"),
            );
            assert!(m.score(&hard, &fh) > m.score(&easy, &fe), "{kind:?}");
            // Saved and loaded, it scores the same.
            let back: RouterModel =
                serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
            assert!((back.score(&hard, &fh) - m.score(&hard, &fh)).abs() < 1e-6);
        }
    }

    #[test]
    fn calibration_hits_its_cloud_share() {
        let data = fixture(500, 3);
        let m = train(&data, TrainConfig::default(), Calibration::CloudShare(0.3));
        let held = fixture(400, 9);
        let out = held
            .iter()
            .filter(|e| m.score(&e.embedding, &e.features) >= m.threshold)
            .count();
        let share = out as f32 / held.len() as f32;
        assert!((share - 0.3).abs() < 0.1, "cloud share {share}");
    }

    #[test]
    fn metrics_of_perfect_and_reversed_orderings() {
        let data = fixture(200, 5);
        let gains: Vec<f32> = data.iter().map(Example::gain).collect();
        let best = metrics(&gains, &data);
        let worst = metrics(&gains.iter().map(|g| -g).collect::<Vec<_>>(), &data);
        assert!(best.apgr > 0.9 && worst.apgr < 0.3, "{best:?} {worst:?}");
        assert!((best.random_apgr - 0.5).abs() < 0.1);
        assert!(best.cpt50 < worst.cpt50);
    }

    #[test]
    fn base64_round_trip() {
        let v: Vec<i8> = (-128..=127).chain([0, 1]).collect();
        #[derive(Serialize, Deserialize)]
        struct W(#[serde(with = "b64")] Vec<i8>);
        let s = serde_json::to_string(&W(v.clone())).unwrap();
        let back: W = serde_json::from_str(&s).unwrap();
        assert_eq!(back.0, v);
    }
}
