//! Shared by the fuzz targets: the relay secret they use, and the invariants every
//! outcome of the relay's hello handling must satisfy whatever the input.

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use localup_protocol::frame;
use localup_protocol::message::{Hello, Refusal};
use localup_protocol::token::{CLOCK_LEEWAY, Claims, unix_now};
use localup_relay::hello::{MAX_SUBJECT_LEN, Outcome};

/// The relay's `--jwt-secret` in every fuzz target. `fuzz/seed_corpus.py` mints the
/// seed tokens with the same bytes.
pub const SECRET: &[u8] = b"localup-fuzz-secret";

/// Whether `token` is a three-part JWT whose header names HS256 and whose signature is
/// the HMAC-SHA256 of its first two parts under `secret`: checked here with `ring`,
/// independently of the `jsonwebtoken` code the relay uses.
pub fn signed_hs256_with(token: &str, secret: &[u8]) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    let [header, _payload, signature] = parts[..] else {
        return false;
    };
    let Ok(header) = URL_SAFE_NO_PAD.decode(header) else {
        return false;
    };
    let Ok(header) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return false;
    };
    if header.get("alg").and_then(|alg| alg.as_str()) != Some("HS256") {
        return false;
    }
    let Ok(signature) = URL_SAFE_NO_PAD.decode(signature) else {
        return false;
    };
    let signed = &token[..token.rfind('.').expect("three parts")];
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, signed.as_bytes(), &signature).is_ok()
}

/// What must hold of `outcome = hello::evaluate(bytes, secret)`.
pub fn check_hello_outcome(bytes: &[u8], secret: &[u8], outcome: &Outcome) {
    let decoded = frame::decode::<Hello>(bytes);
    match outcome {
        Outcome::Incomplete => {
            assert!(
                matches!(decoded, Ok(None)),
                "incomplete, but the frame decodes as {decoded:?}"
            );
        }
        Outcome::Authenticated(hello, claims) => {
            let Ok(Some((framed, _))) = &decoded else {
                panic!("authenticated a hello whose frame decodes as {decoded:?}");
            };
            assert_eq!(framed, hello, "authenticated another hello than the frame's");
            assert!(
                signed_hs256_with(&hello.token, secret),
                "authenticated a token not signed HS256 with the secret: {:?}",
                hello.token
            );
            assert_eq!(
                Claims::verify(&hello.token, secret).as_ref(),
                Ok(claims),
                "the authenticated claims are not the token's"
            );
            assert!(
                !claims.sub.is_empty() && claims.sub.len() <= MAX_SUBJECT_LEN,
                "authenticated subject of {} bytes",
                claims.sub.len()
            );
            assert_ne!(hello.remote_port, Some(0), "authenticated a request for port 0");
            // The clock moves on while a case runs: allow one more second each way.
            let now = unix_now();
            let leeway = CLOCK_LEEWAY.as_secs() + 1;
            if let Some(exp) = claims.exp {
                assert!(
                    exp.saturating_add(leeway) >= now,
                    "authenticated a token that expired at {exp} (now {now})"
                );
            }
            if let Some(nbf) = claims.nbf {
                assert!(
                    nbf <= now.saturating_add(leeway),
                    "authenticated a token not valid before {nbf} (now {now})"
                );
            }
        }
        Outcome::Refused(refused) => {
            assert!(
                !refused.message.trim().is_empty(),
                "refusal without a message: {refused:?}"
            );
            assert!(!refused.metric.is_empty(), "refusal without a metric label");
            assert!(
                !refused.message.contains('\n'),
                "a refusal's message is one line: {:?}",
                refused.message
            );
            match &decoded {
                Err(_) => assert_eq!(refused.refusal, Refusal::Malformed, "{refused:?}"),
                Ok(Some(_)) => assert!(
                    matches!(
                        refused.refusal,
                        Refusal::AuthenticationFailed | Refusal::Malformed
                    ),
                    "{refused:?}"
                ),
                Ok(None) => panic!("refused an incomplete frame: {refused:?}"),
            }
        }
    }
}

/// With `FUZZ_SHOW_OUTCOMES` set, prints one line per execution saying what became of
/// the hello, so that what a corpus reaches can be counted:
///
/// ```text
/// FUZZ_SHOW_OUTCOMES=1 fuzz/target/x86_64-unknown-linux-gnu/release/relay_hello_structured \
///     -runs=0 fuzz/corpus/relay_hello_structured 2>&1 | grep '^outcome:' | sort | uniq -c
/// ```
pub fn show_outcome(outcome: &Outcome) {
    static SHOW: OnceLock<bool> = OnceLock::new();
    if !*SHOW.get_or_init(|| std::env::var_os("FUZZ_SHOW_OUTCOMES").is_some()) {
        return;
    }
    match outcome {
        Outcome::Incomplete => eprintln!("outcome: incomplete"),
        Outcome::Authenticated(hello, claims) => eprintln!(
            "outcome: authenticated (remote_port: {}, ports: {}, pool: {}, port_epoch: {}, exp: {}, nbf: {}, policy: {})",
            hello.remote_port.is_some(),
            claims.ports.is_some(),
            claims.pool,
            claims.port_epoch.is_some(),
            claims.exp.is_some(),
            claims.nbf.is_some(),
            claims.policy != Default::default(),
        ),
        Outcome::Refused(refused) => {
            eprintln!("outcome: refused {:?} {}", refused.refusal, refused.metric)
        }
    }
}
