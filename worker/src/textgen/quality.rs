//! Quality of a variant against transformers' f32 computation of the shipped Q4_K_M
//! weights (`worker/data/gemma-reference.json`, made by
//! `worker/scripts/reference_gemma.py`): the cosine of the last prompt token's logits
//! on a fixed set of token ids, and greedy continuations.

use serde::Deserialize;

use super::model::{Gemma3, argmax, to_vec};
use super::tokenizer::GemmaTokenizer;

/// The committed reference, embedded so tests and `profile` need no file path.
pub const REFERENCE_JSON: &str = include_str!("../../data/gemma-reference.json");

#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceCase {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub logit_ids: Vec<u32>,
    pub logits: Vec<f32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    pub cases: Vec<ReferenceCase>,
}

pub fn reference() -> Reference {
    serde_json::from_str(REFERENCE_JSON).expect("the committed reference parses")
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Greedy continuation of `ids` (a tokenized prompt), `n` tokens, one sequence.
pub fn greedy(model: &Gemma3, ids: &[u32], n: usize) -> candle_core::Result<Vec<u32>> {
    let mut seq = model.new_sequence();
    let mut next = argmax(&to_vec(&model.prefill(&mut seq, ids)?)?);
    let mut out = vec![next];
    while out.len() < n {
        next = argmax(&to_vec(&model.decode(&mut [&mut seq], &[next])?)?);
        out.push(next);
    }
    Ok(out)
}

/// Per reference case: cosine of the last prompt token's logits (on the reference's
/// token ids) to the reference.
pub fn logits_cosines(model: &Gemma3, tok: &GemmaTokenizer) -> candle_core::Result<Vec<f64>> {
    reference()
        .cases
        .iter()
        .map(|c| {
            let ids = tok.encode(&c.prompt).map_err(candle_core::Error::Msg)?;
            let mut seq = model.new_sequence();
            let logits = to_vec(&model.prefill(&mut seq, &ids)?)?;
            let ours: Vec<f32> = c.logit_ids.iter().map(|&i| logits[i as usize]).collect();
            Ok(cosine(&ours, &c.logits))
        })
        .collect()
}
