//! Providers execute a [`Plan`](crate::plan::Plan) against a cloud and report what exists.
//!
//! The trait speaks our own types (the desired model, [`Observed`], [`Op`](crate::plan::Op)),
//! never SDK types. The providers are the crates `cloudlb-aws` and `cloudlb-local`.

pub use crate::model::observed::{
    LbState, Observed, ObservedLb, ObservedListener, ObservedSecurityGroup, ObservedTargetGroup,
};
use crate::model::{BackendAccess, Desired, Target};
use crate::plan::{Plan, PlanError};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

/// Errors a provider reports; each says what, where and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(
        "{kind} {name:?} exists but does not carry our ownership tags for this Service: it is not ours, so it is left untouched; delete or rename it, or set another name"
    )]
    Foreign { kind: &'static str, name: String },
    #[error("{0}")]
    InvalidConfig(String),
    #[error(
        "load balancer {name} has deletion protection enabled: it was not deleted; disable deletion_protection.enabled to let cloudlb remove it"
    )]
    DeletionProtected { name: String },
    #[error("{operation} failed: {message}")]
    Api {
        operation: &'static str,
        message: String,
        throttled: bool,
    },
    #[error("{what} disappeared while being changed (changed outside cloudlb?): {message}")]
    Gone { what: &'static str, message: String },
    #[error("{what} is still in use ({message}); will retry")]
    InUse { what: &'static str, message: String },
    /// Part of the load balancer could not be served (address pool exhausted, port in use); the
    /// rest is served.
    #[error("{0}")]
    Conflict(String),
}

impl ProviderError {
    /// Short label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            ProviderError::Foreign { .. } => "foreign",
            ProviderError::InvalidConfig(_) => "invalid_config",
            ProviderError::DeletionProtected { .. } => "deletion_protected",
            ProviderError::Api {
                throttled: true, ..
            } => "throttled",
            ProviderError::Api { .. } => "api",
            ProviderError::Gone { .. } => "gone",
            ProviderError::InUse { .. } => "in_use",
            ProviderError::Conflict(_) => "conflict",
        }
    }
}

/// A cloud (or the local proxy) that can host load balancers.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// `aws`, `local`: used in metrics and logs.
    fn name(&self) -> &'static str;

    /// Reads what exists for `desired.service` (found by the names in the model, or for an empty
    /// model by the names the Service would have). Read-only.
    async fn observe(&self, desired: &Desired) -> Result<Observed, ProviderError>;

    /// [`observe`](Self::observe), for a Service whose resources are `known` (remembered or
    /// from its checkpoint; not trusted: every one is read again and checked for our tags). A
    /// provider can look them up by id and batch the lookups of Services read at the same
    /// time, as the drift checks are. Default: `observe`.
    async fn observe_known(
        &self,
        desired: &Desired,
        known: &Observed,
    ) -> Result<Observed, ProviderError> {
        let _ = known;
        self.observe(desired).await
    }

    /// The operations that make `observed` equal to `desired`, in order: each provider plans its
    /// own resources (the NLB planner [`crate::plan::plan`] for AWS; the local provider diffs what
    /// it serves). Pure.
    fn plan(&self, desired: &Desired, observed: &Observed) -> Result<Plan, PlanError>;

    /// Whether what it makes outlives the operator, so that a Service's checkpoint
    /// ([`crate::model::checkpoint`]) can stand in for a read after a restart (AWS). The local
    /// provider serves from the operator's own process: after a start it has nothing yet.
    fn checkpoints(&self) -> bool {
        false
    }

    /// Whether every target group of `observed` (known from a checkpoint, not read) carries our
    /// ownership tags for `desired.service`, asked now, and learns what a plan against
    /// `observed` needs: the controller then (de)registers targets against it without reading
    /// the rest. A provider that cannot tell says no (the controller reads everything).
    async fn confirm_target_groups(
        &self,
        desired: &Desired,
        observed: &Observed,
    ) -> Result<bool, ProviderError> {
        let _ = (desired, observed);
        Ok(false)
    }

    /// `observed` with the load balancer's state (and address) read again: what the controller
    /// polls while a load balancer is provisioning. Default: a full observe.
    async fn refresh_state(
        &self,
        desired: &Desired,
        observed: &Observed,
    ) -> Result<Observed, ProviderError> {
        let _ = observed;
        self.observe(desired).await
    }

    /// Executes `plan` in order and returns what exists afterwards, without re-reading what it
    /// just wrote.
    async fn apply(
        &self,
        desired: &Desired,
        observed: &Observed,
        plan: &Plan,
    ) -> Result<Observed, ProviderError>;

    /// Everything that carries our ownership tags for this cluster, grouped by the Service its
    /// tags name (namespace, name, UID), one [`Observed`] per Service, sorted by Service; read-only.
    /// Resources without all three Service tags are skipped: they are not ours to judge.
    ///
    /// For the orphan sweep: the controller deletes what a Service that no longer exists left
    /// behind by applying `plan(&Desired::empty(..), &observed)`. Each [`Observed`] holds what
    /// that plan needs: the load balancer (with its attributes, so deletion protection is seen),
    /// its listeners, every target group (attached or not) and the frontend security group.
    /// Target-group attributes and targets are left empty; do not plan anything but the empty
    /// model against it.
    ///
    /// Services for which `skip` says yes (the controller's store shows them alive and ours)
    /// are neither read further nor returned: at 2,000 Services the sweep read every one's
    /// load balancer (attributes, listeners), 4,000 calls every sweep, and held it all at once.
    ///
    /// The default finds nothing.
    async fn owned(
        &self,
        skip: &(dyn for<'s> Fn(&'s crate::model::ServiceRef) -> bool + Sync),
    ) -> Result<Vec<(crate::model::ServiceRef, Observed)>, ProviderError> {
        let _ = skip;
        Ok(Vec::new())
    }

    /// The targets each of the target groups `names` (of `observed`, by name) reports healthy,
    /// by name: for the pods that wait for their readiness gate. Read-only. The default (a
    /// provider that cannot tell) counts every registered target as healthy.
    async fn healthy_targets(
        &self,
        observed: &Observed,
        names: &[String],
    ) -> Result<BTreeMap<String, BTreeSet<Target>>, ProviderError> {
        Ok(observed
            .target_groups
            .iter()
            .filter(|t| names.contains(&t.name))
            .map(|t| (t.name.clone(), t.targets.clone()))
            .collect())
    }

    /// What the provider shares between load balancers (AWS: the backend security group and
    /// the rules on the targets' groups), brought down to what `wanted` (what the desired model
    /// of every Service this installation manages needs of it) still needs; nothing is removed
    /// that one of them needs. The default has nothing shared.
    async fn prune_shared(&self, _wanted: &[SharedNeed]) -> Result<(), ProviderError> {
        Ok(())
    }
}

/// What one Service's load balancer needs of what load balancers share
/// ([`Provider::prune_shared`]): the backend access its model asks for and the ids of its
/// targets. Not the model itself: at 2,000 Services on 1,000 nodes the models hold millions of
/// targets, and all of them at once took hundreds of MiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedNeed {
    pub backend: BackendAccess,
    /// Shared by every need with the same targets (node targets: most Services).
    pub targets: Arc<BTreeSet<String>>,
}

/// Collects the [`SharedNeed`]s of models one at a time, keeping one copy of each distinct
/// target set.
#[derive(Debug, Default)]
pub struct SharedNeeds {
    needs: Vec<SharedNeed>,
    sets: HashSet<Arc<BTreeSet<String>>>,
}

impl SharedNeeds {
    /// Adds what `desired` needs (nothing if it asks for no backend access).
    pub fn add(&mut self, desired: &Desired) {
        let Some(lb) = &desired.lb else { return };
        let Some(backend) = &lb.security.backend else {
            return;
        };
        let ids: BTreeSet<String> = lb
            .target_groups
            .iter()
            .flat_map(|tg| tg.targets.iter().map(|t| t.id.clone()))
            .collect();
        let targets = match self.sets.get(&ids) {
            Some(set) => set.clone(),
            None => {
                let set = Arc::new(ids);
                self.sets.insert(set.clone());
                set
            }
        };
        self.needs.push(SharedNeed {
            backend: backend.clone(),
            targets,
        });
    }

    pub fn needs(&self) -> &[SharedNeed] {
        &self.needs
    }
}

/// Where a provider reports every cloud call it makes: the operator counts them in
/// `cloudlb_cloud_api_calls_total{provider,operation,outcome}`.
pub trait CallObserver: Send + Sync {
    /// One call of `operation` (e.g. `CreateLoadBalancer`) ended with `outcome` (`ok`,
    /// `not_found`, `throttled`, …).
    fn cloud_call(&self, provider: &str, operation: &str, outcome: &str);

    /// The client-side rate limit of a family of calls (`describe`, `write`, `targets`) is now
    /// `per_second` (0: none); it adapts to the cloud's throttling.
    fn call_rate(&self, _provider: &str, _family: &str, _per_second: f64) {}
}
