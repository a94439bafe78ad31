//! The README's walkthrough commands as real processes on loopback: what the CLI
//! prints and serves, its memory with many connections open, and releasing a port.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::thread;
use std::time::Duration;

use common::*;

#[test]
fn auto_allocated_port_carries_data() {
    let relay = Relay::start(10);
    let (_client, port) = Client::start(&relay, echo_server(), &token("mydb"), &[]);
    assert!(
        (relay.range.0..=relay.range.1).contains(&port),
        "{port} outside {:?}",
        relay.range
    );
    assert_eq!(echo_round_trip(port, b"hello"), b"hello");
}

#[test]
fn requested_port_is_granted_and_listed() {
    let relay = Relay::start(10);
    let wanted = relay.range.0 + 7;
    let (_client, port) = Client::start(
        &relay,
        echo_server(),
        &token("mydb"),
        &["--remote-port", &wanted.to_string()],
    );
    assert_eq!(port, wanted);
    assert_eq!(echo_round_trip(port, b"ping"), b"ping");

    let (status, body) = relay.admin_get("/api/tunnels");
    assert_eq!(status, 200);
    let tunnels: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(tunnels[0]["subject"], "mydb");
    assert_eq!(tunnels[0]["port"], wanted);
    assert_eq!(relay.admin_get("/healthz").0, 200);
    assert_eq!(relay.admin_get("/readyz").0, 200);
    assert_eq!(relay.metric("localup_tunnels_active"), 1.0);
}

#[test]
fn a_thousand_concurrent_connections_are_all_served() {
    let relay = Relay::start(10);
    let (client, port) = Client::start(&relay, echo_server(), &token("many"), &[]);
    let streams: Vec<_> = (0..1000).map(|_| connect(port)).collect();
    for (i, mut stream) in streams.iter().enumerate() {
        stream.write_all(format!("{i:06}").as_bytes()).unwrap();
    }
    for (i, mut stream) in streams.iter().enumerate() {
        let mut reply = [0u8; 6];
        stream.read_exact(&mut reply).unwrap();
        assert_eq!(reply, format!("{i:06}").as_bytes());
    }
    assert_eq!(relay.metric("localup_connections_active"), 1000.0);
    drop(streams);
    eventually("connections to close", Duration::from_secs(10), || {
        relay.metric("localup_connections_active") == 0.0
    });
    // Idle connections must cost little: both processes stay small.
    let rss_mib = (relay.process.rss_kib() + client.process.rss_kib()) / 1024;
    assert!(rss_mib < 128, "relay + client peak RSS {rss_mib} MiB");
}

/// FIN travels each way on its own: a client that stops sending still gets the reply.

#[test]
fn closing_the_tunnel_releases_the_port_at_once_for_reuse() {
    // Without a reservation period, so that another subject may take the port at once.
    let relay = Relay::start_with(RelayOptions {
        extra: vec![
            "--port-reservation".into(),
            "0s".into(),
            "--log".into(),
            "info,localup_relay::allocator=debug".into(),
        ],
        ..RelayOptions::range(free_port_range(10))
    });
    let wanted = relay.range.0 + 3;
    let echo = echo_server();
    let args = ["--remote-port".to_owned(), wanted.to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut first, _) = Client::start(&relay, echo, &token("a"), &args);
    assert!(port_accepts(wanted));

    first.process.signal("TERM");
    let status = first.process.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "SIGTERM should exit cleanly: {status:?}");
    relay
        .process
        .output
        .wait_for("port released", Duration::from_secs(5));
    assert!(
        !port_accepts(wanted),
        "port still open after the tunnel closed"
    );

    let (_second, port) = Client::start(&relay, echo, &token("b"), &args);
    assert_eq!(port, wanted);
    assert!(
        !relay.process.output.text().contains("port busy, retrying"),
        "reuse needed a bind retry"
    );
    assert_eq!(echo_round_trip(port, b"again"), b"again");
}

/// A panic in one connection's task must not take every tunnel down: tasks unwind and
/// the runtime reports the panic to that task's owner, which only works while no build
/// profile turns panics into aborts.
#[test]
fn no_build_profile_aborts_the_process_on_a_panic() {
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let mut profile = None;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            profile = line.strip_prefix("[profile.").map(str::to_owned);
        } else if let Some(profile) = &profile {
            let setting: String = line.chars().filter(|c| !c.is_whitespace()).collect();
            assert_ne!(
                setting, "panic=\"abort\"",
                "[profile.{profile} sets panic = \"abort\""
            );
        }
    }
}

#[test]
fn the_health_endpoint_answers_while_the_relay_is_still_unreachable() {
    let health = free_tcp_port();
    let unreachable = format!("127.0.0.1:{}", free_udp_port());
    let mut process = Client::spawn(
        &unreachable,
        echo_server(),
        &token("waiting"),
        &[
            "--health-addr",
            &format!("127.0.0.1:{health}"),
            "--connect-timeout",
            "0",
        ],
        &scratch_dir("client"),
    );
    eventually("the health endpoint to listen", STARTUP, || {
        port_accepts(health)
    });
    assert_eq!(http_get(health, "/healthz").0, 200, "alive");
    let (status, body) = http_get(health, "/readyz");
    assert_eq!(status, 503, "not ready before a tunnel: {body}");
    assert!(process.is_running());
}

/// What a pod's preStop hook does before its app stops listening: `/drain`, with the
/// drain token, takes the client out of its pool at once, so every new connection goes
/// to the other client, and the drained client keeps running until it is signalled.
#[test]
fn drain_takes_a_client_out_of_its_pool_and_it_runs_until_signalled() {
    let relay = Relay::start(10);
    let health = free_tcp_port();
    let token = pool_token("web");
    let (mut drained, port) = Client::start(
        &relay,
        name_server("drained"),
        &token,
        &[
            "--health-addr",
            &format!("127.0.0.1:{health}"),
            "--drain-token",
            "let-me-drain",
        ],
    );
    let (_other, other_port) = Client::start(
        &relay,
        name_server("other"),
        &token,
        &["--remote-port", &port.to_string()],
    );
    assert_eq!(other_port, port);
    let answers = |count: usize| -> Vec<String> { (0..count).map(|_| ask_name(port)).collect() };
    assert!(
        answers(20).iter().any(|name| name == "drained"),
        "both clients serve before the drain"
    );

    assert_eq!(http_get(health, "/drain").0, 401, "no token, no drain");
    let wrong = [("Authorization", "Bearer not-it")];
    assert_eq!(http_get_with(health, "/drain", &wrong).0, 401);
    assert!(answers(10).iter().any(|name| name == "drained"));
    let right = [("Authorization", "Bearer let-me-drain")];
    let (status, body) = http_get_with(health, "/drain", &right);
    assert_eq!(status, 200, "{body}");

    let after = answers(20);
    assert!(
        after.iter().all(|name| name == "other"),
        "new connections after the drain: {after:?}"
    );
    let (status, body) = http_get(health, "/readyz");
    assert_eq!(
        (status, body.trim()),
        (503, "draining: taking no new connections")
    );
    assert!(
        drained.process.is_running(),
        "a drained client waits for its signal"
    );
    drained.process.signal("TERM");
    let exit = drained.process.wait_exit(Duration::from_secs(15));
    assert!(
        exit.success(),
        "SIGTERM after a drain exits cleanly: {exit:?}"
    );
}

/// A service that answers each connection with `name` and closes it.
fn name_server(name: &'static str) -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            let _ = stream.write_all(name.as_bytes());
        }
    });
    port
}

fn ask_name(port: u16) -> String {
    let mut name = String::new();
    connect(port).read_to_string(&mut name).unwrap();
    name
}
