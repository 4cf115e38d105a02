//! Evaluation and inference: the physically evicting KV cache, incremental decoding, sampling,
//! and the quality / memory measurements (with training-free baselines).

pub mod baselines;
pub mod cache;
pub mod decode;
pub mod generation;
pub mod heatmap;
pub mod quality;
pub mod report;
pub mod sampling;
pub mod slot_cache;

pub use cache::{Budget, KvCache, Policy};
pub use decode::Decoding;
pub use slot_cache::{CacheMemory, SlotCache};
