//! The local provider's own settings ([`LocalSettings`]).

use std::net::SocketAddr;
use std::time::Duration;

/// Settings of the local provider itself (those of each load balancer are its
/// [`LocalSpec`](cloudlb_core::model::LocalSpec)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalSettings {
    /// How long a connection to one target may take before the next target is tried.
    pub connect_timeout: Duration,
    /// A UDP flow without traffic for this long is forgotten.
    pub udp_idle_timeout: Duration,
    /// Threads of the data plane (each a single-threaded runtime accepting on every TCP
    /// listener); 0: one per CPU. Started with the first listener.
    pub workers: usize,
    /// The operator's own TCP listeners (e.g. `--metrics-addr`), named by their flag: a Service
    /// listener that would collide with one is refused with an error naming both, instead of an
    /// `Address already in use` that does not say who holds the port.
    pub reserved: Vec<(SocketAddr, String)>,
}

impl Default for LocalSettings {
    fn default() -> Self {
        LocalSettings {
            connect_timeout: Duration::from_secs(3),
            udp_idle_timeout: Duration::from_secs(60),
            workers: 0,
            reserved: Vec::new(),
        }
    }
}
