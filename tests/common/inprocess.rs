//! The relay and the client as libraries, in this test's process, on port 0: the
//! relay's `Relay::bind` → `run(shutdown)`, the client's `Client::new` →
//! `remote_port()` → `serve(shutdown)`. No output to wait for, nothing to clean up.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use localup_client::trust::TrustPolicy;
use localup_client::{Client, ClientConfig, ClientError, TokenSource, TransportChoice};
use localup_protocol::token::Claims;
use localup_relay::{Relay, RelayConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{SECRET, free_port_range, scratch_dir};

/// A relay running in this process until dropped.
pub struct LiveRelay {
    pub control: SocketAddr,
    pub admin: SocketAddr,
    pub range: (u16, u16),
    pub home: PathBuf,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl LiveRelay {
    /// A relay on loopback serving a fresh range of `range_len` ports, with `flags`
    /// as on its command line.
    pub async fn start(range_len: u16, flags: &[&str]) -> Self {
        let range = free_port_range(range_len);
        Self::start_on(range, scratch_dir("relay"), "127.0.0.1:0", flags).await
    }

    pub async fn start_on(range: (u16, u16), home: PathBuf, control: &str, flags: &[&str]) -> Self {
        let range_flag = format!("{}-{}", range.0, range.1);
        let state = home.join("state");
        let mut args = vec![
            "--localup-addr",
            control,
            "--tcp-port-range",
            &range_flag,
            "--admin-addr",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(flags);
        let config = RelayConfig::from_args(SECRET, args).expect("valid relay flags");
        let relay = Relay::bind(config).await.expect("the relay starts");
        let control = relay.local_addr().unwrap();
        let admin = relay.admin_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(relay.run(shutdown.clone()));
        Self {
            control,
            admin,
            range,
            home,
            shutdown,
            task: Some(task),
        }
    }

    /// As clients dial it: `localhost:PORT`, or `[::1]:PORT` for a relay on IPv6.
    pub fn addr(&self) -> String {
        match self.control {
            SocketAddr::V4(_) => format!("localhost:{}", self.control.port()),
            SocketAddr::V6(addr) => format!("[{}]:{}", addr.ip(), addr.port()),
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.home.join("state/relay-cert.pem")
    }

    /// Stops the relay as SIGTERM would and waits for it to finish.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// GET on the admin endpoint with an optional bearer token; (status, body).
    pub async fn admin_get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        http_get(self.admin, path, token).await
    }

    /// The value of the metric line that is exactly `name` (with its labels), failing
    /// when there is none.
    pub async fn metric(&self, name: &str) -> f64 {
        let (status, body) = self.admin_get("/metrics", None).await;
        assert_eq!(status, 200, "{body}");
        metric_value(&body, name)
    }

    /// The metric's value, or `None` while it does not exist (a labelled counter
    /// appears with its first count).
    pub async fn try_metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.admin_get("/metrics", None).await;
        find_metric(&body, name)
    }
}

impl Drop for LiveRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The value of the line `name value` in Prometheus text, exactly by name and labels.
pub fn metric_value(text: &str, name: &str) -> f64 {
    find_metric(text, name).unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
}

fn find_metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (metric, value) = line.rsplit_once(' ')?;
            (metric == name).then(|| value.parse().unwrap())
        })
}

pub async fn http_get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A token signed with the test secret.
pub fn mint(claims: Claims) -> String {
    claims.mint(SECRET.as_bytes())
}

/// The configuration of a client exposing `local_port` through `relay`, trusting the
/// relay's certificate as its CA (the way sidecars do).
pub fn client_config(relay: &LiveRelay, local_port: u16, token: &str) -> ClientConfig {
    let mut config =
        ClientConfig::new(relay.addr(), TokenSource::Literal(token.into()), local_port);
    config.trust = TrustPolicy::CaFile(relay.cert());
    config.transport = TransportChoice::Quic;
    config.shutdown_timeout = Duration::from_secs(5);
    config
}

/// A client serving in this process until dropped or stopped.
pub struct LiveClient {
    pub port: u16,
    pub public_addr: String,
    pub status: tokio::sync::watch::Receiver<localup_client::Status>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), ClientError>>>,
}

impl LiveClient {
    pub async fn start(config: ClientConfig) -> Self {
        Self::try_start(config).await.expect("the tunnel opens")
    }

    pub async fn try_start(config: ClientConfig) -> Result<Self, ClientError> {
        let client = Client::new(config).await?;
        let (port, public_addr) = (client.remote_port(), client.public_addr().to_owned());
        let status = client.status();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(client.serve(shutdown.clone()));
        Ok(Self {
            port,
            public_addr,
            status,
            shutdown,
            task: Some(task),
        })
    }

    /// Drains as on SIGTERM and waits until the client has finished.
    pub async fn stop(mut self) -> Result<(), ClientError> {
        self.shutdown.cancel();
        self.task.take().unwrap().await.unwrap()
    }

    /// The client's result once it ends on its own (a refusal, an untrusted relay).
    pub async fn ended(mut self) -> Result<(), ClientError> {
        self.task.take().unwrap().await.unwrap()
    }

    /// Waits until the tunnel is up again after a reconnect, up to `timeout`.
    pub async fn wait_up(&mut self, timeout: Duration) {
        tokio::time::timeout(
            timeout,
            self.status
                .wait_for(|status| matches!(status, localup_client::Status::Up { .. })),
        )
        .await
        .expect("the tunnel is back up in time")
        .unwrap();
    }

    /// Vanishes without a goodbye, as a killed process does: no drain, no close.
    pub fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Drop for LiveClient {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A TCP echo server on loopback; each connection echoes until its peer's FIN, then
/// sends its own.
pub async fn echo_server() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    port
}

/// A server that answers each connection with `reply` and closes; counts connections.
pub async fn reply_server(
    reply: &'static str,
) -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = std::sync::Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = stream.write_all(reply.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (port, served)
}

/// Sends `data` through `port` and returns what came back before the far side's FIN.
pub async fn echo(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    let (mut read, mut write) = stream.into_split();
    let payload = data.to_vec();
    let sender = tokio::spawn(async move {
        write.write_all(&payload).await?;
        write.shutdown().await
    });
    let mut received = Vec::with_capacity(data.len());
    tokio::time::timeout(Duration::from_secs(30), read.read_to_end(&mut received))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    sender.await.unwrap()?;
    Ok(received)
}

/// Everything a server sends on a new connection to `port` before closing it.
pub async fn read_all(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut text))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(text)
}

/// Polls `condition` every 20 ms until it holds, failing with `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
