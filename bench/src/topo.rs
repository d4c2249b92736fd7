//! The topology every figure runs in: one node namespace (never the root one) with sluiced in it,
//! pods created through sluice's own CNI plugin with cnitool (so pods are identical in every
//! mode), servers in backend pods.
//!
//! NodePort figures need a second node and an external client (issue 8): `Topology` is the seam
//! where a two-node variant plugs in; `SingleNode` answers `nodeport()` with "n/a".

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::fx::{self, Netns, Proc, SluicedPins, WorkDir};

pub const POD_CIDR: &str = "10.244.0.0/24";
/// kube-proxy's --cluster-cidr in the generated rules (the "local traffic" detector).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SERVER_PORT: u16 = 8080;

pub struct Pod {
    pub ns: Netns,
    pub ip: String,
}

/// One node: its namespace, sluiced, the CNI config, the pods.
pub struct Node {
    // Drop order = field order: processes and pods first, then pins, then the namespace.
    pub servers: Vec<Proc>,
    pub daemon: Option<Proc>,
    pub pods: Vec<Pod>,
    pins: Option<SluicedPins>,
    pub work: WorkDir,
    pub ns: Netns,
    pub bpffs: PathBuf,
    pub extra_args: Vec<String>,
}

impl Node {
    pub fn new(extra_args: &[&str]) -> Result<Node> {
        let ns = Netns::new("n")?;
        let work = WorkDir::new("w")?;
        let bpffs = PathBuf::from("/sys/fs/bpf").join(fx::unique("b"));
        std::fs::create_dir_all(work.path.join("net.d"))?;
        let mut node = Node {
            servers: vec![],
            daemon: None,
            pods: vec![],
            pins: None,
            work,
            ns,
            bpffs,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        node.pins = Some(SluicedPins::new(
            &node.ns.name,
            node.daemon_paths(),
            &node.bpffs,
        ));
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "sluice",
            "plugins": [{"type": "sluice", "socket": node.socket(), "mtu": 1500}]});
        std::fs::write(
            node.work.path.join("net.d/10-sluice.conflist"),
            conf.to_string(),
        )?;
        node.start_daemon()?;
        Ok(node)
    }

    pub fn socket(&self) -> PathBuf {
        self.work.path.join("sluiced.sock")
    }

    fn daemon_paths(&self) -> Vec<String> {
        vec![
            "--socket".into(),
            self.socket().display().to_string(),
            "--state-dir".into(),
            self.work.path.join("state").display().to_string(),
            "--bpffs".into(),
            self.bpffs.display().to_string(),
        ]
    }

    /// Starts sluiced and waits until `sluicectl status` answers; returns that wait.
    pub fn start_daemon(&mut self) -> Result<Duration> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.path.join("sluiced.log"))?;
        let t = Instant::now();
        let mut cmd = self.ns.command(fx::bin("sluiced"));
        cmd.args(self.daemon_paths())
            .args(["--node-name", "bench-node", "--pod-cidr", POD_CIDR])
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(log);
        let mut proc = Proc::spawn(&mut cmd)?;
        let sock = self.socket();
        let r = fx::wait_for(
            "sluiced to answer `sluicectl status`",
            Duration::from_secs(30),
            Duration::from_millis(2),
            || {
                if !proc.is_running() {
                    bail!("sluiced exited");
                }
                Ok(sock.exists() && self.ctl_quiet(&["status"]))
            },
        );
        let took = t.elapsed();
        if let Err(e) = r {
            bail!("{e:#}\n--- sluiced.log ---\n{}", self.daemon_log());
        }
        self.daemon = Some(proc);
        Ok(took)
    }

    pub fn stop_daemon(&mut self) -> Result<()> {
        if let Some(mut d) = self.daemon.take() {
            if d.terminate(Duration::from_secs(10)).is_none() {
                bail!(
                    "sluiced did not exit within 10 s of SIGTERM\n--- sluiced.log ---\n{}",
                    self.daemon_log()
                );
            }
        }
        Ok(())
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        self.daemon.as_ref().map(|d| d.pid())
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.work.path.join("sluiced.log")).unwrap_or_default()
    }

    fn ctl_quiet(&self, args: &[&str]) -> bool {
        self.ns
            .command(fx::bin("sluicectl"))
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    /// `sluicectl apply|delete -f -` with `yaml` on stdin: the wall time of the command.
    pub fn sluicectl_objects(&self, verb: &str, yaml: &str) -> Result<Duration> {
        let mut cmd = self.ns.command(fx::bin("sluicectl"));
        cmd.arg("--socket")
            .arg(self.socket())
            .args([verb, "-f", "-"]);
        let (_, took) = fx::run_input(&mut cmd, yaml.as_bytes())?;
        Ok(took)
    }

    /// cnitool VERB for the namespace at `netns` with the conflist in `netconf`.
    pub fn cnitool(
        &self,
        verb: &str,
        name: &str,
        netconf: &std::path::Path,
        netns: &str,
    ) -> Command {
        let mut c = self.ns.command("cnitool");
        c.args([verb, name, netns])
            .env(
                "CNI_PATH",
                format!(
                    "{}:/usr/lib/cni",
                    fx::bin("sluice").parent().unwrap().display()
                ),
            )
            .env("NETCONFPATH", netconf);
        c
    }

    /// A pod: a namespace ADDed with cnitool and the sluice plugin.
    pub fn add_pod(&mut self) -> Result<usize> {
        let ns = Netns::new("p")?;
        let out = fx::run(&mut self.cnitool(
            "add",
            "sluice",
            &self.work.path.join("net.d"),
            &ns.path().display().to_string(),
        ))
        .with_context(|| format!("cnitool add\n{}", self.daemon_log()))?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ip = v["ips"][0]["address"]
            .as_str()
            .context("no IP in the CNI result")?
            .split('/')
            .next()
            .unwrap()
            .to_string();
        self.pods.push(Pod { ns, ip });
        Ok(self.pods.len() - 1)
    }

    /// Starts the bench server in pod `i`, pinned to `cpus`, and waits until it accepts.
    pub fn start_server(&mut self, i: usize, cpus: &str) -> Result<()> {
        let pod = &self.pods[i];
        let mut cmd = pod.ns.pinned(cpus, std::env::current_exe()?);
        cmd.args(["serve", "--port", &SERVER_PORT.to_string()])
            .stdout(Stdio::null());
        let proc = Proc::spawn(&mut cmd)?;
        let addr = format!("{}:{SERVER_PORT}", pod.ip);
        let ns = pod.ns.path();
        fx::wait_for(
            "the bench server to listen",
            Duration::from_secs(10),
            Duration::from_millis(10),
            || {
                Ok(Command::new("nsenter")
                    .arg(format!("--net={}", ns.display()))
                    .args(["--", "ss", "-Hltn", &format!("sport = :{SERVER_PORT}")])
                    .output()
                    .map(|o| !o.stdout.is_empty())
                    .unwrap_or(false))
            },
        )
        .with_context(|| format!("server {addr}"))?;
        self.servers.push(proc);
        Ok(())
    }

    /// Empties the node's netfilter conntrack table (between trials).
    pub fn flush_conntrack(&self) {
        let _ = self
            .ns
            .command("conntrack")
            .arg("-F")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// How many netfilter conntrack entries the node holds.
    pub fn conntrack_count(&self) -> Option<u64> {
        let out = self.ns.command("conntrack").arg("-C").output().ok()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    }
}

/// Where clients and backends come from. Only `SingleNode` exists today.
pub trait Topology {
    /// Client pods (each its own source address), backend pods with a server.
    fn clients(&self) -> Vec<&Pod>;
    fn backends(&self) -> Vec<&Pod>;
    fn node(&self) -> &Node;
    /// The NodePort client (an external host) and the node addresses to target, when the
    /// topology has them.
    fn nodeport(&self) -> Result<(), String>;
}

/// One node, `n_clients` client pods (pinned to CPU 0 when they run), two backend pods with a
/// server each (pinned to CPU 1).
pub struct SingleNode {
    pub node: Node,
    pub n_clients: usize,
}

pub const CLIENT_CPUS: &str = "0";
pub const SERVER_CPUS: &str = "1";

impl SingleNode {
    pub fn new(n_clients: usize) -> Result<SingleNode> {
        let mut node = Node::new(&[])?;
        for _ in 0..n_clients + 2 {
            node.add_pod()?;
        }
        for i in 0..n_clients {
            // A wide ephemeral range: no port exhaustion at tens of thousands of connections/s.
            node.pods[i]
                .ns
                .sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        }
        node.start_server(n_clients, SERVER_CPUS)?;
        node.start_server(n_clients + 1, SERVER_CPUS)?;
        Ok(SingleNode { node, n_clients })
    }
}

impl Topology for SingleNode {
    fn clients(&self) -> Vec<&Pod> {
        self.node.pods[..self.n_clients].iter().collect()
    }
    fn backends(&self) -> Vec<&Pod> {
        self.node.pods[self.n_clients..self.n_clients + 2]
            .iter()
            .collect()
    }
    fn node(&self) -> &Node {
        &self.node
    }
    fn nodeport(&self) -> Result<(), String> {
        Err("n/a: needs multi-node (issue 8)".into())
    }
}
