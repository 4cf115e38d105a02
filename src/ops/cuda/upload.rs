//! Host-to-device copies of weights through two pinned staging buffers: the host fills the next
//! chunk of one buffer while the DMA engine reads the other (`DeviceContext::upload_with`), so the
//! transfer runs at the link's speed instead of burn-cuda's pageable 2D copy. A weight whose bytes
//! can be produced part by part (read from its file and checked, or generated) is written straight
//! into the staging buffers ([`upload_direct`]): no mapping faults, no host copy of the weights.

use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaDevice;
use burn_cubecl::cubecl::{Runtime, cuda::CudaRuntime};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::with_cubecl_stream;
use crate::backend::Cuda;
use crate::ops::upload::{DirectWeight, FillError};

/// `data` in a new contiguous tensor on `device`, or `data` back where this path does not apply
/// (`DMS_RETROFIT_UPLOAD=burn`, or no CUDA context of ours: the caller uses burn's `from_data`).
pub fn upload<const D: usize>(
    data: TensorData,
    device: &CudaDevice,
) -> Result<Tensor<Cuda, D>, TensorData> {
    if mode() == Mode::Burn || data.shape.len() != D {
        return Err(data);
    }
    let tensor = empty(device, &data.shape, data.dtype);
    let bytes = data.as_bytes();
    let copied = with_cubecl_stream(&[&tensor], |context, ptrs| {
        context.upload_with(ptrs[0], bytes.len(), 1, |part, at| {
            part.copy_from_slice(&bytes[at..at + part.len()]);
            Ok::<(), ()>(())
        })
    });
    match copied {
        Some(Ok(())) => Ok(Tensor::from_primitive(TensorPrimitive::Float(tensor))),
        _ => Err(data),
    }
}

/// Whether [`upload_direct`] can place weights on `device`: our CUDA context is available (so not
/// with `DMS_RETROFIT_GEMM=burn`) and `DMS_RETROFIT_UPLOAD` is neither `memory` nor `burn`.
pub fn uploads_direct(device: &CudaDevice) -> bool {
    mode() == Mode::File && super::gpu(device.index).is_ok()
}

/// `weight` in a new tensor on `device`, its bytes written into the staging buffers on the
/// CPU's threads (`weight.fill`) and copied from there. `None` where this path does not apply.
pub fn upload_direct<const D: usize>(
    weight: &DirectWeight<'_>,
    device: &CudaDevice,
) -> Option<Result<Tensor<Cuda, D>, FillError>> {
    if mode() != Mode::File || weight.shape.len() != D {
        return None;
    }
    let tensor = empty(device, &weight.shape, weight.dtype);
    let read = with_cubecl_stream(&[&tensor], |context, ptrs| {
        context.upload_with(ptrs[0], weight.len(), weight.dtype.size(), &weight.fill)
    })?;
    Some(read.map(|()| Tensor::from_primitive(TensorPrimitive::Float(tensor))))
}

fn empty(device: &CudaDevice, shape: &[usize], dtype: DType) -> super::Cube {
    empty_device_contiguous_dtype(
        CudaRuntime::client(device),
        device.clone(),
        shape.into(),
        dtype,
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Written straight into the staging buffers where the source can (a weight stored in the
    /// run's dtype, generated weights), else from memory.
    File,
    /// From host memory (the checkpoint read and converted first), through the staging buffers.
    Memory,
    /// burn's `from_data`.
    Burn,
}

/// `DMS_RETROFIT_UPLOAD=memory` or `=burn` keeps the earlier paths (for comparisons); `file` (or
/// unset) is the default, anything else is warned about once and means the default.
fn mode() -> Mode {
    static MODE: std::sync::OnceLock<Mode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("DMS_RETROFIT_UPLOAD") {
        Ok(v) if v.eq_ignore_ascii_case("burn") => Mode::Burn,
        Ok(v) if v.eq_ignore_ascii_case("memory") => Mode::Memory,
        Ok(v) if v.is_empty() || v.eq_ignore_ascii_case("file") => Mode::File,
        Ok(other) => {
            tracing::warn!(
                "DMS_RETROFIT_UPLOAD={other:?} is not file, memory or burn; using the default (file)"
            );
            Mode::File
        }
        Err(_) => Mode::File,
    })
}
