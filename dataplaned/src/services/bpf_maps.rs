//! [`ServiceMaps`] over the pinned BPF maps, with the skeleton's types.

use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use sluice_core::bpf::pod_veth::types;

use super::model::{Backend, FrontendKey, Proto};
use super::writer::{FrontendValue, ServiceMaps};
use crate::datapath::Maps;
use crate::pod::{as_bytes, from_bytes};

pub struct BpfServiceMaps<'a> {
    pub maps: &'a Maps,
}

pub fn fe_key(k: &FrontendKey) -> types::frontend_key {
    types::frontend_key {
        addr: u32::from(k.vip).to_be(),
        port: k.port.to_be(),
        proto: k.proto.number(),
        pad: 0,
    }
}

pub fn backend_of(addr_be: u32, port_be: u16) -> Backend {
    Backend {
        ip: Ipv4Addr::from(u32::from_be(addr_be)),
        port: u16::from_be(port_be),
    }
}

/// Every (key, value) of a map, in batches (one syscall per batch, not per entry).
pub fn dump<K: Copy + Default, V: Copy + Default>(map: &MapHandle) -> Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    let iter = map
        .lookup_batch(4096, MapFlags::ANY, MapFlags::ANY)
        .context("batched map lookup")?;
    for (k, v) in iter {
        out.push((from_bytes::<K>(&k), from_bytes::<V>(&v)));
    }
    Ok(out)
}

impl ServiceMaps for BpfServiceMaps<'_> {
    fn frontends(&self) -> Result<Vec<(FrontendKey, FrontendValue)>> {
        Ok(
            dump::<types::frontend_key, types::frontend_value>(&self.maps.frontends)?
                .into_iter()
                .filter_map(|(k, v)| {
                    let proto = Proto::from_number(k.proto)?;
                    Some((
                        FrontendKey {
                            vip: Ipv4Addr::from(u32::from_be(k.addr)),
                            port: u16::from_be(k.port),
                            proto,
                        },
                        FrontendValue {
                            svc_id: v.cluster_id,
                            count: v.cluster_count,
                            affinity_timeout: v.affinity_timeout,
                            affinity: v.flags.0 & types::frontend_flags::FE_F_AFFINITY.0 != 0,
                            gen: v.gen,
                        },
                    ))
                })
                .collect(),
        )
    }

    fn markers(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(dump::<u32, u32>(&self.maps.vips)?
            .into_iter()
            .map(|(k, _)| Ipv4Addr::from(u32::from_be(k)))
            .collect())
    }

    fn slots(&self) -> Result<Vec<(u32, u32, Backend)>> {
        Ok(
            dump::<types::backend_key, types::backend_value>(&self.maps.backends)?
                .into_iter()
                .map(|(k, v)| (k.set_id, k.slot, backend_of(v.addr, v.port)))
                .collect(),
        )
    }

    fn members(&self) -> Result<Vec<(u32, Backend)>> {
        Ok(dump::<types::member_key, u32>(&self.maps.members)?
            .into_iter()
            .map(|(k, _)| (k.set_id, backend_of(k.addr, k.port)))
            .collect())
    }

    fn put_frontend(&mut self, k: &FrontendKey, v: &FrontendValue) -> Result<()> {
        let value = types::frontend_value {
            cluster_id: v.svc_id,
            cluster_count: v.count,
            // No node-local sets yet: the local set is the cluster set with nothing in it.
            local_id: v.svc_id,
            local_count: 0,
            affinity_timeout: v.affinity_timeout,
            gen: v.gen,
            flags: types::frontend_flags(if v.affinity {
                types::frontend_flags::FE_F_AFFINITY.0
            } else {
                0
            }),
            kind: types::frontend_kind::FE_KIND_CLUSTER_IP,
            ..Default::default()
        };
        self.maps
            .frontends
            .update(as_bytes(&fe_key(k)), as_bytes(&value), MapFlags::ANY)
            .context("writing a frontend")
    }

    fn delete_frontend(&mut self, k: &FrontendKey) -> Result<()> {
        let _ = self.maps.frontends.delete(as_bytes(&fe_key(k)));
        Ok(())
    }

    fn put_marker(&mut self, vip: Ipv4Addr) -> Result<()> {
        let key = u32::from(vip).to_be();
        self.maps
            .vips
            .update(as_bytes(&key), as_bytes(&1u32), MapFlags::ANY)
            .context("writing a VIP")
    }

    fn delete_marker(&mut self, vip: Ipv4Addr) -> Result<()> {
        let _ = self.maps.vips.delete(as_bytes(&u32::from(vip).to_be()));
        Ok(())
    }

    fn put_slot(&mut self, svc_id: u32, slot: u32, b: &Backend) -> Result<()> {
        let k = types::backend_key {
            set_id: svc_id,
            slot,
        };
        let v = types::backend_value {
            addr: u32::from(b.ip).to_be(),
            port: b.port.to_be(),
            flags: 0,
            node: 0,
        };
        self.maps
            .backends
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .context("writing a backend slot")
    }

    fn delete_slot(&mut self, svc_id: u32, slot: u32) -> Result<()> {
        let _ = self.maps.backends.delete(as_bytes(&types::backend_key {
            set_id: svc_id,
            slot,
        }));
        Ok(())
    }

    fn put_member(&mut self, svc_id: u32, b: &Backend) -> Result<()> {
        self.maps
            .members
            .update(
                as_bytes(&member_key(svc_id, b)),
                as_bytes(&1u32),
                MapFlags::ANY,
            )
            .context("writing a backend set member")
    }

    fn delete_member(&mut self, svc_id: u32, b: &Backend) -> Result<()> {
        let _ = self.maps.members.delete(as_bytes(&member_key(svc_id, b)));
        Ok(())
    }

    fn reset_counters(&mut self, svc_id: u32) -> Result<()> {
        let zero =
            vec![as_bytes(&types::svc_stats::default()).to_vec(); libbpf_rs::num_possible_cpus()?];
        self.maps
            .services
            .update_percpu(as_bytes(&svc_id), &zero, MapFlags::ANY)
            .context("zeroing service counters")
    }
}

fn member_key(set_id: u32, b: &Backend) -> types::member_key {
    types::member_key {
        set_id,
        addr: u32::from(b.ip).to_be(),
        port: b.port.to_be(),
        pad: 0,
    }
}
