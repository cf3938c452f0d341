//! GELU, vectorized (AVX-512 where the CPU has it): the tanh approximation (Gemma's
//! `gelu_pytorch_tanh`, candle's `gelu`) and the exact erf form (BERT's `gelu`,
//! candle's `gelu_erf`).
//!
//! candle 0.11 computes them with a libm call per value (`tanh`: 7 % of a 16-sequence
//! Gemma decode step).

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

/// [`gelu_erf`] inlined into its caller, for a caller compiled for AVX-512 (the Q8_0
/// kernel's epilogue).
#[inline(always)]
pub(crate) fn gelu_erf_inline(xs: &mut [f32]) {
    gelu_erf_portable(xs);
}

#[inline(always)]
fn gelu_erf_portable(xs: &mut [f32]) {
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

/// [`exp`] for callers compiled for AVX-512 (attention's softmax), where it vectorizes.
#[inline(always)]
pub(crate) fn exp_inline(x: f32) -> f32 {
    exp(x)
}

/// e^x to ~2e-7 relative: 2^i · 2^f with |f| ≤ ½ and a degree-7 Taylor series of 2^f.
#[inline(always)]
fn exp(x: f32) -> f32 {
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
    fn gelu_matches_candles_to_float_precision() {
        use candle_core::{Device, Tensor};
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        let theirs = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu)
            .unwrap()
            .gelu()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut ours = xs.clone();
        gelu_tanh(&mut ours);
        for ((x, a), b) in xs.iter().zip(&ours).zip(&theirs) {
            assert!(
                (a - b).abs() <= 2e-6 * (1.0 + b.abs()),
                "gelu({x}) = {a}, candle {b}"
            );
        }
        let mut far = [-200.0f32, 200.0, 0.0];
        gelu_tanh(&mut far);
        assert_eq!(far, [-0.0, 200.0, 0.0]);
    }

    #[test]
    fn exact_gelu_matches_candles_erf_form() {
        use candle_core::{Device, Tensor};
        let xs: Vec<f32> = (-4000..=4000).map(|i| i as f32 / 400.0).collect();
        let theirs = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu)
            .unwrap()
            .gelu_erf()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut ours = xs.clone();
        gelu_erf(&mut ours);
        for ((x, a), b) in xs.iter().zip(&ours).zip(&theirs) {
            assert!(
                (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                "gelu_erf({x}) = {a}, candle {b}"
            );
        }
        let mut far = [-200.0f32, 200.0, 0.0];
        gelu_erf(&mut far);
        assert_eq!(far, [-0.0, 200.0, 0.0]);
    }
}
