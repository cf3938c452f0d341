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
        TestEnv {
            model_dir: setup_dev("KESTREL_MODEL_DIR"),
            ort_library: setup_dev("ORT_DYLIB_PATH"),
        }
    })
}

/// The Gemma-3-270M folder (GGUF variants and tokenizer.json): from `KESTREL_GEMMA_DIR`
/// when set (CI sets it from .cache/worker.env), else from `worker/scripts/setup-dev`.
pub fn gemma_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| match std::env::var_os("KESTREL_GEMMA_DIR") {
        Some(d) => d.into(),
        None => setup_dev("KESTREL_GEMMA_DIR"),
    })
}

/// The value `worker/scripts/setup-dev` prints for `key` (`KEY=value` lines). The script
/// installs the models on first use and runs at most once per test binary.
fn setup_dev(key: &str) -> PathBuf {
    static OUT: OnceLock<String> = OnceLock::new();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/setup-dev");
    let stdout = OUT.get_or_init(|| {
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", script.display()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{} failed (the models are required; see docs/worker.md):\n{}\n{}",
            script.display(),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    });
    let prefix = format!("{key}=");
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{} printed no {key}: {stdout}", script.display()))
        .into()
}
