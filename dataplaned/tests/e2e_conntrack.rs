//! Conntrack correctness end to end (issue 7): port reuse between a pod's service flows and its
//! direct connections, reply-tuple clashes between frontends, IPv4 fragments both ways, kube-proxy's
//! terminating-endpoint rules, forged source addresses, and the ICMP reject with TX checksum offload
//! off. Real sluiced, plugin, cnitool and sockets in network namespaces.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A Service with one port and a slice whose endpoints are (ip, ready, serving, terminating).
fn service(name: &str, vip: &str, proto: &str, eps: &[(&str, bool, bool, bool)]) -> String {
    let endpoints: Vec<String> = eps
        .iter()
        .map(|(ip, ready, serving, term)| {
            format!("- {{addresses: [{ip}], conditions: {{ready: {ready}, serving: {serving}, terminating: {term}}}}}")
        })
        .collect();
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: ct}}
spec: {{clusterIP: {vip}, ports: [{{name: p, port: 80, targetPort: 8080, protocol: {proto}}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: ct, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: p, port: 8080, protocol: {proto}}}]
endpoints: {}
"#,
        if endpoints.is_empty() {
            "[]".to_string()
        } else {
            format!("\n{}", endpoints.join("\n"))
        }
    )
}

fn up(ip: &str) -> (&str, bool, bool, bool) {
    (ip, true, true, false)
}

/// A TCP server on 8080 answering each line with "<peer ip>:<peer port> <own ip>".
fn port_echo_server(ns: &Netns) -> Proc {
    let script = r#"
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(512)
def serve(c, a):
    me = c.getsockname()[0]
    f = c.makefile("rwb")
    try:
        for line in f:
            f.write(("%s:%d %s\n" % (a[0], a[1], me)).encode()); f.flush()
    except OSError:
        pass  # clients that reset their flows on purpose
    f.close(); c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#;
    tcp_python_server(ns, "port-echo", script, 8080).unwrap()
}

/// Runs a python client in `ns` and returns its stdout lines.
fn py(ns: &Netns, script: &str) -> Vec<String> {
    let out = run(ns.command("python3").args(["-c", script])).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

const CONNECT: &str = r#"
import socket
def conn(dst, port, src_port):
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(("0.0.0.0", src_port)); c.settimeout(3); c.connect((dst, port))
    return c
def ask(c):
    c.sendall(b"x\n"); f = c.makefile("rb"); return f.readline().decode().strip()
def close_both(c):
    # A graceful close both ways: our FIN, then the server's (EOF here means the datapath has
    # carried both), then the socket goes. A plain close() returns before the server's FIN.
    c.shutdown(socket.SHUT_WR)
    while c.recv(4096): pass
    c.close()
"#;

fn reason(node: &SluiceNode, name: &str) -> u64 {
    let s = node.status_json().unwrap();
    s["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["packets"].as_u64())
        .unwrap_or(0)
}

#[test]
fn a_direct_connection_from_a_port_a_service_flow_used_is_never_rewritten() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let backend = node.add_pod().unwrap();
    let _srv = port_echo_server(&backend.ns);
    node.apply(&service("one", "10.96.7.10", "TCP", &[up(&backend.ip)]))
        .unwrap();
    let b = &backend.ip;
    // Closed: a service connection from port 40000, closed gracefully, then the same port
    // straight to the backend. Live: the service connection stays open meanwhile.
    let lines = py(
        &client.ns,
        &format!(
            r#"{CONNECT}
c = conn("10.96.7.10", 80, 40000); print("via-vip", ask(c)); close_both(c)
d = conn("{b}", 8080, 40000); print("direct-after-close", ask(d)); d.close()
c = conn("10.96.7.10", 80, 40010); print("via-vip-live", ask(c))
d = conn("{b}", 8080, 40010); print("direct-while-live", ask(d))
print("vip-still", ask(c)); c.close(); d.close()
"#
        ),
    );
    let get = |tag: &str| -> String {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("{tag} ")))
            .unwrap_or_else(|| panic!("no {tag} in {lines:?}"))
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let c = &client.ip;
    assert_eq!(get("via-vip"), format!("{c}:40000"));
    assert_eq!(
        get("direct-after-close"),
        format!("{c}:40000"),
        "the closed service flow gave way: untranslated"
    );
    assert_eq!(get("via-vip-live"), format!("{c}:40010"));
    let live = get("direct-while-live");
    let port: u16 = live.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        live.starts_with(&format!("{c}:")) && (20000..=29999).contains(&port),
        "a direct connection clashing with a live service flow gets a translated port: {live}"
    );
    assert_eq!(get("vip-still"), format!("{c}:40010"));
    assert!(reason(&node, "direct_new_port_translated") >= 1);
}

#[test]
fn port_reuse_under_load_never_breaks_direct_connections() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let backend = node.add_pod().unwrap();
    let _srv = port_echo_server(&backend.ns);
    node.apply(&service("load", "10.96.7.11", "TCP", &[up(&backend.ip)]))
        .unwrap();
    // 300 service connections (reset at close, as a load generator does), then a direct
    // connection from each of their ports: every one must connect and see its own port.
    let b = &backend.ip;
    let lines = py(
        &client.ns,
        &format!(
            r#"{CONNECT}
import struct
ports = list(range(41000, 41300))
for p in ports:
    c = conn("10.96.7.11", 80, p); ask(c)
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
ok = 0
for p in ports:
    d = conn("{b}", 8080, p)
    if ask(d).split()[0].endswith(":%d" % p): ok += 1
    d.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); d.close()
print("ok", ok)
"#
        ),
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("ok 300"),
        "{lines:?}"
    );
}

#[test]
fn two_frontends_to_one_backend_from_the_same_client_port_are_both_served() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let backend = node.add_pod().unwrap();
    let _srv = port_echo_server(&backend.ns);
    node.apply(
        &(service("a", "10.96.7.20", "TCP", &[up(&backend.ip)])
            + &service("b", "10.96.7.21", "TCP", &[up(&backend.ip)])),
    )
    .unwrap();
    let lines = py(
        &client.ns,
        &format!(
            r#"{CONNECT}
a = conn("10.96.7.20", 80, 42000); print("a", ask(a))
b = conn("10.96.7.21", 80, 42000); print("b", ask(b))
print("a2", ask(a)); print("b2", ask(b))
"#
        ),
    );
    let seen: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(1).unwrap())
        .collect();
    assert_eq!(seen.len(), 4, "{lines:?}");
    assert_eq!(seen[0], format!("{}:42000", client.ip));
    assert_ne!(seen[1], seen[0], "the second flow's port is translated");
    assert!(
        seen[1].starts_with(&format!("{}:2", client.ip)),
        "{lines:?}"
    );
    assert_eq!((seen[2], seen[3]), (seen[0], seen[1]), "both keep working");
}

#[test]
fn udp_requests_and_replies_of_3000_bytes_cross_a_service_whole() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let backend = node.add_pod().unwrap();
    let _srv = Proc::spawn(
        "udp-big",
        backend
            .ns
            .command("python3")
            .args([
                "-c",
                r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 8080))
while True:
    d, a = s.recvfrom(65535)
    s.sendto(("%s %d " % (a[0], len(d))).encode().ljust(3000, b"r"), a)
"#,
            ])
            .stdout(std::process::Stdio::null()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    node.apply(&service("big", "10.96.7.30", "UDP", &[up(&backend.ip)]))
        .unwrap();
    let lines = py(
        &client.ns,
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
s.connect(("10.96.7.30", 80))
for i in range(3):
    s.send(b"q" * 3000)
    d = s.recv(65535)
    print(len(d), d[:40].decode().split()[0], d[:40].decode().split()[1])
"#,
    );
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(
            l,
            &format!("3000 {} 3000", client.ip),
            "a 3000-byte reply from the VIP, for a 3000-byte request from the client's IP"
        );
    }
    assert!(
        reason(&node, "nat_fragment") >= 6,
        "later fragments were NATed"
    );
}

#[test]
fn terminating_endpoints_follow_kube_proxy() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b1 = node.add_pod().unwrap();
    let b2 = node.add_pod().unwrap();
    let _s1 = echo_server(&b1.ns, 8080).unwrap();
    let _s2 = echo_server(&b2.ns, 8080).unwrap();
    let vip = "10.96.7.40";
    // ready + terminating (publishNotReadyAddresses while deleting) still gets new flows.
    node.apply(&service(
        "t",
        vip,
        "TCP",
        &[(&b1.ip, true, true, true), up(&b2.ip)],
    ))
    .unwrap();
    let got: std::collections::HashSet<String> = tcp_ask_many(&client.ns, vip, 80, 30)
        .unwrap()
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert!(
        got.contains(&b1.ip) && got.contains(&b2.ip),
        "ready+terminating gets new flows: {got:?}"
    );
    // A one-replica rolling update: the only endpoint is serving and terminating, not ready.
    node.apply(&service("t", vip, "TCP", &[(&b1.ip, false, true, true)]))
        .unwrap();
    let got = tcp_ask_many(&client.ns, vip, 80, 5).unwrap();
    assert!(
        got.iter().all(|(_, b)| *b == b1.ip),
        "no ready endpoint: the serving+terminating one gets new flows: {got:?}"
    );
    // Not serving either: nothing to send to, rejected at once.
    node.apply(&service("t", vip, "TCP", &[(&b1.ip, false, false, true)]))
        .unwrap();
    let lines = py(
        &client.ns,
        &format!(
            "import socket\ntry:\n    socket.create_connection(('{vip}', 80), 3); print('connected')\nexcept ConnectionRefusedError:\n    print('refused')\n"
        ),
    );
    assert_eq!(lines, ["refused"]);
}

#[test]
fn a_pod_forging_another_pods_address_is_dropped() {
    let node = SluiceNode::new().unwrap();
    let liar = node.add_pod().unwrap();
    let victim = node.add_pod().unwrap();
    let target = node.add_pod().unwrap();
    let _rx = Proc::spawn(
        "udp-listen",
        target
            .ns
            .command("python3")
            .args([
                "-c",
                "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', 9999))\nwhile True:\n    d, a = s.recvfrom(100); print(a[0], flush=True)\n",
            ])
            .stdout(std::process::Stdio::piped()),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = reason(&node, "drop_spoofed");
    // A raw UDP datagram from the victim's address, built by hand (IP_HDRINCL).
    py(
        &liar.ns,
        &format!(
            r#"
import socket, struct
src, dst = socket.inet_aton("{victim}"), socket.inet_aton("{target}")
udp = struct.pack("!HHHH", 5555, 9999, 8 + 5, 0) + b"forge"
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, src, dst)
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for _ in range(5): s.sendto(ip + udp, ("{target}", 0))
print("sent")
"#,
            victim = victim.ip,
            target = target.ip
        ),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        reason(&node, "drop_spoofed") - before,
        5,
        "every forged datagram dropped at the liar's veth"
    );
    // The liar's own address still works.
    let ok = py(
        &liar.ns,
        &format!(
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b'hi', ('{}', 9999)); print('ok')",
            target.ip
        ),
    );
    assert_eq!(ok, ["ok"]);
}

fn host_if(pod: &Pod) -> String {
    pod.result["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_reject_is_refused_at_once_with_tx_checksum_offload_off() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    node.apply(&service("none", "10.96.7.50", "TCP", &[]))
        .unwrap();
    // The host side completes checksums in software now: a CHECKSUM_PARTIAL SYN turned into
    // an ICMP error must survive that.
    run(node
        .ns
        .command("ethtool")
        .args(["-K", &host_if(&client), "tx", "off"]))
    .unwrap();
    for (label, pod_tx) in [("pod tx on", "on"), ("pod tx off", "off")] {
        run(client
            .ns
            .command("ethtool")
            .args(["-K", "eth0", "tx", pod_tx]))
        .unwrap();
        let t = Instant::now();
        let lines = py(
            &client.ns,
            "import socket\ntry:\n    socket.create_connection(('10.96.7.50', 80), 5); print('connected')\nexcept ConnectionRefusedError:\n    print('refused')\nexcept socket.timeout:\n    print('timeout')\n",
        );
        assert_eq!(lines, ["refused"], "{label}");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{label}: {:?}",
            t.elapsed()
        );
    }
    let flows: Value = node.get_json("conntrack").unwrap();
    assert_eq!(flows["flows"].as_array().unwrap().len(), 0);
}
