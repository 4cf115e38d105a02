//! RMSNorm, SwiGLU, RoPE and the per-token distillation KL as backend operations, so a backend can
//! run each as one fused kernel:
//! - burn without kernel fusion runs them as 5-10 separate elementwise passes each (f32 casts,
//!   powers, means, reciprocals, products). On CUDA they are one NVRTC kernel each
//!   (`super::cuda::elementwise`), forward and backward;
//! - under autodiff each is one graph node that keeps only its inputs (the norm's and SwiGLU's
//!   bf16 inputs; nothing for RoPE) and recomputes the rest in its backward. burn's graph of the
//!   same formulas kept ~40 hidden-sized vectors per token and layer (f32 norm copies, SwiGLU's
//!   intermediates), 3x the memory of the official step at 4K tokens (docs/performance.md).
//!   The KL node keeps the two logits tensors only; burn's graph kept four f32 copies of them
//!   (casts, log-softmaxes, their product).
//!
//! The defaults ([`burn_ops`]) are the tensor-op formulas: the CPU's path, CUDA's fallback, and the
//! reference the fused kernels are compared against (`bench elementwise`).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, backend::Backend};

use super::linear::float;

/// Backends that run [`rms_norm`], [`swiglu`], [`rope`] and [`token_kl`]. The defaults are
/// [`burn_ops`].
pub trait ElementwiseBackend: Backend {
    /// `weight * round(x / rms(x))`, statistics in f32 whatever the activation dtype (as
    /// transformers does); `weight` is in `x`'s dtype.
    ///
    /// # Shapes
    /// - `x`: `[..., dim]`, `weight`: `[dim]` → same as `x`
    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        burn_ops::rms_norm(x, weight, eps)
    }

    /// The input gradient of [`Self::rms_norm`], recomputing the statistics from `x`.
    fn rms_norm_input_grad<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, D>,
    ) -> Tensor<Self, D> {
        burn_ops::rms_norm_input_grad(x, weight, eps, grad)
    }

    /// `silu(gate) * up`.
    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        burn_ops::swiglu(gate, up)
    }

    /// The gradients of [`Self::swiglu`] with respect to `gate` and `up`.
    fn swiglu_grads<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        grad: Tensor<Self, D>,
    ) -> (Tensor<Self, D>, Tensor<Self, D>) {
        burn_ops::swiglu_grads(gate, up, grad)
    }

    /// Rotates `x` by the angles whose cosines and sines are tabulated per position; `inverse`
    /// rotates back (the backward of a rotation is its inverse). The tables hold each frequency
    /// twice (`[f_0 .. f_{d/2-1}, f_0 .. f_{d/2-1}]`, see [`crate::model::RopeTables`]).
    ///
    /// # Shapes
    /// - `x`: `[batch, heads, seq, head_dim]` (any layout), `cos`, `sin`: `[seq, head_dim]` →
    ///   `[batch, heads, seq, head_dim]`
    fn rope(
        x: Tensor<Self, 4>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        inverse: bool,
    ) -> Tensor<Self, 4> {
        burn_ops::rope(x, cos, sin, inverse)
    }

    /// `KL(softmax(student) ‖ softmax(teacher))` over the last axis, in f32 whatever the logits'
    /// dtype: `Σ_v p_s (log p_s - log p_t)`, where entries with `p_s = 0` count 0.
    ///
    /// # Shapes
    /// - `student`, `teacher`: `[batch, seq, vocab]` → f32 `[batch, seq]`
    fn token_kl(student: Tensor<Self, 3>, teacher: Tensor<Self, 3>) -> Tensor<Self, 2> {
        burn_ops::token_kl(student, teacher)
    }

    /// The gradient of [`Self::token_kl`] with respect to `student` for the per-token gradient
    /// `grad`: `grad · p_s (log p_s - log p_t - KL)`, in `student`'s dtype.
    fn token_kl_student_grad(
        student: Tensor<Self, 3>,
        teacher: Tensor<Self, 3>,
        grad: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        burn_ops::token_kl_student_grad(student, teacher, grad)
    }
}

/// The operations with burn's tensor ops.
pub mod burn_ops {
    use burn::tensor::{FloatDType, Tensor, activation, backend::Backend};

    use crate::model::decoder::in_dtype;

    pub fn rms_norm<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        weight: Tensor<B, 1>,
        eps: f64,
    ) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let normed = x.clone() * inverse_rms(x, eps);
        normed.cast(dtype) * weight.unsqueeze::<D>()
    }

    /// `1 / sqrt(mean(x²) + eps)` over the last axis, kept as a size-1 axis.
    fn inverse_rms<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
        (x.powi_scalar(2).mean_dim(D - 1) + eps).sqrt().recip()
    }

    /// With `x̂ = x / rms(x)` and `g = grad * weight`: `dx = (g - x̂ · mean(g x̂)) / rms(x)`.
    pub fn rms_norm_input_grad<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        weight: Tensor<B, 1>,
        eps: f64,
        grad: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x = x.cast(FloatDType::F32);
        let g = (grad * weight.unsqueeze::<D>()).cast(FloatDType::F32);
        let inv = inverse_rms(x.clone(), eps);
        let normed = x * inv.clone();
        let mean_dot = (g.clone() * normed.clone()).mean_dim(D - 1);
        ((g - normed * mean_dot) * inv).cast(dtype)
    }

    /// `dweight = Σ_rows grad · round(x / rms(x))`, in the weight's dtype `dtype`.
    pub fn rms_norm_weight_grad<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        eps: f64,
        grad: Tensor<B, D>,
        dtype: burn::tensor::DType,
    ) -> Tensor<B, 1> {
        let x_dtype = x.dtype();
        let x32 = x.cast(FloatDType::F32);
        let normed = (x32.clone() * inverse_rms(x32, eps)).cast(x_dtype);
        let product = (grad * normed).cast(FloatDType::F32);
        let dim = product.dims()[D - 1];
        in_dtype(
            product.reshape([-1, dim as i32]).sum_dim(0).reshape([dim]),
            dtype,
        )
    }

    pub fn swiglu<B: Backend, const D: usize>(
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
    ) -> Tensor<B, D> {
        activation::silu(gate) * up
    }

    /// With `s = sigmoid(gate)`: `dup = grad · gate · s`, `dgate = grad · up · s (1 + gate (1 - s))`.
    pub fn swiglu_grads<B: Backend, const D: usize>(
        gate: Tensor<B, D>,
        up: Tensor<B, D>,
        grad: Tensor<B, D>,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        let dtype = gate.dtype();
        let [gate, up, grad] = [gate, up, grad].map(|t| t.cast(FloatDType::F32));
        let s = activation::sigmoid(gate.clone());
        let d_up = grad.clone() * gate.clone() * s.clone();
        let d_gate = grad * up * s.clone() * ((s.neg() + 1.0) * gate + 1.0);
        (d_gate.cast(dtype), d_up.cast(dtype))
    }

    pub fn rope<B: Backend>(
        x: Tensor<B, 4>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        inverse: bool,
    ) -> Tensor<B, 4> {
        let [_, _, _, dim] = x.dims();
        let half = dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        // rotate_half(x) = [-x2, x1]; the inverse rotation subtracts it.
        let rotated = if inverse {
            Tensor::cat(vec![x2, x1.neg()], 3)
        } else {
            Tensor::cat(vec![x2.neg(), x1], 3)
        };
        // The tables are built in the device's default dtype; the activations may differ.
        let dtype = x.dtype();
        let cos = in_dtype(cos, dtype).unsqueeze::<4>();
        let sin = in_dtype(sin, dtype).unsqueeze::<4>();
        x * cos + rotated * sin
    }

    pub fn token_kl<B: Backend>(student: Tensor<B, 3>, teacher: Tensor<B, 3>) -> Tensor<B, 2> {
        let [batch, seq, _] = student.dims();
        let (_, _, kl) = kl_rows(student.cast(FloatDType::F32), teacher.cast(FloatDType::F32));
        kl.reshape([batch, seq])
    }

    /// Per row of f32 logits: the student's log-sum-exp, that minus the teacher's, and the KL
    /// `Σ p_s (s - t) - (lse_s - lse_t)` (0 · inf terms, where `p_s` is 0, left out), as the CUDA
    /// kernel computes them. The log-sum-exp difference is taken as `(max_s - max_t) +
    /// log(Σ_s / Σ_t)`, not as the difference of two ~16-sized values, which would lose ~1e-6:
    /// 3e-4 of the KL of a student near its teacher.
    fn kl_rows<B: Backend>(
        s: Tensor<B, 3>,
        t: Tensor<B, 3>,
    ) -> (Tensor<B, 3>, Tensor<B, 3>, Tensor<B, 3>) {
        let (max_s, max_t) = (s.clone().max_dim(2), t.clone().max_dim(2));
        let e_s = (s.clone() - max_s.clone()).exp();
        let sum_s = e_s.clone().sum_dim(2);
        let sum_t = (t.clone() - max_t.clone()).exp().sum_dim(2);
        let impossible = e_s.clone().equal_elem(0.0);
        let cross = (e_s * (s - t)).mask_fill(impossible, 0.0).sum_dim(2);
        let lse_s = max_s.clone() + sum_s.clone().log();
        let lse_diff = (max_s - max_t) + (sum_s.clone() / sum_t).log();
        let kl = cross / sum_s - lse_diff.clone();
        (lse_s, lse_diff, kl)
    }

    pub fn token_kl_student_grad<B: Backend>(
        student: Tensor<B, 3>,
        teacher: Tensor<B, 3>,
        grad: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let dtype = student.dtype();
        let (s, t) = (student.cast(FloatDType::F32), teacher.cast(FloatDType::F32));
        let (lse_s, lse_diff, kl) = kl_rows(s.clone(), t.clone());
        // g · p_s (log p_s - log p_t - KL), 0 where p_s is 0.
        let p = (s.clone() - lse_s).exp();
        let impossible = p.clone().equal_elem(0.0);
        let grad = grad.cast(FloatDType::F32).unsqueeze_dim::<3>(2);
        (p * (s - t - lse_diff - kl) * grad)
            .mask_fill(impossible, 0.0)
            .cast(dtype)
    }

    /// The teacher's gradient, `grad · (p_t - p_s)`: only for callers that track the teacher
    /// (distillation never does), so it has no fused kernel.
    pub fn token_kl_teacher_grad<B: Backend>(
        student: Tensor<B, 3>,
        teacher: Tensor<B, 3>,
        grad: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let dtype = teacher.dtype();
        let p_s = activation::softmax(student.cast(FloatDType::F32), 2);
        let p_t = activation::softmax(teacher.cast(FloatDType::F32), 2);
        let grad = grad.cast(FloatDType::F32).unsqueeze_dim::<3>(2);
        ((p_t - p_s) * grad).cast(dtype)
    }
}

/// RMSNorm of `x` with `weight` cast to `x`'s dtype (see [`ElementwiseBackend::rms_norm`]).
pub fn rms_norm<B: ElementwiseBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let weight = crate::model::decoder::in_dtype(weight, x.dtype());
    B::rms_norm(x, weight, eps)
}

/// `silu(gate) * up`.
pub fn swiglu<B: ElementwiseBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    B::swiglu(gate, up)
}

/// KL(student ‖ teacher) per token, in f32 (see [`ElementwiseBackend::token_kl`]).
pub fn token_kl<B: ElementwiseBackend>(
    student: Tensor<B, 3>,
    teacher: Tensor<B, 3>,
) -> Tensor<B, 2> {
    B::token_kl(student, teacher)
}

/// Rotary embedding of `x` `[batch, heads, seq, head_dim]` with `[seq, head_dim]` tables.
pub fn rope<B: ElementwiseBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
) -> Tensor<B, 4> {
    B::rope(x, cos, sin, false)
}

impl ElementwiseBackend for crate::backend::Cpu {}

/// CUDA runs each operation as one NVRTC kernel (`super::cuda::elementwise`), and the tensor ops
/// where that path declines.
#[cfg(feature = "cuda")]
impl ElementwiseBackend for crate::backend::Cuda {
    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        super::cuda::elementwise::rms_norm(x.clone(), weight.clone(), eps)
            .unwrap_or_else(|| burn_ops::rms_norm(x, weight, eps))
    }

    fn rms_norm_input_grad<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
        grad: Tensor<Self, D>,
    ) -> Tensor<Self, D> {
        super::cuda::elementwise::rms_norm_input_grad(x.clone(), weight.clone(), eps, grad.clone())
            .unwrap_or_else(|| burn_ops::rms_norm_input_grad(x, weight, eps, grad))
    }

    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        super::cuda::elementwise::swiglu(gate.clone(), up.clone())
            .unwrap_or_else(|| burn_ops::swiglu(gate, up))
    }

    fn swiglu_grads<const D: usize>(
        gate: Tensor<Self, D>,
        up: Tensor<Self, D>,
        grad: Tensor<Self, D>,
    ) -> (Tensor<Self, D>, Tensor<Self, D>) {
        super::cuda::elementwise::swiglu_grads(gate.clone(), up.clone(), grad.clone())
            .unwrap_or_else(|| burn_ops::swiglu_grads(gate, up, grad))
    }

    fn rope(
        x: Tensor<Self, 4>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        inverse: bool,
    ) -> Tensor<Self, 4> {
        super::cuda::elementwise::rope(x.clone(), cos.clone(), sin.clone(), inverse)
            .unwrap_or_else(|| burn_ops::rope(x, cos, sin, inverse))
    }

    fn token_kl(student: Tensor<Self, 3>, teacher: Tensor<Self, 3>) -> Tensor<Self, 2> {
        super::cuda::elementwise::token_kl(student.clone(), teacher.clone())
            .unwrap_or_else(|| burn_ops::token_kl(student, teacher))
    }

    fn token_kl_student_grad(
        student: Tensor<Self, 3>,
        teacher: Tensor<Self, 3>,
        grad: Tensor<Self, 2>,
    ) -> Tensor<Self, 3> {
        super::cuda::elementwise::token_kl_student_grad(
            student.clone(),
            teacher.clone(),
            grad.clone(),
        )
        .unwrap_or_else(|| burn_ops::token_kl_student_grad(student, teacher, grad))
    }
}

/// Under autodiff each operation is one node whose backward calls the inner backend's gradient
/// operation; the saved state is the inputs only.
impl<B: ElementwiseBackend, C: CheckpointStrategy> ElementwiseBackend for Autodiff<B, C> {
    fn rms_norm<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        eps: f64,
    ) -> Tensor<Self, D> {
        pair_node(
            x,
            weight,
            |x, weight| B::rms_norm(x, weight, eps),
            move |x, weight, grad, [x_wanted, weight_wanted]| {
                let d_weight = weight_wanted.then(|| {
                    let dtype = weight.dtype();
                    burn_ops::rms_norm_weight_grad(x.clone(), eps, grad.clone(), dtype)
                });
                let dx = x_wanted.then(|| B::rms_norm_input_grad(x, weight, eps, grad));
                (dx, d_weight)
            },
        )
    }

    fn swiglu<const D: usize>(gate: Tensor<Self, D>, up: Tensor<Self, D>) -> Tensor<Self, D> {
        pair_node(
            gate,
            up,
            |gate, up| B::swiglu(gate, up),
            |gate, up, grad, _| {
                let (d_gate, d_up) = B::swiglu_grads(gate, up, grad);
                (Some(d_gate), Some(d_up))
            },
        )
    }

    fn rope(
        x: Tensor<Self, 4>,
        cos: Tensor<Self, 2>,
        sin: Tensor<Self, 2>,
        inverse: bool,
    ) -> Tensor<Self, 4> {
        #[derive(Debug)]
        struct RopeBackward {
            inverse: bool,
        }

        impl<B: ElementwiseBackend> Backward<B, 1> for RopeBackward {
            type State = (FloatTensor<B>, FloatTensor<B>);

            fn backward(
                self,
                ops: Ops<Self::State, 1>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x] = ops.parents;
                let grad = float::<B, 4>(grads.consume::<B>(&ops.node));
                let (cos, sin) = ops.state;
                if let Some(node) = node_x {
                    let dx = B::rope(grad, float(cos), float(sin), !self.inverse);
                    grads.register::<B>(node.id, dx.into_primitive().tensor());
                }
            }
        }

        // The tables are constants: their gradients are never asked for.
        let inner = |t: Tensor<Self, 2>| t.into_primitive().tensor().primitive;
        let (cos, sin) = (inner(cos), inner(sin));
        let x = x.into_primitive().tensor();
        let y = B::rope(
            float::<B, 4>(x.primitive.clone()),
            float(cos.clone()),
            float(sin.clone()),
            inverse,
        )
        .into_primitive()
        .tensor();
        let output = match (RopeBackward { inverse })
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((cos, sin), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        float(output)
    }

    fn token_kl(student: Tensor<Self, 3>, teacher: Tensor<Self, 3>) -> Tensor<Self, 2> {
        pair_node(
            student,
            teacher,
            |student, teacher| B::token_kl(student, teacher),
            |student, teacher, grad, [student_wanted, teacher_wanted]| {
                let d_teacher = teacher_wanted.then(|| {
                    burn_ops::token_kl_teacher_grad(student.clone(), teacher.clone(), grad.clone())
                });
                let d_student =
                    student_wanted.then(|| B::token_kl_student_grad(student, teacher, grad));
                (d_student, d_teacher)
            },
        )
    }
}

/// The backward of [`pair_node`]: `grads` maps the two saved inputs, the output's gradient and
/// which inputs need a gradient to those gradients.
struct PairBackward<G, const DA: usize, const DB: usize, const DO: usize> {
    grads: G,
}

impl<G, const DA: usize, const DB: usize, const DO: usize> std::fmt::Debug
    for PairBackward<G, DA, DB, DO>
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairBackward")
    }
}

impl<B, G, const DA: usize, const DB: usize, const DO: usize> Backward<B, 2>
    for PairBackward<G, DA, DB, DO>
where
    B: Backend,
    G: FnOnce(
            Tensor<B, DA>,
            Tensor<B, DB>,
            Tensor<B, DO>,
            [bool; 2],
        ) -> (Option<Tensor<B, DA>>, Option<Tensor<B, DB>>)
        + Send
        + 'static,
{
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_a, node_b] = ops.parents;
        let grad = float::<B, DO>(grads.consume::<B>(&ops.node));
        let (a, b) = ops.state;
        let wanted = [node_a.is_some(), node_b.is_some()];
        let (da, db) = (self.grads)(float(a), float(b), grad, wanted);
        if let (Some(node), Some(da)) = (node_a, da) {
            grads.register::<B>(node.id, da.into_primitive().tensor());
        }
        if let (Some(node), Some(db)) = (node_b, db) {
            grads.register::<B>(node.id, db.into_primitive().tensor());
        }
    }
}

/// `forward` on the inner backend as one autodiff node that keeps its two inputs (nothing else)
/// and computes their gradients with `grads` (RMSNorm, SwiGLU, the distillation KL).
fn pair_node<B, C, G, const DA: usize, const DB: usize, const DO: usize>(
    a: Tensor<Autodiff<B, C>, DA>,
    b: Tensor<Autodiff<B, C>, DB>,
    forward: impl FnOnce(Tensor<B, DA>, Tensor<B, DB>) -> Tensor<B, DO>,
    grads: G,
) -> Tensor<Autodiff<B, C>, DO>
where
    B: Backend,
    C: CheckpointStrategy,
    G: FnOnce(
            Tensor<B, DA>,
            Tensor<B, DB>,
            Tensor<B, DO>,
            [bool; 2],
        ) -> (Option<Tensor<B, DA>>, Option<Tensor<B, DB>>)
        + Send
        + 'static,
{
    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    let y = forward(float(a.primitive.clone()), float(b.primitive.clone()))
        .into_primitive()
        .tensor();
    let backward = PairBackward::<G, DA, DB, DO> { grads };
    let output = match backward
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), y),
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    float(output)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuAutodiff};
    use crate::model::RopeTables;
    use burn::tensor::Distribution;

    type Ad = CpuAutodiff;

    fn random<const D: usize>(shape: [usize; D]) -> Tensor<Cpu, D> {
        Tensor::random(shape, Distribution::Normal(0.0, 1.5), &Default::default())
    }

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 2e-5 * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// Output and gradients of `op` through the autodiff nodes equal burn's autodiff of the
    /// tensor-op formulas; `mix` weights the outputs so every element's gradient differs.
    fn check_node<const D: usize, const N: usize>(
        what: &str,
        inputs: [Tensor<Cpu, D>; N],
        tracked: [bool; N],
        node: impl Fn([Tensor<Ad, D>; N]) -> Tensor<Ad, D>,
        reference: impl Fn([Tensor<Ad, D>; N]) -> Tensor<Ad, D>,
    ) {
        let run = |op: &dyn Fn([Tensor<Ad, D>; N]) -> Tensor<Ad, D>| {
            let leaves: [Tensor<Ad, D>; N] = std::array::from_fn(|i| {
                let t = Tensor::<Ad, D>::from_inner(inputs[i].clone());
                if tracked[i] { t.require_grad() } else { t }
            });
            let y = op(leaves.clone());
            // The same weights for both runs: a fixed pattern, not random draws.
            let n = y.shape().num_elements();
            let pattern: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let mix = Tensor::<Ad, D>::from_data(
                burn::tensor::TensorData::new(pattern, y.shape()),
                &Default::default(),
            );
            let grads = (y.clone() * mix).sum().backward();
            let dx: Vec<Option<Vec<f32>>> =
                leaves.iter().map(|l| l.grad(&grads).map(values)).collect();
            (values(y.inner()), dx)
        };
        let (y, dx) = run(&node);
        let (y_ref, dx_ref) = run(&reference);
        assert_close(&format!("{what} output"), y, y_ref);
        for (i, (g, r)) in dx.into_iter().zip(dx_ref).enumerate() {
            match (g, r) {
                (Some(g), Some(r)) => assert_close(&format!("{what} grad {i}"), g, r),
                (None, None) => assert!(!tracked[i]),
                (g, r) => panic!("{what} grad {i}: {:?} vs {:?}", g.is_some(), r.is_some()),
            }
        }
    }

    #[test]
    fn rms_norm_node_matches_burn_autodiff() {
        for tracked in [[true, true], [true, false], [false, true]] {
            // The weight is a 1-d tensor: broadcast it through a 3-d wrapper.
            let x = random([2, 5, 24]);
            let w = random([24]);
            let eps = 1e-6;
            check_node(
                "rms_norm",
                [x, w.reshape([1, 1, 24])],
                tracked,
                |[x, w]| rms_norm(x, w.reshape([24]), eps),
                |[x, w]| burn_ops::rms_norm(x, w.reshape([24]), eps),
            );
        }
    }

    #[test]
    fn swiglu_node_matches_burn_autodiff() {
        for tracked in [[true, true], [true, false], [false, true]] {
            check_node(
                "swiglu",
                [random([3, 4, 10]), random([3, 4, 10])],
                tracked,
                |[g, u]| swiglu(g, u),
                |[g, u]| burn_ops::swiglu(g, u),
            );
        }
    }

    /// The definition computed in f64 by hand, including a student logit of `-inf` (that token
    /// counts 0, not NaN) and the student gradient's value there (0).
    #[test]
    fn token_kl_matches_the_definition_with_impossible_tokens() {
        let student = [1.5f32, f32::NEG_INFINITY, -0.5, 0.25, 2.0];
        let teacher = [0.5f32, 1.0, -1.5, 0.75, 1.0];
        let log_softmax = |x: &[f32]| -> Vec<f64> {
            let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - lse).collect()
        };
        let (log_s, log_t) = (log_softmax(&student), log_softmax(&teacher));
        let kl: f64 = log_s
            .iter()
            .zip(&log_t)
            .filter(|(s, _)| s.is_finite())
            .map(|(s, t)| s.exp() * (s - t))
            .sum();
        let logits = |v: &[f32]| {
            Tensor::<Cpu, 3>::from_data(
                burn::tensor::TensorData::new(v.to_vec(), [1, 1, v.len()]),
                &Default::default(),
            )
        };
        let got = values(Cpu::token_kl(logits(&student), logits(&teacher)).reshape([1, 1, 1]));
        assert!((got[0] as f64 - kl).abs() < 1e-6, "{} vs {kl}", got[0]);
        let grad = Cpu::token_kl_student_grad(
            logits(&student),
            logits(&teacher),
            Tensor::ones([1, 1], &Default::default()),
        );
        let grad = values(grad);
        assert!(
            grad.iter().all(|g| g.is_finite()) && grad[1] == 0.0,
            "{grad:?}"
        );
        // d KL / d s_j = p_j (log p_j - log q_j - KL), by the definition.
        for j in [0, 2, 3, 4] {
            let p = log_s[j].exp();
            let want = p * (log_s[j] - log_t[j] - kl);
            assert!(
                (grad[j] as f64 - want).abs() < 1e-6,
                "grad {j}: {} vs {want}",
                grad[j]
            );
        }
    }

    /// Student and teacher gradients (the teacher's only where it is tracked) against burn's
    /// autodiff of the same formula (through the maxima too, whose terms cancel).
    #[test]
    fn token_kl_node_matches_burn_autodiff() {
        for tracked in [[true, false], [true, true], [false, true]] {
            check_node(
                "token_kl",
                [random([2, 3, 17]), random([2, 3, 17])],
                tracked,
                |[s, t]| token_kl(s, t).unsqueeze_dim(2),
                |[s, t]| burn_ops::token_kl(s, t).unsqueeze_dim(2),
            );
        }
    }

    /// Through a transposed view (as the decoder calls it), for a rotation and its inverse; and
    /// the inverse undoes the rotation.
    #[test]
    fn rope_node_matches_burn_autodiff_and_inverts() {
        let tables = RopeTables::<Ad>::new(&[1.0, 0.1, 0.01, 0.001], 3, 7, &Default::default());
        for inverse in [false, true] {
            let (cos, sin) = (tables.cos.clone(), tables.sin.clone());
            check_node(
                "rope",
                [random([2, 7, 3, 8])],
                [true],
                |[x]| Ad::rope(x.swap_dims(1, 2), cos.clone(), sin.clone(), inverse),
                |[x]| burn_ops::rope(x.swap_dims(1, 2), cos.clone(), sin.clone(), inverse),
            );
        }
        let x = random([1, 2, 7, 8]);
        let (cos, sin) = (tables.cos.inner(), tables.sin.inner());
        let back = Cpu::rope(
            Cpu::rope(x.clone(), cos.clone(), sin.clone(), false),
            cos,
            sin,
            true,
        );
        assert_close("rope round trip", values(back), values(x));
    }
}
