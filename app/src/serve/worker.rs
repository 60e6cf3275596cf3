//! The model's thread: renders and tokenises each queued job's prompt, loads the adapters it
//! names (kept, least recently used out), runs its prompt and puts its sequences into the
//! running batch (continuous batching: one forward pass a step for every sequence, each on its
//! own adapters), and streams what they generate back to the requests' handlers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::generate::{
    GenerateOptions, GenerateOutput, RowEvent, RunningBatch, StopReason,
};
use codelsi_engine::io::tokenizer::{Message, Tokenizer};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use tokio::sync::mpsc::UnboundedSender;

use super::Metrics;
use super::api::{ApiError, DEFAULT_MAX_TOKENS};

/// Qwen2.5-Coder's fill-in-the-middle tokens (also StarCoder2's and others' spelling).
pub const FIM_TOKENS: [&str; 3] = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"];

/// What a job's prompt is before the model's tokenizer sees it.
pub enum Prompt {
    /// Messages for the chat template.
    Chat(Vec<Message>),
    Text(String),
    /// Fill in the middle between `prefix` and `suffix`.
    Fim {
        prefix: String,
        suffix: String,
    },
}

/// A request's work for the model.
pub struct Job {
    pub prompt: Prompt,
    /// Adapter ids, stacked in this order (empty: the base model).
    pub adapters: Vec<String>,
    pub options: GenerateOptions,
    /// `None`: what the context leaves, up to [`DEFAULT_MAX_TOKENS`].
    pub max_tokens: Option<usize>,
    /// Completions to draw; the i-th uses seed `seed + i`.
    pub n: usize,
    pub events: UnboundedSender<Event>,
    pub cancel: CancelToken,
}

/// What the model's thread tells a request's handler.
pub enum Event {
    /// The prompt was accepted: its length in tokens.
    Started { prompt_tokens: usize },
    /// New text of completion `index`.
    Text { index: usize, text: String },
    /// Completion `index` is whole.
    Done { index: usize, done: Box<Finished> },
    /// The job failed before or while generating.
    Failed(ApiError),
}

/// A whole completion, with its tokens' texts when log-probabilities were asked for.
pub struct Finished {
    pub out: GenerateOutput,
    /// The text of each generated token.
    pub pieces: Vec<String>,
    /// At each position, the most likely tokens' texts and log-probabilities.
    pub top: Vec<Vec<(String, f32)>>,
}

/// The model and what the thread keeps between jobs.
pub struct Worker<B: KernelBackend> {
    pub loaded: Arc<LoadedModel<B>>,
    /// Adapter id → its PEFT directory.
    pub catalogue: BTreeMap<String, PathBuf>,
    /// Loaded adapters, most recently used last.
    pub cache: Vec<(String, Arc<Adapter<B>>)>,
    pub max_cached: usize,
    /// Sequences in the running batch at most.
    pub max_batch: usize,
    pub metrics: Arc<Metrics>,
}

/// A sequence of the running batch: completion `index` of a job.
struct Live {
    index: usize,
    events: UnboundedSender<Event>,
    cancel: CancelToken,
    logprobs: bool,
}

impl<B: KernelBackend> Worker<B> {
    /// Runs jobs until every sender is gone: they join the running batch between its steps
    /// while it has room, and each sequence leaves it when done.
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        let loaded = Arc::clone(&self.loaded);
        let mut batch = RunningBatch::new(&loaded.model);
        let mut live: HashMap<u64, Live> = HashMap::new();
        let mut next_id = 0u64;
        // A job taken from the queue that waits for room in the batch.
        let mut waiting: Option<Job> = None;
        let mut open = true;
        loop {
            // Jobs join while they fit (a job of `n` completions takes `n` rows).
            loop {
                let job = match waiting.take() {
                    Some(job) => job,
                    None if !open => break,
                    None if batch.is_empty() => match jobs.recv() {
                        Ok(job) => job,
                        Err(_) => {
                            open = false;
                            break;
                        }
                    },
                    None => match jobs.try_recv() {
                        Ok(job) => job,
                        Err(std::sync::mpsc::TryRecvError::Empty) => break,
                        Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                            open = false;
                            break;
                        }
                    },
                };
                if !batch.is_empty() && batch.len() + job.n > self.max_batch {
                    waiting = Some(job);
                    break;
                }
                self.metrics.queued.fetch_sub(1, Relaxed);
                if job.cancel.is_cancelled() {
                    continue;
                }
                let ids: Vec<u64> = (0..job.n as u64).map(|i| next_id + i).collect();
                next_id += job.n as u64;
                // A panic inside the engine fails this request, not the server.
                let admitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.admit(&job, &ids, &mut batch, &mut live)
                }))
                .unwrap_or_else(|_| {
                    Err(ApiError::server(
                        "the model's thread panicked on this request",
                    ))
                });
                if let Err(e) = admitted {
                    for id in &ids {
                        live.remove(id);
                        batch.remove(*id);
                    }
                    let _ = job.events.send(Event::Failed(e));
                }
            }
            if batch.is_empty() {
                if !open && waiting.is_none() {
                    return;
                }
                self.metrics.running.store(0, Relaxed);
                continue;
            }
            self.metrics.running.store(batch.len(), Relaxed);
            // Sequences whose client left go at once.
            let gone: Vec<u64> = live
                .iter()
                .filter(|(_, l)| l.cancel.is_cancelled())
                .map(|(&id, _)| id)
                .collect();
            for id in gone {
                live.remove(&id);
                if let Some(out) = batch.remove(id) {
                    self.count(&out);
                }
            }
            let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                batch.step(&loaded.tokenizer, &mut |id, event| {
                    self.on_event(&mut live, id, event)
                })
            }))
            .unwrap_or_else(|_| Err(codelsi_engine::error::Error::Internal("panicked".into())));
            if let Err(e) = stepped {
                // The batch's state is not to be trusted: every sequence in it fails.
                for (_, l) in live.drain() {
                    let _ = l.events.send(Event::Failed(ApiError::server(format!(
                        "generation failed: {e}"
                    ))));
                }
                batch = RunningBatch::new(&loaded.model);
            }
        }
    }

    /// Puts the `n` sequences of `job` into the batch, ids `ids`.
    fn admit(
        &mut self,
        job: &Job,
        ids: &[u64],
        batch: &mut RunningBatch<'_, B>,
        live: &mut HashMap<u64, Live>,
    ) -> Result<(), ApiError> {
        let loaded = Arc::clone(&self.loaded);
        let tokenizer = &loaded.tokenizer;
        let prompt = prompt_ids(tokenizer, &job.prompt)?;
        let context = loaded.model.config.max_position_embeddings;
        if prompt.len() >= context {
            return Err(ApiError::invalid(format!(
                "the prompt has {} tokens; the model's context is {context}",
                prompt.len()
            ))
            .with_code("context_length_exceeded"));
        }
        let room = context - prompt.len();
        let max_tokens = match job.max_tokens {
            None => DEFAULT_MAX_TOKENS.min(room),
            Some(m) if m > room => {
                return Err(ApiError::invalid(format!(
                    "max_tokens is {m}, but the context ({context} tokens) has room for {room} after the prompt's {}",
                    prompt.len()
                ))
                .with_code("context_length_exceeded"));
            }
            Some(m) => m,
        };
        self.load_adapters(&job.adapters)?;
        let adapters: Vec<Arc<Adapter<B>>> = job
            .adapters
            .iter()
            .filter_map(|id| {
                self.cache
                    .iter()
                    .find(|(k, _)| k == id)
                    .map(|(_, a)| Arc::clone(a))
            })
            .collect();
        let _ = job.events.send(Event::Started {
            prompt_tokens: prompt.len(),
        });
        for (index, &id) in ids.iter().enumerate() {
            let mut options = job.options.clone();
            options.max_tokens = max_tokens;
            options.sampling.seed = options.sampling.seed.wrapping_add(index as u64);
            live.insert(
                id,
                Live {
                    index,
                    events: job.events.clone(),
                    cancel: job.cancel.clone(),
                    logprobs: job.options.top_logprobs > 0,
                },
            );
            batch
                .admit(
                    id,
                    &prompt,
                    &options,
                    adapters.clone(),
                    tokenizer,
                    &mut |id, event| self.on_event(live, id, event),
                )
                .map_err(|e| ApiError::server(format!("generation failed: {e}")))?;
        }
        Ok(())
    }

    /// Passes a sequence's text or its end to its request's handler.
    fn on_event(&self, live: &mut HashMap<u64, Live>, id: u64, event: RowEvent<'_>) {
        let Some(l) = live.get(&id) else {
            return;
        };
        match event {
            RowEvent::Text(text) => {
                let text = Event::Text {
                    index: l.index,
                    text: text.to_string(),
                };
                if l.events.send(text).is_err() {
                    // The handler is gone: its client left.
                    l.cancel.cancel();
                }
            }
            RowEvent::Done(out) => {
                let Some(l) = live.remove(&id) else {
                    return;
                };
                self.count(&out);
                if out.stop_reason == StopReason::Cancelled {
                    return;
                }
                let done = self.finished(out, l.logprobs);
                let _ = l.events.send(Event::Done {
                    index: l.index,
                    done: Box::new(done),
                });
            }
        }
    }

    fn count(&self, out: &GenerateOutput) {
        self.metrics
            .generated_tokens
            .fetch_add(out.token_ids.len() as u64, Relaxed);
    }

    /// The output with its tokens' texts when log-probabilities were asked for.
    fn finished(&self, out: GenerateOutput, logprobs: bool) -> Finished {
        let text_of = |id: u32| {
            self.loaded
                .tokenizer
                .decode(&[id], false)
                .unwrap_or_default()
        };
        let (pieces, top) = if logprobs {
            // The tokens whose text starts inside the output (a stop string's token, cut
            // from the text, is left out).
            let mut at = 0;
            let pieces: Vec<String> = out
                .token_ids
                .iter()
                .map(|&id| text_of(id))
                .take_while(|p| {
                    let inside = at < out.text.len();
                    at += p.len();
                    inside
                })
                .collect();
            let top = out
                .top_logprobs
                .iter()
                .map(|p| p.iter().map(|&(id, lp)| (text_of(id), lp)).collect())
                .collect();
            (pieces, top)
        } else {
            (vec![], vec![])
        };
        Finished { out, pieces, top }
    }

    /// Loads the adapters `ids` names that are not cached, dropping the least recently used
    /// beyond the cache's size (never one this job needs).
    fn load_adapters(&mut self, ids: &[String]) -> Result<(), ApiError> {
        for id in ids {
            if let Some(at) = self.cache.iter().position(|(k, _)| k == id) {
                let entry = self.cache.remove(at);
                self.cache.push(entry);
                continue;
            }
            let dir = self.catalogue.get(id).ok_or_else(|| {
                ApiError::invalid(format!("no adapter `{id}`"))
                    .with_code("model_not_found")
                    .status(axum::http::StatusCode::NOT_FOUND)
            })?;
            let model = &self.loaded.model;
            let adapter = Adapter::<B>::load_peft(dir, &model.config, model.device())
                .map_err(|e| ApiError::server(format!("loading adapter `{id}`: {e}")))?;
            self.cache.push((id.clone(), Arc::new(adapter)));
        }
        while self.cache.len() > self.max_cached.max(ids.len()) {
            let Some(at) = self.cache.iter().position(|(k, _)| !ids.contains(k)) else {
                break;
            };
            self.cache.remove(at);
        }
        Ok(())
    }
}

/// The prompt's token ids: the chat template rendered, or the text, or the FIM layout.
fn prompt_ids(tokenizer: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>, ApiError> {
    let text = match prompt {
        Prompt::Chat(messages) => tokenizer
            .apply_chat_template(messages, true)
            .map_err(|e| ApiError::invalid(e.to_string()))?,
        Prompt::Text(text) => text.clone(),
        Prompt::Fim { prefix, suffix } => {
            if let Some(missing) = FIM_TOKENS.iter().find(|t| tokenizer.token_id(t).is_none()) {
                return Err(ApiError::invalid(format!(
                    "this model has no fill-in-the-middle tokens ({missing} is not in its vocabulary): `suffix` needs a model trained for FIM, such as Qwen2.5-Coder"
                )));
            }
            let [p, s, m] = FIM_TOKENS;
            format!("{p}{prefix}{s}{suffix}{m}")
        }
    };
    let ids = tokenizer
        .encode(&text, true)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::invalid("the prompt is empty"));
    }
    Ok(ids)
}
