//! Every way a Service can be ours or not, one case each.

use super::*;
use crate::config::class::{LoadBalancerClassSpec, ProviderKind};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

const HERE: &str = "cloudlb";

fn class(name: &str, default: bool, adopt_all: bool, created: i64) -> LoadBalancerClass {
    let spec = LoadBalancerClassSpec {
        default,
        adopt_all_classless_services: adopt_all,
        ..LoadBalancerClassSpec::default_of(ProviderKind::Aws)
    };
    let mut c = LoadBalancerClass::new(name, spec);
    c.metadata.creation_timestamp = Some(Time(
        k8s_openapi::jiff::Timestamp::from_second(created).expect("timestamp"),
    ));
    c
}

/// A Service from its `metadata`, `spec` and `status` (type LoadBalancer unless `spec` says).
fn svc(metadata: Value, mut spec: Value, status: Value) -> Service {
    if spec.get("type").is_none() {
        spec["type"] = json!("LoadBalancer");
    }
    let mut metadata = metadata;
    metadata["name"] = json!("web");
    metadata["namespace"] = json!("default");
    serde_json::from_value(json!({"metadata": metadata, "spec": spec, "status": status}))
        .expect("service")
}

fn classless(metadata: Value) -> Service {
    svc(metadata, json!({}), json!({}))
}

fn of_class(class: &str, metadata: Value) -> Service {
    svc(metadata, json!({"loadBalancerClass": class}), json!({}))
}

/// The class name of an `Ours` or `Declined`, for compact assertions.
fn name(o: &Ownership<'_>) -> Option<String> {
    match o {
        Ownership::Ours { class, .. } | Ownership::Declined { class, .. } => {
            class.metadata.name.clone()
        }
        _ => None,
    }
}

#[test]
fn a_class_of_ours_is_ours_and_any_other_class_is_not() {
    let served = [class("a", false, false, 1), class("b", true, false, 2)];
    let o = ownership(&of_class("cloudlb.io/a", json!({})), &served, HERE);
    assert!(matches!(o, Ownership::Ours { adopted: false, .. }), "{o:?}");
    assert_eq!(name(&o).as_deref(), Some("a"));
    for other in [
        "service.k8s.aws/nlb",
        "example.com/lb",
        "cloudlb.io/missing",
    ] {
        let o = ownership(&of_class(other, json!({})), &served, HERE);
        assert_eq!(o, Ownership::NotOurs, "{other}");
    }
}

#[test]
fn the_oldest_default_class_wins_then_the_name() {
    let served = [
        class("c", true, true, 200),
        class("b", true, true, 100),
        class("a", false, true, 50),
        class("d", true, true, 100),
    ];
    assert_eq!(
        default_class(&served)
            .and_then(|c| c.metadata.name.clone())
            .as_deref(),
        Some("b")
    );
    assert!(default_class(&served[2..3]).is_none(), "no default class");
}

#[test]
fn a_classless_service_is_adopted_only_when_nothing_else_acts_on_it() {
    let plain = [class("default", true, false, 1)];
    let adopt_all = [class("default", true, true, 1)];
    let external = json!({"annotations": {AWS_LB_TYPE: "external"}});

    // Nothing says the cloud's controller stays away: declined, with the fix in the message.
    let o = ownership(&classless(json!({})), &plain, HERE);
    assert_eq!(
        o,
        Ownership::Declined {
            class: &plain[0],
            reason: Declined::NoOptIn
        }
    );
    // The annotation the cloud's controller yields on, or the class's opt-in: adopted.
    let o = ownership(&classless(external.clone()), &plain, HERE);
    assert!(matches!(o, Ownership::Ours { adopted: true, .. }), "{o:?}");
    let o = ownership(&classless(json!({})), &adopt_all, HERE);
    assert!(matches!(o, Ownership::Ours { adopted: true, .. }), "{o:?}");
    // aws-load-balancer-controller's older value, which the cloud's controller yields on too.
    let nlb_ip = json!({"annotations": {AWS_LB_TYPE: "nlb-ip"}});
    let o = ownership(&classless(nlb_ip), &plain, HERE);
    assert!(matches!(o, Ownership::Ours { adopted: true, .. }), "{o:?}");
    // Other values of the annotation do not count.
    let nlb = json!({"annotations": {AWS_LB_TYPE: "nlb"}});
    assert!(matches!(
        ownership(&classless(nlb), &plain, HERE),
        Ownership::Declined { .. }
    ));

    // Another controller's finalizer or address: declined even with the opt-in.
    for (finalizer, controller) in [
        (
            "service.kubernetes.io/load-balancer-cleanup",
            "the cloud's service controller (cloud-provider-aws on EKS)",
        ),
        ("service.k8s.aws/resources", "aws-load-balancer-controller"),
    ] {
        let mut meta = external.clone();
        meta["finalizers"] = json!([finalizer]);
        let o = ownership(&classless(meta), &adopt_all, HERE);
        assert_eq!(
            o,
            Ownership::Declined {
                class: &adopt_all[0],
                reason: Declined::ForeignFinalizer {
                    finalizer: finalizer.into(),
                    controller
                }
            }
        );
    }
    let addressed = svc(
        external,
        json!({}),
        json!({"loadBalancer": {"ingress": [{"hostname": "a1b2.elb.amazonaws.com"}]}}),
    );
    assert_eq!(
        ownership(&addressed, &adopt_all, HERE),
        Ownership::Declined {
            class: &adopt_all[0],
            reason: Declined::ForeignAddress("a1b2.elb.amazonaws.com".into())
        }
    );
    // No default class: not ours, and nothing to tell.
    assert_eq!(
        ownership(&classless(json!({})), &[class("a", false, true, 1)], HERE),
        Ownership::NotOurs
    );
}

#[test]
fn our_finalizer_keeps_a_classless_service_ours() {
    // Adopted earlier (the annotation since removed, or our own address in the status now).
    let served = [class("default", true, false, 1)];
    let held = svc(
        json!({"finalizers": [FINALIZER], "annotations": {INSTALLATION_ANNOTATION: HERE}}),
        json!({}),
        json!({"loadBalancer": {"ingress": [{"hostname": "ours.elb.amazonaws.com"}]}}),
    );
    assert!(matches!(
        ownership(&held, &served, HERE),
        Ownership::Ours { adopted: true, .. }
    ));
    // From a version that recorded no installation: still ours.
    let legacy = classless(json!({"finalizers": [FINALIZER]}));
    assert!(matches!(
        ownership(&legacy, &served, HERE),
        Ownership::Ours { .. }
    ));
}

#[test]
fn another_installations_service_is_never_touched_even_when_deleted() {
    let served = [class("a", true, true, 1)];
    let theirs =
        json!({"finalizers": [FINALIZER], "annotations": {INSTALLATION_ANNOTATION: "other"}});
    assert_eq!(
        ownership(&of_class("cloudlb.io/a", theirs.clone()), &served, HERE),
        Ownership::NotOurs
    );
    assert_eq!(
        ownership(&classless(theirs.clone()), &served, HERE),
        Ownership::NotOurs
    );
    let mut deleted = theirs;
    deleted["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert_eq!(
        ownership(&classless(deleted), &served, HERE),
        Ownership::NotOurs
    );
}

#[test]
fn a_service_that_no_longer_wants_our_load_balancer_is_released() {
    let served = [class("a", true, true, 1)];
    let ours = json!({"finalizers": [FINALIZER], "annotations": {INSTALLATION_ANNOTATION: HERE}});
    let mut deleted = ours.clone();
    deleted["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    assert_eq!(
        ownership(&of_class("cloudlb.io/a", deleted), &served, HERE),
        Ownership::Release
    );
    let cluster_ip = svc(ours.clone(), json!({"type": "ClusterIP"}), json!({}));
    assert_eq!(ownership(&cluster_ip, &served, HERE), Ownership::Release);
    // Moved to another controller's class (type changed away and back in one edit).
    let moved = of_class("service.k8s.aws/nlb", ours);
    assert_eq!(ownership(&moved, &served, HERE), Ownership::Release);
    // Without our finalizer there is nothing to release.
    let plain = svc(json!({}), json!({"type": "ClusterIP"}), json!({}));
    assert_eq!(ownership(&plain, &served, HERE), Ownership::NotOurs);
}

#[test]
fn a_service_whose_class_is_no_longer_served_keeps_its_load_balancer() {
    // The class was deleted, or this installation's --classes no longer lists it: never a
    // cleanup (that would delete the load balancer of a Service that still wants one).
    let served = [class("b", false, false, 1)];
    let ours = json!({"finalizers": [FINALIZER], "annotations": {INSTALLATION_ANNOTATION: HERE}});
    assert_eq!(
        ownership(&of_class("cloudlb.io/a", ours.clone()), &served, HERE),
        Ownership::Unserved {
            class: Some("a".into())
        }
    );
    assert_eq!(
        ownership(&classless(ours), &served, HERE),
        Ownership::Unserved { class: None }
    );
    // Not recorded for this installation: it may be another's; not ours to talk about.
    let legacy = json!({"finalizers": [FINALIZER]});
    assert_eq!(
        ownership(&of_class("cloudlb.io/a", legacy), &served, HERE),
        Ownership::NotOurs
    );
}

#[test]
fn every_declined_message_names_the_class_and_the_fix() {
    let reasons = [
        Declined::NoOptIn,
        Declined::ForeignAddress("1.2.3.4".into()),
        Declined::ForeignFinalizer {
            finalizer: "service.k8s.aws/resources".into(),
            controller: "aws-load-balancer-controller",
        },
    ];
    for reason in reasons {
        let m = reason.message("edge");
        assert!(m.contains("spec.loadBalancerClass: cloudlb.io/edge"), "{m}");
        assert!(m.contains("writes nothing"), "{m}");
    }
    let m = Declined::NoOptIn.message("edge");
    assert!(
        m.contains("service.beta.kubernetes.io/aws-load-balancer-type: external"),
        "{m}"
    );
    assert!(
        m.contains("adoptAllClasslessServices: true on LoadBalancerClass edge"),
        "{m}"
    );
}
