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
