//! BERT encoder on candle (f32/f16/bf16), from `model.safetensors`.
//!
//! A compact BERT with fused QKV projection; layer norm and softmax use candle-nn's
//! fused kernels. It is the CUDA path (`--features cuda`); on CPU ONNX Runtime is faster.
//! Mean pooling and normalization run on the device, so only `[rows, hidden]` f32
//! values cross back to the host.
//!
//! Shaped for candle's CUDA kernels, whose broadcasting element-wise ops take a slow
//! strided-index path (Nsight Compute on an H100: bias and mask additions were 56 % of
//! the GPU time at batch 256): each bias rides in its matrix product as an extra input
//! column of ones (`BiasedLinear`), the attention mask is expanded once per call, and
//! pooling is a matrix product with the mask.
//!
//! On a CUDA device whose shape the worker's kernels cover, the encoder is `Packed`
//! instead: its weights are prepared on the host and copied over, so that none of
//! candle's own kernels runs on the GPU. Each candle kernel module the driver meets is
//! JIT-compiled from PTX on first use (binary ops alone: ~6 s of `ptxas`), and a new pod
//! would pay that on every start (docs/benchmarks.md, "Startup on a GPU").

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::{EmbeddingBackend, EngineError, PADDING_SLACK, Precision, TokenBatch};

/// Padding slack on a GPU: a call's ~170 kernel launches cost more than the padding of
/// thousands of tokens (measured on an H100: 3 length groups of a 256-sentence batch took
/// 13 ms, one padded call far less; docs/benchmarks.md).
const GPU_PADDING_SLACK: f64 = 16.0;

#[derive(Debug, serde::Deserialize)]
struct BertConfig {
    hidden_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    layer_norm_eps: f64,
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps: eps as f32,
        })
    }
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
    #[cfg(any(feature = "cuda", test))]
    fn to_device(&self, device: &Device) -> candle_core::Result<Self> {
        Ok(LayerNorm {
            weight: self.weight.to_device(device)?,
            bias: self.bias.to_device(device)?,
            eps: self.eps,
        })
    }
}

/// Extra input columns of a [`BiasedLinear`]: a column of ones, then zeros up to a
/// multiple of 8 elements (16-byte rows keep cuBLAS on its tensor-core kernels).
const BIAS_COLUMNS: usize = 8;

/// `x·Wᵀ + b` as one matrix product `[x | 1 0…0]·[W | b 0…0]ᵀ`: no broadcast addition.
struct BiasedLinear {
    /// `[out, in + BIAS_COLUMNS]`.
    weight: Tensor,
}

impl BiasedLinear {
    fn new(weight: Tensor, bias: Tensor) -> candle_core::Result<Self> {
        let out = weight.dim(0)?;
        let zeros = Tensor::zeros((out, BIAS_COLUMNS - 1), weight.dtype(), weight.device())?;
        let weight = Tensor::cat(&[&weight, &bias.unsqueeze(1)?, &zeros], 1)?;
        Ok(BiasedLinear { weight })
    }

    /// `x` is `[rows, in]`; `ones` is `[rows, BIAS_COLUMNS]` from [`bias_columns`].
    fn forward(&self, x: &Tensor, ones: &Tensor) -> candle_core::Result<Tensor> {
        Tensor::cat(&[x, ones], 1)?.matmul(&self.weight.t()?)
    }
}

/// The `[rows, BIAS_COLUMNS]` block `[1 0 … 0]` that [`BiasedLinear`] appends to inputs.
fn bias_columns(rows: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::cat(
        &[
            Tensor::ones((rows, 1), dtype, device)?,
            Tensor::zeros((rows, BIAS_COLUMNS - 1), dtype, device)?,
        ],
        1,
    )
}

/// One layer of the packed CUDA path: weights pre-transposed to `[in, out]` for plain
/// matrix products, in the model's type; biases (f32) go to the fused kernels that follow
/// them, as do the layer norms (f32).
#[cfg(any(feature = "cuda", test))]
struct PackedLayer {
    qkv_w: Tensor,
    qkv_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    attn_ln: LayerNorm,
    inter_w: Tensor,
    inter_b: Tensor,
    output_w: Tensor,
    output_b: Tensor,
    out_ln: LayerNorm,
}

/// The packed CUDA encoder (`cuda_ops`): sequences without padding, one fused kernel
/// between matrix products.
#[cfg(any(feature = "cuda", test))]
struct Packed {
    /// `[vocab + positions, hidden]`: word rows, then position rows with the token-type
    /// row added.
    table: Tensor,
    vocab: u32,
    /// The embeddings' layer norm (f32).
    emb_ln: LayerNorm,
    layers: Vec<PackedLayer>,
}

/// The padded encoder: candle's ops, on any device.
struct Padded {
    word: Embedding,
    position: Embedding,
    token_type: Tensor,
    /// In the model's type.
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
}

enum Encoder {
    Padded(Padded),
    #[cfg(feature = "cuda")]
    Packed(Packed),
}

struct Layer {
    qkv: BiasedLinear,
    attn_out: BiasedLinear,
    attn_ln: LayerNorm,
    intermediate: BiasedLinear,
    output: BiasedLinear,
    out_ln: LayerNorm,
}

pub struct CandleBert {
    encoder: Encoder,
    heads: usize,
    hidden: usize,
    dtype: DType,
    device: Device,
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<BiasedLinear> {
    BiasedLinear::new(
        vb.get((out_dim, in_dim), "weight")?,
        vb.get(out_dim, "bias")?,
    )
}

impl CandleBert {
    pub fn load(
        model_dir: &Path,
        precision: Precision,
        device: Device,
    ) -> Result<Self, EngineError> {
        let config: BertConfig = super::read_config(model_dir)?;
        let dtype = match precision {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
            Precision::Bf16 => DType::BF16,
            Precision::Int8 => {
                return Err(EngineError::Backend {
                    backend: "candle",
                    message: "int8 is served by the onnx backend".into(),
                });
            }
        };
        let weights = model_dir.join("model.safetensors");
        let file_error = |e: candle_core::Error| EngineError::ModelFile {
            path: weights.clone(),
            message: e.to_string(),
        };
        #[cfg(feature = "cuda")]
        if device.is_cuda() && Packed::covers(&config) {
            // Prepared on the host (see the module's doc), then copied to the GPU.
            // SAFETY: the weights file is mapped read-only and not modified while mapped.
            let host =
                unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, &Device::Cpu) }
                    .map_err(file_error)?;
            let packed = Packed::load(&host, &config, &device).map_err(file_error)?;
            return Ok(CandleBert {
                encoder: Encoder::Packed(packed),
                heads: config.num_attention_heads,
                hidden: config.hidden_size,
                dtype,
                device,
            });
        }
        // SAFETY: the weights file is mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, &device) }
            .map_err(file_error)?;
        Self::from_var_builder(vb, &config, dtype, device).map_err(file_error)
    }

    fn from_var_builder(
        vb: VarBuilder,
        c: &BertConfig,
        dtype: DType,
        device: Device,
    ) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let emb = vb.pp("embeddings");
        let word_w = emb.pp("word_embeddings").get_unchecked("weight")?;
        let pos_w = emb.pp("position_embeddings").get_unchecked("weight")?;
        let tt_w = emb.pp("token_type_embeddings").get_unchecked("weight")?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let l = vb.pp(format!("encoder.layer.{i}"));
                let a = l.pp("attention");
                let q = a.pp("self.query");
                let k = a.pp("self.key");
                let v = a.pp("self.value");
                let qkv_w = Tensor::cat(
                    &[
                        q.get((h, h), "weight")?,
                        k.get((h, h), "weight")?,
                        v.get((h, h), "weight")?,
                    ],
                    0,
                )?;
                let qkv_b = Tensor::cat(
                    &[q.get(h, "bias")?, k.get(h, "bias")?, v.get(h, "bias")?],
                    0,
                )?;
                let inter = l.pp("intermediate.dense").get_unchecked("weight")?.dim(0)?;
                Ok(Layer {
                    qkv: BiasedLinear::new(qkv_w, qkv_b)?,
                    attn_out: linear(a.pp("output.dense"), h, h)?,
                    attn_ln: LayerNorm::load(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                    intermediate: linear(l.pp("intermediate.dense"), h, inter)?,
                    output: linear(l.pp("output.dense"), inter, h)?,
                    out_ln: LayerNorm::load(l.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(CandleBert {
            encoder: Encoder::Padded(Padded {
                word: Embedding::new(word_w, h),
                position: Embedding::new(pos_w, h),
                token_type: tt_w.get(0)?,
                emb_ln: LayerNorm::load(emb.pp("LayerNorm"), h, c.layer_norm_eps)?,
                layers,
            }),
            heads: c.num_attention_heads,
            hidden: h,
            dtype,
            device,
        })
    }

    /// Embeddings of the batch, `rows × hidden` row-major, mean-pooled and normalized.
    fn forward(&self, p: &Padded, batch: &TokenBatch) -> candle_core::Result<Vec<f32>> {
        let (b, l, h) = (batch.rows, batch.seq_len, self.hidden);
        let (heads, hd) = (self.heads, h / self.heads);
        let ids = Tensor::from_slice(&batch.ids, (b, l), &self.device)?;
        let positions = Tensor::arange(0u32, l as u32, &self.device)?;
        let x = p
            .word
            .forward(&ids)?
            .broadcast_add(&p.position.forward(&positions)?)?
            .broadcast_add(&p.token_type)?;
        // Rows are tokens from here on: [b·l, h].
        let mut x = p.emb_ln.forward(&x)?.reshape((b * l, h))?;
        let ones = bias_columns(b * l, self.dtype, &self.device)?;
        let real = Tensor::from_slice(&batch.mask, (b, l), &self.device)?.to_dtype(DType::F32)?;
        // Additive mask, 0 for real tokens and a large negative number for padding,
        // expanded once to the scores' shape so that each layer's addition is contiguous.
        let mask = ((real.reshape((b, 1, 1, l))? - 1.0)? * 1e4)?
            .to_dtype(self.dtype)?
            .broadcast_as((b, heads, l, l))?
            .contiguous()?;
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &p.layers {
            let qkv = layer
                .qkv
                .forward(&x, &ones)?
                .reshape((b, l, 3, heads, hd))?;
            let qkv = qkv.permute((2, 0, 3, 1, 4))?; // [3, b, heads, l, hd]
            // q is scaled rather than the scores: fewer elements.
            let q = (qkv.get(0)? * scale)?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? + &mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b * l, h))?;
            x = layer
                .attn_ln
                .forward(&(layer.attn_out.forward(&ctx, &ones)? + &x)?)?;
            let inter = layer.intermediate.forward(&x, &ones)?.gelu_erf()?;
            x = layer
                .out_ln
                .forward(&(layer.output.forward(&inter, &ones)? + &x)?)?;
        }
        // Mean over real tokens as a product with the mask, then the L2 norm, in f32.
        let x = x.to_dtype(DType::F32)?.reshape((b, l, h))?;
        let summed = real.unsqueeze(1)?.matmul(&x)?.squeeze(1)?; // [b, h]
        let counts = real.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()
    }
}

/// `vb`'s tensor `name` in `vb`'s own type, whatever its shape. Candle's `get_unchecked`
/// reads in the type the builder was *created* with and ignores `to_dtype`, which once
/// handed the f32-only CUDA kernels f16 biases (6f3ee6f; seen only on a GPU then).
#[cfg(any(feature = "cuda", test))]
fn unchecked(vb: &VarBuilder, name: &str) -> candle_core::Result<Tensor> {
    vb.get_unchecked_dtype(name, vb.dtype())
}

#[cfg(any(feature = "cuda", test))]
impl Packed {
    /// Whether the worker's kernels cover the model's shape: hidden ≤ 1024, heads of 32
    /// or 64. Another shape keeps the padded path.
    #[cfg(feature = "cuda")]
    fn covers(c: &BertConfig) -> bool {
        use super::cuda_ops::{HEAD_DIMS, MAX_HIDDEN};
        let h = c.hidden_size;
        h <= MAX_HIDDEN
            && h.is_multiple_of(c.num_attention_heads)
            && HEAD_DIMS.contains(&(h / c.num_attention_heads))
    }

    /// The packed weights from `vb`, prepared on its device and copied to `device` (plain
    /// copies, no kernel): matrices in `vb`'s type, transposed to `[in, out]`; biases and
    /// layer norms f32 (`bert.cu` says why).
    fn load(vb: &VarBuilder, c: &BertConfig, device: &Device) -> candle_core::Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        let moved = |x: Tensor| x.to_device(device);
        let t = |w: Tensor| moved(w.t()?.contiguous()?);
        let ln = |vb: VarBuilder| LayerNorm::load(vb, h, eps)?.to_device(device);
        let emb = vb.pp("embeddings");
        let word = unchecked(&emb.pp("word_embeddings"), "weight")?;
        let position = unchecked(&emb.pp("position_embeddings"), "weight")?;
        let token_type = unchecked(&emb.pp("token_type_embeddings"), "weight")?;
        // Biases and layer norms read as f32 from the file, not through the model's type.
        let f32_vb = vb.to_dtype(DType::F32);
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let prefix = format!("encoder.layer.{i}");
                let (l, lf) = (vb.pp(&prefix), f32_vb.pp(&prefix));
                let (a, af) = (l.pp("attention"), lf.pp("attention"));
                let qkv = |vb: &VarBuilder, what: &str| {
                    let part = |name: &str| unchecked(&vb.pp(format!("self.{name}")), what);
                    Tensor::cat(&[part("query")?, part("key")?, part("value")?], 0)
                };
                let dense = |name: &str, vb: &VarBuilder, vbf: &VarBuilder| {
                    let (p, pf) = (vb.pp(name), vbf.pp(name));
                    candle_core::Result::Ok((
                        t(unchecked(&p, "weight")?)?,
                        moved(unchecked(&pf, "bias")?)?,
                    ))
                };
                let (out_w, out_b) = dense("output.dense", &a, &af)?;
                let (inter_w, inter_b) = dense("intermediate.dense", &l, &lf)?;
                let (output_w, output_b) = dense("output.dense", &l, &lf)?;
                Ok(PackedLayer {
                    qkv_w: t(qkv(&a, "weight")?)?,
                    qkv_b: moved(qkv(&af, "bias")?)?,
                    out_w,
                    out_b,
                    attn_ln: ln(af.pp("output.LayerNorm"))?,
                    inter_w,
                    inter_b,
                    output_w,
                    output_b,
                    out_ln: ln(lf.pp("output.LayerNorm"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let positions = position.broadcast_add(&token_type.get(0)?)?;
        Ok(Packed {
            table: moved(Tensor::cat(&[&word, &positions], 0)?.contiguous()?)?,
            vocab: word.dim(0)? as u32,
            emb_ln: ln(f32_vb.pp("embeddings.LayerNorm"))?,
            layers,
        })
    }
}

#[cfg(feature = "cuda")]
impl CandleBert {
    /// The packed CUDA forward: 4 matrix products and 4 fused kernels per layer, no padding.
    fn forward_packed(&self, p: &Packed, batch: &TokenBatch) -> candle_core::Result<Vec<f32>> {
        use super::cuda_ops;
        let index = cuda_ops::PackedIndex::new(
            &batch.ids,
            &batch.mask,
            batch.rows,
            batch.seq_len,
            p.vocab,
            &self.device,
        )?;
        let ln = &p.emb_ln;
        let mut x = cuda_ops::embed_ln(&index, &p.table, &ln.weight, &ln.bias, ln.eps)?;
        for l in &p.layers {
            let ctx = cuda_ops::attention(&x.matmul(&l.qkv_w)?, &l.qkv_b, &index, self.heads)?;
            let (g, b, eps) = (&l.attn_ln.weight, &l.attn_ln.bias, l.attn_ln.eps);
            x = cuda_ops::bias_residual_ln(&ctx.matmul(&l.out_w)?, &l.out_b, &x, g, b, eps)?;
            let inter = cuda_ops::bias_gelu(&x.matmul(&l.inter_w)?, &l.inter_b)?;
            let (g, b, eps) = (&l.out_ln.weight, &l.out_ln.bias, l.out_ln.eps);
            x = cuda_ops::bias_residual_ln(
                &inter.matmul(&l.output_w)?,
                &l.output_b,
                &x,
                g,
                b,
                eps,
            )?;
        }
        cuda_ops::mean_pool_norm(&x, &index)?
            .flatten_all()?
            .to_vec1::<f32>()
    }
}

impl EmbeddingBackend for CandleBert {
    fn embed(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        let pooled = match &self.encoder {
            Encoder::Padded(padded) => self.forward(padded, batch),
            #[cfg(feature = "cuda")]
            Encoder::Packed(packed) => self.forward_packed(packed, batch),
        }
        .map_err(EngineError::candle)?;
        Ok(pooled
            .chunks_exact(self.hidden)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn dimension(&self) -> usize {
        self.hidden
    }

    fn padding_slack(&self) -> f64 {
        if self.device.is_cuda() {
            GPU_PADDING_SLACK
        } else {
            PADDING_SLACK
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn a_parameter_read_through_an_f32_view_is_f32_in_a_half_precision_model() {
        let bias = Tensor::new(&[0.1f32, -2.5, 3.0e-3], &Device::Cpu).unwrap();
        let tensors = HashMap::from([("layer.bias".to_string(), bias.clone())]);
        let vb = VarBuilder::from_tensors(tensors, DType::F16, &Device::Cpu);

        let half = unchecked(&vb.pp("layer"), "bias").unwrap();
        let full = unchecked(&vb.to_dtype(DType::F32).pp("layer"), "bias").unwrap();

        assert_eq!(half.dtype(), DType::F16);
        assert_eq!(full.dtype(), DType::F32);
        assert_eq!(
            full.to_vec1::<f32>().unwrap(),
            bias.to_vec1::<f32>().unwrap()
        );
    }

    /// A one-layer BERT with hidden 64 (two heads of 32), every tensor filled with
    /// distinct values.
    fn tiny_bert() -> (HashMap<String, Tensor>, BertConfig) {
        let (h, inter, vocab, positions) = (64, 128, 10, 8);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![vocab, h]),
            (
                "embeddings.position_embeddings.weight".into(),
                vec![positions, h],
            ),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        let l = "encoder.layer.0";
        for (name, out, inp) in [
            ("attention.self.query", h, h),
            ("attention.self.key", h, h),
            ("attention.self.value", h, h),
            ("attention.output.dense", h, h),
            ("intermediate.dense", inter, h),
            ("output.dense", h, inter),
        ] {
            shapes.push((format!("{l}.{name}.weight"), vec![out, inp]));
            shapes.push((format!("{l}.{name}.bias"), vec![out]));
        }
        for name in ["attention.output.LayerNorm", "output.LayerNorm"] {
            shapes.push((format!("{l}.{name}.weight"), vec![h]));
            shapes.push((format!("{l}.{name}.bias"), vec![h]));
        }
        let tensors = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n).map(|j| (i * 1000 + j) as f32 * 1e-3).collect();
                (name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
            })
            .collect();
        let config = BertConfig {
            hidden_size: h,
            num_attention_heads: 2,
            num_hidden_layers: 1,
            layer_norm_eps: 1e-12,
        };
        (tensors, config)
    }

    #[test]
    fn packed_weights_keep_the_model_type_and_read_biases_and_layer_norms_as_f32() {
        let (tensors, config) = tiny_bert();
        let get = |name: &str| tensors[name].clone();
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::BF16, &Device::Cpu);

        let packed = Packed::load(&vb, &config, &Device::Cpu).unwrap();

        let layer = &packed.layers[0];
        for (what, w, dims) in [
            ("qkv", &layer.qkv_w, (64, 192)),
            ("attention output", &layer.out_w, (64, 64)),
            ("intermediate", &layer.inter_w, (64, 128)),
            ("output", &layer.output_w, (128, 64)),
        ] {
            assert_eq!(w.dtype(), DType::BF16, "{what} weight");
            assert_eq!(w.dims2().unwrap(), dims, "{what} weight is [in, out]");
        }
        let f32_params = [
            &layer.qkv_b,
            &layer.out_b,
            &layer.inter_b,
            &layer.output_b,
            &layer.attn_ln.weight,
            &layer.attn_ln.bias,
            &layer.out_ln.weight,
            &layer.out_ln.bias,
            &packed.emb_ln.weight,
            &packed.emb_ln.bias,
        ];
        assert!(f32_params.iter().all(|t| t.dtype() == DType::F32));
        // Bit-exact from the file, q then k then v.
        let l = "encoder.layer.0.attention.self";
        let qkv_b = Tensor::cat(
            &[
                get(&format!("{l}.query.bias")),
                get(&format!("{l}.key.bias")),
                get(&format!("{l}.value.bias")),
            ],
            0,
        )
        .unwrap();
        assert_eq!(
            layer.qkv_b.to_vec1::<f32>().unwrap(),
            qkv_b.to_vec1::<f32>().unwrap()
        );
        // The first 64 columns of the transposed QKV weight are the file's query weight.
        let wq = get(&format!("{l}.query.weight"))
            .to_dtype(DType::BF16)
            .unwrap();
        let packed_q = layer.qkv_w.narrow(1, 0, 64).unwrap().t().unwrap();
        assert_eq!(
            packed_q.to_vec2::<half::bf16>().unwrap(),
            wq.to_vec2::<half::bf16>().unwrap()
        );
    }

    #[test]
    fn the_packed_table_is_word_rows_then_positions_with_the_token_type_added() {
        let (tensors, config) = tiny_bert();
        let rows = |name: &str| tensors[name].to_vec2::<f32>().unwrap();
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);

        let packed = Packed::load(&vb, &config, &Device::Cpu).unwrap();

        assert_eq!(packed.vocab, 10);
        assert_eq!(packed.table.dims2().unwrap(), (18, 64));
        let word = rows("embeddings.word_embeddings.weight");
        let position = rows("embeddings.position_embeddings.weight");
        let token_type = rows("embeddings.token_type_embeddings.weight");
        let table = packed.table.to_vec2::<f32>().unwrap();
        assert_eq!(table[..10], word[..]);
        for (row, pos) in table[10..].iter().zip(&position) {
            let expected: Vec<f32> = pos.iter().zip(&token_type[0]).map(|(p, t)| p + t).collect();
            assert_eq!(row, &expected);
        }
    }
}
