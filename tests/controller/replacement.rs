//! Changes AWS cannot make in place (the scheme, the name) replace the load balancer without a
//! moment of downtime: the new one is made beside the old one, the status moves once the new one
//! is active, and the old one serves for the grace period before it is deleted. A client polls
//! the Service's status every 100 ms throughout and must never see it empty, nor pointing at a
//! load balancer that no longer exists.

use crate::helpers::web_ports;
use crate::support;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::env::{Env, wait_for, wait_within};
use support::{TestGuard, describe, elbv2, fixtures};

/// The grace period the tests' Services ask for.
const GRACE_SECONDS: u64 = 4;

/// What a client polling the status saw: every distinct hostname, in order, and every moment it
/// found the status empty or naming a load balancer that does not exist.
#[derive(Default)]
struct Seen {
    hostnames: Vec<String>,
    problems: Vec<String>,
}

/// Polls Service `name`'s status every 100 ms until `stop`, checking each hostname against the
/// account's load balancers.
fn watch_status(
    services: Api<Service>,
    elbv2: elbv2::Client,
    name: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::default();
        while !stop.load(Ordering::Relaxed) {
            let hostname = fixtures::ingress(&services, name)
                .await
                .and_then(|i| i.hostname);
            match hostname {
                None => seen.problems.push("the status is empty".into()),
                Some(h) => {
                    let exists = describe::load_balancers(&elbv2)
                        .await
                        .iter()
                        .any(|lb| lb.dns_name() == Some(h.as_str()));
                    if !exists {
                        seen.problems
                            .push(format!("the status names {h}, which does not exist"));
                    }
                    if seen.hostnames.last() != Some(&h) {
                        seen.hostnames.push(h);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen
    })
}

/// Creates Service `web` with `annotations` (and a short grace period), applies `change`, and
/// follows the replacement: the status moves exactly once, from the old load balancer to the
/// new one, which the old one outlives by the grace period. Returns the new load balancer.
async fn replaced_without_downtime(
    env: &Env,
    annotations: serde_json::Value,
    change: serde_json::Value,
) -> elbv2::types::LoadBalancer {
    let mut annotations = annotations;
    annotations["cloudlb.io/replacement-grace-period-seconds"] = json!(GRACE_SECONDS.to_string());
    env.create_service("web", annotations, web_ports()).await;
    let before = env.wait_hostname("web").await;
    let old_name = env.load_balancer_names().await;
    assert_eq!(old_name.len(), 1);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_status(env.services(), env.elbv2.clone(), "web", stop.clone());
    let (calls, started) = (env.provider.calls(), std::time::Instant::now());
    env.patch_service("web", json!({"metadata": {"annotations": change}}))
        .await;
    let after = wait_for("the status on the new load balancer", || async {
        env.hostname("web").await.filter(|h| *h != before)
    })
    .await;
    let moved = started.elapsed();
    // The old one still serves, beside the new one.
    let names = env.load_balancer_names().await;
    assert_eq!(
        names.len(),
        2,
        "both serve during the grace period: {names:?}"
    );
    assert!(names.contains(&old_name[0]), "{names:?}");
    // Then it goes, after the grace period, and only it.
    wait_within(
        "the old load balancer deleted",
        Duration::from_secs(GRACE_SECONDS + 30),
        || async { (env.load_balancer_names().await.len() == 1).then_some(()) },
    )
    .await;
    eprintln!(
        "replacement: status moved after {:.1} s, old load balancer deleted after {:.1} s (grace {GRACE_SECONDS} s); AWS calls: {:?}",
        moved.as_secs_f64(),
        started.elapsed().as_secs_f64(),
        env.calls_since(&calls)
    );
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await.expect("the status watcher");
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    assert_eq!(
        seen.hostnames,
        vec![before, after.clone()],
        "one move, old → new"
    );
    let lbs = env.load_balancers().await;
    assert_eq!(lbs[0].dns_name(), Some(after.as_str()));
    assert!(!env.load_balancer_names().await.contains(&old_name[0]));
    let notes = env.events("ReplacingLoadBalancer").await;
    assert!(
        notes.iter().any(|n| n.contains("DNS name changes")),
        "{notes:?}"
    );
    lbs.into_iter().next().expect("the new load balancer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_change_replaces_the_load_balancer_without_downtime() {
    let _guard = TestGuard::new();
    let env = Env::start("rescheme", Duration::from_secs(3600)).await;
    let new = replaced_without_downtime(
        &env,
        json!({"cloudlb.io/scheme": "internet-facing"}),
        json!({"cloudlb.io/scheme": "internal"}),
    )
    .await;
    assert_eq!(new.scheme().map(|s| s.as_str()), Some("internal"));
    // Its target groups and security group are its own; the old one's are gone with it.
    wait_for("the old target groups deleted", || async {
        (env.target_groups().await.len() == 2).then_some(())
    })
    .await;
    let listeners = env.listeners(new.load_balancer_arn().expect("arn")).await;
    assert_eq!(listeners.len(), 2);
    // Deleting the Service deletes the new one too.
    crate::helpers::delete_service(&env.services(), "web").await;
    assert!(env.load_balancer_names().await.is_empty());
    assert!(env.target_groups().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_replaces_the_load_balancer_without_downtime() {
    let _guard = TestGuard::new();
    let env = Env::start("rename", Duration::from_secs(3600)).await;
    let new = replaced_without_downtime(
        &env,
        json!({}),
        json!({"service.beta.kubernetes.io/aws-load-balancer-name": "web-renamed"}),
    )
    .await;
    assert_eq!(new.load_balancer_name(), Some("web-renamed"));
    wait_for("only the new target groups left", || async {
        (env.target_groups().await.len() == 2).then_some(())
    })
    .await;
    // Deleting the old one wakes the pruning of the shared backend rules (a read in the
    // background): settled once a second passes without a call.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let before = env.provider.calls();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if env.provider.calls() == before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "AWS calls never stopped"
        );
    }
    // Settled: an edit that changes nothing costs no call.
    let calls = env.calls_for_unrelated_edit("web", "unchanged").await;
    assert!(calls.is_empty(), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_every_step_of_a_replacement_it_converges_to_exactly_the_new_one() {
    let _guard = TestGuard::new();
    let mut rng = support::env::crash_rng(20261207);
    let mut env = Env::start("rekill", Duration::from_secs(3600)).await;
    let grace = "2";
    let annotations = json!({
        "cloudlb.io/scheme": "internet-facing",
        "cloudlb.io/replacement-grace-period-seconds": grace,
    });
    env.create_service("web", annotations, web_ports()).await;
    let before = env.wait_hostname("web").await;
    let old = env.load_balancer_names().await;

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_status(env.services(), env.elbv2.clone(), "web", stop.clone());
    let change = json!({"metadata": {"annotations": {"cloudlb.io/scheme": "internal"}}});
    env.patch_service("web", change).await;
    // Killed (its task aborted: calls cut, memory gone) and started again, at random moments
    // across the replacement: making the new one, moving the status, the grace, the delete.
    env.restart_at_random_moments(&mut rng, 12 * support::soak(), 50..700)
        .await;
    wait_within(
        "exactly one load balancer, the new one, serving",
        Duration::from_secs(90),
        || async {
            let lbs = env.load_balancers().await;
            let hostname = env.hostname("web").await?;
            let only_new = lbs.len() == 1
                && lbs[0].dns_name() == Some(hostname.as_str())
                && hostname != before
                && lbs[0].scheme().map(|s| s.as_str()) == Some("internal");
            only_new.then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await.expect("the status watcher");
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    assert!(!env.load_balancer_names().await.contains(&old[0]));
    // Nothing of the old one is left: its target groups and security group went with it.
    wait_for("only the new target groups and security group", || async {
        let tgs = env.target_groups().await.len();
        let groups = env.our_security_groups().await;
        let frontends = describe::security_groups(&env.ec2, &env.ns)
            .await
            .iter()
            .filter(|g| g.group_name().is_some_and(|n| n.ends_with("-frontend")))
            .count();
        (tgs == 2 && frontends == 1 && !groups.is_empty()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_twice_in_a_row_it_ends_with_exactly_the_last_one() {
    let _guard = TestGuard::new();
    let env = Env::start("rerename", Duration::from_secs(3600)).await;
    let annotations = json!({"cloudlb.io/replacement-grace-period-seconds": "2"});
    env.create_service("web", annotations, web_ports()).await;
    env.wait_hostname("web").await;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_status(env.services(), env.elbv2.clone(), "web", stop.clone());
    // A second name before the first replacement has finished (or just after): whatever the
    // first one made goes, served or not.
    let key = "service.beta.kubernetes.io/aws-load-balancer-name";
    env.patch_service(
        "web",
        json!({"metadata": {"annotations": {key: "web-first"}}}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.patch_service(
        "web",
        json!({"metadata": {"annotations": {key: "web-second"}}}),
    )
    .await;
    wait_within(
        "exactly one load balancer, the last name, serving",
        Duration::from_secs(90),
        || async {
            let names = env.load_balancer_names().await;
            let lbs = env.load_balancers().await;
            let hostname = env.hostname("web").await?;
            let done = names == ["web-second"] && lbs[0].dns_name() == Some(hostname.as_str());
            done.then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let seen = watcher.await.expect("the status watcher");
    assert!(seen.problems.is_empty(), "{:?}", seen.problems);
    wait_for("only the last one's target groups", || async {
        (env.target_groups().await.len() == 2).then_some(())
    })
    .await;
}

const PROTECTION: &str = "deletion_protection.enabled";

/// A drift check of a Service that sets no load-balancer attribute does not read them; a scheme
/// change after it reads them first, so deletion protection turned on in the console since is
/// seen: nothing is made or deleted, and the Service is told why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheme_change_after_a_drift_check_sees_deletion_protection_set_by_hand() {
    let _guard = TestGuard::new();
    let env = Env::start("reprotect", Duration::from_secs(2)).await;
    env.create_service(
        "web",
        json!({"cloudlb.io/scheme": "internet-facing"}),
        web_ports(),
    )
    .await;
    let hostname = env.wait_hostname("web").await;
    env.set_lb_attribute_by_hand(PROTECTION, "true").await;
    // A drift check after the console edit: memory is now a read that left out the attributes.
    let before = env.provider.calls();
    let drift = wait_within("a drift check", Duration::from_secs(30), || async {
        let calls = env.calls_since(&before);
        // A full read: the targets, and last of all the frontend group.
        let full = calls.contains_key("DescribeTargetHealth/ok")
            && calls.contains_key("DescribeSecurityGroups/ok");
        full.then_some(calls)
    })
    .await;
    assert!(
        !drift.contains_key("DescribeLoadBalancerAttributes/ok"),
        "a drift check of a model without attributes reads none: {drift:?}"
    );

    let before = env.provider.calls();
    let change = json!({"metadata": {"annotations": {"cloudlb.io/scheme": "internal"}}});
    env.patch_service("web", change).await;
    let notes = env.wait_events("SyncLoadBalancerFailed").await;
    assert!(
        notes.iter().any(|n| n.contains("deletion protection")),
        "{notes:?}"
    );
    let calls = env.calls_since(&before);
    assert!(
        calls.contains_key("DescribeLoadBalancerAttributes/ok"),
        "{calls:?}"
    );
    for write in [
        "CreateLoadBalancer",
        "DeleteLoadBalancer",
        "CreateTargetGroup",
    ] {
        assert!(!calls.contains_key(&format!("{write}/ok")), "{calls:?}");
    }
    assert_eq!(env.load_balancers().await.len(), 1);
    assert_eq!(
        env.hostname("web").await.as_deref(),
        Some(hostname.as_str())
    );
    // So the namespace can go.
    env.set_lb_attribute_by_hand(PROTECTION, "false").await;
}
