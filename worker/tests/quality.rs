//! Embeddings of the fixed sentence set match sentence-transformers.

mod common;

use kestrel_worker::engine::{
    BackendKind, Device, LoadOptions, OrtLibrary, TextTokenizer, VariantSpec, load_backend,
};
use kestrel_worker::profile::measure_quality;

fn quality(variant: &str, backend: BackendKind) -> (f64, f64) {
    let env = common::env();
    let tokenizer = TextTokenizer::load(&env.model_dir).expect("tokenizer loads");
    let spec = VariantSpec::resolve(variant, Some(backend), Device::Cpu).expect("known variant");
    let options = LoadOptions {
        device: Device::Cpu,
        threads: 2,
        ort_library: OrtLibrary(Some(env.ort_library.clone())),
    };
    let mut model = load_backend(&env.model_dir, &spec, &options).expect("variant loads");
    let q = measure_quality(model.as_mut(), &tokenizer).expect("embeds the sentence set");
    eprintln!(
        "{variant} on {}: min cosine {:.6}, mean {:.6}",
        backend.as_str(),
        q.min_cosine,
        q.mean_cosine
    );
    (q.min_cosine, q.mean_cosine)
}

#[test]
fn candle_f32_matches_sentence_transformers() {
    let (min, _) = quality("f32", BackendKind::Candle);
    assert!(min >= 0.9999, "candle f32 min cosine {min}");
}

#[test]
fn onnx_f32_matches_sentence_transformers() {
    let (min, _) = quality("f32", BackendKind::Onnx);
    assert!(min >= 0.9999, "onnx f32 min cosine {min}");
}

#[test]
fn onnx_int8_stays_within_its_documented_bound() {
    let (min, _) = quality("int8", BackendKind::Onnx);
    let bound = kestrel_worker::engine::Precision::Int8.min_cosine_bound();
    assert!(min >= bound, "int8 min cosine {min} < documented {bound}");
}

#[test]
fn native_int8_stays_within_its_documented_bound() {
    // No skip: on a CPU without AVX512-VNNI the load fails, saying so.
    let (min, _) = quality("int8", BackendKind::Native);
    let bound = kestrel_worker::engine::Precision::Int8.min_cosine_bound();
    assert!(min >= bound, "int8 min cosine {min} < documented {bound}");
}

#[test]
fn native_int8_packs_a_mixed_batch_without_changing_its_answers() {
    let env = common::env();
    let tokenizer = TextTokenizer::load(&env.model_dir).expect("tokenizer loads");
    let spec = VariantSpec::resolve("int8", Some(BackendKind::Native), Device::Cpu).unwrap();
    let options = LoadOptions {
        device: Device::Cpu,
        threads: 2,
        ort_library: OrtLibrary(None),
    };
    let mut model = load_backend(&env.model_dir, &spec, &options).expect("variant loads");
    let sentences = kestrel_worker::corpus::bench_sentences();
    let ids: Vec<Vec<u32>> = sentences
        .iter()
        .map(|s| tokenizer.encode(s).unwrap().ids)
        .collect();
    let together =
        kestrel_worker::engine::embed_grouped(model.as_mut(), &ids, tokenizer.pad_id()).unwrap();
    for (i, seq) in ids.iter().enumerate() {
        let alone = kestrel_worker::engine::embed_grouped(
            model.as_mut(),
            std::slice::from_ref(seq),
            tokenizer.pad_id(),
        )
        .unwrap();
        let cos = kestrel_worker::engine::cosine(&alone[0], &together[i]);
        // Every step is per row (quantization blocks, outliers, norms) or per sentence
        // (attention): the batch around a sentence changes nothing but float rounding.
        assert!(cos >= 0.99999, "sentence {i}: alone vs in the batch {cos}");
    }
}

#[test]
fn the_tokenizer_pads_to_the_longest_and_truncates_at_256() {
    let env = common::env();
    let tokenizer = TextTokenizer::load(&env.model_dir).expect("tokenizer loads");
    assert_eq!(tokenizer.max_len(), 256);
    let short = tokenizer.encode("hello world").unwrap();
    assert_eq!(short.ids.len(), 4, "no fixed padding to 128");
    let long = tokenizer.encode(&"word ".repeat(400)).unwrap();
    assert_eq!(long.ids.len(), 256);
    assert_eq!(long.full_len, 402);
    assert_eq!(*long.ids.last().unwrap(), 102, "ends with [SEP]");
}
