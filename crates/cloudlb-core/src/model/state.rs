//! What cloudlb records on a Service it owns (its finalizer and `state.cloudlb.io/` annotations),
//! and how to read it back: a leaf that ownership and config both read.

use k8s_openapi::api::core::v1::Service;

/// Our finalizer: on every Service whose load balancer we made, until it is removed.
pub const FINALIZER: &str = "cloudlb.io/load-balancer";
/// The provider holding the Service's load balancer (`aws` or `local`), written with the
/// finalizer; cleanup and a class's provider switch use it.
pub const PROVIDER_ANNOTATION: &str = "state.cloudlb.io/provider";
/// The cloudlb installation (`--installation`, the Helm release by default) that owns the
/// Service's load balancer, written with the finalizer.
pub const INSTALLATION_ANNOTATION: &str = "state.cloudlb.io/installation";
/// The AWS scheme a Service gets when nothing sets one: `internet-facing` on Services that
/// versions before the `internal` default made (so an upgrade never replaces their load
/// balancers); absent: `internal`.
pub const DEFAULT_SCHEME_ANNOTATION: &str = "state.cloudlb.io/default-scheme";

/// The user tag keys cloudlb has put on the Service's cloud resources (a JSON list of strings):
/// the only tag keys it ever removes from them. Grown before a write adds keys, trimmed to the
/// wanted ones after it; see [`crate::model::LoadBalancer::applied_tag_keys`].
pub const TAG_KEYS_ANNOTATION: &str = "state.cloudlb.io/tag-keys";

/// The tag keys recorded on the Service ([`TAG_KEYS_ANNOTATION`]); none when absent or not a
/// JSON list of strings (a hand-edited record can leave a tag behind, never remove a foreign
/// one that is not listed).
pub fn recorded_tag_keys(svc: &Service) -> std::collections::BTreeSet<String> {
    recorded(svc, TAG_KEYS_ANNOTATION)
        .and_then(|v| serde_json::from_str(v).ok())
        .unwrap_or_default()
}

/// The value of [`TAG_KEYS_ANNOTATION`] for `keys`; `None` (no annotation) when empty.
pub fn tag_keys_value(keys: &std::collections::BTreeSet<String>) -> Option<String> {
    (!keys.is_empty()).then(|| serde_json::to_string(keys).unwrap_or_default())
}

/// The name of the load balancer the Service's status points to (AWS), written with the
/// finalizer and when a replacement moves the status. A desired name that differs is a
/// replacement in progress: the new load balancer is made beside this one, which keeps serving.
pub const SERVING_ANNOTATION: &str = "state.cloudlb.io/load-balancer";
/// The replaced load balancer that still serves for its grace period: `<name>@<unix seconds
/// when the status moved away from it>`.
pub const RETIRING_ANNOTATION: &str = "state.cloudlb.io/retiring";
/// The load balancer a replacement is making (written before its first write): one the Service
/// stops wanting before it served (renamed again meanwhile) is deleted, never left behind.
pub const REPLACING_ANNOTATION: &str = "state.cloudlb.io/replacing";
/// How many times the Service's generated load-balancer name was replaced (absent: 0).
pub const GENERATION_ANNOTATION: &str = "state.cloudlb.io/generation";

/// The generation recorded on the Service (0 when absent or not a number).
pub fn recorded_generation(svc: &Service) -> u32 {
    recorded(svc, GENERATION_ANNOTATION)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The retiring load balancer recorded on the Service: its name and since when (unix seconds).
pub fn recorded_retiring(svc: &Service) -> Option<(String, u64)> {
    let (name, since) = recorded(svc, RETIRING_ANNOTATION)?.rsplit_once('@')?;
    Some((name.to_string(), since.trim().parse().ok()?))
}

/// Whether our finalizer is on the Service.
pub fn has_finalizer(svc: &Service) -> bool {
    svc.metadata
        .finalizers
        .iter()
        .flatten()
        .any(|f| f == FINALIZER)
}

/// The value of the `state.cloudlb.io/` annotation `key`, if any.
pub fn recorded<'a>(svc: &'a Service, key: &str) -> Option<&'a str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// The installation recorded on the Service, if any.
pub fn recorded_installation(svc: &Service) -> Option<&str> {
    recorded(svc, INSTALLATION_ANNOTATION)
}

/// A Service an earlier version owns: our finalizer, and no installation recorded (every
/// version since records one with the finalizer).
pub fn made_by_an_earlier_version(svc: &Service) -> bool {
    has_finalizer(svc) && recorded_installation(svc).is_none()
}
