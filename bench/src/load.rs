//! The load generator (netperf is not in Debian 12): a server for backend pods and three
//! clients, each printing one JSON object.
//!
//! Wire protocol: the client's first bytes are a mode byte and a little-endian u32 size.
//! - `R` (request/response): the client sends `size` bytes, the server answers `size` bytes,
//!   repeated until the client closes.
//! - `S` (stream): the client sends bytes until it shuts down its side; the server answers with
//!   the count it read (u64 LE) and closes.
//!
//! Clients run their threads in the client pods' namespaces (setns per thread), so one process
//! pinned with taskset drives several source addresses. Connection clients close with
//! SO_LINGER 0 (an RST, no TIME_WAIT anywhere) and pick ephemeral ports from the pod's
//! widened ip_local_port_range.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::stats::pct;

fn setsockopt_int(fd: i32, level: i32, opt: i32, v: i32) -> Result<()> {
    // SAFETY: a plain int option on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &v as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        bail!("setsockopt: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn linger0(s: &TcpStream) -> Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: struct linger on a socket we own.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
    if r != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_netns(path: &str) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("setns {path}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Server

pub fn serve(port: u16, threads: usize) -> Result<()> {
    // SAFETY: a fresh socket, configured and handed to TcpListener which owns it from then on.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            &addr as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            bail!("bind :{port}: {}", std::io::Error::last_os_error());
        }
        if libc::listen(fd, 4096) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        TcpListener::from_raw_fd(fd)
    };
    let listener = Arc::new(listener);
    let mut hs = vec![];
    for _ in 0..threads {
        let l = listener.clone();
        hs.push(std::thread::spawn(move || loop {
            if let Ok((s, _)) = l.accept() {
                let _ = handle(s);
            }
        }));
    }
    for h in hs {
        let _ = h.join();
    }
    Ok(())
}

fn handle(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut hdr = [0u8; 5];
    s.read_exact(&mut hdr)?;
    let size = u32::from_le_bytes(hdr[1..5].try_into().unwrap()) as usize;
    match hdr[0] {
        b'R' => {
            let mut buf = vec![0u8; size.max(1)];
            loop {
                s.read_exact(&mut buf[..size])?;
                s.write_all(&buf[..size])?;
            }
        }
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut n: u64 = 0;
            loop {
                let r = s.read(&mut buf)?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            s.write_all(&n.to_le_bytes())?;
            Ok(())
        }
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

fn header(mode: u8, size: usize) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(&(size as u32).to_le_bytes());
    v
}

fn summary_us(v: &mut [u32]) -> Value {
    v.sort_unstable();
    json!({
        "p50_us": pct(v, 0.50) as f64 / 1e3,
        "p90_us": pct(v, 0.90) as f64 / 1e3,
        "p99_us": pct(v, 0.99) as f64 / 1e3,
        "max_us": v.last().copied().unwrap_or(0) as f64 / 1e3,
    })
}

/// Connect/request/close as fast as possible: `threads` threads per namespace, each cycling
/// through `targets`, for `warmup` + `secs` seconds; only the last `secs` count.
pub fn conn(
    netns: &[String],
    targets: &[SocketAddr],
    threads: usize,
    secs: f64,
    warmup: f64,
    size: usize,
) -> Result<Value> {
    let start = Instant::now();
    let t0 = start + Duration::from_secs_f64(warmup);
    let end = t0 + Duration::from_secs_f64(secs);
    let mut hs = vec![];
    let mut k = 0;
    for ns in netns {
        for _ in 0..threads {
            let ns = ns.clone();
            let targets = targets.to_vec();
            let offset = k;
            k += 1;
            hs.push(std::thread::spawn(
                move || -> Result<(u64, u64, Vec<u32>, Vec<u32>)> {
                    if !ns.is_empty() {
                        enter_netns(&ns)?;
                    }
                    let mut req = header(b'R', size);
                    req.extend(std::iter::repeat_n(0x5a, size));
                    let mut resp = vec![0u8; size.max(1)];
                    let (mut ok, mut errors) = (0u64, 0u64);
                    let (mut conn_ns, mut txn_ns) = (vec![], vec![]);
                    let mut i = offset;
                    loop {
                        let now = Instant::now();
                        if now >= end {
                            break;
                        }
                        let target = targets[i % targets.len()];
                        i += 1;
                        let r = (|| -> std::io::Result<(Duration, Duration)> {
                            let s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
                            let c = now.elapsed();
                            let _ = linger0(&s);
                            s.set_nodelay(true)?;
                            let mut s = s;
                            s.write_all(&req)?;
                            s.read_exact(&mut resp[..size])?;
                            Ok((c, now.elapsed()))
                            // dropped here: close with SO_LINGER 0 sends an RST
                        })();
                        let counted = now >= t0;
                        match r {
                            Ok((c, t)) if counted => {
                                ok += 1;
                                conn_ns.push(c.as_nanos().min(u32::MAX as u128) as u32);
                                txn_ns.push(t.as_nanos().min(u32::MAX as u128) as u32);
                            }
                            Ok(_) => {}
                            Err(_) if counted => errors += 1,
                            Err(_) => {}
                        }
                    }
                    Ok((ok, errors, conn_ns, txn_ns))
                },
            ));
        }
    }
    let (mut ok, mut errors, mut c, mut t) = (0, 0, vec![], vec![]);
    for h in hs {
        let (o, e, cv, tv) = h.join().map_err(|_| anyhow::anyhow!("client thread"))??;
        ok += o;
        errors += e;
        c.extend(cv);
        t.extend(tv);
    }
    let elapsed = secs.min((Instant::now() - t0).as_secs_f64());
    Ok(json!({
        "connections": ok,
        "errors": errors,
        "seconds": elapsed,
        "rate": ok as f64 / elapsed,
        "concurrency": k,
        "connect": summary_us(&mut c),
        "transaction": summary_us(&mut t),
    }))
}

/// Request/response on `conns` persistent connections (one thread each), one request in flight
/// per connection: per-request latency percentiles.
pub fn rr(
    netns: &str,
    target: SocketAddr,
    conns: usize,
    secs: f64,
    warmup: f64,
    size: usize,
) -> Result<Value> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let t0 = start + Duration::from_secs_f64(warmup);
    let end = t0 + Duration::from_secs_f64(secs);
    let mut hs = vec![];
    for _ in 0..conns {
        let ns = netns.to_string();
        let stop = stop.clone();
        hs.push(std::thread::spawn(move || -> Result<Vec<u32>> {
            if !ns.is_empty() {
                enter_netns(&ns)?;
            }
            let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
            s.set_nodelay(true)?;
            s.write_all(&header(b'R', size))?;
            let req = vec![0x5au8; size];
            let mut resp = vec![0u8; size];
            let mut lat = Vec::with_capacity(1 << 20);
            loop {
                let now = Instant::now();
                if now >= end || stop.load(Ordering::Relaxed) {
                    break;
                }
                s.write_all(&req)?;
                s.read_exact(&mut resp)?;
                if now >= t0 {
                    lat.push(now.elapsed().as_nanos().min(u32::MAX as u128) as u32);
                }
            }
            let _ = s.shutdown(Shutdown::Both);
            Ok(lat)
        }));
    }
    let mut all = vec![];
    for h in hs {
        all.extend(h.join().map_err(|_| anyhow::anyhow!("rr thread"))??);
    }
    let n = all.len();
    let mut v = summary_us(&mut all);
    v["requests"] = json!(n);
    v["rate"] = json!(n as f64 / secs);
    v["conns"] = json!(conns);
    Ok(v)
}

/// One TCP stream for `secs` seconds: what the server counted, in Gbit/s.
pub fn stream(netns: &str, target: SocketAddr, secs: f64) -> Result<Value> {
    if !netns.is_empty() {
        enter_netns(netns)?;
    }
    let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
    s.write_all(&header(b'S', 0))?;
    let buf = vec![0x5au8; 128 * 1024];
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        s.write_all(&buf)?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    let elapsed = start.elapsed().as_secs_f64();
    let bytes = u64::from_le_bytes(n);
    Ok(json!({"bytes": bytes, "seconds": elapsed, "gbit_s": bytes as f64 * 8.0 / elapsed / 1e9}))
}
