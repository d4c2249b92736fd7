//! The dataplane modes under test and how each one programs N services into a node namespace.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::fx::{self, Netns};
use crate::rules::{self, Svc};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    Direct,
    IptablesNft,
    IptablesLegacy,
    Nftables,
    Sluice,
}

pub const ALL: [Mode; 5] = [
    Mode::Direct,
    Mode::IptablesNft,
    Mode::IptablesLegacy,
    Mode::Nftables,
    Mode::Sluice,
];

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::IptablesNft => "iptables-nft",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::Nftables => "nftables",
            Mode::Sluice => "sluice",
        }
    }

    pub fn parse(s: &str) -> Result<Mode> {
        for m in ALL {
            if m.name() == s {
                return Ok(m);
            }
        }
        if s == "ipvs" {
            bail!("ipvs: {}", ipvs_status());
        }
        bail!("unknown mode {s:?} (direct, iptables-nft, iptables-legacy, nftables, sluice)")
    }

    fn restore_bin(self) -> &'static str {
        match self {
            Mode::IptablesNft => "iptables-nft-restore",
            Mode::IptablesLegacy => "iptables-legacy-restore",
            _ => unreachable!(),
        }
    }
}

/// `iptables-*-restore --noflush` of `text` in `ns`: the command's wall time.
pub fn ipt_restore(mode: Mode, ns: &Netns, text: &str) -> Result<Duration> {
    let mut cmd = ns.command(mode.restore_bin());
    cmd.arg("--noflush");
    Ok(fx::run_input(&mut cmd, text.as_bytes())?.1)
}

/// `iptables-*-restore` (flushing the tables it names) of `text` in `ns`.
pub fn ipt_restore_flush(mode: Mode, ns: &Netns, text: &str) -> Result<Duration> {
    let mut cmd = ns.command(mode.restore_bin());
    Ok(fx::run_input(&mut cmd, text.as_bytes())?.1)
}

/// `nft -f -` of `text` in `ns`: the command's wall time.
pub fn nft_load(ns: &Netns, text: &str) -> Result<Duration> {
    let mut cmd = ns.command("nft");
    cmd.args(["-f", "-"]);
    Ok(fx::run_input(&mut cmd, text.as_bytes())?.1)
}

/// Programs `svcs` in the node: what kube-proxy (or sluice) would do at start, timed.
/// `node_ctl` applies sluice objects (None for the netfilter modes).
pub fn program(
    mode: Mode,
    ns: &Netns,
    svcs: &[Svc],
    sluice_apply: Option<&dyn Fn(&str) -> Result<Duration>>,
    work: &Path,
) -> Result<Duration> {
    match mode {
        Mode::Direct => Ok(Duration::ZERO),
        Mode::IptablesNft | Mode::IptablesLegacy => {
            // The same ruleset as kube-proxy's, loaded the quick way: a flushing restore of
            // the tables, then the jumps with --noflush. (kube-proxy's --noflush restore of
            // every chain takes minutes with iptables-nft 1.8.9 at 10k services: figure 3.)
            let text = rules::iptables_full(svcs, &[]);
            let _ = std::fs::write(work.join(format!("{}.rules", mode.name())), &text);
            let t = ipt_restore_flush(mode, ns, &text)?;
            Ok(t + ipt_restore(mode, ns, &rules::iptables_jumps())?)
        }
        Mode::Nftables => {
            let text = rules::nft_full(svcs, &[]);
            let _ = std::fs::write(work.join("nftables.nft"), &text);
            nft_load(ns, &text)
        }
        Mode::Sluice => {
            let apply = sluice_apply.expect("sluice mode needs sluiced");
            apply(&rules::k8s_all(svcs))
        }
    }
}

/// IPVS on this kernel: "available" or why not.
pub fn ipvs_status() -> String {
    if Path::new("/proc/net/ip_vs").exists() {
        return "available (/proc/net/ip_vs present) but this suite has no IPVS mode yet".into();
    }
    let modprobe = Command::new("modprobe")
        .arg("ip_vs")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if modprobe && Path::new("/proc/net/ip_vs").exists() {
        return "available (after modprobe ip_vs) but this suite has no IPVS mode yet".into();
    }
    "unavailable: the kernel has no IPVS (/proc/net/ip_vs absent, modprobe ip_vs failed)".into()
}
