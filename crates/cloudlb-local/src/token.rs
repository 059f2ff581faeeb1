//! A cancellation token for the hot path: cancelled once, observed by many connections.
//!
//! Every relayed connection waits on two tokens (its listener's and its target's) next to the
//! copy loop, so the wait is polled on every wake-up of the connection. A waiting future here
//! registers its waker once (one lock) and afterwards only reads an atomic flag, unlike a
//! `watch`/`Notify` wait, which takes the shared waiter lock on every poll and makes all
//! connections of a listener contend for it.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
struct Inner {
    cancelled: AtomicBool,
    next_id: AtomicU64,
    waiters: Mutex<HashMap<u64, Waker>>,
}

/// Cancelled once; every clone sees it. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct Token(Arc<Inner>);

impl Token {
    pub(crate) fn cancel(&self) {
        self.0.cancelled.store(true, Ordering::SeqCst);
        let waiters = std::mem::take(
            &mut *self
                .0
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for w in waiters.into_values() {
            w.wake();
        }
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.0.cancelled.load(Ordering::Acquire)
    }

    /// Completes when [`Token::cancel`] has been called (at once if it already was).
    pub(crate) fn cancelled(&self) -> Cancelled<'_> {
        Cancelled {
            token: self,
            registered: None,
        }
    }
}

/// See [`Token::cancelled`].
pub(crate) struct Cancelled<'a> {
    token: &'a Token,
    /// Our id in the waiter map and the waker stored under it.
    registered: Option<(u64, Waker)>,
}

impl Cancelled<'_> {
    /// `work`'s output, or `None` when the token is (or gets) cancelled first. A loop keeps one
    /// pinned `Cancelled` across its rounds, so its waker is registered once, not every round.
    pub(crate) async fn race<T>(self: Pin<&mut Self>, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            () = self => None,
            out = work => Some(out),
        }
    }
}

impl Future for Cancelled<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let inner = &self.token.0;
        if inner.cancelled.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if self
            .registered
            .as_ref()
            .is_some_and(|(_, w)| w.will_wake(cx.waker()))
        {
            return Poll::Pending;
        }
        let id = match &self.registered {
            Some((id, _)) => *id,
            None => inner.next_id.fetch_add(1, Ordering::Relaxed),
        };
        inner
            .waiters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, cx.waker().clone());
        self.registered = Some((id, cx.waker().clone()));
        // `cancel` may have run between the first check and the insert.
        if inner.cancelled.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Cancelled<'_> {
    fn drop(&mut self) {
        if let Some((id, _)) = self.registered.take() {
            self.token
                .0
                .waiters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn wakes_every_waiter_and_later_ones_at_once() {
        let t = Token::default();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let t = t.clone();
                tokio::spawn(async move { t.cancelled().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!t.is_cancelled());
        t.cancel();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .expect("woken")
                .expect("task");
        }
        t.cancelled().await;
        assert!(t.0.waiters.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn dropped_waiters_unregister() {
        let t = Token::default();
        let r = tokio::time::timeout(Duration::from_millis(10), t.cancelled()).await;
        assert!(r.is_err());
        assert!(t.0.waiters.lock().expect("lock").is_empty());
    }
}
