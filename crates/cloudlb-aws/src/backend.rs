//! Letting load balancers reach their targets: one backend security group per cluster and
//! installation, attached to every load balancer that wants it, and admitted by rules on the
//! targets' security groups (the nodes' for node targets, the pods' network interfaces' for pod
//! targets). A port of a node target in the nodePort range is admitted as the whole range, so
//! node groups get a constant number of rules however many Services there are; pod ports are
//! admitted one by one (adjacent ones merged).
//!
//! What is learnt (the group's id, each target's security group, the rules each group has) is
//! cached for the life of the process: a Service like the last costs no call. Rules are added
//! before targets are registered ([`AwsProvider::ensure_backend`]), and removed only by
//! [`AwsProvider::prune_backend`], which knows every load balancer that still wants them; only
//! rules carrying cloudlb's description are ever removed.

use super::ec2::{Filter, GroupRule, SecurityGroup};
use super::error::CallResult;
use super::{AwsProvider, Change};
use cloudlb_core::model::{BackendPort, LoadBalancer, tags};
use cloudlb_core::provider::{ProviderError, SharedNeed};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The tag value of `cloudlb.io/resource` on the backend group.
const BACKEND_RESOURCE: &str = "backend-security-group";
/// Targets per lookup call (DescribeInstances / DescribeNetworkInterfaces filter values).
const LOOKUP_CHUNK: usize = 200;

/// How long what is learnt of a target's security group is trusted: a pod IP can move to
/// another interface, an instance can change groups.
const TARGET_TTL: Duration = Duration::from_secs(600);

#[derive(Debug, Default)]
struct Known {
    /// The backend group's id, once found or made.
    group: Option<String>,
    /// Target (instance id or IP) → when it was learnt, and the security group cloudlb changes
    /// for it, or why none.
    target_groups: HashMap<String, (Instant, Result<String, String>)>,
    /// Security group → its tags (to choose among a target's groups).
    tags: HashMap<String, BTreeMap<String, String>>,
    /// Security group → the rules admitting the backend group it has.
    rules: HashMap<String, BTreeSet<GroupRule>>,
}

impl Known {
    fn target(&self, id: &str) -> Option<&Result<String, String>> {
        self.target_groups
            .get(id)
            .filter(|(at, _)| at.elapsed() < TARGET_TTL)
            .map(|(_, r)| r)
    }
}

/// What the provider knows of the backend security group and the targets' groups.
#[derive(Debug, Default)]
pub(crate) struct BackendCache {
    known: Mutex<Known>,
    /// One lookup of unknown targets at a time: reconciles running together wait for it and
    /// find the answer cached, instead of each asking.
    lookups: tokio::sync::Mutex<()>,
}

impl BackendCache {
    fn lock(&self) -> MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The backend group's id, if known.
    pub(crate) fn group(&self) -> Option<String> {
        self.lock().group.clone()
    }
}

/// The rules (source: the backend group `group`) that admit `ports`: nodePorts widened to
/// `node_ports`, the other ports merged where adjacent.
pub(crate) fn rules_for(
    ports: &BTreeSet<BackendPort>,
    node_ports: (u16, u16),
    group: &str,
    description: &str,
) -> BTreeSet<GroupRule> {
    let (lo, hi) = node_ports;
    let mut single: BTreeMap<&str, BTreeSet<u16>> = BTreeMap::new();
    let mut out = BTreeSet::new();
    let rule = |protocol: &str, from: u16, to: u16| GroupRule {
        protocol: protocol.to_string(),
        from,
        to,
        source: group.to_string(),
        description: description.to_string(),
    };
    for p in ports {
        if p.node_port && (lo..=hi).contains(&p.port) {
            out.insert(rule(&p.protocol, lo, hi));
        } else {
            single.entry(&p.protocol).or_default().insert(p.port);
        }
    }
    for (protocol, ports) in single {
        let mut run: Option<(u16, u16)> = None;
        for port in ports {
            // Ports the range already admits need no rule of their own.
            if out
                .iter()
                .any(|r| r.protocol == protocol && (r.from..=r.to).contains(&port))
            {
                continue;
            }
            run = match run {
                Some((from, to)) if to.checked_add(1) == Some(port) => Some((from, port)),
                Some((from, to)) => {
                    out.insert(rule(protocol, from, to));
                    Some((port, port))
                }
                None => Some((port, port)),
            };
        }
        if let Some((from, to)) = run {
            out.insert(rule(protocol, from, to));
        }
    }
    out
}

/// Which of a target's security groups cloudlb changes: the one tagged for the cluster, else
/// its only one; otherwise why none.
fn choose(
    target: &str,
    candidates: &[String],
    tags: &HashMap<String, BTreeMap<String, String>>,
    cluster_tag: &str,
) -> Result<String, String> {
    let tagged: Vec<&String> = candidates
        .iter()
        .filter(|id| tags.get(*id).is_some_and(|t| t.contains_key(cluster_tag)))
        .collect();
    match (tagged.as_slice(), candidates) {
        ([one], _) => Ok((*one).clone()),
        ([], [only]) => Ok(only.clone()),
        ([], []) => Err(format!("{target} has no security group")),
        ([], many) => Err(format!(
            "{target} has {} security groups ({}) and none is tagged {cluster_tag}: tag the one the load balancer's traffic should be admitted by",
            many.len(),
            many.join(", ")
        )),
        (many, _) => Err(format!(
            "{target} has {} security groups tagged {cluster_tag} ({}): leave the tag on one",
            many.len(),
            many.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

impl AwsProvider {
    /// The backend group's id, if known.
    pub(crate) fn backend_group_id(&self) -> Option<String> {
        self.backend.group()
    }

    /// Looks the backend group up (never makes it): its id, if it exists.
    pub(crate) async fn find_backend_group(&self) -> Result<Option<String>, ProviderError> {
        self.backend_group(None).await
    }

    /// The description of every rule cloudlb makes on a target's group (its marker).
    fn backend_rule_description(&self) -> String {
        format!(
            "cloudlb {} backend: load balancers of cluster {}",
            self.settings.installation, self.settings.cluster
        )
    }

    fn backend_group_name(&self) -> String {
        format!(
            "cloudlb-backend-{}-{}",
            self.settings.cluster, self.settings.installation
        )
    }

    fn backend_tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                tags::kubernetes_cluster(&self.settings.cluster),
                "owned".to_string(),
            ),
            (tags::CLUSTER.to_string(), self.settings.cluster.clone()),
            (tags::RESOURCE.to_string(), BACKEND_RESOURCE.to_string()),
            (
                tags::INSTALLATION.to_string(),
                self.settings.installation.clone(),
            ),
            ("Name".to_string(), self.backend_group_name()),
        ])
    }

    /// Whether a group carries our backend tags (this cluster and installation).
    fn is_our_backend(&self, g: &SecurityGroup) -> bool {
        let want = self.backend_tags();
        [tags::CLUSTER, tags::RESOURCE, tags::INSTALLATION]
            .iter()
            .all(|k| g.tags.get(*k) == want.get(*k))
    }

    /// The backend group: known, found by name (and then it must carry our tags), or (with
    /// `create_in`, a VPC) made. `None`: there is none and nothing is to be made.
    async fn backend_group(
        &self,
        create_in: Option<&str>,
    ) -> Result<Option<String>, ProviderError> {
        if let Some(id) = self.backend.group() {
            return Ok(Some(id));
        }
        let name = self.backend_group_name();
        let mut filters = vec![Filter::new("group-name", [name.clone()])];
        if let Some(vpc) = create_in.or(self.settings.vpc_id.as_deref()) {
            filters.push(Filter::new("vpc-id", [vpc.to_string()]));
        }
        let found = self
            .ec2
            .describe_security_groups(&self.calls, &filters)
            .await?;
        let id = match found.first() {
            Some(g) if self.is_our_backend(g) => g.id.clone(),
            Some(g) => {
                return Err(ProviderError::Foreign {
                    kind: "security group",
                    name: format!("{name} ({})", g.id),
                });
            }
            None => {
                let Some(vpc) = create_in else {
                    return Ok(None);
                };
                let description = format!(
                    "cloudlb backend: admitted by the targets of cluster {}'s load balancers",
                    self.settings.cluster
                );
                let made = self
                    .ec2
                    .create_security_group(
                        &self.calls,
                        &name,
                        &description,
                        vpc,
                        &self.backend_tags(),
                    )
                    .await;
                match made {
                    Ok(Some(id)) => id,
                    Ok(None) => {
                        return Err(ProviderError::Api {
                            operation: "CreateSecurityGroup",
                            message: "unexpected response: no GroupId".into(),
                            throttled: false,
                        });
                    }
                    // Made meanwhile (another replica, a crash before we cached it): read it.
                    Err(e) if e.is_duplicate() => {
                        let again = self
                            .ec2
                            .describe_security_groups(&self.calls, &filters)
                            .await?;
                        match again.first() {
                            Some(g) if self.is_our_backend(g) => g.id.clone(),
                            _ => {
                                return Err(ProviderError::Foreign {
                                    kind: "security group",
                                    name,
                                });
                            }
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        self.backend.lock().group = Some(id.clone());
        Ok(Some(id))
    }

    /// Learns the security group cloudlb changes for each target of `targets` it does not know
    /// yet, and the rules those groups have: at most one lookup per kind of target and one
    /// DescribeSecurityGroups.
    async fn learn_targets(&self, targets: &BTreeSet<String>) -> Result<(), ProviderError> {
        let unknown = || -> Vec<String> {
            let known = self.backend.lock();
            targets
                .iter()
                .filter(|t| known.target(t).is_none())
                .cloned()
                .collect()
        };
        if unknown().is_empty() {
            return Ok(());
        }
        let _one_at_a_time = self.backend.lookups.lock().await;
        // What another reconcile learnt while this one waited is not asked again.
        let unknown = unknown();
        if unknown.is_empty() {
            return Ok(());
        }
        let (instances, ips): (Vec<String>, Vec<String>) =
            unknown.iter().cloned().partition(|t| t.starts_with("i-"));
        let mut candidates: HashMap<String, Vec<String>> = HashMap::new();
        for chunk in instances.chunks(LOOKUP_CHUNK) {
            let found = self
                .ec2
                .instance_security_groups(&self.calls, chunk)
                .await?;
            candidates.extend(found);
        }
        for chunk in ips.chunks(LOOKUP_CHUNK) {
            let found = self.ec2.address_security_groups(&self.calls, chunk).await?;
            candidates.extend(found);
        }
        let new_groups: BTreeSet<String> = {
            let known = self.backend.lock();
            candidates
                .values()
                .flatten()
                .filter(|g| !known.tags.contains_key(*g))
                .cloned()
                .collect()
        };
        let groups: Vec<SecurityGroup> = if new_groups.is_empty() {
            Vec::new()
        } else {
            let filter = Filter::new("group-id", new_groups);
            self.ec2
                .describe_security_groups(&self.calls, &[filter])
                .await?
        };
        let cluster_tag = tags::kubernetes_cluster(&self.settings.cluster);
        let mut known = self.backend.lock();
        for g in groups {
            known.tags.insert(g.id.clone(), g.tags);
            known.rules.entry(g.id).or_insert(g.from_groups);
        }
        for target in unknown {
            let what = if target.starts_with("i-") {
                format!("instance {target}")
            } else {
                format!("the network interface of {target}")
            };
            let chosen = match candidates.get(&target) {
                None => Err(format!("{what} was not found")),
                Some(c) => choose(&what, c, &known.tags, &cluster_tag),
            };
            known.target_groups.insert(target, (Instant::now(), chosen));
        }
        Ok(())
    }

    /// Before targets of `lb` are registered (or the load balancer is made): the backend group
    /// exists, and every target's security group admits it on the ports `lb` needs. Returns
    /// what the user should hear about: targets whose group cloudlb may not change.
    pub(crate) async fn ensure_backend(
        &self,
        lb: &LoadBalancer,
        vpc: &str,
    ) -> Result<Vec<String>, ProviderError> {
        let Some(access) = &lb.security.backend else {
            return Ok(vec![]);
        };
        let group = self
            .backend_group(Some(vpc))
            .await?
            .ok_or_else(|| ProviderError::InvalidConfig("backend security group missing".into()))?;
        let targets: BTreeSet<String> = lb
            .target_groups
            .iter()
            .flat_map(|tg| tg.targets.iter().map(|t| t.id.clone()))
            .collect();
        self.learn_targets(&targets).await?;
        let wanted = rules_for(
            &access.ports,
            self.settings.node_port_range,
            &group,
            &self.backend_rule_description(),
        );
        let (missing, warnings) = {
            let known = self.backend.lock();
            let mut warnings = Vec::new();
            let mut missing: BTreeMap<String, Vec<GroupRule>> = BTreeMap::new();
            for target in &targets {
                match known.target(target) {
                    Some(Ok(sg)) => {
                        let have = known.rules.get(sg);
                        for r in &wanted {
                            let present = have.is_some_and(|h| admits(h, r));
                            let queued = missing.get(sg).is_some_and(|m| m.contains(r));
                            if !present && !queued {
                                missing.entry(sg.clone()).or_default().push(r.clone());
                            }
                        }
                    }
                    Some(Err(why)) => warnings.push(why.clone()),
                    None => {}
                }
            }
            (missing, warnings)
        };
        for (sg, rules) in missing {
            let added = self
                .ec2
                .change_group_ingress(&self.calls, &sg, &rules, Change::Add)
                .await;
            match added {
                Ok(()) => {}
                // Already there (made by hand the same way, or by a run that crashed).
                Err(e) if e.is_duplicate() => {}
                Err(e) => return Err(e.into()),
            }
            self.backend
                .lock()
                .rules
                .entry(sg)
                .or_default()
                .extend(rules);
        }
        Ok(warnings)
    }

    /// Removes the rules cloudlb made that no load balancer of `wanted` (every one this
    /// installation manages) needs any more; with none left that wants the backend group,
    /// deletes it too. A group still attached to a load balancer that is being deleted is left
    /// for the next prune.
    pub(crate) async fn prune_backend_impl(
        &self,
        wanted: &[SharedNeed],
    ) -> Result<(), ProviderError> {
        let Some(group) = self.backend_group(None).await? else {
            return Ok(());
        };
        let description = self.backend_rule_description();
        let targets: BTreeSet<String> = wanted
            .iter()
            .flat_map(|n| n.targets.iter().cloned())
            .collect();
        self.learn_targets(&targets).await?;
        // The rules each target set needs; Services on the same nodes with the same rules
        // (nodePorts admitted as the whole range) count once.
        let mut needed: HashMap<String, BTreeSet<GroupRule>> = HashMap::new();
        {
            let mut by_set: HashSet<(*const BTreeSet<String>, BTreeSet<GroupRule>)> =
                HashSet::new();
            let known = self.backend.lock();
            for need in wanted {
                let rules = rules_for(
                    &need.backend.ports,
                    self.settings.node_port_range,
                    &group,
                    &description,
                );
                if !by_set.insert((Arc::as_ptr(&need.targets), rules.clone())) {
                    continue;
                }
                for t in need.targets.iter() {
                    if let Some(Ok(sg)) = known.target(t) {
                        needed
                            .entry(sg.clone())
                            .or_default()
                            .extend(rules.iter().cloned());
                    }
                }
            }
        }
        // Every group holding a rule that admits the backend group.
        let filter = Filter::new("ip-permission.group-id", [group.clone()]);
        let holders = self
            .ec2
            .describe_security_groups(&self.calls, &[filter])
            .await?;
        for g in holders {
            let ours: Vec<GroupRule> = g
                .from_groups
                .iter()
                .filter(|r| r.source == group && r.description == description)
                .filter(|r| !needed.get(&g.id).is_some_and(|n| n.contains(r)))
                .cloned()
                .collect();
            if !ours.is_empty() {
                self.ec2
                    .change_group_ingress(&self.calls, &g.id, &ours, Change::Remove)
                    .await
                    .found()?;
            }
            self.backend.lock().rules.insert(
                g.id.clone(),
                g.from_groups
                    .into_iter()
                    .filter(|r| !ours.contains(r))
                    .collect(),
            );
        }
        if wanted.is_empty() {
            match self
                .ec2
                .delete_security_group(&self.calls, &group)
                .await
                .found()
            {
                Ok(_) => {
                    let mut known = self.backend.lock();
                    known.group = None;
                    known.rules.clear();
                }
                Err(e) if e.is_in_use() => {
                    tracing::info!(
                        group,
                        "backend security group still in use; deleting it at the next prune"
                    );
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Whether the rules `have` already admit `want` (the same source, protocol and a range that
/// covers it).
fn admits(have: &BTreeSet<GroupRule>, want: &GroupRule) -> bool {
    have.iter().any(|h| {
        h.source == want.source
            && h.protocol == want.protocol
            && h.from <= want.from
            && want.to <= h.to
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(protocol: &str, port: u16, node_port: bool) -> BackendPort {
        BackendPort {
            protocol: protocol.into(),
            port,
            node_port,
        }
    }

    fn spans(rules: &BTreeSet<GroupRule>) -> Vec<(String, u16, u16)> {
        rules
            .iter()
            .map(|r| (r.protocol.clone(), r.from, r.to))
            .collect()
    }

    #[test]
    fn node_ports_become_the_range_and_pod_ports_merge_where_adjacent() {
        let ports = BTreeSet::from([
            port("tcp", 30080, true),
            port("tcp", 31443, true),
            port("udp", 30053, true),
            port("tcp", 10256, true),
            port("tcp", 8080, false),
            port("tcp", 8081, false),
            port("tcp", 9090, false),
            port("udp", 5353, false),
        ]);
        let rules = rules_for(&ports, (30000, 32767), "sg-backend", "d");
        assert_eq!(
            spans(&rules),
            [
                ("tcp".to_string(), 8080, 8081),
                ("tcp".to_string(), 9090, 9090),
                ("tcp".to_string(), 10256, 10256),
                ("tcp".to_string(), 30000, 32767),
                ("udp".to_string(), 5353, 5353),
                ("udp".to_string(), 30000, 32767),
            ]
        );
        assert!(
            rules
                .iter()
                .all(|r| r.source == "sg-backend" && r.description == "d")
        );
    }

    #[test]
    fn the_group_tagged_for_the_cluster_else_the_only_one() {
        let tag = "kubernetes.io/cluster/c1";
        let group = |id: &str, tagged: bool| {
            let tags = if tagged {
                BTreeMap::from([(tag.to_string(), "owned".to_string())])
            } else {
                BTreeMap::new()
            };
            (id.to_string(), tags)
        };
        let groups: HashMap<String, BTreeMap<String, String>> = [
            group("sg-a", false),
            group("sg-b", true),
            group("sg-c", false),
            group("sg-d", true),
        ]
        .into();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            choose("i-1", &ids(&["sg-a", "sg-b"]), &groups, tag),
            Ok("sg-b".into())
        );
        assert_eq!(
            choose("i-1", &ids(&["sg-a"]), &groups, tag),
            Ok("sg-a".into())
        );
        let two = choose("instance i-1", &ids(&["sg-a", "sg-c"]), &groups, tag).unwrap_err();
        assert!(
            two.contains("instance i-1 has 2 security groups (sg-a, sg-c) and none is tagged"),
            "{two}"
        );
        let both = choose("i-1", &ids(&["sg-b", "sg-d"]), &groups, tag).unwrap_err();
        assert!(
            both.contains("tagged kubernetes.io/cluster/c1 (sg-b, sg-d)"),
            "{both}"
        );
        assert!(choose("i-1", &[], &groups, tag).is_err());
    }

    #[test]
    fn a_wider_rule_admits_a_narrower_one() {
        let rule = |from, to| GroupRule {
            protocol: "tcp".into(),
            from,
            to,
            source: "sg-b".into(),
            description: String::new(),
        };
        let have = BTreeSet::from([rule(30000, 32767)]);
        assert!(admits(&have, &rule(30000, 32767)));
        assert!(admits(&have, &rule(30080, 30080)));
        assert!(!admits(&have, &rule(8080, 8080)));
    }
}
