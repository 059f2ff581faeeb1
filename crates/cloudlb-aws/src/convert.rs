//! SDK shapes → our [`Observed`](cloudlb_core::provider::Observed) types. Used by observe and by apply
//! (which builds its result from the create/modify responses), so both agree by construction.

use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::model::{
    HealthCheck, HealthCheckProtocol, IpAddressType, Protocol, Scheme, Target, TargetType, tags,
};
use cloudlb_core::provider::{LbState, ObservedLb, ObservedListener, ObservedTargetGroup};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) fn tag_map_elb(tags: &[elb::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key.clone()?, t.value.clone().unwrap_or_default())))
        .collect()
}

pub(crate) fn elb_tags(tags: &BTreeMap<String, String>) -> Vec<elb::Tag> {
    tags.iter()
        .map(|(k, v)| elb::Tag::builder().key(k).value(v).build())
        .collect()
}

/// Ours: carries our cluster and the Service's UID.
pub(crate) fn is_ours(
    tag_map: &BTreeMap<String, String>,
    cluster: &str,
    service_uid: &str,
) -> bool {
    tag_map.get(tags::CLUSTER).map(String::as_str) == Some(cluster)
        && tag_map.get(tags::SERVICE_UID).map(String::as_str) == Some(service_uid)
}

pub(crate) fn lb_state(state: Option<&elb::LoadBalancerState>) -> LbState {
    match state.and_then(|s| s.code.as_ref()).map(|c| c.as_str()) {
        Some("active") | Some("active_impaired") => LbState::Active,
        Some("failed") => LbState::Failed,
        _ => LbState::Provisioning,
    }
}

pub(crate) fn scheme(s: Option<&elb::LoadBalancerSchemeEnum>) -> Scheme {
    match s.map(|s| s.as_str()) {
        Some("internal") => Scheme::Internal,
        _ => Scheme::InternetFacing,
    }
}

pub(crate) fn ip_address_type(t: Option<&elb::IpAddressType>) -> IpAddressType {
    match t.map(|t| t.as_str()) {
        Some("dualstack") | Some("dualstack-without-public-ipv4") => IpAddressType::Dualstack,
        _ => IpAddressType::Ipv4,
    }
}

/// `attributes`: `None` when they were not read.
pub(crate) fn observed_lb(
    lb: &elb::LoadBalancer,
    attributes: Option<BTreeMap<String, String>>,
) -> Option<ObservedLb> {
    Some(ObservedLb {
        arn: lb.load_balancer_arn.clone()?,
        name: lb.load_balancer_name.clone().unwrap_or_default(),
        scheme: scheme(lb.scheme.as_ref()),
        ip_address_type: ip_address_type(lb.ip_address_type.as_ref()),
        dns_name: lb.dns_name.clone().unwrap_or_default(),
        state: lb_state(lb.state.as_ref()),
        security_groups: lb.security_groups.clone().unwrap_or_default(),
        attributes_unread: attributes.is_none(),
        attributes: attributes.unwrap_or_default(),
        subnets: lb
            .availability_zones()
            .iter()
            .filter_map(|z| z.subnet_id.clone())
            .collect(),
        subnet_zones: subnet_zones(lb.availability_zones()),
        ipv6_source_nat: lb
            .enable_prefix_for_ipv6_source_nat
            .as_ref()
            .map(|e| e.as_str() == "on"),
        tags: BTreeMap::new(),
    })
}

/// Subnet id → zone, of the zones that name both.
pub(crate) fn subnet_zones(zones: &[elb::AvailabilityZone]) -> BTreeMap<String, String> {
    zones
        .iter()
        .filter_map(|z| Some((z.subnet_id.clone()?, z.zone_name.clone()?)))
        .collect()
}

pub(crate) fn lb_attributes(attrs: &[elb::LoadBalancerAttribute]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter_map(|a| Some((a.key.clone()?, a.value.clone().unwrap_or_default())))
        .collect()
}

pub(crate) fn tg_attributes(attrs: &[elb::TargetGroupAttribute]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter_map(|a| Some((a.key.clone()?, a.value.clone().unwrap_or_default())))
        .collect()
}

pub(crate) fn listener_attributes(attrs: &[elb::ListenerAttribute]) -> BTreeMap<String, String> {
    attrs
        .iter()
        .filter_map(|a| Some((a.key.clone()?, a.value.clone().unwrap_or_default())))
        .collect()
}

/// Default certificate first, then the others sorted, without duplicates.
pub(crate) fn canonical_certificates(default: Option<String>, others: Vec<String>) -> Vec<String> {
    let mut rest: Vec<String> = others
        .into_iter()
        .filter(|c| Some(c) != default.as_ref())
        .collect();
    rest.sort();
    rest.dedup();
    default.into_iter().chain(rest).collect()
}

/// The certificates of a desired listener, in the canonical order.
pub(crate) fn desired_certificates(certs: &[String]) -> Vec<String> {
    canonical_certificates(
        certs.first().cloned(),
        certs.iter().skip(1).cloned().collect(),
    )
}

/// `certificates`: all the listener's certificates when known (DescribeListenerCertificates),
/// else those of the listener description (only the default one on AWS).
pub(crate) fn observed_listener(
    l: &elb::Listener,
    certificates: Option<&[elb::Certificate]>,
) -> Option<ObservedListener> {
    let arn = l.listener_arn.clone()?;
    let port = u16::try_from(l.port?).ok()?;
    let protocol = Protocol::from_aws(l.protocol.as_ref()?.as_str())?;
    let target_group_arn = l
        .default_actions
        .iter()
        .flatten()
        .find(|a| a.r#type.as_ref().is_some_and(|t| t.as_str() == "forward"))
        .and_then(|a| {
            a.target_group_arn.clone().or_else(|| {
                a.forward_config
                    .as_ref()
                    .and_then(|f| f.target_groups.as_ref())
                    .and_then(|tgs| tgs.first())
                    .and_then(|t| t.target_group_arn.clone())
            })
        });
    let certs = certificates.unwrap_or(l.certificates.as_deref().unwrap_or_default());
    let default = certs
        .iter()
        .find(|c| c.is_default == Some(true))
        .or_else(|| certs.iter().find(|c| c.is_default.is_none()))
        .and_then(|c| c.certificate_arn.clone());
    let others = certs
        .iter()
        .filter_map(|c| c.certificate_arn.clone())
        .collect();
    Some(ObservedListener {
        arn,
        port,
        protocol,
        target_group_arn,
        certificates: canonical_certificates(default, others),
        ssl_policy: l.ssl_policy.clone().filter(|s| !s.is_empty()),
        alpn_policy: l
            .alpn_policy()
            .first()
            .filter(|p| !p.is_empty() && *p != "None")
            .cloned(),
        attributes: BTreeMap::new(),
        tags: BTreeMap::new(),
    })
}

pub(crate) fn health_check(tg: &elb::TargetGroup) -> HealthCheck {
    let protocol = match tg.health_check_protocol.as_ref().map(|p| p.as_str()) {
        Some("HTTP") => HealthCheckProtocol::Http,
        Some("HTTPS") => HealthCheckProtocol::Https,
        _ => HealthCheckProtocol::Tcp,
    };
    let http = protocol != HealthCheckProtocol::Tcp;
    let count = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    HealthCheck {
        protocol,
        port: tg
            .health_check_port
            .as_deref()
            .filter(|p| *p != "traffic-port")
            .and_then(|p| p.parse().ok()),
        path: tg.health_check_path.clone().filter(|_| http),
        interval_seconds: count(tg.health_check_interval_seconds),
        timeout_seconds: count(tg.health_check_timeout_seconds),
        healthy_threshold: count(tg.healthy_threshold_count),
        unhealthy_threshold: count(tg.unhealthy_threshold_count),
        success_codes: tg
            .matcher
            .as_ref()
            .and_then(|m| m.http_code.clone())
            .filter(|_| http),
    }
}

pub(crate) fn observed_tg(
    tg: &elb::TargetGroup,
    attributes: BTreeMap<String, String>,
    targets: BTreeSet<Target>,
) -> Option<ObservedTargetGroup> {
    let target_type = match tg.target_type.as_ref().map(|t| t.as_str()) {
        Some("ip") => TargetType::Ip,
        Some("instance") | None => TargetType::Instance,
        Some(_) => return None,
    };
    Some(ObservedTargetGroup {
        arn: tg.target_group_arn.clone()?,
        name: tg.target_group_name.clone().unwrap_or_default(),
        protocol: Protocol::from_aws(tg.protocol.as_ref()?.as_str())?,
        port: u16::try_from(tg.port?).ok()?,
        target_type,
        health_check: health_check(tg),
        attributes,
        targets,
        algorithm: None,
        tags: BTreeMap::new(),
    })
}

/// Registered targets: every state but `draining` and `unused`.
pub(crate) fn registered_targets(
    descriptions: &[elb::TargetHealthDescription],
) -> BTreeSet<Target> {
    targets_where(descriptions, |s| !matches!(s, Some("draining" | "unused")))
}

/// The targets AWS reports `healthy`.
pub(crate) fn healthy_targets(descriptions: &[elb::TargetHealthDescription]) -> BTreeSet<Target> {
    targets_where(descriptions, |s| s == Some("healthy"))
}

/// The targets of `descriptions` whose health state (`None`: not reported) passes `keep`.
fn targets_where(
    descriptions: &[elb::TargetHealthDescription],
    keep: impl Fn(Option<&str>) -> bool,
) -> BTreeSet<Target> {
    descriptions
        .iter()
        .filter(|d| {
            let state = d.target_health.as_ref().and_then(|h| h.state.as_ref());
            keep(state.map(|s| s.as_str()))
        })
        .filter_map(|d| {
            let t = d.target.as_ref()?;
            Some(Target {
                id: t.id.clone()?,
                port: u16::try_from(t.port?).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_canonical() {
        assert_eq!(
            canonical_certificates(Some("b".into()), vec!["c".into(), "b".into(), "a".into()]),
            vec!["b", "a", "c"]
        );
        assert_eq!(
            desired_certificates(&["z".into(), "y".into(), "x".into()]),
            vec!["z", "x", "y"]
        );
        assert!(desired_certificates(&[]).is_empty());
    }

    #[test]
    fn health_check_traffic_port_and_tcp_fields() {
        let tg = elb::TargetGroup::builder()
            .health_check_protocol(elb::ProtocolEnum::Tcp)
            .health_check_port("traffic-port")
            .health_check_path("/ignored")
            .health_check_interval_seconds(10)
            .health_check_timeout_seconds(5)
            .healthy_threshold_count(3)
            .unhealthy_threshold_count(3)
            .build();
        let hc = health_check(&tg);
        assert_eq!(hc.protocol, HealthCheckProtocol::Tcp);
        assert_eq!(hc.port, None);
        assert_eq!(hc.path, None);
        assert_eq!(hc.interval_seconds, 10);
        let tg = elb::TargetGroup::builder()
            .health_check_protocol(elb::ProtocolEnum::Http)
            .health_check_port("10256")
            .health_check_path("/healthz")
            .matcher(elb::Matcher::builder().http_code("200-399").build())
            .build();
        let hc = health_check(&tg);
        assert_eq!(hc.port, Some(10256));
        assert_eq!(hc.path.as_deref(), Some("/healthz"));
        assert_eq!(hc.success_codes.as_deref(), Some("200-399"));
    }

    #[test]
    fn draining_and_unused_targets_are_not_registered() {
        let d = |id: &str, state: elb::TargetHealthStateEnum| {
            elb::TargetHealthDescription::builder()
                .target(elb::TargetDescription::builder().id(id).port(30080).build())
                .target_health(elb::TargetHealth::builder().state(state).build())
                .build()
        };
        let got = registered_targets(&[
            d("i-1", elb::TargetHealthStateEnum::Healthy),
            d("i-2", elb::TargetHealthStateEnum::Initial),
            d("i-3", elb::TargetHealthStateEnum::Draining),
            d("i-4", elb::TargetHealthStateEnum::Unused),
            d("i-5", elb::TargetHealthStateEnum::Unhealthy),
        ]);
        let ids: Vec<_> = got.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, vec!["i-1", "i-2", "i-5"]);
    }
}
