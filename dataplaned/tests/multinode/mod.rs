//! A two-node sluice cluster in network namespaces, for the multi-node end-to-end tests:
//!
//! ```text
//!                 fabric netns: Linux bridge (no address)
//!        ┌──────────────────┬──────────────────┬──────────────────┐
//!   node A netns        node B netns       client netns
//!   192.168.77.1/24     192.168.77.2/24    192.168.77.100/24
//!   sluiced node-a      sluiced node-b     (no route to pod CIDRs)
//!   pods 10.244.1.0/24  pods 10.244.2.0/24
//! ```
//!
//! Each node runs its own sluiced (own socket, state dir, bpffs dir) with `--nodeport-iface` on
//! its fabric veth; pods are added with the real plugin through cnitool inside the node's netns.
//! Everything (namespaces, pins, processes, temporary directories) goes on drop, also when a test
//! panics. MTU 1500 on every link.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::common::{
    require_root, run, unique, wait_for, Netns, NodeApi, Proc, TempDir, SLUICECTL, SLUICED,
};

pub const FABRIC_NET: &str = "192.168.77";
pub const CLIENT_IP: &str = "192.168.77.100";
pub const A_IP: &str = "192.168.77.1";
pub const B_IP: &str = "192.168.77.2";
pub const A_CIDR: &str = "10.244.1.0/24";
pub const B_CIDR: &str = "10.244.2.0/24";

/// One sluice node: its netns, its fabric veth (`uplink`, inside the node netns) and that veth's
/// bridge port (`port`, in the fabric netns), its daemon.
pub struct MNode {
    pub name: String,
    pub ip: String,
    pub cidr: String,
    pub uplink: String,
    pub port: String,
    pub dir: TempDir,
    pub bpffs: PathBuf,
    pub extra_args: Vec<String>,
    pub daemon: Option<Proc>,
    pub ns: Netns,
}

impl MNode {
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("sluiced.log")
    }

    fn write_conflist(&self) -> Result<()> {
        std::fs::create_dir_all(self.netconf_dir())?;
        let list = serde_json::json!({"cniVersion": "1.0.0", "name": "sluice",
            "plugins": [{"type": "sluice", "socket": self.socket(), "mtu": 1500}]});
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
            .open(self.log_path())?;
        let mut cmd = self.ns.command(SLUICED);
        cmd.arg("--socket")
            .arg(self.socket())
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--bpffs")
            .arg(&self.bpffs)
            .args(["--node-name", &self.name, "--pod-cidr", &self.cidr])
            .args(["--nodeport-iface", &self.uplink, "--node-ip", &self.ip])
            .args(&self.extra_args)
            .env("SLUICE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let mut proc = Proc::spawn("sluiced", &mut cmd)?;
        let started = wait_for(
            &format!("sluiced {} to answer", self.name),
            Duration::from_secs(20),
            || {
                if !proc.is_running() {
                    bail!("sluiced exited");
                }
                Ok(self.socket().exists()
                    && self
                        .ns
                        .command(SLUICECTL)
                        .arg("--socket")
                        .arg(self.socket())
                        .arg("status")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()?
                        .success())
            },
        );
        if let Err(e) = started {
            bail!(
                "{e:#}\n--- sluiced.log ({}) ---\n{}",
                self.name,
                self.daemon_log()
            );
        }
        self.daemon = Some(proc);
        Ok(())
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

    /// `ip route show proto 197` (sluice's routes) in the node netns.
    pub fn sluice_routes(&self) -> Result<String> {
        let out = self.ns.ip(&["route", "show", "proto", "197"])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl NodeApi for MNode {
    fn name(&self) -> &str {
        &self.name
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
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

impl Drop for MNode {
    fn drop(&mut self) {
        if std::thread::panicking() && self.daemon.is_some() {
            // What the daemon held when the test failed.
            for args in [&["get", "services"][..], &["status"][..]] {
                let out = self.sluicectl(args).map(|o| o.stdout).unwrap_or_default();
                eprintln!(
                    "--- sluicectl {} ({}) ---\n{}",
                    args.join(" "),
                    self.name,
                    String::from_utf8_lossy(&out)
                );
            }
        }
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
            .args(["--pod-cidr", &self.cidr])
            .args(["--nodeport-iface", &self.uplink, "--node-ip", &self.ip])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.bpffs);
        if std::thread::panicking() {
            eprintln!("--- sluiced.log ({}) ---\n{}", self.name, self.daemon_log());
        }
    }
}

/// The cluster: fabric (bridge), nodes A and B, an external client. Fields drop in order: nodes
/// (daemons, pins) first, then the client and the fabric.
pub struct Cluster {
    pub a: MNode,
    pub b: MNode,
    pub client: Netns,
    /// The client's veth (inside the client netns) and its bridge port (fabric netns).
    pub client_if: String,
    pub client_port: String,
    pub fabric: Netns,
}

/// Connects `ns` to the bridge `br` in `fabric` with a veth: (name inside `ns`, bridge port).
fn plug(fabric: &Netns, br: &str, ns: &Netns, addr: &str) -> Result<(String, String)> {
    let inner = unique("e");
    let port = unique("f");
    fabric.ip(&[
        "link", "add", &port, "mtu", "1500", "type", "veth", "peer", "name", &inner, "mtu", "1500",
        "netns", &ns.name,
    ])?;
    fabric.ip(&["link", "set", &port, "master", br])?;
    fabric.ip(&["link", "set", &port, "up"])?;
    ns.ip(&["addr", "add", addr, "dev", &inner])?;
    ns.ip(&["link", "set", &inner, "up"])?;
    Ok((inner, port))
}

/// `SLUICE_E2E_ATTACH_MODE=tc|tcx` runs both daemons with that --attach-mode (default: sluiced's
/// own choice, tcx on kernels from 6.6), to compare the two attachment paths.
fn attach_mode_arg() -> Vec<String> {
    match std::env::var("SLUICE_E2E_ATTACH_MODE") {
        Ok(m) if !m.is_empty() => vec!["--attach-mode".into(), m],
        _ => vec![],
    }
}

/// The `v1 Node` objects of both nodes: name, podCIDR, InternalIP.
pub fn node_objects() -> String {
    let mut y = String::new();
    for (name, cidr, ip) in [("node-a", A_CIDR, A_IP), ("node-b", B_CIDR, B_IP)] {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}, podCIDRs: [{cidr}]}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}, {{type: Hostname, address: {name}}}]}}\n"
        );
    }
    y
}

impl Cluster {
    /// Builds the topology and starts both daemons with `extra` flags (e.g. ["--lb-mode",
    /// "tunnel"]); applies the Node objects to both.
    pub fn new(extra: &[&str]) -> Result<Cluster> {
        require_root();
        cni_conformance::fixture::sweep_leftovers();
        let fabric = Netns::new("F")?;
        let br = "br0";
        fabric.ip(&["link", "add", br, "mtu", "1500", "type", "bridge"])?;
        // No STP, no forwarding delay: ports forward at once.
        fabric.ip(&[
            "link",
            "set",
            br,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        fabric.ip(&["link", "set", br, "up"])?;
        let client = Netns::new("C")?;
        let (client_if, client_port) = plug(&fabric, br, &client, &format!("{CLIENT_IP}/24"))?;
        let mk = |name: &str, ip: &str, cidr: &str, tag: &str| -> Result<MNode> {
            let ns = Netns::new(tag)?;
            let (uplink, port) = plug(&fabric, br, &ns, &format!("{ip}/24"))?;
            let dir = TempDir::new("d")?;
            let node = MNode {
                name: name.into(),
                ip: ip.into(),
                cidr: cidr.into(),
                uplink,
                port,
                dir,
                bpffs: PathBuf::from("/sys/fs/bpf").join(unique("b")),
                extra_args: extra
                    .iter()
                    .map(|s| s.to_string())
                    .chain(attach_mode_arg())
                    .collect(),
                daemon: None,
                ns,
            };
            node.write_conflist()?;
            Ok(node)
        };
        let mut cluster = Cluster {
            a: mk("node-a", A_IP, A_CIDR, "A")?,
            b: mk("node-b", B_IP, B_CIDR, "B")?,
            client,
            client_if,
            client_port,
            fabric,
        };
        // Everyone on the fabric can reach everyone before any daemon runs.
        for (ns, peer) in [
            (&cluster.client, A_IP),
            (&cluster.client, B_IP),
            (&cluster.a.ns, B_IP),
        ] {
            run(ns.command("ping").args(["-c", "1", "-W", "2", peer]))
                .with_context(|| format!("fabric ping {} -> {peer}", ns.name))?;
        }
        cluster.a.start_daemon()?;
        cluster.b.start_daemon()?;
        let nodes = node_objects();
        cluster.a.apply(&nodes)?;
        cluster.b.apply(&nodes)?;
        Ok(cluster)
    }

    pub fn nodes(&self) -> [&MNode; 2] {
        [&self.a, &self.b]
    }

    /// Applies `yaml` on both nodes (as a cluster's API server would show both the same objects).
    pub fn apply(&self, yaml: &str) -> Result<()> {
        for n in self.nodes() {
            n.apply(yaml)?;
        }
        Ok(())
    }

    pub fn delete(&self, yaml: &str) -> Result<()> {
        for n in self.nodes() {
            n.delete(yaml)?;
        }
        Ok(())
    }

    /// Waits until each node routes the other's pod CIDR via the other's InternalIP (proto 197).
    pub fn wait_routes(&self, timeout: Duration) -> Result<()> {
        for (n, cidr, via) in [(&self.a, B_CIDR, B_IP), (&self.b, A_CIDR, A_IP)] {
            let want = format!("{cidr} via {via}");
            let r = wait_for(
                &format!("{} to route {want} (proto 197)", n.name),
                timeout,
                || Ok(n.sluice_routes()?.contains(&want)),
            );
            if let Err(e) = r {
                let all =
                    n.ns.ip(&["route", "show"])
                        .map(|o| o.stdout)
                        .unwrap_or_default();
                bail!(
                    "{e:#}\nroutes in {}:\n{}",
                    n.name,
                    String::from_utf8_lossy(&all)
                );
            }
        }
        Ok(())
    }

    /// The bridge port of a node's or the client's link, by node name ("client" for the client).
    pub fn port_of(&self, who: &str) -> &str {
        match who {
            "node-a" => &self.a.port,
            "node-b" => &self.b.port,
            _ => &self.client_port,
        }
    }
}

/// One packet seen by a capture: (source, destination, protocol word tcpdump printed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub line: String,
}

impl Seen {
    pub fn is_vxlan(&self) -> bool {
        self.dport == 4789
    }
}

/// `tcpdump -Q in` on a bridge port in the fabric netns: every IPv4 frame the node behind that
/// port sent into the fabric (what actually left the node), quick (-q) so VXLAN is not decoded
/// (its outer header is what crossed the wire).
pub struct Capture {
    proc: Option<Proc>,
    out: PathBuf,
    err: PathBuf,
    pub iface: String,
}

impl Capture {
    pub fn start(fabric: &Netns, port: &str, dir: &Path) -> Result<Capture> {
        let tag = unique("c");
        let out = dir.join(format!("{tag}.txt"));
        let err = dir.join(format!("{tag}.err"));
        let mut cmd = fabric.command("tcpdump");
        cmd.args(["-nn", "-q", "-l", "-i", port, "-Q", "in", "ip"])
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?);
        let mut proc = Proc::spawn("tcpdump", &mut cmd)?;
        let e2 = err.clone();
        wait_for(
            &format!("tcpdump on {port} to listen"),
            Duration::from_secs(10),
            || {
                if !proc.is_running() {
                    bail!("tcpdump exited: {}", std::fs::read_to_string(&e2)?);
                }
                Ok(std::fs::read_to_string(&e2)?.contains("listening on"))
            },
        )?;
        Ok(Capture {
            proc: Some(proc),
            out,
            err,
            iface: port.to_string(),
        })
    }

    /// Stops the capture and returns what it saw.
    pub fn stop(mut self) -> Result<Vec<Seen>> {
        // Let the last packets reach the tap and the line-buffered output.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(mut p) = self.proc.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.pid()),
                nix::sys::signal::Signal::SIGINT,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while p.is_running() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let text = std::fs::read_to_string(&self.out)?;
        Ok(text.lines().filter_map(parse_tcpdump).collect())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
    }
}

/// "12:00:00.000000 IP 192.168.77.1.30080 > 192.168.77.100.41234: tcp 0" → Seen.
fn parse_tcpdump(line: &str) -> Option<Seen> {
    let rest = line.split_once(" IP ")?.1;
    let (src, rest) = rest.split_once(" > ")?;
    let (dst, _) = rest.split_once(':')?;
    let split = |a: &str| -> (String, u16) {
        // a.b.c.d.port, or a.b.c.d for portless protocols
        let parts: Vec<&str> = a.split('.').collect();
        if parts.len() == 5 {
            (parts[..4].join("."), parts[4].parse().unwrap_or(0))
        } else {
            (a.to_string(), 0)
        }
    };
    let (src, sport) = split(src);
    let (dst, dport) = split(dst);
    Some(Seen {
        src,
        sport,
        dst,
        dport,
        line: line.to_string(),
    })
}

/// `ip -s link` packet counters (rx, tx) of `iface` in `ns`.
pub fn link_packets(ns: &Netns, iface: &str) -> Result<(u64, u64)> {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", iface])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    let s = &v[0]["stats64"];
    Ok((
        s["rx"]["packets"].as_u64().unwrap_or(0),
        s["tx"]["packets"].as_u64().unwrap_or(0),
    ))
}

/// A named sequence of checks that runs every check and fails at the end with all failures: one
/// cluster serves many checks without the first failure hiding the others.
pub struct Checks {
    pub failures: Vec<String>,
    pub passed: Vec<String>,
    started: Instant,
}

impl Default for Checks {
    fn default() -> Self {
        Self::new()
    }
}

impl Checks {
    pub fn new() -> Checks {
        Checks {
            failures: Vec::new(),
            passed: Vec::new(),
            started: Instant::now(),
        }
    }

    pub fn check(&mut self, name: &str, f: impl FnOnce() -> Result<()>) {
        let t = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let took = t.elapsed();
        match r {
            Ok(Ok(())) => {
                eprintln!("  ok    {name} ({took:.1?})");
                self.passed.push(name.to_string());
            }
            Ok(Err(e)) => {
                eprintln!("  FAIL  {name} ({took:.1?}): {e:#}");
                self.failures.push(format!("{name}: {e:#}"));
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                eprintln!("  FAIL  {name} ({took:.1?}): panicked: {msg}");
                self.failures.push(format!("{name}: panicked: {msg}"));
            }
        }
    }

    /// Panics listing every failed check, or returns when all passed (the nodes' logs follow
    /// from their Drop while panicking).
    pub fn finish(self) {
        eprintln!(
            "{} checks passed, {} failed in {:.1?}",
            self.passed.len(),
            self.failures.len(),
            self.started.elapsed()
        );
        if !self.failures.is_empty() {
            panic!(
                "{} of {} checks failed:\n- {}",
                self.failures.len(),
                self.failures.len() + self.passed.len(),
                self.failures.join("\n- ")
            );
        }
    }
}
