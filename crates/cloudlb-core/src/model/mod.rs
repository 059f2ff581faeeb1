//! The desired state of one Service's load balancer: provider-neutral, pure data.
//!
//! Built by [`crate::build`] from a Service, the eligible Nodes and the merged config; compared with
//! what exists by [`crate::plan`]. A Service that no longer wants a load balancer has the *empty*
//! model (`lb: None`): deleting is applying the empty model.

pub mod checkpoint;
pub mod local;
pub mod naming;
pub mod observed;
pub mod state;

pub use local::{AddressPool, Algorithm, LocalSpec};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Which Service a model belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The whole desired state for one Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Desired {
    pub service: ServiceRef,
    /// The name the load balancer has (or would have): how the provider finds it, also for the
    /// empty model.
    pub lb_name: String,
    /// `None`: the Service wants no load balancer (deleted, no longer ours): remove everything.
    pub lb: Option<LoadBalancer>,
}

impl Desired {
    pub fn empty(service: ServiceRef, lb_name: String) -> Self {
        Desired {
            service,
            lb_name,
            lb: None,
        }
    }

    /// Stable hash of the desired state; equal hashes mean nothing to do on a resync.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&json);
        digest.iter().take(16).map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheme {
    InternetFacing,
    Internal,
}

impl Scheme {
    pub fn as_aws(self) -> &'static str {
        match self {
            Scheme::InternetFacing => "internet-facing",
            Scheme::Internal => "internal",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IpAddressType {
    Ipv4,
    Dualstack,
}

impl IpAddressType {
    pub fn as_aws(self) -> &'static str {
        match self {
            IpAddressType::Ipv4 => "ipv4",
            IpAddressType::Dualstack => "dualstack",
        }
    }
}

/// The address family of a target group's targets.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
}

impl IpFamily {
    pub fn as_aws(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "ipv4",
            IpFamily::Ipv6 => "ipv6",
        }
    }

    /// The `addressType` of the EndpointSlices of this family.
    pub fn endpoint_address_type(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "IPv4",
            IpFamily::Ipv6 => "IPv6",
        }
    }

    fn is_ipv4(&self) -> bool {
        *self == IpFamily::Ipv4
    }
}

/// IPv6 source NAT of a dualstack NLB (what its UDP listeners need): one IPv6 /80 prefix per
/// subnet that the load balancer sends from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceNat {
    /// One per subnet, in subnet order: a /80 from the subnet's IPv6 block, or
    /// [`SourceNat::AUTO`]; empty: `auto` for every subnet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
}

impl SourceNat {
    /// AWS picks the prefix from the subnet's IPv6 block.
    pub const AUTO: &str = "auto_assigned";

    /// The prefix of subnet `i` (of the load balancer's subnets, in order).
    pub fn prefix(&self, i: usize) -> &str {
        self.prefixes.get(i).map_or(Self::AUTO, String::as_str)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetType {
    Instance,
    Ip,
}

impl TargetType {
    pub fn as_aws(self) -> &'static str {
        match self {
            TargetType::Instance => "instance",
            TargetType::Ip => "ip",
        }
    }
}

/// What receives a Service's traffic (`cloudlb.io/target-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetMode {
    /// Every eligible node by instance id, at the nodePort; kube-proxy forwards to the pods.
    Instance,
    /// Every eligible node by its InternalIP, at the nodePort.
    NodeIp,
    /// The Service's ready pods by IP, at the targetPort, from its EndpointSlices (what
    /// aws-load-balancer-controller's `ip` target type means).
    Pods,
}

impl TargetMode {
    /// The target type of the cloud's target groups.
    pub fn target_type(self) -> TargetType {
        match self {
            TargetMode::Instance => TargetType::Instance,
            TargetMode::NodeIp | TargetMode::Pods => TargetType::Ip,
        }
    }
}

/// Listener / target-group protocols (NLB).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Protocol {
    Tcp,
    Udp,
    TcpUdp,
    Tls,
}

impl Protocol {
    pub fn as_aws(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::TcpUdp => "TCP_UDP",
            Protocol::Tls => "TLS",
        }
    }
    pub fn from_aws(s: &str) -> Option<Self> {
        Some(match s {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            "TCP_UDP" => Protocol::TcpUdp,
            "TLS" => Protocol::Tls,
            _ => return None,
        })
    }
}

/// Subnets the load balancer is placed in.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Subnets {
    /// Subnet ids or `Name` tags, as given by the user.
    Explicit(Vec<String>),
    /// Discover by the `kubernetes.io/role/elb` (internet-facing) or `kubernetes.io/role/internal-elb`
    /// tag plus the cluster tag, one subnet per zone.
    Discover,
}

/// One load balancer (an NLB on AWS; a set of sockets for the local provider).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    pub name: String,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub subnets: Subnets,
    /// EIP allocation ids, one per subnet, in subnet order (internet-facing only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eip_allocations: Vec<String>,
    /// Private IPv4 addresses, one per subnet, in subnet order (internal only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub private_ipv4_addresses: Vec<String>,
    /// IPv6 source NAT (dualstack only): on when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_source_nat: Option<SourceNat>,
    pub security: Security,
    /// AWS load-balancer attributes that differ from the AWS defaults (AWS only: the local
    /// provider's settings are [`LoadBalancer::local`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    /// Every tag: ownership tags plus user tags.
    pub tags: BTreeMap<String, String>,
    /// The user tag keys cloudlb has put on this Service's resources (recorded on the Service,
    /// [`crate::model::state::TAG_KEYS_ANNOTATION`]): the only keys it removes from them when
    /// they are no longer wanted, so a tag added by hand is never removed. Not part of the
    /// fingerprint (a record is no change to make).
    #[serde(default, skip_serializing)]
    pub applied_tag_keys: BTreeSet<String>,
    pub listeners: Vec<Listener>,
    pub target_groups: Vec<TargetGroup>,
    /// The scheme/address status the Service ends up with (ports listed in status).
    pub status_ports: Vec<(u16, Protocol)>,
    /// The local provider's settings (classes with `provider: local`); `None` for AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSpec>,
}

impl LoadBalancer {
    /// A load balancer served by the local provider with `local`'s settings and nothing yet to
    /// serve (no listeners or target groups): its AWS parts are at their plainest (discovered
    /// subnets, no security group, attributes or tags), which the local provider ignores.
    pub fn served_locally(name: String, local: LocalSpec) -> Self {
        LoadBalancer {
            name,
            scheme: Scheme::InternetFacing,
            ip_address_type: IpAddressType::Ipv4,
            subnets: Subnets::Discover,
            eip_allocations: vec![],
            private_ipv4_addresses: vec![],
            ipv6_source_nat: None,
            security: Security {
                frontend: None,
                extra_security_groups: vec![],
                backend: None,
            },
            attributes: BTreeMap::new(),
            tags: BTreeMap::new(),
            applied_tag_keys: BTreeSet::new(),
            listeners: vec![],
            target_groups: vec![],
            status_ports: vec![],
            local: Some(local),
        }
    }
    /// The tags of the frontend security group `frontend`: the load balancer's, plus its `Name`.
    pub fn security_group_tags(
        &self,
        frontend: &FrontendSecurityGroup,
    ) -> BTreeMap<String, String> {
        let mut tags = self.tags.clone();
        tags.insert("Name".into(), frontend.name.clone());
        tags
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Security {
    /// The security group we create and own for this load balancer, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendSecurityGroup>,
    /// User-supplied security groups attached instead of (or, never in addition to) ours.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_security_groups: Vec<String>,
    /// The cluster's backend security group is attached too, and the targets' security groups
    /// admit it on these ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<BackendAccess>,
}

/// What the targets must admit from the load balancer: the traffic and health-check ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendAccess {
    pub ports: BTreeSet<BackendPort>,
}

/// One port the targets admit from the load balancer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendPort {
    /// `tcp` or `udp` (EC2 spelling).
    pub protocol: String,
    pub port: u16,
    /// On the nodes (node targets): a port in the nodePort range may be admitted as the whole
    /// range.
    pub node_port: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FrontendSecurityGroup {
    pub name: String,
    pub description: String,
    pub ingress: BTreeSet<IngressRule>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    /// `tcp`, `udp` (EC2 spelling).
    pub protocol: String,
    pub port: u16,
    /// The source: a CIDR, or a managed prefix list (`pl-…`).
    pub cidr: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    pub port: u16,
    pub protocol: Protocol,
    /// Key of the target group this listener forwards to.
    pub target_group: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_policy: Option<String>,
    /// TLS listeners: the ALPN policy (`None`: left as the listener has it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn_policy: Option<String>,
    /// Listener attributes the user set (AWS only); others are left as the listener has them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetGroup {
    /// Stable id inside this model (`tcp-80`); the listener refers to it.
    pub key: String,
    /// Cloud name; it embeds a hash of the immutable fields, so changing one makes a new group.
    pub name: String,
    pub protocol: Protocol,
    /// The nodePort; for pod targets the numeric targetPort, or 1 when it is named (every target
    /// is registered with its own port, so this one is not on the data path).
    pub port: u16,
    pub target_type: TargetType,
    /// The targets' address family: IPv6 only for pod targets of a Service whose first IP family
    /// is IPv6 (on a dualstack load balancer).
    #[serde(default, skip_serializing_if = "IpFamily::is_ipv4")]
    pub ip_family: IpFamily,
    pub health_check: HealthCheck,
    /// Target-group attributes that differ from the AWS defaults.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
    pub targets: BTreeSet<Target>,
    pub tags: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Instance id (`i-…`) or IP address.
    pub id: String,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HealthCheckProtocol {
    Tcp,
    Http,
    Https,
}

impl HealthCheckProtocol {
    pub fn as_aws(self) -> &'static str {
        match self {
            HealthCheckProtocol::Tcp => "TCP",
            HealthCheckProtocol::Http => "HTTP",
            HealthCheckProtocol::Https => "HTTPS",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub protocol: HealthCheckProtocol,
    /// `None` = the traffic port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// HTTP(S) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub interval_seconds: u32,
    pub timeout_seconds: u32,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// HTTP(S) only, e.g. `200-399`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_codes: Option<String>,
}

impl HealthCheck {
    /// What a TCP Service gets with no health-check settings and `externalTrafficPolicy: Cluster`:
    /// a TCP connect to the traffic port every 10 s, 3 to turn healthy or unhealthy (the NLB
    /// defaults, as aws-load-balancer-controller sets them).
    pub const TCP_TRAFFIC_PORT: HealthCheck = HealthCheck {
        protocol: HealthCheckProtocol::Tcp,
        port: None,
        path: None,
        interval_seconds: 10,
        timeout_seconds: 10,
        healthy_threshold: 3,
        unhealthy_threshold: 3,
        success_codes: None,
    };

    pub fn port_string(&self) -> String {
        self.port
            .map_or_else(|| "traffic-port".to_string(), |p| p.to_string())
    }
}

/// Ownership tag keys put on every cloud resource we create.
pub mod tags {
    pub const CLUSTER: &str = "cloudlb.io/cluster";
    pub const SERVICE_NAMESPACE: &str = "cloudlb.io/service-namespace";
    pub const SERVICE_NAME: &str = "cloudlb.io/service-name";
    pub const SERVICE_UID: &str = "cloudlb.io/service-uid";
    pub const RESOURCE: &str = "cloudlb.io/resource";
    /// On resources a cloudlb installation shares between its Services (the backend security
    /// group): which installation.
    pub const INSTALLATION: &str = "cloudlb.io/installation";
    /// The tag the in-tree AWS provider and ALBC use to mark cluster ownership.
    pub fn kubernetes_cluster(cluster: &str) -> String {
        format!("kubernetes.io/cluster/{cluster}")
    }

    /// Whether `key` is one of cloudlb's own tags (ownership and identity, set at creation and
    /// checked, never planned) or reserved by AWS.
    pub fn is_reserved(key: &str) -> bool {
        key.starts_with("cloudlb.io/")
            || key.starts_with("kubernetes.io/cluster/")
            || key.starts_with("aws:")
    }

    /// The tags of `all` that are not [reserved](is_reserved): the user's (and any added by
    /// hand), which follow the Service in place.
    pub fn user_tags(
        all: &std::collections::BTreeMap<String, String>,
    ) -> std::collections::BTreeMap<String, String> {
        all.iter()
            .filter(|(k, _)| !is_reserved(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
