//! Tokens: HS256 JWTs signed with the relay's shared secret. Besides the subject, a
//! token may carry an expiry and a `ports` claim that confines it to one port or a
//! range, which is how the Kubernetes operator pins each tunnel to its assigned port.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::PortRange;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Who holds the token; the relay remembers each subject's port across restarts.
    pub sub: String,
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// The public ports this token may hold; absent means any port the relay serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token's signature does not match the relay's --jwt-secret")]
    BadSignature,
    #[error("the token has expired; mint a new one with `localup generate-token`")]
    Expired,
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
            exp: None,
            ports: None,
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
        validation.leeway = 5;
        jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret), &validation)
            .map(|data| data.claims)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                other => TokenError::Malformed(format!("{other:?}")),
            })
    }

    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.is_none_or(|range| range.contains(port))
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("system clock is after 1970")
        .as_secs()
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
    }
}
