//! `y = x Wᵀ + b` as a backend operation, so each backend runs the GEMMs its own best way:
//! - the CPU answers one-row inputs (decoding) with a GEMV that reads `W` in place. burn-ndarray's
//!   matmul packs the whole weight matrix on every call: 200 ms for the 49,152 x 576 LM head of
//!   SmolLM2 on one token, 490 ms through a transposed view, where a GEMV takes a few ms;
//! - CUDA runs the forward and both backward GEMMs through cuBLASLt (`super::cuda::linear`), 3-4x
//!   burn-cuda's own GEMM on Hopper (docs/performance.md).
//!
//! Under autodiff the layer (without its bias) is one graph node whose backward calls the
//! backend's input- and weight-gradient GEMMs.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive, backend::Backend};

/// Backends that run [`linear`]. The defaults are burn's own ops ([`burn_ops`]).
pub trait LinearBackend: Backend {
    /// # Shapes
    /// - `x`: `[..., d_input]`, `weight`: `[d_output, d_input]` (Hugging Face layout),
    ///   `bias`: `[d_output]` → `[..., d_output]`
    fn linear_hf<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        burn_ops::linear(x, weight, bias)
    }

    /// `dx = dy W`: `grad`: `[..., d_output]`, `weight`: `[d_output, d_input]` → `[..., d_input]`.
    fn linear_hf_input_grad<const D: usize>(
        grad: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
    ) -> Tensor<Self, D> {
        burn_ops::input_grad(grad, weight)
    }

    /// `dW = dyᵀ x` summed over every row: `grad`: `[..., d_output]`, `x`: `[..., d_input]` →
    /// `[d_output, d_input]`.
    fn linear_hf_weight_grad<const D: usize>(
        grad: Tensor<Self, D>,
        x: Tensor<Self, D>,
    ) -> Tensor<Self, 2> {
        burn_ops::weight_grad(grad, x)
    }
}

/// The three GEMMs with burn's own ops: [`LinearBackend`]'s defaults, the fallback of the
/// backends that override them, and the reference `bench linear` compares against.
pub mod burn_ops {
    use burn::tensor::{Tensor, backend::Backend};

    pub fn linear<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, D> {
        burn::tensor::module::linear(x, weight.transpose(), bias)
    }

    pub fn input_grad<B: Backend, const D: usize>(
        grad: Tensor<B, D>,
        weight: Tensor<B, 2>,
    ) -> Tensor<B, D> {
        grad.matmul(weight.unsqueeze())
    }

    pub fn weight_grad<B: Backend, const D: usize>(
        grad: Tensor<B, D>,
        x: Tensor<B, D>,
    ) -> Tensor<B, 2> {
        let grad: Tensor<B, 2> = grad.flatten(0, D - 2);
        let x: Tensor<B, 2> = x.flatten(0, D - 2);
        grad.transpose().matmul(x)
    }

    /// `y + b`, the bias broadcast over the rows.
    pub fn plus_bias<B: Backend, const D: usize>(
        y: Tensor<B, D>,
        bias: Option<Tensor<B, 1>>,
    ) -> Tensor<B, D> {
        match bias {
            Some(bias) => y + bias.unsqueeze(),
            None => y,
        }
    }
}

/// `y = x Wᵀ + b` with `W` in the Hugging Face `[out, in]` layout.
pub fn linear<B: LinearBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    B::linear_hf(x, weight, bias)
}

/// Rows at or below which the CPU uses the GEMV path.
const GEMV_MAX_ROWS: usize = 4;

impl LinearBackend for crate::backend::Cpu {
    fn linear_hf<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        row_gemv(&x, &weight, bias.as_ref()).unwrap_or_else(|| burn_ops::linear(x, weight, bias))
    }
}

/// The GEMV path, or `None` where it does not apply: more than [`GEMV_MAX_ROWS`] rows, or anything
/// but a contiguous f32 weight beside f32 inputs.
fn row_gemv<const D: usize>(
    x: &Tensor<crate::backend::Cpu, D>,
    weight: &Tensor<crate::backend::Cpu, 2>,
    bias: Option<&Tensor<crate::backend::Cpu, 1>>,
) -> Option<Tensor<crate::backend::Cpu, D>> {
    let [out_dim, in_dim] = weight.dims();
    let rows = x.shape().num_elements() / in_dim.max(1);
    if rows == 0 || rows > GEMV_MAX_ROWS || x.dtype() != DType::F32 {
        return None;
    }
    let burn::backend::ndarray::NdArrayTensor::F32(storage) =
        weight.clone().into_primitive().tensor()
    else {
        return None;
    };
    let view = storage.view();
    let w = view.as_slice()?;
    let values = |data: TensorData| data.convert::<f32>().into_vec::<f32>().expect("f32");
    let input = values(x.clone().into_data());
    let bias = bias.map(|b| values(b.clone().into_data()));
    let mut shape = x.dims();
    shape[D - 1] = out_dim;
    let out = gemv_rows(w, &input, bias.as_deref(), out_dim, in_dim);
    Some(Tensor::from_data(TensorData::new(out, shape), &x.device()))
}

/// `out[r, o] = dot(W[o, :], x[r, :]) + b[o]`, rows of `W` read contiguously; the outputs are
/// split across the cores when the matrix is large.
fn gemv_rows(
    w: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    out_dim: usize,
    in_dim: usize,
) -> Vec<f32> {
    let rows = x.len() / in_dim;
    let mut out = vec![0f32; rows * out_dim];
    let threads = if out_dim * in_dim >= 1 << 20 {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(8)
    } else {
        1
    };
    let per_thread = out_dim.div_ceil(threads);
    for (r, out_row) in out.chunks_mut(out_dim).enumerate() {
        let x_row = &x[r * in_dim..(r + 1) * in_dim];
        std::thread::scope(|scope| {
            for (t, chunk) in out_row.chunks_mut(per_thread).enumerate() {
                let first = t * per_thread;
                let mut work = move || {
                    for (i, y) in chunk.iter_mut().enumerate() {
                        let o = first + i;
                        *y = dot(&w[o * in_dim..(o + 1) * in_dim], x_row)
                            + bias.map_or(0.0, |b| b[o]);
                    }
                };
                if threads == 1 {
                    work();
                } else {
                    scope.spawn(work);
                }
            }
        });
    }
    out
}

/// Dot product with 8 independent accumulators (vectorises; a single running sum would not).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for lane in 0..8 {
            acc[lane] += a[i * 8 + lane] * b[i * 8 + lane];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// The row stride of a tensor whose leading dimensions stack into evenly spaced rows with unit
/// column stride, or `None` (broadcast, transposed or sliced-in-the-middle layouts).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn row_stride(shape: &[usize], strides: &[usize]) -> Option<usize> {
    let rank = shape.len();
    let cols = *shape.last()?;
    if cols > 1 && strides[rank - 1] != 1 {
        return None;
    }
    let mut ld = None;
    let mut next = 0;
    for i in (0..rank - 1).rev() {
        if shape[i] == 1 {
            continue;
        }
        match ld {
            None => {
                if strides[i] < cols {
                    return None;
                }
                ld = Some(strides[i]);
                next = strides[i] * shape[i];
            }
            Some(_) => {
                if strides[i] != next {
                    return None;
                }
                next *= shape[i];
            }
        }
    }
    Some(ld.unwrap_or(cols).max(1))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::cuda::linear::{LinearGemm, linear_gemm};
    use super::*;
    use crate::backend::Cuda;

    /// Each GEMM through cuBLASLt; burn's ops where it declines (see `super::super::cuda`).
    impl LinearBackend for Cuda {
        fn linear_hf<const D: usize>(
            x: Tensor<Self, D>,
            weight: Tensor<Self, 2>,
            bias: Option<Tensor<Self, 1>>,
        ) -> Tensor<Self, D> {
            match linear_gemm::<D, 2, D>(LinearGemm::Forward, x.clone(), weight.clone()) {
                Some(y) => burn_ops::plus_bias(y, bias),
                None => burn_ops::linear(x, weight, bias),
            }
        }

        fn linear_hf_input_grad<const D: usize>(
            grad: Tensor<Self, D>,
            weight: Tensor<Self, 2>,
        ) -> Tensor<Self, D> {
            linear_gemm(LinearGemm::InputGrad, grad.clone(), weight.clone())
                .unwrap_or_else(|| burn_ops::input_grad(grad, weight))
        }

        fn linear_hf_weight_grad<const D: usize>(
            grad: Tensor<Self, D>,
            x: Tensor<Self, D>,
        ) -> Tensor<Self, 2> {
            linear_gemm(LinearGemm::WeightGrad, grad.clone(), x.clone())
                .unwrap_or_else(|| burn_ops::weight_grad(grad, x))
        }
    }
}

/// Under autodiff `x Wᵀ` is one node whose backward calls the inner backend's gradient GEMMs; the
/// bias is added outside it (burn differentiates the broadcast add). Each operand is kept only if
/// the other needs a gradient: adapter-only training keeps no activations for frozen weights.
impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn linear_hf<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        #[derive(Debug)]
        struct LinearBackward<const D: usize>;

        #[derive(Debug, Clone)]
        struct Saved<B: Backend> {
            /// Kept when the weight needs a gradient.
            x: Option<FloatTensor<B>>,
            /// Kept when the input needs a gradient.
            weight: Option<FloatTensor<B>>,
        }

        impl<B: LinearBackend, const D: usize> Backward<B, 2> for LinearBackward<D> {
            type State = Saved<B>;

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _checkpointer: &mut Checkpointer,
            ) {
                let [node_x, node_weight] = ops.parents;
                let grad = float::<B, D>(grads.consume::<B>(&ops.node));
                let Saved { x, weight } = ops.state;
                if let (Some(node), Some(x)) = (node_weight, x) {
                    let dw = B::linear_hf_weight_grad(grad.clone(), float::<B, D>(x));
                    grads.register::<B>(node.id, dw.into_primitive().tensor());
                }
                if let (Some(node), Some(weight)) = (node_x, weight) {
                    let dx = B::linear_hf_input_grad(grad, float::<B, 2>(weight));
                    grads.register::<B>(node.id, dx.into_primitive().tensor());
                }
            }
        }

        let (x, weight) = (
            x.into_primitive().tensor(),
            weight.into_primitive().tensor(),
        );
        let y = B::linear_hf(
            float::<B, D>(x.primitive.clone()),
            float::<B, 2>(weight.primitive.clone()),
            None,
        )
        .into_primitive()
        .tensor();
        let (x_tracked, weight_tracked) = (x.is_tracked(), weight.is_tracked());
        let output = match LinearBackward::<D>
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = Saved {
                    x: weight_tracked.then_some(x.primitive),
                    weight: x_tracked.then_some(weight.primitive),
                };
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        burn_ops::plus_bias(float::<Self, D>(output), bias)
    }
}

/// A float primitive as a tensor of rank `D`.
pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::tensor::Distribution;

    /// The GEMV path (1-4 rows, with and without bias, odd sizes, large enough to split across
    /// threads) equals burn's matmul path.
    #[test]
    fn row_gemv_matches_burn_linear() {
        let device = Default::default();
        for (rows, out_dim, in_dim, with_bias) in [
            (1, 7, 13, false),
            (1, 2048, 576, true),
            (3, 33, 64, true),
            (4, 5, 9, false),
        ] {
            let x = Tensor::<Cpu, 3>::random([1, rows, in_dim], Distribution::Default, &device);
            let w = Tensor::<Cpu, 2>::random([out_dim, in_dim], Distribution::Default, &device);
            let b = with_bias
                .then(|| Tensor::<Cpu, 1>::random([out_dim], Distribution::Default, &device));
            let want = burn::tensor::module::linear(x.clone(), w.clone().transpose(), b.clone())
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            let got = linear(x, w, b).into_data().to_vec::<f32>().unwrap();
            assert_eq!(got.len(), want.len());
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() <= 1e-4 * (1.0 + e.abs()), "{g} vs {e}");
            }
        }
    }

    /// The autodiff node's output and gradients (input, weight, bias; each combination of which
    /// needs a gradient) equal burn's autodiff of `x Wᵀ + b`, including the 1-row GEMV path.
    #[test]
    fn linear_node_gradients_match_burn_autodiff() {
        use crate::backend::CpuAutodiff;
        let device = Default::default();
        for (rows, x_grad, w_grad, with_bias) in [
            (5, true, true, true),
            (5, true, false, false),
            (5, false, true, true),
            (1, true, true, false),
        ] {
            let x = Tensor::<Cpu, 3>::random([2, rows, 6], Distribution::Default, &device);
            let w = Tensor::<Cpu, 2>::random([4, 6], Distribution::Default, &device);
            let b = Tensor::<Cpu, 1>::random([4], Distribution::Default, &device);
            let mix = Tensor::<Cpu, 3>::random([2, rows, 4], Distribution::Default, &device);
            let run = |ours: bool| {
                let track =
                    |t: Tensor<CpuAutodiff, 2>, on: bool| if on { t.require_grad() } else { t };
                let xa = Tensor::<CpuAutodiff, 3>::from_inner(x.clone());
                let xa = if x_grad { xa.require_grad() } else { xa };
                let wa = track(Tensor::from_inner(w.clone()), w_grad);
                let ba = with_bias
                    .then(|| Tensor::<CpuAutodiff, 1>::from_inner(b.clone()).require_grad());
                let y = if ours {
                    linear(xa.clone(), wa.clone(), ba.clone())
                } else {
                    let y = xa.clone().matmul(wa.clone().transpose().unsqueeze());
                    match ba.clone() {
                        Some(b) => y + b.unsqueeze(),
                        None => y,
                    }
                };
                let loss = (y.clone() * Tensor::from_inner(mix.clone())).sum();
                let grads = loss.backward();
                let flat =
                    |t: Option<Tensor<Cpu, 3>>| t.map(|t| t.into_data().to_vec::<f32>().unwrap());
                (
                    y.inner().into_data().to_vec::<f32>().unwrap(),
                    flat(xa.grad(&grads)),
                    wa.grad(&grads)
                        .map(|g| g.into_data().to_vec::<f32>().unwrap()),
                    ba.and_then(|b| b.grad(&grads))
                        .map(|g| g.into_data().to_vec::<f32>().unwrap()),
                )
            };
            let (got, want) = (run(true), run(false));
            let close = |g: &[f32], e: &[f32], what: &str| {
                assert_eq!(g.len(), e.len(), "{what}");
                for (g, e) in g.iter().zip(e) {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{what}: {g} vs {e}"
                    );
                }
            };
            close(&got.0, &want.0, "output");
            assert_eq!(got.1.is_some(), x_grad);
            assert_eq!(got.2.is_some(), w_grad);
            for (g, e, what) in [
                (got.1, want.1, "dx"),
                (got.2, want.2, "dW"),
                (got.3, want.3, "db"),
            ] {
                assert_eq!(g.is_some(), e.is_some(), "{what}");
                if let (Some(g), Some(e)) = (g, e) {
                    close(&g, &e, what);
                }
            }
        }
    }

    #[test]
    fn row_strides_of_stacked_pitched_and_foreign_layouts() {
        // Contiguous [2, 3, 4]: rows 4 apart.
        assert_eq!(row_stride(&[2, 3, 4], &[12, 4, 1]), Some(4));
        // burn-cuda's pitched rows: [2, 3, 4] with rows 8 apart.
        assert_eq!(row_stride(&[2, 3, 4], &[24, 8, 1]), Some(8));
        // A size-1 axis may carry any stride.
        assert_eq!(row_stride(&[1, 3, 4], &[999, 4, 1]), Some(4));
        assert_eq!(row_stride(&[3, 1, 4], &[4, 77, 1]), Some(4));
        // One row.
        assert_eq!(row_stride(&[5], &[1]), Some(5));
        // Transposed: the column stride is not 1.
        assert_eq!(row_stride(&[4, 3], &[1, 4]), None);
        // Batches not stacked one after the other (a slice in the middle dimension).
        assert_eq!(row_stride(&[2, 3, 4], &[40, 4, 1]), None);
        // Broadcast rows.
        assert_eq!(row_stride(&[3, 4], &[0, 1]), None);
    }
}
