//! Predicting with a regression adapter: N answers drawn under the number grammar, each
//! metric's median and spread.

use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::number::{self, Class, NUM_TOKENS, TOKENS_PER_NUMBER, class_at};
use super::{RegressionSpec, stats};
use crate::adapter::Adapter;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, KvCache, Llama};

/// A regression adapter read from its folder: what it predicts, and its tensors.
pub struct Regressor<B: KernelBackend> {
    pub spec: RegressionSpec,
    pub adapter: Adapter<B>,
}

/// How to draw predictions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictSettings {
    /// Answers drawn per input; each metric's median is the prediction.
    pub samples: usize,
    /// Temperature of the number tokens' distribution (1: the model's own).
    pub temperature: f32,
    pub seed: u64,
    /// Reuse the previous input's prompt keys and values for the tokens the two prompts begin
    /// with (a program at several input sizes, say): the same predictions up to rounding, for
    /// less compute. Off only to check that.
    pub share_prefix: bool,
}

impl Default for PredictSettings {
    fn default() -> Self {
        Self {
            samples: 64,
            temperature: 1.0,
            seed: 0,
            share_prefix: true,
        }
    }
}

/// One metric's prediction for one input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub metric: String,
    /// The median of the samples: the prediction.
    pub median: f64,
    /// The samples' geometric mean (the mean of their log10): unlike the median, it moves with
    /// the probability of every order of magnitude, not only the likeliest, which makes it the
    /// finer score for ranking when most samples fall in one.
    #[serde(default)]
    pub geomean: f64,
    /// The same geometric mean with less sampling noise: each sample's log10 is corrected by
    /// how far its drawn exponent fell from the exponent's expectation under the model, given
    /// the tokens before it (a control variate; the correction's mean is zero, so the estimate
    /// is unbiased). The exponent carries nearly all the spread across decades, so what is
    /// left to sampling is mostly the mantissa's: ranking by it needs far fewer samples.
    #[serde(default)]
    pub expected: f64,
    /// The 10th and 90th percentiles: the spread, an uncertainty.
    pub low: f64,
    pub high: f64,
    pub samples: Vec<f64>,
}

impl<B: KernelBackend> Regressor<B> {
    /// The regression adapter in `dir`, for `model`; an error when the folder holds an adapter
    /// of another kind.
    pub fn load(dir: &Path, model: &Llama<B>) -> Result<Self> {
        let spec = RegressionSpec::load(dir)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} is not a regression adapter (no `regression` in codelsi_adapter.json)",
                dir.display()
            ))
        })?;
        let adapter = Adapter::load_peft(dir, &model.config, model.device())?;
        Ok(Self { spec, adapter })
    }

    /// Predict every metric of the spec for each code: the prompt once, then `samples`
    /// answers decoded as one batch over the prompt's KV cache, each token drawn among those
    /// the number grammar allows. `on_done(i)` after each input; `None` when cancelled.
    pub fn predict(
        &self,
        model: &Llama<B>,
        tok: &Tokenizer,
        codes: &[String],
        settings: PredictSettings,
        cancel: &CancelToken,
        on_done: &mut dyn FnMut(usize),
    ) -> Result<Option<Vec<Vec<Prediction>>>> {
        let (adapter, spec) = (&self.adapter, &self.spec);
        let new = adapter.new_tokens.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "this adapter has no number tokens: not a regression adapter".into(),
            )
        })?;
        if new.head.dims()[0] != NUM_TOKENS || spec.vocab != model.config.vocab_size {
            return Err(Error::InvalidArgument(format!(
                "the regression adapter was trained for a vocabulary of {} with {} number tokens; \
                 this model has {} and codelsi uses {NUM_TOKENS}",
                spec.vocab,
                new.head.dims()[0],
                model.config.vocab_size
            )));
        }
        let n = settings.samples.max(1);
        if !(settings.temperature > 0.0 && settings.temperature.is_finite()) {
            return Err(Error::Setting(
                "the temperature of regression samples must be above 0".into(),
            ));
        }
        let list = [adapter];
        let adapters = Adapters {
            list: &list,
            train: None,
        };
        let steps = spec.metrics.len() * TOKENS_PER_NUMBER;
        let h = model.config.hidden_size;
        let device = model.device().clone();
        let mut rng = StdRng::seed_from_u64(settings.seed);
        let prompts = codes
            .iter()
            .map(|c| spec.prompt_tokens(tok, c))
            .collect::<Result<Vec<_>>>()?;
        // One capacity for every cache, so that each can start the next input's.
        let capacity = prompts.iter().map(Vec::len).max().unwrap_or(0) + steps;
        // The last prompt's cache (batch 1, its prompt alone) and tokens.
        let mut previous: Option<(KvCache<B>, &[u32])> = None;
        let mut out = Vec::with_capacity(codes.len());
        for (ci, prompt) in prompts.iter().enumerate() {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            // At least the last prompt token is run, for the first answer token's logits.
            let (mut cache, start) = match previous.take() {
                Some((mut cache, before)) if settings.share_prefix => {
                    let common = before
                        .iter()
                        .zip(prompt)
                        .take_while(|(a, b)| a == b)
                        .count()
                        .min(prompt.len() - 1);
                    cache.truncate(common);
                    (cache, common)
                }
                _ => (model.new_cache(1, capacity), 0),
            };
            let x = model.embed(&prompt[start..])?;
            let hidden = model.forward_embedded(x, &[0], &mut cache, adapters)?;
            let seq = prompt.len() - start;
            let last = hidden.slice([0..1, seq - 1..seq, 0..h]);
            previous = Some((cache.clone(), prompt));
            cache.retain_rows(&vec![0; n]);
            let mut last = last.repeat_dim(0, n); // [n, 1, h]
            let mut drawn: Vec<Vec<usize>> = vec![Vec::with_capacity(steps); n];
            // Per row, per metric: expected exponent minus drawn exponent ([`Prediction::expected`]).
            let mut shift = vec![vec![0.0f64; spec.metrics.len()]; n];
            for step in 0..steps {
                if cancel.is_cancelled() {
                    return Ok(None);
                }
                let normed = model.final_norm(last).reshape([n, h]);
                let logits = normed.matmul(new.head.clone().transpose()); // [n, NUM_TOKENS]
                let logits: Vec<f32> = logits
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .map_err(|e| Error::Internal(format!("reading logits: {e:?}")))?;
                let class = class_at(step);
                let allowed = class.tokens();
                let mut next = Vec::with_capacity(n);
                for (r, row) in logits.chunks_exact(NUM_TOKENS).enumerate() {
                    let w = softmax_weights(&row[allowed.clone()], settings.temperature);
                    let i = draw(&w, &mut rng);
                    if class == Class::Exponent {
                        // Exponent tokens are in order, one decade apart.
                        shift[r][step / TOKENS_PER_NUMBER] = mean_index(&w) - i as f64;
                    }
                    let t = i + allowed.start;
                    drawn[r].push(t);
                    next.push(t as i32);
                }
                if step + 1 == steps {
                    break;
                }
                let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(next, [n]), &device);
                let x = new.embed.clone().select(0, idx).reshape([n, 1, h]);
                last = model.forward_embedded(x, &vec![0; n], &mut cache, adapters)?;
            }
            let mut per_metric = Vec::with_capacity(spec.metrics.len());
            for (m, name) in spec.metrics.iter().enumerate() {
                let values: Vec<f64> = drawn
                    .iter()
                    .map(|d| number::decode(&d[m * TOKENS_PER_NUMBER..(m + 1) * TOKENS_PER_NUMBER]))
                    .collect::<Result<_>>()?;
                per_metric.push(Prediction {
                    metric: name.clone(),
                    median: stats::quantile(&values, 0.5),
                    geomean: geometric_mean(values.iter().copied()),
                    expected: geometric_mean(
                        values
                            .iter()
                            .zip(&shift)
                            .map(|(&v, s)| v * 10f64.powf(s[m])),
                    ),
                    low: stats::quantile(&values, 0.1),
                    high: stats::quantile(&values, 0.9),
                    samples: values,
                });
            }
            out.push(per_metric);
            on_done(ci);
        }
        Ok(Some(out))
    }
}

/// `softmax(logits / temperature)`, unnormalised.
pub fn softmax_weights(logits: &[f32], temperature: f32) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .map(|&l| (((l - max) / temperature) as f64).exp())
        .collect()
}

/// The mean index under weights `w` ([`softmax_weights`]).
pub fn mean_index(w: &[f64]) -> f64 {
    let total: f64 = w.iter().sum();
    w.iter()
        .enumerate()
        .map(|(i, &x)| i as f64 * x)
        .sum::<f64>()
        / total
}

/// Draw an index in proportion to the weights `w`.
fn draw(w: &[f64], rng: &mut StdRng) -> usize {
    let total: f64 = w.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &x) in w.iter().enumerate() {
        if u < x {
            return i;
        }
        u -= x;
    }
    w.len() - 1
}

/// The geometric mean of positive values, each floored as [`stats::log10_floor`] floors it.
fn geometric_mean(values: impl ExactSizeIterator<Item = f64>) -> f64 {
    let n = values.len() as f64;
    10f64.powf(values.map(stats::log10_floor).sum::<f64>() / n)
}
