//! Models for the local provider's tests, shared by the plan's unit tests (`src/plan.rs`, through
//! `src/lib.rs`) and the contract tests (`tests/contract.rs`), each including this file with
//! `#[path]`.

use cloudlb_core::model::{
    HealthCheck, HealthCheckProtocol, Listener, LoadBalancer, LocalSpec, Protocol, ServiceRef,
    Target, TargetGroup, TargetType,
};
use std::collections::{BTreeMap, BTreeSet};

/// The Service `shop/<name>`.
pub fn svc(name: &str) -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: format!("uid-{name}"),
    }
}

/// A TCP health check every `interval` seconds (timing out after as long), `threshold` both
/// ways.
pub fn tcp_check(interval: u32, threshold: u32) -> HealthCheck {
    HealthCheck {
        protocol: HealthCheckProtocol::Tcp,
        port: None,
        path: None,
        interval_seconds: interval,
        timeout_seconds: interval,
        healthy_threshold: threshold,
        unhealthy_threshold: threshold,
        success_codes: None,
    }
}

/// A listener on `port` forwarding to the target group `key`.
pub fn listener(port: u16, protocol: Protocol, key: &str) -> Listener {
    Listener {
        port,
        protocol,
        target_group: key.into(),
        certificates: vec![],
        ssl_policy: None,
        alpn_policy: None,
        attributes: BTreeMap::new(),
    }
}

/// A target group of IP targets without attributes or tags.
pub fn target_group(
    key: &str,
    name: String,
    protocol: Protocol,
    port: u16,
    health_check: HealthCheck,
    targets: BTreeSet<Target>,
) -> TargetGroup {
    TargetGroup {
        key: key.into(),
        name,
        protocol,
        port,
        target_type: TargetType::Ip,
        ip_family: Default::default(),
        health_check,
        attributes: BTreeMap::new(),
        targets,
        tags: BTreeMap::new(),
    }
}

/// A load balancer for a local class (see [`LoadBalancer::served_locally`]).
pub fn local_lb(
    name: String,
    listeners: Vec<Listener>,
    target_groups: Vec<TargetGroup>,
    status_ports: Vec<(u16, Protocol)>,
    local: LocalSpec,
) -> LoadBalancer {
    LoadBalancer {
        listeners,
        target_groups,
        status_ports,
        ..LoadBalancer::served_locally(name, local)
    }
}
