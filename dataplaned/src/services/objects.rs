//! Kubernetes objects in: `v1 Service`, `discovery.k8s.io/v1 EndpointSlice`, `v1 Node`, parsed
//! with k8s-openapi types from YAML or JSON (one or many documents, or a `List`), and validated.
//! Every error names the source, the document, the object and the field.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
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
    fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::Node => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
        }
    }
}

/// Identity of an object: kind, namespace ("" for Nodes), name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{:?} {}", self.kind, self.name)
        } else {
            write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Node(Node),
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        let (kind, meta) = match self {
            Object::Service(o) => (Kind::Service, &o.metadata),
            Object::EndpointSlice(o) => (Kind::EndpointSlice, &o.metadata),
            Object::Node(o) => (Kind::Node, &o.metadata),
        };
        let namespace = match kind {
            Kind::Node => String::new(),
            _ => meta
                .namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".into()),
        };
        ObjectKey {
            kind,
            namespace,
            name: meta.name.clone().unwrap_or_default(),
        }
    }

    /// The object as JSON (for persistence), with apiVersion and kind.
    pub fn to_json(&self) -> Value {
        let (v, kind) = match self {
            Object::Service(o) => (serde_json::to_value(o), Kind::Service),
            Object::EndpointSlice(o) => (serde_json::to_value(o), Kind::EndpointSlice),
            Object::Node(o) => (serde_json::to_value(o), Kind::Node),
        };
        let mut v = v.expect("k8s object to JSON");
        v["apiVersion"] = Value::from(kind.api_version());
        v["kind"] = Value::from(format!("{kind:?}"));
        v
    }
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

/// Parses every document of `text` (YAML or JSON). Nothing is returned unless all are valid.
pub fn parse(text: &str, source_name: &str) -> Result<Vec<Object>, ObjectError> {
    let mut out = Vec::new();
    let err = |document: usize, object: Option<String>, field: &str, message: String| ObjectError {
        source_name: source_name.to_string(),
        document,
        object,
        field: field.to_string(),
        message,
    };
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = Value::deserialize(doc)
            .map_err(|e| err(n, None, "", format!("not valid YAML/JSON: {e}")))?;
        if value.is_null() {
            continue; // an empty document (e.g. a trailing ---)
        }
        let items = if value.get("kind").and_then(Value::as_str) == Some("List") {
            value
                .get("items")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        } else {
            vec![value]
        };
        for item in items {
            out.push(
                parse_one(item)
                    .map_err(|(object, field, message)| err(n, object, &field, message))?,
            );
        }
    }
    Ok(out)
}

type ItemError = (Option<String>, String, String);

fn parse_one(v: Value) -> Result<Object, ItemError> {
    let api = v
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let kind_s = v
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    let label = |k: &str| {
        if k == "Node" {
            format!("{k} {name}")
        } else {
            format!("{k} {ns}/{name}")
        }
    };
    let kind = match (api.as_str(), kind_s.as_str()) {
        ("v1", "Service") => Kind::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => Kind::EndpointSlice,
        ("v1", "Node") => Kind::Node,
        ("", _) => return Err((None, "apiVersion".into(), "missing".into())),
        (_, "") => return Err((None, "kind".into(), "missing".into())),
        _ => {
            return Err((
                Some(label(&kind_s)),
                "kind".into(),
                format!("unsupported {api} {kind_s}: sluice takes v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node"),
            ))
        }
    };
    let who = Some(label(&kind_s));
    if name.is_empty() {
        return Err((who, "metadata.name".into(), "required".into()));
    }
    if !dns_subdomain(&name) {
        return Err((who, "metadata.name".into(), format!("{name:?} is not a DNS subdomain (lowercase letters, digits, '-', '.'; at most 253)")));
    }
    if kind != Kind::Node && v.pointer("/metadata/namespace").is_some() && !dns_label(&ns) {
        return Err((
            who,
            "metadata.namespace".into(),
            format!("{ns:?} is not a DNS label (lowercase letters, digits, '-'; at most 63)"),
        ));
    }
    fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(v)
            .map_err(|e| (e.path().to_string(), e.inner().to_string()))
    }
    let obj = match kind {
        Kind::Service => Object::Service(typed(v).map_err(|(f, m)| (who.clone(), f, m))?),
        Kind::EndpointSlice => {
            Object::EndpointSlice(typed(v).map_err(|(f, m)| (who.clone(), f, m))?)
        }
        Kind::Node => Object::Node(typed(v).map_err(|(f, m)| (who.clone(), f, m))?),
    };
    validate(&obj).map_err(|(f, m)| (who, f, m))?;
    Ok(obj)
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

pub fn validate(obj: &Object) -> Result<(), (String, String)> {
    match obj {
        Object::Service(s) => validate_service(s),
        Object::EndpointSlice(e) => validate_slice(e),
        Object::Node(_) => Ok(()),
    }
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
        let keys: Vec<String> = objs.iter().map(|o| o.key().to_string()).collect();
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
        assert_eq!(objs[0].key().namespace, "default");
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
    fn objects_round_trip_through_json() {
        for o in parse(GOOD, "good.yaml").unwrap() {
            let back = parse(&o.to_json().to_string(), "j").unwrap();
            assert_eq!(back, vec![o]);
        }
    }
}
