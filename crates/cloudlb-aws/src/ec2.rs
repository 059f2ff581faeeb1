//! The EC2 side of the AWS provider: the calls cloudlb makes — security groups (describe,
//! create, authorize and revoke ingress, delete), subnets (describe), and the security groups of
//! the targets (describe instances and network interfaces) — behind [`Ec2`], in our own types. The rest of the provider never sees an EC2 SDK type; [`SdkEc2`] is the one
//! implementation, through `aws-sdk-ec2`, each call through [`Calls`] (rate limit, retries,
//! counting).

use super::Change;
use super::calls::Calls;
use super::error::AwsError;
use aws_sdk_ec2::types as sdk;
use cloudlb_core::model::IngressRule;
use std::collections::{BTreeMap, BTreeSet};

/// A filter of a Describe call: the field and the values it may have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    pub name: String,
    pub values: Vec<String>,
}

impl Filter {
    pub(crate) fn new(name: &str, values: impl IntoIterator<Item = String>) -> Self {
        Filter {
            name: name.to_string(),
            values: values.into_iter().collect(),
        }
    }
}

/// A security group as cloudlb reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SecurityGroup {
    pub id: String,
    pub name: String,
    pub tags: BTreeMap<String, String>,
    /// The single-port TCP/UDP rules by CIDR (the kind cloudlb writes on its frontend groups);
    /// others are left out.
    pub ingress: BTreeSet<IngressRule>,
    /// The TCP/UDP rules that admit another security group (the kind cloudlb writes on the
    /// targets' groups).
    pub from_groups: BTreeSet<GroupRule>,
}

/// An ingress rule admitting the security group `source` on `protocol` ports `from..=to`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GroupRule {
    pub protocol: String,
    pub from: u16,
    pub to: u16,
    pub source: String,
    /// Its description: cloudlb marks the rules it makes, and removes no other.
    pub description: String,
}

/// What subnet discovery needs to know of one available subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Subnet {
    pub id: String,
    pub vpc_id: String,
    pub zone: String,
    pub tags: BTreeMap<String, String>,
}

#[async_trait::async_trait]
pub(crate) trait Ec2: Send + Sync + std::fmt::Debug {
    /// Every page.
    async fn describe_security_groups(
        &self,
        calls: &Calls,
        filters: &[Filter],
    ) -> Result<Vec<SecurityGroup>, AwsError>;

    /// The new group's id (`None` if the answer had none), tagged at creation.
    async fn create_security_group(
        &self,
        calls: &Calls,
        name: &str,
        description: &str,
        vpc: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Option<String>, AwsError>;

    /// Adds (authorizes) or removes (revokes) the ingress `rules` of the group `id`.
    async fn change_ingress(
        &self,
        calls: &Calls,
        id: &str,
        rules: &[IngressRule],
        change: Change,
    ) -> Result<(), AwsError>;

    async fn delete_security_group(&self, calls: &Calls, id: &str) -> Result<(), AwsError>;

    /// Sets `tags` on the resource `id` (CreateTags).
    async fn create_tags(
        &self,
        calls: &Calls,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), AwsError>;

    /// Removes the tag `keys` from the resource `id` (DeleteTags), whatever their values.
    async fn delete_tags(&self, calls: &Calls, id: &str, keys: &[String]) -> Result<(), AwsError>;

    /// Adds or removes the rules admitting other security groups, on the group `id`.
    async fn change_group_ingress(
        &self,
        calls: &Calls,
        id: &str,
        rules: &[GroupRule],
        change: Change,
    ) -> Result<(), AwsError>;

    /// The security groups of each instance of `ids` (those it has); instances that do not
    /// exist are left out.
    async fn instance_security_groups(
        &self,
        calls: &Calls,
        ids: &[String],
    ) -> Result<Vec<(String, Vec<String>)>, AwsError>;

    /// The security groups of the network interface holding each private IP of `ips`; IPs no
    /// interface holds are left out.
    async fn address_security_groups(
        &self,
        calls: &Calls,
        ips: &[String],
    ) -> Result<Vec<(String, Vec<String>)>, AwsError>;

    /// The IPv4 CIDR blocks (primary and secondary, associated) of the VPC `id`.
    async fn vpc_cidr_blocks(&self, calls: &Calls, id: &str) -> Result<Vec<String>, AwsError>;

    /// Every page; only available subnets.
    async fn describe_subnets(
        &self,
        calls: &Calls,
        filters: &[Filter],
        ids: &[String],
    ) -> Result<Vec<Subnet>, AwsError>;
}

/// [`Ec2`] through the AWS SDK.
#[derive(Debug)]
pub(crate) struct SdkEc2(pub aws_sdk_ec2::Client);

impl SdkEc2 {
    /// Authorizes (adds) or revokes (removes) `permissions` on the group `id`.
    async fn send_ingress(
        &self,
        calls: &Calls,
        id: &str,
        permissions: Vec<sdk::IpPermission>,
        change: Change,
    ) -> Result<(), AwsError> {
        let permissions = Some(permissions);
        match change {
            Change::Add => {
                let req = self.0.authorize_security_group_ingress();
                let req = req.group_id(id).set_ip_permissions(permissions);
                calls
                    .run("AuthorizeSecurityGroupIngress", || req.clone().send())
                    .await?;
            }
            Change::Remove => {
                let req = self.0.revoke_security_group_ingress();
                let req = req.group_id(id).set_ip_permissions(permissions);
                calls
                    .run("RevokeSecurityGroupIngress", || req.clone().send())
                    .await?;
            }
        }
        Ok(())
    }
}

fn sdk_tags(tags: &BTreeMap<String, String>) -> Vec<sdk::Tag> {
    tags.iter()
        .map(|(k, v)| sdk::Tag::builder().key(k).value(v).build())
        .collect()
}

fn sdk_filters(filters: &[Filter]) -> Option<Vec<sdk::Filter>> {
    (!filters.is_empty()).then(|| {
        filters
            .iter()
            .map(|f| {
                sdk::Filter::builder()
                    .name(&f.name)
                    .set_values(Some(f.values.clone()))
                    .build()
            })
            .collect()
    })
}

#[async_trait::async_trait]
impl Ec2 for SdkEc2 {
    async fn describe_security_groups(
        &self,
        calls: &Calls,
        filters: &[Filter],
    ) -> Result<Vec<SecurityGroup>, AwsError> {
        let req = self
            .0
            .describe_security_groups()
            .set_filters(sdk_filters(filters));
        let groups = calls.pages("DescribeSecurityGroups", false, req).await?;
        Ok(groups.iter().filter_map(group).collect())
    }

    async fn create_security_group(
        &self,
        calls: &Calls,
        name: &str,
        description: &str,
        vpc: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<Option<String>, AwsError> {
        let spec = sdk::TagSpecification::builder()
            .resource_type(sdk::ResourceType::SecurityGroup)
            .set_tags(Some(sdk_tags(tags)))
            .build();
        let req = self
            .0
            .create_security_group()
            .group_name(name)
            .description(description)
            .vpc_id(vpc)
            .tag_specifications(spec);
        let resp = calls
            .run("CreateSecurityGroup", || req.clone().send())
            .await?;
        Ok(resp.group_id)
    }

    async fn change_ingress(
        &self,
        calls: &Calls,
        id: &str,
        rules: &[IngressRule],
        change: Change,
    ) -> Result<(), AwsError> {
        self.send_ingress(calls, id, ip_permissions(rules), change)
            .await
    }

    async fn delete_security_group(&self, calls: &Calls, id: &str) -> Result<(), AwsError> {
        let req = self.0.delete_security_group().group_id(id);
        calls
            .run("DeleteSecurityGroup", || req.clone().send())
            .await?;
        Ok(())
    }

    async fn create_tags(
        &self,
        calls: &Calls,
        id: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), AwsError> {
        let req = self
            .0
            .create_tags()
            .resources(id)
            .set_tags(Some(sdk_tags(tags)));
        calls.run("CreateTags", || req.clone().send()).await?;
        Ok(())
    }

    async fn delete_tags(&self, calls: &Calls, id: &str, keys: &[String]) -> Result<(), AwsError> {
        let tags = keys
            .iter()
            .map(|k| sdk::Tag::builder().key(k).build())
            .collect();
        let req = self.0.delete_tags().resources(id).set_tags(Some(tags));
        calls.run("DeleteTags", || req.clone().send()).await?;
        Ok(())
    }

    async fn change_group_ingress(
        &self,
        calls: &Calls,
        id: &str,
        rules: &[GroupRule],
        change: Change,
    ) -> Result<(), AwsError> {
        self.send_ingress(calls, id, group_permissions(rules), change)
            .await
    }

    async fn instance_security_groups(
        &self,
        calls: &Calls,
        ids: &[String],
    ) -> Result<Vec<(String, Vec<String>)>, AwsError> {
        let filter = Filter::new("instance-id", ids.iter().cloned());
        let req = self
            .0
            .describe_instances()
            .set_filters(sdk_filters(&[filter]));
        let reservations = calls.pages("DescribeInstances", false, req).await?;
        Ok(reservations
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| Some((i.instance_id.clone()?, group_ids(i.security_groups()))))
            .collect())
    }

    async fn address_security_groups(
        &self,
        calls: &Calls,
        ips: &[String],
    ) -> Result<Vec<(String, Vec<String>)>, AwsError> {
        let filter = Filter::new("addresses.private-ip-address", ips.iter().cloned());
        let req = self
            .0
            .describe_network_interfaces()
            .set_filters(sdk_filters(&[filter]));
        let interfaces = calls.pages("DescribeNetworkInterfaces", false, req).await?;
        let mut out = Vec::new();
        for eni in &interfaces {
            let groups = group_ids(eni.groups());
            for a in eni.private_ip_addresses() {
                if let Some(ip) = a.private_ip_address.as_ref().filter(|ip| ips.contains(ip)) {
                    out.push((ip.clone(), groups.clone()));
                }
            }
        }
        Ok(out)
    }

    async fn vpc_cidr_blocks(&self, calls: &Calls, id: &str) -> Result<Vec<String>, AwsError> {
        let req = self.0.describe_vpcs().vpc_ids(id);
        let out = calls.run("DescribeVpcs", || req.clone().send()).await?;
        let mut blocks = Vec::new();
        for vpc in out.vpcs() {
            blocks.extend(vpc.cidr_block.clone());
            for a in vpc.cidr_block_association_set() {
                let associated = a
                    .cidr_block_state
                    .as_ref()
                    .and_then(|s| s.state.as_ref())
                    .is_none_or(|s| *s == sdk::VpcCidrBlockStateCode::Associated);
                if associated && let Some(b) = &a.cidr_block {
                    blocks.push(b.clone());
                }
            }
        }
        blocks.sort();
        blocks.dedup();
        Ok(blocks)
    }

    async fn describe_subnets(
        &self,
        calls: &Calls,
        filters: &[Filter],
        ids: &[String],
    ) -> Result<Vec<Subnet>, AwsError> {
        let ids = (!ids.is_empty()).then(|| ids.to_vec());
        let req = self.0.describe_subnets().set_filters(sdk_filters(filters));
        let subnets = calls
            .pages("DescribeSubnets", false, req.set_subnet_ids(ids))
            .await?;
        Ok(subnets.iter().filter_map(subnet).collect())
    }
}

fn tag_map(tags: Option<&[sdk::Tag]>) -> BTreeMap<String, String> {
    tags.unwrap_or_default()
        .iter()
        .filter_map(|t| Some((t.key.clone()?, t.value.clone().unwrap_or_default())))
        .collect()
}

fn group(g: &sdk::SecurityGroup) -> Option<SecurityGroup> {
    Some(SecurityGroup {
        id: g.group_id.clone()?,
        name: g.group_name.clone().unwrap_or_default(),
        tags: tag_map(g.tags.as_deref()),
        ingress: ingress_rules(g.ip_permissions.as_deref().unwrap_or_default()),
        from_groups: group_rules(g.ip_permissions.as_deref().unwrap_or_default()),
    })
}

/// The ids of the security groups an instance or a network interface has.
fn group_ids(groups: &[sdk::GroupIdentifier]) -> Vec<String> {
    groups.iter().filter_map(|g| g.group_id.clone()).collect()
}

/// The TCP/UDP rules admitting other security groups, of EC2 permissions.
fn group_rules(perms: &[sdk::IpPermission]) -> BTreeSet<GroupRule> {
    let mut out = BTreeSet::new();
    for p in perms {
        let protocol = match p.ip_protocol.as_deref() {
            Some("tcp") | Some("6") => "tcp",
            Some("udp") | Some("17") => "udp",
            _ => continue,
        };
        let (Some(from), Some(to)) = (
            p.from_port.and_then(|f| u16::try_from(f).ok()),
            p.to_port.and_then(|t| u16::try_from(t).ok()),
        ) else {
            continue;
        };
        for pair in p.user_id_group_pairs() {
            if let Some(source) = &pair.group_id {
                out.insert(GroupRule {
                    protocol: protocol.to_string(),
                    from,
                    to,
                    source: source.clone(),
                    description: pair.description.clone().unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// Rules admitting security groups as EC2 permissions: one per rule.
fn group_permissions(rules: &[GroupRule]) -> Vec<sdk::IpPermission> {
    rules
        .iter()
        .map(|r| {
            let pair = sdk::UserIdGroupPair::builder()
                .group_id(&r.source)
                .description(&r.description)
                .build();
            sdk::IpPermission::builder()
                .ip_protocol(&r.protocol)
                .from_port(i32::from(r.from))
                .to_port(i32::from(r.to))
                .user_id_group_pairs(pair)
                .build()
        })
        .collect()
}

fn subnet(s: &sdk::Subnet) -> Option<Subnet> {
    if s.state
        .as_ref()
        .is_some_and(|st| *st != sdk::SubnetState::Available)
    {
        return None;
    }
    Some(Subnet {
        id: s.subnet_id.clone()?,
        vpc_id: s.vpc_id.clone().unwrap_or_default(),
        zone: s.availability_zone.clone().unwrap_or_default(),
        tags: tag_map(s.tags.as_deref()),
    })
}

/// The single-port TCP/UDP rules by CIDR of EC2 permissions.
fn ingress_rules(perms: &[sdk::IpPermission]) -> BTreeSet<IngressRule> {
    let mut out = BTreeSet::new();
    for p in perms {
        let protocol = match p.ip_protocol.as_deref() {
            Some("tcp") | Some("6") => "tcp",
            Some("udp") | Some("17") => "udp",
            _ => continue,
        };
        let (Some(from), Some(to)) = (p.from_port, p.to_port) else {
            continue;
        };
        let Ok(port) = u16::try_from(from) else {
            continue;
        };
        if from != to {
            continue;
        }
        let v4 = p
            .ip_ranges
            .iter()
            .flatten()
            .filter_map(|r| r.cidr_ip.clone());
        let v6 = p
            .ipv6_ranges
            .iter()
            .flatten()
            .filter_map(|r| r.cidr_ipv6.clone());
        let lists = p
            .prefix_list_ids
            .iter()
            .flatten()
            .filter_map(|l| l.prefix_list_id.clone());
        for cidr in v4.chain(v6).chain(lists) {
            out.insert(IngressRule {
                protocol: protocol.to_string(),
                port,
                cidr,
            });
        }
    }
    out
}

/// Our rules as EC2 permissions: one per rule.
fn ip_permissions(rules: &[IngressRule]) -> Vec<sdk::IpPermission> {
    rules
        .iter()
        .map(|r| {
            let b = sdk::IpPermission::builder()
                .ip_protocol(&r.protocol)
                .from_port(i32::from(r.port))
                .to_port(i32::from(r.port));
            if r.cidr.starts_with("pl-") {
                b.prefix_list_ids(sdk::PrefixListId::builder().prefix_list_id(&r.cidr).build())
            } else if r.cidr.contains(':') {
                b.ipv6_ranges(sdk::Ipv6Range::builder().cidr_ipv6(&r.cidr).build())
            } else {
                b.ip_ranges(sdk::IpRange::builder().cidr_ip(&r.cidr).build())
            }
            .build()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_round_trip() {
        let rules = vec![
            IngressRule {
                protocol: "tcp".into(),
                port: 80,
                cidr: "0.0.0.0/0".into(),
            },
            IngressRule {
                protocol: "udp".into(),
                port: 53,
                cidr: "::/0".into(),
            },
            IngressRule {
                protocol: "tcp".into(),
                port: 443,
                cidr: "pl-0123abcd".into(),
            },
        ];
        let back = ingress_rules(&ip_permissions(&rules));
        assert_eq!(back, rules.into_iter().collect());
    }

    #[test]
    fn only_available_subnets_with_an_id() {
        let available = sdk::Subnet::builder()
            .subnet_id("subnet-1")
            .vpc_id("vpc-1")
            .availability_zone("eu-west-1a")
            .state(sdk::SubnetState::Available)
            .tags(sdk::Tag::builder().key("Name").value("a").build())
            .build();
        let pending = sdk::Subnet::builder()
            .subnet_id("subnet-2")
            .state(sdk::SubnetState::Pending)
            .build();
        assert_eq!(
            subnet(&available),
            Some(Subnet {
                id: "subnet-1".into(),
                vpc_id: "vpc-1".into(),
                zone: "eu-west-1a".into(),
                tags: [("Name".to_string(), "a".to_string())].into(),
            })
        );
        assert_eq!(subnet(&pending), None);
        assert_eq!(subnet(&sdk::Subnet::builder().build()), None);
    }
}
