//! `y = x Wᵀ + b` as a backend operation, so the CPU backend can answer one-row inputs (decoding)
//! with a GEMV that reads `W` in place. burn-ndarray's matmul packs the whole weight matrix on
//! every call: 200 ms for the 49,152 x 576 LM head of SmolLM2 on one token, 490 ms through a
//! transposed view, where a memory-bound GEMV takes a few ms (docs/performance.md).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

/// Backends that run [`linear`]. The default is burn's `linear` on the transposed weight.
pub trait LinearBackend: Backend {
    /// # Shapes
    /// - `x`: `[..., d_input]`, `weight`: `[d_output, d_input]` (Hugging Face layout),
    ///   `bias`: `[d_output]` → `[..., d_output]`
    fn linear_hf<const D: usize>(
        x: Tensor<Self, D>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
    ) -> Tensor<Self, D> {
        burn::tensor::module::linear(x, weight.transpose(), bias)
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
        row_gemv(&x, &weight, bias.as_ref())
            .unwrap_or_else(|| burn::tensor::module::linear(x, weight.transpose(), bias))
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

#[cfg(feature = "cuda")]
impl LinearBackend for crate::backend::Cuda {}

/// Under autodiff burn's differentiable `linear` is used as is.
impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {}

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
}
