//! Conntrack as the operator sees it, and its garbage collection. The datapath records TCP flags
//! per direction and a last-seen time; states and timeouts are decided from both directions of a
//! flow together, by the same rules in both places (bpf/lib/conntrack.h `ct_timeout`, here
//! [`state`]): the datapath uses them to decide whether a flow holding a tuple is over, the GC to
//! expire it.
//!
//! Entries: a NATed flow (or a pod's port-translated direct flow) has a forward and a reply leg,
//! each derivable from the other ([`inverse`], bpf `ct_inverse`): the GC re-creates a live flow's
//! missing leg. A pod's untranslated direct flow has one DIRECT entry.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use libbpf_rs::{MapCore, MapFlags};
use serde::Serialize;
use sluice_core::bpf::pod_veth::types;

use super::bpf_maps::dump;
use crate::datapath::Maps;
use crate::pod::{as_bytes, from_bytes};

/// How long a flow may stay idle in each state (kube-proxy's kernel settings for TCP, the
/// kernel's own for UDP; all configurable with `sluiced --ct-timeout-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP: SYN sent, no reply yet.
    pub syn: Duration,
    /// TCP: both directions acknowledged.
    pub established: Duration,
    /// TCP: FIN from one side (half-closed: the other may still send).
    pub fin: Duration,
    /// TCP: FIN from both sides.
    pub closed: Duration,
    /// TCP: RST seen.
    pub rst: Duration,
    /// UDP (and anything else): one direction only.
    pub udp: Duration,
    /// UDP: both directions.
    pub udp_stream: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            syn: Duration::from_secs(60),
            established: Duration::from_secs(86400),
            fin: Duration::from_secs(3600),
            closed: Duration::from_secs(10),
            rst: Duration::from_secs(10),
            udp: Duration::from_secs(30),
            udp_stream: Duration::from_secs(120),
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

pub const FIN: u32 = types::tcp_flag_bits::TCPF_FIN.0;
pub const SYN: u32 = types::tcp_flag_bits::TCPF_SYN.0;
pub const RST: u32 = types::tcp_flag_bits::TCPF_RST.0;
pub const ACK: u32 = types::tcp_flag_bits::TCPF_ACK.0;
pub const SEEN: u32 = types::tcp_flag_bits::CT_SEEN_PKT.0;
/// A DIRECT entry keeps the peer's flags above the pod's (bpf/consts.h CT_SEEN_PEER_SHIFT).
pub const PEER_SHIFT: u32 = 8;

const FWD: u8 = types::ct_type::CT_TYPE_FWD.0;
const REV: u8 = types::ct_type::CT_TYPE_REV.0;
const DIRECT: u8 = types::ct_type::CT_TYPE_DIRECT.0;
const HAIRPIN: u8 = types::ct_flags::CT_F_HAIRPIN.0;
const XLATE: u8 = types::ct_flags::CT_F_XLATE.0;

/// State of a flow from what each direction saw (`a`: the client's, `b`: the reply's; 0 when
/// that leg is missing) and its idle timeout. Mirrors bpf/lib/conntrack.h ct_timeout().
pub fn state(proto: u8, a: u32, b: u32, t: &Timeouts) -> (&'static str, Duration) {
    if proto != 6 {
        return if a & SEEN != 0 && b & SEEN != 0 {
            ("udp_replied", t.udp_stream)
        } else {
            ("udp", t.udp)
        };
    }
    let both = a | b;
    if both & RST != 0 {
        ("rst", t.rst)
    } else if a & FIN != 0 && b & FIN != 0 {
        ("closed", t.closed)
    } else if both & FIN != 0 {
        ("fin_wait", t.fin)
    } else if a & ACK != 0 && b & ACK != 0 {
        // Both directions acknowledged: the handshake completed (or the flow was picked up
        // mid-stream).
        ("established", t.established)
    } else {
        ("syn_sent", t.syn)
    }
}

/// The other leg of a NATed flow (bpf/lib/conntrack.h ct_inverse): its key and value. Timestamps
/// and flags seen are left 0.
pub fn inverse(k: &types::ct_key, v: &types::ct_value) -> (types::ct_key, types::ct_value) {
    let pick = |nat: u32, orig: u32| if nat != 0 { nat } else { orig };
    let pick16 = |nat: u16, orig: u16| if nat != 0 { nat } else { orig };
    let ok = types::ct_key {
        saddr: pick(v.nat_daddr, k.daddr),
        daddr: pick(v.nat_saddr, k.saddr),
        sport: pick16(v.nat_dport, k.dport),
        dport: pick16(v.nat_sport, k.sport),
        proto: k.proto,
        pad: [0; 3],
    };
    let ov = types::ct_value {
        nat_saddr: if v.nat_daddr != 0 { k.daddr } else { 0 },
        nat_daddr: if v.nat_saddr != 0 { k.saddr } else { 0 },
        nat_sport: if v.nat_dport != 0 { k.dport } else { 0 },
        nat_dport: if v.nat_sport != 0 { k.sport } else { 0 },
        set_id: v.set_id,
        gen: v.gen,
        tun_addr: v.tun_addr,
        r#type: types::ct_type(if v.r#type.0 == FWD { REV } else { FWD }),
        flags: v.flags,
        ..Default::default()
    };
    (ok, ov)
}

/// One flow as listed.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub protocol: &'static str,
    /// "nat" (a service flow), "translated" (a pod's direct flow with a translated source port),
    /// "direct" (tracked, not rewritten).
    pub kind: &'static str,
    pub client: String,
    pub frontend: String,
    pub backend: String,
    /// The client port the backend sees, when translated.
    pub translated_port: Option<u16>,
    pub state: &'static str,
    pub age_secs: u64,
    pub idle_secs: u64,
    pub svc_id: u32,
    pub hairpin: bool,
    pub has_reverse: bool,
}

fn addr(ip_be: u32, port_be: u16) -> String {
    format!(
        "{}:{}",
        Ipv4Addr::from(u32::from_be(ip_be)),
        u16::from_be(port_be)
    )
}

type Tuple = (u32, u32, u16, u16, u8);

fn tuple(k: &types::ct_key) -> Tuple {
    (k.saddr, k.daddr, k.sport, k.dport, k.proto)
}

fn proto_name(p: u8) -> &'static str {
    match p {
        6 => "TCP",
        17 => "UDP",
        _ => "other",
    }
}

/// Both legs of a NATed flow found in one dump: forward (key, value), reply (key, value).
struct Pair<'a> {
    fwd: Option<(&'a types::ct_key, &'a types::ct_value)>,
    rev: Option<(&'a types::ct_key, &'a types::ct_value)>,
}

impl Pair<'_> {
    fn seen(&self) -> (u32, u32) {
        (
            self.fwd.map(|(_, v)| v.seen.0).unwrap_or(0),
            self.rev.map(|(_, v)| v.seen.0).unwrap_or(0),
        )
    }
    fn last_seen(&self) -> u64 {
        self.fwd
            .map(|(_, v)| v.last_seen_ns)
            .max(self.rev.map(|(_, v)| v.last_seen_ns))
            .unwrap_or(0)
    }
    fn created(&self) -> u64 {
        self.fwd
            .or(self.rev)
            .map(|(_, v)| v.created_ns)
            .unwrap_or(0)
    }
}

/// Groups a dump into flows: NATed pairs (or half pairs) and DIRECT entries.
fn group(
    entries: &[(types::ct_key, types::ct_value)],
) -> (Vec<Pair<'_>>, Vec<&(types::ct_key, types::ct_value)>) {
    let by_key: HashMap<Tuple, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (tuple(k), i))
        .collect();
    let mut claimed = HashSet::new();
    let mut pairs = Vec::new();
    let mut direct = Vec::new();
    for (i, (k, v)) in entries.iter().enumerate() {
        match v.r#type.0 {
            FWD => {
                let (rk, _) = inverse(k, v);
                let rev = by_key
                    .get(&tuple(&rk))
                    .map(|&j| &entries[j])
                    .filter(|(_, rv)| rv.r#type.0 == REV);
                if rev.is_some() {
                    claimed.insert(tuple(&rk));
                }
                pairs.push(Pair {
                    fwd: Some((k, v)),
                    rev: rev.map(|(rk, rv)| (rk, rv)),
                });
            }
            DIRECT => direct.push(&entries[i]),
            _ => {}
        }
    }
    for (k, v) in entries {
        if v.r#type.0 == REV && !claimed.contains(&tuple(k)) {
            pairs.push(Pair {
                fwd: None,
                rev: Some((k, v)),
            });
        }
    }
    (pairs, direct)
}

/// Every flow in the map, and the number of entries.
pub fn flows(maps: &Maps, t: &Timeouts) -> Result<(Vec<Flow>, usize)> {
    let entries = dump::<types::ct_key, types::ct_value>(&maps.conntrack)?;
    let (pairs, direct) = group(&entries);
    let now = monotonic_ns();
    let secs = |ns: u64| now.saturating_sub(ns) / 1_000_000_000;
    let mut out = Vec::new();
    for p in &pairs {
        // The forward leg as the client sent it, from whichever leg exists.
        let (fk, fv) = match (p.fwd, p.rev) {
            (Some((k, v)), _) => (*k, *v),
            (None, Some((k, v))) => inverse(k, v),
            (None, None) => continue,
        };
        let (a, b) = p.seen();
        let xlated = fv.flags.0 & XLATE != 0;
        let nat = fv.nat_daddr != 0;
        out.push(Flow {
            protocol: proto_name(fk.proto),
            kind: if nat { "nat" } else { "translated" },
            client: addr(fk.saddr, fk.sport),
            frontend: if nat {
                addr(fk.daddr, fk.dport)
            } else {
                String::new()
            },
            backend: addr(
                if nat { fv.nat_daddr } else { fk.daddr },
                if nat { fv.nat_dport } else { fk.dport },
            ),
            translated_port: xlated.then(|| u16::from_be(fv.nat_sport)),
            state: state(fk.proto, a, b, t).0,
            age_secs: secs(p.created()),
            idle_secs: secs(p.last_seen()),
            svc_id: fv.set_id,
            hairpin: fv.flags.0 & HAIRPIN != 0,
            has_reverse: p.fwd.is_some() && p.rev.is_some(),
        });
    }
    for (k, v) in direct {
        let (a, b) = (v.seen.0 & 0xff, v.seen.0 >> PEER_SHIFT);
        out.push(Flow {
            protocol: proto_name(k.proto),
            kind: "direct",
            client: addr(k.daddr, k.dport),
            frontend: String::new(),
            backend: addr(k.saddr, k.sport),
            translated_port: None,
            state: state(k.proto, a, b, t).0,
            age_secs: secs(v.created_ns),
            idle_secs: secs(v.last_seen_ns),
            svc_id: 0,
            hairpin: false,
            has_reverse: true,
        });
    }
    Ok((out, entries.len()))
}

#[derive(Debug, Default, Clone, Copy)]
pub struct GcStats {
    pub scanned: usize,
    pub expired: usize,
    /// Missing legs of live flows re-created.
    pub repaired: usize,
}

/// Conntrack pressure as the operator sees it.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Occupancy {
    pub entries: u64,
    pub capacity: u64,
    /// Entries the table lost to LRU eviction (created - deleted - present), estimated.
    pub evictions: u64,
    pub created: u64,
    pub deleted: u64,
}

fn add_event(maps: &Maps, ev: u32, n: u64) {
    if n == 0 {
        return;
    }
    let Ok(Some(mut per_cpu)) = maps.ct_events.lookup_percpu(as_bytes(&ev), MapFlags::ANY) else {
        return;
    };
    if let Some(first) = per_cpu.first_mut() {
        let mut c: types::counter = from_bytes(first);
        c.packets += n;
        *first = as_bytes(&c).to_vec();
    }
    let _ = maps
        .ct_events
        .update_percpu(as_bytes(&ev), &per_cpu, MapFlags::ANY);
}

fn event(maps: &Maps, ev: types::ct_event) -> u64 {
    crate::datapath::Datapath::counter(&maps.ct_events, ev.0).packets
}

/// Entries, capacity and evictions (from the datapath's and the GC's counts).
pub fn occupancy(maps: &Maps, entries: u64) -> Occupancy {
    use types::ct_event as E;
    let created = event(maps, E::CT_EV_CREATED) + event(maps, E::CT_EV_GC_CREATED);
    let deleted = event(maps, E::CT_EV_DELETED) + event(maps, E::CT_EV_GC_DELETED);
    Occupancy {
        entries,
        capacity: maps.conntrack_size as u64,
        evictions: created.saturating_sub(deleted).saturating_sub(entries),
        created,
        deleted,
    }
}

/// Deletes flows idle longer than their state allows (both legs together), and re-creates the
/// missing leg of a live half flow (LRU evicted it, or a crash left it).
pub fn gc(maps: &Maps, t: &Timeouts) -> Result<GcStats> {
    let entries = dump::<types::ct_key, types::ct_value>(&maps.conntrack)?;
    let (pairs, direct) = group(&entries);
    let now = monotonic_ns();
    let idle = |last: u64| Duration::from_nanos(now.saturating_sub(last));
    // Each doomed flow: its entries with the last_seen they had when judged.
    let mut doomed: Vec<Vec<(types::ct_key, u64)>> = Vec::new();
    let mut repairs: Vec<(types::ct_key, types::ct_value)> = Vec::new();
    for p in &pairs {
        let (a, b) = p.seen();
        let proto = p.fwd.or(p.rev).map(|(k, _)| k.proto).unwrap_or(0);
        let (_, timeout) = state(proto, a, b, t);
        if idle(p.last_seen()) > timeout {
            doomed.push(
                [p.fwd, p.rev]
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (*k, v.last_seen_ns))
                    .collect(),
            );
        } else if let (Some((k, v)), None) | (None, Some((k, v))) = (p.fwd, p.rev) {
            let (ok, mut ov) = inverse(k, v);
            ov.created_ns = v.created_ns;
            ov.last_seen_ns = v.last_seen_ns;
            repairs.push((ok, ov));
        }
    }
    for (k, v) in direct {
        let (_, timeout) = state(k.proto, v.seen.0 & 0xff, v.seen.0 >> PEER_SHIFT, t);
        if idle(v.last_seen_ns) > timeout {
            doomed.push(vec![(*k, v.last_seen_ns)]);
        }
    }
    // The dump took time: a flow that saw a packet since is alive again; leave it.
    let mut expired = 0;
    for flow in &doomed {
        let touched = flow.iter().any(|(k, seen)| {
            maps.conntrack
                .lookup(as_bytes(k), MapFlags::ANY)
                .ok()
                .flatten()
                .is_some_and(|v| from_bytes::<types::ct_value>(&v).last_seen_ns != *seen)
        });
        if touched {
            continue;
        }
        for (k, _) in flow {
            if maps.conntrack.delete(as_bytes(k)).is_ok() {
                expired += 1;
            }
        }
    }
    let mut repaired = 0;
    for (k, v) in &repairs {
        // NO_EXIST: the datapath may have re-created it meanwhile.
        if maps
            .conntrack
            .update(as_bytes(k), as_bytes(v), MapFlags::NO_EXIST)
            .is_ok()
        {
            repaired += 1;
        }
    }
    add_event(maps, types::ct_event::CT_EV_GC_DELETED.0, expired as u64);
    add_event(maps, types::ct_event::CT_EV_GC_CREATED.0, repaired as u64);
    Ok(GcStats {
        scanned: entries.len(),
        expired,
        repaired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_from_both_directions() {
        let t = Timeouts::default();
        assert_eq!(state(6, SYN | SEEN, 0, &t), ("syn_sent", t.syn));
        assert_eq!(
            state(6, SYN | ACK, SYN | ACK, &t),
            ("established", t.established)
        );
        assert_eq!(
            state(6, SYN | ACK | FIN, SYN | ACK, &t),
            ("fin_wait", t.fin)
        );
        assert_eq!(
            state(6, SYN | ACK | FIN, SYN | ACK | FIN, &t),
            ("closed", t.closed)
        );
        assert_eq!(state(6, SYN | ACK, RST, &t), ("rst", t.rst));
        assert_eq!(
            state(6, ACK, ACK, &t).0,
            "established",
            "picked up mid-stream"
        );
        assert_eq!(state(17, SEEN, 0, &t), ("udp", t.udp));
        assert_eq!(state(17, SEEN, SEEN, &t), ("udp_replied", t.udp_stream));
    }

    fn key(s: &str, sp: u16, d: &str, dp: u16) -> types::ct_key {
        types::ct_key {
            saddr: u32::from(s.parse::<Ipv4Addr>().unwrap()).to_be(),
            daddr: u32::from(d.parse::<Ipv4Addr>().unwrap()).to_be(),
            sport: sp.to_be(),
            dport: dp.to_be(),
            proto: 6,
            pad: [0; 3],
        }
    }

    #[test]
    fn inverse_of_inverse_is_the_same_leg() {
        let fk = key("10.0.1.5", 40000, "10.96.0.10", 80);
        let fv = types::ct_value {
            nat_daddr: key("10.0.2.7", 0, "0.0.0.0", 0).saddr,
            nat_dport: 8080u16.to_be(),
            nat_sport: 20001u16.to_be(),
            r#type: types::ct_type(FWD),
            flags: types::ct_flags(XLATE),
            ..Default::default()
        };
        let (rk, rv) = inverse(&fk, &fv);
        assert_eq!(tuple(&rk), tuple(&key("10.0.2.7", 8080, "10.0.1.5", 20001)));
        assert_eq!(rv.nat_saddr, fk.daddr);
        assert_eq!(u16::from_be(rv.nat_sport), 80);
        assert_eq!(u16::from_be(rv.nat_dport), 40000);
        assert_eq!(rv.r#type.0, REV);
        let (fk2, fv2) = inverse(&rk, &rv);
        assert_eq!(tuple(&fk2), tuple(&fk));
        assert_eq!(
            (fv2.nat_daddr, fv2.nat_dport, fv2.nat_sport, fv2.nat_saddr),
            (fv.nat_daddr, fv.nat_dport, fv.nat_sport, 0)
        );
    }
}
