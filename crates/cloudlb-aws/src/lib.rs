//! The AWS provider: Network Load Balancers through ELBv2; frontend and backend security groups,
//! the rules on the targets' groups, and subnet discovery through EC2.
//!
//! Every SDK call goes through one helper ([`calls`]) that rate-limits it per call family
//! (describe / write / targets) and counts it as `Operation/outcome`; [`AwsProvider::calls`]
//! returns those counts, and [`AwsProvider::with_metrics`] also counts them in Prometheus
//! (`cloudlb_cloud_api_calls_total`). Throttled calls and transient failures (not of creates) are retried
//! there, up to four attempts with jittered exponential backoff, each through the rate limiter (the SDK's own
//! retries are off).
//!
//! [`Provider::owned`] sweeps the account for everything tagged for this cluster ([`owned`]), so
//! the controller can delete what Services that no longer exist left behind.
//!
//! What load balancers share — the backend security group and the rules on the targets' groups
//! that admit it — is [`backend`]'s: made before targets are registered, pruned by
//! [`Provider::prune_shared`] once no load balancer needs it.
//!
//! Not done yet: an ALPN policy is neither set nor compared (a policy set in the console stays).

mod apply;
mod backend;
mod batch;
mod calls;
mod convert;
mod ec2;
mod error;
mod observe;
mod owned;
mod subnets;
mod vpc;

use cloudlb_core::model::{Desired, ServiceRef, Target};
use cloudlb_core::plan::{Plan, PlanError};
use cloudlb_core::provider::CallObserver;
use cloudlb_core::provider::{Observed, Provider, ProviderError, SharedNeed};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The provider label in logs and metrics.
const PROVIDER_NAME: &str = "aws";

/// Which way a call changes a set: the ingress rules of a security group (authorize, revoke)
/// or the targets of a target group (register, deregister).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Add,
    Remove,
}

impl Change {
    /// The same change to what we observed of the set.
    fn apply_to<T: Ord + Clone>(self, set: &mut std::collections::BTreeSet<T>, items: &[T]) {
        match self {
            Change::Add => set.extend(items.iter().cloned()),
            Change::Remove => {
                for item in items {
                    set.remove(item);
                }
            }
        }
    }
}

/// Settings of the AWS provider.
#[derive(Clone, Debug, PartialEq)]
pub struct AwsSettings {
    /// The cluster name: ownership tag value and subnet discovery tag.
    pub cluster: String,
    /// The VPC of the cluster; when `None`, the VPC of the load balancer's subnets.
    pub vpc_id: Option<String>,
    /// Client-side limit of AWS calls per second, per call family (describe, write, targets).
    /// Zero or less: no limit.
    pub rate_limit_per_sec: f64,
    /// The limit adapts to throttling: halved when AWS throttles, given back slowly (on by
    /// default; off, it stays as configured).
    pub adaptive_rate: bool,
    /// How far the cloud's clock may be behind ours: a load balancer whose CreatedTime is at
    /// most this long before our CreateLoadBalancer was sent was made by that create; an older
    /// one (AWS answers a create of an existing name with the existing load balancer) is used
    /// only after a DescribeTags shows our ownership tags.
    pub created_skew: std::time::Duration,
    /// The installation (the chart's release): names and tags the backend security group, so
    /// installations sharing a cluster and an account never remove each other's rules.
    pub installation: String,
    /// The cluster's nodePort range (kube-apiserver `--service-node-port-range`): a node
    /// target's port in it is admitted as the whole range.
    pub node_port_range: (u16, u16),
}

impl AwsSettings {
    pub const DEFAULT_RATE_LIMIT_PER_SEC: f64 = 10.0;
    pub const DEFAULT_CREATED_SKEW: std::time::Duration = std::time::Duration::from_secs(5);
    pub const DEFAULT_NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

    pub fn new(cluster: impl Into<String>) -> Self {
        AwsSettings {
            cluster: cluster.into(),
            vpc_id: None,
            rate_limit_per_sec: Self::DEFAULT_RATE_LIMIT_PER_SEC,
            adaptive_rate: true,
            created_skew: Self::DEFAULT_CREATED_SKEW,
            installation: "cloudlb".into(),
            node_port_range: Self::DEFAULT_NODE_PORT_RANGE,
        }
    }
}

/// Provisions NLBs for Services; see the module docs.
#[derive(Debug)]
pub struct AwsProvider {
    elbv2: aws_sdk_elasticloadbalancingv2::Client,
    /// The six EC2 calls, behind a trait (`ec2.rs`).
    ec2: Box<dyn ec2::Ec2>,
    settings: AwsSettings,
    calls: calls::Calls,
    subnet_cache: subnets::SubnetCache,
    backend: backend::BackendCache,
    vpc_cache: vpc::VpcCache,
    lookups: observe::Lookups,
}

impl AwsProvider {
    pub fn new(
        elbv2: aws_sdk_elasticloadbalancingv2::Client,
        ec2: aws_sdk_ec2::Client,
        settings: AwsSettings,
    ) -> Self {
        // Retries happen in `calls` (through the rate limiter), so the SDK's are off; every
        // attempt has a deadline, so a black-holed answer cannot stall a reconcile.
        let timeouts = || {
            aws_sdk_elasticloadbalancingv2::config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(5))
                .operation_attempt_timeout(std::time::Duration::from_secs(20))
                .build()
        };
        let elbv2 = aws_sdk_elasticloadbalancingv2::Client::from_conf(
            elbv2
                .config()
                .to_builder()
                .retry_config(
                    aws_sdk_elasticloadbalancingv2::config::retry::RetryConfig::disabled(),
                )
                .timeout_config(timeouts())
                .build(),
        );
        let ec2 = aws_sdk_ec2::Client::from_conf(
            ec2.config()
                .to_builder()
                .retry_config(aws_sdk_ec2::config::retry::RetryConfig::disabled())
                .timeout_config(timeouts())
                .build(),
        );
        AwsProvider {
            elbv2,
            ec2: Box::new(ec2::SdkEc2(ec2)),
            calls: calls::Calls::new(settings.rate_limit_per_sec, settings.adaptive_rate),
            settings,
            subnet_cache: subnets::SubnetCache::default(),
            backend: backend::BackendCache::default(),
            vpc_cache: vpc::VpcCache::default(),
            lookups: observe::Lookups::default(),
        }
    }

    /// Clients from the default AWS configuration chain (environment, profile, IMDS, ...;
    /// `AWS_ENDPOINT_URL` points them at an emulator).
    pub async fn from_env(settings: AwsSettings) -> Self {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        AwsProvider::new(
            aws_sdk_elasticloadbalancingv2::Client::new(&config),
            aws_sdk_ec2::Client::new(&config),
            settings,
        )
    }

    /// Also report every AWS call to `metrics` (the operator counts them as
    /// `cloudlb_cloud_api_calls_total{provider="aws",operation,outcome}`). [`calls`](Self::calls)
    /// keeps counting as before; [`reset_calls`](Self::reset_calls) does not reset `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<dyn CallObserver>) -> Self {
        self.calls.set_metrics(metrics);
        self
    }

    pub fn settings(&self) -> &AwsSettings {
        &self.settings
    }

    /// AWS calls made so far, by `Operation/outcome` (`ok`, `not_found`, `throttled`, `in_use`,
    /// `duplicate`, `error`), e.g. `CreateLoadBalancer/ok`.
    pub fn calls(&self) -> BTreeMap<String, u64> {
        self.calls.snapshot()
    }

    pub fn reset_calls(&self) {
        self.calls.reset();
    }

    /// Calls whose operation is not a `Describe*` read.
    pub fn write_calls(&self) -> u64 {
        self.calls
            .snapshot()
            .iter()
            .filter(|(k, _)| !k.starts_with("Describe"))
            .map(|(_, n)| n)
            .sum()
    }
}

#[async_trait::async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &'static str {
        PROVIDER_NAME
    }

    fn checkpoints(&self) -> bool {
        true
    }

    #[tracing::instrument(skip_all, fields(service = %desired.service))]
    /// The NLB planner of `cloudlb-core`, with the backend security group as far as it is known.
    fn plan(&self, desired: &Desired, observed: &Observed) -> Result<Plan, PlanError> {
        let backend = self.backend.group();
        let subnets = match (&desired.lb, &observed.lb) {
            (Some(lb), Some(have)) => self.known_placement(lb, have),
            _ => None,
        };
        let known = cloudlb_core::plan::Known {
            backend: backend.as_deref(),
            subnets: subnets.as_deref(),
        };
        cloudlb_core::plan::plan_with(desired, observed, known)
    }

    #[tracing::instrument(skip_all, fields(service = %desired.service))]
    async fn observe(&self, desired: &Desired) -> Result<Observed, ProviderError> {
        self.observe_impl(desired, None).await
    }

    /// By id, batched with the other Services' reads of the moment (see `observe`).
    #[tracing::instrument(skip_all, fields(service = %desired.service))]
    async fn observe_known(
        &self,
        desired: &Desired,
        known: &Observed,
    ) -> Result<Observed, ProviderError> {
        self.observe_impl(desired, Some(known)).await
    }

    /// One DescribeTags for the target groups (and, once per process, the backend group's
    /// lookup, which a plan needs to tell that it is attached).
    #[tracing::instrument(skip_all, fields(service = %desired.service))]
    async fn confirm_target_groups(
        &self,
        desired: &Desired,
        observed: &Observed,
    ) -> Result<bool, ProviderError> {
        let arns: Vec<String> = observed
            .target_groups
            .iter()
            .map(|t| t.arn.clone())
            .collect();
        if arns.is_empty() {
            return Ok(false);
        }
        let tags = self.describe_tags(&arns).await?;
        let (cluster, uid) = (&self.settings.cluster, &desired.service.uid);
        if !arns
            .iter()
            .all(|a| observe::ours_elb(&tags, a, cluster, uid))
        {
            return Ok(false);
        }
        if observe::wants_backend(desired) && self.backend_group_id().is_none() {
            self.find_backend_group().await?;
        }
        Ok(true)
    }

    /// One DescribeLoadBalancers by ARN instead of a full observe.
    #[tracing::instrument(skip_all, fields(service = %desired.service))]
    async fn refresh_state(
        &self,
        desired: &Desired,
        observed: &Observed,
    ) -> Result<Observed, ProviderError> {
        let Some(have) = observed.lb.as_ref() else {
            return self.observe_impl(desired, None).await;
        };
        let resp = self
            .calls
            .run("DescribeLoadBalancers", || {
                self.elbv2
                    .describe_load_balancers()
                    .load_balancer_arns(&have.arn)
                    .send()
            })
            .await;
        let lb = match resp {
            Ok(out) => out.load_balancers.into_iter().flatten().next(),
            Err(e) if e.is_not_found() => None,
            Err(e) => return Err(e.into()),
        };
        match lb {
            // Deleted meanwhile: read everything again.
            None => self.observe_impl(desired, None).await,
            Some(lb) => {
                let mut refreshed = observed.clone();
                if let Some(l) = refreshed.lb.as_mut() {
                    l.state = convert::lb_state(lb.state.as_ref());
                    if let Some(dns) = lb.dns_name {
                        l.dns_name = dns;
                    }
                }
                Ok(refreshed)
            }
        }
    }

    #[tracing::instrument(skip_all, fields(service = %desired.service))]
    async fn apply(
        &self,
        desired: &Desired,
        observed: &Observed,
        plan: &Plan,
    ) -> Result<Observed, ProviderError> {
        self.apply_impl(desired, observed, plan).await
    }

    #[tracing::instrument(skip_all, fields(cluster = %self.settings.cluster))]
    async fn owned(
        &self,
        skip: &(dyn for<'s> Fn(&'s ServiceRef) -> bool + Sync),
    ) -> Result<Vec<(ServiceRef, Observed)>, ProviderError> {
        self.owned_impl(skip).await
    }

    #[tracing::instrument(skip_all, fields(cluster = %self.settings.cluster))]
    /// One DescribeTargetHealth per target group asked about.
    async fn healthy_targets(
        &self,
        observed: &Observed,
        names: &[String],
    ) -> Result<BTreeMap<String, BTreeSet<Target>>, ProviderError> {
        let mut out = BTreeMap::new();
        for tg in observed
            .target_groups
            .iter()
            .filter(|t| names.contains(&t.name))
        {
            let req = self
                .elbv2
                .describe_target_health()
                .target_group_arn(&tg.arn);
            let resp = self
                .calls
                .run("DescribeTargetHealth", || req.clone().send())
                .await?;
            let health = resp.target_health_descriptions.unwrap_or_default();
            out.insert(tg.name.clone(), convert::healthy_targets(&health));
        }
        Ok(out)
    }

    async fn prune_shared(&self, wanted: &[SharedNeed]) -> Result<(), ProviderError> {
        self.prune_backend_impl(wanted).await
    }
}
