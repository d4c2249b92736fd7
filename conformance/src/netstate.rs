//! What a network namespace holds (links, addresses, routes), read with `ip -j`, to compare
//! before and after: "nothing left behind". IPv6 link-local addresses and routes (which the
//! kernel adds on its own, asynchronously) are left out.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;

use anyhow::{anyhow, Context, Result};
use serde_json::Value;

use crate::schema::parse_cidr;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetState {
    pub links: BTreeSet<String>,
    pub addrs: BTreeSet<String>,
    pub routes: BTreeSet<String>,
}

fn ip_json(ns: &str, args: &[&str]) -> Result<Vec<Value>> {
    let out = Command::new("ip")
        .arg("-n")
        .arg(ns)
        .arg("-j")
        .args(args)
        .output()
        .with_context(|| format!("running ip -n {ns} {args:?}"))?;
    if !out.status.success() {
        return Err(anyhow!(
            "ip -n {ns} -j {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing ip -j {args:?}"))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

#[derive(Debug, Clone)]
pub struct Link {
    pub name: String,
    pub index: u64,
    pub mac: String,
    pub up: bool,
    pub kind: String,
    pub mtu: u64,
}

pub fn links(ns: &str) -> Result<Vec<Link>> {
    Ok(ip_json(ns, &["-d", "link", "show"])?
        .iter()
        .map(|l| Link {
            name: s(l, "ifname").to_string(),
            index: l.get("ifindex").and_then(Value::as_u64).unwrap_or(0),
            mac: s(l, "address").to_lowercase(),
            up: l
                .get("flags")
                .and_then(Value::as_array)
                .is_some_and(|f| f.iter().any(|x| x.as_str() == Some("UP"))),
            kind: l
                .get("linkinfo")
                .map(|i| s(i, "info_kind").to_string())
                .unwrap_or_default(),
            mtu: l.get("mtu").and_then(Value::as_u64).unwrap_or(0),
        })
        .collect())
}

fn link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80 || a.is_multicast(),
        IpAddr::V4(_) => false,
    }
}

/// (link, address/prefix) pairs, IPv6 link-local ones left out.
pub fn addresses(ns: &str) -> Result<Vec<(String, IpAddr, u8)>> {
    let mut out = Vec::new();
    for l in ip_json(ns, &["addr", "show"])? {
        for a in l
            .get("addr_info")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Ok(ip) = s(a, "local").parse::<IpAddr>() else {
                continue;
            };
            if link_local(&ip) {
                continue;
            }
            let p = a.get("prefixlen").and_then(Value::as_u64).unwrap_or(0) as u8;
            out.push((s(&l, "ifname").to_string(), ip, p));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct Route {
    pub table: String,
    pub kind: String,
    /// CIDR; "default" is written 0.0.0.0/0 or ::/0, host routes get /32 or /128.
    pub dst: String,
    pub gw: Option<IpAddr>,
    pub dev: String,
}

impl Route {
    pub fn key(&self) -> String {
        format!(
            "{} {} {}{} dev {}",
            self.table,
            self.kind,
            self.dst,
            self.gw.map(|g| format!(" via {g}")).unwrap_or_default(),
            self.dev
        )
    }
}

fn norm_dst(dst: &str, v6: bool) -> String {
    if dst == "default" {
        return if v6 {
            "::/0".into()
        } else {
            "0.0.0.0/0".into()
        };
    }
    if dst.contains('/') {
        dst.to_string()
    } else {
        format!("{dst}/{}", if v6 { 128 } else { 32 })
    }
}

/// Every route in every table, both families (IPv6 link-local and multicast ones left out).
pub fn routes(ns: &str) -> Result<Vec<Route>> {
    let mut out = Vec::new();
    for (v6, fam) in [(false, "-4"), (true, "-6")] {
        for r in ip_json(ns, &[fam, "route", "show", "table", "all"])? {
            let dst = norm_dst(s(&r, "dst"), v6);
            if let Some((ip, _)) = parse_cidr(&dst) {
                if link_local(&ip) {
                    continue;
                }
            }
            let kind = s(&r, "type");
            if v6 && (kind == "multicast" || kind == "anycast") {
                continue;
            }
            out.push(Route {
                table: if s(&r, "table").is_empty() {
                    "main".into()
                } else {
                    s(&r, "table").to_string()
                },
                kind: if kind.is_empty() {
                    "unicast".into()
                } else {
                    kind.to_string()
                },
                dst,
                gw: s(&r, "gateway").parse().ok(),
                dev: s(&r, "dev").to_string(),
            });
        }
    }
    Ok(out)
}

pub fn snapshot(ns: &str) -> Result<NetState> {
    Ok(NetState {
        links: links(ns)?
            .into_iter()
            .map(|l| {
                format!(
                    "{} ({})",
                    l.name,
                    if l.kind.is_empty() { "device" } else { &l.kind }
                )
            })
            .collect(),
        addrs: addresses(ns)?
            .into_iter()
            .map(|(l, ip, p)| format!("{ip}/{p} on {l}"))
            .collect(),
        routes: routes(ns)?.iter().map(Route::key).collect(),
    })
}

impl NetState {
    /// What `after` has that `self` lacks (+) and the reverse (-).
    pub fn diff(&self, after: &NetState) -> Vec<String> {
        let mut d = Vec::new();
        for (what, a, b) in [
            ("link", &self.links, &after.links),
            ("address", &self.addrs, &after.addrs),
            ("route", &self.routes, &after.routes),
        ] {
            for x in b.difference(a) {
                d.push(format!("+{what} {x}"));
            }
            for x in a.difference(b) {
                d.push(format!("-{what} {x}"));
            }
        }
        d
    }
}
