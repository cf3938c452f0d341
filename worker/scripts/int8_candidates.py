#!/usr/bin/env python3
"""Rebuild the int8 candidates that docs/benchmarks.md compares against the shipped graph.

    .cache/venv/bin/python worker/scripts/int8_candidates.py MODEL_DIR OUT_DIR

MODEL_DIR is a model folder already exported by export_onnx.py (onnx/model.onnx is the
f32 graph the candidates start from). For each candidate NAME this writes
OUT_DIR/NAME/onnx/model_int8.onnx beside symlinks to MODEL_DIR's files, so that

    kestrel-worker bench --model OUT_DIR/NAME --variants f32,int8 --concurrency 32 \
        --seconds 4 --rounds 3

measures it through the worker against f32 in the same run, and prints each
candidate's min / mean cosine to sentence-transformers on worker/data/sentences.txt
(batches of 16, length-grouped as the worker's quality path; 2 threads).

Candidates (SmoothQuant, offline): the per-channel smoothing s = max|x|^a / max|w|^(1-a)
goes into the weight rows (W' = diag(s) W) and the activation is divided by s, so the
MatMul (or fused Attention) keeps ONNX Runtime's fused per-tensor dynamic int8 kernel.
MiniLM is a post-LayerNorm BERT: the LayerNorm output that feeds QKV and FFN-up is also
the residual of the next Add, so folding 1/s into the LayerNorm's gamma and beta would
need x*s on the residual path: one Mul of the same size as the x/s used here.
- smoothquant-a0.5: QKV and FFN-up of all 6 layers smoothed (a = 0.5) + per-tensor int8;
  attention output projections and layer 5's FFN down per-tensor int8; FFN down of
  layers 0-4 f32.
- smoothquant-swept: as above, a chosen per node from (none, 0.3, 0.5, 0.7, 0.85) by
  quantizing that node alone and scoring 1 - min cosine against the f32 graph's own
  embeddings of worker/data/calibration.txt (never the evaluation sentences).
- smoothquant-swept-down: smoothquant-swept + every FFN down per-tensor int8.
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime
from onnx import numpy_helper, helper
from onnxruntime.quantization import QuantType, quantize_dynamic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import export_onnx as ex  # noqa: E402  (calibration_ranges, layer, tokenizer settings)

from tokenizers import Tokenizer  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data")
QKV = [f"Attention_{i}" for i in range(6)]
AO = [ex.layer(i, "attention/output") for i in range(6)]
UP = [ex.layer(i, "intermediate") for i in range(6)]
DOWN = [ex.layer(i, "output") for i in range(6)]
ALPHAS = (None, 0.3, 0.5, 0.7, 0.85)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]


def build(f32_path, out_path, spec, ranges):
    """spec: node -> alpha (None: per-tensor int8 without smoothing); other nodes stay f32."""
    model = onnx.load(f32_path)
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes, added = [], []
    for k, node in enumerate(graph.node):
        alpha = spec.get(node.name)
        if node.name in spec and alpha is not None:
            w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
            s = np.maximum(ranges[node.name], 1e-5) ** alpha / np.maximum(np.abs(w).max(axis=1), 1e-5) ** (1 - alpha)
            weights[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
            added.append(numpy_helper.from_array((1 / s).astype(np.float32), f"sq{k}_inv_s"))
            nodes.append(helper.make_node("Mul", [node.input[0], f"sq{k}_inv_s"], [f"sq{k}_x"], name=f"sq{k}"))
            node.input[0] = f"sq{k}_x"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    smoothed = out_path + ".smoothed"
    onnx.save(model, smoothed)
    quantize_dynamic(
        smoothed,
        out_path,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        op_types_to_quantize=["MatMul", "Attention"],
        nodes_to_quantize=list(spec),
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    os.remove(smoothed)


class Embedder:
    def __init__(self, model_dir):
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tok.no_padding()
        self.tok.no_truncation()

    def ids(self, s):
        ids = self.tok.encode(s).ids
        return ids if len(ids) <= ex.MAX_TOKENS else ids[: ex.MAX_TOKENS - 1] + ids[-1:]

    @staticmethod
    def session(path):
        o = onnxruntime.SessionOptions()
        o.intra_op_num_threads = 2
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return onnxruntime.InferenceSession(path, o, providers=["CPUExecutionProvider"])

    def embed(self, session, sentences):
        """As the worker's quality path: chunks of 16, sorted by length, groups cut at 25 % padding."""
        seqs, out = [self.ids(s) for s in sentences], [None] * len(sentences)
        for c in range(0, len(seqs), 16):
            order = sorted(range(c, min(c + 16, len(seqs))), key=lambda i: len(seqs[i]))
            start = 0
            while start < len(order):
                end, real = start, 0
                while end < len(order):
                    n = len(seqs[order[end]])
                    if end > start and n * (end - start + 1) > 1.25 * (real + n):
                        break
                    real, end = real + n, end + 1
                group = order[start:end]
                width = max(len(seqs[i]) for i in group)
                ids = np.zeros((len(group), width), np.int64)
                for r, i in enumerate(group):
                    ids[r, : len(seqs[i])] = seqs[i]
                emb = session.run(None, {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})[0]
                for r, i in enumerate(group):
                    out[i] = emb[r]
                start = end
        return np.array(out)


def cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    model_dir, out_dir = (os.path.abspath(p) for p in sys.argv[1:])
    f32 = os.path.join(model_dir, "onnx", "model.onnx")
    ranges = ex.calibration_ranges(model_dir, f32, set(QKV + UP + DOWN + AO))
    embedder = Embedder(model_dir)
    calibration = lines(os.path.join(DATA, "calibration.txt"))
    cal_ref = embedder.embed(Embedder.session(f32), calibration)
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, "probe.onnx")
    swept = {}
    for node in QKV + UP:
        losses = {}
        for alpha in ALPHAS:
            build(f32, probe, {node: alpha}, ranges)
            losses[alpha] = 1 - cosines(embedder.embed(Embedder.session(probe), calibration), cal_ref).min()
        swept[node] = min(losses, key=losses.get)
        print(f"sweep {node}: alpha {swept[node]} ({', '.join(f'{a}: {l:.1e}' for a, l in losses.items())})", file=sys.stderr)
    os.remove(probe)
    base = {n: None for n in AO + [DOWN[5]]}
    candidates = {
        "smoothquant-a0.5": {**base, **{n: 0.5 for n in QKV + UP}},
        "smoothquant-swept": {**base, **swept},
        "smoothquant-swept-down": {**base, **swept, **{n: None for n in DOWN}},
    }
    sentences = lines(os.path.join(DATA, "sentences.txt"))
    import base64
    import json

    with open(os.path.join(DATA, "reference-embeddings.json")) as f:
        ref = np.array([np.frombuffer(base64.b64decode(b), "<f4") for b in json.load(f)["embeddings_f32le_base64"]])
    for name, spec in candidates.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(os.path.join(folder, "onnx"), exist_ok=True)
        for entry in os.listdir(model_dir):
            if entry != "onnx" and not os.path.lexists(os.path.join(folder, entry)):
                os.symlink(os.path.join(model_dir, entry), os.path.join(folder, entry))
        if not os.path.lexists(os.path.join(folder, "onnx", "model.onnx")):
            os.symlink(f32, os.path.join(folder, "onnx", "model.onnx"))
        path = os.path.join(folder, "onnx", "model_int8.onnx")
        build(f32, path, spec, ranges)
        cos = cosines(embedder.embed(Embedder.session(path), sentences), ref)
        print(f"{name}: min cosine {cos.min():.5f} (sentence {cos.argmin()}), mean {cos.mean():.5f} -> {folder}")


if __name__ == "__main__":
    main()
