//! The run: a node namespace, the hooks, the plugin under test, pods, and the cases in order.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::cni::{self, Att, Invocation, NetList, Plugins};
use crate::cnitool::{self, Cnitool};
use crate::fixture::{self, Netns, TempDir};
use crate::netstate::{self, NetState};
use crate::schema;

/// The versions this suite knows how to check (released, with CHECK).
pub const KNOWN_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// Newest version libcni 1.1.2 (cnitool) accepts in results.
pub const CNITOOL_MAX: &str = "1.0.0";

#[derive(Debug, Clone)]
pub struct Options {
    pub cni_path: Vec<PathBuf>,
    pub conflist: PathBuf,
    pub setup: Option<String>,
    pub teardown: Option<String>,
    pub cleanup: Option<String>,
    pub cnitool: Option<PathBuf>,
    pub only: Vec<String>,
    pub skip: Vec<String>,
    pub alloc_cmd: Option<String>,
    pub node_addr: String,
    pub ifname: String,
    pub concurrency: usize,
    pub kill_rounds: usize,
    pub timeout: Duration,
    pub keep_workdir: bool,
    pub no_cnitool: bool,
    pub progress: bool,
}

/// How to read the plugin's IP allocations, to see that DEL releases them.
#[derive(Debug, Clone)]
pub enum AllocProbe {
    /// `--alloc-cmd`: its stdout must be the same before ADD and after DEL.
    Cmd(String),
    /// host-local's store, found in the conflist: `<dataDir>/<network name>`.
    HostLocal(PathBuf),
    None,
}

impl AllocProbe {
    pub fn describe(&self) -> String {
        match self {
            AllocProbe::Cmd(c) => format!("--alloc-cmd {c:?}"),
            AllocProbe::HostLocal(d) => format!("host-local store {}", d.display()),
            AllocProbe::None => {
                "none (no --alloc-cmd, no host-local in the conflist): allocations unchecked".into()
            }
        }
    }
}

/// Everything the cases and pods share.
pub struct Rt {
    pub opts: Options,
    pub id: String,
    pub workdir: PathBuf,
    pub node: Netns,
    node_file: File,
    pub plugins: Plugins,
    pub cnitool: Option<Cnitool>,
    pub cnitool_error: Option<String>,
    pub list: NetList,
    pub main_type: String,
    pub advertised: Vec<String>,
    pub version_error: Option<String>,
    /// The version cnitool drives the plugin with (≤ 1.0.0), if any.
    pub cnitool_version: Option<String>,
    /// The version ordinary pods use.
    pub default_version: String,
    pub alloc: AllocProbe,
    pub live: Mutex<BTreeSet<(String, String)>>,
    confdirs: Mutex<HashMap<String, PathBuf>>,
    hooks_log: PathBuf,
    pub hooks_started: std::sync::atomic::AtomicBool,
}

pub fn version_ge(a: &str, b: &str) -> bool {
    cni::version_tuple(a) >= cni::version_tuple(b)
}

impl Rt {
    pub fn node_path(&self) -> PathBuf {
        self.node.path()
    }

    pub fn advertises(&self, v: &str) -> bool {
        self.advertised.iter().any(|a| a == v)
    }

    /// The list speaking `version`.
    pub fn list_v(&self, version: &str) -> NetList {
        self.list.with_version(version)
    }

    /// A NETCONFPATH directory holding `list` for cnitool.
    pub fn confdir(&self, list: &NetList) -> Result<PathBuf> {
        let key = list.raw.to_string();
        let mut m = self.confdirs.lock().unwrap();
        if let Some(d) = m.get(&key) {
            return Ok(d.clone());
        }
        let d = self.workdir.join(format!("netconf-{}", m.len()));
        list.write_to(&d)?;
        m.insert(key, d.clone());
        Ok(d)
    }

    pub fn hook_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "CONFORMANCE_NODE_NETNS".into(),
                self.node_path().display().to_string(),
            ),
            (
                "CONFORMANCE_WORKDIR".into(),
                self.workdir.display().to_string(),
            ),
            ("CONFORMANCE_ID".into(), self.id.clone()),
            ("CONFORMANCE_CNI_PATH".into(), self.plugins.cni_path()),
        ]
    }

    /// Runs a hook (`sh -c CMD`) inside the node namespace; output goes to hooks.log (not a
    /// pipe: a daemon the hook starts in the background keeps its output open).
    pub fn hook(&self, which: &str, cmd: &str) -> Result<()> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.hooks_log)?;
        writeln!(log, "=== {which}: {cmd}")?;
        let mut c = crate::ns::command_in(self.node_file.as_raw_fd(), "sh");
        c.arg("-c")
            .arg(cmd)
            .envs(self.hook_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = c
            .spawn()
            .with_context(|| format!("running the {which} hook"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        let st = loop {
            if let Some(st) = child.try_wait()? {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the {which} hook did not finish within 120 s{}",
                    self.hooks_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !st.success() {
            bail!(
                "the {which} hook {cmd:?} failed ({st}){}",
                self.hooks_tail()
            );
        }
        Ok(())
    }

    pub fn hooks_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.hooks_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; hooks.log ends:\n  {tail}")
        }
    }

    pub fn alloc_snapshot(&self) -> Result<Option<String>> {
        match &self.alloc {
            AllocProbe::None => Ok(None),
            AllocProbe::HostLocal(dir) => {
                let mut names: Vec<String> = match std::fs::read_dir(dir) {
                    Ok(rd) => rd
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
                        .collect(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                    Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
                };
                names.sort();
                // Each reservation with its owner ("<containerID> <ifname>"), so a leak shows
                // whose it is (or that the file is empty).
                let entries: Vec<String> = names
                    .iter()
                    .map(|n| {
                        let owner = std::fs::read_to_string(dir.join(n)).unwrap_or_default();
                        let owner = owner.split_whitespace().collect::<Vec<_>>().join(" ");
                        format!(
                            "{n}[{}]",
                            if owner.is_empty() {
                                "empty file"
                            } else {
                                &owner
                            }
                        )
                    })
                    .collect();
                Ok(Some(entries.join(" ")))
            }
            AllocProbe::Cmd(cmd) => {
                let out = crate::ns::command_in(self.node_file.as_raw_fd(), "sh")
                    .arg("-c")
                    .arg(cmd)
                    .envs(self.hook_env())
                    .stdin(Stdio::null())
                    .output()
                    .context("running --alloc-cmd")?;
                if !out.status.success() {
                    bail!(
                        "--alloc-cmd failed ({}): {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
                Ok(Some(
                    String::from_utf8_lossy(&out.stdout).trim().to_string(),
                ))
            }
        }
    }

    pub fn node_state(&self) -> Result<NetState> {
        netstate::snapshot(&self.node.name)
    }

    pub fn live_list(&self) -> Vec<(String, String)> {
        self.live.lock().unwrap().iter().cloned().collect()
    }
}

/// The outcome of one operation that may fail on purpose.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub ok: bool,
    pub detail: String,
    pub result: Option<Value>,
    /// The last plugin invocation (own runtime only).
    pub last: Option<Invocation>,
}

/// A pod: its own namespace plus one attachment. Dropping it DELs the attachment (best effort),
/// removes cnitool's cached result and deletes the namespace.
pub struct Pod {
    rt: Arc<Rt>,
    pub ns: Option<Netns>,
    pub ns_name: String,
    pub att: Att,
    pub list: NetList,
    pub use_cnitool: bool,
    pub result: Option<Value>,
    pub added: bool,
}

impl Pod {
    fn make(rt: &Arc<Rt>, tag: &str, list: NetList, use_cnitool: bool) -> Result<Pod> {
        let ns = Netns::new(tag)?;
        let path = ns.path().display().to_string();
        Ok(Pod {
            rt: rt.clone(),
            ns_name: ns.name.clone(),
            att: Att {
                container_id: cnitool::container_id(&path),
                netns: path,
                ifname: rt.opts.ifname.clone(),
                args: "IgnoreUnknown=1;K8S_POD_NAMESPACE=conformance;K8S_POD_NAME=pod".into(),
                cap_args: Value::Null,
            },
            ns: Some(ns),
            list,
            use_cnitool,
            result: None,
            added: false,
        })
    }

    /// A pod driven the default way: cnitool at the version it supports, else our runtime.
    pub fn new(rt: &Arc<Rt>, tag: &str) -> Result<Pod> {
        let v = rt.default_version.clone();
        Pod::make(
            rt,
            tag,
            rt.list_v(&v),
            rt.cnitool_version.is_some() && rt.cnitool.is_some(),
        )
    }

    /// A pod driven by our own runtime with `list`.
    pub fn own(rt: &Arc<Rt>, tag: &str, list: NetList) -> Result<Pod> {
        Pod::make(rt, tag, list, false)
    }

    /// A pod driven by cnitool with `list`.
    pub fn via_cnitool(rt: &Arc<Rt>, tag: &str, list: NetList) -> Result<Pod> {
        if rt.cnitool.is_none() {
            bail!(
                "cnitool is unavailable: {}",
                rt.cnitool_error.clone().unwrap_or_default()
            );
        }
        Pod::make(rt, tag, list, true)
    }

    pub fn path(&self) -> &str {
        &self.att.netns
    }

    pub fn driver(&self) -> String {
        format!(
            "{} {}",
            if self.use_cnitool {
                "cnitool"
            } else {
                "runner"
            },
            self.list.version()
        )
    }

    fn cnitool_run(&self, verb: &str) -> Result<cnitool::CnitoolOut> {
        let ct = self
            .rt
            .cnitool
            .as_ref()
            .ok_or_else(|| anyhow!("cnitool unavailable"))?;
        let dir = self.rt.confdir(&self.list)?;
        let cap = if self.att.cap_args.is_null() {
            None
        } else {
            Some(&self.att.cap_args)
        };
        ct.run(
            verb,
            &dir,
            &self.list.name(),
            &self.att.netns,
            &self.att.ifname,
            cap,
            Some(&self.att.args),
        )
    }

    pub fn try_add(&mut self) -> Result<Attempt> {
        self.added = true; // whatever happens, Drop DELs
        if self.use_cnitool {
            let out = self.cnitool_run("add")?;
            if !out.success() {
                return Ok(Attempt {
                    ok: false,
                    detail: out.describe(),
                    result: None,
                    last: None,
                });
            }
            let v: Value = serde_json::from_str(&out.stdout).map_err(|e| {
                anyhow!(
                    "cnitool add printed something that is not JSON ({e}): {:?}",
                    out.stdout
                )
            })?;
            self.result = Some(v.clone());
            self.rt
                .live
                .lock()
                .unwrap()
                .insert((self.att.container_id.clone(), self.att.ifname.clone()));
            Ok(Attempt {
                ok: true,
                detail: String::new(),
                result: Some(v),
                last: None,
            })
        } else {
            let (out, _) = cni::add(&self.rt.plugins, &self.list, &self.att, None)?;
            if let Some(r) = &out.result {
                self.result = Some(r.clone());
                self.rt
                    .live
                    .lock()
                    .unwrap()
                    .insert((self.att.container_id.clone(), self.att.ifname.clone()));
            }
            Ok(Attempt {
                ok: out.ok(),
                detail: out.failure.clone().unwrap_or_default(),
                result: out.result.clone(),
                last: out.last().cloned(),
            })
        }
    }

    /// ADD that must succeed; returns the result.
    pub fn add(&mut self) -> Result<Value> {
        let a = self.try_add()?;
        if !a.ok {
            bail!("ADD ({}) failed: {}", self.driver(), a.detail);
        }
        Ok(a.result.expect("result of a successful ADD"))
    }

    /// A second ADD by our own runtime (same container, netns, interface), whatever the driver.
    pub fn own_add_again(&self) -> Result<(cni::ListOut, bool)> {
        cni::add(&self.rt.plugins, &self.list, &self.att, None)
    }

    pub fn try_check(&self) -> Result<Attempt> {
        if self.use_cnitool {
            let out = self.cnitool_run("check")?;
            Ok(Attempt {
                ok: out.success(),
                detail: out.describe(),
                result: None,
                last: None,
            })
        } else {
            let prev = self.result.clone().unwrap_or(Value::Null);
            let out = cni::check(&self.rt.plugins, &self.list, &self.att, &prev)?;
            Ok(Attempt {
                ok: out.ok(),
                detail: out.failure.clone().unwrap_or_default(),
                result: None,
                last: out.last().cloned(),
            })
        }
    }

    pub fn try_del(&mut self) -> Result<Attempt> {
        let a = if self.use_cnitool {
            let out = self.cnitool_run("del")?;
            Attempt {
                ok: out.success(),
                detail: out.describe(),
                result: None,
                last: None,
            }
        } else {
            let out = cni::del(
                &self.rt.plugins,
                &self.list,
                &self.att,
                self.result.as_ref(),
            )?;
            Attempt {
                ok: out.ok(),
                detail: out.failure.clone().unwrap_or_default(),
                result: None,
                last: out.last().cloned(),
            }
        };
        if a.ok {
            self.rt
                .live
                .lock()
                .unwrap()
                .remove(&(self.att.container_id.clone(), self.att.ifname.clone()));
        }
        Ok(a)
    }

    /// DEL that must succeed.
    pub fn del(&mut self) -> Result<()> {
        let a = self.try_del()?;
        if !a.ok {
            bail!("DEL ({}) failed: {}", self.driver(), a.detail);
        }
        self.added = false;
        Ok(())
    }

    /// DEL by our own runtime with CNI_NETNS set to `netns` (e.g. empty).
    pub fn own_del_with_netns(&mut self, netns: &str) -> Result<Attempt> {
        let mut att = self.att.clone();
        att.netns = netns.to_string();
        let out = cni::del(&self.rt.plugins, &self.list, &att, self.result.as_ref())?;
        if out.ok() {
            self.rt
                .live
                .lock()
                .unwrap()
                .remove(&(self.att.container_id.clone(), self.att.ifname.clone()));
            self.added = false;
        }
        Ok(Attempt {
            ok: out.ok(),
            detail: out.failure.clone().unwrap_or_default(),
            result: None,
            last: out.last().cloned(),
        })
    }

    /// The first address the result gives our interface.
    pub fn ip(&self) -> Result<IpAddr> {
        let r = self
            .result
            .as_ref()
            .ok_or_else(|| anyhow!("pod has no result"))?;
        schema::sandbox_addresses(r, &self.att.ifname)
            .first()
            .map(|(ip, _)| *ip)
            .ok_or_else(|| anyhow!("the result has no address for {}: {r}", self.att.ifname))
    }

    /// Deletes the pod's namespace (the sandbox is gone), keeping the path for DEL.
    pub fn remove_netns(&mut self) {
        self.ns = None;
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(&self.att.netns)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        if self.added {
            let _ = cni::del(
                &self.rt.plugins,
                &self.list,
                &self.att,
                self.result.as_ref(),
            );
        }
        self.rt
            .live
            .lock()
            .unwrap()
            .remove(&(self.att.container_id.clone(), self.att.ifname.clone()));
        let _ = std::fs::remove_file(cnitool::cache_file(
            &self.list.name(),
            &self.att.container_id,
            &self.att.ifname,
        ));
    }
}

/// ping from inside `ns` (a netns path): up to three single pings.
pub fn ping(ns: &Path, ip: IpAddr) -> Result<()> {
    let f = crate::ns::open(ns)?;
    let mut last = String::new();
    for _ in 0..3 {
        let out = crate::ns::command_in(f.as_raw_fd(), "ping")
            .args(["-n", "-c", "1", "-W", "1", &ip.to_string()])
            .stdin(Stdio::null())
            .output()
            .context("running ping")?;
        if out.status.success() {
            return Ok(());
        }
        last = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    bail!("ping {ip} from {} failed: {last}", ns.display())
}

/// A TCP round trip: a listener on `port` (0: any) in `server_ns`, a client in `client_ns` that
/// connects to `target` (its port replaced by the listener's when `port` is 0), sends a line and
/// expects it echoed.
pub fn tcp_echo(
    server_ns: &Path,
    port: u16,
    client_ns: &Path,
    target: IpAddr,
    target_port: Option<u16>,
) -> Result<()> {
    let server_file = crate::ns::open(server_ns)?;
    let client_file = crate::ns::open(client_ns)?;
    let msg = format!("cni-conformance {}\n", std::process::id());
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel::<Result<u16>>();
        let server = s.spawn(move || -> Result<()> {
            let setup = (|| -> Result<TcpListener> {
                if unsafe { libc::setns(server_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let any: IpAddr = if target.is_ipv4() {
                    "0.0.0.0".parse().unwrap()
                } else {
                    "::".parse().unwrap()
                };
                let l = TcpListener::bind(SocketAddr::new(any, port))
                    .context("binding the TCP listener")?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let l = match setup {
                Ok(l) => {
                    let _ = tx.send(Ok(l.local_addr()?.port()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let deadline = Instant::now() + Duration::from_secs(8);
            loop {
                match l.accept() {
                    Ok((mut c, _)) => {
                        c.set_nonblocking(false)?;
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        let mut buf = Vec::new();
                        let mut b = [0u8; 256];
                        while !buf.ends_with(b"\n") {
                            let n = c.read(&mut b)?;
                            if n == 0 {
                                break;
                            }
                            buf.extend_from_slice(&b[..n]);
                        }
                        c.write_all(&buf)?;
                        return Ok(());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            bail!("no TCP connection arrived");
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        });
        let bound = rx
            .recv()
            .map_err(|_| anyhow!("TCP listener thread died"))??;
        let dst = SocketAddr::new(target, target_port.unwrap_or(bound));
        let msg2 = msg.clone();
        let client = s.spawn(move || -> Result<String> {
            if unsafe { libc::setns(client_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let mut last = None;
            for _ in 0..3 {
                match TcpStream::connect_timeout(&dst, Duration::from_secs(2)) {
                    Ok(mut c) => {
                        c.set_read_timeout(Some(Duration::from_secs(5)))?;
                        c.write_all(msg2.as_bytes())?;
                        let mut got = String::new();
                        let mut b = [0u8; 256];
                        while !got.ends_with('\n') {
                            let n = c.read(&mut b)?;
                            if n == 0 {
                                break;
                            }
                            got.push_str(&String::from_utf8_lossy(&b[..n]));
                        }
                        return Ok(got);
                    }
                    Err(e) => last = Some(e),
                }
            }
            bail!(
                "connecting to {dst}: {}",
                last.map(|e| e.to_string()).unwrap_or_default()
            )
        });
        let got = client
            .join()
            .map_err(|_| anyhow!("client thread panicked"))?;
        let served = server
            .join()
            .map_err(|_| anyhow!("server thread panicked"))?;
        let got = got.with_context(|| format!("TCP from {} to {dst}", client_ns.display()))?;
        served.with_context(|| format!("TCP listener in {}", server_ns.display()))?;
        if got != msg {
            bail!("TCP echo through {dst} returned {got:?} instead of {msg:?}");
        }
        Ok(())
    })
}

/// Runs the hooks' teardown (and cleanup) once, also when the run panics.
pub struct HookGuard {
    pub rt: Arc<Rt>,
}

impl Drop for HookGuard {
    fn drop(&mut self) {
        let _ = self.rt.stop_hooks();
    }
}

impl Rt {
    /// Runs --setup (if given); from then on, --teardown and --cleanup run once at the end.
    pub fn start_hooks(&self) -> Result<()> {
        match self.opts.setup.clone() {
            Some(s) => {
                self.hooks_started
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                self.hook("setup", &s)
            }
            None => Ok(()),
        }
    }

    /// --teardown then --cleanup, once (also from the signal handler thread).
    pub fn stop_hooks(&self) -> Result<()> {
        if !self
            .hooks_started
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        let mut first_err = None;
        if let Some(t) = self.opts.teardown.clone() {
            if let Err(e) = self.hook("teardown", &t) {
                first_err = Some(e);
            }
        }
        if let Some(c) = self.opts.cleanup.clone() {
            if let Err(e) = self.hook("cleanup", &c) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Builds the shared state: work dir, node namespace, plugin versions, cnitool.
pub fn prepare(opts: Options) -> Result<(Arc<Rt>, TempDir)> {
    fixture::sweep_leftovers();
    for tool in ["ip", "ping", "sh"] {
        if !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .any(|d| d.join(tool).is_file())
        {
            bail!("{tool} is not on PATH (needed by the runner)");
        }
    }
    let workdir = TempDir::new("cw")?;
    let id = workdir
        .path()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let node = Netns::new("nd")?;
    let text = std::fs::read_to_string(&opts.conflist)
        .with_context(|| format!("reading {}", opts.conflist.display()))?;
    let text = text
        .replace("@WORKDIR@", &workdir.path().display().to_string())
        .replace("@ID@", &id)
        .replace("@NODE_NETNS@", &node.path().display().to_string());
    let list = NetList::parse(&text).with_context(|| format!("{}", opts.conflist.display()))?;

    // The node: lo up (Netns::new), an address for node-to-pod traffic, forwarding on as on any
    // Kubernetes node.
    node.ip(&["addr", "add", &opts.node_addr, "dev", "lo"])?;
    node.sh("echo 1 > /proc/sys/net/ipv4/ip_forward; echo 1 > /proc/sys/net/ipv6/conf/all/forwarding 2>/dev/null; true")?;
    let node_file = crate::ns::open(&node.path())?;

    let plugins = Plugins {
        dirs: opts.cni_path.clone(),
        node_fd: node_file.as_raw_fd(),
        timeout: opts.timeout,
    };
    for ty in list.types() {
        plugins.find(&ty)?;
    }
    let located = if opts.no_cnitool {
        Err(anyhow!("cnitool disabled by --no-cnitool"))
    } else {
        cnitool::locate(opts.cnitool.as_deref())
    };
    if let (Err(e), false) = (&located, opts.no_cnitool) {
        bail!("{e:#} (or pass --no-cnitool to drive every case with the runner's own runtime)");
    }
    let (cnitool, cnitool_error) = match located {
        Ok(bin) => (
            Some(Cnitool {
                bin,
                cni_path: plugins.cni_path(),
                node_fd: node_file.as_raw_fd(),
                timeout: opts.timeout,
            }),
            None,
        ),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let main_type = list.plugin_type(0);
    let (advertised, version_error) = match cni::version(&plugins, &main_type, &list.version())
        .and_then(|i| cni::supported_versions(&i))
    {
        Ok(v) => (v, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let adv = |v: &str| advertised.iter().any(|a| a == v);
    let cnitool_version = if cnitool.is_some() {
        KNOWN_VERSIONS
            .iter()
            .rev()
            .find(|v| version_ge(CNITOOL_MAX, v) && adv(v))
            .map(|v| v.to_string())
    } else {
        None
    };
    let default_version = cnitool_version
        .clone()
        .or_else(|| {
            KNOWN_VERSIONS
                .iter()
                .rev()
                .find(|v| adv(v))
                .map(|v| v.to_string())
        })
        .unwrap_or_else(|| list.version());

    let alloc = match &opts.alloc_cmd {
        Some(c) => AllocProbe::Cmd(c.clone()),
        None => list
            .plugins()
            .iter()
            .filter_map(|p| p.get("ipam"))
            .find(|i| i.get("type").and_then(Value::as_str) == Some("host-local"))
            .map(|i| {
                let dir = i
                    .get("dataDir")
                    .and_then(Value::as_str)
                    .unwrap_or("/var/lib/cni/networks");
                AllocProbe::HostLocal(Path::new(dir).join(list.name()))
            })
            .unwrap_or(AllocProbe::None),
    };
    let hooks_log = workdir.path().join("hooks.log");
    let rt = Rt {
        id,
        workdir: workdir.path().to_path_buf(),
        node,
        node_file,
        plugins,
        cnitool,
        cnitool_error,
        list,
        main_type,
        advertised,
        version_error,
        cnitool_version,
        default_version,
        alloc,
        live: Mutex::new(BTreeSet::new()),
        confdirs: Mutex::new(HashMap::new()),
        hooks_log,
        hooks_started: std::sync::atomic::AtomicBool::new(false),
        opts,
    };
    Ok((Arc::new(rt), workdir))
}

/// The capability arguments the chain case passes (portMappings and bandwidth).
pub fn chain_cap_args(host_port: u16, container_port: u16) -> Value {
    json!({
        "portMappings": [{"hostPort": host_port, "containerPort": container_port, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 100_000_000u64, "ingressBurst": 10_000_000u64, "egressRate": 100_000_000u64, "egressBurst": 10_000_000u64}
    })
}
