#!/usr/bin/env python3
"""Writes the small parquet files the data tests read (tests/fixtures/parquet/), with pyarrow as
the Hugging Face `datasets` library writes them. Each has a JSONL twin holding the same documents,
so the tests can require identical token streams.

    python3 -m venv .venv-parquet && .venv-parquet/bin/pip install pyarrow==22.0.0
    .venv-parquet/bin/python scripts/make-parquet-fixtures.py
"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "parquet")
os.makedirs(OUT, exist_ok=True)

texts = [
    "To be, or not to be, that is the question:",
    None,  # a null row: skipped
    "Whether 'tis nobler in the mind to suffer\nThe slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "",  # empty: encodes to nothing, counted as an empty document
    "And by opposing end them. \u00c9t\u00e9 \u2014 unicode survives.",
]
# text + an unrelated column, snappy (pyarrow's default), two row groups.
pq.write_table(
    pa.table({"id": list(range(len(texts))), "text": texts}),
    os.path.join(OUT, "text-snappy.parquet"),
    compression="snappy",
    row_group_size=3,
)
# The same documents under another column name, gzip.
pq.write_table(
    pa.table({"content": texts, "score": [0.5] * len(texts)}),
    os.path.join(OUT, "content-gzip.parquet"),
    compression="gzip",
)
with open(os.path.join(OUT, "text.jsonl"), "w") as f:
    for t in texts:
        if t is not None:
            f.write(json.dumps({"text": t}) + "\n")

chats = [
    [{"role": "user", "content": "Who is there?"}, {"role": "assistant", "content": "Nay, answer me."}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Stand, and unfold yourself."},
        {"role": "assistant", "content": "Long live the king!"},
    ],
]
# messages as list<struct<role, content>> (what `datasets` stores), plus a source column, zstd.
pq.write_table(
    pa.table({"messages": chats, "source": ["hamlet", "hamlet"]}),
    os.path.join(OUT, "chat-zstd.parquet"),
    compression="zstd",
)
with open(os.path.join(OUT, "chat.jsonl"), "w") as f:
    for c in chats:
        f.write(json.dumps({"messages": c}) + "\n")
for name in sorted(os.listdir(OUT)):
    print(name, os.path.getsize(os.path.join(OUT, name)))
