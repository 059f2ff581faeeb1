//! A target group at run time: its targets with their health, the balancing algorithm, draining
//! of removed targets, and health-change notifications. The health check (`health.rs`) runs
//! against it through [`Checked`].

use super::health::{self, Checked};
use super::target::{Snapshot, TargetState};
use cloudlb_core::model::{Algorithm, HealthCheck, Protocol, ServiceRef, Target};
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

/// The healthy or registered count of a target group changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthEvent {
    pub service: ServiceRef,
    /// The target group's key in the model (`tcp-80`).
    pub target_group: String,
    pub healthy: usize,
    pub total: usize,
}

/// Which target group a listener forwards to; swapped in place when the listener is modified.
pub(crate) type GroupSlot = Arc<RwLock<Arc<Group>>>;

fn algorithm_to_u8(a: Algorithm) -> u8 {
    match a {
        Algorithm::Random => 0,
        Algorithm::RoundRobin => 1,
    }
}

fn algorithm_from_u8(v: u8) -> Algorithm {
    if v == 1 {
        Algorithm::RoundRobin
    } else {
        Algorithm::Random
    }
}

struct Draining {
    state: Arc<TargetState>,
    timer: AbortHandle,
}

struct HealthTask {
    check: HealthCheck,
    task: AbortHandle,
}

/// What the model said about the group when it was created: reported back as it is (the local
/// provider does not use it; listeners decide the protocol, targets carry their port).
#[derive(Clone, Debug)]
pub(crate) struct Mirror {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// See the module docs.
pub(crate) struct Group {
    pub service: ServiceRef,
    pub key: String,
    mirror: Mutex<Mirror>,
    targets: RwLock<Snapshot>,
    algorithm: AtomicU8,
    rr: AtomicUsize,
    draining: Mutex<HashMap<Target, Draining>>,
    health: Mutex<Option<HealthTask>>,
    last_counts: Mutex<(usize, usize)>,
    events: broadcast::Sender<HealthEvent>,
}

impl Checked for Group {
    fn names(&self) -> (&ServiceRef, &str) {
        (&self.service, &self.key)
    }
    fn targets(&self) -> Snapshot {
        self.snapshot()
    }
    fn health_changed(&self) {
        self.notify_counts();
    }
}

impl Group {
    pub fn new(
        service: ServiceRef,
        key: String,
        mirror: Mirror,
        events: broadcast::Sender<HealthEvent>,
    ) -> Self {
        Group {
            service,
            key,
            mirror: Mutex::new(mirror),
            targets: RwLock::new(Arc::new(Vec::new())),
            algorithm: AtomicU8::new(algorithm_to_u8(Algorithm::default())),
            rr: AtomicUsize::new(0),
            draining: Mutex::new(HashMap::new()),
            health: Mutex::new(None),
            last_counts: Mutex::new((0, 0)),
            events,
        }
    }

    pub fn mirror(&self) -> Mirror {
        lock(&self.mirror).clone()
    }

    pub fn set_mirror(&self, mirror: Mirror) {
        *lock(&self.mirror) = mirror;
    }

    /// The registered targets (not the draining ones).
    pub fn snapshot(&self) -> Snapshot {
        self.targets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn algorithm(&self) -> Algorithm {
        algorithm_from_u8(self.algorithm.load(Ordering::Relaxed))
    }

    pub fn set_algorithm(&self, a: Algorithm) {
        self.algorithm.store(algorithm_to_u8(a), Ordering::Relaxed);
    }

    /// The health check running, if any.
    pub fn health_check(&self) -> Option<HealthCheck> {
        lock(&self.health).as_ref().map(|h| h.check.clone())
    }

    /// Adds `targets` to the registered ones (those already registered stay as they are).
    pub fn register(self: &Arc<Self>, targets: &[(Target, SocketAddr)]) {
        let mut want: Vec<(Target, SocketAddr)> = self
            .snapshot()
            .iter()
            .map(|t| (t.target.clone(), t.addr))
            .collect();
        for (t, addr) in targets {
            if !want.iter().any(|(w, _)| w == t) {
                want.push((t.clone(), *addr));
            }
        }
        // Nothing is removed: the drain time is not used.
        self.set_targets(&want, Duration::ZERO);
    }

    /// Removes `targets` from the registered ones; they drain for `drain`.
    pub fn deregister(self: &Arc<Self>, targets: &[Target], drain: Duration) {
        let want: Vec<(Target, SocketAddr)> = self
            .snapshot()
            .iter()
            .filter(|t| !targets.contains(&t.target))
            .map(|t| (t.target.clone(), t.addr))
            .collect();
        self.set_targets(&want, drain);
    }

    /// Makes `want` the registered set. Targets that stay keep their state and connections; new
    /// ones start healthy (the health check takes them out within interval × threshold if they
    /// are not); removed ones stop getting new connections, and their open connections end after
    /// `drain`. A removed target that comes back while draining is revived as it was.
    fn set_targets(self: &Arc<Self>, want: &[(Target, SocketAddr)], drain: Duration) {
        let old = self.snapshot();
        let mut next = Vec::with_capacity(want.len());
        {
            let mut draining = lock(&self.draining);
            for (target, addr) in want {
                if let Some(t) = old.iter().find(|t| &t.target == target) {
                    next.push(t.clone());
                } else if let Some(d) = draining.remove(target) {
                    d.timer.abort();
                    tracing::info!(service = %self.service, group = %self.key, target = %d.state.addr, "target registered again while draining: kept");
                    next.push(d.state);
                } else {
                    next.push(Arc::new(TargetState::new(target.clone(), *addr)));
                }
            }
            for t in old
                .iter()
                .filter(|t| !want.iter().any(|(w, _)| w == &t.target))
            {
                let timer = self.drain_timer(t.clone(), drain);
                tracing::info!(service = %self.service, group = %self.key, target = %t.addr, active = t.active.load(Ordering::Relaxed), drain_seconds = drain.as_secs(), "target deregistered: draining");
                draining.insert(
                    t.target.clone(),
                    Draining {
                        state: t.clone(),
                        timer,
                    },
                );
            }
        }
        *self.targets.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        self.notify_counts();
    }

    fn drain_timer(self: &Arc<Self>, t: Arc<TargetState>, drain: Duration) -> AbortHandle {
        let weak: Weak<Group> = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(drain).await;
            tracing::info!(target = %t.addr, active = t.active.load(Ordering::Relaxed), "drain time over: closing the target's connections");
            t.kill.cancel();
            if let Some(g) = weak.upgrade() {
                let mut draining = lock(&g.draining);
                if draining
                    .get(&t.target)
                    .is_some_and(|d| Arc::ptr_eq(&d.state, &t))
                {
                    draining.remove(&t.target);
                }
            }
        })
        .abort_handle()
    }

    /// Whether targets are still draining.
    pub fn is_draining(&self) -> bool {
        !lock(&self.draining).is_empty()
    }

    /// Deregisters every target (draining them) and stops health checks: the model no longer has
    /// this group.
    pub fn retire(self: &Arc<Self>, drain: Duration) {
        self.stop_health();
        self.set_targets(&[], drain);
    }

    /// Ends everything at once: health checks, draining, every connection.
    pub fn close(&self) {
        self.stop_health();
        let old =
            std::mem::take(&mut *self.targets.write().unwrap_or_else(PoisonError::into_inner));
        for t in old.iter() {
            t.kill.cancel();
        }
        for (_, d) in lock(&self.draining).drain() {
            d.timer.abort();
            d.state.kill.cancel();
        }
    }

    /// Picks the target for a new connection among the healthy targets (all of them when none is
    /// healthy: fail open), leaving out the indices in `tried`.
    pub fn pick(&self, snap: &[Arc<TargetState>], tried: &[usize]) -> Option<usize> {
        let any_healthy = snap.iter().any(|t| t.is_healthy());
        let eligible =
            |i: usize, t: &TargetState| !tried.contains(&i) && (!any_healthy || t.is_healthy());
        let n = snap
            .iter()
            .enumerate()
            .filter(|(i, t)| eligible(*i, t))
            .count();
        if n == 0 {
            return None;
        }
        let k = match self.algorithm() {
            Algorithm::Random => rand::rng().random_range(0..n),
            Algorithm::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % n,
        };
        snap.iter()
            .enumerate()
            .filter(|(i, t)| eligible(*i, t))
            .nth(k)
            .map(|(i, _)| i)
    }

    /// (healthy, registered).
    pub fn counts(&self) -> (usize, usize) {
        let snap = self.snapshot();
        (snap.iter().filter(|t| t.is_healthy()).count(), snap.len())
    }

    /// Sends a [`HealthEvent`] when the healthy or registered count changed since the last one.
    pub fn notify_counts(&self) {
        let (healthy, total) = self.counts();
        let mut last = lock(&self.last_counts);
        if *last == (healthy, total) {
            return;
        }
        *last = (healthy, total);
        if healthy == 0 && total > 0 {
            tracing::warn!(service = %self.service, group = %self.key, total, "no healthy target: sending to all targets (fail open)");
        } else {
            tracing::info!(service = %self.service, group = %self.key, healthy, total, "healthy targets changed");
        }
        // No receiver is fine.
        let _ = self.events.send(HealthEvent {
            service: self.service.clone(),
            target_group: self.key.clone(),
            healthy,
            total,
        });
    }

    /// Starts (or restarts, when it changed) the health check. Health states are kept.
    pub fn set_health_check(self: &Arc<Self>, check: &HealthCheck) {
        let mut h = lock(&self.health);
        if h.as_ref().is_some_and(|h| &h.check == check) {
            return;
        }
        if let Some(old) = h.take() {
            old.task.abort();
        }
        for t in self.snapshot().iter() {
            t.reset_counts();
        }
        let task = tokio::spawn(health::run(Arc::downgrade(self), check.clone()));
        *h = Some(HealthTask {
            check: check.clone(),
            task: task.abort_handle(),
        });
    }

    fn stop_health(&self) {
        if let Some(h) = lock(&self.health).take() {
            h.task.abort();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.close();
    }
}
