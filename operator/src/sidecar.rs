//! The injected `localup-client` sidecar: its container, the volume that brings it the
//! token Secret, and the fingerprint that tells whether a running pod's sidecar is the
//! one the tunnel wants now.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvVar, HTTPGetAction, HTTPHeader, LifecycleHandler, Pod, Probe,
    ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use localup_runtime::logging::LogFormat;

use crate::config::{Config, SidecarModeFlag};
use crate::token::secret_keys;

/// The injected container's name; a pod that already has it is never injected again.
pub const NAME: &str = "localup-client";
/// The volume carrying the token Secret (token and ca.crt) into the sidecar.
pub const VOLUME: &str = "localup-client";
pub const CONFIG_DIR: &str = "/etc/localup";

/// Native sidecars (init containers with restartPolicy Always) exist from this
/// Kubernetes version on (beta and on by default in 1.29).
pub const NATIVE_SIDECARS_SINCE: (u32, u32) = (1, 29);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The first init container, with restartPolicy Always: it starts before the app
    /// containers, stops after them, and does not keep a Job's pod from completing.
    Native,
    /// A plain container beside the app's (Job pods are then left alone).
    Container,
}

impl Mode {
    /// `--sidecar-mode`, with `auto` decided by the API server's version (None: unknown,
    /// taken as too old).
    pub fn resolve(flag: SidecarModeFlag, server: Option<(u32, u32)>) -> Mode {
        match flag {
            SidecarModeFlag::Native => Mode::Native,
            SidecarModeFlag::Container => Mode::Container,
            SidecarModeFlag::Auto => match server {
                Some(version) if version >= NATIVE_SIDECARS_SINCE => Mode::Native,
                _ => Mode::Container,
            },
        }
    }
}

/// The API server's `/version` major and minor (`"1"`, `"29+"`).
pub fn parse_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |text: &str| -> Option<u32> {
        let end = text
            .find(|character: char| !character.is_ascii_digit())
            .unwrap_or(text.len());
        text[..end].parse().ok()
    };
    Some((digits(major)?, digits(minor)?))
}

/// How every sidecar is built: the operator's flags.
#[derive(Debug, Clone)]
pub struct Settings {
    pub image: String,
    pub pull_policy: String,
    pub uid: i64,
    pub health_port: u16,
    pub resources: ResourceRequirements,
    pub log_format: LogFormat,
    pub mode: Mode,
}

impl Settings {
    pub fn from_config(config: &Config, mode: Mode) -> Self {
        let quantities = |pairs: [(&str, &str); 2]| {
            let map: BTreeMap<String, Quantity> = pairs
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(name, value)| (name.to_owned(), Quantity(value.to_owned())))
                .collect();
            (!map.is_empty()).then_some(map)
        };
        Settings {
            image: config.client_image.clone(),
            pull_policy: config.sidecar_image_pull_policy.as_str().to_owned(),
            uid: config.sidecar_uid,
            health_port: config.sidecar_health_port,
            resources: ResourceRequirements {
                requests: quantities([
                    ("cpu", &config.sidecar_cpu_request),
                    ("memory", &config.sidecar_memory_request),
                ]),
                limits: quantities([
                    ("cpu", &config.sidecar_cpu_limit),
                    ("memory", &config.sidecar_memory_limit),
                ]),
                ..Default::default()
            },
            log_format: config.sidecar_log_format,
            mode,
        }
    }
}

/// What one tunnel's sidecar connects.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub secret_name: &'a str,
    /// The pod's port (`spec.port`).
    pub local_port: i32,
    pub remote_port: u16,
    /// HOST:PORT of the relay's control port.
    pub relay_address: &'a str,
}

impl Target<'_> {
    /// What a pod's sidecar was built for; a change (another port, local port or relay
    /// address) means the pod must be replaced. Token renewals and policy changes reach
    /// running sidecars through the mounted Secret and change nothing here.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.remote_port, self.local_port, self.relay_address)
    }
}

pub fn fingerprint(remote_port: u16, local_port: i32, relay_address: &str) -> String {
    format!("remotePort={remote_port},port={local_port},relay={relay_address}")
}

/// The first port from `base` up that none of the pod's containers declares and that
/// is not the tunnel's own local port.
pub fn health_port(pod: &Pod, base: u16, local_port: i32) -> Option<u16> {
    let spec = pod.spec.as_ref();
    let taken: BTreeSet<i32> = spec
        .into_iter()
        .flat_map(|spec| {
            spec.containers
                .iter()
                .chain(spec.init_containers.iter().flatten())
        })
        .flat_map(|container| container.ports.iter().flatten())
        .map(|port| port.container_port)
        .chain([local_port])
        .collect();
    (base..=u16::MAX).find(|port| !taken.contains(&i32::from(*port)))
}

/// The sidecar container: the localup client forwarding the pod's `local_port` to
/// `remote_port` on the relay. It reads its token from the mounted Secret (and again
/// whenever the kubelet refreshes it), trusts exactly the relay's certificate, tries
/// QUIC then TLS over TCP, retries forever while the relay starts, and reports on
/// `/readyz` whether its tunnel is up, so the pod turns Ready only once it serves.
/// Its security context passes the Pod Security "restricted" level. `drain_token`
/// guards its `/drain` endpoint, which the app containers' preStop hooks call
/// ([`pre_stop_drain`]).
pub fn container(
    settings: &Settings,
    target: Target<'_>,
    health_port: u16,
    drain_token: &str,
) -> Container {
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let log_format = match settings.log_format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    Container {
        name: NAME.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some(settings.pull_policy.clone()),
        args: Some(vec![
            "--port".into(),
            target.local_port.to_string(),
            "--protocol".into(),
            "tcp".into(),
            "--remote-port".into(),
            target.remote_port.to_string(),
        ]),
        env: Some(vec![
            plain("LOCALUP_RELAY", target.relay_address.to_owned()),
            plain(
                "LOCALUP_TOKEN_FILE",
                format!("{CONFIG_DIR}/{}", secret_keys::TOKEN),
            ),
            plain(
                "LOCALUP_RELAY_CA",
                format!("{CONFIG_DIR}/{}", secret_keys::CA),
            ),
            plain("LOCALUP_CONNECT_TIMEOUT", "0".into()),
            plain("LOCALUP_TRANSPORT", "auto".into()),
            plain("LOCALUP_HEALTH_ADDR", format!("0.0.0.0:{health_port}")),
            plain("LOCALUP_DRAIN_TOKEN", drain_token.to_owned()),
            plain("LOCALUP_LOG_FORMAT", log_format.into()),
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/readyz".into()),
                port: IntOrString::Int(i32::from(health_port)),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(3),
            timeout_seconds: Some(1),
            ..Default::default()
        }),
        resources: Some(settings.resources.clone()),
        restart_policy: (settings.mode == Mode::Native).then(|| "Always".into()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(settings.uid),
            run_as_group: Some(settings.uid),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The preStop hook given to each app container that has none: before the kubelet
/// stops the app, it asks the sidecar to drain, so the relay sends the pod no new
/// connection once the app may have stopped listening (a native sidecar is itself
/// stopped only after the app has exited). The hook returns once the relay was told.
pub fn pre_stop_drain(health_port: u16, drain_token: &str) -> LifecycleHandler {
    LifecycleHandler {
        http_get: Some(HTTPGetAction {
            path: Some("/drain".into()),
            port: IntOrString::Int(i32::from(health_port)),
            http_headers: Some(vec![HTTPHeader {
                name: "Authorization".into(),
                value: format!("Bearer {drain_token}"),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A fresh secret for one pod's `/drain` endpoint: 128 random bits, hex.
pub fn new_drain_token() -> String {
    let bits: u128 = rand::random();
    format!("{bits:032x}")
}

/// The whole token Secret (token and ca.crt), mounted read-only at [`CONFIG_DIR`]; the
/// kubelet refreshes the files when the Secret changes.
pub fn volume(secret_name: &str) -> Volume {
    Volume {
        name: VOLUME.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod's sidecar container, in either place.
pub fn find(pod: &Pod) -> Option<&Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|container| container.name == NAME)
}

/// Whether the pod's sidecar reports ready (its tunnel is up).
pub fn is_ready(pod: &Pod) -> bool {
    let Some(status) = pod.status.as_ref() else {
        return false;
    };
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .any(|container| container.name == NAME && container.ready)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{ContainerPort, PodSpec};

    use super::*;

    fn settings(mode: Mode) -> Settings {
        Settings {
            image: "img:1".into(),
            pull_policy: "IfNotPresent".into(),
            uid: 65532,
            health_port: 9808,
            resources: ResourceRequirements::default(),
            log_format: LogFormat::Text,
            mode,
        }
    }

    const TARGET: Target<'static> = Target {
        secret_name: "mydb-localup-token",
        local_port: 5432,
        remote_port: 16432,
        relay_address: "10.0.0.7:4443",
    };

    #[test]
    fn auto_mode_follows_the_api_server_version() {
        use SidecarModeFlag::*;
        assert_eq!(Mode::resolve(Auto, Some((1, 29))), Mode::Native);
        assert_eq!(Mode::resolve(Auto, Some((1, 37))), Mode::Native);
        assert_eq!(Mode::resolve(Auto, Some((1, 28))), Mode::Container);
        assert_eq!(Mode::resolve(Auto, None), Mode::Container);
        assert_eq!(Mode::resolve(Native, Some((1, 20))), Mode::Native);
        assert_eq!(Mode::resolve(Container, Some((1, 33))), Mode::Container);
        assert_eq!(parse_version("1", "29+"), Some((1, 29)));
        assert_eq!(parse_version("1", "37"), Some((1, 37)));
        assert_eq!(parse_version("", "x"), None);
    }

    #[test]
    fn the_sidecar_reads_its_token_from_the_mounted_secret() {
        let container = container(&settings(Mode::Container), TARGET, 9808, "drain");
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
        let env: BTreeMap<_, _> = container
            .env
            .iter()
            .flatten()
            .map(|var| (var.name.as_str(), var.value.as_deref().unwrap()))
            .collect();
        assert_eq!(env["LOCALUP_RELAY"], "10.0.0.7:4443");
        assert_eq!(env["LOCALUP_TOKEN_FILE"], "/etc/localup/token");
        assert_eq!(env["LOCALUP_RELAY_CA"], "/etc/localup/ca.crt");
        assert_eq!(env["LOCALUP_CONNECT_TIMEOUT"], "0");
        assert_eq!(env["LOCALUP_TRANSPORT"], "auto");
        assert_eq!(env["LOCALUP_HEALTH_ADDR"], "0.0.0.0:9808");
        assert!(
            !env.contains_key("LOCALUP_TOKEN"),
            "no token in the pod spec"
        );
        assert_eq!(container.restart_policy, None);
        let probe = container.readiness_probe.as_ref().unwrap();
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(
            (get.path.as_deref(), &get.port),
            (Some("/readyz"), &IntOrString::Int(9808))
        );
        let mount = &container.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            ("/etc/localup", Some(true))
        );
        let volume = volume("mydb-localup-token");
        assert_eq!(volume.name, mount.name);
        let secret = volume.secret.unwrap();
        assert_eq!(secret.secret_name.as_deref(), Some("mydb-localup-token"));
        assert_eq!(secret.items, None, "the whole Secret: token and ca.crt");
    }

    #[test]
    fn native_sidecars_restart_always() {
        let container = container(&settings(Mode::Native), TARGET, 9808, "drain");
        assert_eq!(container.restart_policy.as_deref(), Some("Always"));
    }

    /// Pod Security Standards, "restricted" level, as it applies to one container.
    #[test]
    fn the_sidecar_passes_pod_security_restricted() {
        for mode in [Mode::Native, Mode::Container] {
            let container = container(&settings(mode), TARGET, 9808, "drain");
            let security = container.security_context.unwrap();
            assert_eq!(security.run_as_non_root, Some(true));
            assert_ne!(security.run_as_user, Some(0));
            assert_eq!(security.allow_privilege_escalation, Some(false));
            assert_eq!(security.privileged, None);
            assert_eq!(security.read_only_root_filesystem, Some(true));
            let capabilities = security.capabilities.unwrap();
            assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
            assert_eq!(capabilities.add, None);
            assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
            assert!(container.ports.is_none(), "no hostPort");
        }
    }

    #[test]
    fn settings_come_from_the_flags() {
        use clap::Parser;
        let config = Config::try_parse_from([
            "localup-operator",
            "--sidecar-cpu-limit",
            "200m",
            "--sidecar-memory-request",
            "",
            "--sidecar-uid",
            "1000",
            "--sidecar-image-pull-policy",
            "Always",
        ])
        .unwrap();
        let settings = Settings::from_config(&config, Mode::Native);
        let resources = &settings.resources;
        let requests = resources.requests.as_ref().unwrap();
        assert_eq!(requests["cpu"], Quantity("10m".into()));
        assert!(!requests.contains_key("memory"));
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(limits["cpu"], Quantity("200m".into()));
        assert_eq!(limits["memory"], Quantity("128Mi".into()));
        assert_eq!(settings.uid, 1000);
        assert_eq!(settings.pull_policy, "Always");
    }

    #[test]
    fn the_health_port_avoids_ports_the_pod_declares() {
        let declaring = |ports: &[i32]| Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "app".into(),
                    ports: Some(
                        ports
                            .iter()
                            .map(|port| ContainerPort {
                                container_port: *port,
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(health_port(&declaring(&[5432]), 9808, 5432), Some(9808));
        assert_eq!(
            health_port(&declaring(&[9808, 9809]), 9808, 5432),
            Some(9810)
        );
        assert_eq!(health_port(&declaring(&[]), 9808, 9808), Some(9809));
    }
}
