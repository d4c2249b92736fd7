//! sluiced, the per-node dataplane daemon, as a library: `run(listener, config, shutdown)` serves
//! the gRPC API until `shutdown` resolves. The binary (bin/sluiced.rs) only parses flags, binds
//! the socket and waits for SIGTERM.
//!
//! Shutdown leaves the datapath running: programs stay attached (pinned tcx links or clsact
//! filters) and maps stay pinned, so pods keep their traffic while the daemon is away; a new
//! daemon re-adopts them.

pub mod datapath;
pub mod ipam;
pub mod nodes;
pub mod observe;
pub mod pod;
pub mod server;
pub mod services;
pub mod sources;
pub mod state;

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tokio_stream::StreamExt;

pub use datapath::{AttachMode, LbMode, MapSizes};

/// Everything the daemon is told at start.
#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub node_name: String,
    pub pod_cidr: ipam::Cidr,
    pub attach_mode: AttachMode,
    /// Pods are attached with clsact at ADD and moved to tcx links when ADDs are quiet
    /// (`--attach-mode fast` on a tcx kernel; see `Datapath::add_mode`).
    pub fast_add: bool,
    pub map_sizes: MapSizes,
    /// Source given to a pod that reaches itself through a service (see bpf/config.h).
    pub hairpin_addr: Ipv4Addr,
    /// How often allocations are checked against existing links.
    pub reconcile_interval: Duration,
    /// Standalone mode: Kubernetes objects (*.yaml/*.yml/*.json) loaded at start and on change.
    pub manifests: Option<PathBuf>,
    /// How often the manifests directory is checked for changes.
    pub manifests_poll: Duration,
    /// Conntrack idle timeouts per state (the datapath and the GC use the same).
    pub ct_timeouts: services::conntrack::Timeouts,
    /// Source ports given to a flow whose reply tuple is taken (inclusive range).
    pub xlate_ports: (u16, u16),
    /// Interfaces external frontends are served on (empty: the default route's interface).
    pub nodeport_ifaces: Vec<String>,
    /// This node's address (default: the first IPv4 address of the first nodeport interface).
    pub node_ip: Option<Ipv4Addr>,
    pub lb_mode: LbMode,
    /// How often expired conntrack entries are removed.
    pub ct_gc_interval: Duration,
    /// The Kubernetes watch (off unless `--kubeconfig`, `--master` or in a pod).
    pub kube: sources::kube::KubeOptions,
    /// `/healthz` and `/livez` (kube-proxy's), None: off.
    pub healthz_bind: Option<std::net::SocketAddr>,
    /// `/metrics`, None: off.
    pub metrics_bind: Option<std::net::SocketAddr>,
}

/// `<state-dir>/pod-cidr`: the pod CIDR the last start used.
pub const POD_CIDR_FILE: &str = "pod-cidr";

/// Largest gRPC message either way (an apply of 10,000 Services is a few MB).
pub const MAX_MESSAGE: usize = 256 << 20;

/// The gateway every pod routes through: link-local, answered by the host-side veth's MAC.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Serves until `shutdown` resolves; returns when the server has stopped.
pub async fn run(
    listener: UnixListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    enable_forwarding();

    let state = Arc::new(state::State::open(&config).context("starting the dataplane")?);
    // The CIDR in use, for a restart that cannot ask the API server (bin/sluiced.rs).
    if let Err(e) = std::fs::write(
        config.state_dir.join(POD_CIDR_FILE),
        format!("{}\n", state.pod_cidr()),
    ) {
        tracing::warn!(error = %e, "recording the pod CIDR in use");
    }
    state.reconcile_at_start().await;
    state.objects_changed(true).await;
    tracing::info!(node = %config.node_name, pod_cidr = %state.pod_cidr(), node_ip = %state.uplinks.node_ip,
        mode = state.attach_mode().name(), socket = %config.socket.display(), "sluiced ready");

    let mut background = Vec::new();
    background.push({
        let state = state.clone();
        every(config.reconcile_interval, move || {
            let state = state.clone();
            async move { state.reconcile_periodic().await }
        })
    });
    background.push({
        let state = state.clone();
        every(config.ct_gc_interval, move || {
            let state = state.clone();
            async move {
                let st = state.clone();
                match tokio::task::spawn_blocking(move || {
                    services::conntrack::gc(&st.datapath.maps, &st.ct_timeouts)
                })
                .await
                {
                    Ok(Ok(g)) if g.expired > 0 || g.repaired > 0 => {
                        observe::metrics::get().gc(&g);
                        tracing::debug!(
                            scanned = g.scanned,
                            expired = g.expired,
                            repaired = g.repaired,
                            "conntrack gc"
                        )
                    }
                    Ok(Ok(g)) => observe::metrics::get().gc(&g),
                    Ok(Err(e)) => tracing::warn!(error = %format!("{e:#}"), "conntrack gc"),
                    Err(e) => tracing::warn!(error = %e, "conntrack gc task"),
                }
            }
        })
    });
    if state.datapath.upgrades() {
        let state = state.clone();
        background.push(every(Duration::from_millis(500), move || {
            let state = state.clone();
            async move {
                let _ = tokio::task::spawn_blocking(move || state.upgrade_attachments()).await;
            }
        }));
    }
    let endpoints: [(&str, _, observe::Route); 2] = [
        ("healthz", config.healthz_bind, observe::healthz::route),
        ("metrics", config.metrics_bind, observe::metrics::route),
    ];
    for (what, bind, route) in endpoints {
        if let Some(addr) = bind {
            background.push(tokio::spawn(observe::serve(
                what,
                addr,
                state.clone(),
                route,
            )));
        }
    }
    {
        // Health-check node ports answer serviceProxyHealthy from the same notion as /healthz.
        let state = state.clone();
        background.push(every(Duration::from_secs(1), move || {
            let state = state.clone();
            async move {
                let h = observe::healthz::proxy_health(&state);
                state.health.set_proxy_healthy(h.healthy);
            }
        }));
    }
    if let Some(status) = state.watch.clone() {
        background.push(tokio::spawn(sources::kube::run(
            config.kube.clone(),
            config.node_name.clone(),
            status,
            WatchSink(state.clone()),
        )));
    }
    if config.manifests.is_some() {
        let state = state.clone();
        background.push(every(config.manifests_poll, move || {
            let state = state.clone();
            async move {
                let st = state.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    let dp = st.datapath.clone();
                    if let Err(e) = st.services().reload_manifests(&dp.maps) {
                        tracing::error!(error = %format!("{e:#}"), "applying changed manifests");
                    }
                })
                .await;
                state.objects_changed(true).await;
            }
        }));
    }

    // Only root may talk to the daemon: others' connections are closed at accept.
    let incoming = UnixListenerStream::new(listener).filter(|conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if cred.uid() == 0 => true,
            Ok(cred) => {
                tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused a connection from a non-root peer");
                false
            }
            Err(e) => {
                tracing::warn!(error = %e, "refused a connection without peer credentials");
                false
            }
        },
        Err(_) => true,
    });
    // Large enough for tens of thousands of objects in one apply.
    let api =
        sluice_core::proto::dataplane_server::DataplaneServer::new(server::Api::new(state.clone()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
    let result = tonic::transport::Server::builder()
        .layer(observe::metrics::RpcLayer)
        .add_service(api)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    for task in background {
        task.abort();
    }
    tracing::info!("sluiced stopped; programs stay attached and maps pinned");
    result.context("gRPC server")
}

/// Writes the Kubernetes watch's batches into the services (the same incremental path as an
/// apply), then nodes and health-check ports when they changed.
struct WatchSink(Arc<state::State>);

impl sources::kube::Sink for WatchSink {
    async fn write(&mut self, batch: &sources::kube::Batch, held: usize) -> Result<(), String> {
        let ops = batch.ops.clone();
        let first = batch.first;
        let nodes = first
            || ops
                .iter()
                .any(|(k, _)| k.kind == services::objects::Kind::Node);
        let changes = ops.len();
        let st = self.0.clone();
        let t = std::time::Instant::now();
        let r = tokio::task::spawn_blocking(move || {
            let dp = st.datapath.clone();
            let mut svc = st.services();
            let big = ops.len() > 1000;
            let r = svc.apply_watched(ops, first, held, &dp.maps);
            let tm = svc.last_timings;
            drop(svc);
            // A first list of 10k Services leaves tens of MB of decode buffers in the arenas.
            if big {
                services::release_memory();
            }
            (r, tm)
        })
        .await
        .map_err(|e| format!("watch batch task: {e}"))?;
        match r {
            (Ok(stats), tm) => {
                if let Some(s) = batch.since {
                    observe::metrics::get().synced("kubernetes", s.elapsed());
                }
                tracing::info!(
                    first,
                    changes,
                    writes = stats.map_writes(),
                    services = stats.services,
                    ms = t.elapsed().as_secs_f64() * 1e3,
                    since_event_ms = batch
                        .since
                        .map(|s| s.elapsed().as_secs_f64() * 1e3)
                        .unwrap_or_default(),
                    model_ms = tm.model_us as f64 / 1e3,
                    maps_ms = tm.maps_us as f64 / 1e3,
                    "watch batch applied"
                );
                if first || changes > 0 {
                    self.0.objects_changed(nodes).await;
                }
                Ok(())
            }
            (Err(e), _) => Err(e.to_string()),
        }
    }
}

/// Runs `f` every `period` (first run after one period) until aborted.
fn every<F, Fut>(period: Duration, f: F) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            f().await;
        }
    })
}

/// Pods route through this node: IPv4 forwarding must be on in its network namespace.
fn enable_forwarding() {
    if let Err(e) = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
        tracing::warn!(error = %e, "could not enable net.ipv4.ip_forward");
    }
}

/// Binds the daemon's socket: refuses if another daemon answers there, removes a stale file,
/// and restricts it to root (mode 0600).
pub fn bind_socket(path: &std::path::Path) -> Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another sluiced is serving {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
