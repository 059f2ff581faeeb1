//! The pure core of cloudlb: everything from a Service to the operations that make its load
//! balancer real, with no client, no IO and no async runtime.
//!
//! `Service (+ class + annotations) → config → desired model → plan → (provider) → status`
//!
//! - [`config`]: the `LoadBalancerClass` CRD and the annotations, parsed into one typed config;
//!   every problem reported at once.
//! - [`model`]: the provider-neutral desired load balancer (listeners, target groups, targets,
//!   health checks, attributes, tags), names and defaults.
//! - [`build`]: Service + eligible Nodes + config → the desired model (golden-tested,
//!   `tests/golden/build/`).
//! - [`plan`]: desired × observed → ordered operations (table-tested, and golden-tested in
//!   `tests/golden/plan/`).
//! - [`provider`]: the trait a provider implements, in these types, and what it observes.
#![forbid(unsafe_code)]

pub mod build;
pub mod config;
pub mod model;
pub mod plan;
pub mod provider;
