//! `dms-retrofit inspect MODEL`

use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::{human_bytes, human_count};
use burn::module::Module;

use crate::backend::Cpu;
use crate::checkpoint::{Checkpoint, safetensors_io::is_dms_name};
use crate::model::{FloatFormat, ModelConfig};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint folder, or a hub id `org/name[@revision]` (read from the HF cache,
    /// downloaded when online; HF_HUB_OFFLINE=1 forbids downloads).
    pub model: String,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also load every weight onto the CPU (f32), checking shapes and that all values are finite,
    /// and report the time it took.
    #[arg(long)]
    pub load: bool,
}

/// Context lengths the KV-cache table reports.
const CONTEXTS: [u64; 3] = [4096, 32768, 131072];
/// Compression ratios the KV-cache table reports beside dense.
const RATIOS: [u64; 2] = [4, 8];

#[derive(Serialize)]
struct KvRow {
    context: u64,
    dense_bytes: u64,
    /// Ideal bytes at each CR: dense / CR (DMS keeps at least the last `window + 1` tokens).
    dms_bytes: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct Report<'a> {
    source: String,
    origin: String,
    architecture: &'static str,
    config: &'a ModelConfig,
    parameters: u64,
    weight_files: usize,
    weight_bytes: u64,
    /// Tensor count per stored dtype.
    stored_dtypes: BTreeMap<String, usize>,
    dms_tensors: usize,
    /// DMS settings from config.json (`dms_*` keys), for DMS exports.
    dms: Option<DmsReport>,
    tokenizer: bool,
    chat_template: bool,
    kv_dtype: FloatFormat,
    kv_bytes_per_token: u64,
    kv_cache: Vec<KvRow>,
    /// Present with `--load`.
    load: Option<LoadReport>,
}

#[derive(Serialize)]
struct DmsReport {
    variant: String,
    granularity: String,
    window: usize,
    alpha_scale: f64,
    offset: f64,
    tau: f64,
    cr: f64,
}

#[derive(Serialize)]
struct LoadReport {
    seconds: f64,
    bytes_f32: u64,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let store = ckpt.store(FloatFormat::F32)?;
    ckpt.verify_tensor_names(&store)?;
    let cfg = &ckpt.config;

    let mut stored_dtypes = BTreeMap::new();
    let mut dms_tensors = 0;
    for name in store.names() {
        let entry = store.entry(name).expect("listed names exist");
        *stored_dtypes
            .entry(format!("{:?}", entry.dtype))
            .or_insert(0) += 1;
        dms_tensors += usize::from(is_dms_name(name));
    }
    let weight_bytes = ckpt
        .files
        .weights
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let chat_template = ckpt
        .files
        .tokenizer_config
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("chat_template").is_some())
        || ckpt.files.dir.join("chat_template.jinja").is_file();
    // The cache is held in the checkpoint's own dtype (bf16 when it does not say).
    let kv_dtype = cfg.declared_dtype.unwrap_or(FloatFormat::Bf16);
    let per_token = cfg.kv_bytes_per_token(kv_dtype.bytes());
    let kv_cache = CONTEXTS
        .iter()
        .map(|&context| KvRow {
            context,
            dense_bytes: per_token * context,
            dms_bytes: RATIOS
                .iter()
                .map(|&cr| (format!("cr{cr}"), per_token * context / cr))
                .collect(),
        })
        .collect();
    let load = if args.load {
        let start = std::time::Instant::now();
        let decoder = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &Default::default())?;
        let bytes_f32 = 4 * decoder.num_params() as u64;
        Some(LoadReport {
            seconds: start.elapsed().as_secs_f64(),
            bytes_f32,
        })
    } else {
        None
    };
    let report = Report {
        source: args.model.clone(),
        origin: ckpt.files.origin.to_string(),
        architecture: cfg.architecture.hf_class(),
        config: cfg,
        parameters: cfg.parameter_count(),
        weight_files: ckpt.files.weights.len(),
        weight_bytes,
        stored_dtypes,
        dms_tensors,
        dms: ckpt.dms.as_ref().map(|d| DmsReport {
            variant: format!("{:?}", d.config.variant),
            granularity: format!("{:?}", d.config.granularity),
            window: d.config.window,
            alpha_scale: d.config.alpha_scale,
            offset: d.config.offset,
            tau: d.config.tau,
            cr: d.cr,
        }),
        tokenizer: ckpt.files.tokenizer.is_some(),
        chat_template,
        kv_dtype,
        kv_bytes_per_token: per_token,
        kv_cache,
        load,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    let c = r.config;
    let row = |k: &str, v: String| println!("  {k:<22} {v}");
    println!("{} ({})", r.source, r.origin);
    row("architecture", r.architecture.to_string());
    row("layers", c.num_layers.to_string());
    row(
        "heads / KV heads",
        format!(
            "{} / {} (group {})",
            c.num_heads,
            c.num_kv_heads,
            c.group_size()
        ),
    );
    row("head_dim", c.head_dim.to_string());
    row(
        "hidden / intermediate",
        format!("{} / {}", c.hidden_size, c.intermediate_size),
    );
    row("vocab", c.vocab_size.to_string());
    row(
        "parameters",
        format!("{} ({})", human_count(r.parameters), r.parameters),
    );
    row(
        "dtype",
        format!(
            "{} declared; stored {}",
            c.declared_dtype.map_or("unspecified", |d| d.torch_name()),
            r.stored_dtypes
                .iter()
                .map(|(d, n)| format!("{d} x{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row(
        "weights",
        format!(
            "{} in {} file(s)",
            human_bytes(r.weight_bytes),
            r.weight_files
        ),
    );
    row(
        "rope",
        format!("theta {} {:?}", c.rope.theta, c.rope.scaling),
    );
    row("tied embeddings", c.tie_word_embeddings.to_string());
    row(
        "biases",
        format!("qkv {} / o {} / mlp {}", c.qkv_bias, c.o_bias, c.mlp_bias),
    );
    row("q/k norm", c.qk_norm.to_string());
    row("DMS tensors", r.dms_tensors.to_string());
    if let Some(d) = &r.dms {
        row(
            "DMS",
            format!(
                "{} per {}, window {}, CR {:.2} (scale {}, offset {}, tau {})",
                d.variant, d.granularity, d.window, d.cr, d.alpha_scale, d.offset, d.tau
            ),
        );
    }
    row(
        "tokenizer / chat",
        format!("{} / {}", r.tokenizer, r.chat_template),
    );
    println!();
    println!(
        "KV cache ({}, {} per token):",
        r.kv_dtype.torch_name(),
        human_bytes(r.kv_bytes_per_token)
    );
    println!(
        "  {:>8} {:>12} {:>12} {:>12}",
        "context", "dense", "DMS CR4", "DMS CR8"
    );
    for kv in &r.kv_cache {
        println!(
            "  {:>8} {:>12} {:>12} {:>12}",
            kv.context,
            human_bytes(kv.dense_bytes),
            human_bytes(kv.dms_bytes["cr4"]),
            human_bytes(kv.dms_bytes["cr8"])
        );
    }
    println!("  (DMS rows: dense / CR; every head also keeps its last window+1 tokens.)");
    if let Some(load) = &r.load {
        println!();
        println!(
            "Loaded all weights ({} as f32) in {:.2} s: shapes match config.json, all values finite.",
            human_bytes(load.bytes_f32),
            load.seconds
        );
    }
}
