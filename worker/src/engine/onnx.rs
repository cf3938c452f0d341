//! BERT encoder on ONNX Runtime (f32 and int8 graphs made by `scripts/export-onnx`).
//!
//! `libonnxruntime.so` is loaded at run time (the PyPI `onnxruntime` wheel ships it);
//! its path comes from `--ort-library` or `ORT_DYLIB_PATH`. Nothing is downloaded or
//! written at run time.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;

use super::{EmbeddingBackend, EngineError, TokenBatch, mean_pool_normalize, normalize};

/// Environment variable naming the ONNX Runtime shared library (ort's own convention).
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

/// Where to find `libonnxruntime.so`.
#[derive(Debug, Clone, Default)]
pub struct OrtLibrary(pub Option<PathBuf>);

impl OrtLibrary {
    /// The flag, else `ORT_DYLIB_PATH`, else `libonnxruntime.so` beside the executable
    /// (where `scripts/build-image` puts it).
    pub fn path(&self) -> Result<PathBuf, EngineError> {
        self.0
            .clone()
            .or_else(|| std::env::var_os(ORT_DYLIB_ENV).map(PathBuf::from))
            .or_else(|| {
                let beside = std::env::current_exe().ok()?.parent()?.join("libonnxruntime.so");
                beside.is_file().then_some(beside)
            })
            .ok_or_else(|| {
                EngineError::OrtLibrary(format!(
                    "no library given: pass --ort-library or set {ORT_DYLIB_ENV} to libonnxruntime.so \
                     (from the PyPI onnxruntime wheel: onnxruntime/capi/libonnxruntime.so.*)"
                ))
            })
    }
}

/// ONNX Runtime is loaded once per process; later loads reuse it.
static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

fn environment(lib: &OrtLibrary) -> Result<&'static ort::environment::Environment, EngineError> {
    let path = lib.path()?;
    ORT_ENV
        .get_or_init(|| {
            if !path.is_file() {
                return Err(format!("{} does not exist", path.display()));
            }
            ort::init_from(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .with_name("kestrel-worker")
                // No telemetry: it would also write a database under $HOME/.cache at run time.
                .with_telemetry(false)
                .build()
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::OrtLibrary(e.clone()))
}

/// `KESTREL_ORT_SPINNING=1` lets ONNX Runtime's idle threads spin (off by default).
fn spinning() -> bool {
    std::env::var("KESTREL_ORT_SPINNING").is_ok_and(|v| v == "1")
}

pub struct OnnxBert {
    session: Session,
    with_token_types: bool,
    /// The graph already pools and normalizes (`sentence_embedding` output).
    pooled_output: bool,
    output: String,
    dim: usize,
}

impl OnnxBert {
    pub fn load(path: &Path, lib: &OrtLibrary, threads: usize) -> Result<Self, EngineError> {
        let env = environment(lib)?;
        let mut builder = Session::builder(env)
            .and_then(|b| Ok(b.with_optimization_level(GraphOptimizationLevel::All)?))
            .and_then(|b| Ok(b.with_intra_threads(threads)?))
            .and_then(|b| Ok(b.with_inter_threads(1)?))
            // Spinning threads burn a pod's CPU quota and starve each other on shared cores.
            .and_then(|b| Ok(b.with_intra_op_spinning(spinning())?))
            .map_err(EngineError::ort)?;
        let session = builder
            .commit_from_file(path)
            .map_err(|e| EngineError::ModelFile {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let with_token_types = session
            .inputs()
            .iter()
            .any(|i| i.name() == "token_type_ids");
        let pooled_output = session
            .outputs()
            .iter()
            .any(|o| o.name() == "sentence_embedding");
        let output = if pooled_output {
            "sentence_embedding".to_string()
        } else {
            session.outputs()[0].name().to_string()
        };
        let mut backend = OnnxBert {
            session,
            with_token_types,
            pooled_output,
            output,
            dim: 0,
        };
        // Learn the width from one tiny run rather than trusting symbolic shapes.
        let probe = TokenBatch::pad(&[&[101, 102]], 0);
        backend.dim = backend.embed(&probe)?[0].len();
        Ok(backend)
    }
}

impl EmbeddingBackend for OnnxBert {
    fn embed(&mut self, batch: &TokenBatch) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.rows == 0 {
            return Ok(Vec::new());
        }
        let shape = [batch.rows as i64, batch.seq_len as i64];
        let ids: Vec<i64> = batch.ids.iter().map(|&v| v as i64).collect();
        let mask: Vec<i64> = batch.mask.iter().map(|&v| v as i64).collect();
        let mut inputs = ort::inputs![
            "input_ids" => Tensor::from_array((shape, ids)).map_err(EngineError::ort)?,
            "attention_mask" => Tensor::from_array((shape, mask)).map_err(EngineError::ort)?,
        ];
        if self.with_token_types {
            let types = vec![0i64; batch.rows * batch.seq_len];
            inputs.push((
                "token_type_ids".into(),
                Tensor::from_array((shape, types))
                    .map_err(EngineError::ort)?
                    .into(),
            ));
        }
        let outputs = self.session.run(inputs).map_err(EngineError::ort)?;
        let (out_shape, data) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(EngineError::ort)?;
        let dim = *out_shape.last().unwrap_or(&0) as usize;
        if self.pooled_output {
            Ok(data
                .chunks(dim)
                .map(|row| {
                    let mut v = row.to_vec();
                    normalize(&mut v);
                    v
                })
                .collect())
        } else {
            Ok(mean_pool_normalize(data, batch, dim))
        }
    }

    fn dimension(&self) -> usize {
        self.dim
    }
}
