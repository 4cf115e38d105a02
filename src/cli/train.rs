//! `dms-retrofit train --recipe FILE` and `dms-retrofit plot RUN_DIR`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use crate::backend::{CpuAutodiff, DeviceSpec};
use crate::model::FloatFormat;
use crate::recipe::Recipe;
use crate::train::{TrainOptions, plot, train_ranks};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The recipe (TOML). Relative paths inside it are resolved against its folder.
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.lr=1e-5 --set run.device=cuda:0`. Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in `run.output_dir` from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
    /// Print the final summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let recipe = Recipe::load(&args.recipe, &args.overrides)?;
    let devices = recipe.devices()?;
    let device = devices[0];
    device.ensure_available()?;
    if devices.len() > 1 && device != DeviceSpec::Cpu {
        anyhow::bail!(
            "run.devices names {} GPUs: multi-GPU training needs NCCL, which this build does not \
             have yet (issue 19); use one GPU (run.device), or [\"cpu\", ...] for simulated ranks",
            devices.len()
        );
    }
    let format = match recipe.model.dtype.as_str() {
        "auto" => device.default_format(),
        other => FloatFormat::parse(other).expect("validated"),
    };
    let options = TrainOptions {
        resume: args.resume,
        recipe_dir: args.recipe.parent().map(PathBuf::from).unwrap_or_default(),
        quiet: args.quiet,
        stop_after: None,
    };
    let summary = match device {
        DeviceSpec::Cpu => {
            if format != FloatFormat::F32 {
                anyhow::bail!(
                    "model.dtype = {format:?} is not supported on the CPU; use f32 or auto"
                );
            }
            let ranks = vec![Default::default(); devices.len()];
            train_ranks::<CpuAutodiff>(&recipe, &options, format, &ranks)?
        }
        DeviceSpec::Cuda(index) => train_cuda(&recipe, &options, format, index)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let last = |k: &str| summary.last.get(k).copied().unwrap_or(f64::NAN);
        println!(
            "{} after {} steps: loss {:.4}, KL {:.4}, train CR {:.2} (scheduled {:.2}), eval KL {:.4}, \
             measured CR {:.2}, {:.0} tokens/s",
            if summary.interrupted {
                "stopped"
            } else {
                "finished"
            },
            summary.steps,
            last("loss"),
            last("kl"),
            last("train_cr"),
            last("target_cr"),
            last("eval_kl"),
            last("eval_cr"),
            summary.tokens_per_s
        );
        println!(
            "run folder: {} (metrics.jsonl, metrics.svg, checkpoints/, {})",
            summary.run_dir.display(),
            if summary.cr_snapshots.is_empty() {
                "no cr-K snapshots yet".to_string()
            } else {
                summary
                    .cr_snapshots
                    .iter()
                    .map(|k| format!("cr-{k}/"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn train_cuda(
    recipe: &Recipe,
    options: &TrainOptions,
    format: FloatFormat,
    index: usize,
) -> Result<crate::train::TrainSummary> {
    let device = burn::backend::cuda::CudaDevice::new(index);
    crate::backend::init_cuda(&device, format)?;
    crate::train::train::<burn::backend::Autodiff<crate::backend::Cuda>>(
        recipe, options, format, &device,
    )
}

#[cfg(not(feature = "cuda"))]
fn train_cuda(
    _: &Recipe,
    _: &TrainOptions,
    _: FloatFormat,
    index: usize,
) -> Result<crate::train::TrainSummary> {
    DeviceSpec::Cuda(index).ensure_available()?;
    unreachable!("ensure_available fails without the cuda feature")
}

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A run folder (holding metrics.jsonl).
    pub run: PathBuf,
    /// Output file (default RUN/metrics.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run_plot(args: PlotArgs) -> Result<()> {
    let metrics = args.run.join("metrics.jsonl");
    let out = args.out.unwrap_or_else(|| args.run.join("metrics.svg"));
    let summary = plot::plot_metrics(
        &metrics,
        &out,
        &format!("dms-retrofit: {}", args.run.display()),
    )
    .with_context(|| format!("plotting '{}'", args.run.display()))?;
    println!(
        "{}: {} training steps, {} evaluations",
        out.display(),
        summary.train_points,
        summary.eval_points
    );
    Ok(())
}
