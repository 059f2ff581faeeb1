//! Integration-test support: the testbed (`cloudlb-testbed`: a real control plane, moto, the
//! fault proxy, fixtures), re-exported, and what both test binaries build on it: [`fixtures`]
//! (Kubernetes objects), [`describe`] (what is in a moto account), [`env`] (an operator instance
//! wired to the testbed) and [`operator`] (the `cloudlb run` process).

pub mod describe;
pub mod env;
pub mod fixtures;
pub mod operator;

pub use cloudlb_testbed::*;
