//! The `TcpTunnel` custom resource: which pods get a localup-client sidecar, which of
//! their ports the tunnel exposes, which public port it asks for, and the access policy
//! the relay enforces for it. `crdgen` prints the CustomResourceDefinition derived from
//! these types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use localup_protocol::proxy_header::ProxyProtocol;
use localup_protocol::token::TunnelPolicy;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "localup.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "localup.dev/v1alpha1";
pub const KIND: &str = "TcpTunnel";

/// Condition: the tunnel can serve. Its port is assigned, its token Secret written and
/// the relay Service carries the port. Only then does the webhook inject its sidecar.
pub const PROVISIONED: &str = "Provisioned";
/// Condition: the tunnel serves. Provisioned, its public address known, and every pod
/// it selects runs a sidecar that has joined the relay.
pub const READY: &str = "Ready";

/// An IPv4 or IPv6 network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), as the API
/// server checks `spec.allowedSourceRanges` (Go RE2 syntax, which Rust's regex shares).
pub const CIDR_PATTERN: &str = concat!(
    r"^(",
    r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])/(3[0-2]|[12]?[0-9])",
    r"|",
    r"(([0-9a-fA-F]{1,4}:){7}[0-9a-fA-F]{1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,7}:",
    r"|([0-9a-fA-F]{1,4}:){1,6}:[0-9a-fA-F]{1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,5}(:[0-9a-fA-F]{1,4}){1,2}",
    r"|([0-9a-fA-F]{1,4}:){1,4}(:[0-9a-fA-F]{1,4}){1,3}",
    r"|([0-9a-fA-F]{1,4}:){1,3}(:[0-9a-fA-F]{1,4}){1,4}",
    r"|([0-9a-fA-F]{1,4}:){1,2}(:[0-9a-fA-F]{1,4}){1,5}",
    r"|[0-9a-fA-F]{1,4}:(:[0-9a-fA-F]{1,4}){1,6}",
    r"|:((:[0-9a-fA-F]{1,4}){1,7}|:))",
    r"/(12[0-8]|1[01][0-9]|[1-9]?[0-9])",
    r")$"
);

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
    printcolumn = r#"{"name":"Clients","type":"string","jsonPath":".status.clients"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Proxy","type":"string","priority":1,"jsonPath":".spec.proxyProtocol"}"#,
    printcolumn = r#"{"name":"Sources","type":"string","priority":1,"jsonPath":".spec.allowedSourceRanges"}"#,
    printcolumn = r#"{"name":"MaxConn","type":"integer","priority":1,"jsonPath":".spec.limits.maxConnections"}"#,
    printcolumn = r#"{"name":"In B/s","type":"integer","priority":1,"jsonPath":".spec.limits.bandwidthIn"}"#,
    printcolumn = r#"{"name":"Out B/s","type":"integer","priority":1,"jsonPath":".spec.limits.bandwidthOut"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TcpTunnelSpec {
    /// Pods in this namespace that get the localup-client sidecar. Must name at least one
    /// label the pods have (matchLabels, or an In or Exists expression).
    pub selector: LabelSelector,

    /// The pod's local port that the tunnel exposes (the client's --port).
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Public port requested on the relay; must lie in the relay's port range.
    /// Omitted: the operator assigns a free one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub remote_port: Option<i32>,

    /// Put a PROXY protocol header (v1: text, v2: binary) in front of each connection
    /// to the pod's port, so the service sees the external client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "proxy_protocol_schema")]
    pub proxy_protocol: Option<ProxyProtocolVersion>,

    /// Only connections from these networks (CIDR, IPv4 or IPv6) reach the tunnel;
    /// omitted: from anywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64), inner(pattern(CIDR_PATTERN)))]
    pub allowed_source_ranges: Option<Vec<String>>,

    /// Limits the relay enforces for the tunnel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<TunnelLimits>,
}

/// `v1` or `v2`: an enum the API server checks (an optional field is omitted, never
/// null, so the schema lists no null).
fn proxy_protocol_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "string", "enum": ["v1", "v2"]})
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    V1,
    V2,
}

impl From<ProxyProtocolVersion> for ProxyProtocol {
    fn from(version: ProxyProtocolVersion) -> Self {
        match version {
            ProxyProtocolVersion::V1 => ProxyProtocol::V1,
            ProxyProtocolVersion::V2 => ProxyProtocol::V2,
        }
    }
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TunnelLimits {
    /// Concurrent external connections; more are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<i32>,

    /// Bytes per second towards the pods, summed over the tunnel's connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bandwidth_in: Option<i64>,

    /// Bytes per second from the pods back to external clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub bandwidth_out: Option<i64>,
}

/// What the operator decided and did for a tunnel. The assigned `remotePort` is the
/// record of the assignment: the operator rebuilds its view of taken ports from it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpTunnelStatus {
    /// The public port assigned on the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_port: Option<i32>,

    /// When the port was assigned to this tunnel (Unix milliseconds); carried by its
    /// tokens, so that the relay refuses the tokens of the port's earlier holders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_epoch: Option<i64>,

    /// Where the tunnel is reachable from outside: the relay's public address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,

    /// The relay's control address (HOST:PORT) the sidecars dial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_address: Option<String>,

    /// The Secret holding the sidecar's token and the relay's CA certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<String>,

    /// When the token in the Secret expires; it is replaced at half its lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_expires_at: Option<Time>,

    /// A digest of everything the token Secret was written from (port, epoch, policy,
    /// relay address, relay certificate and signing secret): when it changes, the
    /// Secret is written again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_digest: Option<String>,

    /// Pods serving the tunnel / pods that should: `2/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<String>,

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
            .filter(|port| *port != 0)
    }

    /// When the held port was assigned (Unix milliseconds).
    pub fn port_epoch(&self) -> Option<u64> {
        self.status
            .as_ref()
            .and_then(|status| status.port_epoch)
            .and_then(|epoch| u64::try_from(epoch).ok())
    }

    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status
            .as_ref()?
            .conditions
            .iter()
            .find(|condition| condition.type_ == type_)
    }

    /// Whether the tunnel can serve: the webhook injects its sidecar only then.
    pub fn is_provisioned(&self) -> bool {
        self.condition(PROVISIONED)
            .is_some_and(|condition| condition.status == "True")
            && self.assigned_port().is_some()
    }

    pub fn is_deleting(&self) -> bool {
        self.metadata.deletion_timestamp.is_some()
    }

    /// The access policy the relay enforces, from the spec. Source ranges that do not
    /// parse are an error naming them (the schema refuses them already; this guards
    /// against a CRD installed without it).
    pub fn policy(&self) -> Result<TunnelPolicy, String> {
        let allow_from = match &self.spec.allowed_source_ranges {
            None => None,
            Some(ranges) => Some(
                ranges
                    .iter()
                    .map(|range| {
                        range.parse().map_err(|_| {
                            format!("spec.allowedSourceRanges: {range:?} is not a CIDR network")
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        };
        let limits = self.spec.limits.clone().unwrap_or_default();
        let positive = |name: &str, value: Option<i64>| match value {
            Some(value) if value < 1 => Err(format!("spec.limits.{name} must be at least 1")),
            other => Ok(other.map(|value| value as u64)),
        };
        Ok(TunnelPolicy {
            proxy_protocol: self.spec.proxy_protocol.map(Into::into),
            allow_from,
            max_connections: positive("maxConnections", limits.max_connections.map(i64::from))?
                .map(|value| u32::try_from(value).unwrap_or(u32::MAX)),
            bandwidth_in: positive("bandwidthIn", limits.bandwidth_in)?,
            bandwidth_out: positive("bandwidthOut", limits.bandwidth_out)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use kube::CustomResourceExt;
    use serde_json::Value;

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

    fn spec_schema() -> Value {
        let crd = TcpTunnel::crd();
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        schema["openAPIV3Schema"]["properties"]["spec"].clone()
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
            .map(|column| (column.name.as_str(), column.priority.unwrap_or(0)))
            .collect();
        assert_eq!(
            columns,
            [
                ("Port", 0),
                ("Endpoint", 0),
                ("Clients", 0),
                ("Ready", 0),
                ("Age", 0),
                ("Reason", 1),
                ("Proxy", 1),
                ("Sources", 1),
                ("MaxConn", 1),
                ("In B/s", 1),
                ("Out B/s", 1),
            ]
        );
        let spec = spec_schema();
        let port = &spec["properties"]["port"];
        assert_eq!(
            (port["minimum"].as_f64(), port["maximum"].as_f64()),
            (Some(1.0), Some(65535.0))
        );
    }

    #[test]
    fn the_schema_constrains_the_policy_fields() {
        let spec = spec_schema();
        let proxy = &spec["properties"]["proxyProtocol"];
        let values: Vec<_> = proxy["enum"]
            .as_array()
            .unwrap_or_else(|| panic!("proxyProtocol is an enum: {proxy}"))
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(values, ["v1", "v2"]);
        let ranges = &spec["properties"]["allowedSourceRanges"];
        assert_eq!(ranges["maxItems"].as_u64(), Some(64));
        assert_eq!(ranges["items"]["pattern"].as_str(), Some(CIDR_PATTERN));
        let limits = &spec["properties"]["limits"]["properties"];
        for field in ["maxConnections", "bandwidthIn", "bandwidthOut"] {
            assert_eq!(limits[field]["minimum"].as_f64(), Some(1.0), "{field}");
            assert_eq!(limits[field]["type"].as_str(), Some("integer"), "{field}");
        }
    }

    /// The pattern the API server applies to each source range, run against examples
    /// (Go's RE2 and Rust's regex agree on this syntax).
    #[test]
    fn the_cidr_pattern_accepts_networks_and_refuses_the_rest() {
        let spec = spec_schema();
        let pattern = spec["properties"]["allowedSourceRanges"]["items"]["pattern"]
            .as_str()
            .unwrap();
        let regex = regex::Regex::new(pattern).unwrap();
        for good in [
            "10.0.0.0/8",
            "192.168.1.7/32",
            "0.0.0.0/0",
            "203.0.113.0/24",
            "2001:db8::/32",
            "::/0",
            "::1/128",
            "fe80::1:2/64",
            "2001:0db8:0000:0000:0000:0000:0000:0001/128",
        ] {
            assert!(regex.is_match(good), "{good} must be accepted");
            let parsed: Result<ipnet::IpNet, _> = good.parse();
            assert!(parsed.is_ok(), "{good} parses as the operator reads it");
        }
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "256.0.0.0/8",
            "10.0.0/8",
            "2001:db8::/129",
            "2001:db8:::/32",
            "example.com/8",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
            "",
        ] {
            assert!(!regex.is_match(bad), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_spec_becomes_the_policy_the_relay_enforces() {
        let mut tunnel = TcpTunnel::test();
        assert_eq!(tunnel.policy(), Ok(TunnelPolicy::default()));
        tunnel.spec.proxy_protocol = Some(ProxyProtocolVersion::V2);
        tunnel.spec.allowed_source_ranges = Some(vec!["10.0.0.0/8".into(), "::1/128".into()]);
        tunnel.spec.limits = Some(TunnelLimits {
            max_connections: Some(5),
            bandwidth_in: Some(1_000_000),
            bandwidth_out: None,
        });
        let policy = tunnel.policy().unwrap();
        assert_eq!(policy.proxy_protocol, Some(ProxyProtocol::V2));
        assert_eq!(policy.allow_from.as_ref().map(Vec::len), Some(2));
        assert_eq!(policy.max_connections, Some(5));
        assert_eq!(policy.bandwidth_in, Some(1_000_000));
        assert_eq!(policy.bandwidth_out, None);

        tunnel.spec.allowed_source_ranges = Some(vec!["nonsense".into()]);
        assert!(tunnel.policy().unwrap_err().contains("nonsense"));
    }

    #[test]
    fn assigned_port_reads_the_status_record() {
        let mut tunnel = TcpTunnel::test();
        assert_eq!(tunnel.key(), "dev/mydb");
        assert_eq!(tunnel.assigned_port(), None);
        assert!(!tunnel.is_provisioned());
        tunnel.status = Some(TcpTunnelStatus {
            remote_port: Some(16432),
            port_epoch: Some(42),
            ..Default::default()
        });
        assert_eq!(tunnel.assigned_port(), Some(16432));
        assert_eq!(tunnel.port_epoch(), Some(42));
        assert!(!tunnel.is_provisioned(), "no Provisioned condition yet");
    }
}
