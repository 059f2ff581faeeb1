//! The data plane's threads: one single-threaded tokio runtime per thread, like HAProxy's or
//! nginx's workers. Every TCP listener is accepted on by all of them (one socket, one duplicate
//! per worker, so the port stays exclusively ours); an accepted connection stays on the worker
//! that accepted it unless that one has clearly more open connections than another, which then
//! takes it; it lives there, with no cross-thread wake-ups. UDP listeners are spread over the
//! workers. Traffic never waits for the controller's runtime, and reconciling never waits for
//! traffic.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// Imbalance (open connections) tolerated before an accepted connection moves to another worker.
pub(crate) const HAND_OFF_SLACK: usize = 2;

/// The workers' runtimes and their load; shared with the listener tasks.
pub(crate) struct Pool {
    handles: Vec<Handle>,
    /// Open connections per worker.
    load: Vec<AtomicUsize>,
    next: AtomicUsize,
}

impl Pool {
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i % self.handles.len()]
    }

    /// The next worker, round-robin (for UDP listeners).
    pub fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len()
    }

    /// Where a connection accepted on worker `me` should live: the worker with the fewest open
    /// connections, unless `me` has at most [`HAND_OFF_SLACK`] more (a hand-off costs two
    /// `epoll_ctl` calls; short connections would pay it for nothing).
    pub fn least_loaded(&self, me: usize) -> usize {
        let load = |i: usize| self.load[i].load(Ordering::Relaxed);
        let mut best = me;
        for i in 0..self.load.len() {
            if load(i) < load(best) {
                best = i;
            }
        }
        if load(me) > load(best) + HAND_OFF_SLACK {
            best
        } else {
            me
        }
    }

    /// Counts a connection on worker `i` until the guard drops.
    pub fn track(self: &Arc<Self>, i: usize) -> LoadGuard {
        self.load[i].fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            pool: self.clone(),
            worker: i,
        }
    }
}

pub(crate) struct LoadGuard {
    pool: Arc<Pool>,
    worker: usize,
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.pool.load[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Owns the worker threads: dropping it stops them (and with them every task still on them).
pub(crate) struct Workers {
    pool: Arc<Pool>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` (at least one) worker threads.
    pub fn start(n: usize) -> io::Result<Self> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("cloudlb-lb-{i}"))
                .spawn(move || {
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                    // Dropping the runtime here, on its own thread, ends its tasks.
                })?;
        }
        tracing::info!(
            workers = handles.len(),
            "local load-balancer workers started"
        );
        let load = handles.iter().map(|_| AtomicUsize::new(0)).collect();
        Ok(Workers {
            pool: Arc::new(Pool {
                handles,
                load,
                next: AtomicUsize::new(0),
            }),
            stops,
        })
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// Worker threads to start when the setting is 0: one per CPU.
pub(crate) fn default_count() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_stay_unless_clearly_unbalanced() {
        let w = Workers::start(2).expect("workers");
        let pool = w.pool().clone();
        assert_eq!(pool.len(), 2);
        let mut guards = Vec::new();
        // Worker 0 takes connections until it has more than HAND_OFF_SLACK over worker 1.
        for _ in 0..=HAND_OFF_SLACK {
            assert_eq!(pool.least_loaded(0), 0);
            guards.push(pool.track(0));
        }
        assert_eq!(pool.least_loaded(0), 1, "hand-off to the idle worker");
        assert_eq!(pool.least_loaded(1), 1);
        guards.clear();
        assert_eq!(pool.least_loaded(0), 0, "closed connections are uncounted");
    }
}
