//! The Helm chart `charts/cloudlb`: it lints and renders offline (scripts/render-chart, the Helm v4
//! engine from PyPI helm-python-sdk), its values schema catches typos, its manifests apply to a
//! real API server, and its RBAC is proven: the operator runs with the chart's ServiceAccount
//! token only and passes the AWS lifecycle against moto; without one permission it says which.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::helpers::{self, web_and_dns_ports, web_ports};
use crate::support;

use cloudlb::config::class::LoadBalancerClass;
use cloudlb::controller;
use k8s_openapi::api::core::v1::Service;
use kube::api::ListParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::env::{Env, Setup, wait_for};
use support::{TestCluster, TestGuard, describe, fixtures};
use tokio::sync::OnceCell;

const CRD_FILE: &str = "crds/loadbalancerclasses.cloudlb.io.yaml";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart_dir() -> PathBuf {
    root().join("charts/cloudlb")
}

/// `scripts/render-chart ARGS`: Ok(stdout) or Err(stderr). Panics, saying what to do, when the
/// Helm engine is not installed: this test never skips.
async fn render_chart(args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(root().join("scripts/render-chart"))
        .args(args)
        .output()
        .await
        .expect("run scripts/render-chart");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.code() == Some(2) && stderr.contains("install-test-deps") {
        panic!(
            "scripts/render-chart cannot run: {stderr}\nInstall PyPI helm-python-sdk and yamllint with scripts/install-test-deps"
        );
    }
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).expect("rendered YAML is UTF-8"))
    } else {
        Err(stderr)
    }
}

async fn render_ok(args: &[&str]) -> String {
    match render_chart(args).await {
        Ok(s) => s,
        Err(e) => panic!("scripts/render-chart {args:?} failed:\n{e}"),
    }
}

/// [`render_ok`] as release `release` in namespace `ns` for the API server `version`, with
/// `values` (`--set`/`-f` arguments).
async fn render_release(release: &str, ns: &str, version: &str, values: &[&str]) -> String {
    let mut args = vec![
        "--release",
        release,
        "--namespace",
        ns,
        "--kube-version",
        version,
    ];
    args.extend_from_slice(values);
    render_ok(&args).await
}

async fn render_err(args: &[&str]) -> String {
    match render_chart(args).await {
        Ok(out) => panic!("scripts/render-chart {args:?} should have failed, but rendered:\n{out}"),
        Err(e) => e,
    }
}

/// [`render_err`] with the required clusterName and `--set value`: what `value` alone does wrong.
async fn render_err_with(value: &str) -> String {
    render_err(&["--set", "clusterName=prod", "--set", value]).await
}

/// The objects of a multi-document YAML stream.
fn objects(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("valid YAML documents");
    docs.into_iter().filter(|v| !v.is_null()).collect()
}

fn kind(o: &Value) -> &str {
    o["kind"].as_str().unwrap_or_default()
}

fn to_yaml_stream(objs: &[Value]) -> String {
    objs.iter()
        .map(|o| format!("---\n{}", serde_saphyr::to_string(o).expect("serialize")))
        .collect()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl ARGS` against the testbed; panics with its output when it fails.
async fn kubectl_ok(cluster: &TestCluster, args: &[&str]) -> String {
    let out = cluster.kubectl(args).await;
    assert!(
        out.status.success(),
        "kubectl {args:?} failed:\n{}\n{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// Writes `objs` to a file in the cluster's scratch dir and `kubectl apply`s it (extra args such
/// as `--dry-run=server` go first).
async fn apply(cluster: &TestCluster, name: &str, objs: &[Value], extra: &[&str]) -> String {
    let file = cluster.dir().join(format!("{name}.yaml"));
    std::fs::write(&file, to_yaml_stream(objs)).expect("write manifest");
    let file = file.to_str().expect("UTF-8 path").to_string();
    let mut args = vec!["apply"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-f", &file]);
    kubectl_ok(cluster, &args).await
}

static CRD: OnceCell<()> = OnceCell::const_new();

/// The chart's CRD, applied with kubectl once per test process, then established.
async fn install_chart_crd(cluster: &TestCluster) {
    CRD.get_or_init(|| async {
        let file = chart_dir().join(CRD_FILE);
        kubectl_ok(
            cluster,
            &["apply", "-f", file.to_str().expect("UTF-8 path")],
        )
        .await;
        fixtures::wait_crd_established(&cluster.client()).await;
    })
    .await;
}

/// The testbed API server's version, for `--kube-version` (e.g. the PDB's API version).
async fn server_version(client: &Client) -> String {
    client
        .apiserver_version()
        .await
        .expect("server version")
        .git_version
}

// ------------------------------------------------------------------ static checks + apply

#[test]
fn chart_version_is_the_crate_version() {
    let text = std::fs::read_to_string(chart_dir().join("Chart.yaml")).expect("Chart.yaml");
    let chart: Value = serde_saphyr::from_str(&text).expect("Chart.yaml is YAML");
    let crate_version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["apiVersion"], "v2", "a Helm 3+ chart");
    assert_eq!(
        chart["version"].as_str(),
        Some(crate_version),
        "charts/cloudlb/Chart.yaml version must be the crate version in Cargo.toml"
    );
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(crate_version),
        "charts/cloudlb/Chart.yaml appVersion must be the crate version in Cargo.toml"
    );
}

#[test]
fn chart_crd_is_the_top_level_crd() {
    let top = std::fs::read(root().join(CRD_FILE)).expect("top-level CRD");
    let chart = std::fs::read(chart_dir().join(CRD_FILE)).expect("chart CRD");
    assert!(
        top == chart,
        "charts/cloudlb/{CRD_FILE} differs from {CRD_FILE}: cp {CRD_FILE} charts/cloudlb/{CRD_FILE}"
    );
}

/// The schema's `defaultClass.aws` / `defaultClass.local` (strict, so typos fail at install)
/// name exactly the fields of the CRD's `spec.aws` / `spec.local`, nested ones too.
#[test]
fn values_schema_class_settings_match_the_crd() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_dir().join("values.schema.json")).expect("schema"),
    )
    .expect("schema is JSON");
    let crd: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root().join(CRD_FILE)).expect("crd"))
            .expect("crd YAML");
    let crd_spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    let values_class = &schema["properties"]["defaultClass"]["properties"];
    fn keys(v: &Value) -> Vec<String> {
        let mut k: Vec<String> = v
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    }
    for section in ["aws", "local"] {
        let ours = &values_class[section];
        assert_eq!(ours["additionalProperties"], false, "{section} is strict");
        assert_eq!(
            keys(&ours["properties"]),
            keys(&crd_spec[section]["properties"]),
            "values.schema.json defaultClass.{section} vs the CRD's spec.{section}"
        );
    }
    assert_eq!(
        keys(&values_class["aws"]["properties"]["healthCheck"]["properties"]),
        keys(&crd_spec["aws"]["properties"]["healthCheck"]["properties"]),
        "healthCheck fields"
    );
    assert_eq!(
        keys(&schema["properties"]),
        {
            let values: Value = serde_saphyr::from_str(
                &std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values"),
            )
            .expect("values.yaml");
            let mut k = keys(&values);
            k.push("clusterName".into()); // required, so it has no default in values.yaml
            k.sort();
            k
        },
        "every top-level value is in the schema and every schema key in values.yaml"
    );
}

/// The rendered webhook: a configuration that never blocks (Ignore), leaves the release's
/// namespace and opted-out Services alone, and trusts the CA that signed the serving
/// certificate the pods mount, which is valid for the webhook Service's name.
fn assert_webhook(objs: &[Value], ns: &str) {
    let find = |k: &str| {
        objs.iter()
            .find(|o| kind(o) == k)
            .unwrap_or_else(|| panic!("no {k}"))
    };
    let config = find("MutatingWebhookConfiguration");
    let hook = &config["webhooks"][0];
    assert_eq!(hook["failurePolicy"], "Ignore");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["timeoutSeconds"], 5);
    assert_eq!(hook["clientConfig"]["service"]["path"], "/mutate-service");
    assert_eq!(hook["rules"][0]["operations"], json!(["CREATE", "UPDATE"]));
    assert_eq!(hook["rules"][0]["resources"], json!(["services"]));
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"][0],
        json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": [ns]})
    );
    assert_eq!(
        hook["objectSelector"]["matchExpressions"][0],
        json!({"key": "cloudlb.io/webhook", "operator": "NotIn", "values": ["disabled"]})
    );
    let secret = find("Secret");
    assert_eq!(hook["clientConfig"]["caBundle"], secret["data"]["ca.crt"]);
    let service = hook["clientConfig"]["service"]["name"]
        .as_str()
        .expect("service name");
    let dir = std::env::temp_dir().join(format!("cloudlb-chart-webhook-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = |f: &str| dir.join(f).to_string_lossy().into_owned();
    for file in ["ca.crt", "tls.crt"] {
        let b64 = secret["data"][file].as_str().expect("base64");
        std::fs::write(path(&format!("{file}.b64")), b64).expect("write");
        let (from, to) = (path(&format!("{file}.b64")), path(file));
        support::tls::openssl(&["base64", "-d", "-A", "-in", &from, "-out", &to]);
    }
    // Fails (with openssl's words) unless the chart's CA signed it for the Service's name.
    let host = format!("{service}.{ns}.svc");
    let ca = path("ca.crt");
    support::tls::openssl(&[
        "verify",
        "-CAfile",
        &ca,
        "-verify_hostname",
        &host,
        &path("tls.crt"),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_renders_and_rejects_bad_values() {
    let _guard = TestGuard::new();
    // Defaults + the required clusterName; every option at once.
    let out = render_ok(&["--set", "clusterName=prod"]).await;
    let objs = objects(&out);
    let kinds: Vec<&str> = objs.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [
            "PodDisruptionBudget",
            "ServiceAccount",
            "Secret",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Service",
            "Deployment",
            "MutatingWebhookConfiguration",
            "LoadBalancerClass"
        ],
        "rendered:\n{out}"
    );
    let deploy = objs
        .iter()
        .find(|o| kind(o) == "Deployment")
        .expect("Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let pod = &deploy["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for want in [
        "run",
        "--cluster-name=prod",
        // The release name (the default, cloudlb).
        "--installation=cloudlb",
        "--webhook-addr=0.0.0.0:9443",
        "--leader-elect",
        "--metrics-addr=0.0.0.0:8080",
        "--log-format=json",
        "--log-level=info",
        "--no-local",
    ] {
        assert!(args.contains(&want), "{want} missing from {args:?}");
    }
    assert!(!args.contains(&"--no-aws"), "{args:?}");
    // Safe on EKS out of the box: the default class adopts only class-less Services that the
    // cloud's controller leaves alone.
    let class = objs
        .iter()
        .find(|o| kind(o) == "LoadBalancerClass")
        .expect("LoadBalancerClass");
    assert_eq!(class["spec"]["default"], true);
    assert_eq!(class["spec"]["adoptAllClasslessServices"], false);
    assert_webhook(&objs, "cloudlb-system");
    assert_eq!(container["image"], "ghcr.io/cloudlb/cloudlb:0.1.0");
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    let env: Vec<&str> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(env, ["POD_NAMESPACE", "POD_NAME"]);
    assert!(pod["topologySpreadConstraints"].is_array());

    let everything = chart_dir().join("ci/everything-values.yaml");
    let out = render_ok(&["-f", everything.to_str().expect("path")]).await;
    let objs = objects(&out);
    assert!(objs.iter().any(|o| kind(o) == "ServiceMonitor"));
    let deploy = objs
        .iter()
        .find(|o| kind(o) == "Deployment")
        .expect("Deployment");
    let container = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert!(
        container["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "AWS_REGION" && e["value"] == "eu-west-1")
    );
    let sa = objs
        .iter()
        .find(|o| kind(o) == "ServiceAccount")
        .expect("SA");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::111122223333:role/cloudlb"
    );

    // With hostNetwork the metrics listener takes the node's own address (from the downward
    // API), never a wildcard that would hold the port on every address the local provider serves.
    let host_network =
        objects(&render_ok(&["--set", "clusterName=prod", "--set", "hostNetwork=true"]).await);
    let container = &host_network
        .iter()
        .find(|o| kind(o) == "Deployment")
        .expect("Deployment")["spec"]["template"]["spec"]["containers"][0];
    let args = container["args"].as_array().expect("args");
    assert!(
        args.iter().any(|a| a == "--metrics-addr=$(POD_IP):8080"),
        "{args:?}"
    );
    assert!(
        container["env"]
            .as_array()
            .expect("env")
            .iter()
            .any(|e| e["name"] == "POD_IP"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"),
        "POD_IP from the downward API: {:?}",
        container["env"]
    );

    // The binary accepts every argument the chart renders (clap exits 2 on a usage error); it
    // then fails only for want of a cluster.
    for objs in [
        objects(&render_ok(&["--set", "clusterName=prod"]).await),
        objs.clone(),
        host_network,
    ] {
        let deploy = objs
            .iter()
            .find(|o| kind(o) == "Deployment")
            .expect("Deployment");
        let args: Vec<String> = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            // The kubelet expands $(VAR) references to the container's env.
            .map(|a| a.replace("$(POD_IP)", "10.1.2.3"))
            .collect();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_cloudlb"))
            .args(&args)
            .env_clear()
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env("POD_NAMESPACE", "cloudlb-system")
            .env("POD_NAME", "cloudlb-0")
            .output()
            .await
            .expect("run cloudlb");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(
            out.status.code(),
            Some(2),
            "cloudlb rejected {args:?}:\n{stderr}"
        );
        assert!(
            !stderr.contains("Usage:"),
            "cloudlb rejected {args:?}:\n{stderr}"
        );
        assert!(
            !out.status.success(),
            "no cluster, yet cloudlb succeeded: {stderr}"
        );
    }

    // A typo in a value name fails at render time, naming it.
    let e = render_err_with("replica=3").await;
    assert!(
        e.contains("additional properties 'replica' not allowed"),
        "{e}"
    );
    let e = render_err(&["--set", "clusterNme=prod"]).await;
    assert!(e.contains("'clusterNme' not allowed"), "{e}");
    assert!(e.contains("missing property 'clusterName'"), "{e}");
    let e = render_err_with("defaultClass.aws.schme=internal").await;
    assert!(e.contains("'schme' not allowed"), "{e}");
    // clusterName: required and validated.
    let e = render_err(&[]).await;
    assert!(e.contains("missing property 'clusterName'"), "{e}");
    let e = render_err(&["--set", "clusterName=-bad"]).await;
    assert!(
        e.contains("/clusterName") && e.contains("does not match pattern"),
        "{e}"
    );
    let e = render_err(&["--set", "clusterName="]).await;
    assert!(e.contains("/clusterName"), "{e}");
    // Wrong types and values.
    let e = render_err_with("replicas=two").await;
    assert!(e.contains("/replicas"), "{e}");
    let e = render_err_with("logFormat=xml").await;
    assert!(e.contains("/logFormat"), "{e}");
    // Settings that cannot work fail with a message saying why.
    let e = render_err_with("leaderElection.enabled=false").await;
    assert!(
        e.contains("replicas > 1 needs leaderElection.enabled=true"),
        "{e}"
    );
    let e = render_err_with("defaultClass.provider=local").await;
    assert!(e.contains("providers.local.enabled is false"), "{e}");
}

/// The exact ClusterRole rules: a new permission must be added here on purpose (and proven by
/// the RBAC tests below).
fn expected_cluster_rules() -> Value {
    json!([
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch", "patch"]},
        {"apiGroups": [""], "resources": ["services/status"], "verbs": ["patch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch"]},
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["cloudlb.io"], "resources": ["loadbalancerclasses"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["cloudlb.io"], "resources": ["loadbalancerclasses/status"], "verbs": ["patch"]},
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_chart_applies_to_a_real_api_server() {
    let _guard = TestGuard::new();
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    install_chart_crd(cluster).await;
    let version = server_version(&client).await;
    let ns = cluster.create_namespace("chart-apply").await;

    let out = render_release(
        &ns,
        &ns,
        &version,
        &[
            "--set",
            "clusterName=testbed",
            "--set",
            &format!("defaultClass.name={ns}"),
            "--set",
            "defaultClass.default=false",
            // The shared cluster's other tests create Services: the webhook (whose pods do not
            // run here) sees only this release's namespace, which it always leaves out.
            "--set-json",
            &format!("webhook.namespaceSelector={{\"matchLabels\":{{\"kubernetes.io/metadata.name\":\"{ns}\"}}}}"),
        ],
    )
    .await;
    let objs = objects(&out);
    let dry = apply(cluster, &format!("{ns}-dry"), &objs, &["--dry-run=server"]).await;
    assert!(dry.contains("(server dry run)"), "{dry}");
    let applied = apply(cluster, &ns, &objs, &[]).await;
    eprintln!("kubectl apply:\n{applied}");
    let fullname = format!("{ns}-cloudlb");
    for (resource, namespaced) in [
        ("deployment", true),
        ("serviceaccount", true),
        ("service", true),
        ("poddisruptionbudget", true),
        ("role", true),
        ("rolebinding", true),
        ("clusterrole", false),
        ("clusterrolebinding", false),
        ("secret", true),
        ("mutatingwebhookconfiguration", false),
    ] {
        let name = match resource {
            "service" => format!("{fullname}-metrics"),
            "role" | "rolebinding" => format!("{fullname}-leader-election"),
            "secret" => format!("{fullname}-webhook-tls"),
            _ => fullname.clone(),
        };
        let mut args = vec!["get", resource, name.as_str(), "-o", "name"];
        if namespaced {
            args.extend_from_slice(&["-n", &ns]);
        }
        kubectl_ok(cluster, &args).await;
    }
    kubectl_ok(cluster, &["get", "loadbalancerclass", &ns]).await;
    let role: Value = serde_json::from_str(
        &kubectl_ok(cluster, &["get", "clusterrole", &fullname, "-o", "json"]).await,
    )
    .expect("clusterrole JSON");
    assert_eq!(role["rules"], expected_cluster_rules());
    let lease_role: Value = serde_json::from_str(
        &kubectl_ok(
            cluster,
            &[
                "get",
                "role",
                "-n",
                &ns,
                &format!("{fullname}-leader-election"),
                "-o",
                "json",
            ],
        )
        .await,
    )
    .expect("role JSON");
    assert_eq!(
        lease_role["rules"],
        json!([{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "patch"]}])
    );

    // Every option at once (the ServiceMonitor needs prometheus-operator's CRD, not here).
    let everything = chart_dir().join("ci/everything-values.yaml");
    let out = render_release(
        &format!("{ns}-all"),
        &ns,
        &version,
        &[
            "-f",
            everything.to_str().expect("path"),
            "--set",
            "metrics.serviceMonitor.enabled=false",
            "--set",
            &format!("defaultClass.name={ns}-all"),
            "--set",
            "defaultClass.default=false",
        ],
    )
    .await;
    let dry = apply(
        cluster,
        &format!("{ns}-all"),
        &objects(&out),
        &["--dry-run=server"],
    )
    .await;
    assert!(dry.contains("(server dry run)"), "{dry}");
}

// ------------------------------------------------------------------ RBAC proven

/// One test's world with the chart's RBAC applied: a [`support::env::Env`] whose operator acts
/// as the chart's ServiceAccount and nothing else, and that account's name. `edit` may change
/// the rendered RBAC objects before they are applied.
async fn start_with_chart_rbac(prefix: &str, edit: impl FnOnce(&mut Vec<Value>)) -> (Env, String) {
    let cluster = TestCluster::shared().await;
    let admin = cluster.client();
    install_chart_crd(cluster).await;
    let ns = cluster.create_namespace(prefix).await;
    let version = server_version(&admin).await;
    let out = render_release(&ns, &ns, &version, &["--set", &format!("clusterName={ns}")]).await;
    let mut rbac: Vec<Value> = objects(&out)
        .into_iter()
        .filter(|o| {
            matches!(
                kind(o),
                "ServiceAccount" | "ClusterRole" | "ClusterRoleBinding" | "Role" | "RoleBinding"
            )
        })
        .collect();
    assert_eq!(rbac.len(), 5, "SA, ClusterRole(+Binding), Role(+Binding)");
    edit(&mut rbac);
    apply(cluster, &format!("{ns}-rbac"), &rbac, &[]).await;
    let sa = rbac
        .iter()
        .find(|o| kind(o) == "ServiceAccount")
        .and_then(|o| o["metadata"]["name"].as_str())
        .expect("the chart's ServiceAccount")
        .to_string();
    let operator_client = cluster.service_account_client(&ns, &sa).await;
    let setup = Setup {
        operator_client: Some(operator_client),
        ..Setup::default()
    };
    (Env::start_in(cluster, ns, setup).await, sa)
}

/// (type, reason, note) of the Events in the namespace.
async fn events(env: &Env) -> Vec<(String, String, String)> {
    helpers::events(&env.client, &env.ns)
        .await
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_suffices_for_the_aws_lifecycle() {
    let _guard = TestGuard::new();
    let (env, sa) = start_with_chart_rbac("chart-rbac", |_| {}).await;
    let sa_user = format!("system:serviceaccount:{}:{sa}", env.ns);

    // What the Deployment does by default (all namespaces) is allowed too.
    Api::<Service>::all(env.operator_client.clone())
        .list(&ListParams::default().limit(1))
        .await
        .unwrap_or_else(|e| panic!("{sa_user} cannot list Services cluster-wide: {e}"));

    // Create: finalizer, NLB, status.
    let hostname = env.serve_web("web").await;
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), 1);
    assert_eq!(lbs[0].dns_name(), Some(hostname.as_str()));
    let lb_arn = lbs[0].load_balancer_arn().expect("arn").to_string();
    let svc = env.services().get("web").await.expect("get web");
    assert!(
        svc.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&controller::FINALIZER.to_string())
    );
    // The class status (loadbalancerclasses/status) and Events (events.k8s.io) were written.
    let classes: Api<LoadBalancerClass> = Api::all(env.client.clone());
    wait_for("class status serviceCount 1", || async {
        (classes.get(&env.ns).await.ok()?.status?.service_count == 1).then_some(())
    })
    .await;
    env.wait_events("EnsuredLoadBalancer").await;

    // Update: a third port → a third listener.
    env.patch_service("web", json!({"spec": {"ports": web_and_dns_ports()}}))
        .await;
    env.wait_listeners(&lb_arn, 3).await;

    // Node change: a new Node with an instance is registered in every target group.
    let extra = env.new_instance().await;
    env.add_node(&extra, 9).await;
    let tg_arns = describe::target_group_arns(&env.target_groups().await);
    assert_eq!(tg_arns.len(), 3);
    for arn in &tg_arns {
        wait_for("new node registered", || async {
            env.targets(arn).await.contains(&extra.id).then_some(())
        })
        .await;
    }

    // Delete: everything goes, then the finalizer, then the Service.
    helpers::delete_service(&env.services(), "web").await;
    assert!(env.load_balancers().await.is_empty(), "load balancers left");
    assert!(env.target_groups().await.is_empty(), "target groups left");
    assert!(
        env.our_security_groups().await.is_empty(),
        "security groups left"
    );
    // No call was refused. (Other transient Warnings, such as a 409 Conflict retried at once,
    // are not about RBAC.)
    let refused: Vec<_> = events(&env)
        .await
        .into_iter()
        .filter(|(t, _, note)| t == "Warning" && note.contains("forbidden"))
        .collect();
    assert!(
        refused.is_empty(),
        "refused with the chart's RBAC: {refused:?}"
    );

    // Leader election with the chart's Role: acquire and release the Lease as the operator does.
    let manager =
        kube_lease_manager::LeaseManagerBuilder::new(env.operator_client.clone(), "cloudlb-leader")
            .with_namespace(env.ns.clone())
            .with_identity("chart-test")
            .with_duration(5)
            .with_grace(2)
            .build()
            .await
            .unwrap_or_else(|e| panic!("{sa_user} cannot set up the Lease: {e}"));
    let (mut leading, task) = manager.watch().await;
    tokio::time::timeout(Duration::from_secs(20), leading.wait_for(|l| *l))
        .await
        .unwrap_or_else(|_| panic!("{sa_user} never acquired the Lease"))
        .expect("lease channel");
    drop(leading);
    let manager = task
        .await
        .expect("lease task")
        .unwrap_or_else(|e| panic!("lease task failed: {e}"));
    manager
        .release()
        .await
        .unwrap_or_else(|e| panic!("{sa_user} cannot release the Lease: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_services_status_permission_is_reported() {
    let _guard = TestGuard::new();
    let (env, sa) = start_with_chart_rbac("chart-norbac", |objs| {
        let role = objs
            .iter_mut()
            .find(|o| kind(o) == "ClusterRole")
            .expect("ClusterRole");
        let rules = role["rules"].as_array_mut().expect("rules");
        let before = rules.len();
        rules.retain(|r| r["resources"] != json!(["services/status"]));
        assert_eq!(rules.len(), before - 1, "removed the services/status rule");
    })
    .await;

    env.create_service("web", json!({}), web_ports()).await;
    let note = env.wait_events("SyncLoadBalancerFailed").await.remove(0);
    eprintln!("SyncLoadBalancerFailed: {note}");
    assert!(
        note.contains("cannot patch resource \"services/status\""),
        "the Event must name the verb and the resource: {note}"
    );
    assert!(
        note.contains(&format!("system:serviceaccount:{}:{sa}", env.ns)),
        "and who was refused: {note}"
    );
    assert_eq!(env.hostname("web").await, None, "no status was written");
    let (type_, _, _) = events(&env)
        .await
        .into_iter()
        .find(|(_, r, _)| r == "SyncLoadBalancerFailed")
        .expect("event");
    assert_eq!(type_, "Warning");

    // Deleting still works: the status was never written, so cleanup needs no status patch.
    helpers::delete_service(&env.services(), "web").await;
    assert!(env.load_balancers().await.is_empty(), "load balancers left");
}

// ------------------------------------------------------------------ docs/install.md IAM policy

/// Every AWS operation the provider calls: the names given to its call helpers
/// (`calls.run("CreateLoadBalancer", …)`, `calls.pages("DescribeListeners", …)`) in
/// crates/cloudlb-aws/src.
fn aws_operations_called() -> std::collections::BTreeSet<String> {
    let mut ops = std::collections::BTreeSet::new();
    let dir = root().join("crates/cloudlb-aws/src");
    for entry in std::fs::read_dir(&dir).expect("crates/cloudlb-aws/src") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read source");
        let calls = text
            .match_indices(".run(")
            .chain(text.match_indices(".pages("));
        for (i, call) in calls {
            let rest = text[i + call.len()..].trim_start();
            if let Some(name) = rest
                .strip_prefix('"')
                .and_then(|r| r.split('"').next())
                .filter(|n| n.chars().all(|c| c.is_ascii_alphanumeric()))
            {
                ops.insert(name.to_string());
            }
        }
    }
    ops
}

#[test]
fn install_docs_iam_policy_names_exactly_the_aws_calls() {
    let doc = std::fs::read_to_string(root().join("docs/install.md")).expect("docs/install.md");
    let start = doc.find("```json").expect("an IAM policy JSON block") + "```json".len();
    let end = start + doc[start..].find("```").expect("end of the JSON block");
    let policy: Value = serde_json::from_str(&doc[start..end]).expect("the IAM policy is JSON");
    let mut allowed = std::collections::BTreeSet::new();
    for statement in policy["Statement"].as_array().expect("statements") {
        assert_eq!(statement["Effect"], "Allow");
        match &statement["Action"] {
            Value::String(a) => {
                allowed.insert(a.clone());
            }
            Value::Array(list) => {
                allowed.extend(list.iter().filter_map(Value::as_str).map(String::from));
            }
            other => panic!("unexpected Action {other}"),
        }
    }
    let called = aws_operations_called();
    assert!(called.len() >= 20, "found the provider's calls: {called:?}");
    let operation = |action: &String| action.split(':').nth(1).unwrap_or_default().to_string();
    let missing: Vec<&String> = called
        .iter()
        .filter(|op| !allowed.iter().any(|a| &operation(a) == *op))
        .collect();
    assert!(
        missing.is_empty(),
        "the IAM policy in docs/install.md lacks {missing:?}"
    );
    let extra: Vec<&String> = allowed
        .iter()
        .filter(|a| !called.contains(&operation(a)))
        .collect();
    assert!(
        extra.is_empty(),
        "the IAM policy allows calls cloudlb never makes: {extra:?}"
    );
}
