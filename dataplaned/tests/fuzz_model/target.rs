//! The real programs: the product's skeleton, or any object file built from the same sources
//! (a deliberately broken variant), loaded once with the fuzzer's configuration; map state in
//! and out in the model's terms; counters read in one batch.

use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, MapHandle, ObjectBuilder};

use super::model::*;
use crate::bpf_common::{as_bytes, from_bytes, require_root, types, PodVethSkelBuilder};

/// The ifindex BPF_PROG_TEST_RUN's skb carries (the namespace's loopback).
pub const POD_IFINDEX: u32 = 1;
/// Service counters compared (the generator's set ids are below this).
pub const SVC_IDS: u32 = 8;
const REASONS: u32 = types::reason::REASON_MAX.0;

struct Maps {
    ct: MapHandle,
    aff: MapHandle,
    frag: MapHandle,
    fe: MapHandle,
    be: MapHandle,
    bm: MapHandle,
    vip: MapHandle,
    pod: MapHandle,
    rsn: MapHandle,
    svc: MapHandle,
}

pub struct Target {
    pub name: String,
    pub cfg: Config,
    from_pod: OwnedFd,
    to_pod: OwnedFd,
    maps: Maps,
    ncpu: usize,
}

/// Counters: packets and bytes, summed over CPUs.
pub type Count = (u64, u64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counters {
    pub reasons: Vec<Count>,
    pub svc: Vec<Count>,
    /// rx packets, rx bytes, tx packets, tx bytes; None without the pod's entry.
    pub pod: Option<[u64; 4]>,
}

/// Map sizes for the fuzzer (the daemon sizes them too): small hash tables make reading a whole
/// map cheap (a hash map's iteration walks every bucket); still far above what a scenario holds,
/// so the LRU maps never evict.
const MAP_SIZES: [(&str, u32); 8] = [
    ("sl_ct_v2", 4096),
    ("sl_aff_v1", 1024),
    ("sl_frag_v1", 1024),
    ("sl_fe_v2", 256),
    ("sl_vip_v1", 256),
    ("sl_be_v2", 1024),
    ("sl_bm_v1", 1024),
    ("sl_node_v1", 64),
];

fn set_rodata(r: &mut types::rodata, cfg: &Config) {
    r.hairpin_addr = cfg.hairpin.to_be();
    r.ct_refresh_ns = cfg.refresh_ns;
    r.ct_syn_ns = cfg.syn_ns;
    r.ct_established_ns = cfg.established_ns;
    r.ct_fin_ns = cfg.fin_ns;
    r.ct_closed_ns = cfg.closed_ns;
    r.ct_rst_ns = cfg.rst_ns;
    r.ct_udp_ns = cfg.udp_ns;
    r.ct_udp_stream_ns = cfg.udp_stream_ns;
    r.xlate_port_min = cfg.xlate_min;
    r.xlate_port_max = cfg.xlate_max;
    r.frag_timeout_ns = cfg.frag_ns;
}

/// The product's defaults (bpf/config.h), as the skeleton carries them.
pub fn default_config() -> Config {
    require_root();
    let mut storage = MaybeUninit::uninit();
    let open = PodVethSkelBuilder::default()
        .open(&mut storage)
        .expect("opening the pod_veth BPF object");
    let r = open.maps.rodata_data.as_deref().expect(".rodata");
    Config {
        hairpin: u32::from_be(r.hairpin_addr),
        refresh_ns: r.ct_refresh_ns,
        syn_ns: r.ct_syn_ns,
        established_ns: r.ct_established_ns,
        fin_ns: r.ct_fin_ns,
        closed_ns: r.ct_closed_ns,
        rst_ns: r.ct_rst_ns,
        udp_ns: r.ct_udp_ns,
        udp_stream_ns: r.ct_udp_stream_ns,
        xlate_min: r.xlate_port_min,
        xlate_max: r.xlate_port_max,
        frag_ns: r.frag_timeout_ns,
    }
}

fn handle<T: std::fmt::Debug>(m: &libbpf_rs::MapImpl<'_, T>) -> MapHandle {
    MapHandle::try_from(m).expect("dup map fd")
}

impl Target {
    /// The product's pod_veth skeleton with `cfg` in .rodata and fresh, unpinned maps.
    pub fn skeleton(cfg: &Config) -> Target {
        require_root();
        let mut storage = MaybeUninit::uninit();
        let mut open = PodVethSkelBuilder::default()
            .open(&mut storage)
            .expect("opening the pod_veth BPF object");
        set_rodata(open.maps.rodata_data.as_deref_mut().expect(".rodata"), cfg);
        for mut m in open.open_object_mut().maps_mut() {
            if let Some((_, n)) = MAP_SIZES.iter().find(|(name, _)| m.name() == *name) {
                m.set_max_entries(*n).expect("set_max_entries");
            }
        }
        let skel = open.load().expect("loading pod_veth (verifier log above)");
        let m = &skel.maps;
        let maps = Maps {
            ct: handle(&m.sl_ct_v2),
            aff: handle(&m.sl_aff_v1),
            frag: handle(&m.sl_frag_v1),
            fe: handle(&m.sl_fe_v2),
            be: handle(&m.sl_be_v2),
            bm: handle(&m.sl_bm_v1),
            vip: handle(&m.sl_vip_v1),
            pod: handle(&m.sl_pod_v2),
            rsn: handle(&m.sl_rsn_v2),
            svc: handle(&m.sl_svc_v2),
        };
        let dup = |p: &libbpf_rs::ProgramMut<'_>| p.as_fd().try_clone_to_owned().unwrap();
        let t = Target {
            name: "pod_veth (product skeleton)".into(),
            cfg: *cfg,
            from_pod: dup(&skel.progs.from_pod),
            to_pod: dup(&skel.progs.to_pod),
            maps,
            ncpu: libbpf_rs::num_possible_cpus().expect("possible CPUs"),
        };
        // The skeleton and its object close here; the duplicated descriptors keep the programs
        // and maps alive (nothing is pinned).
        drop(skel);
        t
    }

    /// Any object file with the same programs and maps (by name) and the same .rodata layout.
    pub fn object(path: &Path, cfg: &Config, name: &str) -> Target {
        require_root();
        let mut open = ObjectBuilder::default()
            .open_file(path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        {
            let mut rodata = open
                .maps_mut()
                .find(|m| m.name().to_string_lossy().ends_with(".rodata"))
                .expect("object without .rodata");
            let bytes = rodata.initial_value_mut().expect(".rodata value");
            assert_eq!(
                bytes.len(),
                size_of::<types::rodata>(),
                ".rodata layout differs from the skeleton's"
            );
            // SAFETY: same size, and types::rodata is a repr(C) struct of integers.
            let r = unsafe { &mut *(bytes.as_mut_ptr() as *mut types::rodata) };
            set_rodata(r, cfg);
        }
        for mut m in open.maps_mut() {
            if let Some((_, n)) = MAP_SIZES.iter().find(|(name, _)| m.name() == *name) {
                m.set_max_entries(*n).expect("set_max_entries");
            }
        }
        let obj = open
            .load()
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()));
        let map = |n: &str| {
            let m = obj
                .maps()
                .find(|m| m.name() == n)
                .unwrap_or_else(|| panic!("no map {n}"));
            MapHandle::try_from(&m).expect("dup map fd")
        };
        let prog = |n: &str| {
            let p = obj
                .progs()
                .find(|p| p.name() == n)
                .unwrap_or_else(|| panic!("no program {n}"));
            p.as_fd().try_clone_to_owned().unwrap()
        };
        let maps = Maps {
            ct: map("sl_ct_v2"),
            aff: map("sl_aff_v1"),
            frag: map("sl_frag_v1"),
            fe: map("sl_fe_v2"),
            be: map("sl_be_v2"),
            bm: map("sl_bm_v1"),
            vip: map("sl_vip_v1"),
            pod: map("sl_pod_v2"),
            rsn: map("sl_rsn_v2"),
            svc: map("sl_svc_v2"),
        };
        Target {
            name: name.to_string(),
            cfg: *cfg,
            from_pod: prog("from_pod"),
            to_pod: prog("to_pod"),
            maps,
            ncpu: libbpf_rs::num_possible_cpus().expect("possible CPUs"),
        }
    }

    /// One BPF_PROG_TEST_RUN: (verdict, frame out), or the errno when the kernel refuses the
    /// frame (it refuses an IPv4 EtherType whose IP header is not all there).
    pub fn run(&self, prog: Prog, frame: &[u8]) -> Result<(u32, Vec<u8>), i32> {
        let fd = match prog {
            Prog::FromPod => &self.from_pod,
            Prog::ToPod => &self.to_pod,
        };
        let mut out = vec![0u8; frame.len() + 512];
        // SAFETY: zeroed is a valid bpf_test_run_opts; the buffers outlive the call.
        let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
        opts.sz = size_of::<libbpf_sys::bpf_test_run_opts>() as _;
        opts.data_in = frame.as_ptr().cast();
        opts.data_size_in = frame.len() as _;
        opts.data_out = out.as_mut_ptr().cast();
        opts.data_size_out = out.len() as _;
        opts.repeat = 1;
        let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(fd.as_raw_fd(), &mut opts) };
        if rc != 0 {
            return Err(-rc);
        }
        out.truncate(opts.data_size_out as usize);
        Ok((opts.retval, out))
    }

    // --- state in ------------------------------------------------------------------------

    fn clear_map(m: &MapHandle) {
        let keys: Vec<Vec<u8>> = m.keys().collect();
        for k in keys {
            let _ = m.delete(&k);
        }
    }

    /// Empties every map the programs read or write (counters are read as deltas).
    pub fn clear(&self) {
        let m = &self.maps;
        for map in [&m.ct, &m.aff, &m.frag, &m.fe, &m.be, &m.bm, &m.vip, &m.pod] {
            Target::clear_map(map);
        }
    }

    /// Writes a whole state into emptied maps (timestamps must be At).
    pub fn write(&self, st: &State) {
        let m = &self.maps;
        let any = MapFlags::ANY;
        for (k, v) in &st.fe {
            let key = types::frontend_key {
                addr: k.addr.to_be(),
                port: k.port.to_be(),
                proto: k.proto,
                pad: 0,
            };
            let val = types::frontend_value {
                cluster_id: v.cluster_id,
                cluster_count: v.cluster_count,
                local_id: v.local_id,
                local_count: v.local_count,
                affinity_timeout: v.affinity_timeout,
                r#gen: v.gen,
                flags: types::frontend_flags(v.flags),
                kind: types::frontend_kind(v.kind),
                pad: [0; 3],
            };
            m.fe.update(as_bytes(&key), as_bytes(&val), any).unwrap();
        }
        for a in &st.vip {
            m.vip
                .update(as_bytes(&a.to_be()), as_bytes(&1u32), any)
                .unwrap();
        }
        for ((set, slot), b) in &st.be {
            let key = types::backend_key {
                set_id: *set,
                slot: *slot,
            };
            let val = types::backend_value {
                addr: b.addr.to_be(),
                port: b.port.to_be(),
                flags: b.flags,
                node: b.node.to_be(),
            };
            m.be.update(as_bytes(&key), as_bytes(&val), any).unwrap();
        }
        for (set, addr, port) in &st.bm {
            let key = types::member_key {
                set_id: *set,
                addr: addr.to_be(),
                port: port.to_be(),
                pad: 0,
            };
            m.bm.update(as_bytes(&key), as_bytes(&1u32), any).unwrap();
        }
        if let Some(addr) = st.pod {
            let v = types::pod_info {
                addr: addr.to_be(),
                ..Default::default()
            };
            let vals = vec![as_bytes(&v).to_vec(); self.ncpu];
            m.pod
                .update_percpu(as_bytes(&POD_IFINDEX), &vals, any)
                .unwrap();
        }
        for (k, v) in &st.ct {
            m.ct.update(as_bytes(&ct_key(k)), as_bytes(&ct_value(v)), any)
                .unwrap();
        }
        for ((client, set), a) in &st.aff {
            let key = types::affinity_key {
                client: client.to_be(),
                svc_id: *set,
            };
            let val = types::affinity_value {
                last_used_ns: at(a.last),
                addr: a.addr.to_be(),
                port: a.port.to_be(),
                pad: 0,
            };
            m.aff.update(as_bytes(&key), as_bytes(&val), any).unwrap();
        }
        for (k, f) in &st.frag {
            let key = types::frag_key {
                saddr: k.saddr.to_be(),
                daddr: k.daddr.to_be(),
                id: k.id.to_be(),
                proto: k.proto,
                pad: 0,
            };
            let val = types::frag_value {
                first_ns: at(f.first),
                nat_saddr: f.nat_saddr.to_be(),
                nat_daddr: f.nat_daddr.to_be(),
                tun_addr: f.tun.to_be(),
                flags: f.flags,
            };
            m.frag.update(as_bytes(&key), as_bytes(&val), any).unwrap();
        }
    }

    // --- state out -----------------------------------------------------------------------

    fn entries(m: &MapHandle) -> Vec<(Vec<u8>, Vec<u8>)> {
        match m.lookup_batch(256, MapFlags::ANY, MapFlags::ANY) {
            Ok(it) => it.collect(),
            Err(_) => m
                .keys()
                .filter_map(|k| m.lookup(&k, MapFlags::ANY).unwrap().map(|v| (k, v)))
                .collect(),
        }
    }

    /// The maps the programs write: conntrack, affinity, fragments. Problems with a value's
    /// padding are returned as notes.
    pub fn read_dynamic(&self, st: &mut State, notes: &mut Vec<String>) {
        st.ct.clear();
        for (kb, vb) in Target::entries(&self.maps.ct) {
            let k: types::ct_key = from_bytes(&kb);
            let v: types::ct_value = from_bytes(&vb);
            if k.pad != [0; 3] || v.pad != [0; 2] {
                notes.push(format!(
                    "conntrack entry with non-zero padding: {k:?} {v:?}"
                ));
            }
            let key = Tuple {
                saddr: u32::from_be(k.saddr),
                sport: u16::from_be(k.sport),
                daddr: u32::from_be(k.daddr),
                dport: u16::from_be(k.dport),
                proto: k.proto,
            };
            st.ct.insert(
                key,
                Ct {
                    created: Stamp::At(v.created_ns),
                    last: Stamp::At(v.last_seen_ns),
                    nat_saddr: u32::from_be(v.nat_saddr),
                    nat_daddr: u32::from_be(v.nat_daddr),
                    nat_sport: u16::from_be(v.nat_sport),
                    nat_dport: u16::from_be(v.nat_dport),
                    set_id: v.set_id,
                    gen: v.r#gen,
                    tun: u32::from_be(v.tun_addr),
                    seen: v.seen.0,
                    ty: v.r#type.0,
                    flags: v.flags.0,
                },
            );
        }
        st.aff.clear();
        for (kb, vb) in Target::entries(&self.maps.aff) {
            let k: types::affinity_key = from_bytes(&kb);
            let v: types::affinity_value = from_bytes(&vb);
            if v.pad != 0 {
                notes.push(format!("affinity entry with non-zero padding: {v:?}"));
            }
            st.aff.insert(
                (u32::from_be(k.client), k.svc_id),
                Aff {
                    last: Stamp::At(v.last_used_ns),
                    addr: u32::from_be(v.addr),
                    port: u16::from_be(v.port),
                },
            );
        }
        st.frag.clear();
        for (kb, vb) in Target::entries(&self.maps.frag) {
            let k: types::frag_key = from_bytes(&kb);
            let v: types::frag_value = from_bytes(&vb);
            if k.pad != 0 {
                notes.push(format!("fragment key with non-zero padding: {k:?}"));
            }
            st.frag.insert(
                FragKey {
                    saddr: u32::from_be(k.saddr),
                    daddr: u32::from_be(k.daddr),
                    id: u16::from_be(k.id),
                    proto: k.proto,
                },
                Frag {
                    first: Stamp::At(v.first_ns),
                    nat_saddr: u32::from_be(v.nat_saddr),
                    nat_daddr: u32::from_be(v.nat_daddr),
                    tun: u32::from_be(v.tun_addr),
                    flags: v.flags,
                },
            );
        }
    }

    /// The maps only userspace writes, as they are now (the programs must leave them alone).
    pub fn read_config(&self) -> State {
        let mut st = State::default();
        for (kb, vb) in Target::entries(&self.maps.fe) {
            let k: types::frontend_key = from_bytes(&kb);
            let v: types::frontend_value = from_bytes(&vb);
            st.fe.insert(
                FeKey {
                    addr: u32::from_be(k.addr),
                    port: u16::from_be(k.port),
                    proto: k.proto,
                },
                Fe {
                    cluster_id: v.cluster_id,
                    cluster_count: v.cluster_count,
                    local_id: v.local_id,
                    local_count: v.local_count,
                    affinity_timeout: v.affinity_timeout,
                    gen: v.r#gen,
                    flags: v.flags.0,
                    kind: v.kind.0,
                },
            );
        }
        for (kb, _) in Target::entries(&self.maps.vip) {
            let a: u32 = from_bytes(&kb);
            st.vip.insert(u32::from_be(a));
        }
        for (kb, vb) in Target::entries(&self.maps.be) {
            let k: types::backend_key = from_bytes(&kb);
            let v: types::backend_value = from_bytes(&vb);
            st.be.insert(
                (k.set_id, k.slot),
                Be {
                    addr: u32::from_be(v.addr),
                    port: u16::from_be(v.port),
                    flags: v.flags,
                    node: u32::from_be(v.node),
                },
            );
        }
        for (kb, _) in Target::entries(&self.maps.bm) {
            let k: types::member_key = from_bytes(&kb);
            st.bm
                .insert((k.set_id, u32::from_be(k.addr), u16::from_be(k.port)));
        }
        let keys: Vec<Vec<u8>> = self.maps.pod.keys().collect();
        for kb in keys {
            let ifindex: u32 = from_bytes(&kb);
            if let Some(per_cpu) = self.maps.pod.lookup_percpu(&kb, MapFlags::ANY).unwrap() {
                let v: types::pod_info = from_bytes(&per_cpu[0]);
                if ifindex == POD_IFINDEX {
                    st.pod = Some(u32::from_be(v.addr));
                }
            }
        }
        st
    }

    // --- counters ------------------------------------------------------------------------

    /// Entries [0, n) of a per-CPU array of struct counter, in one BPF_MAP_LOOKUP_BATCH.
    fn percpu_counters(&self, m: &MapHandle, n: u32) -> Vec<Count> {
        self.percpu_pairs::<types::counter>(m, n, |v| (v.packets, v.bytes))
    }

    /// Entries [0, n) of a per-CPU array of T (a multiple of 8 bytes), as (packets, bytes).
    fn percpu_pairs<T: Copy + Default>(
        &self,
        m: &MapHandle,
        n: u32,
        pair: impl Fn(&T) -> (u64, u64),
    ) -> Vec<Count> {
        let stride = size_of::<T>();
        assert_eq!(stride % 8, 0, "per-CPU values are 8-byte aligned");
        let mut keys = vec![0u32; n as usize];
        let mut vals = vec![0u8; n as usize * self.ncpu * stride];
        let mut count = n;
        let mut out_batch = 0u32;
        // SAFETY: zeroed is valid for the options; buffers sized for `count` entries.
        let mut opts: libbpf_sys::bpf_map_batch_opts = unsafe { std::mem::zeroed() };
        opts.sz = size_of::<libbpf_sys::bpf_map_batch_opts>() as _;
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_batch(
                m.as_fd().as_raw_fd(),
                std::ptr::null_mut(),
                (&mut out_batch as *mut u32).cast(),
                keys.as_mut_ptr().cast(),
                vals.as_mut_ptr().cast(),
                &mut count,
                &opts,
            )
        };
        let err = std::io::Error::last_os_error();
        assert!(
            rc == 0 || (err.raw_os_error() == Some(libc::ENOENT) && count == n),
            "counter batch lookup: rc {rc} count {count}: {err}"
        );
        let mut out = vec![(0, 0); n as usize];
        for (i, &k) in keys.iter().enumerate().take(count as usize) {
            let mut c = (0u64, 0u64);
            for cpu in 0..self.ncpu {
                let b = &vals[(i * self.ncpu + cpu) * stride..][..stride];
                let v: T = from_bytes(b);
                let (p, by) = pair(&v);
                c.0 += p;
                c.1 += by;
            }
            out[k as usize] = c;
        }
        out
    }

    pub fn counters(&self) -> Counters {
        let pod = self
            .maps
            .pod
            .lookup_percpu(as_bytes(&POD_IFINDEX), MapFlags::ANY)
            .unwrap()
            .map(|per_cpu| {
                let mut s = [0u64; 4];
                for b in per_cpu {
                    let v: types::pod_info = from_bytes(&b);
                    s[0] += v.rx_packets;
                    s[1] += v.rx_bytes;
                    s[2] += v.tx_packets;
                    s[3] += v.tx_bytes;
                }
                s
            });
        Counters {
            reasons: self.percpu_counters(&self.maps.rsn, REASONS),
            svc: self.percpu_pairs::<types::svc_stats>(&self.maps.svc, SVC_IDS, |v| {
                (v.packets, v.bytes)
            }),
            pod,
        }
    }
}

fn at(s: Stamp) -> u64 {
    match s {
        Stamp::At(x) => x,
        Stamp::Now => panic!("a set-up timestamp must be absolute"),
    }
}

fn ct_key(k: &Tuple) -> types::ct_key {
    types::ct_key {
        saddr: k.saddr.to_be(),
        daddr: k.daddr.to_be(),
        sport: k.sport.to_be(),
        dport: k.dport.to_be(),
        proto: k.proto,
        pad: [0; 3],
    }
}

fn ct_value(v: &Ct) -> types::ct_value {
    types::ct_value {
        created_ns: at(v.created),
        last_seen_ns: at(v.last),
        nat_saddr: v.nat_saddr.to_be(),
        nat_daddr: v.nat_daddr.to_be(),
        nat_sport: v.nat_sport.to_be(),
        nat_dport: v.nat_dport.to_be(),
        set_id: v.set_id,
        r#gen: v.gen,
        tun_addr: v.tun.to_be(),
        seen: types::tcp_flag_bits(v.seen),
        r#type: types::ct_type(v.ty),
        flags: types::ct_flags(v.flags),
        pad: [0; 2],
    }
}
