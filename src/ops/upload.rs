//! Weights from host memory onto the device, as a backend operation: burn's `from_data` by
//! default; on CUDA through pinned staging buffers (`super::cuda::upload`), because burn-cuda
//! 0.21 copies each tensor from pageable memory as a pitched 2D copy (16 GB of Qwen3-8B weights
//! took ~36 s to reach the GPU; docs/performance.md).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::{Tensor, TensorData, backend::Backend};

/// Backends that place weights with [`UploadBackend::upload`].
pub trait UploadBackend: Backend {
    /// `data` as a tensor on `device`, in `data`'s dtype.
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        Tensor::from_data(data, device)
    }
}

impl UploadBackend for crate::backend::Cpu {}

#[cfg(feature = "cuda")]
impl UploadBackend for crate::backend::Cuda {
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        super::cuda::upload::upload(data, device)
            .unwrap_or_else(|data| Tensor::from_data(data, device))
    }
}

/// A leaf tensor: the inner backend's upload, no graph node.
impl<B: UploadBackend, C: CheckpointStrategy> UploadBackend for Autodiff<B, C> {
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        Tensor::from_inner(B::upload(data, device))
    }
}
