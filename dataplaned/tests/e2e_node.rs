//! End to end on one node (real sluiced, real plugin, real cnitool, real kernel): pod traffic and
//! counters, daemon restarts (kill -9 and SIGTERM) without interrupting pods, IPAM crash safety,
//! reconciliation of DELs the daemon missed, clsact fallback, cleanup.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use common::*;

fn ping(from: &Netns, to: &str) -> bool {
    from.command("ping")
        .args(["-c", "1", "-W", "2", to])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[test]
fn pods_reach_each_other_and_the_node_and_counters_count() {
    let node = SluiceNode::new().unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    assert_ne!(a.ip, b.ip);
    let _srv = echo_server(&b.ns, 8080).unwrap();
    assert_eq!(
        tcp_ask(&a.ns, &b.ip, 8080).unwrap(),
        a.ip,
        "pod-to-pod TCP, server sees the client pod's IP"
    );
    assert!(ping(&node.ns, &a.ip), "node -> pod");
    assert!(ping(&a.ns, &node.node_ip), "pod -> node");
    assert!(
        ping(&node.ext, &a.ip),
        "external host -> pod through the node"
    );

    let st = node.status_json().unwrap();
    assert_eq!(st["ready"], true);
    assert_eq!(st["pod_cidr"], "10.244.0.0/24");
    assert_eq!(st["attach_mode"], mode());
    let atts = st["attachments"].as_array().unwrap();
    assert_eq!(atts.len(), 2);
    for att in atts {
        assert_eq!(att["attached"], true);
        let c = &att["counters"];
        assert!(c["tx_packets"].as_u64().unwrap() >= 3, "{att}");
        assert!(c["rx_packets"].as_u64().unwrap() >= 3, "{att}");
        assert!(c["tx_bytes"].as_u64().unwrap() > 100, "{att}");
    }
    let names: Vec<&str> = st["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["from_pod", "to_pod", "from_net", "to_net"]);
    // The table form shows the same.
    let table = String::from_utf8(node.sluicectl(&["status"]).unwrap().stdout).unwrap();
    assert!(
        table.contains(&a.ip) && table.contains(mode()) && table.contains("from_pod"),
        "{table}"
    );
}

/// A TCP client in `ns` that keeps one connection open and does a round trip every 20 ms for
/// `secs` seconds; exits 1 on the first failure (a stall longer than 2 s counts).
fn steady_client(ns: &Netns, addr: &str, port: u16, secs: u32) -> Proc {
    let script = format!(
        r#"
import socket, time, sys
c = socket.create_connection(('{addr}', {port}), 3); c.settimeout(2)
f = c.makefile('rwb'); n = 0; end = time.time() + {secs}
while time.time() < end:
    f.write(b'x\n'); f.flush()
    if not f.readline(): print('closed after', n); sys.exit(1)
    n += 1; time.sleep(0.02)
print(n)
"#
    );
    Proc::spawn(
        "client",
        ns.command("python3")
            .args(["-c", &script])
            .stdout(Stdio::piped()),
    )
    .unwrap()
}

#[test]
fn kill9_and_restart_keeps_pods_connected_and_readopts_them() {
    let mut node = SluiceNode::new().unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _srv = echo_server(&b.ns, 9000).unwrap();
    let before = node.status_json().unwrap();
    for pod in [&a, &b] {
        assert!(
            node.programs_attached(pod),
            "{pod:?} has both programs attached",
            pod = pod.ip
        );
    }

    let mut client = steady_client(&a.ns, &b.ip, 9000, 4);
    std::thread::sleep(Duration::from_millis(500));
    node.kill9_daemon();
    // While the daemon is gone the datapath keeps working.
    assert!(ping(&a.ns, &b.ip));
    std::thread::sleep(Duration::from_millis(500));
    node.start_daemon().unwrap();
    let status = client.child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(client.child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        status.success(),
        "the long-lived connection broke across kill -9 + restart: {out}"
    );
    assert!(out.trim().parse::<u32>().unwrap() > 50, "{out}");

    let after = node.status_json().unwrap();
    assert_eq!(after["attachments"].as_array().unwrap().len(), 2);
    for (x, y) in before["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .zip(after["attachments"].as_array().unwrap())
    {
        assert_eq!(x["ip"], y["ip"]);
        assert_eq!(y["attached"], true);
        // Counters live in pinned maps: they survived and kept counting.
        assert!(
            y["counters"]["tx_packets"].as_u64() > x["counters"]["tx_packets"].as_u64(),
            "{x} {y}"
        );
    }
    // The same build with the same flags keeps the pinned programs (no verifier run at start).
    let ids = |s: &serde_json::Value| {
        s["programs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&before), ids(&after));
    assert!(node.daemon_log().contains("kept (not loaded again)"));
    // Other programs (a configuration written into them changed): loaded and swapped into the
    // existing attachments, while the connection keeps its round trips.
    let mut client = steady_client(&a.ns, &b.ip, 9000, 3);
    std::thread::sleep(Duration::from_millis(300));
    node.kill9_daemon();
    node.extra_args = vec!["--ct-timeout-syn".into(), "61".into()];
    node.start_daemon().unwrap();
    let status = client.child.wait().unwrap();
    assert!(
        status.success(),
        "the connection broke across a restart with new programs"
    );
    let swapped = node.status_json().unwrap();
    assert!(
        ids(&swapped).iter().zip(ids(&after)).all(|(x, y)| *x != y),
        "new programs: {:?} after {:?}",
        ids(&swapped),
        ids(&after)
    );
    for pod in [&a, &b] {
        assert!(node.programs_attached(pod));
    }
    assert_eq!(tcp_ask(&a.ns, &b.ip, 9000).unwrap(), a.ip);
    // IPAM survived: a new pod gets a fresh address.
    let c = node.add_pod().unwrap();
    assert!(c.ip != a.ip && c.ip != b.ip);
}

/// `--attach-mode fast` on a tcx kernel: ADD attaches clsact filters (no RCU grace periods on
/// the ADD's path), and the daemon moves the pod to tcx links once ADDs are quiet, while its
/// connection keeps doing round trips every 20 ms.
#[test]
fn pods_attached_with_clsact_at_add_move_to_tcx_links_without_a_stall() {
    assert_eq!(
        mode(),
        "tcx",
        "this kernel has tcx (6.6+): the move is what is tested"
    );
    let node = SluiceNode::with_args(&["--attach-mode", "fast"]).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let modes = |st: &serde_json::Value| -> Vec<String> {
        st["attachments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["attach_mode"].as_str().unwrap_or("").to_string())
            .collect()
    };
    // Right after the ADDs (the move waits for 2 s without one).
    let st = node.status_json().unwrap();
    assert_eq!(modes(&st), ["tc", "tc"], "{st}");
    assert!(node.tc_filters(&a) && node.tc_filters(&b));
    assert!(!node.tcx_links(&a) && !node.tcx_links(&b));
    assert_eq!(
        st["attach_mode"], "tcx",
        "the daemon's mode is where pods end up"
    );

    let _srv = echo_server(&b.ns, 9000).unwrap();
    let mut client = steady_client(&a.ns, &b.ip, 9000, 6);
    let moved = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        modes(&node.status_json().unwrap()) == ["tcx", "tcx"]
    });
    assert!(moved, "pods still not on tcx links 10 s after the last ADD");
    for pod in [&a, &b] {
        assert!(node.tcx_links(pod), "{} has pinned tcx links", pod.ip);
        assert!(
            !node.any_tc_filter(pod),
            "{}: the clsact filters are gone",
            pod.ip
        );
    }
    let status = client.child.wait().unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(client.child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert!(
        status.success(),
        "the connection stalled during the move: {out}"
    );
    assert!(out.trim().parse::<u32>().unwrap() > 100, "{out}");
    // Both directions still pass through sluice's programs (the counters of the links' programs).
    let before = node.status_json().unwrap();
    assert_eq!(tcp_ask(&a.ns, &b.ip, 9000).unwrap(), a.ip);
    let after = node.status_json().unwrap();
    let tx = |s: &serde_json::Value, i: usize| {
        s["attachments"][i]["counters"]["tx_packets"]
            .as_u64()
            .unwrap()
    };
    assert!(tx(&after, 0) > tx(&before, 0) && tx(&after, 1) > tx(&before, 1));
}

#[test]
fn sigterm_leaves_the_datapath_running_and_cleanup_removes_it() {
    let mut node = SluiceNode::new().unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let tx = |st: &serde_json::Value| {
        st["attachments"][0]["counters"]["tx_packets"]
            .as_u64()
            .unwrap()
    };
    let before = tx(&node.status_json().unwrap());
    node.stop_daemon().unwrap();
    assert!(
        node.bpffs.join("maps/sl_ct_v2").exists() && node.bpffs.join("progs/from_pod").exists()
    );
    assert!(
        node.programs_attached(&a) && node.programs_attached(&b),
        "programs stay attached after SIGTERM"
    );
    for _ in 0..5 {
        assert!(ping(&a.ns, &b.ip));
        assert!(ping(&b.ns, &a.ip));
    }
    // The programs kept running (and counting) while no daemon was there.
    node.start_daemon().unwrap();
    assert!(tx(&node.status_json().unwrap()) >= before + 10);
    node.stop_daemon().unwrap();

    let cleanup = node
        .ns
        .command(SLUICED)
        .arg("--cleanup")
        .arg("--socket")
        .arg(node.socket())
        .arg("--state-dir")
        .arg(node.state_dir())
        .arg("--bpffs")
        .arg(&node.bpffs)
        .output()
        .unwrap();
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert!(!node.bpffs.exists(), "pins removed");
    assert!(!node.state_dir().exists(), "state removed");
    // Programs detached; the kernel still routes the pods.
    assert!(ping(&a.ns, &b.ip));
}

#[test]
fn del_while_the_daemon_is_down_succeeds_and_the_ip_is_reconciled_at_start() {
    let mut node = SluiceNode::new().unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    node.kill9_daemon();
    let del = node.cnitool("del", &a.ns);
    assert!(
        del.status.success(),
        "DEL must succeed with the daemon down: {}",
        String::from_utf8_lossy(&del.stderr)
    );
    let host_if = a.result["interfaces"][0]["name"].as_str().unwrap();
    assert!(
        node.ns.ip(&["link", "show", host_if]).is_err(),
        "DEL removed the veth locally"
    );

    node.start_daemon().unwrap();
    let st = node.status_json().unwrap();
    let ips: Vec<&str> = st["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["ip"].as_str().unwrap())
        .collect();
    assert_eq!(
        ips,
        [b.ip.as_str()],
        "the leaked allocation was released at start"
    );
    assert!(!std::fs::read_dir(node.bpffs.join("links"))
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with(host_if)));
}

#[test]
fn ipam_never_duplicates_or_loses_an_ip_across_kill9_during_parallel_adds() {
    let mut node = SluiceNode::new().unwrap();
    let pods: Vec<Netns> = (0..32).map(|_| Netns::new("p").unwrap()).collect();
    let results: Vec<(usize, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let node = &node;
                s.spawn(move || {
                    let out = node.cnitool("add", ns);
                    let ip = out.status.success().then(|| result_ip(&out.stdout));
                    (i, ip)
                })
            })
            .collect();
        // The daemon dies mid-flight, once allocations are being made: some ADDs fail, none may
        // corrupt IPAM.
        let ipam = node.state_dir().join("ipam");
        wait_for("the first allocations", Duration::from_secs(20), || {
            Ok(std::fs::read_dir(&ipam).map(|d| d.count()).unwrap_or(0) >= 4)
        })
        .unwrap();
        let pid = node.daemon.as_ref().unwrap().pid();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    node.kill9_daemon();
    node.start_daemon().unwrap();

    let ok: Vec<(usize, String)> = results
        .iter()
        .filter_map(|(i, ip)| ip.clone().map(|ip| (*i, ip)))
        .collect();
    assert!(
        ok.len() < 32,
        "the kill landed while ADDs were in flight ({} of 32 succeeded)",
        ok.len()
    );
    let distinct: HashSet<&String> = ok.iter().map(|(_, ip)| ip).collect();
    assert_eq!(
        distinct.len(),
        ok.len(),
        "duplicate IPs among successful ADDs: {ok:?}"
    );
    let st = node.status_json().unwrap();
    let held: HashSet<String> = st["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ip"].as_str().unwrap().to_string())
        .collect();
    for (_, ip) in &ok {
        assert!(
            held.contains(ip),
            "IP {ip} returned by a successful ADD was lost; daemon holds {held:?}"
        );
    }

    // The runtime retries the failed ones (DEL, then ADD): in the end 32 distinct working IPs.
    let mut all = HashSet::new();
    for (i, ns) in pods.iter().enumerate() {
        let ip = match results[i].1.clone() {
            Some(ip) => ip,
            None => {
                let _ = node.cnitool("del", ns);
                let out = node.cnitool("add", ns);
                assert!(
                    out.status.success(),
                    "retry ADD: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                result_ip(&out.stdout)
            }
        };
        assert!(all.insert(ip.clone()), "duplicate {ip}");
    }
    assert_eq!(all.len(), 32);
    for ip in &all {
        assert!(ping(&node.ns, ip), "node -> {ip}");
    }
    eprintln!("{} of 32 ADDs succeeded before the kill", ok.len());
}

#[test]
fn clsact_fallback_mode_serves_pods() {
    let node = SluiceNode::with_args(&["--attach-mode", "tc"]).unwrap();
    let a = node.add_pod().unwrap();
    let b = node.add_pod().unwrap();
    let _srv = echo_server(&b.ns, 8081).unwrap();
    assert_eq!(tcp_ask(&a.ns, &b.ip, 8081).unwrap(), a.ip);
    let st = node.status_json().unwrap();
    assert_eq!(st["attach_mode"], "tc");
    let host_if = a.result["interfaces"][0]["name"].as_str().unwrap();
    let filters = String::from_utf8(
        node.ns
            .command("tc")
            .args(["filter", "show", "dev", host_if, "ingress"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(filters.contains("from_pod"), "{filters}");
    assert!(
        st["attachments"][0]["counters"]["tx_packets"]
            .as_u64()
            .unwrap()
            > 0
    );
}
