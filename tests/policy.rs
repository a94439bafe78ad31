//! Per-tunnel policy from the token: the PROXY protocol header towards the local
//! service, source ranges, a connection limit and bandwidth limits.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::inprocess::*;
use common::{Process, free_tcp_port, scratch_dir, tool};
use localup_protocol::proxy_header::ProxyProtocol;
use localup_protocol::token::{Claims, TunnelPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn policy(policy: TunnelPolicy) -> String {
    mint(Claims::new("guarded").with_policy(policy))
}

/// Connects to `port` on `ip` and returns whether the tunnel served the connection
/// (the echo came back) rather than refused it.
async fn served(ip: IpAddr, port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((ip, port)).await else {
        return false;
    };
    if stream.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut reply = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut reply)).await,
        Ok(Ok(_)) if &reply == b"ping"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn source_ranges_admit_and_refuse_ipv4_and_ipv6_peers() {
    for (relay_ip, ip, inside, outside) in [
        ("127.0.0.1", "127.0.0.1", "127.0.0.0/8", "10.0.0.0/8"),
        ("[::1]", "::1", "::1/128", "2001:db8::/32"),
    ] {
        let relay = LiveRelay::start(5, &[]).await;
        let relay = if relay_ip == "127.0.0.1" {
            relay
        } else {
            let (range, home) = (relay.range, relay.home.clone());
            drop(relay);
            LiveRelay::start_on(range, home, "[::1]:0", &[]).await
        };
        let ip: IpAddr = ip.parse().unwrap();
        let (local, accepted) = counting_echo().await;
        for (range, admitted) in [(inside, true), (outside, false)] {
            let token = policy(TunnelPolicy {
                allow_from: Some(vec![range.parse().unwrap()]),
                ..Default::default()
            });
            let before = accepted.load(Ordering::Relaxed);
            let client = LiveClient::start(client_config(&relay, local, &token)).await;
            assert_eq!(
                served(ip, client.port).await,
                admitted,
                "{ip} against {range}"
            );
            let reached = accepted.load(Ordering::Relaxed) - before;
            assert_eq!(
                reached,
                u64::from(admitted),
                "{ip} against {range}: reached the service"
            );
            if !admitted {
                let refused = format!(
                    "localup_tunnel_connections_refused_total{{port=\"{}\",subject=\"guarded\",reason=\"source_not_allowed\"}}",
                    client.port
                );
                assert_eq!(relay.metric(&refused).await, 1.0);
            }
            client.stop().await.unwrap();
        }
    }
}

/// An echo server that counts the connections it accepted.
async fn counting_echo() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    (port, accepted)
}

#[tokio::test(flavor = "multi_thread")]
async fn past_its_connection_limit_a_tunnel_refuses_new_connections() {
    let relay = LiveRelay::start(5, &[]).await;
    let token = policy(TunnelPolicy {
        max_connections: Some(3),
        ..Default::default()
    });
    let client = LiveClient::start(client_config(&relay, echo_server().await, &token)).await;
    let localhost: IpAddr = "127.0.0.1".parse().unwrap();
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect((localhost, client.port)).await.unwrap();
        stream.write_all(b"held").await.unwrap();
        let mut reply = [0u8; 4];
        stream.read_exact(&mut reply).await.unwrap();
        open.push(stream);
    }
    assert!(
        !served(localhost, client.port).await,
        "a fourth connection was carried"
    );
    let refused = format!(
        "localup_tunnel_connections_refused_total{{port=\"{}\",subject=\"guarded\",reason=\"tunnel_limit\"}}",
        client.port
    );
    assert_eq!(relay.metric(&refused).await, 1.0);
    drop(open);
    eventually(
        "the held connections to end",
        Duration::from_secs(5),
        || async { relay.metric("localup_connections_active").await == 0.0 },
    )
    .await;
    assert!(served(localhost, client.port).await);
}

/// Sends into `tunnel` as fast as it lets us for `seconds`; returns the bytes per
/// second `sink` (the local service) received.
async fn measured_rate(tunnel: SocketAddr, sink: TcpListener, seconds: u64) -> f64 {
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    tokio::spawn(async move {
        let (mut stream, _) = sink.accept().await.unwrap();
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                break;
            }
            counter.fetch_add(read as u64, Ordering::Relaxed);
        }
    });
    let mut stream = TcpStream::connect(tunnel).await.unwrap();
    let chunk = vec![1u8; 64 * 1024];
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let sending = async {
        loop {
            stream.write_all(&chunk).await.unwrap();
        }
    };
    let _ = tokio::time::timeout_at(deadline.into(), sending).await;
    received.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread")]
async fn bandwidth_limits_hold_each_direction_within_10_percent() {
    const LIMIT: u64 = 1_000_000;
    let relay = LiveRelay::start(5, &[]).await;

    // Inbound: external client → local service.
    let sink = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let token = policy(TunnelPolicy {
        bandwidth_in: Some(LIMIT),
        ..Default::default()
    });
    let client = LiveClient::start(client_config(&relay, sink_port, &token)).await;
    let tunnel: SocketAddr = ([127, 0, 0, 1], client.port).into();
    let inbound = measured_rate(tunnel, sink, 5).await;
    println!("inbound limited to {LIMIT} B/s: {inbound:.0} B/s over 5 s");
    assert!(
        (0.9..=1.1).contains(&(inbound / LIMIT as f64)),
        "inbound {inbound:.0} B/s against a limit of {LIMIT}"
    );
    client.stop().await.unwrap();

    // Outbound: the local service sends, the external client receives.
    let service = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let service_port = service.local_addr().unwrap().port();
    let token = policy(TunnelPolicy {
        bandwidth_out: Some(LIMIT),
        ..Default::default()
    });
    let client = LiveClient::start(client_config(&relay, service_port, &token)).await;
    // The external side dials the tunnel and reads; the service writes as fast as it can.
    tokio::spawn(async move {
        let (mut stream, _) = service.accept().await.unwrap();
        let chunk = vec![2u8; 64 * 1024];
        while stream.write_all(&chunk).await.is_ok() {}
    });
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let mut stream = TcpStream::connect(("127.0.0.1", client.port))
        .await
        .unwrap();
    let started = Instant::now();
    let reading = async {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                break;
            }
            counter.fetch_add(read as u64, Ordering::Relaxed);
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), reading).await;
    let outbound = received.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    println!("outbound limited to {LIMIT} B/s: {outbound:.0} B/s over 5 s");
    assert!(
        (0.9..=1.1).contains(&(outbound / LIMIT as f64)),
        "outbound {outbound:.0} B/s against a limit of {LIMIT}"
    );
}

/// nginx on loopback, answering every request with the address the PROXY protocol
/// header gave it.
struct Nginx {
    _process: Process,
    port: u16,
}

impl Nginx {
    fn start() -> Self {
        let nginx = tool("nginx", &["/usr/sbin/nginx"]);
        let dir = scratch_dir("nginx");
        let port = free_tcp_port();
        let config = format!(
            "error_log stderr info;\n\
             pid {dir}/nginx.pid;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
               access_log {dir}/access.log;\n\
               client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir};\n\
               uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
               server {{\n\
                 listen 127.0.0.1:{port} proxy_protocol;\n\
                 location / {{ return 200 \"$proxy_protocol_addr $proxy_protocol_port\\n\"; }}\n\
               }}\n\
             }}\n",
            dir = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), config).unwrap();
        let mut command = Command::new(nginx);
        command
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .args(["-g", "daemon off; master_process off;"]);
        let process = Process::spawn(command);
        common::eventually("nginx to listen", Duration::from_secs(10), || {
            common::port_accepts(port)
        });
        Self {
            _process: process,
            port,
        }
    }
}

/// What nginx says the external peer was, for a request through `port` from `ip`.
async fn seen_by_nginx(ip: IpAddr, port: u16) -> (String, u16) {
    let mut stream = TcpStream::connect((ip, port)).await.unwrap();
    let local = stream.local_addr().unwrap();
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
    let (addr, peer_port) = body.split_once(' ').unwrap_or_else(|| panic!("{response}"));
    assert_eq!(
        peer_port.parse::<u16>().unwrap(),
        local.port(),
        "{response}"
    );
    (addr.to_owned(), local.port())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx from scripts/install-deps.sh; scripts/test.sh runs it"]
async fn nginx_sees_the_external_peer_through_proxy_protocol_v1_and_v2_over_ipv4_and_ipv6() {
    let nginx = Nginx::start();
    for (control, ip) in [("127.0.0.1:0", "127.0.0.1"), ("[::1]:0", "::1")] {
        let relay = LiveRelay::start_on(
            common::free_port_range(5),
            scratch_dir("relay"),
            control,
            &[],
        )
        .await;
        let ip: IpAddr = ip.parse().unwrap();
        // v1 asked for by the token, v2 by the client's flag.
        let by_token = policy(TunnelPolicy {
            proxy_protocol: Some(ProxyProtocol::V1),
            ..Default::default()
        });
        let client = LiveClient::start(client_config(&relay, nginx.port, &by_token)).await;
        let (seen, _) = seen_by_nginx(ip, client.port).await;
        assert_eq!(seen.parse::<IpAddr>().unwrap(), ip, "v1 over {ip}");
        client.stop().await.unwrap();

        let mut by_flag = client_config(&relay, nginx.port, &mint(Claims::new("flagged")));
        by_flag.proxy_protocol = Some(ProxyProtocol::V2);
        let client = LiveClient::start(by_flag).await;
        let (seen, _) = seen_by_nginx(ip, client.port).await;
        assert_eq!(seen.parse::<IpAddr>().unwrap(), ip, "v2 over {ip}");
    }
}
