//! Harness for the BPF_PROG_TEST_RUN tests of bpf/pod_veth.bpf.c: a freshly loaded skeleton per
//! test (its own unpinned maps), packets built with etherparse, map set-up and map state read
//! back through the skeleton's generated types.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::time::Duration;

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, IcmpEchoHeader,
    Icmpv4Header, Icmpv4Type, IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel,
    Ipv6Header, TcpHeader, UdpHeader,
};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{MapCore, MapFlags, ProgramInput};
pub use sluice_core::bpf::pod_veth::{types, PodVethSkel, PodVethSkelBuilder};
pub use sluiced::pod::{as_bytes, from_bytes};

// ---------------------------------------------------------------------------------------------
// Addresses used throughout.

/// The client pod's eth0 MAC and the host-side veth's MAC.
pub const MAC_POD: [u8; 6] = [0x02, 0x00, 0x0a, 0x00, 0x01, 0x05];
pub const MAC_HOST: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];
/// PROG_TEST_RUN hands the program an skb on the namespace's loopback device: skb->ifindex is 1,
/// so that is the ifindex the per-pod counters are keyed by.
pub const POD_IFINDEX: u32 = 1;
/// bpf/config.h default.
pub const HAIRPIN: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
/// The one translated source port the table tests allow (bpf/config.h xlate_port_min/max).
pub const XPORT: u16 = 20000;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

/// Fails loudly unless we are root: these tests load BPF and must never skip.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "BPF_PROG_TEST_RUN tests need root (CAP_BPF, CAP_NET_ADMIN); run them as root"
    );
}

/// CLOCK_MONOTONIC: what the daemon writes and the upper bound of what a program read before.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC_COARSE, the datapath's clock (sl_now(), bpf_ktime_get_coarse_ns()): up to a
/// tick behind mono_ns(), so the lower bound of what a program about to run will read.
pub fn mono_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(clock, &mut t) },
        0,
        "clock_gettime"
    );
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

pub fn be32(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}
pub fn ip_of(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

// ---------------------------------------------------------------------------------------------
// Packets.

#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        seq: u32,
        ack: u32,
        payload: Vec<u8>,
    },
    /// `zero_csum`: checksum field 0 ("none"), which NAT must keep.
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        zero_csum: bool,
    },
    /// Any other protocol: the bytes after the IP header, as they are.
    Raw { proto: u8, bytes: Vec<u8> },
}

/// An Ethernet + IPv4 frame, described field by field; `bytes()` builds it with etherparse,
/// every checksum computed from scratch.
#[derive(Clone, Debug)]
pub struct Pkt {
    pub eth_src: [u8; 6],
    pub eth_dst: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    pub id: u16,
    pub df: bool,
    pub mf: bool,
    /// In 8-byte units.
    pub frag_off: u16,
    /// IPv4 options (a multiple of 4 bytes, at most 40).
    pub options: Vec<u8>,
    pub l4: L4,
    /// Ethernet padding up to this frame length (0 = none).
    pub pad_to: usize,
}

impl Pkt {
    fn ip(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Pkt {
        Pkt {
            eth_src: MAC_POD,
            eth_dst: MAC_HOST,
            src,
            dst,
            ttl: 64,
            id: 0x1234,
            df: true,
            mf: false,
            frag_off: 0,
            options: vec![],
            l4,
            pad_to: 0,
        }
    }

    /// A TCP segment sent by the pod (Ethernet pod -> host).
    pub fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8) -> Pkt {
        let payload = if flags & SYN != 0 {
            vec![]
        } else {
            b"GET / HTTP/1.1\r\n\r\n".to_vec()
        };
        Pkt::ip(
            src.0,
            dst.0,
            L4::Tcp {
                sport: src.1,
                dport: dst.1,
                flags,
                seq: 0x0102_0304,
                ack: if flags & ACK != 0 { 0x0a0b_0c0d } else { 0 },
                payload,
            },
        )
    }

    /// A UDP datagram with a real checksum, sent by the pod.
    pub fn udp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Pkt {
        Pkt::ip(
            src.0,
            dst.0,
            L4::Udp {
                sport: src.1,
                dport: dst.1,
                payload: payload.to_vec(),
                zero_csum: false,
            },
        )
    }

    pub fn raw(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, bytes: Vec<u8>) -> Pkt {
        Pkt::ip(src, dst, L4::Raw { proto, bytes })
    }

    /// An ICMP echo request.
    pub fn ping(src: Ipv4Addr, dst: Ipv4Addr) -> Pkt {
        let payload = b"sluice ping payload".to_vec();
        let h = Icmpv4Header::with_checksum(
            Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 1 }),
            &payload,
        );
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        Pkt::raw(src, dst, ICMP, bytes)
    }

    /// The same frame travelling towards the pod (Ethernet host -> pod), as to_pod sees it.
    pub fn towards_pod(mut self) -> Pkt {
        self.eth_src = MAC_HOST;
        self.eth_dst = MAC_POD;
        self
    }

    /// Ethernet addresses swapped: the frame bounced back out of the interface it came in on.
    pub fn macs_swapped(mut self) -> Pkt {
        std::mem::swap(&mut self.eth_src, &mut self.eth_dst);
        self
    }

    pub fn with_src(mut self, addr: Ipv4Addr, port: u16) -> Pkt {
        self.src = addr;
        self.set_ports(Some(port), None);
        self
    }

    pub fn with_dst(mut self, addr: Ipv4Addr, port: u16) -> Pkt {
        self.dst = addr;
        self.set_ports(None, Some(port));
        self
    }

    pub fn with_options(mut self, options: &[u8]) -> Pkt {
        self.options = options.to_vec();
        self
    }

    pub fn with_zero_udp_csum(mut self) -> Pkt {
        if let L4::Udp { zero_csum, .. } = &mut self.l4 {
            *zero_csum = true;
        }
        self
    }

    pub fn with_udp_payload(mut self, p: &[u8]) -> Pkt {
        if let L4::Udp { payload, .. } = &mut self.l4 {
            *payload = p.to_vec();
        }
        self
    }

    pub fn with_frag(mut self, mf: bool, frag_off: u16) -> Pkt {
        self.mf = mf;
        self.frag_off = frag_off;
        self.df = false;
        self
    }

    pub fn padded_to(mut self, len: usize) -> Pkt {
        self.pad_to = len;
        self
    }

    fn set_ports(&mut self, s: Option<u16>, d: Option<u16>) {
        match &mut self.l4 {
            L4::Tcp { sport, dport, .. } | L4::Udp { sport, dport, .. } => {
                if let Some(s) = s {
                    *sport = s;
                }
                if let Some(d) = d {
                    *dport = d;
                }
            }
            L4::Raw { .. } => assert!(s.is_none() && d.is_none(), "no ports on a raw packet"),
        }
    }

    pub fn ihl(&self) -> usize {
        5 + self.options.len() / 4
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut ip = Ipv4Header {
            total_len: 0,
            identification: self.id,
            dont_fragment: self.df,
            more_fragments: self.mf,
            fragment_offset: IpFragOffset::try_new(self.frag_off).unwrap(),
            time_to_live: self.ttl,
            protocol: IpNumber(0),
            source: self.src.octets(),
            destination: self.dst.octets(),
            options: Ipv4Options::try_from(&self.options[..])
                .expect("IPv4 options: multiple of 4, at most 40 bytes"),
            ..Default::default()
        };
        let l4: Vec<u8> = match &self.l4 {
            L4::Tcp {
                sport,
                dport,
                flags,
                seq,
                ack,
                payload,
            } => {
                ip.protocol = IpNumber::TCP;
                let mut h = TcpHeader::new(*sport, *dport, *seq, 64240);
                h.fin = flags & FIN != 0;
                h.syn = flags & SYN != 0;
                h.rst = flags & RST != 0;
                h.psh = flags & PSH != 0;
                h.ack = flags & ACK != 0;
                h.acknowledgment_number = *ack;
                h.checksum = h.calc_checksum_ipv4(&ip, payload).unwrap();
                let mut b = h.to_bytes().to_vec();
                b.extend_from_slice(payload);
                b
            }
            L4::Udp {
                sport,
                dport,
                payload,
                zero_csum,
            } => {
                ip.protocol = IpNumber::UDP;
                let h = if *zero_csum {
                    UdpHeader::without_ipv4_checksum(*sport, *dport, payload.len()).unwrap()
                } else {
                    UdpHeader::with_ipv4_checksum(*sport, *dport, &ip, payload).unwrap()
                };
                let mut b = h.to_bytes().to_vec();
                b.extend_from_slice(payload);
                b
            }
            L4::Raw { proto, bytes } => {
                ip.protocol = IpNumber(*proto);
                bytes.clone()
            }
        };
        ip.set_payload_len(l4.len()).unwrap();
        ip.header_checksum = ip.calc_header_checksum();

        let eth = Ethernet2Header {
            source: self.eth_src,
            destination: self.eth_dst,
            ether_type: EtherType::IPV4,
        };
        let mut out = eth.to_bytes().to_vec();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&l4);
        if out.len() < self.pad_to {
            out.resize(self.pad_to, 0);
        }
        out
    }

    /// The ICMP destination-unreachable/port-unreachable sluice answers this packet with: the
    /// original IP header and the start of its payload (RFC 792's 8 bytes for UDP, the whole
    /// 20-byte TCP header for TCP), sent back on the same link. The quoted L4 checksum field holds
    /// the value that checksum completion leaves unchanged (see `completion_fixed_point`).
    pub fn port_unreachable(&self) -> Vec<u8> {
        self.icmp_unreachable(true)
    }

    /// The ICMP port unreachable a host's own stack sends about this packet: the quote as the
    /// packet was, checksum included.
    pub fn host_port_unreachable(&self) -> Vec<u8> {
        self.icmp_unreachable(false)
    }

    fn icmp_unreachable(&self, fixed_point: bool) -> Vec<u8> {
        let orig = self.bytes();
        let (payload, csum_at) = if matches!(self.l4, L4::Tcp { .. }) {
            (20, 16)
        } else {
            (8, 6)
        };
        let mut quote = orig[14..14 + self.ihl() * 4 + payload].to_vec();
        let l4 = self.ihl() * 4;
        if fixed_point {
            let f = completion_fixed_point(&quote[l4..], csum_at);
            quote[l4 + csum_at..l4 + csum_at + 2].copy_from_slice(&f.to_be_bytes());
        }
        let quote = &quote[..];
        let icmp = Icmpv4Header::with_checksum(
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port),
            quote,
        );
        let mut ip = Ipv4Header::new(
            (icmp.header_len() + quote.len()) as u16,
            64,
            IpNumber::ICMP,
            self.dst.octets(),
            self.src.octets(),
        )
        .unwrap();
        ip.dont_fragment = false;
        ip.identification = 0;
        ip.header_checksum = ip.calc_header_checksum();
        let eth = Ethernet2Header {
            source: self.eth_dst,
            destination: self.eth_src,
            ether_type: EtherType::IPV4,
        };
        let mut out = eth.to_bytes().to_vec();
        out.extend_from_slice(&ip.to_bytes());
        out.extend_from_slice(&icmp.to_bytes());
        out.extend_from_slice(quote);
        out
    }
}

/// What the kernel's skb_checksum_help writes into the checksum field at `field` of `l4` (a
/// CHECKSUM_PARTIAL packet whose checksum is completed over `l4`): csum_fold of the sum, 0 sent
/// as 0xffff.
pub fn checksum_completion(l4: &[u8]) -> u16 {
    match !ones_complement_sum(l4) {
        0 => 0xffff,
        f => f,
    }
}

/// The value F of the checksum field at `field` for which completing the checksum over `l4`
/// writes F again, found by search (independently of how the program computes it).
pub fn completion_fixed_point(l4: &[u8], field: usize) -> u16 {
    let mut buf = l4.to_vec();
    for f in 0..=u16::MAX {
        buf[field..field + 2].copy_from_slice(&f.to_be_bytes());
        if checksum_completion(&buf) == f {
            return f;
        }
    }
    panic!("no fixed point");
}

/// An ARP request from the pod for its gateway.
pub fn arp_frame() -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &MAC_POD,
        &[10, 0, 1, 5],
        &[0; 6],
        &[169, 254, 1, 1],
    )
    .unwrap();
    let eth = Ethernet2Header {
        source: MAC_POD,
        destination: [0xff; 6],
        ether_type: EtherType::ARP,
    };
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&arp.to_bytes());
    out
}

/// An IPv6 TCP SYN (the programs are IPv4-only: it must pass untouched).
pub fn ipv6_frame() -> Vec<u8> {
    let src = [0xfd, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5];
    let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0x96, 0, 0, 0, 0, 0, 0, 0, 0x10];
    let mut tcp = TcpHeader::new(40000, 80, 1, 64240);
    tcp.syn = true;
    tcp.checksum = tcp.calc_checksum_ipv6_raw(src, dst, &[]).unwrap();
    let ip = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: tcp.header_len() as u16,
        next_header: IpNumber::TCP,
        hop_limit: 64,
        source: src,
        destination: dst,
    };
    let eth = Ethernet2Header {
        source: MAC_POD,
        destination: MAC_HOST,
        ether_type: EtherType::IPV6,
    };
    let mut out = eth.to_bytes().to_vec();
    out.extend_from_slice(&ip.to_bytes());
    out.extend_from_slice(&tcp.to_bytes());
    out
}

/// Overwrites bytes of a frame (to build malformed packets from good ones).
pub fn patched(mut frame: Vec<u8>, offset: usize, bytes: &[u8]) -> Vec<u8> {
    frame[offset..offset + bytes.len()].copy_from_slice(bytes);
    frame
}

/// Recomputes the IPv4 header checksum in place (after `patched`).
pub fn fix_ip_csum(mut frame: Vec<u8>) -> Vec<u8> {
    let ihl = (frame[14] & 0xf) as usize * 4;
    frame[24] = 0;
    frame[25] = 0;
    let c = ones_complement_sum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&(!c).to_be_bytes());
    frame
}

/// The 16-bit one's complement sum of RFC 1071 (odd length padded with zero).
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for ch in data.chunks(2) {
        let w = if ch.len() == 2 {
            u16::from_be_bytes([ch[0], ch[1]])
        } else {
            u16::from_be_bytes([ch[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// What `verify_checksums` found in a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Checked {
    Tcp,
    Udp { zero: bool },
    Icmp,
    Other,
}

/// Parses an Ethernet + IPv4 frame with etherparse and verifies, independently of how it was
/// built, the IPv4 header checksum and the TCP/UDP/ICMP checksum (and, for ICMP errors, the quoted
/// header's checksum). Panics with `what` on any mismatch.
pub fn verify_checksums(frame: &[u8], what: &str) -> Checked {
    check_checksums(frame).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// `verify_checksums`, returning the first problem instead of panicking.
pub fn check_checksums(frame: &[u8]) -> Result<Checked, String> {
    fn same<T: PartialEq + std::fmt::Debug>(got: T, want: T, what: &str) -> Result<(), String> {
        if got == want {
            Ok(())
        } else {
            Err(format!("{what}: got {got:?}, want {want:?}"))
        }
    }
    let (eth, rest) = Ethernet2Header::from_slice(frame).map_err(|e| format!("Ethernet: {e}"))?;
    same(eth.ether_type, EtherType::IPV4, "EtherType")?;
    let (ip, _) = Ipv4Header::from_slice(rest).map_err(|e| format!("IPv4 header: {e}"))?;
    same(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum",
    )?;
    // Second opinion: the header sums to 0xffff including its checksum.
    same(
        ones_complement_sum(&rest[..ip.header_len()]),
        0xffff,
        "IPv4 header one's complement sum",
    )?;
    let total = ip.total_len as usize;
    if total > rest.len() {
        return Err(format!(
            "total length {total} beyond the frame ({})",
            rest.len()
        ));
    }
    let l4 = &rest[ip.header_len()..total];
    if ip.is_fragmenting_payload() {
        return Ok(Checked::Other);
    }
    let pseudo_sum = |proto: u8| {
        let mut p = Vec::new();
        p.extend_from_slice(&ip.source);
        p.extend_from_slice(&ip.destination);
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.extend_from_slice(l4);
        ones_complement_sum(&p)
    };
    match ip.protocol {
        IpNumber::TCP => {
            let (tcp, payload) =
                TcpHeader::from_slice(l4).map_err(|e| format!("TCP header: {e}"))?;
            same(
                tcp.checksum,
                tcp.calc_checksum_ipv4(&ip, payload).unwrap(),
                "TCP checksum",
            )?;
            same(pseudo_sum(TCP), 0xffff, "TCP one's complement sum")?;
            Ok(Checked::Tcp)
        }
        IpNumber::UDP => {
            let (udp, payload) =
                UdpHeader::from_slice(l4).map_err(|e| format!("UDP header: {e}"))?;
            same(udp.length as usize, l4.len(), "UDP length")?;
            if udp.checksum == 0 {
                return Ok(Checked::Udp { zero: true });
            }
            same(
                udp.checksum,
                udp.calc_checksum_ipv4(&ip, payload).unwrap(),
                "UDP checksum",
            )?;
            same(pseudo_sum(UDP), 0xffff, "UDP one's complement sum")?;
            Ok(Checked::Udp { zero: false })
        }
        IpNumber::ICMP => {
            let (icmp, payload) =
                Icmpv4Header::from_slice(l4).map_err(|e| format!("ICMP header: {e}"))?;
            same(
                icmp.checksum,
                icmp.icmp_type.calc_checksum(payload),
                "ICMP checksum",
            )?;
            same(ones_complement_sum(l4), 0xffff, "ICMP one's complement sum")?;
            if let Icmpv4Type::DestinationUnreachable(_) = icmp.icmp_type {
                let (inner, _) = Ipv4Header::from_slice(payload)
                    .map_err(|e| format!("quoted IPv4 header: {e}"))?;
                same(
                    inner.header_checksum,
                    inner.calc_header_checksum(),
                    "quoted IPv4 header checksum",
                )?;
            }
            Ok(Checked::Icmp)
        }
        _ => Ok(Checked::Other),
    }
}

// ---------------------------------------------------------------------------------------------
// Map contents, in test terms.

/// A conntrack key: the 5-tuple of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub saddr: Ipv4Addr,
    pub sport: u16,
    pub daddr: Ipv4Addr,
    pub dport: u16,
    pub proto: u8,
}

pub fn tuple(s: (Ipv4Addr, u16), d: (Ipv4Addr, u16), proto: u8) -> Tuple {
    Tuple {
        saddr: s.0,
        sport: s.1,
        daddr: d.0,
        dport: d.1,
        proto,
    }
}

impl Tuple {
    pub fn key(&self) -> types::ct_key {
        types::ct_key {
            saddr: be32(self.saddr),
            daddr: be32(self.daddr),
            sport: self.sport.to_be(),
            dport: self.dport.to_be(),
            proto: self.proto,
            pad: [0; 3],
        }
    }
    pub fn of(k: &types::ct_key) -> Tuple {
        assert_eq!(k.pad, [0; 3], "ct_key padding not zero");
        Tuple {
            saddr: ip_of(k.saddr),
            sport: u16::from_be(k.sport),
            daddr: ip_of(k.daddr),
            dport: u16::from_be(k.dport),
            proto: k.proto,
        }
    }
}

/// What a conntrack entry's timestamps should show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ts {
    /// Created during the case and not rewritten since: created == last_seen, both in the case.
    New,
    /// Created before the case (aged by the set-up), last_seen refreshed during it.
    Refreshed,
    /// Left alone: both timestamps as the set-up wrote them (before the case).
    Old,
}

/// One conntrack entry, all fields but the timestamps (see `ts`). Unset NAT fields are 0.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ct {
    pub key: Tuple,
    pub ty: u8,
    pub nat_saddr: Ipv4Addr,
    pub nat_sport: u16,
    pub nat_daddr: Ipv4Addr,
    pub nat_dport: u16,
    pub svc: u32,
    pub gen: u32,
    pub tun: Ipv4Addr,
    pub flags: u8,
    pub seen: u32,
    pub ts: Ts,
}

/// ct_value.seen: "a packet crossed in this direction" (bpf/consts.h CT_SEEN_PKT).
pub const SEEN: u32 = types::tcp_flag_bits::CT_SEEN_PKT.0;
/// A DIRECT entry keeps the peer's flags above the pod's.
pub const PEER: u32 = 8;
pub const XLATE: u8 = types::ct_flags::CT_F_XLATE.0;

const ZERO: Ipv4Addr = Ipv4Addr::UNSPECIFIED;

impl Ct {
    /// Forward leg: client -> frontend, DNAT to `backend`; `seen`: the TCP flags its packets
    /// carried (a forward leg is created by a packet, so it has always seen one).
    pub fn fwd(key: Tuple, backend: (Ipv4Addr, u16), svc: u32, seen: u8) -> Ct {
        Ct {
            key,
            ty: types::ct_type::CT_TYPE_FWD.0,
            nat_saddr: ZERO,
            nat_sport: 0,
            nat_daddr: backend.0,
            nat_dport: backend.1,
            svc,
            gen: 0,
            tun: ZERO,
            flags: 0,
            seen: seen as u32 | SEEN,
            ts: Ts::New,
        }
    }
    /// Reverse leg: backend -> client, source restored to `frontend`; `seen`: the TCP flags of
    /// the replies (non-zero implies a reply passed; a UDP reply is `replied()`).
    pub fn rev(key: Tuple, frontend: (Ipv4Addr, u16), svc: u32, seen: u8) -> Ct {
        Ct {
            key,
            ty: types::ct_type::CT_TYPE_REV.0,
            nat_saddr: frontend.0,
            nat_sport: frontend.1,
            nat_daddr: ZERO,
            nat_dport: 0,
            svc,
            gen: 0,
            tun: ZERO,
            flags: 0,
            seen: if seen != 0 { seen as u32 | SEEN } else { 0 },
            ts: Ts::New,
        }
    }
    /// A pod's direct flow, keyed by the direction reaching the pod; `pod`/`peer`: the TCP
    /// flags each side sent (0 = none seen from that side; UDP: `SEEN as u8` for "one seen").
    pub fn direct(key: Tuple, pod: u8, peer: u8) -> Ct {
        let side = |f: u8| if f != 0 { f as u32 | SEEN } else { 0 };
        Ct {
            key,
            ty: types::ct_type::CT_TYPE_DIRECT.0,
            nat_saddr: ZERO,
            nat_sport: 0,
            nat_daddr: ZERO,
            nat_dport: 0,
            svc: 0,
            gen: 0,
            tun: ZERO,
            flags: 0,
            seen: side(pod) | side(peer) << PEER,
            ts: Ts::New,
        }
    }
    /// A pod's direct flow whose source port is translated to `port`: its forward leg.
    pub fn xlate_fwd(key: Tuple, port: u16, seen: u8) -> Ct {
        Ct {
            key,
            ty: types::ct_type::CT_TYPE_FWD.0,
            nat_saddr: ZERO,
            nat_sport: port,
            nat_daddr: ZERO,
            nat_dport: 0,
            svc: 0,
            gen: 0,
            tun: ZERO,
            flags: XLATE,
            seen: seen as u32 | SEEN,
            ts: Ts::New,
        }
    }
    /// Its reply leg: destination port restored to `orig`.
    pub fn xlate_rev(key: Tuple, orig: u16, seen: u8) -> Ct {
        Ct {
            key,
            ty: types::ct_type::CT_TYPE_REV.0,
            nat_saddr: ZERO,
            nat_sport: 0,
            nat_daddr: ZERO,
            nat_dport: orig,
            svc: 0,
            gen: 0,
            tun: ZERO,
            flags: XLATE,
            seen: if seen != 0 { seen as u32 | SEEN } else { 0 },
            ts: Ts::New,
        }
    }
    /// A UDP reply passed (no TCP flags to record).
    pub fn replied(mut self) -> Ct {
        self.seen |= SEEN;
        self
    }
    /// A service flow's client port translated to `port` (forward leg) / restored from it
    /// (reply leg: pass the original port).
    pub fn xlated(mut self, port: u16) -> Ct {
        self.flags |= XLATE;
        if self.ty == types::ct_type::CT_TYPE_FWD.0 {
            self.nat_sport = port;
        } else {
            self.nat_dport = port;
        }
        self
    }
    pub fn gen(mut self, gen: u32) -> Ct {
        self.gen = gen;
        self
    }
    /// Forward leg of a hairpinned flow: the source also becomes `hairpin`.
    pub fn hairpin_fwd(
        key: Tuple,
        backend: (Ipv4Addr, u16),
        hairpin: Ipv4Addr,
        svc: u32,
        seen: u8,
    ) -> Ct {
        Ct {
            nat_saddr: hairpin,
            flags: types::ct_flags::CT_F_HAIRPIN.0,
            ..Ct::fwd(key, backend, svc, seen)
        }
    }
    /// Reverse leg of a hairpinned flow: destination restored to the client too.
    pub fn hairpin_rev(
        key: Tuple,
        frontend: (Ipv4Addr, u16),
        client: Ipv4Addr,
        svc: u32,
        seen: u8,
    ) -> Ct {
        Ct {
            nat_daddr: client,
            flags: types::ct_flags::CT_F_HAIRPIN.0,
            ..Ct::rev(key, frontend, svc, seen)
        }
    }
    pub fn ts(mut self, ts: Ts) -> Ct {
        self.ts = ts;
        self
    }
    pub fn of(k: &types::ct_key, v: &types::ct_value) -> Ct {
        assert_eq!(v.pad, [0; 2], "ct_value padding not zero");
        Ct {
            key: Tuple::of(k),
            ty: v.r#type.0,
            nat_saddr: ip_of(v.nat_saddr),
            nat_sport: u16::from_be(v.nat_sport),
            nat_daddr: ip_of(v.nat_daddr),
            nat_dport: u16::from_be(v.nat_dport),
            svc: v.set_id,
            gen: v.gen,
            tun: ip_of(v.tun_addr),
            flags: v.flags.0,
            seen: v.seen.0,
            ts: Ts::New, // judged separately
        }
    }
    /// The map value this entry describes, with the given timestamps.
    pub fn value(&self, created_ns: u64, last_seen_ns: u64) -> types::ct_value {
        types::ct_value {
            created_ns,
            last_seen_ns,
            nat_saddr: be32(self.nat_saddr),
            nat_daddr: be32(self.nat_daddr),
            nat_sport: self.nat_sport.to_be(),
            nat_dport: self.nat_dport.to_be(),
            set_id: self.svc,
            gen: self.gen,
            tun_addr: be32(self.tun),
            seen: types::tcp_flag_bits(self.seen),
            r#type: types::ct_type(self.ty),
            flags: types::ct_flags(self.flags),
            pad: [0; 2],
        }
    }
}

/// One sessionAffinity entry.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Aff {
    pub client: Ipv4Addr,
    pub svc: u32,
    pub backend: (Ipv4Addr, u16),
    /// last_used_ns written during the case (true) or left as the set-up wrote it (false).
    pub used: bool,
}

/// How old a pre-set affinity or conntrack entry is.
#[derive(Clone, Copy, Debug)]
pub enum Age {
    Fresh,
    Secs(u64),
}

impl Age {
    pub fn ns(self) -> u64 {
        match self {
            Age::Fresh => mono_ns(),
            Age::Secs(s) => mono_ns() - s * 1_000_000_000,
        }
    }
}

/// Sum of a per-CPU `struct counter` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Sum of a per-CPU `struct pod_info` entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodCount {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

// ---------------------------------------------------------------------------------------------
// The loaded programs and their maps.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    FromPod,
    ToPod,
}

pub struct RunResult {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub duration: Duration,
}

pub struct Dp {
    pub skel: PodVethSkel<'static>,
    pub hairpin: Ipv4Addr,
}

impl Dp {
    /// Loads pod_veth with default configuration and fresh, unpinned maps.
    pub fn load() -> Dp {
        Dp::load_with(None)
    }

    /// Loads pod_veth, optionally with another hairpin address in .rodata. Translated source
    /// ports come from the single port XPORT, so translations are deterministic.
    pub fn load_with(hairpin: Option<Ipv4Addr>) -> Dp {
        Dp::load_opts(hairpin, (XPORT, XPORT))
    }

    /// Loads pod_veth with a hairpin address and translated-port range of choice.
    pub fn load_opts(hairpin: Option<Ipv4Addr>, xlate: (u16, u16)) -> Dp {
        require_root();
        // The open object must outlive the skeleton; a test's worth of leak is fine.
        let storage = Box::leak(Box::new(MaybeUninit::uninit()));
        let mut open = PodVethSkelBuilder::default()
            .open(storage)
            .expect("opening the pod_veth BPF object");
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .expect("pod_veth without .rodata");
        assert_eq!(
            ip_of(rodata.hairpin_addr),
            HAIRPIN,
            "bpf/config.h default hairpin_addr"
        );
        if let Some(h) = hairpin {
            rodata.hairpin_addr = be32(h);
        }
        rodata.xlate_port_min = xlate.0;
        rodata.xlate_port_max = xlate.1;
        let skel = open.load().expect("loading pod_veth (verifier log above)");
        Dp {
            skel,
            hairpin: hairpin.unwrap_or(HAIRPIN),
        }
    }

    pub fn run(&self, prog: Prog, pkt: &[u8], repeat: u32) -> RunResult {
        let p = match prog {
            Prog::FromPod => &self.skel.progs.from_pod,
            Prog::ToPod => &self.skel.progs.to_pod,
        };
        let mut buf = vec![0u8; pkt.len() + 512];
        let input = ProgramInput {
            data_in: Some(pkt),
            data_out: Some(&mut buf),
            repeat,
            ..Default::default()
        };
        let out = p
            .test_run(input)
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN {prog:?}: {e}"));
        let verdict = out.return_value;
        let duration = out.duration;
        let n = out.data.as_ref().expect("no data out").len();
        buf.truncate(n);
        RunResult {
            verdict,
            out: buf,
            duration,
        }
    }

    // --- set-up -------------------------------------------------------------------------------

    pub fn frontend(
        &self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        svc: u32,
        count: u32,
        flags: u32,
        affinity_timeout: u32,
    ) {
        let v = types::frontend_value {
            cluster_id: svc,
            cluster_count: count,
            local_id: svc,
            local_count: 0,
            affinity_timeout,
            gen: 0,
            flags: types::frontend_flags(flags),
            kind: types::frontend_kind::FE_KIND_CLUSTER_IP,
            pad: [0; 3],
        };
        self.frontend_value(vip, port, proto, v);
    }

    /// Writes a whole frontend value.
    pub fn frontend_value(&self, vip: Ipv4Addr, port: u16, proto: u8, v: types::frontend_value) {
        let k = types::frontend_key {
            addr: be32(vip),
            port: port.to_be(),
            proto,
            pad: 0,
        };
        self.skel
            .maps
            .sl_fe_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .expect("sl_fe_v2 update");
    }

    /// The frontend's current value.
    pub fn frontend_get(&self, vip: Ipv4Addr, port: u16, proto: u8) -> types::frontend_value {
        let k = types::frontend_key {
            addr: be32(vip),
            port: port.to_be(),
            proto,
            pad: 0,
        };
        from_bytes(
            &self
                .skel
                .maps
                .sl_fe_v2
                .lookup(as_bytes(&k), MapFlags::ANY)
                .unwrap()
                .expect("frontend"),
        )
    }

    pub fn del_frontend(&self, vip: Ipv4Addr, port: u16, proto: u8) {
        let k = types::frontend_key {
            addr: be32(vip),
            port: port.to_be(),
            proto,
            pad: 0,
        };
        let _ = self.skel.maps.sl_fe_v2.delete(as_bytes(&k));
    }

    /// The {vip, 0, 0} entry that marks a VIP for fragment handling.
    pub fn vip_marker(&self, vip: Ipv4Addr) {
        let key = u32::from(vip).to_be();
        self.skel
            .maps
            .sl_vip_v1
            .update(as_bytes(&key), as_bytes(&1u32), MapFlags::ANY)
            .unwrap();
    }

    /// A slot, and the backend's membership of the set (as the writer keeps them).
    pub fn backend(&self, svc: u32, slot: u32, addr: Ipv4Addr, port: u16) {
        let k = types::backend_key { set_id: svc, slot };
        let v = types::backend_value {
            addr: be32(addr),
            port: port.to_be(),
            flags: 0,
            node: 0,
        };
        self.skel
            .maps
            .sl_be_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .expect("sl_be_v2 update");
        self.member(svc, addr, port, true);
    }

    pub fn del_backend(&self, svc: u32, slot: u32) {
        let k = types::backend_key { set_id: svc, slot };
        self.skel
            .maps
            .sl_be_v2
            .delete(as_bytes(&k))
            .expect("sl_be_v2 delete");
    }

    /// Adds or removes a backend's membership of a set.
    pub fn member(&self, svc: u32, addr: Ipv4Addr, port: u16, present: bool) {
        let k = types::member_key {
            set_id: svc,
            addr: be32(addr),
            port: port.to_be(),
            pad: 0,
        };
        let m = &self.skel.maps.sl_bm_v1;
        if present {
            m.update(as_bytes(&k), as_bytes(&1u32), MapFlags::ANY)
                .expect("sl_bm_v1 update");
        } else {
            let _ = m.delete(as_bytes(&k));
        }
    }

    /// Writes a conntrack entry as it is described, last seen `age` ago.
    pub fn ct_put(&self, ct: &Ct, age: Age) -> (u64, u64) {
        let last = age.ns();
        let created = last - 5_000_000_000;
        self.skel
            .maps
            .sl_ct_v2
            .update(
                as_bytes(&ct.key.key()),
                as_bytes(&ct.value(created, last)),
                MapFlags::ANY,
            )
            .expect("sl_ct_v2 update");
        (created, last)
    }

    pub fn ct_del(&self, t: Tuple) {
        let _ = self.skel.maps.sl_ct_v2.delete(as_bytes(&t.key()));
    }

    pub fn affinity(
        &self,
        client: Ipv4Addr,
        svc: u32,
        backend: (Ipv4Addr, u16),
        last_used_ns: u64,
    ) {
        let k = types::affinity_key {
            client: be32(client),
            svc_id: svc,
        };
        let v = types::affinity_value {
            last_used_ns,
            addr: be32(backend.0),
            port: backend.1.to_be(),
            pad: 0,
        };
        self.skel
            .maps
            .sl_aff_v1
            .update(as_bytes(&k), as_bytes(&v), MapFlags::ANY)
            .expect("sl_aff_v1 update");
    }

    /// The per-pod entry the daemon creates on attach; `addr`: the pod's address (its only
    /// allowed source), or UNSPECIFIED for none checked.
    pub fn pod_entry(&self, ifindex: u32, addr: Ipv4Addr) {
        let cpus = libbpf_rs::num_possible_cpus().expect("possible CPUs");
        let v = types::pod_info {
            addr: be32(addr),
            ..Default::default()
        };
        let vals = vec![as_bytes(&v).to_vec(); cpus];
        self.skel
            .maps
            .sl_pod_v2
            .update_percpu(as_bytes(&ifindex), &vals, MapFlags::ANY)
            .expect("sl_pod_v2 update");
    }

    /// Moves a conntrack entry's timestamps back: created `age`+5 s ago, last seen `age` ago.
    pub fn age_ct(&self, t: Tuple, age: Age) -> (u64, u64) {
        let k = t.key();
        let raw = self
            .skel
            .maps
            .sl_ct_v2
            .lookup(as_bytes(&k), MapFlags::ANY)
            .unwrap()
            .expect("aging a missing CT entry");
        let mut v: types::ct_value = from_bytes(&raw);
        v.last_seen_ns = age.ns();
        v.created_ns = v.last_seen_ns - 5_000_000_000;
        self.skel
            .maps
            .sl_ct_v2
            .update(as_bytes(&k), as_bytes(&v), MapFlags::EXIST)
            .unwrap();
        (v.created_ns, v.last_seen_ns)
    }

    // --- state --------------------------------------------------------------------------------

    /// Every conntrack entry with its (created_ns, last_seen_ns).
    pub fn ct_raw(&self) -> BTreeMap<Tuple, (types::ct_value, Ct)> {
        let m = &self.skel.maps.sl_ct_v2;
        let mut out = BTreeMap::new();
        for kb in m.keys() {
            let k: types::ct_key = from_bytes(&kb);
            let Some(vb) = m.lookup(&kb, MapFlags::ANY).unwrap() else {
                continue;
            };
            let v: types::ct_value = from_bytes(&vb);
            let ct = Ct::of(&k, &v);
            out.insert(ct.key, (v, ct));
        }
        out
    }

    pub fn ct_get(&self, t: Tuple) -> Option<types::ct_value> {
        self.skel
            .maps
            .sl_ct_v2
            .lookup(as_bytes(&t.key()), MapFlags::ANY)
            .unwrap()
            .map(|b| from_bytes(&b))
    }

    pub fn ct_len(&self) -> usize {
        self.skel.maps.sl_ct_v2.keys().count()
    }

    /// Every affinity entry with its last_used_ns.
    pub fn aff_raw(&self) -> Vec<(Aff, u64)> {
        let m = &self.skel.maps.sl_aff_v1;
        let mut out = vec![];
        for kb in m.keys() {
            let k: types::affinity_key = from_bytes(&kb);
            let Some(vb) = m.lookup(&kb, MapFlags::ANY).unwrap() else {
                continue;
            };
            let v: types::affinity_value = from_bytes(&vb);
            out.push((
                Aff {
                    client: ip_of(k.client),
                    svc: k.svc_id,
                    backend: (ip_of(v.addr), u16::from_be(v.port)),
                    used: false,
                },
                v.last_used_ns,
            ));
        }
        out.sort();
        out
    }

    fn counter(map: &libbpf_rs::MapMut<'_>, index: u32) -> Count {
        let mut sum = Count::default();
        let per_cpu = map
            .lookup_percpu(as_bytes(&index), MapFlags::ANY)
            .unwrap()
            .expect("array entry");
        for b in per_cpu {
            let c: types::counter = from_bytes(&b);
            sum.packets += c.packets;
            sum.bytes += c.bytes;
        }
        sum
    }

    /// All reason counters, indexed by enum reason.
    pub fn reasons(&self) -> Vec<Count> {
        (0..types::reason::REASON_MAX.0)
            .map(|r| Dp::counter(&self.skel.maps.sl_rsn_v2, r))
            .collect()
    }

    /// A service's packets and bytes (its struct svc_stats, summed over CPUs).
    pub fn svc_counter(&self, svc: u32) -> Count {
        let st = self.svc_stats(svc);
        Count {
            packets: st.packets,
            bytes: st.bytes,
        }
    }

    pub fn svc_stats(&self, svc: u32) -> types::svc_stats {
        let per_cpu = self
            .skel
            .maps
            .sl_svc_v2
            .lookup_percpu(as_bytes(&svc), MapFlags::ANY)
            .unwrap()
            .expect("array entry");
        let mut sum = types::svc_stats::default();
        for b in per_cpu {
            let c: types::svc_stats = from_bytes(&b);
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.local += c.local;
            sum.forwarded += c.forwarded;
            sum.decapsulated += c.decapsulated;
        }
        sum
    }

    pub fn pod_counts(&self, ifindex: u32) -> Option<PodCount> {
        let per_cpu = self
            .skel
            .maps
            .sl_pod_v2
            .lookup_percpu(as_bytes(&ifindex), MapFlags::ANY)
            .unwrap()?;
        let mut sum = PodCount::default();
        for b in per_cpu {
            let s: types::pod_info = from_bytes(&b);
            sum.rx_packets += s.rx_packets;
            sum.rx_bytes += s.rx_bytes;
            sum.tx_packets += s.tx_packets;
            sum.tx_bytes += s.tx_bytes;
        }
        Some(sum)
    }

    pub fn pod_entries(&self) -> usize {
        self.skel.maps.sl_pod_v2.keys().count()
    }
}

/// Name of a reason counter index, for messages.
pub fn reason_name(r: u32) -> String {
    sluiced::datapath::reason_name(r)
        .map(str::to_string)
        .unwrap_or_else(|| format!("reason {r}"))
}
