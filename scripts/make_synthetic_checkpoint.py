#!/usr/bin/env python3
"""Write a random Llama-shaped checkpoint of a chosen size, for load-memory benchmarks.

    make_synthetic_checkpoint.py OUT_DIR --params-millions 250 --dtype f32|bf16

Needs numpy and safetensors only. Values are N(0, 0.02) (norm weights 1); the model is not meant to
produce sensible text, only to have the real tensor names, shapes and file layout.
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import save_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--params-millions", type=float, default=250)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    hidden, inter, heads, kv, vocab = 1024, 2816, 16, 4, 32000
    head_dim = hidden // heads
    per_layer = hidden * hidden * 2 + 2 * hidden * kv * head_dim + 3 * hidden * inter + 2 * hidden
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((args.params_millions * 1e6 - fixed) / per_layer))
    rng = np.random.default_rng(0)

    def rand(*shape):
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if args.dtype == "f32":
            return x
        # bf16 = the upper 16 bits of f32 (truncation is fine for random data).
        return (x.view(np.uint32) >> 16).astype(np.uint16)

    def ones(n):
        x = np.ones(n, dtype=np.float32)
        return x if args.dtype == "f32" else (x.view(np.uint32) >> 16).astype(np.uint16)

    tensors = {"model.embed_tokens.weight": rand(vocab, hidden), "lm_head.weight": rand(vocab, hidden),
               "model.norm.weight": ones(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = rand(hidden, hidden)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, hidden)
        tensors[p + "mlp.gate_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, inter)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.safetensors")
    if args.dtype == "bf16":
        # safetensors.numpy has no bf16: write the header by hand around the raw uint16 data.
        header, offset, blobs = {}, 0, []
        for name in sorted(tensors):
            data = tensors[name].tobytes()
            header[name] = {"dtype": "BF16", "shape": list(tensors[name].shape),
                            "data_offsets": [offset, offset + len(data)]}
            offset += len(data)
            blobs.append(data)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for b in blobs:
                f.write(b)
    else:
        save_file(tensors, path)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
              "torch_dtype": "float32" if args.dtype == "f32" else "bfloat16"}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"{path}: {layers} layers, {os.path.getsize(path) / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
