//! What the local provider serves for one Service ([`ServiceLb`]), what it reports of it
//! ([`ServiceLb::observed`]), and how each operation of a plan changes it
//! ([`ServiceLb::execute`]).

use super::error::LocalError;
use super::group::{Group, GroupSlot, HealthEvent, Mirror};
use super::plan::{listener_id, served_protocol, sockets_for};
use super::settings::LocalSettings;
use super::token::Token;
use super::workers::Workers;
use super::{pool, tcp, udp};
use cloudlb_core::model::{
    Desired, IpAddressType, Listener, LoadBalancer, LocalSpec, Scheme, ServiceRef, Target,
    TargetGroup, TargetType,
};
use cloudlb_core::plan::Op;
use cloudlb_core::provider::{
    LbState, Observed, ObservedLb, ObservedListener, ObservedTargetGroup,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

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

    fn group_key(&self) -> String {
        self.slot
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .key
            .clone()
    }
}

/// The load balancer proper: an address taken from the pool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Address {
    pub ip: IpAddr,
    /// Mirrored from the model the address was taken for (the local provider has neither).
    scheme: Scheme,
    ip_address_type: IpAddressType,
}

/// Everything served for one Service.
pub(crate) struct ServiceLb {
    pub service: ServiceRef,
    lb_name: String,
    pub address: Option<Address>,
    listeners: BTreeMap<u16, ListenerRt>,
    groups: BTreeMap<String, Arc<Group>>,
    /// Groups gone from the model whose targets are still draining.
    retired: Vec<Arc<Group>>,
}

/// What executing one plan needs besides the Service's own state.
pub(crate) struct Ctx<'a> {
    pub desired: &'a Desired,
    pub spec: &'a LocalSpec,
    pub settings: &'a LocalSettings,
    pub workers: Option<&'a Workers>,
    pub events: &'a broadcast::Sender<HealthEvent>,
    /// Addresses other Services hold.
    pub taken: &'a BTreeSet<IpAddr>,
}

impl Ctx<'_> {
    fn service(&self) -> String {
        self.desired.service.to_string()
    }

    fn lb(&self) -> Option<&LoadBalancer> {
        self.desired.lb.as_ref()
    }

    fn target_group(&self, key: &str) -> Result<&TargetGroup, LocalError> {
        self.lb()
            .and_then(|lb| lb.target_groups.iter().find(|t| t.key == key))
            .ok_or_else(|| self.mismatch(format!("target group {key} is not in the model")))
    }

    fn listener(&self, port: u16) -> Result<&Listener, LocalError> {
        self.lb()
            .and_then(|lb| lb.listeners.iter().find(|l| l.port == port))
            .ok_or_else(|| self.mismatch(format!("listener {port} is not in the model")))
    }

    fn drain(&self) -> Duration {
        Duration::from_secs(u64::from(self.spec.drain_timeout_seconds))
    }

    fn mismatch(&self, reason: String) -> LocalError {
        LocalError::PlanMismatch {
            service: self.service(),
            reason,
        }
    }
}

impl ServiceLb {
    pub fn new(service: ServiceRef, lb_name: String) -> Self {
        ServiceLb {
            service,
            lb_name,
            address: None,
            listeners: BTreeMap::new(),
            groups: BTreeMap::new(),
            retired: Vec::new(),
        }
    }

    pub fn set_names(&mut self, service: &ServiceRef, lb_name: &str) {
        self.service = service.clone();
        self.lb_name = lb_name.to_string();
    }

    /// Nothing served, nothing draining: the entry can go.
    pub fn is_idle(&self) -> bool {
        self.address.is_none()
            && self.listeners.is_empty()
            && self.groups.is_empty()
            && self.retired.is_empty()
    }

    /// Whether anything of it shows in [`ServiceLb::observed`].
    pub fn is_observable(&self) -> bool {
        self.address.is_some() || !self.groups.is_empty()
    }

    fn close_listeners(&mut self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut self.listeners)
            .into_values()
            .flat_map(ListenerRt::close)
            .collect()
    }

    /// Ends everything at once: listeners, connections, health checks, drains.
    pub fn close(mut self) -> Vec<JoinHandle<()>> {
        let handles = self.close_listeners();
        for g in self.groups.values().chain(&self.retired) {
            g.close();
        }
        handles
    }

    /// What is served, in the local provider's ids (see `cloudlb_core::model::observed`): no
    /// security group, no attributes.
    pub fn observed(&self) -> Observed {
        let lb = self.address.map(|a| ObservedLb {
            arn: a.ip.to_string(),
            name: self.lb_name.clone(),
            scheme: a.scheme,
            ip_address_type: a.ip_address_type,
            dns_name: a.ip.to_string(),
            state: LbState::Active,
            security_groups: Vec::new(),
            attributes: BTreeMap::new(),
            attributes_unread: false,
            subnets: vec![],
            subnet_zones: BTreeMap::new(),
            ipv6_source_nat: None,
            tags: BTreeMap::new(),
        });
        let listeners = match self.address {
            None => Vec::new(),
            Some(a) => self
                .listeners
                .iter()
                .filter_map(|(port, rt)| {
                    let protocol = served_protocol(rt.tcp.is_some(), rt.udp.is_some())?;
                    Some(ObservedListener {
                        arn: listener_id(a.ip, *port, protocol),
                        port: *port,
                        protocol,
                        target_group_arn: Some(rt.group_key()),
                        certificates: Vec::new(),
                        ssl_policy: None,
                        alpn_policy: None,
                        attributes: BTreeMap::new(),
                        tags: BTreeMap::new(),
                    })
                })
                .collect(),
        };
        let target_groups = self
            .groups
            .iter()
            .filter_map(|(key, g)| {
                let mirror = g.mirror();
                Some(ObservedTargetGroup {
                    arn: key.clone(),
                    name: mirror.name,
                    protocol: mirror.protocol,
                    port: mirror.port,
                    target_type: TargetType::Ip,
                    health_check: g.health_check()?,
                    attributes: BTreeMap::new(),
                    targets: g.snapshot().iter().map(|t| t.target.clone()).collect(),
                    algorithm: Some(g.algorithm()),
                    tags: BTreeMap::new(),
                })
            })
            .collect();
        Observed {
            lb,
            listeners,
            target_groups,
            ..Observed::default()
        }
    }

    /// Executes `op`. `Err` for what could not be done; the caller goes on with the next
    /// operation unless the error is [`LocalError::PoolExhausted`] (nothing can be served
    /// without an address). Sockets of closed listeners are added to `closing`.
    pub fn execute(
        &mut self,
        op: &Op,
        ctx: &Ctx<'_>,
        closing: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), Vec<LocalError>> {
        match op {
            Op::RegisterTargets { key, targets } => self.register(key, targets, ctx),
            Op::CreateListener { port } | Op::ModifyListener { port, .. } => {
                self.ensure_listener(*port, ctx, closing)
            }
            op => self.execute_one(op, ctx, closing).map_err(|e| vec![e]),
        }
    }

    /// The operations that fail with one error at most.
    fn execute_one(
        &mut self,
        op: &Op,
        ctx: &Ctx<'_>,
        closing: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), LocalError> {
        match op {
            Op::CreateLoadBalancer => self.take_address(ctx),
            Op::DeleteLoadBalancer { reason, .. } => {
                if let Some(a) = self.address.take() {
                    tracing::info!(service = %ctx.desired.service, address = %a.ip, %reason, "address released, listeners closed");
                }
                closing.extend(self.close_listeners());
                Ok(())
            }
            Op::CreateTargetGroup { key } => self.create_group(key, ctx),
            Op::ModifyHealthCheck { key } => {
                let check = &ctx.target_group(key)?.health_check;
                self.group(key, ctx)?.set_health_check(check);
                Ok(())
            }
            Op::SetAlgorithm { key, algorithm } => {
                self.group(key, ctx)?.set_algorithm(*algorithm);
                Ok(())
            }
            Op::DeregisterTargets { key, targets } => {
                self.group(key, ctx)?.deregister(targets, ctx.drain());
                Ok(())
            }
            Op::DeleteListener { port, .. } => {
                if let Some(rt) = self.listeners.remove(port) {
                    tracing::info!(service = %ctx.desired.service, port, "listener removed");
                    closing.extend(rt.close());
                }
                Ok(())
            }
            Op::DeleteTargetGroup { arn, .. } => {
                if let Some(g) = self.groups.remove(arn) {
                    if ctx.lb().is_some() {
                        g.retire(ctx.drain());
                        self.retired.push(g);
                    } else {
                        // The Service is gone: nothing left to drain for.
                        g.close();
                    }
                }
                Ok(())
            }
            other => Err(LocalError::NotLocal {
                op: format!("{other:?}"),
            }),
        }
    }

    /// After a plan: forgets retired groups that are done draining; for the empty model, ends
    /// the ones still draining too.
    pub fn finish(&mut self, ctx: &Ctx<'_>) {
        if ctx.lb().is_none() {
            for g in self.retired.drain(..) {
                g.close();
            }
        }
        self.retired.retain(|g| g.is_draining());
    }

    fn take_address(&mut self, ctx: &Ctx<'_>) -> Result<(), LocalError> {
        if self.address.is_some() {
            return Ok(());
        }
        let (scheme, ip_address_type) = ctx
            .lb()
            .map_or((Scheme::Internal, IpAddressType::Ipv4), |lb| {
                (lb.scheme, lb.ip_address_type)
            });
        let requested = ctx.spec.requested_address;
        let pool = &ctx.spec.address_pool;
        let Some(ip) = pool::allocate(
            pool,
            requested,
            &ctx.desired.service.uid,
            ctx.taken.len(),
            |ip| ctx.taken.contains(&ip),
        ) else {
            return Err(LocalError::PoolExhausted {
                service: ctx.service(),
                pool: pool.to_string(),
                in_use: ctx.taken.len(),
            });
        };
        match requested {
            Some(r) if r != ip => {
                tracing::warn!(service = %ctx.desired.service, requested = %r, address = %ip, "requested address not in the pool or taken: allocated another");
            }
            _ => tracing::info!(service = %ctx.desired.service, address = %ip, "address allocated"),
        }
        self.address = Some(Address {
            ip,
            scheme,
            ip_address_type,
        });
        Ok(())
    }

    fn group(&self, key: &str, ctx: &Ctx<'_>) -> Result<&Arc<Group>, LocalError> {
        self.groups
            .get(key)
            .ok_or_else(|| ctx.mismatch(format!("target group {key} is not served")))
    }

    fn create_group(&mut self, key: &str, ctx: &Ctx<'_>) -> Result<(), LocalError> {
        let tg = ctx.target_group(key)?;
        let mirror = Mirror {
            name: tg.name.clone(),
            protocol: tg.protocol,
            port: tg.port,
        };
        let group = match self.groups.get(key) {
            Some(g) => g.clone(),
            None => {
                // Back from the dead (still draining)? Take it back: its draining targets are
                // revived when registered again.
                let g = match self.retired.iter().position(|g| g.key == key) {
                    Some(i) => self.retired.swap_remove(i),
                    None => Arc::new(Group::new(
                        ctx.desired.service.clone(),
                        key.to_string(),
                        mirror.clone(),
                        ctx.events.clone(),
                    )),
                };
                self.groups.insert(key.to_string(), g.clone());
                g
            }
        };
        group.set_mirror(mirror);
        group.set_algorithm(ctx.spec.algorithm);
        group.set_health_check(&tg.health_check);
        Ok(())
    }

    fn register(
        &mut self,
        key: &str,
        targets: &[Target],
        ctx: &Ctx<'_>,
    ) -> Result<(), Vec<LocalError>> {
        let mut errors = Vec::new();
        let mut valid = Vec::with_capacity(targets.len());
        for t in targets {
            match t.id.parse::<IpAddr>() {
                Ok(ip) => valid.push((t.clone(), SocketAddr::new(ip, t.port))),
                Err(_) => errors.push(LocalError::InvalidTarget {
                    service: ctx.service(),
                    group: key.to_string(),
                    target: t.id.clone(),
                }),
            }
        }
        match self.groups.get(key) {
            Some(g) => g.register(&valid),
            None => errors.push(ctx.mismatch(format!("target group {key} is not served"))),
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Creates or modifies the listener on `port` as the model has it: its sockets (TCP, UDP or
    /// both) on the address, forwarding to its target group. What cannot be served is closed and
    /// reported.
    /// A listener that cannot be served (TLS, or its target group is missing): what is open on
    /// the port closes, and the error says why.
    fn unservable(
        &mut self,
        port: u16,
        l: &Listener,
        tls: bool,
        ctx: &Ctx<'_>,
        closing: &mut Vec<JoinHandle<()>>,
    ) -> LocalError {
        closing.extend(
            self.listeners
                .remove(&port)
                .into_iter()
                .flat_map(ListenerRt::close),
        );
        if tls {
            LocalError::Unsupported {
                service: ctx.service(),
                port,
                protocol: l.protocol.as_aws(),
                reason: "TLS termination is not supported; use TCP",
            }
        } else {
            LocalError::MissingGroup {
                service: ctx.service(),
                port,
                group: l.target_group.clone(),
            }
        }
    }

    fn ensure_listener(
        &mut self,
        port: u16,
        ctx: &Ctx<'_>,
        closing: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), Vec<LocalError>> {
        let l = ctx.listener(port).map_err(|e| vec![e])?;
        let Some(address) = self.address.map(|a| a.ip) else {
            return Err(vec![ctx.mismatch(format!(
                "listener {port} needs an address, and the load balancer has none"
            ))]);
        };
        let sockets = sockets_for(l.protocol);
        let group = self.groups.get(&l.target_group).cloned();
        let (sockets, group) = match (sockets, group) {
            (Some(s), Some(g)) => (s, g),
            (sockets, _) => {
                return Err(vec![self.unservable(
                    port,
                    l,
                    sockets.is_none(),
                    ctx,
                    closing,
                )]);
            }
        };
        let Some(workers) = ctx.workers else {
            return Err(vec![ctx.mismatch("no worker threads".into())]);
        };
        let settings = ctx.settings;
        let rt = self.listeners.entry(port).or_insert_with(|| ListenerRt {
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
        let addr = SocketAddr::new(address, port);
        let (want_tcp, want_udp) = sockets;
        let bind_error = |protocol, source| LocalError::Bind {
            service: ctx.service(),
            address: addr,
            protocol,
            source,
        };
        let tcp = ensure_part(&mut rt.tcp, want_tcp, closing, || {
            if let Some((held, owner)) = reserved_clash(&settings.reserved, addr) {
                return Err(LocalError::OwnListener {
                    service: ctx.service(),
                    address: addr,
                    held: *held,
                    owner: owner.clone(),
                });
            }
            let part = tcp::bind(addr)
                .and_then(|l| start_tcp(workers, l, &rt.slot, settings.connect_timeout))
                .map_err(|source| bind_error("TCP", source))?;
            tracing::info!(service = %ctx.desired.service, %addr, "listening (tcp)");
            Ok(part)
        });
        let udp = ensure_part(&mut rt.udp, want_udp, closing, || {
            let part = udp::bind(addr)
                .and_then(|socket| start_udp(workers, socket, &rt.slot, settings.udp_idle_timeout))
                .map_err(|source| bind_error("UDP", source))?;
            tracing::info!(service = %ctx.desired.service, %addr, "listening (udp)");
            Ok(part)
        });
        let errors: Vec<_> = tcp.into_iter().chain(udp).collect();
        if rt.tcp.is_none() && rt.udp.is_none() {
            self.listeners.remove(&port);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// One socket of a listener: closed when it is not `wanted`, started when it is and does not run
/// yet; the error of a start that failed.
fn ensure_part(
    part: &mut Option<Part>,
    wanted: bool,
    closing: &mut Vec<JoinHandle<()>>,
    start: impl FnOnce() -> Result<Part, LocalError>,
) -> Option<LocalError> {
    if !wanted {
        closing.extend(part.take().into_iter().flat_map(Part::close));
    } else if part.is_none() {
        match start() {
            Ok(started) => *part = Some(started),
            Err(e) => return Some(e),
        }
    }
    None
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
    workers: &Workers,
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
            let registered = in_worker(handle, || tokio::net::TcpListener::from_std(dup))?;
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

/// Runs `register` (a `from_std` of a socket) inside worker `handle`'s runtime, so the socket is
/// driven by that worker's I/O reactor.
fn in_worker<T>(
    handle: &tokio::runtime::Handle,
    register: impl FnOnce() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let _in_worker = handle.enter();
    register()
}

/// Receives on `socket` in one worker.
fn start_udp(
    workers: &Workers,
    socket: std::net::UdpSocket,
    slot: &GroupSlot,
    idle_timeout: Duration,
) -> std::io::Result<Part> {
    let token = Token::default();
    let pool = workers.pool();
    let handle = pool.handle(pool.next());
    let registered = in_worker(handle, || tokio::net::UdpSocket::from_std(socket))?;
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
