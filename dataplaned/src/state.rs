//! The daemon's state: the IPAM store and the datapath, and the rules that keep them in step with
//! the links that exist (start-up re-adoption, periodic reconciliation, GC).

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::datapath::{AttachMode, Datapath, DatapathConfig};
use crate::ipam::{Allocation, Cidr, Ipam};
use crate::nodes::{self, NodeMap, Peer, Uplinks};
use crate::services::conntrack::Timeouts;
use crate::services::Services;
use crate::Config;

/// An allocation not attached yet is left alone this long (its ADD may be in flight), by the
/// reconciliation and by CNI GC.
pub const PENDING_GRACE: Duration = Duration::from_secs(60);

/// What a CNI GC of `network` does.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcPlan {
    /// Released (their links deleted).
    pub release: Vec<Allocation>,
    /// Recorded without a network and listed valid by this GC: they get its name.
    pub claim: Vec<Allocation>,
}

/// A CNI GC of `network` with the runtime's `valid` attachments releases that network's
/// allocations that are not listed, except those not attached yet and younger than `grace`
/// (their ADD may be in flight; the spec forbids GC during an ADD of the same network, but
/// another network's ADD may run, and a runtime may break the rule). Other networks'
/// allocations are never touched.
///
/// Allocations recorded before networks were (network ""): a named GC cannot tell whose they
/// are, so it releases none of them, and records its name on those it lists as valid (they are
/// its own); the rest are released when their link goes (periodic reconciliation) or by a GC
/// without a network name (an older plugin), which collects only those.
pub fn gc_plan<'a>(
    allocations: impl IntoIterator<Item = &'a Allocation>,
    network: &str,
    valid: &HashSet<(String, String)>,
    now: u64,
    grace: Duration,
) -> GcPlan {
    let mut plan = GcPlan::default();
    for a in allocations {
        let listed = valid.contains(&(a.container_id.clone(), a.ifname.clone()));
        if a.network != network {
            if listed && a.network.is_empty() {
                plan.claim.push(a.clone());
            }
            continue;
        }
        let in_flight = !a.attached && now.saturating_sub(a.created) < grace.as_secs();
        if !listed && !in_flight {
            plan.release.push(a.clone());
        }
    }
    plan.release
        .sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
    plan
}

pub struct State {
    pub node_name: String,
    pub lb_mode: crate::datapath::LbMode,
    /// The interfaces external frontends are served on, this node's addresses.
    pub uplinks: Uplinks,
    /// The node-address map and routes to other nodes' pod CIDRs (async: netlink).
    nodes: tokio::sync::Mutex<NodeState>,
    /// Programs and maps: usable without the lock (map syscalls are atomic; conntrack GC runs
    /// beside RPCs). Changes that must agree with IPAM or services happen under the lock.
    pub datapath: Arc<Datapath>,
    pub ct_timeouts: Timeouts,
    inner: Mutex<Inner>,
    /// Services have their own lock: a large apply never holds up a pod's ADD or DEL.
    services: Mutex<Services>,
    /// Health-check node ports of externalTrafficPolicy: Local Services.
    pub health: crate::services::health::HealthServers,
    /// When the last ADD or DEL came (pods move to tcx links only when both are quiet).
    last_add: Mutex<Instant>,
    /// Pods whose move to tcx links failed: left on clsact until the next start.
    upgrade_failed: Mutex<HashSet<String>>,
    /// The Kubernetes watch's state, when one is configured.
    pub watch: Option<crate::sources::kube::Shared>,
}

/// Pods attached with clsact at ADD move to tcx links once no ADD or DEL came for this long: a move
/// holds the RTNL lock for two RCU grace periods, which a concurrent ADD's or DEL's netlink calls
/// would wait for.
pub const UPGRADE_QUIET: Duration = Duration::from_secs(2);

/// What the nodes room keeps between syncs.
pub struct NodeState {
    map: NodeMap,
    routes: Option<nodes::routes::Routes>,
    pub peers: Vec<Peer>,
    pub routed: Vec<(Cidr, std::net::Ipv4Addr)>,
    /// This node's own Node object's pod CIDR, when it differs from the one in use.
    pub cidr_mismatch: Option<String>,
}

/// What the IPAM lock guards: the allocation records (the datapath attachments follow them).
pub struct Inner {
    pub ipam: Ipam,
}

/// Links a pod's attached sluice interfaces into a ring (their sources are all the pod's): the
/// kernel may answer on one interface for an address on another (a second CNI_IFNAME).
/// `leaving`: an interface about to be detached, left out before it goes so that the ring never
/// points at a missing (or reused) entry.
pub fn link_pod_interfaces(
    ipam: &Ipam,
    datapath: &Datapath,
    container_id: &str,
    leaving: Option<&str>,
) {
    let mut ifs: Vec<u32> = ipam
        .all()
        .filter(|a| a.container_id == container_id && a.attached && a.host_ifindex != 0)
        .filter(|a| Some(a.ifname.as_str()) != leaving)
        .map(|a| a.host_ifindex)
        .collect();
    ifs.sort_unstable();
    ifs.dedup();
    for (i, idx) in ifs.iter().enumerate() {
        let next = if ifs.len() > 1 {
            ifs[(i + 1) % ifs.len()]
        } else {
            0
        };
        if let Err(e) = datapath.set_pod_sibling(*idx, next) {
            tracing::error!(error = %format!("{e:#}"), container = container_id, "linking a pod's interfaces");
        }
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

impl State {
    pub fn open(config: &Config) -> Result<State> {
        let uplinks = nodes::discover(&config.nodeport_ifaces, config.node_ip)
            .context("finding the nodeport interfaces")?;
        if uplinks.ifaces.is_empty() {
            tracing::warn!("no --nodeport-iface and no default route: external frontends (NodePort, LoadBalancer, external IPs) are not served");
        }
        let datapath = Datapath::load(&DatapathConfig {
            bpffs: config.bpffs.clone(),
            mode: config.attach_mode,
            fast_add: config.fast_add,
            sizes: config.map_sizes,
            hairpin_addr: config.hairpin_addr,
            ct_refresh: Duration::from_secs(1),
            ct_timeouts: config.ct_timeouts,
            xlate_ports: config.xlate_ports,
            node_addr: uplinks.node_ip,
            lb_mode: config.lb_mode,
        })?;
        let services = Services::open(
            &config.state_dir,
            config.manifests.as_deref(),
            &datapath.maps,
            crate::services::Limits {
                set_ids: config.map_sizes.set_ids(),
                frontends: config.map_sizes.frontends,
                backends: config.map_sizes.backends,
            },
            crate::services::LocalNode {
                name: config.node_name.clone(),
                pod_cidr: Some((config.pod_cidr.network, config.pod_cidr.prefix)),
            },
            config
                .kube
                .enabled()
                .then(|| config.kube.describe())
                .as_deref(),
        )
        .context("loading services")?;
        // This node's Node object names its pod CIDR: it wins over --pod-cidr (as the cluster's
        // node IPAM decided it); without one, --pod-cidr is used.
        let (own_cidr, _) = nodes::peers_of(&services.nodes(), &config.node_name);
        let pod_cidr = match own_cidr.as_deref().map(str::parse::<Cidr>) {
            Some(Ok(c)) => {
                if c != config.pod_cidr {
                    tracing::warn!(node_object = %c, flag = %config.pod_cidr,
                        "this node's Node object gives another pod CIDR than --pod-cidr: using the Node's");
                }
                c
            }
            _ => config.pod_cidr,
        };
        let ipam = Ipam::open(&config.state_dir.join("ipam"), pod_cidr)
            .context("opening the IPAM store")?;
        let node_map = NodeMap::load(&datapath.maps).context("reading the node map")?;
        Ok(State {
            node_name: config.node_name.clone(),
            lb_mode: config.lb_mode,
            uplinks,
            nodes: tokio::sync::Mutex::new(NodeState {
                map: node_map,
                routes: None,
                peers: Vec::new(),
                routed: Vec::new(),
                cidr_mismatch: None,
            }),
            datapath: Arc::new(datapath),
            ct_timeouts: config.ct_timeouts,
            inner: Mutex::new(Inner { ipam }),
            services: Mutex::new(services),
            health: Default::default(),
            last_add: Mutex::new(Instant::now()),
            upgrade_failed: Mutex::new(HashSet::new()),
            watch: config.kube.enabled().then(|| {
                Arc::new(Mutex::new(crate::sources::kube::WatchStatus::new(
                    &config.kube,
                )))
            }),
        })
    }

    /// A CNI ADD or DEL is being served.
    pub fn note_add(&self) {
        *self.last_add.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn adds_quiet(&self) -> bool {
        self.last_add
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            >= UPGRADE_QUIET
    }

    /// Moves pods attached with clsact (at ADD, see `Datapath::add_mode`) to tcx links, one per
    /// IPAM lock hold, while ADDs stay quiet; returns how many moved. The tcx programs take over
    /// on their first packet (tcx runs before clsact and ends classification), then the filters
    /// go: traffic never stops. Blocking (grace periods): called off the async threads.
    pub fn upgrade_attachments(&self) -> usize {
        if !self.datapath.upgrades() {
            return 0;
        }
        let tc = AttachMode::Tc.name();
        let mut moved = 0;
        while self.adds_quiet() {
            let mut inner = self.lock();
            let mut failed = self
                .upgrade_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let Some(mut a) = inner
                .ipam
                .all()
                .find(|a| a.attached && a.attach_mode == tc && !failed.contains(&a.host_ifname))
                .cloned()
            else {
                break;
            };
            // A link that is gone or was replaced is the DEL's or the periodic check's.
            let idx = ifindex(&a.host_ifname).filter(|i| *i == a.host_ifindex);
            let moved_now = idx.map(|idx| {
                self.datapath.attach(
                    AttachMode::Tcx,
                    &a.host_ifname,
                    idx,
                    Some(AttachMode::Tc),
                    a.ip,
                )
            });
            match moved_now {
                Some(Ok(())) => {
                    a.attach_mode = AttachMode::Tcx.name().to_string();
                    let name = a.host_ifname.clone();
                    if let Err(e) = inner.ipam.update(a) {
                        // The record says tc: the next start re-adopts it as tcx (links pinned).
                        tracing::warn!(error = %e, pod = %name, "recording a pod's move to tcx links");
                    }
                    moved += 1;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), pod = %a.host_ifname,
                        "moving a pod to tcx links failed: it keeps its clsact filters");
                    failed.insert(a.host_ifname.clone());
                }
                None => {
                    failed.insert(a.host_ifname.clone());
                }
            }
        }
        if moved > 0 {
            tracing::info!(moved, "pods moved from clsact filters to tcx links");
        }
        moved
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn services(&self) -> MutexGuard<'_, Services> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether pods may be set up (CNI STATUS); Err: why not. Serving at all means the datapath
    /// is loaded and IPAM open; with a Kubernetes watch, its first sync must be written and the
    /// API server not away longer than the limit.
    pub fn ready(&self) -> Result<(), String> {
        match &self.watch {
            Some(w) => w.lock().unwrap_or_else(|p| p.into_inner()).ready(),
            None => Ok(()),
        }
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.datapath.mode()
    }

    pub fn pod_cidr(&self) -> Cidr {
        self.lock().ipam.cidr()
    }

    /// After objects changed (any source): nodes when Node objects did, health-check ports.
    pub async fn objects_changed(&self, nodes: bool) {
        if nodes {
            self.sync_nodes().await;
        }
        let want = self.services().health_checks();
        self.health.sync(want);
    }

    /// Brings the node map and the routes to other nodes' pod CIDRs in line with the Node
    /// objects in effect. Errors are logged (a node that cannot be routed must not stop the rest).
    pub async fn sync_nodes(&self) {
        let objects = self.services().nodes();
        let (own_cidr, peers) = nodes::peers_of(&objects, &self.node_name);
        let cidr = self.pod_cidr();
        let mut ns = self.nodes.lock().await;
        ns.cidr_mismatch = own_cidr.filter(|c| c.parse::<Cidr>().ok() != Some(cidr));
        if let Some(c) = &ns.cidr_mismatch {
            tracing::warn!(node_object = %c, in_use = %cidr, "this node's pod CIDR changed in its Node object: takes effect when sluiced restarts");
        }
        match ns
            .map
            .sync(&self.datapath.maps, &self.uplinks.addrs, &peers)
        {
            Ok(n) if n > 0 => tracing::info!(writes = n, peers = peers.len(), "node map updated"),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %format!("{e:#}"), "writing the node map"),
        }
        let want = nodes::desired_routes(&peers, cidr);
        if ns.routes.is_none() {
            match nodes::routes::Routes::new() {
                Ok(r) => ns.routes = Some(r),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "rtnetlink"),
            }
        }
        if let Some(r) = &ns.routes {
            match r.sync(&want).await {
                Ok((0, 0)) => {}
                Ok((added, removed)) => {
                    tracing::info!(added, removed, "routes to other nodes' pod CIDRs updated")
                }
                Err(e) => tracing::error!(error = %format!("{e:#}"), "syncing routes"),
            }
        }
        ns.peers = peers;
        ns.routed = want;
    }

    /// The peers and routes as last synced, and a pending pod CIDR change.
    pub async fn node_view(&self) -> (Vec<Peer>, Vec<(Cidr, std::net::Ipv4Addr)>, Option<String>) {
        let ns = self.nodes.lock().await;
        (
            ns.peers.clone(),
            ns.routed.clone(),
            ns.cidr_mismatch.clone(),
        )
    }

    /// Start-up: give every live pod the current programs (its traffic never stops: tcx links are
    /// updated in place), and release what a DEL left behind while the daemon was away.
    pub async fn reconcile_at_start(&self) {
        for (name, idx) in &self.uplinks.ifaces {
            match self.datapath.attach_uplink(name, *idx) {
                Ok(()) => {
                    tracing::info!(iface = %name, "external frontends served on this interface")
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), iface = %name, "attaching the uplink programs failed")
                }
            }
        }
        let mut inner = self.lock();
        let ipam = &mut inner.ipam;
        let datapath = &*self.datapath;
        let allocations: Vec<Allocation> = ipam.all().cloned().collect();
        let mut adopted = 0;
        for mut a in allocations {
            match ifindex(&a.host_ifname) {
                Some(idx) if a.attached => {
                    let previous = AttachMode::from_name(&a.attach_mode);
                    let mode = datapath.readopt_mode(previous);
                    if let Err(e) = datapath.attach(mode, &a.host_ifname, idx, previous, a.ip) {
                        tracing::error!(error = %format!("{e:#}"), pod = %a.host_ifname, "re-adopting a pod failed");
                        continue;
                    }
                    let mode = mode.name();
                    if a.host_ifindex != idx || a.attach_mode != mode {
                        a.host_ifindex = idx;
                        a.attach_mode = mode.to_string();
                        let _ = ipam.update(a);
                    }
                    adopted += 1;
                }
                Some(_) => {} // ADD still in flight, or failed without rollback: its DEL will come.
                // Gone: a DEL that could not reach us. Unless its ADD may still be in flight (not
                // attached yet and recent): then the periodic check decides later.
                None if a.attached
                    || now_unix().saturating_sub(a.created) > PENDING_GRACE.as_secs() =>
                {
                    release_leaked(ipam, datapath, &a)
                }
                None => {}
            }
        }
        let containers: BTreeSet<String> = ipam.all().map(|a| a.container_id.clone()).collect();
        for c in &containers {
            link_pod_interfaces(ipam, datapath, c, None);
        }
        // Pods' veths and this start's uplinks keep their links; an interface no longer named by
        // --nodeport-iface loses them.
        let known: HashSet<String> = ipam
            .all()
            .map(|a| a.host_ifname.clone())
            .chain(self.uplinks.ifaces.iter().map(|(n, _)| n.clone()))
            .collect();
        for name in datapath.pinned_link_ifnames() {
            if !known.contains(&name) {
                tracing::info!(link = %name, "removing pinned links of an unknown interface");
                datapath.detach(&name, 0, None);
            }
        }
        tracing::info!(adopted, "start-up reconciliation done");
    }

    /// Releases allocations whose host-side link is gone (a DEL that could not reach us).
    pub async fn reconcile_periodic(&self) {
        // Health-check ports that could not be bound (taken) are tried again.
        let want = self.services().health_checks();
        self.health.sync(want);
        let mut inner = self.lock();
        let ipam = &mut inner.ipam;
        let datapath = &*self.datapath;
        let now = now_unix();
        let stale: Vec<Allocation> = ipam
            .all()
            .filter(|a| ifindex(&a.host_ifname).is_none())
            .filter(|a| a.attached || now.saturating_sub(a.created) > PENDING_GRACE.as_secs())
            .cloned()
            .collect();
        for a in stale {
            release_leaked(ipam, datapath, &a);
        }
    }
}

fn release_leaked(ipam: &mut Ipam, datapath: &Datapath, a: &Allocation) {
    link_pod_interfaces(ipam, datapath, &a.container_id, Some(&a.ifname));
    datapath.detach(
        &a.host_ifname,
        a.host_ifindex,
        AttachMode::from_name(&a.attach_mode),
    );
    match ipam.release(&a.container_id, &a.ifname) {
        Ok(_) => tracing::info!(container = %a.container_id, ifname = %a.ifname, ip = %a.ip,
            "released an allocation whose interface is gone"),
        Err(e) => tracing::error!(error = %e, "releasing a leaked allocation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(cid: &str, network: &str, attached: bool, created: u64) -> Allocation {
        Allocation {
            container_id: cid.into(),
            ifname: "eth0".into(),
            ip: std::net::Ipv4Addr::UNSPECIFIED,
            host_ifname: format!("h-{cid}"),
            netns: String::new(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            attached,
            host_ifindex: 0,
            attach_mode: String::new(),
            created,
            network: network.into(),
        }
    }

    fn ids(v: &[Allocation]) -> Vec<&str> {
        v.iter().map(|a| a.container_id.as_str()).collect()
    }

    #[test]
    fn gc_releases_only_its_own_networks_unlisted_allocations_and_not_adds_in_flight() {
        let now = 10_000;
        let all = [
            alloc("a-listed", "a", true, 1),
            alloc("a-leaked", "a", true, 1),
            alloc("a-leaked-young", "a", true, now - 1), // its ADD completed: the runtime says it is not valid
            alloc("a-in-flight", "a", false, now - 5),
            alloc("a-failed-add", "a", false, now - 600),
            alloc("b-unlisted", "b", true, 1),
            alloc("b-in-flight", "b", false, now),
            alloc("old-listed", "", true, 1),
            alloc("old-unlisted", "", true, 1),
        ];
        let valid: HashSet<(String, String)> = [("a-listed", "eth0"), ("old-listed", "eth0")]
            .iter()
            .map(|(c, i)| (c.to_string(), i.to_string()))
            .collect();
        let plan = gc_plan(&all, "a", &valid, now, PENDING_GRACE);
        assert_eq!(
            ids(&plan.release),
            ["a-failed-add", "a-leaked", "a-leaked-young"]
        );
        assert_eq!(
            ids(&plan.claim),
            ["old-listed"],
            "an unnamed allocation listed by a: a's"
        );
        // A GC without a network (an older plugin) collects only unnamed allocations.
        let plan = gc_plan(&all, "", &valid, now, PENDING_GRACE);
        assert_eq!(ids(&plan.release), ["old-unlisted"]);
        assert!(plan.claim.is_empty());
        // Network b with nothing listed: its in-flight ADD stays.
        let plan = gc_plan(&all, "b", &HashSet::new(), now, PENDING_GRACE);
        assert_eq!(ids(&plan.release), ["b-unlisted"]);
    }
}
