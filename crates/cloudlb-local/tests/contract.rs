//! The local provider's contract, with real traffic on loopback: no mocks. Every apply goes the
//! controller's way (observe, the provider's own plan, apply) and is checked: apply returns what
//! observe reports next, the re-plan is empty, and nothing AWS-shaped is reported.
//!
//! Every test has its own addresses so they run in parallel: test `N` takes its load-balancer
//! pool from `127.0.N.0/24` and starts its backends ("nodes") on `127.1.N.k` at a fixed
//! nodePort-like port.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use cloudlb_core::model::{
    AddressPool, Algorithm, Desired, FrontendSecurityGroup, HealthCheck, IngressRule, LocalSpec,
    Protocol, ServiceRef, Target,
};
use cloudlb_core::plan::{Op, Plan};
use cloudlb_core::provider::{Observed, Provider, ProviderError};
use cloudlb_local::{HealthEvent, LocalProvider, LocalSettings};
use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

#[path = "support/fixtures.rs"]
mod fixtures;
use fixtures::{listener, local_lb, svc, target_group, tcp_check};

const NODE_PORT: u16 = 30080;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Backends

/// A TCP "node": answers each `ping` line with `<name> ping`; `bulk N` lines add N bytes it sends
/// once the client has shut down its side, then it closes.
struct TcpBackend {
    name: String,
    task: JoinHandle<()>,
}

impl TcpBackend {
    async fn start(name: &str, addr: SocketAddr) -> Self {
        let listener = bind_retrying(addr).await;
        let name = name.to_string();
        let n = name.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve_line_conn(n.clone(), stream));
            }
        });
        TcpBackend { name, task }
    }

    /// Stops listening (new connects are refused); open connections go on.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn bind_retrying(addr: SocketAddr) -> TcpListener {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("bind backend {addr}: {e}"),
        }
    }
}

async fn serve_line_conn(name: String, stream: TcpStream) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut bulk: usize = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(n) = line.strip_prefix("bulk ") {
            bulk += n.trim().parse::<usize>().unwrap_or(0);
        } else if w
            .write_all(format!("{name} {line}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
    // The client shut down its side: now the bulk answer.
    let mut sent = 0;
    let chunk: Vec<u8> = (0..65_536).map(|i| (i % 251) as u8).collect();
    while sent < bulk {
        let n = (bulk - sent).min(chunk.len());
        if w.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        sent += n;
    }
    let _ = w.shutdown().await;
}

/// A UDP "node": answers each datagram with `<name> <datagram>`. With `health_port`, it also
/// accepts TCP on the same port, for the (TCP) health check.
struct UdpBackend {
    tasks: Vec<JoinHandle<()>>,
}

impl UdpBackend {
    async fn start(name: &str, addr: SocketAddr, health_port: bool) -> Self {
        let socket = UdpSocket::bind(addr).await.expect("bind udp backend");
        let name = name.to_string();
        let udp_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let mut reply = format!("{name} ").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        let mut tasks = vec![udp_task];
        if health_port {
            let tcp = bind_retrying(addr).await;
            tasks.push(tokio::spawn(async move {
                loop {
                    let _ = tcp.accept().await;
                }
            }));
        }
        UdpBackend { tasks }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// Sends `ping` on a new connection; returns the name of the backend that answered.
async fn ask(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "connect"))??;
    ping(&mut s).await
}

/// `ping` on an open connection; the answering backend's name.
async fn ping(s: &mut TcpStream) -> std::io::Result<String> {
    s.write_all(b"ping\n").await?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(IO_TIMEOUT, s.read(&mut byte))
            .await
            .map_err(|_| std::io::Error::new(ErrorKind::TimedOut, "read"))??;
        if n == 0 {
            return Err(std::io::Error::new(ErrorKind::UnexpectedEof, "closed"));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8(line).expect("utf8");
    let (name, rest) = line.split_once(' ').expect("`name ping`");
    assert_eq!(rest, "ping");
    Ok(name.to_string())
}

/// `n` new connections; how many each backend answered.
async fn tcp_counts(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let name = ask(addr)
            .await
            .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
        *counts.entry(name).or_insert(0) += 1;
    }
    counts
}

/// `n` UDP clients (one flow each); how many each backend answered.
async fn udp_counts(addr: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    // Every socket stays open until the end: a dropped one's port can be handed out again, and a
    // datagram from the same address and port belongs to the same (still live) flow.
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
        s.connect(addr).await.expect("connect udp");
        let name = udp_ask(&s, &format!("hello {i}")).await;
        *counts.entry(name).or_insert(0) += 1;
        clients.push(s);
    }
    counts
}

async fn udp_ask(s: &UdpSocket, msg: &str) -> String {
    s.send(msg.as_bytes()).await.expect("send");
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(IO_TIMEOUT, s.recv(&mut buf))
        .await
        .expect("udp answer in time")
        .expect("recv");
    let reply = std::str::from_utf8(&buf[..n]).expect("utf8");
    let (name, echoed) = reply.split_once(' ').expect("`name msg`");
    assert_eq!(echoed, msg, "the answer belongs to this client's datagram");
    name.to_string()
}

async fn refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect(addr).await,
        Err(e) if e.kind() == ErrorKind::ConnectionRefused
    )
}

// ---------------------------------------------------------------------------------------------
// Models

/// A model for a local class, by hand: one target group per listener, every node at the node
/// port, the typed local settings; and also the AWS parts an aws class would have (attributes,
/// a frontend security group), which the local provider must ignore.
struct Spec {
    service: ServiceRef,
    local: LocalSpec,
    listeners: Vec<(u16, Protocol)>,
    nodes: Vec<String>,
    node_port: u16,
    check: HealthCheck,
}

impl Spec {
    fn new(name: &str, pool: &str) -> Self {
        Spec {
            service: svc(name),
            local: LocalSpec {
                address_pool: AddressPool::parse(pool).expect("pool"),
                ..LocalSpec::default()
            },
            listeners: vec![(8080, Protocol::Tcp)],
            nodes: vec![],
            node_port: NODE_PORT,
            check: tcp_check(1, 2),
        }
    }
    fn algorithm(mut self, a: Algorithm) -> Self {
        self.local.algorithm = a;
        self
    }
    fn drain_seconds(mut self, s: u32) -> Self {
        self.local.drain_timeout_seconds = s;
        self
    }
    fn requested(mut self, address: &str) -> Self {
        self.local.requested_address = Some(address.parse().expect("requested address"));
        self
    }
    fn listeners(mut self, l: &[(u16, Protocol)]) -> Self {
        self.listeners = l.to_vec();
        self
    }
    fn nodes(mut self, n: &[String]) -> Self {
        self.nodes = n.to_vec();
        self
    }
    fn check(mut self, c: HealthCheck) -> Self {
        self.check = c;
        self
    }

    fn desired(&self) -> Desired {
        let name = format!("k8s-shop-{}-0123456789", self.service.name);
        let key = |port: u16, p: Protocol| {
            format!(
                "{}-{port}",
                p.as_aws().to_ascii_lowercase().replace('_', "")
            )
        };
        let attributes: BTreeMap<String, String> = [
            ("deletion_protection.enabled", "false"),
            ("load_balancing.cross_zone.enabled", "false"),
            ("access_logs.s3.enabled", "false"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let mut ingress = BTreeSet::new();
        for (port, p) in &self.listeners {
            ingress.insert(IngressRule {
                protocol: if *p == Protocol::Udp { "udp" } else { "tcp" }.into(),
                port: *port,
                cidr: "0.0.0.0/0".into(),
            });
        }
        let listeners = self
            .listeners
            .iter()
            .map(|(port, p)| listener(*port, *p, &key(*port, *p)))
            .collect();
        let target_groups = self
            .listeners
            .iter()
            .map(|(port, p)| {
                let name = format!("k8s-{}-{port}-{}", self.service.name, self.node_port);
                let targets = self
                    .nodes
                    .iter()
                    .map(|ip| Target {
                        id: ip.clone(),
                        port: self.node_port,
                    })
                    .collect();
                let mut tg = target_group(
                    &key(*port, *p),
                    name,
                    *p,
                    self.node_port,
                    self.check.clone(),
                    targets,
                );
                tg.attributes = BTreeMap::from([
                    (
                        "deregistration_delay.timeout_seconds".to_string(),
                        "300".to_string(),
                    ),
                    ("proxy_protocol_v2.enabled".to_string(), "false".to_string()),
                ]);
                tg
            })
            .collect();
        let mut lb = local_lb(
            name.clone(),
            listeners,
            target_groups,
            self.listeners.clone(),
            self.local.clone(),
        );
        // The AWS parts.
        lb.security.frontend = Some(FrontendSecurityGroup {
            name: format!("{name}-sg"),
            description: "frontend".into(),
            ingress,
        });
        lb.attributes = attributes;
        lb.tags = BTreeMap::from([("cloudlb.io/cluster".to_string(), "test".to_string())]);
        Desired {
            service: self.service.clone(),
            lb_name: name,
            lb: Some(lb),
        }
    }
}

fn nodes(test: u8, n: u8) -> Vec<String> {
    (1..=n).map(|k| format!("127.1.{test}.{k}")).collect()
}

fn node_addr(node: &str) -> SocketAddr {
    SocketAddr::new(node.parse().expect("node ip"), NODE_PORT)
}

/// `node{i}` and its address at `port`, for every node.
fn named(nodes: &[String], port: u16) -> impl Iterator<Item = (String, SocketAddr)> + '_ {
    nodes.iter().enumerate().map(move |(i, n)| {
        let ip = n.parse().expect("node ip");
        (format!("node{i}"), SocketAddr::new(ip, port))
    })
}

async fn start_tcp_nodes(nodes: &[String]) -> Vec<TcpBackend> {
    let mut out = Vec::new();
    for (name, addr) in named(nodes, NODE_PORT) {
        out.push(TcpBackend::start(&name, addr).await);
    }
    out
}

/// A UDP backend on every node at `port` (see [`UdpBackend::start`] for `health_port`).
async fn start_udp_nodes(nodes: &[String], port: u16, health_port: bool) -> Vec<UdpBackend> {
    let mut out = Vec::new();
    for (name, addr) in named(nodes, port) {
        out.push(UdpBackend::start(&name, addr, health_port).await);
    }
    out
}

fn provider() -> LocalProvider {
    LocalProvider::new(LocalSettings {
        connect_timeout: Duration::from_secs(1),
        ..LocalSettings::default()
    })
}

/// Test `test`'s `n` nodes, serving TCP at the node port as long as the backends live, and a
/// provider.
async fn setup(test: u8, n: u8) -> (Vec<String>, Vec<TcpBackend>, LocalProvider) {
    let nodes = nodes(test, n);
    let backends = start_tcp_nodes(&nodes).await;
    (nodes, backends, provider())
}

/// A connection to `addr`, and the backend that answered its first `ping`.
async fn open_conn(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let served_by = ping(&mut s).await.expect("ping");
    (s, served_by)
}

/// The empty model of `d`'s Service.
fn empty_of(d: &Desired) -> Desired {
    Desired::empty(d.service.clone(), d.lb_name.clone())
}

/// `node` as a target at the node port.
fn target(node: &str) -> Target {
    Target {
        id: node.to_string(),
        port: NODE_PORT,
    }
}

/// What is served for `d` now, and the provider's plan from there.
async fn observe_and_plan(p: &LocalProvider, d: &Desired) -> (Observed, Plan) {
    let before = p.observe(d).await.expect("observe");
    let ops = plan(p, d, &before);
    (before, ops)
}

/// The provider's own plan (what the controller asks for).
fn plan(p: &LocalProvider, d: &Desired, o: &Observed) -> Plan {
    p.plan(d, o).expect("the local plan never fails")
}

/// Nothing AWS-shaped: no security group, no attributes, local ids.
fn assert_local_shaped(o: &Observed) {
    assert_eq!(o.security_group, None, "no security group");
    if let Some(lb) = &o.lb {
        assert!(
            lb.security_groups.is_empty(),
            "no security group ids: {lb:?}"
        );
        assert!(lb.attributes.is_empty(), "no attributes: {lb:?}");
        let ip: IpAddr = lb
            .arn
            .parse()
            .expect("the load balancer's id is its address");
        assert_eq!(lb.dns_name, lb.arn);
        for l in &o.listeners {
            assert_eq!(
                l.arn,
                format!("{}/{}", SocketAddr::new(ip, l.port), l.protocol.as_aws()),
                "a listener's id is address:port/PROTOCOL"
            );
        }
    }
    for tg in &o.target_groups {
        assert!(tg.attributes.is_empty(), "no attributes: {tg:?}");
        assert!(
            !tg.arn.starts_with("local:") && !tg.arn.starts_with("arn:"),
            "{tg:?}"
        );
        assert!(tg.algorithm.is_some(), "the algorithm is reported: {tg:?}");
    }
}

/// Applies `d` the way the controller does (observe, plan, apply) and checks the contract: the
/// result is what observe returns next, the re-plan is empty, nothing is AWS-shaped.
async fn apply_ok(p: &LocalProvider, d: &Desired) -> Observed {
    let (before, ops) = observe_and_plan(p, d).await;
    let after = p.apply(d, &before, &ops).await.expect("apply");
    assert_eq!(
        after,
        p.observe(d).await.expect("observe"),
        "apply = observe"
    );
    let again = plan(p, d, &after);
    assert!(again.is_empty(), "re-plan not empty: {:?}", again.ops);
    assert_local_shaped(&after);
    after
}

async fn apply_err(p: &LocalProvider, d: &Desired) -> String {
    let (before, ops) = observe_and_plan(p, d).await;
    match p.apply(d, &before, &ops).await {
        Err(ProviderError::Conflict(m)) => m,
        other => panic!("expected a conflict, got {other:?}"),
    }
}

fn lb_ip(o: &Observed) -> IpAddr {
    o.lb.as_ref()
        .expect("a load balancer")
        .dns_name
        .parse()
        .expect("the local provider reports an IP literal")
}

/// Applies `d` (see [`apply_ok`]) and opens a connection to its port 8080: what is served, its
/// address, the connection and the backend that answered the connection's first `ping`.
async fn apply_and_connect(
    p: &LocalProvider,
    d: &Desired,
) -> (Observed, IpAddr, TcpStream, String) {
    let o = apply_ok(p, d).await;
    let ip = lb_ip(&o);
    let (conn, served_by) = open_conn(SocketAddr::new(ip, 8080)).await;
    (o, ip, conn, served_by)
}

/// Waits for the event of `group` with `healthy` healthy targets; returns when it came.
async fn wait_health(
    events: &mut broadcast::Receiver<HealthEvent>,
    group: &str,
    healthy: usize,
    within: Duration,
) -> Instant {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no event {group} healthy={healthy} within {within:?}"))
            .expect("event channel");
        if ev.target_group == group && ev.healthy == healthy {
            return Instant::now();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_reach_every_node() {
    let (nodes, _tcp, p) = setup(10, 3).await;
    // UDP nodes answer on the same port number (other protocol); the TCP nodes already answer
    // the TCP health check on it.
    let _udp = start_udp_nodes(&nodes, NODE_PORT, false).await;
    let rr = Spec::new("rr", "127.0.10.0/28")
        .algorithm(Algorithm::RoundRobin)
        .listeners(&[(8080, Protocol::Tcp), (8053, Protocol::Udp)])
        .nodes(&nodes);
    let o = apply_ok(&p, &rr.desired()).await;
    let ip = lb_ip(&o);
    assert!(
        ip.to_string().starts_with("127.0.10."),
        "{ip} from the pool"
    );

    let counts = tcp_counts(SocketAddr::new(ip, 8080), 30).await;
    assert_eq!(
        counts,
        BTreeMap::from([
            ("node0".to_string(), 10),
            ("node1".to_string(), 10),
            ("node2".to_string(), 10)
        ]),
        "round-robin over TCP"
    );
    let counts = udp_counts(SocketAddr::new(ip, 8053), 30).await;
    assert_eq!(counts.len(), 3, "UDP reaches every node: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 30);
    assert!(
        counts.values().all(|c| *c == 10),
        "round-robin over UDP: {counts:?}"
    );

    // A flow sticks to its node, and many clients at once get their own answers.
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("socket");
    s.connect(SocketAddr::new(ip, 8053)).await.expect("connect");
    let first = udp_ask(&s, "one").await;
    for i in 0..5 {
        assert_eq!(
            udp_ask(&s, &format!("again {i}")).await,
            first,
            "flow sticks"
        );
    }

    // Random (the default) also reaches every node; TCP_UDP serves both on one port.
    let random = Spec::new("random", "127.0.10.0/28")
        .listeners(&[(9000, Protocol::TcpUdp)])
        .nodes(&nodes);
    let o = apply_ok(&p, &random.desired()).await;
    let ip2 = lb_ip(&o);
    assert_ne!(ip, ip2, "one address per Service");
    let counts = tcp_counts(SocketAddr::new(ip2, 9000), 60).await;
    assert_eq!(
        counts.len(),
        3,
        "random over TCP reaches every node: {counts:?}"
    );
    let counts = udp_counts(SocketAddr::new(ip2, 9000), 60).await;
    assert_eq!(
        counts.len(),
        3,
        "random over UDP reaches every node: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_still_gets_the_whole_response() {
    let (nodes, _b, p) = setup(11, 1).await;
    let o = apply_ok(
        &p,
        &Spec::new("half", "127.0.11.0/28").nodes(&nodes).desired(),
    )
    .await;
    let (mut s, served_by) = open_conn(SocketAddr::new(lb_ip(&o), 8080)).await;
    assert_eq!(served_by, "node0");
    let size = 4 * 1024 * 1024 + 17;
    s.write_all(format!("bulk {size}\n").as_bytes())
        .await
        .expect("write");
    // Client is done sending: the backend only answers after it sees EOF through the proxy.
    s.shutdown().await.expect("shutdown write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
        .await
        .expect("response in time")
        .expect("read to end");
    assert_eq!(got.len(), size, "the whole response after our half-close");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| *b == ((i % 65_536) % 251) as u8),
        "bytes intact and in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_node_is_taken_out_and_put_back() {
    let (nodes, mut backends, p) = setup(12, 3).await;
    let mut events = p.health_events();
    // Interval 1 s, thresholds 2.
    let spec = Spec::new("hc", "127.0.12.0/28")
        .algorithm(Algorithm::RoundRobin)
        .nodes(&nodes);
    let o = apply_ok(&p, &spec.desired()).await;
    let lb = SocketAddr::new(lb_ip(&o), 8080);
    assert_eq!(tcp_counts(lb, 9).await.len(), 3);

    let stopped_at = Instant::now();
    let b1 = backends.remove(1);
    assert_eq!(b1.name, "node1");
    b1.stop().await;
    // Before the health check notices: connects to node1 fail, and another node is tried.
    let counts = tcp_counts(lb, 12).await;
    assert!(!counts.contains_key("node1"), "{counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 12, "no connection lost");

    // Taken out within interval × unhealthy threshold (2 s), plus scheduling slack.
    let out_at = wait_health(&mut events, "tcp-8080", 2, Duration::from_secs(4)).await;
    let took = out_at - stopped_at;
    eprintln!("taken out {took:?} after the node stopped (interval 1 s x threshold 2)");
    assert!(took <= Duration::from_secs(3), "taken out after {took:?}");
    let counts = tcp_counts(lb, 20).await;
    assert_eq!(
        counts,
        BTreeMap::from([("node0".to_string(), 10), ("node2".to_string(), 10)]),
        "traffic continues on the others"
    );

    // Recovery: back after healthy_threshold successes.
    let back = TcpBackend::start("node1", node_addr(&nodes[1])).await;
    let started = Instant::now();
    let in_at = wait_health(&mut events, "tcp-8080", 3, Duration::from_secs(4)).await;
    assert!(in_at - started <= Duration::from_secs(3));
    let counts = tcp_counts(lb, 30).await;
    assert_eq!(counts.get("node1"), Some(&10), "put back: {counts:?}");
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_unhealthy_fails_open() {
    let (nodes, _b, p) = setup(13, 3).await;
    let mut events = p.health_events();
    // The check probes a port nothing listens on: every node turns unhealthy.
    let mut check = tcp_check(1, 2);
    check.port = Some(1);
    let spec = Spec::new("open", "127.0.13.0/28")
        .algorithm(Algorithm::RoundRobin)
        .nodes(&nodes)
        .check(check);
    let o = apply_ok(&p, &spec.desired()).await;
    wait_health(&mut events, "tcp-8080", 0, Duration::from_secs(4)).await;
    let counts = tcp_counts(SocketAddr::new(lb_ip(&o), 8080), 30).await;
    assert_eq!(
        counts.len(),
        3,
        "fail open: every node still used: {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_node_drains_then_closes() {
    let (nodes, _b, p) = setup(14, 3).await;
    let spec = Spec::new("drain", "127.0.14.0/28")
        .algorithm(Algorithm::RoundRobin)
        .drain_seconds(2)
        .nodes(&nodes);
    let o = apply_ok(&p, &spec.desired()).await;
    let lb = SocketAddr::new(lb_ip(&o), 8080);

    let (mut open, victim) = open_conn(lb).await;
    let victim_ip = nodes[victim
        .strip_prefix("node")
        .and_then(|i| i.parse::<usize>().ok())
        .expect("node index")]
    .clone();
    let remaining: Vec<String> = nodes.iter().filter(|n| **n != victim_ip).cloned().collect();
    let removed_at = Instant::now();
    let o = apply_ok(&p, &spec.nodes(&remaining).desired()).await;
    assert_eq!(o.target_groups[0].targets.len(), 2);

    // New connections avoid the removed node; the open one keeps working.
    let counts = tcp_counts(lb, 12).await;
    assert!(!counts.contains_key(&victim), "{counts:?}");
    assert_eq!(ping(&mut open).await.expect("still open"), victim);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(
        ping(&mut open).await.expect("open for the drain time"),
        victim
    );

    // After the drain time the connection is closed.
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(4), open.read(&mut buf))
        .await
        .expect("closed within the drain time");
    assert!(matches!(r, Ok(0) | Err(_)), "closed: {r:?}");
    let closed_after = removed_at.elapsed();
    assert!(
        closed_after >= Duration::from_millis(1_900) && closed_after < Duration::from_secs(4),
        "closed after {closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_is_a_conflict_and_the_rest_is_served() {
    let (nodes, _b, p) = setup(15, 2).await;
    let spec = Spec::new("busy", "127.0.15.1")
        .listeners(&[(8080, Protocol::Tcp), (8081, Protocol::Tcp)])
        .nodes(&nodes);
    let d = spec.desired();
    let squatter = std::net::TcpListener::bind("127.0.15.1:8081").expect("squat");

    let msg = apply_err(&p, &d).await;
    assert!(
        msg.contains("shop/busy") && msg.contains("127.0.15.1:8081/TCP"),
        "the conflict names the Service and address/port: {msg}"
    );
    assert!(
        msg.to_lowercase().contains("in use"),
        "and the reason: {msg}"
    );
    // 8080 works; 8081 is missing, so the plan wants it again.
    assert!(ask("127.0.15.1:8080".parse().expect("addr")).await.is_ok());
    let o = p.observe(&d).await.expect("observe");
    assert_eq!(o.listeners.len(), 1);
    let again = plan(&p, &d, &o);
    assert_eq!(again.ops, vec![Op::CreateListener { port: 8081 }]);

    // Freed: the next apply serves it, without disturbing 8080.
    let (mut open, _) = open_conn("127.0.15.1:8080".parse().expect("addr")).await;
    drop(squatter);
    apply_ok(&p, &d).await;
    assert!(ask("127.0.15.1:8081".parse().expect("addr")).await.is_ok());
    ping(&mut open).await.expect("8080 connection undisturbed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_is_a_conflict() {
    let (nodes, _b, p) = setup(16, 1).await;
    let a = Spec::new("first", "127.0.16.1").nodes(&nodes).desired();
    let b = Spec::new("second", "127.0.16.1").nodes(&nodes).desired();
    let o = apply_ok(&p, &a).await;
    assert_eq!(lb_ip(&o).to_string(), "127.0.16.1");

    let msg = apply_err(&p, &b).await;
    assert!(
        msg.contains("shop/second") && msg.contains("no free address"),
        "{msg}"
    );
    assert_eq!(p.observe(&b).await.expect("observe"), Observed::default());
    assert!(ask("127.0.16.1:8080".parse().expect("addr")).await.is_ok());

    // Deleting the first frees the address for the second.
    let empty = empty_of(&a);
    assert_eq!(apply_ok(&p, &empty).await, Observed::default());
    let o = apply_ok(&p, &b).await;
    assert_eq!(lb_ip(&o).to_string(), "127.0.16.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_is_stable_across_restarts() {
    let (nodes, _b, first) = setup(17, 1).await;
    let pool = "127.0.17.0/28";
    let a = Spec::new("stable", pool).nodes(&nodes);
    let had = lb_ip(&apply_ok(&first, &a.desired()).await);
    first.shutdown().await;
    drop(first);

    // A new operator process: the recorded address is asked for, and given.
    let second = provider();
    // Another Service first takes some other address.
    let other_addr = if had.to_string() == "127.0.17.9" {
        "127.0.17.10"
    } else {
        "127.0.17.9"
    };
    let other = Spec::new("other", pool).requested(other_addr).nodes(&nodes);
    assert_eq!(
        lb_ip(&apply_ok(&second, &other.desired()).await).to_string(),
        other_addr,
        "a free requested address in the pool is honoured"
    );
    let a = a.requested(&had.to_string());
    let got = lb_ip(&apply_ok(&second, &a.desired()).await);
    assert_eq!(got, had);
    assert!(ask(SocketAddr::new(got, 8080)).await.is_ok());

    // A requested address that is taken or outside the pool: another one, no error.
    let thief = Spec::new("thief", pool)
        .requested(&had.to_string())
        .nodes(&nodes);
    let t = lb_ip(&apply_ok(&second, &thief.desired()).await);
    assert!(t != had && t.to_string().starts_with("127.0.17."), "{t}");
    second.shutdown().await;

    // Even without the recorded address, a Service alone in its pool gets the same one again.
    let third = provider();
    let plain = Spec::new("stable", pool).nodes(&nodes);
    assert_eq!(lb_ip(&apply_ok(&third, &plain.desired()).await), had);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_converge_in_place_and_replan_is_empty() {
    let (nodes, _b, p) = setup(18, 3).await;
    // UDP nodes on another port: 30081.
    let _udp = start_udp_nodes(&nodes, 30081, true).await;
    let spec = Spec::new("change", "127.0.18.0/28")
        .listeners(&[(8080, Protocol::Tcp), (8081, Protocol::Tcp)])
        .nodes(&nodes[..2]);
    let d = spec.desired();
    let o = apply_ok(&p, &d).await;

    // The shape of what is observed: local ids, none of the model's AWS parts.
    let ip = lb_ip(&o);
    let lb = o.lb.as_ref().expect("lb");
    assert_eq!(
        lb.arn,
        ip.to_string(),
        "the load balancer's id is its address"
    );
    assert_eq!(lb.name, d.lb_name);
    assert!(
        lb.attributes.is_empty() && !d.lb.as_ref().expect("lb").attributes.is_empty(),
        "the model's AWS attributes are not mirrored"
    );
    assert_eq!(o.listeners.len(), 2);
    assert_eq!(o.listeners[0].arn, format!("{ip}:8080/TCP"));
    assert_eq!(o.listeners[0].target_group_arn.as_deref(), Some("tcp-8080"));
    assert_eq!(o.target_groups[0].arn, "tcp-8080");
    assert_eq!(o.target_groups[0].targets.len(), 2);
    assert_eq!(
        apply_ok(&p, &d).await,
        o,
        "applying the same model again changes nothing"
    );

    let (mut open, served_by) = open_conn(SocketAddr::new(ip, 8080)).await;

    // Targets (+1), health check, algorithm; port 8081 removed, 8082 and a UDP one added.
    let mut check = tcp_check(2, 3);
    check.timeout_seconds = 1;
    let mut changed = spec
        .nodes(&nodes)
        .algorithm(Algorithm::RoundRobin)
        .check(check)
        .listeners(&[(8080, Protocol::Tcp), (8082, Protocol::Tcp)])
        .desired();
    let (_, ops) = observe_and_plan(&p, &changed).await;
    assert!(ops.ops.contains(&Op::CreateListener { port: 8082 }));
    assert_eq!(
        ops.ops,
        vec![
            Op::ModifyHealthCheck {
                key: "tcp-8080".into()
            },
            Op::SetAlgorithm {
                key: "tcp-8080".into(),
                algorithm: Algorithm::RoundRobin
            },
            Op::RegisterTargets {
                key: "tcp-8080".into(),
                targets: vec![target(&nodes[2])]
            },
            Op::CreateTargetGroup {
                key: "tcp-8082".into()
            },
            Op::RegisterTargets {
                key: "tcp-8082".into(),
                targets: nodes.iter().map(|n| target(n)).collect()
            },
            Op::DeleteListener {
                arn: format!("{ip}:8081/TCP"),
                port: 8081
            },
            Op::CreateListener { port: 8082 },
            Op::DeleteTargetGroup {
                arn: "tcp-8081".into(),
                name: "k8s-change-8081-30080".into()
            },
        ],
        "the local plan: in place, nothing AWS-shaped"
    );
    let o2 = apply_ok(&p, &changed).await;
    assert_eq!(lb_ip(&o2), ip, "the address stays");
    assert_eq!(ping(&mut open).await.expect("undisturbed"), served_by);
    assert!(refused(SocketAddr::new(ip, 8081)).await, "8081 closed");
    assert_eq!(tcp_counts(SocketAddr::new(ip, 8082), 9).await.len(), 3);

    // A UDP listener with its own target group and node port joins.
    let lb = changed.lb.as_mut().expect("lb");
    lb.listeners.push(listener(8053, Protocol::Udp, "udp-8053"));
    let mut tg = lb.target_groups[0].clone();
    tg.key = "udp-8053".into();
    tg.name = "k8s-change-8053-30081".into();
    tg.protocol = Protocol::Udp;
    tg.port = 30081;
    tg.targets = nodes
        .iter()
        .map(|n| Target {
            id: n.clone(),
            port: 30081,
        })
        .collect();
    lb.target_groups.push(tg);
    let o3 = apply_ok(&p, &changed).await;
    assert_eq!(o3.listeners.len(), 3);
    assert_eq!(udp_counts(SocketAddr::new(ip, 8053), 9).await.len(), 3);
    assert_eq!(ping(&mut open).await.expect("still undisturbed"), served_by);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_model_and_drop_close_everything() {
    let (nodes, _b, p) = setup(19, 1).await;
    let spec = Spec::new("gone", "127.0.19.1")
        .listeners(&[(8080, Protocol::Tcp), (8081, Protocol::TcpUdp)])
        .nodes(&nodes);
    let d = spec.desired();
    let (_, ip, mut open, _) = apply_and_connect(&p, &d).await;

    let empty = empty_of(&d);
    let (before, ops) = observe_and_plan(&p, &empty).await;
    assert!(!ops.is_empty(), "something to delete");
    assert_eq!(
        ops.ops,
        vec![
            Op::DeleteLoadBalancer {
                arn: ip.to_string(),
                name: d.lb_name.clone(),
                reason: "the Service no longer wants a load balancer".into()
            },
            Op::DeleteTargetGroup {
                arn: "tcp-8080".into(),
                name: "k8s-gone-8080-30080".into()
            },
            Op::DeleteTargetGroup {
                arn: "tcpudp-8081".into(),
                name: "k8s-gone-8081-30080".into()
            },
        ]
    );
    let after = p.apply(&empty, &before, &ops).await.expect("delete");
    assert_eq!(after, Observed::default());
    assert_eq!(
        p.observe(&empty).await.expect("observe"),
        Observed::default()
    );
    assert!(refused(SocketAddr::new(ip, 8080)).await, "8080 closed");
    assert!(refused(SocketAddr::new(ip, 8081)).await, "8081 closed");
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf))
        .await
        .expect("open connection closed too");
    assert!(matches!(r, Ok(0) | Err(_)));
    // The address is free again: UDP can bind it, and so can another Service.
    std::net::UdpSocket::bind("127.0.19.1:8081").expect("udp port released");
    let other = Spec::new("next", "127.0.19.1").nodes(&nodes).desired();
    assert_eq!(lb_ip(&apply_ok(&p, &other).await), ip);

    // Dropping the provider closes its listeners too.
    drop(p);
    let deadline = Instant::now() + Duration::from_secs(2);
    while !refused(SocketAddr::new(ip, 8080)).await {
        assert!(Instant::now() < deadline, "still listening after drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flow_ends_after_idle_timeout() {
    let nodes = nodes(20, 2);
    let _tcp = start_tcp_nodes(&nodes).await;
    let _udp = start_udp_nodes(&nodes, NODE_PORT, false).await;
    let p = LocalProvider::new(LocalSettings {
        udp_idle_timeout: Duration::from_secs(1),
        ..LocalSettings::default()
    });
    let spec = Spec::new("idle", "127.0.20.0/28")
        .algorithm(Algorithm::RoundRobin)
        .listeners(&[(8053, Protocol::Udp)])
        .nodes(&nodes);
    let ip = lb_ip(&apply_ok(&p, &spec.desired()).await);
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("socket");
    s.connect(SocketAddr::new(ip, 8053)).await.expect("connect");
    let first = udp_ask(&s, "a").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        udp_ask(&s, "b").await,
        first,
        "within the idle timeout: same flow"
    );
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // The flow was forgotten: the next datagram is a new flow, and round-robin moves on.
    assert_ne!(
        udp_ask(&s, "c").await,
        first,
        "a new flow after the idle timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_model_plans_nothing_and_an_empty_plan_changes_nothing() {
    let (nodes, _b, p) = setup(21, 2).await;
    let spec = Spec::new("same", "127.0.21.0/28")
        .algorithm(Algorithm::RoundRobin)
        .listeners(&[(8080, Protocol::Tcp), (8081, Protocol::TcpUdp)])
        .nodes(&nodes);
    let d = spec.desired();
    let (o, _, mut open, served_by) = apply_and_connect(&p, &d).await;

    // The same model again, and again after what the controller caches: nothing to do.
    let observed = p.observe(&d).await.expect("observe");
    assert_eq!(observed, o);
    assert_eq!(plan(&p, &d, &observed), Plan::default());
    // An empty plan changes nothing, even against a stale picture of what is served.
    let after = p
        .apply(&d, &Observed::default(), &Plan::default())
        .await
        .expect("apply the empty plan");
    assert_eq!(after, o);
    assert_eq!(p.observe(&d).await.expect("observe"), o);
    assert_eq!(ping(&mut open).await.expect("undisturbed"), served_by);
    // Neither do the settings that only matter later: the drain time, the requested address.
    let later = spec.drain_seconds(1).requested("127.0.21.9").desired();
    assert_eq!(plan(&p, &later, &o), Plan::default());
    assert_eq!(ping(&mut open).await.expect("undisturbed"), served_by);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_change_plans_only_registrations() {
    let (nodes, _b, p) = setup(22, 3).await;
    let spec = Spec::new("targets", "127.0.22.0/28")
        .algorithm(Algorithm::RoundRobin)
        .listeners(&[(8080, Protocol::Tcp), (8081, Protocol::Tcp)])
        .nodes(&nodes[..2]);
    let o = apply_ok(&p, &spec.desired()).await;
    let ip = lb_ip(&o);

    // node0 replaced by node2.
    let changed = spec.nodes(&nodes[1..]).desired();
    let ops = plan(&p, &changed, &o);
    assert!(
        ops.changes_only_targets(),
        "only (de)registrations: {:?}",
        ops.ops
    );
    let per_group = |key: &str| {
        vec![
            Op::DeregisterTargets {
                key: key.into(),
                targets: vec![target(&nodes[0])],
            },
            Op::RegisterTargets {
                key: key.into(),
                targets: vec![target(&nodes[2])],
            },
        ]
    };
    assert_eq!(
        ops.ops,
        [per_group("tcp-8080"), per_group("tcp-8081")].concat()
    );
    let o2 = apply_ok(&p, &changed).await;
    assert_eq!(lb_ip(&o2), ip, "the address stays");
    assert_eq!(o2.listeners, o.listeners, "the listeners stay as they are");
    for port in [8080, 8081] {
        let counts = tcp_counts(SocketAddr::new(ip, port), 10).await;
        assert_eq!(
            counts,
            BTreeMap::from([("node1".to_string(), 5), ("node2".to_string(), 5)]),
            "port {port}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_aws_shaped_is_observed_or_owned() {
    let (nodes, _b, p) = setup(23, 1).await;
    // The model carries a frontend security group, the user's security groups and AWS
    // attributes (as for an aws class): none of it is served, none of it is reported.
    let mut d = Spec::new("nosg", "127.0.23.0/28").nodes(&nodes).desired();
    let lb = d.lb.as_mut().expect("lb");
    assert!(lb.security.frontend.is_some());
    lb.security.extra_security_groups = vec!["sg-0123".into()];
    lb.target_groups[0]
        .attributes
        .insert("stickiness.enabled".into(), "true".into());
    let (_, ops) = observe_and_plan(&p, &d).await;
    assert_eq!(
        ops.ops,
        vec![
            Op::CreateLoadBalancer,
            Op::CreateTargetGroup {
                key: "tcp-8080".into()
            },
            Op::RegisterTargets {
                key: "tcp-8080".into(),
                targets: vec![target(&nodes[0])]
            },
            Op::CreateListener { port: 8080 },
        ],
        "no security group, no attributes, no subnets"
    );
    let o = apply_ok(&p, &d).await;
    assert_eq!(o.security_group, None);
    let lb = o.lb.as_ref().expect("lb");
    assert!(lb.security_groups.is_empty(), "{lb:?}");
    assert!(
        !lb.arn.contains(":sg") && !lb.arn.starts_with("local:"),
        "{lb:?}"
    );
    assert!(o.target_groups[0].attributes.is_empty());
    assert_eq!(o.target_groups[0].algorithm, Some(Algorithm::Random));
    let owned = p.owned(&|_| false).await.expect("owned");
    assert_eq!(owned, vec![(d.service.clone(), o.clone())]);
    assert_local_shaped(&owned[0].1);

    // The orphan sweep's plan for it deletes what is served, and nothing else.
    let empty = empty_of(&d);
    let sweep = plan(&p, &empty, &owned[0].1);
    assert_eq!(sweep.ops.len(), 2, "{:?}", sweep.ops);
    assert_eq!(
        p.apply(&empty, &owned[0].1, &sweep).await.expect("sweep"),
        Observed::default()
    );
    assert!(p.owned(&|_| false).await.expect("owned").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_of_another_provider_is_refused_and_nothing_changes() {
    let (nodes, _b, p) = setup(24, 1).await;
    let d = Spec::new("foreign", "127.0.24.0/28")
        .nodes(&nodes)
        .desired();
    let o = apply_ok(&p, &d).await;
    // The NLB planner's plan from nothing starts with the security group.
    let nlb = cloudlb_core::plan::plan(&d, &Observed::default()).expect("nlb plan");
    assert_eq!(nlb.ops.first(), Some(&Op::CreateSecurityGroup));
    let err = p
        .apply(&d, &o, &nlb)
        .await
        .expect_err("not a local operation");
    assert!(
        matches!(err, ProviderError::InvalidConfig(_))
            && err.to_string().contains("CreateSecurityGroup"),
        "{err}"
    );
    assert_eq!(p.observe(&d).await.expect("observe"), o, "nothing changed");
    assert!(ask(SocketAddr::new(lb_ip(&o), 8080)).await.is_ok());
}
