//! Execute a plan, op by op, and build the resulting [`Observed`] from the desired model, the
//! observed state and the create/modify responses, without re-reading. The only reads are the
//! attributes of a resource just created (its defaults are not in the create response), and the
//! subnets (cached) when a new load balancer, security group or target group needs them.

use super::AwsProvider;
use super::convert::{self, desired_certificates, elb_tags};
use super::error::{AwsError, ErrorKind};
use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::model::{
    Desired, HealthCheckProtocol, IngressRule, Listener, LoadBalancer, Target, TargetGroup,
};
use cloudlb_core::plan::{Op, Plan};
use cloudlb_core::provider::{Observed, ObservedListener, ObservedTargetGroup, ProviderError};
use std::collections::{BTreeMap, BTreeSet};

/// Targets per (De)RegisterTargets call.
const TARGETS_PER_CALL: usize = 500;

impl AwsProvider {
    pub(crate) async fn apply_impl(
        &self,
        desired: &Desired,
        observed: &Observed,
        plan: &Plan,
    ) -> Result<Observed, ProviderError> {
        let mut run = Run::new(self, desired, observed);
        for op in &plan.ops {
            tracing::debug!(?op, "applying");
            run.op(op).await?;
        }
        Ok(run.finish())
    }
}

struct Run<'a> {
    p: &'a AwsProvider,
    desired: &'a Desired,
    /// What exists, updated after every op.
    out: Observed,
    /// Target-group key → ARN.
    tg_arns: BTreeMap<String, String>,
    vpc_id: Option<String>,
}

fn internal(what: impl std::fmt::Display) -> ProviderError {
    ProviderError::InvalidConfig(format!("internal error (plan and model disagree): {what}"))
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

/// Deletes are idempotent: already gone is done.
fn gone_is_ok<T>(r: Result<T, AwsError>) -> Result<Option<T>, AwsError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
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
        self.out
            .lb
            .as_ref()
            .map(|l| l.arn.clone())
            .ok_or_else(|| internal("an operation needs the load balancer, which does not exist"))
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
        self.out
            .security_group
            .as_ref()
            .map(|s| s.id.clone())
            .ok_or_else(|| internal("the frontend security group does not exist"))
    }

    /// Our frontend group (when the model wants one) plus the user's.
    fn security_groups(&self) -> Result<Vec<String>, ProviderError> {
        let lb = self.lb()?;
        let mut ids = Vec::new();
        if lb.security.frontend.is_some() {
            ids.push(self.sg_id()?);
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
        match op {
            Op::CreateSecurityGroup => self.create_security_group().await,
            Op::SetAlgorithm { key, .. } => Err(ProviderError::InvalidConfig(format!(
                "SetAlgorithm ({key}) is an operation of the local provider; the AWS provider does not plan it"
            ))),
            Op::AuthorizeIngress { rules } => self.authorize(rules).await,
            Op::RevokeIngress { rules } => self.revoke(rules).await,
            Op::DeleteLoadBalancer { arn, name, reason } => self.delete_lb(arn, name, reason).await,
            Op::CreateLoadBalancer => self.create_lb().await,
            Op::SetIpAddressType => self.set_ip_address_type().await,
            Op::SetSecurityGroups => self.set_security_groups().await,
            Op::SetLoadBalancerAttributes { attributes } => {
                self.set_lb_attributes(attributes).await
            }
            Op::CreateTargetGroup { key } => self.create_tg(key).await,
            Op::ModifyHealthCheck { key } => self.modify_health_check(key).await,
            Op::SetTargetGroupAttributes { key, attributes } => {
                self.set_tg_attributes(key, attributes).await
            }
            Op::DeregisterTargets { key, targets } => self.deregister(key, targets).await,
            Op::RegisterTargets { key, targets } => self.register(key, targets).await,
            Op::DeleteListener { arn, .. } => self.delete_listener(arn).await,
            Op::ModifyListener { arn, port } => self.modify_listener(arn, *port).await,
            Op::CreateListener { port } => self.create_listener(*port).await,
            Op::DeleteTargetGroup { arn, .. } => self.delete_tg(arn).await,
            Op::DeleteSecurityGroup { id } => self.delete_security_group(id).await,
        }
    }

    // ----------------------------------------------------------------- security group

    async fn create_security_group(&mut self) -> Result<(), ProviderError> {
        let lb = self.lb()?;
        let frontend = lb.security.frontend.as_ref().ok_or_else(|| {
            internal("CreateSecurityGroup without a frontend security group in the model")
        })?;
        let vpc = self.vpc().await?;
        let mut tags = lb.tags.clone();
        tags.insert("Name".into(), frontend.name.clone());
        let p = self.p;
        let id = p
            .ec2
            .create_security_group(&p.calls, &frontend.name, &frontend.description, &vpc, &tags)
            .await?
            .ok_or_else(|| unexpected("CreateSecurityGroup", "no GroupId"))?;
        self.out.security_group = Some(cloudlb_core::provider::ObservedSecurityGroup {
            id,
            name: frontend.name.clone(),
            ingress: BTreeSet::new(),
        });
        Ok(())
    }

    async fn authorize(&mut self, rules: &[IngressRule]) -> Result<(), ProviderError> {
        if rules.is_empty() {
            return Ok(());
        }
        let id = self.sg_id()?;
        let p = self.p;
        p.ec2
            .authorize_ingress(&p.calls, &id, rules)
            .await
            .map_err(|e| e.gone("security group"))?;
        if let Some(sg) = &mut self.out.security_group {
            sg.ingress.extend(rules.iter().cloned());
        }
        Ok(())
    }

    async fn revoke(&mut self, rules: &[IngressRule]) -> Result<(), ProviderError> {
        if rules.is_empty() {
            return Ok(());
        }
        let id = self.sg_id()?;
        let p = self.p;
        p.ec2
            .revoke_ingress(&p.calls, &id, rules)
            .await
            .map_err(|e| e.gone("security group"))?;
        if let Some(sg) = &mut self.out.security_group {
            for r in rules {
                sg.ingress.remove(r);
            }
        }
        Ok(())
    }

    async fn delete_security_group(&mut self, id: &str) -> Result<(), ProviderError> {
        let p = self.p;
        gone_is_ok(p.ec2.delete_security_group(&p.calls, id).await)
            .map_err(|e| e.in_use("security group"))?;
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
        let req = self.p.elbv2.delete_load_balancer().load_balancer_arn(arn);
        match gone_is_ok(
            self.p
                .calls
                .run("DeleteLoadBalancer", || req.clone().send())
                .await,
        ) {
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
        if lb.eip_allocations.is_empty() && lb.private_ipv4_addresses.is_empty() {
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
                        .build()
                })
                .collect();
            req = req.set_subnet_mappings(Some(mappings));
        }
        let resp = self
            .p
            .calls
            .run("CreateLoadBalancer", || req.clone().send())
            .await?;
        let created = resp
            .load_balancers
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| unexpected("CreateLoadBalancer", "no load balancer"))?;
        if created.load_balancer_arn.is_none() {
            return Err(unexpected("CreateLoadBalancer", "no LoadBalancerArn"));
        }
        // A new load balancer has the default attributes: no read needed. Only the keys the
        // model manages matter to the planner; a later SetLoadBalancerAttributes merges in.
        let attributes = self
            .lb()?
            .attributes
            .keys()
            .filter_map(|k| {
                cloudlb_core::plan::lb_attribute_default(k).map(|v| (k.clone(), v.to_string()))
            })
            .collect();
        self.out.lb = convert::observed_lb(&created, attributes);
        self.out.listeners.clear();
        Ok(())
    }

    async fn set_ip_address_type(&mut self) -> Result<(), ProviderError> {
        let lb = self.lb()?;
        let req = self
            .p
            .elbv2
            .set_ip_address_type()
            .load_balancer_arn(self.lb_arn()?)
            .ip_address_type(elb::IpAddressType::from(lb.ip_address_type.as_aws()));
        let resp = self
            .p
            .calls
            .run("SetIpAddressType", || req.clone().send())
            .await
            .map_err(|e| e.gone("load balancer"))?;
        if let Some(o) = &mut self.out.lb {
            o.ip_address_type = match resp.ip_address_type.as_ref() {
                Some(t) => convert::ip_address_type(Some(t)),
                None => lb.ip_address_type,
            };
        }
        Ok(())
    }

    async fn set_security_groups(&mut self) -> Result<(), ProviderError> {
        let ids = self.security_groups()?;
        let req = self
            .p
            .elbv2
            .set_security_groups()
            .load_balancer_arn(self.lb_arn()?)
            .set_security_groups(Some(ids.clone()));
        let resp = self
            .p
            .calls
            .run("SetSecurityGroups", || req.clone().send())
            .await
            .map_err(|e| e.gone("load balancer"))?;
        if let Some(o) = &mut self.out.lb {
            o.security_groups = resp.security_group_ids.unwrap_or(ids);
        }
        Ok(())
    }

    async fn set_lb_attributes(
        &mut self,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let req = self
            .p
            .elbv2
            .modify_load_balancer_attributes()
            .load_balancer_arn(self.lb_arn()?)
            .set_attributes(Some(
                attributes
                    .iter()
                    .map(|(k, v)| {
                        elb::LoadBalancerAttribute::builder()
                            .key(k)
                            .value(v)
                            .build()
                    })
                    .collect(),
            ));
        let resp = self
            .p
            .calls
            .run("ModifyLoadBalancerAttributes", || req.clone().send())
            .await
            .map_err(|e| e.gone("load balancer"))?;
        let reported = convert::lb_attributes(resp.attributes.as_deref().unwrap_or_default());
        if let Some(o) = &mut self.out.lb {
            merge_attributes(&mut o.attributes, reported, attributes);
        }
        Ok(())
    }

    // ----------------------------------------------------------------- target groups

    async fn create_tg(&mut self, key: &str) -> Result<(), ProviderError> {
        let tg = self.target_group(key)?;
        let vpc = self.vpc().await?;
        let hc = &tg.health_check;
        let http = hc.protocol != HealthCheckProtocol::Tcp;
        let req = self
            .p
            .elbv2
            .create_target_group()
            .name(&tg.name)
            .protocol(elb::ProtocolEnum::from(tg.protocol.as_aws()))
            .port(i32::from(tg.port))
            .vpc_id(vpc)
            .target_type(elb::TargetTypeEnum::from(tg.target_type.as_aws()))
            .health_check_enabled(true)
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
            .set_tags(Some(elb_tags(&tg.tags)));
        let resp = self
            .p
            .calls
            .run("CreateTargetGroup", || req.clone().send())
            .await?;
        let created = resp
            .target_groups
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| unexpected("CreateTargetGroup", "no target group"))?;
        let arn = created
            .target_group_arn
            .clone()
            .ok_or_else(|| unexpected("CreateTargetGroup", "no TargetGroupArn"))?;
        // A new target group has the default attributes: no read needed (see create_lb).
        let tg = self.target_group(key)?;
        let attributes = tg
            .attributes
            .keys()
            .filter_map(|k| {
                cloudlb_core::plan::tg_attribute_default(k, tg).map(|v| (k.clone(), v.to_string()))
            })
            .collect();
        let observed = convert::observed_tg(&created, attributes, BTreeSet::new())
            .ok_or_else(|| unexpected("CreateTargetGroup", "a target group cloudlb cannot read"))?;
        self.out.target_groups.retain(|t| t.name != observed.name);
        self.out.target_groups.push(observed);
        self.tg_arns.insert(key.to_string(), arn);
        Ok(())
    }

    async fn modify_health_check(&mut self, key: &str) -> Result<(), ProviderError> {
        let tg = self.target_group(key)?;
        let arn = self.tg_arn(key)?;
        let hc = &tg.health_check;
        let http = hc.protocol != HealthCheckProtocol::Tcp;
        let req = self
            .p
            .elbv2
            .modify_target_group()
            .target_group_arn(&arn)
            .health_check_enabled(true)
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
            );
        let resp = self
            .p
            .calls
            .run("ModifyTargetGroup", || req.clone().send())
            .await
            .map_err(|e| e.gone("target group"))?;
        let reported = resp
            .target_groups
            .into_iter()
            .flatten()
            .next()
            .map(|t| convert::health_check(&t));
        if let Some(o) = self.observed_tg_mut(&arn) {
            o.health_check = reported.unwrap_or_else(|| hc.clone());
        }
        Ok(())
    }

    async fn set_tg_attributes(
        &mut self,
        key: &str,
        attributes: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        let arn = self.tg_arn(key)?;
        let req = self
            .p
            .elbv2
            .modify_target_group_attributes()
            .target_group_arn(&arn)
            .set_attributes(Some(
                attributes
                    .iter()
                    .map(|(k, v)| elb::TargetGroupAttribute::builder().key(k).value(v).build())
                    .collect(),
            ));
        let resp = self
            .p
            .calls
            .run("ModifyTargetGroupAttributes", || req.clone().send())
            .await
            .map_err(|e| e.gone("target group"))?;
        let reported = convert::tg_attributes(resp.attributes.as_deref().unwrap_or_default());
        if let Some(o) = self.observed_tg_mut(&arn) {
            merge_attributes(&mut o.attributes, reported, attributes);
        }
        Ok(())
    }

    async fn deregister(&mut self, key: &str, targets: &[Target]) -> Result<(), ProviderError> {
        let arn = self.tg_arn(key)?;
        for chunk in targets.chunks(TARGETS_PER_CALL) {
            let req = self
                .p
                .elbv2
                .deregister_targets()
                .target_group_arn(&arn)
                .set_targets(Some(elb_targets(chunk)));
            self.p
                .calls
                .run("DeregisterTargets", || req.clone().send())
                .await
                .map_err(|e| match e.code.as_deref() {
                    // Already not registered.
                    Some("InvalidTarget") => e.gone("target"),
                    _ => e.gone("target group"),
                })?;
            if let Some(o) = self.observed_tg_mut(&arn) {
                for t in chunk {
                    o.targets.remove(t);
                }
            }
        }
        Ok(())
    }

    async fn register(&mut self, key: &str, targets: &[Target]) -> Result<(), ProviderError> {
        let arn = self.tg_arn(key)?;
        for chunk in targets.chunks(TARGETS_PER_CALL) {
            let req = self
                .p
                .elbv2
                .register_targets()
                .target_group_arn(&arn)
                .set_targets(Some(elb_targets(chunk)));
            self.p
                .calls
                .run("RegisterTargets", || req.clone().send())
                .await
                .map_err(|e| e.gone("target group"))?;
            if let Some(o) = self.observed_tg_mut(&arn) {
                o.targets.extend(chunk.iter().cloned());
            }
        }
        Ok(())
    }

    async fn delete_tg(&mut self, arn: &str) -> Result<(), ProviderError> {
        let req = self.p.elbv2.delete_target_group().target_group_arn(arn);
        gone_is_ok(
            self.p
                .calls
                .run("DeleteTargetGroup", || req.clone().send())
                .await,
        )
        .map_err(|e| e.in_use("target group"))?;
        self.out.target_groups.retain(|t| t.arn != arn);
        self.tg_arns.retain(|_, v| v != arn);
        Ok(())
    }

    // ----------------------------------------------------------------- listeners

    async fn delete_listener(&mut self, arn: &str) -> Result<(), ProviderError> {
        let req = self.p.elbv2.delete_listener().listener_arn(arn);
        gone_is_ok(
            self.p
                .calls
                .run("DeleteListener", || req.clone().send())
                .await,
        )
        .map_err(AwsError::into_provider)?;
        self.out.listeners.retain(|l| l.arn != arn);
        Ok(())
    }

    async fn modify_listener(&mut self, arn: &str, port: u16) -> Result<(), ProviderError> {
        let want = self.listener(port)?;
        let tg_arn = self.tg_arn(&want.target_group)?;
        let req = self
            .p
            .elbv2
            .modify_listener()
            .listener_arn(arn)
            .port(i32::from(port))
            .protocol(elb::ProtocolEnum::from(want.protocol.as_aws()))
            .default_actions(forward(&tg_arn))
            .set_certificates(want.certificates.first().map(|c| vec![certificate(c)]))
            .set_ssl_policy(want.ssl_policy.clone());
        let resp = self
            .p
            .calls
            .run("ModifyListener", || req.clone().send())
            .await
            .map_err(|e| e.gone("listener"))?;
        let listener = resp
            .listeners
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| unexpected("ModifyListener", "no listener"))?;
        let before: Vec<String> = self
            .out
            .listeners
            .iter()
            .find(|l| l.arn == arn)
            .map(|l| l.certificates.iter().skip(1).cloned().collect())
            .unwrap_or_default();
        self.sync_extra_certificates(arn, want, &before).await?;
        let mut observed = convert::observed_listener(&listener, None)
            .ok_or_else(|| unexpected("ModifyListener", "a listener cloudlb cannot read"))?;
        if !want.certificates.is_empty() {
            observed.certificates = desired_certificates(&want.certificates);
        }
        self.out.listeners.retain(|l| l.arn != arn);
        self.out.listeners.push(observed);
        Ok(())
    }

    async fn create_listener(&mut self, port: u16) -> Result<(), ProviderError> {
        let lb = self.lb()?;
        let want = self.listener(port)?;
        let tg_arn = self.tg_arn(&want.target_group)?;
        let req = self
            .p
            .elbv2
            .create_listener()
            .load_balancer_arn(self.lb_arn()?)
            .port(i32::from(port))
            .protocol(elb::ProtocolEnum::from(want.protocol.as_aws()))
            .default_actions(forward(&tg_arn))
            .set_certificates(want.certificates.first().map(|c| vec![certificate(c)]))
            .set_ssl_policy(want.ssl_policy.clone())
            .set_tags(Some(elb_tags(&lb.tags)));
        let resp = self
            .p
            .calls
            .run("CreateListener", || req.clone().send())
            .await
            .map_err(|e| e.gone("load balancer"))?;
        let listener = resp
            .listeners
            .into_iter()
            .flatten()
            .next()
            .ok_or_else(|| unexpected("CreateListener", "no listener"))?;
        let mut observed: ObservedListener = convert::observed_listener(&listener, None)
            .ok_or_else(|| unexpected("CreateListener", "a listener cloudlb cannot read"))?;
        self.sync_extra_certificates(&observed.arn, want, &[])
            .await?;
        if !want.certificates.is_empty() {
            observed.certificates = desired_certificates(&want.certificates);
        }
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
        if !add.is_empty() {
            let req = self
                .p
                .elbv2
                .add_listener_certificates()
                .listener_arn(listener_arn)
                .set_certificates(Some(add));
            self.p
                .calls
                .run("AddListenerCertificates", || req.clone().send())
                .await
                .map_err(|e| e.gone("listener"))?;
        }
        if !remove.is_empty() {
            let req = self
                .p
                .elbv2
                .remove_listener_certificates()
                .listener_arn(listener_arn)
                .set_certificates(Some(remove));
            match self
                .p
                .calls
                .run("RemoveListenerCertificates", || req.clone().send())
                .await
            {
                Ok(_) => {}
                Err(e)
                    if e.kind == ErrorKind::NotFound
                        && e.code.as_deref() != Some("ListenerNotFound") => {}
                Err(e) => return Err(e.gone("listener")),
            }
        }
        Ok(())
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
