//! The regression objective: the number tokens' starting rows, their embedding, and the loss
//! over the tokens the number grammar allows.

use burn::tensor::{Int, Tensor, TensorData};

use super::number::{self, Class, NUM_TOKENS};
use crate::adapter::NewTokens;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::llama::Llama;
use crate::train::data::Row;
use crate::train::objective::Objective;

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
                return Err(Error::Internal(format!(
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
            return Err(Error::Internal(format!(
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
