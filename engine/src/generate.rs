//! The generation loop: prefill, then decode token by token with streaming, stop strings, EOS,
//! a cancel token, and the figures a user wants (tokens, tokens/s).

use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Tensor;

use crate::adapter::Adapter;
use crate::cancel::CancelToken;
use crate::error::{Error, Result};
use crate::io::tokenizer::Tokenizer;
use crate::kernels::KernelBackend;
use crate::models::llama::{Adapters, KvCache, Llama};
use crate::sampling::{Sampler, SamplingParams, top_logprobs};

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
    /// The log-probability of each token of `token_ids` (when `top_logprobs` was asked for).
    pub token_logprobs: Vec<f32>,
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
    let [rows, vocab] = logits.dims();
    let v = logits
        .into_data()
        .into_vec::<f32>()
        .map_err(|e| Error::Internal(format!("reading logits: {e:?}")))?;
    crate::device::check_device(|| format!("computing the logits of {rows} rows of {vocab}"))?;
    Ok(v)
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
    check_request(model, prompt_ids, options)?;
    let mut cache = model.new_cache(1, prompt_ids.len() + options.max_tokens);
    let mut row = Row::new(prompt_ids, options);

    let start = Instant::now();
    let mut logits = logits_to_vec(model.forward_with(prompt_ids, &mut cache, false, adapters)?)?;
    row.out.prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    loop {
        if cancel.is_cancelled() {
            row.out.stop_reason = StopReason::Cancelled;
            break;
        }
        let room = cache.len < cache.capacity;
        let Some(next) = row.step(&mut logits, room, tokenizer, on_text)? else {
            break;
        };
        logits = logits_to_vec(model.forward_with(&[next], &mut cache, false, adapters)?)?;
    }
    row.out.decode_seconds = decode_start.elapsed().as_secs_f64();
    Ok(row.finish(on_text))
}

/// One sequence of a batch: its prompt and options.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub prompt_ids: Vec<u32>,
    pub options: GenerateOptions,
}

/// Generate for several prompts at once: one forward pass per step for all of them, which is
/// what makes many prompts (an evaluation suite, n samples of one prompt) fast on a GPU. The
/// prompts are left-padded to the longest (sort requests by length to waste little), and a
/// finished sequence leaves the batch at once. `on_done(i, &output)` reports request `i` as it
/// finishes. Outputs come back in the order of `requests`; each has the batch's prefill time
/// and its own decode time.
pub fn generate_batch<B: KernelBackend>(
    model: &Llama<B>,
    adapters: Adapters<'_, B>,
    tokenizer: &Tokenizer,
    requests: &[BatchRequest],
    cancel: &CancelToken,
    on_done: &mut dyn FnMut(usize, &GenerateOutput),
) -> Result<Vec<GenerateOutput>> {
    for r in requests {
        check_request(model, &r.prompt_ids, &r.options)?;
    }
    let Some(longest) = requests.iter().map(|r| r.prompt_ids.len()).max() else {
        return Ok(Vec::new());
    };
    let most_new = requests
        .iter()
        .map(|r| r.options.max_tokens)
        .max()
        .unwrap_or(1);
    let mut cache = model.new_cache(requests.len(), longest + most_new);
    // Left padding; the pad id is never attended to, any id will do.
    let pad_id = tokenizer.eos_token_ids.first().copied().unwrap_or(0);
    let mut pads = Vec::with_capacity(requests.len());
    let mut tokens = Vec::with_capacity(requests.len() * longest);
    for r in requests {
        let pad = longest - r.prompt_ids.len();
        pads.push(pad);
        tokens.extend(std::iter::repeat_n(pad_id, pad));
        tokens.extend_from_slice(&r.prompt_ids);
    }
    let mut done: Vec<Option<GenerateOutput>> = vec![None; requests.len()];
    // Row j of the KV cache generates for request `active[j].0`.
    let mut active: Vec<(usize, Row)> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (i, Row::new(&r.prompt_ids, &r.options)))
        .collect();

    let start = Instant::now();
    let vocab = model.config.vocab_size;
    let mut logits = logits_to_vec(model.forward_batch(&tokens, &pads, &mut cache, adapters)?)?;
    let prefill_seconds = start.elapsed().as_secs_f64();
    let decode_start = Instant::now();
    let mut no_text = |_: &str| {};
    loop {
        let room = cache.len < cache.capacity;
        let rows_before = active.len();
        let mut next = Vec::with_capacity(rows_before);
        let mut keep = Vec::with_capacity(rows_before);
        let mut still = Vec::with_capacity(rows_before);
        for (j, (i, mut row)) in active.into_iter().enumerate() {
            let step = if cancel.is_cancelled() {
                row.out.stop_reason = StopReason::Cancelled;
                None
            } else {
                row.step(
                    &mut logits[j * vocab..(j + 1) * vocab],
                    room,
                    tokenizer,
                    &mut no_text,
                )?
            };
            match step {
                Some(t) => {
                    next.push(t);
                    keep.push(j);
                    still.push((i, row));
                }
                None => {
                    row.out.prefill_seconds = prefill_seconds;
                    row.out.decode_seconds = decode_start.elapsed().as_secs_f64();
                    let out = row.finish(&mut no_text);
                    on_done(i, &out);
                    done[i] = Some(out);
                }
            }
        }
        active = still;
        if active.is_empty() {
            break;
        }
        if active.len() < rows_before {
            cache.retain_rows(&keep);
            pads = keep.iter().map(|&j| pads[j]).collect();
        }
        logits = logits_to_vec(model.forward_batch(&next, &pads, &mut cache, adapters)?)?;
    }
    done.into_iter()
        .map(|o| o.ok_or_else(|| Error::Internal("a batch row never finished".into())))
        .collect()
}

/// A batch that sequences join and leave between steps (continuous batching): each row has
/// its own prompt, options and adapters, and one forward pass a step serves them all.
///
/// A sequence joins with [`admit`](Self::admit), which runs its prompt alone (as
/// [`generate_with`] does) and picks its first token; each [`step`](Self::step) then feeds
/// every row its last token. Rows are left-padded to the longest in the cache, but each keeps
/// its own RoPE positions (those it has alone), so rows can move in the cache: a longer row
/// joining pads the others, and the front positions that every row has as padding are dropped
/// when rows leave.
pub struct RunningBatch<'m, B: KernelBackend> {
    model: &'m Llama<B>,
    /// `None` while the batch is empty.
    cache: Option<KvCache<B>>,
    rows: Vec<RunningRow<B>>,
}

struct RunningRow<B: KernelBackend> {
    id: u64,
    row: Row,
    adapters: Vec<Arc<Adapter<B>>>,
    /// Padding positions in front of this row's in the cache.
    pad: usize,
    /// The token this row feeds at the next step.
    next: u32,
    decode_start: Instant,
}

/// What a [`RunningBatch`] tells its caller about a row.
pub enum RowEvent<'a> {
    /// Text that became final.
    Text(&'a str),
    /// The row finished and left the batch.
    Done(GenerateOutput),
}

impl<'m, B: KernelBackend> RunningBatch<'m, B> {
    pub fn new(model: &'m Llama<B>) -> Self {
        Self {
            model,
            cache: None,
            rows: Vec::new(),
        }
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Run sequence `id`'s prompt on its adapters (stacked in order) and pick its first token.
    /// It joins the batch unless it is already finished (EOS, a stop string, one token asked
    /// for), in which case its output comes back through `on_event` at once.
    pub fn admit(
        &mut self,
        id: u64,
        prompt_ids: &[u32],
        options: &GenerateOptions,
        adapters: Vec<Arc<Adapter<B>>>,
        tokenizer: &Tokenizer,
        on_event: &mut dyn FnMut(u64, RowEvent<'_>),
    ) -> Result<()> {
        let model = self.model;
        check_request(model, prompt_ids, options)?;
        let mut cache = model.new_cache(1, prompt_ids.len());
        let mut row = Row::new(prompt_ids, options);
        let start = Instant::now();
        let list: Vec<&Adapter<B>> = adapters.iter().map(|a| a.as_ref()).collect();
        let adapted = Adapters {
            list: &list,
            train: None,
        };
        let mut logits =
            logits_to_vec(model.forward_with(prompt_ids, &mut cache, false, adapted)?)?;
        row.out.prefill_seconds = start.elapsed().as_secs_f64();
        let room = cache.len < model.config.max_position_embeddings;
        let step = row.step(&mut logits, room, tokenizer, &mut |t| {
            on_event(id, RowEvent::Text(t))
        })?;
        let Some(next) = step else {
            let out = row.finish(&mut |t| on_event(id, RowEvent::Text(t)));
            on_event(id, RowEvent::Done(out));
            return Ok(());
        };
        let pad = match &mut self.cache {
            None => {
                self.cache = Some(cache);
                0
            }
            Some(batch) => {
                if cache.len > batch.len {
                    let by = cache.len - batch.len;
                    batch.pad_front(by);
                    for r in &mut self.rows {
                        r.pad += by;
                    }
                }
                batch.push_row(&cache);
                batch.len - cache.len
            }
        };
        self.rows.push(RunningRow {
            id,
            row,
            adapters,
            pad,
            next,
            decode_start: Instant::now(),
        });
        Ok(())
    }

    /// One forward pass for every row, each row's next token picked; finished rows leave.
    pub fn step(
        &mut self,
        tokenizer: &Tokenizer,
        on_event: &mut dyn FnMut(u64, RowEvent<'_>),
    ) -> Result<()> {
        let Some(cache) = self.cache.as_mut() else {
            return Ok(());
        };
        let model = self.model;
        let context = model.config.max_position_embeddings;
        if cache.len + 1 > cache.capacity {
            let want = (cache.len + 1).max(2 * cache.capacity).min(context);
            if want <= cache.len {
                return Err(Error::Internal(format!(
                    "a batch of {} positions has no room left in the context of {context}",
                    cache.len
                )));
            }
            cache.grow(want);
        }
        // The distinct adapters of the batch, and each row's indices among them.
        let mut list: Vec<&Adapter<B>> = Vec::new();
        let mut uses = Vec::with_capacity(self.rows.len());
        for r in &self.rows {
            let mine = r
                .adapters
                .iter()
                .map(
                    |a| match list.iter().position(|&b| std::ptr::eq(b, a.as_ref())) {
                        Some(i) => i,
                        None => {
                            list.push(a.as_ref());
                            list.len() - 1
                        }
                    },
                )
                .collect();
            uses.push(mine);
        }
        let next: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
        let pads: Vec<usize> = self.rows.iter().map(|r| r.pad).collect();
        let adapters = Adapters {
            list: &list,
            train: None,
        };
        // Each row computes what it would alone (the CPU path's products otherwise change
        // kernels with the number of rows).
        let logits = crate::kernels::cpu_quant::rows_as_alone(|| {
            model.forward_batch_rows(&next, &pads, cache, adapters, Some(&uses))
        })?;
        let mut logits = logits_to_vec(logits)?;
        let vocab = model.config.vocab_size;
        let len = cache.len;
        let mut keep = Vec::with_capacity(self.rows.len());
        let mut still = Vec::with_capacity(self.rows.len());
        for (j, mut r) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            let id = r.id;
            let room = len - r.pad < context;
            let step = r.row.step(
                &mut logits[j * vocab..(j + 1) * vocab],
                room,
                tokenizer,
                &mut |t| on_event(id, RowEvent::Text(t)),
            )?;
            match step {
                Some(t) => {
                    r.next = t;
                    keep.push(j);
                    still.push(r);
                }
                None => {
                    r.row.out.decode_seconds = r.decode_start.elapsed().as_secs_f64();
                    let out = r.row.finish(&mut |t| on_event(id, RowEvent::Text(t)));
                    on_event(id, RowEvent::Done(out));
                }
            }
        }
        self.rows = still;
        if keep.len() < next.len() {
            self.retain(&keep);
        }
        Ok(())
    }

    /// Take row `id` out of the batch (its client left): its output so far, stopped as
    /// cancelled; `None` if no such row.
    pub fn remove(&mut self, id: u64) -> Option<GenerateOutput> {
        let at = self.rows.iter().position(|r| r.id == id)?;
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&j| j != at).collect();
        let mut r = self.rows.remove(at);
        self.retain(&keep);
        r.row.out.stop_reason = StopReason::Cancelled;
        r.row.out.decode_seconds = r.decode_start.elapsed().as_secs_f64();
        Some(r.row.finish(&mut |_| {}))
    }

    /// The cache keeps the rows `keep` (the rows already are those), and drops the front
    /// positions they all have as padding.
    fn retain(&mut self, keep: &[usize]) {
        if self.rows.is_empty() {
            self.cache = None;
            return;
        }
        let Some(cache) = self.cache.as_mut() else {
            return;
        };
        cache.retain_rows(keep);
        let front = self.rows.iter().map(|r| r.pad).min().unwrap_or(0);
        if front > 0 {
            cache.drop_front(front);
            for r in &mut self.rows {
                r.pad -= front;
            }
        }
    }
}

/// What every generation checks before it allocates anything.
fn check_request<B: KernelBackend>(
    model: &Llama<B>,
    prompt_ids: &[u32],
    options: &GenerateOptions,
) -> Result<()> {
    options.sampling.validate()?;
    if options.max_tokens == 0 {
        return Err(Error::Setting("max-tokens must be at least 1".into()));
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
    Ok(())
}

/// One sequence being generated: sampling, stop detection and streaming, whatever the batch.
struct Row {
    options: Arc<GenerateOptions>,
    sampler: Sampler,
    history: Vec<u32>,
    out: GenerateOutput,
    text: String,
    /// Bytes of `text` streamed so far.
    emitted: usize,
}

impl Row {
    fn new(prompt_ids: &[u32], options: &GenerateOptions) -> Self {
        Self {
            options: Arc::new(options.clone()),
            sampler: Sampler::new(options.sampling.clone()),
            history: prompt_ids.to_vec(),
            out: GenerateOutput {
                text: String::new(),
                prompt_token_ids: prompt_ids.to_vec(),
                token_ids: vec![],
                top_logprobs: vec![],
                token_logprobs: vec![],
                stop_reason: StopReason::MaxTokens,
                prefill_seconds: 0.0,
                decode_seconds: 0.0,
            },
            text: String::new(),
            emitted: 0,
        }
    }

    /// Pick the next token from `logits` and stream what became final. Returns the token to
    /// feed back, or `None` when the sequence is finished (`out.stop_reason` says why); `room`
    /// is whether the KV cache can take another position.
    fn step(
        &mut self,
        logits: &mut [f32],
        room: bool,
        tokenizer: &Tokenizer,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>> {
        let options = Arc::clone(&self.options);
        // The sampler may rescale the logits in place: the chosen token's log-probability is
        // read from a copy of the model's own.
        let mut raw = None;
        if options.top_logprobs > 0 {
            let top = top_logprobs(logits, options.top_logprobs);
            if let Some(&(id, lp)) = top.first() {
                raw = Some((logits.to_vec(), logits[id as usize] - lp));
            }
            self.out.top_logprobs.push(top);
        }
        let next = self.sampler.sample(logits, &self.history);
        if tokenizer.eos_token_ids.contains(&next) {
            self.out.stop_reason = StopReason::Eos;
            return Ok(None);
        }
        if let Some((raw, log_sum)) = raw {
            self.out.token_logprobs.push(raw[next as usize] - log_sum);
        }
        self.out.token_ids.push(next);
        self.history.push(next);

        self.text = tokenizer.decode(&self.out.token_ids, true)?;
        if let Some(at) = options
            .stop_strings
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            self.text.truncate(at);
            self.out.stop_reason = StopReason::StopString;
            return Ok(None);
        }
        // A token may end inside a UTF-8 character; wait for the rest before streaming.
        if !self.text.ends_with('\u{FFFD}') {
            let upto = self.text.len() - held_back(&self.text, &options.stop_strings);
            if upto > self.emitted && self.text.is_char_boundary(upto) {
                on_text(&self.text[self.emitted..upto]);
                self.emitted = upto;
            }
        }
        if self.out.token_ids.len() >= options.max_tokens {
            self.out.stop_reason = StopReason::MaxTokens;
            return Ok(None);
        }
        if !room {
            self.out.stop_reason = StopReason::ContextFull;
            return Ok(None);
        }
        Ok(Some(next))
    }

    /// Stream what was held back and hand over the output.
    fn finish(mut self, on_text: &mut dyn FnMut(&str)) -> GenerateOutput {
        if self.text.len() > self.emitted {
            on_text(&self.text[self.emitted..]);
        }
        self.out.text = self.text;
        self.out
    }
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
