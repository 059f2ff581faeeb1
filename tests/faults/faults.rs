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

use cloudlb::config::class::LoadBalancerClass;
use cloudlb::model::{naming, tags};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::aws::elbv2::error::ProvideErrorMetadata;
use support::faultproxy::{Counts, Family, FaultConfig, FaultProxy, Outcome, ProxyConfig};
use support::process::free_port;
use support::{
    AwsEmulator, TestCluster, TestGuard, create_node, create_vpc_with_subnets, ec2, elbv2,
    node_for, run_instances,
};

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
const LABEL: &str = "cloudlb.test/env";

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A `cloudlb run` child process, killed when dropped (its log printed if the test failed).
struct Operator {
    child: Child,
    log: std::path::PathBuf,
    metrics_port: u16,
}

impl Operator {
    fn start(env: &Env, proxy: &FaultProxy, extra: &[&str]) -> Operator {
        let metrics_port = free_port();
        let log = std::env::temp_dir().join(format!(
            "cloudlb-faults-{}-{}.log",
            env.ns,
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_cloudlb"))
            .args(["run", "--cluster-name", &env.ns, "--namespace", &env.ns])
            .args(["--classes", &env.ns, "--no-local"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .args(extra)
            .env("KUBECONFIG", env.cluster.kubeconfig_path())
            .env("AWS_ENDPOINT_URL", proxy.endpoint())
            .env("AWS_ACCESS_KEY_ID", "AKIACLOUDLBTEST00000")
            .env("AWS_SECRET_ACCESS_KEY", "cloudlb-test-secret")
            .env("AWS_REGION", support::aws::REGION)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start cloudlb");
        Operator {
            child,
            log,
            metrics_port,
        }
    }

    /// The sum of a metric's samples whose line contains `filter`.
    async fn metric(&self, name: &str, filter: &str) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await
        else {
            return f64::NAN;
        };
        let mut out = String::new();
        if s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.is_err()
            || s.read_to_string(&mut out).await.is_err()
        {
            return f64::NAN;
        }
        out.lines()
            .filter(|l| l.starts_with(name) && l.contains(filter))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "==== operator log {} (last 60 lines) ====\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// One test's world: namespace, class, moto account, nodes.
struct Env {
    cluster: &'static TestCluster,
    client: Client,
    ns: String,
    account: String,
    elbv2: elbv2::Client,
    ec2: ec2::Client,
    instances: Vec<String>,
}

impl Env {
    async fn start(prefix: &str) -> Env {
        let cluster = TestCluster::shared().await;
        let client = cluster.client();
        support::env::install_crd(&client).await;
        let ns = cluster.create_namespace(prefix).await;
        let class: LoadBalancerClass = serde_json::from_value(json!({
            "metadata": {"name": ns},
            "spec": {"provider": "aws", "default": true, "aws": {"targetNodeLabels": {LABEL: ns}}}
        }))
        .expect("class");
        Api::<LoadBalancerClass>::all(client.clone())
            .create(&PostParams::default(), &class)
            .await
            .expect("create class");
        let moto = AwsEmulator::shared().await;
        let account = moto.new_account();
        let (elbv2, ec2) = moto.clients(&account);
        let network = create_vpc_with_subnets(&ec2, &ns).await;
        let mut instances = Vec::new();
        for subnet in &network.public_subnets {
            instances.extend(run_instances(&ec2, &subnet.id, 2).await);
        }
        for (i, instance) in instances.iter().enumerate() {
            let mut node = node_for(instance, &format!("{ns}-node-{i}"));
            node.metadata
                .labels
                .get_or_insert_with(BTreeMap::new)
                .insert(LABEL.into(), ns.clone());
            create_node(&client, &node).await;
        }
        Env {
            cluster,
            client,
            ns,
            account,
            elbv2,
            ec2,
            instances: instances.into_iter().map(|i| i.id).collect(),
        }
    }

    async fn proxy(&self, faults: FaultConfig) -> FaultProxy {
        let moto = AwsEmulator::shared().await;
        let mut config = ProxyConfig::new(moto.endpoint());
        config.account_id = Some(self.account.clone());
        config.faults = faults;
        FaultProxy::start(config).await.expect("start the proxy")
    }

    fn services(&self) -> Api<Service> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates `n` Services `svc-<i>`; every second one has two ports when `two_ports`.
    async fn create_services(&self, n: usize, two_ports: bool) {
        let api = self.services();
        futures::stream::iter(0..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let mut ports = vec![json!({"name": "http", "port": 80, "protocol": "TCP"})];
                    if two_ports && i % 2 == 1 {
                        ports.push(json!({"name": "https", "port": 443, "protocol": "TCP"}));
                    }
                    let svc: Service = serde_json::from_value(json!({
                        "metadata": {"name": format!("svc-{i:03}")},
                        "spec": {"type": "LoadBalancer", "ports": ports},
                    }))
                    .expect("svc");
                    api.create(&PostParams::default(), &svc)
                        .await
                        .expect("create Service");
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    }

    /// Services with a status, of all.
    async fn with_status(&self) -> (Vec<Service>, usize) {
        let all = self
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

    async fn load_balancers(&self) -> Vec<elbv2::types::LoadBalancer> {
        self.elbv2
            .describe_load_balancers()
            .into_paginator()
            .items()
            .send()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .map(|r| r.expect("DescribeLoadBalancers"))
            .collect()
    }

    async fn target_groups(&self) -> Vec<elbv2::types::TargetGroup> {
        match self.elbv2.describe_target_groups().send().await {
            Ok(out) => out.target_groups().to_vec(),
            // moto says TargetGroupNotFound when there is none.
            Err(e) if e.code() == Some("TargetGroupNotFound") => Vec::new(),
            Err(e) => panic!("DescribeTargetGroups: {e:?}"),
        }
    }

    /// Tags by ARN (20 per call).
    async fn elb_tags(&self, arns: &[String]) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for chunk in arns.chunks(20) {
            let resp = self
                .elbv2
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await
                .expect("DescribeTags");
            for d in resp.tag_descriptions() {
                let tags = d
                    .tags()
                    .iter()
                    .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
                    .collect();
                out.insert(d.resource_arn().unwrap_or_default().to_string(), tags);
            }
        }
        out
    }

    /// Security groups tagged `cloudlb.io/cluster=<ns>`.
    async fn security_groups(&self) -> Vec<ec2::types::SecurityGroup> {
        self.ec2
            .describe_security_groups()
            .filters(
                ec2::types::Filter::builder()
                    .name(format!("tag:{}", tags::CLUSTER))
                    .values(&self.ns)
                    .build(),
            )
            .send()
            .await
            .expect("DescribeSecurityGroups")
            .security_groups()
            .to_vec()
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_percent_faults_converge_without_duplicates_and_clean_up() {
    let _guard = TestGuard::new();
    let env = Env::start("faults").await;
    let faults = FaultConfig {
        // Long enough to be a timeout, short enough to keep the test bounded.
        hang: Duration::from_secs(3),
        ..FaultConfig::mixed(FAULT_RATE, 0x5eed)
    };
    let proxy = env.proxy(faults).await;
    let _op = Operator::start(&env, &proxy, &["--aws-rate-limit", "50"]);
    let started = Instant::now();
    let fault_services = FAULT_SERVICES * support::soak();
    env.create_services(fault_services, true).await;

    // Every Service gets its status.
    let last = std::cell::Cell::new(Instant::now());
    let services = wait_for(
        "every Service to get a status under 20% faults",
        Duration::from_secs(480) * u32::try_from(support::soak()).unwrap_or(u32::MAX),
        || async {
            let (done, n) = env.with_status().await;
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
    wait_for(
        "the operator to go quiet",
        Duration::from_secs(60),
        || async { (proxy.idle_for() > Duration::from_secs(8)).then_some(()) },
    )
    .await;

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
    let tg_arns: Vec<String> = tgs
        .iter()
        .filter_map(|t| t.target_group_arn().map(String::from))
        .collect();
    let tg_tags = env.elb_tags(&tg_arns).await;
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
            .elbv2
            .describe_listeners()
            .load_balancer_arn(lb.load_balancer_arn().unwrap_or_default())
            .send()
            .await
            .expect("DescribeListeners");
        let ports: Vec<i32> = listeners
            .listeners()
            .iter()
            .filter_map(|l| l.port())
            .collect();
        let unique: BTreeSet<i32> = ports.iter().copied().collect();
        assert_eq!(
            ports.len(),
            unique.len(),
            "duplicate listeners on {:?}: {ports:?}",
            lb.load_balancer_name()
        );
        for l in listeners.listeners() {
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
    let want_targets: BTreeSet<String> = env.instances.iter().cloned().collect();
    for arn in &tg_arns {
        let health = env
            .elbv2
            .describe_target_health()
            .target_group_arn(arn)
            .send()
            .await
            .expect("DescribeTargetHealth");
        let have: BTreeSet<String> = health
            .target_health_descriptions()
            .iter()
            .filter_map(|d| d.target()?.id().map(String::from))
            .collect();
        assert_eq!(have, want_targets, "targets of {arn}");
    }
    let sgs = env.security_groups().await;
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
    wait_for(
        "every Service to be deleted (finalizer released) under 20% faults",
        Duration::from_secs(480) * u32::try_from(support::soak()).unwrap_or(u32::MAX),
        || async {
            let left = env.with_status().await.1;
            (left == 0).then_some(())
        },
    )
    .await;
    let deleted = deleting.elapsed();
    wait_for(
        "the operator to go quiet",
        Duration::from_secs(60),
        || async { (proxy.idle_for() > Duration::from_secs(8)).then_some(()) },
    )
    .await;
    print_counts(
        &format!(
            "delete wave ({fault_services} Services gone in {:.1} s)",
            deleted.as_secs_f64()
        ),
        &proxy.counts(),
    );
    let lbs: Vec<String> = env
        .load_balancers()
        .await
        .iter()
        .filter_map(|l| l.load_balancer_name().map(String::from))
        .collect();
    let tgs: Vec<String> = env
        .target_groups()
        .await
        .iter()
        .filter_map(|t| t.target_group_name().map(String::from))
        .collect();
    let sgs: Vec<String> = env
        .security_groups()
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
    let env = Env::start("throttled").await;
    let proxy = env.proxy(FaultConfig::throttling(0.7, 7)).await;
    let op = Operator::start(&env, &proxy, &["--aws-rate-limit", &RATE_LIMIT.to_string()]);
    env.create_services(THROTTLED_SERVICES, false).await;
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
        if one > 2 * RATE_LIMIT + JITTER_CALLS {
            over.push(format!(
                "{}: {one} calls within 1 s (limit {} + burst {})",
                family.as_str(),
                RATE_LIMIT,
                RATE_LIMIT
            ));
        }
        if ten > 11 * RATE_LIMIT + JITTER_CALLS {
            over.push(format!(
                "{}: {ten} calls within 10 s (at most {} at {RATE_LIMIT}/s with burst {RATE_LIMIT})",
                family.as_str(),
                11 * RATE_LIMIT
            ));
        }
    }
    // Demand has to exceed the limit for the check to mean something.
    assert!(
        proxy.max_in_window(Family::Describe, Duration::from_secs(10)) >= 5 * RATE_LIMIT
            || proxy.max_in_window(Family::Write, Duration::from_secs(10)) >= 5 * RATE_LIMIT,
        "the operator never came near its limit"
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
    let env = Env::start("hung").await;
    // The first CreateLoadBalancer is applied, its response never comes and the connection stays
    // open (far longer than the limit): a black-holed answer.
    let proxy = env
        .proxy(FaultConfig {
            lost_response: 1.0,
            hang: Duration::from_secs(120),
            actions: Some(vec!["CreateLoadBalancer".into()]),
            ..FaultConfig::none()
        })
        .await;
    let _op = Operator::start(&env, &proxy, &[]);
    env.create_services(1, false).await;
    wait_for(
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
            if env.with_status().await.0.len() == 1 {
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
    let counts = proxy.counts();
    assert_eq!(
        counts.get("DescribeLoadBalancers", Outcome::Throttled),
        3,
        "{counts:?}"
    );
    assert_eq!(
        counts.get("DescribeVpcs", Outcome::Throttled),
        3,
        "{counts:?}"
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
    let counts = proxy.counts();
    assert_eq!(
        counts.get("DescribeLoadBalancers", Outcome::ServerError),
        3,
        "{counts:?}"
    );
    assert_eq!(
        counts.get("DescribeLoadBalancers", Outcome::Reset),
        3,
        "{counts:?}"
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
