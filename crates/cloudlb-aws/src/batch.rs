//! Reads by id that several concurrent reconciles make at about the same time go out as one
//! call: the drift checks of a group of Services (their turns come together, see the
//! controller's `Memory::drift_turn`) each ask for their load balancer, tags, target groups and
//! frontend group by id, and AWS takes lists of them (20 load balancers or tagged resources per
//! call). A [`Coalescer`] collects the ids asked for within a short window and makes one call
//! for all of them.
//!
//! Whoever's window ends first takes the batch (its own ids first) and answers the others; a
//! batch that fills up goes at once. If the taker is cancelled mid-call, the others ask for
//! their ids themselves, so no caller waits on one that is gone.

use super::error::AwsError;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{Notify, oneshot};

/// What one call answers: a value for each id it found (an id missing is gone).
pub(crate) type Found<V> = BTreeMap<String, V>;

struct Waiting<V> {
    id: u64,
    keys: Vec<String>,
    tx: oneshot::Sender<Result<Found<V>, AwsError>>,
}

/// Coalesces lookups by id; see the module docs.
pub(crate) struct Coalescer<V> {
    window: Duration,
    /// Ids per batch: it goes as soon as it has this many.
    max_keys: usize,
    waiting: Mutex<Vec<Waiting<V>>>,
    full: Notify,
    next_id: AtomicU64,
}

impl<V> std::fmt::Debug for Coalescer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("window", &self.window)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

impl<V: Clone> Coalescer<V> {
    pub(crate) fn new(window: Duration, max_keys: usize) -> Self {
        Coalescer {
            window,
            max_keys: max_keys.max(1),
            waiting: Mutex::new(Vec::new()),
            full: Notify::new(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The values of `keys`, fetched with others' in one `fetch` (which gets every id of the
    /// batch, each once, and may split them into calls as the API needs).
    pub(crate) async fn get<F, Fut>(
        &self,
        keys: Vec<String>,
        fetch: F,
    ) -> Result<Found<V>, AwsError>
    where
        F: Fn(Vec<String>) -> Fut,
        Fut: Future<Output = Result<Found<V>, AwsError>>,
    {
        if keys.is_empty() {
            return Ok(Found::new());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let full = {
            let mut waiting = self.lock();
            waiting.push(Waiting {
                id,
                keys: keys.clone(),
                tx,
            });
            waiting.iter().map(|w| w.keys.len()).sum::<usize>() >= self.max_keys
        };
        if full {
            self.full.notify_waiters();
        } else {
            tokio::select! {
                () = tokio::time::sleep(self.window) => {}
                () = self.full.notified() => {}
            }
        }
        let batch = self.take(id);
        if !batch.is_empty() {
            let mut all: Vec<String> = batch.iter().flat_map(|w| w.keys.clone()).collect();
            all.sort();
            all.dedup();
            let result = fetch(all).await;
            for w in batch {
                let part = match &result {
                    Ok(found) => Ok(w
                        .keys
                        .iter()
                        .filter_map(|k| found.get(k).map(|v| (k.clone(), v.clone())))
                        .collect()),
                    Err(e) => Err(e.clone()),
                };
                // A waiter that went away (cancelled) no longer wants its part.
                let _ = w.tx.send(part);
            }
        }
        match rx.await {
            Ok(result) => result,
            // The one that took our ids was cancelled before answering.
            Err(_) => fetch(keys).await,
        }
    }

    /// Takes the batch that includes waiter `id` (first) and as many others as fit; nothing if
    /// another caller took it already.
    fn take(&self, id: u64) -> Vec<Waiting<V>> {
        let mut waiting = self.lock();
        let Some(pos) = waiting.iter().position(|w| w.id == id) else {
            return Vec::new();
        };
        let mine = waiting.remove(pos);
        let mut total = mine.keys.len();
        let mut batch = vec![mine];
        let mut i = 0;
        while i < waiting.len() {
            let n = waiting[i].keys.len();
            if total + n <= self.max_keys {
                total += n;
                batch.push(waiting.remove(i));
            } else {
                i += 1;
            }
        }
        batch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waiting<V>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    /// A fetch that records each call's ids and finds every id but "gone".
    fn fetcher(
        calls: Arc<Mutex<Vec<Vec<String>>>>,
    ) -> impl Fn(Vec<String>) -> std::future::Ready<Result<Found<String>, AwsError>> {
        move |keys: Vec<String>| {
            calls.lock().unwrap().push(keys.clone());
            std::future::ready(Ok(keys
                .into_iter()
                .filter(|k| k != "gone")
                .map(|k| (k.clone(), format!("value of {k}")))
                .collect()))
        }
    }

    fn keys(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn lookups_within_the_window_go_out_as_one_call_and_each_gets_its_own() {
        let coalescer = Coalescer::new(Duration::from_millis(50), 20);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fetch = fetcher(calls.clone());
        let (a, b, c) = tokio::join!(
            coalescer.get(keys(&["lb-1"]), &fetch),
            coalescer.get(keys(&["lb-2", "gone"]), &fetch),
            coalescer.get(keys(&["lb-1", "lb-3"]), &fetch),
        );
        assert_eq!(
            *calls.lock().unwrap(),
            vec![keys(&["gone", "lb-1", "lb-2", "lb-3"])],
            "one call, each id once"
        );
        assert_eq!(a.unwrap().keys().collect::<Vec<_>>(), ["lb-1"]);
        let b = b.unwrap();
        assert_eq!(
            b.keys().collect::<Vec<_>>(),
            ["lb-2"],
            "a missing id is absent"
        );
        assert_eq!(b["lb-2"], "value of lb-2");
        assert_eq!(c.unwrap().keys().collect::<Vec<_>>(), ["lb-1", "lb-3"]);
    }

    #[tokio::test]
    async fn a_full_batch_goes_at_once_and_the_rest_waits_for_the_next() {
        let coalescer = Coalescer::new(Duration::from_secs(3600), 2);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fetch = fetcher(calls.clone());
        // Two ids fill the batch: the hour-long window never has to end.
        let (a, b) = tokio::join!(
            coalescer.get(keys(&["a"]), &fetch),
            coalescer.get(keys(&["b"]), &fetch),
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(*calls.lock().unwrap(), vec![keys(&["a", "b"])]);
    }

    #[tokio::test]
    async fn an_error_reaches_every_caller_of_the_batch() {
        let coalescer: Coalescer<String> = Coalescer::new(Duration::from_millis(20), 20);
        let attempts = AtomicUsize::new(0);
        let failing = |_keys: Vec<String>| {
            attempts.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err(AwsError {
                operation: "DescribeLoadBalancers",
                kind: super::super::error::ErrorKind::Throttled,
                code: Some("Throttling".into()),
                message: "Rate exceeded".into(),
            }))
        };
        let (a, b) = tokio::join!(
            coalescer.get(keys(&["a"]), &failing),
            coalescer.get(keys(&["b"]), &failing),
        );
        assert_eq!(a.unwrap_err().message, "Rate exceeded");
        assert_eq!(b.unwrap_err().code.as_deref(), Some("Throttling"));
        assert_eq!(attempts.load(Ordering::Relaxed), 1, "one call for both");
    }

    #[tokio::test]
    async fn a_caller_whose_batch_taker_was_cancelled_asks_for_itself() {
        let coalescer = Coalescer::new(Duration::from_millis(10), 20);
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorded = calls.clone();
        // The taker's fetch never ends; it is cancelled while the other waits on it.
        let hangs = |keys: Vec<String>| {
            let recorded = recorded.clone();
            async move {
                recorded.lock().unwrap().push(keys);
                std::future::pending::<Result<Found<String>, AwsError>>().await
            }
        };
        let fetch = fetcher(calls.clone());
        let taker = coalescer.get(keys(&["a"]), hangs);
        let other = async {
            // Joins the taker's batch (its window is still open), then outlives it.
            tokio::time::sleep(Duration::from_millis(2)).await;
            coalescer.get(keys(&["b"]), &fetch).await
        };
        let cancel_taker = async {
            tokio::select! {
                _ = taker => unreachable!("the taker's fetch never ends"),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        };
        let ((), b) = tokio::join!(cancel_taker, other);
        assert_eq!(b.unwrap().keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            *calls.lock().unwrap(),
            vec![keys(&["a", "b"]), keys(&["b"])],
            "the taker's call had both; the other then asked for its own"
        );
    }
}
