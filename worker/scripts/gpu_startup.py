#!/usr/bin/env python3
"""How long a CUDA worker takes to become ready, per build and variant, on the GPU machine.

A new pod starts with an empty driver cache (CUDA_CACHE_PATH is on the pod's emptyDir),
so the driver JIT-compiles every PTX module the worker loads. "cold" reproduces that with
CUDA_CACHE_DISABLE=1 on every start; "warm" starts with a cache a previous start filled
(a restarted container). Builds are interleaved start by start, so that a slow moment of
the machine hits each alike. Each start: `serve` until /ready answers 200, then one
request of 8 sentences (the first request; its cosine to the first build's answer is
printed, so a faster start that answered differently would show).

    python3 worker/scripts/gpu_startup.py --model DIR --reps 3 --variants f16,bf16,f32 \\
        base=.cache/gpu/kestrel-worker-base.xz new=.cache/gpu/kestrel-worker.xz

A build is NAME=PATH, the path a binary or its .xz/.gz. Prints a table and writes JSON
to --out.
"""
import argparse
import gzip
import json
import lzma
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Kubernetes schedules pods onto nodes with enough free resources.",
    "A replica that is not ready receives no traffic.",
    "Quantization trades a little accuracy for speed and memory.",
    "The budget caps what the deployment may spend per hour.",
    "Latency at the 95th percentile is the target the autoscaler keeps.",
    "Embeddings map sentences to points where similar meanings lie close.",
    "An operator reconciles what is declared with what is running.",
]


def log(*args):
    print(time.strftime("[%H:%M:%S]"), *args, file=sys.stderr, flush=True)


def unpack(path, out_dir, name):
    if path.endswith(".xz") or path.endswith(".gz"):
        opener = lzma.open if path.endswith(".xz") else gzip.open
        exe = os.path.join(out_dir, name)
        with opener(path, "rb") as src, open(exe, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(exe, 0o755)
        return exe
    return os.path.abspath(path)


def model_dir(path, out_dir):
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return path
    dst = os.path.join(out_dir, "model")
    shutil.copytree(path, dst)
    with gzip.open(os.path.join(dst, "model.safetensors.gz"), "rb") as src, \
            open(os.path.join(dst, "model.safetensors"), "wb") as out:
        shutil.copyfileobj(src, out)
    os.remove(os.path.join(dst, "model.safetensors.gz"))
    return dst


def start(exe, model, variant, env, device):
    """(ready seconds, first-request seconds, embeddings) of one start."""
    cmd = [exe, "serve", "--model", model, "--device", device, "--variant", variant,
           "--host", "127.0.0.1", "--port", "0", "--drain-delay-seconds", "0"]
    began = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, RUST_LOG="info", **env))
    lines, addr, seen = [], [], threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip())
            m = re.search(r"addr=(\S+)", line)
            if m and not addr:
                addr.append(m.group(1))
                seen.set()
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not seen.wait(180) or not addr:
            raise RuntimeError("worker did not start:\n" + "\n".join(lines[-30:]))
        url = f"http://{addr[0]}"
        while True:
            if proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + "\n".join(lines[-30:]))
            try:
                with urllib.request.urlopen(url + "/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if time.time() - began > 180:
                raise RuntimeError("not ready after 180 s:\n" + "\n".join(lines[-30:]))
            time.sleep(0.05)
        ready = time.time() - began
        body = json.dumps({"input": SENTENCES, "model": "all-MiniLM-L6-v2"}).encode()
        req = urllib.request.Request(url + "/v1/embeddings", data=body,
                                     headers={"content-type": "application/json"})
        t0 = time.time()
        with urllib.request.urlopen(req, timeout=120) as r:
            doc = json.load(r)
        first = time.time() - t0
        vectors = [d["embedding"] for d in sorted(doc["data"], key=lambda d: d["index"])]
        return ready, first, vectors
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def min_cosine(a, b):
    def cos(x, y):
        dot = sum(p * q for p, q in zip(x, y))
        return dot / ((sum(p * p for p in x) ** 0.5) * (sum(q * q for q in y) ** 0.5))
    return min(cos(x, y) for x, y in zip(a, b))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--variants", default="f16,bf16,f32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cuda:0", help="cpu checks the script without a GPU")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu-startup"))
    ap.add_argument("builds", nargs="+", metavar="NAME=PATH")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="kestrel-startup-")
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work):
    builds = []
    for spec in args.builds:
        name, path = spec.split("=", 1)
        builds.append((name, unpack(path, work, "kestrel-worker-" + name)))
    model = model_dir(args.model, work)
    variants = args.variants.split(",")
    results = {b: {v: {"cold": [], "warm": [], "first_cold": [], "first_warm": [],
                       "min_cosine_to_first_build": 1.0}
                   for v in variants} for b, _ in builds}
    reference = {}
    caches = {b: os.path.join(work, "cache-" + b) for b, _ in builds}
    total = 2 * args.reps * len(variants) * len(builds)
    done = 0
    for mode in ["cold", "warm"]:
        for rep in range(args.reps):
            for v in variants:
                for b, exe in builds:
                    if mode == "cold":
                        env = {"CUDA_CACHE_DISABLE": "1"}
                    else:
                        env = {"CUDA_CACHE_PATH": caches[b]}
                        if rep == 0:
                            start(exe, model, v, env, args.device)  # fills the cache; not counted
                    ready, first, vectors = start(exe, model, v, env, args.device)
                    done += 1
                    cos = min_cosine(reference.setdefault(v, vectors), vectors)
                    results[b][v][mode].append(ready)
                    results[b][v]["first_" + mode].append(first)
                    results[b][v]["min_cosine_to_first_build"] = min(
                        results[b][v]["min_cosine_to_first_build"], cos)
                    log(f"[{done}/{total}] {mode} {b} {v}: ready {ready:.2f} s, "
                        f"first request {first * 1e3:.1f} ms, min cosine to {builds[0][0]} {cos:.6f}")
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump(results, f, indent=1)
    med = statistics.median
    print(f"\nready after start (s), median of {args.reps}; first request of 8 sentences (ms)\n")
    print("| variant | build | cold cache: ready | first request | warm cache: ready | "
          "first request | min cosine to " + builds[0][0] + " |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for v in variants:
        for b, _ in builds:
            r = results[b][v]
            print(f"| {v} | {b} | {med(r['cold']):.2f} ({min(r['cold']):.2f}–{max(r['cold']):.2f}) | "
                  f"{med(r['first_cold']) * 1e3:.1f} | {med(r['warm']):.2f} | "
                  f"{med(r['first_warm']) * 1e3:.1f} | {r['min_cosine_to_first_build']:.6f} |")
    if len(builds) == 2:
        (a, _), (b, _) = builds
        print()
        for v in variants:
            print(f"- {v}: cold ready {b} / {a} = "
                  f"{med(results[b][v]['cold']) / med(results[a][v]['cold']):.3f}")


if __name__ == "__main__":
    main()
