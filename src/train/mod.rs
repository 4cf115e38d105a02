//! The training loop, its checkpoints and its metrics plot.

pub mod plot;
pub mod snapshot;
mod trainer;

pub use trainer::{
    EvalReport, EvalSettings, TrainOptions, TrainSummary, evaluate, resolve_source, train,
};
