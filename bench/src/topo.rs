//! The topology every figure runs in: one node namespace (never the root one) with sluiced in it,
//! pods created through sluice's own CNI plugin with cnitool (so pods are identical in every
//! mode), servers in backend pods.
//!
//! NodePort figures run in `TwoNode`: two such nodes and external clients on a bridge, the
//! shape of the multi-node tests (dataplaned/tests/multinode).

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
    pub name: String,
    pub pod_cidr: String,
    /// `--nodeport-iface IF --node-ip IP` once the node is on a fabric (also for --cleanup).
    pub uplink_args: Vec<String>,
}

impl Node {
    /// A single node ("bench-node", pod CIDR 10.244.0.0/24) with sluiced running.
    pub fn new(extra_args: &[&str]) -> Result<Node> {
        let mut node = Node::create("bench-node", POD_CIDR, extra_args)?;
        node.start_daemon()?;
        Ok(node)
    }

    /// The namespace, work directory and CNI config of a node; sluiced not started yet.
    pub fn create(name: &str, pod_cidr: &str, extra_args: &[&str]) -> Result<Node> {
        let ns = Netns::new("n")?;
        let work = WorkDir::new("w")?;
        let bpffs = PathBuf::from("/sys/fs/bpf").join(fx::unique("b"));
        std::fs::create_dir_all(work.path.join("net.d"))?;
        let node = Node {
            servers: vec![],
            daemon: None,
            pods: vec![],
            pins: None,
            work,
            ns,
            bpffs,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
            pod_cidr: pod_cidr.to_string(),
            uplink_args: vec![],
        };
        let conf = serde_json::json!({"cniVersion": "1.0.0", "name": "sluice",
            "plugins": [{"type": "sluice", "socket": node.socket(), "mtu": 1500}]});
        std::fs::write(
            node.work.path.join("net.d/10-sluice.conflist"),
            conf.to_string(),
        )?;
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
            "--pod-cidr".into(),
            self.pod_cidr.clone(),
        ]
        .into_iter()
        .chain(self.uplink_args.iter().cloned())
        .collect()
    }

    /// Starts sluiced and waits until `sluicectl status` answers; returns that wait.
    pub fn start_daemon(&mut self) -> Result<Duration> {
        if self.pins.is_none() {
            // Registered before the first start: whatever happens next, --cleanup runs.
            self.pins = Some(SluicedPins::new(
                &self.ns.name,
                self.daemon_paths(),
                &self.bpffs,
            ));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.path.join("sluiced.log"))?;
        let t = Instant::now();
        let mut cmd = self.ns.command(fx::bin("sluiced"));
        cmd.args(self.daemon_paths())
            .args(["--node-name", &self.name])
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

impl SingleNode {
    pub fn clients(&self) -> Vec<&Pod> {
        self.node.pods[..self.n_clients].iter().collect()
    }
    pub fn backends(&self) -> Vec<&Pod> {
        self.node.pods[self.n_clients..self.n_clients + 2]
            .iter()
            .collect()
    }
    pub fn node(&self) -> &Node {
        &self.node
    }
}

// ---------------------------------------------------------------------------------------------
// Two nodes and external clients, for the NodePort figure:
//
//                 fabric netns: Linux bridge
//        ┌──────────────────┬──────────────────┬─────────────────────┐
//   node A              node B             clients (external hosts)
//   192.168.77.1        192.168.77.2       192.168.77.100, .101, ...
//   pods 10.244.1.0/24  pods 10.244.2.0/24  routes to both pod CIDRs via the nodes
//   2 backends          2 backends           (only for the direct anchors)

pub const FABRIC: &str = "192.168.77";
pub const A_CIDR: &str = "10.244.1.0/24";
pub const B_CIDR: &str = "10.244.2.0/24";

pub struct TwoNode {
    // Drop order: nodes (daemons, pods, pins), then the clients, then the fabric.
    pub a: Node,
    pub b: Node,
    pub clients: Vec<Pod>,
    _fabric: Netns,
}

/// A veth from `ns` into the fabric bridge, `addr` on the inner end: the inner end's name.
fn plug(fabric: &Netns, ns: &Netns, addr: &str) -> Result<String> {
    let inner = fx::unique("e");
    let port = fx::unique("f");
    fabric.ip(&[
        "link", "add", &port, "mtu", "1500", "type", "veth", "peer", "name", &inner, "mtu", "1500",
        "netns", &ns.name,
    ])?;
    fabric.ip(&["link", "set", &port, "master", "br0", "up"])?;
    ns.ip(&["addr", "add", addr, "dev", &inner])?;
    ns.ip(&["link", "set", &inner, "up"])?;
    Ok(inner)
}

impl TwoNode {
    pub const A_IP: &'static str = "192.168.77.1";
    pub const B_IP: &'static str = "192.168.77.2";

    pub fn new(n_clients: usize) -> Result<TwoNode> {
        let fabric = Netns::new("F")?;
        fabric.ip(&[
            "link",
            "add",
            "br0",
            "mtu",
            "1500",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
        ])?;
        fabric.ip(&["link", "set", "br0", "up"])?;
        let mut nodes = vec![];
        for (name, ip, cidr) in [
            ("node-a", Self::A_IP, A_CIDR),
            ("node-b", Self::B_IP, B_CIDR),
        ] {
            let mut node = Node::create(name, cidr, &[])?;
            let uplink = plug(&fabric, &node.ns, &format!("{ip}/24"))?;
            node.uplink_args = vec![
                "--nodeport-iface".into(),
                uplink,
                "--node-ip".into(),
                ip.into(),
            ];
            node.start_daemon()?;
            nodes.push(node);
        }
        let b = nodes.pop().unwrap();
        let a = nodes.pop().unwrap();
        let mut clients = vec![];
        for i in 0..n_clients {
            let ns = Netns::new("c")?;
            let ip = format!("{FABRIC}.{}", 100 + i);
            plug(&fabric, &ns, &format!("{ip}/24"))?;
            ns.ip(&["route", "add", A_CIDR, "via", Self::A_IP])?;
            ns.ip(&["route", "add", B_CIDR, "via", Self::B_IP])?;
            ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
            clients.push(Pod { ns, ip });
        }
        let mut t = TwoNode {
            a,
            b,
            clients,
            _fabric: fabric,
        };
        let nodes = t.node_objects();
        for node in [&t.a, &t.b] {
            node.sluicectl_objects("apply", &nodes)?;
        }
        for (node, peer_cidr, via) in [(&t.a, B_CIDR, Self::B_IP), (&t.b, A_CIDR, Self::A_IP)] {
            let want = format!("{peer_cidr} via {via}");
            fx::wait_for(
                &format!("{} to route {want}", node.name),
                Duration::from_secs(10),
                Duration::from_millis(20),
                || {
                    let out = node.ns.ip(&["route", "show", "proto", "197"])?;
                    Ok(String::from_utf8_lossy(&out.stdout).contains(&want))
                },
            )
            .with_context(|| node.daemon_log())?;
        }
        for node in [&mut t.a, &mut t.b] {
            for i in 0..2 {
                node.add_pod()?;
                node.start_server(i, SERVER_CPUS)?;
            }
        }
        Ok(t)
    }

    /// The `v1 Node` objects of both nodes (name, podCIDR, InternalIP), applied to both.
    fn node_objects(&self) -> String {
        let mut y = String::new();
        for (n, ip) in [(&self.a, Self::A_IP), (&self.b, Self::B_IP)] {
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata: {{name: {}}}\nspec: {{podCIDR: {c}, podCIDRs: [{c}]}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n",
                n.name,
                c = n.pod_cidr
            ));
        }
        y
    }

    pub fn nodes(&self) -> [&Node; 2] {
        [&self.a, &self.b]
    }
}
