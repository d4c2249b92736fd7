//! The cases. Each is a named function from the run's context to pass (with a detail), fail (with
//! what went wrong) or not applicable (with why). Every pod a case makes is DELeted and its
//! namespace removed when the case ends, also when it fails.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::cni::{self, CniEnv, Invocation};
use crate::netstate::{self, NetState};
use crate::runner::{
    self, ping, tcp_echo, version_ge, Attempt, Pod, Rt, CNITOOL_MAX, KNOWN_VERSIONS,
};
use crate::schema;

pub enum CaseErr {
    Fail(anyhow::Error),
    Na(String),
}

impl From<anyhow::Error> for CaseErr {
    fn from(e: anyhow::Error) -> Self {
        CaseErr::Fail(e)
    }
}

pub type CaseResult = std::result::Result<String, CaseErr>;

macro_rules! na {
    ($($t:tt)*) => { return Err(CaseErr::Na(format!($($t)*))) };
}
macro_rules! fail {
    ($($t:tt)*) => { return Err(CaseErr::Fail(anyhow!($($t)*))) };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    /// Failing it makes the run fail (exit 1).
    Required,
    /// Reported, but not a spec rule (good practice, or what Kubernetes relies on).
    Advisory,
}

pub struct Case {
    pub name: String,
    pub req: Req,
    pub about: &'static str,
    pub run: Box<dyn Fn(&Ctx) -> CaseResult>,
}

/// The state of a node before a case: links, addresses and routes of the node namespace and the
/// plugin's allocations.
#[derive(Debug, Clone)]
pub struct Base {
    pub node: NetState,
    pub alloc: Option<String>,
}

pub struct Ctx {
    pub rt: Arc<Rt>,
    anchor: Mutex<Option<std::result::Result<Pod, String>>>,
}

impl Ctx {
    pub fn new(rt: Arc<Rt>) -> Ctx {
        Ctx {
            rt,
            anchor: Mutex::new(None),
        }
    }

    /// A pod that lives for the whole run, so shared state a plugin creates on its first ADD (a
    /// bridge, say) is part of every baseline, and so there is a peer for traffic.
    pub fn with_anchor<T>(&self, f: impl FnOnce(&Pod) -> Result<T>) -> Result<T> {
        let mut g = self.anchor.lock().unwrap();
        if g.is_none() {
            let made = (|| -> Result<Pod> {
                let mut p = Pod::new(&self.rt, "an")?;
                p.add()?;
                Ok(p)
            })();
            *g = Some(made.map_err(|e| format!("{e:#}")));
        }
        match g.as_ref().unwrap() {
            Ok(p) => f(p),
            Err(e) => bail!("the anchor pod (kept for the whole run) could not be added: {e}"),
        }
    }

    pub fn anchor_ip(&self) -> Result<IpAddr> {
        self.with_anchor(|p| p.ip())
    }

    pub fn anchor_netns(&self) -> Result<std::path::PathBuf> {
        self.with_anchor(|p| Ok(p.netns_path()))
    }

    /// DELs the anchor (end of run).
    pub fn drop_anchor(&self) -> Result<()> {
        if let Some(Ok(mut p)) = self.anchor.lock().unwrap().take() {
            p.del()?;
        }
        Ok(())
    }

    /// The node's state once it is still (links of namespaces deleted earlier vanish
    /// asynchronously, so two reads 50 ms apart must agree).
    pub fn baseline(&self) -> Result<Base> {
        self.with_anchor(|_| Ok(()))?;
        let mut node = self.rt.node_state()?;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(50));
            let again = self.rt.node_state()?;
            if again == node {
                break;
            }
            node = again;
        }
        Ok(Base {
            node,
            alloc: self.rt.alloc_snapshot()?,
        })
    }

    /// Waits up to `within` for the node to be as in `base`, else says what differs.
    pub fn back_to(&self, base: &Base, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let node = self.rt.node_state()?;
            let alloc = self.rt.alloc_snapshot()?;
            if node == base.node && alloc == base.alloc {
                return Ok(());
            }
            if Instant::now() > deadline {
                let mut what = base.node.diff(&node);
                if alloc != base.alloc {
                    what.push(format!(
                        "allocations differ (before: {:?}, now: {:?})",
                        base.alloc.clone().unwrap_or_default(),
                        alloc.unwrap_or_default()
                    ));
                }
                bail!("left behind in the node namespace: {}", what.join("; "));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn hooks(&self) -> Option<(String, String)> {
        match (&self.rt.opts.setup, &self.rt.opts.teardown) {
            (Some(s), Some(t)) => Some((s.clone(), t.clone())),
            _ => None,
        }
    }
}

/// `ip -n NS ARGS` on a namespace someone else owns.
fn ip_in(ns: &str, args: &[&str]) -> Result<()> {
    crate::fixture::run(
        std::process::Command::new("ip")
            .arg("-n")
            .arg(ns)
            .args(args),
    )
    .map(|_| ())
}

fn has_check(rt: &Rt, version: &str) -> bool {
    let _ = rt;
    version_ge(version, "0.4.0")
}

/// The main plugin's stdin for a direct call, at the default version.
fn main_conf(rt: &Rt) -> Value {
    rt.list_v(&rt.default_version)
        .plugin_stdin(0, None, &Value::Null, &Map::new())
}

fn direct(rt: &Rt, env: CniEnv, stdin: &[u8]) -> Result<Invocation> {
    rt.plugins.invoke(&rt.main_type, &env, stdin)
}

/// A throwaway pod for direct calls; marked added so that its drop DELs whatever a plugin that
/// wrongly succeeded made.
fn scratch(rt: &Arc<Rt>, tag: &str) -> Result<Pod> {
    let mut p = Pod::own(rt, tag, rt.list_v(&rt.default_version))?;
    p.added = true;
    Ok(p)
}

fn expect_code(inv: &Invocation, want: &[u64], what: &str) -> CaseResult {
    let e = inv.cni_error().with_context(|| what.to_string())?;
    if !want.contains(&e.code) {
        fail!(
            "{what}: got code {} ({:?}), want {}",
            e.code,
            e.msg,
            want.iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        );
    }
    Ok(format!("code {}: {}", e.code, e.msg))
}

// ---- VERSION and errors ----------------------------------------------------------------------

fn version_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if let Some(e) = &rt.version_error {
        fail!("VERSION of {}: {e}", rt.main_type);
    }
    if rt.advertised.is_empty() {
        fail!("supportedVersions is empty");
    }
    for v in &rt.advertised {
        let parts: Vec<&str> = v.split('.').collect();
        if parts.len() != 3 || parts.iter().any(|p| p.parse::<u32>().is_err()) {
            fail!("supportedVersions holds {v:?}, not a semantic version");
        }
    }
    let want: BTreeSet<&String> = rt.advertised.iter().collect();
    for v in &rt.advertised {
        let inv = cni::version(&rt.plugins, &rt.main_type, v)?;
        if !inv.success() {
            fail!("VERSION with cniVersion {v}: {}", inv.describe());
        }
        let out = inv
            .stdout_json()
            .with_context(|| format!("VERSION with cniVersion {v}"))?;
        if !out.get("cniVersion").is_some_and(Value::is_string) {
            fail!("VERSION with cniVersion {v} answered without a string cniVersion: {out}");
        }
        let got = cni::supported_versions(&inv)?;
        if got.iter().collect::<BTreeSet<_>>() != want {
            fail!(
                "VERSION's supportedVersions changes with the input: {got:?} vs {:?}",
                rt.advertised
            );
        }
    }
    if !rt.advertises(&rt.list.version()) {
        fail!(
            "the conflist's cniVersion {} is not among supportedVersions {:?}",
            rt.list.version(),
            rt.advertised
        );
    }
    Ok(format!(
        "one JSON object, supportedVersions {}",
        rt.advertised.join(", ")
    ))
}

fn version_echo_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if rt.advertised.is_empty() {
        fail!("no supportedVersions to ask about");
    }
    let mut wrong = Vec::new();
    for v in &rt.advertised {
        let inv = cni::version(&rt.plugins, &rt.main_type, v)?;
        let out = inv
            .stdout_json()
            .with_context(|| format!("VERSION with cniVersion {v}"))?;
        match out.get("cniVersion").and_then(Value::as_str) {
            Some(x) if x == v => {}
            other => wrong.push(format!("{v} → {}", other.unwrap_or("none"))),
        }
    }
    if !wrong.is_empty() {
        fail!(
            "VERSION does not echo the input cniVersion: {}",
            wrong.join(", ")
        );
    }
    Ok(format!(
        "cniVersion echoed for each of {}",
        rt.advertised.join(", ")
    ))
}

fn errors_json_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let mut pod = scratch(&rt.clone(), "ej")?;
    let conf = main_conf(rt);
    let good = serde_json::to_vec(&conf).unwrap();
    let mut bad_version = conf.clone();
    bad_version["cniVersion"] = json!("99.99.99");
    let full = CniEnv::for_att("ADD", &pod.att);
    let mut trials: Vec<(&str, CniEnv, Vec<u8>)> = vec![
        (
            "ADD with malformed JSON",
            full.clone(),
            b"{\"cniVersion\": ".to_vec(),
        ),
        (
            "ADD with cniVersion 99.99.99",
            full.clone(),
            serde_json::to_vec(&bad_version).unwrap(),
        ),
        (
            "ADD without CNI_CONTAINERID",
            CniEnv {
                container_id: None,
                ..full.clone()
            },
            good.clone(),
        ),
    ];
    let mut problems = Vec::new();
    let mut codes = Vec::new();
    // A second ADD is an error too.
    let first = pod.try_add()?;
    if first.ok {
        trials.push((
            "a second ADD of the same attachment",
            full.clone(),
            good.clone(),
        ));
    } else {
        problems.push(format!(
            "ADD (needed for the ADD-twice error) failed: {}",
            first.detail
        ));
    }
    for (what, env, stdin) in trials {
        let inv = direct(rt, env, &stdin)?;
        match inv.cni_error() {
            Ok(e) => codes.push(format!("{what}: {}", e.code)),
            Err(e) => problems.push(format!("{what}: {e:#}")),
        }
    }
    pod.del()?;
    if !problems.is_empty() {
        fail!("{}", problems.join("; "));
    }
    Ok(format!(
        "one JSON object with code and msg on stdout, nothing else ({})",
        codes.join(", ")
    ))
}

fn bad_json_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let pod = scratch(&rt.clone(), "bj")?;
    let inv = direct(
        rt,
        CniEnv::for_att("ADD", &pod.att),
        b"{\"cniVersion\": \"1.0.0\", \"name\": ",
    )?;
    expect_code(&inv, &[6], "ADD with malformed JSON on stdin")
}

fn missing_command_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let pod = scratch(&rt.clone(), "mc")?;
    let env = CniEnv {
        command: None,
        ..CniEnv::for_att("ADD", &pod.att)
    };
    let inv = direct(rt, env, &serde_json::to_vec(&main_conf(rt)).unwrap())?;
    expect_code(&inv, &[4], "a call without CNI_COMMAND")
}

fn missing_container_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let pod = scratch(&rt.clone(), "mi")?;
    let env = CniEnv {
        container_id: None,
        ..CniEnv::for_att("ADD", &pod.att)
    };
    let inv = direct(rt, env, &serde_json::to_vec(&main_conf(rt)).unwrap())?;
    expect_code(&inv, &[4], "ADD without CNI_CONTAINERID")
}

fn unsupported_version_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let pod = scratch(&rt.clone(), "uv")?;
    let mut conf = main_conf(rt);
    conf["cniVersion"] = json!("99.99.99");
    let inv = direct(
        rt,
        CniEnv::for_att("ADD", &pod.att),
        &serde_json::to_vec(&conf).unwrap(),
    )?;
    expect_code(&inv, &[1], "ADD with cniVersion 99.99.99")
}

// ---- ADD, results, the interface, traffic ----------------------------------------------------

fn schema_case(ctx: &Ctx, v: &str) -> CaseResult {
    let rt = &ctx.rt;
    if !rt.advertises(v) {
        na!(
            "the plugin does not advertise {v} (it advertises {})",
            rt.advertised.join(", ")
        );
    }
    let list = rt.list_v(v);
    let mut pod = Pod::own(rt, "rs", list.clone())?;
    pod.added = true;
    let (out, _) = cni::add(&rt.plugins, &list, &pod.att, None)?;
    pod.result = out.result.clone();
    out.check_ok(&format!("ADD with cniVersion {v}"))?;
    let mut notes = Vec::new();
    for inv in &out.invocations {
        let r = schema::validate_result(&inv.stdout_json()?, v);
        if !r.problems.is_empty() {
            fail!(
                "{}'s {v} result is invalid: {}",
                inv.plugin,
                r.problems.join("; ")
            );
        }
        notes.extend(r.notes);
    }
    let result = out.result.clone().unwrap();
    let Some((_, iface)) = schema::sandbox_iface(&result, &pod.att.ifname) else {
        fail!(
            "the result has no interface {:?} with a sandbox: {result}",
            pod.att.ifname
        );
    };
    if iface.get("sandbox").and_then(Value::as_str) != Some(pod.path()) {
        fail!(
            "interface {} has sandbox {:?}, not the netns path {}",
            pod.att.ifname,
            iface.get("sandbox"),
            pod.path()
        );
    }
    if schema::sandbox_addresses(&result, &pod.att.ifname).is_empty() {
        fail!("the result gives {} no address", pod.att.ifname);
    }
    // 1.1.0 interfaces may carry their MTU: it must be the link's.
    if version_ge(v, "1.1.0") {
        let pod_links = netstate::links(&pod.ns_name)?;
        let node_links = netstate::links(&rt.node.name)?;
        for i in result
            .get("interfaces")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(mtu) = i.get("mtu").and_then(Value::as_u64) else {
                continue;
            };
            let name = i.get("name").and_then(Value::as_str).unwrap_or("");
            let in_pod = i
                .get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty());
            let links = if in_pod { &pod_links } else { &node_links };
            match links.iter().find(|l| l.name == name) {
                Some(l) if l.mtu == mtu => {}
                Some(l) => fail!(
                    "interface {name} has MTU {} but the result says {mtu}",
                    l.mtu
                ),
                None => fail!("interface {name} of the result does not exist"),
            }
        }
    }
    let mut via = "raw output checked".to_string();
    if version_ge(v, "0.4.0") {
        let c = cni::check(&rt.plugins, &list, &pod.att, &result)?;
        if !c.ok() {
            fail!(
                "CHECK with this {v} result as prevResult failed: {}",
                c.failure.unwrap_or_default()
            );
        }
        via.push_str(", CHECK with it passes");
    }
    if version_ge(CNITOOL_MAX, v) && rt.cnitool.is_some() {
        let mut p2 = Pod::via_cnitool(rt, "rc", list.clone())?;
        let r2 = p2.add().context("the same ADD through cnitool (libcni)")?;
        let rep = schema::validate_result(&r2, v);
        if !rep.problems.is_empty() {
            fail!(
                "result as cnitool prints it is invalid: {}",
                rep.problems.join("; ")
            );
        }
        p2.del()?;
        via.push_str("; libcni (cnitool) accepts it");
    } else if rt.cnitool.is_some() {
        via.push_str("; cnitool 1.1.2 cannot take this version, so the runner drove it");
    }
    pod.del()?;
    if notes.is_empty() {
        Ok(via)
    } else {
        Ok(format!("{via}; notes: {}", notes.join("; ")))
    }
}

fn add_interface_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let mut pod = Pod::new(rt, "ai")?;
    let r = pod.add()?;
    let ifname = pod.att.ifname.clone();
    let Some((_, iface)) = schema::sandbox_iface(&r, &ifname) else {
        fail!("the result has no interface {ifname:?} with a sandbox: {r}");
    };
    if iface.get("sandbox").and_then(Value::as_str) != Some(pod.path()) {
        fail!(
            "{ifname} has sandbox {:?} in the result, the netns is {}",
            iface.get("sandbox"),
            pod.path()
        );
    }
    let links = netstate::links(&pod.ns_name)?;
    let Some(link) = links.iter().find(|l| l.name == ifname) else {
        fail!(
            "{ifname} does not exist in the pod namespace (links: {:?})",
            links.iter().map(|l| &l.name).collect::<Vec<_>>()
        );
    };
    if !link.up {
        fail!("{ifname} is down in the pod namespace");
    }
    if let Some(mac) = iface
        .get("mac")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    {
        if mac.to_lowercase() != link.mac {
            fail!("{ifname} has MAC {} but the result says {mac}", link.mac);
        }
    }
    let have: Vec<(IpAddr, u8)> = netstate::addresses(&pod.ns_name)?
        .into_iter()
        .filter(|(l, _, _)| *l == ifname)
        .map(|(_, ip, p)| (ip, p))
        .collect();
    let want = schema::sandbox_addresses(&r, &ifname);
    if want.is_empty() {
        fail!("the result gives {ifname} no address");
    }
    for a in &want {
        if !have.contains(a) {
            fail!(
                "{ifname} lacks {}/{} from the result (it has {:?})",
                a.0,
                a.1,
                have
            );
        }
    }
    let routes = netstate::routes(&pod.ns_name)?;
    let want_routes = r
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for rr in &want_routes {
        let dst = rr.get("dst").and_then(Value::as_str).unwrap_or("");
        let gw: Option<IpAddr> = rr
            .get("gw")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        if !routes
            .iter()
            .any(|k| k.dst == dst && (gw.is_none() || k.gw == gw))
        {
            fail!(
                "route {rr} from the result is not in the pod (routes: {:?})",
                routes.iter().map(|k| k.key()).collect::<Vec<_>>()
            );
        }
    }
    let node_links = netstate::links(&rt.node.name)?;
    let mut host_side = 0;
    for i in r
        .get("interfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if i.get("sandbox")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
        {
            continue;
        }
        let name = i.get("name").and_then(Value::as_str).unwrap_or("");
        let Some(l) = node_links.iter().find(|l| l.name == name) else {
            fail!("host-side interface {name} from the result is not in the node namespace");
        };
        if let Some(mac) = i
            .get("mac")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            if mac.to_lowercase() != l.mac {
                fail!(
                    "host-side {name} has MAC {} but the result says {mac}",
                    l.mac
                );
            }
        }
        host_side += 1;
    }
    pod.del()?;
    Ok(format!(
        "{ifname} up with MAC {}, {} address(es), {} route(s), {host_side} host-side interface(s) as in the result",
        link.mac,
        want.len(),
        want_routes.len()
    ))
}

fn traffic_node_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let ip = ctx.anchor_ip()?;
    let ns = ctx.anchor_netns()?;
    ping(&rt.node_path(), ip)?;
    tcp_echo(&ns, 0, &rt.node_path(), ip, None)?;
    Ok(format!("node → pod {ip}: ping and TCP"))
}

fn traffic_pod_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let a_ip = ctx.anchor_ip()?;
    let a_ns = ctx.anchor_netns()?;
    let mut b = Pod::new(rt, "tb")?;
    b.add()?;
    let b_ip = b.ip()?;
    ping(&a_ns, b_ip)?;
    ping(&b.netns_path(), a_ip)?;
    tcp_echo(&b.netns_path(), 0, &a_ns, b_ip, None)?;
    tcp_echo(&a_ns, 0, &b.netns_path(), a_ip, None)?;
    b.del()?;
    Ok(format!("{a_ip} ⇄ {b_ip}: ping and TCP both ways"))
}

fn second_interface_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let base = ctx.baseline()?;
    let mut first = Pod::new(rt, "s1")?;
    first.add()?;
    let ip1 = first.ip()?;
    // The same container and netns, another interface: a second attachment the spec allows.
    let second_if = if rt.opts.ifname == "net1" {
        "net2"
    } else {
        "net1"
    };
    let mut second = Pod::own(rt, "s2", first.list.clone())?;
    second.att = first.att.clone();
    second.att.ifname = second_if.to_string();
    let a = second.try_add()?;
    if !a.ok {
        second.added = false;
        fail!(
            "ADD of {second_if} into a pod that has {} failed: {}",
            first.att.ifname,
            first_line(&a)
        );
    }
    let ip2 = second.ip()?;
    if ip1 == ip2 {
        fail!("both interfaces got {ip1}");
    }
    ping(&rt.node_path(), ip2).with_context(|| format!("{second_if} ({ip2}) unreachable"))?;
    second.del()?;
    ping(&rt.node_path(), ip1).with_context(|| {
        format!(
            "after DEL of {second_if}, {} ({ip1}) unreachable",
            first.att.ifname
        )
    })?;
    first.del()?;
    // `second` shares the netns path but not the namespace object: nothing else to remove.
    ctx.back_to(&base, Duration::from_secs(3))?;
    Ok(format!(
        "{} ({ip1}) and {second_if} ({ip2}) in one pod; DEL of one leaves the other working",
        first.att.ifname
    ))
}

fn add_twice_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let mut pod = Pod::new(rt, "a2")?;
    pod.add()?;
    let ip = pod.ip()?;
    let (out, _) = pod.own_add_again()?;
    if out.ok() {
        fail!(
            "a second ADD of the same container and interface succeeded: {}",
            out.result.map(|r| r.to_string()).unwrap_or_default()
        );
    }
    let code = out
        .last()
        .and_then(|i| i.cni_error().ok())
        .map(|e| format!("code {}: {}", e.code, e.msg))
        .unwrap_or_else(|| "no spec error on stdout".into());
    // The failed ADD must not have broken the first attachment.
    let have = netstate::addresses(&pod.ns_name)?;
    if !have
        .iter()
        .any(|(l, a, _)| *l == pod.att.ifname && *a == ip)
    {
        fail!(
            "after the failed second ADD, {} no longer has {ip} ({have:?})",
            pod.att.ifname
        );
    }
    ping(&rt.node_path(), ip).context("after the failed second ADD, the pod is unreachable")?;
    pod.del()?;
    Ok(format!(
        "second ADD failed ({code}); the first attachment still works"
    ))
}

fn check_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if !has_check(rt, &rt.default_version) {
        na!("CHECK needs 0.4.0 or later");
    }
    let mut pod = Pod::new(rt, "ck")?;
    pod.add()?;
    let c = pod.try_check()?;
    if !c.ok {
        fail!("CHECK right after ADD failed: {}", c.detail);
    }
    pod.del()?;
    Ok(format!(
        "CHECK ({}) passes on a fresh attachment",
        pod.driver()
    ))
}

fn check_missing_addr_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if !has_check(rt, &rt.default_version) {
        na!("CHECK needs 0.4.0 or later");
    }
    let mut pod = Pod::new(rt, "ca")?;
    let r = pod.add()?;
    let c = pod.try_check()?;
    if !c.ok {
        fail!("CHECK right after ADD failed: {}", c.detail);
    }
    let (ip, p) = *schema::sandbox_addresses(&r, &pod.att.ifname)
        .first()
        .ok_or_else(|| anyhow!("no address in the result"))?;
    ip_in(
        &pod.ns_name,
        &["addr", "del", &format!("{ip}/{p}"), "dev", &pod.att.ifname],
    )?;
    let c = pod.try_check()?;
    pod.del().context("DEL after the address was removed")?;
    if c.ok {
        fail!(
            "CHECK passed although {ip}/{p} was removed from {}",
            pod.att.ifname
        );
    }
    Ok(format!(
        "CHECK fails once {ip}/{p} is gone: {}",
        first_line(&c)
    ))
}

fn first_line(a: &Attempt) -> String {
    let s = a
        .last
        .as_ref()
        .and_then(|i| i.cni_error().ok())
        .map(|e| match e.details.filter(|d| !d.is_empty()) {
            Some(d) => format!("code {}: {} ({d})", e.code, e.msg),
            None => format!("code {}: {}", e.code, e.msg),
        })
        .unwrap_or_else(|| a.detail.clone());
    s.lines().next().unwrap_or("").chars().take(220).collect()
}

fn check_missing_route_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if !has_check(rt, &rt.default_version) {
        na!("CHECK needs 0.4.0 or later");
    }
    let mut pod = Pod::new(rt, "cr")?;
    let r = pod.add()?;
    let c = pod.try_check()?;
    if !c.ok {
        fail!("CHECK right after ADD failed: {}", c.detail);
    }
    let want_routes = r
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if want_routes.is_empty() {
        pod.del()?;
        na!("the result lists no routes");
    }
    let routes = netstate::routes(&pod.ns_name)?;
    let mut victim = None;
    for rr in &want_routes {
        let dst = rr.get("dst").and_then(Value::as_str).unwrap_or("");
        let gw: Option<IpAddr> = rr
            .get("gw")
            .and_then(Value::as_str)
            .and_then(|g| g.parse().ok());
        if let Some(k) = routes
            .iter()
            .find(|k| k.dst == dst && (gw.is_none() || k.gw == gw))
        {
            victim = Some(k.clone());
            break;
        }
    }
    let Some(v) = victim else {
        fail!("none of the result's routes {want_routes:?} is in the pod");
    };
    let mut args = vec!["route".to_string(), "del".into(), v.dst.clone()];
    if let Some(g) = v.gw {
        args.extend(["via".into(), g.to_string()]);
    }
    if !v.dev.is_empty() {
        args.extend(["dev".into(), v.dev.clone()]);
    }
    args.extend(["table".into(), v.table.clone()]);
    let args_ref: Vec<&str> = args.iter().map(String::as_str).collect();
    ip_in(&pod.ns_name, &args_ref)?;
    let c = pod.try_check()?;
    pod.del().context("DEL after the route was removed")?;
    if c.ok {
        fail!("CHECK passed although route {} was removed", v.key());
    }
    Ok(format!(
        "CHECK fails once route {} is gone: {}",
        v.key(),
        first_line(&c)
    ))
}

// ---- DEL -------------------------------------------------------------------------------------

fn del_twice_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let base = ctx.baseline()?;
    let mut pod = Pod::new(rt, "d2")?;
    pod.add()?;
    pod.del()?;
    pod.added = true;
    let a = pod.try_del()?;
    if !a.ok {
        fail!("the second DEL failed: {}", a.detail);
    }
    pod.added = false;
    ctx.back_to(&base, Duration::from_secs(3))?;
    Ok("both DELs succeed; node back to its state before ADD".into())
}

fn del_netns_gone_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let base = ctx.baseline()?;
    let mut pod = Pod::new(rt, "dg")?;
    pod.add()?;
    pod.remove_netns();
    if pod.netns_path().exists() {
        fail!("could not remove {}", pod.path());
    }
    pod.del().context("DEL after the netns was deleted")?;
    ctx.back_to(&base, Duration::from_secs(10))?;
    Ok("DEL succeeds with the netns gone; host side and allocation released".into())
}

fn del_empty_netns_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let base = ctx.baseline()?;
    let mut pod = Pod::new(rt, "de")?;
    pod.add()?;
    let a = pod.own_del_with_netns("")?;
    if !a.ok {
        fail!("DEL with empty CNI_NETNS failed: {}", a.detail);
    }
    // The allocation must go even though the plugin could not enter the netns.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = rt.alloc_snapshot()?;
        if now == base.alloc {
            break;
        }
        if Instant::now() > deadline {
            fail!(
                "DEL with empty CNI_NETNS did not release the allocation (before: {:?}, now: {:?})",
                base.alloc,
                now
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    pod.remove_netns();
    ctx.back_to(&base, Duration::from_secs(10))?;
    Ok("DEL with CNI_NETNS=\"\" succeeds and releases the allocation; nothing left once the netns is gone".into())
}

fn del_unknown_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let base = ctx.baseline()?;
    let pod = Pod::own(rt, "du", rt.list_v(&rt.default_version))?;
    let mut att = pod.att.clone();
    att.container_id = format!("never-added-{}", rt.id);
    let out = cni::del(&rt.plugins, &pod.list, &att, None)?;
    out.check_ok("DEL of a container that was never added (runner)")?;
    let mut how = "runner".to_string();
    if rt.cnitool.is_some() && rt.cnitool_version.is_some() {
        let mut p2 = Pod::new(rt, "dv")?;
        p2.added = true;
        let a = p2.try_del()?;
        if !a.ok {
            fail!(
                "DEL of a never-added container through cnitool failed: {}",
                a.detail
            );
        }
        p2.added = false;
        how.push_str(" and cnitool");
    }
    ctx.back_to(&base, Duration::from_secs(3))?;
    Ok(format!(
        "DEL of a never-added container succeeds ({how}) and changes nothing"
    ))
}

fn no_leftovers_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let base = ctx.baseline()?;
    let mut pod = Pod::new(rt, "nl")?;
    let pod_before = netstate::snapshot(&pod.ns_name)?;
    pod.add()?;
    let during = rt.alloc_snapshot()?;
    if base.alloc.is_some() && during == base.alloc {
        fail!(
            "the allocation probe ({}) shows no change after ADD, so it cannot see leaks: {:?}",
            rt.alloc.describe(),
            during
        );
    }
    pod.del()?;
    let pod_after = netstate::snapshot(&pod.ns_name)?;
    if pod_after != pod_before {
        fail!(
            "left behind in the pod namespace: {}",
            pod_before.diff(&pod_after).join("; ")
        );
    }
    ctx.back_to(&base, Duration::from_secs(3))?;
    Ok(format!(
        "links, addresses, routes (node and pod) as before ADD; allocations: {}",
        rt.alloc.describe()
    ))
}

// ---- STATUS and GC ---------------------------------------------------------------------------

fn status_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if !rt.advertises("1.1.0") {
        na!(
            "STATUS exists from CNI 1.1.0; the plugin advertises {}",
            rt.advertised.join(", ")
        );
    }
    let out = cni::status(&rt.plugins, &rt.list_v("1.1.0"))?;
    out.check_ok("STATUS")?;
    for inv in &out.invocations {
        if !inv.stdout.trim().is_empty() && inv.stdout_json().is_err() {
            fail!(
                "{} STATUS succeeded but printed junk on stdout: {:?}",
                inv.plugin,
                inv.stdout
            );
        }
    }
    let ms = out
        .invocations
        .iter()
        .map(|i| i.elapsed.as_millis())
        .sum::<u128>();
    Ok(format!("STATUS exits 0 ({ms} ms)"))
}

fn status_gc_old_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if !rt.advertises("1.1.0") {
        na!(
            "the plugin has no STATUS/GC (it advertises {})",
            rt.advertised.join(", ")
        );
    }
    let Some(old) = KNOWN_VERSIONS
        .iter()
        .rev()
        .find(|v| !version_ge(v, "1.1.0") && rt.advertises(v))
    else {
        na!("the plugin advertises no version before 1.1.0");
    };
    let list = rt.list_v(old);
    let conf = list.plugin_stdin(0, None, &Value::Null, &Map::new());
    let s = direct(
        rt,
        CniEnv::verb_only("STATUS"),
        &serde_json::to_vec(&conf).unwrap(),
    )?;
    let a = expect_code(&s, &[1], &format!("STATUS with cniVersion {old}"))?;
    let g = direct(
        rt,
        CniEnv::verb_only("GC"),
        &serde_json::to_vec(&conf).unwrap(),
    )?;
    let b = expect_code(&g, &[1], &format!("GC with cniVersion {old}"))?;
    Ok(format!(
        "with a {old} config, STATUS gives {a}; GC gives {b}"
    ))
}

fn gc_case(ctx: &Ctx) -> CaseResult {
    gc_keys_case(ctx, cni::GC_KEYS)
}

fn gc_tag_key_case(ctx: &Ctx) -> CaseResult {
    gc_keys_case(ctx, &["cni.dev/attachments"])
        .map(|d| format!("list under cni.dev/attachments only: {d}"))
}

fn gc_keys_case(ctx: &Ctx, keys: &[&str]) -> CaseResult {
    let rt = &ctx.rt;
    if !rt.advertises("1.1.0") {
        na!(
            "GC exists from CNI 1.1.0; the plugin advertises {}",
            rt.advertised.join(", ")
        );
    }
    let list = rt.list_v("1.1.0");
    let base = ctx.baseline()?;
    let mut keep = Pod::own(rt, "gk", list.clone())?;
    keep.add()?;
    let with_keep = Base {
        node: rt.node_state()?,
        alloc: rt.alloc_snapshot()?,
    };
    let mut drop = Pod::own(rt, "gd", list.clone())?;
    drop.add()?;
    let valid: Vec<(String, String)> = rt
        .live_list()
        .into_iter()
        .filter(|(c, i)| !(*c == drop.att.container_id && *i == drop.att.ifname))
        .collect();
    let out = cni::gc_with_keys(&rt.plugins, &list, Some(&valid), keys)?;
    out.check_ok("GC")?;
    ctx.back_to(&with_keep, Duration::from_secs(5))
        .context("GC did not release the unlisted attachment")?;
    let c = keep.try_check()?;
    if !c.ok {
        fail!("after GC, CHECK of a listed attachment fails: {}", c.detail);
    }
    ping(&rt.node_path(), keep.ip()?).context("after GC, a listed attachment is unreachable")?;
    drop.del().context("DEL of the collected attachment")?;
    keep.del()?;
    ctx.back_to(&base, Duration::from_secs(3))?;
    Ok(format!(
        "GC with {} valid attachment(s) released the unlisted one, kept the listed ones working",
        valid.len()
    ))
}

fn gc_no_list_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    if !rt.advertises("1.1.0") {
        na!(
            "GC exists from CNI 1.1.0; the plugin advertises {}",
            rt.advertised.join(", ")
        );
    }
    let list = rt.list_v("1.1.0");
    ctx.baseline()?;
    let mut keep = Pod::own(rt, "gn", list.clone())?;
    keep.add()?;
    let before = Base {
        node: rt.node_state()?,
        alloc: rt.alloc_snapshot()?,
    };
    let out = cni::gc(&rt.plugins, &list, None)?;
    let how = match (out.ok(), out.last()) {
        (true, _) => "GC without a list exits 0".to_string(),
        (false, Some(inv)) => match inv.cni_error() {
            Ok(e) => format!("GC without a list refuses (code {}: {})", e.code, e.msg),
            Err(e) => fail!("GC without a list failed without a spec error: {e:#}"),
        },
        (false, None) => fail!("GC without a list failed: {:?}", out.failure),
    };
    ctx.back_to(&before, Duration::from_secs(1))
        .context("GC without a list released something")?;
    let c = keep.try_check()?;
    if !c.ok {
        fail!("after GC without a list, CHECK fails: {}", c.detail);
    }
    keep.del()?;
    Ok(format!("{how} and releases nothing"))
}

// ---- chains, concurrency, kills --------------------------------------------------------------

fn iptables_lines(rt: &Rt) -> Option<Vec<String>> {
    let f = crate::ns::open(&rt.node_path()).ok()?;
    let out = crate::ns::command_in(std::os::fd::AsRawFd::as_raw_fd(&f), "iptables-save")
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    })
}

fn chain_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    for t in ["portmap", "bandwidth"] {
        if rt.plugins.find(t).is_err() {
            na!("{t} is not in the CNI path ({})", rt.plugins.cni_path());
        }
    }
    let pm = cni::supported_versions(&cni::version(&rt.plugins, "portmap", "0.4.0")?)?;
    let bw = cni::supported_versions(&cni::version(&rt.plugins, "bandwidth", "0.4.0")?)?;
    let limit = if rt.cnitool.is_some() {
        CNITOOL_MAX
    } else {
        "9.9.9"
    };
    let Some(v) = KNOWN_VERSIONS.iter().rev().find(|v| {
        version_ge(limit, v)
            && rt.advertises(v)
            && pm.iter().any(|x| x == *v)
            && bw.iter().any(|x| x == *v)
    }) else {
        na!("no version shared by the plugin ({}), portmap and bandwidth that the runtime can drive", rt.advertised.join(", "));
    };
    let list = rt.list_v(v).with_plugins_appended(&[
        json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        json!({"type": "bandwidth", "capabilities": {"bandwidth": true}}),
    ]);
    let base = ctx.baseline()?;
    let (host_port, pod_port) = (18080u16, 8080u16);
    let mut pod = if rt.cnitool.is_some() {
        Pod::via_cnitool(rt, "ch", list)?
    } else {
        Pod::own(rt, "ch", list)?
    };
    pod.att.cap_args = runner::chain_cap_args(host_port, pod_port);
    let r = pod.add()?;
    if schema::sandbox_iface(&r, &pod.att.ifname).is_none()
        || schema::sandbox_addresses(&r, &pod.att.ifname).is_empty()
    {
        fail!("the chain's final result lost the plugin's interface or address (prevResult not passed through): {r}");
    }
    let rep = schema::validate_result(&r, v);
    if !rep.problems.is_empty() {
        fail!("the chain's result is invalid: {}", rep.problems.join("; "));
    }
    // bandwidth found the host side of the plugin's interface in prevResult and shaped it.
    let tc = std::process::Command::new("tc")
        .args(["-n", &rt.node.name, "qdisc", "show"])
        .output()
        .context("running tc")?;
    let tc = String::from_utf8_lossy(&tc.stdout);
    if !tc.contains("tbf") {
        fail!("no tbf qdisc in the node namespace after ADD: bandwidth did not shape the host side ({})", tc.trim());
    }
    let node_ip: IpAddr = rt
        .opts
        .node_addr
        .split('/')
        .next()
        .unwrap_or("")
        .parse()
        .context("--node-addr")?;
    tcp_echo(
        &pod.netns_path(),
        pod_port,
        &rt.node_path(),
        node_ip,
        Some(host_port),
    )
    .context("portmap: TCP to the node's hostPort")?;
    // CHECK of the plugin's own entries with the chain's final result as prevResult. (The whole
    // chain's CHECK is only reported: Debian's portmap 1.1.1 fails CHECK on IPv4-only pods,
    // containernetworking/plugins#819.)
    let own = cni::check(&rt.plugins, &rt.list_v(v), &pod.att, &r)?;
    if !own.ok() {
        fail!(
            "CHECK of {} with the chain's result as prevResult failed: {}",
            rt.main_type,
            own.failure.unwrap_or_default()
        );
    }
    let whole = pod.try_check()?;
    let whole = if whole.ok {
        "whole-chain CHECK ok".to_string()
    } else {
        format!(
            "whole-chain CHECK fails outside the plugin: {}",
            first_line(&whole)
        )
    };
    let cid = pod.att.container_id.clone();
    pod.del()?;
    ctx.back_to(&base, Duration::from_secs(5))?;
    if let Some(lines) = iptables_lines(rt) {
        let left: Vec<&String> = lines.iter().filter(|l| l.contains(&cid)).collect();
        if !left.is_empty() {
            fail!("iptables rules for the container survive DEL: {left:?}");
        }
    }
    Ok(format!(
        "cniVersion {v}, {} + portmap + bandwidth: prevResult kept, host side shaped, hostPort {host_port} → pod:{pod_port} works, CHECK of the plugin ok, DEL leaves nothing ({whole})",
        rt.main_type
    ))
}

fn concurrent_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let n = rt.opts.concurrency;
    let base = ctx.baseline()?;
    let start = Instant::now();
    let made: Vec<Result<Pod>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| -> Result<Pod> {
                    let mut p = Pod::new(rt, "cc")?;
                    p.add()?;
                    Ok(p)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("thread panicked"))))
            .collect()
    });
    let took = start.elapsed();
    let mut pods = Vec::new();
    let mut errs = Vec::new();
    for m in made {
        match m {
            Ok(p) => pods.push(p),
            Err(e) => errs.push(format!("{e:#}")),
        }
    }
    if !errs.is_empty() {
        fail!(
            "{} of {n} concurrent ADDs failed; first: {}",
            errs.len(),
            errs[0]
        );
    }
    let ips: Vec<IpAddr> = pods.iter().map(|p| p.ip()).collect::<Result<_>>()?;
    let distinct: BTreeSet<&IpAddr> = ips.iter().collect();
    if distinct.len() != n {
        let mut seen = BTreeSet::new();
        let dups: Vec<String> = ips
            .iter()
            .filter(|ip| !seen.insert(*ip))
            .map(|ip| ip.to_string())
            .collect();
        fail!(
            "{n} concurrent ADDs gave only {} distinct addresses; duplicated: {}",
            distinct.len(),
            dups.join(", ")
        );
    }
    let node = rt.node_path();
    let bad: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = ips
            .iter()
            .map(|ip| (ip, s.spawn(|| ping(&node, *ip))))
            .collect();
        hs.into_iter()
            .filter_map(|(ip, h)| {
                h.join()
                    .ok()
                    .and_then(|r| r.err())
                    .map(|e| format!("{ip}: {e:#}"))
            })
            .collect()
    });
    if !bad.is_empty() {
        fail!(
            "{} of {n} pods unreachable from the node; first: {}",
            bad.len(),
            bad[0]
        );
    }
    ping(&pods[0].netns_path(), ips[n - 1]).context("first pod to last pod")?;
    let del_errs: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = pods.iter_mut().map(|p| s.spawn(move || p.del())).collect();
        hs.into_iter()
            .filter_map(|h| {
                h.join()
                    .ok()
                    .and_then(|r| r.err())
                    .map(|e| format!("{e:#}"))
            })
            .collect()
    });
    if !del_errs.is_empty() {
        fail!(
            "{} of {n} concurrent DELs failed; first: {}",
            del_errs.len(),
            del_errs[0]
        );
    }
    drop(pods);
    ctx.back_to(&base, Duration::from_secs(10))?;
    Ok(format!("{n} concurrent ADDs in {:.1} s: {n} distinct addresses, all reachable; concurrent DELs leave nothing", took.as_secs_f64()))
}

struct Rng(u64);
impl Rng {
    fn new() -> Rng {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Rng(t ^ ((std::process::id() as u64) << 32) | 1)
    }
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn killed_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let list = rt.list_v(&rt.default_version);
    let base = ctx.baseline()?;
    // How long an ADD takes here.
    let mut m = Pod::own(rt, "km", list.clone())?;
    let (out, _) = cni::add(&rt.plugins, &list, &m.att, None)?;
    m.added = true;
    m.result = out.result.clone();
    out.check_ok("ADD (to time it)")?;
    let t: Duration = out.invocations.iter().map(|i| i.elapsed).sum();
    m.del()?;
    drop(m);
    ctx.back_to(&base, Duration::from_secs(3))?;

    let rounds = rt.opts.kill_rounds.max(1);
    let mut rng = Rng::new();
    let mut landed = 0;
    let mut at = Vec::new();
    for k in 0..rounds {
        let frac = (k as f64 + 0.5) / rounds as f64 * (0.85 + 0.3 * rng.next_f64());
        let delay = t.mul_f64(frac.min(0.98));
        let mut pod = Pod::own(rt, "kk", list.clone())?;
        pod.added = true;
        let (out, killed) = cni::add(&rt.plugins, &list, &pod.att, Some(delay))?;
        if killed {
            landed += 1;
        } else {
            pod.result = out.result.clone();
        }
        at.push(format!(
            "{}{}",
            delay.as_millis(),
            if killed { "" } else { "(done)" }
        ));
        let a = pod.try_del()?;
        if !a.ok {
            fail!(
                "after killing ADD at {} ms, DEL failed: {}",
                delay.as_millis(),
                a.detail
            );
        }
        ctx.back_to(&base, Duration::from_secs(5))
            .with_context(|| {
                format!(
                    "after killing ADD at {} ms of ~{} ms and DEL",
                    delay.as_millis(),
                    t.as_millis()
                )
            })?;
        pod.result = None;
        let again = pod.try_add()?;
        if !again.ok {
            fail!(
                "after a kill at {} ms and DEL, ADD of the same container fails: {}",
                delay.as_millis(),
                again.detail
            );
        }
        pod.del()?;
        ctx.back_to(&base, Duration::from_secs(5))
            .context("after the re-ADD and DEL")?;
    }
    Ok(format!(
        "{rounds} rounds, ADD ~{} ms, killed at [{}] ms: {landed} landed mid-ADD; each time DEL cleaned up and a re-ADD worked",
        t.as_millis(),
        at.join(", ")
    ))
}

fn killed_del_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let list = rt.list_v(&rt.default_version);
    let base = ctx.baseline()?;
    let mut m = Pod::own(rt, "kd", list.clone())?;
    m.add()?;
    let out = cni::del(&rt.plugins, &list, &m.att, m.result.as_ref())?;
    out.check_ok("DEL (to time it)")?;
    m.added = false;
    let t: Duration = out.invocations.iter().map(|i| i.elapsed).sum();
    drop(m);
    let rounds = rt.opts.kill_rounds.max(1);
    let mut rng = Rng::new();
    let mut landed = 0;
    let mut at = Vec::new();
    for k in 0..rounds {
        let frac = (k as f64 + 0.5) / rounds as f64 * (0.85 + 0.3 * rng.next_f64());
        let delay = t.mul_f64(frac.min(0.98));
        let mut pod = Pod::own(rt, "kl", list.clone())?;
        pod.add()?;
        let (_, killed) =
            cni::del_kill_at(&rt.plugins, &list, &pod.att, pod.result.as_ref(), delay)?;
        if killed {
            landed += 1;
        }
        at.push(format!(
            "{}{}",
            delay.as_millis(),
            if killed { "" } else { "(done)" }
        ));
        let a = pod.try_del()?;
        if !a.ok {
            fail!(
                "after killing DEL at {} ms, the next DEL failed: {}",
                delay.as_millis(),
                a.detail
            );
        }
        pod.added = false;
        ctx.back_to(&base, Duration::from_secs(5))
            .with_context(|| {
                format!(
                    "after killing DEL at {} ms of ~{} ms and DEL again",
                    delay.as_millis(),
                    t.as_millis()
                )
            })?;
    }
    Ok(format!(
        "{rounds} rounds, DEL ~{} ms, killed at [{}] ms: {landed} landed mid-DEL; each time the next DEL cleaned up",
        t.as_millis(),
        at.join(", ")
    ))
}

// ---- hooks: the daemon down ------------------------------------------------------------------

fn wait_status_ok(rt: &Rt, list: &cni::NetList, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let out = cni::status(&rt.plugins, list)?;
        if out.ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "STATUS still fails {within:?} after setup: {}",
                out.failure.unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status_down_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let Some((setup, teardown)) = ctx.hooks() else {
        na!("needs --setup and --teardown (to stop the plugin's daemon)");
    };
    if !rt.advertises("1.1.0") {
        na!(
            "STATUS exists from CNI 1.1.0; the plugin advertises {}",
            rt.advertised.join(", ")
        );
    }
    ctx.with_anchor(|_| Ok(()))?;
    let list = rt.list_v("1.1.0");
    rt.hook("teardown", &teardown)?;
    let out = cni::status(&rt.plugins, &list);
    let up = rt.hook("setup", &setup);
    let out = out?;
    up?;
    let inv = out.last().ok_or_else(|| anyhow!("STATUS ran no plugin"))?;
    let r = expect_code(inv, &[50, 51], "STATUS with the daemon stopped");
    wait_status_ok(rt, &list, Duration::from_secs(30))?;
    Ok(format!("{}; STATUS back to 0 after setup", r?))
}

fn del_down_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let Some((setup, teardown)) = ctx.hooks() else {
        na!("needs --setup and --teardown (to stop the plugin's daemon)");
    };
    let base = ctx.baseline()?;
    let mut pod = Pod::new(rt, "dd")?;
    pod.add()?;
    rt.hook("teardown", &teardown)?;
    let a = pod.try_del();
    rt.hook("setup", &setup)?;
    let a = a?;
    if !a.ok {
        fail!(
            "DEL with the daemon stopped failed (kubelet would retry forever): {}",
            a.detail
        );
    }
    pod.added = false;
    ctx.back_to(&base, Duration::from_secs(15))
        .context("after DEL with the daemon down and a restart")?;
    Ok(
        "DEL succeeds with the daemon stopped; after setup nothing is left (allocation reconciled)"
            .into(),
    )
}

fn check_daemon_down_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let Some((setup, teardown)) = ctx.hooks() else {
        na!("needs --setup and --teardown (to stop the plugin's daemon)");
    };
    if !has_check(rt, &rt.default_version) {
        na!("CHECK needs 0.4.0 or later");
    }
    ctx.with_anchor(|_| Ok(()))?;
    let mut pod = Pod::new(rt, "cd")?;
    pod.add()?;
    let before = pod.try_check()?;
    if !before.ok {
        fail!("CHECK right after ADD failed: {}", before.detail);
    }
    rt.hook("teardown", &teardown)?;
    let c = pod.try_check();
    rt.hook("setup", &setup)?;
    let c = c?;
    pod.del()?;
    if c.ok {
        fail!("CHECK passed while the daemon was stopped (the spec lists \"external dependencies such as a daemon required for connectivity\")");
    }
    Ok(format!(
        "CHECK fails while the daemon is stopped: {}",
        first_line(&c)
    ))
}

fn add_daemon_down_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let Some((setup, teardown)) = ctx.hooks() else {
        na!("needs --setup and --teardown (to stop the plugin's daemon)");
    };
    let base = ctx.baseline()?;
    let mut pod = Pod::own(rt, "ad", rt.list_v(&rt.default_version))?;
    let pod_before = netstate::snapshot(&pod.ns_name)?;
    rt.hook("teardown", &teardown)?;
    let a = pod.try_add();
    let node_down = rt.node_state();
    rt.hook("setup", &setup)?;
    let a = a?;
    if a.ok {
        fail!("ADD succeeded with the daemon stopped");
    }
    let inv = a
        .last
        .as_ref()
        .ok_or_else(|| anyhow!("ADD ran no plugin"))?;
    let e = inv.cni_error().context("ADD with the daemon stopped")?;
    let diff = base.node.diff(&node_down?);
    if !diff.is_empty() {
        fail!(
            "the failed ADD left, in the node namespace: {}",
            diff.join("; ")
        );
    }
    let pod_after = netstate::snapshot(&pod.ns_name)?;
    if pod_after != pod_before {
        fail!(
            "the failed ADD left, in the pod namespace: {}",
            pod_before.diff(&pod_after).join("; ")
        );
    }
    pod.del().context("DEL after the failed ADD")?;
    ctx.back_to(&base, Duration::from_secs(5))?;
    Ok(format!(
        "ADD with the daemon stopped fails (code {}: {}) and leaves nothing",
        e.code, e.msg
    ))
}

fn bad_ifname_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let mut bad = Vec::new();
    let mut codes = Vec::new();
    for name in ["eth0:1", "a/b", "has space", "x23456789012345678", ".."] {
        let pod = scratch(&rt.clone(), "bi")?;
        let env = CniEnv {
            ifname: Some(name.to_string()),
            ..CniEnv::for_att("ADD", &pod.att)
        };
        let inv = direct(rt, env, &serde_json::to_vec(&main_conf(rt)).unwrap())?;
        match inv.cni_error() {
            Ok(e) if e.code == 4 => codes.push(format!("{name:?}")),
            Ok(e) => bad.push(format!("{name:?}: code {} ({})", e.code, e.msg)),
            Err(e) => bad.push(format!("{name:?}: {e:#}")),
        }
    }
    if !bad.is_empty() {
        fail!(
            "invalid CNI_IFNAME not rejected with error 4: {}",
            bad.join("; ")
        );
    }
    Ok(format!("error 4 for {}", codes.join(", ")))
}

fn restart_case(ctx: &Ctx) -> CaseResult {
    let rt = &ctx.rt;
    let Some((setup, teardown)) = ctx.hooks() else {
        na!("needs --setup and --teardown");
    };
    let ip = ctx.anchor_ip()?;
    rt.hook("teardown", &teardown)?;
    rt.hook("setup", &setup)?;
    ping(&rt.node_path(), ip).context("after teardown + setup, the existing pod is unreachable")?;
    let c = ctx.with_anchor(|p| p.try_check())?;
    if !c.ok {
        fail!(
            "after teardown + setup, CHECK of the existing pod fails: {}",
            c.detail
        );
    }
    Ok(format!(
        "pod {ip} reachable and CHECK passes after teardown + setup"
    ))
}

/// Every case, in the order they run.
pub fn all() -> Vec<Case> {
    use Req::*;
    let mut v: Vec<Case> = Vec::new();
    let mut add =
        |name: &str, req: Req, about: &'static str, f: Box<dyn Fn(&Ctx) -> CaseResult>| {
            v.push(Case {
                name: name.to_string(),
                req,
                about,
                run: f,
            });
        };
    add(
        "version",
        Required,
        "VERSION: one JSON object with semantic-version supportedVersions",
        Box::new(version_case),
    );
    add(
        "version-echoes-cniversion",
        Advisory,
        "VERSION answers with the cniVersion it was given",
        Box::new(version_echo_case),
    );
    add(
        "errors-json-on-stdout",
        Required,
        "errors are one JSON object with code and msg on stdout, nothing else",
        Box::new(errors_json_case),
    );
    add(
        "bad-json-code-6",
        Required,
        "malformed stdin gives error 6",
        Box::new(bad_json_case),
    );
    add(
        "missing-cni-command-code-4",
        Required,
        "no CNI_COMMAND gives error 4",
        Box::new(missing_command_case),
    );
    add(
        "missing-container-id-code-4",
        Required,
        "ADD without CNI_CONTAINERID gives error 4",
        Box::new(missing_container_case),
    );
    add(
        "bad-ifname-code-4",
        Advisory,
        "an invalid CNI_IFNAME gives error 4",
        Box::new(bad_ifname_case),
    );
    add(
        "unsupported-version-code-1",
        Required,
        "a cniVersion not advertised gives error 1",
        Box::new(unsupported_version_case),
    );
    for ver in KNOWN_VERSIONS {
        let ver = ver.to_string();
        add(
            &format!("result-schema-{ver}"),
            Required,
            "ADD's result is valid for the requested version",
            Box::new(move |c| schema_case(c, &ver)),
        );
    }
    add(
        "add-interface",
        Required,
        "the interface exists in the netns with the result's MAC, addresses and routes",
        Box::new(add_interface_case),
    );
    add(
        "traffic-node-to-pod",
        Required,
        "ping and TCP from the node to a pod",
        Box::new(traffic_node_case),
    );
    add(
        "traffic-pod-to-pod",
        Required,
        "ping and TCP between two pods",
        Box::new(traffic_pod_case),
    );
    add(
        "add-twice-fails",
        Required,
        "a second ADD of the same attachment fails and breaks nothing",
        Box::new(add_twice_case),
    );
    add(
        "second-interface",
        Advisory,
        "a second interface (another CNI_IFNAME) for the same container works alongside the first",
        Box::new(second_interface_case),
    );
    add(
        "check-passes",
        Required,
        "CHECK passes right after ADD",
        Box::new(check_case),
    );
    add(
        "check-detects-missing-address",
        Required,
        "CHECK fails once an address is removed",
        Box::new(check_missing_addr_case),
    );
    add(
        "check-detects-missing-route",
        Required,
        "CHECK fails once a route is removed",
        Box::new(check_missing_route_case),
    );
    add(
        "del-twice",
        Required,
        "DEL twice succeeds",
        Box::new(del_twice_case),
    );
    add(
        "del-netns-gone",
        Required,
        "DEL after the netns is deleted succeeds and releases everything",
        Box::new(del_netns_gone_case),
    );
    add(
        "del-empty-netns",
        Required,
        "DEL with empty CNI_NETNS succeeds and releases the allocation",
        Box::new(del_empty_netns_case),
    );
    add(
        "del-unknown-container",
        Required,
        "DEL of a never-added container succeeds",
        Box::new(del_unknown_case),
    );
    add(
        "no-leftovers-after-del",
        Required,
        "after DEL: no links, addresses, routes or allocations left",
        Box::new(no_leftovers_case),
    );
    add(
        "status",
        Required,
        "STATUS exits 0 when ready (1.1.0)",
        Box::new(status_case),
    );
    add(
        "status-gc-need-1.1.0",
        Advisory,
        "STATUS and GC with an older config give error 1",
        Box::new(status_gc_old_case),
    );
    add(
        "gc",
        Required,
        "GC keeps listed attachments and releases the others (1.1.0)",
        Box::new(gc_case),
    );
    add(
        "gc-spec-tag-key",
        Advisory,
        "GC honours the list under spec tag 1.1.0's key cni.dev/attachments alone",
        Box::new(gc_tag_key_case),
    );
    add(
        "gc-without-list-is-safe",
        Advisory,
        "GC without an attachment list releases nothing",
        Box::new(gc_no_list_case),
    );
    add(
        "chain-portmap-bandwidth",
        Required,
        "prevResult passes through a chain with portmap and bandwidth",
        Box::new(chain_case),
    );
    add(
        "concurrent-adds",
        Required,
        "concurrent ADDs give distinct working addresses",
        Box::new(concurrent_case),
    );
    add(
        "killed-mid-add",
        Required,
        "a plugin killed mid-ADD leaves nothing a DEL cannot clean",
        Box::new(killed_case),
    );
    add(
        "killed-mid-del",
        Advisory,
        "a plugin killed mid-DEL leaves nothing the next DEL cannot clean",
        Box::new(killed_del_case),
    );
    add(
        "status-daemon-down",
        Required,
        "STATUS gives 50 while the daemon is stopped (needs hooks)",
        Box::new(status_down_case),
    );
    add(
        "del-daemon-down",
        Advisory,
        "DEL succeeds with the daemon stopped (needs hooks)",
        Box::new(del_down_case),
    );
    add(
        "check-detects-daemon-down",
        Advisory,
        "CHECK fails while the plugin's daemon is stopped (needs hooks)",
        Box::new(check_daemon_down_case),
    );
    add(
        "add-daemon-down",
        Advisory,
        "ADD with the daemon stopped fails with a spec error and leaves nothing (needs hooks)",
        Box::new(add_daemon_down_case),
    );
    add(
        "restart-keeps-pods",
        Advisory,
        "pods keep working across teardown + setup (needs hooks)",
        Box::new(restart_case),
    );
    v
}
