//! `LoadBalancerClass` (`cloudlb.io/v1alpha1`, cluster-scoped): cluster-wide defaults for the
//! Services that use it, like a StorageClass for load balancers.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which provider serves the class's load balancers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Aws,
    Local,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 2] = [ProviderKind::Aws, ProviderKind::Local];
}

impl std::fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProviderKind::Aws => "aws",
            ProviderKind::Local => "local",
        })
    }
}

/// Defaults for every Service of this class. Service annotations override each field.
#[serde_with::skip_serializing_none]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "cloudlb.io",
    version = "v1alpha1",
    kind = "LoadBalancerClass",
    shortname = "lbc",
    status = "LoadBalancerClassStatus",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".spec.provider"}"#,
    printcolumn = r#"{"name":"Default","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"Services","type":"integer","jsonPath":".status.serviceCount"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerClassSpec {
    /// `aws` or `local`.
    pub provider: ProviderKind,
    /// Services of `type: LoadBalancer` without `spec.loadBalancerClass` use this class when no
    /// other controller acts on them: they are annotated
    /// `service.beta.kubernetes.io/aws-load-balancer-type: external` (the value the cloud's
    /// service controller leaves alone), or the class sets `adoptAllClasslessServices`.
    #[serde(default)]
    pub default: bool,
    /// With `default: true`: adopt every class-less `type: LoadBalancer` Service, even one
    /// without `service.beta.kubernetes.io/aws-load-balancer-type: external`. Only for clusters
    /// that run no cloud service controller (self-managed, bare metal): on EKS, GKE or AKS the
    /// cloud's own controller serves those Services too and each would get two load balancers.
    /// Services with another controller's finalizer or address are never adopted.
    #[serde(default)]
    pub adopt_all_classless_services: bool,
    /// Defaults for AWS Network Load Balancers (provider `aws`).
    pub aws: Option<AwsClassSpec>,
    /// Settings of the local provider (the operator serves the load balancer itself).
    pub local: Option<LocalClassSpec>,
}

impl LoadBalancerClassSpec {
    /// A default class of `provider` with nothing else set.
    pub fn default_of(provider: ProviderKind) -> Self {
        LoadBalancerClassSpec {
            provider,
            default: true,
            adopt_all_classless_services: false,
            aws: None,
            local: None,
        }
    }
}

/// Local provider settings.
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalClassSpec {
    /// Addresses handed to Services, a comma-separated list of CIDRs (`127.0.1.0/24`, routed to
    /// loopback on Linux with no set-up), ranges (`192.0.2.10-192.0.2.20`) and single addresses,
    /// IPv4 or IPv6, configured on the host. Default `127.0.1.0/24`.
    pub address_pool: Option<String>,
    /// `random` (default, like kube-proxy) or `round-robin`.
    pub algorithm: Option<String>,
    /// How long connections to a removed node may finish. Default 30.
    pub drain_timeout_seconds: Option<u32>,
}

/// AWS defaults; each field has the annotation of the same name (see docs/annotations.md).
#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AwsClassSpec {
    /// `internet-facing` or `internal`.
    pub scheme: Option<String>,
    /// `ipv4` or `dualstack`.
    pub ip_address_type: Option<String>,
    /// Subnet ids or Name tags; empty: discovered by tags.
    pub subnets: Option<Vec<String>>,
    /// `instance`, `node-ip` or `ip` (pods).
    pub target_type: Option<String>,
    pub health_check: Option<HealthCheckSpec>,
    pub cross_zone_load_balancing: Option<bool>,
    pub deletion_protection: Option<bool>,
    pub proxy_protocol: Option<bool>,
    /// Load-balancer attributes (`key: value`), e.g. `access_logs.s3.enabled: "true"`.
    pub load_balancer_attributes: Option<BTreeMap<String, String>>,
    /// Target-group attributes, e.g. `deregistration_delay.timeout_seconds: "30"`.
    pub target_group_attributes: Option<BTreeMap<String, String>>,
    /// Tags added to every resource.
    pub additional_tags: Option<BTreeMap<String, String>>,
    /// Security groups to attach instead of the one cloudlb manages.
    pub security_groups: Option<Vec<String>>,
    /// Default source ranges when a Service sets none.
    pub source_ranges: Option<Vec<String>>,
    /// Manage node security-group rules so the load balancer reaches the nodePorts.
    pub manage_backend_security_group_rules: Option<bool>,
    /// Only nodes with all these labels are targets.
    pub target_node_labels: Option<BTreeMap<String, String>>,
    pub ssl_negotiation_policy: Option<String>,
    /// How long a replaced load balancer keeps serving after the Service's status moved to its
    /// replacement (so DNS caches follow), in seconds; default 300.
    pub replacement_grace_period_seconds: Option<u32>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheckSpec {
    /// `tcp`, `http` or `https`.
    pub protocol: Option<String>,
    /// `traffic-port` or a port number.
    pub port: Option<String>,
    pub path: Option<String>,
    pub interval_seconds: Option<u32>,
    pub timeout_seconds: Option<u32>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub success_codes: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerClassStatus {
    /// Services currently served by this class.
    #[serde(default)]
    pub service_count: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<ClassCondition>,
}

#[serde_with::skip_serializing_none]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClassCondition {
    /// `Valid`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True` or `False`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: Option<String>,
}

/// The `spec.loadBalancerClass` prefix that routes a Service to a class of ours.
pub const CLASS_PREFIX: &str = "cloudlb.io/";
