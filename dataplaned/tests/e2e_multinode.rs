//! Multi-node end to end: two sluice nodes and an external client on one L2 fabric (a Linux
//! bridge in its own netns), each node with its own sluiced, pods added with the real plugin and
//! cnitool, and real TCP/UDP from python sockets. Every backend answers with the client address
//! it saw, so "no SNAT" is checked by what the backend itself reports.
//!
//! One cluster per topology serves many checks (see `multinode::Checks`): each check runs and
//! reports `ok`/`FAIL` with its name on stderr, and the test fails at the end listing every
//! failed check.

mod common;
mod multinode;

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context, Result};
use common::*;
use multinode::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Objects

/// One Service port with its EndpointSlice: what the tests vary.
#[derive(Clone)]
struct Svc<'a> {
    name: &'a str,
    type_: &'a str,
    cluster_ip: &'a str,
    proto: &'a str,
    port: u16,
    target: u16,
    node_port: Option<u16>,
    etp_local: bool,
    health_check_node_port: Option<u16>,
    itp_local: bool,
    external_ips: Vec<&'a str>,
    lb_ips: Vec<&'a str>,
    /// (endpoint IP, nodeName)
    endpoints: Vec<(String, &'a str)>,
}

impl<'a> Svc<'a> {
    fn new(name: &'a str, type_: &'a str, cluster_ip: &'a str) -> Svc<'a> {
        Svc {
            name,
            type_,
            cluster_ip,
            proto: "TCP",
            port: 80,
            target: 8080,
            node_port: None,
            etp_local: false,
            health_check_node_port: None,
            itp_local: false,
            external_ips: vec![],
            lb_ips: vec![],
            endpoints: vec![],
        }
    }
    fn node_port(mut self, p: u16) -> Self {
        self.node_port = Some(p);
        self
    }
    fn ports(mut self, proto: &'a str, port: u16, target: u16) -> Self {
        self.proto = proto;
        self.port = port;
        self.target = target;
        self
    }
    fn ep(mut self, ip: &str, node: &'a str) -> Self {
        self.endpoints.push((ip.to_string(), node));
        self
    }

    fn yaml(&self) -> String {
        let mut port = format!(
            "{{name: p, port: {}, targetPort: {}, protocol: {}",
            self.port, self.target, self.proto
        );
        if let Some(np) = self.node_port {
            let _ = write!(port, ", nodePort: {np}");
        }
        port.push('}');
        let mut spec = format!(
            "  type: {}\n  clusterIP: {}\n  ports: [{port}]\n",
            self.type_, self.cluster_ip
        );
        if self.etp_local {
            spec.push_str("  externalTrafficPolicy: Local\n");
        }
        if let Some(h) = self.health_check_node_port {
            let _ = writeln!(spec, "  healthCheckNodePort: {h}");
        }
        if self.itp_local {
            spec.push_str("  internalTrafficPolicy: Local\n");
        }
        if !self.external_ips.is_empty() {
            let _ = writeln!(spec, "  externalIPs: [{}]", self.external_ips.join(", "));
        }
        let status = if self.lb_ips.is_empty() {
            String::new()
        } else {
            let ing: Vec<String> = self
                .lb_ips
                .iter()
                .map(|ip| format!("{{ip: {ip}}}"))
                .collect();
            format!(
                "status: {{loadBalancer: {{ingress: [{}]}}}}\n",
                ing.join(", ")
            )
        };
        let eps: Vec<String> = self
            .endpoints
            .iter()
            .map(|(ip, node)| {
                format!("- {{addresses: [{ip}], nodeName: {node}, conditions: {{ready: true, serving: true, terminating: false}}}}")
            })
            .collect();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\nspec:\n{spec}{status}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: p, port: {target}, protocol: {proto}}}]\nendpoints: {eps}\n",
            name = self.name,
            target = self.target,
            proto = self.proto,
            eps = if eps.is_empty() {
                "[]".to_string()
            } else {
                format!("\n{}", eps.join("\n"))
            }
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Clients and servers

/// One TCP request/response from `ns` to addr:port within `timeout`: (client IP the echo server
/// saw, the server's own IP), or why it failed ("timed out", "refused", ...).
fn tcp_try(ns: &Netns, addr: &str, port: u16, timeout: Duration) -> Result<(String, String)> {
    let script = format!(
        r#"
import socket, sys
try:
    c = socket.create_connection(('{addr}', {port}), {t})
    c.settimeout({t})
    c.sendall(b'hi\n')
    line = c.makefile().readline()
    if not line:
        print('ERR closed without an answer'); sys.exit(0)
    print('OK ' + line.strip())
except socket.timeout:
    print('ERR timed out')
except ConnectionRefusedError:
    print('ERR refused')
except OSError as e:
    print('ERR ' + str(e))
"#,
        t = timeout.as_secs_f64()
    );
    let out = run(ns
        .command("python3")
        .args(["-c", &script])
        .stderr(Stdio::piped()))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.strip_prefix("OK ") {
        Some(rest) => {
            let mut it = rest.split_whitespace();
            Ok((
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
            ))
        }
        None => bail!(
            "TCP {addr}:{port} from {}: {}",
            ns.name,
            text.trim_start_matches("ERR ")
        ),
    }
}

/// Asserts a TCP exchange from `ns` to addr:port gets an answer from `backend` that saw `client`.
fn expect_tcp(ns: &Netns, addr: &str, port: u16, client: &str, backend: &str) -> Result<()> {
    let (seen, server) = tcp_try(ns, addr, port, Duration::from_secs(3))?;
    ensure!(
        server == backend,
        "{addr}:{port} was answered by {server}, want backend {backend}"
    );
    ensure!(
        seen == client,
        "backend {backend} saw client {seen}, want {client} (the client's own IP: no SNAT)"
    );
    Ok(())
}

/// Asserts a TCP exchange from `ns` to addr:port fails (dropped or refused): the reason.
fn expect_tcp_fails(ns: &Netns, addr: &str, port: u16) -> Result<String> {
    match tcp_try(ns, addr, port, Duration::from_millis(1500)) {
        Ok((seen, server)) => {
            bail!("{addr}:{port} answered (backend {server} saw {seen}); want no connection")
        }
        Err(e) => Ok(format!("{e:#}")),
    }
}

/// One UDP request/response within 3 s: (client IP seen, server IP), or why not.
fn udp_try(ns: &Netns, addr: &str, port: u16) -> Result<(String, String)> {
    let script = format!(
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
s.connect(('{addr}', {port}))
for i in range(3):
    try:
        s.send(b'q'); print('OK ' + s.recv(100).decode()); break
    except socket.timeout:
        pass
    except OSError as e:
        print('ERR ' + str(e)); break
else:
    print('ERR timed out')
"#
    );
    let out = run(ns.command("python3").args(["-c", &script]))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.strip_prefix("OK ") {
        Some(rest) => {
            let mut it = rest.split_whitespace();
            Ok((
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
            ))
        }
        None => bail!("UDP {addr}:{port}: {}", text.trim_start_matches("ERR ")),
    }
}

/// A bulk TCP server on `port`: "UP n\n" + n bytes → "<peer> <n received> <sha256>\n";
/// "DOWN n\n" → "<peer>\n" + n bytes of a fixed pattern; "ECHO n\n" + n bytes → "<peer>\n" + the
/// same n bytes.
fn bulk_server(ns: &Netns, port: u16) -> Result<Proc> {
    let script = format!(
        r#"
import socket, threading, hashlib
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(64)
def pattern(n):
    return (bytes(range(256)) * (n // 256 + 1))[:n]
def serve(c, a):
    try:
        c.settimeout(30)
        f = c.makefile("rb")
        cmd, n = f.readline().split()
        n = int(n)
        if cmd == b"UP":
            data = f.read(n)
            c.sendall(("%s %d %s\n" % (a[0], len(data), hashlib.sha256(data).hexdigest())).encode())
        elif cmd == b"DOWN":
            c.sendall(a[0].encode() + b"\n" + pattern(n))
        elif cmd == b"ECHO":
            data = f.read(n)
            c.sendall(a[0].encode() + b"\n" + data)
        c.shutdown(socket.SHUT_WR)
        f.read()
    except Exception:
        pass
    c.close()
while True:
    c, a = s.accept()
    threading.Thread(target=serve, args=(c, a), daemon=True).start()
"#
    );
    tcp_python_server(ns, "bulk-server", &script, port)
}

/// Runs one bulk exchange (`cmd` "UP"/"DOWN"/"ECHO", `n` bytes) from `ns` to addr:port, checking
/// byte counts and contents; returns the client address the server saw.
fn bulk(ns: &Netns, addr: &str, port: u16, cmd: &str, n: usize) -> Result<String> {
    let script = format!(
        r#"
import socket, hashlib, os, sys, time
def pattern(n):
    return (bytes(range(256)) * (n // 256 + 1))[:n]
t0 = time.time()
try:
    c = socket.create_connection(('{addr}', {port}), 3)
    c.settimeout(15)
    f = c.makefile("rb")
    cmd, n = "{cmd}", {n}
    if cmd == "UP":
        data = os.urandom(n)
        c.sendall(b"UP %d\n" % n + data)
        peer, got, digest = f.readline().decode().split()
        if int(got) != n or digest != hashlib.sha256(data).hexdigest():
            print("ERR server received %s bytes (digest %s), sent %d" % (got, digest == hashlib.sha256(data).hexdigest(), n)); sys.exit(0)
    elif cmd == "DOWN":
        c.sendall(b"DOWN %d\n" % n)
        peer = f.readline().decode().strip()
        data = f.read()
        if len(data) != n or data != pattern(n):
            print("ERR received %d bytes (want %d), content %s" % (len(data), n, "ok" if data == pattern(n)[:len(data)] else "differs")); sys.exit(0)
    else:
        data = os.urandom(n)
        c.sendall(b"ECHO %d\n" % n + data)
        peer = f.readline().decode().strip()
        back = f.read(n)
        if back != data:
            print("ERR echoed %d bytes (want %d), %s" % (len(back), n, "same" if back == data[:len(back)] else "different")); sys.exit(0)
    print("OK %s %.2f" % (peer, time.time() - t0))
except socket.timeout:
    print("ERR timed out after %.1f s" % (time.time() - t0))
except OSError as e:
    print("ERR %s after %.1f s" % (e, time.time() - t0))
"#
    );
    let out = run(ns.command("python3").args(["-c", &script]))?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match text.strip_prefix("OK ") {
        Some(rest) => Ok(rest.split_whitespace().next().unwrap_or("").to_string()),
        None => bail!(
            "{cmd} {n} bytes to {addr}:{port}: {}",
            text.trim_start_matches("ERR ")
        ),
    }
}

/// HTTP GET / on addr:port from `ns`: (status, headers lower-cased, body).
fn http_get(ns: &Netns, addr: &str, port: u16) -> Result<(u16, Vec<(String, String)>, String)> {
    let script = format!(
        r#"
import http.client, json
try:
    c = http.client.HTTPConnection('{addr}', {port}, timeout=3)
    c.request('GET', '/')
    r = c.getresponse()
    print(json.dumps({{"status": r.status, "headers": [[k.lower(), v] for k, v in r.getheaders()], "body": r.read().decode()}}))
except Exception as e:
    print(json.dumps({{"error": "%s: %s" % (type(e).__name__, e)}}))
"#
    );
    let out = run(ns.command("python3").args(["-c", &script]))?;
    let v: Value = serde_json::from_slice(&out.stdout).context("http_get output")?;
    if let Some(e) = v["error"].as_str() {
        bail!("GET http://{addr}:{port}/ from {}: {e}", ns.name);
    }
    let headers = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_string(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    Ok((
        v["status"].as_u64().unwrap() as u16,
        headers,
        v["body"].as_str().unwrap().to_string(),
    ))
}

/// Checks the healthCheckNodePort answer of `node` for demo/`svc`: status `want_status` and
/// `want_local` local endpoints, kube-proxy's headers and body.
fn expect_health(
    c: &Cluster,
    node_ip: &str,
    port: u16,
    svc: &str,
    want_status: u16,
    want_local: u64,
) -> Result<()> {
    let (status, headers, body) = http_get(&c.client, node_ip, port)?;
    let header = |k: &str| {
        headers
            .iter()
            .find(|(h, _)| h == k)
            .map(|(_, v)| v.as_str())
    };
    ensure!(
        status == want_status,
        "GET http://{node_ip}:{port}/: status {status}, want {want_status} (body {body})"
    );
    ensure!(
        header("content-type") == Some("application/json"),
        "Content-Type {:?}, want application/json",
        header("content-type")
    );
    ensure!(
        header("x-content-type-options") == Some("nosniff"),
        "X-Content-Type-Options {:?}, want nosniff",
        header("x-content-type-options")
    );
    let v: Value = serde_json::from_str(&body).with_context(|| format!("body {body:?}"))?;
    let want = serde_json::json!({"service": {"namespace": "demo", "name": svc},
        "localEndpoints": want_local, "serviceProxyHealthy": true});
    ensure!(v == want, "body {v}, want {want}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Captures

/// The packets `c` saw that are replies to the client of a frontend at `frontend_port` or from a
/// backend address: (plain replies, VXLAN packets).
fn replies_to_client<'a>(seen: &'a [Seen], frontend_port: u16, backend: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| {
            !s.is_vxlan() && s.dst == CLIENT_IP && (s.sport == frontend_port || s.src == backend)
        })
        .collect()
}

fn vxlan_to<'a>(seen: &'a [Seen], dst: &str) -> Vec<&'a Seen> {
    seen.iter()
        .filter(|s| s.is_vxlan() && s.dst == dst)
        .collect()
}

fn lines(v: &[&Seen]) -> String {
    v.iter()
        .take(6)
        .map(|s| s.line.as_str())
        .collect::<Vec<_>>()
        .join("\n    ")
}

/// Captures on A's and B's links around `f`: (what A sent, what B sent).
fn captured(c: &Cluster, f: impl FnOnce() -> Result<()>) -> Result<(Vec<Seen>, Vec<Seen>)> {
    let ca = Capture::start(&c.fabric, &c.a.port, c.a.dir.path())?;
    let cb = Capture::start(&c.fabric, &c.b.port, c.b.dir.path())?;
    let r = f();
    let (sa, sb) = (ca.stop()?, cb.stop()?);
    r?;
    Ok((sa, sb))
}

/// The per-service counters `sluicectl get services -o json` reports for demo/`name`.
/// A per-service counter of a `get services` entry (local, forwarded, decapsulated, packets).
fn counter(v: &Value, k: &str) -> Result<u64> {
    v[k].as_u64()
        .ok_or_else(|| anyhow!("no counter {k:?} in get services: {v}"))
}

fn svc_view(n: &MNode, name: &str) -> Result<Value> {
    let v = n.get_json("services")?;
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"] == name)
        .cloned()
        .ok_or_else(|| anyhow!("{}: no service demo/{name} in get services: {v}", n.name))
}

// ---------------------------------------------------------------------------------------------
// Tests

/// Routes from the Node objects; pod↔pod across nodes; a ClusterIP whose only backend is on the
/// other node; NodePorts (local and remote backend, DSR), UDP NodePort, LoadBalancer IP, external
/// IP; MTU through the DSR path.
#[test]
fn dsr_cluster_pods_nodeports_lb_mtu() {
    let c = Cluster::new(&[]).unwrap();
    let mut checks = Checks::new();

    checks.check(
        "0 Node objects applied: each node routes the other's pod CIDR via its InternalIP",
        || c.wait_routes(Duration::from_secs(5)),
    );

    let pa = c.a.add_pod().unwrap(); // client pod on A
    let a_be = c.a.add_pod().unwrap(); // backend on A
    let pb = c.b.add_pod().unwrap(); // backend (and client) on B
    let _servers = [
        echo_server(&a_be.ns, 8080).unwrap(),
        echo_server(&pb.ns, 8080).unwrap(),
        udp_server(&pb.ns, 5353).unwrap(),
        bulk_server(&pb.ns, 9000).unwrap(),
    ];
    let _echo_pa = echo_server(&pa.ns, 8080).unwrap();

    checks.check("1a pod on A -> pod on B, real IPs", || {
        expect_tcp(&pa.ns, &pb.ip, 8080, &pa.ip, &pb.ip)
    });
    checks.check("1b pod on B -> pod on A, real IPs", || {
        expect_tcp(&pb.ns, &pa.ip, 8080, &pb.ip, &pa.ip)
    });

    let objects = [
        Svc::new("cross", "ClusterIP", "10.96.0.20").ep(&pb.ip, "node-b"),
        Svc::new("np-local", "NodePort", "10.96.0.21")
            .node_port(30080)
            .ep(&a_be.ip, "node-a"),
        Svc::new("np-remote", "NodePort", "10.96.0.22")
            .node_port(30081)
            .ep(&pb.ip, "node-b"),
        Svc::new("np-udp", "NodePort", "10.96.0.23")
            .ports("UDP", 53, 5353)
            .node_port(30053)
            .ep(&pb.ip, "node-b"),
        Svc {
            lb_ips: vec!["203.0.113.10"],
            external_ips: vec!["203.0.113.20"],
            ..Svc::new("lb", "LoadBalancer", "10.96.0.24")
                .node_port(30082)
                .ep(&pb.ip, "node-b")
        },
        Svc::new("bulk", "NodePort", "10.96.0.25")
            .ports("TCP", 9000, 9000)
            .node_port(30090)
            .ep(&pb.ip, "node-b"),
    ];
    let yaml: String = objects.iter().map(|s| s.yaml()).collect();
    c.apply(&yaml).unwrap();
    // The client reaches the LoadBalancer IP and the external IP through node A.
    for ip in ["203.0.113.10", "203.0.113.20"] {
        c.client
            .ip(&["route", "add", &format!("{ip}/32"), "via", A_IP])
            .unwrap();
    }

    checks.check(
        "1c pod on A -> ClusterIP whose only backend is on B",
        || expect_tcp(&pa.ns, "10.96.0.20", 80, &pa.ip, &pb.ip),
    );

    checks.check(
        "2 NodePort via A, backend on A: the backend sees the client",
        || expect_tcp(&c.client, A_IP, 30080, CLIENT_IP, &a_be.ip),
    );

    checks.check(
        "3 NodePort via A, backend on B (DSR): client IP kept, replies leave B, none leaves A",
        || {
            let before = (svc_view(&c.a, "np-remote")?, svc_view(&c.b, "np-remote")?);
            let (sa, sb) = captured(&c, || {
                for _ in 0..3 {
                    expect_tcp(&c.client, A_IP, 30081, CLIENT_IP, &pb.ip)?;
                }
                Ok(())
            })?;
            let from_a = replies_to_client(&sa, 30081, &pb.ip);
            ensure!(
                from_a.is_empty(),
                "replies to the client left node A (DSR wants them from B):\n    {}",
                lines(&from_a)
            );
            ensure!(
                !vxlan_to(&sa, B_IP).is_empty(),
                "A sent no VXLAN to B ({} packets seen on A's link)",
                sa.len()
            );
            let from_b = replies_to_client(&sb, 30081, &pb.ip);
            ensure!(!from_b.is_empty(), "no reply to the client left node B");
            let bad: Vec<&Seen> = from_b
                .iter()
                .copied()
                .filter(|s| s.src != A_IP || s.sport != 30081)
                .collect();
            ensure!(
                bad.is_empty(),
                "replies from B must carry A's address and the nodePort ({A_IP}.30081):\n    {}",
                lines(&bad)
            );
            ensure!(
                vxlan_to(&sb, A_IP).is_empty(),
                "B tunnelled packets back to A in DSR mode"
            );
            let after = (svc_view(&c.a, "np-remote")?, svc_view(&c.b, "np-remote")?);
            let delta = |b: &Value, a: &Value, k: &str| -> Result<u64> {
                Ok(counter(a, k)?.saturating_sub(counter(b, k)?))
            };
            let (fwd_a, decap_b) = (
                delta(&before.0, &after.0, "forwarded")?,
                delta(&before.1, &after.1, "decapsulated")?,
            );
            eprintln!("    get services np-remote: A forwarded +{fwd_a}, B decapsulated +{decap_b}");
            ensure!(
                fwd_a > 0 && decap_b > 0,
                "sluicectl get services: A's forwarded (+{fwd_a}) and B's decapsulated (+{decap_b}) counters should both grow"
            );
            Ok(())
        },
    );

    checks.check(
        "5 UDP NodePort via A, backend on B (DSR): client IP kept, reply from B",
        || {
            let mut res = None;
            let (sa, sb) = captured(&c, || {
                res = Some(udp_try(&c.client, A_IP, 30053)?);
                Ok(())
            })?;
            let (seen, server) = res.unwrap();
            ensure!(
                (seen.as_str(), server.as_str()) == (CLIENT_IP, pb.ip.as_str()),
                "backend {server} saw {seen}; want {} saw {CLIENT_IP}",
                pb.ip
            );
            let from_a = replies_to_client(&sa, 30053, &pb.ip);
            ensure!(
                from_a.is_empty(),
                "the UDP reply left A:\n    {}",
                lines(&from_a)
            );
            let from_b = replies_to_client(&sb, 30053, &pb.ip);
            ensure!(
                from_b.iter().any(|s| s.src == A_IP && s.sport == 30053),
                "no reply {A_IP}.30053 -> client left B: {:?}",
                lines(&from_b)
            );
            Ok(())
        },
    );

    checks.check(
        "6a LoadBalancer IP 203.0.113.10 (routed via A), backend on B: client IP kept",
        || expect_tcp(&c.client, "203.0.113.10", 80, CLIENT_IP, &pb.ip),
    );
    checks.check(
        "6b external IP 203.0.113.20 (routed via A), backend on B: client IP kept",
        || expect_tcp(&c.client, "203.0.113.20", 80, CLIENT_IP, &pb.ip),
    );
    checks.check(
        "6c the LoadBalancer Service's NodePort via A works too",
        || expect_tcp(&c.client, A_IP, 30082, CLIENT_IP, &pb.ip),
    );

    // MTU. First with every ICMP dropped at the client and no path MTU learnt yet: only the MSS
    // clamp lets full-size segments through the encapsulation.
    checks.check(
        "9a DSR path, client drops all incoming ICMP: 1 MiB upload completes (MSS clamp)",
        || {
            let cached = c.client.ip(&["route", "get", A_IP])?;
            let cached = String::from_utf8_lossy(&cached.stdout).into_owned();
            ensure!(
                !cached.contains("mtu"),
                "the client already has a path MTU for {A_IP} ({cached}): the check would prove nothing"
            );
            c.client
                .sh("iptables -w -A INPUT -p icmp -j DROP")
                .context("iptables in the client netns")?;
            let r = bulk(&c.client, A_IP, 30090, "UP", 1 << 20);
            let _ = c.client.sh("iptables -w -D INPUT -p icmp -j DROP");
            ensure!(
                r? == CLIENT_IP,
                "the backend did not see the client's address"
            );
            Ok(())
        },
    );
    checks.check("9b DSR path: 1400-byte request and response", || {
        let seen = bulk(&c.client, A_IP, 30090, "ECHO", 1400)?;
        ensure!(seen == CLIENT_IP, "backend saw {seen}");
        Ok(())
    });
    checks.check("9c DSR path: 1 MiB upload, byte count and digest", || {
        let seen = bulk(&c.client, A_IP, 30090, "UP", 1 << 20)?;
        ensure!(seen == CLIENT_IP, "backend saw {seen}");
        Ok(())
    });
    checks.check(
        "9d DSR path: 1 MiB download, byte count and content",
        || {
            let seen = bulk(&c.client, A_IP, 30090, "DOWN", 1 << 20)?;
            ensure!(seen == CLIENT_IP, "backend saw {seen}");
            Ok(())
        },
    );

    checks.finish();
}

/// `--lb-mode tunnel`: a NodePort via A to a backend on B; the reply is tunnelled back to A and
/// leaves A towards the client; the client's IP is still what the backend sees.
#[test]
fn tunnel_mode_replies_return_through_the_ingress_node() {
    let c = Cluster::new(&["--lb-mode", "tunnel"]).unwrap();
    let mut checks = Checks::new();
    checks.check(
        "0 Node objects applied: each node routes the other's pod CIDR via its InternalIP",
        || c.wait_routes(Duration::from_secs(5)),
    );
    let pb = c.b.add_pod().unwrap();
    let _servers = [
        echo_server(&pb.ns, 8080).unwrap(),
        bulk_server(&pb.ns, 9000).unwrap(),
    ];
    let yaml: String = [
        Svc::new("np-remote", "NodePort", "10.96.0.22")
            .node_port(30081)
            .ep(&pb.ip, "node-b"),
        Svc::new("bulk", "NodePort", "10.96.0.25")
            .ports("TCP", 9000, 9000)
            .node_port(30090)
            .ep(&pb.ip, "node-b"),
    ]
    .iter()
    .map(|s| s.yaml())
    .collect();
    c.apply(&yaml).unwrap();

    checks.check(
        "4 tunnel mode: NodePort via A, backend on B: client IP kept, replies leave A, none leaves B",
        || {
            let (sa, sb) = captured(&c, || {
                for _ in 0..3 {
                    expect_tcp(&c.client, A_IP, 30081, CLIENT_IP, &pb.ip)?;
                }
                Ok(())
            })?;
            let from_b = replies_to_client(&sb, 30081, &pb.ip);
            ensure!(
                from_b.is_empty(),
                "replies to the client left B directly (tunnel mode wants them via A):\n    {}",
                lines(&from_b)
            );
            ensure!(
                !vxlan_to(&sb, A_IP).is_empty(),
                "B tunnelled nothing back to A"
            );
            let from_a = replies_to_client(&sa, 30081, &pb.ip);
            ensure!(!from_a.is_empty(), "no reply to the client left A");
            let bad: Vec<&Seen> = from_a
                .iter()
                .copied()
                .filter(|s| s.src != A_IP || s.sport != 30081)
                .collect();
            ensure!(
                bad.is_empty(),
                "replies from A must come from {A_IP}.30081:\n    {}",
                lines(&bad)
            );
            Ok(())
        },
    );
    checks.check(
        "4b tunnel mode: 1 MiB upload and download through the tunnel",
        || {
            ensure!(bulk(&c.client, A_IP, 30090, "UP", 1 << 20)? == CLIENT_IP);
            ensure!(bulk(&c.client, A_IP, 30090, "DOWN", 1 << 20)? == CLIENT_IP);
            Ok(())
        },
    );
    checks.finish();
}

/// externalTrafficPolicy: Local (and its healthCheckNodePort) and internalTrafficPolicy: Local.
#[test]
fn traffic_policies_local() {
    let c = Cluster::new(&[]).unwrap();
    let mut checks = Checks::new();
    checks.check(
        "0 Node objects applied: each node routes the other's pod CIDR via its InternalIP",
        || c.wait_routes(Duration::from_secs(5)),
    );
    let pa = c.a.add_pod().unwrap(); // client pod on A
    let a_be = c.a.add_pod().unwrap();
    let pb = c.b.add_pod().unwrap(); // client pod on B
    let b_be = c.b.add_pod().unwrap();
    let _servers = [
        echo_server(&a_be.ns, 8080).unwrap(),
        echo_server(&b_be.ns, 8080).unwrap(),
    ];
    let yaml: String = [
        Svc {
            etp_local: true,
            health_check_node_port: Some(32000),
            // Kubernetes gives a healthCheckNodePort to LoadBalancer Services only.
            ..Svc::new("etp", "LoadBalancer", "10.96.0.30")
                .node_port(30085)
                .ep(&b_be.ip, "node-b")
        },
        Svc {
            itp_local: true,
            ..Svc::new("itp", "ClusterIP", "10.96.0.31")
                .ep(&a_be.ip, "node-a")
                .ep(&b_be.ip, "node-b")
        },
        Svc {
            itp_local: true,
            ..Svc::new("itp-a", "ClusterIP", "10.96.0.32").ep(&a_be.ip, "node-a")
        },
    ]
    .iter()
    .map(|s| s.yaml())
    .collect();
    c.apply(&yaml).unwrap();

    checks.check(
        "7a eTP Local: NodePort via B (has the endpoint) works, backend sees the client",
        || expect_tcp(&c.client, B_IP, 30085, CLIENT_IP, &b_be.ip),
    );
    checks.check(
        "7b eTP Local: NodePort via A (no local endpoint) is dropped (times out), as kube-proxy does",
        || {
            let why = expect_tcp_fails(&c.client, A_IP, 30085)?;
            eprintln!("    via A: {why}");
            ensure!(
                why.contains("timed out"),
                "want the SYN dropped (a timeout), got: {why} (a refusal means node A's kernel answered: no frontend served there)"
            );
            Ok(())
        },
    );
    checks.check("7c healthCheckNodePort on B: 200, localEndpoints 1", || {
        expect_health(&c, B_IP, 32000, "etp", 200, 1)
    });
    checks.check("7d healthCheckNodePort on A: 503, localEndpoints 0", || {
        expect_health(&c, A_IP, 32000, "etp", 503, 0)
    });
    checks.check(
        "8a iTP Local: a pod on A only gets A's endpoint (and sees its own IP)",
        || {
            let answers = tcp_ask_many(&pa.ns, "10.96.0.31", 80, 12)?;
            let backends: HashSet<&str> = answers.iter().map(|(_, b)| b.as_str()).collect();
            ensure!(
                backends == HashSet::from([a_be.ip.as_str()]),
                "backends reached from A: {backends:?}, want only {}",
                a_be.ip
            );
            ensure!(
                answers.iter().all(|(seen, _)| *seen == pa.ip),
                "{answers:?}"
            );
            Ok(())
        },
    );
    checks.check("8b iTP Local: a pod on B only gets B's endpoint", || {
        let answers = tcp_ask_many(&pb.ns, "10.96.0.31", 80, 12)?;
        let backends: HashSet<&str> = answers.iter().map(|(_, b)| b.as_str()).collect();
        ensure!(
            backends == HashSet::from([b_be.ip.as_str()]),
            "backends reached from B: {backends:?}, want only {}",
            b_be.ip
        );
        Ok(())
    });
    checks.check(
        "8c iTP Local: a pod on B (no local endpoint of itp-a) cannot connect",
        || {
            let why = expect_tcp_fails(&pb.ns, "10.96.0.32", 80)?;
            eprintln!("    from B: {why}");
            Ok(())
        },
    );
    checks.finish();
}
