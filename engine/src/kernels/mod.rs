//! Hand-written WGSL kernels (sources in `shaders/`) and the backend extension that exposes them.
//!
//! [`KernelBackend`] is what the model needs beyond burn's own ops: a product with a matrix that
//! stays quantised in device memory (with or without a LoRA adapter beside it), its transpose
//! for the backward pass, and fused RMSNorm and RoPE. burn-wgpu implements them with our WGSL
//! kernels, one Rust file per shader family named like its shader (`qmatmul.rs`, `qmatmul_t.rs`,
//! `matmul_strided.rs`, `rms_norm.rs`, `rope.rs`: params, source and launcher), wired into the
//! backend by `wgpu.rs`. Every other backend uses the reference built from plain tensor ops
//! (`reference.rs`), which is also what the kernels are tested against.
//! `autodiff.rs` makes the quantised and LoRA products differentiable on `Autodiff<B>` with
//! hand-written backward passes that call the same kernels.

pub mod autodiff;
pub mod cpu;
pub mod cpu_quant;
pub mod cpu_rows;
pub mod dropout;
pub mod matmul_strided;
pub mod pool;
pub mod qmatmul;
pub mod qmatmul_t;
pub mod reference;
pub mod rms_norm;
pub mod rope;
pub mod sweep;
pub mod wgpu;
pub mod wgsl;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorData};

use crate::quant::{QFormat, QMatrix};

/// A quantised matrix `[rows, cols]` on a device, in the layout of [`QMatrix`]. The packed u32
/// words live in Int tensors (bit-cast to the backend's int type; the kernels read them as u32).
/// f16 activations (training where the adapter has `shader-f16`) meet the f32 kernels and f32
/// parameters here: `widen` before a computation that runs in f32, [`to_dtype`] to give its
/// result the activation's type, so what autodiff keeps for the backward stays f16.
pub fn widen<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    to_dtype(t, DType::F32)
}

/// `t` as `dtype` (a float type), unchanged when it already is.
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

#[derive(Debug, Clone)]
pub struct QTensor<B: Backend> {
    pub format: QFormat,
    pub rows: usize,
    pub cols: usize,
    /// `[rows * cols / 32 * qs_words_per_block]`
    pub qs: Tensor<B, 1, Int>,
    /// `[ceil(rows * cols / 32 * scales_per_block / 2)]`
    pub scales: Tensor<B, 1, Int>,
}

impl<B: Backend> QTensor<B> {
    pub fn from_qmatrix(q: &QMatrix, device: &B::Device) -> Self {
        let words = |w: &[u32]| {
            let v: Vec<i32> = w.iter().map(|&x| x as i32).collect();
            let n = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [n]), device)
        };
        Self {
            format: q.format,
            rows: q.rows,
            cols: q.cols,
            qs: words(&q.qs),
            // The 16-bit formats have no scales; the kernels bind the array all the same, and
            // a device buffer cannot be empty.
            scales: words(if q.scales.is_empty() { &[0] } else { &q.scales }),
        }
    }

    /// Bytes taken in device memory (as the backend's int type stores the words).
    pub fn device_bytes(&self) -> usize {
        let words = self.qs.shape().num_elements() + self.scales.shape().num_elements();
        words * size_of::<B::IntElem>()
    }
}

impl<B: Backend> QTensor<B> {
    /// The same words seen from another backend with the same int primitive (for instance the
    /// inner backend of `Autodiff<B>`: int tensors are never tracked).
    pub fn cast<B2: Backend<IntTensorPrimitive = B::IntTensorPrimitive>>(&self) -> QTensor<B2> {
        QTensor {
            format: self.format,
            rows: self.rows,
            cols: self.cols,
            qs: Tensor::from_primitive(self.qs.clone().into_primitive()),
            scales: Tensor::from_primitive(self.scales.clone().into_primitive()),
        }
    }
}

/// The LoRA term added in the epilogue of a quantised product: `scale · u · Bᵀ`.
#[derive(Debug, Clone)]
pub struct LoraEpilogue<B: Backend> {
    /// `[m, r]`: x · Aᵀ.
    pub u: Tensor<B, 2>,
    /// `[n, r]`: the adapter's B.
    pub b: Tensor<B, 2>,
    pub scale: f32,
}

/// `(du, A)`: the adapter's share of the input gradient, `du · A`, fused into
/// [`KernelBackend::q_matmul_t`].
pub type AdapterShare<B> = (Tensor<B, 2>, Tensor<B, 2>);

/// Backends that can multiply by a quantised matrix.
pub trait KernelBackend: Backend {
    /// `x · Wᵀ` with `x: [m, k]`, `W: [n, k]` quantised; returns `[m, n]`.
    ///
    /// The default is the plain-tensor reference: dequantise, then matmul.
    fn q_matmul(x: Tensor<Self, 2>, w: &QTensor<Self>) -> Tensor<Self, 2> {
        reference::q_matmul(x, w)
    }

    /// `x · Wᵢᵀ` for several weights of x's width (a layer's q, k and v): one product each by
    /// default; a backend may share x's preparation and one dispatch between them.
    fn q_matmul_many(x: Tensor<Self, 2>, ws: &[&QTensor<Self>]) -> Vec<Tensor<Self, 2>> {
        ws.iter()
            .map(|w| <Self as KernelBackend>::q_matmul(x.clone(), w))
            .collect()
    }

    /// A frozen quantised base with a LoRA adapter: `x · Wᵀ + scale · (x_drop · Aᵀ) · Bᵀ`, where
    /// `x_drop` is `x` after the adapter's dropout (`None`: `x` itself).
    ///
    /// # Shapes
    /// - `x`, `x_drop`: `[m, k]`, `W`: `[n, k]`, `a`: `[r, k]`, `b`: `[n, r]` → `[m, n]`
    fn lora_matmul(
        x: Tensor<Self, 2>,
        x_drop: Option<Tensor<Self, 2>>,
        w: &QTensor<Self>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f32,
    ) -> Tensor<Self, 2> {
        let xd = x_drop.unwrap_or_else(|| x.clone());
        let u = Self::matmul_small(xd, a, false, true, 1.0);
        Self::q_matmul_lora(x, w, &LoraEpilogue { u, b, scale })
    }

    /// `x · Wᵀ + scale · u · Bᵀ` (the adapter's up-projection fused with the base product). The
    /// default adds it after [`q_matmul`](Self::q_matmul).
    fn q_matmul_lora(
        x: Tensor<Self, 2>,
        w: &QTensor<Self>,
        lora: &LoraEpilogue<Self>,
    ) -> Tensor<Self, 2> {
        let dtype = x.dtype();
        reference::plus_lora_up(<Self as KernelBackend>::q_matmul(x, w), lora, dtype)
    }

    /// `dy · W (+ du · A)`: the gradient at the input of [`q_matmul`](Self::q_matmul) or
    /// [`lora_matmul`](Self::lora_matmul).
    ///
    /// # Shapes
    /// - `dy`: `[m, n]`, `W`: `[n, k]`, `du`: `[m, r]`, `a`: `[r, k]` → `[m, k]`
    fn q_matmul_t(
        dy: Tensor<Self, 2>,
        w: &QTensor<Self>,
        lora: Option<AdapterShare<Self>>,
    ) -> Tensor<Self, 2> {
        reference::q_matmul_t(dy, w, lora)
    }

    /// A mask for inverted dropout: each value `1 / keep` with probability `keep`, else 0, a
    /// function of `seed` alone ([`cpu::dropout_mask`]'s bits on every backend). Not the
    /// backend's generator: that is one state per process, which another thread can draw from
    /// between a seeding and its use.
    fn dropout_mask(
        dims: [usize; 2],
        keep: f64,
        seed: u64,
        device: &Self::Device,
    ) -> Tensor<Self, 2> {
        host_dropout_mask(dims, keep, seed, device)
    }

    /// Summed negative log-likelihood of `labels` under `logits` (`[rows, vocab]`, one label a
    /// row): `Σ logsumexp(row) − row[label]` over the rows that have a label.
    fn nll(logits: Tensor<Self, 2>, labels: &[Option<u32>]) -> Tensor<Self, 1> {
        reference::nll(logits, labels)
    }

    /// The gradient of [`nll`](Self::nll) at `logits` times `grad` (`[1]`): each labelled row's
    /// softmax less the one-hot of its label; 0 on rows without one.
    fn nll_backward(
        logits: Tensor<Self, 2>,
        labels: &[Option<u32>],
        grad: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        reference::nll_backward(logits, labels, grad)
    }

    /// `alpha · op(a) · op(b)` for the small products of the LoRA path (one side is the rank).
    fn matmul_small(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
        alpha: f32,
    ) -> Tensor<Self, 2> {
        reference::matmul_small(a, b, transpose_a, transpose_b, alpha)
    }

    /// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, dim]`, `weight`: `[dim]` → `[batch, seq, dim]`
    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        reference::rms_norm(x, weight, eps)
    }

    /// RoPE (rotate-half) applied to the heads of a projection, returned head-major.
    ///
    /// # Shapes
    /// - `x`: `[batch, seq, heads * head_dim]`, `cos`/`sin`: `[seq, head_dim]`
    ///   → `[batch, heads, seq, head_dim]`
    fn rope(
        x: Tensor<Self, 3>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 4> {
        reference::rope(x, cos, sin, heads)
    }

    /// The gradient of [`rms_norm`](Self::rms_norm) at `x` for `dy` at its output, the weight
    /// held fixed (the base model's norms are frozen).
    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 1>,
        dy: Tensor<Self, 3>,
        eps: f64,
    ) -> Tensor<Self, 3> {
        reference::rms_norm_backward(x, weight, dy, eps)
    }

    /// The gradient of [`rope`](Self::rope) at `x` for `dy` at its output.
    ///
    /// # Shapes
    /// - `dy`: `[batch, heads, seq, head_dim]`, `cos`/`sin`: `[seq, head_dim]`
    ///   → `[batch, seq, heads * head_dim]`
    fn rope_backward(
        dy: Tensor<Self, 4>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        reference::rope_backward(dy, cos, sin)
    }

    /// Whether `Autodiff` over this backend takes RMSNorm's and RoPE's gradients from
    /// [`rms_norm_backward`](Self::rms_norm_backward) and [`rope_backward`](Self::rope_backward)
    /// (one pass each on burn-flex) instead of differentiating the reference's tensor ops.
    fn row_op_gradients() -> bool {
        false
    }

    /// SwiGLU's gating: `silu(gate) · up`.
    ///
    /// # Shapes
    /// - `gate`, `up`: `[batch, seq, dim]` → `[batch, seq, dim]`
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        reference::swiglu(gate, up)
    }

    /// The gradients of [`swiglu`](Self::swiglu) at `gate` and `up` for `dy` at its output:
    /// `dy · up · σ(g) · (1 + g · (1 − σ(g)))` and `dy · silu(g)`.
    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        reference::swiglu_backward(gate, up, dy)
    }

    /// `cache` with `values` written at positions `past..past + seq` (the KV cache's append).
    ///
    /// # Shapes
    /// - `cache`: `[batch, heads, capacity, head_dim]`, `values`: `[batch, heads, seq, head_dim]`
    ///   → `[batch, heads, capacity, head_dim]`
    fn write_positions(
        cache: Tensor<Self, 4>,
        past: usize,
        values: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        let [b, h, seq, d] = values.dims();
        cache.slice_assign([0..b, 0..h, past..past + seq, 0..d], values)
    }

    /// The dtype the KV cache holds keys and values in on `device` (f32; burn-flex: f16).
    fn kv_cache_dtype(_device: &Self::Device) -> DType {
        DType::F32
    }

    /// Bytes the backend's allocator holds on `device` now (its pools only grow, so sampled
    /// after the largest step this is the peak), where the backend can tell.
    fn memory_reserved(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// Whether activations can be f16 on `device` (wgpu: the adapter offers `shader-f16`).
    fn supports_f16(_device: &Self::Device) -> bool {
        false
    }

    /// The format a model's frozen linear weights are held in on `device` when the user names
    /// none (`--base-dtype`, `--quantize`): `None` keeps the file's blocks where the backend
    /// computes them, f32 elsewhere; CUDA: bf16 where the device has it (the weights widened
    /// once, the products on tensor cores).
    fn default_base(_device: &Self::Device) -> Option<QFormat> {
        None
    }

    /// `x · W` for a dense linear weight held as `[in, out]` (see `LinearWeight::Dense`).
    fn dense_matmul(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        reference::dense_matmul(x, w)
    }

    /// Attention of query rows over keys and values: `softmax(q·kᵀ·scale + mask)·v`. The
    /// keys and values may be a view of the KV cache (strided, not contiguous).
    ///
    /// # Shapes
    /// - `q`: `[batch, kv_heads, rows, head_dim]`, `keys`/`values`: `[batch, kv_heads, total,
    ///   head_dim]`, `mask`: `[batch or 1, 1, rows, total]` → `[batch, kv_heads, rows, head_dim]`
    fn attention(
        q: Tensor<Self, 4>,
        keys: Tensor<Self, 4>,
        values: Tensor<Self, 4>,
        mask: Option<&Tensor<Self, 4>>,
        scale: f64,
    ) -> Tensor<Self, 4> {
        Self::row_softmax(reference::attention_scores(q, keys, mask, scale)).matmul(values)
    }

    /// Softmax over the last dimension (attention's scores).
    fn row_softmax(x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        burn::tensor::activation::softmax(x, 3)
    }

    /// The gradient of [`row_softmax`](Self::row_softmax) at its input, from its output `y` and the
    /// gradient `dy` there: `y · (dy − Σ dy · y)` per row.
    fn row_softmax_backward(y: Tensor<Self, 4>, dy: Tensor<Self, 4>) -> Tensor<Self, 4> {
        reference::softmax_backward(y, dy)
    }

    /// Whether the backend multiplies by `format` without widening it: the WGSL kernels read
    /// every [`QFormat`]; the plain-tensor reference only those it can dequantise with tensor
    /// ops on the device. Weights of other formats load dense.
    fn computes(format: QFormat) -> bool {
        format.has_tensor_reference()
    }

    /// The largest buffer one tensor may take on `device` (wgpu: the adapter's largest storage
    /// binding, 128 MiB on lavapipe), or `None` without a limit. Larger weights are split.
    fn max_tensor_bytes(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// Short name of the implementation, for reports.
    fn kernels_impl() -> &'static str {
        "reference (plain tensor ops)"
    }
}

/// [`cpu::dropout_mask`] made on the host and uploaded to `device`.
pub fn host_dropout_mask<B: Backend>(
    dims: [usize; 2],
    keep: f64,
    seed: u64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let mask = cpu::dropout_mask(dims[0] * dims[1], keep, seed);
    Tensor::from_data(TensorData::new(mask, dims), device)
}

/// burn-flex, the CPU backend for machines without a usable GPU: quantised weights stay in their
/// blocks and are multiplied with x quantised to 8 bits by integer dot products (`cpu_quant.rs`);
/// other weights are f32, multiplied by burn-flex's gemm (multi-threaded, SIMD) or by `cpu.rs`
/// for few rows of x.
impl KernelBackend for burn::backend::Flex {
    fn computes(_format: QFormat) -> bool {
        true
    }

    fn q_matmul(x: Tensor<Self, 2>, w: &QTensor<Self>) -> Tensor<Self, 2> {
        cpu_quant::try_q_matmul(&x, w).unwrap_or_else(|| reference::q_matmul(x, w))
    }

    fn q_matmul_many(x: Tensor<Self, 2>, ws: &[&QTensor<Self>]) -> Vec<Tensor<Self, 2>> {
        cpu_quant::try_q_matmul_many(&x, ws).unwrap_or_else(|| {
            ws.iter()
                .map(|w| <Self as KernelBackend>::q_matmul(x.clone(), w))
                .collect()
        })
    }

    fn q_matmul_t(
        dy: Tensor<Self, 2>,
        w: &QTensor<Self>,
        lora: Option<AdapterShare<Self>>,
    ) -> Tensor<Self, 2> {
        let Some(dx) = cpu_quant::try_q_matmul_t(&dy, w) else {
            return reference::q_matmul_t(dy, w, lora);
        };
        match lora {
            Some((du, a)) => dx + widen(du).matmul(widen(a)),
            None => dx,
        }
    }

    /// One pass of `cpu.rs` a row instead of the tensor ops' five over the 50 MB of SmolLM2's
    /// logits for 256 positions.
    fn nll(logits: Tensor<Self, 2>, labels: &[Option<u32>]) -> Tensor<Self, 1> {
        cpu::try_nll(&logits, labels).unwrap_or_else(|| reference::nll(logits, labels))
    }

    fn nll_backward(
        logits: Tensor<Self, 2>,
        labels: &[Option<u32>],
        grad: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        cpu::try_nll_backward(&logits, labels, &grad)
            .unwrap_or_else(|| reference::nll_backward(logits, labels, grad))
    }

    /// Few rows of x (decode) skip gemm's packing of the weight (`cpu.rs`).
    fn dense_matmul(x: Tensor<Self, 2>, w: &Tensor<Self, 2>) -> Tensor<Self, 2> {
        cpu::try_matmul(&x, w).unwrap_or_else(|| reference::dense_matmul(x, w))
    }

    /// Decode steps (few query rows) read the cache in place (`cpu.rs`); gemm would first
    /// copy the transposed keys and the values out of the cache view, on one core.
    fn attention(
        q: Tensor<Self, 4>,
        keys: Tensor<Self, 4>,
        values: Tensor<Self, 4>,
        mask: Option<&Tensor<Self, 4>>,
        scale: f64,
    ) -> Tensor<Self, 4> {
        cpu::try_attention(&q, &keys, &values, mask, scale as f32).unwrap_or_else(|| {
            let (keys, values) = (keys.cast(DType::F32), values.cast(DType::F32));
            reference::attention(q, keys, values, mask, scale)
        })
    }

    /// f16, as llama.cpp's default: a decode step at long context streams the cache beside the
    /// weights (SmolLM2 at 600 positions: 28 MB of f32 keys and values beside 98 MB of
    /// weights), and `try_attention` widens the rows as it reads them.
    fn kv_cache_dtype(_device: &Self::Device) -> DType {
        DType::F16
    }

    /// In place: burn-flex 0.21's `slice_assign` copies the whole buffer first, every call
    /// (its `to_contiguous` clone keeps the buffer shared), so each decode step copied every
    /// layer's cache.
    fn write_positions(
        cache: Tensor<Self, 4>,
        past: usize,
        values: Tensor<Self, 4>,
    ) -> Tensor<Self, 4> {
        cpu::write_positions(cache, past, values)
    }

    /// One pass a row instead of the tensor ops' chains (`cpu_rows.rs`).
    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        cpu_rows::try_rms_norm(&x, weight, eps)
            .unwrap_or_else(|| reference::rms_norm(x, weight, eps))
    }

    fn rope(
        x: Tensor<Self, 3>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 4> {
        cpu_rows::try_rope(&x, cos, sin, heads)
            .unwrap_or_else(|| reference::rope(x, cos, sin, heads))
    }

    fn rms_norm_backward(
        x: Tensor<Self, 3>,
        weight: &Tensor<Self, 1>,
        dy: Tensor<Self, 3>,
        eps: f64,
    ) -> Tensor<Self, 3> {
        cpu_rows::try_rms_norm_backward(&x, weight, &dy, eps)
            .unwrap_or_else(|| reference::rms_norm_backward(x, weight, dy, eps))
    }

    fn rope_backward(
        dy: Tensor<Self, 4>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        cpu_rows::try_rope_backward(&dy, cos, sin)
            .unwrap_or_else(|| reference::rope_backward(dy, cos, sin))
    }

    /// One pass a gradient, where burn's backward of the reference walked a dozen tensor ops
    /// and their strided copies.
    fn row_op_gradients() -> bool {
        true
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        cpu_rows::try_swiglu(&gate, &up).unwrap_or_else(|| reference::swiglu(gate, up))
    }

    /// One pass a gradient, `exp` vectorised; burn's chain through sigmoid made seven tensor
    /// ops of the layer's width.
    fn swiglu_backward(
        gate: Tensor<Self, 3>,
        up: Tensor<Self, 3>,
        dy: Tensor<Self, 3>,
    ) -> (Tensor<Self, 3>, Tensor<Self, 3>) {
        cpu_rows::try_swiglu_backward(&gate, &up, &dy)
            .unwrap_or_else(|| reference::swiglu_backward(gate, up, dy))
    }

    /// One pass a row, `exp` vectorised (training's attention: burn's softmax is five tensor
    /// ops, each a pass of `expf` calls or of burn-flex's plumbing).
    fn row_softmax(x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        cpu_rows::try_softmax(&x).unwrap_or_else(|| burn::tensor::activation::softmax(x, 3))
    }

    fn row_softmax_backward(y: Tensor<Self, 4>, dy: Tensor<Self, 4>) -> Tensor<Self, 4> {
        cpu_rows::try_softmax_backward(&y, &dy)
            .unwrap_or_else(|| reference::softmax_backward(y, dy))
    }

    fn kernels_impl() -> &'static str {
        "burn-flex (CPU): quantised weights with 8-bit x (integer dot products); 16-bit weights widened per tile; f32 weights by gemm, or a rows product up to 32 rows"
    }
}

/// burn-cuda (the datacenter path) runs the plain-tensor reference until it has kernels of its own.
#[cfg(feature = "cuda")]
impl KernelBackend for burn::backend::Cuda {
    fn default_base(device: &Self::Device) -> Option<QFormat> {
        <Self as Backend>::supports_dtype(device, DType::BF16).then_some(QFormat::Bf16)
    }
}
