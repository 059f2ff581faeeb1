//! When the webhook sets the class, case by case, and what it answers.

use super::*;
use serde_json::Value;

/// An AdmissionRequest for `operation` of a Service with `spec` (and `old_spec` on UPDATE).
fn request(operation: &str, spec: Value, old_spec: Option<Value>) -> AdmissionRequest<Service> {
    let svc = |spec: Value| json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"}, "spec": spec});
    let review = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Service"},
            "resource": {"group": "", "version": "v1", "resource": "services"},
            "name": "web",
            "namespace": "default",
            "operation": operation,
            "userInfo": {"username": "admin"},
            "object": svc(spec),
            "oldObject": old_spec.map(svc),
            "dryRun": false
        }
    });
    let review: AdmissionReview<Service> = serde_json::from_value(review).expect("review");
    review.try_into().expect("request")
}

fn lb() -> Value {
    json!({"type": "LoadBalancer", "ports": [{"port": 80}]})
}

#[test]
fn a_new_classless_load_balancer_gets_the_default_class() {
    let req = request("CREATE", lb(), None);
    assert_eq!(
        class_to_set(&req, Some("edge")).as_deref(),
        Some("cloudlb.io/edge")
    );
    // No default class served: nothing to set.
    assert_eq!(class_to_set(&req, None), None);
}

#[test]
fn a_class_that_is_set_is_never_changed() {
    for class in ["service.k8s.aws/nlb", "cloudlb.io/other"] {
        let mut spec = lb();
        spec["loadBalancerClass"] = json!(class);
        assert_eq!(
            class_to_set(&request("CREATE", spec, None), Some("edge")),
            None,
            "{class}"
        );
    }
}

#[test]
fn only_services_becoming_load_balancers_are_changed() {
    let node_port = json!({"type": "NodePort", "ports": [{"port": 80}]});
    assert_eq!(
        class_to_set(&request("CREATE", node_port.clone(), None), Some("edge")),
        None
    );
    // NodePort → LoadBalancer: set, like a create.
    let becomes = request("UPDATE", lb(), Some(node_port));
    assert_eq!(
        class_to_set(&becomes, Some("edge")).as_deref(),
        Some("cloudlb.io/edge")
    );
    // Already a class-less load balancer (another controller may serve it): left as it is.
    let already = request("UPDATE", lb(), Some(lb()));
    assert_eq!(class_to_set(&already, Some("edge")), None);
    assert_eq!(
        class_to_set(&request("DELETE", lb(), Some(lb())), Some("edge")),
        None
    );
}

#[test]
fn the_answer_allows_and_carries_the_json_patch() {
    let req = request("CREATE", lb(), None);
    let answer = serde_json::to_value(review(&req, Some("edge")).into_review()).expect("json");
    let response = &answer["response"];
    assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    // kube encodes the patch bytes as a JSON array of numbers, which the API server's decoder
    // takes for a []byte like base64 (the end-to-end test shows it).
    let bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).expect("patch bytes");
    let decoded: Value = serde_json::from_slice(&bytes).expect("patch JSON");
    assert_eq!(
        decoded,
        json!([{"op": "add", "path": "/spec/loadBalancerClass", "value": "cloudlb.io/edge"}])
    );
    // Nothing to set: allowed, no patch.
    let plain = serde_json::to_value(review(&req, None).into_review()).expect("json");
    assert_eq!(plain["response"]["allowed"], true);
    assert!(
        plain["response"].get("patch").is_none_or(Value::is_null),
        "{plain}"
    );
}

/// A Service of class `class` with `annotations`, selecting `app: web`.
fn selecting(name: &str, class: &str, annotations: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
            "annotations": annotations},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": class, "selector": {"app": "web"},
            "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]}
    }))
    .expect("service")
}

fn pod_with(labels: Value, gates: &[&str]) -> Pod {
    let gates: Vec<Value> = gates.iter().map(|g| json!({"conditionType": g})).collect();
    serde_json::from_value(json!({
        "metadata": {"name": "web-0", "labels": labels},
        "spec": {"containers": [], "readinessGates": gates}
    }))
    .expect("pod")
}

#[test]
fn a_pod_gets_the_gate_of_each_pod_target_service_of_ours_that_selects_it() {
    let served = [LoadBalancerClass::new(
        "edge",
        crate::config::class::LoadBalancerClassSpec::default_of(
            crate::config::class::ProviderKind::Aws,
        ),
    )];
    let ip = json!({"cloudlb.io/target-type": "ip"});
    let services = [
        selecting("pods", "cloudlb.io/edge", ip.clone()),
        // Node targets: the nodes' health, not the pod's, decides; no gate.
        selecting("nodes", "cloudlb.io/edge", json!({})),
        // Another controller's class: not ours to gate.
        selecting("theirs", "service.k8s.aws/nlb", ip.clone()),
        // Invalid configuration: no load balancer, so no gate to wait for.
        selecting(
            "broken",
            "cloudlb.io/edge",
            json!({"cloudlb.io/target-type": "ip", "cloudlb.io/scheme": "sideways"}),
        ),
    ];
    let web = pod_with(json!({"app": "web"}), &[]);
    assert_eq!(
        gates_for(&web, &services, &served, "cloudlb"),
        ["cloudlb.io/target-health.pods"]
    );
    // Not selected, or already gated: nothing to add.
    assert!(
        gates_for(
            &pod_with(json!({"app": "db"}), &[]),
            &services,
            &served,
            "cloudlb"
        )
        .is_empty()
    );
    let gated = pod_with(json!({"app": "web"}), &["cloudlb.io/target-health.pods"]);
    assert!(gates_for(&gated, &services, &served, "cloudlb").is_empty());
}
