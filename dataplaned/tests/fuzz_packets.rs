//! The differential packet fuzzer (issue 7): every packet goes through the real `from_pod` /
//! `to_pod` (BPF_PROG_TEST_RUN) and through a model written from bpf/RULES.md; verdict, output
//! bytes, reason, counters and the conntrack / affinity / fragment maps must agree.
//!
//! - `fuzz_fixed_seed`: CI's 10,000 packets with a fixed seed, then 5,000 with a random one
//!   (printed).
//! - `broken_programs_are_caught`: variants of the BPF object built from a copy of bpf/ with one
//!   checksum fix removed or one rule inverted must make the fuzzer disagree.
//! - `fuzz_cli` (ignored): what `scripts/fuzz-packets.sh N [SEED]` runs.
//!
//! Needs root (BPF); fails loudly without it.

mod bpf_common;
mod fuzz_model;

use fuzz_model::gen::fuzz_config;
use fuzz_model::run::{fuzz, Options, Stats};
use fuzz_model::target::{default_config, Target};

const CI_SEED: u64 = 0x5107_2026;
const CI_PACKETS: u64 = 10_000;

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .expect("/dev/urandom");
    u64::from_ne_bytes(b)
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    Some(if let Some(h) = v.strip_prefix("0x") {
        u64::from_str_radix(h, 16).unwrap_or_else(|e| panic!("{name}={v}: {e}"))
    } else {
        v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}"))
    })
}

fn summary(what: &str, seed: u64, s: &Stats) {
    println!(
        "{what}: seed {seed:#x}: {} packets in {} scenarios, {:.1} s, {:.0} packets/s, {} disagreements, {} clock-ambiguous, {} frames refused by the test run",
        s.packets,
        s.scenarios,
        s.seconds,
        s.rate(),
        s.disagreements,
        s.clock_ambiguous,
        s.refused
    );
    println!("  reasons: {}", s.reason_table());
    if std::env::var_os("FUZZ_COVERAGE").is_some() {
        println!("  rules reached (matched outcomes):");
        for (rule, n) in &s.coverage {
            println!("    {n:>8}  {rule}");
        }
    }
}

fn opts(seed: u64, packets: u64) -> Options<'static> {
    Options {
        seed,
        packets,
        stop_at_first: false,
        print: true,
        first_scenario: 0,
        progress: 0,
        avoid: vec![],
        control: None,
    }
}

#[test]
fn fuzz_fixed_seed() {
    let cfg = fuzz_config(&default_config());
    let t = Target::skeleton(&cfg);
    let fixed = fuzz(&t, &opts(CI_SEED, CI_PACKETS));
    summary("fixed seed", CI_SEED, &fixed);
    let seed = random_seed();
    println!("random seed {seed:#x} (replay: scripts/fuzz-packets.sh 5000 {seed:#x})");
    let random = fuzz(&t, &opts(seed, 5_000));
    summary("random seed", seed, &random);
    assert_eq!(
        (fixed.disagreements, random.disagreements),
        (0, 0),
        "the real programs and the model of bpf/RULES.md disagree (reports above; seeds {CI_SEED:#x}, {seed:#x})"
    );
    assert!(
        fixed.rate() >= 500.0,
        "fuzzing too slow: {:.0} packets/s",
        fixed.rate()
    );
}

/// `scripts/fuzz-packets.sh`: FUZZ_PACKETS, FUZZ_SEED (, FUZZ_SCENARIO); writes the summary line
/// to FUZZ_RESULT.
#[test]
#[ignore = "run by scripts/fuzz-packets.sh"]
fn fuzz_cli() {
    let packets = env_u64("FUZZ_PACKETS").unwrap_or(10_000);
    let seed = env_u64("FUZZ_SEED").unwrap_or_else(random_seed);
    println!("seed {seed:#x}");
    let cfg = fuzz_config(&default_config());
    let t = Target::skeleton(&cfg);
    let mut o = opts(seed, packets);
    o.first_scenario = env_u64("FUZZ_SCENARIO").unwrap_or(0);
    o.progress = if packets >= 50_000 { 20_000 } else { 0 };
    if let Ok(a) = std::env::var("FUZZ_AVOID") {
        o.avoid = a
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        println!("avoiding packet classes {:?} (exploration only)", o.avoid);
    }
    let s = fuzz(&t, &o);
    summary("fuzz", seed, &s);
    let line = format!("packets: {}, disagreements: {}", s.packets, s.disagreements);
    match std::env::var_os("FUZZ_RESULT") {
        Some(p) => std::fs::write(p, format!("{line}\n")).expect("FUZZ_RESULT"),
        None => {
            println!("{line}");
            assert_eq!(s.disagreements, 0, "disagreements (reports above)");
        }
    }
}

/// Packets a variant gets before it counts as missed.
const VARIANT_BUDGET: u64 = 30_000;

/// Every variant of fuzz_model::variants must be caught: a disagreement that the unmodified
/// program, compiled the same way and given the same state and packet, does not share.
#[test]
fn broken_programs_are_caught() {
    use fuzz_model::variants::{build, VARIANTS};
    let cfg = fuzz_config(&default_config());
    let pristine = build(None);
    let control = Target::object(&pristine.obj, &cfg, "the unmodified copy of bpf/");
    let mut missed = vec![];
    let mut table = vec![];
    for v in VARIANTS {
        let built = build(Some(v));
        let t = Target::object(&built.obj, &cfg, &format!("variant \"{}\"", v.name));
        let mut o = opts(CI_SEED, VARIANT_BUDGET);
        o.stop_at_first = true;
        o.print = false;
        o.control = Some(&control);
        let s = fuzz(&t, &o);
        match s.first_catch_at {
            Some(n) => {
                println!("caught after {n:>6} packets: {}", v.name);
                println!("{}", s.reports.last().unwrap());
                table.push((v.name, n));
            }
            None => {
                println!("MISSED in {} packets: {}", s.packets, v.name);
                missed.push(v.name);
            }
        }
    }
    println!("broken programs (packets to the first disagreement):");
    for (name, n) in &table {
        println!("  {n:>6}  {name}");
    }
    assert!(
        missed.is_empty(),
        "the fuzzer did not catch these broken programs in {VARIANT_BUDGET} packets: {missed:?}"
    );
}

/// One packet and state from a report's "exact reproduction" line (FUZZ_REPRO).
#[test]
#[ignore = "run by hand with FUZZ_REPRO from a fuzzer report"]
fn fuzz_repro() {
    let line = std::env::var("FUZZ_REPRO").expect("FUZZ_REPRO: a report's reproduction line");
    let cfg = fuzz_config(&default_config());
    let t = Target::skeleton(&cfg);
    let (prog, frame, st) = fuzz_model::repro::decode(&line, bpf_common::mono_ns());
    let pkt = fuzz_model::gen::Packet {
        prog,
        frame,
        what: "FUZZ_REPRO".into(),
    };
    if let Some(r) = fuzz_model::run::check_one(&t, &pkt, &st) {
        panic!("{r}");
    }
}

/// Bug found by the fuzzer (reported to the lead; bpf/ is not this test's to fix): an ICMP error
/// about a NATed flow whose frame carries bytes after the IP total length (Ethernet padding or a
/// trailer). bpf/lib/icmp.h bounds the quote by skb->len instead of the IP packet, so it takes
/// the trailer for the quoted TCP checksum, "updates" it there, and folds that change into the
/// ICMP checksum: the error reaches the client with a wrong ICMP checksum and is dropped. The
/// model (bpf/RULES.md: "the quoted L4 checksum (when quoted)") leaves the trailer alone and
/// keeps the ICMP checksum right.
#[test]
fn known_disagreement_icmp_quote_past_ip_total_length() {
    use fuzz_model::model::*;
    use fuzz_model::net::*;
    let (client, backend, vip) = (0x0a00_0105u32, 0x0a00_0207u32, 0x0a60_000au32);
    let mut st = State::default();
    let mut rev = Ct::blank(CT_REV);
    rev.nat_saddr = vip;
    rev.nat_sport = 80;
    rev.set_id = 1;
    rev.seen = 0x92;
    let now = bpf_common::mono_ns();
    rev.created = Stamp::At(now - 1_000_000);
    rev.last = rev.created;
    st.ct.insert(
        Tuple {
            saddr: backend,
            sport: 8080,
            daddr: client,
            dport: 40000,
            proto: TCP,
        },
        rev,
    );
    // The backend's ICMP port unreachable, quoting the client's SYN as it left (to the
    // backend): its IP header and RFC 792's 8 bytes of TCP. Then 12 bytes of trailer.
    let mut quote = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, TCP, 0, 0];
    quote.extend_from_slice(&client.to_be_bytes());
    quote.extend_from_slice(&backend.to_be_bytes());
    let c = checksum(&quote);
    put16(&mut quote, 10, c);
    quote.extend_from_slice(&[0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1]); // 40000 > 8080, seq 1
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quote);
    let c = checksum(&icmp);
    put16(&mut icmp, 2, c);
    let mut ip = vec![
        0x45,
        0,
        0,
        (20 + icmp.len()) as u8,
        0,
        1,
        0,
        0,
        64,
        ICMP,
        0,
        0,
    ];
    ip.extend_from_slice(&backend.to_be_bytes());
    ip.extend_from_slice(&client.to_be_bytes());
    let c = checksum(&ip);
    put16(&mut ip, 10, c);
    let mut frame = vec![
        0x02, 0, 0x0a, 0, 1, 5, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee, 8, 0,
    ];
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&icmp);
    frame.extend_from_slice(&[0; 12]);
    let cfg = fuzz_config(&default_config());
    let t = Target::skeleton(&cfg);
    let pkt = fuzz_model::gen::Packet {
        prog: Prog::ToPod,
        frame,
        what: "ICMP port unreachable about a service flow, 12 bytes of trailer".into(),
    };
    if let Some(r) = fuzz_model::run::check_one(&t, &pkt, &st) {
        panic!("{r}");
    }
}
