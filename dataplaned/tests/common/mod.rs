//! A sluice node for end-to-end tests: a node netns with an uplink to an "external" netns, sluiced
//! running inside it, a CNI config, and helpers to add pods with the real plugin and cnitool.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
pub use cni_conformance::fixture::{
    require_root, run, unique, veth_between, wait_for, Netns, Proc, TempDir,
};
use serde_json::Value;

/// Where `sluice` (built by `cargo build --release`) is; sluiced/sluicectl come from this package.
pub fn plugin_dir() -> PathBuf {
    let dir = std::env::var_os("SLUICE_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release"));
    assert!(
        dir.join("sluice").exists(),
        "{}/sluice missing: run `cargo build --release` first (scripts/test.sh does)",
        dir.display()
    );
    dir
}

pub const SLUICED: &str = env!("CARGO_BIN_EXE_sluiced");

/// The attach mode sluiced picks on this kernel (tcx from 6.6, clsact before).
pub fn mode() -> &'static str {
    sluiced::AttachMode::detect().name()
}
pub const SLUICECTL: &str = env!("CARGO_BIN_EXE_sluicectl");

/// The first IP of a CNI result (cnitool's stdout), without its prefix length.
pub fn result_ip(stdout: &[u8]) -> String {
    let v: Value = serde_json::from_slice(stdout).expect("CNI result JSON");
    v["ips"][0]["address"]
        .as_str()
        .expect("an IP in the result")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

pub struct Pod {
    pub ns: Netns,
    pub ip: String,
    pub result: Value,
}

pub struct SluiceNode {
    pub ns: Netns,
    pub ext: Netns,
    pub dir: TempDir,
    pub bpffs: PathBuf,
    pub daemon: Option<Proc>,
    pub extra_args: Vec<String>,
    pub node_ip: String,
    pub ext_ip: String,
    /// `--pod-cidr` (None: not passed, e.g. to take it from the watched Node).
    pub pod_cidr: Option<String>,
}

impl SluiceNode {
    pub fn new() -> Result<SluiceNode> {
        Self::with_args(&[])
    }

    /// A node whose daemon gets `extra` flags too (e.g. ["--attach-mode", "tc"]).
    pub fn with_args(extra: &[&str]) -> Result<SluiceNode> {
        require_root();
        cni_conformance::fixture::sweep_leftovers();
        let ns = Netns::new("n")?;
        let ext = Netns::new("x")?;
        veth_between(&ns, "192.168.200.1/24", &ext, "192.168.200.2/24")?;
        ext.ip(&["route", "add", "10.244.0.0/16", "via", "192.168.200.1"])?;
        let dir = TempDir::new("d")?;
        let bpffs = PathBuf::from("/sys/fs/bpf").join(unique("b"));
        std::fs::create_dir_all(dir.path().join("net.d"))?;
        let mut node = SluiceNode {
            ns,
            ext,
            dir,
            bpffs,
            daemon: None,
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            node_ip: "192.168.200.1".into(),
            ext_ip: "192.168.200.2".into(),
            pod_cidr: Some("10.244.0.0/24".into()),
        };
        node.write_conflist("1.0.0", &[])?;
        node.start_daemon()?;
        Ok(node)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The plugin's own config object (for direct invocations).
    pub fn plugin_conf(&self, version: &str) -> Value {
        serde_json::json!({"cniVersion": version, "name": "sluice", "type": "sluice",
            "socket": self.socket(), "mtu": 1500})
    }

    /// Writes net.d/10-sluice.conflist: sluice then `chained` plugin objects.
    pub fn write_conflist(&self, version: &str, chained: &[Value]) -> Result<()> {
        let mut plugins =
            vec![serde_json::json!({"type": "sluice", "socket": self.socket(), "mtu": 1500})];
        plugins.extend(chained.iter().cloned());
        let list = serde_json::json!({"cniVersion": version, "name": "sluice", "plugins": plugins});
        std::fs::write(
            self.netconf_dir().join("10-sluice.conflist"),
            serde_json::to_vec_pretty(&list)?,
        )?;
        Ok(())
    }

    pub fn start_daemon(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sluiced.log"))?;
        let mut cmd = self.ns.command(SLUICED);
        cmd.arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["--node-name", "test-node"])
            .args(
                self.pod_cidr
                    .iter()
                    .flat_map(|c| ["--pod-cidr", c.as_str()]),
            )
            .args(&self.extra_args)
            .env("SLUICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let mut proc = Proc::spawn("sluiced", &mut cmd)?;
        let sock = self.socket();
        let ns = self.ns.path();
        let started = wait_for("sluiced to answer", Duration::from_secs(20), || {
            if !proc.is_running() {
                bail!("sluiced exited");
            }
            Ok(sock.exists()
                && Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .arg(SLUICECTL)
                    .arg("--socket")
                    .arg(&sock)
                    .arg("status")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()?
                    .success())
        });
        if let Err(e) = started {
            bail!("{e:#}\n--- sluiced.log ---\n{}", self.daemon_log());
        }
        self.daemon = Some(proc);
        Ok(())
    }

    pub fn kill9_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }

    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            let st = d
                .terminate(Duration::from_secs(10))
                .context("sluiced did not exit on SIGTERM")?;
            if !st.success() {
                bail!("sluiced exited with {st} on SIGTERM\n{}", self.daemon_log());
            }
        }
        Ok(())
    }

    /// Runs the plugin binary directly (our own runtime): for verbs and IDs cnitool cannot do.
    pub fn plugin(&self, env: &[(&str, &str)], stdin: &Value) -> Output {
        use std::io::Write;
        let mut cmd = self.ns.command(plugin_dir().join("sluice"));
        cmd.env_clear()
            .env("CNI_PATH", plugin_dir())
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.to_string().as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Whether both programs are attached to the pod's host-side veth, by what the kernel shows:
    /// pinned tcx links, or clsact filters (what a pod has from its ADD until it is moved to tcx
    /// links, or in `--attach-mode tc`).
    pub fn programs_attached(&self, pod: &Pod) -> bool {
        self.tcx_links(pod) || self.tc_filters(pod)
    }

    fn host_if(pod: &Pod) -> &str {
        pod.result["interfaces"][0]["name"].as_str().unwrap()
    }

    /// Both pinned tcx links of the pod's host-side veth exist.
    pub fn tcx_links(&self, pod: &Pod) -> bool {
        let host_if = Self::host_if(pod);
        ["ingress", "egress"]
            .iter()
            .all(|d| self.bpffs.join(format!("links/{host_if}-{d}")).exists())
    }

    /// `tc filter show` of one direction of the pod's host-side veth.
    fn tc_filter_text(&self, pod: &Pod, dir: &str) -> String {
        let out = self
            .ns
            .command("tc")
            .args(["filter", "show", "dev", Self::host_if(pod), dir])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Both clsact filters (from_pod on ingress, to_pod on egress) are on the pod's host-side veth.
    pub fn tc_filters(&self, pod: &Pod) -> bool {
        [("ingress", "from_pod"), ("egress", "to_pod")]
            .iter()
            .all(|(d, prog)| self.tc_filter_text(pod, d).contains(prog))
    }

    /// Whether the pod's host-side veth has any clsact filter of sluice's left.
    pub fn any_tc_filter(&self, pod: &Pod) -> bool {
        ["ingress", "egress"].iter().any(|d| {
            let text = self.tc_filter_text(pod, d);
            text.contains("from_pod") || text.contains("to_pod")
        })
    }
}

/// What the tests do with a node's daemon and CNI, for a single node ([`SluiceNode`]) and the
/// nodes of a multi-node cluster alike: implementors say where things are.
pub trait NodeApi {
    /// The node's name (in messages).
    fn name(&self) -> &str;
    fn netns(&self) -> &Netns;
    fn socket(&self) -> PathBuf;
    fn netconf_dir(&self) -> PathBuf;
    fn daemon_log(&self) -> String;

    /// cnitool VERB for `pod` inside the node netns.
    fn cnitool(&self, verb: &str, pod: &Netns) -> Output {
        self.netns()
            .command("cnitool")
            .args([verb, "sluice"])
            .arg(pod.path())
            .env(
                "CNI_PATH",
                format!("{}:/usr/lib/cni", plugin_dir().display()),
            )
            .env("NETCONFPATH", self.netconf_dir())
            .output()
            .expect("running cnitool")
    }

    /// Creates a pod netns and ADDs it with cnitool (the real plugin) on this node.
    fn add_pod(&self) -> Result<Pod> {
        let ns = Netns::new("p")?;
        let out = self.cnitool("add", &ns);
        if !out.status.success() {
            bail!(
                "cnitool add on {} failed: {}{}\n{}",
                self.name(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.daemon_log()
            );
        }
        let result: Value = serde_json::from_slice(&out.stdout).context("cnitool add output")?;
        let ip = result_ip(&out.stdout);
        Ok(Pod { ns, ip, result })
    }

    fn sluicectl(&self, args: &[&str]) -> Result<Output> {
        run(self
            .netns()
            .command(SLUICECTL)
            .arg("--socket")
            .arg(self.socket())
            .args(args))
    }

    /// `sluicectl apply -f -` with `yaml` on stdin.
    fn apply(&self, yaml: &str) -> Result<Output> {
        self.objects("apply", yaml)
    }

    fn delete(&self, yaml: &str) -> Result<Output> {
        self.objects("delete", yaml)
    }

    fn objects(&self, verb: &str, yaml: &str) -> Result<Output> {
        use std::io::Write;
        let mut child = self
            .netns()
            .command(SLUICECTL)
            .arg("--socket")
            .arg(self.socket())
            .args([verb, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child.stdin.take().unwrap().write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "sluicectl {verb} on {} failed: {}",
                self.name(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    fn get_json(&self, what: &str) -> Result<Value> {
        let out = self.sluicectl(&["get", what, "-o", "json"])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn status_json(&self) -> Result<Value> {
        let out = self.sluicectl(&["status", "-o", "json"])?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl NodeApi for SluiceNode {
    fn name(&self) -> &str {
        "test-node"
    }
    fn netns(&self) -> &Netns {
        &self.ns
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("sluiced.sock")
    }
    fn netconf_dir(&self) -> PathBuf {
        self.dir.path().join("net.d")
    }
    fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sluiced.log")).unwrap_or_default()
    }
}

impl Drop for SluiceNode {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.terminate(Duration::from_secs(5));
        }
        let _ = self
            .ns
            .command(SLUICED)
            .arg("--cleanup")
            .arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        if std::thread::panicking() {
            eprintln!("--- sluiced.log ---\n{}", self.daemon_log());
        }
    }
}

/// A TCP echo server in `ns` on `port`, answering each line with "<peer IP> <own IP> <line>":
/// who connected (the client address the backend sees) and which backend answered.
pub fn echo_server(ns: &Netns, port: u16) -> Result<Proc> {
    let script = format!(
        r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(128)
def serve(c, a):
    me = c.getsockname()[0].encode()
    f = c.makefile("rwb")
    for line in f:
        f.write(a[0].encode() + b" " + me + b" " + line); f.flush()
    c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#
    );
    tcp_python_server(ns, "echo-server", &script, port)
}

/// Runs the python TCP server `script` in `ns` and waits until it accepts on `port`.
pub fn tcp_python_server(ns: &Netns, name: &str, script: &str, port: u16) -> Result<Proc> {
    let p = Proc::spawn(
        name,
        ns.command("python3")
            .args(["-c", script])
            .stdout(Stdio::null()),
    )?;
    let probe =
        format!("import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()");
    wait_for(name, Duration::from_secs(10), || {
        Ok(ns
            .command("python3")
            .args(["-c", &probe])
            .stderr(Stdio::null())
            .status()?
            .success())
    })?;
    Ok(p)
}

/// The first two words a line of output holds: (client IP the server saw, the server's IP).
fn two_words(line: &str) -> (String, String) {
    let mut it = line.split_whitespace();
    (
        it.next().unwrap_or("").to_string(),
        it.next().unwrap_or("").to_string(),
    )
}

/// Runs a python client in `ns` that prints one "<client seen> <server>" line.
fn python_pair(ns: &Netns, script: &str) -> Result<(String, String)> {
    let out = run(ns.command("python3").args(["-c", script]))?;
    Ok(two_words(&String::from_utf8_lossy(&out.stdout)))
}

/// One request/response over a fresh TCP connection from `ns`: returns what the server saw as our IP.
pub fn tcp_ask(ns: &Netns, addr: &str, port: u16) -> Result<String> {
    Ok(tcp_ask_full(ns, addr, port)?.0)
}

/// Like tcp_ask, returning (client IP the server saw, the server's own IP).
pub fn tcp_ask_full(ns: &Netns, addr: &str, port: u16) -> Result<(String, String)> {
    let script = format!(
        "import socket\nc = socket.create_connection(('{addr}', {port}), 3)\nc.sendall(b'hi\\n')\nprint(c.makefile().readline())"
    );
    python_pair(ns, &script)
}

/// `n` TCP connections from `ns`, one after another: (client IP seen, backend) of each.
pub fn tcp_ask_many(ns: &Netns, addr: &str, port: u16, n: usize) -> Result<Vec<(String, String)>> {
    let script = format!(
        r#"
import socket
for i in range({n}):
    c = socket.create_connection(('{addr}', {port}), 3)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
    c.sendall(b'hi\n'); print(c.makefile().readline().strip()); c.close()
"#
    );
    let out = run(ns.command("python3").args(["-c", &script]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(two_words)
        .collect())
}

/// A UDP server in `ns` on `port` answering each datagram with "<peer IP> <own IP>".
pub fn udp_server(ns: &Netns, port: u16) -> Result<Proc> {
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", {port}))
s.setsockopt(socket.IPPROTO_IP, 8, 1)  # IP_PKTINFO: learn which local address was asked
while True:
    data, anc, flags, a = s.recvmsg(2048, 1024)
    me = "?"
    for level, kind, blob in anc:
        if level == socket.IPPROTO_IP and kind == 8:
            me = socket.inet_ntoa(blob[8:12])
    s.sendto((a[0] + " " + me).encode(), a)
"#
    );
    let p = Proc::spawn(
        "udp-server",
        ns.command("python3")
            .args(["-c", &script])
            .stdout(Stdio::null()),
    )?;
    std::thread::sleep(Duration::from_millis(300));
    Ok(p)
}

/// One UDP request/response from `ns` (connected socket): (client IP seen, server IP).
pub fn udp_ask(ns: &Netns, addr: &str, port: u16) -> Result<(String, String)> {
    let script = format!(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\ns.connect(('{addr}', {port})); s.send(b'q')\nprint(s.recv(100).decode())"
    );
    python_pair(ns, &script)
}
