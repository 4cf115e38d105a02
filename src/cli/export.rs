//! `dms-retrofit export RUN[/cr-K|/checkpoints/step-N] --out DIR`

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::checkpoint::SafetensorsStore;
use crate::checkpoint::export::{ExportOptions, ExportedDms, write_export};
use crate::model::FloatFormat;
use crate::run::snapshot::{self, SnapshotState};
use crate::run::{locate_snapshot, open_base, run_of};

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A run folder (its newest checkpoint), `RUN/cr-K`, or `RUN/checkpoints/step-N`.
    pub snapshot: PathBuf,
    /// The Hugging Face folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype of the export: bf16 (default), f16 or f32.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Largest shard, e.g. 5GB, 500MB, 2GiB; larger exports get model.safetensors.index.json.
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses sizes like `5GB` (10^9), `2GiB` (2^30), `500MB`, `1024`.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .with_context(|| format!("size '{text}' must start with a number, e.g. 5GB"))?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024f64.powi(2),
        "GIB" => 1024f64.powi(3),
        other => {
            bail!("size unit '{other}' in '{text}' is not one of B, KB, MB, GB, KiB, MiB, GiB")
        }
    };
    let bytes = (value * scale) as u64;
    if bytes == 0 {
        bail!("--max-shard-size must be positive");
    }
    Ok(bytes)
}

fn model_card(
    state: &SnapshotState,
    snapshot_dir: &Path,
    recipe: &str,
    dtype: FloatFormat,
) -> String {
    let metric = |k: &str| {
        state
            .last_metrics
            .get(k)
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "not measured".into())
    };
    let d = &state.dms;
    format!(
        "---\nbase_model: {base}\ntags:\n- dms\n- kv-cache-compression\n- dms-retrofit\n---\n\n\
# {base} + DMS (CR {cr:.1})\n\n\
This is `{base}` retrofitted with **Dynamic Memory Sparsification** (DMS; Łańcucki et al., \
NeurIPS 2025) by [dms-retrofit](https://github.com/): every attention layer learned which tokens \
each KV head may evict, with a delayed-eviction window of {w} tokens. The KV cache shrinks by \
the compression ratio below while answers stay close to the original model.\n\n\
| | |\n|---|---|\n\
| base model | `{base}` |\n\
| DMS variant | {variant:?} (per {gran:?}) |\n\
| window | {w} |\n\
| alpha_scale / offset / tau | {s} / {o} / {tau} |\n\
| training steps | {steps} |\n\
| target CR (schedule) | {cr:.2} |\n\
| achieved training CR | {train_cr} |\n\
| measured inference CR (held-out) | {eval_cr} |\n\
| KL to the original (held-out, hard eviction) | {eval_kl} |\n\
| weights | {dtype} |\n\
| exported from | `{snap}` |\n\n\
## Loading\n\n\
- dms-retrofit: `dms-retrofit generate THIS_FOLDER --prompt ...` or `dms-retrofit eval THIS_FOLDER \
--data FILE` use the DMS eviction (settings from `config.json`'s `dms_*` keys).\n\
- transformers: `AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` loads it as the base \
architecture with **no eviction** (the `dms_proj_alpha*` tensors are reported as unused).\n\
- DMS-aware loaders read `dms_window_size`, `dms_alpha_scale`, `dms_initial_alpha_offset`, \
`dms_separate_alpha`, `dms_alpha_per`, `dms_tau` and `dms_paged_attention_block_size` as the \
official NVIDIA Model-Optimizer export does.\n\n\
## Recipe\n\n```toml\n{recipe}```\n",
        base = state.base_source,
        cr = state.scheduled_cr,
        w = d.window,
        variant = d.variant,
        gran = d.granularity,
        s = d.alpha_scale,
        o = d.offset,
        tau = d.tau,
        steps = state.step,
        train_cr = metric("train_cr"),
        eval_cr = metric("eval_cr"),
        eval_kl = metric("eval_kl"),
        dtype = dtype.torch_name(),
        snap = snapshot_dir.display(),
    )
}

pub fn run(args: ExportArgs) -> Result<()> {
    let dtype = FloatFormat::parse(&args.dtype)
        .with_context(|| format!("--dtype '{}' must be bf16, f16 or f32", args.dtype))?;
    let max_shard_bytes = parse_size(&args.max_shard_size)?;
    let dir = locate_snapshot(&args.snapshot)?;
    let state = snapshot::read_state(&dir)?;
    let base = open_base(&state)?;
    let recipe = std::fs::read_to_string(dir.join(snapshot::RECIPE_FILE)).unwrap_or_default();
    let mut trained =
        SafetensorsStore::open(&[dir.join(snapshot::TRAINABLE_FILE)], FloatFormat::F32)?;
    let dms = ExportedDms {
        config: state.dms.clone(),
        cr: state.scheduled_cr,
        base: Some(state.base_origin()),
    };
    let card = model_card(&state, &dir, &recipe, dtype);
    let options = ExportOptions {
        out: args.out.clone(),
        dtype,
        max_shard_bytes,
        force: args.force,
        sources: [Some(dir.clone()), run_of(&dir)]
            .into_iter()
            .flatten()
            .collect(),
    };
    let report = write_export(&base, &mut trained, &dms, &card, &options)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "exported {} (step {}, CR {:.2}) to {}: {} tensors in {} shard(s), {} trained, {} copied \
             unchanged, {} converted to {}",
            dir.display(),
            state.step,
            state.scheduled_cr,
            report.out.display(),
            report.tensors,
            report.shards,
            report.trained,
            report.copied_unchanged,
            report.converted,
            dtype.torch_name()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 * 1024 * 1024 * 1024);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }
}
