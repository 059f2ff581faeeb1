//! The Service reconciler: Service (+ class + annotations) → config → desired model → plan →
//! apply → status, and the same path with the empty model to clean up.

use super::events::{self, publish};
use super::{CacheEntry, Context, FINALIZER, PROVIDER_ANNOTATION, status};
use crate::build::{self, BuildError};
use crate::config::{self, annotations, class::ProviderKind};
use crate::model::{Desired, ServiceRef, naming};
use crate::plan::{self, PlanError};
use crate::provider::{LbState, ProviderError};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use rand::Rng;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API call failed: {}", kube_message(.0))]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl Error {
    /// Label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kubernetes",
            Error::Provider(e) => e.category(),
            Error::Plan(_) => "plan",
        }
    }
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

fn jittered(d: Duration) -> Duration {
    let f: f64 = rand::rng().random_range(0.9..1.1);
    d.mul_f64(f)
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", service = %key(&svc));
    async move {
        let started = Instant::now();
        let result = reconcile_inner(&svc, &ctx).await;
        let outcome = match &result {
            Ok((_, outcome)) => *outcome,
            Err(e) => e.category(),
        };
        ctx.metrics
            .reconciled(outcome, started.elapsed().as_secs_f64());
        if let Ok(cache) = ctx.cache.lock() {
            let managed = cache.values().filter(|e| e.outline().lb.is_some()).count();
            ctx.metrics
                .set_managed_load_balancers(i64::try_from(managed).unwrap_or(i64::MAX));
        }
        let result = result.map(|(action, _)| action);
        match &result {
            Ok(_) => {
                if let Ok(mut f) = ctx.failures.lock() {
                    f.remove(&key(&svc));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed");
                let reason = if svc.metadata.deletion_timestamp.is_some() {
                    events::DELETING
                } else {
                    events::SYNC_FAILED
                };
                publish(
                    &ctx.recorder,
                    &svc,
                    true,
                    reason,
                    format!("Error syncing load balancer: {e}"),
                )
                .await;
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// Per-Service exponential backoff: 5 s, 10 s, … capped at 5 min.
pub fn error_policy(svc: Arc<Service>, _err: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(key(&svc)).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let secs = 5u64
        .saturating_mul(1u64 << n.saturating_sub(1).min(6))
        .min(300);
    Action::requeue(jittered(Duration::from_secs(secs)))
}

fn is_provisioning(observed: &crate::provider::Observed) -> bool {
    observed
        .lb
        .as_ref()
        .is_some_and(|lb| lb.state == LbState::Provisioning)
}

fn has_finalizer(svc: &Service) -> bool {
    svc.finalizers().iter().any(|f| f == FINALIZER)
}

/// Sets the finalizer list; `record`: also records the provider ([`PROVIDER_ANNOTATION`]) when
/// that can go in the same write. Returns whether it did.
async fn set_finalizers(
    api: &Api<Service>,
    svc: &Service,
    finalizers: Vec<String>,
    record: Option<ProviderKind>,
) -> Result<bool, kube::Error> {
    let current = svc.finalizers();
    let mut recorded = false;
    let patch = if current.is_empty() {
        // Nothing to compare with: the resourceVersion makes this an optimistic update.
        let mut patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": svc.resource_version()}});
        if let Some(kind) = record {
            patch["metadata"]["annotations"] = json!({PROVIDER_ANNOTATION: kind.to_string()});
            recorded = true;
        }
        Patch::Merge(patch)
    } else {
        // Conflicts only when the finalizer list itself changed meanwhile (our own status
        // write changes the resourceVersion, not the list).
        let ops = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "replace", "path": "/metadata/finalizers", "value": finalizers},
        ]);
        let ops: json_patch::Patch =
            serde_json::from_value(ops).map_err(kube::Error::SerdeError)?;
        Patch::Json(ops)
    };
    api.patch(&svc.name_any(), &PatchParams::default(), &patch)
        .await?;
    Ok(recorded)
}

/// A Kubernetes error for humans: the API server's message, not the whole Status object.
fn kube_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

/// Invalid input: one Warning Event listing every problem (only when the message changes), no
/// cloud write, wait for the next edit.
async fn invalid(ctx: &Context, svc: &Service, message: String) -> Action {
    tracing::warn!(%message, "invalid configuration; nothing written");
    let changed = ctx
        .last_invalid
        .lock()
        .map(|mut m| m.insert(key(svc), message.clone()).as_deref() != Some(message.as_str()))
        .unwrap_or(true);
    if changed {
        publish(&ctx.recorder, svc, true, events::INVALID, message).await;
    }
    Action::await_change()
}

/// How a reconcile ended (metrics label `result`).
pub mod outcome {
    /// Cloud changes were applied (or the status written).
    pub const APPLIED: &str = "applied";
    /// Nothing to do and no cloud call made.
    pub const UNCHANGED: &str = "unchanged";
    /// Read the cloud; it matched.
    pub const VERIFIED: &str = "verified";
    pub const INVALID: &str = "invalid";
    pub const NOT_OURS: &str = "not_ours";
    pub const CLEANED_UP: &str = "cleaned_up";
    pub const PROTECTED: &str = "deletion_protected";
}

async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<(Action, &'static str), Error> {
    let Ok(sref) = build::service_ref(svc) else {
        return Ok((Action::await_change(), outcome::NOT_OURS));
    };
    let classes = ctx.served_classes();
    let class = config::select_class(svc, &classes);
    let deleting = svc.metadata.deletion_timestamp.is_some();
    let Some(class) = class.filter(|_| !deleting) else {
        if has_finalizer(svc) {
            return cleanup(svc, sref, ctx).await;
        }
        return Ok((Action::await_change(), outcome::NOT_OURS));
    };
    let class_name = class.name_any();
    let Some(provider) = ctx.providers.get(class.spec.provider) else {
        let msg = format!(
            "LoadBalancerClass {class_name} uses provider {}, which this operator instance does not run; start cloudlb with that provider enabled",
            class.spec.provider
        );
        return Ok((invalid(ctx, svc, msg).await, outcome::INVALID));
    };
    let cfg = match config::resolve(class, svc) {
        Ok(c) => c,
        Err(errors) => {
            let msg = format!(
                "Not provisioning the load balancer (class {class_name}): {errors}. Nothing was changed."
            );
            return Ok((invalid(ctx, svc, msg).await, outcome::INVALID));
        }
    };
    // The store's Arcs: a reconcile never copies the Node objects.
    let nodes = ctx.nodes.state();
    let built = match build::build(&ctx.settings.cluster, svc, &nodes, &cfg) {
        Ok(b) => b,
        Err(BuildError::Incomplete) => return Ok((Action::await_change(), outcome::NOT_OURS)),
        Err(BuildError::Invalid(m)) => {
            let msg = format!(
                "Not provisioning the load balancer (class {class_name}): {m}. Nothing was changed."
            );
            return Ok((invalid(ctx, svc, msg).await, outcome::INVALID));
        }
    };
    if let Ok(mut m) = ctx.last_invalid.lock() {
        m.remove(&key(svc));
    }
    let warning = built.warnings.join("; ");
    let warning_changed = ctx
        .last_warning
        .lock()
        .map(|mut m| m.insert(key(svc), warning.clone()).as_deref() != Some(warning.as_str()))
        .unwrap_or(false);
    if !warning.is_empty() && warning_changed {
        tracing::warn!(%warning, "some nodes are not targets");
        publish(&ctx.recorder, svc, true, events::TARGETS_SKIPPED, warning).await;
    }

    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    // Nothing of ours can exist for a Service that has never carried our finalizer (it goes on
    // before the first cloud write) and that this process has not touched yet (so the store
    // cannot be behind our own write), as long as every name derives from its UID: the first
    // reconcile of a new Service needs no cloud read.
    let untouched = !has_finalizer(svc)
        && cfg.name.is_none()
        && ctx.cache.lock().is_ok_and(|c| !c.contains_key(&sref.uid))
        && ctx
            .failures
            .lock()
            .is_ok_and(|f| !f.contains_key(&key(svc)));
    let kind = class.spec.provider;
    // The finalizer and the provider of record go on before the first cloud write.
    let held = recorded_provider(svc);
    let mut recorded = false;
    if !has_finalizer(svc) {
        let mut f = svc.finalizers().to_vec();
        f.push(FINALIZER.to_string());
        // A new Service: finalizer and provider in one write.
        recorded = set_finalizers(&api, svc, f, held.is_none().then_some(kind)).await?;
    }
    match held {
        Some(held) if held == kind => {}
        // The class moved to another provider: what the old one holds goes first.
        Some(held) => return switch_provider(svc, sref, ctx, held, kind).await,
        None if recorded => {}
        None => record_provider(&api, svc, kind).await?,
    }

    let desired = built.desired;
    let fingerprint = desired.fingerprint();
    let entry = ctx
        .cache
        .lock()
        .ok()
        .and_then(|c| c.get(&sref.uid).cloned());
    let now = Instant::now();
    let mut cached = entry.filter(|e| {
        !e.stale && e.provider == kind && now.duration_since(e.verified_at) < ctx.settings.resync
    });
    // While provisioning, only the load balancer's state is read again (one call, not a full
    // observe).
    let mut refreshed = false;
    if let Some(e) = cached.as_mut().filter(|e| e.provisioning) {
        let observed = provider.refresh_state(&desired, &e.observed()).await?;
        let provisioning = is_provisioning(&observed);
        *e = CacheEntry::new(
            e.fingerprint.clone(),
            observed,
            e.provider,
            e.verified_at,
            provisioning,
            &ctx.interners,
        );
        refreshed = true;
    }

    let (observed, verified_at, plan) = match cached {
        Some(e) if e.fingerprint == fingerprint => {
            // Unchanged: no cloud call at all (beyond the state poll while provisioning).
            write_status(&ctx.metrics, &api, svc, &desired, e.outline()).await?;
            let provisioning = e.provisioning;
            let left = ctx
                .settings
                .resync
                .saturating_sub(now.duration_since(e.verified_at));
            if refreshed && let Ok(mut c) = ctx.cache.lock() {
                c.insert(sref.uid.clone(), e);
            }
            if provisioning {
                return Ok((
                    Action::requeue(ctx.settings.provisioning_requeue),
                    outcome::VERIFIED,
                ));
            }
            let result = if refreshed {
                outcome::VERIFIED
            } else {
                outcome::UNCHANGED
            };
            return Ok((
                Action::requeue(jittered(left.max(Duration::from_secs(1)))),
                result,
            ));
        }
        Some(e) => {
            let observed = e.observed();
            let plan = provider.plan(&desired, &observed)?;
            (observed, e.verified_at, plan)
        }
        None if untouched => {
            let observed = crate::provider::Observed::default();
            let plan = provider.plan(&desired, &observed)?;
            (observed, now, plan)
        }
        None => {
            let observed = provider.observe(&desired).await?;
            let plan = provider.plan(&desired, &observed)?;
            (observed, now, plan)
        }
    };

    let observed = if plan.is_empty() {
        observed
    } else {
        tracing::info!(ops = ?plan.ops, "applying");
        if !plan.ops.iter().all(plan::Op::is_target_change) {
            publish(
                &ctx.recorder,
                svc,
                false,
                events::ENSURING,
                format!("Ensuring load balancer ({} change(s))", plan.ops.len()),
            )
            .await;
        }
        match provider.apply(&desired, &observed, &plan).await {
            Ok(o) => o,
            Err(e) => {
                if let Ok(mut c) = ctx.cache.lock() {
                    c.remove(&sref.uid);
                }
                return Err(e.into());
            }
        }
    };
    let provisioning = is_provisioning(&observed);
    if let Ok(mut c) = ctx.cache.lock() {
        c.insert(
            sref.uid.clone(),
            CacheEntry::new(
                fingerprint,
                observed.clone(),
                kind,
                verified_at,
                provisioning,
                &ctx.interners,
            ),
        );
    }
    write_status(&ctx.metrics, &api, svc, &desired, &observed).await?;
    if !plan.is_empty() {
        let dns = observed
            .lb
            .as_ref()
            .map(|l| l.dns_name.clone())
            .unwrap_or_default();
        if plan.ops.iter().all(plan::Op::is_target_change) {
            tracing::info!("targets updated");
        } else {
            publish(
                &ctx.recorder,
                svc,
                false,
                events::ENSURED,
                format!("Ensured load balancer {dns}"),
            )
            .await;
        }
    }
    let result = if plan.is_empty() {
        outcome::VERIFIED
    } else {
        outcome::APPLIED
    };
    if provisioning {
        return Ok((Action::requeue(ctx.settings.provisioning_requeue), result));
    }
    Ok((Action::requeue(jittered(ctx.settings.resync)), result))
}

async fn write_status(
    metrics: &crate::telemetry::Metrics,
    api: &Api<Service>,
    svc: &Service,
    desired: &Desired,
    observed: &crate::provider::Observed,
) -> Result<(), kube::Error> {
    let want = status::desired_ingress(desired.lb.as_ref(), observed);
    if status::ingress_matches(svc, &want) {
        return Ok(());
    }
    let ingress = if want.is_empty() {
        serde_json::Value::Null
    } else {
        json!(want)
    };
    let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    api.patch_status(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    metrics.status_written();
    tracing::info!(ingress = ?want, "status updated");
    Ok(())
}

/// The name the Service's load balancer has: the cached one, the `name` annotation, or the
/// generated one.
fn cleanup_name(
    ctx: &Context,
    svc: &Service,
    sref: &ServiceRef,
    cached: Option<&CacheEntry>,
) -> String {
    if let Some(lb) = cached.and_then(|e| e.outline().lb.as_ref()) {
        return lb.name.clone();
    }
    let ann = svc.annotations();
    let setting = annotations::setting(annotations::NAME);
    let given = setting.and_then(|s| {
        std::iter::once(s.key())
            .chain(s.aliases.iter().map(|a| a.to_string()))
            .find_map(|k| ann.get(&k).cloned())
    });
    match given {
        Some(n) if naming::validate_lb_name(n.trim()).is_ok() => n.trim().to_string(),
        _ => build::lb_name(&ctx.settings.cluster, sref, None),
    }
}

/// The provider recorded on the Service ([`PROVIDER_ANNOTATION`]); `None` before the first
/// write (or on a Service from a version that did not record it).
fn recorded_provider(svc: &Service) -> Option<ProviderKind> {
    match svc
        .annotations()
        .get(PROVIDER_ANNOTATION)
        .map(String::as_str)
    {
        Some("aws") => Some(ProviderKind::Aws),
        Some("local") => Some(ProviderKind::Local),
        Some(other) => {
            tracing::warn!(value = other, "unknown {PROVIDER_ANNOTATION}; ignored");
            None
        }
        None => None,
    }
}

async fn record_provider(
    api: &Api<Service>,
    svc: &Service,
    kind: ProviderKind,
) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"annotations": {PROVIDER_ANNOTATION: kind.to_string()}}});
    api.patch(
        &svc.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// The Service's class now names another provider than the one holding its load balancer: the
/// old provider's resources are deleted (the empty model through the same path), then the new
/// provider is recorded and the next reconcile creates the load balancer there. The address
/// changes either way; two load balancers never serve the Service at once.
async fn switch_provider(
    svc: &Service,
    sref: ServiceRef,
    ctx: &Context,
    held: ProviderKind,
    wanted: ProviderKind,
) -> Result<(Action, &'static str), Error> {
    if ctx.providers.get(held).is_none() {
        let msg = format!(
            "the load balancer of this Service is held by provider {held}, which this operator instance does not run, and its class now names provider {wanted}; start cloudlb with provider {held} enabled so it can remove the old load balancer first. Nothing was changed."
        );
        return Ok((invalid(ctx, svc, msg).await, outcome::INVALID));
    }
    tracing::info!(%held, %wanted, "class moved to another provider; removing the old load balancer");
    if let Some(stop) = remove_load_balancer(svc, &sref, ctx, held).await? {
        return Ok(stop);
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    record_provider(&api, svc, wanted).await?;
    if let Ok(mut c) = ctx.cache.lock() {
        c.remove(&sref.uid);
    }
    // Our own annotation write brings the Service back; the requeue is the safety net.
    Ok((
        Action::requeue(ctx.settings.provisioning_requeue),
        outcome::APPLIED,
    ))
}

/// The Service no longer wants our load balancer: apply the empty model, clear the status, drop
/// the finalizer.
async fn cleanup(
    svc: &Service,
    sref: ServiceRef,
    ctx: &Context,
) -> Result<(Action, &'static str), Error> {
    let cached = ctx
        .cache
        .lock()
        .ok()
        .and_then(|c| c.get(&sref.uid).map(|e| e.provider));
    // The provider of record; before it was recorded, what this process used; else AWS.
    let kind = recorded_provider(svc)
        .or(cached)
        .unwrap_or(ProviderKind::Aws);
    if let Some(stop) = remove_load_balancer(svc, &sref, ctx, kind).await? {
        return Ok(stop);
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    let remaining: Vec<String> = svc
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    match set_finalizers(&api, svc, remaining, None).await {
        Ok(_) => {}
        // Already gone: nothing left to release.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    if let Ok(mut c) = ctx.cache.lock() {
        c.remove(&sref.uid);
    }
    tracing::info!("load balancer cleaned up; finalizer removed");
    Ok((Action::await_change(), outcome::CLEANED_UP))
}

/// Deletes what provider `kind` holds for the Service and clears its status. `Some(result)`:
/// stop with it (deletion protection); `None`: nothing of ours is left there.
async fn remove_load_balancer(
    svc: &Service,
    sref: &ServiceRef,
    ctx: &Context,
    kind: ProviderKind,
) -> Result<Option<(Action, &'static str)>, Error> {
    let cached = ctx
        .cache
        .lock()
        .ok()
        .and_then(|c| c.get(&sref.uid).cloned())
        .filter(|e| e.provider == kind);
    let sref = sref.clone();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    if let Some(provider) = ctx.providers.get(kind) {
        let desired = Desired::empty(sref.clone(), cleanup_name(ctx, svc, &sref, cached.as_ref()));
        // What this process applied and still trusts needs no re-read (a delete wave would
        // otherwise cost a full observe per Service); after a restart, a failed apply or a due
        // drift check, read the cloud.
        let trusted = cached.as_ref().filter(|e| {
            !e.stale && !e.provisioning && e.verified_at.elapsed() < ctx.settings.resync
        });
        let observed = match trusted {
            Some(e) => e.observed(),
            None => {
                let mut observed = provider.observe(&desired).await?;
                // Target groups the cache knows about but the load balancer no longer references.
                if let Some(e) = &cached {
                    for tg in e.observed().target_groups {
                        if !observed.target_groups.iter().any(|t| t.arn == tg.arn) {
                            observed.target_groups.push(tg);
                        }
                    }
                }
                observed
            }
        };
        let plan = match provider.plan(&desired, &observed) {
            Ok(p) => p,
            Err(e @ PlanError::DeletionProtected { .. }) => {
                publish(&ctx.recorder, svc, true, events::DELETING, e.to_string()).await;
                return Ok(Some((
                    Action::requeue(Duration::from_secs(300)),
                    outcome::PROTECTED,
                )));
            }
        };
        if !plan.is_empty() {
            publish(
                &ctx.recorder,
                svc,
                false,
                events::DELETING,
                "Deleting load balancer".into(),
            )
            .await;
            if let Err(e) = provider.apply(&desired, &observed, &plan).await {
                // Read the cloud again next time, but keep what the cache knows: target groups
                // whose load balancer is already gone are found only through it.
                if let Ok(mut c) = ctx.cache.lock()
                    && let Some(entry) = c.get_mut(&sref.uid)
                {
                    entry.stale = true;
                }
                return Err(e.into());
            }
        }
        write_status(&ctx.metrics, &api, svc, &desired, &Default::default()).await?;
        if !plan.is_empty() {
            publish(
                &ctx.recorder,
                svc,
                false,
                events::DELETED,
                "Deleted load balancer".into(),
            )
            .await;
        }
    }
    Ok(None)
}
