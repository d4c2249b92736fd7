//! Kubernetes objects in: `v1 Service`, `discovery.k8s.io/v1 EndpointSlice`, `v1 Node`, parsed
//! with k8s-openapi types from YAML or JSON (one or many documents, or a `List`), validated, and
//! reduced to the compact [`Spec`] the model keeps: the typed objects live only while one
//! document is parsed. Every error names the source, the document, the object and the field.
//!
//! Each parsed object also carries its document's text ([`Parsed::raw`]): that is what the store
//! persists (no re-serialisation), and what a restarted daemon parses and validates again.
//!
//! Speed (an apply of 20,000 objects is mostly parsing): YAML documents are split at their `---`
//! lines and parsed on two threads; a block-style document whose `apiVersion` and `kind` are
//! plain top-level lines is deserialised straight into its k8s-openapi type, others (and any
//! document that fails) go through a `serde_json::Value` first, which gives the canonical errors.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        match s {
            "Service" => Some(Kind::Service),
            "EndpointSlice" => Some(Kind::EndpointSlice),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }
}

/// Identity of an object: kind, namespace ("" for Nodes), name. Cheap to clone: the model and
/// the writer share its strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

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
    /// TCP when unset; None for SCTP (not handled by the datapath yet).
    pub fn parse(s: Option<&str>) -> Option<Proto> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }
}

/// What the model keeps of an object: the fields that shape the dataplane, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spec {
    Service(ServiceSpec),
    EndpointSlice(SliceSpec),
    Node(NodeSpec),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub type_: ServiceType,
    /// IPv4 `clusterIP`/`clusterIPs`, distinct and sorted; empty: headless (or IPv6 only).
    pub cluster_ips: Vec<Ipv4Addr>,
    /// TCP and UDP ports (SCTP ports are left out, with a warning at parse time).
    pub ports: Vec<ServicePort>,
    /// sessionAffinity ClientIP: its timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `spec.externalIPs` (IPv4).
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip` (IPv4).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    pub health_check_node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// "" when unnamed.
    pub name: Box<str>,
    /// The port's name, or its number when unnamed (how its backend set is named).
    pub id: Arc<str>,
    pub port: u16,
    pub proto: Proto,
    pub target: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Unset,
    Number(u16),
    /// A port name (or a number written as a string).
    Name(Box<str>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    Ipv4,
    Ipv6,
    Fqdn,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    /// The `kubernetes.io/service-name` label.
    pub service: Arc<str>,
    pub address_type: AddressType,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    /// "" when unset.
    pub name: Box<str>,
    /// None: SCTP.
    pub proto: Option<Proto>,
    pub port: Option<u16>,
}

/// One endpoint, its conditions resolved as kube-proxy does: `ready` and `serving` unset = true,
/// `terminating` unset = false.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<Arc<str>>,
    /// `hints.forZones[].name` (empty: no hints).
    pub zone_hints: Vec<Arc<str>>,
}

/// The label naming a Node's zone (topology hints are for it).
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeSpec {
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<Arc<str>>,
    /// `spec.podCIDRs` (or `spec.podCIDR`).
    pub pod_cidrs: Vec<Box<str>>,
    /// `status.addresses` of type InternalIP.
    pub internal_ips: Vec<IpAddr>,
}

/// One parsed, validated object.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub key: ObjectKey,
    pub spec: Spec,
    /// The object's own document (YAML or JSON), as persisted; parses back to this object.
    pub raw: String,
}

/// Where parsing or validation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: document {document}{}: {field}{}{message}",
    object.as_ref().map(|o| format!(" ({o})")).unwrap_or_default(),
    if field.is_empty() { "" } else { ": " })]
pub struct ObjectError {
    pub source_name: String,
    /// 1-based document number in the source.
    pub document: usize,
    pub object: Option<String>,
    pub field: String,
    pub message: String,
}

/// (object, field, message) of a failed document.
type ItemError = (Option<String>, String, String);

/// A document's failure: its 1-based number within its chunk, and what failed.
type ChunkError = (usize, ItemError);

/// Below this many documents, one thread parses them all.
const PARALLEL_MIN_DOCS: usize = 256;

/// Parses every document of `text` (YAML or JSON). Nothing is returned unless all are valid.
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Parsed>, ObjectError> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(2);
    parse_with(text, source_name, threads)
}

fn parse_with(text: &str, source_name: &str, threads: usize) -> Result<Vec<Parsed>, ObjectError> {
    let err = |document: usize, (object, field, message): ItemError| ObjectError {
        source_name: source_name.to_string(),
        document,
        object,
        field,
        message,
    };
    let first = text.trim_start().as_bytes().first().copied();
    if matches!(first, Some(b'{') | Some(b'[')) {
        // JSON (much faster to parse), unless it is YAML in flow style.
        if let Some(r) = parse_json(text) {
            return r.map_err(|(n, e)| err(n, e));
        }
    }
    let mut chunks = split_documents(text);
    // Text before the first `---` that is only comments is no document.
    if chunks.first().is_some_and(|c| {
        c.lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    }) {
        chunks.remove(0);
    }
    let results: Vec<Result<(Vec<Parsed>, usize), ChunkError>> =
        if threads < 2 || chunks.len() < PARALLEL_MIN_DOCS {
            chunks.iter().map(|c| parse_chunk(c)).collect()
        } else {
            let (a, b) = chunks.split_at(chunks.len() / 2);
            std::thread::scope(|s| {
                let second = s.spawn(|| b.iter().map(|c| parse_chunk(c)).collect::<Vec<_>>());
                let mut out: Vec<_> = a.iter().map(|c| parse_chunk(c)).collect();
                out.extend(second.join().expect("parser thread"));
                out
            })
        };
    let mut out = Vec::with_capacity(results.len());
    let mut docs_before = 0;
    for r in results {
        match r {
            Ok((objs, docs)) => {
                out.extend(objs);
                docs_before += docs;
            }
            Err((n, e)) => return Err(err(docs_before + n, e)),
        }
    }
    Ok(out)
}

/// Splits YAML text at document-start lines (`---` alone or followed by a space): each chunk
/// but the first begins with its marker. A `%` directive or a `...` end marker anywhere: one
/// chunk (serde_yaml then sees exactly what it was given).
fn split_documents(text: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let b = line.as_bytes();
        if b.first() == Some(&b'%') || b.starts_with(b"...") {
            return vec![text];
        }
        if b.starts_with(b"---") && matches!(b.get(3), None | Some(b' ' | b'\t' | b'\r' | b'\n')) {
            if at != 0 {
                starts.push(at);
            }
        }
        at += line.len();
    }
    starts.push(text.len());
    starts.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

/// The documents of one chunk, and how many there were (empty ones count, as serde_yaml counts
/// them).
fn parse_chunk(chunk: &str) -> Result<(Vec<Parsed>, usize), ChunkError> {
    if let Some(head) = plain_head(chunk) {
        if let Ok(p) = parse_typed(chunk, &head) {
            return Ok((vec![p], 1));
        }
    }
    let mut values = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(chunk).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| {
            (
                i + 1,
                (None, String::new(), format!("not valid YAML/JSON: {e}")),
            )
        })?;
        values.push(value);
    }
    let docs = values.len();
    let mut out = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        if value.is_null() {
            continue; // an empty document (e.g. a trailing ---)
        }
        // The chunk's text is the raw form of its document only when it holds just that one.
        let whole = (docs == 1).then_some(chunk);
        expand(value, whole, &mut out).map_err(|e| (i + 1, e))?;
    }
    Ok((out, docs))
}

/// JSON: one value or several concatenated, each an object or a List. None: not JSON (YAML
/// in flow style, or broken: the YAML parser words the error).
fn parse_json(text: &str) -> Option<Result<Vec<Parsed>, ChunkError>> {
    let values: Vec<Value> = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .ok()?;
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        if let Err(e) = expand(v, None, &mut out) {
            return Some(Err((i + 1, e)));
        }
    }
    Some(Ok(out))
}

/// One document's value: an object, or a `List` of them. `whole`: the document's own text, the
/// raw form of a document that is one object.
fn expand(value: Value, whole: Option<&str>, out: &mut Vec<Parsed>) -> Result<(), ItemError> {
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        let items = match value {
            Value::Object(mut m) => match m.remove("items") {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        for item in items {
            let raw = item.to_string();
            out.push(parse_value(item, raw)?);
        }
        return Ok(());
    }
    let raw = match whole {
        Some(text) => text.to_string(),
        None => value.to_string(),
    };
    out.push(parse_value(value, raw)?);
    Ok(())
}

/// `apiVersion` and `kind` of a block-style document that states them as plain top-level lines.
struct Head<'a> {
    api_version: &'a str,
    kind: Kind,
}

fn plain_head(chunk: &str) -> Option<Head<'_>> {
    let (mut api, mut kind) = (None, None);
    for line in chunk.lines() {
        let line = line.trim_end();
        if let Some(v) = line.strip_prefix("apiVersion:") {
            if api.replace(v.trim()).is_some() {
                return None;
            }
        } else if let Some(v) = line.strip_prefix("kind:") {
            if kind.replace(v.trim()).is_some() {
                return None;
            }
        }
    }
    let plain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'/')
    };
    let (api, kind) = (api?, kind?);
    if !plain(api) || !plain(kind) {
        return None;
    }
    let kind = Kind::from_name(kind)?;
    (api == api_version_of(kind)).then_some(Head {
        api_version: api,
        kind,
    })
}

fn api_version_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Service | Kind::Node => "v1",
        Kind::EndpointSlice => "discovery.k8s.io/v1",
    }
}

/// The fast path: the document straight into its type. Any failure: the caller takes the
/// canonical path, which words the error.
fn parse_typed(chunk: &str, head: &Head) -> Result<Parsed, ()> {
    debug_assert_eq!(head.api_version, api_version_of(head.kind));
    let de = serde_yaml::Deserializer::from_str(chunk);
    let typed = match head.kind {
        Kind::Service => Typed::Service(Service::deserialize(de).map_err(drop)?),
        Kind::EndpointSlice => Typed::EndpointSlice(EndpointSlice::deserialize(de).map_err(drop)?),
        Kind::Node => Typed::Node(Node::deserialize(de).map_err(drop)?),
    };
    finish(typed, chunk.to_string()).map_err(drop)
}

/// A typed object, as a document parses to or as the Kubernetes API serves it.
pub enum Typed {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

impl Typed {
    fn kind(&self) -> Kind {
        match self {
            Typed::Service(_) => Kind::Service,
            Typed::EndpointSlice(_) => Kind::EndpointSlice,
            Typed::Node(_) => Kind::Node,
        }
    }
    fn metadata(&self) -> &ObjectMeta {
        match self {
            Typed::Service(o) => &o.metadata,
            Typed::EndpointSlice(o) => &o.metadata,
            Typed::Node(o) => &o.metadata,
        }
    }
}

fn label(kind: &str, ns: &str, name: &str) -> String {
    if kind == "Node" {
        format!("{kind} {name}")
    } else {
        format!("{kind} {ns}/{name}")
    }
}

/// The canonical path: kind and names from the value, then the typed object.
fn parse_value(v: Value, raw: String) -> Result<Parsed, ItemError> {
    let str_at = |p: &str| v.pointer(p).and_then(Value::as_str).unwrap_or("");
    let api = str_at("/apiVersion").to_string();
    let kind_s = str_at("/kind").to_string();
    let name = str_at("/metadata/name").to_string();
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let kind = match (api.as_str(), kind_s.as_str()) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Node") => Kind::Node,
        ("", _) => return Err((None, "apiVersion".into(), "missing".into())),
        (_, "") => return Err((None, "kind".into(), "missing".into())),
        _ => {
            return Err((
                Some(label(&kind_s, &ns, &name)),
                "kind".into(),
                format!("unsupported {api} {kind_s}: sluice takes v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node"),
            ))
        }
    };
    let who = Some(label(&kind_s, &ns, &name));
    check_names(
        kind,
        &name,
        v.pointer("/metadata/namespace").map(|_| ns.as_str()),
    )
    .map_err(|(f, m)| (who.clone(), f, m))?;
    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
        // Path tracking costs an allocation per key: only when there is an error to word.
        T::deserialize(&v).or_else(|_| {
            serde_path_to_error::deserialize(v)
                .map_err(|e| (e.path().to_string(), e.inner().to_string()))
        })
    }
    let obj = match kind {
        Kind::Service => typed(v).map(Typed::Service),
        Kind::EndpointSlice => typed(v).map(Typed::EndpointSlice),
        Kind::Node => typed(v).map(Typed::Node),
    }
    .map_err(|(f, m)| (who.clone(), f, m))?;
    finish(obj, raw)
}

fn check_names(kind: Kind, name: &str, namespace: Option<&str>) -> Result<(), (String, String)> {
    if name.is_empty() {
        return Err(bad("metadata.name", "required"));
    }
    if !dns_subdomain(name) {
        return Err(bad("metadata.name", format!("{name:?} is not a DNS subdomain (lowercase letters, digits, '-', '.'; at most 253)")));
    }
    if let Some(ns) = namespace.filter(|_| kind != Kind::Node) {
        if !dns_label(ns) {
            return Err(bad(
                "metadata.namespace",
                format!("{ns:?} is not a DNS label (lowercase letters, digits, '-'; at most 63)"),
            ));
        }
    }
    Ok(())
}

/// An object from the Kubernetes API, validated and reduced as a document's object is (no raw
/// text: the API server, not sluice, keeps it).
pub fn from_object(obj: Typed, source_name: &str) -> Result<Parsed, ObjectError> {
    finish(obj, String::new()).map_err(|(object, field, message)| ObjectError {
        source_name: source_name.to_string(),
        document: 1,
        object,
        field,
        message,
    })
}

/// Validates a typed object and reduces it to its key and spec.
fn finish(obj: Typed, raw: String) -> Result<Parsed, ItemError> {
    let kind = obj.kind();
    let meta = obj.metadata();
    let name = meta.name.clone().unwrap_or_default();
    let namespace = match kind {
        Kind::Node => String::new(),
        _ => meta
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
    };
    let who = Some(label(kind.name(), &namespace, &name));
    check_names(kind, &name, meta.namespace.as_deref()).map_err(|(f, m)| (who.clone(), f, m))?;
    let spec = match &obj {
        Typed::Service(s) => validate_service(s).map(|()| Spec::Service(service_spec(s, &who))),
        Typed::EndpointSlice(e) => validate_slice(e).map(|()| Spec::EndpointSlice(slice_spec(e))),
        Typed::Node(n) => Ok(Spec::Node(node_spec(n))),
    }
    .map_err(|(f, m)| (who, f, m))?;
    Ok(Parsed {
        key: ObjectKey::new(kind, &namespace, &name),
        spec,
        raw,
    })
}

fn ipv4s<'a>(v: impl IntoIterator<Item = &'a String>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = v.into_iter().filter_map(|s| s.parse().ok()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

fn service_spec(s: &Service, who: &Option<String>) -> ServiceSpec {
    let spec = s.spec.as_ref().expect("validated: spec is set");
    let type_ = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        _ => ServiceType::ClusterIp,
    };
    let mut ports = Vec::new();
    for p in spec.ports.iter().flatten() {
        let Some(proto) = Proto::parse(p.protocol.as_deref()) else {
            tracing::warn!(
                service = who.as_deref().unwrap_or(""),
                port = p.port,
                "SCTP ports are not handled; skipped"
            );
            continue;
        };
        let name = p.name.as_deref().unwrap_or_default();
        ports.push(ServicePort {
            name: name.into(),
            id: if name.is_empty() {
                p.port.to_string().into()
            } else {
                name.into()
            },
            port: p.port as u16, // validated: 1..65535
            proto,
            target: match &p.target_port {
                None => TargetPort::Unset,
                Some(IntOrString::Int(n)) => TargetPort::Number(*n as u16),
                Some(IntOrString::String(n)) => TargetPort::Name(n.as_str().into()),
            },
            node_port: p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0),
        });
    }
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .map(|t| t as u32)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let lb = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    ServiceSpec {
        type_,
        cluster_ips: if type_ == ServiceType::ExternalName {
            Vec::new()
        } else {
            ipv4s(
                spec.cluster_ips
                    .iter()
                    .flatten()
                    .chain(spec.cluster_ip.iter()),
            )
        },
        ports,
        affinity_timeout,
        external_ips: ipv4s(spec.external_ips.iter().flatten()),
        // kube-proxy's rules: only VIP-mode ingress IPs are served on the node (`ipMode: Proxy`
        // means the load balancer must see the traffic); loadBalancerSourceRanges is not
        // enforced in BPF yet, so a Service that sets it gets no LoadBalancer frontends at all
        // (closed rather than open to every client), and is told so in the log.
        load_balancer_ips: if spec
            .load_balancer_source_ranges
            .as_ref()
            .is_some_and(|r| !r.is_empty())
        {
            tracing::warn!(
                service = who.as_deref().unwrap_or(""),
                "loadBalancerSourceRanges is not enforced yet: the LoadBalancer IPs of this Service are not served (its ClusterIPs and NodePorts are)"
            );
            Vec::new()
        } else {
            ipv4s(
                lb.into_iter()
                    .flatten()
                    .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                    .filter_map(|i| i.ip.as_ref()),
            )
        },
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        health_check_node_port: spec
            .health_check_node_port
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| *n != 0),
    }
}

/// sessionAffinity ClientIP's default timeout (seconds), as Kubernetes defaults it.
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10800;

fn slice_spec(e: &EndpointSlice) -> SliceSpec {
    let address_type = match e.address_type.as_str() {
        "IPv4" => AddressType::Ipv4,
        "IPv6" => AddressType::Ipv6,
        _ => AddressType::Fqdn,
    };
    SliceSpec {
        service: e
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .map(|s| s.as_str().into())
            .unwrap_or_default(),
        address_type,
        ports: e
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.clone().unwrap_or_default().into(),
                proto: Proto::parse(p.protocol.as_deref()),
                port: p
                    .port
                    .and_then(|n| u16::try_from(n).ok())
                    .filter(|n| *n != 0),
            })
            .collect(),
        endpoints: if address_type == AddressType::Fqdn {
            Vec::new()
        } else {
            e.endpoints
                .iter()
                .map(|ep| {
                    let c = ep.conditions.as_ref();
                    SliceEndpoint {
                        addresses: ep.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                        ready: c.and_then(|c| c.ready).unwrap_or(true),
                        serving: c.and_then(|c| c.serving).unwrap_or(true),
                        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                        node: ep.node_name.as_deref().map(Into::into),
                        zone_hints: ep
                            .hints
                            .as_ref()
                            .and_then(|h| h.for_zones.as_ref())
                            .into_iter()
                            .flatten()
                            .map(|z| z.name.as_str().into())
                            .collect(),
                    }
                })
                .collect()
        },
    }
}

fn node_spec(n: &Node) -> NodeSpec {
    let spec = n.spec.as_ref();
    let mut pod_cidrs: Vec<Box<str>> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .map(|c| c.as_str().into())
        .collect();
    if pod_cidrs.is_empty() {
        pod_cidrs.extend(spec.and_then(|s| s.pod_cidr.as_deref()).map(Into::into));
    }
    NodeSpec {
        zone: n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(ZONE_LABEL))
            .map(|z| z.as_str().into()),
        pod_cidrs,
        internal_ips: n
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect(),
    }
}

/// RFC 1123 label, as Kubernetes namespaces and Service names are.
fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain: dot-separated labels, at most 253 characters (object names).
fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

/// `f` is a field path, `m` the problem.
fn bad(f: impl Into<String>, m: impl Into<String>) -> (String, String) {
    (f.into(), m.into())
}

fn valid_port(p: i32) -> bool {
    (1..=65535).contains(&p)
}

/// Kubernetes' IANA_SVC_NAME: 1-15 lowercase alphanumerics or '-', with a letter.
fn valid_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn validate_service(s: &Service) -> Result<(), (String, String)> {
    let spec = s.spec.as_ref().ok_or_else(|| bad("spec", "required"))?;
    let ty = spec.type_.as_deref().unwrap_or("ClusterIP");
    if !["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"].contains(&ty) {
        return Err(bad(
            "spec.type",
            format!("{ty:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
        ));
    }
    let parse_ip = |f: String, ip: &str| -> Result<(), (String, String)> {
        if ip.is_empty() || ip == "None" || ip.parse::<IpAddr>().is_ok() {
            Ok(())
        } else {
            Err(bad(f, format!("{ip:?} is not an IP address or \"None\"")))
        }
    };
    if let Some(ip) = &spec.cluster_ip {
        parse_ip("spec.clusterIP".into(), ip)?;
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        parse_ip(format!("spec.clusterIPs[{i}]"), ip)?;
    }
    if let (Some(ip), Some(first)) = (
        &spec.cluster_ip,
        spec.cluster_ips.as_ref().and_then(|v| v.first()),
    ) {
        if !ip.is_empty() && ip != first {
            return Err(bad(
                "spec.clusterIPs[0]",
                format!("{first} differs from spec.clusterIP {ip}"),
            ));
        }
    }
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    for (i, p) in ports.iter().enumerate() {
        let f = |x: &str| format!("spec.ports[{i}].{x}");
        if !valid_port(p.port) {
            return Err(bad(f("port"), format!("{} is not in 1..65535", p.port)));
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            return Err(bad(
                f("protocol"),
                format!("{proto:?} is not TCP, UDP or SCTP"),
            ));
        }
        match &p.target_port {
            Some(IntOrString::Int(t)) if !valid_port(*t) => {
                return Err(bad(f("targetPort"), format!("{t} is not in 1..65535")))
            }
            Some(IntOrString::String(n))
                if !valid_port_name(n) && n.parse::<i32>().map(valid_port) != Ok(true) =>
            {
                return Err(bad(
                    f("targetPort"),
                    format!("{n:?} is neither a port number nor a port name"),
                ))
            }
            _ => {}
        }
        if ports.len() > 1 && p.name.as_deref().unwrap_or("").is_empty() {
            return Err(bad(f("name"), "required when a Service has several ports"));
        }
    }
    match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => {}
        "ClientIP" => {
            if let Some(t) = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
            {
                if !(1..=86400).contains(&t) {
                    return Err(bad(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is not in 1..86400"),
                    ));
                }
            }
        }
        other => {
            return Err(bad(
                "spec.sessionAffinity",
                format!("{other:?} is not None or ClientIP"),
            ))
        }
    }
    Ok(())
}

fn validate_slice(e: &EndpointSlice) -> Result<(), (String, String)> {
    let svc = e
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL));
    if svc.is_none_or(|s| s.is_empty()) {
        return Err(bad(
            format!("metadata.labels.{SERVICE_NAME_LABEL}"),
            "required: it names the slice's Service",
        ));
    }
    if !["IPv4", "IPv6", "FQDN"].contains(&e.address_type.as_str()) {
        return Err(bad(
            "addressType",
            format!("{:?} is not IPv4, IPv6 or FQDN", e.address_type),
        ));
    }
    for (i, ep) in e.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            return Err(bad(
                format!("endpoints[{i}].addresses"),
                "at least one address is required",
            ));
        }
        if e.address_type == "IPv4" {
            for (j, a) in ep.addresses.iter().enumerate() {
                if a.parse::<Ipv4Addr>().is_err() {
                    return Err(bad(
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IPv4 address"),
                    ));
                }
            }
        }
    }
    for (i, p) in e.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            if !valid_port(port) {
                return Err(bad(
                    format!("ports[{i}].port"),
                    format!("{port} is not in 1..65535"),
                ));
            }
        }
        let proto = p.protocol.as_deref().unwrap_or("TCP");
        if !["TCP", "UDP", "SCTP"].contains(&proto) {
            return Err(bad(
                format!("ports[{i}].protocol"),
                format!("{proto:?} is not TCP, UDP or SCTP"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP, targetPort: dns}]
  sessionAffinity: ClientIP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.244.0.5]
  conditions: {ready: true}
---
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
"#;

    #[test]
    fn yaml_documents_parse_into_typed_objects() {
        let objs = parse(GOOD, "good.yaml").unwrap();
        let keys: Vec<String> = objs.iter().map(|o| o.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "Service shop/web",
                "EndpointSlice shop/web-abc",
                "Node node-a"
            ]
        );
    }

    #[test]
    fn json_and_lists_parse_and_namespace_defaults() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Service","metadata":{"name":"a"},"spec":{"clusterIP":"10.96.0.1","ports":[{"port":80}]}},
            {"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}]}"#;
        let objs = parse(json, "x.json").unwrap();
        assert_eq!(&*objs[0].key.namespace, "default");
        assert_eq!(objs.len(), 2);
    }

    fn error_of(doc: &str) -> ObjectError {
        parse(doc, "f.yaml").unwrap_err()
    }

    #[test]
    fn errors_name_the_object_and_the_field() {
        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}]}\n");
        assert_eq!(e.object.as_deref(), Some("Service default/web"));
        assert_eq!(e.field, "spec.ports[0].port");
        assert!(
            e.to_string()
                .starts_with("f.yaml: document 1 (Service default/web): spec.ports[0].port: "),
            "{e}"
        );

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80, protocol: ICMP}]}\n");
        assert_eq!(e.field, "spec.ports[0].protocol");

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: \"eighty\"}]}\n");
        assert_eq!(
            e.field, "spec.ports[0].port",
            "type errors name the field too: {e}"
        );

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.300}\n");
        assert_eq!(e.field, "spec.clusterIP");

        let e = error_of("---\napiVersion: v1\nkind: Node\nmetadata: {name: a}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n");
        assert_eq!((e.document, e.field.as_str()), (2, "kind"));
        assert!(e.message.contains("unsupported apps/v1 Deployment"));

        let e = error_of("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n");
        assert_eq!(e.field, "metadata.labels.kubernetes.io/service-name");

        let e = error_of("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [fe80::1]}]\n");
        assert_eq!(e.field, "endpoints[0].addresses[0]");

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {}\nspec: {}\n");
        assert_eq!(e.field, "metadata.name");

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {ports: [{port: 1}, {port: 2}]}\n");
        assert_eq!(e.field, "spec.ports[0].name");

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}\n");
        assert_eq!(
            e.field,
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        );

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: a_b}\nspec: {}\n");
        assert_eq!(e.field, "metadata.name");
        let e = error_of(
            "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: ../x}\nspec: {}\n",
        );
        assert_eq!(e.field, "metadata.namespace");

        let e = error_of("kind: Service\nmetadata: {name: a}\n");
        assert_eq!(e.field, "apiVersion");

        let e = error_of("apiVersion: v1\nkind: Service\nmetadata: {name: a\n");
        assert!(e.message.contains("not valid YAML"), "{e}");
    }

    #[test]
    fn raw_documents_parse_back_to_the_same_objects() {
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"}}]}"#;
        for text in [GOOD, json] {
            for o in parse(text, "t").unwrap() {
                let back = parse(&o.raw, "raw").unwrap();
                assert_eq!(back, vec![o]);
            }
        }
    }

    #[test]
    fn the_fast_and_the_canonical_path_agree() {
        // Block style (typed directly) and flow style (through a Value) of the same objects.
        let block = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  namespace: x\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{name: p, port: 80, targetPort: web, protocol: UDP, nodePort: 30080}]\n  type: NodePort\n  externalTrafficPolicy: Local\n  externalIPs: [192.0.2.1]\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.9}]}}\n";
        let flow = "{apiVersion: v1, kind: Service, metadata: {name: a, namespace: x}, spec: {clusterIP: 10.96.0.1, ports: [{name: p, port: 80, targetPort: web, protocol: UDP, nodePort: 30080}], type: NodePort, externalTrafficPolicy: Local, externalIPs: [192.0.2.1]}, status: {loadBalancer: {ingress: [{ip: 192.0.2.9}]}}}\n";
        assert!(plain_head(block).is_some() && plain_head(flow).is_none());
        let (a, b) = (parse(block, "b").unwrap(), parse(flow, "f").unwrap());
        assert_eq!((&a[0].key, &a[0].spec), (&b[0].key, &b[0].spec));
        let Spec::Service(s) = &a[0].spec else {
            panic!()
        };
        assert_eq!(s.type_, ServiceType::NodePort);
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert_eq!(s.ports[0].target, TargetPort::Name("web".into()));
        assert!(s.external_local && !s.internal_local);
        assert_eq!(s.external_ips, ["192.0.2.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(
            s.load_balancer_ips,
            ["192.0.2.9".parse::<Ipv4Addr>().unwrap()]
        );
    }

    #[test]
    fn document_numbers_are_serde_yamls_however_the_text_is_split() {
        let bad =
            "apiVersion: v1\nkind: Service\nmetadata: {name: bad}\nspec: {ports: [{port: 0}]}\n";
        let node = "apiVersion: v1\nkind: Node\nmetadata: {name: n}\n";
        let cases = [
            (format!("{bad}"), 1),
            (format!("# comment\n---\n{bad}"), 1),
            (format!("---\n{node}---\n{bad}---\n"), 2),
            (format!("{node}---\n---\n{bad}"), 3),
            (format!("{node}--- \n{bad}"), 2),
            (format!("{node}...\n---\n{bad}"), 2),
        ];
        for (text, want) in cases {
            let e = parse(&text, "t").unwrap_err();
            assert_eq!(e.document, want, "{text:?}: {e}");
            assert_eq!(e.field, "spec.ports[0].port", "{text:?}: {e}");
        }
        // Many documents (parsed on two threads): still the right number.
        let mut text: String = (0..600)
            .map(|i| format!("---\napiVersion: v1\nkind: Node\nmetadata: {{name: n{i}}}\n"))
            .collect();
        assert_eq!(parse(&text, "t").unwrap().len(), 600);
        text.push_str(&format!("---\n{bad}"));
        text.push_str(&format!("---\n{node}"));
        assert_eq!(parse(&text, "t").unwrap_err().document, 601);
    }

    #[test]
    fn endpoint_conditions_default_as_kube_proxy_reads_them() {
        let objs = parse("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints:\n- {addresses: [10.0.0.1]}\n- {addresses: [10.0.0.2], conditions: {ready: false}}\n- {addresses: [10.0.0.3], conditions: {terminating: true}, nodeName: n1}\n", "t").unwrap();
        let Spec::EndpointSlice(s) = &objs[0].spec else {
            panic!()
        };
        let c: Vec<(bool, bool, bool)> = s
            .endpoints
            .iter()
            .map(|e| (e.ready, e.serving, e.terminating))
            .collect();
        assert_eq!(
            c,
            [
                (true, true, false),
                (false, true, false),
                (true, true, true)
            ]
        );
        assert_eq!(s.endpoints[2].node.as_deref(), Some("n1"));
        assert_eq!(&*s.service, "web");
    }
}

#[cfg(test)]
mod bench {
    use super::*;

    /// `SLUICE_PARSE_BENCH=FILE cargo test --release -p sluice-dataplaned --lib parse_bench -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn parse_bench() {
        let path = std::env::var("SLUICE_PARSE_BENCH").unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        let t = std::time::Instant::now();
        let chunks = split_documents(&text);
        eprintln!("split: {:?} ({} chunks)", t.elapsed(), chunks.len());
        let t = std::time::Instant::now();
        let mut n = 0;
        for c in &chunks {
            for doc in serde_yaml::Deserializer::from_str(c) {
                serde::de::IgnoredAny::deserialize(doc).unwrap();
                n += 1;
            }
        }
        eprintln!("yaml to IgnoredAny: {:?} ({n})", t.elapsed());
        let t = std::time::Instant::now();
        for c in &chunks {
            for doc in serde_yaml::Deserializer::from_str(c) {
                let _ = Value::deserialize(doc).unwrap();
            }
        }
        eprintln!("yaml to Value: {:?}", t.elapsed());
        let values: Vec<Value> = chunks
            .iter()
            .map(|c| Value::deserialize(serde_yaml::Deserializer::from_str(c)).unwrap())
            .collect();
        let t = std::time::Instant::now();
        for v in values {
            parse_value(v, String::new()).unwrap();
        }
        eprintln!("Value to typed, validated, spec: {:?}", t.elapsed());
        let json: Vec<String> = chunks
            .iter()
            .map(|c| {
                Value::deserialize(serde_yaml::Deserializer::from_str(c))
                    .unwrap()
                    .to_string()
            })
            .collect();
        let t = std::time::Instant::now();
        for j in &json {
            let _: Value = serde_json::from_str(j).unwrap();
        }
        eprintln!(
            "JSON text to Value: {:?} ({} bytes)",
            t.elapsed(),
            json.iter().map(|j| j.len()).sum::<usize>()
        );
        let t = std::time::Instant::now();
        let heads: Vec<_> = chunks.iter().map(|c| plain_head(c)).collect();
        eprintln!("heads: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        for (c, h) in chunks.iter().zip(&heads) {
            let de = serde_yaml::Deserializer::from_str(c);
            match h.as_ref().unwrap().kind {
                Kind::Service => drop(Service::deserialize(de).unwrap()),
                Kind::EndpointSlice => drop(EndpointSlice::deserialize(de).unwrap()),
                Kind::Node => drop(Node::deserialize(de).unwrap()),
            }
        }
        eprintln!("yaml to typed: {:?}", t.elapsed());
        let t = std::time::Instant::now();
        for c in &chunks {
            parse_chunk(c).unwrap();
        }
        eprintln!("parse_chunk (typed, validate, spec): {:?}", t.elapsed());
        for threads in [1, 2, 1, 2] {
            let t = std::time::Instant::now();
            let all = parse_with(&text, "bench", threads).unwrap();
            eprintln!(
                "parse ({threads} threads): {:?} ({} objects)",
                t.elapsed(),
                all.len()
            );
        }
    }
}
