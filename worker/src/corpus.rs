//! The fixed sentence set shipped with the crate and its sentence-transformers
//! reference embeddings (made once by `scripts/reference_embeddings.py`).

use base64::Engine as _;

/// One sentence per line; the last one is far beyond the 256-token maximum.
pub const SENTENCES: &str = include_str!("../data/sentences.txt");
/// `{"sentences": [...], "embeddings_f32le_base64": [...]}` from sentence-transformers.
pub const REFERENCE: &str = include_str!("../data/reference-embeddings.json");

/// The quality sentence set.
pub fn sentences() -> Vec<&'static str> {
    SENTENCES
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect()
}

/// Sentences for throughput runs: the quality set without its over-long input
/// (typical embedding traffic: 3 to 60 tokens, mean about 20).
pub fn bench_sentences() -> Vec<&'static str> {
    sentences().into_iter().filter(|s| s.len() < 400).collect()
}

/// Reference embeddings, in the order of [`sentences`].
pub fn reference_embeddings() -> Vec<Vec<f32>> {
    let value: serde_json::Value = serde_json::from_str(REFERENCE).expect("reference file is JSON");
    let sentences = value["sentences"].as_array().expect("sentences array");
    assert_eq!(
        sentences.len(),
        self::sentences().len(),
        "reference file matches sentences.txt"
    );
    value["embeddings_f32le_base64"]
        .as_array()
        .expect("embeddings array")
        .iter()
        .map(|b| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b.as_str().expect("base64 string"))
                .expect("valid base64");
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reference_matches_the_sentence_set() {
        let refs = super::reference_embeddings();
        assert_eq!(refs.len(), super::sentences().len());
        assert!(refs.iter().all(|e| e.len() == 384));
        assert_eq!(super::bench_sentences().len(), super::sentences().len() - 1);
    }
}
