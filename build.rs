//! Code generation for sluice-core:
//! - proto/sluice.proto → tonic client and server (always; needs `protoc`, Debian's protobuf-compiler);
//! - bpf/*.bpf.c → libbpf-rs skeletons in OUT_DIR (only with the `bpf` feature, so the CNI plugin
//!   builds without clang and links no libbpf).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One skeleton per attach point; each entry file is thin and includes bpf/lib/*.h.
const BPF_PROGRAMS: &[&str] = &["pod_veth", "uplink"];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        // `sluicectl -o json` prints replies as they are.
        .type_attribute(".", "#[derive(serde::Serialize)]")
        .compile_protos(&["proto/sluice.proto"], &["proto"])
        .expect(
            "compiling proto/sluice.proto (is protoc installed? apt-get install protobuf-compiler)",
        );

    if env::var_os("CARGO_FEATURE_BPF").is_some() {
        build_bpf(&out);
    }
}

fn build_bpf(out: &Path) {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=BPF_CLANG");
    let clang = pick_clang();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap();
    let (bpf_arch, multiarch) = match arch.as_str() {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        other => panic!("unsupported target arch {other}"),
    };
    for name in BPF_PROGRAMS {
        let src = format!("bpf/{name}.bpf.c");
        let skel = out.join(format!("{name}.skel.rs"));
        libbpf_cargo::SkeletonBuilder::new()
            .source(&src)
            .clang(&clang)
            .clang_args([
                "-O2".to_string(),
                "-g".to_string(),
                "-Wall".to_string(),
                // v3: 32-bit atomics (conntrack flag OR) and jumps; kernels >= 5.12.
                "-mcpu=v3".to_string(),
                "-Werror".to_string(),
                format!("-D__TARGET_ARCH_{bpf_arch}"),
                format!("-I/usr/include/{multiarch}"),
                "-Ibpf".to_string(),
            ])
            .build_and_generate(&skel)
            .unwrap_or_else(|e| panic!("building {src} with {}: {e:#}", clang.display()));
    }
    // What the objects are: the daemon keeps pinned programs of the same build (and config)
    // across a restart instead of loading them again. FNV-1a over the generated skeletons, which
    // embed the objects' bytes.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for name in BPF_PROGRAMS {
        let text = std::fs::read(out.join(format!("{name}.skel.rs"))).expect("reading a skeleton");
        for b in text {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=SLUICE_BPF_BUILD={h:016x}");
}

/// Debian installs versioned clangs without an unversioned name: honour $BPF_CLANG, then prefer the
/// newest one installed.
fn pick_clang() -> PathBuf {
    if let Some(c) = env::var_os("BPF_CLANG") {
        return PathBuf::from(c);
    }
    for c in ["clang-22", "clang-19", "clang-16", "clang-14", "clang"] {
        if Command::new(c)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            return PathBuf::from(c);
        }
    }
    panic!("no clang found: install clang (apt-get install clang) or set BPF_CLANG");
}
