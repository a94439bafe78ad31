//! The reconciler's decisions, free of I/O: from what one pass read ([`Observed`]) to
//! what it must write ([`Plan`]). The controller reads, calls [`plan`], and applies the
//! result; every rule here is tested without an API server.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use localup_protocol::PortRange;

use crate::allocator::{self, Decision};
use crate::config::Config;
use crate::crd::{PROVISIONED, READY, TcpTunnel, TcpTunnelStatus};
use crate::guard::{self, NamespacePolicy, Refusal};
use crate::keys::LEGACY_FINALIZER;
use crate::relay_service;
use crate::sidecar::{self, Mode};
use crate::status::{self, Clients, Outcome};
use crate::token::{self, Credentials, RelayTrust, Written};
use crate::workloads::{self, CensusRules};

/// A tunnel that does not serve yet is looked at again this soon (a conflicting port
/// may have been freed, a missing relay installed, a sidecar joined).
pub const RETRY_NOT_READY: Duration = Duration::from_secs(10);
/// A provisioned tunnel waiting for its pods or address is looked at again this soon;
/// pod and relay Service changes wake it earlier.
pub const RECHECK_PROVISIONED: Duration = Duration::from_secs(60);
/// A serving tunnel is looked at again at least this often.
pub const RECHECK_READY: Duration = Duration::from_secs(3600);

/// The operator's rules for every tunnel, from its flags.
#[derive(Debug, Clone)]
pub struct Rules {
    pub range: PortRange,
    pub quarantine: Duration,
    pub token_lifetime: Duration,
    /// `namespace/name` of the relay Service, for messages.
    pub relay_service: String,
    pub control_port: u16,
    pub public_address: Option<String>,
    pub quota: usize,
    pub namespaces: NamespacePolicy,
    pub mode: Mode,
    pub require_consent: bool,
}

impl Rules {
    pub fn from_config(config: &Config, mode: Mode) -> Self {
        Rules {
            range: config.port_range,
            quarantine: config.port_quarantine,
            token_lifetime: config.token_lifetime,
            relay_service: format!("{}/{}", config.relay_namespace, config.relay_service),
            control_port: config.relay_control_port,
            public_address: config.public_address.clone(),
            quota: config.max_tunnels_per_namespace,
            namespaces: NamespacePolicy {
                allowed: config
                    .allowed_namespaces
                    .iter()
                    .filter(|namespace| !namespace.is_empty())
                    .cloned()
                    .collect(),
                selector: config.namespace_selector.clone(),
            },
            mode,
            require_consent: config.require_pod_consent,
        }
    }
}

/// What one pass read.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The tunnel as the fresh list has it.
    pub tunnel: &'a TcpTunnel,
    /// Every TcpTunnel of the cluster, listed in this pass.
    pub tunnels: &'a [TcpTunnel],
    /// The relay Service; `None` when it does not exist.
    pub relay_service: Option<&'a Service>,
    /// The relay's signing secret and certificate, or what is missing.
    pub relay_trust: Result<&'a RelayTrust, &'a str>,
    /// The tunnel namespace's labels, read only when a namespace selector needs them.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
    /// The pods of the tunnel's namespace its selector matches.
    pub pods: &'a [Pod],
    /// Whether this operator process wrote the token Secret the status describes.
    pub token_written_by_this_process: bool,
    pub now: Timestamp,
}

/// A workload to roll because of `pod`: to give it the tunnel's current sidecar
/// (`port` Some) or to take it away.
#[derive(Debug, Clone)]
pub struct Roll<'a> {
    pub pod: &'a Pod,
    pub target: String,
    pub port: Option<u16>,
}

/// An Event about the tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: String,
    pub message: String,
}

/// What one pass must write, in the order the controller applies it.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Remove the finalizer of earlier versions.
    pub remove_legacy_finalizer: bool,
    /// The tunnel is being deleted: nothing but the finalizer to do.
    pub deleting: bool,
    /// Merge patch for the relay Service (ports and port book).
    pub relay_service_patch: Option<serde_json::Value>,
    /// The token Secret to apply, with the digest it was made from.
    pub token_secret: Option<(Secret, String)>,
    /// The status to apply, when it differs from the current one.
    pub status: Option<TcpTunnelStatus>,
    pub outcome: Option<Outcome>,
    pub note: Option<Note>,
    pub rolls: Vec<Roll<'a>>,
    /// The tunnel gave up pods or a port: the sweep should look at injected pods now.
    pub wake_sweep: bool,
    pub requeue: Duration,
}

fn millis(now: Timestamp) -> u64 {
    u64::try_from(now.as_millisecond()).unwrap_or(0)
}

fn seconds(now: Timestamp) -> u64 {
    u64::try_from(now.as_second()).unwrap_or(0)
}

/// The decisions for one tunnel.
pub fn plan<'a>(observed: Observed<'a>, rules: &Rules) -> Plan<'a> {
    let tunnel = observed.tunnel;
    let mut plan = Plan {
        remove_legacy_finalizer: tunnel.finalizers().iter().any(|f| f == LEGACY_FINALIZER),
        deleting: tunnel.is_deleting(),
        requeue: RETRY_NOT_READY,
        ..Default::default()
    };
    if plan.deleting {
        plan.wake_sweep = true;
        return plan;
    }
    let current = tunnel.status.clone().unwrap_or_default();
    let was_provisioned = tunnel.is_provisioned();
    let namespace = tunnel.namespace().unwrap_or_default();
    let now_ms = millis(observed.now);

    // What may the tunnel do at all?
    let policy = rules
        .namespaces
        .check(&namespace, observed.namespace_labels)
        .and_then(|()| guard::tunnel_selector(tunnel).map(drop))
        .and_then(|()| tunnel.policy().map_err(Refusal::InvalidSpec))
        .and_then(|policy| {
            guard::check_quota(tunnel, observed.tunnels, rules.quota).map(|()| policy)
        });

    let Some(service) = observed.relay_service else {
        return match policy {
            Err(refusal) => {
                plan.wake_sweep = tunnel.assigned_port().is_some();
                let outcome = Outcome::Refused(refusal);
                finish(plan, observed, TcpTunnelStatus::default(), None, outcome)
            }
            Ok(_) => {
                let outcome = Outcome::RelayNotFound {
                    service: rules.relay_service.clone(),
                };
                finish(plan, observed, current, None, outcome)
            }
        };
    };

    // The port, decided from every tunnel's record and the Service's port book.
    let holdings = allocator::holdings(observed.tunnels);
    let book = relay_service::port_book(service).update(&holdings, now_ms, rules.quarantine);
    let key = tunnel.key();
    let decided = policy.map_err(Outcome::Refused).and_then(|policy| {
        let decision = allocator::decide(
            allocator::Request {
                tunnel: &key,
                requested: tunnel
                    .spec
                    .remote_port
                    .map(|port| u16::try_from(port).unwrap_or(0)),
                current: tunnel
                    .assigned_port()
                    .map(|port| (port, tunnel.port_epoch())),
            },
            allocator::Rules {
                range: rules.range,
                quarantine: rules.quarantine,
                now_ms,
            },
            &holdings,
            &book,
        );
        let retry_at =
            |until_ms: u64| Duration::from_millis(until_ms.saturating_sub(now_ms).max(1000));
        match decision {
            Decision::Assigned { port, epoch } => Ok((port, epoch, policy)),
            Decision::Conflict { requested, holder } => {
                Err(Outcome::PortConflict { requested, holder })
            }
            Decision::OutOfRange { requested, range } => {
                Err(Outcome::PortOutOfRange { requested, range })
            }
            Decision::Quarantined {
                requested,
                released_by,
                until_ms,
            } => {
                plan.requeue = retry_at(until_ms);
                Err(Outcome::PortQuarantined {
                    requested,
                    released_by,
                    until: Timestamp::from_millisecond(until_ms as i64).unwrap_or(observed.now),
                })
            }
            Decision::Exhausted { range, until_ms } => {
                if let Some(until_ms) = until_ms {
                    plan.requeue = retry_at(until_ms);
                }
                Err(Outcome::PortsExhausted { range })
            }
        }
    });

    // The Service carries exactly the ports held once this decision is recorded.
    let mut after = holdings.clone();
    after.retain(|_, holder| *holder != key);
    if let Ok((port, _, _)) = &decided {
        after.insert(*port, key.clone());
    }
    let book = book.update(&after, now_ms, rules.quarantine);
    let ports = after.keys().copied().collect();
    plan.relay_service_patch = relay_service::sync_patch(service, &ports, &book);

    let (port, epoch, policy) = match decided {
        Ok(decided) => decided,
        Err(outcome) => {
            // Refused: the tunnel holds no port, its pods lose the sidecar.
            plan.wake_sweep = tunnel.assigned_port().is_some();
            let refused = TcpTunnelStatus::default();
            return finish(plan, observed, refused, None, outcome);
        }
    };

    // The relay's address and credentials.
    let Some(relay_address) = relay_service::relay_address(service, rules.control_port) else {
        let outcome = Outcome::RelayNotFound {
            service: rules.relay_service.clone(),
        };
        let status = holding(current, port, epoch, was_provisioned);
        return finish(plan, observed, status, None, outcome);
    };
    let trust = match observed.relay_trust {
        Ok(trust) => trust,
        Err(problem) => {
            let outcome = Outcome::RelaySecretMissing {
                problem: problem.to_owned(),
            };
            let status = holding(current, port, epoch, was_provisioned);
            return finish(plan, observed, status, None, outcome);
        }
    };
    let credentials = Credentials {
        subject: &key,
        port,
        epoch,
        policy: &policy,
        relay_address: &relay_address,
        trust,
        lifetime: rules.token_lifetime,
    };
    let digest = credentials.digest();
    let written_expiry = current
        .token_expires_at
        .as_ref()
        .and_then(|time| u64::try_from(time.0.as_second()).ok());
    let now = seconds(observed.now);
    let expires = if token::needs_writing(
        Written {
            digest: current.credentials_digest.as_deref(),
            expires: written_expiry,
        },
        &digest,
        rules.token_lifetime,
        now,
        observed.token_written_by_this_process,
    ) {
        let (jwt, expires) = credentials.mint();
        let secret = token::token_secret(tunnel, &jwt, &trust.ca_pem);
        plan.token_secret = Some((secret, digest.clone()));
        expires
    } else {
        written_expiry.unwrap_or(now)
    };
    let renew_in = token::renewal_time(expires, rules.token_lifetime).saturating_sub(now);

    // Provisioned: who serves?
    let secret_name = token::token_secret_name(&tunnel.name_any());
    let fingerprint = sidecar::fingerprint(port, tunnel.spec.port, &relay_address);
    let census = workloads::census(
        tunnel,
        observed.pods,
        observed.tunnels,
        CensusRules {
            fingerprint: Some(&fingerprint),
            mode: rules.mode,
            require_consent: rules.require_consent,
        },
    );
    let clients = Clients {
        serving: census.serving,
        expected: census.expected,
    };
    let endpoint = relay_service::endpoint(service, rules.public_address.as_deref(), port);
    let outcome = match &endpoint {
        None => Outcome::AwaitingAddress {
            port,
            service: rules.relay_service.clone(),
        },
        Some(endpoint) if clients.expected > 0 && clients.serving == clients.expected => {
            Outcome::Serving {
                port,
                endpoint: endpoint.clone(),
                clients,
            }
        }
        Some(_) if clients.expected == 0 => {
            let mut notes = Vec::new();
            if census.without_consent > 0 {
                notes.push(format!(
                    "{} selected pod(s) lack the annotation localup.dev/inject: \"true\" the \
                     operator requires",
                    census.without_consent
                ));
            }
            if census.jobs_left_alone > 0 {
                notes.push(format!(
                    "{} Job pod(s) are left without the sidecar: without native sidecars \
                     (Kubernetes 1.29+) it would keep them from completing",
                    census.jobs_left_alone
                ));
            }
            if notes.is_empty() {
                Outcome::NoPods { port }
            } else {
                Outcome::PodsNotServing {
                    port,
                    clients,
                    note: notes.join("; "),
                }
            }
        }
        Some(_) => Outcome::PodsNotServing {
            port,
            clients,
            note: if census.missing.is_empty() {
                "waiting for their sidecars to join the relay".into()
            } else {
                format!(
                    "{} pod(s) lack the current sidecar; their workloads are rolled",
                    census.missing.len()
                )
            },
        },
    };
    // Pods get the sidecar by rolling their workloads, but only once the webhook's view
    // of the tunnel (its cache of the status this pass may be about to write) already
    // has everything the sidecar is built from; else the new pods would come too early.
    let webhook_sees_it = was_provisioned
        && current.remote_port == Some(i32::from(port))
        && current.relay_address.as_deref() == Some(relay_address.as_str())
        && current.token_secret.as_deref() == Some(secret_name.as_str())
        && current.observed_generation == tunnel.metadata.generation;
    let target = workloads::roll_target(&tunnel.name_any(), Some(&fingerprint));
    if webhook_sees_it {
        plan.rolls.extend(census.missing.iter().map(|pod| Roll {
            pod,
            target: target.clone(),
            port: Some(port),
        }));
    }
    let away = workloads::roll_target(&tunnel.name_any(), None);
    plan.rolls.extend(census.stale.iter().map(|pod| Roll {
        pod,
        target: away.clone(),
        port: None,
    }));
    if tunnel.metadata.generation != current.observed_generation {
        plan.wake_sweep = true;
    }
    let status = TcpTunnelStatus {
        remote_port: Some(i32::from(port)),
        port_epoch: i64::try_from(epoch).ok(),
        endpoint,
        relay_address: Some(relay_address),
        token_secret: Some(secret_name.clone()),
        token_expires_at: Timestamp::from_second(expires as i64).ok().map(Time),
        credentials_digest: Some(digest),
        clients: Some(clients.to_string()),
        observed_generation: tunnel.metadata.generation,
        conditions: Vec::new(),
    };
    let ready = outcome.is_ready();
    let mut plan = finish(plan, observed, status, Some((port, &secret_name)), outcome);
    // Renewal is due in time even with a lifetime of seconds.
    let renewal = Duration::from_secs(renew_in.max(1));
    plan.requeue = if ready {
        renewal.min(RECHECK_READY)
    } else {
        renewal.min(RECHECK_PROVISIONED)
    };
    plan
}

/// The status of a tunnel that keeps its port through a passing failure: its record of
/// the port stays, everything else as it was.
fn holding(
    current: TcpTunnelStatus,
    port: u16,
    epoch: u64,
    was_provisioned: bool,
) -> TcpTunnelStatus {
    let mut status = if was_provisioned {
        current
    } else {
        TcpTunnelStatus::default()
    };
    status.remote_port = Some(i32::from(port));
    status.port_epoch = i64::try_from(epoch).ok();
    status
}

/// Adds the conditions to `status` and decides the status write, the Event and the
/// requeue. `provisioned`: the port and token Secret when the tunnel can serve.
fn finish<'a>(
    mut plan: Plan<'a>,
    observed: Observed<'a>,
    mut status: TcpTunnelStatus,
    provisioned: Option<(u16, &str)>,
    outcome: Outcome,
) -> Plan<'a> {
    let tunnel = observed.tunnel;
    let generation = tunnel.metadata.generation;
    // A passing failure leaves a provisioned tunnel provisioned: its pods keep working.
    let keeps_provisioned = provisioned.is_none()
        && !outcome.is_refusal()
        && tunnel.is_provisioned()
        && status.remote_port.is_some();
    let previous_provisioned = tunnel.condition(PROVISIONED);
    let provisioned_condition = match previous_provisioned.filter(|_| keeps_provisioned) {
        Some(previous) => previous.clone(),
        None => status::provisioned_condition(
            provisioned,
            &outcome,
            generation,
            previous_provisioned,
            observed.now,
        ),
    };
    let previous_ready = tunnel.condition(READY);
    let ready = status::ready_condition(&outcome, generation, previous_ready, observed.now);
    status.observed_generation = generation;
    status.conditions = vec![provisioned_condition, ready.clone()];
    if tunnel.status.as_ref() != Some(&status) {
        plan.status = Some(status);
    }
    let changed = previous_ready.is_none_or(|previous| {
        previous.reason != ready.reason
            || (outcome.is_problem() && previous.message != ready.message)
    });
    if changed {
        plan.note = Some(Note {
            warning: outcome.is_problem(),
            reason: ready.reason.clone(),
            message: ready.message.clone(),
        });
    }
    plan.outcome = Some(outcome);
    plan
}

/// The status after a failed write (`outcome` an [`Outcome::ApiFailed`]): Ready=False
/// with the API's message; everything else, Provisioned included, as it was.
pub fn failed_status(tunnel: &TcpTunnel, outcome: &Outcome, now: Timestamp) -> TcpTunnelStatus {
    let mut status = tunnel.status.clone().unwrap_or_default();
    let generation = tunnel.metadata.generation;
    let ready = status::ready_condition(outcome, generation, tunnel.condition(READY), now);
    let provisioned = tunnel
        .condition(PROVISIONED)
        .cloned()
        .unwrap_or_else(|| status::provisioned_condition(None, outcome, generation, None, now));
    status.conditions = vec![provisioned, ready];
    status
}

/// What the sweep rolls: pods carrying a sidecar whose tunnel is gone, being deleted,
/// no longer provisioned, or no longer the one that wins the pod.
pub fn sweep_rolls<'a>(tunnels: &[TcpTunnel], pods: &'a [Pod]) -> Vec<Roll<'a>> {
    pods.iter()
        .filter(|pod| workloads::is_live(pod))
        .filter_map(|pod| {
            let name = workloads::injected_tunnel(pod)?;
            let namespace = pod.namespace().unwrap_or_default();
            let tunnel = tunnels.iter().find(|tunnel| {
                tunnel.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && tunnel.name_any() == name
                    && !tunnel.is_deleting()
            });
            let keeps = tunnel.is_some_and(|tunnel| {
                tunnel.is_provisioned()
                    && guard::winner(&namespace, pod, tunnels)
                        .is_some_and(|winner| winner.key() == tunnel.key())
            });
            (!keeps).then(|| Roll {
                pod,
                target: workloads::roll_target(name, None),
                port: None,
            })
        })
        .collect()
}

/// The name of the tunnel whose sidecar `pod` carries ("" when none).
pub fn tunnel_name_of(pod: &Pod) -> String {
    workloads::injected_tunnel(pod)
        .unwrap_or_default()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

    use super::*;
    use crate::allocator::{PortBook, Release};
    use crate::fixtures::*;
    use crate::keys::PORTS_ANNOTATION;

    fn rules() -> Rules {
        let config = <Config as clap::Parser>::try_parse_from(["localup-operator"]).unwrap();
        Rules::from_config(&config, Mode::Native)
    }

    fn trust() -> RelayTrust {
        RelayTrust {
            jwt_secret: JWT_SECRET.to_vec(),
            ca_pem: CA_PEM.into(),
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn observed<'a>(
        tunnel: &'a TcpTunnel,
        tunnels: &'a [TcpTunnel],
        service: Option<&'a Service>,
        trust: Result<&'a RelayTrust, &'a str>,
    ) -> Observed<'a> {
        Observed {
            tunnel,
            tunnels,
            relay_service: service,
            relay_trust: trust,
            namespace_labels: None,
            pods: &[],
            token_written_by_this_process: true,
            now: now(),
        }
    }

    fn reason(plan: &Plan<'_>, type_: &str) -> (String, String) {
        let status = plan.status.as_ref().expect("a status");
        let condition = status
            .conditions
            .iter()
            .find(|condition| condition.type_ == type_)
            .unwrap();
        (condition.status.clone(), condition.reason.clone())
    }

    /// A tunnel provisioned by a first plan, as the API server then returns it.
    fn provisioned(rules: &Rules, service: &Service) -> TcpTunnel {
        let tunnel = TcpTunnel::test();
        let trust = trust();
        let tunnels = [tunnel.clone()];
        let first = plan(
            observed(&tunnel, &tunnels, Some(service), Ok(&trust)),
            rules,
        );
        let status = first.status.unwrap();
        tunnel.clone().with_status(status)
    }

    #[test]
    fn a_selector_matching_everything_is_refused_and_gives_up_its_port() {
        let rules = rules();
        let service = relay_service();
        let mut tunnel = provisioned(&rules, &service);
        assert!(tunnel.is_provisioned());
        tunnel.spec.selector = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: "DoesNotExist".into(),
                values: None,
            }]),
            ..Default::default()
        };
        let tunnels = [tunnel.clone()];
        let trust = trust();
        let held = {
            let mut service = service.clone();
            let patch = relay_service::sync_patch(
                &service,
                &[10000].into(),
                &PortBook::default().update(&allocator::holdings(&tunnels), 1, rules.quarantine),
            )
            .unwrap();
            let mut value = serde_json::to_value(&service).unwrap();
            merge(&mut value, &patch);
            service = serde_json::from_value(value).unwrap();
            service
        };
        let plan = plan(observed(&tunnel, &tunnels, Some(&held), Ok(&trust)), &rules);
        assert_eq!(
            reason(&plan, PROVISIONED),
            ("False".into(), "SelectorTooBroad".into())
        );
        assert_eq!(
            reason(&plan, READY),
            ("False".into(), "SelectorTooBroad".into())
        );
        let status = plan.status.as_ref().unwrap();
        assert_eq!(status.remote_port, None, "the port is given up");
        let patch = plan
            .relay_service_patch
            .as_ref()
            .expect("the port leaves the Service");
        assert_eq!(patch["spec"]["ports"].as_array().unwrap().len(), 2);
        assert!(plan.wake_sweep, "the sweep takes the sidecars back");
        assert!(plan.note.as_ref().unwrap().warning);
        assert!(plan.token_secret.is_none());
    }

    #[test]
    fn a_requested_port_resting_after_its_release_waits_for_the_quarantine() {
        let rules = rules();
        let mut service = relay_service();
        let released_at = now().as_millisecond() as u64 - 60_000;
        let book = PortBook {
            held: Default::default(),
            released: [(
                10005,
                Release {
                    by: "other/old".into(),
                    at: released_at,
                },
            )]
            .into(),
        };
        service.metadata.annotations = Some(
            [(
                PORTS_ANNOTATION.to_owned(),
                serde_json::to_string(&book).unwrap(),
            )]
            .into(),
        );
        let tunnel = TcpTunnel::test().requesting(10005);
        let tunnels = [tunnel.clone()];
        let trust = trust();
        let plan = plan(
            observed(&tunnel, &tunnels, Some(&service), Ok(&trust)),
            &rules,
        );
        assert_eq!(
            reason(&plan, READY),
            ("False".into(), "PortQuarantined".into())
        );
        assert_eq!(
            plan.requeue,
            Duration::from_secs(540),
            "retried when it ends"
        );
        assert!(plan.outcome.unwrap().message().contains("other/old"));
    }

    #[test]
    fn a_passing_failure_keeps_a_provisioned_tunnel_provisioned() {
        let rules = rules();
        let service = relay_service();
        let tunnel = provisioned(&rules, &service);
        let tunnels = [tunnel.clone()];
        let missing = "the relay's Secret localup-system/localup-relay-jwt does not exist";
        let plan = plan(
            observed(&tunnel, &tunnels, Some(&service), Err(missing)),
            &rules,
        );
        let status = plan.status.as_ref().unwrap();
        assert_eq!(
            reason(&plan, PROVISIONED).0,
            "True",
            "the pods keep their sidecar"
        );
        assert_eq!(
            reason(&plan, READY),
            ("False".into(), "RelaySecretMissing".into())
        );
        assert_eq!(
            status.remote_port,
            tunnel.status.as_ref().unwrap().remote_port
        );
        assert_eq!(status.token_secret.as_deref(), Some("mydb-localup-token"));

        let gone = plan_without_service(&tunnel, &rules);
        assert_eq!(gone.0, "True");
        assert_eq!(gone.1, "RelayNotFound");
    }

    fn plan_without_service(tunnel: &TcpTunnel, rules: &Rules) -> (String, String) {
        let tunnels = [tunnel.clone()];
        let trust = trust();
        let plan = plan(observed(tunnel, &tunnels, None, Ok(&trust)), rules);
        (reason(&plan, PROVISIONED).0, reason(&plan, READY).1)
    }

    #[test]
    fn the_token_is_renewed_at_half_its_lifetime() {
        let mut rules = rules();
        rules.token_lifetime = Duration::from_secs(60);
        let service = relay_service();
        let mut tunnel = provisioned(&rules, &service);
        let trust = trust();
        let expires = tunnel
            .status
            .as_ref()
            .unwrap()
            .token_expires_at
            .clone()
            .unwrap();
        let tunnels = [tunnel.clone()];
        let mut early = observed(&tunnel, &tunnels, Some(&service), Ok(&trust));
        early.now = expires.0 - k8s_openapi::jiff::SignedDuration::from_secs(31);
        let early = plan(early, &rules);
        assert!(early.token_secret.is_none());
        assert!(
            early.requeue <= Duration::from_secs(1),
            "{:?}",
            early.requeue
        );
        let mut due = observed(&tunnel, &tunnels, Some(&service), Ok(&trust));
        due.now = expires.0 - k8s_openapi::jiff::SignedDuration::from_secs(30);
        assert!(plan(due, &rules).token_secret.is_some());
        // A new relay signing secret: a new token at once.
        tunnel = tunnels[0].clone();
        let rotated = RelayTrust {
            jwt_secret: b"rotated".to_vec(),
            ..trust.clone()
        };
        let tunnels = [tunnel.clone()];
        let mut rotation = observed(&tunnel, &tunnels, Some(&service), Ok(&rotated));
        rotation.now = expires.0 - k8s_openapi::jiff::SignedDuration::from_secs(59);
        assert!(plan(rotation, &rules).token_secret.is_some());
    }

    #[test]
    fn the_quota_refuses_a_tunnel_beyond_it() {
        let mut rules = rules();
        rules.quota = 1;
        let service = relay_service();
        let holder = provisioned(&rules, &service);
        let newcomer = TcpTunnel::test().named("second");
        let tunnels = [holder, newcomer.clone()];
        let trust = trust();
        let plan = plan(
            observed(&newcomer, &tunnels, Some(&service), Ok(&trust)),
            &rules,
        );
        assert_eq!(
            reason(&plan, READY),
            ("False".into(), "QuotaExceeded".into())
        );
    }

    #[test]
    fn a_namespace_outside_the_allowlist_is_refused() {
        let mut rules = rules();
        rules.namespaces.allowed = vec!["prod".into()];
        let tunnel = TcpTunnel::test();
        let tunnels = [tunnel.clone()];
        let trust = trust();
        let service = relay_service();
        let plan = plan(
            observed(&tunnel, &tunnels, Some(&service), Ok(&trust)),
            &rules,
        );
        assert_eq!(
            reason(&plan, READY),
            ("False".into(), "NamespaceNotAllowed".into())
        );
        assert!(plan.relay_service_patch.is_none(), "nothing to change");
    }

    #[test]
    fn the_sweep_rolls_pods_whose_tunnel_is_gone_or_no_longer_serves_them() {
        let fingerprint = "remotePort=10000,port=5432,relay=10.0.0.7:4443";
        let pods = [
            Pod::test("kept").injected("mydb", fingerprint),
            Pod::test("orphan").injected("gone", fingerprint),
            Pod::test("unselected")
                .labelled("app", "web")
                .injected("mydb", fingerprint),
            Pod::test("plain"),
            Pod::test("finished")
                .injected("gone", fingerprint)
                .phase("Succeeded"),
        ];
        let tunnels = [TcpTunnel::test().provisioned(10000)];
        let rolls = sweep_rolls(&tunnels, &pods);
        let names: Vec<_> = rolls.iter().map(|roll| roll.pod.name_any()).collect();
        assert_eq!(names, ["orphan", "unselected"]);
        assert!(rolls.iter().all(|roll| roll.port.is_none()));
        assert_eq!(tunnel_name_of(rolls[0].pod), "gone");
    }
}
