//! The OpenAI request bodies `codelsi serve` accepts, checked into a [`Job`]'s settings, and the
//! error body every failure answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use codelsi_engine::generate::{GenerateOptions, StopReason};
use codelsi_engine::io::tokenizer::Message;
use codelsi_engine::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::json;

/// Completions one request may ask for (`n`).
pub const MAX_N: usize = 8;
/// Most likely tokens reported a position (`top_logprobs`, as OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// Stop strings a request may give (as OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// New tokens when a request does not say (editors usually do), within the context.
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// An error answered as OpenAI does: `{"error": {"message", "type", "code"}}` with a status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            ..Self::invalid(message)
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, seconds.into());
        }
        response
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A chat message's `content`: a string, or parts of which the text ones are read.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What `/v1/chat/completions` and `/v1/completions` share. Fields a client may send that
/// change nothing here (`user`, `presence_penalty` 0, …) are accepted and ignored.
#[derive(Deserialize)]
pub struct Sampling {
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt`: one string (a list of one string is taken too).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: PromptField,
    #[serde(default)]
    pub suffix: Option<String>,
    /// The legacy API's `logprobs`: how many of the most likely tokens to report.
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// A request's settings, checked.
pub struct Checked {
    pub options: GenerateOptions,
    /// `None`: what the context leaves, up to [`DEFAULT_MAX_TOKENS`].
    pub max_tokens: Option<usize>,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

impl Sampling {
    /// The settings, or the 400 a bad one gets. `top`: the log-probabilities asked for (the
    /// engine reports the chosen token's only when it lists at least one alternative).
    pub fn check(&self, top: Option<usize>) -> Result<Checked, ApiError> {
        let top_logprobs = top.map_or(0, |k| k.max(1));
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m < 1 => {
                return Err(ApiError::invalid(format!(
                    "max_tokens must be at least 1, not {m}"
                )));
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        };
        let n = match self.n.unwrap_or(1) {
            n if (1..=MAX_N as i64).contains(&n) => n as usize,
            n => {
                return Err(ApiError::invalid(format!(
                    "n must be between 1 and {MAX_N}, not {n}"
                )));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(format!(
                "temperature must be between 0 and 2, not {temperature}"
            )));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(format!(
                "top_p must be in (0, 1], not {top_p}"
            )));
        }
        let stop_strings = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop_strings.len() > MAX_STOPS || stop_strings.iter().any(String::is_empty) {
            return Err(ApiError::invalid(format!(
                "stop takes at most {MAX_STOPS} strings, none of them empty"
            )));
        }
        let seed = self.seed.unwrap_or(0).unsigned_abs();
        let options = GenerateOptions {
            max_tokens: max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            sampling: SamplingParams {
                temperature,
                top_p,
                seed,
                ..SamplingParams::default()
            },
            stop_strings,
            top_logprobs,
        };
        options
            .sampling
            .validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(Checked {
            options,
            max_tokens,
            n,
            stream: self.stream.unwrap_or(false),
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// `top_logprobs` (or the legacy `logprobs` count), checked.
pub fn check_top_logprobs(asked: Option<i64>) -> Result<usize, ApiError> {
    match asked.unwrap_or(0) {
        k if (0..=MAX_TOP_LOGPROBS as i64).contains(&k) => Ok(k as usize),
        k => Err(ApiError::invalid(format!(
            "top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, not {k}"
        ))),
    }
}

/// The chat messages as the template takes them; every message's text parts joined.
pub fn messages(list: &[ChatMessage]) -> Result<Vec<Message>, ApiError> {
    if list.is_empty() {
        return Err(ApiError::invalid("messages must not be empty"));
    }
    list.iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant"
            ) {
                return Err(ApiError::invalid(format!(
                    "a message's role is system, user or assistant, not `{}`",
                    m.role
                )));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ApiError::invalid(format!(
                            "content parts of type `{}` are not supported (text only)",
                            p.kind
                        )));
                    }
                    parts.iter().filter_map(|p| p.text.as_deref()).collect()
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// OpenAI's `finish_reason` for how a generation ended.
pub fn finish_reason(stop: &StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}
