# Where does bf16 (or f16) lose accuracy? The CUDA worker's rounding points
# (worker/kernels/bert.cu) emulated in torch, on the CPU or on a GPU, against an f32
# forward: min and mean cosine over the quality sentences, for the worker's scheme and
# variations of it, with matrix products done (a) exactly in f32 on rounded inputs and
# (b) as real bf16/f16 GEMMs (on a GPU: cuBLAS, with reduced-precision reductions allowed
# and disallowed), and raw PyTorch in bf16/f16 beside them.
#   .cache/venv/bin/python worker/scripts/precision_emulation.py MODEL_DIR worker/data/sentences.txt
# MODEL_DIR holds tokenizer.json and model.safetensors (or the .gz that pack_gpu_model.py makes).
import sys, gzip, math, os, torch, torch.nn.functional as F
from safetensors.torch import load
from tokenizers import Tokenizer
model, sent = sys.argv[1], sys.argv[2]
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
path = f"{model}/model.safetensors"
raw = open(path, "rb").read() if os.path.exists(path) else gzip.decompress(open(path + ".gz", "rb").read())
W = {k: v.float().to(dev) for k, v in load(raw).items()}
pre = "" if "embeddings.word_embeddings.weight" in W else "bert."
w = lambda n: W[pre + n]
tok = Tokenizer.from_file(f"{model}/tokenizer.json")
lines = [l.rstrip("\n") for l in open(sent) if l.strip() and not l.startswith("#")]
token_ids = [torch.tensor(tok.encode(s).ids[:256], device=dev) for s in lines]
def run(ids, o, dt=torch.bfloat16):
    rd = lambda x: x.to(dt).float()
    gemm_mode = o.get("gemm", "f32")  # f32: exact products of rounded inputs; real: dt GEMM
    def mm(a, b):  # a [n,k] already rounded when weights=1, b = weight [out,in]
        if gemm_mode == "real":
            return (a.to(dt) @ b.to(dt).T).float()
        return a @ b.T
    P = rd if o.get("params") else (lambda x: x)
    MI = rd if o.get("weights") else (lambda x: x)
    MO = rd if o.get("mm_out") else (lambda x: x)
    H = rd if o.get("hidden_store") else (lambda x: x)
    n = len(ids)
    x = w("embeddings.word_embeddings.weight")[ids]
    p = w("embeddings.position_embeddings.weight")[:n] + w("embeddings.token_type_embeddings.weight")[0]
    if o.get("emb"): x, p = rd(x), rd(p)
    ln = lambda v, g, b: F.layer_norm(v, (384,), P(w(g)), P(w(b)), 1e-12)
    h = H(ln(x + p, "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"))
    for L in range(6):
        q = f"encoder.layer.{L}."
        Wq = torch.cat([w(q+f"attention.self.{t}.weight") for t in ("query", "key", "value")])
        bq = torch.cat([w(q+f"attention.self.{t}.bias") for t in ("query", "key", "value")])
        qkv = MO(mm(MI(h), MI(Wq))) + P(bq)
        Q, K, V = [t.view(n, 12, 32).transpose(0, 1) for t in qkv.split(384, 1)]
        a = (torch.softmax(Q @ K.transpose(1, 2) / math.sqrt(32), -1) @ V).transpose(0, 1).reshape(n, 384)
        if o.get("attn_out"): a = rd(a)
        y = MO(mm(MI(a), MI(w(q+"attention.output.dense.weight"))))
        h = H(ln(y + P(w(q+"attention.output.dense.bias")) + h, q+"attention.output.LayerNorm.weight", q+"attention.output.LayerNorm.bias"))
        u = F.gelu(MO(mm(MI(h), MI(w(q+"intermediate.dense.weight")))) + P(w(q+"intermediate.dense.bias")))
        if o.get("gelu_out"): u = rd(u)
        y = MO(mm(MI(u), MI(w(q+"output.dense.weight"))))
        h = H(ln(y + P(w(q+"output.dense.bias")) + h, q+"output.LayerNorm.weight", q+"output.LayerNorm.bias"))
    e = h.mean(0); return e / e.norm()
W_BY_DTYPE = {}
def rawtorch(ids, dt):
    if dt not in W_BY_DTYPE:
        W_BY_DTYPE[dt] = {k: v.to(dt) for k, v in W.items()}
    Wd = W_BY_DTYPE[dt]; wd = lambda n: Wd[pre + n]
    n = len(ids)
    x = wd("embeddings.word_embeddings.weight")[ids] + wd("embeddings.position_embeddings.weight")[:n] + wd("embeddings.token_type_embeddings.weight")[0]
    h = F.layer_norm(x, (384,), wd("embeddings.LayerNorm.weight"), wd("embeddings.LayerNorm.bias"), 1e-12)
    for L in range(6):
        q = f"encoder.layer.{L}."
        lin = lambda t, nm: F.linear(t, wd(q+nm+".weight"), wd(q+nm+".bias"))
        Q, K, V = [lin(h, "attention.self."+p).view(n, 12, 32).transpose(0, 1) for p in ("query", "key", "value")]
        a = F.scaled_dot_product_attention(Q[None], K[None], V[None])[0].transpose(0, 1).reshape(n, 384)
        h = F.layer_norm(lin(a, "attention.output.dense") + h, (384,), wd(q+"attention.output.LayerNorm.weight"), wd(q+"attention.output.LayerNorm.bias"), 1e-12)
        u = F.gelu(lin(h, "intermediate.dense"))
        h = F.layer_norm(lin(u, "output.dense") + h, (384,), wd(q+"output.LayerNorm.weight"), wd(q+"output.LayerNorm.bias"), 1e-12)
    e = h.float().mean(0); return e / e.norm()
with torch.no_grad():
    ref = torch.stack([run(ids, {}) for ids in token_ids])
    # The worker at 8a7795c: weights, biases, layer norms and every activation stored in dt.
    old = dict(emb=1, params=1, weights=1, hidden_store=1, mm_out=1, attn_out=1, gelu_out=1)
    new = {**old, "params": 0, "gemm": "real"}  # 6f3ee6f: biases and layer norms f32
    cases = [("8a7795c, exact products", old, torch.bfloat16),
             ("8a7795c, real GEMM", {**old, "gemm": "real"}, torch.bfloat16),
             ("6f3ee6f (params f32), real GEMM", new, torch.bfloat16),
             ("6f3ee6f + residual f32, real GEMM", {**new, "hidden_store": 0}, torch.bfloat16),
             ("6f3ee6f + residual + emb f32, real GEMM", {**new, "hidden_store": 0, "emb": 0}, torch.bfloat16),
             ("8a7795c in f16, real GEMM", {**old, "gemm": "real"}, torch.float16)]
    # cuBLAS's reduced-precision reductions exist only on a GPU: one pass on a CPU.
    for rrr in (True, False) if dev == "cuda" else (True,):
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = rrr
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = rrr
        print(f"--- {dev}" + (f", reduced-precision reduction allowed: {rrr}" if dev == "cuda" else ""))
        for name, o, dt in cases:
            if rrr is False and o.get("gemm") != "real": continue
            c = (torch.stack([run(ids, o, dt) for ids in token_ids]) * ref).sum(1)
            print(f"{name:45s} min {c.min().item():.6f} mean {c.mean().item():.6f} worst #{c.argmin().item()}", flush=True)
        for dt in (torch.bfloat16, torch.float16):
            c = (torch.stack([rawtorch(ids, dt) for ids in token_ids]) * ref).sum(1)
            print(f"{'raw torch ' + str(dt):45s} min {c.min().item():.6f} mean {c.mean().item():.6f} worst #{c.argmin().item()}", flush=True)
