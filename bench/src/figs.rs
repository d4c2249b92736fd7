//! The figures: each appends its raw samples to the results JSON.
//!
//! Rounds: every figure runs `rounds` times; within a round, the order of the modes rotates
//! (round r starts at mode r mod k), and every service-path number is paired with the direct
//! anchor measured in the same topology, just before, in the same round.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::fx::{self, Netns};
use crate::modes::{self, Mode};
use crate::rules::{self, Svc};
use crate::topo::{Node, SingleNode, TwoNode, CLIENT_CPUS, SERVER_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fig {
    Conn,
    Rr,
    Prog,
    Bpf,
    Cni,
    Mem,
}

pub const FIGS: [Fig; 6] = [Fig::Conn, Fig::Rr, Fig::Prog, Fig::Bpf, Fig::Cni, Fig::Mem];

impl Fig {
    pub fn name(self) -> &'static str {
        match self {
            Fig::Conn => "conn",
            Fig::Rr => "rr",
            Fig::Prog => "prog",
            Fig::Bpf => "bpf",
            Fig::Cni => "cni",
            Fig::Mem => "mem",
        }
    }
    pub fn parse(s: &str) -> Result<Fig> {
        Ok(match s {
            "conn" | "1" => Fig::Conn,
            "rr" | "latency" | "throughput" | "2" => Fig::Rr,
            "prog" | "programming" | "3" => Fig::Prog,
            "bpf" | "4" => Fig::Bpf,
            "cni" | "5" => Fig::Cni,
            "mem" | "rss" | "restart" | "6" => Fig::Mem,
            _ => bail!("unknown figure {s:?} (conn, rr, prog, bpf, cni, mem or 1-6)"),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Cfg {
    pub rounds: usize,
    pub seconds: f64,
    pub services: Vec<usize>,
    /// N of the NodePort figure (all of `services`; the smallest one with --quick).
    pub nodeport_services: Vec<usize>,
    pub modes: Vec<Mode>,
    pub figures: BTreeSet<Fig>,
    /// Client pods (source addresses) and connection threads per client pod.
    pub clients: usize,
    pub threads: usize,
    pub cni_pods: usize,
    pub mem_pods: usize,
    pub mem_services: usize,
    pub restarts: usize,
    pub bpf_runs: usize,
    pub bpf_repeat: u32,
    /// Programming-figure timeout (s).
    pub timeout: f64,
    /// Timeout (s) of loading the rules before the datapath trials.
    pub setup_timeout: f64,
    pub json: PathBuf,
}

pub struct Results {
    pub v: Value,
    path: PathBuf,
}

impl Results {
    pub fn new(path: PathBuf, head: Value) -> Results {
        Results { v: head, path }
    }
    pub fn push(&mut self, key: &str, rec: Value) {
        let a = self.v[key].as_array_mut();
        match a {
            Some(a) => a.push(rec),
            None => self.v[key] = json!([rec]),
        }
    }
    pub fn save(&self) -> Result<()> {
        std::fs::write(&self.path, serde_json::to_vec_pretty(&self.v)?)?;
        Ok(())
    }
}

/// `modes` starting at position `r mod len`.
fn rotated<T: Clone>(v: &[T], r: usize) -> Vec<T> {
    if v.is_empty() {
        return vec![];
    }
    let k = r % v.len();
    v[k..].iter().chain(v[..k].iter()).cloned().collect()
}

fn measured_modes(cfg: &Cfg) -> Vec<Mode> {
    let m: Vec<Mode> = cfg
        .modes
        .iter()
        .copied()
        .filter(|m| *m != Mode::Direct)
        .collect();
    if m.is_empty() {
        vec![Mode::Direct]
    } else {
        m
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A load-generator client pinned to the client CPU; its JSON answer.
fn client(args: &[String]) -> Result<Value> {
    let out = fx::run(
        Command::new("taskset")
            .args(["-c", CLIENT_CPUS])
            .arg(std::env::current_exe()?)
            .args(args),
    )?;
    serde_json::from_slice(&out.stdout).context("client output")
}

fn warmup(cfg: &Cfg) -> f64 {
    (cfg.seconds * 0.2).clamp(0.1, 1.0)
}

/// The connection-rate client from the `clients` namespaces to `targets` (round robin).
fn conn_client(cfg: &Cfg, clients: &[String], targets: &[SocketAddr]) -> Result<Value> {
    let tl: Vec<String> = targets.iter().map(|a| a.to_string()).collect();
    client(&[
        "conn".into(),
        "--netns".into(),
        clients.join(","),
        "--targets".into(),
        tl.join(","),
        "--threads".into(),
        cfg.threads.to_string(),
        "--seconds".into(),
        cfg.seconds.to_string(),
        "--warmup".into(),
        warmup(cfg).to_string(),
    ])
}

/// Connection rate, request/response latency and one stream towards `targets` (round robin
/// for connections; the first one for the others), conntrack flushed before each.
fn trial(cfg: &Cfg, t: &SingleNode, targets: &[SocketAddr]) -> Result<Value> {
    let node = t.node();
    let clients: Vec<String> = t
        .clients()
        .iter()
        .map(|p| p.ns.path().display().to_string())
        .collect();
    let tl: Vec<String> = targets.iter().map(|a| a.to_string()).collect();
    let mut out = json!({});
    if cfg.figures.contains(&Fig::Conn) {
        node.flush_conntrack();
        let mut v = conn_client(cfg, &clients, targets)?;
        v["conntrack_entries_after"] = json!(node.conntrack_count());
        out["conn"] = v;
    }
    if cfg.figures.contains(&Fig::Rr) {
        node.flush_conntrack();
        out["rr"] = client(&[
            "rr".into(),
            "--netns".into(),
            clients[0].clone(),
            "--target".into(),
            tl[0].clone(),
            "--seconds".into(),
            cfg.seconds.to_string(),
            "--warmup".into(),
            warmup(cfg).to_string(),
        ])?;
        node.flush_conntrack();
        out["stream"] = client(&[
            "stream".into(),
            "--netns".into(),
            clients[0].clone(),
            "--target".into(),
            tl[0].clone(),
            "--seconds".into(),
            cfg.seconds.min(2.0).to_string(),
        ])?;
    }
    Ok(out)
}

/// Figures 1 and 2: per round, per N, per mode (rotated): a fresh topology; the direct anchor
/// with nothing loaded; the mode's N services programmed; the direct path with the rules
/// loaded; the service path.
pub fn dataplane(cfg: &Cfg, res: &mut Results) -> Result<()> {
    // Loading the rules here is set-up, not the figure: no programming timeout.
    fx::set_timeout(Duration::from_secs_f64(cfg.setup_timeout));
    let modes = measured_modes(cfg);
    let mut k = 0;
    for round in 0..cfg.rounds {
        for &n in &cfg.services {
            for (pos, mode) in rotated(&modes, round + k).into_iter().enumerate() {
                eprintln!("  [dataplane] round {round} N={n} {}", mode.name());
                let topo = SingleNode::new(cfg.clients)?;
                let be: Vec<String> = topo.backends().iter().map(|p| p.ip.clone()).collect();
                let direct: Vec<SocketAddr> = be
                    .iter()
                    .map(|ip| format!("{ip}:{SERVER_PORT}").parse().unwrap())
                    .collect();
                let mut rec = json!({"round": round, "n": n, "mode": mode.name(), "position": pos,
                    "clients": topo.clients().len(), "threads_per_client": cfg.threads});
                rec["anchor"] = trial(cfg, &topo, &direct)?;
                if mode != Mode::Direct {
                    let svcs = rules::services(n, &be, SERVER_PORT);
                    let node = topo.node();
                    let apply = |y: &str| node.sluicectl_objects("apply", y);
                    let took = modes::program(mode, &node.ns, &svcs, Some(&apply), &node.work.path);
                    if !step(&mut rec, "program_ms", took)? {
                        rec["skipped"] = json!(format!(
                            "programming {n} services took more than {} s",
                            cfg.setup_timeout
                        ));
                        res.push("dataplane", rec);
                        res.save()?;
                        continue;
                    }
                    let vip: SocketAddr =
                        format!("{}:{}", rules::vip(n - 1), rules::SVC_PORT).parse()?;
                    // The non-service path first, with the rules loaded but no service flows
                    // in any conntrack table yet.
                    rec["direct_loaded"] = trial(cfg, &topo, &direct)?;
                    rec["service"] = trial(cfg, &topo, &[vip])?;
                }
                res.push("dataplane", rec);
                res.save()?;
            }
            k += 1;
        }
    }
    Ok(())
}

/// Connection rate from the external clients of `t` to `targets`, both nodes' netfilter
/// conntrack flushed first.
fn np_conn(cfg: &Cfg, t: &TwoNode, targets: &[SocketAddr]) -> Result<Value> {
    for n in t.nodes() {
        n.flush_conntrack();
    }
    let clients: Vec<String> = t
        .clients
        .iter()
        .map(|p| p.ns.path().display().to_string())
        .collect();
    conn_client(cfg, &clients, targets)
}

/// Figure 1, NodePort: per round, per N, per mode (rotated), a fresh two-node topology; the
/// direct anchors (the external clients straight to the backend pods of node A, "local", and
/// of node B, "remote", through the node's routing); the mode's services programmed on both
/// nodes; then node A's NodePorts, one with A's pods as backends, one with B's. Connection rate.
pub fn nodeport(cfg: &Cfg, res: &mut Results) -> Result<()> {
    fx::set_timeout(Duration::from_secs_f64(cfg.setup_timeout));
    let modes = measured_modes(cfg);
    let to = |ips: &[String], port: u16| -> Vec<SocketAddr> {
        ips.iter()
            .map(|ip| format!("{ip}:{port}").parse().unwrap())
            .collect()
    };
    let mut k = 0;
    for round in 0..cfg.rounds {
        for &n in &cfg.nodeport_services {
            for (pos, mode) in rotated(&modes, round + k).into_iter().enumerate() {
                eprintln!("  [nodeport] round {round} N={n} {}", mode.name());
                let t = TwoNode::new(cfg.clients)?;
                let ips = |node: &Node| -> Vec<String> {
                    node.pods.iter().map(|p| p.ip.clone()).collect()
                };
                let (local, remote) = (ips(&t.a), ips(&t.b));
                let mut rec = json!({"round": round, "n": n, "mode": mode.name(), "position": pos,
                    "clients": t.clients.len(), "threads_per_client": cfg.threads,
                    "node": TwoNode::A_IP});
                rec["anchor_local"] = np_conn(cfg, &t, &to(&local, SERVER_PORT))?;
                rec["anchor_remote"] = np_conn(cfg, &t, &to(&remote, SERVER_PORT))?;
                if mode != Mode::Direct {
                    let svcs = rules::nodeport_services(n, &local, &remote, SERVER_PORT);
                    rec["services"] = json!(svcs.len());
                    rec["node_ports"] =
                        json!(svcs.iter().filter(|s| s.node_port.is_some()).count());
                    let mut programmed = true;
                    for (node, key) in [(&t.a, "program_ms"), (&t.b, "program_b_ms")] {
                        let apply = |y: &str| node.sluicectl_objects("apply", y);
                        let took =
                            modes::program(mode, &node.ns, &svcs, Some(&apply), &node.work.path);
                        programmed = programmed && step(&mut rec, key, took)?;
                    }
                    if !programmed {
                        rec["skipped"] = json!(format!(
                            "programming {} services took more than {} s",
                            svcs.len(),
                            cfg.setup_timeout
                        ));
                        res.push("nodeport", rec);
                        res.save()?;
                        continue;
                    }
                    let port = |name: &str| svcs.iter().find(|s| s.name == name).unwrap().node_port;
                    let front = |name: &str| -> Result<SocketAddr> {
                        Ok(format!("{}:{}", TwoNode::A_IP, port(name).unwrap()).parse()?)
                    };
                    rec["service_local"] = np_conn(cfg, &t, &[front("local")?])?;
                    rec["service_remote"] = np_conn(cfg, &t, &[front("remote")?])?;
                }
                res.push("nodeport", rec);
                res.save()?;
            }
            k += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figure 3: programming time.

fn with_endpoints(svcs: &[Svc], last_eps: &[String]) -> Vec<Svc> {
    let mut v = svcs.to_vec();
    if let Some(l) = v.last_mut() {
        l.endpoints = last_eps.to_vec();
    }
    v
}

/// The gRPC Apply call itself (connection already open): the daemon's answer after its map
/// writes, without sluicectl's exec and connect.
fn api_apply_times(node: &Node, texts: &[String]) -> Result<Vec<f64>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut c = sluice_core::client::connect(&node.socket(), Duration::from_secs(60)).await?;
        let mut out = vec![];
        for t in texts {
            let start = Instant::now();
            c.apply(sluice_core::proto::ObjectsRequest {
                source: "bench".into(),
                text: t.clone(),
            })
            .await?;
            out.push(ms(start.elapsed()));
        }
        Ok(out)
    })
}

/// Records a timed step: its ms, or (killed after the timeout) null and `<key>_timed_out_s`.
/// Ok(false) when it timed out: the steps after it, which need its state, are skipped.
fn step(rec: &mut Value, key: &str, r: Result<Duration>) -> Result<bool> {
    match r {
        Ok(d) => {
            rec[key] = json!(ms(d));
            Ok(true)
        }
        Err(e) => match e.downcast_ref::<fx::TimedOut>() {
            Some(t) => {
                rec[key] = Value::Null;
                rec[format!("{key}_timed_out_s")] = json!(t.0.as_secs_f64());
                Ok(false)
            }
            None => Err(e),
        },
    }
}

pub fn prog(cfg: &Cfg, res: &mut Results) -> Result<()> {
    fx::set_timeout(Duration::from_secs_f64(cfg.timeout));
    let modes: Vec<Mode> = measured_modes(cfg)
        .into_iter()
        .filter(|m| *m != Mode::Direct)
        .collect();
    // Endpoint addresses: the datapath is not exercised here, only programmed.
    let (a, b, c) = (
        "10.244.0.10".to_string(),
        "10.244.0.11".to_string(),
        "10.244.0.12".to_string(),
    );
    let mut k = 0;
    for round in 0..cfg.rounds {
        for &n in &cfg.services {
            for mode in rotated(&modes, round + k) {
                eprintln!("  [prog] round {round} N={n} {}", mode.name());
                let svcs = rules::services(n, &[a.clone(), b.clone()], SERVER_PORT);
                let changed = with_endpoints(&svcs, &[a.clone(), c.clone()]);
                let last = svcs.last().unwrap();
                let last_changed = changed.last().unwrap();
                let mut rec = json!({"round": round, "n": n, "mode": mode.name()});
                let r = match mode {
                    Mode::IptablesNft | Mode::IptablesLegacy => (|| -> Result<()> {
                        let ns = Netns::new("g")?;
                        modes::ipt_restore(mode, &ns, &rules::iptables_base())?;
                        let full = rules::iptables_full(&svcs, &[]);
                        rec["ruleset_bytes"] = json!(full.len());
                        rec["ruleset_lines"] = json!(full.lines().count());
                        if !step(&mut rec, "full_ms", modes::ipt_restore(mode, &ns, &full))? {
                            return Ok(());
                        }
                        // B -> C, as a full sync (every chain rewritten, the old KUBE-SEP removed)
                        let text = rules::iptables_full(&changed, &[last.sep_chain(&b)]);
                        if !step(
                            &mut rec,
                            "change_full_ms",
                            modes::ipt_restore(mode, &ns, &text),
                        )? {
                            return Ok(());
                        }
                        // C -> B, as a partial sync (KUBE-SERVICES and the changed chains)
                        let text =
                            rules::iptables_partial(&svcs, &[last], &[last_changed.sep_chain(&c)]);
                        if !step(
                            &mut rec,
                            "change_partial_ms",
                            modes::ipt_restore(mode, &ns, &text),
                        )? {
                            return Ok(());
                        }
                        let text = rules::iptables_full(&[], &rules::iptables_chains(&svcs));
                        if !step(&mut rec, "delete_ms", modes::ipt_restore(mode, &ns, &text))? {
                            return Ok(());
                        }
                        let left = ns.sh(&format!(
                            "{} -t nat -S | grep -c KUBE-SEP || true",
                            if mode == Mode::IptablesNft {
                                "iptables-nft"
                            } else {
                                "iptables-legacy"
                            }
                        ))?;
                        rec["chains_left_after_delete"] =
                            json!(String::from_utf8_lossy(&left.stdout)
                                .trim()
                                .parse::<u64>()
                                .ok());
                        // For contrast: the same full ruleset with a flushing restore (not what
                        // kube-proxy does), into an empty namespace.
                        let ns2 = Netns::new("g")?;
                        step(
                            &mut rec,
                            "full_flush_restore_ms",
                            modes::ipt_restore_flush(mode, &ns2, &full),
                        )?;
                        Ok(())
                    })(),
                    Mode::Nftables => (|| -> Result<()> {
                        let ns = Netns::new("g")?;
                        let full = rules::nft_full(&svcs, &[]);
                        rec["ruleset_bytes"] = json!(full.len());
                        rec["ruleset_lines"] = json!(full.lines().count());
                        if !step(&mut rec, "full_ms", modes::nft_load(&ns, &full))? {
                            return Ok(());
                        }
                        let text = rules::nft_full(&changed, &[last.nft_ep_chain(&b)]);
                        if !step(&mut rec, "change_full_ms", modes::nft_load(&ns, &text))? {
                            return Ok(());
                        }
                        modes::nft_load(&ns, &rules::nft_delete_chains(&[last.nft_ep_chain(&b)]))?;
                        let text = rules::nft_partial(&[last], &[last_changed.nft_ep_chain(&c)]);
                        if !step(&mut rec, "change_partial_ms", modes::nft_load(&ns, &text))? {
                            return Ok(());
                        }
                        modes::nft_load(
                            &ns,
                            &rules::nft_delete_chains(&[last_changed.nft_ep_chain(&c)]),
                        )?;
                        let chains = rules::nft_chains(&svcs);
                        let t0 = Instant::now();
                        if !step(
                            &mut rec,
                            "delete_flush_ms",
                            modes::nft_load(&ns, &rules::nft_full(&[], &chains)),
                        )? {
                            return Ok(());
                        }
                        if !step(
                            &mut rec,
                            "delete_chains_ms",
                            modes::nft_load(&ns, &rules::nft_delete_chains(&chains)),
                        )? {
                            return Ok(());
                        }
                        rec["delete_ms"] = json!(ms(t0.elapsed()));
                        Ok(())
                    })(),
                    Mode::Sluice => (|| -> Result<()> {
                        let node = Node::new(&[])?;
                        let all = rules::k8s_all(&svcs);
                        rec["ruleset_bytes"] = json!(all.len());
                        if !step(&mut rec, "full_ms", node.sluicectl_objects("apply", &all))? {
                            return Ok(());
                        }
                        let text = rules::k8s_slice(last_changed);
                        if !step(
                            &mut rec,
                            "change_cli_ms",
                            node.sluicectl_objects("apply", &text),
                        )? {
                            return Ok(());
                        }
                        rec["change_full_ms"] = rec["change_cli_ms"].clone();
                        // The API call alone, 5 changes back and forth.
                        let texts: Vec<String> = (0..5)
                            .map(|i| rules::k8s_slice(if i % 2 == 0 { last } else { last_changed }))
                            .collect();
                        let api = api_apply_times(&node, &texts)?;
                        rec["change_api_samples_ms"] = json!(api);
                        rec["change_api_ms"] = json!(crate::stats::median(&api));
                        rec["rss_kib_before_delete"] = json!(node.daemon_pid().and_then(rss_kib));
                        step(
                            &mut rec,
                            "delete_ms",
                            node.sluicectl_objects("delete", &all),
                        )?;
                        Ok(())
                    })(),
                    Mode::Direct => unreachable!(),
                };
                r?;
                res.push("prog", rec);
                res.save()?;
            }
            k += 1;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figure 4: BPF cost.

pub fn bpf(cfg: &Cfg, res: &mut Results) -> Result<()> {
    for round in 0..cfg.rounds {
        for frontends in rotated(&[1usize, 65536], round) {
            eprintln!("  [bpf] round {round} frontends={frontends}");
            // Runs as a child so that every measurement has a fresh skeleton and its own maps.
            let out = fx::run(
                Command::new(std::env::current_exe()?)
                    .args(["bpf", "--frontends", &frontends.to_string()])
                    .args(["--runs", &cfg.bpf_runs.to_string()])
                    .args(["--repeat", &cfg.bpf_repeat.to_string()]),
            )?;
            let rows: Vec<Value> = serde_json::from_slice(&out.stdout)?;
            for mut r in rows {
                r["round"] = json!(round);
                res.push("bpf", r);
            }
            res.save()?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figure 5: CNI ADD/DEL latency.

fn timed_parallel(
    n: usize,
    par: usize,
    f: impl Fn(usize) -> Result<()> + Sync,
) -> Result<Vec<f64>> {
    let next = AtomicUsize::new(0);
    let samples = Mutex::new(vec![]);
    let err: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..par {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                match f(i) {
                    Ok(()) => samples.lock().unwrap().push(ms(t.elapsed())),
                    Err(e) => {
                        *err.lock().unwrap() = Some(e);
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = err.into_inner().unwrap() {
        return Err(e);
    }
    Ok(samples.into_inner().unwrap())
}

pub fn cni(cfg: &Cfg, res: &mut Results) -> Result<()> {
    for round in 0..cfg.rounds {
        let node = Node::new(&[])?;
        let ptp_dir = node.work.path.join("ptp.d");
        std::fs::create_dir_all(&ptp_dir)?;
        let ptp = json!({"cniVersion": "1.0.0", "name": "ptp", "plugins": [{"type": "ptp",
            "ipMasq": false, "mtu": 1500, "ipam": {"type": "host-local",
            "ranges": [[{"subnet": "10.245.0.0/16"}]],
            "dataDir": node.work.path.join("host-local")}}]});
        std::fs::write(ptp_dir.join("10-ptp.conflist"), ptp.to_string())?;
        let sluice_dir = node.work.path.join("net.d");
        for plugin in rotated(&["sluice", "ptp+host-local"], round) {
            for par in [1usize, 16] {
                eprintln!("  [cni] round {round} {plugin} parallel={par}");
                let (name, dir) = if plugin == "sluice" {
                    ("sluice", &sluice_dir)
                } else {
                    ("ptp", &ptp_dir)
                };
                let pods: Vec<Netns> = (0..cfg.cni_pods)
                    .map(|_| Netns::new("c"))
                    .collect::<Result<_>>()?;
                let paths: Vec<String> = pods
                    .iter()
                    .map(|p| p.path().display().to_string())
                    .collect();
                for verb in ["add", "del"] {
                    let samples = timed_parallel(paths.len(), par, |i| {
                        fx::run(&mut node.cnitool(verb, name, dir, &paths[i]))?;
                        Ok(())
                    })
                    .with_context(|| format!("{plugin} {verb}\n{}", node.daemon_log()))?;
                    res.push(
                        "cni",
                        json!({"round": round, "plugin": plugin, "verb": verb, "parallel": par,
                            "pods": paths.len(), "samples_ms": samples}),
                    );
                }
                drop(pods);
                res.save()?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Figure 6: sluiced memory and restart.

pub fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn mem(cfg: &Cfg, res: &mut Results) -> Result<()> {
    for round in 0..cfg.rounds {
        eprintln!(
            "  [mem] round {round}: {} pods, {} services",
            cfg.mem_pods, cfg.mem_services
        );
        // A /24 holds 253 pods: more take a /21 (2,045).
        let cidr = if cfg.mem_pods > 250 {
            "10.244.0.0/21"
        } else {
            crate::topo::POD_CIDR
        };
        let mut node = Node::create("bench-node", cidr, &[])?;
        node.start_daemon()?;
        let pid0 = node.daemon_pid().unwrap();
        let rss_empty = rss_kib(pid0);
        for _ in 0..cfg.mem_pods {
            node.add_pod()?;
        }
        let eps: Vec<String> = node.pods.iter().take(2).map(|p| p.ip.clone()).collect();
        let svcs = rules::services(cfg.mem_services, &eps, SERVER_PORT);
        let apply = if svcs.is_empty() {
            None
        } else {
            Some(node.sluicectl_objects("apply", &rules::k8s_all(&svcs))?)
        };
        std::thread::sleep(Duration::from_millis(500));
        let pid = node.daemon_pid().unwrap();
        let mut rec = json!({"round": round, "pods": cfg.mem_pods, "services": cfg.mem_services,
            "rss_kib_empty": rss_empty, "apply_ms": apply.map(ms),
            "rss_kib": rss_kib(pid), "hwm_kib": status_kib(pid, "VmHWM:")});
        let mut restarts = vec![];
        let mut rss_after = vec![];
        for _ in 0..cfg.restarts {
            node.stop_daemon()?;
            let t = node.start_daemon()?;
            restarts.push(ms(t));
            std::thread::sleep(Duration::from_millis(300));
            rss_after.push(node.daemon_pid().and_then(rss_kib));
        }
        rec["restart_to_status_ms"] = json!(restarts);
        rec["rss_kib_after_restart"] = json!(rss_after);
        // An upgrade: programs other than the pinned ones (another configuration, as a new build
        // would bring) are loaded and swapped into every pod's attachment at start.
        node.stop_daemon()?;
        node.extra_args
            .extend(["--ct-timeout-udp".to_string(), format!("{}", 31 + round)]);
        let t = node.start_daemon()?;
        rec["upgrade_to_status_ms"] = json!(ms(t));
        res.push("mem", rec);
        res.save()?;
    }
    Ok(())
}
