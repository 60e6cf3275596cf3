//! The loss of a row: next-token negative log-likelihood over the response tokens, or an
//! objective's over the tokens an adapter adds; and the mean loss over validation rows.

use burn::backend::Autodiff;
use burn::tensor::{DType, ElementConversion, Tensor};

use super::data::Row;
use super::objective::Objective;
use crate::adapter::{Adapter, NewTokens};
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, Llama, Packed};

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
pub(super) fn row_nll_of<B: KernelBackend>(
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
pub(super) type Added<'b, B> = (&'b NewTokens<B>, &'b dyn Objective<B>);

/// The tokens `adapter` adds and the objective that trains them; `None` when it adds none.
pub(super) fn added<'b, B: KernelBackend>(
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
pub(super) fn embed_row<B: KernelBackend>(
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
pub(super) fn row_loss<B: KernelBackend>(
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

pub(super) fn packed(row: &Row) -> Packed<'_> {
    Packed {
        tokens: &row.tokens,
        positions: &row.positions,
        segments: &row.segments,
        parents: &row.parents,
    }
}

/// Summed negative log-likelihood of `row`'s labels under `logits` (`[seq, vocab]`).
pub(super) fn nll_of_logits<B: KernelBackend>(logits: Tensor<B, 2>, row: &Row) -> Tensor<B, 1> {
    B::nll(logits, &row.labels)
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
        train: None,
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
pub(super) fn mean_loss_of<B: KernelBackend>(
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
