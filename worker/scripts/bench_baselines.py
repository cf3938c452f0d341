#!/usr/bin/env python3
"""Baselines for `kestrel-worker bench`: sentence-transformers (PyTorch CPU) and raw
ONNX Runtime on the same sentences, batch size and thread count as the worker.

    .cache/venv/bin/python worker/scripts/bench_baselines.py MODEL_DIR SENTENCES_FILE \
        --seconds 10 --batch-size 32 --threads 2 [--only st,ort]

Prints one JSON object: {"sentence-transformers": {...}, "onnxruntime-f32": {...}},
each with items_per_second (wall clock), items_per_cpu_second (this process's CPU
time, all threads: robust to other load on the machine), batches and seconds.
The sentences are those of SENTENCES_FILE shorter than 400 characters, cycled, in order, in batches of
--batch-size; tokenization is inside the timed loop for both (as in the worker).
Raw ONNX Runtime runs MODEL_DIR/onnx/model.onnx, the worker's own f32 graph, with
the `tokenizers` library, padding to the longest input of each batch (what a
plain caller does; the worker instead runs each batch in groups of similar length).
Idle threads block rather than spin (OMP_WAIT_POLICY=PASSIVE for PyTorch, ONNX
Runtime's allow_spinning=0), as in the worker: on a shared machine spinning costs
the baselines 2-4x. --spin restores the libraries' defaults.
"""
import argparse
import json
import os
import sys
import time


def load_sentences(path):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]
    return [l for l in lines if len(l.encode()) < 400]


def batches(sentences, size):
    i = 0
    while True:
        yield [sentences[(i + k) % len(sentences)] for k in range(size)]
        i += size


def timed(run, gen, seconds, size):
    run(next(gen))  # warm-up
    start, cpu, n = time.perf_counter(), time.process_time(), 0
    while n < 3 or time.perf_counter() - start < seconds:
        run(next(gen))
        n += 1
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    return {"items_per_second": n * size / elapsed, "items_per_cpu_second": n * size / cpu,
            "batches": n, "seconds": elapsed, "cpu_seconds": cpu}


def bench_st(model_dir, sentences, args):
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(model_dir, device="cpu")
    gen = batches(sentences, args.batch_size)

    def run(batch):
        model.encode(batch, batch_size=args.batch_size, normalize_embeddings=True)

    return timed(run, gen, args.seconds, args.batch_size)


def bench_ort(model_dir, sentences, args):
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    tok.enable_truncation(256)
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    if not args.spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(os.path.join(model_dir, "onnx", "model.onnx"), so, providers=["CPUExecutionProvider"])
    gen = batches(sentences, args.batch_size)

    def run(batch):
        enc = tok.encode_batch(batch)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        sess.run(None, {"input_ids": ids, "attention_mask": mask})

    return timed(run, gen, args.seconds, args.batch_size)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("sentences")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--only", default="st,ort")
    p.add_argument("--spin", action="store_true",
                   help="let idle threads spin (the libraries' default); off by default, like the worker")
    args = p.parse_args()
    if not args.spin:
        # PyTorch's OpenMP threads: block instead of busy-waiting (must precede `import torch`).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sentences = load_sentences(args.sentences)
    out = {}
    only = args.only.split(",")
    if "st" in only:
        out["sentence-transformers"] = bench_st(args.model_dir, sentences, args)
    if "ort" in only:
        out["onnxruntime-f32"] = bench_ort(args.model_dir, sentences, args)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
