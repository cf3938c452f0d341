//! f32 reductions and e^x written so that LLVM vectorizes them in a caller compiled for
//! AVX-512 (`#[target_feature]`, where they are inlined): attention and layer norms of
//! both tasks, the worker's GELU.

/// Lanes of the partial sums: one AVX-512 register of f32.
const LANES: usize = 16;

/// Sum of `a`, in sixteen partial sums.
#[inline(always)]
pub(crate) fn sum(a: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        acc.iter_mut().zip(c).for_each(|(s, v)| *s += v);
    }
    acc.iter().sum::<f32>() + tail
}

/// Dot product of `a` and `b` (the shorter's length), in sixteen partial sums.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// e^x to ~2e-7 relative: 2^i · 2^f with |f| ≤ ½ and a degree-7 Taylor series of 2^f.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let t = x.clamp(-87.0, 88.0) * std::f32::consts::LOG2_E;
    let i = t.round_ties_even();
    let f = (t - i) * std::f32::consts::LN_2;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * f + c;
    }
    p * f32::from_bits(((i as i32 + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reductions_and_exp_match_plain_arithmetic() {
        // Lengths below, at and past a lane multiple, so the tails count too.
        for len in [0usize, 5, 16, 37] {
            let a: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let b: Vec<f32> = (0..len).map(|i| 1.0 - i as f32 * 0.25).collect();
            let plain_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain_dot).abs() <= 1e-4 * plain_dot.abs().max(1.0));
            assert!((sum(&a) - a.iter().sum::<f32>()).abs() <= 1e-4);
        }
        for x in [-80.0f32, -3.5, 0.0, 1.0, 20.0] {
            assert!((exp(x) - x.exp()).abs() <= 3e-7 * x.exp(), "exp({x})");
        }
    }
}
