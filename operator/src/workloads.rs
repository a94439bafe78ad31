//! The pods a tunnel serves, and rolling the workloads that own them.
//!
//! The webhook gives a pod its sidecar only when the pod is created. Pods that a tunnel
//! should serve but that lack its current sidecar (created before the tunnel could
//! serve, while the webhook was unreachable, or for another port) are replaced by
//! rolling their owner: a Deployment (found through its ReplicaSet), StatefulSet or
//! DaemonSet gets a new pod-template annotation, as `kubectl rollout restart` does. A
//! bare pod cannot be replaced by anyone but its creator, and a Job's pods must run to
//! completion: those get an Event instead.
//!
//! Rolls are idempotent and rate-limited: each records its target and time on the
//! workload, and a roll for the same target is repeated at most once per repair
//! interval (and never while the previous rollout is still under way), so a webhook
//! that stays broken never causes a roll loop.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use serde_json::{Value, json};

use crate::crd::TcpTunnel;
use crate::keys::{
    CONSENT_ANNOTATION, RESTARTED_AT_ANNOTATION, ROLLED_ANNOTATION, SIDECAR_ANNOTATION,
    TUNNEL_ANNOTATION, name_fragment, rollout_annotation,
};
use crate::sidecar::{self, Mode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// Who creates a pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Workload(Workload),
    /// A ReplicaSet: usually a Deployment's, which is then what gets rolled.
    ReplicaSet {
        namespace: String,
        name: String,
    },
    Job(String),
    /// No controller: only whoever created the pod can replace it.
    Bare(String),
    /// A controller the operator does not roll (a custom resource's).
    Other {
        kind: String,
        name: String,
    },
}

/// The pod's controlling owner.
pub fn owner(pod: &Pod) -> Owner {
    let namespace = pod.namespace().unwrap_or_default();
    let Some(reference) = pod
        .owner_references()
        .iter()
        .find(|reference| reference.controller == Some(true))
    else {
        return Owner::Bare(pod.name_any());
    };
    let name = reference.name.clone();
    let workload = |kind| {
        Owner::Workload(Workload {
            kind,
            namespace: namespace.clone(),
            name: name.clone(),
        })
    };
    match (reference.api_version.as_str(), reference.kind.as_str()) {
        ("apps/v1", "ReplicaSet") => Owner::ReplicaSet {
            namespace: namespace.clone(),
            name,
        },
        ("apps/v1", "StatefulSet") => workload(WorkloadKind::StatefulSet),
        ("apps/v1", "DaemonSet") => workload(WorkloadKind::DaemonSet),
        ("apps/v1", "Deployment") => workload(WorkloadKind::Deployment),
        ("batch/v1", "Job") => Owner::Job(name),
        (_, kind) => Owner::Other {
            kind: kind.to_owned(),
            name,
        },
    }
}

/// Whether the pod is owned by a Job (known at admission too: the Job controller sets
/// the owner reference when it creates the pod).
pub fn is_job_pod(pod: &Pod) -> bool {
    matches!(owner(pod), Owner::Job(_))
}

pub fn is_live(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|status| status.phase.as_deref())
        .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
    pod.metadata.deletion_timestamp.is_none() && !finished
}

pub fn has_consent(pod: &Pod) -> bool {
    pod.annotations()
        .get(CONSENT_ANNOTATION)
        .is_some_and(|value| value == "true")
}

/// The tunnel whose sidecar the pod carries, by the webhook's annotation.
pub fn injected_tunnel(pod: &Pod) -> Option<&str> {
    sidecar::find(pod)?;
    pod.annotations().get(TUNNEL_ANNOTATION).map(String::as_str)
}

/// How a tunnel's pods stand.
#[derive(Debug, Default)]
pub struct Census<'a> {
    /// Pods that should serve the tunnel.
    pub expected: usize,
    /// Of those, pods whose current sidecar reports ready.
    pub serving: usize,
    /// Pods that should serve but lack the current sidecar: their owners are rolled.
    pub missing: Vec<&'a Pod>,
    /// Pods carrying this tunnel's sidecar that should not (the tunnel cannot serve, or
    /// another tunnel wins them): their owners are rolled so they lose it.
    pub stale: Vec<&'a Pod>,
    /// Job pods left without a sidecar (no native sidecars): not expected to serve.
    pub jobs_left_alone: usize,
    /// Selected pods without the consent annotation, when consent is required.
    pub without_consent: usize,
}

/// What decides which pods a tunnel should serve.
#[derive(Debug, Clone, Copy)]
pub struct CensusRules<'a> {
    /// The fingerprint of the tunnel's current sidecar; `None` when it cannot serve.
    pub fingerprint: Option<&'a str>,
    pub mode: Mode,
    pub require_consent: bool,
}

/// Counts and sorts `pods` (the pods of the namespace the tunnel's selector matches)
/// for `tunnel`; `tunnels` are all tunnels, to know which one wins a pod.
pub fn census<'a>(
    tunnel: &TcpTunnel,
    pods: &'a [Pod],
    tunnels: &[TcpTunnel],
    rules: CensusRules<'_>,
) -> Census<'a> {
    let name = tunnel.name_any();
    let mut census = Census::default();
    for pod in pods.iter().filter(|pod| is_live(pod)) {
        let carries_ours = injected_tunnel(pod) == Some(name.as_str());
        let won = crate::guard::winner(&pod.namespace().unwrap_or_default(), pod, tunnels)
            .is_some_and(|winner| winner.key() == tunnel.key());
        let Some(fingerprint) = rules.fingerprint.filter(|_| won) else {
            if carries_ours {
                census.stale.push(pod);
            }
            continue;
        };
        if rules.require_consent && !has_consent(pod) {
            census.without_consent += 1;
            if carries_ours {
                census.stale.push(pod);
            }
            continue;
        }
        if rules.mode == Mode::Container && is_job_pod(pod) && !carries_ours {
            census.jobs_left_alone += 1;
            continue;
        }
        census.expected += 1;
        let current = carries_ours
            && pod
                .annotations()
                .get(SIDECAR_ANNOTATION)
                .map(String::as_str)
                == Some(fingerprint);
        if !current {
            census.missing.push(pod);
        } else if sidecar::is_ready(pod) {
            census.serving += 1;
        }
    }
    census
}

/// What a workload was last rolled for, from its [`ROLLED_ANNOTATION`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollRecord {
    pub target: String,
    /// Unix seconds.
    pub at: u64,
}

impl RollRecord {
    pub fn parse(value: &str) -> Option<Self> {
        let (target, at) = value.rsplit_once(' ')?;
        Some(RollRecord {
            target: target.to_owned(),
            at: at.parse().ok()?,
        })
    }

    pub fn render(&self) -> String {
        format!("{} {}", self.target, self.at)
    }
}

/// What a roll is for: giving a tunnel's sidecar (with its fingerprint) or taking it
/// away.
pub fn roll_target(tunnel_name: &str, fingerprint: Option<&str>) -> String {
    format!(
        "{}:{}",
        name_fragment(tunnel_name),
        fingerprint.unwrap_or("none")
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RollDecision {
    Roll,
    /// Rolled for the same target recently: not again before `until` (Unix seconds).
    Wait {
        until: u64,
    },
    /// Rolled for the same target and the rollout is still replacing pods.
    InProgress,
}

/// When and how often rolls may happen.
#[derive(Debug, Clone, Copy)]
pub struct RollPace {
    /// Unix seconds.
    pub now: u64,
    /// A roll for the same target is repeated at most this often.
    pub interval: Duration,
    /// When this operator process started (Unix seconds). A roll recorded before it was
    /// made while pods may have been created with no webhook to reach (the operator was
    /// down): the first repair of this process does not wait for the interval.
    pub started: u64,
}

/// Whether to roll a workload for `target` now.
pub fn roll_decision(
    last: Option<&RollRecord>,
    target: &str,
    pace: RollPace,
    rollout_in_progress: bool,
) -> RollDecision {
    let Some(last) = last.filter(|last| last.target == target) else {
        return RollDecision::Roll;
    };
    if rollout_in_progress {
        return RollDecision::InProgress;
    }
    let until = last.at.saturating_add(pace.interval.as_secs());
    if pace.now < until && last.at >= pace.started {
        return RollDecision::Wait { until };
    }
    RollDecision::Roll
}

/// Whether the workload (as JSON) is still replacing pods from an earlier change.
pub fn rollout_in_progress(kind: WorkloadKind, workload: &Value) -> bool {
    let number = |value: &Value| value.as_i64().unwrap_or(0);
    let generation = number(&workload["metadata"]["generation"]);
    let status = &workload["status"];
    if number(&status["observedGeneration"]) < generation {
        return true;
    }
    match kind {
        WorkloadKind::Deployment => {
            let wanted = workload["spec"]["replicas"].as_i64().unwrap_or(1);
            let updated = number(&status["updatedReplicas"]);
            updated < wanted || number(&status["replicas"]) > updated
        }
        WorkloadKind::StatefulSet => {
            let current = status["currentRevision"].as_str();
            let update = status["updateRevision"].as_str();
            update.is_some() && current != update
        }
        WorkloadKind::DaemonSet => {
            number(&status["updatedNumberScheduled"]) < number(&status["desiredNumberScheduled"])
        }
    }
}

/// The merge patch that rolls a workload for a tunnel: a new restart time in its pod
/// template (the change that replaces the pods), the template annotation naming the
/// tunnel's port (`None` removes it), and the record of this roll.
pub fn roll_patch(tunnel_name: &str, port: Option<u16>, record: &RollRecord) -> Value {
    let restarted_at = Timestamp::from_second(record.at as i64)
        .map(|time| time.to_string())
        .unwrap_or_default();
    json!({
        "metadata": {"annotations": {ROLLED_ANNOTATION: record.render()}},
        "spec": {"template": {"metadata": {"annotations": {
            RESTARTED_AT_ANNOTATION: restarted_at,
            rollout_annotation(tunnel_name): port.map(|port| port.to_string()),
        }}}}
    })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::fixtures::PodBuilder;

    const FINGERPRINT: &str = "remotePort=16432,port=5432,relay=10.0.0.7:4443";

    fn rules(fingerprint: Option<&str>, mode: Mode) -> CensusRules<'_> {
        CensusRules {
            fingerprint,
            mode,
            require_consent: false,
        }
    }

    #[test]
    fn owners_are_found_through_controller_references() {
        assert_eq!(
            owner(&Pod::test("web-1").owned_by("ReplicaSet", "web-7d9")),
            Owner::ReplicaSet {
                namespace: "dev".into(),
                name: "web-7d9".into()
            }
        );
        assert_eq!(
            owner(&Pod::test("db-0").owned_by("StatefulSet", "db")),
            Owner::Workload(Workload {
                kind: WorkloadKind::StatefulSet,
                namespace: "dev".into(),
                name: "db".into()
            })
        );
        assert!(matches!(
            owner(&Pod::test("agent-x").owned_by("DaemonSet", "agent")),
            Owner::Workload(Workload {
                kind: WorkloadKind::DaemonSet,
                ..
            })
        ));
        assert_eq!(
            owner(&Pod::test("batch-x").owned_by("Job", "batch")),
            Owner::Job("batch".into())
        );
        assert_eq!(owner(&Pod::test("lonely")), Owner::Bare("lonely".into()));
    }

    #[test]
    fn the_census_counts_serving_pods_and_finds_those_to_repair() {
        let tunnel = TcpTunnel::test().provisioned(16432);
        let tunnels = vec![tunnel.clone()];
        let pods = vec![
            Pod::test("serving").injected("mydb", FINGERPRINT).ready(),
            Pod::test("starting").injected("mydb", FINGERPRINT),
            Pod::test("missed").owned_by("ReplicaSet", "web-1"),
            Pod::test("old-port")
                .injected("mydb", "remotePort=16000,port=5432,relay=10.0.0.7:4443")
                .ready(),
            Pod::test("done").phase("Succeeded"),
        ];
        let census = census(
            &tunnel,
            &pods,
            &tunnels,
            rules(Some(FINGERPRINT), Mode::Native),
        );
        assert_eq!((census.serving, census.expected), (1, 4));
        let missing: Vec<_> = census.missing.iter().map(|pod| pod.name_any()).collect();
        assert_eq!(missing, ["missed", "old-port"]);
        assert!(census.stale.is_empty());
    }

    #[test]
    fn a_tunnel_that_cannot_serve_repairs_nothing_and_takes_its_sidecars_back() {
        let tunnel = TcpTunnel::test();
        let tunnels = vec![tunnel.clone()];
        let pods = vec![
            Pod::test("injected").injected("mydb", FINGERPRINT).ready(),
            Pod::test("plain"),
        ];
        let census = census(&tunnel, &pods, &tunnels, rules(None, Mode::Native));
        assert_eq!((census.serving, census.expected), (0, 0));
        assert!(census.missing.is_empty());
        assert_eq!(census.stale.len(), 1);
    }

    #[test]
    fn job_pods_without_native_sidecars_and_pods_without_consent_are_left_alone() {
        let tunnel = TcpTunnel::test().provisioned(16432);
        let tunnels = vec![tunnel.clone()];
        let pods = vec![
            Pod::test("job").owned_by("Job", "batch"),
            Pod::test("plain"),
            Pod::test("consenting").annotated(CONSENT_ANNOTATION, "true"),
        ];
        let container = census(
            &tunnel,
            &pods,
            &tunnels,
            rules(Some(FINGERPRINT), Mode::Container),
        );
        assert_eq!(container.jobs_left_alone, 1);
        assert_eq!(container.expected, 2);
        let native = census(
            &tunnel,
            &pods,
            &tunnels,
            rules(Some(FINGERPRINT), Mode::Native),
        );
        assert_eq!((native.jobs_left_alone, native.expected), (0, 3));
        let consent = CensusRules {
            require_consent: true,
            ..rules(Some(FINGERPRINT), Mode::Native)
        };
        let consenting = census(&tunnel, &pods, &tunnels, consent);
        assert_eq!((consenting.without_consent, consenting.expected), (2, 1));
        assert_eq!(consenting.missing[0].name_any(), "consenting");
    }

    #[test]
    fn pods_won_by_an_older_tunnel_are_not_counted() {
        let mut older = TcpTunnel::test().named("older").provisioned(16000);
        older.metadata.uid = Some("uid-older".into());
        older.metadata.creation_timestamp = Some(Time(Timestamp::from_second(1).unwrap()));
        let mut tunnel = TcpTunnel::test().provisioned(16432);
        tunnel.metadata.creation_timestamp = Some(Time(Timestamp::from_second(2).unwrap()));
        let tunnels = vec![older, tunnel.clone()];
        let pods = vec![Pod::test("shared").injected("mydb", FINGERPRINT)];
        let census = census(
            &tunnel,
            &pods,
            &tunnels,
            rules(Some(FINGERPRINT), Mode::Native),
        );
        assert_eq!(census.expected, 0);
        assert_eq!(
            census.stale.len(),
            1,
            "it carries our sidecar but is the older's"
        );
    }

    #[test]
    fn rolls_are_rate_limited_per_target() {
        let pace = |now: u64| RollPace {
            now,
            interval: Duration::from_secs(180),
            started: 500,
        };
        let target = roll_target("mydb", Some(FINGERPRINT));
        assert_eq!(
            roll_decision(None, &target, pace(1000), false),
            RollDecision::Roll
        );
        let last = RollRecord {
            target: target.clone(),
            at: 1000,
        };
        assert_eq!(
            roll_decision(Some(&last), &target, pace(1001), false),
            RollDecision::Wait { until: 1180 }
        );
        assert_eq!(
            roll_decision(Some(&last), &target, pace(1001), true),
            RollDecision::InProgress,
            "never restart a rollout under way for the same reason"
        );
        assert_eq!(
            roll_decision(Some(&last), &target, pace(1180), false),
            RollDecision::Roll,
            "the pods still lack the sidecar after the interval: one more repair"
        );
        // A roll for something else (another port, or taking the sidecar away) is not a
        // repetition.
        let other = roll_target("mydb", None);
        assert_eq!(
            roll_decision(Some(&last), &other, pace(1001), true),
            RollDecision::Roll
        );
        // Rolled by an earlier operator process: the pods missing the sidecar now may
        // have been created while no webhook answered; one repair at once.
        let restarted = RollPace {
            started: 1050,
            ..pace(1060)
        };
        assert_eq!(
            roll_decision(Some(&last), &target, restarted, false),
            RollDecision::Roll
        );
        let again = RollRecord {
            target: target.clone(),
            at: 1060,
        };
        assert_eq!(
            roll_decision(
                Some(&again),
                &target,
                RollPace {
                    now: 1061,
                    ..restarted
                },
                false
            ),
            RollDecision::Wait { until: 1240 },
            "and then the interval again"
        );
        assert_eq!(RollRecord::parse(&last.render()), Some(last));
        assert_eq!(RollRecord::parse("garbage"), None);
    }

    #[test]
    fn rollouts_in_progress_are_recognised() {
        let deployment = |generation: i64,
                          observed: i64,
                          replicas: i64,
                          updated: i64,
                          total: i64| {
            json!({
                "metadata": {"generation": generation},
                "spec": {"replicas": replicas},
                "status": {"observedGeneration": observed, "updatedReplicas": updated, "replicas": total},
            })
        };
        let kind = WorkloadKind::Deployment;
        assert!(!rollout_in_progress(kind, &deployment(2, 2, 2, 2, 2)));
        assert!(rollout_in_progress(kind, &deployment(3, 2, 2, 2, 2)));
        assert!(rollout_in_progress(kind, &deployment(2, 2, 2, 1, 2)));
        assert!(rollout_in_progress(kind, &deployment(2, 2, 2, 2, 3)));
        let statefulset = |current: &str, update: &str| {
            json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1,
                "currentRevision": current, "updateRevision": update}})
        };
        assert!(!rollout_in_progress(
            WorkloadKind::StatefulSet,
            &statefulset("a", "a")
        ));
        assert!(rollout_in_progress(
            WorkloadKind::StatefulSet,
            &statefulset("a", "b")
        ));
        let daemonset = json!({"metadata": {"generation": 1}, "status": {"observedGeneration": 1,
            "updatedNumberScheduled": 1, "desiredNumberScheduled": 3}});
        assert!(rollout_in_progress(WorkloadKind::DaemonSet, &daemonset));
    }

    #[test]
    fn the_roll_patch_restarts_the_template_and_records_the_roll() {
        let record = RollRecord {
            target: roll_target("mydb", Some(FINGERPRINT)),
            at: 1_800_000_000,
        };
        let patch = roll_patch("mydb", Some(16432), &record);
        let template = &patch["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(template["tunnels.localup.dev/mydb"], "16432");
        assert_eq!(template[RESTARTED_AT_ANNOTATION], "2027-01-15T08:00:00Z");
        assert_eq!(
            patch["metadata"]["annotations"][ROLLED_ANNOTATION],
            record.render()
        );
        let removal = roll_patch(&"x".repeat(100), None, &record);
        let annotations = removal["spec"]["template"]["metadata"]["annotations"]
            .as_object()
            .unwrap();
        let key = annotations
            .keys()
            .find(|key| key.starts_with("tunnels.localup.dev/"))
            .unwrap();
        assert!(key.len() - "tunnels.localup.dev/".len() <= 63);
        assert!(annotations[key].is_null());
    }
}
