//! Pod readiness that follows the load balancer (the readiness gate users know from
//! aws-load-balancer-controller): a pod behind pod targets carries the readiness gate
//! `cloudlb.io/target-health.<service>` (set by the webhook at creation, in namespaces or pods
//! labelled [`INJECT_LABEL`]`: enabled`), so the kubelet reports it Ready only once cloudlb has set
//! that condition, which it does when the pod's target is healthy in every target group of the
//! Service. A rolling update therefore waits for each new pod to take traffic before it removes
//! an old one.
//!
//! A gated pod whose containers are ready is not Ready yet, so its endpoint is not ready either:
//! cloudlb registers it anyway (it is waiting for exactly that; a pod whose containers are not
//! ready is not registered), then polls the target health ([`POLL`]) until the target is healthy
//! and sets the condition. Nothing is polled, and no pod
//! is listed, for a Service none of whose endpoints is waiting.

use crate::model::Target;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// The label (on a Namespace, or on a pod) that asks the webhook for readiness gates.
pub const INJECT_LABEL: &str = "cloudlb.io/pod-readiness-gate-inject";
/// The prefix of the condition types.
pub const CONDITION_PREFIX: &str = "cloudlb.io/target-health.";
/// How often the target health of waiting pods is read.
pub const POLL: Duration = Duration::from_secs(5);

/// The readiness condition of Service `service`'s pods: `cloudlb.io/target-health.<service>`,
/// the name part shortened with a hash where it would pass the 63 characters of a condition
/// type's name.
pub fn condition_type(service: &str) -> String {
    let name = format!("target-health.{service}");
    if name.len() <= 63 {
        return format!("cloudlb.io/{name}");
    }
    let hash = crate::model::naming::hash_hex(&["target-health", service], 8);
    format!("cloudlb.io/target-health.{}-{hash}", &service[..38])
}

/// A pod that carries the Service's readiness gate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gated {
    pub name: String,
    pub ips: Vec<String>,
    /// Its containers are ready: it waits only for the load balancer.
    pub containers_ready: bool,
    /// The gate's condition is already true.
    pub passed: bool,
}

impl Gated {
    /// Waiting for cloudlb: containers ready, condition not yet true.
    pub fn waiting(&self) -> bool {
        self.containers_ready && !self.passed
    }
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a str> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.as_str())
}

/// The pods of `pods` that carry readiness gate `gate` and are not being deleted.
pub fn gated(pods: &[Pod], gate: &str) -> Vec<Gated> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.readiness_gates.as_ref())
                .is_some_and(|g| g.iter().any(|g| g.condition_type == gate))
        })
        .map(|p| Gated {
            name: p.metadata.name.clone().unwrap_or_default(),
            ips: p
                .status
                .as_ref()
                .and_then(|s| s.pod_ips.as_ref())
                .map(|ips| ips.iter().map(|i| i.ip.clone()).collect())
                .unwrap_or_default(),
            containers_ready: condition(p, "ContainersReady") == Some("True"),
            passed: condition(p, gate) == Some("True"),
        })
        .collect()
}

/// Whether any endpoint of `slices` is not ready and not terminating: a pod that may be waiting
/// for its gate (the only case in which the pods are listed).
pub fn may_wait(slices: &[std::sync::Arc<EndpointSlice>]) -> bool {
    !unready_ips(slices).is_empty()
}

/// The addresses of the endpoints of `slices` that are not ready and not terminating (those
/// that may wait for their gate).
pub fn unready_ips(slices: &[std::sync::Arc<EndpointSlice>]) -> BTreeSet<String> {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter(|e| {
            let c = e.conditions.as_ref();
            c.and_then(|c| c.ready) == Some(false) && c.and_then(|c| c.terminating) != Some(true)
        })
        .flat_map(|e| e.addresses.iter().cloned())
        .collect()
}

/// The Service's selector as a label selector string (`None`: it selects no pods).
pub fn selector(svc: &Service) -> Option<String> {
    let sel = svc.spec.as_ref()?.selector.as_ref()?;
    (!sel.is_empty()).then(|| {
        sel.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    })
}

/// Whether the Service's selector selects a pod with `labels`.
pub fn selects(svc: &Service, labels: Option<&BTreeMap<String, String>>) -> bool {
    let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    !sel.is_empty()
        && sel
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The addresses of the gated pods whose containers are ready: targets although their endpoints
/// are not ready (they wait for the gate, or for the kubelet to notice it passed), as
/// aws-load-balancer-controller registers them.
pub fn target_ips(gated: &[Gated]) -> BTreeSet<String> {
    gated
        .iter()
        .filter(|g| g.containers_ready)
        .flat_map(|g| g.ips.iter().cloned())
        .collect()
}

/// The waiting pods whose every target (`ip:port` in `targets`, the desired targets of each
/// target group) is in `healthy` (the same, as the provider reports them healthy).
pub fn passed<'a>(
    gated: &'a [Gated],
    targets: &BTreeMap<String, BTreeSet<Target>>,
    healthy: &BTreeMap<String, BTreeSet<Target>>,
) -> Vec<&'a Gated> {
    gated
        .iter()
        .filter(|g| g.waiting())
        .filter(|g| {
            let mut any = false;
            for (tg, want) in targets {
                for t in want.iter().filter(|t| g.ips.contains(&t.id)) {
                    any = true;
                    if !healthy.get(tg).is_some_and(|h| h.contains(t)) {
                        return false;
                    }
                }
            }
            any
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, gates: &[&str], conditions: serde_json::Value) -> Pod {
        let gates: Vec<_> = gates.iter().map(|g| json!({"conditionType": g})).collect();
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"containers": [], "readinessGates": gates},
            "status": {"podIPs": [{"ip": ip}], "conditions": conditions}
        }))
        .expect("pod")
    }

    #[test]
    fn condition_types_are_valid_qualified_names() {
        assert_eq!(condition_type("web"), "cloudlb.io/target-health.web");
        let long = "a".repeat(63);
        let c = condition_type(&long);
        let name = c.strip_prefix("cloudlb.io/").expect("prefix");
        assert!(name.len() <= 63, "{c}");
        assert_ne!(condition_type(&long), condition_type(&"a".repeat(62)));
    }

    fn t(id: &str, port: u16) -> Target {
        Target {
            id: id.into(),
            port,
        }
    }

    #[test]
    fn waiting_pods_are_those_with_ready_containers_and_the_gate_not_yet_passed() {
        let gate = condition_type("web");
        let cond = |t: &str, s: &str| json!({"type": t, "status": s});
        let pods = vec![
            pod(
                "a",
                "10.0.0.1",
                &[&gate],
                json!([cond("ContainersReady", "True")]),
            ),
            pod(
                "b",
                "10.0.0.2",
                &[&gate],
                json!([cond("ContainersReady", "False")]),
            ),
            pod(
                "c",
                "10.0.0.3",
                &[&gate],
                json!([cond("ContainersReady", "True"), cond(&gate, "True")]),
            ),
            pod(
                "d",
                "10.0.0.4",
                &[],
                json!([cond("ContainersReady", "True")]),
            ),
            pod(
                "e",
                "10.0.0.5",
                &["cloudlb.io/target-health.other"],
                json!([]),
            ),
        ];
        let g = gated(&pods, &gate);
        let names: Vec<&str> = g.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let ips = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(target_ips(&g), ips(&["10.0.0.1", "10.0.0.3"]));
        let waiting: Vec<&str> = g
            .iter()
            .filter(|g| g.waiting())
            .map(|g| g.name.as_str())
            .collect();
        assert_eq!(waiting, ["a"]);

        let targets = BTreeMap::from([
            (
                "tg-80".to_string(),
                BTreeSet::from([t("10.0.0.1", 8080), t("10.0.0.3", 8080)]),
            ),
            ("tg-443".to_string(), BTreeSet::from([t("10.0.0.1", 8443)])),
        ]);
        // Healthy in one target group only: still waiting.
        let mut healthy =
            BTreeMap::from([("tg-80".to_string(), BTreeSet::from([t("10.0.0.1", 8080)]))]);
        assert!(passed(&g, &targets, &healthy).is_empty());
        healthy.insert("tg-443".to_string(), BTreeSet::from([t("10.0.0.1", 8443)]));
        let done: Vec<&str> = passed(&g, &targets, &healthy)
            .iter()
            .map(|g| g.name.as_str())
            .collect();
        assert_eq!(done, ["a"]);
    }
}
