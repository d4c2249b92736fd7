//! cni-conformance: a CNI conformance suite any plugin can be run against (see README.md), and
//! the network-namespace fixtures sluice's end-to-end tests use.

pub mod cases;
pub mod cni;
pub mod cnitool;
pub mod fixture;
pub mod kube;
pub mod netstate;
pub mod ns;
pub mod report;
pub mod runner;
pub mod schema;

use std::time::Instant;

use anyhow::Result;

use report::{CaseReport, Report, Status};

/// Runs the selected cases; Err only when the run itself could not start (bad arguments, a
/// failing setup hook, missing tools).
pub fn run(opts: runner::Options) -> Result<Report> {
    let started = Instant::now();
    let all = cases::all();
    for n in opts.only.iter().chain(opts.skip.iter()) {
        if !all.iter().any(|c| &c.name == n) {
            anyhow::bail!("unknown case {n:?}; --list shows the cases");
        }
    }
    let (rt, _workdir) = runner::prepare(opts.clone())?;
    let mut report = Report {
        plugin: rt.main_type.clone(),
        network: rt.list.name(),
        conflist: opts.conflist.display().to_string(),
        cni_path: rt.plugins.cni_path(),
        advertised_versions: rt.advertised.clone(),
        cnitool_version: rt.cnitool_version.clone(),
        default_version: rt.default_version.clone(),
        allocation_probe: rt.alloc.describe(),
        node_netns: rt.node_path().display().to_string(),
        workdir: rt.workdir.display().to_string(),
        cases: Vec::new(),
        passed: 0,
        failed: 0,
        failed_required: 0,
        not_applicable: 0,
        seconds: 0.0,
        ok: false,
    };
    if let Some(e) = &rt.cnitool_error {
        eprintln!("cni-conformance: {e}; the runner drives every case itself");
    }
    let hooks = runner::HookGuard { rt: rt.clone() };
    abort_on_signals(std::sync::Arc::downgrade(&rt), opts.keep_workdir);
    rt.start_hooks()?;
    let ctx = cases::Ctx::new(rt.clone());
    let selected: Vec<&cases::Case> = all
        .iter()
        .filter(|c| opts.only.is_empty() || opts.only.contains(&c.name))
        .filter(|c| !opts.skip.contains(&c.name))
        .collect();
    for (i, case) in selected.iter().enumerate() {
        let t = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.run)(&ctx)));
        let (result, detail) = match outcome {
            Ok(Ok(d)) => (Status::Pass, d),
            Ok(Err(cases::CaseErr::Na(d))) => (Status::NotApplicable, d),
            Ok(Err(cases::CaseErr::Fail(e))) => (Status::Fail, format!("{e:#}")),
            Err(p) => (
                Status::Fail,
                format!(
                    "runner panic: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                ),
            ),
        };
        let c = CaseReport {
            name: case.name.clone(),
            result,
            required: case.req == cases::Req::Required,
            seconds: t.elapsed().as_secs_f64(),
            detail,
        };
        if opts.progress {
            eprintln!(
                "[{}/{}] {:<32} {:<5} {:.1}s",
                i + 1,
                selected.len(),
                c.name,
                c.result.as_str(),
                c.seconds
            );
        }
        report.cases.push(c);
    }
    if let Err(e) = ctx.drop_anchor() {
        eprintln!("cni-conformance: warning: DEL of the anchor pod: {e:#}");
    }
    drop(ctx);
    if let Err(e) = hooks.rt.stop_hooks() {
        eprintln!("cni-conformance: warning: {e:#}");
    }
    if opts.keep_workdir {
        let p = _workdir.path().to_path_buf();
        std::mem::forget(_workdir);
        eprintln!("cni-conformance: work dir kept at {}", p.display());
    }
    report.seconds = started.elapsed().as_secs_f64();
    report.finish();
    Ok(report)
}

static SIGNAL_PIPE: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE.load(std::sync::atomic::Ordering::SeqCst);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// On SIGINT/SIGTERM/SIGHUP: stop the hooks (so a daemon started by --setup does not outlive
/// the run), delete the node namespace and the work dir, exit 128+signal. Pod namespaces of
/// cases in flight are swept by the next run.
fn abort_on_signals(rt: std::sync::Weak<runner::Rt>, keep_workdir: bool) {
    let mut fds = [0; 2];
    // SAFETY: plain pipe(2) and sigaction(2); the handler only writes to the pipe.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return;
        }
        SIGNAL_PIPE.store(fds[1], std::sync::atomic::Ordering::SeqCst);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    let rfd = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: reading one byte from our pipe.
        let n = unsafe { libc::read(rfd, &mut b as *mut u8 as *mut libc::c_void, 1) };
        if n != 1 {
            return;
        }
        // A weak reference: the run's state must drop (deleting the node namespace) when the
        // run ends normally.
        let Some(rt) = rt.upgrade() else {
            std::process::exit(128 + b as i32)
        };
        eprintln!(
            "cni-conformance: signal {b}: stopping the hooks and removing the node namespace"
        );
        if let Err(e) = rt.stop_hooks() {
            eprintln!("cni-conformance: {e:#}");
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &rt.node.name])
            .status();
        if !keep_workdir {
            let _ = std::fs::remove_dir_all(&rt.workdir);
        }
        std::process::exit(128 + b as i32);
    });
}
