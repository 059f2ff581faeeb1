//! Crash safety: the operator is killed at random moments (its task aborted mid-flight: calls in
//! progress are cut, their responses lost, the in-memory cache gone) during a create wave and a
//! delete wave, and restarted each time. It must converge with no duplicate load balancer, no
//! orphaned target group or security group, and every finalizer removed.

mod support;

use cloudlb::provider::aws::{AwsProvider, AwsSettings};
use kube::api::{DeleteParams, ListParams};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use support::TestGuard;
use support::env::{Env, wait_for};

const SERVICES: usize = 8;
const KILLS_PER_WAVE: usize = 10;

fn restart(env: &mut Env) {
    env.stop_operator();
    // A new process: nothing cached.
    env.provider = Arc::new(
        AwsProvider::new(
            env.elbv2.clone(),
            env.ec2.clone(),
            AwsSettings::new(env.ns.clone()),
        )
        .with_metrics(env.metrics.clone()),
    );
    env.start_operator();
}

async fn kill_at_random_moments(env: &mut Env, rng: &mut rand::rngs::StdRng) {
    for _ in 0..KILLS_PER_WAVE {
        let after = Duration::from_millis(rng.random_range(20..700));
        tokio::time::sleep(after).await;
        restart(env);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_twenty_times_during_create_and_delete_waves_converges_cleanly() {
    let _guard = TestGuard::new();
    let seed: u64 = std::env::var("CLOUDLB_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261127);
    eprintln!("crash test seed {seed} (set CLOUDLB_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut env = Env::start("crash", Duration::from_secs(3600)).await;
    // Leftovers of a kill between two deletes are found by the orphan sweep.
    env.orphan_sweep = Duration::from_secs(3);
    restart(&mut env);

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
    wait_for("exactly two target groups per Service", || async {
        (env.target_groups().await.len() == 2 * SERVICES).then_some(())
    })
    .await;
    assert_eq!(
        env.our_security_groups().await.len(),
        SERVICES,
        "one security group per Service"
    );
    for lb in &lbs {
        let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
        wait_for("both listeners", || async {
            (env.listeners(&arn).await.len() == 2).then_some(())
        })
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
