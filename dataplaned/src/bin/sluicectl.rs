//! `sluicectl`: the operator's CLI for sluiced.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_core::proto::dataplane_client::DataplaneClient;
use sluice_core::proto::{ListRequest, ObjectsRequest, StatusRequest};
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Parser)]
#[command(version, about = "Operate the sluice dataplane daemon")]
struct Args {
    /// sluiced's socket
    #[arg(long, global = true, default_value = sluice_core::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Output format
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum What {
    Services,
    Endpoints,
    Conntrack,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Daemon health, pod CIDR, attachments with their counters, programs, packet outcomes
    Status,
    /// Apply Kubernetes Service / EndpointSlice / Node objects (YAML or JSON; `-f -` = stdin)
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete the applied objects the files name
    Delete {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// List what is in the maps: services (frontends, backends, counters), endpoints, conntrack
    Get { what: What },
}

fn read_source(path: &PathBuf) -> Result<(String, String)> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        return Ok(("<stdin>".into(), s));
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((path.display().to_string(), text))
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("sluicectl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<()> {
    let client = sluice_core::client::connect(&args.socket, Duration::from_secs(60))
        .await
        .with_context(|| format!("connecting to sluiced at {}", args.socket.display()))?;
    let mut client = client
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20);
    match args.command {
        Cmd::Status => status(&mut client, args.output).await,
        Cmd::Apply { files } => objects(&mut client, &files, false, args.output).await,
        Cmd::Delete { files } => objects(&mut client, &files, true, args.output).await,
        Cmd::Get {
            what: What::Services,
        } => services(&mut client, args.output, false).await,
        Cmd::Get {
            what: What::Endpoints,
        } => services(&mut client, args.output, true).await,
        Cmd::Get {
            what: What::Conntrack,
        } => conntrack(&mut client, args.output).await,
    }
}

/// With `-o json`, prints the reply as it is and says so.
fn printed_as_json(out: Output, reply: &impl serde::Serialize) -> Result<bool> {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(reply)?);
    }
    Ok(out == Output::Json)
}

fn status_message(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

async fn objects(
    client: &mut DataplaneClient<Channel>,
    files: &[PathBuf],
    delete: bool,
    out: Output,
) -> Result<()> {
    let mut failed = false;
    for f in files {
        let (source, text) = read_source(f)?;
        let req = ObjectsRequest {
            source: source.clone(),
            text,
        };
        let reply = if delete {
            client.delete(req).await
        } else {
            client.apply(req).await
        };
        match reply {
            Ok(r) => {
                let r = r.into_inner();
                if out == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&r)?);
                    continue;
                }
                // Tens of thousands of lines: one buffered write, not one per line.
                use std::io::Write;
                let mut w = std::io::BufWriter::new(std::io::stdout().lock());
                let verb = if delete { "deleted" } else { "applied" };
                for o in &r.objects {
                    writeln!(w, "{o} {verb}")?;
                }
                for o in &r.not_found {
                    writeln!(w, "{o} not found")?;
                }
                writeln!(
                    w,
                    "({} map writes, {} backends left their sets)",
                    r.map_writes, r.backends_left
                )?;
                w.flush()?;
            }
            Err(s) => {
                eprintln!("sluicectl: {}", s.message());
                failed = true;
            }
        }
    }
    if failed {
        bail!(
            "some objects were not {}",
            if delete { "deleted" } else { "applied" }
        );
    }
    Ok(())
}

async fn services(
    client: &mut DataplaneClient<Channel>,
    out: Output,
    endpoints: bool,
) -> Result<()> {
    let list = client
        .list_services(ListRequest {})
        .await
        .map_err(status_message)?
        .into_inner();
    if printed_as_json(out, &list)? {
        return Ok(());
    }
    if endpoints {
        println!(
            "{:<32} {:<22} {:<6} {:<8} {:<12} {:<5} NODE",
            "SERVICE", "ENDPOINT", "READY", "SERVING", "TERMINATING", "SLOT"
        );
        for s in &list.services {
            let name = format!("{}/{}:{}/{}", s.namespace, s.name, s.port, s.protocol);
            for e in &s.endpoints {
                let slot = if e.slot < 0 {
                    "-".to_string()
                } else {
                    e.slot.to_string()
                };
                let node = match (e.local, e.node.as_str(), e.node_ip.as_str()) {
                    (true, _, _) => "(this node)".to_string(),
                    (false, "", "") => "? (node unknown)".to_string(),
                    (false, n, "") => format!("{n} (address unknown)"),
                    (false, "", a) => a.to_string(),
                    (false, n, a) => format!("{n} {a}"),
                };
                println!(
                    "{:<32} {:<22} {:<6} {:<8} {:<12} {:<5} {}",
                    name,
                    format!("{}:{}", e.ip, e.port),
                    e.ready,
                    e.serving,
                    e.terminating,
                    slot,
                    node
                );
            }
        }
        return Ok(());
    }
    println!(
        "{:<32} {:<22} {:<12} {:<8} {:>6} {:>9} {:>12}  BACKENDS",
        "SERVICE", "FRONTEND", "KIND", "POLICY", "ID", "PACKETS", "BYTES"
    );
    for s in &list.services {
        let name = format!("{}/{}:{}/{}", s.namespace, s.name, s.port, s.protocol);
        // One line per frontend, its kind and the policy that governs its new flows.
        let fronts: Vec<(String, String, &str)> = if s.frontend_views.is_empty() {
            vec![("-".into(), "-".into(), "-")]
        } else {
            s.frontend_views
                .iter()
                .map(|f| {
                    let policy = if f.local_only { "Local" } else { "Cluster" };
                    (f.address.clone(), f.kind.clone(), policy)
                })
                .collect()
        };
        let backends: Vec<String> = s
            .endpoints
            .iter()
            .map(|e| {
                let state = if e.slot >= 0 {
                    ""
                } else if e.terminating {
                    " (terminating)"
                } else {
                    " (not ready)"
                };
                let here = if e.local { "*" } else { "" };
                format!("{}:{}{here}{state}", e.ip, e.port)
            })
            .collect();
        for (i, (addr, kind, policy)) in fronts.iter().enumerate() {
            let mut line = format!(
                "{:<32} {:<22} {:<12} {:<8} {:>6} {:>9} {:>12}  ",
                if i == 0 { name.as_str() } else { "" },
                addr,
                kind,
                policy,
                if i == 0 {
                    s.svc_id.to_string()
                } else {
                    String::new()
                },
                if i == 0 {
                    s.packets.to_string()
                } else {
                    String::new()
                },
                if i == 0 {
                    s.bytes.to_string()
                } else {
                    String::new()
                },
            );
            if i == 0 {
                line.push_str(&if backends.is_empty() {
                    "<none: rejected>".to_string()
                } else {
                    backends.join(", ")
                });
                if s.affinity_timeout > 0 {
                    line.push_str(&format!("  [affinity ClientIP {}s]", s.affinity_timeout));
                }
            }
            println!("{}", line.trim_end());
        }
        if s.local + s.forwarded + s.decapsulated > 0
            || s.frontend_views.iter().any(|f| f.kind != "ClusterIP")
        {
            println!(
                "{:<32} external: {} delivered here, {} forwarded to other nodes, {} decapsulated from other nodes; {} local endpoint(s)",
                "", s.local, s.forwarded, s.decapsulated, s.local_slots
            );
        }
    }
    println!("(* = endpoint on this node)");
    Ok(())
}

async fn conntrack(client: &mut DataplaneClient<Channel>, out: Output) -> Result<()> {
    let list = client
        .list_conntrack(ListRequest {})
        .await
        .map_err(status_message)?
        .into_inner();
    if printed_as_json(out, &list)? {
        return Ok(());
    }
    println!(
        "{:<5} {:<10} {:<22} {:<22} {:<22} {:<12} {:>6} {:>6}  SERVICE",
        "PROTO", "KIND", "CLIENT", "FRONTEND", "BACKEND", "STATE", "AGE", "IDLE"
    );
    for f in &list.flows {
        let mut state = f.state.clone();
        if f.hairpin {
            state.push_str("+hp");
        }
        if !f.has_reverse {
            state.push_str("+half");
        }
        let client = if f.translated_port != 0 {
            format!("{}>{}", f.client, f.translated_port)
        } else {
            f.client.clone()
        };
        println!(
            "{:<5} {:<10} {:<22} {:<22} {:<22} {:<12} {:>5}s {:>5}s  {}",
            f.protocol,
            f.kind,
            client,
            if f.frontend.is_empty() {
                "-"
            } else {
                &f.frontend
            },
            f.backend,
            state,
            f.age_secs,
            f.idle_secs,
            f.service
        );
    }
    println!("({} flows, {} map entries)", list.flows.len(), list.entries);
    if let Some(o) = &list.occupancy {
        print_occupancy(o);
    }
    Ok(())
}

fn print_occupancy(o: &sluice_core::proto::ConntrackOccupancy) {
    println!(
        "conntrack: {} of {} entries ({:.1}%), {} evicted (estimated), {} created, {} deleted",
        o.entries,
        o.capacity,
        100.0 * o.entries as f64 / o.capacity.max(1) as f64,
        o.evictions,
        o.created,
        o.deleted
    );
}

async fn status(client: &mut DataplaneClient<Channel>, out: Output) -> Result<()> {
    let s = client
        .status(StatusRequest {})
        .await
        .map_err(status_message)?
        .into_inner();
    if printed_as_json(out, &s)? {
        return Ok(());
    }
    println!(
        "node {}: {}",
        s.node_name,
        if s.ready { "ready" } else { "NOT READY" }
    );
    println!(
        "pod CIDR {} ({} free), attach mode {}, {} service frontends",
        s.pod_cidr, s.free_ips, s.attach_mode, s.frontends
    );
    if let Some(o) = &s.conntrack {
        print_occupancy(o);
    }
    println!("\nservice object sources:");
    for src in &s.sources {
        let state = match (src.loaded, src.loaded_once) {
            (true, _) => "loaded",
            (false, true) if !src.sync_state.is_empty() => "synced once, not ready now",
            (false, true) => "loaded, last change failed",
            (false, false) => "DEGRADED (not loaded yet)",
        };
        println!(
            "  {:<40} {:<28} {:>6} objects",
            src.name, state, src.objects
        );
        if !src.server.is_empty() {
            println!("    server: {}", src.server);
        }
        if !src.sync_state.is_empty() {
            println!("    sync: {}", src.sync_state);
        }
        if !src.last_error.is_empty() {
            println!("    last error: {}", src.last_error);
        }
    }
    if s.services_degraded {
        println!(
            "  degraded start: the maps keep what no loaded object explains ({} frontends) until every source has loaded",
            s.kept_frontends
        );
    }
    if let Some(n) = &s.network {
        println!(
            "\nnetwork: node address {}, --lb-mode {}, uplinks [{}] (NodePorts on {})",
            n.node_ip,
            n.lb_mode,
            n.uplinks.join(", "),
            n.node_addrs.join(", ")
        );
        if !n.pod_cidr_pending.is_empty() {
            println!(
                "  this node's Node object names pod CIDR {}: takes effect at restart",
                n.pod_cidr_pending
            );
        }
        println!("  nodes ({}):", n.peers.len());
        for p in &n.peers {
            println!(
                "    {:<24} {:<16} pods {}",
                p.name,
                p.internal_ip,
                p.pod_cidrs.join(", ")
            );
        }
        println!("  routes ({}):", n.routes.len());
        for r in &n.routes {
            println!("    {:<20} via {}", r.cidr, r.via);
        }
        if !n.health_check_ports.is_empty() {
            let ports: Vec<String> = n.health_check_ports.iter().map(|p| p.to_string()).collect();
            println!("  health-check node ports: {}", ports.join(", "));
        }
    }
    println!("\nprograms:");
    for p in &s.programs {
        println!("  {:<10} id {:<6} {}", p.name, p.id, p.pinned);
    }
    println!("\nattachments ({}):", s.attachments.len());
    println!(
        "  {:<24} {:<6} {:<15} {:<15} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "CONTAINER",
        "IF",
        "IP",
        "HOST-IF",
        "ATTACHED",
        "RX-PKTS",
        "RX-BYTES",
        "TX-PKTS",
        "TX-BYTES"
    );
    for a in &s.attachments {
        let c = a.counters.clone().unwrap_or_default();
        let cid: String = a.container_id.chars().take(24).collect();
        println!(
            "  {:<24} {:<6} {:<15} {:<15} {:>8} {:>10} {:>10} {:>10} {:>10}",
            cid,
            a.ifname,
            a.ip,
            if a.host_ifindex == 0 {
                format!("{} (gone)", a.host_ifname)
            } else {
                a.host_ifname.clone()
            },
            if a.attached {
                a.attach_mode.as_str()
            } else {
                "no"
            },
            c.rx_packets,
            c.rx_bytes,
            c.tx_packets,
            c.tx_bytes
        );
    }
    println!("\npacket outcomes (all pods):");
    for r in s.reasons.iter().filter(|r| r.packets > 0) {
        println!(
            "  {:<22} {:>10} packets {:>12} bytes",
            r.name, r.packets, r.bytes
        );
    }
    Ok(())
}
