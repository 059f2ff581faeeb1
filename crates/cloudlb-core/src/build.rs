//! Service + eligible Nodes + config → the desired model. Pure: no client, no IO; golden-tested.

use crate::config::LbConfig;
use crate::model::{
    Desired, FrontendSecurityGroup, HealthCheck, HealthCheckProtocol, IngressRule, Listener,
    LoadBalancer, LocalSpec, Protocol, Security, ServiceRef, Target, TargetGroup, TargetType,
    naming, tags,
};
use k8s_openapi::api::core::v1::{Node, Service};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// Label that keeps a node out of every external load balancer (Kubernetes service controller).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Taints of nodes that are going away.
pub const DRAINING_TAINTS: &[&str] = &["ToBeDeletedByClusterAutoscaler", "karpenter.sh/disrupted"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    #[error("Service has no namespace, name or uid yet")]
    Incomplete,
    #[error("{0}")]
    Invalid(String),
}

/// The desired model and what the user should hear about.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    pub desired: Desired,
    /// Nodes left out for a reason the user can fix (e.g. no providerID for instance targets).
    pub warnings: Vec<String>,
}

pub fn service_ref(svc: &Service) -> Result<ServiceRef, BuildError> {
    let m = &svc.metadata;
    match (&m.namespace, &m.name, &m.uid) {
        (Some(ns), Some(n), Some(u)) => Ok(ServiceRef {
            namespace: ns.clone(),
            name: n.clone(),
            uid: u.clone(),
        }),
        _ => Err(BuildError::Incomplete),
    }
}

/// The load-balancer name the Service has or would have.
pub fn lb_name(cluster: &str, svc: &ServiceRef, cfg: Option<&LbConfig>) -> String {
    cfg.and_then(|c| c.name.clone())
        .unwrap_or_else(|| naming::load_balancer_name(cluster, &svc.namespace, &svc.name, &svc.uid))
}

/// Whether a node may receive load-balancer traffic at all (service-controller rules): not being
/// deleted, not tainted for removal, not labelled excluded. NotReady nodes stay: health checks
/// decide.
pub fn node_eligible(node: &Node) -> bool {
    if node.metadata.deletion_timestamp.is_some() {
        return false;
    }
    if let Some(v) = node
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(EXCLUDE_LABEL))
    {
        // Present means excluded unless the value says false.
        if !v.trim().eq_ignore_ascii_case("false") {
            return false;
        }
    }
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| DRAINING_TAINTS.contains(&t.key.as_str())));
    !tainted
}

fn matches_labels(node: &Node, selector: &BTreeMap<String, String>) -> bool {
    let labels = node.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// `aws:///us-east-1a/i-0abc` → `i-0abc`.
pub fn instance_id(node: &Node) -> Option<String> {
    let id = node.spec.as_ref()?.provider_id.as_deref()?;
    let rest = id.strip_prefix("aws://")?;
    let last = rest.rsplit('/').next()?;
    last.starts_with("i-").then(|| last.to_string())
}

pub fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// One listener's worth of Service ports (TCP and UDP on the same port merge into TCP_UDP).
struct PortGroup {
    port: u16,
    protocol: Protocol,
    node_port: u16,
}

impl PortGroup {
    /// Stable id of the group's target group in the model: `tcp-80`, `tcpudp-53`.
    fn key(&self) -> String {
        format!(
            "{}-{}",
            self.protocol.as_aws().to_ascii_lowercase().replace('_', ""),
            self.port
        )
    }
}

fn port_groups(svc: &Service, cfg: &LbConfig) -> Result<Vec<PortGroup>, BuildError> {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut by_port: BTreeMap<u16, Vec<(String, u16)>> = BTreeMap::new();
    for p in &ports {
        let port = u16::try_from(p.port).map_err(|_| {
            BuildError::Invalid(format!("spec.ports: port {} is out of range", p.port))
        })?;
        let node_port = p
            .node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                BuildError::Invalid(format!(
                    "spec.ports: port {port} has no nodePort allocated yet"
                ))
            })?;
        by_port.entry(port).or_default().push((
            p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            node_port,
        ));
    }
    let mut out = Vec::new();
    for (port, entries) in by_port {
        let has = |proto: &str| entries.iter().find(|(p, _)| p == proto).map(|(_, n)| *n);
        let (protocol, node_port) = match (has("TCP"), has("UDP")) {
            (Some(t), Some(u)) if t == u => (Protocol::TcpUdp, t),
            (Some(t), Some(u)) => {
                return Err(BuildError::Invalid(format!(
                    "spec.ports: port {port} is both TCP (nodePort {t}) and UDP (nodePort {u}); one TCP_UDP listener needs one nodePort: set the same spec.ports[].nodePort on both"
                )));
            }
            (Some(t), None) if cfg.tls_ports.contains(&port) => (Protocol::Tls, t),
            (Some(t), None) => (Protocol::Tcp, t),
            (None, Some(u)) => (Protocol::Udp, u),
            (None, None) => continue,
        };
        out.push(PortGroup {
            port,
            protocol,
            node_port,
        });
    }
    Ok(out)
}

/// kube-proxy's health endpoint on every node (`--healthz-bind-address`, default port 10256).
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;

/// The health check of one target group. `udp_only`: a TCP check on the traffic port cannot
/// work (kube-proxy's UDP nodePort has no TCP side), so such groups default to kube-proxy's
/// `/healthz` on port 10256, as the cloud-provider-aws does.
fn health_check(svc: &Service, cfg: &LbConfig, udp_only: bool) -> HealthCheck {
    let spec = svc.spec.clone().unwrap_or_default();
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    let hc_node_port = spec
        .health_check_node_port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0);
    let c = &cfg.health_check;
    let (def_proto, def_port, def_path) = match (local, hc_node_port) {
        (true, Some(p)) => (HealthCheckProtocol::Http, Some(p), "/healthz"),
        _ if udp_only => (
            HealthCheckProtocol::Http,
            Some(KUBE_PROXY_HEALTHZ_PORT),
            "/healthz",
        ),
        _ => (HealthCheckProtocol::Tcp, None, "/"),
    };
    let protocol = c.protocol.unwrap_or(def_proto);
    let http = protocol != HealthCheckProtocol::Tcp;
    HealthCheck {
        protocol,
        port: c.port.unwrap_or(def_port),
        path: http.then(|| c.path.clone().unwrap_or_else(|| def_path.to_string())),
        interval_seconds: c.interval_seconds.unwrap_or(10),
        timeout_seconds: c.timeout_seconds.unwrap_or(if http { 6 } else { 10 }),
        healthy_threshold: c.healthy_threshold.unwrap_or(if local { 2 } else { 3 }),
        unhealthy_threshold: c.unhealthy_threshold.unwrap_or(if local { 2 } else { 3 }),
        success_codes: http.then(|| c.success_codes.clone().unwrap_or_else(|| "200-399".into())),
    }
}

/// Builds the desired model for a Service that wants a load balancer of ours.
/// `nodes` may be owned Nodes or the `Arc`s of a reflector store: no Node is cloned.
pub fn build<N: std::borrow::Borrow<Node>>(
    cluster: &str,
    svc: &Service,
    nodes: &[N],
    cfg: &LbConfig,
) -> Result<Built, BuildError> {
    let service = service_ref(svc)?;
    let name = lb_name(cluster, &service, Some(cfg));
    let mut warnings = Vec::new();

    let base_tags = base_tags(cluster, &service, cfg);
    let tagged = |resource: &str| {
        let mut t = base_tags.clone();
        t.insert(tags::RESOURCE.into(), resource.into());
        t
    };

    // The local proxy reaches nodes by address.
    let target_type = if cfg.local.is_some() {
        TargetType::Ip
    } else {
        cfg.target_type
    };

    let hosts = targets(nodes, cfg, target_type, &mut warnings);
    let shared = Shared {
        svc,
        cfg,
        lb_name: &name,
        service: &service,
        target_type,
        hosts: &hosts,
    };

    let groups = port_groups(svc, cfg)?;
    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    let mut ingress = BTreeSet::new();
    for g in &groups {
        let key = g.key();
        let mut attributes = BTreeMap::new();
        if cfg.local.is_none() {
            attributes.insert(
                "deregistration_delay.timeout_seconds".to_string(),
                "300".to_string(),
            );
            attributes.insert("proxy_protocol_v2.enabled".to_string(), "false".to_string());
            attributes.extend(cfg.tg_attributes.clone());
        }
        target_groups.push(shared.target_group(
            g,
            &key,
            attributes,
            tagged(&format!("target-group/{key}")),
        ));
        ingress.extend(ingress_rules(g, &cfg.source_ranges));
        listeners.push(listener(g, key, cfg));
    }
    let parts = Parts {
        service,
        name,
        listeners,
        target_groups,
        ingress,
        tags: tagged("load-balancer"),
    };
    let local = cfg.local.as_ref().map(|spec| LocalSpec {
        requested_address: requested_address(svc, &mut warnings),
        ..spec.clone()
    });
    Ok(Built {
        desired: assemble(cluster, svc, cfg, parts, local),
        warnings,
    })
}

/// The first entry of the Service's `status.loadBalancer.ingress`: the address it has.
pub fn status_ingress(svc: &Service) -> Option<&k8s_openapi::api::core::v1::LoadBalancerIngress> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .first()
}

/// The address the Service already has (its status), to be given again: it stays stable across
/// operator restarts. One that is not an IP address is left out with a warning.
fn requested_address(svc: &Service, warnings: &mut Vec<String>) -> Option<IpAddr> {
    let ip = status_ingress(svc).and_then(|i| i.ip.as_deref())?;
    match ip.trim().parse() {
        Ok(ip) => Some(ip),
        Err(_) => {
            warnings.push(format!(
                "status.loadBalancer.ingress[0].ip {ip:?} is not an IP address: not requested again"
            ));
            None
        }
    }
}

/// What [`build`] has made of the Service's ports and nodes.
struct Parts {
    service: ServiceRef,
    name: String,
    listeners: Vec<Listener>,
    target_groups: Vec<TargetGroup>,
    ingress: BTreeSet<IngressRule>,
    /// The load balancer's tags.
    tags: BTreeMap<String, String>,
}

/// The load balancer around the listeners and target groups: its security group, attributes,
/// placement and local settings.
fn assemble(
    cluster: &str,
    svc: &Service,
    cfg: &LbConfig,
    parts: Parts,
    local: Option<LocalSpec>,
) -> Desired {
    let Parts {
        service,
        name,
        listeners,
        target_groups,
        ingress,
        tags,
    } = parts;
    let frontend =
        (cfg.security_groups.is_empty() && cfg.local.is_none()).then(|| FrontendSecurityGroup {
            name: naming::security_group_name(&name),
            description: format!("cloudlb frontend for Service {service} in cluster {cluster}"),
            ingress,
        });
    // AWS attributes only: the local provider's settings are `local`.
    let mut attributes = BTreeMap::new();
    if cfg.local.is_none() {
        attributes.insert(
            "deletion_protection.enabled".to_string(),
            "false".to_string(),
        );
        attributes.insert(
            "load_balancing.cross_zone.enabled".to_string(),
            "false".to_string(),
        );
        attributes.insert("access_logs.s3.enabled".to_string(), "false".to_string());
        attributes.extend(cfg.lb_attributes.clone());
    }

    let lb = LoadBalancer {
        name: name.clone(),
        scheme: cfg.scheme,
        ip_address_type: cfg.ip_address_type,
        subnets: cfg.subnets.clone(),
        eip_allocations: cfg.eip_allocations.clone(),
        private_ipv4_addresses: cfg.private_ipv4_addresses.clone(),
        security: Security {
            frontend,
            extra_security_groups: cfg.security_groups.clone(),
        },
        attributes,
        tags,
        listeners,
        target_groups,
        status_ports: service_status_ports(svc),
        local,
    };
    Desired {
        service,
        lb_name: name,
        lb: Some(lb),
    }
}

/// Our ownership tags and the user's, shared by every resource of the Service.
fn base_tags(cluster: &str, service: &ServiceRef, cfg: &LbConfig) -> BTreeMap<String, String> {
    let mut base_tags = cfg.additional_tags.clone();
    base_tags.insert(tags::kubernetes_cluster(cluster), "owned".into());
    base_tags.insert(tags::CLUSTER.into(), cluster.into());
    base_tags.insert(tags::SERVICE_NAMESPACE.into(), service.namespace.clone());
    base_tags.insert(tags::SERVICE_NAME.into(), service.name.clone());
    base_tags.insert(tags::SERVICE_UID.into(), service.uid.clone());
    base_tags
}

/// Targets: every eligible node passing the per-Service label selector, by instance id or
/// address; a node without one is left out with a warning.
fn targets<N: std::borrow::Borrow<Node>>(
    nodes: &[N],
    cfg: &LbConfig,
    target_type: TargetType,
    warnings: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut hosts: BTreeSet<String> = BTreeSet::new();
    for node in nodes
        .iter()
        .map(|n| n.borrow())
        .filter(|n| node_eligible(n) && matches_labels(n, &cfg.target_node_labels))
    {
        let node_name = node.metadata.name.clone().unwrap_or_default();
        let id = match target_type {
            TargetType::Instance => instance_id(node)
                .ok_or("no spec.providerID of the form aws:///<zone>/<instance-id>"),
            TargetType::Ip => internal_ip(node).ok_or("no InternalIP address"),
        };
        match id {
            Ok(id) => {
                hosts.insert(id);
            }
            Err(why) => warnings.push(format!("node {node_name} is not a target: {why}")),
        }
    }
    hosts
}

/// What every target group of one Service shares.
struct Shared<'a> {
    svc: &'a Service,
    cfg: &'a LbConfig,
    lb_name: &'a str,
    service: &'a ServiceRef,
    target_type: TargetType,
    hosts: &'a BTreeSet<String>,
}

impl Shared<'_> {
    /// The target group of one port group; its name embeds the fields AWS cannot change.
    fn target_group(
        &self,
        g: &PortGroup,
        key: &str,
        attributes: BTreeMap<String, String>,
        tags: BTreeMap<String, String>,
    ) -> TargetGroup {
        let tg_protocol = match g.protocol {
            Protocol::Tls if !self.cfg.backend_tls => Protocol::Tcp,
            p => p,
        };
        let immutable = format!(
            "{}/{}/{}",
            tg_protocol.as_aws(),
            g.node_port,
            self.target_type.as_aws()
        );
        TargetGroup {
            key: key.to_string(),
            name: naming::target_group_name(
                self.lb_name,
                &self.service.namespace,
                &self.service.name,
                g.port,
                &immutable,
            ),
            protocol: tg_protocol,
            port: g.node_port,
            target_type: self.target_type,
            health_check: health_check(self.svc, self.cfg, g.protocol == Protocol::Udp),
            attributes,
            targets: self
                .hosts
                .iter()
                .map(|id| Target {
                    id: id.clone(),
                    port: g.node_port,
                })
                .collect(),
            tags,
        }
    }
}

/// The listener of one port group; TLS listeners carry the certificates and policy.
fn listener(g: &PortGroup, target_group: String, cfg: &LbConfig) -> Listener {
    let tls = g.protocol == Protocol::Tls;
    Listener {
        port: g.port,
        protocol: g.protocol,
        target_group,
        certificates: if tls {
            cfg.ssl_certificates.clone()
        } else {
            vec![]
        },
        ssl_policy: if tls { cfg.ssl_policy.clone() } else { None },
    }
}

/// The frontend rules that let the source ranges reach one listener.
fn ingress_rules(g: &PortGroup, source_ranges: &[String]) -> Vec<IngressRule> {
    let protos: &[&str] = match g.protocol {
        Protocol::Udp => &["udp"],
        Protocol::TcpUdp => &["tcp", "udp"],
        Protocol::Tcp | Protocol::Tls => &["tcp"],
    };
    protos
        .iter()
        .flat_map(|proto| {
            source_ranges.iter().map(|cidr| IngressRule {
                protocol: (*proto).to_string(),
                port: g.port,
                cidr: cidr.clone(),
            })
        })
        .collect()
}

/// The Service's ports as its status lists them.
fn service_status_ports(svc: &Service) -> Vec<(u16, Protocol)> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let proto = if p.protocol.as_deref() == Some("UDP") {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            u16::try_from(p.port).ok().map(|port| (port, proto))
        })
        .collect()
}

#[cfg(test)]
mod tests;
