//! The proxy itself, against small UDP and TCP peers on loopback: each fault is
//! measured or counted where it happens.

use std::future::Future;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use localup_fault_proxy::{FaultProxy, Reorder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const LOCALHOST: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
const MS: Duration = Duration::from_millis(1);

/// Polls `condition` every 10 ms until it holds, failing with `what` after 5 s.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(10 * MS).await;
    }
}

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    timeout(Duration::from_secs(5), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A UDP peer that echoes every datagram and reports (payload, source) of each.
async fn udp_echo() -> (SocketAddr, mpsc::UnboundedReceiver<(Vec<u8>, SocketAddr)>) {
    udp_peer(true).await
}

/// A UDP peer that reports (payload, source) of each datagram and echoes it if asked.
async fn udp_peer(echo: bool) -> (SocketAddr, mpsc::UnboundedReceiver<(Vec<u8>, SocketAddr)>) {
    let socket = UdpSocket::bind(LOCALHOST).await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (report, reports) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buffer = vec![0; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buffer).await {
            if echo {
                let _ = socket.send_to(&buffer[..len], from).await;
            }
            let _ = report.send((buffer[..len].to_vec(), from));
        }
    });
    (addr, reports)
}

async fn udp_client(proxy: &FaultProxy) -> UdpSocket {
    let socket = UdpSocket::bind(LOCALHOST).await.unwrap();
    socket.connect(proxy.local_addr()).await.unwrap();
    socket
}

async fn recv(socket: &UdpSocket) -> Vec<u8> {
    let mut buffer = vec![0; 65_536];
    let len = within("a datagram", socket.recv(&mut buffer))
        .await
        .unwrap();
    buffer.truncate(len);
    buffer
}

#[tokio::test]
async fn udp_delay_is_added_to_each_direction() {
    let (upstream, mut arrivals) = udp_echo().await;
    let proxy = FaultProxy::udp(LOCALHOST, upstream).await.unwrap();
    proxy.set_delay(50 * MS);
    let client = udp_client(&proxy).await;

    let sent = Instant::now();
    client.send(b"ping").await.unwrap();
    within("arrival upstream", arrivals.recv()).await.unwrap();
    let one_way = sent.elapsed();
    assert_eq!(recv(&client).await, b"ping");
    let round_trip = sent.elapsed();

    assert!(one_way >= 50 * MS, "one way took {one_way:?}");
    assert!(round_trip >= 100 * MS, "round trip took {round_trip:?}");
    assert!(round_trip < 1000 * MS, "round trip took {round_trip:?}");
    assert_eq!(proxy.stats().forwarded, 2);
}

#[tokio::test]
async fn udp_loss_drops_datagrams_at_about_the_probability() {
    let (upstream, mut arrivals) = udp_peer(false).await;
    let proxy = FaultProxy::udp(LOCALHOST, upstream).await.unwrap();
    proxy.set_loss(0.2);
    let client = udp_client(&proxy).await;
    for i in 0..2000u32 {
        client.send(&i.to_be_bytes()).await.unwrap();
        if i % 100 == 0 {
            // Let the proxy keep up, so that only its loss drops datagrams.
            tokio::time::sleep(MS).await;
        }
    }
    eventually("every datagram forwarded or lost", || {
        let stats = proxy.stats();
        stats.forwarded + stats.lost == 2000
    })
    .await;
    let stats = proxy.stats();
    // Binomial(2000, 0.2): mean 400, standard deviation about 18.
    assert!((320..=480).contains(&stats.lost), "{stats:?}");
    let mut arrived = 0;
    while arrived < stats.forwarded {
        within("the forwarded datagrams", arrivals.recv())
            .await
            .unwrap();
        arrived += 1;
    }
}

#[tokio::test]
async fn udp_blackhole_drops_everything_until_it_ends() {
    let (upstream, mut arrivals) = udp_echo().await;
    let proxy = FaultProxy::udp(LOCALHOST, upstream).await.unwrap();
    let client = udp_client(&proxy).await;
    client.send(b"before").await.unwrap();
    assert_eq!(recv(&client).await, b"before");

    proxy.blackhole(true);
    for _ in 0..10 {
        client.send(b"into the void").await.unwrap();
    }
    eventually("10 datagrams blackholed", || proxy.stats().blackholed == 10).await;
    proxy.blackhole(false);
    client.send(b"after").await.unwrap();
    assert_eq!(recv(&client).await, b"after");

    let upstream_saw: Vec<Vec<u8>> = std::iter::from_fn(|| arrivals.try_recv().ok())
        .map(|(payload, _)| payload)
        .collect();
    assert_eq!(upstream_saw, [b"before".to_vec(), b"after".to_vec()]);
    assert_eq!(proxy.stats().forwarded, 4);
}

#[tokio::test]
async fn udp_hold_sends_every_nth_datagram_after_the_next_ones() {
    let (upstream, mut arrivals) = udp_peer(false).await;
    let proxy = FaultProxy::udp(LOCALHOST, upstream).await.unwrap();
    proxy.set_reorder(Reorder::Hold { every: 3, after: 2 });
    let client = udp_client(&proxy).await;
    for i in 0..10u8 {
        client.send(&[i]).await.unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..10 {
        let (payload, _) = within("10 arrivals", arrivals.recv()).await.unwrap();
        order.push(payload[0]);
    }
    // 2, 5 and 8 are held; 8 has only one datagram after it and goes at the hold limit.
    assert_eq!(order, [0, 1, 3, 4, 2, 6, 7, 5, 9, 8]);
    assert_eq!(proxy.stats().reordered, 3);
}

#[tokio::test]
async fn udp_jitter_reorders_a_stream_of_datagrams() {
    let (upstream, mut arrivals) = udp_echo().await;
    let proxy = FaultProxy::udp(LOCALHOST, upstream).await.unwrap();
    proxy.set_reorder(Reorder::Jitter(20 * MS));
    let client = udp_client(&proxy).await;
    for i in 0..200u8 {
        client.send(&[i]).await.unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..200 {
        let (payload, _) = within("200 arrivals", arrivals.recv()).await.unwrap();
        order.push(payload[0]);
    }
    assert!(!order.is_sorted(), "not reordered: {order:?}");
    order.sort();
    assert_eq!(order, (0..200).collect::<Vec<u8>>(), "none lost");
    assert!(proxy.stats().reordered > 0);
}

#[tokio::test]
async fn udp_keeps_a_flow_per_client_and_a_cut_moves_it_to_a_new_port() {
    let (upstream, mut arrivals) = udp_echo().await;
    let proxy = FaultProxy::udp(LOCALHOST, upstream).await.unwrap();
    let (first, second) = (udp_client(&proxy).await, udp_client(&proxy).await);
    let mut source_of = async |client: &UdpSocket, payload: &[u8]| {
        client.send(payload).await.unwrap();
        assert_eq!(recv(client).await, payload, "the reply reached its client");
        within("arrival", arrivals.recv()).await.unwrap().1
    };
    let first_port = source_of(&first, b"one").await;
    let second_port = source_of(&second, b"two").await;
    assert_ne!(first_port, second_port);
    assert_eq!(source_of(&first, b"one again").await, first_port);

    proxy.cut();
    eventually("both flows cut", || proxy.stats().cut == 2).await;
    let after_cut = source_of(&first, b"after the cut").await;
    assert_ne!(after_cut, first_port);
    assert_ne!(after_cut, second_port);
    assert_eq!(proxy.stats().flows, 3);
}

async fn tcp_echo() -> SocketAddr {
    let listener = TcpListener::bind(LOCALHOST).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    addr
}

async fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buffer = vec![0; len];
    within("echo", stream.read_exact(&mut buffer))
        .await
        .unwrap();
    buffer
}

#[tokio::test]
async fn tcp_delay_is_added_to_each_direction() {
    let proxy = FaultProxy::tcp(LOCALHOST, tcp_echo().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream.write_all(b"warm").await.unwrap();
    read_exactly(&mut stream, 4).await;

    proxy.set_delay(50 * MS);
    let sent = Instant::now();
    stream.write_all(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut stream, 4).await, b"ping");
    let round_trip = sent.elapsed();
    assert!(round_trip >= 100 * MS, "round trip took {round_trip:?}");
    assert!(round_trip < 1000 * MS, "round trip took {round_trip:?}");
}

#[tokio::test]
async fn tcp_carries_a_megabyte_intact_and_passes_half_closes_on() {
    let proxy = FaultProxy::tcp(LOCALHOST, tcp_echo().await).await.unwrap();
    proxy.set_delay(5 * MS);
    let stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let data: Vec<u8> = (0..1024 * 1024).map(|_| rand::random::<u8>()).collect();
    let (mut read, mut write) = stream.into_split();
    let sent = data.clone();
    let sender = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut received = Vec::new();
    within("the echo and its end", read.read_to_end(&mut received))
        .await
        .unwrap();
    sender.await.unwrap();
    assert!(received == data, "echo differs");
    assert_eq!(proxy.stats().forwarded, 2 * 1024 * 1024);
}

#[tokio::test]
async fn tcp_blackhole_holds_bytes_and_keeps_the_connection_open() {
    let proxy = FaultProxy::tcp(LOCALHOST, tcp_echo().await).await.unwrap();
    let mut stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    stream.write_all(b"before").await.unwrap();
    read_exactly(&mut stream, 6).await;

    proxy.blackhole(true);
    stream.write_all(b"during").await.unwrap();
    let mut buffer = [0; 6];
    let nothing = timeout(300 * MS, stream.read_exact(&mut buffer)).await;
    assert!(nothing.is_err(), "bytes passed a blackhole");
    assert!(proxy.stats().blackholed > 0);

    proxy.blackhole(false);
    assert_eq!(read_exactly(&mut stream, 6).await, b"during");
}

#[tokio::test]
async fn tcp_connections_opened_during_a_blackhole_reach_upstream_after_it() {
    let listener = TcpListener::bind(LOCALHOST).await.unwrap();
    let proxy = FaultProxy::tcp(LOCALHOST, listener.local_addr().unwrap())
        .await
        .unwrap();
    proxy.blackhole(true);
    let _stream = TcpStream::connect(proxy.local_addr()).await.unwrap();
    assert!(timeout(300 * MS, listener.accept()).await.is_err());
    proxy.blackhole(false);
    within("the connection upstream", listener.accept())
        .await
        .unwrap();
}

#[tokio::test]
async fn tcp_cut_resets_both_sides_and_new_connections_work() {
    let listener = TcpListener::bind(LOCALHOST).await.unwrap();
    let proxy = FaultProxy::tcp(LOCALHOST, listener.local_addr().unwrap())
        .await
        .unwrap();
    let mut client = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (mut server, _) = within("accept", listener.accept()).await.unwrap();
    client.write_all(b"hello").await.unwrap();
    assert_eq!(read_exactly(&mut server, 5).await, b"hello");

    proxy.cut();
    let mut buffer = [0; 1];
    let client_saw = within("client reset", client.read(&mut buffer)).await;
    let server_saw = within("server reset", server.read(&mut buffer)).await;
    assert_eq!(client_saw.unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert_eq!(server_saw.unwrap_err().kind(), ErrorKind::ConnectionReset);
    assert_eq!(proxy.stats().cut, 1);

    let mut again = TcpStream::connect(proxy.local_addr()).await.unwrap();
    let (mut server, _) = within("accept", listener.accept()).await.unwrap();
    again.write_all(b"again").await.unwrap();
    assert_eq!(read_exactly(&mut server, 5).await, b"again");
}
