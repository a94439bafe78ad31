//! What a reconcile concluded, as the conditions users read in `kubectl get tcptunnels`
//! and `kubectl describe`: one reason per outcome and a message that says what to do.
//!
//! Two conditions:
//! - `Provisioned`: the tunnel can serve (port assigned, token Secret written, relay
//!   Service carrying the port). The webhook injects sidecars only while it is True. It
//!   turns False when the tunnel is refused (and then holds no port), never because of
//!   a passing failure such as an API error.
//! - `Ready`: the tunnel serves: Provisioned, its public address known, and every pod it
//!   should serve runs a sidecar that joined the relay (`status.clients`). Every
//!   failure, refusal and wait shows here with its own reason.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use localup_protocol::PortRange;

use crate::crd::{PROVISIONED, READY};
use crate::guard::Refusal;

/// The API request that failed, for the reason users see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Reading the tunnels, the relay's Service or Secrets, the namespace or the pods.
    Read,
    /// Writing the relay Service's ports.
    RelayService,
    /// Writing the token Secret.
    TokenSecret,
    /// Rolling a workload.
    Rollout,
    /// Removing the finalizer of earlier versions.
    Finalizer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    // Refusals: the tunnel holds no port.
    Refused(Refusal),
    PortConflict {
        requested: u16,
        holder: String,
    },
    PortOutOfRange {
        requested: u16,
        range: PortRange,
    },
    PortQuarantined {
        requested: u16,
        released_by: String,
        until: Timestamp,
    },
    PortsExhausted {
        range: PortRange,
    },
    // Failures: the tunnel keeps what it holds; retried with backoff.
    RelayNotFound {
        service: String,
    },
    RelaySecretMissing {
        problem: String,
    },
    ApiFailed {
        stage: Stage,
        message: String,
    },
    // Provisioned, not serving yet.
    AwaitingAddress {
        port: u16,
        service: String,
    },
    NoPods {
        port: u16,
    },
    PodsNotServing {
        port: u16,
        clients: Clients,
        note: String,
    },
    Serving {
        port: u16,
        endpoint: String,
        clients: Clients,
    },
}

/// Pods serving the tunnel out of pods that should.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Clients {
    pub serving: usize,
    pub expected: usize,
}

impl std::fmt::Display for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.serving, self.expected)
    }
}

impl Outcome {
    pub fn is_ready(&self) -> bool {
        matches!(self, Outcome::Serving { .. })
    }

    /// A refusal takes the tunnel's port away.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Outcome::Refused(_)
                | Outcome::PortConflict { .. }
                | Outcome::PortOutOfRange { .. }
                | Outcome::PortQuarantined { .. }
                | Outcome::PortsExhausted { .. }
        )
    }

    /// Something the user or an administrator must act on (a Warning Event).
    pub fn is_problem(&self) -> bool {
        self.is_refusal()
            || matches!(
                self,
                Outcome::RelayNotFound { .. }
                    | Outcome::RelaySecretMissing { .. }
                    | Outcome::ApiFailed { .. }
            )
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Refused(refusal) => match refusal {
                Refusal::InvalidSelector(_) => "InvalidSelector",
                Refusal::SelectorTooBroad => "SelectorTooBroad",
                Refusal::NamespaceNotAllowed(_) => "NamespaceNotAllowed",
                Refusal::QuotaExceeded { .. } => "QuotaExceeded",
                Refusal::InvalidSpec(_) => "InvalidSpec",
            },
            Outcome::PortConflict { .. } => "PortConflict",
            Outcome::PortOutOfRange { .. } => "PortOutOfRange",
            Outcome::PortQuarantined { .. } => "PortQuarantined",
            Outcome::PortsExhausted { .. } => "PortsExhausted",
            Outcome::RelayNotFound { .. } => "RelayNotFound",
            Outcome::RelaySecretMissing { .. } => "RelaySecretMissing",
            Outcome::ApiFailed { stage, .. } => match stage {
                Stage::Read => "ApiReadFailed",
                Stage::RelayService => "RelayServiceRejected",
                Stage::TokenSecret => "TokenSecretRejected",
                Stage::Rollout => "RolloutFailed",
                Stage::Finalizer => "FinalizerRemovalFailed",
            },
            Outcome::AwaitingAddress { .. } => "AwaitingAddress",
            Outcome::NoPods { .. } => "NoPods",
            Outcome::PodsNotServing { .. } => "PodsNotServing",
            Outcome::Serving { .. } => "Serving",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Outcome::Refused(refusal) => match refusal {
                Refusal::InvalidSelector(problem) => format!("spec.selector is invalid: {problem}"),
                Refusal::SelectorTooBroad => "spec.selector must name a label the pods have \
                     (matchLabels, or an In or Exists expression): as written it selects \
                     every pod of the namespace that lacks some label"
                    .into(),
                Refusal::NamespaceNotAllowed(why) => format!("tunnels are not served here: {why}"),
                Refusal::QuotaExceeded { limit } => format!(
                    "this namespace already has {limit} tunnel(s) holding a port, the operator's \
                     --max-tunnels-per-namespace; delete one or ask for a higher quota"
                ),
                Refusal::InvalidSpec(problem) => problem.clone(),
            },
            Outcome::PortConflict { requested, holder } => format!(
                "remotePort {requested} is already held by TcpTunnel {holder}; \
                 request another port or omit remotePort to get a free one"
            ),
            Outcome::PortOutOfRange { requested, range } => {
                format!("remotePort {requested} is outside the relay's port range {range}")
            }
            Outcome::PortQuarantined {
                requested,
                released_by,
                until,
            } => format!(
                "remotePort {requested} was released by TcpTunnel {released_by} and is not \
                 given to another tunnel before {until} (the operator's --port-quarantine); \
                 retried then, or omit remotePort to get a free one now"
            ),
            Outcome::PortsExhausted { range } => format!(
                "every port of the relay's range {range} is held by a tunnel or resting after \
                 its release"
            ),
            Outcome::RelayNotFound { service } => format!(
                "the relay Service {service} does not exist or has no cluster IP (is the \
                 localup-relay chart installed, and do the operator's \
                 --relay-service/--relay-namespace match it?)"
            ),
            Outcome::RelaySecretMissing { problem } => problem.clone(),
            Outcome::ApiFailed { stage, message } => {
                let what = match stage {
                    Stage::Read => "cannot read what the tunnel depends on",
                    Stage::RelayService => "the API server refused the relay Service update",
                    Stage::TokenSecret => "the API server refused the token Secret",
                    Stage::Rollout => "cannot roll a workload whose pods need the sidecar",
                    Stage::Finalizer => "cannot remove the finalizer of an earlier version",
                };
                format!("{what}: {message}")
            }
            Outcome::AwaitingAddress { port, service } => format!(
                "port {port} assigned; waiting for the relay Service {service} to get a \
                 load-balancer address (or set the operator's --public-address)"
            ),
            Outcome::NoPods { port } => format!(
                "port {port} assigned, but no running pod matches spec.selector (or all \
                 such pods are another tunnel's)"
            ),
            Outcome::PodsNotServing {
                port,
                clients,
                note,
            } => format!("port {port}: {clients} pods serve; {note}"),
            Outcome::Serving {
                port,
                endpoint,
                clients,
            } => format!("{clients} pods serve port {port}; reachable at {endpoint}"),
        }
    }
}

/// A condition of `type_`; the transition time moves only when its status flips, as
/// Kubernetes conventions ask.
fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .filter(|previous| previous.status == status)
        .map(|previous| previous.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

pub fn ready_condition(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    condition(
        READY,
        outcome.is_ready(),
        outcome.reason(),
        outcome.message(),
        generation,
        previous,
        now,
    )
}

/// `provisioned`: the port, Secret and Service of `port` are in place (`None`: not).
pub fn provisioned_condition(
    provisioned: Option<(u16, &str)>,
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    match provisioned {
        Some((port, secret)) => condition(
            PROVISIONED,
            true,
            "Provisioned",
            format!(
                "port {port} assigned, token Secret {secret} written, relay Service carries the port"
            ),
            generation,
            previous,
            now,
        ),
        None => condition(
            PROVISIONED,
            false,
            outcome.reason(),
            outcome.message(),
            generation,
            previous,
            now,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn serving() -> Outcome {
        Outcome::Serving {
            port: 16432,
            endpoint: "203.0.113.7:16432".into(),
            clients: Clients {
                serving: 2,
                expected: 2,
            },
        }
    }

    #[test]
    fn ready_only_when_every_pod_serves() {
        let condition = ready_condition(&serving(), Some(3), None, at(100));
        assert_eq!(
            (condition.type_.as_str(), condition.status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(condition.reason, "Serving");
        assert_eq!(condition.observed_generation, Some(3));
        assert!(condition.message.contains("2/2 pods serve"));
        assert!(condition.message.contains("203.0.113.7:16432"));

        let partial = Outcome::PodsNotServing {
            port: 16432,
            clients: Clients {
                serving: 1,
                expected: 2,
            },
            note: "waiting for the sidecars to join the relay".into(),
        };
        let condition = ready_condition(&partial, Some(3), None, at(100));
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "PodsNotServing")
        );
        assert!(condition.message.contains("1/2"));
        for waiting in [
            Outcome::NoPods { port: 1 },
            Outcome::AwaitingAddress {
                port: 1,
                service: "localup-system/localup-relay".into(),
            },
        ] {
            assert!(!waiting.is_ready() && !waiting.is_problem() && !waiting.is_refusal());
        }
    }

    #[test]
    fn every_failure_has_its_own_reason_and_says_what_to_do() {
        let cases = [
            (
                Outcome::PortConflict {
                    requested: 16432,
                    holder: "dev/mydb".into(),
                },
                "PortConflict",
                "dev/mydb",
            ),
            (
                Outcome::PortOutOfRange {
                    requested: 80,
                    range: "10000-20000".parse().unwrap(),
                },
                "PortOutOfRange",
                "10000-20000",
            ),
            (
                Outcome::PortQuarantined {
                    requested: 16432,
                    released_by: "old/db".into(),
                    until: at(1_800_000_000),
                },
                "PortQuarantined",
                "old/db",
            ),
            (
                Outcome::Refused(Refusal::SelectorTooBroad),
                "SelectorTooBroad",
                "spec.selector",
            ),
            (
                Outcome::Refused(Refusal::QuotaExceeded { limit: 3 }),
                "QuotaExceeded",
                "3 tunnel(s)",
            ),
            (
                Outcome::RelayNotFound {
                    service: "localup-system/localup-relay".into(),
                },
                "RelayNotFound",
                "localup-system/localup-relay",
            ),
            (
                Outcome::ApiFailed {
                    stage: Stage::RelayService,
                    message: "Service \"localup-relay\" is invalid: spec.ports: may not contain more than 1 protocol".into(),
                },
                "RelayServiceRejected",
                "more than 1 protocol",
            ),
            (
                Outcome::ApiFailed {
                    stage: Stage::TokenSecret,
                    message: "forbidden".into(),
                },
                "TokenSecretRejected",
                "forbidden",
            ),
        ];
        for (outcome, reason, mentioned) in cases {
            assert_eq!(outcome.reason(), reason);
            assert!(
                outcome.message().contains(mentioned),
                "{}",
                outcome.message()
            );
            assert!(outcome.is_problem(), "{reason} is a Warning");
            let condition = ready_condition(&outcome, Some(1), None, at(1));
            assert_eq!(condition.status, "False");
        }
    }

    #[test]
    fn provisioned_is_separate_from_serving() {
        let waiting = Outcome::NoPods { port: 16432 };
        let condition = provisioned_condition(
            Some((16432, "mydb-localup-token")),
            &waiting,
            Some(1),
            None,
            at(1),
        );
        assert_eq!(
            (condition.type_.as_str(), condition.status.as_str()),
            ("Provisioned", "True")
        );
        assert!(condition.message.contains("mydb-localup-token"));
        let refused = Outcome::PortsExhausted {
            range: "10000-10001".parse().unwrap(),
        };
        let condition = provisioned_condition(None, &refused, Some(1), None, at(1));
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "PortsExhausted")
        );
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let waiting = Outcome::NoPods { port: 1 };
        let conflict = Outcome::PortConflict {
            requested: 1,
            holder: "a/b".into(),
        };
        let first = ready_condition(&waiting, Some(1), None, at(100));
        // Still False, other reason: same transition time.
        let second = ready_condition(&conflict, Some(2), Some(&first), at(200));
        assert_eq!(second.last_transition_time, Time(at(100)));
        assert_eq!(second.reason, "PortConflict");
        // False -> True: new transition time.
        let third = ready_condition(&serving(), Some(2), Some(&second), at(300));
        assert_eq!(third.last_transition_time, Time(at(300)));
    }
}
