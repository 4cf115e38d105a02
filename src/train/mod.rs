//! The training loop, its checkpoints and its metrics plot.

pub mod collective;
pub mod plot;
mod retrofit;
mod trainer;

pub use retrofit::{train, train_ranks};
pub use trainer::{
    Batch, EvalReport, EvalSettings, PendingStats, StepPhase, StepSetup, StepStats, TrainOptions,
    TrainSummary, apply_trainable, check_graph_layers, clip_global_norm, distillation_micro_step,
    evaluate, make_batch, read_scalar, resolve_source,
};
