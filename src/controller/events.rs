//! Kubernetes Events on the Service, with the upstream service-controller reasons.

use k8s_openapi::api::core::v1::Service;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};

pub const ENSURING: &str = "EnsuringLoadBalancer";
pub const ENSURED: &str = "EnsuredLoadBalancer";
pub const SYNC_FAILED: &str = "SyncLoadBalancerFailed";
pub const DELETING: &str = "DeletingLoadBalancer";
pub const DELETED: &str = "DeletedLoadBalancer";
pub const INVALID: &str = "InvalidConfiguration";
pub const UPDATED_STATUS: &str = "UpdatedLoadBalancerStatus";
pub const TARGETS_SKIPPED: &str = "NodesNotTargeted";

/// Publishes an Event; failures to record are logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    svc: &Service,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        // The Events API caps the note at 1 kB.
        note: Some(truncate(note, 1000)),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &svc.object_ref(&())).await {
        tracing::warn!(service = %format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any()), error = %e, reason, "could not record Event");
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max - 3;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}
