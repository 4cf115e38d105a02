//! `config.json` as Hugging Face writes it (both the transformers-4 and -5 layouts), resolved once
//! into a [`ModelConfig`]. Unsupported features are rejected here, with the key that caused it.

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::model::{Architecture, FloatFormat, ModelConfig, RopeConfig, RopeScaling};

/// The wire format: every key optional so that the error can name what is missing.
#[derive(Deserialize, Debug, Default)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    use_sliding_window: Option<bool>,
    layer_types: Option<Vec<String>>,
    // transformers 4
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    torch_dtype: Option<String>,
    // transformers 5
    rope_parameters: Option<Value>,
    dtype: Option<String>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
}

const SUPPORTED_ROPE: &str = "default, linear, llama3";

/// Reads and resolves `config.json`.
pub fn read_model_config(path: &Path) -> Result<(ModelConfig, Value)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read model config '{}'", path.display()))?;
    let raw: Value = serde_json::from_str(&text)
        .with_context(|| format!("'{}' is not valid JSON", path.display()))?;
    let config = resolve(&raw).with_context(|| format!("in '{}'", path.display()))?;
    Ok((config, raw))
}

/// Resolves an already-parsed `config.json` value.
pub fn resolve(raw: &Value) -> Result<ModelConfig> {
    let hf: HfConfig = serde_json::from_value(raw.clone()).context("unexpected value type")?;
    let architecture = architecture(&hf)?;
    let require = |value: Option<usize>, key: &str| {
        value.with_context(|| format!("missing required key '{key}'"))
    };
    let hidden_size = require(hf.hidden_size, "hidden_size")?;
    let num_heads = require(hf.num_attention_heads, "num_attention_heads")?;
    let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
    if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        bail!(
            "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads \
             ({num_kv_heads})"
        );
    }
    let head_dim = match hf.head_dim {
        Some(d) => d,
        None => {
            if hidden_size % num_heads != 0 {
                bail!(
                    "hidden_size ({hidden_size}) is not divisible by num_attention_heads \
                     ({num_heads}) and no 'head_dim' is given"
                );
            }
            hidden_size / num_heads
        }
    };
    if head_dim % 2 != 0 {
        bail!("head_dim ({head_dim}) must be even for rotary embeddings");
    }
    if let Some(act) = &hf.hidden_act
        && act != "silu"
    {
        bail!("hidden_act '{act}' is not supported (only 'silu', as in Llama and Qwen)");
    }
    if hf.use_sliding_window == Some(true) {
        bail!(
            "use_sliding_window = true is not supported: DMS retrofits full-attention models; \
             set it to false if the checkpoint was trained without it"
        );
    }
    if let Some(kind) = hf
        .layer_types
        .iter()
        .flatten()
        .find(|kind| kind.as_str() != "full_attention")
    {
        bail!(
            "layer_types contains '{kind}': only full-attention layers are supported (DMS \
             retrofits full-attention models)"
        );
    }
    let rms_norm_eps = hf.rms_norm_eps.unwrap_or(1e-6);
    if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
        bail!("rms_norm_eps = {rms_norm_eps} must be a finite number > 0 (typically 1e-5 or 1e-6)");
    }
    let max_position_embeddings = hf.max_position_embeddings.unwrap_or(4096);
    if max_position_embeddings == 0 {
        bail!(
            "max_position_embeddings = 0: it must be >= 1 (the longest sequence the model takes)"
        );
    }
    let attention_bias = hf.attention_bias.unwrap_or(false);
    let (qkv_bias, o_bias) = match architecture {
        // Qwen2 hard-codes bias on q/k/v and none on o_proj; it has no `attention_bias` key.
        Architecture::Qwen2 => (true, false),
        Architecture::Llama | Architecture::Qwen3 => (attention_bias, attention_bias),
    };
    let declared_dtype = match hf.dtype.as_ref().or(hf.torch_dtype.as_ref()) {
        Some(name) => Some(FloatFormat::parse(name).with_context(|| {
            format!("dtype '{name}' is not supported (use float32, bfloat16 or float16)")
        })?),
        None => None,
    };
    Ok(ModelConfig {
        architecture,
        vocab_size: require(hf.vocab_size, "vocab_size")?,
        hidden_size,
        intermediate_size: require(hf.intermediate_size, "intermediate_size")?,
        num_layers: require(hf.num_hidden_layers, "num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps,
        rope: rope(&hf)?,
        max_position_embeddings,
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        qkv_bias,
        o_bias,
        mlp_bias: hf.mlp_bias.unwrap_or(false),
        qk_norm: architecture == Architecture::Qwen3,
        declared_dtype,
        bos_token_id: hf
            .bos_token_id
            .as_ref()
            .and_then(token_ids)
            .and_then(|v| v.first().copied()),
        eos_token_ids: hf
            .eos_token_id
            .as_ref()
            .and_then(token_ids)
            .unwrap_or_default(),
    })
}

fn architecture(hf: &HfConfig) -> Result<Architecture> {
    let supported = || {
        Architecture::SUPPORTED
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(names) = &hf.architectures {
        for name in names {
            if let Some((_, arch)) = Architecture::SUPPORTED.iter().find(|(n, _)| n == name) {
                return Ok(*arch);
            }
        }
        bail!(
            "architecture {names:?} is not supported; supported: {}",
            supported()
        );
    }
    // Exports that dropped `architectures` (as the official DMS export does) still carry model_type.
    match hf.model_type.as_deref() {
        Some("llama") => Ok(Architecture::Llama),
        Some("qwen2") => Ok(Architecture::Qwen2),
        Some("qwen3") => Ok(Architecture::Qwen3),
        Some(other) => bail!(
            "model_type '{other}' is not supported; supported: {}",
            supported()
        ),
        None => bail!(
            "neither 'architectures' nor 'model_type' is set; supported: {}",
            supported()
        ),
    }
}

/// RoPE from either layout: transformers 5 puts everything in `rope_parameters`; transformers 4
/// uses top-level `rope_theta` and an optional `rope_scaling` dict (`rope_type` or legacy `type`).
fn rope(hf: &HfConfig) -> Result<RopeConfig> {
    let params = hf.rope_parameters.as_ref().filter(|v| !v.is_null());
    let scaling = hf.rope_scaling.as_ref().filter(|v| !v.is_null());
    let (source_key, dict) = match (params, scaling) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) => ("rope_scaling", Some(s)),
        (None, None) => ("rope_scaling", None),
    };
    let theta = dict
        .and_then(|d| d.get("rope_theta"))
        .and_then(Value::as_f64)
        .or(hf.rope_theta)
        .unwrap_or(10_000.0);
    let Some(dict) = dict else {
        return Ok(RopeConfig {
            theta,
            scaling: RopeScaling::Default,
        });
    };
    let rope_type = dict
        .get("rope_type")
        .or_else(|| dict.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| {
        dict.get(key).and_then(Value::as_f64).with_context(|| {
            format!("{source_key}: rope_type '{rope_type}' needs numeric key '{key}'")
        })
    };
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: number("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        },
        other => {
            bail!("{source_key}: rope_type '{other}' is not supported; supported: {SUPPORTED_ROPE}")
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// `eos_token_id` may be one id or a list.
fn token_ids(value: &Value) -> Option<Vec<u32>> {
    match value {
        Value::Number(n) => n.as_u64().map(|id| vec![id as u32]),
        Value::Array(items) => items
            .iter()
            .map(|v| v.as_u64().map(|id| id as u32))
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
            "eos_token_id": [1, 2]
        })
    }

    #[test]
    fn transformers4_and_5_layouts_resolve_identically() {
        let mut v4 = llama();
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16});
        let mut v5 = llama();
        let obj = v5.as_object_mut().unwrap();
        obj.remove("rope_theta");
        obj.remove("torch_dtype");
        obj.insert("dtype".into(), json!("bfloat16"));
        obj.insert(
            "rope_parameters".into(),
            json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16}),
        );
        let (a, b) = (resolve(&v4).unwrap(), resolve(&v5).unwrap());
        assert_eq!(a, b);
        assert_eq!(a.rope.theta, 500000.0);
        assert_eq!(a.declared_dtype, Some(FloatFormat::Bf16));
        assert_eq!(a.eos_token_ids, vec![1, 2]);
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn unsupported_architecture_lists_the_supported_ones() {
        let mut v = llama();
        v["architectures"] = json!(["MistralForCausalLM"]);
        let err = format!("{:#}", resolve(&v).unwrap_err());
        assert!(err.contains("MistralForCausalLM"), "{err}");
        assert!(err.contains("Qwen3ForCausalLM"), "{err}");
    }

    #[test]
    fn unsupported_rope_type_lists_the_supported_ones() {
        let mut v = llama();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let err = format!("{:#}", resolve(&v).unwrap_err());
        assert!(err.contains("yarn") && err.contains("llama3"), "{err}");
    }

    #[test]
    fn missing_key_is_named() {
        let mut v = llama();
        v.as_object_mut().unwrap().remove("hidden_size");
        let err = format!("{:#}", resolve(&v).unwrap_err());
        assert!(err.contains("'hidden_size'"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_only() {
        let mut v = llama();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        let cfg = resolve(&v).unwrap();
        assert!(cfg.qkv_bias && !cfg.o_bias && !cfg.qk_norm);
    }
}
