//! Tokens and ports: who may hold which port, for how long, and how tokens expire and
//! renew on live tunnels.

mod common;

use std::time::Duration;

use common::inprocess::*;
use localup_client::{ClientError, TokenSource};
use localup_protocol::PortRange;
use localup_protocol::token::{Claims, unix_now, unix_now_millis};

#[tokio::test(flavor = "multi_thread")]
async fn a_port_stays_reserved_for_its_subject_after_its_tunnel_ends() {
    let relay = LiveRelay::start(5, &[]).await;
    let owner = LiveClient::start(client_config(
        &relay,
        echo_server().await,
        &mint(Claims::new("owner")),
    ))
    .await;
    let port = owner.port;
    owner.stop().await.unwrap();

    let mut other = client_config(&relay, echo_server().await, &mint(Claims::new("other")));
    other.remote_port = Some(port);
    let Err(ClientError::Refused(message)) = LiveClient::try_start(other).await else {
        panic!("another subject took a reserved port");
    };
    assert!(
        message.starts_with(&format!("Address already in use: port {port} is reserved")),
        "{message}"
    );
    // Allocation skips it for others and hands it back to its subject.
    for _ in 0..4 {
        let other = LiveClient::start(client_config(
            &relay,
            echo_server().await,
            &mint(Claims::new("other")),
        ))
        .await;
        assert_ne!(other.port, port);
    }
    let back = LiveClient::start(client_config(
        &relay,
        echo_server().await,
        &mint(Claims::new("owner")),
    ))
    .await;
    assert_eq!(back.port, port);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_reservation_period_a_released_port_is_anyones_at_once() {
    let relay = LiveRelay::start(5, &["--port-reservation", "0s"]).await;
    let first = LiveClient::start(client_config(
        &relay,
        echo_server().await,
        &mint(Claims::new("a")),
    ))
    .await;
    let port = first.port;
    first.stop().await.unwrap();
    let mut second = client_config(&relay, echo_server().await, &mint(Claims::new("b")));
    second.remote_port = Some(port);
    let second = LiveClient::start(second).await;
    assert_eq!(echo(second.port, b"again").await.unwrap(), b"again");
}

/// Tunnel A (namespace a) gets port P; A is deleted and P goes to B (namespace b) with
/// a later assignment; A's old token is refused, and a live A is cut off.
#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_tunnels_token_cannot_claim_its_reassigned_port() {
    let relay = LiveRelay::start(5, &[]).await;
    let port = relay.range.0 + 2;
    let pinned = PortRange::single(port).unwrap();
    let a_token = mint(
        Claims::new("ns-a/a")
            .pooled()
            .restricted_to(pinned)
            .with_port_epoch(unix_now_millis()),
    );
    let a = LiveClient::start(client_config(&relay, echo_server().await, &a_token)).await;
    assert_eq!(a.port, port);

    // A leftover of A still runs when the operator hands P to B.
    let b_token = mint(
        Claims::new("ns-b/b")
            .pooled()
            .restricted_to(pinned)
            .with_port_epoch(unix_now_millis() + 1),
    );
    let (b_port, _) = reply_server("b").await;
    let b = LiveClient::start(client_config(&relay, b_port, &b_token)).await;
    assert_eq!(b.port, port);
    assert_eq!(read_all(port).await.unwrap(), "b");
    eventually(
        "A's leftover to be cut off",
        Duration::from_secs(5),
        || async {
            relay
                .try_metric("localup_tunnels_closed_total{reason=\"superseded\"}")
                .await
                == Some(1.0)
        },
    )
    .await;
    drop(a);

    let Err(ClientError::Refused(message)) =
        LiveClient::try_start(client_config(&relay, echo_server().await, &a_token)).await
    else {
        panic!("A's old token got its port back");
    };
    assert!(message.contains("assigned to another tunnel"), "{message}");
    assert_eq!(read_all(port).await.unwrap(), "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_subject_may_hold_only_so_many_tunnels() {
    let relay = LiveRelay::start(10, &["--max-tunnels-per-subject", "3"]).await;
    let token = mint(Claims::new("leaked"));
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(LiveClient::start(client_config(&relay, echo_server().await, &token)).await);
    }
    let Err(ClientError::Refused(message)) =
        LiveClient::try_start(client_config(&relay, echo_server().await, &token)).await
    else {
        panic!("a fourth tunnel was opened");
    };
    assert!(message.starts_with("Too many tunnels"), "{message}");
    // Others are not affected.
    LiveClient::start(client_config(
        &relay,
        echo_server().await,
        &mint(Claims::new("other")),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_live_tunnel_whose_token_expires_is_closed_and_not_reopened() {
    let relay = LiveRelay::start(5, &[]).await;
    let token = mint(Claims::new("short").expires_in(Duration::from_secs(2)));
    let client = LiveClient::start(client_config(&relay, echo_server().await, &token)).await;
    let port = client.port;
    assert_eq!(echo(port, b"while valid").await.unwrap(), b"while valid");
    // Expiry plus the relay's 5 s leeway for clock skew.
    let ended = tokio::time::timeout(Duration::from_secs(15), client.ended())
        .await
        .expect("the tunnel outlived its token");
    let Err(ClientError::Refused(message)) = ended else {
        panic!("{ended:?}");
    };
    assert!(message.contains("expired"), "{message}");
    assert_eq!(
        relay
            .metric("localup_tunnels_closed_total{reason=\"token_expired\"}")
            .await,
        1.0
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewed_token_file_keeps_the_tunnel_past_the_first_tokens_expiry() {
    let relay = LiveRelay::start(5, &[]).await;
    let dir = common::scratch_dir("token");
    let file = dir.join("token");
    std::fs::write(
        &file,
        mint(Claims::new("renewing").expires_in(Duration::from_secs(3))),
    )
    .unwrap();
    let mut config = client_config(&relay, echo_server().await, "unused");
    config.token = TokenSource::File(file.clone());
    let client = LiveClient::start(config).await;
    let first_expiry = unix_now() + 3;
    // The operator (or a person) renews the Secret; the client notices and presents it.
    std::fs::write(
        &file,
        mint(Claims::new("renewing").expires_in(Duration::from_secs(3600))),
    )
    .unwrap();
    eventually(
        "the relay to take the renewal",
        Duration::from_secs(8),
        || async {
            relay
                .try_metric("localup_token_renewals_total{reason=\"accepted\"}")
                .await
                == Some(1.0)
        },
    )
    .await;
    let (_, listing) = relay.admin_get("/api/tunnels", None).await;
    let tunnels: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert!(tunnels[0]["members"][0]["expires_at"].as_u64().unwrap() > unix_now() + 600);
    // Past the first token's expiry and the relay's 5 s leeway, the tunnel still serves.
    eventually("the first token's end", Duration::from_secs(15), || async {
        unix_now() > first_expiry + 6
    })
    .await;
    assert_eq!(echo(client.port, b"renewed").await.unwrap(), b"renewed");
    assert_eq!(
        relay.metric("localup_tunnels_opened_total").await,
        1.0,
        "the tunnel was reopened instead of renewed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_renewal_for_another_subject_is_refused_and_the_tunnel_keeps_its_token() {
    let relay = LiveRelay::start(5, &[]).await;
    let dir = common::scratch_dir("token");
    let file = dir.join("token");
    std::fs::write(
        &file,
        mint(Claims::new("mine").expires_in(Duration::from_secs(3600))),
    )
    .unwrap();
    let mut config = client_config(&relay, echo_server().await, "unused");
    config.token = TokenSource::File(file.clone());
    let client = LiveClient::start(config).await;
    std::fs::write(&file, mint(Claims::new("someone-else"))).unwrap();
    eventually(
        "the relay to refuse the renewal",
        Duration::from_secs(8),
        || async {
            relay
                .try_metric("localup_token_renewals_total{reason=\"refused\"}")
                .await
                == Some(1.0)
        },
    )
    .await;
    let (_, listing) = relay.admin_get("/api/tunnels", None).await;
    let tunnels: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(tunnels[0]["subject"], "mine");
    assert_eq!(echo(client.port, b"unchanged").await.unwrap(), b"unchanged");
}
