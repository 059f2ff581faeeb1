//! `cloudlb-bench`: the operator at scale against a real API server and moto, with the operator as
//! a separate process (`cloudlb run`) whose AWS calls go through a counting proxy
//! ([`cloudlb_testbed::faultproxy`], no faults). See `docs/benchmarks.md`.
//!
//! ```text
//! cargo build --release --bin cloudlb --bin cloudlb-bench
//! target/release/cloudlb-bench --services 1000 --nodes 200
//! ```
//!
//! Phases: create N LoadBalancer Services (1 or 2 ports) over M Nodes and wait for every status;
//! touch every Service with a no-op annotation (an unchanged resync of everything); add one Node;
//! remove it; endpoint churn (one more Service, with pod targets: 100 endpoints whose readiness
//! flips 20 times a second for 20 s, written to its EndpointSlice as the EndpointSlice controller
//! would); three takeovers (the checkpoints stand in for reads): kill -9 of the operator and a new
//! one, a leader failover (kill -9 of the leader, a standby takes over) and a rolling upgrade (a
//! new replica, then SIGTERM to the old); one full drift sweep (restarted with `--resync-seconds` = `--sweep-seconds`: every
//! Service re-verified once, spread over that window); delete every Service. Per phase: wall time, cloud calls by operation (counted at the
//! proxy), the operator's own call count, its RSS. Prints goal vs measured and writes JSON.
//! Asserts nothing about timings.

mod report;

use clap::Parser;
use cloudlb::config::class::LoadBalancerClass;
use cloudlb_testbed::faultproxy::{FaultConfig, FaultProxy, ProxyConfig};
use cloudlb_testbed::process::{ManagedProcess, free_port, keep_scratch_dirs};
use cloudlb_testbed::{
    AwsEmulator, TestCluster, create_node, create_vpc_with_subnets, node_for, run_instances,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, CustomResourceExt};
use report::{Phase, Report, Sweep};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLUSTER: &str = "bench";
const NAMESPACE: &str = "bench";
/// The account moto puts requests without an account header in.
const MOTO_DEFAULT_ACCOUNT: &str = "123456789012";
/// The Node added and removed in the node phases.
const EXTRA_NODE: &str = "node-extra";
/// The endpoint-churn phase: its Service, endpoints, readiness changes per second, duration.
const CHURN_SERVICE: &str = "churn";
const CHURN_PODS: usize = 100;
const CHURN_RATE: u32 = 20;
const CHURN_SECONDS: u64 = 20;
/// The operator's `--resync-seconds` outside the sweep phase: drift checks do not mix into the
/// phases.
const NO_DRIFT_CHECKS: u64 = 86400;
/// The restart phase's first window: no call at all is the goal.
const FIRST_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Proxy(#[from] cloudlb_testbed::faultproxy::ProxyError),
    #[error("AWS emulator: {0}")]
    Aws(String),
    #[error("testbed: {0}")]
    Testbed(String),
    #[error("operator: {0}")]
    Operator(String),
    #[error("the operator died: {0}")]
    OperatorDied(String),
}

fn aws_err(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Aws(format!("{what}: {e}"))
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cloudlb-bench",
    about = "Benchmark the operator (a separate `cloudlb run` process) against a real API server and moto"
)]
pub struct Args {
    /// LoadBalancer Services to create (every second one has two ports).
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Nodes (EC2 instances in moto), all targets of every Service.
    #[arg(long, default_value_t = 200)]
    nodes: usize,
    /// The operator's `--aws-rate-limit` (calls per second per call family; 0: unlimited).
    #[arg(long, default_value_t = 10.0)]
    aws_rate_limit: f64,
    /// The operator's `--aws-rate-adaptive`: `false` keeps its rate limit fixed under throttling
    /// (what the adaptive limiter is compared with).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    aws_rate_adaptive: bool,
    /// Throttle as AWS does: at most this many calls per second reach moto, the others are
    /// answered with throttling (the counting proxy's quota; default: none).
    #[arg(long)]
    aws_quota: Option<f64>,
    /// A phase is over when the operator made no cloud call for this long (it requeues
    /// provisioning load balancers every 5 s).
    #[arg(long, default_value_t = 8)]
    quiet_secs: u64,
    /// Give up waiting for a phase after this long.
    #[arg(long, default_value_t = 3600)]
    phase_timeout_secs: u64,
    /// API writes in flight when creating, touching and deleting Services and Nodes.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Where to write the JSON results.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `cloudlb` binary (default: next to this one).
    #[arg(long)]
    operator: Option<PathBuf>,
    /// The operator's `--log-level`.
    #[arg(long, default_value = "info")]
    operator_log_level: String,
    /// Keep the scratch directory (logs, kubeconfig) afterwards.
    #[arg(long)]
    keep: bool,
    /// Kill the operator when its RSS exceeds this many MiB (protects a shared machine); the
    /// run then ends and reports how far it got.
    #[arg(long, default_value_t = 4096)]
    max_operator_rss_mib: u64,
    /// The drift sweep's window: the operator's `--resync-seconds` in the sweep phase.
    #[arg(long, default_value_t = 120)]
    sweep_seconds: u64,
    /// Stop after this phase (e.g. `node-remove` to skip the slow delete at large sizes).
    #[arg(long, value_enum, default_value = "delete")]
    stop_after: StopAfter,
    /// Run moto without the two lookup fixes of `moto_speedups.py` (which make RegisterTargets
    /// linear instead of quadratic in the number of instances; moto's answers are unchanged).
    #[arg(long)]
    stock_moto: bool,
}

/// The phases, in order.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopAfter {
    Wave,
    Resync,
    NodeAdd,
    NodeRemove,
    EndpointChurn,
    /// The three takeovers.
    Restart,
    Sweep,
    Delete,
}

#[tokio::main]
async fn main() -> ExitCode {
    cloudlb_bench::init_logging();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cloudlb-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn say(start: Instant, msg: impl std::fmt::Display) {
    eprintln!("[{:>7.1}s] {msg}", start.elapsed().as_secs_f64());
}

/// The `cloudlb run` child.
struct Operator {
    proc: ManagedProcess,
    metrics_port: u16,
    dog: Arc<Watchdog>,
}

/// Samples the operator's RSS twice a second; kills it above the cap.
#[derive(Default)]
pub struct Watchdog {
    max_kb: std::sync::atomic::AtomicU64,
    death: Mutex<Option<String>>,
    /// (seconds since start, RSS KiB) every 5 s.
    samples: Mutex<Vec<(f64, u64)>>,
}

impl Watchdog {
    fn spawn(pid: u32, cap_kb: u64) -> Arc<Watchdog> {
        let dog = Arc::new(Watchdog::default());
        let d = dog.clone();
        let started = Instant::now();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering;
            let mut n = 0u64;
            loop {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let rss = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
                let Some(rss) = rss else {
                    // Gone, or a zombie (no VmRSS line).
                    d.die("it exited".into());
                    return;
                };
                d.max_kb.fetch_max(rss, Ordering::Relaxed);
                if n.is_multiple_of(10) {
                    d.samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((started.elapsed().as_secs_f64(), rss));
                }
                n += 1;
                if rss > cap_kb {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .status();
                    d.die(format!(
                        "killed by the benchmark at RSS {} MiB (cap --max-operator-rss-mib {})",
                        rss / 1024,
                        cap_kb / 1024
                    ));
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        dog
    }

    fn die(&self, why: String) {
        let mut death = self.death.lock().unwrap_or_else(|p| p.into_inner());
        death.get_or_insert(why);
    }

    pub fn death(&self) -> Option<String> {
        self.death.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn samples(&self) -> Vec<(f64, u64)> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn max_kb(&self) -> u64 {
        self.max_kb.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Operator {
    /// Whether it holds the leader lease.
    async fn leading(&self) -> bool {
        self.metric("cloudlb_leader", "").await >= 1.0
    }

    /// SIGTERM (a rolling update's stop: the lease is released) and wait up to 60 s for the
    /// exit; then SIGKILL.
    async fn terminate(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.proc.pid().to_string()])
            .status();
        let _ = wait_until(Instant::now() + Duration::from_secs(60), || {
            let exited = self.proc.exited().is_some();
            async move { exited }
        })
        .await;
        self.proc.kill();
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics")
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Sum of a metric's samples whose line contains `filter`.
    async fn metric(&self, name: &str, filter: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// `result` label → reconciles.
    async fn reconciles(&self) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for line in self.metrics().await.lines() {
            let Some(rest) = line.strip_prefix("cloudlb_reconcile_total{result=\"") else {
                continue;
            };
            let Some((result, tail)) = rest.split_once('"') else {
                continue;
            };
            if let Some(v) = tail.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                *out.entry(result.to_string()).or_insert(0.0) += v;
            }
        }
        out
    }

    /// (VmRSS, VmHWM) in KiB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// The state at the start of a phase.
pub struct Mark {
    pub calls: f64,
    pub reconciles: BTreeMap<String, f64>,
}

/// Resets the proxy's counts and remembers the operator's counters.
async fn mark(proxy: &FaultProxy, op: &Operator) -> Mark {
    proxy.reset_counts();
    Mark {
        calls: op.metric("cloudlb_cloud_api_calls_total", "").await,
        reconciles: op.reconciles().await,
    }
}

struct Aws {
    elbv2: aws_sdk_elasticloadbalancingv2::Client,
    ec2: aws_sdk_ec2::Client,
}

impl Aws {
    /// Clients for moto's default account, the one the operator's calls land in.
    fn new(endpoint: &str) -> Aws {
        let config = cloudlb_testbed::aws_sdk_config(endpoint, MOTO_DEFAULT_ACCOUNT);
        Aws {
            elbv2: aws_sdk_elasticloadbalancingv2::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
        }
    }

    /// (load balancers, target groups, our security groups) in the account.
    async fn leftovers(&self) -> Result<(usize, usize, usize), BenchError> {
        let lbs = self
            .elbv2
            .describe_load_balancers()
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| aws_err("DescribeLoadBalancers", e))?
            .len();
        let tgs = match self.elbv2.describe_target_groups().send().await {
            Ok(out) => out.target_groups().len(),
            // moto answers TargetGroupNotFound when there are none.
            Err(e) if format!("{e:?}").contains("TargetGroupNotFound") => 0,
            Err(e) => return Err(aws_err("DescribeTargetGroups", e)),
        };
        let sgs = self
            .ec2
            .describe_security_groups()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag:cloudlb.io/cluster")
                    .values(CLUSTER)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| aws_err("DescribeSecurityGroups", e))?
            .security_groups()
            .len();
        Ok((lbs, tgs, sgs))
    }
}

fn service(i: usize) -> Result<Service, BenchError> {
    let mut ports = vec![json!({"name": "http", "port": 80, "protocol": "TCP"})];
    if i % 2 == 1 {
        ports.push(json!({"name": "https", "port": 443, "protocol": "TCP"}));
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": service_name(i)},
        "spec": {"type": "LoadBalancer", "ports": ports, "selector": {"app": "bench"}},
    }))?)
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

/// Target groups of `n` benchmark Services (one per port).
fn target_groups(n: usize) -> usize {
    n + n / 2
}

async fn setup_kube(client: &Client) -> Result<(), BenchError> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &LoadBalancerClass::crd())
        .await?;
    let classes: Api<LoadBalancerClass> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while classes.list(&ListParams::default()).await.is_err() {
        if Instant::now() > deadline {
            return Err(BenchError::Testbed(
                "the CRD was not established in 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let class: LoadBalancerClass = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"provider": "aws", "default": true, "adoptAllClasslessServices": true},
    }))?;
    classes.create(&PostParams::default(), &class).await?;
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    Ok(())
}

/// When each Service was created and first seen with a status, and how often a status changed
/// after that.
#[derive(Default)]
struct Track {
    created: HashMap<String, Instant>,
    status: HashMap<String, Instant>,
    /// The address each Service's status shows ("" for none).
    address: HashMap<String, String>,
    /// Statuses that changed or went away after the first one.
    changes: u64,
}

fn lock(t: &Mutex<Track>) -> std::sync::MutexGuard<'_, Track> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

fn watch_status(client: Client, track: Arc<Mutex<Track>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<Service> = Api::namespaced(client, NAMESPACE);
        let stream = watcher(api, watcher::Config::default());
        futures::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            let svc = match ev {
                Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "status watch (retrying)");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let address = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .and_then(|i| i.first())
                .and_then(|i| i.hostname.clone().or_else(|| i.ip.clone()))
                .unwrap_or_default();
            let Some(name) = svc.metadata.name else {
                continue;
            };
            let mut t = lock(&track);
            if !address.is_empty() {
                t.status.entry(name.clone()).or_insert_with(Instant::now);
            }
            let was = t.address.insert(name, address.clone());
            if was.is_some_and(|w| !w.is_empty() && w != address) {
                t.changes += 1;
            }
        }
    })
}

/// Waits until `done()` or the deadline; `false` on timeout.
async fn wait_until<F, Fut>(deadline: Instant, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if done().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `f(i)` for `0..n` with `concurrency` in flight; the first error wins.
async fn for_each<F, Fut>(n: usize, concurrency: usize, f: F) -> Result<(), BenchError>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
}

async fn run(args: Args) -> Result<(), BenchError> {
    let start = Instant::now();
    let operator_bin = match &args.operator {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("cloudlb"),
    };
    if !operator_bin.is_file() {
        return Err(BenchError::Operator(format!(
            "{} not found: build it (cargo build --release --bin cloudlb) or pass --operator",
            operator_bin.display()
        )));
    }
    let tgs = target_groups(args.services);
    // Every port needs a nodePort.
    let range_end = (30000 + (tgs + 1000).max(2767)).min(65535);
    if args.keep {
        keep_scratch_dirs();
    }
    // No controller-manager: nothing here needs EndpointSlices or ServiceAccounts.
    let cluster = TestCluster::builder()
        .node_port_range(format!("30000-{range_end}"))
        .controller_manager(false)
        .start()
        .await;
    let moto = AwsEmulator::start_with(!args.stock_moto).await;
    say(
        start,
        format!(
            "testbed up: kube-apiserver + etcd + moto (scratch {})",
            cluster.dir().display()
        ),
    );
    let client = cluster.client();
    setup_kube(&client).await?;

    // Nodes: instances in moto (directly, not through the proxy) and Node objects.
    let aws = Aws::new(moto.endpoint());
    let subnets = create_vpc_with_subnets(&aws.ec2, CLUSTER)
        .await
        .public_subnets;
    let mut instances = Vec::new();
    let mut i = 0;
    while instances.len() < args.nodes {
        let subnet = &subnets[i % subnets.len()];
        // RunInstances in batches of 100, round-robin over the zones.
        let batch = (args.nodes - instances.len()).min(100) as i32;
        instances.extend(run_instances(&aws.ec2, &subnet.id, batch).await);
        i += 1;
    }
    let instances = Arc::new(instances);
    for_each(instances.len(), args.concurrency, |i| {
        let (client, instances) = (client.clone(), instances.clone());
        async move {
            create_node(&client, &node_for(&instances[i], &format!("node-{i:05}"))).await;
            Ok(())
        }
    })
    .await?;
    say(start, format!("{} Nodes and instances created", args.nodes));

    // The operator, through the counting proxy.
    let proxy = FaultProxy::start(ProxyConfig::new(moto.endpoint().to_string())).await?;
    if let Some(quota) = args.aws_quota {
        proxy.set_faults(FaultConfig {
            quota: Some(quota),
            ..FaultConfig::none()
        })?;
    }
    let env = [
        (
            "KUBECONFIG",
            cluster.kubeconfig_path().display().to_string(),
        ),
        ("AWS_ENDPOINT_URL", proxy.endpoint()),
        ("AWS_ACCESS_KEY_ID", "AKIACLOUDLBBENCH0000".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "cloudlb-bench-secret".to_string()),
        ("AWS_REGION", cloudlb_testbed::aws::REGION.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ];
    let op_args: Vec<String> = [
        "run",
        "--cluster-name",
        CLUSTER,
        "--no-local",
        "--aws-rate-limit",
        &args.aws_rate_limit.to_string(),
        "--aws-rate-adaptive",
        &args.aws_rate_adaptive.to_string(),
        "--log-level",
        &args.operator_log_level,
        // The API server's range (wider than the default at this size): the backend rules
        // admit it whole, not port by port.
        "--node-port-range",
        &format!("30000-{range_end}"),
        // As the chart runs it: replicas hold a Lease, only its holder reconciles.
        "--leader-elect",
        "--lease-namespace",
        NAMESPACE,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let launch = Launch {
        bin: operator_bin.clone(),
        args: op_args,
        env: env.to_vec(),
        dir: cluster.dir().to_path_buf(),
        cap_kb: args.max_operator_rss_mib.saturating_mul(1024),
        started: Mutex::new(0),
    };
    let operator_started = Instant::now();
    let op = launch.start(NO_DRIFT_CHECKS).await?;
    // The first replica takes the free lease at once.
    let leading = wait_until(Instant::now() + Duration::from_secs(60), || op.leading()).await;
    if !leading {
        let log = op.proc.log_section(40);
        return Err(BenchError::Operator(format!(
            "no leader within 60 s:\n{log}"
        )));
    }
    say(
        start,
        format!("operator ready ({})", operator_bin.display()),
    );

    let mut report = Report::new(&args, tgs, operator_bin.display().to_string());
    report.baseline(op.memory().0);
    let track = Arc::new(Mutex::new(Track::default()));
    let watch = watch_status(client.clone(), track.clone());
    let mut bench = Bench {
        args: &args,
        start,
        proxy: &proxy,
        op,
        launch,
        peak_kb: 0,
        client: client.clone(),
        services: Api::namespaced(client.clone(), NAMESPACE),
        aws: &aws,
        subnet: subnets[0].id.clone(),
        track,
        tgs,
        quiet: Duration::from_secs(args.quiet_secs),
        timeout: Duration::from_secs(args.phase_timeout_secs),
    };
    match bench.phases(&mut report, args.stop_after).await {
        Ok(()) => {}
        Err(BenchError::OperatorDied(why)) => {
            say(start, format!("the operator died: {why}"));
            report.died(why);
        }
        Err(e) => return Err(e),
    }
    watch.abort();

    let (_, hwm) = bench.op.memory();
    report.rss_timeline(bench.op.dog.samples());
    report.finish(
        hwm.max(bench.op.dog.max_kb()).max(bench.peak_kb),
        operator_started.elapsed().as_secs_f64(),
        bench.op.proc.exited().map(|s| s.to_string()),
    );
    print!("{}", report.table());
    let path = args.json.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "cloudlb-bench-{}x{}.json",
            args.services, args.nodes
        ))
    });
    std::fs::write(&path, serde_json::to_string_pretty(&report.json())?)?;
    say(start, format!("results written to {}", path.display()));
    Ok(())
}

/// How a new operator takes over in the takeover phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Takeover {
    /// `kill -9` of the only replica, then a new one (it waits for the lease to expire).
    Restart,
    /// Two replicas: `kill -9` of the leader; the standby takes over when the lease expires.
    Failover,
    /// A new replica starts, then the old one gets SIGTERM and releases the lease.
    RollingUpgrade,
}

impl Takeover {
    fn phase(self) -> &'static str {
        match self {
            Takeover::Restart => "restart (kill -9)",
            Takeover::Failover => "leader failover",
            Takeover::RollingUpgrade => "rolling upgrade",
        }
    }
}

/// How the operator is started (again, by the takeover and sweep phases).
struct Launch {
    bin: PathBuf,
    /// `cloudlb run` flags but the resync interval and the metrics address.
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    dir: PathBuf,
    cap_kb: u64,
    /// Processes started so far (each gets its own log).
    started: Mutex<u32>,
}

impl Launch {
    /// Starts the operator with `--resync-seconds resync` and waits until it is ready.
    async fn start(&self, resync: u64) -> Result<Operator, BenchError> {
        let metrics_port = free_port();
        let n = {
            let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
            *started += 1;
            *started
        };
        let mut args = self.args.clone();
        args.extend([
            "--resync-seconds".to_string(),
            resync.to_string(),
            "--metrics-addr".to_string(),
            format!("127.0.0.1:{metrics_port}"),
            "--lease-identity".to_string(),
            format!("bench-operator-{n}"),
        ]);
        let name = if n == 1 {
            "operator".to_string()
        } else {
            format!("operator-{n}")
        };
        let proc = ManagedProcess::spawn_with_env(&name, &self.bin, &args, &self.env, &self.dir)?;
        let dog = Watchdog::spawn(proc.pid(), self.cap_kb);
        let op = Operator {
            proc,
            metrics_port,
            dog,
        };
        let ready = wait_until(Instant::now() + Duration::from_secs(60), || async {
            matches!(http_get(metrics_port, "/readyz").await, Some((200, _)))
        })
        .await;
        if !ready {
            let log = op.proc.log_section(40);
            return Err(BenchError::Operator(format!(
                "not ready within 60 s:\n{log}"
            )));
        }
        Ok(op)
    }
}

/// What the phases share.
struct Bench<'a> {
    args: &'a Args,
    start: Instant,
    proxy: &'a FaultProxy,
    op: Operator,
    launch: Launch,
    /// The highest peak RSS of the operators killed so far.
    peak_kb: u64,
    client: Client,
    services: Api<Service>,
    aws: &'a Aws,
    /// Where the extra node's instance goes.
    subnet: String,
    track: Arc<Mutex<Track>>,
    /// Target groups of all Services.
    tgs: usize,
    quiet: Duration,
    timeout: Duration,
}

impl Bench<'_> {
    async fn phases(&mut self, report: &mut Report, stop: StopAfter) -> Result<(), BenchError> {
        self.wave(report).await?;
        if stop > StopAfter::Wave {
            self.resync(report).await?;
        }
        if stop > StopAfter::Resync {
            self.node_added(report).await?;
        }
        if stop > StopAfter::NodeAdd {
            self.node_removed(report).await?;
        }
        if stop > StopAfter::NodeRemove {
            self.endpoint_churn(report).await?;
        }
        if stop > StopAfter::EndpointChurn {
            for how in [
                Takeover::Restart,
                Takeover::Failover,
                Takeover::RollingUpgrade,
            ] {
                self.takeover(report, how).await?;
            }
        }
        if stop > StopAfter::Restart {
            self.sweep(report).await?;
        }
        if stop > StopAfter::Sweep {
            self.delete_all(report).await?;
        }
        Ok(())
    }

    /// Stops the operator (`kill -9`, or SIGTERM when `graceful`) and starts a new one with
    /// `--resync-seconds resync`, ready (leading once the lease is free: at once after a graceful
    /// stop, after the lease expires after a kill).
    async fn relaunch(&mut self, resync: u64, graceful: bool) -> Result<(), BenchError> {
        self.retire_leader(graceful).await;
        self.op = self.launch.start(resync).await?;
        Ok(())
    }

    /// Stops the current operator, keeping its peak RSS.
    async fn retire_leader(&mut self, graceful: bool) {
        self.peak_kb = self
            .peak_kb
            .max(self.op.memory().1)
            .max(self.op.dog.max_kb());
        if graceful {
            self.op.terminate().await;
        } else {
            self.op.proc.kill();
        }
    }

    /// A new operator takes over from the converged one: `how` says how. Cloud calls in the
    /// first minute and until steady, time until the new one leads and reconciled every
    /// Service, status changes.
    async fn takeover(&mut self, report: &mut Report, how: Takeover) -> Result<(), BenchError> {
        let n = self.args.services as f64;
        // A second replica, standing by before the leader goes (failover, rolling upgrade).
        let standby = match how {
            Takeover::Restart => None,
            Takeover::Failover | Takeover::RollingUpgrade => {
                Some(self.launch.start(NO_DRIFT_CHECKS).await?)
            }
        };
        let changes = lock(&self.track).changes;
        self.proxy.reset_counts();
        let t0 = Instant::now();
        match standby {
            None => self.relaunch(NO_DRIFT_CHECKS, false).await?,
            Some(next) => {
                self.retire_leader(how == Takeover::RollingUpgrade).await;
                self.op = next;
            }
        }
        let stopped_secs = t0.elapsed().as_secs_f64();
        let led = self.wait(t0 + self.timeout, || self.op.leading()).await?;
        let leading_secs = t0.elapsed().as_secs_f64();
        let all = self
            .wait(t0 + self.timeout, || async {
                self.op.reconciles().await.values().sum::<f64>() >= n
            })
            .await?;
        let reconciled_secs = t0.elapsed().as_secs_f64();
        self.wait(t0 + FIRST_WINDOW, || async { false }).await?;
        let first_minute = self.proxy.counts();
        self.settle().await?;
        let secs = t0.elapsed().as_secs_f64();
        let fresh = Mark {
            calls: 0.0,
            reconciles: BTreeMap::new(),
        };
        let name = how.phase();
        let mut phase = Phase::new(name, secs, self.proxy.counts(), &self.op, &fresh).await;
        let changed = lock(&self.track).changes - changes;
        phase.note(format!(
            "old leader gone after {stopped_secs:.1} s; the new one led after {leading_secs:.1} s{} and had reconciled every Service after {reconciled_secs:.1} s{}; {} cloud calls in the first {} s; {changed} status changes",
            if led { "" } else { " (timed out)" },
            if all { "" } else { " (timed out)" },
            first_minute.total,
            FIRST_WINDOW.as_secs()
        ));
        phase.first_window = Some(first_minute);
        phase.status_changes = Some(changed);
        say(
            self.start,
            format!("{name}: {} calls until steady", phase.total),
        );
        report.phase(phase);
        Ok(())
    }

    /// One full drift sweep: a new operator with `--resync-seconds` = `--sweep-seconds`
    /// re-verifies every Service once, its checks spread over that window (the checkpoints make
    /// the start itself free). Calls per second are sampled to show the spread.
    async fn sweep(&mut self, report: &mut Report) -> Result<(), BenchError> {
        let (n, window) = (self.args.services as f64, self.args.sweep_seconds);
        self.proxy.reset_counts();
        let t0 = Instant::now();
        self.relaunch(window, true).await?;
        let limit = t0 + Duration::from_secs(window * 2 + 120);
        let (mut per_second, mut last) = (Vec::new(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Some(why) = self.op.dog.death() {
                return Err(BenchError::OperatorDied(why));
            }
            let total = self.proxy.counts().total;
            per_second.push(total - last);
            last = total;
            let verified = self
                .op
                .reconciles()
                .await
                .get("verified")
                .copied()
                .unwrap_or(0.0);
            if verified >= n || Instant::now() > limit {
                break;
            }
        }
        // No settling here: the drift checks go on (the next sweep); the phase ends now.
        let secs = t0.elapsed().as_secs_f64();
        let fresh = Mark {
            calls: 0.0,
            reconciles: BTreeMap::new(),
        };
        let mut phase =
            Phase::new("drift sweep", secs, self.proxy.counts(), &self.op, &fresh).await;
        // No drift check can be due before 90 % of the window (the jitter) after the start: any
        // call before is not the sweep's. The sweep runs from the first second with calls after.
        let quiet = ((window as f64 * 0.9) as usize).min(per_second.len());
        let before: u64 = per_second[..quiet].iter().sum();
        let from = (quiet..per_second.len())
            .find(|&i| per_second[i] > 0)
            .unwrap_or(per_second.len());
        let during = &per_second[from..];
        let sweep_calls: u64 = during.iter().sum();
        let average = sweep_calls as f64 / during.len().max(1) as f64;
        let peak = during.iter().copied().max().unwrap_or(0);
        let verified = phase.reconciles.get("verified").copied().unwrap_or(0.0);
        phase.note(format!(
            "window {window} s; {before} calls in the first {quiet} s (no check due yet); the first drift check at {from} s; {verified} of {n} Services verified; the sweep: {sweep_calls} calls in {} s, {:.2} reads per Service, {average:.1} calls/s on average, busiest second {peak}",
            during.len(),
            phase.reads() as f64 / n.max(1.0),
        ));
        phase.sweep = Some(Sweep {
            before_first_check: before,
            seconds: during.len(),
            average,
            peak,
            reads_per_service: phase.reads() as f64 / n.max(1.0),
            verified,
        });
        say(
            self.start,
            format!("drift sweep: {sweep_calls} calls in {} s", during.len()),
        );
        report.phase(phase);
        // The later phases run without drift checks again (free: the checkpoints).
        self.relaunch(NO_DRIFT_CHECKS, true).await?;
        self.settle().await?;
        Ok(())
    }

    /// [`wait_until`], but ends at once with [`BenchError::OperatorDied`] when the operator dies.
    async fn wait<F, Fut>(&self, deadline: Instant, mut done: F) -> Result<bool, BenchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let dog = &self.op.dog;
        let ok = wait_until(deadline, || {
            let fut = done();
            async move { dog.death().is_some() || fut.await }
        })
        .await;
        match dog.death() {
            Some(why) => Err(BenchError::OperatorDied(why)),
            None => Ok(ok),
        }
    }

    /// Waits until the operator made no cloud call for `quiet`.
    async fn settle(&self) -> Result<bool, BenchError> {
        let deadline = Instant::now() + self.timeout;
        self.wait(deadline, || async { self.proxy.idle_for() >= self.quiet })
            .await
    }

    /// Creates every Service and waits for every status.
    async fn wave(&self, report: &mut Report) -> Result<(), BenchError> {
        let (args, start, track) = (self.args, self.start, &self.track);
        let m = mark(self.proxy, &self.op).await;
        let t0 = Instant::now();
        for_each(args.services, args.concurrency, |i| {
            let (services, track) = (self.services.clone(), track.clone());
            async move {
                let svc = service(i)?;
                lock(&track).created.insert(service_name(i), Instant::now());
                services.create(&PostParams::default(), &svc).await?;
                Ok(())
            }
        })
        .await?;
        say(
            start,
            format!(
                "{} Services created in {:.1} s; waiting for every status",
                args.services,
                t0.elapsed().as_secs_f64()
            ),
        );
        let mut last_log = Instant::now();
        let waited = self
            .wait(t0 + self.timeout, || {
                let n = lock(track).status.len();
                if last_log.elapsed() > Duration::from_secs(30) {
                    say(start, format!("  {n}/{} statuses written", args.services));
                    last_log = Instant::now();
                }
                async move { n >= args.services }
            })
            .await;
        let (latencies, wave_secs, statuses) = {
            let t = lock(track);
            let mut lat: Vec<f64> = t
                .status
                .iter()
                .filter_map(|(name, at)| {
                    Some(
                        at.saturating_duration_since(*t.created.get(name)?)
                            .as_secs_f64(),
                    )
                })
                .collect();
            lat.sort_by(f64::total_cmp);
            let first = t.created.values().min().copied().unwrap_or(t0);
            let last = t.status.values().max().copied().unwrap_or(first);
            (
                lat,
                last.saturating_duration_since(first).as_secs_f64(),
                t.status.len(),
            )
        };
        say(
            start,
            format!(
                "create wave: {statuses}/{} statuses in {wave_secs:.1} s",
                args.services
            ),
        );
        // A dead operator: record how far the wave got, then end the run.
        let settled = match &waited {
            Ok(_) => self.settle().await,
            Err(_) => Ok(false),
        };
        let mut phase =
            Phase::new("create wave", wave_secs, self.proxy.counts(), &self.op, &m).await;
        let converged = matches!(waited, Ok(true));
        phase.note(format!(
            "{statuses}/{} Services got a status{}",
            args.services,
            if converged { "" } else { " (not all)" }
        ));
        report.wave(phase, &latencies, statuses);
        waited?;
        settled?;
        Ok(())
    }

    /// An unchanged resync of everything: a no-op annotation on every Service makes the
    /// operator reconcile each one with an unchanged desired state.
    async fn resync(&self, report: &mut Report) -> Result<(), BenchError> {
        let args = self.args;
        let m = mark(self.proxy, &self.op).await;
        let want = m.reconciles.values().sum::<f64>() + args.services as f64;
        let t0 = Instant::now();
        let stamp = format!("{}", self.start.elapsed().as_millis());
        for_each(args.services, args.concurrency, |i| {
            let (services, stamp) = (self.services.clone(), stamp.clone());
            async move {
                let patch =
                    json!({"metadata": {"annotations": {"bench.cloudlb.io/touched": stamp}}});
                services
                    .patch(
                        &service_name(i),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                Ok(())
            }
        })
        .await?;
        let all = self
            .wait(t0 + self.timeout, || async {
                self.op.reconciles().await.values().sum::<f64>() >= want
            })
            .await?;
        let secs = t0.elapsed().as_secs_f64();
        self.settle().await?;
        let mut phase =
            Phase::new("unchanged resync", secs, self.proxy.counts(), &self.op, &m).await;
        if !all {
            phase.note("timed out before every Service was reconciled".into());
        }
        say(
            self.start,
            format!("unchanged resync: {} calls", phase.total),
        );
        report.phase(phase);
        Ok(())
    }

    /// Waits until `action` was called once per target group (or the timeout), then for quiet.
    async fn node_phase(
        &self,
        name: &str,
        action: &str,
        m: Mark,
        t0: Instant,
    ) -> Result<Phase, BenchError> {
        let want = self.tgs as u64;
        self.wait(t0 + self.timeout, || async {
            self.proxy.counts().action(action) >= want
        })
        .await?;
        let secs = t0.elapsed().as_secs_f64();
        self.settle().await?;
        let phase = Phase::new(name, secs, self.proxy.counts(), &self.op, &m).await;
        say(self.start, format!("{name}: {} calls", phase.total));
        Ok(phase)
    }

    async fn node_added(&self, report: &mut Report) -> Result<(), BenchError> {
        let extra = run_instances(&self.aws.ec2, &self.subnet, 1).await;
        let Some(instance) = extra.first() else {
            return Err(BenchError::Aws("RunInstances returned nothing".into()));
        };
        let m = mark(self.proxy, &self.op).await;
        let t0 = Instant::now();
        create_node(&self.client, &node_for(instance, EXTRA_NODE)).await;
        report.phase(
            self.node_phase("node added", "RegisterTargets", m, t0)
                .await?,
        );
        Ok(())
    }

    async fn node_removed(&self, report: &mut Report) -> Result<(), BenchError> {
        let m = mark(self.proxy, &self.op).await;
        let t0 = Instant::now();
        Api::<Node>::all(self.client.clone())
            .delete(EXTRA_NODE, &DeleteParams::default())
            .await?;
        report.phase(
            self.node_phase("node removed", "DeregisterTargets", m, t0)
                .await?,
        );
        Ok(())
    }

    /// One Service with pod targets behind [`CHURN_PODS`] endpoints; once they are registered,
    /// one endpoint's readiness flips every 1/[`CHURN_RATE`] s for [`CHURN_SECONDS`]; counts the
    /// (de)register calls per target group per second of churn. The Service is deleted after.
    async fn endpoint_churn(&self, report: &mut Report) -> Result<(), BenchError> {
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": CHURN_SERVICE, "annotations": {"cloudlb.io/target-type": "ip"}},
            "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        }))?;
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), NAMESPACE);
        let mut ready = vec![true; CHURN_PODS];
        let slice = |ready: &[bool]| -> Result<EndpointSlice, BenchError> {
            let endpoints: Vec<_> = ready
                .iter()
                .enumerate()
                .map(|(i, r)| json!({"addresses": [format!("10.0.{}.{}", 100 + i / 200, 10 + i % 200)], "conditions": {"ready": r}}))
                .collect();
            Ok(serde_json::from_value(json!({
                "metadata": {"name": format!("{CHURN_SERVICE}-1"),
                    "labels": {"kubernetes.io/service-name": CHURN_SERVICE}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))?)
        };
        slices
            .create(&PostParams::default(), &slice(&ready)?)
            .await?;
        self.services.create(&PostParams::default(), &svc).await?;
        let registered = || async { self.proxy.counts().action("RegisterTargets") >= 1 };
        self.wait(Instant::now() + self.timeout, registered).await?;
        self.settle().await?;
        let m = mark(self.proxy, &self.op).await;
        let t0 = Instant::now();
        let every = Duration::from_secs(1) / CHURN_RATE;
        let mut changes = 0u32;
        let mut tick = tokio::time::interval(every);
        while t0.elapsed() < Duration::from_secs(CHURN_SECONDS) {
            tick.tick().await;
            // A deterministic walk over the endpoints: each flip is a real change.
            let i = (changes as usize * 37) % CHURN_PODS;
            ready[i] = !ready[i];
            let name = format!("{CHURN_SERVICE}-1");
            slices
                .replace(&name, &PostParams::default(), &{
                    let mut s = slice(&ready)?;
                    s.metadata.resource_version =
                        slices.get(&name).await?.metadata.resource_version;
                    s
                })
                .await?;
            changes += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        self.settle().await?;
        let mut phase = Phase::new("endpoint churn", secs, self.proxy.counts(), &self.op, &m).await;
        let calls =
            phase.counts.action("RegisterTargets") + phase.counts.action("DeregisterTargets");
        phase.note(format!(
            "{changes} readiness changes of {CHURN_PODS} endpoints in {secs:.1} s ({:.1}/s); 1 target group; {calls} (de)register calls = {:.2} per target group per second of churn",
            f64::from(changes) / secs,
            calls as f64 / secs
        ));
        say(
            self.start,
            format!("endpoint churn: {calls} (de)register calls in {secs:.1} s"),
        );
        report.phase(phase);
        self.services
            .delete(CHURN_SERVICE, &DeleteParams::default())
            .await?;
        let gone = || async {
            self.services
                .get_opt(CHURN_SERVICE)
                .await
                .ok()
                .flatten()
                .is_none()
        };
        self.wait(Instant::now() + self.timeout, gone).await?;
        slices
            .delete(&format!("{CHURN_SERVICE}-1"), &DeleteParams::default())
            .await?;
        self.settle().await?;
        Ok(())
    }

    /// Deletes every Service, waits until they are gone, counts what is left in moto.
    async fn delete_all(&self, report: &mut Report) -> Result<(), BenchError> {
        let args = self.args;
        let m = mark(self.proxy, &self.op).await;
        let t0 = Instant::now();
        for_each(args.services, args.concurrency, |i| {
            let services = self.services.clone();
            async move {
                services
                    .delete(&service_name(i), &DeleteParams::default())
                    .await?;
                Ok(())
            }
        })
        .await?;
        let remaining = || async {
            self.services
                .list_metadata(&ListParams::default())
                .await
                .map_or(usize::MAX, |l| l.items.len())
        };
        let gone = self
            .wait(t0 + self.timeout, || async { remaining().await == 0 })
            .await?;
        let remaining = remaining().await;
        let secs = t0.elapsed().as_secs_f64();
        self.settle().await?;
        let mut phase = Phase::new("delete all", secs, self.proxy.counts(), &self.op, &m).await;
        let (lbs, tgs, sgs) = self.aws.leftovers().await?;
        phase.note(format!(
            "{remaining} Services left{}; left in moto: {lbs} load balancers, {tgs} target groups, {sgs} security groups tagged for the cluster",
            if gone { "" } else { " (timed out)" }
        ));
        say(
            self.start,
            format!("delete all: {} calls in {secs:.1} s", phase.total),
        );
        report.phase(phase);
        report.leftovers(lbs, tgs, sgs);
        Ok(())
    }
}

/// A minimal HTTP/1.0 GET on loopback: `(status, body)`.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
            .await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()?
        .ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((status, body))
}
