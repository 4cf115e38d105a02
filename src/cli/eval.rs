//! `dms-retrofit eval MODEL --data FILE`: perplexity and KL to the original model under inference
//! eviction, measured CR per layer and KV head at several sequence lengths, and training-free
//! baselines (StreamingLLM, TOVA, H2O) evicting to the same budget, all on the same text.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use super::loading::load_model;
use super::{ComputeArgs, on_backend};
use crate::data::dataset::DataKeys;
use crate::data::{DataConfig, Dataset};
use crate::dms::DmsConfig;
use crate::eval::quality::{Totals, score, score_baseline, score_dms, teacher_logits};
use crate::eval::{Budget, Decoding, Policy};
use crate::model::FloatFormat;
use crate::model::attention::AttentionBackend;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A DMS export, a run folder / snapshot, or a base checkpoint (baselines only, with --cr).
    pub model: String,
    /// Text to evaluate on: .jsonl ({"text"} per line) or .txt.
    #[arg(long, required = true)]
    pub data: Vec<PathBuf>,
    /// Sequence lengths to measure at (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub seq_len: Vec<usize>,
    /// Sequences per length.
    #[arg(long, default_value_t = 4)]
    pub max_sequences: usize,
    /// Skip the baselines (they decode token by token and take longer).
    #[arg(long)]
    pub no_baselines: bool,
    /// Budget CR for the baselines when MODEL has no DMS (otherwise DMS's measured CR is used).
    #[arg(long)]
    pub cr: Option<f64>,
    /// Folder for report.json and the layer x head heatmap (cr-heatmap-<len>.svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodRow {
    pub method: String,
    pub perplexity: f64,
    pub kl_to_original: f64,
    pub compression_ratio: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LengthReport {
    pub seq_len: usize,
    pub sequences: usize,
    pub rows: Vec<MethodRow>,
    /// Measured CR per layer (rows) and KV head (columns), DMS only.
    pub cr_per_layer_head: Option<Vec<Vec<f64>>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub data: Vec<PathBuf>,
    pub dms: Option<DmsConfig>,
    pub lengths: Vec<LengthReport>,
}

fn row(method: &str, totals: &Totals, cr: f64) -> MethodRow {
    MethodRow {
        method: method.to_string(),
        perplexity: totals.perplexity(),
        kl_to_original: totals.mean_kl(),
        compression_ratio: cr,
    }
}

pub fn run(args: EvalArgs) -> Result<()> {
    if args.seq_len.iter().any(|&l| l < 2) {
        bail!("--seq-len values must be >= 2");
    }
    if let Some(cr) = args.cr
        && !(cr.is_finite() && cr >= 1.0)
    {
        bail!("--cr {cr} must be a compression ratio >= 1 (e.g. --cr 4)");
    }
    if args.max_sequences == 0 {
        bail!("--max-sequences must be >= 1");
    }
    let (spec, format) = args.compute.resolve()?;
    let report = on_backend!(spec, format, evaluate(&args, format))?;
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("report.json");
        crate::atomic::write_file(&path, serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_report(&report);
    Ok(())
}

/// Every length's rows on backend `B`.
fn evaluate<B: AttentionBackend>(
    args: &EvalArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<Report> {
    let loaded = load_model::<B>(&args.model, format, device)?;
    let cfg = &loaded.ckpt.config;
    if let Some(&longest) = args.seq_len.iter().max()
        && longest > cfg.max_position_embeddings
    {
        bail!(
            "--seq-len {longest} exceeds the model's max_position_embeddings = {} (config.json of \
             '{}'); use lengths <= {}",
            cfg.max_position_embeddings,
            loaded.ckpt.files.dir.display(),
            cfg.max_position_embeddings
        );
    }
    let tokenizer = loaded.ckpt.tokenizer()?;
    let eos = *cfg
        .eos_token_ids
        .first()
        .context("config.json names no eos_token_id")?;
    if loaded.dms.is_none() && args.cr.is_none() {
        bail!(
            "'{}' is not a DMS model: pass --cr R to evaluate the baselines at compression R, or \
             point at a DMS export / run",
            args.model
        );
    }
    // Baselines run on the original model: the same weights with eviction off.
    let dms_for_teacher = loaded.dms.clone().unwrap_or_default();
    let plain = Decoding::new(&loaded.model, cfg, None);
    let mut report = Report {
        model: loaded.description.clone(),
        data: args.data.clone(),
        dms: loaded.dms.clone(),
        lengths: Vec::new(),
    };
    for &seq_len in &args.seq_len {
        let mut data = DataConfig::new(args.data.clone(), seq_len);
        data.heldout_fraction = 0.0;
        data.max_sequences = Some(args.max_sequences);
        data.keys = DataKeys {
            train_files: "--data",
            seq_len: "--seq-len",
        };
        let dataset = Dataset::build(
            &data,
            Path::new("."),
            &tokenizer,
            None,
            cfg.bos_token_id,
            eos,
            eos,
        )?;
        let sequences = &dataset.train;
        let mut original = Totals::default();
        let mut dms_totals = Totals::default();
        let mut retained_sum: Vec<Vec<f64>> = Vec::new();
        let mut teachers = Vec::new();
        for seq in sequences {
            let teacher = teacher_logits(&loaded.model, cfg, &dms_for_teacher, seq);
            original.add(&score(teacher.clone(), teacher.clone(), seq, &[eos]));
            if let Some(dms) = &loaded.dms {
                let (totals, retained) =
                    score_dms(&loaded.model, cfg, dms, seq, teacher.clone(), &[eos]);
                dms_totals.add(&totals);
                if retained_sum.is_empty() {
                    retained_sum = retained.iter().map(|l| vec![0.0; l.len()]).collect();
                }
                for (sum, layer) in retained_sum.iter_mut().zip(&retained) {
                    for (s, r) in sum.iter_mut().zip(layer) {
                        *s += r;
                    }
                }
            }
            teachers.push(teacher);
        }
        let n = sequences.len() as f64;
        let mut rows = vec![row("original (dense)", &original, 1.0)];
        let per_head: Option<Vec<Vec<f64>>> = (!retained_sum.is_empty()).then(|| {
            retained_sum
                .iter()
                .map(|layer| layer.iter().map(|s| n / s.max(f64::MIN_POSITIVE)).collect())
                .collect()
        });
        let dms_cr = retained_sum.iter().flatten().count() as f64 * n
            / retained_sum
                .iter()
                .flatten()
                .sum::<f64>()
                .max(f64::MIN_POSITIVE);
        if loaded.dms.is_some() {
            rows.push(row("DMS", &dms_totals, dms_cr));
        }
        if !args.no_baselines {
            let cr = args.cr.unwrap_or(dms_cr);
            let budget = Budget {
                compression_ratio: cr,
            };
            for (name, policy) in [
                ("StreamingLLM", Policy::StreamingLlm { sinks: 4 }),
                ("TOVA", Policy::Tova),
                ("H2O", Policy::H2o),
            ] {
                let mut totals = Totals::default();
                let mut crs = 0.0;
                for (seq, teacher) in sequences.iter().zip(&teachers) {
                    let (t, measured) =
                        score_baseline(&plain, policy, budget, seq, teacher.clone(), &[eos]);
                    totals.add(&t);
                    crs += measured;
                }
                rows.push(row(name, &totals, crs / n));
            }
        }
        if let (Some(dir), Some(grid)) = (&args.out, &per_head) {
            std::fs::create_dir_all(dir)?;
            crate::eval::heatmap::write_heatmap(
                grid,
                &dir.join(format!("cr-heatmap-{seq_len}.svg")),
                &format!("measured CR per layer and KV head, {seq_len} tokens"),
            )?;
        }
        report.lengths.push(LengthReport {
            seq_len,
            sequences: sequences.len(),
            rows,
            cr_per_layer_head: per_head,
        });
    }
    Ok(report)
}

fn print_report(report: &Report) {
    println!("{}", report.model);
    for length in &report.lengths {
        println!();
        println!("{} tokens x {} sequences", length.seq_len, length.sequences);
        println!(
            "  {:<18} {:>12} {:>14} {:>8}",
            "method", "perplexity", "KL(orig)", "CR"
        );
        for r in &length.rows {
            println!(
                "  {:<18} {:>12.4} {:>14.5} {:>8.2}",
                r.method, r.perplexity, r.kl_to_original, r.compression_ratio
            );
        }
        if let Some(grid) = &length.cr_per_layer_head {
            println!("  measured CR per layer (KV heads left to right):");
            for (i, layer) in grid.iter().enumerate() {
                let cells: Vec<String> = layer.iter().map(|c| format!("{c:5.2}")).collect();
                println!("    layer {i:>3}: {}", cells.join(" "));
            }
        }
    }
}
