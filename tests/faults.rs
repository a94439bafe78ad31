//! Faults on the path between client and relay: delay, loss, reordering, blackholes
//! and cuts, over both transports. Data through the tunnel must stay intact and the
//! tunnel must recover on its port.
//!
//! The client's `--relay` is a fault proxy (`localup-fault-proxy`) in front of the
//! relay's control port: UDP for QUIC (the README's command, no `--transport`), TCP
//! for `--transport tcp`, both on one port number for `--transport auto`. These run in
//! plain `cargo test`. The `#[ignore]`d cases drop packets with iptables instead and
//! need root in a private network namespace: `scripts/fault-tests.sh` runs them.
//!
//! What the cases expect of the relay and client: keepalive 1 s and idle timeout 5 s
//! on both sides (so a 2 s blackout passes unnoticed and a dead link is noticed
//! within 5 s), the relay's control plane also over TLS-over-TCP on the control port's
//! number, and a client `--transport auto|quic|tcp` flag.

mod common;
#[path = "common/faults.rs"]
mod faults;

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use faults::*;

const MIB: usize = 1024 * 1024;
/// Shorter than the idle timeout: the tunnel and its connections must not notice.
const SHORT_BLACKHOLE: Duration = Duration::from_secs(2);
/// Longer than any idle timeout: both sides must give the connection up.
const LONG_BLACKHOLE: Duration = Duration::from_secs(25);
/// How soon after the link returns the tunnel must serve its port again.
const RECOVERY: Duration = Duration::from_secs(5);
/// How soon `--transport auto` must open a tunnel when UDP is blocked.
const FALLBACK: Duration = Duration::from_secs(6);

#[derive(Clone, Copy, Debug)]
enum Transport {
    /// The reference command, no `--transport`, through a UDP-only proxy.
    Quic,
    /// `--transport tcp` through a TCP proxy.
    Tcp,
}

impl Transport {
    fn client_args(self) -> &'static [&'static str] {
        match self {
            Transport::Quic => &[],
            Transport::Tcp => &["--transport", "tcp"],
        }
    }

    fn proxy(self, relay: &Relay) -> FaultProxy {
        match self {
            Transport::Quic => udp_proxy(relay.control_port),
            Transport::Tcp => tcp_proxy(relay.control_port),
        }
    }
}

/// An echo server exposed by a client that reaches its relay through a fault proxy.
struct Tunnel {
    proxy: FaultProxy,
    client: Client,
    port: u16,
    /// Dropped last, so the client never sees its relay go first.
    _relay: Relay,
}

/// Starts relay, proxy (with `faults` applied before the client connects) and client.
fn tunnel_through_proxy(transport: Transport, faults: impl FnOnce(&FaultProxy)) -> Tunnel {
    let relay = start_relay();
    let proxy = transport.proxy(&relay);
    faults(&proxy);
    let relay_addr = proxy.local_addr().to_string();
    let (client, port) = client_via(&relay_addr, echo_server(), transport.client_args(), STARTUP);
    Tunnel {
        proxy,
        client,
        port,
        _relay: relay,
    }
}

impl Tunnel {
    fn output(&self) -> String {
        self.client.process.output.text()
    }

    fn assert_no_reconnect(&self) {
        let output = self.output();
        assert!(
            !output.contains("lost the relay"),
            "the client reconnected:\n{output}"
        );
    }
}

fn with_read_timeout(stream: std::net::TcpStream, timeout: Duration) -> std::net::TcpStream {
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream
}

// The cases, each run over both transports below.

fn delay_keeps_data_intact(transport: Transport) {
    let tunnel = tunnel_through_proxy(transport, |proxy| {
        proxy.set_delay(Duration::from_millis(50))
    });
    let mut stream = connect(tunnel.port);
    let sent = Instant::now();
    assert_eq!(echo_on(&mut stream, b"ping"), b"ping");
    let round_trip = sent.elapsed();
    assert!(
        round_trip >= Duration::from_millis(100),
        "an echo crosses the proxy twice, 50 ms each, yet took {round_trip:?}"
    );
    echo_concurrently(tunnel.port, 4, MIB);
    assert_eq!(echo_on(&mut stream, b"still open"), b"still open");
    tunnel.assert_no_reconnect();
}

fn short_blackhole_is_survived(transport: Transport) {
    let tunnel = tunnel_through_proxy(transport, |_| {});
    let mut stream = with_read_timeout(connect(tunnel.port), RECOVERY);
    assert_eq!(echo_on(&mut stream, b"before"), b"before");

    tunnel.proxy.blackhole(true);
    // Sent into the blackout: must arrive, in order, once the link is back.
    stream.write_all(b"during").unwrap();
    thread::sleep(SHORT_BLACKHOLE);
    tunnel.proxy.blackhole(false);
    let mut echoed = [0; 6];
    stream.read_exact(&mut echoed).unwrap_or_else(|error| {
        panic!(
            "connection lost across a {SHORT_BLACKHOLE:?} blackout: {error}\n{}",
            tunnel.output()
        )
    });
    assert_eq!(&echoed, b"during");
    assert_eq!(echo_on(&mut stream, b"after"), b"after");
    assert!(
        tunnel.proxy.stats().blackholed > 0,
        "nothing hit the blackhole"
    );
    tunnel.assert_no_reconnect();
}

fn long_blackhole_is_recovered_on_the_same_port(transport: Transport) {
    let tunnel = tunnel_through_proxy(transport, |_| {});
    assert!(try_echo(tunnel.port, b"before", Duration::from_secs(5)));

    tunnel.proxy.blackhole(true);
    let started = Instant::now();
    tunnel
        .client
        .process
        .output
        .wait_for("lost the relay", LONG_BLACKHOLE);
    thread::sleep(LONG_BLACKHOLE.saturating_sub(started.elapsed()));
    assert!(
        tunnel.proxy.stats().blackholed > 0,
        "nothing hit the blackhole"
    );
    tunnel.proxy.blackhole(false);

    let took = echoes_again_within(tunnel.port, RECOVERY);
    let line = tunnel.client.process.output.wait_for_nth(
        "✅ TCP tunnel created: ",
        2,
        Duration::from_secs(1),
    );
    assert_eq!(
        parse_tunnel_port(&line),
        tunnel.port,
        "came back on another port"
    );
    echo_concurrently(tunnel.port, 2, MIB);
    eprintln!("{transport:?}: serving again {took:?} after the link returned");
}

// QUIC: the README's command through a UDP proxy.

#[test]
fn quic_50ms_delay_each_way_keeps_megabytes_intact_over_several_connections() {
    delay_keeps_data_intact(Transport::Quic);
}

#[test]
fn quic_5_percent_loss_keeps_megabytes_intact() {
    let tunnel = tunnel_through_proxy(Transport::Quic, |proxy| proxy.set_loss(0.05));
    echo_concurrently(tunnel.port, 2, MIB);
    let stats = tunnel.proxy.stats();
    assert!(stats.lost > 0, "nothing was lost: {stats:?}");
    tunnel.assert_no_reconnect();
}

#[test]
fn quic_reordered_datagrams_keep_megabytes_intact() {
    let tunnel = tunnel_through_proxy(Transport::Quic, |proxy| {
        proxy.set_reorder(Reorder::Hold { every: 4, after: 2 })
    });
    echo_concurrently(tunnel.port, 2, MIB);
    tunnel
        .proxy
        .set_reorder(Reorder::Jitter(Duration::from_millis(5)));
    echo_concurrently(tunnel.port, 2, MIB);
    let stats = tunnel.proxy.stats();
    assert!(stats.reordered > 100, "little was reordered: {stats:?}");
    tunnel.assert_no_reconnect();
}

#[test]
fn quic_2s_blackhole_an_open_connection_survives() {
    short_blackhole_is_survived(Transport::Quic);
}

#[test]
fn quic_25s_blackhole_the_tunnel_serves_its_port_again_within_5s() {
    long_blackhole_is_recovered_on_the_same_port(Transport::Quic);
}

/// A cut UDP flow is a NAT rebinding: the relay sees the client from a new source port
/// and QUIC migrates the connection, open TCP connections and all.
#[test]
fn quic_cut_the_connection_migrates_and_open_connections_carry_on() {
    let tunnel = tunnel_through_proxy(Transport::Quic, |_| {});
    let mut stream = with_read_timeout(connect(tunnel.port), RECOVERY);
    assert_eq!(echo_on(&mut stream, b"before"), b"before");

    tunnel.proxy.cut();
    assert_eq!(echo_on(&mut stream, b"after the cut"), b"after the cut");
    let stats = tunnel.proxy.stats();
    assert_eq!(stats.cut, 1, "{stats:?}");
    assert_eq!(stats.flows, 2, "no new flow after the cut: {stats:?}");
    echo_concurrently(tunnel.port, 2, MIB);
    tunnel.assert_no_reconnect();
}

// TCP: `--transport tcp` through a TCP proxy. Loss and reordering do not apply to a
// TCP proxy (TCP retransmits and delivers in order); the iptables cases cover loss.

#[test]
fn tcp_transport_50ms_delay_each_way_keeps_megabytes_intact_over_several_connections() {
    delay_keeps_data_intact(Transport::Tcp);
}

#[test]
fn tcp_transport_2s_blackhole_an_open_connection_survives() {
    short_blackhole_is_survived(Transport::Tcp);
}

#[test]
fn tcp_transport_25s_blackhole_the_tunnel_serves_its_port_again_within_5s() {
    long_blackhole_is_recovered_on_the_same_port(Transport::Tcp);
}

/// A cut resets the TCP connection the tunnel runs on: the connections it carried end
/// (they must not hang) and the tunnel comes back on its port at once.
#[test]
fn tcp_transport_cut_the_tunnel_serves_its_port_again_within_5s() {
    let tunnel = tunnel_through_proxy(Transport::Tcp, |_| {});
    let mut stream = with_read_timeout(connect(tunnel.port), Duration::from_secs(10));
    assert_eq!(echo_on(&mut stream, b"before"), b"before");

    tunnel.proxy.cut();
    let took = echoes_again_within(tunnel.port, RECOVERY);
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(error) => assert!(
            error.kind() == std::io::ErrorKind::ConnectionReset,
            "the connection carried over the cut tunnel hangs: {error}"
        ),
    }
    assert!(rest.is_empty(), "unexpected bytes after the cut: {rest:?}");
    let stats = tunnel.proxy.stats();
    assert!(stats.cut >= 1, "{stats:?}");
    let line = tunnel.client.process.output.wait_for_nth(
        "✅ TCP tunnel created: ",
        2,
        Duration::from_secs(1),
    );
    assert_eq!(parse_tunnel_port(&line), tunnel.port);
    echo_concurrently(tunnel.port, 2, MIB);
    eprintln!("serving again {took:?} after the cut");
}

// Auto: UDP and TCP proxies on one port number, UDP blackholed.

fn udp_blackholed_opens_over_tcp_within_6s(extra: &[&str]) {
    let relay = start_relay();
    let (udp, tcp) = dual_proxy(relay.control_port);
    udp.blackhole(true);
    let started = Instant::now();
    let relay_addr = udp.local_addr().to_string();
    let (_client, port) = client_via(&relay_addr, echo_server(), extra, FALLBACK);
    eprintln!("tunnel open over TCP after {:?}", started.elapsed());
    echo_concurrently(port, 2, MIB);
    assert!(tcp.stats().flows > 0, "nothing went over TCP");
}

#[test]
fn auto_transport_with_udp_blackholed_opens_the_tunnel_over_tcp_within_6s() {
    udp_blackholed_opens_over_tcp_within_6s(&["--transport", "auto"]);
}

#[test]
fn the_reference_command_with_udp_blackholed_opens_the_tunnel_over_tcp_within_6s() {
    udp_blackholed_opens_over_tcp_within_6s(&[]);
}

// iptables in a private network namespace (root): scripts/fault-tests.sh.

fn udp_dropped_by_iptables_opens_over_tcp_within_6s(extra: &[&str]) {
    let mut firewall = Firewall::in_private_netns();
    let relay = start_relay();
    let port = relay.control_port.to_string();
    firewall.add(&["-p", "udp", "--dport", &port, "-j", "DROP"]);
    let started = Instant::now();
    let (_client, port) = client_via(&relay.addr(), echo_server(), extra, FALLBACK);
    eprintln!("tunnel open over TCP after {:?}", started.elapsed());
    echo_concurrently(port, 2, MIB);
    assert!(firewall.dropped_packets() > 0, "no UDP was tried");
}

#[test]
#[ignore = "needs root in a private network namespace (iptables): scripts/fault-tests.sh"]
fn iptables_udp_blocked_the_reference_command_opens_the_tunnel_over_tcp_within_6s() {
    udp_dropped_by_iptables_opens_over_tcp_within_6s(&[]);
}

#[test]
#[ignore = "needs root in a private network namespace (iptables): scripts/fault-tests.sh"]
fn iptables_udp_blocked_auto_transport_opens_the_tunnel_over_tcp_within_6s() {
    udp_dropped_by_iptables_opens_over_tcp_within_6s(&["--transport", "auto"]);
}

fn iptables_loss_keeps_data_intact(protocol: &str, transport: Transport) {
    let mut firewall = Firewall::in_private_netns();
    let relay = start_relay();
    let (client, port) = client_via(
        &relay.addr(),
        echo_server(),
        transport.client_args(),
        STARTUP,
    );
    firewall.random_loss(protocol, relay.control_port, 0.05);
    echo_concurrently(port, 2, MIB);
    assert!(firewall.dropped_packets() > 0, "nothing was dropped");
    firewall.clear();
    echoes_again_within(port, RECOVERY);
    echo_concurrently(port, 2, MIB);
    let output = client.process.output.text();
    assert!(
        !output.contains("lost the relay"),
        "the client reconnected:\n{output}"
    );
}

#[test]
#[ignore = "needs root in a private network namespace (iptables): scripts/fault-tests.sh"]
fn iptables_5_percent_udp_loss_keeps_megabytes_intact_over_quic() {
    iptables_loss_keeps_data_intact("udp", Transport::Quic);
}

#[test]
#[ignore = "needs root in a private network namespace (iptables): scripts/fault-tests.sh"]
fn iptables_5_percent_tcp_loss_keeps_megabytes_intact_over_the_tcp_transport() {
    iptables_loss_keeps_data_intact("tcp", Transport::Tcp);
}

fn iptables_blackhole_is_recovered_on_the_same_port(transport: Transport) {
    let mut firewall = Firewall::in_private_netns();
    let relay = start_relay();
    let (client, port) = client_via(
        &relay.addr(),
        echo_server(),
        transport.client_args(),
        STARTUP,
    );
    assert!(try_echo(port, b"before", Duration::from_secs(5)));

    firewall.blackhole("udp", relay.control_port);
    firewall.blackhole("tcp", relay.control_port);
    let started = Instant::now();
    client
        .process
        .output
        .wait_for("lost the relay", LONG_BLACKHOLE);
    thread::sleep(LONG_BLACKHOLE.saturating_sub(started.elapsed()));
    assert!(firewall.dropped_packets() > 0, "nothing was dropped");
    firewall.clear();

    let took = echoes_again_within(port, RECOVERY);
    let line =
        client
            .process
            .output
            .wait_for_nth("✅ TCP tunnel created: ", 2, Duration::from_secs(1));
    assert_eq!(parse_tunnel_port(&line), port, "came back on another port");
    echo_concurrently(port, 2, MIB);
    eprintln!("{transport:?}: serving again {took:?} after the rules went");
}

#[test]
#[ignore = "needs root in a private network namespace (iptables): scripts/fault-tests.sh"]
fn iptables_25s_blackhole_of_udp_and_tcp_quic_tunnel_serves_its_port_again_within_5s() {
    iptables_blackhole_is_recovered_on_the_same_port(Transport::Quic);
}

#[test]
#[ignore = "needs root in a private network namespace (iptables): scripts/fault-tests.sh"]
fn iptables_25s_blackhole_of_udp_and_tcp_tcp_transport_serves_its_port_again_within_5s() {
    iptables_blackhole_is_recovered_on_the_same_port(Transport::Tcp);
}
