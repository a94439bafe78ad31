//! Every failure a user can meet, each with its clear one-line message.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::*;
use localup_protocol::token::{Claims, unix_now};

#[test]
fn a_token_signed_with_another_secret_is_refused() {
    let relay = Relay::start(5);
    let wrong = Claims::new("mydb").mint(b"not-the-relay-secret");
    let output = expect_client_failure(&relay.addr(), &wrong, &[]);
    assert!(output.contains("Authentication failed"), "{output}");
    assert!(output.contains("--jwt-secret"), "{output}");
    assert_eq!(
        relay.metric("localup_auth_failures_total{reason=\"bad_signature\"}"),
        1.0
    );
}

#[test]
fn an_expired_token_is_refused_with_the_reason() {
    let relay = Relay::start(5);
    let expired = Claims::new("mydb")
        .expires_at(unix_now() - 3600)
        .mint(SECRET.as_bytes());
    let output = expect_client_failure(&relay.addr(), &expired, &[]);
    assert!(
        output.contains("Authentication failed: the token has expired"),
        "{output}"
    );
}

#[test]
fn a_token_pinned_to_one_port_cannot_take_another() {
    let relay = Relay::start(5);
    let pinned = Claims::new("mydb")
        .restricted_to(localup_protocol::PortRange::single(relay.range.0).unwrap())
        .mint(SECRET.as_bytes());
    let other = (relay.range.0 + 1).to_string();
    let output = expect_client_failure(&relay.addr(), &pinned, &["--remote-port", &other]);
    assert!(
        output.contains("Authentication failed: the token does not allow port"),
        "{output}"
    );

    // Without --remote-port, the token's port is the one allocated.
    let (_client, port) = Client::start(&relay, echo_server(), &pinned, &[]);
    assert_eq!(port, relay.range.0);
}

#[test]
fn a_port_outside_the_range_is_refused_with_the_range() {
    let relay = Relay::start(5);
    let outside = (relay.range.1 + 1).to_string();
    let output = expect_client_failure(&relay.addr(), &token("mydb"), &["--remote-port", &outside]);
    let range = format!("{}-{}", relay.range.0, relay.range.1);
    assert!(
        output.contains("Requested port outside allowed range"),
        "{output}"
    );
    assert!(output.contains(&range), "{output}");
}

#[test]
fn a_port_held_by_another_tunnel_is_refused() {
    let relay = Relay::start(5);
    let wanted = relay.range.0.to_string();
    let (_first, _) = Client::start(
        &relay,
        echo_server(),
        &token("a"),
        &["--remote-port", &wanted],
    );
    let output = expect_client_failure(&relay.addr(), &token("b"), &["--remote-port", &wanted]);
    assert!(output.contains("Address already in use"), "{output}");
}

#[test]
fn a_port_taken_by_another_process_fails_after_three_bind_attempts() {
    let relay = Relay::start(5);
    let squatter = TcpListener::bind(("127.0.0.1", relay.range.0)).unwrap();
    let wanted = relay.range.0.to_string();
    let started = Instant::now();
    let output = expect_client_failure(&relay.addr(), &token("a"), &["--remote-port", &wanted]);
    assert!(output.contains("Failed to bind to port"), "{output}");
    assert!(output.contains("tried 3 times"), "{output}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "bind was not retried"
    );

    // Auto-allocation skips the taken port.
    let (_client, port) = Client::start(&relay, echo_server(), &token("a"), &[]);
    assert_ne!(port, relay.range.0);
    drop(squatter);
}

#[test]
fn an_unreachable_relay_fails_after_a_bounded_wait() {
    let nowhere = format!("localhost:{}", free_udp_port());
    let started = Instant::now();
    let output = expect_client_failure(&nowhere, &token("a"), &["--connect-timeout", "2s"]);
    assert!(output.contains("cannot reach the relay"), "{output}");
    assert!(output.contains("UDP"), "{output}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn unsupported_protocols_and_bad_relay_addresses_are_named() {
    let mut process = std::process::Command::new(BIN)
        .args([
            "--port",
            "80",
            "--protocol",
            "http",
            "--relay",
            "localhost:4443",
            "--token",
            "t",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&process.stderr).to_string();
    assert!(!process.status.success());
    assert!(
        stderr.contains("invalid value 'http'") && stderr.contains("tcp"),
        "{stderr}"
    );

    process = std::process::Command::new(BIN)
        .args(["--port", "80", "--relay", "no-port-here", "--token", "t"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&process.stderr).to_string();
    assert!(stderr.contains("expected HOST:PORT"), "{stderr}");
}

#[test]
fn the_relay_requires_a_jwt_secret_and_a_valid_range() {
    let missing = std::process::Command::new(BIN)
        .args(["relay", "tcp"])
        .env_remove("LOCALUP_JWT_SECRET")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--jwt-secret"));

    let backwards = std::process::Command::new(BIN)
        .args([
            "relay",
            "tcp",
            "--jwt-secret",
            "s",
            "--tcp-port-range",
            "20000-10000",
        ])
        .output()
        .unwrap();
    assert!(!backwards.status.success());
    assert!(String::from_utf8_lossy(&backwards.stderr).contains("start is above the end"));
}

/// A client that sends garbage is dropped and logged; everyone else is unharmed.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_and_oversized_control_messages_drop_only_that_client() {
    let relay = Relay::start(5);
    let (_good, port) = Client::start(&relay, echo_server(), &token("good"), &[]);

    let _ = rustls::crypto::ring::default_provider().install_default();
    for garbage in [
        u32::MAX.to_be_bytes().to_vec(),              // oversized frame
        [&5u32.to_be_bytes()[..], b"{oops"].concat(), // not JSON
        [&2u32.to_be_bytes()[..], b"{}"].concat(),    // JSON, not a hello
    ] {
        let (tls, _) = localup_client::trust::client_config(
            &localup_client::trust::TrustPolicy::Insecure,
            "relay",
        )
        .unwrap();
        let config = localup_client::trust::quic_config(tls).unwrap();
        let socket = localup_protocol::quic::udp_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let endpoint = localup_protocol::quic::client_endpoint(socket).unwrap();
        let relay_addr = format!("127.0.0.1:{}", relay.control_port).parse().unwrap();
        let connection = endpoint
            .connect_with(config, relay_addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&garbage).await.unwrap();
        let reply =
            localup_protocol::frame::read::<localup_protocol::message::HelloReply, _>(&mut recv)
                .await;
        assert!(
            matches!(
                reply,
                Ok(localup_protocol::message::HelloReply::Refused {
                    reason: localup_protocol::message::Refusal::Malformed,
                    ..
                })
            ),
            "{reply:?}"
        );
        let closed = tokio::time::timeout(Duration::from_secs(5), connection.closed()).await;
        assert!(closed.is_ok(), "relay kept the misbehaving client");
    }
    relay
        .process
        .output
        .wait_for("exceeds the 16384-byte limit", Duration::from_secs(5));
    assert_eq!(relay.metric("localup_protocol_errors_total"), 3.0);
    assert_eq!(echo_round_trip(port, b"still fine"), b"still fine");
}
