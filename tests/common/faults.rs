//! Fault-test helpers: fault proxies between a client and its relay, probes with
//! deadlines, and iptables rules that can only ever touch a private network namespace.
//! Included with `#[path]` next to `mod common;`, whose harness it uses.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

pub use localup_fault_proxy::{FaultProxy, Reorder};

use crate::common::*;

/// The runtime every proxy of a test binary runs on; tests themselves stay synchronous.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("cannot start the proxies' runtime")
    })
}

fn loopback(port: u16) -> SocketAddr {
    (Ipv4Addr::LOCALHOST, port).into()
}

/// A UDP fault proxy on a free loopback port, forwarding to `upstream_port`.
pub fn udp_proxy(upstream_port: u16) -> FaultProxy {
    runtime()
        .block_on(FaultProxy::udp(loopback(0), loopback(upstream_port)))
        .expect("cannot start the UDP proxy")
}

/// A TCP fault proxy on a free loopback port, forwarding to `upstream_port`.
pub fn tcp_proxy(upstream_port: u16) -> FaultProxy {
    runtime()
        .block_on(FaultProxy::tcp(loopback(0), loopback(upstream_port)))
        .expect("cannot start the TCP proxy")
}

/// A UDP and a TCP proxy on one port number, as a relay serves both (`--transport auto`).
pub fn dual_proxy(upstream_port: u16) -> (FaultProxy, FaultProxy) {
    loop {
        let udp = udp_proxy(upstream_port);
        let tcp = runtime().block_on(FaultProxy::tcp(udp.local_addr(), loopback(upstream_port)));
        // Another process may hold that TCP port: take another UDP port then.
        if let Ok(tcp) = tcp {
            return (udp, tcp);
        }
    }
}

/// A relay whose control port is free for both UDP and TCP (the relay serves its
/// control plane over QUIC and over TLS-over-TCP on the same port number).
pub fn start_relay() -> Relay {
    let control_port = loop {
        let port = free_udp_port();
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            break port;
        }
    };
    Relay::start_with(RelayOptions {
        control_port: Some(control_port),
        ..RelayOptions::range(free_port_range(5))
    })
}

/// Starts a client whose `--relay` is `relay` (e.g. a proxy) and waits for its tunnel.
pub fn client_via(relay: &str, local_port: u16, extra: &[&str], within: Duration) -> (Client, u16) {
    let home = scratch_dir("client");
    let mut process = Client::spawn(relay, local_port, &token("faults"), extra, &home);
    let port = wait_for_tunnel(&mut process, within);
    (Client { process, home }, port)
}

/// Waits for the client's success line and returns its port; fails at once if the
/// client exits instead (a refused flag, an error).
pub fn wait_for_tunnel(process: &mut Process, within: Duration) -> u16 {
    const CREATED: &str = "✅ TCP tunnel created: ";
    let deadline = Instant::now() + within;
    loop {
        let output = process.output.text();
        if let Some(line) = output.lines().find(|line| line.contains(CREATED)) {
            return parse_tunnel_port(line);
        }
        assert!(
            process.is_running(),
            "the client exited instead of opening its tunnel:\n{}",
            process.output.text()
        );
        assert!(
            Instant::now() < deadline,
            "no tunnel within {within:?}; client output:\n{output}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// One echo of `data` through `port` with every step bounded by `limit`; false on any
/// failure, so it can be polled while a tunnel is coming back.
pub fn try_echo(port: u16, data: &[u8], limit: Duration) -> bool {
    let attempt = || -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&loopback(port), limit)?;
        stream.set_read_timeout(Some(limit))?;
        stream.set_write_timeout(Some(limit))?;
        stream.write_all(data)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed)?;
        Ok(echoed)
    };
    attempt().is_ok_and(|echoed| echoed == data)
}

/// Polls until `port` echoes again; fails unless that happens within `limit` of now.
/// Returns how long it took.
pub fn echoes_again_within(port: u16, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let left = limit.saturating_sub(started.elapsed());
        assert!(
            !left.is_zero(),
            "port {port} did not echo again within {limit:?}"
        );
        let probe_limit = left.min(Duration::from_secs(1));
        if try_echo(port, b"are you back?", probe_limit) && started.elapsed() <= limit {
            return started.elapsed();
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Echoes `count` payloads of `len` random bytes through `port` at once and checks
/// each one comes back byte for byte.
pub fn echo_concurrently(port: u16, count: usize, len: usize) {
    let senders: Vec<_> = (0..count)
        .map(|_| {
            thread::spawn(move || {
                let data = random_bytes(len);
                let echoed = echo_round_trip(port, &data);
                assert_eq!(echoed.len(), data.len(), "echo length");
                assert!(echoed == data, "echo differs from what was sent");
            })
        })
        .collect();
    for sender in senders {
        sender.join().expect("an echo failed");
    }
}

/// Sends `data` on an open connection and reads its echo back.
pub fn echo_on(stream: &mut TcpStream, data: &[u8]) -> Vec<u8> {
    stream.write_all(data).unwrap();
    let mut echoed = vec![0; data.len()];
    stream.read_exact(&mut echoed).unwrap();
    echoed
}

/// iptables rules in this process's network namespace, deleted when dropped. Creating
/// one fails unless the process is root in a private network namespace, so no test can
/// change the host's firewall.
pub struct Firewall {
    iptables: PathBuf,
    /// A comment on every rule, to find their counters and nobody else's.
    tag: String,
    rules: Vec<Vec<String>>,
}

impl Firewall {
    pub fn in_private_netns() -> Self {
        assert_root();
        assert_private_netns();
        let iptables = ["iptables", "iptables-nft", "iptables-legacy"]
            .iter()
            .flat_map(|name| ["/usr/sbin", "/sbin"].map(|dir| PathBuf::from(dir).join(name)))
            .find(|path| path.exists())
            .expect("iptables is not installed: apt-get install iptables");
        Self {
            iptables,
            tag: format!(
                "localup-faults-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ),
            rules: Vec::new(),
        }
    }

    /// Appends `-A INPUT <rule>` (tagged). On loopback every packet passes INPUT once.
    pub fn add(&mut self, rule: &[&str]) {
        let mut rule: Vec<String> = rule.iter().map(|part| part.to_string()).collect();
        rule.extend(["-m", "comment", "--comment", &self.tag].map(String::from));
        self.iptables(&["-A", "INPUT"], &rule);
        self.rules.push(rule);
    }

    /// Drops UDP (`"udp"`) or TCP (`"tcp"`) packets to and from `port`.
    pub fn blackhole(&mut self, protocol: &str, port: u16) {
        let port = port.to_string();
        self.add(&["-p", protocol, "--dport", &port, "-j", "DROP"]);
        self.add(&["-p", protocol, "--sport", &port, "-j", "DROP"]);
    }

    /// Drops each packet to and from `port` with `probability`.
    pub fn random_loss(&mut self, protocol: &str, port: u16, probability: f64) {
        let (port, probability) = (port.to_string(), probability.to_string());
        for direction in ["--dport", "--sport"] {
            self.add(&[
                "-p",
                protocol,
                direction,
                &port,
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &probability,
                "-j",
                "DROP",
            ]);
        }
    }

    /// Packets dropped so far by this firewall's rules.
    pub fn dropped_packets(&self) -> u64 {
        let listing = self.iptables_output(&["-L", "INPUT", "-v", "-x", "-n"]);
        listing
            .lines()
            .filter(|line| line.contains(&self.tag))
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Deletes every rule added so far.
    pub fn clear(&mut self) {
        for rule in std::mem::take(&mut self.rules).iter().rev() {
            self.iptables(&["-D", "INPUT"], rule);
        }
    }

    fn iptables(&self, command: &[&str], rule: &[String]) {
        let output = Command::new(&self.iptables)
            .args(command)
            .args(rule)
            .output()
            .expect("cannot run iptables");
        assert!(
            output.status.success(),
            "{} {} {}: {}",
            self.iptables.display(),
            command.join(" "),
            rule.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn iptables_output(&self, args: &[&str]) -> String {
        let output = Command::new(&self.iptables).args(args).output().unwrap();
        assert!(output.status.success(), "iptables {args:?} failed");
        String::from_utf8(output.stdout).unwrap()
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        for rule in std::mem::take(&mut self.rules).iter().rev() {
            let _ = Command::new(&self.iptables)
                .args(["-D", "INPUT"])
                .args(rule)
                .output();
        }
    }
}

const RUN_SCRIPT: &str = "run these tests with scripts/fault-tests.sh";

fn assert_root() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap();
    assert_eq!(euid, "0", "iptables needs root: {RUN_SCRIPT} as root");
}

/// Fails unless this process's network namespace is not the host's.
fn assert_private_netns() {
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    match std::fs::read_link("/proc/1/ns/net") {
        Ok(host) => assert_ne!(
            ours, host,
            "refusing to change iptables in the host's network namespace: {RUN_SCRIPT}"
        ),
        Err(error) => {
            // PID 1's namespace can be hidden even from root (a VM's init, a container
            // runtime). Then trust only a namespace that differs from the one
            // scripts/fault-tests.sh started in and that has no interface but lo.
            let outer = std::env::var("LOCALUP_FAULTS_OUTER_NETNS").unwrap_or_else(|_| {
                panic!(
                    "cannot read /proc/1/ns/net ({error}) to prove this network namespace \
                     is private: {RUN_SCRIPT}"
                )
            });
            assert_ne!(
                ours.to_string_lossy(),
                outer,
                "refusing to change iptables in the namespace the script started in"
            );
            let devices = std::fs::read_to_string("/proc/self/net/dev").unwrap();
            let interfaces: Vec<&str> = devices
                .lines()
                .skip(2)
                .filter_map(|line| Some(line.split(':').next()?.trim()))
                .collect();
            assert_eq!(
                interfaces,
                ["lo"],
                "refusing to change iptables in a namespace with other interfaces"
            );
        }
    }
}
