//! GELU, vectorized (AVX-512 where the CPU has it): the tanh approximation (Gemma's
//! `gelu_pytorch_tanh`, candle's `gelu`) and the exact erf form (BERT's `gelu`,
//! candle's `gelu_erf`).
//!
//! candle 0.11 computes them with a libm call per value (`tanh`: 7 % of a 16-sequence
//! Gemma decode step).

use crate::vector::exp;

/// GELU in place.
pub fn gelu_tanh(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { gelu_tanh_avx512(xs) };
    }
    gelu_tanh_portable(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_tanh_avx512(xs: &mut [f32]) {
    gelu_tanh_portable(xs);
}

#[inline(always)]
fn gelu_tanh_portable(xs: &mut [f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for x in xs.iter_mut() {
        let v = *x;
        let u = SQRT_2_OVER_PI * (v + 0.044_715 * v * v * v);
        // tanh(u) = 1 − 2 / (1 + e^{2u}); saturates to ±1 as e^{2u} → ∞ or 0.
        let tanh = 1.0 - 2.0 / (1.0 + exp(2.0 * u));
        *x = 0.5 * v * (1.0 + tanh);
    }
}

/// Exact GELU, `x · Φ(x)`, in place.
pub fn gelu_erf(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { gelu_erf_avx512(xs) };
    }
    gelu_erf_portable(xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_erf_avx512(xs: &mut [f32]) {
    gelu_erf_portable(xs);
}

/// [`gelu_erf`]'s body, inlined into its caller: vectorized where the caller is compiled
/// for AVX-512 (the Q8_0 kernel's epilogue calls it directly).
#[inline(always)]
pub(crate) fn gelu_erf_portable(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        let v = *x;
        // Φ(v) = ½ (1 + erf(v / √2)) with erf from Abramowitz & Stegun 7.1.26
        // (|error| ≤ 1.5e-7), written for |z| and given v's sign.
        let z = (v * std::f32::consts::FRAC_1_SQRT_2).abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
        let erf = 1.0 - poly * exp(-z * z);
        let erf = if v < 0.0 { -erf } else { erf };
        *x = 0.5 * v * (1.0 + erf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ours` against candle's `theirs` on [-10, 10] within `tolerance` (relative to
    /// 1 + |value|), and saturation far out.
    fn matches_candle(
        ours: fn(&mut [f32]),
        theirs: fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
        tolerance: f32,
    ) {
        use candle_core::{Device, Tensor};
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        let expected = theirs(&Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut got = xs.clone();
        ours(&mut got);
        for ((x, a), b) in xs.iter().zip(&got).zip(&expected) {
            assert!(
                (a - b).abs() <= tolerance * (1.0 + b.abs()),
                "gelu({x}) = {a}, candle {b}"
            );
        }
        let mut far = [-200.0f32, 200.0, 0.0];
        ours(&mut far);
        assert_eq!(far, [-0.0, 200.0, 0.0]);
    }

    #[test]
    fn gelu_matches_candles_to_float_precision() {
        matches_candle(gelu_tanh, |t| t.gelu(), 2e-6);
    }

    #[test]
    fn exact_gelu_matches_candles_erf_form() {
        matches_candle(gelu_erf, |t| t.gelu_erf(), 1e-6);
    }
}
