//! deploy/: every manifest passes a server-side dry run against the real kube-apiserver
//! (cni_conformance::kube), says what deploy/README.md promises (checked on the objects the
//! server returns, i.e. after its validation and defaulting), the ServiceAccount is read-only on
//! exactly what sluiced watches (checked by the server's RBAC), and install-cni.sh installs the
//! plugin and conflist atomically.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cni_conformance::fixture::TempDir;
use cni_conformance::kube::KubeApiServer;
use serde_json::{json, Value};

const SA: &str = "system:serviceaccount:kube-system:sluice";
const CONFLIST: &str = "10-sluice.conflist";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("deploy")
}

fn start() -> KubeApiServer {
    let k = KubeApiServer::start(&[]).unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "kube-apiserver ready at {} in {:?}",
        k.url(),
        k.started_in()
    );
    // A fresh 1.20 server bootstraps kube-system itself; make sure rather than assume.
    let r = k
        .request("GET", "/api/v1/namespaces/kube-system", None)
        .unwrap();
    if r.status == 404 {
        k.create(
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "kube-system"}}),
        )
        .unwrap();
    } else {
        assert_eq!(r.status, 200, "{}", r.body);
    }
    k
}

/// kubectl's -o json output: one object, a List, or several objects one after another.
fn objects(out: &str) -> Vec<Value> {
    let mut v = Vec::new();
    for o in serde_json::Deserializer::from_str(out).into_iter::<Value>() {
        let o = o.unwrap_or_else(|e| panic!("kubectl output is not JSON ({e}): {out}"));
        if o["kind"] == "List" {
            v.extend(o["items"].as_array().cloned().unwrap_or_default());
        } else {
            v.push(o);
        }
    }
    v
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among the manifests"))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| {
            s.as_str()
                .unwrap_or_else(|| panic!("not a string: {s}"))
                .to_string()
        })
        .collect()
}

fn container<'a>(pod: &'a Value, list: &str, name: &str) -> &'a Value {
    pod[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} {name}"))
}

fn mount<'a>(c: &'a Value, path: &str) -> &'a Value {
    c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("container {} does not mount {path}", c["name"]))
}

fn host_path(pod: &Value, volume: &str) -> String {
    let v = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == volume)
        .unwrap_or_else(|| panic!("no volume {volume}"));
    v["hostPath"]["path"].as_str().unwrap_or("").to_string()
}

fn volume_of(c: &Value, path: &str) -> String {
    mount(c, path)["name"].as_str().unwrap().to_string()
}

#[test]
fn every_manifest_passes_a_server_side_dry_run_and_says_what_the_readme_promises() {
    let k = start();
    let dir = deploy_dir();
    let out = k
        .kubectl_ok(&[
            "apply",
            "--dry-run=server",
            "-f",
            dir.to_str().unwrap(),
            "-o",
            "json",
        ])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let objs = objects(&out);
    let kinds: BTreeSet<String> = objs
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    let want: BTreeSet<String> = [
        "ServiceAccount/sluice",
        "ClusterRole/sluice",
        "ClusterRoleBinding/sluice",
        "ConfigMap/sluice-config",
        "DaemonSet/sluice",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds, want, "objects in deploy/");
    // A dry run creates nothing.
    assert_eq!(
        k.request(
            "GET",
            "/apis/apps/v1/namespaces/kube-system/daemonsets/sluice",
            None
        )
        .unwrap()
        .status,
        404
    );

    // The uninstall manifest is valid too.
    k.kubectl_ok(&[
        "apply",
        "--dry-run=server",
        "-f",
        dir.join("uninstall").to_str().unwrap(),
    ])
    .unwrap_or_else(|e| panic!("{e:#}"));

    // RBAC: read-only, exactly services + nodes (core) and endpointslices (discovery.k8s.io).
    let role = find(&objs, "ClusterRole", "sluice");
    let mut rules: Vec<(String, String, Vec<String>)> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        assert!(
            r["resourceNames"].is_null() && r["nonResourceURLs"].is_null(),
            "{r}"
        );
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                let mut verbs = strs(&r["verbs"]);
                verbs.sort();
                rules.push((g.clone(), res, verbs));
            }
        }
    }
    rules.sort();
    let ro = vec!["get".to_string(), "list".into(), "watch".into()];
    assert_eq!(
        rules,
        vec![
            ("".to_string(), "nodes".to_string(), ro.clone()),
            ("".to_string(), "services".to_string(), ro.clone()),
            (
                "discovery.k8s.io".to_string(),
                "endpointslices".to_string(),
                ro.clone()
            ),
        ]
    );
    let binding = find(&objs, "ClusterRoleBinding", "sluice");
    assert_eq!(binding["roleRef"]["name"], "sluice");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "sluice", "namespace": "kube-system"}])
    );

    // The DaemonSet, as the server stored it.
    let ds = find(&objs, "DaemonSet", "sluice");
    assert_eq!(ds["metadata"]["namespace"], "kube-system");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "sluice");
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        json!([{"operator": "Exists"}]),
        "all taints"
    );
    let main = container(pod, "containers", "sluiced");
    let init = container(pod, "initContainers", "install-cni");
    assert_eq!(main["image"], init["image"]);
    assert_eq!(main["securityContext"]["privileged"], true);
    assert_eq!(init["securityContext"]["privileged"], false);
    let args = strs(&main["args"]);
    for a in [
        "--node-name=$(NODE_NAME)",
        "--healthz-bind-address=0.0.0.0:10256",
        "--metrics-bind-address=127.0.0.1:10249",
        "--socket=/run/sluice/sluiced.sock",
        "--state-dir=/var/lib/sluice",
        "--bpffs=/sys/fs/bpf/sluice",
    ] {
        assert!(
            args.iter().any(|x| x == a),
            "sluiced args lack {a}: {args:?}"
        );
    }
    assert!(
        !args
            .iter()
            .any(|a| a.starts_with("--kubeconfig") || a.starts_with("--master")),
        "in-cluster config: {args:?}"
    );
    let env = main["env"].as_array().unwrap();
    let node_name = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(
        node_name["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    for (var, key) in [
        ("KUBERNETES_SERVICE_HOST", "kubernetes-service-host"),
        ("KUBERNETES_SERVICE_PORT", "kubernetes-service-port"),
    ] {
        let e = env.iter().find(|e| e["name"] == var).expect(var);
        assert_eq!(e["valueFrom"]["configMapKeyRef"]["name"], "sluice-config");
        assert_eq!(e["valueFrom"]["configMapKeyRef"]["key"], key);
    }
    assert_eq!(main["livenessProbe"]["httpGet"]["path"], "/livez");
    assert_eq!(main["livenessProbe"]["httpGet"]["port"], 10256);
    assert_eq!(main["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(main["readinessProbe"]["httpGet"]["port"], 10256);
    // Mounts: bpffs bidirectional; state, socket dir; CNI dirs for the installer only.
    assert_eq!(
        mount(main, "/sys/fs/bpf")["mountPropagation"],
        "Bidirectional"
    );
    for (c, path, host) in [
        (main, "/sys/fs/bpf", "/sys/fs/bpf"),
        (main, "/var/lib/sluice", "/var/lib/sluice"),
        (main, "/run/sluice", "/run/sluice"),
        (init, "/host/opt/cni/bin", "/opt/cni/bin"),
        (init, "/host/etc/cni/net.d", "/etc/cni/net.d"),
    ] {
        assert_eq!(host_path(pod, &volume_of(c, path)), host, "{path}");
    }
    // The installer's environment points at those mounts and at the image's paths.
    let init_env: Vec<(String, String)> = init["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["value"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let ienv = |n: &str| {
        init_env
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("install-cni has no {n}"))
    };
    assert_eq!(ienv("CNI_BIN_DIR"), "/host/opt/cni/bin");
    assert_eq!(ienv("CNI_NET_DIR"), "/host/etc/cni/net.d");
    let conflist_src = ienv("SLUICE_CONFLIST_SRC");
    let (conf_dir, conf_file) = conflist_src.rsplit_once('/').unwrap();
    let conf_vol = volume_of(init, conf_dir);
    let vol = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == conf_vol.as_str())
        .unwrap();
    assert_eq!(vol["configMap"]["name"], "sluice-config");
    assert_eq!(
        vol["configMap"]["items"],
        json!([{"key": CONFLIST, "path": conf_file}])
    );
    // The image has what the DaemonSet runs (deploy/Containerfile).
    let containerfile = std::fs::read_to_string(dir.join("Containerfile")).unwrap();
    let script = strs(&init["command"]).last().unwrap().clone();
    let copied = copied_paths(&containerfile);
    for p in [
        script,
        ienv("SLUICE_PLUGIN_SRC"),
        strs(&main["command"])[0].clone(),
    ] {
        assert!(
            copied.contains(&p),
            "deploy/Containerfile does not COPY {p}: {copied:?}"
        );
    }

    // The conflist, and the socket the plugin will dial is the one sluiced listens on, in a
    // host directory both see.
    let cm = find(&objs, "ConfigMap", "sluice-config");
    let conf: Value = serde_json::from_str(cm["data"][CONFLIST].as_str().unwrap()).unwrap();
    assert_eq!(
        conf,
        json!({"cniVersion": "1.0.0", "name": "sluice",
               "plugins": [{"type": "sluice", "socket": "/run/sluice/sluiced.sock"}]})
    );
    assert!(args.contains(&format!(
        "--socket={}",
        conf["plugins"][0]["socket"].as_str().unwrap()
    )));
    assert!(cm["data"]["kubernetes-service-port"].as_str().is_some());
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    for needle in [
        "kubernetes-service-host",
        "kube-proxy --cleanup",
        "--dry-run=server",
    ] {
        assert!(
            readme.contains(needle),
            "deploy/README.md does not mention {needle}"
        );
    }
}

/// The paths `COPY SRC... DEST` lines of a Containerfile put into the image.
fn copied_paths(containerfile: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for l in containerfile.lines() {
        let Some(rest) = l.strip_prefix("COPY ") else {
            continue;
        };
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (dest, srcs) = words.split_last().expect("COPY without arguments");
        if dest.ends_with('/') {
            for s in srcs {
                out.insert(format!("{dest}{}", s.rsplit('/').next().unwrap()));
            }
        } else {
            out.insert(dest.to_string());
        }
    }
    out
}

/// `kubectl auth can-i VERB RESOURCE[/SUBRESOURCE] --as SA`, cluster-wide or in `ns`.
fn can_i(k: &KubeApiServer, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let mut c = k.kubectl();
    c.args(["auth", "can-i", verb, "--as", SA]);
    // "pods/x" means the object named x to can-i; subresources go in --subresource.
    match resource.split_once('/') {
        Some((r, sub)) => c.arg(r).arg(format!("--subresource={sub}")),
        None => c.arg(resource),
    };
    match ns {
        Some(n) => c.args(["-n", n]),
        None => c.arg("--all-namespaces"),
    };
    let out = c.output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    match s.as_str() {
        "yes" => true,
        "no" => false,
        _ => panic!(
            "kubectl auth can-i {verb} {resource}: {s} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Applied for real, the ServiceAccount can read exactly what sluiced watches, cluster-wide,
/// and nothing else; it can write nothing.
#[test]
fn service_account_is_read_only_on_exactly_what_sluiced_watches() {
    let k = start();
    // Nothing grants it anything before our RBAC is applied (so the yeses below are ours).
    assert!(!can_i(&k, "list", "services", None));
    k.kubectl_ok(&["apply", "-f", deploy_dir().to_str().unwrap()])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let watched = ["services", "endpointslices.discovery.k8s.io", "nodes"];
    for r in watched {
        for v in ["get", "list", "watch"] {
            assert!(can_i(&k, v, r, None), "{SA} cannot {v} {r}");
        }
        for v in ["create", "update", "patch", "delete", "deletecollection"] {
            assert!(!can_i(&k, v, r, None), "{SA} can {v} {r}");
        }
    }
    assert!(can_i(&k, "list", "services", Some("default")));
    for r in [
        "secrets",
        "configmaps",
        "pods",
        "endpoints",
        "events",
        "events.events.k8s.io",
        "nodes/status",
        "nodes/proxy",
        "services/status",
        "services/proxy",
        "daemonsets.apps",
        "serviceaccounts",
    ] {
        for v in ["get", "list", "create"] {
            assert!(!can_i(&k, v, r, None), "{SA} can {v} {r}");
        }
    }
    // The DaemonSet is there and the objects it refers to exist.
    let ds = k
        .get("/apis/apps/v1/namespaces/kube-system/daemonsets/sluice")
        .unwrap();
    assert_eq!(
        ds["spec"]["template"]["spec"]["serviceAccountName"],
        "sluice"
    );
    k.get("/api/v1/namespaces/kube-system/serviceaccounts/sluice")
        .unwrap();
    k.get("/api/v1/namespaces/kube-system/configmaps/sluice-config")
        .unwrap();
    k.get("/apis/scheduling.k8s.io/v1/priorityclasses/system-node-critical")
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// install-cni.sh, run with /bin/sh (dash on Debian: no bashisms) against temporary "host" dirs.

struct Node {
    _t: TempDir,
    src: PathBuf,
    bin: PathBuf,
    net: PathBuf,
}

impl Node {
    fn new() -> Node {
        let t = TempDir::new("ic").unwrap();
        let (src, bin, net) = (
            t.path().join("src"),
            t.path().join("bin"),
            t.path().join("net"),
        );
        for d in [&src, &bin, &net] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(
            src.join(CONFLIST),
            "{\"cniVersion\":\"1.0.0\",\"name\":\"sluice\",\"plugins\":[{\"type\":\"sluice\",\"socket\":\"/run/sluice/sluiced.sock\"}]}\n",
        )
        .unwrap();
        std::fs::write(src.join("sluice"), b"\x7fELF plugin v1").unwrap();
        Node {
            _t: t,
            src,
            bin,
            net,
        }
    }

    fn install(&self) -> std::process::Output {
        Command::new("/bin/sh")
            .arg(deploy_dir().join("install-cni.sh"))
            .env("SLUICE_PLUGIN_SRC", self.src.join("sluice"))
            .env("SLUICE_CONFLIST_SRC", self.src.join(CONFLIST))
            .env("CNI_BIN_DIR", &self.bin)
            .env("CNI_NET_DIR", &self.net)
            .output()
            .unwrap()
    }

    fn install_ok(&self) -> String {
        let out = self.install();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "install-cni.sh failed: {err}");
        err
    }

    fn names(&self) -> BTreeSet<String> {
        [&self.bin, &self.net]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }
}

#[test]
fn install_cni_installs_atomically_and_idempotently() {
    let n = Node::new();
    n.install_ok();
    assert_eq!(
        n.names(),
        ["sluice".to_string(), CONFLIST.to_string()]
            .into_iter()
            .collect(),
        "exactly the two files, no temporaries"
    );
    assert_eq!(
        std::fs::read(n.bin.join("sluice")).unwrap(),
        b"\x7fELF plugin v1"
    );
    assert_eq!(
        std::fs::metadata(n.bin.join("sluice"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    assert_eq!(
        std::fs::metadata(n.net.join(CONFLIST))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o644
    );
    assert_eq!(
        std::fs::read(n.net.join(CONFLIST)).unwrap(),
        std::fs::read(n.src.join(CONFLIST)).unwrap()
    );

    // Again: nothing changes (same inode), it says so.
    let ino = std::fs::metadata(n.bin.join("sluice")).unwrap().ino();
    let err = n.install_ok();
    assert!(err.contains("up to date"), "{err}");
    assert_eq!(std::fs::metadata(n.bin.join("sluice")).unwrap().ino(), ino);

    // A new plugin replaces the old one by rename (a new inode; the old file, which a running
    // plugin may still execute, is never written to).
    std::fs::write(n.src.join("sluice"), b"\x7fELF plugin v2").unwrap();
    n.install_ok();
    assert_ne!(std::fs::metadata(n.bin.join("sluice")).unwrap().ino(), ino);
    assert_eq!(
        std::fs::read(n.bin.join("sluice")).unwrap(),
        b"\x7fELF plugin v2"
    );

    // A temporary left by a killed installer is removed.
    std::fs::write(n.bin.join(".sluice.sluice-tmp.12345"), b"partial").unwrap();
    n.install_ok();
    assert_eq!(n.names().len(), 2, "{:?}", n.names());
}

#[test]
fn install_cni_refuses_bad_input_without_touching_the_node() {
    // No plugin binary: fails, installs nothing (not even the conflist).
    let n = Node::new();
    std::fs::remove_file(n.src.join("sluice")).unwrap();
    let out = n.install();
    assert!(!out.status.success());
    assert!(n.names().is_empty(), "{:?}", n.names());

    // A conflist that is not JSON or names no sluice plugin: fails before anything is written.
    for bad in [
        "",
        "not json",
        "{\"cniVersion\":\"1.0.0\",\"name\":\"x\",\"plugins\":[{\"type\":\"bridge\"}]}",
    ] {
        let n = Node::new();
        std::fs::write(n.src.join(CONFLIST), bad).unwrap();
        let out = n.install();
        assert!(!out.status.success(), "accepted {bad:?}");
        assert!(n.names().is_empty(), "{bad:?}: {:?}", n.names());
    }

    // A missing host directory (mount forgotten): fails loudly.
    let n = Node::new();
    std::fs::remove_dir(&n.net).unwrap();
    let out = n.install();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
}

/// A reader polling the installed files while they are replaced over and over only ever sees
/// a whole old or a whole new file.
#[test]
fn install_cni_readers_never_see_a_partial_file() {
    let n = Node::new();
    let a: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..(4 << 20) + 4096).map(|i| (i % 241) as u8).collect();
    std::fs::write(n.src.join("sluice"), &a).unwrap();
    n.install_ok();
    let stop = Arc::new(AtomicBool::new(false));
    let target = n.bin.join("sluice");
    let reader = {
        let (stop, a, b) = (stop.clone(), a.clone(), b.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let mut buf = Vec::new();
                std::fs::File::open(&target)
                    .expect("the plugin must exist at every instant")
                    .read_to_end(&mut buf)
                    .unwrap();
                assert!(buf == a || buf == b, "partial read: {} bytes", buf.len());
                reads += 1;
            }
            reads
        })
    };
    for i in 0..20 {
        std::fs::write(n.src.join("sluice"), if i % 2 == 0 { &b } else { &a }).unwrap();
        n.install_ok();
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().expect("reader saw a partial or missing file");
    assert!(reads > 0);
    println!("{reads} whole reads during 20 replacements");
}
