//! An operator instance running in-process against the shared testbed, with its own namespace,
//! LoadBalancerClass, Nodes (selected by a label), moto account and AWS provider: what the AWS
//! integration tests drive.

use cloudlb::config::class::LoadBalancerClass;
use cloudlb::controller::{self, Providers, Settings};
use cloudlb::provider::aws::{AwsProvider, AwsSettings};
use cloudlb::provider::local::{LocalProvider, LocalSettings};
use cloudlb::telemetry::Metrics;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    AwsEmulator, Instance, Network, TestCluster, create_node, create_vpc_with_subnets, ec2, elbv2,
    node_for, run_instances,
};

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
    let classes: Api<LoadBalancerClass> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while classes.list(&ListParams::default()).await.is_err() {
        assert!(Instant::now() < deadline, "CRD never became established");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub struct Env {
    pub cluster: &'static TestCluster,
    pub client: Client,
    pub ns: String,
    pub elbv2: elbv2::Client,
    pub ec2: ec2::Client,
    pub network: Network,
    pub instances: Vec<Instance>,
    pub provider: Arc<AwsProvider>,
    /// The local provider too, after [`Env::with_local_provider`].
    pub local: Option<Arc<LocalProvider>>,
    pub metrics: Arc<Metrics>,
    pub resync: Duration,
    /// Orphan sweep interval: long, so call counts are not mixed with sweeps, unless a test
    /// is about the sweep.
    pub orphan_sweep: Duration,
    pub operator: Option<tokio::task::JoinHandle<()>>,
}

impl Env {
    pub async fn start(prefix: &str, resync: Duration) -> Env {
        Self::start_on(TestCluster::shared().await, prefix, resync).await
    }

    /// Like [`Env::start`], on a given cluster (one a test may restart).
    pub async fn start_on(cluster: &'static TestCluster, prefix: &str, resync: Duration) -> Env {
        let client = cluster.client();
        install_crd(&client).await;
        let ns = cluster.create_namespace(prefix).await;
        let moto = AwsEmulator::shared().await;
        let account = moto.new_account();
        let (elbv2, ec2) = moto.clients(&account);
        let network = create_vpc_with_subnets(&ec2, &ns).await;
        let mut instances = Vec::new();
        for subnet in &network.public_subnets {
            instances.extend(run_instances(&ec2, &subnet.id, 1).await);
        }
        let class: LoadBalancerClass = serde_json::from_value(json!({
            "apiVersion": "cloudlb.io/v1alpha1",
            "kind": "LoadBalancerClass",
            "metadata": {"name": ns},
            "spec": {"provider": "aws", "default": true, "aws": {"targetNodeLabels": {LABEL: ns}}}
        }))
        .expect("class");
        Api::<LoadBalancerClass>::all(client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create class");
        let metrics = Arc::new(Metrics::new());
        let provider = Arc::new(
            AwsProvider::new(elbv2.clone(), ec2.clone(), AwsSettings::new(ns.clone()))
                .with_metrics(metrics.clone()),
        );
        let mut env = Env {
            cluster,
            client,
            ns,
            elbv2,
            ec2,
            network,
            instances: vec![],
            provider,
            local: None,
            metrics,
            resync,
            orphan_sweep: Duration::from_secs(3600),
            operator: None,
        };
        for (i, instance) in instances.iter().enumerate() {
            env.add_node(instance, i).await;
        }
        env.instances = instances;
        env.start_operator();
        env
    }

    pub fn start_operator(&mut self) {
        let mut settings = Settings::new(self.ns.clone());
        settings.namespace = Some(self.ns.clone());
        settings.classes = Some(vec![self.ns.clone()]);
        settings.resync = self.resync;
        settings.provisioning_requeue = Duration::from_millis(500);
        settings.orphan_sweep = self.orphan_sweep;
        let providers = Providers {
            aws: Some(self.provider.clone()),
            local: self.local.clone(),
        };
        let run = controller::run(
            self.client.clone(),
            settings,
            providers,
            self.metrics.clone(),
            std::future::pending(),
        );
        self.operator = Some(tokio::spawn(run));
    }

    /// Restarts the operator with the local provider as well as AWS.
    pub async fn with_local_provider(&mut self) {
        self.stop_operator();
        if let Some(local) = self.local.take() {
            local.shutdown().await;
        }
        self.local = Some(Arc::new(LocalProvider::new(LocalSettings::default())));
        self.start_operator();
    }

    pub fn stop_operator(&mut self) {
        if let Some(h) = self.operator.take() {
            h.abort();
        }
    }

    pub async fn add_node(&self, instance: &Instance, i: usize) -> String {
        let name = format!("{}-node-{i}", self.ns);
        let mut node = node_for(instance, &name);
        node.metadata
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert(LABEL.into(), self.ns.clone());
        create_node(&self.client, &node).await;
        name
    }

    pub async fn new_instance(&self) -> Instance {
        run_instances(&self.ec2, &self.network.public_subnets[0].id, 1)
            .await
            .pop()
            .expect("one instance")
    }

    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub async fn create_service(
        &self,
        name: &str,
        annotations: serde_json::Value,
        ports: serde_json::Value,
    ) {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": ports}
        }))
        .expect("service");
        self.services()
            .create(&PostParams::default(), &svc)
            .await
            .expect("create service");
    }

    pub async fn patch_service(&self, name: &str, patch: serde_json::Value) {
        self.services()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("patch service {name} with {patch}: {e}"));
    }

    pub async fn hostname(&self, name: &str) -> Option<String> {
        let svc = self.services().get(name).await.ok()?;
        svc.status?
            .load_balancer?
            .ingress?
            .first()?
            .hostname
            .clone()
    }

    pub async fn wait_hostname(&self, name: &str) -> String {
        wait_for(&format!("status hostname of {name}"), || async {
            self.hostname(name).await
        })
        .await
    }

    pub async fn load_balancers(&self) -> Vec<elbv2::types::LoadBalancer> {
        self.elbv2
            .describe_load_balancers()
            .send()
            .await
            .expect("describe load balancers")
            .load_balancers()
            .to_vec()
    }

    pub async fn target_groups(&self) -> Vec<elbv2::types::TargetGroup> {
        self.elbv2
            .describe_target_groups()
            .send()
            .await
            .expect("describe target groups")
            .target_groups()
            .to_vec()
    }

    pub async fn listeners(&self, lb_arn: &str) -> Vec<elbv2::types::Listener> {
        self.elbv2
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .expect("describe listeners")
            .listeners()
            .to_vec()
    }

    pub async fn targets(&self, tg_arn: &str) -> Vec<String> {
        let mut ids: Vec<String> = self
            .elbv2
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .expect("describe target health")
            .target_health_descriptions()
            .iter()
            .filter(|d| {
                d.target_health().and_then(|h| h.state()).is_none_or(|s| {
                    !matches!(
                        s,
                        elbv2::types::TargetHealthStateEnum::Unused
                            | elbv2::types::TargetHealthStateEnum::Draining
                    )
                })
            })
            .filter_map(|d| d.target().and_then(|t| t.id()).map(String::from))
            .collect();
        ids.sort();
        ids
    }

    /// Security groups cloudlb made (carrying our cluster tag).
    pub async fn our_security_groups(&self) -> Vec<String> {
        self.ec2
            .describe_security_groups()
            .filters(
                ec2::types::Filter::builder()
                    .name("tag:cloudlb.io/cluster")
                    .values(&self.ns)
                    .build(),
            )
            .send()
            .await
            .expect("describe security groups")
            .security_groups()
            .iter()
            .filter_map(|g| g.group_id().map(String::from))
            .collect()
    }

    pub async fn events(&self, reason: &str) -> Vec<String> {
        Api::<Event>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default())
            .await
            .expect("list events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .filter_map(|e| e.note)
            .collect()
    }

    /// Waits until the operator has finished `n` more reconciles with `outcome` than `before`.
    pub async fn wait_reconciles(&self, outcome: &str, before: u64) {
        wait_for(&format!("a reconcile with outcome {outcome}"), || async {
            (self.metrics.reconcile_count(outcome) > before).then_some(())
        })
        .await
    }

    pub fn calls_since(&self, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        self.provider
            .calls()
            .into_iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(&k).copied().unwrap_or(0);
                (d > 0).then_some((k, d))
            })
            .collect()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_operator();
    }
}

/// Deletes the Service `name` and waits until it is gone (our finalizer released it).
pub async fn delete_service(services: &Api<Service>, name: &str) {
    services
        .delete(name, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete Service {name}: {e}"));
    wait_for(&format!("Service {name} gone"), || async {
        services.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
