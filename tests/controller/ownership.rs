//! Owning exactly our Services, on the real API server with moto: class-less Services are
//! adopted only when no other controller can be acting on them, and two installations share a
//! cluster and a cloud account without touching each other's Services or load balancers.
//! (Which Service is whose, case by case, is unit-tested in cloudlb-core's `ownership`.)

use crate::helpers;
use crate::support;

use cloudlb::controller::{INSTALLATION_ANNOTATION, PROVIDER_ANNOTATION, Providers};
use cloudlb::provider::aws::{AwsProvider, AwsSettings};
use cloudlb::telemetry::Metrics;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use support::env::{Env, Setup, operator_settings, spawn_operator, wait_for};
use support::faultproxy::{FaultConfig, FaultProxy, ProxyConfig};
use support::fixtures;
use support::{AwsEmulator, TestGuard};

const LB_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-type";
const CLOUD_FINALIZER: &str = "service.kubernetes.io/load-balancer-cleanup";

fn ports() -> Value {
    json!([{"name": "http", "port": 80, "protocol": "TCP"}])
}

/// A Service of type LoadBalancer with `metadata` (its name, annotations, finalizers) and
/// `spec` fields besides the ports.
async fn create(env: &Env, metadata: Value, mut spec: Value) {
    spec["type"] = json!("LoadBalancer");
    spec["ports"] = ports();
    let svc: Service =
        serde_json::from_value(json!({"metadata": metadata, "spec": spec})).expect("service");
    env.services()
        .create(&PostParams::default(), &svc)
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", svc.metadata.name));
}

async fn get(env: &Env, name: &str) -> Service {
    env.services().get(name).await.expect("get service")
}

/// The notes of the `NotAdopted` Events about Service `name`.
async fn not_adopted(env: &Env, name: &str) -> Vec<String> {
    helpers::events(&env.client, &env.ns)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("NotAdopted"))
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.note)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classless_service_is_adopted_only_when_no_other_controller_acts_on_it() {
    let _guard = TestGuard::new();
    let mut env = Env::start_with("adopt", Setup::without_operator()).await;
    // The class as the chart ships it: default, without adopting every class-less Service.
    let classes = Api::<cloudlb::config::class::LoadBalancerClass>::all(env.client.clone());
    let off = json!({"spec": {"adoptAllClasslessServices": false}});
    classes
        .patch(&env.ns, &PatchParams::default(), &Patch::Merge(&off))
        .await
        .expect("patch class");
    env.start_operator();
    let before = env.provider.calls();

    // Nothing says the cloud's controller leaves it alone: one Warning, nothing written.
    create(&env, json!({"name": "plain"}), json!({})).await;
    // The cloud's controller has it (its finalizer), even though it says `external`.
    create(
        &env,
        json!({"name": "claimed", "annotations": {LB_TYPE: "external"}, "finalizers": [CLOUD_FINALIZER]}),
        json!({}),
    )
    .await;
    // Another controller has written its address (before the Service says `external`, so
    // that it is never adoptable in between).
    create(&env, json!({"name": "addressed"}), json!({})).await;
    let foreign = json!({"status": {"loadBalancer": {"ingress": [{"hostname": "theirs.elb.amazonaws.com"}]}}});
    env.services()
        .patch_status(
            "addressed",
            &PatchParams::default(),
            &Patch::Merge(&foreign),
        )
        .await
        .expect("status of addressed");
    env.patch_service(
        "addressed",
        json!({"metadata": {"annotations": {LB_TYPE: "external"}}}),
    )
    .await;
    // Another controller's class: never touched, never told.
    create(
        &env,
        json!({"name": "theirs"}),
        json!({"loadBalancerClass": "service.k8s.aws/nlb"}),
    )
    .await;

    // Each is told why, once, with the fix.
    let told = |name: &'static str, why: String| {
        let env = &env;
        async move {
            let notes = wait_for(&format!("a NotAdopted Event about {name}"), || async {
                let notes = not_adopted(env, name).await;
                notes.iter().any(|n| n.contains(&why)).then_some(notes)
            })
            .await;
            for n in &notes {
                assert!(
                    n.contains(&format!("spec.loadBalancerClass: cloudlb.io/{}", env.ns)),
                    "{n}"
                );
            }
            notes.len()
        }
    };
    assert_eq!(
        told("plain", "has no spec.loadBalancerClass".into()).await,
        1
    );
    assert_eq!(
        told("claimed", format!("finalizer {CLOUD_FINALIZER}")).await,
        1
    );
    // (Once more if its reconcile came before its annotation: "no spec.loadBalancerClass".)
    assert!(told("addressed", "theirs.elb.amazonaws.com".into()).await <= 2);
    assert!(
        not_adopted(&env, "theirs").await.is_empty(),
        "another class's Service was told"
    );
    for name in ["plain", "claimed", "addressed", "theirs"] {
        let svc = get(&env, name).await;
        assert!(
            !svc.finalizers()
                .iter()
                .any(|f| f == cloudlb::controller::FINALIZER),
            "{name} got our finalizer"
        );
        assert!(
            !svc.annotations().contains_key(INSTALLATION_ANNOTATION),
            "{name} recorded"
        );
    }
    let status = get(&env, "addressed")
        .await
        .status
        .and_then(|s| s.load_balancer);
    assert_eq!(
        status
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.first()?.hostname.clone())
            .as_deref(),
        Some("theirs.elb.amazonaws.com"),
        "another controller's address is never overwritten"
    );
    assert!(
        env.calls_since(&before).is_empty(),
        "AWS calls for Services not ours: {:?}",
        env.calls_since(&before)
    );
    assert!(env.load_balancers().await.is_empty());

    // Annotated so, it is adopted: finalizer and record before the load balancer.
    env.patch_service(
        "plain",
        json!({"metadata": {"annotations": {LB_TYPE: "external"}}}),
    )
    .await;
    let hostname = env.wait_hostname("plain").await;
    let svc = get(&env, "plain").await;
    assert!(
        svc.finalizers()
            .iter()
            .any(|f| f == cloudlb::controller::FINALIZER)
    );
    assert_eq!(
        svc.annotations()
            .get(INSTALLATION_ANNOTATION)
            .map(String::as_str),
        Some("cloudlb")
    );
    assert_eq!(
        svc.annotations()
            .get(PROVIDER_ANNOTATION)
            .map(String::as_str),
        Some("aws")
    );
    let lbs = env.load_balancers().await;
    assert_eq!(lbs.len(), 1, "one load balancer, for plain only");
    assert_eq!(lbs[0].dns_name(), Some(hostname.as_str()));
    // Told once: the reconciles of the edit told nothing new.
    assert_eq!(not_adopted(&env, "plain").await.len(), 1);

    // Deleted: the load balancer goes, and so do the finalizer and the record.
    helpers::delete_service(&env.services(), "plain").await;
    assert!(env.load_balancers().await.is_empty());
    // The test's stand-in for the cloud's controller lets go of its Service.
    env.patch_service("claimed", json!({"metadata": {"finalizers": null}}))
        .await;
}

/// The DNS names of the load balancers in `env`'s account.
async fn dns_names(env: &Env) -> Vec<String> {
    let lbs = env.load_balancers().await;
    lbs.iter()
        .filter_map(|lb| lb.dns_name().map(String::from))
        .collect()
}

/// An operator in-process: installation `installation` serving `classes` in `env`'s namespace
/// and moto account, sweeping orphans every 300 ms.
fn spawn_installation(
    env: &Env,
    installation: &str,
    classes: &[&str],
    metrics: &Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    let mut settings = operator_settings(&env.ns);
    settings.installation = installation.to_string();
    settings.classes = Some(classes.iter().map(|c| c.to_string()).collect());
    settings.provisioning_requeue = Duration::from_millis(500);
    settings.orphan_sweep = Duration::from_millis(300);
    let provider = AwsProvider::new(
        env.elbv2.clone(),
        env.ec2.clone(),
        AwsSettings::new(env.ns.clone()),
    );
    let providers = Providers {
        aws: Some(Arc::new(provider)),
        local: None,
    };
    spawn_operator(env.client.clone(), settings, providers, metrics.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_installations_share_a_cluster_and_an_account_without_touching_each_other() {
    let _guard = TestGuard::new();
    let env = Env::start_with("twoinst", Setup::without_operator()).await;
    let (class_a, class_b) = (env.ns.clone(), format!("{}-b", env.ns));
    let mut spec_b = fixtures::aws_class_spec(&env.ns);
    spec_b["default"] = json!(false);
    fixtures::create_class(&env.client, &class_b, spec_b).await;
    let (metrics_a, metrics_b) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let a = spawn_installation(&env, "team-a", &[&class_a], &metrics_a);
    let b = spawn_installation(&env, "team-b", &[&class_b], &metrics_b);

    create(
        &env,
        json!({"name": "a"}),
        json!({"loadBalancerClass": format!("cloudlb.io/{class_a}")}),
    )
    .await;
    create(
        &env,
        json!({"name": "b"}),
        json!({"loadBalancerClass": format!("cloudlb.io/{class_b}")}),
    )
    .await;
    let (host_a, host_b) = (env.wait_hostname("a").await, env.wait_hostname("b").await);
    for (name, installation) in [("a", "team-a"), ("b", "team-b")] {
        let svc = get(&env, name).await;
        assert_eq!(
            svc.annotations()
                .get(INSTALLATION_ANNOTATION)
                .map(String::as_str),
            Some(installation)
        );
    }
    assert_eq!(env.load_balancers().await.len(), 2);

    // An edit of b's Service: installation b changes b's load balancer, and only that.
    let arn_of = |host: String| {
        let env = &env;
        async move {
            let lbs = env.load_balancers().await;
            let lb = lbs.iter().find(|lb| lb.dns_name() == Some(host.as_str()));
            lb.and_then(|lb| lb.load_balancer_arn().map(String::from))
                .expect("its load balancer")
        }
    };
    let (arn_a, arn_b) = (arn_of(host_a.clone()).await, arn_of(host_b.clone()).await);
    let two_ports = json!([
        {"name": "http", "port": 80, "protocol": "TCP"},
        {"name": "dns", "port": 53, "protocol": "UDP"}
    ]);
    env.patch_service("b", json!({"spec": {"ports": two_ports}}))
        .await;
    env.wait_listeners(&arn_b, 2).await;
    assert_eq!(
        env.listeners(&arn_a).await.len(),
        1,
        "a's load balancer was changed"
    );

    // Installation a's class goes: its Service keeps its load balancer (told so), and b's is
    // untouched, through several orphan sweeps of both installations.
    let classes = Api::<cloudlb::config::class::LoadBalancerClass>::all(env.client.clone());
    classes
        .delete(&class_a, &DeleteParams::default())
        .await
        .expect("delete class a");
    let note = wait_for("a LoadBalancerClassNotServed Event", || async {
        env.events("LoadBalancerClassNotServed")
            .await
            .into_iter()
            .next()
    })
    .await;
    assert!(
        note.contains(&format!(
            "LoadBalancerClass {class_a} is not served by cloudlb installation team-a"
        )),
        "{note}"
    );
    let (sweeps_a, sweeps_b) = (
        metrics_a.orphan_sweep_count(),
        metrics_b.orphan_sweep_count(),
    );
    wait_for("two more orphan sweeps in each installation", || async {
        (metrics_a.orphan_sweep_count() >= sweeps_a + 2
            && metrics_b.orphan_sweep_count() >= sweeps_b + 2)
            .then_some(())
    })
    .await;
    let dns = dns_names(&env).await;
    assert_eq!(dns.len(), 2, "both load balancers kept: {dns:?}");
    assert!(dns.contains(&host_a) && dns.contains(&host_b), "{dns:?}");
    assert_eq!(env.hostname("a").await.as_deref(), Some(host_a.as_str()));

    // b's Service goes: installation b deletes its load balancer, and only that.
    helpers::delete_service(&env.services(), "b").await;
    let dns = dns_names(&env).await;
    assert_eq!(dns, [host_a]);

    // a's Service goes too: installation a still releases it (its provider of record).
    helpers::delete_service(&env.services(), "a").await;
    assert!(env.load_balancers().await.is_empty());
    a.abort();
    b.abort();
}

/// An Env in its own moto account (returned too) without an operator, and a fault proxy in
/// front of that account that answers creates of existing names as AWS does.
async fn behind_idempotent_creates(prefix: &str) -> (Env, FaultProxy, String) {
    let moto = AwsEmulator::shared().await;
    let account = moto.new_account();
    let setup = Setup {
        account: Some(account.clone()),
        ..Setup::without_operator()
    };
    let env = Env::start_with(prefix, setup).await;
    let mut proxy_config = ProxyConfig::new(moto.endpoint());
    proxy_config.account_id = Some(account.clone());
    proxy_config.faults = FaultConfig {
        existing_on_create: true,
        ..FaultConfig::none()
    };
    let proxy = FaultProxy::start(proxy_config).await.expect("fault proxy");
    (env, proxy, account)
}

/// Starts the operator of `env` with its AWS calls through `proxy` (to `account`). Our clock
/// and moto's are one: anything created before a request is not that request's.
fn spawn_through(env: &Env, proxy: &FaultProxy, account: &str) -> tokio::task::JoinHandle<()> {
    let sdk = support::aws_sdk_config(&proxy.endpoint(), account);
    let mut settings = AwsSettings::new(env.ns.clone());
    settings.created_skew = Duration::ZERO;
    let provider = AwsProvider::new(
        support::elbv2::Client::new(&sdk),
        support::ec2::Client::new(&sdk),
        settings,
    );
    let providers = Providers {
        aws: Some(Arc::new(provider)),
        local: None,
    };
    let metrics = Arc::new(Metrics::new());
    spawn_operator(
        env.client.clone(),
        operator_settings(&env.ns),
        providers,
        metrics,
    )
}

/// The desired model cloudlb builds for Service `name` of `env` (its class, the Nodes).
async fn desired(env: &Env, name: &str) -> cloudlb::model::Desired {
    let svc = get(env, name).await;
    let class = Api::<cloudlb::config::class::LoadBalancerClass>::all(env.client.clone())
        .get(&env.ns)
        .await
        .expect("the class");
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(env.client.clone())
        .list(&Default::default())
        .await
        .expect("nodes")
        .items;
    let cfg = cloudlb::config::resolve(&class, &svc).expect("config");
    cloudlb::build::build(&env.ns, &svc, cloudlb::build::Backends::nodes(&nodes), &cfg)
        .expect("build")
        .desired
}

/// Waits for the SyncLoadBalancerFailed Event that names `name` as not ours.
async fn refused(env: &Env, name: &str) -> String {
    let note = wait_for(
        &format!("a SyncLoadBalancerFailed Event naming {name}"),
        || async {
            env.events("SyncLoadBalancerFailed")
                .await
                .into_iter()
                .find(|n| n.contains(name))
        },
    )
    .await;
    assert!(note.contains("does not carry our ownership tags"), "{note}");
    note
}

/// How often the proxy answered `action` with an existing resource.
fn answered_with_existing(proxy: &FaultProxy, action: &str) -> Option<u64> {
    let counts = proxy.counts();
    counts
        .by_action
        .get(action)
        .and_then(|o| o.get("replayed"))
        .copied()
}

/// AWS answers a CreateLoadBalancer for a name that exists with the existing load balancer (the
/// fault proxy does as AWS): one without our tags is never used, even on the first reconcile of a
/// new Service, the one that reads nothing before creating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_with_a_foreign_load_balancer_is_refused_with_an_event() {
    let _guard = TestGuard::new();
    let (env, proxy, account) = behind_idempotent_creates("foreignlb").await;
    create(&env, json!({"name": "web"}), json!({})).await;
    let name = desired(&env, "web").await.lb_name;
    // Someone else's load balancer of the very name cloudlb derives for the Service.
    let subnets = env
        .network
        .public_subnets
        .iter()
        .map(|s| s.id.clone())
        .collect();
    let theirs = helpers::create_nlb(&env.elbv2, &name, subnets).await;
    let theirs_arn = theirs.load_balancer_arn().expect("arn").to_string();
    let operator = spawn_through(&env, &proxy, &account);

    refused(&env, &name).await;
    // The create was answered with their load balancer, and it was checked, not used.
    assert_eq!(
        answered_with_existing(&proxy, "CreateLoadBalancer"),
        Some(1)
    );
    assert!(proxy.counts().by_action.contains_key("DescribeTags"));
    assert!(
        env.listeners(&theirs_arn).await.is_empty(),
        "a listener was attached to theirs"
    );
    assert_eq!(
        env.load_balancers().await.len(),
        1,
        "no second load balancer"
    );
    assert_eq!(
        env.hostname("web").await,
        None,
        "their address was written to the status"
    );
    operator.abort();
}

/// The same for a target group: AWS's answer to CreateTargetGroup has no creation time, so every
/// target group a run creates is checked (one DescribeTags) before anything uses or changes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_with_a_foreign_target_group_is_refused_with_an_event() {
    let _guard = TestGuard::new();
    let (env, proxy, account) = behind_idempotent_creates("foreigntg").await;
    create(&env, json!({"name": "web"}), json!({})).await;
    let want = desired(&env, "web").await;
    let tg = &want.lb.as_ref().expect("a load balancer").target_groups[0];
    let port = i32::from(tg.port);
    let theirs_arn =
        helpers::create_target_group(&env.elbv2, &tg.name, port, &env.network.vpc_id).await;
    let operator = spawn_through(&env, &proxy, &account);

    refused(&env, &tg.name).await;
    assert_eq!(answered_with_existing(&proxy, "CreateTargetGroup"), Some(1));
    assert!(
        env.targets(&theirs_arn).await.is_empty(),
        "targets registered in theirs"
    );
    for lb in env.load_balancers().await {
        for listener in env.listeners(lb.load_balancer_arn().expect("arn")).await {
            let forwards = format!("{:?}", listener.default_actions());
            assert!(
                !forwards.contains(&theirs_arn),
                "a listener forwards to theirs: {forwards}"
            );
        }
    }
    operator.abort();
}

/// The AWS default scheme is `internal` now; a Service an earlier version made (our finalizer,
/// no installation recorded) keeps `internet-facing`, pinned on its first reconcile, so an
/// upgrade replaces no load balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_an_earlier_version_made_keeps_its_public_scheme() {
    let _guard = TestGuard::new();
    let mut env = Env::start_with("legacy", Setup::without_operator()).await;
    // What the earlier version wrote before its first cloud call.
    let earlier = json!({"name": "old", "finalizers": [cloudlb::controller::FINALIZER], "annotations": {PROVIDER_ANNOTATION: "aws"}});
    create(&env, earlier, json!({})).await;
    env.start_operator();
    create(&env, json!({"name": "new"}), json!({})).await;
    let (old, new) = (
        env.wait_hostname("old").await,
        env.wait_hostname("new").await,
    );
    let scheme_of = |dns: &str| {
        let dns = dns.to_string();
        let env = &env;
        async move {
            let lbs = env.load_balancers().await;
            let lb = lbs
                .iter()
                .find(|lb| lb.dns_name() == Some(dns.as_str()))
                .cloned();
            lb.and_then(|lb| lb.scheme().map(|s| s.as_str().to_string()))
        }
    };
    assert_eq!(scheme_of(&old).await.as_deref(), Some("internet-facing"));
    assert_eq!(scheme_of(&new).await.as_deref(), Some("internal"));
    let pinned = get(&env, "old").await;
    assert_eq!(
        pinned
            .annotations()
            .get(cloudlb::model::state::DEFAULT_SCHEME_ANNOTATION)
            .map(String::as_str),
        Some("internet-facing")
    );
    assert_eq!(
        pinned
            .annotations()
            .get(INSTALLATION_ANNOTATION)
            .map(String::as_str),
        Some("cloudlb")
    );
    assert!(
        !get(&env, "new")
            .await
            .annotations()
            .contains_key(cloudlb::model::state::DEFAULT_SCHEME_ANNOTATION)
    );

    // After a restart (recorded now, no longer "earlier"), the pin keeps it: the same model, so
    // its checkpoint holds (no call at all), and the same load balancer. Both Services must carry
    // theirs first: the restart reconciles both, and the calls counted are the operator's.
    env.wait_checkpoints(&["old", "new"]).await;
    env.restart_operator();
    let calls = env.calls_for_unrelated_edit("old", "unchanged").await;
    assert!(calls.is_empty(), "replaced or read: {calls:?}");
    assert_eq!(env.hostname("old").await.as_deref(), Some(old.as_str()));
    for name in ["old", "new"] {
        helpers::delete_service(&env.services(), name).await;
    }
}
