//! The operations the decoder is built from, each a backend operation with its autodiff node:
//! linear layers (cuBLASLt on CUDA), elementwise ops (RMSNorm, SwiGLU, RoPE, token KL), the MLP
//! and attention (fused flash kernels on CUDA), and the CUDA implementations themselves. Nothing
//! here knows the architectures or the method.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod elementwise;
pub mod linear;
pub mod recompute;
pub mod upload;

pub use attention::{AttentionBackend, TrainBackend};
pub use upload::UploadBackend;
