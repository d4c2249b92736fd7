//! The rulesets each mode programs, generated here (never copied): kube-proxy's iptables mode
//! (iptables-restore input, as its syncProxyRules writes it), kube-proxy's nftables mode (an
//! `nft -f` transaction, as its knftables transaction writes it), and sluice's Kubernetes
//! objects for `sluicectl apply -f`.
//!
//! The shapes follow kube-proxy (pkg/proxy/iptables, pkg/proxy/nftables, v1.28-v1.31):
//! - iptables: KUBE-SERVICES has one rule per service port (`-d VIP/32 --dport P -j KUBE-SVC-*`)
//!   and ends with the KUBE-NODEPORTS rule; KUBE-SVC-* marks off-cluster sources for
//!   masquerade and picks an endpoint with `-m statistic --mode random --probability 1/k`;
//!   KUBE-SEP-* marks hairpin traffic and DNATs. KUBE-MARK-MASQ / KUBE-POSTROUTING masquerade.
//!   Chain names: "KUBE-SVC-"/"KUBE-SEP-" + the first 16 base32 characters of
//!   sha256("ns/name:port" + "tcp" [+ "ip:port"]).
//! - nftables: table `ip kube-proxy`, `services` dispatching through the verdict map
//!   `service-ips` (ip . proto . port : goto service-*), `numgen random mod N vmap` to
//!   `endpoint-*` chains that dnat.
//!
//! The measured service is the last one: last in KUBE-SERVICES (the worst case of a linear walk;
//! kube-proxy's order follows a Go map, i.e. is random).

use std::fmt::Write;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::topo::CLUSTER_CIDR;

pub const NAMESPACE: &str = "bench";
pub const SVC_PORT: u16 = 80;
const MASQ_MARK: &str = "0x4000";

#[derive(Clone, Debug)]
pub struct Svc {
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub target: u16,
    pub endpoints: Vec<String>,
    /// type NodePort with this nodePort (externalTrafficPolicy Cluster), else ClusterIP.
    pub node_port: Option<u16>,
}

/// The i-th service address: 10.96.0.0/12 from 10.96.0.1 on.
pub fn vip(i: usize) -> Ipv4Addr {
    let v = (10u32 << 24) | (96 << 16) | (i as u32 + 1);
    Ipv4Addr::from(v)
}

/// `n` services with the given endpoints (2 each in the figures); the measured one is last.
pub fn services(n: usize, endpoints: &[String], target: u16) -> Vec<Svc> {
    (0..n)
        .map(|i| Svc {
            name: format!("s{i}"),
            vip: vip(i),
            port: SVC_PORT,
            target,
            endpoints: endpoints.to_vec(),
            node_port: None,
        })
        .collect()
}

/// The first port of kube-apiserver's default --service-node-port-range (30000-32767).
pub const NODE_PORT_BASE: u16 = 30000;
/// NodePort services in the NodePort figure: the range holds 2768 per protocol.
pub const NODE_PORTS_MAX: usize = 2000;

/// The NodePort figure's services, n + 1 of them: n - 1 background services, then the two
/// measured ones, "remote" (the `remote` endpoints, nodePort 30001) and "local" (the `local`
/// endpoints, nodePort 30000), last in KUBE-SERVICES and KUBE-NODEPORTS. The last
/// min(n, NODE_PORTS_MAX) + 1 services are NodePorts (the range holds 2768 per protocol), the
/// others ClusterIP with the `local` endpoints.
pub fn nodeport_services(n: usize, local: &[String], remote: &[String], target: u16) -> Vec<Svc> {
    let mut v = services(n + 1, local, target);
    let with_port = n.min(NODE_PORTS_MAX) + 1;
    let first = v.len() - with_port;
    for (k, svc) in v[first..].iter_mut().enumerate() {
        // Descending, so the measured ones (the last two) get the range's first ports.
        svc.node_port = Some(NODE_PORT_BASE + (with_port - 1 - k) as u16);
    }
    let last = v.len() - 1;
    v[last - 1].endpoints = remote.to_vec();
    v[last - 1].name = "remote".into();
    v[last].name = "local".into();
    v
}

impl Svc {
    fn port_name(&self) -> String {
        format!("{NAMESPACE}/{}:p", self.name)
    }
    fn ep(&self, e: &str) -> String {
        format!("{e}:{}", self.target)
    }
    pub fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", hash16(&format!("{}tcp", self.port_name())))
    }
    pub fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", hash16(&format!("{}tcp", self.port_name())))
    }
    pub fn sep_chain(&self, e: &str) -> String {
        format!(
            "KUBE-SEP-{}",
            hash16(&format!("{}tcp{}", self.port_name(), self.ep(e)))
        )
    }
    fn nft_base(&self) -> String {
        hash_trunc(&format!("{NAMESPACE}/{}/tcp/p", self.name))
    }
    pub fn nft_svc_chain(&self) -> String {
        format!("service-{}", self.nft_base())
    }
    pub fn nft_ext_chain(&self) -> String {
        format!("external-{}", self.nft_base())
    }
    pub fn nft_ep_chain(&self, e: &str) -> String {
        format!(
            "endpoint-{}",
            hash_trunc(&format!(
                "{NAMESPACE}/{}/tcp/p__{e}/{}",
                self.name, self.target
            ))
        )
    }
}

fn base32(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u32, 0);
    for &b in bytes {
        buf = (buf << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            out.push(A[((buf >> (bits - 5)) & 31) as usize] as char);
            bits -= 5;
        }
    }
    if bits > 0 {
        out.push(A[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn hash16(s: &str) -> String {
    base32(&Sha256::digest(s.as_bytes()))[..16].to_string()
}

fn hash_trunc(s: &str) -> String {
    format!("{}-{s}", &base32(&Sha256::digest(s.as_bytes()))[..8])
}

// ---------------------------------------------------------------------------------------------
// iptables

/// The jumps from the built-in chains that kube-proxy ensures with `iptables -C/-I` (not part
/// of its iptables-restore input): loaded once, untimed, before the timed restores.
pub fn iptables_base() -> String {
    let mut s = String::new();
    s.push_str("*filter\n");
    for c in [
        "KUBE-NODEPORTS",
        "KUBE-SERVICES",
        "KUBE-EXTERNAL-SERVICES",
        "KUBE-FIREWALL",
        "KUBE-FORWARD",
        "KUBE-PROXY-FIREWALL",
    ] {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    s.push_str(concat!(
        "-I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-I INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n",
        "-I INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-A INPUT -j KUBE-FIREWALL\n",
        "-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-I FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n",
        "-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-I FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n",
        "-I OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n",
        "-I OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-A OUTPUT -j KUBE-FIREWALL\n",
        "COMMIT\n*nat\n",
        ":KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
        "-I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        "-I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n",
        "COMMIT\n",
    ));
    s
}

/// Only the jump rules of `iptables_base` (no chain declarations, which would flush the
/// chains): loaded with --noflush after a plain (flushing) restore of `iptables_full`.
pub fn iptables_jumps() -> String {
    iptables_base()
        .lines()
        .filter(|l| !l.starts_with(':'))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn ipt_filter() -> &'static str {
    concat!(
        "*filter\n",
        ":KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n",
        ":KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n",
        "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n",
        "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n",
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
        "COMMIT\n",
    )
}

fn ipt_svc_chains(s: &mut String, svc: &Svc) {
    let _ = writeln!(s, ":{} - [0:0]", svc.svc_chain());
    if svc.node_port.is_some() {
        let _ = writeln!(s, ":{} - [0:0]", svc.ext_chain());
    }
    for e in &svc.endpoints {
        let _ = writeln!(s, ":{} - [0:0]", svc.sep_chain(e));
    }
}

fn ipt_svc_rules(s: &mut String, svc: &Svc) {
    let (pn, chain) = (svc.port_name(), svc.svc_chain());
    let _ = writeln!(
        s,
        "-A {chain} -m comment --comment \"{pn} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ",
        svc.vip, svc.port
    );
    let k = svc.endpoints.len();
    for (i, e) in svc.endpoints.iter().enumerate() {
        let ep = svc.ep(e);
        if i + 1 < k {
            let _ = writeln!(
                s,
                "-A {chain} -m comment --comment \"{pn} -> {ep}\" -m statistic --mode random --probability {:.10} -j {}",
                1.0 / (k - i) as f64,
                svc.sep_chain(e)
            );
        } else {
            let _ = writeln!(
                s,
                "-A {chain} -m comment --comment \"{pn} -> {ep}\" -j {}",
                svc.sep_chain(e)
            );
        }
    }
    if svc.node_port.is_some() {
        // externalTrafficPolicy Cluster: every external packet is masqueraded.
        let ext = svc.ext_chain();
        let _ = writeln!(
            s,
            "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(s, "-A {ext} -j {chain}");
    }
    for e in &svc.endpoints {
        let sep = svc.sep_chain(e);
        let _ = writeln!(
            s,
            "-A {sep} -m comment --comment {pn} -s {e}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            s,
            "-A {sep} -m comment --comment {pn} -m tcp -p tcp -j DNAT --to-destination {}",
            svc.ep(e)
        );
    }
}

fn ipt_nat_head(s: &mut String) {
    s.push_str("*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n");
}

fn ipt_top_rules(s: &mut String, svcs: &[Svc]) {
    let _ = writeln!(
        s,
        "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
    );
    let _ = writeln!(s, "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}");
    s.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    let _ = writeln!(s, "-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}");
    for svc in svcs {
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -m comment --comment \"{} cluster IP\" -m tcp -p tcp -d {}/32 --dport {} -j {}",
            svc.port_name(),
            svc.vip,
            svc.port,
            svc.svc_chain()
        );
    }
    s.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    for svc in svcs {
        if let Some(np) = svc.node_port {
            let _ = writeln!(
                s,
                "-A KUBE-NODEPORTS -m comment --comment {} -m tcp -p tcp --dport {np} -j {}",
                svc.port_name(),
                svc.ext_chain()
            );
        }
    }
}

/// kube-proxy's full sync: both tables whole (every chain declared, so flushed and rewritten),
/// then `-X` for chains that are gone. Loaded with `iptables-restore --noflush`.
pub fn iptables_full(svcs: &[Svc], stale: &[String]) -> String {
    let mut s = String::with_capacity(svcs.len() * 900);
    s.push_str(ipt_filter());
    ipt_nat_head(&mut s);
    for svc in svcs {
        ipt_svc_chains(&mut s, svc);
    }
    // Stale chains are declared too (which flushes them), then deleted with -X.
    for c in stale {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    ipt_top_rules(&mut s, svcs);
    for svc in svcs {
        ipt_svc_rules(&mut s, svc);
    }
    for c in stale {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    s
}

/// kube-proxy's partial sync (MinimizeIPTablesRestore, the default since v1.27): the top-level
/// chains whole, only the changed services' chains, `-X` for the stale ones.
pub fn iptables_partial(svcs: &[Svc], changed: &[&Svc], stale: &[String]) -> String {
    let mut s = String::with_capacity(svcs.len() * 200);
    s.push_str(ipt_filter());
    ipt_nat_head(&mut s);
    for svc in changed {
        ipt_svc_chains(&mut s, svc);
    }
    for c in stale {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    ipt_top_rules(&mut s, svcs);
    for svc in changed {
        ipt_svc_rules(&mut s, svc);
    }
    for c in stale {
        let _ = writeln!(s, "-X {c}");
    }
    s.push_str("COMMIT\n");
    s
}

/// Every KUBE-SVC/KUBE-SEP chain of `svcs`.
pub fn iptables_chains(svcs: &[Svc]) -> Vec<String> {
    let mut v = vec![];
    for svc in svcs {
        v.push(svc.svc_chain());
        if svc.node_port.is_some() {
            v.push(svc.ext_chain());
        }
        for e in &svc.endpoints {
            v.push(svc.sep_chain(e));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// nftables

const T: &str = "ip kube-proxy";

/// The table's fixed part, as kube-proxy's setupNFTables adds it to every transaction.
fn nft_setup(s: &mut String) {
    let _ = writeln!(s, "add table {T} {{ comment \"rules for kube-proxy\" ; }}");
    for (name, ty, hook, prio) in [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ] {
        let _ = writeln!(
            s,
            "add chain {T} {name} {{ type {ty} hook {hook} priority {prio} ; }}"
        );
        let _ = writeln!(s, "flush chain {T} {name}");
    }
    for (dst, src, extra) in [
        ("endpoints-check", "filter-input", "ct state new "),
        ("endpoints-check", "filter-forward", "ct state new "),
        ("endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
    ] {
        let _ = writeln!(s, "add chain {T} {dst}");
        let _ = writeln!(s, "flush chain {T} {dst}");
        let _ = writeln!(s, "add rule {T} {src} {extra}jump {dst}");
    }
    let _ = writeln!(s, "add chain {T} mark-for-masquerade");
    let _ = writeln!(s, "flush chain {T} mark-for-masquerade");
    let _ = writeln!(
        s,
        "add rule {T} mark-for-masquerade mark set mark or 0x004000"
    );
    let _ = writeln!(s, "add rule {T} masquerading mark and 0x004000 == 0 return");
    let _ = writeln!(s, "add rule {T} masquerading mark set mark xor 0x004000");
    let _ = writeln!(s, "add rule {T} masquerading masquerade fully-random");
    let _ = writeln!(s, "add map {T} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}");
    let _ = writeln!(s, "add map {T} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}");
    let _ = writeln!(s, "add chain {T} reject-chain {{ comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }}");
    let _ = writeln!(s, "flush chain {T} reject-chain");
    let _ = writeln!(s, "add rule {T} reject-chain reject");
    let _ = writeln!(s, "add rule {T} endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services");
    let _ = writeln!(s, "add rule {T} endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports");
    let _ = writeln!(s, "add map {T} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}");
    let _ = writeln!(
        s,
        "add rule {T} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips"
    );
    let _ = writeln!(s, "add map {T} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}");
    let _ = writeln!(s, "add map {T} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    let _ = writeln!(
        s,
        "add rule {T} services ip daddr . meta l4proto . th dport vmap @service-ips"
    );
    let _ = writeln!(s, "add rule {T} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports");
}

fn nft_flush_maps(s: &mut String) {
    for m in [
        "firewall-ips",
        "no-endpoint-services",
        "no-endpoint-nodeports",
        "service-ips",
        "service-nodeports",
    ] {
        let _ = writeln!(s, "flush map {T} {m}");
    }
}

fn nft_svc(s: &mut String, svc: &Svc, with_element: bool) {
    let chain = svc.nft_svc_chain();
    for e in &svc.endpoints {
        let _ = writeln!(s, "add chain {T} {}", svc.nft_ep_chain(e));
        let _ = writeln!(s, "flush chain {T} {}", svc.nft_ep_chain(e));
    }
    let _ = writeln!(s, "add chain {T} {chain}");
    let _ = writeln!(s, "flush chain {T} {chain}");
    if let Some(np) = svc.node_port {
        let ext = svc.nft_ext_chain();
        let _ = writeln!(s, "add chain {T} {ext}");
        let _ = writeln!(s, "flush chain {T} {ext}");
        let _ = writeln!(s, "add rule {T} {ext} jump mark-for-masquerade");
        let _ = writeln!(s, "add rule {T} {ext} goto {chain}");
        if with_element {
            let _ = writeln!(
                s,
                "add element {T} service-nodeports {{ tcp . {np} : goto {ext} }}"
            );
        }
    }
    if with_element {
        let _ = writeln!(
            s,
            "add element {T} service-ips {{ {} . tcp . {} : goto {chain} }}",
            svc.vip, svc.port
        );
    }
    let _ = writeln!(
        s,
        "add rule {T} {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
        svc.vip, svc.port
    );
    let vmap: Vec<String> = svc
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| format!("{i} : goto {}", svc.nft_ep_chain(e)))
        .collect();
    let _ = writeln!(
        s,
        "add rule {T} {chain} numgen random mod {} vmap {{ {} }}",
        svc.endpoints.len(),
        vmap.join(" , ")
    );
    for e in &svc.endpoints {
        let c = svc.nft_ep_chain(e);
        let _ = writeln!(s, "add rule {T} {c} ip saddr {e} jump mark-for-masquerade");
        let _ = writeln!(s, "add rule {T} {c} meta l4proto tcp dnat to {}", svc.ep(e));
    }
}

/// kube-proxy's nftables sync as the proxier read writes it: the fixed part, every map flushed
/// and refilled, every active chain added, flushed and rewritten; stale chains flushed (they are
/// deleted in a later transaction).
pub fn nft_full(svcs: &[Svc], stale: &[String]) -> String {
    let mut s = String::with_capacity(svcs.len() * 900);
    nft_setup(&mut s);
    nft_flush_maps(&mut s);
    for svc in svcs {
        nft_svc(&mut s, svc, true);
    }
    for c in stale {
        let _ = writeln!(s, "flush chain {T} {c}");
    }
    s
}

/// An incremental transaction (newer kube-proxy): only the changed services' chains rewritten,
/// stale chains flushed.
pub fn nft_partial(changed: &[&Svc], stale: &[String]) -> String {
    let mut s = String::new();
    for svc in changed {
        nft_svc(&mut s, svc, false);
    }
    for c in stale {
        let _ = writeln!(s, "flush chain {T} {c}");
    }
    s
}

/// Deletes chains (the later transaction that removes stale chains).
pub fn nft_delete_chains(chains: &[String]) -> String {
    let mut s = String::new();
    for c in chains {
        let _ = writeln!(s, "delete chain {T} {c}");
    }
    s
}

pub fn nft_chains(svcs: &[Svc]) -> Vec<String> {
    let mut v = vec![];
    for svc in svcs {
        v.push(svc.nft_svc_chain());
        if svc.node_port.is_some() {
            v.push(svc.nft_ext_chain());
        }
        for e in &svc.endpoints {
            v.push(svc.nft_ep_chain(e));
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------
// sluice

pub fn k8s_service(svc: &Svc) -> String {
    let (ty, np) = match svc.node_port {
        Some(np) => ("NodePort", format!(", nodePort: {np}")),
        None => ("ClusterIP", String::new()),
    };
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NAMESPACE}}}\nspec: {{type: {ty}, clusterIP: {}, ports: [{{name: p, port: {}, targetPort: {}, protocol: TCP{np}}}]}}\n",
        svc.name, svc.vip, svc.port, svc.target
    )
}

pub fn k8s_slice(svc: &Svc) -> String {
    let eps: Vec<String> = svc
        .endpoints
        .iter()
        .map(|e| format!("- {{addresses: [{e}], conditions: {{ready: true}}}}"))
        .collect();
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {}-1, namespace: {NAMESPACE}, labels: {{kubernetes.io/service-name: {}}}}}\naddressType: IPv4\nports: [{{name: p, port: {}, protocol: TCP}}]\nendpoints:\n{}\n",
        svc.name,
        svc.name,
        svc.target,
        eps.join("\n")
    )
}

/// Every Service and its EndpointSlice.
pub fn k8s_all(svcs: &[Svc]) -> String {
    let mut s = String::with_capacity(svcs.len() * 450);
    for svc in svcs {
        s.push_str(&k8s_service(svc));
        s.push_str(&k8s_slice(svc));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn measured_service_is_last_in_kube_services() {
        let svcs = services(3, &["10.244.0.5".into(), "10.244.0.6".into()], 8080);
        let text = iptables_full(&svcs, &[]);
        let rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES"))
            .collect();
        assert_eq!(rules.len(), 4);
        assert!(rules[2].contains(&svcs[2].svc_chain()));
        assert!(rules[3].contains("KUBE-NODEPORTS"));
        assert!(text.contains("--probability 0.5000000000"));
    }

    #[test]
    fn nodeport_services_measure_the_last_two() {
        let (l, r) = (
            vec!["10.244.1.5".to_string()],
            vec!["10.244.2.5".to_string()],
        );
        let svcs = nodeport_services(3, &l, &r, 8080);
        assert_eq!(svcs.len(), 4);
        let ports: Vec<Option<u16>> = svcs.iter().map(|s| s.node_port).collect();
        assert_eq!(ports, [Some(30003), Some(30002), Some(30001), Some(30000)]);
        assert_eq!((svcs[2].name.as_str(), &svcs[2].endpoints), ("remote", &r));
        assert_eq!((svcs[3].name.as_str(), &svcs[3].endpoints), ("local", &l));
        let text = iptables_full(&svcs, &[]);
        let np: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-NODEPORTS"))
            .collect();
        assert_eq!(np.len(), 4);
        assert!(np[3].contains("--dport 30000") && np[3].contains(&svcs[3].ext_chain()));
        assert!(text.contains(&format!(
            "-A {} -j {}",
            svcs[3].ext_chain(),
            svcs[3].svc_chain()
        )));
        let nft = nft_full(&svcs, &[]);
        assert!(nft.contains(&format!(
            "service-nodeports {{ tcp . 30000 : goto {} }}",
            svcs[3].nft_ext_chain()
        )));
        let many = nodeport_services(5000, &l, &r, 8080);
        assert_eq!(
            many.iter().filter(|s| s.node_port.is_some()).count(),
            NODE_PORTS_MAX + 1
        );
        assert!(
            k8s_service(&many[5000]).contains("type: NodePort")
                && k8s_service(&many[5000]).contains("nodePort: 30000")
        );
        assert!(k8s_service(&many[0]).contains("type: ClusterIP"));
    }
}
