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
        vip: u32::from(k.vip).to_be(),
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

fn delete_keys<K: Copy>(map: &MapHandle, keys: &[K]) -> Result<usize> {
    let mut n = 0;
    for k in keys {
        // Gone already (LRU eviction, the datapath): fine.
        if map.delete(as_bytes(k)).is_ok() {
            n += 1;
        }
    }
    Ok(n)
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
                            vip: Ipv4Addr::from(u32::from_be(k.vip)),
                            port: u16::from_be(k.port),
                            proto,
                        },
                        FrontendValue {
                            svc_id: v.svc_id,
                            count: v.backend_count,
                            affinity_timeout: v.affinity_timeout,
                            affinity: v.flags.0 & types::frontend_flags::FE_F_AFFINITY.0 != 0,
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
                .map(|(k, v)| (k.svc_id, k.slot, backend_of(v.addr, v.port)))
                .collect(),
        )
    }

    fn put_frontend(&mut self, k: &FrontendKey, v: &FrontendValue) -> Result<()> {
        let value = types::frontend_value {
            svc_id: v.svc_id,
            backend_count: v.count,
            affinity_timeout: v.affinity_timeout,
            flags: types::frontend_flags(if v.affinity {
                types::frontend_flags::FE_F_AFFINITY.0
            } else {
                0
            }),
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
        let k = types::backend_key { svc_id, slot };
        let v = types::backend_value {
            addr: u32::from(b.ip).to_be(),
            port: b.port.to_be(),
            flags: 0,
        };
        self.maps
            .backends
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .context("writing a backend slot")
    }

    fn delete_slot(&mut self, svc_id: u32, slot: u32) -> Result<()> {
        let _ = self
            .maps
            .backends
            .delete(as_bytes(&types::backend_key { svc_id, slot }));
        Ok(())
    }

    fn purge_flows(&mut self, keep: &dyn Fn(u32, Backend) -> bool) -> Result<usize> {
        let doomed: Vec<types::ct_key> =
            dump::<types::ct_key, types::ct_value>(&self.maps.conntrack)?
                .into_iter()
                .filter(|(k, v)| !keep(v.svc_id, ct_backend(k, v)))
                .map(|(k, _)| k)
                .collect();
        delete_keys(&self.maps.conntrack, &doomed)
    }

    fn purge_affinity(&mut self, keep: &dyn Fn(u32, Backend) -> bool) -> Result<usize> {
        let doomed: Vec<types::affinity_key> =
            dump::<types::affinity_key, types::affinity_value>(&self.maps.affinity)?
                .into_iter()
                .filter(|(k, v)| !keep(k.svc_id, backend_of(v.addr, v.port)))
                .map(|(k, _)| k)
                .collect();
        delete_keys(&self.maps.affinity, &doomed)
    }

    fn reset_counters(&mut self, svc_id: u32) -> Result<()> {
        let zero =
            vec![as_bytes(&types::counter::default()).to_vec(); libbpf_rs::num_possible_cpus()?];
        self.maps
            .services
            .update_percpu(as_bytes(&svc_id), &zero, MapFlags::ANY)
            .context("zeroing service counters")
    }
}

/// The backend of a conntrack entry: where the forward leg goes, where the reverse leg comes from.
pub fn ct_backend(k: &types::ct_key, v: &types::ct_value) -> Backend {
    if v.r#type == types::ct_type::CT_TYPE_FWD {
        backend_of(v.nat_daddr, v.nat_dport)
    } else {
        backend_of(k.saddr, k.sport)
    }
}
