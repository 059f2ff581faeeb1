//! cloudlb: a Kubernetes operator that gives `type: LoadBalancer` Services a load balancer.
//!
//! Pipeline: `Service (+ class + annotations) → config → desired model → plan → apply → status`.
//! [`config`], [`build`] and [`plan`] are pure; [`provider`] talks to the cloud; [`controller`]
//! is the thin kube-runtime glue.
#![forbid(unsafe_code)]

pub mod build;
pub mod config;
pub mod controller;
pub mod faultproxy;
pub mod http;
pub mod model;
pub mod plan;
pub mod provider;
pub mod telemetry;
