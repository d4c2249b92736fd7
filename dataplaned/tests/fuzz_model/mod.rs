//! The differential packet fuzzer of bpf/pod_veth.bpf.c (issue 7, "Proof"): a model of
//! bpf/RULES.md (`model`), a seeded generator of map states and packets (`gen`), the real
//! programs behind BPF_PROG_TEST_RUN (`target`), and the loop that compares them (`run`).

pub mod gen;
pub mod model;
pub mod net;
pub mod repro;
pub mod run;
pub mod target;
pub mod variants;
