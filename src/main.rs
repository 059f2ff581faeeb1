//! `cloudlb`: run the operator, preview changes, generate CRDs and docs.

use clap::{Parser, Subcommand};
use cloudlb::config::class::LoadBalancerClass;
use cloudlb::controller::{self, Providers, Settings};
use cloudlb::provider::aws::{AwsProvider, AwsSettings};
use cloudlb::provider::local::{LocalProvider, LocalSettings};
use cloudlb::telemetry::{self, LogFormat, Metrics};
use kube::CustomResourceExt;
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
    /// Disable the AWS provider (classes with provider aws are then reported as unserved).
    #[arg(long, env = "CLOUDLB_NO_AWS")]
    no_aws: bool,
    /// Disable the local provider (the operator serving load balancers itself).
    #[arg(long, env = "CLOUDLB_NO_LOCAL")]
    no_local: bool,
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

async fn providers(common: &Common, metrics: &Arc<Metrics>) -> Providers {
    let mut p = Providers::default();
    if !common.no_aws {
        let mut s = AwsSettings::new(common.cluster_name.clone());
        s.vpc_id = common.aws_vpc_id.clone();
        s.rate_limit_per_sec = common.aws_rate_limit;
        p.aws = Some(Arc::new(
            AwsProvider::from_env(s).await.with_metrics(metrics.clone()),
        ));
    }
    if !common.no_local {
        p.local = Some(Arc::new(LocalProvider::new(LocalSettings::default())));
    }
    p
}

fn settings(common: &Common) -> Settings {
    let mut s = Settings::new(common.cluster_name.clone());
    s.namespace = common.namespace.clone();
    s.classes = common.classes.clone();
    s
}

#[tokio::main]
async fn main() -> ExitCode {
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
            print!("{}", serde_yaml::to_string(&LoadBalancerClass::crd())?);
        }
        Command::Docs { .. } => {
            print!("{}", cloudlb::config::annotations::markdown());
        }
        Command::Run {
            common,
            resync_seconds,
        } => {
            let client = kube::Client::try_default().await?;
            let mut s = settings(&common);
            s.resync = Duration::from_secs(resync_seconds.max(10));
            let metrics = Arc::new(Metrics::new());
            let providers = providers(&common, &metrics).await;
            tracing::info!(cluster = %s.cluster, "cloudlb starting");
            // First SIGTERM: stop taking new work and let running reconciles finish, but exit
            // within a grace period even when the API server or the cloud does not answer.
            let (tx, rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                shutdown_signal().await;
                let _ = tx.send(true);
            });
            let stopping = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                _ = controller::run(client, s, providers, metrics, stopping(rx.clone())) => {}
                _ = async { stopping(rx).await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                    tracing::warn!("shutdown grace period over; exiting");
                }
            }
            tracing::info!("cloudlb stopped");
        }
        Command::Plan { common } => {
            let client = kube::Client::try_default().await?;
            let providers = providers(&common, &Arc::new(Metrics::new())).await;
            let out = cloudlb::controller::plan_all(client, &settings(&common), &providers).await?;
            print!("{out}");
        }
    }
    Ok(())
}

const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
