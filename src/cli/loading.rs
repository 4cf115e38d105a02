//! Opening whatever a user points `eval` / `generate` at: a base checkpoint (dense), a DMS export,
//! or a training run / snapshot folder.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::checkpoint::Checkpoint;
use crate::checkpoint::export::BaseOrigin;
use crate::dms::{DmsConfig, DmsModel};
use crate::model::FloatFormat;
use crate::ops::attention::AttentionBackend;
use crate::run::snapshot::{self, load_trainable};
use crate::run::{locate_snapshot, open_base};

/// A model ready for inference on backend `B`.
pub struct Loaded<B: AttentionBackend> {
    pub ckpt: Checkpoint,
    pub model: DmsModel<B>,
    /// `None`: a base checkpoint, run densely.
    pub dms: Option<DmsConfig>,
    /// What was loaded, for reports.
    pub description: String,
    /// The checkpoint a retrofit started from, where it is known.
    pub base: Option<BaseOrigin>,
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
            base: Some(state.base_origin()),
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
        let base = ckpt.dms.as_ref().and_then(|d| d.base.clone());
        return Ok(Loaded {
            ckpt,
            model,
            dms: Some(dms),
            base,
            description: format!("DMS checkpoint {spec} (trained to CR {cr:.2})"),
        });
    }
    let base = ckpt.load_decoder::<B>(format, device)?;
    Ok(Loaded {
        ckpt,
        model: DmsModel::dense(base),
        dms: None,
        base: None,
        description: format!("base checkpoint {spec} (no DMS: dense cache)"),
    })
}

/// The original model `eval` compares a retrofit with: `--original SPEC` (`self`: the retrofit
/// with eviction off), else the recorded base when training changed its weights; `None` when the
/// retrofit with eviction off is the original (adapter-only training, or a base checkpoint).
pub fn load_original<B: AttentionBackend>(
    loaded: &Loaded<B>,
    flag: Option<&str>,
    format: FloatFormat,
    device: &B::Device,
) -> Result<Option<Loaded<B>>> {
    let spec = match (flag, &loaded.base) {
        (Some("self"), _) => return Ok(None),
        (Some(spec), _) => spec.to_string(),
        (None, Some(base)) if base.weights_changed => match base.dir.is_dir() {
            true => base.dir.to_string_lossy().into_owned(),
            false => base.source.clone(),
        },
        _ => return Ok(None),
    };
    let original = load_model::<B>(&spec, format, device).with_context(|| {
        format!(
            "cannot load the original model '{spec}': training changed the base model's weights, \
             so the comparison needs the original; pass --original BASE (its folder or hub id), \
             or --original self to compare with the retrofit's own dense version"
        )
    })?;
    if original.dms.is_some() {
        bail!(
            "--original '{spec}' is a DMS model; give the base checkpoint the retrofit started from"
        );
    }
    let (a, b) = (&loaded.ckpt.config, &original.ckpt.config);
    if (a.vocab_size, a.num_layers, a.hidden_size) != (b.vocab_size, b.num_layers, b.hidden_size) {
        bail!(
            "--original '{spec}' has another shape (vocabulary {}, {} layers, hidden {}) than the \
             retrofit (vocabulary {}, {} layers, hidden {}); give the base checkpoint it started from",
            b.vocab_size,
            b.num_layers,
            b.hidden_size,
            a.vocab_size,
            a.num_layers,
            a.hidden_size
        );
    }
    tracing::info!("original model: {}", original.description);
    Ok(Some(original))
}
