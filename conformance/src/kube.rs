//! A real kube-apiserver (1.20.2, built from Debian's source package) and etcd on 127.0.0.1,
//! for tests that need the Kubernetes API: list/watch, 410 Expired, RBAC, server-side dry runs.
//!
//! [`KubeApiServer::start`] runs `scripts/kube-apiserver.sh start` in a private temporary
//! directory (`/tmp/sltka-<pid>-<n>`): free ports, its own CA and serving certificate, a random
//! bearer token in `system:masters`, RBAC authorization, the feature gates that keep
//! `serving`/`terminating` and `nodeName` on `discovery.k8s.io/v1beta1` EndpointSlices, and
//! dual-stack service ranges (`10.96.0.0/16`, `fd00:10:96::/108`). It returns once `/readyz`
//! answers ok. Dropping it stops both processes and removes the directory, also when the test
//! panics; if the test process is killed, a watchdog started by the script stops them.
//!
//! The binaries are cached outside the repository by `scripts/kube-apiserver.sh build`
//! (`scripts/test.sh` runs it). Missing binaries make `start` fail with that instruction: tests
//! using this fixture never skip.
//!
//! What the 1.20 server cannot show: `discovery.k8s.io/v1` (404; only `v1beta1` is served),
//! topology hints. See shared/reference/kubernetes-watch.md.
//!
//! The HTTP helpers shell out to `curl` (test tooling, no TLS stack in this crate).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::fixture::{self, TempDir};

/// Where `scripts/kube-apiserver.sh` is: `$SLUICE_KUBE_APISERVER_SCRIPT`, else the workspace's.
pub fn script_path() -> PathBuf {
    std::env::var_os("SLUICE_KUBE_APISERVER_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join("scripts/kube-apiserver.sh")
        })
}

/// An HTTP answer of the API server.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The body as JSON (`Value::Null` when empty, a string when it is not JSON).
    pub body: Value,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// One resource of the API's discovery documents.
#[derive(Debug, Clone)]
struct ResourceInfo {
    plural: String,
    namespaced: bool,
}

/// A running kube-apiserver + etcd; stopped (and its directory removed) on drop.
pub struct KubeApiServer {
    dir: TempDir,
    url: String,
    token: String,
    kubectl: PathBuf,
    started_in: Duration,
    stopped: bool,
    /// apiVersion -> kind -> resource, from discovery.
    discovery: Mutex<HashMap<String, HashMap<String, ResourceInfo>>>,
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver. `extra_flags` go to kube-apiserver after the defaults
    /// (so they override them), e.g. `&["--watch-cache=false", "--etcd-compaction-interval=5s"]`
    /// to force 410 Expired on watches.
    pub fn start(extra_flags: &[&str]) -> Result<KubeApiServer> {
        fixture::sweep_leftovers();
        let script = script_path();
        if !script.is_file() {
            bail!("{} is missing", script.display());
        }
        // Built first, so that whatever fails below, Drop stops what the script started
        // before the directory (with the pid files) goes.
        let mut k = KubeApiServer {
            dir: TempDir::new("ka")?,
            url: String::new(),
            token: String::new(),
            kubectl: PathBuf::new(),
            started_in: Duration::ZERO,
            stopped: false,
            discovery: Mutex::new(HashMap::new()),
        };
        let t = Instant::now();
        let out = Command::new("bash")
            .arg(&script)
            .arg("start")
            .arg(k.dir.path())
            .args(extra_flags)
            .env("KUBE_APISERVER_OWNER_PID", std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", script.display()))?;
        k.started_in = t.elapsed();
        if !out.status.success() {
            bail!(
                "{} start failed ({}):\n{}{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        let read = |name: &str| -> Result<String> {
            Ok(std::fs::read_to_string(k.dir.path().join(name))
                .with_context(|| format!("reading {name} written by kube-apiserver.sh"))?
                .trim()
                .to_string())
        };
        let env = read("env")?;
        let kubectl = env
            .lines()
            .find_map(|l| l.strip_prefix("KUBECTL="))
            .ok_or_else(|| anyhow!("no KUBECTL= in {}/env", k.dir.path().display()))?
            .into();
        let (url, token) = (read("url")?, read("token")?);
        k.kubectl = kubectl;
        k.url = url;
        k.token = token;
        Ok(k)
    }

    /// A kubeconfig (embedded CA, bearer token) for kube-rs (`Kubeconfig::read_from`) and kubectl.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bearer token (user `sluice-test-admin`, group `system:masters`).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The CA that signed the serving certificate (SANs 127.0.0.1, localhost, kubernetes...).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The server's directory: logs (`kube-apiserver.log`, `etcd.log`), pids, certificates.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long `start` took (certificates, etcd, apiserver until /readyz).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    /// The pids of etcd and kube-apiserver.
    pub fn pids(&self) -> Result<Vec<i32>> {
        ["etcd", "kube-apiserver"]
            .iter()
            .map(|n| {
                let p = self.dir.path().join(format!("{n}.pid"));
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?
                    .trim()
                    .parse()
                    .with_context(|| format!("parsing {}", p.display()))
            })
            .collect()
    }

    /// The last `lines` lines of the apiserver's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("kube-apiserver.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Debian's kubectl 1.20.2 (the server's own version) with `--kubeconfig` set and its
    /// discovery cache inside the server's directory.
    pub fn kubectl(&self) -> Command {
        let mut c = Command::new(&self.kubectl);
        c.arg(format!("--kubeconfig={}", self.kubeconfig_path().display()))
            .arg(format!(
                "--cache-dir={}",
                self.dir.path().join("kubectl-cache").display()
            ))
            .stdin(Stdio::null());
        c
    }

    /// Runs kubectl with `args`, failing with its output when it exits non-zero; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String> {
        let out = fixture::run(self.kubectl().args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One HTTP request (`path` like `/api/v1/nodes`, with a query if needed); any status.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Response> {
        self.request_with(method, path, body, "application/json")
    }

    /// Like `request`, with the body's content type (e.g. `application/merge-patch+json`).
    pub fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
    ) -> Result<Response> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--max-time", "60", "-X", method])
            .arg("--cacert")
            .arg(self.ca_path())
            .arg("-H")
            .arg(format!(
                "@{}",
                self.dir.path().join("auth-header").display()
            ))
            .args(["-H", "Accept: application/json"])
            .args(["-w", "\n%{http_code}"])
            .arg(format!("{}{}", self.url, path))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if body.is_some() {
            cmd.args(["-H", &format!("Content-Type: {content_type}")])
                .args(["--data-binary", "@-"])
                .stdin(Stdio::piped());
        } else {
            cmd.stdin(Stdio::null());
        }
        let mut child = cmd.spawn().context("spawning curl")?;
        if let Some(b) = body {
            let mut stdin = child.stdin.take().expect("piped stdin");
            stdin.write_all(serde_json::to_string(b)?.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "curl {method} {path} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text
            .rsplit_once('\n')
            .ok_or_else(|| anyhow!("curl output without a status line: {text}"))?;
        let status: u16 = code
            .trim()
            .parse()
            .with_context(|| format!("curl status {code:?}"))?;
        let body = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()))
        };
        Ok(Response { status, body })
    }

    fn expect_ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let r = self.request(method, path, body)?;
        if !r.is_success() {
            bail!("{method} {path}: HTTP {}: {}", r.status, r.body);
        }
        Ok(r.body)
    }

    /// GET `path`; fails unless 2xx.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.expect_ok("GET", path, None)
    }

    /// The API path of `kind` in `api_version` (`v1`, `discovery.k8s.io/v1beta1`...): the
    /// collection when `name` is None. `namespace` is ignored for cluster-scoped kinds and
    /// defaults to `default` for namespaced ones. Plurals and scope come from discovery.
    pub fn resource_path(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<String> {
        let info = self.resource_info(api_version, kind)?;
        let base = if api_version.contains('/') {
            format!("/apis/{api_version}")
        } else {
            format!("/api/{api_version}")
        };
        let mut p = base;
        if info.namespaced {
            p += &format!("/namespaces/{}", namespace.unwrap_or("default"));
        }
        p += &format!("/{}", info.plural);
        if let Some(n) = name {
            p += &format!("/{n}");
        }
        Ok(p)
    }

    fn resource_info(&self, api_version: &str, kind: &str) -> Result<ResourceInfo> {
        let mut cache = self.discovery.lock().unwrap();
        if !cache.contains_key(api_version) {
            let path = if api_version.contains('/') {
                format!("/apis/{api_version}")
            } else {
                format!("/api/{api_version}")
            };
            let doc = self
                .get(&path)
                .with_context(|| format!("discovery of {api_version}"))?;
            let mut kinds = HashMap::new();
            for r in doc["resources"].as_array().into_iter().flatten() {
                let (Some(name), Some(k)) = (r["name"].as_str(), r["kind"].as_str()) else {
                    continue;
                };
                if name.contains('/') {
                    continue; // subresources
                }
                kinds.insert(
                    k.to_string(),
                    ResourceInfo {
                        plural: name.to_string(),
                        namespaced: r["namespaced"].as_bool().unwrap_or(false),
                    },
                );
            }
            cache.insert(api_version.to_string(), kinds);
        }
        cache[api_version]
            .get(kind)
            .cloned()
            .ok_or_else(|| anyhow!("the server has no kind {kind} in {api_version}"))
    }

    fn object_path(&self, obj: &Value, with_name: bool) -> Result<String> {
        let api_version = obj["apiVersion"]
            .as_str()
            .ok_or_else(|| anyhow!("object without apiVersion: {obj}"))?;
        let kind = obj["kind"]
            .as_str()
            .ok_or_else(|| anyhow!("object without kind: {obj}"))?;
        let name = obj["metadata"]["name"].as_str();
        if with_name && name.is_none() {
            bail!("object without metadata.name: {obj}");
        }
        self.resource_path(
            api_version,
            kind,
            obj["metadata"]["namespace"].as_str(),
            if with_name { name } else { None },
        )
    }

    /// POSTs `obj` (apiVersion, kind, metadata.name[, metadata.namespace]); returns the
    /// server's copy. Fails unless 2xx (409 when it exists).
    pub fn create(&self, obj: &Value) -> Result<Value> {
        let p = self.object_path(obj, false)?;
        self.expect_ok("POST", &p, Some(obj))
    }

    /// PUTs `obj`; without `metadata.resourceVersion` the current one is read first (last
    /// writer wins). Returns the server's copy.
    pub fn update(&self, obj: &Value) -> Result<Value> {
        let p = self.object_path(obj, true)?;
        let mut obj = obj.clone();
        if obj["metadata"]["resourceVersion"].is_null() {
            let cur = self.get(&p)?;
            obj["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
        }
        self.expect_ok("PUT", &p, Some(&obj))
    }

    /// Creates `obj`, or updates it when it exists.
    pub fn apply(&self, obj: &Value) -> Result<Value> {
        let p = self.object_path(obj, false)?;
        let r = self.request("POST", &p, Some(obj))?;
        match r.status {
            200..=299 => Ok(r.body),
            409 => self.update(obj),
            s => bail!("POST {p}: HTTP {s}: {}", r.body),
        }
    }

    /// Reads the server's copy of `obj` (by apiVersion, kind, namespace, name).
    pub fn get_object(&self, obj: &Value) -> Result<Value> {
        let p = self.object_path(obj, true)?;
        self.get(&p)
    }

    /// Deletes `obj` (only apiVersion, kind, metadata.name/namespace are used). Ok when it is
    /// already gone.
    pub fn delete(&self, obj: &Value) -> Result<()> {
        let p = self.object_path(obj, true)?;
        let r = self.request("DELETE", &p, None)?;
        if r.is_success() || r.status == 404 {
            Ok(())
        } else {
            bail!("DELETE {p}: HTTP {}: {}", r.status, r.body)
        }
    }

    fn script(&self, args: &[&str], envs: &[(&str, &str)]) -> Result<()> {
        let out = Command::new("bash")
            .arg(script_path())
            .args(args)
            .arg(self.dir.path())
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .output()
            .context("running kube-apiserver.sh")?;
        if !out.status.success() {
            bail!(
                "kube-apiserver.sh {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Stops only kube-apiserver, gracefully (SIGTERM: watches end as in a real shutdown), or
    /// with SIGKILL when `crash`. etcd and the objects stay.
    pub fn stop_apiserver(&self, crash: bool) -> Result<()> {
        self.script(
            &["stop-apiserver"],
            &[("SIGNAL", if crash { "KILL" } else { "TERM" })],
        )
    }

    /// Starts kube-apiserver again after `stop_apiserver`: same URL, certificates, token and
    /// flags (the kubeconfig stays valid); returns once /readyz is ok.
    pub fn start_apiserver(&self) -> Result<()> {
        self.script(&["start-apiserver"], &[])
    }

    /// Stops etcd and kube-apiserver (idempotent; Drop does it too).
    pub fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.script(&["stop"], &[])
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.stopped && !self.url.is_empty() {
            eprintln!(
                "--- kube-apiserver log ({}), last lines:\n{}",
                self.dir.path().join("kube-apiserver.log").display(),
                self.log_tail(40)
            );
        }
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
        if std::env::var_os("SLUICE_KEEP_KUBE").is_some() {
            eprintln!("SLUICE_KEEP_KUBE: keeping {}", self.dir.path().display());
            // Forget the TempDir so it is not removed.
            std::mem::forget(std::mem::replace(&mut self.dir, TempDir(PathBuf::new())));
        }
    }
}
