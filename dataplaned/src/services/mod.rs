//! Services: Kubernetes objects → dataplane state → BPF maps, on one incremental path whatever
//! the source (`sluicectl apply`, `--manifests`, later a Kubernetes watch):
//!
//!   sources (parsed objects) → store (objects in effect) → model (per Service) → writer (diff) → maps
//!
//! A change recomputes and diffs only the Services it touches: an EndpointSlice change is its
//! Service, a Service change itself. The same model answers `sluicectl get`.
//!
//! Degraded start: until every source has loaded completely once (the applied objects log and
//! each of its objects, every manifest file as it is now), the maps keep whatever an earlier
//! daemon wrote that no loaded object explains; changes to loaded objects are written as usual.
//! Once every source has loaded, what nobody explains is deleted ([`writer::Writer::prune`]).

pub mod bpf_maps;
pub mod conntrack;
pub mod health;
pub mod model;
pub mod objects;
pub mod store;
pub mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use serde::Serialize;

use crate::datapath::{Datapath, Maps};
use crate::sources::applied::{AppliedLog, Entry};
use crate::sources::manifests::{FileUpdate, ManifestsDir};
use crate::sources::SourceStatus;
use bpf_maps::BpfServiceMaps;
use model::{Model, ServiceDesired, ServiceKey};
use objects::{ObjectError, ObjectKey, Parsed};
use store::{ObjectStore, Origin, Undo};
use writer::{Capacity, SyncError, SyncStats, Writer};

/// Hash maps of the control plane: keyed by names and addresses from the (root-only) API, so a
/// fast non-keyed hash (FxHash, as rustc uses) instead of SipHash.
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
pub type FastSet<K> = HashSet<K, BuildHasherDefault<FxHasher>>;

#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Invalid(#[from] ObjectError),
    /// The change would not fit the maps; nothing was applied.
    #[error("{0}")]
    Capacity(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<SyncError> for ApplyError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::Capacity(m) => ApplyError::Capacity(m),
            SyncError::Map(e) => ApplyError::Internal(e),
        }
    }
}

/// What the maps can hold (their max_entries).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Backend set ids (the per-service counter array's size).
    pub set_ids: u32,
    pub frontends: u32,
    pub backends: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub ip: String,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: String,
    /// The slot new flows reach it through; None: no new flows.
    pub slot: Option<u32>,
    pub local: bool,
    pub node_ip: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    pub namespace: String,
    pub name: String,
    pub port: String,
    pub protocol: &'static str,
    pub frontends: Vec<String>,
    pub svc_id: Option<u32>,
    pub affinity_timeout: Option<u32>,
    pub endpoints: Vec<EndpointView>,
    pub packets: u64,
    pub bytes: u64,
    /// (address, kind, local only) of each frontend.
    pub frontend_views: Vec<(String, &'static str, bool)>,
    pub local: u64,
    pub forwarded: u64,
    pub decapsulated: u64,
    pub external_policy: &'static str,
    pub internal_policy: &'static str,
    pub local_slots: u32,
}

/// This node as the model places endpoints: its name, and --pod-cidr (its Node object's podCIDR
/// wins when it has one).
#[derive(Debug, Clone, Default)]
pub struct LocalNode {
    pub name: String,
    pub pod_cidr: Option<(std::net::Ipv4Addr, u8)>,
}

pub struct Services {
    store: ObjectStore,
    applied: AppliedLog,
    manifests: Option<ManifestsDir>,
    /// The Kubernetes watch, when configured (its objects come through [`Services::apply_watched`]).
    kube: Option<SourceStatus>,
    model: Model,
    writer: Writer,
    /// Services whose maps may lag the model (a sync failed): synced again with the next change.
    dirty: BTreeSet<ServiceKey>,
    /// Every source has loaded once and what no object explains was deleted.
    pruned: bool,
    /// Health-check node ports by Service, kept with each sync of the Services it touches.
    health: BTreeMap<ServiceKey, (u16, usize)>,
    pub last_sync: SyncStats,
    /// Where the last change's time went.
    pub last_timings: Timings,
}

fn policy(local: bool) -> &'static str {
    if local {
        "Local"
    } else {
        "Cluster"
    }
}

/// Where a change's time went (microseconds), for the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Store and model: what changed, which Services it touches, their desired state.
    pub model_us: u64,
    /// The writer's diff and capacity check.
    pub plan_us: u64,
    /// Map writes.
    pub maps_us: u64,
    /// The objects log: write and fdatasync (in parallel with the map writes).
    pub log_us: u64,
}

fn us(t: std::time::Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

/// Gives memory freed by a large change back to the system: glibc keeps freed memory in its
/// arenas, and a 20,000-object apply frees tens of MB of parse buffers.
pub fn release_memory() {
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Parses stored documents on two threads; returns the objects and the keys that failed, why.
fn parse_stored(raws: Vec<(ObjectKey, String)>) -> (Vec<Parsed>, BTreeMap<ObjectKey, String>) {
    fn one(key: ObjectKey, raw: &str) -> Result<Parsed, (ObjectKey, String)> {
        let mut objs = objects::parse(raw, &format!("stored {key}"))
            .map_err(|e| (key.clone(), e.to_string()))?;
        match objs.pop() {
            Some(p) if objs.is_empty() && p.key == key => Ok(p),
            _ => Err((key, "the stored document is not that one object".into())),
        }
    }
    let (a, b) = raws.split_at(raws.len() / 2);
    let results: Vec<Result<Parsed, (ObjectKey, String)>> = std::thread::scope(|s| {
        let second = s.spawn(|| b.iter().map(|(k, r)| one(k.clone(), r)).collect::<Vec<_>>());
        let mut out: Vec<_> = a.iter().map(|(k, r)| one(k.clone(), r)).collect();
        out.extend(second.join().expect("parser thread"));
        out
    });
    let mut ok = Vec::with_capacity(results.len());
    let mut bad = BTreeMap::new();
    for r in results {
        match r {
            Ok(p) => ok.push(p),
            Err((k, e)) => {
                tracing::error!(object = %k, error = %e, "a stored object does not load: what the maps hold for it stays until it is applied again or deleted");
                bad.insert(k, e);
            }
        }
    }
    (ok, bad)
}

/// The store operations that make a manifest file's origin hold exactly `u`'s objects (taken).
fn file_ops(
    manifests: &ManifestsDir,
    u: &mut FileUpdate,
) -> Vec<(ObjectKey, Option<Arc<objects::Spec>>)> {
    let new: Vec<Parsed> = u.objects.take().unwrap_or_default();
    let keep: std::collections::HashSet<&ObjectKey> = new.iter().map(|p| &p.key).collect();
    let mut ops: Vec<(ObjectKey, Option<Arc<objects::Spec>>)> = manifests
        .keys_of(&u.path)
        .iter()
        .filter(|k| !keep.contains(k))
        .map(|k| (k.clone(), None))
        .collect();
    ops.extend(new.into_iter().map(|p| (p.key, Some(Arc::new(p.spec)))));
    ops
}

impl Services {
    /// Loads the applied objects and the manifests and brings the maps in line (writing only
    /// differences from what a previous daemon left there; deleting nothing unexplained until
    /// every source has loaded). A sync failure is logged, not fatal: pods must keep getting IPs
    /// even when a stored object cannot be served.
    pub fn open(
        state_dir: &Path,
        manifests: Option<&Path>,
        maps: &Maps,
        limits: Limits,
        local: LocalNode,
        kube: Option<&str>,
    ) -> Result<Services> {
        // Each thread that allocates gets a glibc arena that keeps what it freed: with the API's
        // blocking pool and the parser threads, many idle copies of a large apply's buffers
        // (measured: 74 MiB instead of 52 after apply, delete, apply of 10k Services).
        // SAFETY: mallopt only tunes the allocator.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
        let t = std::time::Instant::now();
        let (mut applied, raws) = AppliedLog::open(state_dir);
        let stored = raws.len();
        let (parsed, bad) = parse_stored(raws);
        applied.loaded(bad);
        let mut store = ObjectStore::default();
        let (mut changes, _) = store.stage(
            &Origin::Applied,
            parsed.into_iter().map(|p| (p.key, Some(Arc::new(p.spec)))),
        );
        let manifests = manifests.map(|dir| {
            let (mut m, updates) = ManifestsDir::open(dir, state_dir);
            for mut u in updates {
                let ops = file_ops(&m, &mut u);
                let (c, _) = store.stage(&Origin::Manifest(u.path.clone()), ops);
                changes.extend(c);
                m.commit(u);
            }
            m
        });
        let loaded_ms = t.elapsed().as_millis() as u64;
        let writer = Writer::load(
            &BpfServiceMaps { maps },
            Capacity {
                frontends: limits.frontends,
                markers: limits.frontends,
                backends: limits.backends,
                set_ids: limits.set_ids,
            },
        )?;
        let mut s = Services {
            store,
            applied,
            manifests,
            kube: kube.map(SourceStatus::new),
            model: Model::for_node(&local.name, local.pod_cidr),
            writer,
            dirty: BTreeSet::new(),
            pruned: false,
            health: BTreeMap::new(),
            last_sync: SyncStats::default(),
            last_timings: Timings::default(),
        };
        let touched = s.model.apply(&changes);
        match s.sync(touched, maps) {
            Ok(st) => tracing::info!(
                frontends = s.writer.frontend_count(),
                writes = st.map_writes(),
                backends_left = st.backends_left,
                stored,
                load_ms = loaded_ms,
                ms = t.elapsed().as_millis() as u64,
                "services in sync"
            ),
            Err(e) => {
                tracing::error!(error = %e, "services could not be brought in sync; serving pods anyway")
            }
        }
        s.prune_when_loaded(maps);
        release_memory();
        if !s.pruned {
            for src in s.sources().iter().filter(|x| !x.loaded) {
                tracing::warn!(source = %src.name, error = %src.last_error,
                    "degraded start: a source has not loaded; the maps keep what no loaded object explains");
            }
        }
        Ok(s)
    }

    /// The desired state of `touched` (sorted, distinct) and of the Services left dirty by a
    /// failed sync.
    fn batch(&self, touched: Vec<ServiceKey>) -> Vec<(ServiceKey, ServiceDesired)> {
        let keys = if self.dirty.is_empty() {
            touched
        } else {
            let mut all: BTreeSet<ServiceKey> = touched.into_iter().collect();
            all.extend(self.dirty.iter().cloned());
            all.into_iter().collect()
        };
        keys.into_iter()
            .map(|k| {
                let d = self.model.desired(&k);
                (k, d)
            })
            .collect()
    }

    /// The health-check answers of the Services in `batch`, as the model has them now.
    fn refresh_health(&mut self, batch: &[(ServiceKey, ServiceDesired)]) {
        for (k, _) in batch {
            match self.model.health_of(k) {
                Some(h) => self.health.insert(k.clone(), h),
                None => self.health.remove(k),
            };
        }
    }

    /// Syncs the touched Services (and any dirty ones); on failure they are dirty.
    fn sync(&mut self, touched: Vec<ServiceKey>, maps: &Maps) -> Result<SyncStats, SyncError> {
        let batch = self.batch(touched);
        self.refresh_health(&batch);
        match self.writer.sync(&batch, &mut BpfServiceMaps { maps }) {
            Ok(st) => {
                self.dirty.clear();
                self.last_sync = st;
                Ok(st)
            }
            Err(e) => {
                self.dirty.extend(batch.into_iter().map(|(k, _)| k));
                Err(e)
            }
        }
    }

    /// Deletes what no object explains once every source has loaded completely (once).
    fn prune_when_loaded(&mut self, maps: &Maps) {
        if self.pruned || !self.sources().iter().all(|s| s.loaded_once) {
            return;
        }
        match self.writer.prune(&mut BpfServiceMaps { maps }) {
            Ok(st) => {
                self.pruned = true;
                if st.map_writes() > 0 {
                    tracing::info!(
                        frontends_deleted = st.frontend_deletes,
                        writes = st.map_writes(),
                        "every source loaded: deleted what no object explains"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "pruning the service maps"),
        }
    }

    /// Puts a staged change back (model and maps) after it failed.
    fn revert(&mut self, origin_undo: Undo, touched: Vec<ServiceKey>, maps: &Maps) {
        let back = self.store.undo(origin_undo);
        let mut again = self.model.apply(&back);
        again.extend(touched);
        again.sort_unstable();
        again.dedup();
        if let Err(e) = self.sync(again, maps) {
            tracing::error!(error = %e, "putting the service maps back after a failed change; retried with the next");
        }
    }

    /// Stages `ops` from `origin`, writes the maps and, in parallel, the applied objects log
    /// (`entries`): both or neither take effect.
    fn change(
        &mut self,
        origin: &Origin,
        ops: Vec<(ObjectKey, Option<Arc<objects::Spec>>)>,
        entries: &[Entry],
        maps: &Maps,
    ) -> Result<SyncStats, ApplyError> {
        let logged: Vec<ObjectKey> = entries
            .iter()
            .map(|e| match e {
                Entry::Put { key, .. } | Entry::Delete { key } => (*key).clone(),
            })
            .collect();
        let t = std::time::Instant::now();
        let started = t;
        let (changes, undo) = self.store.stage(origin, ops);
        let touched = self.model.apply(&changes);
        let batch = self.batch(touched);
        let mut timings = Timings {
            model_us: us(t),
            ..Timings::default()
        };
        let t = std::time::Instant::now();
        let plan = self.writer.plan(&batch);
        timings.plan_us = us(t);
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                let back = self.store.undo(undo);
                self.model.apply(&back);
                return Err(e.into());
            }
        };
        let mark = self.applied.mark();
        let before = self.applied.snapshot(logged);
        let writer = &mut self.writer;
        let applied = &mut self.applied;
        let mut write_log = || {
            let t = std::time::Instant::now();
            let r = applied.append(entries);
            (r, us(t))
        };
        let mut write_maps = |plan| {
            let t = std::time::Instant::now();
            let r = writer.execute(plan, &mut BpfServiceMaps { maps });
            (r, us(t))
        };
        // A large change writes the log beside the maps; a small one on this thread (a thread
        // start can cost more than its fdatasync on a busy node).
        let ((synced, maps_us), (logged, log_us)) = if entries.len() > 64 {
            std::thread::scope(|s| {
                let log = s.spawn(write_log);
                let m = write_maps(plan);
                (m, log.join().expect("log writer thread"))
            })
        } else {
            let l = write_log();
            (write_maps(plan), l)
        };
        timings.maps_us = maps_us;
        timings.log_us = log_us;
        self.last_timings = timings;
        match (synced, logged) {
            (Ok(st), Ok(())) => {
                self.dirty.clear();
                self.last_sync = st;
                self.refresh_health(&batch);
                // The watch's batches are timed from their first event (lib.rs WatchSink).
                match origin {
                    Origin::Applied => {
                        crate::observe::metrics::get().synced("applied", started.elapsed())
                    }
                    Origin::Manifest(_) => {
                        crate::observe::metrics::get().synced("manifests", started.elapsed())
                    }
                    Origin::Kubernetes => {}
                }
                if let Err(e) = self.applied.maybe_compact() {
                    tracing::error!(error = %format!("{e:#}"), "compacting the objects log (it stays as it is)");
                }
                self.prune_when_loaded(maps);
                Ok(st)
            }
            (synced, logged) => {
                if logged.is_ok() && !entries.is_empty() {
                    if let Err(e) = self.applied.rollback(mark, &before) {
                        tracing::error!(error = %format!("{e:#}"), "cutting back the objects log");
                    }
                }
                let err: ApplyError = match (synced, logged) {
                    (Err(e), _) => e.into(),
                    (_, Err(e)) => e.into(),
                    _ => unreachable!(),
                };
                self.revert(undo, batch.into_iter().map(|(k, _)| k).collect(), maps);
                Err(err)
            }
        }
    }

    /// Applies parsed objects: checked against the map sizes, written to the maps and to the
    /// objects log (one record, one fsync), or not at all.
    pub fn apply(
        &mut self,
        objs: Vec<Parsed>,
        maps: &Maps,
    ) -> Result<(Vec<ObjectKey>, SyncStats), ApplyError> {
        let keys: Vec<ObjectKey> = objs.iter().map(|o| o.key.clone()).collect();
        let mut ops = Vec::with_capacity(objs.len());
        let mut raws = Vec::new();
        for p in objs {
            if !self.applied.holds_same(&p.key, &p.raw) {
                raws.push((p.key.clone(), p.raw));
            }
            ops.push((p.key, Some(Arc::new(p.spec))));
        }
        let entries: Vec<Entry> = raws
            .iter()
            .map(|(key, raw)| Entry::Put { key, raw })
            .collect();
        let st = self.change(&Origin::Applied, ops, &entries, maps)?;
        Ok((keys, st))
    }

    /// Deletes the applied objects `keys` names; returns (deleted, not found).
    pub fn delete(
        &mut self,
        keys: &[ObjectKey],
        maps: &Maps,
    ) -> Result<(Vec<ObjectKey>, Vec<ObjectKey>), ApplyError> {
        let (found, missing): (Vec<ObjectKey>, Vec<ObjectKey>) = keys
            .iter()
            .cloned()
            .partition(|k| self.applied.holds(k) || self.store.holds(&Origin::Applied, k));
        let entries: Vec<Entry> = found.iter().map(|key| Entry::Delete { key }).collect();
        let ops = found.iter().map(|k| (k.clone(), None)).collect();
        self.change(&Origin::Applied, ops, &entries, maps)?;
        Ok((found, missing))
    }

    /// Polled: applies manifest files that changed, one file at a time.
    pub fn reload_manifests(&mut self, maps: &Maps) -> Result<()> {
        let Some(m) = self.manifests.as_mut() else {
            return Ok(());
        };
        let updates = m.poll();
        for mut u in updates {
            let m = self.manifests.as_ref().expect("checked");
            let ops = file_ops(m, &mut u);
            let origin = Origin::Manifest(u.path.clone());
            match self.change(&origin, ops, &[], maps) {
                Ok(st) => {
                    tracing::info!(file = %u.path.display(), writes = st.map_writes(), services = st.services,
                        backends_left = st.backends_left, "manifest applied");
                    self.manifests.as_mut().expect("checked").commit(u);
                }
                Err(e) => {
                    tracing::error!(file = %u.path.display(), error = %e, "manifest not applied; its previous objects stay");
                    self.manifests
                        .as_mut()
                        .expect("checked")
                        .reject(u, e.to_string());
                }
            }
        }
        self.prune_when_loaded(maps);
        Ok(())
    }

    /// Makes the Kubernetes source hold what `ops` says (a batch of the watch: only objects
    /// that changed). `complete`: with this batch the source holds everything the API server
    /// has (its first full list is in); until then nothing the maps hold is pruned. On error
    /// nothing changed.
    pub fn apply_watched(
        &mut self,
        ops: Vec<(ObjectKey, Option<Arc<objects::Spec>>)>,
        complete: bool,
        held: usize,
        maps: &Maps,
    ) -> Result<SyncStats, ApplyError> {
        let Some(status) = self.kube.as_mut() else {
            return Err(ApplyError::Internal(anyhow::anyhow!(
                "no Kubernetes source is configured"
            )));
        };
        let before = status.clone();
        // Loaded before the change, so that a successful first full batch also prunes.
        if complete {
            status.set(true, None);
        }
        let r = self.change(&Origin::Kubernetes, ops, &[], maps);
        if r.is_err() {
            self.kube = Some(before);
        } else if let Some(s) = self.kube.as_mut() {
            s.objects = held;
        }
        r
    }

    /// The Node objects in effect, by name (for the nodes room: peers, routes, this node's pod
    /// CIDR).
    pub fn nodes(&self) -> Vec<(String, objects::NodeSpec)> {
        self.model.nodes()
    }

    pub fn has_manifests(&self) -> bool {
        self.manifests.is_some()
    }

    /// Frontends in the maps.
    pub fn frontend_count(&self) -> usize {
        self.writer.frontend_count()
    }

    /// Frontends kept from before the start that no loaded object explains (degraded start).
    pub fn kept_frontend_count(&self) -> usize {
        self.writer.foreign_frontend_count()
    }

    /// Each source's state.
    pub fn sources(&self) -> Vec<SourceStatus> {
        let mut out = vec![self.applied.status.clone()];
        out.extend(self.manifests.iter().map(|m| m.status.clone()));
        out.extend(self.kube.iter().cloned());
        out
    }

    /// Until every source has loaded once, nothing unexplained is deleted from the maps.
    pub fn degraded(&self) -> bool {
        !self.pruned
    }

    pub fn set_name(&self, svc_id: u32) -> Option<String> {
        let local = if svc_id & writer::LOCAL_SET != 0 {
            " (local)"
        } else {
            ""
        };
        self.writer
            .set_of(writer::base_id(svc_id))
            .map(|(s, p)| format!("{s}:{p}{local}"))
    }

    /// Services as the maps serve them, with per-service counters.
    pub fn view(&self, maps: &Maps) -> Vec<ServiceView> {
        let mut keys: Vec<&ServiceKey> = self.model.services().collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let d = self.model.desired(key);
            for p in d.ports {
                let id = self.writer.set_id(key, &p.port);
                let slots = id.map(|i| self.writer.slots_of(i)).unwrap_or(&[]);
                // Most sets are small: a linear search, a map for large ones (never quadratic).
                let index: FastMap<model::Backend, u32> = if slots.len() > 16 {
                    slots
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (s.backend, i as u32))
                        .collect()
                } else {
                    FastMap::default()
                };
                let slot_of = |b: &model::Backend| {
                    if slots.len() > 16 {
                        index.get(b).copied()
                    } else {
                        slots.iter().position(|s| s.backend == *b).map(|i| i as u32)
                    }
                };
                let c = id
                    .map(|i| Datapath::service_stats(&maps.services, i))
                    .unwrap_or_default();
                out.push(ServiceView {
                    namespace: key.namespace.to_string(),
                    name: key.name.to_string(),
                    port: p.port.name.to_string(),
                    protocol: p.port.proto.name(),
                    frontends: p
                        .frontends
                        .iter()
                        .map(|f| format!("{}:{}", f.key.vip, f.key.port))
                        .collect(),
                    svc_id: id,
                    affinity_timeout: p.frontends.first().and_then(|f| f.affinity_timeout),
                    endpoints: p
                        .cluster
                        .endpoints
                        .iter()
                        .map(|e| EndpointView {
                            ip: e.backend.ip.to_string(),
                            port: e.backend.port,
                            ready: e.ready,
                            serving: e.serving,
                            terminating: e.terminating,
                            node: e.node.as_deref().unwrap_or_default().to_string(),
                            slot: slot_of(&e.backend),
                            local: p.placement_of(&e.backend).local,
                            node_ip: Some(p.placement_of(&e.backend).node)
                                .filter(|a| !a.is_unspecified())
                                .map(|a| a.to_string())
                                .unwrap_or_default(),
                        })
                        .collect(),
                    packets: c.packets,
                    bytes: c.bytes,
                    frontend_views: p
                        .frontends
                        .iter()
                        .map(|f| {
                            let addr = if f.key.vip.is_unspecified() {
                                format!("*:{}", f.key.port)
                            } else {
                                format!("{}:{}", f.key.vip, f.key.port)
                            };
                            (addr, f.kind.name(), f.local_only)
                        })
                        .collect(),
                    local: c.local,
                    forwarded: c.forwarded,
                    decapsulated: c.decapsulated,
                    external_policy: policy(
                        p.frontends
                            .iter()
                            .any(|f| f.kind.external() && f.local_only),
                    ),
                    internal_policy: policy(
                        p.frontends
                            .iter()
                            .any(|f| !f.kind.external() && f.local_only),
                    ),
                    local_slots: id
                        .map(|i| self.writer.slots_of(i | writer::LOCAL_SET).len() as u32)
                        .unwrap_or(0),
                });
            }
        }
        out
    }

    /// The health-check node ports wanted now: port → (Service, ready local endpoints, whether
    /// the maps serve what the model says), for LoadBalancer Services with
    /// externalTrafficPolicy: Local and a healthCheckNodePort (kube-proxy's). A Service whose
    /// last sync failed is unhealthy (503) until one succeeds: the load balancer must not send
    /// traffic this node may drop. A port two Services name goes to the first in namespace/name
    /// order.
    pub fn health_checks(&self) -> BTreeMap<u16, health::Answer> {
        let mut out = BTreeMap::new();
        for (key, (port, n)) in &self.health {
            out.entry(*port).or_insert(health::Answer {
                service: key.clone(),
                local: *n,
                healthy: !self.dirty.contains(key),
            });
        }
        out
    }

    /// Objects in effect, and Services among them (for logs and tests).
    pub fn counts(&self) -> (usize, usize) {
        (self.store.len(), self.model.service_count())
    }
}

#[cfg(test)]
mod tests {
    //! The whole path (store → model → writer) at scale, on fake maps.
    use super::model::testing::changes;
    use super::writer::fake::FakeMaps;
    use super::*;

    const CAP: Capacity = Capacity {
        frontends: 65536,
        markers: 65536,
        backends: 262144,
        set_ids: 131072,
    };

    fn service(i: usize, endpoints: &[&str]) -> String {
        let eps: String = endpoints
            .iter()
            .map(|ip| format!("- {{addresses: [{ip}], conditions: {{ready: true}}}}\n"))
            .collect();
        format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: demo}}\nspec: {{clusterIP: 10.100.{}.{}, ports: [{{name: p, port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: demo, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nendpoints:\n{eps}", i / 250, i % 250 + 1)
    }

    #[test]
    fn one_endpoint_change_among_ten_thousand_services_is_o1() {
        let mut store = ObjectStore::default();
        let mut model = Model::default();
        let mut maps = FakeMaps::default();
        let mut writer = Writer::load(&maps, CAP).unwrap();
        let all: String = (0..10_000)
            .map(|i| service(i, &["10.244.0.1", "10.244.0.2"]))
            .collect();
        let ops = changes(&all).into_iter().map(|c| (c.key, c.new));
        let (c, _) = store.stage(&Origin::Applied, ops);
        let touched = model.apply(&c);
        assert_eq!(touched.len(), 10_000);
        let batch: Vec<_> = touched
            .into_iter()
            .map(|k| {
                let d = model.desired(&k);
                (k, d)
            })
            .collect();
        let st = writer.sync(&batch, &mut maps).unwrap();
        assert_eq!(st.map_writes(), 60_000);
        assert_eq!(maps.calls, 4, "batched");

        // One slice gains an endpoint.
        let writes = maps.writes;
        let one = service(7, &["10.244.0.1", "10.244.0.2", "10.244.0.3"]);
        let ops = changes(&one).into_iter().map(|c| (c.key, c.new));
        let (c, _) = store.stage(&Origin::Applied, ops);
        assert_eq!(
            c.len(),
            1,
            "the Service is unchanged: only its slice is a change"
        );
        let touched = model.apply(&c);
        assert_eq!(
            touched,
            [ServiceKey::new("demo", "s7")],
            "one Service recomputed"
        );
        let batch: Vec<_> = touched
            .into_iter()
            .map(|k| {
                let d = model.desired(&k);
                (k, d)
            })
            .collect();
        let st = writer.sync(&batch, &mut maps).unwrap();
        assert_eq!(st.services, 1);
        assert_eq!(st.map_writes(), 3, "member, slot, frontend count: {st:?}");
        assert_eq!(maps.writes - writes, 3);
        maps.assert_consistent();
    }

    /// This thread's CPU time (wall time means little on a loaded machine).
    fn cpu() -> std::time::Duration {
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
        std::time::Duration::new(ts.tv_sec() as u64, ts.tv_nsec() as u32)
    }

    fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
        let (w, c) = (std::time::Instant::now(), cpu());
        let r = f();
        eprintln!("{what}: {:?} wall, {:?} cpu", w.elapsed(), cpu() - c);
        r
    }

    /// Where the time of a 10k-Service change goes, without a kernel:
    /// `cargo test --release -p sluice-dataplaned --lib pipeline_bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn pipeline_bench() {
        let all: String = (0..10_000)
            .map(|i| service(i, &["10.244.0.1", "10.244.0.2"]))
            .collect();
        let parsed = timed("parse (2 threads; cpu of this one)", || {
            objects::parse(&all, "bench").unwrap()
        });
        for round in 0..2 {
            eprintln!("round {round}");
            let mut store = ObjectStore::default();
            let mut model = Model::default();
            let mut maps = FakeMaps::default();
            let mut writer = Writer::load(&maps, CAP).unwrap();
            let ops: Vec<_> = parsed
                .iter()
                .map(|p| (p.key.clone(), Some(Arc::new(p.spec.clone()))))
                .collect();
            let (c, _) = timed("stage", || store.stage(&Origin::Applied, ops));
            let touched = timed("model apply", || model.apply(&c));
            let batch: Vec<_> = timed("desired", || {
                touched
                    .into_iter()
                    .map(|k| {
                        let d = model.desired(&k);
                        (k, d)
                    })
                    .collect()
            });
            let plan = timed("plan", || writer.plan(&batch).unwrap());
            timed("execute (fake maps)", || {
                writer.execute(plan, &mut maps).unwrap()
            });
        }
    }
}
