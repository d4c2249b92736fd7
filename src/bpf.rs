//! The BPF skeletons, one per attach point (see build.rs), generated into OUT_DIR.

/// A hash of the compiled BPF objects (build.rs): equal builds load equal programs.
pub const BUILD: &str = env!("SLUICE_BPF_BUILD");

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]
pub mod pod_veth {
    include!(concat!(env!("OUT_DIR"), "/pod_veth.skel.rs"));
}

#[allow(
    clippy::all,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    dead_code
)]
pub mod uplink {
    include!(concat!(env!("OUT_DIR"), "/uplink.skel.rs"));
}
