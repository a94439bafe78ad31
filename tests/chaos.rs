//! Processes that die or freeze: the relay and the client killed in turn, and a
//! client stopped and continued. The port must come back each time.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// Polls until `port` echoes 1 MiB intact; returns how long that took from `since`.
fn serves_again(port: u16, since: Instant, within: Duration) -> Duration {
    let data = random_bytes(1024 * 1024);
    eventually("the port to serve again", within, || {
        try_echo(port, &data).is_ok_and(|echoed| echoed == data)
    });
    since.elapsed()
}

/// One echo of `data` through `port`, giving up after 2 s of silence (a connection
/// that reached a client which is gone waits for it otherwise).
fn try_echo(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut writer = stream.try_clone()?;
    let payload = data.to_vec();
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        writer.write_all(&payload)?;
        writer.shutdown(std::net::Shutdown::Write)
    });
    let mut echoed = Vec::with_capacity(data.len());
    let read = (&stream).read_to_end(&mut echoed);
    let sent = sender.join().expect("the sender does not panic");
    read?;
    sent?;
    Ok(echoed)
}

/// 16 SIGKILLs, alternating between the relay (restarted on the same SQLite database
/// and certificate) and the client (restarted with the same command): each time the
/// same public port serves 1 MiB intact again within 5 s.
#[test]
#[ignore = "16 kills, about a minute; scripts/test.sh runs it"]
fn the_port_survives_16_alternating_kills_of_relay_and_client() {
    let home = scratch_dir("relay");
    let database = format!("sqlite://{}/relay.db", home.display());
    let control_port = free_udp_port();
    let range = free_port_range(20);
    let relay_options = || RelayOptions {
        control_port: Some(control_port),
        home: Some(home.clone()),
        extra: vec!["--database-url".into(), database.clone()],
        ..RelayOptions::range(range)
    };
    let echo = echo_server();
    let token = token("chaos");
    let mut relay = Relay::start_with(relay_options());
    let (mut client, port) = Client::start(&relay, echo, &token, &[]);
    let mut recoveries = Vec::new();
    for round in 0..16 {
        let killed = Instant::now();
        if round % 2 == 0 {
            relay.process.signal("KILL");
            drop(relay);
            relay = Relay::start_with(relay_options());
        } else {
            client.process.signal("KILL");
            drop(client);
            let (restarted, again) = Client::start(&relay, echo, &token, &[]);
            assert_eq!(
                again, port,
                "round {round}: the restarted client got another port"
            );
            client = restarted;
        }
        let took = serves_again(port, killed, Duration::from_secs(15));
        assert!(
            took < Duration::from_secs(5),
            "round {round} ({}): back after {took:?}",
            if round % 2 == 0 { "relay" } else { "client" }
        );
        recoveries.push(took);
    }
    recoveries.sort();
    println!(
        "recovery after a SIGKILL over 16 rounds: median {:?}, worst {:?}",
        recoveries[recoveries.len() / 2],
        recoveries[recoveries.len() - 1]
    );
}

/// A client frozen with SIGSTOP is noticed by the relay within 8 s: its port stops
/// accepting and stays reserved for its subject. Continued, it is back on the same
/// port within 5 s.
#[test]
fn a_frozen_client_is_noticed_and_comes_back_to_its_port() {
    let relay = Relay::start(10);
    let (client, port) = Client::start(&relay, echo_server(), &token("frozen"), &[]);
    client.process.signal("STOP");
    let frozen = Instant::now();
    eventually(
        "the relay to notice the frozen client",
        Duration::from_secs(15),
        || !port_accepts(port),
    );
    let noticed = frozen.elapsed();
    assert!(
        noticed < Duration::from_secs(8),
        "noticed after {noticed:?}"
    );
    let output = expect_client_failure(
        &relay.addr(),
        &token("someone-else"),
        &["--remote-port", &port.to_string()],
    );
    assert!(output.contains("is reserved"), "{output}");

    client.process.signal("CONT");
    let continued = Instant::now();
    let back = serves_again(port, continued, Duration::from_secs(15));
    println!("frozen client noticed after {noticed:?}, back {back:?} after SIGCONT");
    assert!(back < Duration::from_secs(5), "back after {back:?}");
}
