//! What a run writes to disk besides metrics: resumable checkpoints (`checkpoints/step-N`) and
//! per-CR snapshots (`cr-K`). Every folder is written under a temporary name and renamed into
//! place, so a folder that exists is complete.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData, backend::Backend};
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::checkpoint::names::hf_name;
use crate::dms::{DmsConfig, DmsModel};
use crate::model::{FloatFormat, ParamSlot};

pub use super::{RECIPE_FILE, STATE_FILE, list_checkpoints};
pub const TRAINABLE_FILE: &str = "trainable.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer";

/// A sharded run's optimizer state: one file per rank (`run.shard_optimizer`), without extension.
pub fn optimizer_shard(rank: usize) -> String {
    format!("{OPTIMIZER_FILE}-rank-{rank}")
}

/// Everything besides tensors that a snapshot records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The scheduled compression ratio after `step` steps.
    pub scheduled_cr: f64,
    /// The checkpoint the run started from, as given in the recipe, and its resolved folder
    /// (absolute and canonical, so the run folder works from any working directory).
    pub base_source: String,
    pub base_dir: PathBuf,
    pub dms: DmsConfig,
    /// Hash of the packed training data; resuming on different data is refused.
    pub data_fingerprint: u64,
    pub seed: u64,
    /// Names of the tensors in `trainable.safetensors`.
    pub tensors: Vec<String>,
    /// Metrics of the last step, for model cards.
    #[serde(default)]
    pub last_metrics: BTreeMap<String, f64>,
}

impl SnapshotState {
    /// The base checkpoint, and whether training changed any of its weights (a trained tensor
    /// that is not a DMS adapter's).
    pub fn base_origin(&self) -> crate::checkpoint::export::BaseOrigin {
        crate::checkpoint::export::BaseOrigin {
            source: self.base_source.clone(),
            dir: self.base_dir.clone(),
            weights_changed: self.tensors.iter().any(|n| !n.contains("dms_proj_alpha")),
        }
    }
}

/// Writes a snapshot folder atomically: `files` get the trainable tensors, the state and the recipe;
/// `extra` may add more (the optimizer state) into the temporary folder before the rename.
pub fn write_snapshot<B: Backend>(
    dir: &Path,
    model: &mut DmsModel<B>,
    state: &SnapshotState,
    recipe_toml: &str,
    extra: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    atomic::write_dir(dir, |tmp| {
        let tensors = trainable_tensors(model);
        let mut state = state.clone();
        state.tensors = tensors.iter().map(|(n, _)| n.clone()).collect();
        write_tensors(&tmp.join(TRAINABLE_FILE), &tensors)?;
        std::fs::write(tmp.join(STATE_FILE), serde_json::to_string_pretty(&state)?)?;
        std::fs::write(tmp.join(RECIPE_FILE), recipe_toml)?;
        extra(tmp)
    })
    .with_context(|| format!("writing snapshot '{}'", dir.display()))
}

/// The parameters that require gradients, by Hugging Face name, as f32 host data.
pub fn trainable_tensors<B: Backend>(model: &mut DmsModel<B>) -> Vec<(String, TensorData)> {
    let mut out = Vec::new();
    for (key, slot) in model.params_mut() {
        // Only trainable values are read back: reading every parameter first copied the whole
        // frozen model to the host at each checkpoint (5.6 s for Qwen3-8B's 16 GB).
        let data = match slot {
            ParamSlot::Vector(p) if p.is_require_grad() => p.val().into_data(),
            ParamSlot::Matrix(p) if p.is_require_grad() => p.val().into_data(),
            _ => continue,
        };
        out.push((hf_name(key), data.convert::<f32>()));
    }
    out
}

/// Writes f32 tensors as safetensors, atomically ([`atomic::write_file`]).
pub fn write_tensors(path: &Path, tensors: &[(String, TensorData)]) -> Result<()> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, data)| (name.clone(), data.shape.to_vec(), data.as_bytes().to_vec()))
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (name.clone(), view))
                .map_err(|e| anyhow::anyhow!("tensor '{name}': {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| anyhow::anyhow!("cannot serialize '{}': {e}", path.display()))?;
    atomic::write_file(path, &bytes)
}

/// Overwrites the model's parameters with the tensors of a snapshot (ids and gradient flags kept).
/// Every tensor in the file must belong to the model.
pub fn load_trainable<B: Backend>(dir: &Path, model: &mut DmsModel<B>) -> Result<usize> {
    let path = dir.join(TRAINABLE_FILE);
    let mut store =
        crate::checkpoint::SafetensorsStore::open(std::slice::from_ref(&path), FloatFormat::F32)?;
    let names: Vec<String> = store.names().cloned().collect();
    let mut loaded = 0;
    for (key, slot) in model.params_mut() {
        let name = hf_name(key);
        if !names.contains(&name) {
            continue;
        }
        match slot {
            ParamSlot::Vector(p) => replace(p, store.load_named(&name, &p.val().dims())?),
            ParamSlot::Matrix(p) => replace(p, store.load_named(&name, &p.val().dims())?),
        }
        loaded += 1;
    }
    if loaded != names.len() {
        bail!(
            "'{}' holds {} tensors but only {loaded} belong to this model; it was written for a \
             different model or DMS variant",
            path.display(),
            names.len()
        );
    }
    Ok(loaded)
}

/// Sets a parameter's value, keeping its id, dtype and gradient flag.
pub fn replace<B: Backend, const D: usize>(param: &mut Param<Tensor<B, D>>, data: TensorData) {
    let device = param.val().device();
    let require_grad = param.is_require_grad();
    // Keep the parameter's dtype (f32 master weights stay f32 on a bf16 device).
    let dtype = param.val().dtype();
    let value = crate::model::decoder::in_dtype(Tensor::from_data(data, &device), dtype)
        .set_require_grad(require_grad);
    *param = Param::initialized(param.id, value);
}

pub fn read_state(dir: &Path) -> Result<SnapshotState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("'{}' is not a valid state file", path.display()))
}
