#!/usr/bin/env python3
"""Produce the worker's ONNX variants from the model folder's safetensors.

    .cache/venv/bin/python worker/scripts/export_onnx.py MODEL_DIR

writes MODEL_DIR/onnx/model.onnx (f32) and MODEL_DIR/onnx/model_int8.onnx (int8),
each taking input_ids and attention_mask ([batch, seq], int64) and returning
sentence_embedding ([batch, 384], mean-pooled and L2-normalized), and
MODEL_DIR/onnx/RECIPE (a digest of this script and the calibration sentences:
setup-dev re-exports when it changes). Steps, all deterministic:

1. torch.onnx.export (TorchScript exporter, opset 17) of BertModel + mean pooling +
   normalization, with dynamic batch and sequence axes;
2. ONNX Runtime's transformer optimizer (model_type=bert): fused attention, skip
   layer-norm, bias-GELU, embedding layer-norm;
3. int8, mixed per layer (chosen by a per-layer sensitivity sweep, docs/worker.md):
   - per-tensor dynamic int8 (ONNX Runtime's fused DynamicQuantizeMatMul and
     QAttention, per-channel weights) where it costs almost nothing: every attention
     output projection, layer 0's QKV projection and layer 5's FFN down projection;
   - per-token dynamic int8 with SmoothQuant-style smoothing (alpha 0.5) where
     activations have outlier channels: the FFN up projections of layers 0, 1, 2 and 5
     and layer 1's QKV projection. Activations are divided per channel by a fixed
     scale (from the per-channel maxima on worker/data/calibration.txt, sentences that
     are not in the evaluation set) that the weights absorb, then quantized per token
     (uint8, zero point 128) for MatMulInteger;
   - f32 for the rest (the sensitive FFN down projections of layers 0-4 and the QKV
     projections of layers 2-5). Embeddings, layer norms and pooling stay f32.

Needs: torch, transformers, onnx, onnxruntime, tokenizers (scripts/python-requirements.txt).
"""
import hashlib
import logging
import os
import sys
import warnings

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from tokenizers import Tokenizer
from transformers import BertModel

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

HERE = os.path.dirname(os.path.abspath(__file__))
CALIBRATION = os.path.join(HERE, "..", "data", "calibration.txt")
# The model's max_seq_length (sentence_bert_config.json), as the worker truncates.
MAX_TOKENS = 256
SMOOTHING_ALPHA = 0.5


def layer(i, part):
    return f"/bert/encoder/layer.{i}/{part}/dense/MatMul"


# Per-layer choice, from the sensitivity sweep in docs/worker.md (1 - min cosine on
# the evaluation set when only that node is quantized).
PER_TENSOR_INT8 = [layer(i, "attention/output") for i in range(6)] + ["Attention_0", layer(5, "output")]
PER_TOKEN_INT8 = [layer(i, "intermediate") for i in (0, 1, 2, 5)] + ["Attention_1"]


class SentenceEncoder(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        token_type_ids = torch.zeros_like(input_ids)
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


def export_f32(model_dir, out_path):
    bert = BertModel.from_pretrained(model_dir, add_pooling_layer=False, attn_implementation="eager")
    bert.eval()
    model = SentenceEncoder(bert)
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    raw = out_path + ".raw"
    with torch.no_grad():
        torch.onnx.export(
            model,
            (ids, mask),
            raw,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    cfg = bert.config
    opt = optimize_model(
        raw,
        model_type="bert",
        num_heads=cfg.num_attention_heads,
        hidden_size=cfg.hidden_size,
        opt_level=1,
        use_gpu=False,
        only_onnxruntime=False,
    )
    print("fused operators:", opt.get_fused_operator_statistics(), file=sys.stderr)
    opt.save_model_to_file(out_path)
    os.remove(raw)


def recipe_digest():
    """What the ONNX files are made from, besides the model: this script and the calibration set."""
    h = hashlib.sha256()
    for path in (os.path.abspath(__file__), CALIBRATION):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def calibration_ranges(model_dir, f32_path, nodes):
    """Per input channel, the largest |activation| entering each node, over the calibration
    sentences run one at a time (no padding rows) through the f32 graph."""
    model = onnx.load(f32_path)
    inputs = {n.name: n.input[0] for n in model.graph.node if n.name in nodes}
    names = sorted(set(inputs.values()))
    for name in names:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    with open(CALIBRATION, encoding="utf-8") as f:
        sentences = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]
    ranges = {name: None for name in names}
    for sentence in sentences:
        ids = tokenizer.encode(sentence).ids
        if len(ids) > MAX_TOKENS:
            ids = ids[: MAX_TOKENS - 1] + ids[-1:]
        ids = np.array([ids], dtype=np.int64)
        outputs = session.run(names, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        for name, value in zip(names, outputs):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            ranges[name] = peak if ranges[name] is None else np.maximum(ranges[name], peak)
    return {node: ranges[name] for node, name in inputs.items()}


def per_token_int8(f32_path, out_path, nodes, ranges):
    """Rewrites each node in `nodes` (a MatMul, or a fused Attention: its QKV projection
    then MultiHeadAttention) as smoothed per-token int8:
        x' = x / s  (s per input channel: max|x|^alpha / max|w|^(1-alpha); w' = s * w)
        a  = max|x'| / 127 per token;  q = round(x' / a) + 128  (uint8)
        y  = MatMulInteger(q, w'_int8, zero point 128) * a * w_scale (per output channel)
    """
    model = onnx.load(f32_path)
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    added = [
        numpy_helper.from_array(np.array(1 / 127, np.float32), "pt_inv127"),
        numpy_helper.from_array(np.array(1e-8, np.float32), "pt_eps"),
        numpy_helper.from_array(np.array(128, np.float32), "pt_128f"),
        numpy_helper.from_array(np.array(128, np.uint8), "pt_zp128"),
    ]
    nodes_out, replaced = [], set()
    for k, node in enumerate(graph.node):
        if node.name not in nodes:
            nodes_out.append(node)
            continue
        p = f"pt{k}"
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        s = np.maximum(ranges[node.name], 1e-5) ** SMOOTHING_ALPHA / np.maximum(
            np.abs(w).max(axis=1), 1e-5
        ) ** (1 - SMOOTHING_ALPHA)
        w = w * s[:, None]
        w_scale = np.abs(w).max(axis=0) / 127
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        added += [
            numpy_helper.from_array(w_q, p + "_wq"),
            numpy_helper.from_array(w_scale.astype(np.float32), p + "_ws"),
            numpy_helper.from_array((1 / s).astype(np.float32), p + "_inv_s"),
        ]
        replaced.add(node.input[1])
        y = node.output[0] if node.op_type == "MatMul" else p + "_qkv"
        nodes_out += [
            helper.make_node("Mul", [node.input[0], p + "_inv_s"], [p + "_x"]),
            helper.make_node("Abs", [p + "_x"], [p + "_abs"]),
            helper.make_node("ReduceMax", [p + "_abs"], [p + "_amax"], axes=[-1], keepdims=1),
            helper.make_node("Mul", [p + "_amax", "pt_inv127"], [p + "_as0"]),
            helper.make_node("Max", [p + "_as0", "pt_eps"], [p + "_as"]),
            helper.make_node("Div", [p + "_x", p + "_as"], [p + "_xs"]),
            helper.make_node("Round", [p + "_xs"], [p + "_xr"]),
            helper.make_node("Add", [p + "_xr", "pt_128f"], [p + "_xo"]),
            helper.make_node("Cast", [p + "_xo"], [p + "_xq"], to=TensorProto.UINT8),
            helper.make_node("MatMulInteger", [p + "_xq", p + "_wq", "pt_zp128"], [p + "_y32"]),
            helper.make_node("Cast", [p + "_y32"], [p + "_yf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [p + "_yf", p + "_as"], [p + "_ya"]),
            helper.make_node("Mul", [p + "_ya", p + "_ws"], [y]),
        ]
        if node.op_type == "Attention":
            third = w.shape[1] // 3
            heads = next(a.i for a in node.attribute if a.name == "num_heads")
            added.append(numpy_helper.from_array(np.array([third] * 3, np.int64), p + "_split"))
            nodes_out += [
                helper.make_node("Split", [y, p + "_split"], [p + "_q", p + "_k", p + "_v"], axis=-1),
                helper.make_node(
                    "MultiHeadAttention",
                    [p + "_q", p + "_k", p + "_v", node.input[2], node.input[3]],
                    [node.output[0]],
                    domain="com.microsoft",
                    num_heads=heads,
                ),
            ]
    del graph.node[:]
    graph.node.extend(nodes_out)
    kept = [i for i in graph.initializer if i.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    onnx.save(model, out_path)


def quantize_int8(model_dir, f32_path, out_path):
    ranges = calibration_ranges(model_dir, f32_path, set(PER_TOKEN_INT8))
    smoothed = out_path + ".smoothed"
    per_token_int8(f32_path, smoothed, set(PER_TOKEN_INT8), ranges)
    quantize_dynamic(
        smoothed,
        out_path,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        op_types_to_quantize=["MatMul", "Attention"],
        nodes_to_quantize=PER_TENSOR_INT8,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    os.remove(smoothed)
    print(
        f"int8: {len(PER_TENSOR_INT8)} nodes per-tensor, {len(PER_TOKEN_INT8)} per-token (smoothed), rest f32",
        file=sys.stderr,
    )


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    model_dir = sys.argv[1]
    out = os.path.join(model_dir, "onnx")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    np.random.seed(0)
    f32 = os.path.join(out, "model.onnx")
    export_f32(model_dir, f32)
    quantize_int8(model_dir, f32, os.path.join(out, "model_int8.onnx"))
    with open(os.path.join(out, "RECIPE"), "w") as f:
        f.write(recipe_digest() + "\n")
    print(out)


if __name__ == "__main__":
    main()
