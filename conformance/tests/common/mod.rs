//! Running the built `cni-conformance` binary from integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cni_conformance::fixture::{self, TempDir};
use serde_json::Value;

pub fn conformance_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn workspace_root() -> PathBuf {
    conformance_dir()
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn conflist(name: &str) -> PathBuf {
    conformance_dir().join("conflists").join(name)
}

pub fn fixtures_dir() -> PathBuf {
    conformance_dir().join("fixtures")
}

/// Where sluice, sluiced and sluicectl are: $SLUICE_BIN_DIR, else <workspace>/target/release.
/// Missing binaries fail the test: it must never pass by skipping.
pub fn sluice_bin_dir() -> PathBuf {
    let dir = std::env::var_os("SLUICE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release"));
    for b in ["sluice", "sluiced", "sluicectl"] {
        assert!(
            dir.join(b).is_file(),
            "{b} is missing in {}: run `cargo build --release` at the workspace root or set SLUICE_BIN_DIR",
            dir.display()
        );
    }
    dir
}

/// The sluiced hooks (conformance/hooks/sluiced.sh) as runner arguments.
pub fn sluice_hook_args() -> Vec<String> {
    let h = conformance_dir()
        .join("hooks/sluiced.sh")
        .display()
        .to_string();
    vec![
        "--setup".into(),
        format!("{h} start"),
        "--teardown".into(),
        format!("{h} stop"),
        "--cleanup".into(),
        format!("{h} cleanup"),
        "--alloc-cmd".into(),
        format!("{h} alloc"),
    ]
}

pub struct Run {
    pub label: String,
    pub code: Option<i32>,
    pub report: Value,
    pub table: String,
    pub stderr: String,
}

impl Run {
    fn case(&self, name: &str) -> &Value {
        self.report["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no case {name} in the report\n{}",
                    self.label, self.table
                )
            })
    }

    /// "pass", "fail" or "n/a".
    pub fn result(&self, name: &str) -> String {
        self.case(name)["result"].as_str().unwrap_or("").to_string()
    }

    pub fn detail(&self, name: &str) -> String {
        self.case(name)["detail"].as_str().unwrap_or("").to_string()
    }

    /// Names of the cases with this result.
    pub fn with(&self, result: &str) -> Vec<String> {
        self.report["cases"]
            .as_array()
            .expect("cases")
            .iter()
            .filter(|c| c["result"] == result)
            .map(|c| c["name"].as_str().unwrap_or("").to_string())
            .collect()
    }

    pub fn expect(&self, name: &str, result: &str) {
        let got = self.result(name);
        assert_eq!(
            got,
            result,
            "{}: case {name} is {got}, expected {result}: {}\n{}",
            self.label,
            self.detail(name),
            self.table
        );
    }
}

/// Runs cni-conformance with `args` (plus --json-out and -q) and parses its report. Needs root;
/// panics (never skips) without it.
pub fn run_suite(label: &str, args: &[String], envs: &[(&str, String)]) -> Run {
    fixture::require_root();
    let tmp = TempDir::new("tj").expect("temp dir");
    let json = tmp.path().join("report.json");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cni-conformance"));
    cmd.args(args).arg("--json-out").arg(&json).arg("-q");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("running cni-conformance");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!(
        "=== {label}: cni-conformance {}\n{table}{stderr}",
        args.join(" ")
    );
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| {
        panic!(
            "{label}: no JSON report ({e}); exit {:?}\nstdout:\n{table}\nstderr:\n{stderr}",
            out.status.code()
        )
    });
    let report: Value = serde_json::from_str(&text).expect("report is JSON");
    // The run removed what it made.
    for k in ["node_netns", "workdir"] {
        let p = report[k].as_str().unwrap_or("");
        assert!(
            !p.is_empty() && !Path::new(p).exists(),
            "{label}: {k} {p} still exists after the run"
        );
    }
    Run {
        label: label.to_string(),
        code: out.status.code(),
        report,
        table,
        stderr,
    }
}

/// A copy of conflist `base` with the first plugin's type replaced, written into `dir`.
pub fn conflist_with_type(dir: &Path, base: &Path, ty: &str) -> PathBuf {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(base).expect("read conflist"))
        .expect("conflist JSON");
    v["plugins"][0]["type"] = Value::String(ty.to_string());
    let p = dir.join(format!("{ty}.conflist"));
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    p
}
