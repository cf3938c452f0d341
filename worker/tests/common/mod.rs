//! Test setup shared by the worker's integration tests: the real model, installed on
//! demand by `worker/scripts/setup-dev` into the ignored `.cache/` folder. A test that
//! needs the model fails loudly when it cannot be installed; it never skips.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

pub struct TestEnv {
    pub model_dir: PathBuf,
    pub ort_library: PathBuf,
}

/// The model folder and ONNX Runtime library: from `KESTREL_MODEL_DIR` and
/// `ORT_DYLIB_PATH` when both are set, else from `worker/scripts/setup-dev`.
pub fn env() -> &'static TestEnv {
    static ENV: OnceLock<TestEnv> = OnceLock::new();
    ENV.get_or_init(|| {
        if let (Some(m), Some(l)) = (
            std::env::var_os("KESTREL_MODEL_DIR"),
            std::env::var_os("ORT_DYLIB_PATH"),
        ) {
            return TestEnv {
                model_dir: m.into(),
                ort_library: l.into(),
            };
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/setup-dev");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} failed (the model is required; see docs/worker.md):\n{}\n{}",
            script.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let get = |key: &str| -> PathBuf {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("{} printed no {key}: {stdout}", script.display()))
                .into()
        };
        TestEnv {
            model_dir: get("KESTREL_MODEL_DIR="),
            ort_library: get("ORT_DYLIB_PATH="),
        }
    })
}

/// The Gemma-3-270M folder (GGUF variants and tokenizer.json): from `KESTREL_GEMMA_DIR`
/// when set (CI sets it from .cache/worker.env), else from `worker/scripts/setup-dev`.
pub fn gemma_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("KESTREL_GEMMA_DIR") {
            return d.into();
        }
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/setup-dev");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{} failed (Gemma is required; see docs/worker.md):\n{}\n{}",
            script.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("KESTREL_GEMMA_DIR="))
            .unwrap_or_else(|| {
                panic!(
                    "{} printed no KESTREL_GEMMA_DIR: {stdout}",
                    script.display()
                )
            })
            .into()
    })
}
