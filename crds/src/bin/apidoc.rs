//! Prints the API reference (docs/api.md) from the generated CRD schema.
fn main() {
    print!("{}", kestrel_crds::apidoc::api_markdown());
}
