//! Host-to-device copies of weights through two pinned staging buffers: the host copies the next
//! chunk into one buffer while the DMA engine reads the other (`DeviceContext::upload`), so the
//! transfer runs at the link's speed instead of burn-cuda's pageable 2D copy.

use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaDevice;
use burn_cubecl::cubecl::{Runtime, cuda::CudaRuntime};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;

use super::with_cubecl_stream;
use crate::backend::Cuda;

/// `data` in a new contiguous tensor on `device`, or `data` back where this path does not apply
/// (`DMS_RETROFIT_UPLOAD=burn`, or no CUDA context of ours: the caller uses burn's `from_data`).
pub fn upload<const D: usize>(
    data: TensorData,
    device: &CudaDevice,
) -> Result<Tensor<Cuda, D>, TensorData> {
    if !enabled() || data.shape.len() != D {
        return Err(data);
    }
    let tensor = empty_device_contiguous_dtype(
        CudaRuntime::client(device),
        device.clone(),
        data.shape.clone(),
        data.dtype,
    );
    let bytes = data.as_bytes();
    match with_cubecl_stream(&[&tensor], |context, ptrs| context.upload(ptrs[0], bytes)) {
        Some(()) => Ok(Tensor::from_primitive(TensorPrimitive::Float(tensor))),
        None => Err(data),
    }
}

/// `DMS_RETROFIT_UPLOAD=burn` keeps burn's own upload (for comparisons).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("DMS_RETROFIT_UPLOAD").map_or(true, |v| !v.eq_ignore_ascii_case("burn"))
    })
}
