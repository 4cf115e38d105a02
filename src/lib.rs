//! dms-retrofit: retrofit Llama and Qwen checkpoints with Dynamic Memory Sparsification (DMS).
//!
//! Layout: [`model`] (the architectures), [`checkpoint`] (Hugging Face files), [`data`] (text),
//! [`backend`] (devices), [`cli`] (commands).

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod dms;
pub mod eval;
pub mod model;
pub mod recipe;
pub mod train;
