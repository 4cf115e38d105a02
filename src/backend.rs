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

/// Bytes the GPU backend's memory pools hold on `device` now, `(in use, reserved)`; on the CPU
/// the process's heap bytes in use (both), where the binary counts them ([`crate::heap`]). A
/// sample, not a peak: callers take the largest over the points they sample.
pub fn device_pool_bytes<D: 'static>(device: &D) -> Option<(u64, u64)> {
    let any = device as &dyn std::any::Any;
    #[cfg(feature = "cuda")]
    if let Some(cuda) = any.downcast_ref::<burn_cubecl::cubecl::cuda::CudaDevice>() {
        return crate::ops::cuda::pool_bytes(cuda);
    }
    if any.is::<burn::backend::ndarray::NdArrayDevice>() {
        return crate::heap::in_use().map(|bytes| (bytes, bytes));
    }
    None
}

/// An error when CUDA work of ours that was enqueued on cubecl's device thread failed: results
/// computed since are wrong (the failure is also logged when it happens). Call after waiting for
/// the device (`B::sync`), before results are reported or saved. Always `Ok` on the CPU.
pub fn check_device_work() -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(why) = crate::ops::cuda::enqueued_work_failure() {
        bail!(
            "our CUDA work failed on the GPU ({why}); results since are not valid. Rerun with DMS_RETROFIT_GEMM=burn to use burn's kernels instead"
        );
    }
    Ok(())
}

/// Where compiled kernels and autotune results are kept between runs: `DMS_RETROFIT_CACHE`, else
/// `$XDG_CACHE_HOME/dms-retrofit`, else `~/.cache/dms-retrofit`; one folder per GPU model (an H100's
/// tuning is not reused on an H200).
pub fn kernel_cache_dir(gpu_model: &str) -> std::path::PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    let root = env("DMS_RETROFIT_CACHE")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("dms-retrofit")))
        .or_else(|| env("HOME").map(|h| h.join(".cache").join("dms-retrofit")))
        .unwrap_or_else(|| std::path::PathBuf::from(".dms-retrofit-cache"));
    let model: String = gpu_model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    root.join(format!("cubecl-{}", model.trim_matches('-')))
}

/// The GPU model name the NVIDIA driver reports (for the cache folder), if readable.
#[cfg(feature = "cuda")]
fn gpu_model_name(index: usize) -> String {
    let mut dirs: Vec<_> = std::fs::read_dir("/proc/driver/nvidia/gpus")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    dirs.get(index)
        .and_then(|d| std::fs::read_to_string(d.join("information")).ok())
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("Model:").map(|m| m.trim().to_string()))
        })
        .unwrap_or_else(|| format!("cuda{index}"))
}

/// Points cubecl's autotune and compiled-kernel caches at [`kernel_cache_dir`] (once per process,
/// before any device is touched), so a second run at the same shapes starts without re-tuning.
#[cfg(feature = "cuda")]
fn configure_kernel_cache(index: usize) {
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig, cache::CacheConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let dir = kernel_cache_dir(&gpu_model_name(index));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::warn!(
                "cannot create kernel cache '{}': {e}; kernels will be re-tuned",
                dir.display()
            );
            return;
        }
        tracing::info!("kernel cache: {}", dir.display());
        let mut config = CubeClRuntimeConfig::default().override_from_env();
        config.autotune.cache = CacheConfig::File(dir.clone());
        config.compilation.cache = Some(CacheConfig::File(dir));
        CubeClRuntimeConfig::set(config);
    });
}

/// Prepares a CUDA device: kernel cache, and the float format of every tensor created on it.
#[cfg(feature = "cuda")]
pub fn init_cuda(device: &burn::backend::cuda::CudaDevice, format: FloatFormat) -> Result<()> {
    configure_kernel_cache(device.index);
    use burn::tensor::DType;
    match burn::tensor::backend::set_default_dtypes::<Cuda>(device, format.dtype(), DType::I32) {
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
