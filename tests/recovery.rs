//! Crashes, restarts and trust: the relay goes away and comes back, and the
//! client's view of it stays safe and correct.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_client_reconnects_to_a_restarted_relay_and_keeps_its_port() {
    let relay = Relay::start(20);
    let (control_port, range, home) = (relay.control_port, relay.range, relay.home.clone());
    let (client, port) = Client::start(&relay, echo_server(), &token("mydb"), &[]);
    assert_eq!(echo_round_trip(port, b"before"), b"before");

    relay.process.signal("KILL");
    drop(relay);
    let relay = Relay::start_with(RelayOptions {
        control_port: Some(control_port),
        home: Some(home),
        ..RelayOptions::range(range)
    });
    let line =
        client
            .process
            .output
            .wait_for_nth("✅ TCP tunnel created: ", 2, Duration::from_secs(30));
    assert_eq!(
        parse_tunnel_port(&line),
        port,
        "reconnected on another port"
    );
    assert_eq!(echo_round_trip(port, b"after"), b"after");
    // The restarted relay resets the old connection: no idle timeout to wait out.
    let lost = client
        .process
        .output
        .wait_for("lost the relay", Duration::from_secs(1));
    assert!(lost.contains("reset by peer"), "{lost}");
    drop(relay);
}

#[test]
fn with_sqlite_a_restarted_relay_gives_each_subject_its_port_back() {
    let home = scratch_dir("relay");
    let database = format!("sqlite://{}/relay.db", home.display());
    let range = free_port_range(50);
    let options = || RelayOptions {
        home: Some(home.clone()),
        extra: vec!["--database-url".into(), database.clone()],
        ..RelayOptions::range(range)
    };
    let echo = echo_server();

    let mut relay = Relay::start_with(options());
    let (first, port) = Client::start(&relay, echo, &token("mydb"), &[]);
    drop(first);
    // Reservations are written off the reply path; a clean stop flushes them.
    relay.process.signal("TERM");
    assert!(relay.process.wait_exit(Duration::from_secs(15)).success());
    drop(relay);

    let relay = Relay::start_with(options());
    // Another subject is kept off the remembered port while others are free...
    for _ in 0..5 {
        let (other, other_port) = Client::start(&relay, echo, &token("other"), &[]);
        assert_ne!(other_port, port);
        drop(other);
    }
    // ...and the subject, reconnecting from a new process without --remote-port, gets it.
    let (_again, again_port) = Client::start(&relay, echo, &token("mydb"), &[]);
    assert_eq!(again_port, port);
}

#[test]
fn sigterm_stops_the_relay_cleanly_and_clients_start_reconnecting() {
    let mut relay = Relay::start(5);
    let (client, _) = Client::start(&relay, echo_server(), &token("mydb"), &[]);
    relay.process.signal("TERM");
    let status = relay.process.wait_exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "{status:?}\n{}",
        relay.process.output.text()
    );
    client
        .process
        .output
        .wait_for("lost the relay; reconnecting", Duration::from_secs(5));
}

#[test]
fn a_relay_whose_certificate_changed_is_refused_until_the_pin_is_removed() {
    let control_port = free_udp_port();
    let range = free_port_range(5);
    let client_home = scratch_dir("client");
    let echo = echo_server();

    let first = Relay::start_with(RelayOptions {
        control_port: Some(control_port),
        ..RelayOptions::range(range)
    });
    let (client, _) = Client::start_in(&first, echo, &token("a"), &[], client_home.clone());
    client
        .process
        .output
        .wait_for("trusting its certificate", Duration::from_secs(1));
    drop(client);
    drop(first);

    // Same address, new identity: what an attacker in the middle would look like.
    let impostor = Relay::start_with(RelayOptions {
        control_port: Some(control_port),
        ..RelayOptions::range(range)
    });
    let mut refused = Client::spawn(&impostor.addr(), echo, &token("a"), &[], &client_home);
    assert!(!refused.wait_exit(Duration::from_secs(20)).success());
    let output = refused.output.text();
    assert!(
        output.contains("certificate for") && output.contains("has changed"),
        "{output}"
    );
    assert!(output.contains("known_relays"), "{output}");

    // Trusting the new certificate explicitly works, by CA file or by removing the pin.
    let cert = impostor.home.join(".local/share/localup/relay-cert.pem");
    let cert = cert.to_str().unwrap();
    let (_by_ca, _) = Client::start_in(
        &impostor,
        echo,
        &token("a"),
        &["--relay-ca", cert],
        client_home.clone(),
    );
    std::fs::remove_file(client_home.join(".config/localup/known_relays")).unwrap();
    let (_repinned, _) = Client::start_in(&impostor, echo, &token("a"), &[], client_home);
}

#[test]
fn a_ca_file_that_does_not_match_the_relay_is_refused() {
    let relay = Relay::start(5);
    let other = Relay::start(5);
    let wrong_ca = other.home.join(".local/share/localup/relay-cert.pem");
    let output = expect_client_failure(
        &relay.addr(),
        &token("a"),
        &["--relay-ca", wrong_ca.to_str().unwrap()],
    );
    assert!(output.contains("not trusted by --relay-ca"), "{output}");
}
