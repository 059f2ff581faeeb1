//! Logging set-up: `--log-format json|text`, `--log-level` (or `RUST_LOG`).

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` wins over `level` when set.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(fmt::layer().json().with_current_span(true))
            .try_init(),
        LogFormat::Text => registry.with(fmt::layer().with_target(false)).try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    provider: String,
    operation: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLabels {
    provider: String,
    family: String,
}

/// A gauge of calls per second.
type RateGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Prometheus metrics, prefix `cloudlb_`.
pub struct Metrics {
    registry: Registry,
    reconcile_total: Family<ResultLabels, Counter>,
    reconcile_duration: Histogram,
    cloud_calls: Family<CallLabels, Counter>,
    cloud_throttled: Counter,
    cloud_rate: Family<RateLabels, RateGauge>,
    watch_errors: Family<ResourceLabels, Counter>,
    status_writes: Counter,
    orphan_sweeps: Counter,
    managed_load_balancers: Gauge,
    leader: Gauge,
    ready: std::sync::atomic::AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cloudlb");
        let reconcile_total = Family::<ResultLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let cloud_calls = Family::<CallLabels, Counter>::default();
        let cloud_throttled = Counter::default();
        let cloud_rate = Family::<RateLabels, RateGauge>::default();
        let watch_errors = Family::<ResourceLabels, Counter>::default();
        let status_writes = Counter::default();
        let orphan_sweeps = Counter::default();
        let managed_load_balancers = Gauge::default();
        let leader = Gauge::default();
        registry.register(
            "reconcile",
            "Service reconciles by result (ok, invalid, or the error category)",
            reconcile_total.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of Service reconciles",
            reconcile_duration.clone(),
        );
        registry.register(
            "cloud_api_calls",
            "Cloud API calls by provider, operation and outcome",
            cloud_calls.clone(),
        );
        registry.register(
            "cloud_api_throttled",
            "Cloud API calls answered with throttling",
            cloud_throttled.clone(),
        );
        registry.register(
            "cloud_api_rate_limit",
            "The client-side limit of cloud calls per second, by provider and family (describe, write, targets); it halves when the cloud throttles and recovers slowly; 0: none",
            cloud_rate.clone(),
        );
        registry.register(
            "watch_errors",
            "Failed list/watch requests to the Kubernetes API by resource (each is retried with backoff)",
            watch_errors.clone(),
        );
        registry.register(
            "status_writes",
            "Writes of a Service's status.loadBalancer (made only when it changed)",
            status_writes.clone(),
        );
        registry.register(
            "orphan_sweeps",
            "Finished sweeps for cloud resources of Services that are gone",
            orphan_sweeps.clone(),
        );
        registry.register(
            "managed_load_balancers",
            "Load balancers this operator manages",
            managed_load_balancers.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader lease (or runs without leader election)",
            leader.clone(),
        );
        Metrics {
            registry,
            leader,
            ready: std::sync::atomic::AtomicBool::new(false),
            reconcile_total,
            reconcile_duration,
            cloud_calls,
            cloud_throttled,
            cloud_rate,
            watch_errors,
            status_writes,
            orphan_sweeps,
            managed_load_balancers,
        }
    }

    pub fn reconciled(&self, result: &str, seconds: f64) {
        self.reconcile_total
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
        self.reconcile_duration.observe(seconds);
    }

    /// A list/watch of `resource` failed (it is retried with backoff).
    pub fn watch_error(&self, resource: &str) {
        self.watch_errors
            .get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            })
            .inc();
    }

    /// Failed list/watch requests for `resource` so far.
    pub fn watch_error_count(&self, resource: &str) -> u64 {
        self.watch_errors
            .get_or_create(&ResourceLabels {
                resource: resource.to_string(),
            })
            .get()
    }

    /// How many reconciles ended with `result` so far.
    pub fn reconcile_count(&self, result: &str) -> u64 {
        self.reconcile_total
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .get()
    }

    /// A Service's `status.loadBalancer` was written.
    pub fn status_written(&self) {
        self.status_writes.inc();
    }

    /// Status writes so far.
    pub fn status_write_count(&self) -> u64 {
        self.status_writes.get()
    }

    /// An orphan sweep finished.
    pub fn orphan_swept(&self) {
        self.orphan_sweeps.inc();
    }

    /// Orphan sweeps finished so far.
    pub fn orphan_sweep_count(&self) -> u64 {
        self.orphan_sweeps.get()
    }

    pub fn set_managed_load_balancers(&self, n: i64) {
        self.managed_load_balancers.set(n);
    }

    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// `/readyz`: caches synced (or standing by for the lease).
    pub fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl cloudlb_core::provider::CallObserver for Metrics {
    /// Counted in `cloudlb_cloud_api_calls_total`; throttled calls also in
    /// `cloudlb_cloud_api_throttled_total`.
    fn cloud_call(&self, provider: &str, operation: &str, outcome: &str) {
        self.cloud_calls
            .get_or_create(&CallLabels {
                provider: provider.to_string(),
                operation: operation.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
        if outcome == "throttled" {
            self.cloud_throttled.inc();
        }
    }

    /// `cloudlb_cloud_api_rate_limit{provider,family}`.
    fn call_rate(&self, provider: &str, family: &str, per_second: f64) {
        self.cloud_rate
            .get_or_create(&RateLabels {
                provider: provider.to_string(),
                family: family.to_string(),
            })
            .set(per_second);
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;
    use cloudlb_core::provider::CallObserver;

    #[test]
    fn cloud_calls_are_counted_by_operation_and_throttles_apart() {
        let metrics = Metrics::new();
        metrics.cloud_call("aws", "CreateLoadBalancer", "ok");
        metrics.cloud_call("aws", "RegisterTargets", "throttled");
        let text = metrics.encode();
        assert!(
            text.contains(
                r#"cloudlb_cloud_api_calls_total{provider="aws",operation="CreateLoadBalancer",outcome="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("cloudlb_cloud_api_throttled_total 1"),
            "{text}"
        );
    }

    #[test]
    fn the_adapted_call_rate_is_a_gauge_per_family() {
        let metrics = Metrics::new();
        metrics.call_rate("aws", "write", 10.0);
        metrics.call_rate("aws", "write", 5.0);
        let text = metrics.encode();
        assert!(
            text.contains(r#"cloudlb_cloud_api_rate_limit{provider="aws",family="write"} 5.0"#),
            "{text}"
        );
    }
}
