//! The worker profile schema: the committed default parses, bad ones are refused.

use kestrel_policy::profile::{PROFILE_SCHEMA, ProfileError, WorkerProfile};

const DEFAULT: &str = include_str!("../profiles/minilm-cpu.json");

#[test]
fn the_committed_default_profile_parses_into_capacities() {
    let p = WorkerProfile::from_json(DEFAULT).unwrap();
    assert_eq!(p.schema, PROFILE_SCHEMA);
    let f32 = p.variant("f32").unwrap().capacity();
    let int8 = p.variant("int8").unwrap().capacity();
    assert!(f32.items_per_second > 100.0 && f32.items_per_second < 200.0);
    assert!(int8.items_per_second > f32.items_per_second);
    assert_eq!(f32.max_batch(), 32);
    assert!((p.variant("int8").unwrap().quality.quality_loss - 0.0005).abs() < 1e-12);
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
    assert!((spec.quality_loss - 0.0005).abs() < 1e-12);
    assert_eq!(spec.capacity, p.variant("int8").unwrap().capacity());
}
