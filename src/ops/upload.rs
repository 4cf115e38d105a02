//! Weights onto the device, as a backend operation: burn's `from_data` by default; on CUDA through
//! pinned staging buffers (`super::cuda::upload`), because burn-cuda 0.21 copies each tensor from
//! pageable memory as a pitched 2D copy (16 GB of Qwen3-8B weights took ~36 s to reach the GPU;
//! docs/performance.md). A weight whose bytes can be produced in the device's format part by
//! part ([`DirectWeight`]: read from a checkpoint file, or generated) skips host memory: CUDA
//! writes it straight into the staging buffers.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::{DType, Tensor, TensorData, backend::Backend};

/// A weight's bytes as the device holds them (`dtype`, row-major, little-endian), written on
/// request into any part of a buffer.
pub struct DirectWeight<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Writes the bytes from offset `at` of the weight on into `part` (`at` and `part`'s length
    /// whole values); called from several threads at once for different parts.
    pub fill: Box<Fill<'a>>,
}

/// Writes a weight's bytes from an offset on into a part of a buffer (see [`DirectWeight::fill`]).
pub type Fill<'a> = dyn Fn(&mut [u8], usize) -> Result<(), FillError> + Sync + 'a;

impl DirectWeight<'_> {
    /// The weight's size in bytes.
    pub fn len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why a [`DirectWeight`]'s bytes were not produced.
#[derive(Debug)]
pub enum FillError {
    /// The stored values failed a check (NaN or infinite): the caller reads the weight through
    /// [`crate::model::WeightSource::load`] instead, which reports the problem.
    Invalid,
    /// Reading the file failed.
    Read(std::io::Error),
}

/// Backends that place weights with [`UploadBackend::upload`].
pub trait UploadBackend: Backend {
    /// `data` as a tensor on `device`, in `data`'s dtype.
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        Tensor::from_data(data, device)
    }

    /// Whether [`UploadBackend::upload_direct`] can place weights on `device`.
    fn uploads_direct(_device: &Self::Device) -> bool {
        false
    }

    /// `weight` as a tensor on `device`, its bytes written straight into the device's staging
    /// buffers; `None` where this path does not apply (the caller loads and uploads the values).
    fn upload_direct<const D: usize>(
        _weight: &DirectWeight<'_>,
        _device: &Self::Device,
    ) -> Option<Result<Tensor<Self, D>, FillError>> {
        None
    }
}

impl UploadBackend for crate::backend::Cpu {}

#[cfg(feature = "cuda")]
impl UploadBackend for crate::backend::Cuda {
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        super::cuda::upload::upload(data, device)
            .unwrap_or_else(|data| Tensor::from_data(data, device))
    }

    fn uploads_direct(device: &Self::Device) -> bool {
        super::cuda::upload::uploads_direct(device)
    }

    fn upload_direct<const D: usize>(
        weight: &DirectWeight<'_>,
        device: &Self::Device,
    ) -> Option<Result<Tensor<Self, D>, FillError>> {
        super::cuda::upload::upload_direct(weight, device)
    }
}

/// A leaf tensor: the inner backend's upload, no graph node.
impl<B: UploadBackend, C: CheckpointStrategy> UploadBackend for Autodiff<B, C> {
    fn upload<const D: usize>(data: TensorData, device: &Self::Device) -> Tensor<Self, D> {
        Tensor::from_inner(B::upload(data, device))
    }

    fn uploads_direct(device: &Self::Device) -> bool {
        B::uploads_direct(device)
    }

    fn upload_direct<const D: usize>(
        weight: &DirectWeight<'_>,
        device: &Self::Device,
    ) -> Option<Result<Tensor<Self, D>, FillError>> {
        B::upload_direct(weight, device).map(|result| result.map(Tensor::from_inner))
    }
}
