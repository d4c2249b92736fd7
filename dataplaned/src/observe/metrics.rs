//! `/metrics` in the Prometheus text exposition format (prometheus-client). Names and labels,
//! all prefixed `sluice_` (also in the README):
//!
//! | metric | type | labels | what |
//! |---|---|---|---|
//! | `datapath_packets_total`, `datapath_bytes_total` | counter | `reason` | every packet the programs handled, by verdict / drop reason (bpf/consts.h) |
//! | `service_packets_total`, `service_bytes_total` | counter | `namespace`, `name`, `port`, `protocol` | new and established traffic per Service port |
//! | `conntrack_entries`, `conntrack_capacity` | gauge | | flows tracked (at the last GC scan) and the map's size |
//! | `conntrack_evictions_total` | counter | | entries the LRU map dropped before they expired |
//! | `conntrack_expired_total` | counter | | entries GC removed as idle |
//! | `conntrack_port_translations_total` | counter | | new flows given another source port (their reply tuple was taken) |
//! | `sync_duration_seconds` | histogram | `source` (`applied`, `manifests`: the change's own time; `kubernetes`: from its first watch event) | a change reaching the maps |
//! | `sync_pending_changes` | gauge | | watched objects received and not yet written |
//! | `kubernetes_watch_events_total`, `kubernetes_watch_errors_total` | counter | `resource` | watch events and errors (410s, connection failures) |
//! | `kubernetes_synced`, `kubernetes_api_reachable` | gauge | | first full sync written; API server answering (1/0) |
//! | `cni_requests_total` | counter | `verb` (`ADD`, `DEL`, `CHECK`, `GC`, `STATUS`), `outcome` (`success`, `error`) | the daemon's side of each CNI verb (ADD at its attach step, or its allocation when that fails) |
//! | `cni_rpc_duration_seconds` | histogram | `rpc` (`allocate`, `attach`, `release`, `get_attachment`, `gc`, `ready`) | daemon time per plugin call |
//! | `ipam_free_addresses`, `ipam_allocated_addresses` | gauge | | the pod CIDR's addresses |
//! | `service_frontends` | gauge | | frontends in the maps |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::Reply;
use crate::datapath::{reason_name, Datapath, REASON_MAX};
use crate::services::conntrack;
use crate::state::State;

type Labels = Vec<(String, String)>;
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// What is counted as it happens (the rest is read from the maps at each scrape).
pub struct Metrics {
    sync: Histograms,
    cni: Family<Labels, Counter>,
    rpc: Histograms,
    expired: Counter,
    /// Conntrack entries at the last GC scan.
    ct_entries: AtomicU64,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 15))
}

pub fn get() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        sync: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        cni: Family::default(),
        rpc: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
        expired: Counter::default(),
        ct_entries: AtomicU64::new(0),
    })
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    /// A change from `source` reached the maps in `d`.
    pub fn synced(&self, source: &str, d: Duration) {
        self.sync
            .get_or_create(&labels(&[("source", source)]))
            .observe(d.as_secs_f64());
    }

    /// One plugin call: its RPC's time, and the CNI verb's outcome when the call ends one.
    pub fn rpc(&self, rpc: &str, verb: Option<&str>, d: Duration, ok: bool) {
        self.rpc
            .get_or_create(&labels(&[("rpc", rpc)]))
            .observe(d.as_secs_f64());
        if let Some(v) = verb {
            self.verb(v, ok);
        }
    }

    /// A CNI verb's outcome, where the handler knows it (STATUS: ready or not).
    pub fn verb(&self, verb: &str, ok: bool) {
        let outcome = if ok { "success" } else { "error" };
        self.cni
            .get_or_create(&labels(&[("verb", verb), ("outcome", outcome)]))
            .inc();
    }

    /// A conntrack GC scan.
    pub fn gc(&self, g: &conntrack::GcStats) {
        self.expired.inc_by(g.expired as u64);
        self.ct_entries.store(
            g.scanned.saturating_sub(g.expired) as u64,
            Ordering::Relaxed,
        );
    }
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

/// The whole exposition now.
pub fn render(state: &State) -> String {
    let m = get();
    let mut reg = Registry::with_prefix("sluice");
    let dp = &state.datapath;

    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    let mut xlated = 0;
    for r in 0..REASON_MAX {
        let Some(name) = reason_name(r) else { continue };
        let c = Datapath::counter(&dp.maps.reasons, r);
        let l = labels(&[("reason", name)]);
        packets.get_or_create(&l).inc_by(c.packets);
        bytes.get_or_create(&l).inc_by(c.bytes);
        if matches!(
            name,
            "nat_new_port_translated" | "direct_new_port_translated"
        ) {
            xlated += c.packets;
        }
    }
    reg.register(
        "datapath_packets",
        "Packets the programs handled, by verdict or drop reason",
        packets,
    );
    reg.register(
        "datapath_bytes",
        "Bytes the programs handled, by verdict or drop reason",
        bytes,
    );

    let (views, frontends) = {
        let svc = state.services();
        (svc.view(&dp.maps), svc.frontend_count())
    };
    let svc_packets = Family::<Labels, Counter>::default();
    let svc_bytes = Family::<Labels, Counter>::default();
    for v in &views {
        let l = labels(&[
            ("namespace", &v.namespace),
            ("name", &v.name),
            ("port", &v.port),
            ("protocol", v.protocol),
        ]);
        svc_packets.get_or_create(&l).inc_by(v.packets);
        svc_bytes.get_or_create(&l).inc_by(v.bytes);
    }
    reg.register(
        "service_packets",
        "Packets to each Service port",
        svc_packets,
    );
    reg.register("service_bytes", "Bytes to each Service port", svc_bytes);
    reg.register(
        "service_frontends",
        "Frontends in the maps",
        gauge(frontends as i64),
    );

    let occ = conntrack::occupancy(&dp.maps, m.ct_entries.load(Ordering::Relaxed));
    reg.register(
        "conntrack_entries",
        "Flows tracked at the last GC scan",
        gauge(occ.entries as i64),
    );
    reg.register(
        "conntrack_capacity",
        "Size of the conntrack map",
        gauge(occ.capacity as i64),
    );
    reg.register(
        "conntrack_evictions",
        "Entries the LRU map dropped before they expired",
        counter(occ.evictions),
    );
    reg.register(
        "conntrack_expired",
        "Entries GC removed as idle",
        m.expired.clone(),
    );
    reg.register(
        "conntrack_port_translations",
        "New flows given another source port",
        counter(xlated),
    );

    reg.register(
        "sync_duration_seconds",
        "A change from its source to the maps",
        m.sync.clone(),
    );
    let (pending, synced, reachable) = match &state.watch {
        Some(w) => {
            let w = w.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let events = Family::<Labels, Counter>::default();
            let errors = Family::<Labels, Counter>::default();
            for r in crate::sources::kube::Resource::ALL {
                let l = labels(&[("resource", r.name())]);
                events.get_or_create(&l).inc_by(w.events[r as usize]);
                errors.get_or_create(&l).inc_by(w.errors[r as usize]);
            }
            reg.register(
                "kubernetes_watch_events",
                "Watch events, by resource",
                events,
            );
            reg.register(
                "kubernetes_watch_errors",
                "Watch errors (410s, connection failures), by resource",
                errors,
            );
            (
                w.pending as i64,
                w.synced_at.is_some() as i64,
                w.unreachable_since.is_none() as i64,
            )
        }
        None => (0, 0, 0),
    };
    reg.register(
        "sync_pending_changes",
        "Watched objects received and not yet written",
        gauge(pending),
    );
    reg.register(
        "kubernetes_synced",
        "The first full sync from the API server is written (1/0)",
        gauge(synced),
    );
    reg.register(
        "kubernetes_api_reachable",
        "The API server answers (1/0)",
        gauge(reachable),
    );

    reg.register(
        "cni_requests",
        "CNI verbs as the daemon served them, by outcome",
        m.cni.clone(),
    );
    reg.register(
        "cni_rpc_duration_seconds",
        "Daemon time per plugin call",
        m.rpc.clone(),
    );
    let (free, allocated) = {
        let s = state.lock();
        (s.ipam.free_count(), s.ipam.all().count())
    };
    reg.register(
        "ipam_free_addresses",
        "Free addresses in the pod CIDR",
        gauge(free as i64),
    );
    reg.register(
        "ipam_allocated_addresses",
        "Allocated addresses in the pod CIDR",
        gauge(allocated as i64),
    );

    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String");
    out
}

pub fn route(state: &State, path: &str) -> Reply {
    if path != "/metrics" {
        return Reply::not_found();
    }
    Reply {
        status: "200 OK",
        content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
        body: render(state).into_bytes(),
    }
}

/// The CNI plugin's calls, timed and counted by their gRPC method (a tower layer on the API
/// server: the handlers stay as they are). A unary call failed when its response carries a
/// non-zero `grpc-status` header (tonic sends errors trailers-only).
#[derive(Clone, Copy, Default)]
pub struct RpcLayer;

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics(inner)
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S>(S);

/// (rpc label, the CNI verb it ends: None for a step that only counts when it fails).
fn cni_rpc(method: &str) -> Option<(&'static str, Option<&'static str>)> {
    Some(match method {
        "Allocate" => ("allocate", None),
        "Attach" => ("attach", Some("ADD")),
        "Release" => ("release", Some("DEL")),
        "GetAttachment" => ("get_attachment", Some("CHECK")),
        "Gc" => ("gc", Some("GC")),
        // STATUS's outcome is the reply's `ready`, counted by the handler.
        "Ready" => ("ready", None),
        _ => return None,
    })
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<tonic::codegen::http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<
        tonic::codegen::http::Request<B>,
        Response = tonic::codegen::http::Response<R>,
    >,
    S::Future: Send + 'static,
    S::Error: 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let which = cni_rpc(req.uri().path().rsplit('/').next().unwrap_or(""));
        let t = std::time::Instant::now();
        let fut = self.0.call(req);
        Box::pin(async move {
            let r = fut.await;
            if let Some((rpc, verb)) = which {
                let ok = match &r {
                    Ok(resp) => resp
                        .headers()
                        .get("grpc-status")
                        .is_none_or(|v| v.as_bytes() == b"0"),
                    Err(_) => false,
                };
                // A failed allocation ends its ADD.
                let verb = verb.or((!ok && rpc == "allocate").then_some("ADD"));
                get().rpc(rpc, verb, t.elapsed(), ok);
            }
            r
        })
    }
}
