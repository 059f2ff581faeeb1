//! The local provider: the operator process itself serves each Service's load balancer, as an
//! in-process L4 proxy on an address of its own.
//!
//! - **Addresses**: one per Service from `local.address_pool` ([`config::DEFAULT_ADDRESS_POOL`]
//!   when missing). `local.requested_address` (the address the Service had) is honoured when it is
//!   in the pool and free; otherwise the first free address from a position derived from the
//!   Service UID, so a Service tends to get its address back after an operator restart anyway.
//!   An address, once given, is kept while it stays in the pool.
//! - **Listeners**: TCP (`tcp.rs`), UDP (`udp.rs`), TCP_UDP (both) on `address:port`. TLS listeners
//!   are not served (a conflict is reported for them). Traffic runs on the provider's own worker
//!   threads (`workers.rs`, [`LocalSettings::workers`]), one single-threaded runtime each, started
//!   with the first listener; health checks and drain timers run on the caller's runtime.
//! - **Target groups** (`group.rs`): IP targets, `random` (default) or `round-robin` among the
//!   healthy ones, all of them when none is healthy (fail open, like an NLB). Health checks
//!   (`health.rs`) take failing targets out and put recovered ones back; every change of a group's
//!   healthy/registered count is sent to [`LocalProvider::health_events`]. New targets start
//!   healthy and are probed at once.
//! - **Changes** converge in place: targets and listeners that stay keep their connections;
//!   a removed target drains (`local.drain_timeout_seconds`, else
//!   [`LocalSettings::drain_timeout`]) and then its connections are closed; a removed listener is
//!   closed with its connections; the empty model closes everything and frees the address.
//! - **Conflicts** (pool exhausted, a port that cannot be bound): everything else is served and
//!   [`ProviderError::Conflict`] names what is not; the next apply tries the missing parts again
//!   (they are missing from [`Observed`], so the plan is not empty).
//!
//! [`Observed`] mirrors the model the provider was last applied with, restricted to what is really
//! served, so planning the same model against it is empty. Security groups (source ranges) are
//! mirrored but not enforced; subnets, tags and the AWS attributes (e.g.
//! `deregistration_delay.timeout_seconds`) are mirrored and otherwise ignored.

pub mod config;
mod error;
mod group;
mod health;
mod tcp;
mod token;
mod udp;
mod workers;

pub use config::{AddressPool, Algorithm};
pub use error::LocalError;

use cloudlb_core::model::{Desired, LoadBalancer, Protocol, ServiceRef};
use cloudlb_core::plan::{Plan, PlanError};
use cloudlb_core::provider::{
    LbState, Observed, ObservedLb, ObservedListener, ObservedSecurityGroup, ObservedTargetGroup,
    Provider, ProviderError,
};
use config::LbSettings;
use group::Group;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;
use token::Token;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

const PROVIDER_NAME: &str = "local";
/// How long closing waits for a listener socket to be released.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Settings of the local provider (the per-Service ones come as `local.*` attributes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSettings {
    /// How long a connection to one target may take before the next target is tried.
    pub connect_timeout: Duration,
    /// How long existing connections to a removed target may go on.
    pub drain_timeout: Duration,
    /// A UDP flow without traffic for this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Threads of the data plane (each a single-threaded runtime accepting on every TCP
    /// listener); 0: one per CPU. Started with the first listener.
    pub workers: usize,
    /// The operator's own TCP listeners (e.g. `--metrics-addr`), named by their flag: a Service
    /// listener that would collide with one is refused with an error naming both, instead of an
    /// `Address already in use` that does not say who holds the port.
    pub reserved: Vec<(SocketAddr, String)>,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            connect_timeout: Duration::from_secs(3),
            drain_timeout: Duration::from_secs(30),
            udp_idle_timeout: Duration::from_secs(60),
            workers: 0,
            reserved: Vec::new(),
        }
    }
}

/// The healthy or registered count of a target group changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: ServiceRef,
    /// The target group's key in the model (`tcp-80`).
    pub target_group: String,
    pub healthy: usize,
    pub total: usize,
}

/// Which target group a listener forwards to; swapped in place when the model changes.
pub(crate) type GroupSlot = Arc<RwLock<Arc<Group>>>;

/// One protocol half of a listener: its accept (one per worker) or receive task.
struct Part {
    token: Token,
    tasks: Vec<JoinHandle<()>>,
}

impl Part {
    fn close(self) -> Vec<JoinHandle<()>> {
        self.token.cancel();
        self.tasks
    }
}

struct ListenerRt {
    slot: GroupSlot,
    tcp: Option<Part>,
    udp: Option<Part>,
}

impl ListenerRt {
    fn close(self) -> impl Iterator<Item = JoinHandle<()>> {
        self.tcp.into_iter().chain(self.udp).flat_map(Part::close)
    }
}

/// Whether `p` needs (tcp, udp) sockets; `None` for what is not served.
fn sockets_for(p: Protocol) -> Option<(bool, bool)> {
    match p {
        Protocol::Tcp => Some((true, false)),
        Protocol::Udp => Some((false, true)),
        Protocol::TcpUdp => Some((true, true)),
        Protocol::Tls => None,
    }
}

/// Everything served for one Service.
struct ServiceLb {
    service: ServiceRef,
    lb_name: String,
    address: Option<IpAddr>,
    /// The model last applied.
    applied: Option<LoadBalancer>,
    listeners: BTreeMap<u16, ListenerRt>,
    groups: BTreeMap<String, Arc<Group>>,
    /// Groups gone from the model whose targets are still draining.
    retired: Vec<Arc<Group>>,
}

impl ServiceLb {
    fn close_listeners(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.listeners)
            .into_values()
            .flat_map(ListenerRt::close)
            .collect()
    }

    fn close(mut self) -> Vec<JoinHandle<()>> {
        let handles = self.close_listeners();
        for g in self.groups.values().chain(&self.retired) {
            g.close();
        }
        handles
    }

    fn observed(&self) -> Observed {
        let (Some(lb), Some(address)) = (&self.applied, self.address) else {
            return Observed::default();
        };
        let uid = &self.service.uid;
        let sg_id = format!("local:{uid}:sg");
        let tg_arn = |key: &str| format!("local:{uid}:tg:{key}");
        let security_groups = lb
            .security
            .frontend
            .as_ref()
            .map(|_| sg_id.clone())
            .into_iter()
            .chain(lb.security.extra_security_groups.iter().cloned())
            .collect();
        let listeners = lb
            .listeners
            .iter()
            .filter(|l| {
                let served = self
                    .listeners
                    .get(&l.port)
                    .map(|rt| (rt.tcp.is_some(), rt.udp.is_some()));
                served.is_some() && served == sockets_for(l.protocol)
            })
            .map(|l| ObservedListener {
                arn: format!("local:{uid}:{}", l.port),
                port: l.port,
                protocol: l.protocol,
                target_group_arn: Some(tg_arn(&l.target_group)),
                certificates: l.certificates.clone(),
                ssl_policy: l.ssl_policy.clone(),
                alpn_policy: l.alpn_policy.clone(),
            })
            .collect();
        let target_groups = lb
            .target_groups
            .iter()
            .filter_map(|tg| {
                let g = self.groups.get(&tg.key)?;
                Some(ObservedTargetGroup {
                    arn: tg_arn(&tg.key),
                    name: tg.name.clone(),
                    protocol: tg.protocol,
                    port: tg.port,
                    target_type: tg.target_type,
                    health_check: tg.health_check.clone(),
                    attributes: tg.attributes.clone(),
                    targets: g.snapshot().iter().map(|t| t.target.clone()).collect(),
                })
            })
            .collect();
        Observed {
            lb: Some(ObservedLb {
                arn: format!("local:{uid}"),
                name: self.lb_name.clone(),
                scheme: lb.scheme,
                ip_address_type: lb.ip_address_type,
                dns_name: address.to_string(),
                state: LbState::Active,
                security_groups,
                attributes: lb.attributes.clone(),
            }),
            listeners,
            target_groups,
            security_group: lb
                .security
                .frontend
                .as_ref()
                .map(|f| ObservedSecurityGroup {
                    id: sg_id,
                    name: f.name.clone(),
                    ingress: f.ingress.clone(),
                }),
        }
    }
}

#[derive(Default)]
struct State {
    /// By Service UID.
    services: BTreeMap<String, ServiceLb>,
    /// The data plane's threads, started with the first listener.
    workers: Option<Arc<workers::Workers>>,
    shut_down: bool,
}

/// Serves load balancers in this process; see the module docs.
pub struct LocalProvider {
    settings: LocalSettings,
    state: Mutex<State>,
    events: broadcast::Sender<HealthEvent>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    pub fn new(settings: LocalSettings) -> Self {
        let (events, _) = broadcast::channel(1024);
        LocalProvider {
            settings,
            state: Mutex::new(State::default()),
            events,
        }
    }

    pub fn settings(&self) -> &LocalSettings {
        &self.settings
    }

    /// Changes of the healthy/registered count of every target group, e.g. to publish an Event
    /// when a group has no healthy target. A slow receiver misses events (`Lagged`).
    pub fn health_events(&self) -> broadcast::Receiver<HealthEvent> {
        self.events.subscribe()
    }

    /// Closes every listener and connection, stops health checks and frees every address; waits
    /// until the listening sockets are closed. Later applies fail.
    pub async fn shutdown(&self) {
        let handles = self.close_all();
        join_closed(handles).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close_all(&self) -> Vec<JoinHandle<()>> {
        let mut state = self.lock();
        state.shut_down = true;
        let handles = std::mem::take(&mut state.services)
            .into_values()
            .flat_map(ServiceLb::close)
            .collect();
        // Stops the worker threads (once the listener tasks holding them are gone).
        state.workers = None;
        handles
    }

    fn workers(&self, state: &mut State) -> Result<Arc<workers::Workers>, ProviderError> {
        if let Some(w) = &state.workers {
            return Ok(w.clone());
        }
        let n = match self.settings.workers {
            0 => workers::default_count(),
            n => n,
        };
        let w = Arc::new(workers::Workers::start(n).map_err(|e| ProviderError::Api {
            operation: "local: start worker threads",
            message: e.to_string(),
            throttled: false,
        })?);
        state.workers = Some(w.clone());
        Ok(w)
    }

    /// Makes what is served for `desired.service` equal to `desired`, as far as possible.
    /// Synchronous (binding is); returns the tasks of closed listeners to wait for.
    fn converge(
        &self,
        desired: &Desired,
    ) -> (Result<Observed, ProviderError>, Vec<JoinHandle<()>>) {
        let mut closing = Vec::new();
        let mut state = self.lock();
        if state.shut_down {
            return (Err(LocalError::ShutDown.into()), closing);
        }
        let uid = desired.service.uid.clone();
        let Some(lb) = &desired.lb else {
            if let Some(svc) = state.services.remove(&uid) {
                tracing::info!(service = %desired.service, address = ?svc.address, "load balancer removed: listeners closed, address released");
                closing.extend(svc.close());
            }
            return (Ok(Observed::default()), closing);
        };
        let settings = match LbSettings::parse(
            &desired.service,
            &lb.attributes,
            self.settings.drain_timeout,
        ) {
            Ok(s) => s,
            Err(e) => return (Err(e.into()), closing),
        };
        let workers = match self.workers(&mut state) {
            Ok(w) => w,
            Err(e) => return (Err(e), closing),
        };
        let taken: BTreeSet<IpAddr> = state
            .services
            .iter()
            .filter(|(u, _)| **u != uid)
            .filter_map(|(_, s)| s.address)
            .collect();
        let svc = state
            .services
            .entry(uid.clone())
            .or_insert_with(|| ServiceLb {
                service: desired.service.clone(),
                lb_name: desired.lb_name.clone(),
                address: None,
                applied: None,
                listeners: BTreeMap::new(),
                groups: BTreeMap::new(),
                retired: Vec::new(),
            });
        svc.service = desired.service.clone();
        svc.lb_name = desired.lb_name.clone();
        let mut errors = Vec::new();

        // 1. The address.
        if let Some(a) = svc.address.filter(|a| !settings.pool.contains(*a)) {
            tracing::info!(service = %desired.service, address = %a, pool = settings.pool.spec(), "address no longer in the pool: moving");
            closing.extend(svc.close_listeners());
            svc.address = None;
        }
        if svc.address.is_none() {
            svc.address = settings
                .pool
                .allocate(settings.requested, &uid, taken.len(), |ip| {
                    taken.contains(&ip)
                });
            match (svc.address, settings.requested) {
                (Some(a), Some(r)) if a != r => {
                    tracing::warn!(service = %desired.service, requested = %r, address = %a, "requested address not in the pool or taken: allocated another");
                }
                (Some(a), _) => {
                    tracing::info!(service = %desired.service, address = %a, "address allocated");
                }
                (None, _) => {}
            }
        }
        let Some(address) = svc.address else {
            svc.applied = Some(lb.clone());
            let e = LocalError::PoolExhausted {
                service: desired.service.to_string(),
                pool: settings.pool.spec().to_string(),
                in_use: taken.len(),
            };
            tracing::warn!(error = %e, "not served");
            return (Err(e.into()), closing);
        };

        // 2. Target groups, by key: targets, health check, algorithm.
        for tg in &lb.target_groups {
            let group = match svc.groups.get(&tg.key) {
                Some(g) => g.clone(),
                None => {
                    // Back from the dead (still draining)? Take it back.
                    let g = match svc.retired.iter().position(|g| g.key == tg.key) {
                        Some(i) => svc.retired.swap_remove(i),
                        None => Arc::new(Group::new(
                            desired.service.clone(),
                            tg.key.clone(),
                            self.events.clone(),
                        )),
                    };
                    svc.groups.insert(tg.key.clone(), g.clone());
                    g
                }
            };
            group.set_algorithm(settings.algorithm);
            let mut want = Vec::with_capacity(tg.targets.len());
            for t in &tg.targets {
                match t.id.parse::<IpAddr>() {
                    Ok(ip) => want.push((t.clone(), SocketAddr::new(ip, t.port))),
                    Err(_) => errors.push(LocalError::InvalidTarget {
                        service: desired.service.to_string(),
                        group: tg.key.clone(),
                        target: t.id.clone(),
                    }),
                }
            }
            group.set_targets(&want, settings.drain_timeout);
            group.set_health_check(&tg.health_check);
        }
        let gone: Vec<String> = svc
            .groups
            .keys()
            .filter(|k| !lb.target_groups.iter().any(|t| &t.key == *k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(g) = svc.groups.remove(&key) {
                g.retire(settings.drain_timeout);
                svc.retired.push(g);
            }
        }
        svc.retired.retain(|g| g.is_draining());

        // 3. Listeners, by port.
        let unwanted: Vec<u16> = svc
            .listeners
            .keys()
            .filter(|p| !lb.listeners.iter().any(|l| l.port == **p))
            .copied()
            .collect();
        for port in unwanted {
            if let Some(rt) = svc.listeners.remove(&port) {
                tracing::info!(service = %desired.service, %address, port, "listener removed");
                closing.extend(rt.close());
            }
        }
        for l in &lb.listeners {
            let group = svc.groups.get(&l.target_group).cloned();
            let (sockets, group) = match (sockets_for(l.protocol), group) {
                (Some(s), Some(g)) => (s, g),
                (None, _) => {
                    errors.push(LocalError::Unsupported {
                        service: desired.service.to_string(),
                        port: l.port,
                        protocol: l.protocol.as_aws(),
                        reason: "TLS termination is not supported; use TCP",
                    });
                    closing.extend(
                        svc.listeners
                            .remove(&l.port)
                            .into_iter()
                            .flat_map(ListenerRt::close),
                    );
                    continue;
                }
                (_, None) => {
                    errors.push(LocalError::MissingGroup {
                        service: desired.service.to_string(),
                        port: l.port,
                        group: l.target_group.clone(),
                    });
                    closing.extend(
                        svc.listeners
                            .remove(&l.port)
                            .into_iter()
                            .flat_map(ListenerRt::close),
                    );
                    continue;
                }
            };
            let rt = svc.listeners.entry(l.port).or_insert_with(|| ListenerRt {
                slot: Arc::new(RwLock::new(group.clone())),
                tcp: None,
                udp: None,
            });
            {
                let mut slot = rt.slot.write().unwrap_or_else(PoisonError::into_inner);
                if !Arc::ptr_eq(&slot, &group) {
                    *slot = group.clone();
                }
            }
            let addr = SocketAddr::new(address, l.port);
            let (want_tcp, want_udp) = sockets;
            if !want_tcp {
                closing.extend(rt.tcp.take().into_iter().flat_map(Part::close));
            } else if rt.tcp.is_none() {
                if let Some((held, owner)) = reserved_clash(&self.settings.reserved, addr) {
                    errors.push(LocalError::OwnListener {
                        service: desired.service.to_string(),
                        address: addr,
                        held: *held,
                        owner: owner.clone(),
                    });
                } else {
                    match tcp::bind(addr).and_then(|l| {
                        start_tcp(&workers, l, &rt.slot, self.settings.connect_timeout)
                    }) {
                        Ok(part) => {
                            rt.tcp = Some(part);
                            tracing::info!(service = %desired.service, %addr, "listening (tcp)");
                        }
                        Err(source) => errors.push(LocalError::Bind {
                            service: desired.service.to_string(),
                            address: addr,
                            protocol: "TCP",
                            source,
                        }),
                    }
                }
            }
            if !want_udp {
                closing.extend(rt.udp.take().into_iter().flat_map(Part::close));
            } else if rt.udp.is_none() {
                match udp::bind(addr).and_then(|socket| {
                    start_udp(&workers, socket, &rt.slot, self.settings.udp_idle_timeout)
                }) {
                    Ok(part) => {
                        rt.udp = Some(part);
                        tracing::info!(service = %desired.service, %addr, "listening (udp)");
                    }
                    Err(source) => errors.push(LocalError::Bind {
                        service: desired.service.to_string(),
                        address: addr,
                        protocol: "UDP",
                        source,
                    }),
                }
            }
            if rt.tcp.is_none() && rt.udp.is_none() {
                svc.listeners.remove(&l.port);
            }
        }

        svc.applied = Some(lb.clone());
        let observed = svc.observed();
        match error::combine(errors) {
            None => (Ok(observed), closing),
            Some(e) => {
                tracing::warn!(service = %desired.service, error = %e, "load balancer partly served");
                (Err(e), closing)
            }
        }
    }
}

/// The operator's own listener that a TCP listener on `addr` would collide with: the same port
/// on the same address, or on any address when either side is a wildcard.
fn reserved_clash(
    reserved: &[(SocketAddr, String)],
    addr: SocketAddr,
) -> Option<&(SocketAddr, String)> {
    reserved.iter().find(|(held, _)| {
        held.port() == addr.port()
            && (held.ip() == addr.ip() || held.ip().is_unspecified() || addr.ip().is_unspecified())
    })
}

/// Accepts on `listener` in every worker (each on its own duplicate of the socket).
fn start_tcp(
    workers: &workers::Workers,
    listener: std::net::TcpListener,
    slot: &GroupSlot,
    connect_timeout: Duration,
) -> std::io::Result<Part> {
    let token = Token::default();
    let mut tasks = Vec::new();
    let pool = workers.pool();
    let mut started = || -> std::io::Result<()> {
        for me in 0..pool.len() {
            let handle = pool.handle(me);
            let dup = listener.try_clone()?;
            let registered = {
                let _in_worker = handle.enter();
                tokio::net::TcpListener::from_std(dup)?
            };
            tasks.push(handle.spawn(tcp::serve(
                registered,
                me,
                pool.clone(),
                slot.clone(),
                token.clone(),
                connect_timeout,
            )));
        }
        Ok(())
    };
    match started() {
        Ok(()) => Ok(Part { token, tasks }),
        Err(e) => {
            token.cancel();
            Err(e)
        }
    }
}

/// Receives on `socket` in one worker.
fn start_udp(
    workers: &workers::Workers,
    socket: std::net::UdpSocket,
    slot: &GroupSlot,
    idle_timeout: Duration,
) -> std::io::Result<Part> {
    let token = Token::default();
    let pool = workers.pool();
    let handle = pool.handle(pool.next());
    let registered = {
        let _in_worker = handle.enter();
        tokio::net::UdpSocket::from_std(socket)?
    };
    let task = handle.spawn(udp::serve(
        registered,
        slot.clone(),
        token.clone(),
        idle_timeout,
    ));
    Ok(Part {
        token,
        tasks: vec![task],
    })
}

/// Waits (bounded) until closed listeners have released their sockets.
async fn join_closed(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        if tokio::time::timeout(CLOSE_WAIT, h).await.is_err() {
            tracing::warn!("a closed listener did not stop within {CLOSE_WAIT:?}");
        }
    }
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        for h in self.close_all() {
            h.abort();
        }
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        PROVIDER_NAME
    }

    fn plan(&self, desired: &Desired, observed: &Observed) -> Result<Plan, PlanError> {
        cloudlb_core::plan::plan(desired, observed)
    }

    async fn observe(&self, desired: &Desired) -> Result<Observed, ProviderError> {
        Ok(self
            .lock()
            .services
            .get(&desired.service.uid)
            .map(ServiceLb::observed)
            .unwrap_or_default())
    }

    /// Converges to `desired` directly (the plan's operations are not needed in-process); the
    /// result is what [`Provider::observe`] returns next.
    async fn apply(
        &self,
        desired: &Desired,
        _observed: &Observed,
        _plan: &Plan,
    ) -> Result<Observed, ProviderError> {
        let (result, closing) = self.converge(desired);
        join_closed(closing).await;
        result
    }

    async fn owned(&self) -> Result<Vec<(ServiceRef, Observed)>, ProviderError> {
        let mut owned: Vec<_> = self
            .lock()
            .services
            .values()
            .filter(|s| s.address.is_some())
            .map(|s| (s.service.clone(), s.observed()))
            .collect();
        owned.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(owned)
    }
}

#[cfg(test)]
mod tests {
    use super::reserved_clash;
    use std::net::SocketAddr;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_service_port_clashes_with_the_operators_listener_only_where_linux_would_refuse_it() {
        let wildcard = vec![(addr("0.0.0.0:8080"), "--metrics-addr".to_string())];
        let loopback = vec![(addr("127.0.0.1:8080"), "--metrics-addr".to_string())];
        let clash = |reserved: &[(SocketAddr, String)], a: &str| {
            reserved_clash(reserved, addr(a)).map(|(held, owner)| format!("{owner} {held}"))
        };
        assert_eq!(
            clash(&wildcard, "127.0.1.5:8080").as_deref(),
            Some("--metrics-addr 0.0.0.0:8080"),
            "a wildcard holds the port on every address"
        );
        assert_eq!(clash(&wildcard, "127.0.1.5:8081"), None, "other port");
        assert_eq!(clash(&loopback, "127.0.1.5:8080"), None, "other address");
        assert_eq!(
            clash(&loopback, "127.0.0.1:8080").as_deref(),
            Some("--metrics-addr 127.0.0.1:8080"),
            "same address and port"
        );
        assert_eq!(
            clash(&loopback, "0.0.0.0:8080").as_deref(),
            Some("--metrics-addr 127.0.0.1:8080"),
            "a wildcard Service listener needs every address"
        );
    }
}
