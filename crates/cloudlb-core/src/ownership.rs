//! Which Services are ours: the one place that decides whether cloudlb acts on a Service.
//!
//! A Service is ours when its `spec.loadBalancerClass` names a class this installation serves
//! (`cloudlb.io/<class>`), or when it has no class, a default class is served, and no other
//! controller can be acting on it. Every other controller that makes load balancers skips a
//! Service whose class is not its own (the Kubernetes service controller since 1.24), so a class
//! of ours is proof; a class-less Service is the contested case: the cloud's own service
//! controller (cloud-provider-aws on EKS) serves every class-less Service unless it is annotated
//! `service.beta.kubernetes.io/aws-load-balancer-type: external`, and aws-load-balancer-controller
//! takes those it is configured for. See `docs/coexistence.md`.
//!
//! Ownership is recorded on the Service before the first cloud write: our finalizer, the
//! provider ([`PROVIDER_ANNOTATION`]) and the installation ([`INSTALLATION_ANNOTATION`]). A
//! Service recorded for another installation is never touched, so two installations (split by
//! `--classes` or by name) share a cluster without deleting each other's load balancers.

use crate::config::class::{CLASS_PREFIX, LoadBalancerClass};
use k8s_openapi::api::core::v1::Service;

#[cfg(test)]
mod tests;

pub use crate::model::state::{
    FINALIZER, INSTALLATION_ANNOTATION, PROVIDER_ANNOTATION, has_finalizer, recorded_installation,
};
/// The annotation with which a class-less Service says the cloud's own service controller is not
/// to serve it (value [`AWS_LB_TYPE_EXTERNAL`]).
pub const AWS_LB_TYPE: &str = "service.beta.kubernetes.io/aws-load-balancer-type";
pub const AWS_LB_TYPE_EXTERNAL: &str = "external";
/// aws-load-balancer-controller's older value: served by it (pod targets); the cloud's service
/// controller leaves it alone too.
pub const AWS_LB_TYPE_NLB_IP: &str = "nlb-ip";

/// The finalizers other load-balancer controllers put on the Services they serve, and who they
/// are.
const FOREIGN_FINALIZERS: &[(&str, &str)] = &[
    (
        "service.kubernetes.io/load-balancer-cleanup",
        "the cloud's service controller (cloud-provider-aws on EKS)",
    ),
    ("service.k8s.aws/resources", "aws-load-balancer-controller"),
    (
        "gke.networking.io/l4-ilb-v1",
        "GKE's load-balancer controller",
    ),
    (
        "gke.networking.io/l4-ilb-v2",
        "GKE's load-balancer controller",
    ),
    (
        "gke.networking.io/l4-netlb-v1",
        "GKE's load-balancer controller",
    ),
];

/// What cloudlb does with a Service.
#[derive(Clone, Debug)]
pub enum Ownership<'a> {
    /// Ours, through `class`. `adopted`: the Service has no class; the default class took it.
    Ours {
        class: &'a LoadBalancerClass,
        adopted: bool,
    },
    /// Carries our finalizer but no longer wants our load balancer (deleted, no longer
    /// `type: LoadBalancer`, or moved to another controller's class): remove it.
    Release,
    /// Ours by record, but its class (`None`: a default class) is no longer served by this
    /// installation (deleted, or left out of `--classes`): its load balancer is kept as it is,
    /// and the Service is told.
    Unserved { class: Option<String> },
    /// A class-less Service the default `class` would take, but another controller may be acting
    /// on it: nothing is written to it or to the cloud; the Service is told why.
    Declined {
        class: &'a LoadBalancerClass,
        reason: Declined,
    },
    /// Not ours: never touched and not told (another controller's class, another installation's
    /// Service, not a load balancer).
    NotOurs,
}

/// Why a class-less Service is not adopted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Declined {
    /// Another controller's finalizer is on it.
    ForeignFinalizer {
        finalizer: String,
        controller: &'static str,
    },
    /// Its status shows an address cloudlb did not write.
    ForeignAddress(String),
    /// Nothing says the cloud's service controller leaves it alone.
    NoOptIn,
}

impl Declined {
    /// One line for `cloudlb plan`.
    pub fn summary(&self) -> String {
        match self {
            Declined::ForeignFinalizer {
                finalizer,
                controller,
            } => format!("it carries finalizer {finalizer} of {controller}"),
            Declined::ForeignAddress(address) => {
                format!("its status shows {address}, which cloudlb did not write")
            }
            Declined::NoOptIn => format!(
                "no spec.loadBalancerClass and no {AWS_LB_TYPE}: {AWS_LB_TYPE_EXTERNAL}: the cloud's service controller may serve it"
            ),
        }
    }

    /// The Warning Event's message: who else acts on the Service and the exact fix.
    pub fn message(&self, class: &str) -> String {
        let recreate = format!(
            "recreate it with spec.loadBalancerClass: {CLASS_PREFIX}{class} to have cloudlb serve it"
        );
        match self {
            Declined::ForeignFinalizer {
                finalizer,
                controller,
            } => format!(
                "Not adopting this Service: it carries finalizer {finalizer} of {controller}, which serves its load balancer. cloudlb (default class {class}) writes nothing to it or to the cloud; {recreate}."
            ),
            Declined::ForeignAddress(address) => format!(
                "Not adopting this Service: its status already shows the address {address}, which cloudlb did not write: another controller serves it. cloudlb (default class {class}) writes nothing to it or to the cloud; {recreate}."
            ),
            Declined::NoOptIn => format!(
                "Not adopting this Service: it has no spec.loadBalancerClass, so the cloud's own service controller (cloud-provider-aws on EKS) may serve it too, and it would get two load balancers. cloudlb (default class {class}) writes nothing to it or to the cloud. To have cloudlb serve it: annotate it {AWS_LB_TYPE}: {AWS_LB_TYPE_EXTERNAL} (the cloud's controller leaves such Services alone), or {recreate}; in a cluster without a cloud service controller, set spec.adoptAllClasslessServices: true on LoadBalancerClass {class}."
            ),
        }
    }
}

/// Classes compare by name (the class type has no equality of its own).
impl PartialEq for Ownership<'_> {
    fn eq(&self, other: &Self) -> bool {
        let name = |c: &LoadBalancerClass| c.metadata.name.clone();
        match (self, other) {
            (
                Ownership::Ours { class, adopted },
                Ownership::Ours {
                    class: c,
                    adopted: a,
                },
            ) => name(class) == name(c) && adopted == a,
            (
                Ownership::Declined { class, reason },
                Ownership::Declined {
                    class: c,
                    reason: r,
                },
            ) => name(class) == name(c) && reason == r,
            (Ownership::Unserved { class }, Ownership::Unserved { class: c }) => class == c,
            (Ownership::Release, Ownership::Release) | (Ownership::NotOurs, Ownership::NotOurs) => {
                true
            }
            _ => false,
        }
    }
}

/// The default class among `served`: the oldest with `default: true` (several defaults: the
/// oldest wins, then the name, deterministically, as StorageClass admission does).
pub fn default_class<'a>(
    served: impl IntoIterator<Item = &'a LoadBalancerClass>,
) -> Option<&'a LoadBalancerClass> {
    served
        .into_iter()
        .filter(|c| c.spec.default)
        .min_by(|a, b| {
            let created =
                |c: &LoadBalancerClass| c.metadata.creation_timestamp.as_ref().map(|t| t.0);
            created(a)
                .cmp(&created(b))
                .then_with(|| a.metadata.name.cmp(&b.metadata.name))
        })
}

/// Whether an installation limited to the classes `filter` (`--classes`; `None`: all) serves
/// `class`.
pub fn serves(filter: Option<&[String]>, class: &LoadBalancerClass) -> bool {
    filter.is_none_or(|names| {
        class
            .metadata
            .name
            .as_ref()
            .is_some_and(|n| names.contains(n))
    })
}

/// What installation `installation`, serving the classes `served`, does with `svc`.
pub fn ownership<'a>(
    svc: &Service,
    served: &'a [LoadBalancerClass],
    installation: &str,
) -> Ownership<'a> {
    let recorded = recorded_installation(svc);
    if recorded.is_some_and(|r| r != installation) {
        return Ownership::NotOurs;
    }
    // Ours by record: our finalizer, and this installation's name or none (a Service from a
    // version that recorded none, taken over by the first installation that serves its class).
    let held = has_finalizer(svc);
    let release = || {
        if held {
            Ownership::Release
        } else {
            Ownership::NotOurs
        }
    };
    let Some(spec) = svc.spec.as_ref() else {
        return release();
    };
    if spec.type_.as_deref() != Some("LoadBalancer") || svc.metadata.deletion_timestamp.is_some() {
        return release();
    }
    let recorded_here = held && recorded == Some(installation);
    match spec.load_balancer_class.as_deref() {
        Some(c) => {
            let Some(name) = c.strip_prefix(CLASS_PREFIX) else {
                return release();
            };
            match served
                .iter()
                .find(|k| k.metadata.name.as_deref() == Some(name))
            {
                Some(class) => Ownership::Ours {
                    class,
                    adopted: false,
                },
                None if recorded_here => Ownership::Unserved {
                    class: Some(name.to_string()),
                },
                None => Ownership::NotOurs,
            }
        }
        None => match default_class(served) {
            Some(class) if held => Ownership::Ours {
                class,
                adopted: true,
            },
            Some(class) => match declined(svc, class) {
                Some(reason) => Ownership::Declined { class, reason },
                None => Ownership::Ours {
                    class,
                    adopted: true,
                },
            },
            None if recorded_here => Ownership::Unserved { class: None },
            None => Ownership::NotOurs,
        },
    }
}

/// Why the default `class` must not adopt the class-less `svc` (`None`: it may).
fn declined(svc: &Service, class: &LoadBalancerClass) -> Option<Declined> {
    let foreign = svc.metadata.finalizers.iter().flatten().find_map(|f| {
        FOREIGN_FINALIZERS
            .iter()
            .find(|(name, _)| f == name)
            .map(|(_, controller)| (f, *controller))
    });
    if let Some((finalizer, controller)) = foreign {
        return Some(Declined::ForeignFinalizer {
            finalizer: finalizer.clone(),
            controller,
        });
    }
    let address =
        crate::build::status_ingress(svc).and_then(|i| i.hostname.clone().or_else(|| i.ip.clone()));
    if let Some(address) = address {
        return Some(Declined::ForeignAddress(address));
    }
    let external = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AWS_LB_TYPE))
        .is_some_and(|v| [AWS_LB_TYPE_EXTERNAL, AWS_LB_TYPE_NLB_IP].contains(&v.trim()));
    if external || class.spec.adopt_all_classless_services {
        None
    } else {
        Some(Declined::NoOptIn)
    }
}
