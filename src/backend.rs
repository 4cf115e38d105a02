//! Choosing where tensors live: the CPU (ndarray, f32) or a CUDA GPU (bf16 by default).

use std::fmt;
use std::str::FromStr;

use anyhow::{Result, bail};

use crate::model::FloatFormat;

/// The CPU backend every build has.
pub type Cpu = burn::backend::NdArray<f32>;
/// The CPU backend with gradients.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

/// The CUDA backend (`--features cuda`).
#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda<f32, i32>;

/// Prepares a CUDA device: the float format of every tensor created on it.
#[cfg(feature = "cuda")]
pub fn init_cuda(device: &burn::backend::cuda::CudaDevice, format: FloatFormat) -> Result<()> {
    use burn::tensor::DType;
    let dtype = match format {
        FloatFormat::F32 => DType::F32,
        FloatFormat::Bf16 => DType::BF16,
        FloatFormat::F16 => DType::F16,
    };
    match burn::tensor::backend::set_default_dtypes::<Cuda>(device, dtype, DType::I32) {
        Ok(()) => Ok(()),
        // Already initialised by an earlier call in this process: keep going.
        Err(e) => {
            tracing::debug!("CUDA dtype already set: {e}");
            Ok(())
        }
    }
}

/// A device named on the command line or in a recipe: `cpu`, `cuda` or `cuda:N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(index)) => Ok(DeviceSpec::Cuda(index)),
                _ => bail!("device '{other}' is not valid; use 'cpu', 'cuda' or 'cuda:N'"),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// The float format computations run in unless the user asks otherwise: f32 on the CPU
    /// (ndarray has no fast bf16), bf16 on the GPU.
    pub fn default_format(self) -> FloatFormat {
        match self {
            DeviceSpec::Cpu => FloatFormat::F32,
            DeviceSpec::Cuda(_) => FloatFormat::Bf16,
        }
    }

    /// Fails early, with the fix, when the binary was built without the backend asked for.
    pub fn ensure_available(self) -> Result<()> {
        match self {
            DeviceSpec::Cpu => Ok(()),
            DeviceSpec::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
            DeviceSpec::Cuda(_) => bail!(
                "device '{self}' needs a CUDA build: rebuild with `cargo build --release --features cuda`"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }
}
