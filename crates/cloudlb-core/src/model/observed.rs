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

impl Observed {
    /// The load balancer's name; empty when there is none.
    pub fn lb_name(&self) -> &str {
        self.lb.as_ref().map_or("", |l| l.name.as_str())
    }

    /// The load balancer's DNS name; empty when there is none (or it has none yet).
    pub fn dns_name(&self) -> &str {
        self.lb.as_ref().map_or("", |l| l.dns_name.as_str())
    }
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
    /// Every attribute the cloud reports.
    pub attributes: BTreeMap<String, String>,
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
