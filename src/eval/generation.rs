//! Batched generation over the slot cache: every prompt is prefilled, then each step samples one
//! token per unfinished sequence until it ends (an EOS id, or its token limit). The caller sees
//! each token as it comes (to stream or count it) and each sequence as it finishes.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::{DType, Tensor};
use serde::Serialize;

use super::Decoding;
use super::sampling::{Rng, sample};
use super::slot_cache::CacheMemory;
use crate::ops::attention::AttentionBackend;

/// How tokens are chosen and when a sequence stops.
#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0 = greedy (only the argmax ids are read back from the device).
    pub temperature: f64,
    pub top_p: f64,
    /// Keep generating past EOS ids (for timing a fixed number of tokens).
    pub ignore_eos: bool,
    pub eos: Vec<u32>,
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// It produced an EOS id (not included in its tokens).
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

/// What the caller is told as generation goes.
pub enum Event<'a> {
    /// Sequence `index` has a new token; `generated` is everything it generated so far.
    Token { index: usize, generated: &'a [u32] },
    /// Sequence `index` is done.
    Finished {
        index: usize,
        generated: &'a [u32],
        finish: Finish,
    },
}

/// Timings and memory of one batch.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub generated_tokens: usize,
    pub memory: CacheMemory,
}

/// Greedy ids read back from the device, checked: an argmax outside the vocabulary means the
/// logits were not finite.
pub fn checked_tokens(ids: &[i64], vocab: usize, step: usize) -> Result<Vec<u32>> {
    match ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
        Some(id) => bail!(
            "decode step {step}: the logits are not finite (argmax {id} outside the vocabulary \
             of {vocab}); if this happens with --dtype bf16, try --dtype f32"
        ),
        None => Ok(ids.iter().map(|&id| id as u32).collect()),
    }
}

/// Draws one token per row of `values` (`[rows, vocab]`), row `i` from `rngs[i]`, the rows
/// spread over the CPU's threads: at batch 256 the per-row softmax and nucleus are the step's
/// largest cost after the GPU's. Each row's draw depends only on its own generator.
fn sample_rows(values: &[f32], vocab: usize, rngs: &mut [Rng], sampling: &Sampling) -> Vec<u32> {
    let rows = rngs.len();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = rows.div_ceil(threads.min(rows).max(1)).max(1);
    let mut tokens = vec![0u32; rows];
    std::thread::scope(|scope| {
        for ((logits, rngs), tokens) in values
            .chunks(per_thread * vocab)
            .zip(rngs.chunks_mut(per_thread))
            .zip(tokens.chunks_mut(per_thread))
        {
            scope.spawn(move || {
                for ((row, rng), token) in logits.chunks(vocab).zip(rngs).zip(tokens) {
                    *token = sample(row, sampling.temperature, sampling.top_p, rng);
                }
            });
        }
    });
    tokens
}

/// Generates a continuation of every prompt (token ids, each non-empty) together; prompt `i`
/// samples from its own generator seeded with `seeds[i]`.
pub fn generate_batch<B: AttentionBackend>(
    decoding: &Decoding<'_, B>,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    sampling: &Sampling,
    element_bytes: usize,
    on_event: &mut dyn FnMut(Event<'_>) -> Result<()>,
) -> Result<GenerationStats> {
    let batch = prompts.len();
    let vocab = decoding.cfg.vocab_size;
    let device = decoding.model.base.embed_tokens.val().device();
    let mut cache = decoding.slot_cache(batch);
    if decoding.dms.is_none() {
        // A dense cache's final size is known: allocate it once.
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let dtype: DType = decoding.model.base.embed_tokens.val().dtype();
        cache.reserve(longest + sampling.max_new_tokens, dtype);
    }
    assert_eq!(seeds.len(), batch, "one seed per prompt");
    let mut rngs: Vec<Rng> = seeds.iter().map(|&seed| Rng::new(seed)).collect();
    let start = Instant::now();
    let firsts: Vec<Tensor<B, 1>> = prompts
        .iter()
        .enumerate()
        .map(|(index, ids)| decoding.prefill_slots(ids, index, &mut cache))
        .collect();
    let mut logits: Tensor<B, 2> = Tensor::stack(firsts, 0);
    B::sync(&device)?;
    let prefill_seconds = start.elapsed().as_secs_f64();

    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); batch];
    let mut finished: Vec<bool> = vec![false; batch];
    let decode_start = Instant::now();
    for step in 0..sampling.max_new_tokens {
        let next = if sampling.temperature <= 0.0 {
            let ids = logits.argmax(1).into_data().convert::<i64>();
            let ids = ids
                .into_vec::<i64>()
                .map_err(|e| anyhow::anyhow!("cannot read the tokens back: {e:?}"))?;
            checked_tokens(&ids, vocab, step)?
        } else {
            let values = logits
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .map_err(|e| anyhow::anyhow!("cannot read the logits back: {e:?}"))?;
            sample_rows(&values, vocab, &mut rngs, sampling)
        };
        // The logits were read back: the work behind them has run. Nothing reaches the caller
        // (who may write it out) if any of ours failed.
        crate::backend::check_device_work()?;
        for (index, &token) in next.iter().enumerate() {
            if finished[index] {
                continue;
            }
            let finish = if !sampling.ignore_eos && sampling.eos.contains(&token) {
                Some(Finish::Eos)
            } else {
                generated[index].push(token);
                on_event(Event::Token {
                    index,
                    generated: &generated[index],
                })?;
                (step + 1 == sampling.max_new_tokens).then_some(Finish::Length)
            };
            if let Some(finish) = finish {
                finished[index] = true;
                on_event(Event::Finished {
                    index,
                    generated: &generated[index],
                    finish,
                })?;
            }
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        // Finished sequences keep the batch's shape with their last token; nothing is read.
        let feed: Vec<u32> = prompts
            .iter()
            .zip(&generated)
            .map(|(p, g)| *g.last().or(p.last()).expect("non-empty prompt"))
            .collect();
        logits = decoding.step_slots(&feed, &mut cache);
    }
    B::sync(&device)?;
    crate::backend::check_device_work()?;
    Ok(GenerationStats {
        prefill_seconds,
        decode_seconds: decode_start.elapsed().as_secs_f64(),
        generated_tokens: generated.iter().map(Vec::len).sum(),
        memory: cache.memory(element_bytes),
    })
}
