//! The Kubernetes watch (`sluiced --kubeconfig PATH | --master URL`, or in-cluster config when
//! sluiced runs in a pod): Services, EndpointSlices and Nodes from a kube-apiserver, through
//! kube-runtime watchers (paged lists, 410 → relist, default backoff), into the same store and
//! incremental path as `sluicectl apply` and `--manifests`.
//!
//! - Services and EndpointSlices: label selector
//!   `!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless` (kube-proxy's,
//!   on both). EndpointSlices: `discovery.k8s.io/v1`, or `v1beta1` where the server has no
//!   v1 (1.20); both become the one slice model (`topology["kubernetes.io/hostname"]` → `nodeName`,
//!   `topology["topology.kubernetes.io/zone"]` → `zone`).
//! - Nodes: all of them, not only this node's (kube-proxy watches its own with a field selector):
//!   sluice is also the CNI, and routes to every node's pod CIDR and accepts tunnelled packets
//!   only from known nodes. This node's Node also gives `nodeEligible` (being deleted, or tainted
//!   `ToBeDeletedByClusterAutoscaler`) for `/healthz`.
//!
//! [`Index`] is the pure part (no I/O; unit-tested with synthetic event streams):
//! - nothing is handed on until Services, EndpointSlices and Nodes have all finished their first
//!   list, and that first batch holds everything: a restarted daemon with pinned maps never
//!   programs, or prunes, from half a list;
//! - a relist (after a 410 or a reconnect) is buffered from `Init` to `InitDone` and then diffed
//!   against what the source holds: objects that vanished meanwhile are deleted (no Delete events
//!   come for them);
//! - a change is the last state of each key since the previous batch: delete + recreate (a new
//!   clusterIP) in one batch is one change, a no-op update (a resync, a status-only change) none;
//! - an object sluice's validation rejects keeps its previous version (the error is in the status).
//!
//! Batching: events are gathered until the stream is quiet for [`QUIET`] (10 ms) or [`MAX_BATCH`]
//! (100 ms) after the first, then written as one change. One edit reaches the maps ~10 ms after
//! its event; a controller's burst (a Service and its slices, a rollout's slice updates) is one
//! diff and one set of map writes, as Cilium's 100 ms reflector buffer and kube-proxy's bounded
//! frequency runner do.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::{self, Event as WatchEvent};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use serde_json::Value;

use crate::services::objects::{self, Kind, ObjectKey, Spec, Typed};
use crate::services::store::same;
use crate::services::FastMap;

/// kube-proxy's Service label selector: Services another proxy serves, and headless ones, are not
/// listed at all.
pub const SERVICE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";
/// The taint the cluster autoscaler puts on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// A batch is written once the stream was quiet this long...
pub const QUIET: Duration = Duration::from_millis(10);
/// ...or this long after its first event.
pub const MAX_BATCH: Duration = Duration::from_millis(100);

/// How sluiced finds the API server.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// `--kubeconfig`.
    pub kubeconfig: Option<PathBuf>,
    /// `--master`: the API server's URL (over the kubeconfig's, as kube-proxy's flag).
    pub master: Option<String>,
    /// Neither flag, in a pod: the service account's in-cluster config.
    pub in_cluster: bool,
    /// CNI STATUS reports not ready once the API server has been unreachable this long.
    pub unreachable_limit: Duration,
}

impl KubeOptions {
    /// Whether a watch is configured (otherwise sluiced is standalone).
    pub fn enabled(&self) -> bool {
        self.kubeconfig.is_some() || self.master.is_some() || self.in_cluster
    }

    /// "kubeconfig PATH", "master URL", "in-cluster".
    pub fn describe(&self) -> String {
        match (&self.kubeconfig, &self.master) {
            (Some(k), Some(m)) => format!("kubernetes (kubeconfig {}, master {m})", k.display()),
            (Some(k), None) => format!("kubernetes (kubeconfig {})", k.display()),
            (None, Some(m)) => format!("kubernetes (master {m})"),
            (None, None) => "kubernetes (in-cluster)".into(),
        }
    }
}

/// Whether this process runs in a Kubernetes pod with a service account (in-cluster config).
pub fn in_pod() -> bool {
    std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        && std::path::Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()
}

/// The three watched resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    pub const ALL: [Resource; 3] = [
        Resource::Services,
        Resource::EndpointSlices,
        Resource::Nodes,
    ];

    fn kind(self) -> Kind {
        match self {
            Resource::Services => Kind::Service,
            Resource::EndpointSlices => Kind::EndpointSlice,
            Resource::Nodes => Kind::Node,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::EndpointSlices => "endpointslices",
            Resource::Nodes => "nodes",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One watch event, its object already reduced (or rejected: `Err` with why).
#[derive(Debug, Clone)]
pub enum Change {
    Apply(ObjectKey, Result<Arc<Spec>, String>),
    Delete(ObjectKey),
    /// A (re)list starts: what follows until `InitDone` is the whole resource.
    Init,
    InitApply(ObjectKey, Result<Arc<Spec>, String>),
    InitDone,
}

/// What to write: each key's new state (None: gone), and what the source held before (to put
/// back when the write fails).
#[derive(Debug, Default)]
pub struct Batch {
    pub ops: Vec<(ObjectKey, Option<Arc<Spec>>)>,
    prev: Vec<(ObjectKey, Option<Arc<Spec>>)>,
    /// The first batch: everything the API server has (the source is then loaded).
    pub first: bool,
    /// When the oldest event in it was received.
    pub since: Option<Instant>,
}

/// What the source holds and what is waiting to be written (see the module doc).
#[derive(Debug, Default)]
pub struct Index {
    held: FastMap<ObjectKey, Arc<Spec>>,
    /// Each changed key's latest wanted state since the last batch.
    pending: FastMap<ObjectKey, Option<Arc<Spec>>>,
    /// A (re)list in progress, per resource.
    relist: [Option<FastMap<ObjectKey, Arc<Spec>>>; 3],
    /// Listed completely at least once, per resource.
    listed: [bool; 3],
    /// The first batch was taken.
    started: bool,
    oldest: Option<Instant>,
    /// Objects rejected by validation (kept at their previous version), with why.
    pub rejected: FastMap<ObjectKey, String>,
}

impl Index {
    /// Takes one event of `res`.
    pub fn event(&mut self, res: Resource, change: Change) {
        self.oldest.get_or_insert_with(Instant::now);
        let i = res.index();
        match change {
            Change::Init => self.relist[i] = Some(FastMap::default()),
            Change::InitApply(key, spec) => {
                let spec = self.accept(&key, spec);
                let buf = self.relist[i].get_or_insert_with(FastMap::default);
                if let Some(s) = spec {
                    buf.insert(key, s);
                }
            }
            Change::InitDone => {
                let listed = self.relist[i].take().unwrap_or_default();
                let kind = res.kind();
                // Held or waiting but not listed: gone while the watch was down.
                let gone: Vec<ObjectKey> = self
                    .held
                    .keys()
                    .chain(self.pending.keys())
                    .filter(|k| k.kind == kind && !listed.contains_key(*k))
                    .cloned()
                    .collect();
                for k in gone {
                    self.pending.insert(k, None);
                }
                for (k, s) in listed {
                    self.pending.insert(k, Some(s));
                }
                self.listed[i] = true;
            }
            Change::Apply(key, spec) => {
                if let Some(s) = self.accept(&key, spec) {
                    self.pending.insert(key, Some(s));
                }
            }
            Change::Delete(key) => {
                self.rejected.remove(&key);
                self.pending.insert(key, None);
            }
        }
    }

    /// The spec to use for `key`: the new one, or for a rejected object its previous one.
    fn accept(&mut self, key: &ObjectKey, spec: Result<Arc<Spec>, String>) -> Option<Arc<Spec>> {
        match spec {
            Ok(s) => {
                self.rejected.remove(key);
                Some(s)
            }
            Err(e) => {
                self.rejected.insert(key.clone(), e);
                match self.pending.get(key) {
                    Some(p) => p.clone(),
                    None => self.held.get(key).cloned(),
                }
            }
        }
    }

    /// Whether `key` is (or is about to be) held.
    pub fn wants(&self, key: &ObjectKey) -> bool {
        match self.pending.get(key) {
            Some(p) => p.is_some(),
            None => self.held.contains_key(key),
        }
    }

    /// Every resource has finished its first list.
    pub fn listed(&self) -> bool {
        self.listed.iter().all(|l| *l)
    }

    pub fn listed_of(&self, res: Resource) -> bool {
        self.listed[res.index()]
    }

    /// Objects held.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Keys waiting to be written.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// When the oldest event not yet written came (None: everything is written).
    pub fn oldest_pending(&self) -> Option<Instant> {
        self.oldest
    }

    /// The changes to write, no-ops left out; None until every resource has listed once (and
    /// then the first batch is everything). The source holds the batch from now on: give it
    /// back with [`Index::restore`] if the write fails.
    pub fn take(&mut self) -> Option<Batch> {
        if !self.listed() || self.relist.iter().any(Option::is_some) && !self.started {
            return None;
        }
        let mut b = Batch {
            first: !self.started,
            since: self.oldest.take(),
            ..Batch::default()
        };
        self.started = true;
        for (k, want) in self.pending.drain() {
            let had = self.held.get(&k).cloned();
            if same(had.as_ref(), want.as_ref()) {
                continue;
            }
            match &want {
                Some(s) => self.held.insert(k.clone(), s.clone()),
                None => self.held.remove(&k),
            };
            b.prev.push((k.clone(), had));
            b.ops.push((k, want));
        }
        // Services before their slices, deletes of slices before their Service's: not needed
        // for correctness (the model joins at sync), but the log reads in order.
        Some(b)
    }

    /// Puts back a batch whose write failed: the source holds what it held, and the batch's
    /// changes wait again (under any newer ones) for the next batch.
    pub fn restore(&mut self, b: Batch) {
        for (k, had) in b.prev {
            match had {
                Some(s) => self.held.insert(k, s),
                None => self.held.remove(&k),
            };
        }
        for (k, want) in b.ops {
            self.pending.entry(k).or_insert(want);
        }
        if b.first {
            self.started = false;
        }
        self.oldest = match (b.since, self.oldest) {
            (Some(a), Some(o)) => Some(a.min(o)),
            (a, o) => a.or(o),
        };
    }
}

/// How the watch is doing: for CNI STATUS, `sluicectl status`, `/healthz` and `/metrics`.
#[derive(Debug, Clone)]
pub struct WatchStatus {
    pub source: String,
    /// The API server's URL (once a client was made) and version.
    pub server: String,
    pub server_version: String,
    /// "discovery.k8s.io/v1" or "discovery.k8s.io/v1beta1".
    pub slice_version: String,
    /// Listed completely at least once, per resource.
    pub listed: [bool; 3],
    /// When the first full batch was written (the dataplane is in sync with the cluster).
    pub synced_at: Option<SystemTime>,
    /// When the maps last matched everything received.
    pub last_updated: Option<SystemTime>,
    /// The oldest event received and not yet written.
    pub oldest_pending: Option<Instant>,
    pub pending: usize,
    pub last_error: String,
    /// Since when the API server is unreachable (None: it answers).
    pub unreachable_since: Option<Instant>,
    pub unreachable_limit: Duration,
    /// This node's Node is not being deleted (kube-proxy's nodeEligible).
    pub node_eligible: bool,
    pub events: [u64; 3],
    pub errors: [u64; 3],
    /// Objects held, and rejected by validation.
    pub objects: usize,
    pub rejected: usize,
}

pub type Shared = Arc<Mutex<WatchStatus>>;

impl WatchStatus {
    pub fn new(opts: &KubeOptions) -> WatchStatus {
        WatchStatus {
            source: opts.describe(),
            server: String::new(),
            server_version: String::new(),
            slice_version: String::new(),
            listed: [false; 3],
            synced_at: None,
            last_updated: None,
            oldest_pending: None,
            pending: 0,
            last_error: String::new(),
            unreachable_since: None,
            unreachable_limit: opts.unreachable_limit,
            node_eligible: true,
            events: [0; 3],
            errors: [0; 3],
            objects: 0,
            rejected: 0,
        }
    }

    /// Whether pods may be set up (CNI STATUS): the first full sync is done and the API server
    /// has not been unreachable longer than the limit. Err: why not.
    pub fn ready(&self) -> Result<(), String> {
        if self.synced_at.is_none() {
            let waiting: Vec<&str> = Resource::ALL
                .iter()
                .filter(|r| !self.listed[r.index()])
                .map(|r| r.name())
                .collect();
            return Err(if waiting.is_empty() {
                format!(
                    "the first sync from the API server is not written yet{}",
                    self.error_suffix()
                )
            } else {
                format!(
                    "waiting for the first list of {} from the API server{}",
                    waiting.join(", "),
                    self.error_suffix()
                )
            });
        }
        if let Some(t) = self.unreachable_since {
            if t.elapsed() > self.unreachable_limit {
                return Err(format!(
                    "the API server has been unreachable for {} s (limit {} s){}",
                    t.elapsed().as_secs(),
                    self.unreachable_limit.as_secs(),
                    self.error_suffix()
                ));
            }
        }
        Ok(())
    }

    /// One line for `sluicectl status`.
    pub fn sync_state(&self) -> String {
        let mut out = match self.ready() {
            Ok(()) if self.pending == 0 => "synced".to_string(),
            Ok(()) => format!("synced, {} changes pending", self.pending),
            Err(e) => e,
        };
        if let Some(t) = self.unreachable_since.filter(|_| self.synced_at.is_some()) {
            if t.elapsed() <= self.unreachable_limit {
                out = format!(
                    "{out} (API server unreachable for {} s)",
                    t.elapsed().as_secs()
                );
            }
        }
        if self.rejected > 0 {
            out = format!(
                "{out}; {} objects rejected (kept at their previous version)",
                self.rejected
            );
        }
        out
    }

    /// The API server, its version and the slice version, once found.
    pub fn server_line(&self) -> String {
        if self.server.is_empty() {
            return String::new();
        }
        format!(
            "{} ({}, EndpointSlices {})",
            self.server, self.server_version, self.slice_version
        )
    }

    fn error_suffix(&self) -> String {
        if self.last_error.is_empty() {
            String::new()
        } else {
            format!(": {}", self.last_error)
        }
    }

    fn unreachable(&mut self, error: String) {
        self.unreachable_since.get_or_insert_with(Instant::now);
        self.last_error = error;
    }

    fn reachable(&mut self) {
        self.unreachable_since = None;
    }
}

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, WatchStatus> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// A client for `opts`.
async fn client(opts: &KubeOptions) -> Result<(Client, String)> {
    let mut config = match (&opts.kubeconfig, &opts.master) {
        (Some(path), _) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        (None, Some(m)) => kube::Config::new(m.parse().with_context(|| format!("--master {m:?}"))?),
        (None, None) => kube::Config::incluster().context("in-cluster config")?,
    };
    if let Some(m) = &opts.master {
        config.cluster_url = m.parse().with_context(|| format!("--master {m:?}"))?;
    }
    let url = config.cluster_url.to_string();
    Ok((
        Client::try_from(config).context("making the Kubernetes client")?,
        url,
    ))
}

/// This node's pod CIDR from its Node (`spec.podCIDRs`' IPv4 one, else `spec.podCIDR`): for a
/// sluiced without `--pod-cidr` (a DaemonSet cannot pass one per node; kube-controller-manager
/// `--allocate-node-cidrs` sets it). Ok(None): the Node has none (yet).
pub async fn own_pod_cidr(opts: &KubeOptions, node: &str) -> Result<Option<String>> {
    let (c, url) = client(opts).await?;
    let n = Api::<Node>::all(c)
        .get_opt(node)
        .await
        .with_context(|| format!("reading Node {node} from {url}"))?
        .with_context(|| format!("there is no Node {node} at {url}"))?;
    let spec = n.spec.unwrap_or_default();
    Ok(spec
        .pod_cidrs
        .unwrap_or_default()
        .into_iter()
        .find(|c| !c.contains(':'))
        .or(spec.pod_cidr.filter(|c| !c.contains(':'))))
}

/// The EndpointSlice version the server serves: v1, else v1beta1.
async fn slice_resource(client: &Client) -> Result<ApiResource> {
    let groups = client
        .list_api_groups()
        .await
        .context("listing the API groups")?;
    let versions: Vec<String> = groups
        .groups
        .iter()
        .find(|g| g.name == "discovery.k8s.io")
        .map(|g| g.versions.iter().map(|v| v.version.clone()).collect())
        .unwrap_or_default();
    let version = if versions.iter().any(|v| v == "v1") {
        "v1"
    } else if versions.iter().any(|v| v == "v1beta1") {
        "v1beta1"
    } else {
        bail!("the API server serves no EndpointSlices (discovery.k8s.io v1 or v1beta1)");
    };
    Ok(ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
        "endpointslices",
    ))
}

/// A v1beta1 slice's endpoints in v1's shape: `topology` → `nodeName` and `zone`.
pub fn slice_v1beta1_to_v1(v: &mut Value) {
    if let Some(eps) = v.get_mut("endpoints").and_then(Value::as_array_mut) {
        for ep in eps.iter_mut().filter_map(Value::as_object_mut) {
            let Some(Value::Object(topo)) = ep.remove("topology") else {
                continue;
            };
            if !ep.contains_key("nodeName") {
                if let Some(h) = topo.get("kubernetes.io/hostname") {
                    ep.insert("nodeName".into(), h.clone());
                }
            }
            if let Some(z) = topo.get("topology.kubernetes.io/zone") {
                ep.insert("zone".into(), z.clone());
            }
        }
    }
    v["apiVersion"] = Value::from("discovery.k8s.io/v1");
    v["kind"] = Value::from("EndpointSlice");
}

fn key_of(kind: Kind, ns: Option<String>, name: String) -> ObjectKey {
    let ns = match kind {
        Kind::Node => String::new(),
        _ => ns
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
    };
    ObjectKey::new(kind, &ns, &name)
}

fn reduce(key: &ObjectKey, obj: Result<Typed, String>) -> Result<Arc<Spec>, String> {
    let p = objects::from_object(obj?, "kubernetes").map_err(|e| e.to_string())?;
    if p.key != *key {
        return Err(format!("reduced to {} instead of {key}", p.key));
    }
    Ok(Arc::new(p.spec))
}

/// One watch event as a change of `kind`: `spec` reduces an applied object, `deleted` sees the
/// key of a deleted one.
fn change_of<K: ResourceExt>(
    e: WatchEvent<K>,
    kind: Kind,
    spec: impl Fn(&ObjectKey, K) -> Result<Arc<Spec>, String>,
    deleted: impl FnOnce(&ObjectKey),
) -> Change {
    let key = |o: &K| key_of(kind, o.namespace(), o.name_any());
    match e {
        WatchEvent::Apply(o) => {
            let k = key(&o);
            let s = spec(&k, o);
            Change::Apply(k, s)
        }
        WatchEvent::InitApply(o) => {
            let k = key(&o);
            let s = spec(&k, o);
            Change::InitApply(k, s)
        }
        WatchEvent::Delete(o) => {
            let k = key(&o);
            deleted(&k);
            Change::Delete(k)
        }
        WatchEvent::Init => Change::Init,
        WatchEvent::InitDone => Change::InitDone,
    }
}

fn service_change(e: WatchEvent<Service>) -> Change {
    change_of(
        e,
        Kind::Service,
        |k, s| reduce(k, Ok(Typed::Service(s))),
        |_| {},
    )
}

fn slice_change(e: WatchEvent<DynamicObject>, beta: bool) -> Change {
    let typed = |key: &ObjectKey, o: DynamicObject| {
        serde_json::to_value(&o)
            .and_then(|mut v| {
                if beta {
                    slice_v1beta1_to_v1(&mut v);
                } else {
                    v["apiVersion"] = Value::from("discovery.k8s.io/v1");
                    v["kind"] = Value::from("EndpointSlice");
                }
                serde_json::from_value::<EndpointSlice>(v)
            })
            .map(Typed::EndpointSlice)
            .map_err(|e| format!("EndpointSlice {key}: {e}"))
    };
    change_of(
        e,
        Kind::EndpointSlice,
        |k, o| reduce(k, typed(k, o)),
        |_| {},
    )
}

/// Whether a Node may take traffic (kube-proxy's nodeEligible): not being deleted, not tainted
/// for deletion by the cluster autoscaler.
pub fn node_eligible(n: &Node) -> bool {
    n.metadata.deletion_timestamp.is_none()
        && !n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

fn node_change(e: WatchEvent<Node>, own: &str, status: &Shared) -> Change {
    change_of(
        e,
        Kind::Node,
        |k, n| {
            if &*k.name == own {
                lock(status).node_eligible = node_eligible(&n);
            }
            reduce(k, Ok(Typed::Node(n)))
        },
        |k| {
            if &*k.name == own {
                lock(status).node_eligible = false;
            }
        },
    )
}

type Events = Pin<Box<dyn Stream<Item = (Resource, Result<Change, watcher::Error>)> + Send>>;

fn watch_all(client: &Client, slices: &ApiResource, own: &str, status: &Shared) -> Events {
    // Lists may be served from the API server's watch cache (resourceVersion=0), as informers do.
    let config = || watcher::Config::default().any_semantic();
    let services = watcher::watcher(
        Api::<Service>::all(client.clone()),
        config().labels(SERVICE_SELECTOR),
    )
    .default_backoff()
    .map(|r| (Resource::Services, r.map(service_change)));
    let beta = slices.version == "v1beta1";
    // kube-proxy filters slices with the same selector (the EndpointSlice controller copies
    // the Service's labels, headless included).
    let slice_events = watcher::watcher(
        Api::<DynamicObject>::all_with(client.clone(), slices),
        config().labels(SERVICE_SELECTOR),
    )
    .default_backoff()
    .map(move |r| (Resource::EndpointSlices, r.map(|e| slice_change(e, beta))));
    let own = own.to_string();
    let st = status.clone();
    let nodes = watcher::watcher(Api::<Node>::all(client.clone()), config())
        .default_backoff()
        .map(move |r| (Resource::Nodes, r.map(|e| node_change(e, &own, &st))));
    Box::pin(futures::stream::select_all([
        services.boxed(),
        slice_events.boxed(),
        nodes.boxed(),
    ]))
}

/// Writes a batch: Ok(()) when the maps hold it, Err(why) when nothing changed.
pub trait Sink: Send {
    fn write(
        &mut self,
        batch: &Batch,
        held: usize,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Watches until the task is aborted: makes the client (retrying), finds the slice version,
/// then feeds batches to `sink`. Never returns on API errors: they are in `status`, and the
/// watchers back off and retry (a 410 relists).
pub async fn run(opts: KubeOptions, node_name: String, status: Shared, mut sink: impl Sink) {
    let mut backoff = Duration::from_millis(500);
    let (client, slices) = loop {
        let made = async {
            let (c, url) = client(&opts).await?;
            let v = c
                .apiserver_version()
                .await
                .with_context(|| format!("asking the API server at {url} its version"))?;
            let s = slice_resource(&c).await?;
            Ok::<_, anyhow::Error>((c, url, v, s))
        }
        .await;
        match made {
            Ok((c, url, v, s)) => {
                let mut st = lock(&status);
                st.server = url;
                st.server_version = v.git_version.clone();
                st.slice_version = format!("{}/{}", s.group, s.version);
                st.reachable();
                st.last_error.clear();
                tracing::info!(version = %v.git_version, slices = %st.slice_version, "API server found: watching services, endpointslices and nodes");
                break (c, s);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, retry_ms = backoff.as_millis() as u64, "the API server cannot be reached yet");
                lock(&status).unreachable(msg);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    };
    // Aborted with this task (the watch is aborted at shutdown).
    let _probe = AbortOnDrop(tokio::spawn(probe(client.clone(), status.clone())));
    let mut events = watch_all(&client, &slices, &node_name, &status);
    let mut index = Index::default();
    let own = key_of(Kind::Node, None, node_name.clone());
    // After a failed write: when to try again without waiting for an event.
    let mut retry: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            first = events.next() => match first {
                Some(e) => take(&mut index, e, &status, &own),
                None => break,
            },
            _ = async { tokio::time::sleep_until(retry.expect("armed")).await }, if retry.is_some() => {}
        }
        let deadline = tokio::time::Instant::now() + MAX_BATCH;
        loop {
            tokio::select! {
                next = events.next() => match next {
                    Some(e) => take(&mut index, e, &status, &own),
                    None => break,
                },
                _ = tokio::time::sleep(QUIET) => break,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let ok = flush(&mut index, &status, &mut sink).await;
        retry = (!ok).then(|| tokio::time::Instant::now() + RETRY);
    }
}

/// A failed batch is tried again after this long when no event comes first.
const RETRY: Duration = Duration::from_secs(1);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a watcher error is a 410 Expired (routine: the watcher relists), wherever it came.
fn expired(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::WatchError(s) => s.code == 410,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 410,
        _ => false,
    }
}

fn take(
    index: &mut Index,
    (res, item): (Resource, Result<Change, watcher::Error>),
    status: &Shared,
    own: &ObjectKey,
) {
    let mut st = lock(status);
    match item {
        Ok(change) => {
            st.events[res.index()] += 1;
            st.reachable();
            let listing_done = matches!(change, Change::InitDone);
            if let Change::Apply(k, Err(e)) | Change::InitApply(k, Err(e)) = &change {
                tracing::warn!(object = %k, error = %e, "a watched object does not pass sluice's validation: its previous version stays");
            }
            index.event(res, change);
            if listing_done {
                st.listed[res.index()] = true;
                tracing::info!(resource = res.name(), "listed");
                // This node's Node gone while the watch was down: no Delete event said so.
                if res == Resource::Nodes && !index.wants(own) {
                    st.node_eligible = false;
                }
            }
        }
        Err(e) => {
            st.errors[res.index()] += 1;
            let msg = format!("{}: {e}", res.name());
            // 410 Expired is routine (the watcher relists); other errors mean the API server
            // is away or refuses us.
            if expired(&e) {
                tracing::info!(resource = res.name(), "watch expired (410): relisting");
            } else {
                tracing::warn!(error = %msg, "watch error (backing off, then retrying)");
                st.unreachable(msg);
            }
        }
    }
    st.pending = index.pending();
    st.oldest_pending = index.oldest_pending();
}

/// Writes what is waiting; false when the write failed (it waits again, see `run`'s retry).
async fn flush(index: &mut Index, status: &Shared, sink: &mut impl Sink) -> bool {
    let Some(batch) = index.take() else {
        return true;
    };
    if batch.ops.is_empty() && !batch.first {
        let mut st = lock(status);
        st.last_updated = Some(SystemTime::now());
        st.pending = 0;
        st.oldest_pending = None;
        st.rejected = index.rejected.len();
        return true;
    }
    let held = index.held();
    let r = sink.write(&batch, held).await;
    let ok = r.is_ok();
    let mut st = lock(status);
    match r {
        Ok(()) => {
            let now = SystemTime::now();
            if batch.first {
                st.synced_at = Some(now);
            }
            st.last_updated = Some(now);
            st.objects = held;
        }
        Err(e) => {
            tracing::error!(error = %e, changes = batch.ops.len(), "writing a watch batch failed: retried with the next");
            st.last_error = e;
            index.restore(batch);
        }
    }
    st.rejected = index.rejected.len();
    st.pending = index.pending();
    st.oldest_pending = index.oldest_pending();
    ok
}

/// While the API server is unreachable, asks it its version every 2 s (a watcher that reconnects
/// to an unchanged resource yields no event that would say it is back); otherwise every 30 s (a
/// silent network partition shows within that).
async fn probe(client: Client, status: Shared) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let away = lock(&status).unreachable_since.is_some();
        if !away && last.elapsed() < Duration::from_secs(30) {
            continue;
        }
        last = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), client.apiserver_version()).await {
            Ok(Ok(_)) => lock(&status).reachable(),
            Ok(Err(e)) => lock(&status).unreachable(format!("API server: {e}")),
            Err(_) => lock(&status).unreachable("API server: no answer within 5 s".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> (ObjectKey, Arc<Spec>) {
        let p = objects::parse(yaml, "t").unwrap().remove(0);
        (p.key, Arc::new(p.spec))
    }

    fn svc(name: &str, ip: &str) -> (ObjectKey, Arc<Spec>) {
        spec(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n"))
    }

    fn slice(name: &str, svc: &str, ip: &str) -> (ObjectKey, Arc<Spec>) {
        spec(&format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [{ip}]}}]\n"))
    }

    fn apply((k, s): (ObjectKey, Arc<Spec>)) -> Change {
        Change::Apply(k, Ok(s))
    }

    fn init_apply((k, s): (ObjectKey, Arc<Spec>)) -> Change {
        Change::InitApply(k, Ok(s))
    }

    /// Lists every resource with the given objects (Init, InitApply…, InitDone).
    fn list_all(
        ix: &mut Index,
        svcs: Vec<(ObjectKey, Arc<Spec>)>,
        slices: Vec<(ObjectKey, Arc<Spec>)>,
    ) {
        for (res, objs) in [
            (Resource::Services, svcs),
            (Resource::EndpointSlices, slices),
            (Resource::Nodes, vec![]),
        ] {
            ix.event(res, Change::Init);
            for o in objs {
                ix.event(res, init_apply(o));
            }
            ix.event(res, Change::InitDone);
        }
    }

    fn names(b: &Batch) -> Vec<String> {
        let mut v: Vec<String> = b
            .ops
            .iter()
            .map(|(k, s)| format!("{}{}", if s.is_some() { "+" } else { "-" }, k))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn nothing_is_handed_on_until_every_resource_listed_and_then_all_at_once() {
        let mut ix = Index::default();
        ix.event(Resource::Services, Change::Init);
        ix.event(Resource::Services, init_apply(svc("a", "10.96.0.1")));
        ix.event(Resource::Services, Change::InitDone);
        ix.event(Resource::Services, apply(svc("b", "10.96.0.2")));
        assert!(
            ix.take().is_none(),
            "slices have not listed: nothing, not even a partial batch"
        );
        ix.event(Resource::EndpointSlices, Change::Init);
        ix.event(
            Resource::EndpointSlices,
            init_apply(slice("a-1", "a", "10.0.0.1")),
        );
        assert!(ix.take().is_none(), "the slices' list is not done");
        ix.event(Resource::EndpointSlices, Change::InitDone);
        assert!(ix.take().is_none(), "nodes have not listed");
        ix.event(Resource::Nodes, Change::Init);
        ix.event(Resource::Nodes, Change::InitDone);
        let b = ix.take().expect("everything listed");
        assert!(b.first);
        assert_eq!(
            names(&b),
            [
                "+EndpointSlice default/a-1",
                "+Service default/a",
                "+Service default/b"
            ]
        );
        assert!(!ix.take().unwrap().first);
    }

    #[test]
    fn a_relist_deletes_what_vanished_while_the_watch_was_down() {
        let mut ix = Index::default();
        list_all(
            &mut ix,
            vec![svc("a", "10.96.0.1"), svc("b", "10.96.0.2")],
            vec![slice("a-1", "a", "10.0.0.1"), slice("b-1", "b", "10.0.0.2")],
        );
        ix.take().unwrap();
        // 410: the slices relist; b-1 was deleted meanwhile, a-1 unchanged, c-1 new.
        ix.event(Resource::EndpointSlices, Change::Init);
        ix.event(
            Resource::EndpointSlices,
            init_apply(slice("a-1", "a", "10.0.0.1")),
        );
        ix.event(
            Resource::EndpointSlices,
            init_apply(slice("c-1", "b", "10.0.0.3")),
        );
        ix.event(Resource::EndpointSlices, Change::InitDone);
        let b = ix.take().unwrap();
        assert_eq!(
            names(&b),
            ["+EndpointSlice default/c-1", "-EndpointSlice default/b-1"],
            "the unchanged slice is no change, the vanished one a delete; Services untouched"
        );
        assert_eq!(ix.held(), 4);
    }

    #[test]
    fn no_op_updates_write_nothing_and_delete_recreate_is_one_change() {
        let mut ix = Index::default();
        list_all(&mut ix, vec![svc("a", "10.96.0.1")], vec![]);
        ix.take().unwrap();
        ix.event(Resource::Services, apply(svc("a", "10.96.0.1")));
        assert!(
            ix.take().unwrap().ops.is_empty(),
            "the same spec again is no change"
        );
        let (k, _) = svc("a", "10.96.0.1");
        ix.event(Resource::Services, Change::Delete(k.clone()));
        ix.event(Resource::Services, apply(svc("a", "10.96.0.9")));
        let b = ix.take().unwrap();
        assert_eq!(b.ops.len(), 1, "delete + recreate in one batch: one change");
        assert_eq!(b.ops[0].1.as_deref(), Some(&*svc("a", "10.96.0.9").1));
        // Delete then apply the same again: nothing.
        ix.event(Resource::Services, Change::Delete(k.clone()));
        ix.event(Resource::Services, apply(svc("a", "10.96.0.9")));
        assert!(ix.take().unwrap().ops.is_empty());
    }

    #[test]
    fn slices_before_their_service_and_a_rejected_update_keeps_the_previous_version() {
        let mut ix = Index::default();
        list_all(&mut ix, vec![], vec![]);
        ix.take().unwrap();
        ix.event(
            Resource::EndpointSlices,
            apply(slice("a-1", "a", "10.0.0.1")),
        );
        let b = ix.take().unwrap();
        assert_eq!(
            names(&b),
            ["+EndpointSlice default/a-1"],
            "a slice is held without its Service"
        );
        ix.event(Resource::Services, apply(svc("a", "10.96.0.1")));
        assert_eq!(names(&ix.take().unwrap()), ["+Service default/a"]);
        let (k, _) = svc("a", "10.96.0.1");
        ix.event(
            Resource::Services,
            Change::Apply(k.clone(), Err("bad".into())),
        );
        assert!(
            ix.take().unwrap().ops.is_empty(),
            "a rejected update changes nothing"
        );
        assert_eq!(ix.rejected.get(&k).map(String::as_str), Some("bad"));
        // Rejected during a relist: kept, not deleted.
        ix.event(Resource::Services, Change::Init);
        ix.event(
            Resource::Services,
            Change::InitApply(k.clone(), Err("bad".into())),
        );
        ix.event(Resource::Services, Change::InitDone);
        assert!(
            ix.take().unwrap().ops.is_empty(),
            "a rejected object is kept at its previous version"
        );
        ix.event(Resource::Services, apply(svc("a", "10.96.0.2")));
        ix.take().unwrap();
        assert!(ix.rejected.is_empty());
    }

    #[test]
    fn a_failed_write_is_given_back_and_retried_under_newer_changes() {
        let mut ix = Index::default();
        list_all(&mut ix, vec![svc("a", "10.96.0.1")], vec![]);
        let first = ix.take().unwrap();
        ix.restore(first);
        assert_eq!(ix.held(), 0);
        assert!(ix.oldest_pending().is_some());
        let again = ix.take().unwrap();
        assert!(again.first, "the first batch is first again");
        assert_eq!(names(&again), ["+Service default/a"]);
        ix.event(Resource::Services, apply(svc("b", "10.96.0.2")));
        let b = ix.take().unwrap();
        ix.event(Resource::Services, apply(svc("b", "10.96.0.3")));
        ix.restore(b);
        let c = ix.take().unwrap();
        assert_eq!(c.ops.len(), 1);
        assert_eq!(
            c.ops[0].1.as_deref(),
            Some(&*svc("b", "10.96.0.3").1),
            "the newer change wins over the restored one"
        );
        assert!(ix.oldest_pending().is_none());
    }

    #[test]
    fn a_v1beta1_slice_reads_as_v1() {
        let mut v = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "web-a", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080, "protocol": "TCP", "name": "http"}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "z1"}},
                {"addresses": ["10.0.0.2"], "nodeName": "node-b",
                 "topology": {"kubernetes.io/hostname": "other"}}
            ]
        });
        slice_v1beta1_to_v1(&mut v);
        let e: EndpointSlice = serde_json::from_value(v).unwrap();
        assert_eq!(e.endpoints[0].node_name.as_deref(), Some("node-a"));
        assert_eq!(e.endpoints[0].zone.as_deref(), Some("z1"));
        assert_eq!(
            e.endpoints[1].node_name.as_deref(),
            Some("node-b"),
            "nodeName wins over topology"
        );
        let key = key_of(Kind::EndpointSlice, Some("ns".into()), "web-a".into());
        let s = reduce(&key, Ok(Typed::EndpointSlice(e))).unwrap();
        match &*s {
            Spec::EndpointSlice(sl) => {
                assert_eq!(&*sl.service, "web");
                assert_eq!(sl.endpoints[0].node.as_deref(), Some("node-a"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_v1_slice_event_keeps_hints_and_node_names() {
        let obj: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-a", "namespace": "ns", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "node-a", "zone": "z1",
                           "hints": {"forZones": [{"name": "z1"}]}}]
        }))
        .unwrap();
        let Change::Apply(key, Ok(spec)) = slice_change(WatchEvent::Apply(obj.clone()), false)
        else {
            panic!("not an apply")
        };
        assert_eq!(key.to_string(), "EndpointSlice ns/web-a");
        let Spec::EndpointSlice(sl) = &*spec else {
            panic!("{spec:?}")
        };
        assert_eq!(sl.endpoints[0].node.as_deref(), Some("node-a"));
        assert_eq!(sl.endpoints[0].zone_hints, [Arc::<str>::from("z1")]);
        assert!(matches!(
            slice_change(WatchEvent::Delete(obj), false),
            Change::Delete(k) if k == key
        ));
        // A slice this validation rejects: an error, not a panic or a silent drop.
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-b", "namespace": "ns"},
            "addressType": "IPv4", "ports": [{"port": 99999}], "endpoints": []
        }))
        .unwrap();
        assert!(matches!(
            slice_change(WatchEvent::Apply(bad), false),
            Change::Apply(_, Err(_))
        ));
    }

    #[test]
    fn node_eligibility_is_kube_proxys() {
        let mut n: Node =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "a"}})).unwrap();
        assert!(node_eligible(&n));
        n.spec = Some(serde_json::from_value(serde_json::json!({"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]})).unwrap());
        assert!(!node_eligible(&n));
        n.spec = None;
        n.metadata.deletion_timestamp =
            Some(serde_json::from_value(serde_json::json!("2026-12-01T00:00:00Z")).unwrap());
        assert!(!node_eligible(&n));
    }

    #[test]
    fn ready_waits_for_the_first_sync_and_gives_up_after_the_limit() {
        let mut st = WatchStatus::new(&KubeOptions {
            unreachable_limit: Duration::from_millis(50),
            ..KubeOptions::default()
        });
        assert!(st
            .ready()
            .unwrap_err()
            .contains("services, endpointslices, nodes"));
        st.listed = [true; 3];
        st.synced_at = Some(SystemTime::now());
        assert!(st.ready().is_ok());
        st.unreachable("connection refused".into());
        assert!(st.ready().is_ok(), "within the limit");
        std::thread::sleep(Duration::from_millis(80));
        let e = st.ready().unwrap_err();
        assert!(
            e.contains("unreachable") && e.contains("connection refused"),
            "{e}"
        );
        st.reachable();
        assert!(st.ready().is_ok());
    }
}
