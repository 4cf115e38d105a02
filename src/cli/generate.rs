//! `dms-retrofit generate MODEL --prompt TEXT | --prompts FILE.jsonl`: decodes one prompt
//! (streamed) or a batch of prompts together through the physically evicting slot cache.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;

use super::human_bytes;
use super::loading::{Loaded, load_model};
use super::{ComputeArgs, on_backend};
use crate::data::{ChatTemplate, Message, Tokenizer};
use crate::eval::Decoding;
use crate::eval::generation::{Event, Finish, Sampling, generate_batch};
use crate::model::FloatFormat;
use crate::ops::attention::AttentionBackend;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "prompts"])))]
pub struct GenerateArgs {
    /// A base checkpoint (dense), a DMS export, or a run folder / snapshot.
    pub model: String,
    /// One prompt; its text streams to stdout as it is generated.
    #[arg(long)]
    pub prompt: Option<String>,
    /// A batch of prompts decoded together: a JSONL file, one `{"prompt": TEXT}` (or a bare JSON
    /// string) per line. Completions go to stdout as JSONL as each one finishes.
    #[arg(long, value_name = "FILE.jsonl")]
    pub prompts: Option<PathBuf>,
    /// Wrap each prompt as a user turn with the checkpoint's chat template.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Keep generating past end-of-sequence tokens (for timing a fixed number of tokens).
    #[arg(long)]
    pub ignore_eos: bool,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sequence i of a batch samples with seed + i.
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
    batch: usize,
    prompt_tokens: usize,
    generated_tokens: usize,
    /// Generated tokens of the whole batch per second of decoding.
    decode_tokens_per_s: f64,
    prefill_seconds: f64,
    /// Key/value storage the cache allocated on the device.
    kv_bytes: u64,
    /// Of which live entries.
    kv_live_bytes: u64,
    /// DMS (paged): the largest layer's gathered keys and values while it attends.
    kv_transient_bytes: u64,
    /// A dense cache for the same tokens.
    kv_bytes_dense: u64,
    measured_cr: f64,
}

/// One finished sequence of a `--prompts` batch.
#[derive(Serialize)]
struct Completion<'a> {
    index: usize,
    prompt: &'a str,
    completion: String,
    generated_tokens: usize,
    finish: Finish,
}

/// EOS ids from config.json and generation_config.json (a number or a list).
pub(super) fn eos_ids<B: AttentionBackend>(loaded: &Loaded<B>) -> Vec<u32> {
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

/// The prompts of `--prompt` or `--prompts`.
fn read_prompts(args: &GenerateArgs) -> Result<Vec<String>> {
    let Some(path) = &args.prompts else {
        return Ok(vec![args.prompt.clone().unwrap_or_default()]);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --prompts '{}'", path.display()))?;
    let mut prompts = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", path.display(), number + 1))?;
        let prompt = match &value {
            serde_json::Value::String(s) => s.clone(),
            other => other
                .get("prompt")
                .and_then(|p| p.as_str())
                .map(str::to_string)
                .with_context(|| {
                    format!(
                        "{}:{}: expected {{\"prompt\": TEXT}} or a JSON string",
                        path.display(),
                        number + 1
                    )
                })?,
        };
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        bail!("--prompts '{}' holds no prompts", path.display());
    }
    Ok(prompts)
}

/// The checkpoint's chat template; `flag` names the option that asked for it.
pub(super) fn chat_template<B: AttentionBackend>(
    loaded: &Loaded<B>,
    flag: &str,
) -> Result<ChatTemplate> {
    let files = &loaded.ckpt.files;
    let config = files.tokenizer_config.as_ref().with_context(|| {
        format!(
            "{flag} needs the chat template of tokenizer_config.json, which '{}' lacks",
            files.dir.display()
        )
    })?;
    ChatTemplate::from_tokenizer_config(config)
}

/// A prompt's token ids and text: the conversation rendered with `template` up to the assistant's
/// turn, or its contents as plain text (with the tokenizer's special tokens). `which` names the
/// prompt in the one error for an empty prompt or one that leaves no room for the answer
/// (`room` = the model's position limit and the tokens to generate).
pub(super) fn encode_prompt(
    messages: &[Message],
    template: Option<&ChatTemplate>,
    tokenizer: &Tokenizer,
    (limit, max_new_tokens): (usize, usize),
    which: &str,
) -> Result<(Vec<u32>, String)> {
    let text = match template {
        Some(t) => t.render(messages, true, &Default::default())?,
        None => messages
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let ids = tokenizer.encode(&text, template.is_none())?;
    if ids.is_empty() {
        bail!("{which} tokenised to nothing");
    }
    if ids.len() + max_new_tokens > limit {
        bail!(
            "{which} ({} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's \
             max_position_embeddings = {limit}; use --max-new-tokens <= {} or a shorter prompt",
            ids.len(),
            limit.saturating_sub(ids.len())
        );
    }
    Ok((ids, text))
}

/// Prefill, then sample and stream tokens, on backend `B`.
fn generate<B: AttentionBackend>(
    args: &GenerateArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<()> {
    let prompts = read_prompts(args)?;
    let loaded = load_model::<B>(&args.model, format, device)?;
    let tokenizer = loaded.ckpt.tokenizer()?;
    let template = match args.chat {
        true => Some(chat_template(&loaded, "--chat")?),
        false => None,
    };
    let limit = loaded.ckpt.config.max_position_embeddings;
    let mut sequences = Vec::with_capacity(prompts.len());
    for (index, prompt) in prompts.iter().enumerate() {
        let which = match args.prompts {
            Some(_) => format!("prompt {} of --prompts", index + 1),
            None => "the prompt".to_string(),
        };
        let turn = [Message {
            role: "user".into(),
            content: prompt.clone(),
        }];
        let (ids, _) = encode_prompt(
            &turn,
            template.as_ref(),
            &tokenizer,
            (limit, args.max_new_tokens),
            &which,
        )?;
        sequences.push(ids);
    }
    tracing::info!("{}", loaded.description);
    let decoding = Decoding::new(&loaded.model, loaded.dms.is_some());
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        ignore_eos: args.ignore_eos,
        eos: eos_ids(&loaded),
    };
    let batch = sequences.len();
    let mut output = Output::new(args, &prompts, &tokenizer);
    let seeds: Vec<u64> = (0..batch as u64).map(|i| args.seed + i).collect();
    let run = generate_batch(
        &decoding,
        &sequences,
        &seeds,
        &sampling,
        format.bytes(),
        &mut |event| output.event(event),
    )?;
    output.finish()?;
    let stats = Stats {
        model: loaded.description.clone(),
        batch,
        prompt_tokens: sequences.iter().map(Vec::len).sum(),
        generated_tokens: run.generated_tokens,
        decode_tokens_per_s: run.generated_tokens as f64 / run.decode_seconds.max(1e-9),
        prefill_seconds: run.prefill_seconds,
        kv_bytes: run.memory.allocated_bytes,
        kv_live_bytes: run.memory.live_bytes,
        kv_transient_bytes: run.memory.transient_bytes,
        kv_bytes_dense: run.memory.dense_bytes,
        measured_cr: run.memory.compression_ratio,
    };
    stats.print(args.json, format)
}

impl Stats {
    fn print(&self, json: bool, format: FloatFormat) -> Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
            return Ok(());
        }
        eprintln!(
            "{} sequence(s): {} prompt + {} generated tokens, {:.1} tokens/s; KV cache {} \
             allocated ({} live) vs {} dense ({}), measured CR {:.2}",
            self.batch,
            self.prompt_tokens,
            self.generated_tokens,
            self.decode_tokens_per_s,
            human_bytes(self.kv_bytes),
            human_bytes(self.kv_live_bytes),
            human_bytes(self.kv_bytes_dense),
            format.torch_name(),
            self.measured_cr
        );
        Ok(())
    }
}

/// Where generated text goes: one prompt streams to stdout as it decodes; a `--prompts` batch
/// prints each completion as a JSON line when it finishes, under a progress bar.
struct Output<'a> {
    prompts: &'a [String],
    tokenizer: &'a Tokenizer,
    /// `None` for a single streamed prompt.
    progress: Option<indicatif::ProgressBar>,
    printed: String,
}

impl<'a> Output<'a> {
    fn new(args: &GenerateArgs, prompts: &'a [String], tokenizer: &'a Tokenizer) -> Self {
        let progress = args.prompts.is_some().then(|| {
            let total = (prompts.len() * args.max_new_tokens) as u64;
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} tokens, {per_sec} ({eta} left)",
                )
                .expect("valid template"),
            );
            bar
        });
        Self {
            prompts,
            tokenizer,
            progress,
            printed: String::new(),
        }
    }

    fn event(&mut self, event: Event<'_>) -> Result<()> {
        match (event, &self.progress) {
            (Event::Token { generated, .. }, None) => {
                let text = self.tokenizer.decode(generated, true)?;
                // Hold back a trailing partial UTF-8 sequence until the next token completes it.
                if !text.ends_with('\u{FFFD}')
                    && text.len() >= self.printed.len()
                    && text.starts_with(&self.printed)
                {
                    let mut stdout = std::io::stdout();
                    write!(stdout, "{}", &text[self.printed.len()..])?;
                    stdout.flush()?;
                    self.printed = text;
                }
            }
            (Event::Token { .. }, Some(bar)) => bar.inc(1),
            (Event::Finished { .. }, None) => {}
            (
                Event::Finished {
                    index,
                    generated,
                    finish,
                },
                Some(bar),
            ) => {
                let line = serde_json::to_string(&Completion {
                    index,
                    prompt: &self.prompts[index],
                    completion: self.tokenizer.decode(generated, true)?,
                    generated_tokens: generated.len(),
                    finish,
                })?;
                bar.suspend(|| println!("{line}"));
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self.progress {
            Some(bar) => bar.finish_and_clear(),
            None => writeln!(std::io::stdout())?,
        }
        Ok(())
    }
}
