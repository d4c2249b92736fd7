//! The second implementation: bpf/RULES.md, rule by rule, in plain Rust. Written from that text
//! (and the layouts of types.h / consts.h / config.h), not from bpf/lib/*.h.
//!
//! The model is a function of (program, frame, map state, configuration, clock, choices). The
//! datapath's own randomness (which slot, which translated port) and the clock (the program's
//! `now` lies somewhere in the interval the runner measured around BPF_PROG_TEST_RUN) are
//! *choices*: the model asks a [`Chooser`] at each such point, and the runner enumerates every
//! sequence of answers, so the model yields the set of allowed outcomes.

use std::collections::{BTreeMap, BTreeSet};

use super::net::*;
use crate::bpf_common::types;

pub use types::reason as R;

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CT_FWD: u8 = types::ct_type::CT_TYPE_FWD.0;
pub const CT_REV: u8 = types::ct_type::CT_TYPE_REV.0;
pub const CT_DIRECT: u8 = types::ct_type::CT_TYPE_DIRECT.0;
pub const F_HAIRPIN: u8 = types::ct_flags::CT_F_HAIRPIN.0;
pub const F_XLATE: u8 = types::ct_flags::CT_F_XLATE.0;
pub const SEEN: u32 = types::tcp_flag_bits::CT_SEEN_PKT.0;
pub const PEER_SHIFT: u32 = 8;
const T_FIN: u32 = types::tcp_flag_bits::TCPF_FIN.0;
const T_SYN: u32 = types::tcp_flag_bits::TCPF_SYN.0;
const T_RST: u32 = types::tcp_flag_bits::TCPF_RST.0;
const T_ACK: u32 = types::tcp_flag_bits::TCPF_ACK.0;
pub const FE_AFFINITY: u32 = types::frontend_flags::FE_F_AFFINITY.0;
pub const FE_EXTERNAL: u32 = types::frontend_flags::FE_F_EXTERNAL.0;
pub const FE_ITP_LOCAL: u32 = types::frontend_flags::FE_F_ITP_LOCAL.0;
pub const FE_ETP_LOCAL: u32 = types::frontend_flags::FE_F_ETP_LOCAL.0;

// ---------------------------------------------------------------------------------------------
// Map state, in the model's terms (addresses and ports in host order).

/// (saddr, sport, daddr, dport, proto) of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tuple {
    pub saddr: u32,
    pub sport: u16,
    pub daddr: u32,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    pub fn swap(&self) -> Tuple {
        Tuple {
            saddr: self.daddr,
            sport: self.dport,
            daddr: self.saddr,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

impl std::fmt::Display for Tuple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            TCP => "tcp".to_string(),
            UDP => "udp".to_string(),
            x => format!("proto{x}"),
        };
        write!(
            f,
            "{}:{} > {}:{} {p}",
            ip(self.saddr),
            self.sport,
            ip(self.daddr),
            self.dport
        )
    }
}

/// A timestamp: a value already in the map, or "written by this packet" (some instant of the
/// run's clock interval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stamp {
    At(u64),
    Now,
}

/// sl_ct_v2 value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct {
    pub created: Stamp,
    pub last: Stamp,
    pub nat_saddr: u32,
    pub nat_daddr: u32,
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub set_id: u32,
    pub gen: u32,
    pub tun: u32,
    pub seen: u32,
    pub ty: u8,
    pub flags: u8,
}

impl Ct {
    pub fn blank(ty: u8) -> Ct {
        Ct {
            created: Stamp::Now,
            last: Stamp::Now,
            nat_saddr: 0,
            nat_daddr: 0,
            nat_sport: 0,
            nat_dport: 0,
            set_id: 0,
            gen: 0,
            tun: 0,
            seen: 0,
            ty,
            flags: 0,
        }
    }
    /// Every field but the timestamps.
    pub fn same_fields(&self, o: &Ct) -> bool {
        Ct {
            created: Stamp::Now,
            last: Stamp::Now,
            ..*self
        } == Ct {
            created: Stamp::Now,
            last: Stamp::Now,
            ..*o
        }
    }
}

impl std::fmt::Display for Ct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ty = match self.ty {
            CT_FWD => "FWD".to_string(),
            CT_REV => "REV".to_string(),
            CT_DIRECT => "DIRECT".to_string(),
            x => format!("type{x}"),
        };
        write!(f, "{ty}")?;
        if self.nat_saddr != 0 {
            write!(f, " saddr>{}", ip(self.nat_saddr))?;
        }
        if self.nat_sport != 0 {
            write!(f, " sport>{}", self.nat_sport)?;
        }
        if self.nat_daddr != 0 {
            write!(f, " daddr>{}", ip(self.nat_daddr))?;
        }
        if self.nat_dport != 0 {
            write!(f, " dport>{}", self.nat_dport)?;
        }
        write!(
            f,
            " set {} gen {} seen {:#x}",
            self.set_id, self.gen, self.seen
        )?;
        if self.tun != 0 {
            write!(f, " tun {}", ip(self.tun))?;
        }
        if self.flags != 0 {
            write!(f, " flags {:#x}", self.flags)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FeKey {
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fe {
    pub cluster_id: u32,
    pub cluster_count: u32,
    pub local_id: u32,
    pub local_count: u32,
    pub affinity_timeout: u32,
    pub gen: u32,
    pub flags: u32,
    pub kind: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Be {
    pub addr: u32,
    pub port: u16,
    pub flags: u16,
    pub node: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aff {
    pub last: Stamp,
    pub addr: u32,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frag {
    pub first: Stamp,
    pub nat_saddr: u32,
    pub nat_daddr: u32,
    pub tun: u32,
    pub flags: u32,
}

/// Everything the programs read or write, but the counters.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub fe: BTreeMap<FeKey, Fe>,
    pub vip: BTreeSet<u32>,
    /// (set id, slot)
    pub be: BTreeMap<(u32, u32), Be>,
    /// (set id, addr, port)
    pub bm: BTreeSet<(u32, u32, u16)>,
    /// The pod's entry at the test-run ifindex: Some(addr) (0 = no source check), or none.
    pub pod: Option<u32>,
    pub ct: BTreeMap<Tuple, Ct>,
    /// (client, set id)
    pub aff: BTreeMap<(u32, u32), Aff>,
    pub frag: BTreeMap<FragKey, Frag>,
}

/// config.h, as loaded.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub hairpin: u32,
    pub refresh_ns: u64,
    pub syn_ns: u64,
    pub established_ns: u64,
    pub fin_ns: u64,
    pub closed_ns: u64,
    pub rst_ns: u64,
    pub udp_ns: u64,
    pub udp_stream_ns: u64,
    pub xlate_min: u16,
    pub xlate_max: u16,
    pub frag_ns: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    FromPod,
    ToPod,
}

/// The interval in which the program read the clock.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub lo: u64,
    pub hi: u64,
}

// ---------------------------------------------------------------------------------------------
// Choices.

/// Enumerates every sequence of answers to the model's questions, depth first.
#[derive(Default)]
pub struct Chooser {
    prefix: Vec<usize>,
    pos: usize,
    arity: Vec<usize>,
    /// What each answer meant, for the trace.
    pub asked: Vec<String>,
}

impl Chooser {
    /// An answer in [0, n).
    pub fn choose(&mut self, n: usize, what: &str) -> usize {
        assert!(n > 0);
        let c = if self.pos < self.prefix.len() {
            self.prefix[self.pos]
        } else {
            self.prefix.push(0);
            0
        };
        self.arity.truncate(self.pos);
        self.arity.push(n);
        self.pos += 1;
        if n > 1 {
            self.asked.push(format!("{what}: {c} of 0..{n}"));
        }
        c
    }
    /// Moves to the next sequence; false when every one was tried.
    pub fn next(&mut self) -> bool {
        self.prefix.truncate(self.pos);
        while let Some(c) = self.prefix.pop() {
            let n = self.arity[self.prefix.len()];
            if c + 1 < n {
                self.prefix.push(c + 1);
                self.pos = 0;
                self.asked.clear();
                return true;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// What a packet did.

#[derive(Clone, Debug)]
pub struct Outcome {
    pub verdict: u32,
    pub out: Vec<u8>,
    pub reason: u32,
    /// The service counter (sl_svc_v1 index) this packet advanced.
    pub svc: Option<u32>,
    pub st: State,
    /// Offsets of checksum fields whose value may be written either 0x0000 or 0xffff (the two
    /// one's complement zeros; not UDP's, where 0 means "no checksum").
    pub loose: Vec<usize>,
    /// The rules the packet went through.
    pub trace: Vec<String>,
    /// The random choices the datapath made: ("slots", distinguishable slots as bits, count)
    /// then ("slot", slot, count); for a translation
    /// ("xlate", free ports, range), then ("port", port, 0) or ("collision", 0, 0).
    pub picks: Vec<(&'static str, u32, u32)>,
}

/// A parsed IPv4 packet (bpf/RULES.md, Parsing).
#[derive(Clone, Copy, Debug)]
pub struct Parsed {
    pub ihl: usize,
    pub total: usize,
    pub proto: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    /// Fragment offset != 0.
    pub later: bool,
    /// Offset 0 and MF.
    pub first: bool,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags byte (13 of the header).
    pub flags: u8,
}

impl Parsed {
    fn l4(&self) -> usize {
        ETH + self.ihl
    }
    fn tuple(&self) -> Tuple {
        Tuple {
            saddr: self.saddr,
            sport: self.sport,
            daddr: self.daddr,
            dport: self.dport,
            proto: self.proto,
        }
    }
    fn tcp(&self) -> bool {
        self.proto == TCP
    }
    fn udp(&self) -> bool {
        self.proto == UDP
    }
    /// bpf/RULES.md: "SYN means a TCP segment with SYN and without ACK".
    fn syn(&self) -> bool {
        self.tcp() && self.flags & SYN != 0 && self.flags & ACK == 0
    }
    /// bits(p).
    fn bits(&self) -> u32 {
        let f = if self.tcp() {
            self.flags as u32 & (T_FIN | T_SYN | T_RST | T_ACK)
        } else {
            0
        };
        f | SEEN
    }
}

/// Parsing, steps 1-4: Ok(packet) or the early outcome (verdict, reason).
pub fn parse(f: &[u8]) -> Result<Parsed, (u32, R)> {
    // 1.
    if f.len() < ETH || get16(f, 12) != 0x0800 {
        return Err((TC_ACT_OK, R::REASON_PASS_NON_IPV4));
    }
    // 2.
    if f.len() < ETH + 20 {
        return Err((TC_ACT_SHOT, R::REASON_DROP_TRUNCATED));
    }
    let v = f[ETH];
    let ihl = (v & 0xf) as usize * 4;
    if v >> 4 != 4 || ihl < 20 {
        return Err((TC_ACT_SHOT, R::REASON_DROP_MALFORMED));
    }
    let total = get16(f, ETH + 2) as usize;
    if total < ihl {
        return Err((TC_ACT_SHOT, R::REASON_DROP_MALFORMED));
    }
    if f.len() < ETH + total {
        return Err((TC_ACT_SHOT, R::REASON_DROP_TRUNCATED));
    }
    // 3.
    let fo = get16(f, ETH + 6);
    let later = fo & 0x1fff != 0;
    let first = !later && fo & 0x2000 != 0;
    let mut p = Parsed {
        ihl,
        total,
        proto: f[ETH + 9],
        saddr: get32(f, ETH + 12),
        daddr: get32(f, ETH + 16),
        id: get16(f, ETH + 4),
        later,
        first,
        sport: 0,
        dport: 0,
        flags: 0,
    };
    // 4.
    if !later && (p.tcp() || p.udp()) {
        let need = if p.tcp() { 20 } else { 8 };
        if total < ihl + need {
            let r = if first {
                R::REASON_DROP_MALFORMED
            } else {
                R::REASON_DROP_TRUNCATED
            };
            return Err((TC_ACT_SHOT, r));
        }
        let l4 = ETH + ihl;
        p.sport = get16(f, l4);
        p.dport = get16(f, l4 + 2);
        if p.tcp() {
            p.flags = f[l4 + 13];
        }
    }
    Ok(p)
}

/// `inverse(k, v)`: the other leg of a flow (bpf/RULES.md, Notation).
pub fn inverse(k: &Tuple, v: &Ct) -> (Tuple, Ct) {
    let or = |n: u32, o: u32| if n != 0 { n } else { o };
    let or16 = |n: u16, o: u16| if n != 0 { n } else { o };
    let key = Tuple {
        saddr: or(v.nat_daddr, k.daddr),
        sport: or16(v.nat_dport, k.dport),
        daddr: or(v.nat_saddr, k.saddr),
        dport: or16(v.nat_sport, k.sport),
        proto: k.proto,
    };
    let ty = match v.ty {
        CT_FWD => CT_REV,
        CT_REV => CT_FWD,
        x => x,
    };
    let val = Ct {
        created: Stamp::Now,
        last: Stamp::Now,
        nat_saddr: if v.nat_daddr != 0 { k.daddr } else { 0 },
        nat_daddr: if v.nat_saddr != 0 { k.saddr } else { 0 },
        nat_sport: if v.nat_dport != 0 { k.dport } else { 0 },
        nat_dport: if v.nat_sport != 0 { k.sport } else { 0 },
        set_id: v.set_id,
        gen: v.gen,
        tun: v.tun,
        seen: 0,
        ty,
        flags: v.flags,
    };
    (key, val)
}

/// What one flow looks like from one of its entries (Notation: a, b, last, half).
struct FlowView {
    a: u32,
    b: u32,
    last: Stamp,
    half: bool,
}

fn later_of(x: Stamp, y: Stamp) -> Stamp {
    match (x, y) {
        (Stamp::Now, _) | (_, Stamp::Now) => Stamp::Now,
        (Stamp::At(a), Stamp::At(b)) => Stamp::At(a.max(b)),
    }
}

// ---------------------------------------------------------------------------------------------
// The machine.

struct M<'a> {
    cfg: &'a Config,
    clk: Clock,
    ch: &'a mut Chooser,
    st: State,
    f: Vec<u8>,
    p: Parsed,
    loose: Vec<usize>,
    trace: Vec<String>,
    svc: Option<u32>,
    picks: Vec<(&'static str, u32, u32)>,
}

/// The end of a packet's way: verdict and reason (the frame is in M::f).
type Done = (u32, R);

/// Runs `prog` on `frame` against `st`; one outcome per call, the choices from `ch`.
pub fn run(
    cfg: &Config,
    prog: Prog,
    frame: &[u8],
    st: &State,
    clk: Clock,
    ch: &mut Chooser,
) -> Outcome {
    let parsed = parse(frame);
    let mut m = M {
        cfg,
        clk,
        ch,
        st: st.clone(),
        f: frame.to_vec(),
        p: parsed.unwrap_or(Parsed {
            ihl: 0,
            total: 0,
            proto: 0,
            saddr: 0,
            daddr: 0,
            id: 0,
            later: false,
            first: false,
            sport: 0,
            dport: 0,
            flags: 0,
        }),
        loose: vec![],
        trace: vec![],
        svc: None,
        picks: vec![],
    };
    let (verdict, reason) = match parsed {
        Err((v, r)) => {
            m.trace.push(format!("parsing: {}", reason_str(r.0)));
            (v, r)
        }
        Ok(_) => match prog {
            Prog::FromPod => m.from_pod(),
            Prog::ToPod => m.to_pod(),
        },
    };
    if verdict == TC_ACT_SHOT {
        // A dropped packet leaves as it came (the table tests' "dropped, untouched").
        m.f = frame.to_vec();
    }
    Outcome {
        verdict,
        out: m.f,
        reason: reason.0,
        svc: m.svc,
        st: m.st,
        loose: m.loose,
        trace: m.trace,
        picks: m.picks,
    }
}

pub fn reason_str(r: u32) -> String {
    crate::bpf_common::reason_name(r)
}

impl M<'_> {
    fn note(&mut self, s: impl Into<String>) {
        self.trace.push(s.into());
    }

    // --- the clock ------------------------------------------------------------------------

    /// now − ts > dur, for every instant of the interval; asked when the interval straddles.
    fn older_than(&mut self, ts: Stamp, dur: u64, what: &str) -> bool {
        match ts {
            Stamp::Now => false,
            Stamp::At(x) => {
                let lo = self.clk.lo.saturating_sub(x);
                let hi = self.clk.hi.saturating_sub(x);
                if lo > dur {
                    true
                } else if hi <= dur {
                    false
                } else {
                    self.ch.choose(2, &format!("clock: {what}")) == 1
                }
            }
        }
    }

    /// now − ts < dur ("younger than").
    fn younger_than(&mut self, ts: Stamp, dur: u64, what: &str) -> bool {
        match ts {
            Stamp::Now => dur > 0,
            Stamp::At(x) => {
                let lo = self.clk.lo.saturating_sub(x);
                let hi = self.clk.hi.saturating_sub(x);
                if hi < dur {
                    true
                } else if lo >= dur {
                    false
                } else {
                    self.ch.choose(2, &format!("clock: {what}")) == 1
                }
            }
        }
    }

    // --- conntrack notions (Notation) -----------------------------------------------------

    /// a, b, last and half of the flow an entry belongs to; None for types that are never gone.
    fn flow_view(&self, k: &Tuple, e: &Ct) -> Option<FlowView> {
        match e.ty {
            CT_DIRECT => Some(FlowView {
                a: e.seen & 0xff,
                b: e.seen >> PEER_SHIFT,
                last: e.last,
                half: false,
            }),
            CT_FWD | CT_REV => {
                let want = if e.ty == CT_FWD { CT_REV } else { CT_FWD };
                let (ok, _) = inverse(k, e);
                let o = self.st.ct.get(&ok).filter(|o| o.ty == want);
                let other_seen = o.map(|o| o.seen).unwrap_or(0);
                let (a, b) = if e.ty == CT_FWD {
                    (e.seen, other_seen)
                } else {
                    (other_seen, e.seen)
                };
                Some(FlowView {
                    a,
                    b,
                    last: o.map(|o| later_of(o.last, e.last)).unwrap_or(e.last),
                    half: o.is_none(),
                })
            }
            _ => None,
        }
    }

    /// "A flow is ended if a|b has FIN or RST."
    fn ended(&self, k: &Tuple, e: &Ct) -> bool {
        match self.flow_view(k, e) {
            Some(v) => (v.a | v.b) & (T_FIN | T_RST) != 0,
            None => false,
        }
    }

    /// Flow timeouts by what each direction saw.
    fn timeout(&self, proto: u8, a: u32, b: u32) -> u64 {
        let c = self.cfg;
        if proto == TCP {
            if (a | b) & T_RST != 0 {
                c.rst_ns
            } else if a & T_FIN != 0 && b & T_FIN != 0 {
                c.closed_ns
            } else if (a | b) & T_FIN != 0 {
                c.fin_ns
            } else if a & T_ACK != 0 && b & T_ACK != 0 {
                c.established_ns
            } else {
                c.syn_ns
            }
        } else if a & SEEN != 0 && b & SEEN != 0 {
            c.udp_stream_ns
        } else {
            c.udp_ns
        }
    }

    /// "A flow is gone if it is TCP with RST in a|b or FIN in both, or has been idle longer
    /// than its timeout." Other types are never gone.
    fn gone(&mut self, k: &Tuple, e: &Ct) -> bool {
        let Some(v) = self.flow_view(k, e) else {
            return false;
        };
        if k.proto == TCP && ((v.a | v.b) & T_RST != 0 || (v.a & T_FIN != 0 && v.b & T_FIN != 0)) {
            return true;
        }
        let t = self.timeout(k.proto, v.a, v.b);
        self.older_than(v.last, t, &format!("idle timeout of the flow at {k}"))
    }

    /// touch(e, p, shift).
    fn touch(&mut self, k: &Tuple, shift: u32) {
        let bits = self.p.bits() << shift;
        let last = self.st.ct[k].last;
        let refresh = self.older_than(last, self.cfg.refresh_ns, &format!("refresh of {k}"));
        let e = self.st.ct.get_mut(k).unwrap();
        e.seen |= bits;
        if refresh {
            e.last = Stamp::Now;
        }
    }

    /// "delete flow at (k, e)".
    fn delete_flow(&mut self, k: &Tuple, e: &Ct) {
        if e.ty == CT_FWD || e.ty == CT_REV {
            let (ik, _) = inverse(k, e);
            self.st.ct.remove(&ik);
        }
        self.st.ct.remove(k);
        self.note(format!("deleted the flow at {k}"));
    }

    /// Insert with NOEXIST.
    fn insert_new(&mut self, k: Tuple, v: Ct) -> bool {
        if self.st.ct.contains_key(&k) {
            return false;
        }
        self.st.ct.insert(k, v);
        true
    }

    // --- rewriting ------------------------------------------------------------------------

    /// Rewrites the packet's addresses and (when it has them) ports, updating the IP checksum
    /// and, `l4` set, the TCP/UDP checksum incrementally (pseudo header included; UDP 0 stays 0).
    fn rewrite(&mut self, saddr: u32, daddr: u32, sport: u16, dport: u16, l4: bool) {
        let p = self.p;
        let f = &mut self.f;
        let mut old = vec![];
        let mut new = vec![];
        if saddr != 0 && saddr != p.saddr {
            old.extend(words32(p.saddr));
            new.extend(words32(saddr));
            put32(f, ETH + 12, saddr);
        }
        if daddr != 0 && daddr != p.daddr {
            old.extend(words32(p.daddr));
            new.extend(words32(daddr));
            put32(f, ETH + 16, daddr);
        }
        if !old.is_empty() {
            let c = csum_update(get16(f, ETH + 10), &old, &new, false);
            put16(f, ETH + 10, c);
            self.loose.push(ETH + 10);
        }
        if !l4 || !(p.tcp() || p.udp()) {
            return;
        }
        let l4o = p.l4();
        if sport != 0 && sport != p.sport {
            old.push(p.sport);
            new.push(sport);
            put16(f, l4o, sport);
        }
        if dport != 0 && dport != p.dport {
            old.push(p.dport);
            new.push(dport);
            put16(f, l4o + 2, dport);
        }
        if old.is_empty() {
            return;
        }
        if p.tcp() {
            let at = l4o + 16;
            let c = csum_update(get16(f, at), &old, &new, false);
            put16(f, at, c);
            self.loose.push(at);
        } else {
            let at = l4o + 6;
            let c = get16(f, at);
            if c != 0 {
                put16(f, at, csum_update(c, &old, &new, true));
            }
        }
    }

    /// Rewrites per a conntrack entry's nat_* fields.
    fn rewrite_per(&mut self, e: &Ct) {
        self.rewrite(e.nat_saddr, e.nat_daddr, e.nat_sport, e.nat_dport, true);
    }

    /// "A first fragment whose addresses changed is remembered in sl_frag_v1 at its original
    /// (saddr, daddr, id, proto) with the new addresses."
    fn remember_first_fragment(&mut self) {
        if !self.p.first {
            return;
        }
        let (s, d) = (get32(&self.f, ETH + 12), get32(&self.f, ETH + 16));
        if s == self.p.saddr && d == self.p.daddr {
            return;
        }
        let k = FragKey {
            saddr: self.p.saddr,
            daddr: self.p.daddr,
            id: self.p.id,
            proto: self.p.proto,
        };
        let v = Frag {
            first: Stamp::Now,
            nat_saddr: if s != self.p.saddr { s } else { 0 },
            nat_daddr: if d != self.p.daddr { d } else { 0 },
            tun: 0,
            flags: 0,
        };
        self.st.frag.insert(k, v);
        self.note("first fragment remembered");
    }

    /// The frame bounced back out of the interface it came in on.
    fn redirect_back(&mut self) -> u32 {
        let f = &mut self.f;
        for i in 0..6 {
            f.swap(i, i + 6);
        }
        TC_ACT_REDIRECT
    }

    // --- from_pod -------------------------------------------------------------------------

    fn from_pod(&mut self) -> Done {
        if let Some(d) = self.source_check() {
            return d;
        }
        if self.p.later {
            return self.later_fragment();
        }
        if !(self.p.tcp() || self.p.udp()) {
            self.note("from_pod: not TCP/UDP");
            return (TC_ACT_OK, R::REASON_PASS);
        }
        let fk = FeKey {
            addr: self.p.daddr,
            port: self.p.dport,
            proto: self.p.proto,
        };
        if let Some(fe) = self.st.fe.get(&fk).copied() {
            return self.service_forward(fe);
        }
        if self.p.daddr == self.cfg.hairpin {
            self.note("from_pod: to the hairpin address");
            return self.reply_path();
        }
        self.direct_path()
    }

    /// from_pod 1: the pod's source-address check.
    fn source_check(&mut self) -> Option<Done> {
        match self.st.pod {
            Some(a) if a != 0 && a != self.p.saddr => {
                self.note(format!(
                    "source {} is not the pod's {}",
                    ip(self.p.saddr),
                    ip(a)
                ));
                Some((TC_ACT_SHOT, R::REASON_DROP_SPOOFED))
            }
            _ => None,
        }
    }

    /// from_pod 2 / to_pod 2: a later fragment.
    fn later_fragment(&mut self) -> Done {
        let k = FragKey {
            saddr: self.p.saddr,
            daddr: self.p.daddr,
            id: self.p.id,
            proto: self.p.proto,
        };
        if let Some(fr) = self.st.frag.get(&k).copied() {
            if self.younger_than(fr.first, self.cfg.frag_ns, "fragment memory age") {
                self.note("later fragment: remembered first fragment");
                self.rewrite(fr.nat_saddr, fr.nat_daddr, 0, 0, false);
                return (TC_ACT_OK, R::REASON_NAT_FRAGMENT);
            }
            self.note("later fragment: memory stale");
        }
        if self.st.vip.contains(&self.p.daddr) {
            self.note("later fragment to a VIP");
            return (TC_ACT_SHOT, R::REASON_DROP_FRAG_ORPHAN);
        }
        self.note("later fragment of nothing remembered");
        (TC_ACT_OK, R::REASON_PASS_FRAGMENT)
    }

    /// Service forward: the backend set a pod client uses.
    fn client_set(&self, fe: &Fe) -> (u32, u32) {
        if fe.flags & FE_ITP_LOCAL != 0 && fe.flags & FE_EXTERNAL == 0 {
            (fe.local_id, fe.local_count)
        } else {
            (fe.cluster_id, fe.cluster_count)
        }
    }

    /// from_pod 4: service forward.
    fn service_forward(&mut self, fe: Fe) -> Done {
        let t = self.p.tuple();
        let (set_id, count) = self.client_set(&fe);
        let mut caller = None;
        if let Some(e) = self.st.ct.get(&t).copied().filter(|e| e.ty == CT_FWD) {
            if self.p.syn() && self.ended(&t, &e) {
                self.note("service: SYN on an ended flow");
                self.delete_flow(&t, &e);
                caller = Some(R::REASON_FLOW_REPLACED);
            } else if self.p.udp() && e.gen != fe.gen {
                let usable = (e.set_id == fe.cluster_id || e.set_id == fe.local_id)
                    && self.st.bm.contains(&(e.set_id, e.nat_daddr, e.nat_dport));
                if usable {
                    self.note("service: UDP flow's backend still a member: gen updated");
                    self.st.ct.get_mut(&t).unwrap().gen = fe.gen;
                    return self.service_established(&t, &fe);
                }
                self.note("service: UDP flow's backend left");
                self.delete_flow(&t, &e);
                caller = Some(R::REASON_UDP_REBALANCED);
            } else {
                return self.service_established(&t, &fe);
            }
        }
        if count == 0 {
            if set_id != fe.cluster_id && fe.cluster_count > 0 {
                // internalTrafficPolicy: Local, endpoints elsewhere only: dropped (kube-proxy).
                self.note("service: new flow, no local endpoint (policy Local)");
                return (TC_ACT_SHOT, R::REASON_DROP_NO_LOCAL);
            }
            self.note(format!("service: new flow, set {set_id} has no backends"));
            return self.reject();
        }
        self.new_flow(&t, &fe, set_id, count, caller)
    }

    /// Service forward, "Else established": touch, the flow's rewrite, a half flow repaired.
    fn service_established(&mut self, t: &Tuple, fe: &Fe) -> Done {
        self.touch(t, 0);
        let e = self.st.ct[t];
        let mut reason = R::REASON_NAT_ESTABLISHED;
        if self.flow_view(t, &e).unwrap().half {
            let (rk, rv) = inverse(t, &e);
            if self.insert_new(rk, rv) {
                self.note(format!("half flow: reply leg {rk} re-created"));
                reason = R::REASON_CT_REPAIRED;
            } else {
                self.note(format!("half flow: reply leg key {rk} taken"));
            }
        } else {
            self.note("service: established");
        }
        self.forward_rewrite(&e, fe, reason)
    }

    /// Service forward, "Then:": the service counter, the rewrite, the first fragment's memory,
    /// the hairpin bounce.
    fn forward_rewrite(&mut self, flow: &Ct, fe: &Fe, reason: R) -> Done {
        self.svc = Some(fe.cluster_id);
        self.rewrite_per(flow);
        self.remember_first_fragment();
        if flow.flags & F_HAIRPIN != 0 {
            self.note("hairpin: sent back out");
            return (self.redirect_back(), reason);
        }
        (TC_ACT_OK, reason)
    }

    /// New flow, step 1: the backend. Err(drop) when the slot is missing.
    fn pick_backend(&mut self, fe: &Fe, set_id: u32, count: u32) -> Result<(Be, R), Done> {
        let client = self.p.saddr;
        if fe.flags & FE_AFFINITY != 0 {
            if let Some(a) = self.st.aff.get(&(client, set_id)).copied() {
                let young = self.younger_than(
                    a.last,
                    fe.affinity_timeout as u64 * 1_000_000_000,
                    "affinity age",
                );
                if young && self.st.bm.contains(&(set_id, a.addr, a.port)) {
                    self.st.aff.get_mut(&(client, set_id)).unwrap().last = Stamp::Now;
                    self.note(format!("affinity: {}:{}", ip(a.addr), a.port));
                    return Ok((
                        Be {
                            addr: a.addr,
                            port: a.port,
                            flags: 0,
                            node: 0,
                        },
                        R::REASON_AFFINITY_HIT,
                    ));
                }
            }
        }
        let slot = self.ch.choose(count as usize, "random slot") as u32;
        // Which slots an observer can tell apart (a backend in two slots, or two missing slots,
        // look the same): bit j set when slot j's content is unique among the set's slots.
        let content = |j: u32| self.st.be.get(&(set_id, j)).map(|b| (b.addr, b.port));
        let mut distinct = 0u32;
        for j in 0..count.min(32) {
            if (0..count).filter(|&i| content(i) == content(j)).count() == 1 {
                distinct |= 1 << j;
            }
        }
        self.picks.push(("slots", distinct, count));
        self.picks.push(("slot", slot, count));
        let Some(b) = self.st.be.get(&(set_id, slot)).copied() else {
            self.note(format!("slot {slot} of set {set_id} missing"));
            return Err((TC_ACT_SHOT, R::REASON_DROP_NO_BACKEND));
        };
        self.note(format!("slot {slot}: {}:{}", ip(b.addr), b.port));
        if fe.flags & FE_AFFINITY != 0 {
            self.st.aff.insert(
                (client, set_id),
                Aff {
                    last: Stamp::Now,
                    addr: b.addr,
                    port: b.port,
                },
            );
        }
        Ok((b, R::REASON_NAT_NEW))
    }

    /// Service forward, *New flow* (steps 1-6).
    fn new_flow(&mut self, t: &Tuple, fe: &Fe, set_id: u32, count: u32, caller: Option<R>) -> Done {
        // 1.
        let (b, pick_reason) = match self.pick_backend(fe, set_id, count) {
            Ok(x) => x,
            Err(d) => return d,
        };
        // 2.
        let hairpin = b.addr == t.saddr;
        let mut fwd = Ct::blank(CT_FWD);
        fwd.nat_daddr = b.addr;
        fwd.nat_dport = b.port;
        if hairpin {
            fwd.nat_saddr = self.cfg.hairpin;
            fwd.flags = F_HAIRPIN;
        }
        fwd.set_id = set_id;
        fwd.gen = fe.gen;
        fwd.seen = self.p.bits();
        let (rk, rv) = inverse(t, &fwd);
        // 3.
        let mut replaced = false;
        let mut xlate = false;
        match self.st.ct.get(&rk).copied() {
            Some(x) if x.ty == CT_REV && inverse(&rk, &x).0 == *t => {
                self.note(format!("reply leg {rk}: its own old leg, overwritten"));
                self.st.ct.insert(rk, rv);
            }
            Some(x) => {
                if self.gone(&rk, &x) {
                    self.note(format!("reply tuple {rk} held by a gone flow"));
                    self.delete_flow(&rk, &x);
                    self.st.ct.insert(rk, rv);
                    replaced = true;
                } else {
                    self.note(format!("reply tuple {rk} held by a live entry ({x})"));
                    xlate = true;
                }
            }
            None => {
                self.st.ct.insert(rk, rv);
            }
        }
        // 4.
        if xlate {
            match self.translate(t, &mut fwd) {
                Some(_) => {}
                None => return (TC_ACT_SHOT, R::REASON_DROP_CT_COLLISION),
            }
        }
        // 5. (single-threaded: no FWD can be at t here, so the insert succeeds)
        self.st.ct.insert(*t, fwd);
        // 6.
        let mut reason = pick_reason;
        if let Some(c) = caller {
            reason = c;
        } else if replaced {
            reason = R::REASON_FLOW_REPLACED;
        }
        if xlate {
            reason = R::REASON_NAT_NEW_XLATE;
        }
        if hairpin && reason == R::REASON_NAT_NEW {
            reason = R::REASON_HAIRPIN;
        }
        self.forward_rewrite(&fwd, fe, reason)
    }

    /// *Translate*: a port P in the range whose reply leg inverse(t, fwd with P) is free; the
    /// datapath tries 8 random ports, so it may also fail when some port is taken.
    fn translate(&mut self, t: &Tuple, fwd: &mut Ct) -> Option<u16> {
        let mut free = vec![];
        let (lo, hi) = (self.cfg.xlate_min, self.cfg.xlate_max);
        for port in lo..=hi {
            let mut c = *fwd;
            c.nat_sport = port;
            c.flags |= F_XLATE;
            let (rk, _) = inverse(t, &c);
            if !self.st.ct.contains_key(&rk) {
                free.push(port);
            }
        }
        let range = (hi - lo) as usize + 1;
        let n = free.len() + usize::from(free.len() < range);
        let c = self.ch.choose(n, "translated port");
        self.picks.push(("xlate", free.len() as u32, range as u32));
        if c == free.len() {
            self.picks.push(("collision", 0, 0));
            self.note(format!(
                "translate: no free port found ({} of {range} free)",
                free.len()
            ));
            return None;
        }
        let port = free[c];
        self.picks.push(("port", port as u32, 0));
        fwd.nat_sport = port;
        fwd.flags |= F_XLATE;
        let (rk, rv) = inverse(t, fwd);
        self.st.ct.insert(rk, rv);
        self.note(format!("translated source port {} -> {port}", t.sport));
        Some(port)
    }

    /// Reject: the ICMP port unreachable from the frontend to the client.
    fn reject(&mut self) -> Done {
        let p = self.p;
        let orig = self.f.clone();
        let (n, csum_at) = if p.tcp() { (20, 16) } else { (8, 6) };
        let mut quote = orig[ETH..ETH + p.ihl + n].to_vec();
        let fp = completion_fixed_point(&quote[p.ihl..], csum_at);
        put16(&mut quote, p.ihl + csum_at, fp);
        let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&quote);
        let c = checksum(&icmp);
        put16(&mut icmp, 2, c);
        let mut iph = vec![0x45u8, 0];
        iph.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
        iph.extend_from_slice(&[0, 0, 0, 0, 64, ICMP, 0, 0]);
        iph.extend_from_slice(&p.daddr.to_be_bytes());
        iph.extend_from_slice(&p.saddr.to_be_bytes());
        let c = checksum(&iph);
        put16(&mut iph, 10, c);
        let mut out = Vec::with_capacity(ETH + iph.len() + icmp.len());
        out.extend_from_slice(&orig[6..12]);
        out.extend_from_slice(&orig[0..6]);
        out.extend_from_slice(&orig[12..14]);
        out.extend_from_slice(&iph);
        out.extend_from_slice(&icmp);
        self.f = out;
        self.note("reject: ICMP port unreachable");
        (TC_ACT_REDIRECT, R::REASON_NO_BACKEND)
    }

    /// from_pod 6: the direct path.
    fn direct_path(&mut self) -> Done {
        let t = self.p.tuple();
        let p = self.p;
        // 1. / 2.
        if let Some(e) = self.st.ct.get(&t).copied() {
            if e.ty == CT_FWD && e.flags & F_XLATE != 0 && e.nat_daddr == 0 {
                if p.syn() && self.ended(&t, &e) {
                    self.note("direct: SYN on an ended translated flow");
                    self.delete_flow(&t, &e);
                } else {
                    return self.translated_direct(&t);
                }
            } else if e.ty == CT_FWD {
                if p.tcp() && !p.syn() {
                    self.note("direct: service flow whose frontend is gone");
                    self.touch(&t, 0);
                    self.rewrite_per(&e);
                    return (TC_ACT_OK, R::REASON_NAT_ESTABLISHED);
                }
                self.note("direct: stale service flow");
                self.delete_flow(&t, &e);
                return (TC_ACT_OK, R::REASON_PASS);
            } else {
                self.note(format!("direct: tuple holds {e}"));
                return (TC_ACT_OK, R::REASON_PASS);
            }
        }
        // 3.
        let closing = p.tcp() && p.flags & (FIN | RST) != 0;
        if !(p.syn() || p.udp() || closing) {
            self.note("direct: nothing to track");
            return (TC_ACT_OK, R::REASON_PASS);
        }
        // 4.
        let r = t.swap();
        let mut direct = Ct::blank(CT_DIRECT);
        direct.seen = p.bits();
        match self.st.ct.get(&r).copied() {
            None => {
                if p.syn() || p.udp() {
                    self.insert_new(r, direct);
                    self.note("direct: new");
                    (TC_ACT_OK, R::REASON_DIRECT_NEW)
                } else {
                    self.note("direct: FIN/RST of no tracked flow");
                    (TC_ACT_OK, R::REASON_PASS)
                }
            }
            Some(x) if x.ty == CT_DIRECT => {
                if p.syn() && self.ended(&r, &x) {
                    self.note("direct: SYN on an ended direct flow");
                    self.st.ct.insert(r, direct);
                    (TC_ACT_OK, R::REASON_DIRECT_NEW)
                } else {
                    self.touch(&r, 0);
                    (TC_ACT_OK, R::REASON_DIRECT)
                }
            }
            Some(x) if x.ty == CT_REV && (p.syn() || p.udp()) => {
                if self.gone(&r, &x) {
                    self.note(format!("direct: reply tuple {r} of a gone NATed flow"));
                    self.delete_flow(&r, &x);
                    self.st.ct.insert(r, direct);
                    return (TC_ACT_OK, R::REASON_FLOW_REPLACED);
                }
                self.note(format!("direct: tuple is the live NATed flow's reply {r}"));
                let mut fwd = Ct::blank(CT_FWD);
                fwd.seen = p.bits();
                match self.translate(&t, &mut fwd) {
                    None => (TC_ACT_SHOT, R::REASON_DROP_CT_COLLISION),
                    Some(_) => {
                        self.st.ct.insert(t, fwd);
                        self.rewrite_per(&fwd);
                        (TC_ACT_OK, R::REASON_DIRECT_XLATE_NEW)
                    }
                }
            }
            Some(x) => {
                self.note(format!("direct: reply tuple holds {x}"));
                (TC_ACT_OK, R::REASON_PASS)
            }
        }
    }

    /// Direct path, step 1: a packet of a translated direct flow (touch, repair, rewrite sport).
    fn translated_direct(&mut self, t: &Tuple) -> Done {
        self.touch(t, 0);
        let e = self.st.ct[t];
        let mut reason = R::REASON_XLATE;
        if self.flow_view(t, &e).unwrap().half {
            let (rk, rv) = inverse(t, &e);
            if self.insert_new(rk, rv) {
                self.note(format!("half translated flow: reply leg {rk} re-created"));
                reason = R::REASON_CT_REPAIRED;
            }
        } else {
            self.note("direct: translated flow");
        }
        self.rewrite_per(&e);
        (TC_ACT_OK, reason)
    }

    // --- to_pod ---------------------------------------------------------------------------

    fn to_pod(&mut self) -> Done {
        if self.p.later {
            return self.later_fragment();
        }
        if self.p.proto == ICMP {
            return self.icmp_error();
        }
        if !(self.p.tcp() || self.p.udp()) {
            self.note("to_pod: not TCP/UDP/ICMP");
            return (TC_ACT_OK, R::REASON_PASS);
        }
        self.reply_path()
    }

    /// to_pod 4 (and from_pod 5): the reply path.
    fn reply_path(&mut self) -> Done {
        let t = self.p.tuple();
        match self.st.ct.get(&t).copied() {
            Some(x) if x.ty == CT_DIRECT => {
                self.touch(&t, PEER_SHIFT);
                self.note("reply: direct flow");
                (TC_ACT_OK, R::REASON_DIRECT)
            }
            Some(x) if x.ty == CT_REV => {
                self.touch(&t, 0);
                self.rewrite_per(&x);
                self.remember_first_fragment();
                let reason = if x.nat_saddr != 0 {
                    R::REASON_REV_NAT
                } else {
                    R::REASON_XLATE
                };
                self.note("reply: reverse NAT");
                if x.flags & F_HAIRPIN != 0 {
                    return (self.redirect_back(), reason);
                }
                (TC_ACT_OK, reason)
            }
            other => {
                if let Some(x) = other {
                    self.note(format!("reply: tuple holds {x}"));
                } else {
                    self.note("reply: no entry");
                }
                (TC_ACT_OK, R::REASON_PASS)
            }
        }
    }

    /// to_pod 3: an ICMP error about a NATed flow.
    fn icmp_error(&mut self) -> Done {
        let p = self.p;
        let pass = |m: &mut M, why: &str| {
            m.note(format!("icmp: {why}"));
            (TC_ACT_OK, R::REASON_PASS)
        };
        let l4 = p.l4();
        let end = ETH + p.total;
        if end < l4 + 8 {
            return pass(self, "no room for an ICMP header");
        }
        let ty = self.f[l4];
        if ty != 3 && ty != 11 {
            return pass(self, "not an error");
        }
        let q = l4 + 8;
        let avail = end - q;
        if avail < 20 {
            return pass(self, "quote shorter than an IPv4 header");
        }
        let qv = self.f[q];
        let qihl = (qv & 0xf) as usize * 4;
        let qproto = self.f[q + 9];
        if qv >> 4 != 4 || qihl < 20 || !(qproto == TCP || qproto == UDP) {
            return pass(self, "quote is not IPv4 TCP/UDP");
        }
        if avail < qihl + 4 {
            return pass(self, "quote without ports");
        }
        let qs = get32(&self.f, q + 12);
        let qd = get32(&self.f, q + 16);
        let qp = q + qihl;
        let qsp = get16(&self.f, qp);
        let qdp = get16(&self.f, qp + 2);
        let qt = Tuple {
            saddr: qs,
            sport: qsp,
            daddr: qd,
            dport: qdp,
            proto: qproto,
        };
        let rk = qt.swap();
        let x = match self.st.ct.get(&rk).copied() {
            Some(x) if x.ty == CT_REV && x.flags & F_HAIRPIN == 0 => x,
            Some(x) => return pass(self, &format!("{rk} holds {x}")),
            None => return pass(self, &format!("no REV at {rk}")),
        };
        self.note(format!("icmp: error about the flow of {rk}"));
        let f = &mut self.f;
        let mut icmp_old: Vec<u16> = vec![];
        let mut icmp_new: Vec<u16> = vec![];
        // Quoted addresses: daddr <- nat_saddr.
        let mut ip_old = vec![];
        let mut ip_new = vec![];
        if x.nat_saddr != 0 && x.nat_saddr != qd {
            ip_old.extend(words32(qd));
            ip_new.extend(words32(x.nat_saddr));
            put32(f, q + 16, x.nat_saddr);
        }
        let mut l4_old = ip_old.clone();
        let mut l4_new = ip_new.clone();
        icmp_old.extend(&ip_old);
        icmp_new.extend(&ip_new);
        if !ip_old.is_empty() {
            let c0 = get16(f, q + 10);
            let c1 = csum_update(c0, &ip_old, &ip_new, false);
            put16(f, q + 10, c1);
            icmp_old.push(c0);
            icmp_new.push(c1);
            self.loose.push(q + 10);
        }
        // Quoted ports: sport <- nat_dport, dport <- nat_sport.
        if x.nat_dport != 0 && x.nat_dport != qsp {
            l4_old.push(qsp);
            l4_new.push(x.nat_dport);
            icmp_old.push(qsp);
            icmp_new.push(x.nat_dport);
            put16(f, qp, x.nat_dport);
        }
        if x.nat_sport != 0 && x.nat_sport != qdp {
            l4_old.push(qdp);
            l4_new.push(x.nat_sport);
            icmp_old.push(qdp);
            icmp_new.push(x.nat_sport);
            put16(f, qp + 2, x.nat_sport);
        }
        // The quoted L4 checksum, when quoted.
        if !l4_old.is_empty() {
            let (at, udp) = if qproto == TCP {
                (qp + 16, false)
            } else {
                (qp + 6, true)
            };
            if at + 2 <= end {
                let c0 = get16(f, at);
                if !(udp && c0 == 0) {
                    let c1 = csum_update(c0, &l4_old, &l4_new, udp);
                    put16(f, at, c1);
                    icmp_old.push(c0);
                    icmp_new.push(c1);
                    if !udp {
                        self.loose.push(at);
                    }
                }
            }
        }
        if !icmp_old.is_empty() {
            let c = csum_update(get16(f, l4 + 2), &icmp_old, &icmp_new, false);
            put16(f, l4 + 2, c);
            self.loose.push(l4 + 2);
        }
        // The error's source, when it is the backend itself.
        if p.saddr == qd && x.nat_saddr != 0 && x.nat_saddr != p.saddr {
            let c = csum_update(
                get16(f, ETH + 10),
                &words32(p.saddr),
                &words32(x.nat_saddr),
                false,
            );
            put32(f, ETH + 12, x.nat_saddr);
            put16(f, ETH + 10, c);
            self.loose.push(ETH + 10);
            self.note("icmp: source restored to the frontend");
        }
        (TC_ACT_OK, R::REASON_REV_NAT_ICMP)
    }
}
