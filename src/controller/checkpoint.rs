//! The Service's checkpoint ([`CHECKPOINT_ANNOTATION`], see [`crate::model::checkpoint`]) as the
//! reconciler uses it: loaded into memory after a start instead of a read, kept current after
//! every apply, removed before any write other than target (de)registration.
//!
//! Why target changes keep it: they are the frequent writes (every node or endpoint change), and
//! the checkpoint written after them is what tells the next start that the targets are current.
//! One interrupted by a crash leaves the old checkpoint, which then no longer matches the model
//! (its targets changed), unless the targets came back to the old set while the operator was
//! down: then the drift check registers what is missing, and the load balancer's health checks
//! keep traffic off a target that went away meanwhile.

use super::service::{AnnotationChanges, Target, status_matches};
use super::{CacheEntry, Context};
use crate::model::Desired;
use crate::model::checkpoint::{self, CHECKPOINT_ANNOTATION};
use crate::model::state;
use crate::plan::Plan;
use crate::provider::Observed;
use k8s_openapi::api::core::v1::Service;
use std::time::Instant;

/// What the Service's checkpoint says exists, as unverified memory; `None` when it has none,
/// or one that does not fit the model that hashes to `fingerprint`, or whose address is not the
/// one the status shows (then the cloud is read, as without a checkpoint).
pub(super) fn load(
    svc: &Service,
    ctx: &Context,
    t: &Target,
    desired: &Desired,
    fingerprint: &str,
) -> Option<CacheEntry> {
    if !t.provider.checkpoints() {
        return None;
    }
    let value = state::recorded(svc, CHECKPOINT_ANNOTATION)?;
    let outline = match checkpoint::outline(value, desired, fingerprint) {
        Ok(o) => o,
        Err(why) => {
            tracing::info!(%why, "checkpoint not used; reading the cloud");
            return None;
        }
    };
    if !status_matches(svc, desired, &outline) {
        tracing::info!("checkpoint not used: the status names another address; reading the cloud");
        return None;
    }
    tracing::info!("trusted the checkpoint: no cloud call until the drift check");
    let mut entry = CacheEntry::new(
        fingerprint.to_string(),
        outline,
        t.kind,
        Instant::now(),
        false,
        &ctx.memory.interners,
    );
    entry.unverified = true;
    ctx.memory.set_cloud(&t.sref.uid, Some(entry.clone()));
    Some(entry)
}

/// The annotation change that makes the checkpoint say `observed` is the model that hashes to
/// `fingerprint` (verified: just applied or read); none when it already says so (and was not
/// `removed` since `svc` was read), or when there is nothing to checkpoint (another provider, no
/// address yet: an old checkpoint then no longer matches the model, or was removed before the
/// write).
pub(super) fn record(
    svc: &Service,
    t: &Target,
    fingerprint: &str,
    observed: &Observed,
    removed: bool,
) -> Option<(&'static str, Option<String>)> {
    if !t.provider.checkpoints() {
        return None;
    }
    let value = checkpoint::encode(fingerprint, observed)?;
    (removed || state::recorded(svc, CHECKPOINT_ANNOTATION) != Some(value.as_str()))
        .then_some((CHECKPOINT_ANNOTATION, Some(value)))
}

/// Whether the change from unverified memory `e` (what a checkpoint says, `remembered`) to
/// `desired` is one of targets only, against target groups the provider confirms are ours (one
/// read): then it is applied against memory; otherwise the cloud is read first.
pub(super) async fn targets_only(
    t: &Target,
    desired: &Desired,
    e: &CacheEntry,
    remembered: &Observed,
) -> Result<bool, super::service::Error> {
    if !checkpoint::only_targets_differ(desired, &e.fingerprint, remembered) {
        return Ok(false);
    }
    if !t
        .provider
        .confirm_target_groups(desired, remembered)
        .await?
    {
        tracing::info!("the checkpoint's target groups are not ours (or gone); reading the cloud");
        return Ok(false);
    }
    let plan = t.provider.plan(desired, remembered)?;
    Ok(plan.changes_only_targets())
}

/// Before `plan` is applied: the checkpoint is removed unless the plan only (de)registers
/// targets (see the module docs), so that a write cut off midway never leaves a checkpoint
/// that a model changed back to would trust.
pub(super) fn invalidate(svc: &Service, plan: &Plan) -> AnnotationChanges {
    if !plan.changes_only_targets() && state::recorded(svc, CHECKPOINT_ANNOTATION).is_some() {
        vec![(CHECKPOINT_ANNOTATION, None)]
    } else {
        Vec::new()
    }
}
