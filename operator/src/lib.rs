//! localup's Kubernetes operator: turns `TcpTunnel` resources into relay ports, tokens
//! and `localup-client` sidecars.
//!
//! - [`crd`]: the resource users write; [`allocator`]: which port a tunnel gets;
//! - [`controller`]: the reconciler that assigns ports, writes tokens, updates the relay
//!   Service and reports status; [`status`]: the Ready condition it reports;
//! - [`webhook`]: injects the sidecar into new pods; [`webhook_tls`]: its certificate
//!   and its registration with the API server;
//! - [`resources`]: pure builders for every object the operator writes;
//! - [`operator`]: wires it all up, with leader election and health endpoints.

pub mod allocator;
pub mod config;
pub mod controller;
pub mod crd;
pub mod health;
pub mod metrics;
pub mod operator;
pub mod resources;
pub mod status;
pub mod webhook;
pub mod webhook_tls;

/// The CustomResourceDefinition as committed in `crds/tcptunnel.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&crd::TcpTunnel::crd()).expect("the CRD serializes to YAML")
}
