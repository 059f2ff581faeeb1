//! A compact, self-contained testbed for the benchmark: etcd, kube-apiserver (the versions in
//! `testbed/versions`) and moto on free loopback ports, with the flags the integration tests use
//! (their copy is in `tests/support/`, which a binary cannot import). No controller-manager: the
//! benchmark needs no EndpointSlices or ServiceAccounts, and its controllers would add load.
//! Binaries are found like the tests find them: `$CLOUDLB_ETCD`, `$CLOUDLB_KUBE_APISERVER`,
//! `$CLOUDLB_MOTO_SERVER`, else the cache that `scripts/install-test-deps` fills.
//!
//! Children are started through `setpriv --pdeathsig KILL` when it exists, from the main thread
//! (the thread that runs the main future), so they die with the benchmark however it ends; they
//! are also killed on drop.

use crate::BenchError;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A child process logging to `<dir>/<name>.log`; killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        dir: &Path,
    ) -> Result<Proc, BenchError> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let setpriv = Path::new("/usr/bin/setpriv");
        let mut cmd = if setpriv.is_file() {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .map_err(|e| BenchError::Testbed(format!("start {}: {e}", program.display())))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `n` lines of the log.
    pub fn tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "== {} ({}) ==\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lookup fixes for moto (see the file); written next to moto as `sitecustomize.py`.
const MOTO_SPEEDUPS: &str = include_str!("moto_speedups.py");

/// etcd + kube-apiserver + moto in a scratch directory.
pub struct Testbed {
    // Drop order: processes before the directory.
    pub apiserver: Proc,
    pub etcd: Proc,
    pub moto: Proc,
    pub moto_endpoint: String,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    pub keep: bool,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept the scratch directory {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn free_port() -> Result<u16, BenchError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CLOUDLB_CACHE") {
        return PathBuf::from(d);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("cloudlb")
}

/// `testbed/versions`, overridden by the environment variable of the same name.
fn testbed_version(var: &str) -> Result<String, BenchError> {
    if let Ok(v) = std::env::var(var) {
        return Ok(v.trim_start_matches('v').to_string());
    }
    include_str!("../../../testbed/versions")
        .lines()
        .find_map(|line| line.strip_prefix(var)?.strip_prefix('='))
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .ok_or_else(|| BenchError::Testbed(format!("testbed/versions has no {var}=… line")))
}

fn find_binary(env: &str, cached: &str, fallback: &[&str]) -> Result<PathBuf, BenchError> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let c = cache_dir().join(cached);
    if c.is_file() {
        return Ok(c);
    }
    fallback
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Testbed(format!(
                "{} not found (nor ${env}); run scripts/install-test-deps",
                c.display()
            ))
        })
}

fn openssl(args: &[&str]) -> Result<(), BenchError> {
    let out = Command::new("openssl").args(args).output()?;
    if !out.status.success() {
        return Err(BenchError::Testbed(format!(
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str, BenchError> {
    p.to_str()
        .ok_or_else(|| BenchError::Testbed(format!("path is not UTF-8: {}", p.display())))
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

impl Testbed {
    pub async fn start(
        node_port_range: &str,
        keep: bool,
        moto_speedups: bool,
    ) -> Result<Testbed, BenchError> {
        let dir = std::env::temp_dir().join(format!("cloudlb-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs"))?;
        let etcd_bin = find_binary(
            "CLOUDLB_ETCD",
            &format!("etcd/v{}/etcd", testbed_version("CLOUDLB_ETCD_VERSION")?),
            &[],
        )?;
        let apiserver_bin = find_binary(
            "CLOUDLB_KUBE_APISERVER",
            &format!(
                "k8s/v{}/kube-apiserver",
                testbed_version("CLOUDLB_KUBE_VERSION")?
            ),
            &[],
        )?;
        let moto_bin = find_binary("CLOUDLB_MOTO_SERVER", "moto-venv/bin/moto_server", &[])?;

        // Credentials: an admin token (group system:masters) and a service-account key pair.
        let token = format!("bench-{:016x}", rand::random::<u64>());
        let token_file = dir.join("tokens.csv");
        std::fs::write(
            &token_file,
            format!("{token},admin,admin,\"system:masters\"\n"),
        )?;
        let (sa_key, sa_pub) = (dir.join("sa.key"), dir.join("sa.pub"));
        openssl(&["genrsa", "-out", path_str(&sa_key)?, "2048"])?;
        openssl(&[
            "rsa",
            "-in",
            path_str(&sa_key)?,
            "-pubout",
            "-out",
            path_str(&sa_pub)?,
        ])?;

        let (etcd_port, peer_port, api_port, moto_port) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data = dir.join("etcd-data");
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let etcd = Proc::spawn(
            "etcd",
            &etcd_bin,
            &s(&[
                "--name",
                "bench",
                "--data-dir",
                path_str(&data)?,
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("bench={peer_url}"),
                "--unsafe-no-fsync",
            ]),
            &[],
            &dir,
        )?;
        let certs = dir.join("certs");
        let apiserver = Proc::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &s(&[
                "--etcd-servers",
                &client_url,
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                &api_port.to_string(),
                "--advertise-address",
                "127.0.0.1",
                "--cert-dir",
                path_str(&certs)?,
                "--token-auth-file",
                path_str(&token_file)?,
                "--authorization-mode",
                "RBAC",
                "--service-account-key-file",
                path_str(&sa_pub)?,
                "--service-account-signing-key-file",
                path_str(&sa_key)?,
                "--service-account-issuer",
                "https://kubernetes.default.svc",
                "--service-cluster-ip-range",
                "10.96.0.0/16",
                "--service-node-port-range",
                node_port_range,
                "--endpoint-reconciler-type",
                "none",
            ]),
            &[],
            &dir,
        )?;
        // `sitecustomize` on PYTHONPATH is imported by Python at start-up, before moto.
        let mut moto_env = Vec::new();
        if moto_speedups {
            let site = dir.join("moto-site");
            std::fs::create_dir_all(&site)?;
            std::fs::write(site.join("sitecustomize.py"), MOTO_SPEEDUPS)?;
            moto_env.push(("PYTHONPATH", path_str(&site)?.to_string()));
        }
        let moto = Proc::spawn(
            "moto",
            &moto_bin,
            &s(&["-H", "127.0.0.1", "-p", &moto_port.to_string()]),
            &moto_env,
            &dir,
        )?;

        let kubeconfig = dir.join("kubeconfig");
        let config = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "bench", "cluster": {
                "server": format!("https://127.0.0.1:{api_port}"),
                "certificate-authority": path_str(&certs.join("apiserver.crt"))?,
            }}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "admin"}}],
            "current-context": "bench",
        });
        std::fs::write(&kubeconfig, serde_yaml::to_string(&config)?)?;
        let mut bed = Testbed {
            apiserver,
            etcd,
            moto,
            moto_endpoint: format!("http://127.0.0.1:{moto_port}"),
            kubeconfig,
            dir,
            keep,
        };
        bed.wait_ready(moto_port).await?;
        Ok(bed)
    }

    fn logs(&self) -> String {
        [&self.etcd, &self.apiserver, &self.moto]
            .iter()
            .map(|p| p.tail(30))
            .collect::<Vec<_>>()
            .join("\n")
    }

    async fn wait_ready(&mut self, moto_port: u16) -> Result<(), BenchError> {
        let deadline = Instant::now() + Duration::from_secs(90);
        let (mut api, mut moto) = (false, false);
        while !(api && moto) {
            let exited = [&mut self.etcd, &mut self.apiserver, &mut self.moto]
                .into_iter()
                .find_map(|p| p.exited().map(|s| format!("{} exited ({s})", p.name)));
            if let Some(what) = exited {
                return Err(BenchError::Testbed(format!("{what}:\n{}", self.logs())));
            }
            if Instant::now() > deadline {
                return Err(BenchError::Testbed(format!(
                    "testbed not ready within 90 s:\n{}",
                    self.logs()
                )));
            }
            if !moto {
                moto = matches!(
                    http_get(moto_port, "/moto-api/data.json").await,
                    Some((200, _))
                );
            }
            // The server writes its self-signed certificate at start-up: the client needs it.
            if !api && self.dir.join("certs/apiserver.crt").is_file() {
                if let Ok(client) = self.client().await {
                    let ns: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                        kube::Api::all(client);
                    let params = kube::api::ListParams::default();
                    let list = ns.list(&params);
                    api = matches!(
                        tokio::time::timeout(Duration::from_secs(5), list).await,
                        Ok(Ok(_))
                    );
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// An admin client from the kubeconfig.
    pub async fn client(&self) -> Result<kube::Client, BenchError> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| BenchError::Testbed(format!("kubeconfig: {e}")))?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| BenchError::Testbed(format!("kubeconfig: {e}")))?;
        Ok(kube::Client::try_from(config)?)
    }
}
