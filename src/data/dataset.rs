//! Training data for DMS distillation: the recipe's `[data]` section, reading `.jsonl` / `.txt`
//! files, tokenising, packing into fixed-length sequences, the held-out split and the
//! deterministic sample order.
//!
//! # Documents
//!
//! * `.jsonl`: one JSON object per line (blank lines are skipped, other keys are ignored):
//!   `{"text": "..."}` is encoded as is; `{"messages": [{"role": ..., "content": ...}, ...]}` is
//!   rendered with the checkpoint's chat template (`data.chat_template = true`, otherwise the line
//!   is an error naming `file:line`) and the rendered text is encoded — the template inserts its
//!   own special tokens.
//! * `.txt`: the whole file is one document (`data.txt_split = "file"`), or every blank-line
//!   separated paragraph is one (`"paragraph"`).
//!
//! Every document is encoded with `add_special_tokens = false`. Then, when the checkpoint has a
//! BOS token (`bos_id = Some(..)`), it is prepended unless the document already starts with it (a
//! chat template that prints `bos_token` itself); EOS is appended unless the document already
//! ends with it. Documents that encode to no tokens are skipped (counted in the stats).
//!
//! # Packing (`data.packing = true`, the default)
//!
//! All documents of the training files, in file and line order, are concatenated into one token
//! stream (`[bos] doc1 eos [bos] doc2 eos ...`) which is cut into consecutive windows of
//! `seq_len` tokens. A window may hold the end of one document and the start of the next;
//! attention is *not* blocked at document boundaries (the EOS separates them), as in the official
//! DMS recipe's packing. The final partial window is kept, right-padded with `pad_id` (attention
//! mask 0), when it holds at least `seq_len / 2` tokens; otherwise it is discarded and its tokens
//! are counted in [`DatasetStats::discarded_tokens`]. With `data.packing = false` every document
//! is its own sequence, truncated to `seq_len` (lost tokens counted in
//! [`DatasetStats::truncated_tokens`]) and right-padded.
//!
//! # Held-out data
//!
//! `data.eval_files` are packed the same way into [`Dataset::heldout`]. When there are none, the
//! training sequences are shuffled with `data.shuffle_seed` and the last
//! `ceil(heldout_fraction * n)` of them are held out (at least 1 when `n >= 2` and the fraction is
//! positive; training keeps at least 1). Both splits stay in stream order.
//!
//! # Sample order
//!
//! [`sample_index`] maps a global sample counter to a training sequence: epoch `e = i / n` visits
//! a seeded Fisher–Yates permutation of `0..n` (own SplitMix64 generator, so the order never
//! changes with a dependency's RNG). It is a pure function of `(seed, n, i)`, which makes resuming
//! exact; [`Dataset::fingerprint`] lets a resume check that the data are the same.

use std::cell::RefCell;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::tokenizer::{ChatTemplate, Message, Tokenizer};

/// How a `.txt` training file is cut into documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TxtSplit {
    /// The whole file is one document.
    #[default]
    File,
    /// Every paragraph (lines separated by one or more blank lines) is one document.
    Paragraph,
}

fn default_heldout_fraction() -> f64 {
    0.05
}

fn default_true() -> bool {
    true
}

fn default_text_field() -> String {
    "text".to_string()
}

fn default_messages_field() -> String {
    "messages".to_string()
}

/// The recipe's `[data]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Training files, `.jsonl` (`{"text": ...}` or `{"messages": [...]}` per line) or `.txt`.
    /// Relative paths are resolved against the recipe's folder.
    pub train_files: Vec<PathBuf>,
    /// Held-out files; when empty, `heldout_fraction` of the training sequences are held out.
    #[serde(default)]
    pub eval_files: Vec<PathBuf>,
    /// Fraction of the training sequences held out when `eval_files` is empty, in `[0, 1)`.
    #[serde(default = "default_heldout_fraction")]
    pub heldout_fraction: f64,
    /// Render `messages` lines with the checkpoint's chat template.
    #[serde(default)]
    pub chat_template: bool,
    /// The key (JSONL) or column (parquet) that holds a document's text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// The key or column that holds a chat conversation (a list of `{role, content}`).
    #[serde(default = "default_messages_field")]
    pub messages_field: String,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Concatenate documents and cut into `seq_len` windows (else one document per sequence).
    #[serde(default = "default_true")]
    pub packing: bool,
    /// Seed of the held-out split (the training order uses the train seed via [`sample_index`]).
    #[serde(default)]
    pub shuffle_seed: u64,
    /// At most this many sequences are built from `train_files` (before the held-out split);
    /// documents past the cap are not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_sequences: Option<usize>,
    /// How `.txt` files are cut into documents.
    #[serde(default)]
    pub txt_split: TxtSplit,
    /// How errors name the training files and the length: the recipe's keys, or the flags of a
    /// command that builds its data without a recipe (`eval --data --seq-len`).
    #[serde(skip)]
    pub keys: DataKeys,
}

/// The names errors give the training files and the sequence length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataKeys {
    pub train_files: &'static str,
    pub seq_len: &'static str,
}

impl Default for DataKeys {
    fn default() -> Self {
        Self {
            train_files: "data.train_files",
            seq_len: "data.seq_len",
        }
    }
}

impl DataConfig {
    /// A config with every optional key at its default.
    pub fn new(train_files: Vec<PathBuf>, seq_len: usize) -> Self {
        Self {
            train_files,
            eval_files: Vec::new(),
            heldout_fraction: default_heldout_fraction(),
            chat_template: false,
            text_field: default_text_field(),
            messages_field: default_messages_field(),
            seq_len,
            packing: true,
            shuffle_seed: 0,
            max_sequences: None,
            txt_split: TxtSplit::File,
            keys: DataKeys::default(),
        }
    }

    /// Checks values that serde cannot; errors name the key and what is allowed.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.train_files.is_empty(),
            "{} must list at least one .jsonl, .parquet or .txt file",
            self.keys.train_files
        );
        ensure!(
            self.seq_len >= 2,
            "{} must be >= 2 (got {})",
            self.keys.seq_len,
            self.seq_len
        );
        ensure!(
            self.heldout_fraction.is_finite() && (0.0..1.0).contains(&self.heldout_fraction),
            "data.heldout_fraction must be in [0, 1) (got {})",
            self.heldout_fraction
        );
        if let Some(max) = self.max_sequences {
            ensure!(
                max >= 1,
                "data.max_sequences must be >= 1 when set (got 0); leave it out for no cap"
            );
        }
        Ok(())
    }
}

/// One training sequence: `input_ids` and `attention_mask` both hold exactly `seq_len` entries;
/// padding positions carry `pad_id` and mask 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
}

/// What [`Dataset::build`] read and made.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetStats {
    /// Files read (training + eval).
    pub files: usize,
    /// Non-empty documents encoded.
    pub documents: usize,
    /// Documents that encoded to no tokens (skipped).
    pub empty_documents: usize,
    /// Tokens of the encoded documents, BOS / EOS included.
    pub tokens: usize,
    pub train_sequences: usize,
    pub heldout_sequences: usize,
    /// Sequences with padding (mask 0) at the end.
    pub padded_sequences: usize,
    /// Padding positions over all sequences.
    pub pad_tokens: usize,
    /// Tokens cut off documents longer than `seq_len` (`packing = false` only).
    pub truncated_tokens: usize,
    /// Tokens of final partial windows shorter than `seq_len / 2` (`packing = true` only).
    pub discarded_tokens: usize,
}

impl fmt::Display for DatasetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} files, {} documents ({} empty skipped), {} tokens -> {} training + {} held-out \
             sequences ({} padded, {} pad tokens, {} tokens truncated, {} discarded)",
            self.files,
            self.documents,
            self.empty_documents,
            self.tokens,
            self.train_sequences,
            self.heldout_sequences,
            self.padded_sequences,
            self.pad_tokens,
            self.truncated_tokens,
            self.discarded_tokens
        )
    }
}

/// Tokenised, packed training and held-out sequences.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub train: Vec<Sequence>,
    pub heldout: Vec<Sequence>,
    pub seq_len: usize,
    pub stats: DatasetStats,
    /// FNV-1a hash of `seq_len` and every id and mask of both splits (stable across platforms and
    /// builds): equal fingerprints mean a resumed run sees the same data.
    pub fingerprint: u64,
}

/// A document as read, before encoding.
pub(super) enum Body {
    Text(String),
    Messages(Vec<Message>),
}

pub(super) struct Doc {
    /// 1-based line of a `.jsonl` file (the first line of a paragraph for `.txt`, the row of a
    /// `.parquet` file).
    pub(super) line: usize,
    pub(super) body: Body,
}

/// Special-token ids used when encoding and packing.
#[derive(Clone, Copy)]
struct Specials {
    bos: Option<u32>,
    eos: u32,
}

impl Dataset {
    /// Reads, encodes and packs `cfg`'s files (relative paths against `base_dir`, the recipe's
    /// folder). `template` renders `messages` lines (needed only when some appear and
    /// `cfg.chat_template` is on); `bos_id` is prepended to each document unless it already starts
    /// with it; `eos_id` ends each document; `pad_id` fills padding positions.
    pub fn build(
        cfg: &DataConfig,
        base_dir: &Path,
        tokenizer: &Tokenizer,
        template: Option<&ChatTemplate>,
        bos_id: Option<u32>,
        eos_id: u32,
        pad_id: u32,
    ) -> Result<Dataset> {
        cfg.validate()?;
        let specials = Specials {
            bos: bos_id,
            eos: eos_id,
        };
        let train_files = resolve_files(&cfg.train_files, base_dir, cfg.keys.train_files)?;
        let eval_files = resolve_files(&cfg.eval_files, base_dir, "data.eval_files")?;
        let mut stats = DatasetStats {
            files: train_files.len() + eval_files.len(),
            ..DatasetStats::default()
        };

        let encoder = Encoder {
            cfg,
            tokenizer,
            template,
            specials,
        };
        let mut packer = Packer::new(cfg.seq_len, cfg.packing, pad_id);
        for path in &train_files {
            if cfg.max_sequences.is_some_and(|max| packer.done() >= max) {
                break;
            }
            encoder.feed_file(path, &mut packer, cfg.max_sequences, &mut stats)?;
        }
        let mut train = packer.finish(&mut stats);
        if let Some(max) = cfg.max_sequences {
            train.truncate(max);
        }
        if train.is_empty() {
            bail!(empty_message(
                cfg.keys.train_files,
                &train_files,
                &stats,
                cfg
            ));
        }

        let heldout = if eval_files.is_empty() {
            let n = train.len();
            let k = heldout_count(cfg.heldout_fraction, n);
            if k == 0 && cfg.heldout_fraction > 0.0 {
                tracing::warn!(
                    "data: only {n} training sequence(s); nothing is held out for evaluation"
                );
            }
            let perm = permutation(stream_state(cfg.shuffle_seed, DOMAIN_HELDOUT, 0), n);
            let mut held = vec![false; n];
            for &i in &perm[n - k..] {
                held[i] = true;
            }
            let (heldout, kept): (Vec<_>, Vec<_>) =
                train.into_iter().enumerate().partition(|(i, _)| held[*i]);
            train = kept.into_iter().map(|(_, s)| s).collect();
            heldout.into_iter().map(|(_, s)| s).collect()
        } else {
            let before = stats.clone();
            let mut packer = Packer::new(cfg.seq_len, cfg.packing, pad_id);
            for path in &eval_files {
                encoder.feed_file(path, &mut packer, None, &mut stats)?;
            }
            let heldout = packer.finish(&mut stats);
            if heldout.is_empty() {
                let eval_stats = DatasetStats {
                    documents: stats.documents - before.documents,
                    tokens: stats.tokens - before.tokens,
                    ..DatasetStats::default()
                };
                bail!(empty_message(
                    "data.eval_files",
                    &eval_files,
                    &eval_stats,
                    cfg
                ));
            }
            heldout
        };

        stats.train_sequences = train.len();
        stats.heldout_sequences = heldout.len();
        let all = || train.iter().chain(heldout.iter());
        stats.padded_sequences = all()
            .filter(|s| s.attention_mask.last() == Some(&0))
            .count();
        stats.pad_tokens = all()
            .map(|s| s.attention_mask.iter().filter(|&&m| m == 0).count())
            .sum();
        let fingerprint = fingerprint(cfg.seq_len, &train, &heldout);
        Ok(Dataset {
            train,
            heldout,
            seq_len: cfg.seq_len,
            stats,
            fingerprint,
        })
    }
}

fn empty_message(key: &str, files: &[PathBuf], stats: &DatasetStats, cfg: &DataConfig) -> String {
    let seq_len = cfg.keys.seq_len;
    let names: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    if stats.documents == 0 {
        format!(
            "{key} ({}) hold no non-empty document; give at least one line {{\"text\": ...}} \
             (.jsonl) or some text (.txt)",
            names.join(", ")
        )
    } else {
        format!(
            "{key} ({}) give no sequence: {} tokens in {} documents, but {seq_len} = {} and a \
             final partial window is kept only when it holds >= seq_len / 2 = {} tokens; lower \
             {seq_len} or add text",
            names.join(", "),
            stats.tokens,
            stats.documents,
            cfg.seq_len,
            cfg.seq_len.div_ceil(2)
        )
    }
}

/// Number of sequences held out of `n`.
fn heldout_count(fraction: f64, n: usize) -> usize {
    if n < 2 || fraction <= 0.0 {
        return 0;
    }
    ((fraction * n as f64).ceil() as usize).clamp(1, n - 1)
}

/// The local files of a data key: paths (relative to `base_dir`), `*` / `?` globs over file
/// names, and Hugging Face dataset files `hf://datasets/ORG/NAME[@REV]/PATH` (see [`super::hub`]).
fn resolve_files(files: &[PathBuf], base_dir: &Path, key: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in files {
        let spec = p.to_string_lossy();
        if let Some(hub) = super::hub::DatasetFiles::parse(&spec) {
            let found = hub.resolve().with_context(|| format!("{key}: '{spec}'"))?;
            for path in found {
                out.push(check_extension(path, key)?);
            }
            continue;
        }
        let path = if p.is_absolute() {
            p.clone()
        } else {
            base_dir.join(p)
        };
        if super::hub::is_glob(&spec) {
            let found = super::hub::glob_local(&path)?;
            ensure!(
                !found.is_empty(),
                "{key}: no file matches '{}' (relative paths are resolved against '{}')",
                path.display(),
                base_dir.display()
            );
            for path in found {
                out.push(check_extension(path, key)?);
            }
            continue;
        }
        if !path.is_file() {
            bail!(
                "{key}: '{}' does not exist or is not a file (relative paths are resolved \
                 against '{}')",
                path.display(),
                base_dir.display()
            );
        }
        out.push(check_extension(path, key)?);
    }
    Ok(out)
}

fn check_extension(path: PathBuf, key: &str) -> Result<PathBuf> {
    match extension(&path).as_deref() {
        Some("jsonl") | Some("txt") | Some("parquet") => Ok(path),
        _ => bail!(
            "{key}: '{}' has an unknown extension; data files must be .jsonl (one \
             {{\"text\": ...}} or {{\"messages\": [...]}} object per line), .parquet (a text \
             or messages column) or .txt",
            path.display()
        ),
    }
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// Reads one file into documents (no encoding yet).
fn read_documents(path: &Path, cfg: &DataConfig) -> Result<Vec<Doc>> {
    if extension(path).as_deref() == Some("parquet") {
        let (docs, nulls) = super::parquet::read_documents(path, cfg)?;
        if nulls > 0 {
            tracing::warn!("{}: {nulls} rows with a null value skipped", path.display());
        }
        return Ok(docs);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read '{}' as UTF-8 text", path.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut docs = Vec::new();
    if extension(path).as_deref() == Some("jsonl") {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let body = parse_jsonl_line(line, cfg)
                .map_err(|e| anyhow!("{}:{}: {e}", path.display(), i + 1))?;
            docs.push(Doc { line: i + 1, body });
        }
    } else {
        match cfg.txt_split {
            TxtSplit::File => docs.push(Doc {
                line: 1,
                body: Body::Text(text.to_string()),
            }),
            TxtSplit::Paragraph => {
                let mut current: Vec<&str> = Vec::new();
                let mut start = 0;
                for (i, line) in text.lines().chain(std::iter::once("")).enumerate() {
                    if line.trim().is_empty() {
                        if !current.is_empty() {
                            docs.push(Doc {
                                line: start + 1,
                                body: Body::Text(current.join("\n")),
                            });
                            current.clear();
                        }
                    } else {
                        if current.is_empty() {
                            start = i;
                        }
                        current.push(line);
                    }
                }
            }
        }
    }
    Ok(docs)
}

fn parse_jsonl_line(line: &str, cfg: &DataConfig) -> Result<Body> {
    let (text_key, messages_key) = (cfg.text_field.as_str(), cfg.messages_field.as_str());
    let expected = format!(
        "each line must be a JSON object {{\"{text_key}\": \"...\"}} or {{\"{messages_key}\": \
         [{{\"role\": ..., \"content\": ...}}, ...]}} (keys: data.text_field, data.messages_field)"
    );
    let value: Value =
        serde_json::from_str(line).map_err(|e| anyhow!("not valid JSON ({e}); {expected}"))?;
    let Value::Object(obj) = value else {
        bail!("not a JSON object; {expected}");
    };
    match (obj.get(text_key), obj.get(messages_key)) {
        (Some(_), Some(_)) => {
            bail!("has both \"{text_key}\" and \"{messages_key}\"; {expected}")
        }
        (Some(Value::String(s)), None) => Ok(Body::Text(s.clone())),
        (Some(_), None) => bail!("\"{text_key}\" must be a string; {expected}"),
        (None, Some(messages)) => {
            if !cfg.chat_template {
                bail!(
                    "a chat conversation (\"{messages_key}\") but data.chat_template is false; \
                     set data.chat_template = true to render it with the checkpoint's chat \
                     template, or give the line a \"{text_key}\" field instead"
                );
            }
            let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
                anyhow!(
                    "\"{messages_key}\" must be a list of {{\"role\": string, \"content\": \
                     string}} ({e})"
                )
            })?;
            ensure!(!messages.is_empty(), "\"{messages_key}\" is an empty list");
            Ok(Body::Messages(messages))
        }
        (None, None) => bail!("no \"{text_key}\" or \"{messages_key}\" key; {expected}"),
    }
}

struct Encoder<'a> {
    cfg: &'a DataConfig,
    tokenizer: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    specials: Specials,
}

/// Documents encoded per parallel round (bounds the work done past `max_sequences`).
const ENCODE_BATCH: usize = 1024;

impl Encoder<'_> {
    /// Reads, encodes and packs one file, stopping once `max` sequences are complete.
    fn feed_file(
        &self,
        path: &Path,
        packer: &mut Packer,
        max: Option<usize>,
        stats: &mut DatasetStats,
    ) -> Result<()> {
        let docs = read_documents(path, self.cfg)?;
        for batch in docs.chunks(ENCODE_BATCH) {
            for ids in self.encode_parallel(batch, path)? {
                if ids.is_empty() {
                    stats.empty_documents += 1;
                    continue;
                }
                stats.documents += 1;
                stats.tokens += ids.len();
                packer.push(&ids, stats);
                if max.is_some_and(|max| packer.done() >= max) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn encode_parallel(&self, docs: &[Doc], path: &Path) -> Result<Vec<Vec<u32>>> {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(docs.len())
            .max(1);
        if threads == 1 {
            return docs.iter().map(|d| self.encode(d, path)).collect();
        }
        let chunk = docs.len().div_ceil(threads);
        let parts: Vec<Result<Vec<Vec<u32>>>> = std::thread::scope(|s| {
            let handles: Vec<_> = docs
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(|d| self.encode(d, path)).collect()))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a tokeniser thread panicked"))
                .collect()
        });
        let mut out = Vec::with_capacity(docs.len());
        for part in parts {
            out.extend(part?);
        }
        Ok(out)
    }

    /// Encodes one document and adds BOS / EOS; an empty document gives no ids at all.
    fn encode(&self, doc: &Doc, path: &Path) -> Result<Vec<u32>> {
        let at = || format!("{}:{}", path.display(), doc.line);
        let mut ids = match &doc.body {
            Body::Text(text) => self.tokenizer.encode(text, false).with_context(at)?,
            Body::Messages(messages) => {
                let template = self.template.ok_or_else(|| {
                    anyhow!(
                        "{}: data.chat_template = true but the checkpoint has no chat template \
                         (tokenizer_config.json \"chat_template\")",
                        at()
                    )
                })?;
                let text = template
                    .render(messages, false, &serde_json::Map::new())
                    .with_context(at)?;
                self.tokenizer.encode(&text, false).with_context(at)?
            }
        };
        if ids.is_empty() {
            return Ok(ids);
        }
        if let Some(bos) = self.specials.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        if ids.last() != Some(&self.specials.eos) {
            ids.push(self.specials.eos);
        }
        Ok(ids)
    }
}

/// Cuts a token stream (packing) or single documents into `seq_len` sequences.
struct Packer {
    seq_len: usize,
    packing: bool,
    pad: u32,
    current: Vec<i64>,
    done: Vec<Sequence>,
}

impl Packer {
    fn new(seq_len: usize, packing: bool, pad: u32) -> Self {
        Self {
            seq_len,
            packing,
            pad,
            current: Vec::with_capacity(seq_len),
            done: Vec::new(),
        }
    }

    fn done(&self) -> usize {
        self.done.len()
    }

    fn push(&mut self, ids: &[u32], stats: &mut DatasetStats) {
        if self.packing {
            for &id in ids {
                self.current.push(i64::from(id));
                if self.current.len() == self.seq_len {
                    let input_ids =
                        std::mem::replace(&mut self.current, Vec::with_capacity(self.seq_len));
                    self.done.push(Sequence {
                        input_ids,
                        attention_mask: vec![1; self.seq_len],
                    });
                }
            }
        } else {
            let kept = ids.len().min(self.seq_len);
            stats.truncated_tokens += ids.len() - kept;
            let ids: Vec<i64> = ids[..kept].iter().map(|&id| i64::from(id)).collect();
            self.done.push(self.padded(ids));
        }
    }

    fn padded(&self, mut ids: Vec<i64>) -> Sequence {
        let real = ids.len();
        ids.resize(self.seq_len, i64::from(self.pad));
        let mut attention_mask = vec![1; real];
        attention_mask.resize(self.seq_len, 0);
        Sequence {
            input_ids: ids,
            attention_mask,
        }
    }

    fn finish(mut self, stats: &mut DatasetStats) -> Vec<Sequence> {
        let rest = std::mem::take(&mut self.current);
        if !rest.is_empty() {
            if rest.len() * 2 >= self.seq_len {
                let seq = self.padded(rest);
                self.done.push(seq);
            } else {
                stats.discarded_tokens += rest.len();
            }
        }
        self.done
    }
}

/// FNV-1a over `seq_len`, the split sizes and every id and mask, little-endian.
fn fingerprint(seq_len: usize, train: &[Sequence], heldout: &[Sequence]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: i64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(seq_len as i64);
    for split in [train, heldout] {
        eat(split.len() as i64);
        for s in split {
            s.input_ids.iter().for_each(|&v| eat(v));
            s.attention_mask.iter().for_each(|&v| eat(v));
        }
    }
    h
}

// --- Deterministic order -------------------------------------------------------------------

const DOMAIN_EPOCH: u64 = 0x6570_6f63_685f_7065; // "epoch_pe"
const DOMAIN_HELDOUT: u64 = 0x6865_6c64_6f75_7421; // "heldout!"

/// SplitMix64 (Steele, Lea & Flood 2014): tiny, fast, and fixed forever here.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// A value in `0..bound` (Lemire's multiply-shift; bias < bound / 2^64).
    fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn stream_state(seed: u64, domain: u64, index: u64) -> u64 {
    mix64(mix64(seed ^ domain) ^ index)
}

/// Fisher–Yates shuffle of `0..n` driven by SplitMix64 from `state`.
fn permutation(state: u64, n: usize) -> Vec<usize> {
    let mut rng = SplitMix64(state);
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    perm
}

/// The visiting order of epoch `epoch` over `n` training sequences.
pub fn epoch_permutation(seed: u64, n: usize, epoch: u64) -> Vec<usize> {
    permutation(stream_state(seed, DOMAIN_EPOCH, epoch), n)
}

/// An epoch's permutation with its key: (seed, n, epoch, permutation).
type CachedEpoch = (u64, usize, u64, Vec<usize>);

thread_local! {
    /// The last epoch permutation computed on this thread.
    static LAST_EPOCH: RefCell<Option<CachedEpoch>> = const { RefCell::new(None) };
}

/// The training sequence of global sample `global_index`: epoch `e = global_index / n` uses
/// [`epoch_permutation`]`(seed, n, e)` and the sample is its entry `global_index % n`. A pure
/// function of its arguments (the epoch's permutation is cached per thread, so consecutive calls
/// cost O(1)). Panics when `n == 0`.
pub fn sample_index(seed: u64, n: usize, global_index: u64) -> usize {
    assert!(n > 0, "sample_index over an empty training set");
    let epoch = global_index / n as u64;
    let i = (global_index % n as u64) as usize;
    LAST_EPOCH.with(|cache| {
        let mut cache = cache.borrow_mut();
        match &*cache {
            Some((s, m, e, perm)) if (*s, *m, *e) == (seed, n, epoch) => perm[i],
            _ => {
                let perm = epoch_permutation(seed, n, epoch);
                let out = perm[i];
                *cache = Some((seed, n, epoch, perm));
                out
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::OnceLock;

    const EOS: u32 = 256;
    const PAD: u32 = 256;

    fn repo(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
    }

    /// The byte-level tiny-llama tokenizer: id == byte, <|endoftext|> 256, <|im_start|> 257,
    /// <|im_end|> 258.
    fn bytes_tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| Tokenizer::from_file(&repo("data/tiny-llama/tokenizer.json")).unwrap())
    }

    fn llama3_tok() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            Tokenizer::from_file(&repo("tests/fixtures/tokenizers/llama3/tokenizer.json")).unwrap()
        })
    }

    fn jsonl(texts: &[&str]) -> String {
        texts
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
            .collect()
    }

    fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        PathBuf::from(name)
    }

    fn ids(s: &str) -> Vec<i64> {
        s.bytes().map(i64::from).collect()
    }

    fn build(cfg: &DataConfig, dir: &Path, bos: Option<u32>) -> Result<Dataset> {
        Dataset::build(cfg, dir, bytes_tok(), None, bos, EOS, PAD)
    }

    /// Train file + a separate eval file, so the train split is exactly the packed stream.
    fn train_eval(dir: &Path, train: &[&str], seq_len: usize) -> DataConfig {
        let mut cfg = DataConfig::new(vec![write(dir, "train.jsonl", &jsonl(train))], seq_len);
        cfg.eval_files = vec![write(dir, "eval.jsonl", &jsonl(&["0123456789abcdef"]))];
        cfg
    }

    #[test]
    fn packing_windows_eos_and_padding() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = train_eval(dir.path(), &["abc", "defgh"], 4);
        let ds = build(&cfg, dir.path(), None).unwrap();
        // Stream: a b c E d e f g h E -> [abcE] [defg] [hE..] (2 >= 4/2: padded).
        let e = i64::from(EOS);
        let p = i64::from(PAD);
        let mut w0 = ids("abc");
        w0.push(e);
        let expected = vec![
            (w0, vec![1, 1, 1, 1]),
            (ids("defg"), vec![1, 1, 1, 1]),
            (vec![i64::from(b'h'), e, p, p], vec![1, 1, 0, 0]),
        ];
        let got: Vec<_> = ds
            .train
            .iter()
            .map(|s| (s.input_ids.clone(), s.attention_mask.clone()))
            .collect();
        assert_eq!(got, expected);
        assert!(
            ds.train
                .iter()
                .chain(&ds.heldout)
                .all(|s| s.input_ids.len() == 4 && s.attention_mask.len() == 4)
        );
        // Eval: 16 bytes + EOS = 17 tokens -> 4 windows, 1 leftover < 2 discarded.
        assert_eq!(ds.heldout.len(), 4);
        assert_eq!(ds.stats.discarded_tokens, 1);
        assert_eq!(ds.stats.documents, 3);
        assert_eq!(ds.stats.tokens, 10 + 17);
        assert_eq!(ds.stats.padded_sequences, 1);
        assert_eq!(ds.stats.pad_tokens, 2);
        assert_eq!(
            (ds.stats.train_sequences, ds.stats.heldout_sequences),
            (3, 4)
        );
        assert_eq!(ds.stats.files, 2);
    }

    #[test]
    fn short_final_window_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        // 9 bytes + EOS = 10 tokens, seq_len 8: one window, 2 tokens < 4 discarded.
        let cfg = train_eval(dir.path(), &["abcdefghi"], 8);
        let ds = build(&cfg, dir.path(), None).unwrap();
        assert_eq!(ds.train.len(), 1);
        assert_eq!(ds.train[0].input_ids, ids("abcdefgh"));
        assert_eq!(ds.stats.discarded_tokens, 2 + 1);
    }

    #[test]
    fn bos_is_prepended_once() {
        let dir = tempfile::tempdir().unwrap();
        // The second document already starts with <|endoftext|> (id 256): no second BOS.
        let cfg = train_eval(dir.path(), &["ab", "<|endoftext|>cd"], 12);
        let ds = build(&cfg, dir.path(), Some(EOS)).unwrap();
        let e = i64::from(EOS);
        let mut want = vec![e];
        want.extend(ids("ab"));
        want.extend([e, e]);
        want.extend(ids("cd"));
        want.push(e);
        want.resize(12, i64::from(PAD));
        assert_eq!(ds.train[0].input_ids, want);
        assert_eq!(ds.train[0].attention_mask.iter().sum::<i64>(), 8);
    }

    #[test]
    fn eos_is_not_doubled() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = train_eval(dir.path(), &["ab<|endoftext|>"], 3);
        let ds = build(&cfg, dir.path(), None).unwrap();
        let mut want = ids("ab");
        want.push(i64::from(EOS));
        assert_eq!(ds.train[0].input_ids, want);
    }

    #[test]
    fn no_packing_truncates_and_pads() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = train_eval(dir.path(), &["abcdefg", "xy", ""], 4);
        cfg.packing = false;
        let ds = build(&cfg, dir.path(), None).unwrap();
        let e = i64::from(EOS);
        let p = i64::from(PAD);
        assert_eq!(ds.train.len(), 2);
        assert_eq!(ds.train[0].input_ids, ids("abcd"));
        assert_eq!(ds.train[0].attention_mask, vec![1; 4]);
        assert_eq!(ds.train[1].input_ids, vec![120, 121, e, p]);
        assert_eq!(ds.train[1].attention_mask, vec![1, 1, 1, 0]);
        assert_eq!(ds.stats.empty_documents, 1);
        // "abcdefg" + EOS = 8 tokens, 4 kept; eval 17 tokens, 4 kept.
        assert_eq!(ds.stats.truncated_tokens, 4 + 13);
        assert_eq!(ds.stats.discarded_tokens, 0);
    }

    #[test]
    fn heldout_split_sizes() {
        assert_eq!(heldout_count(0.05, 0), 0);
        assert_eq!(heldout_count(0.05, 1), 0);
        assert_eq!(heldout_count(0.05, 2), 1);
        assert_eq!(heldout_count(0.05, 20), 1);
        assert_eq!(heldout_count(0.05, 21), 2);
        assert_eq!(heldout_count(0.5, 5), 3);
        assert_eq!(heldout_count(0.99, 3), 2);
        assert_eq!(heldout_count(0.0, 100), 0);

        let dir = tempfile::tempdir().unwrap();
        // 40 documents of 7 bytes + EOS = 320 tokens = 40 windows of 8.
        let docs: Vec<String> = (0..40).map(|i| format!("doc {i:03}")).collect();
        let refs: Vec<&str> = docs.iter().map(String::as_str).collect();
        let mut cfg = DataConfig::new(vec![write(dir.path(), "t.jsonl", &jsonl(&refs))], 8);
        cfg.heldout_fraction = 0.1;
        let a = build(&cfg, dir.path(), None).unwrap();
        assert_eq!((a.train.len(), a.heldout.len()), (36, 4));
        // Disjoint, complete, each split in stream order.
        let all: HashSet<_> = a
            .train
            .iter()
            .chain(&a.heldout)
            .map(|s| &s.input_ids)
            .collect();
        assert_eq!(all.len(), 40);
        let order = |seqs: &[Sequence]| {
            seqs.windows(2)
                .all(|w| w[0].input_ids[..7] < w[1].input_ids[..7])
        };
        assert!(order(&a.train) && order(&a.heldout));
        // Same seed, same split and fingerprint; another seed, another split.
        let again = build(&cfg, dir.path(), None).unwrap();
        assert_eq!(again.heldout, a.heldout);
        assert_eq!(again.fingerprint, a.fingerprint);
        cfg.shuffle_seed = 7;
        let other = build(&cfg, dir.path(), None).unwrap();
        assert_ne!(other.heldout, a.heldout);
        assert_ne!(other.fingerprint, a.fingerprint);
        // max_sequences caps the sequences built before the split.
        cfg.max_sequences = Some(10);
        let capped = build(&cfg, dir.path(), None).unwrap();
        assert_eq!((capped.train.len(), capped.heldout.len()), (9, 1));
        assert!(
            capped
                .train
                .iter()
                .chain(&capped.heldout)
                .all(|s| s.input_ids[..7] <= ids("doc 009")[..])
        );
        // One sequence: nothing held out.
        cfg.max_sequences = Some(1);
        let one = build(&cfg, dir.path(), None).unwrap();
        assert_eq!((one.train.len(), one.heldout.len()), (1, 0));
    }

    #[test]
    fn sample_index_is_a_seeded_permutation_per_epoch() {
        let n = 50;
        let epoch = |seed: u64, e: u64| -> Vec<usize> {
            (e * n as u64..(e + 1) * n as u64)
                .map(|i| sample_index(seed, n, i))
                .collect()
        };
        let e0 = epoch(3, 0);
        let e1 = epoch(3, 1);
        let mut sorted = e0.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        let mut sorted = e1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        assert_ne!(e0, e1);
        assert_ne!(e0, (0..n).collect::<Vec<_>>());
        assert_eq!(e0, epoch(3, 0));
        assert_eq!(e0, epoch_permutation(3, n, 0));
        assert_ne!(e0, epoch(4, 0));
        // Interleaved calls (cache misses) give the same answers.
        for i in [0u64, 77, 3, 149, 50, 2] {
            let direct = epoch_permutation(3, n, i / n as u64)[(i % n as u64) as usize];
            assert_eq!(sample_index(3, n, i), direct);
            assert_eq!(
                sample_index(9, 7, i),
                epoch_permutation(9, 7, i / 7)[(i % 7) as usize]
            );
        }
        assert_eq!(sample_index(5, 1, 12345), 0);
        // Pinned: changing the generator would silently change resumed runs.
        assert_eq!(
            epoch_permutation(0, 10, 0),
            PINNED_EPOCH0,
            "the sample order changed"
        );
    }

    const PINNED_EPOCH0: [usize; 10] = [2, 5, 8, 6, 3, 7, 4, 9, 0, 1];

    #[test]
    fn messages_need_chat_template() {
        let dir = tempfile::tempdir().unwrap();
        let content = format!(
            "{}\n{}\n",
            serde_json::json!({"text": "plain"}),
            serde_json::json!({"messages": [{"role": "user", "content": "hi"}]})
        );
        let cfg = DataConfig::new(vec![write(dir.path(), "chat.jsonl", &content)], 8);
        let err = format!("{:#}", build(&cfg, dir.path(), None).unwrap_err());
        assert!(err.contains("chat.jsonl:2:"), "{err}");
        assert!(err.contains("data.chat_template = true"), "{err}");

        // On, but the checkpoint has no template.
        let mut cfg = cfg;
        cfg.chat_template = true;
        let err = format!("{:#}", build(&cfg, dir.path(), None).unwrap_err());
        assert!(
            err.contains("chat.jsonl:2:") && err.contains("no chat template"),
            "{err}"
        );
    }

    /// A dataset of fixture files (absolute paths), unpacked so each document is one sequence.
    fn unpacked(files: &[&str], edit: impl Fn(&mut DataConfig)) -> Result<Dataset> {
        let files = files.iter().map(|f| repo(f)).collect();
        let mut cfg = DataConfig::new(files, 256);
        cfg.heldout_fraction = 0.0;
        cfg.packing = false;
        edit(&mut cfg);
        let template = ChatTemplate::from_tokenizer_config(&repo(
            "tests/fixtures/tokenizers/qwen3/tokenizer_config.json",
        ))
        .unwrap();
        Dataset::build(
            &cfg,
            Path::new("."),
            bytes_tok(),
            Some(&template),
            None,
            EOS,
            PAD,
        )
    }

    fn error_text(result: Result<Dataset>) -> String {
        match result {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn parquet_rows_equal_their_jsonl_twins() {
        // Text column (snappy, two row groups, a null row skipped, an empty row counted).
        let jsonl = unpacked(&["tests/fixtures/parquet/text.jsonl"], |_| {}).unwrap();
        let parquet = unpacked(&["tests/fixtures/parquet/text-snappy.parquet"], |_| {}).unwrap();
        assert_eq!(parquet.train, jsonl.train);
        assert_eq!(parquet.stats.documents, 4);
        assert_eq!(parquet.stats.empty_documents, 1);
        // Another column name (gzip), chosen by data.text_field.
        let content = unpacked(&["tests/fixtures/parquet/content-gzip.parquet"], |c| {
            c.text_field = "content".into()
        })
        .unwrap();
        assert_eq!(content.train, jsonl.train);
        // Conversations as list<struct<role, content>> (zstd), rendered like JSONL messages.
        let chat = |f: &str| unpacked(&[f], |c| c.chat_template = true).unwrap().train;
        let twin = chat("tests/fixtures/parquet/chat.jsonl");
        assert_eq!(twin.len(), 2);
        assert_eq!(chat("tests/fixtures/parquet/chat-zstd.parquet"), twin);
        // A pattern picks files in sorted order.
        let both = unpacked(&["tests/fixtures/parquet/*-*.parquet"], |c| {
            c.chat_template = true
        });
        // chat-zstd has no text column, content-gzip no text or messages column: one error
        // naming the file, its columns and the keys to set.
        let err = error_text(both);
        assert!(
            err.contains("content-gzip.parquet")
                && err.contains("content, score")
                && err.contains("data.text_field"),
            "{err}"
        );
    }

    #[test]
    fn parquet_errors_name_the_file_and_the_fix() {
        let err = |files: &[&str], edit: fn(&mut DataConfig)| error_text(unpacked(files, edit));
        let e = err(&["tests/fixtures/parquet/chat-zstd.parquet"], |_| {});
        assert!(
            e.contains("chat-zstd.parquet") && e.contains("data.chat_template = true"),
            "{e}"
        );
        // A text column that holds no strings.
        let e = err(&["tests/fixtures/parquet/text-snappy.parquet"], |c| {
            c.text_field = "id".into()
        });
        assert!(
            e.contains("text-snappy.parquet: row 1, column 'id'")
                && e.contains("expected a string"),
            "{e}"
        );
        let e = err(&["tests/fixtures/parquet/text.jsonl"], |c| {
            c.train_files = vec![repo("tests/fixtures/parquet/nothing-*.parquet")]
        });
        assert!(
            e.contains("no file matches") && e.contains("nothing-*.parquet"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.parquet");
        std::fs::write(&bad, "not parquet").unwrap();
        let e = error_text(unpacked(&[bad.to_str().unwrap()], |_| {}));
        assert!(
            e.contains("bad.parquet") && e.contains("not a readable parquet file"),
            "{e}"
        );
    }

    #[test]
    fn messages_are_rendered_with_the_template() {
        let dir = tempfile::tempdir().unwrap();
        let messages = serde_json::json!([
            {"role": "user", "content": "Who is there?"},
            {"role": "assistant", "content": "Nay, answer me."}
        ]);
        let content = format!("{}\n", serde_json::json!({ "messages": messages }));
        let mut cfg = DataConfig::new(vec![write(dir.path(), "chat.jsonl", &content)], 256);
        cfg.chat_template = true;
        cfg.heldout_fraction = 0.0;
        cfg.packing = false;
        for config in [
            "tests/fixtures/tokenizers/qwen3/tokenizer_config.json",
            "data/tiny-llama/tokenizer_config.json",
        ] {
            let template = ChatTemplate::from_tokenizer_config(&repo(config)).unwrap();
            let ds = Dataset::build(
                &cfg,
                dir.path(),
                bytes_tok(),
                Some(&template),
                None,
                EOS,
                PAD,
            )
            .unwrap();
            let rendered: Vec<Message> = serde_json::from_value(messages.clone()).unwrap();
            let text = template
                .render(&rendered, false, &serde_json::Map::new())
                .unwrap();
            let mut want: Vec<i64> = bytes_tok()
                .encode(&text, false)
                .unwrap()
                .into_iter()
                .map(i64::from)
                .collect();
            // The template's <|im_start|> / <|im_end|> are single special tokens.
            assert!(want.contains(&257) && want.contains(&258), "{config}");
            want.push(i64::from(EOS));
            let s = &ds.train[0];
            let real = s.attention_mask.iter().filter(|&&m| m == 1).count();
            assert_eq!(s.input_ids[..real], want[..], "{config}");
        }
    }

    #[test]
    fn malformed_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "{\"text\": \"ok\"}\n\n{\"text\": 3}\n",
                "bad.jsonl:3:",
                "must be a string",
            ),
            (
                "{\"text\": \"ok\"}\nnot json\n",
                "bad.jsonl:2:",
                "not valid JSON",
            ),
            ("[1, 2]\n", "bad.jsonl:1:", "not a JSON object"),
            (
                "{\"prompt\": \"x\"}\n",
                "bad.jsonl:1:",
                "no \"text\" or \"messages\"",
            ),
            (
                "{\"text\": \"a\", \"messages\": []}\n",
                "bad.jsonl:1:",
                "both",
            ),
        ];
        for (content, at, what) in cases {
            let cfg = DataConfig::new(vec![write(dir.path(), "bad.jsonl", content)], 8);
            let err = format!("{:#}", build(&cfg, dir.path(), None).unwrap_err());
            assert!(err.contains(at) && err.contains(what), "{err}");
            assert!(err.contains("{\"text\": \"...\"}"), "{err}");
        }
        let mut chat = DataConfig::new(
            vec![write(
                dir.path(),
                "bad.jsonl",
                "{\"messages\": [{\"role\": \"user\"}]}\n",
            )],
            8,
        );
        chat.chat_template = true;
        let err = format!("{:#}", build(&chat, dir.path(), None).unwrap_err());
        assert!(
            err.contains("bad.jsonl:1:") && err.contains("\"role\": string"),
            "{err}"
        );
    }

    #[test]
    fn file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = DataConfig::new(vec![PathBuf::from("nope.jsonl")], 8);
        let err = format!("{:#}", build(&missing, dir.path(), None).unwrap_err());
        assert!(
            err.contains("nope.jsonl") && err.contains("does not exist"),
            "{err}"
        );

        let csv = DataConfig::new(vec![write(dir.path(), "a.csv", "text\nhello\n")], 8);
        let err = format!("{:#}", build(&csv, dir.path(), None).unwrap_err());
        assert!(
            err.contains("a.csv") && err.contains("unknown extension"),
            "{err}"
        );

        let mut eval_missing = DataConfig::new(vec![write(dir.path(), "t.txt", "hello")], 4);
        eval_missing.eval_files = vec![PathBuf::from("gone.jsonl")];
        let err = format!("{:#}", build(&eval_missing, dir.path(), None).unwrap_err());
        assert!(
            err.contains("data.eval_files") && err.contains("gone.jsonl"),
            "{err}"
        );

        // 5 tokens vs seq_len 64: nothing survives; the message says why.
        let short = DataConfig::new(vec![write(dir.path(), "s.txt", "tiny")], 64);
        let err = format!("{:#}", build(&short, dir.path(), None).unwrap_err());
        assert!(
            err.contains("5 tokens") && err.contains("data.seq_len = 64"),
            "{err}"
        );
        let empty = DataConfig::new(vec![write(dir.path(), "e.jsonl", "\n\n")], 8);
        let err = format!("{:#}", build(&empty, dir.path(), None).unwrap_err());
        assert!(err.contains("no non-empty document"), "{err}");
    }

    #[test]
    fn txt_split_file_or_paragraph() {
        let dir = tempfile::tempdir().unwrap();
        let text = "First para\nline two\n\n\n  \nSecond\n";
        let mut cfg = DataConfig::new(vec![write(dir.path(), "p.txt", text)], 48);
        cfg.heldout_fraction = 0.0;
        let whole = build(&cfg, dir.path(), None).unwrap();
        assert_eq!(whole.stats.documents, 1);
        let mut want = ids(text);
        want.push(i64::from(EOS));
        assert_eq!(whole.train[0].input_ids[..want.len()], want[..]);

        cfg.txt_split = TxtSplit::Paragraph;
        let paras = build(&cfg, dir.path(), None).unwrap();
        assert_eq!(paras.stats.documents, 2);
        let mut want = ids("First para\nline two");
        want.push(i64::from(EOS));
        want.extend(ids("Second"));
        want.push(i64::from(EOS));
        assert_eq!(paras.train[0].input_ids[..want.len()], want[..]);
    }

    #[test]
    fn real_llama3_tokenizer_packing() {
        let dir = tempfile::tempdir().unwrap();
        let docs = [
            "The quick brown fox jumps over the lazy dog.",
            "To be, or not to be, that is the question: whether 'tis nobler in the mind",
            "Ünïcödé and emoji 🎭 survive tokenisation.",
        ];
        let mut cfg = DataConfig::new(vec![write(dir.path(), "t.jsonl", &jsonl(&docs))], 8);
        cfg.heldout_fraction = 0.2;
        let tok = llama3_tok();
        let bos = tok.token_to_id("<|begin_of_text|>").unwrap();
        let eos = tok.token_to_id("<|end_of_text|>").unwrap();
        let ds = Dataset::build(&cfg, dir.path(), tok, None, Some(bos), eos, eos).unwrap();
        let mut stream = Vec::new();
        for d in docs {
            stream.push(i64::from(bos));
            stream.extend(tok.encode(d, false).unwrap().into_iter().map(i64::from));
            stream.push(i64::from(eos));
        }
        assert_eq!(ds.stats.tokens, stream.len());
        let n = ds.train.len() + ds.heldout.len();
        let full = stream.len() / 8;
        let rest = stream.len() % 8;
        assert_eq!(n, full + usize::from(rest >= 4));
        assert_eq!(ds.heldout.len(), (0.2 * n as f64).ceil() as usize);
        // Without a held-out split the windows are the stream, in order.
        cfg.heldout_fraction = 0.0;
        let all = Dataset::build(&cfg, dir.path(), tok, None, Some(bos), eos, eos).unwrap();
        assert_eq!(all.train.len(), n);
        let rebuilt: Vec<i64> = all
            .train
            .iter()
            .flat_map(|s| {
                s.input_ids
                    .iter()
                    .zip(&s.attention_mask)
                    .filter(|(_, m)| **m == 1)
                    .map(|(&id, _)| id)
            })
            .collect();
        let kept = if rest >= 4 { stream.len() } else { full * 8 };
        assert_eq!(rebuilt, stream[..kept]);
        assert_eq!(all.stats.discarded_tokens, stream.len() - kept);
    }

    #[test]
    fn config_from_toml_defaults_and_validation() {
        let cfg: DataConfig =
            toml::from_str("train_files = [\"a.jsonl\"]\nseq_len = 128\n").unwrap();
        assert_eq!(cfg, DataConfig::new(vec![PathBuf::from("a.jsonl")], 128));
        assert_eq!(cfg.heldout_fraction, 0.05);
        assert!(cfg.packing && !cfg.chat_template);
        let full: DataConfig = toml::from_str(
            "train_files = [\"a.txt\"]\neval_files = [\"b.jsonl\"]\nheldout_fraction = 0.1\n\
             chat_template = true\nseq_len = 64\npacking = false\nshuffle_seed = 3\n\
             max_sequences = 10\ntxt_split = \"paragraph\"\n",
        )
        .unwrap();
        assert_eq!(full.txt_split, TxtSplit::Paragraph);
        assert_eq!(full.max_sequences, Some(10));
        let back: DataConfig = toml::from_str(&toml::to_string(&full).unwrap()).unwrap();
        assert_eq!(back, full);
        let back: DataConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);

        let err = toml::from_str::<DataConfig>("train_files = []\nseq_len = 8\nseqlen = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("seqlen"), "{err}");
        let err =
            toml::from_str::<DataConfig>("train_files = []\nseq_len = 8\ntxt_split = \"line\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("file") && err.contains("paragraph"), "{err}");

        let check = |edit: &dyn Fn(&mut DataConfig), want: &str| {
            let mut c = DataConfig::new(vec![PathBuf::from("a.jsonl")], 8);
            edit(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        };
        check(&|c| c.seq_len = 1, "data.seq_len must be >= 2");
        check(
            &|c| c.heldout_fraction = 1.0,
            "data.heldout_fraction must be in [0, 1)",
        );
        check(&|c| c.heldout_fraction = f64::NAN, "data.heldout_fraction");
        check(
            &|c| c.max_sequences = Some(0),
            "data.max_sequences must be >= 1",
        );
        check(&|c| c.train_files.clear(), "data.train_files");
    }

    #[test]
    fn tiny_llama_tokenizer_and_sample_data() {
        let tok = bytes_tok();
        assert_eq!(tok.vocab_size(), 259);
        let text = "To be, or not to be 🎭\n";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(tok.decode(&enc, false).unwrap(), text);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(256));

        let mut cfg = DataConfig::new(vec![PathBuf::from("shakespeare/train.jsonl")], 128);
        cfg.eval_files = vec![PathBuf::from("shakespeare/eval.jsonl")];
        let ds = build(&cfg, &repo("data"), Some(EOS)).unwrap();
        assert!(
            ds.train.len() > 2000 && ds.heldout.len() > 300,
            "{}",
            ds.stats
        );
        assert!(
            ds.train
                .iter()
                .chain(&ds.heldout)
                .all(|s| s.input_ids.iter().all(|&id| (0..259).contains(&id)))
        );
        assert_eq!(ds.stats.files, 2);
    }
}
