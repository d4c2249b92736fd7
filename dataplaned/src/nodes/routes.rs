//! Routes to other nodes' pod CIDRs (via their address), made with rtnetlink and marked with
//! sluice's own route protocol number so a restarted daemon finds (and prunes) exactly its own.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol};
use rtnetlink::RouteMessageBuilder;

use crate::ipam::Cidr;

/// The route protocol sluice's routes carry (`ip route` shows "proto 197").
pub const SLUICE_RTPROT: u8 = 197;

pub struct Routes {
    handle: rtnetlink::Handle,
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Routes {
    pub fn new() -> Result<Routes> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
        tokio::spawn(conn);
        Ok(Routes { handle })
    }

    /// sluice's routes now in the main table: (cidr, gateway).
    pub async fn current(&self) -> Result<Vec<(Cidr, Ipv4Addr, RouteMessage)>> {
        let filter = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(filter)
            .execute()
            .try_collect()
            .await
            .context("listing routes")?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.protocol != RouteProtocol::Other(SLUICE_RTPROT) {
                continue;
            }
            let (mut dst, mut gw) = (None, None);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    _ => {}
                }
            }
            if let (Some(d), Some(g)) = (dst, gw) {
                let cidr = Cidr {
                    network: d,
                    prefix: m.header.destination_prefix_length,
                };
                out.push((cidr, g, m));
            }
        }
        Ok(out)
    }

    /// Makes sluice's routes exactly `want`; returns (added or changed, removed). A route that
    /// cannot be added (its gateway unreachable, say) is logged and the rest still applied.
    pub async fn sync(&self, want: &[(Cidr, Ipv4Addr)]) -> Result<(usize, usize)> {
        let have = self.current().await?;
        let have_set: BTreeSet<(u32, u8, Ipv4Addr)> = have
            .iter()
            .map(|(c, g, _)| (u32::from(c.network), c.prefix, *g))
            .collect();
        let want_set: BTreeSet<(u32, u8, Ipv4Addr)> = want
            .iter()
            .map(|(c, g)| (u32::from(c.network), c.prefix, *g))
            .collect();
        let mut added = 0;
        for (c, gw) in want {
            if have_set.contains(&(u32::from(c.network), c.prefix, *gw)) {
                continue;
            }
            let msg = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(c.network, c.prefix)
                .gateway(*gw)
                .protocol(RouteProtocol::Other(SLUICE_RTPROT))
                .build();
            match self.handle.route().add(msg).replace().execute().await {
                Ok(()) => added += 1,
                Err(e) => tracing::error!(cidr = %c, via = %gw, errno = ?errno(&e), error = %e,
                    "adding the route to a node's pod CIDR failed"),
            }
        }
        let mut removed = 0;
        for (c, gw, m) in have {
            if want_set.contains(&(u32::from(c.network), c.prefix, gw)) {
                continue;
            }
            match self.handle.route().del(m).execute().await {
                Ok(()) => removed += 1,
                Err(e) if errno(&e) == Some(libc::ESRCH) => {}
                Err(e) => tracing::error!(cidr = %c, error = %e, "removing a stale route failed"),
            }
        }
        Ok((added, removed))
    }
}
