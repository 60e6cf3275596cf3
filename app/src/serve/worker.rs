//! The model's thread: takes the queued jobs one at a time, renders and tokenises each prompt,
//! loads the adapters it names (kept, least recently used out) and streams what it generates
//! back to the request's handler.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use codelsi_engine::adapter::Adapter;
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::generate::{GenerateOptions, GenerateOutput, StopReason, generate_with};
use codelsi_engine::io::tokenizer::{Message, Tokenizer};
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use codelsi_engine::models::llama::Adapters;
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
    pub cache: Vec<(String, Adapter<B>)>,
    pub max_cached: usize,
    pub metrics: Arc<Metrics>,
}

impl<B: KernelBackend> Worker<B> {
    /// Runs jobs until every sender is gone.
    pub fn run(mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.metrics.queued.fetch_sub(1, Relaxed);
            if job.cancel.is_cancelled() {
                continue;
            }
            self.metrics.running.store(1, Relaxed);
            // A panic inside the engine fails this request, not the server.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve(&job)))
                    .unwrap_or_else(|_| {
                        Err(ApiError::server(
                            "the model's thread panicked on this request",
                        ))
                    });
            if let Err(e) = result {
                let _ = job.events.send(Event::Failed(e));
            }
            self.metrics.running.store(0, Relaxed);
        }
    }

    fn serve(&mut self, job: &Job) -> Result<(), ApiError> {
        let tokenizer = &self.loaded.tokenizer;
        let ids = prompt_ids(tokenizer, &job.prompt)?;
        let context = self.loaded.model.config.max_position_embeddings;
        if ids.len() >= context {
            return Err(ApiError::invalid(format!(
                "the prompt has {} tokens; the model's context is {context}",
                ids.len()
            ))
            .with_code("context_length_exceeded"));
        }
        let room = context - ids.len();
        let max_tokens = match job.max_tokens {
            None => DEFAULT_MAX_TOKENS.min(room),
            Some(m) if m > room => {
                return Err(ApiError::invalid(format!(
                    "max_tokens is {m}, but the context ({context} tokens) has room for {room} after the prompt's {}",
                    ids.len()
                ))
                .with_code("context_length_exceeded"));
            }
            Some(m) => m,
        };
        self.load_adapters(&job.adapters)?;
        let _ = job.events.send(Event::Started {
            prompt_tokens: ids.len(),
        });
        let adapters: Vec<&Adapter<B>> = job
            .adapters
            .iter()
            .filter_map(|id| self.cache.iter().find(|(k, _)| k == id).map(|(_, a)| a))
            .collect();
        for index in 0..job.n {
            let mut options = job.options.clone();
            options.max_tokens = max_tokens;
            options.sampling.seed = options.sampling.seed.wrapping_add(index as u64);
            let out = generate_with(
                &self.loaded.model,
                Adapters {
                    list: &adapters,
                    train: false,
                },
                &self.loaded.tokenizer,
                &ids,
                &options,
                &job.cancel,
                &mut |text| {
                    if job
                        .events
                        .send(Event::Text {
                            index,
                            text: text.to_string(),
                        })
                        .is_err()
                    {
                        // The handler is gone: its client left.
                        job.cancel.cancel();
                    }
                },
            )
            .map_err(|e| ApiError::server(format!("generation failed: {e}")))?;
            self.metrics
                .generated_tokens
                .fetch_add(out.token_ids.len() as u64, Relaxed);
            if out.stop_reason == StopReason::Cancelled {
                return Ok(());
            }
            let text_of = |id: u32| {
                self.loaded
                    .tokenizer
                    .decode(&[id], false)
                    .unwrap_or_default()
            };
            let (pieces, top) = if job.options.top_logprobs > 0 {
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
            let _ = job.events.send(Event::Done {
                index,
                done: Box::new(Finished { out, pieces, top }),
            });
        }
        Ok(())
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
            self.cache.push((id.clone(), adapter));
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
