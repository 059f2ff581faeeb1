//! A counting, fault-injecting HTTP/1.1 reverse proxy for the AWS Query APIs (ELBv2, EC2), put
//! between the operator and an AWS emulator (moto): the operator gets
//! `AWS_ENDPOINT_URL=http://<proxy>`. Used by the benchmark (`cloudlb-bench`) and the fault tests
//! (`tests/faults/faults.rs`).
//!
//! - **Counting.** Every request that carries an `Action=` (form body) is counted by action and
//!   outcome ([`FaultProxy::counts`], or `GET /proxy/counts` as JSON), and its arrival time is
//!   recorded per call family ([`Family`]: the operator's rate-limit families), so a test can check
//!   the rate the operator really sent at ([`FaultProxy::max_in_window`],
//!   [`FaultProxy::per_second`]). Other requests (`/moto-api/…`) are forwarded uncounted.
//! - **Faults**, each with its own rate ([`FaultConfig`]): throttling (an AWS error document:
//!   ELBv2 `400 <ErrorResponse>…<Code>Throttling`, EC2 `503 <Response><Errors>…<Code>
//!   RequestLimitExceeded`, as the SDK parses them), `500 InternalFailure` / `503
//!   ServiceUnavailable`, a connection reset (RST, request not applied), a **lost response**
//!   (the request is applied upstream, the response discarded, and the connection held open for
//!   [`FaultConfig::hang`] or until the client gives up, then closed), and added latency.
//! - **Parameters** of the actions named in [`FaultProxy::record_parameters`] are kept
//!   ([`FaultProxy::parameters`]), for what the emulator accepts but does not store (moto keeps
//!   no IPv6 source-NAT setting, for one): a test can check what the operator asked for.
//! - **Deterministic.** A request's fate is a function of the seed, its action and body, and how
//!   many identical requests came before it; not of arrival order or timing. (Bodies that embed
//!   per-run values, such as Service UIDs in tags, differ between runs.)
//! - **AWS idempotency for lost creates** ([`FaultConfig::replay_lost_creates`]): AWS documents
//!   `CreateLoadBalancer`, `CreateTargetGroup` and `CreateListener` as idempotent (a repeated
//!   identical request returns what the first one created); moto creates a second load balancer
//!   or listener. When the response of one of these was lost, the next identical request (the
//!   SDK's retry) is answered with the lost response instead of being applied again, as AWS
//!   would. EC2 `CreateSecurityGroup` is not idempotent on AWS either, so its retry reaches moto
//!   and fails with `InvalidGroup.Duplicate`, as on AWS. Duplicates that remain are then the
//!   operator's doing.
//! - **AWS idempotency for existing names** ([`FaultConfig::existing_on_create`]): a
//!   `CreateLoadBalancer` or `CreateTargetGroup` for a name that already exists is answered with
//!   that resource (moto would create a second load balancer, or refuse the target group), so a
//!   test can check that the operator never uses one that is not its own.
//!
//! The listener side is a small HTTP/1.1 server (keep-alive, `Content-Length` bodies, as the AWS
//! SDK sends them); upstream requests go through a pooled hyper client.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// How long a lost create response is kept for the retry that AWS would answer with it.
const REPLAY_TTL: Duration = Duration::from_secs(600);
/// The creates AWS documents as idempotent (see the module docs).
pub const IDEMPOTENT_CREATES: [&str; 3] =
    ["CreateLoadBalancer", "CreateTargetGroup", "CreateListener"];
/// Upstream requests that take longer fail with 504.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("fault proxy: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("fault proxy: upstream {0:?} must look like http://host:port")]
    Upstream(String),
    #[error(
        "fault proxy: fault rates must each be in [0, 1] and add up to at most 1 (throttle {throttle}, server_error {server_error}, reset {reset}, lost_response {lost_response}); latency rate {latency}"
    )]
    Rates {
        throttle: f64,
        server_error: f64,
        reset: f64,
        lost_response: f64,
        latency: f64,
    },
}

/// The operator's rate-limit families (`src/provider/aws/calls.rs`), decided the same way from
/// the action name, but counted here, independently of the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Describe,
    Write,
    Targets,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Describe, Family::Write, Family::Targets];

    pub fn of(action: &str) -> Family {
        if action.starts_with("Describe") {
            Family::Describe
        } else if action == "RegisterTargets" || action == "DeregisterTargets" {
            Family::Targets
        } else {
            Family::Write
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Family::Describe => "describe",
            Family::Write => "write",
            Family::Targets => "targets",
        }
    }
}

/// What happened to a counted request (the outcome label of [`Counts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded; upstream answered 2xx.
    Ok,
    /// Forwarded; upstream answered with an error status (e.g. `LoadBalancerNotFound`).
    Error,
    /// Upstream could not be reached or timed out (502/504 to the client).
    Unreachable,
    /// Injected throttling error; not forwarded.
    Throttled,
    /// Injected 500/503; not forwarded.
    ServerError,
    /// Injected connection reset; not forwarded.
    Reset,
    /// Forwarded and applied upstream; the response was discarded and the connection hung.
    Lost,
    /// A retry of a lost idempotent create, answered with the lost response (AWS idempotency).
    Replayed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Unreachable => "unreachable",
            Outcome::Throttled => "throttled",
            Outcome::ServerError => "server_error",
            Outcome::Reset => "reset",
            Outcome::Lost => "lost",
            Outcome::Replayed => "replayed",
        }
    }

    /// The request never reached upstream because of an injected fault.
    pub fn is_injected(self) -> bool {
        matches!(
            self,
            Outcome::Throttled | Outcome::ServerError | Outcome::Reset | Outcome::Lost
        )
    }
}

/// Fault rates (probabilities per request, `0.0..=1.0`; the four fault kinds add up to at most 1)
/// and their parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    /// Throttling error.
    pub throttle: f64,
    /// 500 `InternalFailure` or 503 `ServiceUnavailable` (half each).
    pub server_error: f64,
    /// Connection reset before forwarding.
    pub reset: f64,
    /// "Timeout after apply": forwarded, response discarded, connection held for `hang`.
    pub lost_response: f64,
    /// Added latency (independent of the faults above), uniform in `latency_range`.
    pub latency: f64,
    pub latency_range: (Duration, Duration),
    /// How long a lost response's connection is held open (unless the client closes it first)
    /// before the proxy closes it.
    pub hang: Duration,
    /// Only these actions get faults (latency included); `None`: every action.
    pub actions: Option<Vec<String>>,
    /// Answer the retry of a lost idempotent create with the lost response (see the module docs).
    pub replay_lost_creates: bool,
    /// Answer a `CreateLoadBalancer` or `CreateTargetGroup` for a name that exists with the
    /// existing resource, as AWS does (when the settings match), instead of letting moto create
    /// a second load balancer or refuse the target group.
    pub existing_on_create: bool,
    /// Throttling as AWS does it: at most this many requests per second (of the actions faults
    /// apply to; a token bucket holding one second's worth), the others answered with throttling.
    /// Unlike `throttle`, it depends on how fast the client calls.
    pub quota: Option<f64>,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig::none()
    }
}

impl FaultConfig {
    /// No faults: a counting proxy.
    pub fn none() -> Self {
        FaultConfig {
            seed: 0,
            throttle: 0.0,
            server_error: 0.0,
            reset: 0.0,
            lost_response: 0.0,
            latency: 0.0,
            latency_range: (Duration::from_millis(50), Duration::from_millis(250)),
            hang: Duration::from_secs(10),
            actions: None,
            replay_lost_creates: true,
            existing_on_create: false,
            quota: None,
        }
    }

    /// `total` of all requests fail, split 40% throttling, 25% 500/503, 15% resets, 20% lost
    /// responses; plus `total / 2` of the requests delayed by 50-250 ms.
    pub fn mixed(total: f64, seed: u64) -> Self {
        FaultConfig {
            seed,
            throttle: total * 0.40,
            server_error: total * 0.25,
            reset: total * 0.15,
            lost_response: total * 0.20,
            latency: total / 2.0,
            ..FaultConfig::none()
        }
    }

    /// Only throttling, at `rate`.
    pub fn throttling(rate: f64, seed: u64) -> Self {
        FaultConfig {
            seed,
            throttle: rate,
            ..FaultConfig::none()
        }
    }

    pub fn validate(&self) -> Result<(), ProxyError> {
        let rates = [
            self.throttle,
            self.server_error,
            self.reset,
            self.lost_response,
        ];
        let valid = |r: f64| r.is_finite() && (0.0..=1.0).contains(&r);
        if !rates.iter().all(|r| valid(*r))
            || rates.iter().sum::<f64>() > 1.0 + 1e-9
            || !valid(self.latency)
        {
            return Err(ProxyError::Rates {
                throttle: self.throttle,
                server_error: self.server_error,
                reset: self.reset,
                lost_response: self.lost_response,
                latency: self.latency,
            });
        }
        Ok(())
    }

    fn applies_to(&self, action: &str) -> bool {
        self.actions
            .as_ref()
            .is_none_or(|a| a.iter().any(|x| x == action))
    }
}

/// How the proxy is set up.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// `http://host:port` of the emulator.
    pub upstream: String,
    /// Where to listen (default `127.0.0.1:0`, a free port).
    pub listen: SocketAddr,
    /// Adds `x-moto-account-id: <id>` to every forwarded request (moto's per-account isolation),
    /// so a client that knows nothing of moto works in its own account.
    pub account_id: Option<String>,
    pub faults: FaultConfig,
}

impl ProxyConfig {
    pub fn new(upstream: impl Into<String>) -> Self {
        ProxyConfig {
            upstream: upstream.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            account_id: None,
            faults: FaultConfig::none(),
        }
    }
}

/// What happened to requests whose response was lost.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LostStats {
    /// The client closed the connection before the proxy did (it has a timeout).
    pub client_gave_up: u64,
    /// The proxy closed it after `hang` (the client was still waiting).
    pub proxy_closed: u64,
    /// The longest a client waited before giving up, in seconds.
    pub longest_client_wait_secs: f64,
}

/// Request counts since the start or the last [`FaultProxy::reset_counts`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// Action → outcome ([`Outcome::as_str`]) → requests.
    pub by_action: BTreeMap<String, BTreeMap<String, u64>>,
    /// Every counted request.
    pub total: u64,
    /// Requests that got added latency.
    pub delayed: u64,
    /// `DescribeLoadBalancers`/`DescribeTargetGroups` without names or ARNs: account-wide
    /// listings (what the operator's orphan sweep does, not a per-Service reconcile).
    pub listings: u64,
    pub lost: LostStats,
}

impl Counts {
    /// Requests of `action` with `outcome`.
    pub fn get(&self, action: &str, outcome: Outcome) -> u64 {
        self.by_action
            .get(action)
            .and_then(|o| o.get(outcome.as_str()))
            .copied()
            .unwrap_or(0)
    }

    /// Requests of `action`, any outcome.
    pub fn action(&self, action: &str) -> u64 {
        self.by_action
            .get(action)
            .map(|o| o.values().sum())
            .unwrap_or(0)
    }

    /// Requests with `outcome`, any action.
    pub fn outcome(&self, outcome: Outcome) -> u64 {
        self.by_action
            .values()
            .filter_map(|o| o.get(outcome.as_str()))
            .sum()
    }

    /// Requests that got an injected fault.
    pub fn injected(&self) -> u64 {
        [
            Outcome::Throttled,
            Outcome::ServerError,
            Outcome::Reset,
            Outcome::Lost,
        ]
        .into_iter()
        .map(|o| self.outcome(o))
        .sum()
    }

    /// Action → requests (all outcomes).
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.by_action
            .iter()
            .map(|(a, o)| (a.clone(), o.values().sum()))
            .collect()
    }
}

#[derive(Default)]
struct Stats {
    counts: Counts,
    /// Actions whose parameters are kept, and the kept ones (action, decoded form fields).
    recording: Vec<String>,
    parameters: Vec<(String, BTreeMap<String, String>)>,
    /// Arrival time (since `started`) of every counted request, in arrival order.
    arrivals: Vec<(Family, Duration)>,
    last_request: Option<Instant>,
}

type Key = [u8; 32];

/// An upstream answer, kept to replay it.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

struct State {
    upstream: String,
    account_id: Option<String>,
    faults: Mutex<FaultConfig>,
    started: Instant,
    stats: Mutex<Stats>,
    /// How many requests with this (action, body) came before.
    seen: Mutex<HashMap<Key, u64>>,
    /// The tokens of `FaultConfig::quota`, and when they were last refilled.
    quota: Mutex<(f64, Instant)>,
    /// Lost answers of idempotent creates, by (action, body).
    lost: Mutex<HashMap<Key, (Instant, Answer)>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The running proxy; stops when dropped.
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(config: ProxyConfig) -> Result<FaultProxy, ProxyError> {
        config.faults.validate()?;
        let upstream = config.upstream.trim_end_matches('/').to_string();
        if !upstream.starts_with("http://")
            || upstream.parse::<hyper::Uri>().is_err()
            || upstream["http://".len()..].contains('/')
        {
            return Err(ProxyError::Upstream(config.upstream));
        }
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ProxyError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| ProxyError::Bind {
            addr: config.listen,
            source,
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let state = Arc::new(State {
            upstream,
            account_id: config.account_id,
            faults: Mutex::new(config.faults),
            started: Instant::now(),
            stats: Mutex::new(Stats::default()),
            seen: Mutex::new(HashMap::new()),
            quota: Mutex::new((f64::MAX, Instant::now())),
            lost: Mutex::new(HashMap::new()),
            client,
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(FaultProxy { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`: the `AWS_ENDPOINT_URL` to give the client.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the fault configuration (from the next request on).
    pub fn set_faults(&self, faults: FaultConfig) -> Result<(), ProxyError> {
        faults.validate()?;
        *lock(&self.state.faults) = faults;
        Ok(())
    }

    pub fn faults(&self) -> FaultConfig {
        lock(&self.state.faults).clone()
    }

    pub fn counts(&self) -> Counts {
        lock(&self.state.stats).counts.clone()
    }

    /// Clears the counts and the recorded arrivals.
    pub fn reset_counts(&self) {
        let mut stats = lock(&self.state.stats);
        stats.counts = Counts::default();
        stats.arrivals.clear();
    }

    /// From now on, keeps the parameters of every request of `actions` (see
    /// [`FaultProxy::parameters`]).
    pub fn record_parameters(&self, actions: &[&str]) {
        lock(&self.state.stats).recording = actions.iter().map(|a| a.to_string()).collect();
    }

    /// The parameters (decoded form fields, `SubnetMappings.member.1.SubnetId` = …) of each
    /// recorded request of `action`, in arrival order.
    pub fn parameters(&self, action: &str) -> Vec<BTreeMap<String, String>> {
        lock(&self.state.stats)
            .parameters
            .iter()
            .filter(|(a, _)| a == action)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Time since the last counted request (since the start when there was none).
    pub fn idle_for(&self) -> Duration {
        let last = lock(&self.state.stats).last_request;
        last.unwrap_or(self.state.started).elapsed()
    }

    /// The most requests of `family` that arrived within any `window` (sliding), since the last
    /// reset.
    pub fn max_in_window(&self, family: Family, window: Duration) -> u64 {
        let stats = lock(&self.state.stats);
        let times: Vec<Duration> = stats
            .arrivals
            .iter()
            .filter(|(f, _)| *f == family)
            .map(|(_, t)| *t)
            .collect();
        let mut best = 0usize;
        let mut start = 0usize;
        for end in 0..times.len() {
            while times[end].saturating_sub(times[start]) >= window {
                start += 1;
            }
            best = best.max(end + 1 - start);
        }
        best as u64
    }

    /// Requests of `family` per whole second since the proxy started (index = second).
    pub fn per_second(&self, family: Family) -> Vec<u64> {
        let stats = lock(&self.state.stats);
        let mut out: Vec<u64> = Vec::new();
        for (f, t) in &stats.arrivals {
            if *f != family {
                continue;
            }
            let i = usize::try_from(t.as_secs()).unwrap_or(usize::MAX);
            if i >= out.len() {
                out.resize(i.saturating_add(1), 0);
            }
            if let Some(slot) = out.get_mut(i) {
                *slot += 1;
            }
        }
        out
    }

    /// `/proxy/counts` JSON.
    pub fn counts_json(&self) -> String {
        counts_json(&self.state)
    }
}

fn counts_json(state: &State) -> String {
    let counts = lock(&state.stats).counts.clone();
    serde_json::to_string_pretty(&counts).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_connection(stream, state).await {
                        tracing::debug!(error = %e, "fault proxy: connection ended");
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One parsed request.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn wants_close(&self) -> bool {
        self.header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// Reads one request; `None` when the client closed the connection between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Request>> {
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("request head too large"));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split_whitespace();
    let method = first.next().unwrap_or_default().to_string();
    let target = first.next().unwrap_or_default().to_string();
    if method.is_empty() || !target.starts_with('/') {
        return Err(bad(format!("bad request line {head:?}")));
    }
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && !v.is_empty())
    {
        return Err(bad("chunked request bodies are not supported"));
    }
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse::<usize>())
        .transpose()
        .map_err(|_| bad("bad content-length"))?
        .unwrap_or(0);
    if length > MAX_BODY {
        return Err(bad("request body too large"));
    }
    let body_start = head_end + 4;
    while buf.len() < body_start + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[body_start..body_start + length].to_vec();
    buf.drain(..body_start + length);
    Ok(Some(Request {
        method,
        target,
        headers,
        body,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

async fn write_response(
    stream: &mut TcpStream,
    answer: &Answer,
    close: bool,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
    for (k, v) in &answer.headers {
        let lower = k.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || lower == "content-length" {
            continue;
        }
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n", answer.body.len()));
    if close {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&answer.body).await?;
    stream.flush().await
}

fn text(status: u16, body: String, content_type: &str) -> Answer {
    Answer {
        status,
        headers: vec![("content-type".into(), content_type.into())],
        body: Bytes::from(body),
    }
}

/// The `Action` and `Version` form parameters of a query-protocol body.
fn query_params(body: &[u8]) -> (Option<String>, Option<String>) {
    let body = String::from_utf8_lossy(body);
    let (mut action, mut version) = (None, None);
    for pair in body.split('&') {
        match pair.split_once('=') {
            Some(("Action", v)) => action = Some(percent_decode(v)),
            Some(("Version", v)) => version = Some(percent_decode(v)),
            _ => {}
        }
    }
    (action, version)
}

/// Every field of a form body, decoded.
fn form_fields(body: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let digit = |i: usize| bytes.get(i).and_then(|b| char::from(*b).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (digit(i + 1), digit(i + 2)) {
                (Some(h), Some(l)) => {
                    out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// EC2 (`Version=2016-11-15`) uses the EC2 query error document; everything else (ELBv2) the
/// AWS query one.
fn is_ec2(version: Option<&str>) -> bool {
    version == Some("2016-11-15")
}

fn aws_error(ec2: bool, status: u16, code: &str, message: &str, n: u64) -> Answer {
    let request_id = format!("faultproxy-{n:016x}");
    let body = if ec2 {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
        )
    } else {
        format!(
            "<ErrorResponse xmlns=\"http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/\"><Error><Type>{}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>",
            if status >= 500 { "Receiver" } else { "Sender" }
        )
    };
    let mut answer = text(status, body, "text/xml");
    answer
        .headers
        .push(("x-amzn-requestid".into(), request_id.clone()));
    answer
}

/// The fate of one request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Pass,
    Throttle,
    ServerError { unavailable: bool },
    Reset,
    Lost,
}

struct Decision {
    fate: Fate,
    delay: Option<Duration>,
    key: Key,
    n: u64,
}

fn decide(state: &State, action: &str, body: &[u8]) -> Decision {
    let faults = lock(&state.faults).clone();
    let key: Key = Sha256::new()
        .chain_update(action.as_bytes())
        .chain_update([0u8])
        .chain_update(body)
        .finalize()
        .into();
    let n = {
        let mut seen = lock(&state.seen);
        let c = seen.entry(key).or_insert(0);
        let n = *c;
        *c += 1;
        n
    };
    if !faults.applies_to(action) {
        return Decision {
            fate: Fate::Pass,
            delay: None,
            key,
            n,
        };
    }
    let h = Sha256::new()
        .chain_update(faults.seed.to_le_bytes())
        .chain_update(key)
        .chain_update(n.to_le_bytes())
        .finalize();
    let unit = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[i * 8..i * 8 + 8]);
        (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
    };
    let (u, v, w, x) = (unit(0), unit(1), unit(2), unit(3));
    if let Some(per_second) = faults.quota
        && !within_quota(state, per_second)
    {
        return Decision {
            fate: Fate::Throttle,
            delay: None,
            key,
            n,
        };
    }
    let table = [
        (faults.throttle, Fate::Throttle),
        (
            faults.server_error,
            Fate::ServerError {
                unavailable: x < 0.5,
            },
        ),
        (faults.reset, Fate::Reset),
        (faults.lost_response, Fate::Lost),
    ];
    let mut edge = 0.0;
    let mut fate = Fate::Pass;
    for (rate, f) in table {
        edge += rate;
        if u < edge {
            fate = f;
            break;
        }
    }
    let delay = (v < faults.latency).then(|| {
        let (lo, hi) = faults.latency_range;
        lo + hi.saturating_sub(lo).mul_f64(w)
    });
    Decision {
        fate,
        delay,
        key,
        n,
    }
}

/// Takes a token of the quota's bucket (`per_second`, holding one second's worth); false when
/// there is none.
fn within_quota(state: &State, per_second: f64) -> bool {
    let mut bucket = lock(&state.quota);
    let now = Instant::now();
    let elapsed = now.saturating_duration_since(bucket.1).as_secs_f64();
    let tokens = (bucket.0.min(per_second) + elapsed * per_second).min(per_second.max(1.0));
    *bucket = (tokens, now);
    if tokens >= 1.0 {
        bucket.0 -= 1.0;
        true
    } else {
        false
    }
}

/// An account-wide listing: no names, ARNs or load balancer to narrow it.
fn is_listing(action: &str, body: &[u8]) -> bool {
    if action != "DescribeLoadBalancers" && action != "DescribeTargetGroups" {
        return false;
    }
    let body = String::from_utf8_lossy(body);
    !body.split('&').any(|p| {
        p.starts_with("Names.")
            || p.starts_with("LoadBalancerArns.")
            || p.starts_with("TargetGroupArns.")
            || p.starts_with("LoadBalancerArn=")
    })
}

fn record(
    state: &State,
    req: &Request,
    action: &str,
    outcome: Outcome,
    arrived: Instant,
    delayed: bool,
) {
    let listing = is_listing(action, &req.body);
    let mut stats = lock(&state.stats);
    if stats.recording.iter().any(|a| a == action) {
        let fields = form_fields(&req.body);
        stats.parameters.push((action.to_string(), fields));
    }
    let since = arrived.saturating_duration_since(state.started);
    stats.arrivals.push((Family::of(action), since));
    stats.last_request = Some(Instant::now());
    let counts = &mut stats.counts;
    counts.total += 1;
    if delayed {
        counts.delayed += 1;
    }
    if listing {
        counts.listings += 1;
    }
    *counts
        .by_action
        .entry(action.to_string())
        .or_default()
        .entry(outcome.as_str().to_string())
        .or_insert(0) += 1;
}

fn record_lost(state: &State, client_waited: Option<Duration>) {
    let mut stats = lock(&state.stats);
    let lost = &mut stats.counts.lost;
    match client_waited {
        Some(d) => {
            lost.client_gave_up += 1;
            lost.longest_client_wait_secs = lost.longest_client_wait_secs.max(d.as_secs_f64());
        }
        None => lost.proxy_closed += 1,
    }
}

async fn serve_connection(mut stream: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(req) = read_request(&mut stream, &mut buf).await? {
        let arrived = Instant::now();
        let close = req.wants_close();
        if req.method == "GET" && req.target.split('?').next() == Some("/proxy/counts") {
            let answer = text(200, counts_json(&state), "application/json");
            write_response(&mut stream, &answer, close).await?;
            if close {
                return Ok(());
            }
            continue;
        }
        let (action, version) = if req.method == "POST" {
            query_params(&req.body)
        } else {
            (None, None)
        };
        let Some(action) = action else {
            // Not an AWS call (e.g. /moto-api): forward, uncounted.
            let answer = forward(&state, &req).await;
            write_response(&mut stream, &answer, close).await?;
            if close {
                return Ok(());
            }
            continue;
        };
        let ec2 = is_ec2(version.as_deref());
        let d = decide(&state, &action, &req.body);
        if let Some(delay) = d.delay {
            tokio::time::sleep(delay).await;
        }
        let delayed = d.delay.is_some();
        match d.fate {
            Fate::Throttle => {
                record(&state, &req, &action, Outcome::Throttled, arrived, delayed);
                let answer = if ec2 {
                    aws_error(
                        true,
                        503,
                        "RequestLimitExceeded",
                        "Request limit exceeded.",
                        d.n,
                    )
                } else {
                    aws_error(false, 400, "Throttling", "Rate exceeded", d.n)
                };
                write_response(&mut stream, &answer, close).await?;
            }
            Fate::ServerError { unavailable } => {
                record(
                    &state,
                    &req,
                    &action,
                    Outcome::ServerError,
                    arrived,
                    delayed,
                );
                let answer = if unavailable {
                    aws_error(
                        ec2,
                        503,
                        "ServiceUnavailable",
                        "The service is unavailable. Please try again shortly.",
                        d.n,
                    )
                } else {
                    aws_error(
                        ec2,
                        500,
                        "InternalFailure",
                        "The request processing has failed because of an unknown error, exception or failure.",
                        d.n,
                    )
                };
                write_response(&mut stream, &answer, close).await?;
            }
            Fate::Reset => {
                record(&state, &req, &action, Outcome::Reset, arrived, delayed);
                stream.set_zero_linger()?;
                return Ok(());
            }
            Fate::Lost => {
                record(&state, &req, &action, Outcome::Lost, arrived, delayed);
                let answer = apply_once(&state, &req, &action, d.key).await;
                let keep = lock(&state.faults).replay_lost_creates;
                if keep
                    && IDEMPOTENT_CREATES.contains(&action.as_str())
                    && (200..300).contains(&answer.status)
                {
                    lock(&state.lost).insert(d.key, (Instant::now(), answer));
                }
                let hang = lock(&state.faults).hang;
                let started = Instant::now();
                let mut probe = [0u8; 1024];
                let waited = match tokio::time::timeout(hang, stream.read(&mut probe)).await {
                    Ok(_) => Some(started.elapsed()),
                    Err(_) => None,
                };
                record_lost(&state, waited);
                return Ok(());
            }
            Fate::Pass => {
                let replay = {
                    let mut lost = lock(&state.lost);
                    lost.retain(|_, (at, _)| at.elapsed() < REPLAY_TTL);
                    lost.remove(&d.key).map(|(_, a)| a)
                };
                let existing = if replay.is_none() && lock(&state.faults).existing_on_create {
                    existing_resource(&state, &req, &action).await
                } else {
                    None
                };
                let (answer, outcome) = match replay.or(existing) {
                    Some(a) => (a, Outcome::Replayed),
                    None => {
                        let a = forward(&state, &req).await;
                        let outcome = match a.status {
                            200..=299 => Outcome::Ok,
                            502 | 504 if is_proxy_answer(&a) => Outcome::Unreachable,
                            _ => Outcome::Error,
                        };
                        (a, outcome)
                    }
                };
                record(&state, &req, &action, outcome, arrived, delayed);
                write_response(&mut stream, &answer, close).await?;
            }
        }
        if close {
            return Ok(());
        }
    }
    Ok(())
}

/// [`FaultConfig::existing_on_create`]: the answer to `req`, a `CreateLoadBalancer` or
/// `CreateTargetGroup`, when a resource of its name exists (that one, as AWS answers), else
/// `None` (forward it).
async fn existing_resource(state: &State, req: &Request, action: &str) -> Option<Answer> {
    let describe = match action {
        "CreateLoadBalancer" => "DescribeLoadBalancers",
        "CreateTargetGroup" => "DescribeTargetGroups",
        _ => return None,
    };
    let body = String::from_utf8_lossy(&req.body);
    let name = body.split('&').find_map(|p| p.strip_prefix("Name="))?;
    let lookup = Request {
        method: req.method.clone(),
        target: req.target.clone(),
        headers: req
            .headers
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("content-length"))
            .cloned()
            .collect(),
        body: format!("Action={describe}&Version=2015-12-01&Names.member.1={name}").into_bytes(),
    };
    let found = forward(state, &lookup).await;
    let text = String::from_utf8_lossy(&found.body);
    if found.status != 200 || !text.contains("<member>") {
        return None;
    }
    let body = text
        .replace(&format!("{describe}Response"), &format!("{action}Response"))
        .replace(&format!("{describe}Result"), &format!("{action}Result"));
    Some(Answer {
        status: 200,
        headers: found.headers,
        body: Bytes::from(body),
    })
}

/// Forwards, unless this is the retry of a lost idempotent create (then the lost answer is used
/// and the request is not applied again).
async fn apply_once(state: &State, req: &Request, action: &str, key: Key) -> Answer {
    if IDEMPOTENT_CREATES.contains(&action)
        && let Some((_, a)) = lock(&state.lost).remove(&key)
    {
        return a;
    }
    forward(state, req).await
}

const PROXY_MARK: &str = "x-faultproxy";

fn is_proxy_answer(a: &Answer) -> bool {
    a.headers.iter().any(|(k, _)| k == PROXY_MARK)
}

fn proxy_failure(status: u16, message: String) -> Answer {
    let mut a = text(status, message, "text/plain");
    a.headers.push((PROXY_MARK.into(), "1".into()));
    a
}

async fn forward(state: &State, req: &Request) -> Answer {
    let uri = format!("{}{}", state.upstream, req.target);
    let mut builder = hyper::Request::builder()
        .method(req.method.as_str())
        .uri(uri);
    for (k, v) in &req.headers {
        let lower = k.to_ascii_lowercase();
        if HOP_BY_HOP.contains(&lower.as_str()) || lower == "host" {
            continue;
        }
        builder = builder.header(k.as_str(), v.as_str());
    }
    if let Some(account) = &state.account_id {
        builder = builder.header("x-moto-account-id", account.as_str());
    }
    let request = match builder.body(Full::new(Bytes::from(req.body.clone()))) {
        Ok(r) => r,
        Err(e) => return proxy_failure(502, format!("fault proxy: bad request: {e}")),
    };
    let call = async {
        let response = state
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        Ok::<Answer, String>(Answer {
            status: parts.status.as_u16(),
            headers,
            body,
        })
    };
    match tokio::time::timeout(UPSTREAM_TIMEOUT, call).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => proxy_failure(502, format!("fault proxy: upstream failed: {e}")),
        Err(_) => proxy_failure(
            504,
            format!("fault proxy: upstream did not answer within {UPSTREAM_TIMEOUT:?}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_decoding() {
        let (a, v) =
            query_params(b"Action=DescribeLoadBalancers&Version=2015-12-01&Names.member.1=a%2Db");
        assert_eq!(a.as_deref(), Some("DescribeLoadBalancers"));
        assert_eq!(v.as_deref(), Some("2015-12-01"));
        assert_eq!(percent_decode("a%2Db+c%"), "a-b c%");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("%C3%A9%zz"), "é%zz");
    }

    #[test]
    fn listings() {
        assert!(is_listing(
            "DescribeLoadBalancers",
            b"Action=DescribeLoadBalancers&Version=2015-12-01&PageSize=400"
        ));
        assert!(!is_listing(
            "DescribeLoadBalancers",
            b"Action=DescribeLoadBalancers&Names.member.1=x"
        ));
        assert!(!is_listing(
            "DescribeTargetGroups",
            b"Action=DescribeTargetGroups&LoadBalancerArn=arn"
        ));
        assert!(!is_listing("DescribeTags", b"Action=DescribeTags"));
    }

    #[test]
    fn families_match_the_operator() {
        assert_eq!(Family::of("DescribeTags"), Family::Describe);
        assert_eq!(Family::of("RegisterTargets"), Family::Targets);
        assert_eq!(Family::of("DeregisterTargets"), Family::Targets);
        assert_eq!(Family::of("CreateLoadBalancer"), Family::Write);
        assert_eq!(Family::of("AuthorizeSecurityGroupIngress"), Family::Write);
    }

    #[tokio::test]
    async fn the_quota_throttles_what_goes_over_it_and_refills() {
        let state = State {
            upstream: String::new(),
            account_id: None,
            faults: Mutex::new(FaultConfig {
                quota: Some(5.0),
                ..FaultConfig::none()
            }),
            started: Instant::now(),
            stats: Mutex::new(Stats::default()),
            seen: Mutex::new(HashMap::new()),
            quota: Mutex::new((f64::MAX, Instant::now())),
            lost: Mutex::new(HashMap::new()),
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        };
        // Whether each of `n` distinct requests is throttled.
        let throttled = |tag: &str, n: usize| -> Vec<bool> {
            (0..n)
                .map(|i| {
                    let body = format!("{tag}={i}");
                    let fate = decide(&state, "DescribeTags", body.as_bytes()).fate;
                    matches!(fate, Fate::Throttle)
                })
                .collect()
        };
        assert_eq!(
            throttled("n", 7),
            [false, false, false, false, false, true, true],
            "a second's worth, then throttled"
        );
        // 0.4 s later at 5/s: two more.
        lock(&state.quota).1 -= Duration::from_millis(400);
        assert_eq!(throttled("m", 3), [false, false, true]);
    }

    #[test]
    fn validation() {
        assert!(FaultConfig::mixed(0.2, 1).validate().is_ok());
        assert!(FaultConfig::mixed(1.0, 1).validate().is_ok());
        assert!(FaultConfig::throttling(1.5, 1).validate().is_err());
        assert!(
            FaultConfig {
                throttle: 0.6,
                reset: 0.6,
                ..FaultConfig::none()
            }
            .validate()
            .is_err()
        );
    }
}
