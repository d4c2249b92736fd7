//! IPAM: pod IPs from the node's pod CIDR, one per (container ID, interface), persisted so that a
//! crash at any instant neither duplicates an IP nor loses one a successful ADD returned.
//!
//! Layout: `<state>/ipam/<ip>` holds the allocation record (JSON). A claim writes the record to a
//! temporary file, fsyncs it, then hard-links it to its IP's name: link(2) is atomic and fails if
//! the name exists, so a file either is complete or is absent. Updates rename a fsynced temporary
//! over the record; releases unlink it. The directory is fsynced before the call returns.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("pod CIDR {0} has no free address")]
    Exhausted(Cidr),
    #[error("IPAM store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid CIDR {0:?}: want a.b.c.d/len with len <= 30")]
    BadCidr(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An IPv4 network, e.g. 10.244.0.0/24.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = IpamError;
    fn from_str(s: &str) -> Result<Self, IpamError> {
        let bad = || IpamError::BadCidr(s.to_string());
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix: u8 = p.parse().map_err(|_| bad())?;
        if prefix > 30 {
            return Err(bad());
        }
        let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
        Ok(Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// Usable host addresses: network and broadcast addresses excluded.
    fn hosts(&self) -> (u32, u32) {
        let first = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix as u32);
        (first + 1, first + size - 2)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
        u32::from(ip) & mask == u32::from(self.network)
    }

    pub fn host_count(&self) -> u32 {
        let (a, b) = self.hosts();
        b - a + 1
    }
}

/// One allocation, as persisted.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Allocation {
    pub container_id: String,
    pub ifname: String,
    pub ip: Ipv4Addr,
    pub host_ifname: String,
    pub netns: String,
    #[serde(default)]
    pub pod_namespace: String,
    #[serde(default)]
    pub pod_name: String,
    /// Programs attached to the host-side veth (ADD completed).
    #[serde(default)]
    pub attached: bool,
    /// The host-side veth's ifindex when attached (keys its counters).
    #[serde(default)]
    pub host_ifindex: u32,
    /// How the programs were attached ("tcx" or "tc"), so a restart in the other mode can undo it.
    #[serde(default)]
    pub attach_mode: String,
    /// Unix seconds of the claim.
    pub created: u64,
    /// The CNI network (the config's `name`) that made it; "" when recorded before sluice kept
    /// networks (see `state::gc_plan` for what GC does with those).
    #[serde(default)]
    pub network: String,
}

pub type Key = (String, String);

pub struct Ipam {
    dir: PathBuf,
    cidr: Cidr,
    by_key: HashMap<Key, Allocation>,
    /// IPs whose file exists, including unreadable ones (kept reserved, never handed out).
    taken: HashMap<Ipv4Addr, Option<Key>>,
    /// Round-robin cursor: a released IP is not handed out again at once.
    cursor: u32,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

impl Ipam {
    /// Opens (creating) the store under `dir` and loads every record.
    pub fn open(dir: &Path, cidr: Cidr) -> Result<Ipam, IpamError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut ipam = Ipam {
            dir: dir.to_owned(),
            cidr,
            by_key: HashMap::new(),
            taken: HashMap::new(),
            cursor: 0,
        };
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                // A claim or update that never finished: its record is not in effect.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Ok(ip) = name.parse::<Ipv4Addr>() else {
                tracing::warn!(path = %path.display(), "ignoring a stray file in the IPAM store");
                continue;
            };
            match fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Allocation>(&b).ok())
            {
                Some(a) if a.ip == ip => {
                    if !cidr.contains(ip) {
                        tracing::warn!(%ip, %cidr, "allocation outside the pod CIDR kept until released");
                    }
                    let key = (a.container_id.clone(), a.ifname.clone());
                    ipam.taken.insert(ip, Some(key.clone()));
                    ipam.cursor = ipam.cursor.max(u32::from(ip));
                    ipam.by_key.insert(key, a);
                }
                _ => {
                    tracing::error!(path = %path.display(), "unreadable IPAM record: its IP stays reserved");
                    ipam.taken.insert(ip, None);
                }
            }
        }
        Ok(ipam)
    }

    pub fn cidr(&self) -> Cidr {
        self.cidr
    }

    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.by_key
            .get(&(container_id.to_string(), ifname.to_string()))
    }

    pub fn all(&self) -> impl Iterator<Item = &Allocation> {
        self.by_key.values()
    }

    pub fn free_count(&self) -> u32 {
        let used = self
            .taken
            .keys()
            .filter(|ip| self.cidr.contains(**ip))
            .count() as u32;
        self.cidr.host_count().saturating_sub(used)
    }

    /// The pair's IP: its existing allocation (`false`), or a new durable one (`true`).
    pub fn allocate(&mut self, mut want: Allocation) -> Result<(Allocation, bool), IpamError> {
        let key = (want.container_id.clone(), want.ifname.clone());
        if let Some(existing) = self.by_key.get(&key) {
            return Ok((existing.clone(), false));
        }
        let (first, last) = self.cidr.hosts();
        let span = last - first + 1;
        let start = if (first..=last).contains(&self.cursor) {
            self.cursor - first + 1
        } else {
            0
        };
        for i in 0..span {
            let ip = Ipv4Addr::from(first + (start + i) % span);
            if self.taken.contains_key(&ip) {
                continue;
            }
            want.ip = ip;
            match self.claim(&want) {
                Ok(()) => {}
                // A file we did not know of (another process?): skip the address.
                Err(IpamError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists =>
                {
                    self.taken.insert(ip, None);
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.cursor = u32::from(ip);
            self.taken.insert(ip, Some(key.clone()));
            self.by_key.insert(key, want.clone());
            return Ok((want, true));
        }
        Err(IpamError::Exhausted(self.cidr))
    }

    /// Rewrites a pair's record (e.g. attached); a no-op for an unknown pair.
    pub fn update(&mut self, a: Allocation) -> Result<(), IpamError> {
        let key = (a.container_id.clone(), a.ifname.clone());
        if !self.by_key.contains_key(&key) {
            return Ok(());
        }
        let tmp = self.write_tmp(&a)?;
        let path = self.path(a.ip);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        self.sync_dir()?;
        self.by_key.insert(key, a);
        Ok(())
    }

    /// Frees the pair's IP; `None` if it held none.
    pub fn release(
        &mut self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<Allocation>, IpamError> {
        let key = (container_id.to_string(), ifname.to_string());
        let Some(a) = self.by_key.get(&key).cloned() else {
            return Ok(None);
        };
        let path = self.path(a.ip);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.sync_dir()?;
        self.by_key.remove(&key);
        self.taken.remove(&a.ip);
        Ok(Some(a))
    }

    fn path(&self, ip: Ipv4Addr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    fn write_tmp(&self, a: &Allocation) -> Result<PathBuf, IpamError> {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{}.{}.{seq}", a.ip, std::process::id()));
        let mut f = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&serde_json::to_vec(a).expect("allocation JSON"))
            .map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        Ok(tmp)
    }

    fn claim(&self, a: &Allocation) -> Result<(), IpamError> {
        let tmp = self.write_tmp(a)?;
        let path = self.path(a.ip);
        let linked = fs::hard_link(&tmp, &path).map_err(io_err(&path));
        let _ = fs::remove_file(&tmp);
        linked?;
        self.sync_dir()
    }

    fn sync_dir(&self) -> Result<(), IpamError> {
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(cid: &str, ifname: &str) -> Allocation {
        Allocation {
            container_id: cid.into(),
            ifname: ifname.into(),
            ip: Ipv4Addr::UNSPECIFIED,
            host_ifname: format!("h-{cid}"),
            netns: "/run/netns/x".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            attached: false,
            host_ifindex: 0,
            attach_mode: String::new(),
            created: 1,
            network: String::new(),
        }
    }

    #[test]
    fn cidr_parsing_masks_and_bounds() {
        let c: Cidr = "10.244.1.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "10.244.1.0/24");
        assert_eq!(c.host_count(), 254);
        assert!(c.contains("10.244.1.255".parse().unwrap()));
        assert!(!c.contains("10.244.2.1".parse().unwrap()));
        assert!("10.0.0.0/31".parse::<Cidr>().is_err());
        assert!("10.0.0.0".parse::<Cidr>().is_err());
        assert!("300.0.0.0/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn same_pair_gets_same_ip_and_distinct_pairs_distinct_ips() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.1.0.0/24".parse().unwrap()).unwrap();
        let (a, new_a) = ipam.allocate(alloc("c1", "eth0")).unwrap();
        let (a2, new_a2) = ipam.allocate(alloc("c1", "eth0")).unwrap();
        let (b, _) = ipam.allocate(alloc("c1", "eth1")).unwrap();
        assert!(new_a && !new_a2);
        assert_eq!(a.ip, a2.ip);
        assert_ne!(a.ip, b.ip);
        assert_eq!(a.ip, "10.1.0.1".parse::<Ipv4Addr>().unwrap());
    }

    #[test]
    fn release_is_idempotent_and_ip_is_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.1.0.0/24".parse().unwrap()).unwrap();
        let (a, _) = ipam.allocate(alloc("c1", "eth0")).unwrap();
        assert_eq!(
            ipam.release("c1", "eth0").unwrap().map(|x| x.ip),
            Some(a.ip)
        );
        assert_eq!(ipam.release("c1", "eth0").unwrap(), None);
        assert_eq!(ipam.release("never", "eth0").unwrap(), None);
        let (b, _) = ipam.allocate(alloc("c2", "eth0")).unwrap();
        assert_ne!(
            a.ip, b.ip,
            "round robin: the released IP is not the next one handed out"
        );
    }

    #[test]
    fn exhaustion_is_an_error_and_nothing_is_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::open(dir.path(), "10.1.0.0/30".parse().unwrap()).unwrap();
        ipam.allocate(alloc("c1", "eth0")).unwrap();
        ipam.allocate(alloc("c2", "eth0")).unwrap();
        assert!(matches!(
            ipam.allocate(alloc("c3", "eth0")),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(ipam.all().count(), 2);
        assert_eq!(ipam.free_count(), 0);
    }

    #[test]
    fn reopening_restores_allocations_and_drops_unfinished_writes() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: Cidr = "10.1.0.0/24".parse().unwrap();
        let (a, b) = {
            let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
            let (a, _) = ipam.allocate(alloc("c1", "eth0")).unwrap();
            let (mut b, _) = ipam.allocate(alloc("c2", "eth0")).unwrap();
            b.attached = true;
            ipam.update(b.clone()).unwrap();
            (a, b)
        };
        // A crash between writing a temporary and linking it leaves a dot-file behind.
        fs::write(dir.path().join(".10.1.0.9.1.1"), b"{partial").unwrap();
        // A corrupt record (not produced by us, but possible on a bad disk) stays reserved.
        fs::write(dir.path().join("10.1.0.3"), b"garbage").unwrap();

        let mut ipam = Ipam::open(dir.path(), cidr).unwrap();
        assert_eq!(ipam.get("c1", "eth0"), Some(&a));
        assert_eq!(ipam.get("c2", "eth0"), Some(&b));
        assert!(!dir.path().join(".10.1.0.9.1.1").exists());
        let (c, _) = ipam.allocate(alloc("c3", "eth0")).unwrap();
        assert!(![a.ip, b.ip, "10.1.0.3".parse().unwrap()].contains(&c.ip));
    }
}
