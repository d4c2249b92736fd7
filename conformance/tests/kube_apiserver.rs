//! The real kube-apiserver fixture (cni_conformance::kube): it starts, serves the objects
//! sluiced will watch with the feature-gated EndpointSlice fields intact, its kubeconfig works
//! with kubectl, extra flags reach the server, several run side by side, and nothing is left
//! running after a drop or when the test process dies.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cni_conformance::fixture::{self, unique, wait_for, TempDir};
use cni_conformance::kube::{script_path, KubeApiServer};
use serde_json::{json, Value};

fn start(flags: &[&str]) -> KubeApiServer {
    let k = KubeApiServer::start(flags).unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "kube-apiserver ready at {} in {:?}",
        k.url(),
        k.started_in()
    );
    k
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
}

#[test]
fn services_slices_and_nodes_round_trip_with_feature_gated_fields() {
    let k = start(&[]);
    let version = k.get("/version").unwrap();
    assert_eq!(version["gitVersion"], "v1.20.2", "{version}");

    // The namespaces a fresh server bootstraps (manifests go to kube-system).
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        k.get(&format!("/api/v1/namespaces/{ns}"))
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    // 1.20 serves EndpointSlices only as v1beta1.
    let group = k.get("/apis/discovery.k8s.io").unwrap();
    let versions: Vec<&str> = group["versions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["version"].as_str())
        .collect();
    assert!(versions.contains(&"v1beta1"), "{group}");

    let ns = unique("ns");
    k.create(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .unwrap();

    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "ipFamilyPolicy": "PreferDualStack",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            "sessionAffinity": "ClientIP",
        },
    });
    let created = k.create(&svc).unwrap();
    let ips: Vec<&str> = created["spec"]["clusterIPs"]
        .as_array()
        .expect("clusterIPs")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ips.len(), 2, "dual-stack service: {created}");
    assert!(ips[0].starts_with("10.96."), "{ips:?}");
    assert!(ips[1].starts_with("fd00:10:96::"), "{ips:?}");

    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {
            "name": "web-a", "namespace": ns,
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": ["10.244.0.11"],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": "node-a",
                "topology": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "zone-1"},
            },
            {
                "addresses": ["10.244.0.12"],
                "conditions": {"ready": false, "serving": true, "terminating": true},
                "nodeName": "node-b",
            },
        ],
    });
    k.create(&slice).unwrap();
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": format!("{ns}-node-a"),
            "labels": {"topology.kubernetes.io/zone": "zone-1", "kubernetes.io/hostname": "node-a"},
        },
        "spec": {"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]},
    });
    k.create(&node).unwrap();

    // Read back: the gated fields survived (without the gates the server drops them silently).
    let got = k.get_object(&slice).unwrap();
    let eps = got["endpoints"].as_array().expect("endpoints");
    assert_eq!(eps.len(), 2, "{got}");
    assert_eq!(
        eps[0]["conditions"],
        json!({"ready": true, "serving": true, "terminating": false}),
        "{got}"
    );
    assert_eq!(
        eps[1]["conditions"],
        json!({"ready": false, "serving": true, "terminating": true}),
        "{got}"
    );
    assert_eq!(eps[0]["nodeName"], "node-a", "{got}");
    assert_eq!(eps[1]["nodeName"], "node-b", "{got}");
    assert_eq!(eps[0]["topology"]["topology.kubernetes.io/zone"], "zone-1");
    assert_eq!(got["ports"][0]["name"], "http");
    let got_svc = k.get_object(&svc).unwrap();
    assert_eq!(got_svc["spec"]["sessionAffinity"], "ClientIP");
    assert_eq!(
        got_svc["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"], 10800,
        "defaulted: {got_svc}"
    );
    let got_node = k.get_object(&node).unwrap();
    assert_eq!(
        got_node["metadata"]["labels"]["topology.kubernetes.io/zone"],
        "zone-1"
    );
    assert_eq!(got_node["spec"]["podCIDR"], "10.244.0.0/24");

    // Selecting by the service-name label and the node by field selector, as sluiced will.
    let list = k
        .get(&format!(
            "/apis/discovery.k8s.io/v1beta1/namespaces/{ns}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dweb"
        ))
        .unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1, "{list}");
    let nodes = k
        .get(&format!(
            "/api/v1/nodes?fieldSelector=metadata.name%3D{ns}-node-a"
        ))
        .unwrap();
    assert_eq!(nodes["items"].as_array().unwrap().len(), 1, "{nodes}");

    // Update: the second endpoint finished terminating and a new ready one took its place.
    let mut changed = slice.clone();
    changed["endpoints"][1] = json!({
        "addresses": ["10.244.0.13"],
        "conditions": {"ready": true, "serving": true, "terminating": false},
        "nodeName": "node-a",
    });
    let before = got["metadata"]["resourceVersion"].clone();
    let updated = k.apply(&changed).unwrap();
    assert_ne!(updated["metadata"]["resourceVersion"], before);
    assert_eq!(
        k.get_object(&slice).unwrap()["endpoints"][1]["addresses"],
        json!(["10.244.0.13"])
    );

    // The kubeconfig works for kubectl (CA verified, bearer token), in the server's version.
    let out = k
        .kubectl_ok(&[
            "-n",
            &ns,
            "get",
            "endpointslices.v1beta1.discovery.k8s.io",
            "-o",
            "json",
        ])
        .unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["items"][0]["metadata"]["name"], "web-a", "{out}");
    let out = k.kubectl_ok(&["version", "-o", "json"]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.20.2", "{out}");

    // Delete: gone afterwards; a second delete is fine.
    k.delete(&slice).unwrap();
    k.delete(&slice).unwrap();
    assert_eq!(
        k.request(
            "GET",
            &k.resource_path(
                "discovery.k8s.io/v1beta1",
                "EndpointSlice",
                Some(&ns),
                Some("web-a")
            )
            .unwrap(),
            None
        )
        .unwrap()
        .status,
        404
    );
    k.delete(&svc).unwrap();
    k.delete(&node).unwrap();
}

/// `--watch-cache=false --etcd-compaction-interval=5s` reach the server: an old resourceVersion
/// becomes 410 Expired (the relist trigger a watcher must handle).
#[test]
fn extra_flags_reach_the_server_and_force_410() {
    let k = start(&["--watch-cache=false", "--etcd-compaction-interval=5s"]);
    let ns = unique("ns");
    k.create(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}))
        .unwrap();
    let first = k
        .create(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": ns}, "data": {"v": "0"}}))
        .unwrap();
    let old_rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..5 {
        k.apply(&json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "a", "namespace": ns}, "data": {"v": i.to_string()}}))
            .unwrap();
    }
    let path = format!(
        "/api/v1/namespaces/{ns}/configmaps?resourceVersion={old_rv}&resourceVersionMatch=Exact"
    );
    wait_for(
        "compaction to expire the old resourceVersion",
        Duration::from_secs(30),
        || Ok(k.request("GET", &path, None)?.status == 410),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    // A watch from the compacted revision gets an ERROR event with code 410.
    let w = k
        .request(
            "GET",
            &format!("/api/v1/namespaces/{ns}/configmaps?watch=1&resourceVersion={old_rv}&timeoutSeconds=2"),
            None,
        )
        .unwrap();
    let text = match &w.body {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    assert!(
        text.contains("\"type\":\"ERROR\"") && text.contains("\"code\":410"),
        "watch from a compacted revision: HTTP {} {text}",
        w.status
    );
}

/// Drop stops etcd and the apiserver and removes the directory; two servers run side by side;
/// the API server can be stopped (gracefully or killed) and started again.
#[test]
fn drop_stops_everything_and_servers_run_side_by_side() {
    let a = start(&[]);
    let b = start(&[]);
    assert_ne!(a.url(), b.url());
    a.get("/readyz").unwrap_or_else(|e| panic!("{e:#}"));
    b.get("/readyz").unwrap_or_else(|e| panic!("{e:#}"));
    let pids = a.pids().unwrap();
    let dir = a.dir().to_path_buf();
    assert!(pids.iter().all(|&p| alive(p)));
    drop(a);
    assert!(
        pids.iter().all(|&p| !alive(p)),
        "still running after drop: {pids:?}"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
    b.get("/readyz").unwrap_or_else(|e| panic!("{e:#}"));

    // The API server goes away and comes back (same URL and kubeconfig); objects survive.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": unique("cm"), "namespace": "default"}, "data": {"k": "v"}});
    b.create(&cm).unwrap();
    for crash in [false, true] {
        b.stop_apiserver(crash).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(
            b.request("GET", "/readyz", None).is_err(),
            "still answering"
        );
        let t = Instant::now();
        b.start_apiserver().unwrap_or_else(|e| panic!("{e:#}"));
        println!("apiserver back (after crash={crash}) in {:?}", t.elapsed());
        assert_eq!(b.get_object(&cm).unwrap()["data"]["k"], "v");
        b.kubectl_ok(&["get", "configmaps", "-n", "default"])
            .unwrap();
    }
}

/// The script's watchdog: when the owner process dies without stopping the servers (a killed
/// test run), they stop on their own within seconds.
#[test]
fn servers_stop_when_their_owner_dies() {
    let dir = TempDir::new("kw").unwrap();
    let mut owner = fixture::Proc::spawn("owner", Command::new("sleep").arg("600")).unwrap();
    let t = Instant::now();
    fixture::run(
        Command::new("bash")
            .arg(script_path())
            .arg("start")
            .arg(dir.path())
            .env("KUBE_APISERVER_OWNER_PID", owner.pid().to_string()),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    println!("script start: {:?}", t.elapsed());
    let pids: Vec<i32> = ["etcd", "kube-apiserver", "watchdog"]
        .iter()
        .map(|n| {
            std::fs::read_to_string(dir.path().join(format!("{n}.pid")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(pids.iter().all(|&p| alive(p)));
    owner.kill9();
    let res = wait_for(
        "the watchdog to stop the servers",
        Duration::from_secs(30),
        || Ok(pids.iter().all(|&p| !alive(p))),
    );
    // Whatever happened, nothing of ours stays up.
    let _ = Command::new("bash")
        .arg(script_path())
        .arg("stop")
        .arg(dir.path())
        .status();
    res.unwrap_or_else(|e| panic!("{e:#}"));
}
