//! Pod targets (`target-type: ip`, as aws-load-balancer-controller means it): pods whose status
//! is written as a kubelet would → the controller-manager's EndpointSlices → exactly the ready
//! pods' IPs at the targetPort in the target group, with endpoint churn batched into few calls.

use crate::support;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::env::{Env, wait_for};
use support::{TestGuard, describe, fixtures};

/// Creates pod `name` (labels `app: <app>`, one container port `http`/8080) bound to Node `node`
/// and writes the status a kubelet would: Running at `ip`, Ready as `ready` says. The
/// controller-manager's EndpointSlice controller then lists it.
pub async fn create_pod(
    client: &Client,
    ns: &str,
    app: &str,
    name: &str,
    node: &str,
    ip: &str,
    ready: bool,
) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": "registry.invalid/app:1",
                "ports": [{"name": "http", "containerPort": 8080}]}]
        }
    }))
    .unwrap_or_else(|e| panic!("pod {name}: {e}"));
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch the status of pod {name}: {e}"));
    set_pod_ready(client, ns, name, ready).await;
}

/// Writes pod `name`'s Ready condition (what a kubelet does when its readiness probe changes).
pub async fn set_pod_ready(client: &Client, ns: &str, name: &str, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let status = if ready { "True" } else { "False" };
    let conditions = json!({"status": {"conditions": [
        {"type": "Ready", "status": status, "lastTransitionTime": "2024-01-01T00:00:00Z"},
        {"type": "ContainersReady", "status": status, "lastTransitionTime": "2024-01-01T00:00:00Z"}
    ]}});
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Strategic(&conditions),
    )
    .await
    .unwrap_or_else(|e| panic!("set pod {name} ready={ready}: {e}"));
}

/// The registered targets of `tg_arn` as `ip:port`, sorted.
pub async fn pod_targets(env: &Env, tg_arn: &str) -> Vec<String> {
    let mut t: Vec<String> = describe::target_health(&env.elbv2, tg_arn)
        .await
        .iter()
        .filter_map(|d| d.target())
        .map(|t| format!("{}:{}", t.id().unwrap_or_default(), t.port().unwrap_or(0)))
        .collect();
    t.sort();
    t
}

async fn wait_pod_targets(env: &Env, tg_arn: &str, want: &[String], what: &str) {
    wait_for(what, || async {
        (pod_targets(env, tg_arn).await == want).then_some(())
    })
    .await;
}

/// Pod `i`'s IP, in the VPC's first public subnet (10.0.x.0/24).
pub fn pod_ip(env: &Env, i: usize) -> String {
    let cidr = &env.network.public_subnets[0].cidr;
    let base = cidr.rsplit_once('.').map_or("10.0.0", |(b, _)| b);
    format!("{base}.{}", 100 + i)
}

/// Ready pods `web-<i>` of app `web` on Node `node`, for each `i` of `pods`.
async fn ready_pods(env: &Env, node: &str, pods: std::ops::Range<usize>) {
    for i in pods {
        let name = format!("web-{i}");
        create_pod(
            &env.client,
            &env.ns,
            "web",
            &name,
            node,
            &pod_ip(env, i),
            true,
        )
        .await;
    }
}

fn at_8080(env: &Env, pods: impl IntoIterator<Item = usize>) -> Vec<String> {
    let mut v: Vec<String> = pods
        .into_iter()
        .map(|i| format!("{}:8080", pod_ip(env, i)))
        .collect();
    v.sort();
    v
}

fn count(calls: &BTreeMap<String, u64>, key: &str) -> u64 {
    calls.get(key).copied().unwrap_or(0)
}

/// The most (de)register calls a target group may get for churn that lasted `churn`: one per
/// batching window it spans, plus the window the last change fell into.
fn bound(churn: Duration, window: Duration) -> u64 {
    (churn.as_secs_f64() / window.as_secs_f64()).ceil() as u64 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_targets_follow_the_ready_endpoints_in_batches() {
    let _guard = TestGuard::new();
    let env = Env::start("podtargets", Duration::from_secs(3600)).await;
    let window = cloudlb::controller::Settings::new("x").endpoint_window;
    let node = format!("{}-node-0", env.ns);
    // No nodePorts at all: pod targets need none.
    let svc = fixtures::lb_service(
        "web",
        json!({"service.beta.kubernetes.io/aws-load-balancer-nlb-target-type": "ip"}),
        json!({
            "selector": {"app": "web"},
            "allocateLoadBalancerNodePorts": false,
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
        }),
    );
    fixtures::create_service(&env.services(), &svc).await;

    // No pod yet: the load balancer is made with an empty target group, and the user is told.
    env.wait_hostname("web").await;
    let notes = env.wait_events("NoReadyEndpoints").await;
    assert!(notes[0].contains("port(s) 80"), "{notes:?}");
    let tgs = env.target_groups().await;
    assert_eq!(tgs.len(), 1);
    let tg = &tgs[0];
    let arn = tg.target_group_arn().unwrap().to_string();
    assert_eq!(tg.target_type().map(|t| t.as_str()), Some("ip"));
    assert_eq!(
        tg.port(),
        Some(1),
        "a named targetPort: the targets carry the port"
    );
    assert!(pod_targets(&env, &arn).await.is_empty());

    // Three ready pods (and one that is not): exactly the ready ones, at the port the named
    // targetPort resolves to.
    ready_pods(&env, &node, 0..3).await;
    create_pod(
        &env.client,
        &env.ns,
        "web",
        "web-starting",
        &node,
        &pod_ip(&env, 50),
        false,
    )
    .await;
    wait_pod_targets(&env, &arn, &at_8080(&env, 0..3), "the 3 ready pods").await;
    // moto has no network interfaces for these made-up pod IPs: no security group to admit the
    // load balancer in, said in an Event naming them; the pods are registered all the same.
    let notes = env.wait_events("TargetSecurityGroupNotChanged").await;
    assert!(
        notes.iter().any(|n| n.contains(&format!(
            "the network interface of {} was not found",
            pod_ip(&env, 0)
        ))),
        "{notes:?}"
    );

    // A pod whose IP is outside the VPC (a host-network pod on a node elsewhere): told, not
    // registered; the others stay.
    create_pod(
        &env.client,
        &env.ns,
        "web",
        "web-elsewhere",
        &node,
        "192.168.77.7",
        true,
    )
    .await;
    let notes = env.wait_events("TargetsOutsideVpc").await;
    assert!(
        notes.iter().any(|n| n.contains("192.168.77.7:8080")),
        "{notes:?}"
    );
    assert_eq!(pod_targets(&env, &arn).await, at_8080(&env, 0..3));
    Api::<Pod>::namespaced(env.client.clone(), &env.ns)
        .delete("web-elsewhere", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();

    // A pod turning NotReady is deregistered; ready again, registered again.
    set_pod_ready(&env.client, &env.ns, "web-1", false).await;
    wait_pod_targets(&env, &arn, &at_8080(&env, [0, 2]), "web-1 deregistered").await;
    set_pod_ready(&env.client, &env.ns, "web-1", true).await;
    wait_pod_targets(&env, &arn, &at_8080(&env, 0..3), "web-1 registered again").await;

    // Scale 3 → 10 → 3, counting the calls.
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let before = env.provider.calls();
    let started = Instant::now();
    ready_pods(&env, &node, 3..10).await;
    let up_churn = started.elapsed();
    wait_pod_targets(&env, &arn, &at_8080(&env, 0..10), "10 pods").await;
    let up = env.calls_since(&before);
    let before = env.provider.calls();
    let started = Instant::now();
    for i in 3..10 {
        pods.delete(&format!("web-{i}"), &DeleteParams::default())
            .await
            .unwrap();
    }
    let down_churn = started.elapsed();
    wait_pod_targets(&env, &arn, &at_8080(&env, 0..3), "back to 3 pods").await;
    let down = env.calls_since(&before);
    eprintln!(
        "pod targets, scale 3→10 ({up_churn:?} of churn): {up:?}; 10→3 ({down_churn:?}): {down:?}; batching window {window:?}"
    );
    let (registers, deregisters) = (
        count(&up, "RegisterTargets/ok"),
        count(&down, "DeregisterTargets/ok"),
    );
    assert!(
        (1..=bound(up_churn, window)).contains(&registers),
        "7 pods added in {up_churn:?}: {registers} RegisterTargets calls, at most {} allowed",
        bound(up_churn, window)
    );
    assert!(
        (1..=bound(down_churn, window)).contains(&deregisters),
        "7 pods removed in {down_churn:?}: {deregisters} DeregisterTargets calls, at most {} allowed",
        bound(down_churn, window)
    );
    // New pod IPs: their network interfaces' security groups are looked up, once per batch
    // (for the backend rules); nothing else.
    let lookups = count(&up, "DescribeNetworkInterfaces/ok");
    assert!(lookups <= registers, "{up:?}");
    assert!(
        up.keys()
            .all(|k| k == "RegisterTargets/ok" || k == "DescribeNetworkInterfaces/ok"),
        "endpoint churn makes (de)register calls and lookups of new pod IPs only: {up:?}"
    );
    assert!(
        down.keys().all(|k| k == "DeregisterTargets/ok"),
        "removing pods makes deregister calls only: {down:?}"
    );
}
