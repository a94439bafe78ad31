//! Every label and annotation the operator writes or reads, and how a tunnel's name is
//! made to fit where Kubernetes allows at most 63 characters.

use sha2::{Digest, Sha256};

/// The field manager of every server-side apply, the Events' reporting controller and
/// the value of [`MANAGED_BY_LABEL`] on the objects the operator creates.
pub const MANAGER: &str = "localup-operator";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// Label on injected pods and on token Secrets: the tunnel's [`name_fragment`]. Pods are
/// found by it when their tunnel has gone.
pub const TUNNEL_LABEL: &str = "localup.dev/tunnel";
/// Annotation on injected pods: the full name of the tunnel whose sidecar they carry.
pub const TUNNEL_ANNOTATION: &str = "localup.dev/tunnel";
/// Annotation on injected pods: what the sidecar was built for (see
/// [`crate::sidecar::fingerprint`]); a pod whose value differs from the tunnel's current
/// one carries a stale sidecar and is rolled.
pub const SIDECAR_ANNOTATION: &str = "localup.dev/sidecar";
/// Pod annotation that consents to injection when the operator runs with
/// `--require-pod-consent`: `localup.dev/inject: "true"`.
pub const CONSENT_ANNOTATION: &str = "localup.dev/inject";

/// Prefix of the pod-template annotation naming the tunnel a workload was rolled for:
/// `tunnels.localup.dev/<name fragment>: "<port>"`.
pub const ROLLOUT_ANNOTATION_PREFIX: &str = "tunnels.localup.dev/";
/// Pod-template annotation whose change makes the workload controller replace its pods,
/// as `kubectl rollout restart` does with its own.
pub const RESTARTED_AT_ANNOTATION: &str = "localup.dev/restartedAt";
/// Workload annotation recording the operator's last roll: `<target> <unix seconds>`,
/// so that a roll for the same target is not repeated within the repair interval.
pub const ROLLED_ANNOTATION: &str = "localup.dev/rolled";

/// Relay Service annotation: which tunnel holds each tunnel port, and which ports were
/// released when (see [`crate::allocator::PortBook`]).
pub const PORTS_ANNOTATION: &str = "localup.dev/ports";

/// Namespaces labelled `localup.dev/injection: disabled` are never sent to the webhook.
pub const INJECTION_LABEL: &str = "localup.dev/injection";

/// The finalizer earlier versions put on every TcpTunnel. It is removed on sight: the
/// operator keeps no state that needs it, and a finalizer would block deleting the
/// namespace once the operator is gone.
pub const LEGACY_FINALIZER: &str = "localup.dev/cleanup";

const MAX_NAME_PART: usize = 63;
const HASH_CHARS: usize = 10;

/// `name` when it fits a label value or the name part of an annotation key (at most 63
/// characters); otherwise its first characters, a dash and a hash of the whole name, so
/// that two long names with a common beginning stay distinct. Tunnel names are DNS
/// subdomains (lowercase alphanumerics, `-` and `.`), which both places accept.
pub fn name_fragment(name: &str) -> String {
    if name.len() <= MAX_NAME_PART {
        return name.to_owned();
    }
    let digest = Sha256::digest(name.as_bytes());
    let hash: String = digest
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<String>()[..HASH_CHARS]
        .to_owned();
    let keep = MAX_NAME_PART - HASH_CHARS - 1;
    let head = name[..keep].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

/// The pod-template annotation key naming `tunnel_name`.
pub fn rollout_annotation(tunnel_name: &str) -> String {
    format!("{ROLLOUT_ANNOTATION_PREFIX}{}", name_fragment(tunnel_name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API server's rule for a label value and an annotation key's name part.
    fn valid_name_part(value: &str) -> bool {
        let pattern = regex::Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").unwrap();
        value.len() <= 63 && pattern.is_match(value)
    }

    #[test]
    fn short_names_are_kept() {
        assert_eq!(name_fragment("mydb"), "mydb");
        assert_eq!(rollout_annotation("mydb"), "tunnels.localup.dev/mydb");
        let exactly = "a".repeat(63);
        assert_eq!(name_fragment(&exactly), exactly);
    }

    #[test]
    fn long_names_become_valid_distinct_fragments() {
        let long = format!("{}-db", "x".repeat(250));
        let other = format!("{}-cache", "x".repeat(250));
        for name in [&long, &other] {
            let fragment = name_fragment(name);
            assert!(valid_name_part(&fragment), "{fragment}");
            assert_eq!(fragment, name_fragment(name), "stable");
        }
        assert_ne!(name_fragment(&long), name_fragment(&other));
        // A cut that would end in a dash or dot still ends alphanumerically.
        let dashed = format!("{}-{}", "a".repeat(51), "b".repeat(40));
        assert!(valid_name_part(&name_fragment(&dashed)));
        let dotted = format!("{}.{}", "a".repeat(51), "b".repeat(40));
        assert!(valid_name_part(&name_fragment(&dotted)));
    }
}
