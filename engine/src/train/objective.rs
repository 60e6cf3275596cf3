//! What a training run minimises when it is more than next-token prediction over the base
//! vocabulary. The trainer knows no task: a task whose adapter adds tokens of its own (the
//! regression task's number tokens, `crate::regress::NumberObjective`) hands it an
//! [`Objective`], and the trainer asks it for a row's input embeddings and its loss.

use burn::tensor::Tensor;

use crate::adapter::NewTokens;
use crate::error::Result;
use crate::kernels::KernelBackend;
use crate::models::llama::Llama;
use crate::train::data::Row;

/// A training objective over the tokens an adapter adds.
pub trait Objective<B: KernelBackend>: Sync {
    /// `(embed, head)` rows of the added tokens, each `[n, hidden]` row-major: where a fresh
    /// adapter's rows start.
    fn new_token_rows(&self) -> (&[f32], &[f32]);

    /// A row's input embeddings `[1, seq, hidden]`; ids past the base vocabulary take `new`'s
    /// rows.
    fn embed(&self, model: &Llama<B>, new: &NewTokens<B>, tokens: &[u32]) -> Result<Tensor<B, 3>>;

    /// Summed negative log-likelihood of `row`'s labels from the last layer's output `x`
    /// (`[1, seq, hidden]`).
    fn loss(
        &self,
        model: &Llama<B>,
        new: &NewTokens<B>,
        x: Tensor<B, 3>,
        row: &Row,
    ) -> Result<Tensor<B, 1>>;
}
