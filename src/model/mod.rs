//! The architectures: one config-driven decoder for Llama, Qwen2 and Qwen3.

pub mod attention;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decoder;
pub mod elementwise;
pub mod linear;
pub mod mlp;
pub mod rope;
pub mod weights;

pub use config::{Architecture, FloatFormat, ModelConfig, RopeConfig, RopeScaling};
pub use decoder::Decoder;
pub use rope::RopeTables;
pub use weights::{LayerNorm, ParamSlot, Projection, WeightKey, WeightSource};
