#!/usr/bin/env python3
"""Chat prompts for self-distillation (`dms-retrofit gen-data`) built offline from the training
split of the Shakespeare corpus (scripts/get-shakespeare.sh): each prompt quotes a passage of a
training work and asks one of several kinds of question about it. The held-out works are never
quoted, so evaluation text stays unseen.

    python3 scripts/make-chat-prompts.py [CORPUS_DIR] [OUT.jsonl] [N]
    (defaults: data/corpus/shakespeare, data/corpus/shakespeare/chat-prompts.jsonl, 2000)

Deterministic: the same corpus gives the same prompts.
"""
import json
import os
import random
import sys

corpus = sys.argv[1] if len(sys.argv) > 1 else "data/corpus/shakespeare"
out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(corpus, "chat-prompts.jsonl")
n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000

ASKS = [
    "Explain this passage in plain modern English:\n\n{p}",
    "Summarize what happens in this passage in two or three sentences:\n\n{p}",
    "Who is speaking in this passage, and what do they want?\n\n{p}",
    "What is the mood of this passage? Point to the words that create it.\n\n{p}",
    "Continue this scene for a few more lines, in the same style:\n\n{p}",
    "List the main images or metaphors in this passage and say what each suggests:\n\n{p}",
    "Rewrite this passage as a short modern conversation:\n\n{p}",
    "What question would you ask a student to check they understood this passage? Then answer it.\n\n{p}",
]

works = []
with open(os.path.join(corpus, "train.jsonl")) as f:
    for line in f:
        doc = json.loads(line)
        # Speeches: blank-line separated blocks of a useful size.
        blocks = [b.strip() for b in doc["text"].split("\n\n")]
        blocks = [b for b in blocks if 200 <= len(b) <= 900]
        if blocks:
            works.append((doc["work"], blocks))
rng = random.Random(16)
tmp = out + ".tmp"
with open(tmp, "w") as f:
    for i in range(n):
        work, blocks = works[i % len(works)]
        passage = rng.choice(blocks)
        ask = ASKS[rng.randrange(len(ASKS))]
        f.write(json.dumps({"prompt": ask.format(p=passage), "work": work}) + "\n")
os.replace(tmp, out)
print(f"make-chat-prompts: {out}: {n} prompts from {len(works)} training texts", file=sys.stderr)
