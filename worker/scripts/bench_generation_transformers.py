"""transformers (PyTorch CPU) generating from the same GGUF: the baseline printed beside
the worker by `kestrel-worker bench-generation --python …`.

transformers dequantizes the Q4_K_M GGUF to f32 at load. For each concurrency c it runs
batches of c prompts (left-padded, greedy, exactly --max-tokens new tokens each) for
--seconds; a logits processor timestamps every decoding step, so TTFT is generate() start
to the first step and inter-token latency the gap between steps (every sequence of a
batch sees the same). Prints one JSON object per concurrency.

    .cache/venv/bin/python worker/scripts/bench_generation_transformers.py MODEL_DIR \
        --concurrency 1,4,16 --max-tokens 32 --seconds 20 --threads 2
"""

import argparse
import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

PROMPTS = [
    "Write a short story about a kestrel hovering over a field.",
    "Explain how a Kubernetes operator reconciles a custom resource.",
    "The history of the bicycle begins in",
    "List three reasons to batch requests when serving a language model:",
]


class Clock(LogitsProcessor):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    gguf = "gemma-3-270m-q4_k_m.gguf"
    tok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=gguf)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=gguf, dtype=torch.float32)
    model.eval()
    for c in [int(x) for x in a.concurrency.split(",")]:
        ttft, itl = [], []
        tokens = requests = 0
        i = 0
        started = time.perf_counter()
        first = True
        while first or time.perf_counter() - started < a.seconds:
            batch = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(c)]
            i += c
            enc = tok(batch, return_tensors="pt", padding=True)
            clock = Clock()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(**enc, max_new_tokens=a.max_tokens, min_new_tokens=a.max_tokens,
                               do_sample=False, logits_processor=LogitsProcessorList([clock]))
            if first:  # the first batch of each level warms up; not counted
                first = False
                started = time.perf_counter()
                continue
            ttft += [clock.times[0] - t0] * c
            gaps = [b - x for x, b in zip(clock.times, clock.times[1:])]
            itl += gaps * c
            tokens += c * len(clock.times)
            requests += c
        secs = time.perf_counter() - started
        print(json.dumps({
            "concurrency": c, "requests": requests, "tokens": tokens, "seconds": secs,
            "tokens_per_second": tokens / secs,
            "ttft_p50_ms": pct(ttft, 50) * 1e3, "ttft_p95_ms": pct(ttft, 95) * 1e3,
            "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p95_ms": pct(itl, 95) * 1e3,
            "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }), flush=True)
        print(f"transformers c={c}: {tokens / secs:.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
