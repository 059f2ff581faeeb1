//! The Service reconciler: Service (+ class + annotations) → config → desired model → plan →
//! apply → status, and the same path with the empty model to clean up.

use super::decide::{Basis, decide, deletion_basis};
use super::events::{self, EventType, publish};
use super::readiness::{self, Gated};
use super::{CacheEntry, Context, FINALIZER, INSTALLATION_ANNOTATION, PROVIDER_ANNOTATION, status};
use crate::build::{self, BuildError};
use crate::config::LbConfig;
use crate::config::{self, annotations, class::ProviderKind};
use crate::model::state::{
    self, DEFAULT_SCHEME_ANNOTATION, TAG_KEYS_ANNOTATION, has_finalizer, recorded_installation,
};
use crate::model::{Desired, ServiceRef, TargetMode, naming};
use crate::ownership::Ownership;
use crate::plan::{Plan, PlanError};
use crate::provider::{LbState, Observed, Provider, ProviderError};
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use rand::Rng;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
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

fn uid(svc: &Service) -> &str {
    svc.metadata.uid.as_deref().unwrap_or_default()
}

pub async fn reconcile(svc: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = tracing::info_span!("reconcile", service = %key(&svc));
    async move {
        let started = Instant::now();
        let result = reconcile_inner(&svc, &ctx).await;
        let outcome = match &result {
            Ok((_, outcome)) => outcome.as_str(),
            Err(e) => e.category(),
        };
        ctx.metrics
            .reconciled(outcome, started.elapsed().as_secs_f64());
        let managed = ctx.memory.managed_load_balancers();
        ctx.metrics
            .set_managed_load_balancers(i64::try_from(managed).unwrap_or(i64::MAX));
        match &result {
            Ok(_) => ctx.memory.with(uid(&svc), |m| m.failures = 0),
            Err(e) => {
                tracing::warn!(error = %e, "reconcile failed");
                let reason = if svc.metadata.deletion_timestamp.is_some() {
                    events::DELETING
                } else {
                    events::SYNC_FAILED
                };
                let note = format!("Error syncing load balancer: {e}");
                publish(&ctx.recorder, &svc, EventType::Warning, reason, note).await;
            }
        }
        result.map(|(action, _)| action)
    }
    .instrument(span)
    .await
}

/// Per-Service exponential backoff: 5 s, 10 s, … capped at 5 min.
pub fn error_policy(svc: Arc<Service>, _err: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.memory.with(uid(&svc), |m| {
        m.failures = m.failures.saturating_add(1);
        m.failures
    });
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

/// The annotation changes of an ownership write: a value to set, or `None` to remove.
pub(super) type AnnotationChanges = Vec<(&'static str, Option<String>)>;

/// The changes as a merge patch's `metadata.annotations` (`null` removes).
fn merge_annotations(changes: AnnotationChanges) -> serde_json::Value {
    changes
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Sets the finalizer list and makes the annotation `changes`, in one write that fails (to be
/// retried) if the finalizers changed meanwhile.
async fn write_ownership(
    api: &Api<Service>,
    svc: &Service,
    finalizers: Vec<String>,
    changes: AnnotationChanges,
) -> Result<(), kube::Error> {
    let current = svc.finalizers();
    let present = svc.metadata.annotations.as_ref();
    let patch = if current.is_empty() {
        // Nothing to compare with: the resourceVersion makes this an optimistic update.
        Patch::Merge(json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": svc.resource_version(),
            "annotations": merge_annotations(changes),
        }}))
    } else {
        // Conflicts only when the finalizer list itself changed meanwhile (our own status
        // write changes the resourceVersion, not the list).
        let mut ops = vec![
            json!({"op": "test", "path": "/metadata/finalizers", "value": current}),
            json!({"op": "replace", "path": "/metadata/finalizers", "value": finalizers}),
        ];
        let set: serde_json::Map<String, serde_json::Value> = changes
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), json!(v.as_ref()?))))
            .collect();
        if present.is_none() && !set.is_empty() {
            ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": set}));
        } else {
            for (key, value) in &changes {
                let path = format!(
                    "/metadata/annotations/{}",
                    key.replace('~', "~0").replace('/', "~1")
                );
                match value {
                    Some(v) => ops.push(json!({"op": "add", "path": path, "value": v})),
                    None if present.is_some_and(|a| a.contains_key(*key)) => {
                        ops.push(json!({"op": "remove", "path": path}));
                    }
                    None => {}
                }
            }
        }
        let ops: json_patch::Patch =
            serde_json::from_value(json!(ops)).map_err(kube::Error::SerdeError)?;
        Patch::Json(ops)
    };
    api.patch(&svc.name_any(), &PatchParams::default(), &patch)
        .await?;
    Ok(())
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
    tell(ctx, svc, events::INVALID, message).await;
    Action::await_change()
}

/// One Warning Event with `message`, only when it differs from the last one told.
async fn tell(ctx: &Context, svc: &Service, reason: &'static str, message: String) {
    let changed = ctx.memory.with(uid(svc), |m| {
        m.last_invalid.replace(message.clone()).as_deref() != Some(message.as_str())
    });
    if changed {
        tracing::info!(reason, %message, "told the Service");
        publish(&ctx.recorder, svc, EventType::Warning, reason, message).await;
    }
}

/// How a reconcile ended (metrics label `result`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Cloud changes were applied (or the status written).
    Applied,
    /// Nothing to do and no cloud call made.
    Unchanged,
    /// Read the cloud; it matched.
    Verified,
    Invalid,
    NotOurs,
    CleanedUp,
    Protected,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Unchanged => "unchanged",
            Outcome::Verified => "verified",
            Outcome::Invalid => "invalid",
            Outcome::NotOurs => "not_ours",
            Outcome::CleanedUp => "cleaned_up",
            Outcome::Protected => "deletion_protected",
        }
    }
}

/// resolve → build → own → decide → observe → plan → apply → write status.
async fn reconcile_inner(svc: &Service, ctx: &Context) -> Result<(Action, Outcome), Error> {
    let target = match resolve(svc, ctx) {
        Resolved::Ours(t) => t,
        Resolved::NotOurs => return Ok((Action::await_change(), Outcome::NotOurs)),
        Resolved::Release(sref) => return cleanup(svc, sref, ctx).await,
        Resolved::Invalid(msg) => return Ok((invalid(ctx, svc, msg).await, Outcome::Invalid)),
        Resolved::Told(reason, msg) => {
            tell(ctx, svc, reason, msg).await;
            return Ok((Action::await_change(), Outcome::NotOurs));
        }
    };
    let (desired, gated) = match build_model(svc, ctx, &target).await {
        Ok(Some(built)) => built,
        Ok(None) => return Ok((Action::await_change(), Outcome::NotOurs)),
        Err(msg) => return Ok((invalid(ctx, svc, msg).await, Outcome::Invalid)),
    };
    let untouched = untouched(svc, ctx, &target);
    if let Some(stop) = take_ownership(svc, ctx, &target, &desired).await? {
        return Ok(stop);
    }
    let (action, outcome) = converge(svc, ctx, &target, &desired, untouched).await?;
    // A replaced load balancer serves for its grace period, then goes (after the status moved).
    let action = match super::replace::retire(svc, ctx, &target, &desired).await? {
        Some(check_again) if super::replace::replacing(svc, &target, &desired).is_none() => {
            check_again
        }
        _ => action,
    };
    if follow_gates(ctx, &target, &desired, &gated).await {
        return Ok((Action::requeue(readiness::POLL), outcome));
    }
    Ok((action, outcome))
}

/// decide → observe → plan → apply → write status, for a Service of ours and its model.
async fn converge(
    svc: &Service,
    ctx: &Context,
    target: &Target,
    desired: &Desired,
    untouched: bool,
) -> Result<(Action, Outcome), Error> {
    if let Some(old) = super::replace::replacing(svc, target, desired) {
        return super::replace::step(svc, ctx, target, desired, old).await;
    }
    let (uid, fingerprint, now) = (&target.sref.uid, desired.fingerprint(), Instant::now());
    // What memory holds of another load balancer (a replaced one) is no basis for this one.
    let mut memory = ctx.memory.cloud(uid).filter(|e| {
        e.outline()
            .lb
            .as_ref()
            .is_none_or(|l| l.name == desired.lb_name)
    });
    let remembered = memory
        .as_ref()
        .map(|e| e.remembered(&fingerprint, target.kind, now));
    let remembered = match remembered {
        // After a start (nothing remembered, not even a failure): the checkpoint, if it fits.
        None if ctx.memory.with(uid, |m| m.failures == 0) => {
            memory = super::checkpoint::load(svc, ctx, target, desired, &fingerprint);
            memory
                .as_ref()
                .map(|e| e.remembered(&fingerprint, target.kind, now))
        }
        r => r,
    };
    let decision = decide(remembered, untouched, ctx.settings.resync);
    // A due drift check waits for its turn (they are spread over the resync window), serving
    // from memory meanwhile; one for a changed model or after a failure does not wait.
    let drift_due = remembered.is_some_and(|r| {
        r.same_model
            && r.same_provider
            && !r.stale
            && !r.provisioning
            && r.age >= ctx.settings.resync
    });
    if drift_due
        && let Some(e) = memory.clone()
        && let Some(wait) = ctx.memory.drift_turn(uid, now, ctx.settings.resync)
    {
        tracing::debug!(wait_ms = wait.as_millis(), "drift check waits for its turn");
        return trusted(svc, ctx, target, desired, e, false, Some(wait)).await;
    }
    if decision.poll_state
        && let Some(e) = memory.as_mut()
    {
        poll_state(ctx, target, desired, e).await?;
    }
    // Applied against what a checkpoint says (confirmed target groups): still unverified after.
    let mut checkpointed = false;
    let (observed, verified_at) = match (decision.basis, memory) {
        (Basis::Trusted, Some(e)) => {
            return trusted(svc, ctx, target, desired, e, decision.poll_state, None).await;
        }
        // Unless the change needs what a drift check did not read (the load balancer's
        // attributes, for a model that sets some now, or a scheme change).
        (Basis::Memory, Some(e)) if !e.outline().misses_lb_attributes(desired) => {
            (e.observed(), e.verified_at)
        }
        (Basis::Checkpoint, Some(e)) => {
            let remembered = e.observed();
            if super::checkpoint::targets_only(target, desired, &e, &remembered).await? {
                checkpointed = true;
                (remembered, e.verified_at)
            } else {
                (
                    target.provider.observe_known(desired, &remembered).await?,
                    now,
                )
            }
        }
        (Basis::Nothing, _) => (Observed::default(), now),
        // What memory knows is read again by id (a drift check: batched with others'); the
        // ids are all in the outline, no need to expand the targets.
        (_, Some(e)) => (
            target.provider.observe_known(desired, e.outline()).await?,
            now,
        ),
        (_, None) => (target.provider.observe(desired).await?, now),
    };
    if let Some(stop) = super::replace::start(svc, ctx, target, desired, &observed).await? {
        return Ok(stop);
    }
    let plan = target.provider.plan(desired, &observed)?;
    let invalidated = !super::checkpoint::invalidate(svc, &plan).is_empty();
    let observed = apply(svc, ctx, target, desired, observed, &plan).await?;
    if !plan.is_empty() {
        tell_backend_notes(svc, ctx, &observed).await;
        warn_about(ctx, svc, events::TARGETS_OUTSIDE_VPC, &observed.outside_vpc, |t| {
            format!(
                "Not registered: {} target(s) outside the load balancer's VPC: {} (for example host-network pods on nodes in another VPC); the other targets are registered",
                t.len(),
                t.join(", ")
            )
        })
        .await;
    }
    let provisioning = remember(ctx, target, fingerprint.clone(), &observed, verified_at);
    if checkpointed {
        ctx.memory.with(uid, |m| {
            if let Some(c) = m.cloud.as_mut() {
                c.unverified = true;
            }
        });
    }
    write_status(&ctx.metrics, &target.api(ctx), svc, desired, &observed).await?;
    let mut record: AnnotationChanges = Vec::new();
    let tag_keys = TagKeys::of(svc, target, desired);
    if tag_keys.before_write != tag_keys.wanted {
        // The keys no longer wanted are off the resources: no longer ours to remove.
        let value = state::tag_keys_value(&tag_keys.wanted);
        record.push((TAG_KEYS_ANNOTATION, value));
    }
    record.extend(super::checkpoint::record(
        svc,
        target,
        &fingerprint,
        &observed,
        invalidated,
    ));
    if !record.is_empty() {
        annotate(&target.api(ctx), svc, record).await?;
    }
    announce(svc, ctx, &plan, &observed).await;
    let result = if plan.is_empty() {
        Outcome::Verified
    } else {
        Outcome::Applied
    };
    Ok((next_check(ctx, provisioning, ctx.settings.resync), result))
}

/// Remembers what exists after a reconcile; returns whether it is still provisioning.
pub(super) fn remember(
    ctx: &Context,
    t: &Target,
    fingerprint: String,
    observed: &Observed,
    verified_at: Instant,
) -> bool {
    let provisioning = is_provisioning(observed);
    let (observed, interners) = (observed.clone(), &ctx.memory.interners);
    let entry = CacheEntry::new(
        fingerprint,
        observed,
        t.kind,
        verified_at,
        provisioning,
        interners,
    );
    ctx.memory.set_cloud(&t.sref.uid, Some(entry));
    provisioning
}

/// A Service of ours, resolved against its class.
pub(super) struct Target {
    pub(super) sref: ServiceRef,
    class_name: String,
    pub(super) kind: ProviderKind,
    pub(super) provider: Arc<dyn Provider>,
    pub(super) cfg: LbConfig,
}

impl Target {
    pub(super) fn api(&self, ctx: &Context) -> Api<Service> {
        Api::namespaced(ctx.client.clone(), &self.sref.namespace)
    }
}

enum Resolved {
    Ours(Box<Target>),
    /// Not a Service we act on (another class, not a load balancer, not complete).
    NotOurs,
    /// Carries our finalizer but no longer wants our load balancer: clean up.
    Release(ServiceRef),
    Invalid(String),
    /// Left alone, told once with a Warning Event (`reason`, message): a class-less Service
    /// another controller may act on, or one whose class is no longer served.
    Told(&'static str, String),
}

/// The Service's class, provider and configuration.
fn resolve(svc: &Service, ctx: &Context) -> Resolved {
    let Ok(sref) = build::service_ref(svc) else {
        return Resolved::NotOurs;
    };
    let classes = ctx.served_classes();
    let class = match ctx.ownership(svc, &classes) {
        Ownership::Ours { class, .. } => class,
        Ownership::NotOurs => return Resolved::NotOurs,
        Ownership::Release => return Resolved::Release(sref),
        Ownership::Declined { class, reason } => {
            return Resolved::Told(events::NOT_ADOPTED, reason.message(&class.name_any()));
        }
        Ownership::Unserved { class } => {
            return Resolved::Told(events::CLASS_NOT_SERVED, unserved(class, ctx));
        }
    };
    let class_name = class.name_any();
    let kind = class.spec.provider;
    let Some(provider) = ctx.providers.get(kind) else {
        return Resolved::Invalid(format!(
            "LoadBalancerClass {class_name} uses provider {kind}, which this operator instance does not run; start cloudlb with that provider enabled"
        ));
    };
    match config::resolve(class, svc) {
        Ok(cfg) => Resolved::Ours(Box::new(Target {
            sref,
            class_name,
            kind,
            provider,
            cfg,
        })),
        Err(errors) => Resolved::Invalid(format!(
            "Not provisioning the load balancer (class {class_name}): {errors}. Nothing was changed."
        )),
    }
}

/// The message for a Service of ours whose class (`None`: a default class) this installation no
/// longer serves.
fn unserved(class: Option<String>, ctx: &Context) -> String {
    let installation = &ctx.settings.installation;
    let what = match class {
        Some(c) => format!(
            "its LoadBalancerClass {c} is not served by cloudlb installation {installation} (deleted, or left out of --classes)"
        ),
        None => format!(
            "no default LoadBalancerClass is served by cloudlb installation {installation} any more (deleted, no longer default, or left out of --classes)"
        ),
    };
    format!(
        "The load balancer of this Service is kept as it is, unmanaged: {what}. Create the class again to manage it; deleting the Service still deletes its load balancer."
    )
}

/// The desired model (`None`: the Service is not complete yet, e.g. no nodePorts); a Warning
/// Event when the set of nodes left out, or of ports without a ready pod, changes.
async fn build_model(
    svc: &Service,
    ctx: &Context,
    t: &Target,
) -> Result<Option<(Desired, Vec<Gated>)>, String> {
    // The stores' Arcs: a reconcile never copies the Node or EndpointSlice objects.
    let nodes = ctx.nodes.state();
    let pods = build::target_mode(&t.cfg) == TargetMode::Pods;
    let slices = ctx
        .endpoints
        .slices_for(&t.sref.namespace, &t.sref.name, pods);
    let gated = if pods && readiness::may_wait(&slices) {
        gated_pods(ctx, svc).await
    } else {
        Vec::new()
    };
    let waiting = readiness::target_ips(&gated);
    let backends = build::Backends {
        nodes: &nodes,
        endpoint_slices: &slices,
        gate_waiting: &waiting,
    };
    let built = match build::build(&ctx.settings.cluster, svc, backends, &t.cfg) {
        Ok(b) => b,
        Err(BuildError::Incomplete) => return Ok(None),
        Err(BuildError::Invalid(m)) => {
            return Err(format!(
                "Not provisioning the load balancer (class {}): {m}. Nothing was changed.",
                t.class_name
            ));
        }
    };
    ctx.memory.with(&t.sref.uid, |m| m.last_invalid = None);
    let skipped = built.warnings.join("; ");
    warn_on_change(ctx, svc, events::TARGETS_SKIPPED, skipped).await;
    let ports: Vec<String> = built
        .no_ready_endpoints
        .iter()
        .map(u16::to_string)
        .collect();
    warn_about(ctx, svc, events::NO_READY_ENDPOINTS, &ports, |p| {
        format!(
            "No ready pod behind port(s) {}: their target groups are empty, the load balancer is kept; pods are registered as they become ready",
            p.join(", ")
        )
    })
    .await;
    let keys: Vec<&str> = annotations::unsupported(svc.annotations().keys());
    warn_about(ctx, svc, events::UNSUPPORTED_ANNOTATION, &keys, |k| {
        format!(
            "Ignored {} annotation(s) cloudlb does not understand: {}. The load balancer is built from the rest; the supported keys are in docs/annotations.md",
            k.len(),
            k.join(", ")
        )
    })
    .await;
    Ok(Some((built.desired, gated)))
}

/// The Service's pods that carry its readiness gate (one pod list, by the Service's selector);
/// none when they cannot be listed (said in the log: the gates then wait for the next try).
async fn gated_pods(ctx: &Context, svc: &Service) -> Vec<Gated> {
    let Some(selector) = readiness::selector(svc) else {
        return Vec::new();
    };
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &svc.namespace().unwrap_or_default());
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => readiness::gated(&list.items, &readiness::condition_type(&svc.name_any())),
        Err(e) => {
            tracing::warn!(error = %kube_message(&e), "cannot list the pods for their readiness gates");
            Vec::new()
        }
    }
}

/// The pods waiting for their readiness gate whose targets are healthy in every target group of
/// the Service get the gate's condition (one health read per target group, only while a pod
/// waits). Returns whether a pod still waits (for its containers or its targets): then the
/// Service is looked at again after [`readiness::POLL`].
async fn follow_gates(ctx: &Context, t: &Target, desired: &Desired, gated: &[Gated]) -> bool {
    if gated.iter().all(|g| g.passed) {
        return false;
    }
    let waiting = gated.iter().filter(|g| g.waiting()).count();
    let (Some(lb), Some(entry)) = (&desired.lb, ctx.memory.cloud(&t.sref.uid)) else {
        return true;
    };
    if waiting == 0 {
        return true;
    }
    let targets: BTreeMap<String, BTreeSet<crate::model::Target>> = lb
        .target_groups
        .iter()
        .map(|tg| (tg.name.clone(), tg.targets.clone()))
        .collect();
    let names: Vec<String> = targets.keys().cloned().collect();
    let healthy = match t.provider.healthy_targets(&entry.observed(), &names).await {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the target health for the readiness gates");
            return true;
        }
    };
    let gate = readiness::condition_type(&t.sref.name);
    let passed = readiness::passed(gated, &targets, &healthy);
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &t.sref.namespace);
    let mut done = 0;
    for pod in &passed {
        let status = json!({"status": {"conditions": [{
            "type": gate,
            "status": "True",
            "reason": "TargetHealthy",
            "message": format!("healthy in the load balancer's {} target group(s)", names.len()),
            "lastTransitionTime": k8s_openapi::jiff::Timestamp::now(),
        }]}});
        match api
            .patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Strategic(status),
            )
            .await
        {
            Ok(_) => {
                done += 1;
                tracing::info!(pod = %pod.name, gate, "readiness gate passed: its targets are healthy");
            }
            Err(e) => {
                tracing::warn!(pod = %pod.name, error = %kube_message(&e), "cannot set the readiness gate's condition")
            }
        }
    }
    gated.iter().filter(|g| !g.passed).count() > done
}

/// What the apply could not do for the targets' security groups (a Warning Event when it
/// changes), with instance ids named by their nodes.
async fn tell_backend_notes(svc: &Service, ctx: &Context, observed: &Observed) {
    let mut message = observed.notes.join("; ");
    if !message.is_empty() {
        for node in ctx.nodes.state() {
            if let (Some(id), Some(name)) = (build::instance_id(&node), node.metadata.name.as_ref())
            {
                message = message.replace(
                    &format!("instance {id}"),
                    &format!("node {name} (instance {id})"),
                );
            }
        }
        message = format!(
            "The load balancer is not admitted by these targets' security groups (the other targets are): {message}"
        );
    }
    warn_on_change(ctx, svc, events::BACKEND_RULES_SKIPPED, message).await;
}

/// A Warning Event `reason` saying `message`, when the message differs from the last one of that
/// reason ("" is none: nothing is said, and the next problem is told again).
/// [`warn_on_change`] about a list: the message `say` makes of `items`, none when it is empty.
async fn warn_about<T>(
    ctx: &Context,
    svc: &Service,
    reason: &'static str,
    items: &[T],
    say: impl FnOnce(&[T]) -> String,
) {
    let message = if items.is_empty() {
        String::new()
    } else {
        say(items)
    };
    warn_on_change(ctx, svc, reason, message).await;
}

pub(super) async fn warn_on_change(
    ctx: &Context,
    svc: &Service,
    reason: &'static str,
    message: String,
) {
    let changed = ctx.memory.with(uid(svc), |m| m.warned(reason, &message));
    if !message.is_empty() && changed {
        tracing::warn!(reason, %message, "told the Service");
        publish(&ctx.recorder, svc, EventType::Warning, reason, message).await;
    }
}

/// Nothing of ours can exist for a Service that has never carried our finalizer (it goes on
/// before the first cloud write) and that this process has not touched yet (so the store cannot
/// be behind our own write), as long as every name derives from its UID: the first reconcile of
/// a new Service needs no cloud read.
fn untouched(svc: &Service, ctx: &Context, t: &Target) -> bool {
    !has_finalizer(svc)
        && t.cfg.name.is_none()
        && ctx
            .memory
            .with(&t.sref.uid, |m| m.cloud.is_none() && m.failures == 0)
}

/// The finalizer and the provider of record go on before the first cloud write. `Some`: the
/// class moved to another provider and this reconcile ends with removing the old one's
/// resources.
async fn take_ownership(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
) -> Result<Option<(Action, Outcome)>, Error> {
    let held = recorded_provider(svc);
    let installation = &ctx.settings.installation;
    let mut record: AnnotationChanges = Vec::new();
    if recorded_installation(svc) != Some(installation.as_str()) {
        record.push((INSTALLATION_ANNOTATION, Some(installation.clone())));
    }
    if held.is_none() {
        record.push((PROVIDER_ANNOTATION, Some(t.kind.to_string())));
    }
    if state::made_by_an_earlier_version(svc) {
        // Its load balancer was made under the old default scheme: keep it (see
        // config::default_scheme), now that the installation record ends "earlier version".
        record.push((DEFAULT_SCHEME_ANNOTATION, Some("internet-facing".into())));
    }
    record.extend(super::replace::serving_record(svc, t, desired));
    let tag_keys = TagKeys::of(svc, t, desired);
    if tag_keys.grows() {
        // Before a write puts new keys on: a crash after it still knows them as ours.
        record.push((
            TAG_KEYS_ANNOTATION,
            state::tag_keys_value(&tag_keys.before_write),
        ));
    }
    if !has_finalizer(svc) {
        // A new Service: finalizer and record in one write.
        let mut f = svc.finalizers().to_vec();
        f.push(FINALIZER.to_string());
        write_ownership(&t.api(ctx), svc, f, record).await?;
    } else if !record.is_empty() {
        // Ours from a version that recorded less.
        annotate(&t.api(ctx), svc, record).await?;
    }
    match held {
        Some(held) if held != t.kind => {
            let switched = switch_provider(svc, t.sref.clone(), ctx, held, t.kind).await?;
            Ok(Some(switched))
        }
        _ => Ok(None),
    }
}

/// The user tag keys of record ([`TAG_KEYS_ANNOTATION`]): AWS load balancers only.
struct TagKeys {
    recorded: BTreeSet<String>,
    /// The user tag keys the model wants.
    wanted: BTreeSet<String>,
    /// The record while a reconcile writes: the recorded keys plus the wanted ones.
    before_write: BTreeSet<String>,
}

impl TagKeys {
    fn of(svc: &Service, t: &Target, desired: &Desired) -> Self {
        let recorded = state::recorded_tag_keys(svc);
        let wanted: BTreeSet<String> = match (&desired.lb, t.kind) {
            (Some(lb), ProviderKind::Aws) => crate::model::tags::user_tags(&lb.tags)
                .into_keys()
                .collect(),
            _ => BTreeSet::new(),
        };
        let before_write = recorded.union(&wanted).cloned().collect();
        TagKeys {
            recorded,
            wanted,
            before_write,
        }
    }

    /// Whether the record must grow before the next write.
    fn grows(&self) -> bool {
        self.before_write != self.recorded
    }
}

/// While provisioning, only the load balancer's state is read again (one call, not a full
/// observe).
async fn poll_state(
    ctx: &Context,
    t: &Target,
    desired: &Desired,
    e: &mut CacheEntry,
) -> Result<(), Error> {
    let observed = t.provider.refresh_state(desired, &e.observed()).await?;
    let provisioning = is_provisioning(&observed);
    let (fingerprint, interners) = (e.fingerprint.clone(), &ctx.memory.interners);
    *e = CacheEntry::new(
        fingerprint,
        observed,
        e.provider,
        e.verified_at,
        provisioning,
        interners,
    );
    Ok(())
}

/// Unchanged: no cloud call at all (beyond the state poll while provisioning), only the status.
/// The next check: the drift check when due, or at `turn` (a due drift check's turn).
async fn trusted(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
    e: CacheEntry,
    polled: bool,
    turn: Option<Duration>,
) -> Result<(Action, Outcome), Error> {
    write_status(&ctx.metrics, &t.api(ctx), svc, desired, e.outline()).await?;
    if !e.unverified
        && let Some(change) = super::checkpoint::record(svc, t, &e.fingerprint, e.outline(), false)
    {
        annotate(&t.api(ctx), svc, vec![change]).await?;
    }
    let (provisioning, age) = (e.provisioning, e.verified_at.elapsed());
    if polled {
        ctx.memory.set_cloud(&t.sref.uid, Some(e));
    }
    let result = if polled || provisioning {
        Outcome::Verified
    } else {
        Outcome::Unchanged
    };
    if let Some(turn) = turn {
        // Exactly then: a jittered requeue could come before the turn.
        return Ok((Action::requeue(turn + Duration::from_millis(10)), result));
    }
    let left = ctx.settings.resync.saturating_sub(age);
    Ok((next_check(ctx, provisioning, left), result))
}

/// Executes a non-empty plan; when that fails, the cloud state is forgotten so the next reconcile
/// reads it again.
pub(super) async fn apply(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
    observed: Observed,
    plan: &Plan,
) -> Result<Observed, Error> {
    if plan.is_empty() {
        return Ok(observed);
    }
    tracing::info!(ops = ?plan.ops, "applying");
    if !plan.changes_only_targets() {
        let note = format!("Ensuring load balancer ({} change(s))", plan.ops.len());
        publish(
            &ctx.recorder,
            svc,
            EventType::Normal,
            events::ENSURING,
            note,
        )
        .await;
    }
    let invalidate = super::checkpoint::invalidate(svc, plan);
    if !invalidate.is_empty() {
        annotate(&t.api(ctx), svc, invalidate).await?;
    }
    t.provider
        .apply(desired, &observed, plan)
        .await
        .inspect_err(|_| ctx.memory.set_cloud(&t.sref.uid, None))
        .map_err(Error::from)
}

/// Tells about an applied plan: writes that only (de)register targets (node changes) in the log
/// only, anything else also in an Event.
async fn announce(svc: &Service, ctx: &Context, plan: &Plan, observed: &Observed) {
    if plan.is_empty() {
        return;
    }
    if plan.changes_only_targets() {
        tracing::info!("targets updated");
        return;
    }
    let note = format!("Ensured load balancer {}", observed.dns_name());
    publish(&ctx.recorder, svc, EventType::Normal, events::ENSURED, note).await;
}

/// The next reconcile: soon while provisioning, else the drift check after `left`.
fn next_check(ctx: &Context, provisioning: bool, left: Duration) -> Action {
    if provisioning {
        Action::requeue(ctx.settings.provisioning_requeue)
    } else {
        Action::requeue(jittered(left.max(Duration::from_secs(1))))
    }
}

pub(super) async fn write_status(
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

/// Whether the Service's status is the one `observed` gives it.
pub(super) fn status_matches(svc: &Service, desired: &Desired, observed: &Observed) -> bool {
    status::ingress_matches(svc, &status::desired_ingress(desired.lb.as_ref(), observed))
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
        _ => build::lb_name(
            &ctx.settings.cluster,
            sref,
            None,
            state::recorded_generation(svc),
        ),
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

/// Makes the annotation `changes` (a merge patch: `None` removes).
pub(super) async fn annotate(
    api: &Api<Service>,
    svc: &Service,
    changes: AnnotationChanges,
) -> Result<(), kube::Error> {
    let patch = json!({"metadata": {"annotations": merge_annotations(changes)}});
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
) -> Result<(Action, Outcome), Error> {
    if ctx.providers.get(held).is_none() {
        let msg = format!(
            "the load balancer of this Service is held by provider {held}, which this operator instance does not run, and its class now names provider {wanted}; start cloudlb with provider {held} enabled so it can remove the old load balancer first. Nothing was changed."
        );
        return Ok((invalid(ctx, svc, msg).await, Outcome::Invalid));
    }
    tracing::info!(%held, %wanted, "class moved to another provider; removing the old load balancer");
    if let Some(stop) = remove_load_balancer(svc, &sref, ctx, held).await? {
        return Ok(stop);
    }
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    annotate(
        &api,
        svc,
        vec![
            (PROVIDER_ANNOTATION, Some(wanted.to_string())),
            // It named the old provider's load balancer.
            (crate::model::checkpoint::CHECKPOINT_ANNOTATION, None),
        ],
    )
    .await?;
    ctx.memory.set_cloud(&sref.uid, None);
    // Our own annotation write brings the Service back; the requeue is the safety net.
    Ok((
        Action::requeue(ctx.settings.provisioning_requeue),
        Outcome::Applied,
    ))
}

/// The Service no longer wants our load balancer: apply the empty model, clear the status, drop
/// the finalizer.
async fn cleanup(
    svc: &Service,
    sref: ServiceRef,
    ctx: &Context,
) -> Result<(Action, Outcome), Error> {
    let cached = ctx.memory.cloud(&sref.uid).map(|e| e.provider);
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
    // Nothing of ours is left: the record goes with the finalizer, so that the Service, should
    // it want a load balancer again, is judged afresh (by any installation).
    let forget = vec![
        (INSTALLATION_ANNOTATION, None),
        (PROVIDER_ANNOTATION, None),
        (DEFAULT_SCHEME_ANNOTATION, None),
        (TAG_KEYS_ANNOTATION, None),
        (state::SERVING_ANNOTATION, None),
        (state::RETIRING_ANNOTATION, None),
        (state::REPLACING_ANNOTATION, None),
        (state::GENERATION_ANNOTATION, None),
        (crate::model::checkpoint::CHECKPOINT_ANNOTATION, None),
    ];
    match write_ownership(&api, svc, remaining, forget).await {
        Ok(_) => {}
        // Already gone: nothing left to release.
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    ctx.memory.forget(&sref.uid);
    ctx.endpoints.forget(&sref.namespace, &sref.name);
    tracing::info!("load balancer cleaned up; finalizer removed");
    Ok((Action::await_change(), Outcome::CleanedUp))
}

/// What a deletion plans against: what this process applied and still trusts needs no re-read;
/// after a restart, a failed apply or a due drift check, the cloud, plus the target groups memory
/// knows of that the load balancer no longer references.
async fn observed_for_deletion(
    ctx: &Context,
    provider: &dyn Provider,
    desired: &Desired,
    cached: Option<&CacheEntry>,
) -> Result<Observed, Error> {
    let remembered = cached.map(|e| e.remembered(&e.fingerprint, e.provider, Instant::now()));
    // Not when memory is a drift check's read, which left out deletion protection.
    if let Some(e) = cached
        && deletion_basis(remembered, ctx.settings.resync) == Basis::Memory
        && !e.outline().misses_lb_attributes(desired)
    {
        return Ok(e.observed());
    }
    let mut observed = provider.observe(desired).await?;
    for tg in cached
        .map(CacheEntry::observed)
        .unwrap_or_default()
        .target_groups
    {
        if !observed.target_groups.iter().any(|t| t.arn == tg.arn) {
            observed.target_groups.push(tg);
        }
    }
    Ok(observed)
}

/// Deletes what provider `kind` holds for the Service and clears its status. `Some(result)`:
/// stop with it (deletion protection); `None`: nothing of ours is left there.
async fn remove_load_balancer(
    svc: &Service,
    sref: &ServiceRef,
    ctx: &Context,
    kind: ProviderKind,
) -> Result<Option<(Action, Outcome)>, Error> {
    let cached = ctx.memory.cloud(&sref.uid).filter(|e| e.provider == kind);
    let sref = sref.clone();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &sref.namespace);
    let Some(provider) = ctx.providers.get(kind) else {
        return Ok(None);
    };
    // The load balancer of the model, and those a replacement left (the one the status points
    // to, the retiring one), each through the empty model.
    let mut names = vec![cleanup_name(ctx, svc, &sref, cached.as_ref())];
    let recorded = [
        state::recorded(svc, state::SERVING_ANNOTATION).map(String::from),
        state::recorded_retiring(svc).map(|(name, _)| name),
        state::recorded(svc, state::REPLACING_ANNOTATION).map(String::from),
    ];
    for name in recorded.into_iter().flatten() {
        if kind == ProviderKind::Aws && !names.contains(&name) {
            names.push(name);
        }
    }
    for name in names {
        let cached = cached
            .as_ref()
            .filter(|e| e.outline().lb.as_ref().is_none_or(|l| l.name == name));
        let desired = Desired::empty(sref.clone(), name);
        let observed = observed_for_deletion(ctx, &*provider, &desired, cached).await?;
        let plan = match provider.plan(&desired, &observed) {
            Ok(p) => p,
            Err(e @ PlanError::DeletionProtected { .. }) => {
                publish(
                    &ctx.recorder,
                    svc,
                    EventType::Warning,
                    events::DELETING,
                    e.to_string(),
                )
                .await;
                return Ok(Some((
                    Action::requeue(Duration::from_secs(300)),
                    Outcome::Protected,
                )));
            }
            // Only a replacement can hit the other refusals; an empty model replaces nothing.
            Err(e) => return Err(e.into()),
        };
        if !plan.is_empty() {
            publish(
                &ctx.recorder,
                svc,
                EventType::Normal,
                events::DELETING,
                "Deleting load balancer".into(),
            )
            .await;
            if let Err(e) = provider.apply(&desired, &observed, &plan).await {
                // Read the cloud again next time, but keep what the cache knows: target groups
                // whose load balancer is already gone are found only through it.
                ctx.memory.with(&sref.uid, |m| {
                    if let Some(entry) = m.cloud.as_mut() {
                        entry.stale = true;
                    }
                });
                return Err(e.into());
            }
        }
        write_status(&ctx.metrics, &api, svc, &desired, &Default::default()).await?;
        if !plan.is_empty() {
            // What it shared with other load balancers may be unused now.
            ctx.prune.notify_one();
            publish(
                &ctx.recorder,
                svc,
                EventType::Normal,
                events::DELETED,
                "Deleted load balancer".into(),
            )
            .await;
        }
    }
    Ok(None)
}
