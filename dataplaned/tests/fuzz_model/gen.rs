//! The seeded generator: map states full of the situations bpf/RULES.md has rules for (port
//! reuse, clashes, ended/idle/half flows, deleted frontends, inconsistent slots and members,
//! fragment memory) and packets that mostly hit that state (a flow's sequence, its replies, ICMP
//! errors about it, fragments in any order), mutated or purely random.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use etherparse::{IpFragOffset, IpNumber, Ipv4Header, Ipv4Options};

use super::model::*;
use super::net::*;

// ---------------------------------------------------------------------------------------------
// The small cluster every scenario lives in: few addresses and ports, so tuples meet.

const fn a(x: [u8; 4]) -> u32 {
    u32::from_be_bytes(x)
}
pub const POD: u32 = a([10, 0, 1, 5]);
pub const OTHER: u32 = a([10, 0, 1, 6]);
pub const VIP1: u32 = a([10, 96, 0, 10]);
pub const VIP2: u32 = a([10, 96, 0, 11]);
pub const VIP3: u32 = a([10, 96, 0, 12]);
pub const BE_A: u32 = a([10, 0, 2, 7]);
pub const BE_B: u32 = a([10, 0, 3, 8]);
pub const PEER: u32 = a([10, 0, 9, 9]);
pub const ROUTER: u32 = a([10, 0, 0, 1]);

const MAC_POD: [u8; 6] = [0x02, 0x00, 0x0a, 0x00, 0x01, 0x05];
const MAC_HOST: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

const BACKENDS: [(u32, u16); 5] = [
    (BE_A, 8080),
    (BE_B, 8080),
    (POD, 8080),
    (BE_A, 5353),
    (BE_B, 53),
];
const FRONTENDS: [(u32, u16, u8); 7] = [
    (VIP1, 80, TCP),
    (VIP1, 80, UDP),
    (VIP2, 80, TCP),
    (VIP1, 53, UDP),
    (VIP2, 53, UDP),
    (VIP2, 80, UDP),
    (VIP3, 80, TCP),
];
const PEERS: [u32; 4] = [BE_A, BE_B, PEER, OTHER];
const PEER_PORTS: [u16; 4] = [8080, 80, 5353, 53];
const IDS: [u16; 3] = [0x1234, 0x0001, 0xbeef];

/// The fuzzer's configuration: the product's hairpin address and refresh, timeouts short enough
/// that every one of them can be made to have passed (an entry's age is bounded by the uptime),
/// and a translated-port range of four ports so the range runs full.
pub fn fuzz_config(product: &Config) -> Config {
    const S: u64 = 1_000_000_000;
    Config {
        hairpin: product.hairpin,
        refresh_ns: product.refresh_ns,
        syn_ns: 20 * S,
        established_ns: 300 * S,
        fin_ns: 60 * S,
        closed_ns: 10 * S,
        rst_ns: 5 * S,
        udp_ns: 30 * S,
        udp_stream_ns: 120 * S,
        xlate_min: 20000,
        xlate_max: 20003,
        frag_ns: 30 * S,
    }
}

/// Ages (ms) of pre-set entries: each at least 2 s from every timeout above, the affinity
/// timeouts (10 s, 100 s) and the 1 s refresh (the freshest is 50 ms old).
const AGES_MS: [u64; 9] = [
    50, 3_000, 7_000, 15_000, 25_000, 45_000, 90_000, 200_000, 400_000,
];

/// Something to send later in the scenario, built from the state of that moment.
#[derive(Clone, Debug)]
enum Intent {
    /// The next packet of the flow the pod sent with tuple `t` (same direction).
    Again { t: Tuple, flags: u8 },
    /// The peer's answer to the flow the pod sent with tuple `t`.
    Reply { t: Tuple, flags: u8 },
    /// A later fragment of the packet (saddr, daddr, id, proto) seen by `prog`.
    Later { prog: Prog, k: FragKey },
    /// Exactly this frame.
    Frame {
        prog: Prog,
        frame: Vec<u8>,
        what: String,
    },
}

pub struct Gen {
    pub rng: Rng,
    cfg: Config,
    ages: Vec<u64>,
    pending: VecDeque<Intent>,
    /// First fragments sent, for later fragments.
    firsts: Vec<(Prog, FragKey)>,
}

/// What to send: the program, the frame, and a line saying what it is meant to be.
pub struct Packet {
    pub prog: Prog,
    pub frame: Vec<u8>,
    pub what: String,
}

impl Gen {
    pub fn new(rng: Rng, cfg: &Config, uptime_ns: u64) -> Gen {
        let ages: Vec<u64> = AGES_MS
            .iter()
            .copied()
            .filter(|ms| ms * 1_000_000 + 5_000_000_000 < uptime_ns)
            .collect();
        assert!(!ages.is_empty(), "machine up for less than 5 s");
        Gen {
            rng,
            cfg: *cfg,
            ages,
            pending: VecDeque::new(),
            firsts: vec![],
        }
    }

    fn age(&mut self, now: u64) -> Stamp {
        let ms = self.rng.pick(&self.ages);
        Stamp::At(now - ms * 1_000_000)
    }

    // --- map state -----------------------------------------------------------------------

    pub fn state(&mut self, now: u64) -> State {
        let r = &mut self.rng;
        let mut st = State::default();
        // Frontends.
        let n_fe = r.weighted(&[5, 20, 35, 25, 15]);
        let mut keys = FRONTENDS.to_vec();
        for _ in 0..n_fe {
            let (addr, port, proto) = keys.remove(r.below(keys.len()));
            let mut flags = 0;
            if r.pct(35) {
                flags |= FE_AFFINITY;
            }
            if r.pct(10) {
                flags |= FE_EXTERNAL;
            }
            if r.pct(20) {
                flags |= FE_ITP_LOCAL;
            }
            if r.pct(10) {
                flags |= FE_ETP_LOCAL;
            }
            st.fe.insert(
                FeKey { addr, port, proto },
                Fe {
                    cluster_id: r.range(1, 3) as u32,
                    cluster_count: r.weighted(&[15, 35, 25, 15, 10]) as u32,
                    local_id: r.range(1, 4) as u32,
                    local_count: r.weighted(&[30, 40, 20, 10]) as u32,
                    affinity_timeout: r.pick(&[10, 100]),
                    gen: r.below(3) as u32,
                    flags,
                    kind: r.range(1, 4) as u8,
                },
            );
        }
        // Slots and membership, sometimes out of step on purpose.
        for set in 1..=4u32 {
            for slot in 0..r.below(5) as u32 {
                if r.pct(85) {
                    let (addr, port) = r.pick(&BACKENDS);
                    st.be.insert(
                        (set, slot),
                        Be {
                            addr,
                            port,
                            flags: r.below(2) as u16,
                            node: 0,
                        },
                    );
                    if r.pct(90) {
                        st.bm.insert((set, addr, port));
                    }
                }
            }
            if r.pct(20) {
                let (addr, port) = r.pick(&BACKENDS);
                st.bm.insert((set, addr, port));
            }
        }
        // VIP markers.
        let vips: Vec<u32> = st.fe.keys().map(|k| k.addr).collect();
        for v in vips {
            if r.pct(90) {
                st.vip.insert(v);
            }
        }
        if r.pct(15) {
            st.vip.insert(r.pick(&[VIP3, PEER, BE_A]));
        }
        st.pod = match r.weighted(&[15, 25, 60]) {
            0 => None,
            1 => Some(0),
            _ => Some(POD),
        };
        // Affinity.
        for _ in 0..r.weighted(&[40, 30, 20, 10]) {
            let client = self.rng.pick(&[POD, POD, OTHER]);
            let set = self.rng.range(1, 4) as u32;
            let (addr, port) = self.rng.pick(&BACKENDS);
            let last = self.age(now);
            st.aff.insert((client, set), Aff { last, addr, port });
        }
        // Fragment memory.
        for _ in 0..self.rng.weighted(&[50, 30, 20]) {
            let k = self.frag_key();
            let (ns, nd) = (self.some_addr(), self.some_addr());
            let first = self.age(now);
            st.frag.insert(
                k,
                Frag {
                    first,
                    nat_saddr: if self.rng.pct(50) { ns } else { 0 },
                    nat_daddr: if self.rng.pct(70) { nd } else { 0 },
                    tun: 0,
                    flags: 0,
                },
            );
        }
        // Conntrack.
        for _ in 0..self.rng.weighted(&[10, 15, 20, 20, 15, 10, 10]) {
            match self.rng.weighted(&[50, 25, 15, 10, 6]) {
                0 => self.service_flow(&mut st, now),
                1 => self.direct_flow(&mut st, now),
                2 => self.xlate_direct_flow(&mut st, now),
                3 => self.garbage_entry(&mut st, now),
                _ => self.fill_xlate_ports(&mut st, now),
            }
        }
        st
    }

    fn some_addr(&mut self) -> u32 {
        self.rng.pick(&[
            POD,
            OTHER,
            VIP1,
            VIP2,
            VIP3,
            BE_A,
            BE_B,
            PEER,
            ROUTER,
            0x0a00_0105,
        ])
    }

    fn frag_key(&mut self) -> FragKey {
        let r = &mut self.rng;
        let (s, d) = match r.below(4) {
            0 => (POD, r.pick(&[VIP1, VIP2, VIP3])),
            1 => (r.pick(&[BE_A, BE_B]), POD),
            2 => (POD, r.pick(&[BE_A, BE_B, PEER])),
            _ => (r.pick(&[POD, OTHER, PEER]), r.pick(&[VIP1, BE_A, POD])),
        };
        FragKey {
            saddr: s,
            daddr: d,
            id: r.pick(&IDS),
            proto: r.pick(&[UDP, UDP, TCP, ICMP]),
        }
    }

    fn client_port(&mut self) -> u16 {
        match self.rng.weighted(&[45, 35, 12, 8]) {
            0 => 40000,
            1 => 40001,
            2 => self.rng.range(20000, 20003) as u16,
            _ => self.rng.u16() | 1,
        }
    }

    /// What one direction of a flow saw (seen bits), `client` or reply side.
    fn seen(&mut self, proto: u8, client: bool) -> u32 {
        const S: u32 = SEEN;
        let (f, sy, r, a) = (FIN as u32, SYN as u32, RST as u32, ACK as u32);
        if self.rng.pct(4) {
            return self.rng.u32() & 0x97;
        }
        if proto != TCP {
            return if client || self.rng.pct(60) { S } else { 0 };
        }
        if client {
            self.rng.pick(&[
                sy | S,
                sy | a | S,
                sy | a | S,
                sy | a | f | S,
                sy | a | r | S,
                a | S,
                a | f | S,
            ])
        } else {
            self.rng.pick(&[
                0,
                sy | a | S,
                sy | a | S,
                sy | a | f | S,
                r | S,
                a | r | S,
                a | S,
            ])
        }
    }

    /// Both legs (or one) of a service flow, from the pod or another client, maybe hairpinned,
    /// maybe translated, its frontend maybe gone.
    fn service_flow(&mut self, st: &mut State, now: u64) {
        let client = if self.rng.pct(85) { POD } else { OTHER };
        let cport = self.client_port();
        let fes: Vec<(FeKey, Fe)> = st.fe.iter().map(|(k, v)| (*k, *v)).collect();
        let (fk, fe) = if !fes.is_empty() && self.rng.pct(80) {
            let (k, v) = fes[self.rng.below(fes.len())];
            (k, Some(v))
        } else {
            let (addr, port, proto) = self.rng.pick(&FRONTENDS);
            (FeKey { addr, port, proto }, None)
        };
        let set_id = match fe {
            Some(fe) if self.rng.pct(85) => {
                if self.rng.pct(80) {
                    fe.cluster_id
                } else {
                    fe.local_id
                }
            }
            _ => self.rng.range(1, 4) as u32,
        };
        let slots: Vec<Be> = st
            .be
            .iter()
            .filter(|((s, _), _)| *s == set_id)
            .map(|(_, b)| *b)
            .collect();
        let (baddr, bport) = if !slots.is_empty() && self.rng.pct(70) {
            let b = slots[self.rng.below(slots.len())];
            (b.addr, b.port)
        } else {
            self.rng.pick(&BACKENDS)
        };
        let t = Tuple {
            saddr: client,
            sport: cport,
            daddr: fk.addr,
            dport: fk.port,
            proto: fk.proto,
        };
        let hairpin = baddr == client;
        let mut fwd = Ct::blank(CT_FWD);
        fwd.nat_daddr = baddr;
        fwd.nat_dport = bport;
        if hairpin {
            fwd.nat_saddr = self.cfg.hairpin;
            fwd.flags |= F_HAIRPIN;
        }
        if self.rng.pct(20) {
            fwd.nat_sport = self.rng.range(20000, 20003) as u16;
            fwd.flags |= F_XLATE;
        }
        fwd.set_id = set_id;
        fwd.gen = match fe {
            Some(fe) if self.rng.pct(70) => fe.gen,
            _ => self.rng.below(3) as u32,
        };
        fwd.seen = self.seen(t.proto, true);
        let (rk, mut rev) = inverse(&t, &fwd);
        rev.seen = self.seen(t.proto, false);
        self.put_legs(st, now, (t, fwd), (rk, rev));
    }

    /// Writes both legs, or one (a half flow), with ages.
    fn put_legs(&mut self, st: &mut State, now: u64, f: (Tuple, Ct), r: (Tuple, Ct)) {
        let legs = self.rng.weighted(&[70, 15, 15]);
        let age_f = self.age(now);
        let age_r = if self.rng.pct(70) {
            age_f
        } else {
            self.age(now)
        };
        let with = |mut c: Ct, last: Stamp| {
            let Stamp::At(l) = last else { unreachable!() };
            c.last = last;
            c.created = Stamp::At(l - 5_000_000_000);
            c
        };
        if legs != 2 {
            st.ct.insert(f.0, with(f.1, age_f));
        }
        if legs != 1 {
            st.ct.insert(r.0, with(r.1, age_r));
        }
    }

    /// A DIRECT entry of the pod's own flow, keyed by the direction reaching the pod.
    fn direct_flow(&mut self, st: &mut State, now: u64) {
        let proto = self.rng.pick(&[TCP, TCP, UDP]);
        let k = Tuple {
            saddr: self.rng.pick(&PEERS),
            sport: self.rng.pick(&PEER_PORTS),
            daddr: POD,
            dport: self.client_port(),
            proto,
        };
        let mut d = Ct::blank(CT_DIRECT);
        d.seen = self.seen(proto, true) | self.seen(proto, false) << PEER_SHIFT;
        let last = self.age(now);
        let Stamp::At(l) = last else { unreachable!() };
        d.last = last;
        d.created = Stamp::At(l - 5_000_000_000);
        st.ct.insert(k, d);
    }

    /// A translated direct flow: FWD {sport>P, XLATE} and its REV.
    fn xlate_direct_flow(&mut self, st: &mut State, now: u64) {
        let proto = self.rng.pick(&[TCP, TCP, UDP]);
        let t = Tuple {
            saddr: POD,
            sport: self.client_port(),
            daddr: self.rng.pick(&PEERS),
            dport: self.rng.pick(&PEER_PORTS),
            proto,
        };
        let mut fwd = Ct::blank(CT_FWD);
        fwd.nat_sport = self.rng.range(20000, 20003) as u16;
        fwd.flags = F_XLATE;
        fwd.seen = self.seen(proto, true);
        let (rk, mut rev) = inverse(&t, &fwd);
        rev.seen = self.seen(proto, false);
        self.put_legs(st, now, (t, fwd), (rk, rev));
    }

    /// Live reply tuples (peer -> pod:P) on most or all of the translated ports, so that a
    /// translation towards that peer finds the range full (CT_COLLISION) or nearly so.
    fn fill_xlate_ports(&mut self, st: &mut State, now: u64) {
        let (peer, pport) = if self.rng.pct(70) {
            self.rng.pick(&BACKENDS)
        } else {
            (self.rng.pick(&PEERS), self.rng.pick(&PEER_PORTS))
        };
        let proto = self.rng.pick(&[TCP, UDP]);
        let skip = if self.rng.pct(50) {
            None
        } else {
            Some(
                self.rng
                    .range(self.cfg.xlate_min as u64, self.cfg.xlate_max as u64)
                    as u16,
            )
        };
        for port in self.cfg.xlate_min..=self.cfg.xlate_max {
            if Some(port) == skip {
                continue;
            }
            let k = Tuple {
                saddr: peer,
                sport: pport,
                daddr: POD,
                dport: port,
                proto,
            };
            let mut c = if self.rng.pct(60) {
                let mut d = Ct::blank(CT_DIRECT);
                d.seen = self.seen(proto, true) | self.seen(proto, false) << PEER_SHIFT;
                d
            } else {
                let mut r = Ct::blank(CT_REV);
                r.nat_saddr = self.rng.pick(&[VIP1, VIP2]);
                r.nat_sport = self.rng.pick(&[80, 53]);
                r.seen = self.seen(proto, false);
                r
            };
            // Young: a live flow (an entry with no other leg is still live while not idle).
            c.last = Stamp::At(now - self.rng.pick(&[50u64, 3_000]) * 1_000_000);
            c.created = c.last;
            st.ct.insert(k, c);
        }
    }

    /// Anything at all, at a tuple of the cluster.
    fn garbage_entry(&mut self, st: &mut State, now: u64) {
        let k = self.any_tuple();
        let r = &mut self.rng;
        let mut c = Ct::blank(r.pick(&[0, CT_FWD, CT_REV, CT_DIRECT, 4, 9]));
        if r.pct(50) {
            c.nat_saddr = r.pick(&[VIP1, BE_A, POD, self.cfg.hairpin]);
        }
        if r.pct(50) {
            c.nat_daddr = r.pick(&[VIP1, BE_A, BE_B, POD]);
        }
        if r.pct(50) {
            c.nat_sport = r.pick(&[80, 20001, 40000, 8080]);
        }
        if r.pct(50) {
            c.nat_dport = r.pick(&[80, 20002, 40001, 8080]);
        }
        c.set_id = r.below(5) as u32;
        c.gen = r.below(3) as u32;
        c.seen = r.u32() & 0x9797;
        c.flags = r.u8() & 0x1f;
        if r.pct(10) {
            c.tun = PEER;
        }
        let last = self.age(now);
        let Stamp::At(l) = last else { unreachable!() };
        c.last = last;
        c.created = Stamp::At(l - 5_000_000_000);
        st.ct.insert(k, c);
    }

    fn any_tuple(&mut self) -> Tuple {
        let r = &mut self.rng;
        let addrs = [POD, OTHER, VIP1, VIP2, BE_A, BE_B, PEER, self.cfg.hairpin];
        Tuple {
            saddr: r.pick(&addrs),
            sport: r.pick(&[80, 8080, 40000, 40001, 20000, 20002, 53, 5353]),
            daddr: r.pick(&addrs),
            dport: r.pick(&[80, 8080, 40000, 40001, 20001, 20003, 53, 5353]),
            proto: r.pick(&[TCP, UDP]),
        }
    }

    // --- packets -------------------------------------------------------------------------

    pub fn packet(&mut self, st: &State) -> Packet {
        if !self.pending.is_empty() && self.rng.pct(70) {
            let i = self.pending.pop_front().unwrap();
            if let Some(p) = self.intent(i, st) {
                return p;
            }
        }
        let keys: Vec<(Tuple, Ct)> = st.ct.iter().map(|(k, v)| (*k, *v)).collect();
        match self.rng.weighted(&[26, 8, 22, 12, 10, 7, 5, 5, 5]) {
            0 if !keys.is_empty() => {
                let (k, e) = keys[self.rng.below(keys.len())];
                self.hit_entry(k, e)
            }
            1 if !keys.is_empty() => {
                // The swapped tuple from the pod: the direct path's reply-tuple lookups.
                let (k, _) = keys[self.rng.below(keys.len())];
                let flags = self.flags();
                self.l4_packet(Prog::FromPod, k.swap(), flags, "swap of an entry's tuple")
            }
            2 => self.new_service_flow(st),
            3 => self.new_direct_flow(),
            4 => self.icmp_error(st),
            5 => self.later_fragment(st),
            6 => {
                let t = self.any_tuple();
                let flags = self.flags();
                self.l4_packet(Prog::ToPod, t, flags, "random towards the pod")
            }
            7 => self.junk(),
            _ => {
                let t = self.any_tuple();
                let flags = self.flags();
                let prog = if self.rng.pct(50) {
                    Prog::FromPod
                } else {
                    Prog::ToPod
                };
                self.l4_packet(prog, t, flags, "random tuple")
            }
        }
    }

    fn flags(&mut self) -> u8 {
        let r = &mut self.rng;
        match r.weighted(&[22, 12, 20, 12, 10, 5, 6, 4, 3, 6]) {
            0 => SYN,
            1 => SYN | ACK,
            2 => ACK,
            3 => PSH | ACK,
            4 => FIN | ACK,
            5 => FIN,
            6 => RST,
            7 => RST | ACK,
            8 => SYN | FIN,
            _ => r.u8(),
        }
    }

    /// A packet with an existing entry's tuple, through the program that would see it.
    fn hit_entry(&mut self, k: Tuple, e: Ct) -> Packet {
        let flags = self.flags();
        let prog = match e.ty {
            CT_FWD => Prog::FromPod,
            CT_REV | CT_DIRECT if k.daddr == self.cfg.hairpin => Prog::FromPod,
            CT_REV | CT_DIRECT => Prog::ToPod,
            _ => {
                if self.rng.pct(50) {
                    Prog::FromPod
                } else {
                    Prog::ToPod
                }
            }
        };
        if prog == Prog::FromPod && e.ty == CT_FWD && self.rng.pct(50) {
            self.script(k);
        }
        self.l4_packet(prog, k, flags, &format!("hits the entry at {k}"))
    }

    /// A new flow from the pod (or a spoofed/other client) to a frontend, maybe a gone one.
    fn new_service_flow(&mut self, st: &State) -> Packet {
        let fes: Vec<FeKey> = st.fe.keys().copied().collect();
        let fk = if !fes.is_empty() && self.rng.pct(85) {
            fes[self.rng.below(fes.len())]
        } else {
            let (addr, port, proto) = self.rng.pick(&FRONTENDS);
            FeKey { addr, port, proto }
        };
        let client = if self.rng.pct(90) { POD } else { OTHER };
        let t = Tuple {
            saddr: client,
            sport: self.client_port(),
            daddr: fk.addr,
            dport: fk.port,
            proto: fk.proto,
        };
        let flags = if self.rng.pct(70) { SYN } else { self.flags() };
        if self.rng.pct(40) {
            self.script(t);
        }
        if self.rng.pct(12) {
            return self.fragmented(Prog::FromPod, t, flags, "new service flow, fragmented");
        }
        self.l4_packet(Prog::FromPod, t, flags, "new service flow")
    }

    fn new_direct_flow(&mut self) -> Packet {
        let t = Tuple {
            saddr: if self.rng.pct(90) { POD } else { OTHER },
            sport: self.client_port(),
            daddr: self.rng.pick(&PEERS),
            dport: self.rng.pick(&PEER_PORTS),
            proto: self.rng.pick(&[TCP, TCP, UDP]),
        };
        let flags = if self.rng.pct(60) { SYN } else { self.flags() };
        if self.rng.pct(40) {
            self.script(t);
        }
        self.l4_packet(Prog::FromPod, t, flags, "direct flow")
    }

    /// The rest of a flow's life, queued: replies, data, close, and port reuse.
    fn script(&mut self, t: Tuple) {
        let steps = [
            Intent::Reply {
                t,
                flags: SYN | ACK,
            },
            Intent::Again { t, flags: ACK },
            Intent::Again {
                t,
                flags: PSH | ACK,
            },
            Intent::Reply { t, flags: ACK },
            Intent::Again {
                t,
                flags: FIN | ACK,
            },
            Intent::Reply {
                t,
                flags: FIN | ACK,
            },
            Intent::Again { t, flags: ACK },
            Intent::Again { t, flags: SYN },
            Intent::Reply {
                t,
                flags: SYN | ACK,
            },
        ];
        let n = self.rng.range(1, steps.len() as u64) as usize;
        let skip_close = self.rng.pct(30);
        for (i, s) in steps.into_iter().take(n).enumerate() {
            if skip_close && (4..=6).contains(&i) {
                continue;
            }
            if self.rng.pct(10) {
                // Now and then a reply is an RST instead.
                if let Intent::Reply { t, .. } = s {
                    self.pending.push_back(Intent::Reply { t, flags: RST });
                    continue;
                }
            }
            self.pending.push_back(s);
        }
    }

    fn intent(&mut self, i: Intent, st: &State) -> Option<Packet> {
        match i {
            Intent::Again { t, flags } => {
                Some(self.l4_packet(Prog::FromPod, t, flags, "the flow goes on"))
            }
            Intent::Reply { t, flags } => {
                // Where the answer comes from: the flow's reply leg, as the state now says.
                let (rk, prog) = match st.ct.get(&t) {
                    Some(e) if e.ty == CT_FWD => {
                        let (rk, _) = inverse(&t, e);
                        let prog = if e.flags & F_HAIRPIN != 0 {
                            Prog::FromPod
                        } else {
                            Prog::ToPod
                        };
                        (rk, prog)
                    }
                    _ => (t.swap(), Prog::ToPod),
                };
                Some(self.l4_packet(prog, rk, flags, "the peer answers"))
            }
            Intent::Later { prog, k } => Some(self.later(prog, k, "later fragment (queued)")),
            Intent::Frame { prog, frame, what } => Some(Packet { prog, frame, what }),
        }
    }

    /// A TCP/UDP packet with tuple `t` (UDP ignores `flags`), often mutated.
    fn l4_packet(&mut self, prog: Prog, t: Tuple, flags: u8, what: &str) -> Packet {
        let mut what = format!("{what}: {t}");
        let mut h = self.header(prog, t.saddr, t.daddr, t.proto);
        if self.rng.pct(7) {
            h.options = self.options();
            what.push_str(", IP options");
        }
        if self.rng.pct(6) {
            h.mf = true;
            h.df = false;
            what.push_str(", first fragment");
            self.firsts.push((prog, h.frag_key()));
            if self.rng.pct(60) {
                self.pending.push_back(Intent::Later {
                    prog,
                    k: h.frag_key(),
                });
            }
        }
        let l4 = self.l4_bytes(&h, t, flags);
        let frame = h.build(&l4);
        let frame = self.mutate(frame, &mut what);
        Packet { prog, frame, what }
    }

    /// The first fragment of a datagram and, queued, its later fragments: sometimes a later one
    /// goes first.
    fn fragmented(&mut self, prog: Prog, t: Tuple, flags: u8, what: &str) -> Packet {
        let mut h = self.header(prog, t.saddr, t.daddr, t.proto);
        h.mf = true;
        h.df = false;
        let k = h.frag_key();
        self.firsts.push((prog, k));
        let mut l4 = self.l4_bytes(&h, t, flags);
        let mut what = what.to_string();
        if self.rng.pct(15) {
            // A tiny first fragment: the L4 header does not fit in it.
            let n = self.rng.pick(&[0usize, 4, 7, 8, 12, 19]).min(l4.len());
            l4.truncate(n);
            what.push_str(&format!(", tiny ({n} bytes of L4)"));
        }
        let first = Packet {
            prog,
            frame: h.build(&l4),
            what: format!("{what}: first fragment of {t}"),
        };
        let later_first = self.rng.pct(35);
        if later_first {
            self.pending.push_front(Intent::Frame {
                prog: first.prog,
                frame: first.frame,
                what: first.what,
            });
            for _ in 0..self.rng.below(2) {
                self.pending.push_back(Intent::Later { prog, k });
            }
            return self.later(prog, k, "later fragment before its first");
        }
        for _ in 0..self.rng.range(1, 2) {
            self.pending.push_back(Intent::Later { prog, k });
        }
        first
    }

    fn later_fragment(&mut self, st: &State) -> Packet {
        let known: Vec<FragKey> = st.frag.keys().copied().collect();
        let (prog, k) = match self.rng.below(3) {
            0 if !self.firsts.is_empty() => self.firsts[self.rng.below(self.firsts.len())],
            1 if !known.is_empty() => {
                let k = known[self.rng.below(known.len())];
                (self.any_prog(), k)
            }
            _ => (self.any_prog(), self.frag_key()),
        };
        self.later(prog, k, "later fragment")
    }

    fn any_prog(&mut self) -> Prog {
        if self.rng.pct(50) {
            Prog::FromPod
        } else {
            Prog::ToPod
        }
    }

    fn later(&mut self, prog: Prog, k: FragKey, what: &str) -> Packet {
        let mut h = self.header(prog, k.saddr, k.daddr, k.proto);
        h.id = k.id;
        h.df = false;
        h.mf = self.rng.pct(40);
        h.frag_off = self.rng.range(1, 400) as u16;
        let n = self.rng.pick(&[0usize, 1, 7, 8, 24, 64, 300]);
        let payload = self.rng.bytes(n);
        let mut what = format!(
            "{what}: {} > {} id {:#06x} proto {} off {}{}",
            ip(k.saddr),
            ip(k.daddr),
            k.id,
            k.proto,
            h.frag_off,
            if h.mf { " MF" } else { "" }
        );
        let frame = h.build(&payload);
        let frame = self.mutate(frame, &mut what);
        Packet { prog, frame, what }
    }

    /// An ICMP error towards the pod, quoting a NATed flow's packet (as it left rewritten), a
    /// random one, or garbage, whole or cut anywhere.
    fn icmp_error(&mut self, st: &State) -> Packet {
        let revs: Vec<Tuple> = st
            .ct
            .iter()
            .filter(|(_, v)| v.ty == CT_REV)
            .map(|(k, _)| *k)
            .collect();
        let q = if !revs.is_empty() && self.rng.pct(75) {
            revs[self.rng.below(revs.len())].swap()
        } else {
            self.any_tuple()
        };
        let outer_src = match self.rng.below(3) {
            0 | 1 => q.daddr,
            _ => self.rng.pick(&[ROUTER, PEER, VIP1]),
        };
        let (ty, code) = match self.rng.weighted(&[60, 25, 15]) {
            0 => (3u8, self.rng.below(16) as u8),
            1 => (11, self.rng.below(2) as u8),
            _ => (self.rng.pick(&[0u8, 8, 5, 12, 4]), 0),
        };
        let mut what = format!("ICMP {ty}/{code} from {} quoting {q}", ip(outer_src));
        // The quoted packet.
        let mut qh = self.header(Prog::FromPod, q.saddr, q.daddr, q.proto);
        if self.rng.pct(10) {
            qh.options = self.options();
        }
        let flags = self.flags();
        let ql4 = self.l4_bytes(&qh, q, flags);
        let mut quote = qh.build(&ql4)[ETH..].to_vec();
        let qihl = (quote[0] & 0xf) as usize * 4;
        let cut = match self.rng.weighted(&[30, 20, 10, 6, 6, 6, 6, 6, 10]) {
            0 => qihl + 8,
            1 => quote.len(),
            2 => qihl + 20,
            3 => qihl + 4,
            4 => qihl + 6,
            5 => qihl + 2,
            6 => qihl,
            7 => self.rng.below(20),
            _ => qihl + self.rng.below(30),
        };
        quote.truncate(cut.min(quote.len()));
        match self.rng.weighted(&[85, 3, 3, 3, 6]) {
            0 => {}
            1 if !quote.is_empty() => {
                quote[0] = (quote[0] & 0xf) | 0x60;
                what.push_str(", quote not v4");
            }
            2 if quote.len() > 9 => {
                quote[9] = ICMP;
                what.push_str(", quote proto ICMP");
            }
            3 if !quote.is_empty() => {
                quote[0] = 0x40 | self.rng.below(16) as u8;
                what.push_str(", quote IHL mangled");
            }
            _ => {
                let n = quote.len();
                quote = self.rng.bytes(n);
                what.push_str(", garbage quote");
            }
        }
        let mut icmp = vec![ty, code, 0, 0, 0, 0, 0, 0];
        if ty == 3 && code == 4 {
            icmp[6..8].copy_from_slice(&1400u16.to_be_bytes());
        }
        icmp.extend_from_slice(&quote);
        let c = checksum(&icmp);
        put16(&mut icmp, 2, c);
        if self.rng.pct(8) {
            put16(&mut icmp, 2, self.rng.u16());
            what.push_str(", ICMP checksum wrong");
        }
        let prog = if self.rng.pct(92) {
            Prog::ToPod
        } else {
            Prog::FromPod
        };
        let h = self.header(prog, outer_src, q.saddr, ICMP);
        let frame = h.build(&icmp);
        let frame = self.mutate(frame, &mut what);
        Packet { prog, frame, what }
    }

    /// Not IPv4, or random bytes, or IPv4 of another protocol.
    fn junk(&mut self) -> Packet {
        let prog = self.any_prog();
        let r = &mut self.rng;
        let (frame, what) = match r.below(5) {
            0 => (crate::bpf_common::arp_frame(), "ARP".to_string()),
            1 => (crate::bpf_common::ipv6_frame(), "IPv6".to_string()),
            2 => {
                let n = r.range(14, 90) as usize;
                let mut f = r.bytes(n);
                if r.pct(70) {
                    f[12] = 0x08;
                    f[13] = 0x00;
                }
                (f, "random bytes".to_string())
            }
            3 => {
                let n = r.range(14, 60) as usize;
                let mut f = r.bytes(n);
                f[12] = 0x81;
                f[13] = 0x00;
                (f, "VLAN tagged".to_string())
            }
            _ => {
                let proto = r.pick(&[47u8, 132, 50, 0, 255, ICMP]);
                let (s, d) = (self.some_addr(), self.some_addr());
                let h = self.header(prog, s, d, proto);
                let n = self.rng.below(40);
                let body = self.rng.bytes(n);
                (h.build(&body), format!("IPv4 proto {proto}"))
            }
        };
        let mut what = what;
        let frame = self.mutate(frame, &mut what);
        Packet { prog, frame, what }
    }

    // --- building ------------------------------------------------------------------------

    fn header(&mut self, prog: Prog, s: u32, d: u32, proto: u8) -> Hdr {
        let r = &mut self.rng;
        let (src_mac, dst_mac) = match prog {
            Prog::FromPod => (MAC_POD, MAC_HOST),
            Prog::ToPod => (MAC_HOST, MAC_POD),
        };
        Hdr {
            src_mac,
            dst_mac,
            s,
            d,
            proto,
            id: if r.pct(80) { r.pick(&IDS) } else { r.u16() },
            df: r.pct(70),
            mf: false,
            frag_off: 0,
            ttl: r.pick(&[64, 63, 1, 255]),
            tos: if r.pct(90) { 0 } else { r.u8() },
            options: vec![],
        }
    }

    fn options(&mut self) -> Vec<u8> {
        let n = 4 * self.rng.range(1, 10) as usize;
        match self.rng.below(3) {
            0 => vec![1; n], // NOPs
            1 => {
                // Router alert, then NOPs.
                let mut o = vec![0x94, 4, 0, 0];
                o.resize(n, 1);
                o
            }
            _ => self.rng.bytes(n),
        }
    }

    /// The TCP or UDP header and payload for `t` in header `h`, checksum right.
    fn l4_bytes(&mut self, h: &Hdr, t: Tuple, flags: u8) -> Vec<u8> {
        let r = &mut self.rng;
        let n = match r.weighted(&[30, 50, 15, 5]) {
            0 => 0,
            1 => r.below(64),
            2 => r.range(64, 300) as usize,
            _ => r.range(1000, 1460) as usize,
        };
        let payload = r.bytes(n);
        match t.proto {
            TCP => {
                let mut b = vec![0u8; 20];
                put16(&mut b, 0, t.sport);
                put16(&mut b, 2, t.dport);
                put32(&mut b, 4, r.u32());
                put32(&mut b, 8, if flags & ACK != 0 { r.u32() } else { 0 });
                b[12] = 5 << 4;
                b[13] = flags;
                put16(&mut b, 14, 64240);
                if r.pct(5) {
                    put16(&mut b, 18, r.u16());
                }
                if r.pct(10) {
                    // TCP options (MSS, then NOPs): a data offset above 5.
                    let words = r.range(1, 10) as usize;
                    let mut o = vec![2, 4, 0x05, 0xb4];
                    o.resize(words * 4, 1);
                    b.extend_from_slice(&o);
                    b[12] = ((5 + words) as u8) << 4;
                } else if r.pct(2) {
                    b[12] = (r.below(16) as u8) << 4; // any data offset at all
                }
                b.extend_from_slice(&payload);
                let c = h.pseudo_checksum(&b);
                put16(&mut b, 16, c);
                b
            }
            _ => {
                let mut b = vec![0u8; 8];
                put16(&mut b, 0, t.sport);
                put16(&mut b, 2, t.dport);
                put16(&mut b, 4, (8 + payload.len()) as u16);
                b.extend_from_slice(&payload);
                if r.pct(80) {
                    let c = match h.pseudo_checksum(&b) {
                        0 => 0xffff,
                        c => c,
                    };
                    put16(&mut b, 6, c);
                }
                b
            }
        }
    }

    /// Damage of every kind, now and then.
    fn mutate(&mut self, mut f: Vec<u8>, what: &mut String) -> Vec<u8> {
        let r = &mut self.rng;
        if !r.pct(22) || f.len() < ETH + 20 || get16(&f, 12) != 0x0800 {
            return f;
        }
        let ihl = (f[ETH] & 0xf) as usize * 4;
        let fix_ip = |f: &mut Vec<u8>| {
            let ihl = ((f[ETH] & 0xf) as usize * 4).max(20);
            if f.len() >= ETH + ihl {
                put16(f, ETH + 10, 0);
                let c = checksum(&f[ETH..ETH + ihl]);
                put16(f, ETH + 10, c);
            }
        };
        match r.weighted(&[14, 6, 10, 10, 18, 14, 14, 8, 6]) {
            0 => {
                let n = r.range(ETH as u64, f.len() as u64 - 1) as usize;
                f.truncate(n);
                what.push_str(&format!(", cut to {n} bytes"));
            }
            1 => {
                f[ETH] = (r.below(16) as u8) << 4 | (f[ETH] & 0xf);
                fix_ip(&mut f);
                what.push_str(", IP version mangled");
            }
            2 => {
                f[ETH] = 0x40 | r.below(16) as u8;
                if r.pct(50) {
                    fix_ip(&mut f);
                }
                what.push_str(", IHL mangled");
            }
            3 => {
                let total = get16(&f, ETH + 2);
                let v = match r.below(4) {
                    0 => 0,
                    1 => total.wrapping_add(r.range(1, 40) as u16),
                    2 => total.saturating_sub(r.range(1, 30) as u16),
                    _ => r.u16(),
                };
                put16(&mut f, ETH + 2, v);
                if r.pct(70) {
                    fix_ip(&mut f);
                }
                what.push_str(&format!(", total length {v}"));
            }
            4 => {
                let n = r.range(1, 40) as usize;
                let fill = r.pct(50);
                for _ in 0..n {
                    f.push(if fill { r.u8() } else { 0 });
                }
                what.push_str(&format!(", {n} bytes of Ethernet padding"));
            }
            5 if f.len() > ETH + ihl + 8 && ihl >= 20 => {
                let at = ETH + ihl + r.below(f.len() - ETH - ihl);
                f[at] ^= 1 << r.below(8);
                what.push_str(", a bit of L4 flipped (checksum wrong)");
            }
            6 => {
                put16(&mut f, ETH + 10, r.u16());
                what.push_str(", IP header checksum wrong");
            }
            7 => {
                // UDP: checksum 0 ("none").
                if ihl >= 20 && f.len() >= ETH + ihl + 8 && f[ETH + 9] == UDP {
                    put16(&mut f, ETH + ihl + 6, 0);
                    what.push_str(", UDP checksum 0");
                }
            }
            _ => {
                f[ETH + 9] = r.pick(&[TCP, UDP, ICMP, 47]);
                if r.pct(70) {
                    fix_ip(&mut f);
                }
                what.push_str(", protocol changed");
            }
        }
        f
    }
}

/// An IPv4 header to build, field by field.
#[derive(Clone, Debug)]
struct Hdr {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    s: u32,
    d: u32,
    proto: u8,
    id: u16,
    df: bool,
    mf: bool,
    frag_off: u16,
    ttl: u8,
    tos: u8,
    options: Vec<u8>,
}

impl Hdr {
    fn frag_key(&self) -> FragKey {
        FragKey {
            saddr: self.s,
            daddr: self.d,
            id: self.id,
            proto: self.proto,
        }
    }

    fn ipv4(&self, payload_len: usize) -> Ipv4Header {
        let mut h = Ipv4Header {
            identification: self.id,
            dont_fragment: self.df,
            more_fragments: self.mf,
            fragment_offset: IpFragOffset::try_new(self.frag_off).unwrap(),
            time_to_live: self.ttl,
            protocol: IpNumber(self.proto),
            source: Ipv4Addr::from(self.s).octets(),
            destination: Ipv4Addr::from(self.d).octets(),
            options: Ipv4Options::try_from(&self.options[..]).unwrap(),
            ..Default::default()
        };
        h.dscp = etherparse::IpDscp::try_new(self.tos >> 2).unwrap();
        h.ecn = etherparse::IpEcn::try_new(self.tos & 3).unwrap();
        h.set_payload_len(payload_len).unwrap();
        h.header_checksum = h.calc_header_checksum();
        h
    }

    /// The TCP/UDP checksum of `seg` under this header's pseudo header.
    fn pseudo_checksum(&self, seg: &[u8]) -> u16 {
        let mut p = Vec::with_capacity(12 + seg.len());
        p.extend_from_slice(&self.s.to_be_bytes());
        p.extend_from_slice(&self.d.to_be_bytes());
        p.extend_from_slice(&[0, self.proto]);
        p.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        p.extend_from_slice(seg);
        checksum(&p)
    }

    fn build(&self, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH + 60 + payload.len());
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&self.ipv4(payload.len()).to_bytes());
        f.extend_from_slice(payload);
        f
    }
}
