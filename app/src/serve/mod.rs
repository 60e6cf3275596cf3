//! `codelsi serve`: the model behind an OpenAI-compatible HTTP API on axum, for editors,
//! scripts and bots. Handlers check a request, queue it for the model's thread
//! ([`worker`]) on a bounded queue (full: 429), and answer with its output, whole or as
//! server-sent events. The request's `model` picks the adapters: an adapter id, a stack
//! `general+specialised`, or the base model's own id.

pub mod api;
pub mod worker;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use codelsi_engine::cancel::CancelToken;
use codelsi_engine::kernels::KernelBackend;
use codelsi_engine::model::LoadedModel;
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedReceiver;

use api::{ApiError, ChatRequest, Checked, CompletionRequest, PromptField};
use worker::{Event, Finished, Job, Prompt, Worker};

/// The largest request body (a long prompt is a few hundred kB).
pub const BODY_LIMIT: usize = 4 << 20;

/// What `codelsi serve` was asked for.
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Requests waiting for the model beyond the one it runs; past it, 429.
    pub max_queue: usize,
    /// Sequences generated together, one forward pass a step (a request with `n` counts `n`).
    pub max_batch: usize,
    /// Adapters kept loaded.
    pub max_adapters: usize,
    /// Adapter id → PEFT directory.
    pub catalogue: BTreeMap<String, PathBuf>,
    /// The base model's id in `/v1/models` and in requests.
    pub base_id: String,
    /// Counters the caller may read while it serves (the app shows them).
    pub metrics: Arc<Metrics>,
    /// Stops the server (Ctrl-C for the command, the switch in the app).
    pub stop: CancelToken,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub generated_tokens: AtomicU64,
}

/// What every handler reads.
struct Shared {
    jobs: std::sync::mpsc::SyncSender<Job>,
    api_key: Option<String>,
    base_id: String,
    adapter_ids: Vec<String>,
    started: u64,
    metrics: Arc<Metrics>,
}

/// Serves `loaded` until `settings.stop` is cancelled, calling `ready` with the bound address
/// once it listens. The model may be shared (the app keeps using it).
pub fn serve<B: KernelBackend>(
    loaded: Arc<LoadedModel<B>>,
    settings: Settings,
    ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()>
where
    LoadedModel<B>: Send + Sync + 'static,
{
    if settings.catalogue.contains_key(&settings.base_id) {
        anyhow::bail!(
            "an adapter is named `{}`, as the base model: rename its folder",
            settings.base_id
        );
    }
    let metrics = settings.metrics.clone();
    let (jobs, queue) = std::sync::mpsc::sync_channel(settings.max_queue);
    let worker = Worker {
        loaded,
        catalogue: settings.catalogue.clone(),
        cache: vec![],
        max_cached: settings.max_adapters,
        max_batch: settings.max_batch.max(1),
        metrics: metrics.clone(),
    };
    std::thread::Builder::new()
        .name("codelsi-model".into())
        .spawn(move || worker.run(queue))?;
    let shared = Arc::new(Shared {
        jobs,
        api_key: settings.api_key,
        base_id: settings.base_id,
        adapter_ids: settings.catalogue.keys().cloned().collect(),
        started: now(),
        metrics,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("codelsi-http")
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind((settings.host.as_str(), settings.port))
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on {}:{}: {e}", settings.host, settings.port)
            })?;
        ready(listener.local_addr()?);
        let stop = settings.stop;
        axum::serve(listener, router(shared))
            .with_graceful_shutdown(async move {
                while !stop.is_cancelled() {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            })
            .await?;
        Ok(())
    })
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError::invalid("no such endpoint")
                .status(StatusCode::NOT_FOUND)
                .with_code("not_found")
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Shared {
    /// 401 unless the request carries the key (when the server has one).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            return Ok(());
        }
        Err(ApiError::invalid(
            "a valid API key is needed: send `Authorization: Bearer KEY` with the key the server was started with",
        )
        .with_code("invalid_api_key")
        .status(StatusCode::UNAUTHORIZED))
    }

    /// The adapter ids a request's `model` names (none for the base model).
    fn adapters_of(&self, model: &str) -> Result<Vec<String>, ApiError> {
        if model == self.base_id {
            return Ok(vec![]);
        }
        let ids: Vec<String> = model.split('+').map(str::to_string).collect();
        if let Some(unknown) = ids.iter().find(|id| !self.adapter_ids.contains(id)) {
            return Err(ApiError::invalid(format!(
                "the model `{model}` does not exist: `{unknown}` is neither the base model (`{}`) nor an adapter (GET /v1/models lists them)",
                self.base_id
            ))
            .with_code("model_not_found")
            .status(StatusCode::NOT_FOUND));
        }
        Ok(ids)
    }

    /// Queues a job; 429 with `Retry-After` when the queue is full.
    fn submit(
        &self,
        prompt: Prompt,
        adapters: Vec<String>,
        checked: &Checked,
    ) -> Result<(UnboundedReceiver<Event>, CancelOnDrop), ApiError> {
        self.metrics.requests.fetch_add(1, Relaxed);
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancelToken::new();
        let job = Job {
            prompt,
            adapters,
            options: checked.options.clone(),
            max_tokens: checked.max_tokens,
            n: checked.n,
            events,
            cancel: cancel.clone(),
        };
        self.metrics.queued.fetch_add(1, Relaxed);
        match self.jobs.try_send(job) {
            Ok(()) => Ok((rx, CancelOnDrop(cancel))),
            Err(e) => {
                self.metrics.queued.fetch_sub(1, Relaxed);
                self.metrics.rejected.fetch_add(1, Relaxed);
                let busy = matches!(e, std::sync::mpsc::TrySendError::Full(_));
                let mut error = ApiError::invalid(if busy {
                    "the server's queue is full; retry shortly"
                } else {
                    "the model's thread has stopped"
                });
                error.status = if busy {
                    StatusCode::TOO_MANY_REQUESTS
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                error.kind = "rate_limit_error";
                error.code = Some("rate_limit_exceeded");
                error.retry_after = Some(1);
                Err(error)
            }
        }
    }
}

/// Cancels the job when the handler or its stream is dropped (the client left).
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

async fn health() -> Json {
    axum::Json(json!({"status": "ok"}))
}

type Json = axum::Json<Value>;

async fn metrics(State(s): State<Arc<Shared>>) -> String {
    let m = &s.metrics;
    format!(
        "# TYPE codelsi_requests_total counter\ncodelsi_requests_total {}\n# TYPE codelsi_rejected_total counter\ncodelsi_rejected_total {}\n# TYPE codelsi_queue_length gauge\ncodelsi_queue_length {}\n# TYPE codelsi_running gauge\ncodelsi_running {}\n# TYPE codelsi_generated_tokens_total counter\ncodelsi_generated_tokens_total {}\n",
        m.requests.load(Relaxed),
        m.rejected.load(Relaxed),
        m.queued.load(Relaxed),
        m.running.load(Relaxed),
        m.generated_tokens.load(Relaxed),
    )
}

async fn models(State(s): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(e) = s.authorize(&headers) {
        return e.into_response();
    }
    let entry = |id: &str| json!({"id": id, "object": "model", "created": s.started, "owned_by": "codelsi"});
    let data: Vec<Value> = std::iter::once(entry(&s.base_id))
        .chain(s.adapter_ids.iter().map(|id| entry(id)))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// A body that could not be read: too large (413) or cut off.
fn unreadable(rejection: BytesRejection) -> ApiError {
    ApiError::invalid(rejection.body_text()).status(rejection.status())
}

/// The JSON body as `T`, or a 400 that says what is wrong with it.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid: {e}")))
}

/// The body of a request from a client with the key, as `T`.
fn accept<T: serde::de::DeserializeOwned>(
    s: &Shared,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    s.authorize(headers)?;
    parse(&body.map_err(unreadable)?)
}

/// Which endpoint a response is for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: ChatRequest = accept(&s, &headers, body)?;
        let adapters = s.adapters_of(&req.model)?;
        let top = if req.logprobs.unwrap_or(false) {
            Some(api::check_top_logprobs(req.top_logprobs)?)
        } else if req.top_logprobs.is_some_and(|k| k > 0) {
            return Err(ApiError::invalid("top_logprobs needs logprobs: true"));
        } else {
            None
        };
        let checked = req.sampling.check(top)?;
        let prompt = Prompt::Chat(api::messages(&req.messages)?);
        respond(&s, Kind::Chat, req.model, prompt, adapters, checked, top).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: CompletionRequest = accept(&s, &headers, body)?;
        let adapters = s.adapters_of(&req.model)?;
        if req.echo.unwrap_or(false) {
            return Err(ApiError::invalid("echo is not supported"));
        }
        let prompt = match req.prompt {
            PromptField::One(p) => p,
            PromptField::Many(mut v) if v.len() == 1 => v.remove(0),
            PromptField::Many(_) => {
                return Err(ApiError::invalid(
                    "prompt takes one string here (send one request per prompt)",
                ));
            }
        };
        let top = req
            .logprobs
            .map(|k| api::check_top_logprobs(Some(k)))
            .transpose()?;
        let checked = req.sampling.check(top)?;
        let prompt = match req.suffix {
            Some(suffix) => Prompt::Fim {
                prefix: prompt,
                suffix,
            },
            None => Prompt::Text(prompt),
        };
        respond(
            &s,
            Kind::Completion,
            req.model,
            prompt,
            adapters,
            checked,
            top,
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// What one response needs besides the outputs.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    /// `Some(k)`: report log-probabilities, with the `k` most likely tokens a position.
    top: Option<usize>,
}

/// Queues the job and answers: the whole output, or a stream of chunks.
async fn respond(
    s: &Shared,
    kind: Kind,
    model: String,
    prompt: Prompt,
    adapters: Vec<String>,
    checked: Checked,
    top: Option<usize>,
) -> Result<Response, ApiError> {
    let (mut rx, guard) = s.submit(prompt, adapters, &checked)?;
    // Errors found by the model's thread (a prompt past the context) still get their status.
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(ApiError::server("the model's thread stopped")),
    };
    let created = now();
    let prefix = if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let reply = Reply {
        kind,
        id: format!("{prefix}-{created:x}{:x}", s.metrics.requests.load(Relaxed)),
        created,
        model,
        top,
    };
    if checked.stream {
        let (n, usage) = (checked.n, checked.include_usage);
        return Ok(stream(reply, rx, guard, prompt_tokens, n, usage).into_response());
    }
    let mut outs: Vec<Option<Box<Finished>>> = (0..checked.n).map(|_| None).collect();
    while let Some(event) = rx.recv().await {
        match event {
            Event::Done { index, done } => outs[index] = Some(done),
            Event::Failed(e) => return Err(e),
            Event::Started { .. } | Event::Text { .. } => {}
        }
    }
    drop(guard);
    let outs: Vec<Box<Finished>> = outs
        .into_iter()
        .collect::<Option<_>>()
        .ok_or_else(|| ApiError::server("a generation ended before its output"))?;
    let completion_tokens: usize = outs.iter().map(|o| o.out.token_ids.len()).sum();
    let choices: Vec<Value> = outs
        .iter()
        .enumerate()
        .map(|(index, out)| reply.choice(index, out))
        .collect();
    Ok(axum::Json(json!({
        "id": reply.id,
        "object": if kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": reply.created,
        "model": reply.model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    }))
    .into_response())
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

impl Reply {
    /// One whole choice.
    fn choice(&self, index: usize, done: &Finished) -> Value {
        let out = &done.out;
        let finish = api::finish_reason(&out.stop_reason);
        let logprobs = self.top.map_or(Value::Null, |k| self.logprobs(done, k));
        match self.kind {
            Kind::Chat => json!({
                "index": index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
            Kind::Completion => json!({
                "index": index,
                "text": out.text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }),
        }
    }

    /// The log-probabilities in the endpoint's shape: chat's `content` list, or the legacy
    /// parallel lists.
    fn logprobs(&self, done: &Finished, k: usize) -> Value {
        let all = &done.out.token_logprobs;
        let lps = &all[..all.len().min(done.pieces.len())];
        let tops = || done.top.iter().map(move |t| t.iter().take(k));
        match self.kind {
            Kind::Chat => {
                let entry =
                    |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
                let content: Vec<Value> = done
                    .pieces
                    .iter()
                    .zip(lps)
                    .zip(tops())
                    .map(|((t, &lp), top)| {
                        let mut e = entry(t, lp);
                        e["top_logprobs"] = top.map(|(t, lp)| entry(t, *lp)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
            Kind::Completion => {
                let mut offset = 0;
                let offsets: Vec<usize> = done
                    .pieces
                    .iter()
                    .map(|p| {
                        let at = offset;
                        offset += p.len();
                        at
                    })
                    .collect();
                let top: Vec<Value> = tops()
                    .take(done.pieces.len())
                    .map(|top| {
                        let map: serde_json::Map<String, Value> =
                            top.map(|(t, lp)| (t.clone(), json!(lp))).collect();
                        Value::Object(map)
                    })
                    .collect();
                json!({
                    "tokens": done.pieces,
                    "token_logprobs": lps,
                    "top_logprobs": top,
                    "text_offset": offsets,
                })
            }
        }
    }
}

impl Reply {
    /// One chunk of a stream: new text or the finish of choice `index`.
    fn chunk(&self, index: usize, text: &str, role: bool, finish: Option<&str>) -> String {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if !text.is_empty() || role {
                    delta["content"] = json!(text);
                }
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": index, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        self.envelope(vec![choice], None)
    }

    fn envelope(&self, choices: Vec<Value>, usage: Option<Value>) -> String {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let mut chunk = json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk.to_string()
    }
}

/// A stream's state between events.
struct Streaming {
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    /// Dropped with the stream when the client leaves: the job is cancelled.
    _guard: CancelOnDrop,
    prompt_tokens: usize,
    completion_tokens: usize,
    include_usage: bool,
    /// Which choices have had their first chunk (chat's carries the role).
    opened: Vec<bool>,
    pending: std::collections::VecDeque<String>,
    finished: bool,
}

/// The answer as server-sent events: OpenAI's chunks, then `usage` when asked, then `[DONE]`.
fn stream(
    reply: Reply,
    rx: UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    prompt_tokens: usize,
    n: usize,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let state = Streaming {
        reply,
        rx,
        _guard: guard,
        prompt_tokens,
        completion_tokens: 0,
        include_usage,
        opened: vec![false; n],
        pending: Default::default(),
        finished: false,
    };
    Sse::new(futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.finished {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Text { index, text }) => {
                    let role = !std::mem::replace(&mut st.opened[index], true);
                    st.pending
                        .push_back(st.reply.chunk(index, &text, role, None));
                }
                Some(Event::Done { index, done }) => {
                    st.completion_tokens += done.out.token_ids.len();
                    let role = !std::mem::replace(&mut st.opened[index], true);
                    let finish = api::finish_reason(&done.out.stop_reason);
                    st.pending
                        .push_back(st.reply.chunk(index, "", role, Some(finish)));
                }
                Some(Event::Failed(e)) => {
                    // Headers are sent: the error goes in the stream, as OpenAI's does.
                    st.pending.push_back(e.body().to_string());
                    st.pending.push_back("[DONE]".into());
                    st.finished = true;
                }
                Some(Event::Started { .. }) => {}
                None => {
                    if st.include_usage {
                        let usage = usage(st.prompt_tokens, st.completion_tokens);
                        st.pending.push_back(st.reply.envelope(vec![], Some(usage)));
                    }
                    st.pending.push_back("[DONE]".into());
                    st.finished = true;
                }
            }
        }
    }))
}
