//! The architectures: one config-driven decoder for Llama, Qwen2 and Qwen3 (config, weights,
//! RoPE, the block). The operations it is built from, and their CUDA kernels, are [`crate::ops`].

pub mod config;
pub mod decoder;
pub mod rope;
pub mod weights;

pub use config::{Architecture, FloatFormat, ModelConfig, RopeConfig, RopeScaling};
pub use decoder::Decoder;
pub use rope::RopeTables;
pub use weights::{AdapterTensor, LayerNorm, ParamSlot, Projection, WeightKey, WeightSource};
