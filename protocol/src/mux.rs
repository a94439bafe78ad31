//! The TCP transport: QMux (the IETF draft that carries QUIC's streams, flow control
//! and resets over a reliable byte stream) over TLS 1.3 on TCP. It is the fallback for
//! networks that block UDP, served on the same port number as QUIC, with the same
//! certificate, ALPN, hello and tokens.
//!
//! Why QMux rather than yamux or HTTP/2: its streams behave exactly as QUIC's (resets
//! and stop-sending with error codes, half-close, per-stream and per-connection flow
//! control, an idle timeout with keepalives), so the relay and the client run one code
//! path over both transports. yamux has no error codes and no stop-sending, so a local
//! service refusing a connection or a reset could not be told apart from a clean end;
//! HTTP/2 only lets the client open streams, so the relay (which opens one stream per
//! external connection) would have to act as the HTTP client, and every stream would
//! carry request and response framing around the tunnel's bytes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::quic::{CONNECTION_WINDOW, IDLE_TIMEOUT, MAX_STREAMS_PER_TUNNEL, Role, STREAM_WINDOW};
use crate::transport::{Connection, MuxConnection};

/// How long the QMux handshake (transport parameters) may take once TLS is up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn config(role: Role) -> qmux::Config {
    let mut config = qmux::Config::new(qmux::Version::QMux02);
    config.max_streams_bidi = match role {
        Role::Client => u64::from(MAX_STREAMS_PER_TUNNEL),
        Role::Relay => 1,
    };
    config.max_streams_uni = 0;
    config.max_data = u64::from(CONNECTION_WINDOW);
    config.max_stream_data_bidi_local = u64::from(STREAM_WINDOW);
    config.max_stream_data_bidi_remote = u64::from(STREAM_WINDOW);
    config.max_stream_data_uni = 0;
    // Keepalives go out at a third of this, so either side notices a dead link within
    // it, as over QUIC.
    config.max_idle_timeout = IDLE_TIMEOUT.as_millis() as u64;
    config.max_datagram_frame_size = 0;
    config.handshake_timeout = HANDSHAKE_TIMEOUT;
    config.rtt_interval = Duration::ZERO;
    config
}

fn session_transport<T>(stream: T, config: &qmux::Config) -> qmux::transport::Stream<T>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    qmux::transport::Stream::new(stream, config.version, config.max_record_size)
}

/// The client's side of a QMux session over an established TLS stream.
pub async fn connect<T>(stream: T, remote: SocketAddr) -> Result<Connection, qmux::Error>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let config = config(Role::Client);
    let session = qmux::Session::connect(session_transport(stream, &config), config).await?;
    Ok(Connection::Tcp(std::sync::Arc::new(MuxConnection {
        session,
        remote,
    })))
}

/// The relay's side of a QMux session over an accepted TLS stream.
pub async fn accept<T>(stream: T, remote: SocketAddr) -> Result<Connection, qmux::Error>
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let config = config(Role::Relay);
    let session = qmux::Session::accept(session_transport(stream, &config), config).await?;
    Ok(Connection::Tcp(std::sync::Arc::new(MuxConnection {
        session,
        remote,
    })))
}
