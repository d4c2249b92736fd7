//! Conntrack as the operator sees it, and its garbage collection. The datapath only records TCP
//! flags per direction and a last-seen time; states and timeouts are decided here, from both legs
//! of a flow together.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Result;
use libbpf_rs::MapCore;
use serde::Serialize;
use sluice_core::bpf::pod_veth::types;

use super::bpf_maps::{backend_of, dump};
use crate::datapath::Maps;
use crate::pod::as_bytes;

/// How long a flow may stay idle in each state (Calico-like defaults; all configurable).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub syn: Duration,
    pub established: Duration,
    pub fin: Duration,
    pub rst: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            syn: Duration::from_secs(20),
            established: Duration::from_secs(3600),
            fin: Duration::from_secs(30),
            rst: Duration::from_secs(10),
            udp: Duration::from_secs(60),
        }
    }
}

pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

const FIN: u32 = types::tcp_flag_bits::TCPF_FIN.0;
const RST: u32 = types::tcp_flag_bits::TCPF_RST.0;
const ACK: u32 = types::tcp_flag_bits::TCPF_ACK.0;

/// State of a flow from the flags each leg saw (`rev` = 0 when the reply leg is missing).
pub fn state(proto: u8, fwd: u32, rev: u32, t: &Timeouts) -> (&'static str, Duration) {
    if proto == 17 {
        return ("udp", t.udp);
    }
    let both = fwd | rev;
    if both & RST != 0 {
        ("rst", t.rst)
    } else if fwd & FIN != 0 && rev & FIN != 0 {
        ("closed", t.fin)
    } else if both & FIN != 0 {
        ("fin_wait", t.fin)
    } else if rev & ACK != 0 && fwd & ACK != 0 {
        // Both directions acknowledged: the handshake completed (or the flow was picked up
        // mid-stream, e.g. after its entries were purged).
        ("established", t.established)
    } else {
        ("syn_sent", t.syn)
    }
}

/// One NATed flow, both legs.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub protocol: &'static str,
    pub client: String,
    pub frontend: String,
    pub backend: String,
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

/// The reverse key a forward entry implies (see bpf/lib/lb.h lb_new_flow).
pub fn reverse_key(k: &types::ct_key, v: &types::ct_value) -> types::ct_key {
    let hairpin = v.flags.0 & types::ct_flags::CT_F_HAIRPIN.0 != 0;
    types::ct_key {
        saddr: v.nat_daddr,
        daddr: if hairpin { v.nat_saddr } else { k.saddr },
        sport: v.nat_dport,
        dport: k.sport,
        proto: k.proto,
        pad: [0; 3],
    }
}

fn key_tuple(k: &types::ct_key) -> (u32, u32, u16, u16, u8) {
    (k.saddr, k.daddr, k.sport, k.dport, k.proto)
}

/// Every flow in the map (forward legs with their reverse leg; orphaned reverse legs alone).
pub fn flows(maps: &Maps, t: &Timeouts) -> Result<(Vec<Flow>, usize)> {
    let entries = dump::<types::ct_key, types::ct_value>(&maps.conntrack)?;
    let total = entries.len();
    let by_key: HashMap<_, &types::ct_value> =
        entries.iter().map(|(k, v)| (key_tuple(k), v)).collect();
    let now = monotonic_ns();
    let mut out = Vec::new();
    let mut claimed = std::collections::HashSet::new();
    for (k, v) in entries
        .iter()
        .filter(|(_, v)| v.r#type == types::ct_type::CT_TYPE_FWD)
    {
        let rk = reverse_key(k, v);
        let rev = by_key.get(&key_tuple(&rk)).copied();
        if rev.is_some() {
            claimed.insert(key_tuple(&rk));
        }
        let (state, _) = state(
            k.proto,
            v.tcp_flags_seen.0,
            rev.map(|r| r.tcp_flags_seen.0).unwrap_or(0),
            t,
        );
        let last = v.last_seen_ns.max(rev.map(|r| r.last_seen_ns).unwrap_or(0));
        out.push(Flow {
            protocol: if k.proto == 6 { "TCP" } else { "UDP" },
            client: addr(k.saddr, k.sport),
            frontend: addr(k.daddr, k.dport),
            backend: {
                let b = backend_of(v.nat_daddr, v.nat_dport);
                format!("{}:{}", b.ip, b.port)
            },
            state,
            age_secs: now.saturating_sub(v.created_ns) / 1_000_000_000,
            idle_secs: now.saturating_sub(last) / 1_000_000_000,
            svc_id: v.svc_id,
            hairpin: v.flags.0 & types::ct_flags::CT_F_HAIRPIN.0 != 0,
            has_reverse: rev.is_some(),
        });
    }
    for (k, v) in entries.iter().filter(|(k, v)| {
        v.r#type == types::ct_type::CT_TYPE_REV && !claimed.contains(&key_tuple(k))
    }) {
        let (state, _) = state(k.proto, 0, v.tcp_flags_seen.0, t);
        out.push(Flow {
            protocol: if k.proto == 6 { "TCP" } else { "UDP" },
            client: addr(k.daddr, k.dport),
            frontend: addr(v.nat_saddr, v.nat_sport),
            backend: addr(k.saddr, k.sport),
            state,
            age_secs: now.saturating_sub(v.created_ns) / 1_000_000_000,
            idle_secs: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
            svc_id: v.svc_id,
            hairpin: v.flags.0 & types::ct_flags::CT_F_HAIRPIN.0 != 0,
            has_reverse: false,
        });
    }
    Ok((out, total))
}

#[derive(Debug, Default, Clone, Copy)]
pub struct GcStats {
    pub scanned: usize,
    pub expired: usize,
}

/// Deletes flows idle longer than their state allows (both legs), and reverse legs whose forward
/// leg is gone once they too have idled out.
pub fn gc(maps: &Maps, t: &Timeouts) -> Result<GcStats> {
    let entries = dump::<types::ct_key, types::ct_value>(&maps.conntrack)?;
    let by_key: HashMap<_, &types::ct_value> =
        entries.iter().map(|(k, v)| (key_tuple(k), v)).collect();
    let now = monotonic_ns();
    // Each doomed flow: its entries with the last_seen they had when judged.
    let mut doomed: Vec<Vec<(types::ct_key, u64)>> = Vec::new();
    let mut fwd_of_rev = std::collections::HashSet::new();
    for (k, v) in entries
        .iter()
        .filter(|(_, v)| v.r#type == types::ct_type::CT_TYPE_FWD)
    {
        let rk = reverse_key(k, v);
        let rev = by_key.get(&key_tuple(&rk)).copied();
        let (_, timeout) = state(
            k.proto,
            v.tcp_flags_seen.0,
            rev.map(|r| r.tcp_flags_seen.0).unwrap_or(0),
            t,
        );
        let last = v.last_seen_ns.max(rev.map(|r| r.last_seen_ns).unwrap_or(0));
        if rev.is_some() {
            fwd_of_rev.insert(key_tuple(&rk));
        }
        if now.saturating_sub(last) > timeout.as_nanos() as u64 {
            let mut flow = vec![(*k, v.last_seen_ns)];
            if let Some(r) = rev {
                flow.push((rk, r.last_seen_ns));
            }
            doomed.push(flow);
        }
    }
    for (k, v) in entries.iter().filter(|(k, v)| {
        v.r#type == types::ct_type::CT_TYPE_REV && !fwd_of_rev.contains(&key_tuple(k))
    }) {
        let (_, timeout) = state(k.proto, 0, v.tcp_flags_seen.0, t);
        if now.saturating_sub(v.last_seen_ns) > timeout.as_nanos() as u64 {
            doomed.push(vec![(*k, v.last_seen_ns)]);
        }
    }
    // The dump took time: a flow that saw a packet since is alive again; leave it.
    let mut expired = 0;
    for flow in &doomed {
        let touched = flow.iter().any(|(k, seen)| {
            maps.conntrack
                .lookup(as_bytes(k), libbpf_rs::MapFlags::ANY)
                .ok()
                .flatten()
                .is_some_and(|v| {
                    crate::pod::from_bytes::<types::ct_value>(&v).last_seen_ns != *seen
                })
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
    Ok(GcStats {
        scanned: entries.len(),
        expired,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYN: u32 = types::tcp_flag_bits::TCPF_SYN.0;

    #[test]
    fn states_from_both_legs() {
        let t = Timeouts::default();
        assert_eq!(state(6, SYN, 0, &t).0, "syn_sent");
        assert_eq!(
            state(6, SYN | ACK, SYN | ACK, &t),
            ("established", t.established)
        );
        assert_eq!(state(6, SYN | ACK | FIN, SYN | ACK, &t).0, "fin_wait");
        assert_eq!(state(6, SYN | ACK | FIN, SYN | ACK | FIN, &t).0, "closed");
        assert_eq!(state(6, SYN | ACK, RST, &t), ("rst", t.rst));
        assert_eq!(
            state(6, ACK, ACK, &t).0,
            "established",
            "picked up mid-stream"
        );
        assert_eq!(state(17, 0, 0, &t), ("udp", t.udp));
    }
}
