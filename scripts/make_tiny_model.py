#!/usr/bin/env python3
"""Build data/tiny-llama/: the tiny byte-level Llama used by the CI smoke run and data tests.

    /work/venv-ref/bin/python scripts/make_tiny_model.py [--out data/tiny-llama] [--steps 500]

Made with: Python 3.11.7, torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0,
on CPU (2 threads). Deterministic for a given torch build and thread count (seed 0).

Tokenizer (tokenizer.json, built with the `tokenizers` library)
  Byte-level BPE whose vocabulary is exactly the 256 byte symbols (GPT-2's bytes_to_unicode
  alphabet, id == byte value) and which has no merges, so every UTF-8 byte is one token and any
  text round-trips. Pre-tokenizer/decoder: ByteLevel (no prefix space, no regex split). No
  post-processor: encode(..., add_special_tokens=True) adds nothing.
  Special tokens: <|endoftext|> = 256 (bos / eos / pad / unk), <|im_start|> = 257,
  <|im_end|> = 258 (ChatML turn markers). Vocabulary size 259 == the model's vocab_size.
  tokenizer_config.json holds a plain ChatML chat_template.

Model (model.safetensors, float32, ~0.43 MB)
  LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 KV heads (head_dim 16), intermediate 128,
  rope_theta 10000, max_position_embeddings 512, rms_norm_eps 1e-5, untied embeddings.

Training (so the attention pattern matters: the model is a real, if weak, language model)
  data/shakespeare/train.jsonl as a byte stream: every document is [256] + bytes + [256]
  (bos, text, eos -- what dms-retrofit's packing produces with bos_id = eos_id = 256),
  concatenated and cut into windows of 128 (+1 for the shifted target). AdamW (lr 3e-3,
  betas 0.9/0.95, weight decay 0.01), linear warm-up 30 steps then cosine to 10%, batch 32
  random windows, grad-clip 1.0. Eval loss = mean next-token cross-entropy over all consecutive
  128-token windows of data/shakespeare/eval.jsonl packed the same way; it is printed before and
  after training and recorded in data/tiny-llama/training.json.
"""

import argparse
import json
import math
import os
import platform
import sys
import time

import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
EOT_ID, VOCAB = 256, 259
SEQ = 128
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable-unicode map (what ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer():
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT, IM_START, IM_END])
    assert tok.token_to_id(EOT) == 256 and tok.token_to_id(IM_END) == 258
    assert tok.get_vocab_size(with_added_tokens=True) == VOCAB
    return tok


def tokenizer_config():
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in [(256, EOT), (257, IM_START), (258, IM_END)]
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": EOT,
        "unk_token": EOT,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def stream(path):
    ids = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            ids += [EOT_ID] + list(text.encode("utf-8")) + [EOT_ID]
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def eval_loss(model, ids):
    model.eval()
    n = (len(ids) - 1) // SEQ
    x = ids[: n * SEQ].view(n, SEQ)
    y = ids[1 : n * SEQ + 1].view(n, SEQ)
    total = 0.0
    for i in range(0, n, 64):
        logits = model(input_ids=x[i : i + 64]).logits
        total += torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), y[i : i + 64].reshape(-1), reduction="sum"
        ).item()
    model.train()
    return total / (n * SEQ)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "data", "tiny-llama"))
    ap.add_argument("--data", default=os.path.join(REPO, "data", "shakespeare"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)

    tok = build_tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())

    train = stream(os.path.join(args.data, "train.jsonl"))
    heldout = stream(os.path.join(args.data, "eval.jsonl"))
    before = eval_loss(model, heldout)
    print(f"params {n_params}, train tokens {len(train)}, eval tokens {len(heldout)}")
    print(f"eval loss before training: {before:.4f} (ln {VOCAB} = {math.log(VOCAB):.4f})")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = 30

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(0)
    start = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, len(train) - SEQ - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + SEQ] for s in starts.tolist()])
        y = torch.stack([train[s + 1 : s + SEQ + 1] for s in starts.tolist()])
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
    after = eval_loss(model, heldout)
    print(f"eval loss after training: {after:.4f}")

    # Save.
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=2)
        f.write("\n")
    for stale in ("chat_template.jinja", "special_tokens_map.json"):
        if os.path.exists(os.path.join(args.out, stale)):
            os.remove(os.path.join(args.out, stale))
    gen_cfg = {
        "bos_token_id": EOT_ID,
        "eos_token_id": [EOT_ID, 258],
        "pad_token_id": EOT_ID,
        "do_sample": False,
    }
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump(gen_cfg, f, indent=2)
        f.write("\n")
    record = {
        "eval_loss_before": round(before, 4),
        "eval_loss_after": round(after, 4),
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": SEQ,
        "lr": args.lr,
        "parameters": n_params,
        "train_tokens": len(train),
        "eval_tokens": len(heldout),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")

    # Verify: transformers reloads the folder with identical outputs, tokenizers round-trips,
    # the chat template renders.
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    probe = heldout[:SEQ].unsqueeze(0)
    with torch.no_grad():
        diff = (reloaded(input_ids=probe).logits - model.eval()(input_ids=probe).logits).abs().max()
    assert diff.item() < 1e-5, f"reloaded model differs: {diff}"
    hf_tok = AutoTokenizer.from_pretrained(args.out)
    text = "To be, or not to be: that is the question.\nÜber naïve café — 東京 🎭"
    ids = hf_tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8")), "tokenizer is not byte-identity"
    assert hf_tok.decode(ids) == text
    raw = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    assert raw.encode(text).ids == ids and raw.decode(ids) == text
    chat = hf_tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", repr(chat)
    chat_ids = hf_tok.encode(chat, add_special_tokens=False)
    assert chat_ids[0] == 257 and chat_ids.count(258) == 1, chat_ids
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (256, 256, 256)
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    total = sum(sizes.values())
    print(f"wrote {args.out}: {sizes} ({total} bytes)")
    assert total < 1_000_000, "tiny model folder must stay under 1 MB"
    prompt = torch.tensor([[EOT_ID] + list(b"KING.\n")])
    out = reloaded.generate(prompt, max_new_tokens=80, do_sample=False)
    print("greedy sample:", repr(hf_tok.decode(out[0].tolist())))


if __name__ == "__main__":
    sys.exit(main())
