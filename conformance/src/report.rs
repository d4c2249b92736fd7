//! The per-case table for people and JSON for machines.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    #[serde(rename = "pass")]
    Pass,
    #[serde(rename = "fail")]
    Fail,
    #[serde(rename = "n/a")]
    NotApplicable,
}

impl Status {
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "FAIL",
            Status::NotApplicable => "n/a",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    pub name: String,
    pub result: Status,
    pub required: bool,
    pub seconds: f64,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub plugin: String,
    pub network: String,
    pub conflist: String,
    pub cni_path: String,
    pub advertised_versions: Vec<String>,
    pub cnitool_version: Option<String>,
    pub default_version: String,
    pub allocation_probe: String,
    /// The node namespace and work dir the run used (both gone when it ends).
    pub node_netns: String,
    pub workdir: String,
    pub cases: Vec<CaseReport>,
    pub passed: usize,
    pub failed: usize,
    pub failed_required: usize,
    pub not_applicable: usize,
    pub seconds: f64,
    /// true when no required case failed.
    pub ok: bool,
}

impl Report {
    pub fn finish(&mut self) {
        self.passed = self
            .cases
            .iter()
            .filter(|c| c.result == Status::Pass)
            .count();
        self.failed = self
            .cases
            .iter()
            .filter(|c| c.result == Status::Fail)
            .count();
        self.failed_required = self
            .cases
            .iter()
            .filter(|c| c.result == Status::Fail && c.required)
            .count();
        self.not_applicable = self
            .cases
            .iter()
            .filter(|c| c.result == Status::NotApplicable)
            .count();
        self.ok = self.failed_required == 0;
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "cni-conformance: plugin {} (network {:?}, {}), advertises {}; cnitool drives {}, default version {}\n",
            self.plugin,
            self.network,
            self.conflist,
            if self.advertised_versions.is_empty() { "nothing".into() } else { self.advertised_versions.join(", ") },
            self.cnitool_version.clone().unwrap_or_else(|| "nothing".into()),
            self.default_version
        ));
        s.push_str(&format!(
            "allocations checked with: {}\n\n",
            self.allocation_probe
        ));
        let w = self
            .cases
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        s.push_str(&format!(
            "{:<w$}  {:<6} {:<4} {:>6}  {}\n",
            "CASE", "RESULT", "REQ", "TIME", "DETAIL"
        ));
        for c in &self.cases {
            let detail: String = if c.result == Status::Fail || c.detail.chars().count() <= 150 {
                c.detail.clone()
            } else {
                format!("{}…", c.detail.chars().take(150).collect::<String>())
            };
            s.push_str(&format!(
                "{:<w$}  {:<6} {:<4} {:>5.1}s  {}\n",
                c.name,
                c.result.as_str(),
                if c.required { "req" } else { "adv" },
                c.seconds,
                detail.replace('\n', " ")
            ));
        }
        s.push_str(&format!(
            "\n{} passed, {} failed ({} required), {} not applicable in {:.0} s: {}\n",
            self.passed,
            self.failed,
            self.failed_required,
            self.not_applicable,
            self.seconds,
            if self.ok {
                "CONFORMANT for the advertised versions"
            } else {
                "NOT CONFORMANT"
            }
        ));
        s
    }
}
