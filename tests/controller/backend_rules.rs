//! The rules that let a load balancer reach its targets: the cluster's backend security group,
//! attached to the NLB, admitted by the nodes' security group on the nodePort range (one rule per
//! protocol, however many Services) and the health-check port; removed, with the group, after
//! the last Service is gone; a rule cloudlb did not make is never touched.

use crate::helpers::{self, web_and_dns_ports};
use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::env::{Env, wait_for};
use support::{TestGuard, ec2};

/// The ingress of security group `id` as `(protocol, from, to, source)`: a CIDR or a group.
async fn ingress(env: &Env, id: &str) -> BTreeSet<(String, i32, i32, String)> {
    let out = env
        .ec2
        .describe_security_groups()
        .group_ids(id)
        .send()
        .await
        .expect("describe security group");
    let mut rules = BTreeSet::new();
    for g in out.security_groups() {
        for p in g.ip_permissions() {
            let key = |source: String| {
                (
                    p.ip_protocol().unwrap_or_default().to_string(),
                    p.from_port().unwrap_or(-1),
                    p.to_port().unwrap_or(-1),
                    source,
                )
            };
            for r in p.ip_ranges() {
                rules.insert(key(r.cidr_ip().unwrap_or_default().to_string()));
            }
            for pair in p.user_id_group_pairs() {
                rules.insert(key(pair.group_id().unwrap_or_default().to_string()));
            }
        }
    }
    rules
}

/// The security group of the test's instances (moto gives them the VPC's default group).
async fn node_group(env: &Env) -> String {
    let out = env
        .ec2
        .describe_instances()
        .instance_ids(&env.instances[0].id)
        .send()
        .await
        .expect("describe instance");
    let groups: BTreeSet<String> = out
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .flat_map(|i| i.security_groups())
        .filter_map(|g| g.group_id().map(String::from))
        .collect();
    assert_eq!(groups.len(), 1, "one group per test instance: {groups:?}");
    groups.into_iter().next().unwrap()
}

async fn backend_group(env: &Env) -> Option<ec2::types::SecurityGroup> {
    let name = format!("cloudlb-backend-{}-cloudlb", env.ns);
    let out = env
        .ec2
        .describe_security_groups()
        .filters(
            ec2::types::Filter::builder()
                .name("group-name")
                .values(name)
                .build(),
        )
        .send()
        .await
        .expect("describe security groups");
    out.security_groups().first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_admit_the_backend_group_until_the_last_service_goes() {
    let _guard = TestGuard::new();
    let env = Env::start("backendrules", Duration::from_secs(3600)).await;
    let nodes = node_group(&env).await;
    // A rule someone made by hand, before cloudlb.
    env.ec2
        .authorize_security_group_ingress()
        .group_id(&nodes)
        .ip_permissions(
            ec2::types::IpPermission::builder()
                .ip_protocol("tcp")
                .from_port(22)
                .to_port(22)
                .ip_ranges(ec2::types::IpRange::builder().cidr_ip("10.0.0.0/8").build())
                .build(),
        )
        .send()
        .await
        .expect("a rule by hand");
    let before = ingress(&env, &nodes).await;

    for name in ["web", "dns"] {
        env.create_service(name, serde_json::json!({}), web_and_dns_ports())
            .await;
    }
    env.wait_hostname("web").await;
    env.wait_hostname("dns").await;
    let backend = backend_group(&env).await.expect("the backend group exists");
    let backend_id = backend.group_id().unwrap().to_string();
    let tags: BTreeSet<(String, String)> = backend
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().into(),
                t.value().unwrap_or_default().into(),
            )
        })
        .collect();
    assert!(
        tags.contains(&(
            "cloudlb.io/resource".into(),
            "backend-security-group".into()
        )),
        "{tags:?}"
    );
    assert!(
        tags.contains(&("cloudlb.io/cluster".into(), env.ns.clone())),
        "{tags:?}"
    );

    // Both NLBs carry their own frontend group and the shared backend group.
    for lb in env.load_balancers().await {
        let groups = lb.security_groups();
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert!(groups.contains(&backend_id), "{groups:?}");
    }
    // The nodes admit the backend group on the nodePort range (TCP and UDP) and on kube-proxy's
    // health-check port (the UDP port's check), one rule each for both Services; nothing else
    // changed.
    let after = ingress(&env, &nodes).await;
    let added: BTreeSet<_> = after.difference(&before).cloned().collect();
    let want: BTreeSet<_> = [
        ("tcp", 30000, 32767),
        ("udp", 30000, 32767),
        ("tcp", 10256, 10256),
    ]
    .into_iter()
    .map(|(p, f, t)| (p.to_string(), f, t, backend_id.clone()))
    .collect();
    assert_eq!(added, want);
    assert!(before.is_subset(&after), "nothing was removed");

    // One Service goes: the other still needs every rule.
    helpers::delete_service(&env.services(), "dns").await;
    wait_for("dns gone", || async {
        env.services()
            .get_opt("dns")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ingress(&env, &nodes).await, after, "still used by web");

    // The last one goes: the rules and the group go too; the rule made by hand stays.
    helpers::delete_service(&env.services(), "web").await;
    wait_for("the backend group deleted", || async {
        backend_group(&env).await.is_none().then_some(())
    })
    .await;
    assert_eq!(ingress(&env, &nodes).await, before);
}
