//! Helpers only the controller binary's tests use (what both test binaries use is in
//! tests/support): edits, Events, reconcile and call counts, targets, NLBs made by hand.

use cloudlb::model::checkpoint::CHECKPOINT_ANNOTATION;
use cloudlb::provider::local::{LocalProvider, LocalSettings};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::support::elbv2::types::{
    LoadBalancer, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, TargetHealthStateEnum,
};
use crate::support::env::{Env, wait_for};
use crate::support::{Instance, describe, elbv2, run_instances};

/// What only the controller tests do with an [`Env`].
impl Env {
    /// Restarts the operator with the local provider as well as AWS.
    pub async fn with_local_provider(&mut self) {
        self.stop_operator();
        if let Some(local) = self.local.take() {
            local.shutdown().await;
        }
        self.local = Some(Arc::new(LocalProvider::new(LocalSettings::default())));
        self.start_operator();
    }

    /// Creates Service `name` with [`web_ports`] and no annotations and waits until it is served:
    /// its hostname.
    pub async fn serve_web(&self, name: &str) -> String {
        self.create_service(name, json!({}), web_ports()).await;
        self.wait_hostname(name).await
    }

    pub async fn new_instance(&self) -> Instance {
        run_instances(&self.ec2, &self.network.public_subnets[0].id, 1)
            .await
            .pop()
            .expect("one instance")
    }

    pub async fn patch_service(&self, name: &str, patch: serde_json::Value) {
        patch_service(&self.services(), name, &patch).await;
    }

    pub async fn targets(&self, tg_arn: &str) -> Vec<String> {
        targets(&self.elbv2, tg_arn).await
    }

    /// The notes of the Events in the namespace with `reason`.
    pub async fn events(&self, reason: &str) -> Vec<String> {
        notes(&self.client, &self.ns, reason).await
    }

    /// Waits until the namespace has Events with `reason`; their notes.
    pub async fn wait_events(&self, reason: &str) -> Vec<String> {
        wait_notes(&self.client, &self.ns, reason).await
    }

    /// Sets attribute `key` of the only load balancer by hand (as in the console).
    pub async fn set_lb_attribute_by_hand(&self, key: &str, value: &str) {
        let arn = self.load_balancers().await[0]
            .load_balancer_arn()
            .expect("arn")
            .to_string();
        let attribute = elbv2::types::LoadBalancerAttribute::builder()
            .key(key)
            .value(value)
            .build();
        self.elbv2
            .modify_load_balancer_attributes()
            .load_balancer_arn(&arn)
            .attributes(attribute)
            .send()
            .await
            .expect("console edit");
    }

    /// The checkpoint Service `name` carries (`state.cloudlb.io/checkpoint`), if any.
    pub async fn checkpoint(&self, name: &str) -> Option<String> {
        let svc = self.services().get(name).await.expect("get Service");
        svc.annotations().get(CHECKPOINT_ANNOTATION).cloned()
    }

    /// Waits until each of `names` carries its checkpoint (written once its NLB is active): only
    /// then does a restart cost no call for it.
    pub async fn wait_checkpoints(&self, names: &[&str]) {
        for name in names {
            wait_for(&format!("the checkpoint of {name}"), || {
                self.checkpoint(name)
            })
            .await;
        }
    }

    /// Waits until the operator has finished `n` more reconciles with `outcome` than `before`.
    pub async fn wait_reconciles(&self, outcome: &str, before: u64) {
        wait_for(&format!("a reconcile with outcome {outcome}"), || async {
            (self.metrics.reconcile_count(outcome) > before).then_some(())
        })
        .await
    }

    pub fn calls_since(&self, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        self.provider
            .calls()
            .into_iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(&k).copied().unwrap_or(0);
                (d > 0).then_some((k, d))
            })
            .collect()
    }

    /// An edit of Service `name` that changes nothing cloudlb reads (an unrelated annotation),
    /// the reconcile that follows (one that ends with `outcome`), and the AWS calls it made.
    pub async fn calls_for_unrelated_edit(
        &self,
        name: &str,
        outcome: &str,
    ) -> BTreeMap<String, u64> {
        let edit = json!({"metadata": {"annotations": {"unrelated": "edit"}}});
        self.calls_for_edit(name, edit, outcome).await
    }

    /// Patches Service `name`, waits for the reconcile of the edit (one that ends with
    /// `outcome`) and returns the AWS calls it made.
    pub async fn calls_for_edit(
        &self,
        name: &str,
        patch: serde_json::Value,
        outcome: &str,
    ) -> BTreeMap<String, u64> {
        let before = self.provider.calls();
        let reconciles = self.metrics.reconcile_count(outcome);
        self.patch_service(name, patch).await;
        self.wait_reconciles(outcome, reconciles).await;
        self.calls_since(&before)
    }
}

/// An HTTP and an HTTPS port: the ports of most test Services.
pub fn web_ports() -> Value {
    json!([
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
        {"name": "https", "port": 443, "targetPort": 8443, "protocol": "TCP"}
    ])
}

/// [`web_ports`] and a third one, DNS over UDP.
pub fn web_and_dns_ports() -> Value {
    let mut ports = web_ports();
    if let Some(list) = ports.as_array_mut() {
        list.push(json!({"name": "dns", "port": 53, "protocol": "UDP"}));
    }
    ports
}

/// Deletes the Service `name` and waits until it is gone (our finalizer released it).
pub async fn delete_service(services: &Api<Service>, name: &str) {
    services
        .delete(name, &kube::api::DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete Service {name}: {e}"));
    wait_for(&format!("Service {name} gone"), || async {
        services.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// A JSON merge patch of Service `name`.
pub async fn patch_service(services: &Api<Service>, name: &str, patch: &Value) {
    services
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("patch service {name} with {patch}: {e}"));
}

/// Labels Node `name` `node.kubernetes.io/exclude-from-external-load-balancers`.
pub async fn exclude_node(client: &Client, name: &str) {
    let label = json!({"metadata": {"labels": {"node.kubernetes.io/exclude-from-external-load-balancers": "true"}}});
    Api::<Node>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap_or_else(|e| panic!("label node {name}: {e}"));
}

/// The Events in namespace `ns`.
pub async fn events(client: &Client, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
}

/// The notes of the Events in `ns` with `reason`.
pub async fn notes(client: &Client, ns: &str, reason: &str) -> Vec<String> {
    events(client, ns)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .filter_map(|e| e.note)
        .collect()
}
/// Waits until there are Events in `ns` with `reason`; their notes.
pub async fn wait_notes(client: &Client, ns: &str, reason: &str) -> Vec<String> {
    wait_for(&format!("a {reason} Event"), || async {
        let notes = notes(client, ns, reason).await;
        (!notes.is_empty()).then_some(notes)
    })
    .await
}

/// The instance IDs registered in a target group (not unused or draining), sorted.
pub async fn targets(elbv2: &elbv2::Client, tg_arn: &str) -> Vec<String> {
    let mut ids: Vec<String> = describe::target_health(elbv2, tg_arn)
        .await
        .iter()
        .filter(|d| {
            d.target_health().and_then(|h| h.state()).is_none_or(|s| {
                !matches!(
                    s,
                    TargetHealthStateEnum::Unused | TargetHealthStateEnum::Draining
                )
            })
        })
        .filter_map(|d| d.target().and_then(|t| t.id()).map(String::from))
        .collect();
    ids.sort();
    ids
}

/// An internet-facing NLB created by hand (not by cloudlb) in `subnets`.
/// Creates a TCP target group of instances named `name` on `port` in `vpc`, as someone else
/// would (no tags); its ARN.
pub async fn create_target_group(
    elbv2: &elbv2::Client,
    name: &str,
    port: i32,
    vpc: &str,
) -> String {
    use crate::support::elbv2::types::{ProtocolEnum, TargetTypeEnum};
    let created = elbv2
        .create_target_group()
        .name(name)
        .protocol(ProtocolEnum::Tcp)
        .port(port)
        .target_type(TargetTypeEnum::Instance)
        .vpc_id(vpc)
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateTargetGroup {name}: {e:?}"));
    created.target_groups()[0]
        .target_group_arn()
        .expect("a target group ARN")
        .to_string()
}

pub async fn create_nlb(elbv2: &elbv2::Client, name: &str, subnets: Vec<String>) -> LoadBalancer {
    elbv2
        .create_load_balancer()
        .name(name)
        .r#type(LoadBalancerTypeEnum::Network)
        .scheme(LoadBalancerSchemeEnum::InternetFacing)
        .set_subnets(Some(subnets))
        .send()
        .await
        .unwrap_or_else(|e| panic!("CreateLoadBalancer {name}: {e:?}"))
        .load_balancers()
        .first()
        .cloned()
        .expect("the created load balancer")
}
