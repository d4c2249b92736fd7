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
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

pub struct Services {
    store: ObjectStore,
    writer: Writer,
    desired: Desired,
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

impl Services {
    /// Loads stored objects and manifests and brings the maps in line (writing only differences
    /// from what a previous daemon left there).
    pub fn open(
        state_dir: &Path,
        manifests: Option<&Path>,
        maps: &Maps,
        max_ids: u32,
    ) -> Result<Services> {
        let store = ObjectStore::open(&state_dir.join("objects"), manifests)?;
        let writer = Writer::load(&BpfServiceMaps { maps }, max_ids)?;
        let mut s = Services {
            store,
            writer,
            desired: Desired::default(),
            last_sync: SyncStats::default(),
        };
        let st = s.resync(maps)?;
        tracing::info!(
            frontends = s.desired.frontends.len(),
            writes = st.map_writes(),
            flows_purged = st.flows_purged,
            "services in sync"
        );
        Ok(s)
    }

    fn resync(&mut self, maps: &Maps) -> Result<SyncStats> {
        let objs = self.store.effective();
        let services = objs.values().filter_map(|o| {
            if let Object::Service(s) = o {
                Some(s)
            } else {
                None
            }
        });
        let slices = objs.values().filter_map(|o| {
            if let Object::EndpointSlice(s) = o {
                Some(s)
            } else {
                None
            }
        });
        let desired = model::desired(services, slices);
        let st = self.writer.sync(&desired, &mut BpfServiceMaps { maps })?;
        self.desired = desired;
        self.last_sync = st;
        Ok(st)
    }

    /// Validates every document first: on any error nothing is applied.
    pub fn apply(
        &mut self,
        text: &str,
        source: &str,
        maps: &Maps,
    ) -> Result<(Vec<ObjectKey>, SyncStats), ApplyError> {
        let objs = objects::parse(text, source)?;
        let keys = self.store.apply(objs)?;
        let st = self.resync(maps)?;
        Ok((keys, st))
    }

    /// Deletes the applied objects `text` names; returns (deleted, not found).
    pub fn delete(
        &mut self,
        text: &str,
        source: &str,
        maps: &Maps,
    ) -> Result<(Vec<ObjectKey>, Vec<ObjectKey>), ApplyError> {
        let keys: Vec<ObjectKey> = objects::parse(text, source)?
            .iter()
            .map(Object::key)
            .collect();
        let (removed, missing) = self.store.delete(&keys)?;
        self.resync(maps)?;
        Ok((removed, missing))
    }

    /// Polled: re-reads the manifests directory and resyncs if anything changed.
    pub fn reload_manifests(&mut self, maps: &Maps) -> Result<()> {
        if self.store.reload_manifests() {
            let st = self.resync(maps)?;
            tracing::info!(
                writes = st.map_writes(),
                flows_purged = st.flows_purged,
                "manifests changed: services resynced"
            );
        }
        Ok(())
    }

    pub fn has_manifests(&self) -> bool {
        self.store.has_manifests()
    }

    pub fn frontend_count(&self) -> usize {
        self.desired.frontends.len()
    }

    pub fn set_name(&self, svc_id: u32) -> Option<String> {
        self.desired
            .sets
            .keys()
            .find(|s| self.writer.set_id(s) == Some(svc_id))
            .map(|s| s.to_string())
    }

    /// Services as the maps serve them, with per-service counters.
    pub fn view(&self, maps: &Maps) -> Vec<ServiceView> {
        self.desired
            .sets
            .iter()
            .map(|(set, bs)| {
                let id = self.writer.set_id(set);
                let slots = id.map(|i| self.writer.slots_of(i)).unwrap_or(&[]);
                let fes: Vec<_> = self
                    .desired
                    .frontends
                    .iter()
                    .filter(|(_, f)| &f.set == set)
                    .collect();
                let c = id
                    .map(|i| Datapath::counter(&maps.services, i))
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
