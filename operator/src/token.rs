//! The sidecar's credentials: the token minted for a tunnel, when it is replaced, and
//! the token Secret that carries it (with the relay's CA certificate) into the pods.
//!
//! The operator never reads a token Secret back. What it must know about the one it
//! wrote (when its token expires, and a digest of what it was written from) is kept in
//! the tunnel's status; when either calls for it, a new token is minted and the Secret
//! is written whole by server-side apply.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use localup_protocol::PortRange;
use localup_protocol::token::{Claims, TunnelPolicy};
use sha2::{Digest, Sha256};

use crate::crd::TcpTunnel;
use crate::keys::{MANAGED_BY_LABEL, MANAGER, TUNNEL_LABEL, name_fragment};

/// The keys of the token Secret, mounted whole at [`crate::sidecar::CONFIG_DIR`].
pub mod secret_keys {
    pub const TOKEN: &str = "token";
    pub const CA: &str = "ca.crt";
}

const TOKEN_SECRET_SUFFIX: &str = "-localup-token";
const MAX_OBJECT_NAME: usize = 253;

/// `<tunnel>-localup-token`; for the longest tunnel names the name is shortened with a
/// hash so the Secret's name stays within 253 characters.
pub fn token_secret_name(tunnel_name: &str) -> String {
    if tunnel_name.len() + TOKEN_SECRET_SUFFIX.len() <= MAX_OBJECT_NAME {
        return format!("{tunnel_name}{TOKEN_SECRET_SUFFIX}");
    }
    format!("{}{TOKEN_SECRET_SUFFIX}", name_fragment(tunnel_name))
}

/// What the operator needs from the relay's Secrets to mint tokens sidecars can use.
#[derive(Clone, PartialEq, Eq)]
pub struct RelayTrust {
    pub jwt_secret: Vec<u8>,
    pub ca_pem: String,
}

impl std::fmt::Debug for RelayTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayTrust")
            .field("jwt_secret", &"<redacted>")
            .field("ca_pem", &self.ca_pem.len())
            .finish()
    }
}

/// Everything a tunnel's token Secret is written from.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// `namespace/name`.
    pub subject: &'a str,
    pub port: u16,
    pub epoch: u64,
    pub policy: &'a TunnelPolicy,
    pub relay_address: &'a str,
    pub trust: &'a RelayTrust,
    pub lifetime: Duration,
}

impl Credentials<'_> {
    /// A short digest of all of it, recorded in the status: when it changes (another
    /// port or epoch, policy, relay address, certificate, signing secret or lifetime),
    /// the token is minted and the Secret written again. The signing secret enters only
    /// through the hash.
    pub fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        let policy = serde_json::to_string(self.policy).expect("a policy serializes");
        for part in [
            self.subject.as_bytes(),
            self.port.to_string().as_bytes(),
            self.epoch.to_string().as_bytes(),
            policy.as_bytes(),
            self.relay_address.as_bytes(),
            self.trust.ca_pem.as_bytes(),
            &self.trust.jwt_secret,
            self.lifetime.as_secs().to_string().as_bytes(),
        ] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part);
        }
        hasher.finalize()[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    /// A JWT for the subject, valid only for the port, pooled (every pod of the tunnel
    /// serves it), stamped with the port's epoch and carrying the policy; and when it
    /// expires (Unix seconds).
    pub fn mint(&self) -> (String, u64) {
        let ports = PortRange::single(self.port).expect("assigned ports are never 0");
        let claims = Claims::new(self.subject)
            .restricted_to(ports)
            .expires_in(self.lifetime)
            .pooled()
            .with_port_epoch(self.epoch)
            .with_policy(self.policy.clone());
        let expires = claims.exp.expect("expires_in sets exp");
        (claims.mint(&self.trust.jwt_secret), expires)
    }
}

/// When a token expiring at `exp` (Unix seconds) is replaced: at half its lifetime,
/// leaving ample time for retries while the API server is away.
pub fn renewal_time(exp: u64, lifetime: Duration) -> u64 {
    exp.saturating_sub(lifetime.as_secs() / 2)
}

/// What the status records about the token Secret last written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written<'a> {
    pub digest: Option<&'a str>,
    /// Unix seconds.
    pub expires: Option<u64>,
}

/// Whether a new token must be minted and the Secret written: nothing written yet, the
/// credentials changed, renewal is due, or this operator process has not written it yet
/// (which also brings back a token Secret deleted by hand, at the latest with the next
/// leader).
pub fn needs_writing(
    written: Written<'_>,
    digest: &str,
    lifetime: Duration,
    now: u64,
    written_by_this_process: bool,
) -> bool {
    let Written {
        digest: Some(written_digest),
        expires: Some(expires),
    } = written
    else {
        return true;
    };
    written_digest != digest || now >= renewal_time(expires, lifetime) || !written_by_this_process
}

/// The token Secret, owned by its tunnel so it goes when the tunnel goes, in the shape
/// it is applied: the sidecar mounts it whole.
pub fn token_secret(tunnel: &TcpTunnel, token: &str, ca_pem: &str) -> Secret {
    let data = [(secret_keys::TOKEN, token), (secret_keys::CA, ca_pem)]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), ByteString(value.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(token_secret_name(&tunnel.name_any())),
            namespace: tunnel.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
                (TUNNEL_LABEL.to_owned(), name_fragment(&tunnel.name_any())),
            ])),
            owner_references: tunnel.controller_owner_ref(&()).map(|owner| vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use localup_protocol::proxy_header::ProxyProtocol;

    use super::*;

    const SECRET: &[u8] = b"relay-secret";
    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn trust() -> RelayTrust {
        RelayTrust {
            jwt_secret: SECRET.to_vec(),
            ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
        }
    }

    fn credentials<'a>(policy: &'a TunnelPolicy, trust: &'a RelayTrust) -> Credentials<'a> {
        Credentials {
            subject: "dev/mydb",
            port: 16432,
            epoch: 1_700_000_000_000,
            policy,
            relay_address: "10.0.0.7:4443",
            trust,
            lifetime: DAY,
        }
    }

    #[test]
    fn the_secret_carries_the_token_and_ca_and_is_owned() {
        let secret = token_secret(&TcpTunnel::test(), "jwt", "PEM");
        assert_eq!(secret.metadata.name.as_deref(), Some("mydb-localup-token"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("dev"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("TcpTunnel", "mydb")
        );
        assert_eq!(owner.controller, Some(true));
        let data = secret.data.as_ref().unwrap();
        let keys: Vec<_> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, ["ca.crt", "token"]);
        assert_eq!(data["token"].0, b"jwt");
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[TUNNEL_LABEL], "mydb");
        assert_eq!(labels[MANAGED_BY_LABEL], "localup-operator");
    }

    #[test]
    fn long_tunnel_names_still_make_a_valid_secret_name() {
        let long = "x".repeat(253);
        let name = token_secret_name(&long);
        assert!(name.len() <= 253, "{}", name.len());
        assert!(name.ends_with("-localup-token"));
        assert_eq!(token_secret_name("mydb"), "mydb-localup-token");
    }

    #[test]
    fn minted_tokens_are_pooled_pinned_and_carry_the_epoch_and_policy() {
        let policy = TunnelPolicy {
            proxy_protocol: Some(ProxyProtocol::V1),
            allow_from: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            max_connections: Some(3),
            bandwidth_in: Some(1000),
            bandwidth_out: Some(2000),
        };
        let trust = trust();
        let (token, expires) = credentials(&policy, &trust).mint();
        let claims = Claims::verify(&token, SECRET).unwrap();
        assert_eq!(claims.sub, "dev/mydb");
        assert!(claims.pool, "every operator-minted token is pooled");
        assert_eq!(claims.port_epoch, Some(1_700_000_000_000));
        assert!(claims.allows_port(16432));
        assert!(!claims.allows_port(16433));
        assert_eq!(claims.exp, Some(expires));
        assert_eq!(expires, claims.iat + DAY.as_secs());
        assert_eq!(claims.policy, policy);
    }

    #[test]
    fn the_digest_changes_with_anything_the_secret_is_written_from() {
        let policy = TunnelPolicy::default();
        let trust = trust();
        let base = credentials(&policy, &trust);
        let digest = base.digest();
        assert_eq!(digest.len(), 16);
        assert_eq!(digest, base.digest(), "stable");
        let other_policy = TunnelPolicy {
            max_connections: Some(1),
            ..Default::default()
        };
        let rotated = RelayTrust {
            jwt_secret: b"rotated".to_vec(),
            ..trust.clone()
        };
        let variants = [
            Credentials {
                port: 16433,
                ..base
            },
            Credentials { epoch: 1, ..base },
            Credentials {
                policy: &other_policy,
                ..base
            },
            Credentials {
                relay_address: "10.0.0.8:4443",
                ..base
            },
            Credentials {
                trust: &rotated,
                ..base
            },
            Credentials {
                lifetime: Duration::from_secs(60),
                ..base
            },
            Credentials {
                subject: "dev/other",
                ..base
            },
        ];
        for variant in variants {
            assert_ne!(variant.digest(), digest, "{variant:?}");
        }
    }

    #[test]
    fn tokens_are_written_when_missing_changed_due_or_new_to_this_process() {
        let lifetime = Duration::from_secs(60);
        let now = 1_000_000;
        let written = Written {
            digest: Some("abc"),
            expires: Some(now + 50),
        };
        assert!(!needs_writing(written, "abc", lifetime, now, true));
        assert!(needs_writing(written, "abd", lifetime, now, true));
        assert!(needs_writing(written, "abc", lifetime, now, false));
        // Renewal at half the lifetime: 30 s before expiry.
        assert!(!needs_writing(written, "abc", lifetime, now + 19, true));
        assert!(needs_writing(written, "abc", lifetime, now + 20, true));
        let nothing = Written {
            digest: None,
            expires: None,
        };
        assert!(needs_writing(nothing, "abc", lifetime, now, true));
        assert_eq!(renewal_time(now + 60, lifetime), now + 30);
    }
}
