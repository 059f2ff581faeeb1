//! What the operator remembers about each Service between reconciles, kept small.
//!
//! The bulk of what a provider reports is the target set of each target group: every eligible
//! node, once per target group, for every Service (Services × Nodes entries). Those sets are
//! nearly always the same list of node ids (only the port differs), and target-group attributes
//! are nearly always the defaults, so the cache stores each distinct id list and attribute map
//! once, shared through [`Interner`]s, and rebuilds a full [`Observed`] only when a reconcile
//! needs one (planning a change, cleaning up).

use crate::config::class::ProviderKind;
use crate::model::Target;
use crate::provider::Observed;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Target ids (instance ids or IPs), sorted.
type Ids = Arc<[String]>;
type Attributes = Arc<BTreeMap<String, String>>;

/// Hands out one shared copy of each distinct value. Values nobody else holds any more are
/// dropped when the set has doubled since the last sweep, so it stays proportional to what the
/// cache uses.
pub struct Interner<T: ?Sized> {
    inner: Mutex<InternerState<T>>,
}

struct InternerState<T: ?Sized> {
    values: HashSet<Arc<T>>,
    swept_at: usize,
}

impl<T: ?Sized + Hash + Eq> Default for Interner<T> {
    fn default() -> Self {
        Interner {
            inner: Mutex::new(InternerState {
                values: HashSet::new(),
                swept_at: 0,
            }),
        }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// The shared copy of `value` (made from `make` if there is none yet).
    fn intern(&self, value: &T, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let mut state = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = state.values.get(value) {
            return v.clone();
        }
        if state.values.len() >= 2 * state.swept_at.max(32) {
            state.values.retain(|v| Arc::strong_count(v) > 1);
            state.swept_at = state.values.len();
        }
        let v = make();
        state.values.insert(v.clone());
        v
    }

    /// Distinct values held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The interners every cache entry shares.
#[derive(Default)]
pub struct Interners {
    ids: Interner<[String]>,
    attributes: Interner<BTreeMap<String, String>>,
}

impl Interners {
    fn ids(&self, ids: Vec<String>) -> Ids {
        self.ids.intern(&ids, || Arc::from(ids.clone()))
    }

    fn attributes(&self, attrs: BTreeMap<String, String>) -> Attributes {
        self.attributes.intern(&attrs, || Arc::new(attrs.clone()))
    }

    /// Distinct id lists held.
    pub fn id_lists(&self) -> usize {
        self.ids.len()
    }
}

/// One target group's targets: per port, the shared list of ids.
#[derive(Clone, Debug, Default)]
struct TargetSet(Vec<(u16, Ids)>);

impl TargetSet {
    fn new(targets: &BTreeSet<Target>, interners: &Interners) -> Self {
        let mut by_port: BTreeMap<u16, Vec<String>> = BTreeMap::new();
        for t in targets {
            // BTreeSet order is (id, port): each port's ids come out sorted.
            by_port.entry(t.port).or_default().push(t.id.clone());
        }
        TargetSet(
            by_port
                .into_iter()
                .map(|(port, ids)| (port, interners.ids(ids)))
                .collect(),
        )
    }

    fn expand(&self) -> BTreeSet<Target> {
        self.0
            .iter()
            .flat_map(|(port, ids)| {
                ids.iter().map(|id| Target {
                    id: id.clone(),
                    port: *port,
                })
            })
            .collect()
    }
}

/// What the operator remembers about a Service between reconciles.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    /// Hash of the desired model that was last applied successfully.
    pub fingerprint: String,
    /// What exists, as of the last apply or observe, without target sets and attributes.
    outline: Observed,
    lb_attributes: Option<Attributes>,
    /// Per target group of `outline`, in the same order.
    target_groups: Vec<(Attributes, TargetSet)>,
    /// The tags of every resource of `outline`, in [`tag_maps`] order (a Service's resources
    /// share one map, and Services without user tags share the empty one).
    tags: Vec<Attributes>,
    pub provider: ProviderKind,
    /// When the state was last read from the cloud (drift check).
    pub verified_at: Instant,
    /// The last apply failed: read everything again before planning.
    pub stale: bool,
    /// The load balancer is provisioning: poll its state.
    pub provisioning: bool,
    /// Known only from the Service's checkpoint, not read since this process started: trusted
    /// while the model is unchanged, never planned against (a change reads the cloud first).
    pub unverified: bool,
}

impl CacheEntry {
    pub fn new(
        fingerprint: String,
        mut observed: Observed,
        provider: ProviderKind,
        verified_at: Instant,
        provisioning: bool,
        interners: &Interners,
    ) -> Self {
        let lb_attributes = observed
            .lb
            .as_mut()
            .map(|lb| interners.attributes(std::mem::take(&mut lb.attributes)));
        let target_groups = observed
            .target_groups
            .iter_mut()
            .map(|tg| {
                let targets = TargetSet::new(&std::mem::take(&mut tg.targets), interners);
                let attrs = interners.attributes(std::mem::take(&mut tg.attributes));
                (attrs, targets)
            })
            .collect();
        let tags = tag_maps(&mut observed)
            .map(|t| interners.attributes(std::mem::take(t)))
            .collect();
        CacheEntry {
            fingerprint,
            outline: observed,
            lb_attributes,
            target_groups,
            tags,
            provider,
            verified_at,
            stale: false,
            provisioning,
            unverified: false,
        }
    }

    /// What the reconcile's decision needs to know about this entry, for the model that hashes
    /// to `fingerprint` on provider `provider`.
    pub fn remembered(
        &self,
        fingerprint: &str,
        provider: ProviderKind,
        now: Instant,
    ) -> super::decide::Remembered {
        super::decide::Remembered {
            same_model: self.fingerprint == fingerprint,
            same_provider: self.provider == provider,
            stale: self.stale,
            age: now.saturating_duration_since(self.verified_at),
            provisioning: self.provisioning,
            unverified: self.unverified,
        }
    }

    /// What exists, without target sets and attributes: enough for the status, names and ARNs.
    pub fn outline(&self) -> &Observed {
        &self.outline
    }

    /// Everything the cache knows, as the provider reported it.
    pub fn observed(&self) -> Observed {
        let mut o = self.outline.clone();
        if let (Some(lb), Some(attrs)) = (o.lb.as_mut(), &self.lb_attributes) {
            lb.attributes = (**attrs).clone();
        }
        for (tg, (attrs, targets)) in o.target_groups.iter_mut().zip(&self.target_groups) {
            tg.attributes = (**attrs).clone();
            tg.targets = targets.expand();
        }
        for (t, tags) in tag_maps(&mut o).zip(&self.tags) {
            *t = (**tags).clone();
        }
        o
    }
}

/// The tag maps of `o`'s resources: load balancer, listeners, target groups, security group.
fn tag_maps(o: &mut Observed) -> impl Iterator<Item = &mut BTreeMap<String, String>> {
    o.lb.iter_mut()
        .map(|l| &mut l.tags)
        .chain(o.listeners.iter_mut().map(|l| &mut l.tags))
        .chain(o.target_groups.iter_mut().map(|t| &mut t.tags))
        .chain(o.security_group.iter_mut().map(|g| &mut g.tags))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HealthCheck, Protocol, TargetType};
    use crate::model::{IpAddressType, Scheme};
    use crate::provider::{LbState, ObservedLb, ObservedTargetGroup};

    fn observed(service: usize, nodes: usize) -> Observed {
        let targets = |port: u16| {
            (0..nodes)
                .map(|n| Target {
                    id: format!("i-{n:017x}"),
                    port,
                })
                .collect()
        };
        let tg = |i: u16| ObservedTargetGroup {
            arn: format!("arn:tg/{service}/{i}"),
            name: format!("tg-{service}-{i}"),
            protocol: Protocol::Tcp,
            port: 30000 + i,
            target_type: TargetType::Instance,
            health_check: HealthCheck::TCP_TRAFFIC_PORT,
            algorithm: None,
            attributes: [(
                "deregistration_delay.timeout_seconds".to_string(),
                "300".to_string(),
            )]
            .into(),
            targets: targets(30000 + i + 2 * service as u16),
            tags: [("team".to_string(), "web".to_string())].into(),
        };
        Observed {
            lb: Some(ObservedLb {
                arn: format!("arn:lb/{service}"),
                name: format!("lb-{service}"),
                scheme: Scheme::InternetFacing,
                ip_address_type: IpAddressType::Ipv4,
                dns_name: format!("lb-{service}.example"),
                state: LbState::Active,
                security_groups: vec!["sg-1".into()],
                attributes: [(
                    "load_balancing.cross_zone.enabled".to_string(),
                    "false".to_string(),
                )]
                .into(),
                attributes_unread: false,
                subnets: vec![],
                subnet_zones: BTreeMap::new(),
                ipv6_source_nat: None,
                tags: [("team".to_string(), "web".to_string())].into(),
            }),
            listeners: Vec::new(),
            target_groups: vec![tg(0), tg(1)],
            security_group: None,
            notes: Vec::new(),
            outside_vpc: Vec::new(),
        }
    }

    #[test]
    fn an_entry_gives_back_exactly_what_was_stored() {
        let interners = Interners::default();
        let o = observed(1, 50);
        let e = CacheEntry::new(
            "f".into(),
            o.clone(),
            ProviderKind::Aws,
            Instant::now(),
            false,
            &interners,
        );
        assert_eq!(e.observed(), o);
        assert!(
            e.outline()
                .target_groups
                .iter()
                .all(|t| t.targets.is_empty())
        );
        assert_eq!(e.outline().dns_name(), o.dns_name());
    }

    #[test]
    fn services_over_the_same_nodes_share_one_id_list() {
        let interners = Interners::default();
        let entries: Vec<_> = (0..100)
            .map(|s| {
                CacheEntry::new(
                    "f".into(),
                    observed(s, 200),
                    ProviderKind::Aws,
                    Instant::now(),
                    false,
                    &interners,
                )
            })
            .collect();
        assert_eq!(
            interners.id_lists(),
            1,
            "200 target groups over the same 200 nodes"
        );
        assert_eq!(
            interners.attributes.len(),
            3,
            "the LB's and the TGs' attribute maps, and the tags every resource shares"
        );
        for (s, e) in entries.iter().enumerate() {
            assert_eq!(e.observed(), observed(s, 200));
        }
    }

    #[test]
    fn lists_nobody_uses_any_more_are_dropped() {
        let interners = Interners::default();
        for nodes in 1..=200 {
            // Each entry replaces the previous one (a node added at a time).
            let _e = CacheEntry::new(
                "f".into(),
                observed(0, nodes),
                ProviderKind::Aws,
                Instant::now(),
                false,
                &interners,
            );
        }
        assert!(
            interners.id_lists() <= 64,
            "{} lists kept",
            interners.id_lists()
        );
    }
}
