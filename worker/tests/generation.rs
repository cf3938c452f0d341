//! Gemma-3-270M text generation: every variant against transformers' reference
//! (worker/data/gemma-reference.json), and batched decoding against one sequence alone.

mod common;

use kestrel_worker::textgen::model::{argmax, to_vec};
use kestrel_worker::textgen::quality::{greedy, logits_cosines, reference};
use kestrel_worker::textgen::{GemmaTokenizer, load_model};

/// Minimum cosine of the last-token logits to the reference, per variant (measured
/// values in docs/worker.md; the bound leaves a margin under each). q4_k_m's worst
/// prompt moved 0.99981 → 0.99950 when its ten Q8_0 matrices left candle's kernel for
/// the worker's (f32 activation scales instead of f16, ties to even): products of the
/// same error to the exact one (`q8::tests`), one sensitive prompt. The issue measured
/// 0.9986 for this variant.
fn min_cosine(variant: &str) -> f64 {
    match variant {
        "q4_k_m" => 0.999,
        "q8_0" => 0.999,
        "f16" => 0.9999,
        "q4_0" => 0.97,
        other => panic!("no bound for {other}"),
    }
}

fn load(variant: &str) -> (kestrel_worker::textgen::Gemma3, GemmaTokenizer) {
    load_model(common::gemma_dir(), variant, 512).expect("variant loads")
}

/// The issue's prompt, "The capital of France is", continues greedily as " the capital
/// of the country of France. It is the largest city in France…" here and in
/// transformers alike (worker/data/gemma-reference.json; Gemma-3-270M is the
/// pretrained model, not the instruction-tuned one), so the check uses a prompt that
/// leaves the model nothing but the name.
#[test]
fn every_variant_completes_the_capital_of_france_with_paris() {
    for variant in ["q4_k_m", "q8_0", "q4_0", "f16"] {
        let (model, tok) = load(variant);
        let ids = tok.encode("Q: What is the capital of France?\nA:").unwrap();
        let out = greedy(&model, &ids, 8).unwrap();
        let text = tok.decode(&out);
        eprintln!("{variant}: {text:?}");
        assert!(text.contains("Paris"), "{variant}: {text:?}");
    }
}

#[test]
fn logits_match_transformers_within_each_variants_bound() {
    let reference = reference();
    for variant in ["q4_k_m", "q8_0", "q4_0", "f16"] {
        let (model, tok) = load(variant);
        let cos = logits_cosines(&model, &tok).unwrap();
        let min = cos.iter().copied().fold(1.0, f64::min);
        eprintln!("{variant}: cosines {cos:?}");
        assert!(
            min >= min_cosine(variant),
            "{variant}: min cosine {min} < {}",
            min_cosine(variant)
        );
        if variant == "f16" {
            // f16 holds the reference's own weights: its greedy text is transformers'.
            for c in &reference.cases {
                let ids = tok.encode(&c.prompt).unwrap();
                assert_eq!(ids, c.prompt_ids, "tokenizer on {:?}", c.prompt);
                let out = greedy(&model, &ids, c.greedy_ids.len()).unwrap();
                assert_eq!(tok.decode(&out), c.greedy_text, "{:?}", c.prompt);
            }
        }
    }
}

/// Sequences decoded together get the tokens each gets alone (the batch shares the
/// matrix products, never the caches), including one that joins late.
#[test]
fn batched_decoding_matches_each_sequence_alone() {
    let (model, tok) = load("q8_0");
    let prompts = [
        "def fibonacci(n):",
        "Kubernetes is an open-source system for",
        "The quick brown fox",
    ];
    let n = 8;
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| greedy(&model, &tok.encode(p).unwrap(), n).unwrap())
        .collect();
    let mut seqs: Vec<_> = prompts.iter().map(|_| model.new_sequence()).collect();
    let mut next: Vec<u32> = Vec::new();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    // The first two start together; the third joins after three steps.
    for (i, p) in prompts.iter().enumerate().take(2) {
        let l = to_vec(
            &model
                .prefill(&mut seqs[i], &tok.encode(p).unwrap())
                .unwrap(),
        )
        .unwrap();
        next.push(argmax(&l));
        got[i].push(next[i]);
    }
    for step in 0..(n + 3) {
        if step == 3 {
            let l = to_vec(
                &model
                    .prefill(&mut seqs[2], &tok.encode(prompts[2]).unwrap())
                    .unwrap(),
            )
            .unwrap();
            next.push(argmax(&l));
            got[2].push(next[2]);
        }
        let active: Vec<usize> = (0..next.len()).filter(|&i| got[i].len() < n).collect();
        if active.is_empty() {
            break;
        }
        let tokens: Vec<u32> = active.iter().map(|&i| next[i]).collect();
        let mut refs: Vec<&mut _> = seqs
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| active.contains(i))
            .map(|(_, s)| s)
            .collect();
        let logits = model.decode(&mut refs, &tokens).unwrap();
        for (row, &i) in active.iter().enumerate() {
            let l = to_vec(&logits.get(row).unwrap()).unwrap();
            next[i] = argmax(&l);
            got[i].push(next[i]);
        }
    }
    assert_eq!(got, alone);
}
