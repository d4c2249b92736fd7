//! CNI errors: a spec error code, a message and details, printed as JSON on stdout.

use serde::Serialize;

/// Error codes. 1-99 are the spec's (SPEC.md "Error codes"); 100+ are sluice's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADD now.
    Unavailable = 50,
    /// sluice: CNI_IFNAME (or its host-side peer) already exists: a second ADD.
    InterfaceExists = 100,
    /// sluice: a netlink operation failed.
    Netlink = 101,
    /// sluice: the daemon refused the request (for example: pod CIDR exhausted).
    Daemon = 102,
    /// sluice: CHECK found the pod's networking differs from prevResult.
    CheckFailed = 103,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl std::fmt::Display) -> Self {
        self.details = details.to_string();
        self
    }

    /// The spec's error object, for stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Wire<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_string(&Wire {
            cni_version,
            code: self.code as u32,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("error JSON")
    }
}

pub type Result<T> = std::result::Result<T, CniError>;

/// Shorthand: `err(Code::X, "msg")`.
pub fn err(code: Code, msg: impl Into<String>) -> CniError {
    CniError::new(code, msg)
}
