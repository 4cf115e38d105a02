//! `dms-retrofit gen-data --model M --prompts FILE.jsonl --out FILE.jsonl`: the model's own answers
//! to prompts, sampled in batches on the device, as chat JSONL that `data.train_files` reads with
//! `data.chat_template = true` (self-distillation data for users without the original SFT set).
//!
//! Resumable: finished records go to `OUT.partial` as they complete, and each finished (prompt,
//! sample) unit, kept or dropped, to `OUT.done`; a rerun skips the units listed there. When every
//! unit is done, `OUT.partial` is renamed to `OUT` and `OUT.done` removed, so `OUT` only ever
//! exists complete. Unit `(i, k)` samples with seed `seed + i * samples + k`.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;
use serde_json::{Value, json};

use super::generate::{chat_template, encode_prompt, eos_ids};
use super::loading::load_model;
use super::{ComputeArgs, on_backend};
use crate::data::{ChatTemplate, Message, Tokenizer};
use crate::eval::Decoding;
use crate::eval::generation::{Event, Finish, Sampling, generate_batch};
use crate::model::FloatFormat;
use crate::ops::attention::AttentionBackend;

#[derive(Args, Debug)]
pub struct GenDataArgs {
    /// The teacher: a base checkpoint folder or hub id (or an export / run).
    #[arg(long)]
    pub model: String,
    /// JSONL, one prompt per line: {"prompt": TEXT}, {"messages": [{"role", "content"}, ...]}
    /// (a conversation ending with the turn to answer), or a bare JSON string.
    #[arg(long, value_name = "FILE.jsonl")]
    pub prompts: PathBuf,
    /// The dataset to write (JSONL).
    #[arg(long, value_name = "FILE.jsonl")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f64,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Keep completions cut off at --max-new-tokens (dropped by default: unfinished answers).
    #[arg(long)]
    pub keep_truncated: bool,
    /// Feed the prompt text as is, without the chat template; records are {"text": prompt +
    /// completion}.
    #[arg(long)]
    pub no_chat: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace an existing OUT, and discard an unfinished earlier run's progress.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub compute: ComputeArgs,
}

/// One prompt: what the record repeats, and the conversation it continues.
struct Prompt {
    messages: Vec<Message>,
}

pub fn run(args: GenDataArgs) -> Result<()> {
    ensure!(
        args.batch >= 1 && args.samples >= 1 && args.max_new_tokens >= 1,
        "--batch, --samples and --max-new-tokens must be >= 1"
    );
    ensure!(
        args.top_p > 0.0 && args.top_p <= 1.0,
        "--top-p {} must lie in (0, 1]",
        args.top_p
    );
    ensure!(
        args.temperature.is_finite() && args.temperature >= 0.0,
        "--temperature {} must be a finite number >= 0 (0 = greedy)",
        args.temperature
    );
    if args.out.exists() && !args.force {
        bail!(
            "'{}' already exists; pass --force to replace it",
            args.out.display()
        );
    }
    let (spec, format) = args.compute.resolve()?;
    on_backend!(spec, format, gen_data(&args, format))
}

fn sidecar(out: &Path, suffix: &str) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    out.with_file_name(name)
}

/// The prompts file, one clear error per bad line.
fn read_prompts(path: &Path) -> Result<Vec<Prompt>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --prompts '{}'", path.display()))?;
    let mut out = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), number + 1);
        let value: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let messages = match (&value, value.get("prompt"), value.get("messages")) {
            (Value::String(s), _, _) | (_, Some(Value::String(s)), None) => vec![Message {
                role: "user".into(),
                content: s.clone(),
            }],
            (_, None, Some(m)) => serde_json::from_value::<Vec<Message>>(m.clone())
                .ok()
                .filter(|m| !m.is_empty())
                .with_context(|| {
                    format!(
                        "{}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}",
                        at()
                    )
                })?,
            _ => bail!(
                "{}: expected {{\"prompt\": TEXT}}, {{\"messages\": [...]}} or a JSON string",
                at()
            ),
        };
        out.push(Prompt { messages });
    }
    ensure!(
        !out.is_empty(),
        "--prompts '{}' holds no prompts",
        path.display()
    );
    Ok(out)
}

/// Units finished by an earlier run, after cutting an unfinished last line off `partial`.
fn resume_state(partial: &Path, done: &Path) -> Result<HashSet<(usize, usize)>> {
    let mut finished = HashSet::new();
    if !partial.exists() {
        return Ok(finished);
    }
    let mut bytes =
        std::fs::read(partial).with_context(|| format!("cannot read '{}'", partial.display()))?;
    if let Some(end) = bytes.iter().rposition(|&b| b == b'\n') {
        bytes.truncate(end + 1);
    } else {
        bytes.clear();
    }
    std::fs::write(partial, &bytes)?;
    if let Ok(file) = File::open(done) {
        for line in BufReader::new(file).lines() {
            let line = line?;
            let mut parts = line.split_whitespace().map(str::parse::<usize>);
            if let (Some(Ok(i)), Some(Ok(k))) = (parts.next(), parts.next()) {
                finished.insert((i, k));
            }
        }
    }
    // A record whose unit missed `done` (killed in between) is kept, and its unit counted.
    for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let value: Value = serde_json::from_slice(line)
            .with_context(|| format!("'{}' holds a line that is not JSON", partial.display()))?;
        if let (Some(i), Some(k)) = (value["prompt_index"].as_u64(), value["sample"].as_u64()) {
            finished.insert((i as usize, k as usize));
        }
    }
    Ok(finished)
}

fn gen_data<B: AttentionBackend>(
    args: &GenDataArgs,
    format: FloatFormat,
    device: &B::Device,
) -> Result<()> {
    let prompts = read_prompts(&args.prompts)?;
    let partial = sidecar(&args.out, ".partial");
    let done_path = sidecar(&args.out, ".done");
    if args.force {
        for stale in [&partial, &done_path] {
            if stale.exists() {
                std::fs::remove_file(stale)?;
            }
        }
    }
    let finished = resume_state(&partial, &done_path)?;
    let loaded = load_model::<B>(&args.model, format, device)?;
    let tokenizer = loaded.ckpt.tokenizer()?;
    let template = match args.no_chat {
        true => None,
        false => Some(chat_template(&loaded, "gen-data (without --no-chat)")?),
    };
    let limit = loaded.ckpt.config.max_position_embeddings;
    let encoded = encode_prompts(&prompts, template.as_ref(), &tokenizer, limit, args)?;
    let units: Vec<(usize, usize)> = (0..prompts.len())
        .flat_map(|i| (0..args.samples).map(move |k| (i, k)))
        .filter(|unit| !finished.contains(unit))
        .collect();
    let total = prompts.len() * args.samples;
    tracing::info!(
        "{}: {} of {total} completions to generate ({} done earlier)",
        loaded.description,
        units.len(),
        total - units.len()
    );
    let decoding = Decoding::new(&loaded.model, loaded.dms.is_some());
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        ignore_eos: false,
        eos: eos_ids(&loaded),
    };
    let mut sink = Sink::open(&partial, &done_path, total, total - units.len())?;
    for group in units.chunks(args.batch) {
        let batch: Vec<Vec<u32>> = group.iter().map(|&(i, _)| encoded[i].0.clone()).collect();
        let seeds: Vec<u64> = group
            .iter()
            .map(|&(i, k)| args.seed + (i * args.samples + k) as u64)
            .collect();
        let mut on_event = |event: Event<'_>| -> Result<()> {
            let Event::Finished {
                index,
                generated,
                finish,
            } = event
            else {
                return Ok(());
            };
            let (i, k) = group[index];
            let keep = finish == Finish::Eos || args.keep_truncated;
            let record = keep
                .then(|| -> Result<Value> {
                    let completion = tokenizer.decode(generated, true)?;
                    Ok(record(
                        &prompts[i],
                        &encoded[i].1,
                        completion,
                        template.is_some(),
                    ))
                })
                .transpose()?;
            sink.finished((i, k), record, finish, generated.len())
        };
        generate_batch(
            &decoding,
            &batch,
            &seeds,
            &sampling,
            format.bytes(),
            &mut on_event,
        )?;
    }
    let summary = sink.close()?;
    std::fs::rename(&partial, &args.out).with_context(|| {
        format!(
            "cannot rename '{}' to '{}'",
            partial.display(),
            args.out.display()
        )
    })?;
    std::fs::remove_file(&done_path).ok();
    eprintln!(
        "wrote {}: {summary}{}",
        args.out.display(),
        if args.keep_truncated {
            ""
        } else {
            " (--keep-truncated keeps them)"
        },
    );
    Ok(())
}

/// Each prompt's token ids and rendered text.
fn encode_prompts(
    prompts: &[Prompt],
    template: Option<&ChatTemplate>,
    tokenizer: &Tokenizer,
    limit: usize,
    args: &GenDataArgs,
) -> Result<Vec<(Vec<u32>, String)>> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let which = format!("prompt {} of --prompts", i + 1);
            let room = (limit, args.max_new_tokens);
            encode_prompt(&prompt.messages, template, tokenizer, room, &which)
        })
        .collect()
}

/// One training record: the conversation plus the answer (chat), or the prompt text plus the
/// completion (`--no-chat`).
fn record(prompt: &Prompt, text: &str, completion: String, chat: bool) -> Value {
    if chat {
        let mut messages = prompt.messages.clone();
        messages.push(Message {
            role: "assistant".into(),
            content: completion,
        });
        json!({ "messages": messages })
    } else {
        json!({ "text": format!("{text}{completion}") })
    }
}

/// Where finished units go: kept records to OUT.partial, every finished unit to OUT.done, both
/// flushed as they come; progress on the terminal.
struct Sink {
    records: File,
    done: File,
    bar: indicatif::ProgressBar,
    started: std::time::Instant,
    kept: usize,
    dropped: usize,
    tokens: usize,
}

impl Sink {
    fn open(partial: &Path, done: &Path, total: usize, already: usize) -> Result<Self> {
        let open = |path: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot write '{}'", path.display()))
        };
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_position(already as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} completions, {msg} ({eta} left)",
            )
            .expect("valid template"),
        );
        Ok(Self {
            records: open(partial)?,
            done: open(done)?,
            bar,
            started: std::time::Instant::now(),
            kept: 0,
            dropped: 0,
            tokens: 0,
        })
    }

    fn finished(
        &mut self,
        (i, k): (usize, usize),
        record: Option<Value>,
        finish: Finish,
        generated: usize,
    ) -> Result<()> {
        self.tokens += generated;
        match record {
            Some(mut record) => {
                record["prompt_index"] = json!(i);
                record["sample"] = json!(k);
                record["finish"] = json!(finish);
                record["generated_tokens"] = json!(generated);
                writeln!(self.records, "{record}")?;
                self.records.flush()?;
                self.kept += 1;
            }
            None => self.dropped += 1,
        }
        writeln!(self.done, "{i} {k}")?;
        self.done.flush()?;
        self.bar.inc(1);
        self.bar.set_message(format!(
            "{:.0} tokens/s, {} cut off",
            self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9),
            self.dropped
        ));
        Ok(())
    }

    /// Syncs the records; a line for the user.
    fn close(self) -> Result<String> {
        self.bar.finish_and_clear();
        self.records.sync_all()?;
        Ok(format!(
            "{} completions kept this run, {} cut off at --max-new-tokens dropped; {} tokens \
             generated in {:.1} s",
            self.kept,
            self.dropped,
            self.tokens,
            self.started.elapsed().as_secs_f64()
        ))
    }
}
