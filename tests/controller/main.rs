//! The operator end to end, on the testbed (a real kube-apiserver + etcd + controller-manager
//! and moto): the controllers in-process (AWS and local providers, class routing, current
//! Kubernetes features), the binary as a process (CLI, leader election, metrics), the Helm chart
//! and the image. One binary, one shared control plane; each test isolates itself in its own
//! namespace, LoadBalancerClass and moto account. See docs/testing.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

#[path = "../support/mod.rs"]
mod support;

mod annotations;
mod aws_controller;
mod backend_rules;
mod chart;
mod cli;
mod current_kubernetes;
mod helpers;
mod image;
mod local_controller;
mod operator_process;
mod ownership;
mod pod_targets;
mod readiness_gates;
mod replacement;
mod restarts;
mod smoke;
mod webhook;
