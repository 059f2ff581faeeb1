//! Everything the operator remembers about each Service between reconciles, in one map keyed by
//! the Service's UID (a Service deleted and made again under the same name starts afresh). Lost
//! on restart: the first reconcile after a start reads the cloud again, unless the Service's
//! checkpoint stands in for it (`super::checkpoint`). Also the drift checks' schedule
//! ([`Memory::drift_turn`]).

use super::cache::{CacheEntry, Interners};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// What is remembered about one Service.
#[derive(Default)]
pub struct ServiceMemory {
    /// What exists in the cloud, as last applied or observed.
    pub cloud: Option<CacheEntry>,
    /// Consecutive failed reconciles, for the exponential backoff.
    pub failures: u32,
    /// The last invalid-configuration message (an Event only when it changes).
    pub last_invalid: Option<String>,
    /// The last warning of each reason (nodes not targeted, no ready endpoint), while it holds.
    pub warnings: Vec<(&'static str, String)>,
    /// The turn of its due drift check ([`Memory::drift_turn`]).
    drift_slot: Option<Instant>,
}

impl ServiceMemory {
    fn is_empty(&self) -> bool {
        self.cloud.is_none()
            && self.failures == 0
            && self.last_invalid.is_none()
            && self.warnings.is_empty()
            && self.drift_slot.is_none()
    }

    /// Records `message` ("": none) as the warning of `reason`; true if it differs from the one
    /// recorded.
    pub fn warned(&mut self, reason: &'static str, message: &str) -> bool {
        let at = self.warnings.iter().position(|(r, _)| *r == reason);
        match (at, message.is_empty()) {
            (Some(i), _) if self.warnings[i].1 == message => false,
            (Some(i), true) => {
                self.warnings.remove(i);
                true
            }
            (Some(i), false) => {
                self.warnings[i].1 = message.to_string();
                true
            }
            (None, true) => false,
            (None, false) => {
                self.warnings.push((reason, message.to_string()));
                true
            }
        }
    }
}

/// The per-Service memory of the whole operator, and the interners its cloud entries share.
#[derive(Default)]
pub struct Memory {
    services: Mutex<HashMap<String, ServiceMemory>>,
    /// The last group of turns of the drift checks' schedule: its time, and how many it has.
    drift_group: Mutex<Option<(Instant, usize)>>,
    pub interners: Interners,
}

impl Memory {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, ServiceMemory>> {
        self.services.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the memory of the Service `uid` (empty if there is none); an entry left empty
    /// is dropped, and none is made for nothing (every reconcile passes here: no allocation when
    /// there is nothing to remember).
    pub fn with<R>(&self, uid: &str, f: impl FnOnce(&mut ServiceMemory) -> R) -> R {
        let mut services = self.lock();
        match services.get_mut(uid) {
            Some(entry) => {
                let result = f(entry);
                if entry.is_empty() {
                    services.remove(uid);
                }
                result
            }
            None => {
                let mut entry = ServiceMemory::default();
                let result = f(&mut entry);
                if !entry.is_empty() {
                    services.insert(uid.to_string(), entry);
                }
                result
            }
        }
    }

    /// A copy of what is known about the cloud for `uid`.
    pub fn cloud(&self, uid: &str) -> Option<CacheEntry> {
        self.lock().get(uid).and_then(|m| m.cloud.clone())
    }

    /// Whether anything at all is remembered about `uid`.
    pub fn knows(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    /// Replaces (or with `None` forgets) what is known about the cloud for `uid`.
    pub fn set_cloud(&self, uid: &str, cloud: Option<CacheEntry>) {
        self.with(uid, |m| m.cloud = cloud);
    }

    /// Forgets everything about `uid` (its load balancer is gone).
    pub fn forget(&self, uid: &str) {
        self.lock().remove(uid);
    }

    /// Services with a load balancer.
    pub fn managed_load_balancers(&self) -> usize {
        count_load_balancers(&self.lock())
    }

    /// Whether the due drift check of `uid` may read the cloud at `now` (`None`), or how long
    /// until its turn. The drift checks of all Services are spread evenly over `window` (the
    /// resync interval), handed out in the order they fall due, never saved up (a token bucket
    /// of one), so a start, or many Services falling due together, never sends them in a burst.
    /// Turns come in groups ([`drift_group_size`]): a second's worth of checks at a time, whose
    /// reads by id go out together (one DescribeLoadBalancers for the group, not one each). A
    /// Service keeps its turn until it takes it.
    pub fn drift_turn(&self, uid: &str, now: Instant, window: Duration) -> Option<Duration> {
        let mut services = self.lock();
        let managed = count_load_balancers(&services).max(1);
        let size = drift_group_size(managed, window);
        // Between groups: `window` per `managed` checks, `size` at a time.
        let managed = u32::try_from(managed).unwrap_or(u32::MAX);
        let interval = window * u32::try_from(size).unwrap_or(1) / managed;
        let entry = services.get_mut(uid)?;
        let slot = match entry.drift_slot {
            Some(slot) => slot,
            None => {
                let mut group = self
                    .drift_group
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let (slot, members) = match *group {
                    // A group still to come with room left: join it.
                    Some((at, n)) if at >= now && n < size => (at, n + 1),
                    Some((at, _)) => ((at + interval).max(now), 1),
                    None => (now, 1),
                };
                *group = Some((slot, members));
                entry.drift_slot = Some(slot);
                slot
            }
        };
        if slot <= now {
            entry.drift_slot = None;
            None
        } else {
            Some(slot - now)
        }
    }
}

/// How many drift checks take their turn together: those of one second (`managed` checks
/// spread over `window`), at least 1 and at most 20 (the ids one DescribeLoadBalancers takes).
/// With fewer checks than seconds in the window each goes alone, as evenly spread as before.
pub fn drift_group_size(managed: usize, window: Duration) -> usize {
    let per_second = managed as f64 / window.as_secs_f64().max(1.0);
    (per_second.ceil() as usize).clamp(1, 20)
}

fn count_load_balancers(services: &HashMap<String, ServiceMemory>) -> usize {
    services
        .values()
        .filter(|m| m.cloud.as_ref().is_some_and(|c| c.outline().lb.is_some()))
        .count()
}

#[cfg(test)]
mod tests {
    use super::{Memory, drift_group_size};

    #[test]
    fn an_entry_left_empty_is_dropped_and_one_with_something_is_kept() {
        let memory = Memory::default();
        memory.with("a", |m| m.failures += 1);
        memory.with("b", |m| m.last_invalid = Some("bad".into()));
        assert!(memory.knows("a") && memory.knows("b"));
        memory.with("a", |m| m.failures = 0);
        assert!(!memory.knows("a"));
        memory.with("c", |m| assert_eq!(m.failures, 0));
        assert!(!memory.knows("c"), "reading must not create an entry");
        memory.forget("b");
        assert!(!memory.knows("b"));
    }

    fn with_load_balancer(memory: &Memory, uid: &str) {
        let observed: crate::provider::Observed = serde_json::from_value(serde_json::json!({
            "lb": {"arn": "arn", "name": uid, "scheme": "internal", "ip_address_type": "ipv4",
                   "dns_name": "x", "state": "Active", "security_groups": [], "attributes": {}},
            "listeners": [], "target_groups": [], "security_group": null
        }))
        .expect("an Observed");
        let entry = super::CacheEntry::new(
            "f".into(),
            observed,
            crate::config::class::ProviderKind::Aws,
            std::time::Instant::now(),
            false,
            &memory.interners,
        );
        memory.set_cloud(uid, Some(entry));
    }

    #[test]
    fn drift_checks_due_together_take_turns_spread_over_the_window() {
        use std::time::{Duration, Instant};
        let memory = Memory::default();
        for uid in ["a", "b", "c", "d"] {
            with_load_balancer(&memory, uid);
        }
        let window = Duration::from_secs(40);
        let t0 = Instant::now();
        let secs = |s: u64| Some(Duration::from_secs(s));
        assert_eq!(
            memory.drift_turn("a", t0, window),
            None,
            "the first goes at once"
        );
        assert_eq!(memory.drift_turn("b", t0, window), secs(10));
        assert_eq!(memory.drift_turn("c", t0, window), secs(20));
        assert_eq!(memory.drift_turn("d", t0, window), secs(30));
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            memory.drift_turn("b", t5, window),
            secs(5),
            "b keeps its turn"
        );
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(memory.drift_turn("b", t10, window), None, "b's turn");
        assert_eq!(
            memory.drift_turn("a", t10, window),
            secs(30),
            "due again: after the others"
        );
        // Idle for a while: turns are not saved up.
        let later = t0 + Duration::from_secs(500);
        with_load_balancer(&memory, "e");
        assert_eq!(memory.drift_turn("e", later, window), None);
        assert_eq!(
            memory.drift_turn("c", later, window),
            None,
            "a turn that passed is taken when asked"
        );
        assert_eq!(
            memory.drift_turn("d", later, window),
            None,
            "a turn that passed is taken when asked"
        );
        assert_eq!(memory.drift_turn("b", later, window), secs(8), "40 s / 5");
        assert_eq!(
            memory.drift_turn("unknown", later, window),
            None,
            "nothing remembered: nothing to pace"
        );
    }

    #[test]
    fn many_drift_checks_take_their_turns_a_second_at_a_time() {
        use std::time::{Duration, Instant};
        let memory = Memory::default();
        let uids: Vec<String> = (0..100).map(|i| format!("svc-{i}")).collect();
        for uid in &uids {
            with_load_balancer(&memory, uid);
        }
        // 100 checks in 10 s: groups of 10, one a second.
        let window = Duration::from_secs(10);
        assert_eq!(drift_group_size(100, window), 10);
        let t0 = Instant::now();
        let turns: Vec<Option<Duration>> = uids
            .iter()
            .map(|u| memory.drift_turn(u, t0, window))
            .collect();
        for (i, turn) in turns.iter().enumerate() {
            let group = i / 10;
            let expected = (group > 0).then(|| Duration::from_secs(group as u64));
            assert_eq!(*turn, expected, "check {i} goes with group {group}");
        }
        // Due again a moment later (it took its turn): after the last group, which is full.
        let t1 = t0 + Duration::from_millis(1);
        assert_eq!(
            memory.drift_turn("svc-0", t1, window),
            Some(Duration::from_secs(10) - Duration::from_millis(1)),
            "after the last group, one interval later"
        );
        assert_eq!(drift_group_size(3, window), 1, "fewer checks than seconds");
        assert_eq!(drift_group_size(5000, window), 20, "at most 20 together");
    }
}
