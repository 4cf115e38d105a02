//! The retrofit loop, in the order nanoGPT taught us to read: LR -> micro-steps (teacher, student,
//! losses, backward) -> clip -> step -> log -> eval / checkpoint / CR snapshots.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use burn::module::{AutodiffModule, Module, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::record::{AdaptorRecord, AdaptorRecordV1};
use burn::optim::{
    AdamW, AdamWState, AdaptiveMomentumState, GradientsAccumulator, GradientsParams, Optimizer,
};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use serde::Serialize;

use super::plot::{self, MetricLine, TrainMetrics};
use crate::atomic;
use crate::data::dataset::Sequence;
use crate::dms::losses::{
    CompressionLoss, distillation_loss, distillation_loss_chunked_backward, frac_closed,
    ids_tensor, loss_mask,
};
use crate::dms::mask::{inference_key_decisions, retained_fraction};
use crate::dms::noise::NoiseKey;
use crate::dms::{DmsModel, Mode};
use crate::model::decoder::in_dtype;
use crate::model::{Decoder, LayerNorm, ModelConfig, ParamSlot, Projection, WeightKey};
use crate::ops::attention::{AttentionBackend, TrainBackend};
use crate::recipe::Trainable;
use crate::run::RunFolder;
use crate::run::snapshot::{self};

/// How `train` was invoked beyond the recipe.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// Continue from the newest checkpoint in the run folder.
    pub resume: bool,
    /// Folder the recipe's relative paths are resolved against.
    pub recipe_dir: PathBuf,
    /// Hide the progress bar (tests, CI logs).
    pub quiet: bool,
    /// Stop after this many steps of this invocation (tests of interruption), then checkpoint.
    pub stop_after: Option<u64>,
}

/// What a finished (or interrupted) run reports.
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    pub steps: u64,
    pub interrupted: bool,
    pub last: BTreeMap<String, f64>,
    pub cr_snapshots: Vec<u64>,
    pub tokens_per_s: f64,
}

/// Set by the first Ctrl-C, SIGTERM or SIGHUP (what `timeout`, `docker stop`, Slurm and Kubernetes
/// send); checked after every step, which then writes a checkpoint and stops. A second signal exits
/// at once, without one.
pub(super) fn interrupt_flag() -> Arc<AtomicBool> {
    static FLAG: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();
    FLAG.get_or_init(|| {
        let flag = Arc::new(AtomicBool::new(false));
        let handler_flag = flag.clone();
        // ctrlc runs this on its own thread, not in the signal handler: printing and exit are safe.
        let installed = ctrlc::set_handler(move || {
            if handler_flag.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: exiting now, without a checkpoint");
                std::process::exit(130);
            }
            eprintln!(
                "interrupted: stopping after this step with a checkpoint (interrupt again to exit \
                 at once)"
            );
        });
        if let Err(e) = installed {
            tracing::warn!(
                "cannot install the interrupt handler ({e}); Ctrl-C and SIGTERM will not checkpoint"
            );
        }
        flag
    })
    .clone()
}

/// Resolves `source` against the recipe folder when that names an existing path.
pub fn resolve_source(source: &str, recipe_dir: &Path) -> String {
    let candidate = recipe_dir.join(source);
    if Path::new(source).is_relative() && candidate.exists() {
        candidate.to_string_lossy().into_owned()
    } else {
        source.to_string()
    }
}

/// Marks which parameters the optimizer updates; everything else is frozen.
pub fn apply_trainable<B: TrainBackend>(model: DmsModel<B>, trainable: Trainable) -> DmsModel<B> {
    let mut model = model.no_grad();
    for (key, slot) in model.params_mut() {
        let on = match trainable {
            Trainable::All => true,
            Trainable::Adapter => key.is_adapter(),
            Trainable::AdapterAndAttention => {
                key.is_adapter()
                    || matches!(
                        key,
                        WeightKey::Linear {
                            projection: Projection::Q
                                | Projection::K
                                | Projection::V
                                | Projection::O,
                            ..
                        } | WeightKey::Norm {
                            norm: LayerNorm::Q | LayerNorm::K,
                            ..
                        }
                    )
            }
        };
        if on {
            let dms = key.is_adapter();
            match slot {
                ParamSlot::Vector(p) => make_trainable(p, dms),
                ParamSlot::Matrix(p) => make_trainable(p, dms),
            }
        }
    }
    model
}

/// Turns on gradients for `param`. DMS parameters train as f32 master weights whatever the model
/// dtype (see `decoder::in_dtype`); base weights keep the checkpoint's dtype.
fn make_trainable<B: Backend, const D: usize>(param: &mut Param<Tensor<B, D>>, dms: bool) {
    *param = param
        .clone()
        .map(|t| if dms { in_dtype(t, DType::F32) } else { t })
        .set_require_grad(true);
}

/// Each parameter's dtype, by id.
pub(super) fn param_dtypes<B: AttentionBackend>(
    model: &mut DmsModel<B>,
) -> HashMap<ParamId, DType> {
    model
        .params_mut()
        .into_iter()
        .map(|(_, slot)| match slot {
            ParamSlot::Vector(p) => (p.id, p.val().dtype()),
            ParamSlot::Matrix(p) => (p.id, p.val().dtype()),
        })
        .collect()
}

pub(super) type AdamWRecord<B> =
    <OptimizerAdaptor<AdamW, DmsModel<B>, B> as Optimizer<DmsModel<B>, B>>::Record;

/// Optimizer moments are read back in the device's default dtype (bf16 on the GPU); AdamW must see
/// them in their parameter's dtype (f32 master weights), as a fresh run creates them, because the
/// GPU kernels do not promote mixed dtypes.
pub(super) fn moments_in_param_dtypes<B: TrainBackend>(
    record: AdamWRecord<B>,
    dtypes: &HashMap<ParamId, DType>,
) -> AdamWRecord<B> {
    fn cast<B: Backend, const D: usize>(state: AdamWState<B, D>, dtype: DType) -> AdamWState<B, D> {
        let m = state.momentum;
        AdamWState {
            momentum: AdaptiveMomentumState {
                time: m.time,
                moment_1: in_dtype(m.moment_1, dtype),
                moment_2: in_dtype(m.moment_2, dtype),
                max_moment_2: m.max_moment_2.map(|t| in_dtype(t, dtype)),
            },
        }
    }
    record
        .into_iter()
        .map(|(id, entry)| {
            let Some(&dtype) = dtypes.get(&id) else {
                return (id, entry);
            };
            let entry = match entry {
                AdaptorRecord::V1(AdaptorRecordV1::Rank1(s)) => {
                    AdaptorRecord::V1(AdaptorRecordV1::Rank1(cast(s, dtype)))
                }
                AdaptorRecord::V1(AdaptorRecordV1::Rank2(s)) => {
                    AdaptorRecord::V1(AdaptorRecordV1::Rank2(cast(s, dtype)))
                }
                other => other,
            };
            (id, entry)
        })
        .collect()
}

/// Counts (trainable, frozen) parameter values.
pub(super) fn count_params<B: AttentionBackend>(model: &mut DmsModel<B>) -> (usize, usize) {
    let mut counts = (0, 0);
    for (_, slot) in model.params_mut() {
        let (trainable, n) = match slot {
            ParamSlot::Vector(p) => (p.is_require_grad(), p.val().shape().num_elements()),
            ParamSlot::Matrix(p) => (p.is_require_grad(), p.val().shape().num_elements()),
        };
        if trainable {
            counts.0 += n;
        } else {
            counts.1 += n;
        }
    }
    counts
}

/// Clips the summed gradient to `max_norm` in global L2 norm (0: no clipping); returns the norm
/// before clipping, still on the device: reading it waits for the GPU, so read it once the
/// update is queued ([`read_scalar`]). The factor is applied on the device too.
pub fn clip_global_norm<B: TrainBackend>(
    model: &mut DmsModel<B>,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Tensor<B::InnerBackend, 1> {
    let mut slots = Vec::new();
    for (_, slot) in model.params_mut() {
        match slot {
            ParamSlot::Vector(p) if p.is_require_grad() => slots.push((p.id, 1)),
            ParamSlot::Matrix(p) if p.is_require_grad() => slots.push((p.id, 2)),
            _ => {}
        }
    }
    let squares: Vec<Tensor<B::InnerBackend, 1>> = slots
        .iter()
        .filter_map(|&(id, rank)| match rank {
            1 => grads.get::<B::InnerBackend, 1>(id).map(sum_of_squares),
            _ => grads.get::<B::InnerBackend, 2>(id).map(sum_of_squares),
        })
        .collect();
    if squares.is_empty() {
        return Tensor::zeros([1], &model.base.embed_tokens.val().device());
    }
    let norm = Tensor::cat(squares, 0).sum().sqrt();
    if max_norm <= 0.0 {
        return norm;
    }
    // min(1, max_norm / norm): 1 leaves the gradient exactly as it is.
    let scale = (norm.clone() + 1e-6)
        .recip()
        .mul_scalar(max_norm)
        .clamp_max(1.0);
    let mut factors: Vec<(burn::tensor::DType, Tensor<B::InnerBackend, 1>)> = Vec::new();
    let mut factor = |dtype| {
        if let Some((_, f)) = factors.iter().find(|(d, _)| *d == dtype) {
            return f.clone();
        }
        let f = scale.clone().cast(dtype);
        factors.push((dtype, f.clone()));
        f
    };
    for &(id, rank) in &slots {
        match rank {
            1 => {
                if let Some(g) = grads.remove::<B::InnerBackend, 1>(id) {
                    let f = factor(g.dtype());
                    grads.register(id, g * f);
                }
            }
            _ => {
                if let Some(g) = grads.remove::<B::InnerBackend, 2>(id) {
                    let f = factor(g.dtype()).unsqueeze::<2>();
                    grads.register(id, g * f);
                }
            }
        }
    }
    norm
}

/// A one-value tensor's value (waits for the device).
pub fn read_scalar<B: Backend>(value: Tensor<B, 1>) -> f64 {
    value.into_scalar().elem::<f64>()
}

/// `[Σ g²]`, summed in f32 whatever the gradient's dtype.
fn sum_of_squares<B: Backend, const D: usize>(g: Tensor<B, D>) -> Tensor<B, 1> {
    g.cast(burn::tensor::DType::F32).powi_scalar(2).sum()
}

use burn::tensor::ElementConversion;

/// One micro-batch as tensors plus the host copies the loss mask needs.
pub struct Batch<B: Backend> {
    input: Tensor<B, 2, burn::tensor::Int>,
    ids: Vec<i64>,
    mask: Vec<i64>,
    shape: [usize; 2],
}

pub fn make_batch<B: AttentionBackend>(sequences: &[&Sequence], device: &B::Device) -> Batch<B> {
    let shape = [sequences.len(), sequences[0].input_ids.len()];
    let ids: Vec<i64> = sequences.iter().flat_map(|s| s.input_ids.clone()).collect();
    let mask: Vec<i64> = sequences
        .iter()
        .flat_map(|s| s.attention_mask.clone())
        .collect();
    Batch {
        input: ids_tensor(&ids, shape, device),
        ids,
        mask,
        shape,
    }
}

/// `graph_layers` (the setting named `setting` in the error) against the model's `num_layers`: at
/// most all of them keep their graph.
pub fn check_graph_layers(graph_layers: usize, num_layers: usize, setting: &str) -> Result<()> {
    anyhow::ensure!(
        graph_layers <= num_layers,
        "{setting} {graph_layers} but the model has {num_layers} layers; at most {num_layers} \
         (every layer keeps its graph: the memory without layer recomputation)"
    );
    Ok(())
}

/// Fixed inputs of a distillation micro-step.
pub struct StepSetup<'a> {
    pub cfg: &'a ModelConfig,
    /// Target fraction of closed decisions (`1 - 1/CR`).
    pub target: f64,
    pub compression_weight: f64,
    pub compression_loss: CompressionLoss,
    pub eos: u32,
    pub kl_chunk: usize,
    /// Multiplies the loss before backward (1 / gradient-accumulation steps).
    pub loss_scale: f64,
    /// Per-layer recomputation: keep only each layer's input between the forward and the
    /// backward (see [`recomputing_student_pass`]).
    pub recompute_layers: bool,
    /// With `recompute_layers`, the last layers that keep their graph instead (`train.graph_layers`).
    pub graph_layers: usize,
}

/// Scalars of one micro-step.
#[derive(Clone, Copy, Debug, Default)]
pub struct StepStats {
    pub loss: f64,
    pub kl: f64,
    pub compression: f64,
    pub frac_closed: f64,
}

/// A micro-step's scalars still on the device: reading them waits for the GPU, so training reads
/// them once the step's update is queued ([`PendingStats::read`], or [`PendingStats::read_all`]
/// for several micro-steps with one wait).
pub struct PendingStats<B: Backend> {
    /// `[kl, compression, frac_closed]`, f32 (the GPU's losses are f32; the f64 CPU test runs
    /// lose their last digits here).
    values: Tensor<B, 1>,
    compression_weight: f64,
}

impl<B: Backend> PendingStats<B> {
    pub fn read(self) -> StepStats {
        Self::read_all(vec![self])[0]
    }

    /// Each micro-step's scalars, in order, read back together.
    pub fn read_all(pending: Vec<Self>) -> Vec<StepStats> {
        let Some(weight) = pending.first().map(|p| p.compression_weight) else {
            return Vec::new();
        };
        let values = Tensor::cat(pending.into_iter().map(|p| p.values).collect(), 0)
            .into_data()
            .convert::<f64>();
        values
            .as_slice::<f64>()
            .expect("f64 after convert")
            .chunks_exact(3)
            .map(|v| StepStats {
                loss: v[0] + v[1] * weight,
                kl: v[0],
                compression: v[1],
                frac_closed: v[2],
            })
            .collect()
    }
}

/// The parts of a micro-step, in order, for profiling (`bench step --profile`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPhase {
    Teacher,
    Student,
    Loss,
    Backward,
}

/// One distillation micro-step: teacher pass (no graph), student pass with relaxed DMS, chunked
/// KL + compression hinge, backward. Returns the gradients of the trainable parameters.
/// `phase_done` is called after each phase has been queued (a profiler syncs the device there).
pub fn distillation_micro_step<B: TrainBackend>(
    model: &DmsModel<B>,
    separate_teacher: Option<&Decoder<B::InnerBackend>>,
    batch: &Batch<B>,
    noise: NoiseKey,
    setup: &StepSetup,
    phase_done: &mut dyn FnMut(StepPhase),
) -> (GradientsParams, PendingStats<B::InnerBackend>) {
    let StepSetup { cfg, .. } = *setup;
    let device = batch.input.device();
    let [b, seq] = batch.shape;
    // Teacher: on the inner backend, so the autodiff backend records no graph (and keeps no
    // activations) for it; the student's frozen base is the teacher unless base weights train.
    let rope_inner = crate::model::RopeTables::<B::InnerBackend>::for_model(cfg, 0, seq, &device);
    let input = batch.input.clone().inner();
    let teacher = Tensor::<B, 3>::from_inner(match separate_teacher {
        Some(teacher) => teacher.hidden(input, &rope_inner),
        None => model.base.valid().hidden(input, &rope_inner),
    })
    .detach();
    // Drawn on the host while the GPU runs the teacher pass queued above (only the student needs it).
    let noise = Tensor::<B, 4>::from_data(
        TensorData::new(
            noise.logistic(cfg.num_layers * b * cfg.num_kv_heads * seq),
            [cfg.num_layers, b, cfg.num_kv_heads, seq],
        ),
        &device,
    );
    phase_done(StepPhase::Teacher);
    if setup.recompute_layers {
        return recomputing_student_pass(model, batch, teacher, &noise, setup, phase_done);
    }
    let student = model.forward(batch.input.clone(), &Mode::Train { noise: &noise });
    phase_done(StepPhase::Student);
    let decisions: Vec<_> = student.layers.into_iter().map(|l| l.decisions).collect();
    let mut loss = StepLoss::new(model, batch, student.hidden, teacher, &decisions, setup);
    phase_done(StepPhase::Loss);
    let grads = loss.backward();
    let grads = loss.params_grads(model, grads);
    phase_done(StepPhase::Backward);
    (grads, loss.stats())
}

/// The micro-step's loss: chunked KL to the teacher plus the weighted compression hinge.
///
/// The KL is back-propagated chunk by chunk as it is computed
/// ([`distillation_loss_chunked_backward`]); what remains for the model's graph is a surrogate
/// `(student_hidden * dKL/dhidden).sum() + weight * hinge` with the same gradients.
struct StepLoss<B: TrainBackend> {
    /// KL value (detached, unscaled).
    kl: Tensor<B, 1>,
    compression: Tensor<B, 1>,
    frac: Tensor<B, 1>,
    compression_weight: f64,
    /// Scaled by `loss_scale`.
    surrogate: Tensor<B, 1>,
    /// Gradients from the KL chunks' own graphs (the head, when it trains), scaled; the model
    /// graph's are added by [`Self::params_grads`].
    grads: GradientsAccumulator<DmsModel<B>>,
}

impl<B: TrainBackend> StepLoss<B> {
    fn new(
        model: &DmsModel<B>,
        batch: &Batch<B>,
        student_hidden: Tensor<B, 3>,
        teacher: Tensor<B, 3>,
        decisions: &[Tensor<B, 3>],
        setup: &StepSetup,
    ) -> Self {
        let device = batch.input.device();
        let mask = loss_mask::<B>(&batch.ids, &batch.mask, batch.shape, &[setup.eos], &device);
        let mut grads = GradientsAccumulator::<DmsModel<B>>::new();
        let (kl, grad_hidden) = distillation_loss_chunked_backward(
            &student_hidden,
            teacher,
            &|h| model.logits(h),
            mask,
            setup.kl_chunk,
            setup.loss_scale,
            &mut |chunk| grads.accumulate(model, GradientsParams::from_grads(chunk, model)),
        );
        let frac = frac_closed(decisions);
        let compression = setup.compression_loss.loss(frac.clone(), setup.target);
        // The product is in the activation dtype; the hinge is f32.
        let surrogate = (student_hidden * grad_hidden).sum().cast(FloatDType::F32)
            + compression.clone() * (setup.compression_weight * setup.loss_scale);
        Self {
            kl: kl / setup.loss_scale,
            compression,
            frac,
            compression_weight: setup.compression_weight,
            surrogate,
            grads,
        }
    }

    /// Back-propagates the rest of the loss (already scaled by `loss_scale`) through the model.
    fn backward(&self) -> B::Gradients {
        self.surrogate.backward()
    }

    /// All parameter gradients: the model graph's `grads` plus the KL chunks'.
    fn params_grads(&mut self, model: &DmsModel<B>, grads: B::Gradients) -> GradientsParams {
        self.grads
            .accumulate(model, GradientsParams::from_grads(grads, model));
        self.grads.grads()
    }

    fn stats(self) -> PendingStats<B::InnerBackend> {
        let f32 = |t: Tensor<B, 1>| t.inner().cast(FloatDType::F32);
        PendingStats {
            values: Tensor::cat(
                vec![f32(self.kl), f32(self.compression), f32(self.frac.mean())],
                0,
            ),
            compression_weight: self.compression_weight,
        }
    }
}

/// The student half of a micro-step with per-layer recomputation (activation checkpointing, as
/// the official recipe uses): the student runs once without a graph, keeping each layer's input;
/// the loss is differentiated with respect to the final hidden states and the decisions; then each
/// layer is re-run with a graph, last to first, and back-propagated on its own with the gradient
/// arriving from above. Same gradients as the one-graph step, one more student forward, and the
/// activation memory of one layer instead of all of them. The last `graph_layers` layers instead
/// run with a graph in the first pass and are back-propagated with the loss (a trade between the
/// two: less recomputation, more memory).
fn recomputing_student_pass<B: TrainBackend>(
    model: &DmsModel<B>,
    batch: &Batch<B>,
    teacher: Tensor<B, 3>,
    noise: &Tensor<B, 4>,
    setup: &StepSetup,
    phase_done: &mut dyn FnMut(StepPhase),
) -> (GradientsParams, PendingStats<B::InnerBackend>) {
    let StepSetup { cfg, .. } = *setup;
    let device = batch.input.device();
    let [_, seq] = batch.shape;
    let rope = crate::model::RopeTables::<B>::for_model(cfg, 0, seq, &device);

    // 1. Forward without a graph through the recomputed layers, keeping each one's input and
    //    decisions; the last `graph_layers` run with a graph from there.
    let recomputed = cfg.num_layers - setup.graph_layers.min(cfg.num_layers);
    let frozen = model.valid();
    let inner_noise = noise.clone().inner();
    let inner_mode = Mode::Train {
        noise: &inner_noise,
    };
    let inner_rope = crate::model::RopeTables::for_model(cfg, 0, seq, &inner_noise.device());
    let mut inputs = Vec::with_capacity(recomputed);
    let mut hidden = frozen.base.embed(batch.input.clone().inner());
    let mut recomputed_decisions = Vec::with_capacity(recomputed);
    for index in 0..recomputed {
        inputs.push(hidden.clone());
        let (next, layer) = frozen.forward_layer(index, hidden, &inner_rope, &inner_mode);
        hidden = next;
        recomputed_decisions.extend(layer.map(|l| l.decisions));
    }
    // The first graph layer's input (or the final hidden states when every layer is
    // recomputed): the loss is differentiated with respect to it.
    let boundary = Tensor::<B, 3>::from_inner(hidden).require_grad();
    let mode = Mode::Train { noise };
    let mut last = boundary.clone();
    let mut graph_decisions = Vec::new();
    for index in recomputed..cfg.num_layers {
        let (next, layer) = model.forward_layer(index, last, &rope, &mode);
        last = next;
        graph_decisions.extend(layer.map(|l| l.decisions));
    }
    phase_done(StepPhase::Student);

    // 2. The loss, differentiated with respect to the boundary, the recomputed layers' decisions
    //    and the graph layers' parameters.
    let recomputed_decisions: Vec<Tensor<B, 3>> = recomputed_decisions
        .into_iter()
        .map(|d| Tensor::from_inner(d).require_grad())
        .collect();
    let decisions: Vec<Tensor<B, 3>> = recomputed_decisions
        .iter()
        .cloned()
        .chain(graph_decisions)
        .collect();
    let mut loss = StepLoss::new(model, batch, last, teacher, &decisions, setup);
    phase_done(StepPhase::Loss);
    let grads = loss.backward();
    let mut upstream = boundary.grad(&grads).map(Tensor::<B, 3>::from_inner);
    let decision_grads: Vec<_> = recomputed_decisions
        .iter()
        .map(|d| d.grad(&grads).map(Tensor::<B, 3>::from_inner))
        .collect();
    let mut accumulator = GradientsAccumulator::<DmsModel<B>>::new();
    accumulator.accumulate(model, loss.params_grads(model, grads));

    // 3. Each recomputed layer again, with a graph, last to first.
    for index in (0..recomputed).rev() {
        let input =
            Tensor::<B, 3>::from_inner(inputs.pop().expect("one input per layer")).require_grad();
        let (out, layer) = model.forward_layer(index, input.clone(), &rope, &mode);
        let mut surrogate = match upstream.take() {
            Some(g) => (out * g).sum(),
            None => out.sum() * 0.0,
        };
        if let (Some(layer), Some(Some(g))) = (layer, decision_grads.get(index)) {
            surrogate = surrogate + (layer.decisions * g.clone()).sum();
        }
        let grads = surrogate.backward();
        upstream = input.grad(&grads).map(Tensor::<B, 3>::from_inner);
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    // The embedding, when it trains (`trainable = "all"`).
    if let (Some(g), true) = (upstream, model.base.embed_tokens.is_require_grad()) {
        let grads = (model.base.embed(batch.input.clone()) * g).sum().backward();
        accumulator.accumulate(model, GradientsParams::from_grads(grads, model));
    }
    phase_done(StepPhase::Backward);
    (accumulator.grads(), loss.stats())
}

/// Everything one evaluation reports.
#[derive(Clone, Debug, Default)]
pub struct EvalReport {
    pub kl: f64,
    pub frac_closed: f64,
    pub compression_ratio: f64,
}

/// What an evaluation runs with besides the models and data.
pub struct EvalSettings<'a> {
    pub cfg: &'a ModelConfig,
    pub batch_size: usize,
    pub eos: &'a [u32],
    pub kl_chunk: usize,
}

/// Teacher-forced KL against the original model under hard (inference) eviction, the fraction of
/// closed decisions, and the measured CR (retained keys at the last position, window included).
pub fn evaluate<B: AttentionBackend>(
    student: &DmsModel<B>,
    teacher: &Decoder<B>,
    sequences: &[Sequence],
    settings: &EvalSettings,
    device: &B::Device,
) -> EvalReport {
    let EvalSettings {
        cfg,
        batch_size,
        eos,
        kl_chunk,
    } = *settings;
    let (mut kl, mut tokens, mut closed, mut decisions, mut retained, mut heads) =
        (0f64, 0f64, 0f64, 0f64, 0f64, 0f64);
    for chunk in sequences.chunks(batch_size.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let batch = make_batch::<B>(&refs, device);
        let rope = crate::model::RopeTables::for_model(cfg, 0, batch.shape[1], device);
        let teacher_hidden = teacher.hidden(batch.input.clone(), &rope);
        let out = student.forward(batch.input.clone(), &Mode::Inference);
        let mask = loss_mask::<B>(&batch.ids, &batch.mask, batch.shape, eos, device);
        let count = mask.clone().sum().into_scalar().elem::<f64>();
        let mean = distillation_loss(
            out.hidden,
            teacher_hidden,
            &|h| student.logits(h),
            mask,
            kl_chunk,
        )
        .into_scalar()
        .elem::<f64>();
        kl += mean * count;
        tokens += count;
        for layer in out.layers {
            let n = layer.decisions.shape().num_elements() as f64;
            closed += layer.decisions.clone().sum().into_scalar().elem::<f64>();
            decisions += n;
            let kept = retained_fraction(inference_key_decisions(layer.logits), student.dms.window);
            heads += kept.shape().num_elements() as f64;
            retained += kept.sum().into_scalar().elem::<f64>();
        }
    }
    EvalReport {
        kl: kl / tokens.max(1.0),
        frac_closed: closed / decisions.max(1.0),
        compression_ratio: heads / retained.max(f64::MIN_POSITIVE),
    }
}

/// Appends one line to `metrics.jsonl`.
pub(super) fn append_metrics(path: &Path, line: &MetricLine) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open '{}'", path.display()))?;
    let text = serde_json::to_string(line)?;
    writeln!(file, "{text}").with_context(|| format!("cannot write '{}'", path.display()))
}

/// Drops metric lines of steps not yet covered by the checkpoint being resumed.
pub(super) fn truncate_metrics(path: &Path, completed_steps: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|step| step < completed_steps)
        })
        .collect();
    atomic::write_file(
        path,
        kept.iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
            .as_bytes(),
    )
}

/// The summary of a run after `steps` steps, rebuilt from its folder (metrics and cr-K snapshots)
/// so that a run resumed any number of times reports what an uninterrupted one does; only the
/// throughput (wall-clock) differs.
pub(super) fn summarize(run: &RunFolder, steps: u64, interrupted: bool) -> Result<TrainSummary> {
    let lines = if run.metrics().is_file() {
        plot::read_metrics(&run.metrics())?
    } else {
        Vec::new()
    };
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for line in lines {
        match line {
            MetricLine::Train(t) if t.step < steps => train.push(t),
            MetricLine::Eval(e) if e.step < steps => eval.push(e),
            _ => {}
        }
    }
    let train = plot::latest_run(train, |t| t.step);
    let eval = plot::latest_run(eval, |e| e.step);
    let mut last = BTreeMap::new();
    if let Some(t) = train.last().filter(|t| t.step + 1 == steps) {
        last = last_metrics(t);
        if let Some(e) = eval.last().filter(|e| e.step == t.step) {
            last.insert("eval_kl".into(), e.eval_kl);
            last.insert("eval_cr".into(), e.eval_cr);
        }
    }
    let mut cr_snapshots = Vec::new();
    for (k, dir) in crate::run::list_cr_snapshots(run.root())? {
        if snapshot::read_state(&dir).is_ok_and(|state| state.step <= steps) {
            cr_snapshots.push(k);
        }
    }
    let mut throughput: Vec<f64> = train.iter().map(|t| t.tokens_per_s).collect();
    Ok(TrainSummary {
        run_dir: run.root().to_path_buf(),
        steps,
        interrupted,
        last,
        cr_snapshots,
        tokens_per_s: median(&mut throughput),
    })
}

/// The per-step metrics a summary and a snapshot's state report.
pub(super) fn last_metrics(t: &TrainMetrics) -> BTreeMap<String, f64> {
    BTreeMap::from([
        ("loss".to_string(), t.loss),
        ("kl".to_string(), t.kl),
        ("compression_loss".to_string(), t.compression_loss),
        ("frac_closed".to_string(), t.frac_closed),
        ("train_cr".to_string(), t.train_cr),
        ("target_cr".to_string(), t.target_cr),
    ])
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuAutodiff;
    use crate::checkpoint::Checkpoint;
    use crate::dms::DmsConfig;
    use crate::model::FloatFormat;
    use burn::optim::AdamWConfig;

    type B = CpuAutodiff;

    fn moment_dtypes(record: &AdamWRecord<B>) -> Vec<DType> {
        record
            .values()
            .flat_map(|entry| match entry.clone() {
                AdaptorRecord::V1(AdaptorRecordV1::Rank1(s)) => {
                    vec![s.momentum.moment_1.dtype(), s.momentum.moment_2.dtype()]
                }
                AdaptorRecord::V1(AdaptorRecordV1::Rank2(s)) => {
                    vec![s.momentum.moment_1.dtype(), s.momentum.moment_2.dtype()]
                }
                _ => vec![],
            })
            .collect()
    }

    /// The teacher pass runs on the inner backend (no autodiff graph) and gives exactly the
    /// student's hidden states with eviction off, for every trainable set.
    #[test]
    fn inner_teacher_equals_the_student_with_eviction_off() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
        let ckpt = Checkpoint::open(dir).unwrap();
        let cfg = &ckpt.config;
        let device = Default::default();
        let dms = DmsConfig::default();
        let input = make_batch::<B>(
            &[&Sequence {
                input_ids: vec![1, 2, 3, 4, 5, 6, 7],
                attention_mask: vec![1; 7],
            }],
            &device,
        )
        .input;
        for trainable in [Trainable::Adapter, Trainable::All] {
            let decoder = ckpt.load_decoder::<B>(FloatFormat::F32, &device).unwrap();
            let model = DmsModel::new(decoder, &dms, None, &device).unwrap();
            let model = apply_trainable(model, trainable);
            let rope = crate::model::RopeTables::<
                <B as burn::tensor::backend::AutodiffBackend>::InnerBackend,
            >::for_model(cfg, 0, 7, &device);
            let inner = model.base.valid().hidden(input.clone().inner(), &rope);
            let graph = model.forward(input.clone(), &Mode::Original).hidden.inner();
            let (a, b): (Vec<f32>, Vec<f32>) = (
                inner.into_data().to_vec().unwrap(),
                graph.into_data().to_vec().unwrap(),
            );
            assert_eq!(a, b, "{trainable:?}");
        }
    }

    /// A record read back in another dtype (as the GPU's bf16 default does) is cast to each
    /// parameter's own dtype before AdamW sees it.
    #[test]
    fn resumed_moments_take_their_parameters_dtype() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/llama");
        let ckpt = Checkpoint::open(dir).unwrap();
        let cfg = &ckpt.config;
        let device = Default::default();
        let dms = DmsConfig::default();
        let decoder = ckpt.load_decoder::<B>(FloatFormat::F32, &device).unwrap();
        let model = DmsModel::new(decoder, &dms, None, &device).unwrap();
        let mut model = apply_trainable(model, Trainable::Adapter);
        let mut optimizer = AdamWConfig::new().init::<B, DmsModel<B>>();
        let batch = make_batch::<B>(
            &[&Sequence {
                input_ids: vec![1, 2, 3, 4, 5, 6],
                attention_mask: vec![1; 6],
            }],
            &device,
        );
        let setup = StepSetup {
            cfg,
            target: 0.5,
            compression_weight: 1.0,
            compression_loss: CompressionLoss::Hinge,
            eos: u32::MAX,
            kl_chunk: 6,
            loss_scale: 1.0,
            recompute_layers: false,
            graph_layers: 0,
        };
        let noise = NoiseKey {
            seed: 0,
            step: 0,
            micro_batch: 0,
            rank: 0,
        };
        let (grads, _) = distillation_micro_step(&model, None, &batch, noise, &setup, &mut |_| {});
        model = optimizer.step(1e-3, model, grads);
        let record = optimizer.to_record();
        assert!(!record.is_empty());
        let f64s: HashMap<ParamId, DType> = param_dtypes(&mut model)
            .into_keys()
            .map(|id| (id, DType::F64))
            .collect();
        let wrong = moments_in_param_dtypes::<B>(record, &f64s);
        assert!(moment_dtypes(&wrong).iter().all(|d| *d == DType::F64));
        let fixed = moments_in_param_dtypes::<B>(wrong, &param_dtypes(&mut model));
        let dtypes = moment_dtypes(&fixed);
        assert!(!dtypes.is_empty() && dtypes.iter().all(|d| *d == DType::F32));
    }

    fn trained_id(slot: &ParamSlot<'_, B>) -> Option<ParamId> {
        match slot {
            ParamSlot::Vector(p) if p.is_require_grad() => Some(p.id),
            ParamSlot::Matrix(p) if p.is_require_grad() => Some(p.id),
            _ => None,
        }
    }

    /// The gradient of the parameter in `slot`, as f32 values.
    fn grad_values(
        grads: &GradientsParams,
        id: ParamId,
        slot: &ParamSlot<'_, B>,
    ) -> Option<Vec<f32>> {
        type Inner = <B as burn::tensor::backend::AutodiffBackend>::InnerBackend;
        let data = match slot {
            ParamSlot::Vector(_) => grads.get::<Inner, 1>(id)?.into_data(),
            ParamSlot::Matrix(_) => grads.get::<Inner, 2>(id)?.into_data(),
        };
        Some(data.to_vec::<f32>().unwrap())
    }

    /// Per-layer recomputation, and recomputing the MLPs' projections, give the one-graph step's
    /// gradients and statistics, for both variants and with every parameter trainable (embedding
    /// and head included, so the MLP node's weight gradients are compared too).
    #[test]
    fn recomputed_layers_give_the_same_gradients() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/qwen3");
        let ckpt = Checkpoint::open(dir).unwrap();
        let cfg = &ckpt.config;
        let device = Default::default();
        for (variant, trainable) in [
            (crate::dms::Variant::Adapter, Trainable::Adapter),
            (crate::dms::Variant::QNeuron, Trainable::All),
        ] {
            // No offset and a warm temperature keep decisions in sigmoid's sensitive range.
            let dms = DmsConfig {
                variant,
                window: 2,
                tau: 1.0,
                offset: 0.0,
                ..DmsConfig::default()
            };
            let decoder = ckpt.load_decoder::<B>(FloatFormat::F32, &device).unwrap();
            let mut model = DmsModel::new(decoder, &dms, None, &device).unwrap();
            // Random adapters, so that decisions sit where their gradients are not ~0.
            for (key, slot) in model.params_mut() {
                if let (true, ParamSlot::Matrix(p)) = (key.is_adapter(), slot) {
                    let dims = p.val().dims();
                    *p = Param::initialized(
                        p.id,
                        Tensor::random(
                            dims,
                            burn::tensor::Distribution::Normal(0.0, 0.002),
                            &device,
                        ),
                    );
                }
            }
            let mut model = apply_trainable(model, trainable);
            let batch = make_batch::<B>(
                &[
                    &Sequence {
                        input_ids: vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3],
                        attention_mask: vec![1; 10],
                    },
                    &Sequence {
                        input_ids: vec![2, 7, 1, 8, 2, 8, 0, 0, 0, 0],
                        attention_mask: vec![1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
                    },
                ],
                &device,
            );
            let mut mlp_model = model.clone();
            mlp_model.base.recompute_mlp(true);
            let step_of = |model: &DmsModel<B>, recompute_layers: bool, graph_layers: usize| {
                let setup = StepSetup {
                    cfg,
                    target: 0.6,
                    compression_weight: 1.0,
                    compression_loss: CompressionLoss::Hinge,
                    eos: u32::MAX,
                    kl_chunk: 4,
                    loss_scale: 0.5,
                    recompute_layers,
                    graph_layers,
                };
                let noise = NoiseKey {
                    seed: 7,
                    step: 3,
                    micro_batch: 0,
                    rank: 0,
                };
                let (grads, stats) =
                    distillation_micro_step(model, None, &batch, noise, &setup, &mut |_| {});
                (grads, stats.read())
            };
            let step = |recompute_layers: bool| step_of(&model, recompute_layers, 0);
            let (want, want_stats) = step(false);
            let frac = want_stats.frac_closed;
            assert!(
                frac > 0.05 && frac < 0.95,
                "{variant:?}: frac_closed {frac}"
            );
            let (got, got_stats) = step(true);
            assert!((want_stats.loss - got_stats.loss).abs() < 1e-6);
            assert_eq!(want_stats.frac_closed, got_stats.frac_closed);
            // Recomputing the MLPs' projections in the backward (the model::mlp node).
            let (got_mlp, mlp_stats) = step_of(&mlp_model, false, 0);
            assert!((want_stats.loss - mlp_stats.loss).abs() < 1e-6);
            // Recomputing all but the last layer, and none (every layer in the first graph).
            let (got_one, one_stats) = step_of(&model, true, 1);
            let (got_all, all_stats) = step_of(&model, true, cfg.num_layers);
            for stats in [one_stats, all_stats] {
                assert!((want_stats.loss - stats.loss).abs() < 1e-6);
                assert_eq!(want_stats.frac_closed, stats.frac_closed);
            }
            let mut compared = 0;
            for got in [&got, &got_mlp, &got_one, &got_all] {
                for (key, slot) in model.params_mut() {
                    let Some(id) = trained_id(&slot) else {
                        continue;
                    };
                    let w = grad_values(&want, id, &slot).expect("one-graph gradient");
                    let g = grad_values(got, id, &slot)
                        .unwrap_or_else(|| panic!("{key:?}: no recomputed gradient"));
                    let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
                    assert!(
                        scale > 1e-6,
                        "{variant:?} {key:?}: gradient ~0, nothing compared"
                    );
                    for (a, b) in w.iter().zip(&g) {
                        assert!(
                            (a - b).abs() <= 1e-4 * scale,
                            "{variant:?} {key:?}: {a} vs {b}"
                        );
                    }
                    compared += 1;
                }
            }
            assert!(compared > 0, "{variant:?}: some gradients compared");
        }
    }
}
