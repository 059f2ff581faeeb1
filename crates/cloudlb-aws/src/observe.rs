//! Read what exists for one Service: the NLB found by name, its listeners and target groups
//! (attached ones, plus desired ones found by name: created before a crash, not yet attached),
//! and the frontend security group found by name. Everything is checked for our ownership tags.
//!
//! What the controller already knows (a drift check) is looked up by id instead, in one call
//! with other Services' lookups of the same moment: up to 20 load balancers, target groups,
//! tagged resources or security groups per call. The load balancer's attributes are read only
//! when the model sets some or it may go ([`needs_lb_attributes`]). What stays one call per
//! resource: the listeners of each load balancer (one added by hand must show), and each target
//! group's attributes and registered targets (AWS has no batch form of either).

use super::AwsProvider;
use super::batch::{Coalescer, Found};
use super::convert::{self, is_ours, tag_map_elb};
use super::ec2::{Filter, SecurityGroup};
use super::error::{AwsError, CallResult};
use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::model::observed::needs_lb_attributes;
use cloudlb_core::model::{Desired, Target, naming, tags};
use cloudlb_core::provider::{
    Observed, ObservedListener, ObservedSecurityGroup, ObservedTargetGroup, ProviderError,
};
use std::collections::{BTreeMap, BTreeSet};

/// Attributes by key.
type Attributes = BTreeMap<String, String>;

/// Tags by ARN.
pub(crate) type Tags = BTreeMap<String, BTreeMap<String, String>>;

/// DescribeTags takes at most 20 ARNs.
const TAGS_BATCH: usize = 20;

/// Ids per lookup call (DescribeLoadBalancers takes at most 20 ARNs; the others are kept to
/// the same).
const CHUNK: usize = 20;

/// How long a lookup by id waits for others to go with it: the drift checks of a group start
/// together, and each of their steps comes within a few milliseconds of the others'.
const BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(50);

/// The coalesced lookups by id ([`crate::batch`]).
#[derive(Debug)]
pub(crate) struct Lookups {
    lbs: Coalescer<elb::LoadBalancer>,
    target_groups: Coalescer<elb::TargetGroup>,
    tags: Coalescer<BTreeMap<String, String>>,
    groups: Coalescer<SecurityGroup>,
}

impl Default for Lookups {
    fn default() -> Self {
        Lookups {
            lbs: Coalescer::new(BATCH_WINDOW, CHUNK),
            target_groups: Coalescer::new(BATCH_WINDOW, CHUNK),
            tags: Coalescer::new(BATCH_WINDOW, TAGS_BATCH),
            groups: Coalescer::new(BATCH_WINDOW, CHUNK),
        }
    }
}

impl AwsProvider {
    /// `known`: what memory or a checkpoint says exists for the Service (a drift check, a read
    /// after a failure). Its load balancer, target groups, tags and frontend group are then
    /// looked up by id, in one call with other Services' lookups of the same moment
    /// ([`crate::batch`]); what is no longer there is looked for by name, as without `known`.
    pub(crate) async fn observe_impl(
        &self,
        desired: &Desired,
        known: Option<&Observed>,
    ) -> Result<Observed, ProviderError> {
        // The empty model deletes only what is ours; a foreign resource of the same name is left
        // alone without blocking the Service's deletion.
        let deleting = desired.lb.is_none();
        let known = known.filter(|k| !deleting && k.lb_name() == desired.lb_name);
        let mut observed = Observed::default();

        // 1. What is known, by id, all at once (so each lookup goes with the other Services'
        // of the moment); then the load balancer by name if it is gone.
        let mut prefetched = match known {
            Some(k) => Some(self.prefetch(k).await?),
            None => None,
        };
        let by_id = prefetched.as_mut().and_then(|p| {
            p.lb.take()
                .filter(|lb| lb.load_balancer_name.as_deref() == Some(desired.lb_name.as_str()))
        });
        let (lb, lb_tags) = match by_id {
            // Its tags are among those prefetched, checked with the target groups'.
            Some(lb) => (Some(lb), None),
            None => match self.find_lb(desired, deleting).await? {
                Some((lb, tags)) => (Some(lb), Some(tags)),
                None => (None, None),
            },
        };
        let lb_arn = lb.as_ref().and_then(|l| l.load_balancer_arn.clone());
        let mut attached: Vec<elb::TargetGroup> = Vec::new();
        if let Some(arn) = &lb_arn {
            observed.listeners = self.describe_listeners(arn, true).await?;
            self.read_listener_attributes(desired, &mut observed.listeners)
                .await?;
            attached = match (&mut prefetched, &lb_tags) {
                (Some(p), None) => {
                    self.attached_by_id(&mut p.target_groups, &observed.listeners)
                        .await?
                }
                _ => self.describe_attached_target_groups(arn).await?,
            };
        }

        // 2. Target groups: attached, plus desired ones by name (and the listeners' tags, read
        // with theirs; with the load balancer's too when it was found by id).
        let unchecked = match (&lb, &lb_arn, &lb_tags) {
            (Some(_), Some(arn), None) => Some((arn.as_str(), desired.lb_name.as_str())),
            _ => None,
        };
        let (known_group, known_tags) = match prefetched {
            Some(p) => (p.group, Some((p.asked, p.tags))),
            None => (None, None),
        };
        let lookup = TargetGroupLookup {
            desired,
            deleting,
            known_tags,
            unchecked_lb: unchecked,
        };
        let (target_groups, mut tags) = self
            .find_target_groups(lookup, attached, &mut observed.listeners)
            .await?;
        observed.target_groups = target_groups;
        if let (Some(lb), Some(arn)) = (&lb, &lb_arn) {
            let lb_tags = lb_tags.unwrap_or_else(|| tags.remove(arn).unwrap_or_default());
            let have = convert::scheme(lb.scheme.as_ref());
            let attributes = if needs_lb_attributes(desired, have) {
                Some(self.lb_attributes(arn).await?)
            } else {
                None
            };
            observed.lb = convert::observed_lb(lb, attributes);
            if let Some(l) = observed.lb.as_mut() {
                l.tags = tags::user_tags(&lb_tags);
            }
        }

        // The backend group, once per process, if the load balancer may carry it: the plan
        // must know it to tell whether it is attached (a restart must not re-attach it).
        if wants_backend(desired) && observed.lb.is_some() && self.backend_group_id().is_none() {
            self.find_backend_group().await?;
        }
        // Where the load balancer should be, so the plan can move it (cached).
        if let (Some(want), Some(_)) = (&desired.lb, &observed.lb) {
            self.learn_placement(want).await?;
        }

        // 3. The frontend security group: by id, else by name.
        let vpc = self
            .settings
            .vpc_id
            .clone()
            .or_else(|| lb.as_ref().and_then(|l| l.vpc_id.clone()));
        let (cluster, uid) = (&self.settings.cluster, &desired.service.uid);
        observed.security_group = known_group
            .filter(|g| is_ours(&g.tags, cluster, uid))
            .map(|g| ObservedSecurityGroup {
                tags: tags::user_tags(&g.tags),
                id: g.id,
                name: g.name,
                ingress: g.ingress,
            });
        if observed.security_group.is_none() {
            observed.security_group = self.find_security_group(desired, vpc, deleting).await?;
        }

        observed
            .listeners
            .sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.arn.cmp(&b.arn)));
        observed
            .target_groups
            .sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.arn.cmp(&b.arn)));
        Ok(observed)
    }

    /// Everything `known` names, looked up by id at once: the load balancer, the target
    /// groups, the tags of all of them and of the listeners, the frontend group (each lookup
    /// batched with other Services').
    async fn prefetch(&self, known: &Observed) -> Result<Prefetched, ProviderError> {
        let lb_arns: Vec<String> = known.lb.iter().map(|l| l.arn.clone()).collect();
        let tg_arns: Vec<String> = known.target_groups.iter().map(|t| t.arn.clone()).collect();
        let asked: BTreeSet<String> = lb_arns
            .iter()
            .chain(&tg_arns)
            .cloned()
            .chain(known.listeners.iter().map(|l| l.arn.clone()))
            .collect();
        let group_ids: Vec<String> = known.security_group.iter().map(|g| g.id.clone()).collect();
        let tag_fetch = |arns: Vec<String>| async move { self.describe_tags(&arns).await };
        let (mut lbs, tags, target_groups, mut groups) = tokio::try_join!(
            self.lookups
                .lbs
                .get(lb_arns.clone(), |arns| self.lbs_by_arn(arns)),
            self.lookups
                .tags
                .get(asked.iter().cloned().collect(), tag_fetch),
            self.lookups
                .target_groups
                .get(tg_arns, |arns| self.tgs_by_arn(arns)),
            self.lookups
                .groups
                .get(group_ids, |ids| self.groups_by_id(ids)),
        )?;
        let group = known
            .security_group
            .as_ref()
            .and_then(|k| groups.remove(&k.id).filter(|g| g.name == k.name));
        Ok(Prefetched {
            lb: lb_arns.first().and_then(|arn| lbs.remove(arn)),
            target_groups,
            tags,
            asked,
            group,
        })
    }

    /// The target groups attached to the load balancer: those known (prefetched, taken) and
    /// any other its listeners forward to (by id, batched). What DescribeTargetGroups by load
    /// balancer answers, for a load balancer whose listeners are the only way to attach one.
    async fn attached_by_id(
        &self,
        known: &mut Found<elb::TargetGroup>,
        listeners: &[ObservedListener],
    ) -> Result<Vec<elb::TargetGroup>, ProviderError> {
        let mut more: Vec<String> = listeners
            .iter()
            .filter_map(|l| l.target_group_arn.clone())
            .filter(|arn| !known.contains_key(arn))
            .collect();
        more.sort();
        more.dedup();
        let found = self
            .lookups
            .target_groups
            .get(more, |arns| self.tgs_by_arn(arns))
            .await?;
        Ok(std::mem::take(known)
            .into_values()
            .chain(found.into_values())
            .collect())
    }

    /// Load balancers by ARN, 20 per call; one that is gone is absent.
    async fn lbs_by_arn(&self, arns: Vec<String>) -> Result<Found<elb::LoadBalancer>, AwsError> {
        by_arn(&arns, |chunk| async move {
            let resp = self
                .calls
                .run("DescribeLoadBalancers", || {
                    self.elbv2
                        .describe_load_balancers()
                        .set_load_balancer_arns(Some(chunk.clone()))
                        .send()
                })
                .await?;
            Ok(resp
                .load_balancers
                .into_iter()
                .flatten()
                .filter_map(|lb| Some((lb.load_balancer_arn.clone()?, lb)))
                .collect())
        })
        .await
    }

    /// Target groups by ARN, 20 per call; one that is gone is absent.
    async fn tgs_by_arn(&self, arns: Vec<String>) -> Result<Found<elb::TargetGroup>, AwsError> {
        by_arn(&arns, |chunk| async move {
            let resp = self
                .calls
                .run("DescribeTargetGroups", || {
                    self.elbv2
                        .describe_target_groups()
                        .set_target_group_arns(Some(chunk.clone()))
                        .send()
                })
                .await?;
            Ok(resp
                .target_groups
                .into_iter()
                .flatten()
                .filter_map(|tg| Some((tg.target_group_arn.clone()?, tg)))
                .collect())
        })
        .await
    }

    /// Security groups by id, in one call (a filter: one that is gone is absent).
    async fn groups_by_id(&self, ids: Vec<String>) -> Result<Found<SecurityGroup>, AwsError> {
        let filters = [Filter::new("group-id", ids)];
        let groups = self
            .ec2
            .describe_security_groups(&self.calls, &filters)
            .await?;
        Ok(groups.into_iter().map(|g| (g.id.clone(), g)).collect())
    }

    /// Our target groups among those `attached` to the load balancer and those the model wants
    /// (by name), read in full, and the tags read. A wanted name held by a group without our
    /// tags is [`ProviderError::Foreign`] (unless deleting). The tags of `listeners` are read in
    /// the same DescribeTags calls (unless deleting: the empty model does not need them), and
    /// those of a load balancer found by id, whose ownership is checked before anything else is
    /// read.
    async fn find_target_groups(
        &self,
        lookup: TargetGroupLookup<'_>,
        attached: Vec<elb::TargetGroup>,
        listeners: &mut [ObservedListener],
    ) -> Result<(Vec<ObservedTargetGroup>, Tags), ProviderError> {
        let TargetGroupLookup {
            desired, deleting, ..
        } = lookup;
        let prefetched = lookup.known_tags.is_some();
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
        let lb_arn = lookup.unchecked_lb.map(|(arn, _)| arn.to_string());
        let arns: Vec<String> = candidates
            .iter()
            .filter_map(|t| t.target_group_arn.clone())
            .chain(listener_arns)
            .chain(lb_arn)
            .collect();
        // Those prefetched are not asked again (one that was gone stays without tags).
        let (mut tags, missing) = match lookup.known_tags {
            Some((asked, tags)) => {
                let missing: Vec<String> =
                    arns.into_iter().filter(|a| !asked.contains(a)).collect();
                (tags, missing)
            }
            None => (Tags::new(), arns),
        };
        if !missing.is_empty() {
            let more = if prefetched {
                let fetch = |arns: Vec<String>| async move { self.describe_tags(&arns).await };
                self.lookups.tags.get(missing, fetch).await?
            } else {
                self.describe_tags(&missing).await?
            };
            tags.extend(more);
        }
        let (cluster, uid) = (&self.settings.cluster, &desired.service.uid);
        if let Some((arn, name)) = lookup.unchecked_lb
            && !ours_elb(&tags, arn, cluster, uid)
        {
            return Err(ProviderError::Foreign {
                kind: "load balancer",
                name: name.to_string(),
            });
        }
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
            if ours_elb(&tags, &arn, cluster, uid) {
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
        Ok((observed, tags))
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
    pub(crate) async fn describe_tags(&self, arns: &[String]) -> Result<Tags, AwsError> {
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
    async fn describe_tags_batch(&self, arns: &[String], out: &mut Tags) -> Result<bool, AwsError> {
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
            Err(e) => Err(e),
        }
    }

    /// The listeners of a load balancer. `all_certificates`: list every certificate of a TLS
    /// listener (one more call per TLS listener); otherwise only the default one is known.
    pub(super) async fn describe_listeners(
        &self,
        lb_arn: &str,
        all_certificates: bool,
    ) -> Result<Vec<ObservedListener>, ProviderError> {
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
        listeners: &mut [ObservedListener],
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

/// What [`AwsProvider::find_target_groups`] looks for, and how.
struct TargetGroupLookup<'a> {
    desired: &'a Desired,
    deleting: bool,
    /// The ARNs whose tags were prefetched, and their tags (a lookup by id): the others are
    /// read in one call with other Services'.
    known_tags: Option<(BTreeSet<String>, Tags)>,
    /// A load balancer found by id (ARN, name): its tags are read with the groups' and its
    /// ownership checked first.
    unchecked_lb: Option<(&'a str, &'a str)>,
}

/// What [`AwsProvider::prefetch`] found by id.
struct Prefetched {
    lb: Option<elb::LoadBalancer>,
    target_groups: Found<elb::TargetGroup>,
    tags: Tags,
    /// The ARNs whose tags were asked for (a resource gone has none).
    asked: BTreeSet<String>,
    /// The frontend group, if it still exists under its name (ownership not checked yet).
    group: Option<SecurityGroup>,
}

/// Whether the model may attach the backend security group (the plan must then know it).
pub(crate) fn wants_backend(desired: &Desired) -> bool {
    desired
        .lb
        .as_ref()
        .is_some_and(|l| l.security.backend.is_some())
}

/// Lookups by id, `CHUNK` per call: a call that fails because one of them is gone is made again
/// for each alone, so one deletion does not hide the others.
async fn by_arn<V, F, Fut>(arns: &[String], call: F) -> Result<Found<V>, AwsError>
where
    F: Fn(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = Result<Found<V>, AwsError>>,
{
    let mut out = Found::new();
    for chunk in arns.chunks(CHUNK) {
        match call(chunk.to_vec()).await {
            Ok(found) => out.extend(found),
            Err(e) if e.is_not_found() => {
                if chunk.len() == 1 {
                    continue;
                }
                for arn in chunk {
                    match call(vec![arn.clone()]).await {
                        Ok(found) => out.extend(found),
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

pub(crate) fn ours_elb(tags: &Tags, arn: &str, cluster: &str, uid: &str) -> bool {
    tags.get(arn).is_some_and(|t| is_ours(t, cluster, uid))
}
