//! `LoadBalancerClass.status`: how many Services use the class, and whether the class is valid.
//! Written only when it changed.

use super::Context;
use crate::config::{
    self,
    class::{ClassCondition, LoadBalancerClass, LoadBalancerClassStatus},
};
use crate::ownership::{Ownership, ownership};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How many of `services` installation `installation`, serving `classes`, owns through each
/// class (by name): one pass for all classes.
pub fn service_counts(
    classes: &[LoadBalancerClass],
    services: &[Arc<Service>],
    installation: &str,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for svc in services {
        if let Ownership::Ours { class, .. } = ownership(svc, classes, installation) {
            *counts.entry(class.name_any()).or_default() += 1;
        }
    }
    counts
}

/// The status a class should have, with `service_count` Services.
pub fn compute(class: &LoadBalancerClass, service_count: usize) -> LoadBalancerClassStatus {
    let condition = match config::validate_class(class) {
        Ok(()) => ClassCondition {
            type_: "Valid".into(),
            status: "True".into(),
            reason: "Valid".into(),
            message: "class settings are valid".into(),
            last_transition_time: None,
        },
        Err(e) => ClassCondition {
            type_: "Valid".into(),
            status: "False".into(),
            reason: "InvalidSettings".into(),
            message: e.to_string(),
            last_transition_time: None,
        },
    };
    LoadBalancerClassStatus {
        service_count: u32::try_from(service_count).unwrap_or(u32::MAX),
        conditions: vec![condition],
    }
}

/// Keeps every served class's status current (every few seconds, writing only changes).
pub async fn run(ctx: Arc<Context>, services: Store<Service>) {
    let api: Api<LoadBalancerClass> = Api::all(ctx.client.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let classes = ctx.served_classes();
        let counts = service_counts(&classes, &services.state(), &ctx.settings.installation);
        for class in &classes {
            let count = counts.get(&class.name_any()).copied().unwrap_or(0);
            let mut want = compute(class, count);
            let have = class.status.clone().unwrap_or_default();
            let same_condition = have.conditions.first().map(|c| (&c.status, &c.message))
                == want.conditions.first().map(|c| (&c.status, &c.message));
            if have.service_count == want.service_count && same_condition {
                continue;
            }
            let now = jiff_now();
            for c in &mut want.conditions {
                c.last_transition_time = Some(now.clone());
            }
            let patch = json!({"status": want});
            if let Err(e) = api
                .patch_status(
                    &class.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::warn!(class = %class.name_any(), error = %e, "could not update LoadBalancerClass status");
            }
        }
    }
}

fn jiff_now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}
