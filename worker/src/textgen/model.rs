//! Gemma 3 (text) on candle's quantized CPU kernels, with one KV cache per sequence
//! and a decode step that runs many sequences' next tokens as one batch.
//!
//! Our own module rather than candle-transformers 0.11.1's `quantized_gemma3`, which
//! (measured) uses SiLU where Gemma 3 uses GELU (tanh), builds a 128K-position RoPE
//! table per layer (7 s load, 3.7 GB RSS), applies the sliding window only to the
//! prompt pass, and holds one KV cache per model (so one sequence at a time).
//! Here: GELU(tanh); two RoPE tables shared by all layers (local base 10k, global base
//! from `gemma3.rope.freq_base`), as long as the served context; the sliding window
//! holds in every pass; caches belong to [`Sequence`]s.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, gguf_file};
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};

use crate::q8::Q8Matrix;

/// RoPE base of the sliding-window (local) layers when the GGUF does not name one.
const LOCAL_ROPE_BASE: f32 = 10_000.0;
/// Every sixth layer attends globally (Gemma 3's pattern; not stored in the GGUF).
const SLIDING_WINDOW_PATTERN: usize = 6;

/// The hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct GemmaConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_eps: f64,
    pub sliding_window: usize,
    pub rope_global_base: f32,
    pub rope_local_base: f32,
    /// The model's own context length (`gemma3.context_length`).
    pub context_length: usize,
}

impl GemmaConfig {
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let get = |k: &str| {
            ct.metadata
                .get(&format!("gemma3.{k}"))
                .ok_or_else(|| candle_core::Error::Msg(format!("gemma3.{k} missing from the GGUF")))
        };
        let u = |k: &str| -> Result<usize> { Ok(get(k)?.to_u32()? as usize) };
        let vocab_size = match ct.metadata.get("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec()?.len(),
            None => ct
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .unwrap_or(0),
        };
        Ok(GemmaConfig {
            vocab_size,
            hidden: u("embedding_length")?,
            layers: u("block_count")?,
            heads: u("attention.head_count")?,
            kv_heads: u("attention.head_count_kv")?,
            head_dim: u("attention.key_length")?,
            rms_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            sliding_window: u("attention.sliding_window")?,
            rope_global_base: get("rope.freq_base")?.to_f32()?,
            rope_local_base: get("rope.local_freq_base")
                .and_then(|v| v.to_f32())
                .unwrap_or(LOCAL_ROPE_BASE),
            context_length: u("context_length")?,
        })
    }

    fn is_sliding(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(SLIDING_WINDOW_PATTERN)
    }
}

/// cos/sin tables of one RoPE base, for positions 0..max_positions.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(head_dim: usize, base: f32, max_positions: usize, device: &Device) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        let inv = Tensor::from_vec(inv, (1, head_dim / 2), device)?;
        let pos = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = pos.matmul(&inv)?;
        Ok(Rope {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// `x`: (b, heads, t, d), positions start..start+t for every row.
    fn apply_range(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let t = x.dim(2)?;
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }

    /// `x`: (b, heads, 1, d), row i at position `positions[i]`.
    fn apply_rows(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let b = x.dim(0)?;
        let cos = self.cos.index_select(positions, 0)?.reshape((b, 1, ()))?;
        let sin = self.sin.index_select(positions, 0)?.reshape((b, 1, ()))?;
        candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
    }
}

/// One weight matrix and the kernel that multiplies by it.
///
/// Candle's AVX512-VNNI kernels (repacked Q8_0/Q4_K/Q6_K tiles) need the inner
/// dimension to be a multiple of 256; Gemma-3-270M's is 640, so every matrix reading
/// the residual stream falls back to the generic kernel, which barely gains from a
/// batch (16 rows cost 6.4x one). `padded` pads a Q8_0 matrix with zero blocks to 768
/// (20 % more arithmetic) and its input with zeros to match. Only the output projection
/// (62 % of a token's arithmetic) takes it: the fast kernel quantizes activations per
/// 256 values instead of per 32, and inside the layers, where Gemma's residual stream
/// has outlier channels, that cost q8_0 its logits cosine (0.99968 → 0.99663, measured).
/// The layers' Q8_0 matrices run on the worker's own kernel instead ([`Q8Matrix`]:
/// per-32 scales, as candle's generic kernel, and a tile of rows per pass).
enum Proj {
    Candle { mm: QMatMul, pad: usize },
    Q8(Q8Matrix),
}

/// Quantized inner-dimension multiple of candle's fast CPU kernels.
const FAST_K: usize = 256;

/// `KESTREL_Q8_KERNEL=candle` keeps candle's kernel for the layers' Q8_0 matrices
/// (for side-by-side benchmarks); by default the worker's own runs where the CPU has it.
pub const Q8_KERNEL_ENV: &str = "KESTREL_Q8_KERNEL";

fn own_q8_kernel() -> bool {
    Q8Matrix::supported() && std::env::var(Q8_KERNEL_ENV).as_deref() != Ok("candle")
}

impl Proj {
    /// The worker's kernel for a Q8_0 matrix, where the CPU runs it and the shape suits.
    fn own(t: &QTensor) -> Result<Option<Self>> {
        if t.dtype() != GgmlDType::Q8_0 || !own_q8_kernel() {
            return Ok(None);
        }
        let (n, k) = t.shape().dims2()?;
        Ok(Q8Matrix::from_q8_0(&t.data()?, n, k).map(Proj::Q8))
    }

    fn plain(t: Arc<QTensor>) -> Result<Self> {
        if let Some(own) = Self::own(&t)? {
            return Ok(own);
        }
        Ok(Proj::Candle {
            mm: QMatMul::from_arc(t)?,
            pad: 0,
        })
    }

    fn padded(t: Arc<QTensor>) -> Result<Self> {
        let (n, k) = t.shape().dims2()?;
        if t.dtype() != GgmlDType::Q8_0 || k.is_multiple_of(FAST_K) {
            return Self::plain(t);
        }
        if let Some(own) = Self::own(&t)? {
            return Ok(own);
        }
        let kp = k.div_ceil(FAST_K) * FAST_K;
        let (block, bytes) = (GgmlDType::Q8_0.block_size(), GgmlDType::Q8_0.type_size());
        let (row, row_p) = (k / block * bytes, kp / block * bytes);
        let data = t.data()?;
        // A zero block (scale 0, quants 0) contributes nothing.
        let mut out = vec![0u8; n * row_p];
        for r in 0..n {
            out[r * row_p..r * row_p + row].copy_from_slice(&data[r * row..(r + 1) * row]);
        }
        let storage =
            QStorage::from_data(std::borrow::Cow::Owned(out), &Device::Cpu, GgmlDType::Q8_0)?;
        Ok(Proj::Candle {
            mm: QMatMul::from_qtensor(QTensor::new(storage, (n, kp))?)?,
            pad: kp - k,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Candle { mm, pad: 0 } => mm.forward(x),
            Proj::Candle { mm, pad } => {
                mm.forward(&x.pad_with_zeros(candle_core::D::Minus1, 0, *pad)?)
            }
            Proj::Q8(w) => {
                let mut dims = x.dims().to_vec();
                let k = dims.pop().unwrap_or(0);
                if k != w.k() {
                    candle_core::bail!("input has {k} columns, the matrix {}", w.k());
                }
                let m = x.elem_count() / k;
                let input = x.flatten_all()?.to_vec1::<f32>()?;
                let mut out = vec![0f32; m * w.n()];
                w.matmul(&input, m, &mut out);
                dims.push(w.n());
                Tensor::from_vec(out, dims, x.device())
            }
        }
    }
}

/// GELU (tanh approximation, as Gemma) through the worker's vectorized version.
fn gelu(x: &Tensor) -> Result<Tensor> {
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    crate::gelu::gelu_tanh(&mut values);
    Tensor::from_vec(values, x.dims(), x.device())
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(
        ct: &gguf_file::Content,
        r: &mut std::fs::File,
        name: &str,
        eps: f64,
        d: &Device,
    ) -> Result<Self> {
        // llama.cpp's converter already folded Gemma's (1 + w) into the stored weight.
        let weight = ct.tensor(r, name, d)?.dequantize(d)?;
        Ok(RmsNorm {
            weight,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
    }
}

struct Layer {
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    attn_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    post_ffn_norm: RmsNorm,
    gate: Proj,
    up: Proj,
    down: Proj,
    sliding: bool,
}

impl Layer {
    /// The attention inputs of `b` rows of `t` positions (`x` is (b, t, hidden)):
    /// q (b, heads, t, d) and k (b, kv, t, d) after their norms, before RoPE, and
    /// v (b, t, kv, d), the cache's layout.
    fn qkv(&self, c: &GemmaConfig, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let h = self.attn_norm.forward(x)?;
        let q = self.q.forward(&h)?.reshape((b, t, c.heads, c.head_dim))?;
        let k = self
            .k
            .forward(&h)?
            .reshape((b, t, c.kv_heads, c.head_dim))?;
        let v = self
            .v
            .forward(&h)?
            .reshape((b, t, c.kv_heads, c.head_dim))?;
        let q = self.q_norm.forward(&q.transpose(1, 2)?)?;
        let k = self.k_norm.forward(&k.transpose(1, 2)?)?;
        Ok((q, k, v))
    }

    /// The rest of the layer after attention: the output projection and the MLP, each
    /// normed and added to the residual stream `x`.
    fn finish(&self, x: Tensor, attention: &Tensor) -> Result<Tensor> {
        let x = (x + self.post_attn_norm.forward(&self.o.forward(attention)?)?)?;
        let m = self
            .post_ffn_norm
            .forward(&self.mlp(&self.ffn_norm.forward(&x)?)?)?;
        x + m
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let gate = gelu(&self.gate.forward(x)?)?;
        let up = self.up.forward(x)?;
        self.down.forward(&(gate * up)?)
    }
}

/// One sequence's state: its keys and values per layer (plain vectors, position-major:
/// `[position][kv head][head dim]`, so a token appends one row) and how many positions
/// it holds. Decode attention reads them directly, without a tensor op per sequence.
pub struct Sequence {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    len: usize,
}

impl Sequence {
    /// Positions held (prompt and generated tokens fed so far).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A loaded Gemma 3 model. It holds no per-sequence state.
pub struct Gemma3 {
    config: GemmaConfig,
    embed: QMatMul,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Proj,
    rope_local: Rope,
    rope_global: Rope,
    max_positions: usize,
    device: Device,
    /// Storage of the weights as loaded (what the variant costs in memory).
    pub weight_bytes: usize,
    /// Tensor types of the weight matrices, by count (e.g. "q5_0": 81).
    pub dtypes: Vec<(String, usize)>,
}

impl Gemma3 {
    /// Loads a Gemma 3 GGUF. `max_positions` bounds the RoPE tables (the served context).
    pub fn load(path: &std::path::Path, max_positions: usize) -> Result<Self> {
        let device = Device::Cpu;
        let mut file = std::fs::File::open(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
        let config = GemmaConfig::from_gguf(&ct)?;
        let max_positions = max_positions.min(config.context_length).max(1);
        let eps = config.rms_eps;
        let mut weight_bytes = 0usize;
        let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
        let mut q = |name: &str, file: &mut std::fs::File| -> Result<Arc<QTensor>> {
            let t = ct.tensor(file, name, &device)?;
            weight_bytes += t.storage_size_in_bytes();
            *dtypes
                .entry(format!("{:?}", t.dtype()).to_lowercase())
                .or_default() += 1;
            Ok(Arc::new(t))
        };
        let embed = q("token_embd.weight", &mut file)?;
        let lm_head = match ct.tensor_infos.contains_key("output.weight") {
            true => Proj::padded(q("output.weight", &mut file)?)?,
            false => Proj::padded(embed.clone())?, // tied
        };
        let embed = QMatMul::from_arc(embed)?;
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("blk.{i}");
            let mut mm = |n: &str| -> Result<Proj> {
                Proj::plain(q(&format!("{p}.{n}.weight"), &mut file)?)
            };
            let (wq, wk, wv, wo) = (
                mm("attn_q")?,
                mm("attn_k")?,
                mm("attn_v")?,
                mm("attn_output")?,
            );
            let (gate, up, down) = (mm("ffn_gate")?, mm("ffn_up")?, mm("ffn_down")?);
            let mut norm =
                |n: &str| RmsNorm::load(&ct, &mut file, &format!("{p}.{n}.weight"), eps, &device);
            layers.push(Layer {
                q: wq,
                k: wk,
                v: wv,
                o: wo,
                q_norm: norm("attn_q_norm")?,
                k_norm: norm("attn_k_norm")?,
                attn_norm: norm("attn_norm")?,
                post_attn_norm: norm("post_attention_norm")?,
                ffn_norm: norm("ffn_norm")?,
                post_ffn_norm: norm("post_ffw_norm")?,
                gate,
                up,
                down,
                sliding: config.is_sliding(i),
            });
        }
        let norm = RmsNorm::load(&ct, &mut file, "output_norm.weight", eps, &device)?;
        let rope_local = Rope::new(
            config.head_dim,
            config.rope_local_base,
            max_positions,
            &device,
        )?;
        let rope_global = Rope::new(
            config.head_dim,
            config.rope_global_base,
            max_positions,
            &device,
        )?;
        Ok(Gemma3 {
            config,
            embed,
            layers,
            norm,
            lm_head,
            rope_local,
            rope_global,
            max_positions,
            device,
            weight_bytes,
            dtypes: dtypes.into_iter().collect(),
        })
    }

    pub fn config(&self) -> &GemmaConfig {
        &self.config
    }

    /// Positions a sequence may reach (prompt + generated).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// A fresh, empty sequence.
    pub fn new_sequence(&self) -> Sequence {
        Sequence {
            keys: vec![Vec::new(); self.config.layers],
            values: vec![Vec::new(); self.config.layers],
            len: 0,
        }
    }

    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embed.embedding(ids)?;
        x * (self.config.hidden as f64).sqrt()
    }

    fn rope(&self, layer: &Layer) -> &Rope {
        if layer.sliding {
            &self.rope_local
        } else {
            &self.rope_global
        }
    }

    fn logits(&self, last: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(last)?;
        self.lm_head.forward(&x)
    }

    /// Feeds `tokens` (a prompt, or any continuation) to one sequence and returns the
    /// logits after its last token, shape (vocab).
    pub fn prefill(&self, seq: &mut Sequence, tokens: &[u32]) -> Result<Tensor> {
        let t = tokens.len();
        if t == 0 {
            candle_core::bail!("prefill needs at least one token");
        }
        let start = seq.len;
        if start + t > self.max_positions {
            candle_core::bail!(
                "sequence of {} positions exceeds the context of {}",
                start + t,
                self.max_positions
            );
        }
        let c = &self.config;
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(0)?;
        let mut x = self.embed(&ids)?; // (1, t, hidden)
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let group = c.heads / c.kv_heads;
        for (li, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = layer.qkv(c, &x)?;
            let q = self.rope(layer).apply_range(&q, start)?;
            let k = self.rope(layer).apply_range(&k, start)?;
            // (1, kv, t, d) → rows of [kv][d] per position, appended to the cache.
            let row = c.kv_heads * c.head_dim;
            seq.keys[li].extend(k.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?);
            seq.values[li].extend(v.flatten_all()?.to_vec1::<f32>()?);
            let total = start + t;
            let cached = |data: &[f32]| -> Result<Tensor> {
                Tensor::from_slice(
                    &data[..total * row],
                    (1, total, c.kv_heads, c.head_dim),
                    &self.device,
                )?
                .transpose(1, 2)
            };
            let (k_all, v_all) = (cached(&seq.keys[li])?, cached(&seq.values[li])?);
            // Only the positions any query of this pass may see.
            let first = match layer.sliding {
                true => (start + 1).saturating_sub(c.sliding_window),
                false => 0,
            };
            let k_all = k_all.narrow(2, first, total - first)?;
            let v_all = v_all.narrow(2, first, total - first)?;
            let l = total - first;
            // Heads of one KV head are contiguous: (kv, group*t, d) × (kv, d, l).
            let qg = q
                .contiguous()?
                .reshape((c.kv_heads, group * t, c.head_dim))?;
            let kg = k_all.reshape((c.kv_heads, l, c.head_dim))?;
            let vg = v_all.reshape((c.kv_heads, l, c.head_dim))?;
            let att = (qg.matmul(&kg.t()?)? * scale)?.reshape((c.heads, t, l))?;
            let mask = self.mask(t, start, first, layer.sliding)?;
            let att = att.broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let out = att
                .reshape((c.kv_heads, group * t, l))?
                .matmul(&vg.contiguous()?)?
                .reshape((1, c.heads, t, c.head_dim))?
                .transpose(1, 2)?
                .reshape((1, t, c.heads * c.head_dim))?;
            x = layer.finish(x, &out)?;
        }
        seq.len += t;
        let last = x.i((0, t - 1))?.unsqueeze(0)?;
        self.logits(&last)?.squeeze(0)
    }

    /// Additive mask (t, l): query i (position start+i) sees key j (position first+j)
    /// when j's position ≤ i's and, in a sliding layer, is within the window.
    fn mask(&self, t: usize, start: usize, first: usize, sliding: bool) -> Result<Tensor> {
        let l = start + t - first;
        let w = self.config.sliding_window;
        let mut m = vec![0f32; t * l];
        for i in 0..t {
            let qp = start + i;
            for j in 0..l {
                let kp = first + j;
                if kp > qp || (sliding && qp - kp >= w) {
                    m[i * l + j] = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_vec(m, (t, l), &self.device)
    }

    /// One decode step for many sequences: feeds `tokens[i]` to `seqs[i]` and returns
    /// the logits after it, shape (n, vocab). The matrix products run once for all
    /// rows; attention runs per sequence over its own cache.
    pub fn decode(&self, seqs: &mut [&mut Sequence], tokens: &[u32]) -> Result<Tensor> {
        let n = tokens.len();
        if n == 0 || n != seqs.len() {
            candle_core::bail!("decode: {} tokens for {} sequences", n, seqs.len());
        }
        if let Some(s) = seqs.iter().find(|s| s.len + 1 > self.max_positions) {
            candle_core::bail!(
                "sequence of {} positions exceeds the context of {}",
                s.len + 1,
                self.max_positions
            );
        }
        let c = &self.config;
        let positions: Vec<u32> = seqs.iter().map(|s| s.len as u32).collect();
        let positions = Tensor::new(positions.as_slice(), &self.device)?;
        let ids = Tensor::new(tokens, &self.device)?.unsqueeze(1)?; // (n, 1)
        let mut x = self.embed(&ids)?; // (n, 1, hidden)
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let group = c.heads / c.kv_heads;
        for (li, layer) in self.layers.iter().enumerate() {
            let (q, k, v) = layer.qkv(c, &x)?;
            let rope = self.rope(layer);
            let q = rope.apply_rows(&q, &positions)?;
            let k = rope.apply_rows(&k, &positions)?;
            // (n, heads, 1, d) and (n, kv, 1, d) as plain rows; attention per sequence
            // over its own cache, in Rust (a few µs each instead of ~20 tensor ops).
            let q = q.flatten_all()?.to_vec1::<f32>()?;
            let k = k.flatten_all()?.to_vec1::<f32>()?;
            let v = v.flatten_all()?.to_vec1::<f32>()?;
            let (d, row) = (c.head_dim, c.kv_heads * c.head_dim);
            let mut out = vec![0f32; n * c.heads * d];
            for (i, seq) in seqs.iter_mut().enumerate() {
                seq.keys[li].extend_from_slice(&k[i * row..(i + 1) * row]);
                seq.values[li].extend_from_slice(&v[i * row..(i + 1) * row]);
            }
            // Each sequence's visible positions, then every (sequence, head) on the
            // compute threads (on one thread, the other spun at the barrier meanwhile).
            let visible: Vec<(&[f32], &[f32], std::ops::Range<usize>)> = seqs
                .iter()
                .map(|seq| {
                    let total = seq.len + 1;
                    let first = match layer.sliding {
                        true => total.saturating_sub(c.sliding_window),
                        false => 0,
                    };
                    (&seq.keys[li][..], &seq.values[li][..], first..total)
                })
                .collect();
            let out_addr = out.as_mut_ptr() as usize;
            candle_core::utils::barrier_pool().execute_chunked(n * c.heads, |items| {
                let mut scores = Vec::new();
                for item in items {
                    let (i, h) = (item / c.heads, item % c.heads);
                    let (keys, values, ref positions) = visible[i];
                    let head = HeadView {
                        keys,
                        values,
                        row,
                        offset: (h / group) * d,
                        dim: d,
                    };
                    let qh = &q[(i * c.heads + h) * d..(i * c.heads + h + 1) * d];
                    // SAFETY: item (i, h) alone writes out[(i·heads + h)·d ..][..d], inside
                    // `out` (n·heads·d values), which outlives the pool call.
                    let o = unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_addr as *mut f32).add((i * c.heads + h) * d),
                            d,
                        )
                    };
                    attend(qh, &head, positions.clone(), scale as f32, &mut scores, o);
                }
            });
            let out = Tensor::from_vec(out, (n, 1, c.heads * d), &self.device)?;
            x = layer.finish(x, &out)?;
        }
        for s in seqs.iter_mut() {
            s.len += 1;
        }
        self.logits(&x.squeeze(1)?)
    }
}

/// One kv head's cache of one sequence: `row` values per position, this head's `dim`
/// of them from `offset`.
struct HeadView<'a> {
    keys: &'a [f32],
    values: &'a [f32],
    row: usize,
    offset: usize,
    dim: usize,
}

/// One query head over `positions` of its cache, into `out` (`dim` values).
fn attend(
    q: &[f32],
    head: &HeadView,
    positions: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { attend_avx512(q, head, positions, scale, scores, out) };
    }
    attend_portable(q, head, positions, scale, scores, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn attend_avx512(
    q: &[f32],
    head: &HeadView,
    positions: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_portable(q, head, positions, scale, scores, out);
}

#[inline(always)]
fn attend_portable(
    q: &[f32],
    head: &HeadView,
    positions: std::ops::Range<usize>,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (row, offset, dim) = (head.row, head.offset, head.dim);
    let key = |p: usize| &head.keys[p * row + offset..][..dim];
    let value = |p: usize| &head.values[p * row + offset..][..dim];
    scores.clear();
    scores.extend(
        positions
            .clone()
            .map(|p| crate::vector::dot(q, key(p)) * scale),
    );
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = crate::vector::exp(*s - max);
        sum += *s;
    }
    out.fill(0.0);
    for (p, w) in positions.zip(scores.iter()) {
        let w = w / sum;
        out.iter_mut().zip(value(p)).for_each(|(o, x)| *o += w * x);
    }
}

/// Runs `f` on a tensor's f32 values in place when it is a contiguous CPU f32 tensor
/// (a 16-sequence step's logits are 16 MiB, copied every step before), else on
/// a copy.
pub fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
            && let Ok(values) = cpu.as_slice::<f32>()
        {
            return Ok(f(&values[start..end]));
        }
    }
    Ok(f(&t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?))
}

/// Logits as a plain vector (one row).
pub fn to_vec(logits: &Tensor) -> Result<Vec<f32>> {
    logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Index of the largest value, the first one on ties (greedy decoding).
pub fn argmax(row: &[f32]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { argmax_avx512(row) };
    }
    argmax_portable(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn argmax_avx512(row: &[f32]) -> u32 {
    argmax_portable(row)
}

/// One pass, sixteen lanes: each lane keeps its first maximum, then the lanes' best
/// with the smallest index wins (a vocabulary of 262,144 logits per sequence per step).
#[inline(always)]
fn argmax_portable(row: &[f32]) -> u32 {
    const L: usize = 16;
    let mut best = [f32::NEG_INFINITY; L];
    let mut at = [0u32; L];
    let chunks = row.chunks_exact(L);
    let tail_start = row.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        for l in 0..L {
            if chunk[l] > best[l] {
                best[l] = chunk[l];
                at[l] = (c * L + l) as u32;
            }
        }
    }
    let (mut value, mut index) = (f32::NEG_INFINITY, 0u32);
    for l in 0..L {
        if best[l] > value || (best[l] == value && at[l] < index) {
            (value, index) = (best[l], at[l]);
        }
    }
    for (i, &v) in row[tail_start..].iter().enumerate() {
        if v > value {
            (value, index) = (v, (tail_start + i) as u32);
        }
    }
    if value == f32::NEG_INFINITY {
        // All −∞ or NaN: the first index, as a plain scan would give.
        return 0;
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_of_equal_maxima_in_every_position() {
        // Lengths around the 16 lanes, the maximum in a lane, across lanes and in the tail.
        for len in [1usize, 15, 16, 17, 33, 262_144 + 5] {
            for at in [0, len / 2, len - 1] {
                let mut row = vec![-1.0f32; len];
                row[at] = 3.0;
                assert_eq!(argmax(&row), at as u32, "len {len}, max at {at}");
                if at + 1 < len {
                    row[len - 1] = 3.0; // a later tie loses
                    assert_eq!(argmax(&row), at as u32, "len {len}, tie after {at}");
                }
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[f32::NAN, 1.0, 2.0]), 2, "NaN is never the maximum");
    }

    #[test]
    fn values_are_read_in_place_or_from_a_copy_alike() {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let sum = |v: &[f32]| v.iter().sum::<f32>();
        assert_eq!(with_values(&t, sum).unwrap(), 66.0);
        // A narrowed view (an offset into its storage) and a transposed one.
        let row = t.narrow(0, 1, 1).unwrap();
        assert_eq!(
            with_values(&row, |v| v.to_vec()).unwrap(),
            [4.0, 5.0, 6.0, 7.0]
        );
        let tt = t.t().unwrap();
        assert_eq!(
            with_values(&tt, |v| v[..3].to_vec()).unwrap(),
            [0.0, 4.0, 8.0]
        );
    }
}
