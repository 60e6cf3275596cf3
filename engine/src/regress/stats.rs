//! How well predictions rank and fit the measured values, and the two baselines a regression
//! adapter must beat: the code's length, and a ridge regression on a bag of tokens.

use serde::Serialize;

/// Ranks from 1, ties given their average rank.
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
        syy += (b - my) * (b - my);
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx * syy).sqrt()
}

/// Spearman's rank correlation (Pearson on average ranks); 0 when either side is constant.
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    pearson(&ranks(x), &ranks(y))
}

/// Kendall's τ-b (ties on either side accounted for); O(n²), fine for held-out sets of a few
/// thousand.
pub fn kendall_tau(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len();
    let (mut concordant, mut discordant, mut tie_x, mut tie_y) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            let dx = x[i].total_cmp(&x[j]) as i64;
            let dy = y[i].total_cmp(&y[j]) as i64;
            match (dx, dy) {
                (0, 0) => {}
                (0, _) => tie_x += 1,
                (_, 0) => tie_y += 1,
                _ if dx == dy => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let n0 = (concordant + discordant + tie_x) as f64 * (concordant + discordant + tie_y) as f64;
    if n0 == 0.0 {
        return 0.0;
    }
    (concordant - discordant) as f64 / n0.sqrt()
}

/// The smallest magnitude logs are taken of (costs are positive; a zero is a measurement at
/// the timer's resolution).
const LOG_FLOOR: f64 = 1e-6;

pub fn log10_floor(v: f64) -> f64 {
    v.max(LOG_FLOOR).log10()
}

/// Mean absolute error of log10 values: 0.3 is a typical factor of 2 off.
pub fn mae_log10(pred: &[f64], truth: &[f64]) -> f64 {
    if pred.is_empty() {
        return 0.0;
    }
    pred.iter()
        .zip(truth)
        .map(|(p, t)| (log10_floor(*p) - log10_floor(*t)).abs())
        .sum::<f64>()
        / pred.len() as f64
}

/// The `q` quantile (0..=1) of `v`, linearly interpolated; `v` need not be sorted.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let pos = q.clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// How a predictor did on one metric of a held-out set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Scores {
    pub spearman: f64,
    pub kendall_tau: f64,
    pub mae_log10: f64,
}

impl Scores {
    pub fn of(pred: &[f64], truth: &[f64]) -> Self {
        Self {
            spearman: spearman(pred, truth),
            kendall_tau: kendall_tau(pred, truth),
            mae_log10: mae_log10(pred, truth),
        }
    }
}

/// Least squares of `log10 y = a + b·log10(length)`: the length baseline. Its ranking is the
/// length's own; the fit gives it values to compare errors with.
#[derive(Debug, Clone, Copy)]
pub struct LengthBaseline {
    a: f64,
    b: f64,
}

impl LengthBaseline {
    pub fn fit(lengths: &[usize], y: &[f64]) -> Self {
        let x: Vec<f64> = lengths.iter().map(|&l| (l.max(1) as f64).log10()).collect();
        let ly: Vec<f64> = y.iter().map(|&v| log10_floor(v)).collect();
        let n = x.len().max(1) as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, ly.iter().sum::<f64>() / n);
        let sxx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
        let sxy: f64 = x.iter().zip(&ly).map(|(a, b)| (a - mx) * (b - my)).sum();
        let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        Self { a: my - b * mx, b }
    }

    pub fn predict(&self, length: usize) -> f64 {
        10f64.powf(self.a + self.b * (length.max(1) as f64).log10())
    }
}

/// Features of the bag-of-tokens baseline: token ids hashed into this many buckets, and one
/// constant feature after them (the features are not centred, so the fit needs its own
/// intercept beside the mean it starts from).
const BUCKETS: usize = 1024;
const FEATURES: usize = BUCKETS + 1;

/// Ridge regression of log10 y on a bag of tokens (`log(1 + count)` per hashed token id), the
/// strength chosen on a fifth of the training examples held out.
#[derive(Debug, Clone)]
pub struct RidgeBaseline {
    weights: Vec<f64>,
    bias: f64,
    pub lambda: f64,
}

fn features(tokens: &[u32]) -> Vec<(usize, f64)> {
    let mut counts = std::collections::BTreeMap::<usize, f64>::new();
    for &t in tokens {
        let h = (t as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54; // top 10 bits: 1024
        *counts.entry(h as usize % BUCKETS).or_default() += 1.0;
    }
    let mut f: Vec<(usize, f64)> = counts
        .into_iter()
        .map(|(k, c)| (k, (1.0 + c).ln()))
        .collect();
    f.push((BUCKETS, 1.0));
    f
}

/// Solve `(XᵀX + λI) w = Xᵀy` (Cholesky; the matrix is positive definite for λ > 0).
fn solve(xtx: &[f64], xty: &[f64], lambda: f64) -> Vec<f64> {
    let n = xty.len();
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = xtx[i * n + j] + if i == j { lambda } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            l[i * n + j] = if i == j {
                s.max(1e-12).sqrt()
            } else {
                s / l[j * n + j]
            };
        }
    }
    let mut z = vec![0.0; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * z[k]).sum();
        z[i] = (xty[i] - s) / l[i * n + i];
    }
    let mut w = vec![0.0; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * w[k]).sum();
        w[i] = (z[i] - s) / l[i * n + i];
    }
    w
}

impl RidgeBaseline {
    fn fit_with(docs: &[Vec<(usize, f64)>], ly: &[f64], lambda: f64) -> Self {
        let n = docs.len().max(1) as f64;
        let bias = ly.iter().sum::<f64>() / n;
        let mut xtx = vec![0.0; FEATURES * FEATURES];
        let mut xty = vec![0.0; FEATURES];
        for (d, y) in docs.iter().zip(ly) {
            for &(i, a) in d {
                xty[i] += a * (y - bias);
                for &(j, b) in d {
                    xtx[i * FEATURES + j] += a * b;
                }
            }
        }
        Self {
            weights: solve(&xtx, &xty, lambda),
            bias,
            lambda,
        }
    }

    fn predict_log(&self, doc: &[(usize, f64)]) -> f64 {
        self.bias + doc.iter().map(|&(i, a)| self.weights[i] * a).sum::<f64>()
    }

    /// Fit on token sequences and their values; λ from {0.1, 1, 10, 100} by the error on every
    /// fifth example.
    pub fn fit(tokens: &[Vec<u32>], y: &[f64]) -> Self {
        let docs: Vec<_> = tokens.iter().map(|t| features(t)).collect();
        let ly: Vec<f64> = y.iter().map(|&v| log10_floor(v)).collect();
        let (mut fit_d, mut fit_y, mut hold_d, mut hold_y) = (vec![], vec![], vec![], vec![]);
        for (i, (d, y)) in docs.iter().zip(&ly).enumerate() {
            if i % 5 == 4 {
                hold_d.push(d.clone());
                hold_y.push(*y);
            } else {
                fit_d.push(d.clone());
                fit_y.push(*y);
            }
        }
        let lambda = if hold_d.is_empty() || fit_d.is_empty() {
            1.0
        } else {
            let err = |lambda: f64| {
                let m = Self::fit_with(&fit_d, &fit_y, lambda);
                hold_d
                    .iter()
                    .zip(&hold_y)
                    .map(|(d, y)| (m.predict_log(d) - y).abs())
                    .sum::<f64>()
            };
            [0.1, 1.0, 10.0, 100.0]
                .into_iter()
                .min_by(|a, b| err(*a).total_cmp(&err(*b)))
                .unwrap_or(1.0)
        };
        Self::fit_with(&docs, &ly, lambda)
    }

    pub fn predict(&self, tokens: &[u32]) -> f64 {
        10f64.powf(self.predict_log(&features(tokens)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_correlations_know_their_extremes_and_ties() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let up = [10.0, 20.0, 25.0, 100.0, 1000.0];
        let down: Vec<f64> = up.iter().map(|v| -v).collect();
        assert!((spearman(&x, &up) - 1.0).abs() < 1e-12);
        assert!((kendall_tau(&x, &up) - 1.0).abs() < 1e-12);
        assert!((spearman(&x, &down) + 1.0).abs() < 1e-12);
        assert!((kendall_tau(&x, &down) + 1.0).abs() < 1e-12);
        // scipy.stats: spearmanr([1,2,2,3],[1,3,2,4]) = 0.9486832980505138,
        // kendalltau (τ-b) = 0.9128709291752769.
        let (a, b) = ([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0]);
        assert!((spearman(&a, &b) - 0.948_683_298_050_513_8).abs() < 1e-12);
        assert!((kendall_tau(&a, &b) - 0.912_870_929_175_276_9).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), 0.0);
    }

    #[test]
    fn errors_and_quantiles() {
        assert!((mae_log10(&[10.0, 100.0], &[100.0, 100.0]) - 0.5).abs() < 1e-12);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(quantile(&[1.0, 2.0], 0.25), 1.25);
    }

    #[test]
    fn baselines_learn_what_they_can_see() {
        // y = 10 · length: the length baseline is exact.
        let lengths = [10, 100, 1000, 50];
        let y: Vec<f64> = lengths.iter().map(|&l| 10.0 * l as f64).collect();
        let m = LengthBaseline::fit(&lengths, &y);
        assert!((m.predict(200) - 2000.0).abs() < 1e-6);
        // y grows tenfold with each copy of token 7; other tokens are noise.
        let docs: Vec<Vec<u32>> = (0..60)
            .map(|i| {
                let mut d = vec![7; 1 + i % 4];
                d.extend([(i * 13 % 50) as u32 + 100]);
                d
            })
            .collect();
        let y: Vec<f64> = docs
            .iter()
            .map(|d| 10f64.powf((1.0 + d.iter().filter(|&&t| t == 7).count() as f64).ln()))
            .collect();
        let r = RidgeBaseline::fit(&docs, &y);
        let pred: Vec<f64> = docs.iter().map(|d| r.predict(d)).collect();
        assert!(mae_log10(&pred, &y) < 0.05, "{}", mae_log10(&pred, &y));
    }
}
