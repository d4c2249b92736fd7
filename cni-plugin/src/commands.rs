//! The verbs. ADD undoes what it did when a later step fails; DEL succeeds whenever nothing is
//! left, whatever was already gone (netns, link, allocation, even the daemon).

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_core::proto::dataplane_client::DataplaneClient;
use sluice_core::proto::{
    AllocateRequest, AttachRequest, AttachmentRef, GcRequest, ReleaseRequest, StatusRequest,
};
use tonic::transport::Channel;

use crate::error::{err, CniError, Code, Result};
use crate::netlink::{format_mac, Netlink};
use crate::result::{add_result, expected_from_prev, PodNetwork};
use crate::spec::{Env, NetConf};

/// Every host-side veth has this MAC (as Calico does): the pod's static neighbour entry for its
/// gateway points at it, so no ARP or proxy ARP is needed.
pub const HOST_MAC: [u8; 6] = [0xee, 0xee, 0xee, 0xee, 0xee, 0xee];

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A request may queue behind a large service update in the daemon.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The host-side veth name: "sl" + 12 hex digits of sha256(containerID/ifname), 14 characters.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("sl{hex}")
}

fn attachment_ref(env: &Env) -> AttachmentRef {
    AttachmentRef {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

async fn daemon(conf: &NetConf, timeout: Duration) -> Result<DataplaneClient<Channel>> {
    sluice_core::client::connect_with(Path::new(&conf.socket), timeout, REQUEST_TIMEOUT)
        .await
        .map_err(|e| {
            err(
                Code::TryAgainLater,
                format!("sluiced is not reachable at {}", conf.socket),
            )
            .with_details(source_chain(&e))
        })
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn daemon_err(what: &str) -> impl FnOnce(tonic::Status) -> CniError + '_ {
    move |s| {
        let code = match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => Code::TryAgainLater,
            _ => Code::Daemon,
        };
        err(code, format!("sluiced: {what}")).with_details(s.message())
    }
}

fn open_netns(path: &str) -> Result<File> {
    File::open(path)
        .map_err(|e| err(Code::InvalidEnv, format!("cannot open CNI_NETNS {path}")).with_details(e))
}

pub async fn add(env: &Env, conf: &NetConf) -> Result<Value> {
    let netns = open_netns(&env.netns)?;
    let host = Netlink::here()?;
    let pod = Netlink::in_netns(&netns)?;
    let host_if = host_ifname(&env.container_id, &env.ifname);

    // A second ADD must fail before it touches anything the first one made.
    if pod.link(&env.ifname).await?.is_some() {
        return Err(err(
            Code::InterfaceExists,
            format!("interface {} already exists in {}", env.ifname, env.netns),
        ));
    }
    if host.link(&host_if).await?.is_some() {
        return Err(err(
            Code::InterfaceExists,
            format!("host interface {host_if} already exists"),
        ));
    }

    let mut client = daemon(conf, CONNECT_TIMEOUT).await?;
    let alloc = client
        .allocate(AllocateRequest {
            r#ref: Some(attachment_ref(env)),
            netns: env.netns.clone(),
            host_ifname: host_if.clone(),
            pod_namespace: env
                .args
                .get("K8S_POD_NAMESPACE")
                .cloned()
                .unwrap_or_default(),
            pod_name: env.args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
            network: conf.name.clone(),
        })
        .await
        .map_err(daemon_err("allocating an IP"))?
        .into_inner();

    let mut created_link = false;
    let result = setup(
        env,
        conf,
        &netns,
        &host,
        &pod,
        &host_if,
        &alloc,
        &mut created_link,
        &mut client,
    )
    .await;
    if let Err(e) = &result {
        tracing::warn!(error = %e, "ADD failed, rolling back");
        if created_link {
            if let Err(e) = host.delete_link(&host_if).await {
                tracing::warn!(error = %e, "rollback: deleting {host_if}");
            }
        }
        if alloc.newly_allocated {
            if let Err(e) = client
                .release(ReleaseRequest {
                    r#ref: Some(attachment_ref(env)),
                })
                .await
            {
                tracing::warn!(error = %e, "rollback: releasing the IP");
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn setup(
    env: &Env,
    conf: &NetConf,
    netns: &File,
    host: &Netlink,
    pod: &Netlink,
    host_if: &str,
    alloc: &sluice_core::proto::AllocateReply,
    created_link: &mut bool,
    client: &mut DataplaneClient<Channel>,
) -> Result<Value> {
    let bad_reply = |what: &str| err(Code::Daemon, format!("sluiced returned an invalid {what}"));
    let ip: Ipv4Addr = alloc.ip.parse().map_err(|_| bad_reply("IP"))?;
    let gateway: Ipv4Addr = alloc.gateway.parse().map_err(|_| bad_reply("gateway"))?;

    host.create_veth(host_if, &HOST_MAC, &env.ifname, netns, conf.mtu)
        .await?;
    *created_link = true;
    let host_link = host
        .link(host_if)
        .await?
        .ok_or_else(|| err(Code::Netlink, format!("{host_if} vanished")))?;
    let pod_link = pod.link(&env.ifname).await?.ok_or_else(|| {
        err(
            Code::Netlink,
            format!("{} missing in the pod netns after creation", env.ifname),
        )
    })?;

    // Pod side: ip/32, the gateway on-link with a fixed neighbour entry, default route through it.
    // A second interface of the same pod (another CNI_IFNAME) finds the gateway and default
    // routes taken by the first: it keeps them, and its result lists no default route.
    pod.add_address(pod_link.index, ip, 32).await?;
    pod.set_up(pod_link.index).await?;
    pod.add_neighbour(pod_link.index, gateway, &HOST_MAC)
        .await?;
    let primary = pod.try_add_route(gateway, 32, pod_link.index, None).await?;
    let default_route = primary
        && pod
            .try_add_route(Ipv4Addr::UNSPECIFIED, 0, pod_link.index, Some(gateway))
            .await?;

    // Host side: up, and a /32 route to the pod through it.
    host.set_up(host_link.index).await?;
    host.add_route(ip, 32, host_link.index, None).await?;

    client
        .attach(AttachRequest {
            r#ref: Some(attachment_ref(env)),
            host_ifname: host_if.to_string(),
        })
        .await
        .map_err(daemon_err("attaching the pod's programs"))?;

    Ok(add_result(
        &conf.cni_version,
        conf.prev_result.as_ref(),
        &PodNetwork {
            host_ifname: host_if.to_string(),
            host_mac: format_mac(&HOST_MAC),
            ifname: env.ifname.clone(),
            pod_mac: format_mac(&pod_link.mac),
            netns: env.netns.clone(),
            mtu: conf.mtu,
            ip,
            gateway,
            default_route,
        },
    ))
}

pub async fn del(env: &Env, conf: &NetConf) -> Result<()> {
    // The host side is enough: deleting one end of a veth deletes both.
    let host = Netlink::here()?;
    let host_if = host_ifname(&env.container_id, &env.ifname);
    if host.delete_link(&host_if).await? {
        tracing::info!("deleted {host_if}");
    }
    // The daemon frees the IP; if it is down, it reconciles the allocation when it starts.
    match daemon(conf, CONNECT_TIMEOUT).await {
        Ok(mut client) => {
            client
                .release(ReleaseRequest {
                    r#ref: Some(attachment_ref(env)),
                })
                .await
                .map_err(daemon_err("releasing the IP"))?;
        }
        Err(e) => tracing::warn!(error = %e, "DEL: daemon unreachable; it will reconcile at start"),
    }
    Ok(())
}

pub async fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let fail = |msg: String| err(Code::CheckFailed, msg);
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| err(Code::InvalidConfig, "CHECK needs prevResult"))?;
    let want = expected_from_prev(prev, &env.ifname)?;

    let netns = open_netns(&env.netns)?;
    let pod = Netlink::in_netns(&netns)?;
    let link = pod
        .link(&env.ifname)
        .await?
        .ok_or_else(|| fail(format!("{} is missing from {}", env.ifname, env.netns)))?;
    if !link.up {
        return Err(fail(format!("{} is down", env.ifname)));
    }
    if let Some(mac) = &want.mac {
        if *mac != format_mac(&link.mac) {
            return Err(fail(format!(
                "{} has MAC {} instead of {mac}",
                env.ifname,
                format_mac(&link.mac)
            )));
        }
    }
    let have = pod.addresses(link.index).await?;
    for (ip, prefix, _) in &want.ips {
        if !have.contains(&(*ip, *prefix)) {
            return Err(fail(format!("{} lacks address {ip}/{prefix}", env.ifname)));
        }
    }
    let routes = pod.routes(link.index).await?;
    for (dst, prefix, gw) in &want.routes {
        if !routes
            .iter()
            .any(|(d, p, g)| d == dst && p == prefix && g == gw)
        {
            return Err(fail(format!(
                "route {dst}/{prefix} via {gw:?} is missing in the pod"
            )));
        }
    }

    let host = Netlink::here()?;
    let host_if = host_ifname(&env.container_id, &env.ifname);
    let host_link = host
        .link(&host_if)
        .await?
        .ok_or_else(|| fail(format!("host interface {host_if} is missing")))?;
    let host_routes = host.routes(host_link.index).await?;
    for (ip, _, _) in &want.ips {
        if !host_routes.iter().any(|(d, p, _)| d == ip && *p == 32) {
            return Err(fail(format!("host route {ip}/32 dev {host_if} is missing")));
        }
    }

    let mut client = daemon(conf, CONNECT_TIMEOUT).await?;
    let att = client
        .get_attachment(attachment_ref(env))
        .await
        .map_err(|s| match s.code() {
            tonic::Code::NotFound => fail("sluiced has no attachment for this container".into()),
            _ => daemon_err("looking up the attachment")(s),
        })?
        .into_inner();
    if !att.attached {
        return Err(fail("sluiced has not attached the pod's programs".into()));
    }
    if !want.ips.iter().any(|(ip, _, _)| ip.to_string() == att.ip) {
        return Err(fail(format!(
            "sluiced holds {} for this container, prevResult does not",
            att.ip
        )));
    }
    Ok(())
}

pub async fn status(conf: &NetConf) -> Result<()> {
    let unavailable = |d: String| err(Code::Unavailable, "sluiced is not ready").with_details(d);
    let mut client = sluice_core::client::connect(Path::new(&conf.socket), STATUS_TIMEOUT)
        .await
        .map_err(|e| unavailable(source_chain(&e)))?;
    let reply = client
        .ready(StatusRequest {})
        .await
        .map_err(|s| unavailable(s.message().to_string()))?
        .into_inner();
    if reply.ready {
        Ok(())
    } else {
        Err(unavailable(if reply.reason.is_empty() {
            "the daemon reports not ready".into()
        } else {
            format!("the daemon reports not ready: {}", reply.reason)
        }))
    }
}

pub async fn gc(conf: &NetConf) -> Result<()> {
    let Some(keep) = conf.gc_keep_list() else {
        // Without a list we cannot tell live attachments from leaked ones: release nothing.
        tracing::warn!("GC without cni.dev/valid-attachments: nothing released");
        return Ok(());
    };
    let mut client = daemon(conf, CONNECT_TIMEOUT).await?;
    let reply = client
        .gc(GcRequest {
            valid: keep
                .iter()
                .map(|a| AttachmentRef {
                    container_id: a.container_id.clone(),
                    ifname: a.ifname.clone(),
                })
                .collect(),
            network: conf.name.clone(),
        })
        .await
        .map_err(daemon_err("garbage collection"))?
        .into_inner();
    if !reply.errors.is_empty() {
        return Err(err(Code::Daemon, "GC could not release everything")
            .with_details(reply.errors.join("; ")));
    }
    Ok(())
}
