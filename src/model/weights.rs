//! The parameters a decoder needs, named structurally rather than by any file format's strings.
//!
//! `checkpoint::names` maps each [`WeightKey`] to its Hugging Face tensor name and back, so the
//! model never spells a checkpoint key and the loader never guesses a shape.

use burn::tensor::TensorData;

use super::config::ModelConfig;

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
    /// DMS adapter: hidden -> one eviction logit per KV head.
    DmsAlpha,
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
    /// DMS adapter's own norm over the pre-`input_layernorm` residual.
    DmsAlpha,
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
}

impl WeightKey {
    /// A parameter id derived from the key alone, so optimizer state saved by one process maps
    /// onto the same parameters when another process rebuilds the model (exact resume).
    pub fn param_id(self) -> burn::module::ParamId {
        // FNV-1a over the key's debug form: stable across runs and platforms.
        let text = format!("{self:?}");
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        burn::module::ParamId::from(hash)
    }

    pub fn is_dms(self) -> bool {
        matches!(
            self,
            WeightKey::Linear {
                projection: Projection::DmsAlpha,
                ..
            } | WeightKey::Norm {
                norm: LayerNorm::DmsAlpha,
                ..
            }
        )
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
            Projection::DmsAlpha => (self.num_kv_heads, h),
        }
    }

    pub fn has_bias(&self, projection: Projection) -> bool {
        match projection {
            Projection::Q | Projection::K | Projection::V => self.qkv_bias,
            Projection::O => self.o_bias,
            Projection::Gate | Projection::Up | Projection::Down => self.mlp_bias,
            // The official adapter is `nn.Linear(hidden, kv_heads, bias=config.attention_bias)`.
            Projection::DmsAlpha => self.o_bias,
        }
    }

    /// The shape every tensor must have, in the Hugging Face layout.
    pub fn weight_shape(&self, key: WeightKey) -> Vec<usize> {
        match key {
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
        }
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

    /// The tensors the DMS adapter variant adds to every layer.
    pub fn dms_adapter_keys(&self) -> Vec<WeightKey> {
        let mut keys = Vec::new();
        for layer in 0..self.num_layers {
            keys.push(WeightKey::Linear {
                layer,
                projection: Projection::DmsAlpha,
                bias: false,
            });
            if self.has_bias(Projection::DmsAlpha) {
                keys.push(WeightKey::Linear {
                    layer,
                    projection: Projection::DmsAlpha,
                    bias: true,
                });
            }
            keys.push(WeightKey::Norm {
                layer,
                norm: LayerNorm::DmsAlpha,
            });
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
}

/// Mutable access to one parameter of either rank, for loading, saving and freezing by key.
pub enum ParamSlot<'a, B: burn::tensor::backend::Backend> {
    Vector(&'a mut burn::module::Param<burn::tensor::Tensor<B, 1>>),
    Matrix(&'a mut burn::module::Param<burn::tensor::Tensor<B, 2>>),
}
