//! Kubernetes Node objects that stand for EC2 instances (no kubelet runs in the testbed).

use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::aws::Instance;

/// A Ready Node for `instance`: `spec.providerID = aws:///<az>/<id>`, InternalIP = the
/// instance's private IP, label `topology.kubernetes.io/zone = <az>`.
pub fn node_for(instance: &Instance, name: &str) -> Node {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": instance.az,
                "topology.kubernetes.io/region": crate::aws::REGION,
            },
        },
        "spec": {"providerID": format!("aws:///{}/{}", instance.az, instance.id)},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": instance.private_ip},
                {"type": "Hostname", "address": name},
            ],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "testbed node",
                "lastHeartbeatTime": "2024-01-01T00:00:00Z",
                "lastTransitionTime": "2024-01-01T00:00:00Z",
            }],
        },
    }))
    .expect("a valid Node")
}

/// Creates `node`, then writes its status through the status subresource (a create may drop
/// the status) and returns the stored object.
pub async fn create_node(client: &Client, node: &Node) -> Node {
    let nodes = Api::<Node>::all(client.clone());
    let name = node.metadata.name.clone().expect("the Node has a name");
    nodes
        .create(&PostParams::default(), node)
        .await
        .unwrap_or_else(|e| panic!("create Node {name}: {e}"));
    let status = json!({"status": node.status});
    nodes
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("patch the status of Node {name}: {e}"))
}
