//! Crash safety: the operator is killed at random moments (its task aborted mid-flight: calls in
//! progress are cut, their responses lost, the in-memory cache gone) during a create wave and a
//! delete wave, and restarted each time. It must converge with no duplicate load balancer, no
//! orphaned target group or security group, and every finalizer removed.
//!
//! Also: kube-apiserver and etcd are killed and restarted in the middle of a wave; the same
//! operator (no restart) must pick up where it was and see what changed while it was cut off.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::support;

use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use std::time::Duration;
use support::TestGuard;
use support::cluster::TestCluster;
use support::env::{Env, wait_for};

const SERVICES: usize = 8;
const KILLS_PER_WAVE: usize = 10;

/// Restarts of the operator (a new process each time: nothing cached) at random moments.
async fn kill_at_random_moments(env: &mut Env, rng: &mut rand::rngs::StdRng) {
    let kills = KILLS_PER_WAVE * support::soak();
    env.restart_at_random_moments(rng, kills, 20..700).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twenty_times_during_create_and_delete_waves_converges_cleanly() {
    let _guard = TestGuard::new();
    let mut rng = support::env::crash_rng(20261127);
    let mut env = Env::start("crash", Duration::from_secs(3600)).await;
    // Leftovers of a kill between two deletes are found by the orphan sweep.
    env.orphan_sweep = Duration::from_secs(3);
    env.restart_operator();

    // Create wave.
    for i in 0..SERVICES {
        let ports = json!([
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"}
        ]);
        env.create_service(&format!("svc-{i}"), json!({}), ports)
            .await;
    }
    kill_at_random_moments(&mut env, &mut rng).await;
    for i in 0..SERVICES {
        env.wait_hostname(&format!("svc-{i}")).await;
    }
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), SERVICES, "one NLB per Service, no duplicates");
    // Exactly two target groups per Service.
    env.wait_target_groups(2 * SERVICES).await;
    assert_eq!(
        env.our_security_groups().await.len(),
        SERVICES,
        "one security group per Service"
    );
    for lb in &lbs {
        env.wait_listeners(lb.load_balancer_arn().unwrap_or_default(), 2)
            .await;
    }

    // Delete wave.
    for i in 0..SERVICES {
        env.services()
            .delete(&format!("svc-{i}"), &DeleteParams::default())
            .await
            .expect("delete");
    }
    kill_at_random_moments(&mut env, &mut rng).await;
    wait_for("every Service gone (finalizers removed)", || async {
        env.services()
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    wait_for("no load balancer left", || async {
        env.load_balancers().await.is_empty().then_some(())
    })
    .await;
    wait_for("no target group left", || async {
        env.target_groups().await.is_empty().then_some(())
    })
    .await;
    wait_for("no security group left", || async {
        env.our_security_groups().await.is_empty().then_some(())
    })
    .await;
}

async fn wait_gone(env: &Env, name: &str) {
    wait_for(
        &format!("Service {name} deleted (finalizer released)"),
        || async {
            env.services()
                .get_opt(name)
                .await
                .ok()?
                .is_none()
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_an_api_server_and_etcd_restart_without_being_restarted() {
    let _guard = TestGuard::new();
    // A private cluster: this test takes it down. Leaked so the environment can borrow it for
    // the whole test; its processes die with the test binary.
    let cluster: &'static TestCluster = Box::leak(Box::new(TestCluster::start().await));
    let env = Env::start_on(cluster, "apirestart", Duration::from_secs(3600)).await;
    let ports = || json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    for i in 0..3 {
        env.create_service(&format!("before-{i}"), json!({}), ports())
            .await;
    }
    env.wait_hostname("before-0").await;
    // Mid-wave: more Services were just created, none of them has a load balancer yet.
    for i in 0..3 {
        env.create_service(&format!("during-{i}"), json!({}), ports())
            .await;
    }
    for _ in 0..support::soak() {
        cluster.restart(Duration::from_secs(3)).await;
    }

    // Changes made after the restart: one more Service, one deleted.
    env.create_service("after", json!({}), ports()).await;
    env.services()
        .delete("before-1", &DeleteParams::default())
        .await
        .expect("delete before-1");

    for name in [
        "before-0", "before-2", "during-0", "during-1", "during-2", "after",
    ] {
        env.wait_hostname(name).await;
    }
    wait_gone(&env, "before-1").await;
    wait_for("one load balancer per remaining Service", || async {
        (env.load_balancers().await.len() == 6).then_some(())
    })
    .await;
    assert_eq!(env.target_groups().await.len(), 6, "one target group each");
    for resource in ["services", "nodes"] {
        assert!(
            env.metrics.watch_error_count(resource) > 0,
            "the {resource} watch never noticed the outage: the restart did not cut the operator off"
        );
    }
    let operator = env.operator.as_ref().expect("the operator task");
    assert!(
        !operator.is_finished(),
        "the operator task ended during the outage instead of waiting it out"
    );
}
