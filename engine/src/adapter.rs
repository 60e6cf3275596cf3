//! LoRA adapters: `y = W·x + (alpha/r)·B·(A·x)` on any of the seven projections of a Llama layer,
//! initialised as PEFT does (A Kaiming-uniform, B zeros), saved and loaded in the HF PEFT format
//! (`adapter_config.json` + `adapter_model.safetensors`, PEFT's key names) so adapters move
//! freely between codelsi and PEFT.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::files::{replace_dir, temp_beside, write_atomic};
use crate::io::WeightSource;
use crate::io::safetensors::SafetensorsWeights;
use crate::models::config::Config;

/// A projection of a decoder layer an adapter can attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// All seven, in layer order (PEFT's `all-linear` on a Llama model).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The HF module name (`q_proj`, …).
    pub fn name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// The HF parent module (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// `(in_features, out_features)` of the projection in a model.
    pub fn dims(self, c: &Config) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        match self {
            Target::Q => (h, q),
            Target::K | Target::V => (h, kv),
            Target::O => (q, h),
            Target::Gate | Target::Up => (h, i),
            Target::Down => (i, h),
        }
    }

    /// `all` (or PEFT's `all-linear`), `attn`, `mlp`, or a comma-separated list of names with or
    /// without `_proj` (`q,v` or `q_proj,v_proj`).
    pub fn parse_list(spec: &str) -> Result<Vec<Target>> {
        let spec = spec.trim();
        let mut out = match spec {
            "all" | "all-linear" => Target::ALL.to_vec(),
            "attn" => Target::ALL[..4].to_vec(),
            "mlp" => Target::ALL[4..].to_vec(),
            _ => {
                let mut v = Vec::new();
                for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    let name = part.strip_suffix("_proj").unwrap_or(part);
                    let t = Target::ALL
                        .into_iter()
                        .find(|t| t.name().strip_suffix("_proj") == Some(name))
                        .ok_or_else(|| {
                            Error::Setting(format!(
                                "unknown LoRA target `{part}` (use all, attn, mlp, or names \
                                 among q, k, v, o, gate, up, down)"
                            ))
                        })?;
                    v.push(t);
                }
                v
            }
        };
        out.sort();
        out.dedup();
        if out.is_empty() {
            return Err(Error::Setting("no LoRA targets given".into()));
        }
        Ok(out)
    }
}

/// The shape of an adapter, as PEFT's `LoraConfig` names it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: Vec<Target>,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r` (rsLoRA).
    pub rslora: bool,
}

impl Default for LoraConfig {
    /// r = 16, alpha = 32 on all seven projections (the CodeLSI paper's setting), dropout 0.05.
    fn default() -> Self {
        Self {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            targets: Target::ALL.to_vec(),
            rslora: false,
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 || self.rank > 1024 {
            return Err(Error::Setting(format!(
                "LoRA rank must be in 1..=1024, not {}",
                self.rank
            )));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Setting(format!(
                "LoRA alpha must be positive, not {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Setting(format!(
                "LoRA dropout must be in [0, 1), not {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Setting("no LoRA targets given".into()));
        }
        Ok(())
    }
}

/// One projection's adapter: `A: [r, in]`, `B: [out, r]` (PEFT's `lora_A.weight` and
/// `lora_B.weight`).
#[derive(Debug, Clone)]
pub struct LoraPair<B: Backend> {
    pub a: Tensor<B, 2>,
    pub b: Tensor<B, 2>,
}

/// A LoRA adapter for every layer of a model.
#[derive(Debug, Clone)]
pub struct Adapter<B: Backend> {
    pub config: LoraConfig,
    /// `layers[i][target]`, `None` where the adapter does not touch the projection.
    pub layers: Vec<[Option<LoraPair<B>>; 7]>,
    /// Tokens the adapter adds after the base vocabulary, with their own trained rows (a
    /// regression adapter's number tokens, [`crate::regress`]).
    pub new_tokens: Option<NewTokens<B>>,
}

/// The rows of tokens an adapter adds: ids `vocab..vocab + n` of the adapted model. Both are
/// `[n, hidden]`: `embed` is their input embedding, `head` their output (LM-head) rows.
#[derive(Debug, Clone)]
pub struct NewTokens<B: Backend> {
    pub embed: Tensor<B, 2>,
    pub head: Tensor<B, 2>,
}

impl<B: Backend> NewTokens<B> {
    /// Rows from the host: `embed` and `head` each `[n, hidden]` row-major.
    pub fn from_host(
        embed: Vec<f32>,
        head: Vec<f32>,
        hidden: usize,
        device: &B::Device,
    ) -> Result<Self> {
        let rows = embed.len() / hidden.max(1);
        if rows == 0 || embed.len() != rows * hidden || head.len() != embed.len() {
            return Err(Error::InvalidArgument(format!(
                "new-token rows of {} and {} values for a hidden size of {hidden}",
                embed.len(),
                head.len()
            )));
        }
        Ok(Self {
            embed: Tensor::from_data(TensorData::new(embed, [rows, hidden]), device),
            head: Tensor::from_data(TensorData::new(head, [rows, hidden]), device),
        })
    }
}

/// The safetensors keys of [`NewTokens`]; not PEFT's, which has no such module.
const NEW_TOKENS_EMBED: &str = "codelsi.new_tokens.embed";
const NEW_TOKENS_HEAD: &str = "codelsi.new_tokens.head";

/// PEFT's key of a layer's projection, without the `.lora_A.weight` suffix.
fn peft_prefix(layer: usize, t: Target) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}",
        t.parent(),
        t.name()
    )
}

impl<B: Backend> Adapter<B> {
    /// A fresh adapter as PEFT initialises one: A Kaiming-uniform with a = √5 (bound
    /// `1/√in`), B zeros, so the adapted model starts equal to the base.
    pub fn init(config: LoraConfig, model: &Config, seed: u64, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let r = config.rank;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for _ in 0..model.num_hidden_layers {
            let mut slots: [Option<LoraPair<B>>; 7] = Default::default();
            for &t in &config.targets {
                let (inp, out) = t.dims(model);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                slots[t.index()] = Some(LoraPair {
                    a: Tensor::from_data(TensorData::new(a, [r, inp]), device),
                    b: Tensor::zeros([out, r], device),
                });
            }
            layers.push(slots);
        }
        Ok(Self {
            config,
            layers,
            new_tokens: None,
        })
    }

    pub fn get(&self, layer: usize, t: Target) -> Option<&LoraPair<B>> {
        self.layers.get(layer)?[t.index()].as_ref()
    }

    pub fn scale(&self) -> f32 {
        self.config.scale()
    }

    /// Every `(PEFT key, tensor)`, in a fixed order.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor<B, 2>)> {
        let mut out = Vec::new();
        for (i, slots) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &slots[t.index()] {
                    let prefix = peft_prefix(i, t);
                    out.push((format!("{prefix}.lora_A.weight"), &p.a));
                    out.push((format!("{prefix}.lora_B.weight"), &p.b));
                }
            }
        }
        if let Some(n) = &self.new_tokens {
            out.push((NEW_TOKENS_EMBED.into(), &n.embed));
            out.push((NEW_TOKENS_HEAD.into(), &n.head));
        }
        out
    }

    /// Every tensor, mutable, in the order of [`named_tensors`](Self::named_tensors).
    pub fn tensors_mut(&mut self) -> Vec<&mut Tensor<B, 2>> {
        let mut out = Vec::new();
        for slots in &mut self.layers {
            // `Target::ALL` is index order, so this walks slots as `named_tensors` does.
            for p in slots.iter_mut().flatten() {
                out.push(&mut p.a);
                out.push(&mut p.b);
            }
        }
        if let Some(n) = &mut self.new_tokens {
            out.push(&mut n.embed);
            out.push(&mut n.head);
        }
        out
    }

    /// Trainable values in the adapter.
    pub fn num_params(&self) -> usize {
        self.named_tensors()
            .iter()
            .map(|(_, t)| t.shape().num_elements())
            .sum()
    }

    /// The same adapter with every tensor mapped (to another backend, or marked for gradients).
    pub fn map<B2: Backend>(
        &self,
        mut f: impl FnMut(&Tensor<B, 2>) -> Tensor<B2, 2>,
    ) -> Adapter<B2> {
        Adapter {
            config: self.config.clone(),
            layers: self
                .layers
                .iter()
                .map(|slots| {
                    slots.clone().map(|p| {
                        p.map(|p| LoraPair {
                            a: f(&p.a),
                            b: f(&p.b),
                        })
                    })
                })
                .collect(),
            new_tokens: self.new_tokens.as_ref().map(|n| NewTokens {
                embed: f(&n.embed),
                head: f(&n.head),
            }),
        }
    }

    /// Load a PEFT LoRA adapter directory for a model of shape `model`.
    pub fn load_peft(dir: &Path, model: &Config, device: &B::Device) -> Result<Self> {
        Ok(HostAdapter::load_peft(dir, model)?.upload(device))
    }

    /// Write a PEFT adapter directory: `adapter_config.json` and `adapter_model.safetensors`
    /// (f32), plus `extra` files (name, contents) such as codelsi's own metadata. The directory is
    /// written beside `dir` and renamed into place, so a crash never leaves half an adapter.
    pub fn save_peft(&self, dir: &Path, base_model: &str, extra: &[(&str, Vec<u8>)]) -> Result<()> {
        let tmp = temp_beside(dir, "adapter")?;
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.write_peft_files(&tmp, base_model, extra)?;
        replace_dir(&tmp, dir)
    }

    /// Write the adapter's files into the existing directory `dir`, each through a temporary
    /// name and a rename (other files in `dir` are left alone).
    pub fn write_peft_files(
        &self,
        dir: &Path,
        base_model: &str,
        extra: &[(&str, Vec<u8>)],
    ) -> Result<()> {
        let cfg = PeftConfig::from_lora(&self.config, base_model);
        let json = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Json {
            path: dir.join("adapter_config.json"),
            source: e,
        })?;
        let tensors: Vec<(String, &Tensor<B, 2>)> = self.named_tensors();
        let weights = safetensors_bytes(&tensors)?;
        write_atomic(&dir.join("adapter_model.safetensors"), &weights)?;
        write_atomic(&dir.join("adapter_config.json"), &json)?;
        for (file, contents) in extra {
            write_atomic(&dir.join(file), contents)?;
        }
        Ok(())
    }
}

/// A LoRA pair on the host, row-major: `a` is `[rank, in]`, `b` is `[out, rank]`.
#[derive(Debug, Clone)]
pub struct HostPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// An adapter read into host memory: what `codelsi merge` works on without a GPU, and what
/// [`Adapter::load_peft`] uploads.
#[derive(Debug, Clone)]
pub struct HostAdapter {
    pub config: LoraConfig,
    /// The model shape the adapter was checked against.
    pub model: Config,
    pub layers: Vec<[Option<HostPair>; 7]>,
    /// `(rows, embed, head)` of the tokens the adapter adds, each `[rows, hidden]` row-major.
    pub new_tokens: Option<(usize, Vec<f32>, Vec<f32>)>,
}

impl HostAdapter {
    /// Read a PEFT LoRA adapter directory for a model of shape `model`.
    pub fn load_peft(dir: &Path, model: &Config) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let peft: PeftConfig = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: cfg_path.clone(),
            source,
        })?;
        let config = peft.to_lora(&cfg_path)?;
        config.validate().map_err(|e| Error::Malformed {
            path: cfg_path.clone(),
            what: e.to_string(),
        })?;
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.exists() {
            return Err(Error::Malformed {
                path: dir.into(),
                what: "no adapter_model.safetensors (only the safetensors format is read)".into(),
            });
        }
        let st = SafetensorsWeights::open_file(&weights_path)?;
        let mut expected = std::collections::BTreeSet::new();
        let r = config.rank;
        let mut layers = Vec::with_capacity(model.num_hidden_layers);
        for i in 0..model.num_hidden_layers {
            let mut slots: [Option<HostPair>; 7] = Default::default();
            for &t in &config.targets {
                let (inp, out) = t.dims(model);
                let prefix = peft_prefix(i, t);
                let mut load = |which: &str, shape: [usize; 2]| -> Result<Option<Vec<f32>>> {
                    // PEFT writes keys without the adapter name; older files kept `.default`.
                    let plain = format!("{prefix}.{which}.weight");
                    let named = format!("{prefix}.{which}.default.weight");
                    let found = match st.get(&plain)? {
                        Some(t) => Some(t),
                        None => st.get(&named)?,
                    };
                    let Some(host) = found else {
                        return Ok(None);
                    };
                    expected.insert(host.name.clone());
                    host.expect_shape(&shape)?;
                    Ok(Some(host.into_f32()))
                };
                let a = load("lora_A", [r, inp])?;
                let b = load("lora_B", [out, r])?;
                match (a, b) {
                    (Some(a), Some(b)) => slots[t.index()] = Some(HostPair { a, b }),
                    (None, None) => {}
                    _ => {
                        return Err(Error::Malformed {
                            path: weights_path.clone(),
                            what: format!("{prefix}: lora_A and lora_B must come together"),
                        });
                    }
                }
            }
            layers.push(slots);
        }
        let mut new_tokens = None;
        if let (Some(e), Some(h)) = (st.get(NEW_TOKENS_EMBED)?, st.get(NEW_TOKENS_HEAD)?) {
            let rows = e.shape.first().copied().unwrap_or(0);
            e.expect_shape(&[rows, model.hidden_size])?;
            h.expect_shape(&[rows, model.hidden_size])?;
            expected.insert(e.name.clone());
            expected.insert(h.name.clone());
            new_tokens = Some((rows, e.into_f32(), h.into_f32()));
        }
        let unknown: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| !expected.contains(*n))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Malformed {
                path: weights_path,
                what: format!(
                    "{} tensor(s) this model has no place for (wrong base model, or a PEFT \
                     feature codelsi does not read), first: {}",
                    unknown.len(),
                    unknown[0]
                ),
            });
        }
        if expected.is_empty() {
            return Err(Error::Malformed {
                path: weights_path,
                what: "no LoRA tensors for this model's layers".into(),
            });
        }
        Ok(Self {
            config,
            model: model.clone(),
            layers,
            new_tokens,
        })
    }

    /// The adapter on `device`.
    pub fn upload<B: Backend>(self, device: &B::Device) -> Adapter<B> {
        let r = self.config.rank;
        let layers = self
            .layers
            .into_iter()
            .map(|slots| {
                let mut out: [Option<LoraPair<B>>; 7] = Default::default();
                for (t, pair) in Target::ALL.into_iter().zip(slots) {
                    let Some(p) = pair else { continue };
                    let (inp, o) = t.dims(&self.model);
                    out[t.index()] = Some(LoraPair {
                        a: Tensor::from_data(TensorData::new(p.a, [r, inp]), device),
                        b: Tensor::from_data(TensorData::new(p.b, [o, r]), device),
                    });
                }
                out
            })
            .collect();
        let hidden = self.model.hidden_size;
        Adapter {
            config: self.config,
            layers,
            new_tokens: self.new_tokens.map(|(rows, embed, head)| NewTokens {
                embed: Tensor::from_data(TensorData::new(embed, [rows, hidden]), device),
                head: Tensor::from_data(TensorData::new(head, [rows, hidden]), device),
            }),
        }
    }

    /// `scale·B·A`, the adapter's change to the weight of `t` in `layer`, `[out, in]` row-major
    /// (HF layout), or `None` where the adapter does not touch it.
    pub fn delta(&self, layer: usize, t: Target) -> Option<Vec<f32>> {
        let p = self.layers.get(layer)?[t.index()].as_ref()?;
        let (inp, out) = t.dims(&self.model);
        let r = self.config.rank;
        let s = self.config.scale() as f64;
        let mut d = vec![0f32; out * inp];
        let mut row = vec![0f64; inp];
        for (o, d_row) in d.chunks_exact_mut(inp).enumerate() {
            row.iter_mut().for_each(|v| *v = 0.0);
            for k in 0..r {
                let b = p.b[o * r + k] as f64;
                if b == 0.0 {
                    continue;
                }
                for (acc, &a) in row.iter_mut().zip(&p.a[k * inp..(k + 1) * inp]) {
                    *acc += b * a as f64;
                }
            }
            for (dst, &v) in d_row.iter_mut().zip(&row) {
                *dst = (s * v) as f32;
            }
        }
        Some(d)
    }
}

/// A safetensors file (f32) holding `tensors`.
pub fn safetensors_bytes<B: Backend>(tensors: &[(String, &Tensor<B, 2>)]) -> Result<Vec<u8>> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (key, t) in tensors {
        let values = t
            .to_data()
            .into_vec::<f32>()
            .map_err(|e| Error::Internal(format!("{key}: {e:?}")))?;
        buffers.push((
            key.clone(),
            t.dims().to_vec(),
            bytemuck::cast_slice(&values).to_vec(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(k, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::Internal(format!("{k}: {e}")))
        })
        .collect::<Result<_>>()?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Internal(format!("writing safetensors: {e}")))
}

/// The fields of PEFT's `adapter_config.json` codelsi reads and writes. Unknown fields are
/// ignored on read; features that change the maths (DoRA, per-layer ranks, biases,
/// `fan_in_fan_out`) are refused with a clear error rather than silently dropped.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    lora_dropout: f32,
    target_modules: TargetModules,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    init_lora_weights: serde_json::Value,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl PeftConfig {
    fn from_lora(c: &LoraConfig, base_model: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: c.rank,
            lora_alpha: c.alpha,
            lora_dropout: c.dropout,
            target_modules: TargetModules::List(
                c.targets.iter().map(|t| t.name().to_string()).collect(),
            ),
            base_model_name_or_path: Some(base_model.into()),
            bias: Some("none".into()),
            fan_in_fan_out: false,
            use_rslora: c.rslora,
            use_dora: false,
            lora_bias: false,
            inference_mode: true,
            init_lora_weights: serde_json::Value::Bool(true),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            modules_to_save: None,
            layers_to_transform: None,
        }
    }

    fn to_lora(&self, path: &Path) -> Result<LoraConfig> {
        let refuse = |what: &str| {
            Err(Error::Malformed {
                path: path.into(),
                what: format!("{what} is not supported by codelsi"),
            })
        };
        if self.peft_type != "LORA" {
            return refuse(&format!("peft_type {}", self.peft_type));
        }
        if self.use_dora {
            return refuse("use_dora (DoRA)");
        }
        if self.lora_bias {
            return refuse("lora_bias");
        }
        if self.fan_in_fan_out {
            return refuse("fan_in_fan_out");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return refuse("rank_pattern/alpha_pattern (per-module ranks)");
        }
        if self.bias.as_deref().is_some_and(|b| b != "none") {
            return refuse("a trained bias");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save");
        }
        if self
            .layers_to_transform
            .as_ref()
            .is_some_and(|l| !l.is_null())
        {
            return refuse("layers_to_transform");
        }
        let targets = match &self.target_modules {
            TargetModules::One(s) => Target::parse_list(s),
            TargetModules::List(v) => Target::parse_list(&v.join(",")),
        }
        .map_err(|e| Error::Malformed {
            path: path.into(),
            what: e.to_string(),
        })?;
        Ok(LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            rslora: self.use_rslora,
        })
    }
}
