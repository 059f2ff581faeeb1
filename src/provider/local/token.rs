//! A small cancellation token (a `watch` channel): cancelled once, observed by many tasks.

use std::sync::Arc;
use tokio::sync::watch;

/// Cancelled once; every clone sees it. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Token(Arc<watch::Sender<bool>>);

impl Default for Token {
    fn default() -> Self {
        Token(Arc::new(watch::Sender::new(false)))
    }
}

impl Token {
    pub(crate) fn cancel(&self) {
        self.0.send_replace(true);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when [`Token::cancel`] has been called (at once if it already was).
    pub(crate) async fn cancelled(&self) {
        let mut rx = self.0.subscribe();
        // The sender lives as long as `self`, so this only returns once cancelled.
        let _ = rx.wait_for(|cancelled| *cancelled).await;
    }
}
