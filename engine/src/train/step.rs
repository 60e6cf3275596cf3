//! One optimiser step: each row's forward and backward (the whole graph, or layer by layer with
//! gradient checkpointing), the gradients summed over the step's rows, clipped, and AdamW.

use burn::backend::Autodiff;
use burn::optim::SimpleOptimizer;
use burn::tensor::{DType, ElementConversion, Tensor};

use super::data::Row;
use super::loss::{embed_row, nll_of_logits, packed, row_loss};
use super::{Optim, TrainJob};
use crate::adapter::Adapter;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::kernels::cpu::mix64;
use crate::kernels::{KernelBackend, to_dtype, widen};
use crate::models::llama::Adapters;

/// f16 gradients of activations underflow below 6e-8: the loss is scaled by this before the
/// backward and the adapter's (f32) gradients divided by it after (static loss scaling).
pub(super) const F16_LOSS_SCALE: f64 = 1024.0;

/// The dropout seed of row `row` of step `step`: each projection of each layer draws its mask
/// from it ([`Adapters::train`]), so a layer recomputed for gradient checkpointing draws the
/// masks of its first pass, and a run gives the same gradients with checkpointing or without.
pub(super) fn row_seed(seed: u64, step: usize, row: usize) -> u64 {
    mix64(mix64(mix64(seed) ^ step as u64) ^ row as u64)
}

/// What the passes over one row share.
pub(super) struct RowPass {
    /// Labelled tokens in the whole step (the loss is their mean).
    targets: usize,
    /// The activations' type.
    dtype: DType,
    /// Dropout's seed for this row.
    seed: u64,
}

impl RowPass {
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
pub(super) fn row_grads_full<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    tracked: &Adapter<Autodiff<B>>,
    row: &Row,
    pass: &RowPass,
) -> Result<(f64, Vec<Tensor<B, 2>>)> {
    let model = job.model;
    let mut list: Vec<&Adapter<Autodiff<B>>> = vec![tracked];
    list.extend(job.frozen.iter().copied());
    let adapters = Adapters {
        list: &list,
        train: Some(pass.seed),
    };
    let inputs = model.packed_inputs(packed(row), pass.dtype)?;
    let mut x = to_dtype(
        embed_row(model, tracked, job.objective, &row.tokens)?,
        pass.dtype,
    );
    for i in 0..model.layers.len() {
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
pub(super) fn row_grads_checkpointed<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    tracked: &Adapter<Autodiff<B>>,
    row: &Row,
    pass: &RowPass,
) -> Result<(f64, Vec<Tensor<B, 2>>)> {
    type Ad<B> = Autodiff<B>;
    let model = job.model;
    // The same adapter, untracked: the first pass records no graph.
    let plain = tracked.map(|t| Tensor::<Ad<B>, 2>::from_inner(t.clone().inner()));
    let mut plain_list: Vec<&Adapter<Ad<B>>> = vec![&plain];
    plain_list.extend(job.frozen.iter().copied());
    let mut tracked_list: Vec<&Adapter<Ad<B>>> = vec![tracked];
    tracked_list.extend(job.frozen.iter().copied());
    let adapters = |list| Adapters {
        list,
        train: Some(pass.seed),
    };

    let inputs = model.packed_inputs(packed(row), pass.dtype)?;
    let layers = model.layers.len();
    let mut saved: Vec<Tensor<B, 3>> = Vec::with_capacity(layers);
    let mut x = to_dtype(model.embed(&row.tokens)?, pass.dtype);
    for i in 0..layers {
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

/// The rows of a step that one replica trains on.
pub(super) struct Share<'r> {
    pub step: usize,
    pub rows: &'r [&'r Row],
    /// Index of `rows[0]` among the step's rows: a row's dropout seed is its index in the step,
    /// so a row draws the same masks whichever replica trains it.
    pub first: usize,
    /// Labelled tokens in the whole step, every replica's rows (the loss is their mean).
    pub targets: usize,
}

/// A share's part of the mean loss and its gradients summed over its rows, or `None` when
/// cancelled.
pub(super) type ShareResult<B> = Result<Option<(f64, Vec<Tensor<B, 2>>)>>;

/// The forward and backward passes of a share of an optimiser step (zeros for a share without
/// rows).
pub(super) fn train_step<B: KernelBackend>(
    job: &TrainJob<'_, B>,
    adapter: &Adapter<B>,
    share: &Share<'_>,
    dtype: DType,
    cancel: &CancelToken,
) -> ShareResult<B> {
    let c = &job.config;
    let tracked = adapter.map(|t| Tensor::<Autodiff<B>, 2>::from_inner(t.clone()).require_grad());
    let mut sum: Vec<Tensor<B, 2>> = adapter
        .named_tensors()
        .iter()
        .map(|(_, t)| t.zeros_like())
        .collect();
    let mut loss_total = 0.0;
    for (r, row) in share.rows.iter().enumerate() {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let pass = RowPass {
            targets: share.targets,
            dtype,
            seed: row_seed(c.seed, share.step, share.first + r),
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
        sum = if r == 0 {
            g
        } else {
            sum.into_iter().zip(g).map(|(a, b)| a + b).collect()
        };
    }
    Ok(Some((loss_total, sum)))
}

/// Clip, then AdamW on every tensor. Returns the gradient norm before clipping.
pub(super) fn apply_step<B: KernelBackend>(
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
