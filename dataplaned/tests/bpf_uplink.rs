//! BPF_PROG_TEST_RUN tests of bpf/uplink.bpf.c (issue 8): external frontends on a node's uplink.
//! Byte for byte: the VXLAN encapsulation an ingress node builds (outer IPv4 from this node to the
//! backend's, UDP to 4789 with checksum 0 and a hashed source port, sluice's VNI, zeroed inner
//! MACs, the client's packet unchanged), the backend node's decapsulation and DNAT, the reply whose
//! source becomes the frontend (DSR) or that goes back encapsulated (tunnel mode), the MSS clamp
//! and the ICMP fragmentation-needed answer.
//!
//! The runs happen inside a network namespace of the test's own, on a veth whose MTU (1500) the
//! programs see, as on a real uplink (`ctx.ifindex`).

mod bpf_common;

use std::mem::MaybeUninit;
use std::net::Ipv4Addr;

use bpf_common::*;
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput};
use sluice_core::bpf::uplink::{types as ut, UplinkSkel, UplinkSkelBuilder};

const NODE_A: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 2);
const EXT: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const LB_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 60, 10);
const NP: u16 = 30080;
const CPORT: u16 = 40000;
const SET: u32 = 1;
const LOCAL_SET: u32 = 2;
const VNI: u32 = 0x5c1ce;
const MAC_NET: [u8; 6] = [0x02, 0, 0, 0, 0, 0x64];
const MAC_UPLINK: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The uplink programs, loaded with `mode` and this node's address, and the veth they run on.
struct Up {
    skel: UplinkSkel<'static>,
    ifindex: u32,
    _net: TestNet,
}

/// A network namespace with a veth (MTU 1500) the test thread runs in.
struct TestNet {
    name: String,
    old: std::fs::File,
}

impl TestNet {
    fn new() -> TestNet {
        require_root();
        let name = format!("sltup-{}-{}", std::process::id(), rand_u32());
        let sh = |c: &str| {
            let st = std::process::Command::new("sh")
                .args(["-c", c])
                .status()
                .unwrap();
            assert!(st.success(), "{c}");
        };
        sh(&format!("ip netns add {name}"));
        sh(&format!("ip -n {name} link add up0 type veth peer name up1 && ip -n {name} link set up0 mtu 1500 up && ip -n {name} link set up1 up"));
        let old = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        TestNet { name, old }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        let _ = nix::sched::setns(&self.old, nix::sched::CloneFlags::CLONE_NEWNET);
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u32::from_ne_bytes(b)
}

fn key_of(addr: Ipv4Addr, port: u16, proto: u8) -> ut::frontend_key {
    ut::frontend_key {
        addr: be32(addr),
        port: port.to_be(),
        proto,
        pad: 0,
    }
}

impl Up {
    fn load(me: Ipv4Addr, tunnel: bool) -> Up {
        let net = TestNet::new();
        let ifindex = nix::net::if_::if_nametoindex("up0").unwrap();
        let storage = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = UplinkSkelBuilder::default().open(storage).unwrap();
        let ro = open.maps.rodata_data.as_deref_mut().unwrap();
        ro.node_addr = be32(me);
        if tunnel {
            ro.lb_mode = ut::lb_mode::LB_MODE_TUNNEL;
        }
        assert_eq!(
            (ro.vxlan_port, ro.vxlan_vni),
            (4789, VNI),
            "config.h defaults"
        );
        let skel = open.load().expect("loading uplink (verifier log above)");
        let up = Up {
            skel,
            ifindex,
            _net: net,
        };
        // This node and the other, as Node objects make them.
        up.node(me, true);
        up.node(if me == NODE_A { NODE_B } else { NODE_A }, false);
        up
    }

    fn node(&self, addr: Ipv4Addr, me: bool) {
        let v = ut::node_value {
            flags: if me { ut::node_flags::NODE_F_SELF.0 } else { 0 },
            pad: 0,
        };
        self.skel
            .maps
            .sl_node_v1
            .update(as_bytes(&be32(addr)), as_bytes(&v), MapFlags::ANY)
            .unwrap();
    }

    /// A NodePort (wildcard) or exact frontend with a cluster set and a local set.
    fn frontend(&self, k: ut::frontend_key, cluster: u32, local: u32, flags: u32, kind: u8) {
        let v = ut::frontend_value {
            cluster_id: SET,
            cluster_count: cluster,
            local_id: LOCAL_SET,
            local_count: local,
            flags: ut::frontend_flags(flags | ut::frontend_flags::FE_F_EXTERNAL.0),
            kind: ut::frontend_kind(kind),
            ..Default::default()
        };
        self.skel
            .maps
            .sl_fe_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .unwrap();
    }

    fn backend(&self, set: u32, slot: u32, addr: Ipv4Addr, port: u16, local: bool, node: Ipv4Addr) {
        let k = ut::backend_key { set_id: set, slot };
        let v = ut::backend_value {
            addr: be32(addr),
            port: port.to_be(),
            flags: if local {
                ut::backend_flags::BE_F_LOCAL.0 as u16
            } else {
                0
            },
            node: be32(node),
        };
        self.skel
            .maps
            .sl_be_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .unwrap();
        let m = ut::member_key {
            set_id: set,
            addr: be32(addr),
            port: port.to_be(),
            pad: 0,
        };
        self.skel
            .maps
            .sl_bm_v1
            .update(as_bytes(&m), as_bytes(&1u32), MapFlags::ANY)
            .unwrap();
    }

    /// The writer's view of an endpoint leaving: its membership goes, then the frontend's
    /// generation moves on.
    fn leave(&self, set: u32, addr: Ipv4Addr, port: u16) {
        let m = ut::member_key {
            set_id: set,
            addr: be32(addr),
            port: port.to_be(),
            pad: 0,
        };
        self.skel.maps.sl_bm_v1.delete(as_bytes(&m)).unwrap();
    }

    fn bump_gen(&self, k: ut::frontend_key) {
        let fe = &self.skel.maps.sl_fe_v2;
        let mut v: ut::frontend_value =
            from_bytes(&fe.lookup(as_bytes(&k), MapFlags::ANY).unwrap().unwrap());
        v.r#gen += 1;
        fe.update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .unwrap();
    }

    fn run(&self, ingress: bool, pkt: &[u8]) -> (u32, Vec<u8>) {
        let p = if ingress {
            &self.skel.progs.from_net
        } else {
            &self.skel.progs.to_net
        };
        // struct __sk_buff (linux/bpf.h): 192 bytes, ifindex at offset 40; the device the
        // program sees (its MTU) is the test's veth.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&self.ifindex.to_ne_bytes());
        let ctx_bytes = &mut ctx[..];
        let mut out = vec![0u8; pkt.len() + 256];
        let input = ProgramInput {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            context_in: Some(ctx_bytes),
            ..Default::default()
        };
        let r = p.test_run(input).expect("BPF_PROG_TEST_RUN");
        let (v, n) = (r.return_value, r.data.as_ref().unwrap().len());
        drop(r);
        out.truncate(n);
        (v, out)
    }

    fn reason(&self, r: ut::reason) -> u64 {
        let per_cpu = self
            .skel
            .maps
            .sl_rsn_v2
            .lookup_percpu(as_bytes(&r.0), MapFlags::ANY)
            .unwrap()
            .unwrap();
        per_cpu
            .iter()
            .map(|b| from_bytes::<ut::counter>(b).packets)
            .sum()
    }

    fn ct(&self) -> Vec<Ct> {
        let m = &self.skel.maps.sl_ct_v2;
        let mut v: Vec<Ct> = m
            .keys()
            .map(|kb| {
                let vb = m.lookup(&kb, MapFlags::ANY).unwrap().unwrap();
                let k: types::ct_key = from_bytes(&kb);
                let val: types::ct_value = from_bytes(&vb);
                Ct::of(&k, &val)
            })
            .collect();
        v.sort();
        v
    }

    fn svc(&self) -> ut::svc_stats {
        let per_cpu = self
            .skel
            .maps
            .sl_svc_v2
            .lookup_percpu(as_bytes(&SET), MapFlags::ANY)
            .unwrap()
            .unwrap();
        let mut s = ut::svc_stats::default();
        for b in per_cpu {
            let c: ut::svc_stats = from_bytes(&b);
            s.packets += c.packets;
            s.local += c.local;
            s.forwarded += c.forwarded;
            s.decapsulated += c.decapsulated;
        }
        s
    }
}

/// A frame on the wire between the external client and a node.
fn wire(p: Pkt, to_node: bool) -> Pkt {
    let mut p = p;
    if to_node {
        p.eth_src = MAC_NET;
        p.eth_dst = MAC_UPLINK;
    } else {
        p.eth_src = MAC_UPLINK;
        p.eth_dst = MAC_NET;
    }
    p
}

/// What sluice's VXLAN makes of `inner` (a frame) from node `from` to node `to`: the outer
/// Ethernet header kept, then outer IPv4 (DF and id from the inner header, TTL 64), UDP to 4789
/// from `sport` with checksum 0, VXLAN with the VNI, a zeroed inner Ethernet header, the packet.
fn vxlan(inner: &[u8], from: Ipv4Addr, to: Ipv4Addr, vni: u32, sport: u16) -> Vec<u8> {
    let ip_in = &inner[14..];
    let payload_len = 8 + 8 + 14 + ip_in.len();
    let mut ip = etherparse::Ipv4Header::new(
        payload_len as u16,
        64,
        etherparse::IpNumber::UDP,
        from.octets(),
        to.octets(),
    )
    .unwrap();
    ip.identification = u16::from_be_bytes([ip_in[4], ip_in[5]]);
    ip.dont_fragment = ip_in[6] & 0x40 != 0;
    ip.dscp = etherparse::IpDscp::try_new(ip_in[1] >> 2).unwrap();
    ip.header_checksum = ip.calc_header_checksum();
    let mut out = inner[..14].to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&sport.to_be_bytes());
    out.extend_from_slice(&4789u16.to_be_bytes());
    out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&0x0800_0000u32.to_be_bytes());
    out.extend_from_slice(&(vni << 8).to_be_bytes());
    out.extend_from_slice(&[0; 12]);
    out.extend_from_slice(&[0x08, 0x00]);
    out.extend_from_slice(ip_in);
    out
}

/// The outer UDP source port of an encapsulated frame (hashed from the inner flow).
fn outer_sport(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn syn_with_mss(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, mss: u16) -> Vec<u8> {
    let [hi, lo] = mss.to_be_bytes();
    syn_with_options(src, dst, flags, &[2, 4, hi, lo])
}

/// A TCP segment whose options are `options` (a multiple of 4 bytes), checksums from scratch.
fn syn_with_options(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    flags: u8,
    options: &[u8],
) -> Vec<u8> {
    let mut tcp = etherparse::TcpHeader::new(src.1, dst.1, 7, 64240);
    tcp.syn = flags & SYN != 0;
    tcp.ack = flags & ACK != 0;
    tcp.acknowledgment_number = if tcp.ack { 9 } else { 0 };
    tcp.set_options_raw(options).unwrap();
    let ip = etherparse::Ipv4Header::new(
        tcp.header_len() as u16,
        64,
        etherparse::IpNumber::TCP,
        src.0.octets(),
        dst.0.octets(),
    )
    .unwrap();
    let mut ip = ip;
    ip.dont_fragment = true;
    ip.header_checksum = ip.calc_header_checksum();
    tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).unwrap();
    let mut out = etherparse::Ethernet2Header {
        source: MAC_NET,
        destination: MAC_UPLINK,
        ether_type: etherparse::EtherType::IPV4,
    }
    .to_bytes()
    .to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&tcp.to_bytes());
    out
}

fn mss_of(frame: &[u8], l4: usize) -> u16 {
    // The options follow the fixed header; MSS is the only one here: kind 2, len 4.
    assert_eq!(frame[l4 + 20], 2, "MSS option");
    u16::from_be_bytes([frame[l4 + 22], frame[l4 + 23]])
}

#[test]
fn nodeport_to_a_local_backend_is_dnated_and_its_reply_leaves_from_the_node_port() {
    let up = Up::load(NODE_A, false);
    up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 1, 0, 2);
    up.backend(SET, 0, POD, 8080, true, NODE_A);
    let syn = wire(Pkt::tcp((EXT, CPORT), (NODE_A, NP), SYN), true);
    let (v, out) = up.run(true, &syn.bytes());
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        hex(&out),
        hex(&syn.clone().with_dst(POD, 8080).bytes()),
        "DNAT only"
    );
    assert_eq!(up.reason(ut::reason::REASON_NP_LOCAL), 1);
    let mut fwd = Ct::fwd(
        tuple((EXT, CPORT), (NODE_A, NP), TCP),
        (POD, 8080),
        SET,
        SYN,
    );
    fwd.flags = ut::ct_flags::CT_F_EXTERNAL.0;
    let mut rev = Ct::rev(tuple((POD, 8080), (EXT, CPORT), TCP), (NODE_A, NP), SET, 0);
    rev.flags = ut::ct_flags::CT_F_EXTERNAL.0;
    assert_eq!(up.ct(), {
        let mut v = vec![fwd, rev];
        v.sort();
        v
    });
    let s = up.svc();
    assert_eq!((s.packets, s.local, s.forwarded), (1, 1, 0));

    // The pod's reply at the uplink's egress: its source becomes the node port again.
    let synack = wire(Pkt::tcp((POD, 8080), (EXT, CPORT), SYN | ACK), false);
    let (v, out) = up.run(false, &synack.bytes());
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(hex(&out), hex(&synack.clone().with_src(NODE_A, NP).bytes()));
    verify_checksums(&out, "reply");
    assert_eq!(up.reason(ut::reason::REASON_NP_REPLY), 1);
}

#[test]
fn nodeport_to_a_remote_backend_is_encapsulated_unchanged_to_its_node() {
    let up = Up::load(NODE_A, false);
    up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 0, 0, 2);
    up.backend(SET, 0, POD, 8080, false, NODE_B);
    let data = wire(Pkt::tcp((EXT, CPORT), (NODE_A, NP), ACK | PSH), true);
    let (v, out) = up.run(true, &data.bytes());
    assert_eq!(
        v, TC_ACT_REDIRECT,
        "sent to B through the FIB (bpf_redirect_neigh)"
    );
    let sport = outer_sport(&out);
    assert_eq!(sport & 0xc000, 0xc000, "hashed source port in 49152-65535");
    assert_eq!(
        hex(&out),
        hex(&vxlan(&data.bytes(), NODE_A, NODE_B, VNI, sport)),
        "outer IPv4 A -> B, UDP 4789, checksum 0, VNI, the packet unchanged"
    );
    let (_, again) = up.run(true, &data.bytes());
    assert_eq!(outer_sport(&again), sport, "one flow, one source port");
    let mut tun = Ct::fwd(
        tuple((EXT, CPORT), (NODE_A, NP), TCP),
        (POD, 8080),
        SET,
        ACK,
    );
    tun.ty = ut::ct_type::CT_TYPE_TUN.0;
    tun.tun = NODE_B;
    tun.flags = ut::ct_flags::CT_F_EXTERNAL.0 | ut::ct_flags::CT_F_DSR.0;
    assert_eq!(up.ct(), vec![tun], "pinned to B, one direction");
    assert_eq!(up.reason(ut::reason::REASON_NP_FORWARD), 2);
    let s = up.svc();
    assert_eq!((s.packets, s.forwarded), (2, 2));
}

#[test]
fn a_forwarded_udp_flow_whose_backend_left_moves_and_one_whose_backend_stayed_does_not() {
    const NODE_C: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 3);
    const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 5);
    let up = Up::load(NODE_A, false);
    let k = key_of(Ipv4Addr::UNSPECIFIED, NP, UDP);
    up.frontend(k, 1, 0, 0, 2);
    up.backend(SET, 0, POD, 8080, false, NODE_B);
    let data = wire(Pkt::udp((EXT, CPORT), (NODE_A, NP), b"query"), true);
    let outer_dst = |f: &[u8]| Ipv4Addr::new(f[30], f[31], f[32], f[33]);
    let (v, out) = up.run(true, &data.bytes());
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(outer_dst(&out), NODE_B);
    // Another endpoint of the set left (new generation): this flow's backend is still a member.
    up.bump_gen(k);
    let (_, out) = up.run(true, &data.bytes());
    assert_eq!(
        outer_dst(&out),
        NODE_B,
        "a backend still in the set keeps its flows"
    );
    // Its backend leaves; the slot now holds one on node C.
    up.leave(SET, POD, 8080);
    up.backend(SET, 0, POD_C, 8080, false, NODE_C);
    up.bump_gen(k);
    let (v, out) = up.run(true, &data.bytes());
    assert_eq!(v, TC_ACT_REDIRECT);
    assert_eq!(
        outer_dst(&out),
        NODE_C,
        "kube-proxy's stale-UDP rule: the flow moves to a usable backend's node"
    );
    let ct = up.ct();
    assert_eq!(ct.len(), 1, "{ct:?}");
    assert_eq!(ct[0].tun, NODE_C);
    assert_eq!(up.reason(ut::reason::REASON_NP_FORWARD), 3);
}

#[test]
fn a_tunnelled_flows_syn_has_its_mss_clamped_to_what_fits_the_underlay() {
    let up = Up::load(NODE_A, false);
    up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 0, 0, 2);
    up.backend(SET, 0, POD, 8080, false, NODE_B);
    let syn = syn_with_mss((EXT, CPORT), (NODE_A, NP), SYN, 1460);
    let (v, out) = up.run(true, &syn);
    assert_eq!(v, TC_ACT_REDIRECT);
    let inner = &out[50..];
    assert_eq!(
        mss_of(inner, 34),
        1500 - 50 - 40,
        "MTU 1500 - VXLAN 50 - IP/TCP 40"
    );
    verify_checksums(inner, "inner SYN after the clamp");
}

/// Where the MSS option sits among the others, and options the walk must stop at: (case, the
/// options, the offset of the MSS value within them if it is to be clamped).
#[test]
fn the_mss_clamp_walks_every_option_layout_and_stops_at_malformed_ones() {
    const CLAMPED: u16 = 1500 - 50 - 40;
    // TS = 8, 10, then 8 bytes of timestamps.
    let cases: [(&str, &[u8], Option<usize>); 9] = [
        // Linux's SYN: MSS, SACK permitted, TS, NOP, window scale.
        (
            "linux order",
            &[
                2, 4, 5, 180, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
            ],
            Some(2),
        ),
        // MSS after NOPs, TS and window scale (as some stacks send it).
        (
            "mss last",
            &[
                1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 3, 3, 7, 1, 2, 4, 5, 180,
            ],
            Some(18),
        ),
        ("mss already small", &[1, 1, 1, 1, 2, 4, 4, 0], None),
        (
            "end of options before mss",
            &[1, 0, 0, 0, 2, 4, 5, 180],
            None,
        ),
        ("length 0 before mss", &[8, 0, 0, 0, 2, 4, 5, 180], None),
        ("length past the header", &[1, 1, 8, 10, 2, 4, 5, 180], None),
        (
            "mss cut by the header's end",
            &[1, 1, 1, 1, 1, 1, 2, 4],
            None,
        ),
        ("mss of another length", &[2, 6, 5, 180, 0, 0, 1, 1], None),
        (
            "forty bytes of options",
            &[&[1; 36][..], &[2, 4, 5, 180]].concat(),
            Some(38),
        ),
    ];
    for (case, options, at) in cases {
        let up = Up::load(NODE_A, false);
        up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 0, 0, 2);
        up.backend(SET, 0, POD, 8080, false, NODE_B);
        let syn = syn_with_options((EXT, CPORT), (NODE_A, NP), SYN, options);
        let (v, out) = up.run(true, &syn);
        assert_eq!(v, TC_ACT_REDIRECT, "{case}");
        let inner = &out[50..];
        let mut want = syn[14..].to_vec();
        if let Some(at) = at {
            want[40 + at..42 + at].copy_from_slice(&CLAMPED.to_be_bytes());
        }
        // Only the MSS value (and the checksum) may differ from what the client sent.
        assert_eq!(
            hex(&[&inner[14..50], &inner[52..]].concat()),
            hex(&[&want[..36], &want[38..]].concat()),
            "{case}"
        );
        verify_checksums(inner, case);
    }
}

#[test]
fn too_big_for_the_underlay_gets_fragmentation_needed_from_the_address_the_client_targeted() {
    let up = Up::load(NODE_A, false);
    up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, UDP), 1, 0, 0, 2);
    up.backend(SET, 0, POD, 8080, false, NODE_B);
    let big = wire(Pkt::udp((EXT, CPORT), (NODE_A, NP), &[0x5a; 1472]), true);
    assert_eq!(big.bytes().len(), 14 + 1500);
    let (v, out) = up.run(true, &big.bytes());
    assert_eq!(v, TC_ACT_REDIRECT, "the ICMP goes back out");
    assert_eq!(up.reason(ut::reason::REASON_FRAG_NEEDED), 1);
    verify_checksums(&out, "frag needed");
    assert_eq!(&out[0..6], &MAC_NET, "back to the client's next hop");
    assert_eq!(
        &out[26..30],
        &NODE_A.octets(),
        "from the node port's address"
    );
    assert_eq!(&out[30..34], &EXT.octets());
    assert_eq!(
        (out[34], out[35]),
        (3, 4),
        "destination unreachable, fragmentation needed"
    );
    assert_eq!(u16::from_be_bytes([out[40], out[41]]), 1450, "next-hop MTU");
    assert_eq!(
        &out[42..62],
        &big.bytes()[14..34],
        "the client's IP header as it sent it"
    );
}

#[test]
fn the_backend_node_decapsulates_picks_a_local_endpoint_and_answers_directly() {
    let up = Up::load(NODE_B, false);
    up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 1, 0, 2);
    up.backend(LOCAL_SET, 0, POD, 8080, true, NODE_B);
    let syn = wire(Pkt::tcp((EXT, CPORT), (NODE_A, NP), SYN), true);
    let enc = vxlan(&syn.bytes(), NODE_A, NODE_B, VNI, 0xc123);
    let (v, out) = up.run(true, &enc);
    assert_eq!(v, TC_ACT_OK, "delivered through the kernel to the pod");
    assert_eq!(
        hex(&out),
        hex(&syn.clone().with_dst(POD, 8080).bytes()),
        "decapsulated, DNATed: the client's address kept"
    );
    assert_eq!(up.reason(ut::reason::REASON_NP_DECAP), 1);
    let flags = ut::ct_flags::CT_F_EXTERNAL.0 | ut::ct_flags::CT_F_DSR.0;
    let mut fwd = Ct::fwd(
        tuple((EXT, CPORT), (NODE_A, NP), TCP),
        (POD, 8080),
        LOCAL_SET,
        SYN,
    );
    fwd.flags = flags;
    fwd.tun = NODE_A;
    let mut rev = Ct::rev(
        tuple((POD, 8080), (EXT, CPORT), TCP),
        (NODE_A, NP),
        LOCAL_SET,
        0,
    );
    rev.flags = flags;
    rev.tun = NODE_A;
    let mut want = vec![fwd, rev];
    want.sort();
    assert_eq!(up.ct(), want);
    assert_eq!(up.svc().decapsulated, 1);

    // The SYN-ACK leaves B with A's node port as its source, MSS clamped.
    let synack = syn_with_mss((POD, 8080), (EXT, CPORT), SYN | ACK, 1460);
    let mut synack = synack;
    synack[0..6].copy_from_slice(&MAC_NET);
    synack[6..12].copy_from_slice(&MAC_UPLINK);
    let (v, out) = up.run(false, &synack);
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(
        &out[26..30],
        &NODE_A.octets(),
        "source: the node the client reached"
    );
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), NP);
    assert_eq!(mss_of(&out, 34), 1410);
    verify_checksums(&out, "DSR SYN-ACK");
    assert_eq!(up.reason(ut::reason::REASON_NP_REPLY), 1);
}

#[test]
fn tunnel_mode_sends_the_reply_back_encapsulated_and_the_ingress_node_passes_it_on() {
    let b = Up::load(NODE_B, true);
    b.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 1, 0, 2);
    b.backend(LOCAL_SET, 0, POD, 8080, true, NODE_B);
    let syn = wire(Pkt::tcp((EXT, CPORT), (NODE_A, NP), SYN), true);
    let (v, _) = b.run(true, &vxlan(&syn.bytes(), NODE_A, NODE_B, VNI, 0xc123));
    assert_eq!(v, TC_ACT_OK);
    let reply = wire(Pkt::tcp((POD, 8080), (EXT, CPORT), ACK | PSH), false);
    let (v, out) = b.run(false, &reply.bytes());
    assert_eq!(v, TC_ACT_REDIRECT);
    let inner = reply.clone().with_src(NODE_A, NP);
    let sport = outer_sport(&out);
    assert_eq!(
        hex(&out),
        hex(&vxlan(&inner.bytes(), NODE_B, NODE_A, VNI + 1, sport)),
        "source restored, then encapsulated to A with the reply VNI"
    );
    assert_eq!(b.reason(ut::reason::REASON_NP_REPLY_TUNNEL), 1);
    drop(b);

    // On A: decapsulated and sent on to the client as it is.
    let a = Up::load(NODE_A, true);
    let (v, out) = a.run(true, &vxlan(&inner.bytes(), NODE_B, NODE_A, VNI + 1, sport));
    assert_eq!(v, TC_ACT_REDIRECT, "out to the client's next hop");
    assert_eq!(&out[14..], &inner.bytes()[14..]);
    assert_eq!(a.reason(ut::reason::REASON_NP_TUNNEL_REPLY), 1);
}

#[test]
fn only_sluices_encapsulation_from_a_known_node_is_taken_apart() {
    let up = Up::load(NODE_B, false);
    up.frontend(key_of(Ipv4Addr::UNSPECIFIED, NP, TCP), 1, 1, 0, 2);
    up.backend(LOCAL_SET, 0, POD, 8080, true, NODE_B);
    let syn = wire(Pkt::tcp((EXT, CPORT), (NODE_A, NP), SYN), true);
    let stranger = Ipv4Addr::new(192, 168, 50, 77);
    for (what, frame) in [
        (
            "from an unknown node",
            vxlan(&syn.bytes(), stranger, NODE_B, VNI, 0xc001),
        ),
        (
            "another VNI",
            vxlan(&syn.bytes(), NODE_A, NODE_B, 4096, 0xc001),
        ),
        (
            "to another node",
            vxlan(&syn.bytes(), NODE_A, stranger, VNI, 0xc001),
        ),
    ] {
        let (v, out) = up.run(true, &frame);
        assert_eq!(
            (v, hex(&out)),
            (TC_ACT_OK, hex(&frame)),
            "{what}: untouched"
        );
    }
    assert!(up.ct().is_empty());
    assert_eq!(up.reason(ut::reason::REASON_PASS), 3);
}

#[test]
fn external_traffic_policy_local_drops_without_a_local_endpoint_and_lb_ips_are_exact() {
    let up = Up::load(NODE_A, false);
    up.frontend(
        key_of(Ipv4Addr::UNSPECIFIED, NP, TCP),
        1,
        0,
        ut::frontend_flags::FE_F_ETP_LOCAL.0,
        2,
    );
    up.backend(SET, 0, POD, 8080, false, NODE_B);
    let syn = wire(Pkt::tcp((EXT, CPORT), (NODE_A, NP), SYN), true);
    let (v, _) = up.run(true, &syn.bytes());
    assert_eq!(v, TC_ACT_SHOT);
    assert_eq!(up.reason(ut::reason::REASON_DROP_NO_LOCAL), 1);

    up.frontend(key_of(LB_IP, 80, TCP), 1, 1, 0, 3);
    up.backend(SET, 1, POD, 8080, true, NODE_A);
    up.backend(SET, 0, POD, 8080, true, NODE_A);
    let to_lb = wire(Pkt::tcp((EXT, CPORT + 1), (LB_IP, 80), SYN), true);
    let (v, out) = up.run(true, &to_lb.bytes());
    assert_eq!(v, TC_ACT_OK);
    assert_eq!(hex(&out), hex(&to_lb.clone().with_dst(POD, 8080).bytes()));
    let not_node = wire(
        Pkt::tcp((EXT, CPORT), (Ipv4Addr::new(192, 168, 50, 9), NP), SYN),
        true,
    );
    let (v, out) = up.run(true, &not_node.bytes());
    assert_eq!(
        (v, hex(&out)),
        (TC_ACT_OK, hex(&not_node.bytes())),
        "a NodePort only on this node's addresses"
    );
}
