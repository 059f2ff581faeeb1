//! Orphan sweep: cloud resources tagged with our cluster whose Service is gone (or is another
//! incarnation with a new UID) are deleted through the normal empty-model path, so a crash between
//! two steps never leaks a load balancer, target group or security group.

use super::Context;
use crate::config::class::{LoadBalancerClass, ProviderKind};
use crate::model::Desired;
use crate::ownership::{Ownership, has_finalizer};
use crate::provider::SharedNeeds;
use k8s_openapi::api::core::v1::Service;
use kube::{Api, ResourceExt};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// Whether the Service `sref` names is alive and still (or again) ours: then the reconciler owns
/// its resources, not the sweep. Errors count as alive: never delete on a guess.
async fn alive(
    ctx: &Context,
    classes: &[LoadBalancerClass],
    sref: &crate::model::ServiceRef,
) -> bool {
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    match api.get_opt(&sref.name).await {
        Ok(Some(svc)) => {
            if svc.uid().as_deref() != Some(sref.uid.as_str()) {
                return false;
            }
            // Ours (any installation's finalizer means some cloudlb owns it), or about to be.
            has_finalizer(&svc) || matches!(ctx.ownership(&svc, classes), Ownership::Ours { .. })
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(service = %sref, error = %e, "orphan sweep: cannot read Service; skipping");
            true
        }
    }
}

/// One sweep over every provider; returns how many Services' leftovers were deleted. Services
/// the store shows alive and ours (or outside the watched namespace) are not read at all; the
/// others are each confirmed gone with a read of the API server before anything is deleted.
pub async fn sweep_once(
    ctx: &Context,
    services: &kube::runtime::reflector::Store<Service>,
) -> usize {
    let mut deleted = 0;
    let classes = ctx.served_classes();
    let vouched: HashSet<String> = services
        .state()
        .iter()
        .filter(|svc| {
            has_finalizer(svc) || matches!(ctx.ownership(svc, &classes), Ownership::Ours { .. })
        })
        .filter_map(|svc| svc.uid())
        .collect();
    let namespace = ctx.settings.namespace.as_ref();
    let skip = |s: &crate::model::ServiceRef| {
        vouched.contains(&s.uid) || namespace.is_some_and(|ns| ns != &s.namespace)
    };
    for provider in ctx.providers.all() {
        let owned = match provider.owned(&skip).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(provider = provider.name(), error = %e, "orphan sweep: listing failed");
                continue;
            }
        };
        for (sref, observed) in owned {
            if alive(ctx, &classes, &sref).await {
                continue;
            }
            let desired = Desired::empty(sref.clone(), observed.lb_name().to_string());
            let plan = match provider.plan(&desired, &observed) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(service = %sref, error = %e, "orphan sweep: not deleting");
                    continue;
                }
            };
            if plan.is_empty() {
                continue;
            }
            match provider.apply(&desired, &observed, &plan).await {
                Ok(_) => {
                    tracing::info!(service = %sref, ops = ?plan.ops, "orphan sweep: deleted resources of a Service that is gone");
                    deleted += 1;
                }
                Err(e) => {
                    tracing::warn!(service = %sref, error = %e, "orphan sweep: delete failed; will retry next sweep")
                }
            }
        }
    }
    deleted
}

/// Sweeps every `interval` (jittered), the first time one interval after start, when the
/// reconciles of the start-up wave have settled.
pub async fn run(
    ctx: Arc<Context>,
    services: kube::runtime::reflector::Store<Service>,
    interval: Duration,
) {
    loop {
        let f: f64 = rand::Rng::random_range(&mut rand::rng(), 0.9..1.1);
        tokio::time::sleep(interval.mul_f64(f)).await;
        let n = sweep_once(&ctx, &services).await;
        ctx.metrics.orphan_swept();
        if n > 0 {
            tracing::info!(services = n, "orphan sweep finished");
        }
    }
}

/// What every Service this installation manages needs of what load balancers share, by
/// provider; `None` when one of them cannot be built (invalid or incomplete): then what it needs
/// is unknown, and nothing shared may be removed on a guess. One model at a time: only what it
/// needs is kept.
fn every_need(
    ctx: &Context,
    services: &kube::runtime::reflector::Store<Service>,
) -> Option<Vec<(ProviderKind, SharedNeeds)>> {
    let classes = ctx.served_classes();
    let nodes = ctx.nodes.state();
    let mut out: Vec<(ProviderKind, SharedNeeds)> = Vec::new();
    for svc in services.state() {
        let Ownership::Ours { class, .. } = ctx.ownership(&svc, &classes) else {
            continue;
        };
        let cfg = crate::config::resolve(class, &svc).ok()?;
        let sref = crate::build::service_ref(&svc).ok()?;
        let slices = ctx.endpoints.slices(&sref.namespace, &sref.name);
        // Every endpoint that may wait for its readiness gate counts: keeping a rule a pod does
        // not need yet is safe, removing one a waiting pod needs is not.
        let unready = super::readiness::unready_ips(&slices);
        let backends = crate::build::Backends {
            nodes: &nodes,
            endpoint_slices: &slices,
            gate_waiting: &unready,
        };
        let built = crate::build::build(&ctx.settings.cluster, &svc, backends, &cfg).ok()?;
        let kind = class.spec.provider;
        let slot = match out.iter().position(|(k, _)| *k == kind) {
            Some(i) => i,
            None => {
                out.push((kind, SharedNeeds::default()));
                out.len() - 1
            }
        };
        out[slot].1.add(&built.desired);
    }
    Some(out)
}

/// Brings what load balancers share (the AWS backend security group and its rules) down to what
/// the Services still need: right after a load balancer is removed ([`Context::prune`]), and
/// with every orphan sweep interval.
pub async fn prune_shared(
    ctx: Arc<Context>,
    services: kube::runtime::reflector::Store<Service>,
    interval: Duration,
) {
    loop {
        tokio::select! {
            _ = ctx.prune.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        let Some(all) = every_need(&ctx, &services) else {
            tracing::info!("a Service of ours cannot be built: shared resources left as they are");
            continue;
        };
        for kind in ProviderKind::ALL {
            let Some(provider) = ctx.providers.get(kind) else {
                continue;
            };
            let wanted = all
                .iter()
                .find(|(k, _)| *k == kind)
                .map(|(_, n)| n.needs())
                .unwrap_or_default();
            if let Err(e) = provider.prune_shared(wanted).await {
                tracing::warn!(provider = provider.name(), error = %e, "pruning shared resources failed; will retry");
            }
        }
    }
}
