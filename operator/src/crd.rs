//! The `TcpTunnel` custom resource: which pods get a localup-client sidecar, which of
//! their ports the tunnel exposes, and (optionally) which public port it asks for.
//! `crdgen` prints the CustomResourceDefinition derived from these types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "localup.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "localup.dev/v1alpha1";
pub const KIND: &str = "TcpTunnel";

/// The only condition type: Ready tells whether the tunnel's port is assigned, its token
/// written and its public endpoint known.
pub const READY: &str = "Ready";

/// A TCP port exposed publicly by the relay for pods that match `selector`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "localup.dev",
    version = "v1alpha1",
    kind = "TcpTunnel",
    plural = "tcptunnels",
    shortname = "tct",
    namespaced,
    status = "TcpTunnelStatus",
    printcolumn = r#"{"name":"Port","type":"integer","jsonPath":".status.remotePort"}"#,
    printcolumn = r#"{"name":"Endpoint","type":"string","jsonPath":".status.endpoint"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TcpTunnelSpec {
    /// Pods in this namespace that get the localup-client sidecar. Must not be empty.
    pub selector: LabelSelector,

    /// The pod's local port that the tunnel exposes (the client's --port).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Public port requested on the relay; must lie in the relay's port range.
    /// Omitted: the operator assigns a free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub remote_port: Option<i32>,
}

/// What the operator decided and did for a tunnel. The assigned `remotePort` is the
/// record of the assignment: the operator rebuilds its view of taken ports from it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpTunnelStatus {
    /// The public port assigned on the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<i32>,

    /// Where the tunnel is reachable from outside: the relay's public address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// The Secret holding the sidecar's token, relay address and relay CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,

    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl TcpTunnel {
    /// `namespace/name`: the token's subject and how messages name a tunnel.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or_default(),
            self.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// The public port this tunnel holds, as recorded in its status.
    pub fn assigned_port(&self) -> Option<u16> {
        self.status
            .as_ref()
            .and_then(|status| status.remote_port)
            .and_then(|port| u16::try_from(port).ok())
    }

    pub fn ready_condition(&self) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|condition| condition.type_ == READY)
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;

    use super::*;

    /// The committed CRD (and the operator chart's copy of it) must be exactly what
    /// `cargo run -p localup-operator --bin crdgen` prints for the current types.
    #[test]
    fn committed_crd_matches_the_types() {
        let generated = crate::crd_yaml();
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        for path in [
            "crds/tcptunnel.yaml",
            "charts/localup-operator/crds/tcptunnel.yaml",
        ] {
            let committed = std::fs::read_to_string(format!("{root}/{path}"))
                .unwrap_or_else(|error| panic!("cannot read {path}: {error}"));
            assert!(
                committed == generated,
                "{path} is stale: regenerate it with \
                 `cargo run -p localup-operator --bin crdgen > {path}`"
            );
        }
    }

    #[test]
    fn crd_has_the_contracted_shape() {
        let crd = TcpTunnel::crd();
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&["tct".to_owned()][..])
        );
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, VERSION);
        assert!(version.subresources.as_ref().unwrap().status.is_some());
        let columns: Vec<_> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|column| column.name.as_str())
            .collect();
        assert_eq!(columns, ["Port", "Endpoint", "Ready", "Age"]);
        let schema = serde_json::to_value(&version.schema).unwrap();
        let port = &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["port"];
        assert_eq!(
            (port["minimum"].as_f64(), port["maximum"].as_f64()),
            (Some(1.0), Some(65535.0))
        );
    }

    #[test]
    fn assigned_port_reads_the_status_record() {
        let mut tunnel = TcpTunnel::new(
            "db",
            TcpTunnelSpec {
                selector: LabelSelector::default(),
                port: 5432,
                remote_port: None,
            },
        );
        tunnel.metadata.namespace = Some("dev".into());
        assert_eq!(tunnel.key(), "dev/db");
        assert_eq!(tunnel.assigned_port(), None);
        tunnel.status = Some(TcpTunnelStatus {
            remote_port: Some(16432),
            ..Default::default()
        });
        assert_eq!(tunnel.assigned_port(), Some(16432));
    }
}
