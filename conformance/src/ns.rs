//! Running things inside a network namespace without `ip netns exec` (which remounts /sys and so
//! hides /sys/fs/bpf): child processes call setns(2) between fork and exec, threads call it on
//! themselves.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, Context, Result};

pub fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("opening network namespace {}", path.display()))
}

fn setns(fd: RawFd) -> io::Result<()> {
    // SAFETY: setns only reads its arguments.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `program` run inside the network namespace open at `fd` (the caller keeps `fd` open until the
/// command has been spawned).
pub fn command_in(fd: RawFd, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    // SAFETY: setns is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(move || setns(fd));
    }
    c
}

/// Runs `f` on a fresh thread that has entered the network namespace at `path`.
pub fn in_netns<T: Send>(path: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let file = open(path)?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(file.as_raw_fd()).with_context(|| format!("setns into {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside {} panicked", path.display()))?
    })
}
