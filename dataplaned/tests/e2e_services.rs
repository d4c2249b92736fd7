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
        (Some("UDP"), Some("udp_replied"), Some(true)),
        "a UDP flow seen both ways"
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
    // the established connection to the removed backend is left to finish (as kube-proxy does:
    // an endpoint change never cuts TCP flows; a slice move must not break connections).
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
        "the established connection to a removed backend keeps going"
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

/// 10,000 ClusterIP Services s0..s9999 (10.100.0.1 ...) with `backend`:8080 as their endpoint.
fn ten_thousand_services(backend: &str) -> String {
    let mut yaml = String::new();
    for i in 0..10_000u32 {
        let vip = format!("10.100.{}.{}", i / 250, i % 250 + 1);
        yaml.push_str(&service(
            &format!("s{i}"),
            &vip,
            80,
            8080,
            "TCP",
            &[ready(backend)],
            "",
        ));
    }
    yaml
}

#[test]
fn ten_thousand_services_apply_and_a_lookup_still_succeeds() {
    let node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = echo_server(&b.ns, 8080).unwrap();
    let yaml = ten_thousand_services(&b.ip);
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
    // The client pod is on this node: in the local set too.
    assert!(
        text.contains("(5 map writes"),
        "its member entry and slot in the cluster and the local set, and its frontend's counts: {text}"
    );
    let st = node.status_json().unwrap();
    assert_eq!(st["frontends"], 10_000);
}

/// Scale (issue 10): 100 pods and 10,000 Services on one node, then a restart (SIGTERM and
/// start): the API answers again, every pod is re-adopted, a service connection opened before
/// keeps working, nothing is rewritten. Times are printed (the benchmark reports them), not
/// asserted.
#[test]
fn a_hundred_pods_ten_thousand_services_and_a_restart() {
    let mut node = SluiceNode::new().unwrap();
    let t = Instant::now();
    let pods: Vec<Pod> = (0..100).map(|_| node.add_pod().unwrap()).collect();
    eprintln!("100 pods added in {:?}", t.elapsed());
    let b = &pods[99];
    let _s = echo_server(&b.ns, 8080).unwrap();
    let yaml = ten_thousand_services(&b.ip);
    let t = Instant::now();
    node.apply(&yaml).unwrap();
    eprintln!(
        "applied 10,000 Services + 10,000 EndpointSlices in {:?}",
        t.elapsed()
    );
    let mut conn = steady_conn(&pods[0].ns, "10.100.39.250", 80);
    assert_eq!(conn.ask(), b.ip);

    node.stop_daemon().unwrap();
    assert_eq!(
        conn.ask(),
        b.ip,
        "service flows keep working with the daemon stopped"
    );
    let t = Instant::now();
    node.start_daemon().unwrap();
    eprintln!(
        "restart with 100 pods and 10,000 Services: API answering after {:?}",
        t.elapsed()
    );
    assert_eq!(
        conn.ask(),
        b.ip,
        "the connection opened before the restart still works"
    );
    let st = node.status_json().unwrap();
    let atts = st["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 100);
    assert!(atts.iter().all(|a| a["attached"] == true), "{st}");
    assert_eq!(st["frontends"], 10_000);
    assert!(
        node.daemon_log().contains("adopted=100"),
        "every pod re-adopted:\n{}",
        node.daemon_log()
    );
    assert!(
        node.daemon_log()
            .contains("services in sync frontends=10000 writes=0"),
        "a restart rewrites nothing:\n{}",
        node.daemon_log()
    );
    for (client, vip) in [(&pods[50], "10.100.20.1"), (&pods[98], "10.100.0.1")] {
        let (seen, backend) = tcp_ask_full(&client.ns, vip, 80).unwrap();
        assert_eq!(
            (seen.as_str(), backend.as_str()),
            (client.ip.as_str(), b.ip.as_str())
        );
    }
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
    // Changed just before the start (maybe still being written): the last good version first,
    // the file once it held still for a poll.
    wait_for(
        "the new manifest to be served",
        Duration::from_secs(10),
        || Ok(tcp_ask_full(&client.ns, "10.96.0.81", 80).is_ok_and(|(_, s)| s == b.ip)),
    )
    .unwrap();
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

/// Whether `vip:80` answers from `backend` within a few seconds.
fn serves(client: &Pod, vip: &str, backend: &Pod) -> bool {
    tcp_ask_full(&client.ns, vip, 80).is_ok_and(|(_, b)| b == backend.ip)
}

/// The status of the source whose name starts with `prefix`.
fn source(node: &SluiceNode, prefix: &str) -> serde_json::Value {
    let st = node.status_json().unwrap();
    st["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("no source {prefix}: {st}"))
        .clone()
}

fn degraded(node: &SluiceNode) -> bool {
    node.status_json().unwrap()["services_degraded"]
        .as_bool()
        .unwrap()
}

#[test]
fn a_restart_with_a_broken_or_unreadable_manifests_directory_keeps_serving_the_last_good_manifests()
{
    let dir = TempDir::new("m").unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir(&manifests).unwrap();
    let mut node = SluiceNode::with_args(&["--manifests", manifests.to_str().unwrap()]).unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = echo_server(&b.ns, 8080).unwrap();
    let web = service("web", "10.96.2.1", 80, 8080, "TCP", &[ready(&b.ip)], "");
    let file = manifests.join("web.yaml");
    std::fs::write(&file, &web).unwrap();
    wait_for("the manifest to be served", Duration::from_secs(10), || {
        Ok(serves(&client, "10.96.2.1", &b))
    })
    .unwrap();
    assert!(source(&node, "manifests")["loaded"].as_bool().unwrap());
    assert!(!degraded(&node));

    // 1. The daemon restarts while the file is being rewritten (half of it written).
    node.stop_daemon().unwrap();
    let cut = web.find("namespace: demo").unwrap(); // inside the Service's metadata
    std::fs::write(&file, &web[..cut]).unwrap();
    node.start_daemon().unwrap();
    assert!(
        serves(&client, "10.96.2.1", &b),
        "served from the last good copy at once"
    );
    assert!(degraded(&node));
    let status = String::from_utf8(node.sluicectl(&["status"]).unwrap().stdout).unwrap();
    assert!(status.contains("DEGRADED"), "{status}");
    // It holds still, broken: read, refused, the last good version stays.
    std::thread::sleep(Duration::from_millis(2500));
    let src = source(&node, "manifests");
    assert!(
        !src["loaded"].as_bool().unwrap()
            && src["last_error"].as_str().unwrap().contains("web.yaml"),
        "{src}"
    );
    assert!(serves(&client, "10.96.2.1", &b));
    assert!(degraded(&node));
    // Fixed: the source loads completely and the daemon leaves its degraded start.
    std::fs::write(&file, &web).unwrap();
    wait_for("the source to load", Duration::from_secs(10), || {
        Ok(!degraded(&node))
    })
    .unwrap();
    assert!(source(&node, "manifests")["loaded"].as_bool().unwrap());

    // 2. The daemon restarts while the directory cannot be read.
    node.stop_daemon().unwrap();
    let away = dir.path().join("away");
    std::fs::rename(&manifests, &away).unwrap();
    node.start_daemon().unwrap();
    assert!(
        serves(&client, "10.96.2.1", &b),
        "every last good copy is served"
    );
    let src = source(&node, "manifests");
    assert!(
        src["last_error"].as_str().unwrap().contains("cannot read"),
        "{src}"
    );
    assert!(degraded(&node));
    std::fs::rename(&away, &manifests).unwrap();
    wait_for("the directory to load", Duration::from_secs(10), || {
        Ok(!degraded(&node))
    })
    .unwrap();
    assert!(serves(&client, "10.96.2.1", &b));
    // A file removed while the daemon was away takes its Service with it once all loaded.
    node.stop_daemon().unwrap();
    std::fs::remove_file(&file).unwrap();
    node.start_daemon().unwrap();
    assert!(!degraded(&node));
    assert!(node.get_json("services").unwrap()["services"]
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn a_stored_object_that_no_longer_validates_keeps_its_service_until_applied_again() {
    let mut node = SluiceNode::new().unwrap();
    let client = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _s = echo_server(&b.ns, 8080).unwrap();
    let old = service("old", "10.96.3.1", 80, 8080, "TCP", &[ready(&b.ip)], "");
    node.apply(&old).unwrap();
    node.apply(&service(
        "other",
        "10.96.3.2",
        80,
        8080,
        "TCP",
        &[ready(&b.ip)],
        "",
    ))
    .unwrap();
    node.stop_daemon().unwrap();
    // What a stricter validation in a newer daemon would reject: the stored Service demo/old.
    {
        use sluiced::services::objects::{Kind, ObjectKey};
        use sluiced::sources::applied::{AppliedLog, Entry};
        let (mut log, objs) = AppliedLog::open(&node.state_dir());
        assert_eq!(objs.len(), 4);
        let key = ObjectKey::new(Kind::Service, "demo", "old");
        log.append(&[Entry::Put {
            key: &key,
            raw: "apiVersion: v1\nkind: Service\nmetadata: {name: old, namespace: demo}\nspec: {clusterIP: 10.96.3.1, ports: [{name: p, port: 80, targetPort: 8080}], sessionAffinity: Sticky}\n",
        }])
        .unwrap();
    }
    node.start_daemon().unwrap();
    assert!(
        serves(&client, "10.96.3.1", &b),
        "what the maps hold for an object that does not load stays"
    );
    assert!(serves(&client, "10.96.3.2", &b));
    let src = source(&node, "applied");
    assert!(
        !src["loaded"].as_bool().unwrap()
            && src["last_error"]
                .as_str()
                .unwrap()
                .contains("Service demo/old")
            && src["last_error"]
                .as_str()
                .unwrap()
                .contains("sessionAffinity"),
        "{src}"
    );
    let st = node.status_json().unwrap();
    assert_eq!(
        (
            st["services_degraded"].as_bool(),
            st["kept_frontends"].as_u64()
        ),
        (Some(true), Some(1)),
        "{st}"
    );
    assert!(node.daemon_log().contains("degraded start"));
    // Changes to loaded objects still work while degraded.
    node.delete(&service("other", "10.96.3.2", 80, 8080, "TCP", &[], ""))
        .unwrap();
    assert!(tcp_ask_full(&client.ns, "10.96.3.2", 80).is_err());
    // Applied again (valid): loaded, no longer degraded, and it is an ordinary object again.
    node.apply(&old).unwrap();
    let st = node.status_json().unwrap();
    assert_eq!(
        (
            st["services_degraded"].as_bool(),
            st["kept_frontends"].as_u64()
        ),
        (Some(false), Some(0)),
        "{st}"
    );
    assert!(serves(&client, "10.96.3.1", &b));
    node.delete(&old).unwrap();
    assert!(tcp_ask_full(&client.ns, "10.96.3.1", 80).is_err());
}

/// A conflist for network `name` (sluice alone) in the node's net.d.
fn network(node: &SluiceNode, name: &str) {
    let list = serde_json::json!({"cniVersion": "1.0.0", "name": name,
        "plugins": [{"type": "sluice", "socket": node.socket(), "mtu": 1500}]});
    std::fs::write(
        node.netconf_dir().join(format!("20-{name}.conflist")),
        serde_json::to_vec_pretty(&list).unwrap(),
    )
    .unwrap();
}

/// A pod added to network `net` with cnitool: (its netns, its host-side interface).
fn pod_in(node: &SluiceNode, net: &str) -> (Netns, String) {
    let ns = Netns::new("p").unwrap();
    let out = node
        .ns
        .command("cnitool")
        .args(["add", net])
        .arg(ns.path())
        .env(
            "CNI_PATH",
            format!("{}:/usr/lib/cni", plugin_dir().display()),
        )
        .env("NETCONFPATH", node.netconf_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cnitool add {net}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let host_if = v["interfaces"][0]["name"].as_str().unwrap().to_string();
    (ns, host_if)
}

fn link_exists(node: &SluiceNode, name: &str) -> bool {
    node.ns
        .command("ip")
        .args(["link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn cni_gc_releases_only_its_networks_allocations_and_not_an_add_in_flight() {
    let node = SluiceNode::new().unwrap();
    let (neta, netb) = (unique("na"), unique("nb"));
    network(&node, &neta);
    network(&node, &netb);
    let (_pa, a_if) = pod_in(&node, &neta);
    let (_pb, b_if) = pod_in(&node, &netb);
    // An ADD of network a in flight: its IP allocated, its programs not attached yet.
    let in_flight = unique("if");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut c = sluice_core::client::connect(&node.socket(), Duration::from_secs(5))
            .await
            .unwrap();
        c.allocate(sluice_core::proto::AllocateRequest {
            r#ref: Some(sluice_core::proto::AttachmentRef {
                container_id: in_flight.clone(),
                ifname: "eth0".into(),
            }),
            netns: "/run/netns/none".into(),
            host_ifname: "slinflight0".into(),
            pod_namespace: String::new(),
            pod_name: String::new(),
            network: neta.clone(),
        })
        .await
        .unwrap();
    });
    // The runtime collects network a and lists nothing as valid.
    let mut conf = node.plugin_conf("1.1.0");
    conf["name"] = neta.clone().into();
    conf["cni.dev/valid-attachments"] = serde_json::json!([]);
    let out = node.plugin(&[("CNI_COMMAND", "GC")], &conf);
    assert!(
        out.status.success(),
        "GC: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let atts: Vec<(String, String, bool)> = node.status_json().unwrap()["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["network"].as_str().unwrap().to_string(),
                a["host_ifname"].as_str().unwrap().to_string(),
                a["attached"].as_bool().unwrap(),
            )
        })
        .collect();
    assert!(
        !atts.iter().any(|(_, h, _)| *h == a_if),
        "network a's pod released: {atts:?}"
    );
    assert!(!link_exists(&node, &a_if), "and its link deleted");
    assert!(
        atts.contains(&(netb.clone(), b_if.clone(), true)) && link_exists(&node, &b_if),
        "network b's pod untouched: {atts:?}"
    );
    assert!(
        atts.contains(&(neta.clone(), "slinflight0".into(), false)),
        "the ADD in flight untouched: {atts:?}"
    );
}
