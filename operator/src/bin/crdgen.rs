//! Prints the TcpTunnel CustomResourceDefinition derived from the Rust types:
//! `cargo run -p localup-operator --bin crdgen > crds/tcptunnel.yaml`.

fn main() {
    print!("{}", localup_operator::crd_yaml());
}
