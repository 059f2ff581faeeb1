//! Proves the testbed: a real API server with RBAC, and moto with per-test accounts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // a failed step fails the test

use crate::helpers;
use crate::support;

use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;
use support::elbv2::types::{
    Action, ActionTypeEnum, LoadBalancerTypeEnum, ProtocolEnum, TargetDescription,
};
use support::{
    AwsEmulator, Instance, TestCluster, TestGuard, create_node, create_vpc_with_subnets, describe,
    node_for, run_instances,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_service_gets_node_ports_and_status() {
    let _guard = TestGuard::new();
    let cluster = TestCluster::shared().await;
    let client = cluster.client();
    let ns = cluster.create_namespace("smoke").await;

    for (i, az) in ["us-east-1a", "us-east-1b"].into_iter().enumerate() {
        let instance = Instance {
            id: format!("i-0smoke{i:010}"),
            az: az.into(),
            private_ip: format!("10.0.{}.10", i * 16),
        };
        let node = create_node(&client, &node_for(&instance, &format!("{ns}-node-{i}"))).await;
        let status = node.status.expect("the Node has a status");
        let addresses = status.addresses.expect("the Node has addresses");
        assert!(
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == instance.private_ip),
            "InternalIP missing: {addresses:?}"
        );
        assert_eq!(
            node.spec.and_then(|s| s.provider_id).as_deref(),
            Some(format!("aws:///{az}/{}", instance.id).as_str())
        );
    }

    let services = Api::<Service>::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": "web"},
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8443},
            ],
        },
    }))
    .expect("a valid Service");
    let created = services
        .create(&PostParams::default(), &service)
        .await
        .expect("create the LoadBalancer Service");
    let spec = created.spec.expect("the Service has a spec");
    let cluster_ip = spec.cluster_ip.expect("a ClusterIP was allocated");
    assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");
    let ports = spec.ports.expect("the Service has ports");
    assert_eq!(ports.len(), 2);
    for port in &ports {
        let node_port = port.node_port.expect("a nodePort was allocated");
        assert!((30000..=32767).contains(&node_port), "nodePort {node_port}");
    }
    assert_ne!(ports[0].node_port, ports[1].node_port);

    let hostname = "web-0123456789.elb.us-east-1.amazonaws.com";
    let status = json!({"status": {"loadBalancer": {"ingress": [{"hostname": hostname}]}}});
    services
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("patch the Service status");
    let read = services.get_status("web").await.expect("read the Service");
    let ingress = read
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|lb| lb.ingress)
        .expect("status.loadBalancer.ingress is set");
    assert_eq!(ingress[0].hostname.as_deref(), Some(hostname));

    let output = cluster.kubectl(&["get", "svc", "-n", &ns]).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let header = stdout.lines().next().expect("kubectl printed a header");
    let column = header
        .find("EXTERNAL-IP")
        .expect("kubectl shows an EXTERNAL-IP column");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("web "))
        .expect("kubectl lists the Service");
    assert!(
        row[column..].starts_with(hostname),
        "EXTERNAL-IP is not the hostname:\n{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moto_serves_an_nlb_with_instance_targets() {
    let _guard = TestGuard::new();
    let moto = AwsEmulator::shared().await;
    let account = moto.new_account();
    let (elbv2, ec2) = moto.clients(&account);

    let network = create_vpc_with_subnets(&ec2, "smoke").await;
    assert_eq!(network.public_subnets.len(), 2);
    assert_eq!(network.private_subnets.len(), 2);
    let mut instances = run_instances(&ec2, &network.private_subnets[0].id, 1).await;
    instances.extend(run_instances(&ec2, &network.private_subnets[1].id, 1).await);
    assert_eq!(instances.len(), 2);
    assert_ne!(instances[0].az, instances[1].az);

    let created = helpers::create_nlb(&elbv2, "smoke-nlb", network.public_subnet_ids()).await;
    let lb_arn = created.load_balancer_arn().expect("an LB ARN").to_string();
    let described = elbv2
        .describe_load_balancers()
        .names("smoke-nlb")
        .send()
        .await
        .expect("DescribeLoadBalancers");
    let lb = &described.load_balancers()[0];
    assert_eq!(lb.load_balancer_arn(), Some(lb_arn.as_str()));
    assert_eq!(lb.r#type(), Some(&LoadBalancerTypeEnum::Network));
    assert!(lb.dns_name().is_some_and(|d| !d.is_empty()));

    let node_port = 31080;
    let tg_arn = helpers::create_target_group(&elbv2, "smoke-tg", node_port, &network.vpc_id).await;
    let targets = instances
        .iter()
        .map(|i| {
            TargetDescription::builder()
                .id(&i.id)
                .port(node_port)
                .build()
        })
        .collect();
    elbv2
        .register_targets()
        .target_group_arn(&tg_arn)
        .set_targets(Some(targets))
        .send()
        .await
        .expect("RegisterTargets");
    let health = describe::target_health(&elbv2, &tg_arn).await;
    let mut registered: Vec<&str> = health
        .iter()
        .filter_map(|d| d.target().and_then(|t| t.id()))
        .collect();
    registered.sort_unstable();
    let mut expected: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(registered, expected);

    elbv2
        .create_listener()
        .load_balancer_arn(&lb_arn)
        .protocol(ProtocolEnum::Tcp)
        .port(80)
        .default_actions(
            Action::builder()
                .r#type(ActionTypeEnum::Forward)
                .target_group_arn(&tg_arn)
                .build(),
        )
        .send()
        .await
        .expect("CreateListener");
    let listeners = describe::listeners(&elbv2, &lb_arn).await;
    let listener = &listeners[0];
    assert_eq!(listener.port(), Some(80));
    assert_eq!(
        listener.default_actions()[0].target_group_arn(),
        Some(tg_arn.as_str())
    );

    // Another account sees nothing of this one.
    let (other_elbv2, _) = moto.clients(&moto.new_account());
    let others = other_elbv2
        .describe_load_balancers()
        .send()
        .await
        .expect("DescribeLoadBalancers in another account");
    assert!(
        others.load_balancers().is_empty(),
        "account isolation broken: {:?}",
        others.load_balancers()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_is_enforced_for_service_accounts() {
    let _guard = TestGuard::new();
    let cluster = TestCluster::shared().await;
    let ns = cluster.create_namespace("rbac").await;
    let client = cluster.service_account_client(&ns, "nobody").await;
    let err = Api::<Service>::namespaced(client, &ns)
        .list(&Default::default())
        .await
        .expect_err("a ServiceAccount without RBAC rules must not list Services");
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403 Forbidden, got {other}"),
    }
}
