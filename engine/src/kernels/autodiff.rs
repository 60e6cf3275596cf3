//! [`KernelBackend`] on `Autodiff<B>`: the quantised product and the LoRA product get
//! hand-written backward passes that call the inner backend's kernels (on burn-wgpu,
//! `qmatmul_t.rs` and `matmul_strided.rs`); so do the loss (NLL), SwiGLU and attention's
//! softmax (on burn-flex, `cpu.rs` and `cpu_rows.rs`), and on burn-flex RMSNorm and RoPE.
//! Elsewhere those two use the plain-tensor reference, which burn differentiates.
//!
//! For `y = x·Wᵀ + s·(x_d·Aᵀ)·Bᵀ` with `u = x_d·Aᵀ` and `dy` the gradient at y:
//! - `du = s·dy·B`, `dB = s·dyᵀ·u`, `dA = duᵀ·x_d`;
//! - `dx = dy·W + du·A` in one kernel when `x_d` is `x` (no dropout), else `dx = dy·W` and
//!   `dx_d = du·A`.
//!
//! W is frozen: it is an int tensor, never tracked, and gets no gradient.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};

use super::{KernelBackend, LoraEpilogue, QTensor, to_dtype, widen};

use burn::tensor::ops::FloatTensor as Float;

/// An inner-backend primitive as a tensor of rank `D`.
fn wrap<B: Backend, const D: usize>(t: Float<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn unwrap<B: Backend, const D: usize>(t: Tensor<B, D>) -> Float<B> {
    t.into_primitive().tensor()
}

#[derive(Debug)]
struct QMatmulBackward;

impl<B: KernelBackend> Backward<B, 1> for QMatmulBackward {
    type State = QTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let w = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            unwrap(B::q_matmul_t(wrap(dy), &w, None))
        });
    }
}

/// What the LoRA backward needs from the forward, as inner-backend tensors.
#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    /// The input of the down-projection (`x` after dropout).
    x_drop: Float<B>,
    /// `x_drop · Aᵀ`.
    u: Float<B>,
    a: Float<B>,
    b: Float<B>,
    w: QTensor<B>,
    scale: f32,
}

impl<B: KernelBackend> LoraState<B> {
    /// `(du, dA, dB)`; `dA`/`dB` only when asked for.
    #[allow(
        clippy::type_complexity,
        reason = "three optional gradients, named in the doc line; a struct would be used once"
    )]
    fn adapter_grads(
        &self,
        dy: &Tensor<B, 2>,
        want_a: bool,
        want_b: bool,
    ) -> (Tensor<B, 2>, Option<Float<B>>, Option<Float<B>>) {
        let b = wrap::<B, 2>(self.b.clone());
        let du = B::matmul_small(dy.clone(), b.clone(), false, false, self.scale);
        // Parameter gradients are computed and kept in the parameters' type (f32): with f16
        // activations, small gradients would underflow in f16.
        let (a_type, b_type) = (wrap::<B, 2>(self.a.clone()).dtype(), b.dtype());
        let db = want_b.then(|| {
            unwrap(to_dtype(
                B::matmul_small(
                    widen(dy.clone()),
                    wrap(self.u.clone()),
                    true,
                    false,
                    self.scale,
                ),
                b_type,
            ))
        });
        let da = want_a.then(|| {
            unwrap(to_dtype(
                B::matmul_small(
                    widen(du.clone()),
                    wrap(self.x_drop.clone()),
                    true,
                    false,
                    1.0,
                ),
                a_type,
            ))
        });
        (du, da, db)
    }
}

/// No dropout: parents `[x, a, b]`, and `dx` takes both paths in one kernel.
#[derive(Debug)]
struct LoraBackward;

impl<B: KernelBackend> Backward<B, 3> for LoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dy = wrap::<B, 2>(grads.consume::<B>(&ops.node));
        let [x, a, b] = ops.parents;
        let (du, da, db) = s.adapter_grads(&dy, a.is_some(), b.is_some());
        if let Some(x) = x {
            let dx = B::q_matmul_t(dy, &s.w, Some((du, wrap(s.a.clone()))));
            grads.register::<B>(x.id, unwrap(dx));
        }
        if let (Some(a), Some(da)) = (a, da) {
            grads.register::<B>(a.id, da);
        }
        if let (Some(b), Some(db)) = (b, db) {
            grads.register::<B>(b.id, db);
        }
    }
}

/// With dropout: parents `[x, x_drop, a, b]`.
#[derive(Debug)]
struct LoraDropBackward;

impl<B: KernelBackend> Backward<B, 4> for LoraDropBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dy = wrap::<B, 2>(grads.consume::<B>(&ops.node));
        let [x, x_drop, a, b] = ops.parents;
        let (du, da, db) = s.adapter_grads(&dy, a.is_some(), b.is_some());
        if let Some(x_drop) = x_drop {
            let dxd = B::matmul_small(du, wrap(s.a.clone()), false, false, 1.0);
            grads.register::<B>(x_drop.id, unwrap(dxd));
        }
        if let Some(x) = x {
            grads.register::<B>(x.id, unwrap(B::q_matmul_t(dy, &s.w, None)));
        }
        if let (Some(a), Some(da)) = (a, da) {
            grads.register::<B>(a.id, da);
        }
        if let (Some(b), Some(db)) = (b, db) {
            grads.register::<B>(b.id, db);
        }
    }
}

/// The summed NLL of labelled rows: the backward is `softmax − onehot` from the logits kept
/// here, one op instead of burn's chain through log-softmax and gather.
#[derive(Debug)]
struct NllBackward;

impl<B: KernelBackend> Backward<B, 1> for NllBackward {
    type State = (Float<B>, Vec<Option<u32>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, labels) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let grad = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(grad));
            unwrap(B::nll_backward(wrap(logits), &labels, grad))
        });
    }
}

/// SwiGLU's gating, `silu(gate) · up`: both gradients from the inputs kept here
/// ([`KernelBackend::swiglu_backward`]), where burn's chain through sigmoid kept and walked
/// four tensors of the layer's width.
#[derive(Debug)]
struct SwigluBackward;

impl<B: KernelBackend> Backward<B, 2> for SwigluBackward {
    type State = (Float<B>, Float<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let dy = grads.consume::<B>(&ops.node);
        let (d_gate, d_up) = B::swiglu_backward(wrap(gate), wrap(up), wrap(dy));
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<B>(node.id, d_gate.into_primitive().tensor());
        }
        if let Some(node) = up_node {
            grads.register::<B>(node.id, d_up.into_primitive().tensor());
        }
    }
}

/// Softmax over the last dimension: the gradient from the output kept here
/// ([`KernelBackend::row_softmax_backward`]).
#[derive(Debug)]
struct SoftmaxBackward;

impl<B: KernelBackend> Backward<B, 1> for SoftmaxBackward {
    type State = Float<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            unwrap(B::row_softmax_backward(wrap::<B, 4>(y), wrap(dy)))
        });
    }
}

/// RMSNorm with its weight held fixed: the gradient at `x` from `x` kept here
/// ([`KernelBackend::rms_norm_backward`]).
#[derive(Debug)]
struct RmsNormBackward;

impl<B: KernelBackend> Backward<B, 1> for RmsNormBackward {
    /// x, the weight, eps.
    type State = (Float<B>, Float<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, eps) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            unwrap(B::rms_norm_backward(wrap(x), &wrap(w), wrap(dy), eps))
        });
    }
}

/// RoPE: the gradient at `x` is `dy` rotated back ([`KernelBackend::rope_backward`]); the
/// tables are kept here.
#[derive(Debug)]
struct RopeBackward;

impl<B: KernelBackend> Backward<B, 1> for RopeBackward {
    /// cos, sin.
    type State = (Float<B>, Float<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |dy| {
            unwrap(B::rope_backward(wrap(dy), &wrap(cos), &wrap(sin)))
        });
    }
}

impl<B: KernelBackend, C: CheckpointStrategy> KernelBackend for Autodiff<B, C> {
    /// The inner backend's pass, with [`RmsNormBackward`] where the inner backend has one
    /// ([`KernelBackend::row_op_gradients`]) and the weight is not trained; else burn's
    /// backward of the reference's tensor ops.
    fn rms_norm(x: Tensor<Self, 3>, weight: &Tensor<Self, 1>, eps: f64) -> Tensor<Self, 3> {
        if !B::row_op_gradients() || weight.is_require_grad() {
            return super::reference::rms_norm(x, weight, eps);
        }
        let w = weight.clone().inner();
        let x = x.into_primitive().tensor();
        let y = |x| unwrap(B::rms_norm(wrap::<B, 3>(x), &w, eps));
        let out = match RmsNormBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = y(x.primitive.clone());
                prep.finish((x.primitive, unwrap(w.clone()), eps), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(y(x.primitive)),
        };
        wrap(out)
    }

    /// The inner backend's pass, with [`RopeBackward`] where the inner backend has one; else
    /// burn's backward of the reference's tensor ops.
    fn rope(
        x: Tensor<Self, 3>,
        cos: &Tensor<Self, 2>,
        sin: &Tensor<Self, 2>,
        heads: usize,
    ) -> Tensor<Self, 4> {
        if !B::row_op_gradients() {
            return super::reference::rope(x, cos, sin, heads);
        }
        let (cos, sin) = (cos.clone().inner(), sin.clone().inner());
        let x = x.into_primitive().tensor();
        let y = |x| unwrap(B::rope(wrap::<B, 3>(x), &cos, &sin, heads));
        let out = match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = y(x.primitive);
                prep.finish((unwrap(cos.clone()), unwrap(sin.clone())), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(y(x.primitive)),
        };
        wrap(out)
    }

    fn row_softmax(x: Tensor<Self, 4>) -> Tensor<Self, 4> {
        let x = x.into_primitive().tensor();
        let y = |x| {
            let x = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
            B::row_softmax(x).into_primitive().tensor()
        };
        let out = match SoftmaxBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = y(x.primitive);
                prep.finish(out.clone(), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(y(x.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        let gate = gate.into_primitive().tensor();
        let up = up.into_primitive().tensor();
        let y = |g, u| unwrap(B::swiglu(wrap::<B, 3>(g), wrap(u)));
        let out = match SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = y(gate.primitive.clone(), up.primitive.clone());
                prep.finish((gate.primitive, up.primitive), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(y(gate.primitive, up.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn q_matmul(x: Tensor<Self, 2>, w: &QTensor<Self>) -> Tensor<Self, 2> {
        let x = x.into_primitive().tensor();
        let w = w.cast::<B>();
        let y = |x| unwrap(<B as KernelBackend>::q_matmul(wrap(x), &w));
        let out = match QMatmulBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = y(x.primitive);
                prep.finish(w.clone(), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(y(x.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn lora_matmul(
        x: Tensor<Self, 2>,
        x_drop: Option<Tensor<Self, 2>>,
        w: &QTensor<Self>,
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        scale: f32,
    ) -> Tensor<Self, 2> {
        let x = x.into_primitive().tensor();
        let a = a.into_primitive().tensor();
        let b = b.into_primitive().tensor();
        let w = w.cast::<B>();
        let x_drop = x_drop.map(|t| t.into_primitive().tensor());
        let xd_inner = x_drop
            .as_ref()
            .map_or_else(|| x.primitive.clone(), |t| t.primitive.clone());
        // The forward on the inner backend: u = x_d·Aᵀ, then the fused product.
        let u = B::matmul_small(
            wrap(xd_inner.clone()),
            wrap(a.primitive.clone()),
            false,
            true,
            1.0,
        );
        let y = unwrap(B::q_matmul_lora(
            wrap(x.primitive.clone()),
            &w,
            &LoraEpilogue {
                u: u.clone(),
                b: wrap(b.primitive.clone()),
                scale,
            },
        ));
        let state = || LoraState {
            x_drop: xd_inner.clone(),
            u: unwrap(u.clone()),
            a: a.primitive.clone(),
            b: b.primitive.clone(),
            w: w.clone(),
            scale,
        };
        let out = match x_drop {
            None => match LoraBackward
                .prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state(), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
            Some(xd) => match LoraDropBackward
                .prepare::<C>([
                    x.node.clone(),
                    xd.node.clone(),
                    a.node.clone(),
                    b.node.clone(),
                ])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state(), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            },
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn memory_reserved(device: &Self::Device) -> Option<u64> {
        B::memory_reserved(device)
    }

    fn supports_f16(device: &Self::Device) -> bool {
        B::supports_f16(device)
    }

    fn dropout_mask(
        dims: [usize; 2],
        keep: f64,
        seed: u64,
        device: &Self::Device,
    ) -> Tensor<Self, 2> {
        Tensor::from_inner(B::dropout_mask(dims, keep, seed, device))
    }

    fn nll(logits: Tensor<Self, 2>, labels: &[Option<u32>]) -> Tensor<Self, 1> {
        let logits = logits.into_primitive().tensor();
        let loss = |l| B::nll(wrap(l), labels).into_primitive().tensor();
        let out = match NllBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = loss(logits.primitive.clone());
                prep.finish((logits.primitive, labels.to_vec()), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(loss(logits.primitive)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn computes(format: crate::quant::QFormat) -> bool {
        B::computes(format)
    }

    fn default_base(device: &Self::Device) -> Option<crate::quant::QFormat> {
        B::default_base(device)
    }

    fn max_tensor_bytes(device: &Self::Device) -> Option<u64> {
        B::max_tensor_bytes(device)
    }

    fn kernels_impl() -> &'static str {
        B::kernels_impl()
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Tensor, TensorData};

    use crate::kernels::{KernelBackend, reference};

    type Ad = Autodiff<Flex>;

    /// The NLL's own backward gives burn's gradient of the tensor-op reference, scaled as the
    /// loss is downstream.
    #[test]
    fn nll_gradient_matches_autodiff_of_the_reference() {
        let (rows, vocab) = (4, 11);
        let v: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3)
            .collect();
        let labels = [Some(2), Some(10), None, Some(0)];
        let grad_of = |ours: bool| {
            let logits = Tensor::<Ad, 2>::from_data(
                TensorData::new(v.clone(), [rows, vocab]),
                &Default::default(),
            )
            .require_grad();
            let loss = if ours {
                <Ad as KernelBackend>::nll(logits.clone(), &labels)
            } else {
                reference::nll(logits.clone(), &labels)
            };
            let grads = (loss * 0.25).backward();
            let g = logits.grad(&grads).expect("a gradient at the logits");
            g.into_data().to_vec::<f32>().unwrap()
        };
        let (ours, want) = (grad_of(true), grad_of(false));
        for (g, w) in ours.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert!(ours[2 * vocab..3 * vocab].iter().all(|&g| g == 0.0));
    }

    /// The softmax's own backward gives burn's gradient of its softmax, with positions hidden
    /// by `-∞` as attention's mask hides them.
    #[test]
    fn softmax_gradient_matches_autodiff_of_burns() {
        let dims = [2, 3, 5, 17];
        let n: usize = dims.iter().product();
        let x: Vec<f32> = (0..n)
            .map(|i| {
                if i % 17 > 12 && (i / 17) % 2 == 0 {
                    f32::NEG_INFINITY
                } else {
                    ((i * 37 % 29) as f32 - 14.0) * 0.4
                }
            })
            .collect();
        let w: Vec<f32> = (0..n).map(|i| ((i * 11 % 13) as f32 - 6.0) * 0.2).collect();
        let grad_of = |ours: bool| {
            let x =
                Tensor::<Ad, 4>::from_data(TensorData::new(x.clone(), dims), &Default::default())
                    .require_grad();
            let y = if ours {
                <Ad as KernelBackend>::row_softmax(x.clone())
            } else {
                burn::tensor::activation::softmax(x.clone(), 3)
            };
            let w =
                Tensor::<Ad, 4>::from_data(TensorData::new(w.clone(), dims), &Default::default());
            let grads = (y.clone() * w).sum().backward();
            let g = x.grad(&grads).expect("a gradient at x").into_data();
            (
                y.into_data().to_vec::<f32>().unwrap(),
                g.to_vec::<f32>().unwrap(),
            )
        };
        let (ours, want) = (grad_of(true), grad_of(false));
        for (g, w) in ours
            .0
            .iter()
            .chain(&ours.1)
            .zip(want.0.iter().chain(&want.1))
        {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// SwiGLU's own backward gives burn's gradients of the tensor-op reference at both inputs,
    /// on burn-flex (one pass a gradient) and through the reference's own formula.
    #[test]
    fn swiglu_gradients_match_autodiff_of_the_reference() {
        let dims = [2, 3, 40];
        let n: usize = dims.iter().product();
        let v = |seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 37 + seed) % 29) as f32 * 0.5 - 7.0)
                .collect()
        };
        let input = |seed| {
            Tensor::<Ad, 3>::from_data(TensorData::new(v(seed), dims), &Default::default())
                .require_grad()
        };
        let grads_of = |ours: bool| {
            let (gate, up) = (input(3), input(11));
            let y = if ours {
                <Ad as KernelBackend>::swiglu(gate.clone(), up.clone())
            } else {
                reference::swiglu(gate.clone(), up.clone())
            };
            // A weight per output, so that each gets its own dy.
            let w = Tensor::<Ad, 3>::from_data(TensorData::new(v(5), dims), &Default::default());
            let grads = (y * w).sum().backward();
            let g = |t: &Tensor<Ad, 3>| t.grad(&grads).expect("a gradient").into_data();
            (
                g(&gate).to_vec::<f32>().unwrap(),
                g(&up).to_vec::<f32>().unwrap(),
            )
        };
        let (ours, want) = (grads_of(true), grads_of(false));
        let close = |a: &[f32], b: &[f32]| {
            for (g, w) in a.iter().zip(b) {
                assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
            }
        };
        close(&ours.0, &want.0);
        close(&ours.1, &want.1);
        // The tensor-op formula other backends run agrees with burn-flex's passes.
        let flex = |seed| {
            Tensor::<Flex, 3>::from_data(TensorData::new(v(seed), dims), &Default::default())
        };
        let (g, u, dy) = (flex(3), flex(11), flex(5));
        let fast = <Flex as KernelBackend>::swiglu_backward(g.clone(), u.clone(), dy.clone());
        let formula = reference::swiglu_backward(g, u, dy);
        let data = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
        close(&data(fast.0), &data(formula.0));
        close(&data(fast.1), &data(formula.1));
    }

    /// RMSNorm's and RoPE's own backward give burn's gradients of the tensor-op references at
    /// x (and the same outputs), on burn-flex; and burn-flex's one-pass gradients agree with the
    /// tensor-op formulas other backends run.
    #[test]
    fn rms_norm_and_rope_gradients_match_autodiff_of_the_reference() {
        let (heads, d, seq) = (3, 8, 5);
        let dims = [2, seq, heads * d];
        let n: usize = dims.iter().product();
        let v = |seed: usize, len: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 37 + seed) % 29) as f32 * 0.25 - 3.5)
                .collect()
        };
        let dev = Default::default();
        let table =
            |seed| Tensor::<Ad, 2>::from_data(TensorData::new(v(seed, seq * d), [seq, d]), &dev);
        let (cos, sin) = (table(7), table(13));
        let weight =
            Tensor::<Ad, 1>::from_data(TensorData::new(v(2, heads * d), [heads * d]), &dev);
        let close = |a: &[f32], b: &[f32]| {
            assert_eq!(a.len(), b.len());
            for (g, w) in a.iter().zip(b) {
                assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
            }
        };
        let data = |t: Tensor<Ad, 3>| t.into_data().to_vec::<f32>().unwrap();
        // Both ops in a row, as a layer runs them, with a weight per output for its own dy.
        let run = |ours: bool| {
            let x = Tensor::<Ad, 3>::from_data(TensorData::new(v(3, n), dims), &dev).require_grad();
            let (normed, rotated) = if ours {
                let normed = <Ad as KernelBackend>::rms_norm(x.clone(), &weight, 1e-5);
                let rotated = <Ad as KernelBackend>::rope(normed.clone(), &cos, &sin, heads);
                (normed, rotated)
            } else {
                let normed = reference::rms_norm(x.clone(), &weight, 1e-5);
                let rotated = reference::rope(normed.clone(), &cos, &sin, heads);
                (normed, rotated)
            };
            let w = Tensor::<Ad, 4>::from_data(TensorData::new(v(5, n), [2, heads, seq, d]), &dev);
            let grads = (rotated.clone() * w).sum().backward();
            let g = x.grad(&grads).expect("a gradient at x").into_data();
            (
                data(normed),
                rotated.into_data().to_vec::<f32>().unwrap(),
                g.to_vec::<f32>().unwrap(),
            )
        };
        let (ours, want) = (run(true), run(false));
        close(&ours.0, &want.0);
        close(&ours.1, &want.1);
        close(&ours.2, &want.2);
        // burn-flex's passes against the tensor-op formulas.
        let flex3 = |seed| Tensor::<Flex, 3>::from_data(TensorData::new(v(seed, n), dims), &dev);
        let (x, dy) = (flex3(3), flex3(5));
        let w = weight.clone().inner();
        let fast = <Flex as KernelBackend>::rms_norm_backward(x.clone(), &w, dy.clone(), 1e-5);
        let formula = reference::rms_norm_backward(x, &w, dy, 1e-5);
        let flat = |t: Tensor<Flex, 3>| t.into_data().to_vec::<f32>().unwrap();
        close(&flat(fast), &flat(formula));
        let dy = Tensor::<Flex, 4>::from_data(TensorData::new(v(9, n), [2, heads, seq, d]), &dev);
        let (c, s) = (cos.clone().inner(), sin.clone().inner());
        let fast = <Flex as KernelBackend>::rope_backward(dy.clone(), &c, &s);
        let formula = reference::rope_backward(dy, &c, &s);
        close(&flat(fast), &flat(formula));
    }
}
