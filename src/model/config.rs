//! The resolved, architecture-neutral description of a decoder.
//!
//! `checkpoint::hf_config` turns a Hugging Face `config.json` into a [`ModelConfig`]; from here on no
//! code asks "is this Llama or Qwen?" — every difference is a field.

use serde::Serialize;

/// Which Hugging Face class the checkpoint was saved as. Only used for display and for writing the
/// `architectures` key back on export; the decoder itself never branches on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
}

impl Architecture {
    pub const SUPPORTED: [(&'static str, Architecture); 3] = [
        ("LlamaForCausalLM", Architecture::Llama),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
    ];

    pub fn hf_class(self) -> &'static str {
        Self::SUPPORTED
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(name, _)| *name)
            .expect("every architecture is listed in SUPPORTED")
    }
}

/// How rotary position frequencies are rescaled for long context.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1 / 3.2 frequency-band scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Rotary embedding settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// Floating-point formats a checkpoint may be stored in or run at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatFormat {
    F32,
    Bf16,
    F16,
}

impl FloatFormat {
    /// The tensor dtype that holds values of this format.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            FloatFormat::F32 => burn::tensor::DType::F32,
            FloatFormat::Bf16 => burn::tensor::DType::BF16,
            FloatFormat::F16 => burn::tensor::DType::F16,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            FloatFormat::F32 => 4,
            FloatFormat::Bf16 | FloatFormat::F16 => 2,
        }
    }

    /// Parses both the torch spelling (`bfloat16`) and the short one (`bf16`).
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "float32" | "f32" | "fp32" => Some(FloatFormat::F32),
            "bfloat16" | "bf16" => Some(FloatFormat::Bf16),
            "float16" | "f16" | "fp16" | "half" => Some(FloatFormat::F16),
            _ => None,
        }
    }

    pub fn torch_name(self) -> &'static str {
        match self {
            FloatFormat::F32 => "float32",
            FloatFormat::Bf16 => "bfloat16",
            FloatFormat::F16 => "float16",
        }
    }
}

/// Everything the decoder needs to know about a checkpoint's shape and numerics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama/Qwen3 when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama/Qwen3 `attention_bias`; never Qwen2).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), if any.
    pub declared_dtype: Option<FloatFormat>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters of the base model (tied embeddings counted once), without any DMS tensors.
    pub fn parameter_count(&self) -> u64 {
        let (h, i, v) = (
            self.hidden_size as u64,
            self.intermediate_size as u64,
            self.vocab_size as u64,
        );
        let (q, kv, d) = (
            self.q_dim() as u64,
            self.kv_dim() as u64,
            self.head_dim as u64,
        );
        let mut layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            layer += q + 2 * kv;
        }
        if self.o_bias {
            layer += h;
        }
        if self.mlp_bias {
            layer += 2 * i + h;
        }
        if self.qk_norm {
            layer += 2 * d;
        }
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_layers as u64 * layer + h + head
    }

    /// Bytes of K and V cached for one token across all layers, dense.
    pub fn kv_bytes_per_token(&self, element_bytes: usize) -> u64 {
        2 * self.num_layers as u64 * self.kv_dim() as u64 * element_bytes as u64
    }
}
