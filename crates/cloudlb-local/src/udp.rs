//! UDP listeners: one flow per client address, each with its own socket connected to the target
//! it picked; datagrams from the target go back to that client from the listener socket. A flow
//! ends after `idle_timeout` without traffic either way, when its target is drained, or when the
//! target refuses (ICMP port unreachable), so the client's next datagram picks again.

use super::group::GroupSlot;
use super::target::TargetState;
use super::token::Token;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

const MAX_DATAGRAM: usize = 65_536;

/// Binds `addr` (no SO_REUSEADDR: a port in use must fail); unregistered, for a worker to take.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

struct Flow {
    id: u64,
    upstream: Arc<UdpSocket>,
    target: Arc<TargetState>,
    last: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

fn lock(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Flow>> {
    flows.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Milliseconds since `epoch`.
fn now_ms(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The receive loop of one listener; when `token` is cancelled it ends every flow and returns,
/// so the socket is closed once this future is done.
pub(crate) async fn serve(
    socket: UdpSocket,
    slot: GroupSlot,
    token: Token,
    idle_timeout: Duration,
) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    let epoch = Instant::now();
    let mut next_id = 0u64;
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let cancelled = token.cancelled();
    tokio::pin!(cancelled);
    loop {
        let Some(received) = cancelled.as_mut().race(socket.recv_from(&mut buf)).await else {
            break;
        };
        let (n, client) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let existing = lock(&flows).get(&client).and_then(|f| {
            (!f.task.is_finished() && !f.target.kill.is_cancelled())
                .then(|| (f.upstream.clone(), f.last.clone()))
        });
        let (upstream, last) = match existing {
            Some(x) => x,
            None => {
                next_id += 1;
                let Some(flow) = open_flow(
                    next_id,
                    &socket,
                    client,
                    &slot,
                    &token,
                    idle_timeout,
                    epoch,
                    Arc::downgrade(&flows),
                ) else {
                    continue;
                };
                let handles = (flow.upstream.clone(), flow.last.clone());
                if let Some(old) = lock(&flows).insert(client, flow) {
                    old.task.abort();
                }
                handles
            }
        };
        last.store(now_ms(epoch), Ordering::Relaxed);
        // Waits for room in the send buffer (a fresh socket is not known writable yet, so
        // `try_send` would drop its first datagram); the kernel drops what the target cannot take.
        if let Err(e) = upstream.send(&buf[..n]).await {
            tracing::debug!(client = %client, error = %e, "udp send to target failed");
        }
    }
    let open: Vec<Flow> = lock(&flows).drain().map(|(_, f)| f).collect();
    for f in open {
        f.task.abort();
        let _ = f.task.await;
    }
}

#[allow(clippy::too_many_arguments)]
fn open_flow(
    id: u64,
    listener: &Arc<UdpSocket>,
    client: SocketAddr,
    slot: &GroupSlot,
    token: &Token,
    idle_timeout: Duration,
    epoch: Instant,
    flows: Weak<Mutex<HashMap<SocketAddr, Flow>>>,
) -> Option<Flow> {
    let group = slot.read().unwrap_or_else(PoisonError::into_inner).clone();
    let snap = group.snapshot();
    let Some(i) = group.pick(&snap, &[]) else {
        tracing::debug!(service = %group.service, client = %client, "no target for udp flow: datagram dropped");
        return None;
    };
    let target = snap[i].clone();
    let connect = || -> io::Result<UdpSocket> {
        let local: SocketAddr = if target.addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let s = std::net::UdpSocket::bind(local)?;
        s.connect(target.addr)?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    };
    let upstream = match connect() {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::warn!(service = %group.service, target = %target.addr, error = %e, "cannot open udp flow");
            return None;
        }
    };
    let last = Arc::new(AtomicU64::new(now_ms(epoch)));
    let task = tokio::spawn(relay_back(
        id,
        listener.clone(),
        upstream.clone(),
        client,
        target.clone(),
        last.clone(),
        idle_timeout,
        epoch,
        token.clone(),
        flows,
    ));
    Some(Flow {
        id,
        upstream,
        target,
        last,
        task,
    })
}

#[allow(clippy::too_many_arguments)]
async fn relay_back(
    id: u64,
    listener: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    target: Arc<TargetState>,
    last: Arc<AtomicU64>,
    idle_timeout: Duration,
    epoch: Instant,
    token: Token,
    flows: Weak<Mutex<HashMap<SocketAddr, Flow>>>,
) {
    let _active = target.track();
    let idle_ms = u64::try_from(idle_timeout.as_millis()).unwrap_or(u64::MAX);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let stop = async {
        tokio::select! {
            () = token.cancelled() => {}
            () = target.kill.cancelled() => {}
        }
    };
    tokio::pin!(stop);
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        let idle_for = now_ms(epoch).saturating_sub(last.load(Ordering::Relaxed));
        if idle_for >= idle_ms {
            break;
        }
        idle.as_mut()
            .reset(tokio::time::Instant::now() + Duration::from_millis(idle_ms - idle_for));
        tokio::select! {
            r = upstream.recv(&mut buf) => match r {
                Ok(n) => {
                    last.store(now_ms(epoch), Ordering::Relaxed);
                    if let Err(e) = listener.send_to(&buf[..n], client).await {
                        tracing::debug!(client = %client, error = %e, "udp reply to client failed");
                    }
                }
                Err(e) => {
                    tracing::debug!(client = %client, target = %target.addr, error = %e, "udp flow ended by the target");
                    break;
                }
            },
            () = &mut idle => {}
            () = &mut stop => break,
        }
    }
    if let Some(flows) = flows.upgrade() {
        let mut map = lock(&flows);
        if map.get(&client).is_some_and(|f| f.id == id) {
            map.remove(&client);
        }
    }
}
