//! Health checks, one task per target group: every interval all registered targets are probed
//! concurrently (each probe bounded by the check's timeout, at most the interval). A target turns
//! unhealthy after `unhealthy_threshold` consecutive failures and healthy again after
//! `healthy_threshold` consecutive successes. New targets start healthy and are probed at once.
//!
//! TCP: a connect to the target address at the check port (the traffic port when none).
//! HTTP: `GET path` and a status code in `success_codes` (default `200-399`).
//! HTTPS: no TLS library in this crate, so it is checked like TCP (the port accepts connections).

use super::target::Snapshot;
use cloudlb_core::model::{HealthCheck, HealthCheckProtocol, ServiceRef};
use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a health check runs against: a target group, seen only through this (the group starts
/// the check; the check knows nothing of the group).
pub(crate) trait Checked: Send + Sync + 'static {
    /// The Service and the target group's key, for the logs.
    fn names(&self) -> (&ServiceRef, &str);
    /// The targets to probe now.
    fn targets(&self) -> Snapshot;
    /// Some target turned healthy or unhealthy.
    fn health_changed(&self);
}

/// Probes the targets of `group` every interval until the group is gone (or the task aborted).
pub(crate) async fn run<G: Checked>(group: Weak<G>, check: HealthCheck) {
    let interval = Duration::from_secs(u64::from(check.interval_seconds.max(1)));
    let timeout = Duration::from_secs(u64::from(check.timeout_seconds.max(1))).min(interval);
    let healthy_threshold = check.healthy_threshold.max(1);
    let unhealthy_threshold = check.unhealthy_threshold.max(1);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(snap) = group.upgrade().map(|g| g.targets()) else {
            return;
        };
        let results =
            futures::future::join_all(snap.iter().map(|t| probe(&check, t.addr, timeout))).await;
        let Some(g) = group.upgrade() else {
            return;
        };
        let (service, key) = g.names();
        let mut changed = false;
        for (t, result) in snap.iter().zip(results) {
            match result {
                Ok(()) => {
                    t.failures.store(0, Ordering::Relaxed);
                    let n = t
                        .successes
                        .fetch_add(1, Ordering::Relaxed)
                        .saturating_add(1);
                    if n >= healthy_threshold && t.set_healthy(true) {
                        tracing::info!(%service, group = %key, target = %t.addr, "target healthy");
                        changed = true;
                    }
                }
                Err(why) => {
                    t.successes.store(0, Ordering::Relaxed);
                    let n = t.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                    tracing::debug!(%service, group = %key, target = %t.addr, failures = n, %why, "health check failed");
                    if n >= unhealthy_threshold && t.set_healthy(false) {
                        tracing::warn!(%service, group = %key, target = %t.addr, %why, "target unhealthy: no new connections");
                        changed = true;
                    }
                }
            }
        }
        if changed {
            g.health_changed();
        }
    }
}

/// One probe of `target` (the traffic address); `Err` says why it failed.
pub(crate) async fn probe(
    check: &HealthCheck,
    target: SocketAddr,
    timeout: Duration,
) -> Result<(), String> {
    let addr = SocketAddr::new(target.ip(), check.port.unwrap_or(target.port()));
    let attempt = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        if check.protocol != HealthCheckProtocol::Http {
            return Ok(());
        }
        let path = check.path.as_deref().unwrap_or("/");
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cloudlb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|e| format!("read from {addr}: {e}"))?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let code = status_code(&buf).ok_or_else(|| format!("{addr}: no HTTP status line"))?;
        let codes = check.success_codes.as_deref().unwrap_or("200-399");
        if code_matches(codes, code) {
            Ok(())
        } else {
            Err(format!("{addr}{path}: status {code} not in {codes}"))
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: no answer within {timeout:?}")))
}

fn status_code(response: &[u8]) -> Option<u16> {
    let line = response.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// `200`, `200-399`, `200,202,300-399`.
fn code_matches(spec: &str, code: u16) -> bool {
    spec.split(',')
        .map(str::trim)
        .any(|part| match part.split_once('-') {
            Some((lo, hi)) => match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&code),
                _ => false,
            },
            None => part.parse::<u16>() == Ok(code),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_codes() {
        assert!(code_matches("200-399", 302));
        assert!(!code_matches("200-399", 404));
        assert!(code_matches("200,204", 204));
        assert!(code_matches("200, 500-502", 501));
        assert!(!code_matches("junk", 200));
    }

    #[test]
    fn status_line() {
        assert_eq!(
            status_code(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.0 200 OK\r\n\r\n"), Some(200));
        assert_eq!(status_code(b"SSH-2.0\r\n"), None);
    }
}
