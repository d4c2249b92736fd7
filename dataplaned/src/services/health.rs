//! Health-check node ports, as kube-proxy serves them: for each Service with
//! externalTrafficPolicy: Local and a healthCheckNodePort, an HTTP server on every node address
//! at that port answering any request with how many ready endpoints of the Service run on this
//! node — 200 when some do, 503 when none do — so that an external load balancer sends traffic
//! only to nodes that will not drop it.
//!
//! The body and headers are kube-proxy's (pkg/proxy/healthcheck): `Content-Type:
//! application/json`, `X-Content-Type-Options: nosniff`, and
//! `{"service":{"namespace":…,"name":…},"localEndpoints":N,"serviceProxyHealthy":true}`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::model::ServiceKey;

/// What one health-check port answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub service: ServiceKey,
    /// Ready endpoints on this node.
    pub local: usize,
    /// The maps serve what the objects say (false: the last sync of this Service failed).
    pub healthy: bool,
}

type Answers = Arc<Mutex<BTreeMap<u16, Answer>>>;

pub struct HealthServers {
    answers: Answers,
    listeners: Mutex<BTreeMap<u16, JoinHandle<()>>>,
    /// The dataplane's own health (`/healthz`'s): false makes every port answer 503 with
    /// serviceProxyHealthy false, as kube-proxy's do.
    proxy_healthy: Arc<AtomicBool>,
}

impl Default for HealthServers {
    fn default() -> Self {
        HealthServers {
            answers: Answers::default(),
            listeners: Mutex::default(),
            proxy_healthy: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl HealthServers {
    /// Serves exactly `want` (port → Service, ready local endpoints): new ports are bound, gone
    /// ones closed, the others answer the new counts at once. A port that cannot be bound (taken
    /// by another program) is logged and tried again at the next sync. Needs a tokio runtime.
    pub fn sync(&self, want: BTreeMap<u16, Answer>) {
        // Answers first: a port bound below answers its count at once.
        *self.answers.lock().unwrap_or_else(|p| p.into_inner()) = want.clone();
        let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        listeners.retain(|port, task| {
            let keep = want.contains_key(port) && !task.is_finished();
            if !keep {
                task.abort();
                tracing::info!(port, "health-check node port closed");
            }
            keep
        });
        for (port, Answer { service: svc, .. }) in &want {
            if listeners.contains_key(port) {
                continue;
            }
            match bind(*port) {
                Ok(l) => {
                    tracing::info!(port, service = %svc, "health-check node port serving");
                    listeners.insert(
                        *port,
                        tokio::spawn(serve(
                            l,
                            *port,
                            self.answers.clone(),
                            self.proxy_healthy.clone(),
                        )),
                    );
                }
                Err(e) => {
                    tracing::error!(port, service = %svc, error = %e, "binding a health-check node port (tried again at the next reconcile)")
                }
            }
        }
    }

    pub fn set_proxy_healthy(&self, healthy: bool) {
        self.proxy_healthy.store(healthy, Ordering::Relaxed);
    }

    /// The ports being served.
    pub fn ports(&self) -> Vec<u16> {
        let l = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        l.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self
            .listeners
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            task.abort();
        }
    }
}

fn bind(port: u16) -> std::io::Result<TcpListener> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
    sock.listen(128)
}

async fn serve(listener: TcpListener, port: u16, answers: Answers, proxy: Arc<AtomicBool>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let answers = answers.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), answer(conn, port, answers, proxy))
                    .await;
        });
    }
}

/// Reads the request head (whatever it asks, kube-proxy answers the same) and answers.
async fn answer(
    mut conn: TcpStream,
    port: u16,
    answers: Answers,
    proxy: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let _head = read_head(&mut conn).await?;
    let found = answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&port)
        .cloned();
    let Some(a) = found else {
        return conn
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    };
    let healthy = a.healthy && proxy.load(Ordering::Relaxed);
    conn.write_all(&response(&a.service, a.local, healthy))
        .await?;
    conn.shutdown().await
}

/// Reads an HTTP request's head (up to 8 KiB; what the peer sent when it closes early).
pub async fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(head)
}

/// The HTTP response for a Service with `local` ready endpoints on this node (kube-proxy's: 503
/// when none, or when the proxy is not healthy).
pub fn response(svc: &ServiceKey, local: usize, healthy: bool) -> Vec<u8> {
    let body = serde_json::json!({
        "service": {"namespace": &*svc.namespace, "name": &*svc.name},
        "localEndpoints": local,
        "serviceProxyHealthy": healthy,
    })
    .to_string();
    let status = if local > 0 && healthy {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_kube_proxys() {
        let r = String::from_utf8(response(&ServiceKey::new("default", "web"), 2, true)).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Type: application/json\r\n"));
        assert!(head.contains("\r\nX-Content-Type-Options: nosniff\r\n"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "default", "name": "web"},
                "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let r = String::from_utf8(response(&ServiceKey::new("default", "web"), 0, true)).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("\"localEndpoints\":0"));
        let r = String::from_utf8(response(&ServiceKey::new("default", "web"), 3, false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("\"serviceProxyHealthy\":false"));
    }

    #[tokio::test]
    async fn ports_follow_the_services_and_answer_their_counts() {
        let servers = HealthServers::default();
        // A free port: bind one, let go of it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let svc = ServiceKey::new("ns", "lb");
        let answer = |local| Answer {
            service: svc.clone(),
            local,
            healthy: true,
        };
        servers.sync(BTreeMap::from([(port, answer(1))]));
        let get = || async {
            let mut c = TcpStream::connect(("127.0.0.1", port)).await?;
            c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await?;
            let mut out = String::new();
            c.read_to_string(&mut out).await?;
            Ok::<_, std::io::Error>(out)
        };
        assert!(get().await.unwrap().starts_with("HTTP/1.1 200 OK"));
        // The dataplane unhealthy (/healthz 503): every port answers 503, serviceProxyHealthy false.
        servers.set_proxy_healthy(false);
        let r = get().await.unwrap();
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("\"serviceProxyHealthy\":false"),
            "{r}"
        );
        servers.set_proxy_healthy(true);
        assert!(get().await.unwrap().starts_with("HTTP/1.1 200 OK"));
        servers.sync(BTreeMap::from([(port, answer(0))]));
        assert!(get().await.unwrap().starts_with("HTTP/1.1 503"));
        servers.sync(BTreeMap::new());
        assert_eq!(servers.ports(), Vec::<u16>::new());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(get().await.is_err(), "a closed health-check port refuses");
    }
}
