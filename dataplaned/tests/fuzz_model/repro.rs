//! One packet and the whole map state before it, as one line of text: a report's exact
//! reproduction (FUZZ_REPRO=... with the `fuzz_repro` test), independent of the datapath's
//! random choices earlier in the scenario. Timestamps are kept as ages.
//!
//! Format: `;`-separated records, fields separated by spaces, addresses dotted, ages in ns:
//!   prog from_pod|to_pod / frame <hex> / pod <addr>|none / vip <addr>
//!   fe <addr> <port> <proto> <cluster id> <count> <local id> <count> <aff s> <gen> <flags> <kind>
//!   be <set> <slot> <addr> <port> <flags> <node> / bm <set> <addr> <port>
//!   ct <saddr> <sport> <daddr> <dport> <proto> <type> <nat saddr> <nat daddr> <nat sport>
//!      <nat dport> <set> <gen> <tun> <seen> <flags> <created age> <last age>
//!   aff <client> <set> <addr> <port> <age> / frag <saddr> <daddr> <id> <proto> <nat saddr>
//!      <nat daddr> <tun> <flags> <age>

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::model::*;

fn a(x: u32) -> String {
    Ipv4Addr::from(x).to_string()
}

fn age(s: Stamp, now: u64) -> u64 {
    match s {
        Stamp::At(x) => now.saturating_sub(x),
        Stamp::Now => 0,
    }
}

pub fn encode(prog: Prog, frame: &[u8], st: &State, now: u64) -> String {
    let mut r: Vec<String> = vec![];
    r.push(format!(
        "prog {}",
        match prog {
            Prog::FromPod => "from_pod",
            Prog::ToPod => "to_pod",
        }
    ));
    r.push(format!("frame {}", super::net::hex(frame)));
    r.push(format!("pod {}", st.pod.map(a).unwrap_or("none".into())));
    for v in &st.vip {
        r.push(format!("vip {}", a(*v)));
    }
    for (k, v) in &st.fe {
        r.push(format!(
            "fe {} {} {} {} {} {} {} {} {} {} {}",
            a(k.addr),
            k.port,
            k.proto,
            v.cluster_id,
            v.cluster_count,
            v.local_id,
            v.local_count,
            v.affinity_timeout,
            v.gen,
            v.flags,
            v.kind
        ));
    }
    for ((set, slot), b) in &st.be {
        r.push(format!(
            "be {set} {slot} {} {} {} {}",
            a(b.addr),
            b.port,
            b.flags,
            a(b.node)
        ));
    }
    for (set, addr, port) in &st.bm {
        r.push(format!("bm {set} {} {port}", a(*addr)));
    }
    for (k, v) in &st.ct {
        let mut s = String::new();
        let _ = write!(
            s,
            "ct {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {} {}",
            a(k.saddr),
            k.sport,
            a(k.daddr),
            k.dport,
            k.proto,
            v.ty,
            a(v.nat_saddr),
            a(v.nat_daddr),
            v.nat_sport,
            v.nat_dport,
            v.set_id,
            v.gen,
            a(v.tun),
            v.seen,
            v.flags,
            age(v.created, now),
            age(v.last, now)
        );
        r.push(s);
    }
    for ((client, set), v) in &st.aff {
        r.push(format!(
            "aff {} {set} {} {} {}",
            a(*client),
            a(v.addr),
            v.port,
            age(v.last, now)
        ));
    }
    for (k, v) in &st.frag {
        r.push(format!(
            "frag {} {} {} {} {} {} {} {} {}",
            a(k.saddr),
            a(k.daddr),
            k.id,
            k.proto,
            a(v.nat_saddr),
            a(v.nat_daddr),
            a(v.tun),
            v.flags,
            age(v.first, now)
        ));
    }
    r.join(";")
}

/// The program, frame and state (ages made timestamps against `now`).
pub fn decode(s: &str, now: u64) -> (Prog, Vec<u8>, State) {
    let mut st = State::default();
    let mut prog = None;
    let mut frame = None;
    for rec in s.split(';').map(str::trim).filter(|r| !r.is_empty()) {
        let f: Vec<&str> = rec.split_whitespace().collect();
        let ad = |i: usize| -> u32 {
            f[i].parse::<Ipv4Addr>()
                .unwrap_or_else(|e| panic!("{rec}: field {i}: {e}"))
                .into()
        };
        let n = |i: usize| -> u64 {
            f[i].parse()
                .unwrap_or_else(|e| panic!("{rec}: field {i}: {e}"))
        };
        let at = |i: usize| Stamp::At(now - n(i));
        match f[0] {
            "prog" => {
                prog = Some(match f[1] {
                    "from_pod" => Prog::FromPod,
                    "to_pod" => Prog::ToPod,
                    x => panic!("prog {x}"),
                })
            }
            "frame" => {
                frame = Some(
                    (0..f[1].len())
                        .step_by(2)
                        .map(|i| u8::from_str_radix(&f[1][i..i + 2], 16).unwrap())
                        .collect(),
                )
            }
            "pod" => st.pod = if f[1] == "none" { None } else { Some(ad(1)) },
            "vip" => {
                st.vip.insert(ad(1));
            }
            "fe" => {
                st.fe.insert(
                    FeKey {
                        addr: ad(1),
                        port: n(2) as u16,
                        proto: n(3) as u8,
                    },
                    Fe {
                        cluster_id: n(4) as u32,
                        cluster_count: n(5) as u32,
                        local_id: n(6) as u32,
                        local_count: n(7) as u32,
                        affinity_timeout: n(8) as u32,
                        gen: n(9) as u32,
                        flags: n(10) as u32,
                        kind: n(11) as u8,
                    },
                );
            }
            "be" => {
                st.be.insert(
                    (n(1) as u32, n(2) as u32),
                    Be {
                        addr: ad(3),
                        port: n(4) as u16,
                        flags: n(5) as u16,
                        node: ad(6),
                    },
                );
            }
            "bm" => {
                st.bm.insert((n(1) as u32, ad(2), n(3) as u16));
            }
            "ct" => {
                st.ct.insert(
                    Tuple {
                        saddr: ad(1),
                        sport: n(2) as u16,
                        daddr: ad(3),
                        dport: n(4) as u16,
                        proto: n(5) as u8,
                    },
                    Ct {
                        ty: n(6) as u8,
                        nat_saddr: ad(7),
                        nat_daddr: ad(8),
                        nat_sport: n(9) as u16,
                        nat_dport: n(10) as u16,
                        set_id: n(11) as u32,
                        gen: n(12) as u32,
                        tun: ad(13),
                        seen: n(14) as u32,
                        flags: n(15) as u8,
                        created: at(16),
                        last: at(17),
                    },
                );
            }
            "aff" => {
                st.aff.insert(
                    (ad(1), n(2) as u32),
                    Aff {
                        addr: ad(3),
                        port: n(4) as u16,
                        last: at(5),
                    },
                );
            }
            "frag" => {
                st.frag.insert(
                    FragKey {
                        saddr: ad(1),
                        daddr: ad(2),
                        id: n(3) as u16,
                        proto: n(4) as u8,
                    },
                    Frag {
                        nat_saddr: ad(5),
                        nat_daddr: ad(6),
                        tun: ad(7),
                        flags: n(8) as u32,
                        first: at(9),
                    },
                );
            }
            x => panic!("unknown record {x:?} in {rec:?}"),
        }
    }
    (
        prog.expect("no prog record"),
        frame.expect("no frame record"),
        st,
    )
}
