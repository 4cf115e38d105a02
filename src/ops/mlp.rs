//! The SwiGLU feed-forward `down(silu(gate(x)) * up(x))` as one operation, so that training can
//! keep only its input: under autodiff the gate and up projections (`[tokens, intermediate]`
//! each, 6x the hidden size for Qwen3-8B) are recomputed in the backward by two more GEMMs
//! instead of being kept from the forward. At Qwen3-8B and 4K tokens that is 7 GB less, for ~4%
//! more step time (docs/performance.md). The block's RMSNorm in front of it can be part of the
//! operation too ([`NormFirst`]): then only the residual stream is kept (not also its normalised
//! copy, 1.1 GB at that size) and the norm is recomputed in the backward (one memory-bound pass).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::ops::FloatTensor;

use super::elementwise::{ElementwiseBackend, burn_ops};
use super::linear::{LinearBackend, float};

/// An RMSNorm applied to the MLP's input first: `weight` (in the input's dtype) and `eps`.
pub struct NormFirst<B: burn::tensor::backend::Backend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

/// Backends that run [`swiglu_mlp`]. The default composes the norm, linear and SwiGLU operations
/// (and so keeps their activations under autodiff); the autodiff backend overrides it with a
/// node that recomputes them.
pub trait MlpBackend: LinearBackend + ElementwiseBackend {
    /// # Shapes
    /// - `x`: `[..., hidden]`; `gate`, `up`: `[intermediate, hidden]`; `down`:
    ///   `[hidden, intermediate]` (Hugging Face layout, no biases) → `[..., hidden]`
    fn swiglu_mlp<const D: usize>(
        x: Tensor<Self, D>,
        norm: Option<NormFirst<Self>>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, D> {
        let x = match norm {
            Some(norm) => Self::rms_norm(x, norm.weight, norm.eps),
            None => x,
        };
        let hidden = Self::swiglu(
            Self::linear_hf(x.clone(), gate, None),
            Self::linear_hf(x, up, None),
        );
        Self::linear_hf(hidden, down, None)
    }
}

/// `down(silu(gate(n)) * up(n))` with `n = norm(x)` (or `x` without a norm), keeping only `x`
/// for the backward under autodiff.
pub fn swiglu_mlp<B: MlpBackend, const D: usize>(
    x: Tensor<B, D>,
    norm: Option<NormFirst<B>>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
) -> Tensor<B, D> {
    B::swiglu_mlp(x, norm, gate, up, down)
}

impl MlpBackend for crate::backend::Cpu {}

#[cfg(feature = "cuda")]
impl MlpBackend for crate::backend::Cuda {}

impl<B: MlpBackend, C: CheckpointStrategy> MlpBackend for Autodiff<B, C> {
    fn swiglu_mlp<const D: usize>(
        x: Tensor<Self, D>,
        norm: Option<NormFirst<Self>>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, D> {
        #[derive(Debug)]
        struct MlpBackward<const D: usize>;

        impl<B: MlpBackend, const D: usize> Backward<B, 5> for MlpBackward<D> {
            /// The input and the three weights (handles to the model's own tensors), and the
            /// norm's weight and eps where the norm is part of the node.
            type State = ([FloatTensor<B>; 4], Option<(FloatTensor<B>, f64)>);

            fn backward(
                self,
                ops: Ops<Self::State, 5>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_norm, node_gate, node_up, node_down] = ops.parents;
                let grad = float::<B, D>(grads.consume::<B>(&ops.node));
                let ([x, w_gate, w_up, w_down], norm) = ops.state;
                let x = float::<B, D>(x);
                let norm = norm.map(|(weight, eps)| (float::<B, 1>(weight), eps));
                let [w_gate, w_up, w_down] = [w_gate, w_up, w_down].map(float::<B, 2>);
                // The recomputation: the forward's norm and its gate and up projections.
                let normed = match &norm {
                    Some((weight, eps)) => B::rms_norm(x.clone(), weight.clone(), *eps),
                    None => x.clone(),
                };
                let gate = B::linear_hf(normed.clone(), w_gate.clone(), None);
                let up = B::linear_hf(normed.clone(), w_up.clone(), None);
                if let Some(node) = node_down {
                    let hidden = B::swiglu(gate.clone(), up.clone());
                    let dw = B::linear_hf_weight_grad(grad.clone(), hidden);
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                let d_hidden = B::linear_hf_input_grad(grad, w_down);
                let (d_gate, d_up) = B::swiglu_grads(gate, up, d_hidden);
                if let Some(node) = node_gate {
                    let dw = B::linear_hf_weight_grad(d_gate.clone(), normed.clone());
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                if let Some(node) = node_up {
                    let dw = B::linear_hf_weight_grad(d_up.clone(), normed);
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                if node_x.is_none() && node_norm.is_none() {
                    return;
                }
                let d_normed =
                    B::linear_hf_input_grad(d_gate, w_gate) + B::linear_hf_input_grad(d_up, w_up);
                let dx = match norm {
                    None => d_normed,
                    Some((weight, eps)) => {
                        if let Some(node) = node_norm {
                            let dtype = weight.dtype();
                            let dw = burn_ops::rms_norm_weight_grad(
                                x.clone(),
                                eps,
                                d_normed.clone(),
                                dtype,
                            );
                            grads.register::<B>(node.id, dw.into_primitive().tensor());
                        }
                        B::rms_norm_input_grad(x, weight, eps, d_normed)
                    }
                };
                if let Some(node) = node_x {
                    grads.register::<B>(node.id, dx.into_primitive().tensor());
                }
            }
        }

        // Without a norm the second parent is an untracked stand-in (never read, never
        // differentiated).
        let eps = norm.as_ref().map(|n| n.eps);
        let norm_weight = match norm {
            Some(norm) => norm.weight,
            None => Tensor::from_inner(Tensor::<B, 1>::zeros([1], &x.device().into())),
        };
        let norm_weight = norm_weight.into_primitive().tensor();
        let [x, gate, up, down] = [
            x.into_primitive().tensor(),
            gate.into_primitive().tensor(),
            up.into_primitive().tensor(),
            down.into_primitive().tensor(),
        ];
        let inner_norm = eps.map(|eps| NormFirst {
            weight: float::<B, 1>(norm_weight.primitive.clone()),
            eps,
        });
        let y = B::swiglu_mlp(
            float::<B, D>(x.primitive.clone()),
            inner_norm,
            float(gate.primitive.clone()),
            float(up.primitive.clone()),
            float(down.primitive.clone()),
        )
        .into_primitive()
        .tensor();
        let output = match MlpBackward::<D>
            .prepare::<C>([
                x.node.clone(),
                norm_weight.node.clone(),
                gate.node.clone(),
                up.node.clone(),
                down.node.clone(),
            ])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                (
                    [x.primitive, gate.primitive, up.primitive, down.primitive],
                    eps.map(|eps| (norm_weight.primitive, eps)),
                ),
                y,
            ),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        float(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuAutodiff};
    use burn::tensor::{Distribution, TensorData};

    type Ad = CpuAutodiff;

    /// Output and every gradient (input, norm weight, gate, up, down; each combination of which
    /// is tracked) equal burn's autodiff of the composed norm, linear and SwiGLU operations, with
    /// and without the norm in the node.
    #[test]
    fn recomputing_node_matches_the_composed_graph() {
        let device = Default::default();
        let random = |shape: [usize; 2]| {
            Tensor::<Cpu, 2>::random(shape, Distribution::Normal(0.0, 0.5), &device)
        };
        let x = Tensor::<Cpu, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
        let norm_weight = Tensor::<Cpu, 1>::random([8], Distribution::Normal(1.0, 0.3), &device);
        let weights = [random([12, 8]), random([12, 8]), random([8, 12])];
        let mix: Vec<f32> = (0..2 * 3 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        for with_norm in [false, true] {
            for tracked in [
                [true, false, false, false, false],
                [true, true, true, true, true],
                [false, true, true, false, true],
                [false, false, true, false, true],
            ] {
                let run = |node: bool| {
                    let leaf = |t, on: bool| {
                        let t = Tensor::<Ad, 2>::from_inner(t);
                        if on { t.require_grad() } else { t }
                    };
                    let xa = Tensor::<Ad, 3>::from_inner(x.clone());
                    let xa = if tracked[0] { xa.require_grad() } else { xa };
                    let wn = Tensor::<Ad, 1>::from_inner(norm_weight.clone());
                    let wn = if tracked[1] { wn.require_grad() } else { wn };
                    let [g, u, d] =
                        std::array::from_fn(|i| leaf(weights[i].clone(), tracked[i + 2]));
                    let norm = with_norm.then(|| NormFirst {
                        weight: wn.clone(),
                        eps: 1e-6,
                    });
                    let y = if node {
                        swiglu_mlp(xa.clone(), norm, g.clone(), u.clone(), d.clone())
                    } else {
                        let n = match norm {
                            Some(norm) => Ad::rms_norm(xa.clone(), norm.weight, norm.eps),
                            None => xa.clone(),
                        };
                        Ad::linear_hf(
                            Ad::swiglu(
                                Ad::linear_hf(n.clone(), g.clone(), None),
                                Ad::linear_hf(n, u.clone(), None),
                            ),
                            d.clone(),
                            None,
                        )
                    };
                    let weights = Tensor::<Ad, 3>::from_data(
                        TensorData::new(mix.clone(), [2, 3, 8]),
                        &Default::default(),
                    );
                    let grads = (y.clone() * weights).sum().backward();
                    let values = |t: Tensor<Cpu, 3>| t.into_data().to_vec::<f32>().unwrap();
                    let values1 = |t: Tensor<Cpu, 1>| t.into_data().to_vec::<f32>().unwrap();
                    let values2 = |t: Tensor<Cpu, 2>| t.into_data().to_vec::<f32>().unwrap();
                    (
                        values(y.inner()),
                        xa.grad(&grads).map(values),
                        wn.grad(&grads).map(values1),
                        [g, u, d].map(|w| w.grad(&grads).map(values2)),
                    )
                };
                let (y, dx, dn, dw) = run(true);
                let (y_ref, dx_ref, dn_ref, dw_ref) = run(false);
                let close = |a: &[f32], b: &[f32]| {
                    assert_eq!(a.len(), b.len());
                    for (p, q) in a.iter().zip(b) {
                        assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
                    }
                };
                close(&y, &y_ref);
                assert_eq!(dx.is_some(), tracked[0]);
                if let (Some(a), Some(b)) = (dx, dx_ref) {
                    close(&a, &b);
                }
                assert_eq!(dn.is_some(), tracked[1] && with_norm, "norm weight");
                assert_eq!(dn.is_some(), dn_ref.is_some());
                if let (Some(a), Some(b)) = (dn, dn_ref) {
                    close(&a, &b);
                }
                for (i, (a, b)) in dw.into_iter().zip(dw_ref).enumerate() {
                    assert_eq!(a.is_some(), tracked[i + 2], "weight {i}");
                    if let (Some(a), Some(b)) = (a, b) {
                        close(&a, &b);
                    }
                }
            }
        }
    }
}
