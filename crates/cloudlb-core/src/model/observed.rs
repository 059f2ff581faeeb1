//! What a provider observes in the cloud for one Service: the counterpart of the desired model
//! that [`plan`](crate::plan) compares it with.

use crate::model::{HealthCheck, IngressRule, IpAddressType, Protocol, Scheme, Target, TargetType};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// What exists in the cloud for one Service's load balancer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub lb: Option<ObservedLb>,
    pub listeners: Vec<ObservedListener>,
    pub target_groups: Vec<ObservedTargetGroup>,
    pub security_group: Option<ObservedSecurityGroup>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LbState {
    Provisioning,
    Active,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedLb {
    pub arn: String,
    pub name: String,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub dns_name: String,
    pub state: LbState,
    pub security_groups: Vec<String>,
    /// Every attribute the cloud reports.
    pub attributes: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedListener {
    pub arn: String,
    pub port: u16,
    pub protocol: Protocol,
    /// ARN of the target group the default action forwards to.
    pub target_group_arn: Option<String>,
    pub certificates: Vec<String>,
    pub ssl_policy: Option<String>,
    pub alpn_policy: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedTargetGroup {
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedSecurityGroup {
    pub id: String,
    pub name: String,
    pub ingress: BTreeSet<IngressRule>,
}
