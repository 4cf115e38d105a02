//! `dms-retrofit logits MODEL --text ... | --ids ...`: the logits of one forward pass as JSON, for
//! comparing with other implementations (e.g. `scripts/check_export_transformers.py`).

use anyhow::{Context, Result, bail};
use burn::tensor::{Int, Tensor, TensorData};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::checkpoint::Checkpoint;
use crate::data::Tokenizer;
use crate::dms::Mode;
use crate::model::{FloatFormat, RopeTables};
use crate::ops::attention::AttentionBackend;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Eviction {
    /// The original model: no eviction (works on any checkpoint).
    Off,
    /// DMS inference semantics: hard decisions, exact eviction mask (DMS checkpoints).
    On,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// A checkpoint folder or hub id.
    pub model: String,
    /// Text to tokenise (no special tokens added).
    #[arg(long, conflicts_with = "ids")]
    pub text: Option<String>,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    pub ids: Vec<u32>,
    #[arg(long, value_enum, default_value = "off")]
    pub eviction: Eviction,
    #[command(flatten)]
    pub compute: super::ComputeArgs,
}

/// Logits of one forward pass on backend `B`, as f32 host values.
fn forward<B: AttentionBackend>(
    ckpt: &Checkpoint,
    ids: &[u32],
    eviction: Eviction,
    format: FloatFormat,
    device: &B::Device,
) -> Result<Vec<f32>> {
    let seq = ids.len();
    let input = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, seq]),
        device,
    );
    let logits = match eviction {
        Eviction::Off => {
            let decoder = ckpt.load_decoder::<B>(format, device)?;
            decoder.forward(input, &RopeTables::for_model(&ckpt.config, 0, seq, device))
        }
        Eviction::On => {
            let (model, _) = ckpt.load_dms_model::<B>(None, format, device)?;
            model.logits(model.forward(input, &Mode::Inference).hidden)
        }
    };
    let values = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("converted to f32");
    crate::backend::check_device_work()?;
    Ok(values)
}

#[derive(Serialize)]
struct Output {
    input_ids: Vec<u32>,
    eviction: String,
    /// `[seq, vocab]`, f32 computed on the CPU.
    logits: Vec<Vec<f32>>,
}

pub fn run(args: LogitsArgs) -> Result<()> {
    let ckpt = Checkpoint::open(&args.model)?;
    let ids = match &args.text {
        Some(text) => {
            let path =
                ckpt.files.tokenizer.as_ref().with_context(|| {
                    format!("'{}' has no tokenizer.json; pass --ids", args.model)
                })?;
            Tokenizer::from_file(path)?.encode(text, false)?
        }
        None => args.ids.clone(),
    };
    if ids.is_empty() {
        bail!("nothing to run: pass --text or --ids");
    }
    let vocab = ckpt.config.vocab_size;
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary (size {vocab})");
    }
    let (spec, format) = args.compute.resolve()?;
    let values = super::on_backend!(spec, format, forward(&ckpt, &ids, args.eviction, format))?;
    let out = Output {
        input_ids: ids,
        eviction: format!("{:?}", args.eviction).to_lowercase(),
        logits: values.chunks(vocab).map(<[f32]>::to_vec).collect(),
    };
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
