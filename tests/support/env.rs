//! An operator instance running in-process against the shared testbed, with its own namespace,
//! LoadBalancerClass, Nodes (selected by a label), moto account and AWS provider: what the AWS
//! integration tests drive.

use cloudlb::controller::{self, Providers, Settings};
use cloudlb::provider::aws::{AwsProvider, AwsSettings};
use cloudlb::provider::local::LocalProvider;
use cloudlb::telemetry::Metrics;
use k8s_openapi::api::core::v1::Service;
use kube::{Api, Client};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::describe;
use super::fixtures;
use super::{
    AwsEmulator, Instance, Network, TestCluster, create_vpc_with_subnets, ec2, elbv2, run_instances,
};

/// How a test's [`Env`] is set up; [`Setup::default`] is what most tests want.
pub struct Setup {
    pub resync: Duration,
    /// Instances (each with its Node) in every public subnet.
    pub instances_per_subnet: i32,
    /// The moto account; a new one when None. (A `cloudlb` process with plain credentials uses
    /// moto's default account.)
    pub account: Option<String>,
    /// The client the in-process operator uses; the admin client when None.
    pub operator_client: Option<Client>,
    /// Start an operator in-process; false when the test runs the `cloudlb` binary itself.
    pub in_process_operator: bool,
}

impl Setup {
    /// Everything but the operator: the test starts its own.
    pub fn without_operator() -> Self {
        Setup {
            in_process_operator: false,
            ..Setup::default()
        }
    }
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            resync: Duration::from_secs(3600),
            instances_per_subnet: 1,
            account: None,
            operator_client: None,
            in_process_operator: true,
        }
    }
}

/// Settings for an operator limited to namespace `ns` and the class named `ns`.
pub fn operator_settings(ns: &str) -> Settings {
    let mut settings = Settings::new(ns.to_string());
    settings.namespace = Some(ns.to_string());
    settings.classes = Some(vec![ns.to_string()]);
    settings
}

/// Runs the operator's controllers in a task (aborting it is a process exit).
pub fn spawn_operator(
    client: Client,
    settings: Settings,
    providers: Providers,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(controller::run(
        client,
        settings,
        providers,
        metrics,
        std::future::pending(),
    ))
}

pub struct Env {
    pub cluster: &'static TestCluster,
    /// Admin: creates the class, Nodes and Services (what users and kubelets do).
    pub client: Client,
    /// What the in-process operator runs with.
    pub operator_client: Client,
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
        let ns = cluster.create_namespace(prefix).await;
        let setup = Setup {
            resync,
            ..Setup::default()
        };
        Self::start_in(cluster, ns, setup).await
    }

    /// An Env set up as `setup` says, in a new namespace (named after `prefix`) of the shared
    /// cluster.
    pub async fn start_with(prefix: &str, setup: Setup) -> Env {
        let cluster = TestCluster::shared().await;
        let ns = cluster.create_namespace(prefix).await;
        Self::start_in(cluster, ns, setup).await
    }

    /// An Env in the namespace `ns` (already created): the class `ns`, a moto account with a
    /// VPC, instances and their Nodes, and (unless `setup` says otherwise) the operator.
    pub async fn start_in(cluster: &'static TestCluster, ns: String, setup: Setup) -> Env {
        let client = cluster.client();
        fixtures::install_crd(&client).await;
        let moto = AwsEmulator::shared().await;
        let account = setup.account.unwrap_or_else(|| moto.new_account());
        let (elbv2, ec2) = moto.clients(&account);
        let network = create_vpc_with_subnets(&ec2, &ns).await;
        fixtures::create_class(&client, &ns, fixtures::aws_class_spec(&ns)).await;
        let metrics = Arc::new(Metrics::new());
        let provider = Arc::new(
            AwsProvider::new(elbv2.clone(), ec2.clone(), AwsSettings::new(ns.clone()))
                .with_metrics(metrics.clone()),
        );
        let mut env = Env {
            cluster,
            operator_client: setup.operator_client.unwrap_or_else(|| client.clone()),
            client,
            ns,
            elbv2,
            ec2,
            network,
            instances: vec![],
            provider,
            local: None,
            metrics,
            resync: setup.resync,
            orphan_sweep: Duration::from_secs(3600),
            operator: None,
        };
        for subnet in &env.network.public_subnets {
            let more = run_instances(&env.ec2, &subnet.id, setup.instances_per_subnet).await;
            env.instances.extend(more);
        }
        for (i, instance) in env.instances.iter().enumerate() {
            env.add_node(instance, i).await;
        }
        if setup.in_process_operator {
            env.start_operator();
        }
        env
    }

    pub fn start_operator(&mut self) {
        let mut settings = operator_settings(&self.ns);
        settings.resync = self.resync;
        settings.provisioning_requeue = Duration::from_millis(500);
        settings.orphan_sweep = self.orphan_sweep;
        let providers = Providers {
            aws: Some(self.provider.clone()),
            local: self.local.clone(),
        };
        self.operator = Some(spawn_operator(
            self.operator_client.clone(),
            settings,
            providers,
            self.metrics.clone(),
        ));
    }

    /// `kills` restarts of the operator ([`Env::restart_operator`]), each after a random pause
    /// of `pause_ms` milliseconds drawn from `rng`.
    pub async fn restart_at_random_moments(
        &mut self,
        rng: &mut rand::rngs::StdRng,
        kills: usize,
        pause_ms: std::ops::Range<u64>,
    ) {
        use rand::Rng;
        for _ in 0..kills {
            let after = Duration::from_millis(rng.random_range(pause_ms.clone()));
            tokio::time::sleep(after).await;
            self.restart_operator();
        }
    }

    /// Stops the operator and starts a new one with a new AWS provider: a process restart,
    /// nothing cached.
    pub fn restart_operator(&mut self) {
        self.stop_operator();
        self.provider = Arc::new(
            AwsProvider::new(
                self.elbv2.clone(),
                self.ec2.clone(),
                AwsSettings::new(self.ns.clone()),
            )
            .with_metrics(self.metrics.clone()),
        );
        self.start_operator();
    }

    pub fn stop_operator(&mut self) {
        if let Some(h) = self.operator.take() {
            h.abort();
        }
    }

    pub async fn add_node(&self, instance: &Instance, i: usize) -> String {
        let name = format!("{}-node-{i}", self.ns);
        fixtures::create_labelled_node(&self.client, instance, &name, &self.ns).await;
        name
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
        let spec = json!({"selector": {"app": name}, "ports": ports});
        fixtures::create_service(
            &self.services(),
            &fixtures::lb_service(name, annotations, spec),
        )
        .await;
    }

    pub async fn hostname(&self, name: &str) -> Option<String> {
        fixtures::ingress(&self.services(), name).await?.hostname
    }

    pub async fn wait_hostname(&self, name: &str) -> String {
        wait_for(&format!("status hostname of {name}"), || async {
            self.hostname(name).await
        })
        .await
    }

    pub async fn load_balancers(&self) -> Vec<elbv2::types::LoadBalancer> {
        describe::load_balancers(&self.elbv2).await
    }

    /// The names of the load balancers in the account.
    pub async fn load_balancer_names(&self) -> Vec<String> {
        self.load_balancers()
            .await
            .iter()
            .filter_map(|l| l.load_balancer_name().map(String::from))
            .collect()
    }

    pub async fn target_groups(&self) -> Vec<elbv2::types::TargetGroup> {
        describe::target_groups(&self.elbv2).await
    }

    pub async fn listeners(&self, lb_arn: &str) -> Vec<elbv2::types::Listener> {
        describe::listeners(&self.elbv2, lb_arn).await
    }

    /// Security groups cloudlb made (carrying our cluster tag).
    pub async fn our_security_groups(&self) -> Vec<String> {
        describe::security_groups(&self.ec2, &self.ns)
            .await
            .iter()
            .filter_map(|g| g.group_id().map(String::from))
            .collect()
    }

    /// Waits until the load balancer `lb_arn` has `n` listeners.
    pub async fn wait_listeners(&self, lb_arn: &str, n: usize) {
        wait_for(&format!("{n} listeners on {lb_arn}"), || async {
            (self.listeners(lb_arn).await.len() == n).then_some(())
        })
        .await;
    }

    /// Waits until the account holds `n` target groups.
    pub async fn wait_target_groups(&self, n: usize) {
        wait_for(&format!("{n} target groups"), || async {
            (self.target_groups().await.len() == n).then_some(())
        })
        .await;
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_operator();
    }
}

/// Polls `f` until it returns Some (its value), for at most 40 s.
/// The random moments of a crash test: seeded by `CLOUDLB_CRASH_SEED`, else by `default`
/// (printed, so a failure can be replayed).
pub fn crash_rng(default: u64) -> rand::rngs::StdRng {
    use rand::SeedableRng;
    let seed: u64 = std::env::var("CLOUDLB_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    eprintln!("crash test seed {seed} (set CLOUDLB_CRASH_SEED to replay)");
    rand::rngs::StdRng::seed_from_u64(seed)
}

pub async fn wait_for<T, F, Fut>(what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_within(what, Duration::from_secs(40), f).await
}

/// Polls `f` until it returns Some (its value), for at most `limit`; the poll interval grows
/// with the limit (100 ms to 500 ms), so long waits on heavy checks stay light.
pub async fn wait_within<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let every = (limit / 400).clamp(Duration::from_millis(100), Duration::from_millis(500));
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}
