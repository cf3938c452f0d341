//! Choosing the next token: greedy at temperature 0, else temperature and nucleus
//! (top_p) sampling from a per-request generator seeded by `seed` (so a seeded request
//! repeats exactly, whatever else runs beside it).

use super::model::argmax;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

/// A request's sampler (SplitMix64: small, seedable, good enough to draw tokens).
pub struct Sampler {
    params: SamplingParams,
    state: u64,
}

/// Candidates kept before sorting: 262k-entry sorts per token would cost ~10 ms.
const TOP_CANDIDATES: usize = 1024;

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            params,
            state: params.seed,
        }
    }

    fn next_f32(&mut self) -> f32 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / p.temperature).exp()))
            .collect();
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if cand.len() > TOP_CANDIDATES {
            cand.select_nth_unstable_by(TOP_CANDIDATES, desc);
            let top: f32 = cand[..TOP_CANDIDATES].iter().map(|c| c.1).sum();
            // The nucleus lies within the top candidates unless the distribution is flat.
            if top >= p.top_p * total {
                cand.truncate(TOP_CANDIDATES);
            }
        }
        cand.sort_unstable_by(desc);
        let mut keep = 0;
        let mut mass = 0.0;
        for c in &cand {
            mass += c.1;
            keep += 1;
            if mass >= p.top_p * total {
                break;
            }
        }
        let r = self.next_f32() * mass;
        let mut acc = 0.0;
        for c in &cand[..keep] {
            acc += c.1;
            if acc > r {
                return c.0;
            }
        }
        cand[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_seeded_and_nucleus_sampling() {
        let logits = vec![0.0, 3.0, 1.0, 2.9];
        let greedy = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            seed: 1,
        };
        assert_eq!(Sampler::new(greedy).sample(&logits), 1);
        let hot = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let draw = |params| {
            let mut s = Sampler::new(params);
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(hot), draw(hot), "a seed repeats");
        let all = draw(hot);
        assert!(all.contains(&0) && all.contains(&2) && all.contains(&3));
        // top_p 0.6 keeps tokens 1 and 3 only (0.48 alone is short of 0.6; with 3: 0.91).
        let nucleus = draw(SamplingParams { top_p: 0.6, ..hot });
        assert!(nucleus.iter().all(|t| *t == 1 || *t == 3), "{nucleus:?}");
        assert!(nucleus.contains(&3));
    }
}
