//! `dms-retrofit bench step`: time one DMS distillation step (adapter-only, as the official
//! recipe) on random weights of a named model shape, batch 1. Prints tokens/s; peak GPU memory is
//! read by `scripts/bench-gpu.sh` from the driver while this runs.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::optim::{AdamWConfig, Optimizer};
use burn::tensor::TensorData;
use clap::{Args, Subcommand};
use half::f16;
use serde::Serialize;

use crate::backend::{Cpu, CpuAutodiff, DeviceSpec};
use crate::data::Sequence;
use crate::dms::noise::NoiseKey;
use crate::dms::{DmsConfig, DmsModel};
use crate::model::{
    Architecture, Decoder, FloatFormat, ModelConfig, RopeConfig, RopeScaling, WeightKey,
    WeightSource,
};
use crate::ops::attention::{AttentionBackend, TrainBackend};
use crate::ops::upload::DirectWeight;
use crate::recipe::Trainable;
use crate::train::{
    StepPhase, StepSetup, apply_trainable, check_graph_layers, clip_global_norm,
    distillation_micro_step, make_batch, read_scalar,
};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// One DMS distillation step on random weights: teacher + student forward, chunked KL,
    /// backward, clip, AdamW.
    Step(StepArgs),
    /// The linear layers' GEMMs (forward, input and weight gradients) at a model shape's sizes:
    /// the backend's path (cuBLASLt on CUDA) beside burn's matmul, timed and compared.
    Linear(super::bench_ops::LinearArgs),
    /// The DMS attention forward (with key bias): the backend's path (fused on CUDA) beside the
    /// chunked tensor-op version, timed and compared.
    Attention(super::bench_ops::AttentionArgs),
    /// RMSNorm, SwiGLU and RoPE, forward and backward: the backend's path (one fused kernel each
    /// on CUDA) beside burn's tensor-op formulas, timed and compared.
    Elementwise(super::bench_ops::ElementwiseArgs),
    /// Teacher-forced eval throughput (original and DMS forward + perplexity + KL) at long
    /// lengths, DMS decisions calibrated to a target CR.
    Eval(super::bench_infer::EvalBenchArgs),
    /// Decode throughput and KV memory through the slot cache: dense beside DMS at target CRs,
    /// at given contexts and batch sizes.
    Decode(super::bench_infer::DecodeBenchArgs),
    /// A real checkpoint onto the device: open, then load every base tensor (repeatedly), with
    /// GB/s and the host-side seconds of each load.
    Load(super::bench_load::LoadArgs),
}

#[derive(Args, Debug)]
pub struct StepArgs {
    /// qwen3-0.6b, qwen3-1.7b, qwen3-8b, llama3-8b, smollm2-135m
    #[arg(long, default_value = "qwen3-1.7b")]
    pub shape: String,
    #[arg(long, default_value_t = 4096)]
    pub seq: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Keep the MLPs' gate and up projections for the backward instead of recomputing them
    /// (`train.recompute_mlp = false`): faster, more memory.
    #[arg(long)]
    pub keep_mlp_activations: bool,
    /// Tokens per chunk of the distillation loss (the recipes' default): each chunk's
    /// `[chunk, vocab]` logits exist once in bf16 and a few times in f32.
    #[arg(long, default_value_t = 1024)]
    pub kl_chunk: usize,
    /// After the timed steps, run 2 more with a device sync after each phase and report where
    /// the time goes (teacher, student, loss, backward, optimizer).
    #[arg(long)]
    pub profile: bool,
    /// Autodiff checkpointing: `none` keeps every activation the backward needs; `balanced`
    /// recomputes memory-bound ops (elementwise, norms) in the backward and keeps matmul outputs.
    #[arg(long, default_value = "none", value_parser = ["none", "balanced"])]
    pub checkpointing: String,
    /// Per-layer recomputation (`train.recompute_layers`): keep only each layer's input.
    #[arg(long)]
    pub recompute_layers: bool,
    /// With --recompute-layers: the last N layers keep their graph instead of being recomputed
    /// (`train.graph_layers`).
    #[arg(long, default_value_t = 0, requires = "recompute_layers")]
    pub graph_layers: usize,
}

#[derive(Serialize)]
struct StepReport {
    shape: String,
    seq: usize,
    device: String,
    dtype: String,
    parameters: u64,
    checkpointing: String,
    recompute_layers: bool,
    graph_layers: usize,
    /// The MLPs' gate and up projections recomputed in the backward (`train.recompute_mlp`).
    recompute_mlp: bool,
    /// Seconds to generate the random base weights (all threads; on CUDA straight into the
    /// staging buffers) and place them on the device, and the weight bytes per second that makes.
    weights_s: f64,
    weights_gb_per_s: f64,
    first_step_s: f64,
    step_s: f64,
    tokens_per_s: f64,
    /// Median seconds per phase of the profiled steps (with `--profile`).
    #[serde(skip_serializing_if = "Option::is_none")]
    phases_s: Option<std::collections::BTreeMap<&'static str, f64>>,
    /// GPU memory pools (with `--profile` on CUDA), GiB: the most bytes in use by live tensors
    /// and reserved in pages at the end of any profiled phase (samples, so a lower bound of the
    /// peak inside a phase), and in use at the start of the step and at the end of each phase
    /// (where the memory goes); `nvidia-smi` adds the CUDA context to the reserved figure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pool_gib: Option<PoolGib>,
    /// CUDA hand-offs per timed step (count, and the host seconds they took: looking up
    /// buffers, choosing GEMM algorithms, enqueueing); absent on the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    cuda_handoffs_per_step: Option<HandoffsPerStep>,
    /// Loss and adapter-gradient norm (before clipping) of every step, warm-up first: the same
    /// random weights and tokens give the same numbers up to rounding, whichever GEMM runs.
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
}

#[derive(Serialize)]
struct PoolGib {
    in_use_max: f64,
    reserved_max: f64,
    /// In use at the step's start ("0 start": weights, optimizer state) and at the end of each
    /// phase, the most over the profiled steps.
    in_use_after: std::collections::BTreeMap<&'static str, f64>,
}

/// The profiled steps' phase times and GPU pool samples.
#[derive(Default)]
struct Profile {
    phase_times: std::collections::BTreeMap<&'static str, Vec<f64>>,
    pool_max: Option<(u64, u64)>,
    in_use_after: std::collections::BTreeMap<&'static str, u64>,
}

/// The name of the pool sample taken as a profiled step starts.
const STEP_START: &str = "0 start";

impl Profile {
    /// Ends phase `name` (the device already synchronised): its time since `mark`, a pool sample.
    fn lap<D: 'static>(&mut self, name: &'static str, mark: &mut Instant, device: &D) {
        let now = Instant::now();
        self.phase_times
            .entry(name)
            .or_default()
            .push((now - *mark).as_secs_f64());
        *mark = now;
        self.sample(name, device);
    }

    /// Records the pools' bytes now under `name`.
    fn sample<D: 'static>(&mut self, name: &'static str, device: &D) {
        if let Some((used, reserved)) = crate::backend::device_pool_bytes(device) {
            let (u, r) = self.pool_max.unwrap_or((0, 0));
            self.pool_max = Some((u.max(used), r.max(reserved)));
            let after = self.in_use_after.entry(name).or_default();
            *after = (*after).max(used);
        }
    }

    fn pool_gib(&self) -> Option<PoolGib> {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        self.pool_max.map(|(used, reserved)| PoolGib {
            in_use_max: gib(used),
            reserved_max: gib(reserved),
            in_use_after: self
                .in_use_after
                .iter()
                .map(|(&name, &b)| (name, gib(b)))
                .collect(),
        })
    }
}

/// Model shapes for benchmarks (architecture sizes of the public checkpoints).
pub fn shape(name: &str) -> Result<ModelConfig> {
    let (arch, vocab, hidden, inter, layers, heads, kv, head_dim, tied) = match name {
        "qwen3-0.6b" => (
            Architecture::Qwen3,
            151936,
            1024,
            3072,
            28,
            16,
            8,
            128,
            true,
        ),
        "qwen3-1.7b" => (
            Architecture::Qwen3,
            151936,
            2048,
            6144,
            28,
            16,
            8,
            128,
            false,
        ),
        "qwen3-8b" => (
            Architecture::Qwen3,
            151936,
            4096,
            12288,
            36,
            32,
            8,
            128,
            false,
        ),
        "llama3-8b" => (
            Architecture::Llama,
            128256,
            4096,
            14336,
            32,
            32,
            8,
            128,
            false,
        ),
        "smollm2-135m" => (Architecture::Llama, 49152, 576, 1536, 30, 9, 3, 64, true),
        other => bail!(
            "unknown shape '{other}'; choose qwen3-0.6b, qwen3-1.7b, qwen3-8b, llama3-8b, smollm2-135m"
        ),
    };
    Ok(ModelConfig {
        architecture: arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv,
        head_dim,
        rms_norm_eps: 1e-6,
        rope: RopeConfig {
            theta: 1_000_000.0,
            scaling: RopeScaling::Default,
        },
        max_position_embeddings: 40960,
        tie_word_embeddings: tied,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: arch == Architecture::Qwen3,
        declared_dtype: Some(FloatFormat::Bf16),
        bos_token_id: None,
        eos_token_ids: vec![151645],
    })
}

/// Random weights: uniform in [-0.03, 0.03) (norm weights 1). Each value comes from a hash of its
/// tensor's key and its index, so any part of a tensor is made on its own: on every core, straight
/// into the device's staging buffers where the backend takes them ([`WeightSource::direct`]), and
/// the same on every machine. (Made on the host and uploaded, 8B parameters took ~17 s.)
struct RandomWeights {
    format: FloatFormat,
}

impl RandomWeights {
    /// Tensor `key`'s bytes from byte `at` on, into `part`.
    fn fill(&self, key: WeightKey, part: &mut [u8], at: usize) {
        let width = self.format.bytes();
        let is_norm = matches!(key, WeightKey::FinalNorm | WeightKey::Norm { .. });
        let write = |out: &mut [u8], v: f32| match self.format {
            FloatFormat::F32 => out.copy_from_slice(&v.to_le_bytes()),
            // Truncated, not rounded: the values are random anyway, and this is 2x faster.
            FloatFormat::Bf16 => out.copy_from_slice(&((v.to_bits() >> 16) as u16).to_le_bytes()),
            FloatFormat::F16 => out.copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        };
        if is_norm {
            return part.chunks_exact_mut(width).for_each(|out| write(out, 1.0));
        }
        let seed = key.param_id().val();
        let first = (at / width) as u64;
        // bf16 (what `bench step` uses): whole groups of four values from one hash, written 8 bytes
        // at a time without the per-value loop's branches; the values before and after them go
        // value by value.
        let (head, groups) = if self.format == FloatFormat::Bf16 {
            let values = (part.len() / width) as u64;
            let head = ((4 - first % 4) % 4).min(values);
            (head as usize, ((values - head) / 4) as usize)
        } else {
            (part.len() / width, 0)
        };
        let per_value = |out: &mut [u8], first: u64| {
            let mut hash = 0;
            for (i, out) in out.chunks_exact_mut(width).enumerate() {
                let index = first + i as u64;
                if i == 0 || index.is_multiple_of(4) {
                    hash = split_mix(seed, index / 4);
                }
                write(out, random_value(hash, index % 4));
            }
        };
        let (head_bytes, rest) = part.split_at_mut(head * width);
        per_value(head_bytes, first);
        let (group_bytes, tail_bytes) = rest.split_at_mut(groups * 4 * width);
        let first_group = (first + head as u64) / 4;
        for (g, out) in group_bytes.chunks_exact_mut(8).enumerate() {
            let hash = split_mix(seed, first_group + g as u64);
            let packed = (0..4).fold(0u64, |packed, lane| {
                let bits = u64::from(random_value(hash, lane).to_bits() >> 16);
                packed | bits << (16 * lane)
            });
            out.copy_from_slice(&packed.to_le_bytes());
        }
        per_value(tail_bytes, first + (head + 4 * groups) as u64);
    }
}

/// Value `lane` (0-3) of a hash's four: its 16 bits as a uniform value in [-0.03, 0.03).
fn random_value(hash: u64, lane: u64) -> f32 {
    let bits = (hash >> (lane * 16)) as u16;
    (bits as f32 / 65536.0 - 0.5) * 0.06
}

/// SplitMix64's output for position `index` of stream `seed`.
fn split_mix(seed: u64, index: u64) -> u64 {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl WeightSource for RandomWeights {
    fn load(&mut self, key: WeightKey, expected: &[usize]) -> Result<TensorData> {
        let mut bytes = vec![0u8; expected.iter().product::<usize>() * self.format.bytes()];
        crate::parallel::fill_parts(&mut bytes, self.format.bytes(), 1 << 20, |part, at| {
            self.fill(key, part, at);
            Ok::<(), ()>(())
        })
        .expect("random weights cannot fail");
        Ok(TensorData::from_bytes_vec(
            bytes,
            expected.to_vec(),
            self.format.dtype(),
        ))
    }

    fn contains(&self, _: WeightKey) -> bool {
        false
    }

    fn direct(&self, key: WeightKey, expected: &[usize]) -> Option<DirectWeight<'_>> {
        Some(DirectWeight {
            dtype: self.format.dtype(),
            shape: expected.to_vec(),
            fill: Box::new(move |part, at| {
                self.fill(key, part, at);
                Ok(())
            }),
        })
    }
}

/// A DMS model (fresh decision parameters) over random weights of `cfg`, on the device.
pub(super) fn random_model<B: AttentionBackend>(
    cfg: &ModelConfig,
    format: FloatFormat,
    dms: &DmsConfig,
    device: &B::Device,
) -> Result<DmsModel<B>> {
    let started = Instant::now();
    let mut source = RandomWeights { format };
    let base = Decoder::<B>::load(cfg, &mut source, device)?;
    let model = DmsModel::new(base, dms, None, device)?;
    B::sync(device)?;
    tracing::info!(
        "random weights on the device in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(model)
}

fn step_bench<B: TrainBackend>(
    args: &StepArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<StepReport> {
    let cfg = shape(&args.shape)?;
    check_graph_layers(args.graph_layers, cfg.num_layers, "--graph-layers")?;
    let dms = DmsConfig {
        window: args.window,
        ..DmsConfig::default()
    };
    let recompute_mlp = !args.keep_mlp_activations && !args.recompute_layers;
    let (mut model, weights_s) = step_model::<B>(&cfg, &dms, recompute_mlp, format, device)?;
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(0.9)
        .with_beta_2(0.95)
        .with_weight_decay(0.0)
        .init::<B, DmsModel<B>>();
    let vocab = cfg.vocab_size as i64;
    let ids: Vec<i64> = (0..args.seq as i64)
        .map(|i| (i * 7919 + 11) % vocab)
        .collect();
    let sequence = Sequence {
        input_ids: ids,
        attention_mask: vec![1; args.seq],
    };
    let setup = StepSetup {
        cfg: &cfg,
        target: 1.0 - 1.0 / 8.0,
        compression_weight: 1.0,
        compression_loss: Default::default(),
        eos: 151645,
        kl_chunk: args.kl_chunk,
        loss_scale: 1.0,
        recompute_layers: args.recompute_layers,
        graph_layers: args.graph_layers,
    };
    let mut times = Vec::new();
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut handoffs: Option<HandoffsPerStep> = None;
    let (mut losses, mut grad_norms) = (Vec::new(), Vec::new());
    let mut profile = Profile::default();
    let profiled = if args.profile { 2 } else { 0 };
    for step in 0..=args.steps + profiled {
        let profiling = step > args.steps;
        let _ = take_handoffs();
        if profiling {
            B::sync(device)?;
            profile.sample(STEP_START, device);
        }
        let start = Instant::now();
        let mut mark = start;
        let mut lap = |name: &'static str| {
            if profiling {
                let _ = B::sync(device);
                profile.lap(name, &mut mark, device);
            }
        };
        let batch = make_batch::<B>(&[&sequence], device);
        let noise = NoiseKey {
            seed: 0,
            step: step as u64,
            micro_batch: 0,
            rank: 0,
        };
        let (mut grads, stats) =
            distillation_micro_step(&model, None, &batch, noise, &setup, &mut |phase| {
                lap(match phase {
                    StepPhase::Teacher => "1 teacher forward",
                    StepPhase::Student => "2 student forward",
                    StepPhase::Loss => "3 KL + hinge",
                    StepPhase::Backward => "4 backward",
                })
            });
        // As training does: the update is queued before the scalars are read back.
        let grad_norm = clip_global_norm(&mut model, &mut grads, 1.0);
        model = optimizer.step(3e-5, model, grads);
        let stats = stats.read();
        losses.push(stats.loss);
        grad_norms.push(read_scalar(grad_norm));
        lap("5 clip + AdamW");
        B::sync(device)?;
        crate::backend::check_device_work()?;
        let seconds = start.elapsed().as_secs_f64();
        tracing::info!("step {step}: {seconds:.3} s, loss {:.4}", stats.loss);
        if !profiling {
            times.push(seconds);
            #[cfg(feature = "cuda")]
            if let (Some(h), true) = (take_handoffs(), step > 0) {
                let total = handoffs.get_or_insert_with(HandoffsPerStep::default);
                let n = args.steps as f64;
                total.calls += h.calls as f64 / n;
                total.host_s += h.host_s / n;
                total.device_thread_s += h.device_thread_s / n;
            }
        }
    }
    let first = times[0];
    // The median of the steps after the first (which compiles and tunes), else the first.
    let step_s = match times.len() {
        1 => first,
        _ => median(times[1..].to_vec()),
    };
    let phases_s = args.profile.then(|| {
        std::mem::take(&mut profile.phase_times)
            .into_iter()
            .map(|(name, t)| (name, median(t)))
            .collect()
    });
    Ok(StepReport {
        shape: args.shape.clone(),
        seq: args.seq,
        device: args.device.clone(),
        dtype: format.torch_name().into(),
        parameters: cfg.parameter_count(),
        checkpointing: args.checkpointing.clone(),
        recompute_layers: args.recompute_layers,
        graph_layers: args.graph_layers,
        recompute_mlp,
        weights_s,
        weights_gb_per_s: cfg.parameter_count() as f64 * format.bytes() as f64 / weights_s / 1e9,
        first_step_s: first,
        step_s,
        tokens_per_s: args.seq as f64 / step_s,
        phases_s,
        pool_gib: profile.pool_gib(),
        cuda_handoffs_per_step: handoffs,
        losses,
        grad_norms,
    })
}

/// The adapter-only DMS model `bench step` trains, on random weights, and the seconds it took to
/// generate them and place them on the device.
fn step_model<B: TrainBackend>(
    cfg: &ModelConfig,
    dms: &DmsConfig,
    recompute_mlp: bool,
    format: FloatFormat,
    device: &B::Device,
) -> Result<(DmsModel<B>, f64)> {
    let started = Instant::now();
    let model = random_model::<B>(cfg, format, dms, device)?;
    let mut model = apply_trainable(model, Trainable::Adapter);
    model.base.recompute_mlp(recompute_mlp);
    B::sync(device)?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!("DMS model ready after {seconds:.1} s");
    Ok((model, seconds))
}

/// The upper median (the value at index `len / 2` once sorted).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[derive(Serialize, Default)]
struct HandoffsPerStep {
    calls: f64,
    /// Host (calling) thread time in hand-offs.
    host_s: f64,
    /// Time our enqueued work took on cubecl's device thread.
    device_thread_s: f64,
}

/// Resets the CUDA hand-off statistics and returns what was gathered since the last call.
#[cfg(feature = "cuda")]
fn take_handoffs() -> Option<crate::ops::cuda::HandoffStats> {
    Some(crate::ops::cuda::take_handoff_stats())
}

#[cfg(not(feature = "cuda"))]
fn take_handoffs() -> Option<()> {
    None
}

/// A size flag that must be at least 1 (zero-sized tensors panic inside burn's kernels).
pub(super) fn require_positive(flag: &str, value: usize) -> Result<()> {
    if value == 0 {
        bail!("{flag} must be at least 1");
    }
    Ok(())
}

pub fn run(command: BenchCommand) -> Result<()> {
    let args = match command {
        BenchCommand::Step(args) => args,
        BenchCommand::Linear(args) => return super::bench_ops::run(args),
        BenchCommand::Attention(args) => return super::bench_ops::run_attention(args),
        BenchCommand::Elementwise(args) => return super::bench_ops::run_elementwise(args),
        BenchCommand::Eval(args) => return super::bench_infer::run_eval(args),
        BenchCommand::Decode(args) => return super::bench_infer::run_decode(args),
        BenchCommand::Load(args) => return super::bench_load::run(args),
    };
    require_positive("--seq", args.seq)?;
    let spec: DeviceSpec = args.device.parse()?;
    spec.ensure_available()?;
    let report = match spec {
        DeviceSpec::Cpu => {
            use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
            let device = Default::default();
            match args.checkpointing.as_str() {
                "balanced" => step_bench::<burn::backend::Autodiff<Cpu, BalancedCheckpointing>>(
                    &args,
                    FloatFormat::F32,
                    &device,
                )?,
                _ => step_bench::<CpuAutodiff>(&args, FloatFormat::F32, &device)?,
            }
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            let device = burn::backend::cuda::CudaDevice::new(index);
            crate::backend::init_cuda(&device, FloatFormat::Bf16)?;
            use burn::backend::Autodiff;
            use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
            type Cuda = crate::backend::Cuda;
            match args.checkpointing.as_str() {
                "balanced" => step_bench::<Autodiff<Cuda, BalancedCheckpointing>>(
                    &args,
                    FloatFormat::Bf16,
                    &device,
                )?,
                _ => step_bench::<Autodiff<Cuda>>(&args, FloatFormat::Bf16, &device)?,
            }
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("ensure_available fails without the cuda feature"),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bf16 path (four values per hash, 8 bytes at a time) writes what the per-value path
    /// writes, from any starting value and for any length.
    #[test]
    fn bf16_random_weights_equal_the_per_value_path() {
        let source = RandomWeights {
            format: FloatFormat::Bf16,
        };
        let key = WeightKey::Linear {
            layer: 1,
            projection: crate::model::Projection::Up,
            bias: false,
        };
        let seed = key.param_id().val();
        for first in 0..6u64 {
            for len in [0usize, 1, 3, 4, 5, 9, 64, 67] {
                let mut fast = vec![0u8; 2 * len];
                source.fill(key, &mut fast, 2 * first as usize);
                let slow: Vec<u8> = (first..first + len as u64)
                    .flat_map(|index| {
                        let v = random_value(split_mix(seed, index / 4), index % 4);
                        ((v.to_bits() >> 16) as u16).to_le_bytes()
                    })
                    .collect();
                assert_eq!(fast, slow, "from value {first}, {len} values");
            }
        }
    }

    /// A random tensor made in parts on several threads (as for direct uploads) equals the one
    /// `load` makes; values are uniform in [-0.03, 0.03), differ between tensors, norms are 1.
    #[test]
    fn random_weights_are_the_same_in_any_parts() {
        let mut source = RandomWeights {
            format: FloatFormat::Bf16,
        };
        let key = |layer| WeightKey::Linear {
            layer,
            projection: crate::model::Projection::Down,
            bias: false,
        };
        let shape = [300, 1000];
        let loaded = source.load(key(3), &shape).unwrap();
        let direct = source.direct(key(3), &shape).unwrap();
        let mut parts = vec![0u8; direct.len()];
        crate::parallel::fill_parts(&mut parts, 2, 4 << 10, &direct.fill).unwrap();
        assert_eq!(loaded.as_bytes(), parts.as_slice());
        drop(direct);
        let values = loaded.to_vec::<half::bf16>().unwrap();
        assert!(values.iter().all(|v| v.to_f32().abs() <= 0.03));
        let mean = values.iter().map(|v| v.to_f32()).sum::<f32>() / values.len() as f32;
        let spread = values.iter().map(|v| v.to_f32().abs()).sum::<f32>() / values.len() as f32;
        assert!(
            mean.abs() < 1e-3 && (spread - 0.015).abs() < 1e-3,
            "{mean} {spread}"
        );
        assert_ne!(
            source.load(key(4), &shape).unwrap().as_bytes(),
            loaded.as_bytes()
        );
        let norm = source.load(WeightKey::FinalNorm, &[8]).unwrap();
        assert!(
            norm.to_vec::<half::bf16>()
                .unwrap()
                .iter()
                .all(|v| v.to_f32() == 1.0)
        );
    }
}
