//! Integration-test support: the testbed (`cloudlb-testbed`: a real control plane, moto, the
//! fault proxy, fixtures), re-exported, and [`env`], an operator instance wired to it.
//!
//! Each test binary does `mod support;` and uses what it needs, so unused items are expected.
#![allow(dead_code, unused_imports)]

pub mod env;

pub use cloudlb_testbed::*;
