//! What a reconcile concluded, as the Ready condition users read in
//! `kubectl get tcptunnels` and `kubectl describe`: one reason per outcome and a message
//! that says what to do about it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use localup_protocol::PortRange;

use crate::crd::READY;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Port assigned, token written, port on the relay Service, public address known.
    Assigned {
        port: u16,
        endpoint: String,
    },
    /// All done but the relay Service has no load-balancer address yet.
    AwaitingAddress {
        port: u16,
        service: String,
    },
    PortConflict {
        requested: u16,
        holder: String,
    },
    PortOutOfRange {
        requested: u16,
        range: PortRange,
    },
    PortsExhausted {
        range: PortRange,
    },
    InvalidSelector {
        problem: String,
    },
    RelayNotFound {
        service: String,
    },
    RelaySecretMissing {
        problem: String,
    },
}

impl Outcome {
    pub fn is_ready(&self) -> bool {
        matches!(self, Outcome::Assigned { .. })
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Assigned { .. } => "Assigned",
            Outcome::AwaitingAddress { .. } => "AwaitingAddress",
            Outcome::PortConflict { .. } => "PortConflict",
            Outcome::PortOutOfRange { .. } => "PortOutOfRange",
            Outcome::PortsExhausted { .. } => "PortsExhausted",
            Outcome::InvalidSelector { .. } => "InvalidSelector",
            Outcome::RelayNotFound { .. } => "RelayNotFound",
            Outcome::RelaySecretMissing { .. } => "RelaySecretMissing",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Outcome::Assigned { port, endpoint } => {
                format!("port {port} assigned; reachable at {endpoint}")
            }
            Outcome::AwaitingAddress { port, service } => format!(
                "port {port} assigned; waiting for the relay Service {service} to get a \
                 load-balancer address (or set the operator's --public-address)"
            ),
            Outcome::PortConflict { requested, holder } => format!(
                "remotePort {requested} is already held by TcpTunnel {holder}; \
                 request another port or omit remotePort to get a free one"
            ),
            Outcome::PortOutOfRange { requested, range } => {
                format!("remotePort {requested} is outside the relay's port range {range}")
            }
            Outcome::PortsExhausted { range } => {
                format!("every port of the relay's range {range} is held by another tunnel")
            }
            Outcome::InvalidSelector { problem } => format!("spec.selector is invalid: {problem}"),
            Outcome::RelayNotFound { service } => format!(
                "the relay Service {service} does not exist (is the localup-relay chart \
                 installed, and do the operator's --relay-service/--relay-namespace match it?)"
            ),
            Outcome::RelaySecretMissing { problem } => problem.clone(),
        }
    }
}

/// The Ready condition for `outcome`. The transition time moves only when the
/// condition's status flips, as Kubernetes conventions ask.
pub fn ready_condition(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let status = if outcome.is_ready() { "True" } else { "False" };
    let last_transition_time = previous
        .filter(|previous| previous.status == status)
        .map(|previous| previous.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: READY.into(),
        status: status.into(),
        reason: outcome.reason().into(),
        message: outcome.message(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    #[test]
    fn ready_only_when_assigned_with_an_endpoint() {
        let assigned = Outcome::Assigned {
            port: 16432,
            endpoint: "203.0.113.7:16432".into(),
        };
        let condition = ready_condition(&assigned, Some(3), None, at(100));
        assert_eq!(
            (condition.type_.as_str(), condition.status.as_str()),
            ("Ready", "True")
        );
        assert_eq!(condition.reason, "Assigned");
        assert_eq!(condition.observed_generation, Some(3));
        assert!(condition.message.contains("203.0.113.7:16432"));

        let waiting = Outcome::AwaitingAddress {
            port: 16432,
            service: "localup-system/localup-relay".into(),
        };
        let condition = ready_condition(&waiting, Some(3), None, at(100));
        assert_eq!(condition.status, "False");
        assert!(condition.message.contains("localup-system/localup-relay"));
    }

    #[test]
    fn messages_name_what_is_wrong() {
        let conflict = Outcome::PortConflict {
            requested: 16432,
            holder: "dev/mydb".into(),
        };
        assert_eq!(conflict.reason(), "PortConflict");
        assert!(conflict.message().contains("16432"));
        assert!(conflict.message().contains("dev/mydb"));

        let out_of_range = Outcome::PortOutOfRange {
            requested: 80,
            range: "10000-20000".parse().unwrap(),
        };
        assert_eq!(out_of_range.reason(), "PortOutOfRange");
        assert!(out_of_range.message().contains("10000-20000"));

        let missing = Outcome::RelayNotFound {
            service: "localup-system/localup-relay".into(),
        };
        assert!(missing.message().contains("localup-system/localup-relay"));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let waiting = Outcome::AwaitingAddress {
            port: 1,
            service: "s".into(),
        };
        let conflict = Outcome::PortConflict {
            requested: 1,
            holder: "a/b".into(),
        };
        let ready = Outcome::Assigned {
            port: 1,
            endpoint: "h:1".into(),
        };
        let first = ready_condition(&waiting, Some(1), None, at(100));
        // Still False, other reason: same transition time.
        let second = ready_condition(&conflict, Some(2), Some(&first), at(200));
        assert_eq!(second.last_transition_time, Time(at(100)));
        assert_eq!(second.reason, "PortConflict");
        // False -> True: new transition time.
        let third = ready_condition(&ready, Some(2), Some(&second), at(300));
        assert_eq!(third.last_transition_time, Time(at(300)));
    }
}
