#!/usr/bin/env python3
"""Produce the worker's ONNX variants from the model folder's safetensors.

    .cache/venv/bin/python worker/scripts/export_onnx.py MODEL_DIR

writes MODEL_DIR/onnx/model.onnx (f32) and MODEL_DIR/onnx/model_int8.onnx (int8),
each taking input_ids and attention_mask ([batch, seq], int64) and returning
sentence_embedding ([batch, 384], mean-pooled and L2-normalized). Steps, all
deterministic (no data-dependent calibration):

1. torch.onnx.export (TorchScript exporter, opset 17) of BertModel + mean pooling +
   normalization, with dynamic batch and sequence axes;
2. ONNX Runtime's transformer optimizer (model_type=bert): fused attention, skip
   layer-norm, bias-GELU, embedding layer-norm;
3. int8: dynamic quantization of the encoder's MatMul weights, per output channel
   (symmetric int8 weights, uint8 activations quantized per batch at run time).

Needs: torch, transformers, onnx, onnxruntime (see scripts/python-requirements.txt).
"""
import os
import sys
import warnings

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import BertModel

warnings.filterwarnings("ignore")


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


def quantize_int8(f32_path, out_path):
    model = onnx.load(f32_path)
    # Keep the embedding tables and pooling in f32: only the encoder's MatMuls are int8.
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    quantize_dynamic(
        f32_path,
        out_path,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        op_types_to_quantize=["MatMul", "Attention"],
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    print(f"int8: quantized up to {len(nodes)} MatMul nodes", file=sys.stderr)


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
    quantize_int8(f32, os.path.join(out, "model_int8.onnx"))
    print(out)


if __name__ == "__main__":
    main()
