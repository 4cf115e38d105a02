//! The recipe: one TOML file describing a retrofit run, validated once, with command-line
//! overrides (`--set train.lr=1e-5`). Unknown keys are errors; every error names the key.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::dataset::DataConfig;
use crate::dms::losses::CompressionLoss;
use crate::dms::{CompressionSchedule, DmsConfig, Granularity, Variant};

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub model: ModelSection,
    pub data: DataConfig,
    #[serde(default)]
    pub dms: DmsSection,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub run: RunSection,
}

/// `[model]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face folder (relative to the recipe file) or hub id `org/name[@revision]`.
    pub source: String,
    /// `auto` (f32 on the CPU, bf16 on CUDA), `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

fn default_dtype() -> String {
    "auto".into()
}

/// `[dms]`: the method's settings and the compression schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DmsSection {
    pub variant: Variant,
    pub granularity: Granularity,
    pub window: usize,
    pub tau: f64,
    pub alpha_scale: f64,
    pub offset: f64,
    pub cr_start: f64,
    pub cr_final: f64,
    /// Step at which `cr_final` is reached; give this or `steps_per_cr`.
    pub final_step: Option<u64>,
    /// Steps per unit of CR (paper: 100, official recipe: 34).
    pub steps_per_cr: Option<f64>,
    pub compression_weight: f64,
    /// `hinge` (official, one-sided) or `two_sided`.
    pub compression_loss: CompressionLoss,
}

impl Default for DmsSection {
    fn default() -> Self {
        let dms = DmsConfig::default();
        Self {
            variant: dms.variant,
            granularity: dms.granularity,
            window: dms.window,
            tau: dms.tau,
            alpha_scale: dms.alpha_scale,
            offset: dms.offset,
            cr_start: 1.0,
            cr_final: 8.0,
            final_step: None,
            steps_per_cr: None,
            compression_weight: 1.0,
            compression_loss: CompressionLoss::Hinge,
        }
    }
}

impl DmsSection {
    pub fn config(&self) -> DmsConfig {
        DmsConfig {
            variant: self.variant,
            granularity: self.granularity,
            window: self.window,
            tau: self.tau,
            alpha_scale: self.alpha_scale,
            offset: self.offset,
        }
    }

    pub fn schedule(&self) -> CompressionSchedule {
        match (self.final_step, self.steps_per_cr) {
            (Some(final_step), _) => CompressionSchedule {
                cr_start: self.cr_start,
                cr_final: self.cr_final,
                final_step,
            },
            (None, steps) => CompressionSchedule::from_steps_per_cr(
                self.cr_start,
                self.cr_final,
                steps.unwrap_or(100.0),
            ),
        }
    }
}

/// Which parameters the optimizer updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trainable {
    /// Only the DMS adapter (the official recipe).
    #[serde(rename = "adapter")]
    Adapter,
    /// The adapter plus q/k/v/o projections and q/k norms.
    #[serde(rename = "adapter+attention")]
    AdapterAndAttention,
    /// Every weight (the paper's recipe).
    #[serde(rename = "all")]
    All,
}

/// How the learning rate moves after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Cosine,
    Linear,
}

/// `[train]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub trainable: Trainable,
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub warmup_steps: u64,
    pub lr_schedule: LrSchedule,
    /// Floor of the cosine / linear decay, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip; 0 disables.
    pub grad_clip: f64,
    pub micro_batch: usize,
    pub grad_accum: usize,
    pub max_steps: u64,
    pub seed: u64,
    /// Positions per chunk of the KL computation (bounds the logits held at once).
    pub kl_chunk: usize,
    /// Keep only each layer's input between the student's forward and backward, re-running one
    /// layer at a time in the backward (activation checkpointing): same gradients, one more
    /// student forward, a fraction of the memory.
    pub recompute_layers: bool,
    /// With `recompute_layers`: the last N layers keep their autodiff graph (all their
    /// activations) instead of being re-run in the backward: one more layer's activations of
    /// memory and one less layer forward of time each. 0 recomputes every layer; the number of
    /// layers keeps every graph (the memory of `recompute_layers = false`).
    pub graph_layers: usize,
    /// Keep only each MLP's input (before its RMSNorm) between the forward and the backward and
    /// recompute the norm and the gate and up projections there (two more GEMMs and one norm
    /// per layer, about half of a layer's kept activations less). Has no effect with
    /// `recompute_layers`, which keeps less already.
    pub recompute_mlp: bool,
}

impl Default for TrainSection {
    /// The official recipe's optimizer: AdamW 3e-5 constant, betas (0.9, 0.95), clip 1.0.
    fn default() -> Self {
        Self {
            trainable: Trainable::Adapter,
            lr: 3e-5,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            min_lr_ratio: 0.1,
            grad_clip: 1.0,
            micro_batch: 1,
            grad_accum: 1,
            max_steps: 1000,
            seed: 0,
            kl_chunk: 1024,
            recompute_layers: false,
            graph_layers: 0,
            recompute_mlp: true,
        }
    }
}

impl TrainSection {
    /// Learning rate for a (0-based) step: linear warmup, then the chosen decay to
    /// `min_lr_ratio * lr` at `max_steps`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.max_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.lr_schedule {
            LrSchedule::Constant => self.lr,
            LrSchedule::Linear => self.lr - (self.lr - floor) * progress,
            LrSchedule::Cosine => {
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// `[run]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Data-parallel ranks, one per device (`["cpu", "cpu"]`: simulated ranks in one process);
    /// empty: one rank on `device`. `train.grad_accum` stays the global number of micro-batches
    /// per step, split evenly over the ranks, so the run does not change with the device count.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// With several ranks, each keeps the AdamW moments of its share of the trainable parameters
    /// only (ZeRO-1); same weights, 1/N of the optimizer memory per rank.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shard_optimizer: bool,
    /// Run folder (relative to the current directory).
    pub output_dir: PathBuf,
    /// Save a resumable checkpoint every N steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Evaluate on held-out data every N steps (0: only at the end).
    pub eval_every: u64,
    /// Held-out sequences per evaluation.
    pub eval_sequences: usize,
    /// Checkpoints kept (older ones are deleted); `cr-K` snapshots are always kept.
    pub keep_last: usize,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            devices: Vec::new(),
            shard_optimizer: false,
            output_dir: PathBuf::from("runs/default"),
            checkpoint_every: 100,
            eval_every: 100,
            eval_sequences: 8,
            keep_last: 2,
        }
    }
}

impl Recipe {
    /// Reads a recipe, applies `key=value` overrides, validates it.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read recipe '{}'", path.display()))?;
        Self::parse(&text, overrides).with_context(|| format!("in recipe '{}'", path.display()))
    }

    /// Parses recipe text with overrides.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        for item in overrides {
            apply_override(&mut value, item)?;
        }
        let recipe: Recipe = Recipe::deserialize(toml::Value::Table(value))
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Range and consistency checks serde cannot express.
    pub fn validate(&self) -> Result<()> {
        let d = &self.dms;
        let t = &self.train;
        let check = |ok: bool, message: &str| if ok { Ok(()) } else { bail!("{message}") };
        // Every number must be finite first: `inf > 0` would pass the range checks below.
        let numbers = [
            ("dms.tau", d.tau),
            ("dms.alpha_scale", d.alpha_scale),
            ("dms.offset", d.offset),
            ("dms.cr_start", d.cr_start),
            ("dms.cr_final", d.cr_final),
            ("dms.steps_per_cr", d.steps_per_cr.unwrap_or(1.0)),
            ("dms.compression_weight", d.compression_weight),
            ("train.lr", t.lr),
            ("train.betas", t.betas[0]),
            ("train.betas", t.betas[1]),
            ("train.eps", t.eps),
            ("train.weight_decay", t.weight_decay),
            ("train.min_lr_ratio", t.min_lr_ratio),
            ("train.grad_clip", t.grad_clip),
            ("data.heldout_fraction", self.data.heldout_fraction),
        ];
        for (key, value) in numbers {
            check(
                value.is_finite(),
                &format!("{key} = {value} must be a finite number"),
            )?;
        }
        check(
            t.graph_layers == 0 || t.recompute_layers,
            "train.graph_layers applies only with train.recompute_layers = true (without it every layer keeps its graph already)",
        )?;
        check(d.tau > 0.0, "dms.tau must be > 0")?;
        check(d.alpha_scale > 0.0, "dms.alpha_scale must be > 0")?;
        check(d.cr_start >= 1.0, "dms.cr_start must be >= 1")?;
        check(
            d.cr_final >= d.cr_start,
            "dms.cr_final must be >= dms.cr_start",
        )?;
        check(
            !(d.final_step.is_some() && d.steps_per_cr.is_some()),
            "give dms.final_step or dms.steps_per_cr, not both",
        )?;
        check(
            d.steps_per_cr.is_none_or(|s| s > 0.0),
            "dms.steps_per_cr must be > 0",
        )?;
        check(
            d.compression_weight >= 0.0,
            "dms.compression_weight must be >= 0",
        )?;
        check(
            !(d.variant == Variant::QNeuron && t.trainable == Trainable::Adapter),
            "train.trainable = \"adapter\" trains nothing for dms.variant = \"q_neuron\" (it has no \
             adapter); use \"adapter+attention\" or \"all\"",
        )?;
        check(t.lr > 0.0, "train.lr must be > 0")?;
        check(
            t.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "train.betas must both lie in [0, 1)",
        )?;
        check(t.eps > 0.0, "train.eps must be > 0")?;
        check(t.weight_decay >= 0.0, "train.weight_decay must be >= 0")?;
        check(
            (0.0..=1.0).contains(&t.min_lr_ratio),
            "train.min_lr_ratio must lie in [0, 1]",
        )?;
        check(
            t.grad_clip >= 0.0,
            "train.grad_clip must be >= 0 (0 disables)",
        )?;
        check(t.micro_batch >= 1, "train.micro_batch must be >= 1")?;
        check(t.grad_accum >= 1, "train.grad_accum must be >= 1")?;
        check(t.max_steps >= 1, "train.max_steps must be >= 1")?;
        check(t.kl_chunk >= 1, "train.kl_chunk must be >= 1")?;
        check(
            matches!(self.model.dtype.as_str(), "auto" | "f32" | "bf16" | "f16"),
            "model.dtype must be one of: auto, f32, bf16, f16",
        )?;
        self.device()?;
        let devices = self.devices()?;
        let ranks = devices.len();
        if !t.grad_accum.is_multiple_of(ranks) {
            bail!(
                "train.grad_accum = {} must be a multiple of the {ranks} devices in run.devices \
                 (it is the global number of micro-batches per step, split evenly over the ranks); \
                 use train.grad_accum = {}",
                t.grad_accum,
                t.grad_accum.div_ceil(ranks) * ranks
            );
        }
        use crate::backend::DeviceSpec;
        let on_cpu = devices.iter().filter(|d| **d == DeviceSpec::Cpu).count();
        if on_cpu != 0 && on_cpu != ranks {
            bail!("run.devices mixes the CPU with GPUs; use one kind of device");
        }
        let mut gpus: Vec<String> = devices
            .iter()
            .filter(|d| **d != DeviceSpec::Cpu)
            .map(|d| d.to_string())
            .collect();
        gpus.sort();
        if let Some(twice) = gpus.windows(2).find(|w| w[0] == w[1]) {
            bail!("run.devices names {} twice; one rank per GPU", twice[0]);
        }
        check(self.run.keep_last >= 1, "run.keep_last must be >= 1")?;
        check(
            self.run.eval_sequences >= 1,
            "run.eval_sequences must be >= 1 (held-out sequences per evaluation)",
        )?;
        check(
            !self.run.output_dir.as_os_str().is_empty(),
            "run.output_dir must name a folder (it is empty)",
        )?;
        Ok(())
    }

    /// The devices of the data-parallel ranks (`run.devices`, else `run.device` alone).
    pub fn devices(&self) -> Result<Vec<crate::backend::DeviceSpec>> {
        if self.run.devices.is_empty() {
            return Ok(vec![self.device()?]);
        }
        self.run
            .devices
            .iter()
            .map(|d| d.parse().with_context(|| "run.devices".to_string()))
            .collect()
    }

    pub fn device(&self) -> Result<crate::backend::DeviceSpec> {
        self.run
            .device
            .parse()
            .with_context(|| "run.device".to_string())
    }

    /// The recipe as TOML, as saved into the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a recipe always serialises")
    }
}

/// Applies `section.key=value`; the value is parsed as TOML (number, bool, array, quoted string)
/// and otherwise taken as a bare string.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<()> {
    let (path, raw) = item
        .split_once('=')
        .with_context(|| format!("--set '{item}' must look like section.key=value"))?;
    let parts: Vec<&str> = path.trim().split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set '{item}': key path '{path}' is empty somewhere");
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let mut current = table;
    for part in &parts[..parts.len() - 1] {
        current = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .with_context(|| format!("--set '{item}': '{part}' is not a section"))?;
    }
    current.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
source = "data/tiny-llama"
[data]
train_files = ["data/shakespeare/train.jsonl"]
seq_len = 64
"#;

    fn err(text: &str, overrides: &[&str]) -> String {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        format!("{:#}", Recipe::parse(text, &overrides).unwrap_err())
    }

    #[test]
    fn defaults_are_the_official_recipe() {
        let r = Recipe::parse(MINIMAL, &[]).unwrap();
        assert_eq!(r.dms.window, 512);
        assert_eq!(r.train.lr, 3e-5);
        assert_eq!(r.train.betas, [0.9, 0.95]);
        assert_eq!(r.dms.schedule().final_step, 700);
        assert!(r.train.recompute_mlp && !r.train.recompute_layers);
    }

    #[test]
    fn overrides_apply_and_are_typed() {
        let sets = [
            "train.lr=1e-5".to_string(),
            "dms.variant=q_neuron".to_string(),
            "train.trainable=\"adapter+attention\"".to_string(),
            "run.device=cpu".to_string(),
            "dms.steps_per_cr=34".to_string(),
            "train.recompute_mlp=false".to_string(),
        ];
        let r = Recipe::parse(MINIMAL, &sets).unwrap();
        assert_eq!(r.train.lr, 1e-5);
        assert!(!r.train.recompute_mlp);
        assert_eq!(r.dms.variant, Variant::QNeuron);
        assert_eq!(r.dms.schedule().final_step, 238);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let e = err(MINIMAL, &["train.lrr=1"]);
        assert!(e.contains("lrr") && e.contains("lr"), "{e}");
        let e = err(MINIMAL, &["dms.variant=magic"]);
        assert!(e.contains("magic") && e.contains("q_neuron"), "{e}");
        let e = err(MINIMAL, &["dms.tau=0"]);
        assert!(e.contains("dms.tau"), "{e}");
        let e = err(MINIMAL, &["train.graph_layers=4"]);
        assert!(e.contains("train.recompute_layers = true"), "{e}");
        let r = Recipe::parse(
            MINIMAL,
            &[
                "train.graph_layers=4".into(),
                "train.recompute_layers=true".into(),
            ],
        )
        .unwrap();
        assert_eq!(r.train.graph_layers, 4);
        let e = err(MINIMAL, &["dms.final_step=10", "dms.steps_per_cr=5"]);
        assert!(e.contains("not both"), "{e}");
        let e = err(MINIMAL, &["run.device=tpu"]);
        assert!(e.contains("tpu") && e.contains("cuda:N"), "{e}");
        let e = err(MINIMAL, &["dms.variant=q_neuron"]);
        assert!(e.contains("train.trainable"), "{e}");
        let e = err(&MINIMAL.replace("[model]", "[modle]"), &[]);
        assert!(e.contains("modle"), "{e}");
        let e = err(MINIMAL, &["train.lr"]);
        assert!(e.contains("section.key=value"), "{e}");
        for (set, key) in [
            ("train.lr=inf", "train.lr"),
            ("train.lr=nan", "train.lr"),
            ("dms.tau=inf", "dms.tau"),
            ("run.eval_sequences=0", "run.eval_sequences"),
            ("run.output_dir=\"\"", "run.output_dir"),
        ] {
            let e = err(MINIMAL, &[set]);
            assert!(e.contains(key), "{set}: {e}");
        }
    }

    #[test]
    fn lr_schedule_warms_up_and_decays_to_the_floor() {
        let t = TrainSection {
            lr: 1.0,
            warmup_steps: 10,
            max_steps: 110,
            lr_schedule: LrSchedule::Cosine,
            min_lr_ratio: 0.1,
            ..TrainSection::default()
        };
        assert!((t.lr_at(0) - 0.1).abs() < 1e-12);
        assert!((t.lr_at(9) - 1.0).abs() < 1e-12);
        assert!((t.lr_at(10) - 1.0).abs() < 1e-12);
        assert!((t.lr_at(110) - 0.1).abs() < 1e-12);
    }
}
