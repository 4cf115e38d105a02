//! `dms-retrofit bench eval` and `bench decode`: inference throughput and KV memory on random
//! weights of a named model shape, dense beside DMS at target compression ratios.
//!
//! Random weights make no DMS decisions of their own worth having, so the benchmark uses the
//! borrowed-neuron variant (the decision is one query channel, which random weights make vary per
//! token and head) and sets the decision offset from a calibration pass so that the share of
//! evicted keys gives the target CR at the measured length (window counted). The CR it reaches is
//! measured and printed; speed and memory follow from it, quality means nothing here.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::{Int, Tensor, TensorData};
use clap::Args;
use serde::Serialize;

use super::bench::{random_model, require_positive, shape};
use super::{ComputeArgs, on_backend};
use crate::data::Sequence;
use crate::dms::{DmsConfig, DmsModel, Mode, Variant};
use crate::eval::Decoding;
use crate::eval::generation::checked_tokens;
use crate::eval::quality::{Batch, dms_hidden, original_hidden, score_hidden};
use crate::model::FloatFormat;
use crate::ops::attention::AttentionBackend;

#[derive(Args, Debug)]
pub struct EvalBenchArgs {
    /// qwen3-0.6b, qwen3-1.7b, qwen3-8b, llama3-8b, smollm2-135m
    #[arg(long, default_value = "qwen3-1.7b")]
    pub shape: String,
    /// Sequence lengths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    pub seq: Vec<usize>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Target compression ratio of the DMS rows.
    #[arg(long, default_value_t = 8.0)]
    pub cr: f64,
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Timed repetitions per length (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub repeats: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Args, Debug)]
pub struct DecodeBenchArgs {
    #[arg(long, default_value = "qwen3-1.7b")]
    pub shape: String,
    /// Context lengths (prompt tokens before the timed decode), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096")]
    pub context: Vec<usize>,
    /// Batch sizes, comma-separated (every sequence holds the same prompt's cache).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub batch: Vec<usize>,
    /// Target compression ratios, comma-separated; 1 = dense (no eviction).
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub cr: Vec<f64>,
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    /// Timed decode steps (after 2 warm-up steps).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Serialize)]
struct EvalRow {
    bench: &'static str,
    shape: String,
    dtype: &'static str,
    seq: usize,
    batch: usize,
    /// Original model: forward + perplexity.
    dense_tokens_per_s: f64,
    /// DMS under the inference mask: forward + perplexity + KL against the original's logits
    /// (the original's forward not included).
    dms_tokens_per_s: f64,
    /// Both, as `eval` measures a DMS model without baselines.
    eval_tokens_per_s: f64,
    target_cr: f64,
    measured_cr: f64,
}

#[derive(Serialize)]
struct DecodeRow {
    bench: &'static str,
    shape: String,
    dtype: &'static str,
    context: usize,
    batch: usize,
    /// `dense` or `dms`.
    cache: &'static str,
    target_cr: f64,
    measured_cr: f64,
    /// Generated tokens of the whole batch per second.
    tokens_per_s: f64,
    ms_per_step: f64,
    kv_allocated_bytes: u64,
    kv_live_bytes: u64,
    /// DMS (paged): one layer's gathered keys and values, alive while it attends.
    kv_transient_bytes: u64,
    kv_dense_bytes: u64,
}

/// Token ids of a benchmark sequence (deterministic, spread over the vocabulary).
fn bench_ids(len: usize, vocab: usize, salt: usize) -> Vec<i64> {
    (0..len)
        .map(|i| ((i * 7919 + salt * 104_729 + 11) % vocab) as i64)
        .collect()
}

/// The decision offset at which `len`-token sequences keep about `1 / cr` of their keys (the
/// newest `window` always stay), from the decision logits of one calibration sequence.
fn calibrate_offset<B: AttentionBackend>(model: &DmsModel<B>, len: usize, cr: f64) -> f64 {
    let (cfg, dms) = (&model.base.config, &model.dms);
    let device = model.base.embed_tokens.val().device();
    let sample = 1024.min(len).max(2);
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(bench_ids(sample, cfg.vocab_size, 7), [1, sample]),
        &device,
    );
    let out = model.forward(ids, &Mode::Inference);
    let mut logits: Vec<f32> = out
        .layers
        .into_iter()
        .flat_map(|l| {
            // Unshifted: the model's logits are `alpha_scale * raw - offset`.
            (l.logits + dms.offset)
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 logits")
        })
        .collect();
    logits.sort_by(f32::total_cmp);
    // Retained share = window / len + (1 - window / len) * kept share.
    let w = (dms.window as f64 / len as f64).min(1.0);
    let kept = ((1.0 / cr - w) / (1.0 - w).max(1e-9)).clamp(0.0, 1.0);
    // Evict when logit - offset > 0: the offset is the logit below which `kept` of them lie.
    let index = ((kept * logits.len() as f64) as usize).min(logits.len() - 1);
    match kept {
        k if k <= 0.0 => logits[0] as f64 - 1.0,
        k if k >= 1.0 => logits[logits.len() - 1] as f64 + 1.0,
        _ => logits[index] as f64,
    }
}

fn bench_dms(window: usize) -> DmsConfig {
    DmsConfig {
        variant: Variant::QNeuron,
        window,
        ..DmsConfig::default()
    }
}

pub fn run_eval(args: EvalBenchArgs) -> Result<()> {
    require_positive("--batch", args.batch)?;
    require_positive("--repeats", args.repeats)?;
    if args.seq.iter().any(|&s| s < 2) {
        bail!("--seq values must be >= 2");
    }
    if args.cr.is_nan() || args.cr < 1.0 {
        bail!("--cr {} must be >= 1", args.cr);
    }
    let (spec, format) = args.compute.resolve()?;
    on_backend!(spec, format, eval_bench(&args, format))
}

fn eval_bench<B: AttentionBackend>(
    args: &EvalBenchArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<()> {
    let cfg = shape(&args.shape)?;
    let mut model = random_model::<B>(&cfg, format, &bench_dms(args.window), device)?;
    let eos = [u32::MAX];
    for &seq in &args.seq {
        model.dms.offset = calibrate_offset(&model, seq, args.cr);
        let sequences: Vec<Sequence> = (0..args.batch)
            .map(|s| Sequence {
                input_ids: bench_ids(seq, cfg.vocab_size, s),
                attention_mask: vec![1; seq],
            })
            .collect();
        let batch = Batch::<B>::new(&sequences, device);
        let (mut dense_s, mut dms_s) = (Vec::new(), Vec::new());
        let mut retained = 0.0;
        for repeat in 0..=args.repeats {
            let start = Instant::now();
            let teacher = original_hidden(&model, &batch);
            score_hidden(&model, &batch, teacher.clone(), None, &eos);
            B::sync(device)?;
            let dense = start.elapsed().as_secs_f64();
            let start = Instant::now();
            let (hidden, kept) = dms_hidden(&model, &batch);
            score_hidden(&model, &batch, hidden, Some(&teacher), &eos);
            B::sync(device)?;
            let with_dms = start.elapsed().as_secs_f64();
            crate::backend::check_device_work()?;
            tracing::info!(seq, repeat, dense, with_dms, "eval forward seconds");
            if repeat > 0 {
                dense_s.push(dense);
                dms_s.push(with_dms);
            }
            let heads = kept.iter().flatten().count() as f64 * args.batch as f64;
            retained = kept.iter().flatten().sum::<f64>() / heads;
        }
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (dense, with_dms) = (median(dense_s), median(dms_s));
        let tokens = (seq * args.batch) as f64;
        let row = EvalRow {
            bench: "eval",
            shape: args.shape.clone(),
            dtype: format.torch_name(),
            seq,
            batch: args.batch,
            dense_tokens_per_s: tokens / dense,
            dms_tokens_per_s: tokens / with_dms,
            eval_tokens_per_s: tokens / (dense + with_dms),
            target_cr: args.cr,
            measured_cr: 1.0 / retained.max(f64::MIN_POSITIVE),
        };
        println!("{}", serde_json::to_string(&row)?);
    }
    Ok(())
}

pub fn run_decode(args: DecodeBenchArgs) -> Result<()> {
    require_positive("--tokens", args.tokens)?;
    if args.batch.contains(&0) || args.context.iter().any(|&c| c < 2) {
        bail!("--batch values must be >= 1 and --context values >= 2");
    }
    if args.cr.iter().any(|&c| c.is_nan() || c < 1.0) {
        bail!("--cr values must be >= 1 (1 = dense)");
    }
    let (spec, format) = args.compute.resolve()?;
    on_backend!(spec, format, decode_bench(&args, format))
}

fn decode_bench<B: AttentionBackend>(
    args: &DecodeBenchArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<()> {
    let cfg = shape(&args.shape)?;
    let mut model = random_model::<B>(&cfg, format, &bench_dms(args.window), device)?;
    for &context in &args.context {
        let prompt: Vec<u32> = bench_ids(context, cfg.vocab_size, 0)
            .into_iter()
            .map(|i| i as u32)
            .collect();
        for &cr in &args.cr {
            let dense = cr <= 1.0;
            if !dense {
                model.dms.offset = calibrate_offset(&model, context, cr);
            }
            let decoding = Decoding::new(&model, !dense);
            // One real prefill; larger batches repeat its cache (same sizes, same work).
            let mut single = decoding.slot_cache(1);
            if dense {
                single.reserve(
                    context + args.tokens + 2,
                    model.base.embed_tokens.val().dtype(),
                );
            }
            let started = Instant::now();
            let logits = decoding.prefill_slots(&prompt, 0, &mut single);
            let first = logits
                .argmax(0)
                .into_data()
                .convert::<i64>()
                .into_vec::<i64>();
            let first = first.map_err(|e| anyhow::anyhow!("{e:?}"))?;
            let first = checked_tokens(&first, cfg.vocab_size, 0)?[0];
            tracing::info!(
                context,
                cr,
                "prefill in {:.2} s",
                started.elapsed().as_secs_f64()
            );
            for &batch in &args.batch {
                let mut cache = single.repeat(batch);
                let mut tokens = vec![first; batch];
                let mut times = Vec::new();
                for step in 0..args.tokens + 2 {
                    let start = Instant::now();
                    let logits = decoding.step_slots(&tokens, &mut cache);
                    let next = logits
                        .argmax(1)
                        .into_data()
                        .convert::<i64>()
                        .into_vec::<i64>();
                    let next = next.map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    tokens = checked_tokens(&next, cfg.vocab_size, step + 1)?;
                    if step >= 2 {
                        times.push(start.elapsed().as_secs_f64());
                    }
                }
                let seconds: f64 = times.iter().sum();
                let memory = cache.memory(format.bytes());
                let row = DecodeRow {
                    bench: "decode",
                    shape: args.shape.clone(),
                    dtype: format.torch_name(),
                    context,
                    batch,
                    cache: if dense { "dense" } else { "dms" },
                    target_cr: cr,
                    measured_cr: memory.compression_ratio,
                    tokens_per_s: (batch * times.len()) as f64 / seconds,
                    ms_per_step: seconds * 1e3 / times.len() as f64,
                    kv_allocated_bytes: memory.allocated_bytes,
                    kv_live_bytes: memory.live_bytes,
                    kv_transient_bytes: memory.transient_bytes,
                    kv_dense_bytes: memory.dense_bytes,
                };
                crate::backend::check_device_work()?;
                println!("{}", serde_json::to_string(&row)?);
            }
        }
    }
    Ok(())
}
