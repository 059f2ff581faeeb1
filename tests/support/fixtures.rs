//! Kubernetes objects the tests create and read: classes, LoadBalancer Services, labelled Nodes,
//! Events, and the class CRD.

use cloudlb::config::class::LoadBalancerClass;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

use super::env::wait_within;
use super::{Instance, create_node, node_for};

/// The Node label a test's class selects its Nodes by (value: the test's namespace).
pub const LABEL: &str = "cloudlb.test/env";

/// Installs the LoadBalancerClass CRD (if missing) and waits until it is served. Idempotent.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds
        .create(&PostParams::default(), &LoadBalancerClass::crd())
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.is_already_exists() => {}
        Err(e) => panic!("create CRD: {e}"),
    }
    wait_crd_established(client).await;
}

/// Waits until LoadBalancerClasses can be listed (the CRD is established).
pub async fn wait_crd_established(client: &Client) {
    let classes: Api<LoadBalancerClass> = Api::all(client.clone());
    wait_within(
        "the CRD to be established",
        Duration::from_secs(30),
        || async { classes.list(&ListParams::default()).await.ok().map(drop) },
    )
    .await;
}

/// The spec of a default AWS class that targets the Nodes labelled [`LABEL`]`=<ns>` and adopts
/// every class-less Service (no cloud service controller runs on the testbed).
pub fn aws_class_spec(ns: &str) -> Value {
    json!({"provider": "aws", "default": true, "adoptAllClasslessServices": true, "aws": {"targetNodeLabels": {LABEL: ns}}})
}

/// Creates the LoadBalancerClass `name` with `spec`.
pub async fn create_class(client: &Client, name: &str, spec: Value) {
    let class: LoadBalancerClass = serde_json::from_value(json!({
        "apiVersion": "cloudlb.io/v1alpha1",
        "kind": "LoadBalancerClass",
        "metadata": {"name": name},
        "spec": spec
    }))
    .unwrap_or_else(|e| panic!("class {name}: {e}"));
    Api::<LoadBalancerClass>::all(client.clone())
        .create(&PostParams::default(), &class)
        .await
        .unwrap_or_else(|e| panic!("create class {name}: {e}"));
}

/// A Service of type LoadBalancer: `spec` (ports, selector, class, ...) with the type set.
pub fn lb_service(name: &str, annotations: Value, mut spec: Value) -> Service {
    spec["type"] = json!("LoadBalancer");
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec
    }))
    .unwrap_or_else(|e| panic!("service {name}: {e}"))
}

pub async fn create_service(services: &Api<Service>, svc: &Service) {
    services
        .create(&PostParams::default(), svc)
        .await
        .unwrap_or_else(|e| panic!("create service {:?}: {e}", svc.metadata.name));
}

/// The first `status.loadBalancer.ingress` entry of Service `name`, if it has one.
pub async fn ingress(services: &Api<Service>, name: &str) -> Option<LoadBalancerIngress> {
    let svc = services.get(name).await.ok()?;
    svc.status?.load_balancer?.ingress?.into_iter().next()
}

/// Creates a Node for `instance`, labelled [`LABEL`]`=<ns>` so that `ns`'s class selects it.
pub async fn create_labelled_node(client: &Client, instance: &Instance, name: &str, ns: &str) {
    let mut node = node_for(instance, name);
    node.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(LABEL.into(), ns.into());
    create_node(client, &node).await;
}
