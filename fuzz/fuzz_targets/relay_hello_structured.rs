//! The relay's hello handling on structured input (`arbitrary`): well-framed hellos
//! around fuzzer-shaped JSON, and tokens minted with the relay's secret from fuzzed
//! claims, so that the fuzzer gets past framing and signature checks to the claims
//! themselves (`ports`, the policy claims with their CIDRs, `pool`, `port_epoch`,
//! `exp`/`nbf`, the subject). Tokens are also signed with other keys and algorithms,
//! or tampered with after signing.
//!
//! Every outcome must satisfy `localup_fuzz::check_hello_outcome` (an authenticated
//! token really is signed with the secret, a refusal always says why, ...). When the
//! input is known to be a well-formed token signed with the secret, the outcome is
//! predicted exactly: authenticated with exactly the minted claims, or refused for the
//! one reason that applies (expired, not yet valid, bad subject, port 0). A bad
//! signature or another HMAC algorithm is predicted as such too.

#![no_main]

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use libfuzzer_sys::fuzz_target;
use localup_fuzz::{SECRET, check_hello_outcome, show_outcome};
use localup_protocol::PortRange;
use localup_protocol::message::Refusal;
use localup_protocol::proxy_header::ProxyProtocol;
use localup_protocol::token::{CLOCK_LEEWAY, Claims, TunnelPolicy, unix_now};
use localup_relay::hello::{self, Outcome};
use serde_json::{Map, Value, json};

/// A JSON value shaped by the fuzzer, nested a little deeper than serde_json's
/// recursion limit (128) allows.
#[derive(Debug, Clone)]
struct Json(Value);

const MAX_DEPTH: usize = 140;

/// JSON nodes left for the current case. Without a cap, a few input bytes can ask for
/// thousands of nested values, and the allocations (slow under AddressSanitizer)
/// dominate every execution.
const NODES_PER_CASE: usize = 400;

thread_local! {
    static NODES_LEFT: Cell<usize> = const { Cell::new(NODES_PER_CASE) };
}

/// Takes up to `wanted` nodes from the case's budget; how many it got.
fn take_nodes(wanted: usize) -> usize {
    NODES_LEFT.with(|left| {
        let granted = wanted.min(left.get());
        left.set(left.get() - granted);
        granted
    })
}

impl<'a> Arbitrary<'a> for Json {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        json(u, 0).map(Json)
    }
}

fn json(u: &mut Unstructured<'_>, depth: usize) -> arbitrary::Result<Value> {
    let kinds = if depth >= MAX_DEPTH || take_nodes(1) == 0 {
        6
    } else {
        9
    };
    Ok(match u.int_in_range(0..=kinds - 1)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::from(u.arbitrary::<u64>()?),
        3 => Value::from(u.arbitrary::<i64>()?),
        // Non-finite floats become null.
        4 => Value::from(u.arbitrary::<f64>()?),
        5 => Value::String(u.arbitrary()?),
        6 => {
            let len = u.int_in_range(0..=4)?;
            let mut items = Vec::with_capacity(len);
            for _ in 0..len {
                items.push(json(u, depth + 1)?);
            }
            Value::Array(items)
        }
        7 => {
            let len = u.int_in_range(0..=4)?;
            let mut map = Map::new();
            for _ in 0..len {
                let key = key(u)?;
                map.insert(key, json(u, depth + 1)?);
            }
            Value::Object(map)
        }
        // A deep chain at once, to reach the recursion limit cheaply.
        _ => {
            let wanted = u.int_in_range(1..=MAX_DEPTH - depth)?;
            let levels = take_nodes(wanted);
            let mut value = json(u, MAX_DEPTH)?;
            let arrays: bool = u.arbitrary()?;
            for _ in 0..levels {
                // Not `json!`, which would copy the whole chain at every level.
                value = if arrays {
                    Value::Array(vec![value])
                } else {
                    Value::Object(Map::from_iter([("a".to_owned(), value)]))
                };
            }
            value
        }
    })
}

/// Object keys: mostly the names the relay knows, so that wrong types reach them.
fn key(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    const KNOWN: &[&str] = &[
        "token",
        "remote_port",
        "sub",
        "iat",
        "exp",
        "nbf",
        "ports",
        "pool",
        "port_epoch",
        "proxy_protocol",
        "allow_from",
        "max_connections",
        "bandwidth_in",
        "bandwidth_out",
        "alg",
        "typ",
    ];
    if u.arbitrary()? {
        Ok((*u.choose(KNOWN)?).to_owned())
    } else {
        u.arbitrary()
    }
}

/// One claim: left out, a well-typed value, or any JSON at all.
#[derive(Arbitrary, Debug)]
enum Claim<T> {
    Absent,
    Typed(T),
    Raw(Json),
}

#[derive(Arbitrary, Debug)]
enum Subject {
    Text(String),
    /// Long subjects, around `MAX_SUBJECT_LEN`.
    Repeated(char, u16),
}

#[derive(Arbitrary, Debug)]
enum Time {
    FromNow(i32),
    At(u64),
}

#[derive(Arbitrary, Debug)]
enum Ports {
    Single(u16),
    Range(u16, u16),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Proxy {
    V1,
    V2,
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Cidr {
    V4([u8; 4], u8),
    V6([u8; 16], u8),
    Text(String),
}

#[derive(Arbitrary, Debug)]
enum Count {
    U32(u32),
    U64(u64),
}

#[derive(Arbitrary, Debug)]
struct FuzzClaims {
    sub: Claim<Subject>,
    iat: Claim<u64>,
    exp: Claim<Time>,
    nbf: Claim<Time>,
    ports: Claim<Ports>,
    pool: Claim<bool>,
    port_epoch: Claim<u64>,
    proxy_protocol: Claim<Proxy>,
    allow_from: Claim<Vec<Cidr>>,
    max_connections: Claim<Count>,
    bandwidth_in: Claim<u64>,
    bandwidth_out: Claim<u64>,
    extra: Vec<(String, Json)>,
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Claims(FuzzClaims),
    Json(Json),
}

#[derive(Arbitrary, Debug)]
enum Signing {
    /// HS256 with the relay's secret.
    Secret,
    /// HS256 with another key (the secret itself counts as the secret).
    OtherKey(Vec<u8>),
    Hs384,
    Hs512,
    /// `{"alg":"none"}` and no signature.
    AlgNone,
    /// A header of the fuzzer's, HS256-signed with the secret.
    Header(Json),
}

#[derive(Arbitrary, Debug)]
enum Tamper {
    /// One byte of the token replaced.
    Byte(u16, u8),
    Truncate(u16),
    Append(String),
    /// Another payload under the original header and signature.
    Payload(Json),
}

#[derive(Arbitrary, Debug)]
enum RemotePort {
    Absent,
    Null,
    Port(u16),
    Raw(Json),
}

#[derive(Arbitrary, Debug)]
enum Input {
    /// A correct length prefix around arbitrary bytes.
    Body(Vec<u8>),
    /// A correct length prefix around any JSON document.
    Document(Json),
    /// A hello whose token is any string.
    TokenText {
        token: String,
        remote_port: RemotePort,
    },
    /// A hello whose token is minted from fuzzed claims.
    Minted {
        payload: Payload,
        signing: Signing,
        tamper: Option<Tamper>,
        remote_port: RemotePort,
        extra: Vec<(String, Json)>,
    },
}

#[derive(Arbitrary, Debug)]
struct Case {
    input: Input,
    /// Bytes after the hello frame, which must not change its outcome.
    trailing: Vec<u8>,
}

/// What a well-formed token signed with the secret must lead to.
enum Expected {
    Authenticated(Claims, Option<u16>),
    Refused(Refusal, &'static str),
}

fuzz_target!(|data: &[u8]| {
    NODES_LEFT.with(|left| left.set(NODES_PER_CASE));
    let Ok(case) = Case::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let now = unix_now();
    let (body, expected) = build(case.input, now);
    let mut bytes = framed(&body);
    let outcome = hello::evaluate(&bytes, SECRET);
    check_hello_outcome(&bytes, SECRET, &outcome);
    show_outcome(&outcome);
    if let Some(expected) = expected
        && unix_now() == now
    {
        check_expected(&outcome, expected);
    }
    if !case.trailing.is_empty() {
        bytes.extend_from_slice(&case.trailing);
        let with_trailing = hello::evaluate(&bytes, SECRET);
        check_hello_outcome(&bytes, SECRET, &with_trailing);
        // Both read the clock (exp, nbf): compared when it showed the same second.
        if unix_now() == now {
            assert_eq!(
                format!("{outcome:?}"),
                format!("{with_trailing:?}"),
                "bytes after the hello frame changed its outcome"
            );
        }
    }
});

fn framed(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// The hello's body, and its predicted outcome when the input is one that can be
/// predicted.
fn build(input: Input, now: u64) -> (Vec<u8>, Option<Expected>) {
    match input {
        Input::Body(body) => (body, None),
        Input::Document(Json(document)) => (serde_json::to_vec(&document).unwrap(), None),
        Input::TokenText { token, remote_port } => {
            let mut hello = Map::new();
            hello.insert("token".into(), Value::String(token));
            remote_port_field(&mut hello, &remote_port);
            (serde_json::to_vec(&hello).unwrap(), None)
        }
        Input::Minted {
            payload,
            signing,
            tamper,
            remote_port,
            extra,
        } => {
            let (payload, claims) = match payload {
                Payload::Claims(fuzzed) => claims(fuzzed, now),
                Payload::Json(Json(value)) => (value, None),
            };
            let mut token = mint(&payload, &signing);
            let tampered = tamper.is_some();
            if let Some(tamper) = tamper {
                token = apply(token, tamper);
            }
            let mut hello = Map::new();
            let mut predictable = true;
            for (key, Json(value)) in extra {
                predictable &= !too_deep(&value);
                hello.insert(key, value);
            }
            hello.insert("token".into(), Value::String(token));
            hello.remove("remote_port");
            let port = remote_port_field(&mut hello, &remote_port);
            let expected = match (port, tampered) {
                (Some(port), false) if predictable => expect(&signing, claims, port, now),
                _ => None,
            };
            (serde_json::to_vec(&hello).unwrap(), expected)
        }
    }
}

/// Sets `remote_port`; the port requested when it is a well-typed one.
fn remote_port_field(hello: &mut Map<String, Value>, remote_port: &RemotePort) -> Option<Option<u16>> {
    match remote_port {
        RemotePort::Absent => Some(None),
        RemotePort::Null => {
            hello.insert("remote_port".into(), Value::Null);
            Some(None)
        }
        RemotePort::Port(port) => {
            hello.insert("remote_port".into(), Value::from(*port));
            Some(Some(*port))
        }
        RemotePort::Raw(Json(value)) => {
            hello.insert("remote_port".into(), value.clone());
            None
        }
    }
}

/// The claims as JSON, and as the relay must read them when every one is well-typed.
fn claims(fuzzed: FuzzClaims, now: u64) -> (Value, Option<Claims>) {
    let mut map = Map::new();
    let mut claims = Some(Claims::default());
    // A claim that is not well-typed makes the outcome unpredictable here.
    let mut raw = |map: &mut Map<String, Value>, name: &str, value: Value| {
        map.insert(name.into(), value);
        claims = None;
    };
    let mut typed: Vec<(&str, Value)> = Vec::new();
    let mut expected = Claims::default();
    let mut known = true;

    match fuzzed.sub {
        Claim::Absent => known = false, // `sub` is required
        Claim::Raw(Json(value)) => raw(&mut map, "sub", value),
        Claim::Typed(subject) => {
            let subject = match subject {
                Subject::Text(text) => text,
                Subject::Repeated(c, n) => c.to_string().repeat(usize::from(n % 600)),
            };
            typed.push(("sub", Value::String(subject.clone())));
            expected.sub = subject;
        }
    }
    match fuzzed.iat {
        Claim::Absent => known = false, // `iat` is required
        Claim::Raw(Json(value)) => raw(&mut map, "iat", value),
        Claim::Typed(iat) => {
            typed.push(("iat", Value::from(iat)));
            expected.iat = iat;
        }
    }
    for (name, claim, slot) in [
        ("exp", fuzzed.exp, &mut expected.exp),
        ("nbf", fuzzed.nbf, &mut expected.nbf),
    ] {
        match claim {
            Claim::Absent => {}
            Claim::Raw(Json(value)) => raw(&mut map, name, value),
            Claim::Typed(time) => {
                let at = match time {
                    Time::FromNow(offset) => now.saturating_add_signed(i64::from(offset)),
                    Time::At(at) => at,
                };
                typed.push((name, Value::from(at)));
                *slot = Some(at);
            }
        }
    }
    match fuzzed.ports {
        Claim::Absent => {}
        Claim::Raw(Json(value)) => raw(&mut map, "ports", value),
        Claim::Typed(ports) => {
            let (text, range) = match ports {
                Ports::Single(port) => (port.to_string(), PortRange::single(port)),
                Ports::Range(start, end) => (format!("{start}-{end}"), PortRange::new(start, end)),
                Ports::Text(text) => (text, None),
            };
            match range {
                Some(range) => expected.ports = Some(range),
                None => known = false,
            }
            typed.push(("ports", Value::String(text)));
        }
    }
    match fuzzed.pool {
        Claim::Absent => {}
        Claim::Raw(Json(value)) => raw(&mut map, "pool", value),
        Claim::Typed(pool) => {
            typed.push(("pool", Value::Bool(pool)));
            expected.pool = pool;
        }
    }
    match fuzzed.port_epoch {
        Claim::Absent => {}
        Claim::Raw(Json(value)) => raw(&mut map, "port_epoch", value),
        Claim::Typed(epoch) => {
            typed.push(("port_epoch", Value::from(epoch)));
            expected.port_epoch = Some(epoch);
        }
    }
    let policy: &mut TunnelPolicy = &mut expected.policy;
    match fuzzed.proxy_protocol {
        Claim::Absent => {}
        Claim::Raw(Json(value)) => raw(&mut map, "proxy_protocol", value),
        Claim::Typed(proxy) => {
            let text = match proxy {
                Proxy::V1 => {
                    policy.proxy_protocol = Some(ProxyProtocol::V1);
                    "v1".to_owned()
                }
                Proxy::V2 => {
                    policy.proxy_protocol = Some(ProxyProtocol::V2);
                    "v2".to_owned()
                }
                Proxy::Text(text) => {
                    known = false;
                    text
                }
            };
            typed.push(("proxy_protocol", Value::String(text)));
        }
    }
    match fuzzed.allow_from {
        Claim::Absent => {}
        Claim::Raw(Json(value)) => raw(&mut map, "allow_from", value),
        Claim::Typed(cidrs) => {
            let mut texts = Vec::new();
            let mut nets = Vec::new();
            for cidr in cidrs {
                let (address, prefix) = match cidr {
                    Cidr::V4(octets, prefix) => (IpAddr::V4(Ipv4Addr::from(octets)), prefix),
                    Cidr::V6(octets, prefix) => (IpAddr::V6(Ipv6Addr::from(octets)), prefix),
                    Cidr::Text(text) => {
                        known = false;
                        texts.push(Value::String(text));
                        continue;
                    }
                };
                texts.push(Value::String(format!("{address}/{prefix}")));
                match ipnet::IpNet::new(address, prefix) {
                    Ok(net) => nets.push(net),
                    Err(_) => known = false,
                }
            }
            typed.push(("allow_from", Value::Array(texts)));
            policy.allow_from = Some(nets);
        }
    }
    match fuzzed.max_connections {
        Claim::Absent => {}
        Claim::Raw(Json(value)) => raw(&mut map, "max_connections", value),
        Claim::Typed(count) => {
            let count = match count {
                Count::U32(count) => u64::from(count),
                Count::U64(count) => count,
            };
            match u32::try_from(count) {
                Ok(count) => policy.max_connections = Some(count),
                Err(_) => known = false,
            }
            typed.push(("max_connections", Value::from(count)));
        }
    }
    for (name, claim, slot) in [
        ("bandwidth_in", fuzzed.bandwidth_in, &mut policy.bandwidth_in),
        ("bandwidth_out", fuzzed.bandwidth_out, &mut policy.bandwidth_out),
    ] {
        match claim {
            Claim::Absent => {}
            Claim::Raw(Json(value)) => raw(&mut map, name, value),
            Claim::Typed(rate) => {
                typed.push((name, Value::from(rate)));
                *slot = Some(rate);
            }
        }
    }
    for (name, value) in typed {
        map.insert(name.into(), value);
    }
    // Claims the relay does not know are ignored; one that replaces a known claim
    // makes the outcome unpredictable.
    for (name, Json(value)) in fuzzed.extra {
        if map.contains_key(&name) || is_known_claim(&name) || too_deep(&value) {
            known = false;
        }
        map.insert(name, value);
    }
    let claims = claims.filter(|_| known).map(|_| expected);
    (Value::Object(map), claims)
}

/// Whether a value nested in a claim or a hello field could take the document past
/// serde_json's recursion limit (128 levels), which refuses the whole document, even a
/// field nobody reads.
fn too_deep(value: &Value) -> bool {
    fn depth(value: &Value) -> usize {
        match value {
            Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    depth(value) > 100
}

fn is_known_claim(name: &str) -> bool {
    matches!(
        name,
        "sub"
            | "iat"
            | "exp"
            | "nbf"
            | "ports"
            | "pool"
            | "port_epoch"
            | "proxy_protocol"
            | "allow_from"
            | "max_connections"
            | "bandwidth_in"
            | "bandwidth_out"
    )
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn mint(payload: &Value, signing: &Signing) -> String {
    let header = match signing {
        Signing::Secret | Signing::OtherKey(_) => json!({ "typ": "JWT", "alg": "HS256" }),
        Signing::Hs384 => json!({ "typ": "JWT", "alg": "HS384" }),
        Signing::Hs512 => json!({ "typ": "JWT", "alg": "HS512" }),
        Signing::AlgNone => json!({ "typ": "JWT", "alg": "none" }),
        Signing::Header(Json(header)) => header.clone(),
    };
    let signed = format!(
        "{}.{}",
        b64(&serde_json::to_vec(&header).unwrap()),
        b64(&serde_json::to_vec(payload).unwrap())
    );
    let (algorithm, key) = match signing {
        Signing::Secret | Signing::Header(_) => (ring::hmac::HMAC_SHA256, SECRET),
        Signing::OtherKey(key) => (ring::hmac::HMAC_SHA256, key.as_slice()),
        Signing::Hs384 => (ring::hmac::HMAC_SHA384, SECRET),
        Signing::Hs512 => (ring::hmac::HMAC_SHA512, SECRET),
        Signing::AlgNone => return format!("{signed}."),
    };
    let signature = ring::hmac::sign(&ring::hmac::Key::new(algorithm, key), signed.as_bytes());
    format!("{signed}.{}", b64(signature.as_ref()))
}

fn apply(token: String, tamper: Tamper) -> String {
    let mut bytes = token.into_bytes();
    match tamper {
        Tamper::Byte(at, byte) => {
            let at = usize::from(at) % bytes.len();
            bytes[at] = byte;
        }
        Tamper::Truncate(keep) => bytes.truncate(usize::from(keep) % bytes.len()),
        Tamper::Append(text) => bytes.extend_from_slice(text.as_bytes()),
        Tamper::Payload(Json(payload)) => {
            let token = String::from_utf8(bytes).unwrap();
            let parts: Vec<&str> = token.split('.').collect();
            let replaced = b64(&serde_json::to_vec(&payload).unwrap());
            return format!("{}.{replaced}.{}", parts[0], parts[parts.len() - 1]);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The outcome of a well-framed, untampered hello, when it can be told in advance.
fn expect(
    signing: &Signing,
    claims: Option<Claims>,
    remote_port: Option<u16>,
    now: u64,
) -> Option<Expected> {
    let authentication_failed = |metric| Some(Expected::Refused(Refusal::AuthenticationFailed, metric));
    match signing {
        Signing::OtherKey(key) if key.as_slice() != SECRET => {
            return authentication_failed("bad_signature");
        }
        Signing::Hs384 | Signing::Hs512 => return authentication_failed("wrong_algorithm"),
        Signing::Secret | Signing::OtherKey(_) => {}
        Signing::AlgNone | Signing::Header(_) => return None,
    }
    let claims = claims?;
    // Within a few seconds of the limits (`exp + leeway`, `nbf - leeway`) the second
    // the relay reads its clock decides; those cases are not predicted.
    let leeway = CLOCK_LEEWAY.as_secs();
    let near = |at: u64, limit: u64| at.abs_diff(limit) <= 2;
    if claims.exp.is_some_and(|exp| near(exp, now.saturating_sub(leeway)))
        || claims.nbf.is_some_and(|nbf| near(nbf, now + leeway))
    {
        return None;
    }
    Some(if claims.exp.is_some_and(|exp| exp < now - leeway) {
        Expected::Refused(Refusal::AuthenticationFailed, "expired")
    } else if claims.nbf.is_some_and(|nbf| nbf > now + leeway) {
        Expected::Refused(Refusal::AuthenticationFailed, "not_yet_valid")
    } else if claims.sub.is_empty() || claims.sub.len() > hello::MAX_SUBJECT_LEN {
        Expected::Refused(Refusal::AuthenticationFailed, "bad_subject")
    } else if remote_port == Some(0) {
        Expected::Refused(Refusal::Malformed, "malformed")
    } else {
        Expected::Authenticated(claims, remote_port)
    })
}

fn check_expected(outcome: &Outcome, expected: Expected) {
    match (outcome, expected) {
        (Outcome::Authenticated(hello, claims), Expected::Authenticated(minted, port)) => {
            assert_eq!(claims, &minted, "the relay read other claims than were minted");
            assert_eq!(hello.remote_port, port, "the relay read another port");
        }
        (Outcome::Refused(refused), Expected::Refused(refusal, metric)) => {
            assert_eq!(
                (refused.refusal, refused.metric),
                (refusal, metric),
                "refused for another reason: {refused:?}"
            );
        }
        (outcome, Expected::Authenticated(minted, _)) => {
            panic!("a valid token for {minted:?} was not authenticated: {outcome:?}")
        }
        (outcome, Expected::Refused(refusal, metric)) => {
            panic!("expected a refusal ({refusal:?}, {metric}), got {outcome:?}")
        }
    }
}
