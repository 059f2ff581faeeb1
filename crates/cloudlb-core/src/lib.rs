//! The pure core of cloudlb: everything from a Service to the operations that make its load
//! balancer real, with no client, no IO and no async runtime.
//!
//! `Service (+ class + annotations) → config → desired model → plan → (provider) → status`
//!
//! - [`config`]: the `LoadBalancerClass` CRD and the annotations, parsed into one typed config;
//!   every problem reported at once.
//! - [`model`]: the desired load balancer (listeners, target groups, targets, health checks; the
//!   AWS attributes and tags; the local provider's typed settings, [`model::LocalSpec`]), names
//!   and defaults, and what a provider observes.
//! - [`build`]: Service + eligible Nodes + config → the desired model (golden-tested,
//!   `tests/golden/build/`).
//! - [`plan`]: the operations, and the AWS NLB planner: desired × observed → ordered operations
//!   (table-tested, and golden-tested in `tests/golden/plan/`). The local provider plans with its
//!   own diff, in `cloudlb-local`.
//! - [`ownership`]: which Services are ours (class routing, adoption of class-less Services,
//!   the installation of record).
//! - [`provider`]: the trait a provider implements, in these types, and what it observes.
#![forbid(unsafe_code)]

pub mod build;
pub mod config;
pub mod model;
pub mod ownership;
pub mod plan;
pub mod provider;
