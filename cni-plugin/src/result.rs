//! CNI results: building ADD's, reading prevResult for CHECK, versions 0.4.0 to 1.1.0.

use std::net::Ipv4Addr;

use serde_json::{json, Map, Value};

use crate::error::{err, Code, Result};

/// What ADD set up, in result terms.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    pub host_ifname: String,
    pub host_mac: String,
    pub ifname: String,
    pub pod_mac: String,
    pub netns: String,
    pub mtu: u32,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// The default route through this interface is ours (false for a pod's second interface).
    pub default_route: bool,
}

fn array(v: Option<&Value>, key: &str) -> Vec<Value> {
    v.and_then(|v| v.get(key))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// The ADD result: prevResult (if any) with our interfaces, address and route appended, in the
/// config's own cniVersion.
pub fn add_result(cni_version: &str, prev: Option<&Value>, pod: &PodNetwork) -> Value {
    let v1_1 = crate::spec::version_tuple(cni_version) >= (1, 1, 0);
    let mut interfaces = array(prev, "interfaces");
    let mut ips = array(prev, "ips");
    let mut routes = array(prev, "routes");
    let dns = prev
        .and_then(|p| p.get("dns"))
        .cloned()
        .unwrap_or_else(|| json!({}));

    let mut host = json!({"name": pod.host_ifname, "mac": pod.host_mac});
    let mut inner = json!({"name": pod.ifname, "mac": pod.pod_mac, "sandbox": pod.netns});
    if v1_1 {
        host["mtu"] = json!(pod.mtu);
        inner["mtu"] = json!(pod.mtu);
    }
    interfaces.push(host);
    interfaces.push(inner);
    let pod_index = interfaces.len() - 1;
    ips.push(json!({
        "address": format!("{}/32", pod.ip),
        "gateway": pod.gateway.to_string(),
        "interface": pod_index,
    }));
    if pod.default_route {
        routes.push(json!({"dst": "0.0.0.0/0", "gw": pod.gateway.to_string()}));
    }

    // 0.4.0 marks each IP with its family; 1.x dropped the field.
    for ip in &mut ips {
        if let Some(o) = ip.as_object_mut() {
            if cni_version == "0.4.0" {
                let six = o
                    .get("address")
                    .and_then(Value::as_str)
                    .is_some_and(|a| a.contains(':'));
                o.entry("version")
                    .or_insert(json!(if six { "6" } else { "4" }));
            } else {
                o.remove("version");
            }
        }
    }
    let mut out = Map::new();
    out.insert("cniVersion".into(), json!(cni_version));
    out.insert("interfaces".into(), Value::Array(interfaces));
    out.insert("ips".into(), Value::Array(ips));
    out.insert("routes".into(), Value::Array(routes));
    out.insert("dns".into(), dns);
    Value::Object(out)
}

/// What CHECK compares reality with: our interface's entry in prevResult.
#[derive(Debug, Clone)]
pub struct Expected {
    pub mac: Option<String>,
    pub ips: Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>,
    pub routes: Vec<(Ipv4Addr, u8, Option<Ipv4Addr>)>,
}

pub fn expected_from_prev(prev: &Value, ifname: &str) -> Result<Expected> {
    let bad = |what: &str| err(Code::InvalidConfig, format!("prevResult: {what}"));
    let interfaces = array(Some(prev), "interfaces");
    let index = interfaces
        .iter()
        .position(|i| {
            i.get("name").and_then(Value::as_str) == Some(ifname)
                && i.get("sandbox")
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
        })
        .ok_or_else(|| bad(&format!("no interface {ifname} in a sandbox")))?;
    let mac = interfaces[index]
        .get("mac")
        .and_then(Value::as_str)
        .map(str::to_lowercase);
    let mut ips = Vec::new();
    for ip in array(Some(prev), "ips") {
        if ip.get("interface").and_then(Value::as_u64) != Some(index as u64) {
            continue;
        }
        let addr = ip
            .get("address")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("ip without address"))?;
        let (a, p) = parse_cidr(addr).ok_or_else(|| bad(&format!("address {addr:?}")))?;
        let gw = ip
            .get("gateway")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        ips.push((a, p, gw));
    }
    let mut routes = Vec::new();
    for r in array(Some(prev), "routes") {
        let dst = r
            .get("dst")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("route without dst"))?;
        // IPv6 routes of other plugins are not ours to check.
        let Some((d, p)) = parse_cidr(dst) else {
            continue;
        };
        let gw = r
            .get("gw")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        routes.push((d, p, gw));
    }
    Ok(Expected { mac, ips, routes })
}

pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = s.split_once('/')?;
    let p: u8 = p.parse().ok()?;
    (p <= 32).then_some(())?;
    Some((a.parse().ok()?, p))
}
