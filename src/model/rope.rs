//! Rotary position embeddings (`rotate_half` convention, as in transformers' Llama/Qwen code).

use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::config::{ModelConfig, RopeConfig, RopeScaling};
use crate::ops::elementwise::{ElementwiseBackend, rope};

/// Inverse frequencies for each pair of channels, after any long-context scaling.
///
/// Computed in f64 and rounded once; transformers computes them in f32, which agrees to ~1e-7.
pub fn inverse_frequencies(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| 1.0 / rope.theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    match rope.scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_context,
        } => {
            // Llama 3.1: long wavelengths are interpolated by `factor`, short ones kept, and the
            // band in between blended smoothly.
            let low_freq_wavelen = old_context / low_freq_factor;
            let high_freq_wavelen = old_context / high_freq_factor;
            base.into_iter()
                .map(|freq| {
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    if wavelen < high_freq_wavelen {
                        freq
                    } else if wavelen > low_freq_wavelen {
                        freq / factor
                    } else {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * freq / factor + smooth * freq
                    }
                })
                .collect()
        }
    }
}

/// cos/sin tables for a contiguous range of positions, shaped `[seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct RopeTables<B: Backend> {
    pub cos: Tensor<B, 2>,
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// Tables for positions `start .. start + len`.
    pub fn new(inv_freq: &[f64], start: usize, len: usize, device: &B::Device) -> Self {
        Self::for_positions(inv_freq, &(start..start + len).collect::<Vec<_>>(), device)
    }

    /// Tables for positions `start .. start + len` of a model.
    pub fn for_model(cfg: &ModelConfig, start: usize, len: usize, device: &B::Device) -> Self {
        Self::new(
            &inverse_frequencies(&cfg.rope, cfg.head_dim),
            start,
            len,
            device,
        )
    }

    /// Tables for arbitrary positions (one row per entry).
    pub fn for_positions(inv_freq: &[f64], positions: &[usize], device: &B::Device) -> Self {
        let half = inv_freq.len();
        let dim = 2 * half;
        let mut cos = Vec::with_capacity(positions.len() * dim);
        let mut sin = Vec::with_capacity(positions.len() * dim);
        for &pos in positions {
            // transformers multiplies f32 positions by f32 frequencies; round the frequency to f32
            // first so long positions produce the same angle.
            let angles: Vec<f64> = inv_freq
                .iter()
                .map(|&f| (f as f32) as f64 * pos as f64)
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() as f32));
                sin.extend(angles.iter().map(|a| a.sin() as f32));
            }
        }
        let shape = [positions.len(), dim];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

impl<B: ElementwiseBackend> RopeTables<B> {
    /// Rotates `x` shaped `[batch, heads, seq, head_dim]` (any layout; see
    /// [`ElementwiseBackend::rope`]).
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        rope(x, self.cos.clone(), self.sin.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let rope = RopeConfig {
            theta: 500_000.0,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        };
        let plain = inverse_frequencies(
            &RopeConfig {
                theta: 500_000.0,
                scaling: RopeScaling::Default,
            },
            128,
        );
        let scaled = inverse_frequencies(&rope, 128);
        assert_eq!(scaled[0], plain[0], "highest frequency must be untouched");
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
    }
}
