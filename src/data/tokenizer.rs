//! Tokenisation (the checkpoint's `tokenizer.json`) and chat templates (`tokenizer_config.json`,
//! rendered with a real Jinja engine so Hugging Face templates work unmodified).

use std::path::Path;

use anyhow::{Context, Result, bail};
use minijinja::{Environment, Error as JinjaError, ErrorKind, Value as JinjaValue, context};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A loaded `tokenizer.json`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot load tokenizer '{}': {e}; it must be a Hugging Face tokenizer.json",
                path.display()
            )
        })?;
        Ok(Self { inner })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| anyhow::anyhow!("cannot tokenise text: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| anyhow::anyhow!("cannot decode ids: {e}"))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// One chat turn, as in the OpenAI / Hugging Face `messages` format.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The chat template and special tokens of `tokenizer_config.json`.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    origin: String,
}

impl ChatTemplate {
    /// Reads the default template of a `tokenizer_config.json` (string form, or the entry named
    /// "default" of the list form). A `chat_template.jinja` file beside it wins, as in transformers.
    pub fn from_tokenizer_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read '{}'", path.display()))?;
        let config: Value = serde_json::from_str(&text)
            .with_context(|| format!("'{}' is not valid JSON", path.display()))?;
        let special = |key: &str| match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => o
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            _ => String::new(),
        };
        let jinja_file = path.with_file_name("chat_template.jinja");
        let (source, origin) = if jinja_file.is_file() {
            let source = std::fs::read_to_string(&jinja_file)
                .with_context(|| format!("cannot read '{}'", jinja_file.display()))?;
            (source, jinja_file.display().to_string())
        } else {
            let source = match config.get("chat_template") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(entries)) => entries
                    .iter()
                    .find(|e| e.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|e| e.get("template"))
                    .and_then(Value::as_str)
                    .with_context(|| {
                        format!(
                            "'{}': chat_template list has no entry named 'default'",
                            path.display()
                        )
                    })?
                    .to_string(),
                _ => bail!(
                    "'{}' has no chat_template; this checkpoint is not a chat model (turn the \
                     chat template off for its data)",
                    path.display()
                ),
            };
            (source, path.display().to_string())
        };
        let template = Self {
            source,
            bos_token: special("bos_token"),
            eos_token: special("eos_token"),
            origin,
        };
        // Fail at load time, naming the file, rather than on the first conversation.
        template.environment()?;
        Ok(template)
    }

    fn environment(&self) -> Result<Environment<'_>> {
        let mut env = Environment::new();
        // HF templates call Python string methods (`.strip()`, `.startswith()`, ...).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<JinjaValue, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, message))
            },
        );
        // Llama 3.1 templates print today's date.
        env.add_function("strftime_now", |_format: String| -> String {
            // A fixed, documented date keeps rendered training data reproducible.
            "26 Jul 2024".to_string()
        });
        env.add_template("chat", &self.source).map_err(|e| {
            anyhow::anyhow!("chat template in '{}' does not parse: {e}", self.origin)
        })?;
        Ok(env)
    }

    /// Renders a conversation. `extra` adds template variables (e.g. `enable_thinking`).
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Value>,
    ) -> Result<String> {
        let env = self.environment()?;
        let template = env.get_template("chat").expect("added above");
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            ..JinjaValue::from_serialize(extra)
        };
        template.render(ctx).map_err(|e| {
            anyhow::anyhow!(
                "rendering the chat template of '{}' failed: {e:#}",
                self.origin
            )
        })
    }
}
