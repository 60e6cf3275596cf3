//! The Llama family (Llama 1-3, CodeLlama, Mistral, SmolLM, Qwen2): RMSNorm, RoPE (rotate-half,
//! as HF `modeling_llama.py`), grouped-query attention with a KV cache, SwiGLU MLP, tied or
//! untied LM head. Generic over any [`KernelBackend`]; weights quantised or not.

use burn::backend::Autodiff;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};

use super::config::Config;
pub use super::kv_cache::{KvCache, LayerCache};
use super::{Dropout, Embedding, Linear, LinearWeight, LoraApply, RmsNorm};
use crate::adapter::{Adapter, Target};
use crate::error::{Error, Result};
use crate::io::WeightSource;
use crate::kernels::cpu::mix64;
use crate::kernels::{KernelBackend, to_dtype};
use crate::quant::QFormat;

/// One decoder layer: grouped-query attention and a SwiGLU MLP, each behind an RMSNorm and
/// with its residual.
#[derive(Debug, Clone)]
pub struct DecoderLayer<B: KernelBackend> {
    pub input_layernorm: RmsNorm<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    /// The seven projections, in [`Target::ALL`] order: q, k, v, o, gate, up, down.
    pub projections: [Linear<B>; 7],
}

/// What a layer's forward reads besides its input: the model's shape, the RoPE tables and mask
/// of the positions being computed, the adapters, and which layer this is.
#[derive(Debug)]
pub struct LayerCtx<'a, B: KernelBackend> {
    pub config: &'a Config,
    pub index: usize,
    pub rope: &'a (Tensor<B, 2>, Tensor<B, 2>),
    pub mask: Option<&'a Tensor<B, 4>>,
    pub adapters: Adapters<'a, B>,
    /// Rows of one batch on different adapters: for each batch row, the indices in
    /// `adapters.list` of the adapters it adds. `None`: every row adds every adapter.
    pub rows: Option<&'a [Vec<usize>]>,
    /// Each row's one new position has its own RoPE position (row `b`'s is row `b` of the
    /// tables): rows of a running batch sit at their own positions, whatever their padding.
    pub rope_rows: bool,
}

// Manual impls: a derive would require `B: Copy`.
impl<B: KernelBackend> Clone for LayerCtx<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: KernelBackend> Copy for LayerCtx<'_, B> {}

/// Progress while loading: `(tensors done, tensors in all)`.
pub type LoadProgress<'a> = &'a mut dyn FnMut(usize, usize);

#[derive(Debug, Clone)]
pub struct Llama<B: KernelBackend> {
    pub config: Config,
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    pub lm_head: Linear<B>,
    inv_freq: Vec<f32>,
    device: B::Device,
}

/// LoRA adapters applied in a forward pass. When training (`train` holds the pass's dropout
/// seed), the first is the one being trained: it alone gets dropout, and its up-projection is
/// fused with the base product.
#[derive(Debug)]
pub struct Adapters<'a, B: KernelBackend> {
    pub list: &'a [&'a Adapter<B>],
    /// `Some(seed)` in training: each projection's dropout mask is a function of the seed, the
    /// layer and the projection, so a layer run again (gradient checkpointing) gets the masks of
    /// its first run.
    pub train: Option<u64>,
}

// Manual impls: a derive would require `B: Copy`.
impl<B: KernelBackend> Clone for Adapters<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: KernelBackend> Copy for Adapters<'_, B> {}

impl<'a, B: KernelBackend> Adapters<'a, B> {
    pub fn none() -> Self {
        Self {
            list: &[],
            train: None,
        }
    }

    fn on(&self, layer: usize, t: Target) -> Vec<LoraApply<'a, B>> {
        self.list
            .iter()
            .enumerate()
            .filter_map(|(i, a)| {
                a.get(layer, t).map(|pair| LoraApply {
                    pair,
                    scale: a.scale(),
                    dropout: match self.train {
                        Some(seed) if i == 0 => Some(Dropout {
                            p: a.config.dropout,
                            seed: mix64(mix64(seed ^ layer as u64) ^ t as u64),
                        }),
                        _ => None,
                    },
                })
            })
            .collect()
    }
}

/// RoPE tables and the segment mask of a packed sequence, shared by its layers.
#[derive(Debug, Clone)]
pub struct PackedInputs<B: KernelBackend> {
    rope: (Tensor<B, 2>, Tensor<B, 2>),
    mask: Tensor<B, 4>,
}

/// Examples packed into one sequence for training: each token's position within its example and
/// the example it belongs to (attention never crosses examples).
#[derive(Debug, Clone, Copy)]
pub struct Packed<'a> {
    pub tokens: &'a [u32],
    pub positions: &'a [usize],
    pub segments: &'a [u32],
    /// `parents[s]`: the segment that segment `s` also sees (a shared prefix); may be empty.
    pub parents: &'a [Option<u32>],
}

/// RoPE tables for `positions`: `(cos, sin)`, each `[len, head_dim]` (the frequencies repeated
/// for both halves, as HF builds them).
fn rope_tables(
    inv_freq: &[f32],
    positions: impl ExactSizeIterator<Item = usize>,
) -> (Vec<f32>, Vec<f32>) {
    let half = inv_freq.len();
    let len = positions.len();
    let mut cos = Vec::with_capacity(len * 2 * half);
    let mut sin = Vec::with_capacity(len * 2 * half);
    for p in positions {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = p as f64 * f as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}

impl<B: KernelBackend> Llama<B> {
    /// Load from HF-named weights. `quantize` quantises f32/f16/bf16 (and K-quant) linear weights
    /// to a kernel format at load; weights already in a kernel format stay as they are.
    pub fn load(
        config: Config,
        source: &dyn WeightSource,
        quantize: Option<QFormat>,
        device: &B::Device,
        progress: LoadProgress<'_>,
    ) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let total = c.num_hidden_layers + 2;
        let embed_host = source.require("model.embed_tokens.weight")?;
        let embed_tokens = Embedding::load(&embed_host, c.vocab_size, h)?;
        progress(1, total);

        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear<B>> {
            let w = source.require(&format!("{name}.weight"))?;
            w.expect_shape(&[out, inp])?;
            let b = if bias {
                Some(source.require(&format!("{name}.bias"))?)
            } else {
                None
            };
            Linear::load(w, b, quantize, device)
        };
        let norm = |name: &str| RmsNorm::load(source.require(name)?, h, c.rms_norm_eps, device);

        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let projections = Target::ALL.map(|t| {
                let (inp, out) = t.dims(c);
                let bias = c.qkv_bias && matches!(t, Target::Q | Target::K | Target::V);
                linear(&format!("{p}.{}.{}", t.parent(), t.name()), out, inp, bias)
            });
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                projections: try_array(projections)?,
            });
            progress(i + 2, total);
        }
        let lm_head = match source.get("lm_head.weight")? {
            Some(w) if !c.tie_word_embeddings => {
                w.expect_shape(&[c.vocab_size, h])?;
                Linear::load(w, None, quantize, device)?
            }
            _ => Linear::load(embed_host, None, quantize, device)?,
        };
        let norm = norm("model.norm.weight")?;
        progress(total, total);
        let inv_freq = config.rope_inv_freq();
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            device: device.clone(),
            config,
        })
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The same model with every quantised weight dequantised to f32 (see [`Linear::to_dense`]).
    pub fn to_dense(&self) -> Self {
        let mut m = self.clone();
        for lin in m.layers.iter_mut().flat_map(|l| &mut l.projections) {
            *lin = lin.to_dense();
        }
        m.lm_head = m.lm_head.to_dense();
        m
    }

    /// The dtype of this model's KV cache: the backend's compact one
    /// ([`KernelBackend::kv_cache_dtype`]) where the key projection is block-quantised (its
    /// 8-bit activations on the CPU path already round far more than f16 does), f32 for f32
    /// and 16-bit weights, whose outputs match transformers' within 1e-4.
    pub fn kv_cache_dtype(&self) -> DType {
        let quantised = self.layers.first().is_some_and(|l| {
            matches!(&l.projections[Target::K.index()].weight, LinearWeight::Quantized(q) if !q.format.is_half())
        });
        if quantised {
            B::kv_cache_dtype(&self.device)
        } else {
            DType::F32
        }
    }

    /// Bytes of the KV cache of one sequence at `positions` (keys and values of every layer).
    pub fn kv_cache_bytes(&self, positions: usize) -> usize {
        let c = &self.config;
        let elem = self.kv_cache_dtype().size();
        2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elem * positions
    }

    /// A KV cache for `capacity` positions (at most the model's context length).
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache<B> {
        let c = &self.config;
        let capacity = capacity.min(c.max_position_embeddings).max(1);
        let shape = [batch, c.num_key_value_heads, capacity, c.head_dim];
        let spare = Tensor::<B, 4>::empty([1, 1, 1, 1], &self.device);
        let dtype = self.kv_cache_dtype();
        let layers = (0..c.num_hidden_layers)
            .map(|_| LayerCache {
                keys: Tensor::zeros(shape, (&self.device, dtype)),
                values: Tensor::zeros(shape, (&self.device, dtype)),
                spare: spare.clone(),
            })
            .collect();
        KvCache {
            layers,
            len: 0,
            capacity,
        }
    }

    /// Bytes of weights in device memory (projections with their biases, norms, the head).
    pub fn device_bytes(&self) -> usize {
        let norm = |n: &RmsNorm<B>| 4 * n.weight.shape().num_elements();
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| {
                let linears: usize = l.projections.iter().map(Linear::device_bytes).sum();
                linears + norm(&l.input_layernorm) + norm(&l.post_attention_layernorm)
            })
            .sum();
        per_layer + self.lm_head.device_bytes() + norm(&self.norm)
    }

    /// Run `token_ids` (one sequence) through the model after the `cache.len` positions already
    /// in the cache, and append them to it. Returns the logits of the last position
    /// (`[1, vocab]`), or of every new position when `all_logits` (`[seq, vocab]`).
    pub fn forward(
        &self,
        token_ids: &[u32],
        cache: &mut KvCache<B>,
        all_logits: bool,
    ) -> Result<Tensor<B, 2>> {
        self.forward_with(token_ids, cache, all_logits, Adapters::none())
    }

    /// [`forward`](Self::forward) with LoRA adapters.
    pub fn forward_with(
        &self,
        token_ids: &[u32],
        cache: &mut KvCache<B>,
        all_logits: bool,
        adapters: Adapters<'_, B>,
    ) -> Result<Tensor<B, 2>> {
        if cache.batch() != 1 {
            return Err(Error::Internal(format!(
                "a single sequence needs a KV cache of batch 1, not {}",
                cache.batch()
            )));
        }
        let seq = token_ids.len();
        let x = self.forward_rows(token_ids, &[0], cache, adapters, None)?;
        let h = self.config.hidden_size;
        let x = if all_logits {
            x
        } else {
            x.slice([0..1, seq - 1..seq, 0..h])
        };
        Ok(self.head(x))
    }

    /// Several sequences advanced together, as one batch: `token_ids` is `[batch, seq]` row by
    /// row, and the sequences were left-padded to one length, `pads[b]` positions for row `b`
    /// (the pad positions are never attended to). Returns the logits of each row's last
    /// position, `[batch, vocab]`.
    ///
    /// Every row shares the positions `cache.len..` for RoPE: a row's padding shifts all of its
    /// positions by the same amount, and RoPE attention depends only on the distance between
    /// positions, so a padded row computes what it would alone.
    pub fn forward_batch(
        &self,
        token_ids: &[u32],
        pads: &[usize],
        cache: &mut KvCache<B>,
        adapters: Adapters<'_, B>,
    ) -> Result<Tensor<B, 2>> {
        self.forward_batch_rows(token_ids, pads, cache, adapters, None)
    }

    /// [`forward_batch`](Self::forward_batch) with each row on its own adapters: `rows[b]`
    /// lists the indices in `adapters.list` that row `b` adds, in its stack's order (the base
    /// product is shared by every row; the adapters' small products run row by row). Every row
    /// advances one position, at its own RoPE position (`cache.len - pads[b]`): a running
    /// batch's rows keep the positions they have alone.
    pub fn forward_batch_rows(
        &self,
        token_ids: &[u32],
        pads: &[usize],
        cache: &mut KvCache<B>,
        adapters: Adapters<'_, B>,
        rows: Option<&[Vec<usize>]>,
    ) -> Result<Tensor<B, 2>> {
        let batch = pads.len();
        if let Some(rows) = rows
            && (rows.len() != batch || rows.iter().flatten().any(|&i| i >= adapters.list.len()))
        {
            return Err(Error::Internal(format!(
                "adapters for {} rows (of {} adapters) in a batch of {batch}",
                rows.len(),
                adapters.list.len()
            )));
        }
        if batch == 0 || cache.batch() != batch || !token_ids.len().is_multiple_of(batch) {
            return Err(Error::Internal(format!(
                "a batch of {batch} rows with {} tokens and a KV cache of batch {}",
                token_ids.len(),
                cache.batch()
            )));
        }
        let seq = token_ids.len() / batch;
        let x = self.forward_rows(token_ids, pads, cache, adapters, rows)?;
        let h = self.config.hidden_size;
        let last = x
            .slice([0..batch, seq - 1..seq, 0..h])
            .reshape([1, batch, h]);
        Ok(self.head(last))
    }

    /// The decoder over `[batch, seq]` tokens after the cached positions; appends them to the
    /// cache and returns the final hidden states, `[batch, seq, hidden]`.
    fn forward_rows(
        &self,
        token_ids: &[u32],
        pads: &[usize],
        cache: &mut KvCache<B>,
        adapters: Adapters<'_, B>,
        rows: Option<&[Vec<usize>]>,
    ) -> Result<Tensor<B, 3>> {
        let batch = pads.len();
        let seq = token_ids.len() / batch;
        if seq == 0 {
            return Err(Error::InvalidArgument(
                "forward of an empty sequence".into(),
            ));
        }
        let h = self.config.hidden_size;
        let x = self.embed(token_ids)?.reshape([batch, seq, h]);
        self.forward_embedded_rows(x, pads, cache, adapters, rows)
    }

    /// The decoder over input embeddings (tokens the embedding table does not hold, such as an
    /// adapter's new tokens, come in this way) after the cached positions; appends them to the
    /// cache. Rows are left-padded by `pads` as in [`forward_batch`](Self::forward_batch).
    /// Returns the final hidden states before the last norm.
    ///
    /// # Shapes
    /// `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward_embedded(
        &self,
        x: Tensor<B, 3>,
        pads: &[usize],
        cache: &mut KvCache<B>,
        adapters: Adapters<'_, B>,
    ) -> Result<Tensor<B, 3>> {
        self.forward_embedded_rows(x, pads, cache, adapters, None)
    }

    fn forward_embedded_rows(
        &self,
        x: Tensor<B, 3>,
        pads: &[usize],
        cache: &mut KvCache<B>,
        adapters: Adapters<'_, B>,
        rows: Option<&[Vec<usize>]>,
    ) -> Result<Tensor<B, 3>> {
        let [batch, seq, _] = x.dims();
        if batch != pads.len() || cache.batch() != batch {
            return Err(Error::Internal(format!(
                "{batch} rows of embeddings with {} pads and a KV cache of batch {}",
                pads.len(),
                cache.batch()
            )));
        }
        if seq == 0 {
            return Err(Error::InvalidArgument(
                "forward of an empty sequence".into(),
            ));
        }
        if cache.len + seq > cache.capacity {
            return Err(Error::InvalidArgument(format!(
                "{} positions exceed the KV cache of {} (context length {})",
                cache.len + seq,
                cache.capacity,
                self.config.max_position_embeddings
            )));
        }
        let past = cache.len;
        // A running batch's rows (`rows`) each sit at their own position: the positions after
        // their own (unpadded) ones, as each would alone.
        let rope = match rows {
            Some(_) if seq == 1 => self.rope(pads.iter().map(|&pad| past - pad.min(past))),
            Some(_) => {
                return Err(Error::Internal(format!(
                    "a running batch advances one position a step, not {seq}"
                )));
            }
            None => self.rope(past..past + seq),
        };
        // A single new position of unpadded rows sees everything: no mask.
        let mask = if pads.iter().all(|&p| p == 0) {
            (seq > 1).then(|| self.padded_mask(&[0], past, seq))
        } else {
            Some(self.padded_mask(pads, past, seq))
        };
        let mut x = x;
        for (index, (layer, kv)) in self.layers.iter().zip(&mut cache.layers).enumerate() {
            let ctx = LayerCtx {
                config: &self.config,
                index,
                rope: &rope,
                mask: mask.as_ref(),
                adapters,
                rows,
                rope_rows: rows.is_some(),
            };
            x = layer.forward(x, ctx, Some((kv, past)));
        }
        cache.len += seq;
        Ok(x)
    }

    /// The training forward: examples packed in one sequence, no cache. Returns the logits of
    /// every position, `[seq, vocab]`.
    pub fn forward_packed(
        &self,
        packed: Packed<'_>,
        adapters: Adapters<'_, B>,
    ) -> Result<Tensor<B, 2>> {
        let inputs = self.packed_inputs(packed, DType::F32)?;
        let mut x = self.embed(packed.tokens)?;
        for i in 0..self.layers.len() {
            x = self.layer_packed(i, x, &inputs, adapters);
        }
        Ok(self.head(x))
    }

    /// What every layer of a packed forward shares: RoPE tables and the segment mask, in
    /// `dtype`, the activations' type. Checks the packing.
    pub fn packed_inputs(&self, packed: Packed<'_>, dtype: DType) -> Result<PackedInputs<B>> {
        let seq = packed.tokens.len();
        if seq == 0 || packed.positions.len() != seq || packed.segments.len() != seq {
            return Err(Error::Internal(format!(
                "packed sequence of {seq} tokens with {} positions and {} segment ids",
                packed.positions.len(),
                packed.segments.len()
            )));
        }
        if let Some(&p) = packed
            .positions
            .iter()
            .find(|&&p| p >= self.config.max_position_embeddings)
        {
            return Err(Error::InvalidArgument(format!(
                "position {p} is past the model's context of {}",
                self.config.max_position_embeddings
            )));
        }
        let (cos, sin) = self.rope(packed.positions.iter().copied());
        Ok(PackedInputs {
            rope: (to_dtype(cos, dtype), to_dtype(sin, dtype)),
            mask: to_dtype(self.segment_mask(packed.segments, packed.parents), dtype),
        })
    }

    /// Token embeddings, `[1, seq, hidden]`.
    pub fn embed(&self, token_ids: &[u32]) -> Result<Tensor<B, 3>> {
        let h = self.config.hidden_size;
        let embedded = self.embed_tokens.lookup(token_ids)?;
        Ok(Tensor::from_data(
            TensorData::new(embedded, [1, token_ids.len(), h]),
            &self.device,
        ))
    }

    /// Decoder layer `i` of a packed forward (training drives the layers one by one for
    /// gradient checkpointing).
    pub fn layer_packed(
        &self,
        i: usize,
        x: Tensor<B, 3>,
        inputs: &PackedInputs<B>,
        adapters: Adapters<'_, B>,
    ) -> Tensor<B, 3> {
        let ctx = LayerCtx {
            config: &self.config,
            index: i,
            rope: &inputs.rope,
            mask: Some(&inputs.mask),
            adapters,
            rows: None,
            rope_rows: false,
        };
        self.layers[i].forward(x, ctx, None)
    }

    /// `(cos, sin)` on the device for `positions`.
    fn rope(
        &self,
        positions: impl ExactSizeIterator<Item = usize>,
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let seq = positions.len();
        let hd = self.config.head_dim;
        let (cos, sin) = rope_tables(&self.inv_freq, positions);
        (
            Tensor::from_data(TensorData::new(cos, [seq, hd]), &self.device),
            Tensor::from_data(TensorData::new(sin, [seq, hd]), &self.device),
        )
    }

    /// The final norm alone (what the LM head and an adapter's new-token rows read).
    ///
    /// # Shapes
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn final_norm(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.norm.forward(x)
    }

    /// Final norm and LM head: `[1, rows, hidden]` → `[rows, vocab]`.
    pub fn head(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let x = self.norm.forward(x);
        let rows = x.dims()[1];
        self.lm_head
            .forward(x)
            .reshape([rows, self.config.vocab_size])
    }

    /// Additive mask `[1, 1, rep * seq, seq]` for packed examples: position i sees j when j <= i
    /// and j belongs to i's segment or to the prefix that segment shares (`parents`).
    fn segment_mask(&self, segments: &[u32], parents: &[Option<u32>]) -> Tensor<B, 4> {
        let rep = self.config.num_attention_heads / self.config.num_key_value_heads;
        let seq = segments.len();
        let mut m = Vec::with_capacity(rep * seq * seq);
        for _ in 0..rep {
            for i in 0..seq {
                m.extend((0..seq).map(|j| {
                    let (si, sj) = (segments[i], segments[j]);
                    let shared = parents.get(si as usize).copied().flatten() == Some(sj);
                    if j <= i && (si == sj || shared) {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                }));
            }
        }
        Tensor::from_data(TensorData::new(m, [1, 1, rep * seq, seq]), &self.device)
    }

    /// Additive mask `[pads.len(), 1, rep * seq, past + seq]` for grouped queries (see
    /// [`Attention::forward`]) of left-padded rows: causal, and no position of row `b` sees its
    /// first `pads[b]` (padding). A padding position sees the padding before it, so no row of
    /// the softmax is empty (that would give NaN, and NaN times a zero weight is still NaN).
    /// `pads = [0]` is the plain causal mask, which broadcasts over any batch.
    fn padded_mask(&self, pads: &[usize], past: usize, seq: usize) -> Tensor<B, 4> {
        let rep = self.config.num_attention_heads / self.config.num_key_value_heads;
        let total = past + seq;
        let mut m = Vec::with_capacity(pads.len() * rep * seq * total);
        for &pad in pads {
            for _ in 0..rep {
                for i in past..total {
                    m.extend((0..total).map(|j| {
                        if j <= i && (j >= pad || i < pad) {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    }));
                }
            }
        }
        Tensor::from_data(
            TensorData::new(m, [pads.len(), 1, rep * seq, total]),
            &self.device,
        )
    }
}

impl<B: KernelBackend> DecoderLayer<B> {
    /// Attention and MLP, each after its norm and with its residual. With a cache, the layer's
    /// keys and values are written at `past..` and attention reads every cached position;
    /// without one, it runs over the new positions only.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ctx: LayerCtx<'_, B>,
        cache: Option<(&mut LayerCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let x = x.clone() + self.attention(self.input_layernorm.forward(x), ctx, cache);
        x.clone() + self.mlp(self.post_attention_layernorm.forward(x), ctx)
    }

    /// The projection `t`, with the adapters that touch it in this layer.
    fn project(&self, t: Target, x: Tensor<B, 3>, ctx: LayerCtx<'_, B>) -> Tensor<B, 3> {
        if let Some(rows) = ctx.rows {
            let [y] = self.project_rows([t], x, ctx, rows);
            return y;
        }
        self.projections[t.index()].forward_adapted(x, &ctx.adapters.on(ctx.index, t))
    }

    /// The projections `ts` of `x` with each batch row's own adapters (`rows`, as
    /// [`LayerCtx::rows`]): the base products for every row together, then each row's
    /// adapters' terms, added in place.
    fn project_rows<const N: usize>(
        &self,
        ts: [Target; N],
        x: Tensor<B, 3>,
        ctx: LayerCtx<'_, B>,
        rows: &[Vec<usize>],
    ) -> [Tensor<B, 3>; N] {
        let [batch, seq, inp] = x.dims();
        let layers = ts.map(|t| &self.projections[t.index()]);
        let mut ys: Vec<Tensor<B, 2>> = Linear::forward_many(&layers, x.clone())
            .into_iter()
            .zip(&layers)
            .map(|(y, l)| y.reshape([batch * seq, l.out_features]))
            .collect();
        let x = x.reshape([batch * seq, inp]);
        // Row by row, each row's adapters in its stack's order, as its decode step adds them
        // alone (the small products' sums run in an order that depends on their number of
        // rows, and the terms' sum on their order).
        for (b, stack) in rows.iter().enumerate() {
            if stack.is_empty() {
                continue;
            }
            let idx: Vec<i32> = (b * seq..(b + 1) * seq).map(|r| r as i32).collect();
            let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [seq]), &x.device());
            let xs = x.clone().slice([b * seq..(b + 1) * seq, 0..inp]);
            for &i in stack {
                let adapter = ctx.adapters.list[i];
                for (y, &t) in ys.iter_mut().zip(&ts) {
                    let Some(pair) = adapter.get(ctx.index, t) else {
                        continue;
                    };
                    let lora = LoraApply {
                        pair,
                        scale: adapter.scale(),
                        dropout: None,
                    };
                    let term = lora.term(&xs);
                    *y = y
                        .clone()
                        .select_assign(0, idx.clone(), term, IndexingUpdateOp::Add);
                }
            }
        }
        let mut ys = ys
            .into_iter()
            .zip(layers)
            .map(|(y, l)| y.reshape([batch, seq, l.out_features]));
        ts.map(|_| {
            ys.next()
                .unwrap_or_else(|| unreachable!("one output a target"))
        })
    }

    /// The projections `ts` of the same input: together ([`Linear::forward_many`]) where no
    /// adapter touches any of them, else one by one.
    fn project_many<const N: usize>(
        &self,
        ts: [Target; N],
        x: Tensor<B, 3>,
        ctx: LayerCtx<'_, B>,
    ) -> [Tensor<B, 3>; N] {
        if let Some(rows) = ctx.rows {
            return self.project_rows(ts, x, ctx, rows);
        }
        if ts
            .iter()
            .any(|&t| !ctx.adapters.on(ctx.index, t).is_empty())
        {
            return ts.map(|t| self.project(t, x.clone(), ctx));
        }
        let layers = ts.map(|t| &self.projections[t.index()]);
        let mut outs = Linear::forward_many(&layers, x).into_iter();
        ts.map(|_| {
            outs.next()
                .unwrap_or_else(|| unreachable!("one output a layer"))
        })
    }

    /// Grouped-query attention. The `rep` query heads that share a KV head are laid out as one
    /// longer query sequence (`[batch, kv_heads, rep * seq, head_dim]`), so keys and values are
    /// never repeated in memory. Head `h` uses KV head `h / rep`, as HF `repeat_kv`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → `[batch, seq, hidden]`
    /// - cache: `[batch, kv_heads, capacity, head_dim]` each, written at `past..past + seq`
    fn attention(
        &self,
        x: Tensor<B, 3>,
        ctx: LayerCtx<'_, B>,
        cache: Option<(&mut LayerCache<B>, usize)>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let c = ctx.config;
        let (n_heads, n_kv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = n_heads / n_kv;
        let (cos, sin) = ctx.rope;
        let [q, k, v] = self.project_many([Target::Q, Target::K, Target::V], x, ctx);
        let (q, k) = if ctx.rope_rows {
            // One position a row, each with its own row of the tables: the rows go through
            // RoPE as one sequence.
            let rows = |t: Tensor<B, 3>, heads: usize| {
                B::rope(t.reshape([1, batch, heads * hd]), cos, sin, heads).swap_dims(0, 2)
            };
            (rows(q, n_heads), rows(k, n_kv))
        } else {
            (
                B::rope(q, cos, sin, n_heads), // [b, n_heads, seq, hd]
                B::rope(k, cos, sin, n_kv),    // [b, n_kv, seq, hd]
            )
        };
        let v = v.reshape([batch, seq, n_kv, hd]).swap_dims(1, 2);

        let (keys, values) = match cache {
            Some((cache, past)) => cache.append(k, v, past),
            None => (k, v),
        };

        let q = q.reshape([batch, n_kv, rep * seq, hd]);
        let scale = 1.0 / (hd as f64).sqrt();
        let out = <B as KernelBackend>::attention(q, keys, values, ctx.mask, scale); // [b, n_kv, rep*seq, hd]
        let out = out
            .reshape([batch, n_heads, seq, hd])
            .swap_dims(1, 2)
            .reshape([batch, seq, n_heads * hd]);
        self.project(Target::O, out, ctx)
    }

    /// SwiGLU: `down(silu(gate(x)) * up(x))`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]` → same
    fn mlp(&self, x: Tensor<B, 3>, ctx: LayerCtx<'_, B>) -> Tensor<B, 3> {
        let [gate, up] = self.project_many([Target::Gate, Target::Up], x, ctx);
        self.project(Target::Down, B::swiglu(gate, up), ctx)
    }
}

impl<B: KernelBackend> Llama<B> {
    /// The same model on `Autodiff<B>` for training, sharing the device tensors (nothing is
    /// uploaded again; the frozen weights are untracked leaves). The host-side embedding table
    /// is copied.
    pub fn autodiff(&self) -> Llama<Autodiff<B>> {
        let norm = |n: &RmsNorm<B>| RmsNorm {
            weight: Tensor::from_inner(n.weight.clone()),
            eps: n.eps,
        };
        Llama {
            config: self.config.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| DecoderLayer {
                    input_layernorm: norm(&l.input_layernorm),
                    post_attention_layernorm: norm(&l.post_attention_layernorm),
                    projections: l.projections.each_ref().map(Linear::autodiff),
                })
                .collect(),
            norm: norm(&self.norm),
            lm_head: self.lm_head.autodiff(),
            inv_freq: self.inv_freq.clone(),
            device: self.device.clone(),
        }
    }
}

/// `[Result<T>; N]` → `Result<[T; N]>`, the first error if any.
fn try_array<T, const N: usize>(items: [Result<T>; N]) -> Result<[T; N]> {
    let items = items.into_iter().collect::<Result<Vec<T>>>()?;
    Ok(items
        .try_into()
        .unwrap_or_else(|_| unreachable!("N items in, N items out")))
}
