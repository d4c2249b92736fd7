//! `sluicectl`: the operator's CLI for sluiced.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_core::proto::StatusRequest;

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

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Daemon health, pod CIDR, attachments with their counters, programs, packet outcomes
    Status,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = sluice_core::client::connect(&args.socket, Duration::from_secs(10))
            .await
            .with_context(|| format!("connecting to sluiced at {}", args.socket.display()))?;
        match args.command {
            Cmd::Status => {
                let s = client.status(StatusRequest {}).await?.into_inner();
                if args.output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&s)?);
                    return Ok(());
                }
                println!("node {}: {}", s.node_name, if s.ready { "ready" } else { "NOT READY" });
                println!("pod CIDR {} ({} free), attach mode {}", s.pod_cidr, s.free_ips, s.attach_mode);
                println!("\nprograms:");
                for p in &s.programs {
                    println!("  {:<10} id {:<6} {}", p.name, p.id, p.pinned);
                }
                println!("\nattachments ({}):", s.attachments.len());
                println!(
                    "  {:<24} {:<6} {:<15} {:<15} {:>8} {:>10} {:>10} {:>10} {:>10}",
                    "CONTAINER", "IF", "IP", "HOST-IF", "ATTACHED", "RX-PKTS", "RX-BYTES", "TX-PKTS", "TX-BYTES"
                );
                for a in &s.attachments {
                    let c = a.counters.clone().unwrap_or_default();
                    let cid: String = a.container_id.chars().take(24).collect();
                    println!(
                        "  {:<24} {:<6} {:<15} {:<15} {:>8} {:>10} {:>10} {:>10} {:>10}",
                        cid,
                        a.ifname,
                        a.ip,
                        if a.host_ifindex == 0 { format!("{} (gone)", a.host_ifname) } else { a.host_ifname.clone() },
                        if a.attached { "yes" } else { "no" },
                        c.rx_packets,
                        c.rx_bytes,
                        c.tx_packets,
                        c.tx_bytes
                    );
                }
                println!("\npacket outcomes (all pods):");
                for r in s.reasons.iter().filter(|r| r.packets > 0) {
                    println!("  {:<22} {:>10} packets {:>12} bytes", r.name, r.packets, r.bytes);
                }
            }
        }
        Ok(())
    })
}
