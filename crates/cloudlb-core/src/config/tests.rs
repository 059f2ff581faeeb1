use super::*;
use crate::config::class::{AwsClassSpec, HealthCheckSpec, LoadBalancerClassSpec};
use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

fn class(aws: Option<AwsClassSpec>) -> LoadBalancerClass {
    let spec = LoadBalancerClassSpec {
        aws,
        ..LoadBalancerClassSpec::default_of(ProviderKind::Aws)
    };
    LoadBalancerClass::new("web", spec)
}

fn port(name: &str, port: i32, proto: &str) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        protocol: Some(proto.into()),
        node_port: Some(30000 + port),
        ..Default::default()
    }
}

fn svc(annotations: &[(&str, &str)], ports: Vec<ServicePort>) -> Service {
    let mut s = Service {
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(ports),
            ..Default::default()
        }),
        ..Default::default()
    };
    s.metadata.annotations = Some(
        annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    s
}

fn web() -> Vec<ServicePort> {
    vec![port("http", 80, "TCP"), port("https", 443, "TCP")]
}

fn resolve_ok(c: &LoadBalancerClass, s: &Service) -> LbConfig {
    resolve(c, s).unwrap_or_else(|e| panic!("expected valid config, got: {e}"))
}

fn resolve_err(c: &LoadBalancerClass, s: &Service) -> Vec<ConfigError> {
    match resolve(c, s) {
        Ok(cfg) => panic!("expected errors, got {cfg:?}"),
        Err(e) => e.0,
    }
}

/// The problems of a Service with `annotations` and `ports` (default class); the first one's
/// `allowed` says `needle`.
fn first_error_says(
    annotations: &[(&str, &str)],
    ports: Vec<ServicePort>,
    needle: &str,
) -> Vec<ConfigError> {
    let errs = resolve_err(&class(None), &svc(annotations, ports));
    assert!(errs[0].allowed.contains(needle), "{needle:?} in {errs:?}");
    errs
}

#[test]
fn the_default_scheme_is_internal_except_for_services_an_earlier_version_made() {
    use crate::model::state;
    let mut s = svc(&[], web());
    assert_eq!(resolve_ok(&class(None), &s).scheme, Scheme::Internal);
    // Ours, without the installation every version since records: made before the default.
    s.metadata.finalizers = Some(vec![state::FINALIZER.into()]);
    assert_eq!(resolve_ok(&class(None), &s).scheme, Scheme::InternetFacing);
    // Recorded since (the next reconcile pins it), and asked-for schemes still win.
    let mut annotate = |k: &str, v: &str| {
        let annotations = s.metadata.annotations.get_or_insert_with(Default::default);
        annotations.insert(k.into(), v.into());
        resolve_ok(&class(None), &s).scheme
    };
    annotate(state::INSTALLATION_ANNOTATION, "cloudlb");
    let pinned = annotate(state::DEFAULT_SCHEME_ANNOTATION, "internet-facing");
    assert_eq!(pinned, Scheme::InternetFacing);
    assert_eq!(annotate("cloudlb.io/scheme", "internal"), Scheme::Internal);
    // A class's scheme wins over the pinned default too.
    let internal = AwsClassSpec {
        scheme: Some("internal".into()),
        ..AwsClassSpec::default()
    };
    let mut pinned = svc(
        &[(state::DEFAULT_SCHEME_ANNOTATION, "internet-facing")],
        web(),
    );
    assert_eq!(
        resolve_ok(&class(Some(internal)), &pinned).scheme,
        Scheme::Internal
    );
    pinned.metadata.annotations = None;
    assert_eq!(resolve_ok(&class(None), &pinned).scheme, Scheme::Internal);
}

#[test]
fn defaults_without_annotations() {
    let cfg = resolve_ok(&class(None), &svc(&[], web()));
    // Internal unless asked (as aws-load-balancer-controller).
    assert_eq!(cfg.scheme, Scheme::Internal);
    assert_eq!(cfg.ip_address_type, IpAddressType::Ipv4);
    assert_eq!(cfg.subnets, Subnets::Discover);
    assert_eq!(cfg.targets, TargetMode::Instance);
    assert_eq!(cfg.source_ranges, vec!["0.0.0.0/0"]);
    assert!(cfg.tls_ports.is_empty());
    assert_eq!(cfg.health_check, HealthCheckConfig::default());
}

#[test]
fn our_keys_and_compatible_keys_mean_the_same() {
    let ours = svc(
        &[
            ("cloudlb.io/scheme", "internal"),
            ("cloudlb.io/target-type", "ip"),
        ],
        web(),
    );
    let alb = svc(
        &[
            (
                "service.beta.kubernetes.io/aws-load-balancer-scheme",
                "internal",
            ),
            (
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
                "ip",
            ),
        ],
        web(),
    );
    let legacy = svc(
        &[
            (
                "service.beta.kubernetes.io/aws-load-balancer-internal",
                "true",
            ),
            (
                "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
                "ip",
            ),
        ],
        web(),
    );
    let a = resolve_ok(&class(None), &ours);
    assert_eq!(a.scheme, Scheme::Internal);
    assert_eq!(a.targets, TargetMode::Pods);
    assert_eq!(a, resolve_ok(&class(None), &alb));
    assert_eq!(a, resolve_ok(&class(None), &legacy));
}

#[test]
fn target_types_mean_what_aws_load_balancer_controller_means() {
    let mode =
        |annotations: &[(&str, &str)]| resolve_ok(&class(None), &svc(annotations, web())).targets;
    const LB_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-type";
    assert_eq!(mode(&[]), TargetMode::Instance);
    assert_eq!(
        mode(&[("cloudlb.io/target-type", "node-ip")]),
        TargetMode::NodeIp
    );
    assert_eq!(mode(&[("cloudlb.io/target-type", "ip")]), TargetMode::Pods);
    assert_eq!(mode(&[(LB_TYPE, "external")]), TargetMode::Instance);
    assert_eq!(
        mode(&[(LB_TYPE, "nlb-ip")]),
        TargetMode::Pods,
        "nlb-ip means pods"
    );
    assert_eq!(
        mode(&[(LB_TYPE, "nlb-ip"), ("cloudlb.io/target-type", "ip")]),
        TargetMode::Pods
    );
    let errs = resolve_err(
        &class(None),
        &svc(
            &[(LB_TYPE, "nlb-ip"), ("cloudlb.io/target-type", "instance")],
            web(),
        ),
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].source, "annotation cloudlb.io/target-type");
    assert!(errs[0].allowed.contains("conflicts with annotation service.beta.kubernetes.io/aws-load-balancer-type = \"nlb-ip\""), "{errs:?}");
}

#[test]
fn conflicting_keys_are_an_error() {
    let errs = first_error_says(
        &[
            ("cloudlb.io/scheme", "internal"),
            (
                "service.beta.kubernetes.io/aws-load-balancer-scheme",
                "internet-facing",
            ),
        ],
        web(),
        "conflicts with annotation cloudlb.io/scheme",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");

    let s = svc(
        &[
            ("cloudlb.io/scheme", "internet-facing"),
            (
                "service.beta.kubernetes.io/aws-load-balancer-internal",
                "true",
            ),
        ],
        web(),
    );
    let errs = resolve_err(&class(None), &s);
    assert!(
        errs[0].source.contains("aws-load-balancer-internal"),
        "{errs:?}"
    );
}

#[test]
fn every_problem_is_reported_at_once_with_key_value_and_allowed() {
    let s = svc(
        &[
            ("cloudlb.io/scheme", "public"),
            ("cloudlb.io/target-type", "pod"),
            ("cloudlb.io/healthcheck-interval", "1"),
            ("cloudlb.io/healthcheck-timeout", "abc"),
            ("cloudlb.io/healthcheck-healthy-threshold", "11"),
            ("cloudlb.io/cross-zone-load-balancing-enabled", "yes"),
            ("cloudlb.io/ssl-ports", "8443"),
            ("cloudlb.io/target-group-attributes", "Bogus-Key=1"),
            ("cloudlb.io/name", "-bad_name-"),
        ],
        web(),
    );
    let errs = resolve_err(&class(None), &s);
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    let all = text.join("\n");
    for needle in [
        "annotation cloudlb.io/scheme = \"public\": allowed values: internet-facing, internal",
        "annotation cloudlb.io/target-type = \"pod\": allowed values: instance, node-ip, ip",
        "annotation cloudlb.io/healthcheck-interval = \"1\": must be an integer from 5 to 300",
        "annotation cloudlb.io/healthcheck-timeout = \"abc\": must be an integer from 2 to 120",
        "annotation cloudlb.io/healthcheck-healthy-threshold = \"11\": must be an integer from 2 to 10",
        "annotation cloudlb.io/cross-zone-load-balancing-enabled = \"yes\": must be true or false",
        "port \"8443\" is not a port of this Service; its ports: http (80), https (443)",
        "TLS ports need a certificate",
        "\"Bogus-Key\" is not an attribute key",
        "annotation cloudlb.io/name = \"-bad_name-\": not a valid load-balancer name",
    ] {
        assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
    }
}

#[test]
fn tls_ports_default_to_every_tcp_port_and_respect_names() {
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/abc";
    let cfg = resolve_ok(&class(None), &svc(&[("cloudlb.io/ssl-cert", cert)], web()));
    assert_eq!(cfg.tls_ports, vec![80, 443]);
    assert_eq!(cfg.ssl_certificates, vec![cert]);
    let cfg = resolve_ok(
        &class(None),
        &svc(
            &[
                (
                    "service.beta.kubernetes.io/aws-load-balancer-ssl-cert",
                    cert,
                ),
                (
                    "service.beta.kubernetes.io/aws-load-balancer-ssl-ports",
                    "https",
                ),
            ],
            web(),
        ),
    );
    assert_eq!(cfg.tls_ports, vec![443]);
}

#[test]
fn tls_on_a_udp_port_is_rejected() {
    let cert = "arn:aws:acm:us-east-1:123456789012:certificate/abc";
    first_error_says(
        &[
            ("cloudlb.io/ssl-cert", cert),
            ("cloudlb.io/ssl-ports", "dns"),
        ],
        vec![port("dns", 53, "UDP")],
        "is UDP, TLS listeners need a TCP port",
    );
}

#[test]
fn eip_count_must_match_subnets_and_scheme() {
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("cloudlb.io/scheme", "internet-facing"),
                ("cloudlb.io/subnets", "subnet-1,subnet-2"),
                ("cloudlb.io/eip-allocations", "eipalloc-1"),
            ],
            "1 given, 2 subnets",
        ),
        (
            &[
                ("cloudlb.io/scheme", "internet-facing"),
                ("cloudlb.io/eip-allocations", "eipalloc-1,eipalloc-2"),
            ],
            "requires explicit subnets",
        ),
        // The default scheme, internal, has no public addresses to allocate.
        (
            &[
                ("cloudlb.io/subnets", "subnet-1"),
                ("cloudlb.io/eip-allocations", "eipalloc-1"),
            ],
            "require scheme internet-facing",
        ),
        (
            &[
                ("cloudlb.io/scheme", "internal"),
                ("cloudlb.io/subnets", "subnet-1"),
                ("cloudlb.io/eip-allocations", "eipalloc-1"),
            ],
            "require scheme internet-facing",
        ),
    ];
    for (annotations, needle) in cases {
        first_error_says(annotations, web(), needle);
    }

    let ok = svc(
        &[
            ("cloudlb.io/scheme", "internal"),
            ("cloudlb.io/subnets", "subnet-1,subnet-2"),
            ("cloudlb.io/private-ipv4-addresses", "10.0.1.10, 10.0.2.10"),
        ],
        web(),
    );
    assert_eq!(
        resolve_ok(&class(None), &ok).private_ipv4_addresses,
        vec!["10.0.1.10", "10.0.2.10"]
    );
}

#[test]
fn source_ranges_precedence_and_enforcement() {
    let mut s = svc(
        &[(
            "service.beta.kubernetes.io/load-balancer-source-ranges",
            "10.0.0.0/8",
        )],
        web(),
    );
    assert_eq!(
        resolve_ok(&class(None), &s).source_ranges,
        vec!["10.0.0.0/8"]
    );
    if let Some(spec) = s.spec.as_mut() {
        spec.load_balancer_source_ranges = Some(vec!["192.168.0.0/16".into()]);
    }
    assert_eq!(
        resolve_ok(&class(None), &s).source_ranges,
        vec!["192.168.0.0/16"],
        "spec wins"
    );

    let bad = svc(&[("cloudlb.io/source-ranges", "10.0.0.0/33,nope")], web());
    assert_eq!(resolve_err(&class(None), &bad).len(), 2);

    // Our own groups are never edited, so source ranges cannot be enforced with user groups.
    first_error_says(
        &[
            ("cloudlb.io/source-ranges", "10.0.0.0/8"),
            ("cloudlb.io/security-groups", "sg-1"),
        ],
        web(),
        "cannot be enforced",
    );

    let dual = svc(&[("cloudlb.io/ip-address-type", "dualstack")], web());
    assert_eq!(
        resolve_ok(&class(None), &dual).source_ranges,
        vec!["0.0.0.0/0", "::/0"]
    );
}

#[test]
fn class_defaults_apply_and_annotations_override_them() {
    let c = class(Some(AwsClassSpec {
        scheme: Some("internal".into()),
        target_type: Some("ip".into()),
        health_check: Some(HealthCheckSpec {
            interval_seconds: Some(30),
            ..Default::default()
        }),
        additional_tags: Some(
            [
                ("team".to_string(), "a".to_string()),
                ("env".to_string(), "dev".to_string()),
            ]
            .into(),
        ),
        deletion_protection: Some(true),
        ..Default::default()
    }));
    let cfg = resolve_ok(&c, &svc(&[], web()));
    assert_eq!(cfg.scheme, Scheme::Internal);
    assert_eq!(cfg.targets, TargetMode::Pods);
    assert_eq!(cfg.health_check.interval_seconds, Some(30));
    assert_eq!(
        cfg.lb_attributes
            .get("deletion_protection.enabled")
            .map(String::as_str),
        Some("true")
    );

    let cfg = resolve_ok(
        &c,
        &svc(
            &[
                ("cloudlb.io/scheme", "internet-facing"),
                ("cloudlb.io/additional-resource-tags", "team=b"),
            ],
            web(),
        ),
    );
    assert_eq!(cfg.scheme, Scheme::InternetFacing);
    assert_eq!(
        cfg.additional_tags.get("team").map(String::as_str),
        Some("b")
    );
    assert_eq!(
        cfg.additional_tags.get("env").map(String::as_str),
        Some("dev"),
        "class tags merge"
    );
}

#[test]
fn invalid_class_values_name_the_class_field() {
    let c = class(Some(AwsClassSpec {
        scheme: Some("sideways".into()),
        ..Default::default()
    }));
    let errs = validate_class(&c).expect_err("invalid class").0;
    assert_eq!(errs[0].source, "LoadBalancerClass web spec.aws.scheme");
}

#[test]
fn service_level_problems() {
    let mut s = svc(&[], vec![port("sctp", 80, "SCTP")]);
    if let Some(spec) = s.spec.as_mut() {
        spec.allocate_load_balancer_node_ports = Some(false);
    }
    let all: Vec<String> = resolve_err(&class(None), &s)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        all.iter()
            .any(|e| e.contains("spec.allocateLoadBalancerNodePorts")),
        "{all:?}"
    );
    assert!(
        all.iter().any(|e| e.contains("TCP and UDP only")),
        "{all:?}"
    );
}

#[test]
fn proxy_protocol_and_attributes() {
    let cfg = resolve_ok(
        &class(None),
        &svc(
            &[
                (
                    "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol",
                    "*",
                ),
                (
                    "cloudlb.io/target-group-attributes",
                    "deregistration_delay.timeout_seconds=30",
                ),
                (
                    "cloudlb.io/load-balancer-attributes",
                    "access_logs.s3.enabled=true,access_logs.s3.bucket=logs",
                ),
            ],
            web(),
        ),
    );
    assert_eq!(
        cfg.tg_attributes
            .get("proxy_protocol_v2.enabled")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        cfg.tg_attributes
            .get("deregistration_delay.timeout_seconds")
            .map(String::as_str),
        Some("30")
    );
    assert_eq!(
        cfg.lb_attributes
            .get("access_logs.s3.bucket")
            .map(String::as_str),
        Some("logs")
    );

    first_error_says(
        &[(
            "cloudlb.io/load-balancer-attributes",
            "access_logs.s3.enabled=true",
        )],
        web(),
        "access_logs.s3.bucket",
    );
}

/// Random and hostile annotation values never panic, and every rejected value is reported with
/// the key and value the Service carries and what is allowed.
#[test]
fn hostile_input_never_panics() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let pieces = [
        "",
        " ",
        ",",
        "=",
        "*",
        "-",
        "/",
        "0",
        "65536",
        "-1",
        "true",
        "tcp",
        "internal",
        "ip",
        "😀",
        "ä",
        "\u{0}",
        "a=b",
        "10.0.0.0/8",
        "::/0",
        "subnet-1",
        "eipalloc-1",
        "sg-1",
        "arn:aws:acm:x",
        "4294967296",
        "http",
    ];
    let keys: Vec<String> = annotations::SETTINGS
        .iter()
        .flat_map(|s| std::iter::once(s.key()).chain(s.aliases.iter().map(|a| a.to_string())))
        .collect();
    // A list value as the parser reads it (items trimmed, empty ones dropped).
    let list = |v: &str| {
        v.split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .collect::<Vec<_>>()
            .join(",")
    };
    for _ in 0..3000 {
        let n = rng.random_range(0..6);
        let mut ann = Vec::new();
        for _ in 0..n {
            let k = keys[rng.random_range(0..keys.len())].clone();
            let len = rng.random_range(0..5);
            let v: String = (0..len)
                .map(|_| pieces[rng.random_range(0..pieces.len())])
                .collect::<Vec<_>>()
                .join(",");
            ann.push((k, v));
        }
        let refs: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let ports = (0..rng.random_range(0..4))
            .map(|i| {
                port(
                    &format!("p{i}"),
                    80 + i,
                    if i % 2 == 0 { "TCP" } else { "UDP" },
                )
            })
            .collect();
        match resolve(&class(None), &svc(&refs, ports)) {
            Ok(_) => {}
            Err(e) => {
                assert!(!e.0.is_empty() && e.to_string().contains("invalid setting"));
                for err in &e.0 {
                    assert!(!err.allowed.is_empty(), "says what is allowed: {err}");
                    // An annotation error names a key the Service carries, with its value (or
                    // the offending item of a list).
                    if let Some(key) = err.source.strip_prefix("annotation ") {
                        let key = key.split_whitespace().next().unwrap_or(key);
                        assert!(
                            ann.iter().any(|(k, v)| k == key
                                && (*v == err.value
                                    || (!err.value.is_empty()
                                        && list(v).contains(&list(&err.value))))),
                            "{err} names {key:?} = {:?}, which the Service does not carry: {ann:?}",
                            err.value
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn annotation_docs_are_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/annotations.md");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    let generated = annotations::markdown();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &generated).expect("write docs/annotations.md");
        return;
    }
    assert!(
        committed == generated,
        "docs/annotations.md is stale: run `UPDATE_GOLDEN=1 cargo test --lib annotation_docs` or `cloudlb docs annotations > docs/annotations.md`"
    );
}

fn local_class(local: Option<class::LocalClassSpec>) -> LoadBalancerClass {
    let spec = LoadBalancerClassSpec {
        local,
        ..LoadBalancerClassSpec::default_of(ProviderKind::Local)
    };
    LoadBalancerClass::new("lab", spec)
}

/// A local class with all three settings.
fn local_class_with(pool: &str, algorithm: &str, drain_timeout_seconds: u32) -> LoadBalancerClass {
    local_class(Some(class::LocalClassSpec {
        address_pool: Some(pool.into()),
        algorithm: Some(algorithm.into()),
        drain_timeout_seconds: Some(drain_timeout_seconds),
    }))
}

#[test]
fn local_settings_are_typed_with_defaults() {
    let cfg = resolve_ok(&local_class(None), &svc(&[], web()));
    assert_eq!(cfg.local, Some(LocalSpec::default()));
    let spec = cfg.local.expect("local");
    assert_eq!(spec.address_pool.spec(), local::DEFAULT_ADDRESS_POOL);
    assert_eq!(spec.algorithm, Algorithm::Random);
    assert_eq!(spec.drain_timeout_seconds, 30);
    assert_eq!(spec.requested_address, None, "the build adds it");
    assert_eq!(resolve_ok(&class(None), &svc(&[], web())).local, None);
}

#[test]
fn local_pool_takes_what_the_docs_describe() {
    // CIDRs, ranges and single addresses, IPv4 and IPv6, in one list.
    let pool = "192.0.2.10, 192.0.2.20-192.0.2.29, 127.0.1.0/28, fd00:1::/120";
    let c = local_class_with(pool, "round-robin", 0);
    let spec = resolve_ok(&c, &svc(&[], web())).local.expect("local");
    let pool = &spec.address_pool;
    assert_eq!(pool.len(), 1 + 10 + 14 + 255);
    for ip in ["192.0.2.10", "192.0.2.25", "127.0.1.14", "fd00:1::ff"] {
        assert!(pool.contains(ip.parse().expect("ip")), "{ip} in {pool}");
    }
    assert_eq!(spec.algorithm, Algorithm::RoundRobin);
    assert_eq!(spec.drain_timeout_seconds, 0);
}

#[test]
fn local_errors_name_the_class_field_the_value_and_what_is_allowed() {
    let c = local_class_with("127.0.1.0/24, 10.0.0.0/40", "least-conn", 3601);
    let errors = resolve_err(&c, &svc(&[], web()));
    let by_source = |source: &str| {
        errors
            .iter()
            .find(|e| e.source == source)
            .unwrap_or_else(|| panic!("no error for {source}: {errors:?}"))
    };
    let pool = by_source("LoadBalancerClass lab spec.local.addressPool");
    assert_eq!(pool.value, "127.0.1.0/24, 10.0.0.0/40");
    assert!(
        pool.allowed
            .contains("\"10.0.0.0/40\": prefix length over 32")
            && pool.allowed.contains("ranges (127.0.1.10-127.0.1.20)"),
        "{pool}"
    );
    let algorithm = by_source("LoadBalancerClass lab spec.local.algorithm");
    assert_eq!(algorithm.value, "least-conn");
    assert_eq!(algorithm.allowed, "allowed values: random, round-robin");
    let drain = by_source("LoadBalancerClass lab spec.local.drainTimeoutSeconds");
    assert_eq!(drain.value, "3601");
    assert_eq!(drain.allowed, "must be 0-3600 seconds");
    assert_eq!(errors.len(), 3, "{errors:?}");
}

#[test]
fn every_class_field_of_the_settings_table_is_read() {
    let hc = HealthCheckSpec {
        protocol: Some("http".into()),
        port: Some("8080".into()),
        path: Some("/healthz".into()),
        interval_seconds: Some(11),
        timeout_seconds: Some(12),
        healthy_threshold: Some(3),
        unhealthy_threshold: Some(4),
        success_codes: Some("200-299".into()),
    };
    let map = |k: &str| {
        BTreeMap::from([
            (format!("{k}.b"), "1".into()),
            (format!("{k}.a"), "2".into()),
        ])
    };
    let aws = AwsClassSpec {
        scheme: Some("internal".into()),
        ip_address_type: Some("dualstack".into()),
        subnets: Some(vec!["subnet-1".into(), "subnet-2".into()]),
        target_type: Some("ip".into()),
        health_check: Some(hc),
        cross_zone_load_balancing: Some(true),
        deletion_protection: Some(false),
        proxy_protocol: Some(true),
        load_balancer_attributes: Some(map("lb")),
        target_group_attributes: Some(map("tg")),
        additional_tags: Some(map("tag")),
        security_groups: Some(vec!["sg-1".into(), "sg-2".into()]),
        source_ranges: Some(vec!["10.0.0.0/8".into()]),
        manage_backend_security_group_rules: Some(false),
        target_node_labels: Some(map("label")),
        ssl_negotiation_policy: Some("ELBSecurityPolicy-TLS13-1-2-2021-06".into()),
        replacement_grace_period_seconds: Some(600),
    };
    let mut got = class_values("web", &aws);
    got.sort();
    let sources: Vec<(&str, String)> = got.iter().map(|(n, s, _)| (*n, s.clone())).collect();
    let mut want_sources: Vec<(&str, String)> = keys::SETTINGS
        .iter()
        .filter_map(|s| Some((s.name, format!("LoadBalancerClass web {}", s.class_field?))))
        .collect();
    want_sources.sort();
    assert_eq!(sources, want_sources, "one value for each class field");
    let values: Vec<(&str, &str)> = got.iter().map(|(n, _, v)| (*n, v.as_str())).collect();
    assert_eq!(
        values,
        [
            ("additional-resource-tags", "tag.a=2,tag.b=1"),
            ("cross-zone-load-balancing-enabled", "true"),
            ("deletion-protection", "false"),
            ("healthcheck-healthy-threshold", "3"),
            ("healthcheck-interval", "11"),
            ("healthcheck-path", "/healthz"),
            ("healthcheck-port", "8080"),
            ("healthcheck-protocol", "http"),
            ("healthcheck-success-codes", "200-299"),
            ("healthcheck-timeout", "12"),
            ("healthcheck-unhealthy-threshold", "4"),
            ("ip-address-type", "dualstack"),
            ("load-balancer-attributes", "lb.a=2,lb.b=1"),
            ("manage-backend-security-group-rules", "false"),
            ("proxy-protocol", "true"),
            ("replacement-grace-period-seconds", "600"),
            ("scheme", "internal"),
            ("security-groups", "sg-1,sg-2"),
            ("source-ranges", "10.0.0.0/8"),
            (
                "ssl-negotiation-policy",
                "ELBSecurityPolicy-TLS13-1-2-2021-06"
            ),
            ("subnets", "subnet-1,subnet-2"),
            ("target-group-attributes", "tg.a=2,tg.b=1"),
            ("target-node-labels", "label.a=2,label.b=1"),
            ("target-type", "ip"),
        ],
        "in the annotations' form"
    );
    assert!(class_values("web", &AwsClassSpec::default()).is_empty());
}

#[test]
fn each_bad_list_entry_is_named() {
    let all = |annotations: &[(&str, &str)]| -> Vec<String> {
        resolve_err(&class(None), &svc(annotations, web()))
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(
        all(&[
            ("cloudlb.io/scheme", "internet-facing"),
            ("cloudlb.io/subnets", "subnet-1,subnet-2"),
            ("cloudlb.io/eip-allocations", "eipalloc-1,eip-2"),
            ("cloudlb.io/ssl-cert", "arn:aws:acm:x,cert-1,cert-2"),
        ]),
        [
            "annotation cloudlb.io/eip-allocations = \"eipalloc-1,eip-2\": entry 2 (\"eip-2\") is not an allocation id (eipalloc-…)",
            "annotation cloudlb.io/ssl-cert = \"arn:aws:acm:x,cert-1,cert-2\": \"cert-1\" is not a certificate ARN (arn:aws:acm:… or arn:aws:iam:…)",
            "annotation cloudlb.io/ssl-cert = \"arn:aws:acm:x,cert-1,cert-2\": \"cert-2\" is not a certificate ARN (arn:aws:acm:… or arn:aws:iam:…)",
        ]
    );
    assert_eq!(
        all(&[
            ("cloudlb.io/scheme", "internal"),
            ("cloudlb.io/subnets", "subnet-1,subnet-2"),
            ("cloudlb.io/private-ipv4-addresses", "10.0.1.10,10.0.2"),
            ("cloudlb.io/security-groups", "sg-1,group"),
        ]),
        [
            "annotation cloudlb.io/private-ipv4-addresses = \"10.0.1.10,10.0.2\": \"10.0.2\" is not an IPv4 address",
            "annotation cloudlb.io/security-groups = \"sg-1,group\": \"group\" is not a security-group id (sg-…)",
        ]
    );
}

#[test]
fn keys_that_look_like_ours_but_are_not_understood_are_listed() {
    let annotations: BTreeMap<String, String> = [
        "cloudlb.io/scheme",
        "cloudlb.io/shceme",
        "service.beta.kubernetes.io/aws-load-balancer-type",
        "service.beta.kubernetes.io/aws-load-balancer-nlb-target-type",
        "service.beta.kubernetes.io/aws-load-balancer-attributes",
        "service.beta.kubernetes.io/aws-load-balancer-alpn-policy",
        "service.beta.kubernetes.io/aws-load-balancer-connection-idle-timeout",
        "service.beta.kubernetes.io/load-balancer-source-ranges",
        "state.cloudlb.io/installation",
        "example.com/anything",
    ]
    .into_iter()
    .map(|k| (k.to_string(), "x".to_string()))
    .collect();
    assert_eq!(
        annotations::unsupported(annotations.keys()),
        [
            "cloudlb.io/shceme",
            "service.beta.kubernetes.io/aws-load-balancer-connection-idle-timeout",
        ]
    );
}

#[test]
fn ipv6_source_nat_is_on_where_aws_needs_it_and_refused_where_aws_refuses_it() {
    let c = class(None);
    let dual = ("cloudlb.io/ip-address-type", "dualstack");
    let dns = || vec![port("dns", 53, "UDP")];
    // UDP on dualstack: on, auto prefixes.
    let cfg = resolve_ok(&c, &svc(&[dual], dns()));
    assert_eq!(cfg.ipv6_source_nat, Some(SourceNat { prefixes: vec![] }));
    // TCP only, or ipv4: off unless asked.
    assert_eq!(resolve_ok(&c, &svc(&[dual], web())).ipv6_source_nat, None);
    assert_eq!(resolve_ok(&c, &svc(&[], dns())).ipv6_source_nat, None);
    let on = ("cloudlb.io/enable-prefix-for-ipv6-source-nat", "on");
    assert!(
        resolve_ok(&c, &svc(&[dual, on], web()))
            .ipv6_source_nat
            .is_some()
    );
    // Prefixes, one per explicit subnet; `auto` is AWS's auto_assigned.
    let subnets = ("cloudlb.io/subnets", "subnet-a,subnet-b");
    let prefixes = (
        "service.beta.kubernetes.io/aws-load-balancer-source-nat-ipv6-prefixes",
        "auto,2600:1F14:abc:1200::/80",
    );
    let cfg = resolve_ok(&c, &svc(&[dual, subnets, prefixes], dns()));
    assert_eq!(
        cfg.ipv6_source_nat.map(|n| n.prefixes),
        Some(vec![
            "auto_assigned".to_string(),
            "2600:1f14:abc:1200::/80".to_string()
        ])
    );
    // Refused: on without dualstack; off with UDP on dualstack; a prefix count that does not
    // match the subnets.
    first_error_says(&[on], web(), "needs ip-address-type dualstack");
    let off = ("cloudlb.io/enable-prefix-for-ipv6-source-nat", "off");
    first_error_says(&[dual, off], dns(), "AWS refuses UDP listeners");
    let one_subnet = ("cloudlb.io/subnets", "subnet-a");
    first_error_says(
        &[dual, one_subnet, prefixes],
        dns(),
        "exactly one per subnet (1 subnets)",
    );
}

#[test]
fn ipv6_pods_need_a_dualstack_load_balancer() {
    let c = class(None);
    let mut s = svc(&[("cloudlb.io/target-type", "ip")], web());
    if let Some(spec) = s.spec.as_mut() {
        spec.ip_families = Some(vec!["IPv6".into()]);
    }
    let errors = resolve_err(&c, &s);
    assert!(
        errors[0]
            .allowed
            .contains("first IP family (spec.ipFamilies) is IPv6"),
        "{errors:?}"
    );
    s.metadata.annotations = Some(
        [
            ("cloudlb.io/target-type", "ip"),
            ("cloudlb.io/ip-address-type", "dualstack"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    );
    assert_eq!(resolve_ok(&c, &s).ip_address_type, IpAddressType::Dualstack);
    // Node targets stay IPv4 (kube-proxy's nodePorts): no such requirement.
    s.metadata.annotations = None;
    resolve_ok(&c, &s);
}

#[test]
fn every_difference_names_a_setting_and_shows_in_the_docs_table() {
    for (name, note) in annotations::DIFFERENCES {
        assert!(annotations::setting(name).is_some(), "{name}");
        assert!(annotations::markdown().contains(note), "{name}");
    }
    assert_eq!(annotations::difference(annotations::SCHEME), None);
}

#[test]
fn a_named_health_check_port_is_the_nodeport_or_the_pods_port() {
    let c = class(None);
    let mut status = port("status", 9000, "TCP");
    status.target_port = Some(IntOrString::Int(9090));
    let ports = |status: &ServicePort| vec![port("http", 80, "TCP"), status.clone()];
    let hc = ("cloudlb.io/healthcheck-port", "status");
    assert_eq!(
        resolve_ok(&c, &svc(&[hc], ports(&status)))
            .health_check
            .port,
        Some(Some(39000))
    );
    let pods = ("cloudlb.io/target-type", "ip");
    assert_eq!(
        resolve_ok(&c, &svc(&[hc, pods], ports(&status)))
            .health_check
            .port,
        Some(Some(9090))
    );
    // A named targetPort cannot be resolved without the pods: refused, naming the port.
    status.target_port = Some(IntOrString::String("metrics".into()));
    let errs = resolve_err(&c, &svc(&[hc, pods], ports(&status)));
    assert!(
        errs[0].allowed.contains("its targetPort is a name too"),
        "{errs:?}"
    );
    // Not a port of the Service: the allowed values name them.
    first_error_says(
        &[("cloudlb.io/healthcheck-port", "admin")],
        ports(&status),
        "(http, status)",
    );
}

#[test]
fn access_log_keys_turn_access_logs_on_as_the_aws_controllers_read_them() {
    let c = class(None);
    let on = [
        (
            "service.beta.kubernetes.io/aws-load-balancer-access-log-enabled",
            "true",
        ),
        (
            "service.beta.kubernetes.io/aws-load-balancer-access-log-s3-bucket-name",
            "shop-logs",
        ),
        (
            "service.beta.kubernetes.io/aws-load-balancer-access-log-s3-bucket-prefix",
            "nlb/web",
        ),
    ];
    let cfg = resolve_ok(&c, &svc(&on, web()));
    for (k, v) in [
        ("access_logs.s3.enabled", "true"),
        ("access_logs.s3.bucket", "shop-logs"),
        ("access_logs.s3.prefix", "nlb/web"),
    ] {
        assert_eq!(cfg.lb_attributes.get(k).map(String::as_str), Some(v), "{k}");
    }
    // `false` leaves the attributes alone; the bucket is read only when enabled.
    let off = [
        (
            "service.beta.kubernetes.io/aws-load-balancer-access-log-enabled",
            "false",
        ),
        (
            "service.beta.kubernetes.io/aws-load-balancer-access-log-s3-bucket-name",
            "shop-logs",
        ),
    ];
    let cfg = resolve_ok(&c, &svc(&off, web()));
    assert!(cfg.lb_attributes.is_empty(), "{:?}", cfg.lb_attributes);
    // Enabled without a bucket: the attributes' own check names what is missing.
    first_error_says(
        &[(
            "service.beta.kubernetes.io/aws-load-balancer-access-log-enabled",
            "true",
        )],
        web(),
        "access logs need access_logs.s3.bucket",
    );
}

#[test]
fn the_alpn_policy_takes_the_aws_names() {
    let c = class(None);
    let key = "service.beta.kubernetes.io/aws-load-balancer-alpn-policy";
    let cfg = resolve_ok(&c, &svc(&[(key, "http2preferred")], web()));
    assert_eq!(cfg.alpn_policy.as_deref(), Some("HTTP2Preferred"));
    first_error_says(
        &[(key, "h2")],
        web(),
        "allowed values: HTTP1Only, HTTP2Only, HTTP2Optional, HTTP2Preferred, None",
    );
}

#[test]
fn prefix_lists_are_sources_besides_the_ranges_and_replace_the_open_default() {
    let c = class(None);
    let key = "service.beta.kubernetes.io/aws-load-balancer-security-group-prefix-lists";
    // Prefix lists alone: no 0.0.0.0/0 rule, as in aws-load-balancer-controller.
    let cfg = resolve_ok(&c, &svc(&[(key, "pl-0123abcd, pl-4567efgh")], web()));
    assert_eq!(cfg.source_ranges, ["pl-0123abcd", "pl-4567efgh"]);
    // With ranges: both.
    let both = [
        (key, "pl-0123abcd"),
        ("cloudlb.io/source-ranges", "10.0.0.0/8"),
    ];
    let cfg = resolve_ok(&c, &svc(&both, web()));
    assert_eq!(cfg.source_ranges, ["10.0.0.0/8", "pl-0123abcd"]);
    first_error_says(
        &[(key, "sg-1")],
        web(),
        "not a managed prefix-list id (pl-…)",
    );
}

#[test]
fn listener_attributes_name_a_listener_of_the_service() {
    let c = class(None);
    let key = "service.beta.kubernetes.io/aws-load-balancer-listener-attributes.TCP-80";
    let cfg = resolve_ok(&c, &svc(&[(key, "tcp.idle_timeout.seconds=400")], web()));
    assert_eq!(
        cfg.listener_attributes
            .get(&80)
            .and_then(|a| a.get("tcp.idle_timeout.seconds"))
            .map(String::as_str),
        Some("400")
    );
    // A listener the Service does not have: the ones it has are named.
    first_error_says(
        &[(
            "cloudlb.io/listener-attributes.UDP-80",
            "tcp.idle_timeout.seconds=400",
        )],
        web(),
        "\"UDP-80\" is not a listener of this Service; its listeners: TCP-80, TCP-443",
    );
    first_error_says(
        &[(key, "Idle-Timeout=400")],
        web(),
        "not key=value with an attribute key",
    );
    // Not an unknown key.
    let keys = [key.to_string()];
    assert!(annotations::unsupported(keys.iter()).is_empty());
}
