//! The local provider: the operator process itself serves each Service's load balancer, as an
//! in-process L4 proxy on an address of its own.
//!
//! - **Settings** come typed, as the model's [`LocalSpec`] (`LoadBalancer::local`, validated once
//!   by `cloudlb-core`'s config from the class's `spec.local`); a model without one gets
//!   [`LocalSpec::default`].
//! - **Addresses**: one per Service from [`LocalSpec::address_pool`] (CIDRs, ranges and single
//!   addresses, IPv4 and IPv6). [`LocalSpec::requested_address`] (the address the Service had) is
//!   honoured when it is in the pool and free; otherwise the first free address from a position
//!   derived from the Service UID, so a Service tends to get its address back after an operator
//!   restart anyway. An address, once given, is kept while it stays in the pool.
//! - **Listeners**: TCP (`tcp.rs`), UDP (`udp.rs`), TCP_UDP (both) on `address:port`. TLS listeners
//!   are not served (a conflict is reported for them). Traffic runs on the provider's own worker
//!   threads (`workers.rs`, [`LocalSettings::workers`]), one single-threaded runtime each, started
//!   with the first listener; health checks and drain timers run on the caller's runtime.
//! - **Target groups** (`group.rs`): IP targets, `random` (default) or `round-robin` among the
//!   healthy ones, all of them when none is healthy (fail open, like an NLB). Health checks
//!   (`health.rs`) take failing targets out and put recovered ones back; every change of a group's
//!   healthy/registered count is sent to [`LocalProvider::health_events`]. New targets start
//!   healthy and are probed at once.
//! - **Plan and apply**: [`plan::plan`] diffs the model against what is served, in operations
//!   with a local meaning only (see its table); [`Provider::apply`] executes exactly those
//!   operations, in order (`served.rs`), so an empty plan changes nothing. Changes converge in
//!   place: targets and listeners that stay keep their connections; a removed target drains
//!   ([`LocalSpec::drain_timeout_seconds`]) and then its connections are closed; a removed
//!   listener is closed with its connections; the empty model closes everything and frees the
//!   address.
//! - **Conflicts** (pool exhausted, a port that cannot be bound): everything else is served and
//!   [`ProviderError::Conflict`] names what is not; what is missing is missing from [`Observed`],
//!   so the next plan has it again.
//!
//! [`Observed`] is what is really served, in local ids: the load balancer's id and DNS name are
//! its address, a listener's id is `address:port/PROTOCOL`, a target group's id is its key in the
//! model. Nothing AWS-shaped: no security groups (source ranges are not enforced, and config
//! refuses them for local classes), no attributes; the model's AWS parts (attributes, subnets,
//! addresses per subnet, tags) are ignored.

mod error;
#[cfg(test)]
#[path = "../tests/support/fixtures.rs"]
mod fixtures;
mod group;
mod health;
pub mod plan;
mod pool;
mod served;
mod settings;
mod target;
mod tcp;
mod token;
mod udp;
mod workers;

pub use cloudlb_core::model::{AddressPool, Algorithm, LocalSpec};
pub use error::LocalError;
pub use group::HealthEvent;
pub use settings::LocalSettings;

use cloudlb_core::model::{Desired, ServiceRef};
use cloudlb_core::plan::{Op, Plan, PlanError};
use cloudlb_core::provider::{Observed, Provider, ProviderError};
use served::{Ctx, ServiceLb};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

const PROVIDER_NAME: &str = "local";
/// How long closing waits for a listener socket to be released.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    /// By Service UID.
    services: BTreeMap<String, ServiceLb>,
    /// The data plane's threads, started with the first listener.
    workers: Option<Arc<workers::Workers>>,
    shut_down: bool,
}

/// Serves load balancers in this process; see the module docs.
pub struct LocalProvider {
    settings: LocalSettings,
    state: Mutex<State>,
    events: broadcast::Sender<HealthEvent>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl LocalProvider {
    pub fn new(settings: LocalSettings) -> Self {
        let (events, _) = broadcast::channel(1024);
        LocalProvider {
            settings,
            state: Mutex::new(State::default()),
            events,
        }
    }

    pub fn settings(&self) -> &LocalSettings {
        &self.settings
    }

    /// Changes of the healthy/registered count of every target group, e.g. to publish an Event
    /// when a group has no healthy target. A slow receiver misses events (`Lagged`).
    pub fn health_events(&self) -> broadcast::Receiver<HealthEvent> {
        self.events.subscribe()
    }

    /// Closes every listener and connection, stops health checks and frees every address; waits
    /// until the listening sockets are closed. Later applies fail.
    pub async fn shutdown(&self) {
        let handles = self.close_all();
        join_closed(handles).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn close_all(&self) -> Vec<JoinHandle<()>> {
        let mut state = self.lock();
        state.shut_down = true;
        let handles = std::mem::take(&mut state.services)
            .into_values()
            .flat_map(ServiceLb::close)
            .collect();
        // Stops the worker threads (once the listener tasks holding them are gone).
        state.workers = None;
        handles
    }

    fn workers(&self, state: &mut State) -> Result<Arc<workers::Workers>, ProviderError> {
        if let Some(w) = &state.workers {
            return Ok(w.clone());
        }
        let n = match self.settings.workers {
            0 => workers::default_count(),
            n => n,
        };
        let w = Arc::new(workers::Workers::start(n).map_err(|e| ProviderError::Api {
            operation: "local: start worker threads",
            message: e.to_string(),
            throttled: false,
        })?);
        state.workers = Some(w.clone());
        Ok(w)
    }

    /// Executes `plan` for `desired.service`, operation by operation (see `served.rs`), as far as
    /// possible; synchronous (binding is). Returns what is served afterwards and the tasks of
    /// closed listeners to wait for.
    fn execute(
        &self,
        desired: &Desired,
        plan: &Plan,
    ) -> (Result<Observed, ProviderError>, Vec<JoinHandle<()>>) {
        let mut closing = Vec::new();
        // Refused before anything changes.
        if let Some(op) = plan.ops.iter().find(|op| !plan::is_local(op)) {
            let e = LocalError::NotLocal {
                op: format!("{op:?}"),
            };
            return (Err(e.into()), closing);
        }
        let mut state = self.lock();
        if state.shut_down {
            return (Err(LocalError::ShutDown.into()), closing);
        }
        let uid = desired.service.uid.clone();
        if plan.is_empty() {
            let observed = state.services.get(&uid).map(ServiceLb::observed);
            return (Ok(observed.unwrap_or_default()), closing);
        }
        let spec = desired
            .lb
            .as_ref()
            .and_then(|lb| lb.local.clone())
            .unwrap_or_default();
        let binds = plan
            .ops
            .iter()
            .any(|op| matches!(op, Op::CreateListener { .. } | Op::ModifyListener { .. }));
        let workers = match binds.then(|| self.workers(&mut state)).transpose() {
            Ok(w) => w,
            Err(e) => return (Err(e), closing),
        };
        let taken: BTreeSet<IpAddr> = state
            .services
            .iter()
            .filter(|(u, _)| **u != uid)
            .filter_map(|(_, s)| s.address.map(|a| a.ip))
            .collect();
        let svc = state
            .services
            .entry(uid.clone())
            .or_insert_with(|| ServiceLb::new(desired.service.clone(), desired.lb_name.clone()));
        svc.set_names(&desired.service, &desired.lb_name);
        let ctx = Ctx {
            desired,
            spec: &spec,
            settings: &self.settings,
            workers: workers.as_deref(),
            events: &self.events,
            taken: &taken,
        };
        let mut errors = Vec::new();
        for op in &plan.ops {
            if let Err(mut e) = svc.execute(op, &ctx, &mut closing) {
                // Without an address nothing else can be served.
                let stop = e
                    .iter()
                    .any(|e| matches!(e, LocalError::PoolExhausted { .. }));
                errors.append(&mut e);
                if stop {
                    break;
                }
            }
        }
        svc.finish(&ctx);
        let observed = svc.observed();
        if svc.is_idle()
            && let Some(gone) = state.services.remove(&uid)
        {
            closing.extend(gone.close());
        }
        match error::combine(errors) {
            None => (Ok(observed), closing),
            Some(e) => {
                tracing::warn!(service = %desired.service, error = %e, "load balancer partly served");
                (Err(e), closing)
            }
        }
    }
}

/// Waits (bounded) until closed listeners have released their sockets.
async fn join_closed(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        if tokio::time::timeout(CLOSE_WAIT, h).await.is_err() {
            tracing::warn!("a closed listener did not stop within {CLOSE_WAIT:?}");
        }
    }
}

impl Drop for LocalProvider {
    fn drop(&mut self) {
        for h in self.close_all() {
            h.abort();
        }
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        PROVIDER_NAME
    }

    /// The local provider's own diff ([`plan::plan`]); never an error (nothing is
    /// deletion-protected).
    fn plan(&self, desired: &Desired, observed: &Observed) -> Result<Plan, PlanError> {
        Ok(plan::plan(desired, observed, &LocalSpec::default()))
    }

    async fn observe(&self, desired: &Desired) -> Result<Observed, ProviderError> {
        Ok(self
            .lock()
            .services
            .get(&desired.service.uid)
            .map(ServiceLb::observed)
            .unwrap_or_default())
    }

    /// Executes exactly the operations of `plan` (those of [`plan::plan`]; any other is refused
    /// before anything changes); the result is what [`Provider::observe`] returns next.
    async fn apply(
        &self,
        desired: &Desired,
        _observed: &Observed,
        plan: &Plan,
    ) -> Result<Observed, ProviderError> {
        let (result, closing) = self.execute(desired, plan);
        join_closed(closing).await;
        result
    }

    async fn owned(
        &self,
        skip: &(dyn for<'s> Fn(&'s ServiceRef) -> bool + Sync),
    ) -> Result<Vec<(ServiceRef, Observed)>, ProviderError> {
        let mut owned: Vec<_> = self
            .lock()
            .services
            .values()
            .filter(|s| s.is_observable() && !skip(&s.service))
            .map(|s| (s.service.clone(), s.observed()))
            .collect();
        owned.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(owned)
    }
}
