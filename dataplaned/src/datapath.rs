//! The BPF datapath: loading the skeleton with its maps pinned (reused across restarts), attaching
//! the pod programs to host-side veths (tcx, or clsact on kernels without it), reading counters.
//!
//! After load the daemon keeps only file descriptors (programs) and map handles: the skeleton's
//! objects are dropped, so this type is Send + Sync and nothing is tied to a borrow.

use std::collections::HashSet;
use std::ffi::CString;
use std::mem::MaybeUninit;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use libbpf_rs::query::{LinkInfo, LinkTypeInfo};
use libbpf_rs::skel::{OpenSkel, SkelBuilder};
use libbpf_rs::{
    MapCore, MapFlags, MapHandle, MapInfo, ProgramAttachType, TcHookBuilder, TC_EGRESS, TC_INGRESS,
};
use sluice_core::bpf::pod_veth::types;
use sluice_core::bpf::pod_veth::PodVethSkelBuilder;
use sluice_core::bpf::uplink::UplinkSkelBuilder;

use crate::pod::{as_bytes, from_bytes};
use crate::services::conntrack::Timeouts;

/// How programs are attached to a veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// tcx links (Linux >= 6.6), pinned under <bpffs>/links: they outlive the daemon.
    Tcx,
    /// clsact qdisc + cls_bpf filters (older kernels); filters outlive the daemon by themselves.
    Tc,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Tcx => "tcx",
            AttachMode::Tc => "tc",
        }
    }

    pub fn from_name(s: &str) -> Option<AttachMode> {
        match s {
            "tcx" => Some(AttachMode::Tcx),
            "tc" => Some(AttachMode::Tc),
            _ => None,
        }
    }

    /// tcx where the kernel has it (6.6+), clsact otherwise.
    pub fn detect() -> AttachMode {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut it = release
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|p| p.parse::<u32>().ok());
        let (major, minor) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        if (major, minor) >= (6, 6) {
            AttachMode::Tcx
        } else {
            AttachMode::Tc
        }
    }
}

/// Map sizes (max_entries). Changing one on restart replaces that pinned map (its content is lost).
#[derive(Debug, Clone, Copy)]
pub struct MapSizes {
    pub frontends: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    pub pods: u32,
    pub fragments: u32,
    pub nodes: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        MapSizes {
            frontends: 65536,
            backends: 262144,
            conntrack: 524288,
            affinity: 65536,
            pods: 16384,
            fragments: 8192,
            nodes: 4096,
        }
    }
}

impl MapSizes {
    /// Backend set ids: every service port has two sets (cluster-wide and node-local).
    pub fn set_ids(&self) -> u32 {
        self.frontends.saturating_mul(2)
    }
}

/// What the datapath is told at load (bpf/config.h .rodata).
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    pub bpffs: PathBuf,
    pub mode: AttachMode,
    /// tcx mode: pods are attached with classic tc at ADD and moved to tcx links afterwards
    /// (see [`Datapath::add_mode`]).
    pub fast_add: bool,
    pub sizes: MapSizes,
    pub hairpin_addr: Ipv4Addr,
    pub ct_refresh: Duration,
    pub ct_timeouts: Timeouts,
    /// Translated source ports come from this range (inclusive).
    pub xlate_ports: (u16, u16),
    /// This node's address: the outer source of its encapsulation.
    pub node_addr: Ipv4Addr,
    pub lb_mode: LbMode,
}

/// Handles on every shared map (names carry the layout version; see bpf/maps.h).
pub struct Maps {
    pub frontends: MapHandle,
    pub vips: MapHandle,
    pub backends: MapHandle,
    pub members: MapHandle,
    pub conntrack: MapHandle,
    pub affinity: MapHandle,
    pub fragments: MapHandle,
    pub pods: MapHandle,
    pub nodes: MapHandle,
    pub reasons: MapHandle,
    pub ct_events: MapHandle,
    pub services: MapHandle,
    /// max_entries of the conntrack map (for occupancy).
    pub conntrack_size: u32,
}

pub struct Datapath {
    bpffs: PathBuf,
    mode: AttachMode,
    fast_add: bool,
    from_pod: OwnedFd,
    to_pod: OwnedFd,
    from_net: OwnedFd,
    to_net: OwnedFd,
    pub maps: Maps,
}

/// How an external flow to a remote backend is answered (sluiced --lb-mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbMode {
    /// Direct Server Return: the backend's node answers the client itself.
    Dsr,
    /// Replies are tunnelled back to the ingress node, which answers.
    Tunnel,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Makes sure `dir` lives on a bpffs, mounting one at /sys/fs/bpf if none is there.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    let is_bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).ok();
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting bpffs at /sys/fs/bpf")?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "{} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)",
            dir.display()
        );
    }
    for sub in ["maps", "progs", "links"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    Ok(())
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

fn errno_result(ret: i32) -> std::io::Result<i32> {
    if ret < 0 {
        Err(std::io::Error::from_raw_os_error(-ret))
    } else {
        Ok(ret)
    }
}

/// If the pinned map at `pin` has another shape than the program wants, unpin it: libbpf would
/// refuse to reuse it. Its content is lost; a layout change gets a new map name instead.
fn drop_incompatible_pin(pin: &Path, map_type: libbpf_rs::MapType, key: u32, value: u32, max: u32) {
    let Ok(old) = MapHandle::from_pinned_path(pin) else {
        return;
    };
    let Ok(info) = MapInfo::new(old.as_fd()) else {
        return;
    };
    let i = info.info;
    if i.type_ != map_type as u32
        || i.key_size != key
        || i.value_size != value
        || i.max_entries != max
    {
        tracing::warn!(pin = %pin.display(), old_max = i.max_entries, new_max = max,
            "pinned map has another size or layout: replacing it (its entries are lost)");
        let _ = std::fs::remove_file(pin);
    }
}

/// libbpf's own messages go to our log: warnings (e.g. a verifier log on a failed load) as
/// warnings, the rest at debug level.
fn libbpf_log(level: libbpf_rs::PrintLevel, msg: String) {
    let msg = msg.trim_end();
    match level {
        libbpf_rs::PrintLevel::Warn => tracing::warn!(target: "libbpf", "{msg}"),
        _ => tracing::debug!(target: "libbpf", "{msg}"),
    }
}

/// Sizes and pins maps of an opened skeleton (an existing compatible pin is reused by libbpf).
macro_rules! prepare_maps {
    ($open:expr, $maps_dir:expr, $($map:ident => $max:expr),* $(,)?) => {$({
        let m = &mut $open.maps.$map;
        if let Some(max) = $max {
            m.set_max_entries(max)?;
        }
        let pin = $maps_dir.join(stringify!($map));
        drop_incompatible_pin(&pin, m.map_type(), m.key_size(), m.value_size(), m.max_entries());
        m.set_pin_path(&pin)?;
    })*};
}

/// Sizes, pins and configures the maps and .rodata of a freshly opened skeleton (pod_veth and
/// uplink declare the same maps and configuration: the second reuses the first's pins).
macro_rules! prepare_object {
    ($open:expr, $maps_dir:expr, $cfg:expr) => {{
        let open = &mut $open;
        let maps_dir: &Path = $maps_dir;
        let cfg: &DatapathConfig = $cfg;
        let s = cfg.sizes;
        prepare_maps!(open, maps_dir,
            sl_fe_v2 => Some(s.frontends),
            sl_vip_v1 => Some(s.frontends),
            sl_be_v2 => Some(s.backends),
            sl_bm_v1 => Some(s.backends),
            sl_ct_v2 => Some(s.conntrack),
            sl_aff_v1 => Some(s.affinity),
            sl_frag_v1 => Some(s.fragments),
            sl_pod_v2 => Some(s.pods),
            sl_node_v1 => Some(s.nodes),
            sl_rsn_v2 => None::<u32>,
            sl_ctev_v1 => None::<u32>,
            sl_svc_v2 => Some(s.set_ids()),
        );
        let rodata = open
            .maps
            .rodata_data
            .as_deref_mut()
            .context("BPF object without .rodata")?;
        let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        let t = &cfg.ct_timeouts;
        rodata.hairpin_addr = u32::from(cfg.hairpin_addr).to_be();
        rodata.ct_refresh_ns = ns(cfg.ct_refresh);
        rodata.ct_syn_ns = ns(t.syn);
        rodata.ct_established_ns = ns(t.established);
        rodata.ct_fin_ns = ns(t.fin);
        rodata.ct_closed_ns = ns(t.closed);
        rodata.ct_rst_ns = ns(t.rst);
        rodata.ct_udp_ns = ns(t.udp);
        rodata.ct_udp_stream_ns = ns(t.udp_stream);
        rodata.xlate_port_min = cfg.xlate_ports.0;
        rodata.xlate_port_max = cfg.xlate_ports.1;
        rodata.node_addr = u32::from(cfg.node_addr).to_be();
        // The two skeletons have distinct (identical) generated types: set the value itself.
        rodata.lb_mode.0 = match cfg.lb_mode {
            LbMode::Dsr => types::lb_mode::LB_MODE_DSR.0,
            LbMode::Tunnel => types::lb_mode::LB_MODE_TUNNEL.0,
        };
    }};
}

/// Pins a loaded program at `<bpffs>/progs/<name>` (replacing an older one) and keeps its fd.
fn pin_prog(bpffs: &Path, prog: &mut libbpf_rs::ProgramMut<'_>, name: &str) -> Result<OwnedFd> {
    let pin = bpffs.join("progs").join(name);
    let _ = std::fs::remove_file(&pin);
    prog.pin(&pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(prog.as_fd().try_clone_to_owned()?)
}

/// Loads both objects (the verifier's work: most of a start), reusing and creating map pins, and
/// pins the programs: [from_pod, to_pod, from_net, to_net].
fn load_programs(cfg: &DatapathConfig, maps_dir: &Path) -> Result<[OwnedFd; 4]> {
    let maps_dir = maps_dir.to_path_buf();
    let mut storage = MaybeUninit::uninit();
    let mut open = PodVethSkelBuilder::default()
        .open(&mut storage)
        .context("opening the pod BPF object")?;
    prepare_object!(open, &maps_dir, cfg);
    if cfg.mode == AttachMode::Tcx {
        open.progs
            .from_pod
            .set_attach_type(ProgramAttachType::TcxIngress);
        open.progs
            .to_pod
            .set_attach_type(ProgramAttachType::TcxEgress);
    }
    let mut skel = open
        .load()
        .context("loading the pod programs (verifier log above)")?;
    // Pin the new programs in place of the old ones (live attachments are updated separately).
    let from_pod = pin_prog(&cfg.bpffs, &mut skel.progs.from_pod, "from_pod")?;
    let to_pod = pin_prog(&cfg.bpffs, &mut skel.progs.to_pod, "to_pod")?;

    // The uplink object: the same maps (reused through their pins), its own programs.
    let mut storage = MaybeUninit::uninit();
    let mut open = UplinkSkelBuilder::default()
        .open(&mut storage)
        .context("opening the uplink BPF object")?;
    prepare_object!(open, &maps_dir, cfg);
    if cfg.mode == AttachMode::Tcx {
        open.progs
            .from_net
            .set_attach_type(ProgramAttachType::TcxIngress);
        open.progs
            .to_net
            .set_attach_type(ProgramAttachType::TcxEgress);
    }
    let mut uplink = open
        .load()
        .context("loading the uplink programs (verifier log above)")?;
    let from_net = pin_prog(&cfg.bpffs, &mut uplink.progs.from_net, "from_net")?;
    let to_net = pin_prog(&cfg.bpffs, &mut uplink.progs.to_net, "to_net")?;

    Ok([from_pod, to_pod, from_net, to_net])
}

/// The map pins every start needs (the uplink object declares the same).
const MAP_PINS: [&str; 12] = [
    "sl_fe_v2",
    "sl_vip_v1",
    "sl_be_v2",
    "sl_bm_v1",
    "sl_ct_v2",
    "sl_aff_v1",
    "sl_frag_v1",
    "sl_pod_v2",
    "sl_node_v1",
    "sl_rsn_v2",
    "sl_ctev_v1",
    "sl_svc_v2",
];
const PROG_PINS: [&str; 4] = ["from_pod", "to_pod", "from_net", "to_net"];
/// `<bpffs>/progs/build`: a one-entry array holding the fingerprint of the pinned programs.
const BUILD_PIN: &str = "build";

/// What the loaded programs depend on: the objects and everything written into them at load
/// (.rodata, map sizes, attach types).
fn fingerprint(cfg: &DatapathConfig) -> u64 {
    let text = format!("{} {cfg:?}", sluice_core::bpf::BUILD);
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The pinned programs, when they were loaded from this build with this configuration and every
/// pin they use is there: a restart then skips the verifier (~1 s here, most of it the uplink programs).
fn reuse_pinned(cfg: &DatapathConfig, maps_dir: &Path, fingerprint: u64) -> Option<[OwnedFd; 4]> {
    let progs = cfg.bpffs.join("progs");
    let map = MapHandle::from_pinned_path(progs.join(BUILD_PIN)).ok()?;
    let stored = map.lookup(&0u32.to_ne_bytes(), MapFlags::ANY).ok()??;
    if stored.as_slice() != fingerprint.to_ne_bytes() {
        return None;
    }
    if !MAP_PINS.iter().all(|m| maps_dir.join(m).exists()) {
        return None;
    }
    let fds: Vec<OwnedFd> = PROG_PINS
        .iter()
        .map(|p| libbpf_rs::Program::fd_from_pinned_path(progs.join(p)).ok())
        .collect::<Option<_>>()?;
    // The pinned maps must be the ones these programs use (a pin replaced since they were loaded
    // would leave the daemon writing maps the programs never read).
    let used: HashSet<u32> = fds.iter().flat_map(|fd| prog_map_ids(fd.as_fd())).collect();
    for m in MAP_PINS {
        let id = MapHandle::from_pinned_path(maps_dir.join(m))
            .ok()
            .and_then(|h| map_id(h.as_fd()))?;
        if !used.contains(&id) {
            return None;
        }
    }
    fds.try_into().ok()
}

/// The ids of the maps a loaded program uses.
fn prog_map_ids(fd: BorrowedFd<'_>) -> Vec<u32> {
    let info_of = |ids: &mut Vec<u32>| {
        let mut info = libbpf_sys::bpf_prog_info {
            nr_map_ids: ids.len() as u32,
            map_ids: ids.as_mut_ptr() as u64,
            ..Default::default()
        };
        let mut len = std::mem::size_of::<libbpf_sys::bpf_prog_info>() as u32;
        // SAFETY: `info` is a live bpf_prog_info of `len` bytes; map_ids points at room for
        // nr_map_ids ids.
        let r = unsafe { libbpf_sys::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
        (r == 0).then_some(info.nr_map_ids)
    };
    let Some(n) = info_of(&mut Vec::new()) else {
        return Vec::new();
    };
    let mut ids = vec![0u32; n as usize];
    match info_of(&mut ids) {
        Some(m) if m == n => ids,
        _ => Vec::new(),
    }
}

/// A map's kernel id.
fn map_id(fd: BorrowedFd<'_>) -> Option<u32> {
    let mut info = libbpf_sys::bpf_map_info::default();
    let mut len = std::mem::size_of::<libbpf_sys::bpf_map_info>() as u32;
    // SAFETY: `info` is a live bpf_map_info of `len` bytes.
    let r = unsafe { libbpf_sys::bpf_map_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    (r == 0).then_some(info.id)
}

/// Records which programs are pinned (after a load); without it the next start loads again.
fn record_fingerprint(bpffs: &Path, fingerprint: u64) {
    let pin = bpffs.join("progs").join(BUILD_PIN);
    let r = (|| -> Result<()> {
        let map = match MapHandle::from_pinned_path(&pin) {
            Ok(m) => m,
            Err(_) => {
                let opts = libbpf_sys::bpf_map_create_opts {
                    sz: std::mem::size_of::<libbpf_sys::bpf_map_create_opts>() as _,
                    ..Default::default()
                };
                let mut m = MapHandle::create(
                    libbpf_rs::MapType::Array,
                    Some("sl_build_v1"),
                    4,
                    8,
                    1,
                    &opts,
                )?;
                m.pin(&pin)?;
                m
            }
        };
        map.update(
            &0u32.to_ne_bytes(),
            &fingerprint.to_ne_bytes(),
            MapFlags::ANY,
        )?;
        Ok(())
    })();
    if let Err(e) = r {
        tracing::warn!(error = %format!("{e:#}"), "recording the programs' build: the next start loads them again");
    }
}

impl Datapath {
    /// Loads the programs, reusing pinned maps, and pins maps and programs under `cfg.bpffs`.
    pub fn load(cfg: &DatapathConfig) -> Result<Datapath> {
        libbpf_rs::set_print(Some((libbpf_rs::PrintLevel::Debug, libbpf_log)));
        ensure_bpffs(&cfg.bpffs)?;
        let maps_dir = cfg.bpffs.join("maps");

        let fingerprint = fingerprint(cfg);
        let [from_pod, to_pod, from_net, to_net] = match reuse_pinned(cfg, &maps_dir, fingerprint) {
            Some(progs) => {
                tracing::info!(
                    build = sluice_core::bpf::BUILD,
                    "the pinned programs are this build's with this configuration: kept (not loaded again)"
                );
                progs
            }
            None => {
                let progs = load_programs(cfg, &maps_dir)?;
                record_fingerprint(&cfg.bpffs, fingerprint);
                progs
            }
        };

        let open_pin = |name: &str| {
            let pin = maps_dir.join(name);
            MapHandle::from_pinned_path(&pin).with_context(|| format!("opening {}", pin.display()))
        };
        let maps = Maps {
            frontends: open_pin("sl_fe_v2")?,
            vips: open_pin("sl_vip_v1")?,
            backends: open_pin("sl_be_v2")?,
            members: open_pin("sl_bm_v1")?,
            conntrack: open_pin("sl_ct_v2")?,
            affinity: open_pin("sl_aff_v1")?,
            fragments: open_pin("sl_frag_v1")?,
            pods: open_pin("sl_pod_v2")?,
            nodes: open_pin("sl_node_v1")?,
            reasons: open_pin("sl_rsn_v2")?,
            ct_events: open_pin("sl_ctev_v1")?,
            services: open_pin("sl_svc_v2")?,
            conntrack_size: cfg.sizes.conntrack,
        };
        // Maps of an older layout: their programs are replaced when the pods are re-adopted.
        drop_old_layouts(&maps_dir);
        Ok(Datapath {
            bpffs: cfg.bpffs.clone(),
            mode: cfg.mode,
            fast_add: cfg.fast_add && cfg.mode == AttachMode::Tcx,
            from_pod,
            to_pod,
            from_net,
            to_net,
            maps,
        })
    }

    /// The mode pods end up in (`--attach-mode`).
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    /// How a pod is attached at ADD. A tcx attach waits out an RCU grace period under the RTNL
    /// lock (two per pod: most of a tcx ADD); a clsact filter does not. With `--attach-mode
    /// fast` on a tcx kernel, ADD attaches clsact filters and the daemon moves the pod to tcx
    /// links once ADDs are quiet ([`crate::state::State::upgrade_attachments`]): tcx programs run
    /// before clsact and end the packet's classification, so the move is atomic per packet.
    pub fn add_mode(&self) -> AttachMode {
        if self.fast_add {
            AttachMode::Tc
        } else {
            self.mode
        }
    }

    /// How a live pod attached with `previous` is re-adopted at start: in the mode it has while
    /// it waits for its move to tcx (a start never waits for grace periods), else in `mode()`.
    pub fn readopt_mode(&self, previous: Option<AttachMode>) -> AttachMode {
        if self.fast_add && previous == Some(AttachMode::Tc) {
            AttachMode::Tc
        } else {
            self.mode
        }
    }

    /// Whether pods attached with clsact wait to be moved to tcx links.
    pub fn upgrades(&self) -> bool {
        self.mode == AttachMode::Tcx
    }

    /// bpffs refuses '.' in names: `<links>/<host_ifname>-ingress`.
    fn link_pin(&self, host_ifname: &str, dir: &str) -> PathBuf {
        self.bpffs
            .join("links")
            .join(format!("{host_ifname}-{dir}"))
    }

    /// Attaches (or re-adopts) both programs on a host-side veth and creates its counters and
    /// source-address entry (`pod_addr`: the only source the pod may send from).
    /// Idempotent: an existing attachment gets the current programs, atomically. `previous` is the
    /// mode the interface was attached with before (a daemon restarted in another mode removes the
    /// old attachment so programs never run twice).
    pub fn attach(
        &self,
        mode: AttachMode,
        host_ifname: &str,
        ifindex: u32,
        previous: Option<AttachMode>,
        pod_addr: Ipv4Addr,
    ) -> Result<()> {
        self.attach_pair(
            mode,
            host_ifname,
            ifindex,
            previous,
            [&self.from_pod, &self.to_pod],
            POD_FILTER_HANDLE,
        )?;
        self.set_pod_entry(ifindex, pod_addr)
            .context("creating the pod's counters")
    }

    /// Attaches (or re-adopts) the uplink programs on a --nodeport-iface, like `attach`. (A
    /// daemon switched from tc to tcx mode leaves its old uplink filters: `--cleanup` first.)
    pub fn attach_uplink(&self, ifname: &str, ifindex: u32) -> Result<()> {
        self.attach_pair(
            self.mode,
            ifname,
            ifindex,
            None,
            [&self.from_net, &self.to_net],
            UPLINK_FILTER_HANDLE,
        )
    }

    /// Ingress and egress programs on an interface, as pinned tcx links or clsact filters.
    fn attach_pair(
        &self,
        mode: AttachMode,
        ifname: &str,
        ifindex: u32,
        previous: Option<AttachMode>,
        progs: [&OwnedFd; 2],
        filter_handle: u32,
    ) -> Result<()> {
        let dirs = [
            (progs[0], "ingress", TC_INGRESS),
            (progs[1], "egress", TC_EGRESS),
        ];
        match mode {
            AttachMode::Tcx => {
                // Each tcx attach waits out an RCU grace period (the kernel swaps the device's
                // program array under the RTNL lock, so two directions cannot overlap): this is
                // most of a pod ADD's latency in tcx mode (see README, "CNI latency").
                for (prog, dir, _) in dirs {
                    self.attach_tcx(prog.as_fd(), ifname, ifindex, dir)?;
                }
                if previous == Some(AttachMode::Tc) {
                    detach_tc(ifindex, progs, filter_handle);
                }
            }
            AttachMode::Tc => {
                for (prog, dir, point) in dirs {
                    let mut hook = TcHookBuilder::new(prog.as_fd())
                        .ifindex(ifindex as i32)
                        .replace(true)
                        .handle(filter_handle)
                        .priority(1)
                        .hook(point);
                    if let Err(e) = hook.create() {
                        tracing::debug!(error = %e, "clsact qdisc exists");
                    }
                    hook.attach()
                        .with_context(|| format!("attaching {dir} filter on {ifname}"))?;
                    let _ = std::fs::remove_file(self.link_pin(ifname, dir));
                }
            }
        }
        Ok(())
    }

    /// Creates the pod's entry, or sets its address in every CPU's copy keeping the counters.
    fn set_pod_entry(&self, ifindex: u32, pod_addr: Ipv4Addr) -> Result<()> {
        let addr = u32::from(pod_addr).to_be();
        let cpus = libbpf_rs::num_possible_cpus()?;
        let mut per_cpu: Vec<Vec<u8>> = match self
            .maps
            .pods
            .lookup_percpu(as_bytes(&ifindex), MapFlags::ANY)?
        {
            Some(v) => v,
            None => vec![as_bytes(&types::pod_info::default()).to_vec(); cpus],
        };
        if per_cpu
            .iter()
            .all(|v| from_bytes::<types::pod_info>(v).addr == addr)
        {
            return Ok(());
        }
        for v in &mut per_cpu {
            let mut p: types::pod_info = from_bytes(v);
            p.addr = addr;
            *v = as_bytes(&p).to_vec();
        }
        self.maps
            .pods
            .update_percpu(as_bytes(&ifindex), &per_cpu, MapFlags::ANY)?;
        Ok(())
    }

    /// Sets the next interface of the pod's ring of sluice interfaces (0: none) in every CPU's
    /// copy of its entry, keeping the counters.
    pub fn set_pod_sibling(&self, ifindex: u32, sibling: u32) -> Result<()> {
        let Some(mut per_cpu) = self
            .maps
            .pods
            .lookup_percpu(as_bytes(&ifindex), MapFlags::ANY)?
        else {
            return Ok(()); // not attached (any more)
        };
        if per_cpu
            .iter()
            .all(|v| from_bytes::<types::pod_info>(v).sibling == sibling)
        {
            return Ok(());
        }
        for v in &mut per_cpu {
            let mut p: types::pod_info = from_bytes(v);
            p.sibling = sibling;
            *v = as_bytes(&p).to_vec();
        }
        self.maps
            .pods
            .update_percpu(as_bytes(&ifindex), &per_cpu, MapFlags::EXIST)?;
        Ok(())
    }

    fn attach_tcx(
        &self,
        prog: BorrowedFd<'_>,
        host_ifname: &str,
        ifindex: u32,
        dir: &str,
    ) -> Result<()> {
        let pin = self.link_pin(host_ifname, dir);
        let attach_type = if dir == "ingress" {
            libbpf_sys::BPF_TCX_INGRESS
        } else {
            libbpf_sys::BPF_TCX_EGRESS
        };
        // Re-adopt: a pinned link still on this interface gets the new program in one step.
        if let Some(link) = pin
            .exists()
            .then(|| libbpf_rs::Link::open(&pin).ok())
            .flatten()
        {
            let same_if = matches!(LinkInfo::from_fd(link.as_fd()).map(|i| i.info),
                Ok(LinkTypeInfo::Tcx(t)) if t.ifindex == ifindex && t.attach_type.clone() as u32 == attach_type);
            if same_if {
                errno_result(unsafe {
                    libbpf_sys::bpf_link_update(
                        link.as_fd().as_raw_fd(),
                        prog.as_raw_fd(),
                        std::ptr::null(),
                    )
                })
                .with_context(|| format!("updating the {dir} program of {host_ifname}"))?;
                return Ok(());
            }
            // Defunct (its veth was deleted) or elsewhere: replace it.
            let _ = std::fs::remove_file(&pin);
        }
        let fd = errno_result(unsafe {
            libbpf_sys::bpf_link_create(
                prog.as_raw_fd(),
                ifindex as i32,
                attach_type,
                std::ptr::null(),
            )
        })
        .with_context(|| format!("attaching tcx {dir} on {host_ifname} (ifindex {ifindex})"))?;
        let link = unsafe { OwnedFd::from_raw_fd(fd) };
        errno_result(unsafe { libbpf_sys::bpf_obj_pin(link.as_raw_fd(), cpath(&pin).as_ptr()) })
            .with_context(|| format!("pinning {}", pin.display()))?;
        Ok(())
    }

    /// Detaches from a veth (if it still exists) and forgets its counters. Idempotent.
    pub fn detach(&self, host_ifname: &str, ifindex: u32, mode: Option<AttachMode>) {
        for dir in ["ingress", "egress"] {
            // Unpinning the last reference of a tcx link detaches it.
            let _ = std::fs::remove_file(self.link_pin(host_ifname, dir));
        }
        if ifindex != 0 {
            if mode == Some(AttachMode::Tc)
                && nix::net::if_::if_nametoindex(host_ifname).ok() == Some(ifindex)
            {
                detach_tc(ifindex, [&self.from_pod, &self.to_pod], POD_FILTER_HANDLE);
            }
            let _ = self.maps.pods.delete(as_bytes(&ifindex));
        }
    }

    /// Host-side interface names that have pinned links (to find leftovers).
    pub fn pinned_link_ifnames(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.bpffs.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let ifname = name
                    .strip_suffix("-ingress")
                    .or_else(|| name.strip_suffix("-egress"))?;
                Some(ifname.to_string())
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Sums a pod's per-CPU counters.
    pub fn pod_counters(&self, ifindex: u32) -> types::pod_info {
        let mut sum = types::pod_info::default();
        if let Ok(Some(per_cpu)) = self
            .maps
            .pods
            .lookup_percpu(as_bytes(&ifindex), MapFlags::ANY)
        {
            for v in per_cpu {
                let s: types::pod_info = from_bytes(&v);
                sum.rx_packets += s.rx_packets;
                sum.rx_bytes += s.rx_bytes;
                sum.tx_packets += s.tx_packets;
                sum.tx_bytes += s.tx_bytes;
            }
        }
        sum
    }

    /// Sums a per-CPU `struct counter` array entry.
    pub fn counter(map: &MapHandle, index: u32) -> types::counter {
        let mut sum = types::counter::default();
        if let Ok(Some(per_cpu)) = map.lookup_percpu(as_bytes(&index), MapFlags::ANY) {
            for v in per_cpu {
                let c: types::counter = from_bytes(&v);
                sum.packets += c.packets;
                sum.bytes += c.bytes;
            }
        }
        sum
    }

    /// Sums a service's per-CPU `struct svc_stats`.
    pub fn service_stats(map: &MapHandle, id: u32) -> types::svc_stats {
        let mut sum = types::svc_stats::default();
        if let Ok(Some(per_cpu)) = map.lookup_percpu(as_bytes(&id), MapFlags::ANY) {
            for v in per_cpu {
                let c: types::svc_stats = from_bytes(&v);
                sum.packets += c.packets;
                sum.bytes += c.bytes;
                sum.local += c.local;
                sum.forwarded += c.forwarded;
                sum.decapsulated += c.decapsulated;
            }
        }
        sum
    }

    /// (name, kernel id, pin path) of the loaded programs.
    pub fn programs(&self) -> Vec<(String, u32, PathBuf)> {
        [
            ("from_pod", &self.from_pod),
            ("to_pod", &self.to_pod),
            ("from_net", &self.from_net),
            ("to_net", &self.to_net),
        ]
        .into_iter()
        .map(|(n, fd)| {
            (
                n.to_string(),
                libbpf_rs::Program::id_from_fd(fd.as_fd()).unwrap_or(0),
                self.bpffs.join("progs").join(n),
            )
        })
        .collect()
    }

    /// Removes every attachment (tcx pins, clsact filters on `ifindexes`), program and map pin.
    pub fn cleanup(bpffs: &Path, ifindexes: &[u32], uplinks: &[u32]) -> Result<()> {
        // Any program fd names a filter by handle and priority.
        let any = libbpf_rs::Program::fd_from_pinned_path(bpffs.join("progs/from_pod"));
        if let Ok(fd) = &any {
            for (list, handle) in [
                (ifindexes, POD_FILTER_HANDLE),
                (uplinks, UPLINK_FILTER_HANDLE),
            ] {
                for ifindex in list {
                    detach_tc(*ifindex, [fd, fd], handle);
                }
            }
        }
        if bpffs.exists() {
            std::fs::remove_dir_all(bpffs)
                .with_context(|| format!("removing {}", bpffs.display()))?;
        }
        Ok(())
    }
}

/// clsact filter handles (priority 1): pod veths are sluice's own; on an uplink another tool's
/// filters may sit beside sluice's.
const POD_FILTER_HANDLE: u32 = 1;
const UPLINK_FILTER_HANDLE: u32 = 0x5c1ce;

fn detach_tc(ifindex: u32, progs: [&OwnedFd; 2], handle: u32) {
    for (prog, point) in [(progs[0], TC_INGRESS), (progs[1], TC_EGRESS)] {
        let mut hook = TcHookBuilder::new(prog.as_fd())
            .ifindex(ifindex as i32)
            .handle(handle)
            .priority(1)
            .hook(point);
        let _ = hook.detach();
    }
}

/// Names of the reason counters (bpf/consts.h enum reason), for display.
pub fn reason_name(r: u32) -> Option<&'static str> {
    use types::reason as R;
    Some(match types::reason(r) {
        R::REASON_PASS => "pass",
        R::REASON_PASS_NON_IPV4 => "pass_non_ipv4",
        R::REASON_PASS_FRAGMENT => "pass_fragment",
        R::REASON_NAT_NEW => "nat_new",
        R::REASON_NAT_ESTABLISHED => "nat_established",
        R::REASON_REV_NAT => "rev_nat",
        R::REASON_HAIRPIN => "hairpin",
        R::REASON_NO_BACKEND => "no_backend_rejected",
        R::REASON_AFFINITY_HIT => "affinity_hit",
        R::REASON_REV_NAT_ICMP => "rev_nat_icmp",
        R::REASON_NAT_FRAGMENT => "nat_fragment",
        R::REASON_NAT_NEW_XLATE => "nat_new_port_translated",
        R::REASON_DIRECT_NEW => "direct_new",
        R::REASON_DIRECT_XLATE_NEW => "direct_new_port_translated",
        R::REASON_XLATE => "port_translated",
        R::REASON_CT_REPAIRED => "ct_repaired",
        R::REASON_FLOW_REPLACED => "flow_replaced",
        R::REASON_UDP_REBALANCED => "udp_rebalanced",
        R::REASON_DIRECT => "direct",
        R::REASON_NP_LOCAL => "external_local",
        R::REASON_NP_FORWARD => "external_forwarded",
        R::REASON_NP_DECAP => "external_decapsulated",
        R::REASON_NP_REPLY => "external_reply",
        R::REASON_NP_REPLY_TUNNEL => "external_reply_tunnelled",
        R::REASON_NP_TUNNEL_REPLY => "tunnelled_reply_forwarded",
        R::REASON_FRAG_NEEDED => "frag_needed_sent",
        R::REASON_DROP_MALFORMED => "drop_malformed",
        R::REASON_DROP_TRUNCATED => "drop_truncated",
        R::REASON_DROP_FRAG_ORPHAN => "drop_fragment_orphan",
        R::REASON_DROP_CT_CREATE => "drop_ct_create",
        R::REASON_DROP_REWRITE => "drop_rewrite",
        R::REASON_DROP_NO_BACKEND => "drop_no_backend",
        R::REASON_DROP_CT_COLLISION => "drop_ct_collision",
        R::REASON_DROP_SPOOFED => "drop_spoofed",
        R::REASON_DROP_NO_LOCAL => "drop_no_local_endpoint",
        R::REASON_DROP_NO_NODE => "drop_backend_node_unknown",
        R::REASON_DROP_ENCAP => "drop_encapsulation",
        R::REASON_DROP_TOO_BIG => "drop_too_big",
        _ => return None,
    })
}

/// The reason counters' index space (enum reason's REASON_MAX).
pub const REASON_MAX: u32 = types::reason::REASON_MAX.0;

/// Pinned maps of layouts this daemon no longer uses (replaced by a newer version of the same
/// map). Their content is not migrated: frontends and backends are rewritten from the objects
/// before the programs are swapped; conntrack of a v1 datapath is lost (flows reconnect).
const OLD_LAYOUTS: &[&str] = &[
    "sl_fe_v1",
    "sl_be_v1",
    "sl_ct_v1",
    "sl_pod_v1",
    "sl_rsn_v1",
    "sl_svc_v1",
];

fn drop_old_layouts(maps_dir: &Path) {
    for name in OLD_LAYOUTS {
        let pin = maps_dir.join(name);
        if pin.exists() {
            tracing::warn!(pin = %pin.display(), "removing a map of an older layout");
            let _ = std::fs::remove_file(&pin);
        }
    }
}
