#!/usr/bin/env python3
"""Packs the model folder for the GPU machine, whose transfer limit (64 MiB in all) the
90 MB f32 safetensors file does not fit: every weight stays f32 and bit-exact, except
the rows of the word-embedding table that no sentence of the given files tokenizes to,
which are zeroed; the file is then gzipped (zeros compress away). On those sentences
the model computes exactly what the original does.

    .cache/venv/bin/python worker/scripts/pack_gpu_model.py MODEL_DIR OUT_DIR SENTENCES...
"""
import gzip
import os
import shutil
import sys

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

KEEP = ["config.json", "config_sentence_transformers.json", "modules.json",
        "sentence_bert_config.json", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt", "1_Pooling/config.json"]


def main():
    model_dir, out_dir, *sentence_files = sys.argv[1:]
    os.makedirs(os.path.join(out_dir, "1_Pooling"), exist_ok=True)
    for name in KEEP:
        shutil.copy(os.path.join(model_dir, name), os.path.join(out_dir, name))
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.no_truncation()
    used = set(range(0, 1000))  # [PAD], [UNK], [CLS], [SEP], [MASK] and the unused block
    for path in sentence_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                used.update(tok.encode(line.rstrip("\n")).ids)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    key = next(k for k in tensors if k.endswith("word_embeddings.weight"))
    words = tensors[key]
    mask = np.zeros(words.shape[0], dtype=bool)
    mask[sorted(used)] = True
    words = words.copy()
    words[~mask] = 0.0
    tensors[key] = words
    plain = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, plain)
    with open(plain, "rb") as src, gzip.open(plain + ".gz", "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst)
    os.remove(plain)
    print(f"kept {mask.sum()} of {len(mask)} word-embedding rows; "
          f"{os.path.getsize(plain + '.gz') / 1e6:.1f} MB gzipped", file=sys.stderr)


if __name__ == "__main__":
    main()
