//! Opening whatever a user points `eval` / `generate` at: a base checkpoint (dense), a DMS export,
//! or a training run / snapshot folder.

use std::path::Path;

use anyhow::Result;

use super::export::{locate_snapshot, open_base};
use crate::checkpoint::Checkpoint;
use crate::dms::{DmsConfig, DmsModel};
use crate::model::FloatFormat;
use crate::model::attention::AttentionBackend;
use crate::train::snapshot::{self, load_trainable};

/// A model ready for inference on backend `B`.
pub struct Loaded<B: AttentionBackend> {
    pub ckpt: Checkpoint,
    pub model: DmsModel<B>,
    /// `None`: a base checkpoint, run densely.
    pub dms: Option<DmsConfig>,
    /// What was loaded, for reports.
    pub description: String,
}

/// Loads `spec` in `format` onto `device`.
pub fn load_model<B: AttentionBackend>(
    spec: &str,
    format: FloatFormat,
    device: &B::Device,
) -> Result<Loaded<B>> {
    let path = Path::new(spec);
    let is_run = path.join(snapshot::STATE_FILE).is_file() || path.join("checkpoints").is_dir();
    if is_run {
        let dir = locate_snapshot(path)?;
        let state = snapshot::read_state(&dir)?;
        let ckpt = open_base(&state)?;
        let (mut model, dms) = ckpt.load_dms_model::<B>(Some(&state.dms), format, device)?;
        load_trainable(&dir, &mut model)?;
        return Ok(Loaded {
            ckpt,
            model,
            dms: Some(dms),
            description: format!(
                "run snapshot {} (step {}, scheduled CR {:.2})",
                dir.display(),
                state.step,
                state.scheduled_cr
            ),
        });
    }
    let ckpt = Checkpoint::open(spec)?;
    if ckpt.dms.is_some() {
        let (model, dms) = ckpt.load_dms_model::<B>(None, format, device)?;
        let cr = ckpt.dms.as_ref().map(|d| d.cr).unwrap_or(1.0);
        return Ok(Loaded {
            ckpt,
            model,
            dms: Some(dms),
            description: format!("DMS checkpoint {spec} (trained to CR {cr:.2})"),
        });
    }
    let base = ckpt.load_decoder::<B>(format, device)?;
    Ok(Loaded {
        ckpt,
        model: DmsModel {
            base,
            adapters: Vec::new(),
        },
        dms: None,
        description: format!("base checkpoint {spec} (no DMS: dense cache)"),
    })
}
