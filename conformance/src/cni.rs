//! A small CNI runtime of our own, for what cnitool 1.1.2 cannot do: 1.1.0 results, STATUS, GC,
//! explicit container IDs, empty CNI_NETNS, missing variables, killing a plugin mid-ADD. It
//! follows libcni: plugins run in list order for ADD/CHECK (reverse for DEL), each gets its entry
//! of the list plus `name`, `cniVersion`, `prevResult` and `runtimeConfig` (capability arguments
//! the plugin declared in `capabilities`).

use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

/// What one plugin execution did.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub plugin: String,
    pub verb: String,
    /// Exit code, None when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The runner killed it (timeout or on purpose).
    pub killed: bool,
}

/// A spec error object, as found on stdout.
#[derive(Debug, Clone)]
pub struct CniError {
    pub code: u64,
    pub msg: String,
    pub details: Option<String>,
}

fn clip(s: &str, n: usize) -> String {
    let s = s.trim();
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

impl Invocation {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A one-line account for failure messages.
    pub fn describe(&self) -> String {
        let how = match (self.code, self.signal) {
            (Some(c), _) => format!("exited {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            _ => "ended".into(),
        };
        format!(
            "{} {} {how} after {} ms; stdout: {:?}; stderr: {:?}",
            self.plugin,
            self.verb,
            self.elapsed.as_millis(),
            clip(&self.stdout, 300),
            clip(&self.stderr, 300)
        )
    }

    /// stdout as exactly one JSON value (surrounding whitespace allowed, nothing else).
    pub fn stdout_json(&self) -> Result<Value> {
        serde_json::from_str::<Value>(&self.stdout).map_err(|e| {
            anyhow!(
                "stdout is not exactly one JSON value ({e}): {:?}",
                clip(&self.stdout, 300)
            )
        })
    }

    /// The spec's error object, checked strictly: non-zero exit, stdout holds one JSON object
    /// with an unsigned integer `code` and a string `msg` (`details`, `cniVersion` strings if
    /// present) and nothing else.
    pub fn cni_error(&self) -> Result<CniError> {
        if self.success() {
            bail!(
                "expected an error, but {} {} exited 0 (stdout {:?})",
                self.plugin,
                self.verb,
                clip(&self.stdout, 200)
            );
        }
        if self.code.is_none() {
            bail!("{}", self.describe());
        }
        if self.stdout.trim().is_empty() {
            bail!(
                "{} {} exited {:?} with nothing on stdout (the error must be JSON on stdout); stderr: {:?}",
                self.plugin,
                self.verb,
                self.code.unwrap_or(-1),
                clip(&self.stderr, 300)
            );
        }
        let v = self
            .stdout_json()
            .with_context(|| format!("{} {} error output", self.plugin, self.verb))?;
        let o = v
            .as_object()
            .ok_or_else(|| anyhow!("error output is not a JSON object: {v}"))?;
        let code = o
            .get("code")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("error object lacks an unsigned integer \"code\": {v}"))?;
        let msg = o
            .get("msg")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("error object lacks a string \"msg\": {v}"))?
            .to_string();
        for k in ["details", "cniVersion"] {
            if let Some(x) = o.get(k) {
                if !x.is_string() {
                    bail!("error object's {k:?} is not a string: {v}");
                }
            }
        }
        if msg.is_empty() {
            bail!("error object has an empty \"msg\": {v}");
        }
        Ok(CniError {
            code,
            msg,
            details: o.get("details").and_then(Value::as_str).map(str::to_string),
        })
    }
}

/// The CNI_* variables of one call; None leaves the variable unset.
#[derive(Debug, Clone, Default)]
pub struct CniEnv {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl CniEnv {
    pub fn for_att(verb: &str, att: &Att) -> CniEnv {
        CniEnv {
            command: Some(verb.into()),
            container_id: Some(att.container_id.clone()),
            netns: Some(att.netns.clone()),
            ifname: Some(att.ifname.clone()),
            args: Some(att.args.clone()),
        }
    }
    pub fn verb_only(verb: &str) -> CniEnv {
        CniEnv {
            command: Some(verb.into()),
            ..Default::default()
        }
    }
}

/// Finds and executes plugins inside the node namespace.
pub struct Plugins {
    pub dirs: Vec<PathBuf>,
    /// The node namespace, open for the run (the owner keeps the File).
    pub node_fd: RawFd,
    pub timeout: Duration,
}

impl Plugins {
    pub fn cni_path(&self) -> String {
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn find(&self, ty: &str) -> Result<PathBuf> {
        if ty.contains('/') || ty.is_empty() {
            bail!("invalid plugin type {ty:?}");
        }
        self.dirs
            .iter()
            .map(|d| d.join(ty))
            .find(|p| p.is_file())
            .ok_or_else(|| anyhow!("plugin {ty:?} not found in CNI path {}", self.cni_path()))
    }

    fn spawn(
        &self,
        ty: &str,
        env: &CniEnv,
        stdin: &[u8],
    ) -> Result<(Child, std::thread::JoinHandle<()>)> {
        let bin = self.find(ty)?;
        let mut cmd = crate::ns::command_in(self.node_fd, &bin);
        for k in [
            "CNI_COMMAND",
            "CNI_CONTAINERID",
            "CNI_NETNS",
            "CNI_IFNAME",
            "CNI_ARGS",
            "CNI_PATH",
        ] {
            cmd.env_remove(k);
        }
        let pairs = [
            ("CNI_COMMAND", &env.command),
            ("CNI_CONTAINERID", &env.container_id),
            ("CNI_NETNS", &env.netns),
            ("CNI_IFNAME", &env.ifname),
            ("CNI_ARGS", &env.args),
        ];
        for (k, v) in pairs {
            if let Some(v) = v {
                cmd.env(k, v);
            }
        }
        cmd.env("CNI_PATH", self.cni_path());
        // Its own process group: killing it mid-ADD also kills the IPAM plugin it delegated to.
        cmd.process_group(0);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("executing {}", bin.display()))?;
        let mut w = child.stdin.take().expect("piped stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = w.write_all(&data);
        });
        Ok((child, writer))
    }

    /// Runs a plugin to completion (killed after the timeout).
    pub fn invoke(&self, ty: &str, env: &CniEnv, stdin: &[u8]) -> Result<Invocation> {
        self.invoke_kill_after(ty, env, stdin, self.timeout)
            .map(|(inv, _)| inv)
    }

    /// Runs a plugin and SIGKILLs its process group if it still runs after `after`. Returns
    /// whether it was killed.
    pub fn invoke_kill_after(
        &self,
        ty: &str,
        env: &CniEnv,
        stdin: &[u8],
        after: Duration,
    ) -> Result<(Invocation, bool)> {
        let start = Instant::now();
        let (mut child, writer) = self.spawn(ty, env, stdin)?;
        let mut out = child.stdout.take().expect("piped stdout");
        let mut err = child.stderr.take().expect("piped stderr");
        let rd_out = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = out.read_to_end(&mut b);
            b
        });
        let rd_err = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        let pid = child.id() as i32;
        // A waiter thread reaps the child; we wait on its signal with a timeout (no polling).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = std::thread::spawn(move || {
            let st = child.wait();
            let _ = tx.send(());
            st
        });
        let timed_out = rx.recv_timeout(after).is_err();
        if timed_out {
            // SAFETY: kill(2) on our own child's process group (the plugin and what it spawned).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
        }
        let status = waiter
            .join()
            .map_err(|_| anyhow!("waiter thread panicked"))??;
        let killed = timed_out && status.signal().is_some();
        let elapsed = start.elapsed();
        let _ = writer.join();
        let stdout = String::from_utf8_lossy(&rd_out.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&rd_err.join().unwrap_or_default()).into_owned();
        Ok((
            Invocation {
                plugin: ty.to_string(),
                verb: env
                    .command
                    .clone()
                    .unwrap_or_else(|| "(no CNI_COMMAND)".into()),
                code: status.code(),
                signal: status.signal(),
                stdout,
                stderr,
                elapsed,
                killed,
            },
            killed,
        ))
    }
}

/// A network configuration list.
#[derive(Debug, Clone)]
pub struct NetList {
    pub raw: Value,
}

impl NetList {
    pub fn parse(text: &str) -> Result<NetList> {
        let raw: Value = serde_json::from_str(text).context("the conflist is not valid JSON")?;
        let l = NetList { raw };
        if l.name().is_empty() {
            bail!("the conflist has no \"name\"");
        }
        if l.plugins().is_empty() {
            bail!("the conflist has no \"plugins\"");
        }
        for (i, p) in l.plugins().iter().enumerate() {
            if p.get("type")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
            {
                bail!("plugin {i} of the conflist has no \"type\"");
            }
        }
        Ok(l)
    }

    pub fn name(&self) -> String {
        self.raw
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    pub fn version(&self) -> String {
        self.raw
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    pub fn plugins(&self) -> Vec<Value> {
        self.raw
            .get("plugins")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    pub fn plugin_type(&self, i: usize) -> String {
        self.plugins()[i]
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    }

    pub fn types(&self) -> Vec<String> {
        (0..self.plugins().len())
            .map(|i| self.plugin_type(i))
            .collect()
    }

    /// The same list speaking `version` (cniVersions, a 1.1.0 list key, is dropped).
    pub fn with_version(&self, version: &str) -> NetList {
        let mut raw = self.raw.clone();
        raw["cniVersion"] = json!(version);
        if let Some(o) = raw.as_object_mut() {
            o.remove("cniVersions");
        }
        NetList { raw }
    }

    pub fn with_plugins_appended(&self, extra: &[Value]) -> NetList {
        let mut raw = self.raw.clone();
        let mut plugins = self.plugins();
        plugins.extend_from_slice(extra);
        raw["plugins"] = Value::Array(plugins);
        NetList { raw }
    }

    /// Plugin `i`'s stdin, as libcni builds it.
    pub fn plugin_stdin(
        &self,
        i: usize,
        prev: Option<&Value>,
        cap_args: &Value,
        extra: &Map<String, Value>,
    ) -> Value {
        let mut conf = self.plugins()[i].clone();
        conf["name"] = json!(self.name());
        conf["cniVersion"] = json!(self.version());
        if let Some(p) = prev {
            conf["prevResult"] = p.clone();
        }
        let mut rc = Map::new();
        if let (Some(caps), Some(args)) = (
            conf.get("capabilities").and_then(Value::as_object),
            cap_args.as_object(),
        ) {
            for (k, on) in caps {
                if on.as_bool() == Some(true) {
                    if let Some(v) = args.get(k) {
                        rc.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        if !rc.is_empty() {
            conf["runtimeConfig"] = Value::Object(rc);
        }
        for (k, v) in extra {
            conf[k] = v.clone();
        }
        conf
    }

    pub fn write_to(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let p = dir.join(format!("{}.conflist", self.name()));
        std::fs::write(&p, serde_json::to_vec_pretty(&self.raw)?)?;
        Ok(p)
    }
}

/// One attachment: what CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS and the capability
/// arguments say.
#[derive(Debug, Clone)]
pub struct Att {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub cap_args: Value,
}

/// What a list operation did.
#[derive(Debug, Clone, Default)]
pub struct ListOut {
    pub invocations: Vec<Invocation>,
    /// ADD's final result.
    pub result: Option<Value>,
    /// Why it failed; None when every plugin succeeded.
    pub failure: Option<String>,
}

impl ListOut {
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }
    pub fn last(&self) -> Option<&Invocation> {
        self.invocations.last()
    }
    pub fn check_ok(&self, what: &str) -> Result<()> {
        match &self.failure {
            None => Ok(()),
            Some(f) => bail!("{what} failed: {f}"),
        }
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

fn ge(v: &str, min: &str) -> bool {
    version_tuple(v) >= version_tuple(min)
}

/// ADD through the list; `kill_at` kills whichever plugin runs at that moment (measured from the
/// start of the list).
pub fn add(
    p: &Plugins,
    list: &NetList,
    att: &Att,
    kill_at: Option<Duration>,
) -> Result<(ListOut, bool)> {
    let start = Instant::now();
    let mut out = ListOut::default();
    let mut prev: Option<Value> = None;
    for i in 0..list.plugins().len() {
        let stdin =
            serde_json::to_vec(&list.plugin_stdin(i, prev.as_ref(), &att.cap_args, &Map::new()))?;
        let ty = list.plugin_type(i);
        let env = CniEnv::for_att("ADD", att);
        let (inv, killed) = match kill_at {
            Some(at) => {
                let left = at.saturating_sub(start.elapsed());
                p.invoke_kill_after(&ty, &env, &stdin, left)?
            }
            None => (p.invoke(&ty, &env, &stdin)?, false),
        };
        out.invocations.push(inv.clone());
        if killed {
            out.failure = Some(format!(
                "{ty} ADD killed by the runner after {} ms",
                inv.elapsed.as_millis()
            ));
            return Ok((out, kill_at.is_some()));
        }
        if !inv.success() {
            out.failure = Some(inv.describe());
            return Ok((out, false));
        }
        match inv.stdout_json() {
            Ok(v) => prev = Some(v),
            Err(e) => {
                out.failure = Some(format!("{ty} ADD exited 0 but {e}"));
                return Ok((out, false));
            }
        }
    }
    out.result = prev;
    Ok((out, false))
}

/// A verb without a result (CHECK in order, DEL in reverse), every plugin getting `prev`.
fn simple(
    p: &Plugins,
    list: &NetList,
    att: &Att,
    verb: &str,
    prev: Option<&Value>,
    reverse: bool,
    kill_at: Option<Duration>,
) -> Result<ListOut> {
    let start = Instant::now();
    let mut out = ListOut::default();
    let mut order: Vec<usize> = (0..list.plugins().len()).collect();
    if reverse {
        order.reverse();
    }
    // libcni passes prevResult to DEL and CHECK from 0.4.0 on.
    let prev = if ge(&list.version(), "0.4.0") {
        prev
    } else {
        None
    };
    for i in order {
        let stdin = serde_json::to_vec(&list.plugin_stdin(i, prev, &att.cap_args, &Map::new()))?;
        let ty = list.plugin_type(i);
        let env = CniEnv::for_att(verb, att);
        let (inv, killed) = match kill_at {
            Some(at) => {
                p.invoke_kill_after(&ty, &env, &stdin, at.saturating_sub(start.elapsed()))?
            }
            None => (p.invoke(&ty, &env, &stdin)?, false),
        };
        if killed {
            out.failure = Some(format!(
                "{ty} {verb} killed by the runner after {} ms",
                inv.elapsed.as_millis()
            ));
            out.invocations.push(inv);
            return Ok(out);
        }
        let failed = !inv.success();
        let junk = !failed && !inv.stdout.trim().is_empty() && inv.stdout_json().is_err();
        out.invocations.push(inv.clone());
        if failed {
            out.failure = Some(inv.describe());
            return Ok(out);
        }
        if junk {
            out.failure = Some(format!(
                "{ty} {verb} exited 0 but its stdout is not JSON: {:?}",
                clip(&inv.stdout, 200)
            ));
            return Ok(out);
        }
    }
    Ok(out)
}

pub fn check(p: &Plugins, list: &NetList, att: &Att, prev: &Value) -> Result<ListOut> {
    simple(p, list, att, "CHECK", Some(prev), false, None)
}

pub fn del(p: &Plugins, list: &NetList, att: &Att, prev: Option<&Value>) -> Result<ListOut> {
    simple(p, list, att, "DEL", prev, true, None)
}

/// DEL whose running plugin is SIGKILLed `at` after the start; `killed` says whether it landed.
pub fn del_kill_at(
    p: &Plugins,
    list: &NetList,
    att: &Att,
    prev: Option<&Value>,
    at: Duration,
) -> Result<(ListOut, bool)> {
    let out = simple(p, list, att, "DEL", prev, true, Some(at))?;
    let killed = out.invocations.last().is_some_and(|i| i.killed);
    Ok((out, killed))
}

/// STATUS (1.1.0) to every plugin of the list; no container variables.
pub fn status(p: &Plugins, list: &NetList) -> Result<ListOut> {
    let mut out = ListOut::default();
    for i in 0..list.plugins().len() {
        let stdin = serde_json::to_vec(&list.plugin_stdin(i, None, &Value::Null, &Map::new()))?;
        let ty = list.plugin_type(i);
        let inv = p.invoke(&ty, &CniEnv::verb_only("STATUS"), &stdin)?;
        out.invocations.push(inv.clone());
        if !inv.success() {
            out.failure = Some(inv.describe());
            return Ok(out);
        }
    }
    Ok(out)
}

/// GC (1.1.0) to every plugin of the list. `valid` None sends no list at all (as upstream
/// `cnitool gc` does); otherwise both keys libcni sends.
pub fn gc(p: &Plugins, list: &NetList, valid: Option<&[(String, String)]>) -> Result<ListOut> {
    gc_with_keys(p, list, valid, GC_KEYS)
}

/// The keys libcni puts the valid-attachment list under: the current one and spec tag 1.1.0's.
pub const GC_KEYS: &[&str] = &["cni.dev/valid-attachments", "cni.dev/attachments"];

/// GC with the list under the given keys only.
pub fn gc_with_keys(
    p: &Plugins,
    list: &NetList,
    valid: Option<&[(String, String)]>,
    keys: &[&str],
) -> Result<ListOut> {
    let mut extra = Map::new();
    if let Some(valid) = valid {
        let l: Vec<Value> = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        for k in keys {
            extra.insert(k.to_string(), Value::Array(l.clone()));
        }
    }
    let mut out = ListOut::default();
    for i in 0..list.plugins().len() {
        let stdin = serde_json::to_vec(&list.plugin_stdin(i, None, &Value::Null, &extra))?;
        let ty = list.plugin_type(i);
        let inv = p.invoke(&ty, &CniEnv::verb_only("GC"), &stdin)?;
        out.invocations.push(inv.clone());
        if !inv.success() {
            out.failure = Some(inv.describe());
            return Ok(out);
        }
    }
    Ok(out)
}

/// VERSION of one plugin with `{"cniVersion": version}` on stdin.
pub fn version(p: &Plugins, ty: &str, version: &str) -> Result<Invocation> {
    p.invoke(
        ty,
        &CniEnv::verb_only("VERSION"),
        json!({"cniVersion": version}).to_string().as_bytes(),
    )
}

/// `supportedVersions` from a VERSION answer.
pub fn supported_versions(inv: &Invocation) -> Result<Vec<String>> {
    if !inv.success() {
        bail!("VERSION failed: {}", inv.describe());
    }
    let v = inv.stdout_json()?;
    let list = v
        .get("supportedVersions")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("VERSION output has no supportedVersions array: {v}"))?;
    let mut out = Vec::new();
    for x in list {
        out.push(
            x.as_str()
                .ok_or_else(|| anyhow!("supportedVersions holds a non-string: {x}"))?
                .to_string(),
        );
    }
    Ok(out)
}
