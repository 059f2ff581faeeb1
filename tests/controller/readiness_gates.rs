//! Pod readiness that follows the load balancer: the real API server calls the operator's pod
//! webhook (served in-process) for pods created in a namespace labelled
//! `cloudlb.io/pod-readiness-gate-inject: enabled`; the pod gets the gate
//! `cloudlb.io/target-health.<service>`, is registered once its containers are ready (its
//! endpoint is not ready: the gate holds it), and gets the gate's condition once moto reports
//! its target healthy. A pod whose containers are not ready is neither registered nor passed.

use crate::pod_targets::{pod_ip, pod_targets};
use crate::support;

use cloudlb::controller::readiness;
use cloudlb::webhook::{self, WebhookSettings};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use std::time::Duration;
use support::env::{Env, wait_for};
use support::{TestGuard, fixtures};

/// The chart's pod entry, pointed at `port` on loopback and limited to namespace `ns` (when it
/// carries the inject label).
fn configuration(name: &str, ns: &str, port: u16, ca: &[u8]) -> MutatingWebhookConfiguration {
    let entry = json!({
        "name": "mpod-namespace.cloudlb.io",
        "rules": [{
            "operations": ["CREATE"],
            "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
            "scope": "Namespaced"
        }],
        "namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": ns,
            readiness::INJECT_LABEL: "enabled",
        }},
    });
    crate::webhook::loopback_configuration(name, port, ca, webhook::POD_PATH, entry)
}

/// Serves the webhook in-process for `env`'s class and registers it with the API server.
async fn start_webhook(env: &Env, name: &str) -> tokio::task::JoinHandle<()> {
    let dir = std::env::temp_dir().join(format!("cloudlb-webhook-{name}"));
    let (cert, key) = support::tls::self_signed_for_ip(&dir, "127.0.0.1");
    let ca = std::fs::read(&cert).expect("read cert");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hook = webhook::Webhook::new(WebhookSettings {
        cert_file: cert,
        key_file: key,
        classes: Some(vec![env.ns.clone()]),
        installation: cloudlb::controller::DEFAULT_INSTALLATION.to_string(),
    })
    .expect("the webhook's certificate");
    let served = tokio::spawn(hook.run(env.client.clone(), listener));
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .create(
            &PostParams::default(),
            &configuration(name, &env.ns, port, &ca),
        )
        .await
        .expect("create the MutatingWebhookConfiguration");
    served
}

/// Creates pod `name` of app `web` (on the test's first Node: the EndpointSlice controller skips
/// pods on no node) and writes the status a kubelet would for a gated pod:
/// Running at `ip`, containers ready as `containers_ready` says, not Ready (the gate holds it).
async fn create_pod(client: &Client, ns: &str, name: &str, ip: &str, containers_ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "web"}},
        "spec": {"nodeName": format!("{ns}-node-0"), "containers": [{"name": "app", "image": "registry.invalid/app:1",
            "ports": [{"name": "http", "containerPort": 8080}]}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
    let containers = if containers_ready { "True" } else { "False" };
    let status = json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [
            {"type": "Ready", "status": "False", "lastTransitionTime": "2024-01-01T00:00:00Z"},
            {"type": "ContainersReady", "status": containers,
                "lastTransitionTime": "2024-01-01T00:00:00Z"}
        ]
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch the status of pod {name}: {e}"));
}

async fn pod(client: &Client, ns: &str, name: &str) -> Pod {
    Api::<Pod>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("get pod {name}: {e}"))
}

fn gates(p: &Pod) -> Vec<String> {
    p.spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .map(|g| g.iter().map(|g| g.condition_type.clone()).collect())
        .unwrap_or_default()
}

fn condition(p: &Pod, kind: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gated_pod_is_registered_and_passes_its_gate_when_its_target_is_healthy() {
    let _guard = TestGuard::new();
    let env = Env::start("gates", Duration::from_secs(3600)).await;
    let config = format!("cloudlb-gates-{}", env.ns);
    let label = json!({"metadata": {"labels": {readiness::INJECT_LABEL: "enabled"}}});
    Api::<Namespace>::all(env.client.clone())
        .patch(&env.ns, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .expect("label the namespace");
    let served = start_webhook(&env, &config).await;

    let svc = fixtures::lb_service(
        "web",
        json!({"cloudlb.io/target-type": "ip"}),
        json!({
            "selector": {"app": "web"},
            "allocateLoadBalancerNodePorts": false,
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]
        }),
    );
    fixtures::create_service(&env.services(), &svc).await;
    env.wait_hostname("web").await;
    let arn = env.target_groups().await[0]
        .target_group_arn()
        .expect("arn")
        .to_string();
    let gate = readiness::condition_type("web");
    assert_eq!(gate, "cloudlb.io/target-health.web");

    // The API server takes a moment to call a new webhook: probe pods (containers not ready,
    // never registered) until one comes back gated.
    let mut probes = 0;
    wait_for("a pod created with the readiness gate", || {
        probes += 1;
        let (client, ns, gate, ip) = (
            env.client.clone(),
            env.ns.clone(),
            gate.clone(),
            pod_ip(&env, 100),
        );
        async move {
            let name = format!("probe-{probes}");
            create_pod(&client, &ns, &name, &ip, false).await;
            (gates(&pod(&client, &ns, &name).await) == [gate]).then_some(())
        }
    })
    .await;

    // Containers ready, endpoint not ready (the gate holds it): registered, then passed once
    // moto reports the target healthy.
    create_pod(&env.client, &env.ns, "web-0", &pod_ip(&env, 10), true).await;
    let want = vec![format!("{}:8080", pod_ip(&env, 10))];
    wait_for("the gated pod registered", || async {
        (pod_targets(&env, &arn).await == want).then_some(())
    })
    .await;
    wait_for("the gate's condition set", || async {
        let p = pod(&env.client, &env.ns, "web-0").await;
        (condition(&p, &gate).as_deref() == Some("True")).then_some(())
    })
    .await;
    // Still registered while the kubelet has not yet turned the pod Ready, with no call but the
    // probes' polling (their containers are not ready: no health read is needed for them); the
    // probes were never registered, and have no condition.
    let before = env.provider.calls();
    tokio::time::sleep(2 * readiness::POLL).await;
    assert_eq!(env.calls_since(&before), Default::default());
    assert_eq!(pod_targets(&env, &arn).await, want);
    let probe = pod(&env.client, &env.ns, "probe-1").await;
    assert_eq!(condition(&probe, &gate), None);

    served.abort();
    Api::<MutatingWebhookConfiguration>::all(env.client.clone())
        .delete(&config, &DeleteParams::default())
        .await
        .expect("delete the MutatingWebhookConfiguration");
}
