//! The variants of a GGUF model folder and how they are made.
//!
//! A folder holds the shipped GGUF (`<base>-q4_k_m.gguf`), `tokenizer.json`, and the
//! variants made from it at install time by `kestrel-worker requantize` (candle's GGUF
//! writer): `<base>-q8_0.gguf`, `<base>-q4_0.gguf`, `<base>-f16.gguf`. The quality
//! reference of every variant is the shipped Q4_K_M weights themselves (the only
//! weights we have), not the original bf16 model.

use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Result};

/// Variants a folder can serve, the shipped one first.
pub const VARIANTS: &[&str] = &["q4_k_m", "q8_0", "q4_0", "f16"];
/// The variant shipped on PyPI (and the quality reference).
pub const SHIPPED_VARIANT: &str = "q4_k_m";

/// True when `dir` holds a GGUF model (the text-generation task).
pub fn is_gguf_folder(dir: &Path) -> bool {
    gguf_files(dir).next().is_some()
}

fn gguf_files(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
}

/// The GGUF file of `variant` in `dir`: the one whose stem ends in `-<variant>`.
pub fn variant_file(dir: &Path, variant: &str) -> std::result::Result<PathBuf, String> {
    let variant = variant.to_ascii_lowercase();
    if !VARIANTS.contains(&variant.as_str()) {
        return Err(format!(
            "unknown text-generation variant {variant:?} (known: {})",
            VARIANTS.join(", ")
        ));
    }
    let suffix = format!("-{variant}.gguf");
    let mut found: Vec<PathBuf> = gguf_files(dir)
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.to_ascii_lowercase().ends_with(&suffix))
        })
        .collect();
    found.sort();
    found.pop().ok_or_else(|| {
        format!(
            "{} has no *{suffix}: run worker/scripts/fetch-gemma to make the variants",
            dir.display()
        )
    })
}

/// The GGML type a variant name stands for (weight matrices only; norms stay f32).
pub fn variant_dtype(variant: &str) -> Option<GgmlDType> {
    match variant {
        "q8_0" => Some(GgmlDType::Q8_0),
        "q4_0" => Some(GgmlDType::Q4_0),
        "f16" => Some(GgmlDType::F16),
        "f32" => Some(GgmlDType::F32),
        _ => None,
    }
}

/// Writes `output` with every 2-D weight of `input` dequantized and quantized again as
/// `dtype`; 1-D tensors (norms) and the metadata are copied as they are.
pub fn requantize(input: &Path, output: &Path, dtype: GgmlDType) -> Result<()> {
    let mut r = std::fs::File::open(input)?;
    let ct = gguf_file::Content::read(&mut r).map_err(|e| e.with_path(input))?;
    let mut names: Vec<&String> = ct.tensor_infos.keys().collect();
    names.sort_by_key(|n| ct.tensor_infos[*n].offset);
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for name in names {
        let t = ct.tensor(&mut r, name, &Device::Cpu)?;
        let t = if t.shape().rank() == 2 && t.dtype() != dtype {
            let f = t.dequantize(&Device::Cpu)?;
            QTensor::quantize(&f, dtype)?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let mut meta: Vec<(&str, &gguf_file::Value)> =
        ct.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    meta.sort_by_key(|(k, _)| *k);
    let tmp = output.with_extension("gguf.tmp");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta, &refs)?;
        std::io::Write::flush(&mut w)?;
    }
    std::fs::rename(&tmp, output)?;
    Ok(())
}
