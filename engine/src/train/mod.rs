//! LoRA instruction tuning: a frozen (quantised) base on `Autodiff<B>`, one trainable adapter
//! (optionally on top of frozen ones), burn's AdamW on the adapter's tensors, warmup then cosine
//! or linear decay, gradient clipping and accumulation, periodic evaluation, and checkpoints
//! that resume to the same loss curve.
//!
//! Each optimiser step takes `batch` packed rows; each row is its own forward and backward
//! (micro-batch of one row) and the gradients are summed, so memory is that of one row at any
//! batch size. The loss is the mean over the step's response tokens.
//!
//! Everything a step does is a function of the step number (the row order of an epoch is a
//! seeded shuffle; dropout is seeded per step), so a checkpoint needs only the adapter, the
//! optimiser's moments and the step.

pub mod data;
pub mod meta;
pub mod objective;

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::backend::Autodiff;
use burn::optim::{AdamWConfig, AdaptiveMomentumState, SimpleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::adapter::{Adapter, LoraConfig, NewTokens, safetensors_bytes};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::io::safetensors::SafetensorsWeights;
use crate::kernels::{KernelBackend, to_dtype, widen};
use crate::models::llama::{Adapters, Llama, Packed};
use data::Row;
use meta::{AdapterMeta, RunInfo};
use objective::Objective;

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

impl Decay {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "cosine" => Ok(Self::Cosine),
            "linear" => Ok(Self::Linear),
            "constant" => Ok(Self::Constant),
            _ => Err(Error::Setting(format!(
                "unknown schedule `{s}` (cosine, linear, constant)"
            ))),
        }
    }
}

/// Settings of a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lora: LoraConfig,
    /// Peak learning rate.
    pub lr: f64,
    pub epochs: usize,
    /// Stop after this many optimiser steps (before the epochs are done).
    pub max_steps: Option<usize>,
    /// Packed rows per optimiser step.
    pub batch: usize,
    /// Linear warmup, as a fraction of the steps.
    pub warmup_frac: f64,
    pub decay: Decay,
    pub weight_decay: f32,
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    pub seed: u64,
    /// Evaluate on the validation rows every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only on cancel and at the end).
    pub checkpoint_every: usize,
    /// Gradient checkpointing per decoder layer: keep only each layer's input during the
    /// forward and recompute the layer during the backward. Same gradients, a third more
    /// compute, activation memory of one layer instead of all of them.
    #[serde(default)]
    pub grad_checkpoint: bool,
    /// The activations' type during training.
    #[serde(default)]
    pub activations: Activations,
}

/// The type activations are kept in while training. Adapter weights, their gradients, the
/// optimiser, norms' statistics and the loss are f32 whatever this says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activations {
    /// f16 where the device supports it (wgpu: `shader-f16`), f32 otherwise.
    #[default]
    Auto,
    F32,
    F16,
}

impl Activations {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            _ => Err(Error::Setting(format!(
                "activations `{s}` is not one of auto, f16, f32"
            ))),
        }
    }
}

/// f16 gradients of activations underflow below 6e-8: the loss is scaled by this before the
/// backward and the adapter's (f32) gradients divided by it after (static loss scaling).
const F16_LOSS_SCALE: f64 = 1024.0;

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            lr: 2e-4,
            epochs: 3,
            max_steps: None,
            batch: 4,
            warmup_frac: 0.03,
            decay: Decay::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            seed: 42,
            eval_every: 0,
            checkpoint_every: 50,
            grad_checkpoint: false,
            activations: Activations::Auto,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::Setting(format!(
                "learning rate must be positive, not {}",
                self.lr
            )));
        }
        if self.epochs == 0 || self.batch == 0 || self.max_steps == Some(0) {
            return Err(Error::Setting(
                "epochs, batch and max-steps must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_frac) {
            return Err(Error::Setting(format!(
                "warmup must be a fraction in [0, 1), not {}",
                self.warmup_frac
            )));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = (self.warmup_frac * total as f64).ceil() as usize;
        if step < warmup {
            return self.lr * (step + 1) as f64 / warmup as f64;
        }
        let span = (total - warmup).max(1) as f64;
        let t = ((step - warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
            Decay::Linear => self.lr * (1.0 - t),
            Decay::Constant => self.lr,
        }
    }
}

/// What a training run reports as it goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        train_rows: usize,
        val_rows: usize,
        trainable_params: usize,
        resumed_at: usize,
        /// `f16` or `f32`.
        activations: &'static str,
    },
    Step {
        step: usize,
        total_steps: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens_per_second: f64,
        eta_seconds: f64,
        peak_bytes: Option<u64>,
    },
    Eval {
        step: usize,
        val_loss: f64,
    },
    Checkpoint {
        step: usize,
        path: PathBuf,
    },
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub total_steps: usize,
    pub cancelled: bool,
    /// `(step, training loss)` for every step, resumed runs included.
    pub losses: Vec<(usize, f64)>,
    /// `(step, validation loss)`.
    pub val_losses: Vec<(usize, f64)>,
    pub seconds: f64,
    pub tokens: usize,
    pub peak_bytes: Option<u64>,
}

/// The checkpoint's record of where training stands (`trainer_state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    config: TrainConfig,
    /// Fingerprint of the training rows, so a resume with other data is refused.
    data_hash: String,
    losses: Vec<(usize, f64)>,
    val_losses: Vec<(usize, f64)>,
    tokens: usize,
    /// AdamW's step count per adapter tensor that has moments (filled when saved).
    #[serde(default)]
    adam_times: Vec<usize>,
}

fn data_hash(rows: &[Row]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for r in rows {
        for (t, l) in r.tokens.iter().zip(&r.labels) {
            h.update(t.to_le_bytes());
            h.update(l.map_or(u32::MAX, |l| l).to_le_bytes());
        }
        h.update([0xFF; 4]);
    }
    format!("{:x}", h.finalize())
}

/// Where a run writes: the final adapter in `out`, checkpoints in `out/checkpoint`.
pub fn checkpoint_dir(out: &Path) -> PathBuf {
    out.join("checkpoint")
}

/// A training run's inputs.
pub struct TrainJob<'a, B: KernelBackend> {
    pub model: &'a Llama<Autodiff<B>>,
    /// Adapters trained before this one, applied frozen under it ("general → specialised").
    pub frozen: &'a [&'a Adapter<Autodiff<B>>],
    pub train: &'a [Row],
    pub val: &'a [Row],
    pub config: &'a TrainConfig,
    pub out: &'a Path,
    /// Name of the base model, written into the adapter's config.
    pub base_model: &'a str,
    /// What the caller knows of the run (its data, the device), recorded beside the adapter
    /// in `codelsi_adapter.json`.
    pub run: RunInfo,
    pub resume: bool,
    /// The objective of an adapter that adds tokens of its own (a task hands it over: the
    /// regression task's number tokens). `None`: next-token prediction over the base vocabulary.
    pub objective: Option<&'a dyn Objective<Autodiff<B>>>,
    /// Start from this adapter's weights instead of fresh ones: training an adapter further on
    /// new data. Its rank, alpha and targets must be `config.lora`'s; the added tokens' trained
    /// rows replace the objective's starting rows. The optimiser starts afresh.
    pub init: Option<&'a Path>,
}

struct Optim<B: Backend> {
    adamw: burn::optim::AdamW,
    /// Per tensor of the adapter, in `named_tensors` order.
    states: Vec<Option<burn::optim::AdamWState<B, 2>>>,
}

/// Train. Events go to `on_event` (the CLI shows a progress bar, the app a plot); `cancel`
/// stops after the current row, writing a checkpoint first.
pub fn train<B: KernelBackend>(
    job: TrainJob<'_, B>,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary> {
    let c = job.config;
    c.validate()?;
    if job.train.is_empty() {
        return Err(Error::InvalidArgument("no training rows".into()));
    }
    let device = job.model.device().clone();
    let steps_per_epoch = job.train.len().div_ceil(c.batch);
    let total = (steps_per_epoch * c.epochs).min(c.max_steps.unwrap_or(usize::MAX));
    let hash = data_hash(job.train);
    let ckpt = checkpoint_dir(job.out);

    let mut adapter: Adapter<B>;
    let mut optim = Optim::<B> {
        adamw: AdamWConfig::new()
            .with_weight_decay(c.weight_decay)
            .with_epsilon(1e-8)
            .build(),
        states: vec![],
    };
    let mut state = TrainerState {
        step: 0,
        config: c.clone(),
        data_hash: hash.clone(),
        losses: vec![],
        val_losses: vec![],
        tokens: 0,
        adam_times: vec![],
    };
    if job.resume {
        let (a, s, st) = load_checkpoint::<B>(&ckpt, &job.model.config, &device)?;
        if st.data_hash != hash {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "the checkpoint was trained on other data (or another max length, template \
                 or packing); resume with the same data and settings"
                    .into(),
            });
        }
        if st.config.lora != c.lora || st.config.seed != c.seed || st.config.batch != c.batch {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "the checkpoint used other LoRA, seed or batch settings".into(),
            });
        }
        if a.new_tokens.is_some() != job.objective.is_some() {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "the checkpoint is of another kind of adapter (regression or not)".into(),
            });
        }
        adapter = a;
        optim.states = s;
        state = st;
        state.config = c.clone();
    } else {
        if ckpt.join("trainer_state.json").exists() {
            return Err(Error::Checkpoint {
                path: ckpt.to_path_buf(),
                what: "holds a checkpoint of an earlier run; pass --resume to continue it, or \
                 choose another --out"
                    .into(),
            });
        }
        adapter = match job.init {
            Some(dir) => start_from(dir, &job, &device)?,
            None => {
                let mut a = Adapter::<B>::init(c.lora.clone(), &job.model.config, c.seed, &device)?;
                if let Some(objective) = job.objective {
                    let (embed, head) = objective.new_token_rows();
                    a.new_tokens = Some(NewTokens::from_host(
                        embed.to_vec(),
                        head.to_vec(),
                        job.model.config.hidden_size,
                        &device,
                    )?);
                }
                a
            }
        };
        optim.states = vec![None; adapter.named_tensors().len()];
    }
    std::fs::create_dir_all(job.out).map_err(|e| Error::io(job.out, e))?;

    let supports_f16 = <Autodiff<B> as KernelBackend>::supports_f16(&device);
    let dtype = match c.activations {
        Activations::F32 => DType::F32,
        Activations::Auto if supports_f16 => DType::F16,
        Activations::Auto => DType::F32,
        Activations::F16 if supports_f16 => DType::F16,
        Activations::F16 => {
            return Err(Error::Setting(
                "f16 activations need a GPU adapter with shader-f16; this one has none \
                 (use f32 or auto)"
                    .into(),
            ));
        }
    };
    on_event(TrainEvent::Started {
        total_steps: total,
        train_rows: job.train.len(),
        val_rows: job.val.len(),
        trainable_params: adapter.num_params(),
        resumed_at: state.step,
        activations: if dtype == DType::F16 { "f16" } else { "f32" },
    });

    // The held-out loss before training (the adapter starts equal to the base: B = 0).
    if state.step == 0 && c.eval_every > 0 {
        eval_and_report(&job, &adapter, &mut state, cancel, on_event)?;
    }
    let start = Instant::now();
    let tokens_at_start = state.tokens;
    let resumed_at = state.step;
    let mut peak = B::memory_reserved(&device);
    let mut cancelled = false;
    while state.step < total {
        let step = state.step;
        let epoch = step / steps_per_epoch;
        let mut order: Vec<usize> = (0..job.train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            c.seed ^ ((epoch as u64 + 1) * 0x9E37),
        ));
        let within = step % steps_per_epoch;
        let rows: Vec<&Row> = order[within * c.batch..((within + 1) * c.batch).min(order.len())]
            .iter()
            .map(|&i| &job.train[i])
            .collect();
        match train_step(&job, &adapter, &rows, step, dtype, cancel)? {
            None => {
                cancelled = true;
                break;
            }
            Some((loss, grads)) => {
                peak = max_opt(peak, B::memory_reserved(&device));
                let lr = c.lr_at(step, total);
                let grad_norm = apply_step(&mut adapter, &mut optim, grads, lr, c.max_grad_norm)?;
                let tokens: usize = rows.iter().map(|r| r.tokens.len()).sum();
                state.tokens += tokens;
                state.step += 1;
                state.losses.push((step + 1, loss));
                let elapsed = start.elapsed().as_secs_f64();
                let steps_here = (state.step - resumed_at).max(1);
                let rate = (state.tokens - tokens_at_start) as f64 / elapsed.max(1e-9);
                let eta = (total - state.step) as f64 * elapsed / steps_here as f64;
                on_event(TrainEvent::Step {
                    step: state.step,
                    total_steps: total,
                    epoch,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_second: rate,
                    eta_seconds: eta,
                    peak_bytes: peak,
                });
            }
        }
        let last = state.step == total;
        if c.eval_every > 0 && state.step.is_multiple_of(c.eval_every) && !last {
            eval_and_report(&job, &adapter, &mut state, cancel, on_event)?;
        }
        if c.checkpoint_every > 0 && state.step.is_multiple_of(c.checkpoint_every) && !last {
            save_checkpoint(&ckpt, &adapter, &optim, &state, job.base_model)?;
            on_event(TrainEvent::Checkpoint {
                step: state.step,
                path: ckpt.clone(),
            });
        }
        if cancel.is_cancelled() {
            cancelled = true;
            break;
        }
    }

    if !cancelled {
        eval_and_report(&job, &adapter, &mut state, cancel, on_event)?;
    }
    save_checkpoint(&ckpt, &adapter, &optim, &state, job.base_model)?;
    on_event(TrainEvent::Checkpoint {
        step: state.step,
        path: ckpt.clone(),
    });
    let summary = TrainSummary {
        steps: state.step,
        total_steps: total,
        cancelled,
        losses: state.losses.clone(),
        val_losses: state.val_losses.clone(),
        seconds: start.elapsed().as_secs_f64(),
        tokens: state.tokens,
        peak_bytes: peak,
    };
    if !cancelled {
        let meta = AdapterMeta {
            codelsi: env!("CARGO_PKG_VERSION").into(),
            base_model: job.base_model.into(),
            train: Some(c.clone()),
            steps: state.step,
            final_loss: state.losses.last().map(|l| l.1),
            val_loss: state.val_losses.last().map(|l| l.1),
            losses: state.losses.clone(),
            val_losses: state.val_losses.clone(),
            extra: job.run.clone(),
        };
        let meta = meta.to_json(job.out)?;
        adapter.write_peft_files(job.out, job.base_model, &[(AdapterMeta::FILE, meta)])?;
    }
    Ok(summary)
}

/// The validation loss now (when there is validation data), recorded and reported.
fn eval_and_report<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    adapter: &Adapter<B>,
    state: &mut TrainerState,
    cancel: &CancelToken,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<()> {
    if job.val.is_empty() {
        return Ok(());
    }
    if let Some(v) = evaluate(
        job.model,
        job.frozen,
        adapter,
        job.objective,
        job.val,
        cancel,
    )? {
        state.val_losses.push((state.step, v));
        on_event(TrainEvent::Eval {
            step: state.step,
            val_loss: v,
        });
    }
    Ok(())
}

fn max_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Summed negative log-likelihood of a row's labelled positions, and their count.
pub fn row_nll<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    row: &Row,
) -> Result<(Tensor<B, 1>, usize)> {
    let logits = model.forward_packed(packed(row), adapters)?;
    Ok((nll_of_logits(logits, row), row.targets()))
}

/// [`row_nll`] where `owner` (one of `adapters`) may add tokens of its own, which then take
/// the loss through `objective`.
fn row_nll_of<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    owner: Option<&Adapter<B>>,
    objective: Option<&dyn Objective<B>>,
    row: &Row,
) -> Result<(Tensor<B, 1>, usize)> {
    let Some(owner) = owner.filter(|a| a.new_tokens.is_some()) else {
        return row_nll(model, adapters, row);
    };
    let inputs = model.packed_inputs(packed(row), DType::F32)?;
    let mut x = embed_row(model, owner, objective, &row.tokens)?;
    for i in 0..model.layers.len() {
        x = model.layer_packed(i, x, &inputs, adapters);
    }
    Ok((row_loss(model, owner, objective, x, row)?, row.targets()))
}

/// Tokens an adapter adds, and the objective that trains them.
type Added<'b, B> = (&'b NewTokens<B>, &'b dyn Objective<B>);

/// The tokens `adapter` adds and the objective that trains them; `None` when it adds none.
fn added<'b, B: KernelBackend>(
    adapter: &'b Adapter<B>,
    objective: Option<&'b dyn Objective<B>>,
) -> Result<Option<Added<'b, B>>> {
    match (&adapter.new_tokens, objective) {
        (None, _) => Ok(None),
        (Some(new), Some(objective)) => Ok(Some((new, objective))),
        (Some(_), None) => Err(Error::InvalidArgument(
            "the adapter adds tokens of its own, and this run has no objective for them \
             (a regression adapter trains with --task regression)"
                .into(),
        )),
    }
}

/// A row's input embeddings: the base table's, and `adapter`'s rows for tokens it adds.
fn embed_row<B: KernelBackend>(
    model: &Llama<B>,
    adapter: &Adapter<B>,
    objective: Option<&dyn Objective<B>>,
    tokens: &[u32],
) -> Result<Tensor<B, 3>> {
    match added(adapter, objective)? {
        None => model.embed(tokens),
        Some((new, objective)) => objective.embed(model, new, tokens),
    }
}

/// Summed negative log-likelihood of a row's labels from the last layer's output `x`: the LM
/// head's, or the objective's over `adapter`'s new tokens when it adds some.
fn row_loss<B: KernelBackend>(
    model: &Llama<B>,
    adapter: &Adapter<B>,
    objective: Option<&dyn Objective<B>>,
    x: Tensor<B, 3>,
    row: &Row,
) -> Result<Tensor<B, 1>> {
    match added(adapter, objective)? {
        None => Ok(nll_of_logits(model.head(x), row)),
        Some((new, objective)) => objective.loss(model, new, x, row),
    }
}

fn packed(row: &Row) -> Packed<'_> {
    Packed {
        tokens: &row.tokens,
        positions: &row.positions,
        segments: &row.segments,
        parents: &row.parents,
    }
}

/// Summed negative log-likelihood of `row`'s labels under `logits` (`[seq, vocab]`).
fn nll_of_logits<B: KernelBackend>(logits: Tensor<B, 2>, row: &Row) -> Tensor<B, 1> {
    let device = logits.device();
    let seq = row.tokens.len();
    let labels: Vec<i32> = row
        .labels
        .iter()
        .map(|l| l.map_or(0, |l| l as i32))
        .collect();
    let weights: Vec<f32> = row
        .labels
        .iter()
        .map(|l| if l.is_some() { 1.0 } else { 0.0 })
        .collect();
    let idx = Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [seq, 1]), &device);
    let w = Tensor::<B, 2>::from_data(TensorData::new(weights, [seq, 1]), &device);
    let picked = log_softmax(logits, 1).gather(1, idx);
    (picked * w).sum().neg()
}

/// The dropout seed of `layer` in row `row` of step `step`. Each layer reseeds, so a layer
/// recomputed for gradient checkpointing draws the masks of its first pass, and a run gives the
/// same gradients with checkpointing or without.
fn layer_seed(seed: u64, step: usize, row: usize, layer: usize) -> u64 {
    let s = seed
        .wrapping_add(step as u64 * 7919)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    s ^ ((row as u64) << 32 | layer as u64)
}

/// What the passes over one row share.
struct RowPass<'a> {
    /// Labelled tokens in the whole step (the loss is their mean).
    targets: usize,
    /// The activations' type.
    dtype: DType,
    /// Reseeds dropout for a layer.
    reseed: &'a dyn Fn(usize),
}

impl RowPass<'_> {
    fn loss_scale(&self) -> f64 {
        if self.dtype == DType::F16 {
            F16_LOSS_SCALE
        } else {
            1.0
        }
    }

    /// `t`'s gradient, unscaled; zeros when the graph did not reach it.
    fn grad_of<B: KernelBackend>(
        &self,
        t: &Tensor<Autodiff<B>, 2>,
        grads: &<Autodiff<B> as burn::tensor::backend::AutodiffBackend>::Gradients,
    ) -> Tensor<B, 2> {
        match t.grad(grads) {
            Some(g) if self.dtype == DType::F16 => g / F16_LOSS_SCALE,
            Some(g) => g,
            None => t.clone().inner().zeros_like(),
        }
    }
}

/// One row's loss and gradients on the whole graph at once (activations of every layer kept).
fn row_grads_full<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    tracked: &Adapter<Autodiff<B>>,
    row: &Row,
    pass: &RowPass<'_>,
) -> Result<(f64, Vec<Tensor<B, 2>>)> {
    let model = job.model;
    let mut list: Vec<&Adapter<Autodiff<B>>> = vec![tracked];
    list.extend(job.frozen.iter().copied());
    let adapters = Adapters {
        list: &list,
        train: true,
    };
    let inputs = model.packed_inputs(packed(row), pass.dtype)?;
    let mut x = to_dtype(
        embed_row(model, tracked, job.objective, &row.tokens)?,
        pass.dtype,
    );
    for i in 0..model.layers.len() {
        (pass.reseed)(i);
        x = model.layer_packed(i, x, &inputs, adapters);
    }
    let loss = row_loss(model, tracked, job.objective, widen(x), row)? / pass.targets as f64;
    let value: f64 = loss.clone().inner().into_scalar().elem();
    crate::device::check_device(|| format!("training on a row of {} tokens", row.tokens.len()))?;
    let grads = (loss * pass.loss_scale()).backward();
    let g = tracked
        .named_tensors()
        .iter()
        .map(|(_, t)| pass.grad_of(t, &grads))
        .collect();
    Ok((value, g))
}

/// One row's loss and gradients with gradient checkpointing per layer: a forward without a
/// graph keeps each layer's input; the head's backward gives the gradient of the last hidden
/// state; then each layer, last first, is run again on its saved input with a graph of its own
/// and its backward (seeded by the gradient of its output) gives its adapter gradients and the
/// gradient of its input. Only one layer's activations are alive at a time.
fn row_grads_checkpointed<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    tracked: &Adapter<Autodiff<B>>,
    row: &Row,
    pass: &RowPass<'_>,
) -> Result<(f64, Vec<Tensor<B, 2>>)> {
    type Ad<B> = Autodiff<B>;
    let model = job.model;
    // The same adapter, untracked: the first pass records no graph.
    let plain = tracked.map(|t| Tensor::<Ad<B>, 2>::from_inner(t.clone().inner()));
    let mut plain_list: Vec<&Adapter<Ad<B>>> = vec![&plain];
    plain_list.extend(job.frozen.iter().copied());
    let mut tracked_list: Vec<&Adapter<Ad<B>>> = vec![tracked];
    tracked_list.extend(job.frozen.iter().copied());
    let adapters = |list| Adapters { list, train: true };

    let inputs = model.packed_inputs(packed(row), pass.dtype)?;
    let layers = model.layers.len();
    let mut saved: Vec<Tensor<B, 3>> = Vec::with_capacity(layers);
    let mut x = to_dtype(model.embed(&row.tokens)?, pass.dtype);
    for i in 0..layers {
        (pass.reseed)(i);
        saved.push(x.clone().inner());
        x = model.layer_packed(i, x, &inputs, adapters(&plain_list));
    }
    let last = Tensor::<Ad<B>, 3>::from_inner(x.inner()).require_grad();
    let loss = nll_of_logits(model.head(widen(last.clone())), row) / pass.targets as f64;
    let value: f64 = loss.clone().inner().into_scalar().elem();
    crate::device::check_device(|| format!("training on a row of {} tokens", row.tokens.len()))?;
    let grads = (loss * pass.loss_scale()).backward();
    let mut upstream = last
        .grad(&grads)
        .ok_or_else(|| Error::Internal("no gradient reached the last layer".into()))?;

    let mut per_layer: Vec<Vec<Tensor<B, 2>>> = vec![Vec::new(); layers];
    for i in (0..layers).rev() {
        (pass.reseed)(i);
        let input = Tensor::<Ad<B>, 3>::from_inner(saved[i].clone()).require_grad();
        let out = model.layer_packed(i, input.clone(), &inputs, adapters(&tracked_list));
        let grads = (out * Tensor::<Ad<B>, 3>::from_inner(upstream.clone()))
            .sum()
            .backward();
        per_layer[i] = tracked.layers[i]
            .iter()
            .flatten()
            .flat_map(|p| [&p.a, &p.b])
            .map(|t| pass.grad_of(t, &grads))
            .collect();
        if i > 0 {
            upstream = input
                .grad(&grads)
                .ok_or_else(|| Error::Internal(format!("no gradient reached layer {i}'s input")))?;
        }
    }
    // `named_tensors` order: layer by layer, each layer's slots in order.
    Ok((value, per_layer.into_iter().flatten().collect()))
}

/// One optimiser step's forward and backward passes: the mean loss and the summed gradients,
/// or `None` when cancelled.
#[allow(
    clippy::type_complexity,
    reason = "the step's loss and gradients, named in the doc line; a struct would be used once"
)]
fn train_step<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    adapter: &Adapter<B>,
    rows: &[&Row],
    step: usize,
    dtype: DType,
    cancel: &CancelToken,
) -> Result<Option<(f64, Vec<Tensor<B, 2>>)>> {
    let c = &job.config;
    let device = job.model.device().clone();
    let targets: usize = rows.iter().map(|r| r.targets()).sum::<usize>().max(1);
    let tracked = adapter.map(|t| Tensor::<Autodiff<B>, 2>::from_inner(t.clone()).require_grad());
    let mut sum: Option<Vec<Tensor<B, 2>>> = None;
    let mut loss_total = 0.0;
    for (r, row) in rows.iter().enumerate() {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let reseed = |layer: usize| {
            <Autodiff<B> as Backend>::seed(&device, layer_seed(c.seed, step, r, layer));
        };
        let pass = RowPass {
            targets,
            dtype,
            reseed: &reseed,
        };
        // An adapter's new tokens get their gradients from the embedding and the head, which
        // the per-layer recomputation does not walk: such adapters (regression, short rows)
        // take the whole graph at once.
        let (value, g) = if c.grad_checkpoint && adapter.new_tokens.is_none() {
            row_grads_checkpointed(job, &tracked, row, &pass)?
        } else {
            row_grads_full(job, &tracked, row, &pass)?
        };
        loss_total += value;
        sum = Some(match sum {
            None => g,
            Some(s) => s.into_iter().zip(g).map(|(a, b)| a + b).collect(),
        });
    }
    Ok(sum.map(|g| (loss_total, g)))
}

/// Clip, then AdamW on every tensor. Returns the gradient norm before clipping.
fn apply_step<B: KernelBackend>(
    adapter: &mut Adapter<B>,
    optim: &mut Optim<B>,
    grads: Vec<Tensor<B, 2>>,
    lr: f64,
    max_norm: f32,
) -> Result<f64> {
    let sq: Vec<Tensor<B, 1>> = grads
        .iter()
        .map(|g| g.clone().powi_scalar(2).sum())
        .collect();
    let norm: f64 = {
        let v: f32 = Tensor::cat(sq, 0).sum().into_scalar().elem();
        (v as f64).sqrt()
    };
    if !norm.is_finite() {
        return Err(Error::Diverged { norm });
    }
    let clip = if max_norm > 0.0 && norm > max_norm as f64 {
        max_norm as f64 / (norm + 1e-6)
    } else {
        1.0
    };
    for ((t, g), state) in adapter
        .tensors_mut()
        .into_iter()
        .zip(grads)
        .zip(optim.states.iter_mut())
    {
        let (new, s) = optim.adamw.step(lr, t.clone(), g * clip, state.take());
        *t = new;
        *state = s;
    }
    Ok(norm)
}

/// Mean loss over the validation rows (no gradients); `None` when cancelled.
pub fn evaluate<B: KernelBackend>(
    model: &Llama<Autodiff<B>>,
    frozen: &[&Adapter<Autodiff<B>>],
    adapter: &Adapter<B>,
    objective: Option<&dyn Objective<Autodiff<B>>>,
    rows: &[Row],
    cancel: &CancelToken,
) -> Result<Option<f64>> {
    let untracked = adapter.map(|t| Tensor::<Autodiff<B>, 2>::from_inner(t.clone()));
    let mut list: Vec<&Adapter<Autodiff<B>>> = vec![&untracked];
    list.extend(frozen.iter().copied());
    let adapters = Adapters {
        list: &list,
        train: false,
    };
    mean_loss_of(model, adapters, Some(&untracked), objective, rows, cancel)
}

/// Mean per-token loss of `rows` under `adapters` (none: the base model).
pub fn mean_loss<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    rows: &[Row],
    cancel: &CancelToken,
) -> Result<Option<f64>> {
    mean_loss_of(model, adapters, None, None, rows, cancel)
}

/// [`mean_loss`] where `owner` (one of `adapters`) may add tokens of its own (see
/// [`row_nll_of`]).
fn mean_loss_of<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    owner: Option<&Adapter<B>>,
    objective: Option<&dyn Objective<B>>,
    rows: &[Row],
    cancel: &CancelToken,
) -> Result<Option<f64>> {
    let mut total = 0.0;
    let mut n = 0;
    for row in rows {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let (nll, count) = row_nll_of(model, adapters, owner, objective, row)?;
        let v: f32 = nll.into_scalar().elem();
        total += v as f64;
        n += count;
    }
    Ok(Some(total / n.max(1) as f64))
}

/// The adapter in `dir` as the starting point of `job`, refused when its shape is not the
/// one `job` trains (another rank, alpha or targets, or number tokens where none are wanted).
fn start_from<B: KernelBackend>(
    dir: &Path,
    job: &TrainJob<'_, B>,
    device: &B::Device,
) -> Result<Adapter<B>> {
    let want = &job.config.lora;
    let mut a = Adapter::<B>::load_peft(dir, &job.model.config, device)?;
    let same_targets = {
        let (mut x, mut y) = (a.config.targets.clone(), want.targets.clone());
        x.sort();
        y.sort();
        x == y
    };
    if a.config.rank != want.rank
        || a.config.alpha != want.alpha
        || a.config.rslora != want.rslora
        || !same_targets
    {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            what: format!(
                "the adapter to start from has rank {}, alpha {} on {} projection(s); this run \
                 trains rank {}, alpha {} on {} (pass the same --rank, --alpha and --targets)",
                a.config.rank,
                a.config.alpha,
                a.config.targets.len(),
                want.rank,
                want.alpha,
                want.targets.len()
            ),
        });
    }
    match (&a.new_tokens, job.objective) {
        (None, None) => {}
        (Some(have), Some(objective)) => {
            let rows = objective.new_token_rows().0.len() / job.model.config.hidden_size;
            let have = have.embed.dims()[0];
            if have != rows {
                return Err(Error::Checkpoint {
                    path: dir.to_path_buf(),
                    what: format!("the adapter adds {have} tokens, this run {rows}"),
                });
            }
        }
        _ => {
            return Err(Error::Checkpoint {
                path: dir.to_path_buf(),
                what: "the adapter to start from is of another kind (regression or not)".into(),
            });
        }
    }
    a.config.dropout = want.dropout;
    Ok(a)
}

fn save_checkpoint<B: KernelBackend>(
    dir: &Path,
    adapter: &Adapter<B>,
    optim: &Optim<B>,
    state: &TrainerState,
    base_model: &str,
) -> Result<()> {
    let names = adapter.named_tensors();
    let mut moments: Vec<(String, Tensor<B, 2>)> = Vec::new();
    let mut times = Vec::new();
    for ((name, _), s) in names.iter().zip(&optim.states) {
        if let Some(s) = s {
            moments.push((format!("{name}.m1"), s.momentum.moment_1.clone()));
            moments.push((format!("{name}.m2"), s.momentum.moment_2.clone()));
            times.push(s.momentum.time);
        }
    }
    let refs: Vec<(String, &Tensor<B, 2>)> = moments.iter().map(|(n, t)| (n.clone(), t)).collect();
    let optim_bytes = safetensors_bytes(&refs)?;
    let st = TrainerState {
        adam_times: times,
        ..state.clone()
    };
    let state_bytes = serde_json::to_vec_pretty(&st).map_err(|e| Error::Json {
        path: dir.join("trainer_state.json"),
        source: e,
    })?;
    adapter.save_peft(
        dir,
        base_model,
        &[
            ("optimizer.safetensors", optim_bytes),
            ("trainer_state.json", state_bytes),
        ],
    )
}

#[allow(
    clippy::type_complexity,
    reason = "the checkpoint's three parts, taken apart by its one caller"
)]
fn load_checkpoint<B: KernelBackend>(
    dir: &Path,
    model: &crate::models::config::Config,
    device: &B::Device,
) -> Result<(
    Adapter<B>,
    Vec<Option<burn::optim::AdamWState<B, 2>>>,
    TrainerState,
)> {
    let state_path = dir.join("trainer_state.json");
    if !state_path.exists() {
        return Err(Error::Checkpoint {
            path: state_path,
            what: "nothing to resume: it does not exist".into(),
        });
    }
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: state_path.clone(),
        source,
    })?;
    let adapter = Adapter::<B>::load_peft(dir, model, device)?;
    let optim_path = dir.join("optimizer.safetensors");
    let st = SafetensorsWeights::open_file(&optim_path)?;
    let mut states = Vec::new();
    let mut t = state.adam_times.clone().into_iter();
    for (name, tensor) in adapter.named_tensors() {
        let shape: [usize; 2] = tensor.dims();
        let get = |suffix: &str| -> Result<Option<Tensor<B, 2>>> {
            Ok(st
                .get(&format!("{name}.{suffix}"))?
                .map(|h| Tensor::from_data(TensorData::new(h.into_f32(), shape), device)))
        };
        let s = match (get("m1")?, get("m2")?) {
            (Some(m1), Some(m2)) => Some(burn::optim::AdamWState {
                momentum: AdaptiveMomentumState {
                    time: t.next().ok_or_else(|| Error::Malformed {
                        path: state_path.clone(),
                        what: "fewer optimiser step counts than moments".into(),
                    })?,
                    moment_1: m1,
                    moment_2: m2,
                    max_moment_2: None,
                },
            }),
            _ => None,
        };
        states.push(s);
    }
    Ok((adapter, states, state))
}
