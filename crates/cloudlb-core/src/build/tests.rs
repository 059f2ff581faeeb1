//! Golden tests: `tests/golden/build/<case>.yaml` (an optional LoadBalancerClass, a Service, Nodes,
//! EndpointSlices)
//! → `<case>.json` (the desired model, or the configuration errors). `UPDATE_GOLDEN=1` rewrites
//! the expected files; review the diff.

use super::*;
use crate::config::class::{LoadBalancerClass, LoadBalancerClassSpec, ProviderKind};
use std::path::Path;

#[path = "../../tests/support/golden.rs"]
mod golden;

fn default_class() -> LoadBalancerClass {
    LoadBalancerClass::new(
        "default",
        LoadBalancerClassSpec::default_of(ProviderKind::Aws),
    )
}

fn run_case(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("read case");
    let mut class = default_class();
    let mut svc = None;
    let mut nodes = Vec::new();
    let mut slices = Vec::new();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text).expect("yaml");
    for value in docs {
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("LoadBalancerClass") => class = serde_json::from_value(value).expect("class"),
            Some("Service") => {
                svc = Some(serde_json::from_value::<Service>(value).expect("service"))
            }
            Some("Node") => nodes.push(serde_json::from_value::<Node>(value).expect("node")),
            Some("EndpointSlice") => {
                slices.push(serde_json::from_value::<EndpointSlice>(value).expect("slice"))
            }
            other => panic!("{}: unexpected document kind {other:?}", path.display()),
        }
    }
    let svc = svc.expect("case has a Service");
    let cfg = match crate::config::resolve(&class, &svc) {
        Ok(cfg) => cfg,
        Err(e) => {
            return serde_json::json!({ "configErrors": e.0.iter().map(ToString::to_string).collect::<Vec<_>>() });
        }
    };
    let backends = Backends {
        nodes: &nodes,
        endpoint_slices: &slices,
        gate_waiting: NO_GATE_WAITING,
    };
    match build("test-cluster", &svc, backends, &cfg) {
        Ok(b) if b.no_ready_endpoints.is_empty() => {
            serde_json::json!({ "warnings": b.warnings, "desired": b.desired })
        }
        Ok(b) => serde_json::json!({
            "warnings": b.warnings,
            "noReadyEndpoints": b.no_ready_endpoints,
            "desired": b.desired
        }),
        Err(e) => serde_json::json!({ "buildError": e.to_string() }),
    }
}

#[test]
fn golden_models() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/build");
    let cases = golden::cases(&dir, &golden::files(&dir), |n| n.ends_with(".yaml"));
    golden::check(
        &cases,
        |case| case.with_extension("json"),
        |case| serde_json::to_string_pretty(&run_case(case)).expect("json") + "\n",
        std::env::var_os("UPDATE_GOLDEN").is_some(),
        "golden mismatch (UPDATE_GOLDEN=1 to accept)",
    );
}

fn node(name: &str) -> Node {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"providerID": format!("aws:///us-east-1a/i-{name}")},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}
    }))
    .expect("node")
}

#[test]
fn eligibility_follows_the_service_controller() {
    assert!(node_eligible(&node("a")));
    let mut excluded = node("b");
    excluded.metadata.labels = Some([(EXCLUDE_LABEL.to_string(), "true".to_string())].into());
    assert!(!node_eligible(&excluded));
    excluded.metadata.labels = Some([(EXCLUDE_LABEL.to_string(), "".to_string())].into());
    assert!(
        !node_eligible(&excluded),
        "present without a false value excludes"
    );
    excluded.metadata.labels = Some([(EXCLUDE_LABEL.to_string(), "False".to_string())].into());
    assert!(node_eligible(&excluded));
    for taint in DRAINING_TAINTS {
        let mut n = node("c");
        n.spec.get_or_insert_with(Default::default).taints =
            Some(vec![k8s_openapi::api::core::v1::Taint {
                key: (*taint).to_string(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]);
        assert!(!node_eligible(&n), "{taint}");
    }
    let mut deleting = node("d");
    deleting.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    assert!(!node_eligible(&deleting));
    assert_eq!(instance_id(&node("x")).as_deref(), Some("i-x"));
}

#[test]
fn a_tcp_service_without_settings_gets_the_tcp_traffic_port_health_check() {
    let svc: Service = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "web", "namespace": "default", "uid": "u"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}
    }))
    .expect("service");
    let cfg = crate::config::resolve(&default_class(), &svc).expect("config");
    let built = build("c", &svc, Backends::nodes(&[node("a")]), &cfg).expect("build");
    let lb = built.desired.lb.expect("a load balancer");
    let checks: Vec<_> = lb.target_groups.iter().map(|tg| &tg.health_check).collect();
    assert_eq!(checks, [&HealthCheck::TCP_TRAFFIC_PORT]);
}

mod hostile {
    use super::*;
    use crate::model::naming::validate_lb_name;

    fn svc(
        name: &str,
        ns: &str,
        annotations: serde_json::Value,
        ports: serde_json::Value,
    ) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": ns, "uid": "u", "annotations": annotations},
            "spec": {"type": "LoadBalancer", "ports": ports}
        }))
        .expect("service")
    }

    fn resolve_and_build(s: &Service) -> Result<Built, String> {
        let cfg = crate::config::resolve(&default_class(), s).map_err(|e| e.to_string())?;
        build("c", s, Backends::nodes(&[node("a")]), &cfg).map_err(|e| e.to_string())
    }

    #[test]
    fn a_hundred_ports_is_a_clear_error() {
        let ports: Vec<_> = (0..100)
            .map(|i| serde_json::json!({"name": format!("p{i}"), "port": 1000 + i, "protocol": "TCP", "nodePort": 30000 + i}))
            .collect();
        let err = resolve_and_build(&svc(
            "web",
            "ns",
            serde_json::json!({}),
            serde_json::json!(ports),
        ))
        .expect_err("too many");
        assert!(
            err.contains("spec.ports = \"100\": a Network Load Balancer has at most 50 listeners"),
            "{err}"
        );
    }

    #[test]
    fn names_at_the_length_limits_give_valid_cloud_names() {
        let long = "a".repeat(63);
        let built = resolve_and_build(&svc(
            &long,
            &long,
            serde_json::json!({}),
            serde_json::json!([{"port": 80, "nodePort": 30080}]),
        ))
        .expect("build");
        let lb = built.desired.lb.expect("lb");
        validate_lb_name(&lb.name).expect("lb name");
        for tg in &lb.target_groups {
            validate_lb_name(&tg.name).expect("tg name");
        }
    }

    #[test]
    fn huge_tag_maps_and_unicode_are_reported_not_panicked_on() {
        let tags: Vec<String> = (0..100).map(|i| format!("k{i}=v{i}")).collect();
        let err = resolve_and_build(&svc(
            "web",
            "ns",
            serde_json::json!({"cloudlb.io/additional-resource-tags": tags.join(",")}),
            serde_json::json!([{"port": 80, "nodePort": 30080}]),
        ))
        .expect_err("too many tags");
        assert!(err.contains("at most 40 additional tags"), "{err}");
        let err = resolve_and_build(&svc(
            "web",
            "ns",
            serde_json::json!({"cloudlb.io/scheme": "ïntérnal 😀", "cloudlb.io/healthcheck-path": "/santé"}),
            serde_json::json!([{"port": 80, "nodePort": 30080}]),
        ))
        .expect_err("unicode");
        assert!(
            err.contains("\"ïntérnal 😀\"") && err.contains("\"/santé\""),
            "{err}"
        );
    }
}
