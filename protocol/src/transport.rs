//! The two transports a tunnel runs over, behind one interface: QUIC (quinn), and,
//! where UDP is blocked, QMux over TLS 1.3 on TCP ([`crate::mux`]), which carries the
//! same streams with the same semantics (flow control per stream, half-close, resets
//! with codes, stop-sending). Everything above this module is written once for both.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use quinn::VarInt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use web_transport_trait::{RecvStream as _, SendStream as _, Session as _};

use crate::frame::{self, FrameError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Quic,
    Tcp,
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Transport::Quic => "QUIC",
            Transport::Tcp => "TCP (TLS)",
        })
    }
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Lost {
    #[error("no answer from the peer within the idle timeout")]
    TimedOut,
    #[error("closed by the peer: {0}")]
    ClosedByPeer(String),
    #[error("closed locally")]
    ClosedLocally,
    #[error("{0}")]
    Failed(String),
}

/// One client's connection to the relay, over either transport. Cheap to clone.
#[derive(Clone)]
pub enum Connection {
    Quic(quinn::Connection),
    Tcp(Arc<MuxConnection>),
}

/// A QMux session and the peer it runs to (TCP sockets do not migrate).
pub struct MuxConnection {
    pub session: qmux::Session,
    pub remote: SocketAddr,
}

impl Connection {
    pub fn transport(&self) -> Transport {
        match self {
            Connection::Quic(_) => Transport::Quic,
            Connection::Tcp(_) => Transport::Tcp,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(connection) => connection.remote_address(),
            Connection::Tcp(mux) => mux.remote,
        }
    }

    pub async fn open_bi(&self) -> Result<(SendHalf, RecvHalf), Lost> {
        match self {
            Connection::Quic(connection) => connection
                .open_bi()
                .await
                .map(|(send, recv)| (SendHalf::Quic(send), RecvHalf::Quic(recv)))
                .map_err(|error| quic_lost(&error)),
            Connection::Tcp(mux) => mux
                .session
                .open_bi()
                .await
                .map(|(send, recv)| (SendHalf::Tcp(send), RecvHalf::Tcp(recv)))
                .map_err(|error| mux_lost(&error)),
        }
    }

    pub async fn accept_bi(&self) -> Result<(SendHalf, RecvHalf), Lost> {
        match self {
            Connection::Quic(connection) => connection
                .accept_bi()
                .await
                .map(|(send, recv)| (SendHalf::Quic(send), RecvHalf::Quic(recv)))
                .map_err(|error| quic_lost(&error)),
            Connection::Tcp(mux) => mux
                .session
                .accept_bi()
                .await
                .map(|(send, recv)| (SendHalf::Tcp(send), RecvHalf::Tcp(recv)))
                .map_err(|error| mux_lost(&error)),
        }
    }

    pub fn close(&self, code: u32, reason: &str) {
        match self {
            Connection::Quic(connection) => {
                connection.close(VarInt::from_u32(code), reason.as_bytes())
            }
            Connection::Tcp(mux) => mux.session.close(code, reason),
        }
    }

    /// Resolves when the connection has ended, with why.
    pub async fn closed(&self) -> Lost {
        match self {
            Connection::Quic(connection) => quic_lost(&connection.closed().await),
            Connection::Tcp(mux) => mux_lost(&mux.session.closed().await),
        }
    }
}

fn quic_lost(error: &quinn::ConnectionError) -> Lost {
    match error {
        quinn::ConnectionError::TimedOut => Lost::TimedOut,
        quinn::ConnectionError::ApplicationClosed(close) => {
            Lost::ClosedByPeer(String::from_utf8_lossy(&close.reason).into_owned())
        }
        quinn::ConnectionError::LocallyClosed => Lost::ClosedLocally,
        quinn::ConnectionError::ConnectionClosed(close)
            if close.to_string().contains("no_application_protocol")
                || close.to_string().contains("NoApplicationProtocol") =>
        {
            Lost::Failed(format!(
                "the relay does not speak {} (a different localup version?)",
                String::from_utf8_lossy(crate::ALPN)
            ))
        }
        other => Lost::Failed(other.to_string()),
    }
}

fn mux_lost(error: &qmux::Error) -> Lost {
    match error {
        qmux::Error::IdleTimeout => Lost::TimedOut,
        qmux::Error::ConnectionClosed { reason, .. } => Lost::ClosedByPeer(reason.clone()),
        other => Lost::Failed(other.to_string()),
    }
}

/// The sending half of a stream.
pub enum SendHalf {
    Quic(quinn::SendStream),
    Tcp(qmux::SendStream),
}

impl SendHalf {
    /// Waits until the peer's flow control lets this stream send at least one byte,
    /// so callers take bytes off a socket only when they can pass them on.
    pub async fn writable(&mut self) -> io::Result<()> {
        match self {
            SendHalf::Quic(send) => send.write(&[]).await.map(drop).map_err(io::Error::other),
            // A QMux write waits for credit before it takes any byte from its buffer.
            SendHalf::Tcp(_) => Ok(()),
        }
    }

    /// Sends `chunk` without copying it where the transport allows.
    pub async fn write_chunk(&mut self, mut chunk: Bytes) -> io::Result<()> {
        match self {
            SendHalf::Quic(send) => send.write_chunk(chunk).await.map_err(io::Error::other),
            SendHalf::Tcp(send) => {
                while chunk.has_remaining() {
                    send.write_buf(&mut chunk).await.map_err(io::Error::other)?;
                }
                Ok(())
            }
        }
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_chunk(Bytes::copy_from_slice(bytes)).await
    }

    pub async fn write_frame<T: serde::Serialize>(&mut self, message: &T) -> io::Result<()> {
        self.write_chunk(frame::encode(message).into()).await
    }

    /// Ends the stream cleanly after what was written (a TCP FIN on the far side).
    pub fn finish(&mut self) {
        let _ = match self {
            SendHalf::Quic(send) => send.finish().map_err(drop),
            SendHalf::Tcp(send) => send.finish().map_err(drop),
        };
    }

    /// Abandons the stream; the peer sees `code` (a TCP reset on the far side).
    pub fn reset(&mut self, code: u32) {
        match self {
            SendHalf::Quic(send) => {
                let _ = send.reset(VarInt::from_u32(code));
            }
            SendHalf::Tcp(send) => send.reset(code),
        }
    }

    /// Resolves once the peer has everything up to the FIN (or stopped the stream, or
    /// the connection is gone), so a connection closed right after loses nothing.
    pub async fn delivered(&mut self) {
        match self {
            SendHalf::Quic(send) => {
                let _ = send.stopped().await;
            }
            SendHalf::Tcp(send) => {
                let _ = send.closed().await;
            }
        }
    }
}

/// The receiving half of a stream.
pub enum RecvHalf {
    Quic(quinn::RecvStream),
    Tcp(qmux::RecvStream),
}

impl RecvHalf {
    /// Fills `chunks` with what has arrived; `None` at the end of the stream.
    pub async fn read_chunks(&mut self, chunks: &mut [Bytes]) -> io::Result<Option<usize>> {
        match self {
            RecvHalf::Quic(recv) => recv.read_chunks(chunks).await.map_err(io::Error::other),
            RecvHalf::Tcp(recv) => match recv.read_chunk(usize::MAX).await {
                Ok(Some(chunk)) => {
                    chunks[0] = chunk;
                    Ok(Some(1))
                }
                Ok(None) => Ok(None),
                Err(error) => Err(io::Error::other(error)),
            },
        }
    }

    /// The next piece of data, at most `max` bytes; `None` at the end of the stream.
    pub async fn read_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        match self {
            RecvHalf::Quic(recv) => recv
                .read_chunk(max, true)
                .await
                .map(|chunk| chunk.map(|chunk| chunk.bytes))
                .map_err(io::Error::other),
            RecvHalf::Tcp(recv) => recv.read_chunk(max).await.map_err(io::Error::other),
        }
    }

    /// Fills `buf` completely; a stream that ends first is [`FrameError::Truncated`].
    async fn read_exact(&mut self, mut buf: &mut [u8]) -> Result<(), FrameError> {
        while !buf.is_empty() {
            let read = match self {
                RecvHalf::Quic(recv) => recv.read(buf).await.map_err(io::Error::other),
                RecvHalf::Tcp(recv) => recv.read(buf).await.map_err(io::Error::other),
            };
            match read.map_err(FrameError::Io)? {
                Some(read) => buf = &mut buf[read..],
                None => return Err(FrameError::Truncated),
            }
        }
        Ok(())
    }

    pub async fn read_frame<T: DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        self.read_frame_or_end().await?.ok_or(FrameError::Truncated)
    }

    /// The next frame, or `None` when the peer finished the stream cleanly between
    /// frames.
    pub async fn read_frame_or_end<T: DeserializeOwned>(
        &mut self,
    ) -> Result<Option<T>, FrameError> {
        let mut header = [0u8; 4];
        let first = match self {
            RecvHalf::Quic(recv) => recv.read(&mut header).await.map_err(io::Error::other),
            RecvHalf::Tcp(recv) => recv.read(&mut header).await.map_err(io::Error::other),
        };
        let Some(first) = first.map_err(FrameError::Io)? else {
            return Ok(None);
        };
        self.read_exact(&mut header[first..]).await?;
        let mut body = vec![0u8; frame::body_len(header)?];
        self.read_exact(&mut body).await?;
        frame::decode_body(&body).map(Some)
    }

    /// Tells the peer to stop sending; it sees `code`.
    pub fn stop(&mut self, code: u32) {
        match self {
            RecvHalf::Quic(recv) => {
                let _ = recv.stop(VarInt::from_u32(code));
            }
            RecvHalf::Tcp(recv) => recv.stop(code),
        }
    }
}

/// What arrives on a control stream, as [`RecvHalf::messages`] reports it.
#[derive(Debug)]
pub enum Inbound<T> {
    Message(T),
    /// The peer finished the stream cleanly between messages.
    Finished,
    /// The peer sent something that is not a message: a protocol violation.
    Malformed(FrameError),
    /// The stream or its connection failed; the connection says why.
    Failed(io::Error),
}

impl RecvHalf {
    /// Reads messages on a task of their own and hands them over a channel, so a
    /// message half received is never lost to a select loop picking another branch.
    /// The channel ends after the first item that is not a message.
    pub fn messages<T: DeserializeOwned + Send + 'static>(mut self) -> mpsc::Receiver<Inbound<T>> {
        let (sender, receiver) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let item = match self.read_frame_or_end::<T>().await {
                    Ok(Some(message)) => Inbound::Message(message),
                    Ok(None) => Inbound::Finished,
                    Err(FrameError::Io(error)) => Inbound::Failed(error),
                    Err(error) => Inbound::Malformed(error),
                };
                let last = !matches!(item, Inbound::Message(_));
                if sender.send(item).await.is_err() || last {
                    return;
                }
            }
        });
        receiver
    }
}
