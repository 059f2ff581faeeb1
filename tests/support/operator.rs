//! The operator as a process: `cloudlb run` started with its own log file and metrics port,
//! killed when dropped (its log printed when the test failed).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::TestCluster;
use super::aws::REGION;
use super::process::free_port;

/// The environment that points the AWS SDK in the `cloudlb` binary at `endpoint` (moto, or the
/// fault proxy in front of it) with test credentials.
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "AKIACLOUDLBTEST00000".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "cloudlb-test-secret".to_string()),
        ("AWS_REGION", REGION.to_string()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
    ]
}

/// The environment of a `cloudlb` process against the testbed: [`aws_env`] for `endpoint` and
/// the kubeconfig of `cluster`.
pub fn operator_env(endpoint: &str, cluster: &TestCluster) -> Vec<(&'static str, String)> {
    let mut vars = aws_env(endpoint);
    vars.push((
        "KUBECONFIG",
        cluster.kubeconfig_path().display().to_string(),
    ));
    vars
}

/// The arguments that give a `cloudlb run` or `cloudlb plan` a test's own world: the cluster
/// name, the namespace and the LoadBalancerClass, all named `ns` (as [`super::env::Env`] sets
/// them up).
pub fn scope_args(ns: &str) -> Vec<&str> {
    vec!["--cluster-name", ns, "--namespace", ns, "--classes", ns]
}

/// Lines of the operator's log printed when a test fails.
const LOG_TAIL: usize = 100;

/// A `cloudlb run` child process, killed when dropped.
pub struct OperatorProcess {
    pub child: Child,
    metrics_port: u16,
    log: PathBuf,
}

impl OperatorProcess {
    /// `cloudlb run ARGS --metrics-addr 127.0.0.1:<free port>` with `env` added to the
    /// environment; `name` names its log file.
    pub fn start(name: &str, args: &[&str], env: &[(&str, String)]) -> OperatorProcess {
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!(
            "cloudlb-{name}-{}-{metrics_port}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cloudlb"))
            .arg("run")
            .args(args)
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start cloudlb");
        OperatorProcess {
            child,
            metrics_port,
            log,
        }
    }

    /// GET `path` on the metrics listener: (status, body), or None while it does not answer.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port))
            .await
            .ok()?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    }

    /// A metric's value: the sum of its samples whose line contains `filter` (NaN while the
    /// metrics listener does not answer).
    pub async fn metric(&self, name: &str, filter: &str) -> f64 {
        let Some((_, body)) = self.get("/metrics").await else {
            return f64::NAN;
        };
        body.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "==== operator log {} (last {LOG_TAIL} lines) ====\n{}",
                self.log.display(),
                lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
