//! The differential loop: generate a scenario's state, write it to the real maps, send its
//! packets through the real program and the model, compare everything, adopt the real choices,
//! and report any disagreement with all it takes to reproduce it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Instant;

use super::gen::{Gen, Packet};
use super::model::{self, *};
use super::net::*;
use super::target::{Counters, Target, SVC_IDS};
use crate::bpf_common::{mono_coarse_ns, mono_ns};

/// At most this many outcomes per packet (the model's choices multiply).
const MAX_OUTCOMES: usize = 4096;

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub packets: u64,
    pub disagreements: u64,
    pub scenarios: u64,
    /// Packet number (1-based) of the first disagreement.
    pub first_at: Option<u64>,
    /// Packets whose decision depended on where the clock fell (both outcomes allowed).
    pub clock_ambiguous: u64,
    /// Real reasons seen, by reason.
    pub reasons: BTreeMap<u32, u64>,
    pub seconds: f64,
    /// Disagreements the control did not share (all of them without a control).
    pub catches: u64,
    pub first_catch_at: Option<u64>,
    /// Frames BPF_PROG_TEST_RUN refused to run (not counted as packets).
    pub refused: u64,
    /// How often each rule of the model (its trace lines, numbers and addresses elided) was
    /// part of an outcome that matched the real one.
    pub coverage: BTreeMap<String, u64>,
    /// By (set count, slot): new flows in which that slot was distinguishable, and in which it
    /// was then chosen; translated ports chosen.
    pub slot_chances: BTreeMap<(u32, u32), u64>,
    pub slots: BTreeMap<(u32, u32), u64>,
    pub ports: BTreeMap<u32, u64>,
    /// Translation collisions: observed, and expected from the free ports of each attempt
    /// (8 uniform tries miss every free port with probability (taken/range)^8).
    pub collisions: u64,
    pub expected_collisions: f64,
    /// The reports, as printed.
    pub reports: Vec<String>,
}

impl Stats {
    pub fn rate(&self) -> f64 {
        self.packets as f64 / self.seconds.max(1e-9)
    }
    pub fn reason_table(&self) -> String {
        let mut s = String::new();
        for (r, n) in &self.reasons {
            let _ = write!(s, "{}={n} ", model::reason_str(*r));
        }
        s
    }
}

pub struct Options<'a> {
    pub seed: u64,
    pub packets: u64,
    /// Stop at the first disagreement.
    pub stop_at_first: bool,
    /// Print reports as they come (else only kept in Stats).
    pub print: bool,
    /// Start at this scenario (to replay one).
    pub first_scenario: u64,
    /// Print a progress line every this many packets (0 = never).
    pub progress: u64,
    /// Packet classes not to generate, to look past a known disagreement while exploring
    /// (FUZZ_AVOID; never set in CI): "icmp-trailer" = ICMP with bytes after its IP total length.
    pub avoid: Vec<String>,
    /// For a broken variant: the unmodified program. A disagreement is a catch only if the
    /// control, given the same state and packet, agrees with the model.
    pub control: Option<&'a Target>,
}

/// Whether a generated packet is in a class the run was told to avoid.
fn avoided(o: &Options, f: &[u8]) -> bool {
    let ipv4 = f.len() >= ETH + 20 && get16(f, 12) == 0x0800;
    o.avoid.iter().any(|a| match a.as_str() {
        "icmp-trailer" => ipv4 && f[ETH + 9] == ICMP && f.len() > ETH + get16(f, ETH + 2) as usize,
        other => panic!("FUZZ_AVOID: unknown class {other}"),
    })
}

/// What the real program did to one packet.
struct Real {
    verdict: u32,
    out: Vec<u8>,
    /// Reasons whose counters moved: (reason, packets, bytes).
    moved: Vec<(u32, u64, u64)>,
    svc: Vec<(u32, u64, u64)>,
    pod: Option<[u64; 4]>,
    st: State,
}

/// One packet through the real program: what it did, and the clock interval it ran in; None
/// when BPF_PROG_TEST_RUN refused the frame.
fn step(
    t: &Target,
    pkt: &Packet,
    before: &State,
    counters: &mut Counters,
) -> Option<(Real, Clock, Vec<String>)> {
    let lo = mono_coarse_ns();
    let ran = t.run(pkt.prog, &pkt.frame);
    let hi = mono_ns();
    let (verdict, out) = match ran {
        Ok(x) => x,
        Err(errno) => {
            // BPF_PROG_TEST_RUN refuses some frames outright (nothing ran): only those whose IP
            // header is cut short may be refused.
            assert!(
                unrunnable(&pkt.frame),
                "BPF_PROG_TEST_RUN {:?} refused (errno {errno}) a frame it should run: {}",
                pkt.prog,
                hex(&pkt.frame)
            );
            return None;
        }
    };
    let after = t.counters();
    let mut st = before.clone();
    let mut notes = vec![];
    t.read_dynamic(&mut st, &mut notes);
    let real = Real {
        verdict,
        out,
        moved: moved(&counters.reasons, &after.reasons),
        svc: moved(&counters.svc, &after.svc),
        pod: pod_delta(counters, &after),
        st,
    };
    *counters = after;
    Some((real, Clock { lo, hi }, notes))
}

/// Writes a whole state into emptied maps and reads it back.
fn set_up(t: &Target, st: &State) -> State {
    t.clear();
    t.write(st);
    let mut back = st.clone();
    let mut notes = vec![];
    t.read_dynamic(&mut back, &mut notes);
    assert!(
        notes.is_empty() && same_dynamic(&back, st),
        "the maps do not hold what was written: {notes:?}"
    );
    back
}

/// The same packet and state through the control program: does the model agree with it?
fn control_agrees(c: &Target, pkt: &Packet, before: &State) -> bool {
    let st = set_up(c, before);
    let mut counters = c.counters();
    match step(c, pkt, &st, &mut counters) {
        None => false,
        Some((real, clk, notes)) => judge(&c.cfg, &pkt.prog, &pkt.frame, &st, clk, &real, &notes)
            .diff
            .is_none(),
    }
}

/// Whether `t` and the model disagree on this packet and state.
fn disagrees(t: &Target, pkt: &Packet, st: &State) -> bool {
    let before = set_up(t, st);
    let mut counters = t.counters();
    match step(t, pkt, &before, &mut counters) {
        None => false,
        Some((real, clk, notes)) => {
            judge(&t.cfg, &pkt.prog, &pkt.frame, &before, clk, &real, &notes)
                .diff
                .is_some()
        }
    }
}

/// The state with every record removed that the disagreement does not need (greedy, one
/// record at a time).
pub fn minimize(t: &Target, pkt: &Packet, st: &State) -> State {
    let mut cur = st.clone();
    macro_rules! shrink {
        ($field:ident) => {
            for k in cur.$field.clone().into_iter().map(|e| e.0) {
                let mut trial = cur.clone();
                trial.$field.remove(&k);
                if disagrees(t, pkt, &trial) {
                    cur = trial;
                }
            }
        };
    }
    shrink!(ct);
    shrink!(aff);
    shrink!(frag);
    shrink!(fe);
    shrink!(be);
    for m in cur.bm.clone() {
        let mut trial = cur.clone();
        trial.bm.remove(&m);
        if disagrees(t, pkt, &trial) {
            cur = trial;
        }
    }
    for v in cur.vip.clone() {
        let mut trial = cur.clone();
        trial.vip.remove(&v);
        if disagrees(t, pkt, &trial) {
            cur = trial;
        }
    }
    if cur.pod.is_some() {
        let mut trial = cur.clone();
        trial.pod = None;
        if disagrees(t, pkt, &trial) {
            cur = trial;
        }
    }
    cur
}

/// One packet against one state, on `t` and the model: the report, if they disagree.
pub fn check_one(t: &Target, pkt: &Packet, st: &State) -> Option<String> {
    let before = set_up(t, st);
    let mut counters = t.counters();
    let Some((real, clk, notes)) = step(t, pkt, &before, &mut counters) else {
        return Some("BPF_PROG_TEST_RUN refused the frame".into());
    };
    let j = judge(&t.cfg, &pkt.prog, &pkt.frame, &before, clk, &real, &notes);
    match j.diff {
        None => {
            println!("agreement: {}", j.trace.join(" / "));
            None
        }
        Some(d) => Some(report(t, 0, 0, 0, 1, pkt, &before, clk, &real, &d)),
    }
}

pub fn fuzz(t: &Target, o: &Options) -> Stats {
    let started = Instant::now();
    let mut stats = Stats::default();
    let cfg = t.cfg;
    let mut scenario = o.first_scenario;
    let mut distribution_reported = false;
    let mut next_distribution_check = 1000;
    'scenarios: while stats.packets < o.packets {
        let rng = Rng::derive(o.seed, scenario);
        let now = mono_ns();
        let mut g = Gen::new(rng, &cfg, now);
        let written = g.state(now);
        let mut st = set_up(t, &written);
        stats.scenarios += 1;
        // The pod's entry was just written anew: its counters start again.
        let mut counters = t.counters();
        let steps = g.rng.range(1, 40);
        for step_no in 0..steps {
            if stats.packets >= o.packets {
                break;
            }
            let mut pkt = g.packet(&st);
            while avoided(o, &pkt.frame) {
                pkt = g.packet(&st);
            }
            let before = st.clone();
            let Some((real, clk, notes)) = step(t, &pkt, &before, &mut counters) else {
                stats.refused += 1;
                continue;
            };
            stats.packets += 1;
            if let Some(&(r, _, _)) = real.moved.first() {
                *stats.reasons.entry(r).or_default() += 1;
            }
            let verdict = judge(&cfg, &pkt.prog, &pkt.frame, &before, clk, &real, &notes);
            if verdict.ambiguous {
                stats.clock_ambiguous += 1;
            }
            for line in &verdict.trace {
                *stats.coverage.entry(rule_of(line)).or_default() += 1;
            }
            for w in verdict.trace.windows(2) {
                let pair = format!("{} => {}", rule_of(&w[0]), rule_of(&w[1]));
                *stats.coverage.entry(pair).or_default() += 1;
            }
            let mut distinct = 0;
            for &(what, v, n) in &verdict.picks {
                match what {
                    "slots" => {
                        distinct = v;
                        for j in 0..n.min(32) {
                            if v & (1 << j) != 0 {
                                *stats.slot_chances.entry((n, j)).or_default() += 1;
                            }
                        }
                    }
                    "slot" if v < 32 && distinct & (1 << v) != 0 => {
                        *stats.slots.entry((n, v)).or_default() += 1
                    }
                    "slot" => {}
                    "port" => *stats.ports.entry(v).or_default() += 1,
                    "xlate" => {
                        stats.expected_collisions += ((n - v) as f64 / n as f64).powi(8);
                    }
                    _ => stats.collisions += 1,
                }
            }
            if let Some(diff) = verdict.diff {
                stats.disagreements += 1;
                stats.first_at.get_or_insert(stats.packets);
                let mut report = report(
                    t,
                    o.seed,
                    scenario,
                    step_no,
                    stats.packets,
                    &pkt,
                    &before,
                    clk,
                    &real,
                    &diff,
                );
                let caught = match o.control {
                    Some(c) => {
                        let agrees = control_agrees(c, &pkt, &before);
                        report.push_str(&format!(
                            "  control ({}): {}\n",
                            c.name,
                            if agrees {
                                "agrees with the model on this packet and state: a catch"
                            } else {
                                "disagrees too: not this variant's doing"
                            }
                        ));
                        agrees
                    }
                    None => true,
                };
                if o.control.is_none() && o.print {
                    let min = minimize(t, &pkt, &before);
                    report.push_str(&format!(
                        "  minimal reproduction (state records the disagreement does not need removed): FUZZ_REPRO='{}'\n",
                        super::repro::encode(pkt.prog, &pkt.frame, &min, mono_ns())
                    ));
                }
                if caught {
                    stats.catches += 1;
                    stats.first_catch_at.get_or_insert(stats.packets);
                }
                if o.print {
                    println!("{report}");
                }
                stats.reports.push(report);
                if o.stop_at_first && caught {
                    break 'scenarios;
                }
                // The state is no longer what the scenario meant: start the next one.
                scenario += 1;
                continue 'scenarios;
            }
            st = real.st;
            if o.progress > 0 && stats.packets % o.progress == 0 {
                println!(
                    "  {} packets, {} disagreements, {:.0} packets/s",
                    stats.packets,
                    stats.disagreements,
                    stats.packets as f64 / started.elapsed().as_secs_f64()
                );
            }
        }
        // The maps only userspace writes must be as written.
        let cfgmaps = t.read_config();
        if !same_config(&cfgmaps, &written) {
            stats.disagreements += 1;
            stats.catches += 1;
            stats.first_at.get_or_insert(stats.packets);
            stats.first_catch_at.get_or_insert(stats.packets);
            let r = format!(
                "DISAGREEMENT seed {:#x} scenario {scenario}: a program changed a map only userspace writes\n  written: {:?}\n  found:   {:?}",
                o.seed,
                (&written.fe, &written.vip, &written.be, &written.bm, &written.pod),
                (&cfgmaps.fe, &cfgmaps.vip, &cfgmaps.be, &cfgmaps.bm, &cfgmaps.pod)
            );
            if o.print {
                println!("{r}");
            }
            stats.reports.push(r);
            if o.stop_at_first {
                break;
            }
        }
        scenario += 1;
        if !distribution_reported && stats.packets >= next_distribution_check {
            next_distribution_check = stats.packets + 1000;
            distribution_reported = check_distribution(t, o, &mut stats);
            if distribution_reported && o.stop_at_first {
                break;
            }
        }
    }
    if !distribution_reported {
        check_distribution(t, o, &mut stats);
    }
    stats.seconds = started.elapsed().as_secs_f64();
    stats
}

/// Reports what `distribution` finds; true if it found anything.
fn check_distribution(t: &Target, o: &Options, stats: &mut Stats) -> bool {
    let problems = distribution(stats, &t.cfg);
    for p in &problems {
        stats.disagreements += 1;
        stats.catches += 1;
        stats.first_catch_at.get_or_insert(stats.packets);
        let r = format!(
            "DISAGREEMENT on {} (seed {:#x}, first {} packets): {p}",
            t.name, o.seed, stats.packets
        );
        if o.print {
            println!("{r}");
        }
        stats.reports.push(r);
    }
    !problems.is_empty()
}

/// Draws per option before "never chosen" counts as wrong: missing one of n equally likely
/// options in 15n draws has probability (1 - 1/n)^15n, at most (3/4)^60 ~ 3e-8 for n <= 4.
const MIN_DRAWS_PER_OPTION: u64 = 15;
/// Translations before a never-chosen port counts as wrong (ports taken by live flows are not
/// free for every translation, so more than 15 per port).
const MIN_TRANSLATIONS: u64 = 100;

/// The datapath's random choices must be able to reach every option: each slot of a set (for
/// each set size seen often enough) and each port of the translated range.
fn distribution(s: &Stats, cfg: &Config) -> Vec<String> {
    let mut out = vec![];
    for (&(n, j), &chances) in &s.slot_chances {
        if n > 1 && chances >= MIN_DRAWS_PER_OPTION * n as u64 && !s.slots.contains_key(&(n, j)) {
            out.push(format!(
                "random slot of a {n}-slot set: slot {j} never chosen in {chances} new flows that could tell it apart"
            ));
        }
    }
    let total: u64 = s.ports.values().sum();
    if total >= MIN_TRANSLATIONS {
        let range = cfg.xlate_min as u32..=cfg.xlate_max as u32;
        let never: Vec<u32> = range.clone().filter(|p| !s.ports.contains_key(p)).collect();
        if !never.is_empty() {
            out.push(format!(
                "translated ports {never:?} of {range:?} never chosen in {total} translations"
            ));
        }
    }
    let (seen, want) = (s.collisions as f64, s.expected_collisions);
    if seen > want + 6.0 * want.sqrt() + 4.0 {
        out.push(format!(
            "{} translation collisions where 8 uniform tries over the free ports make {want:.1} expected",
            s.collisions
        ));
    }
    out
}

/// A trace line without its numbers, addresses and entry descriptions.
fn rule_of(line: &str) -> String {
    let mut s = String::new();
    for w in line.split(' ') {
        if w.chars().any(|c| c.is_ascii_digit()) {
            if !s.ends_with('#') {
                s.push_str(" #");
            }
        } else {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(w);
        }
    }
    s.split(" (").next().unwrap().to_string()
}

/// A frame the kernel's test run may refuse: an IPv4 (IPv6) EtherType with less than an IP
/// header.
fn unrunnable(f: &[u8]) -> bool {
    f.len() >= ETH
        && match get16(f, 12) {
            0x0800 => f.len() < ETH + 20,
            0x86dd => f.len() < ETH + 40,
            _ => false,
        }
}

fn moved(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u32, u64, u64)> {
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| (i as u32, y.0.wrapping_sub(x.0), y.1.wrapping_sub(x.1)))
        .collect()
}

fn pod_delta(a: &Counters, b: &Counters) -> Option<[u64; 4]> {
    match (a.pod, b.pod) {
        (Some(x), Some(y)) => Some([
            y[0].wrapping_sub(x[0]),
            y[1].wrapping_sub(x[1]),
            y[2].wrapping_sub(x[2]),
            y[3].wrapping_sub(x[3]),
        ]),
        (None, None) => None,
        // An entry appeared or vanished: show it as an impossible delta.
        _ => Some([u64::MAX; 4]),
    }
}

fn same_dynamic(a: &State, b: &State) -> bool {
    a.ct == b.ct && a.aff == b.aff && a.frag == b.frag
}

fn same_config(a: &State, b: &State) -> bool {
    a.fe == b.fe && a.vip == b.vip && a.be == b.be && a.bm == b.bm && a.pod == b.pod
}

struct Judgement {
    /// None: the real outcome is one the model allows.
    diff: Option<Diff>,
    /// The matching outcome's trace and random choices.
    trace: Vec<String>,
    picks: Vec<(&'static str, u32, u32)>,
    ambiguous: bool,
}

/// The model outcome closest to the real one, and how they differ.
struct Diff {
    outcome: Outcome,
    asked: Vec<String>,
    problems: Vec<String>,
    outcomes: usize,
}

fn judge(
    cfg: &Config,
    prog: &Prog,
    frame: &[u8],
    before: &State,
    clk: Clock,
    real: &Real,
    notes: &[String],
) -> Judgement {
    let mut ch = Chooser::default();
    let mut best: Option<Diff> = None;
    let mut n = 0;
    let mut ambiguous = false;
    loop {
        let out = model::run(cfg, *prog, frame, before, clk, &mut ch);
        n += 1;
        if ch.asked.iter().any(|a| a.starts_with("clock")) {
            ambiguous = true;
        }
        let mut problems = compare(*prog, &out, frame, clk, real);
        problems.extend(notes.iter().cloned());
        if problems.is_empty() {
            return Judgement {
                diff: None,
                trace: out.trace,
                picks: out.picks,
                ambiguous,
            };
        }
        if best
            .as_ref()
            .map(|b| problems.len() < b.problems.len())
            .unwrap_or(true)
        {
            best = Some(Diff {
                outcome: out,
                asked: ch.asked.clone(),
                problems,
                outcomes: 0,
            });
        }
        if n >= MAX_OUTCOMES || !ch.next() {
            break;
        }
    }
    let mut d = best.unwrap();
    d.outcomes = n;
    Judgement {
        diff: Some(d),
        trace: vec![],
        picks: vec![],
        ambiguous,
    }
}

fn stamp_ok(model: Stamp, real: Stamp, clk: Clock) -> bool {
    match (model, real) {
        (Stamp::At(x), Stamp::At(y)) => x == y,
        (Stamp::Now, Stamp::At(y)) => clk.lo <= y && y <= clk.hi,
        _ => false,
    }
}

fn stamp_str(s: Stamp, clk: Clock) -> String {
    match s {
        Stamp::Now => "now".into(),
        Stamp::At(y) if y >= clk.lo && y <= clk.hi => "now".into(),
        Stamp::At(y) => format!("{:.3}s ago", clk.lo.saturating_sub(y) as f64 / 1e9),
    }
}

fn ct_str(v: &Ct, clk: Clock) -> String {
    format!(
        "{v} (created {}, last seen {})",
        stamp_str(v.created, clk),
        stamp_str(v.last, clk)
    )
}

/// Every way the real outcome differs from one model outcome.
fn compare(prog: Prog, m: &Outcome, frame: &[u8], clk: Clock, real: &Real) -> Vec<String> {
    let mut p = vec![];
    let len = frame.len() as u64;
    if m.verdict != real.verdict {
        p.push(format!(
            "verdict: real {}, model {}",
            real.verdict, m.verdict
        ));
    }
    let want = vec![(m.reason, 1, len)];
    if real.moved != want {
        p.push(format!(
            "reason counters: real {}, model {} +1",
            real.moved
                .iter()
                .map(|(r, n, b)| format!("{} +{n} ({b} bytes)", model::reason_str(*r)))
                .collect::<Vec<_>>()
                .join(", "),
            model::reason_str(m.reason)
        ));
    }
    if !same_bytes(&m.out, &real.out, &m.loose) {
        p.push(format!(
            "output bytes differ{}",
            first_diff(&m.out, &real.out)
        ));
    }
    let want_svc: Vec<(u32, u64, u64)> = m
        .svc
        .filter(|s| *s < SVC_IDS)
        .map(|s| vec![(s, 1, len)])
        .unwrap_or_default();
    if real.svc != want_svc {
        p.push(format!(
            "service counters: real {:?}, model {:?} (set, packets, bytes)",
            real.svc, want_svc
        ));
    }
    if !pod_ok(prog, m, real, len) {
        p.push(format!(
            "pod counters: real delta {:?} (rx packets, rx bytes, tx packets, tx bytes)",
            real.pod
        ));
    }
    // Conntrack, all fields; timestamps as now / untouched.
    for k in m.st.ct.keys().chain(real.st.ct.keys()) {
        let (mv, rv) = (m.st.ct.get(k), real.st.ct.get(k));
        if p.iter().any(|s: &String| s.contains(&format!("at {k}:"))) {
            continue;
        }
        match (mv, rv) {
            (Some(mv), Some(rv)) => {
                let fields = mv.same_fields(rv);
                let ts = stamp_ok(mv.created, rv.created, clk)
                    && stamp_ok(mv.last, rv.last, clk)
                    && !(mv.created == Stamp::Now
                        && mv.last == Stamp::Now
                        && rv.created != rv.last);
                if !fields || !ts {
                    p.push(format!(
                        "conntrack at {k}: real {}, model {}",
                        ct_str(rv, clk),
                        ct_str(mv, clk)
                    ));
                }
            }
            (Some(mv), None) => p.push(format!(
                "conntrack at {k}: real none, model {}",
                ct_str(mv, clk)
            )),
            (None, Some(rv)) => p.push(format!(
                "conntrack at {k}: real {}, model none",
                ct_str(rv, clk)
            )),
            (None, None) => {}
        }
    }
    for k in m.st.aff.keys().chain(real.st.aff.keys()) {
        let (mv, rv) = (m.st.aff.get(k), real.st.aff.get(k));
        let ok = match (mv, rv) {
            (Some(a), Some(b)) => {
                a.addr == b.addr && a.port == b.port && stamp_ok(a.last, b.last, clk)
            }
            (None, None) => true,
            _ => false,
        };
        if !ok
            && !p
                .iter()
                .any(|s| s.starts_with(&format!("affinity ({}", ip(k.0))))
        {
            p.push(format!(
                "affinity ({}, set {}): real {:?}, model {:?}",
                ip(k.0),
                k.1,
                rv.map(|a| (ip(a.addr), a.port, stamp_str(a.last, clk))),
                mv.map(|a| (ip(a.addr), a.port, stamp_str(a.last, clk)))
            ));
        }
    }
    for k in m.st.frag.keys().chain(real.st.frag.keys()) {
        let (mv, rv) = (m.st.frag.get(k), real.st.frag.get(k));
        let ok = match (mv, rv) {
            (Some(a), Some(b)) => {
                a.nat_saddr == b.nat_saddr
                    && a.nat_daddr == b.nat_daddr
                    && a.tun == b.tun
                    && a.flags == b.flags
                    && stamp_ok(a.first, b.first, clk)
            }
            (None, None) => true,
            _ => false,
        };
        let tag = format!(
            "fragment memory {} > {} id {:#06x}",
            ip(k.saddr),
            ip(k.daddr),
            k.id
        );
        if !ok && !p.iter().any(|s| s.starts_with(&tag)) {
            let show = |f: Option<&Frag>| {
                f.map(|f| {
                    format!(
                        "saddr>{} daddr>{} tun {} flags {} first {}",
                        ip(f.nat_saddr),
                        ip(f.nat_daddr),
                        ip(f.tun),
                        f.flags,
                        stamp_str(f.first, clk)
                    )
                })
            };
            p.push(format!(
                "{tag} proto {}: real {:?}, model {:?}",
                k.proto,
                show(rv),
                show(mv)
            ));
        }
    }
    p
}

/// The pod's counters move by one packet of the received length, in the program's direction
/// (rx towards the pod, tx from it), when the pod's entry exists.
fn pod_ok(prog: Prog, m: &Outcome, real: &Real, len: u64) -> bool {
    match (m.st.pod, real.pod) {
        (None, None) => true,
        (Some(_), Some(d)) => {
            d == match prog {
                Prog::ToPod => [1, len, 0, 0],
                Prog::FromPod => [0, 0, 1, len],
            }
        }
        _ => false,
    }
}

/// Byte equality, but a checksum field in `loose` may hold either one's complement zero.
fn same_bytes(model: &[u8], real: &[u8], loose: &[usize]) -> bool {
    if model.len() != real.len() {
        return false;
    }
    let mut m = model.to_vec();
    for &at in loose {
        if at + 2 <= m.len() {
            let (a, b) = (get16(&m, at), get16(real, at));
            if (a == 0 || a == 0xffff) && (b == 0 || b == 0xffff) {
                put16(&mut m, at, b);
            }
        }
    }
    m == real
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    if a.len() != b.len() {
        return format!(" (model {} bytes, real {})", a.len(), b.len());
    }
    let at: Vec<String> = (0..a.len())
        .filter(|&i| a[i] != b[i])
        .take(8)
        .map(|i| format!("@{i}: real {:02x} model {:02x}", b[i], a[i]))
        .collect();
    format!(" ({})", at.join(", "))
}

#[allow(clippy::too_many_arguments)]
fn report(
    t: &Target,
    seed: u64,
    scenario: u64,
    step: u64,
    packet_no: u64,
    pkt: &Packet,
    before: &State,
    clk: Clock,
    real: &Real,
    d: &Diff,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "DISAGREEMENT on {}: seed {seed:#x}, scenario {scenario}, step {step} (packet {packet_no}); replay: FUZZ_SEED={seed:#x} FUZZ_SCENARIO={scenario}",
        t.name
    );
    let _ = writeln!(
        s,
        "  exact reproduction: FUZZ_REPRO='{}' cargo test --release -p sluice-dataplaned --test fuzz_packets -- --ignored --exact fuzz_repro --nocapture",
        super::repro::encode(pkt.prog, &pkt.frame, before, clk.lo)
    );
    let _ = writeln!(s, "  program: {:?}; meant as: {}", pkt.prog, pkt.what);
    let _ = writeln!(s, "  packet:  {}", describe(&pkt.frame));
    let _ = writeln!(s, "           {}", hex(&pkt.frame));
    let _ = writeln!(s, "  state before:");
    for (k, v) in &before.fe {
        let _ = writeln!(
            s,
            "    frontend {}:{} proto {}: cluster {}x{} local {}x{} gen {} flags {:#x} aff {}s",
            ip(k.addr),
            k.port,
            k.proto,
            v.cluster_id,
            v.cluster_count,
            v.local_id,
            v.local_count,
            v.gen,
            v.flags,
            v.affinity_timeout
        );
    }
    for ((set, slot), b) in &before.be {
        let _ = writeln!(s, "    slot {set}/{slot}: {}:{}", ip(b.addr), b.port);
    }
    for (set, a, p) in &before.bm {
        let _ = writeln!(s, "    member {set}: {}:{p}", ip(*a));
    }
    let _ = writeln!(
        s,
        "    VIP markers {:?}; pod entry {:?}",
        before.vip.iter().map(|a| ip(*a)).collect::<Vec<_>>(),
        before.pod.map(ip)
    );
    for (k, v) in &before.ct {
        let _ = writeln!(s, "    ct {k}: {}", ct_str(v, clk));
    }
    for ((c, set), a) in &before.aff {
        let _ = writeln!(
            s,
            "    affinity {} set {set}: {}:{} ({})",
            ip(*c),
            ip(a.addr),
            a.port,
            stamp_str(a.last, clk)
        );
    }
    for (k, f) in &before.frag {
        let _ = writeln!(
            s,
            "    fragment memory {} > {} id {:#06x} proto {}: saddr>{} daddr>{} ({})",
            ip(k.saddr),
            ip(k.daddr),
            k.id,
            k.proto,
            ip(f.nat_saddr),
            ip(f.nat_daddr),
            stamp_str(f.first, clk)
        );
    }
    let _ = writeln!(
        s,
        "  real:  verdict {}, reasons {:?}",
        real.verdict,
        real.moved
            .iter()
            .map(|(r, _, _)| model::reason_str(*r))
            .collect::<Vec<_>>()
    );
    if real.out != pkt.frame {
        let _ = writeln!(s, "         out {}", describe(&real.out));
        let _ = writeln!(s, "             {}", hex(&real.out));
    } else {
        let _ = writeln!(s, "         out: the frame as it came");
    }
    let _ = writeln!(
        s,
        "  model: verdict {}, reason {} (closest of {} allowed outcomes{})",
        d.outcome.verdict,
        model::reason_str(d.outcome.reason),
        d.outcomes,
        if d.asked.is_empty() {
            String::new()
        } else {
            format!("; choices: {}", d.asked.join(", "))
        }
    );
    let _ = writeln!(s, "         rules: {}", d.outcome.trace.join(" / "));
    if d.outcome.out != pkt.frame {
        let _ = writeln!(s, "         out {}", describe(&d.outcome.out));
        let _ = writeln!(s, "             {}", hex(&d.outcome.out));
    }
    let _ = writeln!(s, "  differences:");
    for p in &d.problems {
        let _ = writeln!(s, "    - {p}");
    }
    s
}
