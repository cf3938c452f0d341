//! BERT encoder on candle (f32/f16/bf16), from `model.safetensors`.
//!
//! A compact BERT with fused QKV projection; layer norm and softmax use candle-nn's
//! fused kernels. This backend stays for the CUDA path; on CPU ONNX Runtime is faster.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::{EmbeddingBackend, EngineError, Precision, TokenBatch, mean_pool_normalize};

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
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_ln: LayerNorm,
}

pub struct CandleBert {
    word: Embedding,
    position: Embedding,
    token_type: Tensor,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    hidden: usize,
    dtype: DType,
    device: Device,
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(
        vb.get((out_dim, in_dim), "weight")?,
        Some(vb.get(out_dim, "bias")?),
    ))
}

impl CandleBert {
    pub fn load(model_dir: &Path, precision: Precision) -> Result<Self, EngineError> {
        let config_path = model_dir.join("config.json");
        let config: BertConfig = std::fs::read_to_string(&config_path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
            .map_err(|message| EngineError::ModelFile {
                path: config_path,
                message,
            })?;
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
        let device = Device::Cpu;
        // SAFETY: the weights file is mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], dtype, &device) }
            .map_err(|e| EngineError::ModelFile {
                path: weights.clone(),
                message: e.to_string(),
            })?;
        Self::from_var_builder(vb, &config, dtype, device).map_err(|e| EngineError::ModelFile {
            path: weights,
            message: e.to_string(),
        })
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
                    qkv: Linear::new(qkv_w, Some(qkv_b)),
                    attn_out: linear(a.pp("output.dense"), h, h)?,
                    attn_ln: LayerNorm::load(a.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                    intermediate: linear(l.pp("intermediate.dense"), h, inter)?,
                    output: linear(l.pp("output.dense"), inter, h)?,
                    out_ln: LayerNorm::load(l.pp("output.LayerNorm"), h, c.layer_norm_eps)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(CandleBert {
            word: Embedding::new(word_w, h),
            position: Embedding::new(pos_w, h),
            token_type: tt_w.get(0)?,
            emb_ln: LayerNorm::load(emb.pp("LayerNorm"), h, c.layer_norm_eps)?,
            layers,
            heads: c.num_attention_heads,
            hidden: h,
            dtype,
            device,
        })
    }

    fn forward(&self, batch: &TokenBatch) -> candle_core::Result<Vec<f32>> {
        let (b, l, h) = (batch.rows, batch.seq_len, self.hidden);
        let hd = h / self.heads;
        let ids = Tensor::from_slice(&batch.ids, (b, l), &self.device)?;
        let positions = Tensor::arange(0u32, l as u32, &self.device)?;
        let mut x = self
            .word
            .forward(&ids)?
            .broadcast_add(&self.position.forward(&positions)?)?
            .broadcast_add(&self.token_type)?;
        x = self.emb_ln.forward(&x)?;
        // Additive mask: 0 for real tokens, a large negative number for padding.
        let mask: Vec<f32> = batch
            .mask
            .iter()
            .map(|&m| if m == 1 { 0.0 } else { -1e4 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, l), &self.device)?.to_dtype(self.dtype)?;
        let scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers {
            let qkv = layer.qkv.forward(&x)?.reshape((b, l, 3, self.heads, hd))?;
            let qkv = qkv.permute((2, 0, 3, 1, 4))?; // [3, b, heads, l, hd]
            let q = qkv.get(0)?.contiguous()?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
            x = layer
                .attn_ln
                .forward(&(layer.attn_out.forward(&ctx)? + &x)?)?;
            let inter = layer.intermediate.forward(&x)?.gelu_erf()?;
            x = layer
                .out_ln
                .forward(&(layer.output.forward(&inter)? + &x)?)?;
        }
        x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
    }
}

impl EmbeddingBackend for CandleBert {
    fn embed(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        let hidden = self.forward(batch).map_err(EngineError::candle)?;
        Ok(mean_pool_normalize(&hidden, batch, self.hidden))
    }

    fn dimension(&self) -> usize {
        self.hidden
    }
}
