//! Q8_0 matrix products on AVX512-VNNI that gain from a batch.
//!
//! candle 0.11's Q8_0 CPU kernel takes one `vec_dot` per (input row, weight row): 16
//! rows cost ~6× one, and Gemma-3-270M's layers (inner dimensions 640, 1024, 2048) spent
//! most of a 16-sequence decode step there. Its fast AVX512-VNNI path needs inner
//! dimensions that are multiples of 256 and scales activations per 256 values, which
//! costs Gemma's q8_0 its logits cosine (outlier channels).
//!
//! [`Q8Matrix`] keeps candle's numerics, weights and activations both in blocks of 32
//! with one scale each, and lays the weights out as candle's repacked tiles do: 16
//! output columns side by side, 4 consecutive inputs of each per 32-bit lane, so one
//! `vpdpbusd` adds 4 products to each of 16 columns and a block's dot product ends
//! in its column's lane, with no horizontal sums:
//!
//! - weights are stored as `q + 128` (unsigned), activations as signed `q`, so
//!   `dpbusd` gives `Σ (w + 128)·x`; each block's integer sum starts at `−128·Σx`,
//!   which leaves `Σ w·x` exactly;
//! - each block's dot becomes f32 and is scaled by `d_w` (16 columns, a vector) times
//!   `d_x` (f32; candle rounds the activation scale to f16, which this does not);
//! - up to 8 input rows share each weight load.
//!
//! [`Q8Matrix::supported`] says whether this CPU runs it; callers keep candle's kernel
//! otherwise.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Values per quantized block (Q8_0's).
const BLOCK: usize = 32;
/// Bytes of one GGUF Q8_0 block: an f16 scale and 32 quants.
const Q8_0_BYTES: usize = 34;
/// Output columns per tile: one per 32-bit lane of a 512-bit register.
const COLS: usize = 16;
/// Input rows per tile at most.
const ROWS: usize = 8;
/// Bytes of one tile's block: 32 inputs × 16 columns.
const TILE_BLOCK: usize = BLOCK * COLS;

/// A Q8_0 weight matrix (`n` outputs × `k` inputs) laid out for the VNNI kernel.
pub struct Q8Matrix {
    n: usize,
    k: usize,
    /// `q + 128` per weight, by column tile, block, group of 4 inputs, column, input.
    quants: Vec<u8>,
    /// Per column tile and block, the 16 columns' scales.
    scales: Vec<f32>,
    /// `Wᵀ` (`k × n`) in f16, for input values taken unquantized ([`Fused::outliers_above`]);
    /// kept by [`Q8Matrix::from_f32`] only.
    exact: Vec<half::f16>,
}

/// What a product does besides `x · Wᵀ`, inside the kernel while the outputs are in
/// registers (so it runs on every compute thread and reads no output twice).
#[derive(Default, Clone, Copy)]
pub struct Fused<'a> {
    /// Input values of at least this magnitude are quantized as 0 and multiplied in f32
    /// instead, against the f16 weights that [`Q8Matrix::from_f32`] keeps: an outlier
    /// would leave the 31 other values of its block a coarse step. Decided per value,
    /// so a row's result does not depend on the rows beside it.
    pub outliers_above: Option<f32>,
    /// Added to every row (`n` values).
    pub bias: Option<&'a [f32]>,
    /// Added element-wise (`m × n`, row-major).
    pub residual: Option<&'a [f32]>,
    /// Exact GELU of the result, last.
    pub gelu: bool,
}

/// Input rows quantized per block of 32.
#[derive(Default)]
struct Activations {
    /// Signed quants, row-major `m × k`.
    quants: Vec<i8>,
    /// Per row and block: `−128 ·` the sum of its quants.
    bias: Vec<i32>,
    /// Per row and block: its scale.
    scales: Vec<f32>,
    /// Per channel, whether some row's value in it was an outlier (quantized as 0).
    has_outlier: Vec<bool>,
    /// The channels with an outlier, ascending.
    outlier_channels: Vec<usize>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Activations> = std::cell::RefCell::default();
}

impl Q8Matrix {
    /// Whether this CPU has the instructions the kernel uses.
    pub fn supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Repacks GGUF Q8_0 data (`n` rows of `k` values). `None` when the shape does not
    /// suit the kernel (`k` a multiple of 32, `n` of 16) or the data has the wrong size.
    pub fn from_q8_0(data: &[u8], n: usize, k: usize) -> Option<Self> {
        if k == 0 || !k.is_multiple_of(BLOCK) || n == 0 || !n.is_multiple_of(COLS) {
            return None;
        }
        let blocks = k / BLOCK;
        if data.len() != n * blocks * Q8_0_BYTES {
            return None;
        }
        let mut quants = vec![0u8; n * k];
        let mut scales = vec![0f32; n * blocks];
        for (i, block) in data.chunks_exact(Q8_0_BYTES).enumerate() {
            let (c, b) = (i / blocks, i % blocks);
            let (t, lane) = (c / COLS, c % COLS);
            scales[(t * blocks + b) * COLS + lane] =
                half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            for (v, &q) in block[2..].iter().enumerate() {
                quants[Self::offset(blocks, t, b, lane, v)] = q ^ 0x80;
            }
        }
        Some(Q8Matrix {
            n,
            k,
            quants,
            scales,
            exact: Vec::new(),
        })
    }

    /// Quantizes f32 weights (`n` rows of `k` values, row-major) as Q8_0 does, one
    /// scale per 32 values (`max|w| / 127`, kept in f32 rather than rounded to f16), and
    /// keeps them transposed in f16 for [`Fused::outliers_above`] (2 bytes per weight more).
    /// `None` when the shape does not suit the kernel or `w` has the wrong size.
    pub fn from_f32(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if k == 0 || !k.is_multiple_of(BLOCK) || n == 0 || !n.is_multiple_of(COLS) {
            return None;
        }
        if w.len() != n * k {
            return None;
        }
        let blocks = k / BLOCK;
        let mut quants = vec![0u8; n * k];
        let mut scales = vec![0f32; n * blocks];
        for (i, block) in w.chunks_exact(BLOCK).enumerate() {
            let (c, b) = (i / blocks, i % blocks);
            let (t, lane) = (c / COLS, c % COLS);
            let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            scales[(t * blocks + b) * COLS + lane] = d;
            for (v, &x) in block.iter().enumerate() {
                let q = (x * inv).round_ties_even() as i8;
                quants[Self::offset(blocks, t, b, lane, v)] = (q as u8) ^ 0x80;
            }
        }
        let mut exact = vec![half::f16::ZERO; n * k];
        for (c, row) in w.chunks_exact(k).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                exact[i * n + c] = half::f16::from_f32(v);
            }
        }
        Some(Q8Matrix {
            n,
            k,
            quants,
            scales,
            exact,
        })
    }

    /// Where input `v` of block `b` of column `lane` of tile `t` is stored.
    fn offset(blocks: usize, t: usize, b: usize, lane: usize, v: usize) -> usize {
        (t * blocks + b) * TILE_BLOCK + (v / 4) * (4 * COLS) + lane * 4 + v % 4
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inner dimension.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Weight bytes as held (quants, f32 scales, f16 copy if any).
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.quants.len() + 4 * self.scales.len() + 2 * self.exact.len()
    }

    /// `out = x · Wᵀ` for `m` input rows: `x` is `m × k`, `out` is `m × n`, row-major.
    ///
    /// # Panics
    /// When the CPU lacks the instructions ([`Q8Matrix::supported`]) or a length is wrong.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.matmul_fused(x, m, out, Fused::default());
    }

    /// `out = x · Wᵀ` with what `fused` adds (see [`Fused`]).
    ///
    /// # Panics
    /// As [`Q8Matrix::matmul`]; also when a fused length is wrong, or outliers are asked
    /// of a matrix without f16 weights (one not made by [`Q8Matrix::from_f32`]).
    pub fn matmul_fused(&self, x: &[f32], m: usize, out: &mut [f32], fused: Fused) {
        assert!(Self::supported(), "Q8Matrix::matmul needs AVX512-VNNI");
        assert_eq!(x.len(), m * self.k, "input is not {m} × {}", self.k);
        assert_eq!(out.len(), m * self.n, "output is not {m} × {}", self.n);
        assert!(
            fused.bias.is_none_or(|b| b.len() == self.n),
            "bias is not {}",
            self.n
        );
        assert!(
            fused.residual.is_none_or(|r| r.len() == m * self.n),
            "residual is not {m} × {}",
            self.n
        );
        assert!(
            fused.outliers_above.is_none() || self.exact.len() == self.n * self.k,
            "outliers need the f16 weights of Q8Matrix::from_f32"
        );
        if m == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        SCRATCH.with(|cell| {
            let acts = &mut *cell.borrow_mut();
            // SAFETY: supported() checked the target features above.
            unsafe { quantize(x, m, self.k, fused.outliers_above, acts) };
            let acts = &*acts;
            let row_tiles = m.div_ceil(ROWS);
            let col_tiles = self.n / COLS;
            let out_addr = out.as_mut_ptr() as usize;
            let ctx = TileContext {
                w: self,
                x,
                acts,
                fused,
            };
            // Items walk row tiles fastest, so one worker reuses a weight tile from L1
            // or L2 for every input row tile.
            candle_core::utils::barrier_pool().execute_chunked(row_tiles * col_tiles, |items| {
                for item in items {
                    let (ct, rt) = (item / row_tiles, item % row_tiles);
                    let r0 = rt * ROWS;
                    let out = out_addr as *mut f32;
                    // SAFETY: features checked above; every (row, column) of `out` is
                    // written by exactly one item, inside the asserted bounds.
                    unsafe {
                        match m - r0 {
                            1 => tile::<1>(&ctx, r0, ct, out),
                            2 => tile::<2>(&ctx, r0, ct, out),
                            3 => tile::<3>(&ctx, r0, ct, out),
                            4 => tile::<4>(&ctx, r0, ct, out),
                            5 => tile::<5>(&ctx, r0, ct, out),
                            6 => tile::<6>(&ctx, r0, ct, out),
                            7 => tile::<7>(&ctx, r0, ct, out),
                            _ => tile::<ROWS>(&ctx, r0, ct, out),
                        }
                    }
                }
            });
        });
    }

    /// The same product in plain scalar code: the reference the tests compare with.
    #[cfg(test)]
    fn matmul_reference(&self, x: &[f32], m: usize, out: &mut [f32]) {
        let blocks = self.k / BLOCK;
        for r in 0..m {
            let acts = quantize_row(&x[r * self.k..(r + 1) * self.k]);
            for c in 0..self.n {
                let (t, lane) = (c / COLS, c % COLS);
                let mut sum = 0.0f32;
                for (b, (xq, xd)) in acts.iter().enumerate() {
                    let dot: i32 = (0..BLOCK)
                        .map(|v| {
                            let q = self.quants[Self::offset(blocks, t, b, lane, v)];
                            i32::from((q ^ 0x80) as i8) * i32::from(xq[v])
                        })
                        .sum();
                    sum += dot as f32 * self.scales[(t * blocks + b) * COLS + lane] * xd;
                }
                out[r * self.n + c] = sum;
            }
        }
    }
}

/// One row quantized per block: round-to-nearest-even of `x / d`, `d = max|x| / 127`.
#[cfg(test)]
fn quantize_row(x: &[f32]) -> Vec<([i8; BLOCK], f32)> {
    x.chunks_exact(BLOCK)
        .map(|block| {
            let amax = block.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i8; BLOCK];
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * inv).round_ties_even() as i8;
            }
            (q, d)
        })
        .collect()
}

/// Quantizes every row, 32 values at a time: the same arithmetic as the tests' `quantize_row`
/// (round to nearest even is the MXCSR default of `cvtps2dq`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn quantize(x: &[f32], m: usize, k: usize, outliers_above: Option<f32>, acts: &mut Activations) {
    let blocks = m * k / BLOCK;
    acts.quants.resize(m * k, 0);
    acts.bias.resize(blocks, 0);
    acts.scales.resize(blocks, 0.0);
    acts.has_outlier.clear();
    acts.has_outlier.resize(k, false);
    let per_row = k / BLOCK;
    let limit = _mm512_set1_ps(outliers_above.unwrap_or(f32::INFINITY));
    for i in 0..blocks {
        // SAFETY: i < blocks keeps every access inside x and the resized buffers.
        unsafe {
            let src = x.as_ptr().add(i * BLOCK);
            let (mut lo, mut hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
            let big_lo = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(lo), limit);
            let big_hi = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(hi), limit);
            if (big_lo | big_hi) != 0 {
                lo = _mm512_maskz_mov_ps(!big_lo, lo);
                hi = _mm512_maskz_mov_ps(!big_hi, hi);
                let big = u32::from(big_lo) | (u32::from(big_hi) << 16);
                let first = (i % per_row) * BLOCK;
                (0..BLOCK)
                    .filter(|b| big & (1 << b) != 0)
                    .for_each(|b| acts.has_outlier[first + b] = true);
            }
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let d = amax / 127.0;
            let inv = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));
            let qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
            let dst = acts.quants.as_mut_ptr().add(i * BLOCK) as *mut __m128i;
            _mm_storeu_si128(dst, _mm512_cvtepi32_epi8(qlo));
            _mm_storeu_si128(dst.add(1), _mm512_cvtepi32_epi8(qhi));
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
            *acts.bias.as_mut_ptr().add(i) = -128 * sum;
            *acts.scales.as_mut_ptr().add(i) = d;
        }
    }
    acts.outlier_channels.clear();
    acts.outlier_channels
        .extend((0..k).filter(|&c| acts.has_outlier[c]));
}

/// What every tile of one product reads.
#[cfg(target_arch = "x86_64")]
struct TileContext<'a> {
    w: &'a Q8Matrix,
    /// The unquantized input, for outliers.
    x: &'a [f32],
    acts: &'a Activations,
    fused: Fused<'a>,
}

/// Rows `r0..r0+R` × the 16 columns of tile `t`, written to `out` (`m × n`), with the
/// context's fused steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn tile<const R: usize>(ctx: &TileContext, r0: usize, t: usize, out: *mut f32) {
    let (w, x) = (ctx.w, ctx.acts);
    let (k, n) = (w.k, w.n);
    let blocks = k / BLOCK;
    let mut acc = [_mm512_setzero_ps(); R];
    let wq = unsafe { w.quants.as_ptr().add(t * blocks * TILE_BLOCK) };
    let ws = unsafe { w.scales.as_ptr().add(t * blocks * COLS) };
    let (xq, xb, xs) = (x.quants.as_ptr(), x.bias.as_ptr(), x.scales.as_ptr());
    for b in 0..blocks {
        let mut isum = [_mm512_setzero_si512(); R];
        for (r, s) in isum.iter_mut().enumerate() {
            *s = _mm512_set1_epi32(unsafe { *xb.add((r0 + r) * blocks + b) });
        }
        for g in 0..BLOCK / 4 {
            let wv = unsafe {
                _mm512_loadu_si512(wq.add(b * TILE_BLOCK + g * 4 * COLS) as *const __m512i)
            };
            for (r, s) in isum.iter_mut().enumerate() {
                let four = unsafe {
                    (xq.add((r0 + r) * k + b * BLOCK + g * 4) as *const i32).read_unaligned()
                };
                *s = _mm512_dpbusd_epi32(*s, wv, _mm512_set1_epi32(four));
            }
        }
        let dw = unsafe { _mm512_loadu_ps(ws.add(b * COLS)) };
        for (r, (a, s)) in acc.iter_mut().zip(&isum).enumerate() {
            let dx = _mm512_set1_ps(unsafe { *xs.add((r0 + r) * blocks + b) });
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*s), _mm512_mul_ps(dw, dx), *a);
        }
    }
    let fused = &ctx.fused;
    let limit = fused.outliers_above.unwrap_or(f32::INFINITY);
    for &c in &x.outlier_channels {
        // SAFETY: c < k, and matmul_fused asserted that `exact` holds k × n values.
        let wc = unsafe {
            _mm512_cvtph_ps(_mm256_loadu_si256(
                w.exact.as_ptr().add(c * n + t * COLS) as *const __m256i
            ))
        };
        for (r, a) in acc.iter_mut().enumerate() {
            // The values quantize() zeroed, and only those.
            let v = ctx.x[(r0 + r) * k + c];
            if v.abs() >= limit {
                *a = _mm512_fmadd_ps(_mm512_set1_ps(v), wc, *a);
            }
        }
    }
    if let Some(bias) = fused.bias {
        let bv = unsafe { _mm512_loadu_ps(bias.as_ptr().add(t * COLS)) };
        acc.iter_mut().for_each(|a| *a = _mm512_add_ps(*a, bv));
    }
    if let Some(residual) = fused.residual {
        for (r, a) in acc.iter_mut().enumerate() {
            let rv = unsafe { _mm512_loadu_ps(residual.as_ptr().add((r0 + r) * n + t * COLS)) };
            *a = _mm512_add_ps(*a, rv);
        }
    }
    for (r, a) in acc.iter().enumerate() {
        let dst = unsafe { out.add((r0 + r) * n + t * COLS) };
        unsafe { _mm512_storeu_ps(dst, *a) };
        if fused.gelu {
            // SAFETY: the 16 values just stored are this item's alone.
            crate::gelu::gelu_erf_portable(unsafe { std::slice::from_raw_parts_mut(dst, COLS) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF Q8_0 bytes of `n × k` weights drawn from a fixed generator.
    fn weights(n: usize, k: usize, seed: u32) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state >> 8
        };
        let mut out = Vec::new();
        for _ in 0..n * k / BLOCK {
            let d = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend(d.to_le_bytes());
            // Full range, including the extremes ±127 and -128 never (GGUF uses ±127).
            out.extend((0..BLOCK).map(|_| ((next() % 255) as i32 - 127) as i8 as u8));
        }
        out
    }

    fn inputs(m: usize, k: usize) -> Vec<f32> {
        (0..m * k)
            .map(|i| {
                let v = ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
                // An outlier channel, as Gemma's residual stream has.
                if i % k == 17 { v * 40.0 } else { v }
            })
            .collect()
    }

    #[test]
    fn the_vnni_kernel_matches_the_scalar_reference_for_every_tail() {
        // No skip: on a CPU without AVX512-VNNI this fails, saying so (matmul's assert).
        let (n, k) = (32, 640);
        let w = Q8Matrix::from_q8_0(&weights(n, k, 7), n, k).unwrap();
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 16, 19] {
            let x = inputs(m, k);
            let (mut fast, mut slow) = (vec![0.0; m * n], vec![0.0; m * n]);
            w.matmul(&x, m, &mut fast);
            w.matmul_reference(&x, m, &mut slow);
            for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
                // Integer dots are exact; only the f32 sum order differs.
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "m={m} [{i}]: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn the_kernel_agrees_with_candles_q8_0_product() {
        use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
        use candle_core::{DType, Device, Module, Tensor};
        // No skip: on a CPU without AVX512-VNNI this fails, saying so (matmul's assert).
        // k = 640, as Gemma's residual stream: candle takes its generic Q8_0 × Q8_0
        // path (per-32 activation scales). At multiples of 256 it takes its repacked
        // path, whose per-256 scales differ by ~3 % here because of the outlier channel.
        let (n, k, m) = (16, 640, 6);
        let data = weights(n, k, 3);
        let w = Q8Matrix::from_q8_0(&data, n, k).unwrap();
        let storage =
            QStorage::from_data(std::borrow::Cow::Owned(data), &Device::Cpu, GgmlDType::Q8_0)
                .unwrap();
        let candle = QMatMul::from_qtensor(QTensor::new(storage, (n, k)).unwrap()).unwrap();
        let x = inputs(m, k);
        let theirs = candle
            .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut ours = vec![0.0; m * n];
        w.matmul(&x, m, &mut ours);
        // The exact product of the same weights with unquantized inputs.
        let dequantized = candle.forward(&Tensor::eye(k, DType::F32, &Device::Cpu).unwrap());
        let wt = dequantized.unwrap().to_vec2::<f32>().unwrap(); // k × n: row i is W·e_i
        let exact: Vec<f32> = (0..m * n)
            .map(|i| (0..k).map(|j| x[i / n * k + j] * wt[j][i % n]).sum())
            .collect();
        let rel = |v: &[f32], to: &[f32]| {
            let norm = to.iter().map(|t| t * t).sum::<f32>().sqrt();
            v.iter()
                .zip(to)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt()
                / norm
        };
        // candle rounds activation scales to f16: agreement to ~1e-3 relative, and
        // ours is no further than candle's from the exact product.
        assert!(
            rel(&ours, &theirs) < 2e-3,
            "relative error {}",
            rel(&ours, &theirs)
        );
        let (ours_err, theirs_err) = (rel(&ours, &exact), rel(&theirs, &exact));
        eprintln!("error to the exact product: ours {ours_err:.2e}, candle's {theirs_err:.2e}");
        assert!(ours_err <= theirs_err * 1.05, "{ours_err} vs {theirs_err}");
    }

    #[test]
    fn f32_weights_quantize_per_block_within_half_a_step() {
        let (n, k) = (16, 64);
        let w: Vec<f32> = inputs(n, k).iter().map(|v| v * 0.01).collect();
        let q = Q8Matrix::from_f32(&w, n, k).unwrap();
        // Multiplying by the identity reads the dequantized weights back, column by column.
        let mut eye = vec![0.0f32; k * k];
        (0..k).for_each(|i| eye[i * k + i] = 1.0);
        let mut back = vec![0.0f32; k * n];
        q.matmul_reference(&eye, k, &mut back);
        for c in 0..n {
            for b in 0..k / BLOCK {
                let block = &w[c * k + b * BLOCK..][..BLOCK];
                let step = block.iter().fold(0.0f32, |a, v| a.max(v.abs())) / 127.0;
                for (v, &x) in block.iter().enumerate() {
                    let got = back[(b * BLOCK + v) * n + c];
                    assert!(
                        (got - x).abs() <= 0.5 * step * 1.001,
                        "w[{c}][{}] = {x}, back {got}",
                        b * BLOCK + v
                    );
                }
            }
        }
        assert!(Q8Matrix::from_f32(&w[1..], n, k).is_none());
        assert!(Q8Matrix::from_f32(&w[..8 * k], 8, k).is_none());
    }

    #[test]
    fn fused_steps_match_the_same_steps_done_after_the_product() {
        let (n, k, m) = (32, 96, 11);
        // Weights without outliers of their own, so that the input's dominates the error.
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 4001) % 997) as f32 / 997.0 * 0.02 - 0.01)
            .collect();
        let q = Q8Matrix::from_f32(&w, n, k).unwrap();
        let x = inputs(m, k); // channel 17 is the outlier (×40)
        let bias: Vec<f32> = (0..n).map(|c| c as f32 * 0.1 - 1.0).collect();
        let residual: Vec<f32> = (0..m * n).map(|i| (i % 7) as f32 * 0.3).collect();
        let limit = 6.0;
        let mut fused = vec![0.0; m * n];
        q.matmul_fused(
            &x,
            m,
            &mut fused,
            Fused {
                outliers_above: Some(limit),
                bias: Some(&bias),
                residual: Some(&residual),
                gelu: true,
            },
        );
        // The same by hand: outliers zeroed for the quantized product and multiplied in
        // f32 with the f16 weights; then bias, residual and GELU.
        let inliers: Vec<f32> = x
            .iter()
            .map(|&v| if v.abs() >= limit { 0.0 } else { v })
            .collect();
        assert!(inliers != x, "the test input has outliers");
        let mut expected = vec![0.0; m * n];
        q.matmul_reference(&inliers, m, &mut expected);
        for r in 0..m {
            for c in 0..n {
                let e = &mut expected[r * n + c];
                for j in (0..k).filter(|&j| x[r * k + j].abs() >= limit) {
                    *e += x[r * k + j] * half::f16::from_f32(w[c * k + j]).to_f32();
                }
                *e += bias[c] + residual[r * n + c];
            }
        }
        crate::gelu::gelu_erf(&mut expected);
        for (i, (a, b)) in fused.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                "[{i}]: {a} vs {b}"
            );
        }
        // And splitting the outlier off is what keeps its block's other values precise.
        let exact: Vec<f32> = (0..m * n)
            .map(|i| (0..k).map(|j| x[i / n * k + j] * w[i % n * k + j]).sum())
            .collect();
        let (mut split, mut whole) = (vec![0.0; m * n], vec![0.0; m * n]);
        let only = Fused {
            outliers_above: Some(limit),
            ..Fused::default()
        };
        q.matmul_fused(&x, m, &mut split, only);
        q.matmul(&x, m, &mut whole);
        let err = |v: &[f32]| -> f32 { v.iter().zip(&exact).map(|(a, b)| (a - b).powi(2)).sum() };
        assert!(
            err(&split) * 4.0 < err(&whole),
            "split {} vs whole {}",
            err(&split),
            err(&whole)
        );
    }

    #[test]
    #[should_panic(expected = "f16 weights")]
    fn outliers_need_the_f16_weights() {
        let q = Q8Matrix::from_q8_0(&weights(16, 64, 1), 16, 64).unwrap();
        let mut out = vec![0.0; 16];
        let fused = Fused {
            outliers_above: Some(6.0),
            ..Fused::default()
        };
        q.matmul_fused(&inputs(1, 64), 1, &mut out, fused);
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_refused() {
        assert!(Q8Matrix::from_q8_0(&weights(8, 32, 1), 8, 32).is_none()); // n % 16
        assert!(Q8Matrix::from_q8_0(&weights(16, 64, 1)[1..], 16, 64).is_none()); // size
        let w = Q8Matrix::from_q8_0(&weights(16, 64, 1), 16, 64).unwrap();
        assert_eq!((w.n(), w.k(), w.bytes()), (16, 64, 16 * 64 + 16 * 2 * 4));
    }
}
