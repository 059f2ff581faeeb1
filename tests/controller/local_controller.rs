//! The operator with the local provider, end to end: a real kube-apiserver + etcd, Nodes whose
//! InternalIPs are loopback addresses with real backends on them, and real TCP/UDP traffic
//! through the load balancer the operator serves itself.
//!
//! Each test has its own namespace, class (with its own address pool), node label, nodePorts and
//! operator instance.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::helpers;
use crate::support;

use cloudlb::controller::Providers;
use cloudlb::provider::local::{LocalProvider, LocalSettings};
use cloudlb::telemetry::Metrics;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::env::{operator_settings, spawn_operator, wait_for, wait_within};
use support::fixtures::{self, LABEL, install_crd};
use support::{TestCluster, TestGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A backend on `ip:tcp_port` (TCP) and `ip:udp_port` (UDP) that answers with its node's name;
/// the returned handles stop it when aborted.
async fn backend(
    name: &str,
    ip: &str,
    tcp_port: u16,
    udp_port: u16,
) -> Vec<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = format!("{ip}:{tcp_port}").parse().expect("addr");
    let tcp = TcpListener::bind(addr).await.expect("bind backend tcp");
    let addr: SocketAddr = format!("{ip}:{udp_port}").parse().expect("addr");
    let udp = UdpSocket::bind(addr).await.expect("bind backend udp");
    let n1 = name.to_string();
    let n2 = name.to_string();
    vec![
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = tcp.accept().await else {
                    return;
                };
                let name = n1.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(name.as_bytes()).await;
                });
            }
        }),
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let Ok((_, from)) = udp.recv_from(&mut buf).await else {
                    return;
                };
                let _ = udp.send_to(n2.as_bytes(), from).await;
            }
        }),
    ]
}

async fn tcp_ask(addr: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"hi").await.ok()?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out))
        .await
        .ok()?
        .ok()?;
    (!out.is_empty()).then_some(out)
}

async fn udp_ask(addr: &str) -> Option<String> {
    let s = UdpSocket::bind("127.0.0.1:0").await.ok()?;
    s.send_to(b"hi", addr).await.ok()?;
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

async fn spread(n: usize, ask: impl AsyncFn() -> Option<String>) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        if let Some(who) = ask().await {
            *seen.entry(who).or_insert(0) += 1;
        }
    }
    seen
}

struct Env {
    client: Client,
    ns: String,
    node_port: u16,
    nodes: Vec<String>,
    backends: Vec<Vec<tokio::task::JoinHandle<()>>>,
    local: Arc<LocalProvider>,
    metrics: Arc<Metrics>,
    operator: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    /// `octet` (11-18: nodes at 127.<octet>.0.2-4, nodePorts 30000 + 10 × (`octet` - 10) and the
    /// nine above) must be unique per test.
    ///
    /// The test's nodePorts are fixed (its backends listen on them) and lie in the API server's
    /// static band, the lowest 86 ports of 30000-32767, from which it allocates a nodePort only
    /// when every port above is taken: a port the server picks for another test's Service cannot
    /// be one of them.
    async fn start(prefix: &str, octet: u8, pool: &str) -> Env {
        assert!((11..=18).contains(&octet), "octet {octet} is outside 11-18");
        let node_port = 30000 + 10 * u16::from(octet - 10);
        let cluster = TestCluster::shared().await;
        let client = cluster.client();
        install_crd(&client).await;
        let ns = cluster.create_namespace(prefix).await;
        fixtures::create_class(
            &client,
            &ns,
            json!({"provider": "local", "default": true, "adoptAllClasslessServices": true, "local": {"addressPool": pool, "algorithm": "round-robin"}}),
        )
        .await;
        let mut env = Env {
            client,
            ns,
            node_port,
            nodes: vec![],
            backends: vec![],
            local: Arc::new(LocalProvider::new(LocalSettings::default())),
            metrics: Arc::new(Metrics::new()),
            operator: None,
        };
        for i in 0..3u8 {
            let name = format!("{}-node-{i}", env.ns);
            let ip = format!("127.{octet}.0.{}", i + 2);
            let node: Node = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {LABEL: env.ns}},
            }))
            .expect("node");
            let nodes: Api<Node> = Api::all(env.client.clone());
            nodes
                .create(&PostParams::default(), &node)
                .await
                .expect("create node");
            let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .expect("node status");
            env.backends
                .push(backend(&name, &ip, node_port, node_port + 1).await);
            env.nodes.push(name);
        }
        env.start_operator();
        env
    }

    fn start_operator(&mut self) {
        let providers = Providers {
            aws: None,
            local: Some(self.local.clone()),
        };
        self.operator = Some(spawn_operator(
            self.client.clone(),
            operator_settings(&self.ns),
            providers,
            self.metrics.clone(),
        ));
    }

    /// Stops the operator and everything its local provider serves (a process exit).
    async fn stop_operator(&mut self) {
        if let Some(h) = self.operator.take() {
            h.abort();
        }
        self.local.shutdown().await;
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// A JSON merge patch of Service `name`.
    async fn patch_service(&self, name: &str, patch: serde_json::Value) {
        helpers::patch_service(&self.services(), name, &patch).await;
    }

    /// A Service whose class selects this test's Nodes.
    async fn create_service(&self, name: &str, ports: serde_json::Value) {
        let annotations = json!({"cloudlb.io/target-node-labels": format!("{LABEL}={}", self.ns)});
        let svc = fixtures::lb_service(name, annotations, json!({"ports": ports}));
        fixtures::create_service(&self.services(), &svc).await;
    }

    async fn ip(&self, name: &str) -> Option<String> {
        fixtures::ingress(&self.services(), name).await?.ip
    }

    async fn wait_ip(&self, name: &str) -> String {
        wait_for(&format!("EXTERNAL-IP of {name}"), || async {
            self.ip(name).await
        })
        .await
    }

    async fn events(&self, reason: &str) -> Vec<String> {
        helpers::notes(&self.client, &self.ns, reason).await
    }

    /// Waits until the namespace has Events with `reason`; their notes.
    async fn wait_events(&self, reason: &str) -> Vec<String> {
        helpers::wait_notes(&self.client, &self.ns, reason).await
    }

    /// Creates Service `name` with `ports` and waits until it is served: its address.
    async fn serve(&self, name: &str, ports: serde_json::Value) -> String {
        self.create_service(name, ports).await;
        self.wait_ip(name).await
    }

    /// Patches Service `name` and waits for a good reconcile after it (one of the edit).
    async fn patch_and_wait_reconcile(&self, name: &str, patch: serde_json::Value) {
        let before = good_reconciles(&self.metrics);
        self.patch_service(name, patch).await;
        wait_for("a reconcile of the edit", || async {
            (good_reconciles(&self.metrics) > before).then_some(())
        })
        .await;
    }

    /// Ports at this test's nodePorts, where its backends listen (UDP at nodePort + 1).
    fn ports(&self, tcp: u16, udp: Option<u16>) -> serde_json::Value {
        let mut ports = vec![
            json!({"name": "tcp", "port": tcp, "protocol": "TCP", "nodePort": self.node_port}),
        ];
        if let Some(udp) = udp {
            // Its own nodePort, where this test's UDP backends listen.
            ports.push(json!({"name": "udp", "port": udp, "protocol": "UDP", "nodePort": self.node_port + 1}));
        }
        json!(ports)
    }

    /// A port with an allocated nodePort (no backend behind it: for Services that only need an
    /// address and a listener).
    fn any_port(&self, tcp: u16, n: u16) -> serde_json::Value {
        // nodePort + 1 + n (n in 1..=8; + 1 is the UDP backends'), still this test's ten.
        assert!(
            (1..=8).contains(&n),
            "any_port({n}) is outside this test's nodePorts"
        );
        json!([{"name": "tcp", "port": tcp, "protocol": "TCP", "nodePort": self.node_port + 1 + n}])
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(h) = self.operator.take() {
            h.abort();
        }
        for b in self.backends.iter().flatten() {
            b.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_reach_every_node_and_follow_port_changes() {
    let _guard = TestGuard::new();
    let env = Env::start("traffic", 11, "127.11.1.0/28").await;
    let ip = env.serve("web", env.ports(8080, Some(5353))).await;
    assert!(
        ip.starts_with("127.11.1."),
        "address from the class pool: {ip}"
    );
    let out = TestCluster::shared()
        .await
        .kubectl(&["get", "svc", "-n", &env.ns, "web"])
        .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&ip),
        "kubectl shows EXTERNAL-IP"
    );

    let tcp_addr = format!("{ip}:8080");
    let tcp = spread(30, async || tcp_ask(&tcp_addr).await).await;
    assert_eq!(tcp.len(), 3, "TCP reached every node: {tcp:?}");
    assert_eq!(
        tcp.values().sum::<usize>(),
        30,
        "no request failed: {tcp:?}"
    );
    let udp_addr = format!("{ip}:5353");
    let udp = spread(30, async || udp_ask(&udp_addr).await).await;
    assert_eq!(udp.len(), 3, "UDP reached every node: {udp:?}");

    // Port change: served on the new port, the old one is closed.
    env.patch_service("web", json!({"spec": {"ports": env.ports(9090, None)}}))
        .await;
    let new_addr = format!("{ip}:9090");
    wait_for("new port served", || async { tcp_ask(&new_addr).await }).await;
    wait_for("old port closed", || async {
        TcpStream::connect(&tcp_addr).await.is_err().then_some(())
    })
    .await;
    assert_eq!(
        env.ip("web").await.as_deref(),
        Some(ip.as_str()),
        "address unchanged"
    );

    // Delete: the port and the address are released.
    helpers::delete_service(&env.services(), "web").await;
    assert!(
        TcpStream::connect(&new_addr).await.is_err(),
        "port closed after delete"
    );
    let reused = env.serve("again", env.ports(9090, None)).await;
    wait_for(
        "the released address and port serve the new Service",
        || async { TcpStream::connect(format!("{reused}:9090")).await.ok() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_node_stops_receiving_new_connections() {
    let _guard = TestGuard::new();
    let env = Env::start("exclude", 12, "127.12.1.0/28").await;
    let ip = env.serve("web", env.ports(8080, None)).await;
    let addr = format!("{ip}:8080");
    wait_for("all three nodes answer", || async {
        (spread(9, async || tcp_ask(&addr).await).await.len() == 3).then_some(())
    })
    .await;
    let excluded = env.nodes[0].clone();
    helpers::exclude_node(&env.client, &excluded).await;
    wait_for("excluded node gets no new connections", || async {
        let seen = spread(12, async || tcp_ask(&addr).await).await;
        (seen.len() == 2 && !seen.contains_key(&excluded) && seen.values().sum::<usize>() == 12)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_keeps_every_address() {
    let _guard = TestGuard::new();
    let mut env = Env::start("restart", 13, "127.13.1.0/28").await;
    env.create_service("a", env.ports(8080, None)).await;
    env.create_service("b", env.any_port(8080, 1)).await;
    env.create_service("c", env.any_port(8080, 2)).await;
    let mut before = BTreeMap::new();
    for name in ["a", "b", "c"] {
        before.insert(name, env.wait_ip(name).await);
    }
    env.stop_operator().await;
    // A new process: a new provider with nothing in memory.
    env.local = Arc::new(LocalProvider::new(LocalSettings::default()));
    env.start_operator();
    let a = format!("{}:8080", before["a"]);
    wait_for("a serves traffic again", || async { tcp_ask(&a).await }).await;
    for (name, ip) in &before {
        let addr = format!("{ip}:8080");
        wait_for(&format!("{name} listening again"), || async {
            TcpStream::connect(&addr).await.ok()
        })
        .await;
        assert_eq!(
            env.ip(name).await.as_ref(),
            Some(ip),
            "{name} kept its address"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_pool_is_a_warning_event_and_others_keep_working() {
    let _guard = TestGuard::new();
    let env = Env::start("pool", 14, "127.14.1.7").await;
    let ip = env.serve("first", env.ports(8080, None)).await;
    assert_eq!(ip, "127.14.1.7");
    env.create_service("second", env.any_port(8080, 1)).await;
    let notes = env.wait_events("SyncLoadBalancerFailed").await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains("second") || n.contains("pool")),
        "{notes:?}"
    );
    assert_eq!(env.ip("second").await, None);
    assert!(
        tcp_ask(&format!("{ip}:8080")).await.is_some(),
        "the first Service is undisturbed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_is_a_warning_event() {
    let _guard = TestGuard::new();
    let env = Env::start("health", 15, "127.15.1.0/28").await;
    env.create_service(
        "web",
        json!([{"name": "tcp", "port": 8080, "protocol": "TCP", "nodePort": env.node_port}]),
    )
    .await;
    // Fast health checks through the usual annotations.
    env.patch_service(
        "web",
        json!({"metadata": {"annotations": {
            "cloudlb.io/healthcheck-interval": "5",
            "cloudlb.io/healthcheck-timeout": "2",
            "cloudlb.io/healthcheck-unhealthy-threshold": "2"
        }}}),
    )
    .await;
    let ip = env.wait_ip("web").await;
    assert!(tcp_ask(&format!("{ip}:8080")).await.is_some());
    for b in env.backends.iter().flatten() {
        b.abort();
    }
    wait_within(
        "an AllTargetsUnhealthy event",
        Duration::from_secs(30),
        || async { (!env.events("AllTargetsUnhealthy").await.is_empty()).then_some(()) },
    )
    .await;
}

/// Reconciles that ended without an error or invalid input.
fn good_reconciles(metrics: &Metrics) -> u64 {
    ["applied", "unchanged", "verified"]
        .iter()
        .map(|o| metrics.reconcile_count(o))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_written_once_per_change_although_the_server_adds_ip_mode() {
    let _guard = TestGuard::new();
    let env = Env::start("ipmode", 16, "127.16.1.0/28").await;
    let ip = env.serve("web", env.ports(8080, None)).await;
    // The server defaults ipMode (GA in 1.32) on what cloudlb wrote.
    let ingress = env
        .services()
        .get("web")
        .await
        .expect("get")
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .unwrap_or_default();
    assert_eq!(ingress.len(), 1);
    assert_eq!(ingress[0].ip.as_deref(), Some(ip.as_str()));
    assert_eq!(ingress[0].ip_mode.as_deref(), Some("VIP"), "{ingress:?}");
    let writes = env.metrics.status_write_count();
    assert_eq!(writes, 1, "one status write for the new address");

    // Edits that change nothing about the load balancer: reconciled, never rewritten.
    for i in 0..3 {
        env.patch_and_wait_reconcile(
            "web",
            json!({"metadata": {"labels": {"touch": i.to_string()}}}),
        )
        .await;
    }
    assert_eq!(
        env.metrics.status_write_count(),
        writes,
        "no status rewrite while the status is unchanged (ipMode is not a difference)"
    );

    // A real change (a new port in status.loadBalancer.ingress[].ports): exactly one write.
    env.patch_service("web", json!({"spec": {"ports": env.ports(9090, None)}}))
        .await;
    wait_for("the status shows port 9090", || async {
        let svc = env.services().get("web").await.ok()?;
        let ports = svc.status?.load_balancer?.ingress?.first()?.ports.clone()?;
        ports.iter().any(|p| p.port == 9090).then_some(())
    })
    .await;
    env.patch_and_wait_reconcile("web", json!({"metadata": {"labels": {"touch": "after"}}}))
        .await;
    assert_eq!(env.metrics.status_write_count(), writes + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_port_on_the_operators_own_listener_gets_an_event_naming_both() {
    let _guard = TestGuard::new();
    let mut env = Env::start("ownport", 17, "127.17.1.0/28").await;
    // The operator's metrics listener on a wildcard address holds its port on every address.
    let metrics = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let held = metrics.local_addr().expect("addr");
    env.stop_operator().await;
    env.local = Arc::new(LocalProvider::new(LocalSettings {
        reserved: vec![(held, "--metrics-addr".to_string())],
        ..LocalSettings::default()
    }));
    env.start_operator();
    env.create_service("web", env.any_port(held.port(), 1))
        .await;
    let want = format!(
        ":{}/TCP: the operator's own --metrics-addr listener ({held}) holds that port",
        held.port()
    );
    let notes = wait_for("an Event naming the operator's listener", || async {
        let notes: Vec<String> = helpers::events(&env.client, &env.ns)
            .await
            .into_iter()
            .filter_map(|e| e.note)
            .filter(|n| n.contains(&want))
            .collect();
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(notes[0].contains("Service "), "{notes:?}");
    drop(metrics);
}
