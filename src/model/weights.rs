//! The parameters a decoder needs, named structurally rather than by any file format's strings.
//!
//! `checkpoint::names` maps each [`WeightKey`] to its Hugging Face tensor name and back, so the
//! model never spells a checkpoint key and the loader never guesses a shape.

use burn::tensor::TensorData;

use super::config::ModelConfig;
use crate::ops::upload::DirectWeight;

/// The linear projections inside one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

/// The RMSNorms inside one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerNorm {
    Input,
    PostAttention,
    /// Per-head norm on queries (Qwen3).
    Q,
    /// Per-head norm on keys (Qwen3).
    K,
}

/// The tensors of the per-layer adapter a retrofit method attaches to a decoder layer (DMS's
/// eviction head: an RMSNorm and a linear map with an optional bias). The method sizes and uses
/// them (`dms::decision`), `checkpoint::names` names them; the model only carries their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdapterTensor {
    Norm,
    Weight,
    Bias,
}

/// One tensor of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WeightKey {
    Embedding,
    FinalNorm,
    LmHead,
    Linear {
        layer: usize,
        projection: Projection,
        bias: bool,
    },
    Norm {
        layer: usize,
        norm: LayerNorm,
    },
    Adapter {
        layer: usize,
        tensor: AdapterTensor,
    },
}

impl WeightKey {
    /// A parameter id derived from the key alone, so optimizer state saved by one process maps
    /// onto the same parameters when another process rebuilds the model (exact resume).
    pub fn param_id(self) -> burn::module::ParamId {
        // FNV-1a over the key's debug form: stable across runs and platforms. Adapter keys hash
        // the form they had when they were spelled as a projection and a norm, so optimizer
        // state saved by earlier versions still resumes.
        let text = match self {
            WeightKey::Adapter { layer, tensor } => match tensor {
                AdapterTensor::Norm => format!("Norm {{ layer: {layer}, norm: DmsAlpha }}"),
                AdapterTensor::Weight | AdapterTensor::Bias => format!(
                    "Linear {{ layer: {layer}, projection: DmsAlpha, bias: {} }}",
                    tensor == AdapterTensor::Bias
                ),
            },
            _ => format!("{self:?}"),
        };
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        burn::module::ParamId::from(hash)
    }

    /// Whether the tensor belongs to a retrofit adapter rather than the base model.
    pub fn is_adapter(self) -> bool {
        matches!(self, WeightKey::Adapter { .. })
    }
}

impl ModelConfig {
    /// Output and input width of a projection, in the Hugging Face `[out, in]` layout.
    pub fn projection_dims(&self, projection: Projection) -> (usize, usize) {
        let h = self.hidden_size;
        match projection {
            Projection::Q => (self.q_dim(), h),
            Projection::K | Projection::V => (self.kv_dim(), h),
            Projection::O => (h, self.q_dim()),
            Projection::Gate | Projection::Up => (self.intermediate_size, h),
            Projection::Down => (h, self.intermediate_size),
        }
    }

    pub fn has_bias(&self, projection: Projection) -> bool {
        match projection {
            Projection::Q | Projection::K | Projection::V => self.qkv_bias,
            Projection::O => self.o_bias,
            Projection::Gate | Projection::Up | Projection::Down => self.mlp_bias,
        }
    }

    /// The shape every base-model tensor must have, in the Hugging Face layout; `None` for an
    /// adapter's tensors, whose shapes the method that adds them knows (`dms::adapter_shape`).
    pub fn weight_shape(&self, key: WeightKey) -> Option<Vec<usize>> {
        Some(match key {
            WeightKey::Embedding | WeightKey::LmHead => vec![self.vocab_size, self.hidden_size],
            WeightKey::FinalNorm => vec![self.hidden_size],
            WeightKey::Linear {
                projection, bias, ..
            } => {
                let (out, inp) = self.projection_dims(projection);
                if bias { vec![out] } else { vec![out, inp] }
            }
            WeightKey::Norm { norm, .. } => match norm {
                LayerNorm::Q | LayerNorm::K => vec![self.head_dim],
                _ => vec![self.hidden_size],
            },
            WeightKey::Adapter { .. } => return None,
        })
    }

    /// Every tensor of the base model (no DMS adapter), in a stable order.
    pub fn base_weight_keys(&self) -> Vec<WeightKey> {
        let mut keys = vec![WeightKey::Embedding];
        for layer in 0..self.num_layers {
            keys.push(WeightKey::Norm {
                layer,
                norm: LayerNorm::Input,
            });
            for projection in [
                Projection::Q,
                Projection::K,
                Projection::V,
                Projection::O,
                Projection::Gate,
                Projection::Up,
                Projection::Down,
            ] {
                keys.push(WeightKey::Linear {
                    layer,
                    projection,
                    bias: false,
                });
                if self.has_bias(projection) {
                    keys.push(WeightKey::Linear {
                        layer,
                        projection,
                        bias: true,
                    });
                }
            }
            if self.qk_norm {
                keys.push(WeightKey::Norm {
                    layer,
                    norm: LayerNorm::Q,
                });
                keys.push(WeightKey::Norm {
                    layer,
                    norm: LayerNorm::K,
                });
            }
            keys.push(WeightKey::Norm {
                layer,
                norm: LayerNorm::PostAttention,
            });
        }
        keys.push(WeightKey::FinalNorm);
        if !self.tie_word_embeddings {
            keys.push(WeightKey::LmHead);
        }
        keys
    }
}

/// Where a model's tensors come from (a safetensors checkpoint, a training snapshot, ...).
///
/// Implementations check the shape against `expected` and report the tensor by its file name.
pub trait WeightSource {
    /// Returns the tensor's values (row-major, Hugging Face layout) with its shape verified, already
    /// converted to the float format the run computes in.
    fn load(&mut self, key: WeightKey, expected: &[usize]) -> anyhow::Result<TensorData>;
    /// Whether the source holds this tensor at all.
    fn contains(&self, key: WeightKey) -> bool;
    /// The tensor's bytes as the run holds them (dtype, shape `expected`), produced part by part
    /// for backends that write them straight into device staging
    /// ([`crate::ops::UploadBackend::upload_direct`]); `None` when it must go through
    /// [`WeightSource::load`].
    fn direct(&self, _key: WeightKey, _expected: &[usize]) -> Option<DirectWeight<'_>> {
        None
    }
}

/// Mutable access to one parameter of either rank, for loading, saving and freezing by key.
pub enum ParamSlot<'a, B: burn::tensor::backend::Backend> {
    Vector(&'a mut burn::module::Param<burn::tensor::Tensor<B, 1>>),
    Matrix(&'a mut burn::module::Param<burn::tensor::Tensor<B, 2>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_param_ids_keep_the_form_earlier_snapshots_saved() {
        // Optimizer state is keyed by these ids; earlier versions spelled the adapter as a
        // `DmsAlpha` projection and norm, and their runs must still resume.
        let fnv = |text: &str| {
            burn::module::ParamId::from(text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
            }))
        };
        let key = |tensor| WeightKey::Adapter { layer: 7, tensor };
        assert_eq!(
            key(AdapterTensor::Norm).param_id(),
            fnv("Norm { layer: 7, norm: DmsAlpha }")
        );
        assert_eq!(
            key(AdapterTensor::Weight).param_id(),
            fnv("Linear { layer: 7, projection: DmsAlpha, bias: false }")
        );
        assert_eq!(
            key(AdapterTensor::Bias).param_id(),
            fnv("Linear { layer: 7, projection: DmsAlpha, bias: true }")
        );
        let q = WeightKey::Linear {
            layer: 7,
            projection: Projection::Q,
            bias: false,
        };
        assert_eq!(
            q.param_id(),
            fnv("Linear { layer: 7, projection: Q, bias: false }")
        );
    }
}
