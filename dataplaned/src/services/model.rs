//! Objects → desired dataplane state. Pure: no maps, no I/O, so every rule is unit-tested.
//!
//! A Service port becomes a backend set (its ready endpoints, with the port resolved through the
//! EndpointSlices) and one frontend per IPv4 cluster IP. Rules (kube-proxy's):
//! - ExternalName and headless (clusterIP None) Services get no frontend; IPv6 is not handled yet.
//! - New flows go to endpoints that are ready (`ready` unset = true), terminating or not; when none
//!   is, to those that are serving and terminating (`serving` unset = true, `terminating` unset =
//!   false), as kube-proxy's CategorizeEndpoints does. Established TCP flows are never cut by an
//!   endpoint change; UDP flows to an endpoint that stops receiving new flows move on (the
//!   datapath re-checks them; see writer.rs).
//! - The backend port: the slice port with the Service port's name (Kubernetes names slice ports
//!   that way), else one named like a string targetPort, else a numeric targetPort, else the port.
//! - sessionAffinity ClientIP: timeoutSeconds, default 10800.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use super::objects::SERVICE_NAME_LABEL;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            _ => None,
        }
    }
    fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None, // SCTP: not handled by the datapath yet
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// A backend: pod IP and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// Identity of a backend set: one Service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SetKey {
    pub namespace: String,
    pub service: String,
    /// The Service port's name, or its number when unnamed.
    pub port: String,
    pub proto: Proto,
}

impl std::fmt::Display for SetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}:{}/{}",
            self.namespace,
            self.service,
            self.port,
            self.proto.name()
        )
    }
}

/// One endpoint as listed (for `sluicectl get endpoints`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct EndpointState {
    pub backend: Backend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}

impl EndpointState {
    /// Gets new flows when any endpoint is ready.
    pub fn usable(&self) -> bool {
        self.ready
    }

    /// Gets new flows when no endpoint is ready.
    pub fn fallback(&self) -> bool {
        !self.ready && self.serving && self.terminating
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackendSet {
    /// Receive new flows (sorted, distinct): the ready endpoints, or if there are none the
    /// serving+terminating ones.
    pub ready: Vec<Backend>,
    /// Keep their existing flows: every listed endpoint.
    pub present: BTreeSet<Backend>,
    pub endpoints: Vec<EndpointState>,
}

/// A frontend: where clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FrontendSpec {
    pub set: SetKey,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub sets: BTreeMap<SetKey, BackendSet>,
    pub frontends: BTreeMap<FrontendKey, FrontendSpec>,
}

impl Desired {
    pub fn vips(&self) -> BTreeSet<Ipv4Addr> {
        self.frontends.keys().map(|k| k.vip).collect()
    }
}

pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

pub fn desired<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Desired {
    // Slices by (namespace, service name).
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let ns = s
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        by_service.entry((ns, svc.clone())).or_default().push(s);
    }

    let mut out = Desired::default();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        let ns = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = svc.metadata.name.clone().unwrap_or_default();
        let vips: BTreeSet<Ipv4Addr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.iter())
            .filter_map(|ip| ip.parse::<Ipv4Addr>().ok())
            .collect();
        if vips.is_empty() {
            continue; // headless, or IPv6 only
        }
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map(|t| t as u32)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
        });
        let slices = by_service
            .get(&(ns.clone(), name.clone()))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for sp in spec.ports.iter().flatten() {
            let Some(proto) = Proto::parse(sp.protocol.as_deref()) else {
                tracing::warn!(service = %format!("{ns}/{name}"), port = sp.port, "SCTP ports are not handled; skipped");
                continue;
            };
            let port_name = sp.name.clone().unwrap_or_default();
            let set = SetKey {
                namespace: ns.clone(),
                service: name.clone(),
                port: if port_name.is_empty() {
                    sp.port.to_string()
                } else {
                    port_name.clone()
                },
                proto,
            };
            let mut endpoints = BTreeMap::new();
            for slice in slices {
                if slice.address_type != "IPv4" {
                    continue;
                }
                let Some(port) =
                    backend_port(slice, &port_name, proto, sp.target_port.as_ref(), sp.port)
                else {
                    continue;
                };
                for ep in &slice.endpoints {
                    let c = ep.conditions.clone().unwrap_or_default();
                    let ready = c.ready.unwrap_or(true);
                    let state = EndpointState {
                        backend: Backend {
                            ip: Ipv4Addr::UNSPECIFIED,
                            port,
                        },
                        ready,
                        serving: c.serving.unwrap_or(true),
                        terminating: c.terminating.unwrap_or(false),
                        node: ep.node_name.clone(),
                    };
                    for a in &ep.addresses {
                        let Ok(ip) = a.parse() else { continue };
                        let b = Backend { ip, port };
                        // Listed twice (two slices)? The more usable listing wins.
                        let e = endpoints.entry(b).or_insert(EndpointState {
                            backend: b,
                            ..state.clone()
                        });
                        if (state.usable() && !e.usable())
                            || (state.fallback() && !e.usable() && !e.fallback())
                        {
                            *e = EndpointState {
                                backend: b,
                                ..state.clone()
                            };
                        }
                    }
                }
            }
            let endpoints: Vec<EndpointState> = endpoints.into_values().collect();
            let any_ready = endpoints.iter().any(EndpointState::usable);
            let backend_set = BackendSet {
                ready: endpoints
                    .iter()
                    .filter(|e| if any_ready { e.usable() } else { e.fallback() })
                    .map(|e| e.backend)
                    .collect(),
                present: endpoints.iter().map(|e| e.backend).collect(),
                endpoints,
            };
            let Ok(port) = u16::try_from(sp.port) else {
                continue;
            };
            for vip in &vips {
                out.frontends.insert(
                    FrontendKey {
                        vip: *vip,
                        port,
                        proto,
                    },
                    FrontendSpec {
                        set: set.clone(),
                        affinity_timeout: affinity,
                    },
                );
            }
            out.sets.insert(set, backend_set);
        }
    }
    out
}

fn backend_port(
    slice: &EndpointSlice,
    port_name: &str,
    proto: Proto,
    target: Option<&IntOrString>,
    port: i32,
) -> Option<u16> {
    let ports = slice.ports.as_deref().unwrap_or(&[]);
    let find = |name: &str| {
        ports
            .iter()
            .find(|p| {
                p.name.as_deref().unwrap_or("") == name
                    && Proto::parse(p.protocol.as_deref()) == Some(proto)
            })
            .and_then(|p| p.port)
    };
    let resolved = find(port_name).or_else(|| match target {
        Some(IntOrString::String(n)) => find(n).or_else(|| n.parse().ok()),
        Some(IntOrString::Int(n)) => Some(*n),
        None => Some(port),
    });
    resolved
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::super::objects::parse;
    use super::*;

    fn desired_of(yaml: &str) -> Desired {
        crate::services::desired_of(&parse(yaml, "t").unwrap())
    }

    fn b(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: metrics, port: 9100, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: sctp, port: 99, protocol: SCTP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- {addresses: [10.244.0.5], conditions: {ready: true}}
- {addresses: [10.244.0.6]}
- {addresses: [10.244.0.7], conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.0.8], conditions: {ready: false}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-2, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.9], conditions: {ready: true}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}
addressType: IPv6
endpoints:
- {addresses: ["fd00::5"]}
"#;

    #[test]
    fn frontends_per_ipv4_cluster_ip_and_port() {
        let d = desired_of(SVC);
        let fes: Vec<String> = d
            .frontends
            .keys()
            .map(|k| format!("{}:{}/{}", k.vip, k.port, k.proto.name()))
            .collect();
        assert_eq!(
            fes,
            [
                "10.96.0.10:53/UDP",
                "10.96.0.10:80/TCP",
                "10.96.0.10:9100/TCP"
            ]
        );
    }

    #[test]
    fn endpoint_conditions_split_new_flows_from_kept_flows() {
        let d = desired_of(SVC);
        let http = &d.sets[&SetKey {
            namespace: "default".into(),
            service: "web".into(),
            port: "http".into(),
            proto: Proto::Tcp,
        }];
        assert_eq!(
            http.ready,
            vec![
                b("10.244.0.5", 8080),
                b("10.244.0.6", 8080),
                b("10.244.1.9", 8080)
            ]
        );
        assert_eq!(
            http.present.len(),
            5,
            "terminating and not-ready endpoints keep their flows"
        );
    }

    #[test]
    fn target_ports_resolve_by_slice_port_name_number_and_default() {
        let d = desired_of(SVC);
        let set = |port: &str, proto| {
            &d.sets[&SetKey {
                namespace: "default".into(),
                service: "web".into(),
                port: port.into(),
                proto,
            }]
        };
        assert_eq!(
            set("http", Proto::Tcp).ready[0].port,
            8080,
            "named targetPort via the slice port named like the service port"
        );
        assert_eq!(set("dns", Proto::Udp).ready[0].port, 5353);
        assert_eq!(
            set("metrics", Proto::Tcp).ready[0].port,
            9100,
            "numeric targetPort when the slice has no such port"
        );
    }

    #[test]
    fn target_port_name_resolves_through_a_slice_port_of_that_name() {
        let d = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80, targetPort: web}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}
addressType: IPv4
ports: [{name: web, port: 3000}]
endpoints: [{addresses: [10.244.0.9]}]
"#,
        );
        assert_eq!(
            d.sets.values().next().unwrap().ready,
            vec![b("10.244.0.9", 3000)]
        );
    }

    #[test]
    fn headless_external_name_and_unlinked_slices_get_nothing() {
        let d = desired_of(
            r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: other, namespace: elsewhere, labels: {kubernetes.io/service-name: empty}}
addressType: IPv4
endpoints: [{addresses: [10.244.0.9]}]
"#,
        );
        assert_eq!(d.frontends.len(), 1, "only 'empty' has a frontend");
        let set = d.sets.values().next().unwrap();
        assert!(
            set.ready.is_empty(),
            "a slice in another namespace does not count"
        );
    }

    #[test]
    fn affinity_default_and_explicit_timeout() {
        let d = desired_of("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, ports: [{port: 80}]}\n");
        assert_eq!(
            d.frontends.values().next().unwrap().affinity_timeout,
            Some(10800)
        );
        let d = desired_of("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}, ports: [{port: 80}]}\n");
        assert_eq!(
            d.frontends.values().next().unwrap().affinity_timeout,
            Some(30)
        );
        let d = desired_of("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n");
        assert_eq!(d.frontends.values().next().unwrap().affinity_timeout, None);
    }
}
