//! BPF_PROG_TEST_RUN tests of bpf/pod_veth.bpf.c (issue 3), table-driven: each case is a packet
//! built with etherparse, a map set-up, and the expected verdict, exact output bytes, reason, and
//! map state (conntrack, affinity, reason / service / pod counters). Every rewritten packet's
//! checksums are also verified on their own by parsing it with etherparse.
//!
//! `from_pod` runs on TC ingress of a pod's host-side veth (packets the pod sends); `to_pod` on
//! TC egress (packets to the pod). Each case loads its own skeleton, so its maps start empty.
//!
//! Needs root. `cargo test -p sluice-dataplaned --test bpf_prog -- --nocapture` also prints the
//! ns/packet figures of `prog_test_run_timing`.

mod bpf_common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::RwLock;
use std::time::Duration;

use bpf_common::*;
use types::reason as R;

/// The timing test runs alone (write lock); everything else shares (read lock).
static EXCLUSIVE: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The cluster the cases live in.

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 5);
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 0, 1, 6);
const OTHER: Ipv4Addr = Ipv4Addr::new(10, 0, 9, 9);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VPORT: u16 = 80;
const DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const SVC2: u32 = 3;
const FE2: (Ipv4Addr, u16) = (VIP2, VPORT);
const DNS_PORT: u16 = 53;
const CPORT: u16 = 40000;
const BE_A: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 2, 7), 8080);
const BE_B: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 3, 8), 8080);
const BE_DNS: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 0, 2, 9), 5353);
const SVC: u32 = 1;
const DNS_SVC: u32 = 2;
// Short enough that "older than the timeout" fits in a freshly booted CI machine's uptime.
const AFF_TIMEOUT: u32 = 100;
const AFF: u32 = types::frontend_flags::FE_F_AFFINITY.0;

const C: (Ipv4Addr, u16) = (CLIENT, CPORT);
const FE: (Ipv4Addr, u16) = (VIP, VPORT);
const DNS_FE: (Ipv4Addr, u16) = (DNS_VIP, DNS_PORT);

// ---------------------------------------------------------------------------------------------
// The table's vocabulary.

/// Map set-up, applied in order before the case's first step or before one step.
#[derive(Clone, Debug)]
enum Setup {
    Frontend {
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        svc: u32,
        count: u32,
        flags: u32,
        timeout: u32,
    },
    Marker(Ipv4Addr),
    Backend {
        svc: u32,
        slot: u32,
        addr: (Ipv4Addr, u16),
    },
    DelBackend {
        svc: u32,
        slot: u32,
    },
    Affinity {
        client: Ipv4Addr,
        svc: u32,
        backend: (Ipv4Addr, u16),
        age: Age,
    },
    /// The per-pod counter entry the daemon creates on attach (no source check).
    Pod,
    /// The per-pod entry with the pod's address: other sources are dropped.
    PodAddr(Ipv4Addr),
    /// A backend's membership of a set, added or removed.
    Member {
        svc: u32,
        addr: (Ipv4Addr, u16),
        present: bool,
    },
    /// A frontend's generation (bumped by the writer when a backend leaves).
    Gen {
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        gen: u32,
    },
    /// Move a conntrack entry's timestamps into the past.
    AgeCt(Tuple, Age),
    /// Write a conntrack entry (last seen `age` ago).
    PutCt(Ct, Age),
    /// Delete a conntrack entry (as LRU eviction would).
    DelCt(Tuple),
    /// Delete a frontend (its Service was deleted).
    DelFrontend(Ipv4Addr, u16, u8),
}

fn fe(vip: Ipv4Addr, port: u16, proto: u8, svc: u32, count: u32) -> Setup {
    Setup::Frontend {
        vip,
        port,
        proto,
        svc,
        count,
        flags: 0,
        timeout: 0,
    }
}
fn be(svc: u32, slot: u32, addr: (Ipv4Addr, u16)) -> Setup {
    Setup::Backend { svc, slot, addr }
}
/// The web service VIP:80/TCP with `count` ready backends, slot 0 = A.
fn web(count: u32) -> Vec<Setup> {
    let mut s = vec![fe(VIP, VPORT, TCP, SVC, count)];
    if count > 0 {
        s.push(be(SVC, 0, BE_A));
    }
    s
}
/// The DNS service VIP:53/UDP with one backend.
fn dns() -> Vec<Setup> {
    vec![
        fe(DNS_VIP, DNS_PORT, UDP, DNS_SVC, 1),
        be(DNS_SVC, 0, BE_DNS),
    ]
}

#[derive(Clone, Debug)]
enum Out {
    /// The program left the frame as it was.
    Same,
    /// Exactly these bytes (checksums also verified independently).
    Bytes(Vec<u8>),
}

#[derive(Clone, Debug)]
struct Step {
    note: &'static str,
    before: Vec<Setup>,
    prog: Prog,
    input: Vec<u8>,
    verdict: u32,
    reason: R,
    out: Out,
    /// The service whose counter this packet advances.
    svc: Option<u32>,
}

impl Step {
    fn new(note: &'static str, prog: Prog, input: Vec<u8>) -> Step {
        Step {
            note,
            before: vec![],
            prog,
            input,
            verdict: TC_ACT_OK,
            reason: R::REASON_PASS,
            out: Out::Same,
            svc: None,
        }
    }
    /// Rewritten and passed on.
    fn nat(mut self, out: &Pkt, reason: R) -> Step {
        self.out = Out::Bytes(out.bytes());
        self.reason = reason;
        self
    }
    /// Rewritten into exactly these bytes and passed on.
    fn nat_bytes(mut self, out: Vec<u8>, reason: R) -> Step {
        self.out = Out::Bytes(out);
        self.reason = reason;
        self
    }
    /// Rewritten and bounced back out of the veth towards the pod.
    fn redirect(mut self, out: Vec<u8>, reason: R) -> Step {
        self.out = Out::Bytes(out);
        self.verdict = TC_ACT_REDIRECT;
        self.reason = reason;
        self
    }
    /// Passed untouched.
    fn pass(mut self, reason: R) -> Step {
        self.reason = reason;
        self
    }
    /// Dropped, untouched.
    fn drop(mut self, reason: R) -> Step {
        self.verdict = TC_ACT_SHOT;
        self.reason = reason;
        self
    }
    fn svc(mut self, svc: u32) -> Step {
        self.svc = Some(svc);
        self
    }
    fn before(mut self, s: Vec<Setup>) -> Step {
        self.before = s;
        self
    }
}

fn from_pod(note: &'static str, p: &Pkt) -> Step {
    Step::new(note, Prog::FromPod, p.bytes())
}
fn to_pod(note: &'static str, p: &Pkt) -> Step {
    Step::new(note, Prog::ToPod, p.clone().towards_pod().bytes())
}
fn from_pod_raw(note: &'static str, b: Vec<u8>) -> Step {
    Step::new(note, Prog::FromPod, b)
}
fn to_pod_raw(note: &'static str, b: Vec<u8>) -> Step {
    Step::new(note, Prog::ToPod, b)
}

/// The map state after the last step. Reason counters are checked step by step (each step
/// advances exactly its reason by one packet of its input length), pod counters too.
#[derive(Clone, Debug, Default)]
struct Expect {
    /// The whole conntrack table.
    ct: Vec<Ct>,
    /// The whole affinity table.
    aff: Vec<Aff>,
    /// Service counters (services not listed must be zero).
    svc: Vec<(u32, Count)>,
    /// The pod's counters; None = no entry (and none created).
    pod: Option<PodCount>,
    /// Literal reason counter totals, when a case wants them spelt out.
    reasons: Option<Vec<(R, Count)>>,
}

#[derive(Clone, Debug)]
struct Case {
    name: &'static str,
    /// A non-default hairpin_addr in .rodata.
    hairpin: Option<Ipv4Addr>,
    setup: Vec<Setup>,
    steps: Vec<Step>,
    expect: Expect,
}

fn case(name: &'static str, setup: Vec<Setup>, steps: Vec<Step>, expect: Expect) -> Case {
    Case {
        name,
        hairpin: None,
        setup,
        steps,
        expect,
    }
}

fn len(p: &Pkt) -> u64 {
    p.bytes().len() as u64
}
fn count(packets: u64, bytes: u64) -> Count {
    Count { packets, bytes }
}
fn tx(pkts: &[&Pkt]) -> PodCount {
    PodCount {
        tx_packets: pkts.len() as u64,
        tx_bytes: pkts.iter().map(|p| len(p)).sum(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The runner.

/// Timestamps written by the set-up, to tell them from the program's writes.
#[derive(Default)]
struct Written {
    ct: BTreeMap<Tuple, (u64, u64)>,
    aff: BTreeMap<(Ipv4Addr, u32), u64>,
}

fn apply(dp: &Dp, setups: &[Setup], w: &mut Written) {
    for s in setups {
        match s.clone() {
            Setup::Frontend {
                vip,
                port,
                proto,
                svc,
                count,
                flags,
                timeout,
            } => dp.frontend(vip, port, proto, svc, count, flags, timeout),
            Setup::Marker(vip) => dp.vip_marker(vip),
            Setup::Backend { svc, slot, addr } => dp.backend(svc, slot, addr.0, addr.1),
            Setup::DelBackend { svc, slot } => dp.del_backend(svc, slot),
            Setup::Affinity {
                client,
                svc,
                backend,
                age,
            } => {
                let ns = match age {
                    Age::Fresh => mono_ns(),
                    Age::Secs(s) => mono_ns()
                        .checked_sub(s * 1_000_000_000)
                        .expect("machine up for less than the entry's age"),
                };
                dp.affinity(client, svc, backend, ns);
                w.aff.insert((client, svc), ns);
            }
            Setup::Pod => dp.pod_entry(POD_IFINDEX, Ipv4Addr::UNSPECIFIED),
            Setup::PodAddr(a) => dp.pod_entry(POD_IFINDEX, a),
            Setup::Member { svc, addr, present } => dp.member(svc, addr.0, addr.1, present),
            Setup::Gen {
                vip,
                port,
                proto,
                gen,
            } => {
                let mut v = dp.frontend_get(vip, port, proto);
                v.gen = gen;
                dp.frontend_value(vip, port, proto, v);
            }
            Setup::AgeCt(t, age) => {
                let ts = dp.age_ct(t, age);
                w.ct.insert(t, ts);
            }
            Setup::PutCt(ct, age) => {
                let ts = dp.ct_put(&ct, age);
                w.ct.insert(ct.key, ts);
            }
            Setup::DelCt(t) => dp.ct_del(t),
            Setup::DelFrontend(vip, port, proto) => dp.del_frontend(vip, port, proto),
        }
    }
}

/// Service ids whose counters every step checks (all the cases use ids below this).
const SVC_IDS: u32 = 8;

fn run_case(c: &Case) {
    let dp = Dp::load_with(c.hairpin);
    let mut written = Written::default();
    let t0 = mono_coarse_ns();
    apply(&dp, &c.setup, &mut written);
    let mut totals = vec![Count::default(); types::reason::REASON_MAX.0 as usize];

    for (i, st) in c.steps.iter().enumerate() {
        let what = format!("{} step {} ({})", c.name, i + 1, st.note);
        apply(&dp, &st.before, &mut written);
        let reasons0 = dp.reasons();
        let svc0: Vec<Count> = (0..SVC_IDS).map(|s| dp.svc_counter(s)).collect();
        let pod0 = dp.pod_counts(POD_IFINDEX);

        let r = dp.run(st.prog, &st.input, 1);

        let reasons1 = dp.reasons();
        let changed: Vec<String> = (0..reasons1.len())
            .filter(|&j| reasons1[j] != reasons0[j])
            .map(|j| {
                format!(
                    "{} +{}",
                    reason_name(j as u32),
                    reasons1[j].packets - reasons0[j].packets
                )
            })
            .collect();
        let want = st.reason.0 as usize;
        assert_eq!(
            changed,
            vec![format!("{} +1", reason_name(want as u32))],
            "{what}: reason counters that moved"
        );
        assert_eq!(
            reasons1[want].bytes - reasons0[want].bytes,
            st.input.len() as u64,
            "{what}: reason counter bytes"
        );
        totals[want].packets += 1;
        totals[want].bytes += st.input.len() as u64;

        assert_eq!(
            r.verdict,
            st.verdict,
            "{what}: verdict (reason {})",
            reason_name(want as u32)
        );
        match &st.out {
            Out::Same => assert_eq!(
                hex(&r.out),
                hex(&st.input),
                "{what}: frame must be untouched"
            ),
            Out::Bytes(b) => {
                assert_eq!(
                    hex(&r.out),
                    hex(b),
                    "{what}: output bytes (got above, want below)"
                );
                verify_checksums(&r.out, &what);
            }
        }

        for s in 0..SVC_IDS {
            let got = dp.svc_counter(s);
            let mut want = svc0[s as usize];
            if st.svc == Some(s) {
                want.packets += 1;
                want.bytes += st.input.len() as u64;
            }
            assert_eq!(got, want, "{what}: counter of service {s}");
        }

        let pod1 = dp.pod_counts(POD_IFINDEX);
        let want_pod = pod0.map(|mut p| {
            match st.prog {
                Prog::FromPod => {
                    p.tx_packets += 1;
                    p.tx_bytes += st.input.len() as u64;
                }
                Prog::ToPod => {
                    p.rx_packets += 1;
                    p.rx_bytes += st.input.len() as u64;
                }
            }
            p
        });
        assert_eq!(pod1, want_pod, "{what}: pod counters");
    }
    let t1 = mono_ns();
    let what = format!("{} (final state)", c.name);

    // Conntrack: the exact set of entries, then their timestamps.
    let got = dp.ct_raw();
    let got_cts: Vec<Ct> = got.values().map(|(_, ct)| ct.clone()).collect();
    let mut want_cts: Vec<Ct> = c
        .expect
        .ct
        .iter()
        .map(|ct| ct.clone().ts(Ts::New))
        .collect();
    want_cts.sort();
    assert_eq!(got_cts, want_cts, "{what}: conntrack entries");
    for ct in &c.expect.ct {
        let (v, _) = &got[&ct.key];
        let (created, seen) = (v.created_ns, v.last_seen_ns);
        match ct.ts {
            Ts::New => {
                assert!(
                    t0 <= created && created <= t1,
                    "{what}: {:?} created {created} outside the case [{t0}, {t1}]",
                    ct.key
                );
                assert_eq!(
                    seen, created,
                    "{what}: {:?}: last_seen rewritten within ct_refresh_ns",
                    ct.key
                );
            }
            Ts::Refreshed => {
                let (wc, ws) = written.ct[&ct.key];
                assert_eq!(
                    created, wc,
                    "{what}: {:?} created_ns must not change",
                    ct.key
                );
                assert!(
                    seen > ws && t0 <= seen && seen <= t1,
                    "{what}: {:?} last_seen {seen} not refreshed (was {ws})",
                    ct.key
                );
            }
            Ts::Old => {
                assert_eq!(
                    (created, seen),
                    written.ct[&ct.key],
                    "{what}: {:?} timestamps must be untouched",
                    ct.key
                );
            }
        }
    }

    // Affinity.
    let got_aff = dp.aff_raw();
    let mut want_aff: Vec<Aff> = c
        .expect
        .aff
        .iter()
        .map(|a| Aff {
            used: false,
            ..a.clone()
        })
        .collect();
    want_aff.sort();
    assert_eq!(
        got_aff.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(),
        want_aff,
        "{what}: affinity entries"
    );
    for a in &c.expect.aff {
        let (_, last) = got_aff
            .iter()
            .find(|(g, _)| g.client == a.client && g.svc == a.svc)
            .unwrap();
        let prev = written.aff.get(&(a.client, a.svc)).copied();
        if a.used {
            assert!(
                *last >= t0 && *last <= t1 && Some(*last) != prev,
                "{what}: affinity {a:?} last_used {last} not written"
            );
        } else {
            assert_eq!(
                Some(*last),
                prev,
                "{what}: affinity {a:?} must be untouched"
            );
        }
    }

    // Counters.
    for s in 0..SVC_IDS {
        let want = c
            .expect
            .svc
            .iter()
            .find(|(id, _)| *id == s)
            .map(|(_, n)| *n)
            .unwrap_or_default();
        assert_eq!(dp.svc_counter(s), want, "{what}: counter of service {s}");
    }
    assert_eq!(
        dp.pod_counts(POD_IFINDEX),
        c.expect.pod,
        "{what}: pod counters"
    );
    if c.expect.pod.is_none() {
        assert_eq!(
            dp.pod_entries(),
            0,
            "{what}: the programs must not create pod entries"
        );
    }
    let reasons = dp.reasons();
    assert_eq!(
        reasons, totals,
        "{what}: reason counters = sum of the steps"
    );
    if let Some(lit) = &c.expect.reasons {
        for (j, got) in reasons.iter().enumerate() {
            let want = lit
                .iter()
                .find(|(r, _)| r.0 as usize == j)
                .map(|(_, n)| *n)
                .unwrap_or_default();
            assert_eq!(
                *got,
                want,
                "{what}: reason counter {}",
                reason_name(j as u32)
            );
        }
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, x) in b.iter().enumerate() {
        if i > 0 && i % 16 == 0 {
            s.push('\n');
        } else if i > 0 {
            s.push(' ');
        }
        s.push_str(&format!("{x:02x}"));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// The table.

fn cases() -> Vec<Case> {
    let mut v = vec![];
    v.extend(tcp_cases());
    v.extend(udp_cases());
    v.extend(reject_cases());
    v.extend(affinity_cases());
    v.extend(pass_and_drop_cases());
    v.extend(options_and_fragment_cases());
    v.extend(hairpin_cases());
    v.extend(counter_cases());
    v.extend(port_reuse_cases());
    v.extend(half_flow_cases());
    v.extend(endpoint_change_cases());
    v.extend(source_check_cases());
    v
}

/// The backend's FIN|ACK back to the client (reverse NAT to the frontend), ending the flow.
fn reply_fin_step() -> Step {
    let fin_reply = Pkt::tcp(BE_A, C, FIN | ACK);
    to_pod("the backend's FIN", &fin_reply).nat(
        &fin_reply.clone().with_src(VIP, VPORT).towards_pod(),
        R::REASON_REV_NAT,
    )
}

fn tcp_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let syn2 = Pkt::tcp(C, FE2, SYN);
    let syn_out = syn.clone().with_dst(BE_A.0, BE_A.1);
    let ack = Pkt::tcp(C, FE, ACK | PSH);
    let fin = Pkt::tcp(C, FE, FIN | ACK);
    let rst = Pkt::tcp(C, FE, RST);
    let synack = Pkt::tcp(BE_A, C, SYN | ACK);
    let reply = Pkt::tcp(BE_A, C, ACK | PSH);
    let fwd = tuple(C, FE, TCP);
    let rev_a = tuple(BE_A, C, TCP);
    let rev_b = tuple(BE_B, C, TCP);

    vec![
        case(
            "tcp_syn_new_flow_dnat",
            [web(1), vec![Setup::Pod]].concat(),
            vec![from_pod("SYN to the VIP", &syn)
                .nat(&syn_out, R::REASON_NAT_NEW)
                .svc(SVC)],
            Expect {
                ct: vec![Ct::fwd(fwd, BE_A, SVC, SYN), Ct::rev(rev_a, FE, SVC, 0)],
                svc: vec![(SVC, count(1, len(&syn)))],
                pod: Some(tx(&[&syn])),
                ..Default::default()
            },
        ),
        case(
            "tcp_new_flow_without_pod_entry",
            web(1),
            vec![from_pod("SYN, no sl_pod_v2 entry for the veth", &syn)
                .nat(&syn_out, R::REASON_NAT_NEW)
                .svc(SVC)],
            Expect {
                ct: vec![Ct::fwd(fwd, BE_A, SVC, SYN), Ct::rev(rev_a, FE, SVC, 0)],
                svc: vec![(SVC, count(1, len(&syn)))],
                pod: None,
                ..Default::default()
            },
        ),
        case(
            "tcp_established_keeps_backend_when_slots_change",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("data, slot 0 now B", &ack)
                    .before(vec![be(SVC, 0, BE_B)])
                    .nat(
                        &ack.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                from_pod("data, service has no ready backend any more", &ack)
                    .before(vec![
                        fe(VIP, VPORT, TCP, SVC, 0),
                        Setup::DelBackend { svc: SVC, slot: 0 },
                    ])
                    .nat(
                        &ack.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN | ACK),
                    Ct::rev(rev_a, FE, SVC, 0),
                ],
                svc: vec![(SVC, count(3, len(&syn) + 2 * len(&ack)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_reply_tuple_clash_with_another_frontend_gets_a_translated_port",
            [
                web(1),
                vec![fe(VIP2, VPORT, TCP, SVC2, 1), be(SVC2, 0, BE_A)],
            ]
            .concat(),
            vec![
                from_pod("SYN to VIP:80 -> A", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod(
                    "same client port to VIP2:80 -> A: A's reply tuple is taken, so the port is translated",
                    &syn2,
                )
                .nat(
                    &syn2.clone().with_src(CLIENT, XPORT).with_dst(BE_A.0, BE_A.1),
                    R::REASON_NAT_NEW_XLATE,
                )
                .svc(SVC2),
                to_pod("A answers the second flow", &synack.clone().with_dst(CLIENT, XPORT)).nat(
                    &synack.clone().with_src(VIP2, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                to_pod("A answers the first flow", &synack).nat(
                    &synack.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN),
                    Ct::rev(rev_a, FE, SVC, SYN | ACK),
                    Ct::fwd(tuple(C, FE2, TCP), BE_A, SVC2, SYN).xlated(XPORT),
                    Ct::rev(tuple(BE_A, (CLIENT, XPORT), TCP), FE2, SVC2, SYN | ACK)
                        .xlated(CPORT),
                ],
                svc: vec![(SVC, count(1, len(&syn))), (SVC2, count(1, len(&syn2)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_reply_tuple_of_a_closed_flow_is_taken_over",
            [
                web(1),
                vec![fe(VIP2, VPORT, TCP, SVC2, 1), be(SVC2, 0, BE_A)],
            ]
            .concat(),
            vec![
                from_pod("SYN to VIP:80 -> A", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("the first flow's FIN", &fin)
                    .nat(
                        &fin.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                reply_fin_step(),
                from_pod("same client port to VIP2:80 -> A: the closed flow gives way", &syn2)
                    .nat(&syn2.clone().with_dst(BE_A.0, BE_A.1), R::REASON_FLOW_REPLACED)
                    .svc(SVC2),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE2, TCP), BE_A, SVC2, SYN),
                    Ct::rev(rev_a, FE2, SVC2, 0),
                ],
                svc: vec![
                    (SVC, count(2, len(&syn) + len(&fin))),
                    (SVC2, count(1, len(&syn2))),
                ],
                ..Default::default()
            },
        ),
        case(
            "tcp_syn_retransmit_keeps_backend",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("SYN again, slot 0 now B", &syn)
                    .before(vec![be(SVC, 0, BE_B)])
                    .nat(&syn_out, R::REASON_NAT_ESTABLISHED)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![Ct::fwd(fwd, BE_A, SVC, SYN), Ct::rev(rev_a, FE, SVC, 0)],
                svc: vec![(SVC, count(2, 2 * len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_reply_reverse_nat",
            [web(1), vec![Setup::Pod]].concat(),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                to_pod("SYN-ACK from the backend", &synack).nat(
                    &synack.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                from_pod("ACK + data", &ack)
                    .nat(
                        &ack.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                to_pod("reply data", &reply).nat(
                    &reply.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                to_pod(
                    "same backend, another client port: not ours",
                    &reply.clone().with_dst(CLIENT, CPORT + 1),
                )
                .pass(R::REASON_PASS),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN | ACK),
                    Ct::rev(rev_a, FE, SVC, SYN | ACK),
                ],
                svc: vec![(SVC, count(2, len(&syn) + len(&ack)))],
                pod: Some(PodCount {
                    tx_packets: 2,
                    tx_bytes: len(&syn) + len(&ack),
                    rx_packets: 3,
                    rx_bytes: len(&synack) + 2 * len(&reply),
                }),
                ..Default::default()
            },
        ),
        case(
            "tcp_reply_without_conntrack_passes",
            web(1),
            vec![to_pod("reply-looking segment, no flow", &synack).pass(R::REASON_PASS)],
            Expect::default(),
        ),
        case(
            "tcp_ct_last_seen_refreshed_after_ct_refresh_ns",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("data, forward entry last seen 5 s ago", &ack)
                    .before(vec![Setup::AgeCt(fwd, Age::Secs(5))])
                    .nat(
                        &ack.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                to_pod("reply, reverse entry last seen 3 s ago", &reply)
                    .before(vec![Setup::AgeCt(rev_a, Age::Secs(3))])
                    .nat(
                        &reply.clone().with_src(VIP, VPORT).towards_pod(),
                        R::REASON_REV_NAT,
                    ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN | ACK).ts(Ts::Refreshed),
                    Ct::rev(rev_a, FE, SVC, ACK).ts(Ts::Refreshed),
                ],
                svc: vec![(SVC, count(2, len(&syn) + len(&ack)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_port_reuse_after_fin_is_a_new_flow",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("FIN", &fin)
                    .nat(
                        &fin.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                from_pod("new SYN on the same port, slot 0 now B", &syn)
                    .before(vec![be(SVC, 0, BE_B)])
                    .nat(&syn.clone().with_dst(BE_B.0, BE_B.1), R::REASON_FLOW_REPLACED)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![Ct::fwd(fwd, BE_B, SVC, SYN), Ct::rev(rev_b, FE, SVC, 0)],
                svc: vec![(SVC, count(3, 2 * len(&syn) + len(&fin)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_port_reuse_after_rst_is_a_new_flow",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("RST", &rst)
                    .nat(
                        &rst.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                from_pod("new SYN on the same port, slot 0 now B", &syn)
                    .before(vec![be(SVC, 0, BE_B)])
                    .nat(&syn.clone().with_dst(BE_B.0, BE_B.1), R::REASON_FLOW_REPLACED)
                    .svc(SVC),
                to_pod("SYN-ACK from B", &synack.clone().with_src(BE_B.0, BE_B.1)).nat(
                    &synack.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_B, SVC, SYN),
                    Ct::rev(rev_b, FE, SVC, SYN | ACK),
                ],
                svc: vec![(SVC, count(3, 2 * len(&syn) + len(&rst)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_slot_missing_drops_without_conntrack",
            vec![fe(VIP, VPORT, TCP, SVC, 1)],
            vec![from_pod("SYN, backend_count 1 but slot 0 absent", &syn)
                .drop(R::REASON_DROP_NO_BACKEND)],
            Expect::default(),
        ),
    ]
}

/// A UDP payload (ending in two free bytes) for which the DNATed datagram's checksum sums to zero,
/// so it must be sent as 0xffff (RFC 768: 0 means "no checksum").
fn payload_with_zero_sum_after(make: impl Fn(&[u8]) -> (Pkt, Pkt)) -> Vec<u8> {
    for w in 0..=u16::MAX {
        let mut p = b"sluice-csum".to_vec();
        p.extend_from_slice(&w.to_be_bytes());
        let (before, after) = make(&p);
        let (b, a) = (before.bytes(), after.bytes());
        let off = 14 + 20 + 6;
        if a[off..off + 2] == [0xff, 0xff] && b[off..off + 2] != [0xff, 0xff] {
            return p;
        }
    }
    panic!("no payload found");
}

/// An ICMP time-exceeded from `router` about `about` (quoting its IP header and 8 bytes), on its
/// way to the pod that sent `about`.
fn icmp_from(router: Ipv4Addr, about: &Pkt) -> Vec<u8> {
    let mut b = about.host_port_unreachable();
    // Same layout as port_unreachable: Ethernet 14, IP 20 (source at 26), ICMP type at 34.
    b[26..30].copy_from_slice(&router.octets());
    b[34] = 11; // time exceeded
    b[35] = 0;
    let ip = etherparse::Ipv4HeaderSlice::from_slice(&b[14..34])
        .unwrap()
        .to_header();
    b[24..26].copy_from_slice(&ip.calc_header_checksum().to_be_bytes());
    b[36..38].copy_from_slice(&[0, 0]);
    let sum = !ones_complement_sum(&b[34..]);
    b[36..38].copy_from_slice(&sum.to_be_bytes());
    b
}

fn udp_cases() -> Vec<Case> {
    let q = Pkt::udp(
        C,
        DNS_FE,
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01",
    );
    let q_out = q.clone().with_dst(BE_DNS.0, BE_DNS.1);
    let a = Pkt::udp(BE_DNS, C, b"\x12\x34\x81\x80\x00\x01\x00\x01 answer bytes");
    let a_out = a.clone().with_src(DNS_VIP, DNS_PORT).towards_pod();
    let fwd = tuple(C, DNS_FE, UDP);
    let rev = tuple(BE_DNS, C, UDP);

    let qz = q.clone().with_zero_udp_csum();
    let az = a.clone().with_zero_udp_csum();

    let p = payload_with_zero_sum_after(|p| {
        let q = Pkt::udp(C, DNS_FE, p);
        let out = q.clone().with_dst(BE_DNS.0, BE_DNS.1);
        (q, out)
    });
    let q_ff = Pkt::udp(C, DNS_FE, &p);
    let p2 = payload_with_zero_sum_after(|p| {
        let a = Pkt::udp(BE_DNS, C, p);
        let out = a.clone().with_src(DNS_VIP, DNS_PORT);
        (a, out)
    });
    let a_ff = Pkt::udp(BE_DNS, C, &p2);

    // Smaller than the Ethernet minimum: the sender pads the frame to 60 bytes.
    let tiny = Pkt::udp(C, DNS_FE, b"hi").padded_to(60);

    vec![
        case(
            "udp_backend_port_unreachable_is_reverse_nated_for_the_client",
            dns(),
            vec![
                from_pod("query", &q)
                    .nat(&q_out, R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                // The backend's kernel answers the DNATed query (nothing listens there); the
                // client must see the error from the frontend, about its own query.
                to_pod_raw(
                    "ICMP port unreachable from the backend",
                    q_out.host_port_unreachable(),
                )
                .nat_bytes(q.host_port_unreachable(), R::REASON_REV_NAT_ICMP),
                to_pod_raw(
                    "the same error about a flow that is not NATed: untouched",
                    Pkt::udp(C, (OTHER, 53), b"x").host_port_unreachable(),
                )
                .pass(R::REASON_PASS),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_DNS, DNS_SVC, 0),
                    Ct::rev(rev, DNS_FE, DNS_SVC, 0),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_port_unreachable_from_a_router_keeps_its_source",
            web(1),
            vec![
                from_pod("SYN", &Pkt::tcp(C, FE, SYN))
                    .nat(
                        &Pkt::tcp(C, FE, SYN).with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_NEW,
                    )
                    .svc(SVC),
                to_pod_raw(
                    "time exceeded from 10.0.9.9 about the DNATed SYN",
                    icmp_from(OTHER, &Pkt::tcp(C, FE, SYN).with_dst(BE_A.0, BE_A.1)),
                )
                .nat_bytes(
                    icmp_from(OTHER, &Pkt::tcp(C, FE, SYN)),
                    R::REASON_REV_NAT_ICMP,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                svc: vec![(SVC, count(1, len(&Pkt::tcp(C, FE, SYN))))],
                ..Default::default()
            },
        ),
        case(
            "udp_new_flow_and_reply",
            [dns(), vec![Setup::Pod]].concat(),
            vec![
                from_pod("query", &q)
                    .nat(&q_out, R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                to_pod("answer", &a).nat(&a_out, R::REASON_REV_NAT),
                from_pod("second query, same socket", &q)
                    .nat(&q_out, R::REASON_NAT_ESTABLISHED)
                    .svc(DNS_SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_DNS, DNS_SVC, 0),
                    Ct::rev(rev, DNS_FE, DNS_SVC, 0).replied(),
                ],
                svc: vec![(DNS_SVC, count(2, 2 * len(&q)))],
                pod: Some(PodCount {
                    tx_packets: 2,
                    tx_bytes: 2 * len(&q),
                    rx_packets: 1,
                    rx_bytes: len(&a),
                }),
                ..Default::default()
            },
        ),
        case(
            "udp_zero_checksum_stays_zero",
            dns(),
            vec![
                from_pod("query without checksum", &qz)
                    .nat(&qz.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                to_pod("answer without checksum", &az).nat(
                    &az.clone().with_src(DNS_VIP, DNS_PORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_DNS, DNS_SVC, 0),
                    Ct::rev(rev, DNS_FE, DNS_SVC, 0).replied(),
                ],
                svc: vec![(DNS_SVC, count(1, len(&qz)))],
                ..Default::default()
            },
        ),
        case(
            "udp_checksum_summing_to_zero_is_sent_as_ffff",
            dns(),
            vec![
                from_pod("query whose DNATed checksum is 0xffff", &q_ff)
                    .nat(
                        &q_ff.clone().with_dst(BE_DNS.0, BE_DNS.1),
                        R::REASON_NAT_NEW,
                    )
                    .svc(DNS_SVC),
                to_pod("answer whose restored checksum is 0xffff", &a_ff).nat(
                    &a_ff.clone().with_src(DNS_VIP, DNS_PORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_DNS, DNS_SVC, 0),
                    Ct::rev(rev, DNS_FE, DNS_SVC, 0).replied(),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q_ff)))],
                ..Default::default()
            },
        ),
        case(
            "udp_padded_short_frame_keeps_padding",
            dns(),
            vec![from_pod("2-byte query in a 60-byte frame", &tiny)
                .nat(
                    &tiny.clone().with_dst(BE_DNS.0, BE_DNS.1),
                    R::REASON_NAT_NEW,
                )
                .svc(DNS_SVC)],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_DNS, DNS_SVC, 0),
                    Ct::rev(rev, DNS_FE, DNS_SVC, 0),
                ],
                svc: vec![(DNS_SVC, count(1, 60))],
                ..Default::default()
            },
        ),
    ]
}

fn reject_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let q = Pkt::udp(C, DNS_FE, &[0x5a; 100]);
    let tiny = Pkt::udp(C, DNS_FE, b"hi").padded_to(60);
    let syn_opts = Pkt::tcp(C, FE, SYN).with_options(&[148, 4, 0, 0]); // router alert
    let syn_opts40 = Pkt::tcp(C, FE, SYN).with_options(&record_route_40());
    let no_dns = vec![fe(DNS_VIP, DNS_PORT, UDP, DNS_SVC, 0)];

    vec![
        case(
            "no_backend_tcp_gets_icmp_port_unreachable",
            [web(0), vec![Setup::Pod]].concat(),
            vec![from_pod("SYN to a service without endpoints", &syn)
                .redirect(syn.port_unreachable(), R::REASON_NO_BACKEND)],
            Expect {
                pod: Some(tx(&[&syn])),
                ..Default::default()
            },
        ),
        case(
            "no_backend_udp_gets_icmp_port_unreachable",
            no_dns.clone(),
            vec![from_pod("100-byte datagram", &q)
                .redirect(q.port_unreachable(), R::REASON_NO_BACKEND)],
            Expect::default(),
        ),
        case(
            "no_backend_padded_frame_gets_icmp_port_unreachable",
            no_dns,
            vec![from_pod("2-byte datagram in a 60-byte frame", &tiny)
                .redirect(tiny.port_unreachable(), R::REASON_NO_BACKEND)],
            Expect::default(),
        ),
        case(
            "no_backend_with_ip_options_quotes_whole_header",
            web(0),
            vec![
                from_pod("SYN with IHL 6", &syn_opts)
                    .redirect(syn_opts.port_unreachable(), R::REASON_NO_BACKEND),
                from_pod("SYN with IHL 15", &syn_opts40)
                    .redirect(syn_opts40.port_unreachable(), R::REASON_NO_BACKEND),
            ],
            Expect::default(),
        ),
    ]
}

/// A Record Route option filling the 40 option bytes (IHL 15): type 7, length 39, pointer 4,
/// nine empty slots, then End of Options.
fn record_route_40() -> Vec<u8> {
    let mut o = vec![7, 39, 4];
    o.extend_from_slice(&[0; 36]);
    o.push(0);
    o
}

fn affinity_cases() -> Vec<Case> {
    let aff_fe = Setup::Frontend {
        vip: VIP,
        port: VPORT,
        proto: TCP,
        svc: SVC,
        count: 1,
        flags: AFF,
        timeout: AFF_TIMEOUT,
    };
    let syn = Pkt::tcp(C, FE, SYN);
    let syn2 = Pkt::tcp((CLIENT, CPORT + 1), FE, SYN);
    let syn_other_client = Pkt::tcp((CLIENT2, CPORT), FE, SYN);
    let fwd = tuple(C, FE, TCP);
    let fwd2 = tuple((CLIENT, CPORT + 1), FE, TCP);
    let fwd3 = tuple((CLIENT2, CPORT), FE, TCP);
    let to = |p: &Pkt, b: (Ipv4Addr, u16)| p.clone().with_dst(b.0, b.1);

    vec![
        case(
            "affinity_second_flow_same_backend",
            vec![aff_fe.clone(), be(SVC, 0, BE_A)],
            vec![
                from_pod("first flow: random pick, remembered", &syn)
                    .nat(&to(&syn, BE_A), R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("second flow, slot 0 now B: remembered A", &syn2)
                    .before(vec![be(SVC, 0, BE_B)])
                    .nat(&to(&syn2, BE_A), R::REASON_AFFINITY_HIT)
                    .svc(SVC),
                from_pod("another client: its own pick", &syn_other_client)
                    .nat(&to(&syn_other_client, BE_B), R::REASON_NAT_NEW)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                    Ct::fwd(fwd2, BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, (CLIENT, CPORT + 1), TCP), FE, SVC, 0),
                    Ct::fwd(fwd3, BE_B, SVC, SYN),
                    Ct::rev(tuple(BE_B, (CLIENT2, CPORT), TCP), FE, SVC, 0),
                ],
                aff: vec![
                    Aff {
                        client: CLIENT,
                        svc: SVC,
                        backend: BE_A,
                        used: true,
                    },
                    Aff {
                        client: CLIENT2,
                        svc: SVC,
                        backend: BE_B,
                        used: true,
                    },
                ],
                svc: vec![(SVC, count(3, 3 * len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "affinity_fresh_entry_wins_over_slots",
            vec![
                aff_fe.clone(),
                be(SVC, 0, BE_A),
                Setup::Member {
                    svc: SVC,
                    addr: BE_B,
                    present: true,
                },
                Setup::Affinity {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_B,
                    age: Age::Secs(60),
                },
            ],
            vec![from_pod("new flow, client used B a minute ago", &syn)
                .nat(&to(&syn, BE_B), R::REASON_AFFINITY_HIT)
                .svc(SVC)],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_B, SVC, SYN),
                    Ct::rev(tuple(BE_B, C, TCP), FE, SVC, 0),
                ],
                aff: vec![Aff {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_B,
                    used: true,
                }],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "affinity_expired_entry_repicks",
            vec![
                aff_fe.clone(),
                be(SVC, 0, BE_A),
                Setup::Affinity {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_B,
                    age: Age::Secs(AFF_TIMEOUT as u64 + 5),
                },
            ],
            vec![
                from_pod("new flow, B remembered longer than the timeout", &syn)
                    .nat(&to(&syn, BE_A), R::REASON_NAT_NEW)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                aff: vec![Aff {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_A,
                    used: true,
                }],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "affinity_ignored_without_the_flag",
            [
                web(1),
                vec![Setup::Affinity {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_B,
                    age: Age::Secs(1),
                }],
            ]
            .concat(),
            vec![
                from_pod("new flow to a service without sessionAffinity", &syn)
                    .nat(&to(&syn, BE_A), R::REASON_NAT_NEW)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                aff: vec![Aff {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_B,
                    used: false,
                }],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
    ]
}

fn pass_and_drop_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let sb = syn.bytes(); // 14 + 20 + 20
    let u = Pkt::udp(C, DNS_FE, b"0123456789").bytes();
    let tot = |b: Vec<u8>, n: u16| fix_ip_csum(patched(b, 16, &n.to_be_bytes()));
    // The IHL/version byte; the header checksum is left as it was (the packet is dropped first).
    let vh = |b: Vec<u8>, x: u8| patched(b, 14, &[x]);
    let opts6 = Pkt::tcp(C, FE, SYN).with_options(&[1, 1, 1, 0]).bytes();
    let reply6 = Pkt::tcp(BE_A, C, ACK)
        .with_options(&[1, 1, 1, 0])
        .towards_pod()
        .bytes();
    // An 802.1Q-tagged copy of the SYN.
    let mut vlan = sb[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&sb[12..]);

    vec![
        case(
            "non_service_traffic_is_untouched_and_the_pods_own_flows_tracked",
            [web(1), dns(), vec![Setup::Pod]].concat(),
            vec![
                from_pod("TCP SYN to a pod", &Pkt::tcp(C, (OTHER, 80), SYN))
                    .pass(R::REASON_DIRECT_NEW),
                from_pod(
                    "TCP SYN to the VIP on a port it does not serve",
                    &Pkt::tcp(C, (VIP, 81), SYN),
                )
                .pass(R::REASON_DIRECT_NEW),
                from_pod("UDP to a TCP-only VIP:port", &Pkt::udp(C, FE, b"x"))
                    .pass(R::REASON_DIRECT_NEW),
                from_pod("ICMP echo to the VIP", &Pkt::ping(CLIENT, VIP)).pass(R::REASON_PASS),
                from_pod(
                    "UDP to the hairpin address, no flow",
                    &Pkt::udp(C, (HAIRPIN, 8080), b"x"),
                )
                .pass(R::REASON_PASS),
                to_pod("SYN-ACK from the pod", &Pkt::tcp((OTHER, 80), C, SYN | ACK))
                    .pass(R::REASON_DIRECT),
                from_pod(
                    "plain data to the pod: one lookup, nothing written",
                    &Pkt::tcp(C, (OTHER, 80), ACK | PSH),
                )
                .pass(R::REASON_PASS),
                to_pod("ICMP to the pod", &Pkt::ping(OTHER, CLIENT)).pass(R::REASON_PASS),
            ],
            Expect {
                ct: vec![
                    Ct::direct(tuple((OTHER, 80), C, TCP), SYN, SYN | ACK),
                    Ct::direct(tuple((VIP, 81), C, TCP), SYN, 0),
                    Ct::direct(tuple(FE, C, UDP), SEEN as u8, 0),
                ],
                pod: Some(PodCount {
                    tx_packets: 6,
                    tx_bytes: len(&Pkt::tcp(C, (OTHER, 80), SYN)) * 2
                        + len(&Pkt::udp(C, FE, b"x")) * 2
                        + len(&Pkt::ping(CLIENT, VIP))
                        + len(&Pkt::tcp(C, (OTHER, 80), ACK | PSH)),
                    rx_packets: 2,
                    rx_bytes: len(&Pkt::tcp((OTHER, 80), C, SYN)) + len(&Pkt::ping(OTHER, CLIENT)),
                }),
                ..Default::default()
            },
        ),
        case(
            "non_ipv4_passes",
            web(1),
            vec![
                from_pod_raw("ARP", arp_frame()).pass(R::REASON_PASS_NON_IPV4),
                to_pod_raw("ARP", arp_frame()).pass(R::REASON_PASS_NON_IPV4),
                from_pod_raw("IPv6 TCP SYN", ipv6_frame()).pass(R::REASON_PASS_NON_IPV4),
                to_pod_raw("IPv6 TCP SYN", ipv6_frame()).pass(R::REASON_PASS_NON_IPV4),
                from_pod_raw("802.1Q-tagged SYN to the VIP", vlan).pass(R::REASON_PASS_NON_IPV4),
            ],
            Expect::default(),
        ),
        case(
            "truncated_headers_drop",
            [web(1), dns()].concat(),
            vec![
                // (IPv4 frames without 20 bytes of IP header: see ipv4_header_cut_within_20_bytes.)
                from_pod_raw(
                    "IPv4 header cut after 20 of 24 bytes (IHL 6)",
                    opts6[..34].to_vec(),
                )
                .drop(R::REASON_DROP_TRUNCATED),
                from_pod_raw(
                    "TCP header cut (frame and total length)",
                    tot(sb[..44].to_vec(), 30),
                )
                .drop(R::REASON_DROP_TRUNCATED),
                from_pod_raw("TCP header cut (frame only)", sb[..44].to_vec())
                    .drop(R::REASON_DROP_TRUNCATED),
                from_pod_raw("total length beyond the frame", tot(sb.clone(), 140))
                    .drop(R::REASON_DROP_TRUNCATED),
                from_pod_raw("UDP header cut", tot(u[..38].to_vec(), 24))
                    .drop(R::REASON_DROP_TRUNCATED),
                from_pod_raw(
                    "IHL 15, options cut by the frame",
                    Pkt::tcp(C, FE, SYN)
                        .with_options(&record_route_40())
                        .bytes()[..14 + 40]
                        .to_vec(),
                )
                .drop(R::REASON_DROP_TRUNCATED),
                to_pod_raw(
                    "IPv4 header cut after 20 of 24 bytes (IHL 6)",
                    reply6[..34].to_vec(),
                )
                .drop(R::REASON_DROP_TRUNCATED),
                to_pod_raw(
                    "UDP header cut",
                    tot(
                        Pkt::udp(BE_DNS, C, b"").towards_pod().bytes()[..38].to_vec(),
                        24,
                    ),
                )
                .drop(R::REASON_DROP_TRUNCATED),
            ],
            Expect::default(),
        ),
        case(
            "malformed_ipv4_drops",
            web(1),
            vec![
                from_pod_raw("version 6 in an IPv4 frame", vh(sb.clone(), 0x65))
                    .drop(R::REASON_DROP_MALFORMED),
                from_pod_raw("IHL 4", vh(sb.clone(), 0x44)).drop(R::REASON_DROP_MALFORMED),
                from_pod_raw("IHL 0", vh(sb.clone(), 0x40)).drop(R::REASON_DROP_MALFORMED),
                from_pod_raw("total length 19", tot(sb.clone(), 19)).drop(R::REASON_DROP_MALFORMED),
                from_pod_raw("total length 0 (no GSO)", tot(sb.clone(), 0))
                    .drop(R::REASON_DROP_MALFORMED),
                from_pod_raw("IHL 15 beyond total length 40", vh(sb.clone(), 0x4f))
                    .drop(R::REASON_DROP_MALFORMED),
                to_pod_raw(
                    "version 5",
                    vh(Pkt::tcp(BE_A, C, ACK).towards_pod().bytes(), 0x55),
                )
                .drop(R::REASON_DROP_MALFORMED),
            ],
            Expect::default(),
        ),
    ]
}

fn options_and_fragment_cases() -> Vec<Case> {
    let nops = [1u8, 1, 1, 0];
    let syn6 = Pkt::tcp(C, FE, SYN).with_options(&nops);
    let syn15 = Pkt::tcp((CLIENT, CPORT + 1), FE, SYN).with_options(&record_route_40());
    let reply6 = Pkt::tcp(BE_A, C, SYN | ACK).with_options(&nops);
    let q10 = Pkt::udp(C, DNS_FE, b"query with options")
        .with_options(&[148, 4, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
    let a10 = Pkt::udp(BE_DNS, C, b"answer with options").with_options(&[1, 1, 1, 1, 1, 1, 1, 0]);

    let frag_first = Pkt::udp(C, DNS_FE, &[7; 64]).with_frag(true, 0);
    let frag_later = Pkt::raw(CLIENT, DNS_VIP, UDP, vec![7; 64]).with_frag(false, 185);
    let frag_tcp = Pkt::tcp(C, FE, ACK).with_frag(true, 0);
    let frag_other = Pkt::udp(C, (OTHER, 53), &[7; 64]).with_frag(true, 0);
    let frag_other_later = Pkt::raw(CLIENT, OTHER, UDP, vec![7; 64]).with_frag(false, 185);
    let frag_reply = Pkt::raw(BE_DNS.0, CLIENT, UDP, vec![7; 64]).with_frag(true, 185);
    let q = Pkt::udp(C, DNS_FE, b"query");
    let ans_first = Pkt::udp(BE_DNS, C, &[9; 64]).with_frag(true, 0);
    let ans_later = Pkt::raw(BE_DNS.0, CLIENT, UDP, vec![9; 64]).with_frag(false, 185);
    // The UDP header cut to 4 bytes: total length = IP header + 4.
    let tiny_first = {
        let mut b = Pkt::raw(CLIENT, DNS_VIP, UDP, vec![0x9c, 0x40, 0, 53])
            .with_frag(true, 0)
            .bytes();
        b.truncate(14 + 24);
        b
    };

    vec![
        case(
            "ip_options_tcp_dnat_preserves_options",
            web(1),
            vec![
                from_pod("SYN with IHL 6", &syn6)
                    .nat(&syn6.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
                to_pod("SYN-ACK with IHL 6", &reply6).nat(
                    &reply6.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                from_pod("SYN with IHL 15", &syn15)
                    .nat(&syn15.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, SYN | ACK),
                    Ct::fwd(tuple((CLIENT, CPORT + 1), FE, TCP), BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, (CLIENT, CPORT + 1), TCP), FE, SVC, 0),
                ],
                svc: vec![(SVC, count(2, len(&syn6) + len(&syn15)))],
                ..Default::default()
            },
        ),
        case(
            "ip_options_udp_dnat_preserves_options",
            dns(),
            vec![
                from_pod("query with IHL 10", &q10)
                    .nat(&q10.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                to_pod("answer with IHL 7", &a10).nat(
                    &a10.clone().with_src(DNS_VIP, DNS_PORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0),
                    Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0).replied(),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q10)))],
                ..Default::default()
            },
        ),
        case(
            "fragments_of_a_request_to_a_vip_are_dnated_like_their_first",
            [dns(), vec![Setup::Marker(DNS_VIP)]].concat(),
            vec![
                from_pod("first fragment (MF) to the DNS VIP", &frag_first)
                    .nat(
                        &frag_first.clone().with_dst(BE_DNS.0, BE_DNS.1),
                        R::REASON_NAT_NEW,
                    )
                    .svc(DNS_SVC),
                from_pod("later fragment (offset 1480) to the DNS VIP", &frag_later).nat(
                    &Pkt::raw(CLIENT, BE_DNS.0, UDP, vec![7; 64]).with_frag(false, 185),
                    R::REASON_NAT_FRAGMENT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0),
                    Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0),
                ],
                svc: vec![(DNS_SVC, count(1, len(&frag_first)))],
                ..Default::default()
            },
        ),
        case(
            "fragments_of_a_reply_are_reverse_nated_like_their_first",
            dns(),
            vec![
                from_pod("query", &q)
                    .nat(&q.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                to_pod("first fragment of a large answer", &ans_first).nat(
                    &ans_first.clone().with_src(DNS_VIP, DNS_PORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                to_pod("its later fragment", &ans_later).nat(
                    &Pkt::raw(DNS_VIP, CLIENT, UDP, vec![9; 64])
                        .with_frag(false, 185)
                        .towards_pod(),
                    R::REASON_NAT_FRAGMENT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0),
                    Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0).replied(),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "a_later_fragment_before_its_first_drops_for_a_vip_and_passes_elsewhere",
            [
                web(1),
                dns(),
                vec![Setup::Marker(VIP), Setup::Marker(DNS_VIP)],
            ]
            .concat(),
            vec![
                from_pod(
                    "later fragment to the DNS VIP, first never seen",
                    &frag_later,
                )
                .drop(R::REASON_DROP_FRAG_ORPHAN),
                from_pod("later fragment to a pod", &frag_other_later)
                    .pass(R::REASON_PASS_FRAGMENT),
                to_pod("later fragment towards the pod", &frag_reply).pass(R::REASON_PASS_FRAGMENT),
                from_pod("TCP first fragment to the web VIP", &frag_tcp)
                    .nat(
                        &frag_tcp.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_NEW,
                    )
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, ACK),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                svc: vec![(SVC, count(1, len(&frag_tcp)))],
                ..Default::default()
            },
        ),
        case(
            "a_first_fragment_to_a_pod_is_a_tracked_direct_flow",
            dns(),
            vec![
                from_pod("first fragment to a pod", &frag_other).pass(R::REASON_DIRECT_NEW),
                from_pod("its later fragment", &frag_other_later).pass(R::REASON_PASS_FRAGMENT),
            ],
            Expect {
                ct: vec![Ct::direct(tuple((OTHER, 53), C, UDP), SEEN as u8, 0)],
                ..Default::default()
            },
        ),
        case(
            "a_first_fragment_too_short_for_its_header_is_malformed",
            dns(),
            vec![from_pod_raw(
                "UDP first fragment with 4 bytes of header",
                tiny_first.clone(),
            )
            .drop(R::REASON_DROP_MALFORMED)],
            Expect::default(),
        ),
    ]
}

fn hairpin_cases() -> Vec<Case> {
    let mut v = vec![];
    for (name, hp) in [
        ("hairpin_new_flow_and_reply", None),
        (
            "hairpin_with_configured_address",
            Some(Ipv4Addr::new(169, 254, 7, 7)),
        ),
    ] {
        let h = hp.unwrap_or(HAIRPIN);
        let me = (CLIENT, 8080); // the client pod is the service's only backend
        let syn = Pkt::tcp(C, FE, SYN);
        let syn_out = syn
            .clone()
            .with_src(h, CPORT)
            .with_dst(CLIENT, 8080)
            .macs_swapped();
        let synack = Pkt::tcp(me, (h, CPORT), SYN | ACK);
        let synack_out = synack
            .clone()
            .with_src(VIP, VPORT)
            .with_dst(CLIENT, CPORT)
            .macs_swapped();
        let ack = Pkt::tcp(C, FE, ACK | PSH);
        let ack_out = ack
            .clone()
            .with_src(h, CPORT)
            .with_dst(CLIENT, 8080)
            .macs_swapped();
        let reply = Pkt::tcp(me, (h, CPORT), ACK | PSH);
        let reply_out = reply
            .clone()
            .with_src(VIP, VPORT)
            .with_dst(CLIENT, CPORT)
            .macs_swapped();
        v.push(Case {
            name,
            hairpin: hp,
            setup: vec![fe(VIP, VPORT, TCP, SVC, 1), be(SVC, 0, me), Setup::Pod],
            steps: vec![
                from_pod("SYN to the VIP, client is the backend", &syn)
                    .redirect(syn_out.bytes(), R::REASON_HAIRPIN)
                    .svc(SVC),
                to_pod_raw("the bounced SYN on its way into the pod", syn_out.bytes())
                    .pass(R::REASON_PASS),
                from_pod(
                    "SYN-ACK from the pod's server to the hairpin address",
                    &synack,
                )
                .redirect(synack_out.bytes(), R::REASON_REV_NAT),
                to_pod_raw(
                    "the bounced SYN-ACK on its way into the pod",
                    synack_out.bytes(),
                )
                .pass(R::REASON_PASS),
                from_pod("ACK + data", &ack)
                    .redirect(ack_out.bytes(), R::REASON_NAT_ESTABLISHED)
                    .svc(SVC),
                from_pod("reply data", &reply).redirect(reply_out.bytes(), R::REASON_REV_NAT),
            ],
            expect: Expect {
                ct: vec![
                    Ct::hairpin_fwd(tuple(C, FE, TCP), me, h, SVC, SYN | ACK),
                    Ct::hairpin_rev(tuple(me, (h, CPORT), TCP), FE, CLIENT, SVC, SYN | ACK),
                ],
                svc: vec![(SVC, count(2, len(&syn) + len(&ack)))],
                pod: Some(PodCount {
                    tx_packets: 4,
                    tx_bytes: len(&syn) + len(&synack) + len(&ack) + len(&reply),
                    rx_packets: 2,
                    rx_bytes: len(&syn) + len(&synack),
                }),
                ..Default::default()
            },
        });
    }
    v
}

fn counter_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let ack = Pkt::tcp(C, FE, ACK);
    let data = Pkt::tcp(C, FE, ACK | PSH);
    let q = Pkt::udp(C, DNS_FE, b"query");
    let other = Pkt::tcp(C, (OTHER, 443), SYN);
    let reply = Pkt::tcp(BE_A, C, ACK);
    let n = |p: &Pkt| len(p);
    vec![case(
        "counters_advance_per_service_reason_and_pod",
        [web(1), dns(), vec![Setup::Pod]].concat(),
        vec![
            from_pod("SYN", &syn)
                .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                .svc(SVC),
            from_pod("ACK", &ack)
                .nat(
                    &ack.clone().with_dst(BE_A.0, BE_A.1),
                    R::REASON_NAT_ESTABLISHED,
                )
                .svc(SVC),
            from_pod("data", &data)
                .nat(
                    &data.clone().with_dst(BE_A.0, BE_A.1),
                    R::REASON_NAT_ESTABLISHED,
                )
                .svc(SVC),
            from_pod("query", &q)
                .nat(&q.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                .svc(DNS_SVC),
            from_pod("query again", &q)
                .nat(
                    &q.clone().with_dst(BE_DNS.0, BE_DNS.1),
                    R::REASON_NAT_ESTABLISHED,
                )
                .svc(DNS_SVC),
            from_pod("not a service", &other).pass(R::REASON_DIRECT_NEW),
            to_pod("reply", &reply).nat(
                &reply.clone().with_src(VIP, VPORT).towards_pod(),
                R::REASON_REV_NAT,
            ),
        ],
        Expect {
            ct: vec![
                Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN | ACK),
                Ct::rev(tuple(BE_A, C, TCP), FE, SVC, ACK),
                Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0),
                Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0),
                Ct::direct(tuple((OTHER, 443), C, TCP), SYN, 0),
            ],
            svc: vec![
                (SVC, count(3, n(&syn) + n(&ack) + n(&data))),
                (DNS_SVC, count(2, 2 * n(&q))),
            ],
            pod: Some(PodCount {
                tx_packets: 6,
                tx_bytes: n(&syn) + n(&ack) + n(&data) + 2 * n(&q) + n(&other),
                rx_packets: 1,
                rx_bytes: n(&reply),
            }),
            reasons: Some(vec![
                (R::REASON_NAT_NEW, count(2, n(&syn) + n(&q))),
                (
                    R::REASON_NAT_ESTABLISHED,
                    count(3, n(&ack) + n(&data) + n(&q)),
                ),
                (R::REASON_DIRECT_NEW, count(1, n(&other))),
                (R::REASON_REV_NAT, count(1, n(&reply))),
            ]),
            ..Default::default()
        },
    )]
}

/// Port reuse and reply-tuple clashes between a pod's service flows and its direct flows: the
/// kernel NAT's rules (issue 7). XPORT is the table's one translated port.
fn port_reuse_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let syn_out = syn.clone().with_dst(BE_A.0, BE_A.1);
    let fin = Pkt::tcp(C, FE, FIN | ACK);
    let synack = Pkt::tcp(BE_A, C, SYN | ACK);
    // Straight to backend A from the same client port.
    let dsyn = Pkt::tcp(C, BE_A, SYN);
    let ddata = Pkt::tcp(C, BE_A, ACK | PSH);
    let dsynack = Pkt::tcp(BE_A, C, SYN | ACK);
    let drst = Pkt::tcp(BE_A, C, RST | ACK);
    let q = Pkt::udp(C, DNS_FE, b"query");
    let dq = Pkt::udp(C, BE_DNS, b"direct query");
    let da = Pkt::udp(BE_DNS, C, b"direct answer");
    let fwd = tuple(C, FE, TCP);
    let rev_a = tuple(BE_A, C, TCP);
    let x_rev = tuple(BE_A, (CLIENT, XPORT), TCP);

    vec![
        case(
            "direct_connection_after_a_closed_service_flow_from_the_same_port_is_not_rewritten",
            web(1),
            vec![
                from_pod("SYN to the VIP -> A", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("FIN", &fin)
                    .nat(
                        &fin.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
                reply_fin_step(),
                from_pod(
                    "SYN from the same port straight to A: the closed flow gives way",
                    &dsyn,
                )
                .pass(R::REASON_FLOW_REPLACED),
                to_pod("A's SYN-ACK keeps A as its source", &dsynack).pass(R::REASON_DIRECT),
            ],
            Expect {
                ct: vec![Ct::direct(rev_a, SYN, SYN | ACK)],
                svc: vec![(SVC, count(2, len(&syn) + len(&fin)))],
                ..Default::default()
            },
        ),
        case(
            "direct_connection_while_the_service_flow_is_live_gets_a_translated_port",
            web(1),
            vec![
                from_pod("SYN to the VIP -> A", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                to_pod("A's SYN-ACK (service flow)", &synack).nat(
                    &synack.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                from_pod("SYN from the same port straight to A", &dsyn).nat(
                    &dsyn.clone().with_src(CLIENT, XPORT),
                    R::REASON_DIRECT_XLATE_NEW,
                ),
                to_pod(
                    "A answers the direct flow at the translated port",
                    &dsynack.clone().with_dst(CLIENT, XPORT),
                )
                .nat(&dsynack.clone().towards_pod(), R::REASON_XLATE),
                from_pod("direct data", &ddata)
                    .nat(&ddata.clone().with_src(CLIENT, XPORT), R::REASON_XLATE),
                to_pod("the service flow's reply still comes from the VIP", &synack).nat(
                    &synack.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN),
                    Ct::rev(rev_a, FE, SVC, SYN | ACK),
                    Ct::xlate_fwd(tuple(C, BE_A, TCP), XPORT, SYN | ACK),
                    Ct::xlate_rev(x_rev, CPORT, SYN | ACK),
                ],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "service_flow_while_a_direct_connection_is_live_gets_a_translated_port",
            web(1),
            vec![
                from_pod("SYN straight to A", &dsyn).pass(R::REASON_DIRECT_NEW),
                to_pod("A's SYN-ACK", &dsynack).pass(R::REASON_DIRECT),
                from_pod("SYN from the same port to the VIP -> A", &syn)
                    .nat(
                        &syn_out.clone().with_src(CLIENT, XPORT),
                        R::REASON_NAT_NEW_XLATE,
                    )
                    .svc(SVC),
                to_pod(
                    "A answers the service flow",
                    &synack.clone().with_dst(CLIENT, XPORT),
                )
                .nat(
                    &synack.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
                to_pod("A's direct traffic is untouched", &dsynack).pass(R::REASON_DIRECT),
            ],
            Expect {
                ct: vec![
                    Ct::direct(rev_a, SYN, SYN | ACK),
                    Ct::fwd(fwd, BE_A, SVC, SYN).xlated(XPORT),
                    Ct::rev(x_rev, FE, SVC, SYN | ACK).xlated(CPORT),
                ],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "service_flow_over_a_reset_direct_connection_takes_its_tuple",
            web(1),
            vec![
                from_pod("SYN straight to A", &dsyn).pass(R::REASON_DIRECT_NEW),
                to_pod("A resets it", &drst).pass(R::REASON_DIRECT),
                from_pod("SYN from the same port to the VIP -> A", &syn)
                    .nat(&syn_out, R::REASON_FLOW_REPLACED)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![Ct::fwd(fwd, BE_A, SVC, SYN), Ct::rev(rev_a, FE, SVC, 0)],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_syn_to_an_idle_direct_connection_reuses_its_entry",
            web(1),
            vec![
                from_pod("SYN straight to A", &dsyn).pass(R::REASON_DIRECT_NEW),
                to_pod("A resets it", &drst).pass(R::REASON_DIRECT),
                from_pod("a new SYN on the same tuple", &dsyn).pass(R::REASON_DIRECT_NEW),
            ],
            Expect {
                ct: vec![Ct::direct(rev_a, SYN, 0)],
                ..Default::default()
            },
        ),
        case(
            "udp_direct_datagram_while_a_service_flow_is_live_gets_a_translated_port",
            dns(),
            vec![
                from_pod("query to the VIP", &q)
                    .nat(&q.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                from_pod("datagram from the same port straight to the backend", &dq).nat(
                    &dq.clone().with_src(CLIENT, XPORT),
                    R::REASON_DIRECT_XLATE_NEW,
                ),
                to_pod(
                    "its answer, at the translated port",
                    &da.clone().with_dst(CLIENT, XPORT),
                )
                .nat(&da.clone().towards_pod(), R::REASON_XLATE),
                from_pod("the next datagram", &dq)
                    .nat(&dq.clone().with_src(CLIENT, XPORT), R::REASON_XLATE),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0),
                    Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0),
                    Ct::xlate_fwd(tuple(C, BE_DNS, UDP), XPORT, 0),
                    Ct::xlate_rev(tuple(BE_DNS, (CLIENT, XPORT), UDP), CPORT, 0).replied(),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "udp_service_flow_over_an_idle_direct_flow_takes_its_tuple",
            dns(),
            vec![
                from_pod("a direct datagram", &dq).pass(R::REASON_DIRECT_NEW),
                from_pod("query to the VIP, the direct flow idle for 40 s", &q)
                    .before(vec![Setup::AgeCt(tuple(BE_DNS, C, UDP), Age::Secs(40))])
                    .nat(
                        &q.clone().with_dst(BE_DNS.0, BE_DNS.1),
                        R::REASON_FLOW_REPLACED,
                    )
                    .svc(DNS_SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0),
                    Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "udp_service_flow_while_a_direct_flow_is_live_gets_a_translated_port",
            dns(),
            vec![
                from_pod("a direct datagram", &dq).pass(R::REASON_DIRECT_NEW),
                from_pod("query to the VIP from the same port", &q)
                    .nat(
                        &q.clone()
                            .with_src(CLIENT, XPORT)
                            .with_dst(BE_DNS.0, BE_DNS.1),
                        R::REASON_NAT_NEW_XLATE,
                    )
                    .svc(DNS_SVC),
            ],
            Expect {
                ct: vec![
                    Ct::direct(tuple(BE_DNS, C, UDP), SEEN as u8, 0),
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0).xlated(XPORT),
                    Ct::rev(tuple(BE_DNS, (CLIENT, XPORT), UDP), DNS_FE, DNS_SVC, 0).xlated(CPORT),
                ],
                svc: vec![(DNS_SVC, count(1, len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "no_free_translated_port_drops_the_new_flow",
            [
                web(1),
                vec![Setup::PutCt(Ct::direct(x_rev, SYN, SYN | ACK), Age::Fresh)],
            ]
            .concat(),
            vec![
                from_pod("SYN straight to A", &dsyn).pass(R::REASON_DIRECT_NEW),
                from_pod(
                    "SYN to the VIP from the same port: XPORT is taken too",
                    &syn,
                )
                .drop(R::REASON_DROP_CT_COLLISION),
            ],
            Expect {
                ct: vec![
                    Ct::direct(rev_a, SYN, 0),
                    Ct::direct(x_rev, SYN, SYN | ACK).ts(Ts::Old),
                ],
                ..Default::default()
            },
        ),
        case(
            "icmp_error_about_a_translated_direct_flow_quotes_the_clients_port",
            web(1),
            vec![
                from_pod("SYN to the VIP -> A", &syn)
                    .nat(&syn_out, R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("SYN from the same port straight to A", &dsyn).nat(
                    &dsyn.clone().with_src(CLIENT, XPORT),
                    R::REASON_DIRECT_XLATE_NEW,
                ),
                to_pod_raw(
                    "A's port unreachable about the translated SYN",
                    dsyn.clone().with_src(CLIENT, XPORT).host_port_unreachable(),
                )
                .nat_bytes(dsyn.host_port_unreachable(), R::REASON_REV_NAT_ICMP),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN),
                    Ct::rev(rev_a, FE, SVC, 0),
                    Ct::xlate_fwd(tuple(C, BE_A, TCP), XPORT, SYN),
                    Ct::xlate_rev(x_rev, CPORT, 0),
                ],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
    ]
}

/// A flow with one leg missing (LRU evicted it, a crash left it): never an un-NATed reply.
fn half_flow_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let ack = Pkt::tcp(C, FE, ACK | PSH);
    let reply = Pkt::tcp(BE_A, C, ACK | PSH);
    let fwd = tuple(C, FE, TCP);
    let rev_a = tuple(BE_A, C, TCP);
    vec![
        case(
            "a_forward_leg_without_its_reply_leg_repairs_it_before_any_reply",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("data after the reply leg was evicted", &ack)
                    .before(vec![Setup::DelCt(rev_a)])
                    .nat(&ack.clone().with_dst(BE_A.0, BE_A.1), R::REASON_CT_REPAIRED)
                    .svc(SVC),
                to_pod("the reply is reverse-NATed", &reply).nat(
                    &reply.clone().with_src(VIP, VPORT).towards_pod(),
                    R::REASON_REV_NAT,
                ),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(fwd, BE_A, SVC, SYN | ACK),
                    Ct::rev(rev_a, FE, SVC, ACK),
                ],
                svc: vec![(SVC, count(2, len(&syn) + len(&ack)))],
                ..Default::default()
            },
        ),
        case(
            "a_reply_leg_without_its_forward_leg_is_the_flows_own_when_its_backend_is_picked",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("data after the forward leg was evicted", &ack)
                    .before(vec![Setup::DelCt(fwd)])
                    .nat(&ack.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
            ],
            Expect {
                ct: vec![Ct::fwd(fwd, BE_A, SVC, ACK), Ct::rev(rev_a, FE, SVC, 0)],
                svc: vec![(SVC, count(2, len(&syn) + len(&ack)))],
                ..Default::default()
            },
        ),
    ]
}

/// Endpoint changes as kube-proxy handles them: TCP flows finish, UDP flows move on.
fn endpoint_change_cases() -> Vec<Case> {
    let q = Pkt::udp(C, DNS_FE, b"query");
    let be_dns2 = (Ipv4Addr::new(10, 0, 3, 9), 5353);
    let ack = Pkt::tcp(C, FE, ACK | PSH);
    let syn = Pkt::tcp(C, FE, SYN);
    let left = |svc, addr| Setup::Member {
        svc,
        addr,
        present: false,
    };
    vec![
        case(
            "udp_flow_to_a_backend_that_left_its_set_moves_to_another",
            dns(),
            vec![
                from_pod("query", &q)
                    .nat(&q.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                from_pod("next query: the backend left, the generation changed", &q)
                    .before(vec![
                        left(DNS_SVC, BE_DNS),
                        be(DNS_SVC, 0, be_dns2),
                        Setup::Gen {
                            vip: DNS_VIP,
                            port: DNS_PORT,
                            proto: UDP,
                            gen: 1,
                        },
                    ])
                    .nat(
                        &q.clone().with_dst(be_dns2.0, be_dns2.1),
                        R::REASON_UDP_REBALANCED,
                    )
                    .svc(DNS_SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), be_dns2, DNS_SVC, 0).gen(1),
                    Ct::rev(tuple(be_dns2, C, UDP), DNS_FE, DNS_SVC, 0).gen(1),
                ],
                svc: vec![(DNS_SVC, count(2, 2 * len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "udp_flow_whose_backend_is_still_a_member_keeps_it_across_a_generation_change",
            dns(),
            vec![
                from_pod("query", &q)
                    .nat(&q.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                from_pod("next query: another backend left (gen 1)", &q)
                    .before(vec![Setup::Gen {
                        vip: DNS_VIP,
                        port: DNS_PORT,
                        proto: UDP,
                        gen: 1,
                    }])
                    .nat(
                        &q.clone().with_dst(BE_DNS.0, BE_DNS.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(DNS_SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, DNS_FE, UDP), BE_DNS, DNS_SVC, 0).gen(1),
                    Ct::rev(tuple(BE_DNS, C, UDP), DNS_FE, DNS_SVC, 0),
                ],
                svc: vec![(DNS_SVC, count(2, 2 * len(&q)))],
                ..Default::default()
            },
        ),
        case(
            "tcp_flow_to_a_backend_that_left_its_set_keeps_it",
            web(1),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("data: A left, slot 0 is B, gen 1", &ack)
                    .before(vec![
                        left(SVC, BE_A),
                        be(SVC, 0, BE_B),
                        Setup::Gen {
                            vip: VIP,
                            port: VPORT,
                            proto: TCP,
                            gen: 1,
                        },
                    ])
                    .nat(
                        &ack.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    )
                    .svc(SVC),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN | ACK),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                svc: vec![(SVC, count(2, len(&syn) + len(&ack)))],
                ..Default::default()
            },
        ),
        case(
            "affinity_to_a_backend_that_left_its_set_is_not_used",
            vec![
                Setup::Frontend {
                    vip: VIP,
                    port: VPORT,
                    proto: TCP,
                    svc: SVC,
                    count: 1,
                    flags: AFF,
                    timeout: AFF_TIMEOUT,
                },
                be(SVC, 0, BE_A),
                Setup::Affinity {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_B,
                    age: Age::Secs(5),
                },
            ],
            vec![from_pod("new flow; the remembered B is no member", &syn)
                .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                .svc(SVC)],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                aff: vec![Aff {
                    client: CLIENT,
                    svc: SVC,
                    backend: BE_A,
                    used: true,
                }],
                svc: vec![(SVC, count(1, len(&syn)))],
                ..Default::default()
            },
        ),
        case(
            "a_deleted_frontends_tcp_flow_keeps_its_backend_and_its_udp_flow_ends",
            [web(1), dns()].concat(),
            vec![
                from_pod("SYN", &syn)
                    .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                    .svc(SVC),
                from_pod("query", &q)
                    .nat(&q.clone().with_dst(BE_DNS.0, BE_DNS.1), R::REASON_NAT_NEW)
                    .svc(DNS_SVC),
                from_pod("data after the web Service was deleted", &ack)
                    .before(vec![
                        Setup::DelFrontend(VIP, VPORT, TCP),
                        Setup::DelFrontend(DNS_VIP, DNS_PORT, UDP),
                    ])
                    .nat(
                        &ack.clone().with_dst(BE_A.0, BE_A.1),
                        R::REASON_NAT_ESTABLISHED,
                    ),
                from_pod("a query after the DNS Service was deleted", &q).pass(R::REASON_PASS),
            ],
            Expect {
                ct: vec![
                    Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN | ACK),
                    Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
                ],
                svc: vec![(SVC, count(1, len(&syn))), (DNS_SVC, count(1, len(&q)))],
                ..Default::default()
            },
        ),
    ]
}

/// A pod may only send from its own address.
fn source_check_cases() -> Vec<Case> {
    let syn = Pkt::tcp(C, FE, SYN);
    let forged = Pkt::tcp((CLIENT2, CPORT), FE, SYN);
    let forged_reply = Pkt::tcp((CLIENT2, 8080), (OTHER, 40001), SYN | ACK);
    vec![case(
        "a_pod_sending_from_another_address_is_dropped",
        [web(1), vec![Setup::PodAddr(CLIENT)]].concat(),
        vec![
            from_pod("SYN from another pod's address", &forged).drop(R::REASON_DROP_SPOOFED),
            from_pod("a forged segment to plant a flow", &forged_reply)
                .drop(R::REASON_DROP_SPOOFED),
            from_pod_raw("ARP is not checked", arp_frame()).pass(R::REASON_PASS_NON_IPV4),
            from_pod("SYN from its own address", &syn)
                .nat(&syn.clone().with_dst(BE_A.0, BE_A.1), R::REASON_NAT_NEW)
                .svc(SVC),
            to_pod(
                "packets to the pod are not checked",
                &Pkt::tcp((OTHER, 80), (CLIENT2, 9), ACK),
            )
            .pass(R::REASON_PASS),
        ],
        Expect {
            ct: vec![
                Ct::fwd(tuple(C, FE, TCP), BE_A, SVC, SYN),
                Ct::rev(tuple(BE_A, C, TCP), FE, SVC, 0),
            ],
            svc: vec![(SVC, count(1, len(&syn)))],
            pod: Some(PodCount {
                tx_packets: 4,
                tx_bytes: len(&forged) + len(&forged_reply) + arp_frame().len() as u64 + len(&syn),
                rx_packets: 1,
                rx_bytes: len(&Pkt::tcp((OTHER, 80), (CLIENT2, 9), ACK)),
            }),
            ..Default::default()
        },
    )]
}

// ---------------------------------------------------------------------------------------------
// Tests.

/// Every case of the table, each on its own freshly loaded skeleton; all failures reported.
#[test]
fn table() {
    let _g = shared();
    require_root();
    let cases = cases();
    let names: BTreeSet<_> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len(), "case names must be unique");
    let mut failed = vec![];
    for c in &cases {
        match catch_unwind(AssertUnwindSafe(|| run_case(c))) {
            Ok(()) => println!("ok    {}", c.name),
            Err(_) => {
                println!("FAIL  {}", c.name);
                failed.push(c.name);
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} cases failed: {failed:?}",
        failed.len(),
        cases.len()
    );
}

/// IPv4 frames shorter than Ethernet + 20 bytes: the parser drops them as truncated. Kernel 6.18's
/// PROG_TEST_RUN refuses such frames itself (EINVAL), so on such kernels this only checks the
/// refusal; where the kernel runs them, the verdict and reason must be right.
#[test]
fn ipv4_header_cut_within_20_bytes() {
    let _g = shared();
    let dp = Dp::load();
    for (prog, frame) in [
        (Prog::FromPod, Pkt::tcp(C, FE, SYN).bytes()),
        (Prog::ToPod, Pkt::tcp(BE_A, C, ACK).towards_pod().bytes()),
    ] {
        for n in [14usize, 15, 24, 33] {
            let p = match prog {
                Prog::FromPod => &dp.skel.progs.from_pod,
                Prog::ToPod => &dp.skel.progs.to_pod,
            };
            let mut buf = vec![0u8; 128];
            let before = dp.reasons()[R::REASON_DROP_TRUNCATED.0 as usize].packets;
            let input = libbpf_rs::ProgramInput {
                data_in: Some(&frame[..n]),
                data_out: Some(&mut buf),
                ..Default::default()
            };
            match p.test_run(input) {
                Ok(out) => {
                    assert_eq!(out.return_value, TC_ACT_SHOT, "{prog:?} {n}-byte frame");
                    assert_eq!(
                        dp.reasons()[R::REASON_DROP_TRUNCATED.0 as usize].packets,
                        before + 1,
                        "{prog:?} {n}-byte frame"
                    );
                }
                Err(e) => {
                    assert_eq!(
                        e.kind(),
                        libbpf_rs::ErrorKind::InvalidInput,
                        "{prog:?} {n}-byte frame: {e}"
                    );
                    println!(
                        "{prog:?}: the kernel refuses a {n}-byte IPv4 frame in PROG_TEST_RUN ({e})"
                    );
                }
            }
        }
    }
}

/// The independent checksum check itself: it accepts what etherparse builds and rejects a frame
/// with any one byte of its IP header or L4 segment changed.
#[test]
fn checksum_verifier_catches_corruption() {
    for p in [
        Pkt::tcp(C, FE, ACK | PSH),
        Pkt::udp(C, DNS_FE, b"payload").with_options(&[1, 1, 1, 0]),
        Pkt::udp(C, DNS_FE, b"odd"),
    ] {
        let good = p.bytes();
        verify_checksums(&good, "good frame");
        for i in 14..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(
                check_checksums(&bad).is_err(),
                "flipping byte {i} of {p:?} went unnoticed"
            );
        }
    }
    let icmp = Pkt::tcp(C, FE, SYN).port_unreachable();
    assert_eq!(verify_checksums(&icmp, "ICMP"), Checked::Icmp);
}

/// Where a rewritten frame is addressed to (IP destination and TCP/UDP destination port).
fn dst_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    let ihl = (frame[14] & 0xf) as usize * 4;
    let ip = Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]);
    let port = u16::from_be_bytes([frame[14 + ihl + 2], frame[14 + ihl + 3]]);
    (ip, port)
}

fn backends(n: u8) -> Vec<(Ipv4Addr, u16)> {
    (0..n)
        .map(|i| (Ipv4Addr::new(10, 0, 4, 10 + i), 8000 + i as u16))
        .collect()
}

/// Uniform random choice: 400 new flows over 4 slots reach every backend, each flow's conntrack
/// pair matches the rewritten packet.
#[test]
fn random_backend_choice_uses_every_slot() {
    let _g = shared();
    let dp = Dp::load();
    let bes = backends(4);
    dp.frontend(VIP, VPORT, TCP, SVC, 4, 0, 0);
    for (i, b) in bes.iter().enumerate() {
        dp.backend(SVC, i as u32, b.0, b.1);
    }
    let mut hits: BTreeMap<(Ipv4Addr, u16), u32> = BTreeMap::new();
    for i in 0..400u16 {
        let syn = Pkt::tcp((CLIENT, 20000 + i), FE, SYN);
        let r = dp.run(Prog::FromPod, &syn.bytes(), 1);
        assert_eq!(r.verdict, TC_ACT_OK);
        let b = dst_of(&r.out);
        assert!(bes.contains(&b), "flow {i} sent to {b:?}, not a backend");
        assert_eq!(
            r.out,
            syn.clone().with_dst(b.0, b.1).bytes(),
            "flow {i}: output bytes"
        );
        verify_checksums(&r.out, "random flow");
        *hits.entry(b).or_default() += 1;
        let fwd = dp
            .ct_get(tuple((CLIENT, 20000 + i), FE, TCP))
            .expect("forward entry");
        assert_eq!((ip_of(fwd.nat_daddr), u16::from_be(fwd.nat_dport)), b);
        let rev = dp
            .ct_get(tuple(b, (CLIENT, 20000 + i), TCP))
            .expect("reverse entry");
        assert_eq!((ip_of(rev.nat_saddr), u16::from_be(rev.nat_sport)), FE);
    }
    println!("400 flows over 4 backends: {hits:?}");
    assert_eq!(hits.len(), 4, "every backend gets flows: {hits:?}");
    assert!(
        hits.values().all(|&n| n >= 40),
        "roughly uniform (expected ~100 each): {hits:?}"
    );
    assert_eq!(dp.ct_len(), 800);
    assert_eq!(dp.reasons()[R::REASON_NAT_NEW.0 as usize].packets, 400);
}

/// sessionAffinity with a random first pick: every later flow of the client follows it.
#[test]
fn affinity_sticks_across_random_picks() {
    let _g = shared();
    let dp = Dp::load();
    let bes = backends(3);
    dp.frontend(VIP, VPORT, TCP, SVC, 3, AFF, AFF_TIMEOUT);
    for (i, b) in bes.iter().enumerate() {
        dp.backend(SVC, i as u32, b.0, b.1);
    }
    let first = dst_of(
        &dp.run(
            Prog::FromPod,
            &Pkt::tcp((CLIENT, 30000), FE, SYN).bytes(),
            1,
        )
        .out,
    );
    for i in 1..30u16 {
        let r = dp.run(
            Prog::FromPod,
            &Pkt::tcp((CLIENT, 30000 + i), FE, SYN).bytes(),
            1,
        );
        assert_eq!(dst_of(&r.out), first, "flow {i} of the same client");
    }
    let rs = dp.reasons();
    assert_eq!(
        (
            rs[R::REASON_NAT_NEW.0 as usize].packets,
            rs[R::REASON_AFFINITY_HIT.0 as usize].packets
        ),
        (1, 29)
    );
    let aff = dp.aff_raw();
    assert_eq!(aff.len(), 1);
    assert_eq!(aff[0].0.backend, first);
}

// ---------------------------------------------------------------------------------------------
// Timing.

struct Timing {
    what: &'static str,
    how: String,
    ns: f64,
}

fn avg_ns(d: &[Duration]) -> f64 {
    d.iter().map(|d| d.as_nanos() as f64).sum::<f64>() / d.len() as f64
}

fn median_ns(d: &[Duration]) -> f64 {
    let mut v: Vec<u128> = d.iter().map(|d| d.as_nanos()).collect();
    v.sort();
    v[v.len() / 2] as f64
}

/// PROG_TEST_RUN ns/packet. Asserts what the packets did, never how long they took.
///
/// A repeated run (`repeat` > 1) re-runs the program on the same skb, which the first run
/// rewrote: a DNATed packet no longer goes to the VIP, so after run 1 the rest measure
/// non-service traffic (shown below). The established and reverse-NAT figures with `repeat`
/// therefore use two frontends that are each other's backend: every run rewrites the packet
/// into one that hits the other flow, so all runs are real CT-hit rewrites.
#[test]
fn prog_test_run_timing() {
    let _g = EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner());
    let dp = Dp::load();
    const N: u16 = 5000;
    const REPEAT: u32 = 100_000;
    let bes = backends(4);
    dp.frontend(VIP, VPORT, TCP, SVC, 4, 0, 0);
    for (i, b) in bes.iter().enumerate() {
        dp.backend(SVC, i as u32, b.0, b.1);
    }
    dp.pod_entry(POD_IFINDEX, Ipv4Addr::UNSPECIFIED);
    let reason = |r: R| dp.reasons()[r.0 as usize].packets;
    let mut out = vec![];

    // New flows: a fresh 5-tuple per run.
    let before = reason(R::REASON_NAT_NEW);
    let mut chosen = vec![];
    let mut d = vec![];
    for i in 0..N {
        let r = dp.run(
            Prog::FromPod,
            &Pkt::tcp((CLIENT, 10000 + i), FE, SYN).bytes(),
            1,
        );
        assert_eq!(r.verdict, TC_ACT_OK);
        chosen.push(dst_of(&r.out));
        d.push(r.duration);
    }
    assert_eq!(reason(R::REASON_NAT_NEW) - before, N as u64);
    assert_eq!(dp.ct_len(), 2 * N as usize);
    out.push(Timing {
        what: "from_pod new TCP flow (SYN, 4 backends)",
        how: format!("{N} runs x repeat=1, mean"),
        ns: avg_ns(&d),
    });
    out.push(Timing {
        what: "from_pod new TCP flow (SYN, 4 backends)",
        how: format!("{N} runs x repeat=1, median"),
        ns: median_ns(&d),
    });

    // Established flows, one run each.
    let before = reason(R::REASON_NAT_ESTABLISHED);
    let mut d = vec![];
    for i in 0..N {
        let r = dp.run(
            Prog::FromPod,
            &Pkt::tcp((CLIENT, 10000 + i), FE, ACK | PSH).bytes(),
            1,
        );
        assert_eq!(dst_of(&r.out), chosen[i as usize]);
        d.push(r.duration);
    }
    assert_eq!(reason(R::REASON_NAT_ESTABLISHED) - before, N as u64);
    out.push(Timing {
        what: "from_pod established TCP (CT hit, DNAT)",
        how: format!("{N} runs x repeat=1, mean"),
        ns: avg_ns(&d),
    });
    out.push(Timing {
        what: "from_pod established TCP (CT hit, DNAT)",
        how: format!("{N} runs x repeat=1, median"),
        ns: median_ns(&d),
    });

    // Replies, one run each.
    let before = reason(R::REASON_REV_NAT);
    let mut d = vec![];
    for i in 0..N {
        let b = chosen[i as usize];
        let r = dp.run(
            Prog::ToPod,
            &Pkt::tcp(b, (CLIENT, 10000 + i), ACK | PSH)
                .towards_pod()
                .bytes(),
            1,
        );
        assert_eq!(&r.out[26..30], &VIP.octets());
        d.push(r.duration);
    }
    assert_eq!(reason(R::REASON_REV_NAT) - before, N as u64);
    out.push(Timing {
        what: "to_pod reply (CT hit, reverse NAT)",
        how: format!("{N} runs x repeat=1, mean"),
        ns: avg_ns(&d),
    });

    // Non-service traffic, one run each (the repeat=1 baseline).
    let other = Pkt::tcp(C, (OTHER, 443), ACK | PSH).bytes();
    let d: Vec<Duration> = (0..N)
        .map(|_| dp.run(Prog::FromPod, &other, 1).duration)
        .collect();
    out.push(Timing {
        what: "from_pod non-service TCP (one lookup)",
        how: format!("{N} runs x repeat=1, mean"),
        ns: avg_ns(&d),
    });

    // The pitfall: repeat on a DNATed packet measures one DNAT and then non-service passes.
    let (est, pass) = (reason(R::REASON_NAT_ESTABLISHED), reason(R::REASON_PASS));
    let r = dp.run(
        Prog::FromPod,
        &Pkt::tcp((CLIENT, 10000), FE, ACK | PSH).bytes(),
        REPEAT,
    );
    assert_eq!(
        reason(R::REASON_NAT_ESTABLISHED) - est,
        1,
        "only the first repeated run sees the VIP"
    );
    assert_eq!(reason(R::REASON_PASS) - pass, REPEAT as u64 - 1);
    out.push(Timing {
        what: "(naive) established packet, repeat: 1 DNAT + non-service",
        how: format!("repeat={REPEAT}"),
        ns: r.duration.as_nanos() as f64,
    });

    // Established DNAT with repeat: F1 -> backend F2 and F2 -> backend F1, both flows set up.
    let f1 = (Ipv4Addr::new(10, 96, 1, 1), 80);
    let f2 = (Ipv4Addr::new(10, 96, 1, 2), 81);
    dp.frontend(f1.0, f1.1, TCP, 3, 1, 0, 0);
    dp.backend(3, 0, f2.0, f2.1);
    dp.frontend(f2.0, f2.1, TCP, 4, 1, 0, 0);
    dp.backend(4, 0, f1.0, f1.1);
    let c = (CLIENT, 50000);
    let r1 = dp.run(Prog::FromPod, &Pkt::tcp(c, f1, SYN).bytes(), 1);
    assert_eq!(dst_of(&r1.out), f2);
    let r2 = dp.run(Prog::FromPod, &r1.out, 1);
    assert_eq!(dst_of(&r2.out), f1);
    let (est, s3, s4) = (
        reason(R::REASON_NAT_ESTABLISHED),
        dp.svc_counter(3).packets,
        dp.svc_counter(4).packets,
    );
    let r = dp.run(Prog::FromPod, &Pkt::tcp(c, f1, ACK | PSH).bytes(), REPEAT);
    assert_eq!(
        reason(R::REASON_NAT_ESTABLISHED) - est,
        REPEAT as u64,
        "every repeated run is a CT hit"
    );
    assert_eq!(
        (
            dp.svc_counter(3).packets - s3,
            dp.svc_counter(4).packets - s4
        ),
        (REPEAT as u64 / 2, REPEAT as u64 / 2)
    );
    assert_eq!(dst_of(&r.out), f1, "an even number of rewrites");
    verify_checksums(&r.out, "flip-flop DNAT");
    out.push(Timing {
        what: "from_pod established TCP (CT hit, DNAT)",
        how: format!("repeat={REPEAT}, 2 flows in turn"),
        ns: r.duration.as_nanos() as f64,
    });

    // Reverse NAT with repeat: the two reverse entries (F2 -> c) => F1 and (F1 -> c) => F2.
    let rev = reason(R::REASON_REV_NAT);
    let r = dp.run(
        Prog::ToPod,
        &Pkt::tcp(f2, c, ACK | PSH).towards_pod().bytes(),
        REPEAT,
    );
    assert_eq!(
        reason(R::REASON_REV_NAT) - rev,
        REPEAT as u64,
        "every repeated run is a CT hit"
    );
    verify_checksums(&r.out, "flip-flop reverse NAT");
    out.push(Timing {
        what: "to_pod reply (CT hit, reverse NAT)",
        how: format!("repeat={REPEAT}, 2 flows in turn"),
        ns: r.duration.as_nanos() as f64,
    });

    // Non-service traffic with repeat (untouched, so every run is the same).
    for (prog, what, pkt) in [
        (
            Prog::FromPod,
            "from_pod non-service TCP (one lookup)",
            other.clone(),
        ),
        (
            Prog::ToPod,
            "to_pod non-service TCP (one CT lookup)",
            Pkt::tcp((OTHER, 443), C, ACK).towards_pod().bytes(),
        ),
        (Prog::FromPod, "from_pod ARP (not IPv4)", arp_frame()),
    ] {
        let r = dp.run(prog, &pkt, REPEAT);
        assert_eq!(r.verdict, TC_ACT_OK);
        assert_eq!(r.out, pkt);
        out.push(Timing {
            what,
            how: format!("repeat={REPEAT}"),
            ns: r.duration.as_nanos() as f64,
        });
    }

    // Rejects, one run each (the packet becomes an ICMP error).
    dp.frontend(VIP, 8081, TCP, 5, 0, 0, 0);
    let syn = Pkt::tcp(C, (VIP, 8081), SYN);
    let want = syn.port_unreachable();
    let d: Vec<Duration> = (0..N)
        .map(|_| {
            let r = dp.run(Prog::FromPod, &syn.bytes(), 1);
            assert_eq!((r.verdict, &r.out), (TC_ACT_REDIRECT, &want));
            r.duration
        })
        .collect();
    out.push(Timing {
        what: "from_pod no backend -> ICMP port unreachable",
        how: format!("{N} runs x repeat=1, mean"),
        ns: avg_ns(&d),
    });

    println!(
        "\nPROG_TEST_RUN ns/packet ({} possible CPUs, kernel {}):",
        libbpf_rs::num_possible_cpus().unwrap(),
        kernel()
    );
    for t in &out {
        println!("  {:>8.1} ns  {:<58} {}", t.ns, t.what, t.how);
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
