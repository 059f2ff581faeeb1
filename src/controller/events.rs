//! Kubernetes Events on the Service, with the upstream service-controller reasons.

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

pub const ENSURING: &str = "EnsuringLoadBalancer";
pub const ENSURED: &str = "EnsuredLoadBalancer";
pub const SYNC_FAILED: &str = "SyncLoadBalancerFailed";
pub const DELETING: &str = "DeletingLoadBalancer";
pub const DELETED: &str = "DeletedLoadBalancer";
pub const INVALID: &str = "InvalidConfiguration";
pub const TARGETS_SKIPPED: &str = "NodesNotTargeted";
pub const ALL_UNHEALTHY: &str = "AllTargetsUnhealthy";
pub const TARGETS_HEALTHY: &str = "TargetsHealthy";

/// Publishes an Event on `svc`; failures to record are logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    svc: &Service,
    warning: bool,
    reason: &str,
    note: String,
) {
    publish_ref(recorder, &svc.object_ref(&()), warning, reason, note).await;
}

/// Publishes an Event about the object `reference` points at.
pub async fn publish_ref(
    recorder: &Recorder,
    reference: &ObjectReference,
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
    if let Err(e) = recorder.publish(&ev, reference).await {
        let service = format!(
            "{}/{}",
            reference.namespace.as_deref().unwrap_or_default(),
            reference.name.as_deref().unwrap_or_default()
        );
        tracing::warn!(%service, error = %e, reason, "could not record Event");
    }
}

/// A reference to the Service a model belongs to.
pub fn service_ref(svc: &crate::model::ServiceRef) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: Some(svc.namespace.clone()),
        name: Some(svc.name.clone()),
        uid: Some(svc.uid.clone()),
        ..Default::default()
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
