//! Integration-test support ("testbed"): a real kube-apiserver + etcd, a moto server, and
//! fixtures. See /work/shared/TESTBED.md for what runs here and why.
//!
//! Each test binary does `mod support;` and uses what it needs, so unused items are expected.
#![allow(dead_code)]

pub mod aws;
pub mod cluster;
pub mod env;
pub mod nodes;
pub mod process;

#[allow(unused_imports)]
pub use aws::{
    AccountHeader, AwsEmulator, Instance, Network, Subnet, aws_sdk_config, create_vpc_with_subnets,
    ec2, elbv2, run_instances,
};
#[allow(unused_imports)]
pub use cluster::{TestCluster, TestClusterBuilder};
#[allow(unused_imports)]
pub use nodes::{create_node, node_for};

/// The soak factor from `CLOUDLB_SOAK` (default 1: the size CI runs). The fault and crash tests
/// multiply their Services, kills and restarts by it, e.g. `CLOUDLB_SOAK=10 cargo test --test
/// faults --test crash` for a long soak run.
pub fn soak() -> usize {
    match std::env::var("CLOUDLB_SOAK") {
        Err(_) => 1,
        Ok(v) => match v.parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => panic!("CLOUDLB_SOAK={v:?}: expected a whole number of at least 1"),
        },
    }
}

/// Create one at the start of every test: `let _guard = TestGuard::new();`.
///
/// When the test panics, its drop prints the log tails of the shared kube-apiserver, etcd and
/// moto server and the kubeconfig path, and keeps the scratch directories.
pub struct TestGuard {
    name: String,
}

impl TestGuard {
    /// Named after the current test (libtest names the test thread after the test).
    pub fn new() -> Self {
        let name = std::thread::current()
            .name()
            .unwrap_or("unnamed test")
            .to_string();
        Self { name }
    }
}

impl Default for TestGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestGuard {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        process::mark_failed();
        eprintln!("==== test {} failed: testbed state ====", self.name);
        if let Some(cluster) = cluster::shared_if_started() {
            eprintln!(
                "shared cluster {} (kubeconfig {}):\n{}",
                cluster.url(),
                cluster.kubeconfig_path().display(),
                cluster.log_tail(40)
            );
        }
        if let Some(moto) = aws::shared_if_started() {
            eprintln!(
                "shared moto server {}:\n{}",
                moto.endpoint(),
                moto.log_tail(40)
            );
        }
        eprintln!("==== end of testbed state for {} ====", self.name);
    }
}
