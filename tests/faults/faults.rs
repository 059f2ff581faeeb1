//! Fault injection: the `cloudlb run` process against the real API server and moto, with the
//! fault/counting proxy (`cloudlb_testbed::faultproxy`) between the operator and moto.
//!
//! - 20% of AWS calls fail (throttling, 500/503, connection resets, responses lost after the
//!   request was applied): every Service converges with exactly one NLB and the right target
//!   groups, and deleting them all leaves nothing tagged for the cluster.
//! - Heavy throttling: the operator never sends more than its own per-family rate limit allows,
//!   counted at the proxy.
//! - The proxy's error documents are what the AWS SDK parses (and retries) as throttling and
//!   server errors; a lost create is applied once.
//!
//! Each test has its own namespace, LoadBalancerClass, Nodes (selected by a label), moto account
//! (the proxy adds moto's account header) and operator process.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::support;

use cloudlb::model::{naming, tags};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::ResourceExt;
use kube::api::{DeleteParams, ListParams};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use support::aws::elbv2::error::ProvideErrorMetadata;
use support::describe;
use support::env::{Env, Setup, wait_within};
use support::faultproxy::{Counts, Family, FaultConfig, FaultProxy, Outcome, ProxyConfig};
use support::operator::{OperatorProcess, operator_env, scope_args};
use support::{AwsEmulator, TestGuard, ec2, elbv2};

/// Services in the 20%-faults test: the 200 the issue asks for. They converge in about two
/// minutes and are deleted in under one on a busy 2-core machine (the whole binary takes about
/// 3.5 minutes); lower it here if CI time demands.
const FAULT_SERVICES: usize = 200;
/// The share of AWS calls that fail in that test.
const FAULT_RATE: f64 = 0.2;
/// Services in the throttling test (each one port).
const THROTTLED_SERVICES: usize = 30;
/// The operator's `--aws-rate-limit` in the throttling test: per family, burst = rate.
const RATE_LIMIT: u64 = 5;
/// Slack for the rate check: arrival times at the proxy carry some scheduling jitter, so a
/// bucket that sends exactly at its limit can show one call more in a window.
const JITTER_CALLS: u64 = 1;

/// How long a wave of Services may take under faults (scaled with the soak factor).
/// How long a wave may take to converge: the tail is a Service whose reconciles failed several
/// times in a row under the injected faults and waits in its exponential backoff (up to 5 min a
/// step); measured waves took 113-369 s, so 480 s was too close to that tail.
fn wave_limit() -> Duration {
    Duration::from_secs(900) * u32::try_from(support::soak()).unwrap_or(u32::MAX)
}

/// `cloudlb run` limited to the test's namespace and class, its AWS calls through `proxy`.
fn start_operator(env: &Env, proxy: &FaultProxy, extra: &[&str]) -> OperatorProcess {
    let mut args = scope_args(&env.ns);
    args.push("--no-local");
    args.extend_from_slice(extra);
    OperatorProcess::start(
        &format!("faults-{}", env.ns),
        &args,
        &operator_env(&proxy.endpoint(), env.cluster),
    )
}

/// One test's world: namespace, class, moto account (returned too: the proxy adds it), two
/// instances and Nodes per public subnet; the test runs the operator as a process.
async fn start_env(prefix: &str) -> (Env, String) {
    let account = AwsEmulator::shared().await.new_account();
    let setup = Setup {
        instances_per_subnet: 2,
        account: Some(account.clone()),
        ..Setup::without_operator()
    };
    (Env::start_with(prefix, setup).await, account)
}

/// A fault proxy in front of moto for `account`.
async fn start_proxy(account: &str, faults: FaultConfig) -> FaultProxy {
    let moto = AwsEmulator::shared().await;
    let mut config = ProxyConfig::new(moto.endpoint());
    config.account_id = Some(account.to_string());
    config.faults = faults;
    FaultProxy::start(config).await.expect("start the proxy")
}

/// Creates `n` Services `svc-<i>`; every second one has two ports when `two_ports`.
async fn create_services(env: &Env, n: usize, two_ports: bool) {
    let api = env.services();
    futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut ports = vec![json!({"name": "http", "port": 80, "protocol": "TCP"})];
                if two_ports && i % 2 == 1 {
                    ports.push(json!({"name": "https", "port": 443, "protocol": "TCP"}));
                }
                let svc = support::fixtures::lb_service(
                    &format!("svc-{i:03}"),
                    json!({}),
                    json!({"ports": ports}),
                );
                support::fixtures::create_service(&api, &svc).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Services with a status, of all.
async fn with_status(env: &Env) -> (Vec<Service>, usize) {
    let all = env
        .services()
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let n = all.len();
    let done = all
        .into_iter()
        .filter(|s| {
            s.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .is_some_and(|i| !i.is_empty())
        })
        .collect();
    (done, n)
}

/// Waits until the proxy has seen no AWS call for 8 s: the last provisioning polls and
/// retries are done.
async fn wait_quiet(proxy: &FaultProxy) {
    wait_within(
        "the operator to go quiet",
        Duration::from_secs(60),
        || async { (proxy.idle_for() > Duration::from_secs(8)).then_some(()) },
    )
    .await;
}

fn print_counts(what: &str, counts: &Counts) {
    eprintln!(
        "{what}: {} calls, {} injected faults, {} delayed; lost responses: {:?}",
        counts.total,
        counts.injected(),
        counts.delayed,
        counts.lost
    );
    for (action, outcomes) in &counts.by_action {
        eprintln!("  {action:<36} {outcomes:?}");
    }
}

/// Asserts that the proxy counted 3 requests (the SDK's attempts: the first and its 2 retries)
/// for each of `calls` (action, outcome).
fn assert_three_attempts(counts: &Counts, calls: &[(&str, Outcome)]) {
    for &(action, outcome) in calls {
        assert_eq!(
            counts.get(action, outcome),
            3,
            "{action} {outcome:?}: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_faults_converge_without_duplicates_and_clean_up() {
    let _guard = TestGuard::new();
    let (env, account) = start_env("faults").await;
    let faults = FaultConfig {
        // Long enough to be a timeout, short enough to keep the test bounded.
        hang: Duration::from_secs(3),
        ..FaultConfig::mixed(FAULT_RATE, 0x5eed)
    };
    let proxy = start_proxy(&account, faults).await;
    let _op = start_operator(&env, &proxy, &["--aws-rate-limit", "50"]);
    let started = Instant::now();
    let fault_services = FAULT_SERVICES * support::soak();
    create_services(&env, fault_services, true).await;

    // Every Service gets its status.
    let last = std::cell::Cell::new(Instant::now());
    let services = wait_within(
        "every Service to get a status under 20% faults",
        wave_limit(),
        || async {
            let (done, n) = with_status(&env).await;
            if last.get().elapsed() > Duration::from_secs(15) {
                eprintln!(
                    "{:>5.0} s: {}/{n} Services have a status",
                    started.elapsed().as_secs_f64(),
                    done.len()
                );
                last.set(Instant::now());
            }
            (done.len() == fault_services).then_some(done)
        },
    )
    .await;
    let converged = started.elapsed();
    let counts = proxy.counts();
    print_counts(
        &format!(
            "create wave ({fault_services} Services converged in {:.1} s)",
            converged.as_secs_f64()
        ),
        &counts,
    );
    for outcome in [
        Outcome::Throttled,
        Outcome::ServerError,
        Outcome::Reset,
        Outcome::Lost,
    ] {
        assert!(
            counts.outcome(outcome) > 0,
            "no {} fault was injected: the test proves nothing",
            outcome.as_str()
        );
    }
    // Let the last provisioning polls and retries finish before counting resources.
    wait_quiet(&proxy).await;

    // Exactly one NLB per Service, named as the operator names it.
    let lbs = env.load_balancers().await;
    let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for lb in &lbs {
        by_name
            .entry(lb.load_balancer_name().unwrap_or_default().to_string())
            .or_default()
            .push(lb.load_balancer_arn().unwrap_or_default().to_string());
    }
    let duplicates: BTreeMap<&String, &Vec<String>> =
        by_name.iter().filter(|(_, arns)| arns.len() > 1).collect();
    let mut ports_total = 0;
    let mut want_names = BTreeSet::new();
    for svc in &services {
        let name = naming::load_balancer_name(
            &env.ns,
            &env.ns,
            &svc.name_any(),
            &svc.uid().unwrap_or_default(),
        );
        ports_total += svc
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref())
            .map_or(0, Vec::len);
        want_names.insert(name);
    }
    let have_names: BTreeSet<String> = by_name.keys().cloned().collect();
    assert!(
        duplicates.is_empty(),
        "duplicate NLBs (same name, several ARNs): {duplicates:#?}"
    );
    assert_eq!(
        have_names,
        want_names,
        "NLBs in the account vs one per Service ({} NLBs for {} Services)",
        lbs.len(),
        services.len()
    );

    // Exactly the right target groups: one per Service port, each tagged for its Service and
    // behind a listener of that Service's NLB, holding exactly the nodes.
    let tgs = env.target_groups().await;
    let tg_arns = describe::target_group_arns(&tgs);
    let tg_tags = describe::elb_tags(&env.elbv2, &tg_arns).await;
    let mut per_uid: BTreeMap<String, usize> = BTreeMap::new();
    for arn in &tg_arns {
        let uid = tg_tags
            .get(arn)
            .and_then(|t| t.get(tags::SERVICE_UID))
            .cloned()
            .unwrap_or_else(|| format!("(untagged {arn})"));
        *per_uid.entry(uid).or_insert(0) += 1;
    }
    let want_per_uid: BTreeMap<String, usize> = services
        .iter()
        .map(|s| {
            (
                s.uid().unwrap_or_default(),
                s.spec
                    .as_ref()
                    .and_then(|s| s.ports.as_ref())
                    .map_or(0, Vec::len),
            )
        })
        .collect();
    assert_eq!(
        tgs.len(),
        ports_total,
        "target groups in the account vs Service ports"
    );
    assert_eq!(per_uid, want_per_uid, "target groups per Service UID");
    let mut forwarded = BTreeSet::new();
    for lb in &lbs {
        let listeners = env
            .listeners(lb.load_balancer_arn().unwrap_or_default())
            .await;
        let ports: Vec<i32> = listeners.iter().filter_map(|l| l.port()).collect();
        let unique: BTreeSet<i32> = ports.iter().copied().collect();
        assert_eq!(
            ports.len(),
            unique.len(),
            "duplicate listeners on {:?}: {ports:?}",
            lb.load_balancer_name()
        );
        for l in &listeners {
            for a in l.default_actions() {
                if let Some(tg) = a.target_group_arn() {
                    forwarded.insert(tg.to_string());
                }
            }
        }
    }
    let all_tgs: BTreeSet<String> = tg_arns.iter().cloned().collect();
    assert_eq!(
        forwarded, all_tgs,
        "every target group is behind a listener"
    );
    let want_targets: BTreeSet<String> = env.instances.iter().map(|i| i.id.clone()).collect();
    for arn in &tg_arns {
        // Every target, in whatever state: exactly the nodes, nothing left over.
        let have: BTreeSet<String> = describe::target_health(&env.elbv2, arn)
            .await
            .iter()
            .filter_map(|d| d.target()?.id().map(String::from))
            .collect();
        assert_eq!(have, want_targets, "targets of {arn}");
    }
    let sgs = describe::security_groups(&env.ec2, &env.ns).await;
    assert_eq!(
        sgs.len(),
        fault_services,
        "one frontend security group per Service"
    );

    // Delete them all, still under faults: nothing tagged for the cluster is left.
    proxy.reset_counts();
    let deleting = Instant::now();
    let api = env.services();
    futures::stream::iter(services.iter().map(|s| s.name_any()))
        .map(|name| {
            let api = api.clone();
            async move {
                api.delete(&name, &DeleteParams::default())
                    .await
                    .expect("delete Service");
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    wait_within(
        "every Service to be deleted (finalizer released) under 20% faults",
        wave_limit(),
        || async {
            let left = with_status(&env).await.1;
            (left == 0).then_some(())
        },
    )
    .await;
    let deleted = deleting.elapsed();
    wait_quiet(&proxy).await;
    print_counts(
        &format!(
            "delete wave ({fault_services} Services gone in {:.1} s)",
            deleted.as_secs_f64()
        ),
        &proxy.counts(),
    );
    let lbs = env.load_balancer_names().await;
    let tgs: Vec<String> = env
        .target_groups()
        .await
        .iter()
        .filter_map(|t| t.target_group_name().map(String::from))
        .collect();
    let sgs: Vec<String> = describe::security_groups(&env.ec2, &env.ns)
        .await
        .iter()
        .filter_map(|s| s.group_name().map(String::from))
        .collect();
    assert!(
        lbs.is_empty() && tgs.is_empty() && sgs.is_empty(),
        "left after deleting every Service: {} load balancers {lbs:?}, {} target groups {tgs:?}, {} security groups {sgs:?}",
        lbs.len(),
        tgs.len(),
        sgs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_throttling_never_exceeds_the_operators_rate_limit() {
    let _guard = TestGuard::new();
    let (env, account) = start_env("throttled").await;
    let proxy = start_proxy(&account, FaultConfig::throttling(0.7, 7)).await;
    let op = start_operator(&env, &proxy, &["--aws-rate-limit", &RATE_LIMIT.to_string()]);
    create_services(&env, THROTTLED_SERVICES, false).await;
    // Long enough for the token buckets to run dry and the SDK's retries to pile up.
    tokio::time::sleep(Duration::from_secs(45)).await;
    let counts = proxy.counts();
    print_counts("under 70% throttling", &counts);
    // The operator counts a call once however many HTTP attempts the SDK made for it.
    let own = op.metric("cloudlb_cloud_api_calls_total", "").await;
    eprintln!(
        "the operator counted {own} calls; the proxy saw {} HTTP requests",
        counts.total
    );
    assert!(
        counts.outcome(Outcome::Throttled) > 50,
        "too little throttling to prove anything"
    );
    let mut over = Vec::new();
    for family in Family::ALL {
        let per_second = proxy.per_second(family);
        let one = proxy.max_in_window(family, Duration::from_secs(1));
        let ten = proxy.max_in_window(family, Duration::from_secs(10));
        eprintln!(
            "{:<8} max in any 1 s: {one:>3} (limit {}), in any 10 s: {ten:>3} (limit {}); per second: {per_second:?}",
            family.as_str(),
            2 * RATE_LIMIT,
            RATE_LIMIT + 10 * RATE_LIMIT
        );
        // A token bucket of rate r and burst r lets through at most r + r·t calls in t seconds.
        for (seconds, seen) in [(1, one), (10, ten)] {
            let most = RATE_LIMIT + seconds * RATE_LIMIT;
            if seen > most + JITTER_CALLS {
                over.push(format!(
                    "{}: {seen} calls within {seconds} s (at most {most} at {RATE_LIMIT}/s with burst {RATE_LIMIT})",
                    family.as_str()
                ));
            }
        }
    }
    // The limit adapts: AWS's throttling brought the families' rates below the configured one
    // (what the operator reports in cloudlb_cloud_api_rate_limit).
    let mut rates = Vec::new();
    for family in ["describe", "write", "targets"] {
        let filter = format!("family=\"{family}\"");
        rates.push((
            family,
            op.metric("cloudlb_cloud_api_rate_limit", &filter).await,
        ));
    }
    eprintln!("adapted rates per second (limit {RATE_LIMIT}): {rates:?}");
    assert!(
        rates.iter().any(|(_, r)| *r < RATE_LIMIT as f64),
        "no family's rate adapted to 70% throttling: {rates:?}"
    );
    assert!(
        over.is_empty(),
        "the operator exceeded its own --aws-rate-limit {RATE_LIMIT} while throttled (counted at the proxy; SDK retries included): {over:#?}"
    );
}

/// How long the operator may wait for an AWS answer that never comes before it gives up and
/// retries: a generous bound for a per-attempt timeout.
const HUNG_CALL_LIMIT: Duration = Duration::from_secs(45);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_aws_call_does_not_block_the_service_forever() {
    let _guard = TestGuard::new();
    let (env, account) = start_env("hung").await;
    // The first CreateLoadBalancer is applied, its response never comes and the connection stays
    // open (far longer than the limit): a black-holed answer.
    let proxy = start_proxy(
        &account,
        FaultConfig {
            lost_response: 1.0,
            hang: Duration::from_secs(120),
            actions: Some(vec!["CreateLoadBalancer".into()]),
            ..FaultConfig::none()
        },
    )
    .await;
    let _op = start_operator(&env, &proxy, &[]);
    create_services(&env, 1, false).await;
    wait_within(
        "the CreateLoadBalancer to hang",
        Duration::from_secs(60),
        || async { (proxy.counts().get("CreateLoadBalancer", Outcome::Lost) == 1).then_some(()) },
    )
    .await;
    let lost_at = Instant::now();
    // From now on AWS answers; the retry of the create gets the lost answer (AWS idempotency).
    proxy.set_faults(FaultConfig::none()).expect("faults");
    let converged = tokio::time::timeout(HUNG_CALL_LIMIT, async {
        loop {
            if with_status(&env).await.0.len() == 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    let counts = proxy.counts();
    print_counts("a hung CreateLoadBalancer", &counts);
    assert!(
        converged.is_ok(),
        "the Service has no status {:?} after its CreateLoadBalancer response was lost (the \
         connection is held open for 120 s): the operator's AWS calls have no timeout, so one \
         black-holed answer blocks that Service's reconcile (lost responses: {:?})",
        lost_at.elapsed(),
        counts.lost
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_faults_are_what_the_sdk_parses_and_retries() {
    let _guard = TestGuard::new();
    let moto = AwsEmulator::shared().await;
    let account = moto.new_account();
    let mut config = ProxyConfig::new(moto.endpoint());
    config.account_id = Some(account.clone());
    config.faults = FaultConfig::throttling(1.0, 1);
    let proxy = FaultProxy::start(config).await.expect("proxy");
    // An SDK client that knows nothing of moto accounts: the proxy adds the header.
    let sdk = support::aws_sdk_config(&proxy.endpoint(), &account);
    let elb = elbv2::Client::new(&sdk);
    let ec2c = ec2::Client::new(&sdk);

    // Throttling: parsed as Throttling / RequestLimitExceeded and retried (3 attempts).
    let err = elb
        .describe_load_balancers()
        .send()
        .await
        .expect_err("throttled");
    assert_eq!(err.code(), Some("Throttling"), "{err:?}");
    let err = ec2c.describe_vpcs().send().await.expect_err("throttled");
    assert_eq!(err.code(), Some("RequestLimitExceeded"), "{err:?}");
    assert_three_attempts(
        &proxy.counts(),
        &[
            ("DescribeLoadBalancers", Outcome::Throttled),
            ("DescribeVpcs", Outcome::Throttled),
        ],
    );

    // 500/503 and resets: retried as transient errors.
    proxy
        .set_faults(FaultConfig {
            server_error: 1.0,
            ..FaultConfig::none()
        })
        .expect("faults");
    let err = elb.describe_load_balancers().send().await.expect_err("500");
    assert!(
        matches!(err.code(), Some("InternalFailure" | "ServiceUnavailable")),
        "{err:?}"
    );
    proxy
        .set_faults(FaultConfig {
            reset: 1.0,
            ..FaultConfig::none()
        })
        .expect("faults");
    elb.describe_load_balancers()
        .send()
        .await
        .expect_err("reset");
    assert_three_attempts(
        &proxy.counts(),
        &[
            ("DescribeLoadBalancers", Outcome::ServerError),
            ("DescribeLoadBalancers", Outcome::Reset),
        ],
    );

    // A lost create response: applied once upstream; the SDK's retries of the identical request
    // get the lost answer (AWS idempotency), so there is exactly one target group.
    let vpc = ec2::Client::from_conf(
        ec2::config::Builder::from(&moto.sdk_config(&account))
            .interceptor(support::AccountHeader(account.clone()))
            .build(),
    )
    .create_vpc()
    .cidr_block("10.1.0.0/16")
    .send()
    .await
    .expect("CreateVpc")
    .vpc()
    .and_then(|v| v.vpc_id().map(String::from))
    .expect("vpc id");
    proxy
        .set_faults(FaultConfig {
            lost_response: 1.0,
            hang: Duration::from_millis(300),
            ..FaultConfig::none()
        })
        .expect("faults");
    let create = || {
        elb.create_target_group()
            .name("lost-create")
            .protocol(elbv2::types::ProtocolEnum::Tcp)
            .port(80)
            .vpc_id(&vpc)
            .send()
    };
    create().await.expect_err("response lost");
    proxy.set_faults(FaultConfig::none()).expect("faults");
    let created = create().await.expect("the retry gets the lost answer");
    let counts = proxy.counts();
    print_counts("SDK against injected faults", &counts);
    assert_eq!(counts.get("CreateTargetGroup", Outcome::Lost), 3);
    assert_eq!(counts.get("CreateTargetGroup", Outcome::Replayed), 1);
    // Plain SDK clients have no read timeout: they waited until the proxy closed.
    assert_eq!(counts.lost.proxy_closed, 3, "{:?}", counts.lost);
    let (direct, _) = moto.clients(&account);
    let tgs = direct
        .describe_target_groups()
        .send()
        .await
        .expect("DescribeTargetGroups");
    assert_eq!(tgs.target_groups().len(), 1, "{tgs:?}");
    assert_eq!(
        tgs.target_groups()[0].target_group_arn(),
        created
            .target_groups()
            .first()
            .and_then(|t| t.target_group_arn())
    );
    // The counts are served as JSON too.
    let json = proxy.counts_json();
    assert!(json.contains("\"CreateTargetGroup\""), "{json}");
}
