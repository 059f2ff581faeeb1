//! Parse the `LoadBalancerClass` defaults and the Service annotations into one typed [`LbConfig`].
//! Pure: parses everything, collects every problem, reports them all at once.

pub mod annotations;
pub mod class;

use crate::model::local::{self, AddressPool, Algorithm, LocalSpec};
use crate::model::{
    HealthCheckProtocol, IpAddressType, IpFamily, Scheme, SourceNat, Subnets, TargetMode, state,
};
use annotations as keys;
use class::{AwsClassSpec, LoadBalancerClass, ProviderKind};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// One problem with the configuration: where, what value, what is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// `annotation cloudlb.io/scheme`, `LoadBalancerClass web spec.aws.scheme`, `spec.ports`…
    pub source: String,
    pub value: String,
    pub allowed: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = {:?}: {}", self.source, self.value, self.allowed)
    }
}

/// Every problem found, in the order of the settings table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl std::fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        write!(f, "{n} invalid setting{}: ", if n == 1 { "" } else { "s" })?;
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Health-check settings the user made; the builder fills in the defaults that depend on the port
/// and the traffic policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HealthCheckConfig {
    pub protocol: Option<HealthCheckProtocol>,
    /// `Some(None)`: explicitly `traffic-port`.
    pub port: Option<Option<u16>>,
    pub path: Option<String>,
    pub interval_seconds: Option<u32>,
    pub timeout_seconds: Option<u32>,
    pub healthy_threshold: Option<u32>,
    pub unhealthy_threshold: Option<u32>,
    pub success_codes: Option<String>,
}

/// The merged, validated configuration of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbConfig {
    pub class_name: String,
    pub provider: ProviderKind,
    pub scheme: Scheme,
    pub ip_address_type: IpAddressType,
    pub subnets: Subnets,
    pub eip_allocations: Vec<String>,
    pub private_ipv4_addresses: Vec<String>,
    /// IPv6 source NAT (dualstack with UDP listeners, or asked for): on when set.
    pub ipv6_source_nat: Option<SourceNat>,
    /// What receives the traffic: nodes (by instance id or address) or pods.
    pub targets: TargetMode,
    pub health_check: HealthCheckConfig,
    pub ssl_certificates: Vec<String>,
    /// Service port numbers that get TLS listeners.
    pub tls_ports: Vec<u16>,
    pub ssl_policy: Option<String>,
    /// The ALPN policy of the TLS listeners; `None`: left as it is.
    pub alpn_policy: Option<String>,
    /// Attributes of listeners, by port (the protocol in the key was checked against it).
    pub listener_attributes: BTreeMap<u16, BTreeMap<String, String>>,
    /// TLS to the backends on TLS ports.
    pub backend_tls: bool,
    /// Load-balancer attributes the user set (beyond the AWS defaults).
    pub lb_attributes: BTreeMap<String, String>,
    /// Target-group attributes the user set.
    pub tg_attributes: BTreeMap<String, String>,
    pub additional_tags: BTreeMap<String, String>,
    pub target_node_labels: BTreeMap<String, String>,
    pub security_groups: Vec<String>,
    /// Whether the targets' security groups get rules admitting the load balancer.
    pub manage_backend_rules: bool,
    pub source_ranges: Vec<String>,
    pub name: Option<String>,
    /// How long a replaced load balancer keeps serving after the status moved (AWS).
    pub replacement_grace: std::time::Duration,
    /// Settings of the local provider (`provider: local` only), validated; the build adds the
    /// requested address.
    pub local: Option<LocalSpec>,
}

/// `LoadBalancerClass.spec.local` → the typed [`LocalSpec`]: the one place it is validated.
fn local_spec(class: &LoadBalancerClass, errors: &mut Vec<ConfigError>) -> LocalSpec {
    let name = class.metadata.name.clone().unwrap_or_default();
    let field = |f: &str| format!("LoadBalancerClass {name} spec.local.{f}");
    let spec = class.spec.local.clone().unwrap_or_default();
    let address_pool = match spec.address_pool.as_deref() {
        None => AddressPool::default(),
        Some(raw) => AddressPool::parse(raw).unwrap_or_else(|why| {
            errors.push(err(
                &field("addressPool"),
                raw,
                format!(
                    "{why}; allowed: a comma-separated list of CIDRs (127.0.1.0/24, fd00::/120), ranges (127.0.1.10-127.0.1.20) and single addresses, IPv4 or IPv6"
                ),
            ));
            AddressPool::default()
        }),
    };
    let algorithm = match spec.algorithm.as_deref() {
        None => Algorithm::default(),
        Some(raw) => raw.parse().unwrap_or_else(|allowed: String| {
            errors.push(err(&field("algorithm"), raw, allowed));
            Algorithm::default()
        }),
    };
    let drain_timeout_seconds = spec
        .drain_timeout_seconds
        .unwrap_or(local::DEFAULT_DRAIN_TIMEOUT_SECONDS);
    if drain_timeout_seconds > local::MAX_DRAIN_TIMEOUT_SECONDS {
        errors.push(err(
            &field("drainTimeoutSeconds"),
            &drain_timeout_seconds.to_string(),
            format!("must be 0-{} seconds", local::MAX_DRAIN_TIMEOUT_SECONDS),
        ));
    }
    LocalSpec {
        address_pool,
        algorithm,
        drain_timeout_seconds,
        requested_address: None,
    }
}

/// Whether `k` can be an AWS attribute key (lower-case letters, digits, dots, underscores).
fn is_attribute_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_')
}

/// The protocol of each listener the Service's ports make, by port, in AWS spelling: `TLS` for
/// TCP ports that terminate TLS, `TCP_UDP` for a port number with both.
fn listener_protocols(ports: &[ServicePort], tls_ports: &[u16]) -> BTreeMap<u16, &'static str> {
    let mut out: BTreeMap<u16, &'static str> = BTreeMap::new();
    for p in ports {
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let proto = match p.protocol.as_deref().unwrap_or("TCP") {
            "UDP" => "UDP",
            _ if tls_ports.contains(&port) => "TLS",
            _ => "TCP",
        };
        let merged = match (out.get(&port), proto) {
            (Some(&"TCP"), "UDP") | (Some(&"UDP"), "TCP") => "TCP_UDP",
            _ => proto,
        };
        out.insert(port, merged);
    }
    out
}

/// Where a raw value came from.
#[derive(Clone, Debug)]
struct Raw {
    source: String,
    value: String,
}

struct Parser<'a> {
    raw: BTreeMap<&'static str, Raw>,
    errors: Vec<ConfigError>,
    svc: &'a Service,
}

/// Where the load balancer is placed: its subnets and the per-subnet addresses.
struct Placement {
    subnets: Subnets,
    eip_allocations: Vec<String>,
    private_ipv4_addresses: Vec<String>,
}

/// The TLS settings.
struct Tls {
    ssl_certificates: Vec<String>,
    tls_ports: Vec<u16>,
    ssl_policy: Option<String>,
    alpn_policy: Option<String>,
    backend_tls: bool,
}

/// A list setting given as one entry per explicit subnet, allowed with one scheme only.
#[derive(Clone, Copy)]
struct PerSubnet {
    key: &'static str,
    /// The scheme the setting needs.
    scheme: Scheme,
    /// What the entries are, for messages.
    what: &'static str,
    /// Why entry `i` (from 0) is not valid, if it is not.
    problem: fn(usize, &str) -> Option<String>,
}

const EIP_ALLOCATIONS: PerSubnet = PerSubnet {
    key: keys::EIP_ALLOCATIONS,
    scheme: Scheme::InternetFacing,
    what: "EIP allocations",
    problem: not_an_allocation_id,
};

const PRIVATE_IPV4_ADDRESSES: PerSubnet = PerSubnet {
    key: keys::PRIVATE_IPV4,
    scheme: Scheme::Internal,
    what: "private IPv4 addresses",
    problem: not_an_ipv4_address,
};

fn not_an_allocation_id(i: usize, entry: &str) -> Option<String> {
    (!entry.starts_with("eipalloc-")).then(|| {
        format!(
            "entry {} ({entry:?}) is not an allocation id (eipalloc-…)",
            i + 1
        )
    })
}

fn not_an_ipv4_address(_: usize, entry: &str) -> Option<String> {
    (entry.parse::<std::net::Ipv4Addr>().is_err())
        .then(|| format!("{entry:?} is not an IPv4 address"))
}

fn err(source: &str, value: &str, allowed: impl Into<String>) -> ConfigError {
    ConfigError {
        source: source.to_string(),
        value: value.to_string(),
        allowed: allowed.into(),
    }
}

/// One source-NAT prefix as AWS takes it: `auto_assigned` (also written `auto`) or an IPv6 /80.
fn source_nat_prefix(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("auto") || v.eq_ignore_ascii_case(SourceNat::AUTO) {
        return Ok(SourceNat::AUTO.to_string());
    }
    let bad =
        || format!("{v:?} is not auto or an IPv6 prefix of length 80 (2600:1f14:abc:1200::/80)");
    let (addr, len) = v.split_once('/').ok_or_else(bad)?;
    match (addr.parse::<std::net::Ipv6Addr>(), len) {
        (Ok(_), "80") => Ok(v.to_ascii_lowercase()),
        _ => Err(bad()),
    }
}

fn list(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// The Service's TCP ports.
fn tcp_ports(ports: &[ServicePort]) -> impl Iterator<Item = u16> + '_ {
    ports
        .iter()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.port).ok())
}

/// The class's settings as raw values: (setting, source, value), for each setting whose class
/// field (in the settings table) the class sets.
fn class_values(class_name: &str, aws: &AwsClassSpec) -> Vec<(&'static str, String, String)> {
    // The JSON form has the class's field names and leaves out the fields not set.
    let aws = serde_json::to_value(aws).unwrap_or_default();
    keys::SETTINGS
        .iter()
        .filter_map(|s| {
            let field = s.class_field?;
            let path = field.strip_prefix("spec.aws.")?;
            let value = aws
                .pointer(&format!("/{}", path.replace('.', "/")))
                .filter(|v| !v.is_null())?;
            let source = format!("LoadBalancerClass {class_name} {field}");
            Some((s.name, source, annotation_form(value)))
        })
        .collect()
}

/// A class field's value the way its annotation writes it: a list as `a,b`, a map as `k=v,k=v`.
fn annotation_form(v: &serde_json::Value) -> String {
    use serde_json::Value;
    let joined = |items: Vec<String>| items.join(",");
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) => joined(items.iter().map(annotation_form).collect()),
        Value::Object(map) => joined(
            map.iter()
                .map(|(k, v)| format!("{k}={}", annotation_form(v)))
                .collect(),
        ),
        // Booleans and numbers.
        other => other.to_string(),
    }
}

impl Parser<'_> {
    fn get(&self, name: &str) -> Option<&Raw> {
        self.raw.get(name)
    }

    /// Setting `name` as `parse` reads it; a value it refuses is an error that says what is
    /// `allowed`.
    fn parse_with<T>(
        &mut self,
        name: &str,
        allowed: impl Into<String>,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Option<T> {
        let raw = self.get(name)?.clone();
        let parsed = parse(&raw.value);
        if parsed.is_none() {
            self.errors.push(err(&raw.source, &raw.value, allowed));
        }
        parsed
    }

    fn parse_enum<T: Copy>(&mut self, name: &str, options: &[(&str, T)]) -> Option<T> {
        let allowed: Vec<_> = options.iter().map(|(k, _)| *k).collect();
        let allowed = format!("allowed values: {}", allowed.join(", "));
        self.parse_with(name, allowed, |v| {
            let v = v.trim().to_ascii_lowercase();
            options.iter().find(|(k, _)| *k == v).map(|(_, t)| *t)
        })
    }

    fn parse_bool(&mut self, name: &str) -> Option<bool> {
        let allowed = "must be true or false";
        self.parse_with(name, allowed, |v| {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            }
        })
    }

    fn parse_u32(&mut self, name: &str, min: u32, max: u32) -> Option<u32> {
        let allowed = format!("must be an integer from {min} to {max}");
        self.parse_with(name, allowed, |v| {
            v.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
        })
    }

    /// An error for each of `entries` (of list setting `name`) that `problem` finds fault with:
    /// `problem(index, entry)` says what is wrong.
    fn check_entries(
        &mut self,
        name: &str,
        entries: &[String],
        problem: impl Fn(usize, &str) -> Option<String>,
    ) {
        let Some(raw) = self.get(name).cloned() else {
            return;
        };
        for (i, e) in entries.iter().enumerate() {
            if let Some(why) = problem(i, e) {
                self.errors.push(err(&raw.source, &raw.value, why));
            }
        }
    }

    /// List setting `name` (empty when unset), with an error for each entry `problem` finds
    /// fault with.
    fn checked_list(
        &mut self,
        name: &str,
        problem: impl Fn(usize, &str) -> Option<String>,
    ) -> Vec<String> {
        let entries = self.parse_list(name).map(|(_, l)| l).unwrap_or_default();
        self.check_entries(name, &entries, problem);
        entries
    }

    fn parse_list(&mut self, name: &str) -> Option<(Raw, Vec<String>)> {
        let raw = self.get(name)?.clone();
        let l = list(&raw.value);
        Some((raw, l))
    }

    fn parse_kv(&mut self, name: &str) -> Option<(Raw, BTreeMap<String, String>)> {
        let raw = self.get(name)?.clone();
        let mut out = BTreeMap::new();
        for item in list(&raw.value) {
            match item.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    out.insert(k.trim().to_string(), v.trim().to_string());
                }
                _ => self.errors.push(err(
                    &raw.source,
                    &raw.value,
                    format!("{item:?} is not key=value; expected comma-separated key=value pairs"),
                )),
            }
        }
        Some((raw, out))
    }

    /// An attribute map, passed through as AWS names them (AWS validates keys cloudlb does not
    /// know, as aws-load-balancer-controller lets it; its answer is the Service's Event). Only
    /// what cannot be an attribute key is refused here.
    fn attributes(&mut self, name: &str) -> BTreeMap<String, String> {
        let Some((raw, map)) = self.parse_kv(name) else {
            return BTreeMap::new();
        };
        let mut out = BTreeMap::new();
        for (k, v) in map {
            if is_attribute_key(&k) {
                out.insert(k, v);
            } else {
                self.errors.push(err(
                    &raw.source,
                    &raw.value,
                    format!("{k:?} is not an attribute key (lower-case letters, digits, dots and underscores, e.g. deregistration_delay.timeout_seconds)"),
                ));
            }
        }
        out
    }
}

/// Collects the raw values: our annotation, then compatible aliases, then the class. Two keys of
/// the same setting with different values is an error.
fn collect_raw(
    annotations: &BTreeMap<String, String>,
    class: &LoadBalancerClass,
    errors: &mut Vec<ConfigError>,
) -> BTreeMap<&'static str, Raw> {
    let class_name = class.metadata.name.clone().unwrap_or_default();
    let mut raw: BTreeMap<&'static str, Raw> = BTreeMap::new();
    if let Some(aws) = &class.spec.aws {
        for (name, source, value) in class_values(&class_name, aws) {
            raw.insert(name, Raw { source, value });
        }
    }
    for s in keys::SETTINGS {
        let ours = s.key();
        let mut found: Option<Raw> = None;
        for key in std::iter::once(ours.as_str()).chain(s.aliases.iter().copied()) {
            let Some(value) = annotations.get(key) else {
                continue;
            };
            let this = Raw {
                source: format!("annotation {key}"),
                value: value.clone(),
            };
            match &found {
                None => found = Some(this),
                Some(first) if first.value.trim() != value.trim() => errors.push(err(
                    &this.source,
                    value,
                    format!(
                        "conflicts with {} = {:?}; set only one of them",
                        first.source, first.value
                    ),
                )),
                Some(_) => {}
            }
        }
        if let Some(f) = found {
            raw.insert(s.name, f);
        }
    }
    raw
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len <= 32,
        Ok(std::net::IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

fn valid_success_codes(s: &str) -> bool {
    let code = |c: &str| c.len() == 3 && c.parse::<u16>().is_ok_and(|n| (200..=599).contains(&n));
    if let Some((a, b)) = s.split_once('-') {
        return code(a) && code(b) && a <= b;
    }
    s.split(',').all(code)
}

/// Merges the class defaults and the Service annotations into one validated config.
pub fn resolve(class: &LoadBalancerClass, svc: &Service) -> Result<LbConfig, ConfigErrors> {
    let empty = BTreeMap::new();
    let annotations = svc.metadata.annotations.as_ref().unwrap_or(&empty);
    let mut errors = Vec::new();
    let raw = collect_raw(annotations, class, &mut errors);
    let mut p = Parser { raw, errors, svc };
    let cfg = p.build(class);
    if p.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(p.errors))
    }
}

// The setting groups, in the order `build` (at the end) calls them.
impl Parser<'_> {
    /// `scheme`, or the older `internal` boolean; both set on the Service and disagreeing is an
    /// error.
    fn scheme(&mut self) -> Scheme {
        let mut scheme = self.parse_enum(
            keys::SCHEME,
            &[
                ("internet-facing", Scheme::InternetFacing),
                ("internal", Scheme::Internal),
            ],
        );
        // `0.0.0.0/0` is the legacy provider's documented form of `true`.
        let internal = self.parse_with(
            keys::INTERNAL,
            "must be true, false or 0.0.0.0/0 (the legacy form of true)",
            |v| match v.trim().to_ascii_lowercase().as_str() {
                "true" | "0.0.0.0/0" => Some(true),
                "false" => Some(false),
                _ => None,
            },
        );
        if let Some(internal) = internal {
            let from_internal = if internal {
                Scheme::Internal
            } else {
                Scheme::InternetFacing
            };
            match (scheme, self.get(keys::SCHEME).cloned()) {
                (Some(s), Some(src))
                    if s != from_internal && src.source.starts_with("annotation") =>
                {
                    let raw = self.get(keys::INTERNAL).cloned();
                    if let Some(raw) = raw {
                        self.errors.push(err(
                            &raw.source,
                            &raw.value,
                            format!(
                                "conflicts with {} = {:?}; set only one of them",
                                src.source, src.value
                            ),
                        ));
                    }
                }
                _ => scheme = Some(from_internal),
            }
        }
        // Internal unless asked otherwise, as aws-load-balancer-controller: a public address is
        // a choice, never an accident. Services made before that default keep theirs.
        scheme.unwrap_or_else(|| default_scheme(self.svc))
    }

    fn ip_address_type(&mut self) -> IpAddressType {
        self.parse_enum(
            keys::IP_ADDRESS_TYPE,
            &[
                ("ipv4", IpAddressType::Ipv4),
                ("dualstack", IpAddressType::Dualstack),
            ],
        )
        .unwrap_or(IpAddressType::Ipv4)
    }

    /// IPv6 source NAT: on by default where AWS needs it (UDP listeners on a dualstack load
    /// balancer); refused where AWS would refuse it.
    fn ipv6_source_nat(
        &mut self,
        ip_address_type: IpAddressType,
        ports: &[ServicePort],
        subnets: &Subnets,
    ) -> Option<SourceNat> {
        let dualstack = ip_address_type == IpAddressType::Dualstack;
        let udp = ports.iter().any(|p| p.protocol.as_deref() == Some("UDP"));
        let asked = self.parse_enum(keys::IPV6_SOURCE_NAT, &[("on", true), ("off", false)]);
        let raw = |p: &Self, key: &str| {
            p.get(key).cloned().unwrap_or_else(|| Raw {
                source: key.to_string(),
                value: String::new(),
            })
        };
        match asked {
            Some(true) if !dualstack => {
                let r = raw(self, keys::IPV6_SOURCE_NAT);
                self.errors.push(err(
                    &r.source,
                    &r.value,
                    "IPv6 source NAT needs ip-address-type dualstack",
                ));
            }
            Some(false) if dualstack && udp => {
                let r = raw(self, keys::IPV6_SOURCE_NAT);
                self.errors.push(err(
                    &r.source,
                    &r.value,
                    "AWS refuses UDP listeners on a dualstack Network Load Balancer without IPv6 source NAT: remove the setting (on is the default there), use ip-address-type ipv4, or drop the UDP ports",
                ));
            }
            _ => {}
        }
        let on = asked.unwrap_or(dualstack && udp);
        let mut prefixes = Vec::new();
        if let Some((r, given)) = self.parse_list(keys::SOURCE_NAT_PREFIXES) {
            let count = match subnets {
                Subnets::Explicit(l) => Some(l.len()),
                Subnets::Discover => None,
            };
            if !on || !dualstack {
                self.errors.push(err(
                    &r.source,
                    &r.value,
                    "source-NAT prefixes apply only with IPv6 source NAT on (ip-address-type dualstack)",
                ));
            } else if count.is_some_and(|n| n != given.len()) {
                let n = count.unwrap_or_default();
                self.errors.push(err(
                    &r.source,
                    &r.value,
                    format!("give exactly one per subnet ({n} subnets), in subnet order"),
                ));
            }
            for g in given {
                match source_nat_prefix(&g) {
                    Ok(p) => prefixes.push(p),
                    Err(why) => self.errors.push(err(&r.source, &r.value, why)),
                }
            }
        }
        (on && dualstack).then_some(SourceNat { prefixes })
    }

    /// Pod targets of a Service whose first IP family is IPv6 are IPv6 target groups, which only
    /// a dualstack load balancer can forward to.
    fn pod_family(&mut self, spec: &ServiceSpec, targets: TargetMode, ip: IpAddressType) {
        if targets == TargetMode::Pods
            && crate::build::pod_family(spec) == IpFamily::Ipv6
            && ip != IpAddressType::Dualstack
        {
            let r = self.get(keys::IP_ADDRESS_TYPE).cloned().unwrap_or(Raw {
                source: keys::IP_ADDRESS_TYPE.into(),
                value: "ipv4".into(),
            });
            self.errors.push(err(
                &r.source,
                &r.value,
                "the Service's first IP family (spec.ipFamilies) is IPv6, so its pods are IPv6 targets, which need ip-address-type dualstack",
            ));
        }
    }

    /// Subnets, and the EIP allocations (internet-facing) or private IPv4 addresses (internal)
    /// given one per subnet.
    fn placement(&mut self, scheme: Scheme) -> Placement {
        let subnets = match self.parse_list(keys::SUBNETS) {
            Some((_, l)) if !l.is_empty() => Subnets::Explicit(l),
            _ => Subnets::Discover,
        };
        let subnet_count = match &subnets {
            Subnets::Explicit(l) => Some(l.len()),
            Subnets::Discover => None,
        };
        let eip_allocations = self.per_subnet(&EIP_ALLOCATIONS, scheme, subnet_count);
        let private_ipv4_addresses = self.per_subnet(&PRIVATE_IPV4_ADDRESSES, scheme, subnet_count);
        Placement {
            subnets,
            eip_allocations,
            private_ipv4_addresses,
        }
    }

    /// The entries of `setting` for a Service of `scheme` with `subnet_count` explicit subnets.
    fn per_subnet(
        &mut self,
        setting: &PerSubnet,
        scheme: Scheme,
        subnet_count: Option<usize>,
    ) -> Vec<String> {
        let PerSubnet {
            key,
            scheme: want,
            what,
            problem,
        } = *setting;
        let Some((raw, l)) = self.parse_list(key) else {
            return vec![];
        };
        if scheme != want {
            self.errors.push(err(
                &raw.source,
                &raw.value,
                format!("{what} require scheme {}", want.as_aws()),
            ));
        } else if subnet_count.is_none() {
            self.errors.push(err(
                &raw.source,
                &raw.value,
                "requires explicit subnets (annotation cloudlb.io/subnets), one entry per subnet",
            ));
        } else if Some(l.len()) != subnet_count {
            self.errors.push(err(
                &raw.source,
                &raw.value,
                format!(
                    "needs exactly one entry per subnet: {} given, {} subnets",
                    l.len(),
                    subnet_count.unwrap_or(0)
                ),
            ));
        }
        self.check_entries(key, &l, problem);
        l
    }

    /// The target mode; `aws-load-balancer-type: nlb-ip` means pods, as it does for
    /// aws-load-balancer-controller.
    fn targets(&mut self) -> TargetMode {
        let set = self.parse_enum(
            keys::TARGET_TYPE,
            &[
                ("instance", TargetMode::Instance),
                ("node-ip", TargetMode::NodeIp),
                ("ip", TargetMode::Pods),
            ],
        );
        let lb_type = self
            .svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(crate::ownership::AWS_LB_TYPE))
            .map(|v| v.trim().to_string());
        if lb_type.as_deref() != Some(crate::ownership::AWS_LB_TYPE_NLB_IP) {
            return set.unwrap_or(TargetMode::Instance);
        }
        if let Some(other) = set.filter(|t| *t != TargetMode::Pods)
            && let Some(raw) = self.get(keys::TARGET_TYPE).cloned()
        {
            self.errors.push(err(
                &raw.source,
                &raw.value,
                format!(
                    "conflicts with annotation {} = \"{}\", which means pod targets (ip); remove one of them",
                    crate::ownership::AWS_LB_TYPE,
                    crate::ownership::AWS_LB_TYPE_NLB_IP
                ),
            ));
            return other;
        }
        TargetMode::Pods
    }

    fn health_check(&mut self, ports: &[ServicePort], targets: TargetMode) -> HealthCheckConfig {
        let protocol = self.parse_enum(
            keys::HC_PROTOCOL,
            &[
                ("tcp", HealthCheckProtocol::Tcp),
                ("http", HealthCheckProtocol::Http),
                ("https", HealthCheckProtocol::Https),
            ],
        );
        let port = self.health_check_port(ports, targets);
        let path = self.health_check_path();
        let success_codes = self.health_check_success_codes();
        let health_check = HealthCheckConfig {
            protocol,
            port,
            path,
            interval_seconds: self.parse_u32(keys::HC_INTERVAL, 5, 300),
            timeout_seconds: self.parse_u32(keys::HC_TIMEOUT, 2, 120),
            healthy_threshold: self.parse_u32(keys::HC_HEALTHY, 2, 10),
            unhealthy_threshold: self.parse_u32(keys::HC_UNHEALTHY, 2, 10),
            success_codes,
        };
        if health_check.protocol == Some(HealthCheckProtocol::Tcp) {
            for name in [keys::HC_PATH, keys::HC_SUCCESS_CODES] {
                if let Some(raw) = self.get(name).cloned() {
                    self.errors.push(err(&raw.source, &raw.value, "only applies to http/https health checks, but the health-check protocol is tcp"));
                }
            }
        }
        health_check
    }

    /// `Some(None)`: explicitly the traffic port. A Service port's name means, as in
    /// aws-load-balancer-controller, its nodePort for node targets and its numeric targetPort
    /// for pods.
    fn health_check_port(
        &mut self,
        ports: &[ServicePort],
        targets: TargetMode,
    ) -> Option<Option<u16>> {
        let names: Vec<&str> = ports.iter().filter_map(|p| p.name.as_deref()).collect();
        let allowed = format!(
            "must be traffic-port, a port number 1-65535 or the name of one of the Service's ports ({})",
            if names.is_empty() {
                "it names none".to_string()
            } else {
                names.join(", ")
            }
        );
        let mut named: Option<(String, String)> = None;
        let port = self.parse_with(keys::HC_PORT, allowed, |v| match v.trim() {
            "traffic-port" => Some(None),
            v => match v.parse::<u16>() {
                Ok(n) => (n > 0).then_some(Some(n)),
                Err(_) => {
                    let p = ports.iter().find(|p| p.name.as_deref() == Some(v))?;
                    let resolved = match targets {
                        TargetMode::Pods => match &p.target_port {
                            None => u16::try_from(p.port).ok(),
                            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                            Some(IntOrString::String(_)) => None,
                        },
                        TargetMode::Instance | TargetMode::NodeIp => p
                            .node_port
                            .and_then(|n| u16::try_from(n).ok())
                            .filter(|n| *n > 0),
                    };
                    if resolved.is_none() {
                        let why = match targets {
                            TargetMode::Pods => {
                                "its targetPort is a name too: give the pods' port number"
                            }
                            _ => "it has no nodePort",
                        };
                        named = Some((v.to_string(), why.to_string()));
                    }
                    Some(resolved)
                }
            },
        });
        if let Some((name, why)) = named {
            let raw = self.get(keys::HC_PORT).cloned();
            let source = raw.map_or_else(|| keys::HC_PORT.to_string(), |r| r.source);
            self.errors.push(err(
                &source,
                &name,
                format!("Service port {name:?} cannot give the health-check port: {why}"),
            ));
        }
        port
    }

    fn health_check_path(&mut self) -> Option<String> {
        let allowed = "must be an ASCII path starting with / (at most 1024 characters)";
        self.parse_with(keys::HC_PATH, allowed, |v| {
            (v.starts_with('/') && v.len() <= 1024 && v.is_ascii()).then(|| v.to_string())
        })
    }

    fn health_check_success_codes(&mut self) -> Option<String> {
        let allowed = "must be HTTP codes 200-599: 200, 200,202 or a range 200-399";
        self.parse_with(keys::HC_SUCCESS_CODES, allowed, |v| {
            let v = v.trim();
            valid_success_codes(v).then(|| v.to_string())
        })
    }

    /// Certificates, the ports that get TLS listeners, the policy and TLS to the backends.
    fn tls(&mut self, ports: &[ServicePort]) -> Tls {
        let ssl_certificates = self.ssl_certificates();
        let tls_ports = self.tls_ports(ports, &ssl_certificates);
        let ssl_policy = self
            .get(keys::SSL_POLICY)
            .map(|r| r.value.trim().to_string());
        const ALPN: [&str; 5] = [
            "HTTP1Only",
            "HTTP2Only",
            "HTTP2Optional",
            "HTTP2Preferred",
            "None",
        ];
        let alpn_policy = self
            .parse_with(
                keys::ALPN_POLICY,
                format!("allowed values: {}", ALPN.join(", ")),
                |v| {
                    ALPN.iter()
                        .find(|p| p.eq_ignore_ascii_case(v.trim()))
                        .copied()
                },
            )
            .map(String::from);
        // As the AWS controllers read it: only ssl means TLS to the targets.
        let backend_tls = self
            .parse_enum(
                keys::BACKEND_PROTOCOL,
                &[
                    ("tcp", false),
                    ("http", false),
                    ("https", false),
                    ("ssl", true),
                    ("tls", true),
                ],
            )
            .unwrap_or(false);
        Tls {
            ssl_certificates,
            tls_ports,
            ssl_policy,
            alpn_policy,
            backend_tls,
        }
    }

    fn ssl_certificates(&mut self) -> Vec<String> {
        self.checked_list(keys::SSL_CERT, |_, c| {
            (!c.starts_with("arn:"))
                .then(|| format!("{c:?} is not a certificate ARN (arn:aws:acm:… or arn:aws:iam:…)"))
        })
    }

    /// The Service ports `ssl-ports` names (every TCP port when only a certificate is set), sorted.
    fn tls_ports(&mut self, ports: &[ServicePort], ssl_certificates: &[String]) -> Vec<u16> {
        let mut tls_ports = Vec::new();
        match self.get(keys::SSL_PORTS).cloned() {
            Some(raw) => {
                if ssl_certificates.is_empty() {
                    self.errors.push(err(
                        &raw.source,
                        &raw.value,
                        "TLS ports need a certificate: set annotation cloudlb.io/ssl-cert",
                    ));
                }
                for w in &list(&raw.value) {
                    tls_ports.extend(self.tls_ports_named(&raw, w, ports));
                }
            }
            None if !ssl_certificates.is_empty() => tls_ports.extend(tcp_ports(ports)),
            None => {}
        }
        tls_ports.sort_unstable();
        tls_ports.dedup();
        // A TLS port shared with UDP cannot be one TCP_UDP listener.
        for p in &tls_ports {
            if ports
                .iter()
                .any(|sp| sp.port == i32::from(*p) && sp.protocol.as_deref() == Some("UDP"))
                && let Some(raw) = self
                    .get(keys::SSL_PORTS)
                    .or(self.get(keys::SSL_CERT))
                    .cloned()
            {
                self.errors.push(err(
                    &raw.source,
                    &raw.value,
                    format!("port {p} also serves UDP; a TLS listener cannot carry UDP"),
                ));
            }
        }
        tls_ports
    }

    /// The ports one `ssl-ports` entry `w` names: `*` (every TCP port), a port name or number.
    fn tls_ports_named(&mut self, raw: &Raw, w: &str, ports: &[ServicePort]) -> Vec<u16> {
        if w == "*" {
            // aws-load-balancer-controller refuses it too (an unused port).
            self.errors.push(err(
                &raw.source,
                &raw.value,
                "\"*\" is not a port of this Service (aws-load-balancer-controller refuses it as an unused port): name the TLS ports, or leave ssl-ports out to make every TCP port TLS",
            ));
            return Vec::new();
        }
        let matched: Vec<_> = ports
            .iter()
            .filter(|p| p.name.as_deref() == Some(w) || p.port.to_string() == w)
            .collect();
        if matched.is_empty() {
            let names: Vec<_> = ports
                .iter()
                .map(|p| {
                    p.name
                        .clone()
                        .map_or(p.port.to_string(), |n| format!("{n} ({})", p.port))
                })
                .collect();
            self.errors.push(err(
                &raw.source,
                &raw.value,
                format!(
                    "port {w:?} is not a port of this Service; its ports: {}",
                    names.join(", ")
                ),
            ));
        }
        let mut out = Vec::new();
        for p in matched {
            if p.protocol.as_deref().unwrap_or("TCP") != "TCP" {
                self.errors.push(err(
                    &raw.source,
                    &raw.value,
                    format!(
                        "port {w:?} is {}, TLS listeners need a TCP port",
                        p.protocol.as_deref().unwrap_or("TCP")
                    ),
                ));
            } else {
                out.extend(u16::try_from(p.port).ok());
            }
        }
        out
    }

    /// Load-balancer and target-group attributes: the attribute maps, then the settings that are
    /// shorthands for one attribute, then the checks of the values.
    fn lb_and_tg_attributes(&mut self) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let mut lb_attributes = self.attributes(keys::LB_ATTRIBUTES);
        let mut tg_attributes = self.attributes(keys::TG_ATTRIBUTES);
        if let Some(v) = self.parse_bool(keys::CROSS_ZONE) {
            lb_attributes.insert("load_balancing.cross_zone.enabled".into(), v.to_string());
        }
        if let Some(v) = self.parse_bool(keys::DELETION_PROTECTION) {
            lb_attributes.insert("deletion_protection.enabled".into(), v.to_string());
        }
        // As aws-load-balancer-controller reads them: only `true` acts, with bucket and prefix.
        if self.parse_bool(keys::ACCESS_LOG_ENABLED) == Some(true) {
            lb_attributes.insert("access_logs.s3.enabled".into(), "true".into());
            for (key, attribute) in [
                (keys::ACCESS_LOG_BUCKET, "access_logs.s3.bucket"),
                (keys::ACCESS_LOG_PREFIX, "access_logs.s3.prefix"),
            ] {
                if let Some(raw) = self.get(key) {
                    lb_attributes.insert(attribute.into(), raw.value.trim().to_string());
                }
            }
        }
        if let Some(v) = self.proxy_protocol() {
            tg_attributes.insert("proxy_protocol_v2.enabled".into(), v.to_string());
        }
        self.check_attribute_values(&lb_attributes, &tg_attributes);
        self.check_access_logs(&lb_attributes);
        (lb_attributes, tg_attributes)
    }

    /// `listener-attributes.<PROTOCOL>-<PORT>` keys: each must name a listener the Service has
    /// (its port, with the protocol its listener gets), and hold attribute `key=value` pairs.
    fn listener_attributes(
        &mut self,
        ports: &[ServicePort],
        tls_ports: &[u16],
    ) -> BTreeMap<u16, BTreeMap<String, String>> {
        let listeners = listener_protocols(ports, tls_ports);
        let have = || {
            listeners
                .iter()
                .map(|(port, proto)| format!("{proto}-{port}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let annotations = self.svc.metadata.annotations.clone().unwrap_or_default();
        let mut out: BTreeMap<u16, BTreeMap<String, String>> = BTreeMap::new();
        for (key, value) in &annotations {
            let Some(listener) = keys::LISTENER_ATTRIBUTES_PREFIXES
                .iter()
                .find_map(|p| key.strip_prefix(p))
            else {
                continue;
            };
            let source = format!("annotation {key}");
            let named = listener.rsplit_once('-').and_then(|(proto, port)| {
                let port: u16 = port.parse().ok()?;
                Some((proto.to_ascii_uppercase(), port))
            });
            let port = match named {
                Some((proto, port)) if listeners.get(&port) == Some(&proto.as_str()) => port,
                _ => {
                    self.errors.push(err(
                        &source,
                        value,
                        format!(
                            "{listener:?} is not a listener of this Service; its listeners: {}",
                            have()
                        ),
                    ));
                    continue;
                }
            };
            for item in list(value) {
                match item.split_once('=') {
                    Some((k, v)) if is_attribute_key(k.trim()) => {
                        let attrs = out.entry(port).or_default();
                        attrs.insert(k.trim().to_string(), v.trim().to_string());
                    }
                    _ => self.errors.push(err(
                        &source,
                        value,
                        format!("{item:?} is not key=value with an attribute key (e.g. tcp.idle_timeout.seconds=400)"),
                    )),
                }
            }
        }
        out
    }

    fn proxy_protocol(&mut self) -> Option<bool> {
        let raw = self.get(keys::PROXY_PROTOCOL).cloned()?;
        match raw.value.trim() {
            "*" | "true" => Some(true),
            "false" | "" => Some(false),
            _ => {
                self.errors.push(err(
                    &raw.source,
                    &raw.value,
                    "must be * (all ports), true or false",
                ));
                None
            }
        }
    }

    fn check_attribute_values(
        &mut self,
        lb_attributes: &BTreeMap<String, String>,
        tg_attributes: &BTreeMap<String, String>,
    ) {
        for (k, v) in lb_attributes.iter().chain(tg_attributes.iter()) {
            let bool_key = k.ends_with(".enabled");
            let bad = (bool_key && v != "true" && v != "false")
                || (k == "deregistration_delay.timeout_seconds"
                    && !v.parse::<u32>().is_ok_and(|n| n <= 3600));
            if bad {
                let raw = self
                    .get(keys::LB_ATTRIBUTES)
                    .or(self.get(keys::TG_ATTRIBUTES))
                    .cloned();
                let source = raw.map_or_else(|| "attributes".to_string(), |r| r.source);
                let allowed = if bool_key {
                    "must be true or false"
                } else {
                    "must be 0-3600 seconds"
                };
                self.errors.push(err(&source, &format!("{k}={v}"), allowed));
            }
        }
    }

    fn check_access_logs(&mut self, lb_attributes: &BTreeMap<String, String>) {
        if lb_attributes
            .get("access_logs.s3.enabled")
            .map(String::as_str)
            == Some("true")
            && lb_attributes
                .get("access_logs.s3.bucket")
                .is_none_or(|b| b.is_empty())
        {
            let source = self
                .get(keys::LB_ATTRIBUTES)
                .map_or("attributes".to_string(), |r| r.source.clone());
            self.errors.push(err(
                &source,
                "access_logs.s3.enabled=true",
                "access logs need access_logs.s3.bucket",
            ));
        }
    }

    /// The class's tags overlaid with the Service's.
    fn tags(&mut self, class: &LoadBalancerClass) -> BTreeMap<String, String> {
        let additional_tags = self.parse_kv(keys::ADDITIONAL_TAGS).map(|(raw, m)| {
            for (k, v) in &m {
                if k.starts_with("cloudlb.io/") || k.starts_with("aws:") || k.starts_with("kubernetes.io/cluster/") || k.len() > 128 || v.len() > 256 {
                    self.errors.push(err(&raw.source, &raw.value, format!("tag {k:?}: keys may not use the reserved prefixes cloudlb.io/, aws:, kubernetes.io/cluster/ and are at most 128 characters (values 256)")));
                }
            }
            m
        });
        let mut tags = BTreeMap::new();
        if let Some(aws) = &class.spec.aws {
            tags.extend(aws.additional_tags.clone().unwrap_or_default());
        }
        tags.extend(additional_tags.unwrap_or_default());
        if tags.len() > 40 {
            self.errors.push(err(
                "additional-resource-tags",
                &tags.len().to_string(),
                "at most 40 additional tags (AWS allows 50 per resource; cloudlb uses up to 10)",
            ));
        }
        tags
    }

    fn target_node_labels(&mut self) -> BTreeMap<String, String> {
        self.parse_kv(keys::TARGET_NODE_LABELS)
            .map(|(_, m)| m)
            .unwrap_or_default()
    }

    /// The user's security groups (and the refused request to manage the nodes' rules).
    fn security_groups(&mut self) -> Vec<String> {
        self.checked_list(keys::SECURITY_GROUPS, |_, g| {
            (!g.starts_with("sg-")).then(|| format!("{g:?} is not a security-group id (sg-…)"))
        })
    }

    /// Rules on the targets' security groups: on by default when cloudlb makes the load
    /// balancer's security group, off with the user's own unless asked for (as
    /// aws-load-balancer-controller does).
    fn manage_backend_rules(&mut self, security_groups: &[String]) -> bool {
        self.parse_bool(keys::MANAGE_BACKEND_SG)
            .unwrap_or(security_groups.is_empty())
    }

    /// Source ranges: the spec field wins, then annotations, then the class; none and no user
    /// security groups means open to all.
    fn source_ranges(
        &mut self,
        spec: &ServiceSpec,
        security_groups: &[String],
        ip_address_type: IpAddressType,
    ) -> Vec<String> {
        let spec_ranges = spec.load_balancer_source_ranges.clone().unwrap_or_default();
        let (ranges_source, ranges): (String, Vec<String>) = if !spec_ranges.is_empty() {
            ("spec.loadBalancerSourceRanges".into(), spec_ranges)
        } else if let Some((raw, l)) = self.parse_list(keys::SOURCE_RANGES) {
            (raw.source, l)
        } else {
            (String::new(), vec![])
        };
        for r in &ranges {
            if !is_cidr(r) {
                self.errors.push(err(
                    &ranges_source,
                    r,
                    "must be a CIDR such as 10.0.0.0/8 or 2001:db8::/32",
                ));
            }
        }
        if !ranges.is_empty() && !security_groups.is_empty() {
            self.errors.push(err(
                &ranges_source,
                &ranges.join(","),
                "cannot be enforced together with user security groups (cloudlb never edits groups it does not own); remove one of the two",
            ));
        }
        if ranges.iter().any(|r| r.contains(':')) && ip_address_type == IpAddressType::Ipv4 {
            self.errors.push(err(
                &ranges_source,
                &ranges.join(","),
                "IPv6 ranges need ip-address-type dualstack",
            ));
        }
        let prefix_lists = self.checked_list(keys::PREFIX_LISTS, |_, p| {
            let id_like = p
                .strip_prefix("pl-")
                .is_some_and(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()));
            (!id_like).then(|| format!("{p:?} is not a managed prefix-list id (pl-…)"))
        });
        if !prefix_lists.is_empty() && !security_groups.is_empty() {
            let source = self.get(keys::PREFIX_LISTS).map(|r| r.source.clone());
            self.errors.push(err(
                &source.unwrap_or_default(),
                &prefix_lists.join(","),
                "cannot be enforced together with user security groups (cloudlb never edits groups it does not own); remove one of the two",
            ));
        }
        let mut allowed =
            if ranges.is_empty() && prefix_lists.is_empty() && security_groups.is_empty() {
                match ip_address_type {
                    IpAddressType::Ipv4 => vec!["0.0.0.0/0".to_string()],
                    IpAddressType::Dualstack => vec!["0.0.0.0/0".to_string(), "::/0".to_string()],
                }
            } else {
                ranges
            };
        // Prefix lists are sources of the frontend rules, as CIDRs are.
        allowed.extend(prefix_lists);
        allowed
    }

    fn name(&mut self) -> Option<String> {
        let raw = self.get(keys::NAME).cloned()?;
        match crate::model::naming::validate_lb_name(raw.value.trim()) {
            Ok(()) => Some(raw.value.trim().to_string()),
            Err(why) => {
                self.errors.push(err(
                    &raw.source,
                    &raw.value,
                    format!("not a valid load-balancer name: {why}"),
                ));
                None
            }
        }
    }

    /// What the Service itself must satisfy: allocated nodePorts for node targets, 1-50 TCP/UDP
    /// ports.
    fn service_checks(&mut self, spec: &ServiceSpec, ports: &[ServicePort], targets: TargetMode) {
        if spec.allocate_load_balancer_node_ports == Some(false) && targets != TargetMode::Pods {
            self.errors.push(err(
                "spec.allocateLoadBalancerNodePorts",
                "false",
                "node targets (target-type instance or node-ip) are reached at the nodePorts, so they must be allocated: remove the field, set it to true, or use target-type ip (the pods)",
            ));
        }
        if ports.is_empty() {
            self.errors.push(err(
                "spec.ports",
                "[]",
                "a LoadBalancer Service needs at least one port",
            ));
        }
        for p in ports {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            if proto != "TCP" && proto != "UDP" {
                self.errors.push(err(
                    "spec.ports",
                    &format!("{} {proto}", p.port),
                    "Network Load Balancers carry TCP and UDP only",
                ));
            }
        }
        if ports.len() > 50 {
            self.errors.push(err(
                "spec.ports",
                &ports.len().to_string(),
                "a Network Load Balancer has at most 50 listeners",
            ));
        }
    }

    /// One step per setting group, in the order of the settings table (which is the order the
    /// errors are reported in).
    fn build(&mut self, class: &LoadBalancerClass) -> LbConfig {
        let spec = self.svc.spec.clone().unwrap_or_default();
        let ports = spec.ports.clone().unwrap_or_default();

        let scheme = self.scheme();
        let ip_address_type = self.ip_address_type();
        let Placement {
            subnets,
            eip_allocations,
            private_ipv4_addresses,
        } = self.placement(scheme);
        let targets = self.targets();
        let ipv6_source_nat = self.ipv6_source_nat(ip_address_type, &ports, &subnets);
        self.pod_family(&spec, targets, ip_address_type);
        let health_check = self.health_check(&ports, targets);
        let Tls {
            ssl_certificates,
            tls_ports,
            ssl_policy,
            alpn_policy,
            backend_tls,
        } = self.tls(&ports);
        let (lb_attributes, tg_attributes) = self.lb_and_tg_attributes();
        let listener_attributes = self.listener_attributes(&ports, &tls_ports);
        let tags = self.tags(class);
        let target_node_labels = self.target_node_labels();
        let security_groups = self.security_groups();
        let manage_backend_rules = self.manage_backend_rules(&security_groups);
        let source_ranges = self.source_ranges(&spec, &security_groups, ip_address_type);
        let name = self.name();
        let replacement_grace = std::time::Duration::from_secs(u64::from(
            self.parse_u32(keys::REPLACEMENT_GRACE, 0, 86_400)
                .unwrap_or(300),
        ));
        self.service_checks(&spec, &ports, targets);

        let local = (class.spec.provider == ProviderKind::Local).then(|| {
            // What the local proxy cannot do is refused, never silently dropped.
            if !tls_ports.is_empty() {
                let raw = self.get(keys::SSL_CERT).or(self.get(keys::SSL_PORTS)).cloned();
                let (source, value) = raw.map_or(("ssl-cert".to_string(), String::new()), |r| (r.source, r.value));
                self.errors.push(err(&source, &value, "the local provider does not terminate TLS; remove it or use an aws class"));
            }
            if !spec.load_balancer_source_ranges.clone().unwrap_or_default().is_empty()
                || self.get(keys::SOURCE_RANGES).is_some()
                || self.get(keys::PREFIX_LISTS).is_some()
            {
                self.errors.push(err(
                    "source ranges",
                    &source_ranges.join(","),
                    "the local provider cannot enforce loadBalancerSourceRanges or prefix lists; remove them or use an aws class",
                ));
            }
            local_spec(class, &mut self.errors)
        });

        LbConfig {
            class_name: class.metadata.name.clone().unwrap_or_default(),
            provider: class.spec.provider,
            scheme,
            ip_address_type,
            subnets,
            eip_allocations,
            private_ipv4_addresses,
            ipv6_source_nat,
            targets,
            health_check,
            ssl_certificates,
            tls_ports,
            ssl_policy,
            alpn_policy,
            listener_attributes,
            backend_tls,
            lb_attributes,
            tg_attributes,
            additional_tags: tags,
            target_node_labels,
            security_groups,
            manage_backend_rules,
            source_ranges,
            name,
            replacement_grace,
            local,
        }
    }
}

/// The scheme of a Service that sets none: `internet-facing` for one an earlier version made
/// (recorded in [`state::DEFAULT_SCHEME_ANNOTATION`] on its next reconcile), else `internal`.
pub fn default_scheme(svc: &Service) -> Scheme {
    let pinned = state::recorded(svc, state::DEFAULT_SCHEME_ANNOTATION);
    if pinned == Some("internet-facing") || state::made_by_an_earlier_version(svc) {
        Scheme::InternetFacing
    } else {
        Scheme::Internal
    }
}

/// Validates a class on its own (for its status condition): a dummy Service with one TCP port and
/// no annotations must resolve.
pub fn validate_class(class: &LoadBalancerClass) -> Result<(), ConfigErrors> {
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};
    let svc = Service {
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    resolve(class, &svc).map(|_| ())
}

#[cfg(test)]
mod crd_tests;
#[cfg(test)]
mod tests;
