//! Domain fit on an imported repository: on its validation split, the per-token loss (and
//! perplexity) of the reference outputs, and how close greedy generations come to them
//! (exact match after whitespace, and character edit similarity).

use serde::{Deserialize, Serialize};

use crate::cancel::CancelToken;
use crate::error::Result;
use crate::generate::{GenerateOptions, generate_with};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, Llama};
use crate::sampling::SamplingParams;
use crate::train::data::{self, PromptTemplate, Record};
use crate::train::mean_loss;

/// What [`domain_fit`] measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    pub records: usize,
    /// Mean loss per output token, and its exponential.
    pub loss: f64,
    pub perplexity: f64,
    /// Records whose output was generated and compared.
    pub generated: usize,
    pub exact_match: f64,
    pub edit_similarity: f64,
}

/// Progress of [`domain_fit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitEvent {
    Loss,
    Generated { done: usize, total: usize },
}

/// Levenshtein distance over chars, two rows of memory.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// 1 − distance / longer length (1 for two empty strings).
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let n = a.chars().count().max(b.chars().count());
    if n == 0 {
        return 1.0;
    }
    1.0 - edit_distance(a, b) as f64 / n as f64
}

fn reference(rec: &Record) -> String {
    rec.messages()
        .iter()
        .rev()
        .find(|m| m.role == "assistant")
        .map(|m| m.content.clone())
        .unwrap_or_default()
}

/// Measure `model` with `adapters` on `records`: loss over all of them, generations for the
/// first `generate` of them (greedy, at most `max_tokens` each). `None` when cancelled.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site per front end; a struct would only rename these"
)]
pub fn domain_fit<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    tokenizer: &Tokenizer,
    records: &[Record],
    template: PromptTemplate,
    max_len: usize,
    generate: usize,
    max_tokens: usize,
    cancel: &CancelToken,
    progress: &mut dyn FnMut(FitEvent),
) -> Result<Option<FitReport>> {
    let ctx = model.config.max_position_embeddings;
    let max_len = max_len.min(ctx);
    let mut examples = Vec::new();
    for r in records {
        if let Some(e) = data::tokenize(r, tokenizer, template, max_len)? {
            examples.push((r, e));
        }
    }
    let only: Vec<data::Example> = examples.iter().map(|(_, e)| e.clone()).collect();
    let rows = data::pack(&only, max_len, false);
    progress(FitEvent::Loss);
    let Some(loss) = mean_loss(model, adapters, &rows, cancel)? else {
        return Ok(None);
    };
    let total = generate.min(examples.len());
    let (mut exact, mut sim, mut compared) = (0usize, 0.0f64, 0usize);
    for (i, (rec, ex)) in examples.iter().take(total).enumerate() {
        // The prompt is everything before the first trained token, as training saw it.
        let first = ex
            .loss_mask
            .iter()
            .position(|&m| m)
            .unwrap_or(ex.tokens.len());
        let room = ctx.saturating_sub(first);
        if room == 0 {
            continue; // the prompt fills the context: nothing to generate
        }
        let want = reference(rec);
        let options = GenerateOptions {
            max_tokens: max_tokens.min(room),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop_strings: Vec::new(),
            top_logprobs: 0,
        };
        let out = generate_with(
            model,
            adapters,
            tokenizer,
            &ex.tokens[..first],
            &options,
            cancel,
            &mut |_| {},
        )?;
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let got = out.text.trim();
        let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        exact += usize::from(norm(got) == norm(&want));
        sim += edit_similarity(got, want.trim());
        compared += 1;
        progress(FitEvent::Generated { done: i + 1, total });
    }
    Ok(Some(FitReport {
        records: examples.len(),
        loss,
        perplexity: loss.exp(),
        generated: compared,
        exact_match: exact as f64 / compared.max(1) as f64,
        edit_similarity: sim / compared.max(1) as f64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_similarity("abc", "abc"), 1.0);
        assert!((edit_similarity("abcd", "abce") - 0.75).abs() < 1e-12);
    }
}
