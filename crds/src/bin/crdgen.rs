//! Prints Kestrel's CustomResourceDefinitions as YAML (`crds/generated/` holds the output).
fn main() {
    print!("{}", kestrel_crds::crds_yaml());
}
