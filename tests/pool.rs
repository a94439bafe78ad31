//! Several clients behind one port (a pool), drains that lose nothing, and clients
//! that die and come back to the same port.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::inprocess::*;
use common::{Client, Relay, RelayOptions, free_tcp_port, token};
use localup_client::ClientError;
use localup_protocol::token::Claims;

#[tokio::test(flavor = "multi_thread")]
async fn pooled_clients_share_one_port_and_all_serve() {
    let relay = LiveRelay::start(5, &[]).await;
    let token = mint(Claims::new("web").pooled());
    let (a_port, a_served) = reply_server("a").await;
    let (b_port, b_served) = reply_server("b").await;
    let a = LiveClient::start(client_config(&relay, a_port, &token)).await;
    let mut joining = client_config(&relay, b_port, &token);
    joining.remote_port = Some(a.port);
    let b = LiveClient::start(joining).await;
    assert_eq!(b.port, a.port);
    // A pooled client without --remote-port joins its subject's pool too.
    let (c_port, c_served) = reply_server("c").await;
    let c = LiveClient::start(client_config(&relay, c_port, &token)).await;
    assert_eq!(c.port, a.port);

    // One connection at a time, each finished before the next: every client carries
    // the same (none), so the choice rotates and each gets a third.
    let mut replies = String::new();
    for _ in 0..30 {
        replies.push_str(&read_all(a.port).await.unwrap());
        eventually(
            "the connection to end at the relay",
            Duration::from_secs(5),
            || async { relay.metric("localup_connections_active").await == 0.0 },
        )
        .await;
    }
    assert_eq!(
        replies.len(),
        30,
        "every connection was answered: {replies:?}"
    );
    for (name, served) in [("a", &a_served), ("b", &b_served), ("c", &c_served)] {
        assert_eq!(
            served.load(Ordering::Relaxed),
            10,
            "client {name}'s share of 30"
        );
    }
    let (_, listing) = relay.admin_get("/api/tunnels", None).await;
    let tunnels: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(tunnels.as_array().unwrap().len(), 1);
    assert_eq!(tunnels[0]["members"].as_array().unwrap().len(), 3);
    assert_eq!(tunnels[0]["pooled"], true);
    let members = format!(
        "localup_tunnel_members{{port=\"{}\",subject=\"web\"}}",
        a.port
    );
    assert_eq!(relay.metric(&members).await, 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_same_subject_with_pooling_may_join() {
    let relay = LiveRelay::start(5, &[]).await;
    let first = LiveClient::start(client_config(
        &relay,
        echo_server().await,
        &mint(Claims::new("web").pooled()),
    ))
    .await;
    let join = |token: String| {
        let mut config = client_config(&relay, free_tcp_port(), &token);
        config.remote_port = Some(first.port);
        LiveClient::try_start(config)
    };
    for (who, token) in [
        (
            "another subject, pooled",
            mint(Claims::new("other").pooled()),
        ),
        ("the same subject without pooling", mint(Claims::new("web"))),
    ] {
        let Err(ClientError::Refused(message)) = join(token).await else {
            panic!("{who} was let in");
        };
        assert!(
            message.starts_with("Address already in use"),
            "{who}: {message}"
        );
    }
    assert_eq!(
        echo(first.port, b"still served").await.unwrap(),
        b"still served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_client_finishes_its_connections_and_the_pool_takes_new_ones() {
    let relay = LiveRelay::start(5, &[]).await;
    let token = mint(Claims::new("web").pooled());
    let a = LiveClient::start(client_config(&relay, echo_server().await, &token)).await;
    let port = a.port;
    let mut joining = client_config(&relay, echo_server().await, &token);
    joining.remote_port = Some(port);
    let b = LiveClient::start(joining).await;

    // Connections open on both clients while one of them drains.
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"before ")
            .await
            .unwrap();
        open.push(stream);
    }
    let stream_load = tokio::spawn(async move {
        let mut failed = 0;
        for i in 0..100 {
            let data = format!("request {i}");
            if echo(port, data.as_bytes()).await.ok().as_deref() != Some(data.as_bytes()) {
                failed += 1;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        failed
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let draining = tokio::spawn(a.stop());
    for mut stream in open {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream.write_all(b"after").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut echoed = Vec::new();
        stream.read_to_end(&mut echoed).await.unwrap();
        assert_eq!(
            echoed, b"before after",
            "a connection open during the drain was cut"
        );
    }
    draining.await.unwrap().unwrap();
    assert_eq!(
        stream_load.await.unwrap(),
        0,
        "requests failed during the drain (of 100)"
    );
    assert_eq!(echo(port, b"b serves").await.unwrap(), b"b serves");
    drop(b);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_whose_last_client_left_holds_new_connections_for_the_next_one() {
    let relay = LiveRelay::start(5, &[]).await;
    let token = mint(Claims::new("web").pooled());
    let old = LiveClient::start(client_config(&relay, echo_server().await, &token)).await;
    let port = old.port;
    old.stop().await.unwrap();
    // The port stays bound: this connection waits in the backlog...
    let waiting = tokio::spawn(async move { echo(port, b"queued").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...until the next client joins (a rollout of a single pod).
    let mut config = client_config(&relay, echo_server().await, &token);
    config.remote_port = Some(port);
    let _new = LiveClient::start(config).await;
    assert_eq!(waiting.await.unwrap().unwrap(), b"queued");
}

/// A client killed outright (no goodbye: its relay connection looks alive until the
/// idle timeout) and started again with the same command gets its port back.
#[test]
fn a_killed_client_restarted_serves_the_same_port_within_5_seconds() {
    let relay = Relay::start(20);
    let echo = common::echo_server();
    let token = token("mydb");
    for requested in [false, true] {
        let (first, port) = Client::start(&relay, echo, &token, &[]);
        first.process.signal("KILL");
        let killed = Instant::now();
        let extra = if requested {
            vec!["--remote-port".to_owned(), port.to_string()]
        } else {
            vec![]
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (_again, again) = Client::start(&relay, echo, &token, &extra);
        let back_in = killed.elapsed();
        assert_eq!(again, port, "the restarted client got another port");
        assert!(
            back_in < Duration::from_secs(5),
            "back on port {port} after {back_in:?}"
        );
        assert_eq!(common::echo_round_trip(port, b"again"), b"again");
    }
}

#[test]
fn a_third_client_of_another_subject_gets_the_references_message() {
    let relay = Relay::start_with(RelayOptions::range(common::free_port_range(5)));
    let echo = common::echo_server();
    let pool = common::pool_token("web");
    let (_a, port) = Client::start(&relay, echo, &pool, &[]);
    let remote = port.to_string();
    let (_b, joined) = Client::start(&relay, echo, &pool, &["--remote-port", &remote]);
    assert_eq!(joined, port);
    let output = common::expect_client_failure(
        &relay.addr(),
        &token("intruder"),
        &["--remote-port", &remote],
    );
    assert!(
        output.contains(&format!(
            "❌ Address already in use: port {port} is held by another tunnel"
        )),
        "{output}"
    );
}
