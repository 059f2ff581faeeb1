//! Kubernetes Events on the Service, with the upstream service-controller reasons.

use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The `type` of an Event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

pub const ENSURING: &str = "EnsuringLoadBalancer";
pub const ENSURED: &str = "EnsuredLoadBalancer";
pub const SYNC_FAILED: &str = "SyncLoadBalancerFailed";
pub const DELETING: &str = "DeletingLoadBalancer";
pub const DELETED: &str = "DeletedLoadBalancer";
/// A change AWS cannot make in place: a new load balancer beside the old one.
pub const REPLACING: &str = "ReplacingLoadBalancer";
pub const INVALID: &str = "InvalidConfiguration";
pub const TARGETS_SKIPPED: &str = "NodesNotTargeted";
/// Pod targets: a Service port has no ready endpoint (its target group is empty).
pub const NO_READY_ENDPOINTS: &str = "NoReadyEndpoints";
/// Annotations that look like ours or the AWS controllers' but that cloudlb does not understand.
pub const UNSUPPORTED_ANNOTATION: &str = "UnsupportedAnnotation";
/// Targets whose security group cloudlb may not change to admit the load balancer.
pub const BACKEND_RULES_SKIPPED: &str = "TargetSecurityGroupNotChanged";
/// IP targets outside the load balancer's VPC (not registered).
pub const TARGETS_OUTSIDE_VPC: &str = "TargetsOutsideVpc";
pub const ALL_UNHEALTHY: &str = "AllTargetsUnhealthy";
pub const TARGETS_HEALTHY: &str = "TargetsHealthy";
/// A class-less Service the default class does not adopt: another controller may act on it.
pub const NOT_ADOPTED: &str = "NotAdopted";
/// A Service of ours whose class this installation no longer serves: its load balancer is kept.
pub const CLASS_NOT_SERVED: &str = "LoadBalancerClassNotServed";

/// How long a published Event is remembered: a repeat within it raises the Event's series count
/// instead of creating another Event (kube-runtime's Recorder uses the same window).
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Writes `events.k8s.io/v1` Events, counting repeats in a series like kube-runtime's `Recorder`,
/// but it remembers only the name, count and time of each recent Event (about 150 bytes) instead
/// of a full copy (about 1.5 kB): at thousands of Services those copies were the largest block of
/// the operator's memory.
pub struct Recorder {
    client: Client,
    controller: String,
    recent: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    events: HashMap<SeriesKey, Series>,
    swept_at: usize,
}

/// What makes two Events the same: object, type, reason and note.
#[derive(Hash, PartialEq, Eq)]
struct SeriesKey {
    uid: String,
    type_: EventType,
    reason: String,
    note: u64,
}

struct Series {
    name: String,
    count: i32,
    last: Instant,
}

impl Recorder {
    pub fn new(client: Client, controller: impl Into<String>) -> Self {
        Recorder {
            client,
            controller: controller.into(),
            recent: Mutex::new(Recent::default()),
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an Event about `reference`: a new Event, or a repeat (series count + 1) of the
    /// same Event published within the last six minutes.
    pub async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) -> Result<(), kube::Error> {
        let note = truncate(note, 1000);
        let key = SeriesKey {
            uid: reference.uid.clone().unwrap_or_default(),
            type_,
            reason: reason.to_string(),
            note: {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                note.hash(&mut h);
                h.finish()
            },
        };
        let now = Timestamp::now();
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), &namespace);
        let repeat = {
            let recent = self.recent();
            recent
                .events
                .get(&key)
                .filter(|s| s.last.elapsed() < SERIES_WINDOW)
                .map(|s| (s.name.clone(), s.count + 1))
        };
        if let Some((name, count)) = repeat {
            let patch = serde_json::json!({
                "series": {"count": count, "lastObservedTime": MicroTime(now)}
            });
            match api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(key, name, count);
                    return Ok(());
                }
                // Expired or deleted meanwhile: write a new one.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let object = reference
            .name
            .clone()
            .unwrap_or_else(|| self.controller.clone());
        let name = format!("{object}.{:x}", now.as_nanosecond());
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(reason.to_string()),
            reason: Some(reason.to_string()),
            note: Some(note),
            regarding: Some(reference.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.controller.clone()),
            type_: Some(type_.as_str().to_string()),
            ..Default::default()
        };
        api.create(&PostParams::default(), &event).await?;
        self.remember(key, name, 1);
        Ok(())
    }

    fn remember(&self, key: SeriesKey, name: String, count: i32) {
        let mut recent = self.recent();
        if recent.events.len() >= 2 * recent.swept_at.max(64) {
            recent
                .events
                .retain(|_, s| s.last.elapsed() < SERIES_WINDOW);
            recent.swept_at = recent.events.len();
        }
        recent.events.insert(
            key,
            Series {
                name,
                count,
                last: Instant::now(),
            },
        );
    }

    /// Events remembered for series (for tests).
    pub fn remembered(&self) -> usize {
        self.recent().events.len()
    }
}

/// Publishes an Event on `svc`; failures to record are logged, never fatal.
pub async fn publish(
    recorder: &Recorder,
    svc: &Service,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_ref(recorder, &svc.object_ref(&()), type_, reason, note).await;
}

/// Publishes an Event about the object `reference` points at.
pub async fn publish_ref(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: String,
) {
    if let Err(e) = recorder.publish(reference, type_, reason, note).await {
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
