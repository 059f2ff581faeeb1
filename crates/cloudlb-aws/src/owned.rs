//! The orphan sweep: everything in the account that carries our ownership tags for this cluster,
//! grouped by the Service its tags name.
//!
//! ELBv2 cannot filter by tag, so the sweep lists every load balancer and target group of the
//! account (pages of 400) and reads their tags (20 ARNs per call); security groups are filtered
//! by the cluster tag on the server (and by the VPC when one is configured). Then, per Service
//! with a load balancer that the caller does not skip (alive Services are skipped: only
//! candidate orphans), its attributes (deletion protection) and listeners. Calls per sweep:
//! `2 + ceil((LBs + TGs in the account) / 20) + 1 + 2 × (candidates with a load balancer)`,
//! plus one more per extra page.
//!
//! What the empty-model plan does not need is not read: target-group attributes and targets,
//! and the non-default certificates of TLS listeners.

use super::AwsProvider;
use super::convert;
use super::ec2::{Filter, SecurityGroup};
use super::error::CallResult;
use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::model::{ServiceRef, naming, tags};
use cloudlb_core::provider::{
    Observed, ObservedLb, ObservedListener, ObservedSecurityGroup, ProviderError,
};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet};

/// The largest page DescribeLoadBalancers / DescribeTargetGroups return.
const PAGE_SIZE: i32 = 400;
/// Services whose load balancer is read at the same time (the rate limit still applies).
const CONCURRENCY: usize = 8;

/// The Service named by `tag_map` when it is tagged for `cluster` with all three Service tags
/// (non-empty); otherwise `None`: not ours to judge.
pub(crate) fn service_of(tag_map: &BTreeMap<String, String>, cluster: &str) -> Option<ServiceRef> {
    if tag_map.get(tags::CLUSTER).map(String::as_str) != Some(cluster) {
        return None;
    }
    let get = |key: &str| tag_map.get(key).filter(|v| !v.is_empty()).cloned();
    Some(ServiceRef {
        namespace: get(tags::SERVICE_NAMESPACE)?,
        name: get(tags::SERVICE_NAME)?,
        uid: get(tags::SERVICE_UID)?,
    })
}

/// What one Service's tags were found on.
#[derive(Default)]
struct Found {
    lbs: Vec<elb::LoadBalancer>,
    tgs: Vec<elb::TargetGroup>,
    sgs: Vec<SecurityGroup>,
}

/// The preferred item (the one named as cloudlb names it), else the lowest key. Observed holds
/// one load balancer and one security group; the others are deleted by a later sweep once the
/// chosen one is gone.
fn pick<T>(
    mut items: Vec<T>,
    preferred: impl Fn(&T) -> bool,
    key: impl Fn(&T) -> String,
    kind: &'static str,
    service: &ServiceRef,
) -> Option<T> {
    items.sort_by_cached_key(|i| (!preferred(i), key(i)));
    if items.len() > 1 {
        tracing::warn!(
            %service,
            kind,
            count = items.len(),
            chosen = key(&items[0]),
            "several resources of this kind carry this Service's tags; the others are left for a later sweep"
        );
    }
    items.into_iter().next()
}

impl AwsProvider {
    pub(crate) async fn owned_impl(
        &self,
        skip: &(dyn for<'s> Fn(&'s ServiceRef) -> bool + Sync),
    ) -> Result<Vec<(ServiceRef, Observed)>, ProviderError> {
        let cluster = self.settings.cluster.as_str();
        let lbs = self.describe_all_load_balancers().await?;
        let tgs = self.describe_all_target_groups().await?;
        let arns: Vec<String> = lbs
            .iter()
            .filter_map(|l| l.load_balancer_arn.clone())
            .chain(tgs.iter().filter_map(|t| t.target_group_arn.clone()))
            .collect();
        let elb_tags = self.describe_tags(&arns).await?;
        let sgs = self.describe_cluster_security_groups().await?;

        let in_vpc = |vpc: Option<&str>| {
            self.settings
                .vpc_id
                .as_deref()
                .is_none_or(|want| vpc == Some(want))
        };
        let owner = |id: &str, tag_map: Option<&BTreeMap<String, String>>| {
            let tag_map = tag_map?;
            let service = service_of(tag_map, cluster);
            if service.is_none() && tag_map.get(tags::CLUSTER).map(String::as_str) == Some(cluster)
            {
                tracing::debug!(
                    resource = id,
                    "tagged for this cluster but not with a complete Service: skipped"
                );
            }
            service
        };
        // A load balancer or target group (by ARN and VPC) is the Service's its ELB tags name.
        let elb_owner = |arn: Option<&str>, vpc: Option<&str>| {
            let arn = arn?;
            in_vpc(vpc).then(|| owner(arn, elb_tags.get(arn))).flatten()
        };
        let mut found: BTreeMap<ServiceRef, Found> = BTreeMap::new();
        for lb in lbs {
            if let Some(svc) = elb_owner(lb.load_balancer_arn.as_deref(), lb.vpc_id.as_deref()) {
                found.entry(svc).or_default().lbs.push(lb);
            }
        }
        for tg in tgs {
            if let Some(svc) = elb_owner(tg.target_group_arn.as_deref(), tg.vpc_id.as_deref()) {
                found.entry(svc).or_default().tgs.push(tg);
            }
        }
        for sg in sgs {
            if let Some(svc) = owner(&sg.id, Some(&sg.tags)) {
                found.entry(svc).or_default().sgs.push(sg);
            }
        }

        // Only those the controller cannot vouch for are read further.
        found.retain(|svc, _| !skip(svc));
        let out: Vec<(ServiceRef, Observed)> = futures::stream::iter(found)
            .map(|(svc, found)| self.observed_of(svc, found))
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        tracing::debug!(services = out.len(), "owned resources found");
        Ok(out)
    }

    /// One Service's [`Observed`] from what carries its tags.
    async fn observed_of(
        &self,
        service: ServiceRef,
        found: Found,
    ) -> Result<(ServiceRef, Observed), ProviderError> {
        let lb_name = naming::load_balancer_name(
            &self.settings.cluster,
            &service.namespace,
            &service.name,
            &service.uid,
        );
        let sg_name = naming::security_group_name(&lb_name);
        let mut observed = Observed::default();

        let lb = pick(
            found.lbs,
            |l| l.load_balancer_name.as_deref() == Some(lb_name.as_str()),
            |l| l.load_balancer_arn.clone().unwrap_or_default(),
            "load balancer",
            &service,
        );
        if let Some(lb) = lb {
            (observed.lb, observed.listeners) = self.read_owned_lb(&lb).await?;
        }

        observed.target_groups = found
            .tgs
            .iter()
            .filter_map(|tg| {
                let o = convert::observed_tg(tg, BTreeMap::new(), BTreeSet::new());
                if o.is_none() {
                    tracing::warn!(
                        %service,
                        target_group = tg.target_group_arn.as_deref().unwrap_or_default(),
                        "target group of a kind cloudlb does not manage: ignored"
                    );
                }
                o
            })
            .collect();
        observed
            .target_groups
            .sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.arn.cmp(&b.arn)));

        let sg = pick(
            found.sgs,
            |g| g.name == sg_name,
            |g| g.id.clone(),
            "security group",
            &service,
        );
        observed.security_group = sg.map(|g| ObservedSecurityGroup {
            id: g.id,
            name: g.name,
            ingress: g.ingress,
            tags: cloudlb_core::model::tags::user_tags(&g.tags),
        });
        Ok((service, observed))
    }

    /// Attributes and listeners of one of our load balancers; nothing if it vanished meanwhile.
    async fn read_owned_lb(
        &self,
        lb: &elb::LoadBalancer,
    ) -> Result<(Option<ObservedLb>, Vec<ObservedListener>), ProviderError> {
        let arn = lb.load_balancer_arn.clone().unwrap_or_default();
        let Some(attrs) = self.lb_attributes(&arn).await.found()? else {
            return Ok((None, Vec::new()));
        };
        let mut listeners = self.describe_listeners(&arn, false).await?;
        listeners.sort_by(|a, b| a.port.cmp(&b.port).then_with(|| a.arn.cmp(&b.arn)));
        Ok((convert::observed_lb(lb, Some(attrs)), listeners))
    }

    async fn describe_all_load_balancers(&self) -> Result<Vec<elb::LoadBalancer>, ProviderError> {
        let req = self.elbv2.describe_load_balancers().page_size(PAGE_SIZE);
        Ok(self
            .calls
            .pages("DescribeLoadBalancers", false, req)
            .await?)
    }

    async fn describe_all_target_groups(&self) -> Result<Vec<elb::TargetGroup>, ProviderError> {
        let req = self.elbv2.describe_target_groups().page_size(PAGE_SIZE);
        Ok(self.calls.pages("DescribeTargetGroups", false, req).await?)
    }

    /// Security groups tagged for this cluster (in the configured VPC, if any).
    async fn describe_cluster_security_groups(&self) -> Result<Vec<SecurityGroup>, ProviderError> {
        let mut filters = vec![Filter::new(
            &format!("tag:{}", tags::CLUSTER),
            [self.settings.cluster.clone()],
        )];
        if let Some(vpc) = &self.settings.vpc_id {
            filters.push(Filter::new("vpc-id", [vpc.clone()]));
        }
        let groups = self
            .ec2
            .describe_security_groups(&self.calls, &filters)
            .await?;
        Ok(groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag_map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn service_tags_decide_ownership() {
        let full = [
            (tags::CLUSTER, "c1"),
            (tags::SERVICE_NAMESPACE, "shop"),
            (tags::SERVICE_NAME, "web"),
            (tags::SERVICE_UID, "u-1"),
        ];
        assert_eq!(
            service_of(&tag_map(&full), "c1"),
            Some(ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
                uid: "u-1".into()
            })
        );
        // Another cluster.
        assert_eq!(service_of(&tag_map(&full), "c2"), None);
        // Any Service tag missing or empty: not ours to judge.
        for missing in 1..full.len() {
            let mut partial = tag_map(&full);
            partial.remove(full[missing].0);
            assert_eq!(service_of(&partial, "c1"), None, "{missing}");
            partial.insert(full[missing].0.to_string(), String::new());
            assert_eq!(service_of(&partial, "c1"), None, "{missing}");
        }
        assert_eq!(service_of(&BTreeMap::new(), "c1"), None);
    }

    #[test]
    fn pick_prefers_our_name_then_lowest_key() {
        let svc = ServiceRef {
            namespace: "n".into(),
            name: "s".into(),
            uid: "u".into(),
        };
        let items = vec!["b", "ours", "a"];
        assert_eq!(
            pick(
                items.clone(),
                |i| *i == "ours",
                |i| i.to_string(),
                "x",
                &svc
            ),
            Some("ours")
        );
        assert_eq!(
            pick(items, |_| false, |i| i.to_string(), "x", &svc),
            Some("a")
        );
        assert_eq!(
            pick(Vec::<&str>::new(), |_| true, |i| i.to_string(), "x", &svc),
            None
        );
    }
}
