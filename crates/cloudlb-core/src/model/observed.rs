//! What a provider observes in the cloud for one Service: the counterpart of the desired model
//! that the provider's plan ([`crate::provider::Provider::plan`]) compares it with.
//!
//! The types are shared by the providers; each fills in what it has. The `arn` fields are the
//! provider's id of the resource: an ARN on AWS; for the local provider the load balancer's
//! address (`127.0.1.5`), a listener's `address:port/PROTOCOL` (`127.0.1.5:80/TCP`) and a target
//! group's key in the model (`tcp-80`). The local provider has no security groups and no
//! attributes: it reports none.

use crate::model::{
    Algorithm, HealthCheck, IngressRule, IpAddressType, Protocol, Scheme, Target, TargetType,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What exists in the cloud for one Service's load balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub lb: Option<ObservedLb>,
    pub listeners: Vec<ObservedListener>,
    pub target_groups: Vec<ObservedTargetGroup>,
    pub security_group: Option<ObservedSecurityGroup>,
    /// What the user should hear about from the apply that made this (not part of the cloud's
    /// state: never planned against, never remembered).
    #[serde(skip)]
    pub notes: Vec<String>,
    /// IP targets the apply did not register because they are outside the load balancer's VPC
    /// (`ip:port`); like `notes`, not part of the cloud's state.
    #[serde(skip)]
    pub outside_vpc: Vec<String>,
}

/// The ids a provider gave to what it made for a model, as [`Observed::as_applied`] takes them.
pub struct AppliedIds<'a> {
    pub lb_arn: String,
    pub dns_name: String,
    /// The load balancer's security groups.
    pub security_groups: Vec<String>,
    /// The id of the model's frontend security group.
    pub frontend_group: Option<String>,
    pub subnets: Vec<String>,
    pub ipv6_source_nat: Option<bool>,
    /// The ARN of the listener on a port, of the target group of a name.
    pub listener_arn: &'a dyn Fn(u16) -> String,
    pub target_group_arn: &'a dyn Fn(&str) -> String,
}

impl Observed {
    /// What exists when the cloud matches `desired` exactly (targets, attributes and tags as
    /// the model has them), with `ids`; nothing for the empty model.
    pub fn as_applied(desired: &crate::model::Desired, ids: AppliedIds) -> Observed {
        use crate::model::tags::user_tags;
        let Some(lb) = &desired.lb else {
            return Observed::default();
        };
        let tg_arn = ids.target_group_arn;
        Observed {
            lb: Some(ObservedLb {
                arn: ids.lb_arn,
                name: lb.name.clone(),
                scheme: lb.scheme,
                ip_address_type: lb.ip_address_type,
                dns_name: ids.dns_name,
                state: LbState::Active,
                security_groups: ids.security_groups,
                attributes: lb.attributes.clone(),
                attributes_unread: false,
                subnets: ids.subnets,
                subnet_zones: BTreeMap::new(),
                ipv6_source_nat: ids.ipv6_source_nat,
                tags: user_tags(&lb.tags),
            }),
            listeners: lb
                .listeners
                .iter()
                .map(|l| ObservedListener {
                    arn: (ids.listener_arn)(l.port),
                    port: l.port,
                    protocol: l.protocol,
                    target_group_arn: lb
                        .target_groups
                        .iter()
                        .find(|t| t.key == l.target_group)
                        .map(|t| tg_arn(&t.name)),
                    certificates: l.certificates.clone(),
                    ssl_policy: l.ssl_policy.clone(),
                    alpn_policy: l.alpn_policy.clone(),
                    attributes: l.attributes.clone(),
                    tags: user_tags(&lb.tags),
                })
                .collect(),
            target_groups: lb
                .target_groups
                .iter()
                .map(|t| ObservedTargetGroup {
                    arn: tg_arn(&t.name),
                    name: t.name.clone(),
                    protocol: t.protocol,
                    port: t.port,
                    target_type: t.target_type,
                    health_check: t.health_check.clone(),
                    attributes: t.attributes.clone(),
                    targets: t.targets.clone(),
                    algorithm: None,
                    tags: user_tags(&t.tags),
                })
                .collect(),
            security_group: ids
                .frontend_group
                .zip(lb.security.frontend.as_ref())
                .map(|(id, f)| ObservedSecurityGroup {
                    id,
                    name: f.name.clone(),
                    ingress: f.ingress.clone(),
                    tags: user_tags(&lb.security_group_tags(f)),
                }),
            notes: Vec::new(),
            outside_vpc: Vec::new(),
        }
    }

    /// Whether planning `desired` against this needs the load balancer's attributes, which were
    /// not read ([`needs_lb_attributes`]): then the cloud is read first.
    pub fn misses_lb_attributes(&self, desired: &crate::model::Desired) -> bool {
        self.lb
            .as_ref()
            .is_some_and(|have| have.attributes_unread && needs_lb_attributes(desired, have.scheme))
    }

    /// The load balancer's name; empty when there is none.
    pub fn lb_name(&self) -> &str {
        self.lb.as_ref().map_or("", |l| l.name.as_str())
    }

    /// The load balancer's DNS name; empty when there is none (or it has none yet).
    pub fn dns_name(&self) -> &str {
        self.lb.as_ref().map_or("", |l| l.dns_name.as_str())
    }
}

/// Whether a plan of `desired` against a load balancer of scheme `have` reads its attributes:
/// when the model sets some (compared with what it has), when the load balancer is to go (the
/// model is empty) or to be replaced (another scheme): deletion protection refuses both before
/// any write. Otherwise they are left as they are and need no read (a drift check of a Service
/// that sets none costs one call less).
pub fn needs_lb_attributes(desired: &crate::model::Desired, have: Scheme) -> bool {
    desired
        .lb
        .as_ref()
        .is_none_or(|lb| !lb.attributes.is_empty() || lb.scheme != have)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LbState {
    Provisioning,
    Active,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedLb {
    /// The provider's id of the load balancer (see the module docs).
    pub arn: String,
    pub name: String,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub dns_name: String,
    pub state: LbState,
    pub security_groups: Vec<String>,
    /// Every attribute the cloud reports (none when `attributes_unread`).
    pub attributes: BTreeMap<String, String>,
    /// The attributes were not read: the model sets none and nothing it asks for depends on
    /// them ([`needs_lb_attributes`]); `attributes` then holds at most what was set since.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attributes_unread: bool,
    /// The subnets it is in (AWS), in the order the cloud reports them.
    #[serde(default)]
    pub subnets: Vec<String>,
    /// The zone of each of `subnets` the cloud reported one for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subnet_zones: BTreeMap<String, String>,
    /// Whether IPv6 source NAT is on; `None`: the cloud did not say (taken as matching).
    #[serde(default)]
    pub ipv6_source_nat: Option<bool>,
    /// Its tags other than the [reserved](crate::model::tags::is_reserved) ones (the user's,
    /// and any added by hand); ownership is checked when it is observed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedListener {
    /// The provider's id of the listener (see the module docs).
    pub arn: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The id ([`ObservedTargetGroup::arn`]) of the target group the default action forwards to.
    pub target_group_arn: Option<String>,
    pub certificates: Vec<String>,
    pub ssl_policy: Option<String>,
    /// The ALPN policy (`None`: the cloud reported none, which is AWS's `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn_policy: Option<String>,
    /// The attributes read (only of listeners the model sets attributes on).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Its tags other than the [reserved](crate::model::tags::is_reserved) ones (the user's,
    /// and any added by hand); ownership is checked when it is observed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedTargetGroup {
    /// The provider's id of the target group (see the module docs).
    pub arn: String,
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_type: TargetType,
    pub health_check: HealthCheck,
    /// Every attribute the cloud reports.
    pub attributes: BTreeMap<String, String>,
    /// Registered targets (not draining / unused ones).
    pub targets: BTreeSet<Target>,
    /// How the local provider picks a target in this group; `None` on AWS (an NLB has no
    /// choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// Its tags other than the [reserved](crate::model::tags::is_reserved) ones (the user's,
    /// and any added by hand); ownership is checked when it is observed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedSecurityGroup {
    pub id: String,
    pub name: String,
    pub ingress: BTreeSet<IngressRule>,
    /// Its tags other than the [reserved](crate::model::tags::is_reserved) ones (the user's,
    /// and any added by hand); ownership is checked when it is observed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}
