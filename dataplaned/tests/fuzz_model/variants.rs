//! Deliberately broken programs: bpf/ copied into a temporary directory, one line of the copy
//! changed (a checksum fix removed, a rule inverted), compiled with clang as build.rs does, and
//! loaded as a generic object. The product's bpf/ is never touched. A fuzzer that does not
//! disagree with these is not checking anything.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One change to one file of the copy: `find` must occur exactly once.
pub struct Variant {
    pub name: &'static str,
    pub file: &'static str,
    pub find: &'static str,
    pub replace: &'static str,
}

pub const VARIANTS: &[Variant] = &[
    Variant {
        name: "port rewrite without its L4 checksum fix",
        file: "lib/nat.h",
        find: "if ((n.sport | n.dport) && l4_csum_by_diff(",
        replace: "if (0 && l4_csum_by_diff(",
    },
    // (Dropping BPF_F_PSEUDO_HDR alone is not observable here: BPF_PROG_TEST_RUN's skbs are
    // CHECKSUM_NONE, for which bpf_l4_csum_replace updates the field with or without the flag.)
    Variant {
        name: "address rewrite without its L4 checksum fix (pseudo header)",
        file: "lib/nat.h",
        find: "if ((n.saddr | n.daddr) && l4_csum_by_diff(",
        replace: "if (0 && l4_csum_by_diff(",
    },
    Variant {
        name: "address rewrite without the IP header checksum fix",
        file: "lib/csum.h",
        find: "\treturn (__sum16)~csum_fold16(sum);",
        replace: "\treturn check;",
    },
    Variant {
        name: "UDP checksum 0 not kept (no BPF_F_MARK_MANGLED_0)",
        file: "lib/nat.h",
        find: "IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;",
        replace: "IPPROTO_UDP ? 0 : 0;",
    },
    Variant {
        name: "reject without the checksum-completion fixed point",
        file: "lib/reject.h",
        find: "\t__builtin_memcpy(&rp->quote[ip_hlen + csum_at], &field, 2);\n",
        replace: "",
    },
    Variant {
        name: "gone inverted for FIN: one side's FIN makes a TCP flow gone",
        file: "lib/conntrack.h",
        find: "((a & TCPF_FIN) && (b & TCPF_FIN))))",
        replace: "((a & TCPF_FIN) || (b & TCPF_FIN))))",
    },
    Variant {
        name: "UDP counts as a stream after one direction",
        file: "lib/conntrack.h",
        find: "(b & CT_SEEN_PKT) && (a & CT_SEEN_PKT)",
        replace: "(b & CT_SEEN_PKT) || (a & CT_SEEN_PKT)",
    },
    Variant {
        name: "last_seen refreshed on every packet (ct_refresh ignored)",
        file: "lib/conntrack.h",
        find: "if (sl_age(now, ct->last_seen_ns) > ct_refresh_ns)",
        replace: "if (1)",
    },
    Variant {
        name: "half flows never seen as half (no repair)",
        file: "lib/conntrack.h",
        find: "\t\tf.half = 1;\n",
        replace: "",
    },
    Variant {
        name: "translated port may be one past the range",
        file: "lib/xlate.h",
        find: "xlate_port_min + 1;",
        replace: "xlate_port_min + 2;",
    },
    Variant {
        name: "random slot always slot 0",
        file: "lib/lb.h",
        find: "bk.slot = bpf_get_prandom_u32() % set.count;",
        replace: "bk.slot = 0;",
    },
    Variant {
        name: "translated port always the range's first",
        file: "lib/xlate.h",
        find: "xlate_port_min + bpf_get_prandom_u32() % span",
        replace: "xlate_port_min + 0 * span",
    },
    Variant {
        name: "SYN on an ended service flow kept as established (no port reuse)",
        file: "lib/lb.h",
        find: "*restart = REASON_FLOW_REPLACED; /* the port is reused: a new flow */",
        replace: "*restart = 0;",
    },
    Variant {
        name: "affinity without the membership check",
        file: "lib/lb.h",
        find: " &&\n\t\t    lb_member(set.id, av->addr, av->port)) {",
        replace: ") {",
    },
    Variant {
        name: "source-address check inverted",
        file: "lib/pod.h",
        find: "p->addr == pkt->saddr)\n\t\treturn 1;",
        replace: "p->addr != pkt->saddr)\n\t\treturn 1;",
    },
    Variant {
        name: "fragment memory never stale",
        file: "lib/frag.h",
        find: "sl_age(sl_now(), v->first_ns) > frag_timeout_ns",
        replace: "0",
    },
    Variant {
        name: "hairpinned replies not sent back out of the veth",
        file: "lib/conntrack.h",
        find: "pkt->redirect_back = 1;",
        replace: ";",
    },
    Variant {
        name: "every SYN renews a direct flow (ended check dropped)",
        file: "lib/direct.h",
        find: "is_tcp_syn(pkt) && ct_ended(x->seen & 0xff, x->seen >> CT_SEEN_PEER_SHIFT)",
        replace: "is_tcp_syn(pkt)",
    },
    Variant {
        name: "ICMP error's source not restored to the frontend",
        file: "lib/icmp.h",
        find: "if (vip && pkt->saddr == in.daddr) {",
        replace: "if (0) {",
    },
];

/// A built object and the directory that holds it (removed on drop).
pub struct Built {
    _dir: tempfile::TempDir,
    pub obj: PathBuf,
}

fn clang() -> PathBuf {
    if let Some(c) = std::env::var_os("BPF_CLANG") {
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
    panic!("no clang found (apt-get install clang, or set BPF_CLANG)");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).unwrap();
        }
    }
}

/// bpf/ copied, `variant` applied (None: the copy as it is), compiled as build.rs compiles it.
pub fn build(variant: Option<&Variant>) -> Built {
    let dir = tempfile::Builder::new()
        .prefix("sluice-fuzz-variant-")
        .tempdir()
        .expect("temporary directory");
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf");
    let bpf = dir.path().join("bpf");
    copy_dir(&src, &bpf);
    if let Some(v) = variant {
        let path = bpf.join(v.file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.matches(v.find).count(),
            1,
            "variant {:?}: {:?} must occur exactly once in bpf/{} (the source changed: update the variant)",
            v.name,
            v.find,
            v.file
        );
        std::fs::write(&path, text.replacen(v.find, v.replace, 1)).unwrap();
    }
    // libbpf's API headers (bpf_helpers.h, ...), as libbpf-cargo provides them to build.rs.
    let inc = dir.path().join("include");
    std::fs::create_dir_all(inc.join("bpf")).unwrap();
    for (name, text) in libbpf_sys::API_HEADERS.iter() {
        std::fs::write(inc.join("bpf").join(name), text).unwrap();
    }
    let (arch, multiarch) = match std::env::consts::ARCH {
        "x86_64" => ("x86", "x86_64-linux-gnu"),
        "aarch64" => ("arm64", "aarch64-linux-gnu"),
        other => panic!("unsupported arch {other}"),
    };
    let obj = dir.path().join("pod_veth.bpf.o");
    let out = Command::new(clang())
        .args(["-O2", "-g", "-Wall", "-mcpu=v3", "-target", "bpf"])
        .arg(format!("-D__TARGET_ARCH_{arch}"))
        .arg(format!("-I/usr/include/{multiarch}"))
        .arg("-I")
        .arg(&bpf)
        .arg("-I")
        .arg(&inc)
        .arg("-fno-stack-protector")
        .arg("-c")
        .arg(bpf.join("pod_veth.bpf.c"))
        .arg("-o")
        .arg(&obj)
        .output()
        .expect("running clang");
    assert!(
        out.status.success(),
        "compiling {}: {}",
        variant.map(|v| v.name).unwrap_or("the unmodified copy"),
        String::from_utf8_lossy(&out.stderr)
    );
    Built { _dir: dir, obj }
}
