//! Compatible annotations mean what they mean in aws-load-balancer-controller: the attributes
//! key, attributes left alone by the drift check, keys cloudlb does not understand reported in
//! one Event while the load balancer is built from the rest, the forms the AWS controllers
//! accept, and tags that follow the Service in place.

use crate::helpers::web_ports;
use crate::support;

use kube::ResourceExt;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::TestGuard;
use support::env::{Env, wait_for};

/// A map of the `(key, value)` pairs AWS answered (attributes, tags), those with both.
fn pairs<'a>(
    answered: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> BTreeMap<String, String> {
    answered
        .into_iter()
        .filter_map(|(k, v)| Some((k?.to_string(), v?.to_string())))
        .collect()
}

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
    pairs(out.attributes().iter().map(|a| (a.key(), a.value())))
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
    env.set_lb_attribute_by_hand(
        "dns_record.client_routing_policy",
        "availability_zone_affinity",
    )
    .await;
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
        "service.beta.kubernetes.io/aws-load-balancer-multi-cluster-target-group",
        "service.beta.kubernetes.io/aws-load-balancer-ipv6-addresses",
        "service.beta.kubernetes.io/aws-load-balancer-minimum-load-balancer-capacity",
        "service.beta.kubernetes.io/aws-load-balancer-enable-icmp-for-path-mtu-discovery",
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_the_aws_controllers_accept_build_and_aws_judges_attribute_keys() {
    let _guard = TestGuard::new();
    let env = Env::start("lenient", Duration::from_secs(3600)).await;
    // backend-protocol http (TCP to the targets), a health-check port named by its Service port
    // (its nodePort: instance targets), the legacy internal "0.0.0.0/0", and an attribute key
    // cloudlb has no table for.
    let ports = json!([
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "status", "port": 9000, "targetPort": 9000, "protocol": "TCP"}
    ]);
    env.create_service(
        "web",
        json!({
            "service.beta.kubernetes.io/aws-load-balancer-backend-protocol": "http",
            "service.beta.kubernetes.io/aws-load-balancer-healthcheck-port": "status",
            "service.beta.kubernetes.io/aws-load-balancer-internal": "0.0.0.0/0",
            "service.beta.kubernetes.io/aws-load-balancer-attributes": "zonal_shift.config.enabled=true",
        }),
        ports.clone(),
    )
    .await;
    env.wait_hostname("web").await;
    let lb = &env.load_balancers().await[0];
    assert_eq!(lb.scheme().map(|s| s.as_str()), Some("internal"));
    assert_eq!(
        lb_attributes(&env)
            .await
            .get("zonal_shift.config.enabled")
            .map(String::as_str),
        Some("true")
    );
    let svc = env.services().get("web").await.expect("service");
    let status_node_port = svc
        .spec
        .and_then(|s| s.ports)
        .and_then(|p| p.into_iter().find(|p| p.name.as_deref() == Some("status")))
        .and_then(|p| p.node_port)
        .expect("the status port's nodePort");
    for tg in env.target_groups().await {
        assert_eq!(tg.protocol().map(|p| p.as_str()), Some("TCP"));
        assert_eq!(
            tg.health_check_port(),
            Some(status_node_port.to_string().as_str())
        );
    }

    // A key AWS does not know: AWS refuses it and says why in the Service's Event.
    env.create_service(
        "bogus",
        json!({"service.beta.kubernetes.io/aws-load-balancer-attributes": "no_such.attribute=1"}),
        ports,
    )
    .await;
    let notes = env.wait_events("SyncLoadBalancerFailed").await;
    assert!(
        notes.iter().any(|n| n.contains("no_such.attribute")),
        "{notes:?}"
    );
}

/// The frontend security group of Service `name`.
async fn frontend_group(env: &Env, name: &str) -> support::ec2::types::SecurityGroup {
    let groups = support::describe::security_groups(&env.ec2, &env.ns).await;
    groups
        .into_iter()
        .find(|g| {
            g.tags()
                .iter()
                .any(|t| t.key() == Some("cloudlb.io/service-name") && t.value() == Some(name))
        })
        .expect("the Service's frontend security group")
}

/// The tags of the frontend security group of Service `name`.
async fn frontend_group_tags(env: &Env, name: &str) -> BTreeMap<String, String> {
    let group = frontend_group(env, name).await;
    pairs(group.tags().iter().map(|t| (t.key(), t.value())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_follow_the_service_in_place_and_only_ours_are_removed() {
    let _guard = TestGuard::new();
    let env = Env::start("tags", Duration::from_secs(3600)).await;
    let key = "service.beta.kubernetes.io/aws-load-balancer-additional-resource-tags";
    env.create_service("web", json!({key: "team=web,env=dev"}), web_ports())
        .await;
    env.wait_hostname("web").await;
    // The create's reconcile has ended: the edit's is the next one counted.
    env.wait_reconciles("applied", 0).await;
    let lb_arn = env.load_balancers().await[0]
        .load_balancer_arn()
        .expect("arn")
        .to_string();
    env.wait_listeners(&lb_arn, 2).await;
    let mut arns: Vec<String> = vec![lb_arn.clone()];
    arns.extend(
        env.listeners(&lb_arn)
            .await
            .iter()
            .filter_map(|l| l.listener_arn().map(String::from)),
    );
    arns.extend(support::describe::target_group_arns(
        &env.target_groups().await,
    ));
    assert_eq!(
        arns.len(),
        5,
        "a load balancer, two listeners, two target groups"
    );
    // Someone tags the load balancer and the security group by hand, with a key of their own.
    env.elbv2
        .add_tags()
        .resource_arns(&lb_arn)
        .tags(
            support::elbv2::types::Tag::builder()
                .key("owner")
                .value("ops")
                .build(),
        )
        .send()
        .await
        .expect("tag by hand");

    // One key changes its value, one goes, one comes: only tag calls, one per kind of change.
    let edit = json!({"metadata": {"annotations": {key: "team=shop,cost=42"}}});
    let delta = env.calls_for_edit("web", edit, "applied").await;
    eprintln!("AWS calls of a tag change: {delta:?}");
    let writes: BTreeMap<String, u64> = delta
        .into_iter()
        .filter(|(k, _)| !k.starts_with("Describe"))
        .collect();
    let want: BTreeMap<String, u64> = [
        ("AddTags/ok", 1),
        ("RemoveTags/ok", 1),
        ("CreateTags/ok", 1),
        ("DeleteTags/ok", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(writes, want, "a tag change costs only tag calls");

    let tags = support::describe::elb_tags(&env.elbv2, &arns).await;
    assert_eq!(tags.len(), 5);
    for (arn, t) in &tags {
        assert_eq!(
            t.get("team").map(String::as_str),
            Some("shop"),
            "{arn}: {t:?}"
        );
        assert_eq!(
            t.get("cost").map(String::as_str),
            Some("42"),
            "{arn}: {t:?}"
        );
        assert!(!t.contains_key("env"), "{arn}: {t:?}");
        assert_eq!(
            t.get("cloudlb.io/cluster").map(String::as_str),
            Some(env.ns.as_str()),
            "the ownership tags stay: {arn}: {t:?}"
        );
    }
    assert_eq!(
        tags[&lb_arn].get("owner").map(String::as_str),
        Some("ops"),
        "a tag cloudlb did not put there stays"
    );
    let group = frontend_group_tags(&env, "web").await;
    assert_eq!(
        group.get("team").map(String::as_str),
        Some("shop"),
        "{group:?}"
    );
    assert_eq!(
        group.get("cost").map(String::as_str),
        Some("42"),
        "{group:?}"
    );
    assert!(!group.contains_key("env"), "{group:?}");

    // The record of our keys follows: the removed key is no longer ours.
    let services = env.services();
    wait_for("the tag keys of record", || async {
        let svc = services.get("web").await.ok()?;
        let record = svc.annotations().get("state.cloudlb.io/tag-keys")?.clone();
        (record == r#"["cost","team"]"#).then_some(())
    })
    .await;
    // Nothing more to do: an edit that changes nothing cloudlb reads costs no call.
    let calls = env.calls_for_unrelated_edit("web", "unchanged").await;
    assert!(calls.is_empty(), "{calls:?}");
}

/// The subnets the account's only load balancer is in, sorted.
async fn lb_subnets(env: &Env) -> Vec<String> {
    let mut s: Vec<String> = env.load_balancers().await[0]
        .availability_zones()
        .iter()
        .filter_map(|z| z.subnet_id().map(String::from))
        .collect();
    s.sort();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnets_follow_the_service_in_place() {
    let _guard = TestGuard::new();
    let env = Env::start("subnets", Duration::from_secs(3600)).await;
    // A third zone's subnet in the test VPC.
    let third = env
        .ec2
        .create_subnet()
        .vpc_id(&env.network.vpc_id)
        .cidr_block("10.0.64.0/20")
        .availability_zone("us-east-1c")
        .send()
        .await
        .expect("create a subnet")
        .subnet()
        .and_then(|s| s.subnet_id())
        .expect("its id")
        .to_string();
    let [a, b] = [0, 1].map(|i| env.network.public_subnets[i].id.clone());
    let key = "service.beta.kubernetes.io/aws-load-balancer-subnets";
    env.create_service("web", json!({key: format!("{a},{b}")}), web_ports())
        .await;
    env.wait_hostname("web").await;
    // The create's reconcile has ended: the edit's is the next one counted.
    env.wait_reconciles("applied", 0).await;
    let dns = env.load_balancers().await[0]
        .dns_name()
        .expect("dns")
        .to_string();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(lb_subnets(&env).await, sorted(vec![a.clone(), b.clone()]));

    // A zone added, then one removed: one SetSubnets each, the same load balancer.
    for (list, want) in [
        (
            format!("{a},{b},{third}"),
            vec![a.clone(), b.clone(), third.clone()],
        ),
        (format!("{a},{third}"), vec![a.clone(), third.clone()]),
    ] {
        let edit = json!({"metadata": {"annotations": {key: list}}});
        let delta = env.calls_for_edit("web", edit, "applied").await;
        eprintln!("AWS calls of a subnet change: {delta:?}");
        let writes: Vec<(String, u64)> = delta
            .into_iter()
            .filter(|(k, _)| !k.starts_with("Describe"))
            .collect();
        assert_eq!(writes, vec![("SetSubnets/ok".to_string(), 1)]);
        assert_eq!(lb_subnets(&env).await, sorted(want));
        let lbs = env.load_balancers().await;
        assert_eq!(lbs.len(), 1, "changed in place, not replaced");
        assert_eq!(lbs[0].dns_name(), Some(dns.as_str()));
    }
    let calls = env.calls_for_unrelated_edit("web", "unchanged").await;
    assert!(calls.is_empty(), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alpn_policy_is_set_on_the_tls_listener_and_drift_checks_keep_it() {
    let _guard = TestGuard::new();
    // The test's own moto account, to hold the listener's certificate too.
    let moto = support::AwsEmulator::shared().await;
    let account = moto.new_account();
    let setup = support::env::Setup {
        resync: Duration::from_secs(2),
        account: Some(account.clone()),
        ..Default::default()
    };
    let env = Env::start_with("alpn", setup).await;
    let certificate = moto.request_certificate(&account, "web.example.com");
    let annotations = json!({
        "service.beta.kubernetes.io/aws-load-balancer-ssl-cert": certificate,
        "service.beta.kubernetes.io/aws-load-balancer-ssl-ports": "https",
        "service.beta.kubernetes.io/aws-load-balancer-alpn-policy": "HTTP2Preferred",
    });
    env.create_service("web", annotations, web_ports()).await;
    env.wait_hostname("web").await;
    let lb_arn = env.load_balancers().await[0]
        .load_balancer_arn()
        .expect("arn")
        .to_string();
    env.wait_listeners(&lb_arn, 2).await;
    let alpn = |port: i32| {
        let env = &env;
        let lb_arn = lb_arn.clone();
        async move {
            env.listeners(&lb_arn)
                .await
                .iter()
                .find(|l| l.port() == Some(port))
                .map(|l| l.alpn_policy().to_vec())
                .unwrap_or_default()
        }
    };
    assert_eq!(alpn(443).await, vec!["HTTP2Preferred".to_string()]);
    assert!(
        alpn(80).await.iter().all(|p| p == "None"),
        "{:?}",
        alpn(80).await
    );
    // The drift checks find it as it should be: no listener change.
    let before = env.provider.calls();
    let verified = env.metrics.reconcile_count("verified");
    support::env::wait_within("two drift checks", Duration::from_secs(30), || async {
        (env.metrics.reconcile_count("verified") >= verified + 2).then_some(())
    })
    .await;
    let delta = env.calls_since(&before);
    assert!(!delta.contains_key("ModifyListener/ok"), "{delta:?}");
}

/// A managed prefix list in the test's account: its id.
async fn prefix_list(env: &Env, name: &str) -> String {
    env.ec2
        .create_managed_prefix_list()
        .prefix_list_name(name)
        .address_family("IPv4")
        .max_entries(5)
        .entries(
            support::ec2::types::AddPrefixListEntry::builder()
                .cidr("198.51.100.0/24")
                .build(),
        )
        .send()
        .await
        .expect("create a prefix list")
        .prefix_list()
        .and_then(|p| p.prefix_list_id())
        .expect("its id")
        .to_string()
}

/// The sources (CIDRs and prefix lists) the frontend group of `name` admits on `port`, sorted.
async fn frontend_sources(env: &Env, name: &str, port: i32) -> Vec<String> {
    let group = frontend_group(env, name).await;
    let mut sources: Vec<String> = group
        .ip_permissions()
        .iter()
        .filter(|p| p.from_port() == Some(port))
        .flat_map(|p| {
            let cidrs = p
                .ip_ranges()
                .iter()
                .filter_map(|r| r.cidr_ip().map(String::from));
            let lists = p
                .prefix_list_ids()
                .iter()
                .filter_map(|l| l.prefix_list_id().map(String::from));
            cidrs.chain(lists).collect::<Vec<_>>()
        })
        .collect();
    sources.sort();
    sources
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_lists_are_admitted_on_every_listener_port_and_change_in_place() {
    let _guard = TestGuard::new();
    let env = Env::start("prefixes", Duration::from_secs(3600)).await;
    let (a, b) = (
        prefix_list(&env, "offices").await,
        prefix_list(&env, "cdn").await,
    );
    let key = "service.beta.kubernetes.io/aws-load-balancer-security-group-prefix-lists";
    env.create_service("web", json!({key: a.clone()}), web_ports())
        .await;
    env.wait_hostname("web").await;
    env.wait_reconciles("applied", 0).await;
    for port in [80, 443] {
        assert_eq!(
            frontend_sources(&env, "web", port).await,
            vec![a.clone()],
            "port {port}: the prefix list only, no 0.0.0.0/0"
        );
    }
    let edit = json!({"metadata": {"annotations": {key: b.clone()}}});
    let delta = env.calls_for_edit("web", edit, "applied").await;
    let writes: Vec<(String, u64)> = delta
        .into_iter()
        .filter(|(k, _)| !k.starts_with("Describe"))
        .collect();
    assert_eq!(
        writes,
        vec![
            ("AuthorizeSecurityGroupIngress/ok".to_string(), 1),
            ("RevokeSecurityGroupIngress/ok".to_string(), 1)
        ]
    );
    assert_eq!(frontend_sources(&env, "web", 443).await, vec![b]);
}

/// The attributes of the listener on `port` of the account's only load balancer.
async fn listener_attributes(env: &Env, port: i32) -> BTreeMap<String, String> {
    let lb_arn = env.load_balancers().await[0]
        .load_balancer_arn()
        .expect("arn")
        .to_string();
    let listener = env
        .listeners(&lb_arn)
        .await
        .into_iter()
        .find(|l| l.port() == Some(port))
        .and_then(|l| l.listener_arn().map(String::from))
        .expect("the listener");
    let out = env
        .elbv2
        .describe_listener_attributes()
        .listener_arn(listener)
        .send()
        .await
        .expect("describe listener attributes");
    pairs(out.attributes().iter().map(|a| (a.key(), a.value())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_attributes_are_set_and_changed_in_place() {
    let _guard = TestGuard::new();
    let env = Env::start("lattrs", Duration::from_secs(3600)).await;
    let key = "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80";
    env.create_service(
        "web",
        json!({key: "tcp.idle_timeout.seconds=400"}),
        web_ports(),
    )
    .await;
    env.wait_hostname("web").await;
    env.wait_reconciles("applied", 0).await;
    let idle = |a: BTreeMap<String, String>| a.get("tcp.idle_timeout.seconds").cloned();
    assert_eq!(
        idle(listener_attributes(&env, 80).await).as_deref(),
        Some("400")
    );
    let edit = json!({"metadata": {"annotations": {key: "tcp.idle_timeout.seconds=500"}}});
    let delta = env.calls_for_edit("web", edit, "applied").await;
    let writes: Vec<(String, u64)> = delta
        .into_iter()
        .filter(|(k, _)| !k.starts_with("Describe"))
        .collect();
    assert_eq!(writes, vec![("ModifyListenerAttributes/ok".to_string(), 1)]);
    assert_eq!(
        idle(listener_attributes(&env, 80).await).as_deref(),
        Some("500")
    );
}
