//! Port assignment decisions, kept free of I/O so every rule is unit-tested.
//!
//! The record of who holds which port is the `status.remotePort` of every TcpTunnel.
//! The controller reads all of them fresh from the API server and decides while holding
//! one lock, and writes the decision before releasing it, so two tunnels never get the
//! same port, however many are created at once and across operator restarts.

use std::collections::BTreeMap;

use localup_protocol::PortRange;

use crate::crd::TcpTunnel;

/// Which tunnel (`namespace/name`) holds each public port.
pub type Holdings = BTreeMap<u16, String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Assigned(u16),
    /// The requested port lies outside the ports the relay serves.
    OutOfRange {
        requested: u16,
        range: PortRange,
    },
    /// The requested port is held by another tunnel.
    Conflict {
        requested: u16,
        holder: String,
    },
    /// Every port of the range is held.
    Exhausted {
        range: PortRange,
    },
}

/// Who holds which port according to the tunnels' status records. Should two records
/// name the same port (a restored backup, a hand-edited status), the oldest tunnel keeps
/// it, so every reconcile agrees on one holder.
pub fn holdings(tunnels: &[TcpTunnel]) -> Holdings {
    let mut by_age: Vec<&TcpTunnel> = tunnels.iter().collect();
    by_age.sort_by_key(|tunnel| (tunnel.metadata.creation_timestamp.clone(), tunnel.key()));
    let mut holdings = Holdings::new();
    for tunnel in by_age {
        if let Some(port) = tunnel.assigned_port() {
            holdings.entry(port).or_insert_with(|| tunnel.key());
        }
    }
    holdings
}

/// The port for `tunnel` given what every tunnel holds (including `tunnel` itself).
///
/// A requested port is granted when it is in range and no other tunnel holds it. Without
/// a request, a tunnel keeps the port it holds, else gets the lowest free one.
pub fn decide(
    tunnel: &str,
    requested: Option<u16>,
    current: Option<u16>,
    range: PortRange,
    holdings: &Holdings,
) -> Decision {
    let held_by_other = |port: u16| holdings.get(&port).filter(|holder| *holder != tunnel);
    if let Some(requested) = requested {
        if !range.contains(requested) {
            return Decision::OutOfRange { requested, range };
        }
        return match held_by_other(requested) {
            Some(holder) => Decision::Conflict {
                requested,
                holder: holder.clone(),
            },
            None => Decision::Assigned(requested),
        };
    }
    if let Some(current) = current
        && range.contains(current)
        && held_by_other(current).is_none()
    {
        return Decision::Assigned(current);
    }
    range
        .iter()
        .find(|port| !holdings.contains_key(port))
        .map(Decision::Assigned)
        .unwrap_or(Decision::Exhausted { range })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::{TcpTunnelSpec, TcpTunnelStatus};

    fn range() -> PortRange {
        "10000-10004".parse().unwrap()
    }

    fn held(entries: &[(u16, &str)]) -> Holdings {
        entries
            .iter()
            .map(|(port, holder)| (*port, holder.to_string()))
            .collect()
    }

    fn tunnel(name: &str, created_second: i64, status_port: Option<i32>) -> TcpTunnel {
        let mut tunnel = TcpTunnel::new(
            name,
            TcpTunnelSpec {
                selector: LabelSelector::default(),
                port: 80,
                remote_port: None,
            },
        );
        tunnel.metadata.namespace = Some("ns".into());
        tunnel.metadata.creation_timestamp =
            Some(Time(Timestamp::from_second(created_second).unwrap()));
        tunnel.status = Some(TcpTunnelStatus {
            remote_port: status_port,
            ..Default::default()
        });
        tunnel
    }

    #[test]
    fn automatic_assignment_takes_the_lowest_free_port() {
        let holdings = held(&[(10000, "ns/a"), (10002, "ns/b")]);
        assert_eq!(
            decide("ns/c", None, None, range(), &holdings),
            Decision::Assigned(10001)
        );
    }

    #[test]
    fn a_tunnel_keeps_the_port_it_holds() {
        let holdings = held(&[(10000, "ns/a"), (10003, "ns/c")]);
        assert_eq!(
            decide("ns/c", None, Some(10003), range(), &holdings),
            Decision::Assigned(10003)
        );
    }

    #[test]
    fn a_requested_free_port_is_granted() {
        let holdings = held(&[(10000, "ns/a")]);
        assert_eq!(
            decide("ns/b", Some(10004), None, range(), &holdings),
            Decision::Assigned(10004)
        );
        // Changing the request moves the tunnel off its old port.
        assert_eq!(
            decide("ns/a", Some(10002), Some(10000), range(), &holdings),
            Decision::Assigned(10002)
        );
    }

    #[test]
    fn a_requested_port_held_by_another_tunnel_names_the_holder() {
        let holdings = held(&[(10001, "ns/first")]);
        assert_eq!(
            decide("ns/second", Some(10001), None, range(), &holdings),
            Decision::Conflict {
                requested: 10001,
                holder: "ns/first".into()
            }
        );
    }

    #[test]
    fn a_requested_port_outside_the_range_is_refused() {
        assert_eq!(
            decide("ns/a", Some(9999), None, range(), &Holdings::new()),
            Decision::OutOfRange {
                requested: 9999,
                range: range()
            }
        );
    }

    #[test]
    fn a_held_port_outside_a_shrunk_range_is_replaced() {
        assert_eq!(
            decide(
                "ns/a",
                None,
                Some(20000),
                range(),
                &held(&[(20000, "ns/a")])
            ),
            Decision::Assigned(10000)
        );
    }

    #[test]
    fn a_full_range_is_reported() {
        let holdings: Holdings = range()
            .iter()
            .map(|port| (port, format!("ns/{port}")))
            .collect();
        assert_eq!(
            decide("ns/new", None, None, range(), &holdings),
            Decision::Exhausted { range: range() }
        );
    }

    #[test]
    fn many_tunnels_decided_one_after_another_never_collide() {
        let range: PortRange = "10000-10019".parse().unwrap();
        let mut holdings = Holdings::new();
        for index in 0..20 {
            let name = format!("ns/t{index}");
            let Decision::Assigned(port) = decide(&name, None, None, range, &holdings) else {
                panic!("no port for {name}");
            };
            assert!(holdings.insert(port, name).is_none());
        }
        assert_eq!(holdings.len(), 20);
    }

    #[test]
    fn the_oldest_record_wins_a_duplicated_port() {
        let tunnels = [
            tunnel("young", 200, Some(10001)),
            tunnel("old", 100, Some(10001)),
            tunnel("other", 150, Some(10002)),
            tunnel("unassigned", 50, None),
        ];
        let holdings = holdings(&tunnels);
        assert_eq!(holdings, held(&[(10001, "ns/old"), (10002, "ns/other")]));
        // The younger duplicate moves to a free port instead of sharing one.
        assert_eq!(
            decide("ns/young", None, Some(10001), range(), &holdings),
            Decision::Assigned(10000)
        );
    }
}
