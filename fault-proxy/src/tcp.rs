//! The TCP proxy: each accepted connection gets its own connection upstream, and each
//! direction is a reader and a writer joined by a queue of timestamped chunks, so the
//! delay applies per direction without limiting throughput to one chunk per delay.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::{Faults, Shared, add};

const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction: with CHUNK this bounds memory per connection and,
/// under delay D, throughput to about CHUNKS_IN_FLIGHT * CHUNK / D per direction.
const CHUNKS_IN_FLIGHT: usize = 256;

pub(crate) async fn start(
    listen: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    let task = tokio::spawn(run(listener, upstream, shared));
    Ok((local_addr, task))
}

async fn run(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    // Dropping this set (when the proxy's task is aborted) aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    add(&shared.counters.flows, 1);
                    connections.spawn(connection(client, upstream, Arc::clone(&shared)));
                }
                // Typically out of file descriptors: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

/// Why a connection ended other than by both sides closing.
enum Abort {
    Cut,
    Failed,
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) {
    let mut faults = shared.faults.subscribe();
    let cuts = faults.borrow_and_update().cuts;
    let cut = async move {
        let _ = faults.wait_for(|faults| faults.cuts != cuts).await;
    };
    tokio::pin!(cut);
    let _ = client.set_nodelay(true);

    // A blackholed link would not carry the SYN either: connect once it is over.
    let mut server = tokio::select! {
        () = &mut cut => return reset(&shared, Abort::Cut, &client, None),
        server = async {
            let _ = shared.faults.subscribe().wait_for(|faults| !faults.blackhole).await;
            TcpStream::connect(upstream).await
        } => match server {
            Ok(server) => server,
            Err(_) => return reset(&shared, Abort::Failed, &client, None),
        },
    };
    let _ = server.set_nodelay(true);

    let outcome = tokio::select! {
        () = &mut cut => Err(Abort::Cut),
        result = async {
            let (client_read, client_write) = client.split();
            let (server_read, server_write) = server.split();
            tokio::try_join!(
                pump(client_read, server_write, &shared),
                pump(server_read, client_write, &shared),
            )
        } => result.map(|_| ()).map_err(|_| Abort::Failed),
    };
    if let Err(abort) = outcome {
        reset(&shared, abort, &client, Some(&server));
    }
}

/// Resets the connection on both sides (RST, not FIN), as a broken path or a failed
/// peer shows itself to a TCP endpoint.
fn reset(shared: &Shared, abort: Abort, client: &TcpStream, server: Option<&TcpStream>) {
    if let Abort::Cut = abort {
        add(&shared.counters.cut, 1);
    }
    for stream in std::iter::once(client).chain(server) {
        // With a zero linger, closing the socket sends RST; the caller drops it next.
        let _ = stream.set_zero_linger();
    }
}

/// Copies one direction until end of stream, which it passes on as a half-close.
async fn pump(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>, shared: &Shared) -> io::Result<()> {
    let (chunks, mut queued) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
    let read = async move {
        let mut buffer = vec![0; CHUNK];
        loop {
            let len = from.read(&mut buffer).await?;
            let release_at = Instant::now() + shared.faults().delay;
            // An empty chunk stands for the end of the stream.
            if chunks
                .send((release_at, buffer[..len].to_vec()))
                .await
                .is_err()
                || len == 0
            {
                return Ok::<_, io::Error>(());
            }
        }
    };
    let write = async move {
        let mut faults = shared.faults.subscribe();
        while let Some((release_at, chunk)) = queued.recv().await {
            tokio::time::sleep_until(release_at).await;
            wait_out_blackhole(&mut faults, shared).await;
            if chunk.is_empty() {
                to.shutdown().await?;
                return Ok(());
            }
            to.write_all(&chunk).await?;
            add(&shared.counters.forwarded, chunk.len() as u64);
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

async fn wait_out_blackhole(faults: &mut watch::Receiver<Faults>, shared: &Shared) {
    if faults.borrow_and_update().blackhole {
        add(&shared.counters.blackholed, 1);
        let _ = faults.wait_for(|faults| !faults.blackhole).await;
    }
}
