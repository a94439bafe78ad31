//! One external connection on the client's side: read the relay's header, connect to
//! the local service, tell the relay whether that worked, then carry the bytes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use localup_protocol::forward::forward;
use localup_protocol::message::{StreamHeader, StreamReply};
use localup_protocol::proxy_header::{self, ProxyProtocol};
use localup_protocol::transport::{RecvHalf, SendHalf};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::config::LocalService;

const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Stream error code telling the relay the local service could not be reached.
pub const LOCAL_UNREACHABLE: u32 = 2;

pub async fn serve_stream(
    mut send: SendHalf,
    mut recv: RecvHalf,
    local: LocalService,
    proxy_protocol: Option<ProxyProtocol>,
) {
    let header: StreamHeader = match recv.read_frame().await {
        Ok(header) => header,
        Err(error) => {
            warn!(%error, "bad stream header from the relay; dropping that connection");
            send.reset(LOCAL_UNREACHABLE);
            return;
        }
    };
    let peer = header.peer;
    let mut tcp = match connect(&local).await {
        Ok(tcp) => tcp,
        Err(error) => {
            warn!(%peer, %local, %error, "refused a connection: the local service is unreachable");
            let reply = StreamReply::Unreachable {
                reason: error.to_string(),
            };
            if send.write_frame(&reply).await.is_ok() {
                send.finish();
            }
            recv.stop(LOCAL_UNREACHABLE);
            return;
        }
    };
    if let Some(version) = proxy_protocol {
        let relay_side = header
            .local
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0));
        if let Err(error) = tcp
            .write_all(&proxy_header::header(version, peer, relay_side))
            .await
        {
            debug!(%peer, %error, "the local service closed before the PROXY header");
            send.reset(LOCAL_UNREACHABLE);
            return;
        }
    }
    if send.write_frame(&StreamReply::Connected).await.is_err() {
        return;
    }
    match forward(tcp, send, recv, &()).await {
        Ok(totals) => debug!(%peer, ?totals, "connection finished"),
        Err(error) => debug!(%peer, %error, "connection aborted"),
    }
}

async fn connect(local: &LocalService) -> std::io::Result<TcpStream> {
    let connect = async {
        match local.host.parse::<IpAddr>() {
            Ok(ip) => TcpStream::connect((ip, local.port)).await,
            // A name is looked up per connection: the service may move (containers).
            Err(_) => TcpStream::connect((local.host.as_str(), local.port)).await,
        }
    };
    tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
