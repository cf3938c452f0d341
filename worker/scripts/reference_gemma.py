"""Reference logits and greedy text for Gemma-3-270M from transformers (PyTorch, f32).

transformers loads the shipped Q4_K_M GGUF with `gguf_file=` and dequantizes every
weight to f32, so the reference is the Q4_K_M weights themselves computed in full
precision. Writes worker/data/gemma-reference.json: for each prompt, the greedy
continuation and the last prompt token's logits at the 64 token ids with the largest
reference logits plus 64 fixed ids spread over the vocabulary (small enough to commit;
nothing derived from the weights beyond these numbers). Run once:

    flock /tmp/kestrel-cpu.lock .cache/venv/bin/python worker/scripts/reference_gemma.py \
        .cache/models/gemma-3-270m worker/data/gemma-reference.json
"""

import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Kubernetes is an open-source system for",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]
TOP = 64
FIXED = [int(i * 262144 / 64) + 17 for i in range(64)]
NEW_TOKENS = 16


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    gguf = "gemma-3-270m-q4_k_m.gguf"
    torch.set_num_threads(2)
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf, torch_dtype=torch.float32)
    model.eval()
    print(f"loaded in {time.time() - t0:.1f} s", file=sys.stderr)
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        top = torch.topk(logits, TOP).indices.tolist()
        index = top + [i for i in FIXED if i not in top]
        text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        cases.append({
            "prompt": prompt,
            "prompt_ids": ids[0].tolist(),
            "greedy_ids": gen[0, ids.shape[1]:].tolist(),
            "greedy_text": text,
            "logit_ids": index,
            "logits": [round(float(logits[i]), 4) for i in index],
        })
        print(repr(prompt), "->", repr(text), file=sys.stderr)
    doc = {
        "made_by": "worker/scripts/reference_gemma.py (transformers, f32, gguf_file=gemma-3-270m-q4_k_m.gguf)",
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
