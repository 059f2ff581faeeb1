//! Execute a plan, op by op, and build the resulting [`Observed`] from the desired model, the
//! observed state and the create/modify responses, without re-reading. The only reads are the
//! attributes of a resource just created (its defaults are not in the create response), and the
//! subnets (cached) when a new load balancer, security group or target group needs them.

use super::convert::{self, desired_certificates, elb_tags};
use super::error::{AwsError, CallResult, ErrorKind};
use super::{AwsProvider, Change};
use aws_sdk_elasticloadbalancingv2::operation::{
    create_listener::builders::CreateListenerFluentBuilder,
    create_target_group::builders::CreateTargetGroupFluentBuilder,
    modify_listener::builders::ModifyListenerFluentBuilder,
    modify_target_group::builders::ModifyTargetGroupFluentBuilder,
};
use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::model::tags;
use cloudlb_core::model::{
    Desired, HealthCheck, HealthCheckProtocol, IngressRule, IpFamily, Listener, LoadBalancer,
    SourceNat, Target, TargetGroup, TargetType,
};
use cloudlb_core::plan::{Op, Plan, Tagged};
use cloudlb_core::provider::{
    Observed, ObservedLb, ObservedListener, ObservedTargetGroup, ProviderError,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

/// Targets per (De)RegisterTargets call.
const TARGETS_PER_CALL: usize = 500;
/// Resources per AddTags / RemoveTags call.
const TAGGED_PER_CALL: usize = 20;

/// A tag change of [`Run::change_tags`].
enum Tags<'a> {
    Add(&'a BTreeMap<String, String>),
    Remove(&'a [String]),
}

impl AwsProvider {
    pub(crate) async fn apply_impl(
        &self,
        desired: &Desired,
        observed: &Observed,
        plan: &Plan,
    ) -> Result<Observed, ProviderError> {
        let mut run = Run::new(self, desired, observed);
        // The targets' security groups admit the load balancer before it exists or gets
        // targets (and the backend group exists before it is attached).
        if let Some(lb) = desired.lb.as_ref().filter(|l| l.security.backend.is_some())
            && plan.ops.iter().any(needs_backend)
        {
            let vpc = run.vpc().await?;
            run.out.notes = self.ensure_backend(lb, &vpc).await?;
        }
        for op in &plan.ops {
            tracing::debug!(?op, "applying");
            run.op(op).await?;
        }
        Ok(run.finish())
    }
}

/// Operations before which the backend group must exist and the targets must admit it.
fn needs_backend(op: &Op) -> bool {
    matches!(
        op,
        Op::CreateLoadBalancer
            | Op::SetSecurityGroups
            | Op::RegisterTargets { .. }
            | Op::CreateTargetGroup { .. }
    )
}

struct Run<'a> {
    p: &'a AwsProvider,
    desired: &'a Desired,
    /// What exists, updated after every op.
    out: Observed,
    /// Target-group key → ARN.
    tg_arns: BTreeMap<String, String>,
    vpc_id: Option<String>,
    /// Target groups this run created whose tags are not checked yet: (ARN, name).
    unverified_tgs: Vec<(String, String)>,
}

fn internal(what: impl std::fmt::Display) -> ProviderError {
    ProviderError::InvalidConfig(format!("internal error (plan and model disagree): {what}"))
}

/// The id of something an operation needs; `None` is an internal error (`missing`): the plan
/// orders the operations so that what one needs is observed or created before.
fn needed(id: Option<&String>, missing: &str) -> Result<String, ProviderError> {
    id.cloned().ok_or_else(|| internal(missing))
}

fn unexpected(operation: &'static str, what: &str) -> ProviderError {
    ProviderError::Api {
        operation,
        message: format!("unexpected response: {what}"),
        throttled: false,
    }
}

fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn elb_targets(targets: &[Target]) -> Vec<elb::TargetDescription> {
    targets
        .iter()
        .map(|t| {
            elb::TargetDescription::builder()
                .id(&t.id)
                .port(i32::from(t.port))
                .build()
        })
        .collect()
}

fn forward(tg_arn: &str) -> elb::Action {
    elb::Action::builder()
        .r#type(elb::ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}

fn certificate(arn: &str) -> elb::Certificate {
    elb::Certificate::builder().certificate_arn(arn).build()
}

/// The first resource of a response's list: create and modify calls answer with the one they
/// made or changed.
fn first<T>(items: Option<Vec<T>>) -> Option<T> {
    items.into_iter().flatten().next()
}

/// The defaults of the attributes `managed` names: what a resource just created has (its
/// defaults are not in the create response, and reading them would be one more call).
fn defaults(
    managed: &BTreeMap<String, String>,
    default: impl Fn(&str) -> Option<&'static str>,
) -> BTreeMap<String, String> {
    managed
        .keys()
        .filter_map(|k| default(k).map(|v| (k.clone(), v.to_string())))
        .collect()
}

/// The settings of a target group's health check, on both calls that set them
/// (CreateTargetGroup and ModifyTargetGroup: two builder types with the same setters).
trait WithHealthCheck {
    /// Enables the check of `hc`; path and matcher only for an HTTP(S) check.
    fn with_health_check(self, hc: &HealthCheck) -> Self;
}

/// The settings of a listener, on both calls that set them (CreateListener and ModifyListener).
trait WithListener {
    /// Port, protocol, forward to `tg_arn`, and the default certificate and TLS policy of `want`
    /// (the other certificates are [`Run::sync_extra_certificates`]' business).
    fn with_listener(self, want: &Listener, tg_arn: &str) -> Self;
}

macro_rules! impl_with_health_check {
    ($($builder:ty),+) => {$(
        impl WithHealthCheck for $builder {
            fn with_health_check(self, hc: &HealthCheck) -> Self {
                let http = hc.protocol != HealthCheckProtocol::Tcp;
                self.health_check_enabled(true)
                    .health_check_protocol(elb::ProtocolEnum::from(hc.protocol.as_aws()))
                    .health_check_port(hc.port_string())
                    .health_check_interval_seconds(int(hc.interval_seconds))
                    .health_check_timeout_seconds(int(hc.timeout_seconds))
                    .healthy_threshold_count(int(hc.healthy_threshold))
                    .unhealthy_threshold_count(int(hc.unhealthy_threshold))
                    .set_health_check_path(hc.path.clone().filter(|_| http))
                    .set_matcher(
                        hc.success_codes
                            .as_ref()
                            .filter(|_| http)
                            .map(|c| elb::Matcher::builder().http_code(c).build()),
                    )
            }
        }
    )+};
}

macro_rules! impl_with_listener {
    ($($builder:ty),+) => {$(
        impl WithListener for $builder {
            fn with_listener(self, want: &Listener, tg_arn: &str) -> Self {
                self.port(i32::from(want.port))
                    .protocol(elb::ProtocolEnum::from(want.protocol.as_aws()))
                    .default_actions(forward(tg_arn))
                    .set_certificates(want.certificates.first().map(|c| vec![certificate(c)]))
                    .set_ssl_policy(want.ssl_policy.clone())
                    .set_alpn_policy(want.alpn_policy.clone().map(|p| vec![p]))
            }
        }
    )+};
}

impl_with_health_check!(
    CreateTargetGroupFluentBuilder,
    ModifyTargetGroupFluentBuilder
);
impl_with_listener!(CreateListenerFluentBuilder, ModifyListenerFluentBuilder);

/// The listener a create/modify call answered with, as observed, with the certificates of
/// `want` (the answer has only the default one).
fn answered_listener(
    operation: &'static str,
    listeners: Option<Vec<elb::Listener>>,
    want: &Listener,
) -> Result<ObservedListener, ProviderError> {
    let listener = first(listeners).ok_or_else(|| unexpected(operation, "no listener"))?;
    let mut observed = convert::observed_listener(&listener, None)
        .ok_or_else(|| unexpected(operation, "a listener cloudlb cannot read"))?;
    if !want.certificates.is_empty() {
        observed.certificates = desired_certificates(&want.certificates);
    }
    Ok(observed)
}

/// Overlays the attributes a modify call reports, then those we asked for that it did not report
/// (AWS reports all; emulators may report only the changed ones).
fn merge_attributes(
    into: &mut BTreeMap<String, String>,
    reported: BTreeMap<String, String>,
    requested: &BTreeMap<String, String>,
) {
    for (k, v) in requested {
        if !reported.contains_key(k) {
            into.insert(k.clone(), v.clone());
        }
    }
    into.extend(reported);
}

impl<'a> Run<'a> {
    fn new(p: &'a AwsProvider, desired: &'a Desired, observed: &Observed) -> Self {
        let tg_arns = desired
            .lb
            .iter()
            .flat_map(|lb| lb.target_groups.iter())
            .filter_map(|tg| {
                observed
                    .target_groups
                    .iter()
                    .find(|o| o.name == tg.name)
                    .map(|o| (tg.key.clone(), o.arn.clone()))
            })
            .collect();
        Run {
            p,
            desired,
            out: observed.clone(),
            tg_arns,
            vpc_id: p.settings.vpc_id.clone(),
            unverified_tgs: Vec::new(),
        }
    }

    fn finish(mut self) -> Observed {
        if self.desired.lb.is_none() {
            return Observed::default();
        }
        self.out
            .listeners
            .sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.arn.cmp(&b.arn)));
        self.out
            .target_groups
            .sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.arn.cmp(&b.arn)));
        self.out
    }

    fn lb(&self) -> Result<&'a LoadBalancer, ProviderError> {
        self.desired.lb.as_ref().ok_or_else(|| {
            internal("an operation needs the desired load balancer but the model is empty")
        })
    }

    fn lb_arn(&self) -> Result<String, ProviderError> {
        let arn = self.out.lb.as_ref().map(|l| &l.arn);
        needed(
            arn,
            "an operation needs the load balancer, which does not exist",
        )
    }

    fn target_group(&self, key: &str) -> Result<&'a TargetGroup, ProviderError> {
        self.lb()?
            .target_groups
            .iter()
            .find(|t| t.key == key)
            .ok_or_else(|| internal(format!("no target group {key:?} in the model")))
    }

    fn tg_arn(&self, key: &str) -> Result<String, ProviderError> {
        self.tg_arns
            .get(key)
            .cloned()
            .ok_or_else(|| internal(format!("target group {key:?} neither observed nor created")))
    }

    fn observed_tg_mut(&mut self, arn: &str) -> Option<&mut ObservedTargetGroup> {
        self.out.target_groups.iter_mut().find(|t| t.arn == arn)
    }

    fn listener(&self, port: u16) -> Result<&'a Listener, ProviderError> {
        self.lb()?
            .listeners
            .iter()
            .find(|l| l.port == port)
            .ok_or_else(|| internal(format!("no listener on port {port} in the model")))
    }

    fn sg_id(&self) -> Result<String, ProviderError> {
        let id = self.out.security_group.as_ref().map(|s| &s.id);
        needed(id, "the frontend security group does not exist")
    }

    /// Our frontend group (when the model wants one), the cluster's backend group (when
    /// wanted) plus the user's.
    fn security_groups(&self) -> Result<Vec<String>, ProviderError> {
        let lb = self.lb()?;
        let mut ids = Vec::new();
        if lb.security.frontend.is_some() {
            ids.push(self.sg_id()?);
        }
        if lb.security.backend.is_some() {
            let backend = self.p.backend_group_id();
            ids.push(needed(
                backend.as_ref(),
                "the backend security group is not known",
            )?);
        }
        ids.extend(lb.security.extra_security_groups.iter().cloned());
        Ok(ids)
    }

    async fn vpc(&mut self) -> Result<String, ProviderError> {
        if let Some(v) = &self.vpc_id {
            return Ok(v.clone());
        }
        let lb = self.lb()?;
        let resolved = self.p.resolve_subnets(lb.scheme, &lb.subnets).await?;
        let vpc = resolved.vpc_id.ok_or_else(|| {
            ProviderError::InvalidConfig(
                "the VPC of the load balancer's subnets is unknown: set the VPC id".into(),
            )
        })?;
        self.vpc_id = Some(vpc.clone());
        Ok(vpc)
    }

    async fn op(&mut self, op: &Op) -> Result<(), ProviderError> {
        if uses_target_groups(op) {
            self.verify_created_tgs().await?;
        }
        match op {
            Op::CreateSecurityGroup => self.create_security_group().await,
            Op::SetAlgorithm { key, .. } => Err(ProviderError::InvalidConfig(format!(
                "SetAlgorithm ({key}) is an operation of the local provider; the AWS provider does not plan it"
            ))),
            Op::AuthorizeIngress { rules } => self.change_ingress(rules, Change::Add).await,
            Op::RevokeIngress { rules } => self.change_ingress(rules, Change::Remove).await,
            Op::DeleteLoadBalancer { arn, name, reason } => self.delete_lb(arn, name, reason).await,
            Op::CreateLoadBalancer => self.create_lb().await,
            Op::SetIpAddressType => self.set_ip_address_type().await,
            Op::SetIpv6SourceNat => self.set_ipv6_source_nat().await,
            Op::SetSubnets { subnets } => self.set_subnets(subnets, true).await,
            Op::SetSecurityGroups => self.set_security_groups().await,
            Op::SetLoadBalancerAttributes { attributes } => {
                self.set_lb_attributes(attributes).await
            }
            Op::CreateTargetGroup { key } => self.create_tg(key).await,
            Op::ModifyHealthCheck { key } => self.modify_health_check(key).await,
            Op::SetTargetGroupAttributes { key, attributes } => {
                self.set_tg_attributes(key, attributes).await
            }
            Op::DeregisterTargets { key, targets } => {
                self.change_targets(key, targets, Change::Remove).await
            }
            Op::RegisterTargets { key, targets } => {
                self.change_targets(key, targets, Change::Add).await
            }
            Op::DeleteListener { arn, .. } => self.delete_listener(arn).await,
            Op::ModifyListener { arn, port } => self.modify_listener(arn, *port).await,
            Op::CreateListener { port } => self.create_listener(*port).await,
            Op::SetListenerAttributes { port, attributes } => {
                self.set_listener_attributes(*port, attributes).await
            }
            Op::DeleteTargetGroup { arn, .. } => self.delete_tg(arn).await,
            Op::DeleteSecurityGroup { id } => self.delete_security_group(id).await,
            Op::RemoveTags { resources, keys } => {
                self.change_tags(resources, &Tags::Remove(keys)).await
            }
            Op::AddTags { resources, tags } => self.change_tags(resources, &Tags::Add(tags)).await,
        }
    }

    // ----------------------------------------------------------------- tags

    /// Adds or removes tags on existing resources: the load balancer's in AddTags / RemoveTags
    /// calls of up to 20 ARNs, the security group's in one CreateTags / DeleteTags.
    async fn change_tags(
        &mut self,
        resources: &[Tagged],
        change: &Tags<'_>,
    ) -> Result<(), ProviderError> {
        let mut arns = Vec::new();
        let mut group = None;
        for r in resources {
            match r {
                Tagged::LoadBalancer => arns.push(self.lb_arn()?),
                Tagged::Listener { port } => {
                    let arn = self
                        .out
                        .listeners
                        .iter()
                        .find(|l| l.port == *port)
                        .map(|l| &l.arn);
                    arns.push(needed(arn, "a listener to tag does not exist")?);
                }
                Tagged::TargetGroup { key } => arns.push(self.tg_arn(key)?),
                Tagged::SecurityGroup => group = Some(self.sg_id()?),
            }
        }
        let p = self.p;
        for chunk in arns.chunks(TAGGED_PER_CALL) {
            let chunk = Some(chunk.to_vec());
            let sent = match change {
                Tags::Add(tags) => {
                    let req = p
                        .elbv2
                        .add_tags()
                        .set_resource_arns(chunk)
                        .set_tags(Some(elb_tags(tags)));
                    p.calls
                        .run("AddTags", || req.clone().send())
                        .await
                        .map(drop)
                }
                Tags::Remove(keys) => {
                    let req = p
                        .elbv2
                        .remove_tags()
                        .set_resource_arns(chunk)
                        .set_tag_keys(Some(keys.to_vec()));
                    p.calls
                        .run("RemoveTags", || req.clone().send())
                        .await
                        .map(drop)
                }
            };
            sent.gone("load balancer resource")?;
        }
        if let Some(id) = group {
            let sent = match change {
                Tags::Add(tags) => p.ec2.create_tags(&p.calls, &id, tags).await,
                Tags::Remove(keys) => p.ec2.delete_tags(&p.calls, &id, keys).await,
            };
            sent.gone("security group")?;
        }
        for r in resources {
            if let Some(have) = self.observed_tags_mut(r) {
                match change {
                    Tags::Add(tags) => {
                        have.extend(tags.iter().map(|(k, v)| (k.clone(), v.clone())))
                    }
                    Tags::Remove(keys) => have.retain(|k, _| !keys.contains(k)),
                }
            }
        }
        Ok(())
    }

    /// The tags of `r` as observed so far.
    fn observed_tags_mut(&mut self, r: &Tagged) -> Option<&mut BTreeMap<String, String>> {
        match r {
            Tagged::LoadBalancer => self.out.lb.as_mut().map(|l| &mut l.tags),
            Tagged::Listener { port } => self
                .out
                .listeners
                .iter_mut()
                .find(|l| l.port == *port)
                .map(|l| &mut l.tags),
            Tagged::TargetGroup { key } => {
                let arn = self.tg_arns.get(key)?.clone();
                self.observed_tg_mut(&arn).map(|t| &mut t.tags)
            }
            Tagged::SecurityGroup => self.out.security_group.as_mut().map(|g| &mut g.tags),
        }
    }

    // ----------------------------------------------------------------- security group

    async fn create_security_group(&mut self) -> Result<(), ProviderError> {
        let lb = self.lb()?;
        let frontend = lb.security.frontend.as_ref().ok_or_else(|| {
            internal("CreateSecurityGroup without a frontend security group in the model")
        })?;
        let vpc = self.vpc().await?;
        let all_tags = lb.security_group_tags(frontend);
        let p = self.p;
        let id = p
            .ec2
            .create_security_group(
                &p.calls,
                &frontend.name,
                &frontend.description,
                &vpc,
                &all_tags,
            )
            .await?
            .ok_or_else(|| unexpected("CreateSecurityGroup", "no GroupId"))?;
        self.out.security_group = Some(cloudlb_core::provider::ObservedSecurityGroup {
            id,
            name: frontend.name.clone(),
            ingress: BTreeSet::new(),
            tags: tags::user_tags(&all_tags),
        });
        Ok(())
    }

    async fn change_ingress(
        &mut self,
        rules: &[IngressRule],
        change: Change,
    ) -> Result<(), ProviderError> {
        if rules.is_empty() {
            return Ok(());
        }
        let id = self.sg_id()?;
        let p = self.p;
        p.ec2
            .change_ingress(&p.calls, &id, rules, change)
            .await
            .gone("security group")?;
        if let Some(sg) = &mut self.out.security_group {
            change.apply_to(&mut sg.ingress, rules);
        }
        Ok(())
    }

    async fn delete_security_group(&mut self, id: &str) -> Result<(), ProviderError> {
        let p = self.p;
        p.ec2
            .delete_security_group(&p.calls, id)
            .await
            .found()
            .in_use("security group")?;
        if self.out.security_group.as_ref().is_some_and(|s| s.id == id) {
            self.out.security_group = None;
        }
        Ok(())
    }

    // ----------------------------------------------------------------- load balancer

    async fn delete_lb(
        &mut self,
        arn: &str,
        name: &str,
        reason: &str,
    ) -> Result<(), ProviderError> {
        tracing::info!(load_balancer = name, reason, "deleting load balancer");
        let p = self.p;
        let req = p.elbv2.delete_load_balancer().load_balancer_arn(arn);
        let sent = p.calls.run("DeleteLoadBalancer", || req.clone().send());
        match sent.await.found() {
            Ok(_) => {}
            Err(e) if e.code.as_deref() == Some("OperationNotPermitted") => {
                return Err(ProviderError::DeletionProtected {
                    name: name.to_string(),
                });
            }
            Err(e) => return Err(e.in_use("load balancer")),
        }
        if self.out.lb.as_ref().is_some_and(|l| l.arn == arn) {
            self.out.lb = None;
            // Listeners go with their load balancer.
            self.out.listeners.clear();
        }
        Ok(())
    }

    async fn create_lb(&mut self) -> Result<(), ProviderError> {
        let lb = self.lb()?;
        let subnets = self.p.resolve_subnets(lb.scheme, &lb.subnets).await?;
        if self.vpc_id.is_none() {
            self.vpc_id.clone_from(&subnets.vpc_id);
        }
        let n = subnets.ids.len();
        for (what, list) in [
            ("EIP allocation ids", &lb.eip_allocations),
            ("private IPv4 addresses", &lb.private_ipv4_addresses),
        ] {
            if !list.is_empty() && list.len() != n {
                return Err(ProviderError::InvalidConfig(format!(
                    "{} {what} given for {n} subnets ({}): give exactly one per subnet, in subnet order",
                    list.len(),
                    subnets.ids.join(", ")
                )));
            }
        }
        let security_groups = self.security_groups()?;
        let mut req = self
            .p
            .elbv2
            .create_load_balancer()
            .name(&lb.name)
            .r#type(elb::LoadBalancerTypeEnum::Network)
            .scheme(elb::LoadBalancerSchemeEnum::from(lb.scheme.as_aws()))
            .ip_address_type(elb::IpAddressType::from(lb.ip_address_type.as_aws()))
            .set_tags(Some(elb_tags(&lb.tags)));
        if !security_groups.is_empty() {
            req = req.set_security_groups(Some(security_groups));
        }
        let nat = lb.ipv6_source_nat.as_ref();
        source_nat_fits(nat, &subnets.ids)?;
        if lb.eip_allocations.is_empty() && lb.private_ipv4_addresses.is_empty() && nat.is_none() {
            req = req.set_subnets(Some(subnets.ids.clone()));
        } else {
            let mappings = subnets
                .ids
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    elb::SubnetMapping::builder()
                        .subnet_id(id)
                        .set_allocation_id(lb.eip_allocations.get(i).cloned())
                        .set_private_ipv4_address(lb.private_ipv4_addresses.get(i).cloned())
                        .set_source_nat_ipv6_prefix(nat.map(|n| n.prefix(i).to_string()))
                        .build()
                })
                .collect();
            req = req.set_subnet_mappings(Some(mappings));
        }
        if nat.is_some() {
            req = req.enable_prefix_for_ipv6_source_nat(elb::EnablePrefixForIpv6SourceNatEnum::On);
        }
        let sent_at = unix_millis(std::time::SystemTime::now());
        let sent = self
            .p
            .calls
            .run("CreateLoadBalancer", || req.clone().send());
        let created = first(sent.await?.load_balancers)
            .ok_or_else(|| unexpected("CreateLoadBalancer", "no load balancer"))?;
        let Some(arn) = created.load_balancer_arn.as_deref() else {
            return Err(unexpected("CreateLoadBalancer", "no LoadBalancerArn"));
        };
        self.verify_created_lb(arn, created.created_time.as_ref(), sent_at)
            .await?;
        // A new load balancer has the default attributes: no read needed. Only the keys the
        // model manages matter to the planner; a later SetLoadBalancerAttributes merges in.
        let attributes = defaults(
            &self.lb()?.attributes,
            cloudlb_core::plan::lb_attribute_default,
        );
        let user_tags = tags::user_tags(&self.lb()?.tags);
        self.out.lb = convert::observed_lb(&created, Some(attributes));
        if let Some(l) = self.out.lb.as_mut() {
            l.tags = user_tags;
        }
        self.out.listeners.clear();
        Ok(())
    }

    /// AWS answers a CreateLoadBalancer for a name that exists (with the same settings) with
    /// the existing load balancer: one created before this request is used only if it carries
    /// our ownership tags (one DescribeTags, only then); else it is [`ProviderError::Foreign`]
    /// and nothing is attached to it. One created by this request (or its retries) needs no
    /// read: its CreatedTime is at most [`AwsSettings::created_skew`](crate::AwsSettings) before
    /// the request was sent.
    async fn verify_created_lb(
        &self,
        arn: &str,
        created: Option<&aws_sdk_elasticloadbalancingv2::primitives::DateTime>,
        sent_at: i64,
    ) -> Result<(), ProviderError> {
        let skew = i64::try_from(self.p.settings.created_skew.as_millis()).unwrap_or(i64::MAX);
        let created_ms = created.and_then(|t| t.to_millis().ok());
        if created_ms.is_some_and(|t| t >= sent_at.saturating_sub(skew)) {
            return Ok(());
        }
        let created = vec![(arn.to_string(), self.desired.lb_name.clone())];
        self.refuse_foreign("load balancer", created).await
    }

    /// One DescribeTags for the `created` resources (ARN, name) of `kind`: the first without
    /// our ownership tags is [`ProviderError::Foreign`].
    async fn refuse_foreign(
        &self,
        kind: &'static str,
        created: Vec<(String, String)>,
    ) -> Result<(), ProviderError> {
        let arns: Vec<String> = created.iter().map(|(arn, _)| arn.clone()).collect();
        let tags = self.p.describe_tags(&arns).await?;
        let (cluster, uid) = (&self.p.settings.cluster, &self.desired.service.uid);
        match created
            .into_iter()
            .find(|(arn, _)| !crate::observe::ours_elb(&tags, arn, cluster, uid))
        {
            Some((arn, name)) => {
                tracing::warn!(
                    kind,
                    arn,
                    "a create answered with a resource that is not ours: not used"
                );
                Err(ProviderError::Foreign { kind, name })
            }
            None => Ok(()),
        }
    }

    /// Waits for a change of the load balancer and records what it answered in what we
    /// observed; not found means the load balancer is gone.
    async fn changed_lb<R>(
        &mut self,
        sent: impl Future<Output = Result<R, AwsError>>,
        record: impl FnOnce(&mut ObservedLb, R),
    ) -> Result<(), ProviderError> {
        let resp = sent.await.gone("load balancer")?;
        if let Some(o) = &mut self.out.lb {
            record(o, resp);
        }
        Ok(())
    }

    async fn set_ip_address_type(&mut self) -> Result<(), ProviderError> {
        let (p, want) = (self.p, self.lb()?.ip_address_type);
        let req = p
            .elbv2
            .set_ip_address_type()
            .load_balancer_arn(self.lb_arn()?);
        let req = req.ip_address_type(elb::IpAddressType::from(want.as_aws()));
        let sent = p.calls.run("SetIpAddressType", || req.clone().send());
        self.changed_lb(sent, |o, resp| {
            o.ip_address_type = match resp.ip_address_type.as_ref() {
                Some(t) => convert::ip_address_type(Some(t)),
                None => want,
            };
        })
        .await
    }

    /// IPv6 source NAT on or off (SetSubnets, with the subnets the load balancer is in: only
    /// the source-NAT setting changes).
    /// IPv6 source NAT on or off, in the subnets the load balancer is in.
    async fn set_ipv6_source_nat(&mut self) -> Result<(), ProviderError> {
        let subnets = self
            .out
            .lb
            .as_ref()
            .map(|l| l.subnets.clone())
            .unwrap_or_default();
        if subnets.is_empty() {
            return Err(internal(
                "SetIpv6SourceNat: the load balancer's subnets are not known",
            ));
        }
        self.set_subnets(&subnets, false).await
    }

    /// Places the load balancer in exactly `subnets` (one SetSubnets), each with what the model
    /// gives for its position (EIP allocation, private address, source-NAT prefix), and IPv6
    /// source NAT as the model says. `moving`: the subnets change (the per-subnet lists must then
    /// name one entry per subnet, as at creation).
    async fn set_subnets(&mut self, subnets: &[String], moving: bool) -> Result<(), ProviderError> {
        let (p, lb) = (self.p, self.lb()?);
        let nat = lb.ipv6_source_nat.as_ref();
        source_nat_fits(nat, subnets)?;
        let n = subnets.len();
        let per_subnet = [
            ("EIP allocation ids", &lb.eip_allocations),
            ("private IPv4 addresses", &lb.private_ipv4_addresses),
        ];
        for (what, list) in per_subnet.iter().filter(|_| moving) {
            if !list.is_empty() && list.len() != n {
                return Err(ProviderError::InvalidConfig(format!(
                    "{} {what} given for {n} subnets ({}): give exactly one per subnet, in subnet order",
                    list.len(),
                    subnets.join(", ")
                )));
            }
        }
        let mappings = subnets
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let at = |list: &Vec<String>| list.get(i).filter(|_| moving).cloned();
                elb::SubnetMapping::builder()
                    .subnet_id(id)
                    .set_allocation_id(at(&lb.eip_allocations))
                    .set_private_ipv4_address(at(&lb.private_ipv4_addresses))
                    .set_source_nat_ipv6_prefix(nat.map(|n| n.prefix(i).to_string()))
                    .build()
            })
            .collect();
        let flag = match nat {
            Some(_) => elb::EnablePrefixForIpv6SourceNatEnum::On,
            None => elb::EnablePrefixForIpv6SourceNatEnum::Off,
        };
        let mut req = p
            .elbv2
            .set_subnets()
            .load_balancer_arn(self.lb_arn()?)
            .set_subnet_mappings(Some(mappings));
        // Said only when it matters: a load balancer that never had it is left without.
        let had_nat = self.out.lb.as_ref().and_then(|l| l.ipv6_source_nat);
        if nat.is_some() || had_nat == Some(true) || !moving {
            req = req.enable_prefix_for_ipv6_source_nat(flag);
        }
        let sent = p.calls.run("SetSubnets", || req.clone().send());
        let on = nat.is_some();
        let asked = subnets.to_vec();
        self.changed_lb(sent, |o, resp| {
            o.ipv6_source_nat = Some(
                resp.enable_prefix_for_ipv6_source_nat
                    .as_ref()
                    .map_or(on, |e| e.as_str() == "on"),
            );
            let zones = resp.availability_zones.unwrap_or_default();
            o.subnet_zones = convert::subnet_zones(&zones);
            o.subnets = zones.iter().filter_map(|z| z.subnet_id.clone()).collect();
            if o.subnets.is_empty() {
                o.subnets = asked;
            }
        })
        .await
    }

    async fn set_security_groups(&mut self) -> Result<(), ProviderError> {
        let (p, ids) = (self.p, self.security_groups()?);
        let req = p
            .elbv2
            .set_security_groups()
            .load_balancer_arn(self.lb_arn()?);
        let req = req.set_security_groups(Some(ids.clone()));
        let sent = p.calls.run("SetSecurityGroups", || req.clone().send());
        self.changed_lb(sent, |o, resp| {
            o.security_groups = resp.security_group_ids.unwrap_or(ids);
        })
        .await
    }

    async fn set_lb_attributes(
        &mut self,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let p = self.p;
        let list = attributes.iter().map(|(k, v)| {
            elb::LoadBalancerAttribute::builder()
                .key(k)
                .value(v)
                .build()
        });
        let req = p.elbv2.modify_load_balancer_attributes();
        let req = req
            .load_balancer_arn(self.lb_arn()?)
            .set_attributes(Some(list.collect()));
        let sent = p
            .calls
            .run("ModifyLoadBalancerAttributes", || req.clone().send());
        self.changed_lb(sent, |o, resp| {
            let reported = convert::lb_attributes(resp.attributes.as_deref().unwrap_or_default());
            merge_attributes(&mut o.attributes, reported, attributes);
        })
        .await
    }

    // ----------------------------------------------------------------- target groups

    async fn create_tg(&mut self, key: &str) -> Result<(), ProviderError> {
        let tg = self.target_group(key)?;
        let vpc = self.vpc().await?;
        let req = self
            .p
            .elbv2
            .create_target_group()
            .name(&tg.name)
            .protocol(elb::ProtocolEnum::from(tg.protocol.as_aws()))
            .port(i32::from(tg.port))
            .vpc_id(vpc)
            .target_type(elb::TargetTypeEnum::from(tg.target_type.as_aws()))
            .with_health_check(&tg.health_check)
            .set_tags(Some(elb_tags(&tg.tags)));
        // IPv4 is AWS's default: only IPv6 is said.
        let req = match tg.ip_family {
            IpFamily::Ipv4 => req,
            IpFamily::Ipv6 => req.ip_address_type(elb::TargetGroupIpAddressTypeEnum::Ipv6),
        };
        let sent = self.p.calls.run("CreateTargetGroup", || req.clone().send());
        let created = first(sent.await?.target_groups)
            .ok_or_else(|| unexpected("CreateTargetGroup", "no target group"))?;
        let arn = created
            .target_group_arn
            .clone()
            .ok_or_else(|| unexpected("CreateTargetGroup", "no TargetGroupArn"))?;
        // A new target group has the default attributes: no read needed (see create_lb).
        let attributes = defaults(&tg.attributes, |k| {
            cloudlb_core::plan::tg_attribute_default(k, tg)
        });
        let mut observed = convert::observed_tg(&created, attributes, BTreeSet::new())
            .ok_or_else(|| unexpected("CreateTargetGroup", "a target group cloudlb cannot read"))?;
        observed.tags = tags::user_tags(&tg.tags);
        self.out.target_groups.retain(|t| t.name != observed.name);
        self.out.target_groups.push(observed);
        self.unverified_tgs.push((arn.clone(), tg.name.clone()));
        self.tg_arns.insert(key.to_string(), arn);
        Ok(())
    }

    /// AWS answers a CreateTargetGroup for a name that exists (with the same settings) with the
    /// existing target group, and its answer says nothing of when that was made: before the
    /// first operation that would use or change a target group this run created, one
    /// DescribeTags (for all of them) checks that they carry our ownership tags. One that does
    /// not is [`ProviderError::Foreign`]: nothing is attached to it or changed on it.
    async fn verify_created_tgs(&mut self) -> Result<(), ProviderError> {
        if self.unverified_tgs.is_empty() {
            return Ok(());
        }
        let created = std::mem::take(&mut self.unverified_tgs);
        self.refuse_foreign("target group", created).await
    }

    /// Waits for a change of the target group `arn` and records what it answered in what we
    /// observed; not found means the target group is gone.
    async fn changed_tg<R>(
        &mut self,
        arn: &str,
        sent: impl Future<Output = Result<R, AwsError>>,
        record: impl FnOnce(&mut ObservedTargetGroup, R),
    ) -> Result<(), ProviderError> {
        let resp = sent.await.gone("target group")?;
        if let Some(o) = self.observed_tg_mut(arn) {
            record(o, resp);
        }
        Ok(())
    }

    async fn modify_health_check(&mut self, key: &str) -> Result<(), ProviderError> {
        let (p, want) = (self.p, &self.target_group(key)?.health_check);
        let arn = self.tg_arn(key)?;
        let req = p.elbv2.modify_target_group().target_group_arn(&arn);
        let req = req.with_health_check(want);
        let sent = p.calls.run("ModifyTargetGroup", || req.clone().send());
        self.changed_tg(&arn, sent, |o, resp| {
            let reported = first(resp.target_groups).map(|t| convert::health_check(&t));
            o.health_check = reported.unwrap_or_else(|| want.clone());
        })
        .await
    }

    async fn set_tg_attributes(
        &mut self,
        key: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let (p, arn) = (self.p, self.tg_arn(key)?);
        let list = attributes
            .iter()
            .map(|(k, v)| elb::TargetGroupAttribute::builder().key(k).value(v).build());
        let req = p.elbv2.modify_target_group_attributes();
        let req = req
            .target_group_arn(&arn)
            .set_attributes(Some(list.collect()));
        let sent = p
            .calls
            .run("ModifyTargetGroupAttributes", || req.clone().send());
        self.changed_tg(&arn, sent, |o, resp| {
            let reported = convert::tg_attributes(resp.attributes.as_deref().unwrap_or_default());
            merge_attributes(&mut o.attributes, reported, attributes);
        })
        .await
    }

    /// (De)registers `targets` in chunks of [`TARGETS_PER_CALL`].
    async fn change_targets(
        &mut self,
        key: &str,
        targets: &[Target],
        change: Change,
    ) -> Result<(), ProviderError> {
        let arn = self.tg_arn(key)?;
        let p = self.p;
        let outside_vpc =
            change == Change::Add && self.target_group(key)?.target_type == TargetType::Ip;
        let inside;
        let targets = if outside_vpc {
            let vpc = self.vpc().await?;
            let cidrs = p.vpc_cidrs(&vpc).await?;
            let (ok, outside): (Vec<Target>, Vec<Target>) = targets
                .iter()
                .cloned()
                .partition(|t| cidrs.iter().any(|c| c.contains(&t.id)));
            if !outside.is_empty() {
                let ids: Vec<String> = outside
                    .iter()
                    .map(|t| format!("{}:{}", t.id, t.port))
                    .collect();
                self.out.outside_vpc.extend(ids);
            }
            inside = ok;
            inside.as_slice()
        } else {
            targets
        };
        for chunk in targets.chunks(TARGETS_PER_CALL) {
            let members = Some(elb_targets(chunk));
            let sent = match change {
                Change::Add => {
                    let req = p.elbv2.register_targets().target_group_arn(&arn);
                    let req = req.set_targets(members);
                    let send = || req.clone().send();
                    p.calls.run("RegisterTargets", send).await.map(drop)
                }
                Change::Remove => {
                    let req = p.elbv2.deregister_targets().target_group_arn(&arn);
                    let req = req.set_targets(members);
                    let send = || req.clone().send();
                    p.calls.run("DeregisterTargets", send).await.map(drop)
                }
            };
            sent.map_err(|e| match (change, e.code.as_deref()) {
                // A target that no longer exists (a terminated instance): AWS has already taken
                // it out; the next observe shows the group without it.
                (Change::Remove, Some("InvalidTarget")) => e.vanished("target"),
                _ => e.gone("target group"),
            })?;
            if let Some(o) = self.observed_tg_mut(&arn) {
                change.apply_to(&mut o.targets, chunk);
            }
        }
        Ok(())
    }

    async fn delete_tg(&mut self, arn: &str) -> Result<(), ProviderError> {
        let p = self.p;
        let req = p.elbv2.delete_target_group().target_group_arn(arn);
        let sent = p.calls.run("DeleteTargetGroup", || req.clone().send());
        sent.await.found().in_use("target group")?;
        self.out.target_groups.retain(|t| t.arn != arn);
        self.tg_arns.retain(|_, v| v != arn);
        Ok(())
    }

    // ----------------------------------------------------------------- listeners

    async fn delete_listener(&mut self, arn: &str) -> Result<(), ProviderError> {
        let p = self.p;
        let req = p.elbv2.delete_listener().listener_arn(arn);
        let sent = p.calls.run("DeleteListener", || req.clone().send());
        sent.await.found().map_err(AwsError::into_provider)?;
        self.out.listeners.retain(|l| l.arn != arn);
        Ok(())
    }

    async fn modify_listener(&mut self, arn: &str, port: u16) -> Result<(), ProviderError> {
        let (p, want) = (self.p, self.listener(port)?);
        let tg_arn = self.tg_arn(&want.target_group)?;
        let req = p.elbv2.modify_listener().listener_arn(arn);
        let req = req.with_listener(want, &tg_arn);
        let sent = p.calls.run("ModifyListener", || req.clone().send());
        let resp = sent.await.gone("listener")?;
        let mut observed = answered_listener("ModifyListener", resp.listeners, want)?;
        let had = self.out.listeners.iter().find(|l| l.arn == arn);
        let before: Vec<String> = had
            .map(|l| l.certificates.iter().skip(1).cloned().collect())
            .unwrap_or_default();
        // A modify leaves the tags as they were.
        observed.tags = had.map(|l| l.tags.clone()).unwrap_or_default();
        self.sync_extra_certificates(arn, want, &before).await?;
        self.out.listeners.retain(|l| l.arn != arn);
        self.out.listeners.push(observed);
        Ok(())
    }

    async fn set_listener_attributes(
        &mut self,
        port: u16,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let p = self.p;
        let arn = self
            .out
            .listeners
            .iter()
            .find(|l| l.port == port)
            .map(|l| &l.arn);
        let arn = needed(arn, "a listener to set attributes on does not exist")?;
        let list = attributes
            .iter()
            .map(|(k, v)| elb::ListenerAttribute::builder().key(k).value(v).build());
        let req = p
            .elbv2
            .modify_listener_attributes()
            .listener_arn(&arn)
            .set_attributes(Some(list.collect()));
        let sent = p
            .calls
            .run("ModifyListenerAttributes", || req.clone().send());
        sent.await.gone("listener")?;
        if let Some(l) = self.out.listeners.iter_mut().find(|l| l.arn == arn) {
            l.attributes
                .extend(attributes.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Ok(())
    }

    async fn create_listener(&mut self, port: u16) -> Result<(), ProviderError> {
        let (p, lb) = (self.p, self.lb()?);
        let want = self.listener(port)?;
        let tg_arn = self.tg_arn(&want.target_group)?;
        let req = p.elbv2.create_listener().load_balancer_arn(self.lb_arn()?);
        let req = req
            .with_listener(want, &tg_arn)
            .set_tags(Some(elb_tags(&lb.tags)));
        let sent = p.calls.run("CreateListener", || req.clone().send());
        let resp = sent.await.gone("load balancer")?;
        let mut observed = answered_listener("CreateListener", resp.listeners, want)?;
        observed.tags = tags::user_tags(&lb.tags);
        self.sync_extra_certificates(&observed.arn, want, &[])
            .await?;
        self.out.listeners.retain(|l| l.port != port);
        self.out.listeners.push(observed);
        Ok(())
    }

    /// Certificates beyond the default one are added to / removed from the listener's list.
    async fn sync_extra_certificates(
        &self,
        listener_arn: &str,
        want: &Listener,
        have_extra: &[String],
    ) -> Result<(), ProviderError> {
        let default = want.certificates.first();
        let want_extra: Vec<&String> = want
            .certificates
            .iter()
            .skip(1)
            .filter(|c| Some(*c) != default)
            .collect();
        let add: Vec<elb::Certificate> = want_extra
            .iter()
            .filter(|c| !have_extra.contains(c))
            .map(|c| certificate(c))
            .collect();
        let remove: Vec<elb::Certificate> = have_extra
            .iter()
            .filter(|c| !want_extra.contains(c) && Some(*c) != default)
            .map(|c| certificate(c))
            .collect();
        self.change_certificates(listener_arn, add, Change::Add)
            .await?;
        self.change_certificates(listener_arn, remove, Change::Remove)
            .await
    }

    /// Adds `certificates` to / removes them from the list of the listener `arn`; removing one
    /// that is not there (any more) is done.
    async fn change_certificates(
        &self,
        arn: &str,
        certificates: Vec<elb::Certificate>,
        change: Change,
    ) -> Result<(), ProviderError> {
        if certificates.is_empty() {
            return Ok(());
        }
        let (p, certificates) = (self.p, Some(certificates));
        let sent = match change {
            Change::Add => {
                let req = p.elbv2.add_listener_certificates().listener_arn(arn);
                let req = req.set_certificates(certificates);
                let send = || req.clone().send();
                p.calls.run("AddListenerCertificates", send).await.map(drop)
            }
            Change::Remove => {
                let req = p.elbv2.remove_listener_certificates().listener_arn(arn);
                let req = req.set_certificates(certificates);
                let send = || req.clone().send();
                p.calls
                    .run("RemoveListenerCertificates", send)
                    .await
                    .map(drop)
            }
        };
        match sent {
            Ok(()) => Ok(()),
            Err(e)
                if change == Change::Remove
                    && e.kind == ErrorKind::NotFound
                    && e.code.as_deref() != Some("ListenerNotFound") =>
            {
                Ok(())
            }
            Err(e) => Err(e.gone("listener")),
        }
    }
}

/// Whether `op` attaches, registers with or changes a target group.
fn uses_target_groups(op: &Op) -> bool {
    matches!(
        op,
        Op::ModifyHealthCheck { .. }
            | Op::SetTargetGroupAttributes { .. }
            | Op::RegisterTargets { .. }
            | Op::DeregisterTargets { .. }
            | Op::CreateListener { .. }
            | Op::ModifyListener { .. }
    )
}

fn unix_millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Source-NAT prefixes given one per subnet must match the subnets the load balancer is in
/// (known only once discovered): refused before the write otherwise.
fn source_nat_fits(nat: Option<&SourceNat>, subnets: &[String]) -> Result<(), ProviderError> {
    match nat {
        Some(n) if !n.prefixes.is_empty() && n.prefixes.len() != subnets.len() => {
            Err(ProviderError::InvalidConfig(format!(
                "{} source-NAT IPv6 prefixes (source-nat-ipv6-prefixes) given for {} subnets ({}): give exactly one per subnet, in subnet order",
                n.prefixes.len(),
                subnets.len(),
                subnets.join(", ")
            )))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_prefers_reported_values() {
        let mut into: BTreeMap<String, String> = [("a", "1"), ("b", "2"), ("c", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let reported = [("b".to_string(), "20".to_string())].into_iter().collect();
        let requested = [("b", "twenty"), ("c", "30")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        merge_attributes(&mut into, reported, &requested);
        assert_eq!(into["a"], "1");
        assert_eq!(into["b"], "20");
        assert_eq!(into["c"], "30");
    }
}
