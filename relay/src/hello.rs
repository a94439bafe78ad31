//! What the relay makes of a client's hello, before any state is kept for it: the
//! frame decoded, the token verified. Pure, so it is unit-tested and fuzzed
//! (`fuzz/fuzz_targets/relay_hello.rs`) on its own.

use localup_protocol::frame::{self, FrameError};
use localup_protocol::message::{Hello, Refusal};
use localup_protocol::token::{Claims, TokenError};

/// Subjects name ports in logs, metrics and the database; longer ones are refused.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Why a hello was refused: what the client is told, and a label for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRefusal {
    pub refusal: Refusal,
    pub message: String,
    pub metric: &'static str,
}

/// The outcome of the bytes a client sent on its control stream so far.
#[derive(Debug)]
pub enum Outcome {
    /// Not a whole frame yet.
    Incomplete,
    Authenticated(Hello, Claims),
    Refused(HelloRefusal),
}

/// Decodes the hello at the start of `bytes` and authenticates it with `secret`.
pub fn evaluate(bytes: &[u8], secret: &[u8]) -> Outcome {
    match frame::decode::<Hello>(bytes) {
        Ok(None) => Outcome::Incomplete,
        Ok(Some((hello, _))) => match authenticate(&hello, secret) {
            Ok(claims) => Outcome::Authenticated(hello, claims),
            Err(refusal) => Outcome::Refused(refusal),
        },
        Err(error) => Outcome::Refused(malformed(&error)),
    }
}

/// A hello whose frame could not be read.
pub fn malformed(error: &FrameError) -> HelloRefusal {
    HelloRefusal {
        refusal: Refusal::Malformed,
        message: error.to_string(),
        metric: "malformed",
    }
}

/// The token's claims, or why the client is refused.
pub fn authenticate(hello: &Hello, secret: &[u8]) -> Result<Claims, HelloRefusal> {
    let claims = Claims::verify(&hello.token, secret).map_err(|error| HelloRefusal {
        refusal: Refusal::AuthenticationFailed,
        message: format!("Authentication failed: {error}"),
        metric: match error {
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongAlgorithm => "wrong_algorithm",
            TokenError::Malformed(_) => "malformed",
        },
    })?;
    if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_LEN {
        return Err(HelloRefusal {
            refusal: Refusal::AuthenticationFailed,
            message: format!(
                "Authentication failed: the token's subject must be 1 to {MAX_SUBJECT_LEN} characters long"
            ),
            metric: "bad_subject",
        });
    }
    if hello.remote_port == Some(0) {
        return Err(HelloRefusal {
            refusal: Refusal::Malformed,
            message: "port 0 cannot be requested; omit --remote-port to have one allocated".into(),
            metric: "malformed",
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"secret";

    fn framed(json: &str) -> Vec<u8> {
        let mut bytes = (json.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes
    }

    #[test]
    fn a_valid_hello_is_authenticated() {
        let token = Claims::new("mydb").mint(SECRET);
        let bytes = frame::encode(&Hello {
            token,
            remote_port: Some(16432),
        });
        assert!(matches!(
            evaluate(&bytes[..bytes.len() - 1], SECRET),
            Outcome::Incomplete
        ));
        let Outcome::Authenticated(hello, claims) = evaluate(&bytes, SECRET) else {
            panic!()
        };
        assert_eq!(
            (hello.remote_port, claims.sub.as_str()),
            (Some(16432), "mydb")
        );
    }

    #[test]
    fn every_kind_of_bad_hello_gets_a_specific_refusal() {
        let long_subject = Claims::new("x".repeat(MAX_SUBJECT_LEN + 1)).mint(SECRET);
        let cases = [
            (framed("not json"), Refusal::Malformed, "malformed"),
            (framed(r#"{"token": 5}"#), Refusal::Malformed, "malformed"),
            (
                framed(r#"{"remote_port": 1}"#),
                Refusal::Malformed,
                "malformed",
            ),
            (
                (u32::MAX).to_be_bytes().to_vec(),
                Refusal::Malformed,
                "malformed",
            ),
            (
                framed(r#"{"token":"a.b.c","remote_port":null}"#),
                Refusal::AuthenticationFailed,
                "malformed",
            ),
            (
                frame::encode(&Hello {
                    token: Claims::new("a").mint(b"other"),
                    remote_port: None,
                }),
                Refusal::AuthenticationFailed,
                "bad_signature",
            ),
            (
                frame::encode(&Hello {
                    token: long_subject,
                    remote_port: None,
                }),
                Refusal::AuthenticationFailed,
                "bad_subject",
            ),
            (
                frame::encode(&Hello {
                    token: Claims::new("a").mint(SECRET),
                    remote_port: Some(0),
                }),
                Refusal::Malformed,
                "malformed",
            ),
        ];
        for (bytes, refusal, metric) in cases {
            let Outcome::Refused(refused) = evaluate(&bytes, SECRET) else {
                panic!("accepted {bytes:?}")
            };
            assert_eq!(
                (refused.refusal, refused.metric),
                (refusal, metric),
                "{refused:?}"
            );
            assert!(!refused.message.is_empty());
        }
    }
}
