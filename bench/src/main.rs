//! sluice-bench: the benchmark suite of issue 9 (see bench/README.md). `scripts/bench.sh` is the
//! entry point; it calls `sluice-bench run`. The other subcommands are the pieces `run` starts
//! inside pods (load generator) or in a child process (BPF cost), and `report` redraws the
//! table and plots from a results JSON.

mod bpfcost;
mod figs;
mod fx;
mod load;
mod modes;
mod report;
mod rules;
mod stats;
mod topo;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use figs::{Cfg, Fig, Results, FIGS};
use modes::Mode;

#[derive(Parser)]
#[command(name = "sluice-bench", about = "sluice's benchmark suite (issue 9)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run figures and write bench/results/<date>-<host>.{json,md} and SVG plots.
    Run(RunArgs),
    /// Redraw the markdown table and plots from a results JSON.
    Report { json: PathBuf },
    /// Accept/echo/sink server (run inside a backend pod).
    Serve {
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, default_value_t = 32)]
        threads: usize,
    },
    /// Connect/request/close rate.
    Conn {
        /// Client namespaces (paths), comma-separated: threads are spread over them.
        #[arg(long, default_value = "")]
        netns: String,
        #[arg(long)]
        targets: String,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Request/response latency on persistent connections.
    Rr {
        #[arg(long, default_value = "")]
        netns: String,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1)]
        conns: usize,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 0.5)]
        warmup: f64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// Single-stream throughput.
    Stream {
        #[arg(long, default_value = "")]
        netns: String,
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Print the ruleset a mode programs for N services (iptables-restore input, nft script or
    /// sluice's Kubernetes objects), with endpoints 10.244.0.10 and .11.
    Rules {
        #[arg(long)]
        mode: String,
        #[arg(long, default_value_t = 1)]
        n: usize,
    },
    /// BPF cost per packet (PROG_TEST_RUN) with this many frontends; prints JSON rows.
    Bpf {
        #[arg(long, default_value_t = 1)]
        frontends: usize,
        #[arg(long, default_value_t = 5000)]
        runs: usize,
        #[arg(long, default_value_t = 100_000)]
        repeat: u32,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// CI smoke run (< 2 min): 1 round, short trials, N=1,1000, 10 pods; asserts only that
    /// every figure was produced.
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per trial (connection rate, request/response; a stream runs at most 2 s).
    #[arg(long)]
    seconds: Option<f64>,
    /// Service counts, comma-separated.
    #[arg(long)]
    services: Option<String>,
    /// Modes, comma-separated: direct,iptables-nft,iptables-legacy,nftables,sluice.
    #[arg(long)]
    modes: Option<String>,
    /// Figures, comma-separated: conn,rr,prog,bpf,cni,mem (or 1-6). Default: all.
    #[arg(long)]
    only: Option<String>,
    /// Prefix of every namespace, directory and pin this run creates.
    #[arg(long)]
    prefix: Option<String>,
    /// Where results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Client pods (source addresses).
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Connection threads per client pod.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Pods for the CNI figure.
    #[arg(long)]
    cni_pods: Option<usize>,
    /// Pods and Services for the memory and restart figure (6); the default is 100 and 10,000
    /// (10 and 1,000 with --quick). `--only mem --mem-pods 1000 --mem-services 0` is issue 10's
    /// restart case: a node with 1,000 pods.
    #[arg(long)]
    mem_pods: Option<usize>,
    #[arg(long)]
    mem_services: Option<usize>,
    /// Seconds a programming command (iptables-restore, nft, sluicectl) may take before it is
    /// killed and reported as timed out.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Seconds loading a mode's rules may take before the datapath trials (figures 1-2) of that
    /// (round, N, mode) are skipped and reported as such.
    #[arg(long, default_value_t = 120.0)]
    setup_timeout: f64,
    /// The command line to record (scripts/bench.sh passes its own).
    #[arg(long, default_value = "")]
    command: String,
}

fn sh_out(cmd: &str) -> String {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "host": sh_out("hostname"),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "kernel": sh_out("uname -r"),
        "os": sh_out(". /etc/os-release && echo $PRETTY_NAME"),
        "iptables_nft": sh_out("iptables-nft --version"),
        "iptables_legacy": sh_out("iptables-legacy --version"),
        "nft": sh_out("nft --version"),
        "cnitool": sh_out("command -v cnitool"),
        "memory": sh_out("grep MemTotal /proc/meminfo"),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "nf_conntrack_max": sh_out("cat /proc/sys/net/netfilter/nf_conntrack_max"),
        "commit": sh_out("git rev-parse --short HEAD 2>/dev/null"),
    })
}

fn list<T>(s: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(f)
        .collect()
}

fn run(a: RunArgs) -> Result<i32> {
    if !nix::unistd::geteuid().is_root() {
        bail!("sluice-bench run needs root (namespaces, BPF)");
    }
    if let Some(p) = &a.prefix {
        fx::set_prefix(p);
    }
    fx::install_signal_cleanup();
    fx::set_timeout(std::time::Duration::from_secs_f64(a.timeout));
    let q = a.quick;
    let figures: BTreeSet<Fig> = match &a.only {
        Some(o) => list(o, Fig::parse)?.into_iter().collect(),
        None => FIGS.into_iter().collect(),
    };
    let modes = list(
        a.modes
            .as_deref()
            .unwrap_or("direct,iptables-nft,iptables-legacy,nftables,sluice"),
        Mode::parse,
    )?;
    let services = list(
        a.services
            .as_deref()
            .unwrap_or(if q { "1,1000" } else { "1,1000,10000" }),
        |s| s.parse::<usize>().context("--services"),
    )?;
    if services.iter().any(|n| *n == 0 || *n > 60000) {
        bail!("--services: each N in 1..=60000");
    }
    let date = sh_out("date +%F");
    let host = sh_out("hostname");
    std::fs::create_dir_all(&a.out)?;
    let stem = if q {
        format!("quick-{date}-{host}")
    } else if a.only.is_some() || a.services.is_some() || a.modes.is_some() {
        format!(
            "{date}-{host}-only-{}",
            figures
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join("-")
        )
    } else {
        format!("{date}-{host}")
    };
    let cfg = Cfg {
        rounds: a.rounds.unwrap_or(if q { 1 } else { 5 }),
        seconds: a.seconds.unwrap_or(if q { 0.3 } else { 5.0 }),
        nodeport_services: if q {
            services.iter().copied().min().into_iter().collect()
        } else {
            services.clone()
        },
        services,
        modes: modes.clone(),
        figures: figures.clone(),
        clients: a.clients,
        threads: a.threads,
        cni_pods: a.cni_pods.unwrap_or(if q { 10 } else { 100 }),
        mem_pods: a.mem_pods.unwrap_or(if q { 10 } else { 100 }),
        mem_services: a.mem_services.unwrap_or(if q { 1000 } else { 10000 }),
        restarts: if q { 1 } else { 3 },
        bpf_runs: if q { 500 } else { 5000 },
        bpf_repeat: if q { 10_000 } else { 100_000 },
        timeout: a.timeout,
        setup_timeout: a.setup_timeout,
        json: a.out.join(format!("{stem}.json")),
    };
    let head = json!({
        "date": date,
        "machine": machine(),
        "config": {"command": a.command, "rounds": cfg.rounds, "seconds": cfg.seconds,
            "services": cfg.services, "nodeport_services": cfg.nodeport_services, "modes": modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "figures": figures.iter().map(|f| f.name()).collect::<Vec<_>>(), "quick": q,
            "clients": cfg.clients, "threads": cfg.threads, "cni_pods": cfg.cni_pods,
            "mem_pods": cfg.mem_pods, "mem_services": cfg.mem_services, "timeout_s": a.timeout, "setup_timeout_s": a.setup_timeout},
        "ipvs": modes::ipvs_status(),
    });
    let mut res = Results::new(cfg.json.clone(), head);
    res.save()?;
    let start = Instant::now();
    let mut failed = vec![];
    let dp = figures.contains(&Fig::Conn) || figures.contains(&Fig::Rr);
    let steps: Vec<(&str, bool, fn(&Cfg, &mut Results) -> Result<()>)> = vec![
        ("bpf", figures.contains(&Fig::Bpf), figs::bpf),
        ("prog", figures.contains(&Fig::Prog), figs::prog),
        ("conn/rr", dp, figs::dataplane),
        (
            "conn nodeport",
            figures.contains(&Fig::Conn),
            figs::nodeport,
        ),
        ("cni", figures.contains(&Fig::Cni), figs::cni),
        ("mem", figures.contains(&Fig::Mem), figs::mem),
    ];
    for (name, want, f) in steps {
        if !want {
            continue;
        }
        let t = Instant::now();
        eprintln!("== figure {name}");
        if let Err(e) = f(&cfg, &mut res) {
            eprintln!("!! figure {name} failed: {e:#}");
            res.push("errors", json!(format!("{name}: {e:#}")));
            failed.push(name);
        }
        fx::cleanup_all();
        eprintln!("== figure {name}: {:.0} s", t.elapsed().as_secs_f64());
    }
    res.v["elapsed_s"] = json!(start.elapsed().as_secs_f64());
    res.save()?;
    let files = write_report(&res.v, &cfg.json)?;
    // Every requested figure produced at least one record?
    let produced = |key: &str| res.v[key].as_array().is_some_and(|a| !a.is_empty());
    let mut missing = vec![];
    for f in &figures {
        let ok = match f {
            Fig::Conn => {
                let rate = |key: &str, field: &str| {
                    res.v[key]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|r| r[field]["conn"]["rate"].is_number()))
                };
                let np = |field: &str| {
                    res.v["nodeport"]
                        .as_array()
                        .is_some_and(|a| a.iter().any(|r| r[field]["rate"].is_number()))
                };
                let svc = modes.iter().any(|m| *m != Mode::Direct);
                rate("dataplane", "anchor")
                    && (!svc || rate("dataplane", "service"))
                    && np("anchor_local")
                    && np("anchor_remote")
                    && (!svc || (np("service_local") && np("service_remote")))
            }
            Fig::Rr => res.v["dataplane"]
                .as_array()
                .is_some_and(|a| a.iter().any(|r| r["anchor"]["rr"]["p50_us"].is_number())),
            Fig::Prog => produced("prog") || !modes.iter().any(|m| *m != Mode::Direct),
            Fig::Bpf => produced("bpf"),
            Fig::Cni => produced("cni"),
            Fig::Mem => produced("mem"),
        };
        if !ok {
            missing.push(f.name());
        }
    }
    eprintln!("results: {}", cfg.json.display());
    for f in files {
        eprintln!("         {f}");
    }
    if !missing.is_empty() || !failed.is_empty() {
        eprintln!("FAILED: figures not produced: {missing:?}; figures with errors: {failed:?}");
        return Ok(1);
    }
    eprintln!(
        "all {} figures produced in {:.0} s",
        figures.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(0)
}

fn write_report(res: &Value, json_path: &Path) -> Result<Vec<String>> {
    let dir = json_path.parent().unwrap_or(Path::new("."));
    let stem = json_path
        .file_stem()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let mut md = report::markdown(res);
    let plots = report::plots(res, dir, &stem).unwrap_or_else(|e| {
        eprintln!("plots: {e:#}");
        vec![]
    });
    if !plots.is_empty() {
        md.push_str("## Plots\n\n");
        for p in &plots {
            md.push_str(&format!("![{p}]({p})\n\n"));
        }
    }
    let md_path = dir.join(format!("{stem}.md"));
    std::fs::write(&md_path, md)?;
    let mut files = vec![md_path.display().to_string()];
    files.extend(plots.iter().map(|p| dir.join(p).display().to_string()));
    Ok(files)
}

fn print(v: Value) {
    println!("{v}");
}

fn main() {
    let cli = Cli::parse();
    let r = (|| -> Result<i32> {
        match cli.cmd {
            Cmd::Run(a) => run(a),
            Cmd::Report { json } => {
                let v: Value = serde_json::from_slice(&std::fs::read(&json)?)?;
                for f in write_report(&v, &json)? {
                    println!("{f}");
                }
                Ok(0)
            }
            Cmd::Serve { port, threads } => load::serve(port, threads).map(|_| 0),
            Cmd::Conn {
                netns,
                targets,
                threads,
                seconds,
                warmup,
                size,
            } => {
                let ns: Vec<String> = netns.split(',').map(|s| s.to_string()).collect();
                let t: Vec<SocketAddr> = list(&targets, |s| Ok(s.parse()?))?;
                print(load::conn(&ns, &t, threads, seconds, warmup, size)?);
                Ok(0)
            }
            Cmd::Rr {
                netns,
                target,
                conns,
                seconds,
                warmup,
                size,
            } => {
                print(load::rr(&netns, target, conns, seconds, warmup, size)?);
                Ok(0)
            }
            Cmd::Stream {
                netns,
                target,
                seconds,
            } => {
                print(load::stream(&netns, target, seconds)?);
                Ok(0)
            }
            Cmd::Rules { mode, n } => {
                let svcs = rules::services(
                    n,
                    &["10.244.0.10".to_string(), "10.244.0.11".to_string()],
                    topo::SERVER_PORT,
                );
                match Mode::parse(&mode)? {
                    Mode::IptablesNft | Mode::IptablesLegacy => {
                        print!(
                            "{}{}",
                            rules::iptables_base(),
                            rules::iptables_full(&svcs, &[])
                        )
                    }
                    Mode::Nftables => print!("{}", rules::nft_full(&svcs, &[])),
                    Mode::Sluice => print!("{}", rules::k8s_all(&svcs)),
                    Mode::Direct => {}
                }
                Ok(0)
            }
            Cmd::Bpf {
                frontends,
                runs,
                repeat,
            } => {
                print(Value::Array(bpfcost::measure(frontends, runs, repeat)?));
                Ok(0)
            }
        }
    })();
    fx::cleanup_all();
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("sluice-bench: {e:#}");
            std::process::exit(1);
        }
    }
}
