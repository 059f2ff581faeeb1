//! The checkpoint on a Service whose load balancer outlives the operator (AWS):
//! [`CHECKPOINT_ANNOTATION`], written after an apply that made the cloud equal to the desired
//! model (and the status was written). It holds the model's fingerprint and the ids of what
//! cloudlb made: load balancer, listeners, target groups, frontend security group.
//!
//! After a restart, a leader change or an upgrade, a Service whose desired model still hashes to
//! its checkpoint (and whose status still names the checkpoint's load balancer) is trusted without
//! a cloud call until its drift check: [`outline`] gives what the operator remembers instead of a
//! read. It is never trusted for a write (the controller reads the cloud before it changes
//! anything it knows only from a checkpoint), so a hand-edited or stale checkpoint can cost
//! calls, never correctness: anything that does not fit the model exactly is treated as absent.
//!
//! Compact: the ARNs share their `arn:…:<account>:` prefix, listener ARNs extend the load
//! balancer's, and a target group's ARN is its name plus an id, so each is stored once: about
//! 440 bytes for a two-port Service.

use crate::model::Desired;
use crate::model::observed::{AppliedIds, LbState, Observed};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The checkpoint annotation.
pub const CHECKPOINT_ANNOTATION: &str = "state.cloudlb.io/checkpoint";

const VERSION: u32 = 1;

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    v: u32,
    /// The fingerprint of the desired model the cloud was made equal to.
    m: String,
    /// What every ARN starts with: `arn:<partition>:elasticloadbalancing:<region>:<account>:`.
    p: String,
    /// The load balancer's ARN after `<p>loadbalancer/`: `net/<name>/<id>`.
    lb: String,
    dns: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sg: Option<String>,
    /// The load balancer's other security groups (the cluster's backend group, the user's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    g: Vec<String>,
    /// Listener ids by port: the ARN is `<p>listener/<lb>/<id>`.
    l: BTreeMap<u16, String>,
    /// Target-group ids by name: the ARN is `<p>targetgroup/<name>/<id>`.
    tg: BTreeMap<String, String>,
}

/// Why a checkpoint is not used (it is then treated as absent: one full read).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("not a checkpoint of this version: {0}")]
    Malformed(String),
    #[error("the model changed since the checkpoint")]
    ModelChanged,
    #[error("it names resources the model does not have ({0})")]
    Mismatch(&'static str),
}

/// The checkpoint of `observed`, the cloud as made equal to the model that hashes to
/// `fingerprint`; `None` when there is nothing to checkpoint (no load balancer, no address yet)
/// or an id has a form this module does not know (no checkpoint: the next start reads).
pub fn encode(fingerprint: &str, observed: &Observed) -> Option<String> {
    let lb = observed.lb.as_ref()?;
    if lb.dns_name.is_empty() || lb.state != LbState::Active {
        return None;
    }
    let at = lb.arn.find(":loadbalancer/")?;
    let prefix = &lb.arn[..=at];
    let lb_part = &lb.arn[at + ":loadbalancer/".len()..];
    let listener_prefix = format!("{prefix}listener/{lb_part}/");
    let mut listeners = BTreeMap::new();
    for l in &observed.listeners {
        let id = l.arn.strip_prefix(&listener_prefix)?;
        listeners.insert(l.port, id.to_string());
    }
    let mut groups = BTreeMap::new();
    for t in &observed.target_groups {
        let id = t
            .arn
            .strip_prefix(&format!("{prefix}targetgroup/{}/", t.name))?;
        groups.insert(t.name.clone(), id.to_string());
    }
    let sg = observed.security_group.as_ref().map(|g| g.id.clone());
    let others = lb
        .security_groups
        .iter()
        .filter(|g| Some(*g) != sg.as_ref())
        .cloned()
        .collect();
    let wire = Wire {
        v: VERSION,
        m: fingerprint.to_string(),
        p: prefix.to_string(),
        lb: lb_part.to_string(),
        dns: lb.dns_name.clone(),
        sg,
        g: others,
        l: listeners,
        tg: groups,
    };
    serde_json::to_string(&wire).ok()
}

/// What the checkpoint `value` says exists for `desired`: the model as it stands, with the
/// checkpoint's ids and address (targets, attributes and tags as the model has them). Refused
/// unless the checkpoint is of this version, of this very model (`fingerprint`:
/// `desired.fingerprint()`) and names exactly the model's load balancer, listeners, target groups
/// and security group.
pub fn outline(value: &str, desired: &Desired, fingerprint: &str) -> Result<Observed, Unusable> {
    let wire: Wire = serde_json::from_str(value).map_err(|e| Unusable::Malformed(e.to_string()))?;
    if wire.v != VERSION {
        return Err(Unusable::Malformed(format!("version {}", wire.v)));
    }
    if wire.m != fingerprint {
        return Err(Unusable::ModelChanged);
    }
    let lb = desired
        .lb
        .as_ref()
        .ok_or(Unusable::Mismatch("no load balancer is wanted"))?;
    let arn_prefix_ok = wire.p.starts_with("arn:")
        && wire.p.ends_with(':')
        && !wire.p.contains('/')
        && wire.p.matches(':').count() == 5;
    if !arn_prefix_ok || wire.dns.is_empty() {
        return Err(Unusable::Malformed("ARN prefix or address".into()));
    }
    let mut parts = wire.lb.split('/');
    // `net/<name>/<id>` (an emulator may say `app`: the kind is AWS's, not checked here).
    let (Some(kind), Some(name), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Unusable::Malformed("load balancer id".into()));
    };
    if kind.is_empty() || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(Unusable::Malformed("load balancer id".into()));
    }
    if name != desired.lb_name || !plain_id(id) {
        return Err(Unusable::Mismatch("load balancer"));
    }
    let ports: Vec<u16> = lb.listeners.iter().map(|l| l.port).collect();
    if !wire.l.keys().copied().eq(sorted(ports)) || !wire.l.values().all(|id| plain_id(id)) {
        return Err(Unusable::Mismatch("listeners"));
    }
    let names: Vec<&String> = lb.target_groups.iter().map(|t| &t.name).collect();
    if !wire.tg.keys().eq(sorted(names)) || !wire.tg.values().all(|id| plain_id(id)) {
        return Err(Unusable::Mismatch("target groups"));
    }
    let frontend = lb.security.frontend.as_ref();
    match (&wire.sg, frontend) {
        (Some(id), Some(_)) if group_id(id) => {}
        (None, None) => {}
        _ => return Err(Unusable::Mismatch("security group")),
    }
    if !wire.g.iter().all(|id| group_id(id)) {
        return Err(Unusable::Malformed("security group id".into()));
    }
    let p = &wire.p;
    let tg_arn = |name: &str| {
        let id = wire.tg.get(name).map_or("", String::as_str);
        format!("{p}targetgroup/{name}/{id}")
    };
    let listener_arn = |port: u16| {
        let id = wire.l.get(&port).map_or("", String::as_str);
        format!("{p}listener/{}/{id}", wire.lb)
    };
    let ids = AppliedIds {
        lb_arn: format!("{p}loadbalancer/{}", wire.lb),
        dns_name: wire.dns.clone(),
        security_groups: wire.sg.iter().chain(&wire.g).cloned().collect(),
        frontend_group: wire.sg.clone(),
        // Not recorded: the plan moves a load balancer only when its placement is known.
        subnets: Vec::new(),
        ipv6_source_nat: None,
        listener_arn: &listener_arn,
        target_group_arn: &tg_arn,
    };
    Ok(Observed::as_applied(desired, ids))
}

/// Whether `desired` differs from the model that hashes to `fingerprint` only in its targets,
/// taking the targets as `observed` has them (the model a checkpoint, or memory built on one,
/// speaks of): then the change is a (de)registration, nothing else.
pub fn only_targets_differ(desired: &Desired, fingerprint: &str, observed: &Observed) -> bool {
    let mut before = desired.clone();
    let Some(lb) = before.lb.as_mut() else {
        return false;
    };
    for tg in &mut lb.target_groups {
        match observed.target_groups.iter().find(|o| o.name == tg.name) {
            Some(o) => tg.targets = o.targets.clone(),
            None => return false,
        }
    }
    before.fingerprint() == fingerprint
}

/// A security group id: `sg-` and letters and digits.
fn group_id(id: &str) -> bool {
    id.strip_prefix("sg-").is_some_and(plain_id)
}

/// An id as AWS makes them: letters and digits only.
fn plain_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn sorted<T: Ord>(mut v: Vec<T>) -> impl Iterator<Item = T> {
    v.sort();
    v.dedup();
    v.into_iter()
}
