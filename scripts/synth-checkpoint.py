#!/usr/bin/env python3
"""Writes a Qwen3-shaped checkpoint at a real model's dimensions (random bf16 weights, safetensors
shards of <= 4.5 GB + index, config.json) for `dms-retrofit bench load`:

    [SHAPE=hidden,intermediate,layers,heads,kv_heads,head_dim,vocab] synth-checkpoint.py OUT_DIR

Default shape: Qwen3-8B (16.4 GB). Standard library only (the GPU machine guarantees no numpy or
safetensors package), safetensors written by hand (8-byte header length, JSON header, data).
`make_synthetic_checkpoint.py` makes single-file Llama-shaped checkpoints of a chosen parameter
count for the CPU memory benchmark instead."""
import json, os, random, struct, sys, time
out = sys.argv[1]; os.makedirs(out, exist_ok=True)
H, I, L, NH, KV, D, V = [int(x) for x in os.environ.get("SHAPE", "4096,12288,36,32,8,128,151936").split(",")]
cfg = {"architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
       "bos_token_id": 151643, "dtype": "bfloat16", "eos_token_id": 151645, "head_dim": D,
       "hidden_act": "silu", "hidden_size": H, "initializer_range": 0.02, "intermediate_size": I,
       "layer_types": ["full_attention"] * L, "max_position_embeddings": 40960, "max_window_layers": L,
       "model_type": "qwen3", "num_attention_heads": NH, "num_hidden_layers": L, "num_key_value_heads": KV,
       "rms_norm_eps": 1e-06, "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
       "sliding_window": None, "tie_word_embeddings": False, "use_cache": True, "use_sliding_window": False,
       "vocab_size": V}
json.dump(cfg, open(f"{out}/config.json", "w"), indent=1)
t = [("model.embed_tokens.weight", [V, H])]
for l in range(L):
    p = f"model.layers.{l}."
    t += [(p + "input_layernorm.weight", [H]), (p + "self_attn.q_proj.weight", [NH * D, H]),
          (p + "self_attn.k_proj.weight", [KV * D, H]), (p + "self_attn.v_proj.weight", [KV * D, H]),
          (p + "self_attn.o_proj.weight", [H, NH * D]), (p + "self_attn.q_norm.weight", [D]),
          (p + "self_attn.k_norm.weight", [D]), (p + "post_attention_layernorm.weight", [H]),
          (p + "mlp.gate_proj.weight", [I, H]), (p + "mlp.up_proj.weight", [I, H]),
          (p + "mlp.down_proj.weight", [H, I])]
t += [("model.norm.weight", [H]), ("lm_head.weight", [V, H])]
random.seed(0)
pool = b"".join(struct.pack("<f", random.gauss(0, 0.02))[2:] for _ in range(1 << 20))  # bf16 = top half of f32
pool = pool * 16
def data(n):
    b = bytearray()
    while len(b) < n: b += pool[: n - len(b)]
    return b
shards, cur, size = [], [], 0
for name, shape in t:
    n = 2
    for s in shape: n *= s
    if size + n > 4_500_000_000 and cur: shards.append(cur); cur, size = [], 0
    cur.append((name, shape, n)); size += n
shards.append(cur)
wm, t0, total = {}, time.time(), 0
for i, shard in enumerate(shards):
    fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    hdr, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, n in shard:
        hdr[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}; off += n; wm[name] = fn
    h = json.dumps(hdr).encode(); h += b" " * (-len(h) % 8)
    with open(f"{out}/{fn}", "wb") as f:
        f.write(struct.pack("<Q", len(h))); f.write(h)
        for name, shape, n in shard: f.write(data(n))
    total += off
json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(f"{out}/model.safetensors.index.json", "w"))
print(f"wrote {total / 1e9:.2f} GB in {len(shards)} shards in {time.time() - t0:.1f} s")
