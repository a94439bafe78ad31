//! The relay's LoadBalancer Service as the operator sees it: the tunnel ports it must
//! carry (`tunnel-<port>`, exactly the ports live tunnels hold), the [`PortBook`] kept in
//! its annotation, the address sidecars dial and the address users reach.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::allocator::PortBook;
use crate::keys::PORTS_ANNOTATION;

/// Relay Service ports named with this prefix belong to tunnels; the operator owns them.
pub const TUNNEL_PORT_PREFIX: &str = "tunnel-";

pub fn tunnel_port_name(port: u16) -> String {
    format!("{TUNNEL_PORT_PREFIX}{port}")
}

fn is_tunnel_port(port: &ServicePort) -> bool {
    port.name
        .as_deref()
        .is_some_and(|name| name.starts_with(TUNNEL_PORT_PREFIX))
}

/// The tunnel ports the Service carries now.
pub fn tunnel_ports(service: &Service) -> BTreeSet<u16> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|port| is_tunnel_port(port))
        .filter_map(|port| u16::try_from(port.port).ok())
        .collect()
}

/// The Service's ports with exactly `tunnel_ports` as tunnel ports: the relay's own
/// ports stay untouched, tunnel ports that remain keep what the API server filled in
/// (their nodePort), new ones are added in port order, stale ones are dropped.
pub fn ports_with(existing: &[ServicePort], tunnel_ports: &BTreeSet<u16>) -> Vec<ServicePort> {
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

/// The port book recorded on the Service; an unreadable one (edited by hand) counts as
/// empty, which only shortens quarantines.
pub fn port_book(service: &Service) -> PortBook {
    service
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(PORTS_ANNOTATION))
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

/// The merge patch that makes the Service carry `tunnel_ports` and `book`, or `None`
/// when it does already. The patch names the resourceVersion it was computed from, so
/// a concurrent change makes it fail (409) instead of being overwritten.
pub fn sync_patch(
    service: &Service,
    tunnel_ports: &BTreeSet<u16>,
    book: &PortBook,
) -> Option<serde_json::Value> {
    let existing = service
        .spec
        .as_ref()
        .and_then(|spec| spec.ports.clone())
        .unwrap_or_default();
    let desired = ports_with(&existing, tunnel_ports);
    if desired == existing && port_book(service) == *book {
        return None;
    }
    Some(serde_json::json!({
        "metadata": {
            "resourceVersion": service.metadata.resource_version,
            "annotations": {
                PORTS_ANNOTATION: serde_json::to_string(book).expect("a port book serializes"),
            },
        },
        "spec": {"ports": desired},
    }))
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
    Some(if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    })
}

/// The address sidecars dial: the relay Service's cluster IP (not its DNS name, so
/// sidecars work without cluster DNS) and the control port.
pub fn relay_address(service: &Service, control_port: u16) -> Option<String> {
    let ip = service.spec.as_ref()?.cluster_ip.as_deref()?;
    if ip.is_empty() || ip == "None" {
        return None;
    }
    Some(if ip.contains(':') {
        format!("[{ip}]:{control_port}")
    } else {
        format!("{ip}:{control_port}")
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };

    use super::*;
    use crate::allocator::Holdings;

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
    fn tunnel_ports_follow_the_assignments() {
        let existing = vec![
            port("quic", 4443, "UDP", Some(31000)),
            port("control-tcp", 4443, "TCP", Some(31000)),
            port("tunnel-10005", 10005, "TCP", Some(31001)),
            port("tunnel-10009", 10009, "TCP", Some(31002)),
        ];
        let wanted = BTreeSet::from([10001, 10005]);
        let ports = ports_with(&existing, &wanted);
        let names: Vec<_> = ports
            .iter()
            .map(|port| port.name.clone().unwrap())
            .collect();
        assert_eq!(
            names,
            ["quic", "control-tcp", "tunnel-10001", "tunnel-10005"]
        );
        assert_eq!(
            ports[..2],
            existing[..2],
            "the relay's own ports are untouched"
        );
        assert_eq!(
            ports[3].node_port,
            Some(31001),
            "a kept port keeps its nodePort"
        );
        assert_eq!(ports[2].protocol.as_deref(), Some("TCP"));
        assert_eq!(ports[2].target_port, Some(IntOrString::Int(10001)));
        assert_eq!(
            ports_with(&ports, &BTreeSet::new()),
            existing[..2].to_vec(),
            "nothing assigned: only the relay's own ports"
        );
    }

    #[test]
    fn the_sync_patch_is_needed_only_for_a_change() {
        let mut service = Service {
            spec: Some(ServiceSpec {
                ports: Some(vec![port("quic", 4443, "UDP", None)]),
                ..Default::default()
            }),
            ..Default::default()
        };
        service.metadata.resource_version = Some("41".into());
        let book = PortBook::default().update(
            &Holdings::from([(10000, "dev/a".to_owned())]),
            1,
            std::time::Duration::from_secs(600),
        );
        let ports = BTreeSet::from([10000]);
        let patch = sync_patch(&service, &ports, &book).expect("a change");
        assert_eq!(patch["metadata"]["resourceVersion"], "41");
        assert_eq!(patch["spec"]["ports"].as_array().unwrap().len(), 2);
        let recorded: PortBook = serde_json::from_str(
            patch["metadata"]["annotations"][PORTS_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(recorded, book);

        // The Service as the API server returns it after the patch: nothing to do.
        service.spec.as_mut().unwrap().ports =
            serde_json::from_value(patch["spec"]["ports"].clone()).unwrap();
        service.metadata.annotations = Some(
            [(
                PORTS_ANNOTATION.to_owned(),
                serde_json::to_string(&book).unwrap(),
            )]
            .into(),
        );
        assert_eq!(port_book(&service), book);
        assert_eq!(tunnel_ports(&service), ports);
        assert_eq!(sync_patch(&service, &ports, &book), None);
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
        service.spec.as_mut().unwrap().cluster_ip = Some("fd00::7".into());
        assert_eq!(
            relay_address(&service, 4443).as_deref(),
            Some("[fd00::7]:4443")
        );
        service.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        assert_eq!(relay_address(&service, 4443), None);
    }
}
