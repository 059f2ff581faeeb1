//! The local provider's plan: the desired model against what it serves ([`Observed`] as
//! [`crate::LocalProvider`] reports it), in operations that mean something locally. Pure;
//! table-tested below.
//!
//! | operation | locally |
//! |---|---|
//! | `CreateLoadBalancer` | take an address from the pool (the requested one when free) |
//! | `DeleteLoadBalancer` | close its listeners (and their connections), free the address |
//! | `CreateTargetGroup` | a target group with the model's health check and algorithm |
//! | `ModifyHealthCheck`, `SetAlgorithm` | change them in place (targets keep their health) |
//! | `DeregisterTargets` | no new connections; open ones drain (`drain_timeout_seconds`) |
//! | `RegisterTargets` | new targets start healthy and are probed at once |
//! | `CreateListener` | bind `address:port` (TCP, UDP or both) |
//! | `ModifyListener` | bind/close the protocol that changed, forward to another group |
//! | `DeleteListener` | close the sockets and their connections |
//! | `DeleteTargetGroup` | stop its health check; its targets drain (at once for the empty model) |
//!
//! Nothing else: no security groups (source ranges are not enforced), no attributes, subnets,
//! addresses per subnet, scheme or tags (the model's AWS parts are not looked at). Target groups
//! are matched by key (`tcp-80`), listeners by port. The load balancer is replaced when its
//! address is no longer in the pool; the requested address only matters when one is taken, and
//! the drain time only when targets are removed, so changing either plans nothing.

use cloudlb_core::model::{Desired, LoadBalancer, LocalSpec, Protocol, TargetGroup};
use cloudlb_core::plan::{
    Op, Plan, plan_delete_all, plan_listeners_by_port, plan_targets, plan_unwanted_target_groups,
};
use cloudlb_core::provider::{Observed, ObservedListener, ObservedTargetGroup};
use std::collections::BTreeSet;
use std::net::IpAddr;

/// The operations that make what is served (`observed`) equal to `desired`; `defaults` are the
/// settings of a model without [`LoadBalancer::local`].
pub fn plan(desired: &Desired, observed: &Observed, defaults: &LocalSpec) -> Plan {
    let mut ops = Vec::new();
    match &desired.lb {
        None => plan_delete_all(observed, &mut ops),
        Some(lb) => plan_ensure(
            lb,
            lb.local.as_ref().unwrap_or(defaults),
            observed,
            &mut ops,
        ),
    }
    Plan { ops }
}

fn plan_ensure(lb: &LoadBalancer, spec: &LocalSpec, observed: &Observed, ops: &mut Vec<Op>) {
    // 1. The address.
    let mut listeners: &[ObservedListener] = &observed.listeners;
    match &observed.lb {
        None => ops.push(Op::CreateLoadBalancer),
        Some(have) => {
            let in_pool = have
                .arn
                .parse::<IpAddr>()
                .is_ok_and(|ip| spec.address_pool.contains(ip));
            if !in_pool {
                ops.push(Op::DeleteLoadBalancer {
                    arn: have.arn.clone(),
                    name: have.name.clone(),
                    reason: format!(
                        "address {} is not in the address pool {:?}",
                        have.arn,
                        spec.address_pool.spec()
                    ),
                });
                ops.push(Op::CreateLoadBalancer);
                // Closed with the old address.
                listeners = &[];
            }
        }
    }
    // 2. Target groups, by key.
    for tg in &lb.target_groups {
        plan_target_group(tg, spec, observed_tg(observed, &tg.key), ops);
    }
    // 3. Listeners, by port: delete, create, modify.
    plan_listeners_by_port(&lb.listeners, listeners, ops, |want, have| {
        have.protocol != want.protocol
            || have.target_group_arn.as_deref() != Some(want.target_group.as_str())
    });
    // 4. Target groups no listener forwards to any more.
    plan_unwanted_target_groups(&observed.target_groups, ops, |have| {
        lb.target_groups.iter().any(|t| t.key == have.arn)
    });
}

/// The local provider's id of a target group is its key.
fn observed_tg<'o>(observed: &'o Observed, key: &str) -> Option<&'o ObservedTargetGroup> {
    observed.target_groups.iter().find(|t| t.arn == key)
}

fn plan_target_group(
    tg: &TargetGroup,
    spec: &LocalSpec,
    have: Option<&ObservedTargetGroup>,
    ops: &mut Vec<Op>,
) {
    let key = tg.key.clone();
    let Some(have) = have else {
        ops.push(Op::CreateTargetGroup { key: key.clone() });
        plan_targets(key, &tg.targets, &BTreeSet::new(), ops);
        return;
    };
    if have.health_check != tg.health_check {
        ops.push(Op::ModifyHealthCheck { key: key.clone() });
    }
    if have.algorithm != Some(spec.algorithm) {
        ops.push(Op::SetAlgorithm {
            key: key.clone(),
            algorithm: spec.algorithm,
        });
    }
    plan_targets(key, &tg.targets, &have.targets, ops);
}

/// Whether `op` is one the local provider plans (and so can apply).
pub(crate) fn is_local(op: &Op) -> bool {
    matches!(
        op,
        Op::CreateLoadBalancer
            | Op::DeleteLoadBalancer { .. }
            | Op::CreateTargetGroup { .. }
            | Op::ModifyHealthCheck { .. }
            | Op::SetAlgorithm { .. }
            | Op::DeregisterTargets { .. }
            | Op::RegisterTargets { .. }
            | Op::CreateListener { .. }
            | Op::ModifyListener { .. }
            | Op::DeleteListener { .. }
            | Op::DeleteTargetGroup { .. }
    )
}

/// The sockets a listener of `protocol` needs: (TCP, UDP); `None` when it cannot be served.
pub(crate) fn sockets_for(protocol: Protocol) -> Option<(bool, bool)> {
    match protocol {
        Protocol::Tcp => Some((true, false)),
        Protocol::Udp => Some((false, true)),
        Protocol::TcpUdp => Some((true, true)),
        Protocol::Tls => None,
    }
}

/// The protocol served by these sockets.
pub(crate) fn served_protocol(tcp: bool, udp: bool) -> Option<Protocol> {
    match (tcp, udp) {
        (true, false) => Some(Protocol::Tcp),
        (false, true) => Some(Protocol::Udp),
        (true, true) => Some(Protocol::TcpUdp),
        (false, false) => None,
    }
}

/// The local id of a listener: `127.0.1.5:80/TCP`, `[fd00::5]:53/UDP`.
pub(crate) fn listener_id(address: IpAddr, port: u16, protocol: Protocol) -> String {
    format!(
        "{}/{}",
        std::net::SocketAddr::new(address, port),
        protocol.as_aws()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{listener, local_lb, svc, target_group, tcp_check};
    use cloudlb_core::model::{
        AddressPool, Algorithm, FrontendSecurityGroup, IngressRule, IpAddressType, Scheme, Subnets,
        Target,
    };
    use cloudlb_core::provider::{LbState, ObservedLb};
    use std::collections::{BTreeMap, BTreeSet};

    const ADDRESS: &str = "127.0.1.5";

    fn targets(ips: &[&str], port: u16) -> BTreeSet<Target> {
        ips.iter()
            .map(|ip| Target {
                id: (*ip).to_string(),
                port,
            })
            .collect()
    }

    fn tg(key: &str, port: u16, ips: &[&str]) -> TargetGroup {
        let name = format!("k8s-shop-web-{key}");
        target_group(
            key,
            name,
            Protocol::Tcp,
            port,
            tcp_check(10, 3),
            targets(ips, port),
        )
    }

    /// A model as the build makes it for a local class: TCP 80 and UDP 53, two nodes.
    fn desired() -> Desired {
        let nodes = ["10.0.0.1", "10.0.0.2"];
        let lb = local_lb(
            "k8s-shop-web".into(),
            vec![
                listener(53, Protocol::Udp, "udp-53"),
                listener(80, Protocol::Tcp, "tcp-80"),
            ],
            vec![tg("udp-53", 30053, &nodes), tg("tcp-80", 30080, &nodes)],
            vec![(80, Protocol::Tcp), (53, Protocol::Udp)],
            LocalSpec {
                address_pool: AddressPool::parse("127.0.1.0/28").expect("pool"),
                algorithm: Algorithm::RoundRobin,
                drain_timeout_seconds: 30,
                requested_address: None,
            },
        );
        Desired {
            service: svc("web"),
            lb_name: lb.name.clone(),
            lb: Some(lb),
        }
    }

    fn lb(d: &mut Desired) -> &mut LoadBalancer {
        d.lb.as_mut().expect("lb")
    }

    /// What the local provider reports when it serves `d` exactly, at [`ADDRESS`].
    fn served(d: &Desired) -> Observed {
        let Some(lb) = &d.lb else {
            return Observed::default();
        };
        let address: IpAddr = ADDRESS.parse().expect("ip");
        let algorithm = lb.local.as_ref().map_or(Algorithm::Random, |l| l.algorithm);
        Observed {
            lb: Some(ObservedLb {
                arn: ADDRESS.into(),
                name: lb.name.clone(),
                scheme: lb.scheme,
                ip_address_type: lb.ip_address_type,
                dns_name: ADDRESS.into(),
                state: LbState::Active,
                security_groups: vec![],
                attributes: BTreeMap::new(),
                attributes_unread: false,
                subnets: vec![],
                subnet_zones: BTreeMap::new(),
                ipv6_source_nat: None,
                tags: BTreeMap::new(),
            }),
            listeners: lb
                .listeners
                .iter()
                .map(|l| ObservedListener {
                    arn: listener_id(address, l.port, l.protocol),
                    port: l.port,
                    protocol: l.protocol,
                    target_group_arn: Some(l.target_group.clone()),
                    certificates: vec![],
                    ssl_policy: None,
                    alpn_policy: None,
                    attributes: BTreeMap::new(),
                    tags: BTreeMap::new(),
                })
                .collect(),
            target_groups: lb
                .target_groups
                .iter()
                .map(|t| ObservedTargetGroup {
                    arn: t.key.clone(),
                    name: t.name.clone(),
                    protocol: t.protocol,
                    port: t.port,
                    target_type: t.target_type,
                    health_check: t.health_check.clone(),
                    attributes: BTreeMap::new(),
                    targets: t.targets.clone(),
                    algorithm: Some(algorithm),
                    tags: BTreeMap::new(),
                })
                .collect(),
            security_group: None,
            notes: vec![],
            outside_vpc: vec![],
        }
    }

    fn ops(d: &Desired, o: &Observed) -> Vec<Op> {
        let p = plan(d, o, &LocalSpec::default());
        for op in &p.ops {
            assert!(is_local(op), "not a local operation: {op:?}");
        }
        p.ops
    }

    fn listener_arn(port: u16, protocol: &str) -> String {
        format!("{ADDRESS}:{port}/{protocol}")
    }

    #[test]
    fn from_nothing_everything_is_created_and_nothing_aws_shaped() {
        let d = desired();
        let nodes = |port| targets(&["10.0.0.1", "10.0.0.2"], port);
        assert_eq!(
            ops(&d, &Observed::default()),
            vec![
                Op::CreateLoadBalancer,
                Op::CreateTargetGroup {
                    key: "udp-53".into()
                },
                Op::RegisterTargets {
                    key: "udp-53".into(),
                    targets: nodes(30053).into_iter().collect()
                },
                Op::CreateTargetGroup {
                    key: "tcp-80".into()
                },
                Op::RegisterTargets {
                    key: "tcp-80".into(),
                    targets: nodes(30080).into_iter().collect()
                },
                Op::CreateListener { port: 53 },
                Op::CreateListener { port: 80 },
            ]
        );
        // Even with a frontend security group, AWS attributes and subnets in the model.
        let mut aws_ish = desired();
        let l = lb(&mut aws_ish);
        l.security.frontend = Some(FrontendSecurityGroup {
            name: "sg".into(),
            description: "d".into(),
            ingress: BTreeSet::from([IngressRule {
                protocol: "tcp".into(),
                port: 80,
                cidr: "0.0.0.0/0".into(),
            }]),
        });
        l.attributes
            .insert("deletion_protection.enabled".into(), "true".into());
        l.target_groups[0]
            .attributes
            .insert("proxy_protocol_v2.enabled".into(), "true".into());
        l.subnets = Subnets::Explicit(vec!["subnet-1".into()]);
        l.eip_allocations = vec!["eipalloc-1".into()];
        assert_eq!(
            ops(&aws_ish, &Observed::default()),
            ops(&d, &Observed::default())
        );
    }

    /// `(case, change of the desired model, change of what is served, expected operations)`.
    type Case = (&'static str, fn(&mut Desired), fn(&mut Observed), Vec<Op>);

    fn keep_d(_: &mut Desired) {}
    fn keep_o(_: &mut Observed) {}

    #[test]
    fn table() {
        let tcp_targets = |ips: &[&str]| targets(ips, 30080).into_iter().collect::<Vec<_>>();
        let cases: Vec<Case> = vec![
            ("unchanged", keep_d, keep_o, vec![]),
            (
                "node added: only a registration per group",
                |d| {
                    for tg in &mut lb(d).target_groups {
                        let port = tg.port;
                        tg.targets.insert(Target {
                            id: "10.0.0.3".into(),
                            port,
                        });
                    }
                },
                keep_o,
                vec![
                    Op::RegisterTargets {
                        key: "udp-53".into(),
                        targets: targets(&["10.0.0.3"], 30053).into_iter().collect(),
                    },
                    Op::RegisterTargets {
                        key: "tcp-80".into(),
                        targets: tcp_targets(&["10.0.0.3"]),
                    },
                ],
            ),
            (
                "node replaced: deregister, then register",
                |d| {
                    let tg = &mut lb(d).target_groups[1];
                    tg.targets = targets(&["10.0.0.1", "10.0.0.9"], 30080);
                },
                keep_o,
                vec![
                    Op::DeregisterTargets {
                        key: "tcp-80".into(),
                        targets: tcp_targets(&["10.0.0.2"]),
                    },
                    Op::RegisterTargets {
                        key: "tcp-80".into(),
                        targets: tcp_targets(&["10.0.0.9"]),
                    },
                ],
            ),
            (
                "health check changed",
                |d| lb(d).target_groups[1].health_check.interval_seconds = 5,
                keep_o,
                vec![Op::ModifyHealthCheck {
                    key: "tcp-80".into(),
                }],
            ),
            (
                "algorithm changed: every group",
                |d| {
                    if let Some(l) = lb(d).local.as_mut() {
                        l.algorithm = Algorithm::Random;
                    }
                },
                keep_o,
                vec![
                    Op::SetAlgorithm {
                        key: "udp-53".into(),
                        algorithm: Algorithm::Random,
                    },
                    Op::SetAlgorithm {
                        key: "tcp-80".into(),
                        algorithm: Algorithm::Random,
                    },
                ],
            ),
            (
                "drain time and requested address: nothing to do now",
                |d| {
                    if let Some(l) = lb(d).local.as_mut() {
                        l.drain_timeout_seconds = 1;
                        l.requested_address = Some("127.0.1.9".parse().expect("ip"));
                    }
                },
                keep_o,
                vec![],
            ),
            (
                "the model's AWS parts are not looked at",
                |d| {
                    let l = lb(d);
                    l.scheme = Scheme::Internal;
                    l.ip_address_type = IpAddressType::Dualstack;
                    l.attributes
                        .insert("access_logs.s3.enabled".into(), "true".into());
                    l.tags.insert("team".into(), "a".into());
                    l.security.extra_security_groups = vec!["sg-1".into()];
                    l.target_groups[1].name = "renamed".into();
                    l.target_groups[1].protocol = Protocol::TcpUdp;
                    l.target_groups[1]
                        .attributes
                        .insert("stickiness.enabled".into(), "true".into());
                },
                keep_o,
                vec![],
            ),
            (
                "pool still holds the address",
                |d| {
                    if let Some(l) = lb(d).local.as_mut() {
                        l.address_pool =
                            AddressPool::parse("127.0.1.4-127.0.1.6, fd00::/120").expect("pool");
                    }
                },
                keep_o,
                vec![],
            ),
            (
                "pool no longer holds the address: a new one, listeners again, groups stay",
                |d| {
                    if let Some(l) = lb(d).local.as_mut() {
                        l.address_pool = AddressPool::parse("127.0.2.0/28").expect("pool");
                    }
                },
                keep_o,
                vec![
                    Op::DeleteLoadBalancer {
                        arn: ADDRESS.into(),
                        name: "k8s-shop-web".into(),
                        reason: "address 127.0.1.5 is not in the address pool \"127.0.2.0/28\""
                            .into(),
                    },
                    Op::CreateLoadBalancer,
                    Op::CreateListener { port: 53 },
                    Op::CreateListener { port: 80 },
                ],
            ),
            (
                "port added",
                |d| {
                    let l = lb(d);
                    l.listeners.push(listener(443, Protocol::Tcp, "tcp-443"));
                    l.target_groups.push(tg("tcp-443", 30443, &[]));
                },
                keep_o,
                vec![
                    Op::CreateTargetGroup {
                        key: "tcp-443".into(),
                    },
                    Op::CreateListener { port: 443 },
                ],
            ),
            (
                "port removed: listener, then its group",
                |d| {
                    let l = lb(d);
                    l.listeners.retain(|l| l.port != 53);
                    l.target_groups.retain(|t| t.key != "udp-53");
                },
                keep_o,
                vec![
                    Op::DeleteListener {
                        arn: listener_arn(53, "UDP"),
                        port: 53,
                    },
                    Op::DeleteTargetGroup {
                        arn: "udp-53".into(),
                        name: "k8s-shop-web-udp-53".into(),
                    },
                ],
            ),
            (
                "listener protocol changed",
                |d| lb(d).listeners[1].protocol = Protocol::TcpUdp,
                keep_o,
                vec![Op::ModifyListener {
                    arn: listener_arn(80, "TCP"),
                    port: 80,
                }],
            ),
            (
                "listener forwards to another group, the old one goes",
                |d| {
                    let l = lb(d);
                    l.listeners[1].target_group = "udp-53".into();
                    l.target_groups.retain(|t| t.key != "tcp-80");
                },
                keep_o,
                vec![
                    Op::ModifyListener {
                        arn: listener_arn(80, "TCP"),
                        port: 80,
                    },
                    Op::DeleteTargetGroup {
                        arn: "tcp-80".into(),
                        name: "k8s-shop-web-tcp-80".into(),
                    },
                ],
            ),
            (
                "a listener not served (port in use): created again",
                keep_d,
                |o| o.listeners.retain(|l| l.port != 80),
                vec![Op::CreateListener { port: 80 }],
            ),
            (
                "half of a TCP_UDP listener served: modified",
                |d| lb(d).listeners[1].protocol = Protocol::TcpUdp,
                |o| {
                    // What is served is TCP only (the UDP bind failed).
                    o.listeners[1].protocol = Protocol::Tcp;
                },
                vec![Op::ModifyListener {
                    arn: listener_arn(80, "TCP"),
                    port: 80,
                }],
            ),
            (
                "a target that could not be registered: registered again",
                keep_d,
                |o| {
                    o.target_groups[1].targets = targets(&["10.0.0.1"], 30080);
                },
                vec![Op::RegisterTargets {
                    key: "tcp-80".into(),
                    targets: tcp_targets(&["10.0.0.2"]),
                }],
            ),
            (
                "a group left over: deleted",
                keep_d,
                |o| {
                    let mut extra = o.target_groups[1].clone();
                    extra.arn = "tcp-8080".into();
                    extra.name = "old".into();
                    o.target_groups.push(extra);
                },
                vec![Op::DeleteTargetGroup {
                    arn: "tcp-8080".into(),
                    name: "old".into(),
                }],
            ),
            (
                "empty model: the address and every group go",
                |d| d.lb = None,
                keep_o,
                vec![
                    Op::DeleteLoadBalancer {
                        arn: ADDRESS.into(),
                        name: "k8s-shop-web".into(),
                        reason: "the Service no longer wants a load balancer".into(),
                    },
                    Op::DeleteTargetGroup {
                        arn: "udp-53".into(),
                        name: "k8s-shop-web-udp-53".into(),
                    },
                    Op::DeleteTargetGroup {
                        arn: "tcp-80".into(),
                        name: "k8s-shop-web-tcp-80".into(),
                    },
                ],
            ),
            (
                "empty model, nothing served",
                |d| d.lb = None,
                |o| *o = Observed::default(),
                vec![],
            ),
        ];
        let mut failures = Vec::new();
        for (name, change_d, change_o, want) in cases {
            // What is served is the unchanged model (then changed by `change_o`).
            let mut o = served(&desired());
            change_o(&mut o);
            let mut d = desired();
            change_d(&mut d);
            let got = ops(&d, &o);
            if got != want {
                failures.push(format!("{name}:\n  got  {got:?}\n  want {want:?}"));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn a_model_without_local_settings_gets_the_defaults() {
        let mut d = desired();
        lb(&mut d).local = None;
        let mut o = served(&d);
        // Served as the defaults say: nothing to do.
        assert_eq!(ops(&d, &o), vec![]);
        // An address outside the default pool is replaced.
        if let Some(l) = o.lb.as_mut() {
            l.arn = "127.0.9.9".into();
        }
        let got = ops(&d, &o);
        assert_eq!(got.get(1), Some(&Op::CreateLoadBalancer), "{got:?}");
    }

    #[test]
    fn served_exactly_is_empty_whatever_the_model() {
        let mut d = desired();
        lb(&mut d)
            .listeners
            .push(listener(9000, Protocol::TcpUdp, "tcpudp-9000"));
        lb(&mut d)
            .target_groups
            .push(tg("tcpudp-9000", 30900, &["10.0.0.1"]));
        assert_eq!(ops(&d, &served(&d)), vec![]);
        let empty = Desired::empty(d.service.clone(), d.lb_name.clone());
        assert_eq!(ops(&empty, &served(&empty)), vec![]);
    }
}
