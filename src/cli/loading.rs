//! Opening whatever a user points `eval` / `generate` at: a base checkpoint (dense), a DMS export,
//! or a training run / snapshot folder.

use std::path::Path;

use anyhow::Result;

use super::export::{locate_snapshot, open_base};
use crate::backend::Cpu;
use crate::checkpoint::Checkpoint;
use crate::dms::{DmsConfig, DmsModel};
use crate::model::FloatFormat;
use crate::train::snapshot::{self, load_trainable};

/// A model ready for inference on the CPU.
pub struct Loaded {
    pub ckpt: Checkpoint,
    pub model: DmsModel<Cpu>,
    /// `None`: a base checkpoint, run densely.
    pub dms: Option<DmsConfig>,
    /// What was loaded, for reports.
    pub description: String,
}

pub fn load_model(spec: &str) -> Result<Loaded> {
    let device = Default::default();
    let path = Path::new(spec);
    let is_run = path.join(snapshot::STATE_FILE).is_file() || path.join("checkpoints").is_dir();
    if is_run {
        let dir = locate_snapshot(path)?;
        let state = snapshot::read_state(&dir)?;
        let ckpt = open_base(&state)?;
        let (mut model, dms) =
            ckpt.load_dms_model::<Cpu>(Some(&state.dms), FloatFormat::F32, &device)?;
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
        let (model, dms) = ckpt.load_dms_model::<Cpu>(None, FloatFormat::F32, &device)?;
        let cr = ckpt.dms.as_ref().map(|d| d.cr).unwrap_or(1.0);
        return Ok(Loaded {
            ckpt,
            model,
            dms: Some(dms),
            description: format!("DMS checkpoint {spec} (trained to CR {cr:.2})"),
        });
    }
    let base = ckpt.load_decoder::<Cpu>(FloatFormat::F32, &device)?;
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
