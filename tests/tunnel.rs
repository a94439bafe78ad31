//! What a tunnel carries, with the relay and the client running in this process:
//! data both ways on many connections, half-close, a local service that is down, and
//! servers that speak first.

mod common;

use std::time::Duration;

use common::inprocess::*;
use common::random_bytes;
use localup_protocol::token::Claims;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn tunnel_to(local_port: u16) -> (LiveRelay, LiveClient) {
    let relay = LiveRelay::start(10, &[]).await;
    let client = LiveClient::start(client_config(
        &relay,
        local_port,
        &mint(Claims::new("mydb")),
    ))
    .await;
    (relay, client)
}

#[tokio::test(flavor = "multi_thread")]
async fn megabytes_of_random_bytes_survive_both_ways_on_many_connections() {
    let (relay, client) = tunnel_to(echo_server().await).await;
    let port = client.port;
    // Made before the transfers start: generating them inside the runtime would starve
    // the in-process relay and client of their threads.
    let payloads: Vec<Vec<u8>> = (0..8).map(|_| random_bytes(4 * 1024 * 1024)).collect();
    let transfers: Vec<_> = payloads
        .into_iter()
        .map(|data| tokio::spawn(async move { echo(port, &data).await.unwrap() == data }))
        .collect();
    for transfer in transfers {
        assert!(transfer.await.unwrap(), "corrupted echo");
    }
    let moved = 8.0 * 4.0 * 1024.0 * 1024.0;
    assert_eq!(
        relay
            .metric("localup_bytes_total{direction=\"inbound\"}")
            .await,
        moved
    );
    assert_eq!(
        relay
            .metric("localup_bytes_total{direction=\"outbound\"}")
            .await,
        moved
    );
}

/// FIN travels each way on its own: a client that stops sending still gets the reply.
#[tokio::test(flavor = "multi_thread")]
async fn half_close_is_propagated_both_ways() {
    let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local_port = server.local_addr().unwrap().port();
    let served = tokio::spawn(async move {
        let (mut stream, _) = server.accept().await.unwrap();
        let mut request = Vec::new();
        stream.read_to_end(&mut request).await.unwrap(); // returns only on the client's FIN
        stream
            .write_all(format!("got {} bytes", request.len()).as_bytes())
            .await
            .unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).await.unwrap();
    });
    let (_relay, client) = tunnel_to(local_port).await;
    let mut stream = TcpStream::connect(("127.0.0.1", client.port))
        .await
        .unwrap();
    stream.write_all(&[7u8; 100_000]).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.unwrap(); // returns only on the server's FIN
    assert_eq!(reply, "got 100000 bytes");
    drop(stream);
    served.await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_local_service_refuses_that_connection_and_the_tunnel_stays_up() {
    let dead_port = common::free_tcp_port();
    let (relay, client) = tunnel_to(dead_port).await;
    // Refused by the relay: a reset (which may arrive before the connect completes), or
    // an end with nothing sent.
    let read = async {
        let mut stream = TcpStream::connect(("127.0.0.1", client.port)).await?;
        let _ = stream.write_all(b"anyone?").await;
        let mut buffer = [0u8; 16];
        stream.read(&mut buffer).await
    };
    let read = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the refused connection was left hanging");
    let refused = match &read {
        Ok(0) => true,
        Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    };
    assert!(refused, "expected the connection to be refused: {read:?}");
    assert_eq!(
        relay
            .metric("localup_connections_refused_total{reason=\"client_could_not_connect\"}")
            .await,
        1.0
    );

    // Start the service on that very port: the same tunnel now serves it.
    let listener = TcpListener::bind(("127.0.0.1", dead_port)).await.unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        stream.write_all(b"up now").await.unwrap();
    });
    assert_eq!(read_all(client.port).await.unwrap(), "up now");
}

#[tokio::test(flavor = "multi_thread")]
async fn server_speaks_first_protocols_work() {
    // Like MySQL or SMTP: the service greets before the client says anything.
    let (port, _) = reply_server("220 greetings\r\n").await;
    let (_relay, client) = tunnel_to(port).await;
    let mut stream = TcpStream::connect(("127.0.0.1", client.port))
        .await
        .unwrap();
    let mut greeting = [0u8; 15];
    stream.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 greetings\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_tcp_transport_carries_the_same_tunnels() {
    let relay = LiveRelay::start(10, &[]).await;
    let mut config = client_config(&relay, echo_server().await, &mint(Claims::new("mydb")));
    config.transport = localup_client::TransportChoice::Tcp;
    let client = LiveClient::start(config).await;
    let data = random_bytes(2 * 1024 * 1024);
    assert!(echo(client.port, &data).await.unwrap() == data);
    let (_, listing) = relay.admin_get("/api/tunnels", None).await;
    assert!(listing.contains("\"transport\":\"tcp\""), "{listing}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopping_relay_carries_open_connections_to_their_end() {
    let (relay, client) = tunnel_to(echo_server().await).await;
    let port = client.port;
    let mut open = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    open.write_all(b"before").await.unwrap();
    let mut echoed = [0; 6];
    open.read_exact(&mut echoed).await.unwrap();

    let stopping = tokio::spawn(relay.stop());
    eventually(
        "the stopping relay to close the public port",
        Duration::from_secs(5),
        || async { TcpStream::connect(("127.0.0.1", port)).await.is_err() },
    )
    .await;
    // The client reconnects elsewhere, yet this connection stays on the old relay
    // connection until it ends.
    tokio::time::sleep(Duration::from_millis(300)).await;
    open.write_all(b"during the drain").await.unwrap();
    open.shutdown().await.unwrap();
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.unwrap();
    assert_eq!(rest, b"during the drain");
    assert!(
        !stopping.is_finished(),
        "the relay waited for the connection"
    );
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("the relay exits once its last connection ends")
        .unwrap();
}
