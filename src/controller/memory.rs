//! Everything the operator remembers about each Service between reconciles, in one map keyed by
//! the Service's UID (a Service deleted and made again under the same name starts afresh). Lost
//! on restart: the first reconcile after a start reads the cloud again.

use super::cache::{CacheEntry, Interners};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

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
}

impl ServiceMemory {
    fn is_empty(&self) -> bool {
        self.cloud.is_none()
            && self.failures == 0
            && self.last_invalid.is_none()
            && self.warnings.is_empty()
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
        self.lock()
            .values()
            .filter(|m| m.cloud.as_ref().is_some_and(|c| c.outline().lb.is_some()))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::Memory;

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
}
