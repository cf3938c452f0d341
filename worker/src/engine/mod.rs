//! Inference engines: a tokenizer that turns text into token ids, and backends that
//! turn a batch of token ids into L2-normalized sentence embeddings (mean pooling).
//!
//! Everything here is synchronous and CPU/GPU bound; it never touches the network or
//! the disk after loading, and never spawns tasks. The batcher owns when it runs.

mod candle_bert;
#[cfg(feature = "cuda")]
mod cuda_ops;
mod onnx;
mod q8_bert;
mod tokenizer;

use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use candle_bert::CandleBert;
pub use onnx::{OnnxBert, OrtLibrary};
pub use q8_bert::Q8Bert;
pub use tokenizer::{Encoded, LongInput, TextTokenizer};

/// Name of the model this crate serves (the only one it knows how to load).
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2";
/// Sub-folder of the model folder that holds the ONNX variants (see `scripts/export-onnx`).
pub const ONNX_DIR: &str = "onnx";

/// Failures while loading or running a model; the message names the file or device.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("failed to read model file {path}: {message}")]
    ModelFile { path: PathBuf, message: String },
    #[error("failed to load tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("unknown variant {0:?} (known: f32, f16, bf16, int8 or q8_0)")]
    UnknownVariant(String),
    #[error(
        "variant {variant} needs {path}, which is missing: run worker/scripts/export-onnx on the model folder"
    )]
    MissingVariantFile { variant: String, path: PathBuf },
    #[error("invalid device {0:?}: expected cpu or cuda:N")]
    InvalidDevice(String),
    #[error("device {device} is unavailable: {reason}")]
    DeviceUnavailable { device: String, reason: String },
    #[error("failed to load ONNX Runtime library: {0}")]
    OrtLibrary(String),
    #[error("{backend} backend failed: {message}")]
    Backend {
        backend: &'static str,
        message: String,
    },
}

impl EngineError {
    pub(crate) fn candle(e: candle_core::Error) -> Self {
        EngineError::Backend {
            backend: "candle",
            message: e.to_string(),
        }
    }
    pub(crate) fn ort(e: impl std::fmt::Display) -> Self {
        EngineError::Backend {
            backend: "onnxruntime",
            message: e.to_string(),
        }
    }
}

/// Where a backend runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl FromStr for Device {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        s.strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| EngineError::InvalidDevice(s.to_string()))
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The shared libraries a CUDA device needs at run time, each with the names tried:
/// cudarc loads them on first use and panics when one is missing, so they are probed first.
const CUDA_LIBRARIES: &[(&str, &[&str])] = &[
    ("the NVIDIA driver", &["libcuda.so.1", "libcuda.so"]),
    ("cuBLAS", &["libcublas.so.13", "libcublas.so"]),
    ("cuBLASLt", &["libcublasLt.so.13", "libcublasLt.so"]),
    ("cuRAND", &["libcurand.so.10", "libcurand.so"]),
];

impl Device {
    /// Fails with a clear message when the device cannot be used, before any library
    /// that would panic on a missing driver is touched.
    pub fn check_available(self) -> Result<(), EngineError> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(_) if !cfg!(feature = "cuda") => Err(EngineError::DeviceUnavailable {
                device: self.to_string(),
                reason: "this kestrel-worker build has no CUDA support (CPU only; \
                         worker/scripts/build-cuda builds one with the cuda feature)"
                    .into(),
            }),
            Device::Cuda(_) => {
                for (what, names) in CUDA_LIBRARIES {
                    // SAFETY: loading a system library runs its initializers, as cudarc would.
                    let found = names
                        .iter()
                        .any(|name| unsafe { libloading::Library::new(*name) }.is_ok());
                    if !found {
                        return Err(EngineError::DeviceUnavailable {
                            device: self.to_string(),
                            reason: format!(
                                "{what} cannot be loaded (tried {}): no NVIDIA driver here, \
                                 or LD_LIBRARY_PATH lacks the CUDA 13 libraries",
                                names.join(", ")
                            ),
                        });
                    }
                }
                Ok(())
            }
        }
    }

    /// The candle device; CUDA errors (and panics inside the CUDA bindings) become
    /// [`EngineError::DeviceUnavailable`].
    pub(crate) fn candle(self) -> Result<candle_core::Device, EngineError> {
        match self {
            Device::Cpu => Ok(candle_core::Device::Cpu),
            Device::Cuda(ordinal) => {
                self.check_available()?;
                let unavailable = |reason: String| EngineError::DeviceUnavailable {
                    device: self.to_string(),
                    reason,
                };
                match std::panic::catch_unwind(|| candle_core::Device::new_cuda(ordinal)) {
                    Ok(Ok(device)) => {
                        #[cfg(feature = "cuda")]
                        {
                            let reduced = cuda_ops::set_gemm_precision(&device)
                                .map_err(|e| unavailable(e.to_string()))?;
                            tracing::info!(
                                device = %self,
                                gemm_reduced_precision = reduced,
                                "CUDA device ready"
                            );
                        }
                        Ok(device)
                    }
                    Ok(Err(e)) => Err(unavailable(e.to_string())),
                    Err(panic) => Err(unavailable(
                        panic
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "the CUDA bindings panicked".into()),
                    )),
                }
            }
        }
    }
}

/// The numeric precision a variant computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    F16,
    Bf16,
    Int8,
}

impl Precision {
    /// The documented floor of the minimum cosine to the f32 reference on the crate's
    /// sentence set (measured by `profile`, asserted by the quality tests).
    pub fn min_cosine_bound(self) -> f64 {
        match self {
            Precision::F32 => 0.9999,
            Precision::F16 | Precision::Bf16 => 0.999,
            // Mixed int8 (per-token smoothed where activations have outliers, f32 where
            // nothing int8 holds): 0.9993 measured; see docs/worker.md.
            Precision::Int8 => 0.999,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        }
    }
}

/// Which implementation runs a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// candle, from `model.safetensors` (CPU now; the CUDA path later).
    Candle,
    /// ONNX Runtime, from `onnx/*.onnx`.
    Onnx,
    /// The worker's own int8 BERT on its Q8_0 kernel (CPU with AVX512-VNNI), from
    /// `model.safetensors`.
    Native,
}

impl FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "candle" => Ok(BackendKind::Candle),
            "onnx" => Ok(BackendKind::Onnx),
            "native" => Ok(BackendKind::Native),
            other => Err(format!("unknown backend {other:?} (candle, onnx, native)")),
        }
    }
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Candle => "candle",
            BackendKind::Onnx => "onnx",
            BackendKind::Native => "native",
        }
    }
}

/// A servable variant: a name the operator uses, its precision and the backend that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantSpec {
    pub name: String,
    pub precision: Precision,
    pub backend: BackendKind,
}

impl VariantSpec {
    /// Resolves a variant name. `backend` forces a backend; otherwise int8 runs on the
    /// worker's own kernel where the CPU has AVX512-VNNI ([`Q8Bert`]) and on ONNX
    /// Runtime elsewhere, f32 on ONNX Runtime on CPU (the faster engine here), and the
    /// rest on candle.
    pub fn resolve(
        name: &str,
        backend: Option<BackendKind>,
        device: Device,
    ) -> Result<Self, EngineError> {
        let precision = match name {
            "f32" => Precision::F32,
            "f16" => Precision::F16,
            "bf16" => Precision::Bf16,
            // q8_0 is the ModelDeployment API's name for 8-bit weights.
            "int8" | "q8_0" => Precision::Int8,
            other => return Err(EngineError::UnknownVariant(other.to_string())),
        };
        let default_backend = match (precision, device) {
            (Precision::Int8, Device::Cpu) if crate::q8::Q8Matrix::supported() => {
                BackendKind::Native
            }
            (Precision::Int8, _) => BackendKind::Onnx,
            (Precision::F32, Device::Cpu) => BackendKind::Onnx,
            _ => BackendKind::Candle,
        };
        let backend = backend.unwrap_or(default_backend);
        let supported = matches!(
            (backend, precision),
            (
                BackendKind::Candle,
                Precision::F32 | Precision::F16 | Precision::Bf16
            ) | (BackendKind::Onnx, Precision::F32 | Precision::Int8)
                | (BackendKind::Native, Precision::Int8)
        );
        if backend != BackendKind::Candle && device != Device::Cpu {
            return Err(EngineError::Backend {
                backend: backend.as_str(),
                message: format!(
                    "variant {name} runs on the {} backend, which this worker runs on CPU \
                     only (on {device} serve f32, f16 or bf16)",
                    backend.as_str()
                ),
            });
        }
        if !supported {
            return Err(EngineError::Backend {
                backend: backend.as_str(),
                message: format!("variant {name} is not available on this backend"),
            });
        }
        Ok(VariantSpec {
            name: name.to_string(),
            precision,
            backend,
        })
    }

    /// The ONNX file of an ONNX variant, relative to the model folder.
    pub fn onnx_file(&self) -> &'static str {
        match self.precision {
            Precision::Int8 => "model_int8.onnx",
            _ => "model.onnx",
        }
    }
}

/// A padded batch of token ids, row-major `[rows, seq_len]`, ready for a backend.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub mask: Vec<u32>,
}

impl TokenBatch {
    /// Pads sequences to the longest one (never to a fixed length: padding costs time).
    pub fn pad(seqs: &[&[u32]], pad_id: u32) -> Self {
        let rows = seqs.len();
        let seq_len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; rows * seq_len];
        let mut mask = vec![0u32; rows * seq_len];
        for (r, s) in seqs.iter().enumerate() {
            ids[r * seq_len..r * seq_len + s.len()].copy_from_slice(s);
            mask[r * seq_len..r * seq_len + s.len()].fill(1);
        }
        TokenBatch {
            rows,
            seq_len,
            ids,
            mask,
        }
    }
}

/// Padded tokens allowed per real token inside one engine call, by default.
pub const PADDING_SLACK: f64 = 1.25;

/// Embeds sequences in groups of similar length: sorted by length and cut where
/// padding to the group's longest would exceed the backend's padding slack. Short and long
/// inputs in one batch then cost what they would alone, while groups stay large
/// enough for efficient matrix products. Outputs are in input order.
pub fn embed_grouped<S: AsRef<[u32]>>(
    backend: &mut dyn EmbeddingBackend,
    seqs: &[S],
    pad_id: u32,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let slack = backend.padding_slack();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| seqs[i].as_ref().len());
    let mut out: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
    let mut start = 0;
    while start < order.len() {
        let (mut end, mut real) = (start, 0usize);
        while end < order.len() {
            let len = seqs[order[end]].as_ref().len();
            let rows = end - start + 1;
            if end > start && (len * rows) as f64 > slack * (real + len) as f64 {
                break;
            }
            real += len;
            end += 1;
        }
        let group: Vec<&[u32]> = order[start..end]
            .iter()
            .map(|&i| seqs[i].as_ref())
            .collect();
        let embedded = backend.embed(&TokenBatch::pad(&group, pad_id))?;
        for (&i, e) in order[start..end].iter().zip(embedded) {
            out[i] = Some(e);
        }
        start = end;
    }
    Ok(out
        .into_iter()
        .map(|e| e.expect("every input embedded"))
        .collect())
}

/// One loaded model variant: token ids in, normalized embeddings out.
pub trait EmbeddingBackend: Send {
    /// Embeds every row of `batch`; returns `rows` vectors of the model's dimension,
    /// mean-pooled over real tokens and L2-normalized.
    fn embed(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, EngineError>;
    /// Width of the embeddings.
    fn dimension(&self) -> usize;
    /// Padded tokens allowed per real token in one call (see [`embed_grouped`]): where a
    /// call's fixed cost dominates (a GPU's kernel launches), fewer larger calls win.
    fn padding_slack(&self) -> f64 {
        PADDING_SLACK
    }
}

/// What `load` needs besides the variant.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Threads for intra-op parallelism (0: the backend's default).
    pub threads: usize,
    pub ort_library: OrtLibrary,
}

/// Loads the variant's backend from the model folder.
pub fn load_backend(
    model_dir: &Path,
    variant: &VariantSpec,
    options: &LoadOptions,
) -> Result<Box<dyn EmbeddingBackend>, EngineError> {
    options.device.check_available()?;
    match variant.backend {
        BackendKind::Candle => Ok(Box::new(CandleBert::load(
            model_dir,
            variant.precision,
            options.device.candle()?,
        )?)),
        BackendKind::Native => Ok(Box::new(Q8Bert::load(model_dir)?)),
        BackendKind::Onnx => {
            let path = model_dir.join(ONNX_DIR).join(variant.onnx_file());
            if !path.is_file() {
                return Err(EngineError::MissingVariantFile {
                    variant: variant.name.clone(),
                    path,
                });
            }
            Ok(Box::new(OnnxBert::load(
                &path,
                &options.ort_library,
                options.threads,
            )?))
        }
    }
}

/// The model folder's `config.json` as `T` (each backend reads the fields it needs).
pub(crate) fn read_config<T: serde::de::DeserializeOwned>(
    model_dir: &Path,
) -> Result<T, EngineError> {
    let path = model_dir.join("config.json");
    std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))
        .map_err(|message| EngineError::ModelFile { path, message })
}

/// Mean-pools `[rows, seq_len, dim]` hidden states over real tokens and L2-normalizes.
pub(crate) fn mean_pool_normalize(hidden: &[f32], batch: &TokenBatch, dim: usize) -> Vec<Vec<f32>> {
    (0..batch.rows)
        .map(|r| {
            let mut acc = vec![0f32; dim];
            let mut count = 0f32;
            for t in 0..batch.seq_len {
                if batch.mask[r * batch.seq_len + t] == 0 {
                    continue;
                }
                count += 1.0;
                let h = &hidden[(r * batch.seq_len + t) * dim..][..dim];
                acc.iter_mut().zip(h).for_each(|(a, x)| *a += x);
            }
            let count = count.max(1e-9);
            acc.iter_mut().for_each(|a| *a /= count);
            normalize(&mut acc);
            acc
        })
        .collect()
}

/// L2-normalizes in place (a zero vector stays zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_cuda_fails_clearly() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda:1".parse::<Device>().unwrap(), Device::Cuda(1));
        assert!("gpu".parse::<Device>().is_err());
        // No driver here (CI), or no cuda feature: a clear error, never a panic.
        let err = Device::Cuda(0).check_available().unwrap_err().to_string();
        assert!(err.contains("cuda:0"), "{err}");
        let err = Device::Cuda(0).candle().unwrap_err().to_string();
        assert!(err.contains("cuda:0"), "{err}");
    }

    #[test]
    fn variants_resolve_to_backends() {
        let f32 = VariantSpec::resolve("f32", None, Device::Cpu).unwrap();
        assert_eq!(f32.backend, BackendKind::Onnx);
        let c = VariantSpec::resolve("f32", Some(BackendKind::Candle), Device::Cpu).unwrap();
        assert_eq!(c.backend, BackendKind::Candle);
        assert!(VariantSpec::resolve("int8", Some(BackendKind::Candle), Device::Cpu).is_err());
        let int8 = VariantSpec::resolve("q8_0", None, Device::Cpu).unwrap();
        let native = crate::q8::Q8Matrix::supported();
        assert_eq!(
            int8.backend,
            if native {
                BackendKind::Native
            } else {
                BackendKind::Onnx
            }
        );
        assert!(VariantSpec::resolve("f32", Some(BackendKind::Native), Device::Cpu).is_err());
        assert!(VariantSpec::resolve("q4", None, Device::Cpu).is_err());
        let gpu = VariantSpec::resolve("f32", None, Device::Cuda(0)).unwrap();
        assert_eq!(gpu.backend, BackendKind::Candle);
        let err = VariantSpec::resolve("int8", None, Device::Cuda(0)).unwrap_err();
        assert!(err.to_string().contains("CPU only"), "{err}");
    }

    #[test]
    fn padding_is_to_the_longest_row() {
        let b = TokenBatch::pad(&[&[1, 2, 3], &[4]], 0);
        assert_eq!((b.rows, b.seq_len), (2, 3));
        assert_eq!(b.ids, vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(b.mask, vec![1, 1, 1, 1, 0, 0]);
    }

    #[test]
    fn pooling_ignores_padding() {
        let b = TokenBatch::pad(&[&[1, 2], &[3]], 0);
        // row 0: tokens (1,0),(0,1) → mean (0.5,0.5); row 1: (2,0) then padding (9,9).
        let hidden = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 9.0, 9.0];
        let out = mean_pool_normalize(&hidden, &b, 2);
        assert!((out[0][0] - 0.70710677).abs() < 1e-6);
        assert_eq!(out[1], vec![1.0, 0.0]);
    }
}
