//! [`ServiceMaps`] over the pinned BPF maps, with the skeleton's types. Batches of more than a few
//! entries go in one `BPF_MAP_UPDATE_BATCH` / `BPF_MAP_DELETE_BATCH` syscall (measured on 10k
//! entries: see the README's services section); deletes of entries already gone succeed.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Context, Result};
use libbpf_rs::{MapCore, MapFlags, MapHandle};
use sluice_core::bpf::pod_veth::types;

use super::model::{Backend, FrontendKey, Placement, Proto};
use super::writer::{FrontendValue, ServiceMaps, Slot};
use crate::datapath::Maps;
use crate::pod::{as_bytes, from_bytes};

/// Below this many entries, one syscall per entry.
const BATCH_MIN: usize = 8;

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
///
/// The kernel may return a short batch before the end (a hash map's batch holds whole buckets):
/// only ENOENT ends the walk. (libbpf-rs 0.27's `lookup_batch` iterator stops at the first short
/// batch, which dropped all but ~4,095 of 10,000 frontends from a restart's view of the maps.)
pub fn dump<K: Copy + Default, V: Copy + Default>(map: &MapHandle) -> Result<Vec<(K, V)>> {
    let (ks, vs) = (map.key_size() as usize, map.value_size() as usize);
    let mut batch = 4096usize;
    let mut keys = vec![0u8; batch * ks];
    let mut values = vec![0u8; batch * vs];
    // The position token: a bucket or index (u32) for the kernel's maps; room for a u64.
    let (mut token_in, mut token_out) = ([0u8; 8], [0u8; 8]);
    let mut first = true;
    let mut out = Vec::new();
    loop {
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
            ..Default::default()
        };
        let mut count = batch as u32;
        // SAFETY: the buffers hold `batch` keys and values of the map's sizes; the tokens are
        // larger than the kernel's u32 batch position.
        let ret = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                map.as_fd().as_raw_fd(),
                if first {
                    std::ptr::null_mut()
                } else {
                    token_in.as_mut_ptr().cast()
                },
                token_out.as_mut_ptr().cast(),
                keys.as_mut_ptr().cast(),
                values.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let errno = if ret < 0 { -ret } else { 0 };
        if errno == libc::ENOSPC && count == 0 {
            // One bucket holds more entries than the batch: a larger batch.
            batch *= 2;
            keys.resize(batch * ks, 0);
            values.resize(batch * vs, 0);
            continue;
        }
        if errno != 0 && errno != libc::ENOENT {
            return Err(std::io::Error::from_raw_os_error(errno)).context("batched map lookup");
        }
        let n = count as usize;
        out.extend(
            keys[..n * ks]
                .chunks_exact(ks)
                .zip(values[..n * vs].chunks_exact(vs))
                .map(|(k, v)| (from_bytes::<K>(k), from_bytes::<V>(v))),
        );
        if errno == libc::ENOENT {
            return Ok(out);
        }
        token_in = token_out;
        first = false;
    }
}

fn bytes_of<T: Copy>(items: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(std::mem::size_of_val(items));
    for i in items {
        out.extend_from_slice(as_bytes(i));
    }
    out
}

/// Writes `keys` → `values` (same length), batched when there are enough.
fn update_all<K: Copy, V: Copy>(
    map: &MapHandle,
    what: &str,
    keys: &[K],
    values: &[V],
) -> Result<()> {
    debug_assert_eq!(keys.len(), values.len());
    if keys.len() < BATCH_MIN {
        for (k, v) in keys.iter().zip(values) {
            map.update(as_bytes(k), as_bytes(v), MapFlags::ANY)
                .with_context(|| format!("writing {what}"))?;
        }
        return Ok(());
    }
    map.update_batch(
        &bytes_of(keys),
        &bytes_of(values),
        keys.len() as u32,
        MapFlags::ANY,
        MapFlags::ANY,
    )
    .with_context(|| format!("writing {} {what} entries in a batch", keys.len()))
}

/// Deletes `keys`; keys already absent are fine.
fn delete_all<K: Copy>(map: &MapHandle, what: &str, keys: &[K]) -> Result<()> {
    if keys.len() < BATCH_MIN {
        for k in keys {
            match map.delete(as_bytes(k)) {
                Ok(()) => {}
                Err(e) if e.kind() == libbpf_rs::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("deleting {what}")),
            }
        }
        return Ok(());
    }
    let bytes = bytes_of(keys);
    let size = std::mem::size_of::<K>();
    let mut from = 0;
    while from < keys.len() {
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
            elem_flags: 0,
            flags: 0,
            ..Default::default()
        };
        let mut count = (keys.len() - from) as u32;
        // SAFETY: `bytes` holds `keys.len()` keys of the map's key size from offset `from`.
        let ret = unsafe {
            libbpf_sys::bpf_map_delete_batch(
                map.as_fd().as_raw_fd(),
                bytes[from * size..].as_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        if ret == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOENT) {
            return Err(err).with_context(|| format!("deleting {what} entries in a batch"));
        }
        // The batch stopped at a key that is not there: skip it and go on.
        from += count as usize + 1;
    }
    Ok(())
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
                            cluster_id: v.cluster_id,
                            cluster_count: v.cluster_count,
                            local_id: v.local_id,
                            local_count: v.local_count,
                            affinity_timeout: v.affinity_timeout,
                            gen: v.r#gen,
                            flags: v.flags.0,
                            kind: v.kind.0,
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

    fn slots(&self) -> Result<Vec<(u32, u32, Slot)>> {
        Ok(
            dump::<types::backend_key, types::backend_value>(&self.maps.backends)?
                .into_iter()
                .map(|(k, v)| {
                    let slot = Slot {
                        backend: backend_of(v.addr, v.port),
                        at: Placement {
                            local: v.flags & types::backend_flags::BE_F_LOCAL.0 as u16 != 0,
                            node: Ipv4Addr::from(u32::from_be(v.node)),
                        },
                    };
                    (k.set_id, k.slot, slot)
                })
                .collect(),
        )
    }

    fn members(&self) -> Result<Vec<(u32, Backend)>> {
        Ok(dump::<types::member_key, u32>(&self.maps.members)?
            .into_iter()
            .map(|(k, _)| (k.set_id, backend_of(k.addr, k.port)))
            .collect())
    }

    fn put_frontends(&mut self, e: &[(FrontendKey, FrontendValue)]) -> Result<()> {
        let keys: Vec<types::frontend_key> = e.iter().map(|(k, _)| fe_key(k)).collect();
        let values: Vec<types::frontend_value> = e
            .iter()
            .map(|(_, v)| types::frontend_value {
                cluster_id: v.cluster_id,
                cluster_count: v.cluster_count,
                local_id: v.local_id,
                local_count: v.local_count,
                affinity_timeout: v.affinity_timeout,
                r#gen: v.gen,
                flags: types::frontend_flags(v.flags),
                kind: types::frontend_kind(v.kind),
                ..Default::default()
            })
            .collect();
        update_all(&self.maps.frontends, "frontend", &keys, &values)
    }

    fn delete_frontends(&mut self, k: &[FrontendKey]) -> Result<()> {
        let keys: Vec<types::frontend_key> = k.iter().map(fe_key).collect();
        delete_all(&self.maps.frontends, "frontend", &keys)
    }

    fn put_markers(&mut self, vips: &[Ipv4Addr]) -> Result<()> {
        let keys: Vec<u32> = vips.iter().map(|v| u32::from(*v).to_be()).collect();
        update_all(&self.maps.vips, "VIP", &keys, &vec![1u32; keys.len()])
    }

    fn delete_markers(&mut self, vips: &[Ipv4Addr]) -> Result<()> {
        let keys: Vec<u32> = vips.iter().map(|v| u32::from(*v).to_be()).collect();
        delete_all(&self.maps.vips, "VIP", &keys)
    }

    fn put_slots(&mut self, e: &[(u32, u32, Slot)]) -> Result<()> {
        let keys: Vec<types::backend_key> = e
            .iter()
            .map(|(set_id, slot, _)| types::backend_key {
                set_id: *set_id,
                slot: *slot,
            })
            .collect();
        let values: Vec<types::backend_value> = e
            .iter()
            .map(|(_, _, s)| types::backend_value {
                addr: u32::from(s.backend.ip).to_be(),
                port: s.backend.port.to_be(),
                flags: if s.at.local {
                    types::backend_flags::BE_F_LOCAL.0 as u16
                } else {
                    0
                },
                node: u32::from(s.at.node).to_be(),
            })
            .collect();
        update_all(&self.maps.backends, "backend slot", &keys, &values)
    }

    fn delete_slots(&mut self, e: &[(u32, u32)]) -> Result<()> {
        let keys: Vec<types::backend_key> = e
            .iter()
            .map(|(set_id, slot)| types::backend_key {
                set_id: *set_id,
                slot: *slot,
            })
            .collect();
        delete_all(&self.maps.backends, "backend slot", &keys)
    }

    fn put_members(&mut self, e: &[(u32, Backend)]) -> Result<()> {
        let keys: Vec<types::member_key> = e.iter().map(|(id, b)| member_key(*id, b)).collect();
        update_all(
            &self.maps.members,
            "backend set member",
            &keys,
            &vec![1u32; keys.len()],
        )
    }

    fn delete_members(&mut self, e: &[(u32, Backend)]) -> Result<()> {
        let keys: Vec<types::member_key> = e.iter().map(|(id, b)| member_key(*id, b)).collect();
        delete_all(&self.maps.members, "backend set member", &keys)
    }

    fn reset_counters(&mut self, ids: &[u32]) -> Result<()> {
        // A per-CPU array: one value per possible CPU for each key, in one batch.
        let cpus = libbpf_rs::num_possible_cpus()?;
        let zero = vec![0u8; std::mem::size_of::<types::svc_stats>() * cpus * ids.len()];
        let opts = libbpf_sys::bpf_map_batch_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_batch_opts>() as _,
            elem_flags: 0,
            flags: 0,
            ..Default::default()
        };
        let mut count = ids.len() as u32;
        // SAFETY: `ids` are `count` u32 keys; `zero` holds `count` per-CPU values.
        let ret = unsafe {
            libbpf_sys::bpf_map_update_batch(
                self.maps.services.as_fd().as_raw_fd(),
                ids.as_ptr().cast(),
                zero.as_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        if ret != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("zeroing the counters of {} service ids", ids.len()));
        }
        Ok(())
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

#[cfg(test)]
mod bench {
    use super::*;
    use libbpf_rs::{MapHandle, MapType};

    /// Single updates vs one batch on a BPF hash map like sl_be_v2 (root):
    /// `cargo test --release -p sluice-dataplaned --lib map_batch_bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn map_batch_bench() {
        let n: u32 = 20_000;
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            map_flags: libbpf_sys::BPF_F_NO_PREALLOC,
            ..Default::default()
        };
        let keys: Vec<types::backend_key> = (0..n)
            .map(|i| types::backend_key {
                set_id: i / 2,
                slot: i % 2,
            })
            .collect();
        let values: Vec<types::backend_value> = (0..n)
            .map(|i| types::backend_value {
                addr: i,
                port: 80,
                flags: 0,
                node: 0,
            })
            .collect();
        let prealloc = libbpf_sys::bpf_map_create_opts {
            map_flags: 0,
            ..opts
        };
        for round in 0..4 {
            let o = if round % 2 == 0 { &opts } else { &prealloc };
            let map = MapHandle::create(MapType::Hash, Some("slbench"), 8, 12, 262144, o).unwrap();
            let t = std::time::Instant::now();
            for (k, v) in keys.iter().zip(&values) {
                map.update(as_bytes(k), as_bytes(v), MapFlags::ANY).unwrap();
            }
            let single = t.elapsed();
            let t = std::time::Instant::now();
            for k in &keys {
                map.delete(as_bytes(k)).unwrap();
            }
            let single_del = t.elapsed();
            let t = std::time::Instant::now();
            update_all(&map, "bench", &keys, &values).unwrap();
            let batch = t.elapsed();
            let t = std::time::Instant::now();
            delete_all(&map, "bench", &keys).unwrap();
            let batch_del = t.elapsed();
            eprintln!("round {round} (flags {}): {n} updates: single {single:?}, batch {batch:?}; deletes: single {single_del:?}, batch {batch_del:?}", o.map_flags);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libbpf_rs::MapType;

    /// `dump` walks a whole map, past the short batches a hash map returns before its end
    /// (root: real BPF maps).
    #[test]
    fn dump_returns_every_entry_of_a_large_map() {
        let opts = libbpf_sys::bpf_map_create_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
            ..Default::default()
        };
        for (ty, n) in [
            (MapType::Hash, 0u32),
            (MapType::Hash, 4096),
            (MapType::Hash, 10_000),
            (MapType::LruHash, 20_000),
        ] {
            let map = MapHandle::create(ty, Some("sl_dump_test"), 4, 4, 262_144, &opts)
                .expect("creating a BPF map (run the tests as root)");
            for i in 0..n {
                map.update(&i.to_ne_bytes(), &(i * 3).to_ne_bytes(), MapFlags::ANY)
                    .unwrap();
            }
            let mut got = dump::<u32, u32>(&map).unwrap();
            got.sort_unstable();
            assert_eq!(got.len(), n as usize, "{ty:?} with {n} entries");
            for (i, (k, v)) in got.iter().enumerate() {
                assert_eq!((*k, *v), (i as u32, i as u32 * 3), "{ty:?}");
            }
        }
    }
}
