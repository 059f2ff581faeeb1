//! The ground cloudlb's integration tests and benchmark stand on, started by the tests
//! themselves: a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager of
//! the releases in `testbed/versions`, built by `scripts/install-test-deps`), the AWS emulator
//! (moto server) with SDK clients and EC2 fixtures, Node fixtures, and the counting/fault proxy
//! put between an operator and moto. Nothing here is mocked, and nothing here depends on cloudlb:
//! the product never links it (a dev-dependency of the operator, a dependency of the benchmark).
//!
//! - [`cluster`]: [`TestCluster`], on free loopback ports, shared per test binary or private.
//! - [`aws`]: [`AwsEmulator`] (one moto account per test), SDK config and clients, VPC/instance
//!   fixtures.
//! - [`nodes`]: Node objects that stand for EC2 instances (no kubelet runs here).
//! - [`faultproxy`]: [`faultproxy::FaultProxy`], counting and fault-injecting AWS calls.
//! - [`process`]: child processes that die with the test binary, scratch directories kept when a
//!   test fails, free ports, the cached binaries.
//! - [`TestGuard`]: prints the shared processes' logs when a test fails.

pub mod aws;
pub mod cluster;
pub mod faultproxy;
pub mod nodes;
pub mod process;
pub mod tls;

pub use aws::{
    AccountHeader, AwsEmulator, Instance, Network, Subnet, aws_sdk_config, create_vpc_with_subnets,
    ec2, elbv2, run_instances,
};
pub use cluster::{TestCluster, TestClusterBuilder};
pub use nodes::{create_node, node_for};

/// The soak factor from `CLOUDLB_SOAK` (default 1: the size CI runs). The fault and crash tests
/// multiply their Services, kills and restarts by it, e.g. `CLOUDLB_SOAK=10 cargo test --test
/// faults` for a long soak run.
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
