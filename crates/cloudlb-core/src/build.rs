//! Service + eligible Nodes + config → the desired model. Pure: no client, no IO; golden-tested.

use crate::config::LbConfig;
use crate::model::{
    BackendAccess, BackendPort, Desired, FrontendSecurityGroup, HealthCheck, HealthCheckProtocol,
    IngressRule, IpFamily, Listener, LoadBalancer, LocalSpec, Protocol, Security, ServiceRef,
    Target, TargetGroup, TargetMode, naming, tags,
};
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
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
    /// Pod targets: the Service ports with no ready endpoint (their target groups are empty).
    pub no_ready_endpoints: Vec<u16>,
}

/// The label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Whether `slice` belongs to the Service `namespace/name`.
pub fn slice_of(slice: &EndpointSlice, namespace: &str, name: &str) -> bool {
    slice.metadata.namespace.as_deref() == Some(namespace)
        && slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .is_some_and(|n| n == name)
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
pub fn lb_name(cluster: &str, svc: &ServiceRef, cfg: Option<&LbConfig>, generation: u32) -> String {
    cfg.and_then(|c| c.name.clone()).unwrap_or_else(|| {
        naming::load_balancer_name_of_generation(
            cluster,
            &svc.namespace,
            &svc.name,
            &svc.uid,
            generation,
        )
    })
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
    /// The nodePort (none allocated: only pod targets can be built).
    node_port: Option<u16>,
    /// The Service port whose endpoints are the pod targets (TCP's of a TCP_UDP pair).
    endpoint_port: EndpointPort,
    /// The numeric targetPort (the port itself when unset); None when it is named.
    target_port: Option<u16>,
}

/// A Service port as its EndpointSlices name it.
struct EndpointPort {
    name: String,
    protocol: String,
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

    /// The target group's port: the nodePort for node targets; for pods the numeric
    /// targetPort, or 1 when it is named (the targets carry their own ports).
    fn target_group_port(&self, mode: TargetMode) -> u16 {
        match mode {
            TargetMode::Pods => self.target_port.unwrap_or(1),
            TargetMode::Instance | TargetMode::NodeIp => self.node_port.unwrap_or_default(),
        }
    }
}

/// `spec.ports[].targetPort` as a number (the port when unset), or None when it is named.
fn numeric_target_port(p: &ServicePort) -> Result<Option<u16>, BuildError> {
    match &p.target_port {
        None => Ok(u16::try_from(p.port).ok()),
        Some(IntOrString::Int(n)) => u16::try_from(*n).map(Some).map_err(|_| {
            BuildError::Invalid(format!(
                "spec.ports: targetPort {n} of port {} is out of range",
                p.port
            ))
        }),
        Some(IntOrString::String(s)) => Ok(s.parse().ok()),
    }
}

fn port_groups(
    svc: &Service,
    cfg: &LbConfig,
    mode: TargetMode,
) -> Result<Vec<PortGroup>, BuildError> {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut by_port: BTreeMap<u16, Vec<&ServicePort>> = BTreeMap::new();
    for p in &ports {
        let port = u16::try_from(p.port).map_err(|_| {
            BuildError::Invalid(format!("spec.ports: port {} is out of range", p.port))
        })?;
        by_port.entry(port).or_default().push(p);
    }
    let mut out = Vec::new();
    for (port, entries) in by_port {
        let has = |proto: &str| {
            entries
                .iter()
                .copied()
                .find(|p| p.protocol.as_deref().unwrap_or("TCP") == proto)
        };
        let node_port = |p: &ServicePort| -> Result<Option<u16>, BuildError> {
            let n = p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n > 0);
            match (n, mode) {
                (None, TargetMode::Instance | TargetMode::NodeIp) => Err(BuildError::Invalid(
                    format!("spec.ports: port {port} has no nodePort allocated yet"),
                )),
                (n, _) => Ok(n),
            }
        };
        let (protocol, first) = match (has("TCP"), has("UDP")) {
            (Some(t), Some(u)) => {
                let (tn, un) = (node_port(t)?, node_port(u)?);
                if mode == TargetMode::Pods {
                    if t.target_port != u.target_port {
                        return Err(BuildError::Invalid(format!(
                            "spec.ports: port {port} is both TCP and UDP with different targetPorts; one TCP_UDP listener sends both to one pod port: set the same spec.ports[].targetPort on both"
                        )));
                    }
                } else if tn != un {
                    let (t, u) = (tn.unwrap_or_default(), un.unwrap_or_default());
                    return Err(BuildError::Invalid(format!(
                        "spec.ports: port {port} is both TCP (nodePort {t}) and UDP (nodePort {u}); one TCP_UDP listener needs one nodePort: set the same spec.ports[].nodePort on both"
                    )));
                }
                (Protocol::TcpUdp, t)
            }
            (Some(t), None) if cfg.tls_ports.contains(&port) => (Protocol::Tls, t),
            (Some(t), None) => (Protocol::Tcp, t),
            (None, Some(u)) => (Protocol::Udp, u),
            (None, None) => continue,
        };
        out.push(PortGroup {
            port,
            protocol,
            node_port: node_port(first)?,
            endpoint_port: EndpointPort {
                name: first.name.clone().unwrap_or_default(),
                protocol: first.protocol.clone().unwrap_or_else(|| "TCP".into()),
            },
            target_port: numeric_target_port(first)?,
        });
    }
    Ok(out)
}

/// The ready pods behind one Service port, by IP at the port their EndpointSlice gives (named
/// targetPorts resolve per slice). Endpoints that are not ready (starting, failing, or serving
/// while terminating) are left out, except pods waiting only for their readiness gate; so are slices of another address family than `family`.
fn pod_targets<S: std::borrow::Borrow<EndpointSlice>>(
    slices: &[S],
    port: &EndpointPort,
    family: IpFamily,
    gate_waiting: &BTreeSet<String>,
) -> BTreeSet<Target> {
    let mut targets = BTreeSet::new();
    for slice in slices.iter().map(|s| s.borrow()) {
        if slice.address_type != family.endpoint_address_type() {
            continue;
        }
        let number = slice.ports.iter().flatten().find_map(|p| {
            let name = p.name.as_deref().unwrap_or_default();
            let protocol = p.protocol.as_deref().unwrap_or("TCP");
            (name == port.name && protocol == port.protocol)
                .then_some(p.port)
                .flatten()
        });
        let Some(number) = number.and_then(|n| u16::try_from(n).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Unset means ready (discovery.k8s.io/v1).
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready);
            let waiting = endpoint.addresses.iter().any(|a| gate_waiting.contains(a));
            if ready == Some(false) && !waiting {
                continue;
            }
            for address in &endpoint.addresses {
                targets.insert(Target {
                    id: address.clone(),
                    port: number,
                });
            }
        }
    }
    targets
}

/// The address family of a Service's pod targets: its first IP family (`spec.ipFamilies[0]`,
/// which Kubernetes never changes), as aws-load-balancer-controller decides it. IPv4 when unset.
pub fn pod_family(spec: &ServiceSpec) -> IpFamily {
    match spec.ip_families.as_ref().and_then(|f| f.first()) {
        Some(f) if f == "IPv6" => IpFamily::Ipv6,
        _ => IpFamily::Ipv4,
    }
}

/// kube-proxy's health endpoint on every node (`--healthz-bind-address`, default port 10256).
pub const KUBE_PROXY_HEALTHZ_PORT: u16 = 10256;

/// The health check of one target group. `udp_only`: a TCP check on the traffic port cannot
/// work (kube-proxy's UDP nodePort has no TCP side), so such groups default to kube-proxy's
/// `/healthz` on port 10256, as the cloud-provider-aws does.
/// Pod targets are checked directly, on their traffic port (as aws-load-balancer-controller
/// does): neither kube-proxy nor the healthCheckNodePort is in their path.
fn health_check(svc: &Service, cfg: &LbConfig, mode: TargetMode, udp_only: bool) -> HealthCheck {
    let spec = svc.spec.clone().unwrap_or_default();
    let nodes = mode != TargetMode::Pods;
    let udp_only = udp_only && nodes;
    let local = nodes && spec.external_traffic_policy.as_deref() == Some("Local");
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
        // aws-load-balancer-controller: 6 s for the eTP=Local check, else 10 s, whatever the protocol.
        timeout_seconds: c.timeout_seconds.unwrap_or(if local { 6 } else { 10 }),
        healthy_threshold: c.healthy_threshold.unwrap_or(if local { 2 } else { 3 }),
        unhealthy_threshold: c.unhealthy_threshold.unwrap_or(if local { 2 } else { 3 }),
        success_codes: http.then(|| c.success_codes.clone().unwrap_or_else(|| "200-399".into())),
    }
}

/// What the targets are made of: the cluster's Nodes, and the Service's EndpointSlices (read
/// for pod targets only; slices of other Services are ignored). Either may be owned objects or
/// the `Arc`s of a store: nothing is cloned.
pub struct Backends<'a, N, S> {
    pub nodes: &'a [N],
    pub endpoint_slices: &'a [S],
    /// Addresses of pods whose endpoints are not ready only because they wait for their
    /// readiness gate (the load balancer's health check): registered all the same.
    pub gate_waiting: &'a BTreeSet<String>,
}

/// No pod waits for its readiness gate.
pub const NO_GATE_WAITING: &BTreeSet<String> = &BTreeSet::new();

impl<N, S> Clone for Backends<'_, N, S> {
    fn clone(&self) -> Self {
        Backends { ..*self }
    }
}

impl<'a, N> Backends<'a, N, EndpointSlice> {
    /// Nodes only: what node targets need.
    pub fn nodes(nodes: &'a [N]) -> Self {
        Backends {
            nodes,
            endpoint_slices: &[],
            gate_waiting: NO_GATE_WAITING,
        }
    }
}

/// The target mode the Service's load balancer uses: the local proxy reaches nodes by address.
pub fn target_mode(cfg: &LbConfig) -> TargetMode {
    match cfg.targets {
        TargetMode::Instance if cfg.local.is_some() => TargetMode::NodeIp,
        mode => mode,
    }
}

/// Builds the desired model for a Service that wants a load balancer of ours.
pub fn build<N: std::borrow::Borrow<Node>, S: std::borrow::Borrow<EndpointSlice>>(
    cluster: &str,
    svc: &Service,
    backends: Backends<'_, N, S>,
    cfg: &LbConfig,
) -> Result<Built, BuildError> {
    let service = service_ref(svc)?;
    let generation = crate::model::state::recorded_generation(svc);
    let name = lb_name(cluster, &service, Some(cfg), generation);
    let mut warnings = Vec::new();

    let base_tags = base_tags(cluster, &service, cfg);
    let tagged = |resource: &str| {
        let mut t = base_tags.clone();
        t.insert(tags::RESOURCE.into(), resource.into());
        t
    };

    let mode = target_mode(cfg);
    let hosts = match mode {
        TargetMode::Pods => BTreeSet::new(),
        _ => targets(backends.nodes, cfg, mode, &mut warnings),
    };
    let slices: Vec<&EndpointSlice> = backends
        .endpoint_slices
        .iter()
        .map(|s| s.borrow())
        .filter(|s| slice_of(s, &service.namespace, &service.name))
        .collect();
    let shared = Shared {
        svc,
        cfg,
        lb_name: &name,
        service: &service,
        mode,
        hosts: &hosts,
        slices: &slices,
        gate_waiting: backends.gate_waiting,
    };

    let groups = port_groups(svc, cfg, mode)?;
    let mut no_ready_endpoints = Vec::new();
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
        let tg = shared.target_group(g, &key, attributes, tagged(&format!("target-group/{key}")));
        if mode == TargetMode::Pods && tg.targets.is_empty() {
            no_ready_endpoints.push(g.port);
        }
        target_groups.push(tg);
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
        no_ready_endpoints,
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
    // AWS attributes only (the local provider's settings are `local`), and only those the user
    // set: the others are left as the load balancer has them, as aws-load-balancer-controller
    // does.
    let attributes = match cfg.local {
        None => cfg.lb_attributes.clone(),
        Some(_) => BTreeMap::new(),
    };

    let lb = LoadBalancer {
        name: name.clone(),
        scheme: cfg.scheme,
        ip_address_type: cfg.ip_address_type,
        subnets: cfg.subnets.clone(),
        eip_allocations: cfg.eip_allocations.clone(),
        private_ipv4_addresses: cfg.private_ipv4_addresses.clone(),
        ipv6_source_nat: match cfg.local {
            None => cfg.ipv6_source_nat.clone(),
            Some(_) => None,
        },
        security: Security {
            frontend,
            extra_security_groups: cfg.security_groups.clone(),
            backend: backend_access(cfg, &target_groups),
        },
        attributes,
        tags,
        applied_tag_keys: crate::model::state::recorded_tag_keys(svc),
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

/// The ports the targets must admit from the load balancer (when cloudlb manages those rules, on
/// AWS): each target group's traffic ports (its port for node targets, every target's own for
/// pods) in its protocols, and its health-check port over TCP.
fn backend_access(cfg: &LbConfig, target_groups: &[TargetGroup]) -> Option<BackendAccess> {
    if !cfg.manage_backend_rules || cfg.local.is_some() {
        return None;
    }
    let node_port = target_mode(cfg) != TargetMode::Pods;
    let mut ports = BTreeSet::new();
    let mut add = |protocol: &str, port: u16, node_port: bool| {
        ports.insert(BackendPort {
            protocol: protocol.to_string(),
            port,
            node_port,
        });
    };
    for tg in target_groups {
        let protocols: &[&str] = match tg.protocol {
            Protocol::Tcp | Protocol::Tls => &["tcp"],
            Protocol::Udp => &["udp"],
            Protocol::TcpUdp => &["tcp", "udp"],
        };
        let traffic: BTreeSet<u16> = if node_port {
            BTreeSet::from([tg.port])
        } else {
            tg.targets.iter().map(|t| t.port).collect()
        };
        for port in &traffic {
            for protocol in protocols {
                add(protocol, *port, node_port);
            }
        }
        match tg.health_check.port {
            // A health check on a port of its own (the healthCheckNodePort, kube-proxy's
            // 10256, or the user's): on the nodes too for node targets; the provider widens only
            // what falls in the nodePort range.
            Some(p) => add("tcp", p, node_port),
            None => {
                for port in &traffic {
                    add("tcp", *port, node_port);
                }
            }
        }
    }
    Some(BackendAccess { ports })
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
    mode: TargetMode,
    warnings: &mut Vec<String>,
) -> BTreeSet<String> {
    let mut hosts: BTreeSet<String> = BTreeSet::new();
    for node in nodes
        .iter()
        .map(|n| n.borrow())
        .filter(|n| node_eligible(n) && matches_labels(n, &cfg.target_node_labels))
    {
        let node_name = node.metadata.name.clone().unwrap_or_default();
        let id = match mode {
            TargetMode::Instance => instance_id(node)
                .ok_or("no spec.providerID of the form aws:///<zone>/<instance-id>"),
            TargetMode::NodeIp | TargetMode::Pods => {
                internal_ip(node).ok_or("no InternalIP address")
            }
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
    mode: TargetMode,
    /// Node targets (ids), for node modes.
    hosts: &'a BTreeSet<String>,
    /// The Service's EndpointSlices, for pod targets.
    slices: &'a [&'a EndpointSlice],
    gate_waiting: &'a BTreeSet<String>,
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
        let port = g.target_group_port(self.mode);
        let target_type = self.mode.target_type();
        let mut immutable = format!("{}/{port}/{}", tg_protocol.as_aws(), target_type.as_aws());
        let ip_family = match self.mode {
            TargetMode::Pods => {
                pod_family(self.svc.spec.as_ref().unwrap_or(&ServiceSpec::default()))
            }
            TargetMode::Instance | TargetMode::NodeIp => IpFamily::Ipv4,
        };
        if self.mode == TargetMode::Pods {
            // Never the name of a node-ip group on the same port number.
            immutable.push_str("/pods");
        }
        if ip_family == IpFamily::Ipv6 {
            immutable.push_str("/ipv6");
        }
        let targets = match self.mode {
            TargetMode::Pods => {
                pod_targets(self.slices, &g.endpoint_port, ip_family, self.gate_waiting)
            }
            TargetMode::Instance | TargetMode::NodeIp => self
                .hosts
                .iter()
                .map(|id| Target {
                    id: id.clone(),
                    port,
                })
                .collect(),
        };
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
            port,
            target_type,
            ip_family,
            health_check: health_check(self.svc, self.cfg, self.mode, g.protocol == Protocol::Udp),
            attributes,
            targets,
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
        alpn_policy: if tls { cfg.alpn_policy.clone() } else { None },
        attributes: cfg
            .listener_attributes
            .get(&g.port)
            .cloned()
            .unwrap_or_default(),
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
