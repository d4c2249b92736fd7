//! The gRPC API (proto/sluice.proto). Handlers run their locked work on the blocking pool: IPAM
//! writes fsync, and map syscalls should not stall the async workers.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use libbpf_rs::MapCore;
use sluice_core::proto::dataplane_server::Dataplane;
use sluice_core::proto::*;
use tonic::{Request, Response, Status};

use crate::datapath::{reason_name, AttachMode, Datapath};
use crate::ipam::{Allocation, IpamError};
use crate::services::{conntrack, objects, ApplyError};
use crate::state::{gc_plan, ifindex, now_unix, Inner, State, PENDING_GRACE};
use crate::POD_GATEWAY;

pub struct Api {
    state: Arc<State>,
}

impl Api {
    pub fn new(state: Arc<State>) -> Api {
        Api { state }
    }

    /// Runs `f` on the blocking pool: IPAM writes fsync and map syscalls must not stall the
    /// async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&State) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let state = self.state.clone();
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .map_err(|e| Status::internal(format!("worker failed: {e}")))?
    }

    /// Runs `f` under the IPAM lock.
    async fn locked<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Inner, &Datapath) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.blocking(move |st| f(&mut st.lock(), &st.datapath))
            .await
    }

    /// Runs `f` under the services lock.
    async fn services<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::services::Services, &Datapath) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        self.blocking(move |st| f(&mut st.services(), &st.datapath))
            .await
    }
}

fn pair(r: Option<AttachmentRef>) -> Result<AttachmentRef, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("missing ref"))?;
    if r.container_id.is_empty() || r.ifname.is_empty() {
        return Err(Status::invalid_argument(
            "container_id and ifname are required",
        ));
    }
    Ok(r)
}

fn apply_status(e: ApplyError) -> Status {
    match e {
        ApplyError::Invalid(e) => Status::invalid_argument(e.to_string()),
        ApplyError::Capacity(e) => Status::resource_exhausted(e),
        ApplyError::Internal(e) => Status::internal(format!("{e:#}")),
    }
}

/// Parses documents on the blocking pool.
async fn parse(text: String, source: String) -> Result<Vec<objects::Parsed>, Status> {
    tokio::task::spawn_blocking(move || objects::parse(&text, &source))
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
        .map_err(|e| apply_status(e.into()))
}

/// Milliseconds, with microseconds (for the log).
fn ms(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1e3
}

fn ipam_status(e: IpamError) -> Status {
    match e {
        IpamError::Exhausted(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn occupancy_view(o: conntrack::Occupancy) -> ConntrackOccupancy {
    ConntrackOccupancy {
        entries: o.entries,
        capacity: o.capacity,
        evictions: o.evictions,
        created: o.created,
        deleted: o.deleted,
    }
}

pub fn attachment(a: &Allocation, dp: &Datapath) -> Attachment {
    let idx = ifindex(&a.host_ifname).unwrap_or(0);
    let c = if a.host_ifindex != 0 {
        dp.pod_counters(a.host_ifindex)
    } else {
        Default::default()
    };
    Attachment {
        container_id: a.container_id.clone(),
        ifname: a.ifname.clone(),
        ip: a.ip.to_string(),
        host_ifname: a.host_ifname.clone(),
        netns: a.netns.clone(),
        attached: a.attached,
        host_ifindex: idx,
        pod_namespace: a.pod_namespace.clone(),
        pod_name: a.pod_name.clone(),
        network: a.network.clone(),
        attach_mode: a.attach_mode.clone(),
        counters: Some(PodCounters {
            rx_packets: c.rx_packets,
            rx_bytes: c.rx_bytes,
            tx_packets: c.tx_packets,
            tx_bytes: c.tx_bytes,
        }),
    }
}

#[tonic::async_trait]
impl Dataplane for Api {
    async fn allocate(
        &self,
        req: Request<AllocateRequest>,
    ) -> Result<Response<AllocateReply>, Status> {
        let req = req.into_inner();
        let r = pair(req.r#ref)?;
        let want = Allocation {
            container_id: r.container_id,
            ifname: r.ifname,
            ip: Ipv4Addr::UNSPECIFIED,
            host_ifname: req.host_ifname,
            netns: req.netns,
            pod_namespace: req.pod_namespace,
            pod_name: req.pod_name,
            attached: false,
            host_ifindex: 0,
            attach_mode: String::new(),
            created: now_unix(),
            network: req.network,
        };
        let (a, new, prefix) = self
            .locked(move |s, _dp| {
                let prefix = s.ipam.cidr().prefix;
                s.ipam
                    .allocate(want)
                    .map(|(a, new)| (a, new, prefix))
                    .map_err(ipam_status)
            })
            .await?;
        tracing::info!(container = %a.container_id, ifname = %a.ifname, ip = %a.ip, new, "allocate");
        Ok(Response::new(AllocateReply {
            ip: a.ip.to_string(),
            prefix_len: prefix as u32,
            gateway: POD_GATEWAY.to_string(),
            newly_allocated: new,
        }))
    }

    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<AttachReply>, Status> {
        let req = req.into_inner();
        let r = pair(req.r#ref)?;
        // Pods wait for their move to tcx links while ADDs keep coming (State::upgrade_attachments).
        self.state.note_add();
        let state = self.state.clone();
        self.locked(move |s, dp| {
            let mut a = s
                .ipam
                .get(&r.container_id, &r.ifname)
                .cloned()
                .ok_or_else(|| {
                    Status::not_found("no allocation for this container and interface")
                })?;
            if a.host_ifname != req.host_ifname {
                return Err(Status::invalid_argument(format!(
                    "allocation is for host interface {}, not {}",
                    a.host_ifname, req.host_ifname
                )));
            }
            let idx = ifindex(&a.host_ifname).ok_or_else(|| {
                Status::failed_precondition(format!("{} does not exist", a.host_ifname))
            })?;
            let mode = dp.add_mode();
            dp.attach(
                mode,
                &a.host_ifname,
                idx,
                AttachMode::from_name(&a.attach_mode),
                a.ip,
            )
            .map_err(|e| Status::internal(format!("{e:#}")))?;
            a.attached = true;
            a.host_ifindex = idx;
            a.attach_mode = mode.name().to_string();
            let cid = a.container_id.clone();
            s.ipam.update(a).map_err(ipam_status)?;
            crate::state::link_pod_interfaces(&s.ipam, dp, &cid, None);
            state.note_add();
            Ok(())
        })
        .await?;
        Ok(Response::new(AttachReply {}))
    }

    async fn release(
        &self,
        req: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseReply>, Status> {
        let r = pair(req.into_inner().r#ref)?;
        // A DEL's veth deletion takes the RTNL lock too: pods move to tcx links between bursts.
        self.state.note_add();
        let released = self
            .locked(move |s, dp| {
                let Some(a) = s.ipam.get(&r.container_id, &r.ifname).cloned() else { return Ok(false) };
                crate::state::link_pod_interfaces(&s.ipam, dp, &a.container_id, Some(&a.ifname));
                dp.detach(&a.host_ifname, a.host_ifindex, AttachMode::from_name(&a.attach_mode));
                s.ipam.release(&r.container_id, &r.ifname).map_err(ipam_status)?;
                tracing::info!(container = %a.container_id, ifname = %a.ifname, ip = %a.ip, "release");
                Ok(true)
            })
            .await?;
        Ok(Response::new(ReleaseReply { released }))
    }

    async fn get_attachment(
        &self,
        req: Request<AttachmentRef>,
    ) -> Result<Response<Attachment>, Status> {
        let r = pair(Some(req.into_inner()))?;
        self.locked(move |s, dp| {
            let a = s.ipam.get(&r.container_id, &r.ifname).ok_or_else(|| {
                Status::not_found("no attachment for this container and interface")
            })?;
            Ok(Response::new(attachment(a, dp)))
        })
        .await
    }

    async fn gc(&self, req: Request<GcRequest>) -> Result<Response<GcReply>, Status> {
        let req = req.into_inner();
        let keep: HashSet<(String, String)> = req
            .valid
            .into_iter()
            .map(|r| (r.container_id, r.ifname))
            .collect();
        let network = req.network;
        let doomed: Vec<Allocation> = self
            .locked(move |s, _dp| {
                let plan = gc_plan(s.ipam.all(), &network, &keep, now_unix(), PENDING_GRACE);
                for mut a in plan.claim {
                    tracing::info!(container = %a.container_id, ifname = %a.ifname, network = %network,
                        "gc: recording the network of an allocation it lists as valid");
                    a.network = network.clone();
                    s.ipam.update(a).map_err(ipam_status)?;
                }
                Ok(plan.release)
            })
            .await?;
        let mut reply = GcReply::default();
        // Links first (outside the lock), then the records; keep going past errors.
        let netlink = links::Links::new().map_err(|e| Status::internal(e.to_string()))?;
        for a in doomed {
            if let Err(e) = netlink.delete(&a.host_ifname).await {
                reply.errors.push(format!(
                    "{}: deleting {}: {e}",
                    a.container_id, a.host_ifname
                ));
                continue;
            }
            let a2 = a.clone();
            let released = self
                .locked(move |s, dp| {
                    dp.detach(
                        &a2.host_ifname,
                        a2.host_ifindex,
                        AttachMode::from_name(&a2.attach_mode),
                    );
                    s.ipam
                        .release(&a2.container_id, &a2.ifname)
                        .map_err(ipam_status)
                })
                .await;
            match released {
                Ok(_) => {
                    tracing::info!(container = %a.container_id, ifname = %a.ifname, ip = %a.ip, "gc released");
                    reply.released.push(AttachmentRef {
                        container_id: a.container_id,
                        ifname: a.ifname,
                    });
                }
                Err(e) => reply
                    .errors
                    .push(format!("{}: {}", a.container_id, e.message())),
            }
        }
        Ok(Response::new(reply))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let node_name = self.state.node_name.clone();
        let (peers, routed, pending) = self.state.node_view().await;
        let up = &self.state.uplinks;
        let network = NodeNetwork {
            node_ip: up.node_ip.to_string(),
            lb_mode: match self.state.lb_mode {
                crate::datapath::LbMode::Dsr => "dsr",
                crate::datapath::LbMode::Tunnel => "tunnel",
            }
            .to_string(),
            uplinks: up.ifaces.iter().map(|(n, _)| n.clone()).collect(),
            node_addrs: up.addrs.iter().map(|a| a.to_string()).collect(),
            peers: peers
                .into_iter()
                .map(|p| PeerNode {
                    name: p.name,
                    internal_ip: p.addr.to_string(),
                    pod_cidrs: p.pod_cidrs,
                })
                .collect(),
            routes: routed
                .into_iter()
                .map(|(c, via)| NodeRoute {
                    cidr: c.to_string(),
                    via: via.to_string(),
                })
                .collect(),
            pod_cidr_pending: pending.unwrap_or_default(),
            health_check_ports: self
                .state
                .health
                .ports()
                .into_iter()
                .map(u32::from)
                .collect(),
        };
        let ready = self.state.ready().is_ok();
        let watch = self
            .state
            .watch
            .as_ref()
            .map(|w| w.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let (frontends, sources, degraded, kept) = self
            .services(|svc, _dp| {
                Ok((
                    svc.frontend_count() as u32,
                    svc.sources(),
                    svc.degraded(),
                    svc.kept_frontend_count() as u32,
                ))
            })
            .await?;
        self.locked(move |s, dp| {
            let mut attachments: Vec<Attachment> =
                s.ipam.all().map(|a| attachment(a, dp)).collect();
            attachments.sort_by(|a, b| (&a.ip, &a.container_id).cmp(&(&b.ip, &b.container_id)));
            let reasons = (0..crate::datapath::REASON_MAX)
                .filter_map(|r| {
                    let name = reason_name(r)?;
                    let c = Datapath::counter(&dp.maps.reasons, r);
                    Some(ReasonCounter {
                        reason: r,
                        name: name.to_string(),
                        packets: c.packets,
                        bytes: c.bytes,
                    })
                })
                .collect();
            Ok(Response::new(StatusReply {
                ready,
                node_name,
                network: Some(network),
                pod_cidr: s.ipam.cidr().to_string(),
                attach_mode: dp.mode().name().to_string(),
                attachments,
                programs: dp
                    .programs()
                    .into_iter()
                    .map(|(name, id, pin)| Program {
                        name,
                        id,
                        pinned: pin.display().to_string(),
                    })
                    .collect(),
                reasons,
                free_ips: s.ipam.free_count(),
                frontends,
                conntrack: Some(occupancy_view(conntrack::occupancy(
                    &dp.maps,
                    dp.maps.conntrack.keys().count() as u64,
                ))),
                sources: sources
                    .into_iter()
                    .map(|s| match watch.as_ref().filter(|w| w.source == s.name) {
                        // The watch's own view: connection, lists, errors.
                        Some(w) => SourceStatus {
                            name: s.name,
                            loaded: s.loaded_once && w.ready().is_ok(),
                            loaded_once: s.loaded_once,
                            objects: w.objects as u32,
                            last_error: w.last_error.clone(),
                            sync_state: w.sync_state(),
                            server: w.server_line(),
                        },
                        None => SourceStatus {
                            name: s.name,
                            loaded: s.loaded,
                            loaded_once: s.loaded_once,
                            objects: s.objects as u32,
                            last_error: s.last_error,
                            sync_state: String::new(),
                            server: String::new(),
                        },
                    })
                    .collect(),
                services_degraded: degraded,
                kept_frontends: kept,
            }))
        })
        .await
    }

    async fn ready(&self, _req: Request<StatusRequest>) -> Result<Response<ReadyReply>, Status> {
        let r = self.state.ready();
        crate::observe::metrics::get().verb("STATUS", r.is_ok());
        Ok(Response::new(ReadyReply {
            ready: r.is_ok(),
            node_name: self.state.node_name.clone(),
            reason: r.err().unwrap_or_default(),
        }))
    }

    async fn apply(&self, req: Request<ObjectsRequest>) -> Result<Response<ObjectsReply>, Status> {
        let mut req = req.into_inner();
        // Parsing (the slow part of a big apply) happens before taking the lock.
        let t = std::time::Instant::now();
        let objs = parse(std::mem::take(&mut req.text), req.source.clone()).await?;
        let parsed = t.elapsed();
        let nodes = objs.iter().any(|o| o.key.kind == objects::Kind::Node);
        let reply = self.services(move |svc, dp| {
            let t = std::time::Instant::now();
            let big = objs.len() > 1000;
            let (keys, st) = svc.apply(objs, &dp.maps).map_err(apply_status)?;
            if big {
                crate::services::release_memory();
            }
            let tm = svc.last_timings;
            tracing::info!(objects = keys.len(), writes = st.map_writes(), services = st.services, backends_left = st.backends_left,
                source = %req.source, parse_ms = ms(parsed), apply_ms = ms(t.elapsed()), model_ms = tm.model_us as f64 / 1e3,
                plan_ms = tm.plan_us as f64 / 1e3, maps_ms = tm.maps_us as f64 / 1e3, log_ms = tm.log_us as f64 / 1e3, "apply");
            Ok(Response::new(ObjectsReply {
                objects: keys.iter().map(|k| k.to_string()).collect(),
                not_found: vec![],
                map_writes: st.map_writes() as u32,
                flows_purged: 0,
                backends_left: st.backends_left as u32,
            }))
        })
        .await;
        self.state.objects_changed(nodes).await;
        reply
    }

    async fn delete(&self, req: Request<ObjectsRequest>) -> Result<Response<ObjectsReply>, Status> {
        let mut req = req.into_inner();
        let t = std::time::Instant::now();
        let keys: Vec<objects::ObjectKey> =
            parse(std::mem::take(&mut req.text), req.source.clone())
                .await?
                .into_iter()
                .map(|p| p.key)
                .collect();
        let parsed = t.elapsed();
        let nodes = keys.iter().any(|k| k.kind == objects::Kind::Node);
        let reply = self.services(move |svc, dp| {
            let t = std::time::Instant::now();
            let (removed, missing) = svc.delete(&keys, &dp.maps).map_err(apply_status)?;
            if keys.len() > 1000 {
                crate::services::release_memory();
            }
            let st = svc.last_sync;
            let tm = svc.last_timings;
            tracing::info!(objects = removed.len(), not_found = missing.len(), writes = st.map_writes(), services = st.services,
                source = %req.source, parse_ms = ms(parsed), apply_ms = ms(t.elapsed()), model_ms = tm.model_us as f64 / 1e3,
                plan_ms = tm.plan_us as f64 / 1e3, maps_ms = tm.maps_us as f64 / 1e3, log_ms = tm.log_us as f64 / 1e3, "delete");
            Ok(Response::new(ObjectsReply {
                objects: removed.iter().map(|k| k.to_string()).collect(),
                not_found: missing.iter().map(|k| k.to_string()).collect(),
                map_writes: st.map_writes() as u32,
                flows_purged: 0,
                backends_left: st.backends_left as u32,
            }))
        })
        .await;
        self.state.objects_changed(nodes).await;
        reply
    }

    async fn list_services(
        &self,
        _req: Request<ListRequest>,
    ) -> Result<Response<ServiceList>, Status> {
        self.services(move |svc, dp| {
            let services = svc
                .view(&dp.maps)
                .into_iter()
                .map(|v| ServiceView {
                    namespace: v.namespace,
                    name: v.name,
                    port: v.port,
                    protocol: v.protocol.to_string(),
                    frontends: v.frontends,
                    svc_id: v.svc_id.map(i64::from).unwrap_or(-1),
                    affinity_timeout: v.affinity_timeout.unwrap_or(0),
                    endpoints: v
                        .endpoints
                        .into_iter()
                        .map(|e| EndpointView {
                            ip: e.ip,
                            port: e.port as u32,
                            ready: e.ready,
                            serving: e.serving,
                            terminating: e.terminating,
                            node: e.node,
                            slot: e.slot.map(i64::from).unwrap_or(-1),
                            local: e.local,
                            node_ip: e.node_ip,
                        })
                        .collect(),
                    packets: v.packets,
                    bytes: v.bytes,
                    frontend_views: v
                        .frontend_views
                        .into_iter()
                        .map(|(address, kind, local_only)| FrontendView {
                            address,
                            kind: kind.to_string(),
                            local_only,
                        })
                        .collect(),
                    local: v.local,
                    forwarded: v.forwarded,
                    decapsulated: v.decapsulated,
                    external_policy: v.external_policy.to_string(),
                    internal_policy: v.internal_policy.to_string(),
                    local_slots: v.local_slots,
                })
                .collect();
            Ok(Response::new(ServiceList { services }))
        })
        .await
    }

    async fn list_conntrack(
        &self,
        _req: Request<ListRequest>,
    ) -> Result<Response<ConntrackList>, Status> {
        let (flows, entries) = self
            .blocking(|st| {
                conntrack::flows(&st.datapath.maps, &st.ct_timeouts)
                    .map_err(|e| Status::internal(format!("{e:#}")))
            })
            .await?;
        let names = self
            .services(move |svc, _dp| {
                let mut ids: Vec<u32> = flows.iter().map(|f| f.svc_id).collect();
                ids.sort_unstable();
                ids.dedup();
                Ok((
                    ids.into_iter()
                        .map(|i| (i, svc.set_name(i).unwrap_or_default()))
                        .collect::<std::collections::HashMap<_, _>>(),
                    flows,
                ))
            })
            .await?;
        let (names, flows) = names;
        Ok(Response::new(ConntrackList {
            flows: flows
                .into_iter()
                .map(|f| FlowView {
                    protocol: f.protocol.to_string(),
                    client: f.client,
                    frontend: f.frontend,
                    backend: f.backend,
                    state: f.state.to_string(),
                    age_secs: f.age_secs,
                    idle_secs: f.idle_secs,
                    service: names.get(&f.svc_id).cloned().unwrap_or_default(),
                    hairpin: f.hairpin,
                    has_reverse: f.has_reverse,
                    kind: f.kind.to_string(),
                    translated_port: f.translated_port.unwrap_or(0) as u32,
                })
                .collect(),
            entries: entries as u64,
            occupancy: Some(occupancy_view(conntrack::occupancy(
                &self.state.datapath.maps,
                entries as u64,
            ))),
        }))
    }
}

mod links {
    use futures::TryStreamExt;

    /// Host-side link deletion for GC (the daemon runs in the node's netns).
    pub struct Links {
        handle: rtnetlink::Handle,
    }

    impl Links {
        pub fn new() -> std::io::Result<Links> {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            tokio::spawn(conn);
            Ok(Links { handle })
        }

        /// Deletes `name`; a missing link is success.
        pub async fn delete(&self, name: &str) -> Result<(), rtnetlink::Error> {
            let mut get = self
                .handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute();
            let link = match get.try_next().await {
                Ok(Some(l)) => l,
                Ok(None) => return Ok(()),
                Err(rtnetlink::Error::NetlinkError(m))
                    if m.code.map(|c| -c.get()) == Some(libc::ENODEV) =>
                {
                    return Ok(())
                }
                Err(e) => return Err(e),
            };
            match self.handle.link().del(link.header.index).execute().await {
                Err(rtnetlink::Error::NetlinkError(m))
                    if m.code.map(|c| -c.get()) == Some(libc::ENODEV) =>
                {
                    Ok(())
                }
                other => other,
            }
        }
    }
}
