//! `cloudlb`: run the operator, preview changes, generate CRDs and docs.

use clap::{Parser, Subcommand};
use cloudlb::config::class::LoadBalancerClass;
use cloudlb::controller::{self, Providers, Settings};
use cloudlb::provider::aws::{AwsProvider, AwsSettings};
use cloudlb::provider::local::{LocalProvider, LocalSettings};
use cloudlb::telemetry::{self, LogFormat, Metrics};
use kube::CustomResourceExt;
use kube_lease_manager::LeaseManagerBuilder;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "cloudlb",
    version,
    about = "Load balancers for Kubernetes type=LoadBalancer Services"
)]
struct Cli {
    #[arg(
        long,
        env = "CLOUDLB_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[arg(long, env = "CLOUDLB_LOG_LEVEL", default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Cluster name: used in cloud resource names, ownership tags and subnet discovery.
    #[arg(long, env = "CLOUDLB_CLUSTER_NAME")]
    cluster_name: String,
    /// This installation's name (the chart passes its release name), recorded on every Service
    /// it owns: it never touches a Service recorded for another installation, so several can
    /// share a cluster (split by --classes). A DNS label: 1-63 lowercase letters, digits and
    /// `-`, starting and ending with a letter or digit.
    #[arg(long, env = "CLOUDLB_INSTALLATION", default_value = cloudlb::controller::DEFAULT_INSTALLATION, value_parser = installation_name)]
    installation: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "CLOUDLB_NAMESPACE")]
    namespace: Option<String>,
    /// Serve only these LoadBalancerClasses (comma-separated; default: all).
    #[arg(long, env = "CLOUDLB_CLASSES", value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// VPC of the cluster (default: the VPC of the load balancer's subnets).
    #[arg(long, env = "CLOUDLB_AWS_VPC_ID")]
    aws_vpc_id: Option<String>,
    /// Client-side limit on AWS calls per second, per call family.
    #[arg(long, env = "CLOUDLB_AWS_RATE_LIMIT", default_value_t = 10.0)]
    aws_rate_limit: f64,
    /// Whether that limit adapts to throttling (halved when AWS throttles, given back 10 % a
    /// second); `false` keeps it fixed.
    #[arg(long, env = "CLOUDLB_AWS_RATE_ADAPTIVE", default_value_t = true, action = clap::ArgAction::Set)]
    aws_rate_adaptive: bool,
    /// The cluster's nodePort range (kube-apiserver --service-node-port-range), `low-high`: the
    /// nodes' security groups admit the load balancers on it as one rule per protocol.
    #[arg(long, env = "CLOUDLB_NODE_PORT_RANGE", default_value = "30000-32767", value_parser = node_port_range)]
    node_port_range: (u16, u16),
    /// Reconciles running at once.
    #[arg(long, env = "CLOUDLB_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..))]
    concurrency: u16,
    /// Disable the AWS provider (classes with provider aws are then reported as unserved).
    #[arg(long, env = "CLOUDLB_NO_AWS")]
    no_aws: bool,
    /// Disable the local provider (the operator serving load balancers itself).
    #[arg(long, env = "CLOUDLB_NO_LOCAL")]
    no_local: bool,
}

#[derive(clap::Args, Clone)]
struct LeaderArgs {
    /// Only the holder of a Lease reconciles; other replicas stand by.
    #[arg(long, env = "CLOUDLB_LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    #[arg(long, env = "CLOUDLB_LEASE_NAME", default_value = "cloudlb-leader")]
    lease_name: String,
    /// Seconds a lease stays valid without renewal: how fast a standby takes over.
    #[arg(long, env = "CLOUDLB_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds before expiry the holder renews.
    #[arg(long, env = "CLOUDLB_LEASE_GRACE_SECONDS", default_value_t = 5)]
    lease_grace_seconds: u64,
    /// This replica's identity in the Lease (default: POD_NAME, else hostname and pid).
    #[arg(long, env = "POD_NAME")]
    lease_identity: Option<String>,
}

impl LeaderArgs {
    fn identity(&self) -> String {
        self.lease_identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

#[derive(clap::Args, Clone)]
struct WebhookArgs {
    /// Serve the mutating admission webhook (HTTPS, /mutate-service) on this address; every
    /// replica serves it. Unset: no webhook.
    #[arg(long, env = "CLOUDLB_WEBHOOK_ADDR")]
    webhook_addr: Option<std::net::SocketAddr>,
    /// The webhook's PEM certificate chain.
    #[arg(
        long,
        env = "CLOUDLB_WEBHOOK_CERT_FILE",
        default_value = "/etc/cloudlb/webhook/tls.crt"
    )]
    webhook_cert_file: std::path::PathBuf,
    /// The webhook's PEM private key.
    #[arg(
        long,
        env = "CLOUDLB_WEBHOOK_KEY_FILE",
        default_value = "/etc/cloudlb/webhook/tls.key"
    )]
    webhook_key_file: std::path::PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator.
    Run {
        #[command(flatten)]
        common: Common,
        /// Seconds between full re-verifications of each load balancer against the cloud (drift repair).
        #[arg(long, env = "CLOUDLB_RESYNC_SECONDS", default_value_t = 600)]
        resync_seconds: u64,
        #[command(flatten)]
        leader: LeaderArgs,
        /// Address of the /metrics, /healthz and /readyz endpoint. Loopback by default, so it
        /// never takes a port from a Service the local provider serves; the Helm chart sets the
        /// Pod's address.
        #[arg(long, env = "CLOUDLB_METRICS_ADDR", default_value = "127.0.0.1:8080")]
        metrics_addr: std::net::SocketAddr,
        #[command(flatten)]
        webhook: Box<WebhookArgs>,
    },
    /// Print what reconciling each Service would change, without changing anything.
    Plan {
        #[command(flatten)]
        common: Common,
    },
    /// Print the CustomResourceDefinition YAML.
    Crdgen,
    /// Print generated documentation (`annotations`).
    Docs {
        #[arg(value_parser = ["annotations"])]
        topic: String,
    },
}

/// `own_listeners`: the operator's own TCP listeners with the flag that set each, which the
/// local provider must never try to take.
async fn providers(
    common: &Common,
    metrics: &Arc<Metrics>,
    own_listeners: Vec<(std::net::SocketAddr, String)>,
) -> Providers {
    let mut p = Providers::default();
    if !common.no_aws {
        let mut s = AwsSettings::new(common.cluster_name.clone());
        s.vpc_id = common.aws_vpc_id.clone();
        s.rate_limit_per_sec = common.aws_rate_limit;
        s.adaptive_rate = common.aws_rate_adaptive;
        s.installation = common.installation.clone();
        s.node_port_range = common.node_port_range;
        p.aws = Some(Arc::new(
            AwsProvider::from_env(s).await.with_metrics(metrics.clone()),
        ));
    }
    if !common.no_local {
        p.local = Some(Arc::new(LocalProvider::new(LocalSettings {
            reserved: own_listeners,
            ..LocalSettings::default()
        })));
    }
    p
}

/// `--node-port-range`: `low-high`, 1-65535, low <= high.
fn node_port_range(v: &str) -> Result<(u16, u16), String> {
    let parsed = v.split_once('-').and_then(|(lo, hi)| {
        let (lo, hi) = (
            lo.trim().parse::<u16>().ok()?,
            hi.trim().parse::<u16>().ok()?,
        );
        (lo >= 1 && lo <= hi).then_some((lo, hi))
    });
    parsed.ok_or_else(|| format!("{v:?} is not a port range: low-high, for example 30000-32767"))
}

/// `--installation`: a DNS label.
fn installation_name(v: &str) -> Result<String, String> {
    let ok = (1..=63).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{v:?} is not a DNS label: 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit"
        ))
    }
}

fn settings(common: &Common) -> Settings {
    let mut s = Settings::new(common.cluster_name.clone());
    s.installation = common.installation.clone();
    s.namespace = common.namespace.clone();
    s.classes = common.classes.clone();
    s.concurrency = common.concurrency;
    s
}

/// One malloc arena instead of glibc's one per thread: memory freed by one thread is then reused
/// by the others instead of sitting in a private arena. Measured with `cloudlb-bench` at 2000
/// Services / 1000 Nodes: peak RSS 60.5 → 56.2 MiB. `MALLOC_ARENA_MAX` in the environment wins.
#[allow(unsafe_code)] // the one unsafe call in the operator
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only tunes the allocator; it runs before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format, &cli.log_level);
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), Box<dyn std::error::Error>> {
    match command {
        Command::Crdgen => {
            print!("{}", serde_saphyr::to_string(&LoadBalancerClass::crd())?);
        }
        Command::Docs { .. } => {
            print!("{}", cloudlb::config::annotations::markdown());
        }
        Command::Run {
            common,
            resync_seconds,
            leader,
            metrics_addr,
            webhook,
        } => {
            // First SIGTERM: stop taking new work and let running reconciles finish, but exit
            // within a grace period, also when the API server or the cloud does not answer.
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = tx.send(true);
            });
            let metrics = Arc::new(Metrics::new());
            let listener = tokio::net::TcpListener::bind(metrics_addr)
                .await
                .map_err(|e| format!("--metrics-addr {metrics_addr}: {e}"))?;
            tokio::spawn(cloudlb::http::serve(listener, metrics.clone()));
            let client = kube::Client::try_default().await?;
            let mut s = settings(&common);
            s.resync = Duration::from_secs(resync_seconds.max(10));
            let mut own = vec![(metrics_addr, "--metrics-addr".to_string())];
            if let Some(addr) = webhook.webhook_addr {
                start_webhook(&client, addr, &webhook, &common).await?;
                own.push((addr, "--webhook-addr".to_string()));
            }
            let providers = providers(&common, &metrics, own).await;
            tracing::info!(cluster = %s.cluster, leader_elect = leader.leader_elect, "cloudlb starting");
            let work = operate(client, s, providers, metrics, leader, rx.clone());
            tokio::select! {
                result = work => result?,
                _ = async { stopping(rx).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                    tracing::warn!("shutdown grace period over; exiting");
                }
            }
            tracing::info!("cloudlb stopped");
        }
        Command::Plan { common } => {
            let client = kube::Client::try_default().await?;
            let providers = providers(&common, &Arc::new(Metrics::new()), Vec::new()).await;
            let out = cloudlb::controller::plan_all(client, &settings(&common), &providers).await?;
            print!("{out}");
        }
    }
    Ok(())
}

/// Checks the webhook's certificate and key, binds its address and serves it in the background.
async fn start_webhook(
    client: &kube::Client,
    addr: std::net::SocketAddr,
    args: &WebhookArgs,
    common: &Common,
) -> Result<(), Box<dyn std::error::Error>> {
    let webhook = cloudlb::webhook::Webhook::new(cloudlb::webhook::WebhookSettings {
        cert_file: args.webhook_cert_file.clone(),
        key_file: args.webhook_key_file.clone(),
        classes: common.classes.clone(),
        installation: common.installation.clone(),
    })?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("--webhook-addr {addr}: {e}"))?;
    tokio::spawn(webhook.run(client.clone(), listener));
    Ok(())
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn stopping(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Runs the controller: at once, or with leader election only while holding the lease. Losing
/// the lease stops all work at once and ends the process with an error (Kubernetes restarts it
/// as a standby), so a former leader never writes concurrently with the new one.
async fn operate(
    client: kube::Client,
    settings: Settings,
    providers: Providers,
    metrics: Arc<Metrics>,
    leader: LeaderArgs,
    rx: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error>> {
    if !leader.leader_elect {
        metrics.set_leader(true);
        controller::run(client, settings, providers, metrics, stopping(rx)).await;
        return Ok(());
    }
    let namespace = leader.lease_namespace.clone().ok_or(
        "--leader-elect needs --lease-namespace (or the POD_NAMESPACE environment variable)",
    )?;
    let identity = leader.identity();
    let manager = LeaseManagerBuilder::new(client.clone(), leader.lease_name.clone())
        .with_namespace(namespace.clone())
        .with_identity(identity.clone())
        .with_duration(leader.lease_duration_seconds)
        .with_grace(leader.lease_grace_seconds)
        .build()
        .await?;
    let (mut leading, lease_task) = manager.watch().await;
    // A standby is ready: it serves probes and waits.
    metrics.set_ready(true);
    tracing::info!(%identity, lease = %format!("{namespace}/{}", leader.lease_name), "waiting for the leader lease");
    tokio::select! {
        r = leading.wait_for(|l| *l) => { r?; }
        _ = stopping(rx.clone()) => return Ok(()),
    }
    tracing::info!(%identity, "acquired the leader lease; reconciling");
    metrics.set_leader(true);
    let lost = async {
        let _ = leading.wait_for(|l| !*l).await;
    };
    let result = tokio::select! {
        _ = controller::run(client, settings, providers, metrics.clone(), stopping(rx)) => Ok(()),
        _ = lost => Err("lost the leader lease: stopped all work at once; exiting so a restart waits as a standby"),
    };
    metrics.set_leader(false);
    // Closing the channel ends the lease task, which hands the manager back to release the lease.
    drop(leading);
    if let Ok(Ok(manager)) = lease_task.await
        && result.is_ok()
    {
        let _ = manager.release().await;
    }
    Ok(result?)
}

/// Resolves on the first SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutdown signal received");
}
