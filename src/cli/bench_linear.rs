//! `dms-retrofit bench linear`: the linear layers' three GEMMs (forward, input gradient, weight
//! gradient) at a model shape's projection sizes, through the backend's `LinearBackend` path
//! (cuBLASLt on CUDA) beside burn's own matmul on the same tensors. Prints a table, then one JSON
//! line per row; the relative difference between the two is the correctness check on the GPU.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Distribution, Tensor};
use clap::Args;
use serde::Serialize;

use crate::backend::{Cpu, DeviceSpec};
use crate::model::FloatFormat;
use crate::model::linear::LinearBackend;

#[derive(Args, Debug)]
pub struct LinearArgs {
    /// Model shape whose projections are measured (see `bench step --shape`).
    #[arg(long, default_value = "qwen3-8b")]
    pub shape: String,
    /// Rows (tokens) of the activations.
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Timed calls per GEMM (median reported), after one warm-up call.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    let spec: DeviceSpec = args.device.parse()?;
    spec.ensure_available()?;
    let rows = match spec {
        DeviceSpec::Cpu => measure::<Cpu>(&args, &Default::default())?,
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(index) => {
            let device = burn::backend::cuda::CudaDevice::new(index);
            crate::backend::init_cuda(&device, FloatFormat::Bf16)?;
            measure::<crate::backend::Cuda>(&args, &device)?
        }
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("ensure_available fails without the cuda feature"),
    };
    let dtype = match spec {
        DeviceSpec::Cpu => FloatFormat::F32,
        DeviceSpec::Cuda(_) => FloatFormat::Bf16,
    };
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
            args.repeats,
            device,
            || B::linear_hf(x.clone(), w.clone(), None),
            || burn::tensor::module::linear(x.clone(), w.clone().transpose(), None),
        );
        let input_grad = compare(
            args.repeats,
            device,
            || B::linear_hf_input_grad(dy.clone(), w.clone()),
            || dy.clone().matmul(w.clone().unsqueeze()),
        );
        let weight_grad = compare(
            args.repeats,
            device,
            || B::linear_hf_weight_grad(dy.clone(), x.clone()),
            || {
                let dy: Tensor<B, 2> = dy.clone().flatten(0, 1);
                let x: Tensor<B, 2> = x.clone().flatten(0, 1);
                dy.transpose().matmul(x)
            },
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
/// largest magnitude of burn's result.
fn compare<B: LinearBackend, const D: usize>(
    repeats: usize,
    device: &B::Device,
    ours: impl Fn() -> Tensor<B, D>,
    burn: impl Fn() -> Tensor<B, D>,
) -> Result<(f64, f64, f64)> {
    let time = |f: &dyn Fn() -> Tensor<B, D>| -> Result<(f64, Tensor<B, D>)> {
        let out = f();
        B::sync(device)?;
        let mut times = Vec::new();
        for _ in 0..repeats.max(1) {
            let start = Instant::now();
            let _ = f();
            B::sync(device)?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok((times[times.len() / 2], out))
    };
    let (ours_s, ours_out) = time(&ours)?;
    let (burn_s, burn_out) = time(&burn)?;
    let values = |t: Tensor<B, D>| -> Result<Vec<f32>> {
        t.into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))
    };
    let (got, want) = (values(ours_out)?, values(burn_out)?);
    let scale = want
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let diff = got
        .iter()
        .zip(&want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()));
    Ok((ours_s, burn_s, (diff / scale) as f64))
}
