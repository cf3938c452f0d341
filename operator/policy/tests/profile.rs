//! The worker profile schema: the committed default parses, bad ones are refused.

use kestrel_policy::profile::{
    GenerationShape, PROFILE_SCHEMA, ProfileError, TEXT_GENERATION, WorkerProfile,
};

const DEFAULT: &str = include_str!("../../../worker/profiles/cpu-2core-xeon.json");

#[test]
fn the_measured_minilm_profile_parses_into_capacities() {
    let p = WorkerProfile::from_json(DEFAULT).unwrap();
    assert_eq!(p.schema, PROFILE_SCHEMA);
    let f32 = p.variant("f32").unwrap().capacity();
    let int8 = p.variant("int8").unwrap().capacity();
    // Measured on the 2-core Xeon (docs/benchmarks.md): f32 ~400 inputs/s at batch 64,
    // the native int8 about 1.9× that, at a cosine of at least 0.999.
    assert!(f32.items_per_second > 300.0 && f32.items_per_second < 500.0);
    assert!(int8.items_per_second > 1.5 * f32.items_per_second);
    assert_eq!(f32.max_batch(), 64);
    let loss = p.variant("int8").unwrap().quality.quality_loss;
    assert!(loss > 0.0 && loss < 0.001, "{loss}");
}

#[test]
fn bad_profiles_are_refused_with_a_reason() {
    let wrong_schema = DEFAULT.replace(PROFILE_SCHEMA, "kestrel.dev/worker-profile/v0");
    assert!(matches!(
        WorkerProfile::from_json(&wrong_schema),
        Err(ProfileError::Schema { .. })
    ));
    let mut v: serde_json::Value = serde_json::from_str(DEFAULT).unwrap();
    v["variants"][0]["batches"] = serde_json::json!([]);
    let err = WorkerProfile::from_json(&v.to_string()).unwrap_err();
    assert!(
        err.to_string()
            .contains("\"f32\" has no batch measurements"),
        "{err}"
    );
    assert!(matches!(
        WorkerProfile::from_json("{"),
        Err(ProfileError::Parse(_))
    ));
}

#[test]
fn a_profile_round_trips() {
    let p = WorkerProfile::from_json(DEFAULT).unwrap();
    let back = WorkerProfile::from_json(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(p, back);
}

#[test]
fn a_profile_variant_becomes_a_variant_spec() {
    let p = WorkerProfile::from_json(DEFAULT).unwrap();
    let spec = p.variant("int8").unwrap().spec(0.6, true);
    assert_eq!(spec.name, "int8");
    assert_eq!(spec.price_per_replica_hour, 0.6);
    assert_eq!(
        spec.quality_loss,
        p.variant("int8").unwrap().quality.quality_loss
    );
    assert_eq!(spec.capacity, p.variant("int8").unwrap().capacity());
}

const GEMMA: &str = include_str!("../../../worker/profiles/gemma-cpu-2core-xeon.json");

fn shape(generated_tokens: f64, first_token_slo: bool) -> GenerationShape {
    GenerationShape {
        prompt_tokens: None,
        generated_tokens,
        first_token_slo,
    }
}

#[test]
fn a_text_generation_profile_becomes_a_capacity_in_requests() {
    let p = WorkerProfile::from_json(GEMMA).unwrap();
    assert_eq!(p.task, TEXT_GENERATION);
    let q8 = p.variant("q8_0").unwrap();
    let g = q8.generation.as_ref().unwrap();
    let step = |b: u32| {
        q8.batches
            .iter()
            .find(|x| x.batch_size == b)
            .unwrap()
            .latency_ms
    };
    let short = q8.request_capacity(&shape(16.0, false)).unwrap();
    let long = q8.request_capacity(&shape(256.0, false)).unwrap();
    // One request alone: its prompt pass, then one step per generated token.
    let alone = short.batch_latency_ms(1.0);
    assert!(
        (alone - (g.ttft_ms + 16.0 * step(1))).abs() < 1e-9,
        "{alone}"
    );
    // Longer answers serve fewer requests per second, far fewer than tokens per second.
    assert!(long.items_per_second < short.items_per_second / 4.0);
    assert!(short.items_per_second < q8.capacity().items_per_second / 10.0);
    // A first-token SLO predicts the prompt pass and a step, not the whole answer.
    let ttft = q8.request_capacity(&shape(256.0, true)).unwrap();
    assert_eq!(ttft.items_per_second, long.items_per_second);
    let idle = ttft.predict_p95_ms(0.0, 1.0).unwrap();
    assert!((idle - 2.0 * (g.ttft_ms + step(1))).abs() < 1e-9, "{idle}");
    assert!(long.predict_p95_ms(0.0, 1.0).unwrap() > 10.0 * idle);
}

#[test]
fn observed_prompt_lengths_set_the_prompt_pass() {
    let p = WorkerProfile::from_json(GEMMA).unwrap();
    let q8 = p.variant("q8_0").unwrap();
    let g = q8.generation.as_ref().unwrap();
    let long_prompts = GenerationShape {
        prompt_tokens: Some(512.0),
        ..shape(16.0, true)
    };
    let c = q8.request_capacity(&long_prompts).unwrap();
    let prefill = 512.0 * 1000.0 / g.prompt_tokens_per_second;
    assert!((c.slo_latency_ms(1.0) - (prefill + q8.batches[0].latency_ms)).abs() < 1e-9);
    // Embeddings variants have no generation figures.
    let minilm = WorkerProfile::from_json(DEFAULT).unwrap();
    assert!(
        minilm.variants[0]
            .request_capacity(&shape(16.0, true))
            .is_none()
    );
}

#[test]
fn a_text_generation_profile_without_generation_figures_is_refused() {
    let mut v: serde_json::Value = serde_json::from_str(GEMMA).unwrap();
    v["variants"][1]
        .as_object_mut()
        .unwrap()
        .remove("generation");
    let err = WorkerProfile::from_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("no generation figures"), "{err}");
    v["variants"][1]["generation"] = serde_json::json!({
        "prompt_tokens_per_second": 0.0, "generated_tokens_per_second": 1.0,
        "ttft_ms": 10.0, "weight_bytes": 1
    });
    let err = WorkerProfile::from_json(&v.to_string()).unwrap_err();
    assert!(err.to_string().contains("prompt speed"), "{err}");
}
