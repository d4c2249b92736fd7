//! Fixtures: uniquely named network namespaces, processes and directories, every one registered
//! for clean-up, which runs on drop, at exit and on SIGINT/SIGTERM/SIGHUP. Names are
//! `<prefix>-<tag><n>` with the prefix `slb<pid>` (or the one scripts/bench.sh passes), so the
//! script's own trap can sweep whatever a killed run left behind.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

static PREFIX: Mutex<String> = Mutex::new(String::new());
static SEQ: AtomicU32 = AtomicU32::new(0);

/// What is left to remove, in reverse order of creation.
#[derive(Debug)]
enum Item {
    Netns(String),
    Pid(i32),
    Dir(PathBuf),
    /// A sluiced whose pins and state `sluiced --cleanup` removes: (node netns, args).
    Sluiced(String, Vec<String>),
}

static ITEMS: Mutex<BTreeMap<u32, Item>> = Mutex::new(BTreeMap::new());

pub fn set_prefix(p: &str) {
    *PREFIX.lock().unwrap() = p.to_string();
}

pub fn prefix() -> String {
    let p = PREFIX.lock().unwrap();
    if p.is_empty() {
        format!("slb{}", std::process::id())
    } else {
        p.clone()
    }
}

/// `<prefix>-<tag><n>`.
pub fn unique(tag: &str) -> String {
    format!("{}-{tag}{}", prefix(), SEQ.fetch_add(1, Ordering::Relaxed))
}

fn register(item: Item) -> u32 {
    let id = SEQ.fetch_add(1, Ordering::Relaxed);
    ITEMS.lock().unwrap().insert(id, item);
    id
}

fn release(id: u32) -> Option<Item> {
    ITEMS.lock().unwrap().remove(&id)
}

fn remove(item: Item) {
    match item {
        Item::Netns(name) => {
            // Processes still inside (servers) first, then the namespace.
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(p) = pid.parse::<i32>() {
                        kill9(p);
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(Stdio::null())
                .status();
        }
        Item::Pid(p) => kill9(p),
        Item::Dir(d) => {
            let _ = std::fs::remove_dir_all(d);
        }
        Item::Sluiced(ns, args) => {
            let _ = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{ns}"))
                .arg("--")
                .arg(bin("sluiced"))
                .arg("--cleanup")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn kill9(pid: i32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = nix::sys::wait::waitpid(
        nix::unistd::Pid::from_raw(pid),
        Some(nix::sys::wait::WaitPidFlag::WNOHANG),
    );
}

/// Removes everything still registered (newest first).
pub fn cleanup_all() {
    loop {
        let item = {
            let mut m = ITEMS.lock().unwrap();
            let Some((&k, _)) = m.iter().next_back() else {
                break;
            };
            m.remove(&k).unwrap()
        };
        remove(item);
    }
}

static SIG_PIPE_W: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let b = sig as u8;
    let fd = SIG_PIPE_W.load(Ordering::Relaxed);
    // SAFETY: write(2) is async-signal-safe; one byte to our own pipe.
    unsafe {
        libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
    }
}

/// On SIGINT/SIGTERM/SIGHUP: clean up everything registered and exit 130. The handler only
/// writes to a pipe; a thread does the work. (Not a blocked signal mask: children would
/// inherit it, and sluiced would never see our SIGTERM.)
pub fn install_signal_cleanup() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    use std::os::fd::IntoRawFd;
    let (r, w) = nix::unistd::pipe().expect("pipe");
    SIG_PIPE_W.store(w.into_raw_fd(), Ordering::Relaxed);
    let r = r.into_raw_fd();
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        // SAFETY: reading one byte from our own pipe.
        let n = unsafe { libc::read(r, b.as_mut_ptr() as *mut libc::c_void, 1) };
        if n == 1 {
            eprintln!("sluice-bench: signal {}: cleaning up", b[0]);
            cleanup_all();
            std::process::exit(130);
        }
    });
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler is async-signal-safe (one write).
        unsafe { sigaction(sig, &act) }.expect("sigaction");
    }
}

/// Where sluice's binaries are: SLUICE_BIN_DIR, else the directory of this binary.
pub fn bin(name: &str) -> PathBuf {
    if let Some(d) = std::env::var_os("SLUICE_BIN_DIR") {
        return PathBuf::from(d).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().unwrap_or(Path::new(".")).join(name)
}

/// Runs a command, failing with its output when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(out)
}

static TIMEOUT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The longest a programming command (iptables-restore, nft, sluicectl) may take; 0 = no limit.
pub fn set_timeout(d: Duration) {
    TIMEOUT_MS.store(d.as_millis() as u64, Ordering::Relaxed);
}

/// A programming command killed after the timeout.
#[derive(Debug)]
pub struct TimedOut(pub Duration);

impl std::fmt::Display for TimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "timed out after {:?}", self.0)
    }
}

impl std::error::Error for TimedOut {}

/// Runs a command with `input` on stdin; returns (output, wall time of the process). Killed
/// (error `TimedOut`) after the timeout of `set_timeout`.
pub fn run_input(cmd: &mut Command, input: &[u8]) -> Result<(Output, Duration)> {
    use std::io::{Read, Write};
    let t = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&data);
    });
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let ro = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = so.read_to_end(&mut v);
        v
    });
    let re = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = se.read_to_end(&mut v);
        v
    });
    let limit = TIMEOUT_MS.load(Ordering::Relaxed);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if limit > 0 && t.elapsed() > Duration::from_millis(limit) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(TimedOut(Duration::from_millis(limit)).into());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let took = t.elapsed();
    let _ = writer.join();
    let out = Output {
        status,
        stdout: ro.join().unwrap_or_default(),
        stderr: re.join().unwrap_or_default(),
    };
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok((out, took))
}

/// A named network namespace, deleted (with whatever runs in it) on drop.
pub struct Netns {
    pub name: String,
    id: u32,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        let name = unique(tag);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let id = register(Item::Netns(name.clone()));
        let ns = Netns { name, id };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `program` inside this namespace (nsenter: /sys/fs/bpf stays visible).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    /// `program` inside this namespace, pinned to `cpus` with taskset.
    pub fn pinned(&self, cpus: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("taskset");
        c.args(["-c", cpus])
            .arg("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        c
    }

    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    pub fn sh(&self, script: &str) -> Result<Output> {
        run(self.command("sh").arg("-c").arg(script))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(self
            .command("sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]))?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(item) = release(self.id) {
            remove(item);
        }
    }
}

/// A child process, killed and reaped on drop.
pub struct Proc {
    pub child: Child,
    id: u32,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Result<Proc> {
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let id = register(Item::Pid(child.id() as i32));
        Ok(Proc { child, id })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                release(self.id);
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        release(self.id);
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if release(self.id).is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A work directory under /tmp, removed on drop.
pub struct WorkDir {
    pub path: PathBuf,
    id: u32,
}

impl WorkDir {
    pub fn new(tag: &str) -> Result<WorkDir> {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path)?;
        let id = register(Item::Dir(path.clone()));
        Ok(WorkDir { path, id })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Some(item) = release(self.id) {
            remove(item);
        }
    }
}

/// Registers `sluiced --cleanup ARGS` in namespace `ns` (and the bpffs dir) for clean-up; the
/// returned guard runs it on drop.
pub struct SluicedPins {
    id: u32,
    bpffs_id: u32,
}

impl SluicedPins {
    pub fn new(ns: &str, args: Vec<String>, bpffs: &Path) -> SluicedPins {
        let bpffs_id = register(Item::Dir(bpffs.to_path_buf()));
        let id = register(Item::Sluiced(ns.to_string(), args));
        SluicedPins { id, bpffs_id }
    }
}

impl Drop for SluicedPins {
    fn drop(&mut self) {
        if let Some(item) = release(self.id) {
            remove(item);
        }
        if let Some(item) = release(self.bpffs_id) {
            remove(item);
        }
    }
}

/// Polls `f` every `every` until it returns Ok(true) or `timeout` passes.
pub fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match f() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(every);
    }
    Err(anyhow!(
        "timed out after {timeout:?} waiting for {what}{}",
        last.map(|e| format!(": {e:#}")).unwrap_or_default()
    ))
}
