//! The SwiGLU feed-forward `down(silu(gate(x)) * up(x))` as one operation, so that training can
//! keep only its input: under autodiff the gate and up projections (`[tokens, intermediate]`
//! each, 6x the hidden size for Qwen3-8B) are recomputed in the backward by two more GEMMs
//! instead of being kept from the forward. At Qwen3-8B and 4K tokens that is 7 GB less, for ~4%
//! more step time (docs/performance.md).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::Tensor;
use burn::tensor::ops::FloatTensor;

use super::elementwise::ElementwiseBackend;
use super::linear::{LinearBackend, float};

/// Backends that run [`swiglu_mlp`]. The default composes the linear and SwiGLU operations (and
/// so keeps their activations under autodiff); the autodiff backend overrides it with a node
/// that recomputes them.
pub trait MlpBackend: LinearBackend + ElementwiseBackend {
    /// # Shapes
    /// - `x`: `[..., hidden]`; `gate`, `up`: `[intermediate, hidden]`; `down`:
    ///   `[hidden, intermediate]` (Hugging Face layout, no biases) → `[..., hidden]`
    fn swiglu_mlp<const D: usize>(
        x: Tensor<Self, D>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, D> {
        let hidden = Self::swiglu(
            Self::linear_hf(x.clone(), gate, None),
            Self::linear_hf(x, up, None),
        );
        Self::linear_hf(hidden, down, None)
    }
}

/// `down(silu(gate(x)) * up(x))`, keeping only `x` for the backward under autodiff.
pub fn swiglu_mlp<B: MlpBackend, const D: usize>(
    x: Tensor<B, D>,
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    down: Tensor<B, 2>,
) -> Tensor<B, D> {
    B::swiglu_mlp(x, gate, up, down)
}

impl MlpBackend for crate::backend::Cpu {}

#[cfg(feature = "cuda")]
impl MlpBackend for crate::backend::Cuda {}

impl<B: MlpBackend, C: CheckpointStrategy> MlpBackend for Autodiff<B, C> {
    fn swiglu_mlp<const D: usize>(
        x: Tensor<Self, D>,
        gate: Tensor<Self, 2>,
        up: Tensor<Self, 2>,
        down: Tensor<Self, 2>,
    ) -> Tensor<Self, D> {
        #[derive(Debug)]
        struct MlpBackward<const D: usize>;

        impl<B: MlpBackend, const D: usize> Backward<B, 4> for MlpBackward<D> {
            /// The input and the three weights (handles to the model's own tensors).
            type State = [FloatTensor<B>; 4];

            fn backward(
                self,
                ops: Ops<Self::State, 4>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_gate, node_up, node_down] = ops.parents;
                let grad = float::<B, D>(grads.consume::<B>(&ops.node));
                let [x, w_gate, w_up, w_down] = ops.state;
                let x = float::<B, D>(x);
                let [w_gate, w_up, w_down] = [w_gate, w_up, w_down].map(float::<B, 2>);
                // The recomputation: the forward's gate and up projections.
                let gate = B::linear_hf(x.clone(), w_gate.clone(), None);
                let up = B::linear_hf(x.clone(), w_up.clone(), None);
                if let Some(node) = node_down {
                    let hidden = B::swiglu(gate.clone(), up.clone());
                    let dw = B::linear_hf_weight_grad(grad.clone(), hidden);
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                let d_hidden = B::linear_hf_input_grad(grad, w_down);
                let (d_gate, d_up) = B::swiglu_grads(gate, up, d_hidden);
                if let Some(node) = node_gate {
                    let dw = B::linear_hf_weight_grad(d_gate.clone(), x.clone());
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                if let Some(node) = node_up {
                    let dw = B::linear_hf_weight_grad(d_up.clone(), x);
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                if let Some(node) = node_x {
                    let dx = B::linear_hf_input_grad(d_gate, w_gate)
                        + B::linear_hf_input_grad(d_up, w_up);
                    grads.register::<B>(node.id, dx.into_primitive().tensor());
                }
            }
        }

        let [x, gate, up, down] = [
            x.into_primitive().tensor(),
            gate.into_primitive().tensor(),
            up.into_primitive().tensor(),
            down.into_primitive().tensor(),
        ];
        let y = B::swiglu_mlp(
            float::<B, D>(x.primitive.clone()),
            float(gate.primitive.clone()),
            float(up.primitive.clone()),
            float(down.primitive.clone()),
        )
        .into_primitive()
        .tensor();
        let output = match MlpBackward::<D>
            .prepare::<C>([
                x.node.clone(),
                gate.node.clone(),
                up.node.clone(),
                down.node.clone(),
            ])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                [x.primitive, gate.primitive, up.primitive, down.primitive],
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

    /// Output and every gradient (input, gate, up, down; each combination of which is tracked)
    /// equal burn's autodiff of the composed linear and SwiGLU operations.
    #[test]
    fn recomputing_node_matches_the_composed_graph() {
        let device = Default::default();
        let random = |shape: [usize; 2]| {
            Tensor::<Cpu, 2>::random(shape, Distribution::Normal(0.0, 0.5), &device)
        };
        let x = Tensor::<Cpu, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
        let weights = [random([12, 8]), random([12, 8]), random([8, 12])];
        let mix: Vec<f32> = (0..2 * 3 * 8).map(|i| (i as f32 * 0.37).sin()).collect();
        for tracked in [
            [true, false, false, false],
            [true, true, true, true],
            [false, true, false, true],
        ] {
            let run = |node: bool| {
                let leaf = |t: Tensor<Ad, 2>, on: bool| if on { t.require_grad() } else { t };
                let xa = Tensor::<Ad, 3>::from_inner(x.clone());
                let xa = if tracked[0] { xa.require_grad() } else { xa };
                let [g, u, d] = std::array::from_fn(|i| {
                    leaf(Tensor::from_inner(weights[i].clone()), tracked[i + 1])
                });
                let y = if node {
                    swiglu_mlp(xa.clone(), g.clone(), u.clone(), d.clone())
                } else {
                    Ad::linear_hf(
                        Ad::swiglu(
                            Ad::linear_hf(xa.clone(), g.clone(), None),
                            Ad::linear_hf(xa.clone(), u.clone(), None),
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
                let values2 = |t: Tensor<Cpu, 2>| t.into_data().to_vec::<f32>().unwrap();
                (
                    values(y.inner()),
                    xa.grad(&grads).map(values),
                    [g, u, d].map(|w| w.grad(&grads).map(values2)),
                )
            };
            let (y, dx, dw) = run(true);
            let (y_ref, dx_ref, dw_ref) = run(false);
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
            for (i, (a, b)) in dw.into_iter().zip(dw_ref).enumerate() {
                assert_eq!(a.is_some(), tracked[i + 1], "weight {i}");
                if let (Some(a), Some(b)) = (a, b) {
                    close(&a, &b);
                }
            }
        }
    }
}
