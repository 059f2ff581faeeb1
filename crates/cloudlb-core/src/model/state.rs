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
