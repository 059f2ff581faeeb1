//! The EndpointSlices of the Services whose targets are pods, indexed by Service, and the
//! batching that turns their churn into few reconciles: a Service whose ready endpoints changed is
//! reconciled at most once per window ([`Settings::endpoint_window`](super::Settings)), so one
//! (de)register call per target group carries every change of that window, however fast the
//! endpoints flap.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// A Service: (namespace, name).
type ServiceKey = (String, String);

#[derive(Default)]
struct Index {
    /// Each Service's slices by slice name (slimmed: what targets are made of).
    slices: HashMap<ServiceKey, BTreeMap<String, Arc<EndpointSlice>>>,
    /// While a (re)list is in progress: the slices listed so far.
    listing: Option<HashMap<ServiceKey, BTreeMap<String, Arc<EndpointSlice>>>>,
    /// Services whose targets are pods: the only ones endpoint changes reconcile.
    wanted: HashSet<ServiceKey>,
    /// Wanted Services whose slices changed since the last batch.
    pending: HashSet<ServiceKey>,
}

/// The EndpointSlices of the Services we own with pod targets.
pub struct Endpoints {
    index: Mutex<Index>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints {
            index: Mutex::default(),
            synced: tokio::sync::watch::Sender::new(false),
        }
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
fn owner(slice: &EndpointSlice) -> Option<ServiceKey> {
    let name = slice.labels().get(crate::build::SERVICE_NAME_LABEL)?;
    Some((slice.namespace()?, name.clone()))
}

/// Keeps what targets are made of: the address family, the ports, and per endpoint its
/// addresses, conditions and pod.
fn slim(slice: &mut EndpointSlice) {
    let meta = &mut slice.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    meta.owner_references = None;
    meta.resource_version = None;
    meta.generation = None;
    meta.creation_timestamp = None;
    meta.uid = None;
    for e in &mut slice.endpoints {
        e.hints = None;
        e.deprecated_topology = None;
        e.hostname = None;
    }
}

impl Endpoints {
    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Declares whether the Service's targets are pods (before its slices are read, so that no
    /// change between the read and the declaration is missed); returns its slices.
    pub fn slices_for(&self, namespace: &str, name: &str, pods: bool) -> Vec<Arc<EndpointSlice>> {
        let key = (namespace.to_string(), name.to_string());
        let mut index = self.lock();
        if !pods {
            index.wanted.remove(&key);
            return vec![];
        }
        let slices = index
            .slices
            .get(&key)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        index.wanted.insert(key);
        slices
    }

    /// The Service's slices, read only (the prune's view of every Service).
    pub fn slices(&self, namespace: &str, name: &str) -> Vec<Arc<EndpointSlice>> {
        let key = (namespace.to_string(), name.to_string());
        self.lock()
            .slices
            .get(&key)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The Service is gone or no longer ours.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let mut index = self.lock();
        index.wanted.remove(&key);
        index.pending.remove(&key);
    }

    /// Waits until the first list is in.
    pub async fn wait_until_ready(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|synced| *synced).await;
    }

    /// Applies one watch event.
    fn apply(&self, event: watcher::Event<EndpointSlice>) {
        let mut guard = self.lock();
        let index = &mut *guard;
        match event {
            watcher::Event::Apply(slice) => {
                let Some(key) = owner(&slice) else { return };
                let name = slice.name_any();
                let entry = index.slices.entry(key.clone()).or_default();
                let new = Arc::new(slice);
                let changed = entry.get(&name).is_none_or(|old| **old != *new);
                entry.insert(name, new);
                if changed && index.wanted.contains(&key) {
                    index.pending.insert(key);
                }
            }
            watcher::Event::Delete(slice) => {
                let Some(key) = owner(&slice) else { return };
                let removed = index
                    .slices
                    .get_mut(&key)
                    .and_then(|s| s.remove(&slice.name_any()))
                    .is_some();
                if index.slices.get(&key).is_some_and(BTreeMap::is_empty) {
                    index.slices.remove(&key);
                }
                if removed && index.wanted.contains(&key) {
                    index.pending.insert(key);
                }
            }
            watcher::Event::Init => index.listing = Some(HashMap::new()),
            watcher::Event::InitApply(slice) => {
                if let (Some(listing), Some(key)) = (index.listing.as_mut(), owner(&slice)) {
                    listing
                        .entry(key)
                        .or_default()
                        .insert(slice.name_any(), Arc::new(slice));
                }
            }
            watcher::Event::InitDone => {
                let listed = index.listing.take().unwrap_or_default();
                let changed: Vec<ServiceKey> = index
                    .wanted
                    .iter()
                    .filter(|k| index.slices.get(*k) != listed.get(*k))
                    .cloned()
                    .collect();
                index.pending.extend(changed);
                index.slices = listed;
                drop(guard);
                self.synced.send_replace(true);
            }
        }
    }

    /// The Services to reconcile now: those whose slices changed since the last batch.
    fn take_batch(&self) -> Vec<ServiceKey> {
        self.lock().pending.drain().collect()
    }
}

/// Watches EndpointSlices (of `namespace`, or all) into `endpoints`, and every `window` sends
/// the Services whose endpoints changed to `tx` (the Service controller's trigger).
pub async fn run(
    client: Client,
    namespace: Option<String>,
    endpoints: Arc<Endpoints>,
    window: Duration,
    tx: futures::channel::mpsc::UnboundedSender<ObjectRef<Service>>,
    metrics: Arc<crate::telemetry::Metrics>,
) {
    let api: Api<EndpointSlice> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let watch = {
        let endpoints = endpoints.clone();
        async move {
            let stream = watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(slim);
            futures::pin_mut!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => endpoints.apply(event),
                    Err(e) => {
                        tracing::warn!(error = %e, resource = "endpointslices", "watch error (retrying)");
                        metrics.watch_error("endpointslices");
                    }
                }
            }
        }
    };
    let batches = async move {
        let mut tick = tokio::time::interval(window);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (ns, name) in endpoints.take_batch() {
                if tx
                    .unbounded_send(ObjectRef::new(&name).within(&ns))
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = watch => {}
        _ = batches => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, service: &str, ip: &str, ready: bool) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": "1",
                "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}]
        }))
        .map(|mut s| {
            slim(&mut s);
            s
        })
        .expect("slice")
    }

    fn apply(e: &Endpoints, event: watcher::Event<EndpointSlice>) {
        let event = match event {
            watcher::Event::Apply(mut s) => {
                slim(&mut s);
                watcher::Event::Apply(s)
            }
            other => other,
        };
        e.apply(event);
    }

    #[test]
    fn only_changes_of_wanted_services_make_a_batch_and_each_service_once() {
        let e = Endpoints::default();
        list(&e, &[("web-a", "web", "10.0.0.1")]);
        assert!(
            e.take_batch().is_empty(),
            "the first list reconciles nothing"
        );
        assert_eq!(e.slices_for("ns", "web", true).len(), 1);

        apply(
            &e,
            watcher::Event::Apply(slice("other-a", "other", "10.0.0.9", true)),
        );
        assert!(e.take_batch().is_empty(), "not a Service with pod targets");

        let mut same = slice("web-a", "web", "10.0.0.1", true);
        same.metadata.resource_version = Some("2".into());
        apply(&e, watcher::Event::Apply(same));
        assert!(
            e.take_batch().is_empty(),
            "a new resourceVersion alone is no change"
        );

        for (i, ready) in [false, true, false, true].into_iter().enumerate() {
            let ip = format!("10.0.0.{}", i + 2);
            apply(&e, watcher::Event::Apply(slice("web-b", "web", &ip, ready)));
        }
        assert_eq!(
            e.take_batch(),
            vec![("ns".to_string(), "web".to_string())],
            "four changes in one window: one reconcile"
        );
        assert!(e.take_batch().is_empty());

        apply(&e, watcher::Event::Delete(slice("web-b", "web", "", true)));
        assert_eq!(e.take_batch().len(), 1, "a slice removed");
        assert_eq!(e.slices_for("ns", "web", false).len(), 0, "no longer pods");
        apply(&e, watcher::Event::Delete(slice("web-a", "web", "", true)));
        assert!(e.take_batch().is_empty(), "no longer wanted");
    }

    /// A (re)list of `slices` (name, Service, address).
    fn list(e: &Endpoints, slices: &[(&str, &str, &str)]) {
        e.apply(watcher::Event::Init);
        for (name, service, ip) in slices {
            e.apply(watcher::Event::InitApply(slice(name, service, ip, true)));
        }
        e.apply(watcher::Event::InitDone);
    }

    #[test]
    fn a_relist_reconciles_the_wanted_services_whose_slices_differ() {
        let e = Endpoints::default();
        list(&e, &[("a-1", "a", "10.0.0.1"), ("b-1", "b", "10.0.0.2")]);
        e.slices_for("ns", "a", true);
        e.slices_for("ns", "b", true);
        list(&e, &[("a-1", "a", "10.0.0.1"), ("b-1", "b", "10.0.0.3")]);
        assert_eq!(e.take_batch(), vec![("ns".to_string(), "b".to_string())]);
    }
}
