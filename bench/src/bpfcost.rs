//! Figure 4: BPF cost per packet with BPF_PROG_TEST_RUN, on sluice's own pod_veth skeleton
//! (sluice_core::bpf::pod_veth, fresh unpinned maps). Map keys and values are the skeleton's
//! generated types, so a layout change is a compile error here, not a silent misreading.
//!
//! Cases, each with 1 and with 65,536 frontends in sl_fe_v1 (2 backends each):
//! - new flow: a SYN with a fresh 5-tuple per run (repeat=1, many runs, median of the kernel's
//!   per-run time): frontend lookup, backend pick, two conntrack inserts, DNAT.
//! - established: repeat=R on one frame that every run rewrites: frontend F1's backend is
//!   frontend F2 and F2's is F1, both flows set up, so each repeated run is a conntrack hit
//!   with DNAT (checked with the reason counters).
//! - reply: the same trick on to_pod's reverse NAT.
//! - non-service: a frame to a non-VIP address (one frontend lookup), repeat=R.
//! - harness floor: a two-instruction program (`r0 = TC_ACT_OK; exit`) run the same way on the
//!   same frame: what every row includes besides sluice's code (the test-run loop, the skb).

use std::mem::MaybeUninit;
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use etherparse::PacketBuilder;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput};
use serde_json::{json, Value};
use sluice_core::bpf::pod_veth::{types, PodVethSkel, PodVethSkelBuilder};

fn as_bytes<T>(v: &T) -> &[u8] {
    // SAFETY: the skeleton's generated #[repr(C)] plain-data types, read as bytes.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
}

fn be32(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}

const MAC_POD: [u8; 6] = [0x02, 0, 0x0a, 0, 1, 5];
const MAC_HOST: [u8; 6] = [0xee; 6];
const SYN: u8 = 1;
const ACK: u8 = 2;

fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, to_pod: bool) -> Vec<u8> {
    let (es, ed) = if to_pod {
        (MAC_HOST, MAC_POD)
    } else {
        (MAC_POD, MAC_HOST)
    };
    let b = PacketBuilder::ethernet2(es, ed)
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 0x01020304, 64240);
    let b = if flags & SYN != 0 {
        b.syn()
    } else {
        b.ack(0x0a0b0c0d).psh()
    };
    let payload: &[u8] = if flags & SYN != 0 {
        &[]
    } else {
        b"GET / HTTP/1.1\r\n\r\n"
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building a frame");
    out
}

struct Dp {
    skel: PodVethSkel<'static>,
}

impl Dp {
    fn load() -> Result<Dp> {
        let storage = Box::leak(Box::new(MaybeUninit::uninit()));
        let open = PodVethSkelBuilder::default()
            .open(storage)
            .context("opening pod_veth")?;
        let skel = open.load().context("loading pod_veth")?;
        Ok(Dp { skel })
    }

    fn frontend(&self, vip: Ipv4Addr, port: u16, svc: u32, count: u32) -> Result<()> {
        let k = types::frontend_key {
            addr: be32(vip),
            port: port.to_be(),
            proto: 6,
            ..Default::default()
        };
        let v = types::frontend_value {
            cluster_id: svc,
            cluster_count: count,
            local_id: svc,
            kind: types::frontend_kind::FE_KIND_CLUSTER_IP,
            ..Default::default()
        };
        self.skel
            .maps
            .sl_fe_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)?;
        self.skel
            .maps
            .sl_vip_v1
            .update(as_bytes(&be32(vip)), as_bytes(&1u32), MapFlags::ANY)?;
        Ok(())
    }

    fn backend(&self, svc: u32, slot: u32, addr: Ipv4Addr, port: u16) -> Result<()> {
        let k = types::backend_key {
            set_id: svc,
            slot,
            ..Default::default()
        };
        let v = types::backend_value {
            addr: be32(addr),
            port: port.to_be(),
            ..Default::default()
        };
        self.skel
            .maps
            .sl_be_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)?;
        let m = types::member_key {
            set_id: svc,
            addr: be32(addr),
            port: port.to_be(),
            ..Default::default()
        };
        self.skel
            .maps
            .sl_bm_v1
            .update(as_bytes(&m), as_bytes(&1u32), MapFlags::ANY)?;
        Ok(())
    }

    /// The per-pod counter entry the daemon creates on attach (test_run's skb is on lo, ifindex 1).
    fn pod_entry(&self) -> Result<()> {
        let cpus = libbpf_rs::num_possible_cpus()?;
        let zero = vec![as_bytes(&types::pod_info::default()).to_vec(); cpus];
        self.skel
            .maps
            .sl_pod_v2
            .update_percpu(as_bytes(&1u32), &zero, MapFlags::ANY)?;
        Ok(())
    }

    fn reason(&self, r: types::reason) -> u64 {
        let Ok(Some(per_cpu)) = self
            .skel
            .maps
            .sl_rsn_v2
            .lookup_percpu(as_bytes(&r.0), MapFlags::ANY)
        else {
            return 0;
        };
        per_cpu
            .iter()
            .map(|b| {
                let mut c = types::counter::default();
                let n = b.len().min(std::mem::size_of::<types::counter>());
                // SAFETY: copying the counter's bytes into a plain-data struct.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), &mut c as *mut _ as *mut u8, n)
                };
                c.packets
            })
            .sum()
    }

    /// (verdict, frame out, kernel's mean ns per run)
    fn run(&self, to_pod: bool, pkt: &[u8], repeat: u32) -> Result<(u32, Vec<u8>, f64)> {
        let p = if to_pod {
            &self.skel.progs.to_pod
        } else {
            &self.skel.progs.from_pod
        };
        let mut buf = vec![0u8; pkt.len() + 512];
        let out = p.test_run(ProgramInput {
            data_in: Some(pkt),
            data_out: Some(&mut buf),
            repeat,
            ..Default::default()
        })?;
        let n = out.data.as_ref().map(|d| d.len()).unwrap_or(0);
        let (verdict, ns) = (out.return_value, out.duration.as_nanos() as f64);
        buf.truncate(n);
        Ok((verdict, buf, ns))
    }
}

/// The kernel's mean ns per run of an empty SCHED_CLS program on `pkt` (PROG_TEST_RUN, repeat).
fn floor_ns(pkt: &[u8], repeat: u32) -> Result<f64> {
    use libbpf_rs::libbpf_sys as sys;
    // SAFETY: plain-data instruction structs, zero (r0, no source register) but for code/imm.
    let mut insns: [sys::bpf_insn; 2] = unsafe { std::mem::zeroed() };
    insns[0].code = (sys::BPF_ALU64 | sys::BPF_MOV | sys::BPF_K) as u8; // r0 = 0 (TC_ACT_OK)
    insns[1].code = (sys::BPF_JMP | sys::BPF_EXIT) as u8;
    // SAFETY: valid instructions and NUL-terminated strings; the fd is closed below.
    let fd = unsafe {
        sys::bpf_prog_load(
            sys::BPF_PROG_TYPE_SCHED_CLS,
            c"sl_floor".as_ptr(),
            c"GPL".as_ptr(),
            insns.as_ptr(),
            insns.len() as _,
            std::ptr::null_mut(),
        )
    };
    if fd < 0 {
        bail!(
            "loading the empty program: {}",
            std::io::Error::from_raw_os_error(-fd)
        );
    }
    let mut out = vec![0u8; pkt.len() + 512];
    let mut opts = sys::bpf_test_run_opts {
        sz: std::mem::size_of::<sys::bpf_test_run_opts>() as _,
        data_in: pkt.as_ptr().cast(),
        data_size_in: pkt.len() as u32,
        data_out: out.as_mut_ptr().cast(),
        data_size_out: out.len() as u32,
        repeat: repeat as i32,
        ..Default::default()
    };
    // SAFETY: opts points at live buffers of the sizes given.
    let r = unsafe { sys::bpf_prog_test_run_opts(fd, &mut opts) };
    // SAFETY: our own fd.
    unsafe { libc::close(fd) };
    if r < 0 {
        bail!(
            "test run of the empty program: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(opts.duration as f64)
}

fn dst_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    let ip = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let port = u16::from_be_bytes([frame[36], frame[37]]);
    (ip, port)
}

/// One set of measurements with `frontends` frontends: JSON rows {case, ns, how, checked}.
pub fn measure(frontends: usize, runs: usize, repeat: u32) -> Result<Vec<Value>> {
    // The established/reply trick needs its own two frontends: "1 frontend" means these three.
    let in_map = frontends.max(3);
    let dp = Dp::load()?;
    dp.pod_entry()?;
    let client = Ipv4Addr::new(10, 244, 0, 5);
    let be = [Ipv4Addr::new(10, 244, 0, 7), Ipv4Addr::new(10, 244, 0, 8)];
    // The measured frontend (svc 1), the flip-flop pair (svc 2, 3), and the fill.
    let fe = (crate::rules::vip(0), 80u16);
    let f1 = (Ipv4Addr::new(10, 111, 0, 1), 80u16);
    let f2 = (Ipv4Addr::new(10, 111, 0, 2), 81u16);
    dp.frontend(fe.0, fe.1, 1, 2)?;
    dp.backend(1, 0, be[0], 8080)?;
    dp.backend(1, 1, be[1], 8080)?;
    dp.frontend(f1.0, f1.1, 2, 1)?;
    dp.backend(2, 0, f2.0, f2.1)?;
    dp.frontend(f2.0, f2.1, 3, 1)?;
    dp.backend(3, 0, f1.0, f1.1)?;
    for i in 3..frontends {
        let svc = i as u32 + 1;
        let svc = svc % 65536; // sl_svc_v1 indexes
        dp.frontend(crate::rules::vip(i), 80, svc, 2)?;
        dp.backend(svc, 0, be[0], 8080)?;
        dp.backend(svc, 1, be[1], 8080)?;
    }
    let mut rows = vec![];
    let mut push = |case: &str, ns: f64, how: String, checked: bool| {
        rows.push(json!({"frontends": frontends, "frontends_in_map": in_map, "case": case, "ns": ns, "how": how, "checked": checked}));
    };

    // New flows: a fresh source port (and address every 50,000) per run.
    let before = dp.reason(types::reason::REASON_NAT_NEW);
    let mut d = vec![];
    for i in 0..runs {
        let src = (
            Ipv4Addr::new(10, 244, 1, (i / 50_000) as u8 + 1),
            (10_000 + i % 50_000) as u16,
        );
        let (v, _, ns) = dp.run(false, &tcp_frame(src, fe, SYN, false), 1)?;
        if v != 0 {
            bail!("new flow: verdict {v}");
        }
        d.push(ns);
    }
    let ok = dp.reason(types::reason::REASON_NAT_NEW) - before == runs as u64;
    push(
        "new flow",
        crate::stats::median(&d).unwrap_or(0.0),
        format!("{runs} runs x repeat=1, median"),
        ok,
    );

    // Established: the flip-flop pair.
    let c = (client, 50_000u16);
    let (_, r1, _) = dp.run(false, &tcp_frame(c, f1, SYN, false), 1)?;
    let (_, r2, _) = dp.run(false, &r1, 1)?;
    if dst_of(&r1) != f2 || dst_of(&r2) != f1 {
        bail!("the flip-flop pair did not set up");
    }
    let before = dp.reason(types::reason::REASON_NAT_ESTABLISHED);
    let (_, _, ns) = dp.run(false, &tcp_frame(c, f1, ACK, false), repeat)?;
    let ok = dp.reason(types::reason::REASON_NAT_ESTABLISHED) - before == repeat as u64;
    push(
        "established",
        ns,
        format!("repeat={repeat}, 2 flows in turn"),
        ok,
    );

    // Reply: reverse NAT of F2 -> c (=> F1) and F1 -> c (=> F2) in turn.
    let before = dp.reason(types::reason::REASON_REV_NAT);
    let (_, _, ns) = dp.run(true, &tcp_frame(f2, c, ACK, true), repeat)?;
    let ok = dp.reason(types::reason::REASON_REV_NAT) - before == repeat as u64;
    push("reply", ns, format!("repeat={repeat}, 2 flows in turn"), ok);

    // Non-service: one frontend lookup, untouched.
    let other = tcp_frame(c, (Ipv4Addr::new(10, 244, 0, 99), 443), ACK, false);
    let before = dp.reason(types::reason::REASON_PASS);
    let (v, out, ns) = dp.run(false, &other, repeat)?;
    let ok =
        v == 0 && out == other && dp.reason(types::reason::REASON_PASS) - before == repeat as u64;
    push("non-service", ns, format!("repeat={repeat}"), ok);

    // to_pod, non-service (one conntrack miss).
    let other_in = tcp_frame((Ipv4Addr::new(10, 244, 0, 99), 443), c, ACK, true);
    let (v, out, ns) = dp.run(true, &other_in, repeat)?;
    push(
        "non-service to_pod",
        ns,
        format!("repeat={repeat}"),
        v == 0 && out == other_in,
    );

    let ns = floor_ns(&other, repeat)?;
    push(
        "harness floor (empty program)",
        ns,
        format!("repeat={repeat}"),
        true,
    );
    Ok(rows)
}
