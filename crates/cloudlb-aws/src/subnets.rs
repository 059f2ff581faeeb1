//! Subnets for a load balancer: explicit ids or `Name` tags, or discovery by the
//! `kubernetes.io/role/elb` / `kubernetes.io/role/internal-elb` tags. Results are cached for a
//! few minutes so a burst of new Services does not describe the subnets once each.
//!
//! An existing load balancer follows its placement in place ([`placement`]): zones are added and
//! removed with SetSubnets. The plan learns the wanted subnets without a call: explicit subnet
//! ids are known as given, names and discovery from the cache, which the drift check's observe
//! fills (one DescribeSubnets per placement every few minutes, shared by every Service that
//! discovers). Discovery never moves a load balancer to another subnet of a zone it is in (a
//! newly tagged subnet there is left for new load balancers); explicit lists are followed as
//! given.

use super::AwsProvider;
use super::ec2::Filter;
use cloudlb_core::model::{Scheme, Subnets, tags};
use cloudlb_core::provider::ProviderError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) const CACHE_TTL: Duration = Duration::from_secs(300);
pub(crate) const ROLE_ELB: &str = "kubernetes.io/role/elb";
pub(crate) const ROLE_INTERNAL_ELB: &str = "kubernetes.io/role/internal-elb";

/// Subnets of one load balancer, in the order their EIPs / private addresses are given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResolvedSubnets {
    pub ids: Vec<String>,
    /// The zone of each of `ids`, in the same order.
    pub zones: Vec<String>,
    pub vpc_id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum CacheKey {
    Discover(Scheme),
    Explicit(Vec<String>),
}

#[derive(Debug, Default)]
pub(crate) struct SubnetCache {
    entries: Mutex<HashMap<CacheKey, (Instant, ResolvedSubnets)>>,
}

impl SubnetCache {
    fn get(&self, key: &CacheKey) -> Option<ResolvedSubnets> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(at, _)| at.elapsed() < CACHE_TTL)
            .map(|(_, v)| v.clone())
    }

    fn put(&self, key: CacheKey, value: ResolvedSubnets) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, (at, _)| at.elapsed() < CACHE_TTL);
        entries.insert(key, (Instant::now(), value));
    }
}

/// What discovery needs to know of one subnet.
pub(crate) use super::ec2::Subnet as SubnetInfo;

fn role_tag(scheme: Scheme) -> &'static str {
    match scheme {
        Scheme::InternetFacing => ROLE_ELB,
        Scheme::Internal => ROLE_INTERNAL_ELB,
    }
}

/// Picks one subnet per availability zone, like the in-tree provider and the AWS Load Balancer
/// Controller: subnets tagged for another cluster only are skipped; in each zone a subnet tagged
/// for our cluster wins, then the lowest id. The result is ordered by zone.
pub(crate) fn pick_subnets(
    cluster: &str,
    scheme: Scheme,
    candidates: Vec<SubnetInfo>,
) -> Result<ResolvedSubnets, String> {
    let ours = tags::kubernetes_cluster(cluster);
    let prefix = tags::kubernetes_cluster("");
    let tagged_ours = |s: &SubnetInfo| s.tags.contains_key(&ours);
    let eligible: Vec<SubnetInfo> = candidates
        .into_iter()
        .filter(|s| s.tags.contains_key(role_tag(scheme)))
        .filter(|s| tagged_ours(s) || !s.tags.keys().any(|k| k.starts_with(&prefix)))
        .collect();
    let role = role_tag(scheme);
    if eligible.is_empty() {
        return Err(format!(
            "no subnet found for a {} load balancer: tag the subnets it should use with \"{role}\" \
             (value \"1\") and \"{ours}\" (value \"owned\" or \"shared\"), or list the subnets explicitly",
            scheme.as_aws()
        ));
    }
    // One VPC: the only one, or the only one with subnets tagged for our cluster.
    let mut vpcs: Vec<&str> = eligible.iter().map(|s| s.vpc_id.as_str()).collect();
    vpcs.sort_unstable();
    vpcs.dedup();
    let vpc = if let [one] = vpcs.as_slice() {
        (*one).to_string()
    } else {
        let mut tagged: Vec<&str> = eligible
            .iter()
            .filter(|s| tagged_ours(s))
            .map(|s| s.vpc_id.as_str())
            .collect();
        tagged.sort_unstable();
        tagged.dedup();
        match tagged.as_slice() {
            [one] => (*one).to_string(),
            _ => {
                return Err(format!(
                    "subnets tagged \"{role}\" were found in several VPCs ({}): set the VPC id of the \
                     cluster in the operator's configuration, or list the subnets explicitly",
                    vpcs.join(", ")
                ));
            }
        }
    };
    let mut per_zone: BTreeMap<String, SubnetInfo> = BTreeMap::new();
    for s in eligible.into_iter().filter(|s| s.vpc_id == vpc) {
        let better = match per_zone.get(&s.zone) {
            None => true,
            Some(cur) => (!tagged_ours(&s), &s.id) < (!tagged_ours(cur), &cur.id),
        };
        if better {
            per_zone.insert(s.zone.clone(), s);
        }
    }
    let (ids, zones) = per_zone.into_values().map(|s| (s.id, s.zone)).unzip();
    Ok(ResolvedSubnets {
        ids,
        zones,
        vpc_id: Some(vpc),
    })
}

fn filter(name: &str, values: impl IntoIterator<Item = String>) -> Filter {
    Filter::new(name, values)
}

fn cache_key(scheme: Scheme, subnets: &Subnets) -> CacheKey {
    match subnets {
        Subnets::Discover => CacheKey::Discover(scheme),
        Subnets::Explicit(list) => CacheKey::Explicit(list.clone()),
    }
}

/// Whether `list` names every subnet by id (so it is known without a call).
fn all_ids(list: &[String]) -> bool {
    list.iter().all(|s| s.starts_with("subnet-"))
}

/// The subnets an existing load balancer, now in `have` (subnet id → zone), should be in for the
/// placement `spec` that resolves to `resolved`. Discovery keeps the subnet it has in each zone
/// that stays; zones are added and removed. An explicit list is followed as given.
pub(crate) fn placement(
    spec: &Subnets,
    resolved: &ResolvedSubnets,
    have: &BTreeMap<String, String>,
) -> Vec<String> {
    match spec {
        Subnets::Explicit(_) => resolved.ids.clone(),
        Subnets::Discover => resolved
            .ids
            .iter()
            .zip(&resolved.zones)
            .map(|(id, zone)| {
                have.iter()
                    .find(|(_, z)| *z == zone)
                    .map_or_else(|| id.clone(), |(kept, _)| kept.clone())
            })
            .collect(),
    }
}

impl AwsProvider {
    /// The subnets the existing load balancer `have` should be in for `lb`, when that is known
    /// without a call (explicit ids, or a cached resolution); `None` otherwise.
    pub(crate) fn known_placement(
        &self,
        lb: &cloudlb_core::model::LoadBalancer,
        have: &cloudlb_core::provider::ObservedLb,
    ) -> Option<Vec<String>> {
        if let Subnets::Explicit(list) = &lb.subnets
            && all_ids(list)
        {
            return Some(list.clone());
        }
        let resolved = self.subnet_cache.get(&cache_key(lb.scheme, &lb.subnets))?;
        Some(placement(&lb.subnets, &resolved, &have.subnet_zones))
    }

    /// Makes [`AwsProvider::known_placement`] know the placement of `lb` (unless explicit ids
    /// already say it): at most one DescribeSubnets per placement and cache period.
    pub(crate) async fn learn_placement(
        &self,
        lb: &cloudlb_core::model::LoadBalancer,
    ) -> Result<(), ProviderError> {
        match &lb.subnets {
            Subnets::Explicit(list) if all_ids(list) => Ok(()),
            spec => self.resolve_subnets(lb.scheme, spec).await.map(drop),
        }
    }

    /// The subnets a new load balancer of `scheme` goes into.
    pub(crate) async fn resolve_subnets(
        &self,
        scheme: Scheme,
        subnets: &Subnets,
    ) -> Result<ResolvedSubnets, ProviderError> {
        let key = cache_key(scheme, subnets);
        if let Some(hit) = self.subnet_cache.get(&key) {
            return Ok(hit);
        }
        let resolved = match subnets {
            Subnets::Discover => {
                let mut filters = vec![filter("tag-key", [role_tag(scheme).to_string()])];
                if let Some(vpc) = &self.settings.vpc_id {
                    filters.push(filter("vpc-id", [vpc.clone()]));
                }
                let found = self.describe_subnets(filters, Vec::new()).await?;
                pick_subnets(&self.settings.cluster, scheme, found)
                    .map_err(ProviderError::InvalidConfig)?
            }
            Subnets::Explicit(list) => self.resolve_explicit(list).await?,
        };
        self.subnet_cache.put(key, resolved.clone());
        Ok(resolved)
    }

    async fn resolve_explicit(&self, list: &[String]) -> Result<ResolvedSubnets, ProviderError> {
        if list.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "the list of subnets is empty: give at least one subnet id or Name tag, or let cloudlb discover them"
                    .into(),
            ));
        }
        let (ids, names): (Vec<String>, Vec<String>) =
            list.iter().cloned().partition(|s| s.starts_with("subnet-"));
        let mut found = Vec::new();
        if !ids.is_empty() {
            found.extend(self.describe_subnets(Vec::new(), ids).await?);
        }
        if !names.is_empty() {
            let mut filters = vec![filter("tag:Name", names.iter().cloned())];
            if let Some(vpc) = &self.settings.vpc_id {
                filters.push(filter("vpc-id", [vpc.clone()]));
            }
            found.extend(self.describe_subnets(filters, Vec::new()).await?);
        }
        let mut out = Vec::with_capacity(list.len());
        let mut zones = Vec::with_capacity(list.len());
        let mut vpc: Option<String> = None;
        for want in list {
            let matches: Vec<&SubnetInfo> = found
                .iter()
                .filter(|s| &s.id == want || s.tags.get("Name") == Some(want))
                .collect();
            let subnet = match matches.as_slice() {
                [one] => *one,
                [] => {
                    return Err(ProviderError::InvalidConfig(format!(
                        "subnet {want:?} was not found (by id, or by Name tag{}): check the subnet list",
                        self.settings
                            .vpc_id
                            .as_ref()
                            .map(|v| format!(" in {v}"))
                            .unwrap_or_default()
                    )));
                }
                _ => {
                    return Err(ProviderError::InvalidConfig(format!(
                        "several subnets are named {want:?}: list subnet ids instead"
                    )));
                }
            };
            match &vpc {
                None => vpc = Some(subnet.vpc_id.clone()),
                Some(v) if *v != subnet.vpc_id => {
                    return Err(ProviderError::InvalidConfig(format!(
                        "the subnets are in different VPCs ({v} and {}): a load balancer lives in one VPC",
                        subnet.vpc_id
                    )));
                }
                Some(_) => {}
            }
            out.push(subnet.id.clone());
            zones.push(subnet.zone.clone());
        }
        Ok(ResolvedSubnets {
            ids: out,
            zones,
            vpc_id: vpc,
        })
    }

    async fn describe_subnets(
        &self,
        filters: Vec<Filter>,
        ids: Vec<String>,
    ) -> Result<Vec<SubnetInfo>, ProviderError> {
        let found = self.ec2.describe_subnets(&self.calls, &filters, &ids).await;
        match found {
            Ok(subnets) => Ok(subnets),
            Err(e) if e.is_not_found() => Err(ProviderError::InvalidConfig(format!(
                "subnet not found ({}): check the subnet ids",
                e.message
            ))),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(id: &str, vpc: &str, zone: &str, tags: &[&str]) -> SubnetInfo {
        SubnetInfo {
            id: id.into(),
            vpc_id: vpc.into(),
            zone: zone.into(),
            tags: tags
                .iter()
                .map(|t| (t.to_string(), "1".to_string()))
                .collect(),
        }
    }

    const OURS: &str = "kubernetes.io/cluster/c1";
    const OTHER: &str = "kubernetes.io/cluster/c2";

    /// `pick_subnets` for cluster c1 from `(id, vpc, zone, tags)` rows: the ids picked, or the
    /// error.
    fn pick(scheme: Scheme, rows: &[(&str, &str, &str, &[&str])]) -> Result<Vec<String>, String> {
        let subnets = rows
            .iter()
            .map(|&(id, vpc, zone, tags)| subnet(id, vpc, zone, tags))
            .collect();
        pick_subnets("c1", scheme, subnets).map(|p| p.ids)
    }

    #[test]
    fn one_per_zone_preferring_our_cluster_then_lowest_id() {
        let subnets = vec![
            subnet("subnet-b", "vpc-1", "az-a", &[ROLE_ELB]),
            subnet("subnet-a", "vpc-1", "az-a", &[ROLE_ELB]),
            subnet("subnet-z", "vpc-1", "az-b", &[ROLE_ELB, OURS]),
            subnet("subnet-c", "vpc-1", "az-b", &[ROLE_ELB]),
            subnet("subnet-d", "vpc-1", "az-c", &[ROLE_ELB, OTHER]),
            subnet("subnet-e", "vpc-1", "az-c", &[ROLE_INTERNAL_ELB, OURS]),
        ];
        let got = pick_subnets("c1", Scheme::InternetFacing, subnets).expect("found");
        assert_eq!(got.ids, vec!["subnet-a", "subnet-z"]);
        assert_eq!(got.vpc_id.as_deref(), Some("vpc-1"));
    }

    #[test]
    fn discovery_adds_and_removes_zones_but_keeps_the_subnet_of_a_zone() {
        let resolved = ResolvedSubnets {
            ids: vec!["subnet-new-a".into(), "subnet-c".into()],
            zones: vec!["az-a".into(), "az-c".into()],
            vpc_id: None,
        };
        let have: BTreeMap<String, String> = [("subnet-a", "az-a"), ("subnet-b", "az-b")]
            .into_iter()
            .map(|(s, z)| (s.to_string(), z.to_string()))
            .collect();
        // Zone b goes, zone c comes, zone a keeps its subnet.
        assert_eq!(
            placement(&Subnets::Discover, &resolved, &have),
            vec!["subnet-a", "subnet-c"]
        );
        // An explicit list is followed as given.
        let explicit = Subnets::Explicit(vec!["x".into(), "y".into()]);
        assert_eq!(
            placement(&explicit, &resolved, &have),
            vec!["subnet-new-a", "subnet-c"]
        );
    }

    #[test]
    fn internal_uses_internal_role() {
        let rows: &[(&str, &str, &str, &[&str])] = &[
            ("subnet-a", "vpc-1", "az-a", &[ROLE_ELB]),
            ("subnet-b", "vpc-1", "az-a", &[ROLE_INTERNAL_ELB]),
        ];
        assert_eq!(
            pick(Scheme::Internal, rows),
            Ok(vec!["subnet-b".to_string()])
        );
    }

    #[test]
    fn nothing_found_says_which_tags() {
        let err = pick(Scheme::Internal, &[]).expect_err("none");
        assert!(err.contains(ROLE_INTERNAL_ELB), "{err}");
        assert!(err.contains(OURS), "{err}");
    }

    #[test]
    fn several_vpcs_prefer_the_tagged_one_or_fail() {
        let tagged: &[(&str, &str, &str, &[&str])] = &[
            ("subnet-a", "vpc-1", "az-a", &[ROLE_ELB]),
            ("subnet-b", "vpc-2", "az-a", &[ROLE_ELB, OURS]),
        ];
        assert_eq!(
            pick(Scheme::InternetFacing, tagged),
            Ok(vec!["subnet-b".to_string()])
        );
        let untagged: &[(&str, &str, &str, &[&str])] = &[
            ("subnet-a", "vpc-1", "az-a", &[ROLE_ELB]),
            ("subnet-b", "vpc-2", "az-a", &[ROLE_ELB]),
        ];
        let err = pick(Scheme::InternetFacing, untagged).expect_err("ambiguous");
        assert!(err.contains("several VPCs"), "{err}");
    }
}
