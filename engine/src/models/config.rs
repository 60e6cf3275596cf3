//! Model configuration: HF `config.json` (serde) and GGUF metadata map onto one checked [`Config`].
//!
//! Follows candle's `LlamaConfig::into_config`: a permissive serde struct with defaults, then a
//! validated runtime struct.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::io::gguf::{GgufFile, GgufWeights};

/// Model families that share the Llama block (RMSNorm, RoPE, GQA attention, SwiGLU MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1/2/3, CodeLlama, SmolLM (HF `LlamaForCausalLM`).
    Llama,
    /// Mistral without sliding windows beyond the context we run.
    Mistral,
    /// Qwen2: biases on q/k/v projections.
    Qwen2,
}

impl Architecture {
    pub const SUPPORTED: &str = "llama, codellama, mistral, smollm, qwen2";

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (HF `rope_type: linear`).
    Linear {
        factor: f32,
    },
    /// Llama 3.1's piecewise rescaling (HF `rope_type: llama3`).
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: usize,
    },
    /// Per-frequency divisors, as llama.cpp stores Llama 3.1 scaling (`rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// The checked runtime configuration of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    pub qkv_bias: bool,
}

// Bounds far above any real model; they stop a lying header from asking for absurd allocations.
const MAX_HIDDEN: usize = 1 << 16;
const MAX_LAYERS: usize = 1024;
const MAX_VOCAB: usize = 1 << 22;
const MAX_HEADS: usize = 1024;

impl Config {
    /// The weights of `file`, a GGUF of a model of this shape: the loader needs the head counts
    /// and whether the converter permuted q/k rows (Llama-arch GGUFs; Qwen2 GGUFs are not).
    pub fn gguf_weights<'a>(&self, file: &'a GgufFile) -> GgufWeights<'a> {
        GgufWeights {
            file,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads,
            unpermute_qk: matches!(
                self.architecture,
                Architecture::Llama | Architecture::Mistral
            ),
        }
    }

    /// A tiny model for tests.
    pub fn tiny() -> Self {
        Self {
            architecture: Architecture::Llama,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            vocab_size: 258,
            max_position_embeddings: 256,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::None,
            tie_word_embeddings: false,
            qkv_bias: false,
        }
    }

    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h;
        let embed = self.vocab_size * h * if self.tie_word_embeddings { 1 } else { 2 };
        per_layer * self.num_hidden_layers + embed + h
    }

    pub fn validate(self) -> Result<Self> {
        let bad = |what: String| Err(Error::Config(what));
        let dims = [
            ("hidden_size", self.hidden_size, MAX_HIDDEN),
            ("intermediate_size", self.intermediate_size, 8 * MAX_HIDDEN),
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, 1024),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ];
        for (name, v, max) in dims {
            if v == 0 || v > max {
                return bad(format!("{name} = {v} is outside 1..={max}"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim
            ));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return bad(format!(
                "rms_norm_eps {} is not in (0, 1)",
                self.rms_norm_eps
            ));
        }
        if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
            return bad(format!(
                "rope_theta {} is not a finite number above 1",
                self.rope_theta
            ));
        }
        if let RopeScaling::Factors(f) = &self.rope_scaling
            && f.len() != self.head_dim / 2
        {
            return bad(format!(
                "{} RoPE factors for head_dim {}",
                f.len(),
                self.head_dim
            ));
        }
        Ok(self)
    }

    /// RoPE inverse frequencies, one per pair of the head dimension, scaling applied
    /// (HF `_compute_default_rope_parameters` / `_compute_llama3_parameters`).
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base: Vec<f64> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / dim as f64))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => {
                base.iter().map(|&f| (f / *factor as f64) as f32).collect()
            }
            RopeScaling::Factors(div) => base
                .iter()
                .zip(div)
                .map(|(&f, &d)| (f / d as f64) as f32)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let (factor, low, high) = (
                    *factor as f64,
                    *low_freq_factor as f64,
                    *high_freq_factor as f64,
                );
                let old = *original_max_position as f64;
                let low_freq_wavelen = old / low;
                let high_freq_wavelen = old / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if medium {
                            let smooth = (old / wavelen - low) / (high - low);
                            ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                        } else {
                            scaled as f32
                        }
                    })
                    .collect()
            }
        }
    }
}

/// HF `config.json`, as permissive as the files in the wild.
#[derive(Debug, Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    rope_scaling: Option<HfRopeScaling>,
    /// transformers 5 moves `rope_theta` and the scaling into `rope_parameters`.
    rope_parameters: Option<HfRopeScaling>,
    #[serde(default)]
    tie_word_embeddings: bool,
    attention_bias: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct HfRopeScaling {
    #[serde(alias = "type")]
    rope_type: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
    rope_theta: Option<f64>,
}

fn default_max_pos() -> usize {
    4096
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}

impl HfRopeScaling {
    fn into_scaling(self) -> Result<RopeScaling> {
        let factor = self.factor.unwrap_or(1.0);
        match self.rope_type.as_deref().unwrap_or("default") {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor,
                low_freq_factor: self.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: self.high_freq_factor.unwrap_or(4.0),
                original_max_position: self.original_max_position_embeddings.unwrap_or(8192),
            }),
            other => Err(Error::Config(format!(
                "rope scaling `{other}` is not supported (default, linear and llama3 are)"
            ))),
        }
    }
}

impl Config {
    /// Read and check an HF `config.json`.
    pub fn from_hf_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.into(),
            source,
        })?;
        let arch_name = hf
            .architectures
            .first()
            .cloned()
            .or(hf.model_type.clone())
            .unwrap_or_default();
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    path: path.into(),
                    arch: arch_name,
                    supported: Architecture::SUPPORTED.into(),
                });
            }
        };
        let mut rope_theta = hf.rope_theta;
        let rope = hf.rope_scaling.or(hf.rope_parameters);
        let rope_scaling = match rope {
            Some(r) => {
                if let Some(theta) = r.rope_theta {
                    rope_theta = theta;
                }
                r.into_scaling()?
            }
            None => RopeScaling::None,
        };
        let heads = hf.num_attention_heads.max(1);
        Self {
            architecture,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_hidden_layers: hf.num_hidden_layers,
            num_attention_heads: hf.num_attention_heads,
            num_key_value_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / heads),
            vocab_size: hf.vocab_size,
            max_position_embeddings: hf.max_position_embeddings,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias: hf
                .attention_bias
                .unwrap_or(architecture == Architecture::Qwen2),
        }
        .validate()
    }

    /// The HF `config.json` of this model (as `codelsi merge` writes it), with the tokenizer's
    /// special token ids. Per-frequency RoPE factors (GGUF `rope_freqs.weight`) have no HF form.
    pub fn to_hf_json(
        &self,
        bos_token_id: Option<u32>,
        eos_token_ids: &[u32],
    ) -> Result<serde_json::Value> {
        use serde_json::json;
        let (arch, model_type) = match self.architecture {
            Architecture::Llama => ("LlamaForCausalLM", "llama"),
            Architecture::Mistral => ("MistralForCausalLM", "mistral"),
            Architecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position,
            }),
            RopeScaling::Factors(_) => {
                return Err(Error::Config(
                    "this model's RoPE scaling is stored as per-frequency factors \
                     (rope_freqs.weight), which an HF config.json cannot express; \
                     merge to GGUF instead"
                        .into(),
                ));
            }
        };
        let eos = match eos_token_ids {
            [] => serde_json::Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        let mut v = json!({
            "architectures": [arch],
            "model_type": model_type,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float16",
            "bos_token_id": bos_token_id,
            "eos_token_id": eos,
        });
        if self.architecture != Architecture::Qwen2 {
            v["attention_bias"] = json!(self.qkv_bias);
            v["mlp_bias"] = json!(false);
        }
        Ok(v)
    }

    /// Map GGUF `{arch}.*` metadata onto the config.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let arch_name = gguf.get_str("general.architecture")?.to_string();
        let architecture = match arch_name.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            _ => {
                return Err(Error::UnsupportedArchitecture {
                    path: gguf.path.clone(),
                    arch: arch_name,
                    supported: "llama, mistral, qwen2 (GGUF general.architecture)".into(),
                });
            }
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let usize_of = |k: &str| -> Result<usize> { Ok(gguf.get_u64(&key(k))? as usize) };
        let hidden_size = usize_of("embedding_length")?;
        let num_attention_heads = usize_of("attention.head_count")?;
        let num_key_value_heads =
            usize_of("attention.head_count_kv").unwrap_or(num_attention_heads);
        let head_dim = match gguf.get(&key("attention.key_length")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => hidden_size / num_attention_heads.max(1),
        };
        let vocab_size = match gguf.get(&key("vocab_size")) {
            Some(v) => v.as_u64().unwrap_or(0) as usize,
            None => gguf.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match (
            gguf.get(&key("rope.scaling.type")).and_then(|v| v.as_str()),
            gguf.get(&key("rope.scaling.factor"))
                .and_then(|v| v.as_f64()),
        ) {
            (Some("linear"), Some(f)) => RopeScaling::Linear { factor: f as f32 },
            (Some("none") | None, _) => RopeScaling::None,
            (Some(other), _) => {
                return Err(Error::Config(format!(
                    "GGUF rope scaling `{other}` is not supported (linear is)"
                )));
            }
        };
        let has_output = gguf.tensor("output.weight").is_some();
        Self {
            architecture,
            hidden_size,
            intermediate_size: usize_of("feed_forward_length")?,
            num_hidden_layers: usize_of("block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: usize_of("context_length").unwrap_or(4096),
            rms_norm_eps: gguf
                .get_f64(&key("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-6),
            rope_theta: gguf.get_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
            rope_scaling,
            tie_word_embeddings: !has_output,
            qkv_bias: gguf.tensor("blk.0.attn_q.bias").is_some(),
        }
        .validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let mut c = Config::tiny();
        c.head_dim = 64;
        let plain = c.rope_inv_freq();
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position: 32,
        };
        let scaled = c.rope_inv_freq();
        assert_eq!(plain[0], scaled[0], "highest frequency is unchanged");
        let last = plain.len() - 1;
        assert!(
            (plain[last] / 8.0 - scaled[last]).abs() < 1e-9,
            "lowest is divided by 8"
        );
    }

    #[test]
    fn validate_rejects_absurd_and_inconsistent_sizes() {
        let mut c = Config::tiny();
        c.hidden_size = usize::MAX;
        assert!(matches!(c.validate(), Err(Error::Config(_))));
        let mut c = Config::tiny();
        c.num_key_value_heads = 3;
        assert!(matches!(c.validate(), Err(Error::Config(_))));
    }
}
