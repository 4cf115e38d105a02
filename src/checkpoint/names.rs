//! The one table between structural [`WeightKey`]s and Hugging Face tensor names, used in both
//! directions (loading and export). Llama, Qwen2 and Qwen3 share it.

use crate::model::{AdapterTensor, LayerNorm, Projection, WeightKey};

/// `(projection, path under model.layers.{i})`
const PROJECTIONS: [(Projection, &str); 7] = [
    (Projection::Q, "self_attn.q_proj"),
    (Projection::K, "self_attn.k_proj"),
    (Projection::V, "self_attn.v_proj"),
    (Projection::O, "self_attn.o_proj"),
    (Projection::Gate, "mlp.gate_proj"),
    (Projection::Up, "mlp.up_proj"),
    (Projection::Down, "mlp.down_proj"),
];

/// `(norm, path under model.layers.{i})`; all end in `.weight`.
const NORMS: [(LayerNorm, &str); 4] = [
    (LayerNorm::Input, "input_layernorm"),
    (LayerNorm::PostAttention, "post_attention_layernorm"),
    (LayerNorm::Q, "self_attn.q_norm"),
    (LayerNorm::K, "self_attn.k_norm"),
];

/// The DMS adapter's tensors, as the official Model-Optimizer export names them.
const ADAPTER: [(AdapterTensor, &str); 3] = [
    (AdapterTensor::Weight, "self_attn.dms_proj_alpha.weight"),
    (AdapterTensor::Bias, "self_attn.dms_proj_alpha.bias"),
    (AdapterTensor::Norm, "self_attn.dms_proj_alpha_norm.weight"),
];

/// The Hugging Face name of a tensor.
pub fn hf_name(key: WeightKey) -> String {
    match key {
        WeightKey::Embedding => "model.embed_tokens.weight".into(),
        WeightKey::FinalNorm => "model.norm.weight".into(),
        WeightKey::LmHead => "lm_head.weight".into(),
        WeightKey::Linear {
            layer,
            projection,
            bias,
        } => {
            let path = PROJECTIONS
                .iter()
                .find(|(p, _)| *p == projection)
                .map(|(_, path)| *path)
                .expect("every projection has a name");
            let part = if bias { "bias" } else { "weight" };
            format!("model.layers.{layer}.{path}.{part}")
        }
        WeightKey::Norm { layer, norm } => {
            let path = NORMS
                .iter()
                .find(|(n, _)| *n == norm)
                .map(|(_, path)| *path)
                .expect("every norm has a name");
            format!("model.layers.{layer}.{path}.weight")
        }
        WeightKey::Adapter { layer, tensor } => {
            let path = ADAPTER
                .iter()
                .find(|(t, _)| *t == tensor)
                .map(|(_, path)| *path)
                .expect("every adapter tensor has a name");
            format!("model.layers.{layer}.{path}")
        }
    }
}

/// The key of a Hugging Face tensor name, if it is one the decoder knows.
pub fn parse_hf_name(name: &str) -> Option<WeightKey> {
    match name {
        "model.embed_tokens.weight" => return Some(WeightKey::Embedding),
        "model.norm.weight" => return Some(WeightKey::FinalNorm),
        "lm_head.weight" => return Some(WeightKey::LmHead),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, path) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some((tensor, _)) = ADAPTER.iter().find(|(_, p)| *p == path) {
        return Some(WeightKey::Adapter {
            layer,
            tensor: *tensor,
        });
    }
    let (path, part) = path.rsplit_once('.')?;
    if let Some((projection, _)) = PROJECTIONS.iter().find(|(_, p)| *p == path) {
        let bias = match part {
            "weight" => false,
            "bias" => true,
            _ => return None,
        };
        return Some(WeightKey::Linear {
            layer,
            projection: *projection,
            bias,
        });
    }
    let (norm, _) = NORMS.iter().find(|(_, p)| *p == path)?;
    (part == "weight").then_some(WeightKey::Norm { layer, norm: *norm })
}

/// Non-parameter buffers some older checkpoints carry; they are recomputed, never loaded.
pub fn is_ignorable_buffer(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::hf_config::resolve;
    use serde_json::json;

    #[test]
    fn every_key_round_trips_through_its_name() {
        let cfg = resolve(&json!({
            "architectures": ["Qwen3ForCausalLM"], "vocab_size": 16, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "attention_bias": true, "mlp_bias": true
        }))
        .unwrap();
        let keys: Vec<_> = cfg
            .base_weight_keys()
            .into_iter()
            .chain(crate::dms::decision::adapter_keys(&cfg))
            .collect();
        assert!(keys.len() > 30);
        for key in keys {
            let name = hf_name(key);
            assert_eq!(parse_hf_name(&name), Some(key), "{name}");
        }
        assert_eq!(
            hf_name(WeightKey::Adapter {
                layer: 3,
                tensor: AdapterTensor::Weight
            }),
            "model.layers.3.self_attn.dms_proj_alpha.weight"
        );
        assert_eq!(parse_hf_name("model.layers.0.self_attn.q_proj.scale"), None);
    }
}
