//! Text in: tokenisation and chat templates, training datasets and packing.

pub mod dataset;
pub mod hub;
mod parquet;
pub mod tokenizer;

pub use dataset::{
    DataConfig, Dataset, DatasetStats, Sequence, TxtSplit, epoch_permutation, sample_index,
};
pub use tokenizer::{ChatTemplate, Message, Tokenizer};
