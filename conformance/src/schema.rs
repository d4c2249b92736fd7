//! Result schema per CNI version (0.4.0, 1.0.0, 1.1.0): what SPEC.md's "Success" section says a
//! result holds. Returns the problems found; empty means valid. Notes (not problems) are fields a
//! version does not define: libcni drops them.

use std::net::IpAddr;

use serde_json::Value;

use crate::cni::version_tuple;

#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    // Ethernet (6 octets) or InfiniBand (20 octets) hardware addresses.
    (parts.len() == 6 || parts.len() == 20)
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
}

pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    let ip: IpAddr = a.parse().ok()?;
    let p: u8 = p.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (p <= max).then_some((ip, p))
}

fn uint(v: &Value) -> bool {
    v.as_u64().is_some()
}

pub fn validate_result(v: &Value, version: &str) -> Report {
    let mut r = Report::default();
    let v1_1 = version_tuple(version) >= (1, 1, 0);
    let v040 = version == "0.4.0";
    let Some(o) = v.as_object() else {
        r.problems.push("result is not a JSON object".into());
        return r;
    };
    match o.get("cniVersion").and_then(Value::as_str) {
        Some(cv) if cv == version => {}
        Some(cv) => r.problems.push(format!(
            "cniVersion is {cv:?}, the config asked for {version:?}"
        )),
        None => r.problems.push("cniVersion is missing".into()),
    }
    for k in o.keys() {
        if !["cniVersion", "interfaces", "ips", "routes", "dns"].contains(&k.as_str()) {
            r.notes.push(format!("unknown top-level key {k:?}"));
        }
    }

    let mut n_ifaces = 0usize;
    match o.get("interfaces") {
        None => {}
        Some(Value::Array(list)) => {
            n_ifaces = list.len();
            for (i, it) in list.iter().enumerate() {
                let Some(io) = it.as_object() else {
                    r.problems.push(format!("interfaces[{i}] is not an object"));
                    continue;
                };
                match io.get("name").and_then(Value::as_str) {
                    Some(n) if !n.is_empty() => {}
                    _ => r.problems.push(format!("interfaces[{i}] has no name")),
                }
                if let Some(m) = io.get("mac") {
                    match m.as_str() {
                        Some(s) if s.is_empty() || is_mac(s) => {}
                        _ => r
                            .problems
                            .push(format!("interfaces[{i}].mac {m} is not a hardware address")),
                    }
                }
                if let Some(s) = io.get("sandbox") {
                    if !s.is_string() {
                        r.problems
                            .push(format!("interfaces[{i}].sandbox is not a string"));
                    }
                }
                for k in ["mtu"] {
                    if let Some(x) = io.get(k) {
                        if !v1_1 {
                            r.notes
                                .push(format!("interfaces[{i}].{k} is a 1.1.0 field"));
                        } else if !uint(x) {
                            r.problems
                                .push(format!("interfaces[{i}].{k} is not an unsigned integer"));
                        }
                    }
                }
                for k in ["socketPath", "pciID"] {
                    if let Some(x) = io.get(k) {
                        if !v1_1 {
                            r.notes
                                .push(format!("interfaces[{i}].{k} is a 1.1.0 field"));
                        } else if !x.is_string() {
                            r.problems
                                .push(format!("interfaces[{i}].{k} is not a string"));
                        }
                    }
                }
            }
        }
        Some(_) => r.problems.push("interfaces is not an array".into()),
    }

    match o.get("ips") {
        None => {}
        Some(Value::Array(list)) => {
            for (i, it) in list.iter().enumerate() {
                let Some(io) = it.as_object() else {
                    r.problems.push(format!("ips[{i}] is not an object"));
                    continue;
                };
                let addr = io.get("address").and_then(Value::as_str);
                let parsed = addr.and_then(parse_cidr);
                if parsed.is_none() {
                    r.problems.push(format!(
                        "ips[{i}].address {:?} is not an address in CIDR notation",
                        io.get("address")
                    ));
                }
                if let Some(g) = io.get("gateway") {
                    match g.as_str().map(str::parse::<IpAddr>) {
                        Some(Ok(gw)) => {
                            if let Some((a, _)) = parsed {
                                if a.is_ipv4() != gw.is_ipv4() {
                                    r.problems.push(format!(
                                        "ips[{i}].gateway {gw} is of another family than {a}"
                                    ));
                                }
                            }
                        }
                        _ => r
                            .problems
                            .push(format!("ips[{i}].gateway {g} is not an IP address")),
                    }
                }
                if let Some(x) = io.get("interface") {
                    match x.as_u64() {
                        Some(n) if (n as usize) < n_ifaces => {}
                        Some(n) => r.problems.push(format!(
                            "ips[{i}].interface {n} is not an index into interfaces ({n_ifaces})"
                        )),
                        None => r
                            .problems
                            .push(format!("ips[{i}].interface is not an unsigned integer")),
                    }
                }
                match (v040, io.get("version")) {
                    (true, Some(Value::String(ver))) => {
                        let want = match parsed {
                            Some((IpAddr::V4(_), _)) => "4",
                            Some((IpAddr::V6(_), _)) => "6",
                            None => ver.as_str(),
                        };
                        if ver != want {
                            r.problems.push(format!(
                                "ips[{i}].version is {ver:?}, the address is IPv{want}"
                            ));
                        }
                    }
                    (true, _) => r.problems.push(format!(
                        "ips[{i}] lacks \"version\" (\"4\" or \"6\"), required in 0.4.0"
                    )),
                    (false, Some(_)) => r
                        .notes
                        .push(format!("ips[{i}].version exists only up to 0.4.0")),
                    (false, None) => {}
                }
            }
        }
        Some(_) => r.problems.push("ips is not an array".into()),
    }

    match o.get("routes") {
        None => {}
        Some(Value::Array(list)) => {
            for (i, it) in list.iter().enumerate() {
                let Some(ro) = it.as_object() else {
                    r.problems.push(format!("routes[{i}] is not an object"));
                    continue;
                };
                if ro
                    .get("dst")
                    .and_then(Value::as_str)
                    .and_then(parse_cidr)
                    .is_none()
                {
                    r.problems.push(format!(
                        "routes[{i}].dst {:?} is not in CIDR notation",
                        ro.get("dst")
                    ));
                }
                if let Some(g) = ro.get("gw") {
                    if g.as_str().and_then(|s| s.parse::<IpAddr>().ok()).is_none() {
                        r.problems
                            .push(format!("routes[{i}].gw {g} is not an IP address"));
                    }
                }
                for k in ["mtu", "advmss", "priority", "table", "scope"] {
                    if let Some(x) = ro.get(k) {
                        if !v1_1 {
                            r.notes.push(format!("routes[{i}].{k} is a 1.1.0 field"));
                        } else if !uint(x) {
                            r.problems
                                .push(format!("routes[{i}].{k} is not an unsigned integer"));
                        }
                    }
                }
            }
        }
        Some(_) => r.problems.push("routes is not an array".into()),
    }

    match o.get("dns") {
        None => {}
        Some(Value::Object(d)) => {
            for k in ["nameservers", "search", "options"] {
                if let Some(x) = d.get(k) {
                    match x.as_array() {
                        Some(a) if a.iter().all(Value::is_string) => {}
                        _ => r
                            .problems
                            .push(format!("dns.{k} is not an array of strings")),
                    }
                }
            }
            if let Some(ns) = d.get("nameservers").and_then(Value::as_array) {
                for n in ns.iter().filter_map(Value::as_str) {
                    if n.parse::<IpAddr>().is_err() {
                        r.problems
                            .push(format!("dns.nameservers holds {n:?}, not an IP address"));
                    }
                }
            }
            if let Some(x) = d.get("domain") {
                if !x.is_string() {
                    r.problems.push("dns.domain is not a string".into());
                }
            }
        }
        Some(_) => r.problems.push("dns is not an object".into()),
    }
    r
}

/// The index and entry of the interface named `ifname` with a sandbox.
pub fn sandbox_iface<'a>(result: &'a Value, ifname: &str) -> Option<(usize, &'a Value)> {
    result
        .get("interfaces")?
        .as_array()?
        .iter()
        .enumerate()
        .find(|(_, i)| {
            i.get("name").and_then(Value::as_str) == Some(ifname)
                && i.get("sandbox")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
        })
}

/// The addresses (CIDR) the result gives the sandbox interface `ifname`: ips pointing at it, or,
/// when ips carry no interface index, all of them.
pub fn sandbox_addresses(result: &Value, ifname: &str) -> Vec<(IpAddr, u8)> {
    let idx = sandbox_iface(result, ifname).map(|(i, _)| i);
    let mut out = Vec::new();
    for ip in result
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let matches = match (ip.get("interface").and_then(Value::as_u64), idx) {
            (Some(n), Some(i)) => n as usize == i,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if matches {
            if let Some(c) = ip
                .get("address")
                .and_then(Value::as_str)
                .and_then(parse_cidr)
            {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn valid_results() {
        let r = json!({"cniVersion":"1.0.0","interfaces":[{"name":"veth1","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","sandbox":"/run/netns/x"}],
            "ips":[{"address":"10.0.0.2/24","gateway":"10.0.0.1","interface":1}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}});
        assert!(validate_result(&r, "1.0.0").problems.is_empty());
        let r4 = json!({"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.2/24"}]});
        assert!(validate_result(&r4, "0.4.0").problems.is_empty());
        assert_eq!(
            sandbox_addresses(&r, "eth0"),
            vec![("10.0.0.2".parse().unwrap(), 24)]
        );
    }

    #[test]
    fn invalid_results() {
        let bad = json!({"cniVersion":"1.0.0","interfaces":[{"mac":"zz"}],"ips":[{"address":"10.0.0.2","interface":5}],"routes":[{"gw":"x"}]});
        let p = validate_result(&bad, "1.0.0").problems;
        assert!(p.len() >= 5, "{p:?}");
        let r4 = json!({"cniVersion":"0.4.0","ips":[{"address":"10.0.0.2/24"}]});
        assert_eq!(validate_result(&r4, "0.4.0").problems.len(), 1);
        assert_eq!(
            validate_result(&r4, "1.0.0").problems.len(),
            1,
            "version mismatch"
        );
    }
}
