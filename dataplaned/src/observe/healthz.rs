//! kube-proxy's health endpoints (pkg/proxy/healthcheck/proxy_health.go), same paths, codes,
//! headers and JSON, so that load balancers and probes written for kube-proxy keep working:
//!
//! - `/healthz`: 200 when the dataplane is healthy and this node is eligible, else 503;
//!   `{"lastUpdated": …, "currentTime": …, "nodeEligible": …}`.
//! - `/livez`: 200 when healthy (eligibility ignored), else 503; `{"lastUpdated": …, "currentTime": …}`.
//!
//! Healthy, as kube-proxy: no change has waited longer than [`HEALTH_TIMEOUT`] to reach the maps
//! (a batch that keeps failing, or a first sync that takes that long, turns it 503). A watch that
//! has not started, or an API server that is away with nothing queued, is healthy: the maps
//! serve what was last received. Eligible: this node's Node is not being deleted and has no
//! `ToBeDeletedByClusterAutoscaler` taint. When healthy, `lastUpdated` is the current time
//! (kube-proxy's compatibility rule); when not, the last time the maps were in sync. Standalone
//! (no watch): changes are written before `sluicectl apply` returns, so always healthy.
//!
//! The health-check node ports of Local Services share this notion: their
//! `serviceProxyHealthy` is false (503) while this is unhealthy.

use std::time::{Duration, SystemTime};

use super::{go_time, Reply};
use crate::state::State;

/// kube-proxy's: twice its default 30 s sync period.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct ProxyHealth {
    pub healthy: bool,
    /// None: never in sync (Go's zero time in the JSON).
    pub last_updated: Option<SystemTime>,
    pub node_eligible: bool,
}

/// The dataplane's health now.
pub fn proxy_health(state: &State) -> ProxyHealth {
    match &state.watch {
        None => ProxyHealth {
            healthy: true,
            last_updated: Some(SystemTime::now()),
            node_eligible: true,
        },
        Some(w) => {
            let w = w.lock().unwrap_or_else(|p| p.into_inner());
            ProxyHealth {
                healthy: w
                    .oldest_pending
                    .is_none_or(|t| t.elapsed() < HEALTH_TIMEOUT),
                last_updated: w.last_updated,
                node_eligible: w.node_eligible,
            }
        }
    }
}

/// The reply for `path` given `h` (pure: unit-tested).
pub fn reply(path: &str, h: ProxyHealth, now: SystemTime) -> Reply {
    let livez = match path {
        "/healthz" => false,
        "/livez" => true,
        _ => return Reply::not_found(),
    };
    let ok = h.healthy && (livez || h.node_eligible);
    let last = if h.healthy {
        go_time(now)
    } else {
        h.last_updated
            .map(go_time)
            .unwrap_or_else(|| "0001-01-01 00:00:00 +0000 UTC".into())
    };
    let mut body = serde_json::json!({"lastUpdated": last, "currentTime": go_time(now)});
    if !livez {
        body["nodeEligible"] = h.node_eligible.into();
    }
    Reply {
        status: if ok {
            "200 OK"
        } else {
            "503 Service Unavailable"
        },
        content_type: "application/json",
        body: body.to_string().into_bytes(),
    }
}

pub fn route(state: &State, path: &str) -> Reply {
    reply(path, proxy_health(state), SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &Reply) -> serde_json::Value {
        serde_json::from_slice(&r.body).unwrap()
    }

    #[test]
    fn healthz_and_livez_answer_as_kube_proxy() {
        let now = SystemTime::now();
        let earlier = now - Duration::from_secs(120);
        let good = ProxyHealth {
            healthy: true,
            last_updated: Some(earlier),
            node_eligible: true,
        };
        let r = reply("/healthz", good, now);
        assert_eq!(r.status, "200 OK");
        assert_eq!(r.content_type, "application/json");
        let b = body(&r);
        assert_eq!(
            b["lastUpdated"],
            go_time(now),
            "healthy: lastUpdated is now"
        );
        assert_eq!(b["nodeEligible"], true);
        let leaving = ProxyHealth {
            node_eligible: false,
            ..good
        };
        assert_eq!(
            reply("/healthz", leaving, now).status,
            "503 Service Unavailable"
        );
        let l = reply("/livez", leaving, now);
        assert_eq!(l.status, "200 OK", "livez ignores eligibility");
        assert!(body(&l).get("nodeEligible").is_none());
        let stuck = ProxyHealth {
            healthy: false,
            ..good
        };
        for p in ["/healthz", "/livez"] {
            let r = reply(p, stuck, now);
            assert_eq!(r.status, "503 Service Unavailable");
            assert_eq!(body(&r)["lastUpdated"], go_time(earlier));
        }
        let never = ProxyHealth {
            healthy: false,
            last_updated: None,
            node_eligible: true,
        };
        assert_eq!(
            body(&reply("/livez", never, now))["lastUpdated"],
            "0001-01-01 00:00:00 +0000 UTC"
        );
        assert_eq!(reply("/other", good, now).status, "404 Not Found");
    }
}
