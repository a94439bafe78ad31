//! Port assignment decisions, kept free of I/O so every rule is unit-tested.
//!
//! The record of who holds which port is the `status.remotePort` (and `portEpoch`) of
//! every TcpTunnel. The controller reads all of them fresh from the API server and
//! decides while holding one lock, and writes the decision before releasing it, so two
//! tunnels never get the same port, however many are created at once and across
//! operator restarts.
//!
//! A port its holder gave up (deleted, moved, refused) is quarantined: no other tunnel
//! gets it for a while, so the old holder's tokens expire, or meet the newer port epoch
//! at the relay, before anyone else's sidecars depend on the port. The record of freed
//! ports, the [`PortBook`], lives in an annotation of the relay Service, so it survives
//! operator restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use localup_protocol::PortRange;
use serde::{Deserialize, Serialize};

use crate::crd::TcpTunnel;

/// Which tunnel (`namespace/name`) holds each public port.
pub type Holdings = BTreeMap<u16, String>;

/// Who holds which port according to the tunnels' status records. Should two records
/// name the same port (a restored backup, a hand-edited status), the oldest tunnel keeps
/// it, so every reconcile agrees on one holder. Tunnels being deleted hold nothing.
pub fn holdings(tunnels: &[TcpTunnel]) -> Holdings {
    let mut by_age: Vec<&TcpTunnel> = tunnels
        .iter()
        .filter(|tunnel| !tunnel.is_deleting())
        .collect();
    by_age.sort_by_key(|tunnel| (tunnel.metadata.creation_timestamp.clone(), tunnel.key()));
    let mut holdings = Holdings::new();
    for tunnel in by_age {
        if let Some(port) = tunnel.assigned_port() {
            holdings.entry(port).or_insert_with(|| tunnel.key());
        }
    }
    holdings
}

/// A port given up by `by` at `at` (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub by: String,
    pub at: u64,
}

/// The relay Service's memory of its tunnel ports: who held each one when the operator
/// last wrote the Service, and which were released when.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortBook {
    #[serde(default)]
    pub held: Holdings,
    #[serde(default)]
    pub released: BTreeMap<u16, Release>,
}

impl PortBook {
    /// The book once `holdings` are the truth at `now_ms`: ports whose recorded holder
    /// no longer holds them are released now; releases older than `quarantine`, and of
    /// ports held again, are forgotten. Applying it twice changes nothing.
    pub fn update(&self, holdings: &Holdings, now_ms: u64, quarantine: Duration) -> PortBook {
        let mut released = self.released.clone();
        for (port, holder) in &self.held {
            if holdings.get(port) != Some(holder) {
                released.insert(
                    *port,
                    Release {
                        by: holder.clone(),
                        at: now_ms,
                    },
                );
            }
        }
        let quarantine_ms = quarantine.as_millis() as u64;
        released.retain(|port, release| {
            !holdings.contains_key(port) && release.at.saturating_add(quarantine_ms) > now_ms
        });
        PortBook {
            held: holdings.clone(),
            released,
        }
    }

    /// Until when (Unix milliseconds) `port` is kept from `tunnel`, if it is: a port
    /// released by another tunnel within the quarantine. A tunnel may take back a port
    /// it released itself (deleted and created again under the same name).
    pub fn quarantined_until(
        &self,
        port: u16,
        tunnel: &str,
        now_ms: u64,
        quarantine: Duration,
    ) -> Option<(u64, &str)> {
        let release = self.released.get(&port)?;
        let until = release.at.saturating_add(quarantine.as_millis() as u64);
        (release.by != tunnel && until > now_ms).then_some((until, release.by.as_str()))
    }
}

/// What a tunnel needs for a decision besides every tunnel's holdings.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub tunnel: &'a str,
    pub requested: Option<u16>,
    /// The port (and its epoch) the tunnel holds now.
    pub current: Option<(u16, Option<u64>)>,
}

/// The rules: the relay's range and how long freed ports rest.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub range: PortRange,
    pub quarantine: Duration,
    pub now_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `epoch` is when the port was assigned to the tunnel: kept for a port it holds,
    /// now for a new one (and always later than the port's last release).
    Assigned { port: u16, epoch: u64 },
    /// The requested port lies outside the ports the relay serves.
    OutOfRange { requested: u16, range: PortRange },
    /// The requested port is held by another tunnel.
    Conflict { requested: u16, holder: String },
    /// The requested port was released by another tunnel and rests until `until`.
    Quarantined {
        requested: u16,
        released_by: String,
        until_ms: u64,
    },
    /// Every port of the range is held or resting; the first comes free at `until_ms`.
    Exhausted {
        range: PortRange,
        until_ms: Option<u64>,
    },
}

/// The port for `request.tunnel` given what every tunnel holds (including itself) and
/// the book of released ports (already [`PortBook::update`]d to `holdings`).
///
/// A requested port is granted when it is in range, no other tunnel holds it and it is
/// not resting. Without a request, a tunnel keeps the port it holds, else gets the
/// lowest port neither held nor resting.
pub fn decide(
    request: Request<'_>,
    rules: Rules,
    holdings: &Holdings,
    book: &PortBook,
) -> Decision {
    let Request {
        tunnel,
        requested,
        current,
    } = request;
    let held_by_other = |port: u16| holdings.get(&port).filter(|holder| *holder != tunnel);
    let resting = |port: u16| book.quarantined_until(port, tunnel, rules.now_ms, rules.quarantine);
    let new_epoch = |port: u16| {
        let after_release = book
            .released
            .get(&port)
            .map_or(0, |release| release.at.saturating_add(1));
        rules.now_ms.max(after_release)
    };
    let keep = |port: u16| match current {
        Some((held, Some(epoch))) if held == port => epoch,
        _ => new_epoch(port),
    };
    if let Some(requested) = requested {
        if !rules.range.contains(requested) {
            return Decision::OutOfRange {
                requested,
                range: rules.range,
            };
        }
        if let Some(holder) = held_by_other(requested) {
            return Decision::Conflict {
                requested,
                holder: holder.clone(),
            };
        }
        if let Some((until_ms, by)) = resting(requested) {
            return Decision::Quarantined {
                requested,
                released_by: by.to_owned(),
                until_ms,
            };
        }
        return Decision::Assigned {
            port: requested,
            epoch: keep(requested),
        };
    }
    if let Some((current, _)) = current
        && rules.range.contains(current)
        && held_by_other(current).is_none()
    {
        return Decision::Assigned {
            port: current,
            epoch: keep(current),
        };
    }
    let mut first_free_at: Option<u64> = None;
    for port in rules.range.iter() {
        if held_by_other(port).is_some() {
            continue;
        }
        match resting(port) {
            Some((until, _)) => {
                first_free_at = Some(first_free_at.map_or(until, |first| first.min(until)));
            }
            None => {
                return Decision::Assigned {
                    port,
                    epoch: keep(port),
                };
            }
        }
    }
    Decision::Exhausted {
        range: rules.range,
        until_ms: first_free_at,
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    use super::*;
    use crate::crd::TcpTunnelStatus;

    const QUARANTINE: Duration = Duration::from_secs(600);
    const NOW: u64 = 1_800_000_000_000;

    fn range() -> PortRange {
        "10000-10004".parse().unwrap()
    }

    fn rules(now_ms: u64) -> Rules {
        Rules {
            range: range(),
            quarantine: QUARANTINE,
            now_ms,
        }
    }

    fn held(entries: &[(u16, &str)]) -> Holdings {
        entries
            .iter()
            .map(|(port, holder)| (*port, holder.to_string()))
            .collect()
    }

    fn ask(tunnel: &str, requested: Option<u16>, current: Option<u16>) -> Request<'_> {
        Request {
            tunnel,
            requested,
            current: current.map(|port| (port, Some(7))),
        }
    }

    fn decide_now(request: Request<'_>, holdings: &Holdings) -> Decision {
        decide(request, rules(NOW), holdings, &PortBook::default())
    }

    fn tunnel(name: &str, created_second: i64, status_port: Option<i32>) -> TcpTunnel {
        let mut tunnel = TcpTunnel::test().named(name);
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
    fn automatic_assignment_takes_the_lowest_free_port_with_a_fresh_epoch() {
        let holdings = held(&[(10000, "ns/a"), (10002, "ns/b")]);
        assert_eq!(
            decide_now(ask("ns/c", None, None), &holdings),
            Decision::Assigned {
                port: 10001,
                epoch: NOW
            }
        );
    }

    #[test]
    fn a_tunnel_keeps_the_port_it_holds_and_its_epoch() {
        let holdings = held(&[(10000, "ns/a"), (10003, "ns/c")]);
        assert_eq!(
            decide_now(ask("ns/c", None, Some(10003)), &holdings),
            Decision::Assigned {
                port: 10003,
                epoch: 7
            }
        );
        // A status without an epoch (written by an older operator) gets one.
        let request = Request {
            current: Some((10003, None)),
            ..ask("ns/c", None, None)
        };
        assert_eq!(
            decide_now(request, &holdings),
            Decision::Assigned {
                port: 10003,
                epoch: NOW
            }
        );
    }

    #[test]
    fn a_requested_free_port_is_granted() {
        let holdings = held(&[(10000, "ns/a")]);
        assert_eq!(
            decide_now(ask("ns/b", Some(10004), None), &holdings),
            Decision::Assigned {
                port: 10004,
                epoch: NOW
            }
        );
        // Changing the request moves the tunnel off its old port.
        assert_eq!(
            decide_now(ask("ns/a", Some(10002), Some(10000)), &holdings),
            Decision::Assigned {
                port: 10002,
                epoch: NOW
            }
        );
    }

    #[test]
    fn a_requested_port_held_by_another_tunnel_names_the_holder() {
        let holdings = held(&[(10001, "ns/first")]);
        assert_eq!(
            decide_now(ask("ns/second", Some(10001), None), &holdings),
            Decision::Conflict {
                requested: 10001,
                holder: "ns/first".into()
            }
        );
    }

    #[test]
    fn a_requested_port_outside_the_range_is_refused() {
        assert_eq!(
            decide_now(ask("ns/a", Some(9999), None), &Holdings::new()),
            Decision::OutOfRange {
                requested: 9999,
                range: range()
            }
        );
    }

    #[test]
    fn a_held_port_outside_a_shrunk_range_is_replaced() {
        assert_eq!(
            decide_now(ask("ns/a", None, Some(20000)), &held(&[(20000, "ns/a")])),
            Decision::Assigned {
                port: 10000,
                epoch: NOW
            }
        );
    }

    #[test]
    fn a_full_range_is_reported() {
        let holdings: Holdings = range()
            .iter()
            .map(|port| (port, format!("ns/{port}")))
            .collect();
        assert_eq!(
            decide_now(ask("ns/new", None, None), &holdings),
            Decision::Exhausted {
                range: range(),
                until_ms: None
            }
        );
    }

    #[test]
    fn many_tunnels_decided_one_after_another_never_collide() {
        let range: PortRange = "10000-10019".parse().unwrap();
        let rules = Rules {
            range,
            ..rules(NOW)
        };
        let mut holdings = Holdings::new();
        for index in 0..20 {
            let name = format!("ns/t{index}");
            let Decision::Assigned { port, .. } = decide(
                ask(&name, None, None),
                rules,
                &holdings,
                &PortBook::default(),
            ) else {
                panic!("no port for {name}");
            };
            assert!(holdings.insert(port, name).is_none());
        }
        assert_eq!(holdings.len(), 20);
    }

    #[test]
    fn the_oldest_record_wins_a_duplicated_port() {
        let mut deleting = tunnel("deleting", 10, Some(10003));
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(99).unwrap()));
        let tunnels = [
            tunnel("young", 200, Some(10001)),
            tunnel("old", 100, Some(10001)),
            tunnel("other", 150, Some(10002)),
            tunnel("unassigned", 50, None),
            deleting,
        ];
        let holdings = holdings(&tunnels);
        assert_eq!(holdings, held(&[(10001, "ns/old"), (10002, "ns/other")]));
        // The younger duplicate moves to a free port instead of sharing one.
        assert_eq!(
            decide_now(ask("ns/young", None, Some(10001)), &holdings),
            Decision::Assigned {
                port: 10000,
                epoch: NOW
            }
        );
    }

    /// A gets P; A is deleted; B asks during the quarantine and gets another port, or is
    /// told to wait when it asks for P by number; after the quarantine B gets P with an
    /// epoch newer than A's.
    #[test]
    fn a_freed_port_rests_before_another_tunnel_gets_it() {
        let t0 = NOW;
        let book = PortBook::default();
        let a = decide(ask("dev/a", None, None), rules(t0), &Holdings::new(), &book);
        let Decision::Assigned {
            port: p,
            epoch: a_epoch,
        } = a
        else {
            panic!("{a:?}")
        };
        let book = book.update(&held(&[(p, "dev/a")]), t0, QUARANTINE);

        // A is deleted: it no longer holds anything.
        let t1 = t0 + 60_000;
        let nothing = Holdings::new();
        let book = book.update(&nothing, t1, QUARANTINE);
        assert_eq!(
            book.released[&p],
            Release {
                by: "dev/a".into(),
                at: t1
            }
        );
        let during = t1 + 1_000;
        match decide(ask("other/b", None, None), rules(during), &nothing, &book) {
            Decision::Assigned { port, .. } => assert_ne!(port, p, "not P during quarantine"),
            other => panic!("{other:?}"),
        }
        let until = t1 + QUARANTINE.as_millis() as u64;
        assert_eq!(
            decide(
                ask("other/b", Some(p), None),
                rules(during),
                &nothing,
                &book
            ),
            Decision::Quarantined {
                requested: p,
                released_by: "dev/a".into(),
                until_ms: until
            }
        );
        // The same tunnel created again may take its port back at once.
        assert!(matches!(
            decide(ask("dev/a", Some(p), None), rules(during), &nothing, &book),
            Decision::Assigned { port, .. } if port == p
        ));

        let after = until + 1;
        let book = book.update(&nothing, after, QUARANTINE);
        assert!(book.released.is_empty(), "the release is forgotten");
        match decide(ask("other/b", None, None), rules(after), &nothing, &book) {
            Decision::Assigned { port, epoch } => {
                assert_eq!(port, p, "P again after the quarantine");
                assert!(epoch > a_epoch, "with a newer epoch");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_new_epoch_is_later_than_the_ports_release_even_with_a_clock_behind() {
        let book = PortBook {
            held: Holdings::new(),
            released: BTreeMap::from([(
                10000,
                Release {
                    by: "dev/a".into(),
                    at: NOW + 5_000,
                },
            )]),
        };
        // dev/a itself may take its port back; its new epoch still follows the release.
        assert_eq!(
            decide(
                ask("dev/a", None, None),
                rules(NOW),
                &Holdings::new(),
                &book
            ),
            Decision::Assigned {
                port: 10000,
                epoch: NOW + 5_001
            }
        );
    }

    #[test]
    fn resting_ports_count_as_taken_when_the_range_is_full() {
        let holdings = held(&[
            (10000, "ns/a"),
            (10001, "ns/b"),
            (10002, "ns/c"),
            (10003, "ns/d"),
        ]);
        let book = PortBook {
            held: held(&[(10004, "ns/gone")]),
            released: BTreeMap::new(),
        }
        .update(&holdings, NOW, QUARANTINE);
        assert_eq!(
            decide(ask("ns/new", None, None), rules(NOW), &holdings, &book),
            Decision::Exhausted {
                range: range(),
                until_ms: Some(NOW + 600_000)
            }
        );
    }

    #[test]
    fn updating_the_book_is_idempotent_and_moves_are_releases() {
        let first = PortBook::default().update(&held(&[(10000, "ns/a")]), NOW, QUARANTINE);
        assert_eq!(first.update(&first.held, NOW + 1, QUARANTINE), first);
        // ns/a moves to 10001: 10000 is released by it.
        let moved = first.update(&held(&[(10001, "ns/a")]), NOW + 2, QUARANTINE);
        assert_eq!(moved.released[&10000].by, "ns/a");
        assert_eq!(moved.held, held(&[(10001, "ns/a")]));
        let json = serde_json::to_string(&moved).unwrap();
        assert_eq!(serde_json::from_str::<PortBook>(&json).unwrap(), moved);
    }
}
