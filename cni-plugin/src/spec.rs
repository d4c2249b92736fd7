//! The CNI protocol: environment, network configuration, versions (spec 1.1.0, CONVENTIONS.md).

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{err, CniError, Code, Result};

/// Versions we answer for, exactly (a config with any other cniVersion gets error 1).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// The version we speak when the caller did not say.
pub const LATEST: &str = "1.1.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Version,
    Gc,
}

/// The CNI_* environment of one invocation.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS as key/value pairs; unknown keys are kept and ignored.
    pub args: HashMap<String, String>,
}

/// Reads and validates the environment a verb needs (error 4 otherwise).
pub fn read_env(get: impl Fn(&str) -> Option<String>) -> Result<(Command, Env)> {
    let command = match get("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("STATUS") => Command::Status,
        Some("VERSION") => Command::Version,
        Some("GC") => Command::Gc,
        Some(other) => {
            return Err(err(
                Code::InvalidEnv,
                format!("unknown CNI_COMMAND {other:?}"),
            ))
        }
        None => return Err(err(Code::InvalidEnv, "CNI_COMMAND is not set")),
    };
    let mut env = Env {
        container_id: get("CNI_CONTAINERID").unwrap_or_default(),
        netns: get("CNI_NETNS").unwrap_or_default(),
        ifname: get("CNI_IFNAME").unwrap_or_default(),
        args: parse_args(&get("CNI_ARGS").unwrap_or_default())?,
    };
    if matches!(command, Command::Add | Command::Del | Command::Check) {
        validate_container_id(&env.container_id)?;
        validate_ifname(&env.ifname)?;
        // DEL may come with an empty CNI_NETNS: the sandbox is already gone.
        if command != Command::Del && env.netns.is_empty() {
            return Err(err(Code::InvalidEnv, "CNI_NETNS is not set"));
        }
    } else {
        env.container_id.clear();
    }
    Ok((command, env))
}

/// CNI_ARGS: `K=V;K=V`. Keys are free-form; runtimes send IgnoreUnknown and K8S_POD_*.
pub fn parse_args(s: &str) -> Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in s.split(';').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            err(
                Code::InvalidEnv,
                format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
            )
        })?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

pub fn validate_container_id(id: &str) -> Result<()> {
    let mut chars = id.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {
            chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else if id.is_empty() {
        Err(err(Code::InvalidEnv, "CNI_CONTAINERID is not set"))
    } else {
        Err(err(
            Code::InvalidEnv,
            format!("CNI_CONTAINERID {id:?} has invalid characters"),
        ))
    }
}

pub fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(err(Code::InvalidEnv, "CNI_IFNAME is not set"));
    }
    if name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(err(
            Code::InvalidEnv,
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
        ));
    }
    Ok(())
}

/// One attachment in a GC request.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct GcAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's stdin: its entry of the network configuration list plus what the runtime adds.
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub plugin_type: String,
    /// sluiced's socket.
    #[serde(default = "default_socket")]
    pub socket: String,
    /// MTU of both ends of the pod's veth.
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<GcAttachment>>,
    /// The key spec tag v1.1.0 used for the same list.
    #[serde(rename = "cni.dev/attachments")]
    pub attachments: Option<Vec<GcAttachment>>,
}

fn default_socket() -> String {
    sluice_core::DEFAULT_SOCKET.to_string()
}

fn default_mtu() -> u32 {
    1500
}

impl NetConf {
    /// Decodes stdin: not JSON → 6; JSON of the wrong shape → 7; a version we do not speak → 1.
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            err(Code::Decode, "network configuration is not valid JSON").with_details(e)
        })?;
        if !value.is_object() {
            return Err(err(
                Code::Decode,
                "network configuration is not a JSON object",
            ));
        }
        let conf: NetConf = serde_json::from_value(value).map_err(|e| {
            err(Code::InvalidConfig, "invalid network configuration").with_details(e)
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(err(
                Code::IncompatibleVersion,
                format!("incompatible CNI version {:?}", conf.cni_version),
            )
            .with_details(format!(
                "supported versions: {}",
                SUPPORTED_VERSIONS.join(", ")
            )));
        }
        if conf.name.is_empty() {
            return Err(err(
                Code::InvalidConfig,
                "network configuration has an empty \"name\"",
            ));
        }
        if !(68..=65535).contains(&conf.mtu) {
            return Err(err(
                Code::InvalidConfig,
                format!("mtu {} is out of range 68..65535", conf.mtu),
            ));
        }
        if conf.socket.is_empty() {
            return Err(err(Code::InvalidConfig, "\"socket\" is empty"));
        }
        Ok(conf)
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn require_at_least_1_1(&self, verb: &str) -> Result<()> {
        if version_tuple(&self.cni_version) < (1, 1, 0) {
            return Err(err(
                Code::IncompatibleVersion,
                format!(
                    "{verb} needs cniVersion 1.1.0 or later, config has {}",
                    self.cni_version
                ),
            ));
        }
        Ok(())
    }

    /// GC's list of attachments to keep, under either key. None: the runtime sent no list.
    pub fn gc_keep_list(&self) -> Option<&[GcAttachment]> {
        self.valid_attachments
            .as_deref()
            .or(self.attachments.as_deref())
    }
}

pub fn version_tuple(v: &str) -> (u32, u32, u32) {
    let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

/// VERSION's answer; `stdin` may be empty or carry {"cniVersion": ...}.
pub fn version_info(stdin: &[u8]) -> Result<String> {
    let requested = if stdin.iter().all(u8::is_ascii_whitespace) {
        LATEST.to_string()
    } else {
        let v: Value = serde_json::from_slice(stdin)
            .map_err(|e| err(Code::Decode, "VERSION input is not valid JSON").with_details(e))?;
        v.get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or(LATEST)
            .to_string()
    };
    Ok(
        serde_json::json!({"cniVersion": requested, "supportedVersions": SUPPORTED_VERSIONS})
            .to_string(),
    )
}

impl From<std::io::Error> for CniError {
    fn from(e: std::io::Error) -> Self {
        err(Code::Io, "I/O error").with_details(e)
    }
}
