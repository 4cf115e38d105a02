#!/usr/bin/env python3
"""Dense PyTorch anchors for `dms-retrofit bench eval` / `bench decode`, on the same card.

Random-weight transformers models of the benchmark shapes (bf16, SDPA attention), no downloads:
  eval    forward + chunked log-softmax NLL over one sequence (what `eval` scores), tokens/s
  decode  greedy decode steps over a static cache pre-filled to the context (random keys and
          values; a decode step's cost does not depend on their values), tokens/s of the batch

  python3 scripts/torch_reference_infer.py eval   --shape qwen3-8b --seq 4096,16384,32768
  python3 scripts/torch_reference_infer.py decode --shape qwen3-8b --context 4096,32768 --batch 1,16

One JSON line per measurement (same field names as ours where they mean the same).
"""
import argparse
import json
import time

import torch

SHAPES = {
    # name: (hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, tied)
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936, True),
    "qwen3-1.7b": (2048, 6144, 28, 16, 8, 128, 151936, False),
    "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936, False),
}


def model_of(shape):
    from transformers import AutoModelForCausalLM, Qwen3Config

    hidden, inter, layers, heads, kv, head_dim, vocab, tied = SHAPES[shape]
    cfg = Qwen3Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    return model.eval(), cfg


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def bench_eval(args):
    model, cfg = model_of(args.shape)
    for seq in args.seq:
        ids = (torch.arange(seq, device="cuda") * 7919 + 11) % cfg.vocab_size
        ids = ids[None]

        def run():
            hidden = model.model(input_ids=ids).last_hidden_state
            nll = torch.zeros((), device="cuda", dtype=torch.float32)
            for start in range(0, seq - 1, 2048):
                rows = min(2048, seq - 1 - start)
                logits = model.lm_head(hidden[:, start:start + rows]).float()
                target = ids[:, start + 1:start + 1 + rows]
                nll -= torch.log_softmax(logits, -1).gather(-1, target[..., None]).sum()
            return nll

        seconds = timed(run, args.repeats)
        print(json.dumps({"bench": "torch-eval", "shape": args.shape, "seq": seq,
                          "dense_tokens_per_s": seq / seconds,
                          "peak_gib": torch.cuda.max_memory_allocated() / 2**30}), flush=True)
        torch.cuda.reset_peak_memory_stats()


@torch.no_grad()
def bench_decode(args):
    from transformers import StaticCache

    model, cfg = model_of(args.shape)
    _, _, layers, _, kv, head_dim, _, _ = SHAPES[args.shape]
    for context in args.context:
        for batch in args.batch:
            total = context + args.tokens + 4
            cache = StaticCache(config=cfg, max_cache_len=total)
            for layer in range(layers):
                k = torch.randn(batch, kv, context, head_dim, device="cuda", dtype=torch.bfloat16)
                cache.update(k, k.clone(), layer, {"cache_position": torch.arange(context, device="cuda")})
            ids = torch.full((batch, 1), 11, device="cuda")
            position = [context]

            def step():
                pos = torch.tensor([position[0]], device="cuda")
                out = model(input_ids=ids, past_key_values=cache, cache_position=pos,
                            position_ids=pos[None].expand(batch, 1), use_cache=True)
                position[0] += 1
                return out.logits.argmax(-1)

            for _ in range(2):
                step()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.tokens):
                step()
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            kv_bytes = 2 * layers * batch * kv * total * head_dim * 2
            print(json.dumps({"bench": "torch-decode", "shape": args.shape, "context": context,
                              "batch": batch, "cache": "dense (HF StaticCache)",
                              "tokens_per_s": batch * args.tokens / seconds,
                              "ms_per_step": seconds * 1e3 / args.tokens,
                              "kv_allocated_bytes": kv_bytes}), flush=True)
            del cache
            torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("bench", choices=["eval", "decode"])
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--seq", default="4096")
    parser.add_argument("--context", default="4096")
    parser.add_argument("--batch", default="1")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.seq = [int(s) for s in args.seq.split(",")]
    args.context = [int(s) for s in args.context.split(",")]
    args.batch = [int(s) for s in args.batch.split(",")]
    (bench_eval if args.bench == "eval" else bench_decode)(args)


if __name__ == "__main__":
    main()
