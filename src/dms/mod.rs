//! Dynamic Memory Sparsification, separable from the architectures: eviction decisions
//! ([`decision`]), deterministic noise ([`noise`]), delayed-eviction masks ([`mask`]), losses
//! ([`losses`]), the compression schedule ([`schedule`]), and the forward pass that plugs them
//! into the decoder's attention ([`forward`]).
//!
//! Semantics follow the official implementation (NVIDIA Model-Optimizer `experimental/dms`); see
//! `docs/dms.md` for the exact rules and the memory each step needs.

pub mod decision;
pub mod forward;
pub mod losses;
pub mod mask;
pub mod noise;
pub mod schedule;

use serde::{Deserialize, Serialize};

pub use decision::DmsAdapter;
pub use forward::{DmsModel, DmsOutput, Mode};
pub use schedule::CompressionSchedule;

/// Where the eviction logit comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// A zero-initialised RMSNorm + Linear(hidden -> kv_heads) on the layer's input residual
    /// (DMS paper §3.2; the official shipped configs).
    Adapter,
    /// The last channel of the first query head of each GQA group, read before RoPE and zeroed
    /// (DMC-style, no new parameters).
    QNeuron,
}

/// Whether each KV head decides on its own or the whole layer shares head 0's decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Head,
    Layer,
}

/// The DMS hyper-parameters that shape the forward pass (spec §1-2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmsConfig {
    pub variant: Variant,
    pub granularity: Granularity,
    /// Delayed-eviction window W: a key marked for eviction stays visible to queries `k ..= k+W`.
    pub window: usize,
    /// Gumbel-sigmoid temperature.
    pub tau: f64,
    /// `logit = alpha_scale * raw - offset`.
    pub alpha_scale: f64,
    pub offset: f64,
}

impl Default for DmsConfig {
    /// The official Qwen3-8B recipe: adapter, per head, W=512, tau 0.1, scale 100, offset 5.
    fn default() -> Self {
        Self {
            variant: Variant::Adapter,
            granularity: Granularity::Head,
            window: 512,
            tau: 0.1,
            alpha_scale: 100.0,
            offset: 5.0,
        }
    }
}
