//! The command line: argument structs, logging setup, and printing. No tensor math lives here.

mod bench;
mod bench_infer;
mod bench_load;
mod bench_ops;
mod eval;
mod export;
mod gen_data;
mod generate;
mod inspect;
mod loading;
mod logits;
mod selftest;
mod train;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};

use crate::backend::DeviceSpec;
use crate::model::FloatFormat;
use tracing_subscriber::EnvFilter;

/// Retrofit Llama and Qwen checkpoints with Dynamic Memory Sparsification (DMS): learned per-head
/// KV-cache eviction that shrinks inference memory up to 8x.
#[derive(Parser, Debug)]
#[command(name = "dms-retrofit", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every command takes.
#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// More log output (-v debug, -vv trace). RUST_LOG overrides this.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a checkpoint's architecture, size and KV-cache memory (dense and under DMS).
    Inspect(inspect::InspectArgs),
    /// Retrofit a checkpoint with DMS as a recipe describes (distillation with an annealed CR).
    Train(train::TrainArgs),
    /// Write a run (latest, cr-K or step-N) as a Hugging Face folder with the DMS tensors and keys.
    Export(export::ExportArgs),
    /// Perplexity, KL to the original and measured CR (per layer/head), with StreamingLLM / TOVA /
    /// H2O baselines at the same budget.
    Eval(eval::EvalArgs),
    /// Generate text through the evicting KV cache; reports tokens/s, KV bytes and measured CR.
    Generate(generate::GenerateArgs),
    /// Sample the model's own answers to prompts as chat JSONL training data (self-distillation),
    /// batched, resumable.
    GenData(gen_data::GenDataArgs),
    /// Benchmarks (print JSON lines).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print the logits of one forward pass as JSON (eviction on or off), for cross-checks.
    Logits(logits::LogitsArgs),
    /// Draw loss / KL / compression ratio against step for a run folder (SVG).
    Plot(train::PlotArgs),
    /// Check every CUDA kernel against burn's ops on the GPU and the CPU's f32 ops, with stated
    /// tolerances; exits non-zero on any failure.
    Selftest(selftest::SelftestArgs),
}

/// Where a command computes (`eval`, `generate`, `logits`).
#[derive(Args, Debug, Clone)]
pub struct ComputeArgs {
    /// `cpu` (f32) or `cuda[:N]` (bf16 unless --dtype says otherwise).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32, bf16 or f16 (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long)]
    pub dtype: Option<String>,
}

impl ComputeArgs {
    /// The device and float format asked for, or one error naming the flag and the fix.
    pub fn resolve(&self) -> Result<(DeviceSpec, FloatFormat)> {
        let spec: DeviceSpec = self
            .device
            .parse()
            .with_context(|| format!("--device '{}'", self.device))?;
        spec.ensure_available()?;
        let format = match &self.dtype {
            Some(d) => FloatFormat::parse(d)
                .with_context(|| format!("--dtype '{d}' must be f32, bf16 or f16"))?,
            None => spec.default_format(),
        };
        if spec == DeviceSpec::Cpu && format != FloatFormat::F32 {
            bail!(
                "--dtype {} needs --device cuda: the CPU backend computes in f32",
                format.torch_name()
            );
        }
        Ok((spec, format))
    }
}

/// `$run::<B>(args..., &device)` on the backend `$spec` names; a CUDA device is first prepared
/// for `$format` (kernel cache, default float dtype).
macro_rules! on_backend {
    ($spec:expr, $format:expr, $run:ident($($arg:expr),* $(,)?)) => {
        match $spec {
            $crate::backend::DeviceSpec::Cpu => {
                $run::<$crate::backend::Cpu>($($arg,)* &Default::default())
            }
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceSpec::Cuda(index) => {
                let device = burn::backend::cuda::CudaDevice::new(index);
                $crate::backend::init_cuda(&device, $format)?;
                $run::<$crate::backend::Cuda>($($arg,)* &device)
            }
            #[cfg(not(feature = "cuda"))]
            $crate::backend::DeviceSpec::Cuda(_) => {
                let _ = $format;
                unreachable!("ensure_available fails without the cuda feature")
            }
        }
    };
}
pub(crate) use on_backend;

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // cubecl / burn log every autotune decision at info; keep them for -vv.
    let quiet_deps = if verbose >= 2 {
        ""
    } else {
        ",cubecl_runtime=warn,cubecl_cuda=warn,cubecl_core=warn,burn_cubecl=warn,burn_fusion=warn,cubecl=warn"
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default}{quiet_deps}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Entry point of the binary: runs the command and prints the full error chain on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.global.verbose);
    if !matches!(cli.command, Command::Train(_)) {
        quiet_on_closed_pipe();
    }
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Train(args) => train::run(args),
        Command::Plot(args) => train::run_plot(args),
        Command::Export(args) => export::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
        Command::GenData(args) => gen_data::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Bench(command) => bench::run(command),
        Command::Selftest(args) => selftest::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Output into a closed pipe (`dms-retrofit logits ... | head`) ends the process quietly, as it
/// does for cat, grep or ripgrep, instead of a panic in `println!`: Rust ignores SIGPIPE, so the
/// default action is restored. Training keeps ignoring it: its stdout carries only the final
/// summary, and a closed pipe must not cost a run its checkpoint.
fn quiet_on_closed_pipe() {
    // SAFETY: called once at start-up, before any thread that could race on signal dispositions.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Bytes in human units (binary prefixes).
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Counts in human units (K, M, B).
pub fn human_count(count: u64) -> String {
    match count {
        c if c >= 1_000_000_000 => format!("{:.2}B", c as f64 / 1e9),
        c if c >= 1_000_000 => format!("{:.1}M", c as f64 / 1e6),
        c if c >= 1_000 => format!("{:.1}K", c as f64 / 1e3),
        c => c.to_string(),
    }
}
