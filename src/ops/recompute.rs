//! Operations that keep less for the backward under autodiff and recompute the rest there:
//! - the SwiGLU feed-forward `down(silu(gate(x)) * up(x))`: the gate and up projections
//!   (`[tokens, intermediate]` each, 6x the hidden size for Qwen3-8B) are recomputed by two more
//!   GEMMs instead of being kept (at Qwen3-8B and 4K tokens 7 GB less, for ~4% more step time;
//!   docs/performance.md);
//! - an RMSNorm in front of a layer ([`NormFirst`]: the MLP's, or the DMS adapter's before its
//!   projection): only the norm's input is kept, which the residual stream holds anyway, not
//!   also its normalised copy (1.1 GB per norm at that size), and the norm is recomputed (one
//!   memory-bound pass).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::ops::FloatTensor;

use super::elementwise::{ElementwiseBackend, burn_ops};
use super::linear::{LinearBackend, float};

/// An RMSNorm applied to an operation's input first: `weight` (in the input's dtype) and `eps`.
#[derive(Clone, Debug)]
pub struct NormFirst<B: burn::tensor::backend::Backend> {
    pub weight: Tensor<B, 1>,
    pub eps: f64,
}

/// Backends that run [`swiglu_mlp`] and [`linear_after_norm`]. The defaults compose the norm,
/// linear and SwiGLU operations (and so keep their activations under autodiff); the autodiff
/// backend overrides them with nodes that recompute them.
pub trait RecomputeBackend: LinearBackend + ElementwiseBackend {
    /// # Shapes
    /// - `x`: `[..., d_input]`; `weight`: `[d_output, d_input]` (Hugging Face layout), `bias`:
    ///   `[d_output]` → `[..., d_output]`
    fn linear_after_norm<const D: usize>(
        x: Tensor<Self, D>,
        norm: NormFirst<Self>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        Self::linear_hf(Self::rms_norm(x, norm.weight, norm.eps), weight, bias)
    }

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
pub fn swiglu_mlp<B: RecomputeBackend, const D: usize>(
    x: Tensor<B, D>,
    norm: Option<NormFirst<B>>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
) -> Tensor<B, D> {
    B::swiglu_mlp(x, norm, gate, up, down)
}

/// `norm(x) Wᵀ + b`, keeping only `x` (and the weights) for the backward under autodiff.
pub fn linear_after_norm<B: RecomputeBackend, const D: usize>(
    x: Tensor<B, D>,
    norm: NormFirst<B>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    B::linear_after_norm(x, norm, weight, bias)
}

/// The backward of an RMSNorm whose output's gradient is `d_normed`: registers the input's and
/// the weight's gradients for whichever of `node_x` and `node_weight` is tracked.
fn norm_backward<B: ElementwiseBackend, const D: usize>(
    x: Tensor<B, D>,
    (weight, eps): (Tensor<B, 1>, f64),
    d_normed: Tensor<B, D>,
    [node_x, node_weight]: [Option<NodeId>; 2],
    grads: &mut Gradients,
) {
    if let Some(node) = node_weight {
        let dtype = weight.dtype();
        let dw = burn_ops::rms_norm_weight_grad(x.clone(), eps, d_normed.clone(), dtype);
        grads.register::<B>(node, dw.into_primitive().tensor());
    }
    if let Some(node) = node_x {
        let dx = B::rms_norm_input_grad(x, weight, eps, d_normed);
        grads.register::<B>(node, dx.into_primitive().tensor());
    }
}

impl RecomputeBackend for crate::backend::Cpu {}

#[cfg(feature = "cuda")]
impl RecomputeBackend for crate::backend::Cuda {}

impl<B: RecomputeBackend, C: CheckpointStrategy> RecomputeBackend for Autodiff<B, C> {
    fn linear_after_norm<const D: usize>(
        x: Tensor<Self, D>,
        norm: NormFirst<Self>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        #[derive(Debug)]
        struct NormLinearBackward<const D: usize> {
            eps: f64,
        }

        impl<B: RecomputeBackend, const D: usize> Backward<B, 3> for NormLinearBackward<D> {
            /// The input, the norm's weight and the projection's weight.
            type State = [FloatTensor<B>; 3];

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_norm, node_weight] = ops.parents;
                let grad = float::<B, D>(grads.consume::<B>(&ops.node));
                let [x, norm_weight, weight] = ops.state;
                let (x, norm_weight) = (float::<B, D>(x), float::<B, 1>(norm_weight));
                let weight = float::<B, 2>(weight);
                if let Some(node) = node_weight {
                    // The recomputation: the forward's normalised input.
                    let normed = B::rms_norm(x.clone(), norm_weight.clone(), self.eps);
                    let dw = B::linear_hf_weight_grad(grad.clone(), normed);
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                if node_x.is_none() && node_norm.is_none() {
                    return;
                }
                let d_normed = B::linear_hf_input_grad(grad, weight);
                let nodes = [node_x, node_norm].map(|n| n.map(|n| n.id));
                norm_backward(x, (norm_weight, self.eps), d_normed, nodes, grads);
            }
        }

        let eps = norm.eps;
        let (norm_weight, weight) = (
            norm.weight.into_primitive().tensor(),
            weight.into_primitive().tensor(),
        );
        let x = x.into_primitive().tensor();
        let y = B::linear_after_norm(
            float::<B, D>(x.primitive.clone()),
            NormFirst {
                weight: float(norm_weight.primitive.clone()),
                eps,
            },
            float(weight.primitive.clone()),
            None,
        )
        .into_primitive()
        .tensor();
        let output = match (NormLinearBackward::<D> { eps })
            .prepare::<C>([
                x.node.clone(),
                norm_weight.node.clone(),
                weight.node.clone(),
            ])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish([x.primitive, norm_weight.primitive, weight.primitive], y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        crate::ops::linear::burn_ops::plus_bias(float::<Self, D>(output), bias)
    }

    fn swiglu_mlp<const D: usize>(
        x: Tensor<Self, D>,
        norm: Option<NormFirst<Self>>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, D> {
        #[derive(Debug)]
        struct MlpBackward<const D: usize>;

        impl<B: RecomputeBackend, const D: usize> Backward<B, 5> for MlpBackward<D> {
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
                let [node_x, node_norm] = [node_x, node_norm].map(|n| n.map(|n| n.id));
                match norm {
                    Some(norm) => norm_backward(x, norm, d_normed, [node_x, node_norm], grads),
                    None => {
                        if let Some(node) = node_x {
                            grads.register::<B>(node, d_normed.into_primitive().tensor());
                        }
                    }
                }
            }
        }

        // Without a norm the second parent is an untracked stand-in (never read, never
        // differentiated).
        let eps = norm.as_ref().map(|n| n.eps);
        let norm_weight = match norm {
            Some(norm) => norm.weight,
            None => Tensor::from_inner(Tensor::<B, 1>::zeros([1], &x.device())),
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

    fn values<const D: usize>(t: Tensor<Cpu, D>) -> Vec<f32> {
        t.into_data().to_vec::<f32>().unwrap()
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        assert_eq!(a.len(), b.len());
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{p} vs {q}");
        }
    }

    /// The gradients of `Σ y · mix`: a fixed, uneven weighting of the outputs.
    fn mixed_backward(
        y: &Tensor<Ad, 3>,
        mix: &[f32],
    ) -> <Ad as burn::tensor::backend::AutodiffBackend>::Gradients {
        let mix = Tensor::<Ad, 3>::from_data(
            TensorData::new(mix.to_vec(), y.dims()),
            &Default::default(),
        );
        (y.clone() * mix).sum().backward()
    }

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
                    let grads = mixed_backward(&y, &mix);
                    (
                        values(y.inner()),
                        xa.grad(&grads).map(values),
                        wn.grad(&grads).map(values),
                        [g, u, d].map(|w| w.grad(&grads).map(values)),
                    )
                };
                let (y, dx, dn, dw) = run(true);
                let (y_ref, dx_ref, dn_ref, dw_ref) = run(false);
                assert_close(&y, &y_ref);
                assert_eq!(dx.is_some(), tracked[0]);
                if let (Some(a), Some(b)) = (dx, dx_ref) {
                    assert_close(&a, &b);
                }
                assert_eq!(dn.is_some(), tracked[1] && with_norm, "norm weight");
                assert_eq!(dn.is_some(), dn_ref.is_some());
                if let (Some(a), Some(b)) = (dn, dn_ref) {
                    assert_close(&a, &b);
                }
                for (i, (a, b)) in dw.into_iter().zip(dw_ref).enumerate() {
                    assert_eq!(a.is_some(), tracked[i + 2], "weight {i}");
                    if let (Some(a), Some(b)) = (a, b) {
                        assert_close(&a, &b);
                    }
                }
            }
        }
    }

    /// `linear_after_norm`'s output and gradients (input, norm weight, weight, bias; each
    /// combination tracked) equal burn's autodiff of the composed norm and linear layer.
    #[test]
    fn norm_linear_node_matches_the_composed_graph() {
        let device = Default::default();
        let x = Tensor::<Cpu, 3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
        let norm_weight = Tensor::<Cpu, 1>::random([16], Distribution::Normal(1.0, 0.3), &device);
        let weight = Tensor::<Cpu, 2>::random([3, 16], Distribution::Normal(0.0, 0.5), &device);
        let bias = Tensor::<Cpu, 1>::random([3], Distribution::Normal(0.0, 0.5), &device);
        let mix: Vec<f32> = (0..2 * 5 * 3).map(|i| (i as f32 * 0.61).cos()).collect();
        for tracked in [
            [true, false, false, false],
            [true, true, true, true],
            [false, true, true, false],
            [false, false, true, true],
        ] {
            let run = |node: bool| {
                let track =
                    |on: bool| move |t: Tensor<Ad, 1>| if on { t.require_grad() } else { t };
                let xa = Tensor::<Ad, 3>::from_inner(x.clone());
                let xa = if tracked[0] { xa.require_grad() } else { xa };
                let nw = track(tracked[1])(Tensor::from_inner(norm_weight.clone()));
                let w = Tensor::<Ad, 2>::from_inner(weight.clone());
                let w = if tracked[2] { w.require_grad() } else { w };
                let b = track(tracked[3])(Tensor::from_inner(bias.clone()));
                let y = if node {
                    linear_after_norm(
                        xa.clone(),
                        NormFirst {
                            weight: nw.clone(),
                            eps: 1e-6,
                        },
                        w.clone(),
                        Some(b.clone()),
                    )
                } else {
                    Ad::linear_hf(
                        Ad::rms_norm(xa.clone(), nw.clone(), 1e-6),
                        w.clone(),
                        Some(b.clone()),
                    )
                };
                let grads = mixed_backward(&y, &mix);
                (
                    values(y.inner()),
                    [
                        xa.grad(&grads).map(values),
                        nw.grad(&grads).map(values),
                        w.grad(&grads).map(values),
                        b.grad(&grads).map(values),
                    ],
                )
            };
            let (y, grads) = run(true);
            let (y_ref, grads_ref) = run(false);
            assert_close(&y, &y_ref);
            for (i, (a, b)) in grads.into_iter().zip(grads_ref).enumerate() {
                assert_eq!(a.is_some(), tracked[i], "operand {i}");
                assert_eq!(b.is_some(), tracked[i], "operand {i} (reference)");
                if let (Some(a), Some(b)) = (a, b) {
                    assert_close(&a, &b);
                }
            }
        }
    }
}
