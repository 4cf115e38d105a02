//! Delayed-eviction attention masks (spec §2). Token `t` decides about token `t-1` (the one-token
//! shift); a key is never penalised while `q - k <= W` (W+1 queries, itself included).
//!
//! The attention never builds a `[q, k]` mask: it takes one bias value per key and KV head
//! (`[batch, kv_heads, seq]`, shared by the query heads of the group) and applies it outside the
//! window itself (`crate::ops::attention`).

use burn::tensor::{Bool, Tensor, TensorData, activation, backend::Backend};

/// Key `k` takes the value produced at token `k+1`; the last key gets 0 (it is always inside the
/// window, so the value never matters).
///
/// # Shapes
/// - `x`: `[batch, kv_heads, seq]` → same
pub fn shift_to_keys<B: Backend>(x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, heads, seq] = x.dims();
    let last = x.clone().narrow(2, 0, 1).zeros_like();
    let _ = (batch, heads);
    if seq == 1 {
        return last;
    }
    Tensor::cat(vec![x.narrow(2, 1, seq - 1), last], 2)
}

/// `true` where `q - k > window` (keys whose eviction has taken effect for that query), for
/// queries at absolute positions `offset ..` and keys at `0 ..`.
pub fn outside_window<B: Backend>(
    q_len: usize,
    k_len: usize,
    offset: usize,
    window: usize,
    device: &B::Device,
) -> Tensor<B, 2, Bool> {
    let mut mask = Vec::with_capacity(q_len * k_len);
    for q in offset..offset + q_len {
        mask.extend((0..k_len).map(|k| q > k + window));
    }
    Tensor::from_data(TensorData::new(mask, [q_len, k_len]), device)
}

/// Training key bias: `log(1 - p_key[k]) = logsigmoid(-z_key[k])`, the value the attention adds
/// for queries outside key `k`'s window (see [`crate::model::decoder::AttentionMask::Delayed`]).
///
/// # Shapes
/// - `z`: `[batch, kv_heads, seq]`, unshifted `(logit + noise) / tau` → same
pub fn training_key_bias<B: Backend>(z: Tensor<B, 3>) -> Tensor<B, 3> {
    activation::log_sigmoid(shift_to_keys(z).neg())
}

/// Inference key bias: `-inf` for evicted keys (applied once their window has passed), else 0.
///
/// # Shapes
/// - `evicted`: `[batch, kv_heads, seq]` key decisions (0/1) → same
pub fn inference_key_bias<B: Backend>(evicted: Tensor<B, 3>) -> Tensor<B, 3> {
    evicted
        .clone()
        .zeros_like()
        .mask_fill(evicted.greater_elem(0.5), f32::NEG_INFINITY)
}

/// Hard decisions for the keys: `logit[k+1] > 0`, last key 0.
///
/// # Shapes
/// - `logits`: `[batch, kv_heads, seq]` (noise-free, unshifted) → same, 0/1
pub fn inference_key_decisions<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 3> {
    let dtype = logits.dtype();
    shift_to_keys(logits.greater_elem(0.0).float().cast(dtype))
}

/// Fraction of the keys still held for the last query, per (batch, KV head): the retained share
/// of a DMS cache after `seq` tokens, the window counted as retained (spec §5).
///
/// # Shapes
/// - `evicted`: `[batch, kv_heads, seq]` key decisions (0/1) → `[batch, kv_heads]`
pub fn retained_fraction<B: Backend>(evicted: Tensor<B, 3>, window: usize) -> Tensor<B, 2> {
    let [batch, heads, seq] = evicted.dims();
    let gone = outside_window::<B>(1, seq, seq - 1, window, &evicted.device())
        .float()
        .cast(evicted.dtype())
        .reshape([1, 1, seq]);
    let dropped = (evicted * gone).sum_dim(2).reshape([batch, heads]);
    (dropped.neg() + seq as f64) / seq as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    /// The training bias written out as a `[q, k]` matrix per KV head, from the production key
    /// bias: the key bias outside the window, 0 inside (causality is the attention's).
    fn training_bias(z: Tensor<Cpu, 3>, window: usize) -> Tensor<Cpu, 4> {
        let [_, _, seq] = z.dims();
        let log_keep = training_key_bias(z);
        let outside = outside_window::<Cpu>(seq, seq, 0, window, &log_keep.device()).float();
        log_keep.unsqueeze_dim::<4>(2) * outside.unsqueeze::<4>()
    }

    /// The inference bias as a `[q, k]` matrix, from the production key bias: `-inf` where a key
    /// was evicted and its window has passed, else 0 (spec §2.3: evicted key `k` is visible to
    /// queries `k ..= k+W`).
    fn inference_bias(evicted: Tensor<Cpu, 3>, window: usize) -> Tensor<Cpu, 4> {
        let [batch, heads, seq] = evicted.dims();
        let inside = outside_window::<Cpu>(seq, seq, 0, window, &evicted.device())
            .bool_not()
            .unsqueeze::<4>()
            .expand([batch, heads, seq, seq]);
        inference_key_bias(evicted)
            .unsqueeze_dim::<4>(2)
            .expand([batch, heads, seq, seq])
            .mask_fill(inside, 0.0)
    }

    fn z_values(batch: usize, heads: usize, seq: usize) -> Vec<f32> {
        (0..batch * heads * seq)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect()
    }

    /// The spec's rule, written as loops.
    fn naive_training_bias(z: &[f32], b: usize, h: usize, t: usize, w: usize) -> Vec<f32> {
        let mut out = vec![0f32; b * h * t * t];
        for bi in 0..b {
            for hi in 0..h {
                for q in 0..t {
                    for k in 0..=q {
                        if q - k > w {
                            let zk = if k + 1 < t {
                                z[(bi * h + hi) * t + k + 1]
                            } else {
                                0.0
                            };
                            // log(1 - sigmoid(zk))
                            out[((bi * h + hi) * t + q) * t + k] = -(1.0 + zk.exp()).ln();
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn training_bias_matches_the_rule_for_all_window_edges() {
        let device = Default::default();
        for (b, h, t) in [(2, 3, 7), (1, 1, 1), (1, 2, 2)] {
            let z = z_values(b, h, t);
            let tensor =
                Tensor::<Cpu, 3>::from_data(TensorData::new(z.clone(), [b, h, t]), &device);
            for w in [0, 1, 3, t.saturating_sub(1), t, t + 5] {
                let got = training_bias(tensor.clone(), w)
                    .into_data()
                    .into_vec::<f32>()
                    .unwrap();
                let want = naive_training_bias(&z, b, h, t, w);
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-5, "b{b} h{h} t{t} w{w}: {g} vs {e}");
                }
                if w + 1 >= t {
                    assert!(got.iter().all(|&v| v == 0.0), "W >= T-1 never penalises");
                }
            }
        }
    }

    #[test]
    fn inference_mask_and_retained_fraction_follow_the_visibility_rule() {
        let device = Default::default();
        let (t, w) = (9, 2);
        // Decisions as produced per token (unshifted): token t decides about key t-1.
        let produced = [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0f32];
        let logits = Tensor::<Cpu, 3>::from_data(
            TensorData::new(
                produced.iter().map(|d| d * 2.0 - 1.0).collect::<Vec<_>>(),
                [1, 1, t],
            ),
            &device,
        );
        let evicted = inference_key_decisions(logits);
        let keys = evicted.clone().into_data().into_vec::<f32>().unwrap();
        assert_eq!(keys, vec![1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]);
        let bias = inference_bias(evicted.clone(), w)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for q in 0..t {
            for k in 0..=q {
                let visible = keys[k] == 0.0 || q - k <= w;
                assert_eq!(bias[q * t + k] == 0.0, visible, "q{q} k{k}");
            }
        }
        // Last query sees: evicted keys 0, 2, 3 are past the window; 6, 7 are inside it.
        let retained = retained_fraction(evicted, w)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        assert!((retained[0] - 6.0 / 9.0).abs() < 1e-6, "{retained:?}");
    }

    #[test]
    fn every_key_evicted_keeps_only_the_window() {
        let device = Default::default();
        let (t, w) = (20, 4);
        let evicted = shift_to_keys(Tensor::<Cpu, 3>::ones([2, 3, t], &device));
        let retained = retained_fraction(evicted, w)
            .into_data()
            .into_vec::<f32>()
            .unwrap();
        for r in retained {
            assert!((r - (w + 1) as f32 / t as f32).abs() < 1e-6);
        }
    }
}
