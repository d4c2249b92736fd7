//! The daemon's state: the IPAM store and the datapath, and the rules that keep them in step with
//! the links that exist (start-up re-adoption, periodic reconciliation, GC).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::datapath::{AttachMode, Datapath, DatapathConfig};
use crate::ipam::{Allocation, Cidr, Ipam};
use crate::services::conntrack::Timeouts;
use crate::services::Services;
use crate::Config;

/// An allocation not attached yet is left alone this long (its ADD may be in flight).
const PENDING_GRACE: Duration = Duration::from_secs(60);

pub struct State {
    pub node_name: String,
    /// Programs and maps: usable without the lock (map syscalls are atomic; conntrack GC runs
    /// beside RPCs). Changes that must agree with IPAM or services happen under the lock.
    pub datapath: Arc<Datapath>,
    pub ct_timeouts: Timeouts,
    inner: Mutex<Inner>,
    /// Services have their own lock: a large apply never holds up a pod's ADD or DEL.
    services: Mutex<Services>,
}

/// What the IPAM lock guards: the allocation records (the datapath attachments follow them).
pub struct Inner {
    pub ipam: Ipam,
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
        let ipam = Ipam::open(&config.state_dir.join("ipam"), config.pod_cidr)
            .context("opening the IPAM store")?;
        let datapath = Datapath::load(&DatapathConfig {
            bpffs: config.bpffs.clone(),
            mode: config.attach_mode,
            sizes: config.map_sizes,
            hairpin_addr: config.hairpin_addr,
            ct_refresh: Duration::from_secs(1),
            ct_timeouts: config.ct_timeouts,
            xlate_ports: config.xlate_ports,
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
        )
        .context("loading services")?;
        Ok(State {
            node_name: config.node_name.clone(),
            datapath: Arc::new(datapath),
            ct_timeouts: config.ct_timeouts,
            inner: Mutex::new(Inner { ipam }),
            services: Mutex::new(services),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn services(&self) -> MutexGuard<'_, Services> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.datapath.mode()
    }

    pub fn pod_cidr(&self) -> Cidr {
        self.lock().ipam.cidr()
    }

    /// Start-up: give every live pod the current programs (its traffic never stops: tcx links are
    /// updated in place), and release what a DEL left behind while the daemon was away.
    pub async fn reconcile_at_start(&self) {
        let mut inner = self.lock();
        let ipam = &mut inner.ipam;
        let datapath = &*self.datapath;
        let allocations: Vec<Allocation> = ipam.all().cloned().collect();
        let mut adopted = 0;
        for mut a in allocations {
            match ifindex(&a.host_ifname) {
                Some(idx) if a.attached => {
                    if let Err(e) = datapath.attach(
                        &a.host_ifname,
                        idx,
                        AttachMode::from_name(&a.attach_mode),
                        a.ip,
                    ) {
                        tracing::error!(error = %format!("{e:#}"), pod = %a.host_ifname, "re-adopting a pod failed");
                        continue;
                    }
                    let mode = datapath.mode().name();
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
        let known: HashSet<String> = ipam.all().map(|a| a.host_ifname.clone()).collect();
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
