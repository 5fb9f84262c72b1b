//! A BERT encoder on the CPU: the forward pass of a 6-layer, 384-wide model
//! (MiniLM, the PII recognizer) written against `gemm` directly.
//!
//! Why not a general tensor library: at these sizes (a few hundred tokens,
//! 384 wide) a forward pass is a dozen matrix products per layer, and what
//! decides the time is whether they run at the kernel's speed. Weights are
//! kept transposed for the fast row-major path, the query, key and value
//! projections are one product, and nothing is allocated per operation;
//! measured here, that is about twice the throughput of candle's BERT on the
//! same model (see the README). Numerics follow Hugging Face's `BertModel`
//! exactly: erf GELU, LayerNorm with the model's epsilon, f32 throughout.

use gemm::Parallelism;

/// A LayerNorm's parameters.
#[derive(Debug, Clone)]
pub struct Norm {
    /// Scale.
    pub weight: Vec<f32>,
    /// Shift.
    pub bias: Vec<f32>,
}

/// A dense layer, stored as `[inputs × outputs]` row-major (the transpose
/// of PyTorch's `Linear.weight`).
#[derive(Debug, Clone)]
pub struct Dense {
    /// Inputs.
    pub inputs: usize,
    /// Outputs.
    pub outputs: usize,
    /// `inputs × outputs`, row-major.
    pub weight: Vec<f32>,
    /// One per output.
    pub bias: Vec<f32>,
}

impl Dense {
    /// A dense layer from PyTorch's `[outputs × inputs]` weight.
    pub fn from_torch(outputs: usize, inputs: usize, weight: &[f32], bias: Vec<f32>) -> Dense {
        let mut w = vec![0f32; inputs * outputs];
        for o in 0..outputs {
            for i in 0..inputs {
                w[i * outputs + o] = weight[o * inputs + i];
            }
        }
        Dense {
            inputs,
            outputs,
            weight: w,
            bias,
        }
    }

    /// Several layers with the same inputs as one (their outputs side by
    /// side): the query, key and value projections in one product.
    pub fn concat(parts: &[Dense]) -> Dense {
        let inputs = parts.first().map_or(0, |p| p.inputs);
        let outputs: usize = parts.iter().map(|p| p.outputs).sum();
        let mut weight = vec![0f32; inputs * outputs];
        let mut bias = Vec::with_capacity(outputs);
        let mut at = 0;
        for p in parts {
            for i in 0..inputs {
                weight[i * outputs + at..i * outputs + at + p.outputs]
                    .copy_from_slice(&p.weight[i * p.outputs..(i + 1) * p.outputs]);
            }
            bias.extend_from_slice(&p.bias);
            at += p.outputs;
        }
        Dense {
            inputs,
            outputs,
            weight,
            bias,
        }
    }
}

/// One transformer layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Query, key and value projections, side by side.
    pub qkv: Dense,
    /// The attention output projection.
    pub output: Dense,
    /// LayerNorm after attention.
    pub attention_norm: Norm,
    /// The feed-forward expansion.
    pub up: Dense,
    /// The feed-forward projection back.
    pub down: Dense,
    /// LayerNorm after the feed-forward.
    pub output_norm: Norm,
}

/// A whole BERT model's weights.
#[derive(Debug, Clone)]
pub struct BertWeights {
    /// Width of the hidden states.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Word embeddings, `vocab × hidden`.
    pub words: Vec<f32>,
    /// Position embeddings, `positions × hidden`.
    pub positions: Vec<f32>,
    /// Token-type embeddings, `types × hidden`.
    pub token_types: Vec<f32>,
    /// LayerNorm of the embeddings.
    pub embedding_norm: Norm,
    /// The transformer layers.
    pub layers: Vec<Layer>,
    /// LayerNorm epsilon.
    pub eps: f32,
}

impl BertWeights {
    /// Words in the vocabulary.
    pub fn vocab(&self) -> usize {
        self.words.len() / self.hidden.max(1)
    }

    /// Longest input, in tokens.
    pub fn max_positions(&self) -> usize {
        self.positions.len() / self.hidden.max(1)
    }

    /// Checks that every tensor has the size the others imply.
    pub fn check(&self) -> Result<(), String> {
        let h = self.hidden;
        if h == 0 || self.heads == 0 || !h.is_multiple_of(self.heads) {
            return Err(format!(
                "hidden size {h} and {} heads do not fit",
                self.heads
            ));
        }
        let norm = |n: &Norm, what: &str| {
            if n.weight.len() != h || n.bias.len() != h {
                Err(format!("{what}: LayerNorm of the wrong size"))
            } else {
                Ok(())
            }
        };
        let dense = |d: &Dense, i: usize, o: usize, what: &str| {
            if d.inputs != i || d.outputs != o || d.weight.len() != i * o || d.bias.len() != o {
                Err(format!("{what}: expected {i} -> {o}"))
            } else {
                Ok(())
            }
        };
        if self.words.is_empty() || !self.words.len().is_multiple_of(h) {
            return Err("word embeddings of the wrong size".into());
        }
        if self.positions.is_empty() || !self.positions.len().is_multiple_of(h) {
            return Err("position embeddings of the wrong size".into());
        }
        if self.token_types.len() < h {
            return Err("token-type embeddings of the wrong size".into());
        }
        norm(&self.embedding_norm, "embeddings")?;
        for (i, l) in self.layers.iter().enumerate() {
            let what = format!("layer {i}");
            dense(&l.qkv, h, 3 * h, &what)?;
            dense(&l.output, h, h, &what)?;
            dense(&l.up, h, l.up.outputs, &what)?;
            dense(&l.down, l.up.outputs, h, &what)?;
            norm(&l.attention_norm, &what)?;
            norm(&l.output_norm, &what)?;
        }
        Ok(())
    }
}

/// `c[m × n] = a[m × k] · b[k × n] (+ c when accumulate)`, with the strides
/// given (row, column) for each.
#[allow(clippy::too_many_arguments)]
fn matmul(
    m: usize,
    k: usize,
    n: usize,
    a: (&[f32], usize, usize),
    b: (&[f32], usize, usize),
    c: (&mut [f32], usize),
    par: Parallelism,
) {
    debug_assert!(m == 0 || a.0.len() > (m - 1) * a.1 + (k.max(1) - 1) * a.2);
    debug_assert!(k == 0 || b.0.len() > (k - 1) * b.1 + (n.max(1) - 1) * b.2);
    debug_assert!(m == 0 || c.0.len() >= (m - 1) * c.1 + n);
    // SAFETY: the slices cover every element the strides reach (checked
    // above in debug builds, and guaranteed by the callers' shapes), `c`
    // does not alias `a` or `b`, and gemm writes only inside `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0.as_mut_ptr(),
            1,
            c.1 as isize,
            false,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Output columns per panel of a packed weight: one 512-bit vector, or two
/// 256-bit ones.
const LANES: usize = 16;
/// Rows of the input multiplied against a panel at once: as many as keep
/// their accumulators in registers. AVX-512 has 32 vector registers (8 rows
/// × 1 register); AVX2 has 16, and 8 rows × 2 registers would leave none
/// for the weights, so 6 rows (12 accumulators, as BLIS's Haswell kernel).
#[cfg(target_feature = "avx512f")]
const ROWS: usize = 8;
#[cfg(not(target_feature = "avx512f"))]
const ROWS: usize = 6;

/// A dense layer's weight in panels of [`LANES`] output columns, each panel
/// `inputs × LANES` row-major (outputs padded with zeros to whole panels):
/// a panel stays in cache while every input row passes over it.
#[derive(Debug, Clone)]
pub struct Packed {
    inputs: usize,
    outputs: usize,
    panels: Vec<f32>,
    bias: Vec<f32>,
}

impl Packed {
    /// Packs `d`.
    pub fn new(d: &Dense) -> Packed {
        let count = d.outputs.div_ceil(LANES);
        let mut panels = vec![0f32; count * d.inputs * LANES];
        for p in 0..count {
            for i in 0..d.inputs {
                for j in 0..LANES {
                    let o = p * LANES + j;
                    if o < d.outputs {
                        panels[(p * d.inputs + i) * LANES + j] = d.weight[i * d.outputs + o];
                    }
                }
            }
        }
        Packed {
            inputs: d.inputs,
            outputs: d.outputs,
            panels,
            bias: d.bias.clone(),
        }
    }

    /// Outputs.
    pub fn outputs(&self) -> usize {
        self.outputs
    }
}

#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    // Fused only where the CPU has the instruction; elsewhere `mul_add`
    // would be a slow library call.
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

/// `R` rows of `x` (from `r0`) times one panel `w`, plus the bias, into
/// `out`. `R` is fixed so that the accumulators stay in registers.
#[inline(always)]
fn block<const R: usize>(
    d: &Packed,
    x: &[f32],
    r0: usize,
    p: usize,
    w: &[f32],
    cols: usize,
    out: &mut [f32],
) {
    let k = d.inputs;
    let mut acc = [[0f32; LANES]; R];
    assert!(x.len() >= (r0 + R) * k && w.len() >= k * LANES);
    let xs = x.as_ptr();
    let ws = w.as_ptr();
    for kk in 0..k {
        // SAFETY: kk < k, r < R and the assert above: every read is inside
        // `x` and `w`. Unchecked reads keep the loop free of bounds checks,
        // which otherwise push the accumulators out of registers.
        let wv: [f32; LANES] = unsafe { std::ptr::read_unaligned(ws.add(kk * LANES).cast()) };
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = unsafe { *xs.add((r0 + r) * k + kk) };
            for (c, w) in acc.iter_mut().zip(&wv) {
                *c = fma(a, *w, *c);
            }
        }
    }
    let bias = &d.bias[p * LANES..p * LANES + cols];
    for (r, row) in acc.iter().enumerate() {
        let o = &mut out[(r0 + r) * d.outputs + p * LANES..][..cols];
        for ((o, v), b) in o.iter_mut().zip(row).zip(bias) {
            *o = v + b;
        }
    }
}

/// `out[rows] = x[rows] · panel p + bias` for the panels in `panels`.
fn dense_panels(d: &Packed, x: &[f32], n: usize, panels: std::ops::Range<usize>, out: &mut [f32]) {
    let k = d.inputs;
    for p in panels {
        let w = &d.panels[p * k * LANES..(p + 1) * k * LANES];
        let cols = (d.outputs - p * LANES).min(LANES);
        let mut r0 = 0;
        while r0 + ROWS <= n {
            block::<ROWS>(d, x, r0, p, w, cols, out);
            r0 += ROWS;
        }
        while r0 < n {
            block::<1>(d, x, r0, p, w, cols, out);
            r0 += 1;
        }
    }
}

/// `out = x · d + bias` for `n` rows, on up to `threads` cores (each takes
/// a share of the panels).
fn dense(d: &Packed, x: &[f32], n: usize, out: &mut [f32], threads: usize) {
    let count = d.outputs.div_ceil(LANES);
    if threads <= 1 || n < 8 || count < 2 {
        dense_panels(d, x, n, 0..count, out);
        return;
    }
    // Each thread writes its own columns of every row: disjoint, but not
    // contiguous, so the halves are computed into their own buffers.
    let half = count / 2;
    let mut right = vec![0f32; n * d.outputs];
    rayon::join(
        || dense_panels(d, x, n, 0..half, out),
        || dense_panels(d, x, n, half..count, &mut right),
    );
    for (o, r) in out[..n * d.outputs]
        .chunks_exact_mut(d.outputs)
        .zip(right.chunks_exact(d.outputs))
    {
        o[half * LANES..].copy_from_slice(&r[half * LANES..]);
    }
}

fn layer_norm(x: &mut [f32], width: usize, n: &Norm, eps: f32) {
    let mut sq = vec![0f32; width];
    for row in x.chunks_exact_mut(width) {
        let mean = sum(row) / width as f32;
        for (s, v) in sq.iter_mut().zip(row.iter()) {
            *s = (v - mean) * (v - mean);
        }
        let var = sum(&sq) / width as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, w), b) in row.iter_mut().zip(&n.weight).zip(&n.bias) {
            *v = (*v - mean) * inv * w + b;
        }
    }
}

/// `e^x` to f32 precision (relative error about 2e-7), branch-free so that
/// loops over it vectorise: `2^k · e^r` with `r` in `[-ln2/2, ln2/2]` and a
/// degree-6 polynomial for `e^r`.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let k = (x * std::f32::consts::LOG2_E + 0.5).floor();
    // ln 2 in two parts, so that `x - k ln 2` loses nothing.
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (0.166_666_67
                    + r * (0.041_666_668 + r * (0.008_333_334 + r * 0.001_388_889)))));
    // SAFETY: `x` is clamped, so `k` is a whole number in [-126, 127]:
    // representable, and `k + 127` is a valid biased exponent.
    let e = unsafe { k.to_int_unchecked::<i32>() } + 127;
    p * f32::from_bits((e as u32) << 23)
}

/// The sum of `v`, in sixteen lanes so that it vectorises.
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `erf(x)` with an absolute error below 2e-7 (Abramowitz and Stegun
/// 7.1.26), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - t * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))))
            * exp(-a * a);
    y.copysign(x)
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// A layer with its weights packed for [`dense`].
#[derive(Debug)]
struct PackedLayer {
    qkv: Packed,
    output: Packed,
    attention_norm: Norm,
    up: Packed,
    down: Packed,
    output_norm: Norm,
}

/// A BERT encoder ready to run.
#[derive(Debug)]
pub struct Encoder {
    weights: BertWeights,
    layers: Vec<PackedLayer>,
    threads: usize,
}

impl Encoder {
    /// An encoder over `weights`, using up to `threads` cores per product.
    pub fn new(weights: BertWeights, threads: usize) -> Result<Encoder, String> {
        weights.check()?;
        let mut weights = weights;
        let layers = std::mem::take(&mut weights.layers)
            .into_iter()
            .map(|l| PackedLayer {
                qkv: Packed::new(&l.qkv),
                output: Packed::new(&l.output),
                attention_norm: l.attention_norm,
                up: Packed::new(&l.up),
                down: Packed::new(&l.down),
                output_norm: l.output_norm,
            })
            .collect();
        Ok(Encoder {
            weights,
            layers,
            threads: threads.max(1),
        })
    }

    /// Width of its hidden states.
    pub fn hidden(&self) -> usize {
        self.weights.hidden
    }

    /// Longest input, in tokens.
    pub fn max_positions(&self) -> usize {
        self.weights.max_positions()
    }

    /// The last hidden state of every token, `ids.len() × hidden`. Ids past
    /// the vocabulary read as id 0 (the padding token); inputs longer than
    /// the model's positions are cut.
    pub fn forward(&self, ids: &[u32]) -> Vec<f32> {
        let w = &self.weights;
        let h = w.hidden;
        let n = ids.len().min(w.max_positions());
        if n == 0 {
            return Vec::new();
        }
        let threads = self.threads;
        let vocab = w.vocab();
        let mut x = vec![0f32; n * h];
        for (t, (&id, row)) in ids.iter().zip(x.chunks_exact_mut(h)).enumerate() {
            let id = if (id as usize) < vocab {
                id as usize
            } else {
                0
            };
            let word = &w.words[id * h..(id + 1) * h];
            let pos = &w.positions[t * h..(t + 1) * h];
            let kind = &w.token_types[..h];
            for i in 0..h {
                row[i] = word[i] + pos[i] + kind[i];
            }
        }
        layer_norm(&mut x, h, &w.embedding_norm, w.eps);

        let heads = w.heads;
        let d = h / heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut qkv = vec![0f32; n * 3 * h];
        let mut scores = vec![0f32; n * n];
        let mut context = vec![0f32; n * h];
        let mut attn = vec![0f32; n * h];
        let ff = self.layers.first().map_or(0, |l| l.up.outputs);
        let mut inner = vec![0f32; n * ff];
        for l in &self.layers {
            dense(&l.qkv, &x, n, &mut qkv, threads);
            for head in 0..heads {
                let q = &qkv[head * d..];
                let k = &qkv[h + head * d..];
                let v = &qkv[2 * h + head * d..];
                // scores = q · kᵀ
                matmul(
                    n,
                    d,
                    n,
                    (q, 3 * h, 1),
                    (k, 1, 3 * h),
                    (&mut scores, n),
                    Parallelism::None,
                );
                for row in scores.chunks_exact_mut(n) {
                    let max = row.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s * scale));
                    for s in row.iter_mut() {
                        *s = exp(*s * scale - max);
                    }
                    let inv = 1.0 / sum(row);
                    for s in row.iter_mut() {
                        *s *= inv;
                    }
                }
                // context[:, head] = scores · v
                matmul(
                    n,
                    n,
                    d,
                    (&scores, n, 1),
                    (v, 3 * h, 1),
                    (&mut context[head * d..], h),
                    Parallelism::None,
                );
            }
            dense(&l.output, &context, n, &mut attn, threads);
            for (a, r) in attn.iter_mut().zip(&x) {
                *a += r;
            }
            layer_norm(&mut attn, h, &l.attention_norm, w.eps);
            dense(&l.up, &attn, n, &mut inner, threads);
            for v in inner.iter_mut() {
                *v = gelu(*v);
            }
            dense(&l.down, &inner, n, &mut x, threads);
            for (o, r) in x.iter_mut().zip(&attn) {
                *o += r;
            }
            layer_norm(&mut x, h, &l.output_norm, w.eps);
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_matches_a_plain_loop_and_concat_keeps_outputs() {
        let a = Dense::from_torch(2, 3, &[1., 2., 3., 4., 5., 6.], vec![0.5, -1.]);
        let b = Dense::from_torch(1, 3, &[1., 0., -1.], vec![2.]);
        let x = [1f32, 1., 1., 0., 1., 2.];
        let mut out = vec![0f32; 2 * 2];
        dense(&Packed::new(&a), &x, 2, &mut out, 1);
        assert_eq!(out, vec![6.5, 14.0, 8.5, 16.0]);
        let ab = Dense::concat(&[a, b]);
        let mut out = vec![0f32; 2 * 3];
        dense(&Packed::new(&ab), &x, 2, &mut out, 1);
        assert_eq!(out, vec![6.5, 14.0, 2.0, 8.5, 16.0, 0.0]);
        // Many rows and panels, split over two threads, against a loop.
        let (rows, ins, outs) = (37, 50, 70);
        let w: Vec<f32> = (0..ins * outs)
            .map(|i| ((i * 7) % 13) as f32 - 6.0)
            .collect();
        let d = Dense {
            inputs: ins,
            outputs: outs,
            weight: w.clone(),
            bias: (0..outs).map(|o| o as f32).collect(),
        };
        let x: Vec<f32> = (0..rows * ins)
            .map(|i| ((i * 5) % 11) as f32 - 5.0)
            .collect();
        let mut got = vec![0f32; rows * outs];
        dense(&Packed::new(&d), &x, rows, &mut got, 2);
        for r in 0..rows {
            for o in 0..outs {
                let want: f32 = o as f32
                    + (0..ins)
                        .map(|i| x[r * ins + i] * w[i * outs + o])
                        .sum::<f32>();
                assert_eq!(got[r * outs + o], want, "row {r} column {o}");
            }
        }
    }

    #[test]
    fn gelu_is_the_erf_form() {
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-2.0) - -0.045_500_26).abs() < 1e-6);
        // Abramowitz–Stegun 7.1.26 is within 1.5e-7 in exact arithmetic; f32
        // rounding of its terms adds a few ulps. The tanh approximation that
        // this guards against is off by up to 1e-3.
        for i in -400..400 {
            let x = i as f32 / 50.0;
            assert!((erf(x) - libm::erff(x)).abs() < 6e-7, "erf({x})");
            let (a, b) = (exp(x), x.exp());
            assert!(((a - b) / b).abs() < 3e-7, "exp({x}): {a} vs {b}");
        }
        assert_eq!(exp(-200.0), exp(-87.0));
    }
}
