//! kube-runtime glue: watch Services, Nodes and LoadBalancerClasses, run the pipeline, manage the
//! finalizer, write status, record Events.

pub mod cache;
mod checkpoint;
pub mod class_status;
pub mod decide;
pub mod endpoints;
pub mod events;
pub mod memory;
pub mod orphans;
pub mod readiness;
mod replace;
pub mod service;
pub mod status;

use crate::config::class::{LoadBalancerClass, ProviderKind};
use crate::provider::Provider;
pub use cache::CacheEntry;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

pub use crate::ownership::{FINALIZER, INSTALLATION_ANNOTATION, PROVIDER_ANNOTATION};

/// The installation name when none is given (the chart passes its release name).
pub const DEFAULT_INSTALLATION: &str = "cloudlb";

/// Operator settings (flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Cluster name: in cloud names, ownership tags and subnet discovery.
    pub cluster: String,
    /// This installation's name, recorded on the Services it owns
    /// ([`INSTALLATION_ANNOTATION`]): it never touches a Service recorded for another.
    pub installation: String,
    /// Watch only this namespace (default: all).
    pub namespace: Option<String>,
    /// Serve only these LoadBalancerClasses (default: all).
    pub classes: Option<Vec<String>>,
    /// Full re-verification against the cloud (drift repair) at this interval, jittered ±10%.
    pub resync: Duration,
    /// Requeue interval while a load balancer is provisioning.
    pub provisioning_requeue: Duration,
    /// Orphan sweep interval (leftovers of Services that are gone).
    pub orphan_sweep: Duration,
    /// Reconciles running at once (bounds memory; the cloud rate limits bound throughput).
    pub concurrency: u16,
    /// Pod targets: endpoint changes of one Service within this window are applied together
    /// (one (de)register call per target group per window, however fast the endpoints flap).
    pub endpoint_window: Duration,
    /// Name reported on Events.
    pub reporter: String,
}

impl Settings {
    pub fn new(cluster: impl Into<String>) -> Self {
        Settings {
            cluster: cluster.into(),
            installation: DEFAULT_INSTALLATION.into(),
            namespace: None,
            classes: None,
            resync: Duration::from_secs(600),
            provisioning_requeue: Duration::from_secs(5),
            orphan_sweep: Duration::from_secs(600),
            concurrency: 32,
            endpoint_window: Duration::from_secs(1),
            reporter: "cloudlb".into(),
        }
    }
}

/// The providers this operator instance can use.
#[derive(Clone, Default)]
pub struct Providers {
    pub aws: Option<Arc<dyn Provider>>,
    /// The in-process load balancer (kept typed for its health events).
    pub local: Option<Arc<crate::provider::local::LocalProvider>>,
}

impl Providers {
    /// Every configured provider.
    pub fn all(&self) -> Vec<Arc<dyn Provider>> {
        let local = self.local.clone().map(|l| l as Arc<dyn Provider>);
        self.aws.iter().cloned().chain(local).collect()
    }

    pub fn get(&self, kind: ProviderKind) -> Option<Arc<dyn Provider>> {
        match kind {
            ProviderKind::Aws => self.aws.clone(),
            ProviderKind::Local => self.local.clone().map(|l| l as Arc<dyn Provider>),
        }
    }
}

/// Keeps only what eligibility and targets read (name, labels, deletion mark, provider id, taints,
/// addresses): real Nodes carry kilobytes of image lists, conditions and managed fields each,
/// and the store holds every Node for the life of the process.
fn slim_node(node: &mut Node) {
    let meta = &mut node.metadata;
    meta.managed_fields = None;
    meta.annotations = None;
    if let Some(status) = node.status.take() {
        node.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            addresses: status.addresses,
            ..Default::default()
        });
    }
    if let Some(spec) = node.spec.as_mut() {
        spec.config_source = None;
        spec.pod_cidrs = None;
    }
}

/// Drops what we never read and the store would otherwise keep for every Service: managed
/// fields and `kubectl apply`'s copy of the whole object.
fn slim_service(svc: &mut Service) {
    let meta = &mut svc.metadata;
    meta.managed_fields = None;
    if let Some(a) = meta.annotations.as_mut() {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// Everything of a Service but its resourceVersion and our checkpoint, hashed: a watch event
/// whose only change is the checkpoint written after an apply reconciles nothing again (after a
/// batch of endpoint changes that would apply the next ones at once, outside their window).
fn service_inputs(svc: &Service) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut v = serde_json::to_value(svc).ok()?;
    if let Some(meta) = v.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        meta.remove("resourceVersion");
        if let Some(a) = meta.get_mut("annotations").and_then(|a| a.as_object_mut()) {
            a.remove(crate::model::checkpoint::CHECKPOINT_ANNOTATION);
        }
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    Some(h.finish())
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub providers: Providers,
    pub recorder: events::Recorder,
    pub nodes: Store<Node>,
    pub classes: Store<LoadBalancerClass>,
    /// The EndpointSlices of the Services with pod targets.
    pub endpoints: Arc<endpoints::Endpoints>,
    /// What is remembered about each Service between reconciles.
    pub memory: memory::Memory,
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Wakes the pruning of what load balancers share (a Service's load balancer was removed).
    pub prune: tokio::sync::Notify,
}

impl Context {
    /// The classes this instance serves.
    pub fn served_classes(&self) -> Vec<LoadBalancerClass> {
        self.classes
            .state()
            .iter()
            .filter(|c| crate::ownership::serves(self.settings.classes.as_deref(), c))
            .map(|c| (**c).clone())
            .collect()
    }

    /// What this installation does with `svc`, given the classes it serves (`served`, from
    /// [`Context::served_classes`]).
    pub fn ownership<'a>(
        &self,
        svc: &Service,
        served: &'a [LoadBalancerClass],
    ) -> crate::ownership::Ownership<'a> {
        crate::ownership::ownership(svc, served, &self.settings.installation)
    }
}

/// Hash of what in a Node decides eligibility and targets (name, eligibility, labels, provider
/// id, InternalIP, taint keys); heartbeats and other status updates leave it unchanged.
fn node_digest(n: &Node) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    n.metadata.name.hash(&mut h);
    crate::build::node_eligible(n).hash(&mut h);
    n.metadata.labels.hash(&mut h);
    n.spec
        .as_ref()
        .and_then(|s| s.provider_id.as_ref())
        .hash(&mut h);
    crate::build::internal_ip(n).hash(&mut h);
    if let Some(taints) = n.spec.as_ref().and_then(|s| s.taints.as_ref()) {
        for t in taints {
            t.key.hash(&mut h);
        }
    }
    h.finish()
}

/// Per-Node digests, kept up to date from the watch events: says whether an event changed the
/// eligible node set or a target (O(1) per event, not a pass over every Node).
#[derive(Default)]
struct NodeDigests {
    current: HashMap<String, u64>,
    /// While a (re)list is in progress: the Nodes listed so far.
    listing: Option<HashMap<String, u64>>,
    synced: bool,
}

impl NodeDigests {
    /// Applies one watch event; true if it changed anything a Service's targets depend on
    /// (never for the first list: every Service is reconciled at start anyway).
    fn apply(&mut self, event: watcher::Event<Node>) -> bool {
        use kube::ResourceExt;
        match event {
            watcher::Event::Apply(n) => {
                let d = node_digest(&n);
                let before = self.current.insert(n.name_any(), d);
                self.synced && before != Some(d)
            }
            watcher::Event::Delete(n) => {
                self.synced && self.current.remove(&n.name_any()).is_some()
            }
            watcher::Event::Init => {
                self.listing = Some(HashMap::new());
                false
            }
            watcher::Event::InitApply(n) => {
                if let Some(l) = self.listing.as_mut() {
                    l.insert(n.name_any(), node_digest(&n));
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let changed = self.synced && listed != self.current;
                self.current = listed;
                self.synced = true;
                changed
            }
        }
    }
}

/// Runs the operator until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: Settings,
    providers: Providers,
    metrics: Arc<crate::telemetry::Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let shutdown = shutdown.boxed().shared();
    // Set once the caches synced and the controller runs: from then on a shutdown lets the
    // running reconciles finish; before, there is nothing to finish and we stop at once.
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let services: Api<Service> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (nodes, node_writer) = reflector::store();
    let (classes, class_writer) = reflector::store();
    let (node_tx, node_rx) = futures::channel::mpsc::channel::<()>(1);
    let (class_tx, class_rx) = futures::channel::mpsc::channel::<()>(1);

    let node_task = watch_nodes(&client, node_writer, node_tx, metrics.clone());
    let class_task = watch_classes(&client, class_writer, class_tx, metrics.clone());
    let endpoints = Arc::new(endpoints::Endpoints::default());
    let (endpoint_tx, endpoint_rx) = futures::channel::mpsc::unbounded();
    let endpoint_task = endpoints::run(
        client.clone(),
        settings.namespace.clone(),
        endpoints.clone(),
        settings.endpoint_window,
        endpoint_tx,
        metrics.clone(),
    );

    let recorder = events::Recorder::new(client.clone(), settings.reporter.clone());
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings,
        providers,
        recorder,
        nodes: nodes.clone(),
        classes: classes.clone(),
        endpoints: endpoints.clone(),
        memory: memory::Memory::default(),
        metrics,
        prune: tokio::sync::Notify::new(),
    });

    let trigger = futures::stream::select(node_rx, class_rx);
    let (controller_task, svc_store) = service_controller(
        ctx.clone(),
        services,
        Triggers {
            all: trigger,
            some: endpoint_rx,
        },
        shutdown.clone(),
    );
    let status_task = class_status::run(ctx.clone(), svc_store.clone());
    let orphan_task = orphans::run(ctx.clone(), svc_store.clone(), ctx.settings.orphan_sweep);
    let prune_task = orphans::prune_shared(ctx.clone(), svc_store, ctx.settings.orphan_sweep);
    let health_task = local_health_events(ctx.clone());
    // Wait for the node, class and endpoint caches before the first reconcile can use them.
    let ready = || {
        let (nodes, classes, endpoints) = (nodes.clone(), classes.clone(), endpoints.clone());
        async move {
            let _ = nodes.wait_until_ready().await;
            let _ = classes.wait_until_ready().await;
            endpoints.wait_until_ready().await;
        }
    };
    tokio::select! {
        _ = node_task => {}
        _ = class_task => {}
        _ = endpoint_task => {}
        _ = status_task => {}
        _ = async {
            ready().await;
            ctx.metrics.set_ready(true);
            started.store(true, std::sync::atomic::Ordering::SeqCst);
            controller_task.await
        } => {}
        _ = async {
            shutdown.clone().await;
            if started.load(std::sync::atomic::Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
        } => {
            tracing::info!("shutdown before the caches synced: nothing in flight");
        }
        _ = async { ready().await; orphan_task.await } => {}
        _ = async { ready().await; prune_task.await } => {}
        _ = health_task => {}
    }
}

/// What reconciles Services besides their own changes.
struct Triggers<A, S> {
    /// Every Service (node and class changes).
    all: A,
    /// One Service (a batch of endpoint changes).
    some: S,
}

/// The Service controller: reconciles each Service (of `services`) as it changes, all of them
/// on every `triggers.all` and one on `triggers.some`; stops taking new work when `shutdown`
/// resolves and ends when the running reconciles are done. Also returns its Service cache.
fn service_controller(
    ctx: Arc<Context>,
    services: Api<Service>,
    triggers: Triggers<
        impl futures::Stream<Item = ()> + Send + 'static,
        impl futures::Stream<Item = kube::runtime::reflector::ObjectRef<Service>> + Send + 'static,
    >,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) -> (
    impl std::future::Future<Output = ()>,
    reflector::Store<Service>,
) {
    let (store, writer) = reflector::store();
    let stream = watcher(services, watcher::Config::default())
        .default_backoff()
        .modify(slim_service)
        .reflect(writer)
        .applied_objects()
        .predicate_filter(service_inputs, Default::default());
    let task = Controller::for_stream(stream, store.clone())
        .with_config(
            kube::runtime::controller::Config::default()
                .concurrency(ctx.settings.concurrency)
                .debounce(Duration::from_millis(200)),
        )
        .reconcile_all_on(triggers.all)
        .reconcile_on(triggers.some)
        .graceful_shutdown_on(shutdown)
        .run(service::reconcile, service::error_policy, ctx.clone())
        .for_each(dispatched(ctx.metrics.clone()));
    (task, store)
}

/// Watches Nodes into `writer`; signals `tx` (reconcile every Service) when the eligible node set
/// or a target address changes, not on heartbeats.
fn watch_nodes(
    client: &Client,
    writer: reflector::store::Writer<Node>,
    tx: futures::channel::mpsc::Sender<()>,
    metrics: Arc<crate::telemetry::Metrics>,
) -> impl std::future::Future<Output = ()> {
    let stream = watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .modify(slim_node)
        .reflect(writer);
    let mut digests = NodeDigests::default();
    signal_changes(stream, "nodes", metrics, tx, move |event| {
        digests.apply(event)
    })
}

/// Watches LoadBalancerClasses into `writer`; every change signals `tx`.
fn watch_classes(
    client: &Client,
    writer: reflector::store::Writer<LoadBalancerClass>,
    tx: futures::channel::mpsc::Sender<()>,
    metrics: Arc<crate::telemetry::Metrics>,
) -> impl std::future::Future<Output = ()> {
    let api = Api::<LoadBalancerClass>::all(client.clone());
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    signal_changes(stream, "loadbalancerclasses", metrics, tx, |event| {
        !matches!(event, watcher::Event::Init | watcher::Event::InitDone)
    })
}

/// Drives a watch (its store is filled by `.reflect` upstream), counting its errors under
/// `resource`, and signals `tx` for every event that `changes` says alters a reconcile's input.
async fn signal_changes<K>(
    stream: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
    resource: &'static str,
    metrics: Arc<crate::telemetry::Metrics>,
    mut tx: futures::channel::mpsc::Sender<()>,
    mut changes: impl FnMut(watcher::Event<K>) -> bool,
) {
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => {
                if changes(event) {
                    let _ = tx.try_send(());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, resource, "watch error (retrying)");
                metrics.watch_error(resource);
            }
        }
    }
}

type Dispatched = Result<
    (
        kube::runtime::reflector::ObjectRef<Service>,
        kube::runtime::controller::Action,
    ),
    kube::runtime::controller::Error<service::Error, kube::runtime::watcher::Error>,
>;

/// What the controller reports per reconcile: Service watch errors are counted; reconcile
/// errors were reported by the reconcile itself.
fn dispatched(
    metrics: Arc<crate::telemetry::Metrics>,
) -> impl FnMut(Dispatched) -> std::future::Ready<()> {
    move |res| {
        match res {
            Err(kube::runtime::controller::Error::QueueError(e)) => {
                tracing::warn!(error = %e, "Service watch error (retrying)");
                metrics.watch_error("services");
            }
            Err(e) => tracing::debug!(error = %e, "reconcile dispatch"),
            Ok(_) => {}
        }
        std::future::ready(())
    }
}

/// `cloudlb plan`: for each Service, what reconciling it would change (read-only).
pub async fn plan_all(
    client: Client,
    settings: &Settings,
    providers: &Providers,
) -> Result<String, kube::Error> {
    use kube::ResourceExt;
    use kube::api::ListParams;
    use std::fmt::Write;
    let services: Api<Service> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let classes: Vec<LoadBalancerClass> = Api::<LoadBalancerClass>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|c| crate::ownership::serves(settings.classes.as_deref(), c))
        .collect();
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let slices: Api<EndpointSlice> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let slices = slices.list(&ListParams::default()).await?.items;
    let backends = crate::build::Backends {
        nodes: &nodes,
        endpoint_slices: &slices,
        gate_waiting: crate::build::NO_GATE_WAITING,
    };
    let mut out = String::new();
    for svc in services.list(&ListParams::default()).await?.items {
        let key = format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any());
        use crate::ownership::Ownership;
        let (class, adopted) =
            match crate::ownership::ownership(&svc, &classes, &settings.installation) {
                Ownership::Ours { class, adopted } => (class, adopted),
                Ownership::NotOurs => continue,
                Ownership::Release => {
                    let _ = writeln!(
                        out,
                        "{key}: no longer ours: its load balancer would be deleted"
                    );
                    continue;
                }
                Ownership::Unserved { class } => {
                    let class =
                        class.map_or_else(|| "no default class".into(), |c| format!("class {c}"));
                    let _ = writeln!(
                        out,
                        "{key}: {class} is not served: its load balancer is kept as it is"
                    );
                    continue;
                }
                Ownership::Declined { class, reason } => {
                    let class = class.name_any();
                    let _ = writeln!(
                        out,
                        "{key} (default class {class}): not adopted: {}",
                        reason.summary()
                    );
                    continue;
                }
            };
        let line = match plan_one(settings, providers, class, &svc, &backends).await {
            Ok(p) if p.is_empty() => "up to date".to_string(),
            Ok(p) => {
                let ops: Vec<String> = p
                    .ops
                    .iter()
                    .map(|o| serde_json::to_string(o).unwrap_or_default())
                    .collect();
                format!("{} change(s):\n  {}", ops.len(), ops.join("\n  "))
            }
            Err(e) => format!("error: {e}"),
        };
        let adopted = if adopted { ", adopted" } else { "" };
        let _ = writeln!(out, "{key} (class {}{adopted}): {line}", class.name_any());
    }
    Ok(out)
}

async fn plan_one(
    settings: &Settings,
    providers: &Providers,
    class: &LoadBalancerClass,
    svc: &Service,
    backends: &crate::build::Backends<'_, Node, k8s_openapi::api::discovery::v1::EndpointSlice>,
) -> Result<crate::plan::Plan, String> {
    let provider = providers
        .get(class.spec.provider)
        .ok_or_else(|| format!("provider {} is not enabled", class.spec.provider))?;
    let cfg = crate::config::resolve(class, svc).map_err(|e| e.to_string())?;
    let built = crate::build::build(&settings.cluster, svc, backends.clone(), &cfg)
        .map_err(|e| e.to_string())?;
    let observed = provider
        .observe(&built.desired)
        .await
        .map_err(|e| e.to_string())?;
    provider
        .plan(&built.desired, &observed)
        .map_err(|e| e.to_string())
}

/// Turns the local provider's health changes into Events on the Service: a Warning when a target
/// group has no healthy target left (traffic still goes to all of them: fail open, like an NLB),
/// a Normal one when it recovers.
async fn local_health_events(ctx: Arc<Context>) {
    let Some(local) = ctx.providers.local.clone() else {
        return std::future::pending().await;
    };
    let mut rx = local.health_events();
    let mut down: std::collections::HashSet<(String, String)> = std::collections::HashSet::new();
    loop {
        let ev = match rx.recv().await {
            Ok(ev) => ev,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "missed local health events");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                return std::future::pending().await;
            }
        };
        let key = (ev.service.uid.clone(), ev.target_group.clone());
        let event = if ev.healthy == 0 && ev.total > 0 {
            down.insert(key).then(|| {
                let note = format!(
                    "All {} targets of {} failed their health checks; traffic still goes to all of them (fail open)",
                    ev.total, ev.target_group
                );
                (events::EventType::Warning, events::ALL_UNHEALTHY, note)
            })
        } else {
            (ev.healthy > 0 && down.remove(&key)).then(|| {
                let note = format!(
                    "{} of {} targets of {} are healthy again",
                    ev.healthy, ev.total, ev.target_group
                );
                (events::EventType::Normal, events::TARGETS_HEALTHY, note)
            })
        };
        if let Some((kind, reason, note)) = event {
            let reference = events::service_ref(&ev.service);
            events::publish_ref(&ctx.recorder, &reference, kind, reason, note).await;
        }
    }
}

#[cfg(test)]
mod node_digest_tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, zone: &str, ready: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
            "spec": {"providerID": format!("aws:///{zone}/i-{name}")},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                "conditions": [{"type": "Ready", "status": ready}]
            }
        }))
        .expect("node")
    }

    fn list(d: &mut NodeDigests, nodes: &[Node]) -> bool {
        let mut changed = d.apply(watcher::Event::Init);
        for n in nodes {
            changed |= d.apply(watcher::Event::InitApply(n.clone()));
        }
        changed | d.apply(watcher::Event::InitDone)
    }

    #[test]
    fn only_changes_that_touch_targets_trigger_a_resync() {
        let mut d = NodeDigests::default();
        let (a, b) = (node("a", "z1", "True"), node("b", "z1", "True"));
        assert!(
            !list(&mut d, &[a.clone(), b.clone()]),
            "the first list triggers nothing"
        );
        assert!(
            !d.apply(watcher::Event::Apply(node("a", "z1", "False"))),
            "a status heartbeat is not a change"
        );
        assert!(
            d.apply(watcher::Event::Apply(node("a", "z2", "True"))),
            "labels changed"
        );
        assert!(
            d.apply(watcher::Event::Apply(node("c", "z1", "True"))),
            "a new node"
        );
        assert!(
            d.apply(watcher::Event::Delete(node("c", "z1", "True"))),
            "a node removed"
        );
        assert!(
            !d.apply(watcher::Event::Delete(node("c", "z1", "True"))),
            "already gone"
        );
        let a2 = node("a", "z2", "True");
        assert!(
            !list(&mut d, &[a2.clone(), b.clone()]),
            "a relist with nothing new"
        );
        assert!(list(&mut d, &[a2]), "a relist that lost a node");
    }
}

#[cfg(test)]
mod service_inputs_tests {
    use super::service_inputs;
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    fn svc(version: &str, annotations: serde_json::Value, port: u16) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": version,
                         "annotations": annotations},
            "spec": {"type": "LoadBalancer", "ports": [{"port": port}]},
        }))
        .expect("a Service")
    }

    #[test]
    fn only_our_checkpoint_and_the_resource_version_are_left_out() {
        let ckpt = crate::model::checkpoint::CHECKPOINT_ANNOTATION;
        let base = service_inputs(&svc("1", json!({ckpt: "a"}), 80));
        assert!(base.is_some());
        assert_eq!(
            base,
            service_inputs(&svc("2", json!({ckpt: "b"}), 80)),
            "a checkpoint write"
        );
        assert_ne!(
            base,
            service_inputs(&svc("2", json!({ckpt: "a", "x": "y"}), 80)),
            "another annotation"
        );
        assert_ne!(
            base,
            service_inputs(&svc("2", json!({ckpt: "a"}), 81)),
            "the spec"
        );
    }
}
