//! The linear layer's three GEMMs through cuBLASLt.

use burn::tensor::{Shape, Tensor, TensorPrimitive};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::{Cube, Gemm, Matrix, data_type, on_cubecl_stream};
use crate::backend::Cuda;

/// Which GEMM of a linear layer.
#[derive(Debug, Clone, Copy)]
pub enum LinearGemm {
    /// `y[M,N] = x[M,K] · W[N,K]ᵀ`
    Forward,
    /// `dx[M,K] = dy[M,N] · W[N,K]`
    InputGrad,
    /// `dW[N,K] = dy[M,N]ᵀ · x[M,K]`
    WeightGrad,
}

/// A tensor seen as a row-major matrix: its leading dimensions stacked into rows.
struct Rows {
    tensor: Cube,
    rows: usize,
    cols: usize,
    /// Elements between the starts of consecutive rows (≥ `cols`; burn-cuda pitches rows).
    ld: usize,
}

impl Rows {
    fn new(tensor: Cube) -> Self {
        let shape = tensor.meta.shape().to_vec();
        let cols = shape.last().copied().unwrap_or(1);
        let rows = shape.iter().rev().skip(1).product::<usize>();
        if let Some(ld) = crate::ops::linear::row_stride(&shape, tensor.meta.strides()) {
            return Self {
                tensor,
                rows,
                cols,
                ld,
            };
        }
        // A contiguous tensor (size-1 axes may carry any stride) has rows `cols` apart.
        Self {
            tensor: into_contiguous(tensor),
            rows,
            cols,
            ld: cols.max(1),
        }
    }

    fn matrix(&self, ptr: u64) -> Matrix {
        Matrix {
            ptr,
            rows: self.rows,
            cols: self.cols,
            ld: self.ld,
            batch_stride: 0,
            dtype: self.tensor.dtype,
        }
    }
}

/// Runs one of the linear layer's GEMMs: `a` and `b` are the operands in the order of
/// [`LinearGemm`]'s formulas. The result has `a`'s leading dimensions (forward, input gradient)
/// or is `[N, K]` (weight gradient). `None` (nothing run) where cuBLASLt is unavailable or the
/// dtypes are not matching f32/f16/bf16; the caller then uses burn's matmul.
pub fn linear_gemm<const DA: usize, const DB: usize, const DO: usize>(
    which: LinearGemm,
    a: Tensor<Cuda, DA>,
    b: Tensor<Cuda, DB>,
) -> Option<Tensor<Cuda, DO>> {
    let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
    if a.dtype != b.dtype || data_type(a.dtype).is_none() || a.device != b.device {
        return None;
    }
    let a_shape = a.meta.shape().to_vec();
    let (a, b) = (Rows::new(a), Rows::new(b));
    // Row-major C[M,N] = op(A)[M,K] · op(B)[K,N].
    let (a_t, b_t, out_shape) = match which {
        LinearGemm::Forward => {
            let mut shape = a_shape;
            *shape.last_mut()? = b.rows;
            (false, true, shape)
        }
        LinearGemm::InputGrad => {
            let mut shape = a_shape;
            *shape.last_mut()? = b.cols;
            (false, false, shape)
        }
        LinearGemm::WeightGrad => (true, false, vec![a.cols, b.cols]),
    };
    let (m, k) = if a_t {
        (a.cols, a.rows)
    } else {
        (a.rows, a.cols)
    };
    let (k_b, n) = if b_t {
        (b.cols, b.rows)
    } else {
        (b.rows, b.cols)
    };
    if k != k_b || m == 0 || n == 0 || k == 0 {
        return None;
    }
    let out = empty_device_contiguous_dtype(
        a.tensor.client.clone(),
        a.tensor.device.clone(),
        Shape::from(out_shape),
        a.tensor.dtype,
    );
    let dtype = a.tensor.dtype;
    let (a_matrix, b_matrix) = (a.matrix(0), b.matrix(0));
    on_cubecl_stream(
        &[&a.tensor, &b.tensor, &out],
        false,
        move |context, ptrs| {
            context.gemm(&Gemm {
                a: Matrix {
                    ptr: ptrs[0],
                    ..a_matrix
                },
                a_transposed: a_t,
                b: Matrix {
                    ptr: ptrs[1],
                    ..b_matrix
                },
                b_transposed: b_t,
                c: Matrix::packed(ptrs[2], m, n, 0, dtype),
                batch: 1,
                alpha: 1.0,
                beta: 0.0,
            })
        },
    )?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
}
