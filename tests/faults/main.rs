//! Faults and crashes: AWS throttling, errors and lost connections through the fault proxy, the
//! operator killed at random moments, the API server restarted; every run must converge with
//! nothing leaked. See docs/testing.md.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

#[path = "../support/mod.rs"]
mod support;

mod crash;
mod faults;
