//! A BERT encoder on the CPU: the forward pass of a 6-layer, 384-wide model
//! (MiniLM, the PII recognizer): dense products in our own packed kernels
//! (AVX-512 or AVX2 where the CPU has them, plain Rust elsewhere),
//! attention through `gemm`.
//!
//! Why not a general tensor library: at these sizes (a few hundred tokens,
//! 384 wide) a forward pass is a dozen matrix products per layer, and what
//! decides the time is whether they run at the vector unit's speed. Weights
//! are packed in panels once, the query, key and value projections are one
//! product, attention heads and the feed-forward's GELU are split over two
//! cores. Numerics follow Hugging Face's `BertModel` exactly in
//! [`Precision::F32`] (erf GELU, LayerNorm with the model's epsilon); a
//! 4-bit model can instead run its products in integers
//! ([`Precision::Int8`], see [`crate::quant`]).

use gemm::Parallelism;

use crate::quant::{self, Kernel, Q4};

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
    /// Set when every weight is a whole 4-bit step (−8..=7) of a scale per
    /// block of [`quant::BLOCK`] inputs, as a 4-bit model file stores it:
    /// the scales, `(inputs / 32) × outputs`. Such a layer can run in
    /// integers ([`quant`]) with its weights unchanged.
    pub blocks: Option<Vec<f32>>,
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
            blocks: None,
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
        // Side by side, a block row of scales is each part's row in turn.
        let rows = inputs / quant::BLOCK;
        let blocks = parts
            .iter()
            .map(|p| p.blocks.as_ref().filter(|b| b.len() == rows * p.outputs))
            .collect::<Option<Vec<_>>>()
            .filter(|_| inputs.is_multiple_of(quant::BLOCK))
            .map(|each| {
                (0..rows)
                    .flat_map(|r| {
                        each.iter()
                            .zip(parts)
                            .flat_map(move |(b, p)| b[r * p.outputs..(r + 1) * p.outputs].iter())
                    })
                    .copied()
                    .collect()
            });
        Dense {
            inputs,
            outputs,
            weight,
            bias,
            blocks,
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
/// Rows of the input multiplied against a panel at once by the portable
/// kernel (the x86 kernels choose their own, see [`simd`]).
const ROWS: usize = 4;

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
fn dense_panels(
    d: &Packed,
    x: &[f32],
    n: usize,
    panels: std::ops::Range<usize>,
    out: &mut [f32],
    cap: Kernel,
) {
    assert!(x.len() >= n * d.inputs && out.len() >= n * d.outputs);
    #[cfg(target_arch = "x86_64")]
    if cap > Kernel::Portable
        && simd::dense_panels(d, x, n, panels.clone(), out, cap > Kernel::Avx2)
    {
        return;
    }
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

/// The dense product written with x86 vector instructions, chosen at run
/// time. Written out rather than left to the compiler because, left to
/// itself, it keeps AVX-512 code to 256-bit registers and spills the
/// accumulators to the stack on every step of the inner loop (measured:
/// 29 GFLOP/s a core on a Xeon whose AVX-512 peak is over 100).
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{LANES, Packed};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Runs the product with the widest kernel the CPU has (up to AVX2
    /// when `!wide`, so that tests reach that kernel too); `false` when it
    /// has neither AVX-512 nor AVX2 with FMA.
    pub(super) fn dense_panels(
        d: &Packed,
        x: &[f32],
        n: usize,
        panels: Range<usize>,
        out: &mut [f32],
        wide: bool,
    ) -> bool {
        if panels.end * d.inputs * LANES > d.panels.len()
            || x.len() < n * d.inputs
            || out.len() < n * d.outputs
        {
            return false;
        }
        if wide && is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above) and the slices
            // hold every element the kernels read or write (checked above:
            // `n` rows of `x` and `out`, whole panels of the weight).
            unsafe { panels_avx512(d, x, n, panels, out) };
            true
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above, for AVX2 and FMA.
            unsafe { panels_avx2(d, x, n, panels, out) };
            true
        } else {
            false
        }
    }

    /// Bias plus the accumulated row, into the row's `cols` outputs of a
    /// panel.
    #[inline(always)]
    fn finish(acc: &[f32; LANES], bias: &[f32], out: &mut [f32]) {
        for ((o, a), b) in out.iter_mut().zip(acc).zip(bias) {
            *o = a + b;
        }
    }

    /// Inputs taken at a time: a stretch of two panels (16 KB) stays in the
    /// first-level cache while every row block passes over it, instead of
    /// coming from the second level once per block.
    const CHUNK: usize = 256;

    /// Two panels at a time, twelve rows: 24 of the 32 vector registers
    /// accumulate, two hold the weights, one the broadcast input.
    #[target_feature(enable = "avx512f")]
    unsafe fn panels_avx512(
        d: &Packed,
        x: &[f32],
        n: usize,
        panels: Range<usize>,
        out: &mut [f32],
    ) {
        let mut k0 = 0;
        while k0 < d.inputs {
            let k1 = (k0 + CHUNK).min(d.inputs);
            let mut p = panels.start;
            while p < panels.end {
                let two = p + 1 < panels.end;
                let mut r0 = 0;
                while r0 < n {
                    let left = n - r0;
                    let s = Step { r0, p, k0, k1 };
                    // SAFETY (each call): rows r0..r0 + R ≤ n, panels
                    // p..p + P ≤ panels.end and inputs k0..k1 ≤ d.inputs, all
                    // inside the slices (checked by the caller).
                    unsafe {
                        match (two, left) {
                            (true, 12..) => block512::<12, 2>(d, x, s, out),
                            (true, 4..) => block512::<4, 2>(d, x, s, out),
                            (true, _) => block512::<1, 2>(d, x, s, out),
                            (false, 12..) => block512::<12, 1>(d, x, s, out),
                            (false, 4..) => block512::<4, 1>(d, x, s, out),
                            (false, _) => block512::<1, 1>(d, x, s, out),
                        }
                    }
                    r0 += match left {
                        12.. => 12,
                        4.. => 4,
                        _ => 1,
                    };
                }
                p += if two { 2 } else { 1 };
            }
            k0 = k1;
        }
    }

    /// Where a block starts: its first row, first panel, and the inputs it
    /// adds (`k0` = 0 starts from the bias, later stretches from `out`).
    #[derive(Clone, Copy)]
    struct Step {
        r0: usize,
        p: usize,
        k0: usize,
        k1: usize,
    }

    /// `R` rows of `x` times panels `p..p + P` over inputs `k0..k1`, added
    /// to the bias (first stretch) or to what `out` holds.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn block512<const R: usize, const P: usize>(
        d: &Packed,
        x: &[f32],
        s: Step,
        out: &mut [f32],
    ) {
        let k = d.inputs;
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for (r, acc) in acc.iter_mut().enumerate() {
            for (j, v) in acc.iter_mut().enumerate() {
                let q = s.p + j;
                let cols = (d.outputs - q * LANES).min(LANES);
                let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
                let from = if s.k0 == 0 {
                    &d.bias[q * LANES..q * LANES + cols]
                } else {
                    let at = (s.r0 + r) * d.outputs + q * LANES;
                    &out[at..at + cols]
                };
                // SAFETY: the mask keeps the load to `from`'s `cols` floats.
                *v = unsafe { _mm512_maskz_loadu_ps(mask, from.as_ptr()) };
            }
        }
        let xs = x.as_ptr().wrapping_add(s.r0 * k);
        let ws = d.panels.as_ptr().wrapping_add(s.p * k * LANES);
        for kk in s.k0..s.k1 {
            let mut w = [_mm512_setzero_ps(); P];
            for (j, w) in w.iter_mut().enumerate() {
                // SAFETY: panel p + j < panels.end, kk < k.
                *w = unsafe { _mm512_loadu_ps(ws.add((j * k + kk) * LANES)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r0 + r < n, kk < k.
                let a = _mm512_set1_ps(unsafe { *xs.add(r * k + kk) });
                for (c, w) in acc.iter_mut().zip(&w) {
                    *c = _mm512_fmadd_ps(a, *w, *c);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (j, v) in acc.iter().enumerate() {
                let q = s.p + j;
                let cols = (d.outputs - q * LANES).min(LANES);
                let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
                let at = (s.r0 + r) * d.outputs + q * LANES;
                let to = &mut out[at..at + cols];
                // SAFETY: the mask keeps the store to `to`'s `cols` floats.
                unsafe { _mm512_mask_storeu_ps(to.as_mut_ptr(), mask, *v) };
            }
        }
    }

    /// One panel (two 256-bit halves) at a time, six rows: 12 of the 16
    /// vector registers accumulate (as BLIS's Haswell kernel).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn panels_avx2(d: &Packed, x: &[f32], n: usize, panels: Range<usize>, out: &mut [f32]) {
        for p in panels {
            let mut r0 = 0;
            while r0 < n {
                let left = n - r0;
                // SAFETY (each call): rows r0.. r0 + R ≤ n, panel p inside.
                unsafe {
                    match left {
                        6.. => block256::<6>(d, x, r0, p, out),
                        2.. => block256::<2>(d, x, r0, p, out),
                        _ => block256::<1>(d, x, r0, p, out),
                    }
                }
                r0 += match left {
                    6.. => 6,
                    2.. => 2,
                    _ => 1,
                };
            }
        }
    }

    /// `R` rows of `x` from `r0` times panel `p`, plus the bias.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn block256<const R: usize>(
        d: &Packed,
        x: &[f32],
        r0: usize,
        p: usize,
        out: &mut [f32],
    ) {
        let k = d.inputs;
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let xs = x.as_ptr().wrapping_add(r0 * k);
        let ws = d.panels.as_ptr().wrapping_add(p * k * LANES);
        for kk in 0..k {
            // SAFETY: panel p is inside, kk < k.
            let w = unsafe {
                [
                    _mm256_loadu_ps(ws.add(kk * LANES)),
                    _mm256_loadu_ps(ws.add(kk * LANES + 8)),
                ]
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r0 + r < n, kk < k.
                let a = _mm256_set1_ps(unsafe { *xs.add(r * k + kk) });
                for (c, w) in acc.iter_mut().zip(&w) {
                    *c = _mm256_fmadd_ps(a, *w, *c);
                }
            }
        }
        let cols = (d.outputs - p * LANES).min(LANES);
        let mut row = [0f32; LANES];
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: `row` holds 16 floats.
            unsafe {
                _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
            }
            let at = (r0 + r) * d.outputs + p * LANES;
            finish(
                &row,
                &d.bias[p * LANES..p * LANES + cols],
                &mut out[at..at + cols],
            );
        }
    }
}

/// `out = x · d + bias` for `n` rows, on up to `threads` cores (each takes
/// a share of the panels).
fn dense(d: &Packed, x: &[f32], n: usize, out: &mut [f32], threads: usize, cap: Kernel) {
    let count = d.outputs.div_ceil(LANES);
    if threads <= 1 || n < 8 || count < 2 {
        dense_panels(d, x, n, 0..count, out, cap);
        return;
    }
    // Each thread writes its own columns of every row: disjoint, but not
    // contiguous, so the halves are computed into their own buffers.
    let half = count / 2;
    let mut right = vec![0f32; n * d.outputs];
    rayon::join(
        || dense_panels(d, x, n, 0..half, out, cap),
        || dense_panels(d, x, n, half..count, &mut right, cap),
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

/// Self-attention of the heads in `heads`: each head's columns of
/// `context` (`n × hidden`) from `qkv` (`n × 3·hidden`, the query, key and
/// value projections side by side), `scores` as scratch.
fn attend(
    qkv: &[f32],
    n: usize,
    d: usize,
    heads: std::ops::Range<usize>,
    scores: &mut Vec<f32>,
    context: &mut [f32],
) {
    let h = qkv.len() / n.max(1) / 3;
    let scale = 1.0 / (d as f32).sqrt();
    scores.resize(n * n, 0.0);
    for head in heads {
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
            (scores, n),
            Parallelism::None,
        );
        for row in scores.chunks_exact_mut(n) {
            // Compared rather than `f32::max`ed, so that it vectorises.
            let max = row.iter().fold(
                f32::NEG_INFINITY,
                |m, &s| if s * scale > m { s * scale } else { m },
            );
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
            (scores, n, 1),
            (v, 3 * h, 1),
            (&mut context[head * d..], h),
            Parallelism::None,
        );
    }
}

/// Runs `f` over the rows of `buf` (`width` wide), in two halves on two
/// cores when `threads` allows.
fn halves(threads: usize, buf: &mut [f32], width: usize, f: impl Fn(&mut [f32]) + Sync) {
    let rows = buf.len() / width.max(1);
    if threads <= 1 || rows < 16 {
        f(buf);
        return;
    }
    let (a, b) = buf.split_at_mut(rows / 2 * width);
    rayon::join(|| f(a), || f(b));
}

/// A dense layer's weights as they run: in f32, or in integers when the
/// layer is 4-bit and integers were asked for.
#[derive(Debug)]
enum Weight {
    F32(Packed),
    Q4(Q4),
}

impl Weight {
    fn new(d: &Dense, precision: Precision) -> Weight {
        match precision {
            Precision::Int8 => Q4::new(d).map_or_else(|| Weight::F32(Packed::new(d)), Weight::Q4),
            Precision::F32 => Weight::F32(Packed::new(d)),
        }
    }

    fn outputs(&self) -> usize {
        match self {
            Weight::F32(p) => p.outputs(),
            Weight::Q4(q) => q.outputs(),
        }
    }
}

/// How an encoder computes its dense products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout, as the reference implementation.
    F32,
    /// 4-bit layers (those with [`Dense::blocks`]) in integers with 8-bit
    /// activations ([`quant`]) where the CPU has an integer kernel (x86
    /// AVX2 or AVX-512 VNNI); other layers, and other CPUs, in f32.
    Int8,
}

/// A layer with its weights packed for [`dense`].
#[derive(Debug)]
struct PackedLayer {
    qkv: Weight,
    output: Weight,
    attention_norm: Norm,
    up: Weight,
    down: Weight,
    output_norm: Norm,
}

/// A BERT encoder ready to run.
#[derive(Debug)]
pub struct Encoder {
    weights: BertWeights,
    layers: Vec<PackedLayer>,
    threads: usize,
    kernel: Kernel,
}

impl Encoder {
    /// An encoder over `weights` in f32, using up to `threads` cores per
    /// product.
    pub fn new(weights: BertWeights, threads: usize) -> Result<Encoder, String> {
        Encoder::with_precision(weights, threads, Precision::F32)
    }

    /// An encoder computing its products at `precision`.
    pub fn with_precision(
        weights: BertWeights,
        threads: usize,
        precision: Precision,
    ) -> Result<Encoder, String> {
        weights.check()?;
        // Without an x86 integer kernel the integer products would run in
        // plain Rust, ten times slower than f32 there (measured): f32 it is.
        let kernel = Kernel::best();
        let precision = if kernel == Kernel::Portable {
            Precision::F32
        } else {
            precision
        };
        let mut weights = weights;
        let layers = std::mem::take(&mut weights.layers)
            .into_iter()
            .map(|l| PackedLayer {
                qkv: Weight::new(&l.qkv, precision),
                output: Weight::new(&l.output, precision),
                attention_norm: l.attention_norm,
                up: Weight::new(&l.up, precision),
                down: Weight::new(&l.down, precision),
                output_norm: l.output_norm,
            })
            .collect();
        Ok(Encoder {
            weights,
            layers,
            threads: threads.max(1),
            kernel,
        })
    }

    /// Whether every layer's products run in integers.
    pub fn quantized(&self) -> bool {
        self.layers.iter().all(|l| {
            [&l.qkv, &l.output, &l.up, &l.down]
                .iter()
                .all(|w| matches!(w, Weight::Q4(_)))
        })
    }

    /// `out = x · w + bias` for `n` rows.
    fn dense(&self, w: &Weight, x: &[f32], n: usize, out: &mut [f32]) {
        match w {
            Weight::F32(p) => dense(p, x, n, out, self.threads, Kernel::cap()),
            Weight::Q4(q) => quant::dense(q, x, n, out, self.threads, self.kernel),
        }
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
        let mut qkv = vec![0f32; n * 3 * h];
        let (mut scores, mut scores_b) = (vec![0f32; n * n], Vec::new());
        let mut context = vec![0f32; n * h];
        let mut spare = vec![0f32; n * h];
        let mut attn = vec![0f32; n * h];
        let ff = self.layers.first().map_or(0, |l| l.up.outputs());
        let mut inner = vec![0f32; n * ff];
        for l in &self.layers {
            self.dense(&l.qkv, &x, n, &mut qkv);
            if self.threads > 1 && heads > 1 && n >= 16 {
                // Half of the heads each; the second half's columns are
                // written to a spare buffer and copied over.
                let half = heads / 2;
                rayon::join(
                    || attend(&qkv, n, d, 0..half, &mut scores, &mut context),
                    || attend(&qkv, n, d, half..heads, &mut scores_b, &mut spare),
                );
                for (c, s) in context.chunks_exact_mut(h).zip(spare.chunks_exact(h)) {
                    c[half * d..].copy_from_slice(&s[half * d..]);
                }
            } else {
                attend(&qkv, n, d, 0..heads, &mut scores, &mut context);
            }
            self.dense(&l.output, &context, n, &mut attn);
            for (a, r) in attn.iter_mut().zip(&x) {
                *a += r;
            }
            layer_norm(&mut attn, h, &l.attention_norm, w.eps);
            self.dense(&l.up, &attn, n, &mut inner);
            halves(self.threads, &mut inner, ff, |rows| {
                for v in rows.iter_mut() {
                    *v = gelu(*v);
                }
            });
            self.dense(&l.down, &inner, n, &mut x);
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
        dense(&Packed::new(&a), &x, 2, &mut out, 1, Kernel::Avx512Vnni);
        assert_eq!(out, vec![6.5, 14.0, 8.5, 16.0]);
        let ab = Dense::concat(&[a, b]);
        let mut out = vec![0f32; 2 * 3];
        dense(&Packed::new(&ab), &x, 2, &mut out, 1, Kernel::Avx512Vnni);
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
            blocks: None,
        };
        let x: Vec<f32> = (0..rows * ins)
            .map(|i| ((i * 5) % 11) as f32 - 5.0)
            .collect();
        let mut got = vec![0f32; rows * outs];
        let packed = Packed::new(&d);
        dense(&packed, &x, rows, &mut got, 2, Kernel::Avx512Vnni);
        let check = |got: &[f32], what: &str| {
            for r in 0..rows {
                for o in 0..outs {
                    let want: f32 = o as f32
                        + (0..ins)
                            .map(|i| x[r * ins + i] * w[i * outs + o])
                            .sum::<f32>();
                    assert_eq!(got[r * outs + o], want, "{what}: row {r} column {o}");
                }
            }
        };
        check(&got, "best kernel");
        // The AVX2 kernel, where the best is AVX-512.
        #[cfg(target_arch = "x86_64")]
        {
            let mut narrow = vec![0f32; rows * outs];
            if simd::dense_panels(
                &packed,
                &x,
                rows,
                0..outs.div_ceil(LANES),
                &mut narrow,
                false,
            ) {
                check(&narrow, "AVX2 kernel");
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
