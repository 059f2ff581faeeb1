//! Restarts cost no cloud calls: a converged Service carries its checkpoint
//! (`state.cloudlb.io/checkpoint`), and a fresh operator trusts it until the drift check. A
//! checkpoint is never trusted for a write: one that names a load balancer deleted or untagged
//! meanwhile, or that is garbage, costs reads and never a write to what is not ours.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::helpers::{self, web_ports};
use crate::support;

use cloudlb::model::checkpoint::CHECKPOINT_ANNOTATION;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::env::{Env, Setup, wait_for};
use support::{TestGuard, describe};

/// Short, so the drift check comes within the test; long enough that the first seconds after a
/// start are before it.
const RESYNC: Duration = Duration::from_secs(8);

/// Serves `names` and waits until each carries its checkpoint; their hostnames.
async fn converge(env: &Env, names: &[&str]) -> BTreeMap<String, String> {
    let mut hostnames = BTreeMap::new();
    for name in names {
        env.create_service(name, json!({}), web_ports()).await;
    }
    for name in names {
        hostnames.insert(name.to_string(), env.wait_hostname(name).await);
    }
    env.wait_checkpoints(names).await;
    hostnames
}

async fn hostnames(env: &Env, names: &[&str]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in names {
        out.insert(
            name.to_string(),
            env.hostname(name).await.unwrap_or_default(),
        );
    }
    out
}

/// Restarts the operator and waits until it reconciled `services` Services without a change:
/// with their checkpoints trusted, no AWS call at all.
async fn restart_trusting_checkpoints(env: &mut Env, services: usize) {
    let unchanged = env.metrics.reconcile_count("unchanged");
    env.restart_operator();
    wait_for("a reconcile of each Service after the restart", || async {
        (env.metrics.reconcile_count("unchanged") >= unchanged + services as u64).then_some(())
    })
    .await;
    let calls = env.provider.calls();
    assert!(calls.is_empty(), "the checkpoints are trusted: {calls:?}");
}

/// Waits until `services` more reconciles than `verified` read the cloud and found it as it
/// should be (`what`); asserts each read its load balancer (the listeners: one call per load
/// balancer; the load balancers themselves may be read together) and nothing was written.
async fn read_without_writing(env: &Env, verified: u64, services: usize, what: &str) {
    wait_for(what, || async {
        (env.metrics.reconcile_count("verified") >= verified + services as u64).then_some(())
    })
    .await;
    let calls = env.provider.calls();
    eprintln!("AWS calls of {what}: {calls:?}");
    assert!(
        count(&calls, "DescribeListeners") >= services as u64,
        "{calls:?}"
    );
    assert!(count(&calls, "DescribeLoadBalancers") >= 1, "{calls:?}");
    assert_eq!(env.provider.write_calls(), 0, "{calls:?}");
}

fn count(calls: &BTreeMap<String, u64>, op: &str) -> u64 {
    calls.get(&format!("{op}/ok")).copied().unwrap_or(0)
}

fn env_setup() -> Setup {
    Setup {
        resync: RESYNC,
        ..Setup::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_converged_services_makes_no_aws_call_until_the_drift_check() {
    let _guard = TestGuard::new();
    let mut env = Env::start_with("restart0", env_setup()).await;
    let names = ["a", "b", "c"];
    let before = converge(&env, &names).await;
    let sample = env.checkpoint("a").await.unwrap_or_default();
    eprintln!("a checkpoint ({} bytes): {sample}", sample.len());

    let verified = env.metrics.reconcile_count("verified");
    restart_trusting_checkpoints(&mut env, names.len()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = env.provider.calls();
    eprintln!("AWS calls in the first seconds after a restart: {calls:?}");
    assert!(calls.is_empty(), "calls before the drift check: {calls:?}");
    assert_eq!(hostnames(&env, &names).await, before, "statuses kept");
    assert_eq!(env.metrics.reconcile_count("verified"), verified);

    // The drift check reads each (spread over the resync window) and writes nothing.
    read_without_writing(
        &env,
        verified,
        names.len(),
        "the drift check of each Service",
    )
    .await;

    // Verified now: a node added is one register call per target group, no read.
    let before_node = env.provider.calls();
    let instance = env.new_instance().await;
    env.add_node(&instance, 99).await;
    wait_for("the new node registered everywhere", || async {
        let d = env.calls_since(&before_node);
        (count(&d, "RegisterTargets") >= 6).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delta = env.calls_since(&before_node);
    eprintln!("AWS calls for a node added after the drift check: {delta:?}");
    // (The EC2 reads are the backend rules': the new instance's group, learned once per process.)
    let elb_reads: u64 = delta
        .iter()
        .filter(|(k, _)| {
            k.starts_with("Describe")
                && !k.starts_with("DescribeInstances")
                && !k.starts_with("DescribeSecurityGroups")
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(elb_reads, 0, "{delta:?}");
    assert_eq!(count(&delta, "RegisterTargets"), 6, "{delta:?}");

    for name in names {
        helpers::delete_service(&env.services(), name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_of_a_deleted_or_untagged_load_balancer_is_never_written_through() {
    let _guard = TestGuard::new();
    let mut env = Env::start_with("restart1", env_setup()).await;
    let before = converge(&env, &["gone", "untagged"]).await;
    env.stop_operator();

    // While the operator is down: one NLB deleted in the console, the other loses our tags.
    let lbs = env.load_balancers().await;
    let arn_of = |host: &str| {
        lbs.iter()
            .find(|l| l.dns_name() == Some(host))
            .and_then(|l| l.load_balancer_arn())
            .expect("the NLB of a Service")
            .to_string()
    };
    let (gone, untagged) = (arn_of(&before["gone"]), arn_of(&before["untagged"]));
    env.elbv2
        .delete_load_balancer()
        .load_balancer_arn(&gone)
        .send()
        .await
        .expect("console delete");
    let ours: Vec<String> = describe::elb_tags(&env.elbv2, std::slice::from_ref(&untagged))
        .await
        .remove(&untagged)
        .unwrap_or_default()
        .into_keys()
        .filter(|k| k.starts_with("cloudlb.io/"))
        .collect();
    assert!(!ours.is_empty());
    env.elbv2
        .remove_tags()
        .resource_arns(&untagged)
        .set_tag_keys(Some(ours))
        .send()
        .await
        .expect("remove our tags");

    restart_trusting_checkpoints(&mut env, 2).await;

    // The drift check: the deleted one is made again, the untagged one is refused, untouched.
    let remade = wait_for("a new NLB for gone", || async {
        env.load_balancers().await.into_iter().find(|l| {
            l.load_balancer_arn() != Some(gone.as_str())
                && l.load_balancer_arn() != Some(untagged.as_str())
        })
    })
    .await;
    let dns = remade.dns_name().expect("dns").to_string();
    wait_for("the status of gone names it", || async {
        (env.hostname("gone").await? == dns).then_some(())
    })
    .await;
    let notes = env.wait_events("SyncLoadBalancerFailed").await;
    assert!(
        notes.iter().any(|n| n.contains("not ours")),
        "the untagged NLB is refused: {notes:?}"
    );
    let calls = env.provider.calls();
    eprintln!("AWS calls after the restart: {calls:?}");
    assert_eq!(count(&calls, "CreateLoadBalancer"), 1, "{calls:?}");
    for write in [
        "DeleteLoadBalancer",
        "ModifyLoadBalancerAttributes",
        "SetSecurityGroups",
        "SetSubnets",
        "ModifyListener",
        "DeleteListener",
        "AddTags",
        "RemoveTags",
        "DeregisterTargets",
    ] {
        assert_eq!(count(&calls, write), 0, "{write}: {calls:?}");
    }
    assert_eq!(env.listeners(&untagged).await.len(), 2, "untagged NLB kept");
    assert_eq!(
        env.hostname("untagged").await.as_deref(),
        Some(before["untagged"].as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_checkpoint_is_treated_as_absent() {
    let _guard = TestGuard::new();
    let mut env = Env::start_with("restart2", env_setup()).await;
    let names = ["garbage", "rehashed", "borrowed"];
    let before = converge(&env, &names).await;
    env.stop_operator();

    // Garbage; the right ids under another model's hash; another Service's checkpoint.
    let good = env.checkpoint("rehashed").await.expect("checkpoint");
    let mut rehashed: serde_json::Value = serde_json::from_str(&good).expect("JSON");
    rehashed["m"] = json!("00112233445566778899aabbccddeeff");
    let borrowed_from = env.checkpoint("garbage").await.expect("checkpoint");
    for (name, value) in [
        ("garbage", "{\"v\":1,\"m\":".to_string()),
        ("rehashed", rehashed.to_string()),
        ("borrowed", borrowed_from.clone()),
    ] {
        let patch = json!({"metadata": {"annotations": {CHECKPOINT_ANNOTATION: value}}});
        env.patch_service(name, patch).await;
    }

    let verified = env.metrics.reconcile_count("verified");
    env.restart_operator();
    read_without_writing(&env, verified, names.len(), "one full read of each Service").await;
    assert_eq!(hostnames(&env, &names).await, before, "statuses kept");
    // Each is written again, naming its own load balancer.
    for name in names {
        wait_for(&format!("{name}'s checkpoint written again"), || async {
            env.checkpoint(name).await.filter(|v| {
                serde_json::from_str::<serde_json::Value>(v)
                    .is_ok_and(|j| j["dns"] == json!(before[name]) && j["m"] != rehashed["m"])
            })
        })
        .await;
    }
    for name in names {
        helpers::delete_service(&env.services(), name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_before_the_drift_check_confirms_the_target_groups_and_registers() {
    let _guard = TestGuard::new();
    let mut env = Env::start_with(
        "restart3",
        Setup {
            resync: Duration::from_secs(3600),
            ..Setup::default()
        },
    )
    .await;
    let names = ["a", "b", "c"];
    converge(&env, &names).await;
    restart_trusting_checkpoints(&mut env, names.len()).await;
    let before: BTreeMap<String, String> = {
        let mut m = BTreeMap::new();
        for name in names {
            m.insert(
                name.to_string(),
                env.checkpoint(name).await.expect("checkpoint"),
            );
        }
        m
    };

    // Known only from the checkpoints: the target groups are confirmed ours (one DescribeTags
    // per Service), then the node is registered; nothing else is read.
    let instance = env.new_instance().await;
    env.add_node(&instance, 99).await;
    wait_for("the new node registered everywhere", || async {
        (count(&env.provider.calls(), "RegisterTargets") >= 6).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let calls = env.provider.calls();
    eprintln!("AWS calls for a node added right after a restart: {calls:?}");
    assert_eq!(count(&calls, "RegisterTargets"), 6, "{calls:?}");
    assert_eq!(count(&calls, "DescribeTags"), 3, "{calls:?}");
    for read in [
        "DescribeLoadBalancers",
        "DescribeListeners",
        "DescribeTargetGroups",
        "DescribeTargetHealth",
        "DescribeLoadBalancerAttributes",
        "DescribeTargetGroupAttributes",
    ] {
        assert_eq!(count(&calls, read), 0, "{read}: {calls:?}");
    }
    let writes: u64 = calls
        .iter()
        .filter(|(k, _)| !k.starts_with("Describe") && !k.starts_with("RegisterTargets"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(writes, 0, "{calls:?}");
    // The checkpoints now say so.
    for name in names {
        wait_for(
            &format!("{name}'s checkpoint names the new targets"),
            || async { env.checkpoint(name).await.filter(|v| *v != before[name]) },
        )
        .await;
    }
}
