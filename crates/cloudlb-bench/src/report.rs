//! Results: per-phase numbers, the goal-vs-measured table and the JSON file.

use crate::{Args, Mark, Operator};
use cloudlb_testbed::faultproxy::{Counts, Family, Outcome};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Reads per Service of a full drift sweep before the checks were batched: measured with this
/// benchmark's Services (every second one with two ports: 1.5 target groups each) at 1000 / 200
/// (docs/benchmarks.md, "Takeovers and the drift sweep").
const READS_BEFORE_BATCHING: f64 = 10.02;

/// One phase of the run.
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    pub counts: Counts,
    /// Cloud calls counted at the proxy (HTTP requests, SDK retries included).
    pub total: u64,
    /// Cloud calls the operator counted itself (`cloudlb_cloud_api_calls_total` delta).
    pub operator_calls: f64,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Reconciles during the phase by result (`cloudlb_reconcile_total` delta).
    pub reconciles: BTreeMap<String, f64>,
    pub notes: Vec<String>,
    /// The restart phase: the calls of its first window, and the status changes it saw.
    pub first_window: Option<Counts>,
    pub status_changes: Option<u64>,
    /// The drift-sweep phase's numbers.
    pub sweep: Option<Sweep>,
}

/// One full drift sweep, as measured.
pub struct Sweep {
    /// Calls in the first 90 % of the window after the start, before any drift check can be
    /// due (the checkpoints: none).
    pub before_first_check: u64,
    /// From the first drift check until every Service was verified.
    pub seconds: usize,
    /// Calls per second over those seconds, and in the busiest one.
    pub average: f64,
    pub peak: u64,
    pub reads_per_service: f64,
    pub verified: f64,
}

impl Phase {
    pub async fn new(
        name: &str,
        seconds: f64,
        counts: Counts,
        op: &Operator,
        mark: &Mark,
    ) -> Phase {
        let operator_calls = op.metric("cloudlb_cloud_api_calls_total", "").await - mark.calls;
        let mut reconciles = op.reconciles().await;
        for (result, n) in reconciles.iter_mut() {
            *n -= mark.reconciles.get(result).copied().unwrap_or(0.0);
        }
        reconciles.retain(|_, n| *n > 0.0);
        let (rss_kb, hwm_kb) = op.memory();
        Phase {
            name: name.to_string(),
            seconds,
            total: counts.total,
            counts,
            operator_calls,
            rss_kb,
            hwm_kb,
            reconciles,
            notes: Vec::new(),
            first_window: None,
            status_changes: None,
            sweep: None,
        }
    }

    /// `Describe*` calls.
    pub fn reads(&self) -> u64 {
        self.counts
            .totals()
            .iter()
            .filter(|(a, _)| a.starts_with("Describe"))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// Calls answered with throttling.
    pub fn throttled(&self) -> u64 {
        self.counts.outcome(Outcome::Throttled)
    }

    /// Calls that did not succeed (mostly NotFound answers to lookups by name).
    fn not_ok(&self) -> u64 {
        self.total - self.counts.outcome(Outcome::Ok)
    }

    /// Calls per rate-limit family, and per second of the phase.
    fn families(&self) -> Value {
        let mut out = serde_json::Map::new();
        for family in Family::ALL {
            let n: u64 = self
                .counts
                .totals()
                .iter()
                .filter(|(a, _)| Family::of(a) == family)
                .map(|(_, n)| n)
                .sum();
            let rate = if self.seconds > 0.0 {
                round(n as f64 / self.seconds)
            } else {
                0.0
            };
            out.insert(
                family.as_str().into(),
                json!({"calls": n, "per_second": rate}),
            );
        }
        Value::Object(out)
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "calls_by_family": self.families(),
            "seconds": round(self.seconds),
            "cloud_calls": self.total,
            "cloud_calls_by_operation": self.counts.totals(),
            "cloud_calls_by_operation_and_outcome": self.counts.by_action,
            "account_wide_listings": self.counts.listings,
            "operator_reported_calls": self.operator_calls,
            "reconciles_by_result": self.reconciles,
            "operator_rss_mib": mib(self.rss_kb),
            "operator_peak_rss_mib": mib(self.hwm_kb),
            "notes": self.notes,
            "first_window_calls_by_operation": self.first_window.as_ref().map(Counts::totals),
            "status_changes": self.status_changes,
            "sweep": self.sweep.as_ref().map(|s| json!({
                "calls_before_first_check": s.before_first_check,
                "seconds": s.seconds,
                "calls_per_second_average": round(s.average),
                "calls_in_busiest_second": s.peak,
                "reads_per_service": round(s.reads_per_service),
                "services_verified": s.verified,
            })),
        })
    }
}

fn mib(kb: u64) -> f64 {
    round(kb as f64 / 1024.0)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub struct Report {
    services: usize,
    nodes: usize,
    rate_limit: f64,
    adaptive: bool,
    quota: Option<f64>,
    target_groups: usize,
    operator: String,
    cores: usize,
    phases: Vec<Phase>,
    latency: (f64, f64, f64),
    statuses: usize,
    leftovers: (usize, usize, usize),
    peak_rss_kb: u64,
    /// RSS of the ready operator before the first Service.
    baseline_rss_kb: u64,
    operator_uptime: f64,
    operator_exit: Option<String>,
    load: Vec<String>,
    died: Option<String>,
    rss_timeline: Vec<(f64, u64)>,
}

/// `/proc/loadavg` (the machine is shared: other work skews timings).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Report {
    pub fn new(args: &Args, target_groups: usize, operator: String) -> Report {
        Report {
            services: args.services,
            nodes: args.nodes,
            rate_limit: args.aws_rate_limit,
            adaptive: args.aws_rate_adaptive,
            quota: args.aws_quota,
            target_groups,
            operator,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            phases: Vec::new(),
            latency: (f64::NAN, f64::NAN, f64::NAN),
            statuses: 0,
            leftovers: (0, 0, 0),
            peak_rss_kb: 0,
            baseline_rss_kb: 0,
            operator_uptime: 0.0,
            operator_exit: None,
            load: Vec::new(),
            died: None,
            rss_timeline: Vec::new(),
        }
    }

    pub fn rss_timeline(&mut self, samples: Vec<(f64, u64)>) {
        self.rss_timeline = samples;
    }

    pub fn died(&mut self, why: String) {
        self.died = Some(why);
    }

    pub fn baseline(&mut self, rss_kb: u64) {
        self.baseline_rss_kb = rss_kb;
    }

    pub fn wave(&mut self, phase: Phase, sorted_latencies: &[f64], statuses: usize) {
        self.latency = (
            percentile(sorted_latencies, 0.5),
            percentile(sorted_latencies, 0.99),
            sorted_latencies.last().copied().unwrap_or(f64::NAN),
        );
        self.statuses = statuses;
        self.phase(phase);
    }

    pub fn phase(&mut self, phase: Phase) {
        self.load
            .push(format!("after {}: {}", phase.name, loadavg()));
        self.phases.push(phase);
    }

    pub fn leftovers(&mut self, lbs: usize, tgs: usize, sgs: usize) {
        self.leftovers = (lbs, tgs, sgs);
    }

    pub fn finish(&mut self, peak_rss_kb: u64, uptime: f64, exit: Option<String>) {
        self.peak_rss_kb = peak_rss_kb;
        self.operator_uptime = uptime;
        self.operator_exit = exit;
    }

    fn get(&self, name: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name == name)
    }

    /// (goal, measured, verdict) rows.
    fn goals(&self) -> Vec<(String, String, String)> {
        let mut rows = Vec::new();
        let verdict = |met: bool| if met { "met" } else { "NOT MET" }.to_string();
        if let Some(w) = self.get("create wave") {
            let all = self.statuses == self.services;
            let v = if self.services != 1000 {
                format!("not comparable ({} Services)", self.services)
            } else if self.cores != 2 {
                format!(
                    "{} ({} cores, not 2)",
                    verdict(all && w.seconds < 60.0),
                    self.cores
                )
            } else {
                verdict(all && w.seconds < 60.0)
            };
            rows.push((
                "1000 Services converge < 60 s on 2 cores".into(),
                format!(
                    "{:.1} s for {}/{} Services ({} calls, rate limit {}/s per family)",
                    w.seconds, self.statuses, self.services, w.total, self.rate_limit
                ),
                v,
            ));
            if let Some(quota) = self.quota {
                let limiter = if self.adaptive { "adaptive" } else { "fixed" };
                rows.push((
                    format!("wave under an AWS-like quota of {quota}/s (compare runs)"),
                    format!(
                        "{} throttled answers of {} calls in {:.1} s; {limiter} limiter, {}/s per family",
                        w.throttled(),
                        w.total,
                        w.seconds,
                        self.rate_limit
                    ),
                    "-".into(),
                ));
            }
            rows.push((
                "create→status latency (informative)".into(),
                format!(
                    "p50 {:.1} s, p99 {:.1} s, max {:.1} s",
                    self.latency.0, self.latency.1, self.latency.2
                ),
                "-".into(),
            ));
        }
        if let Some(p) = self.get("unchanged resync") {
            rows.push((
                "unchanged resync: 0 cloud calls".into(),
                format!("{} calls", p.total),
                verdict(p.total == 0),
            ));
        }
        for (phase, op) in [
            ("node added", "RegisterTargets"),
            ("node removed", "DeregisterTargets"),
        ] {
            if let Some(p) = self.get(phase) {
                let n = p.counts.action(op);
                let other = p.total - n;
                let tgs = self.target_groups as u64;
                // The periodic orphan sweep may run during the phase: it only reads (and
                // deletes nothing here); its account-wide listings give it away.
                let only_sweep = p.counts.listings > 0
                    && p.counts
                        .totals()
                        .keys()
                        .all(|a| a == op || a.starts_with("Describe"));
                rows.push((
                    format!("{phase}: exactly 1 {op} per target group ({tgs}), nothing else"),
                    format!("{op} {n}, other calls {other}, in {:.1} s", p.seconds),
                    if n == tgs && other > 0 && only_sweep {
                        format!("met (the {other} other calls are reads of the orphan sweep)")
                    } else {
                        verdict(n == tgs && other == 0)
                    },
                ));
            }
        }
        if let Some(p) = self.get("endpoint churn") {
            let calls = p.counts.action("RegisterTargets") + p.counts.action("DeregisterTargets");
            let rate = calls as f64 / p.seconds.max(1e-9);
            let other = p.total - calls;
            rows.push((
                "endpoint churn: <= 1 register + 1 deregister per target group per second, nothing else".into(),
                format!("{calls} (de)register calls in {:.1} s = {rate:.2}/s, other calls {other}", p.seconds),
                // The batch of the last window lands after the churn ends: one window more.
                verdict(calls as f64 <= 2.0 * (p.seconds + 1.0) && other == 0),
            ));
        }
        for name in ["restart (kill -9)", "leader failover", "rolling upgrade"] {
            let Some(p) = self.get(name) else {
                continue;
            };
            let first = p.first_window.as_ref().map_or(0, |c| c.total);
            let changes = p.status_changes.unwrap_or(0);
            let writes = p.total - p.reads();
            rows.push((
                format!("{name}: 0 calls in the first 60 s, every status right"),
                format!(
                    "{first} calls in 60 s; {} until steady ({writes} writes); {changes} status changes; peak RSS {:.1} MiB",
                    p.total,
                    p.hwm_kb as f64 / 1024.0
                ),
                verdict(first == 0 && changes == 0),
            ));
        }
        if let Some(s) = self.get("drift sweep").and_then(|p| p.sweep.as_ref()) {
            rows.push((
                "drift sweep: no second above 2x the sweep's average rate".into(),
                format!(
                    "busiest second {} calls, average {:.1}/s over {} s; {} calls before any check was due",
                    s.peak, s.average, s.seconds, s.before_first_check
                ),
                verdict(s.peak as f64 <= 2.0 * s.average && s.before_first_check == 0),
            ));
            rows.push((
                format!(
                    "drift sweep: reads per Service at most half of {READS_BEFORE_BATCHING} (before the batching)"
                ),
                format!(
                    "{:.2} reads per Service; {} Services verified",
                    s.reads_per_service, s.verified
                ),
                verdict(s.reads_per_service <= READS_BEFORE_BATCHING / 2.0),
            ));
        }
        if let Some(p) = self.get("delete all") {
            let (l, t, s) = self.leftovers;
            rows.push((
                "delete everything: 0 resources left".into(),
                format!(
                    "{l} LBs, {t} TGs, {s} SGs left; {} calls in {:.1} s",
                    p.total, p.seconds
                ),
                verdict(l + t + s == 0),
            ));
        }
        let mb = self.peak_rss_kb as f64 / 1024.0;
        let comparable = self.services >= 2000 && self.nodes >= 1000;
        rows.push((
            "operator peak RSS < 50 MB at 2000 Services / 1000 Nodes".into(),
            format!(
                "VmHWM {mb:.1} MiB at {} Services / {} Nodes (idle: {:.1} MiB)",
                self.services,
                self.nodes,
                self.baseline_rss_kb as f64 / 1024.0
            ),
            if comparable {
                verdict(mb < 50.0)
            } else {
                format!("not comparable ({} MiB now)", round(mb))
            },
        ));
        rows
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\ncloudlb-bench: {} Services ({} target groups) over {} Nodes, operator --aws-rate-limit {}, {} cores\n",
            self.services, self.target_groups, self.nodes, self.rate_limit, self.cores
        );
        let _ = writeln!(
            out,
            "{:<18} {:>9} {:>8} {:>8} {:>9}  calls by operation",
            "phase", "seconds", "calls", "errors", "RSS MiB"
        );
        for p in &self.phases {
            let ops: Vec<String> = p
                .counts
                .totals()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(
                out,
                "{:<18} {:>9.1} {:>8} {:>8} {:>9.1}  {}",
                p.name,
                p.seconds,
                p.total,
                p.not_ok(),
                p.rss_kb as f64 / 1024.0,
                if ops.is_empty() {
                    "-".to_string()
                } else {
                    ops.join(" ")
                }
            );
            let reconciles: Vec<String> = p
                .reconciles
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(out, "{:<18} reconciles: {}", "", reconciles.join(" "));
            if p.counts.listings > 0 {
                let _ = writeln!(
                    out,
                    "{:<18} includes {} account-wide listings (the orphan sweep ran)",
                    "", p.counts.listings
                );
            }
        }
        let _ = writeln!(out, "\n{:<72} {:<58} verdict", "goal", "measured");
        for (goal, measured, verdict) in self.goals() {
            let _ = writeln!(out, "{goal:<72} {measured:<58} {verdict}");
        }
        let _ = writeln!(out, "\nload average (1/5/15 min) {}", self.load.join("; "));
        if let Some(why) = &self.died {
            let _ = writeln!(out, "\nTHE OPERATOR DIED: {why}; the run ended there");
        }
        if let Some(exit) = &self.operator_exit {
            let _ = writeln!(out, "\nthe operator exited during the run: {exit}");
        }
        out
    }

    pub fn json(&self) -> Value {
        json!({
            "services": self.services,
            "nodes": self.nodes,
            "target_groups": self.target_groups,
            "aws_rate_limit_per_family": self.rate_limit,
            "aws_rate_adaptive": self.adaptive,
            "aws_quota_per_second": self.quota,
            "cores": self.cores,
            "operator": self.operator,
            "create_to_status_seconds": {
                "p50": round(self.latency.0), "p99": round(self.latency.1), "max": round(self.latency.2),
            },
            "statuses_written": self.statuses,
            "phases": self.phases.iter().map(Phase::json).collect::<Vec<_>>(),
            "left_after_delete": {
                "load_balancers": self.leftovers.0,
                "target_groups": self.leftovers.1,
                "security_groups": self.leftovers.2,
            },
            "operator_peak_rss_mib": mib(self.peak_rss_kb),
            "operator_idle_rss_mib": mib(self.baseline_rss_kb),
            "operator_uptime_seconds": round(self.operator_uptime),
            "operator_exited": self.operator_exit,
            "operator_died": self.died,
            "operator_rss_mib_every_5s": self
                .rss_timeline
                .iter()
                .map(|(t, kb)| json!([t.round(), mib(*kb)]))
                .collect::<Vec<_>>(),
            "load_average": self.load,
            "goals": self.goals().into_iter().map(|(g, m, v)| json!({"goal": g, "measured": m, "verdict": v})).collect::<Vec<_>>(),
        })
    }
}
