//! What is in a moto account: the load balancers, target groups, listeners, targets and security
//! groups there are, read with plain SDK calls.

use super::elbv2::error::ProvideErrorMetadata;
use super::elbv2::types::{Listener, LoadBalancer, TargetGroup, TargetHealthDescription};
use super::{ec2, elbv2};
use cloudlb::model::tags;
use std::collections::BTreeMap;

/// Every load balancer (all pages).
pub async fn load_balancers(elbv2: &elbv2::Client) -> Vec<LoadBalancer> {
    elbv2
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

/// The ARNs of `tgs`.
pub fn target_group_arns(tgs: &[TargetGroup]) -> Vec<String> {
    tgs.iter()
        .filter_map(|t| t.target_group_arn().map(String::from))
        .collect()
}

/// Every target group (none when moto says TargetGroupNotFound).
pub async fn target_groups(elbv2: &elbv2::Client) -> Vec<TargetGroup> {
    match elbv2.describe_target_groups().send().await {
        Ok(out) => out.target_groups().to_vec(),
        Err(e) if e.code() == Some("TargetGroupNotFound") => Vec::new(),
        Err(e) => panic!("DescribeTargetGroups: {e:?}"),
    }
}

pub async fn listeners(elbv2: &elbv2::Client, lb_arn: &str) -> Vec<Listener> {
    elbv2
        .describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .expect("DescribeListeners")
        .listeners()
        .to_vec()
}

/// The tags of the ELB resources `arns`, by ARN (20 per call).
pub async fn elb_tags(
    elbv2: &elbv2::Client,
    arns: &[String],
) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for chunk in arns.chunks(20) {
        let resp = elbv2
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

/// Every target of a target group, in whatever state.
pub async fn target_health(elbv2: &elbv2::Client, tg_arn: &str) -> Vec<TargetHealthDescription> {
    elbv2
        .describe_target_health()
        .target_group_arn(tg_arn)
        .send()
        .await
        .expect("DescribeTargetHealth")
        .target_health_descriptions()
        .to_vec()
}

/// The security groups cloudlb made for the Services of `cluster` (tagged
/// `cloudlb.io/cluster=<cluster>` and with a Service's UID: the load balancers' own groups, not
/// the cluster's shared backend group).
pub async fn security_groups(ec2: &ec2::Client, cluster: &str) -> Vec<ec2::types::SecurityGroup> {
    ec2.describe_security_groups()
        .filters(
            ec2::types::Filter::builder()
                .name(format!("tag:{}", tags::CLUSTER))
                .values(cluster)
                .build(),
        )
        .filters(
            ec2::types::Filter::builder()
                .name("tag-key")
                .values(tags::SERVICE_UID)
                .build(),
        )
        .send()
        .await
        .expect("DescribeSecurityGroups")
        .security_groups()
        .to_vec()
}
