//! The mutating admission webhook, called by the real API server: a `MutatingWebhookConfiguration`
//! with a `url` on loopback and the CA bundle, limited to this test's namespace, and the
//! webhook served in-process from the operator's code.

use crate::support;

use cloudlb::webhook::{self, WebhookSettings};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use std::time::Instant;
use support::env::wait_for;
use support::fixtures;
use support::{TestCluster, TestGuard};

/// A MutatingWebhookConfiguration `name` with one webhook: `entry` (its name, rules and
/// selectors) calling `path` on loopback `port` (its certificate signed by `ca`), with the
/// chart's failure policy and timeouts.
pub fn loopback_configuration(
    name: &str,
    port: u16,
    ca: &[u8],
    path: &str,
    mut entry: Value,
) -> MutatingWebhookConfiguration {
    entry["clientConfig"] = json!({
        "url": format!("https://127.0.0.1:{port}{path}"),
        "caBundle": k8s_openapi::ByteString(ca.to_vec()),
    });
    entry["failurePolicy"] = json!("Ignore");
    entry["sideEffects"] = json!("None");
    entry["admissionReviewVersions"] = json!(["v1"]);
    entry["timeoutSeconds"] = json!(5);
    serde_json::from_value(json!({"metadata": {"name": name}, "webhooks": [entry]}))
        .expect("MutatingWebhookConfiguration")
}

/// The configuration the chart installs, pointed at `port` on loopback and limited to `ns`.
fn configuration(name: &str, ns: &str, port: u16, ca: &[u8]) -> MutatingWebhookConfiguration {
    let entry = json!({
        "name": "mservice.cloudlb.io",
        "rules": [{
            "operations": ["CREATE", "UPDATE"],
            "apiGroups": [""], "apiVersions": ["v1"], "resources": ["services"],
            "scope": "Namespaced"
        }],
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}},
        "objectSelector": {"matchExpressions": [
            {"key": "cloudlb.io/webhook", "operator": "NotIn", "values": ["disabled"]}
        ]}
    });
    loopback_configuration(name, port, ca, webhook::PATH, entry)
}

fn service(name: &str, labels: Value, spec: Value) -> Service {
    let mut spec = spec;
    spec["ports"] = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": spec}))
        .expect("service")
}

/// Creates the Service and returns it as the API server stored it (after the webhooks).
async fn create(api: &Api<Service>, svc: &Service) -> Service {
    api.create(&PostParams::default(), svc)
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", svc.metadata.name))
}

fn class_of(svc: &Service) -> Option<String> {
    svc.spec.as_ref()?.load_balancer_class.clone()
}

/// The shared cluster's admin client (the CRD installed) and a new namespace.
async fn setup(prefix: &str) -> (Client, String) {
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    fixtures::install_crd(&client).await;
    (client, cluster.create_namespace(prefix).await)
}

/// A webhook served in-process for the class `class` (and its CA), and its configuration `name`
/// in the API server, limited to `ns`.
async fn start_webhook(
    client: &Client,
    name: &str,
    ns: &str,
    class: &str,
) -> tokio::task::JoinHandle<()> {
    let dir = std::env::temp_dir().join(format!("cloudlb-webhook-{name}"));
    let (cert, key) = support::tls::self_signed_for_ip(&dir, "127.0.0.1");
    let ca = std::fs::read(&cert).expect("read cert");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let settings = WebhookSettings {
        cert_file: cert,
        key_file: key,
        classes: Some(vec![class.to_string()]),
        installation: cloudlb::controller::DEFAULT_INSTALLATION.to_string(),
    };
    let hook = webhook::Webhook::new(settings).expect("the webhook's certificate");
    let served = tokio::spawn(hook.run(client.clone(), listener));
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &configuration(name, ns, port, &ca))
        .await
        .expect("create the MutatingWebhookConfiguration");
    served
}

async fn delete_configuration(client: &Client, name: &str) {
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete the MutatingWebhookConfiguration");
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("cloudlb-webhook-{name}")));
}

/// Creates class-less load balancers until one comes back with `want` (the API server and the
/// webhook take moments to pick up their configuration and classes).
async fn wait_for_class(api: &Api<Service>, prefix: &str, want: &str) {
    wait_for_probe(api, prefix, Some(want)).await;
}

/// Creates class-less load balancers `<prefix>-<n>` until one comes back with class `want`
/// (`None`: without a class).
async fn wait_for_probe(api: &Api<Service>, prefix: &str, want: Option<&str>) {
    let mut probes = 0;
    let what = format!("a Service created with class {want:?}");
    wait_for(&what, || {
        probes += 1;
        let lb = json!({"type": "LoadBalancer"});
        let (api, svc) = (
            api.clone(),
            service(&format!("{prefix}-{probes}"), json!({}), lb),
        );
        async move { (class_of(&create(&api, &svc).await).as_deref() == want).then_some(()) }
    })
    .await;
}

/// A namespace with its default class, and our webhook for it, serving (picked up by the API
/// server).
struct Served {
    client: Client,
    ns: String,
    config: String,
    task: tokio::task::JoinHandle<()>,
    api: Api<Service>,
}

async fn serve_default_class(prefix: &str) -> Served {
    let (client, ns) = setup(prefix).await;
    fixtures::create_class(&client, &ns, fixtures::aws_class_spec(&ns)).await;
    let config = format!("cloudlb-test-{ns}");
    let task = start_webhook(&client, &config, &ns, &ns).await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    wait_for_class(&api, "probe", &format!("cloudlb.io/{ns}")).await;
    Served {
        client,
        ns,
        config,
        task,
        api,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_calls_the_webhook_and_a_stopped_webhook_blocks_nothing() {
    let _guard = TestGuard::new();
    let Served {
        client,
        ns,
        config: config_name,
        task: served,
        api,
    } = serve_default_class("webhook").await;
    let want = Some(format!("cloudlb.io/{ns}"));
    let lb = json!({"type": "LoadBalancer"});

    // A class-less Service of type LoadBalancer: our default class.
    let web = create(&api, &service("web", json!({}), lb.clone())).await;
    assert_eq!(class_of(&web), want);
    // Another controller's class is never changed.
    let theirs = json!({"type": "LoadBalancer", "loadBalancerClass": "service.k8s.aws/nlb"});
    let theirs = create(&api, &service("theirs", json!({}), theirs)).await;
    assert_eq!(class_of(&theirs).as_deref(), Some("service.k8s.aws/nlb"));
    // The opt-out label: left alone.
    let opted_out = service(
        "optout",
        json!({"cloudlb.io/webhook": "disabled"}),
        lb.clone(),
    );
    assert_eq!(class_of(&create(&api, &opted_out).await), None);
    // Not a load balancer: nothing; turned into one by an update: our class.
    let node_port = create(&api, &service("np", json!({}), json!({"type": "NodePort"}))).await;
    assert_eq!(class_of(&node_port), None);
    let patched = api
        .patch(
            "np",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"type": "LoadBalancer"}})),
        )
        .await
        .expect("NodePort → LoadBalancer");
    assert_eq!(class_of(&patched), want);

    // The webhook stops (the operator is down): with failurePolicy Ignore, Services are still
    // created, class-less, for the adoption rules to judge.
    served.abort();
    let _ = served.await;
    let started = Instant::now();
    let after = create(&api, &service("after", json!({}), lb)).await;
    eprintln!(
        "Service created with the webhook down in {:?}",
        started.elapsed()
    );
    assert_eq!(class_of(&after), None);

    delete_configuration(&client, &config_name).await;
}

/// Another controller's webhook that sets its own class (aws-load-balancer-controller's
/// `aws-load-balancer-webhook` does so for class-less Services) wins when its configuration's
/// name sorts first: the API server calls mutating webhooks in the order of their
/// configurations' names, and ours never changes a class that is set. Stood in for by a second
/// instance of our webhook, for another class, under a name that sorts before ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_whose_configuration_sorts_first_sets_the_class() {
    let _guard = TestGuard::new();
    let (client, ns) = setup("whorder").await;
    let first_class = format!("{ns}-first");
    for class in [&ns, &first_class] {
        fixtures::create_class(&client, class, fixtures::aws_class_spec(&ns)).await;
    }
    let (ours, theirs) = (
        format!("cloudlb-test-{ns}"),
        format!("aws-load-balancer-webhook-{ns}"),
    );
    let ours_served = start_webhook(&client, &ours, &ns, &ns).await;
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    wait_for_class(&api, "ours", &format!("cloudlb.io/{ns}")).await;
    let theirs_served = start_webhook(&client, &theirs, &ns, &first_class).await;
    let want = format!("cloudlb.io/{first_class}");
    wait_for_class(&api, "theirs", &want).await;
    // From then on, every time.
    for i in 0..5 {
        let svc = create(
            &api,
            &service(
                &format!("web-{i}"),
                json!({}),
                json!({"type": "LoadBalancer"}),
            ),
        )
        .await;
        assert_eq!(class_of(&svc).as_deref(), Some(want.as_str()), "web-{i}");
    }
    for (name, served) in [(&theirs, theirs_served), (&ours, ours_served)] {
        delete_configuration(&client, name).await;
        served.abort();
    }
}

/// cert-manager renews the serving certificate (the kubelet swaps the mounted files) and the CA
/// bundle follows: the webhook serves the new certificate without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let _guard = TestGuard::new();
    let served = serve_default_class("whrenew").await;
    let (api, name) = (&served.api, &served.config);

    // A new key and certificate in the same files: the webhook serves them at once, so the API
    // server, still trusting only the old one, fails to call it (and, Ignore, creates the
    // Service unchanged).
    let dir = std::env::temp_dir().join(format!("cloudlb-webhook-{name}"));
    let (cert, _) = support::tls::self_signed_for_ip(&dir, "127.0.0.1");
    wait_for_probe(api, "renewed", None).await;
    // The CA bundle follows (cert-manager's CA injector does so).
    let configs: Api<MutatingWebhookConfiguration> = Api::all(served.client.clone());
    let mut config = configs.get(name).await.expect("get the configuration");
    for hook in config.webhooks.iter_mut().flatten() {
        let ca = std::fs::read(&cert).expect("read the new cert");
        hook.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca));
    }
    configs
        .replace(name, &PostParams::default(), &config)
        .await
        .expect("replace the configuration");
    wait_for_class(api, "after", &format!("cloudlb.io/{}", served.ns)).await;
    delete_configuration(&served.client, name).await;
    served.task.abort();
}
