#!/usr/bin/env python3
"""The worker's CUDA build on a GPU beside PyTorch, in one run (worker/scripts/gpu-bench
starts it on the GPU machine; see docs/benchmarks.md, GPU section).

For each variant (f32, f16, bf16) a `kestrel-worker serve --device cuda:0` child:
  - correctness: the quality sentences through HTTP, cosine against sentence-transformers
    on the same GPU in f32 (TF32 off) and in the variant's own dtype;
  - GPU memory of the worker process (nvidia-smi), after warm-up and load;
  - HTTP: one request of N sentences at a time (`load --inputs N`), and N clients of
    one sentence each (`load --concurrency N`, the batcher forms the batches);
then `kestrel-worker profile` (the engine alone, pre-tokenized, no HTTP), and with no
worker running, the PyTorch paths on the same sentences:
  - sentence-transformers encode() in f32 (its default) and f16, tokenization included;
  - raw PyTorch: the encoder written out with F.scaled_dot_product_attention, pre-tokenized,
    padded to the batch's longest, f16 and bf16, eager and replayed as CUDA graphs (one
    graph per batch shape; torch.compile is not used: one compile per shape);
and the GPU's measured ceilings (a bf16 8192^3 matmul, a device-to-device copy).

Each throughput point is the median of --reps timed repetitions; latency is the mean
time of one batch (one request) in the median repetition. Writes results.json and
summary.md under --out and prints the summary last.
"""
import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F


# Only for checking this script on a machine without a GPU (eager paths only).
DEV = os.environ.get("GPU_BENCH_TORCH_DEVICE", "cuda")


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def sentences(path):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f if l.strip() and not l.startswith("#")]
    return lines, [l for l in lines if len(l.encode()) < 400]


def cycle(items, size, start):
    return [items[(start + k) % len(items)] for k in range(size)]


def median_reps(run_once, reps, seconds):
    """Runs `run_once(deadline)` -> (items, batches, elapsed) `reps` times; the median rep."""
    out = []
    for _ in range(reps):
        items, batches, elapsed = run_once(seconds)
        out.append({"items_per_second": items / elapsed, "latency_ms": elapsed * 1e3 / batches,
                    "batches": batches})
    out.sort(key=lambda r: r["items_per_second"])
    best = out[len(out) // 2]
    best["reps"] = [round(r["items_per_second"], 1) for r in out]
    return best


def gpu_memory_mib(pid):
    try:
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        for line in q.stdout.splitlines():
            p, m = [x.strip() for x in line.split(",")]
            if int(p) == pid:
                return float(m)
    except Exception as e:  # noqa: BLE001 - a missing reading is reported as None
        log("nvidia-smi:", e)
    return None


# ---------- the worker ----------

class Worker:
    def __init__(self, exe, model, variant, extra):
        cmd = [exe, "serve", "--model", model, "--device", "cuda:0", "--variant", variant,
               "--host", "127.0.0.1", "--port", "0", "--max-batch", "256",
               "--max-batch-tokens", "131072", "--max-queue", "8192", "--max-inputs", "4096",
               "--drain-delay-seconds", "0", *extra]
        log("start:", " ".join(cmd))
        self.started = time.time()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=dict(os.environ, RUST_LOG="info"))
        self.lines, self.addr = [], None
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line.rstrip())
                m = re.search(r"addr=(\S+)", line)
                if m and self.addr is None:
                    self.addr = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(120) or self.addr is None:
            raise RuntimeError("worker did not start:\n" + "\n".join(self.lines[-30:]))
        self.url = f"http://{self.addr}"
        for _ in range(1200):
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=5) as r:
                    if r.status == 200:
                        break
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            if self.proc.poll() is not None:
                raise RuntimeError("worker exited:\n" + "\n".join(self.lines[-30:]))
            time.sleep(0.1)
        self.ready_seconds = time.time() - self.started

    def embed(self, inputs):
        body = json.dumps({"input": inputs, "model": "all-MiniLM-L6-v2"}).encode()
        req = urllib.request.Request(self.url + "/v1/embeddings", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            doc = json.load(r)
        return np.array([d["embedding"] for d in sorted(doc["data"], key=lambda d: d["index"])],
                        dtype=np.float64)

    def metrics(self):
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def histogram(text, name):
    """(sum, count) of one of the worker's histograms."""
    get = lambda n: float(next((l.split()[-1] for l in text.splitlines()
                                if l.startswith(n + " ") or l.startswith(n + "{")), 0))
    return get(name + "_sum"), get(name + "_count")


def server_seconds(text):
    """(sum, count) of the worker's request-duration histogram (admission to result)."""
    return histogram(text, "kestrel_worker_request_duration_seconds")


def load(exe, url, concurrency, inputs, seconds, reps):
    runs = []
    for i in range(reps):
        out = subprocess.run([exe, "load", "--url", url, "--concurrency", str(concurrency),
                              "--inputs", str(inputs), "--seconds", str(seconds),
                              "--warmup-seconds", "1" if i == 0 else "0.2"],
                             capture_output=True, text=True, timeout=seconds * 4 + 60)
        if out.returncode != 0:
            raise RuntimeError(f"load failed: {out.stderr[-2000:]}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["items_per_second"])
    best = dict(runs[len(runs) // 2])
    best["reps"] = [round(r["items_per_second"], 1) for r in runs]
    best["latency_ms"] = best["seconds"] * 1e3 / max(best["requests"], 1) * concurrency
    return best


# ---------- PyTorch ----------

def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.float(), dim=-1)


def st_reference(model_dir, texts, dtype):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(model_dir, device=DEV).to(dtype)
    e = st.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    del st
    torch.cuda.empty_cache()
    return e.astype(np.float64)


def bench_st(model_dir, bench, sizes, seconds, reps, dtype):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(model_dir, device=DEV).to(dtype)
    torch.cuda.reset_peak_memory_stats()
    out = {}
    for n in sizes:
        st.encode(cycle(bench, n, 0), batch_size=n, normalize_embeddings=True)  # warm

        def run(sec):
            start, k = time.perf_counter(), 0
            while k < 3 or time.perf_counter() - start < sec:
                st.encode(cycle(bench, n, k * n), batch_size=n, normalize_embeddings=True)
                k += 1
            return n * k, k, time.perf_counter() - start

        out[n] = median_reps(run, reps, seconds)
        log(f"st {dtype} batch {n}: {out[n]['items_per_second']:.0f}/s")
    out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del st
    torch.cuda.empty_cache()
    return out


class RawBert:
    """The fastest plain PyTorch path we could write: the BERT encoder written out with
    F.linear / F.layer_norm / F.scaled_dot_product_attention (fused QKV), pre-tokenized
    batches padded to each batch's longest, pooling on the GPU; optionally each batch
    shape captured once as a CUDA graph and replayed (no launch gaps)."""

    def __init__(self, model_dir, dtype, graphs, packed=False):
        from safetensors.torch import load_file
        with open(os.path.join(model_dir, "config.json")) as f:
            c = json.load(f)
        w = {k: t.to(DEV, dtype) for k, t in load_file(os.path.join(model_dir, "model.safetensors")).items()}
        w = {k.removeprefix("bert."): t for k, t in w.items()}
        self.h, self.heads, self.eps, self.dtype = c["hidden_size"], c["num_attention_heads"], c["layer_norm_eps"], dtype
        e = "embeddings."
        self.word, self.pos = w[e + "word_embeddings.weight"], w[e + "position_embeddings.weight"]
        self.tt = w[e + "token_type_embeddings.weight"][0]
        self.eln = (w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"])
        self.layers = []
        for i in range(c["num_hidden_layers"]):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            qkv_w = torch.cat([w[a + f"self.{n}.weight"] for n in ("query", "key", "value")])
            qkv_b = torch.cat([w[a + f"self.{n}.bias"] for n in ("query", "key", "value")])
            self.layers.append((qkv_w, qkv_b, w[a + "output.dense.weight"], w[a + "output.dense.bias"],
                                w[a + "output.LayerNorm.weight"], w[a + "output.LayerNorm.bias"],
                                w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"],
                                w[p + "output.dense.weight"], w[p + "output.dense.bias"],
                                w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]))
        self.graphs, self.packed, self.cache = graphs, packed, {}

    def eager(self, ids, mask):
        b, l = ids.shape
        h, H = self.h, self.heads
        x = self.word[ids] + self.pos[:l] + self.tt
        x = F.layer_norm(x, (h,), *self.eln, self.eps)
        add = ((mask[:, None, None, :].to(self.dtype) - 1) * 10000.0)
        for (qw, qb, ow, ob, lw1, lb1, iw, ib, o2w, o2b, lw2, lb2) in self.layers:
            q, k, v = F.linear(x, qw, qb).view(b, l, 3, H, h // H).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=add).transpose(1, 2).reshape(b, l, h)
            x = F.layer_norm(F.linear(ctx, ow, ob) + x, (h,), lw1, lb1, self.eps)
            x = F.layer_norm(F.linear(F.gelu(F.linear(x, iw, ib)), o2w, o2b) + x, (h,), lw2, lb2, self.eps)
        return mean_pool(x, mask)

    def eager_packed(self, ids, mask, flat, row, lens):
        b, l = ids.shape
        h, H = self.h, self.heads
        x = (self.word[ids] + self.pos[:l] + self.tt).view(b * l, h)[flat]
        x = F.layer_norm(x, (h,), *self.eln, self.eps)
        add = ((mask[:, None, None, :].to(self.dtype) - 1) * 10000.0)
        for (qw, qb, ow, ob, lw1, lb1, iw, ib, o2w, o2b, lw2, lb2) in self.layers:
            qkv = x.new_zeros(b * l, 3 * h).index_copy_(0, flat, F.linear(x, qw, qb))
            q, k, v = qkv.view(b, l, 3, H, h // H).permute(2, 0, 3, 1, 4)
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=add).transpose(1, 2).reshape(b * l, h)[flat]
            x = F.layer_norm(F.linear(ctx, ow, ob) + x, (h,), lw1, lb1, self.eps)
            x = F.layer_norm(F.linear(F.gelu(F.linear(x, iw, ib)), o2w, o2b) + x, (h,), lw2, lb2, self.eps)
        pooled = torch.zeros(b, h, device=x.device).index_add_(0, row, x.float()) / lens[:, None]
        return F.normalize(pooled, dim=-1)

    def inputs(self, ids_cpu, mask_cpu):
        if not self.packed:
            return (ids_cpu, mask_cpu)
        flat = mask_cpu.view(-1).nonzero().squeeze(1)
        row = torch.div(flat, ids_cpu.shape[1], rounding_mode="floor")
        lens = mask_cpu.sum(1).float()
        return (ids_cpu, mask_cpu, flat, row, lens)

    @torch.inference_mode()
    def __call__(self, ids_cpu, mask_cpu):
        fn = self.eager_packed if self.packed else self.eager
        host = self.inputs(ids_cpu, mask_cpu)
        if not self.graphs:
            return fn(*(t.to(DEV, non_blocking=True) for t in host)).cpu()
        key = tuple(tuple(t.shape) for t in host)
        if key not in self.cache:
            static = [t.cuda() for t in host]
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn(*static)
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                sout = fn(*static)
            self.cache[key] = (g, static, sout)
        g, static, sout = self.cache[key]
        for dst, src in zip(static, host):
            dst.copy_(src, non_blocking=True)
        g.replay()
        return sout.cpu()


def pretokenize(model_dir, bench, n):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    tok.enable_truncation(256)
    tok.enable_padding(pad_id=0)
    batches = []
    # The bench set cycled in order: the distinct batches of size n repeat every len/gcd.
    count = len(bench) // math.gcd(len(bench), n) if n < len(bench) else 1
    for k in range(count):
        enc = tok.encode_batch(cycle(bench, n, k * n))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        if DEV == "cuda":
            ids, mask = ids.pin_memory(), mask.pin_memory()
        batches.append((ids, mask))
    return batches


def bench_raw(model_dir, bench, sizes, seconds, reps, dtype, graphs, ref, packed=False):
    raw = RawBert(model_dir, dtype, graphs, packed)
    torch.cuda.reset_peak_memory_stats()
    out = {}
    # Correctness first: the same function as sentence-transformers f32.
    got = torch.cat([raw(*b) for b in pretokenize(model_dir, bench, len(bench))]).double().numpy()
    out["min_cosine_vs_torch_f32"] = float(min((got * ref).sum(1)))
    log(f"raw {dtype} graphs={graphs}: min cosine vs torch f32 {out['min_cosine_vs_torch_f32']:.6f}")
    for n in sizes:
        batches = pretokenize(model_dir, bench, n)
        for ids, mask in batches:  # warm every shape (and capture its graph)
            raw(ids, mask)

        def run(sec):
            start, k = time.perf_counter(), 0
            while k < 3 or time.perf_counter() - start < sec:
                raw(*batches[k % len(batches)])
                k += 1
            return n * k, k, time.perf_counter() - start

        out[n] = median_reps(run, reps, seconds)
        log(f"raw {dtype} graphs={graphs} batch {n}: {out[n]['items_per_second']:.0f}/s")
    out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    del raw
    torch.cuda.empty_cache()
    return out


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    ev[0].record()
    for _ in range(10):
        a @ b
    ev[1].record()
    torch.cuda.synchronize()
    tflops = 2 * 8192**3 * 10 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12
    x = torch.randn(2**30 // 2, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    ev[0].record()
    for _ in range(10):
        y.copy_(x)
    ev[1].record()
    torch.cuda.synchronize()
    tbps = 2 * x.numel() * 2 * 10 / (ev[0].elapsed_time(ev[1]) / 1e3) / 1e12
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"bf16_matmul_tflops": tflops, "d2d_copy_tb_per_s": tbps}


# ---------- main ----------

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--worker", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--sentences", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="f32,f16,bf16")
    p.add_argument("--sizes", default="1,8,32,256")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--profile-seconds", type=float, default=3.0,
                   help="seconds per point of `kestrel-worker profile` (a mean over the time)")
    p.add_argument("--skip", default="", help="comma list of: st, raw, graphs, packed, profile, http")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")
    quality, bench = sentences(args.sentences)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "sizes": sizes, "seconds": args.seconds, "reps": args.reps, "variants": {}}
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(256)
    res["bench_tokens_mean"] = statistics.mean(len(tok.encode(s).ids) for s in bench)
    res["bench_tokens_max"] = max(len(tok.encode(s).ids) for s in bench)
    res["bench_sentences"] = len(bench)
    log("ceilings")
    res["ceilings"] = ceilings()
    log(res["ceilings"])

    log("PyTorch references (sentence-transformers on cuda, f32 without TF32, f16, bf16)")
    refs = {"f32": st_reference(args.model, quality, torch.float32),
            "f16": st_reference(args.model, quality, torch.float16),
            "bf16": st_reference(args.model, quality, torch.bfloat16)}
    res["reference_self_check"] = {
        d: float(min((refs[d] * refs["f32"]).sum(1))) for d in ("f16", "bf16")}

    for v in variants:
        r = res["variants"].setdefault(v, {})
        w = Worker(args.worker, args.model, v, [])
        try:
            r["ready_seconds"] = w.ready_seconds
            got = np.concatenate([w.embed(quality[i:i + 16]) for i in range(0, len(quality), 16)])
            one = np.concatenate([w.embed([s]) for s in quality])
            for name, emb in (("batched", got), ("single", one)):
                emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
                r[f"min_cosine_vs_torch_f32_{name}"] = float(min((emb * refs["f32"]).sum(1)))
                r[f"min_cosine_vs_torch_same_dtype_{name}"] = float(min((emb * refs[v]).sum(1)))
            log(v, {k: round(x, 6) for k, x in r.items() if "cosine" in k})
            info = [l for l in w.metrics().splitlines() if l.startswith("kestrel_worker_model_info")]
            r["model_info"] = info
            if "http" not in skip:
                r["http_one_request"] = {}
                r["http_clients"] = {}
                for n in sizes:
                    before = server_seconds(w.metrics())
                    r["http_one_request"][n] = load(args.worker, w.url, 1, n, args.seconds, args.reps)
                    after = server_seconds(w.metrics())
                    # Mean time from admission (tokenized) to embeddings back, per request.
                    r["http_one_request"][n]["server_admitted_to_done_ms"] = (
                        (after[0] - before[0]) / max(after[1] - before[1], 1) * 1e3)
                    log(f"{v} http 1 request x {n}: {r['http_one_request'][n]['items_per_second']:.0f}/s "
                        f"{r['http_one_request'][n]['p50_ms']:.2f} ms")
                for n in sizes:
                    before = histogram(w.metrics(), "kestrel_worker_batch_size")
                    r["http_clients"][n] = load(args.worker, w.url, n, 1, args.seconds, args.reps)
                    after = histogram(w.metrics(), "kestrel_worker_batch_size")
                    r["http_clients"][n]["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    log(f"{v} http {n} clients x 1: {r['http_clients'][n]['items_per_second']:.0f}/s "
                        f"p50 {r['http_clients'][n]['p50_ms']:.2f} ms, mean batch {r['http_clients'][n]['mean_batch']:.1f}")
                r["http_two_requests_256"] = load(args.worker, w.url, 2, 256, args.seconds, args.reps)
            r["gpu_memory_mib"] = gpu_memory_mib(w.proc.pid)
            log(v, "gpu memory MiB", r["gpu_memory_mib"])
        finally:
            r["exit"] = w.stop()
            r["log_tail"] = w.lines[-5:]
        if "profile" not in skip:
            out = subprocess.run([args.worker, "profile", "--model", args.model, "--device", "cuda:0",
                                  "--variants", v, "--batch-sizes", args.sizes,
                                  "--concurrency", "1,256", "--max-batch", "256",
                                  "--seconds-per-point", str(args.profile_seconds), "--json"],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                r["profile_error"] = out.stderr[-3000:]
                log("profile failed:", out.stderr[-2000:])
            else:
                r["profile"] = json.loads(out.stdout)["variants"][0]
                log(v, "engine", [(b["batch_size"], round(b["items_per_second"])) for b in r["profile"]["batches"]])

    res["baselines"] = {}
    bench_ref = refs["f32"][[quality.index(s) for s in bench]]
    if "st" not in skip:
        res["baselines"]["sentence-transformers f32"] = bench_st(args.model, bench, sizes, args.seconds, args.reps, torch.float32)
        res["baselines"]["sentence-transformers f16"] = bench_st(args.model, bench, sizes, args.seconds, args.reps, torch.float16)
    if "raw" not in skip:
        for dtype, name in ((torch.float16, "f16"), (torch.bfloat16, "bf16")):
            res["baselines"][f"raw PyTorch {name} SDPA"] = bench_raw(args.model, bench, sizes, args.seconds, args.reps, dtype, False, bench_ref)
            if "graphs" not in skip:
                res["baselines"][f"raw PyTorch {name} SDPA + CUDA graphs"] = bench_raw(args.model, bench, sizes, args.seconds, args.reps, dtype, True, bench_ref)
            if "packed" not in skip:
                res["baselines"][f"raw PyTorch {name} packed, SDPA"] = bench_raw(args.model, bench, sizes, args.seconds, args.reps, dtype, False, bench_ref, True)
                if "graphs" not in skip:
                    res["baselines"][f"raw PyTorch {name} packed, SDPA + CUDA graphs"] = bench_raw(args.model, bench, sizes, args.seconds, args.reps, dtype, True, bench_ref, True)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    summary = render(res, sizes)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)


def render(res, sizes):
    L = [f"device: {res['device']}; torch {res['torch']}; ceilings: bf16 matmul "
         f"{res['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s, copy {res['ceilings']['d2d_copy_tb_per_s']:.2f} TB/s; "
         f"bench set {res['bench_sentences']} sentences, {res['bench_tokens_mean']:.1f} tokens mean, "
         f"{res['bench_tokens_max']} max; median of {res['reps']} x {res['seconds']} s", ""]
    L.append("| variant | min cos vs torch f32 (batched/single) | vs torch same dtype | GPU MiB | ready s |")
    L.append("|---|---|---|---:|---:|")
    for v, r in res["variants"].items():
        L.append(f"| {v} | {r.get('min_cosine_vs_torch_f32_batched', 0):.6f} / {r.get('min_cosine_vs_torch_f32_single', 0):.6f} "
                 f"| {r.get('min_cosine_vs_torch_same_dtype_batched', 0):.6f} / {r.get('min_cosine_vs_torch_same_dtype_single', 0):.6f} "
                 f"| {r.get('gpu_memory_mib')} | {r.get('ready_seconds', 0):.1f} |")
    L += ["", "sentences/s (latency ms of one batch) by batch size:", "",
          "| path | " + " | ".join(str(n) for n in sizes) + " |", "|---|" + "---:|" * len(sizes)]

    def row(name, points, lat="latency_ms"):
        cells = []
        for n in sizes:
            p = points.get(n) or points.get(str(n))
            cells.append(f"{p['items_per_second']:.0f} ({p[lat]:.2f})" if p else "-")
        L.append(f"| {name} | " + " | ".join(cells) + " |")

    for v, r in res["variants"].items():
        if "http_one_request" in r:
            row(f"worker HTTP {v}, 1 request of N", r["http_one_request"], "p50_ms")
            L.append(f"| … of which admission to result, ms (server side) | " + " | ".join(
                f"{r['http_one_request'][n]['server_admitted_to_done_ms']:.2f}" for n in sizes) + " |")
            row(f"worker HTTP {v}, N clients of 1 (p50)", r["http_clients"], "p50_ms")
            if all("mean_batch" in r["http_clients"][n] for n in sizes):
                L.append(f"| … mean batch formed | " + " | ".join(
                    f"{r['http_clients'][n]['mean_batch']:.1f}" for n in sizes) + " |")
        if "profile" in r:
            row(f"worker engine alone {v}", {b["batch_size"]: b for b in r["profile"]["batches"]})
    for name, b in res["baselines"].items():
        row(name, b)
    L.append("")
    for v, r in res["variants"].items():
        if "http_two_requests_256" in r:
            h = r["http_two_requests_256"]
            L.append(f"- worker HTTP {v}, 2 clients x 256: {h['items_per_second']:.0f}/s, p50 {h['p50_ms']:.1f} ms")
    for name, b in res["baselines"].items():
        cos = f", min cosine vs torch f32 {b['min_cosine_vs_torch_f32']:.6f}" if "min_cosine_vs_torch_f32" in b else ""
        L.append(f"- {name}: peak allocated {b['max_memory_allocated_mib']:.0f} MiB{cos}")
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    main()
