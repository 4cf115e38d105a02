//! `dms-retrofit generate MODEL --prompt TEXT`: streams text through the evicting KV cache.

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use super::human_bytes;
use super::loading::{Loaded, load_model};
use super::{ComputeArgs, on_backend};
use crate::data::{ChatTemplate, Message};
use crate::eval::Decoding;
use crate::eval::sampling::{Rng, sample};
use crate::model::FloatFormat;
use crate::model::attention::AttentionBackend;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A base checkpoint (dense), a DMS export, or a run folder / snapshot.
    pub model: String,
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the statistics as JSON (stdout) after the text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

#[derive(Serialize)]
struct Stats {
    model: String,
    prompt_tokens: usize,
    generated_tokens: usize,
    decode_tokens_per_s: f64,
    prefill_seconds: f64,
    kv_bytes: u64,
    kv_bytes_dense: u64,
    measured_cr: f64,
}

/// EOS ids from config.json and generation_config.json (a number or a list).
fn eos_ids<B: AttentionBackend>(loaded: &Loaded<B>) -> Vec<u32> {
    let mut ids = loaded.ckpt.config.eos_token_ids.clone();
    if let Some(path) = &loaded.ckpt.files.generation_config
        && let Ok(text) = std::fs::read_to_string(path)
        && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
    {
        match value.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|v| v as u32)),
            Some(serde_json::Value::Array(a)) => {
                ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            _ => {}
        }
    }
    ids.sort();
    ids.dedup();
    ids
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // NaN fails every comparison, so each range is checked as "inside" rather than "not outside".
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p {} must lie in (0, 1]", args.top_p);
    }
    if !(args.temperature.is_finite() && args.temperature >= 0.0) {
        bail!(
            "--temperature {} must be a finite number >= 0 (0 = greedy)",
            args.temperature
        );
    }
    let (spec, format) = args.compute.resolve()?;
    on_backend!(spec, format, generate(&args, format))
}

/// Prefill, then sample and stream tokens, on backend `B`.
fn generate<B: AttentionBackend>(
    args: &GenerateArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<()> {
    let loaded = load_model::<B>(&args.model, format, device)?;
    let files = &loaded.ckpt.files;
    let tokenizer = loaded.ckpt.tokenizer()?;
    let text = if args.chat {
        let config = files.tokenizer_config.as_ref().with_context(|| {
            format!(
                "--chat needs tokenizer_config.json in '{}'",
                files.dir.display()
            )
        })?;
        ChatTemplate::from_tokenizer_config(config)?.render(
            &[Message {
                role: "user".into(),
                content: args.prompt.clone(),
            }],
            true,
            &Default::default(),
        )?
    } else {
        args.prompt.clone()
    };
    let mut ids = tokenizer.encode(&text, !args.chat)?;
    if ids.is_empty() {
        bail!("the prompt tokenised to nothing");
    }
    let limit = loaded.ckpt.config.max_position_embeddings;
    if ids.len() + args.max_new_tokens > limit {
        bail!(
            "the prompt ({} tokens) plus --max-new-tokens {} exceeds the model's \
             max_position_embeddings = {limit}; use --max-new-tokens <= {} or a shorter prompt",
            ids.len(),
            args.max_new_tokens,
            limit.saturating_sub(ids.len())
        );
    }
    let eos = eos_ids(&loaded);
    tracing::info!("{}", loaded.description);
    let decoding = Decoding::new(&loaded.model, &loaded.ckpt.config, loaded.dms.as_ref());
    let mut cache = decoding.cache(None, None);
    let mut rng = Rng::new(args.seed);

    let start = Instant::now();
    let mut logits = decoding.prefill(&ids, &mut cache);
    let prefill_seconds = start.elapsed().as_secs_f64();
    let prompt_len = ids.len();
    let mut printed = String::new();
    let mut stdout = std::io::stdout();
    let decode_start = Instant::now();
    for _ in 0..args.max_new_tokens {
        let values = logits
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("cannot read the logits back: {e:?}"))?;
        let next = sample(&values, args.temperature, args.top_p, &mut rng);
        if eos.contains(&next) {
            break;
        }
        ids.push(next);
        let text = tokenizer.decode(&ids[prompt_len..], true)?;
        // Hold back a trailing partial UTF-8 sequence until the next token completes it.
        if !text.ends_with('\u{FFFD}') && text.len() >= printed.len() && text.starts_with(&printed)
        {
            write!(stdout, "{}", &text[printed.len()..])?;
            stdout.flush()?;
            printed = text;
        }
        logits = decoding.step(next, &mut cache);
    }
    let generated = ids.len() - prompt_len;
    writeln!(stdout)?;
    let seconds = decode_start.elapsed().as_secs_f64();
    let stats = Stats {
        model: loaded.description.clone(),
        prompt_tokens: prompt_len,
        generated_tokens: generated,
        decode_tokens_per_s: generated as f64 / seconds.max(1e-9),
        prefill_seconds,
        kv_bytes: cache.bytes(format.bytes()),
        kv_bytes_dense: cache.dense_bytes(format.bytes()),
        measured_cr: cache.compression_ratio(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        eprintln!(
            "{} prompt + {} generated tokens, {:.1} tokens/s; KV cache {} vs {} dense ({}), \
             measured CR {:.2}",
            stats.prompt_tokens,
            stats.generated_tokens,
            stats.decode_tokens_per_s,
            human_bytes(stats.kv_bytes),
            human_bytes(stats.kv_bytes_dense),
            format.torch_name(),
            stats.measured_cr
        );
    }
    Ok(())
}
