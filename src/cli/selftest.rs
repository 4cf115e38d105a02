//! `dms-retrofit selftest --device cuda`: every CUDA kernel (cuBLASLt linear GEMMs, attention
//! forward and backward, RMSNorm, SwiGLU, RoPE, distillation KL) against two references on the
//! same inputs: burn's tensor ops on the same GPU, and the CPU's f32 tensor ops. Shape classes:
//! head_dim 64/128, GQA groups 1/4/8, window 0 / 16 / beyond the sequence, with and without a key
//! bias, sequences that are and are not a multiple of the 64-row tile, a query offset, chunked
//! scores, odd row counts and vocabularies. Exits non-zero when any check is outside its tolerance
//! or a kernel declined (burn's ops ran in its place).
//!
//! A process has one default float dtype and reads `DMS_RETROFIT_FLASH` and
//! `DMS_RETROFIT_FLASH_KERNEL` once, so each variant (bf16 with the flash attention, bf16 with the
//! `mma.sync` flash kernels, bf16 with the GEMM attention, f32) runs as a child process of the
//! same binary and reports its checks as JSON lines; the parent prints the table.

// The checks run on the GPU only; a CPU build compiles them for their unit tests.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::fmt;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use burn::tensor::{FloatDType, Tensor, TensorData, backend::Backend};
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use super::bench_ops::f32_values;
use crate::backend::{Cpu, DeviceSpec};
use crate::model::{FloatFormat, RopeTables};
use crate::ops::attention::{
    AttentionBackend, AttentionForward, AttentionGrads, AttentionInputs, AttentionOptions,
    attention_backward, attention_forward,
};
use crate::ops::elementwise::{ElementwiseBackend, burn_ops as elementwise_ops};
use crate::ops::linear::{LinearBackend, burn_ops as linear_ops};

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// The GPU to check: `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Only the checks whose variant, kernel or case contains this text (e.g. `attention`,
    /// `d64`, `g8`, `f32`).
    #[arg(long)]
    pub filter: Option<String>,
    /// Compare with the CPU's f32 ops only, not with burn's ops on the GPU: on a cold GPU burn
    /// autotunes every new matmul shape (about 30 s each on an H200), and the suite has
    /// hundreds; with a warm kernel cache the full comparison is quick.
    #[arg(long)]
    pub cpu_only: bool,
    /// One JSON object per check on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Run one variant in this process and print its checks as JSON lines (what the parent
    /// process starts for each variant).
    #[arg(long, hide = true)]
    pub variant: Option<Variant>,
}

/// A float format and attention path under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// bf16, attention through the flash kernels (head_dim 64/128): on H100 / H200 the wgmma
    /// kernels at head_dim 128, elsewhere the `mma.sync` ones.
    Bf16,
    /// bf16, attention through the `mma.sync` flash kernels everywhere
    /// (`DMS_RETROFIT_FLASH_KERNEL=wide`), so a Hopper GPU checks both kernel families.
    Bf16Mma,
    /// bf16, attention through cuBLASLt GEMMs and the fused softmax (`DMS_RETROFIT_FLASH=0`).
    Bf16Gemm,
    /// f32 (attention through the GEMM path: the flash kernels are bf16 only).
    F32,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Bf16,
        Variant::Bf16Mma,
        Variant::Bf16Gemm,
        Variant::F32,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::Bf16 => "bf16",
            Variant::Bf16Mma => "bf16-mma",
            Variant::Bf16Gemm => "bf16-gemm",
            Variant::F32 => "f32",
        }
    }

    fn format(self) -> FloatFormat {
        match self {
            Variant::Bf16 | Variant::Bf16Mma | Variant::Bf16Gemm => FloatFormat::Bf16,
            Variant::F32 => FloatFormat::F32,
        }
    }

    fn dtype(self) -> FloatDType {
        match self.format() {
            FloatFormat::F32 => FloatDType::F32,
            _ => FloatDType::BF16,
        }
    }

    /// Only the attention differs between the bf16 variants.
    fn checks_only_attention(self) -> bool {
        matches!(self, Variant::Bf16Gemm | Variant::Bf16Mma)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a kernel's result is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reference {
    /// burn's tensor ops on the same GPU, same dtype, same inputs.
    BurnGpu,
    /// burn's tensor ops on the CPU in f32, on the GPU inputs' exact values.
    CpuF32,
    /// The definition in f64 by plain loops on the CPU, on the GPU inputs' exact values: for
    /// reductions too long for an f32 reference (a 152K-value softmax in f32 is itself off by
    /// ~3e-5).
    CpuF64,
}

impl Reference {
    fn name(self) -> &'static str {
        match self {
            Reference::BurnGpu => "burn-gpu",
            Reference::CpuF32 => "cpu-f32",
            Reference::CpuF64 => "cpu-f64",
        }
    }
}

/// How a difference is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Measure {
    /// `max |got - want| / max |want|`
    Rel,
    /// `max |got - want|` (the log-sum-exp, already on a log scale)
    Abs,
}

/// Which tolerance a result gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// One pass over each row (RMSNorm, SwiGLU, RoPE, KL).
    Elementwise,
    /// Sums over a dimension through GEMMs (linear layers, attention outputs and gradients).
    Reduction,
    /// The attention's log-sum-exp (absolute).
    Lse,
    /// A small difference of large sums (the KL of a student near its teacher), where the order
    /// of f32 summation shows.
    SmallDifference,
}

/// The largest accepted difference. f32 kernels compute in f32 (cuBLASLt with 32-bit compute, no
/// TF32), so they agree with the CPU to float rounding; burn's f32 GEMM on the GPU is allowed
/// TF32-sized differences. bf16 kernels compute in f32 and round once, so against the CPU they
/// are within a few bf16 ulps (2^-8 relative) of the largest value; burn's bf16 tensor ops round
/// after every op (and round attention scores to bf16), which the measured differences at
/// Qwen3-8B sizes put at up to 1e-2 (docs/performance.md), hence the wider bound. A logic error
/// (mask off by one, wrong GQA head, missing bias) moves results by tens of percent: the keys of
/// the attention cases are half evicted (bias -30), so one key seen or hidden in error changes
/// its query's output by about 1/window.
fn tolerance(variant: Variant, reference: Reference, class: Class) -> f64 {
    match (variant.format(), reference, class) {
        // The KL output is f32 in both variants. Our kernel is ~2e-5 from f64 on the
        // near-teacher rows (`scripts/kl-precision.py`; the old lse_s - lse_t form ~1e-4 to
        // 2e-4); burn's f32 sums on the GPU are not known to do as well.
        (_, Reference::CpuF32 | Reference::CpuF64, Class::SmallDifference) => 5e-5,
        (_, Reference::BurnGpu, Class::SmallDifference) => 1e-3,
        (FloatFormat::F32, Reference::CpuF32, Class::Elementwise) => 1e-5,
        // f32 ops summing 152K terms (burn's, which the suite's CPU run checks) are within ~6e-5.
        (FloatFormat::F32, Reference::CpuF32 | Reference::CpuF64, _) => 1e-4,
        (FloatFormat::F32, Reference::BurnGpu, Class::Elementwise) => 1e-5,
        (FloatFormat::F32, Reference::BurnGpu, _) => 2e-3,
        (_, Reference::CpuF32 | Reference::CpuF64, Class::Elementwise) => 1e-2,
        (_, Reference::CpuF32 | Reference::CpuF64, _) => 2e-2,
        (_, Reference::BurnGpu, _) => 5e-2,
    }
}

/// One kernel output compared with one reference.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    pub variant: Variant,
    pub kernel: String,
    pub output: String,
    pub case: String,
    pub reference: Reference,
    pub measure: Measure,
    /// NaN where nothing could be compared (the kernel declined, shapes differ).
    pub diff: f64,
    pub tolerance: f64,
    pub pass: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

pub fn run(args: SelftestArgs) -> Result<()> {
    let spec: DeviceSpec = args.device.parse()?;
    let DeviceSpec::Cuda(index) = spec else {
        bail!(
            "selftest checks the CUDA kernels against burn's ops and the CPU; pass --device cuda or cuda:N"
        );
    };
    spec.ensure_available()?;
    if let Some(variant) = args.variant {
        for check in run_variant(index, variant, args.filter.as_deref(), !args.cpu_only)? {
            println!("{}", serde_json::to_string(&check)?);
        }
        return Ok(());
    }
    // Each variant's rows are printed as soon as it finishes.
    if !args.json {
        print!("{}", table_header());
    }
    let mut checks = Vec::new();
    let mut broken = Vec::new();
    for variant in Variant::ALL {
        let (found, problem) = run_child(&args, variant)?;
        if args.json {
            for check in &found {
                println!("{}", serde_json::to_string(check)?);
            }
        } else {
            print!("{}", table_rows(&found));
        }
        std::io::Write::flush(&mut std::io::stdout())?;
        checks.extend(found);
        broken.extend(problem);
    }
    if checks.is_empty() && broken.is_empty() {
        bail!(
            "no check matches --filter '{}'",
            args.filter.unwrap_or_default()
        );
    }
    if !args.json {
        print!("{}", failure_list(&checks));
    }
    let failed = checks.iter().filter(|c| !c.pass).count();
    for problem in &broken {
        eprintln!("{problem}");
    }
    if failed > 0 || !broken.is_empty() {
        bail!(
            "{failed} of {} checks failed{}",
            checks.len(),
            if broken.is_empty() {
                String::new()
            } else {
                format!(", and {} variant(s) did not finish", broken.len())
            }
        );
    }
    if !args.json {
        println!("all {} checks passed", checks.len());
    }
    Ok(())
}

/// Runs one variant as a child process; its checks, and what went wrong if it did not finish.
fn run_child(args: &SelftestArgs, variant: Variant) -> Result<(Vec<Check>, Option<String>)> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let mut command = Command::new(exe);
    command
        .args([
            "selftest",
            "--device",
            &args.device,
            "--variant",
            variant.name(),
        ])
        .env(
            "DMS_RETROFIT_FLASH",
            if variant == Variant::Bf16Gemm {
                "0"
            } else {
                "1"
            },
        )
        .env(
            "DMS_RETROFIT_FLASH_KERNEL",
            if variant == Variant::Bf16Mma {
                "wide"
            } else {
                "hopper"
            },
        )
        // Waiting after each hand-off makes a fault surface in the kernel that caused it.
        .env("DMS_RETROFIT_CUDA_SYNC", "1")
        // burn's side (the reference) would otherwise autotune each of the suite's hundreds of
        // matmul shapes on a cold GPU (tens of minutes); its kernel choice does not change
        // what it computes.
        .env(
            "CUBECL_AUTOTUNE_LEVEL",
            std::env::var("CUBECL_AUTOTUNE_LEVEL").unwrap_or_else(|_| "minimal".into()),
        )
        .env_remove("DMS_RETROFIT_GEMM")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(filter) = &args.filter {
        command.args(["--filter", filter]);
    }
    if args.cpu_only {
        command.arg("--cpu-only");
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start the {variant} checks"))?;
    let mut checks = Vec::new();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read the checks' output")?;
        if line.starts_with('{') {
            checks.push(
                serde_json::from_str(&line)
                    .with_context(|| format!("unreadable check line: {line}"))?,
            );
        }
    }
    let status = child.wait()?;
    let problem = (!status.success()).then(|| {
        format!(
            "the {variant} checks stopped ({status}) after {} checks",
            checks.len()
        )
    });
    Ok((checks, problem))
}

/// The table's header, its rows, and the failures after it.
#[cfg(test)]
fn report(checks: &[Check]) -> String {
    table_header() + &table_rows(checks) + &failure_list(checks)
}

fn table_header() -> String {
    format!(
        "{:<10} {:<19} {:<8} {:<9} {:>5} {:>9} {:>4} {:>9}  {:<30} result\n",
        "variant", "kernel", "output", "reference", "cases", "worst", "", "tolerance", "worst case"
    )
}

/// One row per variant, kernel output and reference: the worst case and whether every case
/// passed.
fn table_rows(checks: &[Check]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let mut groups: Vec<(&Check, Vec<&Check>)> = Vec::new();
    for check in checks {
        let same = |c: &&Check| {
            c.variant == check.variant
                && c.kernel == check.kernel
                && c.output == check.output
                && c.reference == check.reference
        };
        match groups.iter_mut().find(|(first, _)| same(first)) {
            Some((_, members)) => members.push(check),
            None => groups.push((check, vec![check])),
        }
    }
    for (first, members) in &groups {
        // NaN (nothing compared) counts as the worst.
        let worst = members
            .iter()
            .max_by(|a, b| {
                let key = |c: &Check| {
                    if c.diff.is_nan() {
                        f64::INFINITY
                    } else {
                        c.diff
                    }
                };
                key(a).total_cmp(&key(b))
            })
            .expect("groups are not empty");
        let failed = members.iter().filter(|c| !c.pass).count();
        let tolerance = members.iter().map(|c| c.tolerance).fold(f64::NAN, f64::min);
        let _ = writeln!(
            out,
            "{:<10} {:<19} {:<8} {:<9} {:>5} {:>9.2e} {:>4} {:>9.1e}  {:<30} {}",
            first.variant.name(),
            first.kernel,
            first.output,
            first.reference.name(),
            members.len(),
            worst.diff,
            match first.measure {
                Measure::Rel => "rel",
                Measure::Abs => "abs",
            },
            tolerance,
            worst.case,
            if failed == 0 {
                "PASS".to_string()
            } else {
                format!("FAIL ({failed})")
            }
        );
    }
    out
}

/// Every failing check, one per line (empty when all passed).
fn failure_list(checks: &[Check]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let failures: Vec<&Check> = checks.iter().filter(|c| !c.pass).collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\nfailed checks:");
        for c in failures {
            let _ = writeln!(
                out,
                "  {} {} {} [{}] vs {}: {:.3e} > {:.1e}{}",
                c.variant.name(),
                c.kernel,
                c.output,
                c.case,
                c.reference.name(),
                c.diff,
                c.tolerance,
                c.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
        }
    }
    out
}

/// The checks of one variant on GPU `index`, in this process.
#[cfg(feature = "cuda")]
fn run_variant(
    index: usize,
    variant: Variant,
    filter: Option<&str>,
    burn_gpu: bool,
) -> Result<Vec<Check>> {
    use crate::ops::cuda::take_handoff_stats;
    let device = burn::backend::cuda::CudaDevice::new(index);
    crate::backend::init_cuda(&device, variant.format())?;
    // Our kernels ran when there was at least one hand-off to our CUDA work and none failed.
    let kernels_ran = || {
        let stats = take_handoff_stats();
        if stats.calls == 0 {
            Some("our kernel did not run: burn's ops were used".to_string())
        } else if stats.failed > 0 {
            Some("our CUDA work failed and burn's ops were used".to_string())
        } else {
            None
        }
    };
    run_checks::<crate::backend::Cuda>(variant, &device, filter, burn_gpu, &kernels_ran)
}

#[cfg(not(feature = "cuda"))]
fn run_variant(_: usize, _: Variant, _: Option<&str>, _: bool) -> Result<Vec<Check>> {
    unreachable!("ensure_available fails without the cuda feature")
}

/// Backends whose kernels the selftest checks.
pub trait Tested: AttentionBackend + ElementwiseBackend + LinearBackend {}
impl<B: AttentionBackend + ElementwiseBackend + LinearBackend> Tested for B {}

/// Every check of `variant` on `device` whose name matches `filter`, against burn's ops on the
/// same device too when `burn_gpu`. `kernels_ran` is asked after each call of the backend's own
/// path: `None` when its kernels ran, else why not.
pub fn run_checks<B: Tested>(
    variant: Variant,
    device: &B::Device,
    filter: Option<&str>,
    burn_gpu: bool,
    kernels_ran: &dyn Fn() -> Option<String>,
) -> Result<Vec<Check>> {
    let mut suite = Suite::<B> {
        variant,
        device,
        filter,
        burn_gpu,
        kernels_ran,
        rng: Rng(0x5e1f_7e57),
        checks: Vec::new(),
    };
    for case in attention_cases() {
        suite.attention(&case)?;
    }
    if !variant.checks_only_attention() {
        suite.linear()?;
        suite.rms_norm()?;
        suite.swiglu()?;
        suite.rope()?;
        suite.token_kl()?;
    }
    Ok(suite.checks)
}

/// One attention shape: `heads = 2 · group` query heads over 2 KV heads, batch 2.
#[derive(Clone, Copy, Debug)]
struct AttentionCase {
    head_dim: usize,
    group: usize,
    k_len: usize,
    /// Queries are the last `q_len` positions (offset `k_len - q_len`).
    q_len: usize,
    /// `None`: no key bias (plain causal attention).
    window: Option<usize>,
    /// Element budget for one chunk of scores; `None` is the default (one chunk at these sizes).
    score_budget: Option<usize>,
}

/// A window longer than every case's sequence: the bias never applies.
const WINDOW_BEYOND: usize = 4096;

fn attention_cases() -> Vec<AttentionCase> {
    let mut cases = Vec::new();
    for head_dim in [64, 128] {
        for group in [1, 4, 8] {
            for seq in [128, 200] {
                for window in [None, Some(0), Some(16), Some(WINDOW_BEYOND)] {
                    cases.push(AttentionCase {
                        head_dim,
                        group,
                        k_len: seq,
                        q_len: seq,
                        window,
                        score_budget: None,
                    });
                }
            }
        }
        // Queries continuing a prefix (prefill after a cache), not tile-aligned.
        cases.push(AttentionCase {
            head_dim,
            group: 4,
            k_len: 200,
            q_len: 72,
            window: Some(16),
            score_budget: None,
        });
        // Scores in chunks of 24 query rows.
        cases.push(AttentionCase {
            head_dim,
            group: 4,
            k_len: 200,
            q_len: 200,
            window: Some(16),
            score_budget: Some(4 * 200 * 24),
        });
    }
    cases
}

impl AttentionCase {
    fn name(&self) -> String {
        let window = match self.window {
            None => "no-bias".to_string(),
            Some(WINDOW_BEYOND) => "w>T".to_string(),
            Some(w) => format!("w{w}"),
        };
        let mut name = format!(
            "d{} g{} T{} {window}",
            self.head_dim, self.group, self.k_len
        );
        if self.q_len != self.k_len {
            name += &format!(" q{}@{}", self.q_len, self.k_len - self.q_len);
        }
        if self.score_budget.is_some() {
            name += " chunked";
        }
        name
    }

    fn options(&self) -> AttentionOptions {
        let mut options = AttentionOptions::causal(self.k_len - self.q_len);
        options.window = self.window.unwrap_or(0);
        if let Some(budget) = self.score_budget {
            options.score_budget = budget;
        }
        options
    }
}

/// splitmix64: the same inputs on every run and machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

/// How the values of an input are drawn.
#[derive(Clone, Copy)]
enum Draw {
    Normal(f32),
    Uniform(f32, f32),
    /// A DMS key bias `log(1 - p)`: half the keys evicted (-30), the rest in (-1, 0).
    KeyBias,
}

struct Suite<'a, B: Backend> {
    variant: Variant,
    device: &'a B::Device,
    filter: Option<&'a str>,
    /// Whether burn's ops on the same device are a reference too.
    burn_gpu: bool,
    kernels_ran: &'a dyn Fn() -> Option<String>,
    rng: Rng,
    checks: Vec<Check>,
}

/// The values of a tensor that may be absent (none when it is).
fn optional_values<B: Backend, const D: usize>(t: Option<Tensor<B, D>>) -> Result<Vec<f32>> {
    t.map_or_else(|| Ok(Vec::new()), f32_values)
}

/// The attention gradients' values: q, k, v and the key bias (none without one).
fn grad_values<B: Backend>(grads: AttentionGrads<B>) -> Result<[Vec<f32>; 4]> {
    Ok([
        f32_values(grads.q)?,
        f32_values(grads.k)?,
        f32_values(grads.v)?,
        optional_values(grads.key_bias)?,
    ])
}

/// The difference of `got` from `want` (NaN when their sizes differ; infinite where one is
/// finite and the other not, which `f32::max` would otherwise skip).
fn difference(got: &[f32], want: &[f32], measure: Measure) -> f64 {
    if got.len() != want.len() {
        return f64::NAN;
    }
    let mut largest = 0f64;
    let mut scale = 0f64;
    for (&g, &w) in got.iter().zip(want) {
        if g.is_finite() != w.is_finite() || (!g.is_finite() && g != w) {
            return f64::INFINITY;
        }
        if g.is_finite() {
            largest = largest.max((g as f64 - w as f64).abs());
            scale = scale.max((w as f64).abs());
        }
    }
    match measure {
        Measure::Abs => largest,
        Measure::Rel => largest / scale.max(f64::from(f32::MIN_POSITIVE)),
    }
}

/// The same tensor on the CPU, in f32.
fn on_cpu<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Tensor<Cpu, D> {
    Tensor::from_data(t.clone().into_data().convert::<f32>(), &Default::default())
}

/// A result of the kernel under test beside each reference's (the kernel may have run once for
/// both, or once from each reference's own inputs).
type Compared = [(Reference, Vec<f32>, Vec<f32>); 2];

/// The kernel's result beside burn's GPU result and the CPU's.
fn both(ours: Vec<f32>, burn_gpu: Vec<f32>, cpu: Vec<f32>) -> Compared {
    [
        (Reference::BurnGpu, ours.clone(), burn_gpu),
        (Reference::CpuF32, ours, cpu),
    ]
}

impl<B: Tested> Suite<'_, B> {
    /// Whether the case is selected by `--filter` (logged at debug level when it is, so a slow
    /// or stuck case can be found).
    fn wants(&self, kernel: &str, case: &str) -> bool {
        let name = format!("{} {kernel} {case}", self.variant.name());
        let wanted = self.filter.is_none_or(|f| name.contains(f));
        if wanted {
            tracing::debug!("{name}");
        }
        wanted
    }

    fn input<const D: usize>(&mut self, shape: [usize; D], draw: Draw) -> Tensor<B, D> {
        let values = self.values(shape, draw);
        self.tensor(values, shape)
    }

    fn values<const D: usize>(&mut self, shape: [usize; D], draw: Draw) -> Vec<f32> {
        let count = shape.iter().product();
        (0..count)
            .map(|_| match draw {
                Draw::Normal(std) => std * self.rng.normal(),
                Draw::Uniform(low, high) => low + (high - low) * self.rng.uniform(),
                Draw::KeyBias if self.rng.uniform() < 0.5 => -30.0,
                Draw::KeyBias => -self.rng.uniform(),
            })
            .collect()
    }

    /// `values` on the device in the variant's dtype.
    fn tensor<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::<B, D>::from_data(TensorData::new(values, shape), self.device)
            .cast(self.variant.dtype())
    }

    /// The values of burn's GPU reference, or none when it is not compared.
    fn on_gpu<const D: usize>(&self, reference: impl FnOnce() -> Tensor<B, D>) -> Result<Vec<f32>> {
        if self.burn_gpu {
            f32_values(reference())
        } else {
            Ok(Vec::new())
        }
    }

    /// Runs the backend's own path, waits for it, and says whether its kernels ran.
    fn ours<T>(&self, f: impl FnOnce() -> T) -> Result<(T, Option<String>)> {
        let _ = (self.kernels_ran)();
        let out = f();
        B::sync(self.device)?;
        Ok((out, (self.kernels_ran)()))
    }

    /// Records one output against both references.
    fn record(
        &mut self,
        kernel: &str,
        output: &str,
        case: &str,
        class: Class,
        declined: &Option<String>,
        compared: Compared,
    ) {
        let measure = if class == Class::Lse {
            Measure::Abs
        } else {
            Measure::Rel
        };
        for (reference, ours, want) in compared {
            if reference == Reference::BurnGpu && !self.burn_gpu {
                continue;
            }
            let tolerance = tolerance(self.variant, reference, class);
            let (diff, note) = match declined {
                Some(why) => (f64::NAN, Some(why.clone())),
                None if ours.len() != want.len() => (
                    f64::NAN,
                    Some(format!(
                        "{} values where the reference has {}",
                        ours.len(),
                        want.len()
                    )),
                ),
                None => (difference(&ours, &want, measure), None),
            };
            self.checks.push(Check {
                variant: self.variant,
                kernel: kernel.to_string(),
                output: output.to_string(),
                case: case.to_string(),
                reference,
                measure,
                diff,
                tolerance,
                pass: diff <= tolerance,
                note,
            });
        }
    }

    fn attention(&mut self, case: &AttentionCase) -> Result<()> {
        let name = case.name();
        if !self.wants("attention", &name) {
            return Ok(());
        }
        let (batch, kv_heads) = (2, 2);
        let heads = kv_heads * case.group;
        let dim = case.head_dim;
        let q = self.input([batch, heads, case.q_len, dim], Draw::Normal(1.0));
        let k = self.input([batch, kv_heads, case.k_len, dim], Draw::Normal(1.0));
        let v = self.input([batch, kv_heads, case.k_len, dim], Draw::Normal(1.0));
        let bias = case
            .window
            .map(|_| self.input([batch, kv_heads, case.k_len], Draw::KeyBias));
        // Token-major, as training's output projection hands it back (read through strides).
        let grad_out = self
            .input([batch, case.q_len, heads, dim], Draw::Normal(1.0))
            .swap_dims(1, 2);
        let options = case.options();
        let cpu = |t: &Tensor<B, 4>| on_cpu(t);
        let cpu_bias = bias.as_ref().map(on_cpu);

        let (ours, declined) = self.ours(|| {
            B::attention_forward_with_lse(q.clone(), k.clone(), v.clone(), bias.clone(), options)
        })?;
        let burn = self
            .burn_gpu
            .then(|| attention_forward(q.clone(), k.clone(), v.clone(), bias.clone(), options));
        let on_cpu_forward =
            attention_forward(cpu(&q), cpu(&k), cpu(&v), cpu_bias.clone(), options);
        self.record(
            "attention forward",
            "out",
            &name,
            Class::Reduction,
            &declined,
            both(
                f32_values(ours.output.clone())?,
                optional_values(burn.as_ref().map(|f| f.output.clone()))?,
                f32_values(on_cpu_forward.output.clone())?,
            ),
        );
        self.record(
            "attention forward",
            "lse",
            &name,
            Class::Lse,
            &declined,
            both(
                f32_values(ours.lse.clone())?,
                optional_values(burn.as_ref().map(|f| f.lse.clone()))?,
                f32_values(on_cpu_forward.lse.clone())?,
            ),
        );

        let inputs = AttentionInputs {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            key_bias: bias.clone(),
        };
        let backward_ours = |forward: &AttentionForward<B>| {
            B::attention_backward_with_lse(inputs.clone(), forward, grad_out.clone(), true, options)
        };
        // Against the CPU each side starts from its own forward (the training path); against
        // burn's GPU backward both start from burn's forward (the backward kernels alone).
        let (from_ours, mut declined) = self.ours(|| backward_ours(&ours))?;
        let [ours_from_burn, burn_grads] = match &burn {
            Some(burn) => {
                let (from_burn, why) = self.ours(|| backward_ours(burn))?;
                declined = declined.or(why);
                let burn_grads =
                    attention_backward(inputs.clone(), burn, grad_out.clone(), true, options);
                [grad_values(from_burn)?, grad_values(burn_grads)?]
            }
            None => Default::default(),
        };
        let cpu_inputs = AttentionInputs {
            q: cpu(&q),
            k: cpu(&k),
            v: cpu(&v),
            key_bias: cpu_bias,
        };
        let cpu_grads =
            attention_backward(cpu_inputs, &on_cpu_forward, cpu(&grad_out), true, options);
        let compared = ours_from_burn.into_iter().zip(burn_grads).zip(
            grad_values(from_ours)?
                .into_iter()
                .zip(grad_values(cpu_grads)?),
        );
        for (output, ((ours_from_burn, burn), (ours_own, cpu))) in
            ["dq", "dk", "dv", "dbias"].into_iter().zip(compared)
        {
            if output == "dbias" && case.window.is_none() {
                continue;
            }
            self.record(
                "attention backward",
                output,
                &name,
                Class::Reduction,
                &declined,
                [
                    (Reference::BurnGpu, ours_from_burn, burn),
                    (Reference::CpuF32, ours_own, cpu),
                ],
            );
        }
        Ok(())
    }

    /// The three GEMMs of a linear layer (with and without a bias), activations `[2, 37, K]`.
    fn linear(&mut self) -> Result<()> {
        for (k, n, with_bias) in [(896, 1000, true), (64, 4864, false), (4864, 896, false)] {
            let case = format!(
                "x[2,37,{k}] W[{n},{k}]{}",
                if with_bias { " bias" } else { "" }
            );
            if !self.wants("linear", &case) {
                continue;
            }
            let x = self.input([2, 37, k], Draw::Normal(1.0));
            let w = self.input([n, k], Draw::Normal(0.05));
            let b = with_bias.then(|| self.input([n], Draw::Normal(0.5)));
            let dy = self.input([2, 37, n], Draw::Normal(1.0));
            let (cx, cw, cb, cdy) = (on_cpu(&x), on_cpu(&w), b.as_ref().map(on_cpu), on_cpu(&dy));

            let (ours, declined) = self.ours(|| B::linear_hf(x.clone(), w.clone(), b.clone()))?;
            let compared = both(
                f32_values(ours)?,
                self.on_gpu(|| linear_ops::linear(x.clone(), w.clone(), b.clone()))?,
                f32_values(linear_ops::linear(cx.clone(), cw.clone(), cb))?,
            );
            self.record("linear", "y", &case, Class::Reduction, &declined, compared);

            let (ours, declined) = self.ours(|| B::linear_hf_input_grad(dy.clone(), w.clone()))?;
            let compared = both(
                f32_values(ours)?,
                self.on_gpu(|| linear_ops::input_grad(dy.clone(), w.clone()))?,
                f32_values(linear_ops::input_grad(cdy.clone(), cw))?,
            );
            self.record(
                "linear input grad",
                "dx",
                &case,
                Class::Reduction,
                &declined,
                compared,
            );

            let (ours, declined) = self.ours(|| B::linear_hf_weight_grad(dy.clone(), x.clone()))?;
            let compared = both(
                f32_values(ours)?,
                self.on_gpu(|| linear_ops::weight_grad(dy.clone(), x.clone()))?,
                f32_values(linear_ops::weight_grad(cdy, cx))?,
            );
            self.record(
                "linear weight grad",
                "dW",
                &case,
                Class::Reduction,
                &declined,
                compared,
            );
        }
        Ok(())
    }

    /// RMSNorm and its input gradient over a hidden size and over q/k heads of both head_dims;
    /// 37 rows (not a multiple of any block); a width of 1001 takes the per-value path.
    fn rms_norm(&mut self) -> Result<()> {
        let eps = 1e-6;
        // 259 rows of 64 / 128: the rows held in registers, 2 or 4 to a warp, with the last
        // warp's rows partly past the end.
        for shape in [[2, 37, 896], [37, 7, 64], [37, 7, 128], [3, 5, 1001]] {
            let case = format!("{shape:?}");
            if !self.wants("rms_norm", &case) {
                continue;
            }
            let dim = shape[2];
            let x = self.input(shape, Draw::Normal(2.0));
            let w = self.input([dim], Draw::Uniform(0.5, 1.5));
            let dy = self.input(shape, Draw::Normal(1.0));
            let (cx, cw, cdy) = (on_cpu(&x), on_cpu(&w), on_cpu(&dy));

            let (ours, declined) = self.ours(|| B::rms_norm(x.clone(), w.clone(), eps))?;
            let compared = both(
                f32_values(ours)?,
                f32_values(elementwise_ops::rms_norm(x.clone(), w.clone(), eps))?,
                f32_values(elementwise_ops::rms_norm(cx.clone(), cw.clone(), eps))?,
            );
            self.record(
                "rms_norm",
                "y",
                &case,
                Class::Elementwise,
                &declined,
                compared,
            );

            let (ours, declined) =
                self.ours(|| B::rms_norm_input_grad(x.clone(), w.clone(), eps, dy.clone()))?;
            let compared = both(
                f32_values(ours)?,
                f32_values(elementwise_ops::rms_norm_input_grad(
                    x.clone(),
                    w.clone(),
                    eps,
                    dy.clone(),
                ))?,
                f32_values(elementwise_ops::rms_norm_input_grad(cx, cw, eps, cdy))?,
            );
            self.record(
                "rms_norm grad",
                "dx",
                &case,
                Class::Elementwise,
                &declined,
                compared,
            );
        }
        Ok(())
    }

    /// SwiGLU and its two gradients, at an MLP width and at an odd element count.
    fn swiglu(&mut self) -> Result<()> {
        for shape in [[2, 37, 4864], [1, 5, 1001]] {
            let case = format!("{shape:?}");
            if !self.wants("swiglu", &case) {
                continue;
            }
            let gate = self.input(shape, Draw::Normal(2.0));
            let up = self.input(shape, Draw::Normal(1.0));
            let dy = self.input(shape, Draw::Normal(1.0));
            let (cgate, cup, cdy) = (on_cpu(&gate), on_cpu(&up), on_cpu(&dy));

            let (ours, declined) = self.ours(|| B::swiglu(gate.clone(), up.clone()))?;
            let compared = both(
                f32_values(ours)?,
                f32_values(elementwise_ops::swiglu(gate.clone(), up.clone()))?,
                f32_values(elementwise_ops::swiglu(cgate.clone(), cup.clone()))?,
            );
            self.record(
                "swiglu",
                "y",
                &case,
                Class::Elementwise,
                &declined,
                compared,
            );

            let ((d_gate, d_up), declined) =
                self.ours(|| B::swiglu_grads(gate.clone(), up.clone(), dy.clone()))?;
            let (burn_gate, burn_up) = elementwise_ops::swiglu_grads(gate, up, dy);
            let (cpu_gate, cpu_up) = elementwise_ops::swiglu_grads(cgate, cup, cdy);
            let compared = both(
                f32_values(d_gate)?,
                f32_values(burn_gate)?,
                f32_values(cpu_gate)?,
            );
            self.record(
                "swiglu grads",
                "dgate",
                &case,
                Class::Elementwise,
                &declined,
                compared,
            );
            let compared = both(f32_values(d_up)?, f32_values(burn_up)?, f32_values(cpu_up)?);
            self.record(
                "swiglu grads",
                "dup",
                &case,
                Class::Elementwise,
                &declined,
                compared,
            );
        }
        Ok(())
    }

    /// RoPE and its inverse at both head_dims, on a contiguous `[1, H, T, D]` tensor and on the
    /// transposed view of `[1, T, H, D]` the decoder passes, at positions from 1000 on; head_dim 6
    /// takes the per-value path.
    fn rope(&mut self) -> Result<()> {
        let (seq, start, theta) = (37, 1000, 1e6f64);
        for (heads, dim) in [(14, 64), (8, 128), (3, 6)] {
            let inv_freq: Vec<f64> = (0..dim / 2)
                .map(|i| theta.powf(-((2 * i) as f64) / dim as f64))
                .collect();
            let tables = RopeTables::<B>::new(&inv_freq, start, seq, self.device);
            let (cos, sin) = (
                tables.cos.cast(self.variant.dtype()),
                tables.sin.cast(self.variant.dtype()),
            );
            let (ccos, csin) = (on_cpu(&cos), on_cpu(&sin));
            for transposed in [false, true] {
                for inverse in [false, true] {
                    let kernel = if inverse { "rope inverse" } else { "rope" };
                    let layout = if transposed {
                        "view of [1,T,H,D]"
                    } else {
                        "contiguous"
                    };
                    let case = format!("d{dim} H{heads} T{seq} {layout}");
                    if !self.wants(kernel, &case) {
                        continue;
                    }
                    let x = if transposed {
                        self.input([1, seq, heads, dim], Draw::Normal(1.0))
                            .swap_dims(1, 2)
                    } else {
                        self.input([1, heads, seq, dim], Draw::Normal(1.0))
                    };
                    let cx = on_cpu(&x);
                    let (ours, declined) =
                        self.ours(|| B::rope(x.clone(), cos.clone(), sin.clone(), inverse))?;
                    let compared = both(
                        f32_values(ours)?,
                        f32_values(elementwise_ops::rope(
                            x.clone(),
                            cos.clone(),
                            sin.clone(),
                            inverse,
                        ))?,
                        f32_values(elementwise_ops::rope(
                            cx,
                            ccos.clone(),
                            csin.clone(),
                            inverse,
                        ))?,
                    );
                    self.record(kernel, "y", &case, Class::Elementwise, &declined, compared);
                }
            }
        }
        Ok(())
    }

    /// The distillation KL per token and its student gradient, at a small vocabulary, at one
    /// that is not a multiple of the block (per-value path) and at Qwen's, against burn's ops on
    /// the GPU and the definition in f64 on the CPU; and a student near its teacher (KL ~4e-3, as
    /// early in distillation) that rules some tokens out (`-inf` logits).
    fn token_kl(&mut self) -> Result<()> {
        let cases = [
            ([2, 19, 1000], false),
            ([1, 7, 49153], false),
            ([1, 3, 151936], false),
            ([1, 5, 151936], true),
        ];
        for (shape, near_teacher) in cases {
            let case = if near_teacher {
                format!("{shape:?} near teacher")
            } else {
                format!("{shape:?}")
            };
            if !self.wants("token_kl", &case) {
                continue;
            }
            // The near-teacher KL is a small difference; its gradient sums no less than the other
            // cases' but is compared against burn's f32 sums over 152K terms (as `Reduction`).
            let (student, teacher, kl_class, grad_class) = if near_teacher {
                let student = self.values(shape, Draw::Normal(3.0));
                let noise = self.values(shape, Draw::Normal(0.1));
                let teacher = student.iter().zip(&noise).map(|(s, n)| s + n).collect();
                let ruled_out = student
                    .iter()
                    .enumerate()
                    .map(|(i, &s)| if i % 1009 == 0 { f32::NEG_INFINITY } else { s })
                    .collect();
                // A KL of ~4e-3 from sums of ~1e5 terms: f32 summation order shows in it.
                (
                    self.tensor(ruled_out, shape),
                    self.tensor(teacher, shape),
                    Class::SmallDifference,
                    Class::Reduction,
                )
            } else {
                (
                    self.input(shape, Draw::Normal(3.0)),
                    self.input(shape, Draw::Normal(3.0)),
                    Class::Elementwise,
                    Class::Elementwise,
                )
            };
            let per_token = self.input([shape[0], shape[1]], Draw::Normal(1.0));
            let (kl_f64, grad_f64) = token_kl_f64(
                &f32_values(student.clone())?,
                &f32_values(teacher.clone())?,
                &f32_values(per_token.clone())?,
                shape[2],
            );

            let (ours, declined) = self.ours(|| B::token_kl(student.clone(), teacher.clone()))?;
            let ours = f32_values(ours)?;
            let burn = f32_values(elementwise_ops::token_kl(student.clone(), teacher.clone()))?;
            let compared = [
                (Reference::BurnGpu, ours.clone(), burn),
                (Reference::CpuF64, ours, kl_f64),
            ];
            self.record("token_kl", "kl", &case, kl_class, &declined, compared);

            let (ours, declined) = self.ours(|| {
                B::token_kl_student_grad(student.clone(), teacher.clone(), per_token.clone())
            })?;
            let ours = f32_values(ours)?;
            let burn = f32_values(elementwise_ops::token_kl_student_grad(
                student, teacher, per_token,
            ))?;
            let compared = [
                (Reference::BurnGpu, ours.clone(), burn),
                (Reference::CpuF64, ours, grad_f64),
            ];
            self.record(
                "token_kl grad",
                "dstudent",
                &case,
                grad_class,
                &declined,
                compared,
            );
        }
        Ok(())
    }
}

/// KL(softmax(s) ‖ softmax(t)) of each row of `vocab` logits and its student gradient
/// `grad · p_s (log p_s - log p_t - KL)` for the per-row `grad`, in f64 (0 where `p_s` is 0).
fn token_kl_f64(
    student: &[f32],
    teacher: &[f32],
    grad: &[f32],
    vocab: usize,
) -> (Vec<f32>, Vec<f32>) {
    fn log_sum_exp(x: &[f32]) -> f64 {
        let max = x
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        max + x
            .iter()
            .map(|&v| (f64::from(v) - max).exp())
            .sum::<f64>()
            .ln()
    }
    let mut kl = Vec::with_capacity(grad.len());
    let mut d_student = Vec::with_capacity(student.len());
    for ((s, t), &g) in student.chunks(vocab).zip(teacher.chunks(vocab)).zip(grad) {
        let (lse_s, lse_t) = (log_sum_exp(s), log_sum_exp(t));
        // (p_s, log p_s - log p_t) per entry
        let terms: Vec<(f64, f64)> = s
            .iter()
            .zip(t)
            .map(|(&sv, &tv)| {
                let log_s = f64::from(sv) - lse_s;
                (log_s.exp(), log_s - (f64::from(tv) - lse_t))
            })
            .collect();
        let row: f64 = terms
            .iter()
            .map(|&(p, diff)| if p > 0.0 { p * diff } else { 0.0 })
            .sum();
        kl.push(row as f32);
        d_student.extend(terms.iter().map(|&(p, diff)| {
            if p > 0.0 {
                (f64::from(g) * p * (diff - row)) as f32
            } else {
                0.0
            }
        }));
    }
    (kl, d_student)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU check of `got` against `want`.
    fn check(got: &[f32], want: &[f32]) -> Check {
        let device = Default::default();
        let mut suite = Suite::<Cpu> {
            variant: Variant::F32,
            device: &device,
            filter: None,
            burn_gpu: true,
            kernels_ran: &|| None,
            rng: Rng(1),
            checks: Vec::new(),
        };
        let compared = both(got.to_vec(), want.to_vec(), want.to_vec());
        suite.record("k", "y", "c", Class::Elementwise, &None, compared);
        suite.checks.remove(1)
    }

    #[test]
    fn a_result_off_by_more_than_the_tolerance_fails() {
        let want = [1.0, -2.0, 4.0];
        assert!(check(&want, &want).pass);
        let c = check(&[1.0, -2.0, 4.001], &want);
        assert!(!c.pass, "{c:?}");
        assert!((c.diff - 0.001 / 4.0).abs() < 1e-6);
    }

    #[test]
    fn non_finite_and_misshapen_results_fail() {
        let want = [1.0, 2.0];
        let nan = check(&[f32::NAN, 2.0], &want);
        assert!(!nan.pass && nan.diff.is_infinite());
        assert!(!check(&[f32::INFINITY, 2.0], &want).pass);
        let short = check(&[1.0], &want);
        assert!(!short.pass && short.note.unwrap().contains("1 values"));
    }

    #[test]
    fn a_kernel_that_did_not_run_fails() {
        let not_ran = || Some("our kernel did not run".to_string());
        let checks = run_checks::<Cpu>(
            Variant::F32,
            &Default::default(),
            Some("[1, 5, 1001]"),
            true,
            &not_ran,
        )
        .unwrap();
        assert_eq!(
            checks.len(),
            6,
            "swiglu forward and two gradients, two references"
        );
        assert!(checks.iter().all(|c| !c.pass && c.diff.is_nan()));
    }

    /// The whole suite on the CPU, where the backend's path is burn's ops: every kernel and
    /// shape class is present and every check compares (and passes) with the f32 tolerances.
    #[test]
    fn the_suite_covers_every_kernel_and_shape_class() {
        let checks =
            run_checks::<Cpu>(Variant::F32, &Default::default(), None, true, &|| None).unwrap();
        // Here "ours" is burn's ops, whose f32 sums lose ~1.7e-4 of the near-teacher KL: the
        // bound there is our kernel's (5e-5), so burn's result is held to 1e-3 instead.
        let (burns_sums, checks): (Vec<Check>, Vec<Check>) = checks
            .into_iter()
            .partition(|c| !c.pass && c.case.ends_with("near teacher"));
        assert!(burns_sums.iter().all(|c| c.diff <= 1e-3), "{burns_sums:?}");
        let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "{failed:?}");
        for kernel in [
            "attention forward",
            "attention backward",
            "linear",
            "linear input grad",
            "linear weight grad",
            "rms_norm",
            "rms_norm grad",
            "swiglu",
            "swiglu grads",
            "rope",
            "rope inverse",
            "token_kl",
            "token_kl grad",
        ] {
            assert!(
                checks.iter().any(|c| c.kernel == kernel),
                "{kernel} missing"
            );
        }
        for class in [
            "d64", "d128", "g1", "g4", "g8", "w0", "w16", "w>T", "no-bias", "T200", "q72@128",
            "chunked",
        ] {
            assert!(
                checks
                    .iter()
                    .any(|c| c.kernel.starts_with("attention") && c.case.contains(class)),
                "attention {class} missing"
            );
        }
        assert!(checks.iter().any(|c| c.output == "dbias"));
        let text = report(&checks);
        assert!(
            text.contains("attention backward") && !text.contains("FAIL"),
            "{text}"
        );
    }

    #[test]
    fn cpu_only_compares_with_the_cpu_alone() {
        let device = Default::default();
        let checks = run_checks::<Cpu>(
            Variant::F32,
            &device,
            Some("d64 g4 T200 w16"),
            false,
            &|| None,
        )
        .unwrap();
        assert!(!checks.is_empty());
        assert!(
            checks
                .iter()
                .all(|c| c.reference == Reference::CpuF32 && c.pass)
        );
        let outputs: Vec<&str> = checks.iter().map(|c| c.output.as_str()).collect();
        assert!(
            ["out", "lse", "dq", "dk", "dv", "dbias"]
                .iter()
                .all(|o| outputs.contains(o))
        );
    }

    /// The f64 KL reference agrees with burn's f32 ops where f32 is accurate (a small
    /// vocabulary), including a student logit of -inf (no probability: 0 in both).
    #[test]
    fn the_f64_kl_reference_matches_burns_ops_at_a_small_vocabulary() {
        let (rows, vocab) = (6, 50);
        let value = |i: usize, scale: f32| (i as f32 * 0.37).sin() * scale;
        let mut student: Vec<f32> = (0..rows * vocab).map(|i| value(i, 3.0)).collect();
        student[7] = f32::NEG_INFINITY;
        let teacher: Vec<f32> = (0..rows * vocab).map(|i| value(i + 11, 2.0)).collect();
        let grad: Vec<f32> = (0..rows).map(|i| value(i + 3, 1.0)).collect();
        let (kl, d_student) = token_kl_f64(&student, &teacher, &grad, vocab);

        let device = Default::default();
        let tensor = |v: &[f32], shape: [usize; 3]| {
            Tensor::<Cpu, 3>::from_data(TensorData::new(v.to_vec(), shape), &device)
        };
        let (s, t) = (
            tensor(&student, [2, 3, vocab]),
            tensor(&teacher, [2, 3, vocab]),
        );
        let g = Tensor::<Cpu, 2>::from_data(TensorData::new(grad, [2, 3]), &device);
        let burn_kl = f32_values(elementwise_ops::token_kl(s.clone(), t.clone())).unwrap();
        let burn_grad = f32_values(elementwise_ops::token_kl_student_grad(s, t, g)).unwrap();
        assert!(difference(&kl, &burn_kl, Measure::Rel) < 1e-5);
        assert!(difference(&d_student, &burn_grad, Measure::Rel) < 1e-5);
        assert_eq!(d_student[7], 0.0);
        assert!(kl.iter().all(|v| v.is_finite() && *v > 0.0));
    }

    #[test]
    fn the_report_names_each_failure() {
        let mut c = check(&[1.0, 3.0], &[1.0, 2.0]);
        c.case = "d64 g8 T200 w16".into();
        let text = report(&[c]);
        assert!(
            text.contains("FAIL (1)") && text.contains("failed checks:"),
            "{text}"
        );
        assert!(text.contains("d64 g8 T200 w16"), "{text}");
    }
}
