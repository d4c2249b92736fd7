//! The netlink work of the plugin (rtnetlink), in the host netns and in the pod's.
//!
//! A netlink socket belongs to the netns it was created in, so the pod's socket is created while
//! this thread is briefly inside the pod netns; every later call on it acts there, from any thread.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;

use futures::TryStreamExt;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope};
use nix::sched::{setns, CloneFlags};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::error::{err, CniError, Code, Result};

/// A link as we need to know it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Vec<u8>,
    pub mtu: u32,
    pub up: bool,
}

/// A netlink connection bound to one network namespace.
pub struct Netlink {
    handle: Handle,
}

fn nl_err(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> CniError {
    let what = what.to_string();
    move |e| err(Code::Netlink, what).with_details(e)
}

/// The errno of a netlink NACK, if that is what `e` is.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    /// A connection in the current thread's netns.
    pub fn here() -> Result<Netlink> {
        let (conn, handle, _) = rtnetlink::new_connection()
            .map_err(|e| err(Code::Netlink, "opening a netlink socket").with_details(e))?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    /// A connection in the netns `ns` (a file such as /var/run/netns/cni-...).
    pub fn in_netns(ns: &File) -> Result<Netlink> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(ns, CloneFlags::CLONE_NEWNET)
            .map_err(|e| err(Code::InvalidEnv, "entering the pod netns").with_details(e))?;
        let conn = rtnetlink::new_connection();
        // Go home before anything else can run on this thread.
        setns(&home, CloneFlags::CLONE_NEWNET).expect("returning to the host netns");
        let (conn, handle, _) = conn.map_err(|e| {
            err(Code::Netlink, "opening a netlink socket in the pod netns").with_details(e)
        })?;
        tokio::spawn(conn);
        Ok(Netlink { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Option<Link>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(to_link(msg))),
            Ok(None) => Ok(None),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format!("looking up link {name}"))(e)),
        }
    }

    /// Creates the veth pair with its peer made directly inside `peer_ns` (never moved there).
    pub async fn create_veth(
        &self,
        host_name: &str,
        host_mac: &[u8],
        peer_name: &str,
        peer_ns: &File,
        mtu: u32,
    ) -> Result<()> {
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer_name)
            .mtu(mtu)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
            .name(host_name)
            .mtu(mtu)
            .address(host_mac.to_vec())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            if errno(&e) == Some(libc::EEXIST) {
                err(
                    Code::InterfaceExists,
                    format!("interface {host_name} or {peer_name} already exists"),
                )
            } else {
                nl_err(format!("creating veth {host_name} <-> {peer_name}"))(e)
            }
        })
    }

    pub async fn set_up(&self, index: u32) -> Result<()> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(nl_err("setting link up"))
    }

    /// Deletes a link; a missing one is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<bool> {
        let Some(link) = self.link(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(link.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
            Err(e) => Err(nl_err(format!("deleting link {name}"))(e)),
        }
    }

    pub async fn add_address(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(nl_err(format!("adding address {ip}/{prefix}")))
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing addresses"))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                let prefix = m.header.prefix_len;
                m.attributes.into_iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V4(ip)) => Some((ip, prefix)),
                    _ => None,
                })
            })
            .collect())
    }

    /// `dst/prefix` out of `oif`, through `gw` (scope universe) or directly (scope link).
    pub async fn add_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        oif: u32,
        gw: Option<Ipv4Addr>,
    ) -> Result<()> {
        match self.try_add_route(dst, prefix, oif, gw).await? {
            true => Ok(()),
            false => Err(err(Code::Netlink, format!("adding route {dst}/{prefix}"))
                .with_details("File exists (os error 17)")),
        }
    }

    /// Like add_route, but a route to the same destination already there is not an error:
    /// Ok(false) says it was left as it was.
    pub async fn try_add_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        oif: u32,
        gw: Option<Ipv4Addr>,
    ) -> Result<bool> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(oif);
        b = match gw {
            Some(gw) => b.gateway(gw),
            None => b.scope(RouteScope::Link),
        };
        match self.handle.route().add(b.build()).execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(nl_err(format!("adding route {dst}/{prefix}"))(e)),
        }
    }

    /// IPv4 routes of the main table leaving through `oif`: (dst, prefix, gateway).
    pub async fn routes(&self, oif: u32) -> Result<Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .map_err(nl_err("listing routes"))?;
        let mut out = Vec::new();
        for m in msgs {
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut gw = None;
            let mut out_if = 0;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => out_if = *i,
                    _ => {}
                }
            }
            if out_if == oif {
                out.push((dst, m.header.destination_prefix_length, gw));
            }
        }
        Ok(out)
    }

    /// A permanent neighbour entry: `ip` is at `mac` on link `index`.
    pub async fn add_neighbour(&self, index: u32, ip: Ipv4Addr, mac: &[u8]) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(nl_err(format!("adding neighbour {ip}")))
    }
}

fn to_link(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: Vec::new(),
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
    };
    for a in msg.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Address(m) => link.mac = m,
            LinkAttribute::Mtu(m) => link.mtu = m,
            _ => {}
        }
    }
    link
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
