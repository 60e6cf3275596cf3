//! Regression adapters: one language model predicting numbers (latency, peak memory) straight
//! from code text, decoded digit by digit, after "Regression Language Models for Code"
//! (Akhauri et al., 2025) and its regress-lm library.
//!
//! A regression adapter is a LoRA adapter plus [`number::NUM_TOKENS`] new tokens (their
//! embedding and output rows, [`crate::adapter::NewTokens`]). The prompt names the code and the
//! metrics; the answer is one number per metric ([`number`]). Training (`train::train`) sees
//! the new tokens and scores only them: the loss at each answer position is over the number
//! tokens its grammar allows, which is the distribution constrained decoding samples from.
//! [`predict`] draws N answers and reports each metric's median and spread. [`stats`] scores
//! predictions on a held-out split against the baselines; [`measure`] builds datasets by
//! running programs.

pub mod measure;
pub mod number;
pub mod stats;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, NewTokens};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, KvCache, Llama};
use crate::train::data::{Example as TokenExample, Row, pack_shared};
use crate::train::meta::AdapterMeta;
use crate::train::objective::Objective;
use number::{Class, NUM_TOKENS, TOKENS_PER_NUMBER, class_at};

/// One piece of code and what was measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Example {
    pub code: String,
    pub metrics: BTreeMap<String, f64>,
    /// Examples of one group (one problem) stay on one side of the held-out split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// Fields of a data file that are not metrics.
const NOT_METRICS: [&str; 5] = ["code", "group", "task_id", "scale", "source"];

/// Read examples from JSONL (`code`, `metrics` as an object or as numeric fields beside it,
/// optional `group` or `task_id`) or CSV (a `code` column, optional `group`/`task_id`, every
/// other column a metric; empty cells are missing values).
pub fn read_examples(path: &Path) -> Result<Vec<Example>> {
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let examples = if is_csv {
        read_csv(path)?
    } else {
        read_jsonl(path)?
    };
    if examples.is_empty() {
        return Err(Error::Malformed {
            path: path.into(),
            what: "no examples".into(),
        });
    }
    Ok(examples)
}

fn read_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: String| Error::Malformed {
            path: path.into(),
            what: format!("line {}: {what}", i + 1),
        };
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let code = obj
            .get("code")
            .and_then(|c| c.as_str())
            .ok_or_else(|| bad("no `code` string".into()))?
            .to_string();
        let group = ["group", "task_id"]
            .iter()
            .find_map(|k| obj.get(*k))
            .map(|g| match g {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
        let mut metrics = BTreeMap::new();
        let mut put = |name: &str, value: &serde_json::Value| -> Result<()> {
            match value {
                serde_json::Value::Null => Ok(()),
                v => {
                    let x = v
                        .as_f64()
                        .ok_or_else(|| bad(format!("metric `{name}` is not a number: {v}")))?;
                    metrics.insert(name.to_string(), x);
                    Ok(())
                }
            }
        };
        match obj.get("metrics") {
            Some(serde_json::Value::Object(m)) => {
                for (k, v) in m {
                    put(k, v)?;
                }
            }
            Some(_) => return Err(bad("`metrics` is not an object".into())),
            None => {
                for (k, v) in obj {
                    if !NOT_METRICS.contains(&k.as_str()) {
                        put(k, v)?;
                    }
                }
            }
        }
        out.push(Example {
            code,
            metrics,
            group,
        });
    }
    Ok(out)
}

fn read_csv(path: &Path) -> Result<Vec<Example>> {
    let bad = |what: String| Error::Malformed {
        path: path.into(),
        what,
    };
    let mut reader = csv::Reader::from_path(path).map_err(|e| bad(e.to_string()))?;
    let headers = reader.headers().map_err(|e| bad(e.to_string()))?.clone();
    let code_col = headers
        .iter()
        .position(|h| h == "code")
        .ok_or_else(|| bad("no `code` column".into()))?;
    let group_col = headers
        .iter()
        .position(|h| h == "group")
        .or_else(|| headers.iter().position(|h| h == "task_id"));
    let mut out = Vec::new();
    for (i, rec) in reader.records().enumerate() {
        let rec = rec.map_err(|e| bad(e.to_string()))?;
        let mut metrics = BTreeMap::new();
        for (c, h) in headers.iter().enumerate() {
            if c == code_col || Some(c) == group_col || NOT_METRICS.contains(&h) {
                continue;
            }
            let cell = rec.get(c).unwrap_or("").trim();
            if cell.is_empty() {
                continue;
            }
            let v: f64 = cell.parse().map_err(|_| {
                bad(format!(
                    "record {}: column `{h}`: `{cell}` is not a number",
                    i + 1
                ))
            })?;
            metrics.insert(h.to_string(), v);
        }
        out.push(Example {
            code: rec.get(code_col).unwrap_or("").to_string(),
            metrics,
            group: group_col.and_then(|g| rec.get(g)).map(str::to_string),
        });
    }
    Ok(out)
}

/// The metrics of a data set, in order of first appearance.
pub fn metric_names(examples: &[Example]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for e in examples {
        for k in e.metrics.keys() {
            if !names.contains(k) {
                names.push(k.clone());
            }
        }
    }
    names
}

/// Split by group (an example without a group is its own): a seeded shuffle of the groups,
/// `frac` of them (at least one when there are two or more) held out. Never splits a group.
pub fn split_by_group(
    examples: Vec<Example>,
    frac: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    use rand::seq::SliceRandom;
    let key = |i: usize, e: &Example| e.group.clone().unwrap_or_else(|| format!("#{i}"));
    let mut groups: Vec<String> = examples
        .iter()
        .enumerate()
        .map(|(i, e)| key(i, e))
        .collect();
    groups.sort();
    groups.dedup();
    groups.shuffle(&mut StdRng::seed_from_u64(seed));
    let n_val = if groups.len() >= 2 {
        ((groups.len() as f64 * frac).round() as usize).clamp(1, groups.len() - 1)
    } else {
        0
    };
    let held: std::collections::HashSet<&String> = groups[..n_val].iter().collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (i, e) in examples.into_iter().enumerate() {
        if held.contains(&key(i, &e)) {
            val.push(e);
        } else {
            train.push(e);
        }
    }
    (train, val)
}

/// What a regression adapter predicts and how its prompts are cut; kept in the adapter's
/// `codelsi_adapter.json` under `extra.regression`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegressionSpec {
    /// In the order of the answer.
    pub metrics: Vec<String>,
    /// The prompt's length limit in tokens (the code is cut in the middle to fit).
    pub max_prompt_tokens: usize,
    /// The base vocabulary size: number token `i` is id `vocab + i`.
    pub vocab: usize,
    /// The number encoding, for readers of the file.
    pub encoding: String,
}

impl RegressionSpec {
    pub fn new(metrics: Vec<String>, max_prompt_tokens: usize, vocab: usize) -> Self {
        Self {
            metrics,
            max_prompt_tokens,
            vocab,
            encoding: format!(
                "sign, exponent E{}..E{}, {} mantissa digits",
                number::EXP_MIN,
                number::EXP_MAX,
                number::MANTISSA_DIGITS
            ),
        }
    }

    /// The spec of the adapter in `dir`; `None` when it is not a regression adapter.
    pub fn load(dir: &Path) -> Result<Option<Self>> {
        let Some(meta) = AdapterMeta::read(dir)? else {
            return Ok(None);
        };
        match meta.extra.regression {
            None => Ok(None),
            Some(r) => serde_json::from_value(r)
                .map(Some)
                .map_err(|source| Error::Json {
                    path: dir.join(AdapterMeta::FILE),
                    source,
                }),
        }
    }

    /// The prompt's tokens: a header, the code (its middle cut out when the whole would pass
    /// `max_prompt_tokens`), and the metrics asked for. Pieces are tokenised apart, in training
    /// and prediction alike.
    pub fn prompt_tokens(&self, tok: &Tokenizer, code: &str) -> Result<Vec<u32>> {
        let head = tok.encode(
            "Predict the cost of running this program.\nProgram:\n",
            true,
        )?;
        let tail = tok.encode(
            &format!("\nMetrics: {}\nValues:", self.metrics.join(", ")),
            false,
        )?;
        let code_ids = tok.encode(code, false)?;
        let room = self
            .max_prompt_tokens
            .saturating_sub(head.len() + tail.len());
        if room < 16 {
            return Err(Error::InvalidArgument(format!(
                "a prompt of {} tokens leaves no room for code (the header takes {})",
                self.max_prompt_tokens,
                head.len() + tail.len()
            )));
        }
        let mut out = head;
        if code_ids.len() <= room {
            out.extend(code_ids);
        } else {
            let cut = tok.encode("\n…\n", false)?;
            let keep = room.saturating_sub(cut.len());
            let front = keep / 2;
            out.extend(&code_ids[..front]);
            out.extend(cut);
            out.extend(&code_ids[code_ids.len() - (keep - front)..]);
        }
        out.extend(tail);
        Ok(out)
    }

    /// The answer's token ids for `values`, one per metric.
    pub fn answer_tokens(&self, values: &[f64]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(values.len() * TOKENS_PER_NUMBER);
        for &v in values {
            out.extend(number::encode(v)?.iter().map(|&t| (self.vocab + t) as u32));
        }
        Ok(out)
    }

    /// Training rows: prompt then answer, the loss on the answer; examples missing a metric
    /// are left out (their count is returned). The examples of a group (one program at several
    /// sizes) share the start of their prompts, which is packed once ([`pack_shared`]): on
    /// `codelsi measure` data that is about 2.4 times less text to run.
    pub fn rows(&self, examples: &[Example], tok: &Tokenizer) -> Result<(Vec<Row>, usize)> {
        let mut groups: Vec<Vec<TokenExample>> = Vec::new();
        let mut group_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut missing = 0;
        for e in examples {
            let values: Option<Vec<f64>> = self
                .metrics
                .iter()
                .map(|m| e.metrics.get(m).copied().filter(|v| v.is_finite()))
                .collect();
            let Some(values) = values else {
                missing += 1;
                continue;
            };
            let mut tokens = self.prompt_tokens(tok, &e.code)?;
            let prompt_len = tokens.len();
            tokens.extend(self.answer_tokens(&values)?);
            let loss_mask = (0..tokens.len()).map(|i| i >= prompt_len).collect();
            let ex = TokenExample { tokens, loss_mask };
            match e.group.as_deref() {
                Some(g) => match group_of.get(g) {
                    Some(&k) => groups[k].push(ex),
                    None => {
                        group_of.insert(g, groups.len());
                        groups.push(vec![ex]);
                    }
                },
                None => groups.push(vec![ex]),
            }
        }
        let row_len = self.max_prompt_tokens + self.metrics.len() * TOKENS_PER_NUMBER;
        Ok((pack_shared(&groups, row_len), missing))
    }
}

/// A regression adapter read from its folder: what it predicts, and its tensors.
pub struct Regressor<B: KernelBackend> {
    pub spec: RegressionSpec,
    pub adapter: Adapter<B>,
}

/// The regression task's training objective: the adapter adds the number tokens (starting from
/// [`init_number_rows`]), their rows embed them ([`embed_with_new`]), and the loss is over the
/// tokens the number grammar allows at each answer position ([`number_nll`]).
pub struct NumberObjective {
    embed: Vec<f32>,
    head: Vec<f32>,
}

impl NumberObjective {
    /// The objective for `model`, its number tokens starting from `tok`'s texts of them.
    pub fn new<B: KernelBackend>(model: &Llama<B>, tok: &Tokenizer) -> Result<Self> {
        let (embed, head) = init_number_rows(model, tok)?;
        Ok(Self { embed, head })
    }
}

impl<B: KernelBackend> Objective<B> for NumberObjective {
    fn new_token_rows(&self) -> (&[f32], &[f32]) {
        (&self.embed, &self.head)
    }

    fn embed(&self, model: &Llama<B>, new: &NewTokens<B>, tokens: &[u32]) -> Result<Tensor<B, 3>> {
        embed_with_new(model, new, tokens)
    }

    fn loss(
        &self,
        model: &Llama<B>,
        new: &NewTokens<B>,
        x: Tensor<B, 3>,
        row: &Row,
    ) -> Result<Tensor<B, 1>> {
        number_nll(model, new, x, row)
    }
}

/// The number-token rows a regression adapter starts from: each token's input embedding is the
/// mean embedding of a text the base tokenizer knows (`7`, `-`, `e-3`), and its output row the
/// same vector, so a model with tied embeddings starts from its own preference among those
/// texts. `[NUM_TOKENS, hidden]` each, row-major.
pub fn init_number_rows<B: KernelBackend>(
    model: &Llama<B>,
    tok: &Tokenizer,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let h = model.config.hidden_size;
    let mut rows = Vec::with_capacity(NUM_TOKENS * h);
    for i in 0..NUM_TOKENS {
        let ids = tok.encode(&number::token_seed_text(i), false)?;
        let table = model.embed_tokens.lookup(&ids)?;
        let mut mean = vec![0f32; h];
        for r in table.chunks_exact(h) {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / ids.len().max(1) as f32;
            }
        }
        rows.extend(mean);
    }
    Ok((rows.clone(), rows))
}

/// Input embeddings of `tokens`, where ids from the base vocabulary's size on are `new`'s rows.
///
/// # Shapes
/// → `[1, seq, hidden]`
pub fn embed_with_new<B: KernelBackend>(
    model: &Llama<B>,
    new: &NewTokens<B>,
    tokens: &[u32],
) -> Result<Tensor<B, 3>> {
    let vocab = model.config.vocab_size as u32;
    let (seq, h) = (tokens.len(), model.config.hidden_size);
    let rows = new.embed.dims()[0];
    let base_ids: Vec<u32> = tokens
        .iter()
        .map(|&t| if t < vocab { t } else { 0 })
        .collect();
    let device = model.device();
    let keep: Vec<f32> = tokens
        .iter()
        .map(|&t| f32::from(u8::from(t < vocab)))
        .collect();
    let mut onehot = vec![0f32; seq * rows];
    for (i, &t) in tokens.iter().enumerate() {
        if t >= vocab {
            let k = (t - vocab) as usize;
            if k >= rows {
                return Err(Error::InvalidArgument(format!(
                    "token id {t} is past the adapter's {rows} new tokens"
                )));
            }
            onehot[i * rows + k] = 1.0;
        }
    }
    let keep = Tensor::<B, 3>::from_data(TensorData::new(keep, [1, seq, 1]), device);
    let onehot = Tensor::<B, 2>::from_data(TensorData::new(onehot, [seq, rows]), device);
    let base = model.embed(&base_ids)? * keep; // [1, seq, h]
    let added = onehot.matmul(new.embed.clone()).reshape([1, seq, h]);
    Ok(base + added)
}

/// Additive masks `[n, NUM_TOKENS]` keeping, for each row, the number tokens of `classes[i]`.
fn class_mask<B: KernelBackend>(classes: &[Class], device: &B::Device) -> Tensor<B, 2> {
    let mut m = vec![f32::NEG_INFINITY; classes.len() * NUM_TOKENS];
    for (i, c) in classes.iter().enumerate() {
        for t in c.tokens() {
            m[i * NUM_TOKENS + t] = 0.0;
        }
    }
    Tensor::from_data(TensorData::new(m, [classes.len(), NUM_TOKENS]), device)
}

/// Summed negative log-likelihood of `row`'s labels (all number tokens) under the new tokens'
/// output rows, each over the tokens its grammar allows.
///
/// # Shapes
/// `x`: `[1, seq, hidden]`, the last layer's output (before the final norm).
pub fn number_nll<B: KernelBackend>(
    model: &Llama<B>,
    new: &NewTokens<B>,
    x: Tensor<B, 3>,
    row: &Row,
) -> Result<Tensor<B, 1>> {
    let vocab = model.config.vocab_size as u32;
    let device = x.device();
    let (mut positions, mut labels, mut classes) = (vec![], vec![], vec![]);
    for (p, l) in row.labels.iter().enumerate() {
        let Some(l) = *l else { continue };
        if l < vocab || (l - vocab) as usize >= NUM_TOKENS {
            return Err(Error::InvalidArgument(format!(
                "a regression row's label {l} is not a number token"
            )));
        }
        let k = (l - vocab) as usize;
        positions.push(p as i32);
        labels.push(k as i32);
        classes.push(Class::of(k));
    }
    let n = positions.len();
    let [_, seq, h] = x.dims();
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(positions, [n]), &device);
    let hidden = model.final_norm(x).reshape([seq, h]).select(0, idx); // [n, h]
    let logits = hidden.matmul(new.head.clone().transpose()) + class_mask::<B>(&classes, &device);
    let labels = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [n, 1]), &device);
    let picked = burn::tensor::activation::log_softmax(logits, 1).gather(1, labels);
    Ok(picked.sum().neg())
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
            return Err(Error::InvalidArgument(
                "the temperature of regression samples must be above 0".into(),
            ));
        }
        let list = [adapter];
        let adapters = Adapters {
            list: &list,
            train: false,
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
                    .map_err(|e| Error::InvalidArgument(format!("reading logits: {e:?}")))?;
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

/// A held-out evaluation: the adapter's median predictions and the two baselines, per metric.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOutReport {
    pub train_examples: usize,
    pub val_examples: usize,
    pub val_groups: usize,
    pub metrics: Vec<MetricReport>,
    /// Each held-out example's group, true values and predictions (with the adapter).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub predictions: Vec<HeldOutPrediction>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeldOutPrediction {
    pub group: Option<String>,
    pub truth: BTreeMap<String, f64>,
    pub predicted: Vec<Prediction>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricReport {
    pub metric: String,
    /// Spread of the held-out values: min, median, max, and decades (log10 max/min).
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub decades: f64,
    /// The model's median predictions scored, its samples' geometric means, and the
    /// geometric means with the exponent's expectation ([`Prediction::expected`]).
    pub model: Option<stats::Scores>,
    pub model_geomean: Option<stats::Scores>,
    pub model_expected: Option<stats::Scores>,
    pub length: stats::Scores,
    pub ridge: stats::Scores,
    /// Mean width of the model's 10–90 % interval, in decades.
    pub model_interval_decades: Option<f64>,
    /// Share of held-out values inside the model's 10–90 % interval.
    pub model_coverage: Option<f64>,
}

/// Score the baselines (fitted on `train`) and, when given, the model's predictions on `val`.
pub fn held_out_report(
    spec: &RegressionSpec,
    tok: &Tokenizer,
    train: &[Example],
    val: &[Example],
    predictions: Option<&[Vec<Prediction>]>,
) -> Result<HeldOutReport> {
    let ids = |e: &Example| tok.encode(&e.code, false);
    let train_ids: Vec<Vec<u32>> = train.iter().map(ids).collect::<Result<_>>()?;
    let val_ids: Vec<Vec<u32>> = val.iter().map(ids).collect::<Result<_>>()?;
    let mut metrics = Vec::new();
    for (m, name) in spec.metrics.iter().enumerate() {
        let pick = |set: &[Example], set_ids: &[Vec<u32>]| {
            let mut ys = vec![];
            let mut rows = vec![];
            for (i, e) in set.iter().enumerate() {
                if let Some(&y) = e.metrics.get(name).filter(|v| v.is_finite()) {
                    ys.push(y);
                    rows.push((i, e.code.chars().count(), set_ids[i].clone()));
                }
            }
            (ys, rows)
        };
        let (ty, trows) = pick(train, &train_ids);
        let (vy, vrows) = pick(val, &val_ids);
        if ty.is_empty() || vy.is_empty() {
            continue;
        }
        let length =
            stats::LengthBaseline::fit(&trows.iter().map(|r| r.1).collect::<Vec<_>>(), &ty);
        let ridge =
            stats::RidgeBaseline::fit(&trows.iter().map(|r| r.2.clone()).collect::<Vec<_>>(), &ty);
        let length_pred: Vec<f64> = vrows.iter().map(|r| length.predict(r.1)).collect();
        let ridge_pred: Vec<f64> = vrows.iter().map(|r| ridge.predict(&r.2)).collect();
        let (mut model, mut geomean, mut expected) = (None, None, None);
        let (mut width, mut coverage) = (None, None);
        if let Some(p) = predictions {
            let got: Vec<&Prediction> = vrows.iter().map(|r| &p[r.0][m]).collect();
            let score = |of: fn(&Prediction) -> f64| {
                let pred: Vec<f64> = got.iter().map(|&p| of(p)).collect();
                Some(stats::Scores::of(&pred, &vy))
            };
            model = score(|p| p.median);
            geomean = score(|p| p.geomean);
            expected = score(|p| p.expected);
            width = Some(
                got.iter()
                    .map(|p| stats::log10_floor(p.high) - stats::log10_floor(p.low))
                    .sum::<f64>()
                    / got.len() as f64,
            );
            coverage = Some(
                got.iter()
                    .zip(&vy)
                    .filter(|(p, y)| p.low <= **y && **y <= p.high)
                    .count() as f64
                    / got.len() as f64,
            );
        }
        let (min, max) = (stats::quantile(&vy, 0.0), stats::quantile(&vy, 1.0));
        metrics.push(MetricReport {
            metric: name.clone(),
            min,
            median: stats::quantile(&vy, 0.5),
            max,
            decades: stats::log10_floor(max) - stats::log10_floor(min),
            model,
            model_geomean: geomean,
            model_expected: expected,
            length: stats::Scores::of(&length_pred, &vy),
            ridge: stats::Scores::of(&ridge_pred, &vy),
            model_interval_decades: width,
            model_coverage: coverage,
        });
    }
    Ok(HeldOutReport {
        train_examples: train.len(),
        val_examples: val.len(),
        val_groups: {
            let mut g: Vec<_> = val.iter().map(|e| e.group.clone()).collect();
            g.sort();
            g.dedup();
            g.len()
        },
        metrics,
        predictions: predictions.map_or_else(Vec::new, |p| {
            val.iter()
                .zip(p)
                .map(|(e, p)| HeldOutPrediction {
                    group: e.group.clone(),
                    truth: e.metrics.clone(),
                    predicted: p.clone(),
                })
                .collect()
        }),
    })
}

/// Write examples as JSONL (what `codelsi measure` writes and `train --task regression` reads).
pub fn write_examples(path: &Path, examples: &[Example]) -> Result<()> {
    let mut text = String::new();
    for e in examples {
        let line = serde_json::to_string(e).map_err(|source| Error::Json {
            path: PathBuf::from(path),
            source,
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    crate::files::write_atomic(path, text.as_bytes())
}
