//! The operator end to end against the testbed: a real kube-apiserver + etcd and moto.
//! Each test has its own namespace, LoadBalancerClass, Nodes (selected by a label), moto account
//! and operator instance (`support::env::Env`), so the tests run in parallel without seeing each
//! other.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::helpers::{self, web_and_dns_ports, web_ports};
use crate::support;

use cloudlb::config::class::LoadBalancerClass;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::env::{Env, wait_for};
use support::{TestGuard, describe, elbv2};

fn count(calls: &BTreeMap<String, u64>, key: &str) -> u64 {
    calls.get(key).copied().unwrap_or(0)
}

/// Waits until `registered(targets)` holds for every target group in `arns`.
async fn wait_every_target_group(
    env: &Env,
    arns: &[String],
    what: &str,
    registered: impl Fn(&[String]) -> bool,
) {
    for arn in arns {
        wait_for(&format!("{what} in {arn}"), || async {
            registered(&env.targets(arn).await).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_lifecycle_create_update_nodes_delete() {
    let _guard = TestGuard::new();
    let env = Env::start("lifecycle", Duration::from_secs(3600)).await;

    // Create: status shows the NLB's DNS name, and kubectl shows it as EXTERNAL-IP.
    let hostname = env.serve_web("web").await;
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), 1);
    assert_eq!(lbs[0].dns_name(), Some(hostname.as_str()));
    let create_calls = env.provider.calls();
    eprintln!("AWS calls for one create (P=2): {create_calls:?}");
    assert_eq!(count(&create_calls, "CreateLoadBalancer/ok"), 1);
    assert_eq!(count(&create_calls, "CreateTargetGroup/ok"), 2);
    assert_eq!(count(&create_calls, "RegisterTargets/ok"), 2);
    assert_eq!(count(&create_calls, "CreateListener/ok"), 2);
    assert_eq!(
        count(&create_calls, "ModifyLoadBalancerAttributes/ok"),
        0,
        "defaults need no attribute call"
    );
    assert_eq!(count(&create_calls, "ModifyTargetGroupAttributes/ok"), 0);
    // A new Service (no finalizer yet, never reconciled): nothing of ours can exist, so no
    // lookup of the load balancer, target groups or its security group before creating them.
    // The first Service of a process learns what all share: whether the backend group exists
    // (one DescribeSecurityGroups by name) and the nodes' group (DescribeInstances, and one
    // DescribeSecurityGroups for its tags and rules).
    assert_eq!(count(&create_calls, "DescribeSecurityGroups/ok"), 2);
    assert_eq!(count(&create_calls, "DescribeInstances/ok"), 1);
    for lookup in ["DescribeTargetGroups", "DescribeListeners"] {
        let n: u64 = create_calls
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{lookup}/")))
            .map(|(_, v)| *v)
            .sum();
        assert_eq!(n, 0, "{lookup} calls for a new Service: {create_calls:?}");
    }
    let out = env
        .cluster
        .kubectl(&["get", "svc", "-n", &env.ns, "web"])
        .await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&hostname), "kubectl get svc:\n{table}");
    let svc = env.services().get("web").await.expect("get");
    assert!(
        svc.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"cloudlb.io/load-balancer".to_string())
    );
    let lb_arn = lbs[0].load_balancer_arn().expect("arn").to_string();
    let tgs = env.target_groups().await;
    assert_eq!(tgs.len(), 2);
    let mut want_targets: Vec<String> = env.instances.iter().map(|i| i.id.clone()).collect();
    want_targets.sort();
    for tg in &tgs {
        assert_eq!(
            env.targets(tg.target_group_arn().expect("arn")).await,
            want_targets
        );
    }

    // The class reports how many Services use it and that it is valid.
    let classes: Api<LoadBalancerClass> = Api::all(env.client.clone());
    wait_for("class status", || async {
        let status = classes.get(&env.ns).await.ok()?.status?;
        let valid = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Valid" && c.status == "True");
        (status.service_count == 1 && valid).then_some(())
    })
    .await;

    // Unchanged resync: an edit that does not change the desired state makes no AWS call.
    let delta = env.calls_for_unrelated_edit("web", "unchanged").await;
    eprintln!("AWS calls for one unchanged resync: {delta:?}");
    assert!(delta.is_empty(), "unchanged resync made calls: {delta:?}");

    // Node added: exactly one RegisterTargets per target group, nothing else.
    let before = env.provider.calls();
    let extra = env.new_instance().await;
    let extra_node = env.add_node(&extra, 9).await;
    let tg_arns = describe::target_group_arns(&tgs);
    wait_every_target_group(&env, &tg_arns, "new node registered", |t| {
        t.contains(&extra.id)
    })
    .await;
    let delta = env.calls_since(&before);
    eprintln!("AWS calls for one node added: {delta:?}");
    // Its security group looked up once (it is the other nodes' group: no rule to add).
    assert_eq!(
        delta,
        BTreeMap::from([
            ("DescribeInstances/ok".to_string(), 1),
            ("RegisterTargets/ok".to_string(), 2)
        ])
    );

    // Node excluded by label: one DeregisterTargets per target group.
    let before = env.provider.calls();
    helpers::exclude_node(&env.client, &extra_node).await;
    wait_every_target_group(&env, &tg_arns, "excluded node deregistered", |t| {
        !t.contains(&extra.id)
    })
    .await;
    let delta = env.calls_since(&before);
    assert_eq!(
        delta,
        BTreeMap::from([("DeregisterTargets/ok".to_string(), 2)])
    );

    // Node deleted: nothing changes (it was already excluded) - then port added / removed.
    Api::<Node>::all(env.client.clone())
        .delete(&extra_node, &DeleteParams::default())
        .await
        .expect("delete node");
    env.patch_service("web", json!({"spec": {"ports": web_and_dns_ports()}}))
        .await;
    env.wait_listeners(&lb_arn, 3).await;
    let listeners = env.listeners(&lb_arn).await;
    assert!(listeners.iter().any(|l| l.port() == Some(53) && l.protocol() == Some(&elbv2::types::ProtocolEnum::Udp)));
    env.patch_service("web", json!({"spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}))
        .await;
    env.wait_listeners(&lb_arn, 1).await;
    env.wait_target_groups(1).await;

    // externalTrafficPolicy Local: HTTP health check on the healthCheckNodePort at /healthz.
    env.patch_service("web", json!({"spec": {"externalTrafficPolicy": "Local"}}))
        .await;
    let hc_port = wait_for("healthCheckNodePort", || async {
        env.services()
            .get("web")
            .await
            .ok()?
            .spec?
            .health_check_node_port
    })
    .await;
    let tg = wait_for("HTTP health check", || async {
        let tgs = env.target_groups().await;
        let tg = tgs.first()?.clone();
        (tg.health_check_protocol() == Some(&elbv2::types::ProtocolEnum::Http)).then_some(tg)
    })
    .await;
    assert_eq!(tg.health_check_path(), Some("/healthz"));
    assert_eq!(tg.health_check_port(), Some(hc_port.to_string().as_str()));

    // Delete: every resource goes, then the finalizer, then the Service.
    helpers::delete_service(&env.services(), "web").await;
    assert!(env.load_balancers().await.is_empty());
    assert!(env.target_groups().await.is_empty());
    assert!(env.our_security_groups().await.is_empty());
    assert!(!env.events("DeletedLoadBalancer").await.is_empty());
    assert!(!env.events("EnsuredLoadBalancer").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn type_change_removes_everything_and_the_finalizer() {
    let _guard = TestGuard::new();
    let env = Env::start("typechange", Duration::from_secs(3600)).await;
    env.serve_web("web").await;
    assert_eq!(env.load_balancers().await.len(), 1);

    // LoadBalancer -> ClusterIP: the API server needs the nodePorts dropped with the type.
    let svc = env.services().get("web").await.expect("get");
    let mut ports = svc.spec.and_then(|s| s.ports).unwrap_or_default();
    for p in &mut ports {
        p.node_port = None;
    }
    env.patch_service(
        "web",
        json!({"spec": {"type": "ClusterIP", "ports": ports}}),
    )
    .await;
    wait_for("finalizer removed", || async {
        let svc = env.services().get("web").await.ok()?;
        (!svc
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == "cloudlb.io/load-balancer"))
        .then_some(())
    })
    .await;
    assert!(env.load_balancers().await.is_empty());
    assert!(env.target_groups().await.is_empty());
    assert!(env.our_security_groups().await.is_empty());
    assert_eq!(env.hostname("web").await, None, "status cleared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_annotations_give_one_event_and_change_nothing() {
    let _guard = TestGuard::new();
    let env = Env::start("invalid", Duration::from_secs(3600)).await;

    // A new Service with bad input: an Event naming every problem, and no AWS call at all.
    env.create_service(
        "bad",
        json!({"cloudlb.io/scheme": "public", "service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval": "1"}),
        web_ports(),
    )
    .await;
    let notes = env.wait_events("InvalidConfiguration").await;
    let note = &notes[0];
    assert!(
        note.contains(
            "annotation cloudlb.io/scheme = \"public\": allowed values: internet-facing, internal"
        ),
        "{note}"
    );
    assert!(
        note.contains("service.beta.kubernetes.io/aws-load-balancer-healthcheck-interval = \"1\""),
        "{note}"
    );
    assert!(
        env.provider.calls().is_empty(),
        "no cloud call for invalid input: {:?}",
        env.provider.calls()
    );

    // An existing load balancer stays exactly as it was when its Service turns invalid.
    let hostname = env.serve_web("good").await;
    // The NLB provisioned: the state poll saw it active.
    env.wait_reconciles("verified", 0).await;
    let delta = env
        .calls_for_edit(
            "good",
            json!({"metadata": {"annotations": {"cloudlb.io/target-type": "pod"}}}),
            "invalid",
        )
        .await;
    assert!(delta.is_empty(), "invalid edit made AWS calls: {delta:?}");
    assert_eq!(
        env.hostname("good").await.as_deref(),
        Some(hostname.as_str())
    );
    assert_eq!(env.load_balancers().await.len(), 1);
    assert_eq!(env.target_groups().await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_named_foreign_nlb_is_never_touched() {
    let _guard = TestGuard::new();
    let env = Env::start("foreign", Duration::from_secs(3600)).await;
    let foreign =
        helpers::create_nlb(&env.elbv2, "someone-elses", env.network.public_subnet_ids()).await;
    let foreign_arn = foreign.load_balancer_arn().expect("arn").to_string();

    env.create_service(
        "web",
        json!({"service.beta.kubernetes.io/aws-load-balancer-name": "someone-elses"}),
        web_ports(),
    )
    .await;
    let notes = env.wait_events("SyncLoadBalancerFailed").await;
    assert!(
        notes[0].contains("someone-elses") && notes[0].contains("not ours"),
        "{}",
        notes[0]
    );
    let writes = env.provider.write_calls();
    assert_eq!(
        writes,
        0,
        "no write against a foreign resource: {:?}",
        env.provider.calls()
    );
    assert!(env.listeners(&foreign_arn).await.is_empty());
    assert_eq!(env.hostname("web").await, None);

    // Deleting the Service leaves the foreign NLB alone.
    helpers::delete_service(&env.services(), "web").await;
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), 1);
    assert_eq!(lbs[0].load_balancer_arn(), Some(foreign_arn.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_deleted_by_hand_is_recreated_by_the_drift_check() {
    let _guard = TestGuard::new();
    // A short re-verification interval so the drift check runs within the test.
    let env = Env::start("drift", Duration::from_secs(3)).await;
    env.serve_web("web").await;
    let lbs = env.load_balancers().await;
    let old_arn = lbs[0].load_balancer_arn().expect("arn").to_string();
    env.elbv2
        .delete_load_balancer()
        .load_balancer_arn(&old_arn)
        .send()
        .await
        .expect("console delete");
    // Someone also removes a target.
    let tg = env.target_groups().await[0]
        .target_group_arn()
        .expect("arn")
        .to_string();
    env.elbv2
        .deregister_targets()
        .target_group_arn(&tg)
        .targets(
            elbv2::types::TargetDescription::builder()
                .id(&env.instances[0].id)
                .build(),
        )
        .send()
        .await
        .expect("deregister by hand");

    let new_lb = wait_for("NLB recreated", || async {
        let lbs = env.load_balancers().await;
        lbs.into_iter()
            .find(|l| l.load_balancer_arn() != Some(old_arn.as_str()))
    })
    .await;
    let arn = new_lb.load_balancer_arn().expect("arn").to_string();
    env.wait_listeners(&arn, 2).await;
    wait_for("target re-registered", || async {
        (env.targets(&tg).await.len() == env.instances.len()).then_some(())
    })
    .await;
    assert_eq!(env.load_balancers().await.len(), 1);
    assert_eq!(
        env.target_groups().await.len(),
        2,
        "target groups reused, not duplicated"
    );
    let dns = new_lb.dns_name().expect("dns").to_string();
    wait_for("status shows the new NLB", || async {
        (env.hostname("web").await? == dns).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restarted_mid_provisioning_makes_exactly_one_nlb() {
    let _guard = TestGuard::new();
    let mut env = Env::start("restart", Duration::from_secs(3600)).await;
    env.create_service("web", json!({}), web_ports()).await;
    // Stop the operator as soon as the NLB exists, before it finished the rest.
    wait_for("CreateLoadBalancer", || async {
        (env.provider
            .calls()
            .get("CreateLoadBalancer/ok")
            .copied()
            .unwrap_or(0)
            > 0)
        .then_some(())
    })
    .await;
    env.stop_operator();
    let partial = env.load_balancers().await;
    assert_eq!(partial.len(), 1);

    // A fresh operator (empty cache) picks up where the first one stopped.
    env.restart_operator();
    env.wait_hostname("web").await;
    let arn = partial[0].load_balancer_arn().expect("arn").to_string();
    env.wait_listeners(&arn, 2).await;
    assert_eq!(env.load_balancers().await.len(), 1, "exactly one NLB");
    assert_eq!(
        env.target_groups().await.len(),
        2,
        "no duplicate target groups"
    );
    assert_eq!(
        env.provider
            .calls()
            .get("CreateLoadBalancer/ok")
            .copied()
            .unwrap_or(0),
        0,
        "the restarted operator created no second NLB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_added_with_ten_services_is_one_register_call_per_target_group() {
    let _guard = TestGuard::new();
    let env = Env::start("tenservices", Duration::from_secs(3600)).await;
    for i in 0..10 {
        env.create_service(&format!("svc-{i}"), json!({}), web_ports())
            .await;
    }
    for i in 0..10 {
        env.wait_hostname(&format!("svc-{i}")).await;
    }
    // Every NLB provisioned: each Service's state poll saw it active.
    wait_for("all active", || async {
        (env.metrics.reconcile_count("verified") >= 10).then_some(())
    })
    .await;
    assert_eq!(env.load_balancers().await.len(), 10);
    let before = env.provider.calls();
    let extra = env.new_instance().await;
    env.add_node(&extra, 10).await;
    wait_for("20 registrations", || async {
        let d = env.calls_since(&before);
        (d.get("RegisterTargets/ok").copied().unwrap_or(0) >= 20).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delta = env.calls_since(&before);
    eprintln!("AWS calls for one node added with 10 Services (P=2): {delta:?}");
    // The new instance's security group is looked up once (for the backend rules; it is the
    // group the other nodes have, which already admits the load balancers).
    assert_eq!(
        delta,
        BTreeMap::from([
            ("DescribeInstances/ok".to_string(), 1),
            ("RegisterTargets/ok".to_string(), 20)
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_a_service_that_is_gone_are_swept() {
    let _guard = TestGuard::new();
    let mut env = Env::start("orphans", Duration::from_secs(3600)).await;
    env.stop_operator();
    env.orphan_sweep = Duration::from_secs(2);
    env.start_operator();
    env.create_service("gone", json!({}), web_ports()).await;
    env.create_service("kept", json!({}), web_ports()).await;
    env.wait_hostname("gone").await;
    env.wait_hostname("kept").await;
    assert_eq!(env.load_balancers().await.len(), 2);

    // The operator is down while someone force-deletes a Service (finalizer stripped by hand).
    env.stop_operator();
    env.patch_service("gone", json!({"metadata": {"finalizers": null}}))
        .await;
    helpers::delete_service(&env.services(), "gone").await;

    // Back up: the sweep finds the resources tagged for the vanished Service and deletes them,
    // and only them.
    env.start_operator();
    wait_for("orphaned NLB deleted", || async {
        (env.load_balancers().await.len() == 1).then_some(())
    })
    .await;
    // The orphaned target groups deleted.
    env.wait_target_groups(2).await;
    wait_for("orphaned security group deleted", || async {
        (env.our_security_groups().await.len() == 1).then_some(())
    })
    .await;
    let kept = env
        .hostname("kept")
        .await
        .expect("kept still has its address");
    assert_eq!(
        env.load_balancers().await[0].dns_name(),
        Some(kept.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_events_become_one_series_and_new_notes_new_events() {
    use cloudlb::controller::events::{EventType, Recorder};
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::events::v1::Event;
    let _guard = TestGuard::new();
    let cluster = support::TestCluster::shared().await;
    let ns = cluster.create_namespace("events").await;
    let recorder = Recorder::new(cluster.client(), "cloudlb-test");
    let svc = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(ns.clone()),
        name: Some("web".into()),
        uid: Some("0b5e1c7e-0000-4000-8000-000000000001".into()),
        ..Default::default()
    };
    for _ in 0..3 {
        recorder
            .publish(
                &svc,
                EventType::Warning,
                "SyncLoadBalancerFailed",
                "throttled".into(),
            )
            .await
            .expect("publish");
    }
    recorder
        .publish(
            &svc,
            EventType::Warning,
            "SyncLoadBalancerFailed",
            "access denied".into(),
        )
        .await
        .expect("publish");
    recorder
        .publish(
            &svc,
            EventType::Normal,
            "EnsuredLoadBalancer",
            "x".repeat(5000),
        )
        .await
        .expect("publish");
    let events = Api::<Event>::namespaced(cluster.client(), &ns)
        .list(&Default::default())
        .await
        .expect("list events")
        .items;
    let mut seen: Vec<(String, String, i32, usize)> = events
        .iter()
        .map(|e| {
            (
                e.reason.clone().unwrap_or_default(),
                e.type_.clone().unwrap_or_default(),
                e.series.as_ref().map_or(1, |s| s.count),
                e.note.as_ref().map_or(0, String::len),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("EnsuredLoadBalancer".into(), "Normal".into(), 1, 1000),
            ("SyncLoadBalancerFailed".into(), "Warning".into(), 1, 13),
            ("SyncLoadBalancerFailed".into(), "Warning".into(), 3, 9),
        ],
        "three identical Events are one with count 3; another note is another Event; notes are capped at 1 kB"
    );
    assert!(
        events
            .iter()
            .all(|e| e.regarding.as_ref().and_then(|r| r.uid.as_deref())
                == Some("0b5e1c7e-0000-4000-8000-000000000001")
                && e.reporting_controller.as_deref() == Some("cloudlb-test"))
    );
    assert_eq!(recorder.remembered(), 3, "one entry per distinct Event");
}
