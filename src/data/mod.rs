//! Text in: tokenisation and chat templates (and, later, datasets and packing).

pub mod tokenizer;

pub use tokenizer::{ChatTemplate, Message, Tokenizer};
