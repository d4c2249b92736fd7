//! `sluiced`: the per-node dataplane daemon. Flags in, `sluiced::run` until SIGTERM/SIGINT.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use sluiced::ipam::{Cidr, Ipam};
use sluiced::{AttachMode, Config, LbMode, MapSizes};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    /// tcx on Linux >= 6.6, clsact otherwise
    Auto,
    /// clsact filters at ADD (no RCU grace periods on the ADD path), moved to tcx links once ADDs
    /// and DELs are quiet (tcx kernels). Not with a chained plugin that adds an ingress qdisc to
    /// the host-side veth (the bandwidth plugin): clsact holds that qdisc slot during the ADD.
    Fast,
    Tcx,
    Tc,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LbModeArg {
    Dsr,
    Tunnel,
}

#[derive(Debug, Parser)]
#[command(version, about = "sluice per-node dataplane daemon")]
struct Args {
    /// gRPC Unix socket (mode 0600, root only)
    #[arg(long, default_value = sluice_core::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// IPAM store and standalone-mode objects
    #[arg(long, default_value = "/var/lib/sluice")]
    state_dir: PathBuf,
    /// Where programs, maps and links are pinned (on a bpffs; /sys/fs/bpf is mounted if needed)
    #[arg(long, default_value = "/sys/fs/bpf/sluice")]
    bpffs: PathBuf,
    /// This node's name (default: the host name)
    #[arg(long)]
    node_name: Option<String>,
    /// The pod CIDR this node allocates from
    /// This node's pod CIDR. Default: with a Kubernetes watch, the Node's `spec.podCIDR` (the
    /// CIDR used last, stored in the state dir, while the API server cannot be reached);
    /// otherwise 10.244.0.0/24.
    #[arg(long)]
    pod_cidr: Option<String>,
    /// How programs are attached to pod veths
    #[arg(long, value_enum, default_value = "auto")]
    attach_mode: Mode,
    /// Conntrack entries (two per NATed flow)
    #[arg(long, default_value_t = MapSizes::default().conntrack)]
    ct_size: u32,
    /// Service frontends
    #[arg(long, default_value_t = MapSizes::default().frontends)]
    frontends_size: u32,
    /// Backend slots, all services together
    #[arg(long, default_value_t = MapSizes::default().backends)]
    backends_size: u32,
    /// sessionAffinity entries
    #[arg(long, default_value_t = MapSizes::default().affinity)]
    affinity_size: u32,
    /// Source address a pod sees when it reaches itself through a service
    #[arg(long, default_value = "169.254.42.1")]
    hairpin_addr: Ipv4Addr,
    /// Seconds between checks that every allocation still has its interface
    #[arg(long, default_value_t = 30)]
    reconcile_interval: u64,
    /// Standalone mode: load Kubernetes Service/EndpointSlice/Node objects from every
    /// *.yaml/*.yml/*.json in DIR, at start and whenever a file changes
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Conntrack: idle seconds before an unanswered TCP SYN flow expires
    #[arg(long, default_value_t = 60)]
    ct_timeout_syn: u64,
    /// Conntrack: idle seconds before an established TCP flow expires (kube-proxy: 24 h)
    #[arg(long, default_value_t = 86400)]
    ct_timeout_established: u64,
    /// Conntrack: idle seconds before a half-closed TCP flow (FIN from one side) expires
    #[arg(long, default_value_t = 3600)]
    ct_timeout_fin: u64,
    /// Conntrack: idle seconds before a TCP flow closed by both sides expires
    #[arg(long, default_value_t = 10)]
    ct_timeout_closed: u64,
    /// Conntrack: idle seconds before a TCP flow that saw RST expires
    #[arg(long, default_value_t = 10)]
    ct_timeout_rst: u64,
    /// Conntrack: idle seconds before a UDP flow with no reply yet expires
    #[arg(long, default_value_t = 30)]
    ct_timeout_udp: u64,
    /// Conntrack: idle seconds before a UDP flow seen both ways expires
    #[arg(long, default_value_t = 120)]
    ct_timeout_udp_stream: u64,
    /// Source ports given to a new flow whose reply tuple belongs to a live flow (the kernel's
    /// NAT does the same): outside ip_local_port_range and the NodePort range
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range)]
    ct_nat_ports: (u16, u16),
    /// Seconds between conntrack garbage-collection sweeps
    #[arg(long, default_value_t = 10)]
    ct_gc_interval: u64,
    /// Serve NodePorts, LoadBalancer and external IPs on this interface (repeatable; default: the
    /// interface of the default route)
    #[arg(long = "nodeport-iface", value_name = "IFACE")]
    nodeport_iface: Vec<String>,
    /// This node's address (default: the first IPv4 address of the first --nodeport-iface)
    #[arg(long)]
    node_ip: Option<Ipv4Addr>,
    /// External flows to a backend on another node: `dsr` (the backend's node answers the client
    /// directly) or `tunnel` (replies go back through the node the client reached)
    #[arg(long, value_enum, default_value = "dsr")]
    lb_mode: LbModeArg,
    /// Remove everything this daemon created (pins, attachments, state, socket) and exit
    /// Watch Services, EndpointSlices and Nodes through the API server this kubeconfig names
    /// (without it and --master, in a pod: the in-cluster config; elsewhere: standalone).
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,
    /// The API server's URL (over the kubeconfig's server, as kube-proxy's --master).
    #[arg(long, value_name = "URL")]
    master: Option<String>,
    /// CNI STATUS reports not ready once the API server has been unreachable this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    kube_unreachable_limit: u64,
    /// Where /healthz and /livez are served (kube-proxy's); "" turns them off.
    #[arg(long, default_value = "0.0.0.0:10256", value_name = "ADDR")]
    healthz_bind_address: String,
    /// Where /metrics (Prometheus text format) is served; "" turns it off.
    #[arg(long, default_value = "127.0.0.1:10249", value_name = "ADDR")]
    metrics_bind_address: String,
    #[arg(long)]
    cleanup: bool,
}

/// "" is off; otherwise HOST:PORT (kube-proxy also takes a bare IP: its default port then).
fn bind_address(flag: &str, s: &str, default_port: u16) -> Result<Option<std::net::SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(Some((ip, default_port).into()));
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("--{flag} {s:?}: want IP:PORT"))
}

fn main() -> Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let flag_cidr: Option<Cidr> = args.pod_cidr.as_deref().map(str::parse).transpose()?;
    if args.cleanup {
        return cleanup(&args, flag_cidr.unwrap_or(DEFAULT_POD_CIDR.parse()?));
    }
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let kube = sluiced::sources::kube::KubeOptions {
        kubeconfig: args.kubeconfig.clone(),
        master: args.master.clone(),
        in_cluster: args.kubeconfig.is_none()
            && args.master.is_none()
            && sluiced::sources::kube::in_pod(),
        unreachable_limit: Duration::from_secs(args.kube_unreachable_limit),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let pod_cidr = match flag_cidr {
        Some(c) => c,
        None if kube.enabled() => {
            runtime.block_on(cluster_pod_cidr(&kube, &node_name, &args.state_dir))
        }
        None => DEFAULT_POD_CIDR.parse()?,
    };
    let config = Config {
        socket: args.socket.clone(),
        state_dir: args.state_dir.clone(),
        bpffs: args.bpffs.clone(),
        node_name,
        pod_cidr,
        attach_mode: match args.attach_mode {
            Mode::Auto | Mode::Fast => AttachMode::detect(),
            Mode::Tcx => AttachMode::Tcx,
            Mode::Tc => AttachMode::Tc,
        },
        fast_add: matches!(args.attach_mode, Mode::Fast),
        map_sizes: MapSizes {
            frontends: args.frontends_size,
            backends: args.backends_size,
            conntrack: args.ct_size,
            affinity: args.affinity_size,
            ..MapSizes::default()
        },
        hairpin_addr: args.hairpin_addr,
        reconcile_interval: Duration::from_secs(args.reconcile_interval.max(1)),
        manifests: args.manifests.clone(),
        manifests_poll: Duration::from_secs(1),
        ct_timeouts: sluiced::services::conntrack::Timeouts {
            syn: Duration::from_secs(args.ct_timeout_syn),
            established: Duration::from_secs(args.ct_timeout_established),
            fin: Duration::from_secs(args.ct_timeout_fin),
            closed: Duration::from_secs(args.ct_timeout_closed),
            rst: Duration::from_secs(args.ct_timeout_rst),
            udp: Duration::from_secs(args.ct_timeout_udp),
            udp_stream: Duration::from_secs(args.ct_timeout_udp_stream),
        },
        xlate_ports: args.ct_nat_ports,
        nodeport_ifaces: args.nodeport_iface.clone(),
        node_ip: args.node_ip,
        lb_mode: match args.lb_mode {
            LbModeArg::Dsr => LbMode::Dsr,
            LbModeArg::Tunnel => LbMode::Tunnel,
        },
        ct_gc_interval: Duration::from_secs(args.ct_gc_interval.max(1)),
        kube,
        healthz_bind: bind_address("healthz-bind-address", &args.healthz_bind_address, 10256)?,
        metrics_bind: bind_address("metrics-bind-address", &args.metrics_bind_address, 10249)?,
    };
    runtime.block_on(async {
        let listener = sluiced::bind_socket(&config.socket)?;
        let socket = config.socket.clone();
        let result = sluiced::run(listener, config, shutdown_signal()).await;
        let _ = std::fs::remove_file(socket);
        result
    })
}

const DEFAULT_POD_CIDR: &str = "10.244.0.0/24";

/// The pod CIDR of a watched node without `--pod-cidr`: its Node's; while the API server cannot
/// be reached (5 s), the one used last (`<state-dir>/pod-cidr`, written at every start) so that
/// a restart never waits for the control plane; with neither, waits for the Node to have one.
async fn cluster_pod_cidr(
    kube: &sluiced::sources::kube::KubeOptions,
    node: &str,
    state_dir: &std::path::Path,
) -> Cidr {
    let stored = std::fs::read_to_string(state_dir.join(sluiced::POD_CIDR_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<Cidr>().ok());
    let started = std::time::Instant::now();
    loop {
        let asked = tokio::time::timeout(
            Duration::from_secs(5),
            sluiced::sources::kube::own_pod_cidr(kube, node),
        )
        .await;
        match asked {
            Ok(Ok(Some(c))) => match c.parse::<Cidr>() {
                Ok(c) => {
                    tracing::info!(pod_cidr = %c, node, "pod CIDR from this node's Node");
                    return c;
                }
                Err(e) => tracing::error!(pod_cidr = %c, error = %e, "this node's Node has a pod CIDR sluice cannot use"),
            },
            Ok(Ok(None)) => tracing::warn!(node, "this node's Node has no spec.podCIDR yet (kube-controller-manager --allocate-node-cidrs); waiting"),
            Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "reading this node's pod CIDR from the API server"),
            Err(_) => tracing::warn!("the API server did not answer within 5 s"),
        }
        if let Some(c) = stored.filter(|_| started.elapsed() >= Duration::from_secs(5)) {
            tracing::warn!(pod_cidr = %c, "using the pod CIDR of the last start until the API server answers (a change takes effect at the next start)");
            return c;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: want MIN-MAX"))?;
    let a: u16 = a.parse().map_err(|_| format!("{a:?} is not a port"))?;
    let b: u16 = b.parse().map_err(|_| format!("{b:?} is not a port"))?;
    if a == 0 || a > b || b - a < 255 {
        return Err(format!(
            "{s:?}: want 1 <= MIN <= MAX with at least 256 ports"
        ));
    }
    Ok((a, b))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// `--cleanup`: detach from every pod veth we know of, unpin everything, delete state and socket.
fn cleanup(args: &Args, pod_cidr: Cidr) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(&args.socket).is_ok() {
        anyhow::bail!(
            "sluiced is running at {}: stop it first",
            args.socket.display()
        );
    }
    let ipam_dir = args.state_dir.join("ipam");
    let ifindexes: Vec<u32> = if ipam_dir.exists() {
        Ipam::open(&ipam_dir, pod_cidr)?
            .all()
            .filter_map(|a| nix::net::if_::if_nametoindex(a.host_ifname.as_str()).ok())
            .collect()
    } else {
        Vec::new()
    };
    let uplinks = sluiced::nodes::discover(&args.nodeport_iface, args.node_ip)
        .map(|u| u.ifaces.into_iter().map(|(_, i)| i).collect::<Vec<_>>())
        .unwrap_or_default();
    sluiced::datapath::Datapath::cleanup(&args.bpffs, &ifindexes, &uplinks)?;
    if args.state_dir.exists() {
        std::fs::remove_dir_all(&args.state_dir)
            .with_context(|| format!("removing {}", args.state_dir.display()))?;
    }
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!(bpffs = %args.bpffs.display(), state = %args.state_dir.display(), "cleaned up");
    Ok(())
}
