//! Choosing the next token: greedy, or temperature with top-k, top-p, min-p and a repetition
//! penalty (in the order HF's `generate` applies its logits processors), from a seeded RNG.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of tokens already seen; 1 is off (CTRL paper).
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str| Err(crate::Error::Setting(what.into()));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("min-p must be in [0, 1)");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition penalty must be a positive number");
        }
        Ok(())
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: StdRng,
}

/// `log softmax` of `logits`, then the `k` best as `(id, log-probability)`.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>()
        .ln() as f32
        + max;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize].total_cmp(&logits[a as usize])
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - log_sum))
        .collect()
}

pub fn argmax(logits: &[f32]) -> u32 {
    // First maximum on ties, as torch.argmax.
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng }
    }

    /// Pick the next token from `logits` (modified in place), given the tokens seen so far.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = history.to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        // Candidates sorted by logit, most likely first.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        if p.top_k > 0 {
            cand.truncate(p.top_k);
        }
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| ((l - max) as f64).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, &pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let threshold = probs[0] * p.min_p as f64;
            keep = keep.min(
                probs
                    .iter()
                    .take_while(|&&pr| pr >= threshold)
                    .count()
                    .max(1),
            );
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f64>() * total;
        for (i, &pr) in probs[..keep].iter().enumerate() {
            r -= pr;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_repeats() {
        let logits = [0.5f32, 2.0, 1.9, 0.0, -3.0];
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&mut logits.clone(), &[]), 1);
        let params = SamplingParams {
            temperature: 1.5,
            seed: 42,
            ..Default::default()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&params), draw(&params));
        assert!(
            draw(&params).iter().any(|&t| t != 1),
            "temperature 1.5 should not be greedy"
        );
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let logits = [5.0f32, 4.9, -10.0, -10.0];
        for params in [
            SamplingParams {
                temperature: 1.0,
                min_p: 0.5,
                seed: 3,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_p: 0.9,
                seed: 3,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params);
            for _ in 0..50 {
                assert!(s.sample(&mut logits.clone(), &[]) < 2);
            }
        }
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        assert_eq!(Sampler::new(params).sample(&mut [2.0, 1.5], &[0]), 1);
    }

    #[test]
    fn top_logprobs_are_normalised() {
        let lp = top_logprobs(&[1.0, 2.0, 3.0], 3);
        assert_eq!(lp.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 1, 0]);
        let total: f32 = lp.iter().map(|x| x.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
