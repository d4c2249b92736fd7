//! Each deliberately broken plugin (conformance/fixtures/) is caught by the case meant for it,
//! while control cases it does not break still pass (so the failure is that rule, not a broken
//! setup). A broken plugin that passes would be a bug in the suite.

mod common;

use cni_conformance::fixture::TempDir;

struct Expect<'a> {
    fixture: &'a str,
    /// The conflist whose first plugin's type becomes the fixture (None: use `conflist` as is).
    base: &'a str,
    as_type: bool,
    fail: &'a [&'a str],
    pass: &'a [&'a str],
    /// Wraps sluice (needs its daemon).
    sluice: bool,
}

fn check(e: Expect) {
    let tmp = TempDir::new("tf").unwrap();
    let fixtures = common::fixtures_dir();
    let base = if e.base.ends_with(".conflist") && e.base.contains('/') {
        std::path::PathBuf::from(e.base)
    } else {
        common::conflist(e.base)
    };
    let conflist = if e.as_type {
        common::conflist_with_type(tmp.path(), &base, e.fixture)
    } else {
        base
    };
    let mut envs = Vec::new();
    let mut cni_path = format!("{}:/usr/lib/cni", fixtures.display());
    let mut args = Vec::new();
    if e.sluice {
        let bin = common::sluice_bin_dir();
        cni_path = format!("{}:{}:/usr/lib/cni", fixtures.display(), bin.display());
        envs.push(("SLUICE_BIN_DIR", bin.display().to_string()));
        envs.push((
            "BROKEN_REAL_PLUGIN",
            bin.join("sluice").display().to_string(),
        ));
        args.extend(common::sluice_hook_args());
    }
    args.extend([
        "--cni-path".to_string(),
        cni_path,
        "--conflist".into(),
        conflist.display().to_string(),
    ]);
    let only: Vec<&str> = e.fail.iter().chain(e.pass.iter()).copied().collect();
    args.extend(["--only".to_string(), only.join(",")]);
    let run = common::run_suite(e.fixture, &args, &envs);
    for c in e.fail {
        run.expect(c, "fail");
    }
    for c in e.pass {
        run.expect(c, "pass");
    }
    assert_eq!(
        run.code,
        Some(1),
        "{}: a broken plugin must make the run fail\n{}",
        e.fixture,
        run.table
    );
}

fn ptp(fixture: &'static str, fail: &'static [&'static str], pass: &'static [&'static str]) {
    check(Expect {
        fixture,
        base: "ptp.conflist",
        as_type: true,
        fail,
        pass,
        sluice: false,
    });
}

#[test]
fn err_to_stderr() {
    ptp(
        "err-to-stderr",
        &[
            "errors-json-on-stdout",
            "bad-json-code-6",
            "missing-container-id-code-4",
            "unsupported-version-code-1",
        ],
        &["add-interface"],
    );
}

#[test]
fn junk_stdout() {
    ptp(
        "junk-stdout",
        &[
            "errors-json-on-stdout",
            "result-schema-0.4.0",
            "result-schema-1.0.0",
        ],
        &["version"],
    );
}

#[test]
fn wrong_error_codes() {
    ptp(
        "wrong-error-codes",
        &[
            "bad-json-code-6",
            "missing-container-id-code-4",
            "unsupported-version-code-1",
        ],
        &["errors-json-on-stdout"],
    );
}

#[test]
fn never_cleans_del() {
    ptp(
        "never-cleans-del",
        &["no-leftovers-after-del", "del-twice"],
        &["add-interface", "check-passes"],
    );
}

#[test]
fn del_fails_netns_gone() {
    ptp(
        "del-fails-netns-gone",
        &["del-netns-gone", "del-empty-netns"],
        &["del-twice"],
    );
}

#[test]
fn add_twice_ok() {
    ptp("add-twice-ok", &["add-twice-fails"], &["check-passes"]);
}

#[test]
fn check_always_ok() {
    ptp(
        "check-always-ok",
        &[
            "check-detects-missing-address",
            "check-detects-missing-route",
        ],
        &["check-passes"],
    );
}

#[test]
fn leaky_killed_add() {
    ptp(
        "leaky-killed-add",
        &["killed-mid-add"],
        &["no-leftovers-after-del"],
    );
}

#[test]
fn racy_ipam() {
    let conflist = common::fixtures_dir()
        .join("racy-ipam.conflist")
        .display()
        .to_string();
    let conflist: &'static str = Box::leak(conflist.into_boxed_str());
    check(Expect {
        fixture: "racy-ipam",
        base: conflist,
        as_type: false,
        fail: &["concurrent-adds"],
        pass: &["add-interface"],
        sluice: false,
    });
}

#[test]
fn status_always_ready() {
    check(Expect {
        fixture: "status-always-ready",
        base: "sluice.conflist",
        as_type: true,
        fail: &["status-daemon-down"],
        pass: &["status"],
        sluice: true,
    });
}

#[test]
fn gc_does_nothing() {
    check(Expect {
        fixture: "gc-does-nothing",
        base: "sluice.conflist",
        as_type: true,
        fail: &["gc"],
        pass: &["status"],
        sluice: true,
    });
}
