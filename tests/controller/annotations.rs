//! Compatible annotations mean what they mean in aws-load-balancer-controller: the attributes
//! key, attributes left alone by the drift check, and keys cloudlb does not understand reported
//! in one Event while the load balancer is built from the rest.

use crate::helpers::web_ports;
use crate::support;

use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::TestGuard;
use support::env::Env;

/// The attributes of the account's only load balancer.
async fn lb_attributes(env: &Env) -> BTreeMap<String, String> {
    let lbs = env.load_balancers().await;
    let arn = lbs[0].load_balancer_arn().expect("arn");
    let out = env
        .elbv2
        .describe_load_balancer_attributes()
        .load_balancer_arn(arn)
        .send()
        .await
        .expect("describe attributes");
    out.attributes()
        .iter()
        .filter_map(|a| Some((a.key()?.to_string(), a.value()?.to_string())))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attributes_key_applies_and_drift_checks_keep_what_no_setting_names() {
    let _guard = TestGuard::new();
    // A short re-verification interval: drift checks run within the test.
    let env = Env::start("attributes", Duration::from_secs(2)).await;
    let attributes = "deletion_protection.enabled=true,access_logs.s3.enabled=true,access_logs.s3.bucket=shop-logs,load_balancing.cross_zone.enabled=true";
    env.create_service(
        "web",
        json!({"service.beta.kubernetes.io/aws-load-balancer-attributes": attributes}),
        web_ports(),
    )
    .await;
    env.wait_hostname("web").await;
    let want = [
        ("deletion_protection.enabled", "true"),
        ("access_logs.s3.enabled", "true"),
        ("access_logs.s3.bucket", "shop-logs"),
        ("load_balancing.cross_zone.enabled", "true"),
    ];
    let have = lb_attributes(&env).await;
    for (k, v) in want {
        assert_eq!(have.get(k).map(String::as_str), Some(v), "{k}: {have:?}");
    }
    // Someone changes an attribute no setting names: the drift checks leave it as it is.
    let arn = env.load_balancers().await[0]
        .load_balancer_arn()
        .expect("arn")
        .to_string();
    env.elbv2
        .modify_load_balancer_attributes()
        .load_balancer_arn(&arn)
        .attributes(
            support::elbv2::types::LoadBalancerAttribute::builder()
                .key("dns_record.client_routing_policy")
                .value("availability_zone_affinity")
                .build(),
        )
        .send()
        .await
        .expect("console edit");
    let before = env.provider.calls();
    let verified = env.metrics.reconcile_count("verified");
    support::env::wait_within("two drift checks", Duration::from_secs(30), || async {
        (env.metrics.reconcile_count("verified") >= verified + 2).then_some(())
    })
    .await;
    let delta = env.calls_since(&before);
    eprintln!("AWS calls of two drift checks: {delta:?}");
    assert!(
        !delta.contains_key("ModifyLoadBalancerAttributes/ok"),
        "the drift checks changed attributes: {delta:?}"
    );
    let have = lb_attributes(&env).await;
    for (k, v) in want {
        assert_eq!(
            have.get(k).map(String::as_str),
            Some(v),
            "{k} after the drift checks"
        );
    }
    assert_eq!(
        have.get("dns_record.client_routing_policy")
            .map(String::as_str),
        Some("availability_zone_affinity"),
        "an attribute no setting names is left as it is"
    );
    // Deletion protection off again (so the namespace can go).
    env.patch_service(
        "web",
        json!({"metadata": {"annotations": {"service.beta.kubernetes.io/aws-load-balancer-attributes": "deletion_protection.enabled=false"}}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cloudlb_does_not_understand_are_told_once_and_the_rest_builds() {
    let _guard = TestGuard::new();
    let env = Env::start("unsupported", Duration::from_secs(3600)).await;
    let unknown = [
        "cloudlb.io/shceme",
        "service.beta.kubernetes.io/aws-load-balancer-alpn-policy",
        "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80",
        "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity",
        "service.beta.kubernetes.io/aws-load-balancer-security-group-prefix-lists",
    ];
    let mut annotations: serde_json::Map<String, serde_json::Value> = unknown
        .iter()
        .map(|k| (k.to_string(), json!("x")))
        .collect();
    annotations.insert("cloudlb.io/scheme".into(), json!("internet-facing"));
    env.create_service("web", json!(annotations), web_ports())
        .await;
    env.wait_hostname("web").await;
    let notes = env.wait_events("UnsupportedAnnotation").await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("Ignored 5 annotation(s)"), "{notes:?}");
    for key in unknown {
        assert!(notes[0].contains(key), "{key} is not in {notes:?}");
    }
    let scheme = env.load_balancers().await[0]
        .scheme()
        .map(|s| s.as_str().to_string());
    assert_eq!(
        scheme.as_deref(),
        Some("internet-facing"),
        "the rest applied"
    );
    // An edit that leaves the unknown keys as they are tells nothing new.
    env.calls_for_unrelated_edit("web", "unchanged").await;
    assert_eq!(env.events("UnsupportedAnnotation").await.len(), 1);
}
