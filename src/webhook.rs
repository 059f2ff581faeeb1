//! The mutating admission webhook (`POST /mutate-service`, HTTPS): a class-less
//! `type: LoadBalancer` Service, on CREATE or on the UPDATE that makes it one, gets
//! `spec.loadBalancerClass: cloudlb.io/<default class>`, so that no other controller (the
//! cloud's own service controller skips any Service with a class) gives it a second load
//! balancer. A class that is set is never changed. Every replica serves it (not only the
//! leader), from its own watch of the classes; with none served as default it changes nothing.
//!
//!
//! `POST /mutate-pod`: a pod being created in a namespace (or with a label) that asks for it
//! (`cloudlb.io/pod-readiness-gate-inject: enabled`, see
//! [`crate::controller::readiness`]) gets the readiness gate of every Service of ours whose
//! targets are pods and whose selector selects it.
//!
//! Kubernetes calls it as the `MutatingWebhookConfiguration` says (the chart's: `failurePolicy:
//! Ignore`, so an outage of the operator never blocks Service creation; Services created then
//! are judged by the adoption rules in [`crate::ownership`]).

use crate::config::class::{CLASS_PREFIX, LoadBalancerClass};
use crate::controller::readiness;
use crate::model::TargetMode;
use crate::ownership;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

/// The path the API server posts AdmissionReviews of Services to.
pub const PATH: &str = "/mutate-service";
/// The path the API server posts AdmissionReviews of pods to.
pub const POD_PATH: &str = "/mutate-pod";
/// Largest request accepted (an AdmissionReview of a Service is a few KiB).
const MAX_REQUEST: usize = 1024 * 1024;
/// How long a connection may sit idle, and a TLS handshake take.
const IDLE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook certificate or key {path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("webhook TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// What the webhook serves with.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    /// PEM certificate chain (the serving certificate first) and private key.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Only these classes (the operator's `--classes`; `None`: all).
    pub classes: Option<Vec<String>>,
    /// The installation (`--installation`): which Services are ours.
    pub installation: String,
}

/// The class the webhook sets on the Service of `req`, if any: `default_class` (a class name)
/// for a class-less `type: LoadBalancer` Service being created, or being updated into one.
pub fn class_to_set(
    req: &AdmissionRequest<Service>,
    default_class: Option<&str>,
) -> Option<String> {
    let is_lb =
        |svc: &Service| svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
    let svc = req.object.as_ref()?;
    let classless = svc.spec.as_ref()?.load_balancer_class.is_none();
    let becomes_lb = match req.operation {
        Operation::Create => true,
        Operation::Update => !req.old_object.as_ref().is_some_and(is_lb),
        _ => false,
    };
    if !(is_lb(svc) && classless && becomes_lb) {
        return None;
    }
    default_class.map(|c| format!("{CLASS_PREFIX}{c}"))
}

/// The answer to `req`: always allowed; with the patch that sets the class when
/// [`class_to_set`] says so.
pub fn review(req: &AdmissionRequest<Service>, default_class: Option<&str>) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(req);
    let Some(class) = class_to_set(req, default_class) else {
        return allowed;
    };
    let ops = json!([{"op": "add", "path": "/spec/loadBalancerClass", "value": class}]);
    let patched = serde_json::from_value::<json_patch::Patch>(ops)
        .map_err(|e| e.to_string())
        .and_then(|p| allowed.clone().with_patch(p).map_err(|e| e.to_string()));
    match patched {
        Ok(r) => {
            tracing::info!(class, name = req.name, namespace = ?req.namespace, "webhook: class set");
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook: could not build the patch; Service left as it is");
            allowed
        }
    }
}

/// The TLS configuration from PEM files, which are read again when they change (cert-manager
/// renews a certificate and the kubelet swaps the mounted Secret's files in place).
fn tls_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let resolver = ReloadingCert::new(cert_file, key_file, provider.clone())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The certificate and key as PEM files say, read again on a handshake after either file's
/// modification time changed; a file that no longer reads keeps the last good one (with a
/// warning).
#[derive(Debug)]
struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
    current: std::sync::Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    modified: Modified,
    key: Arc<rustls::sign::CertifiedKey>,
}

impl ReloadingCert {
    fn new(
        cert_file: &Path,
        key_file: &Path,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, WebhookError> {
        let modified = modified(cert_file, key_file);
        let key = load(cert_file, key_file, &provider)?;
        Ok(ReloadingCert {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            provider,
            current: std::sync::Mutex::new(Loaded { modified, key }),
        })
    }
}

type Modified = (Option<std::time::SystemTime>, Option<std::time::SystemTime>);

/// When the two files last changed (through symbolic links, as the kubelet mounts Secrets).
fn modified(cert_file: &Path, key_file: &Path) -> Modified {
    let at = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    (at(cert_file), at(key_file))
}

/// The certificate chain (serving certificate first) and its key, from PEM files.
fn load(
    cert_file: &Path,
    key_file: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<rustls::sign::CertifiedKey>, WebhookError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pem = |path: &Path, e: &dyn std::fmt::Display| WebhookError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| pem(cert_file, &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(cert_file, &e))?;
    if certs.is_empty() {
        return Err(pem(cert_file, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| pem(key_file, &e))?;
    let certified = rustls::sign::CertifiedKey::from_der(certs, key, provider)?;
    Ok(Arc::new(certified))
}

impl rustls::server::ResolvesServerCert for ReloadingCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let modified = modified(&self.cert_file, &self.key_file);
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if modified != current.modified {
            match load(&self.cert_file, &self.key_file, &self.provider) {
                Ok(key) => {
                    tracing::info!(cert = %self.cert_file.display(), "webhook: certificate reloaded");
                    current.key = key;
                }
                Err(e) => tracing::warn!(error = %e, "webhook: kept the previous certificate"),
            }
            current.modified = modified;
        }
        Some(current.key.clone())
    }
}

/// The webhook, its certificate loaded (a bad one is an error before anything is served).
pub struct Webhook {
    tls: Arc<rustls::ServerConfig>,
    settings: WebhookSettings,
}

impl Webhook {
    pub fn new(settings: WebhookSettings) -> Result<Self, WebhookError> {
        let tls = tls_config(&settings.cert_file, &settings.key_file)?;
        Ok(Webhook { tls, settings })
    }

    /// Serves on `listener`: watches the classes itself (every replica answers, leader or
    /// not). Dropping the future stops it, open connections included.
    pub async fn run(self, client: Client, listener: TcpListener) {
        run(client, listener, self.tls, self.settings).await;
    }
}

async fn run(
    client: Client,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    settings: WebhookSettings,
) {
    let (store, writer) = reflector::store();
    let watch = watcher(
        Api::<LoadBalancerClass>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer)
    .for_each(|_| async {});
    let addr = listener.local_addr().ok();
    tracing::info!(?addr, path = PATH, "admission webhook serving");
    tokio::select! {
        _ = watch => {}
        _ = serve(listener, tls, store, settings, client) => {}
    }
}

/// Accepts TLS connections on `listener` and answers each request on them.
async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    classes: Store<LoadBalancerClass>,
    settings: WebhookSettings,
    client: Client,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let defaults = Arc::new(Defaults {
        classes,
        settings,
        client,
    });
    // Held here: dropping `serve` ends every connection too.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "webhook: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, defaults) = (acceptor.clone(), defaults.clone());
        connections.spawn(async move {
            let tls = match tokio::time::timeout(IDLE, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(error = %e, "webhook: TLS handshake failed"),
                Err(_) => return tracing::debug!("webhook: TLS handshake timed out"),
            };
            if let Err(e) = connection(tls, &defaults).await {
                tracing::debug!(error = %e, "webhook connection");
            }
        });
    }
}

/// The default class, from the watched classes this installation serves, the settings, and a
/// client (to find a pod's Services).
struct Defaults {
    classes: Store<LoadBalancerClass>,
    settings: WebhookSettings,
    client: Client,
}

impl Defaults {
    fn served(&self) -> Vec<LoadBalancerClass> {
        let filter = self.settings.classes.as_deref();
        self.classes
            .state()
            .iter()
            .filter(|c| ownership::serves(filter, c))
            .map(|c| (**c).clone())
            .collect()
    }

    fn name(&self) -> Option<String> {
        let served = self.served();
        ownership::default_class(served.iter()).and_then(|c| c.metadata.name.clone())
    }
}

/// The readiness gates (condition types) a pod being created gets: one per Service of
/// `services` that is ours (`served` classes, `installation`), sends its traffic to pods, and
/// selects the pod; none it already has.
pub fn gates_for(
    pod: &Pod,
    services: &[Service],
    served: &[LoadBalancerClass],
    installation: &str,
) -> Vec<String> {
    let have: Vec<&str> = pod
        .spec
        .as_ref()
        .and_then(|s| s.readiness_gates.as_ref())
        .map(|g| g.iter().map(|g| g.condition_type.as_str()).collect())
        .unwrap_or_default();
    let mut gates: Vec<String> = services
        .iter()
        .filter(|svc| readiness::selects(svc, pod.metadata.labels.as_ref()))
        .filter(
            |svc| match ownership::ownership(svc, served, installation) {
                ownership::Ownership::Ours { class, .. } => crate::config::resolve(class, svc)
                    .is_ok_and(|cfg| crate::build::target_mode(&cfg) == TargetMode::Pods),
                _ => false,
            },
        )
        .map(|svc| readiness::condition_type(&svc.name_any()))
        .filter(|g| !have.contains(&g.as_str()))
        .collect();
    gates.sort();
    gates.dedup();
    gates
}

/// The answer to a pod's review: always allowed; with the patch that adds `gates`.
pub fn pod_review(req: &AdmissionRequest<Pod>, gates: &[String]) -> AdmissionResponse {
    let allowed = AdmissionResponse::from(req);
    if gates.is_empty() {
        return allowed;
    }
    let present = req
        .object
        .as_ref()
        .and_then(|p| p.spec.as_ref())
        .is_some_and(|s| s.readiness_gates.is_some());
    let gate = |g: &String| json!({"conditionType": g});
    let ops: Vec<serde_json::Value> = if present {
        gates
            .iter()
            .map(|g| json!({"op": "add", "path": "/spec/readinessGates/-", "value": gate(g)}))
            .collect()
    } else {
        let all: Vec<_> = gates.iter().map(gate).collect();
        vec![json!({"op": "add", "path": "/spec/readinessGates", "value": all})]
    };
    let patched = serde_json::from_value::<json_patch::Patch>(json!(ops))
        .map_err(|e| e.to_string())
        .and_then(|p| allowed.clone().with_patch(p).map_err(|e| e.to_string()));
    match patched {
        Ok(r) => {
            tracing::info!(?gates, namespace = ?req.namespace, "webhook: readiness gates added");
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook: could not build the patch; pod left as it is");
            allowed
        }
    }
}

/// The AdmissionReview answering a pod's `body`: on CREATE, the Services of its namespace are
/// listed (one call) to find the gates it needs. A failed list adds none (the pod is then not
/// gated, as if the webhook were not there).
async fn answer_pod(body: &[u8], defaults: &Defaults) -> (u16, String) {
    let review: AdmissionReview<Pod> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return (400, format!("not an AdmissionReview of a pod: {e}")),
    };
    let request: Result<AdmissionRequest<Pod>, _> = review.try_into();
    let response = match request {
        Ok(req) => {
            let mut gates = Vec::new();
            if let (Operation::Create, Some(pod), Some(ns)) = (
                &req.operation,
                req.object.as_ref(),
                req.namespace.as_deref(),
            ) {
                let api: Api<Service> = Api::namespaced(defaults.client.clone(), ns);
                match api.list(&kube::api::ListParams::default()).await {
                    Ok(list) => {
                        let served = defaults.served();
                        let installation = &defaults.settings.installation;
                        gates = gates_for(pod, &list.items, &served, installation);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, namespace = ns, "webhook: cannot list the Services; no readiness gate added")
                    }
                }
            }
            pod_review(&req, &gates)
        }
        Err(e) => AdmissionResponse::invalid(e),
    };
    match serde_json::to_string(&response.into_review()) {
        Ok(json) => (200, json),
        Err(e) => (500, format!("cannot encode the AdmissionReview: {e}")),
    }
}

/// HTTP/1.1 requests on one connection (keep-alive), until the client closes it or idles.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    defaults: &Defaults,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    // A renewed certificate is presented at the next handshake: a connection made with the old
    // one is closed after the request that finds the files changed, so clients reconnect.
    let files = (&defaults.settings.cert_file, &defaults.settings.key_file);
    let certificate = modified(files.0, files.1);
    loop {
        let Some(head_end) = read_until_head(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut request_line = head
            .split("\r\n")
            .next()
            .unwrap_or_default()
            .split_whitespace();
        let (method, path) = (request_line.next(), request_line.next());
        let header = |name: &str| {
            head.split("\r\n").skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_string())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        if length > MAX_REQUEST {
            return respond(&mut stream, 413, "request too large", true).await;
        }
        let body_start = head_end + 4;
        while buf.len() < body_start + length {
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(IDLE, stream.read(&mut chunk))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body = buf[body_start..body_start + length].to_vec();
        buf.drain(..body_start + length);
        let (status, answer) = match (method, path.map(|p| p.split('?').next().unwrap_or(p))) {
            (Some("POST"), Some(PATH)) => answer(&body, defaults),
            (Some("POST"), Some(POD_PATH)) => answer_pod(&body, defaults).await,
            _ => (404, "not found".to_string()),
        };
        let close = close || modified(files.0, files.1) != certificate;
        respond(&mut stream, status, &answer, close).await?;
        if close {
            return Ok(());
        }
    }
}

/// The AdmissionReview answering `body`.
fn answer(body: &[u8], defaults: &Defaults) -> (u16, String) {
    let review: AdmissionReview<Service> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return (400, format!("not an AdmissionReview of a Service: {e}")),
    };
    let request: Result<AdmissionRequest<Service>, _> = review.try_into();
    let response = match request {
        Ok(req) => self::review(&req, defaults.name().as_deref()),
        Err(e) => AdmissionResponse::invalid(e),
    };
    match serde_json::to_string(&response.into_review()) {
        Ok(json) => (200, json),
        Err(e) => (500, format!("cannot encode the AdmissionReview: {e}")),
    }
}

/// Reads into `buf` until it holds a whole request head; its end (the `\r\n\r\n`), or `None`
/// when the client closed or idled first.
async fn read_until_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Ok(Some(end));
        }
        if buf.len() > 64 * 1024 {
            return Ok(None);
        }
        let mut chunk = [0u8; 8192];
        let Ok(read) = tokio::time::timeout(IDLE, stream.read(&mut chunk)).await else {
            return Ok(None);
        };
        let n = read?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    let (status, kind) = match status {
        200 => ("200 OK", "application/json"),
        400 => ("400 Bad Request", "text/plain"),
        404 => ("404 Not Found", "text/plain"),
        413 => ("413 Payload Too Large", "text/plain"),
        _ => ("500 Internal Server Error", "text/plain"),
    };
    crate::http::write_response(stream, status, kind, body, close).await
}

#[cfg(test)]
mod tests;
