//! The model: the objects in effect, keyed by Service (and by EndpointSlice within it), and for
//! each Service the dataplane state it wants. Pure: no maps, no I/O, so every rule is unit-tested.
//!
//! Incremental: [`Model::apply`] takes the objects that changed and returns the Services they
//! touch (a slice → its Service, before and after a label change; a Service → itself, and any
//! Service whose frontend it takes or gives back); only those are recomputed
//! ([`Model::desired`]) and diffed by the writer. Slices may come before their Service or outlive
//! it; nothing is recomputed for the others.
//!
//! A Service port becomes two backend sets, "cluster" (every usable endpoint) and "local" (the
//! usable endpoints on this node, picked out independently: kube-proxy's CategorizeEndpoints),
//! and frontends: one per IPv4 cluster IP, its nodePort (on every node address), each
//! LoadBalancer ingress IP and each external IP. Each backend is placed: on this node, or on the
//! node whose InternalIP remote flows are encapsulated to. Rules (kube-proxy's):
//! - ExternalName and headless (clusterIP None) Services get no frontend; IPv6 is not handled yet.
//! - New flows go to endpoints that are ready (`ready` unset = true), terminating or not; when none
//!   is, to those that are serving and terminating (`serving` unset = true, `terminating` unset =
//!   false), as kube-proxy's CategorizeEndpoints does. Established TCP flows are never cut by an
//!   endpoint change; UDP flows to an endpoint that stops receiving new flows move on (the
//!   datapath re-checks them; see writer.rs).
//! - The backend port: the slice port with the Service port's name (Kubernetes names slice ports
//!   that way), else one named like a string targetPort, else a numeric targetPort, else the port.
//! - An endpoint listed in several slices counts once, with its most usable listing.
//! - sessionAffinity ClientIP: timeoutSeconds, default 10800.
//! - An endpoint is on this node when its `nodeName` is this node's name; without a nodeName,
//!   when its IP is in this node's pod CIDR. A remote endpoint's node address: the InternalIP of
//!   the Node object its nodeName names, else of the Node whose podCIDR holds its IP, else
//!   unknown (external clients' flows to it are dropped, counted as `drop_no_node`).
//! - externalTrafficPolicy: Local applies to external frontends (NodePort, LoadBalancer IPs,
//!   external IPs) reached from outside; pods reaching them use the cluster set (kube-proxy's
//!   short-circuit). internalTrafficPolicy: Local applies to ClusterIPs reached from pods. With
//!   no local endpoint such traffic is dropped, as kube-proxy does.
//! - A Node object change that moves an address or pod CIDR recomputes every Service (rare; a
//!   node's endpoints could be anywhere).
//! - Two Services claiming one frontend (address, port, protocol; Kubernetes never allocates
//!   that, a hand-written file may): the Service first in namespace/name order gets it, the other
//!   is told in the log; when the first lets go, the other gets it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use serde::Serialize;

pub use super::objects::Proto;
use super::objects::{
    AddressType, Kind, ObjectKey, ServicePort, ServiceSpec, ServiceType, SliceSpec, Spec,
    TargetPort,
};
use super::{FastMap, FastSet};

/// A Service: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> ServiceKey {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port: its name (its number when unnamed) and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub name: Arc<str>,
    pub proto: Proto,
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.name, self.proto.name())
    }
}

/// A backend: pod IP and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// One endpoint as listed (for `sluicectl get endpoints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointState {
    pub backend: Backend,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    #[serde(serialize_with = "node_name")]
    pub node: Option<Arc<str>>,
    /// Zones its topology hints name (empty: none).
    #[serde(skip)]
    pub zone_hints: Vec<Arc<str>>,
}

fn node_name<S: serde::Serializer>(n: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(n.as_deref().unwrap_or_default())
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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendSet {
    /// Receive new flows (sorted, distinct): the ready endpoints, or if there are none the
    /// serving+terminating ones.
    pub ready: Vec<Backend>,
    /// Every listed endpoint (sorted by backend), usable or not.
    pub endpoints: Vec<EndpointState>,
}

/// A frontend: where clients connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FrontendKey {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.proto.name())
    }
}

/// What kind of address a frontend is. NodePorts have the address 0.0.0.0 (every node address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "ExternalIP",
        }
    }

    /// Served to clients outside the cluster, on the uplink.
    pub fn external(self) -> bool {
        self != FrontendKind::ClusterIp
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendSpec {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    /// sessionAffinity ClientIP timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// New flows use the local set only (externalTrafficPolicy: Local on an external frontend,
    /// internalTrafficPolicy: Local on a ClusterIP).
    pub local_only: bool,
}

/// Where a backend runs: this node, or the node address flows to it are encapsulated to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Placement {
    pub local: bool,
    /// The endpoint's node address (unspecified: unknown).
    pub node: Ipv4Addr,
}

/// What one Service port wants in the dataplane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortDesired {
    pub port: PortKey,
    /// Every usable endpoint (the cluster set).
    pub cluster: BackendSet,
    /// The usable endpoints on this node (sorted, distinct): the ready ones, or if none is, the
    /// serving+terminating ones.
    pub local: Vec<Backend>,
    /// Where each listed endpoint runs, sorted by backend.
    pub placement: Vec<(Backend, Placement)>,
    /// The frontends this Service holds (a frontend another Service holds is left out).
    pub frontends: Vec<FrontendSpec>,
}

impl PortDesired {
    pub fn placement_of(&self, b: &Backend) -> Placement {
        match self.placement.binary_search_by_key(b, |(x, _)| *x) {
            Ok(i) => self.placement[i].1,
            Err(_) => Placement {
                local: false,
                node: Ipv4Addr::UNSPECIFIED,
            },
        }
    }
}

/// What one Service wants; no ports: nothing (deleted, headless, ExternalName...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceDesired {
    pub ports: Vec<PortDesired>,
}

/// An object that changed in effect: what it was and what it is (None: absent).
#[derive(Debug, Clone)]
pub struct Change {
    pub key: ObjectKey,
    pub old: Option<Arc<Spec>>,
    pub new: Option<Arc<Spec>>,
}

#[derive(Debug, Default)]
struct ServiceEntry {
    spec: Option<Arc<Spec>>,
    /// Sorted by slice name (a Service has a few).
    slices: Vec<(Arc<str>, Arc<Spec>)>,
    /// The frontends this Service asked for when last recomputed.
    claimed: Vec<FrontendKey>,
}

impl ServiceEntry {
    fn service(&self) -> Option<&ServiceSpec> {
        match self.spec.as_deref() {
            Some(Spec::Service(s)) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, Default)]
pub struct Model {
    services: FastMap<ServiceKey, ServiceEntry>,
    /// Who asks for each frontend, sorted: the first holds it.
    claims: FastMap<FrontendKey, Vec<ServiceKey>>,
    /// Node objects (routes, node addresses and backend placement come from them).
    nodes: BTreeMap<String, Arc<Spec>>,
    /// What placement needs of each Node, parsed once when it changes.
    placing: BTreeMap<String, NodePlace>,
    /// This node's name, and the pod CIDR it allocates from (--pod-cidr, or its Node object's).
    local_node: Arc<str>,
    local_cidr: Option<(Ipv4Addr, u8)>,
}

fn slice_of(spec: &Option<Arc<Spec>>) -> Option<&SliceSpec> {
    match spec.as_deref() {
        Some(Spec::EndpointSlice(s)) => Some(s),
        _ => None,
    }
}

/// `a.b.c.d/n` as (network, prefix).
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, n) = s.split_once('/')?;
    let n: u8 = n.parse().ok().filter(|n| *n <= 32)?;
    Some((a.parse().ok()?, n))
}

fn cidr_holds((net, prefix): (Ipv4Addr, u8), ip: Ipv4Addr) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// A Node as endpoint placement sees it: its InternalIP and pod CIDRs.
#[derive(Debug, Clone)]
struct NodePlace {
    addr: Ipv4Addr,
    cidrs: Vec<(Ipv4Addr, u8)>,
}

impl NodePlace {
    fn of(n: &super::objects::NodeSpec) -> NodePlace {
        NodePlace {
            addr: first_v4(n).unwrap_or(Ipv4Addr::UNSPECIFIED),
            cidrs: n.pod_cidrs.iter().filter_map(|c| parse_cidr(c)).collect(),
        }
    }

    fn holds(&self, ip: Ipv4Addr) -> bool {
        self.cidrs.iter().any(|c| cidr_holds(*c, ip))
    }
}

fn node_of(spec: &Spec) -> Option<&super::objects::NodeSpec> {
    match spec {
        Spec::Node(n) => Some(n),
        _ => None,
    }
}

fn first_v4(n: &super::objects::NodeSpec) -> Option<Ipv4Addr> {
    n.internal_ips.iter().find_map(|a| match a {
        IpAddr::V4(v) => Some(*v),
        _ => None,
    })
}

impl Model {
    /// A model for node `name`, whose pods come from `cidr` unless its Node object says otherwise.
    pub fn for_node(name: &str, cidr: Option<(Ipv4Addr, u8)>) -> Model {
        Model {
            local_node: name.into(),
            local_cidr: cidr,
            ..Model::default()
        }
    }

    /// Where an endpoint runs.
    fn place(&self, ip: Ipv4Addr, node: Option<&str>) -> Placement {
        let own = self.placing.get(&*self.local_node);
        let local = match node {
            Some(n) => n == &*self.local_node,
            None => match own.filter(|o| !o.cidrs.is_empty()) {
                Some(o) => o.holds(ip),
                None => self.local_cidr.is_some_and(|c| cidr_holds(c, ip)),
            },
        };
        let at = if local {
            own
        } else {
            node.and_then(|n| self.placing.get(n))
                .or_else(|| self.placing.values().find(|n| n.holds(ip)))
        };
        Placement {
            local,
            node: at.map_or(Ipv4Addr::UNSPECIFIED, |n| n.addr),
        }
    }

    /// This node's zone, from its Node's label.
    fn own_zone(&self) -> Option<&str> {
        let spec = self.nodes.get(&*self.local_node)?;
        node_of(spec)?.zone.as_deref().filter(|z| !z.is_empty())
    }

    /// The Node objects in effect, by name.
    pub fn nodes(&self) -> Vec<(String, super::objects::NodeSpec)> {
        self.nodes
            .iter()
            .filter_map(|(name, spec)| match &**spec {
                Spec::Node(n) => Some((name.clone(), n.clone())),
                _ => None,
            })
            .collect()
    }

    /// Applies changed objects; returns the Services whose desired state may differ (sorted).
    pub fn apply(&mut self, changes: &[Change]) -> Vec<ServiceKey> {
        let mut touched: FastSet<ServiceKey> = FastSet::default();
        let mut nodes_moved = false;
        for c in changes {
            match c.key.kind {
                Kind::Service => {
                    let key = ServiceKey {
                        namespace: c.key.namespace.clone(),
                        name: c.key.name.clone(),
                    };
                    self.services.entry(key.clone()).or_default().spec = c.new.clone();
                    touched.insert(key);
                }
                Kind::EndpointSlice => {
                    let name = &c.key.name;
                    if let Some(old) = slice_of(&c.old) {
                        let key = ServiceKey {
                            namespace: c.key.namespace.clone(),
                            name: old.service.clone(),
                        };
                        if let Some(e) = self.services.get_mut(&key) {
                            e.slices.retain(|(n, _)| n != name);
                        }
                        touched.insert(key);
                    }
                    if let (Some(new), Some(spec)) = (slice_of(&c.new), &c.new) {
                        let key = ServiceKey {
                            namespace: c.key.namespace.clone(),
                            name: new.service.clone(),
                        };
                        let slices = &mut self.services.entry(key.clone()).or_default().slices;
                        match slices.binary_search_by(|(n, _)| n.cmp(name)) {
                            Ok(i) => slices[i].1 = spec.clone(),
                            Err(i) => slices.insert(i, (name.clone(), spec.clone())),
                        }
                        touched.insert(key);
                    }
                }
                Kind::Node => {
                    let old = c.old.as_deref().and_then(node_of);
                    let new = c.new.as_deref().and_then(node_of);
                    match (&c.new, new) {
                        (Some(n), Some(spec)) => {
                            self.nodes.insert(c.key.name.to_string(), n.clone());
                            self.placing
                                .insert(c.key.name.to_string(), NodePlace::of(spec));
                        }
                        _ => {
                            self.nodes.remove(&*c.key.name);
                            self.placing.remove(&*c.key.name);
                        }
                    }
                    nodes_moved |= old != new;
                }
            }
        }
        if nodes_moved {
            touched.extend(self.services.keys().cloned());
        }
        // Frontend claims follow the Services' specs; a change of holder touches both.
        let mut also = Vec::new();
        for key in &touched {
            let want = self
                .services
                .get(key)
                .and_then(ServiceEntry::service)
                .map(frontend_keys)
                .unwrap_or_default();
            let Some(entry) = self.services.get_mut(key) else {
                continue;
            };
            if entry.claimed == want {
                continue; // the common case: a slice changed, the Service's frontends did not
            }
            let had = std::mem::replace(&mut entry.claimed, want.clone());
            for fk in had.iter().filter(|k| !want.contains(k)) {
                if let Some(v) = self.claims.get_mut(fk) {
                    let was_first = v.first() == Some(key);
                    v.retain(|s| s != key);
                    if was_first {
                        also.extend(v.first().cloned());
                    }
                    if v.is_empty() {
                        self.claims.remove(fk);
                    }
                }
            }
            for fk in want.iter().filter(|k| !had.contains(k)) {
                let v = self.claims.entry(*fk).or_default();
                let pos = v.binary_search(key).unwrap_or_else(|p| p);
                v.insert(pos, key.clone());
                if v.len() > 1 {
                    let holder = &v[0];
                    if pos == 0 {
                        also.push(v[1].clone());
                    }
                    tracing::warn!(frontend = %fk, service = %key, holder = %holder,
                        "two Services claim one frontend: the first in namespace/name order holds it");
                }
            }
        }
        touched.extend(also);
        // Forget Services with nothing left (their desired state is empty: the writer clears them).
        for key in &touched {
            if self
                .services
                .get(key)
                .is_some_and(|e| e.spec.is_none() && e.slices.is_empty())
            {
                self.services.remove(key);
            }
        }
        let mut out: Vec<ServiceKey> = touched.into_iter().collect();
        out.sort_unstable();
        out
    }

    /// Every Service known (with a spec or only slices so far).
    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    pub fn service_count(&self) -> usize {
        self.services.values().filter(|e| e.spec.is_some()).count()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// A Service's health-check node port (kube-proxy's), with externalTrafficPolicy: Local
    /// and a healthCheckNodePort: the port and its ready endpoints on this node (distinct
    /// addresses over its ports).
    pub fn health_of(&self, key: &ServiceKey) -> Option<(u16, usize)> {
        let entry = self.services.get(key)?;
        let spec = entry.service()?;
        // kube-proxy's NeedsHealthCheck: type LoadBalancer with externalTrafficPolicy Local.
        let port = spec
            .health_check_node_port
            .filter(|_| spec.external_local && spec.type_ == ServiceType::LoadBalancer)?;
        let mut local: Vec<Ipv4Addr> = Vec::new();
        for (_, s) in &entry.slices {
            let Spec::EndpointSlice(slice) = &**s else {
                continue;
            };
            for ep in slice.endpoints.iter().filter(|e| e.ready) {
                for a in &ep.addresses {
                    let IpAddr::V4(ip) = a else { continue };
                    if self.place(*ip, ep.node.as_deref()).local && !local.contains(ip) {
                        local.push(*ip);
                    }
                }
            }
        }
        Some((port, local.len()))
    }

    fn holds(&self, fk: &FrontendKey, key: &ServiceKey) -> bool {
        self.claims.get(fk).and_then(|v| v.first()) == Some(key)
    }

    /// What a Service wants in the dataplane now.
    pub fn desired(&self, key: &ServiceKey) -> ServiceDesired {
        let Some(entry) = self.services.get(key) else {
            return ServiceDesired::default();
        };
        let Some(spec) = entry.service() else {
            return ServiceDesired::default();
        };
        if spec.cluster_ips.is_empty() {
            return ServiceDesired::default(); // headless, ExternalName or IPv6 only
        }
        let slices: Vec<&SliceSpec> = entry
            .slices
            .iter()
            .filter_map(|(_, s)| match &**s {
                Spec::EndpointSlice(s) if s.address_type == AddressType::Ipv4 => Some(s),
                _ => None,
            })
            .collect();
        let ports = spec
            .ports
            .iter()
            .map(|sp| {
                let mut cluster = backend_set(&slices, sp);
                if let Some(z) = self.own_zone() {
                    prefer_zone(&mut cluster, z);
                }
                let placement: Vec<(Backend, Placement)> = cluster
                    .endpoints
                    .iter()
                    .map(|e| (e.backend, self.place(e.backend.ip, e.node.as_deref())))
                    .collect();
                let local = usable(
                    cluster
                        .endpoints
                        .iter()
                        .zip(&placement)
                        .filter(|(_, (_, p))| p.local)
                        .map(|(e, _)| e),
                );
                PortDesired {
                    port: PortKey {
                        name: sp.id.clone(),
                        proto: sp.proto,
                    },
                    cluster,
                    local,
                    placement,
                    frontends: port_frontends(spec, sp)
                        .filter(|(fk, _)| self.holds(fk, key))
                        .filter({
                            let mut seen = Vec::new();
                            move |(fk, _)| {
                                let new = !seen.contains(fk);
                                seen.push(*fk);
                                new
                            }
                        })
                        .map(|(fk, kind)| FrontendSpec {
                            key: fk,
                            kind,
                            affinity_timeout: spec.affinity_timeout,
                            local_only: if kind.external() {
                                spec.external_local
                            } else {
                                spec.internal_local
                            },
                        })
                        .collect(),
                }
            })
            .collect();
        ServiceDesired { ports }
    }
}

/// The frontends of one Service port, with their kinds.
fn port_frontends<'a>(
    spec: &'a ServiceSpec,
    sp: &'a ServicePort,
) -> impl Iterator<Item = (FrontendKey, FrontendKind)> + 'a {
    let at = move |vip: Ipv4Addr, port: u16| FrontendKey {
        vip,
        port,
        proto: sp.proto,
    };
    let cluster = spec
        .cluster_ips
        .iter()
        .map(move |v| (at(*v, sp.port), FrontendKind::ClusterIp));
    let node_port = sp
        .node_port
        .map(|np| (at(Ipv4Addr::UNSPECIFIED, np), FrontendKind::NodePort));
    let lb = spec
        .load_balancer_ips
        .iter()
        .map(move |v| (at(*v, sp.port), FrontendKind::LoadBalancer));
    let ext = spec
        .external_ips
        .iter()
        .map(move |v| (at(*v, sp.port), FrontendKind::ExternalIp));
    cluster.chain(node_port).chain(lb).chain(ext)
}

/// The frontends a Service asks for.
fn frontend_keys(spec: &ServiceSpec) -> Vec<FrontendKey> {
    let mut out: Vec<FrontendKey> = spec
        .ports
        .iter()
        .flat_map(|sp| port_frontends(spec, sp).map(|(k, _)| k))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Topology hints, as kube-proxy reads them (pkg/proxy/topology.go): when every ready endpoint
/// has a zone hint and some are for this node's zone, new flows of the cluster set go only to
/// those (the serving+terminating fallback is narrowed the same way). Otherwise hints are
/// ignored. The local set (traffic policy Local) never looks at hints.
fn prefer_zone(set: &mut BackendSet, zone: &str) {
    let ready = || set.endpoints.iter().filter(|e| e.usable());
    let all_hinted = ready().next().is_some() && ready().all(|e| !e.zone_hints.is_empty());
    if !all_hinted || !ready().any(|e| e.zone_hints.iter().any(|z| &**z == zone)) {
        return;
    }
    set.ready = usable(
        set.endpoints
            .iter()
            .filter(|e| e.zone_hints.iter().any(|z| &**z == zone)),
    );
}

/// The endpoints that get new flows among `eps` (distinct, sorted by backend): the ready ones,
/// or if none is, the serving+terminating ones.
fn usable<'a>(eps: impl Iterator<Item = &'a EndpointState> + Clone) -> Vec<Backend> {
    let any_ready = eps.clone().any(EndpointState::usable);
    eps.filter(|e| if any_ready { e.usable() } else { e.fallback() })
        .map(|e| e.backend)
        .collect()
}

fn backend_set(slices: &[&SliceSpec], sp: &ServicePort) -> BackendSet {
    let mut endpoints: Vec<EndpointState> = Vec::new();
    for slice in slices {
        let Some(port) = backend_port(slice, sp) else {
            continue;
        };
        for ep in &slice.endpoints {
            for a in &ep.addresses {
                let IpAddr::V4(ip) = a else { continue };
                endpoints.push(EndpointState {
                    backend: Backend { ip: *ip, port },
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    node: ep.node.clone(),
                    zone_hints: ep.zone_hints.clone(),
                });
            }
        }
    }
    // Listed twice (two slices)? The more usable listing wins (stable: the first of equals).
    let rank = |e: &EndpointState| {
        if e.usable() {
            0
        } else if e.fallback() {
            1
        } else {
            2
        }
    };
    endpoints.sort_by_key(|e| (e.backend, rank(e)));
    endpoints.dedup_by_key(|e| e.backend);
    BackendSet {
        ready: usable(endpoints.iter()),
        endpoints,
    }
}

fn backend_port(slice: &SliceSpec, sp: &ServicePort) -> Option<u16> {
    let find = |name: &str| {
        slice
            .ports
            .iter()
            .find(|p| &*p.name == name && p.proto == Some(sp.proto))
            .and_then(|p| p.port)
    };
    find(&sp.name)
        .or_else(|| match &sp.target {
            TargetPort::Name(n) => find(n).or_else(|| n.parse().ok()),
            TargetPort::Number(n) => Some(*n),
            TargetPort::Unset => Some(sp.port),
        })
        .filter(|p| *p != 0)
}

#[cfg(test)]
pub mod testing {
    //! Building a model from YAML, as the store would feed it.
    use super::*;
    use crate::services::objects::parse;

    /// Every object of `yaml` as a change from nothing.
    pub fn changes(yaml: &str) -> Vec<Change> {
        parse(yaml, "t")
            .unwrap()
            .into_iter()
            .map(|p| Change {
                key: p.key,
                old: None,
                new: Some(Arc::new(p.spec)),
            })
            .collect()
    }

    pub fn model_of(yaml: &str) -> Model {
        let mut m = Model::default();
        m.apply(&changes(yaml));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn b(ip: &str, port: u16) -> Backend {
        Backend {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    fn web() -> ServiceKey {
        ServiceKey::new("default", "web")
    }

    fn port<'a>(d: &'a ServiceDesired, name: &str, proto: Proto) -> &'a PortDesired {
        d.ports
            .iter()
            .find(|p| &*p.port.name == name && p.port.proto == proto)
            .unwrap_or_else(|| panic!("no port {name}/{proto:?} in {d:?}"))
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
        let d = model_of(SVC).desired(&web());
        let mut fes: Vec<String> = d
            .ports
            .iter()
            .flat_map(|p| p.frontends.iter().map(|f| f.key.to_string()))
            .collect();
        fes.sort();
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
        let d = model_of(SVC).desired(&web());
        let http = port(&d, "http", Proto::Tcp);
        assert_eq!(
            http.cluster.ready,
            vec![
                b("10.244.0.5", 8080),
                b("10.244.0.6", 8080),
                b("10.244.1.9", 8080)
            ]
        );
        assert_eq!(
            http.cluster.endpoints.len(),
            5,
            "terminating and not-ready endpoints are listed"
        );
    }

    /// One Service with one slice whose endpoints carry the given conditions (YAML flow maps).
    fn one_slice(conditions: &[(&str, &str)]) -> ServiceDesired {
        let eps: String = conditions
            .iter()
            .map(|(ip, c)| format!("- {{addresses: [{ip}], conditions: {c}}}\n"))
            .collect();
        model_of(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints:\n{eps}")).desired(&web())
    }

    fn ready_ips(d: &ServiceDesired) -> Vec<String> {
        d.ports[0]
            .cluster
            .ready
            .iter()
            .map(|b| b.ip.to_string())
            .collect()
    }

    #[test]
    fn ready_and_terminating_endpoints_get_new_flows() {
        // A publishNotReadyAddresses Service whose pod is being deleted: ready and terminating.
        let d = one_slice(&[
            (
                "10.0.0.1",
                "{ready: true, serving: true, terminating: true}",
            ),
            ("10.0.0.2", "{ready: true}"),
            (
                "10.0.0.3",
                "{ready: false, serving: true, terminating: true}",
            ),
        ]);
        assert_eq!(
            ready_ips(&d),
            ["10.0.0.1", "10.0.0.2"],
            "ready counts, terminating or not; serving+terminating only as a fallback"
        );
    }

    #[test]
    fn all_terminating_falls_back_to_serving_and_terminating_endpoints() {
        // A one-replica rolling update: the old pod terminates before the new one is ready.
        let d = one_slice(&[
            (
                "10.0.0.1",
                "{ready: false, serving: true, terminating: true}",
            ),
            (
                "10.0.0.2",
                "{ready: false, serving: false, terminating: true}",
            ),
            ("10.0.0.3", "{ready: false}"),
        ]);
        assert_eq!(
            ready_ips(&d),
            ["10.0.0.1"],
            "only serving+terminating endpoints take new flows when none is ready"
        );
        let d = one_slice(&[(
            "10.0.0.2",
            "{ready: false, serving: false, terminating: true}",
        )]);
        assert!(ready_ips(&d).is_empty(), "not serving: rejected");
    }

    #[test]
    fn unset_conditions_read_as_ready_serving_not_terminating() {
        let d = one_slice(&[("10.0.0.1", "{}")]);
        assert_eq!(ready_ips(&d), ["10.0.0.1"], "ready unset = ready");
        // serving unset = true: a not-ready terminating endpoint with serving unset is a fallback.
        let d = one_slice(&[("10.0.0.1", "{ready: false, terminating: true}")]);
        assert_eq!(ready_ips(&d), ["10.0.0.1"], "serving unset = serving");
        // terminating unset = false: a not-ready, serving endpoint is not a fallback.
        let d = one_slice(&[("10.0.0.1", "{ready: false, serving: true}")]);
        assert!(
            ready_ips(&d).is_empty(),
            "terminating unset = not terminating"
        );
        let e = &d.ports[0].cluster.endpoints[0];
        assert_eq!((e.ready, e.serving, e.terminating), (false, true, false));
    }

    #[test]
    fn an_endpoint_in_two_slices_counts_once_with_its_most_usable_listing() {
        let m = model_of(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.1, ports: [{{port: 80, targetPort: 8080}}]}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: a, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.0.0.1], conditions: {{ready: false}}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: b, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.0.0.1]}}]\n"));
        let d = m.desired(&web());
        assert_eq!(d.ports[0].cluster.endpoints.len(), 1);
        assert_eq!(ready_ips(&d), ["10.0.0.1"]);
    }

    #[test]
    fn target_ports_resolve_by_slice_port_name_number_and_default() {
        let d = model_of(SVC).desired(&web());
        assert_eq!(
            port(&d, "http", Proto::Tcp).cluster.ready[0].port,
            8080,
            "named targetPort via the slice port named like the service port"
        );
        assert_eq!(port(&d, "dns", Proto::Udp).cluster.ready[0].port, 5353);
        assert_eq!(
            port(&d, "metrics", Proto::Tcp).cluster.ready[0].port,
            9100,
            "numeric targetPort when the slice has no such port"
        );
        assert!(
            !d.ports.iter().any(|p| &*p.port.name == "sctp"),
            "SCTP is skipped"
        );
    }

    #[test]
    fn target_port_name_resolves_through_a_slice_port_of_that_name() {
        let m = model_of(
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
        let d = m.desired(&ServiceKey::new("default", "a"));
        assert_eq!(d.ports[0].cluster.ready, vec![b("10.244.0.9", 3000)]);
        assert_eq!(
            &*d.ports[0].port.name, "80",
            "an unnamed port is named by its number"
        );
    }

    #[test]
    fn headless_external_name_and_unlinked_slices_get_nothing() {
        let m = model_of(
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
        let d = |n: &str| m.desired(&ServiceKey::new("default", n));
        assert!(d("headless").ports.is_empty() && d("ext").ports.is_empty());
        let empty = d("empty");
        assert_eq!(empty.ports[0].frontends.len(), 1);
        assert!(
            empty.ports[0].cluster.ready.is_empty(),
            "a slice in another namespace does not count"
        );
    }

    #[test]
    fn affinity_default_and_explicit_timeout() {
        let aff = |spec: &str| {
            model_of(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec: {{clusterIP: 10.96.0.1, {spec}ports: [{{port: 80}}]}}\n"
            ))
            .desired(&ServiceKey::new("default", "a"))
            .ports[0]
                .frontends[0]
                .affinity_timeout
        };
        assert_eq!(aff("sessionAffinity: ClientIP, "), Some(10800));
        assert_eq!(aff("sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 30}}, "), Some(30));
        assert_eq!(aff(""), None);
    }

    #[test]
    fn a_slice_change_touches_only_its_service_and_slices_may_come_first() {
        let mut m = Model::default();
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1]}]\n";
        assert_eq!(m.apply(&changes(slice)), [ServiceKey::new("default", "a")]);
        assert!(m.desired(&ServiceKey::new("default", "a")).ports.is_empty());
        let svcs: String = (0..50).map(|i| format!("---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}}}\nspec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80}}]}}\n")).collect();
        m.apply(&changes(&svcs));
        let touched = m.apply(&changes(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n",
        ));
        assert_eq!(touched, [ServiceKey::new("default", "a")]);
        assert_eq!(
            ready_ips(&m.desired(&ServiceKey::new("default", "a"))),
            ["10.0.0.1"],
            "the slice that came first counts"
        );
    }

    #[test]
    fn a_slice_moving_to_another_service_touches_both() {
        let mut m = model_of(&format!("{}---\n{}", "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n", "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}\n"));
        let to = |svc: &str| {
            changes(&format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, labels: {{kubernetes.io/service-name: {svc}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [10.0.0.1]}}]\n")).remove(0)
        };
        m.apply(&[to("a")]);
        let mut moved = to("b");
        moved.old = to("a").new;
        let touched = m.apply(&[moved]);
        assert_eq!(
            touched,
            [
                ServiceKey::new("default", "a"),
                ServiceKey::new("default", "b")
            ]
        );
        assert!(ready_ips(&m.desired(&ServiceKey::new("default", "a"))).is_empty());
        assert_eq!(
            ready_ips(&m.desired(&ServiceKey::new("default", "b"))),
            ["10.0.0.1"]
        );
    }

    #[test]
    fn two_services_on_one_frontend_the_first_holds_it_until_it_lets_go() {
        let svc = |name: &str, vip: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {vip}, ports: [{{port: 80}}]}}\n")
        };
        let mut m = model_of(&svc("b", "10.96.0.1"));
        let touched = m.apply(&changes(&svc("a", "10.96.0.1")));
        assert_eq!(
            touched,
            [
                ServiceKey::new("default", "a"),
                ServiceKey::new("default", "b")
            ],
            "the holder changes: both are recomputed"
        );
        let fes = |m: &Model, n: &str| {
            m.desired(&ServiceKey::new("default", n)).ports[0]
                .frontends
                .len()
        };
        assert_eq!((fes(&m, "a"), fes(&m, "b")), (1, 0));
        let touched = m.apply(&changes(&svc("a", "10.96.0.2")));
        assert_eq!(touched.len(), 2);
        assert_eq!((fes(&m, "a"), fes(&m, "b")), (1, 1), "b gets it back");
    }

    #[test]
    fn a_deleted_service_and_its_slices_leave_nothing() {
        let mut m = model_of(SVC);
        let gone: Vec<Change> = changes(SVC)
            .into_iter()
            .map(|c| Change {
                key: c.key,
                old: c.new,
                new: None,
            })
            .collect();
        assert_eq!(m.apply(&gone), [web()]);
        assert!(m.desired(&web()).ports.is_empty());
        assert_eq!(m.services().count(), 0);
        assert!(m.claims.is_empty());
    }

    const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lb, namespace: shop}
spec:
  type: LoadBalancer
  clusterIP: 10.96.5.5
  externalIPs: [192.0.2.10]
  externalTrafficPolicy: Local
  healthCheckNodePort: 32000
  internalTrafficPolicy: Local
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
status: {loadBalancer: {ingress: [{ip: 203.0.113.7}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: lb-1, namespace: shop, labels: {kubernetes.io/service-name: lb}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-a}
- {addresses: [10.244.1.6], nodeName: node-a, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.5], nodeName: node-b}
- {addresses: [10.244.2.6]}
- {addresses: [10.244.9.9], nodeName: node-gone}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
spec: {podCIDR: 10.244.1.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.77.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.77.2}]}
"#;

    fn model_on(node: &str, yaml: &str) -> Model {
        let mut m = Model::for_node(node, parse_cidr("10.244.1.0/24"));
        m.apply(&changes(yaml));
        m
    }

    #[test]
    fn zone_hints_count_only_when_every_ready_endpoint_has_one_and_this_zone_is_among_them() {
        let hinted = |eps: &str, zone: &str| {
            let yaml = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nendpoints:\n{eps}---\n\
                 apiVersion: v1\nkind: Node\nmetadata: {{name: node-a, labels: {{topology.kubernetes.io/zone: {zone}}}}}\nspec: {{podCIDR: 10.244.1.0/24}}\n"
            );
            let d = model_on("node-a", &yaml).desired(&web());
            let mut ips: Vec<String> = d.ports[0]
                .cluster
                .ready
                .iter()
                .map(|b| b.ip.to_string())
                .collect();
            ips.sort();
            ips
        };
        let eps = "- {addresses: [10.244.1.5], hints: {forZones: [{name: z1}]}}\n\
                   - {addresses: [10.244.2.5], hints: {forZones: [{name: z2}]}}\n\
                   - {addresses: [10.244.2.6], conditions: {ready: false}}\n";
        assert_eq!(
            hinted(eps, "z1"),
            ["10.244.1.5"],
            "this zone's endpoints only"
        );
        assert_eq!(hinted(eps, "z2"), ["10.244.2.5"]);
        assert_eq!(
            hinted(eps, "z3"),
            ["10.244.1.5", "10.244.2.5"],
            "no endpoint for this zone: hints ignored"
        );
        let partial = "- {addresses: [10.244.1.5], hints: {forZones: [{name: z1}]}}\n\
                       - {addresses: [10.244.2.5]}\n";
        assert_eq!(
            hinted(partial, "z1"),
            ["10.244.1.5", "10.244.2.5"],
            "a ready endpoint without a hint: hints ignored"
        );
    }

    fn shop_lb() -> ServiceKey {
        ServiceKey::new("shop", "lb")
    }

    #[test]
    fn nodeport_load_balancer_and_external_ips_are_frontends_with_their_policies() {
        let d = model_on("node-a", LB).desired(&shop_lb());
        let fes: Vec<(String, FrontendKind, bool)> = d.ports[0]
            .frontends
            .iter()
            .map(|f| (f.key.to_string(), f.kind, f.local_only))
            .collect();
        assert_eq!(
            fes,
            [
                (
                    "10.96.5.5:80/TCP".to_string(),
                    FrontendKind::ClusterIp,
                    true
                ),
                (
                    "0.0.0.0:30080/TCP".to_string(),
                    FrontendKind::NodePort,
                    true
                ),
                (
                    "203.0.113.7:80/TCP".to_string(),
                    FrontendKind::LoadBalancer,
                    true
                ),
                (
                    "192.0.2.10:80/TCP".to_string(),
                    FrontendKind::ExternalIp,
                    true
                ),
            ]
        );
    }

    #[test]
    fn endpoints_are_placed_by_node_name_then_pod_cidr() {
        let d = model_on("node-a", LB).desired(&shop_lb());
        let p = &d.ports[0];
        let at = |ip: &str| p.placement_of(&b(ip, 8080));
        let a: Ipv4Addr = "192.168.77.1".parse().unwrap();
        let bn: Ipv4Addr = "192.168.77.2".parse().unwrap();
        assert_eq!(
            at("10.244.1.5"),
            Placement {
                local: true,
                node: a
            }
        );
        assert_eq!(
            at("10.244.2.5"),
            Placement {
                local: false,
                node: bn
            }
        );
        // No nodeName: the Node whose podCIDR holds it.
        assert_eq!(
            at("10.244.2.6"),
            Placement {
                local: false,
                node: bn
            }
        );
        // A nodeName no Node object has, outside every pod CIDR: unknown.
        assert_eq!(
            at("10.244.9.9"),
            Placement {
                local: false,
                node: Ipv4Addr::UNSPECIFIED
            }
        );
        // The cluster set has every ready endpoint; the local set this node's ready ones.
        assert_eq!(p.cluster.ready.len(), 4);
        assert_eq!(p.local, vec![b("10.244.1.5", 8080)]);
    }

    #[test]
    fn the_local_set_falls_back_to_terminating_endpoints_on_its_own() {
        // node-a's only ready endpoint goes away: its serving+terminating one takes new local
        // flows, while the cluster set still has ready endpoints elsewhere (kube-proxy).
        let yaml = LB.replace(
            "- {addresses: [10.244.1.5], nodeName: node-a}\n",
            "- {addresses: [10.244.1.5], nodeName: node-a, conditions: {ready: false}}\n",
        );
        let d = model_on("node-a", &yaml).desired(&shop_lb());
        assert_eq!(d.ports[0].local, vec![b("10.244.1.6", 8080)]);
        assert!(!d.ports[0].cluster.ready.contains(&b("10.244.1.6", 8080)));
        // On node-b: its two ready endpoints (by name, and by pod CIDR without one).
        let d = model_on("node-b", LB).desired(&shop_lb());
        assert_eq!(
            d.ports[0].local,
            vec![b("10.244.2.5", 8080), b("10.244.2.6", 8080)]
        );
    }

    #[test]
    fn health_checks_count_ready_local_endpoints() {
        assert_eq!(
            model_on("node-a", LB).health_of(&shop_lb()),
            Some((32000, 1))
        );
        assert_eq!(
            model_on("node-b", LB).health_of(&shop_lb()),
            Some((32000, 2))
        );
        assert_eq!(
            model_on("node-c", LB).health_of(&shop_lb()),
            Some((32000, 0))
        );
        let cluster = LB.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        );
        assert_eq!(model_on("node-a", &cluster).health_of(&shop_lb()), None);
    }

    #[test]
    fn a_node_that_moves_recomputes_the_services() {
        let mut m = model_on("node-a", LB);
        let moved = r#"
apiVersion: v1
kind: Node
metadata: {name: node-b}
spec: {podCIDR: 10.244.2.0/24}
status: {addresses: [{type: InternalIP, address: 192.168.77.20}]}
"#;
        let mut c = changes(moved);
        c[0].old = Some(Arc::new(
            crate::services::objects::parse(LB, "t").unwrap()[3]
                .spec
                .clone(),
        ));
        assert_eq!(m.apply(&c), vec![shop_lb()]);
        let d = m.desired(&shop_lb());
        assert_eq!(
            d.ports[0].placement_of(&b("10.244.2.5", 8080)).node,
            "192.168.77.20".parse::<Ipv4Addr>().unwrap()
        );
    }
}
