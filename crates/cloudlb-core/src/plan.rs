//! The operations a provider executes ([`Op`], [`Plan`]), and the AWS NLB planner ([`plan`]):
//! compare the desired model with what exists in AWS and produce the ordered operations that make
//! them equal. Pure: no IO, table-tested and golden-tested (`tests/golden/plan/`).
//!
//! Each provider plans its own resources ([`crate::provider::Provider::plan`]): the AWS provider
//! with [`plan`], the local provider with its own diff, which uses only the operations that mean
//! something to it (no security groups, attributes or subnets).
//!
//! Order: security group first (an NLB only takes security groups at creation), then the load
//! balancer, its attributes, target groups (create, health check, attributes, deregister before
//! register), listeners (delete, modify, create), the user's tags on what stays (in place: keys
//! cloudlb put there and no longer wants removed, the rest set), and last the target groups and
//! security group nothing references any more. Immutable changes (scheme; target-group protocol/port/target
//! type, which are part of the target-group name) replace the resource.

use crate::model::observed::{Observed, ObservedLb, ObservedListener, ObservedTargetGroup};
use crate::model::{
    Algorithm, Desired, IngressRule, Listener, LoadBalancer, Target, TargetGroup, tags,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Op {
    /// Create the frontend security group of the desired model.
    CreateSecurityGroup,
    AuthorizeIngress {
        rules: Vec<IngressRule>,
    },
    RevokeIngress {
        rules: Vec<IngressRule>,
    },
    DeleteLoadBalancer {
        arn: String,
        name: String,
        reason: String,
    },
    /// Create the load balancer of the desired model.
    CreateLoadBalancer,
    SetIpAddressType,
    /// Place the existing load balancer in exactly `subnets` (zones added or removed in place),
    /// with the EIP allocations, private addresses and source-NAT prefixes the model gives per
    /// subnet.
    SetSubnets {
        subnets: Vec<String>,
    },
    /// Turn IPv6 source NAT on or off as the desired model says (in the subnets the load
    /// balancer is in).
    SetIpv6SourceNat,
    /// Attach exactly the desired security groups (ours, resolved at apply time, and the user's).
    SetSecurityGroups,
    SetLoadBalancerAttributes {
        attributes: BTreeMap<String, String>,
    },
    CreateTargetGroup {
        key: String,
    },
    ModifyHealthCheck {
        key: String,
    },
    /// Local provider only: the target group `key` balances with `algorithm` from now on.
    SetAlgorithm {
        key: String,
        algorithm: Algorithm,
    },
    SetTargetGroupAttributes {
        key: String,
        attributes: BTreeMap<String, String>,
    },
    DeregisterTargets {
        key: String,
        targets: Vec<Target>,
    },
    RegisterTargets {
        key: String,
        targets: Vec<Target>,
    },
    DeleteListener {
        arn: String,
        port: u16,
    },
    ModifyListener {
        arn: String,
        port: u16,
    },
    CreateListener {
        port: u16,
    },
    /// Set the listener on `port`'s `attributes` (those that differ, or all on a new listener).
    SetListenerAttributes {
        port: u16,
        attributes: BTreeMap<String, String>,
    },
    DeleteTargetGroup {
        arn: String,
        name: String,
    },
    DeleteSecurityGroup {
        id: String,
    },
    /// Remove the tag `keys` from existing `resources` (only keys cloudlb put there, see
    /// [`LoadBalancer::applied_tag_keys`]); before [`Op::AddTags`].
    RemoveTags {
        resources: Vec<Tagged>,
        keys: Vec<String>,
    },
    /// Set `tags` on existing `resources` (new values or new keys).
    AddTags {
        resources: Vec<Tagged>,
        tags: BTreeMap<String, String>,
    },
}

/// A resource of the Service's load balancer whose tags an [`Op::AddTags`] or
/// [`Op::RemoveTags`] changes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Tagged {
    LoadBalancer,
    Listener { port: u16 },
    TargetGroup { key: String },
    SecurityGroup,
}

impl Op {
    /// Writes that only (de)register targets: what a node change should produce.
    pub fn is_target_change(&self) -> bool {
        matches!(
            self,
            Op::RegisterTargets { .. } | Op::DeregisterTargets { .. }
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub ops: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether it only (de)registers targets (true for the empty plan).
    pub fn changes_only_targets(&self) -> bool {
        self.ops.iter().all(Op::is_target_change)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "load balancer {name} has deletion protection enabled, so it was not deleted; set deletion_protection.enabled=false (annotation load-balancer-attributes) and delete again, or delete it by hand"
    )]
    DeletionProtected { name: String },
    #[error(
        "load balancer {name} must be replaced ({reason}) but has deletion protection enabled, so nothing was changed; set deletion_protection.enabled=false (annotation load-balancer-attributes) to let cloudlb replace it, or undo the change"
    )]
    ReplaceProtected { name: String, reason: String },
}

const DELETION_PROTECTION: &str = "deletion_protection.enabled";

/// Attribute values a freshly created load balancer has.
pub fn lb_attribute_default(key: &str) -> Option<&'static str> {
    Some(match key {
        DELETION_PROTECTION => "false",
        "load_balancing.cross_zone.enabled" => "false",
        "access_logs.s3.enabled" => "false",
        "access_logs.s3.bucket" | "access_logs.s3.prefix" => "",
        "dns_record.client_routing_policy" => "any_availability_zone",
        _ => return None,
    })
}

/// Attribute values a freshly created target group has.
pub fn tg_attribute_default(key: &str, tg: &TargetGroup) -> Option<&'static str> {
    use crate::model::{Protocol, TargetType};
    Some(match key {
        "deregistration_delay.timeout_seconds" => "300",
        "deregistration_delay.connection_termination.enabled" => "false",
        "proxy_protocol_v2.enabled" => "false",
        "stickiness.enabled" => "false",
        "stickiness.type" => "source_ip",
        "load_balancing.cross_zone.enabled" => "use_load_balancer_configuration",
        "preserve_client_ip.enabled" => {
            let udp = matches!(tg.protocol, Protocol::Udp | Protocol::TcpUdp);
            if tg.target_type == TargetType::Instance || udp {
                "true"
            } else {
                "false"
            }
        }
        _ => return None,
    })
}

fn changed_attributes<'c>(
    desired: &BTreeMap<String, String>,
    current: impl Fn(&str) -> Option<&'c str>,
) -> BTreeMap<String, String> {
    desired
        .iter()
        .filter(|(k, v)| current(k) != Some(v.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The AWS NLB planner: the operations that turn `observed` (what exists in AWS) into `desired`.
pub fn plan(desired: &Desired, observed: &Observed) -> Result<Plan, PlanError> {
    plan_with(desired, observed, Known::default())
}

/// What the provider knows beside the observed state when it plans.
#[derive(Clone, Copy, Debug, Default)]
pub struct Known<'a> {
    /// The id of the cluster's backend security group (`None`: not known yet, so not attached
    /// to anything as far as this plan can tell).
    pub backend: Option<&'a str>,
    /// The subnet ids the model's placement resolves to now, in order (`None`: not resolved,
    /// so no subnet change is planned).
    pub subnets: Option<&'a [String]>,
}

/// [`plan`], knowing the id of the cluster's backend security group.
pub fn plan_with_backend(
    desired: &Desired,
    observed: &Observed,
    backend: Option<&str>,
) -> Result<Plan, PlanError> {
    plan_with(
        desired,
        observed,
        Known {
            backend,
            subnets: None,
        },
    )
}

/// [`plan`], with what the provider `known`s.
pub fn plan_with(desired: &Desired, observed: &Observed, known: Known) -> Result<Plan, PlanError> {
    let mut ops = Vec::new();
    match &desired.lb {
        None => plan_delete(observed, &mut ops)?,
        Some(lb) => plan_ensure(lb, observed, known, &mut ops)?,
    }
    Ok(Plan { ops })
}

fn plan_delete(observed: &Observed, ops: &mut Vec<Op>) -> Result<(), PlanError> {
    if let Some(lb) = &observed.lb
        && protected(lb)
    {
        return Err(PlanError::DeletionProtected {
            name: lb.name.clone(),
        });
    }
    plan_delete_all(observed, ops);
    if let Some(sg) = &observed.security_group {
        ops.push(Op::DeleteSecurityGroup { id: sg.id.clone() });
    }
    Ok(())
}

fn protected(lb: &ObservedLb) -> bool {
    lb.attributes.get(DELETION_PROTECTION).map(String::as_str) == Some("true")
}

fn plan_ensure(
    lb: &LoadBalancer,
    observed: &Observed,
    known: Known,
    ops: &mut Vec<Op>,
) -> Result<(), PlanError> {
    // A replacement deletes the load balancer: refused before any write when it is protected.
    if let Some(have) = &observed.lb
        && have.scheme != lb.scheme
        && protected(have)
    {
        return Err(PlanError::ReplaceProtected {
            name: have.name.clone(),
            reason: replace_reason(have, lb),
        });
    }
    plan_security_group(lb, observed, ops);
    let existing = plan_load_balancer(lb, observed, known, ops);
    plan_lb_attributes(lb, existing, ops);
    // Target groups are matched by name, which embeds the immutable fields.
    for tg in &lb.target_groups {
        plan_target_group(tg, observed_tg(observed, &tg.name), ops);
    }
    // Observed listeners are gone when the load balancer is replaced.
    let observed_listeners: &[ObservedListener] = if existing.is_some() {
        &observed.listeners
    } else {
        &[]
    };
    plan_listeners(lb, observed, observed_listeners, ops);
    plan_tags(lb, observed, existing, ops);
    plan_cleanup(lb, observed, ops);
    Ok(())
}

fn observed_tg<'o>(observed: &'o Observed, name: &str) -> Option<&'o ObservedTargetGroup> {
    observed.target_groups.iter().find(|t| t.name == name)
}

/// 1. The frontend security group: created with its rules, or its rules brought in line
///    (authorize before revoke, so no allowed source is cut off in between).
fn plan_security_group(lb: &LoadBalancer, observed: &Observed, ops: &mut Vec<Op>) {
    match (&lb.security.frontend, &observed.security_group) {
        (Some(_), None) => {
            ops.push(Op::CreateSecurityGroup);
            let rules: Vec<_> = lb
                .security
                .frontend
                .iter()
                .flat_map(|f| f.ingress.iter().cloned())
                .collect();
            if !rules.is_empty() {
                ops.push(Op::AuthorizeIngress { rules });
            }
        }
        (Some(want), Some(have)) => {
            let revoke: Vec<_> = have.ingress.difference(&want.ingress).cloned().collect();
            let add: Vec<_> = want.ingress.difference(&have.ingress).cloned().collect();
            if !add.is_empty() {
                ops.push(Op::AuthorizeIngress { rules: add });
            }
            if !revoke.is_empty() {
                ops.push(Op::RevokeIngress { rules: revoke });
            }
        }
        (None, _) => {}
    }
}

/// 2. The load balancer itself: replaced when its scheme changes, else created or brought in
///    line. Returns the one that stays (`None`: it is created by this plan).
fn plan_load_balancer<'o>(
    lb: &LoadBalancer,
    observed: &'o Observed,
    known: Known,
    ops: &mut Vec<Op>,
) -> Option<&'o ObservedLb> {
    let mut existing = observed.lb.as_ref();
    if let Some(have) = existing
        && have.scheme != lb.scheme
    {
        ops.push(Op::DeleteLoadBalancer {
            arn: have.arn.clone(),
            name: have.name.clone(),
            reason: replace_reason(have, lb),
        });
        existing = None;
    }
    match existing {
        None => ops.push(Op::CreateLoadBalancer),
        Some(have) => {
            // Source NAT needs dualstack: turned off before the type goes back to ipv4, on
            // after it becomes dualstack. A cloud that does not report it is taken at its word.
            let want_nat = lb.ipv6_source_nat.is_some();
            let nat_differs = have.ipv6_source_nat.is_some_and(|on| on != want_nat);
            if nat_differs && !want_nat {
                ops.push(Op::SetIpv6SourceNat);
            }
            if have.ip_address_type != lb.ip_address_type {
                ops.push(Op::SetIpAddressType);
            }
            // Zones added or removed in place; the source-NAT prefixes go with the subnets.
            let moved = known
                .subnets
                .filter(|want| subnets_differ(want, &have.subnets));
            if let Some(want) = moved {
                ops.push(Op::SetSubnets {
                    subnets: want.to_vec(),
                });
            } else if nat_differs && want_nat {
                ops.push(Op::SetIpv6SourceNat);
            }
            if security_groups_differ(lb, have, observed, known.backend) {
                ops.push(Op::SetSecurityGroups);
            }
        }
    }
    existing
}

/// Whether the load balancer is not in exactly the `want`ed subnets (a cloud that reports no
/// subnets is taken at its word, and nothing is ever set to no subnet).
fn subnets_differ(want: &[String], have: &[String]) -> bool {
    let want: BTreeSet<&String> = want.iter().collect();
    let have: BTreeSet<&String> = have.iter().collect();
    !want.is_empty() && !have.is_empty() && want != have
}

fn replace_reason(have: &ObservedLb, lb: &LoadBalancer) -> String {
    format!(
        "scheme changes from {} to {} (immutable)",
        have.scheme.as_aws(),
        lb.scheme.as_aws()
    )
}

/// Whether the attached security groups are not exactly ours (if we want one), the cluster's
/// backend group (if wanted) and the user's.
fn security_groups_differ(
    lb: &LoadBalancer,
    have: &ObservedLb,
    observed: &Observed,
    backend: Option<&str>,
) -> bool {
    let want_ours = lb.security.frontend.is_some();
    let ours_attached = observed
        .security_group
        .as_ref()
        .is_some_and(|sg| have.security_groups.contains(&sg.id));
    let want_backend = lb.security.backend.is_some();
    let backend_attached = backend.is_some_and(|id| have.security_groups.iter().any(|g| g == id));
    if want_backend != backend_attached {
        return true;
    }
    let extra_attached: Vec<_> = have
        .security_groups
        .iter()
        .filter(|id| {
            observed
                .security_group
                .as_ref()
                .is_none_or(|sg| &sg.id != *id)
                && backend != Some(id.as_str())
        })
        .collect();
    let mut want_extra: Vec<_> = lb.security.extra_security_groups.iter().collect();
    want_extra.sort();
    let mut extra_sorted = extra_attached.clone();
    extra_sorted.sort();
    want_ours != ours_attached || want_extra != extra_sorted
}

/// 3. The load balancer's attributes that differ from what it has (a new one has the defaults).
fn plan_lb_attributes(lb: &LoadBalancer, existing: Option<&ObservedLb>, ops: &mut Vec<Op>) {
    let lb_attrs = match existing {
        None => changed_attributes(&lb.attributes, lb_attribute_default),
        Some(have) => changed_attributes(&lb.attributes, |k| {
            // An attribute the cloud does not report is at its default.
            have.attributes
                .get(k)
                .map(String::as_str)
                .or_else(|| lb_attribute_default(k))
        }),
    };
    if !lb_attrs.is_empty() {
        ops.push(Op::SetLoadBalancerAttributes {
            attributes: lb_attrs,
        });
    }
}

/// 5. Listeners, matched by port: delete those no port wants, create the missing ones, modify
///    those that differ.
fn plan_listeners(
    lb: &LoadBalancer,
    observed: &Observed,
    observed_listeners: &[ObservedListener],
    ops: &mut Vec<Op>,
) {
    plan_listeners_by_port(&lb.listeners, observed_listeners, ops, |want, have| {
        listener_differs(lb, want, have, observed)
    });
    // Attributes the user set: those that differ, or all of them on a new listener.
    for want in lb.listeners.iter().filter(|l| !l.attributes.is_empty()) {
        let have = observed_listeners.iter().find(|l| l.port == want.port);
        let attributes = match have {
            Some(h) => changed_attributes(&want.attributes, |k| {
                h.attributes.get(k).map(String::as_str)
            }),
            None => want.attributes.clone(),
        };
        if !attributes.is_empty() {
            ops.push(Op::SetListenerAttributes {
                port: want.port,
                attributes,
            });
        }
    }
}

fn listener_differs(
    lb: &LoadBalancer,
    want: &Listener,
    have: &ObservedListener,
    observed: &Observed,
) -> bool {
    let tg_arn = lb
        .target_groups
        .iter()
        .find(|t| t.key == want.target_group)
        .and_then(|t| observed_tg(observed, &t.name))
        .map(|t| &t.arn);
    let mut want_certs = want.certificates.clone();
    want_certs.sort();
    let mut have_certs = have.certificates.clone();
    have_certs.sort();
    have.protocol != want.protocol
        || tg_arn.is_none()
        || have.target_group_arn.as_ref() != tg_arn
        || want_certs != have_certs
        || (want.ssl_policy.is_some() && have.ssl_policy != want.ssl_policy)
        || want
            .alpn_policy
            .as_deref()
            .is_some_and(|p| have.alpn_policy.as_deref().unwrap_or("None") != p)
}

/// 5b. The user's tags on what exists and stays (what this plan creates gets them at creation):
///    keys cloudlb put there and no longer wants are removed, wanted keys with another value or
///    none are set. Resources that need the same change share one operation (AWS takes up to
///    20 resources per call), removals first.
type Tags = BTreeMap<String, String>;

fn plan_tags(
    lb: &LoadBalancer,
    observed: &Observed,
    existing: Option<&ObservedLb>,
    ops: &mut Vec<Op>,
) {
    let want = tags::user_tags(&lb.tags);
    // (resource, the tags it has, the user tags it should have)
    let mut have: Vec<(Tagged, &Tags, Tags)> = Vec::new();
    if let Some(l) = existing {
        have.push((Tagged::LoadBalancer, &l.tags, want.clone()));
        for h in &observed.listeners {
            if lb.listeners.iter().any(|w| w.port == h.port) {
                have.push((Tagged::Listener { port: h.port }, &h.tags, want.clone()));
            }
        }
    }
    for tg in &lb.target_groups {
        if let Some(h) = observed_tg(observed, &tg.name) {
            let key = tg.key.clone();
            have.push((
                Tagged::TargetGroup { key },
                &h.tags,
                tags::user_tags(&tg.tags),
            ));
        }
    }
    if let (Some(f), Some(sg)) = (&lb.security.frontend, &observed.security_group) {
        let want = tags::user_tags(&lb.security_group_tags(f));
        have.push((Tagged::SecurityGroup, &sg.tags, want));
    }
    let mut removals: BTreeMap<Vec<String>, Vec<Tagged>> = BTreeMap::new();
    let mut additions: BTreeMap<Tags, Vec<Tagged>> = BTreeMap::new();
    for (resource, have, want) in have {
        let gone: Vec<String> = have
            .keys()
            .filter(|k| !want.contains_key(*k) && lb.applied_tag_keys.contains(*k))
            .cloned()
            .collect();
        let add: Tags = want
            .into_iter()
            .filter(|(k, v)| have.get(k) != Some(v))
            .collect();
        if !gone.is_empty() {
            removals.entry(gone).or_default().push(resource.clone());
        }
        if !add.is_empty() {
            additions.entry(add).or_default().push(resource);
        }
    }
    for (keys, resources) in removals {
        ops.push(Op::RemoveTags { resources, keys });
    }
    for (tags, resources) in additions {
        ops.push(Op::AddTags { resources, tags });
    }
}

/// 6. Target groups no longer wanted, now that no listener forwards to them; then our security
///    group, when the user switched to their own.
fn plan_cleanup(lb: &LoadBalancer, observed: &Observed, ops: &mut Vec<Op>) {
    plan_unwanted_target_groups(&observed.target_groups, ops, |have| {
        lb.target_groups.iter().any(|t| t.name == have.name)
    });
    if lb.security.frontend.is_none()
        && let Some(sg) = &observed.security_group
    {
        ops.push(Op::DeleteSecurityGroup { id: sg.id.clone() });
    }
}

/// 4. One target group: created with its attributes and targets, or its health check,
///    attributes and targets brought in line (deregister before register).
fn plan_target_group(tg: &TargetGroup, have: Option<&ObservedTargetGroup>, ops: &mut Vec<Op>) {
    let key = tg.key.clone();
    match have {
        None => {
            ops.push(Op::CreateTargetGroup { key: key.clone() });
            let attrs = changed_attributes(&tg.attributes, |k| tg_attribute_default(k, tg));
            if !attrs.is_empty() {
                ops.push(Op::SetTargetGroupAttributes {
                    key: key.clone(),
                    attributes: attrs,
                });
            }
            plan_targets(key, &tg.targets, &BTreeSet::new(), ops);
        }
        Some(have) => {
            if have.health_check != tg.health_check {
                ops.push(Op::ModifyHealthCheck { key: key.clone() });
            }
            let attrs = changed_attributes(&tg.attributes, |k| {
                have.attributes
                    .get(k)
                    .map(String::as_str)
                    .or_else(|| tg_attribute_default(k, tg))
            });
            if !attrs.is_empty() {
                ops.push(Op::SetTargetGroupAttributes {
                    key: key.clone(),
                    attributes: attrs,
                });
            }
            plan_targets(key, &tg.targets, &have.targets, ops);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Steps every provider's planner takes the same way.

/// Everything observed goes, for the empty model: the load balancer, then every target group.
pub fn plan_delete_all(observed: &Observed, ops: &mut Vec<Op>) {
    if let Some(lb) = &observed.lb {
        ops.push(Op::DeleteLoadBalancer {
            arn: lb.arn.clone(),
            name: lb.name.clone(),
            reason: "the Service no longer wants a load balancer".into(),
        });
    }
    plan_unwanted_target_groups(&observed.target_groups, ops, |_| false);
}

/// Listeners, matched by port: delete those no port wants, then create the missing ones and
/// modify those that `differs` from what is wanted.
pub fn plan_listeners_by_port(
    want: &[Listener],
    have: &[ObservedListener],
    ops: &mut Vec<Op>,
    differs: impl Fn(&Listener, &ObservedListener) -> bool,
) {
    for h in have {
        if !want.iter().any(|l| l.port == h.port) {
            ops.push(Op::DeleteListener {
                arn: h.arn.clone(),
                port: h.port,
            });
        }
    }
    for w in want {
        match have.iter().find(|l| l.port == w.port) {
            None => ops.push(Op::CreateListener { port: w.port }),
            Some(h) if differs(w, h) => ops.push(Op::ModifyListener {
                arn: h.arn.clone(),
                port: w.port,
            }),
            Some(_) => {}
        }
    }
}

/// Deletes the observed target groups that `wanted` does not keep.
pub fn plan_unwanted_target_groups(
    observed: &[ObservedTargetGroup],
    ops: &mut Vec<Op>,
    wanted: impl Fn(&ObservedTargetGroup) -> bool,
) {
    for have in observed {
        if !wanted(have) {
            ops.push(Op::DeleteTargetGroup {
                arn: have.arn.clone(),
                name: have.name.clone(),
            });
        }
    }
}

/// The targets of group `key` brought from `have` to `want`: deregister before register.
pub fn plan_targets(
    key: String,
    want: &BTreeSet<Target>,
    have: &BTreeSet<Target>,
    ops: &mut Vec<Op>,
) {
    let gone: Vec<_> = have.difference(want).cloned().collect();
    let new: Vec<_> = want.difference(have).cloned().collect();
    if !gone.is_empty() {
        ops.push(Op::DeregisterTargets {
            key: key.clone(),
            targets: gone,
        });
    }
    if !new.is_empty() {
        ops.push(Op::RegisterTargets { key, targets: new });
    }
}

#[cfg(test)]
mod tests;
