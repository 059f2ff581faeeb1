//! Benchmark of the local provider's TCP proxy against HAProxy (TCP mode) and against the
//! backends directly, with `wrk` driving HTTP/1.1 load on loopback, all in one run.
//!
//! ```text
//! cargo build --release --bin cloudlb-bench-proxy
//! target/release/cloudlb-bench-proxy --duration 10 --rounds 3
//! ```
//!
//! Needs `wrk` and `haproxy` on PATH (Debian: `apt-get install wrk haproxy`). Prints throughput,
//! p50/p99 latency per target and the ratios local/HAProxy and local/direct; asserts nothing.
//! Each round runs every target once (direct, HAProxy, local) so drift hits all of them alike;
//! the median over the rounds is reported.

use clap::Parser;
use cloudlb::model::{
    Algorithm, Desired, HealthCheck, Listener, LoadBalancer, LocalSpec, Protocol, ServiceRef,
    Target, TargetGroup, TargetType,
};
use cloudlb::provider::Provider;
use cloudlb::provider::local::{LocalProvider, LocalSettings};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug, Clone)]
#[command(about = "Local provider vs HAProxy vs direct, HTTP load with wrk on loopback")]
struct Args {
    /// Number of HTTP backends ("nodes").
    #[arg(long, default_value_t = 4)]
    backends: u8,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Rounds (each runs every target once); the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Open connections wrk keeps.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    wrk_threads: usize,
    /// Worker threads of the local provider's data plane, and HAProxy's nbthread (default: CPUs).
    #[arg(long)]
    proxy_threads: Option<usize>,
    /// Worker threads of the backends' runtime (default: CPUs).
    #[arg(long)]
    backend_threads: Option<usize>,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Also run with `Connection: close` (a new connection per request).
    #[arg(long)]
    with_close: bool,
}

const BACKEND_PORT: u16 = 18080;
const LB_PORT: u16 = 8080;
const LOCAL_ADDR: Ipv4Addr = Ipv4Addr::new(127, 2, 1, 1);
const HAPROXY_ADDR: Ipv4Addr = Ipv4Addr::new(127, 2, 2, 1);

fn backend_addr(i: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 2, 0, i + 1)), BACKEND_PORT)
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn main() -> Result<(), BoxError> {
    cloudlb_bench::init_logging();
    let args = Args::parse();
    for tool in ["wrk", "haproxy"] {
        if !on_path(tool) {
            return Err(format!(
                "{tool} is not installed; install it (Debian: apt-get install -y wrk haproxy) and run again"
            )
            .into());
        }
    }
    let cpus = std::thread::available_parallelism().map_or(2, usize::from);
    let proxy_threads = args.proxy_threads.unwrap_or(cpus).max(1);
    let backend_threads = args.backend_threads.unwrap_or(cpus).max(1);

    // Backends: their own runtime (threads), shared by all three targets.
    let backend_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(backend_threads)
        .thread_name("backend")
        .enable_all()
        .build()?;
    let body = "x".repeat(args.body_bytes.saturating_sub(1)) + "\n";
    for i in 0..args.backends {
        let listener = backend_rt.block_on(TcpListener::bind(backend_addr(i)))?;
        backend_rt.spawn(serve_http(listener, body.clone()));
    }

    // (a) The local provider: its data plane runs on its own worker threads (`cloudlb-lb-N`);
    // health checks and applies on a small control runtime, as in the operator.
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("local-ctl")
        .enable_all()
        .build()?;
    let provider = LocalProvider::new(LocalSettings {
        workers: proxy_threads,
        ..LocalSettings::default()
    });
    let desired = desired(args.backends);
    proxy_rt.block_on(async {
        let observed = provider.observe(&desired).await?;
        let plan = provider.plan(&desired, &observed)?;
        provider.apply(&desired, &observed, &plan).await?;
        Ok::<_, BoxError>(())
    })?;
    let local = SocketAddr::new(IpAddr::V4(LOCAL_ADDR), LB_PORT);

    // (b) HAProxy, TCP mode, same backends, same algorithm, same thread count.
    let dir = std::env::temp_dir().join(format!("cloudlb-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let haproxy = Haproxy::start(&dir, proxy_threads, args.backends)?;
    let ha = SocketAddr::new(IpAddr::V4(HAPROXY_ADDR), LB_PORT);

    // (c) Direct: each wrk thread on one backend.
    let direct_script = dir.join("direct.lua");
    std::fs::write(&direct_script, direct_lua(args.backends))?;

    for addr in [local, ha, backend_addr(0)] {
        wait_ready(addr)?;
    }
    println!(
        "cloudlb proxy benchmark: {} backends, wrk -t{} -c{} -d{}s, {} rounds, {} CPUs, proxy threads {} (local provider workers = HAProxy nbthread), backend threads {}, body {} B, {}",
        args.backends,
        args.wrk_threads,
        args.connections,
        args.duration,
        args.rounds,
        cpus,
        proxy_threads,
        backend_threads,
        args.body_bytes,
        haproxy.version
    );

    let clk_tck = clk_tck();
    let haproxy_pid = haproxy.child.id();
    let cpu = move |t: &Target3<'_>| match t {
        Target3::Local(_) => threads_cpu_seconds(&["cloudlb-lb-", "local-ctl"], clk_tck),
        Target3::Haproxy(_) => stat_cpu_seconds(&format!("/proc/{haproxy_pid}/stat"), clk_tck),
        Target3::Direct(_) => 0.0,
    };
    let mut scenarios = vec![("keep-alive", false)];
    if args.with_close {
        scenarios.push(("connection: close", true));
    }
    for (scenario, close) in scenarios {
        // Short warm-up of each path.
        for target in [
            Target3::Direct(&direct_script),
            Target3::Haproxy(ha),
            Target3::Local(local),
        ] {
            run_wrk(&args, &target, close, Some(2), &cpu)?;
        }
        let mut results: BTreeMap<&str, Vec<WrkResult>> = BTreeMap::new();
        for round in 0..args.rounds {
            for target in [
                Target3::Direct(&direct_script),
                Target3::Haproxy(ha),
                Target3::Local(local),
            ] {
                let r = run_wrk(&args, &target, close, None, &cpu)?;
                eprintln!(
                    "  round {} {:<8} {:>10.0} req/s  p50 {:>8.3} ms  p99 {:>8.3} ms  proxy cpu {:>6.2} us/req  errors {}",
                    round + 1,
                    target.label(),
                    r.rps,
                    r.p50_ms,
                    r.p99_ms,
                    r.cpu_us_per_req,
                    r.errors
                );
                results.entry(target.label()).or_default().push(r);
            }
        }
        print_report(scenario, &results);
    }

    drop(haproxy);
    proxy_rt.block_on(provider.shutdown());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

enum Target3<'a> {
    Local(SocketAddr),
    Haproxy(SocketAddr),
    Direct(&'a Path),
}

impl Target3<'_> {
    fn label(&self) -> &'static str {
        match self {
            Target3::Local(_) => "local",
            Target3::Haproxy(_) => "haproxy",
            Target3::Direct(_) => "direct",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Connect errors, timeouts and non-2xx/3xx answers.
    errors: u64,
    /// CPU time the proxy used per request (µs; 0 for direct).
    cpu_us_per_req: f64,
    requests: f64,
}

impl WrkResult {
    /// Each measure of `self` over the same measure of `base` (1.0: equal).
    fn relative_to(&self, base: &WrkResult) -> WrkResult {
        WrkResult {
            rps: self.rps / base.rps,
            p50_ms: self.p50_ms / base.p50_ms,
            p99_ms: self.p99_ms / base.p99_ms,
            errors: self.errors,
            cpu_us_per_req: self.cpu_us_per_req / base.cpu_us_per_req,
            requests: self.requests / base.requests,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn print_report(scenario: &str, results: &BTreeMap<&str, Vec<WrkResult>>) {
    let med = |label: &str| {
        let rs = results.get(label).cloned().unwrap_or_default();
        WrkResult {
            rps: median(rs.iter().map(|r| r.rps).collect()),
            p50_ms: median(rs.iter().map(|r| r.p50_ms).collect()),
            p99_ms: median(rs.iter().map(|r| r.p99_ms).collect()),
            errors: rs.iter().map(|r| r.errors).sum(),
            cpu_us_per_req: median(rs.iter().map(|r| r.cpu_us_per_req).collect()),
            requests: 0.0,
        }
    };
    let (a, b, c) = (med("local"), med("haproxy"), med("direct"));
    let mut out = String::new();
    let _ = writeln!(out, "\n== {scenario} (median of rounds) ==");
    let _ = writeln!(
        out,
        "{:<22} {:>12} {:>10} {:>10} {:>16} {:>8}",
        "target", "req/s", "p50 ms", "p99 ms", "proxy cpu us/req", "errors"
    );
    for (label, r) in [
        ("(a) local provider", &a),
        ("(b) haproxy tcp", &b),
        ("(c) direct", &c),
    ] {
        let _ = writeln!(
            out,
            "{:<22} {:>12.0} {:>10.3} {:>10.3} {:>16.2} {:>8}",
            label, r.rps, r.p50_ms, r.p99_ms, r.cpu_us_per_req, r.errors
        );
    }
    let (ab, ac) = (a.relative_to(&b), a.relative_to(&c));
    let _ = writeln!(
        out,
        "(a)/(b): throughput {:.1}% (goal >= 90%), p50 {:.2}x, p99 {:.2}x (goal <= 1.2x)",
        100.0 * ab.rps,
        ab.p50_ms,
        ab.p99_ms
    );
    let _ = writeln!(
        out,
        "(a)/(b): proxy CPU per request {:.2}x",
        ab.cpu_us_per_req
    );
    let _ = writeln!(
        out,
        "(a)/(c): throughput {:.1}%, p50 {:.2}x, p99 {:.2}x",
        100.0 * ac.rps,
        ac.p50_ms,
        ac.p99_ms
    );
    print!("{out}");
}

fn run_wrk(
    args: &Args,
    target: &Target3<'_>,
    close: bool,
    duration: Option<u64>,
    cpu: &dyn Fn(&Target3<'_>) -> f64,
) -> Result<WrkResult, BoxError> {
    let cpu_before = cpu(target);
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{}", args.wrk_threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", duration.unwrap_or(args.duration)))
        .arg("--latency")
        .arg("--timeout")
        .arg("5s");
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let url = match target {
        Target3::Local(a) | Target3::Haproxy(a) => format!("http://{a}/"),
        Target3::Direct(script) => {
            cmd.arg("-s").arg(script);
            format!("http://{}/", backend_addr(0))
        }
    };
    cmd.arg(url);
    let started = Instant::now();
    let out = cmd.stderr(Stdio::inherit()).output()?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_used = cpu(target) - cpu_before;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("wrk failed ({}): {text}", out.status).into());
    }
    let mut r = parse_wrk(&text).ok_or_else(|| format!("cannot parse wrk output:\n{text}"))?;
    let _ = elapsed;
    let requests = r.requests;
    r.cpu_us_per_req = if requests > 0.0 {
        cpu_used * 1e6 / requests
    } else {
        f64::NAN
    };
    Ok(r)
}

/// Reads `Requests/sec:`, the 50% and 99% lines of `--latency`, and the error lines.
fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Requests/sec:") => rps = words.next().and_then(|v| v.parse().ok()),
            Some(n) if line.contains(" requests in ") => {
                r.requests = n.parse().unwrap_or(0.0);
            }
            Some("50%") => p50 = words.next().and_then(duration_ms),
            Some("99%") => p99 = words.next().and_then(duration_ms),
            Some("Socket") => {
                // `Socket errors: connect 0, read 0, write 0, timeout 0`. Read errors are what
                // wrk counts when the server closes after a `Connection: close` answer: not
                // failures, so only connect and timeout count.
                for part in line.split([',', ':']) {
                    let mut kv = part.split_whitespace();
                    if let (Some(k @ ("connect" | "timeout")), Some(v)) = (kv.next(), kv.next()) {
                        let _ = k;
                        r.errors += v.parse::<u64>().unwrap_or(0);
                    }
                }
            }
            Some("Non-2xx") => {
                r.errors += line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    r.rps = rps?;
    r.p50_ms = p50?;
    r.p99_ms = p99?;
    Some(r)
}

/// `588.00us`, `1.53ms`, `2.01s` → milliseconds.
fn duration_ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// A wrk script that points each thread at one backend, round-robin.
fn direct_lua(backends: u8) -> String {
    let hosts: Vec<String> = (0..backends)
        .map(|i| format!("\"{}\"", backend_addr(i).ip()))
        .collect();
    format!(
        r#"local hosts = {{ {} }}
local n = 0
function setup(thread)
  local host = hosts[(n % #hosts) + 1]
  n = n + 1
  thread.addr = wrk.lookup(host, "{BACKEND_PORT}")[1]
end
"#,
        hosts.join(", ")
    )
}

/// The model the controller would build for a Service with one TCP port and `n` nodes.
fn desired(n: u8) -> Desired {
    let service = ServiceRef {
        namespace: "bench".into(),
        name: "web".into(),
        uid: "bench-uid".into(),
    };
    let local = LocalSpec {
        address_pool: IpAddr::V4(LOCAL_ADDR).into(),
        algorithm: Algorithm::RoundRobin,
        ..LocalSpec::default()
    };
    let lb = LoadBalancer {
        listeners: vec![Listener {
            port: LB_PORT,
            protocol: Protocol::Tcp,
            target_group: "tcp-8080".into(),
            certificates: vec![],
            ssl_policy: None,
            alpn_policy: None,
            attributes: BTreeMap::new(),
        }],
        target_groups: vec![TargetGroup {
            key: "tcp-8080".into(),
            name: "k8s-bench-web-8080".into(),
            protocol: Protocol::Tcp,
            port: BACKEND_PORT,
            target_type: TargetType::Ip,
            ip_family: Default::default(),
            health_check: HealthCheck {
                timeout_seconds: 5,
                ..HealthCheck::TCP_TRAFFIC_PORT
            },
            attributes: BTreeMap::new(),
            targets: (0..n)
                .map(|i| Target {
                    id: backend_addr(i).ip().to_string(),
                    port: BACKEND_PORT,
                })
                .collect(),
            tags: BTreeMap::new(),
        }],
        status_ports: vec![(LB_PORT, Protocol::Tcp)],
        ..LoadBalancer::served_locally("k8s-bench-web".into(), local)
    };
    Desired {
        service,
        lb_name: "k8s-bench-web".into(),
        lb: Some(lb),
    }
}

/// HAProxy as a child process, killed on drop.
struct Haproxy {
    child: Child,
    version: String,
}

impl Haproxy {
    fn start(dir: &Path, threads: usize, backends: u8) -> Result<Self, BoxError> {
        let mut cfg = format!(
            "global\n  maxconn 8192\n  nbthread {threads}\n\ndefaults\n  mode tcp\n  timeout connect 3s\n  timeout client 60s\n  timeout server 60s\n\nfrontend fe\n  bind {HAPROXY_ADDR}:{LB_PORT}\n  default_backend be\n\nbackend be\n  balance roundrobin\n"
        );
        for i in 0..backends {
            let _ = writeln!(cfg, "  server s{i} {}", backend_addr(i));
        }
        let path: PathBuf = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg)?;
        let version = Command::new("haproxy")
            .arg("-v")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.split(" - ").next().unwrap_or(l).to_string())
            })
            .unwrap_or_else(|| "HAProxy".into());
        let child = Command::new("haproxy")
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Haproxy { child, version })
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        || Path::new("/usr/sbin").join(tool).is_file()
}

fn wait_ready(addr: SocketAddr) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            return Err(format!("{addr} does not accept connections").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A minimal HTTP/1.1 server: answers every request (no body expected) with `body`, keeps the
/// connection unless the request says `Connection: close`.
async fn serve_http(listener: TcpListener, body: String) {
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response: std::sync::Arc<[u8]> = response.into_bytes().into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(http_conn(stream, response.clone()));
    }
}

async fn http_conn(mut stream: TcpStream, response: std::sync::Arc<[u8]>) {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let mut out = Vec::with_capacity(response.len() * 4);
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut close = false;
        // Every complete request in the buffer (pipelining): one write for all answers.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = &buf[..end];
            close |= head
                .split(|b| *b == b'\n')
                .any(|l| l.to_ascii_lowercase().starts_with(b"connection: close"));
            out.extend_from_slice(&response);
            buf.drain(..end + 4);
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Clock ticks per second of `/proc/*/stat` times.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a `/proc/.../stat` file, in seconds.
fn stat_cpu_seconds(path: &str, clk_tck: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(path) else {
        return 0.0;
    };
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / clk_tck
}

/// CPU seconds of this process's threads whose name starts with one of `prefixes`.
fn threads_cpu_seconds(prefixes: &[&str], clk_tck: f64) -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    tasks
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| prefixes.iter().any(|p| c.trim().starts_with(p)))
        })
        .map(|t| stat_cpu_seconds(&t.path().join("stat").to_string_lossy(), clk_tck))
        .sum()
}
