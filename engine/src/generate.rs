//! The generation loop: prefill, then decode token by token with streaming, stop strings, EOS,
//! a cancel token, and the figures a user wants (tokens, tokens/s).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::tensor::Tensor;

use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, Llama};
use crate::sampling::{Sampler, SamplingParams, top_logprobs};

/// Shared flag that stops long work at the next step. Clone it into another thread to cancel.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; it is not part of the output.
    pub stop_strings: Vec<String>,
    /// How many of the most likely tokens to report at each step (0 for none).
    pub top_logprobs: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop_strings: vec![],
            top_logprobs: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Eos,
    StopString,
    MaxTokens,
    ContextFull,
    Cancelled,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateOutput {
    pub text: String,
    pub prompt_token_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    /// At each generated position, the most likely ids with their log-probabilities.
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    pub stop_reason: StopReason,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
}

impl GenerateOutput {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        self.prompt_token_ids.len() as f64 / self.prefill_seconds.max(1e-9)
    }
    /// Decode speed over the tokens after the first (the first comes from the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        self.token_ids.len().saturating_sub(1) as f64 / self.decode_seconds.max(1e-9)
    }
}

fn logits_to_vec<B: KernelBackend>(logits: Tensor<B, 2>) -> Result<Vec<f32>> {
    logits
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| Error::InvalidArgument(format!("reading logits: {e:?}")))
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: that
/// much must be held back from the stream until we know it is not the start of a stop.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut keep = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                keep = keep.max(i);
            }
        }
    }
    keep
}

/// Generate from `prompt_ids`, streaming text pieces to `on_text` as they become final.
pub fn generate<B: KernelBackend>(
    model: &Llama<B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    generate_with(
        model,
        Adapters::none(),
        tokenizer,
        prompt_ids,
        options,
        cancel,
        on_text,
    )
}

/// [`generate`] with LoRA adapters on the base model (switching adapters needs no reload).
pub fn generate_with<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    tokenizer: &Tokenizer,
    prompt_ids: &[u32],
    options: &GenerateOptions,
    cancel: &CancelToken,
    on_text: &mut dyn FnMut(&str),
) -> Result<GenerateOutput> {
    options.sampling.validate()?;
    if options.max_tokens == 0 {
        return Err(Error::InvalidArgument(
            "max-tokens must be at least 1".into(),
        ));
    }
    if prompt_ids.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    let context = model.config.max_position_embeddings;
    if prompt_ids.len() >= context {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} tokens; the model's context is {context}",
            prompt_ids.len()
        )));
    }
    let mut cache = model.new_cache(1, prompt_ids.len() + options.max_tokens);
    let mut sampler = Sampler::new(options.sampling.clone());
    let mut history = prompt_ids.to_vec();
    let mut out = GenerateOutput {
        text: String::new(),
        prompt_token_ids: prompt_ids.to_vec(),
        token_ids: vec![],
        top_logprobs: vec![],
        stop_reason: StopReason::MaxTokens,
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
    };

    let start = Instant::now();
    let mut logits = logits_to_vec(model.forward_with(prompt_ids, &mut cache, false, adapters)?)?;
    out.prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut emitted = 0; // bytes of `text` streamed so far
    let mut text = String::new();

    loop {
        if cancel.is_cancelled() {
            out.stop_reason = StopReason::Cancelled;
            break;
        }
        if options.top_logprobs > 0 {
            out.top_logprobs
                .push(top_logprobs(&logits, options.top_logprobs));
        }
        let next = sampler.sample(&mut logits, &history);
        if tokenizer.eos_token_ids.contains(&next) {
            out.stop_reason = StopReason::Eos;
            break;
        }
        out.token_ids.push(next);
        history.push(next);

        text = tokenizer.decode(&out.token_ids, true)?;
        if let Some(at) = options
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(at);
            out.stop_reason = StopReason::StopString;
            break;
        }
        // A token may end inside a UTF-8 character; wait for the rest before streaming.
        if !text.ends_with('\u{FFFD}') {
            let upto = text.len() - held_back(&text, &options.stop_strings);
            if upto > emitted && text.is_char_boundary(upto) {
                on_text(&text[emitted..upto]);
                emitted = upto;
            }
        }
        if out.token_ids.len() >= options.max_tokens {
            out.stop_reason = StopReason::MaxTokens;
            break;
        }
        if cache.len >= cache.capacity {
            out.stop_reason = StopReason::ContextFull;
            break;
        }
        logits = logits_to_vec(model.forward_with(&[next], &mut cache, false, adapters)?)?;
    }
    if text.len() > emitted {
        on_text(&text[emitted..]);
    }
    out.decode_seconds = decode_start.elapsed().as_secs_f64();
    out.text = text;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["\nfunction".to_string(), "```".to_string()];
        assert_eq!(held_back("return x;\nfun", &stops), 4);
        assert_eq!(held_back("a `", &stops), 1);
        assert_eq!(held_back("plain", &stops), 0);
    }
}
