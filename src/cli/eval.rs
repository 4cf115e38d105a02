//! `dms-retrofit eval MODEL --data FILE`: perplexity and KL to the original model under inference
//! eviction, measured CR per layer and KV head at several sequence lengths, and training-free
//! baselines (StreamingLLM, TOVA, H2O) evicting to the same budget, all on the same text.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::loading::{load_model, load_original};
use super::{ComputeArgs, on_backend};
use crate::data::dataset::DataKeys;
use crate::data::{DataConfig, Dataset};
use crate::eval::report::{Baselines, Models, Report, Settings, evaluate_length};
use crate::model::FloatFormat;
use crate::ops::attention::AttentionBackend;

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
    /// Skip the baselines.
    #[arg(long)]
    pub no_baselines: bool,
    /// Positions per eviction decision of the baselines; 1 decides before every token (exact,
    /// slowest). Default: 1/16 of the budget at the sequence's end, so a chunk adds at most ~6%
    /// to the entries a query sees (the reported CR counts them).
    #[arg(long)]
    pub baseline_chunk: Option<usize>,
    /// Sequences per forward pass. Default: as many as fit 16,384 tokens.
    #[arg(long)]
    pub batch: Option<usize>,
    /// The original model the retrofit is compared with (its perplexity row, the baselines, the
    /// KL): a base checkpoint folder or hub id, or `self` for MODEL with eviction off. Default:
    /// the recorded base checkpoint when training changed its weights (`train.trainable` beyond
    /// `adapter`), else MODEL with eviction off (the same weights).
    #[arg(long, value_name = "BASE|self")]
    pub original: Option<String>,
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

/// Tokens per forward pass when `--batch` is not given.
const BATCH_TOKENS: usize = 16_384;

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
    if args.baseline_chunk == Some(0) || args.batch == Some(0) {
        bail!("--baseline-chunk and --batch must be >= 1");
    }
    let (spec, format) = args.compute.resolve()?;
    let report = on_backend!(spec, format, evaluate(&args, format))?;
    crate::backend::check_device_work()?;
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
    let original = load_original(&loaded, args.original.as_deref(), format, device)?;
    let mut report = Report {
        model: loaded.description.clone(),
        original: match &original {
            Some(o) => o.description.clone(),
            None => "the model itself with eviction off".to_string(),
        },
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
        let settings = Settings {
            batch: args.batch.unwrap_or((BATCH_TOKENS / seq_len).max(1)),
            baselines: match (args.no_baselines, args.cr) {
                (true, _) => Baselines::None,
                (false, Some(cr)) => Baselines::AtCr(cr),
                (false, None) => Baselines::AtDmsCr,
            },
            baseline_chunk: args.baseline_chunk.unwrap_or(0),
        };
        let started = std::time::Instant::now();
        let models = Models {
            model: &loaded.model,
            original: original.as_ref().map(|o| &o.model),
            evict: loaded.dms.is_some(),
        };
        let length = evaluate_length(models, seq_len, &dataset.train, eos, settings);
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            seq_len,
            sequences = dataset.train.len(),
            seconds,
            "tokens/s (every row) {:.0}",
            (seq_len * dataset.train.len()) as f64 / seconds
        );
        crate::backend::check_device_work()?;
        if let (Some(dir), Some(grid)) = (&args.out, &length.cr_per_layer_head) {
            std::fs::create_dir_all(dir)?;
            crate::eval::heatmap::write_heatmap(
                grid,
                &dir.join(format!("cr-heatmap-{seq_len}.svg")),
                &format!("measured CR per layer and KV head, {seq_len} tokens"),
            )?;
        }
        report.lengths.push(length);
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
        if let Some(chunk) = length.baseline_chunk {
            println!(
                "  baselines evict once per {chunk} position(s){}",
                if chunk == 1 {
                    " (exact)"
                } else {
                    "; their CR counts the chunk"
                }
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
