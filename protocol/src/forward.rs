//! Carries one TCP connection over one stream (QUIC or QMux), both directions at once.
//!
//! Each direction is independent, so half-close works: a TCP FIN becomes a stream FIN
//! and the other way round, while data keeps flowing the other way. Nothing is read
//! from the socket until the stream has flow-control credit for it, and nothing more
//! until the stream has taken the previous read, so a slow reader slows the writer
//! down (backpressure) and a stalled stream holds at most one small read. Buffers are
//! allocated only once data is ready, so thousands of idle connections cost almost
//! nothing.

use std::io::{self, IoSlice};
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::rate::RateLimit;
use crate::transport::{RecvHalf, SendHalf};

/// Reads start small (most connections are chatty) and double while they come back
/// full and the stream keeps up, so bulk transfers move in large chunks (per-chunk
/// costs dominate at high rates); a stream that runs out of credit drops back to small
/// reads. The largest stays below glibc's smallest mmap threshold (128 KiB): larger
/// buffers, freed and reallocated by thousands of connections, raise that threshold and
/// land on a heap that fragments, and a relay's memory then grows with what it carries.
const FIRST_READ: usize = 16 * 1024;
const LARGEST_READ: usize = 64 * 1024;
/// Reads smaller than this are always copied into a chunk of their own size.
const COPY_BELOW: usize = 4 * 1024;
/// How many received QUIC chunks are gathered into one `writev`.
const CHUNKS_PER_WRITE: usize = 32;

/// Stream error code sent when the TCP side failed (reset or error), so the peer
/// aborts its TCP side too instead of seeing a clean end of stream.
pub const TCP_ABORTED: u32 = 1;

/// Counts bytes as they move, so metrics are live during long transfers, and holds
/// the bandwidth limits they are subject to.
pub trait Meter: Sync {
    fn tcp_to_stream(&self, bytes: u64);
    fn stream_to_tcp(&self, bytes: u64);
    fn tcp_to_stream_limit(&self) -> Option<&RateLimit> {
        None
    }
    fn stream_to_tcp_limit(&self) -> Option<&RateLimit> {
        None
    }
}

impl Meter for () {
    fn tcp_to_stream(&self, _: u64) {}
    fn stream_to_tcp(&self, _: u64) {}
}

/// Bytes moved each way by one connection.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub tcp_to_stream: u64,
    pub stream_to_tcp: u64,
}

/// Runs until both directions are finished or one side fails; errors end only this
/// connection. A failure in either direction aborts both, as a TCP reset would.
pub async fn forward(
    tcp: TcpStream,
    mut send: SendHalf,
    mut recv: RecvHalf,
    meter: &impl Meter,
) -> io::Result<Totals> {
    let _ = tcp.set_nodelay(true);
    let (tcp_read, mut tcp_write) = tcp.into_split();
    let result = tokio::try_join!(
        tcp_to_stream(&tcp_read, &mut send, meter),
        stream_to_tcp(&mut recv, &mut tcp_write, meter),
    );
    match result {
        Ok((tcp_to_stream, stream_to_tcp)) => {
            // finish() only queues the FIN: wait until the peer has it all, or a
            // connection close right after (a drain, the end of a tunnel) would discard
            // the tail and the far TCP side would see a reset instead of the end. Bounded:
            // it ends when the connection is lost, and drains have their own timeout.
            send.delivered().await;
            Ok(Totals {
                tcp_to_stream,
                stream_to_tcp,
            })
        }
        Err(error) => {
            send.reset(TCP_ABORTED);
            recv.stop(TCP_ABORTED);
            // Closing with a zero linger sends RST, so the TCP peer sees the failure
            // instead of a clean but truncated end.
            if let Ok(tcp) = tcp_read.reunite(tcp_write) {
                let _ = tcp.set_zero_linger();
            }
            Err(error)
        }
    }
}

async fn tcp_to_stream(
    tcp: &OwnedReadHalf,
    send: &mut SendHalf,
    meter: &impl Meter,
) -> io::Result<u64> {
    let limit = meter.tcp_to_stream_limit();
    let largest_read = limit.map_or(LARGEST_READ, |limit| limit.largest_read().min(LARGEST_READ));
    let mut total = 0u64;
    let mut read_size = FIRST_READ.min(largest_read);
    let mut buffer = BytesMut::new();
    loop {
        if send.writable().now_or_never().is_none() {
            read_size = FIRST_READ.min(largest_read);
            send.writable().await?;
        }
        tcp.readable().await?;
        buffer.reserve(read_size);
        match tcp.try_read_buf(&mut buffer) {
            Ok(0) => {
                // Clean end of the TCP side: a stream FIN; the peer half-closes its socket.
                send.finish();
                return Ok(total);
            }
            Ok(read) => {
                if read >= read_size {
                    read_size = (read_size * 2).min(largest_read);
                }
                total += read as u64;
                meter.tcp_to_stream(read as u64);
                // The transport keeps a chunk, and the whole allocation under it, until
                // the peer acknowledges it. Small reads, and reads that filled less than
                // half of their buffer, are copied out and the buffer dropped, so a
                // waiting connection holds no buffer and memory in flight is at most
                // twice the data; reads that (nearly) filled it go without copying.
                let chunk = if read < COPY_BELOW || read < buffer.capacity() / 2 {
                    let chunk = Bytes::copy_from_slice(&buffer);
                    buffer = BytesMut::new();
                    chunk
                } else {
                    std::mem::take(&mut buffer).freeze()
                };
                // A stream that had to wait for credit holds what it read meanwhile:
                // read less next time, so streams stuck behind flow control each hold
                // a small read, not a large one.
                if !write_at_once(send, chunk).await? {
                    read_size = (read_size / 2).max(FIRST_READ.min(largest_read));
                }
                if let Some(limit) = limit {
                    tokio::time::sleep(limit.take(read as u64)).await;
                }
            }
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Writes `chunk`; true when the stream took it without waiting for credit.
async fn write_at_once(send: &mut SendHalf, chunk: Bytes) -> io::Result<bool> {
    let mut write = std::pin::pin!(send.write_chunk(chunk));
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(result) => result.map(|()| true),
        Poll::Pending => write.await.map(|()| false),
    }
}

async fn stream_to_tcp(
    recv: &mut RecvHalf,
    tcp: &mut OwnedWriteHalf,
    meter: &impl Meter,
) -> io::Result<u64> {
    let limit = meter.stream_to_tcp_limit();
    let mut total = 0u64;
    let mut chunks: [Bytes; CHUNKS_PER_WRITE] = Default::default();
    loop {
        let read = match limit {
            // Under a bandwidth limit, no more than a burst at a time.
            Some(limit) => recv.read_chunk(limit.largest_read()).await?.map(|chunk| {
                chunks[0] = chunk;
                1
            }),
            None => recv.read_chunks(&mut chunks).await?,
        };
        let Some(count) = read else {
            // The peer finished its side: half-close ours, keep reading the other way.
            tcp.shutdown().await?;
            return Ok(total);
        };
        let moved: usize = chunks[..count].iter().map(Bytes::len).sum();
        write_all_vectored(tcp, &chunks[..count]).await?;
        chunks[..count].fill(Bytes::new());
        total += moved as u64;
        meter.stream_to_tcp(moved as u64);
        if let Some(limit) = limit {
            tokio::time::sleep(limit.take(moved as u64)).await;
        }
    }
}

async fn write_all_vectored(tcp: &mut OwnedWriteHalf, chunks: &[Bytes]) -> io::Result<()> {
    let mut slices = [IoSlice::new(&[]); CHUNKS_PER_WRITE];
    for (slice, chunk) in slices.iter_mut().zip(chunks) {
        *slice = IoSlice::new(chunk);
    }
    let mut pending = &mut slices[..chunks.len()];
    while !pending.is_empty() {
        let written = tcp.write_vectored(pending).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut pending, written);
    }
    Ok(())
}
