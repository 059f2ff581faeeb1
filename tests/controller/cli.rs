//! The `cloudlb` binary: `plan` previews changes without making them; `crdgen` and `docs`
//! print what is committed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::support;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use serde_json::json;
use std::process::Command;
use support::fixtures::{self, install_crd};
use support::operator::{operator_env, scope_args};
use support::{AwsEmulator, TestCluster, TestGuard};

fn cloudlb() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cloudlb"))
}

#[test]
fn crdgen_and_docs_print_the_committed_files() {
    let out = cloudlb().arg("crdgen").output().expect("run crdgen");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/loadbalancerclasses.cloudlb.io.yaml"
    ))
    .expect("committed CRD");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
    let out = cloudlb()
        .args(["docs", "annotations"])
        .output()
        .expect("run docs");
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/annotations.md"))
            .expect("docs");
    assert_eq!(String::from_utf8_lossy(&out.stdout), committed);
}

#[test]
fn bad_flags_are_a_clear_error() {
    let out = cloudlb().args(["run"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cluster-name"), "{err}");
    let out = cloudlb()
        .args(["run", "--cluster-name", "x", "--log-format", "xml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: text, json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_previews_changes_and_writes_nothing() {
    let _guard = TestGuard::new();
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    install_crd(&client).await;
    let ns = cluster.create_namespace("plan").await;
    // Nodes are cluster-wide and other tests add theirs: this class targets none of them.
    fixtures::create_class(
        &client,
        &ns,
        json!({"provider": "aws", "default": true, "aws": {"targetNodeLabels": {"cloudlb.io/test-plan": &ns}}}),
    )
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    // The class adopts only class-less Services that the cloud's controller leaves alone.
    let external = "service.beta.kubernetes.io/aws-load-balancer-type";
    for (name, annotations) in [
        ("web", json!({external: "external"})),
        (
            "broken",
            json!({external: "external", "cloudlb.io/scheme": "sideways"}),
        ),
        ("plain", json!({})),
    ] {
        let ports = json!({"ports": [{"port": 80, "protocol": "TCP"}]});
        fixtures::create_service(&services, &fixtures::lb_service(name, annotations, ports)).await;
    }

    let moto = AwsEmulator::shared().await;
    let out = tokio::task::spawn_blocking({
        let vars = operator_env(moto.endpoint(), cluster);
        let ns = ns.clone();
        move || {
            cloudlb()
                .arg("plan")
                .args(scope_args(&ns))
                .envs(vars)
                .output()
                .expect("run cloudlb plan")
        }
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "plan failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("{ns}/web (class {ns}, adopted): 5 change(s)")),
        "{stdout}"
    );
    // No Node carries the class's label: nothing to register yet.
    assert!(!stdout.contains("registerTargets"), "{stdout}");
    assert!(stdout.contains("\"op\":\"createLoadBalancer\""), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{ns}/broken (class {ns}, adopted): error: 1 invalid setting"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{ns}/plain (default class {ns}): not adopted: no spec.loadBalancerClass and no {external}: external"
        )),
        "{stdout}"
    );

    // Nothing was written: no load balancer in the account the binary used (moto's default
    // account for these credentials) with this cluster's name, and no finalizer on the Services.
    let default_account = support::aws_sdk_config(moto.endpoint(), "123456789012");
    let elbv2 = support::elbv2::Client::new(&default_account);
    let lbs = elbv2
        .describe_load_balancers()
        .send()
        .await
        .expect("describe");
    assert!(
        lbs.load_balancers()
            .iter()
            .all(|l| !l.load_balancer_name().unwrap_or_default().contains(&ns)),
        "plan created a load balancer"
    );
    for name in ["web", "broken"] {
        let svc = services.get(name).await.expect("get");
        assert!(
            svc.metadata.finalizers.unwrap_or_default().is_empty(),
            "plan added a finalizer"
        );
    }
}
