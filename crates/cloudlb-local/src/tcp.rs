//! TCP listeners: accept, pick a healthy target (another one when the connect fails or times
//! out), then relay both directions with bounded buffers until both are done. EOF on one side
//! shuts down the write half of the other (half-close), so request/response protocols that close
//! their sending side early still get the whole answer.

use super::group::{Group, GroupSlot};
use super::token::Token;
use super::workers::{LoadGuard, Pool};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Per-direction relay buffer: bounds memory per connection (back-pressure: a slow reader stops
/// the reads from the other side).
const RELAY_BUFFER: usize = 16 * 1024;
/// Targets tried per connection before giving up.
const MAX_CONNECT_ATTEMPTS: usize = 3;
const BACKLOG: u32 = 1024;

/// Binds and listens on `addr` (SO_REUSEADDR, so a port freed a moment ago can be bound again at
/// once; a port another socket listens on still fails with "address in use"). The socket is
/// returned unregistered, for each worker to register a duplicate of it.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// The accept loop of one listener on worker `me`; returns (closing this duplicate of the
/// socket) when `token` is cancelled. Each connection goes to the least loaded worker.
pub(crate) async fn serve(
    listener: TcpListener,
    me: usize,
    pool: Arc<Pool>,
    slot: GroupSlot,
    token: Token,
    connect_timeout: Duration,
) {
    let cancelled = token.cancelled();
    tokio::pin!(cancelled);
    loop {
        let Some(accepted) = cancelled.as_mut().race(listener.accept()).await else {
            break;
        };
        let (client, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off a little instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let group = slot.read().unwrap_or_else(PoisonError::into_inner).clone();
        let worker = pool.least_loaded(me);
        let load = pool.track(worker);
        let token = token.clone();
        if worker == me {
            tokio::spawn(handle(client, peer, group, token, connect_timeout, load));
            continue;
        }
        // Hand over: leave this worker's reactor, join the other one's.
        match client.into_std() {
            Ok(std_stream) => {
                pool.handle(worker).spawn(async move {
                    match TcpStream::from_std(std_stream) {
                        Ok(client) => {
                            handle(client, peer, group, token, connect_timeout, load).await;
                        }
                        Err(e) => tracing::warn!(client = %peer, error = %e, "hand-over failed"),
                    }
                });
            }
            Err(e) => tracing::warn!(client = %peer, error = %e, "hand-over failed"),
        }
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    group: Arc<Group>,
    listener_token: Token,
    connect_timeout: Duration,
    _load: LoadGuard,
) {
    let _ = client.set_nodelay(true);
    let connect = async {
        let snap = group.snapshot();
        let mut tried = Vec::new();
        while tried.len() < MAX_CONNECT_ATTEMPTS {
            let i = group.pick(&snap, &tried)?;
            tried.push(i);
            let t = &snap[i];
            match tokio::time::timeout(connect_timeout, TcpStream::connect(t.addr)).await {
                Ok(Ok(s)) => return Some((s, t.clone())),
                Ok(Err(e)) => {
                    tracing::debug!(service = %group.service, target = %t.addr, error = %e, "connect failed; trying another target");
                }
                Err(_) => {
                    tracing::debug!(service = %group.service, target = %t.addr, "connect timed out; trying another target");
                }
            }
        }
        None
    };
    let picked = tokio::select! {
        () = listener_token.cancelled() => return,
        p = connect => p,
    };
    let Some((mut upstream, target)) = picked else {
        tracing::warn!(service = %group.service, group = %group.key, client = %peer, "no target accepted the connection");
        return;
    };
    let _ = upstream.set_nodelay(true);
    let _active = target.track();
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut upstream, RELAY_BUFFER, RELAY_BUFFER) => {
            if let Err(e) = r {
                tracing::trace!(client = %peer, target = %target.addr, error = %e, "connection ended with an error");
            }
        }
        () = listener_token.cancelled() => {}
        () = target.kill.cancelled() => {
            tracing::debug!(client = %peer, target = %target.addr, "connection closed: target drained");
        }
    }
}
