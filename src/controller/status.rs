//! `Service.status.loadBalancer`: computed from what exists, written only when it changed.

use crate::model::{LoadBalancer, Protocol};
use crate::provider::Observed;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, PortStatus, Service};

/// The ingress list the Service should show.
pub fn desired_ingress(lb: Option<&LoadBalancer>, observed: &Observed) -> Vec<LoadBalancerIngress> {
    let (Some(lb), Some(have)) = (lb, observed.lb.as_ref()) else {
        return vec![];
    };
    if have.dns_name.is_empty() {
        return vec![];
    }
    let ports = lb
        .status_ports
        .iter()
        .map(|(port, proto)| PortStatus {
            port: i32::from(*port),
            protocol: if *proto == Protocol::Udp {
                "UDP"
            } else {
                "TCP"
            }
            .to_string(),
            error: None,
        })
        .collect();
    // A provider that serves an address (the local one) reports an IP literal.
    let is_ip = have.dns_name.parse::<std::net::IpAddr>().is_ok();
    vec![LoadBalancerIngress {
        hostname: (!is_ip).then(|| have.dns_name.clone()),
        ip: is_ip.then(|| have.dns_name.clone()),
        ports: Some(ports),
        ..Default::default()
    }]
}

/// Whether the Service already shows `want`. Older API servers (< 1.24) drop `ports`; when the
/// stored ingress carries no ports at all, only the addresses are compared, so the status is not
/// rewritten on every resync.
pub fn ingress_matches(svc: &Service, want: &[LoadBalancerIngress]) -> bool {
    let have = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.clone())
        .unwrap_or_default();
    if have.len() != want.len() {
        return false;
    }
    have.iter().zip(want).all(|(h, w)| {
        let ports_dropped = h.ports.as_ref().is_none_or(Vec::is_empty);
        h.hostname == w.hostname && h.ip == w.ip && (ports_dropped || h.ports == w.ports)
    })
}
