//! The reference's flows end to end: relay and client as real processes on loopback.

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
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
fn megabytes_of_random_bytes_survive_both_ways_on_many_connections() {
    let relay = Relay::start(10);
    let (_client, port) = Client::start(&relay, echo_server(), &token("bulk"), &[]);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                let data = random_bytes(4 * 1024 * 1024);
                assert!(echo_round_trip(port, &data) == data, "corrupted echo");
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let moved = 8.0 * 4.0 * 1024.0 * 1024.0;
    assert_eq!(
        relay.metric("localup_bytes_total{direction=\"inbound\"}"),
        moved
    );
    assert_eq!(
        relay.metric("localup_bytes_total{direction=\"outbound\"}"),
        moved
    );
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
fn half_close_is_propagated_both_ways() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local_port = server.local_addr().unwrap().port();
    let server_thread = thread::spawn(move || {
        let (mut stream, _) = server.accept().unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).unwrap(); // returns only on the client's FIN
        stream
            .write_all(format!("got {} bytes", request.len()).as_bytes())
            .unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
    });
    let relay = Relay::start(10);
    let (_client, port) = Client::start(&relay, local_port, &token("fin"), &[]);

    let mut stream = connect(port);
    stream.write_all(&[7u8; 100_000]).unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap(); // returns only on the server's FIN
    assert_eq!(reply, "got 100000 bytes");
    server_thread.join().unwrap();
}

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

#[test]
fn a_dead_local_service_refuses_that_connection_and_the_tunnel_stays_up() {
    let relay = Relay::start(10);
    let dead_port = free_tcp_port();
    let (mut client, port) = Client::start(&relay, dead_port, &token("down"), &[]);

    let mut stream = connect(port);
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(b"anyone?");
    let mut buffer = [0u8; 16];
    let read = stream.read(&mut buffer);
    // Closed by the relay (a reset, or an end with nothing sent), not left hanging.
    let closed = match &read {
        Ok(0) => true,
        Err(error) => matches!(
            error.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        Ok(_) => false,
    };
    assert!(closed, "expected the connection to be refused: {read:?}");
    client
        .process
        .output
        .wait_for("local service is unreachable", Duration::from_secs(5));

    // Start the service on that very port: the same tunnel now serves it.
    let listener = std::net::TcpListener::bind(("127.0.0.1", dead_port)).unwrap();
    thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"up now").unwrap();
    });
    let mut stream = connect(port);
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "up now");
    assert!(client.process.is_running());
}

#[test]
fn server_speaks_first_protocols_work() {
    // Like MySQL or SMTP: the service greets before the client says anything.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local_port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let _ = stream.unwrap().write_all(b"220 greetings\r\n");
        }
    });
    let relay = Relay::start(10);
    let (_client, port) = Client::start(&relay, local_port, &token("smtp"), &[]);
    let mut stream = connect(port);
    let mut greeting = [0u8; 15];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 greetings\r\n");
}
