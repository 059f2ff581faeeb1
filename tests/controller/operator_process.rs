//! The `cloudlb run` process: prompt exit on SIGTERM, /metrics /healthz /readyz, and leader
//! election between two replicas against the real API server and moto.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::support;

use cloudlb::config::class::LoadBalancerClass;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::process::free_port;
use support::{
    AwsEmulator, TestCluster, TestGuard, create_node, create_vpc_with_subnets, node_for,
    run_instances,
};

/// moto's account for requests without our account header (what a plain SDK client uses).
const DEFAULT_ACCOUNT: &str = "123456789012";

/// A `cloudlb run` child process, killed when dropped.
struct Operator {
    child: Child,
    metrics_port: u16,
    log: std::path::PathBuf,
}

impl Operator {
    fn start(name: &str, args: &[&str], env: &[(&str, String)]) -> Operator {
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!(
            "cloudlb-{name}-{}-{metrics_port}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cloudlb"));
        cmd.arg("run")
            .args(args)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start cloudlb");
        Operator {
            child,
            metrics_port,
            log,
        }
    }

    async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    }

    /// A metric's value (sum over its label sets matching `filter`).
    async fn metric(&self, name: &str, filter: &str) -> f64 {
        let Some((_, body)) = self.get("/metrics").await else {
            return f64::NAN;
        };
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "==== operator log {} ====\n{}",
                self.log.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_promptly_even_when_the_api_server_is_unreachable() {
    let _guard = TestGuard::new();
    let dir = std::env::temp_dir().join(format!("cloudlb-unreachable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    // Nothing listens on this port.
    let port = free_port();
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}', insecure-skip-tls-verify: true}}}}]\nusers: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: c, context: {{cluster: c, user: u}}}}]\ncurrent-context: c\n"
        ),
    )
    .expect("kubeconfig");
    let mut op = Operator::start(
        "unreachable",
        &["--cluster-name", "x", "--no-aws"],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    );
    // Up: /healthz answers, /readyz does not (no cache can sync).
    let (status, _) = wait_for("healthz", Duration::from_secs(20), || async {
        op.get("/healthz").await
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(op.get("/readyz").await.map(|(s, _)| s), Some(503));
    let sent = Instant::now();
    sigterm(&op.child);
    let deadline = Instant::now() + Duration::from_secs(15);
    let exited = loop {
        if let Some(status) = op.child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 15 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!(
        "exited {:?} after SIGTERM (status {exited})",
        sent.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_writer_and_failover_after_kill_9_mid_wave() {
    let _guard = TestGuard::new();
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    support::env::install_crd(&client).await;
    let classes: Api<LoadBalancerClass> = Api::all(client.clone());
    let ns = cluster.create_namespace("leader").await;
    let label = "cloudlb.test/env";
    let class: LoadBalancerClass = serde_json::from_value(json!({
        "metadata": {"name": ns},
        "spec": {"provider": "aws", "default": true, "aws": {"targetNodeLabels": {label: ns}}}
    }))
    .expect("class");
    classes
        .create(&PostParams::default(), &class)
        .await
        .expect("class");

    let moto = AwsEmulator::shared().await;
    let (elbv2, ec2) = moto.clients(DEFAULT_ACCOUNT);
    let network = create_vpc_with_subnets(&ec2, &ns).await;
    for (i, instance) in run_instances(&ec2, &network.public_subnets[0].id, 2)
        .await
        .iter()
        .enumerate()
    {
        let mut node = node_for(instance, &format!("{ns}-node-{i}"));
        node.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(label.into(), ns.clone());
        create_node(&client, &node).await;
    }

    let env = vec![
        (
            "KUBECONFIG",
            cluster.kubeconfig_path().display().to_string(),
        ),
        ("AWS_ENDPOINT_URL", moto.endpoint().to_string()),
        ("AWS_ACCESS_KEY_ID", "AKIACLOUDLBTEST00000".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "cloudlb-test-secret".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
    ];
    let args = [
        "--cluster-name",
        &ns,
        "--namespace",
        &ns,
        "--classes",
        &ns,
        "--no-local",
        "--leader-elect",
        "--lease-namespace",
        &ns,
        "--lease-duration-seconds",
        "4",
        "--lease-grace-seconds",
        "1",
        // Slow enough that the kill below lands in the middle of the wave.
        "--aws-rate-limit",
        "5",
    ];
    let mut a = Operator::start(
        "a",
        &[&args[..], &["--lease-identity", "replica-a"]].concat(),
        &env,
    );
    let mut b = Operator::start(
        "b",
        &[&args[..], &["--lease-identity", "replica-b"]].concat(),
        &env,
    );

    // Exactly one leads; both are ready (a standby is ready too).
    let leader_is_a = wait_for("a leader", Duration::from_secs(30), || async {
        let (la, lb) = (
            a.metric("cloudlb_leader", "").await,
            b.metric("cloudlb_leader", "").await,
        );
        match (la == 1.0, lb == 1.0) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    for op in [&a, &b] {
        wait_for("ready", Duration::from_secs(30), || async {
            (op.get("/readyz").await?.0 == 200).then_some(())
        })
        .await;
    }

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let create = |name: String| {
        let services = services.clone();
        async move {
            let svc: Service = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]}
            }))
            .expect("svc");
            services
                .create(&PostParams::default(), &svc)
                .await
                .expect("create");
        }
    };
    let hostname = |name: String| {
        let services = services.clone();
        async move {
            let s = services.get(&name).await.ok()?;
            s.status?.load_balancer?.ingress?.first()?.hostname.clone()
        }
    };
    create("first".into()).await;
    wait_for("first converged", Duration::from_secs(30), || {
        hostname("first".into())
    })
    .await;
    let (leader, standby) = if leader_is_a {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let leader_writes = leader
        .metric(
            "cloudlb_cloud_api_calls_total",
            "operation=\"CreateLoadBalancer\"",
        )
        .await;
    assert_eq!(leader_writes, 1.0, "the leader created the NLB");
    assert_eq!(
        standby.metric("cloudlb_cloud_api_calls_total", "").await,
        0.0,
        "the standby made no cloud call"
    );
    assert!(
        leader.metric("cloudlb_reconcile_total", "").await >= 1.0,
        "reconciles counted"
    );

    // A wave of Services; kill -9 the leader in the middle of it. The standby takes over within
    // the lease duration, finishes the wave and converges a Service created meanwhile, with no
    // duplicate of what the leader had half-created.
    const WAVE: usize = 8;
    for i in 0..WAVE {
        create(format!("wave-{i}")).await;
    }
    wait_for("the leader mid-wave", Duration::from_secs(60), || async {
        let created = leader
            .metric(
                "cloudlb_cloud_api_calls_total",
                "operation=\"CreateLoadBalancer\"",
            )
            .await;
        (created >= 3.0).then_some(())
    })
    .await;
    let _ = leader.child.kill();
    let _ = leader.child.wait();
    let killed = Instant::now();
    let mut converged_before = 0;
    for i in 0..WAVE {
        converged_before += usize::from(hostname(format!("wave-{i}")).await.is_some());
    }
    assert!(
        converged_before < WAVE,
        "the whole wave converged before the kill: the test did not kill mid-wave"
    );
    create("second".into()).await;
    wait_for("standby takes over", Duration::from_secs(30), || async {
        (standby.metric("cloudlb_leader", "").await == 1.0).then_some(())
    })
    .await;
    eprintln!(
        "standby became leader {:?} after kill -9 (lease duration 4 s)",
        killed.elapsed()
    );
    for name in (0..WAVE)
        .map(|i| format!("wave-{i}"))
        .chain(["second".into()])
    {
        wait_for(
            &format!("{name} converged"),
            Duration::from_secs(60),
            || hostname(name.clone()),
        )
        .await;
    }
    eprintln!(
        "{converged_before}/{WAVE} of the wave had converged at the kill; all converged {:?} after it",
        killed.elapsed()
    );

    // No duplicates: exactly one NLB per Service.
    let lbs = elbv2
        .describe_load_balancers()
        .send()
        .await
        .expect("describe");
    // Only this test uses moto's default account in this test binary.
    let ours: Vec<_> = lbs
        .load_balancers()
        .iter()
        .filter_map(|l| l.load_balancer_name())
        .collect();
    assert_eq!(
        ours.len(),
        WAVE + 2,
        "one NLB per Service, no duplicates: {ours:?}"
    );
    let tgs = elbv2
        .describe_target_groups()
        .send()
        .await
        .expect("describe target groups");
    assert_eq!(
        tgs.target_groups().len(),
        WAVE + 2,
        "one target group per Service, no duplicates"
    );
    let sgs = ec2
        .describe_security_groups()
        .filters(
            support::ec2::types::Filter::builder()
                .name("tag:cloudlb.io/cluster")
                .values(&ns)
                .build(),
        )
        .send()
        .await
        .expect("describe security groups");
    assert_eq!(
        sgs.security_groups().len(),
        WAVE + 2,
        "one security group per Service, no duplicates"
    );
}
