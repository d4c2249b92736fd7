//! `cni-conformance`: runs the CNI conformance cases against the network a conflist describes.
//! See conformance/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use cni_conformance::runner::Options;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Check a CNI plugin against the CNI spec (0.4.0, 1.0.0, 1.1.0) in throwaway network namespaces"
)]
struct Args {
    /// Directories holding the plugin binaries (CNI_PATH), `:`-separated
    #[arg(long, value_name = "DIR[:DIR...]", required_unless_present = "list")]
    cni_path: Option<String>,
    /// The network configuration list to test (@WORKDIR@, @ID@, @NODE_NETNS@ are substituted)
    #[arg(long, value_name = "FILE", required_unless_present = "list")]
    conflist: Option<PathBuf>,
    /// Shell command run (inside the node namespace) before the cases, e.g. to start a daemon
    #[arg(long, value_name = "CMD")]
    setup: Option<String>,
    /// Shell command run (inside the node namespace) after the cases, e.g. to stop the daemon
    #[arg(long, value_name = "CMD")]
    teardown: Option<String>,
    /// Shell command run once after the final teardown (not between the daemon-down cases)
    #[arg(long, value_name = "CMD")]
    cleanup: Option<String>,
    /// cnitool binary (default: cnitool on PATH)
    #[arg(long, value_name = "PATH")]
    cnitool: Option<PathBuf>,
    /// Output format on stdout
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Also write the JSON report to FILE
    #[arg(long, value_name = "FILE")]
    json_out: Option<PathBuf>,
    /// Run only these cases (repeatable or comma-separated)
    #[arg(long, value_name = "CASE", value_delimiter = ',')]
    only: Vec<String>,
    /// Skip these cases (repeatable or comma-separated)
    #[arg(long, value_name = "CASE", value_delimiter = ',')]
    skip: Vec<String>,
    /// List the cases and exit
    #[arg(long)]
    list: bool,
    /// Shell command (in the node namespace) printing the plugin's IP allocations; its output
    /// must be the same before ADD and after DEL. Default: host-local's store when the conflist
    /// uses host-local
    #[arg(long, value_name = "CMD")]
    alloc_cmd: Option<String>,
    /// Address put on the node namespace's lo, for node-to-pod traffic and hostPorts
    #[arg(long, default_value = "192.0.2.1/32")]
    node_addr: String,
    /// CNI_IFNAME of the pods
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// Number of concurrent ADDs in concurrent-adds
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Number of kills in killed-mid-add
    #[arg(long, default_value_t = 6)]
    kill_rounds: usize,
    /// Seconds before a plugin or cnitool call is killed as hung
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Do without cnitool: the runner's own runtime drives every case (less coverage: libcni
    /// never sees the plugin's results)
    #[arg(long)]
    no_cnitool: bool,
    /// Keep the work dir (hook logs, daemon state) after the run
    #[arg(long)]
    keep_workdir: bool,
    /// No per-case progress lines on stderr
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for c in cni_conformance::cases::all() {
            println!(
                "{:<32} {}  {}",
                c.name,
                if c.req == cni_conformance::cases::Req::Required {
                    "req"
                } else {
                    "adv"
                },
                c.about
            );
        }
        return ExitCode::SUCCESS;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("cni-conformance: needs root (network namespaces, veth, the plugin's own needs)");
        return ExitCode::from(2);
    }
    let opts = Options {
        cni_path: args
            .cni_path
            .unwrap_or_default()
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        conflist: args.conflist.unwrap_or_default(),
        setup: args.setup,
        teardown: args.teardown,
        cleanup: args.cleanup,
        cnitool: args.cnitool,
        only: args.only,
        skip: args.skip,
        alloc_cmd: args.alloc_cmd,
        node_addr: args.node_addr,
        ifname: args.ifname,
        concurrency: args.concurrency.max(2),
        kill_rounds: args.kill_rounds,
        timeout: Duration::from_secs(args.timeout),
        keep_workdir: args.keep_workdir,
        no_cnitool: args.no_cnitool,
        progress: !args.quiet,
    };
    let report = match cni_conformance::run(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cni-conformance: {e:#}");
            return ExitCode::from(2);
        }
    };
    let json = serde_json::to_string_pretty(&report).expect("report serialises");
    if let Some(p) = &args.json_out {
        if let Err(e) = std::fs::write(p, &json) {
            eprintln!("cni-conformance: writing {}: {e}", p.display());
        }
    }
    match args.format {
        Format::Table => print!("{}", report.table()),
        Format::Json => println!("{json}"),
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
