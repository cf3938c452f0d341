//! MiniLM (BERT) on the worker's own Q8_0 kernel ([`crate::q8`]): the int8 variant on
//! CPUs with AVX512-VNNI.
//!
//! All 36 linear layers hold Q8_0 weights, quantized at load from `model.safetensors`
//! with one f32 scale per 32 values; activations are quantized per 32 values as they
//! enter each product. A scale per 32 values keeps an outlier channel's error inside
//! its own block (ONNX Runtime's per-tensor int8 graph lost 0.036 of cosine to them,
//! docs/worker.md), and values past [`OUTLIER`] skip quantization altogether.
//! Embeddings, layer norms, attention, GELU and pooling stay f32.
//!
//! Sequences are packed without padding: products, norms and GELU run over real
//! tokens only, and attention runs per sequence over its own length, so a batch of
//! mixed lengths costs what its tokens cost ([`EmbeddingBackend::padding_slack`] is
//! unbounded: one call per batch).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::{EmbeddingBackend, EngineError, TokenBatch, normalize};
use crate::q8::{Fused, Q8Matrix};
use crate::vector::{dot, exp, sum};

#[derive(Debug, serde::Deserialize)]
struct BertConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    max_position_embeddings: usize,
    layer_norm_eps: f64,
}

struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

struct Linear {
    /// Q8_0 weights (with their f16 copy for outlier values).
    weight: Q8Matrix,
    bias: Vec<f32>,
}

/// An input value of at least this magnitude skips quantization (as in LLM.int8(), and
/// with its threshold): MiniLM's layer norms put a few channels (99, 223, 63 …) at
/// 5–30 where the rest stay under ~2, and a block of 32 scaled for 30 leaves its other
/// 31 values a step of 0.24 (min cosine 0.9981 with every value quantized, 0.9993
/// with this split; docs/worker.md has how those were measured).
const OUTLIER: f32 = 6.0;

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    intermediate: Linear,
    output: Linear,
    out_norm: Norm,
}

/// Activations of one call, kept between calls so a steady load allocates nothing.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    sum: Vec<f32>,
    mid: Vec<f32>,
}

pub struct Q8Bert {
    /// `vocab × hidden`.
    word: Vec<f32>,
    /// `max_positions × hidden`.
    position: Vec<f32>,
    /// Token type 0 (sentence embeddings use no other).
    token_type: Vec<f32>,
    emb_norm: Norm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    max_positions: usize,
    scratch: Scratch,
}

/// The safetensors file's tensors, read once as f32.
struct Weights {
    path: std::path::PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        let error = |message: String| EngineError::ModelFile {
            path: self.path.clone(),
            message,
        };
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| error(format!("tensor {name} is missing")))?;
        if t.dims() != shape {
            return Err(error(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.dims()
            )));
        }
        t.to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| error(format!("tensor {name}: {e}")))
    }

    fn norm(&self, prefix: &str, dim: usize, eps: f64) -> Result<Norm, EngineError> {
        Ok(Norm {
            weight: self.get(&format!("{prefix}.weight"), &[dim])?,
            bias: self.get(&format!("{prefix}.bias"), &[dim])?,
            eps: eps as f32,
        })
    }

    /// A linear layer from one or more stacked weight matrices (`[out_i, in]`) and their biases.
    fn linear(&self, prefixes: &[String], out: usize, input: usize) -> Result<Linear, EngineError> {
        let mut weight = Vec::with_capacity(prefixes.len() * out * input);
        let mut bias = Vec::with_capacity(prefixes.len() * out);
        for p in prefixes {
            weight.extend(self.get(&format!("{p}.weight"), &[out, input])?);
            bias.extend(self.get(&format!("{p}.bias"), &[out])?);
        }
        let rows = prefixes.len() * out;
        let weight =
            Q8Matrix::from_f32(&weight, rows, input).ok_or_else(|| EngineError::Backend {
                backend: "native",
                message: format!(
                    "{} ({rows} × {input}) does not suit the Q8_0 kernel (rows a multiple of 16, \
                 inputs of 32)",
                    prefixes.join(" + ")
                ),
            })?;
        Ok(Linear { weight, bias })
    }
}

impl Q8Bert {
    /// Loads and quantizes the model; fails clearly on a CPU without AVX512-VNNI.
    pub fn load(model_dir: &Path) -> Result<Self, EngineError> {
        if !Q8Matrix::supported() {
            return Err(EngineError::Backend {
                backend: "native",
                message: "this CPU lacks AVX512-VNNI, which the worker's int8 kernel needs \
                          (serve int8 with --backend onnx)"
                    .into(),
            });
        }
        let c: BertConfig = super::read_config(model_dir)?;
        let path = model_dir.join("model.safetensors");
        let tensors =
            candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map_err(|e| {
                EngineError::ModelFile {
                    path: path.clone(),
                    message: e.to_string(),
                }
            })?;
        let w = Weights { path, tensors };
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let vocab = w
            .tensors
            .get("embeddings.word_embeddings.weight")
            .map(|t| t.dims()[0])
            .unwrap_or(0);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = format!("encoder.layer.{i}");
                let qkv: Vec<String> = ["query", "key", "value"]
                    .iter()
                    .map(|p| format!("{l}.attention.self.{p}"))
                    .collect();
                Ok(Layer {
                    qkv: w.linear(&qkv, h, h)?,
                    attn_out: w.linear(&[format!("{l}.attention.output.dense")], h, h)?,
                    attn_norm: w.norm(
                        &format!("{l}.attention.output.LayerNorm"),
                        h,
                        c.layer_norm_eps,
                    )?,
                    intermediate: w.linear(&[format!("{l}.intermediate.dense")], inter, h)?,
                    output: w.linear(&[format!("{l}.output.dense")], h, inter)?,
                    out_norm: w.norm(&format!("{l}.output.LayerNorm"), h, c.layer_norm_eps)?,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        let token_types = w.get("embeddings.token_type_embeddings.weight", &[2, h])?;
        Ok(Q8Bert {
            word: w.get("embeddings.word_embeddings.weight", &[vocab, h])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[c.max_position_embeddings, h],
            )?,
            token_type: token_types[..h].to_vec(),
            emb_norm: w.norm("embeddings.LayerNorm", h, c.layer_norm_eps)?,
            layers,
            hidden: h,
            heads: c.num_attention_heads,
            max_positions: c.max_position_embeddings,
            scratch: Scratch::default(),
        })
    }

    /// Embeddings of the batch's rows, mean-pooled over real tokens and normalized.
    fn forward(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        let (h, l) = (self.hidden, batch.seq_len);
        if l > self.max_positions {
            return Err(EngineError::Backend {
                backend: "native",
                message: format!(
                    "a sequence of {l} tokens exceeds the model's {} positions",
                    self.max_positions
                ),
            });
        }
        // Packed real tokens: sequence r is rows starts[r]..starts[r + 1].
        let mut starts = Vec::with_capacity(batch.rows + 1);
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.x.clear();
        starts.push(0);
        for r in 0..batch.rows {
            for t in 0..l {
                if batch.mask[r * l + t] == 0 {
                    continue;
                }
                let id = batch.ids[r * l + t] as usize;
                let word =
                    self.word
                        .get(id * h..(id + 1) * h)
                        .ok_or_else(|| EngineError::Backend {
                            backend: "native",
                            message: format!("token id {id} is outside the vocabulary"),
                        })?;
                let position = &self.position[t * h..(t + 1) * h];
                scratch.x.extend(
                    word.iter()
                        .zip(position)
                        .zip(&self.token_type)
                        .map(|((w, p), t)| w + p + t),
                );
            }
            starts.push(scratch.x.len() / h);
        }
        // SAFETY: `load` refused a CPU without these features.
        unsafe { self.encode(&mut scratch, &starts) };
        let pooled = (0..batch.rows)
            .map(|r| {
                let mut mean = vec![0f32; h];
                let tokens = &scratch.x[starts[r] * h..starts[r + 1] * h];
                for token in tokens.chunks_exact(h) {
                    mean.iter_mut().zip(token).for_each(|(m, v)| *m += v);
                }
                let n = (starts[r + 1] - starts[r]).max(1) as f32;
                mean.iter_mut().for_each(|m| *m /= n);
                normalize(&mut mean);
                mean
            })
            .collect();
        self.scratch = scratch;
        Ok(pooled)
    }

    /// The embedding norm and every layer over the packed tokens in `s.x`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    fn encode(&self, s: &mut Scratch, starts: &[usize]) {
        let h = self.hidden;
        let tokens = s.x.len() / h;
        self.emb_norm.apply(&mut s.x, h);
        for layer in &self.layers {
            layer.qkv.forward(&s.x, tokens, &mut s.qkv, None, false);
            s.ctx.resize(tokens * h, 0.0);
            attention(&s.qkv, starts, self.heads, h, &mut s.ctx);
            add_and_norm(
                &layer.attn_out,
                &layer.attn_norm,
                &s.ctx,
                &mut s.x,
                &mut s.sum,
            );
            layer
                .intermediate
                .forward(&s.x, tokens, &mut s.mid, None, true);
            add_and_norm(&layer.output, &layer.out_norm, &s.mid, &mut s.x, &mut s.sum);
        }
    }
}

/// A sublayer's end: `x = norm(x + input · Wᵀ + b)`, written through `spare`.
#[inline(always)]
fn add_and_norm(
    linear: &Linear,
    norm: &Norm,
    input: &[f32],
    x: &mut Vec<f32>,
    spare: &mut Vec<f32>,
) {
    let h = linear.weight.n();
    let tokens = x.len() / h;
    linear.forward(input, tokens, spare, Some(x.as_slice()), false);
    norm.apply(spare, h);
    std::mem::swap(x, spare);
}

impl Linear {
    /// `out = x · Wᵀ + b (+ residual)`, then GELU if asked, for `rows` rows: input
    /// values under [`OUTLIER`] through the Q8_0 kernel, the others (few, often none)
    /// in f32 against f16 weights, all inside the kernel.
    #[inline(always)]
    fn forward(
        &self,
        x: &[f32],
        rows: usize,
        out: &mut Vec<f32>,
        residual: Option<&[f32]>,
        gelu: bool,
    ) {
        out.resize(rows * self.weight.n(), 0.0);
        let fused = Fused {
            outliers_above: Some(OUTLIER),
            bias: Some(&self.bias),
            residual,
            gelu,
        };
        self.weight.matmul_fused(x, rows, out, fused);
    }
}

impl Norm {
    /// Layer norm of each `dim`-wide row of `x`, in place, rows spread over the
    /// worker's compute threads.
    #[inline(always)]
    fn apply(&self, x: &mut [f32], dim: usize) {
        let rows = x.len() / dim;
        let addr = x.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            // SAFETY: each range of rows is one item's alone, inside `x`, which outlives
            // the pool call; AVX-512 was found by `Q8Bert::load`.
            unsafe {
                let rows = std::slice::from_raw_parts_mut(
                    (addr as *mut f32).add(range.start * dim),
                    range.len() * dim,
                );
                self.apply_rows(rows, dim);
            }
        });
    }

    #[target_feature(enable = "avx512f")]
    fn apply_rows(&self, x: &mut [f32], dim: usize) {
        for row in x.chunks_exact_mut(dim) {
            let mean = sum(row) / dim as f32;
            row.iter_mut().for_each(|v| *v -= mean);
            let var = dot(row, row) / dim as f32;
            let inv = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *v = *v * inv * w + b;
            }
        }
    }
}

/// Self-attention of every sequence and head: `qkv` rows are `[q | k | v]` (`3·hidden`
/// wide), `ctx` rows get each head's weighted values. Sequences and heads are spread over
/// the worker's compute threads.
fn attention(qkv: &[f32], starts: &[usize], heads: usize, h: usize, ctx: &mut [f32]) {
    let sequences = starts.len() - 1;
    assert_eq!(
        ctx.len(),
        starts[sequences] * h,
        "ctx holds every packed token"
    );
    assert_eq!(
        qkv.len(),
        3 * ctx.len(),
        "qkv holds q, k and v of every token"
    );
    let ctx_addr = ctx.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(sequences * heads, |items| {
        let mut buffers = AttentionBuffers::default();
        for item in items {
            let (seq, head) = (item / heads, item % heads);
            // SAFETY: AVX-512 was found by `Q8Bert::load`; each (sequence, head) item
            // writes only its own rows' head columns of `ctx` (asserted size), which
            // outlives the pool call.
            unsafe {
                attend(
                    qkv,
                    starts[seq]..starts[seq + 1],
                    head,
                    heads,
                    h,
                    ctx_addr as *mut f32,
                    &mut buffers,
                )
            };
        }
    });
}

#[derive(Default)]
struct AttentionBuffers {
    /// This head's keys transposed, `head_dim × tokens`: scores then vectorize over keys.
    keys: Vec<f32>,
    scores: Vec<f32>,
}

/// One head of one sequence (packed rows `rows`), into those rows of `ctx` (`hidden`
/// wide).
///
/// # Safety
/// `ctx` must hold `rows.end × h` values, and no other thread may touch this head's
/// columns of these rows meanwhile; the CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
unsafe fn attend(
    qkv: &[f32],
    rows: std::ops::Range<usize>,
    head: usize,
    heads: usize,
    h: usize,
    ctx: *mut f32,
    b: &mut AttentionBuffers,
) {
    let (hd, len) = (h / heads, rows.len());
    let scale = 1.0 / (hd as f32).sqrt();
    let col = head * hd;
    let part = |t: usize, which: usize| &qkv[t * 3 * h + which * h + col..][..hd];
    b.keys.clear();
    b.keys.resize(hd * len, 0.0);
    for (j, t) in rows.clone().enumerate() {
        for (d, &v) in part(t, 1).iter().enumerate() {
            b.keys[d * len + j] = v;
        }
    }
    for i in rows.clone() {
        b.scores.clear();
        b.scores.resize(len, 0.0);
        for (d, &q) in part(i, 0).iter().enumerate() {
            let q = q * scale;
            let keys = &b.keys[d * len..(d + 1) * len];
            b.scores.iter_mut().zip(keys).for_each(|(s, k)| *s += q * k);
        }
        let max = b.scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        b.scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let inv = 1.0 / sum(&b.scores);
        // SAFETY: the caller's contract: this head's columns of row i are ours.
        let out = unsafe { std::slice::from_raw_parts_mut(ctx.add(i * h + col), hd) };
        out.fill(0.0);
        for (t, &p) in rows.clone().zip(b.scores.iter()) {
            let p = p * inv;
            out.iter_mut()
                .zip(part(t, 2))
                .for_each(|(o, v)| *o += p * v);
        }
    }
}

impl EmbeddingBackend for Q8Bert {
    fn embed(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        self.forward(batch)
    }

    fn dimension(&self) -> usize {
        self.hidden
    }

    /// Padding costs nothing here: tokens are packed.
    fn padding_slack(&self) -> f64 {
        f64::INFINITY
    }
}
