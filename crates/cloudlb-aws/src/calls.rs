//! Every AWS SDK call goes through [`Calls::run`]: it waits for a client-side rate-limit token of
//! the call's family, sends the request, classifies the outcome and counts it as
//! `Operation/outcome`, and, when metrics are attached, as
//! `cloudlb_cloud_api_calls_total{provider="aws",operation,outcome}`.

use super::error::{AwsError, ErrorKind, OperationError};
use aws_sdk_elasticloadbalancingv2::config::http::HttpResponse;
use aws_sdk_elasticloadbalancingv2::error::SdkError;
use aws_sdk_elasticloadbalancingv2::types as elb;
use cloudlb_core::provider::CallObserver;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What an SDK request's `send()` answers.
pub(crate) type SdkResult<T, E> = Result<T, SdkError<E, HttpResponse>>;

/// A paginated listing: the request (its SDK builder) that [`Calls::pages`] sends once per page.
pub(crate) trait Listing: Clone + Send + Sync {
    type Output;
    type Error: OperationError;
    type Item;

    /// Sends the request for the page after `token` (`None`: the first).
    fn page(
        self,
        token: Option<String>,
    ) -> impl Future<Output = SdkResult<Self::Output, Self::Error>> + Send;

    /// A page's items and the next page's token (none or empty: the last page).
    fn items(output: Self::Output) -> (Vec<Self::Item>, Option<String>);
}

/// Implements [`Listing`] for SDK requests: `sdk::operation::Request => Output, Error { the
/// token's setter, the next token's field, the items' field: their type }`.
macro_rules! listings {
    ($($sdk:ident::$op:ident::$builder:ident => $output:ident, $error:ident {
        $set_token:ident, $next_token:ident, $items:ident: $item:ty
    })+) => {$(
        impl Listing for $sdk::operation::$op::builders::$builder {
            type Output = $sdk::operation::$op::$output;
            type Error = $sdk::operation::$op::$error;
            type Item = $item;

            fn page(
                self,
                token: Option<String>,
            ) -> impl Future<Output = SdkResult<Self::Output, Self::Error>> + Send {
                self.$set_token(token).send()
            }

            fn items(output: Self::Output) -> (Vec<$item>, Option<String>) {
                (output.$items.unwrap_or_default(), output.$next_token)
            }
        }
    )+};
}

// The paginated listings cloudlb makes.
listings! {
    aws_sdk_elasticloadbalancingv2::describe_load_balancers::DescribeLoadBalancersFluentBuilder
        => DescribeLoadBalancersOutput, DescribeLoadBalancersError
        { set_marker, next_marker, load_balancers: elb::LoadBalancer }
    aws_sdk_elasticloadbalancingv2::describe_target_groups::DescribeTargetGroupsFluentBuilder
        => DescribeTargetGroupsOutput, DescribeTargetGroupsError
        { set_marker, next_marker, target_groups: elb::TargetGroup }
    aws_sdk_elasticloadbalancingv2::describe_listeners::DescribeListenersFluentBuilder
        => DescribeListenersOutput, DescribeListenersError
        { set_marker, next_marker, listeners: elb::Listener }
    aws_sdk_elasticloadbalancingv2::describe_listener_certificates::DescribeListenerCertificatesFluentBuilder
        => DescribeListenerCertificatesOutput, DescribeListenerCertificatesError
        { set_marker, next_marker, certificates: elb::Certificate }
    aws_sdk_ec2::describe_security_groups::DescribeSecurityGroupsFluentBuilder
        => DescribeSecurityGroupsOutput, DescribeSecurityGroupsError
        { set_next_token, next_token, security_groups: aws_sdk_ec2::types::SecurityGroup }
    aws_sdk_ec2::describe_subnets::DescribeSubnetsFluentBuilder
        => DescribeSubnetsOutput, DescribeSubnetsError
        { set_next_token, next_token, subnets: aws_sdk_ec2::types::Subnet }
    aws_sdk_ec2::describe_instances::DescribeInstancesFluentBuilder
        => DescribeInstancesOutput, DescribeInstancesError
        { set_next_token, next_token, reservations: aws_sdk_ec2::types::Reservation }
    aws_sdk_ec2::describe_network_interfaces::DescribeNetworkInterfacesFluentBuilder
        => DescribeNetworkInterfacesOutput, DescribeNetworkInterfacesError
        { set_next_token, next_token, network_interfaces: aws_sdk_ec2::types::NetworkInterface }
}

/// Rate-limit families: reads, writes, and target (de)registrations (the busiest writes, kept
/// apart so a node storm cannot starve the other writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    Describe,
    Write,
    Targets,
}

impl Family {
    const ALL: [Family; 3] = [Family::Describe, Family::Write, Family::Targets];

    fn as_str(self) -> &'static str {
        match self {
            Family::Describe => "describe",
            Family::Write => "write",
            Family::Targets => "targets",
        }
    }

    pub(crate) fn of(operation: &str) -> Family {
        match operation {
            "RegisterTargets" | "DeregisterTargets" => Family::Targets,
            _ if operation.starts_with("Describe") => Family::Describe,
            _ => Family::Write,
        }
    }
}

/// A token bucket refilled at the current rate (tokens per second), holding at most `burst`
/// tokens. A configured rate that is not a positive finite number disables the limit.
///
/// The rate adapts to AWS (AIMD, as TCP does to a congested link): a throttled answer halves it
/// (at most once per [`ADAPT_WINDOW`], so a burst of throttles from calls already in flight
/// counts once; never below [`MIN_SHARE`] of the configured rate), and each window with a
/// successful call and no throttle gives back [`RECOVER_SHARE`] of the configured rate, up to
/// it. The limit is never above what is configured. A fixed bucket ([`TokenBucket::fixed`])
/// keeps the configured rate whatever AWS answers.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    /// The configured rate: the ceiling.
    max_rate: f64,
    burst: f64,
    adaptive: bool,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    refilled: Instant,
    rate: f64,
    /// When the rate last changed.
    adapted: Instant,
}

/// The rate changes at most once per window.
const ADAPT_WINDOW: Duration = Duration::from_secs(1);
/// The lowest rate throttling brings it to, as a share of the configured rate: AWS throttles by
/// account-wide buckets that refill within seconds, so halving the pressure is enough to let
/// them refill, and a wave never slows down more than that.
const MIN_SHARE: f64 = 0.5;
/// What a window of success gives back, as a share of the configured rate.
const RECOVER_SHARE: f64 = 0.1;

impl TokenBucket {
    pub(crate) fn new(rate: f64) -> Self {
        let burst = if rate.is_finite() && rate > 1.0 {
            rate
        } else {
            1.0
        };
        let now = Instant::now();
        TokenBucket {
            max_rate: rate,
            burst,
            adaptive: true,
            state: Mutex::new(BucketState {
                tokens: burst,
                refilled: now,
                rate,
                adapted: now,
            }),
        }
    }

    /// One that does not adapt to throttling (what the adaptive one is measured against).
    pub(crate) fn fixed(rate: f64) -> Self {
        TokenBucket {
            adaptive: false,
            ..TokenBucket::new(rate)
        }
    }

    fn unlimited(&self) -> bool {
        !(self.max_rate.is_finite() && self.max_rate > 0.0)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BucketState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The rate the bucket refills at now (the configured one when unlimited).
    pub(crate) fn rate(&self) -> f64 {
        if self.unlimited() {
            return self.max_rate;
        }
        self.state().rate
    }

    /// AWS throttled a call: halve the rate, once per window. Whether it changed.
    pub(crate) fn throttled(&self) -> bool {
        if self.unlimited() || !self.adaptive {
            return false;
        }
        let mut s = self.state();
        let now = Instant::now();
        if now.saturating_duration_since(s.adapted) < ADAPT_WINDOW {
            return false;
        }
        let floor = self.max_rate * MIN_SHARE;
        let lower = (s.rate / 2.0).max(floor);
        let changed = lower < s.rate;
        s.rate = lower;
        s.adapted = now;
        // Tokens saved up at the old rate would let a burst through at once.
        s.tokens = s.tokens.min(1.0);
        changed
    }

    /// A call succeeded: give back some rate, once per window. Whether it changed.
    pub(crate) fn succeeded(&self) -> bool {
        if self.unlimited() || !self.adaptive {
            return false;
        }
        let mut s = self.state();
        let now = Instant::now();
        if s.rate >= self.max_rate || now.saturating_duration_since(s.adapted) < ADAPT_WINDOW {
            return false;
        }
        s.rate = (s.rate + self.max_rate * RECOVER_SHARE).min(self.max_rate);
        s.adapted = now;
        true
    }

    /// Waits until a token is available and takes it.
    pub(crate) async fn acquire(&self) {
        if self.unlimited() {
            return;
        }
        loop {
            let wait = {
                let mut s = self.state();
                let now = Instant::now();
                let elapsed = now.saturating_duration_since(s.refilled).as_secs_f64();
                s.tokens = (s.tokens + elapsed * s.rate).min(self.burst);
                s.refilled = now;
                if s.tokens >= 1.0 {
                    s.tokens -= 1.0;
                    return;
                }
                (1.0 - s.tokens) / s.rate
            };
            tokio::time::sleep(Duration::from_secs_f64(wait.max(0.001))).await;
        }
    }
}

/// Counts and rate-limits the calls of one provider.
#[derive(Debug)]
pub(crate) struct Calls {
    counts: Mutex<BTreeMap<String, u64>>,
    metrics: MetricsSink,
    describe: TokenBucket,
    write: TokenBucket,
    targets: TokenBucket,
}

/// Where calls are also counted (the operator's Prometheus metrics); not `Debug` itself.
#[derive(Default)]
struct MetricsSink(Option<Arc<dyn CallObserver>>);

impl std::fmt::Debug for MetricsSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(CallObserver)"
        } else {
            "None"
        })
    }
}

impl Calls {
    /// `adaptive`: each family's rate adapts to throttling (see [`TokenBucket`]).
    pub(crate) fn new(rate_per_sec: f64, adaptive: bool) -> Self {
        let bucket = if adaptive {
            TokenBucket::new
        } else {
            TokenBucket::fixed
        };
        Calls {
            counts: Mutex::new(BTreeMap::new()),
            metrics: MetricsSink::default(),
            describe: bucket(rate_per_sec),
            write: bucket(rate_per_sec),
            targets: bucket(rate_per_sec),
        }
    }

    /// Also report every call to `metrics` (as provider `aws`), and the rate of each family.
    pub(crate) fn set_metrics(&mut self, metrics: Arc<dyn CallObserver>) {
        self.metrics = MetricsSink(Some(metrics));
        for family in Family::ALL {
            self.report_rate(family);
        }
    }

    fn bucket(&self, family: Family) -> &TokenBucket {
        match family {
            Family::Describe => &self.describe,
            Family::Write => &self.write,
            Family::Targets => &self.targets,
        }
    }

    fn rate_of(&self, family: Family) -> f64 {
        let rate = self.bucket(family).rate();
        if rate.is_finite() && rate > 0.0 {
            rate
        } else {
            0.0
        }
    }

    fn report_rate(&self, family: Family) {
        if let Some(metrics) = &self.metrics.0 {
            metrics.call_rate(super::PROVIDER_NAME, family.as_str(), self.rate_of(family));
        }
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn reset(&self) {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    fn count(&self, operation: &str, outcome: &str) {
        {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            *counts.entry(format!("{operation}/{outcome}")).or_insert(0) += 1;
        }
        if let Some(metrics) = &self.metrics.0 {
            metrics.cloud_call(super::PROVIDER_NAME, operation, outcome);
        }
    }

    /// Every item of a paginated listing, one [`run`](Self::run) per page.
    /// `not_found_is_empty`: a not-found answer ends the listing (AWS answers some listings of
    /// a resource that is gone with an empty list, moto with an error).
    pub(crate) async fn pages<L: Listing>(
        &self,
        operation: &'static str,
        not_found_is_empty: bool,
        request: L,
    ) -> Result<Vec<L::Item>, AwsError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = match self
                .run(operation, || request.clone().page(token.clone()))
                .await
            {
                Ok(r) => r,
                Err(e) if not_found_is_empty && e.is_not_found() => break,
                Err(e) => return Err(e),
            };
            let (items, next) = L::items(resp);
            out.extend(items);
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Runs one AWS call. `send` builds the request (`|| builder.clone().send()`) and may be called again:
    /// retries happen here, not in the SDK (its retries are off), so every attempt waits for the
    /// call family's token bucket and the client-side rate limit holds also while AWS throttles.
    /// Retried: throttling, for every operation; 5xx, timeouts and lost connections, except for
    /// `Create*` calls, whose outcome is then unknown (the reconcile reads the cloud again and
    /// looks up by name before creating anything).
    pub(crate) async fn run<T, E, F, Fut>(
        &self,
        operation: &'static str,
        mut send: F,
    ) -> Result<T, AwsError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = SdkResult<T, E>>,
        E: OperationError,
    {
        let family = Family::of(operation);
        let bucket = self.bucket(family);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            bucket.acquire().await;
            let started = std::time::Instant::now();
            let result = send().await;
            let elapsed_ms = started.elapsed().as_millis();
            let err = match result {
                Ok(out) => {
                    tracing::debug!(operation, elapsed_ms, attempt, "aws call ok");
                    self.count(operation, "ok");
                    if bucket.succeeded() {
                        self.report_rate(family);
                    }
                    return Ok(out);
                }
                Err(err) => err,
            };
            let transient = matches!(
                err,
                SdkError::TimeoutError(_)
                    | SdkError::DispatchFailure(_)
                    | SdkError::ResponseError(_)
            ) || matches!(&err, SdkError::ServiceError(e) if e.raw().status().is_server_error());
            let err = AwsError::from_sdk(operation, err);
            tracing::debug!(
                operation,
                elapsed_ms,
                attempt,
                code = err.code.as_deref().unwrap_or(""),
                "aws call failed: {}",
                err.message
            );
            self.count(operation, err.kind.outcome());
            if err.kind == ErrorKind::Throttled && bucket.throttled() {
                tracing::info!(
                    family = family.as_str(),
                    rate = bucket.rate(),
                    "AWS throttles: this family's call rate halved"
                );
                self.report_rate(family);
            }
            let retry =
                err.kind == ErrorKind::Throttled || (transient && !operation.starts_with("Create"));
            if !retry || attempt >= MAX_ATTEMPTS {
                return Err(err);
            }
            // Exponential backoff with full jitter: 0-200 ms, 0-400 ms, 0-800 ms, ...
            let cap = 100u64 << attempt.min(6);
            let wait = rand::Rng::random_range(&mut rand::rng(), 0..=cap);
            tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        }
    }
}

/// Attempts per call, the first included.
const MAX_ATTEMPTS: u32 = 4;

impl ErrorKind {
    /// The outcome label of a failed call.
    pub(crate) fn outcome(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Throttled => "throttled",
            ErrorKind::InUse => "in_use",
            ErrorKind::Duplicate => "duplicate",
            ErrorKind::Other => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        let cases = [
            ("DescribeTags", Family::Describe),
            ("DescribeLoadBalancers", Family::Describe),
            ("RegisterTargets", Family::Targets),
            ("DeregisterTargets", Family::Targets),
            ("CreateLoadBalancer", Family::Write),
            ("RevokeSecurityGroupIngress", Family::Write),
        ];
        for (operation, family) in cases {
            assert_eq!(Family::of(operation), family, "{operation}");
        }
    }

    /// Whether `acquire` completes without waiting (first poll).
    fn immediate(bucket: &TokenBucket) -> bool {
        use futures::FutureExt;
        bucket.acquire().now_or_never().is_some()
    }

    #[tokio::test]
    async fn bucket_gives_its_burst_then_refills_at_its_rate() {
        // No wall-clock measurement: what a token costs is read off whether `acquire` completes
        // at once, and time is moved by rewinding the bucket's last refill.
        let bucket = TokenBucket::new(5.0);
        for i in 0..5 {
            assert!(immediate(&bucket), "token {i} of the burst of 5");
        }
        assert!(!immediate(&bucket), "the 6th waits: the burst is spent");
        bucket.state().refilled -= Duration::from_millis(600);
        // 0.6 s at 5/s: 3 tokens (the 4th would need another 200 ms to pass).
        for i in 0..3 {
            assert!(immediate(&bucket), "refilled token {i}");
        }
        assert!(!immediate(&bucket), "no 4th token after 0.6 s at 5/s");
    }

    /// Moves the bucket's last rate change back by more than a window.
    fn after_a_window(bucket: &TokenBucket) {
        bucket.state().adapted -= ADAPT_WINDOW + Duration::from_millis(1);
    }

    #[tokio::test]
    async fn throttling_halves_the_rate_once_per_window_and_success_gives_it_back_slowly() {
        let bucket = TokenBucket::new(20.0);
        after_a_window(&bucket);
        assert!(bucket.throttled());
        assert_eq!(bucket.rate(), 10.0);
        // More throttles of calls that were in flight: the same window, no further cut.
        assert!(!bucket.throttled());
        assert_eq!(bucket.rate(), 10.0);
        // Success gives back 10 % of the limit per window, not at once.
        assert!(!bucket.succeeded(), "within the window");
        after_a_window(&bucket);
        assert!(bucket.succeeded());
        assert_eq!(bucket.rate(), 12.0);
        // Never below half the limit, never above it.
        for _ in 0..10 {
            after_a_window(&bucket);
            bucket.throttled();
        }
        assert_eq!(bucket.rate(), 10.0);
        for _ in 0..40 {
            after_a_window(&bucket);
            bucket.succeeded();
        }
        assert_eq!(bucket.rate(), 20.0);
        after_a_window(&bucket);
        assert!(!bucket.succeeded(), "at the limit");
        // A cut also drops the tokens saved up at the higher rate.
        let fresh = TokenBucket::new(20.0);
        after_a_window(&fresh);
        fresh.throttled();
        assert!(immediate(&fresh));
        assert!(!immediate(&fresh), "no burst after a throttle");
    }

    #[tokio::test]
    async fn a_fixed_bucket_keeps_its_rate() {
        let bucket = TokenBucket::fixed(20.0);
        after_a_window(&bucket);
        assert!(!bucket.throttled());
        assert_eq!(bucket.rate(), 20.0);
        for i in 0..20 {
            assert!(immediate(&bucket), "token {i}: its burst is kept too");
        }
    }

    #[tokio::test]
    async fn an_unlimited_bucket_does_not_adapt() {
        let bucket = TokenBucket::new(0.0);
        after_a_window(&bucket);
        assert!(!bucket.throttled());
        assert!(immediate(&bucket));
    }

    #[tokio::test]
    async fn zero_rate_is_unlimited() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let bucket = TokenBucket::new(rate);
            for i in 0..1000 {
                assert!(immediate(&bucket), "rate {rate}: call {i} waited");
            }
        }
        // A limited bucket does wait, so the loop above can fail.
        let limited = TokenBucket::new(1.0);
        assert!(immediate(&limited));
        assert!(!immediate(&limited));
    }

    /// Records what it is told, as `provider operation outcome`.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl CallObserver for Recorder {
        fn cloud_call(&self, provider: &str, operation: &str, outcome: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("{provider} {operation} {outcome}"));
        }
    }

    #[test]
    fn counts_also_go_to_the_observer() {
        let recorder = Arc::new(Recorder::default());
        let mut calls = Calls::new(0.0, true);
        calls.count("DescribeTags", "ok");
        calls.set_metrics(recorder.clone());
        calls.count("CreateLoadBalancer", "ok");
        calls.count("RegisterTargets", "throttled");
        // Calls before the observer was attached are only in the snapshot.
        assert_eq!(
            *recorder.0.lock().unwrap(),
            ["aws CreateLoadBalancer ok", "aws RegisterTargets throttled"]
        );
        assert_eq!(calls.snapshot().len(), 3);
    }
}
