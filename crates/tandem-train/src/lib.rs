//! Training and evaluating the learned router (`tandem router train|eval`,
//! the benchmarks): fitting each part of a [`RouterModel`] on labelled,
//! embedded prompts, calibrating its threshold, and the field's metrics
//! (APGR, CPT, local share at a quality level) on prompts it never saw.
//!
//! Only the CLI and the benchmarks use this; requests use the model through
//! `tandem-policy`.

#![warn(missing_docs)]

use std::collections::HashMap;

use serde::Serialize;
use tandem_policy::learned::{
    Lexical, ModelKind, Neighbours, Parts, Probe, Ridge, RouterModel, TextView, Topics,
    TrainConfig, percentile, quantise,
};

/// One labelled prompt, embedded.
#[derive(Debug, Clone)]
pub struct Example {
    /// Unique within its file.
    pub id: String,
    /// The benchmark it comes from (`mmlu`, `gsm8k`...).
    pub source: String,
    /// Topic for the prior: the subject when the data has one, else the source.
    pub topic: String,
    /// The prompt's embedding.
    pub embedding: Vec<f32>,
    /// What the router reads off the prompt's text.
    pub text: TextView,
    /// The weak (local) model answered it correctly.
    pub weak: bool,
    /// The strong (cloud) model answered it correctly.
    pub strong: bool,
}

impl Example {
    /// What sending it out gains: 1, 0 or -1.
    pub fn gain(&self) -> f32 {
        self.outcome().gain()
    }

    /// Which model answered it correctly.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            weak: self.weak,
            strong: self.strong,
        }
    }
}

/// Which of the two models answered a prompt correctly: all that scoring an
/// ordering needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The weak (local) model did.
    pub weak: bool,
    /// The strong (cloud) model did.
    pub strong: bool,
}

impl Outcome {
    /// What sending it out gains: 1, 0 or -1.
    pub fn gain(&self) -> f32 {
        f32::from(u8::from(self.strong)) - f32::from(u8::from(self.weak))
    }
}

fn neighbours(train: &[Example]) -> Neighbours {
    let dim = train.first().map_or(0, |e| e.embedding.len());
    Neighbours {
        dim,
        vectors: train.iter().flat_map(|e| quantise(&e.embedding)).collect(),
        gains: train.iter().map(Example::gain).collect(),
    }
}

/// Least squares with an L2 penalty, by Cholesky on the normal equations.
fn fit_ridge(train: &[Example], lambda: f32) -> Option<Ridge> {
    let first = train.first()?;
    let nf = first.text.features.len();
    let mut feature_mean = vec![0f32; nf];
    let mut feature_std = vec![0f32; nf];
    for e in train {
        for (m, &v) in feature_mean.iter_mut().zip(&e.text.features) {
            *m += v / train.len() as f32;
        }
    }
    for e in train {
        for ((sd, &m), &v) in feature_std
            .iter_mut()
            .zip(&feature_mean)
            .zip(&e.text.features)
        {
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
        for (xi, v) in x.iter_mut().zip(r.input(&e.embedding, &e.text.features)) {
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

/// How many parts the lexical ridge's out-of-fold training scores are
/// computed in.
const LEXICAL_FOLDS: usize = 5;

/// The lexical ridge: TF-IDF over the terms of at least `min_prompts`
/// training prompts, weights by conjugate gradients on the centred normal
/// equations (the matrix is sparse and too wide for Cholesky).
fn fit_lexical(train: &[&Example], lambda: f32, min_prompts: u32) -> Option<Lexical> {
    if train.is_empty() {
        return None;
    }
    let mut df: HashMap<u64, u32> = HashMap::new();
    for e in train {
        for &(k, _) in &e.text.terms {
            *df.entry(k).or_default() += 1;
        }
    }
    let mut keys: Vec<u64> = df
        .iter()
        .filter(|&(_, &n)| n >= min_prompts.max(1))
        .map(|(&k, _)| k)
        .collect();
    keys.sort_unstable();
    let n = train.len() as f64;
    let idf: Vec<f32> = keys
        .iter()
        .map(|k| ((1.0 + n) / (1.0 + f64::from(df[k]))).ln() as f32 + 1.0)
        .collect();
    let mut lex = Lexical {
        weights: vec![0.0; keys.len()],
        keys,
        idf,
        bias: 0.0,
    };
    let rows: Vec<Vec<(usize, f32)>> = train.iter().map(|e| lex.row(&e.text.terms)).collect();
    let y: Vec<f64> = train.iter().map(|e| f64::from(e.gain())).collect();
    let y_mean = y.iter().sum::<f64>() / n;
    let d = lex.keys.len();
    let mut mean = vec![0f64; d];
    for row in &rows {
        for &(i, v) in row {
            mean[i] += f64::from(v) / n;
        }
    }
    // A v for A = Xcᵀ Xc + λ I, Xc = X minus its column means.
    let apply = |v: &[f64]| -> Vec<f64> {
        let shift: f64 = mean.iter().zip(v).map(|(m, x)| m * x).sum();
        let mut out: Vec<f64> = v.iter().map(|x| f64::from(lambda) * x).collect();
        let mut total = 0.0;
        for row in &rows {
            let xv = row.iter().map(|&(i, x)| f64::from(x) * v[i]).sum::<f64>() - shift;
            for &(i, x) in row {
                out[i] += f64::from(x) * xv;
            }
            total += xv;
        }
        for (o, m) in out.iter_mut().zip(&mean) {
            *o -= m * total;
        }
        out
    };
    let mut b = vec![0f64; d];
    for (row, &yi) in rows.iter().zip(&y) {
        for &(i, x) in row {
            b[i] += f64::from(x) * (yi - y_mean);
        }
    }
    // Xcᵀ(y − ȳ) = Xᵀ(y − ȳ): the centred targets sum to zero.
    let w = conjugate_gradient(apply, &b, 1e-6, 1000);
    lex.bias = (y_mean - mean.iter().zip(&w).map(|(m, x)| m * x).sum::<f64>()) as f32;
    lex.weights = w.iter().map(|&x| x as f32).collect();
    Some(lex)
}

/// Solves `A x = b` for a symmetric positive definite `A` given as a
/// product, to a relative residual of `tol`.
fn conjugate_gradient(
    apply: impl Fn(&[f64]) -> Vec<f64>,
    b: &[f64],
    tol: f64,
    max_iter: usize,
) -> Vec<f64> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x = vec![0f64; b.len()];
    let mut r = b.to_vec();
    let mut p = r.clone();
    let mut rr = dot(&r, &r);
    let stop = tol * tol * rr;
    for _ in 0..max_iter {
        if rr <= stop || rr == 0.0 {
            break;
        }
        let ap = apply(&p);
        let alpha = rr / dot(&p, &ap);
        for ((xi, ri), (pi, api)) in x.iter_mut().zip(r.iter_mut()).zip(p.iter().zip(&ap)) {
            *xi += alpha * pi;
            *ri -= alpha * api;
        }
        let next = dot(&r, &r);
        let beta = next / rr;
        rr = next;
        for (pi, ri) in p.iter_mut().zip(&r) {
            *pi = ri + beta * *pi;
        }
    }
    x
}

/// Each training prompt's lexical score from a ridge fitted on the other
/// folds: what an unseen prompt would get, for the part's scale.
fn lexical_out_of_fold(train: &[Example], config: &TrainConfig) -> Vec<f32> {
    let mut out = vec![0f32; train.len()];
    for fold in 0..LEXICAL_FOLDS {
        let rest: Vec<&Example> = train
            .iter()
            .enumerate()
            .filter(|(i, _)| i % LEXICAL_FOLDS != fold)
            .map(|(_, e)| e)
            .collect();
        let Some(lex) = fit_lexical(&rest, config.lexical_lambda, config.lexical_min_prompts)
        else {
            continue;
        };
        for (i, e) in train.iter().enumerate() {
            if i % LEXICAL_FOLDS == fold {
                out[i] = lex.score(&e.text.terms);
            }
        }
    }
    out
}

/// Fewest read training prompts a probe is fitted on.
pub const PROBE_MIN_PROMPTS: usize = 100;

/// The probe and each read training prompt's out-of-fold probe score (in
/// the order of the read prompts), or `None` when fewer than
/// [`PROBE_MIN_PROMPTS`] were read (or their readings differ in width).
///
/// One pass gathers each fold's Gram matrix of standardised readings (and
/// a constant); every fit then sums the folds it keeps and solves by
/// Cholesky, so the five out-of-fold fits and the final one cost one pass
/// over the data.
fn fit_probe(read: &[(&Example, &[f32])], lambda: f32) -> Option<(Probe, Vec<f32>)> {
    let d = read.first()?.1.len();
    if read.len() < PROBE_MIN_PROMPTS || d == 0 || read.iter().any(|(_, r)| r.len() != d) {
        return None;
    }
    let n = read.len() as f64;
    let mut mean = vec![0f64; d];
    for (_, r) in read {
        for (m, &v) in mean.iter_mut().zip(*r) {
            *m += f64::from(v) / n;
        }
    }
    let mut sd = vec![0f64; d];
    for (_, r) in read {
        for ((s, &v), m) in sd.iter_mut().zip(*r).zip(&mean) {
            *s += (f64::from(v) - m).powi(2) / n;
        }
    }
    for s in &mut sd {
        *s = s.sqrt().max(1e-6);
    }
    let w = d + 1;
    let mut gram = vec![vec![0f64; w * w]; LEXICAL_FOLDS];
    let mut rhs = vec![vec![0f64; w]; LEXICAL_FOLDS];
    let mut z = vec![0f64; w];
    for (i, (e, r)) in read.iter().enumerate() {
        let f = i % LEXICAL_FOLDS;
        for (((zi, &v), m), s) in z.iter_mut().zip(*r).zip(&mean).zip(&sd) {
            *zi = (f64::from(v) - m) / s;
        }
        z[d] = 1.0;
        let y = f64::from(e.gain());
        let g = &mut gram[f];
        for a in 0..w {
            let za = z[a];
            for (gab, zb) in g[a * w..=a * w + a].iter_mut().zip(&z) {
                *gab += za * zb;
            }
        }
        for (b, zi) in rhs[f].iter_mut().zip(&z) {
            *b += zi * y;
        }
    }
    let solve = |skip: Option<usize>| -> Option<Vec<f64>> {
        let mut a = vec![0f64; w * w];
        let mut b = vec![0f64; w];
        for f in (0..LEXICAL_FOLDS).filter(|&f| Some(f) != skip) {
            for (x, g) in a.iter_mut().zip(&gram[f]) {
                *x += g;
            }
            for (x, r) in b.iter_mut().zip(&rhs[f]) {
                *x += r;
            }
        }
        for i in 0..w {
            for j in 0..i {
                a[j * w + i] = a[i * w + j];
            }
        }
        // The intercept goes unpenalised.
        for i in 0..d {
            a[i * w + i] += f64::from(lambda);
        }
        cholesky_solve(&mut a, &b, w)
    };
    let score = |coef: &[f64], r: &[f32]| -> f32 {
        let dot: f64 = r
            .iter()
            .zip(&mean)
            .zip(&sd)
            .zip(coef)
            .map(|(((&v, m), s), c)| c * (f64::from(v) - m) / s)
            .sum();
        (dot + coef[d]) as f32
    };
    let mut oof = vec![0f32; read.len()];
    for f in 0..LEXICAL_FOLDS {
        let coef = solve(Some(f))?;
        for (i, (_, r)) in read.iter().enumerate() {
            if i % LEXICAL_FOLDS == f {
                oof[i] = score(&coef, r);
            }
        }
    }
    let coef = solve(None)?;
    // Folding the standardisation in leaves one dot product per request.
    let weights: Vec<f64> = coef.iter().zip(&sd).map(|(c, s)| c / s).collect();
    let shift: f64 = weights.iter().zip(&mean).map(|(w, m)| w * m).sum();
    let probe = Probe {
        model: String::new(),
        layer: None,
        weights: weights.iter().map(|&v| v as f32).collect(),
        bias: (coef[d] - shift) as f32,
        // Set once the difficulty scales exist.
        reach: 1.0,
    };
    Some((probe, oof))
}

/// Topic centroids with each topic's mean gain (shrunk towards the overall
/// mean for topics with few prompts).
fn topics(train: &[Example]) -> Option<Topics> {
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
        .map(|(&g, &c)| (g + overall * Topics::SHRINK) / (c + Topics::SHRINK))
        .collect();
    Some(Topics {
        names,
        dim,
        centroids,
        gains,
    })
}

/// Factors a symmetric positive definite `a` in place into its lower
/// Cholesky factor; `None` when it is not positive definite.
fn cholesky(a: &mut [f64], n: usize) -> Option<()> {
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
    Some(())
}

/// Solves `l lᵀ x = b` with `l` from [`cholesky`].
fn cholesky_apply(l: &[f64], b: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0f64; n];
    for i in 0..n {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i * n + k] * y[k];
        }
        y[i] = s / l[i * n + i];
    }
    let mut x = vec![0f64; n];
    for i in (0..n).rev() {
        let mut s = y[i];
        for k in i + 1..n {
            s -= l[k * n + i] * x[k];
        }
        x[i] = s / l[i * n + i];
    }
    x
}

/// Solves `a x = b` for a symmetric positive definite `a` (overwritten).
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    cholesky(a, n)?;
    Some(cholesky_apply(a, b, n))
}

/// `y ≈ W x + b`, fitted by least squares with an L2 penalty: how the
/// pooled rows of a static table are mapped onto the encoder's sentence
/// vectors.
#[derive(Debug, Clone)]
pub struct LinearMap {
    /// Input width.
    pub inputs: usize,
    /// `outputs × inputs`, row-major.
    pub weights: Vec<f32>,
    /// One value an output.
    pub bias: Vec<f32>,
}

impl LinearMap {
    /// `W x` without the bias (what a table row becomes when the map is
    /// folded into it).
    pub fn linear(&self, x: &[f32]) -> Vec<f32> {
        self.weights
            .chunks_exact(self.inputs)
            .map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }
}

/// Fits a [`LinearMap`] from `x` to `y` (same count, each of one width);
/// `lambda` is the penalty per example. `None` when there is nothing to fit.
pub fn fit_linear_map(x: &[Vec<f32>], y: &[Vec<f32>], lambda: f64) -> Option<LinearMap> {
    let (d, m, n) = (x.first()?.len(), y.first()?.len(), x.len());
    if n != y.len() || d == 0 || m == 0 {
        return None;
    }
    let mean = |rows: &[Vec<f32>], w: usize| {
        let mut mu = vec![0f64; w];
        for r in rows {
            for (a, &v) in mu.iter_mut().zip(r) {
                *a += f64::from(v);
            }
        }
        mu.iter_mut().for_each(|a| *a /= n as f64);
        mu
    };
    let (mx, my) = (mean(x, d), mean(y, m));
    let mut a = vec![0f64; d * d];
    let mut b = vec![0f64; d * m];
    let mut xc = vec![0f64; d];
    for (xr, yr) in x.iter().zip(y) {
        for (c, (&v, mu)) in xc.iter_mut().zip(xr.iter().zip(&mx)) {
            *c = f64::from(v) - mu;
        }
        for i in 0..d {
            let xi = xc[i];
            for (aij, xj) in a[i * d..=i * d + i].iter_mut().zip(&xc) {
                *aij += xi * xj;
            }
            for (bij, (&yv, mu)) in b[i * m..(i + 1) * m].iter_mut().zip(yr.iter().zip(&my)) {
                *bij += xi * (f64::from(yv) - mu);
            }
        }
    }
    for i in 0..d {
        for j in 0..i {
            a[j * d + i] = a[i * d + j];
        }
        a[i * d + i] += lambda * n as f64;
    }
    cholesky(&mut a, d)?;
    let mut weights = vec![0f32; m * d];
    let mut col = vec![0f64; d];
    for o in 0..m {
        for (c, i) in col.iter_mut().zip(0..d) {
            *c = b[i * m + o];
        }
        let w = cholesky_apply(&a, &col, d);
        for (dst, v) in weights[o * d..(o + 1) * d].iter_mut().zip(&w) {
            *dst = *v as f32;
        }
    }
    let bias = (0..m)
        .map(|o| {
            let wx: f64 = (0..d).map(|i| f64::from(weights[o * d + i]) * mx[i]).sum();
            (my[o] - wx) as f32
        })
        .collect();
    Some(LinearMap {
        inputs: d,
        weights,
        bias,
    })
}

/// Smooth inverse frequency weights (Arora et al.): `a / (a + p)` for a
/// piece seen with probability `p` in `counts`' corpus, so that words every
/// prompt has weigh little in a mean. Unseen pieces weigh 1.
pub fn sif_weights(counts: &[u64], a: f64) -> Vec<f32> {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            if total == 0 {
                1.0
            } else {
                (a / (a + c as f64 / total as f64)) as f32
            }
        })
        .collect()
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

/// Fits the model `config` asks for and calibrates its threshold.
pub fn train(train: &[Example], config: TrainConfig, calibration: Calibration) -> RouterModel {
    let knn = config.kind.knn().then(|| neighbours(train));
    let ridge = if config.kind.ridge() {
        fit_ridge(train, config.ridge_lambda)
    } else {
        None
    };
    let topics = if config.kind.topics() {
        topics(train)
    } else {
        None
    };
    // Asked for alone, it is fitted whatever the size: there is no other part.
    let lexical = if config.kind.lexical()
        && (config.kind == ModelKind::Lexical || train.len() >= config.lexical_from)
    {
        let all: Vec<&Example> = train.iter().collect();
        fit_lexical(&all, config.lexical_lambda, config.lexical_min_prompts)
    } else {
        None
    };
    // Only the prompts the local model has read train the probe.
    let read: Vec<(usize, &[f32])> = train
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.text.reading.as_deref().map(|r| (i, r)))
        .collect();
    let fitted = fit_probe(
        &read
            .iter()
            .map(|&(i, r)| (&train[i], r))
            .collect::<Vec<_>>(),
        config.probe_lambda,
    );
    let (probe, probe_oof) = match fitted {
        Some((p, oof)) => (Some(p), Some(oof)),
        None => (None, None),
    };
    let mut model = RouterModel {
        version: 1,
        embedder: "all-minilm-l6-v2".into(),
        vectors: None,
        config,
        knn,
        ridge,
        topics,
        lexical,
        probe,
        knn_cdf: Vec::new(),
        ridge_cdf: Vec::new(),
        topics_cdf: Vec::new(),
        lexical_cdf: Vec::new(),
        probe_cdf: Vec::new(),
        cdf: Vec::new(),
        cdf_unread: Vec::new(),
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
            .map(|e| r.score(&e.embedding, &e.text.features))
            .collect()
    });
    let topics: Option<Vec<f32>> = model.topics.as_ref().map(|t| {
        train
            .iter()
            .map(|e| t.score(&e.embedding, model.config.topic_temperature))
            .collect()
    });
    let lexical: Option<Vec<f32>> = model
        .lexical
        .as_ref()
        .map(|_| lexical_out_of_fold(train, &model.config));
    let sorted = |v: &Option<Vec<f32>>| {
        let mut s = v.clone().unwrap_or_default();
        s.sort_by(f32::total_cmp);
        s
    };
    model.knn_cdf = sorted(&knn);
    model.ridge_cdf = sorted(&ridge);
    model.topics_cdf = sorted(&topics);
    model.lexical_cdf = sorted(&lexical);
    model.probe_cdf = sorted(&probe_oof);
    let raw = |i: usize, probe: Option<f32>| {
        model.combine(Parts {
            knn: knn.as_ref().map(|k| k[i]),
            ridge: ridge.as_ref().map(|r| r[i]),
            topics: topics.as_ref().map(|t| t[i]),
            lexical: lexical.as_ref().map(|l| l[i]),
            probe,
        })
    };
    let unread: Vec<f32> = (0..train.len()).map(|i| raw(i, None)).collect();
    // With a probe, the scale and the threshold are those of the prompts
    // that were read, scored by every part.
    let (raw, scored): (Vec<f32>, Vec<Outcome>) = match &probe_oof {
        Some(oof) => (
            read.iter()
                .zip(oof)
                .map(|(&(i, _), &p)| raw(i, Some(p)))
                .collect(),
            read.iter().map(|&(i, _)| train[i].outcome()).collect(),
        ),
        None => (unread.clone(), train.iter().map(Example::outcome).collect()),
    };
    let mut cdf = raw.clone();
    cdf.sort_by(f32::total_cmp);
    model.cdf = cdf;
    let scores: Vec<f32> = raw.iter().map(|&r| percentile(&model.cdf, r)).collect();
    if probe_oof.is_some() {
        let mut c = unread.clone();
        c.sort_by(f32::total_cmp);
        model.cdf_unread = c;
        // How far each reading moved its prompt's difficulty.
        let mut moved: Vec<f32> = read
            .iter()
            .zip(&scores)
            .map(|(&(i, _), d)| (d - percentile(&model.cdf_unread, unread[i])).abs())
            .collect();
        moved.sort_by(f32::total_cmp);
        let band = model.config.read_band;
        let reach = if band >= 1.0 {
            1.0
        } else {
            let at = (band.max(0.0) * moved.len() as f32).ceil() as usize;
            moved.get(at.saturating_sub(1)).copied().unwrap_or(1.0)
        };
        if let Some(p) = model.probe.as_mut() {
            p.reach = reach;
        }
    }
    let (threshold, why) = calibrate(&scores, &scored, calibration);
    model.threshold = threshold;
    model.calibrated_for = why;
    model.quality_thresholds = quality_thresholds(&scores, &scored);
    model
}

/// For every whole percent of the weak-to-strong gap, the highest threshold
/// whose cloud share recovers it.
fn quality_thresholds(scores: &[f32], data: &[Outcome]) -> Vec<f32> {
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
pub fn calibrate(scores: &[f32], data: &[Outcome], calibration: Calibration) -> (f32, String) {
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

fn curve(scores: &[f32], data: &[Outcome]) -> Curve {
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
    /// Prompts scored.
    pub prompts: usize,
    /// The weak model's accuracy alone.
    pub weak_accuracy: f64,
    /// The strong model's accuracy alone.
    pub strong_accuracy: f64,
    /// Mean share of the quality gap recovered, over every cloud share.
    pub apgr: f64,
    /// Smallest cloud share recovering 50% / 80% of the gap.
    pub cpt50: f64,
    /// See `cpt50`.
    pub cpt80: f64,
    /// Largest share kept local with accuracy >= 95% of the strong model's.
    pub local_share_at_95: f64,
    /// The same for a random ordering (mean of several shuffles).
    pub random_apgr: f64,
    /// See `random_apgr`.
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

/// The metrics of an ordering (`scores`) of `data`.
pub fn metrics(scores: &[f32], data: &[Outcome]) -> Metrics {
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

/// The prompts of `data` the model was not trained on.
fn unseen<'a>(model: &RouterModel, data: &'a [Example]) -> Vec<&'a Example> {
    let seen: std::collections::HashSet<&str> =
        model.trained_on.iter().map(String::as_str).collect();
    data.iter()
        .filter(|e| !seen.contains(e.id.as_str()))
        .collect()
}

/// Metrics overall and per source, on `data` (prompts the model was not
/// trained on; others are skipped).
pub fn evaluate(model: &RouterModel, data: &[Example]) -> (Metrics, Vec<(String, Metrics)>) {
    let unseen = unseen(model, data);
    let scores: Vec<f32> = unseen
        .iter()
        .map(|e| model.score(&e.embedding, &e.text))
        .collect();
    let outcomes: Vec<Outcome> = unseen.iter().map(|e| e.outcome()).collect();
    let overall = metrics(&scores, &outcomes);
    let mut by_source: HashMap<&str, (Vec<f32>, Vec<Outcome>)> = HashMap::new();
    for ((e, s), o) in unseen.iter().zip(&scores).zip(&outcomes) {
        let entry = by_source.entry(e.source.as_str()).or_default();
        entry.0.push(*s);
        entry.1.push(*o);
    }
    let mut per: Vec<(String, Metrics)> = by_source
        .into_iter()
        .map(|(src, (s, d))| (src.to_owned(), metrics(&s, &d)))
        .collect();
    per.sort_by(|a, b| a.0.cmp(&b.0));
    (overall, per)
}

/// What reading only within the probe's reach does at a threshold in
/// force — the router's calibrated one, or the one a held cloud share puts
/// in its place — against reading every prompt and reading none, on the
/// read prompts of `data` the model was not trained on.
#[derive(Debug, Clone, Serialize)]
pub struct BandReport {
    /// Prompts compared (unseen and read).
    pub prompts: usize,
    /// The probe's reach.
    pub reach: f32,
    /// The cloud share held (`None`: the calibrated threshold).
    pub share: Option<f64>,
    /// The threshold compared at.
    pub threshold: f32,
    /// Share of the prompts read.
    pub read: f64,
    /// Share of decisions equal to those reading every prompt makes.
    pub agree: f64,
    /// Accuracy reading every prompt, within the reach, and none.
    pub accuracy: [f64; 3],
    /// Share sent to the cloud, in the same order.
    pub cloud: [f64; 3],
}

/// The cloud shares [`band_report`] is also looked at under by `tandem
/// router train` and `eval`: one below and one above where the calibrated
/// thresholds usually send prompts out.
pub const HELD_SHARES: [f64; 2] = [0.2, 0.6];

/// See [`BandReport`]: at the calibrated threshold (`share` `None`), or at
/// the cut that lets `share` of these prompts out reading every one — where
/// a cloud share held at `share` puts its threshold on such traffic.
/// `None` for a router without a probe or no unseen prompt read.
pub fn band_report(
    model: &RouterModel,
    data: &[Example],
    share: Option<f64>,
) -> Option<BandReport> {
    let reach = model.probe.as_ref()?.reach;
    let unseen: Vec<&Example> = unseen(model, data)
        .into_iter()
        .filter(|e| e.text.reading.is_some())
        .collect();
    if unseen.is_empty() {
        return None;
    }
    let scored: Vec<(f32, f32)> = unseen
        .iter()
        .map(|e| {
            (
                model.score(&e.embedding, &e.text),
                model.score_with(&e.embedding, &e.text, None),
            )
        })
        .collect();
    let t = match share {
        Some(s) => tandem_policy::share::cut(scored.iter().map(|&(all, _)| all).collect(), s),
        None => model.threshold,
    };
    let n = unseen.len() as f64;
    let (mut read, mut agree) = (0usize, 0usize);
    let (mut correct, mut cloud) = ([0usize; 3], [0usize; 3]);
    for (e, &(all, none)) in unseen.iter().zip(&scored) {
        let reads = (none - t).abs() <= reach;
        read += usize::from(reads);
        let band = if reads { all } else { none };
        agree += usize::from((band >= t) == (all >= t));
        for (k, d) in [all, band, none].into_iter().enumerate() {
            let out = d >= t;
            cloud[k] += usize::from(out);
            correct[k] += usize::from(if out { e.strong } else { e.weak });
        }
    }
    Some(BandReport {
        prompts: unseen.len(),
        reach,
        share,
        threshold: t,
        read: read as f64 / n,
        agree: agree as f64 / n,
        accuracy: correct.map(|c| c as f64 / n),
        cloud: cloud.map(|c| c as f64 / n),
    })
}

/// The router alone and the router with a memory of outcomes learned
/// online, on `data` in order (prompts the model was trained on skipped):
/// each prompt is scored with what the earlier ones taught, then its own
/// outcome is remembered — escalated when the weak model got it wrong, as a
/// cascade that judged perfectly would have decided.
pub fn evaluate_online(
    model: &RouterModel,
    data: &[Example],
    cfg: &tandem_policy::memory::MemoryConfig,
) -> (Metrics, Metrics) {
    use tandem_policy::memory::{Outcomes, blend};
    let unseen = unseen(model, data);
    let mut memory = Outcomes::new(cfg.max_entries);
    let (mut alone, mut with) = (Vec::new(), Vec::new());
    for e in &unseen {
        let d = model.score(&e.embedding, &e.text);
        alone.push(d);
        with.push(blend(d, memory.estimate("", &e.embedding, cfg), cfg.prior));
        memory.push(tandem_policy::memory::Outcome::new(
            "",
            &e.embedding,
            !e.weak,
        ));
    }
    let outcomes: Vec<Outcome> = unseen.iter().map(|e| e.outcome()).collect();
    (metrics(&alone, &outcomes), metrics(&with, &outcomes))
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
mod tests;
