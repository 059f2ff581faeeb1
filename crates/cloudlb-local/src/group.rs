//! A target group at run time: its targets with their health, the balancing algorithm, draining
//! of removed targets, and health-change notifications.

use super::HealthEvent;
use super::config::Algorithm;
use super::token::Token;
use cloudlb_core::model::{HealthCheck, ServiceRef, Target};
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

/// One registered (or draining) target.
#[derive(Debug)]
pub(crate) struct TargetState {
    pub target: Target,
    pub addr: SocketAddr,
    healthy: AtomicBool,
    pub(crate) successes: AtomicU32,
    pub(crate) failures: AtomicU32,
    /// Cancelled when the target's connections must end: drain over, Service deleted, shutdown.
    pub kill: Token,
    /// Open TCP connections and UDP flows to this target.
    pub active: AtomicUsize,
}

impl TargetState {
    fn new(target: Target, addr: SocketAddr) -> Self {
        TargetState {
            target,
            addr,
            healthy: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            kill: Token::default(),
            active: AtomicUsize::new(0),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Returns whether the state changed.
    pub(crate) fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Counts an open connection or flow until the guard drops.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self.clone())
    }
}

pub(crate) struct ActiveGuard(Arc<TargetState>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
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

pub(crate) type Snapshot = Arc<Vec<Arc<TargetState>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// See the module docs.
pub(crate) struct Group {
    pub service: ServiceRef,
    pub key: String,
    targets: RwLock<Snapshot>,
    algorithm: AtomicU8,
    rr: AtomicUsize,
    draining: Mutex<HashMap<Target, Draining>>,
    health: Mutex<Option<HealthTask>>,
    last_counts: Mutex<(usize, usize)>,
    events: broadcast::Sender<HealthEvent>,
}

impl Group {
    pub fn new(service: ServiceRef, key: String, events: broadcast::Sender<HealthEvent>) -> Self {
        Group {
            service,
            key,
            targets: RwLock::new(Arc::new(Vec::new())),
            algorithm: AtomicU8::new(Algorithm::Random.as_u8()),
            rr: AtomicUsize::new(0),
            draining: Mutex::new(HashMap::new()),
            health: Mutex::new(None),
            last_counts: Mutex::new((0, 0)),
            events,
        }
    }

    /// The registered targets (not the draining ones).
    pub fn snapshot(&self) -> Snapshot {
        self.targets
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_algorithm(&self, a: Algorithm) {
        self.algorithm.store(a.as_u8(), Ordering::Relaxed);
    }

    /// Makes `want` the registered set. Targets that stay keep their state and connections; new
    /// ones start healthy (the health check takes them out within interval × threshold if they
    /// are not); removed ones stop getting new connections, and their open connections end after
    /// `drain`. A removed target that comes back while draining is revived as it was.
    pub fn set_targets(self: &Arc<Self>, want: &[(Target, SocketAddr)], drain: Duration) {
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
        let k = match Algorithm::from_u8(self.algorithm.load(Ordering::Relaxed)) {
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
            t.successes.store(0, Ordering::Relaxed);
            t.failures.store(0, Ordering::Relaxed);
        }
        let task = tokio::spawn(super::health::run(Arc::downgrade(self), check.clone()));
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
