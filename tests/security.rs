//! Hostile or careless surroundings: floods of external connections, a database that
//! is gone, admin endpoints, short secrets, and certificate trust that must fail
//! closed.

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::inprocess::{self, LiveClient, LiveRelay, client_config, mint};
use common::*;
use localup_protocol::token::Claims;

/// A local service that accepts connections and never reads from them. Its receive
/// buffers are small, so what it does not read pushes back through the tunnel at once
/// instead of filling kernel buffers.
fn never_reading_service() -> u16 {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(&std::net::SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    socket.listen(4096).unwrap();
    let listener: TcpListener = socket.into();
    let port = listener.local_addr().unwrap().port();
    let held = Arc::new(Mutex::new(Vec::new()));
    thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            held.lock().unwrap().push(stream);
        }
    });
    port
}

/// 3000 external connections each sending 512 KiB to a service that never reads: the
/// relay stays under the 256 MiB its chart gives it, refuses what is past the
/// tunnel's connection limit, and another tunnel keeps working.
#[test]
#[ignore = "moves a GiB through debug builds (about a minute); scripts/test.sh runs it"]
fn a_flood_of_connections_to_a_service_that_never_reads_is_bounded() {
    const FLOOD: usize = 3000;
    const EACH: usize = 512 * 1024;
    let relay = Relay::start(10);
    let (_victim, port) = Client::start(&relay, never_reading_service(), &token("victim"), &[]);
    let (_bystander, other) = Client::start(&relay, echo_server(), &token("bystander"), &[]);

    // The flood runs on a runtime of its own; this thread watches the relay.
    let flood = tokio::runtime::Runtime::new().unwrap();
    let payload: Arc<[u8]> = vec![7u8; EACH].into();
    for _ in 0..FLOOD {
        let payload = Arc::clone(&payload);
        flood.spawn(async move {
            use tokio::io::AsyncWriteExt;
            let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                return;
            };
            let _ = stream.write_all(&payload).await;
            // Held open (the service never reads) until the test ends.
            std::future::pending::<()>().await;
        });
    }
    let refused = "localup_connections_refused_total{reason=\"tunnel_limit\"}";
    eventually(
        "every flood connection to be carried or refused",
        Duration::from_secs(60),
        || {
            let (_, metrics) = relay.admin_get("/metrics");
            metrics.contains(refused)
                && inprocess::metric_value(&metrics, "localup_connections_active")
                    + inprocess::metric_value(&metrics, refused)
                    >= FLOOD as f64
        },
    );
    assert_eq!(relay.metric("localup_connections_active"), 2048.0);
    // The carried ones push what flow control lets them; wait until that is done (the
    // bytes towards the service stop growing).
    let inbound = "localup_bytes_total{direction=\"inbound\"}";
    let mut last = -1.0;
    eventually(
        "the flood to go as far as flow control lets it",
        Duration::from_secs(150),
        || {
            thread::sleep(Duration::from_millis(500));
            let now = relay.metric(inbound);
            let stopped = now == last;
            last = now;
            stopped
        },
    );
    assert!(last > 0.0, "nothing reached the service");
    let peak_mib = relay.process.rss_kib() / 1024;
    println!("relay peak RSS under a flood of {FLOOD} x 512 KiB: {peak_mib} MiB");
    assert!(peak_mib < 256, "relay peak RSS {peak_mib} MiB");
    assert_eq!(echo_round_trip(other, b"still served"), b"still served");
    flood.shutdown_background();
}

#[test]
fn a_database_that_is_down_keeps_tunnels_opening_and_its_password_out_of_the_log() {
    // Nothing listens on port 1.
    let relay = Relay::start_with(RelayOptions {
        extra: vec![
            "--database-url".into(),
            "postgres://relay:hunter2@127.0.0.1:1/relay?password=hunter2".into(),
        ],
        ..RelayOptions::range(free_port_range(5))
    });
    let (_client, port) = Client::start(&relay, echo_server(), &token("mydb"), &[]);
    assert_eq!(echo_round_trip(port, b"no database"), b"no database");
    assert_eq!(
        relay.admin_get("/readyz").0,
        200,
        "pulled out of its Service"
    );
    assert_eq!(relay.metric("localup_database_up"), 0.0);
    assert!(relay.metric("localup_database_errors_total") >= 1.0);
    let log = relay.process.output.text();
    assert!(log.contains("tunnels keep working"), "{log}");
    assert!(!log.contains("hunter2"), "the password was logged:\n{log}");
}

#[test]
fn a_short_jwt_secret_is_accepted_with_a_warning() {
    let relay = Relay::start(5);
    relay
        .process
        .output
        .wait_for("shorter than 32 bytes", Duration::from_secs(1));
}

#[test]
fn generated_tokens_expire_in_30_days_unless_asked_otherwise() {
    let minted = |extra: &[&str]| {
        let output = std::process::Command::new(BIN)
            .args(["generate-token", "--secret", SECRET, "--sub", "mydb"])
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let default = minted(&[]);
    let expires = default
        .lines()
        .find_map(|line| line.strip_prefix("Expires: "))
        .unwrap();
    let in_30_days = std::time::SystemTime::now() + Duration::from_secs(30 * 24 * 3600);
    let day = humantime::format_rfc3339_seconds(in_30_days).to_string();
    assert!(expires.starts_with(&day[..10]), "{default}");
    assert!(minted(&["--expires-in", "never"]).contains("Expires: never"));
    let error = std::process::Command::new(BIN)
        .args([
            "generate-token",
            "--secret",
            SECRET,
            "--sub",
            "x",
            "--expires-in",
            "soon",
        ])
        .output()
        .unwrap();
    assert!(!error.status.success());
    assert!(String::from_utf8_lossy(&error.stderr).contains("never"));
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_can_require_a_bearer_token_but_probes_never_do() {
    let relay = LiveRelay::start(5, &["--admin-token", "s3cret"]).await;
    let _client = LiveClient::start(client_config(
        &relay,
        inprocess::echo_server().await,
        &mint(Claims::new("a")),
    ))
    .await;
    for path in ["/metrics", "/api/tunnels"] {
        assert_eq!(
            relay.admin_get(path, None).await.0,
            401,
            "{path} without a token"
        );
        assert_eq!(relay.admin_get(path, Some("wrong")).await.0, 401, "{path}");
        let (status, body) = relay.admin_get(path, Some("s3cret")).await;
        assert_eq!(status, 200, "{path}");
        assert!(body.contains('a'), "{body}");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(relay.admin_get(path, None).await.0, 200, "{path}");
    }
}

/// Runs a client that must fail; returns its output.
fn refused_client(relay: &Relay, home: &std::path::Path, extra: &[&str]) -> String {
    let mut client = Client::spawn(&relay.addr(), free_tcp_port(), &token("a"), extra, home);
    let status = client.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", client.output.text());
    client.output.text()
}

#[test]
fn a_known_relays_file_that_cannot_be_read_or_parsed_refuses_the_relay() {
    let relay = Relay::start(5);
    let home = scratch_dir("client");
    let as_directory = home.join("pins-dir");
    std::fs::create_dir_all(&as_directory).unwrap();
    let output = refused_client(
        &relay,
        &home,
        &["--known-relays", as_directory.to_str().unwrap()],
    );
    assert!(
        output.contains("cannot read the pinned relay certificates")
            && output.contains("--insecure"),
        "{output}"
    );
    let garbled = home.join("garbled");
    std::fs::write(&garbled, "this is not a pin\n").unwrap();
    let output = refused_client(
        &relay,
        &home,
        &["--known-relays", garbled.to_str().unwrap()],
    );
    assert!(
        output.contains("line 1 of") && output.contains("--relay-ca"),
        "{output}"
    );
}

#[test]
fn a_pin_that_cannot_be_saved_refuses_the_relay() {
    let relay = Relay::start(5);
    let home = scratch_dir("client");
    // Readable as "no pin yet", but nothing can be created under /proc, even by root.
    let unwritable = "/proc/localup-no-such-dir/known_relays";
    let output = refused_client(&relay, &home, &["--known-relays", unwritable]);
    assert!(
        output.contains("cannot pin the relay's certificate")
            && output.contains("writable --known-relays"),
        "{output}"
    );
}

/// A relay the client pinned comes back with another certificate while the pin file
/// is gone: the client still refuses it, from the pin it holds in memory.
#[test]
fn pins_are_kept_in_memory_across_reconnects() {
    let control_port = free_udp_port();
    let range = free_port_range(5);
    let first = Relay::start_with(RelayOptions {
        control_port: Some(control_port),
        ..RelayOptions::range(range)
    });
    let (mut client, _) = Client::start(&first, echo_server(), &token("a"), &[]);
    std::fs::remove_file(client.home.join(".config/localup/known_relays")).unwrap();
    drop(first);
    let _impostor = Relay::start_with(RelayOptions {
        control_port: Some(control_port),
        ..RelayOptions::range(range)
    });
    let status = client.process.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let output = client.process.output.text();
    assert!(output.contains("has changed"), "{output}");
}
