//! Dense products in integers for models stored with 4-bit weights (the
//! personal-data recognizer): the weights exactly as the file holds them
//! (a whole number in −8..=7 times a scale per block of 32 inputs), the
//! activations rounded to 8 bits per row and block of 32 (as llama.cpp's
//! `q8_0`), products summed in 32-bit integers and scaled once a block.
//!
//! Why: in f32 the recognizer's forward pass is a dozen products a layer
//! at the vector unit's multiply-add rate; AVX-512 VNNI multiplies and sums
//! 64 byte pairs an instruction where f32 does 16, and AVX2 (`vpmaddubsw`)
//! 32, so the same model reads a text several times faster (see the
//! README's privacy figures). The only rounding added is the activations'
//! (at most half a step of 1/127 of each block's largest value); the
//! labels it changes are measured against the exact path in the tests.

use crate::bert::Dense;

/// Inputs per scale, as the model file's blocks.
pub const BLOCK: usize = 32;
/// Output columns per panel.
const LANES: usize = 16;
/// Inputs a 32-bit lane sums per instruction (four bytes).
const GROUP: usize = 4;
/// What is added to a weight to make it an unsigned byte (−8..=7 → 0..=15):
/// the x86 instructions multiply unsigned bytes by signed ones.
const OFFSET: i32 = 8;

/// A dense layer's 4-bit weights, packed for the integer kernels.
#[derive(Debug, Clone)]
pub struct Q4 {
    inputs: usize,
    outputs: usize,
    /// Per panel of 16 outputs, per group of four inputs: 16 lanes of four
    /// bytes (`weight + 8`), lane by lane.
    panels: Vec<u8>,
    /// Per panel, per block: the 16 outputs' scales (0 past the outputs).
    scales: Vec<f32>,
    bias: Vec<f32>,
}

impl Q4 {
    /// Packs `d` when its weights are 4-bit multiples of per-block scales
    /// (`d.blocks`) and its inputs whole blocks; `None` otherwise.
    pub fn new(d: &Dense) -> Option<Q4> {
        let scales = d.blocks.as_ref()?;
        let (k, n) = (d.inputs, d.outputs);
        if k == 0 || !k.is_multiple_of(BLOCK) || scales.len() != k / BLOCK * n {
            return None;
        }
        let count = n.div_ceil(LANES);
        let groups = k / GROUP;
        let mut panels = vec![OFFSET as u8; count * groups * LANES * GROUP];
        let mut packed_scales = vec![0f32; count * (k / BLOCK) * LANES];
        for o in 0..n {
            let (p, lane) = (o / LANES, o % LANES);
            for b in 0..k / BLOCK {
                let s = scales[b * n + o];
                packed_scales[(p * (k / BLOCK) + b) * LANES + lane] = s;
                for i in b * BLOCK..(b + 1) * BLOCK {
                    let w = d.weight[i * n + o];
                    let m = if s == 0.0 { 0.0 } else { (w / s).round() };
                    // A weight that is not a whole 4-bit step of its scale
                    // would be changed by packing: not this layout's model.
                    if !(-8.0..=7.0).contains(&m) || (m * s - w).abs() > w.abs() * 1e-6 {
                        return None;
                    }
                    let at = ((p * groups + i / GROUP) * LANES + lane) * GROUP + i % GROUP;
                    panels[at] = (m as i32 + OFFSET) as u8;
                }
            }
        }
        Some(Q4 {
            inputs: k,
            outputs: n,
            panels,
            scales: packed_scales,
            bias: d.bias.clone(),
        })
    }

    /// Outputs.
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Inputs.
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    fn blocks(&self) -> usize {
        self.inputs / BLOCK
    }

    fn panel_count(&self) -> usize {
        self.outputs.div_ceil(LANES)
    }
}

/// Rows of activations rounded to 8 bits, a scale per row and block.
#[derive(Debug, Default)]
pub struct Quantized {
    inputs: usize,
    rows: usize,
    values: Vec<i8>,
    scales: Vec<f32>,
    /// Per row and block: `8 · Σ values`, what the weights' offset adds.
    offsets: Vec<i32>,
}

impl Quantized {
    /// `n` rows of `x` (`n × k`, `k` a whole number of blocks), reusing
    /// this buffer's memory.
    pub fn fill(&mut self, x: &[f32], n: usize, k: usize) {
        debug_assert!(k.is_multiple_of(BLOCK) && x.len() >= n * k);
        self.inputs = k;
        self.rows = n;
        self.values.clear();
        self.values.resize(n * k, 0);
        self.scales.clear();
        self.offsets.clear();
        for (src, dst) in x
            .chunks_exact(BLOCK)
            .zip(self.values.chunks_exact_mut(BLOCK))
            .take(n * k / BLOCK)
        {
            // Eight lanes, compared rather than `f32::max`ed (whose NaN
            // rule keeps the loop scalar); a NaN is never larger.
            let mut lanes = [0f32; 8];
            for c in src.chunks_exact(8) {
                for (m, v) in lanes.iter_mut().zip(c) {
                    let a = v.abs();
                    *m = if a > *m { a } else { *m };
                }
            }
            let max = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
            let scale = max / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            // Ties to even (one instruction) rather than away from zero, and
            // an unchecked cast of a value made whole and bounded first, so
            // that the loop vectorises: `max`/`min` turn a NaN into −127,
            // and |v · inv| ≤ 127 by construction.
            let mut sums = [0i32; 8];
            for (d, v) in dst.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
                for ((d, v), s) in d.iter_mut().zip(v).zip(sums.iter_mut()) {
                    // Not `clamp`: it keeps a NaN, and the cast below must
                    // not see one.
                    #[allow(clippy::manual_clamp)]
                    let q = (v * inv).round_ties_even().max(-127.0).min(127.0);
                    // SAFETY: `q` is a whole number in −127..=127.
                    let q = unsafe { q.to_int_unchecked::<i32>() };
                    *d = q as i8;
                    *s += q;
                }
            }
            let sum: i32 = sums.iter().sum();
            self.scales.push(scale);
            self.offsets.push(OFFSET * sum);
        }
    }
}

/// Which code runs the product, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kernel {
    /// Plain Rust, any CPU.
    Portable,
    /// x86 AVX2 (`vpmaddubsw`).
    Avx2,
    /// x86 AVX-512 with VNNI (`vpdpbusd`).
    Avx512Vnni,
}

impl Kernel {
    /// The fastest this CPU runs, up to [`Kernel::cap`].
    pub fn best() -> Kernel {
        let cap = Kernel::cap();
        Kernel::available()
            .into_iter()
            .rfind(|k| *k <= cap)
            .unwrap_or(Kernel::Portable)
    }

    /// The widest kernel the encoders may use: `TANDEM_TEXT_KERNEL`
    /// (`portable`, `avx2` or `avx512`), to compare kernels on one machine;
    /// unset, any. It caps the f32 products the same way.
    pub fn cap() -> Kernel {
        match std::env::var("TANDEM_TEXT_KERNEL").as_deref() {
            Ok("portable") => Kernel::Portable,
            Ok("avx2") => Kernel::Avx2,
            _ => Kernel::Avx512Vnni,
        }
    }

    /// Every kernel this CPU runs, slowest first.
    pub fn available() -> Vec<Kernel> {
        let mut out = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                out.push(Kernel::Avx512Vnni);
            }
        }
        out
    }
}

/// `out = x · d + bias` for `n` rows of `x`, on up to `threads` cores
/// (each takes half of the rows, rounding its own to 8 bits).
pub fn dense(d: &Q4, x: &[f32], n: usize, out: &mut [f32], threads: usize, kernel: Kernel) {
    let k = d.inputs;
    assert!(x.len() >= n * k && out.len() >= n * d.outputs);
    let run = |x: &[f32], out: &mut [f32]| {
        let mut q = Quantized::default();
        q.fill(x, out.len() / d.outputs.max(1), k);
        rows(d, &q, out, kernel);
    };
    if threads <= 1 || n < 16 {
        run(&x[..n * k], &mut out[..n * d.outputs]);
        return;
    }
    let half = (n / 2).next_multiple_of(4).min(n);
    let (top, bottom) = out[..n * d.outputs].split_at_mut(half * d.outputs);
    rayon::join(
        || run(&x[..half * k], top),
        || run(&x[half * k..n * k], bottom),
    );
}

/// `x`'s rows of the product into `out`.
fn rows(d: &Q4, x: &Quantized, out: &mut [f32], kernel: Kernel) {
    let range = 0..x.rows;
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::available` lists it only where the CPU has the
        // instructions; the shapes were checked by `dense`.
        Kernel::Avx512Vnni => unsafe { x86::avx512(d, x, range, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Kernel::Avx2 => unsafe { x86::avx2(d, x, range, out) },
        _ => portable(d, x, range, out),
    }
}

fn portable(d: &Q4, x: &Quantized, range: std::ops::Range<usize>, out: &mut [f32]) {
    let (k, blocks, groups) = (d.inputs, d.blocks(), d.inputs / GROUP);
    for (r, row) in range.clone().zip(out.chunks_exact_mut(d.outputs)) {
        for (o, v) in row.iter_mut().enumerate() {
            let (p, lane) = (o / LANES, o % LANES);
            let mut acc = 0f32;
            for b in 0..blocks {
                let mut sum = -x.offsets[r * blocks + b];
                for i in b * BLOCK..(b + 1) * BLOCK {
                    let w = d.panels[((p * groups + i / GROUP) * LANES + lane) * GROUP + i % GROUP];
                    sum += i32::from(w) * i32::from(x.values[r * k + i]);
                }
                let scale = d.scales[(p * blocks + b) * LANES + lane] * x.scales[r * blocks + b];
                acc = fma(sum as f32, scale, acc);
            }
            *v = acc + d.bias[o];
        }
    }
}

#[inline(always)]
fn fma(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK, GROUP, LANES, Q4, Quantized};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Where a block of rows and panels starts.
    #[derive(Clone, Copy)]
    struct At {
        /// First row, in `x`.
        r0: usize,
        /// First row, in `out`.
        o0: usize,
        /// First panel.
        p: usize,
    }

    pub(super) unsafe fn avx512(d: &Q4, x: &Quantized, range: Range<usize>, out: &mut [f32]) {
        let count = d.panel_count();
        let mut p = 0;
        while p < count {
            let two = p + 1 < count;
            let mut r = range.start;
            while r < range.end {
                let left = range.end - r;
                let at = At {
                    r0: r,
                    o0: r - range.start,
                    p,
                };
                // SAFETY (each call): rows r..r + R ≤ range.end ≤ x.rows,
                // panels p..p + P ≤ count; the caller checked the CPU.
                unsafe {
                    match (two, left >= 4) {
                        (true, true) => block512::<4, 2>(d, x, at, out),
                        (true, false) => block512::<1, 2>(d, x, at, out),
                        (false, true) => block512::<4, 1>(d, x, at, out),
                        (false, false) => block512::<1, 1>(d, x, at, out),
                    }
                }
                r += if left >= 4 { 4 } else { 1 };
            }
            p += if two { 2 } else { 1 };
        }
    }

    /// `R` rows times `P` panels: R·P integer and R·P float accumulators
    /// (16 of 32 registers at 4 × 2).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn block512<const R: usize, const P: usize>(
        d: &Q4,
        x: &Quantized,
        at: At,
        out: &mut [f32],
    ) {
        let (k, blocks, groups) = (d.inputs, d.blocks(), d.inputs / GROUP);
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        let ws = d.panels.as_ptr();
        let xs = x.values.as_ptr();
        for b in 0..blocks {
            let mut sums = [[_mm512_setzero_si512(); P]; R];
            for (r, s) in sums.iter_mut().enumerate() {
                let offset = x.offsets[(at.r0 + r) * blocks + b];
                *s = [_mm512_set1_epi32(-offset); P];
            }
            for g in b * BLOCK / GROUP..(b + 1) * BLOCK / GROUP {
                let mut w = [_mm512_setzero_si512(); P];
                for (j, w) in w.iter_mut().enumerate() {
                    // SAFETY: panel p + j and group g are inside `panels`.
                    *w = unsafe {
                        _mm512_loadu_si512(ws.add(((at.p + j) * groups + g) * LANES * GROUP).cast())
                    };
                }
                for (r, s) in sums.iter_mut().enumerate() {
                    // SAFETY: row r0 + r and inputs 4g..4g + 4 are inside
                    // `values`.
                    let a = _mm512_set1_epi32(unsafe {
                        std::ptr::read_unaligned(xs.add((at.r0 + r) * k + g * GROUP).cast::<i32>())
                    });
                    for (s, w) in s.iter_mut().zip(&w) {
                        *s = _mm512_dpbusd_epi32(*s, *w, a);
                    }
                }
            }
            let mut scale = [_mm512_setzero_ps(); P];
            for (j, s) in scale.iter_mut().enumerate() {
                // SAFETY: panel p + j, block b: inside `scales`.
                *s = unsafe {
                    _mm512_loadu_ps(d.scales.as_ptr().add(((at.p + j) * blocks + b) * LANES))
                };
            }
            for (r, (acc, s)) in acc.iter_mut().zip(&sums).enumerate() {
                let xs = _mm512_set1_ps(x.scales[(at.r0 + r) * blocks + b]);
                for ((acc, s), scale) in acc.iter_mut().zip(s).zip(&scale) {
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), _mm512_mul_ps(*scale, xs), *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (j, v) in acc.iter().enumerate() {
                let q = at.p + j;
                let cols = (d.outputs - q * LANES).min(LANES);
                let mask: __mmask16 = ((1u32 << cols) - 1) as u16;
                let o = (at.o0 + r) * d.outputs + q * LANES;
                assert!(o + cols <= out.len() && q * LANES + cols <= d.bias.len());
                // SAFETY: the mask keeps the load and store to `cols`
                // elements, inside `bias` and `out` (asserted).
                unsafe {
                    let bias = _mm512_maskz_loadu_ps(mask, d.bias.as_ptr().add(q * LANES));
                    _mm512_mask_storeu_ps(out.as_mut_ptr().add(o), mask, _mm512_add_ps(*v, bias));
                }
            }
        }
    }

    pub(super) unsafe fn avx2(d: &Q4, x: &Quantized, range: Range<usize>, out: &mut [f32]) {
        for p in 0..d.panel_count() {
            let mut r = range.start;
            while r < range.end {
                let left = range.end - r;
                let at = At {
                    r0: r,
                    o0: r - range.start,
                    p,
                };
                // SAFETY: rows r..r + R ≤ range.end, panel p inside; the
                // caller checked the CPU.
                unsafe {
                    if left >= 2 {
                        block256::<2>(d, x, at, out);
                    } else {
                        block256::<1>(d, x, at, out);
                    }
                }
                r += if left >= 2 { 2 } else { 1 };
            }
        }
    }

    /// `R` rows times one panel (two 256-bit halves). A block's byte
    /// products are summed in 16 bits: each pair is at most 2 · 15 · 127 =
    /// 3,810 and a block has eight of them per lane, 30,480 < 32,767.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block256<const R: usize>(d: &Q4, x: &Quantized, at: At, out: &mut [f32]) {
        let (k, blocks, groups) = (d.inputs, d.blocks(), d.inputs / GROUP);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let ws = d.panels.as_ptr();
        let xs = x.values.as_ptr();
        let ones = _mm256_set1_epi16(1);
        for b in 0..blocks {
            let mut sums = [[_mm256_setzero_si256(); 2]; R];
            for g in b * BLOCK / GROUP..(b + 1) * BLOCK / GROUP {
                let base = (at.p * groups + g) * LANES * GROUP;
                // SAFETY: panel p, group g: inside `panels`.
                let w = unsafe {
                    [
                        _mm256_loadu_si256(ws.add(base).cast()),
                        _mm256_loadu_si256(ws.add(base + 32).cast()),
                    ]
                };
                for (r, s) in sums.iter_mut().enumerate() {
                    // SAFETY: row r0 + r, inputs 4g..4g + 4: inside `values`.
                    let a = _mm256_set1_epi32(unsafe {
                        std::ptr::read_unaligned(xs.add((at.r0 + r) * k + g * GROUP).cast::<i32>())
                    });
                    for (s, w) in s.iter_mut().zip(&w) {
                        *s = _mm256_add_epi16(*s, _mm256_maddubs_epi16(*w, a));
                    }
                }
            }
            // SAFETY: panel p, block b: inside `scales`.
            let scale = unsafe {
                let s = d.scales.as_ptr().add((at.p * blocks + b) * LANES);
                [_mm256_loadu_ps(s), _mm256_loadu_ps(s.add(8))]
            };
            for (r, (acc, s)) in acc.iter_mut().zip(&sums).enumerate() {
                let row = (at.r0 + r) * blocks + b;
                let offset = _mm256_set1_epi32(x.offsets[row]);
                let xs = _mm256_set1_ps(x.scales[row]);
                for ((acc, s), scale) in acc.iter_mut().zip(s).zip(&scale) {
                    let sum = _mm256_sub_epi32(_mm256_madd_epi16(*s, ones), offset);
                    *acc =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(*scale, xs), *acc);
                }
            }
        }
        let cols = (d.outputs - at.p * LANES).min(LANES);
        let mut row = [0f32; LANES];
        let mut bias = [0f32; LANES];
        bias[..cols].copy_from_slice(&d.bias[at.p * LANES..at.p * LANES + cols]);
        // SAFETY: `bias` holds 16 floats.
        let bias = unsafe {
            [
                _mm256_loadu_ps(bias.as_ptr()),
                _mm256_loadu_ps(bias.as_ptr().add(8)),
            ]
        };
        for (r, acc) in acc.iter().enumerate() {
            let o = (at.o0 + r) * d.outputs + at.p * LANES;
            let (lo, hi) = (
                _mm256_add_ps(acc[0], bias[0]),
                _mm256_add_ps(acc[1], bias[1]),
            );
            if cols == LANES {
                let out = &mut out[o..o + LANES];
                // SAFETY: `out` holds these 16 floats.
                unsafe {
                    _mm256_storeu_ps(out.as_mut_ptr(), lo);
                    _mm256_storeu_ps(out.as_mut_ptr().add(8), hi);
                }
            } else {
                // SAFETY: `row` holds 16 floats.
                unsafe {
                    _mm256_storeu_ps(row.as_mut_ptr(), lo);
                    _mm256_storeu_ps(row.as_mut_ptr().add(8), hi);
                }
                out[o..o + cols].copy_from_slice(&row[..cols]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4-bit layer with every weight and scale pattern, and inputs of
    /// every sign and size.
    fn layer(k: usize, n: usize) -> Dense {
        let scales: Vec<f32> = (0..k / BLOCK * n)
            .map(|i| {
                if i % 7 == 3 {
                    0.0
                } else {
                    0.01 + (i % 5) as f32 * 0.003
                }
            })
            .collect();
        let mut weight = vec![0f32; k * n];
        for i in 0..k {
            for o in 0..n {
                let m = ((i * 31 + o * 17) % 16) as f32 - 8.0;
                weight[i * n + o] = m * scales[i / BLOCK * n + o];
            }
        }
        Dense {
            inputs: k,
            outputs: n,
            weight,
            bias: (0..n).map(|o| o as f32 * 0.1 - 1.0).collect(),
            blocks: Some(scales),
        }
    }

    #[test]
    fn every_kernel_computes_the_same_product_close_to_f32() {
        for (rows, k, n) in [(1, 32, 16), (7, 64, 40), (37, 384, 72), (130, 96, 33)] {
            let d = layer(k, n);
            let q = Q4::new(&d).expect("4-bit layer");
            let x: Vec<f32> = (0..rows * k)
                .map(|i| (((i * 37) % 101) as f32 - 50.0) * if i % 13 == 0 { 0.5 } else { 0.02 })
                .collect();
            let mut want = vec![0f32; rows * n];
            rows_f32(&d, &x, rows, &mut want);
            let mut reference = vec![0f32; rows * n];
            dense(&q, &x, rows, &mut reference, 1, Kernel::Portable);
            // Each activation moves by at most half a step (1/127 of its
            // block's largest): the product by at most Σ |w| · step / 2.
            for r in 0..rows {
                for o in 0..n {
                    let bound: f32 = (0..k)
                        .map(|i| {
                            let block = &x[r * k + i / BLOCK * BLOCK..][..BLOCK];
                            let step = block.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                            d.weight[i * n + o].abs() * step / 2.0
                        })
                        .sum();
                    let (a, b) = (reference[r * n + o], want[r * n + o]);
                    assert!(
                        (a - b).abs() <= bound * 1.001 + 1e-5,
                        "{a} vs f32 {b}, bound {bound}"
                    );
                }
            }
            for kernel in Kernel::available() {
                for threads in [1, 2] {
                    let mut got = vec![f32::NAN; rows * n];
                    dense(&q, &x, rows, &mut got, threads, kernel);
                    for (i, (a, b)) in got.iter().zip(&reference).enumerate() {
                        assert!(
                            (a - b).abs() <= b.abs() * 1e-6,
                            "{kernel:?} ×{threads}, {rows}×{k}→{n}, element {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    fn rows_f32(d: &Dense, x: &[f32], rows: usize, out: &mut [f32]) {
        for r in 0..rows {
            for o in 0..d.outputs {
                out[r * d.outputs + o] = d.bias[o]
                    + (0..d.inputs)
                        .map(|i| x[r * d.inputs + i] * d.weight[i * d.outputs + o])
                        .sum::<f32>();
            }
        }
    }

    #[test]
    fn only_whole_4_bit_steps_are_packed() {
        let mut d = layer(64, 16);
        assert!(Q4::new(&d).is_some());
        d.weight[5] *= 1.5;
        assert!(Q4::new(&d).is_none(), "a weight between steps");
        d.blocks = None;
        assert!(Q4::new(&d).is_none(), "no scales");
        let odd = Dense {
            inputs: 40,
            ..layer(64, 16)
        };
        assert!(Q4::new(&odd).is_none(), "inputs not whole blocks");
    }

    #[test]
    fn rows_of_zeros_and_extremes_quantize_safely() {
        let x = [0f32; 64]
            .iter()
            .chain([f32::MAX, -f32::MAX, 1e-30, -1e-30].iter().cycle().take(64))
            .copied()
            .collect::<Vec<_>>();
        let mut q = Quantized::default();
        q.fill(&x, 2, 64);
        assert!(q.values[..64].iter().all(|&v| v == 0));
        assert_eq!(q.values[64], 127);
        assert_eq!(q.values[65], -127);
        // A NaN (a broken model's activation) stays inside i8 and leaves
        // the rest of its block as it was.
        let mut x = vec![1f32; 32];
        x[3] = f32::NAN;
        x[4] = -2.0;
        q.fill(&x, 1, 32);
        assert_eq!(q.values[3], -127);
        assert_eq!((q.values[0], q.values[4]), (64, -127));
    }
}
