//! One registered (or draining) target at run time: its address, health, open connections, and
//! the token that ends them. Shared by the target group (`group.rs`), the health checks
//! (`health.rs`) and the data plane (`tcp.rs`, `udp.rs`).

use super::token::Token;
use cloudlb_core::model::Target;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

/// The registered targets of a group as of one moment; replaced (never changed) on each change.
pub(crate) type Snapshot = Arc<Vec<Arc<TargetState>>>;

#[derive(Debug)]
pub(crate) struct TargetState {
    pub target: Target,
    pub addr: SocketAddr,
    healthy: AtomicBool,
    /// Consecutive successful / failed health checks.
    pub successes: AtomicU32,
    pub failures: AtomicU32,
    /// Cancelled when the target's connections must end: drain over, Service deleted, shutdown.
    pub kill: Token,
    /// Open TCP connections and UDP flows to this target.
    pub active: AtomicUsize,
}

impl TargetState {
    /// New targets start healthy (the health check takes them out if they are not).
    pub fn new(target: Target, addr: SocketAddr) -> Self {
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
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed) != healthy
    }

    /// Forgets the consecutive check results (the check changed).
    pub fn reset_counts(&self) {
        self.successes.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
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
