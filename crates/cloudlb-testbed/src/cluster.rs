//! A real Kubernetes control plane on loopback ports: etcd, kube-apiserver and
//! kube-controller-manager, of the versions in `testbed/versions` (built from Go modules by
//! scripts/install-test-deps; `CLOUDLB_KUBE_VERSION` selects another release).

use crate::tls::{openssl, path_str};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::process::{
    ManagedProcess, TempDir, announce_started, etcd_binary, free_port, kube_binary,
    start_on_free_ports,
};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const ADMIN_USER: &str = "admin";

static SHARED: OnceCell<TestCluster> = OnceCell::const_new();

/// The shared cluster if some test already started it (used to print logs on failure).
pub(crate) fn shared_if_started() -> Option<&'static TestCluster> {
    SHARED.get()
}

/// Options for [`TestCluster`]; `TestCluster::start()` uses the defaults.
#[derive(Debug, Clone)]
pub struct TestClusterBuilder {
    node_port_range: String,
    extra_args: Vec<String>,
    controller_manager: bool,
}

impl Default for TestClusterBuilder {
    fn default() -> Self {
        Self {
            node_port_range: "30000-32767".into(),
            extra_args: Vec::new(),
            controller_manager: true,
        }
    }
}

impl TestClusterBuilder {
    /// `--service-node-port-range`, e.g. `"30000-32767"` (default) or `"20000-32767"` for scale
    /// tests that need more LoadBalancer Services than the default range holds.
    pub fn node_port_range(mut self, range: impl Into<String>) -> Self {
        self.node_port_range = range.into();
        self
    }

    /// An extra kube-apiserver flag such as `"--v=4"`.
    pub fn apiserver_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Without kube-controller-manager (default: with). The benchmark runs without: it needs no
    /// EndpointSlices or ServiceAccounts, and those controllers would add load to what it measures.
    pub fn controller_manager(mut self, on: bool) -> Self {
        self.controller_manager = on;
        self
    }

    pub async fn start(self) -> TestCluster {
        let started = Instant::now();
        let dir = TempDir::new().expect("create a scratch directory for the test cluster");
        let files = ClusterFiles::write(dir.path());
        let started_on =
            start_on_free_ports("kube-apiserver", || self.try_start(&dir, &files)).await;
        let (procs, commands, url, ca_der) = started_on.unwrap_or_else(|log| {
            panic!(
                "the test cluster did not start (scratch dir {}):\n{log}",
                dir.path().display()
            )
        });
        let start_time = started.elapsed();
        announce_started("TestCluster", start_time, &url, &dir);
        TestCluster {
            processes: std::sync::Mutex::new(procs),
            commands,
            url,
            admin_token: files.admin_token.clone(),
            ca_der,
            kubeconfig: dir.path().join("kubeconfig"),
            start_time,
            dir,
        }
    }

    async fn try_start(
        &self,
        dir: &TempDir,
        files: &ClusterFiles,
    ) -> Result<(Processes, Commands, String, Vec<Vec<u8>>), String> {
        let etcd_bin = etcd_binary();
        let apiserver_bin = kube_binary("CLOUDLB_KUBE_APISERVER", "kube-apiserver");
        let kcm_bin = kube_binary("CLOUDLB_KUBE_CONTROLLER_MANAGER", "kube-controller-manager");
        let (etcd_port, peer_port, secure_port) = (free_port(), free_port(), free_port());

        let etcd_data = dir.path().join("etcd-data");
        let _ = std::fs::remove_dir_all(&etcd_data);
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        // One flag and its value per entry.
        let etcd_args = vec![
            "--name=testbed".to_string(),
            format!("--data-dir={}", path_str(&etcd_data)),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=testbed={peer_url}"),
            // Test data: durability across a machine crash does not matter, speed does.
            "--unsafe-no-fsync".to_string(),
        ];
        let mut etcd = ManagedProcess::spawn("etcd", &etcd_bin, &etcd_args, dir.path())
            .map_err(|e| format!("start etcd: {e}"))?;

        let mut apiserver_args = vec![
            format!("--etcd-servers={client_url}"),
            "--bind-address=127.0.0.1".to_string(),
            format!("--secure-port={secure_port}"),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--cert-dir={}", path_str(&files.cert_dir)),
            format!("--token-auth-file={}", path_str(&files.token_file)),
            "--authorization-mode=RBAC".to_string(),
            format!("--service-account-key-file={}", path_str(&files.sa_pub)),
            format!(
                "--service-account-signing-key-file={}",
                path_str(&files.sa_key)
            ),
            "--service-account-issuer=https://kubernetes.default.svc".to_string(),
            "--service-cluster-ip-range=10.96.0.0/16".to_string(),
            format!("--service-node-port-range={}", self.node_port_range),
            // No kubelets or other API servers: nothing to reconcile the `kubernetes` Endpoints
            // for (from 1.37 a loopback --advertise-address is refused without this).
            "--endpoint-reconciler-type=none".to_string(),
        ];
        apiserver_args.extend(self.extra_args.iter().cloned());
        let mut apiserver = ManagedProcess::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &apiserver_args,
            dir.path(),
        )
        .map_err(|e| format!("start kube-apiserver: {e}"))?;

        let url = format!("https://127.0.0.1:{secure_port}");
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last_error = String::from("no answer yet");
        loop {
            let exited = [&mut etcd, &mut apiserver]
                .into_iter()
                .find_map(|p| p.exited().map(|status| (p.name().to_string(), status)));
            if let Some((name, status)) = exited {
                return Err(format!(
                    "{name} exited early ({status}):\n{}\n{}",
                    etcd.log_section(30),
                    apiserver.log_section(60)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver was not ready within {READY_TIMEOUT:?} (last: {last_error}):\n{}\n{}",
                    etcd.log_section(30),
                    apiserver.log_section(80)
                ));
            }
            // The server writes its self-signed certificate (plus CA) at start-up.
            match read_pem_certs(&files.ca_file) {
                Ok(ca_der) if !ca_der.is_empty() => {
                    let client = make_client(&url, &ca_der, &files.admin_token);
                    match tokio::time::timeout(Duration::from_secs(5), readyz(&client)).await {
                        Ok(Ok(_)) => {
                            let kubeconfig = dir.path().join("kubeconfig");
                            write_kubeconfig(&kubeconfig, &url, &files.ca_file, &files.admin_token);
                            let controller_manager = if self.controller_manager {
                                Some(
                                    start_controller_manager(
                                        dir,
                                        files,
                                        &kubeconfig,
                                        &kcm_bin,
                                        &client,
                                        deadline,
                                    )
                                    .await?,
                                )
                            } else {
                                None
                            };
                            let commands = Commands {
                                etcd: (etcd_bin, etcd_args),
                                apiserver: (apiserver_bin, apiserver_args),
                            };
                            let procs = Processes {
                                controller_manager,
                                apiserver,
                                etcd,
                                restarts: 0,
                            };
                            return Ok((procs, commands, url, ca_der));
                        }
                        Ok(Err(e)) => last_error = format!("/readyz: {e}"),
                        Err(_) => last_error = "/readyz timed out".into(),
                    }
                }
                Ok(_) => last_error = "no certificate yet".into(),
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The controllers the tests rely on. Never the node-lifecycle controller: it would taint the
/// test's Nodes, which have no kubelet. The service load-balancer controller is not part of
/// kube-controller-manager, so nothing competes with cloudlb.
const CONTROLLERS: &str = "namespace-controller,garbage-collector-controller,\
    endpointslice-controller,endpointslice-mirroring-controller,serviceaccount-controller,\
    serviceaccount-token-controller,root-ca-certificate-publisher-controller,\
    clusterrole-aggregation-controller";

/// Starts kube-controller-manager against the ready API server (the admin kubeconfig, which is
/// also the one for humans) and waits until it works: the `default` ServiceAccount of the `default`
/// namespace exists.
async fn start_controller_manager(
    dir: &TempDir,
    files: &ClusterFiles,
    kubeconfig: &Path,
    program: &Path,
    client: &Client,
    deadline: Instant,
) -> Result<ManagedProcess, String> {
    let args = vec![
        format!("--kubeconfig={}", path_str(kubeconfig)),
        "--leader-elect=false".to_string(),
        // No HTTPS endpoint: nothing reads it, and no port to race for.
        "--secure-port=0".to_string(),
        format!("--controllers={CONTROLLERS}"),
        format!(
            "--service-account-private-key-file={}",
            path_str(&files.sa_key)
        ),
        format!("--root-ca-file={}", path_str(&files.ca_file)),
    ];
    let mut kcm = ManagedProcess::spawn("kube-controller-manager", program, &args, dir.path())
        .map_err(|e| format!("start kube-controller-manager: {e}"))?;
    match wait_for_default_account(client, "default", deadline, || kcm.exited()).await {
        Ok(()) => Ok(kcm),
        Err(why) => Err(format!(
            "kube-controller-manager {why}:\n{}",
            kcm.log_section(60)
        )),
    }
}

/// Waits until namespace `namespace` has its `default` ServiceAccount (made by the
/// controller-manager's serviceaccount controller), giving up at `deadline` or when `exited`
/// reports the controller-manager gone.
async fn wait_for_default_account(
    client: &Client,
    namespace: &str,
    deadline: Instant,
    mut exited: impl FnMut() -> Option<std::process::ExitStatus>,
) -> Result<(), String> {
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    loop {
        if let Some(status) = exited() {
            return Err(format!("exited early ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "made no `default` ServiceAccount in namespace {namespace} within {READY_TIMEOUT:?}"
            ));
        }
        if let Ok(Some(_)) = accounts.get_opt("default").await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The running server processes (replaced by [`TestCluster::restart`]).
struct Processes {
    // Drop order: the controller-manager, then the API server, then its etcd. The
    // controller-manager is not restarted by [`TestCluster::restart`]: it reconnects by itself.
    controller_manager: Option<ManagedProcess>,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    restarts: u32,
}

/// How the processes were started: a restart runs the same commands (same ports, same data).
struct Commands {
    etcd: (PathBuf, Vec<String>),
    apiserver: (PathBuf, Vec<String>),
}

/// Credentials and keys written before the first start attempt.
struct ClusterFiles {
    cert_dir: PathBuf,
    ca_file: PathBuf,
    token_file: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
    admin_token: String,
}

impl ClusterFiles {
    fn write(dir: &Path) -> Self {
        let cert_dir = dir.join("certs");
        std::fs::create_dir_all(&cert_dir).expect("create the cert dir");
        let admin_token = format!("admin-{:016x}", rand::random::<u64>());
        let token_file = dir.join("tokens.csv");
        std::fs::write(
            &token_file,
            format!("{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n"),
        )
        .expect("write the token auth file");
        let sa_key = dir.join("sa.key");
        let sa_pub = dir.join("sa.pub");
        openssl(&["genrsa", "-out", path_str(&sa_key), "2048"]);
        openssl(&[
            "rsa",
            "-in",
            path_str(&sa_key),
            "-pubout",
            "-out",
            path_str(&sa_pub),
        ]);
        Self {
            ca_file: cert_dir.join("apiserver.crt"),
            cert_dir,
            token_file,
            sa_key,
            sa_pub,
            admin_token,
        }
    }
}

/// DER certificates from a PEM bundle. Base64 is decoded through k8s-openapi's `ByteString`.
fn read_pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("read {}: {e}", path.display())),
    };
    let mut certs = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            body = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            let b64 = body.take().ok_or("END without BEGIN in the certificate")?;
            let der: k8s_openapi::ByteString = serde_json::from_value(json!(b64))
                .map_err(|e| format!("decode the certificate: {e}"))?;
            certs.push(der.0);
        } else if let Some(body) = body.as_mut() {
            body.push_str(line);
        }
    }
    if body.is_some() {
        return Err("certificate file not completely written yet".into());
    }
    Ok(certs)
}

fn make_client(url: &str, ca_der: &[Vec<u8>], token: &str) -> Client {
    let mut config = kube::Config::new(url.parse().expect("the cluster URL is a valid URI"));
    config.root_cert = Some(ca_der.to_vec());
    config.auth_info.token = Some(token.to_string().into());
    Client::try_from(config).expect("build a kube client for the test cluster")
}

async fn readyz(client: &Client) -> Result<String, kube::Error> {
    let mut request = kube::core::Request::new("/readyz")
        .list(&ListParams::default())
        .expect("build a GET request");
    *request.uri_mut() = "/readyz".parse().expect("/readyz is a valid URI");
    client.request_text(request).await
}

fn write_kubeconfig(path: &Path, url: &str, ca_file: &Path, token: &str) {
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "cloudlb-test", "cluster": {
            "server": url,
            "certificate-authority": path_str(ca_file),
        }}],
        "users": [{"name": ADMIN_USER, "user": {"token": token}}],
        "contexts": [{"name": "cloudlb-test", "context": {
            "cluster": "cloudlb-test",
            "user": ADMIN_USER,
            "namespace": "default",
        }}],
        "current-context": "cloudlb-test",
    });
    let yaml = serde_saphyr::to_string(&kubeconfig).expect("serialize the kubeconfig");
    std::fs::write(path, yaml).expect("write the kubeconfig");
}

/// etcd + kube-apiserver + kube-controller-manager on free loopback ports, with an admin token (group
/// `system:masters`), RBAC on, and a service-account token signer.
///
/// Only processes, ports and credentials are stored: every `client()` call builds a new
/// [`kube::Client`] in the caller's tokio runtime, so one cluster can serve many
/// `#[tokio::test]`s (each has its own runtime).
pub struct TestCluster {
    // Field order is drop order: processes first, then their directory.
    processes: std::sync::Mutex<Processes>,
    commands: Commands,
    url: String,
    admin_token: String,
    ca_der: Vec<Vec<u8>>,
    kubeconfig: PathBuf,
    start_time: Duration,
    dir: TempDir,
}

impl TestCluster {
    pub fn builder() -> TestClusterBuilder {
        TestClusterBuilder::default()
    }

    /// A private cluster with default options; stopped and deleted when dropped.
    pub async fn start() -> TestCluster {
        Self::builder().start().await
    }

    /// The process-wide cluster, started on first use and killed when the test binary exits.
    /// Tests sharing it isolate themselves with [`TestCluster::create_namespace`].
    pub async fn shared() -> &'static TestCluster {
        SHARED.get_or_init(TestCluster::start).await
    }

    /// A new admin client (group `system:masters`), bound to the caller's runtime.
    pub fn client(&self) -> Client {
        make_client(&self.url, &self.ca_der, &self.admin_token)
    }

    /// A client authenticating with an arbitrary bearer token.
    pub fn client_with_token(&self, token: &str) -> Client {
        make_client(&self.url, &self.ca_der, token)
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig for kubectl (admin token, the server's own CA).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// How long [`TestClusterBuilder::start`] took.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs `kubectl --kubeconfig <this cluster> args…`.
    pub async fn kubectl(&self, args: &[&str]) -> Output {
        tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .await
            .expect("run kubectl")
    }

    /// Creates a namespace `<prefix>-<n>`, unique within this test process, and waits for its
    /// `default` ServiceAccount.
    pub async fn create_namespace(&self, prefix: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let namespace = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client())
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        // Pods need the namespace's `default` ServiceAccount (ServiceAccount admission), which
        // the controller-manager creates moments after the namespace.
        let deadline = Instant::now() + READY_TIMEOUT;
        if let Err(why) = wait_for_default_account(&self.client(), &name, deadline, || None).await {
            panic!("kube-controller-manager {why}:\n{}", self.log_tail(40));
        }
        name
    }

    /// A client authenticated as ServiceAccount `namespace/name` (created if missing), with a
    /// token from the TokenRequest API. It has no permissions until a test grants some.
    pub async fn service_account_client(&self, namespace: &str, name: &str) -> Client {
        let accounts = Api::<ServiceAccount>::namespaced(self.client(), namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        match accounts.create(&PostParams::default(), &account).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.is_already_exists() => {}
            Err(e) => panic!("create ServiceAccount {namespace}/{name}: {e}"),
        }
        let request = TokenRequest {
            spec: TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let token = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for ServiceAccount {namespace}/{name}: {e}"))
            .status
            .unwrap_or_else(|| panic!("TokenRequest for {namespace}/{name} returned no status"))
            .token;
        self.client_with_token(&token)
    }

    /// The last `n` lines of the kube-apiserver and etcd logs.
    pub fn log_tail(&self, n: usize) -> String {
        let p = self.processes.lock().unwrap_or_else(|p| p.into_inner());
        format!(
            "{}\n{}\n{}",
            p.apiserver.log_section(n),
            p.etcd.log_section(n),
            p.controller_manager
                .as_ref()
                .map(|kcm| kcm.log_section(n))
                .unwrap_or_default()
        )
    }

    /// Kills kube-apiserver and etcd (SIGKILL: no graceful shutdown), waits `down`, and starts
    /// both again with the same ports, certificates and etcd data; returns once `/readyz`
    /// answers. Clients made before keep working afterwards: same URL, same CA.
    pub async fn restart(&self, down: Duration) {
        let n = {
            let mut p = self.processes.lock().unwrap_or_else(|p| p.into_inner());
            p.apiserver.kill();
            p.etcd.kill();
            p.restarts += 1;
            p.restarts
        };
        tokio::time::sleep(down).await;
        let spawn = |name: &str, (program, args): &(PathBuf, Vec<String>)| {
            ManagedProcess::spawn(
                &format!("{name}-restart{n}"),
                program,
                args,
                self.dir.path(),
            )
            .unwrap_or_else(|e| panic!("restart {name}: {e}"))
        };
        let etcd = spawn("etcd", &self.commands.etcd);
        let apiserver = spawn("kube-apiserver", &self.commands.apiserver);
        {
            let mut p = self.processes.lock().unwrap_or_else(|p| p.into_inner());
            p.etcd = etcd;
            p.apiserver = apiserver;
        }
        let client = self.client();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), readyz(&client)).await {
                Ok(Ok(_)) => break,
                _ if Instant::now() > deadline => panic!(
                    "kube-apiserver not ready {READY_TIMEOUT:?} after restart {n}:\n{}",
                    self.log_tail(60)
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "test cluster logs (kubeconfig {}):\n{}",
                self.kubeconfig.display(),
                self.log_tail(40)
            );
        }
    }
}
