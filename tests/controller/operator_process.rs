//! The `cloudlb run` process: prompt exit on SIGTERM, /metrics /healthz /readyz, and leader
//! election between two replicas against the real API server and moto.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::support;

use serde_json::json;
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use support::describe;
use support::env::{Env, Setup, wait_within};
use support::operator::{OperatorProcess, operator_env, scope_args};
use support::process::free_port;
use support::{AwsEmulator, TestGuard};

/// moto's account for requests without our account header (what a plain SDK client uses).
const DEFAULT_ACCOUNT: &str = "123456789012";

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
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
    let mut op = OperatorProcess::start(
        "unreachable",
        &["--cluster-name", "x", "--no-aws"],
        &[("KUBECONFIG", kubeconfig.display().to_string())],
    );
    // Up: /healthz answers, /readyz does not (no cache can sync).
    let (status, _) = wait_within("healthz", Duration::from_secs(20), || async {
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
    // The processes use plain credentials: moto's default account. The class, its Nodes and
    // the Services are this test's; the operators are the two processes below.
    let setup = Setup {
        account: Some(DEFAULT_ACCOUNT.to_string()),
        ..Setup::without_operator()
    };
    let env = Env::start_with("leader", setup).await;
    let (cluster, ns) = (env.cluster, env.ns.clone());

    let vars = operator_env(AwsEmulator::shared().await.endpoint(), cluster);
    let mut args = scope_args(&ns);
    args.extend([
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
    ]);
    let mut a = OperatorProcess::start(
        "a",
        &[&args[..], &["--lease-identity", "replica-a"]].concat(),
        &vars,
    );
    let mut b = OperatorProcess::start(
        "b",
        &[&args[..], &["--lease-identity", "replica-b"]].concat(),
        &vars,
    );

    // Exactly one leads; both are ready (a standby is ready too).
    let leader_is_a = wait_within("a leader", Duration::from_secs(30), || async {
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
        wait_within("ready", Duration::from_secs(30), || async {
            (op.get("/readyz").await?.0 == 200).then_some(())
        })
        .await;
    }

    let ports = || json!([{"port": 80, "protocol": "TCP"}]);
    env.create_service("first", json!({}), ports()).await;
    wait_within("first converged", Duration::from_secs(30), || {
        env.hostname("first")
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
    // Counted when the reconcile ends, which may be a moment after its status write.
    wait_within("reconciles counted", Duration::from_secs(10), || async {
        (leader.metric("cloudlb_reconcile_total", "").await >= 1.0).then_some(())
    })
    .await;

    // A wave of Services; kill -9 the leader in the middle of it. The standby takes over within
    // the lease duration, finishes the wave and converges a Service created meanwhile, with no
    // duplicate of what the leader had half-created.
    const WAVE: usize = 8;
    for i in 0..WAVE {
        env.create_service(&format!("wave-{i}"), json!({}), ports())
            .await;
    }
    wait_within("the leader mid-wave", Duration::from_secs(60), || async {
        let created = leader
            .metric(
                "cloudlb_cloud_api_calls_total",
                "operation=\"CreateLoadBalancer\"",
            )
            .await;
        (created >= 3.0).then_some(())
    })
    .await;
    leader.kill();
    let killed = Instant::now();
    let mut converged_before = 0;
    for i in 0..WAVE {
        converged_before += usize::from(env.hostname(&format!("wave-{i}")).await.is_some());
    }
    assert!(
        converged_before < WAVE,
        "the whole wave converged before the kill: the test did not kill mid-wave"
    );
    env.create_service("second", json!({}), ports()).await;
    wait_within("standby takes over", Duration::from_secs(30), || async {
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
        wait_within(
            &format!("{name} converged"),
            Duration::from_secs(60),
            || env.hostname(&name),
        )
        .await;
    }
    eprintln!(
        "{converged_before}/{WAVE} of the wave had converged at the kill; all converged {:?} after it",
        killed.elapsed()
    );

    // No duplicates: exactly one NLB per Service. Only this test uses moto's default account
    // in this test binary.
    let ours = env.load_balancer_names().await;
    assert_eq!(
        ours.len(),
        WAVE + 2,
        "one NLB per Service, no duplicates: {ours:?}"
    );
    assert_eq!(
        env.target_groups().await.len(),
        WAVE + 2,
        "one target group per Service, no duplicates"
    );
    assert_eq!(
        describe::security_groups(&env.ec2, &ns).await.len(),
        WAVE + 2,
        "one security group per Service, no duplicates"
    );
}
