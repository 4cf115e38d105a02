//! Writing a DMS checkpoint as a Hugging Face folder that transformers (as the base architecture),
//! DMS-aware loaders and dms-retrofit itself can read.
//!
//! Layout: the base model's tensors under their usual names, plus (adapter variant)
//! `model.layers.{i}.self_attn.dms_proj_alpha.weight` / `dms_proj_alpha_norm.weight`; `config.json` =
//! the base config + the official `dms_*` keys; tokenizer files and generation config copied; a
//! model card. Tensors training did not touch are copied byte for byte when the dtype allows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use safetensors::Dtype;
use serde::Serialize;
use serde_json::{Value, json};

use super::names::hf_name;
use super::{Checkpoint, SafetensorsStore};
use crate::atomic;
use crate::dms::decision::{adapter_keys, tensor_shape};
use crate::dms::{DmsConfig, Granularity, Variant};
use crate::model::{FloatFormat, WeightKey};

/// The official runtime's default paged-attention block size.
pub const PAGED_BLOCK_SIZE: usize = 256;

/// The `dms_paged_attention_block_size` to write for a window: the official loader
/// (`Qwen3ConfigDMS`) asserts `0 < block_size < dms_window_size`, so it is the largest power of two
/// below the window, at most the official 256 (16 -> 8, 64 -> 32, 256 -> 128, 257 and above -> 256).
/// A window of 1 leaves no valid block size: the official runtime cannot load such a model.
pub fn paged_block_size(window: usize) -> Result<usize> {
    if window < 2 {
        bail!(
            "dms.window = {window}: the official DMS runtime needs a window of at least 2 (its \
             paged block size must be > 0 and < the window); retrain with dms.window >= 2"
        );
    }
    let below = 1usize << (usize::BITS - 1 - (window - 1).leading_zeros());
    Ok(below.min(PAGED_BLOCK_SIZE))
}

/// The DMS settings an exported `config.json` carries.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportedDms {
    pub config: DmsConfig,
    /// The compression ratio the model was trained to (`dms_cr`).
    pub cr: f64,
    /// The checkpoint the retrofit started from (our `dms_retrofit_base_*` keys; other exporters
    /// do not write them).
    pub base: Option<BaseOrigin>,
}

/// Where a retrofit came from, so `eval` can compare it with the original model even when
/// training changed more than the DMS adapters.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseOrigin {
    /// As the recipe named it (a folder or a hub id).
    pub source: String,
    /// Its resolved folder when the run was trained.
    pub dir: PathBuf,
    /// Training changed weights of the base model (`train.trainable` beyond `adapter`): the
    /// retrofit with eviction off is no longer the original model.
    pub weights_changed: bool,
}

/// Reads the `dms_*` keys of a config, if it has them.
pub fn read_dms_keys(raw: &Value) -> Result<Option<ExportedDms>> {
    let Some(window) = raw.get("dms_window_size") else {
        return Ok(None);
    };
    let number = |key: &str| {
        raw.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("DMS config key '{key}' is missing or not a number"))
    };
    let window = window
        .as_u64()
        .context("DMS config key 'dms_window_size' must be a non-negative integer")?;
    let separate = raw
        .get("dms_separate_alpha")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let granularity = match raw
        .get("dms_alpha_per")
        .and_then(Value::as_str)
        .unwrap_or("head")
    {
        "head" => Granularity::Head,
        "layer" => Granularity::Layer,
        other => bail!("dms_alpha_per = '{other}' is not supported (head or layer)"),
    };
    Ok(Some(ExportedDms {
        config: DmsConfig {
            variant: if separate {
                Variant::Adapter
            } else {
                Variant::QNeuron
            },
            granularity,
            window: window as usize,
            tau: number("dms_tau").unwrap_or(0.1),
            alpha_scale: number("dms_alpha_scale")?,
            offset: number("dms_initial_alpha_offset")?,
        },
        cr: number("dms_cr").unwrap_or(1.0),
        base: raw
            .get("dms_retrofit_base_model")
            .and_then(Value::as_str)
            .map(|source| BaseOrigin {
                source: source.to_string(),
                dir: PathBuf::from(
                    raw.get("dms_retrofit_base_dir")
                        .and_then(Value::as_str)
                        .unwrap_or(source),
                ),
                weights_changed: raw
                    .get("dms_retrofit_base_weights_changed")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            }),
    }))
}

/// Adds the official `dms_*` keys to a base config.
pub fn write_dms_keys(config: &mut Value, dms: &ExportedDms) -> Result<()> {
    let c = &dms.config;
    let block_size = paged_block_size(c.window)?;
    let obj = config.as_object_mut().expect("config.json is an object");
    let keys = [
        ("dms_window_size", json!(c.window)),
        ("dms_alpha_scale", json!(c.alpha_scale)),
        ("dms_initial_alpha_offset", json!(c.offset)),
        ("dms_cr", json!(dms.cr)),
        ("dms_separate_alpha", json!(c.variant == Variant::Adapter)),
        (
            "dms_alpha_per",
            json!(match c.granularity {
                Granularity::Head => "head",
                Granularity::Layer => "layer",
            }),
        ),
        ("dms_tau", json!(c.tau)),
        ("dms_paged_attention_block_size", json!(block_size)),
    ];
    for (k, v) in keys {
        obj.insert(k.to_string(), v);
    }
    if let Some(base) = &dms.base {
        obj.insert("dms_retrofit_base_model".into(), json!(base.source));
        obj.insert(
            "dms_retrofit_base_dir".into(),
            json!(base.dir.to_string_lossy()),
        );
        obj.insert(
            "dms_retrofit_base_weights_changed".into(),
            json!(base.weights_changed),
        );
    }
    Ok(())
}

/// How to write the export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub out: PathBuf,
    pub dtype: FloatFormat,
    pub max_shard_bytes: u64,
    /// Replace an existing `out` (never one the export reads from, nor one holding a run).
    pub force: bool,
    /// Folders the export reads (the snapshot, its run folder); with the base checkpoint's folder,
    /// `out` may be none of them nor contain one.
    pub sources: Vec<PathBuf>,
}

/// What was written.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub out: PathBuf,
    pub shards: usize,
    pub tensors: usize,
    pub copied_unchanged: usize,
    pub converted: usize,
    pub trained: usize,
    pub bytes: u64,
}

/// One tensor to write: its name and little-endian bytes in the export dtype.
struct OutTensor {
    name: String,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn safetensors_dtype(format: FloatFormat) -> Dtype {
    match format {
        FloatFormat::F32 => Dtype::F32,
        FloatFormat::Bf16 => Dtype::BF16,
        FloatFormat::F16 => Dtype::F16,
    }
}

/// Encodes f32 values in `format`.
fn encode(values: &[f32], format: FloatFormat) -> Vec<u8> {
    match format {
        FloatFormat::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        FloatFormat::Bf16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        FloatFormat::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
    }
}

/// Writes an export folder.
///
/// - `base`: the checkpoint the run started from;
/// - `trained`: the run's trainable tensors (f32), which replace or add to the base's;
/// - `dms`: the DMS settings to record; `card`: the model card text.
pub fn write_export(
    base: &Checkpoint,
    trained: &mut SafetensorsStore,
    dms: &ExportedDms,
    card: &str,
    options: &ExportOptions,
) -> Result<ExportReport> {
    let out = &options.out;
    if out.exists() {
        if !options.force {
            bail!(
                "'{}' already exists; pass --force to replace it",
                out.display()
            );
        }
        let mut sources = options.sources.clone();
        sources.push(base.files.dir.clone());
        refuse_to_replace_a_source(out, &sources)?;
    }
    // Checked before any work: a model that the official runtime refuses is not an export.
    paged_block_size(dms.config.window)?;
    let report = atomic::write_dir(out, |tmp| {
        write_into(base, trained, dms, card, options, tmp)
    })?;
    Ok(ExportReport {
        out: out.clone(),
        ..report
    })
}

/// `--force` replaces `out` only when that destroys nothing the export reads or a run needs.
fn refuse_to_replace_a_source(out: &Path, sources: &[PathBuf]) -> Result<()> {
    let out_real = out
        .canonicalize()
        .with_context(|| format!("cannot resolve '{}'", out.display()))?;
    for source in sources {
        let Ok(source_real) = source.canonicalize() else {
            continue;
        };
        if source_real.starts_with(&out_real) {
            let relation = if source_real == out_real {
                "is"
            } else {
                "contains"
            };
            bail!(
                "--out '{}' {relation} '{}', which this export reads; --force never replaces it: \
                 choose another --out",
                out.display(),
                source.display()
            );
        }
    }
    let holds_snapshots = std::fs::read_dir(out).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.path().join(crate::run::STATE_FILE).is_file())
    });
    if crate::run::holds_run(out) || out.join(crate::run::STATE_FILE).is_file() || holds_snapshots {
        bail!(
            "--out '{}' holds a training run or snapshot; --force never replaces one: choose \
             another --out",
            out.display()
        );
    }
    Ok(())
}

fn write_into(
    base: &Checkpoint,
    trained: &mut SafetensorsStore,
    dms: &ExportedDms,
    card: &str,
    options: &ExportOptions,
    dir: &Path,
) -> Result<ExportReport> {
    let cfg = &base.config;
    let mut keys = cfg.base_weight_keys();
    if dms.config.variant == Variant::Adapter {
        keys.extend(adapter_keys(cfg));
    }
    let mut report = ExportReport {
        out: dir.to_path_buf(),
        shards: 0,
        tensors: keys.len(),
        copied_unchanged: 0,
        converted: 0,
        trained: 0,
        bytes: 0,
    };
    let tensors = collect_tensors(base, trained, &keys, options.dtype, &mut report)?;
    write_shards(dir, tensors, options, &mut report)?;
    write_config(base, dms, options, dir)?;
    copy_side_files(base, card, dir)?;
    Ok(report)
}

/// Every tensor of the export in `dtype`: trained ones from the run, the rest from the base
/// (copied byte for byte when the dtype already matches).
fn collect_tensors(
    base: &Checkpoint,
    trained: &mut SafetensorsStore,
    keys: &[WeightKey],
    dtype: FloatFormat,
    report: &mut ExportReport,
) -> Result<Vec<OutTensor>> {
    let cfg = &base.config;
    let mut base_store = base.store(FloatFormat::F32)?;
    base.verify_tensor_names(&base_store)?;
    let trained_names: Vec<String> = trained.names().cloned().collect();
    let out_dtype = safetensors_dtype(dtype);
    let mut tensors = Vec::with_capacity(keys.len());
    for &key in keys {
        let name = hf_name(key);
        let shape = tensor_shape(cfg, key);
        let tensor = if trained_names.contains(&name) {
            let data = trained.load_named(&name, &shape)?;
            report.trained += 1;
            let values = data.into_vec::<f32>().expect("f32 by construction");
            OutTensor {
                name,
                shape,
                bytes: encode(&values, dtype),
            }
        } else if let Some(entry) = base_store.entry(&name).cloned() {
            if entry.shape != shape {
                bail!(
                    "tensor '{name}' has shape {:?} in the base checkpoint, expected {shape:?}",
                    entry.shape
                );
            }
            if entry.dtype == out_dtype {
                report.copied_unchanged += 1;
                let raw = base_store.raw(&name).expect("entry exists");
                OutTensor {
                    name,
                    shape,
                    bytes: raw.bytes.to_vec(),
                }
            } else {
                report.converted += 1;
                let values = base_store
                    .load_named(&name, &shape)?
                    .into_vec::<f32>()
                    .expect("f32 by construction");
                OutTensor {
                    name,
                    shape,
                    bytes: encode(&values, dtype),
                }
            }
        } else {
            bail!(
                "tensor '{name}' is neither in the run's trained tensors nor in the base \
                 checkpoint '{}'",
                base.files.dir.display()
            );
        };
        tensors.push(tensor);
    }
    if !trained_names.iter().all(|n| {
        cfg.base_weight_keys()
            .into_iter()
            .chain(adapter_keys(cfg))
            .any(|k| hf_name(k) == *n)
    }) {
        bail!(
            "the run holds tensors this model does not have; it belongs to a different base model"
        );
    }
    Ok(tensors)
}

/// The weights as safetensors shards of at most `options.max_shard_bytes` (a single larger
/// tensor gets a shard of its own), with an index when there are several.
fn write_shards(
    dir: &Path,
    tensors: Vec<OutTensor>,
    options: &ExportOptions,
    report: &mut ExportReport,
) -> Result<()> {
    let out_dtype = safetensors_dtype(options.dtype);
    let mut shards: Vec<Vec<OutTensor>> = vec![Vec::new()];
    let mut current = 0u64;
    for t in tensors {
        let size = t.bytes.len() as u64;
        report.bytes += size;
        if current + size > options.max_shard_bytes && !shards.last().unwrap().is_empty() {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        shards.last_mut().unwrap().push(t);
    }
    report.shards = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if shards.len() == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        };
        let views = shard
            .iter()
            .map(|t| {
                safetensors::tensor::TensorView::new(out_dtype, t.shape.clone(), &t.bytes)
                    .map(|v| (t.name.clone(), v))
                    .map_err(|e| anyhow::anyhow!("tensor '{}': {e}", t.name))
            })
            .collect::<Result<Vec<_>>>()?;
        let metadata = Some(std::collections::HashMap::from([(
            "format".to_string(),
            "pt".to_string(),
        )]));
        safetensors::serialize_to_file(views, metadata, &dir.join(&file))
            .map_err(|e| anyhow::anyhow!("cannot write '{file}': {e}"))?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone());
        }
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": report.bytes}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_string_pretty(&index)?,
        )?;
    }

    Ok(())
}

/// config.json: the base config, its dtype updated, plus the dms_* keys.
fn write_config(
    base: &Checkpoint,
    dms: &ExportedDms,
    options: &ExportOptions,
    dir: &Path,
) -> Result<()> {
    let mut config = base.raw_config.clone();
    {
        let obj = config
            .as_object_mut()
            .context("config.json is not a JSON object")?;
        let dtype_key = if obj.contains_key("dtype") {
            "dtype"
        } else {
            "torch_dtype"
        };
        obj.insert(dtype_key.into(), json!(options.dtype.torch_name()));
    }
    write_dms_keys(&mut config, dms)?;
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;

    Ok(())
}

/// Tokenizer and generation settings travel with the model (the official release ships none),
/// and the model card.
fn copy_side_files(base: &Checkpoint, card: &str, dir: &Path) -> Result<()> {
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let src = base.files.dir.join(name);
        if src.is_file() {
            std::fs::copy(&src, dir.join(name))
                .with_context(|| format!("cannot copy '{}'", src.display()))?;
        }
    }
    std::fs::write(dir.join("README.md"), card)?;
    Ok(())
}
