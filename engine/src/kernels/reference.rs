//! The references for our kernels, from plain burn tensor ops; they run on every backend.
//! Quantised product: unpack nibbles/bytes and f16 scales with integer ops, dequantise, matmul.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, IndexingUpdateOp, Int, Tensor, TensorData};

use super::{AdapterShare, LoraEpilogue, QTensor, to_dtype, widen};
use crate::quant::QFormat;

fn shifts<B: Backend>(values: [i32; 4], device: &B::Device) -> Tensor<B, 3, Int> {
    Tensor::<B, 1, Int>::from_data(TensorData::new(values.to_vec(), [4]), device).reshape([1, 1, 4])
}

/// `(x >> shift) & mask` elementwise, shifts broadcast along the last dim.
fn extract<B: Backend>(
    x: Tensor<B, 3, Int>,
    shift: Tensor<B, 3, Int>,
    mask: i32,
) -> Tensor<B, 3, Int> {
    let [a, b, _] = x.dims();
    x.expand([a, b, 4])
        .bitwise_right_shift(shift.expand([a, b, 4]))
        .bitwise_and_scalar(mask.elem())
}

/// Decode IEEE f16 bit patterns (in the low 16 bits of each value) to f32, with int/float ops.
fn f16_bits_to_f32<B: Backend>(h: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let sign = h
        .clone()
        .bitwise_right_shift_scalar(15.elem())
        .bitwise_and_scalar(1.elem())
        .float();
    let exp = h
        .clone()
        .bitwise_right_shift_scalar(10.elem())
        .bitwise_and_scalar(0x1F.elem());
    let man = h.bitwise_and_scalar(0x3FF.elem()).float();
    let normal = exp.clone().greater_equal_elem(1).float();
    // normal: (1024 + man) * 2^(exp - 25); subnormal: man * 2^-24 = man * 2^(1 - 25).
    let mantissa = man + normal * 1024.0;
    let exponent = exp.clamp_min(1i32).float() - 25.0;
    let magnitude = mantissa * (exponent * std::f32::consts::LN_2).exp();
    magnitude * (sign * -2.0 + 1.0)
}

/// The f16 scales of `w`, `[n_blocks, scales_per_block]`.
fn scales<B: Backend>(w: &QTensor<B>, n_blocks: usize) -> Tensor<B, 2> {
    let words = w.scales.clone();
    let n_words = words.dims()[0];
    let halves = Tensor::cat(
        vec![
            words
                .clone()
                .bitwise_and_scalar(0xFFFF.elem())
                .reshape([n_words, 1]),
            words
                .bitwise_right_shift_scalar(16.elem())
                .bitwise_and_scalar(0xFFFF.elem())
                .reshape([n_words, 1]),
        ],
        1,
    )
    .reshape([2 * n_words]);
    let per = w.format.scale_halves_per_block();
    f16_bits_to_f32(halves.slice(0..n_blocks * per)).reshape([n_blocks, per])
}

/// Dequantise `w` to `[rows, cols]`: with tensor ops on the device for the formats that have
/// them ([`QFormat::has_tensor_reference`]), else on the host by `quant.rs` and uploaded (the
/// 5-bit and K-quant layouts would take dozens of tensor ops; only tests and merging call this
/// for them, since backends without kernels for a format hold it dense).
pub fn dequantize<B: Backend>(w: &QTensor<B>) -> Tensor<B, 2> {
    let device = w.qs.device();
    if !w.format.has_tensor_reference() {
        let words = |t: &Tensor<B, 1, Int>| -> Vec<u32> {
            t.clone()
                .into_data()
                .convert::<i32>()
                .into_vec::<i32>()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v as u32)
                .collect()
        };
        let q = crate::quant::QMatrix {
            format: w.format,
            rows: w.rows,
            cols: w.cols,
            qs: words(&w.qs),
            scales: words(&w.scales),
        };
        return Tensor::from_data(TensorData::new(q.dequantize(), [w.rows, w.cols]), &device);
    }
    let n_blocks = w.rows * w.cols / QFormat::BLOCK_LEN;
    let s = scales(w, n_blocks);
    let values = match w.format {
        QFormat::Q4_0 | QFormat::Q4_1 => {
            let words = w.qs.clone().reshape([n_blocks, 4, 1]);
            // Byte j of word i is weight 4i + j (low nibble) and 4i + j + 16 (high nibble).
            let lo = extract(words.clone(), shifts::<B>([0, 8, 16, 24], &device), 0xF)
                .reshape([n_blocks, 16]);
            let hi =
                extract(words, shifts::<B>([4, 12, 20, 28], &device), 0xF).reshape([n_blocks, 16]);
            let q = Tensor::cat(vec![lo, hi], 1).float(); // [n_blocks, 32]
            let d = s.clone().slice([0..n_blocks, 0..1]);
            if w.format == QFormat::Q4_0 {
                (q - 8.0) * d
            } else {
                q * d + s.slice([0..n_blocks, 1..2])
            }
        }
        // Q8_0, the last format with a tensor reference.
        _ => {
            let words = w.qs.clone().reshape([n_blocks, 8, 1]);
            let bytes =
                extract(words, shifts::<B>([0, 8, 16, 24], &device), 0xFF).reshape([n_blocks, 32]);
            let signed = bytes.clone() - bytes.greater_equal_elem(128).int() * 256;
            signed.float() * s
        }
    };
    values.reshape([w.rows, w.cols])
}

/// `x · W` for a dense weight held as `[in, out]`, in `x`'s type.
pub fn dense_matmul<B: Backend>(x: Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    let (xd, wd) = (x.dtype(), w.dtype());
    if matches!(wd, DType::BF16 | DType::F16) && xd != wd {
        // A 16-bit base (`--base-dtype`): the product in the weight's dtype, where the backend
        // has its tensor-core matmul (accumulating in f32), and the result back in x's.
        return to_dtype(to_dtype(x, wd).matmul(w.clone()), xd);
    }
    x.matmul(to_dtype(w.clone(), xd))
}

/// Attention of query rows over keys and values: `softmax(q·kᵀ·scale + mask)·v`.
///
/// # Shapes
/// - `q`: `[batch, kv_heads, rows, head_dim]`, `keys`/`values`: `[batch, kv_heads, total,
///   head_dim]`, `mask`: `[batch or 1, 1, rows, total]` → `[batch, kv_heads, rows, head_dim]`
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
    scale: f64,
) -> Tensor<B, 4> {
    softmax(attention_scores(q, keys, mask, scale), 3).matmul(values)
}

/// [`attention`]'s scores before the softmax: `q·kᵀ·scale + mask`, `[batch, kv_heads, rows,
/// total]`.
pub fn attention_scores<B: Backend>(
    q: Tensor<B, 4>,
    keys: Tensor<B, 4>,
    mask: Option<&Tensor<B, 4>>,
    scale: f64,
) -> Tensor<B, 4> {
    let scores = q.matmul(keys.swap_dims(2, 3)) * scale;
    let [b, h, rows, total] = scores.dims();
    match mask {
        // Added as rows of `rows · total`: burn-flex adds one row shared by every head with
        // SIMD, where the 4-D broadcast walked the scores index by index.
        Some(m) => {
            let row = [m.dims()[0], 1, rows * total];
            (scores.reshape([b, h, rows * total]) + m.clone().reshape(row))
                .reshape([b, h, rows, total])
        }
        None => scores,
    }
}

/// The softmax's gradient at its input from its output `y` and `dy`, with tensor ops.
pub fn softmax_backward<B: Backend>(y: Tensor<B, 4>, dy: Tensor<B, 4>) -> Tensor<B, 4> {
    let dot = (dy.clone() * y.clone()).sum_dim(3);
    y * (dy - dot)
}

/// `x · Wᵀ` by dequantising `W`.
pub fn q_matmul<B: Backend>(x: Tensor<B, 2>, w: &QTensor<B>) -> Tensor<B, 2> {
    let dtype = x.dtype();
    to_dtype(widen(x).matmul(dequantize(w).transpose()), dtype)
}

/// `x · Wᵀ + scale · u · Bᵀ`.
pub fn q_matmul_lora<B: Backend>(
    x: Tensor<B, 2>,
    w: &QTensor<B>,
    lora: &LoraEpilogue<B>,
) -> Tensor<B, 2> {
    let dtype = x.dtype();
    plus_lora_up(q_matmul(x, w), lora, dtype)
}

/// `y + scale · u · Bᵀ` in f32, returned as `dtype`: the epilogue of [`q_matmul_lora`] after
/// any backend's base product.
pub fn plus_lora_up<B: Backend>(
    y: Tensor<B, 2>,
    lora: &LoraEpilogue<B>,
    dtype: burn::tensor::DType,
) -> Tensor<B, 2> {
    let up = widen(lora.u.clone()).matmul(widen(lora.b.clone()).transpose()) * lora.scale;
    to_dtype(widen(y) + up, dtype)
}

/// `dy · W (+ du · A)`.
pub fn q_matmul_t<B: Backend>(
    dy: Tensor<B, 2>,
    w: &QTensor<B>,
    lora: Option<AdapterShare<B>>,
) -> Tensor<B, 2> {
    let dtype = dy.dtype();
    let dx = widen(dy).matmul(dequantize(w));
    let dx = match lora {
        Some((du, a)) => dx + widen(du).matmul(widen(a)),
        None => dx,
    };
    to_dtype(dx, dtype)
}

/// `alpha · op(a) · op(b)`.
pub fn matmul_small<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    transpose_a: bool,
    transpose_b: bool,
    alpha: f32,
) -> Tensor<B, 2> {
    let dtype = a.dtype();
    let (a, b) = (widen(a), widen(b));
    let a = if transpose_a { a.transpose() } else { a };
    let b = if transpose_b { b.transpose() } else { b };
    to_dtype(a.matmul(b) * alpha, dtype)
}

/// The LoRA product from plain tensor ops, differentiable by burn's autodiff: the reference the
/// hand-written backward pass is tested against.
pub fn lora_matmul<B: Backend>(
    x: Tensor<B, 2>,
    x_drop: Option<Tensor<B, 2>>,
    w: &QTensor<B>,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    scale: f32,
) -> Tensor<B, 2> {
    let xd = x_drop.unwrap_or_else(|| x.clone());
    q_matmul(x, w) + xd.matmul(a.transpose()).matmul(b.transpose()) * scale
}

/// RMSNorm with tensor ops.
///
/// # Shapes
/// - `x`: `[batch, seq, dim]`, `weight`: `[dim]` → `[batch, seq, dim]`
pub fn rms_norm<B: Backend>(x: Tensor<B, 3>, weight: &Tensor<B, 1>, eps: f64) -> Tensor<B, 3> {
    // Statistics in f32 whatever the activations' type: a sum of squares overflows f16.
    let dtype = x.dtype();
    let x = widen(x);
    let ms = (x.clone() * x.clone()).mean_dim(2); // [batch, seq, 1]
    to_dtype(
        x / (ms + eps).sqrt() * widen(weight.clone()).unsqueeze(),
        dtype,
    )
}

/// The gradient of [`rms_norm`] at `x` for `dy` at its output, the weight held fixed:
/// `r · g − x · r³ · mean(g · x)` per row, with `g = dy · w` and `r = 1 / √(mean(x²) + eps)`.
/// Statistics in f32, as the forward's.
pub fn rms_norm_backward<B: Backend>(
    x: Tensor<B, 3>,
    weight: &Tensor<B, 1>,
    dy: Tensor<B, 3>,
    eps: f64,
) -> Tensor<B, 3> {
    let dtype = dy.dtype();
    let (x, dy) = (widen(x), widen(dy));
    let r = ((x.clone() * x.clone()).mean_dim(2) + eps).sqrt().recip(); // [batch, seq, 1]
    let g = dy * widen(weight.clone()).unsqueeze();
    let gx = (g.clone() * x.clone()).mean_dim(2);
    let r3 = r.clone() * r.clone() * r.clone();
    to_dtype(g * r - x * (gx * r3), dtype)
}

/// The gradient of [`rope`] at `x` for `dy` at its output: the rotation is orthogonal per
/// pair, so its transpose, `dy · cos + [ (dy · sin)₂, −(dy · sin)₁ ]`, taken back to `x`'s
/// layout.
///
/// # Shapes
/// - `dy`: `[batch, heads, seq, head_dim]`, `cos`/`sin`: `[seq, head_dim]`
///   → `[batch, seq, heads * head_dim]`
pub fn rope_backward<B: Backend>(
    dy: Tensor<B, 4>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
) -> Tensor<B, 3> {
    let [b, heads, s, d] = dy.dims();
    let dtype = dy.dtype();
    let rows = |t: Tensor<B, 4>| t.reshape([b * heads, s * d]);
    let table = |t: &Tensor<B, 2>| to_dtype(t.clone(), dtype).reshape([1, s * d]);
    let direct = (rows(dy.clone()) * table(cos)).reshape([b, heads, s, d]);
    let z = (rows(dy) * table(sin)).reshape([b, heads, s, d]);
    let z1 = z.clone().slice([0..b, 0..heads, 0..s, 0..d / 2]);
    let z2 = z.slice([0..b, 0..heads, 0..s, d / 2..d]);
    let back = Tensor::cat(vec![z2, z1.neg()], 3);
    (direct + back).swap_dims(1, 2).reshape([b, s, heads * d])
}

/// SwiGLU's gating, `silu(gate) · up`, with tensor ops.
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    burn::tensor::activation::silu(gate) * up
}

/// [`swiglu`]'s gradients at `gate` and `up` for `dy` at its output, with tensor ops.
pub fn swiglu_backward<B: Backend>(
    gate: Tensor<B, 3>,
    up: Tensor<B, 3>,
    dy: Tensor<B, 3>,
) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let s = burn::tensor::activation::sigmoid(gate.clone());
    let d_silu = s.clone() * (gate.clone() * (s.clone().neg() + 1.0) + 1.0);
    let d_up = dy.clone() * (gate * s);
    (dy * up * d_silu, d_up)
}

/// RoPE (rotate-half) with tensor ops.
///
/// # Shapes
/// - `x`: `[batch, seq, heads * head_dim]`, `cos`/`sin`: `[seq, head_dim]`
///   → `[batch, heads, seq, head_dim]`
pub fn rope<B: Backend>(
    x: Tensor<B, 3>,
    cos: &Tensor<B, 2>,
    sin: &Tensor<B, 2>,
    heads: usize,
) -> Tensor<B, 4> {
    let [b, s, width] = x.dims();
    let d = width / heads;
    let x = x.reshape([b, s, heads, d]).swap_dims(1, 2); // [b, heads, s, d]
    let x1 = x.clone().slice([0..b, 0..heads, 0..s, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..heads, 0..s, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    // Each head's `[s, d]` as one row, times the tables as one row shared by every head (the
    // broadcast burn-flex multiplies with SIMD).
    let rows = |t: Tensor<B, 4>| t.reshape([b * heads, s * d]);
    let table = |t: &Tensor<B, 2>| to_dtype(t.clone(), x.dtype()).reshape([1, s * d]);
    (rows(x.clone()) * table(cos) + rows(rotated) * table(sin)).reshape([b, heads, s, d])
}

/// `labels` as a `[rows, 1]` index tensor (0 where a row has none) and `[rows, 1]` weights (1
/// where it has one, else 0).
fn label_tensors<B: Backend>(
    labels: &[Option<u32>],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let rows = labels.len();
    let idx: Vec<i32> = labels.iter().map(|l| l.map_or(0, |l| l as i32)).collect();
    let w: Vec<f32> = labels
        .iter()
        .map(|l| f32::from(l.is_some() as u8))
        .collect();
    (
        Tensor::from_data(TensorData::new(idx, [rows, 1]), device),
        Tensor::from_data(TensorData::new(w, [rows, 1]), device),
    )
}

/// Summed negative log-likelihood with tensor ops: log-softmax, gather, weighted sum.
pub fn nll<B: Backend>(logits: Tensor<B, 2>, labels: &[Option<u32>]) -> Tensor<B, 1> {
    let (idx, w) = label_tensors::<B>(labels, &logits.device());
    let picked = log_softmax(logits, 1).gather(1, idx);
    (picked * w).sum().neg()
}

/// `grad · w · (softmax(logits) − onehot(labels))` with tensor ops.
pub fn nll_backward<B: Backend>(
    logits: Tensor<B, 2>,
    labels: &[Option<u32>],
    grad: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let (idx, w) = label_tensors::<B>(labels, &logits.device());
    let p = softmax(logits, 1) * w.clone();
    p.scatter(1, idx, w.neg(), IndexingUpdateOp::Add) * grad.reshape([1, 1])
}
