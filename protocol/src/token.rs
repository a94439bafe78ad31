//! Tokens: HS256 JWTs signed with the relay's shared secret. Besides the subject, a
//! token may carry an expiry, a `ports` claim that confines it to one port or a range
//! (how the Kubernetes operator pins each tunnel to its assigned port), whether
//! several clients may share the port (`pool`), when the port was assigned
//! (`port_epoch`), and the tunnel's [`TunnelPolicy`].

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::PortRange;
use crate::proxy_header::ProxyProtocol;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Who holds the token; the relay remembers each subject's ports across restarts.
    pub sub: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Not valid before this time (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// The public ports this token may hold; absent means any port the relay serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// Clients of this subject whose tokens all set `pool` share one port: the relay
    /// spreads new connections over them. Without it a second client of the subject
    /// is refused while the first one answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pool: bool,
    /// When the port was assigned to this subject (Unix milliseconds), set by an
    /// authority that hands ports out (the Kubernetes operator). A token for the port
    /// with an older epoch than the relay has seen from another subject is refused,
    /// so a deleted tunnel's token cannot claim a port that has gone to someone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_epoch: Option<u64>,
    #[serde(flatten)]
    pub policy: TunnelPolicy,
}

/// Per-tunnel rules the relay enforces, carried by the token.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TunnelPolicy {
    /// A PROXY protocol header in front of each connection to the local service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Only connections from these source ranges are accepted; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<Vec<IpNet>>,
    /// Concurrent external connections; more are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Bytes per second towards the local service, summed over the tunnel's connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_in: Option<u64>,
    /// Bytes per second from the local service back to external clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_out: Option<u64>,
}

impl TunnelPolicy {
    pub fn allows_source(&self, source: IpAddr) -> bool {
        let source = source.to_canonical();
        self.allow_from
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|range| range.contains(&source)))
    }
}

/// How far apart the clocks of whoever minted a token and the relay may be: `exp` and
/// `nbf` are enforced this much late.
pub const CLOCK_LEEWAY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token's signature does not match the relay's --jwt-secret")]
    BadSignature,
    #[error("the token has expired; mint a new one with `localup generate-token`")]
    Expired,
    #[error("the token is not valid yet (its nbf claim lies in the future); check the clocks")]
    NotYetValid,
    #[error("the token is signed with an algorithm other than HS256")]
    WrongAlgorithm,
    #[error("the token is not a valid JWT ({0})")]
    Malformed(String),
}

impl Claims {
    pub fn new(sub: impl Into<String>) -> Self {
        Self {
            sub: sub.into(),
            iat: unix_now(),
            ..Default::default()
        }
    }

    pub fn expires_in(mut self, lifetime: Duration) -> Self {
        self.exp = Some(self.iat + lifetime.as_secs());
        self
    }

    pub fn expires_at(mut self, unix_seconds: u64) -> Self {
        self.exp = Some(unix_seconds);
        self
    }

    pub fn restricted_to(mut self, ports: PortRange) -> Self {
        self.ports = Some(ports);
        self
    }

    pub fn pooled(mut self) -> Self {
        self.pool = true;
        self
    }

    pub fn with_port_epoch(mut self, epoch: u64) -> Self {
        self.port_epoch = Some(epoch);
        self
    }

    pub fn with_policy(mut self, policy: TunnelPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn mint(&self, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            self,
            &EncodingKey::from_secret(secret),
        )
        .expect("HS256 signing with an in-memory key cannot fail")
    }

    pub fn verify(token: &str, secret: &[u8]) -> Result<Claims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Reference tokens carry no expiry; when one is present it is enforced.
        validation.set_required_spec_claims::<&str>(&[]);
        validation.validate_nbf = true;
        validation.leeway = CLOCK_LEEWAY.as_secs();
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                other => TokenError::Malformed(format!("{other:?}")),
            })
    }

    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.is_none_or(|range| range.contains(port))
    }
}

/// Seconds since the Unix epoch; 0 on a clock set before 1970, which then makes every
/// token with an expiry look valid for longer rather than crash the process.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Milliseconds since the Unix epoch (0 before 1970), for port epochs.
pub fn unix_now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"my-jwt-secret";

    #[test]
    fn round_trips_every_claim() {
        let claims = Claims::new("mydb")
            .expires_in(Duration::from_secs(3600))
            .restricted_to("16432".parse().unwrap());
        let verified = Claims::verify(&claims.mint(SECRET), SECRET).unwrap();
        assert_eq!(verified, claims);
        assert!(verified.allows_port(16432));
        assert!(!verified.allows_port(16433));
    }

    #[test]
    fn reference_tokens_without_expiry_are_accepted() {
        let token = Claims::new("mydb").mint(SECRET);
        let claims = Claims::verify(&token, SECRET).unwrap();
        assert_eq!(claims.exp, None);
        assert!(claims.allows_port(12345));
    }

    #[test]
    fn classifies_failures() {
        let token = Claims::new("mydb").mint(SECRET);
        assert_eq!(
            Claims::verify(&token, b"other"),
            Err(TokenError::BadSignature)
        );
        let expired = Claims::new("mydb").expires_at(unix_now() - 60).mint(SECRET);
        assert_eq!(Claims::verify(&expired, SECRET), Err(TokenError::Expired));
        assert!(matches!(
            Claims::verify("not-a-jwt", SECRET),
            Err(TokenError::Malformed(_))
        ));
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims::new("mydb"),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(
            Claims::verify(&hs512, SECRET),
            Err(TokenError::WrongAlgorithm)
        );
        let mut early = Claims::new("mydb");
        early.nbf = Some(unix_now() + 3600);
        assert_eq!(
            Claims::verify(&early.mint(SECRET), SECRET),
            Err(TokenError::NotYetValid)
        );
    }

    #[test]
    fn policy_claims_round_trip_and_sources_are_matched_by_range() {
        let policy = TunnelPolicy {
            proxy_protocol: Some(ProxyProtocol::V2),
            allow_from: Some(vec![
                "10.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap(),
            ]),
            max_connections: Some(5),
            bandwidth_in: Some(1_000_000),
            bandwidth_out: None,
        };
        let claims = Claims::new("mydb")
            .pooled()
            .with_port_epoch(42)
            .with_policy(policy.clone());
        let verified = Claims::verify(&claims.mint(SECRET), SECRET).unwrap();
        assert_eq!(verified, claims);
        assert!(policy.allows_source("10.1.2.3".parse().unwrap()));
        assert!(policy.allows_source("::1".parse().unwrap()));
        // An IPv4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
        assert!(policy.allows_source("::ffff:10.9.9.9".parse().unwrap()));
        assert!(!policy.allows_source("192.168.1.1".parse().unwrap()));
        assert!(TunnelPolicy::default().allows_source("192.168.1.1".parse().unwrap()));
    }
}
