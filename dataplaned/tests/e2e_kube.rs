//! The Kubernetes watch against a real kube-apiserver 1.20.2 + etcd (scripts/kube-apiserver.sh,
//! built from Debian's source when missing): Services, EndpointSlices (v1beta1 on this server)
//! and Nodes written through the API reach the maps and real traffic; restarts with pinned maps
//! keep serving before the first list; a 410 relist removes what was deleted while the watch was
//! down; an API server outage keeps traffic flowing and turns CNI STATUS not ready after the
//! limit; `/healthz`, `/livez` and `/metrics` answer as kube-proxy's.
//!
//! sluiced runs in the node's network namespace and the API server on the host's 127.0.0.1: a
//! relay (a listening socket made inside the node's namespace, connections made from the host's)
//! joins them on 127.0.0.1 inside the node, so the server's certificate (SAN 127.0.0.1) verifies.
//! The relay can be cut (every connection closed, new ones refused) to take the API server away
//! from sluiced alone.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cni_conformance::fixture::{run, wait_for, Netns};
use cni_conformance::kube::KubeApiServer;
use common::*;
use serde_json::{json, Value};

/// A TCP relay from 127.0.0.1:`port` inside a network namespace to `target` on the host.
struct Relay {
    port: u16,
    cut: Arc<AtomicBool>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn into_netns(ns: &Netns, target: SocketAddr) -> Result<Relay> {
        let ns_file = std::fs::File::open(ns.path())?;
        let (tx, rx) = std::sync::mpsc::channel();
        let cut = Arc::new(AtomicBool::new(false));
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (c, l) = (cut.clone(), live.clone());
        std::thread::spawn(move || {
            // A socket stays in the namespace it was made in: make the listener inside, then
            // come back so that connections to the target are made from the host.
            let host = std::fs::File::open("/proc/thread-self/ns/net").expect("own netns");
            let made = (|| -> Result<TcpListener> {
                nix::sched::setns(ns_file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                let listener = TcpListener::bind("127.0.0.1:0")?;
                nix::sched::setns(host.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(listener)
            })();
            let listener = match made {
                Ok(l) => l,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let _ = tx.send(Ok(listener.local_addr().unwrap().port()));
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if c.load(Ordering::SeqCst) {
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(up) = TcpStream::connect(target) else {
                    let _ = conn.shutdown(Shutdown::Both);
                    continue;
                };
                {
                    let mut l = l.lock().unwrap();
                    // Cut while this one was being connected: it must not survive the cut.
                    if c.load(Ordering::SeqCst) {
                        let _ = conn.shutdown(Shutdown::Both);
                        let _ = up.shutdown(Shutdown::Both);
                        continue;
                    }
                    l.push(conn.try_clone().unwrap());
                    l.push(up.try_clone().unwrap());
                }
                for (mut a, mut b) in [
                    (conn.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, conn),
                ] {
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            match a.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => {
                                    if b.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            }
                        }
                        let _ = b.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        let port = rx.recv()??;
        Ok(Relay { port, cut, live })
    }

    /// Closes every relayed connection and refuses new ones: the API server is away.
    fn cut(&self) {
        let mut live = self.live.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for s in live.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// A kubeconfig for sluiced in the node: the relay's address, the server's CA and token.
fn node_kubeconfig(kube: &KubeApiServer, relay: &Relay, dir: &std::path::Path) -> Result<String> {
    let path = dir.join("node-kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    certificate-authority: {}\nusers:\n- name: test\n  user:\n    token: {}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
        relay.port,
        kube.ca_path().display(),
        kube.token()
    );
    std::fs::write(&path, text)?;
    Ok(path.display().to_string())
}

fn target_of(kube: &KubeApiServer) -> Result<SocketAddr> {
    let hostport = kube
        .url()
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    hostport
        .parse()
        .with_context(|| format!("API server URL {}", kube.url()))
}

fn service(name: &str, ip: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "tcp", "port": port, "targetPort": 8080, "protocol": "TCP"}]}})
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "port": 8080, "protocol": "TCP"}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true},
            "topology": {"kubernetes.io/hostname": "test-node"}})).collect::<Vec<_>>()})
}

fn own_node(finalizer: bool) -> Value {
    own_node_with(finalizer, "10.244.0.0/24")
}

fn own_node_with(finalizer: bool, pod_cidr: &str) -> Value {
    let mut n = json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "test-node", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.200.1"}]}});
    if finalizer {
        n["metadata"]["finalizers"] = json!(["sluice.test/hold"]);
    }
    n
}

/// The endpoints the maps serve for `name` (from `sluicectl get services -o json`).
fn served(node: &SluiceNode, name: &str) -> Result<Vec<String>> {
    let v = node.get_json("services")?;
    let mut out = Vec::new();
    for s in v["services"].as_array().into_iter().flatten() {
        if s["name"] == name {
            for e in s["endpoints"].as_array().into_iter().flatten() {
                if !e["slot"].is_null() {
                    out.push(e["ip"].as_str().unwrap_or("").to_string());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

fn kube_source(node: &SluiceNode) -> Result<Value> {
    let st = node.status_json()?;
    st["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["name"].as_str().unwrap_or("").starts_with("kubernetes"))
        .cloned()
        .context("no kubernetes source in status")
}

/// CNI STATUS through the real plugin: Ok, or the error JSON's (code, details).
fn cni_status(node: &SluiceNode) -> Result<std::result::Result<(), (u64, String)>> {
    let out = node.plugin(&[("CNI_COMMAND", "STATUS")], &node.plugin_conf("1.1.0"));
    if out.status.success() {
        return Ok(Ok(()));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("STATUS output: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(Err((
        v["code"].as_u64().unwrap_or(0),
        format!("{} {}", v["msg"], v["details"]),
    )))
}

/// GET http://127.0.0.1:`port``path` inside the node: (status code, body).
fn http_get(node: &SluiceNode, port: u16, path: &str) -> Result<(u16, String)> {
    let out = run(node.ns.command("curl").args([
        "-s",
        "-m",
        "5",
        "-w",
        "\n%{http_code}",
        &format!("http://127.0.0.1:{port}{path}"),
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse().unwrap_or(0), body.to_string()))
}

fn start_node(kube: &KubeApiServer, extra: &[&str]) -> Result<(SluiceNode, Relay)> {
    start_node_with(kube, extra, Some("10.244.0.0/24"))
}

fn start_node_with(
    kube: &KubeApiServer,
    extra: &[&str],
    pod_cidr: Option<&str>,
) -> Result<(SluiceNode, Relay)> {
    // The node's namespace must exist before the relay: a node without a daemon first.
    let mut node = SluiceNode::with_args(&[])?;
    node.stop_daemon()?;
    std::fs::remove_dir_all(node.state_dir())?;
    node.pod_cidr = pod_cidr.map(str::to_string);
    let relay = Relay::into_netns(&node.ns, target_of(kube)?)?;
    let kc = node_kubeconfig(kube, &relay, node.dir.path())?;
    node.extra_args = ["--kubeconfig", &kc, "--kube-unreachable-limit", "3"]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
    node.start_daemon()?;
    Ok((node, relay))
}

fn wait_synced(node: &SluiceNode, within: Duration) -> Result<()> {
    wait_for("the first sync from the API server", within, || {
        Ok(kube_source(node)?["sync_state"]
            .as_str()
            .unwrap_or("")
            .starts_with("synced"))
    })
    .with_context(|| node.daemon_log())
}

#[test]
fn watched_objects_reach_the_datapath_through_restarts_and_api_outages() -> Result<()> {
    let kube = KubeApiServer::start(&[])?;
    kube.create(&own_node(true))?;
    let (mut node, relay) = start_node(&kube, &[])?;
    wait_synced(&node, Duration::from_secs(30))?;
    ensure!(cni_status(&node)?.is_ok(), "STATUS after the first sync");
    let src = kube_source(&node)?;
    ensure!(
        src["server"].as_str().unwrap_or("").contains("v1.20.2")
            && src["server"].as_str().unwrap_or("").contains("v1beta1"),
        "status names the server and the slice version: {src}"
    );

    let backend = node.add_pod()?;
    let b2 = node.add_pod()?;
    let client = node.add_pod()?;
    let _e1 = echo_server(&backend.ns, 8080)?;
    let _e2 = echo_server(&b2.ns, 8080)?;

    // A Service and its slice written through the API reach the maps: time it.
    let t = Instant::now();
    kube.create(&service("web", "10.96.7.7", 80))?;
    kube.create(&slice("web-1", "web", &[&backend.ip]))?;
    let written = t.elapsed();
    wait_for(
        "the watched service in the maps",
        Duration::from_secs(10),
        || Ok(served(&node, "web")? == [backend.ip.clone()]),
    )
    .with_context(|| {
        format!(
            "{}\n{}",
            node.get_json("services")
                .map(|v| v.to_string())
                .unwrap_or_default(),
            node.daemon_log()
        )
    })?;
    eprintln!(
        "API writes took {:?}; the service was in the maps {:?} after the first write",
        written,
        t.elapsed()
    );
    let (seen, server) = tcp_ask_full(&client.ns, "10.96.7.7", 80)?;
    ensure!(
        seen == client.ip && server == backend.ip,
        "the backend sees the client's own IP ({seen} from {server})"
    );

    // A second slice for the same Service: merged.
    kube.create(&slice("web-2", "web", &[&b2.ip]))?;
    let mut both = vec![backend.ip.clone(), b2.ip.clone()];
    both.sort();
    wait_for("both slices served", Duration::from_secs(10), || {
        Ok(served(&node, "web")? == both)
    })?;

    // A restart while the API server is cut off: pinned maps keep serving, nothing is pruned
    // before the first list, STATUS is not ready until it comes.
    relay.cut();
    node.stop_daemon()?;
    node.start_daemon()?;
    let st = node.status_json()?;
    ensure!(
        st["services_degraded"] == true && st["kept_frontends"].as_u64() >= Some(2),
        "a restarted daemon that has not listed keeps what the maps hold: {st}"
    );
    let (seen, _) = tcp_ask_full(&client.ns, "10.96.7.7", 80)?;
    ensure!(seen == client.ip, "traffic flows before the first list");
    match cni_status(&node)? {
        Err((50, why)) => ensure!(why.contains("waiting for the first list"), "{why}"),
        other => bail!("STATUS before the first list: {other:?}"),
    }
    // Meanwhile the slice web-2 goes: the list after the restart must drop it.
    kube.delete(&slice("web-2", "web", &[]))?;
    relay.restore();
    wait_synced(&node, Duration::from_secs(30))?;
    wait_for(
        "the deleted slice gone after the list",
        Duration::from_secs(10),
        || Ok(served(&node, "web")? == [backend.ip.clone()]),
    )?;
    ensure!(cni_status(&node)?.is_ok(), "STATUS ready after the list");

    // The API server away: traffic keeps flowing; STATUS turns not ready after the limit (3 s)
    // and recovers when it is back.
    kube.stop_apiserver(false)?;
    let (seen, _) = tcp_ask_full(&client.ns, "10.96.7.7", 80)?;
    ensure!(seen == client.ip, "traffic flows with the API server away");
    wait_for("STATUS not ready", Duration::from_secs(30), || {
        Ok(matches!(cni_status(&node)?, Err((50, ref w)) if w.contains("unreachable")))
    })?;
    let (seen, _) = tcp_ask_full(&client.ns, "10.96.7.7", 80)?;
    ensure!(seen == client.ip, "still flowing");
    kube.start_apiserver()?;
    wait_for("STATUS ready again", Duration::from_secs(30), || {
        Ok(cni_status(&node)?.is_ok())
    })?;
    // And the watch works again: an endpoint change goes through.
    kube.update(&slice("web-1", "web", &[&b2.ip]))?;
    wait_for(
        "the change after the outage",
        // the slice watcher may still be in its backoff (up to ~30 s)
        Duration::from_secs(60),
        || Ok(served(&node, "web")? == [b2.ip.clone()]),
    )?;

    // Health as kube-proxy's; then this Node is deleted (held by a finalizer): not eligible.
    // (Each watcher reconnects after the outage on its own backoff, client-go's 0.8-30 s.)
    let (code, body) = http_get(&node, 10256, "/healthz")?;
    ensure!(code == 200, "/healthz {code} {body}");
    let h: Value = serde_json::from_str(&body)?;
    ensure!(
        h["nodeEligible"] == true && h["lastUpdated"].is_string() && h["currentTime"].is_string(),
        "{h}"
    );
    kube.delete(&own_node(false))?;
    wait_for(
        "/healthz 503 for a node being deleted",
        Duration::from_secs(60),
        || Ok(http_get(&node, 10256, "/healthz")?.0 == 503),
    )?;
    let (code, body) = http_get(&node, 10256, "/healthz")?;
    ensure!(
        code == 503 && serde_json::from_str::<Value>(&body)?["nodeEligible"] == false,
        "{body}"
    );
    ensure!(
        http_get(&node, 10256, "/livez")?.0 == 200,
        "livez ignores eligibility"
    );

    // Metrics, parsed by a Prometheus text parser (counters are this daemon process's: one
    // ADD since the restart).
    let _late = node.add_pod()?;
    let (code, text) = http_get(&node, 10249, "/metrics")?;
    ensure!(code == 200, "/metrics {code}");
    for l in text.lines().filter(|l| {
        l.starts_with("sluice_kubernetes")
            || l.starts_with("sluice_cni_requests")
            || l.starts_with("sluice_sync_duration_seconds_count")
            || l.starts_with("sluice_sync_duration_seconds_sum")
            || l.contains("name=\"web\"")
    }) {
        eprintln!("scraped: {l}");
    }
    let lines: Vec<std::io::Result<String>> = text.lines().map(|l| Ok(l.to_string())).collect();
    let scrape = prometheus_parse::Scrape::parse(lines.into_iter())?;
    let value = |name: &str, want: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && want.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    ensure!(
        value("sluice_kubernetes_synced", &[]) == Some(1.0),
        "synced gauge\n{text}"
    );
    ensure!(
        value(
            "sluice_kubernetes_watch_events_total",
            &[("resource", "endpointslices")]
        )
        .is_some_and(|v| v >= 3.0),
        "watch events\n{text}"
    );
    ensure!(
        value(
            "sluice_cni_requests_total",
            &[("verb", "ADD"), ("outcome", "success")]
        ) == Some(1.0)
            && value(
                "sluice_cni_requests_total",
                &[("verb", "STATUS"), ("outcome", "error")]
            )
            .is_some_and(|v| v >= 1.0),
        "one ADD, STATUS not ready at least once\n{text}"
    );
    ensure!(
        value("sluice_service_packets_total", &[("name", "web")]).is_some_and(|v| v > 0.0),
        "service packets\n{text}"
    );
    ensure!(
        value("sluice_ipam_allocated_addresses", &[]) == Some(4.0),
        "ipam\n{text}"
    );
    ensure!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric == "sluice_sync_duration_seconds_count"
                && s.labels.get("source") == Some("kubernetes")),
        "sync histogram\n{text}"
    );

    // Deleting the Service through the API removes its frontend.
    kube.delete(&service("web", "", 0))?;
    wait_for("the service gone", Duration::from_secs(10), || {
        Ok(!node.get_json("services")?["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "web"))
    })?;
    drop(relay);
    Ok(())
}

#[test]
fn a_relist_after_410_removes_what_was_deleted_while_the_watch_was_down() -> Result<()> {
    // No watch cache and compaction every 5 s: a watch resumed from an old resourceVersion gets
    // 410 Expired, and the watcher must relist.
    let kube = KubeApiServer::start(&["--watch-cache=false", "--etcd-compaction-interval=5s"])?;
    // This node takes its pod CIDR from its Node (no --pod-cidr), as in a DaemonSet.
    kube.create(&own_node_with(false, "10.244.5.0/24"))?;
    kube.create(&service("a", "10.96.8.1", 80))?;
    kube.create(&slice("a-1", "a", &["10.244.0.201"]))?;
    kube.create(&service("b", "10.96.8.2", 80))?;
    kube.create(&slice("b-1", "b", &["10.244.0.202"]))?;
    let (node, relay) = start_node_with(&kube, &[], None)?;
    wait_synced(&node, Duration::from_secs(30))?;
    ensure!(served(&node, "b")? == ["10.244.0.202"]);
    let st = node.status_json()?;
    ensure!(
        st["pod_cidr"] == "10.244.5.0/24",
        "the pod CIDR is the Node's: {}",
        st["pod_cidr"]
    );
    let pod = node.add_pod()?;
    ensure!(
        pod.ip.starts_with("10.244.5."),
        "a pod's IP from the Node's CIDR: {}",
        pod.ip
    );
    relay.cut();
    kube.delete(&slice("b-1", "b", &[]))?;
    kube.delete(&service("b", "", 0))?;
    // Move the revision on and let compaction pass the watch's resourceVersion.
    for i in 0..5 {
        kube.create(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("churn-{i}"), "namespace": "default"}}))?;
    }
    std::thread::sleep(Duration::from_secs(12));
    relay.restore();
    wait_for("b gone after the relist", Duration::from_secs(60), || {
        Ok(!node.get_json("services")?["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["name"] == "b"))
    })
    .with_context(|| node.daemon_log())?;
    ensure!(served(&node, "a")? == ["10.244.0.201"], "a stays");
    let log = node.daemon_log();
    ensure!(
        log.contains("410") || log.contains("Expired") || log.contains("expired"),
        "the watch saw a 410:\n{log}"
    );
    Ok(())
}
