//! Pure builders for every object the operator writes (the token Secret, the sidecar,
//! the relay Service's ports, the webhook's client configuration) and the small
//! decisions about them, so all of it is unit-tested without an API server.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ServiceReference,
    WebhookClientConfig,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, EnvVarSource, KeyToPath, ResourceRequirements, Secret,
    SecretKeySelector, SecretVolumeSource, SecurityContext, Service, ServicePort, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::core::{Selector, SelectorExt};
use kube::{Resource, ResourceExt};
use localup_protocol::PortRange;
use localup_protocol::token::Claims;

use crate::crd::TcpTunnel;

/// The injected container's name; a pod that already has it is never injected again.
pub const SIDECAR_NAME: &str = "localup-client";
/// The volume carrying the relay's CA certificate into the sidecar.
pub const SIDECAR_VOLUME: &str = "localup-client-ca";
pub const SIDECAR_CONFIG_DIR: &str = "/etc/localup";
/// Annotation on injected pods naming the tunnel they serve.
pub const INJECTED_ANNOTATION: &str = "localup.dev/tunnel";
/// Prefix of the pod-template annotation through which a tunnel rolls the Deployments
/// it selects: `tunnels.localup.dev/<tunnel>: "<port>"`.
pub const ROLLOUT_ANNOTATION_PREFIX: &str = "tunnels.localup.dev/";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "localup-operator";
/// Relay Service ports named with this prefix belong to tunnels; the operator owns them.
pub const TUNNEL_PORT_PREFIX: &str = "tunnel-";

pub mod secret_keys {
    pub const TOKEN: &str = "token";
    pub const RELAY: &str = "relay";
    pub const CA: &str = "ca.crt";
    pub const REMOTE_PORT: &str = "remotePort";
}

pub fn token_secret_name(tunnel_name: &str) -> String {
    format!("{tunnel_name}-localup-token")
}

/// What a sidecar needs to open its tunnel: the contents of the token Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SidecarCredentials {
    pub token: String,
    /// HOST:PORT of the relay's control plane, as the sidecar dials it.
    pub relay: String,
    pub ca_pem: String,
    pub remote_port: u16,
}

impl SidecarCredentials {
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let text = |key: &str| {
            data.get(key)
                .and_then(|value| String::from_utf8(value.0.clone()).ok())
        };
        Some(Self {
            token: text(secret_keys::TOKEN)?,
            relay: text(secret_keys::RELAY)?,
            ca_pem: text(secret_keys::CA)?,
            remote_port: text(secret_keys::REMOTE_PORT)?.parse().ok()?,
        })
    }
}

/// The token Secret, owned by its tunnel so it goes when the tunnel goes.
pub fn token_secret(tunnel: &TcpTunnel, credentials: &SidecarCredentials) -> Secret {
    let data = [
        (secret_keys::TOKEN, credentials.token.clone()),
        (secret_keys::RELAY, credentials.relay.clone()),
        (secret_keys::CA, credentials.ca_pem.clone()),
        (
            secret_keys::REMOTE_PORT,
            credentials.remote_port.to_string(),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_owned(), ByteString(value.into_bytes())))
    .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&tunnel.name_any())),
            namespace: tunnel.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
                (INJECTED_ANNOTATION.to_owned(), tunnel.name_any()),
            ])),
            owner_references: tunnel.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// The token already handed out, if it can stay: signed with the relay's current
/// secret, for this subject and exactly this port, and with more than half of its
/// lifetime left. Otherwise a new one must be minted.
pub fn reusable_token(
    existing: Option<&str>,
    jwt_secret: &[u8],
    subject: &str,
    port: u16,
    lifetime: Duration,
    now: u64,
) -> Option<String> {
    let token = existing?;
    let claims = Claims::verify(token, jwt_secret).ok()?;
    let renew_at = renewal_time(claims.exp?, lifetime);
    (claims.sub == subject && claims.ports == PortRange::single(port) && now < renew_at)
        .then(|| token.to_owned())
}

/// When a token expiring at `exp` (Unix seconds) is replaced: half its lifetime early,
/// leaving ample time for retries while the API server is away.
pub fn renewal_time(exp: u64, lifetime: Duration) -> u64 {
    exp.saturating_sub(lifetime.as_secs() / 2)
}

/// A JWT for `subject` valid only for `port`, signed with the relay's secret.
pub fn mint_token(jwt_secret: &[u8], subject: &str, port: u16, lifetime: Duration) -> String {
    let ports = PortRange::single(port).expect("assigned ports are never 0");
    Claims::new(subject)
        .restricted_to(ports)
        .expires_in(lifetime)
        .mint(jwt_secret)
}

/// The sidecar: the localup client forwarding `local_port` of the pod to `remote_port`
/// on the relay. The relay address and token come from the Secret by reference, so the
/// token never appears in the pod spec; `LOCALUP_CONNECT_TIMEOUT=0` keeps it retrying
/// while the relay starts.
pub fn sidecar_container(
    image: &str,
    secret_name: &str,
    local_port: i32,
    remote_port: u16,
) -> Container {
    let from_secret = |name: &str, key: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret_name.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let plain = |name: &str, value: &str| EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    };
    Container {
        name: SIDECAR_NAME.into(),
        image: Some(image.into()),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(
            [
                "--port",
                &local_port.to_string(),
                "--protocol",
                "tcp",
                "--remote-port",
                &remote_port.to_string(),
            ]
            .map(String::from)
            .to_vec(),
        ),
        env: Some(vec![
            from_secret("LOCALUP_RELAY", secret_keys::RELAY),
            from_secret("LOCALUP_TOKEN", secret_keys::TOKEN),
            plain(
                "LOCALUP_RELAY_CA",
                &format!("{SIDECAR_CONFIG_DIR}/{}", secret_keys::CA),
            ),
            plain("LOCALUP_CONNECT_TIMEOUT", "0"),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: SIDECAR_VOLUME.into(),
            mount_path: SIDECAR_CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("10m".into())),
                ("memory".to_owned(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_owned(),
                Quantity("128Mi".into()),
            )])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(65532),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Only the CA certificate is mounted; the token stays in the environment.
pub fn sidecar_volume(secret_name: &str) -> Volume {
    Volume {
        name: SIDECAR_VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            items: Some(vec![KeyToPath {
                key: secret_keys::CA.into(),
                path: secret_keys::CA.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn tunnel_port_name(port: u16) -> String {
    format!("{TUNNEL_PORT_PREFIX}{port}")
}

/// The relay Service's ports with exactly `tunnel_ports` as tunnel ports: the relay's
/// own ports stay untouched, tunnel ports that remain keep what the API server filled
/// in (their nodePort), new ones are added in port order, stale ones are dropped.
pub fn relay_service_ports(
    existing: &[ServicePort],
    tunnel_ports: &BTreeSet<u16>,
) -> Vec<ServicePort> {
    let is_tunnel_port = |port: &ServicePort| {
        port.name
            .as_deref()
            .is_some_and(|name| name.starts_with(TUNNEL_PORT_PREFIX))
    };
    let mut ports: Vec<ServicePort> = existing
        .iter()
        .filter(|port| !is_tunnel_port(port))
        .cloned()
        .collect();
    for &port in tunnel_ports {
        let name = tunnel_port_name(port);
        let kept = existing.iter().find(|existing| {
            existing.name.as_deref() == Some(&name) && existing.port == i32::from(port)
        });
        ports.push(kept.cloned().unwrap_or_else(|| ServicePort {
            name: Some(name),
            protocol: Some("TCP".into()),
            port: i32::from(port),
            target_port: Some(IntOrString::Int(i32::from(port))),
            ..Default::default()
        }));
    }
    ports
}

/// The relay's public host: the load-balancer ingress (IP first, else host name).
pub fn load_balancer_host(service: &Service) -> Option<String> {
    let ingress = service
        .status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?;
    ingress
        .iter()
        .find_map(|entry| entry.ip.clone().or_else(|| entry.hostname.clone()))
}

/// The HOST:PORT users reach the tunnel at: the override when given, else the relay
/// Service's load-balancer address; `None` until one is known.
pub fn endpoint(service: &Service, public_address: Option<&str>, port: u16) -> Option<String> {
    let host = public_address
        .map(str::to_owned)
        .or_else(|| load_balancer_host(service))?;
    Some(format!("{host}:{port}"))
}

/// The address sidecars dial: the relay Service's cluster IP (not its DNS name, so
/// sidecars work without cluster DNS) and the control port.
pub fn relay_address(service: &Service, control_port: u16) -> Option<String> {
    let ip = service.spec.as_ref()?.cluster_ip.as_deref()?;
    (!ip.is_empty() && ip != "None").then(|| format!("{ip}:{control_port}"))
}

/// The tunnel's selector, refusing an empty one: it would give every pod in the
/// namespace a sidecar, which is never what anyone means.
pub fn tunnel_selector(tunnel: &TcpTunnel) -> Result<Selector, String> {
    let selector: Selector = tunnel
        .spec
        .selector
        .clone()
        .try_into()
        .map_err(|error| format!("{error}"))?;
    if selector.selects_all() {
        return Err("it is empty and would select every pod in the namespace".into());
    }
    Ok(selector)
}

pub fn selects(selector: &Selector, labels: Option<&BTreeMap<String, String>>) -> bool {
    selector.matches(labels.unwrap_or(&BTreeMap::new()))
}

pub fn rollout_annotation(tunnel_name: &str) -> String {
    format!("{ROLLOUT_ANNOTATION_PREFIX}{tunnel_name}")
}

/// A merge patch that rolls a Deployment as `kubectl rollout restart` does, through a
/// pod-template annotation naming the tunnel's port (`None` removes it). The value is
/// stable, so repeating the patch never rolls twice; new pods then pass the webhook and
/// get (or lose) the sidecar.
pub fn rollout_patch(tunnel_name: &str, port: Option<u16>) -> serde_json::Value {
    serde_json::json!({
        "spec": {"template": {"metadata": {"annotations": {
            rollout_annotation(tunnel_name): port.map(|port| port.to_string())
        }}}}
    })
}

/// How the API server reaches the webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookTarget {
    Service {
        namespace: String,
        name: String,
        port: i32,
    },
    Url(String),
}

pub const WEBHOOK_PATH: &str = "/mutate";

pub fn webhook_client_config(target: &WebhookTarget, ca_pem: &str) -> WebhookClientConfig {
    let ca_bundle = Some(ByteString(ca_pem.as_bytes().to_vec()));
    match target {
        WebhookTarget::Service {
            namespace,
            name,
            port,
        } => WebhookClientConfig {
            ca_bundle,
            service: Some(ServiceReference {
                namespace: namespace.clone(),
                name: name.clone(),
                path: Some(WEBHOOK_PATH.into()),
                port: Some(*port),
            }),
            url: None,
        },
        WebhookTarget::Url(url) => WebhookClientConfig {
            ca_bundle,
            service: None,
            url: Some(url.clone()),
        },
    }
}

pub const WEBHOOK_NAME: &str = "inject.localup.dev";
/// Namespaces labelled `localup.dev/injection: disabled` are never sent to the webhook.
pub const INJECTION_LABEL: &str = "localup.dev/injection";

/// The webhook registration: pod CREATE only, failing open within 5 s so a broken or
/// absent operator never blocks pod creation.
pub fn mutating_webhook_configuration(
    name: &str,
    target: &WebhookTarget,
    ca_pem: &str,
) -> MutatingWebhookConfiguration {
    MutatingWebhookConfiguration {
        // No managed-by label: when the chart ships this object, Helm owns it only while
        // its own `app.kubernetes.io/managed-by: Helm` stays.
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            client_config: webhook_client_config(target, ca_pem),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec![String::new()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: INJECTION_LABEL.into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["disabled".into()]),
                }]),
                ..Default::default()
            }),
            failure_policy: Some("Ignore".into()),
            match_policy: Some("Equivalent".into()),
            reinvocation_policy: Some("Never".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            admission_review_versions: vec!["v1".into()],
            ..Default::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    use super::*;
    use crate::crd::TcpTunnelSpec;

    const SECRET: &[u8] = b"relay-secret";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn tunnel(selector: LabelSelector) -> TcpTunnel {
        let mut tunnel = TcpTunnel::new(
            "mydb",
            TcpTunnelSpec {
                selector,
                port: 5432,
                remote_port: None,
            },
        );
        tunnel.metadata.namespace = Some("dev".into());
        tunnel.metadata.uid = Some("uid-1".into());
        tunnel
    }

    fn app_selector() -> LabelSelector {
        LabelSelector {
            match_labels: Some(BTreeMap::from([("app".into(), "postgres".into())])),
            ..Default::default()
        }
    }

    #[test]
    fn token_secret_carries_everything_the_sidecar_needs_and_is_owned() {
        let credentials = SidecarCredentials {
            token: "jwt".into(),
            relay: "10.0.0.5:4443".into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
            remote_port: 16432,
        };
        let secret = token_secret(&tunnel(app_selector()), &credentials);
        assert_eq!(secret.metadata.name.as_deref(), Some("mydb-localup-token"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("dev"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("TcpTunnel", "mydb")
        );
        assert_eq!(owner.controller, Some(true));
        let keys: Vec<_> = secret.data.as_ref().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["ca.crt", "relay", "remotePort", "token"]);
        assert_eq!(SidecarCredentials::from_secret(&secret), Some(credentials));
    }

    #[test]
    fn minted_tokens_are_pinned_to_the_port_and_subject() {
        let token = mint_token(SECRET, "dev/mydb", 16432, DAY);
        let claims = Claims::verify(&token, SECRET).unwrap();
        assert_eq!(claims.sub, "dev/mydb");
        assert!(claims.allows_port(16432));
        assert!(!claims.allows_port(16433));
        assert_eq!(claims.exp, Some(claims.iat + DAY.as_secs()));
    }

    #[test]
    fn a_token_is_reused_only_while_it_still_fits() {
        let token = mint_token(SECRET, "dev/mydb", 16432, DAY);
        let now = localup_protocol::token::unix_now();
        let reuse = |token: Option<&str>, secret: &[u8], subject: &str, port: u16, now: u64| {
            reusable_token(token, secret, subject, port, DAY, now)
        };
        assert_eq!(
            reuse(Some(&token), SECRET, "dev/mydb", 16432, now),
            Some(token.clone())
        );
        assert_eq!(reuse(None, SECRET, "dev/mydb", 16432, now), None);
        // The tunnel moved to another port: the old token would be refused by the relay.
        assert_eq!(reuse(Some(&token), SECRET, "dev/mydb", 16433, now), None);
        assert_eq!(reuse(Some(&token), SECRET, "dev/other", 16432, now), None);
        // The relay's secret changed.
        assert_eq!(
            reuse(Some(&token), b"rotated", "dev/mydb", 16432, now),
            None
        );
        // Past half of its lifetime: replaced well before it expires.
        let later = now + DAY.as_secs() / 2 + 1;
        assert_eq!(reuse(Some(&token), SECRET, "dev/mydb", 16432, later), None);
        // A token without expiry is never handed out by the operator: replace it.
        let forever = Claims::new("dev/mydb")
            .restricted_to(PortRange::single(16432).unwrap())
            .mint(SECRET);
        assert_eq!(reuse(Some(&forever), SECRET, "dev/mydb", 16432, now), None);
    }

    #[test]
    fn sidecar_is_the_client_with_secrets_by_reference() {
        let container = sidecar_container("img:1", "mydb-localup-token", 5432, 16432);
        assert_eq!(container.name, "localup-client");
        assert_eq!(container.image.as_deref(), Some("img:1"));
        assert_eq!(
            container.args.as_deref().unwrap(),
            [
                "--port",
                "5432",
                "--protocol",
                "tcp",
                "--remote-port",
                "16432"
            ]
        );
        let env = container.env.as_ref().unwrap();
        let by_name = |name: &str| env.iter().find(|var| var.name == name).unwrap();
        for (name, key) in [("LOCALUP_RELAY", "relay"), ("LOCALUP_TOKEN", "token")] {
            let var = by_name(name);
            assert_eq!(var.value, None, "{name} must not be inlined");
            let reference = var
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!(
                (reference.name.as_str(), reference.key.as_str()),
                ("mydb-localup-token", key)
            );
        }
        assert_eq!(
            by_name("LOCALUP_RELAY_CA").value.as_deref(),
            Some("/etc/localup/ca.crt")
        );
        assert_eq!(
            by_name("LOCALUP_CONNECT_TIMEOUT").value.as_deref(),
            Some("0")
        );
        let mount = &container.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(mount.mount_path, "/etc/localup");
        assert_eq!(mount.read_only, Some(true));

        let volume = sidecar_volume("mydb-localup-token");
        assert_eq!(volume.name, mount.name);
        let secret = volume.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("mydb-localup-token"));
        assert_eq!(secret.items.unwrap()[0].key, "ca.crt");
    }

    fn port(name: &str, port: i32, protocol: &str, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: Some(name.into()),
            port,
            protocol: Some(protocol.into()),
            node_port,
            ..Default::default()
        }
    }

    #[test]
    fn relay_service_ports_follow_the_assignments() {
        let existing = vec![
            port("quic", 4443, "UDP", Some(31000)),
            port("tunnel-10005", 10005, "TCP", Some(31001)),
            port("tunnel-10009", 10009, "TCP", Some(31002)),
        ];
        let wanted = BTreeSet::from([10001, 10005]);
        let ports = relay_service_ports(&existing, &wanted);
        let names: Vec<_> = ports
            .iter()
            .map(|port| port.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["quic", "tunnel-10001", "tunnel-10005"]);
        assert_eq!(ports[0], existing[0], "the relay's own port is untouched");
        assert_eq!(
            ports[2].node_port,
            Some(31001),
            "a kept port keeps its nodePort"
        );
        assert_eq!(ports[1].protocol.as_deref(), Some("TCP"));
        assert_eq!(ports[1].target_port, Some(IntOrString::Int(10001)));
        // Nothing assigned any more: only the relay's own port is left.
        assert_eq!(
            relay_service_ports(&ports, &BTreeSet::new()),
            vec![existing[0].clone()]
        );
    }

    #[test]
    fn endpoint_prefers_the_override_then_the_load_balancer() {
        let mut service = Service {
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.0.0.7".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(endpoint(&service, None, 16432), None);
        assert_eq!(
            endpoint(&service, Some("relay.example.com"), 16432).as_deref(),
            Some("relay.example.com:16432")
        );
        service.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    hostname: Some("lb.example.com".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        assert_eq!(
            endpoint(&service, None, 16432).as_deref(),
            Some("lb.example.com:16432")
        );
        assert_eq!(
            relay_address(&service, 4443).as_deref(),
            Some("10.0.0.7:4443")
        );
    }

    #[test]
    fn selectors_must_select_something() {
        assert!(tunnel_selector(&tunnel(LabelSelector::default())).is_err());
        let selector = tunnel_selector(&tunnel(app_selector())).unwrap();
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(selects(
            &selector,
            Some(&labels(&[("app", "postgres"), ("tier", "db")]))
        ));
        assert!(!selects(&selector, Some(&labels(&[("app", "web")]))));
        assert!(!selects(&selector, None));

        let expressions = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: "In".into(),
                values: Some(vec!["postgres".into(), "mysql".into()]),
            }]),
            ..Default::default()
        };
        let selector = tunnel_selector(&tunnel(expressions)).unwrap();
        assert!(selects(&selector, Some(&labels(&[("app", "mysql")]))));
    }

    #[test]
    fn webhook_client_config_points_at_the_service_or_the_url() {
        let service = webhook_client_config(
            &WebhookTarget::Service {
                namespace: "localup-system".into(),
                name: "localup-operator-webhook".into(),
                port: 443,
            },
            "PEM",
        );
        assert_eq!(service.url, None);
        let reference = service.service.unwrap();
        assert_eq!(reference.path.as_deref(), Some("/mutate"));
        assert_eq!(service.ca_bundle, Some(ByteString(b"PEM".to_vec())));

        let url = webhook_client_config(
            &WebhookTarget::Url("https://127.0.0.1:9443/mutate".into()),
            "PEM",
        );
        assert_eq!(url.url.as_deref(), Some("https://127.0.0.1:9443/mutate"));
        assert_eq!(url.service, None);
    }

    #[test]
    fn rollout_patch_names_the_port_or_removes_the_annotation() {
        let patch = rollout_patch("mydb", Some(16432));
        let annotations = &patch["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations["tunnels.localup.dev/mydb"], "16432");
        let patch = rollout_patch("mydb", None);
        let annotations = &patch["spec"]["template"]["metadata"]["annotations"];
        assert!(annotations["tunnels.localup.dev/mydb"].is_null());
        assert!(
            annotations
                .as_object()
                .unwrap()
                .contains_key("tunnels.localup.dev/mydb")
        );
    }

    #[test]
    fn webhook_registration_fails_open_on_pod_creation_only() {
        let target = WebhookTarget::Url("https://127.0.0.1:9443/mutate".into());
        let configuration = mutating_webhook_configuration("localup-operator", &target, "PEM");
        let webhook = &configuration.webhooks.as_ref().unwrap()[0];
        assert_eq!(webhook.name, "inject.localup.dev");
        assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
        assert_eq!(webhook.timeout_seconds, Some(5));
        let rule = &webhook.rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["pods".to_owned()][..]));
        assert_eq!(webhook.client_config.ca_bundle.as_ref().unwrap().0, b"PEM");
    }
}
