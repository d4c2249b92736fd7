//! Driving the real cnitool (libcni): `cnitool add|check|del <net> <netns>`.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sha2::{Digest, Sha512};

pub struct Cnitool {
    pub bin: PathBuf,
    pub cni_path: String,
    pub node_fd: RawFd,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct CnitoolOut {
    pub verb: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CnitoolOut {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
    pub fn describe(&self) -> String {
        format!(
            "cnitool {} exited {:?}: {}{}",
            self.verb,
            self.code,
            self.stderr.trim(),
            if self.stdout.trim().is_empty() {
                String::new()
            } else {
                format!(" (stdout {:?})", self.stdout.trim())
            }
        )
    }
    pub fn check_ok(&self) -> Result<()> {
        if self.success() {
            Ok(())
        } else {
            bail!("{}", self.describe())
        }
    }
}

/// The container ID cnitool uses for a netns path: "cnitool-" + 20 hex digits of sha512(path).
pub fn container_id(netns: &str) -> String {
    let d = Sha512::digest(netns.as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("cnitool-{}", &hex[..20])
}

/// Where libcni caches a result.
pub fn cache_file(net: &str, container_id: &str, ifname: &str) -> PathBuf {
    PathBuf::from(format!(
        "/var/lib/cni/results/{net}-{container_id}-{ifname}"
    ))
}

/// cnitool on PATH (or the given path), checked to be executable.
pub fn locate(given: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--cnitool {} does not exist", p.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("cnitool"))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("cnitool is not on PATH; install it or pass --cnitool PATH"))
}

impl Cnitool {
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        verb: &str,
        confdir: &Path,
        net: &str,
        netns: &str,
        ifname: &str,
        cap_args: Option<&Value>,
        cni_args: Option<&str>,
    ) -> Result<CnitoolOut> {
        let mut cmd = crate::ns::command_in(self.node_fd, &self.bin);
        cmd.arg(verb).arg(net).arg(netns);
        cmd.env("CNI_PATH", &self.cni_path)
            .env("NETCONFPATH", confdir)
            .env("CNI_IFNAME", ifname);
        cmd.env_remove("CAP_ARGS").env_remove("CNI_ARGS");
        if let Some(c) = cap_args {
            cmd.env("CAP_ARGS", c.to_string());
        }
        if let Some(a) = cni_args {
            cmd.env("CNI_ARGS", a);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", self.bin.display()))?;
        let pid = child.id() as i32;
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let ro = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let re = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waiter = std::thread::spawn(move || {
            let st = child.wait();
            let _ = tx.send(());
            st
        });
        if rx.recv_timeout(self.timeout).is_err() {
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let st = waiter.join().map_err(|_| anyhow!("waiter panicked"))??;
            let _ = (ro.join(), re.join());
            bail!("cnitool {verb} timed out after {:?}: {st}", self.timeout);
        }
        let status = waiter.join().map_err(|_| anyhow!("waiter panicked"))??;
        Ok(CnitoolOut {
            verb: verb.to_string(),
            code: status.code(),
            stdout: ro.join().unwrap_or_default(),
            stderr: re.join().unwrap_or_default(),
        })
    }
}
