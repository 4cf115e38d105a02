//! dms-retrofit: retrofit Llama and Qwen checkpoints with Dynamic Memory Sparsification (DMS).
//!
//! Layout: [`model`] (the architectures), [`ops`] (their operations and CUDA kernels), [`dms`]
//! (the method), [`checkpoint`] (Hugging Face files),
//! [`data`] (text), [`train`] (the loop), [`run`] (the run folder), [`eval`] (inference),
//! [`atomic`] (crash-safe writes), [`backend`] (devices), [`heap`] (heap bytes in use, for
//! profiles on the CPU), [`cli`] (commands).

pub mod atomic;
pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod dms;
pub mod eval;
pub mod heap;
pub mod model;
pub mod ops;
pub mod parallel;
pub mod recipe;
pub mod run;
pub mod train;
