//! Services: Kubernetes objects → dataplane state → BPF maps, on one path whatever the source
//! (`sluicectl apply`, `--manifests`, later a Kubernetes watch):
//!
//!   objects (store) → model::desired (pure) → writer::sync (diff) → maps
//!
//! The same state answers `sluicectl get`.

pub mod bpf_maps;
pub mod conntrack;
pub mod model;
pub mod objects;
pub mod store;
pub mod writer;

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::datapath::{Datapath, Maps};
use bpf_maps::BpfServiceMaps;
use model::Desired;
use objects::{Object, ObjectError, ObjectKey};
use store::ObjectStore;
use writer::{SyncStats, Writer};

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

/// What the maps can hold (their max_entries).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Backend set ids (the per-service counter array's size).
    pub set_ids: u32,
    pub frontends: u32,
    pub backends: u32,
}

pub struct Services {
    store: ObjectStore,
    writer: Writer,
    desired: Desired,
    limits: Limits,
    pub last_sync: SyncStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub ip: String,
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: String,
    /// The slot new flows reach it through; None: no new flows (not ready or terminating).
    pub slot: Option<u32>,
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
}

/// Desired state of a set of objects (Services and EndpointSlices; the rest is ignored).
pub(crate) fn desired_of<'a>(objs: impl IntoIterator<Item = &'a Object>) -> Desired {
    let objs: Vec<&Object> = objs.into_iter().collect();
    let services = objs.iter().filter_map(|o| {
        if let Object::Service(s) = o {
            Some(s)
        } else {
            None
        }
    });
    let slices = objs.iter().filter_map(|o| {
        if let Object::EndpointSlice(s) = o {
            Some(s)
        } else {
            None
        }
    });
    model::desired(services, slices)
}

impl Services {
    /// Loads stored objects and manifests and brings the maps in line (writing only differences
    /// from what a previous daemon left there). A sync failure is logged, not fatal: pods must
    /// keep getting IPs even when a stored object cannot be served.
    pub fn open(
        state_dir: &Path,
        manifests: Option<&Path>,
        maps: &Maps,
        limits: Limits,
    ) -> Result<Services> {
        let store = ObjectStore::open(&state_dir.join("objects"), manifests)?;
        let writer = Writer::load(&BpfServiceMaps { maps }, limits.set_ids)?;
        let mut s = Services {
            store,
            writer,
            desired: Desired::default(),
            limits,
            last_sync: SyncStats::default(),
        };
        match s.resync(maps) {
            Ok(st) => tracing::info!(
                frontends = s.desired.frontends.len(),
                writes = st.map_writes(),
                backends_left = st.backends_left,
                "services in sync"
            ),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "services could not be brought in sync; serving pods anyway")
            }
        }
        Ok(s)
    }

    fn check_limits(&self, d: &Desired) -> Result<(), ApplyError> {
        let slots: usize = d.sets.values().map(|s| s.ready.len()).sum();
        let l = self.limits;
        let over = |what: &str, n: usize, max: u32, flag: &str| {
            (n > max as usize).then(|| {
                ApplyError::Capacity(format!(
                    "{n} {what} would exceed the map's {max} (raise {flag})"
                ))
            })
        };
        if let Some(e) = over(
            "service ports",
            d.sets.len(),
            l.frontends,
            "--frontends-size",
        )
        .or_else(|| {
            over(
                "frontends",
                d.frontends.len(),
                l.frontends,
                "--frontends-size",
            )
        })
        .or_else(|| over("backend slots", slots, l.backends, "--backends-size"))
        {
            return Err(e);
        }
        Ok(())
    }

    fn sync_to(&mut self, desired: Desired, maps: &Maps) -> Result<SyncStats> {
        let st = self.writer.sync(&desired, &mut BpfServiceMaps { maps })?;
        self.desired = desired;
        self.last_sync = st;
        Ok(st)
    }

    fn resync(&mut self, maps: &Maps) -> Result<SyncStats> {
        let desired = desired_of(self.store.effective().into_values());
        self.sync_to(desired, maps)
    }

    /// Applies parsed objects: checked against the map sizes first, stored durably, then synced;
    /// if the sync fails the store is put back as it was. Nothing is half-applied.
    pub fn apply(
        &mut self,
        objs: Vec<Object>,
        maps: &Maps,
    ) -> Result<(Vec<ObjectKey>, SyncStats), ApplyError> {
        let desired = desired_of(self.store.effective_with(&objs, &[]).values());
        self.check_limits(&desired)?;
        let keys: Vec<ObjectKey> = objs.iter().map(Object::key).collect();
        let prev = self.store.apply(objs)?;
        match self.sync_to(desired, maps) {
            Ok(st) => Ok((keys, st)),
            Err(e) => {
                self.store.restore(prev)?;
                let _ = self.resync(maps);
                Err(e.into())
            }
        }
    }

    /// Deletes the applied objects `keys` names; returns (deleted, not found).
    pub fn delete(
        &mut self,
        keys: &[ObjectKey],
        maps: &Maps,
    ) -> Result<(Vec<ObjectKey>, Vec<ObjectKey>), ApplyError> {
        let desired = desired_of(self.store.effective_with(&[], keys).values());
        let (removed, missing) = self.store.delete(keys)?;
        let removed_keys: Vec<ObjectKey> = removed.iter().map(|(k, _)| k.clone()).collect();
        if let Err(e) = self.sync_to(desired, maps) {
            self.store.restore(removed)?;
            let _ = self.resync(maps);
            return Err(e.into());
        }
        Ok((removed_keys, missing))
    }

    /// Polled: re-reads the manifests directory and resyncs if anything changed.
    pub fn reload_manifests(&mut self, maps: &Maps) -> Result<()> {
        if self.store.reload_manifests() {
            let desired = desired_of(self.store.effective().into_values());
            if let Err(e) = self.check_limits(&desired) {
                anyhow::bail!("manifests not applied: {e}");
            }
            let st = self.sync_to(desired, maps)?;
            tracing::info!(
                writes = st.map_writes(),
                backends_left = st.backends_left,
                "manifests changed: services resynced"
            );
        }
        Ok(())
    }

    /// The Node objects in effect (for the nodes room: peers, routes, this node's pod CIDR).
    pub fn nodes(&self) -> Vec<k8s_openapi::api::core::v1::Node> {
        self.store
            .effective()
            .into_values()
            .filter_map(|o| match o {
                Object::Node(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn has_manifests(&self) -> bool {
        self.store.has_manifests()
    }

    pub fn frontend_count(&self) -> usize {
        self.desired.frontends.len()
    }

    pub fn set_name(&self, svc_id: u32) -> Option<String> {
        self.writer.set_of(svc_id).map(|s| s.to_string())
    }

    /// Services as the maps serve them, with per-service counters.
    pub fn view(&self, maps: &Maps) -> Vec<ServiceView> {
        let mut by_set: std::collections::HashMap<
            &model::SetKey,
            Vec<(&model::FrontendKey, &model::FrontendSpec)>,
        > = std::collections::HashMap::new();
        for (k, f) in &self.desired.frontends {
            by_set.entry(&f.set).or_default().push((k, f));
        }
        self.desired
            .sets
            .iter()
            .map(|(set, bs)| {
                let id = self.writer.set_id(set);
                let slots = id.map(|i| self.writer.slots_of(i)).unwrap_or(&[]);
                let fes = by_set.get(set).cloned().unwrap_or_default();
                let c = id
                    .map(|i| Datapath::service_stats(&maps.services, i))
                    .unwrap_or_default();
                ServiceView {
                    namespace: set.namespace.clone(),
                    name: set.service.clone(),
                    port: set.port.clone(),
                    protocol: set.proto.name(),
                    frontends: fes
                        .iter()
                        .map(|(k, _)| format!("{}:{}", k.vip, k.port))
                        .collect(),
                    svc_id: id,
                    affinity_timeout: fes.first().and_then(|(_, f)| f.affinity_timeout),
                    endpoints: bs
                        .endpoints
                        .iter()
                        .map(|e| EndpointView {
                            ip: e.backend.ip.to_string(),
                            port: e.backend.port,
                            ready: e.ready,
                            serving: e.serving,
                            terminating: e.terminating,
                            node: e.node.clone().unwrap_or_default(),
                            slot: slots.iter().position(|b| *b == e.backend).map(|p| p as u32),
                        })
                        .collect(),
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect()
    }
}
