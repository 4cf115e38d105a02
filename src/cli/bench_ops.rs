//! Benchmarks of single operations, each the backend's own path beside burn's generic one on the
//! same tensors; the difference between the two is also the correctness check on the GPU.
//! - `bench linear`: the linear layers' three GEMMs (forward, input gradient, weight gradient) at
//!   a model shape's projection sizes (cuBLASLt on CUDA).
//! - `bench attention`: the DMS attention forward (fused on CUDA) against the chunked tensor ops.
//! - `bench elementwise`: RMSNorm, SwiGLU, RoPE and the distillation KL, forward and backward (one
//!   kernel each on CUDA) against burn's tensor-op formulas.
//!
//! Each prints a table, then one JSON line per row.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Distribution, Tensor, backend::Backend};
use clap::Args;
use serde::Serialize;

use super::bench::require_positive;
use super::on_backend;
use crate::backend::DeviceSpec;
use crate::model::FloatFormat;
use crate::model::ModelConfig;
use crate::ops::attention::{
    AttentionBackend, AttentionInputs, AttentionOptions, attention_backward, attention_forward,
};
use crate::ops::elementwise::{self, ElementwiseBackend};
use crate::ops::linear::{LinearBackend, burn_ops};

#[derive(Args, Debug)]
pub struct LinearArgs {
    /// Model shape whose projections are measured (see `bench step --shape`).
    #[arg(long, default_value = "qwen3-8b")]
    pub shape: String,
    /// Rows (tokens) of the activations.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Timed calls per GEMM (run back to back; the mean is reported), after one warm-up call.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Time only the backend's path: burn's side autotunes every new matmul shape on a cold
    /// GPU (minutes), and is only needed for the comparison.
    #[arg(long)]
    pub ours_only: bool,
}

#[derive(Serialize)]
struct Row {
    layer: &'static str,
    gemm: &'static str,
    m: usize,
    n: usize,
    k: usize,
    ours_ms: f64,
    burn_ms: f64,
    ours_tflops: f64,
    burn_tflops: f64,
    /// max |ours - burn| / max |burn|
    max_rel_diff: f64,
}

pub fn run(args: LinearArgs) -> Result<()> {
    require_positive("--tokens", args.tokens)?;
    let spec: DeviceSpec = args.device.parse()?;
    spec.ensure_available()?;
    let rows = on_backend!(spec, FloatFormat::Bf16, measure(&args))?;
    let dtype = spec.default_format();
    println!(
        "{} on {}, {} tokens, {}:",
        args.shape,
        args.device,
        args.tokens,
        dtype.torch_name()
    );
    println!(
        "{:<8} {:<12} {:>6} {:>6} {:>6} {:>9} {:>9} {:>8} {:>8} {:>7} {:>9}",
        "layer",
        "gemm",
        "M",
        "N",
        "K",
        "ours ms",
        "burn ms",
        "ours TF",
        "burn TF",
        "speedup",
        "rel diff"
    );
    for r in &rows {
        println!(
            "{:<8} {:<12} {:>6} {:>6} {:>6} {:>9.3} {:>9.3} {:>8.1} {:>8.1} {:>6.2}x {:>9.2e}",
            r.layer,
            r.gemm,
            r.m,
            r.n,
            r.k,
            r.ours_ms,
            r.burn_ms,
            r.ours_tflops,
            r.burn_tflops,
            r.burn_ms / r.ours_ms,
            r.max_rel_diff
        );
    }
    let (ours, burn): (f64, f64) = rows
        .iter()
        .map(|r| (r.ours_ms, r.burn_ms))
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    println!(
        "all rows: ours {ours:.2} ms, burn {burn:.2} ms ({:.2}x)",
        burn / ours
    );
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

fn measure<B: LinearBackend>(args: &LinearArgs, device: &B::Device) -> Result<Vec<Row>> {
    let cfg = super::bench::shape(&args.shape)?;
    let (h, q, kv) = (
        cfg.hidden_size,
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
    );
    let layers: [(&'static str, usize, usize); 6] = [
        ("q", h, q),
        ("k/v", h, kv),
        ("o", q, h),
        ("gate/up", h, cfg.intermediate_size),
        ("down", cfg.intermediate_size, h),
        ("lm_head", h, cfg.vocab_size),
    ];
    let m = args.tokens;
    let mut rows = Vec::new();
    for (layer, k, n) in layers {
        let x = Tensor::<B, 3>::random([1, m, k], Distribution::Normal(0.0, 1.0), device);
        let w = Tensor::<B, 2>::random([n, k], Distribution::Normal(0.0, 0.02), device);
        let dy = Tensor::<B, 3>::random([1, m, n], Distribution::Normal(0.0, 1.0), device);
        let forward = compare(
            args,
            device,
            || B::linear_hf(x.clone(), w.clone(), None),
            || burn_ops::linear(x.clone(), w.clone(), None),
        );
        let input_grad = compare(
            args,
            device,
            || B::linear_hf_input_grad(dy.clone(), w.clone()),
            || burn_ops::input_grad(dy.clone(), w.clone()),
        );
        let weight_grad = compare(
            args,
            device,
            || B::linear_hf_weight_grad(dy.clone(), x.clone()),
            || burn_ops::weight_grad(dy.clone(), x.clone()),
        );
        let flops = 2.0 * (m * n * k) as f64;
        for (gemm, (ours_s, burn_s, diff)) in [
            ("forward", forward?),
            ("input grad", input_grad?),
            ("weight grad", weight_grad?),
        ] {
            rows.push(Row {
                layer,
                gemm,
                m,
                n,
                k,
                ours_ms: ours_s * 1e3,
                burn_ms: burn_s * 1e3,
                ours_tflops: flops / ours_s / 1e12,
                burn_tflops: flops / burn_s / 1e12,
                max_rel_diff: diff,
            });
        }
    }
    Ok(rows)
}

/// Median seconds of each path (synchronised), and their largest difference relative to the
/// largest magnitude of burn's result (NaN for burn's side with `--ours-only`).
fn compare<B: LinearBackend, const D: usize>(
    args: &LinearArgs,
    device: &B::Device,
    ours: impl Fn() -> Tensor<B, D>,
    burn: impl Fn() -> Tensor<B, D>,
) -> Result<(f64, f64, f64)> {
    let (ours_s, ours_out) = timed::<B, _>(args.repeats, device, &ours)?;
    if args.ours_only {
        return Ok((ours_s, f64::NAN, f64::NAN));
    }
    let (burn_s, burn_out) = timed::<B, _>(args.repeats, device, &burn)?;
    let diff = max_rel_diff(&f32_values(ours_out)?, &f32_values(burn_out)?);
    Ok((ours_s, burn_s, diff))
}

/// A tensor's values as f32 on the host.
pub(super) fn f32_values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("cannot read a tensor back: {e:?}"))
}

fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
}

/// max |got - want| / max |want|
fn max_rel_diff(got: &[f32], want: &[f32]) -> f64 {
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    (max_abs_diff(got, want) / scale) as f64
}

#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Model shape whose heads are used (see `bench step --shape`).
    #[arg(long, default_value = "qwen3-8b")]
    pub shape: String,
    /// Sequence lengths (comma-separated).
    #[arg(long, default_value = "4096", value_delimiter = ',')]
    pub seq: Vec<usize>,
    /// DMS window (the key bias applies to keys further back than this).
    #[arg(long, default_value_t = 512)]
    pub window: usize,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Serialize)]
struct AttentionRow {
    seq: usize,
    ours_ms: f64,
    burn_ms: f64,
    /// max |ours - burn| / max |burn| of the output
    output_rel_diff: f64,
    /// max |ours - burn| of the log-sum-exp
    lse_max_diff: f64,
    backward_ours_ms: f64,
    backward_burn_ms: f64,
    /// max |ours - burn| / max |burn| of each gradient: q, k, v, key bias
    grad_rel_diffs: [f64; 4],
}

pub fn run_attention(args: AttentionArgs) -> Result<()> {
    for &seq in &args.seq {
        require_positive("--seq", seq)?;
    }
    let spec: DeviceSpec = args.device.parse()?;
    spec.ensure_available()?;
    let rows = on_backend!(spec, FloatFormat::Bf16, measure_attention(&args))?;
    println!(
        "attention forward, {} heads, window {}, with key bias, on {}:",
        args.shape, args.window, args.device
    );
    println!(
        "{:>7} {:>10} {:>10} {:>12} {:>10} {:>10} {:>10}   grad rel diff q / k / v / bias",
        "seq", "fwd ours", "fwd burn", "out rel diff", "lse diff", "bwd ours", "bwd burn",
    );
    for r in &rows {
        let [dq, dk, dv, db] = r.grad_rel_diffs;
        println!(
            "{:>7} {:>8.2}ms {:>8.2}ms {:>12.2e} {:>10.2e} {:>8.2}ms {:>8.2}ms   {:.1e} / {:.1e} / {:.1e} / {:.1e}",
            r.seq,
            r.ours_ms,
            r.burn_ms,
            r.output_rel_diff,
            r.lse_max_diff,
            r.backward_ours_ms,
            r.backward_burn_ms,
            dq,
            dk,
            dv,
            db
        );
    }
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

fn measure_attention<B: AttentionBackend>(
    args: &AttentionArgs,
    device: &B::Device,
) -> Result<Vec<AttentionRow>> {
    let cfg = super::bench::shape(&args.shape)?;
    let (heads, kv_heads, dim) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    let mut rows = Vec::new();
    for &seq in &args.seq {
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<B, 4>::random([1, heads, seq, dim], normal, device);
        let k = Tensor::<B, 4>::random([1, kv_heads, seq, dim], normal, device);
        let v = Tensor::<B, 4>::random([1, kv_heads, seq, dim], normal, device);
        // log(1 - p) of decisions spread over (0, 1).
        let bias =
            Tensor::<B, 3>::random([1, kv_heads, seq], Distribution::Uniform(-6.0, 0.0), device);
        let mut options = AttentionOptions::causal(0);
        options.window = args.window;
        let ours = || {
            B::attention_forward_with_lse(
                q.clone(),
                k.clone(),
                v.clone(),
                Some(bias.clone()),
                options,
            )
        };
        let burn =
            || attention_forward(q.clone(), k.clone(), v.clone(), Some(bias.clone()), options);
        let (ours_s, ours_out) = timed::<B, _>(args.repeats, device, &ours)?;
        let (burn_s, burn_out) = timed::<B, _>(args.repeats, device, &burn)?;
        let rel = |got: Tensor<B, 4>, want: Tensor<B, 4>| -> Result<f64> {
            Ok(max_rel_diff(&f32_values(got)?, &f32_values(want)?))
        };
        let out_diff = rel(ours_out.output, burn_out.output.clone())?;
        let lse_diff = max_abs_diff(
            &f32_values(ours_out.lse)?,
            &f32_values(burn_out.lse.clone())?,
        );
        // Both backwards from the same (chunked tensor-op) forward and output gradient.
        let grad_out = Tensor::<B, 4>::random([1, heads, seq, dim], normal, device);
        let backward = |ours: bool| {
            let inputs = AttentionInputs {
                q: q.clone(),
                k: k.clone(),
                v: v.clone(),
                key_bias: Some(bias.clone()),
            };
            if ours {
                B::attention_backward_with_lse(inputs, &burn_out, grad_out.clone(), true, options)
            } else {
                attention_backward(inputs, &burn_out, grad_out.clone(), true, options)
            }
        };
        let (bwd_ours_s, grads_ours) = timed::<B, _>(args.repeats, device, &|| backward(true))?;
        let (bwd_burn_s, grads_burn) = timed::<B, _>(args.repeats, device, &|| backward(false))?;
        let bias_values = |t: Option<Tensor<B, 3>>| t.map_or_else(|| Ok(Vec::new()), f32_values);
        let grad_rel_diffs = [
            rel(grads_ours.q, grads_burn.q)?,
            rel(grads_ours.k, grads_burn.k)?,
            rel(grads_ours.v, grads_burn.v)?,
            max_rel_diff(
                &bias_values(grads_ours.key_bias)?,
                &bias_values(grads_burn.key_bias)?,
            ),
        ];
        rows.push(AttentionRow {
            seq,
            ours_ms: ours_s * 1e3,
            burn_ms: burn_s * 1e3,
            output_rel_diff: out_diff,
            lse_max_diff: lse_diff as f64,
            backward_ours_ms: bwd_ours_s * 1e3,
            backward_burn_ms: bwd_burn_s * 1e3,
            grad_rel_diffs,
        });
    }
    Ok(rows)
}

/// Mean seconds per call of `f` over `repeats` calls run back to back after one warm-up call,
/// and the warm-up's result.
fn timed<B: burn::tensor::backend::Backend, T>(
    repeats: usize,
    device: &B::Device,
    f: &dyn Fn() -> T,
) -> Result<(f64, T)> {
    let out = f();
    B::sync(device)?;
    crate::backend::check_device_work()?;
    // Back to back, one wait at the end: the host runs ahead of the GPU as in a training step,
    // so the figure is GPU time per call (a wait after each call added the device thread's
    // hand-off and the wake-up to every call: up to ~0.2 ms on 0.2 ms GEMMs).
    let start = Instant::now();
    for _ in 0..repeats.max(1) {
        drop(f());
    }
    B::sync(device)?;
    let seconds = start.elapsed().as_secs_f64() / repeats.max(1) as f64;
    // After a failure later calls would time burn's ops: no figure then.
    crate::backend::check_device_work()?;
    Ok((seconds, out))
}

#[derive(Args, Debug)]
pub struct ElementwiseArgs {
    /// Model shape whose sizes are used (see `bench step --shape`).
    #[arg(long, default_value = "qwen3-8b")]
    pub shape: String,
    /// Rows (tokens) of the activations.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Tokens per chunk of the distillation KL's logits (`train.kl_chunk`).
    #[arg(long, default_value_t = 1024)]
    pub kl_chunk: usize,
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Serialize)]
struct ElementwiseRow {
    op: &'static str,
    shape: Vec<usize>,
    ours_ms: f64,
    burn_ms: f64,
    /// max |ours - burn| / max |burn| over the outputs
    max_rel_diff: f64,
}

pub fn run_elementwise(args: ElementwiseArgs) -> Result<()> {
    require_positive("--tokens", args.tokens)?;
    require_positive("--kl-chunk", args.kl_chunk)?;
    let spec: DeviceSpec = args.device.parse()?;
    spec.ensure_available()?;
    let rows = on_backend!(spec, FloatFormat::Bf16, measure_elementwise(&args))?;
    println!(
        "RMSNorm / SwiGLU / RoPE / KL, {} sizes, {} tokens, on {}:",
        args.shape, args.tokens, args.device
    );
    println!(
        "{:<22} {:<22} {:>9} {:>9} {:>8} {:>9}",
        "op", "shape", "ours ms", "burn ms", "speedup", "rel diff"
    );
    for r in &rows {
        println!(
            "{:<22} {:<22} {:>9.3} {:>9.3} {:>7.2}x {:>9.2e}",
            r.op,
            format!("{:?}", r.shape),
            r.ours_ms,
            r.burn_ms,
            r.burn_ms / r.ours_ms,
            r.max_rel_diff
        );
    }
    for r in &rows {
        println!("{}", serde_json::to_string(r)?);
    }
    Ok(())
}

fn measure_elementwise<B: ElementwiseBackend>(
    args: &ElementwiseArgs,
    device: &B::Device,
) -> Result<Vec<ElementwiseRow>> {
    let cfg = super::bench::shape(&args.shape)?;
    let mut rows = Rows::<B> {
        args,
        device,
        rows: Vec::new(),
    };
    norm_rows(&mut rows, &cfg)?;
    swiglu_rows(&mut rows, &cfg)?;
    rope_rows(&mut rows, &cfg)?;
    kl_rows(&mut rows, &cfg)?;
    Ok(rows.rows)
}

/// The measured rows of `bench elementwise`: each op timed on our backend path and burn's, with
/// the largest relative difference of their results.
struct Rows<'a, B: ElementwiseBackend> {
    args: &'a ElementwiseArgs,
    device: &'a B::Device,
    rows: Vec<ElementwiseRow>,
}

impl<B: ElementwiseBackend> Rows<'_, B> {
    fn random(&self, shape: Vec<usize>) -> Tensor<B, 3> {
        Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), self.device)
    }

    fn measure(
        &mut self,
        op: &'static str,
        shape: Vec<usize>,
        ours: &dyn Fn() -> Vec<Tensor<B, 3>>,
        burn: &dyn Fn() -> Vec<Tensor<B, 3>>,
    ) -> Result<()> {
        let (ours_s, got) = timed::<B, _>(self.args.repeats, self.device, ours)?;
        let (burn_s, want) = timed::<B, _>(self.args.repeats, self.device, burn)?;
        let mut diff = 0f64;
        for (g, w) in got.into_iter().zip(want) {
            diff = diff.max(max_rel_diff(&f32_values(g)?, &f32_values(w)?));
        }
        self.rows.push(ElementwiseRow {
            op,
            shape,
            ours_ms: ours_s * 1e3,
            burn_ms: burn_s * 1e3,
            max_rel_diff: diff,
        });
        Ok(())
    }
}

/// RMSNorm and its input gradient over the hidden size (one row per token) and over head_dim
/// (the q-norm).
fn norm_rows<B: ElementwiseBackend>(rows: &mut Rows<B>, cfg: &ModelConfig) -> Result<()> {
    let (t, device, eps) = (rows.args.tokens, rows.device, cfg.rms_norm_eps);
    for (op, op_grad, shape) in [
        ("rms_norm", "rms_norm grad", vec![1, t, cfg.hidden_size]),
        (
            "rms_norm (q heads)",
            "rms_norm grad (q heads)",
            vec![t, cfg.num_heads, cfg.head_dim],
        ),
    ] {
        let dim = shape[2];
        let x = rows.random(shape.clone());
        let w = Tensor::<B, 1>::random([dim], Distribution::Uniform(0.5, 1.5), device);
        let dy = rows.random(shape.clone());
        rows.measure(
            op,
            shape.clone(),
            &|| vec![B::rms_norm(x.clone(), w.clone(), eps)],
            &|| vec![elementwise::burn_ops::rms_norm(x.clone(), w.clone(), eps)],
        )?;
        rows.measure(
            op_grad,
            shape,
            &|| {
                vec![B::rms_norm_input_grad(
                    x.clone(),
                    w.clone(),
                    eps,
                    dy.clone(),
                )]
            },
            &|| {
                vec![elementwise::burn_ops::rms_norm_input_grad(
                    x.clone(),
                    w.clone(),
                    eps,
                    dy.clone(),
                )]
            },
        )?;
    }
    Ok(())
}

/// SwiGLU and its gradients over the intermediate size.
fn swiglu_rows<B: ElementwiseBackend>(rows: &mut Rows<B>, cfg: &ModelConfig) -> Result<()> {
    let t = rows.args.tokens;
    let shape = vec![1, t, cfg.intermediate_size];
    let (gate, up, dy) = (
        rows.random(shape.clone()),
        rows.random(shape.clone()),
        rows.random(shape.clone()),
    );
    rows.measure(
        "swiglu",
        shape.clone(),
        &|| vec![B::swiglu(gate.clone(), up.clone())],
        &|| vec![elementwise::burn_ops::swiglu(gate.clone(), up.clone())],
    )?;
    let pair = |(a, b): (Tensor<B, 3>, Tensor<B, 3>)| vec![a, b];
    rows.measure(
        "swiglu grads",
        shape,
        &|| pair(B::swiglu_grads(gate.clone(), up.clone(), dy.clone())),
        &|| {
            pair(elementwise::burn_ops::swiglu_grads(
                gate.clone(),
                up.clone(),
                dy.clone(),
            ))
        },
    )?;
    Ok(())
}

/// RoPE of the queries through the decoder's transposed view [1, T, H, D] -> [1, H, T, D], and
/// its inverse (the gradient).
fn rope_rows<B: ElementwiseBackend>(rows: &mut Rows<B>, cfg: &ModelConfig) -> Result<()> {
    let (t, device) = (rows.args.tokens, rows.device);
    let normal = Distribution::Normal(0.0, 1.0);
    let tables = crate::model::RopeTables::<B>::for_model(cfg, 0, t, device);
    let q = Tensor::<B, 4>::random([1, t, cfg.num_heads, cfg.head_dim], normal, device);
    let flat = |x: Tensor<B, 4>| -> Tensor<B, 3> { x.flatten(0, 1) };
    for (op, inverse) in [("rope", false), ("rope inverse (grad)", true)] {
        let rope = |ours: bool| {
            let x = q.clone().swap_dims(1, 2);
            let (cos, sin) = (tables.cos.clone(), tables.sin.clone());
            vec![flat(if ours {
                B::rope(x, cos, sin, inverse)
            } else {
                elementwise::burn_ops::rope(x, cos, sin, inverse)
            })]
        };
        rows.measure(
            op,
            vec![1, cfg.num_heads, t, cfg.head_dim],
            &|| rope(true),
            &|| rope(false),
        )?;
    }
    Ok(())
}

/// The distillation KL over one chunk of `--kl-chunk` tokens' logits (logit-like spread), and its
/// student gradient.
fn kl_rows<B: ElementwiseBackend>(rows: &mut Rows<B>, cfg: &ModelConfig) -> Result<()> {
    let (t, device) = (rows.args.tokens, rows.device);
    let normal = Distribution::Normal(0.0, 1.0);
    let chunk = rows.args.kl_chunk.min(t);
    let logits_shape = vec![1, chunk, cfg.vocab_size];
    let logits =
        || Tensor::<B, 3>::random(logits_shape.clone(), Distribution::Normal(0.0, 3.0), device);
    let (student, teacher) = (logits(), logits());
    let per_token = Tensor::<B, 2>::random([1, chunk], normal, device);
    let rows_of = |kl: Tensor<B, 2>| vec![kl.unsqueeze_dim::<3>(2)];
    rows.measure(
        "token_kl",
        logits_shape.clone(),
        &|| rows_of(B::token_kl(student.clone(), teacher.clone())),
        &|| {
            rows_of(elementwise::burn_ops::token_kl(
                student.clone(),
                teacher.clone(),
            ))
        },
    )?;
    rows.measure(
        "token_kl student grad",
        logits_shape,
        &|| {
            vec![B::token_kl_student_grad(
                student.clone(),
                teacher.clone(),
                per_token.clone(),
            )]
        },
        &|| {
            vec![elementwise::burn_ops::token_kl_student_grad(
                student.clone(),
                teacher.clone(),
                per_token.clone(),
            )]
        },
    )?;
    Ok(())
}
