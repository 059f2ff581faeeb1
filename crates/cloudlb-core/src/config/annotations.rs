//! Every setting a Service can make by annotation: our `cloudlb.io/…` key, the well-known
//! `service.beta.kubernetes.io/aws-load-balancer-…` alias (so Services written for the
//! aws-load-balancer-controller or the in-tree provider work unchanged), the matching
//! `LoadBalancerClass` field, and its documentation. `docs/annotations.md` is generated from this
//! table (`cloudlb docs annotations`) and a test keeps it current.

/// One setting.
#[derive(Debug)]
pub struct Setting {
    /// Our key is `cloudlb.io/<name>`.
    pub name: &'static str,
    /// Compatible annotation keys, in order of precedence after ours.
    pub aliases: &'static [&'static str],
    /// Path of the `LoadBalancerClass` field giving the default, if any.
    pub class_field: Option<&'static str>,
    pub kind: &'static str,
    pub default: &'static str,
    pub example: &'static str,
    /// What changing it does to an existing load balancer.
    pub on_change: &'static str,
    pub doc: &'static str,
}

impl Setting {
    pub fn key(&self) -> String {
        format!("cloudlb.io/{}", self.name)
    }
}

macro_rules! alias {
    ($s:literal) => {
        concat!("service.beta.kubernetes.io/aws-load-balancer-", $s)
    };
}

pub const SCHEME: &str = "scheme";
pub const INTERNAL: &str = "internal";
pub const IP_ADDRESS_TYPE: &str = "ip-address-type";
pub const SUBNETS: &str = "subnets";
pub const IPV6_SOURCE_NAT: &str = "enable-prefix-for-ipv6-source-nat";
pub const SOURCE_NAT_PREFIXES: &str = "source-nat-ipv6-prefixes";
pub const EIP_ALLOCATIONS: &str = "eip-allocations";
pub const PRIVATE_IPV4: &str = "private-ipv4-addresses";
pub const TARGET_TYPE: &str = "target-type";
pub const HC_PROTOCOL: &str = "healthcheck-protocol";
pub const HC_PORT: &str = "healthcheck-port";
pub const HC_PATH: &str = "healthcheck-path";
pub const HC_INTERVAL: &str = "healthcheck-interval";
pub const HC_TIMEOUT: &str = "healthcheck-timeout";
pub const HC_HEALTHY: &str = "healthcheck-healthy-threshold";
pub const HC_UNHEALTHY: &str = "healthcheck-unhealthy-threshold";
pub const HC_SUCCESS_CODES: &str = "healthcheck-success-codes";
pub const SSL_CERT: &str = "ssl-cert";
pub const SSL_PORTS: &str = "ssl-ports";
pub const SSL_POLICY: &str = "ssl-negotiation-policy";
pub const ALPN_POLICY: &str = "alpn-policy";
pub const BACKEND_PROTOCOL: &str = "backend-protocol";
pub const CROSS_ZONE: &str = "cross-zone-load-balancing-enabled";
pub const DELETION_PROTECTION: &str = "deletion-protection";
pub const PROXY_PROTOCOL: &str = "proxy-protocol";
pub const ACCESS_LOG_ENABLED: &str = "access-log-enabled";
pub const ACCESS_LOG_BUCKET: &str = "access-log-s3-bucket-name";
pub const ACCESS_LOG_PREFIX: &str = "access-log-s3-bucket-prefix";
pub const ADDITIONAL_TAGS: &str = "additional-resource-tags";
pub const TG_ATTRIBUTES: &str = "target-group-attributes";
pub const LB_ATTRIBUTES: &str = "load-balancer-attributes";
pub const TARGET_NODE_LABELS: &str = "target-node-labels";
pub const SECURITY_GROUPS: &str = "security-groups";
pub const MANAGE_BACKEND_SG: &str = "manage-backend-security-group-rules";
pub const NAME: &str = "name";
pub const REPLACEMENT_GRACE: &str = "replacement-grace-period-seconds";
pub const SOURCE_RANGES: &str = "source-ranges";
pub const PREFIX_LISTS: &str = "security-group-prefix-lists";
/// Per-listener attributes: `cloudlb.io/listener-attributes.<PROTOCOL>-<PORT>` and the compatible
/// `service.beta.kubernetes.io/aws-load-balancer-listener-attributes.<PROTOCOL>-<PORT>`.
pub const LISTENER_ATTRIBUTES: &str = "listener-attributes.";
/// The prefixes of the per-listener attribute keys (ours, then the compatible one).
pub const LISTENER_ATTRIBUTES_PREFIXES: [&str; 2] = [
    "cloudlb.io/listener-attributes.",
    alias!("listener-attributes."),
];

/// The upstream (non-AWS-specific) source-ranges annotation.
pub const UPSTREAM_SOURCE_RANGES: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";

pub const SETTINGS: &[Setting] = &[
    Setting {
        name: SCHEME,
        aliases: &[alias!("scheme")],
        class_field: Some("spec.aws.scheme"),
        kind: "`internet-facing` \\| `internal`",
        default: "`internal` (as aws-load-balancer-controller; the in-tree controller's default was `internet-facing`)",
        example: "`internet-facing`",
        on_change: "replaces the load balancer (new DNS name)",
        doc: "Whether the load balancer has public addresses.",
    },
    Setting {
        name: INTERNAL,
        aliases: &[alias!("internal")],
        class_field: None,
        kind: "bool, or `0.0.0.0/0` (the legacy form of `true`)",
        default: "`false`",
        example: "`true`",
        on_change: "replaces the load balancer",
        doc: "Legacy form of `scheme`: `true` means `internal`. Conflicts with a different `scheme`.",
    },
    Setting {
        name: IP_ADDRESS_TYPE,
        aliases: &[alias!("ip-address-type")],
        class_field: Some("spec.aws.ipAddressType"),
        kind: "`ipv4` \\| `dualstack`",
        default: "`ipv4`",
        example: "`dualstack`",
        on_change: "modified in place",
        doc: "Address family of the load balancer.",
    },
    Setting {
        name: SUBNETS,
        aliases: &[alias!("subnets")],
        class_field: Some("spec.aws.subnets"),
        kind: "comma-separated subnet ids or Name tags",
        default: "discovered: subnets tagged `kubernetes.io/role/elb` (internal: `kubernetes.io/role/internal-elb`) and `kubernetes.io/cluster/<cluster>`, one per zone",
        example: "`subnet-0abc,subnet-0def`",
        on_change: "in place (SetSubnets: zones added or removed; discovery follows newly tagged subnets at the drift check and keeps the subnet a zone has)",
        doc: "Subnets the load balancer is placed in.",
    },
    Setting {
        name: IPV6_SOURCE_NAT,
        aliases: &[alias!("enable-prefix-for-ipv6-source-nat")],
        class_field: None,
        kind: "`on` \\| `off`",
        default: "`on` for a `dualstack` load balancer with UDP listeners, else `off` (aws-load-balancer-controller: always `off`, which AWS refuses for UDP on `dualstack`)",
        example: "`on`",
        on_change: "modified in place (SetSubnets)",
        doc: "IPv6 source NAT: the load balancer sends to its targets from one IPv6 /80 prefix per subnet, which UDP listeners of a `dualstack` Network Load Balancer need. Needs `ip-address-type: dualstack` and subnets with an IPv6 block; `off` with UDP ports on `dualstack` is refused before anything is written.",
    },
    Setting {
        name: SOURCE_NAT_PREFIXES,
        aliases: &[alias!("source-nat-ipv6-prefixes")],
        class_field: None,
        kind: "comma-separated, one per subnet in subnet order: `auto` (or `auto_assigned`) or an IPv6 /80 from the subnet's block",
        default: "`auto` for every subnet",
        example: "`auto,2600:1f14:abc:1200::/80`",
        on_change: "used when source NAT is turned on",
        doc: "The IPv6 source-NAT prefix of each subnet (with `enable-prefix-for-ipv6-source-nat` on).",
    },
    Setting {
        name: EIP_ALLOCATIONS,
        aliases: &[alias!("eip-allocations")],
        class_field: None,
        kind: "comma-separated EIP allocation ids, one per subnet",
        default: "none",
        example: "`eipalloc-1,eipalloc-2`",
        on_change: "used at creation",
        doc: "Static public addresses (internet-facing only).",
    },
    Setting {
        name: PRIVATE_IPV4,
        aliases: &[alias!("private-ipv4-addresses")],
        class_field: None,
        kind: "comma-separated IPv4 addresses, one per subnet",
        default: "none",
        example: "`10.0.1.10,10.0.2.10`",
        on_change: "used at creation",
        doc: "Static private addresses (internal only).",
    },
    Setting {
        name: TARGET_TYPE,
        aliases: &[alias!("nlb-target-type")],
        class_field: Some("spec.aws.targetType"),
        kind: "`instance` \\| `node-ip` \\| `ip`",
        default: "`instance`; `ip` with `service.beta.kubernetes.io/aws-load-balancer-type: nlb-ip`",
        example: "`ip`",
        on_change: "replaces the target groups (listeners switch over)",
        doc: "What receives the traffic. `instance`: every eligible node by instance id, at the nodePort. `node-ip`: every eligible node by InternalIP, at the nodePort. `ip`: the Service's ready pods by IP, at the targetPort, from its EndpointSlices (as in aws-load-balancer-controller; no nodePorts needed, so `allocateLoadBalancerNodePorts: false` works). Earlier versions of cloudlb registered the nodes for `ip`: that is `node-ip` now (see docs/install.md, Upgrading).",
    },
    Setting {
        name: HC_PROTOCOL,
        aliases: &[alias!("healthcheck-protocol")],
        class_field: Some("spec.aws.healthCheck.protocol"),
        kind: "`tcp` \\| `http` \\| `https`",
        default: "`tcp`; `http` when `externalTrafficPolicy: Local` and for UDP-only ports",
        example: "`http`",
        on_change: "modified in place",
        doc: "Health-check protocol.",
    },
    Setting {
        name: HC_PORT,
        aliases: &[alias!("healthcheck-port")],
        class_field: Some("spec.aws.healthCheck.port"),
        kind: "`traffic-port` \\| 1-65535",
        default: "`traffic-port`; `healthCheckNodePort` when `externalTrafficPolicy: Local`; `10256` (kube-proxy `/healthz`) for UDP-only ports",
        example: "`10256`",
        on_change: "modified in place",
        doc: "Health-check port.",
    },
    Setting {
        name: HC_PATH,
        aliases: &[alias!("healthcheck-path")],
        class_field: Some("spec.aws.healthCheck.path"),
        kind: "path starting with `/`",
        default: "`/healthz` for eTP Local, `/` for other HTTP checks",
        example: "`/ready`",
        on_change: "modified in place",
        doc: "Health-check path (HTTP/HTTPS only).",
    },
    Setting {
        name: HC_INTERVAL,
        aliases: &[alias!("healthcheck-interval")],
        class_field: Some("spec.aws.healthCheck.intervalSeconds"),
        kind: "seconds, 5-300",
        default: "`10`",
        example: "`30`",
        on_change: "modified in place",
        doc: "Seconds between health checks.",
    },
    Setting {
        name: HC_TIMEOUT,
        aliases: &[alias!("healthcheck-timeout")],
        class_field: Some("spec.aws.healthCheck.timeoutSeconds"),
        kind: "seconds, 2-120",
        default: "`10` (TCP), `6` (HTTP)",
        example: "`5`",
        on_change: "modified in place",
        doc: "Health-check timeout.",
    },
    Setting {
        name: HC_HEALTHY,
        aliases: &[alias!("healthcheck-healthy-threshold")],
        class_field: Some("spec.aws.healthCheck.healthyThreshold"),
        kind: "2-10",
        default: "`3`",
        example: "`2`",
        on_change: "modified in place",
        doc: "Consecutive successes before a target is healthy.",
    },
    Setting {
        name: HC_UNHEALTHY,
        aliases: &[alias!("healthcheck-unhealthy-threshold")],
        class_field: Some("spec.aws.healthCheck.unhealthyThreshold"),
        kind: "2-10",
        default: "`3`",
        example: "`2`",
        on_change: "modified in place",
        doc: "Consecutive failures before a target is unhealthy.",
    },
    Setting {
        name: HC_SUCCESS_CODES,
        aliases: &[alias!("healthcheck-success-codes")],
        class_field: Some("spec.aws.healthCheck.successCodes"),
        kind: "HTTP codes `200`, `200,202` or range `200-399`",
        default: "`200-399`",
        example: "`200`",
        on_change: "modified in place",
        doc: "HTTP codes that count as healthy (HTTP/HTTPS only).",
    },
    Setting {
        name: SSL_CERT,
        aliases: &[alias!("ssl-cert")],
        class_field: None,
        kind: "comma-separated ACM/IAM certificate ARNs",
        default: "none",
        example: "`arn:aws:acm:us-east-1:123456789012:certificate/abc`",
        on_change: "modified in place",
        doc: "Certificates for TLS listeners; the first is the default certificate.",
    },
    Setting {
        name: SSL_PORTS,
        aliases: &[alias!("ssl-ports")],
        class_field: None,
        kind: "comma-separated port names/numbers",
        default: "every TCP port when `ssl-cert` is set",
        example: "`443,https`",
        on_change: "modified in place",
        doc: "Which ports get TLS listeners; each must be a TCP port of the Service.",
    },
    Setting {
        name: SSL_POLICY,
        aliases: &[alias!("ssl-negotiation-policy")],
        class_field: Some("spec.aws.sslNegotiationPolicy"),
        kind: "ELB security policy name",
        default: "AWS default",
        example: "`ELBSecurityPolicy-TLS13-1-2-2021-06`",
        on_change: "modified in place",
        doc: "TLS policy of TLS listeners.",
    },
    Setting {
        name: ALPN_POLICY,
        aliases: &[alias!("alpn-policy")],
        class_field: None,
        kind: "`HTTP1Only` \\| `HTTP2Only` \\| `HTTP2Optional` \\| `HTTP2Preferred` \\| `None`",
        default: "none (the listeners' policy is left as it is)",
        example: "`HTTP2Preferred`",
        on_change: "modified in place",
        doc: "The ALPN policy of the TLS listeners (other listeners have none).",
    },
    Setting {
        name: BACKEND_PROTOCOL,
        aliases: &[alias!("backend-protocol")],
        class_field: None,
        kind: "`ssl` or `tls` (TLS to the targets) \\| `tcp`, `http`, `https` (TCP)",
        default: "`tcp`",
        example: "`ssl`",
        on_change: "replaces the target groups of TLS ports",
        doc: "Protocol from the load balancer to the nodes for TLS ports (`ssl`/`tls`: re-encrypt).",
    },
    Setting {
        name: CROSS_ZONE,
        aliases: &[alias!("cross-zone-load-balancing-enabled")],
        class_field: Some("spec.aws.crossZoneLoadBalancing"),
        kind: "bool",
        default: "`false`",
        example: "`true`",
        on_change: "modified in place",
        doc: "Balance across zones (`load_balancing.cross_zone.enabled`).",
    },
    Setting {
        name: DELETION_PROTECTION,
        aliases: &[],
        class_field: Some("spec.aws.deletionProtection"),
        kind: "bool",
        default: "`false`",
        example: "`true`",
        on_change: "modified in place; while on, deleting the Service stops with an Event instead of deleting the load balancer",
        doc: "Protect the load balancer from deletion (`deletion_protection.enabled`).",
    },
    Setting {
        name: ACCESS_LOG_ENABLED,
        aliases: &[alias!("access-log-enabled")],
        class_field: None,
        kind: "bool",
        default: "none (the attribute is left as it is)",
        example: "`true`",
        on_change: "modified in place",
        doc: "`true` turns access logs on (`access_logs.s3.enabled`), to the bucket and prefix below; `false` leaves the attribute alone, as in aws-load-balancer-controller (turn them off with `load-balancer-attributes`).",
    },
    Setting {
        name: ACCESS_LOG_BUCKET,
        aliases: &[alias!("access-log-s3-bucket-name")],
        class_field: None,
        kind: "S3 bucket name",
        default: "none",
        example: "`shop-logs`",
        on_change: "modified in place",
        doc: "The access logs' bucket (`access_logs.s3.bucket`); read only with `access-log-enabled: true`.",
    },
    Setting {
        name: ACCESS_LOG_PREFIX,
        aliases: &[alias!("access-log-s3-bucket-prefix")],
        class_field: None,
        kind: "S3 key prefix",
        default: "none",
        example: "`nlb/web`",
        on_change: "modified in place",
        doc: "The access logs' prefix (`access_logs.s3.prefix`); read only with `access-log-enabled: true`.",
    },
    Setting {
        name: PROXY_PROTOCOL,
        aliases: &[alias!("proxy-protocol")],
        class_field: Some("spec.aws.proxyProtocol"),
        kind: "`*` (alias) or bool (ours)",
        default: "off",
        example: "`*`",
        on_change: "modified in place",
        doc: "Send PROXY protocol v2 to the nodes (`proxy_protocol_v2.enabled`).",
    },
    Setting {
        name: ADDITIONAL_TAGS,
        aliases: &[alias!("additional-resource-tags")],
        class_field: Some("spec.aws.additionalTags"),
        kind: "comma-separated `key=value`",
        default: "none",
        example: "`team=web,env=prod`",
        on_change: "in place (AddTags/RemoveTags; only keys cloudlb put there are removed)",
        doc: "Extra tags on every resource (class and Service tags merge; the Service wins).",
    },
    Setting {
        name: TG_ATTRIBUTES,
        aliases: &[alias!("target-group-attributes")],
        class_field: Some("spec.aws.targetGroupAttributes"),
        kind: "comma-separated `key=value` (NLB target-group attributes)",
        default: "AWS defaults",
        example: "`deregistration_delay.timeout_seconds=30,preserve_client_ip.enabled=false`",
        on_change: "modified in place",
        doc: "Target-group attributes.",
    },
    Setting {
        name: LB_ATTRIBUTES,
        aliases: &[alias!("attributes"), alias!("load-balancer-attributes")],
        class_field: Some("spec.aws.loadBalancerAttributes"),
        kind: "comma-separated `key=value` (NLB attributes)",
        default: "AWS defaults; an attribute no setting names is left as the load balancer has it",
        example: "`access_logs.s3.enabled=true,access_logs.s3.bucket=logs`",
        on_change: "modified in place; an attribute removed from the setting keeps its value",
        doc: "Load-balancer attributes (access logs, deletion protection, cross-zone). `service.beta.kubernetes.io/aws-load-balancer-attributes` is the key aws-load-balancer-controller reads; `…-load-balancer-load-balancer-attributes`, which earlier cloudlb versions documented, is still read (deprecated).",
    },
    Setting {
        name: TARGET_NODE_LABELS,
        aliases: &[alias!("target-node-labels")],
        class_field: Some("spec.aws.targetNodeLabels"),
        kind: "comma-separated `key=value`",
        default: "every eligible node",
        example: "`node-role/edge=true`",
        on_change: "targets (de)registered",
        doc: "Only nodes carrying all these labels are targets.",
    },
    Setting {
        name: SECURITY_GROUPS,
        aliases: &[alias!("security-groups")],
        class_field: Some("spec.aws.securityGroups"),
        kind: "comma-separated security-group ids",
        default: "a frontend group managed by cloudlb",
        example: "`sg-0abc`",
        on_change: "modified in place",
        doc: "Attach these groups instead of cloudlb's own (cloudlb never edits them, so source ranges cannot be combined with this).",
    },
    Setting {
        name: MANAGE_BACKEND_SG,
        aliases: &[alias!("manage-backend-security-group-rules")],
        class_field: Some("spec.aws.manageBackendSecurityGroupRules"),
        kind: "bool",
        default: "`true`, or `false` with `security-groups` of your own (as aws-load-balancer-controller)",
        example: "`false`",
        on_change: "rules added at the next reconcile; turned off, cloudlb's rules stay until no load balancer of the cluster uses them",
        doc: "Let the load balancer reach its targets: one backend security group per cluster, attached to every load balancer cloudlb manages, and admitted by rules on the targets' security groups (the nodes' for `instance`/`node-ip`, the pods' network interfaces' for `ip`) on the traffic and health-check ports; for node targets the whole nodePort range (`--node-port-range`), so the rule count stays constant, however many Services. Of an instance's groups, the one tagged `kubernetes.io/cluster/<cluster>`, else its only one, is changed. Only rules cloudlb made are ever removed. Off: open the ports yourself (see docs/install.md).",
    },
    Setting {
        name: NAME,
        aliases: &[alias!("name")],
        class_field: None,
        kind: "≤32 chars, letters, digits, hyphens",
        default: "`k8s-<namespace>-<name>-<hash>`",
        example: "`web-prod`",
        on_change: "replaced without downtime: a new load balancer under the new name beside the old one, which serves until the new one is active and then for the grace period",
        doc: "Name of the load balancer.",
    },
    Setting {
        name: REPLACEMENT_GRACE,
        aliases: &[],
        class_field: Some("spec.aws.replacementGracePeriodSeconds"),
        kind: "seconds, 0-86400",
        default: "`300`",
        example: "`600`",
        on_change: "applies to the next replacement",
        doc: "How long a replaced load balancer keeps serving after the Service's status moved to its replacement, so DNS caches follow.",
    },
    Setting {
        name: SOURCE_RANGES,
        aliases: &[UPSTREAM_SOURCE_RANGES],
        class_field: Some("spec.aws.sourceRanges"),
        kind: "comma-separated CIDRs",
        default: "`0.0.0.0/0` (and `::/0` for dualstack)",
        example: "`10.0.0.0/8,192.168.0.0/16`",
        on_change: "security-group rules updated in place",
        doc: "Client ranges allowed in; `spec.loadBalancerSourceRanges` takes precedence.",
    },
    Setting {
        name: "listener-attributes.<PROTOCOL>-<PORT>",
        aliases: &[alias!("listener-attributes.<PROTOCOL>-<PORT>")],
        class_field: None,
        kind: "comma-separated `key=value` (e.g. `tcp.idle_timeout.seconds=400`)",
        default: "none (the listener's attributes are left as they are)",
        example: "`listener-attributes.TCP-80: tcp.idle_timeout.seconds=400`",
        on_change: "modified in place",
        doc: "Attributes of the listener on `<PORT>` with `<PROTOCOL>` (`TCP`, `UDP`, `TLS`, `TCP_UDP`), passed to AWS as given (AWS validates them).",
    },
    Setting {
        name: PREFIX_LISTS,
        aliases: &[alias!("security-group-prefix-lists")],
        class_field: None,
        kind: "comma-separated managed prefix-list ids (`pl-…`)",
        default: "none",
        example: "`pl-0123abcd,pl-4567efgh`",
        on_change: "security-group rules updated in place",
        doc: "Prefix lists allowed in on every listener port, besides the source ranges; with prefix lists and no source range, no `0.0.0.0/0` rule is made (as in aws-load-balancer-controller).",
    },
];

/// Where a setting deliberately means something else in cloudlb than in
/// aws-load-balancer-controller (ALBC) or the legacy in-tree provider: the `Differs` column of
/// `docs/annotations.md`. A value refused here says why in the Service's `InvalidConfiguration`
/// Event. Every setting not listed means the same, with the same default.
pub const DIFFERENCES: &[(&str, &str)] = &[
    (
        TARGET_TYPE,
        "`node-ip` (the nodes by address) is cloudlb's own; `instance` and `ip` (the pods) mean what they mean in ALBC",
    ),
    (
        INTERNAL,
        "values other than true, false and 0.0.0.0/0 are refused (the legacy provider reads any other value as true)",
    ),
    (
        BACKEND_PROTOCOL,
        "values other than tcp, http, https, ssl and tls are refused (ALBC reads any value but ssl as tcp)",
    ),
    (
        SSL_PORTS,
        "`*` is refused, as in ALBC (the legacy provider read it as every port)",
    ),
    (
        PROXY_PROTOCOL,
        "`true`/`false` are accepted besides ALBC's `*`",
    ),
    (
        IPV6_SOURCE_NAT,
        "on by default for UDP on a dualstack load balancer (ALBC: off, which AWS refuses for UDP there)",
    ),
    (SECURITY_GROUPS, "ids only (ALBC also resolves Name tags)"),
];

/// How setting `name` differs from the AWS controllers, if it does.
pub fn difference(name: &str) -> Option<&'static str> {
    DIFFERENCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, d)| *d)
}

pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// The prefixes of the keys cloudlb reads: ours and the AWS controllers' compatible ones.
pub const READ_PREFIXES: &[&str] = &["cloudlb.io/", alias!("")];

/// Keys under [`READ_PREFIXES`] that are not settings but are read elsewhere: which controller
/// serves the Service, and its target mode (`aws-load-balancer-type`).
pub const READ_ELSEWHERE: &[&str] = &[crate::ownership::AWS_LB_TYPE];

/// The annotation keys of `annotations` that look like ours or the AWS controllers' (under
/// [`READ_PREFIXES`]) but that cloudlb does not understand: ignored, and to be reported.
pub fn unsupported<'a>(annotations: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    annotations
        .into_iter()
        .map(String::as_str)
        .filter(|k| READ_PREFIXES.iter().any(|p| k.starts_with(p)))
        .filter(|k| !READ_ELSEWHERE.contains(k))
        .filter(|k| {
            !LISTENER_ATTRIBUTES_PREFIXES
                .iter()
                .any(|p| k.starts_with(p))
        })
        .filter(|k| {
            !SETTINGS
                .iter()
                .any(|s| k.strip_prefix("cloudlb.io/") == Some(s.name) || s.aliases.contains(k))
        })
        .collect()
}

/// Markdown reference of every annotation, generated from [`SETTINGS`].
pub fn markdown() -> String {
    let mut out = String::from(
        "# Service annotations\n\n\
         Generated from `crates/cloudlb-core/src/config/annotations.rs` by `cloudlb docs annotations`; do not edit by hand.\n\n\
         Precedence, highest first: `spec.loadBalancerSourceRanges` (source ranges only), our\n\
         `cloudlb.io/…` annotation, the compatible `service.beta.kubernetes.io/…` annotation, the\n\
         `LoadBalancerClass` field, the built-in default. Setting our key and a compatible key to\n\
         different values is an error. Every invalid value is reported in one Warning Event\n\
         (`InvalidConfiguration`) and nothing is written to the cloud.\n\n\
         The `Differs` column says where a setting deliberately means something else than in\n\
         aws-load-balancer-controller (ALBC) or the legacy in-tree provider (a value refused here\n\
         is refused with the reason in the Event). Everything else means the same, with the same\n\
         default.\n\n\
         | Annotation | Compatible keys | Class field | Type | Default | Example | On change | Differs |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for s in SETTINGS {
        let aliases = if s.aliases.is_empty() {
            "—".to_string()
        } else {
            s.aliases
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join("<br>")
        };
        out.push_str(&format!(
            "| `{}`<br>{} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.key(),
            s.doc,
            aliases,
            s.class_field.map_or("—".to_string(), |f| format!("`{f}`")),
            s.kind,
            s.default,
            s.example,
            s.on_change,
            difference(s.name).unwrap_or("—")
        ));
    }
    out
}
