//! Read what exists for one Service: the NLB found by name, its listeners and target groups
//! (attached ones, plus desired ones found by name: created before a crash, not yet attached),
//! and the frontend security group found by name. Everything is checked for our ownership tags.

use super::AwsProvider;
use super::convert::{self, is_ours, tag_map_elb};
use super::ec2::Filter;
use super::error::{AwsError, CallResult};
use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::model::{Desired, Target, naming, tags};
use cloudlb_core::provider::{Observed, ObservedSecurityGroup, ObservedTargetGroup, ProviderError};
use std::collections::{BTreeMap, BTreeSet};

/// Attributes by key.
type Attributes = BTreeMap<String, String>;

/// DescribeTags takes at most 20 ARNs.
const TAGS_BATCH: usize = 20;

impl AwsProvider {
    pub(crate) async fn observe_impl(&self, desired: &Desired) -> Result<Observed, ProviderError> {
        // The empty model deletes only what is ours; a foreign resource of the same name is left
        // alone without blocking the Service's deletion.
        let deleting = desired.lb.is_none();
        let mut observed = Observed::default();

        // 1. The load balancer, by name.
        let found = self.find_lb(desired, deleting).await?;
        let mut attached: Vec<elb::TargetGroup> = Vec::new();
        let lb = found.as_ref().map(|(lb, _)| lb);
        if let Some((lb, lb_tags)) = &found {
            let arn = lb.load_balancer_arn.clone().unwrap_or_default();
            observed.lb = convert::observed_lb(lb, self.lb_attributes(&arn).await?);
            if let Some(l) = observed.lb.as_mut() {
                l.tags = tags::user_tags(lb_tags);
            }
            observed.listeners = self.describe_listeners(&arn, true).await?;
            self.read_listener_attributes(desired, &mut observed.listeners)
                .await?;
            attached = self.describe_attached_target_groups(&arn).await?;
        }

        // The backend group, once per process, if the load balancer may carry it: the plan
        // must know it to tell whether it is attached (a restart must not re-attach it).
        let wants_backend = desired
            .lb
            .as_ref()
            .is_some_and(|l| l.security.backend.is_some());
        if wants_backend && observed.lb.is_some() && self.backend_group_id().is_none() {
            self.find_backend_group().await?;
        }
        // Where the load balancer should be, so the plan can move it (cached).
        if let (Some(want), Some(_)) = (&desired.lb, &observed.lb) {
            self.learn_placement(want).await?;
        }

        // 2. Target groups: attached, plus desired ones by name (and the listeners' tags, read
        // with theirs).
        observed.target_groups = self
            .find_target_groups(desired, attached, &mut observed.listeners, deleting)
            .await?;

        // 3. The frontend security group, by name.
        let vpc = self
            .settings
            .vpc_id
            .clone()
            .or_else(|| lb.and_then(|l| l.vpc_id.clone()));
        observed.security_group = self.find_security_group(desired, vpc, deleting).await?;

        observed
            .listeners
            .sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.arn.cmp(&b.arn)));
        observed
            .target_groups
            .sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.arn.cmp(&b.arn)));
        Ok(observed)
    }

    /// Our target groups among those `attached` to the load balancer and those the model wants
    /// (by name), read in full. A wanted name held by a group without our tags is
    /// [`ProviderError::Foreign`] (unless deleting). The tags of `listeners` are read in the
    /// same DescribeTags calls (unless deleting: the empty model does not need them).
    async fn find_target_groups(
        &self,
        desired: &Desired,
        attached: Vec<elb::TargetGroup>,
        listeners: &mut [cloudlb_core::provider::ObservedListener],
        deleting: bool,
    ) -> Result<Vec<ObservedTargetGroup>, ProviderError> {
        let wanted: Vec<&str> = desired
            .lb
            .iter()
            .flat_map(|lb| lb.target_groups.iter().map(|t| t.name.as_str()))
            .collect();
        let mut candidates = attached;
        for name in &wanted {
            if candidates
                .iter()
                .any(|t| t.target_group_name.as_deref() == Some(*name))
            {
                continue;
            }
            let resp = self
                .calls
                .run("DescribeTargetGroups", || {
                    self.elbv2.describe_target_groups().names(*name).send()
                })
                .await;
            match resp {
                Ok(out) => candidates.extend(
                    out.target_groups
                        .into_iter()
                        .flatten()
                        .filter(|t| t.target_group_name.as_deref() == Some(*name)),
                ),
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        let listener_arns = listeners
            .iter()
            .filter(|_| !deleting)
            .map(|l| l.arn.clone());
        let arns: Vec<String> = candidates
            .iter()
            .filter_map(|t| t.target_group_arn.clone())
            .chain(listener_arns)
            .collect();
        let tags = self.describe_tags(&arns).await?;
        for l in listeners.iter_mut() {
            if let Some(t) = tags.get(&l.arn) {
                l.tags = tags::user_tags(t);
            }
        }
        let mut ours = Vec::new();
        for tg in candidates {
            let (Some(arn), Some(name)) =
                (tg.target_group_arn.clone(), tg.target_group_name.clone())
            else {
                continue;
            };
            if ours_elb(&tags, &arn, &self.settings.cluster, &desired.service.uid) {
                ours.push(tg);
            } else if wanted.contains(&name.as_str()) && !deleting {
                return Err(ProviderError::Foreign {
                    kind: "target group",
                    name,
                });
            } else {
                tracing::debug!(target_group = %name, "target group without our tags: ignored");
            }
        }
        let read = ours.iter().map(|tg| self.read_target_group(tg));
        let mut observed: Vec<ObservedTargetGroup> = futures::future::try_join_all(read)
            .await?
            .into_iter()
            .flatten()
            .collect();
        for tg in &mut observed {
            if let Some(t) = tags.get(&tg.arn) {
                tg.tags = tags::user_tags(t);
            }
        }
        Ok(observed)
    }

    /// The load balancer named `desired.lb_name` that is ours. Several of that name can exist
    /// (emulators do not reject a second create): ours wins.
    async fn find_lb(
        &self,
        desired: &Desired,
        deleting: bool,
    ) -> Result<Option<(elb::LoadBalancer, BTreeMap<String, String>)>, ProviderError> {
        let name = desired.lb_name.as_str();
        let resp = self
            .calls
            .run("DescribeLoadBalancers", || {
                self.elbv2.describe_load_balancers().names(name).send()
            })
            .await;
        let found: Vec<elb::LoadBalancer> = match resp {
            Ok(out) => out
                .load_balancers
                .into_iter()
                .flatten()
                .filter(|lb| {
                    lb.load_balancer_name.as_deref() == Some(name) && lb.load_balancer_arn.is_some()
                })
                .collect(),
            Err(e) if e.is_not_found() => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        if found.is_empty() {
            return Ok(None);
        }
        let arns: Vec<String> = found
            .iter()
            .filter_map(|l| l.load_balancer_arn.clone())
            .collect();
        let mut tags = self.describe_tags(&arns).await?;
        let mut ours = found.into_iter().filter_map(|lb| {
            let arn = lb.load_balancer_arn.clone()?;
            ours_elb(&tags, &arn, &self.settings.cluster, &desired.service.uid).then_some((arn, lb))
        });
        match ours.next() {
            Some((arn, lb)) => {
                if ours.next().is_some() {
                    tracing::warn!(
                        load_balancer = name,
                        "several load balancers of this name carry our tags; using the first"
                    );
                }
                drop(ours);
                let lb_tags = tags.remove(&arn).unwrap_or_default();
                Ok(Some((lb, lb_tags)))
            }
            None if deleting => {
                tracing::info!(
                    load_balancer = name,
                    "a load balancer of this name exists but is not ours: left alone"
                );
                Ok(None)
            }
            None => Err(ProviderError::Foreign {
                kind: "load balancer",
                name: name.to_string(),
            }),
        }
    }

    /// Tags by ARN, in batches of 20 (load balancers and target groups may be mixed). A resource
    /// deleted meanwhile has no entry, so it is not ours.
    pub(crate) async fn describe_tags(
        &self,
        arns: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, ProviderError> {
        let mut out = BTreeMap::new();
        for chunk in arns.chunks(TAGS_BATCH) {
            if self.describe_tags_batch(chunk, &mut out).await? || chunk.len() == 1 {
                continue;
            }
            // AWS fails the whole batch when one ARN is gone: ask for the others one by one,
            // so one deletion does not hide the tags (and the ownership) of 19 other resources.
            for arn in chunk {
                self.describe_tags_batch(std::slice::from_ref(arn), &mut out)
                    .await?;
            }
        }
        Ok(out)
    }

    /// One DescribeTags call; `false` when it failed with NotFound.
    async fn describe_tags_batch(
        &self,
        arns: &[String],
        out: &mut BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<bool, ProviderError> {
        let resp = self
            .calls
            .run("DescribeTags", || {
                self.elbv2
                    .describe_tags()
                    .set_resource_arns(Some(arns.to_vec()))
                    .send()
            })
            .await;
        match resp {
            Ok(resp) => {
                for d in resp.tag_descriptions.into_iter().flatten() {
                    if let Some(arn) = d.resource_arn {
                        out.insert(arn, tag_map_elb(d.tags.as_deref().unwrap_or_default()));
                    }
                }
                Ok(true)
            }
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The listeners of a load balancer. `all_certificates`: list every certificate of a TLS
    /// listener (one more call per TLS listener); otherwise only the default one is known.
    pub(super) async fn describe_listeners(
        &self,
        lb_arn: &str,
        all_certificates: bool,
    ) -> Result<Vec<cloudlb_core::provider::ObservedListener>, ProviderError> {
        let req = self.elbv2.describe_listeners().load_balancer_arn(lb_arn);
        let listeners = self.calls.pages("DescribeListeners", true, req).await?;
        let mut out = Vec::with_capacity(listeners.len());
        for l in &listeners {
            // Only the default certificate is in the listener description: list them all.
            let all_certs = if all_certificates
                && l.protocol.as_ref().is_some_and(|p| p.as_str() == "TLS")
                && l.certificates.as_ref().is_some_and(|c| !c.is_empty())
            {
                Some(
                    self.describe_listener_certificates(
                        l.listener_arn.as_deref().unwrap_or_default(),
                    )
                    .await?,
                )
            } else {
                None
            };
            match convert::observed_listener(l, all_certs.as_deref()) {
                Some(o) => out.push(o),
                None => tracing::warn!(
                    listener = l.listener_arn.as_deref().unwrap_or_default(),
                    "listener with a protocol or port cloudlb does not manage: ignored"
                ),
            }
        }
        Ok(out)
    }

    /// The attributes of the listeners the model sets attributes on (one read each; none for
    /// the others, whose attributes are left as they are).
    async fn read_listener_attributes(
        &self,
        desired: &Desired,
        listeners: &mut [cloudlb_core::provider::ObservedListener],
    ) -> Result<(), ProviderError> {
        let Some(want) = &desired.lb else {
            return Ok(());
        };
        for l in listeners.iter_mut() {
            let sets = want
                .listeners
                .iter()
                .any(|w| w.port == l.port && !w.attributes.is_empty());
            if !sets {
                continue;
            }
            let req = self
                .elbv2
                .describe_listener_attributes()
                .listener_arn(&l.arn);
            let resp = self
                .calls
                .run("DescribeListenerAttributes", || req.clone().send())
                .await?;
            l.attributes = convert::listener_attributes(resp.attributes());
        }
        Ok(())
    }

    async fn describe_listener_certificates(
        &self,
        listener_arn: &str,
    ) -> Result<Vec<elb::Certificate>, ProviderError> {
        let req = self.elbv2.describe_listener_certificates();
        let req = req.listener_arn(listener_arn);
        Ok(self
            .calls
            .pages("DescribeListenerCertificates", false, req)
            .await?)
    }

    async fn describe_attached_target_groups(
        &self,
        lb_arn: &str,
    ) -> Result<Vec<elb::TargetGroup>, ProviderError> {
        // AWS returns an empty list; moto says TargetGroupNotFound.
        let req = self
            .elbv2
            .describe_target_groups()
            .load_balancer_arn(lb_arn);
        Ok(self.calls.pages("DescribeTargetGroups", true, req).await?)
    }

    /// The attributes of the load balancer `arn`.
    pub(super) async fn lb_attributes(&self, arn: &str) -> Result<Attributes, AwsError> {
        let req = self.elbv2.describe_load_balancer_attributes();
        let req = req.load_balancer_arn(arn);
        let send = || req.clone().send();
        let resp = self.calls.run("DescribeLoadBalancerAttributes", send);
        Ok(convert::lb_attributes(resp.await?.attributes()))
    }

    async fn tg_attributes(&self, arn: &str) -> Result<Attributes, AwsError> {
        let req = self.elbv2.describe_target_group_attributes();
        let send = || req.clone().target_group_arn(arn).send();
        let resp = self.calls.run("DescribeTargetGroupAttributes", send);
        Ok(convert::tg_attributes(resp.await?.attributes()))
    }

    async fn registered_targets(&self, arn: &str) -> Result<BTreeSet<Target>, AwsError> {
        let req = self.elbv2.describe_target_health().target_group_arn(arn);
        let resp = self
            .calls
            .run("DescribeTargetHealth", || req.clone().send())
            .await?;
        let health = resp.target_health_descriptions.unwrap_or_default();
        Ok(convert::registered_targets(&health))
    }

    /// Attributes and registered targets of one of our target groups; `None` if it vanished.
    async fn read_target_group(
        &self,
        tg: &elb::TargetGroup,
    ) -> Result<Option<ObservedTargetGroup>, ProviderError> {
        let arn = tg.target_group_arn.clone().unwrap_or_default();
        let Some(attrs) = self.tg_attributes(&arn).await.found()? else {
            return Ok(None);
        };
        let Some(targets) = self.registered_targets(&arn).await.found()? else {
            return Ok(None);
        };
        let observed = convert::observed_tg(tg, attrs, targets);
        if observed.is_none() {
            tracing::warn!(target_group = %arn, "target group of a kind cloudlb does not manage: ignored");
        }
        Ok(observed)
    }

    async fn find_security_group(
        &self,
        desired: &Desired,
        vpc: Option<String>,
        deleting: bool,
    ) -> Result<Option<ObservedSecurityGroup>, ProviderError> {
        let frontend = desired
            .lb
            .as_ref()
            .and_then(|lb| lb.security.frontend.as_ref());
        let name = frontend
            .map(|f| f.name.clone())
            .unwrap_or_else(|| naming::security_group_name(&desired.lb_name));
        let mut filters = vec![Filter::new("group-name", [name.clone()])];
        if let Some(vpc) = vpc {
            filters.push(Filter::new("vpc-id", [vpc]));
        }
        let groups: Vec<_> = self
            .ec2
            .describe_security_groups(&self.calls, &filters)
            .await?
            .into_iter()
            .filter(|g| g.name == name)
            .collect();
        let ours = groups
            .iter()
            .find(|g| is_ours(&g.tags, &self.settings.cluster, &desired.service.uid));
        match ours {
            Some(g) => Ok(Some(ObservedSecurityGroup {
                id: g.id.clone(),
                name,
                ingress: g.ingress.clone(),
                tags: tags::user_tags(&g.tags),
            })),
            None if !groups.is_empty() && frontend.is_some() && !deleting => {
                Err(ProviderError::Foreign {
                    kind: "security group",
                    name,
                })
            }
            None => Ok(None),
        }
    }
}

pub(crate) fn ours_elb(
    tags: &BTreeMap<String, BTreeMap<String, String>>,
    arn: &str,
    cluster: &str,
    uid: &str,
) -> bool {
    tags.get(arn).is_some_and(|t| is_ours(t, cluster, uid))
}
