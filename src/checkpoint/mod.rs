//! Checkpoint I/O: where files are (local or hub cache), what `config.json` says, and the one table
//! of tensor names. The only module that knows Hugging Face formats.

pub mod export;
pub mod hf_config;
pub mod names;
pub mod prefetch;
pub mod resolve;
pub mod safetensors_io;

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::dms::{DmsConfig, DmsModel};
use crate::model::{Decoder, FloatFormat, ModelConfig, WeightSource};
use crate::ops::UploadBackend;
pub use resolve::{CheckpointFiles, Origin};
pub use safetensors_io::SafetensorsStore;

/// A resolved checkpoint: its files and its parsed config.
pub struct Checkpoint {
    pub files: CheckpointFiles,
    pub config: ModelConfig,
    /// `config.json` as written, kept so export can extend rather than rewrite it.
    pub raw_config: Value,
    /// DMS settings, when this is a DMS export (`dms_*` keys in config.json).
    pub dms: Option<export::ExportedDms>,
}

impl Checkpoint {
    /// Resolves a local folder or hub id and reads its `config.json`.
    pub fn open(spec: &str) -> Result<Self> {
        let files = resolve::resolve(spec)?;
        let (config, raw_config) = hf_config::read_model_config(&files.config)?;
        let dms = export::read_dms_keys(&raw_config)
            .with_context(|| format!("in '{}'", files.config.display()))?;
        Ok(Self {
            files,
            config,
            raw_config,
            dms,
        })
    }

    /// The checkpoint's tokenizer; an error names the folder when it has none.
    pub fn tokenizer(&self) -> Result<crate::data::Tokenizer> {
        let path = self.files.tokenizer.as_ref().with_context(|| {
            format!(
                "'{}' has no tokenizer.json; text cannot be tokenised for this model",
                self.files.dir.display()
            )
        })?;
        crate::data::Tokenizer::from_file(path)
    }

    /// Maps the weight files, converting to `format` on load.
    pub fn store(&self, format: FloatFormat) -> Result<SafetensorsStore> {
        SafetensorsStore::open(&self.files.weights, format)
    }

    /// Checks that the files hold exactly the tensors `config.json` describes (DMS tensors aside),
    /// reporting every missing and unexpected name at once.
    pub fn verify_tensor_names(&self, store: &SafetensorsStore) -> Result<()> {
        let expected = safetensors_io::names_of(self.config.base_weight_keys());
        let present: BTreeSet<String> = store.names().cloned().collect();
        let missing: Vec<_> = expected.difference(&present).cloned().collect();
        let unexpected: Vec<_> = store
            .unexpected(&expected)
            .into_iter()
            .filter(|name| !safetensors_io::is_dms_name(name))
            // Some tied checkpoints still store a copy of the head; transformers ignores it too.
            .filter(|name| !(self.config.tie_word_embeddings && name == "lm_head.weight"))
            .collect();
        if missing.is_empty() && unexpected.is_empty() {
            return Ok(());
        }
        let list = |names: &[String]| {
            let shown: Vec<_> = names.iter().take(8).map(String::as_str).collect();
            let more = names.len().saturating_sub(shown.len());
            format!(
                "{}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" (+{more} more)")
                } else {
                    String::new()
                }
            )
        };
        let mut problems = Vec::new();
        if !missing.is_empty() {
            problems.push(format!("missing tensors: {}", list(&missing)));
        }
        if !unexpected.is_empty() {
            problems.push(format!("unexpected tensors: {}", list(&unexpected)));
        }
        bail!(
            "the weights in '{}' do not match its config.json ({}): {}",
            self.files.dir.display(),
            self.config.architecture.hf_class(),
            problems.join("; ")
        )
    }

    /// Loads the model with its DMS parameters: `dms` overrides the settings in config.json (needed
    /// for base checkpoints, which have none). Adapter weights come from the files when present,
    /// else start at zero.
    pub fn load_dms_model<B: UploadBackend>(
        &self,
        dms: Option<&DmsConfig>,
        format: FloatFormat,
        device: &B::Device,
    ) -> Result<(DmsModel<B>, DmsConfig)> {
        let config = match (dms, &self.dms) {
            (Some(given), _) => given.clone(),
            (None, Some(exported)) => exported.config.clone(),
            (None, None) => bail!(
                "'{}' is not a DMS checkpoint (its config.json has no dms_* keys); export a run \
                 with `dms-retrofit export` or give the DMS settings",
                self.files.dir.display()
            ),
        };
        let mut store = self.store(format)?;
        self.verify_tensor_names(&store)?;
        let base = self.load_base(&mut store, device)?;
        let model = DmsModel::new(base, &config, Some(&mut store), device)?;
        Ok((model, config))
    }

    /// Loads the base decoder onto `device`, its weights converted to `format`.
    pub fn load_decoder<B: UploadBackend>(
        &self,
        format: FloatFormat,
        device: &B::Device,
    ) -> Result<Decoder<B>> {
        let mut store = self.store(format)?;
        self.verify_tensor_names(&store)?;
        self.load_base(&mut store, device)
    }

    /// The base decoder from `store` (this checkpoint's tensors). Where the backend reads tensors
    /// stored in the run's format straight from their files ([`UploadBackend::upload_direct`]),
    /// it does, the others in turn; otherwise the next tensors are read while the current one is
    /// copied to the device ([`prefetch`]).
    pub fn load_base<B: UploadBackend, S: WeightSource + Send>(
        &self,
        store: &mut S,
        device: &B::Device,
    ) -> Result<Decoder<B>> {
        let order: Vec<_> = self
            .config
            .base_weight_keys()
            .into_iter()
            .filter_map(|key| Some((key, self.config.weight_shape(key)?)))
            .collect();
        if B::uploads_direct(device)
            && order
                .iter()
                .any(|(key, shape)| store.direct(*key, shape).is_some())
        {
            return Decoder::load(&self.config, store, device);
        }
        prefetch::with_prefetch(store, &order, |source| {
            Decoder::load(&self.config, source, device)
        })
    }
}
