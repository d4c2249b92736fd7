//! What sluiced shows operators over HTTP, as kube-proxy does: `/healthz` and `/livez` on
//! `--healthz-bind-address` ([`healthz`]), `/metrics` on `--metrics-bind-address` ([`metrics`]).
//! One small HTTP/1.1 server (GET only, one request per connection): nothing here needs more.

pub mod healthz;
pub mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::state::State;

/// A response: status line ("200 OK"), content type, body.
pub struct Reply {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn not_found() -> Reply {
        Reply {
            status: "404 Not Found",
            content_type: "text/plain; charset=utf-8",
            body: b"404 page not found\n".to_vec(),
        }
    }

    fn bytes(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Which server: picks the reply for a path.
pub type Route = fn(&State, &str) -> Reply;

/// Binds `addr` and serves `route` until the task is aborted. A bind failure is logged and
/// retried every 10 s (another process may hold kube-proxy's port while it is being replaced).
pub async fn serve(what: &'static str, addr: SocketAddr, state: Arc<State>, route: Route) {
    let listener = loop {
        match TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(e) => {
                tracing::error!(%addr, error = %e, "binding the {what} address (retried in 10 s)");
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        }
    };
    tracing::info!(%addr, "{what} serving");
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(conn, state, route)).await;
        });
    }
}

async fn answer(mut conn: TcpStream, state: Arc<State>, route: Route) -> std::io::Result<()> {
    let head = crate::services::health::read_head(&mut conn).await?;
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("/").to_string();
    let path = target.split('?').next().unwrap_or("/").to_string();
    let reply = if method == "GET" || method == "HEAD" {
        // Metrics read maps and take the services lock: not on a runtime thread.
        tokio::task::spawn_blocking(move || route(&state, &path))
            .await
            .unwrap_or_else(|_| Reply::not_found())
    } else {
        Reply {
            status: "405 Method Not Allowed",
            content_type: "text/plain; charset=utf-8",
            body: b"GET only\n".to_vec(),
        }
    };
    conn.write_all(&reply.bytes(method == "HEAD")).await?;
    conn.shutdown().await
}

/// Go's `time.Time.String()` for a UTC time, as kube-proxy's health JSON shows its times
/// ("2026-12-01 19:29:30.123456789 +0000 UTC").
pub fn go_time(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:09} +0000 UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_go_prints_them() {
        let t = std::time::UNIX_EPOCH + Duration::new(1_795_807_770, 123_456_789);
        assert_eq!(go_time(t), "2026-11-27 19:29:30.123456789 +0000 UTC");
        assert_eq!(
            go_time(std::time::UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29 00:00:00.000000000 +0000 UTC"
        );
    }
}
