//! What only a current API server can hold (the testbed's release, `testbed/versions`):
//! `spec.loadBalancerClass` routing, mixed TCP/UDP LoadBalancer Services without a feature gate,
//! and `allocateLoadBalancerNodePorts`. Each test has its own namespace, class, Nodes, moto
//! account and operator (`support::env::Env`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::helpers;
use crate::support;

use cloudlb::config::class::LoadBalancerClass;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use std::time::Duration;
use support::env::{Env, wait_for};
use support::process::testbed_version;
use support::{TestCluster, TestGuard, fixtures};

const FINALIZER: &str = "cloudlb.io/load-balancer";

async fn create(env: &Env, name: &str, spec: serde_json::Value) {
    fixtures::create_service(
        &env.services(),
        &fixtures::lb_service(name, json!({}), spec),
    )
    .await;
}

fn finalizers(svc: &Service) -> Vec<String> {
    svc.metadata.finalizers.clone().unwrap_or_default()
}

/// cloudlb's Events about one object (any reason). The API server reports on Services too (its
/// ClusterIP repair loop can race a new Service: `ClusterIPNotAllocated`), so only Events that
/// cloudlb reported count.
async fn events_about(env: &Env, name: &str) -> Vec<String> {
    helpers::events(&env.client, &env.ns)
        .await
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reporting_controller.as_deref() == Some("cloudlb"))
        .map(|e| format!("{:?}: {:?}", e.reason, e.note))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_cluster_runs_the_testbed_release() {
    let _guard = TestGuard::new();
    let cluster = TestCluster::shared().await;
    let out = cluster.kubectl(&["version", "-o", "json"]).await;
    assert!(out.status.success(), "kubectl version: {out:?}");
    let version: serde_json::Value = serde_json::from_slice(&out.stdout).expect("version JSON");
    let want = format!("v{}", testbed_version("CLOUDLB_KUBE_VERSION"));
    assert_eq!(
        version["serverVersion"]["gitVersion"], want,
        "kubectl version: {version}"
    );
    eprintln!(
        "server {} (TestCluster::start() took {} ms)",
        version["serverVersion"]["gitVersion"],
        cluster.start_time().as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_routing_serves_our_classes_and_never_touches_another_class() {
    let _guard = TestGuard::new();
    let env = Env::start("classes", Duration::from_secs(3600)).await;
    let ports = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    // Named class (the API server keeps the field: 1.20 dropped it), no class (the default class),
    // and another controller's class.
    create(
        &env,
        "named",
        json!({"loadBalancerClass": format!("cloudlb.io/{}", env.ns), "ports": ports}),
    )
    .await;
    create(&env, "classless", json!({"ports": ports})).await;
    let not_ours = env.metrics.reconcile_count("not_ours");
    create(
        &env,
        "foreign",
        json!({"loadBalancerClass": "service.k8s.aws/nlb", "ports": ports}),
    )
    .await;
    let named = env.wait_hostname("named").await;
    let classless = env.wait_hostname("classless").await;
    assert_ne!(named, classless, "one load balancer each");
    // The operator has seen the foreign Service and decided it is not ours.
    env.wait_reconciles("not_ours", not_ours).await;

    let svc = env.services().get("named").await.expect("get named");
    assert_eq!(
        svc.spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref()),
        Some(format!("cloudlb.io/{}", env.ns).as_str()),
        "the server keeps spec.loadBalancerClass"
    );
    assert!(finalizers(&svc).iter().any(|f| f == FINALIZER));
    let foreign = env.services().get("foreign").await.expect("get foreign");
    assert!(
        !finalizers(&foreign).iter().any(|f| f == FINALIZER),
        "no finalizer on another class's Service: {:?}",
        foreign.metadata.finalizers
    );
    assert!(
        foreign
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .is_none_or(Vec::is_empty),
        "no status on another class's Service: {:?}",
        foreign.status
    );
    assert_eq!(
        events_about(&env, "foreign").await,
        Vec::<String>::new(),
        "no Event about another class's Service"
    );
    let lbs = env.load_balancers().await;
    let mut dns: Vec<&str> = lbs.iter().filter_map(|lb| lb.dns_name()).collect();
    dns.sort();
    let mut want = vec![named.as_str(), classless.as_str()];
    want.sort();
    assert_eq!(dns, want, "exactly the two load balancers of our Services");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_udp_on_one_port_become_one_tcp_udp_listener() {
    let _guard = TestGuard::new();
    let env = Env::start("mixed", Duration::from_secs(3600)).await;
    // No feature gate on a current server; it gives both protocols of a port one nodePort.
    create(
        &env,
        "dns",
        json!({"ports": [
            {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
            {"name": "dns-udp", "port": 53, "targetPort": 5353, "protocol": "UDP"}
        ]}),
    )
    .await;
    let svc = env.services().get("dns").await.expect("get");
    let node_ports: Vec<Option<i32>> = svc
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .map(|p| p.node_port)
        .collect();
    assert_eq!(node_ports.len(), 2);
    assert!(
        node_ports[0].is_some() && node_ports[0] == node_ports[1],
        "one nodePort for both protocols of port 53: {node_ports:?}"
    );
    env.wait_hostname("dns").await;
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), 1);
    let listeners = env
        .listeners(lbs[0].load_balancer_arn().expect("arn"))
        .await;
    let got: Vec<(Option<i32>, Option<&str>)> = listeners
        .iter()
        .map(|l| (l.port(), l.protocol().map(|p| p.as_str())))
        .collect();
    assert_eq!(got, [(Some(53), Some("TCP_UDP"))], "one TCP_UDP listener");
    let groups = env.target_groups().await;
    assert_eq!(groups.len(), 1, "one target group");
    assert_eq!(groups[0].protocol().map(|p| p.as_str()), Some("TCP_UDP"));
    assert_eq!(groups[0].port(), node_ports[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_ports_is_refused_with_an_event_until_the_server_allocates_them() {
    let _guard = TestGuard::new();
    let env = Env::start("nonodeports", Duration::from_secs(3600)).await;
    let invalid = env.metrics.reconcile_count("invalid");
    create(
        &env,
        "web",
        json!({"allocateLoadBalancerNodePorts": false,
               "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
    )
    .await;
    let svc = env.services().get("web").await.expect("get");
    assert_eq!(
        svc.spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .and_then(|p| p[0].node_port),
        None,
        "the server allocated no nodePort"
    );
    env.wait_reconciles("invalid", invalid).await;
    let notes = wait_for("a Warning Event about the missing nodePort", || async {
        let notes = events_about(&env, "web").await;
        (!notes.is_empty()).then_some(notes)
    })
    .await;
    assert!(
        notes.iter().any(|n| n.contains("InvalidConfiguration")
            && n.contains("spec.allocateLoadBalancerNodePorts = \\\"false\\\"")
            && n.contains("set it to true")),
        "{notes:?}"
    );
    assert!(
        env.provider.calls().is_empty(),
        "no cloud call: {:?}",
        env.provider.calls()
    );
    assert!(env.load_balancers().await.is_empty());

    // Turned on: the server allocates the nodePort and the load balancer follows.
    env.patch_service(
        "web",
        json!({"spec": {"allocateLoadBalancerNodePorts": true}}),
    )
    .await;
    let hostname = env.wait_hostname("web").await;
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), 1);
    assert_eq!(lbs[0].dns_name(), Some(hostname.as_str()));
}

fn recorded_provider(svc: &Service) -> Option<String> {
    svc.metadata
        .annotations
        .as_ref()?
        .get("state.cloudlb.io/provider")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_moved_to_another_provider_moves_the_load_balancer_and_leaves_nothing_behind() {
    let _guard = TestGuard::new();
    let mut env = Env::start("switch", Duration::from_secs(3600)).await;
    env.with_local_provider().await;
    let classes: Api<LoadBalancerClass> = Api::all(env.client.clone());
    create(
        &env,
        "web",
        json!({"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}),
    )
    .await;
    env.wait_hostname("web").await;
    let first = env.load_balancers().await;
    assert_eq!(first.len(), 1);
    let svc = env.services().get("web").await.expect("get");
    assert_eq!(recorded_provider(&svc).as_deref(), Some("aws"));

    // aws → local: the NLB, its target group and security group go; the local address comes.
    classes
        .patch(
            &env.ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provider": "local", "aws": null,
                                          "local": {"addressPool": "127.18.1.0/28"}}})),
        )
        .await
        .expect("patch class to local");
    let ip = wait_for("a local address in the status", || async {
        fixtures::ingress(&env.services(), "web").await?.ip
    })
    .await;
    assert!(ip.starts_with("127.18.1."), "{ip}");
    assert!(env.load_balancers().await.is_empty(), "the NLB is gone");
    assert!(env.target_groups().await.is_empty(), "its target group too");
    assert!(
        env.our_security_groups().await.is_empty(),
        "and its security group"
    );
    let svc = env.services().get("web").await.expect("get");
    assert_eq!(recorded_provider(&svc).as_deref(), Some("local"));
    assert!(
        tokio::net::TcpStream::connect(format!("{ip}:80"))
            .await
            .is_ok(),
        "the local load balancer listens"
    );

    // local → aws: a new NLB, and the local listener is closed.
    classes
        .patch(
            &env.ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"provider": "aws", "local": null,
                                          "aws": {"targetNodeLabels": {fixtures::LABEL: env.ns}}}})),
        )
        .await
        .expect("patch class back to aws");
    env.wait_hostname("web").await;
    let again = env.load_balancers().await;
    assert_eq!(again.len(), 1);
    assert_ne!(
        again[0].load_balancer_arn(),
        first[0].load_balancer_arn(),
        "a new NLB"
    );
    let svc = env.services().get("web").await.expect("get");
    assert_eq!(recorded_provider(&svc).as_deref(), Some("aws"));
    wait_for("the local listener closed", || async {
        tokio::net::TcpStream::connect(format!("{ip}:80"))
            .await
            .is_err()
            .then_some(())
    })
    .await;
}
