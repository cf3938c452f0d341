//! The committed CRD YAML must be exactly what the Rust types generate.
#[test]
fn generated_crd_yaml_is_committed() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/generated/kestrel.dev_modeldeployments.yaml"
    );
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == kestrel_crds::crds_yaml(),
        "{path} is stale: run `cargo run -p kestrel-crds --bin crdgen > {path}` and commit it"
    );
}

#[test]
fn the_api_reference_is_committed() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == kestrel_crds::apidoc::api_markdown(),
        "docs/api.md is stale: run `cargo run -p kestrel-crds --bin apidoc > docs/api.md` and commit it"
    );
}
