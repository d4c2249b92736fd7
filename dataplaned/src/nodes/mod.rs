//! Nodes: this node's uplinks and addresses, the cluster's other nodes (from `v1 Node` objects),
//! and what follows from them: the node-address map the datapath uses to accept encapsulated
//! packets and to find NodePorts (sl_node_v1), and routes to other nodes' pod CIDRs.

pub mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use libbpf_rs::{MapCore, MapFlags};
use serde::Serialize;
use sluice_core::bpf::pod_veth::types;

use crate::datapath::Maps;
use crate::ipam::Cidr;
use crate::pod::{as_bytes, from_bytes};
use crate::services::objects::NodeSpec;

/// The interfaces external frontends are served on, and this node's addresses on them.
#[derive(Debug, Clone, Serialize)]
pub struct Uplinks {
    /// (name, ifindex) of each --nodeport-iface.
    pub ifaces: Vec<(String, u32)>,
    /// The address this node encapsulates from and other nodes reach it at.
    pub node_ip: Ipv4Addr,
    /// Every IPv4 address of those interfaces (NodePorts answer on each).
    pub addrs: Vec<Ipv4Addr>,
}

/// The interface of the IPv4 default route (/proc/net/route), if there is one.
pub fn default_route_iface() -> Option<String> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// The IPv4 addresses of interface `name`, in the order the kernel lists them.
pub fn iface_addrs(name: &str) -> Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for a in nix::ifaddrs::getifaddrs().context("listing interface addresses")? {
        if a.interface_name != name {
            continue;
        }
        if let Some(sin) = a.address.as_ref().and_then(|s| s.as_sockaddr_in()) {
            out.push(sin.ip());
        }
    }
    Ok(out)
}

/// Resolves the uplinks: `ifaces` (default: the default route's interface; none is fine, then no
/// external frontends are served) and the node address (default: the first address of the first).
pub fn discover(ifaces: &[String], node_ip: Option<Ipv4Addr>) -> Result<Uplinks> {
    let names: Vec<String> = if ifaces.is_empty() {
        default_route_iface().into_iter().collect()
    } else {
        ifaces.to_vec()
    };
    let mut up = Uplinks {
        ifaces: Vec::new(),
        node_ip: node_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        addrs: Vec::new(),
    };
    for name in &names {
        let idx = nix::net::if_::if_nametoindex(name.as_str())
            .with_context(|| format!("--nodeport-iface {name}: no such interface"))?;
        up.ifaces.push((name.clone(), idx));
        for a in iface_addrs(name)? {
            if !up.addrs.contains(&a) {
                up.addrs.push(a);
            }
        }
    }
    if node_ip.is_none() {
        up.node_ip = match up.addrs.first() {
            Some(a) => *a,
            None if !names.is_empty() => {
                bail!("{} has no IPv4 address: give --node-ip", names[0])
            }
            None => Ipv4Addr::UNSPECIFIED,
        };
    }
    if !up.node_ip.is_unspecified() && !up.addrs.contains(&up.node_ip) {
        up.addrs.push(up.node_ip);
    }
    Ok(up)
}

/// Another node of the cluster, as its Node object describes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Peer {
    pub name: String,
    /// Its InternalIP: where its pods are routed through and its encapsulation comes from.
    pub addr: Ipv4Addr,
    pub pod_cidrs: Vec<String>,
}

/// Node objects → (this node's pod CIDR if its object names one, the other nodes). A node without
/// an IPv4 InternalIP cannot be reached and is left out (logged).
pub fn peers_of(nodes: &[(String, NodeSpec)], me: &str) -> (Option<String>, Vec<Peer>) {
    let mut own = None;
    let mut peers = Vec::new();
    for (name, n) in nodes {
        let cidrs: Vec<String> = n.pod_cidrs.iter().map(|c| c.to_string()).collect();
        if name == me {
            own = cidrs.iter().find(|c| c.parse::<Cidr>().is_ok()).cloned();
            continue;
        }
        let addr = n.internal_ips.iter().find_map(|a| match a {
            std::net::IpAddr::V4(v4) => Some(*v4),
            _ => None,
        });
        match addr {
            Some(addr) => peers.push(Peer {
                name: name.clone(),
                addr,
                pod_cidrs: cidrs,
            }),
            None => tracing::warn!(node = %name, "Node without an IPv4 InternalIP: not routed"),
        }
    }
    peers.sort();
    (own, peers)
}

/// Keeps sl_node_v1 equal to this node's addresses (NODE_F_SELF) and the peers' addresses.
pub struct NodeMap {
    written: BTreeMap<Ipv4Addr, u32>,
}

impl NodeMap {
    /// Adopts what the map holds (after a restart: what the previous daemon wrote).
    pub fn load(maps: &Maps) -> Result<NodeMap> {
        let mut written = BTreeMap::new();
        for (k, v) in crate::services::bpf_maps::dump::<u32, types::node_value>(&maps.nodes)? {
            written.insert(Ipv4Addr::from(u32::from_be(k)), v.flags);
        }
        Ok(NodeMap { written })
    }

    /// Makes the map hold exactly `own` (flagged self) and `peers`; returns the writes made.
    pub fn sync(&mut self, maps: &Maps, own: &[Ipv4Addr], peers: &[Peer]) -> Result<usize> {
        let self_flag = types::node_flags::NODE_F_SELF.0;
        let mut want: BTreeMap<Ipv4Addr, u32> = peers.iter().map(|p| (p.addr, 0)).collect();
        for a in own {
            want.insert(*a, self_flag);
        }
        let mut writes = 0;
        for (addr, flags) in &want {
            if self.written.get(addr) != Some(flags) {
                let v = types::node_value {
                    flags: *flags,
                    pad: 0,
                };
                maps.nodes
                    .update(
                        as_bytes(&u32::from(*addr).to_be()),
                        as_bytes(&v),
                        MapFlags::ANY,
                    )
                    .with_context(|| format!("writing node address {addr}"))?;
                writes += 1;
            }
        }
        let gone: BTreeSet<Ipv4Addr> = self
            .written
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for a in gone {
            let _ = maps.nodes.delete(as_bytes(&u32::from(a).to_be()));
            writes += 1;
        }
        self.written = want;
        Ok(writes)
    }

    /// (address, flags) as written.
    pub fn entries(maps: &Maps) -> Vec<(Ipv4Addr, bool)> {
        let mut out = Vec::new();
        for kb in maps.nodes.keys() {
            let Ok(Some(vb)) = maps.nodes.lookup(&kb, MapFlags::ANY) else {
                continue;
            };
            let k: u32 = from_bytes(&kb);
            let v: types::node_value = from_bytes(&vb);
            out.push((
                Ipv4Addr::from(u32::from_be(k)),
                v.flags & types::node_flags::NODE_F_SELF.0 != 0,
            ));
        }
        out.sort();
        out
    }
}

/// The routes this node needs: each peer's pod CIDRs via its address (one L2 segment: direct
/// routing, no NAT, no tunnel for pod traffic).
pub fn desired_routes(peers: &[Peer], own_cidr: Cidr) -> Vec<(Cidr, Ipv4Addr)> {
    let mut out = Vec::new();
    for p in peers {
        for c in &p.pod_cidrs {
            match c.parse::<Cidr>() {
                Ok(cidr) if cidr != own_cidr => out.push((cidr, p.addr)),
                Ok(_) => {
                    tracing::warn!(node = %p.name, cidr = %c, "a peer claims this node's pod CIDR; not routed")
                }
                Err(_) => {} // IPv6 pod CIDRs: not handled yet
            }
        }
    }
    out.sort_by_key(|(c, via)| (u32::from(c.network), c.prefix, *via));
    out.dedup_by_key(|(c, _)| (c.network, c.prefix));
    out
}
