//! With the `cuda` feature, compiles `kernels/bert.cu` to PTX for the worker's fused CUDA
//! kernels (`src/engine/cuda_ops.rs`). Needs nvcc: `$NVCC`, else `nvcc` on the PATH
//! (worker/scripts/build-cuda sets both); the target is `$CUDA_COMPUTE_CAP` (default 90,
//! Hopper). Without the feature it does nothing, so CI needs no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels/bert.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("bert.ptx");
    let status = Command::new(&nvcc)
        .args(["-ptx", "-O3", &format!("-arch=sm_{cap}"), "-o"])
        .arg(&out)
        .arg("kernels/bert.cu")
        .status()
        .unwrap_or_else(|e| panic!("running {nvcc} for kernels/bert.cu: {e} (set NVCC)"));
    assert!(
        status.success(),
        "{nvcc} failed on kernels/bert.cu: {status}"
    );
}
