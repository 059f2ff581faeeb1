//! The AWS provider against a real moto server: create, resync, change, foreign resources,
//! delete. Each test uses its own moto account.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use cloudlb_testbed as support;

use cloudlb_aws::{AwsProvider, AwsSettings};
use cloudlb_core::model::{
    Desired, FrontendSecurityGroup, HealthCheck, IngressRule, IpAddressType, IpFamily, Listener,
    LoadBalancer, Protocol, Scheme, Security, ServiceRef, SourceNat, Subnets, Target, TargetGroup,
    TargetType, naming, tags,
};
use cloudlb_core::plan::{Op, plan};
use cloudlb_core::provider::{LbState, Observed, Provider, ProviderError};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use support::ec2::types::Filter;
use support::elbv2::types::{
    LoadBalancer as LbDescription, LoadBalancerSchemeEnum, LoadBalancerTypeEnum,
    TargetGroup as TgDescription,
};
use support::faultproxy::{FaultProxy, ProxyConfig};
use support::{AwsEmulator, TestGuard, create_vpc_with_subnets, run_instances};

const CLUSTER: &str = "provider-test";

fn service() -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: "dns-web".into(),
        uid: "8c1f6a43-0000-4000-8000-0000000000aa".into(),
    }
}

fn lb_name_in(cluster: &str, svc: &ServiceRef) -> String {
    naming::load_balancer_name(cluster, &svc.namespace, &svc.name, &svc.uid)
}

fn owner_tags_in(cluster: &str, svc: &ServiceRef) -> BTreeMap<String, String> {
    [
        (tags::CLUSTER.to_string(), cluster.to_string()),
        (tags::SERVICE_NAMESPACE.to_string(), svc.namespace.clone()),
        (tags::SERVICE_NAME.to_string(), svc.name.clone()),
        (tags::SERVICE_UID.to_string(), svc.uid.clone()),
        (tags::kubernetes_cluster(cluster), "owned".to_string()),
    ]
    .into_iter()
    .collect()
}

/// One listener of the test Service: (listener port, protocol, nodePort).
type Port = (u16, Protocol, u16);

const TCP_80: Port = (80, Protocol::Tcp, 30080);
const UDP_53: Port = (53, Protocol::Udp, 30053);

fn tg_name(lb_name: &str, svc: &ServiceRef, (port, protocol, node_port): Port) -> String {
    naming::target_group_name(
        lb_name,
        &svc.namespace,
        &svc.name,
        port,
        &format!("{}/{node_port}/instance", protocol.as_aws()),
    )
}

/// The desired model, built by hand: instance targets on the nodePorts, a frontend security group
/// open to the world on the listener ports, discovered subnets.
fn desired(ports: &[Port], instances: &[String]) -> Desired {
    desired_for(CLUSTER, service(), ports, instances)
}

/// [`desired`] for any Service of any cluster.
fn desired_for(cluster: &str, svc: ServiceRef, ports: &[Port], instances: &[String]) -> Desired {
    let name = lb_name_in(cluster, &svc);
    let tags = owner_tags_in(cluster, &svc);
    let mut listeners = Vec::new();
    let mut target_groups = Vec::new();
    let mut ingress = BTreeSet::new();
    for &(port, protocol, node_port) in ports {
        let key = format!("{}-{port}", protocol.as_aws().to_lowercase());
        listeners.push(Listener {
            port,
            protocol,
            target_group: key.clone(),
            certificates: Vec::new(),
            ssl_policy: None,
            alpn_policy: None,
            attributes: BTreeMap::new(),
        });
        let mut tg_tags = tags.clone();
        tg_tags.insert(tags::RESOURCE.into(), key.clone());
        target_groups.push(TargetGroup {
            key,
            name: tg_name(&name, &svc, (port, protocol, node_port)),
            protocol,
            port: node_port,
            target_type: TargetType::Instance,
            ip_family: Default::default(),
            health_check: HealthCheck::TCP_TRAFFIC_PORT,
            attributes: [(
                "deregistration_delay.timeout_seconds".to_string(),
                "30".to_string(),
            )]
            .into_iter()
            .collect(),
            targets: instances
                .iter()
                .map(|id| Target {
                    id: id.clone(),
                    port: node_port,
                })
                .collect(),
            tags: tg_tags,
        });
        ingress.insert(IngressRule {
            protocol: protocol.as_aws().to_lowercase(),
            port,
            cidr: "0.0.0.0/0".into(),
        });
    }
    Desired {
        service: svc,
        lb_name: name.clone(),
        lb: Some(LoadBalancer {
            name: name.clone(),
            scheme: Scheme::InternetFacing,
            ip_address_type: IpAddressType::Ipv4,
            subnets: Subnets::Discover,
            eip_allocations: Vec::new(),
            private_ipv4_addresses: Vec::new(),
            ipv6_source_nat: None,
            local: None,
            security: Security {
                frontend: Some(FrontendSecurityGroup {
                    name: naming::security_group_name(&name),
                    description: format!("cloudlb frontend of {name}"),
                    ingress,
                }),
                extra_security_groups: Vec::new(),
                // The backend rules have their own test (tests/controller/backend_rules.rs).
                backend: None,
            },
            attributes: BTreeMap::new(),
            tags,
            applied_tag_keys: Default::default(),
            listeners,
            target_groups,
            status_ports: ports.iter().map(|&(p, proto, _)| (p, proto)).collect(),
        }),
    }
}

/// What the planner compares: everything but the load-balancer state, and of the attributes only
/// the keys the model manages (apply does not read back the defaults of what it just created).
fn comparable(mut o: Observed, d: &Desired) -> Observed {
    let Some(want) = d.lb.as_ref() else { return o };
    if let Some(lb) = &mut o.lb {
        lb.state = LbState::Active;
        lb.attributes.retain(|k, _| want.attributes.contains_key(k));
        // An observe does not read what the model does not set; apply knows a new one's.
        lb.attributes_unread = false;
    }
    for tg in &mut o.target_groups {
        let keys: Vec<String> = want
            .target_groups
            .iter()
            .find(|t| t.name == tg.name)
            .map(|t| t.attributes.keys().cloned().collect())
            .unwrap_or_default();
        tg.attributes.retain(|k, _| keys.contains(k));
    }
    o
}

fn calls_of(provider: &AwsProvider, outcome_ok_only: bool) -> BTreeMap<String, u64> {
    provider
        .calls()
        .into_iter()
        .filter(|(k, _)| !outcome_ok_only || k.ends_with("/ok"))
        .collect()
}

fn writes(provider: &AwsProvider) -> BTreeMap<String, u64> {
    provider
        .calls()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("Describe"))
        .collect()
}

fn expect(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn has_our_tags(tags: &BTreeMap<String, String>) -> bool {
    tags.get(tags::CLUSTER).map(String::as_str) == Some(CLUSTER)
        && tags.get(tags::SERVICE_UID) == Some(&service().uid)
}

async fn elb_tags(elbv2: &support::elbv2::Client, arn: &str) -> BTreeMap<String, String> {
    let out = elbv2
        .describe_tags()
        .resource_arns(arn)
        .send()
        .await
        .expect("DescribeTags");
    out.tag_descriptions()
        .iter()
        .flat_map(|d| d.tags())
        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
        .collect()
}

async fn security_groups_named(
    ec2: &support::ec2::Client,
    name: &str,
) -> Vec<support::ec2::types::SecurityGroup> {
    ec2.describe_security_groups()
        .filters(Filter::builder().name("group-name").values(name).build())
        .send()
        .await
        .expect("DescribeSecurityGroups")
        .security_groups()
        .to_vec()
}

/// observe → plan → apply, returning what apply reports and the plan's ops.
async fn reconcile(provider: &AwsProvider, desired: &Desired) -> (Observed, Vec<Op>) {
    let observed = provider.observe(desired).await.expect("observe");
    let plan = plan(desired, &observed).expect("plan");
    let ops = plan.ops.clone();
    let result = provider
        .apply(desired, &observed, &plan)
        .await
        .expect("apply");
    (result, ops)
}

/// Clients for a new moto account, the test's own.
async fn moto_account() -> (support::elbv2::Client, support::ec2::Client) {
    let moto = AwsEmulator::shared().await;
    moto.clients(&moto.new_account())
}

/// A moto account of its own with a VPC (tagged subnets for [`CLUSTER`]) and instances in its
/// first private subnet: what most tests start from (see [`account`]).
struct Account {
    elbv2: support::elbv2::Client,
    ec2: support::ec2::Client,
    network: support::Network,
    instances: Vec<String>,
}

/// A new [`Account`] with `n` instances.
async fn account(n: i32) -> Account {
    let (elbv2, ec2) = moto_account().await;
    let network = create_vpc_with_subnets(&ec2, CLUSTER).await;
    let instances = run_instances(&ec2, &network.private_subnets[0].id, n)
        .await
        .into_iter()
        .map(|i| i.id)
        .collect();
    Account {
        elbv2,
        ec2,
        network,
        instances,
    }
}

impl Account {
    /// The provider on this account, with `settings`.
    fn provider(&self, settings: AwsSettings) -> AwsProvider {
        AwsProvider::new(self.elbv2.clone(), self.ec2.clone(), settings)
    }

    /// The provider for [`CLUSTER`] with a rate limit high enough not to slow the test down.
    fn fast_provider(&self) -> AwsProvider {
        let mut settings = AwsSettings::new(CLUSTER);
        settings.rate_limit_per_sec = 100.0;
        self.provider(settings)
    }

    /// The load balancers named `name` (DescribeLoadBalancers: an error when there is none).
    async fn load_balancers_named(&self, name: &str) -> Result<Vec<LbDescription>, impl Debug> {
        let out = self
            .elbv2
            .describe_load_balancers()
            .names(name)
            .send()
            .await;
        out.map(|o| o.load_balancers().to_vec())
    }

    /// The target groups named `name` (DescribeTargetGroups: an error when there is none).
    async fn target_groups_named(&self, name: &str) -> Result<Vec<TgDescription>, impl Debug> {
        let out = self.elbv2.describe_target_groups().names(name).send().await;
        out.map(|o| o.target_groups().to_vec())
    }
}

/// A network load balancer made by hand (without tags) in `subnets`.
async fn nlb_by_hand(elbv2: &support::elbv2::Client, name: &str, subnets: Vec<String>) {
    elbv2
        .create_load_balancer()
        .name(name)
        .r#type(LoadBalancerTypeEnum::Network)
        .set_subnets(Some(subnets))
        .send()
        .await
        .expect("CreateLoadBalancer by hand");
}

/// A TCP target group made by hand on `port`, with `tags` (none when empty); its ARN.
async fn target_group_by_hand(
    elbv2: &support::elbv2::Client,
    vpc_id: &str,
    name: &str,
    port: i32,
    tags: &BTreeMap<String, String>,
) -> String {
    let tags: Vec<_> = tags
        .iter()
        .map(|(k, v)| {
            support::elbv2::types::Tag::builder()
                .key(k)
                .value(v)
                .build()
        })
        .collect();
    elbv2
        .create_target_group()
        .name(name)
        .protocol(support::elbv2::types::ProtocolEnum::Tcp)
        .port(port)
        .vpc_id(vpc_id)
        .set_tags((!tags.is_empty()).then_some(tags))
        .send()
        .await
        .expect("CreateTargetGroup by hand")
        .target_groups()[0]
        .target_group_arn()
        .expect("arn")
        .to_string()
}

/// Observing `want` fails: a resource of `want_kind` named `want_name` exists without our tags.
async fn assert_foreign(provider: &AwsProvider, want: &Desired, want_kind: &str, want_name: &str) {
    match provider.observe(want).await {
        Err(ProviderError::Foreign { kind, name }) => {
            assert_eq!(kind, want_kind);
            assert_eq!(name, want_name);
        }
        other => panic!("expected Foreign, got {other:?}"),
    }
}

#[tokio::test]
async fn create_resync_change_and_delete_an_nlb() {
    let _guard = TestGuard::new();
    let account = account(3).await;
    let provider = account.fast_provider();
    assert_eq!(provider.name(), "aws");

    // ---- create
    let want = desired(&[TCP_80, UDP_53], &account.instances);
    let lb = want.lb.as_ref().expect("a load balancer");
    let (created, ops) = reconcile(&provider, &want).await;
    assert_eq!(ops.first(), Some(&Op::CreateSecurityGroup));
    let create_calls = provider.calls();
    eprintln!("create (P=2): {create_calls:#?}");
    assert!(
        create_calls
            .keys()
            .all(|k| k.ends_with("/ok") || k.ends_with("/not_found")),
        "{create_calls:#?}"
    );
    assert_eq!(
        writes(&provider),
        expect(&[
            ("CreateSecurityGroup/ok", 1),
            ("AuthorizeSecurityGroupIngress/ok", 1),
            ("CreateLoadBalancer/ok", 1),
            ("CreateTargetGroup/ok", 2),
            ("ModifyTargetGroupAttributes/ok", 2),
            ("RegisterTargets/ok", 2),
            ("CreateListener/ok", 2),
        ])
    );

    // What exists, as the SDK sees it.
    let lbs = account
        .load_balancers_named(&want.lb_name)
        .await
        .expect("the NLB exists");
    let [nlb] = lbs.as_slice() else {
        panic!("exactly one NLB named {}: {lbs:?}", want.lb_name);
    };
    assert_eq!(nlb.r#type(), Some(&LoadBalancerTypeEnum::Network));
    assert_eq!(nlb.scheme(), Some(&LoadBalancerSchemeEnum::InternetFacing));
    let nlb_arn = nlb.load_balancer_arn().expect("arn");
    assert!(has_our_tags(&elb_tags(&account.elbv2, nlb_arn).await));
    let public: BTreeSet<&str> = account
        .network
        .public_subnets
        .iter()
        .map(|s| s.id.as_str())
        .collect();
    let azs: BTreeSet<&str> = nlb
        .availability_zones()
        .iter()
        .filter_map(|z| z.subnet_id())
        .collect();
    assert_eq!(azs, public, "one discovered public subnet per zone");
    for tg in &lb.target_groups {
        let found = account
            .target_groups_named(&tg.name)
            .await
            .expect("the target group exists");
        let arn = found[0].target_group_arn().expect("arn");
        assert!(
            has_our_tags(&elb_tags(&account.elbv2, arn).await),
            "{}",
            tg.name
        );
    }
    let listeners = account
        .elbv2
        .describe_listeners()
        .load_balancer_arn(nlb_arn)
        .send()
        .await
        .expect("listeners");
    let mut ports: Vec<i32> = listeners
        .listeners()
        .iter()
        .filter_map(|l| l.port())
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, vec![53, 80]);
    let sg_name = naming::security_group_name(&want.lb_name);
    let sgs = security_groups_named(&account.ec2, &sg_name).await;
    assert_eq!(sgs.len(), 1, "{sgs:?}");
    let sg_tags: BTreeMap<String, String> = sgs[0]
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())))
        .collect();
    assert!(has_our_tags(&sg_tags), "{sg_tags:?}");
    assert_eq!(sg_tags.get("Name"), Some(&sg_name));
    assert_eq!(
        nlb.security_groups(),
        [sgs[0].group_id().expect("id").to_string()]
    );

    // apply's result is what a fresh observe sees.
    assert!(
        created
            .lb
            .as_ref()
            .is_some_and(|l| l.dns_name.contains(&want.lb_name))
    );
    provider.reset_calls();
    let fresh = provider.observe(&want).await.expect("observe");
    let observe_calls = provider.calls();
    eprintln!("observe (P=2): {observe_calls:#?}");
    assert_eq!(
        observe_calls,
        expect(&[
            ("DescribeLoadBalancers/ok", 1),
            ("DescribeTags/ok", 2),
            // No DescribeLoadBalancerAttributes: the model sets none.
            ("DescribeListeners/ok", 1),
            ("DescribeTargetGroups/ok", 1),
            ("DescribeTargetGroupAttributes/ok", 2),
            ("DescribeTargetHealth/ok", 2),
            ("DescribeSecurityGroups/ok", 1),
        ])
    );
    assert_eq!(provider.write_calls(), 0);
    assert_eq!(
        comparable(created.clone(), &want),
        comparable(fresh.clone(), &want)
    );
    assert_eq!(fresh.target_groups.len(), 2);
    assert!(fresh.target_groups.iter().all(|t| t.targets.len() == 3));

    // An unchanged resync: empty plan, zero calls.
    assert_eq!(plan(&want, &fresh).expect("plan").ops, Vec::<Op>::new());
    let resync = plan(&want, &created).expect("plan");
    assert!(resync.is_empty(), "{resync:?}");
    provider.reset_calls();
    let again = provider
        .apply(&want, &created, &resync)
        .await
        .expect("apply");
    assert_eq!(again, created);
    assert!(provider.calls().is_empty(), "{:?}", provider.calls());

    // ---- change: one node gone, the UDP listener removed.
    let fewer = desired(&[TCP_80], &account.instances[..2]);
    provider.reset_calls();
    let (changed, ops) = reconcile(&provider, &fewer).await;
    let udp_tg = fresh
        .target_groups
        .iter()
        .find(|t| t.protocol == Protocol::Udp)
        .expect("UDP target group");
    let udp_listener = fresh
        .listeners
        .iter()
        .find(|l| l.port == 53)
        .expect("UDP listener");
    assert_eq!(
        ops,
        vec![
            Op::RevokeIngress {
                rules: vec![IngressRule {
                    protocol: "udp".into(),
                    port: 53,
                    cidr: "0.0.0.0/0".into()
                }]
            },
            Op::DeregisterTargets {
                key: "tcp-80".into(),
                targets: vec![Target {
                    id: account.instances[2].clone(),
                    port: 30080
                }]
            },
            Op::DeleteListener {
                arn: udp_listener.arn.clone(),
                port: 53
            },
            Op::DeleteTargetGroup {
                arn: udp_tg.arn.clone(),
                name: udp_tg.name.clone()
            },
        ]
    );
    assert_eq!(
        writes(&provider),
        expect(&[
            ("RevokeSecurityGroupIngress/ok", 1),
            ("DeregisterTargets/ok", 1),
            ("DeleteListener/ok", 1),
            ("DeleteTargetGroup/ok", 1),
        ])
    );
    let fresh = provider.observe(&fewer).await.expect("observe");
    assert_eq!(
        comparable(changed, &fewer),
        comparable(fresh.clone(), &fewer)
    );
    assert!(plan(&fewer, &fresh).expect("plan").is_empty());

    // ---- delete: the empty model removes everything.
    let empty = Desired::empty(service(), want.lb_name.clone());
    provider.reset_calls();
    let (deleted, ops) = reconcile(&provider, &empty).await;
    assert_eq!(deleted, Observed::default());
    assert_eq!(ops.len(), 3, "{ops:?}");
    assert_eq!(
        writes(&provider),
        expect(&[
            ("DeleteLoadBalancer/ok", 1),
            ("DeleteTargetGroup/ok", 1),
            ("DeleteSecurityGroup/ok", 1),
        ])
    );
    let gone = account.load_balancers_named(&want.lb_name).await;
    assert!(gone.as_ref().map_or(true, Vec::is_empty), "{gone:?}");
    for tg in &lb.target_groups {
        let gone = account.target_groups_named(&tg.name).await;
        assert!(gone.as_ref().map_or(true, Vec::is_empty), "{gone:?}");
    }
    assert!(
        security_groups_named(&account.ec2, &sg_name)
            .await
            .is_empty()
    );
    assert_eq!(
        provider.observe(&empty).await.expect("observe"),
        Observed::default()
    );
    assert!(
        calls_of(&provider, false)
            .keys()
            .all(|k| !k.ends_with("/error"))
    );
}

/// A drift check reads what is known by id: the reads of Services checked together go out as
/// one call where AWS takes a list (load balancers, target groups, tags, security groups), and
/// what it sees is what a read by name sees. A load balancer deleted meanwhile is looked for by
/// name; one that lost our tags is foreign, and nothing is written.
#[tokio::test]
async fn known_services_are_read_by_id_together() {
    let _guard = TestGuard::new();
    let account = account(2).await;
    let provider = account.fast_provider();
    let wants: Vec<Desired> = (0..3)
        .map(|i| {
            let svc = ServiceRef {
                namespace: "shop".into(),
                name: format!("batch-{i}"),
                uid: format!("8c1f6a43-0000-4000-8000-00000000010{i}"),
            };
            desired_for(CLUSTER, svc, &[TCP_80, UDP_53], &account.instances)
        })
        .collect();
    let mut known = Vec::new();
    for want in &wants {
        known.push(reconcile(&provider, want).await.0);
    }
    let mut by_name = Vec::new();
    provider.reset_calls();
    for want in &wants {
        by_name.push(provider.observe(want).await.expect("observe"));
    }
    eprintln!("3 Services read by name: {:#?}", provider.calls());
    assert_eq!(calls_of(&provider, false)["DescribeLoadBalancers/ok"], 3);

    provider.reset_calls();
    let reads = wants
        .iter()
        .zip(&known)
        .map(|(want, k)| provider.observe_known(want, k));
    let together = futures::future::join_all(reads).await;
    let calls = calls_of(&provider, false);
    eprintln!("3 Services read by id together: {calls:#?}");
    for (got, want) in together.into_iter().zip(&by_name) {
        assert_eq!(&got.expect("observe_known"), want);
    }
    assert_eq!(calls["DescribeLoadBalancers/ok"], 1, "{calls:?}");
    // Each in fewer calls than Services (their steps meet within the window; under load one
    // may miss it and go in a second call).
    for op in [
        "DescribeTags",
        "DescribeTargetGroups",
        "DescribeSecurityGroups",
    ] {
        let n = calls[&format!("{op}/ok")];
        assert!((1..3).contains(&n), "{op}: {n} calls for 3 Services");
    }
    // Per load balancer and per target group: no batch form.
    assert_eq!(calls["DescribeListeners/ok"], 3);
    assert_eq!(calls["DescribeTargetGroupAttributes/ok"], 6);
    assert_eq!(calls["DescribeTargetHealth/ok"], 6);
    assert!(!calls.contains_key("DescribeLoadBalancerAttributes/ok"));
    assert_eq!(provider.write_calls(), 0);

    // Deleted by hand: looked for by name, not found; its target groups are still found.
    let gone = known[0].lb.as_ref().expect("lb").arn.clone();
    account
        .elbv2
        .delete_load_balancer()
        .load_balancer_arn(&gone)
        .send()
        .await
        .expect("DeleteLoadBalancer by hand");
    let after = provider
        .observe_known(&wants[0], &known[0])
        .await
        .expect("observe_known");
    assert!(after.lb.is_none() && after.listeners.is_empty());
    assert_eq!(after.target_groups.len(), 2);
    assert_eq!(after, provider.observe(&wants[0]).await.expect("observe"));

    // Our tags removed by hand: foreign, found by id as well as by name.
    let untagged = known[1].lb.as_ref().expect("lb").arn.clone();
    account
        .elbv2
        .remove_tags()
        .resource_arns(&untagged)
        .tag_keys(tags::CLUSTER)
        .send()
        .await
        .expect("RemoveTags by hand");
    provider.reset_calls();
    match provider.observe_known(&wants[1], &known[1]).await {
        Err(ProviderError::Foreign { kind, name }) => {
            assert_eq!(
                (kind, name.as_str()),
                ("load balancer", wants[1].lb_name.as_str())
            );
        }
        other => panic!("expected Foreign, got {other:?}"),
    }
    assert_eq!(provider.write_calls(), 0);
}

#[tokio::test]
async fn same_named_resources_without_our_tags_are_foreign() {
    let _guard = TestGuard::new();
    let (elbv2, ec2) = moto_account().await;
    let network = create_vpc_with_subnets(&ec2, CLUSTER).await;
    let provider = AwsProvider::new(elbv2.clone(), ec2.clone(), AwsSettings::new(CLUSTER));
    let want = desired(&[TCP_80], &[]);

    // A target group of the name we would use, made by someone else.
    let tg = &want.lb.as_ref().expect("lb").target_groups[0];
    target_group_by_hand(&elbv2, &network.vpc_id, &tg.name, 30080, &BTreeMap::new()).await;
    assert_foreign(&provider, &want, "target group", &tg.name).await;

    // A load balancer of our name, without tags.
    nlb_by_hand(&elbv2, &want.lb_name, network.public_subnet_ids()).await;
    assert_foreign(&provider, &want, "load balancer", &want.lb_name).await;
    // Deleting the Service leaves them alone and is not blocked by them.
    let empty = Desired::empty(service(), want.lb_name.clone());
    assert_eq!(
        provider.observe(&empty).await.expect("observe"),
        Observed::default()
    );
    assert_eq!(provider.write_calls(), 0);
}

#[tokio::test]
async fn no_tagged_subnets_is_invalid_config_naming_the_tags() {
    let _guard = TestGuard::new();
    let (elbv2, ec2) = moto_account().await;
    // Subnets tagged for another cluster only.
    create_vpc_with_subnets(&ec2, "someone-else").await;
    let provider = AwsProvider::new(elbv2, ec2, AwsSettings::new(CLUSTER));
    let want = desired(&[TCP_80], &[]);
    let observed = provider.observe(&want).await.expect("observe");
    let plan = plan(&want, &observed).expect("plan");
    match provider.apply(&want, &observed, &plan).await {
        Err(ProviderError::InvalidConfig(msg)) => {
            assert!(msg.contains("kubernetes.io/role/elb"), "{msg}");
            assert!(msg.contains(&tags::kubernetes_cluster(CLUSTER)), "{msg}");
        }
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    // Nothing was created: subnets are resolved before the first write.
    assert_eq!(provider.write_calls(), 0, "{:?}", provider.calls());
}

/// Applies `want` and checks that apply's result is what a fresh observe sees and that a resync
/// plans nothing. Returns the plan's ops and the write calls it made.
async fn converge(provider: &AwsProvider, want: &Desired) -> (Vec<Op>, BTreeMap<String, u64>) {
    provider.reset_calls();
    let (result, ops) = reconcile(provider, want).await;
    let made = writes(provider);
    let fresh = provider.observe(want).await.expect("observe");
    assert_eq!(comparable(result, want), comparable(fresh.clone(), want));
    let again = plan(want, &fresh).expect("plan");
    assert!(again.is_empty(), "resync after {ops:?} plans {again:?}");
    (ops, made)
}

#[tokio::test]
async fn explicit_subnets_modifications_and_scheme_replacement() {
    let _guard = TestGuard::new();
    let account = account(2).await;
    let provider = account.provider(AwsSettings::new(CLUSTER));

    // Internal, in subnets given by Name tag, with a non-default LB attribute.
    let mut want = desired(&[TCP_80], &account.instances);
    let lb = want.lb.as_mut().expect("lb");
    lb.scheme = Scheme::Internal;
    lb.subnets = Subnets::Explicit(
        support::aws::ZONES
            .iter()
            .map(|az| format!("{CLUSTER}-private-{az}"))
            .collect(),
    );
    lb.attributes
        .insert("load_balancing.cross_zone.enabled".into(), "true".into());
    let (ops, made) = converge(&provider, &want).await;
    assert!(ops.contains(&Op::CreateLoadBalancer), "{ops:?}");
    assert_eq!(
        made.get("ModifyLoadBalancerAttributes/ok"),
        Some(&1),
        "{made:?}"
    );
    let nlb = account
        .load_balancers_named(&want.lb_name)
        .await
        .expect("NLB");
    let subnets: BTreeSet<String> = nlb[0]
        .availability_zones()
        .iter()
        .filter_map(|z| z.subnet_id().map(str::to_string))
        .collect();
    assert_eq!(
        subnets,
        account.network.private_subnet_ids().into_iter().collect()
    );

    // Health check, target-group attribute and an extra security group change in place.
    let extra = account
        .ec2
        .create_security_group()
        .group_name("user-supplied")
        .description("attached by the user")
        .vpc_id(&account.network.vpc_id)
        .send()
        .await
        .expect("CreateSecurityGroup")
        .group_id()
        .expect("id")
        .to_string();
    let lb = want.lb.as_mut().expect("lb");
    lb.security.extra_security_groups = vec![extra];
    let tg = &mut lb.target_groups[0];
    tg.health_check.interval_seconds = 30;
    tg.health_check.healthy_threshold = 5;
    tg.attributes
        .insert("deregistration_delay.timeout_seconds".into(), "60".into());
    let (ops, made) = converge(&provider, &want).await;
    assert_eq!(
        ops,
        vec![
            Op::SetSecurityGroups,
            Op::ModifyHealthCheck {
                key: "tcp-80".into()
            },
            Op::SetTargetGroupAttributes {
                key: "tcp-80".into(),
                attributes: [(
                    "deregistration_delay.timeout_seconds".to_string(),
                    "60".to_string()
                )]
                .into_iter()
                .collect()
            },
        ]
    );
    assert_eq!(
        made,
        expect(&[
            ("SetSecurityGroups/ok", 1),
            ("ModifyTargetGroup/ok", 1),
            ("ModifyTargetGroupAttributes/ok", 1),
        ])
    );

    // The scheme is immutable: the load balancer is replaced, target groups are kept.
    let lb = want.lb.as_mut().expect("lb");
    lb.scheme = Scheme::InternetFacing;
    lb.subnets = Subnets::Discover;
    let (ops, made) = converge(&provider, &want).await;
    assert!(matches!(ops[0], Op::DeleteLoadBalancer { .. }), "{ops:?}");
    assert_eq!(
        made,
        expect(&[
            ("DeleteLoadBalancer/ok", 1),
            ("CreateLoadBalancer/ok", 1),
            ("ModifyLoadBalancerAttributes/ok", 1),
            ("CreateListener/ok", 1),
        ])
    );

    // And everything goes away.
    let empty = Desired::empty(service(), want.lb_name.clone());
    let (_, made) = converge(&provider, &empty).await;
    assert_eq!(
        made,
        expect(&[
            ("DeleteLoadBalancer/ok", 1),
            ("DeleteTargetGroup/ok", 1),
            ("DeleteSecurityGroup/ok", 1),
        ])
    );
}

/// `observed` as `owned()` reports it: target-group attributes and targets are not read.
fn as_owned(mut o: Observed) -> Observed {
    for tg in &mut o.target_groups {
        tg.attributes.clear();
        tg.targets.clear();
    }
    if let Some(lb) = &mut o.lb {
        lb.state = LbState::Active;
    }
    o
}

fn other_service() -> ServiceRef {
    ServiceRef {
        namespace: "shop".into(),
        name: "api".into(),
        uid: "8c1f6a43-0000-4000-8000-0000000000bb".into(),
    }
}

/// What the sweep test asks of an account: which resources are still there.
impl Account {
    async fn load_balancer_exists(&self, name: &str) -> bool {
        self.load_balancers_named(name)
            .await
            .is_ok_and(|lbs| !lbs.is_empty())
    }

    async fn target_group_exists(&self, arn: &str) -> bool {
        self.elbv2
            .describe_target_groups()
            .target_group_arns(arn)
            .send()
            .await
            .is_ok_and(|o| !o.target_groups().is_empty())
    }

    async fn security_group_exists(&self, id: &str) -> bool {
        self.ec2
            .describe_security_groups()
            .filters(Filter::builder().name("group-id").values(id).build())
            .send()
            .await
            .is_ok_and(|o| !o.security_groups().is_empty())
    }

    /// Asserts that the load balancer `lb_name` and the target groups and security group of `o`
    /// all still exist (`exist`) or are all gone.
    async fn assert_exist(&self, lb_name: &str, o: &Observed, exist: bool) {
        assert_eq!(self.load_balancer_exists(lb_name).await, exist, "{lb_name}");
        for tg in &o.target_groups {
            assert_eq!(
                self.target_group_exists(&tg.arn).await,
                exist,
                "{}",
                tg.name
            );
        }
        let sg = o.security_group.as_ref().expect("sg");
        assert_eq!(self.security_group_exists(&sg.id).await, exist, "{}", sg.id);
    }
}

#[tokio::test]
async fn owned_finds_this_clusters_services_and_the_empty_plan_deletes_one() {
    let _guard = TestGuard::new();
    let account = account(2).await;
    let provider = account.fast_provider();

    // Two Services of this cluster, two ports each.
    let a = desired(&[TCP_80, UDP_53], &account.instances);
    let b = desired_for(
        CLUSTER,
        other_service(),
        &[TCP_80, UDP_53],
        &account.instances,
    );
    let (a_made, _) = reconcile(&provider, &a).await;
    let (b_made, _) = reconcile(&provider, &b).await;
    // A target group of b's created before a crash, never attached.
    let b_loose = target_group_by_hand(
        &account.elbv2,
        &account.network.vpc_id,
        "k8s-shop-api-loose",
        30999,
        &owner_tags_in(CLUSTER, &other_service()),
    )
    .await;
    // Tagged for this cluster but naming no Service: not ours to judge.
    let partial = target_group_by_hand(
        &account.elbv2,
        &account.network.vpc_id,
        "k8s-partial-tags",
        30999,
        &[(tags::CLUSTER.to_string(), CLUSTER.to_string())]
            .into_iter()
            .collect(),
    )
    .await;

    // A Service of another cluster in the same account (its subnets are given explicitly: the
    // discovery tags are for our cluster).
    const OTHER_CLUSTER: &str = "someone-else";
    let other_provider = account.provider(AwsSettings::new(OTHER_CLUSTER));
    let mut c = desired_for(OTHER_CLUSTER, service(), &[TCP_80], &account.instances);
    c.lb.as_mut().expect("lb").subnets = Subnets::Explicit(account.network.public_subnet_ids());
    let (c_made, _) = reconcile(&other_provider, &c).await;

    // And an NLB without any tags.
    nlb_by_hand(
        &account.elbv2,
        "hand-made",
        account.network.public_subnet_ids(),
    )
    .await;

    // ---- the sweep
    provider.reset_calls();
    let owned = provider.owned(&|_| false).await.expect("owned");
    let sweep_calls = provider.calls();
    eprintln!("owned() with 2 Services (P=2), 4 NLBs and 7 TGs in the account: {sweep_calls:#?}");
    assert_eq!(
        sweep_calls,
        expect(&[
            ("DescribeLoadBalancers/ok", 1),
            ("DescribeTargetGroups/ok", 1),
            ("DescribeTags/ok", 1),
            ("DescribeSecurityGroups/ok", 1),
            ("DescribeLoadBalancerAttributes/ok", 2),
            ("DescribeListeners/ok", 2),
        ])
    );
    let services: Vec<&ServiceRef> = owned.iter().map(|(s, _)| s).collect();
    assert_eq!(
        services,
        vec![&other_service(), &service()],
        "sorted by Service"
    );
    let (_, b_owned) = &owned[0];
    let (_, a_owned) = &owned[1];

    // A Service the caller vouches for (alive) is not read further, nor returned.
    provider.reset_calls();
    let only_b = provider
        .owned(&|s| *s == service())
        .await
        .expect("owned, skipping a");
    assert_eq!(only_b.len(), 1);
    assert_eq!(&only_b[0], &owned[0]);
    let skipping = provider.calls();
    assert_eq!(
        skipping.get("DescribeLoadBalancerAttributes/ok"),
        Some(&1),
        "{skipping:?}"
    );
    assert_eq!(
        skipping.get("DescribeListeners/ok"),
        Some(&1),
        "{skipping:?}"
    );

    // a: exactly what observe sees, minus what the empty plan does not need, plus the load
    // balancer's attributes (the empty plan needs them: deletion protection; an observe of a
    // model that sets none does not read them).
    let a_fresh = provider.observe(&a).await.expect("observe");
    let mut without_attributes = a_owned.clone();
    if let Some(lb) = without_attributes.lb.as_mut() {
        lb.attributes.clear();
        lb.attributes_unread = true;
    }
    assert_eq!(without_attributes, as_owned(a_fresh.clone()));
    assert_eq!(
        as_owned(comparable(a_made.clone(), &a)),
        as_owned(comparable(a_fresh, &a))
    );
    assert_eq!(a_owned.listeners.len(), 2);
    assert_eq!(a_owned.target_groups.len(), 2);
    assert!(a_owned.security_group.is_some());
    // Deletion protection is visible to the planner.
    assert_eq!(
        a_owned
            .lb
            .as_ref()
            .and_then(|l| l.attributes.get("deletion_protection.enabled"))
            .map(String::as_str),
        Some("false")
    );

    // b: its two attached target groups and the loose one.
    let mut b_tgs: Vec<&str> = b_owned
        .target_groups
        .iter()
        .map(|t| t.arn.as_str())
        .collect();
    b_tgs.sort_unstable();
    let mut want: Vec<&str> = b_made
        .target_groups
        .iter()
        .map(|t| t.arn.as_str())
        .chain([b_loose.as_str()])
        .collect();
    want.sort_unstable();
    assert_eq!(b_tgs, want);
    assert_eq!(
        b_owned.lb.as_ref().map(|l| &l.arn),
        b_made.lb.as_ref().map(|l| &l.arn)
    );
    assert_eq!(
        b_owned.security_group.as_ref().map(|s| &s.id),
        b_made.security_group.as_ref().map(|s| &s.id)
    );

    // The other cluster sees only its own.
    let theirs = other_provider.owned(&|_| false).await.expect("owned");
    assert_eq!(theirs.len(), 1);
    assert_eq!(
        theirs[0].1.lb.as_ref().map(|l| &l.arn),
        c_made.lb.as_ref().map(|l| &l.arn)
    );

    // ---- a's Service is gone: delete what it left, from the sweep's observation.
    let empty = Desired::empty(service(), a.lb_name.clone());
    let deletion = plan(&empty, a_owned).expect("plan");
    assert_eq!(deletion.ops.len(), 4, "{deletion:?}");
    provider.reset_calls();
    let after = provider
        .apply(&empty, a_owned, &deletion)
        .await
        .expect("apply");
    assert_eq!(after, Observed::default());
    assert_eq!(
        writes(&provider),
        expect(&[
            ("DeleteLoadBalancer/ok", 1),
            ("DeleteTargetGroup/ok", 2),
            ("DeleteSecurityGroup/ok", 1),
        ])
    );

    // Only a's resources are gone.
    account.assert_exist(&a.lb_name, a_owned, false).await;
    account.assert_exist(&b.lb_name, b_owned, true).await;
    account.assert_exist(&c.lb_name, &c_made, true).await;
    assert!(account.load_balancer_exists("hand-made").await);
    assert!(account.target_group_exists(&partial).await);

    // The next sweep finds b only; b's deletion protection stops its empty plan.
    let b_arn = b_owned.lb.as_ref().expect("lb").arn.clone();
    account
        .elbv2
        .modify_load_balancer_attributes()
        .load_balancer_arn(&b_arn)
        .attributes(
            support::elbv2::types::LoadBalancerAttribute::builder()
                .key("deletion_protection.enabled")
                .value("true")
                .build(),
        )
        .send()
        .await
        .expect("enable deletion protection");
    let owned = provider.owned(&|_| false).await.expect("owned");
    assert_eq!(owned.len(), 1);
    assert_eq!(owned[0].0, other_service());
    assert_eq!(
        plan(
            &Desired::empty(other_service(), b.lb_name.clone()),
            &owned[0].1
        ),
        Err(cloudlb_core::plan::PlanError::DeletionProtected {
            name: b.lb_name.clone()
        })
    );
}

#[tokio::test]
async fn with_metrics_counts_every_call() {
    let _guard = TestGuard::new();
    let account = account(2).await;
    let observer = std::sync::Arc::new(Tally::default());
    let provider = account
        .provider(AwsSettings::new(CLUSTER))
        .with_metrics(observer.clone());

    let want = desired(&[TCP_80, UDP_53], &account.instances);
    reconcile(&provider, &want).await;
    provider.owned(&|_| false).await.expect("owned");
    let empty = Desired::empty(service(), want.lb_name.clone());
    reconcile(&provider, &empty).await;

    // Every call the provider counted reached the observer (the operator's metrics), as
    // provider `aws`, with the same operation and outcome, and nothing else did.
    let seen = observer.0.lock().unwrap().clone();
    assert_eq!(seen.get("aws CreateLoadBalancer/ok"), Some(&1), "{seen:?}");
    let counted: BTreeMap<String, u64> = provider
        .calls()
        .into_iter()
        .map(|(k, n)| (format!("aws {k}"), n))
        .collect();
    assert_eq!(seen, counted);
}

/// Counts what it is told by `provider operation/outcome`.
#[derive(Default)]
struct Tally(std::sync::Mutex<BTreeMap<String, u64>>);

impl cloudlb_core::provider::CallObserver for Tally {
    fn cloud_call(&self, provider: &str, operation: &str, outcome: &str) {
        let mut seen = self.0.lock().unwrap();
        *seen
            .entry(format!("{provider} {operation}/{outcome}"))
            .or_default() += 1;
    }
}

/// A dualstack load balancer with a UDP listener to IPv6 pods: made with IPv6 source NAT on
/// (`auto_assigned` in every subnet) and an IPv6 target group; an existing one without source
/// NAT gets it by one SetSubnets in the subnets it is in. moto accepts but does not keep the
/// source-NAT setting, so what cloudlb asked for is read from the requests (a recording proxy
/// in front of moto).
#[tokio::test]
async fn dualstack_udp_gets_ipv6_source_nat_and_ipv6_pod_target_groups() {
    let _guard = TestGuard::new();
    let moto = AwsEmulator::shared().await;
    let proxy = FaultProxy::start(ProxyConfig::new(moto.endpoint()))
        .await
        .expect("proxy");
    proxy.record_parameters(&["CreateLoadBalancer", "CreateTargetGroup", "SetSubnets"]);
    let (elbv2, ec2) = support::aws::clients_at(&proxy.endpoint(), &moto.new_account());
    let network = create_vpc_with_subnets(&ec2, CLUSTER).await;
    let mut settings = AwsSettings::new(CLUSTER);
    settings.rate_limit_per_sec = 100.0;
    let provider = AwsProvider::new(elbv2.clone(), ec2, settings);

    let pod = "2600:1f14:abc:1201::21";
    let mut want = desired(&[UDP_53], &[]);
    if let Some(lb) = want.lb.as_mut() {
        lb.ip_address_type = IpAddressType::Dualstack;
        lb.ipv6_source_nat = Some(SourceNat { prefixes: vec![] });
        for tg in &mut lb.target_groups {
            tg.target_type = TargetType::Ip;
            tg.ip_family = IpFamily::Ipv6;
            tg.port = 5353;
            tg.targets = BTreeSet::from([Target {
                id: pod.into(),
                port: 5353,
            }]);
        }
    }
    let (ops, _) = converge(&provider, &want).await;
    assert!(ops.contains(&Op::CreateLoadBalancer), "{ops:?}");

    let created = proxy.parameters("CreateLoadBalancer");
    assert_eq!(created.len(), 1, "{created:?}");
    let p = &created[0];
    assert_eq!(
        p.get("IpAddressType").map(String::as_str),
        Some("dualstack")
    );
    assert_eq!(
        p.get("EnablePrefixForIpv6SourceNat").map(String::as_str),
        Some("on")
    );
    let subnets: Vec<&String> = p
        .iter()
        .filter(|(k, _)| k.starts_with("SubnetMappings.member.") && k.ends_with(".SubnetId"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(subnets.len(), network.public_subnets.len(), "{p:?}");
    for i in 1..=subnets.len() {
        let key = format!("SubnetMappings.member.{i}.SourceNatIpv6Prefix");
        assert_eq!(
            p.get(&key).map(String::as_str),
            Some("auto_assigned"),
            "{p:?}"
        );
    }
    let tgs = proxy.parameters("CreateTargetGroup");
    assert_eq!(
        tgs.iter()
            .map(|t| t.get("IpAddressType").cloned())
            .collect::<Vec<_>>(),
        [Some("ipv6".to_string())]
    );
    let tg_name = &want.lb.as_ref().expect("lb").target_groups[0].name;
    let described = elbv2
        .describe_target_groups()
        .names(tg_name)
        .send()
        .await
        .expect("DescribeTargetGroups");
    let tg = &described.target_groups()[0];
    assert_eq!(tg.ip_address_type().map(|t| t.as_str()), Some("ipv6"));
    let health = elbv2
        .describe_target_health()
        .target_group_arn(tg.target_group_arn().unwrap_or_default())
        .send()
        .await
        .expect("DescribeTargetHealth");
    let registered: Vec<&str> = health
        .target_health_descriptions()
        .iter()
        .filter_map(|d| d.target()?.id())
        .collect();
    assert_eq!(registered, [pod]);

    // The same load balancer as a cloud that reports source NAT off: one SetSubnets, in the
    // load balancer's own subnets, turning it on.
    let mut observed = provider.observe(&want).await.expect("observe");
    let lb = observed.lb.as_mut().expect("observed lb");
    assert_eq!(lb.subnets.len(), subnets.len());
    lb.ipv6_source_nat = Some(false);
    let in_subnets = lb.subnets.clone();
    let p = plan(&want, &observed).expect("plan");
    assert_eq!(p.ops, [Op::SetIpv6SourceNat]);
    provider.reset_calls();
    provider.apply(&want, &observed, &p).await.expect("apply");
    assert_eq!(writes(&provider), expect(&[("SetSubnets/ok", 1)]));
    let set = proxy.parameters("SetSubnets");
    assert_eq!(set.len(), 1);
    assert_eq!(
        set[0]
            .get("EnablePrefixForIpv6SourceNat")
            .map(String::as_str),
        Some("on")
    );
    let sent: BTreeSet<&String> = set[0]
        .iter()
        .filter(|(k, _)| k.ends_with(".SubnetId"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(sent, in_subnets.iter().collect());
}
