//! Table tests for the planner: create, no-op, modify, replace, delete, and their order.

use super::*;
use crate::config::class::{LoadBalancerClass, LoadBalancerClassSpec, ProviderKind};
use crate::model::{IpAddressType, Protocol, Scheme};
use k8s_openapi::api::core::v1::{Node, Service};

/// The cluster's backend security group, as the AWS provider knows it.
const BACKEND: &str = "sg-backend";

/// The planner as the AWS provider calls it, knowing the backend group.
fn plan(desired: &Desired, observed: &Observed) -> Result<Plan, PlanError> {
    plan_with_backend(desired, observed, Some(BACKEND))
}

fn desired_with(
    annotations: serde_json::Value,
    ports: serde_json::Value,
    nodes: &[&str],
) -> Desired {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "annotations": annotations},
        "spec": {"type": "LoadBalancer", "ports": ports}
    }))
    .expect("service");
    let nodes: Vec<Node> = nodes
        .iter()
        .map(|id| {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": id},
                "spec": {"providerID": format!("aws:///us-east-1a/{id}")}
            }))
            .expect("node")
        })
        .collect();
    let class = LoadBalancerClass::new("c", LoadBalancerClassSpec::default_of(ProviderKind::Aws));
    let cfg = crate::config::resolve(&class, &svc).expect("config");
    crate::build::build("cl", &svc, crate::build::Backends::nodes(&nodes), &cfg)
        .expect("build")
        .desired
}

/// The web Service's ports: 80 and 443, TCP.
fn web_ports() -> serde_json::Value {
    serde_json::json!([
        {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080},
        {"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}
    ])
}

fn web(nodes: &[&str]) -> Desired {
    desired_with(serde_json::json!({}), web_ports(), nodes)
}

/// The web Service on node `i-1`, with `annotations`.
fn web_annotated(annotations: serde_json::Value) -> Desired {
    desired_with(annotations, web_ports(), &["i-1"])
}

/// The plan from what the cloud holds for the web Service on node `i-1` to `after`.
fn plan_from_web(after: &Desired) -> Plan {
    plan(after, &observed_for(&web(&["i-1"]))).expect("plan")
}

/// What the cloud holds when it matches `d` exactly.
fn observed_for(d: &Desired) -> Observed {
    let backend = d.lb.as_ref().and_then(|lb| lb.security.backend.as_ref());
    let ids = crate::model::observed::AppliedIds {
        lb_arn: "arn:lb".into(),
        dns_name: "lb.example".into(),
        security_groups: std::iter::once("sg-ours".to_string())
            .chain(backend.map(|_| BACKEND.to_string()))
            .collect(),
        frontend_group: Some("sg-ours".into()),
        subnets: vec!["subnet-a".into()],
        ipv6_source_nat: d.lb.as_ref().map(|lb| lb.ipv6_source_nat.is_some()),
        listener_arn: &|port| format!("arn:listener/{port}"),
        target_group_arn: &|name| format!("arn:tg/{name}"),
    };
    Observed::as_applied(d, ids)
}

fn names(p: &Plan) -> Vec<String> {
    p.ops
        .iter()
        .map(|o| {
            let v = serde_json::to_value(o).expect("op json");
            v["op"].as_str().unwrap_or_default().to_string()
        })
        .collect()
}

#[test]
fn create_from_nothing_in_order_with_minimal_calls() {
    let d = web(&["i-1", "i-2"]);
    let p = plan(&d, &Observed::default()).expect("plan");
    assert_eq!(
        names(&p),
        [
            "createSecurityGroup",
            "authorizeIngress",
            "createLoadBalancer",
            "createTargetGroup",
            "registerTargets",
            "createTargetGroup",
            "registerTargets",
            "createListener",
            "createListener"
        ],
        "no attribute calls when every attribute is at its default"
    );
}

#[test]
fn unchanged_is_a_no_op() {
    let d = web(&["i-1", "i-2"]);
    assert!(plan(&d, &observed_for(&d)).expect("plan").is_empty());
}

#[test]
fn node_added_or_removed_is_one_call_per_target_group() {
    let before = web(&["i-1", "i-2"]);
    let observed = observed_for(&before);
    let added = plan(&web(&["i-1", "i-2", "i-3"]), &observed).expect("plan");
    assert_eq!(names(&added), ["registerTargets", "registerTargets"]);
    assert!(added.ops.iter().all(|o| matches!(o, Op::RegisterTargets { targets, .. } if targets.len() == 1 && targets[0].id == "i-3")));
    let removed = plan(&web(&["i-1"]), &observed).expect("plan");
    assert_eq!(names(&removed), ["deregisterTargets", "deregisterTargets"]);
    let swapped = plan(&web(&["i-1", "i-9"]), &observed).expect("plan");
    assert_eq!(
        names(&swapped),
        [
            "deregisterTargets",
            "registerTargets",
            "deregisterTargets",
            "registerTargets"
        ],
        "deregister before register"
    );
}

#[test]
fn health_check_and_attribute_changes_modify_in_place() {
    let p = plan_from_web(&web_annotated(serde_json::json!({
        "cloudlb.io/healthcheck-interval": "30",
        "cloudlb.io/target-group-attributes": "deregistration_delay.timeout_seconds=30",
        "cloudlb.io/cross-zone-load-balancing-enabled": "true"
    })));
    assert_eq!(
        names(&p),
        [
            "setLoadBalancerAttributes",
            "modifyHealthCheck",
            "setTargetGroupAttributes",
            "modifyHealthCheck",
            "setTargetGroupAttributes"
        ]
    );
    match &p.ops[0] {
        Op::SetLoadBalancerAttributes { attributes } => {
            assert_eq!(attributes.len(), 1);
            assert_eq!(
                attributes
                    .get("load_balancing.cross_zone.enabled")
                    .map(String::as_str),
                Some("true")
            );
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn scheme_change_replaces_the_load_balancer_and_keeps_target_groups() {
    let mut after = web(&["i-1"]);
    if let Some(lb) = after.lb.as_mut() {
        lb.scheme = Scheme::InternetFacing;
    }
    let p = plan_from_web(&after);
    assert_eq!(
        names(&p),
        [
            "deleteLoadBalancer",
            "createLoadBalancer",
            "createListener",
            "createListener"
        ]
    );
}

#[test]
fn port_removed_deletes_listener_before_its_target_group() {
    let after = desired_with(
        serde_json::json!({}),
        serde_json::json!([{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]),
        &["i-1"],
    );
    let p = plan_from_web(&after);
    assert_eq!(
        names(&p),
        ["revokeIngress", "deleteListener", "deleteTargetGroup"]
    );
    assert!(matches!(&p.ops[1], Op::DeleteListener { port: 443, .. }));
}

#[test]
fn immutable_target_group_change_creates_new_switches_listener_then_deletes_old() {
    let after = desired_with(
        serde_json::json!({}),
        serde_json::json!([
            {"name": "http", "port": 80, "protocol": "TCP", "nodePort": 31080},
            {"name": "https", "port": 443, "protocol": "TCP", "nodePort": 30443}
        ]),
        &["i-1"],
    );
    let p = plan_from_web(&after);
    assert_eq!(
        names(&p),
        [
            "createTargetGroup",
            "registerTargets",
            "modifyListener",
            "deleteTargetGroup"
        ]
    );
}

#[test]
fn protocol_change_of_a_port_modifies_the_listener() {
    let after = web_annotated(
        serde_json::json!({"cloudlb.io/ssl-cert": "arn:aws:acm:us-east-1:1:certificate/x", "cloudlb.io/ssl-ports": "443"}),
    );
    let tls = after
        .lb
        .as_ref()
        .and_then(|l| l.listeners.iter().find(|l| l.port == 443))
        .map(|l| l.protocol);
    assert_eq!(tls, Some(Protocol::Tls));
    let p = plan_from_web(&after);
    assert_eq!(names(&p), ["modifyListener"]);
}

#[test]
fn empty_model_deletes_everything_in_order() {
    let before = web(&["i-1"]);
    let empty = Desired::empty(before.service.clone(), before.lb_name.clone());
    let p = plan(&empty, &observed_for(&before)).expect("plan");
    assert_eq!(
        names(&p),
        [
            "deleteLoadBalancer",
            "deleteTargetGroup",
            "deleteTargetGroup",
            "deleteSecurityGroup"
        ]
    );
    assert!(
        plan(&empty, &Observed::default()).expect("plan").is_empty(),
        "nothing left: nothing to do"
    );
}

#[test]
fn deletion_protection_stops_the_delete() {
    let before = web(&["i-1"]);
    let mut observed = observed_for(&before);
    if let Some(lb) = observed.lb.as_mut() {
        lb.attributes
            .insert("deletion_protection.enabled".into(), "true".into());
    }
    let empty = Desired::empty(before.service.clone(), before.lb_name.clone());
    assert!(matches!(
        plan(&empty, &observed),
        Err(PlanError::DeletionProtected { .. })
    ));
}

/// A read may skip the load balancer's attributes only where no plan needs them: the model
/// sets none, and the load balancer neither goes nor is replaced (deletion protection refuses
/// both); a plan against such a read that needs them reads again first.
#[test]
fn the_load_balancers_attributes_are_needed_to_set_them_delete_or_replace() {
    use crate::model::observed::needs_lb_attributes;
    let plain = web(&["i-1"]);
    let have = Scheme::Internal;
    assert_eq!(plain.lb.as_ref().map(|l| l.scheme), Some(have));
    assert!(!needs_lb_attributes(&plain, have), "sets none");
    let empty = Desired::empty(plain.service.clone(), plain.lb_name.clone());
    assert!(needs_lb_attributes(&empty, have), "deleted");
    assert!(
        needs_lb_attributes(&plain, Scheme::InternetFacing),
        "replaced"
    );
    let setting = web_annotated(serde_json::json!({
        "service.beta.kubernetes.io/aws-load-balancer-attributes": "load_balancing.cross_zone.enabled=true"
    }));
    assert!(needs_lb_attributes(&setting, have), "sets one");

    let mut unread = observed_for(&plain);
    if let Some(lb) = unread.lb.as_mut() {
        lb.attributes.clear();
        lb.attributes_unread = true;
    }
    assert!(!unread.misses_lb_attributes(&plain));
    assert!(unread.misses_lb_attributes(&setting));
    assert!(unread.misses_lb_attributes(&empty));
    assert!(!observed_for(&plain).misses_lb_attributes(&empty), "read");
}

#[test]
fn drift_is_repaired() {
    let d = desired_with(
        serde_json::json!({"cloudlb.io/cross-zone-load-balancing-enabled": "false"}),
        web_ports(),
        &["i-1", "i-2"],
    );
    let mut observed = observed_for(&d);
    observed.listeners.retain(|l| l.port != 443);
    if let Some(tg) = observed.target_groups.first_mut() {
        tg.targets.clear();
    }
    if let Some(sg) = observed.security_group.as_mut() {
        sg.ingress.clear();
    }
    if let Some(lb) = observed.lb.as_mut() {
        lb.attributes
            .insert("load_balancing.cross_zone.enabled".into(), "true".into());
    }
    let p = plan(&d, &observed).expect("plan");
    assert_eq!(
        names(&p),
        [
            "authorizeIngress",
            "setLoadBalancerAttributes",
            "registerTargets",
            "createListener"
        ]
    );
}

#[test]
fn the_backend_group_is_attached_when_wanted_and_detached_when_not() {
    let d = web(&["i-1"]);
    let mut observed = observed_for(&d);
    assert!(plan(&d, &observed).expect("plan").is_empty());
    if let Some(lb) = observed.lb.as_mut() {
        lb.security_groups.retain(|g| g != BACKEND);
    }
    assert_eq!(
        names(&plan(&d, &observed).expect("plan")),
        ["setSecurityGroups"]
    );
    // Not known yet (a process that never saw it): attached by the apply, which makes it.
    let d_observed = observed_for(&d);
    assert_eq!(
        names(&plan_with_backend(&d, &d_observed, None).expect("plan")),
        ["setSecurityGroups"]
    );
    let off = web_annotated(
        serde_json::json!({"cloudlb.io/manage-backend-security-group-rules": "false"}),
    );
    assert!(
        off.lb
            .as_ref()
            .is_some_and(|l| l.security.backend.is_none())
    );
    assert_eq!(
        names(&plan(&off, &d_observed).expect("plan")),
        ["setSecurityGroups"]
    );
}

#[test]
fn ipv6_source_nat_follows_the_model_around_the_address_type_change() {
    let dns =
        serde_json::json!([{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]);
    let v4 = desired_with(serde_json::json!({}), dns.clone(), &["i-1"]);
    let dual = desired_with(
        serde_json::json!({"cloudlb.io/ip-address-type": "dualstack"}),
        dns,
        &["i-1"],
    );
    assert!(
        dual.lb
            .as_ref()
            .is_some_and(|l| l.ipv6_source_nat.is_some())
    );
    // On after the load balancer becomes dualstack; off before it goes back to ipv4.
    let lb_ops = |p: &Plan| -> Vec<String> {
        names(p)
            .into_iter()
            .filter(|n| n.starts_with("setIp"))
            .collect()
    };
    let p = plan(&dual, &observed_for(&v4)).expect("plan");
    assert_eq!(
        lb_ops(&p),
        ["setIpAddressType", "setIpv6SourceNat"],
        "{p:?}"
    );
    let p = plan(&v4, &observed_for(&dual)).expect("plan");
    assert_eq!(
        lb_ops(&p),
        ["setIpv6SourceNat", "setIpAddressType"],
        "{p:?}"
    );
    // Unchanged: nothing; a cloud that does not report the setting is taken at its word.
    assert!(plan(&dual, &observed_for(&dual)).expect("plan").is_empty());
    let mut silent = observed_for(&v4);
    if let Some(lb) = silent.lb.as_mut() {
        lb.ip_address_type = IpAddressType::Dualstack;
        lb.ipv6_source_nat = None;
    }
    assert!(!names(&plan(&dual, &silent).expect("plan")).contains(&"setIpv6SourceNat".to_string()));
}

#[test]
fn attributes_no_setting_names_are_left_as_they_are() {
    let d = web(&["i-1"]);
    let mut observed = observed_for(&d);
    if let Some(lb) = observed.lb.as_mut() {
        for key in [
            "load_balancing.cross_zone.enabled",
            "deletion_protection.enabled",
            "access_logs.s3.enabled",
        ] {
            lb.attributes.insert(key.into(), "true".into());
        }
    }
    assert!(plan(&d, &observed).expect("plan").is_empty());
}

#[test]
fn switching_to_user_security_groups_detaches_and_deletes_ours() {
    let p = plan_from_web(&web_annotated(
        serde_json::json!({"cloudlb.io/security-groups": "sg-user"}),
    ));
    assert_eq!(names(&p), ["setSecurityGroups", "deleteSecurityGroup"]);
}

#[test]
fn attributes_the_cloud_does_not_report_count_as_defaults() {
    let d = web_annotated(serde_json::json!({
        "service.beta.kubernetes.io/aws-load-balancer-attributes": "access_logs.s3.enabled=false"
    }));
    let mut observed = observed_for(&d);
    if let Some(lb) = observed.lb.as_mut() {
        lb.attributes.remove("access_logs.s3.enabled");
    }
    for tg in &mut observed.target_groups {
        tg.attributes.remove("proxy_protocol_v2.enabled");
    }
    assert!(plan(&d, &observed).expect("plan").is_empty());
    if let Some(lb) = observed.lb.as_mut() {
        lb.attributes
            .insert("access_logs.s3.enabled".into(), "true".into());
    }
    assert_eq!(
        names(&plan(&d, &observed).expect("plan")),
        ["setLoadBalancerAttributes"]
    );
}

/// Property: for random Services (ports, protocols, nodes, annotations), planning against what
/// exactly matches is empty, and planning from nothing creates each resource exactly once.
#[test]
fn random_models_plan_idempotently() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for round in 0..500 {
        let n_ports = rng.random_range(1..8);
        let mut ports = Vec::new();
        let mut used = std::collections::BTreeSet::new();
        for i in 0..n_ports {
            let port: u16 = rng.random_range(1..2000);
            let proto = if rng.random_bool(0.3) { "UDP" } else { "TCP" };
            if !used.insert((port, proto)) {
                continue;
            }
            ports.push(serde_json::json!({"name": format!("p{i}"), "port": port, "protocol": proto, "nodePort": 30000 + i}));
        }
        // TCP+UDP on one port needs one nodePort: give such pairs the same one.
        let mut by_port: std::collections::BTreeMap<u64, i64> = std::collections::BTreeMap::new();
        for p in &mut ports {
            let port = p["port"].as_u64().unwrap_or_default();
            let np = p["nodePort"].as_i64().unwrap_or_default();
            let chosen = *by_port.entry(port).or_insert(np);
            p["nodePort"] = serde_json::json!(chosen);
        }
        let nodes: Vec<String> = (0..rng.random_range(0..6))
            .map(|i| format!("i-{round}-{i}"))
            .collect();
        let node_refs: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let mut annotations = serde_json::json!({});
        if rng.random_bool(0.3) {
            annotations["cloudlb.io/healthcheck-interval"] =
                serde_json::json!(rng.random_range(5..300).to_string());
        }
        if rng.random_bool(0.3) {
            annotations["cloudlb.io/cross-zone-load-balancing-enabled"] = serde_json::json!("true");
        }
        if rng.random_bool(0.2) {
            annotations["cloudlb.io/scheme"] = serde_json::json!("internal");
        }
        let d = desired_with(annotations, serde_json::Value::Array(ports), &node_refs);
        let lb = d.lb.as_ref().expect("lb");
        assert!(
            plan(&d, &observed_for(&d)).expect("plan").is_empty(),
            "round {round}"
        );
        let create = plan(&d, &Observed::default()).expect("plan");
        let count = |name: &str| names(&create).iter().filter(|n| *n == name).count();
        assert_eq!(count("createLoadBalancer"), 1);
        assert_eq!(count("createTargetGroup"), lb.target_groups.len());
        assert_eq!(count("createListener"), lb.listeners.len());
        assert!(
            !names(&create).iter().any(|n| n.starts_with("delete")),
            "round {round}"
        );
    }
}

/// The web Service on node `i-1` with `additional-resource-tags: value`, knowing `applied` as
/// the tag keys it put on its resources before.
fn web_tagged(value: &str, applied: &[&str]) -> Desired {
    let mut d = web_annotated(serde_json::json!({"cloudlb.io/additional-resource-tags": value}));
    if let Some(lb) = d.lb.as_mut() {
        lb.applied_tag_keys = applied.iter().map(|k| k.to_string()).collect();
    }
    d
}

#[test]
fn tag_changes_are_made_in_place_one_operation_per_change() {
    let mut observed = observed_for(&web_tagged("team=web,env=dev", &[]));
    // A key someone added by hand.
    if let Some(lb) = observed.lb.as_mut() {
        lb.tags.insert("owner".into(), "ops".into());
    }
    let after = web_tagged("team=shop,cost=42", &["team", "env"]);
    let p = plan(&after, &observed).expect("plan");
    assert_eq!(names(&p), ["removeTags", "addTags"]);
    let every = vec![
        Tagged::LoadBalancer,
        Tagged::Listener { port: 80 },
        Tagged::Listener { port: 443 },
        Tagged::TargetGroup {
            key: "tcp-80".into(),
        },
        Tagged::TargetGroup {
            key: "tcp-443".into(),
        },
        Tagged::SecurityGroup,
    ];
    assert_eq!(
        p.ops[0],
        Op::RemoveTags {
            resources: every.clone(),
            keys: vec!["env".into()],
        },
        "only the key cloudlb put there goes; owner stays"
    );
    assert_eq!(
        p.ops[1],
        Op::AddTags {
            resources: every,
            tags: [("cost", "42"), ("team", "shop")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    );
    // Once made, nothing is left to do.
    let done = observed_for(&after);
    assert_eq!(plan(&after, &done).expect("plan"), Plan::default());
}

#[test]
fn tags_not_of_record_are_never_removed() {
    // Resources an earlier version tagged (no record yet), or tagged by hand: left as they are.
    let observed = observed_for(&web_tagged("team=web,env=dev", &[]));
    let after = web_tagged("team=web", &[]);
    assert_eq!(plan(&after, &observed).expect("plan"), Plan::default());
    // A tag on one resource only: only that resource is changed.
    let mut observed = observed_for(&after);
    if let Some(tg) = observed.target_groups.first_mut() {
        tg.tags.insert("team".into(), "changed-by-hand".into());
    }
    let p = plan(&after, &observed).expect("plan");
    match p.ops.as_slice() {
        [Op::AddTags { resources, tags }] => {
            assert_eq!(resources.len(), 1, "{resources:?}");
            assert_eq!(tags.get("team").map(String::as_str), Some("web"));
        }
        other => panic!("one AddTags expected: {other:?}"),
    }
}

#[test]
fn subnets_follow_the_placement_in_place_when_the_provider_knows_it() {
    let d = web(&["i-1"]);
    let observed = observed_for(&d);
    fn with(subnets: &[String]) -> Known<'_> {
        Known {
            backend: Some(BACKEND),
            subnets: Some(subnets),
        }
    }
    // Where it is: nothing to do; not known: nothing planned.
    let same = vec!["subnet-a".to_string()];
    assert_eq!(
        plan_with(&d, &observed, with(&same)).expect("plan"),
        Plan::default()
    );
    assert_eq!(plan(&d, &observed).expect("plan"), Plan::default());
    // A zone more: one SetSubnets with every subnet, nothing replaced.
    let more = vec!["subnet-a".to_string(), "subnet-b".to_string()];
    let p = plan_with(&d, &observed, with(&more)).expect("plan");
    assert_eq!(p.ops, vec![Op::SetSubnets { subnets: more }]);
    // Never to no subnet at all.
    assert_eq!(
        plan_with(&d, &observed, with(&[])).expect("plan"),
        Plan::default()
    );
}

#[test]
fn an_alpn_policy_is_set_on_the_tls_listeners_and_otherwise_left_alone() {
    let tls = serde_json::json!({
        "cloudlb.io/ssl-cert": "arn:aws:acm:us-east-1:1:certificate/x",
        "cloudlb.io/ssl-ports": "443",
    });
    let mut with_alpn = tls.clone();
    with_alpn["service.beta.kubernetes.io/aws-load-balancer-alpn-policy"] =
        serde_json::json!("HTTP2Preferred");
    let before = web_annotated(tls);
    let after = web_annotated(with_alpn);
    let alpn: Vec<Option<&str>> = after
        .lb
        .iter()
        .flat_map(|l| &l.listeners)
        .map(|l| l.alpn_policy.as_deref())
        .collect();
    assert_eq!(
        alpn,
        [None, Some("HTTP2Preferred")],
        "the TLS listener only"
    );
    let p = plan(&after, &observed_for(&before)).expect("plan");
    assert_eq!(
        p.ops,
        vec![Op::ModifyListener {
            arn: "arn:listener/443".into(),
            port: 443
        }]
    );
    assert_eq!(
        plan(&after, &observed_for(&after)).expect("plan"),
        Plan::default()
    );
    // Not set: a policy the listener has (set in the console) is left as it is.
    let mut console = observed_for(&before);
    if let Some(l) = console.listeners.iter_mut().find(|l| l.port == 443) {
        l.alpn_policy = Some("HTTP2Only".into());
    }
    assert_eq!(plan(&before, &console).expect("plan"), Plan::default());
    // `None` is what a listener without a policy reports.
    let mut none = serde_json::json!({
        "cloudlb.io/ssl-cert": "arn:aws:acm:us-east-1:1:certificate/x",
        "cloudlb.io/ssl-ports": "443",
    });
    none["cloudlb.io/alpn-policy"] = serde_json::json!("None");
    assert_eq!(
        plan(&web_annotated(none), &observed_for(&before)).expect("plan"),
        Plan::default()
    );
}

#[test]
fn listener_attributes_are_set_where_they_differ_and_on_new_listeners() {
    let key = "cloudlb.io/listener-attributes.TCP-80";
    let d = web_annotated(serde_json::json!({key: "tcp.idle_timeout.seconds=400"}));
    let attrs = |v: &str| -> BTreeMap<String, String> {
        [("tcp.idle_timeout.seconds".to_string(), v.to_string())].into()
    };
    // New: created, then its attributes set.
    let p = plan(&d, &Observed::default()).expect("plan");
    assert!(p.ops.contains(&Op::SetListenerAttributes {
        port: 80,
        attributes: attrs("400")
    }));
    // As wanted: nothing; another value: only that listener's attributes.
    assert_eq!(plan(&d, &observed_for(&d)).expect("plan"), Plan::default());
    let mut other = observed_for(&d);
    if let Some(l) = other.listeners.iter_mut().find(|l| l.port == 80) {
        l.attributes = attrs("350");
    }
    let p = plan(&d, &other).expect("plan");
    assert_eq!(
        p.ops,
        vec![Op::SetListenerAttributes {
            port: 80,
            attributes: attrs("400")
        }]
    );
}
