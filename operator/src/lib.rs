//! localup's Kubernetes operator: turns `TcpTunnel` resources into relay ports, tokens
//! and `localup-client` sidecars.
//!
//! - [`crd`]: the resource users write; [`keys`]: the labels and annotations it writes;
//! - [`controller`]: the reconciler (read, [`plan`], apply); [`repair`]: rolling the
//!   workloads whose pods need or must lose the sidecar, and the sweep;
//!   [`status`]: the conditions it reports;
//! - the decisions it takes, each beside its subject and free of I/O: [`allocator`]
//!   (ports, epochs, quarantine), [`guard`] (what a tunnel may do), [`token`] (tokens and
//!   their Secret), [`relay_service`] (the relay Service's ports), [`workloads`] (which
//!   pods serve, rolling their owners);
//! - [`webhook`]: injects the [`sidecar`] into new pods; [`webhook_tls`]: its certificate
//!   and its registration with the API server;
//! - [`operator`]: wires it all up, with leader election and health endpoints.

pub mod allocator;
pub mod config;
pub mod controller;
pub mod crd;
#[cfg(test)]
mod fixtures;
pub mod guard;
pub mod keys;
pub mod metrics;
pub mod operator;
pub mod plan;
pub mod relay_service;
pub mod repair;
pub mod sidecar;
pub mod status;
pub mod token;
pub mod webhook;
pub mod webhook_tls;
pub mod workloads;

/// The CustomResourceDefinition as committed in `crds/tcptunnel.yaml`.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_saphyr::to_string(&crd::TcpTunnel::crd()).expect("the CRD serializes to YAML")
}
