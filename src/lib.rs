//! cloudlb: a Kubernetes operator that gives `type: LoadBalancer` Services a load balancer.
//!
//! Pipeline: `Service (+ class + annotations) → config → desired model → plan → apply → status`.
//! [`config`], [`model`], [`build`] and [`plan`] are pure and live in `cloudlb-core` (re-exported
//! here); [`provider`] talks to the cloud; [`controller`] is the thin kube-runtime glue.
#![forbid(unsafe_code)]

pub use cloudlb_core::{build, config, model, ownership, plan};

pub mod controller;
pub mod http;
pub mod provider;
pub mod telemetry;
pub mod webhook;
