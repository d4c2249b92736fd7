//! Services end to end: a client pod reaches a ClusterIP, sluice's BPF picks a backend pod and
//! rewrites only the destination, so the backend sees the client pod's own IP. Real sluiced, real
//! plugin and cnitool, real TCP/UDP in network namespaces.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// One endpoint in a slice: (ip, ready, terminating).
type Ep<'a> = (&'a str, bool, bool);

fn service(
    name: &str,
    vip: &str,
    port: u16,
    target: u16,
    proto: &str,
    eps: &[Ep],
    extra_spec: &str,
) -> String {
    let endpoints: Vec<String> = eps
        .iter()
        .map(|(ip, ready, term)| format!("- {{addresses: [{ip}], conditions: {{ready: {ready}, serving: true, terminating: {term}}}}}"))
        .collect();
    format!(
        r#"---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: demo}}
spec: {{clusterIP: {vip}, ports: [{{name: p, port: {port}, targetPort: {target}, protocol: {proto}}}]{extra_spec}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: demo, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: p, port: {target}, protocol: {proto}}}]
endpoints: {}
"#,
        if endpoints.is_empty() {
            "[]".to_string()
        } else {
            format!("\n{}", endpoints.join("\n"))
        }
    )
}

fn ready(ip: &str) -> Ep<'_> {
    (ip, true, false)
}

/// A client pod and two backend pods with echo servers on 8080.
fn client_and_two_backends(node: &SluiceNode) -> (Pod, Pod, Pod, Vec<Proc>) {
    let client = node.add_pod().unwrap();
    let b1 = node.add_pod().unwrap();
    let b2 = node.add_pod().unwrap();
    let servers = vec![
        echo_server(&b1.ns, 8080).unwrap(),
        echo_server(&b2.ns, 8080).unwrap(),
    ];
    (client, b1, b2, servers)
}

#[test]
fn clusterip_tcp_reaches_both_backends_and_they_see_the_client_ip() {
    let node = SluiceNode::new().unwrap();
    let (client, b1, b2, _servers) = client_and_two_backends(&node);
    node.apply(&service(
        "web",
        "10.96.0.10",
        80,
        8080,
        "TCP",
        &[ready(&b1.ip), ready(&b2.ip)],
        "",
    ))
    .unwrap();

    let answers = tcp_ask_many(&client.ns, "10.96.0.10", 80, 40).unwrap();
    assert_eq!(answers.len(), 40);
    let backends: HashSet<&str> = answers.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(
        backends,
        HashSet::from([b1.ip.as_str(), b2.ip.as_str()]),
        "both backends get connections"
    );
    assert!(
        answers.iter().all(|(seen, _)| *seen == client.ip),
        "every backend sees the client pod's own IP: {answers:?}"
    );

    let svcs = node.get_json("services").unwrap();
    let web = &svcs["services"][0];
    assert_eq!(web["frontends"][0], "10.96.0.10:80");
    assert!(
        web["packets"].as_u64().unwrap() >= 40 * 3,
        "per-service counter: {web}"
    );
    let table = String::from_utf8(node.sluicectl(&["get", "services"]).unwrap().stdout).unwrap();
    assert!(
        table.contains("demo/web:p/TCP") && table.contains(&format!("{}:8080", b1.ip)),
        "{table}"
    );
    let ct = String::from_utf8(node.sluicectl(&["get", "conntrack"]).unwrap().stdout).unwrap();
    assert!(
        ct.contains("10.96.0.10:80") && ct.contains(&client.ip),
        "{ct}"
    );
}

#[test]
fn clusterip_udp_request_response() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = udp_server(&b.ns, 5353).unwrap();
    node.apply(&service(
        "dns",
        "10.96.0.53",
        53,
        5353,
        "UDP",
        &[ready(&b.ip)],
        "",
    ))
    .unwrap();
    let (seen, server) = udp_ask(&client.ns, "10.96.0.53", 53).unwrap();
    assert_eq!(
        (seen.as_str(), server.as_str()),
        (client.ip.as_str(), b.ip.as_str())
    );
    let ct = node.get_json("conntrack").unwrap();
    let flow = &ct["flows"][0];
    assert_eq!(
        (
            flow["protocol"].as_str(),
            flow["state"].as_str(),
            flow["has_reverse"].as_bool()
        ),
        (Some("UDP"), Some("udp_replied"), Some(true))
    );
    assert_eq!(flow["service"], "demo/dns:p/UDP");
}

#[test]
fn a_service_without_endpoints_is_refused_at_once() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    node.apply(&service("empty", "10.96.0.20", 80, 8080, "TCP", &[], ""))
        .unwrap();
    node.apply(&service("emptyudp", "10.96.0.21", 53, 53, "UDP", &[], ""))
        .unwrap();
    let script = r#"
import socket, time, errno
t = time.time()
try:
    socket.create_connection(('10.96.0.20', 80), 5); print('connected')
except ConnectionRefusedError:
    print('refused', time.time() - t)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect(('10.96.0.21', 53))
t = time.time(); s.send(b'q')
try:
    s.recv(10); print('answered')
except ConnectionRefusedError:
    print('refused', time.time() - t)
"#;
    let out = run(client.ns.command("python3").args(["-c", script])).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    for line in lines {
        let secs: f64 = line
            .strip_prefix("refused ")
            .unwrap_or_else(|| panic!("not refused: {text}"))
            .parse()
            .unwrap();
        assert!(secs < 1.0, "refused after {secs}s: {text}");
    }
    let st = node.status_json().unwrap();
    let rejected = st["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "no_backend_rejected")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert!(rejected >= 2);
}

#[test]
fn removing_a_backend_moves_new_connections_and_keeps_established_ones() {
    let node = SluiceNode::new().unwrap();
    let (client, b1, b2, _servers) = client_and_two_backends(&node);
    node.apply(&service(
        "web",
        "10.96.0.30",
        80,
        8080,
        "TCP",
        &[ready(&b1.ip), ready(&b2.ip)],
        "",
    ))
    .unwrap();

    // A long-lived connection, driven line by line over a pipe.
    let mut conn = steady_conn(&client.ns, "10.96.0.30", 80);
    let mut ask = || conn.ask();
    let kept = ask();
    assert!(kept == b1.ip || kept == b2.ip, "{kept}");
    let (kept_pod, other) = if kept == b1.ip {
        (&b1, &b2)
    } else {
        (&b2, &b1)
    };

    // The other backend goes away: only the kept one remains.
    let out = node
        .apply(&service(
            "web",
            "10.96.0.30",
            80,
            8080,
            "TCP",
            &[ready(&kept_pod.ip)],
            "",
        ))
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("map writes"));
    let answers = tcp_ask_many(&client.ns, "10.96.0.30", 80, 20).unwrap();
    assert!(
        answers.iter().all(|(_, b)| *b == kept_pod.ip),
        "new connections only to the remaining backend: {answers:?}"
    );
    assert_eq!(
        ask(),
        kept_pod.ip,
        "the established connection to a still-present backend keeps working"
    );

    // Now the kept backend is replaced by the other one: new connections go to the other, and
    // the established connection to the removed one keeps going (kube-proxy's rule: endpoint
    // changes never cut TCP connections; they finish or time out).
    node.apply(&service(
        "web",
        "10.96.0.30",
        80,
        8080,
        "TCP",
        &[ready(&other.ip)],
        "",
    ))
    .unwrap();
    let answers = tcp_ask_many(&client.ns, "10.96.0.30", 80, 5).unwrap();
    assert!(answers.iter().all(|(_, b)| *b == other.ip), "{answers:?}");
    assert_eq!(
        ask(),
        kept_pod.ip,
        "the connection to a removed backend keeps working"
    );
}

#[test]
fn terminating_endpoints_keep_their_connections_but_get_no_new_ones() {
    let node = SluiceNode::new().unwrap();
    let (client, b1, b2, _servers) = client_and_two_backends(&node);
    node.apply(&service(
        "web",
        "10.96.0.31",
        80,
        8080,
        "TCP",
        &[ready(&b1.ip)],
        "",
    ))
    .unwrap();
    let mut conn = steady_conn(&client.ns, "10.96.0.31", 80);
    assert_eq!(conn.ask(), b1.ip);
    node.apply(&service(
        "web",
        "10.96.0.31",
        80,
        8080,
        "TCP",
        &[(&b1.ip, false, true), ready(&b2.ip)],
        "",
    ))
    .unwrap();
    assert_eq!(conn.ask(), b1.ip, "terminating backend keeps its flow");
    let answers = tcp_ask_many(&client.ns, "10.96.0.31", 80, 10).unwrap();
    assert!(answers.iter().all(|(_, b)| *b == b2.ip), "{answers:?}");
    let eps = node.get_json("services").unwrap();
    let terminating = eps["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["ip"] == b1.ip.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (
            terminating["terminating"].as_bool(),
            terminating["slot"].as_i64()
        ),
        (Some(true), Some(-1))
    );
}

/// A connection kept open; `ask` does one round trip and returns the answering backend.
struct SteadyConn {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl SteadyConn {
    fn ask(&mut self) -> String {
        use std::io::{BufRead, Write};
        writeln!(self.stdin).unwrap();
        self.stdin.flush().unwrap();
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.split_whitespace().nth(1).unwrap_or("").to_string()
    }
}

impl Drop for SteadyConn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn steady_conn(ns: &Netns, addr: &str, port: u16) -> SteadyConn {
    let script = format!(
        "import socket, sys\nc = socket.create_connection(('{addr}', {port}), 3); c.settimeout(3); f = c.makefile('rwb')\nfor line in sys.stdin:\n    f.write(b'x\\n'); f.flush(); print(f.readline().decode().strip(), flush=True)\n"
    );
    let mut child = ns
        .command("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    SteadyConn {
        child,
        stdin,
        stdout,
    }
}

#[test]
fn hairpin_a_pod_reaching_its_own_service() {
    let node = SluiceNode::new().unwrap();
    let pod = node.add_pod().unwrap();
    let _s = echo_server(&pod.ns, 8080).unwrap();
    node.apply(&service(
        "self",
        "10.96.0.40",
        80,
        8080,
        "TCP",
        &[ready(&pod.ip)],
        "",
    ))
    .unwrap();
    let answers = tcp_ask_many(&pod.ns, "10.96.0.40", 80, 5).unwrap();
    assert_eq!(answers.len(), 5);
    for (seen, backend) in &answers {
        assert_eq!(backend, &pod.ip);
        assert_eq!(
            seen, "169.254.42.1",
            "a hairpinned client is seen as the hairpin address"
        );
    }
    let ct = node.get_json("conntrack").unwrap();
    assert!(ct["flows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["hairpin"] == true));
}

#[test]
fn session_affinity_sticks_to_one_backend() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let backends: Vec<Pod> = (0..3).map(|_| node.add_pod().unwrap()).collect();
    let _servers: Vec<Proc> = backends
        .iter()
        .map(|b| echo_server(&b.ns, 8080).unwrap())
        .collect();
    let eps: Vec<Ep> = backends.iter().map(|b| ready(&b.ip)).collect();
    node.apply(&service(
        "sticky",
        "10.96.0.50",
        80,
        8080,
        "TCP",
        &eps,
        ", sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}",
    ))
    .unwrap();
    let answers = tcp_ask_many(&client.ns, "10.96.0.50", 80, 30).unwrap();
    let chosen: HashSet<&String> = answers.iter().map(|(_, b)| b).collect();
    assert_eq!(
        chosen.len(),
        1,
        "sessionAffinity ClientIP: one backend for one client: {answers:?}"
    );
    // Without affinity, the same 30 connections spread.
    node.apply(&service("sticky", "10.96.0.50", 80, 8080, "TCP", &eps, ""))
        .unwrap();
    let answers = tcp_ask_many(&client.ns, "10.96.0.50", 80, 30).unwrap();
    let spread: HashSet<&String> = answers.iter().map(|(_, b)| b).collect();
    assert!(spread.len() >= 2, "{answers:?}");
}

#[test]
fn ten_thousand_services_apply_and_a_lookup_still_succeeds() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = echo_server(&b.ns, 8080).unwrap();
    let mut yaml = String::new();
    for i in 0..10_000u32 {
        let vip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
        yaml.push_str(&service(
            &format!("s{i}"),
            &vip,
            80,
            8080,
            "TCP",
            &[ready(&b.ip)],
            "",
        ));
    }
    let t = Instant::now();
    let out = node.apply(&yaml).unwrap();
    let took = t.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().filter(|l| l.ends_with(" applied")).count(),
        20_000
    );
    eprintln!("applied 10,000 Services + 10,000 EndpointSlices in {took:?}");
    // The last one and one in the middle answer.
    for vip in ["10.100.39.250", "10.100.20.1"] {
        let (seen, backend) = tcp_ask_full(&client.ns, vip, 80).unwrap();
        assert_eq!(
            (seen.as_str(), backend.as_str()),
            (client.ip.as_str(), b.ip.as_str()),
            "{vip}"
        );
    }
    // One endpoint change among 10,000 services writes a handful of entries, not 10,000.
    let one = service(
        "s7",
        "10.100.0.8",
        80,
        8080,
        "TCP",
        &[ready(&b.ip), ready(&client.ip)],
        "",
    );
    let out = node.apply(&one).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("(3 map writes"), "{text}");
    let st = node.status_json().unwrap();
    assert_eq!(st["frontends"], 10_000);
}

#[test]
fn invalid_objects_are_refused_whole_and_nothing_applied_is_lost() {
    let node = SluiceNode::new().unwrap();
    node.apply(&service("keep", "10.96.0.60", 80, 8080, "TCP", &[], ""))
        .unwrap();
    let bad = format!("{}---\napiVersion: v1\nkind: Service\nmetadata: {{name: broken, namespace: demo}}\nspec: {{ports: [{{port: 99999}}]}}\n", service("new", "10.96.0.61", 80, 8080, "TCP", &[], ""));
    let err = node.apply(&bad).unwrap_err().to_string();
    assert!(
        err.contains("Service demo/broken") && err.contains("spec.ports[0].port"),
        "{err}"
    );
    let err = node
        .apply("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("unsupported apps/v1 Deployment"), "{err}");
    let names: Vec<String> = node.get_json("services").unwrap()["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        ["keep"],
        "the valid document of the refused file was not applied either"
    );
}

#[test]
fn applied_objects_and_flows_survive_a_daemon_restart_and_delete_works() {
    let mut node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = echo_server(&b.ns, 8080).unwrap();
    let yaml = service("web", "10.96.0.70", 80, 8080, "TCP", &[ready(&b.ip)], "");
    node.apply(&yaml).unwrap();
    let mut conn = steady_conn(&client.ns, "10.96.0.70", 80);
    assert_eq!(conn.ask(), b.ip);
    node.kill9_daemon();
    assert_eq!(
        conn.ask(),
        b.ip,
        "service flows keep working with the daemon gone"
    );
    node.start_daemon().unwrap();
    assert_eq!(conn.ask(), b.ip, "and after it restarted");
    assert!(
        node.daemon_log()
            .contains("services in sync frontends=1 writes=0"),
        "a restart rewrites nothing:\n{}",
        node.daemon_log()
    );
    assert_eq!(tcp_ask_full(&client.ns, "10.96.0.70", 80).unwrap().1, b.ip);

    let out = node.delete(&yaml).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Service demo/web deleted"));
    assert!(node.get_json("services").unwrap()["services"]
        .as_array()
        .unwrap()
        .is_empty());
    let out = node.delete(&yaml).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("not found"));
}

#[test]
fn manifests_directory_is_loaded_at_start_and_on_change() {
    let dir = TempDir::new("m").unwrap();
    let mut node = SluiceNode::with_args(&["--manifests", dir.path().to_str().unwrap()]).unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = echo_server(&b.ns, 8080).unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        service("web", "10.96.0.80", 80, 8080, "TCP", &[ready(&b.ip)], ""),
    )
    .unwrap();
    wait_for("the manifest to be served", Duration::from_secs(10), || {
        Ok(tcp_ask_full(&client.ns, "10.96.0.80", 80).is_ok())
    })
    .unwrap();
    // A broken edit keeps what was loaded.
    std::fs::write(
        dir.path().join("web.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 0}]}\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(tcp_ask_full(&client.ns, "10.96.0.80", 80).unwrap().1, b.ip);
    // Restart: loaded again at start.
    std::fs::write(
        dir.path().join("web.yaml"),
        service("web", "10.96.0.81", 80, 8080, "TCP", &[ready(&b.ip)], ""),
    )
    .unwrap();
    node.stop_daemon().unwrap();
    node.start_daemon().unwrap();
    assert_eq!(tcp_ask_full(&client.ns, "10.96.0.81", 80).unwrap().1, b.ip);
    let fes: HashMap<String, bool> = node.get_json("services").unwrap()["services"][0]["frontends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f.as_str().unwrap().to_string(), true))
        .collect();
    assert_eq!(fes.keys().collect::<Vec<_>>(), ["10.96.0.81:80"]);
}

#[test]
fn an_apply_beyond_the_map_sizes_is_refused_whole_and_the_daemon_keeps_serving() {
    let mut node = SluiceNode::with_args(&["--frontends-size", "4"]).unwrap();
    let many: String = (0..5)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("10.96.1.{}", i + 1),
                80,
                8080,
                "TCP",
                &[],
                "",
            )
        })
        .collect();
    let err = node.apply(&many).unwrap_err().to_string();
    assert!(
        err.contains("would exceed") && err.contains("--frontends-size"),
        "{err}"
    );
    assert!(
        node.get_json("services").unwrap()["services"]
            .as_array()
            .unwrap()
            .is_empty(),
        "nothing applied"
    );
    let few: String = (0..2)
        .map(|i| {
            service(
                &format!("s{i}"),
                &format!("10.96.1.{}", i + 1),
                80,
                8080,
                "TCP",
                &[],
                "",
            )
        })
        .collect();
    node.apply(&few).unwrap();
    // The refused objects were not stored: a restart comes back with the two, and serves pods.
    node.stop_daemon().unwrap();
    node.start_daemon().unwrap();
    assert_eq!(
        node.get_json("services").unwrap()["services"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    node.add_pod().unwrap();
}

#[test]
fn a_backends_icmp_error_reaches_the_client_as_about_the_service() {
    // UDP to a backend where nothing listens: the backend's kernel answers ICMP port unreachable
    // about client -> backend:port; sluice rewrites it so the client's socket, connected to the
    // ClusterIP, gets ECONNREFUSED instead of waiting for a timeout.
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    node.apply(&service(
        "deaf",
        "10.96.0.90",
        53,
        5353,
        "UDP",
        &[ready(&b.ip)],
        "",
    ))
    .unwrap();
    let script = r#"
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect(('10.96.0.90', 53))
t = time.time(); s.send(b'q')
try:
    s.recv(10); print('answered')
except ConnectionRefusedError:
    print('refused', time.time() - t)
except socket.timeout:
    print('timeout')
"#;
    let out = run(client.ns.command("python3").args(["-c", script])).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let secs: f64 = text
        .strip_prefix("refused ")
        .unwrap_or_else(|| panic!("{text}"))
        .parse()
        .unwrap();
    assert!(secs < 1.0, "{text}");
    let st = node.status_json().unwrap();
    let n = st["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "rev_nat_icmp")
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert_eq!(n, 1);
}
