//! Replacement without downtime (AWS): what AWS cannot change in place (the scheme, the name)
//! gets a new load balancer beside the one that serves. The old one keeps serving until the new
//! one is `active` with healthy targets; then the Service's status moves to the new one, and the
//! old one serves on for the grace period (`replacement-grace-period-seconds`, so DNS caches
//! follow) before it is deleted.
//!
//! The state lives on the Service (`state.cloudlb.io/` annotations), so a crash at any step
//! resumes where it was and never leaves fewer than one load balancer:
//! - [`SERVING_ANNOTATION`]: the load balancer the status points to. A desired name that differs
//!   is a replacement in progress ([`replacing`]).
//! - [`GENERATION_ANNOTATION`]: bumped when the scheme changes, which gives the generated name of
//!   the next load balancer ([`start`]).
//! - [`REPLACING_ANNOTATION`]: the load balancer being made, recorded before its first write, so
//!   one the Service stops wanting before it served (renamed again) is deleted ([`abandoned`]).
//! - [`RETIRING_ANNOTATION`]: the replaced load balancer and since when; deleted by [`retire`]
//!   once the grace period is over. The orphan sweep never touches a live Service's load
//!   balancers, so neither the serving nor the retiring one is deleted behind the reconciler.

use super::Context;
use super::events::{self, EventType, publish};
use super::service::{
    AnnotationChanges, Error, Outcome, Target, annotate, apply, remember, write_status,
};
use crate::config::class::ProviderKind;
use crate::model::Desired;
use crate::model::state::{
    self, GENERATION_ANNOTATION, REPLACING_ANNOTATION, RETIRING_ANNOTATION, SERVING_ANNOTATION,
    recorded,
};
use crate::plan::PlanError;
use crate::provider::{LbState, Observed};
use k8s_openapi::api::core::v1::Service;
use kube::runtime::controller::Action;
use std::time::{Duration, Instant, SystemTime};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The load balancer being replaced, when the Service's status points to another one than the
/// model wants (AWS only; the local provider's name is not what clients reach).
pub(super) fn replacing<'a>(svc: &'a Service, t: &Target, desired: &Desired) -> Option<&'a str> {
    if t.kind != ProviderKind::Aws || desired.lb.is_none() {
        return None;
    }
    recorded(svc, SERVING_ANNOTATION).filter(|s| *s != desired.lb_name)
}

/// The record a Service of ours gets with its first write: the load balancer its status will
/// point to (AWS).
pub(super) fn serving_record(svc: &Service, t: &Target, desired: &Desired) -> AnnotationChanges {
    let missing = recorded(svc, SERVING_ANNOTATION).is_none();
    if missing && t.kind == ProviderKind::Aws && desired.lb.is_some() {
        vec![(SERVING_ANNOTATION, Some(desired.lb_name.clone()))]
    } else {
        Vec::new()
    }
}

/// A scheme change of a load balancer with a generated name starts a replacement: the next
/// generation's name, and the serving one recorded. `Some`: this reconcile ends (the annotation
/// change brings the next one). A protected load balancer is left to the plan, which refuses
/// the change; one with a fixed name (`cloudlb.io/name`) is replaced in place by the plan
/// (deleted, then made again), which the Event says.
pub(super) async fn start(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
    observed: &Observed,
) -> Result<Option<(Action, Outcome)>, Error> {
    let (Some(want), Some(have)) = (&desired.lb, &observed.lb) else {
        return Ok(None);
    };
    if t.kind != ProviderKind::Aws || want.scheme == have.scheme || have.name != desired.lb_name {
        return Ok(None);
    }
    let protected = have
        .attributes
        .get("deletion_protection.enabled")
        .map(String::as_str);
    if protected == Some("true") {
        return Ok(None);
    }
    let reason = format!(
        "the scheme changes from {} to {}",
        have.scheme.as_aws(),
        want.scheme.as_aws()
    );
    if t.cfg.name.is_some() {
        let note = format!(
            "Replacing load balancer {} in place ({reason}): it has a fixed name (cloudlb.io/name), so it is deleted and made again and the Service has no load balancer in between; give it a new name as well to replace it without downtime",
            have.name
        );
        publish(
            &ctx.recorder,
            svc,
            EventType::Warning,
            events::REPLACING,
            note,
        )
        .await;
        return Ok(None);
    }
    let next = state::recorded_generation(svc).saturating_add(1);
    annotate(
        &t.api(ctx),
        svc,
        vec![
            (GENERATION_ANNOTATION, Some(next.to_string())),
            (SERVING_ANNOTATION, Some(have.name.clone())),
        ],
    )
    .await?;
    // The next reconcile makes the new one and says so in an Event.
    tracing::info!(load_balancer = %have.name, %reason, "replacing the load balancer beside it");
    Ok(Some((
        Action::requeue(Duration::from_secs(1)),
        Outcome::Applied,
    )))
}

/// One step of a replacement: the new load balancer made and brought in line (read in full each
/// time: a replacement is rare, and the memory holds the old one); once it is active with
/// healthy targets, the status moves to it and the old one starts its grace period. Until then
/// the status stays on `old`.
pub(super) async fn step(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
    old: &str,
) -> Result<(Action, Outcome), Error> {
    let making = recorded(svc, REPLACING_ANNOTATION);
    if making != Some(desired.lb_name.as_str()) {
        // Another replacement the Service no longer wants: what it made never served.
        if let Some(prev) = making.filter(|p| *p != old) {
            delete(svc, ctx, t, prev).await?;
        }
        let record = vec![(REPLACING_ANNOTATION, Some(desired.lb_name.clone()))];
        annotate(&t.api(ctx), svc, record).await?;
    }
    let observed = t.provider.observe(desired).await?;
    if observed.lb.is_none() {
        let note = format!(
            "Replacing load balancer {old} with {}: the DNS name changes; {old} serves until the new one is active, then for {} s",
            desired.lb_name,
            t.cfg.replacement_grace.as_secs()
        );
        publish(
            &ctx.recorder,
            svc,
            EventType::Normal,
            events::REPLACING,
            note,
        )
        .await;
    }
    let plan = t.provider.plan(desired, &observed)?;
    let observed = apply(svc, ctx, t, desired, observed, &plan).await?;
    let provisioning = remember(ctx, t, desired.fingerprint(), &observed, Instant::now());
    let active = observed
        .lb
        .as_ref()
        .is_some_and(|l| l.state == LbState::Active);
    if provisioning || !active || !targets_healthy(t, &observed).await? {
        return Ok((
            Action::requeue(ctx.settings.provisioning_requeue),
            Outcome::Applied,
        ));
    }
    // A load balancer replaced before and still in its grace period goes now: the record holds
    // one, and it serves nobody (the status moved away from it before).
    if let Some((earlier, _)) = state::recorded_retiring(svc)
        && earlier != old
        && earlier != desired.lb_name
    {
        delete(svc, ctx, t, &earlier).await?;
    }
    let since = unix_now();
    annotate(
        &t.api(ctx),
        svc,
        vec![
            (SERVING_ANNOTATION, Some(desired.lb_name.clone())),
            (RETIRING_ANNOTATION, Some(format!("{old}@{since}"))),
            (REPLACING_ANNOTATION, None),
        ],
    )
    .await?;
    write_status(&ctx.metrics, &t.api(ctx), svc, desired, &observed).await?;
    let grace = t.cfg.replacement_grace;
    let note = format!(
        "Moved the Service to load balancer {} ({}); {old} serves for {} s more, then is deleted",
        desired.lb_name,
        observed.dns_name(),
        grace.as_secs()
    );
    publish(&ctx.recorder, svc, EventType::Normal, events::ENSURED, note).await;
    Ok((
        Action::requeue(grace.max(Duration::from_secs(1))),
        Outcome::Applied,
    ))
}

/// Whether every target group with targets has a healthy one (one read per target group).
async fn targets_healthy(t: &Target, observed: &Observed) -> Result<bool, Error> {
    let names: Vec<String> = observed
        .target_groups
        .iter()
        .filter(|g| !g.targets.is_empty())
        .map(|g| g.name.clone())
        .collect();
    if names.is_empty() {
        return Ok(true);
    }
    let healthy = t.provider.healthy_targets(observed, &names).await?;
    Ok(names
        .iter()
        .all(|n| healthy.get(n).is_some_and(|h| !h.is_empty())))
}

/// The retiring load balancer, deleted once its grace period is over. `Some(action)`: it still
/// serves; check again then.
pub(super) async fn retire(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
) -> Result<Option<Action>, Error> {
    abandoned(svc, ctx, t, desired).await?;
    let Some((old, since)) = state::recorded_retiring(svc) else {
        return Ok(None);
    };
    // Never the one the status points to (a hand-edited record).
    let serving = recorded(svc, SERVING_ANNOTATION).unwrap_or(desired.lb_name.as_str());
    if old == serving || old == desired.lb_name {
        annotate(&t.api(ctx), svc, vec![(RETIRING_ANNOTATION, None)]).await?;
        return Ok(None);
    }
    let due = since.saturating_add(t.cfg.replacement_grace.as_secs());
    let now = unix_now();
    if now < due {
        return Ok(Some(Action::requeue(Duration::from_secs(due - now))));
    }
    if delete(svc, ctx, t, &old).await? {
        annotate(&t.api(ctx), svc, vec![(RETIRING_ANNOTATION, None)]).await?;
        Ok(None)
    } else {
        Ok(Some(Action::requeue(Duration::from_secs(300))))
    }
}

/// A replacement the Service stopped wanting while no replacement is under way (it wants the
/// serving load balancer again): what it made is deleted, and the record goes.
async fn abandoned(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
) -> Result<(), Error> {
    let Some(making) = recorded(svc, REPLACING_ANNOTATION) else {
        return Ok(());
    };
    if replacing(svc, t, desired).is_some() {
        return Ok(());
    }
    let serving = recorded(svc, SERVING_ANNOTATION).unwrap_or(desired.lb_name.as_str());
    if making != serving && making != desired.lb_name && !delete(svc, ctx, t, making).await? {
        return Ok(());
    }
    annotate(&t.api(ctx), svc, vec![(REPLACING_ANNOTATION, None)]).await?;
    Ok(())
}

/// Deletes the load balancer `name` of the Service (and its target groups and security group)
/// through the empty model. `false`: deletion protection kept it (an Event says so).
///
/// What it had is looked up as the model under that name would have it (its target groups and
/// security group are named after it), so a delete cut off after the load balancer went still
/// finds its target groups the next time.
pub(super) async fn delete(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    name: &str,
) -> Result<bool, Error> {
    let empty = Desired::empty(t.sref.clone(), name.to_string());
    let mut cfg = t.cfg.clone();
    cfg.name = Some(name.to_string());
    let no_nodes: &[k8s_openapi::api::core::v1::Node] = &[];
    let backends = crate::build::Backends::nodes(no_nodes);
    let probe = crate::build::build(&ctx.settings.cluster, svc, backends, &cfg)
        .map(|b| b.desired)
        .unwrap_or_else(|_| empty.clone());
    let observed = t.provider.observe(&probe).await?;
    let plan = match t.provider.plan(&empty, &observed) {
        Ok(p) => p,
        Err(e @ PlanError::DeletionProtected { .. }) => {
            let note = format!("The replaced load balancer is kept: {e}");
            publish(
                &ctx.recorder,
                svc,
                EventType::Warning,
                events::DELETING,
                note,
            )
            .await;
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    if !plan.is_empty() {
        t.provider.apply(&empty, &observed, &plan).await?;
        ctx.prune.notify_one();
        let note = format!("Deleted the replaced load balancer {name}");
        publish(&ctx.recorder, svc, EventType::Normal, events::DELETED, note).await;
    }
    Ok(true)
}
