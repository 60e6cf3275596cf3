//! Tokenizers through the `tokenizers` crate: from an HF `tokenizer.json`, or rebuilt from GGUF
//! metadata (GPT-2-style byte-level BPE: vocabulary, merges, the pre-tokenizer that
//! `tokenizer.ggml.pre` names, special tokens). Chat templates are rendered with minijinja.

use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};

use super::gguf::GgufFile;
use crate::error::{Error, Result};

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A tokenizer with the model's special tokens and chat template. A clone has its own regex
/// caches: a thread encoding a lot wants its own clone (the import does).
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub bos_token_id: Option<u32>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
    source: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

// Pre-tokenizer regexes as llama.cpp (`llama-vocab.cpp`) and the models' tokenizer.json use them.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Json {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level(false),
    ]})
}

/// The pre-tokenizer a GGUF `tokenizer.ggml.pre` value implies.
fn gguf_pre_tokenizer(pre: &str) -> Option<Json> {
    Some(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        // GPT-2 split after splitting every digit apart (StarCoder family, SmolLM).
        "smollm" | "starcoder" | "refact" | "codeshell" | "command-r" | "exaone" | "minerva" => {
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true},
                byte_level(true),
            ]})
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "smaug-bpe" | "dbrx" => {
            split_then_bytes(LLAMA3_SPLIT)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" => split_then_bytes(QWEN2_SPLIT),
        _ => return None,
    })
}

impl Tokenizer {
    /// The tokenizer of a model path: an HF directory or a GGUF file (read, not loaded).
    pub fn from_model(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf(&GgufFile::open(path)?)
        }
    }

    /// From an HF model directory: `tokenizer.json` and, if present, `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            what: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Json = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| Error::Json {
                path: config_path.clone(),
                source,
            })?,
            Err(_) => json!({}),
        };
        // Special tokens are strings or `{"content": ...}` objects.
        let token_str = |key: &str| -> Option<String> {
            match config.get(key)? {
                Json::String(s) => Some(s.clone()),
                Json::Object(o) => o.get("content")?.as_str().map(String::from),
                _ => None,
            }
        };
        let bos_token = token_str("bos_token").unwrap_or_default();
        let eos_token = token_str("eos_token").unwrap_or_default();
        let bos_token_id = inner.token_to_id(&bos_token);
        let mut eos_token_ids: Vec<u32> = inner.token_to_id(&eos_token).into_iter().collect();
        // generation_config.json may list more end tokens (Llama 3's <|eot_id|>).
        if let Ok(text) = std::fs::read_to_string(dir.join("generation_config.json"))
            && let Ok(gen_cfg) = serde_json::from_str::<Json>(&text)
        {
            match gen_cfg.get("eos_token_id") {
                Some(Json::Number(n)) => eos_token_ids.extend(n.as_u64().map(|v| v as u32)),
                Some(Json::Array(a)) => {
                    eos_token_ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
                }
                _ => {}
            }
        }
        eos_token_ids.dedup();
        let chat_template = match config.get("chat_template") {
            Some(Json::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Self {
            inner,
            bos_token_id,
            eos_token_ids,
            add_bos: config
                .get("add_bos_token")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            chat_template,
            bos_token,
            eos_token,
            source: path,
        })
    }

    /// Rebuild the tokenizer a GGUF file describes.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let err = |what: String| Error::Tokenizer {
            path: gguf.path.clone(),
            what,
        };
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model `{model}` is not supported from GGUF yet (byte-level BPE `gpt2` \
                 is); load the model's HF directory, whose tokenizer.json carries it"
            )));
        }
        let pre = gguf
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let pre_tokenizer = gguf_pre_tokenizer(pre).ok_or_else(|| {
            err(format!(
                "pre-tokenizer `{pre}` (tokenizer.ggml.pre) is not supported"
            ))
        })?;
        let tokens = gguf.get_str_array("tokenizer.ggml.tokens")?;
        let merges = gguf.get_str_array("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match gguf
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.as_array())
        {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
        // Control (3) tokens are special; user-defined (4) ones are matched whole, not special.
        let added: Vec<Json> = tokens
            .iter()
            .zip(types.iter().chain(std::iter::repeat(&1)))
            .enumerate()
            .filter(|(_, (_, t))| **t == 3 || **t == 4)
            .map(|(id, (tok, t))| {
                json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": *t == 3})
            })
            .collect();
        let vocab: serde_json::Map<String, Json> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_string(), json!(i)))
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": merges},
        });
        let bytes = serde_json::to_vec(&spec).map_err(|e| err(e.to_string()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| err(e.to_string()))?;
        let id = |key: &str| gguf.get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let name_of = |id: Option<u32>| {
            id.and_then(|i| tokens.get(i as usize))
                .map(|s| s.to_string())
        };
        let bos_token_id = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        let mut eos_token_ids: Vec<u32> = eos.into_iter().collect();
        eos_token_ids.extend(id("tokenizer.ggml.eot_token_id"));
        eos_token_ids.dedup();
        Ok(Self {
            inner,
            bos_token_id,
            eos_token_ids,
            add_bos: gguf
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            chat_template: gguf
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(String::from),
            bos_token: name_of(bos_token_id).unwrap_or_default(),
            eos_token: name_of(eos).unwrap_or_default(),
            source: gguf.path.clone(),
        })
    }

    /// The files of an HF model directory that hold this tokenizer: `tokenizer.json`,
    /// `tokenizer_config.json` (special tokens, chat template) and `generation_config.json`
    /// (end tokens). `Tokenizer::from_hf_dir` and transformers read them back.
    pub fn hf_files(&self, model_max_length: usize) -> Result<Vec<(&'static str, Vec<u8>)>> {
        let err = |what: String| Error::Tokenizer {
            path: self.source.clone(),
            what,
        };
        let tokenizer = self
            .inner
            .to_string(false)
            .map_err(|e| err(e.to_string()))?;
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos_token": self.add_bos,
            "chat_template": self.chat_template,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
        });
        let generation = json!({
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
        });
        let pretty = |v: &Json| serde_json::to_vec_pretty(v).map_err(|e| err(e.to_string()));
        Ok(vec![
            ("tokenizer.json", tokenizer.into_bytes()),
            ("tokenizer_config.json", pretty(&config)?),
            ("generation_config.json", pretty(&generation)?),
        ])
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`; special tokens written in the text (`<|im_start|>`) become their ids.
    /// Prepends BOS if the model asks for it and `add_bos` is set.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                what: e.to_string(),
            })?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_bos && self.add_bos {
            ids.extend(self.bos_token_id);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| Error::Tokenizer {
                path: self.source.clone(),
                what: e.to_string(),
            })
    }

    /// The id of a token written as its text (`<|fim_prefix|>`), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Render `messages` with the model's chat template (as transformers' `apply_chat_template`).
    pub fn apply_chat_template(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            Error::ChatTemplate(format!("{} has no chat template", self.source.display()))
        })?;
        render_chat_template(
            template,
            messages,
            add_generation_prompt,
            &self.bos_token,
            &self.eos_token,
        )
    }
}

/// Render a Jinja chat template with the variables transformers passes.
pub fn render_chat_template(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    // Templates are written for Python's Jinja2: string methods such as `.strip()`.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| Error::ChatTemplate(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::ChatTemplate(e.to_string()))
}
