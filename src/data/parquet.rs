//! `.parquet` training files, the format Hugging Face datasets are stored in: one document per
//! row, from the text column (`data.text_field`) or the chat column (`data.messages_field`, a list
//! of `{role, content}` structs, rendered with the chat template like a JSONL `messages` line).
//!
//! Rows are read through parquet's record API with only the chosen column projected, so the
//! other columns (often large: ids, metadata, scores) are never decoded.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use parquet::schema::types::Type;

use super::dataset::{Body, DataConfig, Doc};
use super::tokenizer::Message;

/// Which column a file's documents come from.
enum Column {
    Text(Arc<Type>),
    Messages(Arc<Type>),
}

/// Reads every row of `path` into a document; rows whose column is null are skipped (counted in
/// the returned number).
pub(super) fn read_documents(path: &Path, cfg: &DataConfig) -> Result<(Vec<Doc>, usize)> {
    let file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("'{}' is not a readable parquet file", path.display()))?;
    let column = choose_column(&reader, path, cfg)?;
    let (field, projected) = match &column {
        Column::Text(t) | Column::Messages(t) => (t.name().to_string(), t.clone()),
    };
    let projection = Type::group_type_builder("schema")
        .with_fields(vec![projected])
        .build()
        .context("cannot build the parquet projection")?;
    let rows = reader
        .get_row_iter(Some(projection))
        .with_context(|| format!("cannot read column '{field}' of '{}'", path.display()))?;
    let mut docs = Vec::new();
    let mut nulls = 0;
    for (i, row) in rows.enumerate() {
        let at = || format!("{}: row {}, column '{field}'", path.display(), i + 1);
        let row = row.with_context(at)?;
        let Some(value) = only_field(&row) else {
            nulls += 1;
            continue;
        };
        let body = match &column {
            Column::Text(_) => match value {
                Field::Str(s) => Body::Text(s.clone()),
                other => bail!("{}: expected a string, found {other:?}", at()),
            },
            Column::Messages(_) => {
                Body::Messages(messages(value).map_err(|e| anyhow!("{}: {e}", at()))?)
            }
        };
        docs.push(Doc { line: i + 1, body });
    }
    Ok((docs, nulls))
}

/// The text column when the file has it (the messages column instead when `chat_template` is on
/// and both exist); an error naming the file's columns and the keys to set otherwise.
fn choose_column(
    reader: &SerializedFileReader<File>,
    path: &Path,
    cfg: &DataConfig,
) -> Result<Column> {
    let fields = reader.metadata().file_metadata().schema().get_fields();
    let find = |name: &str| fields.iter().find(|f| f.name() == name).cloned();
    let text = find(&cfg.text_field);
    let messages = find(&cfg.messages_field);
    match (text, messages) {
        (Some(_), Some(m)) if cfg.chat_template => Ok(Column::Messages(m)),
        (Some(t), _) => Ok(Column::Text(t)),
        (None, Some(m)) => {
            if !cfg.chat_template {
                bail!(
                    "'{}' holds chat conversations (column '{}') but data.chat_template is false; \
                     set data.chat_template = true to render them with the checkpoint's chat \
                     template, or point data.text_field at a text column",
                    path.display(),
                    cfg.messages_field
                );
            }
            Ok(Column::Messages(m))
        }
        (None, None) => {
            let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
            bail!(
                "'{}' has no column '{}' (data.text_field) or '{}' (data.messages_field); its \
                 columns are: {}. Set data.text_field or data.messages_field to one of them",
                path.display(),
                cfg.text_field,
                cfg.messages_field,
                names.join(", ")
            )
        }
    }
}

/// The projected row's one value, `None` when it is null.
fn only_field(row: &Row) -> Option<&Field> {
    match row.get_column_iter().next() {
        Some((_, Field::Null)) | None => None,
        Some((_, field)) => Some(field),
    }
}

/// A list of `{role, content}` structs (other struct fields are ignored).
fn messages(value: &Field) -> Result<Vec<Message>> {
    let Field::ListInternal(list) = value else {
        bail!("expected a list of {{role, content}} structs, found {value:?}");
    };
    let out = list
        .elements()
        .iter()
        .enumerate()
        .map(|(j, element)| {
            let Field::Group(turn) = element else {
                bail!("message {j}: expected a {{role, content}} struct, found {element:?}");
            };
            let text = |key: &str| {
                turn.get_column_iter()
                    .find(|(name, _)| name.as_str() == key)
                    .and_then(|(_, v)| match v {
                        Field::Str(s) => Some(s.clone()),
                        _ => None,
                    })
                    .ok_or_else(|| anyhow!("message {j} has no string field '{key}'"))
            };
            Ok(Message {
                role: text("role")?,
                content: text("content")?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if out.is_empty() {
        bail!("the conversation is an empty list");
    }
    Ok(out)
}
