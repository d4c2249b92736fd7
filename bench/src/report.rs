//! From the results JSON: the markdown table (every figure, medians and spreads over rounds,
//! targets marked met/missed) and the SVG plots.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;
use serde_json::Value;

use crate::stats::{pct_f64, summary, Summary};

const MODE_ORDER: [&str; 5] = [
    "direct",
    "iptables-nft",
    "iptables-legacy",
    "nftables",
    "sluice",
];

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn fmt_sum(s: &Option<Summary>, digits: usize) -> String {
    match s {
        Some(s) if s.n > 1 => format!("{:.*} ±{:.0}%", digits, s.median, s.spread * 100.0),
        Some(s) => format!("{:.*}", digits, s.median),
        None => "–".into(),
    }
}

fn mode_rank(m: &str) -> usize {
    MODE_ORDER.iter().position(|x| *x == m).unwrap_or(99)
}

/// dataplane records grouped by (n, mode).
fn by_n_mode(res: &Value) -> BTreeMap<(u64, usize, String), Vec<&Value>> {
    let mut m: BTreeMap<(u64, usize, String), Vec<&Value>> = BTreeMap::new();
    for r in res["dataplane"].as_array().into_iter().flatten() {
        let mode = r["mode"].as_str().unwrap_or("").to_string();
        m.entry((r["n"].as_u64().unwrap_or(0), mode_rank(&mode), mode))
            .or_default()
            .push(r);
    }
    m
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

fn collect(recs: &[&Value], g: impl Fn(&Value) -> Option<f64>) -> Option<Summary> {
    summary(&recs.iter().filter_map(|r| g(r)).collect::<Vec<_>>())
}

/// Figure 1, NodePort: connection rates from the external clients, per (N, mode).
fn nodeport_table(s: &mut String, res: &Value) {
    let Some(recs) = res["nodeport"].as_array() else {
        return;
    };
    let mut groups: BTreeMap<(u64, usize, String), Vec<&Value>> = BTreeMap::new();
    for r in recs {
        let mode = r["mode"].as_str().unwrap_or("").to_string();
        groups
            .entry((r["n"].as_u64().unwrap_or(0), mode_rank(&mode), mode))
            .or_default()
            .push(r);
    }
    let rate = |r: &Value, k: &str| f(&r[k]["rate"]);
    let nft_rate = |n: u64, round: Option<u64>, k: &str| -> Option<f64> {
        recs.iter().find_map(|r| {
            (r["n"].as_u64() == Some(n)
                && r["mode"] == "iptables-nft"
                && r["round"].as_u64() == round)
                .then(|| rate(r, k))
                .flatten()
        })
    };
    let _ = writeln!(
        s,
        "## 1b. New connections to a NodePort from external clients (two nodes)
"
    );
    let _ = writeln!(s, "External clients ({} hosts × {} threads, CPU 0) on a bridge with node A and node B connect to node A's address: \"local\" is a NodePort whose two backends are pods on node A, \"remote\" one whose two backends are on node B (externalTrafficPolicy Cluster: kube-proxy masquerades, sluice answers from node B directly, DSR). The anchors are the same clients connecting straight to the backend pods (routed through node A, or node B), no rules loaded, in the same topology just before. N background services (the last 2000 of them NodePorts) plus the two measured, which are last in KUBE-SERVICES and KUBE-NODEPORTS.\n",
        recs[0]["clients"], recs[0]["threads_per_client"]);
    let _ = writeln!(s, "| N | mode | direct local conn/s | NodePort local conn/s | local / direct | direct remote conn/s | NodePort remote conn/s | remote / direct | local / iptables-nft | remote / iptables-nft | errors |\n|---|---|---|---|---|---|---|---|---|---|---|");
    for ((n, _, mode), rs) in &groups {
        let al = collect(rs, |r| rate(r, "anchor_local"));
        let sl = collect(rs, |r| rate(r, "service_local"));
        let rl = collect(rs, |r| {
            ratio(rate(r, "service_local"), rate(r, "anchor_local"))
        });
        let ar = collect(rs, |r| rate(r, "anchor_remote"));
        let sr = collect(rs, |r| rate(r, "service_remote"));
        let rr = collect(rs, |r| {
            ratio(rate(r, "service_remote"), rate(r, "anchor_remote"))
        });
        let vs = |k: &'static str| {
            if mode == "iptables-nft" {
                return "1".to_string();
            }
            fmt_sum(
                &collect(rs, |r| {
                    ratio(rate(r, k), nft_rate(*n, r["round"].as_u64(), k))
                }),
                2,
            )
        };
        let errors: u64 = rs
            .iter()
            .flat_map(|r| {
                [
                    "anchor_local",
                    "anchor_remote",
                    "service_local",
                    "service_remote",
                ]
                .map(|k| r[k]["errors"].as_u64().unwrap_or(0))
            })
            .sum();
        let _ = writeln!(
            s,
            "| {n} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {errors} |",
            fmt_sum(&al, 0),
            fmt_sum(&sl, 0),
            fmt_sum(&rl, 3),
            fmt_sum(&ar, 0),
            fmt_sum(&sr, 0),
            fmt_sum(&rr, 3),
            vs("service_local"),
            vs("service_remote"),
        );
    }
    for r in recs {
        if let Some(why) = r["skipped"].as_str() {
            let _ = writeln!(
                s,
                "\n- round {} N={} {}: skipped, {why}",
                r["round"],
                r["n"],
                r["mode"].as_str().unwrap_or("")
            );
        }
    }
    s.push('\n');
}

/// The service rate of `mode` at N in `round`.
fn svc_rate(res: &Value, n: u64, mode: &str, round: u64) -> Option<f64> {
    res["dataplane"].as_array()?.iter().find_map(|r| {
        (r["n"].as_u64() == Some(n) && r["mode"] == mode && r["round"].as_u64() == Some(round))
            .then(|| f(&r["service"]["conn"]["rate"]))
            .flatten()
    })
}

struct Target {
    what: &'static str,
    value: String,
    met: Option<bool>,
}

fn mark(t: &Target) -> &'static str {
    match t.met {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

pub fn markdown(res: &Value) -> String {
    let mut s = String::new();
    let m = &res["machine"];
    let c = &res["config"];
    let _ = writeln!(
        s,
        "# sluice benchmark: {} on {}\n",
        res["date"].as_str().unwrap_or("?"),
        m["host"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "Machine: {} ({} CPUs), kernel {}, {}; {}; {}. sluice {}.\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["kernel"].as_str().unwrap_or("?"),
        m["iptables_nft"].as_str().unwrap_or("?"),
        m["iptables_legacy"].as_str().unwrap_or("?"),
        m["nft"].as_str().unwrap_or("?"),
        m["commit"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        s,
        "Run: `{}` — {} rounds, {} s per trial, N = {}, modes {}, figures {}{}. Took {:.0} s. Load average at start: {}.\n",
        c["command"].as_str().unwrap_or("scripts/bench.sh"),
        c["rounds"],
        c["seconds"],
        c["services"],
        c["modes"],
        c["figures"],
        if c["quick"].as_bool() == Some(true) { " (--quick)" } else { "" },
        res["elapsed_s"].as_f64().unwrap_or(0.0),
        m["loadavg"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(s, "Values are medians over rounds; ± is half the min–max range over rounds, relative to the median. Ratios are formed per round (same round, same topology for the direct anchor), then summarised.\n");
    let _ = writeln!(s, "- IPVS: {}", res["ipvs"].as_str().unwrap_or("?"));
    if let Some(errs) = res["errors"].as_array() {
        for e in errs {
            let _ = writeln!(s, "- **error**: {}", e.as_str().unwrap_or(""));
        }
    }
    s.push('\n');

    let targets = targets(res);
    let _ = writeln!(
        s,
        "## Targets (sluice)\n\n| target | measured | |\n|---|---|---|"
    );
    for t in &targets {
        let _ = writeln!(s, "| {} | {} | {} |", t.what, t.value, mark(t));
    }
    s.push('\n');

    // 1 and 2
    let groups = by_n_mode(res);
    if !groups.is_empty() {
        let _ = writeln!(s, "## 1. New connections (connect, 64-byte request/response, close with RST), ClusterIP from a pod\n");
        let _ = writeln!(s, "`direct` is the anchor: the backend pod IPs with no rules loaded, measured in each topology before the mode's rules. \"direct, rules loaded\" is the same non-service path with the mode's N services loaded. Clients: {} pods × {} threads on CPU 0, servers on CPU 1.\n",
            res["dataplane"][0]["clients"], res["dataplane"][0]["threads_per_client"]);
        let _ = writeln!(s, "| N | mode | direct conn/s | service conn/s | service / direct | direct, rules loaded / direct | service / iptables-nft | service connect p99 µs | errors |\n|---|---|---|---|---|---|---|---|---|");
        for ((n, _, mode), recs) in &groups {
            let anchor = collect(recs, |r| f(&r["anchor"]["conn"]["rate"]));
            if anchor.is_none() {
                continue;
            }
            let svc = collect(recs, |r| f(&r["service"]["conn"]["rate"]));
            let rs = collect(recs, |r| {
                ratio(
                    f(&r["service"]["conn"]["rate"]),
                    f(&r["anchor"]["conn"]["rate"]),
                )
            });
            let rd = collect(recs, |r| {
                ratio(
                    f(&r["direct_loaded"]["conn"]["rate"]),
                    f(&r["anchor"]["conn"]["rate"]),
                )
            });
            let vs_ipt = collect(recs, |r| {
                ratio(
                    f(&r["service"]["conn"]["rate"]),
                    svc_rate(res, *n, "iptables-nft", r["round"].as_u64()?),
                )
            });
            let p99 = collect(recs, |r| f(&r["service"]["conn"]["connect"]["p99_us"]));
            let errors: u64 = recs
                .iter()
                .map(|r| {
                    r["service"]["conn"]["errors"].as_u64().unwrap_or(0)
                        + r["anchor"]["conn"]["errors"].as_u64().unwrap_or(0)
                        + r["direct_loaded"]["conn"]["errors"].as_u64().unwrap_or(0)
                })
                .sum();
            let _ = writeln!(
                s,
                "| {n} | {mode} | {} | {} | {} | {} | {} | {} | {errors} |",
                fmt_sum(&anchor, 0),
                fmt_sum(&svc, 0),
                fmt_sum(&rs, 3),
                fmt_sum(&rd, 3),
                if mode == "iptables-nft" {
                    "1".into()
                } else {
                    fmt_sum(&vs_ipt, 2)
                },
                fmt_sum(&p99, 0),
            );
        }
        for r in res["dataplane"].as_array().into_iter().flatten() {
            if let Some(why) = r["skipped"].as_str() {
                let _ = writeln!(
                    s,
                    "\n- round {} N={} {}: skipped, {why}",
                    r["round"],
                    r["n"],
                    r["mode"].as_str().unwrap_or("")
                );
            }
        }
        s.push('\n');
    }
    nodeport_table(&mut s, res);
    if !groups.is_empty() {
        let _ = writeln!(s, "## 2. Request/response on a persistent connection (64 bytes, one in flight) and one TCP stream\n");
        let _ = writeln!(s, "| N | mode | direct p50 µs | service p50 µs | p50 service/direct | direct p99 µs | service p99 µs | p99 service/direct | p99 direct-loaded/direct | stream direct Gbit/s | stream service Gbit/s | service/direct |\n|---|---|---|---|---|---|---|---|---|---|---|---|");
        for ((n, _, mode), recs) in &groups {
            let a50 = collect(recs, |r| f(&r["anchor"]["rr"]["p50_us"]));
            if a50.is_none() {
                continue;
            }
            let s50 = collect(recs, |r| f(&r["service"]["rr"]["p50_us"]));
            let r50 = collect(recs, |r| {
                ratio(
                    f(&r["service"]["rr"]["p50_us"]),
                    f(&r["anchor"]["rr"]["p50_us"]),
                )
            });
            let a99 = collect(recs, |r| f(&r["anchor"]["rr"]["p99_us"]));
            let s99 = collect(recs, |r| f(&r["service"]["rr"]["p99_us"]));
            let r99 = collect(recs, |r| {
                ratio(
                    f(&r["service"]["rr"]["p99_us"]),
                    f(&r["anchor"]["rr"]["p99_us"]),
                )
            });
            let d99 = collect(recs, |r| {
                ratio(
                    f(&r["direct_loaded"]["rr"]["p99_us"]),
                    f(&r["anchor"]["rr"]["p99_us"]),
                )
            });
            let at = collect(recs, |r| f(&r["anchor"]["stream"]["gbit_s"]));
            let st = collect(recs, |r| f(&r["service"]["stream"]["gbit_s"]));
            let rt = collect(recs, |r| {
                ratio(
                    f(&r["service"]["stream"]["gbit_s"]),
                    f(&r["anchor"]["stream"]["gbit_s"]),
                )
            });
            let _ = writeln!(
                s,
                "| {n} | {mode} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                fmt_sum(&a50, 1),
                fmt_sum(&s50, 1),
                fmt_sum(&r50, 3),
                fmt_sum(&a99, 1),
                fmt_sum(&s99, 1),
                fmt_sum(&r99, 3),
                fmt_sum(&d99, 3),
                fmt_sum(&at, 1),
                fmt_sum(&st, 1),
                fmt_sum(&rt, 2)
            );
        }
        s.push('\n');
    }

    // 3
    if let Some(prog) = res["prog"].as_array() {
        let _ = writeln!(
            s,
            "## 3. Programming time (ms, wall time of the command that programs it)\n"
        );
        let _ = writeln!(s, "- all N: iptables-restore --noflush of kube-proxy's full sync (after the base jumps) / `nft -f` of its transaction / `sluicectl apply -f` of N Services + N EndpointSlices.");
        let _ = writeln!(s, "- one change (endpoint B replaced by C in the measured service): iptables \"full\" = kube-proxy's full sync rewriting every chain, \"partial\" = its MinimizeIPTablesRestore sync (KUBE-SERVICES + the changed chains); nftables \"full\" = the proxier's transaction (every map and chain rebuilt), \"partial\" = only the changed chains; sluice \"full\" = `sluicectl apply -f` of the one EndpointSlice (exec + connect + call), \"partial\" = the gRPC Apply call alone on an open connection (median of 5).");
        let _ = writeln!(s, "- delete all N: the sync with no services (iptables: `-X` of every chain; nftables: flush transaction + the later delete-chains transaction, summed) / `sluicectl delete -f`.");
        let _ = writeln!(s, "- a command still running after {} s is killed and reported as timed out (the later steps of that round, which need its state, are skipped).\n", res["config"]["timeout_s"]);
        let _ = writeln!(s, "| N | mode | all N | one change, full | one change, partial / API | delete all N | all N, flushing restore (not kube-proxy's way) |\n|---|---|---|---|---|---|---|");
        let mut g: BTreeMap<(u64, usize, String), Vec<&Value>> = BTreeMap::new();
        for r in prog {
            let mode = r["mode"].as_str().unwrap_or("").to_string();
            g.entry((r["n"].as_u64().unwrap_or(0), mode_rank(&mode), mode))
                .or_default()
                .push(r);
        }
        let cell = |recs: &Vec<&Value>, key: &str, d: usize| -> String {
            let v = fmt_sum(&collect(recs, |r| f(&r[key])), d);
            let tk = format!("{key}_timed_out_s");
            let to: Vec<f64> = recs.iter().filter_map(|r| f(&r[&tk])).collect();
            if to.is_empty() {
                v
            } else if to.len() == recs.len() {
                format!("> {:.0} s (timed out, {}/{})", to[0], to.len(), recs.len())
            } else {
                format!(
                    "{v}; {}/{} timed out > {:.0} s",
                    to.len(),
                    recs.len(),
                    to[0]
                )
            }
        };
        for ((n, _, mode), recs) in &g {
            let partial = if mode == "sluice" {
                "change_api_ms"
            } else {
                "change_partial_ms"
            };
            let flush = if mode.starts_with("iptables") {
                cell(recs, "full_flush_restore_ms", 1)
            } else {
                "–".into()
            };
            let _ = writeln!(
                s,
                "| {n} | {mode} | {} | {} | {} | {} | {flush} |",
                cell(recs, "full_ms", 1),
                cell(recs, "change_full_ms", 2),
                cell(recs, partial, 2),
                cell(recs, "delete_ms", 1),
            );
        }
        s.push('\n');
    }

    // 4
    if let Some(bpf) = res["bpf"].as_array() {
        let _ = writeln!(s, "## 4. BPF cost per packet (BPF_PROG_TEST_RUN, ns)\n");
        let _ = writeln!(
            s,
            "| case | how | 1 frontend | 65,536 frontends | checked |\n|---|---|---|---|---|"
        );
        let mut cases: Vec<String> = vec![];
        for r in bpf {
            let c = r["case"].as_str().unwrap_or("").to_string();
            if !cases.contains(&c) {
                cases.push(c);
            }
        }
        for c in cases {
            let rows: Vec<&Value> = bpf.iter().filter(|r| r["case"] == c.as_str()).collect();
            let at = |fe: u64| {
                collect(
                    &rows
                        .iter()
                        .filter(|r| r["frontends"].as_u64() == Some(fe))
                        .copied()
                        .collect::<Vec<_>>(),
                    |r| f(&r["ns"]),
                )
            };
            let checked = rows.iter().all(|r| r["checked"].as_bool() == Some(true));
            let _ = writeln!(
                s,
                "| {c} | {} | {} | {} | {} |",
                rows[0]["how"].as_str().unwrap_or(""),
                fmt_sum(&at(1), 1),
                fmt_sum(&at(65536), 1),
                if checked {
                    "reason counters match"
                } else {
                    "**counter mismatch**"
                }
            );
        }
        s.push('\n');
    }

    // 5
    if let Some(cni) = res["cni"].as_array() {
        let _ = writeln!(s, "## 5. CNI ADD/DEL latency through cnitool (ms; per round p50/p99 over {} pods, then median over rounds)\n", cni.first().map(|r| r["pods"].clone()).unwrap_or_default());
        let _ = writeln!(
            s,
            "| plugin | verb | parallel | p50 | p99 |\n|---|---|---|---|---|"
        );
        for (plugin, verb, par, recs) in cni_groups(res) {
            let p50 = collect(&recs, |r| samples(r).map(|v| pct_f64(&v, 0.5)));
            let p99 = collect(&recs, |r| samples(r).map(|v| pct_f64(&v, 0.99)));
            let _ = writeln!(
                s,
                "| {plugin} | {} | {par} | {} | {} |",
                verb.to_uppercase(),
                fmt_sum(&p50, 1),
                fmt_sum(&p99, 1)
            );
        }
        s.push('\n');
    }

    // 6
    if let Some(mem) = res["mem"].as_array() {
        let r0 = &mem[0];
        let _ = writeln!(
            s,
            "## 6. sluiced with {} services and {} pods\n",
            r0["services"], r0["pods"]
        );
        let recs: Vec<&Value> = mem.iter().collect();
        let rss = collect(&recs, |r| f(&r["rss_kib"]).map(|k| k / 1024.0));
        let hwm = collect(&recs, |r| f(&r["hwm_kib"]).map(|k| k / 1024.0));
        let empty = collect(&recs, |r| f(&r["rss_kib_empty"]).map(|k| k / 1024.0));
        let restart: Vec<f64> = mem
            .iter()
            .flat_map(|r| {
                r["restart_to_status_ms"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|v| v.as_f64())
            .collect();
        let after: Vec<f64> = mem
            .iter()
            .flat_map(|r| {
                r["rss_kib_after_restart"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|v| v.as_f64())
            .map(|k| k / 1024.0)
            .collect();
        let _ = writeln!(s, "| measure | value |\n|---|---|");
        let _ = writeln!(
            s,
            "| RSS, no pods or services (MiB) | {} |",
            fmt_sum(&empty, 1)
        );
        let _ = writeln!(s, "| RSS (MiB) | {} |", fmt_sum(&rss, 1));
        let _ = writeln!(s, "| peak RSS, VmHWM (MiB) | {} |", fmt_sum(&hwm, 1));
        let _ = writeln!(s, "| restart → `sluicectl status` answers (ms; all restarts) | {} (min {:.0}, max {:.0}) |", fmt_sum(&summary(&restart), 0),
            restart.iter().cloned().fold(f64::INFINITY, f64::min), restart.iter().cloned().fold(0.0, f64::max));
        let _ = writeln!(
            s,
            "| RSS after restart (MiB) | {} |",
            fmt_sum(&summary(&after), 1)
        );
        let upgrade = collect(&recs, |r| f(&r["upgrade_to_status_ms"]));
        let _ = writeln!(
            s,
            "| restart with new programs (an upgrade) → status answers (ms) | {} |",
            fmt_sum(&upgrade, 0)
        );
        s.push('\n');
    }
    s
}

fn samples(r: &Value) -> Option<Vec<f64>> {
    let v: Vec<f64> = r["samples_ms"]
        .as_array()?
        .iter()
        .filter_map(|x| x.as_f64())
        .collect();
    (!v.is_empty()).then_some(v)
}

fn cni_groups(res: &Value) -> Vec<(String, String, u64, Vec<&Value>)> {
    let mut g: BTreeMap<(String, String, u64), Vec<&Value>> = BTreeMap::new();
    for r in res["cni"].as_array().into_iter().flatten() {
        g.entry((
            r["plugin"].as_str().unwrap_or("").to_string(),
            r["verb"].as_str().unwrap_or("").to_string(),
            r["parallel"].as_u64().unwrap_or(0),
        ))
        .or_default()
        .push(r);
    }
    let mut v: Vec<_> = g
        .into_iter()
        .map(|((p, verb, par), r)| (p, verb, par, r))
        .collect();
    // sluice first, ADD before DEL
    v.sort_by_key(|(p, verb, par, _)| (p != "sluice", verb.clone(), *par));
    v
}

fn targets(res: &Value) -> Vec<Target> {
    let mut t = vec![];
    let groups = by_n_mode(res);
    // 1. rate >= 0.97x direct at every N
    let mut worst: Option<(f64, u64)> = None;
    for ((n, _, mode), recs) in &groups {
        if mode != "sluice" {
            continue;
        }
        if let Some(s) = collect(recs, |r| {
            ratio(
                f(&r["service"]["conn"]["rate"]),
                f(&r["anchor"]["conn"]["rate"]),
            )
        }) {
            if worst.is_none_or(|(w, _)| s.median < w) {
                worst = Some((s.median, *n));
            }
        }
    }
    t.push(Target {
        what: "service connection rate ≥ 0.97× direct at every N",
        value: worst
            .map(|(w, n)| format!("worst {w:.3}× (N={n})"))
            .unwrap_or("–".into()),
        met: worst.map(|(w, _)| w >= 0.97),
    });
    // 2. >= 5x iptables-nft at 10k (the largest N measured if 10k was not)
    let nmax = groups.keys().map(|k| k.0).max();
    let vs = nmax.and_then(|n| {
        groups
            .iter()
            .find(|(k, _)| k.0 == n && k.2 == "sluice")
            .and_then(|(_, recs)| {
                collect(recs, |r| {
                    ratio(
                        f(&r["service"]["conn"]["rate"]),
                        svc_rate(res, n, "iptables-nft", r["round"].as_u64()?),
                    )
                })
            })
    });
    t.push(Target {
        what: "service connection rate ≥ 5× iptables-nft at 10k services",
        value: match (&vs, nmax) {
            (Some(s), Some(n)) => format!(
                "{:.2}× at N={n}{}",
                s.median,
                if n < 10000 { " (10k not run)" } else { "" }
            ),
            _ => "–".into(),
        },
        met: vs
            .as_ref()
            .and_then(|s| (nmax == Some(10000)).then_some(s.median >= 5.0)),
    });
    // 3. p50/p99 within 3% of direct
    let mut worst50: Option<f64> = None;
    let mut worst99: Option<f64> = None;
    for ((_, _, mode), recs) in &groups {
        if mode != "sluice" {
            continue;
        }
        if let Some(s) = collect(recs, |r| {
            ratio(
                f(&r["service"]["rr"]["p50_us"]),
                f(&r["anchor"]["rr"]["p50_us"]),
            )
        }) {
            worst50 = Some(worst50.map_or(s.median, |w: f64| w.max(s.median)));
        }
        if let Some(s) = collect(recs, |r| {
            ratio(
                f(&r["service"]["rr"]["p99_us"]),
                f(&r["anchor"]["rr"]["p99_us"]),
            )
        }) {
            worst99 = Some(worst99.map_or(s.median, |w: f64| w.max(s.median)));
        }
    }
    t.push(Target {
        what: "request/response p50 and p99 within 3% of direct",
        value: match (worst50, worst99) {
            (Some(a), Some(b)) => format!("worst p50 {a:.3}×, p99 {b:.3}×"),
            _ => "–".into(),
        },
        met: match (worst50, worst99) {
            (Some(a), Some(b)) => Some(a <= 1.03 && b <= 1.03),
            _ => None,
        },
    });
    // 4/5. programming
    let prog: Vec<&Value> = res["prog"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["mode"] == "sluice")
        .collect();
    let full10k = collect(
        &prog
            .iter()
            .filter(|r| r["n"].as_u64() == Some(10000))
            .copied()
            .collect::<Vec<_>>(),
        |r| f(&r["full_ms"]),
    );
    t.push(Target {
        what: "10k services programmed in ≤ 100 ms",
        value: full10k
            .as_ref()
            .map(|s| format!("{:.0} ms (sluicectl apply)", s.median))
            .unwrap_or("– (10k not run)".into()),
        met: full10k.map(|s| s.median <= 100.0),
    });
    let mut worst_cli: Option<f64> = None;
    let mut worst_api: Option<f64> = None;
    let mut ns: Vec<u64> = prog.iter().filter_map(|r| r["n"].as_u64()).collect();
    ns.sort();
    ns.dedup();
    for n in ns {
        let recs: Vec<&Value> = prog
            .iter()
            .filter(|r| r["n"].as_u64() == Some(n))
            .copied()
            .collect();
        if let Some(s) = collect(&recs, |r| f(&r["change_cli_ms"])) {
            worst_cli = Some(worst_cli.map_or(s.median, |w: f64| w.max(s.median)));
        }
        if let Some(s) = collect(&recs, |r| f(&r["change_api_ms"])) {
            worst_api = Some(worst_api.map_or(s.median, |w: f64| w.max(s.median)));
        }
    }
    t.push(Target {
        what: "one endpoint change ≤ 1 ms at any N",
        value: match (worst_cli, worst_api) {
            (Some(c), Some(a)) => format!("worst: sluicectl apply {c:.2} ms, API call {a:.2} ms"),
            _ => "–".into(),
        },
        met: worst_cli.map(|c| c <= 1.0),
    });
    // 6. established <= 100 ns
    let est: Vec<&Value> = res["bpf"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["case"] == "established")
        .collect();
    let worst_est = est
        .iter()
        .filter_map(|r| f(&r["ns"]))
        .fold(None, |w: Option<f64>, x| Some(w.map_or(x, |w| w.max(x))));
    let med_est = collect(&est, |r| f(&r["ns"]));
    t.push(Target {
        what: "established fast path ≤ 100 ns/packet",
        value: match (&med_est, worst_est) {
            (Some(m), Some(w)) => format!(
                "median {:.1} ns, worst {w:.1} ns (1 and 64k frontends)",
                m.median
            ),
            _ => "–".into(),
        },
        met: med_est.map(|m| m.median <= 100.0),
    });
    // 7. CNI ADD p50 <= ptp+host-local
    let mut cni_val = vec![];
    let mut cni_met = None;
    let groups = cni_groups(res);
    for par in [1u64, 16] {
        let p50 = |plugin: &str| {
            groups
                .iter()
                .find(|(p, v, pa, _)| p == plugin && v == "add" && *pa == par)
                .and_then(|(_, _, _, recs)| collect(recs, |r| samples(r).map(|v| pct_f64(&v, 0.5))))
        };
        if let (Some(a), Some(b)) = (p50("sluice"), p50("ptp+host-local")) {
            cni_val.push(format!(
                "{}: {:.1} vs {:.1} ms",
                if par == 1 {
                    "sequential"
                } else {
                    "16 parallel"
                },
                a.median,
                b.median
            ));
            cni_met = Some(cni_met.unwrap_or(true) && a.median <= b.median);
        }
    }
    t.push(Target {
        what: "CNI ADD p50 ≤ ptp+host-local",
        value: if cni_val.is_empty() {
            "–".into()
        } else {
            cni_val.join("; ")
        },
        met: cni_met,
    });
    // 8. RSS
    let mem: Vec<&Value> = res["mem"].as_array().into_iter().flatten().collect();
    let rss = collect(&mem, |r| f(&r["rss_kib"]).map(|k| k / 1024.0));
    let full_scale = mem
        .first()
        .map(|r| r["services"].as_u64() == Some(10000) && r["pods"].as_u64() == Some(100))
        .unwrap_or(false);
    t.push(Target {
        what: "sluiced RSS ≤ 64 MiB (10k services, 100 pods)",
        value: rss
            .as_ref()
            .map(|s| {
                format!(
                    "{:.1} MiB{}",
                    s.median,
                    if full_scale {
                        ""
                    } else {
                        " (smaller scale run)"
                    }
                )
            })
            .unwrap_or("–".into()),
        met: rss.and_then(|s| full_scale.then_some(s.median <= 64.0)),
    });
    t
}

// ---------------------------------------------------------------------------------------------
// Plots

const COLORS: [RGBColor; 6] = [
    RGBColor(0, 0, 0),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(31, 119, 180),
    RGBColor(148, 103, 189),
];

fn color(name: &str) -> RGBColor {
    COLORS[mode_rank(name.split(' ').next().unwrap_or("")).min(4)]
}

type Series = Vec<(String, Vec<(f64, f64)>)>;

fn line_chart(
    path: &Path,
    title: &str,
    ylabel: &str,
    series: &Series,
    log_y: bool,
    legend: SeriesLabelPosition,
) -> Result<()> {
    let pts: Vec<(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter().copied()).collect();
    if pts.is_empty() {
        return Ok(());
    }
    let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max) * 2.0;
    let ymax = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let ymin_pos = pts
        .iter()
        .map(|p| p.1)
        .filter(|y| *y > 0.0)
        .fold(f64::INFINITY, f64::min);
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut b = ChartBuilder::on(&root);
    b.caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("services (N)")
                .y_desc(ylabel)
                .draw()?;
            for (i, (name, p)) in series.iter().enumerate() {
                let c = if name.contains("direct") && !name.contains("loaded") {
                    COLORS[0]
                } else {
                    color(name)
                };
                let c = if i >= 5 && name.starts_with("sluice") {
                    COLORS[5]
                } else {
                    c
                };
                let dashed = name.contains("partial") || name.contains("API");
                let style = if dashed {
                    c.stroke_width(1)
                } else {
                    c.stroke_width(2)
                };
                chart
                    .draw_series(LineSeries::new(p.clone(), style))?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                chart.draw_series(p.iter().map(|q| Circle::new(*q, 3, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(legend.clone())
                .border_style(BLACK)
                .background_style(WHITE.mix(0.85))
                .draw()?;
        }};
    }
    if log_y {
        draw!(b.build_cartesian_2d(
            (0.7f64..xmax).log_scale(),
            (ymin_pos / 2.0..ymax * 3.0).log_scale()
        )?);
    } else {
        draw!(b.build_cartesian_2d((0.7f64..xmax).log_scale(), 0.0..ymax * 1.15)?);
    }
    root.present()?;
    Ok(())
}

fn bar_chart(
    path: &Path,
    title: &str,
    groups: &[String],
    bars: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    // bars: (series name, per group (p50, p99))
    if groups.is_empty() || bars.is_empty() {
        return Ok(());
    }
    let ymax = bars
        .iter()
        .flat_map(|(_, v)| v.iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (820, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let ng = groups.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..ng, 0.0..ymax.max(1.0))?;
    let gl = groups.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < gl.len() {
                gl[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc("ms (bar: p50, line: p99)")
        .draw()?;
    let nb = bars.len() as f64;
    let palette = [RGBColor(31, 119, 180), RGBColor(255, 127, 14)];
    for (j, (name, v)) in bars.iter().enumerate() {
        let c = palette[j % 2];
        let w = 0.8 / nb;
        chart
            .draw_series(v.iter().enumerate().map(|(i, (p50, _))| {
                let x0 = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.9, *p50)], c.filled())
            }))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], c.filled()));
        chart.draw_series(v.iter().enumerate().map(|(i, (_, p99))| {
            let x0 = i as f64 + 0.1 + j as f64 * w;
            PathElement::new(
                vec![(x0, *p99), (x0 + w * 0.9, *p99)],
                BLACK.stroke_width(2),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes the SVGs next to `stem` (stem-conn-rate.svg, ...); returns their file names.
pub fn plots(res: &Value, dir: &Path, stem: &str) -> Result<Vec<String>> {
    let mut files = vec![];
    let groups = by_n_mode(res);
    // Connection rate vs N: absolute, and as a ratio to direct.
    let mut abs: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut rel: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut anchors: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for ((n, rank, mode), recs) in &groups {
        for r in recs {
            if let Some(a) = f(&r["anchor"]["conn"]["rate"]) {
                anchors.entry(*n).or_default().push(a);
            }
        }
        if mode == "direct" {
            continue;
        }
        if let Some(s) = collect(recs, |r| f(&r["service"]["conn"]["rate"])) {
            abs.entry(format!("{rank}{mode}"))
                .or_default()
                .push((*n as f64, s.median));
        }
        if let Some(s) = collect(recs, |r| {
            ratio(
                f(&r["service"]["conn"]["rate"]),
                f(&r["anchor"]["conn"]["rate"]),
            )
        }) {
            rel.entry(format!("{rank}{mode}"))
                .or_default()
                .push((*n as f64, s.median));
        }
    }
    let strip = |m: BTreeMap<String, Vec<(f64, f64)>>| -> Series {
        m.into_iter()
            .map(|(k, v)| (k[1..].to_string(), v))
            .collect()
    };
    if !anchors.is_empty() {
        let mut a: Series = vec![(
            "direct (no rules)".into(),
            anchors
                .iter()
                .filter_map(|(n, v)| summary(v).map(|s| (*n as f64, s.median)))
                .collect(),
        )];
        a.extend(strip(abs));
        let file = format!("{stem}-conn-rate.svg");
        line_chart(
            &dir.join(&file),
            "New ClusterIP connections per second vs number of services",
            "connections/s (median)",
            &a,
            false,
            SeriesLabelPosition::LowerLeft,
        )?;
        files.push(file);
        let mut r: Series = vec![(
            "direct (no rules)".into(),
            anchors.keys().map(|n| (*n as f64, 1.0)).collect(),
        )];
        r.extend(strip(rel));
        let file = format!("{stem}-conn-ratio.svg");
        line_chart(
            &dir.join(&file),
            "Service connection rate / direct (same round)",
            "ratio (median)",
            &r,
            false,
            SeriesLabelPosition::LowerLeft,
        )?;
        files.push(file);
    }
    // Programming time vs N, log scale.
    if let Some(prog) = res["prog"].as_array() {
        let mut g: BTreeMap<(usize, String), BTreeMap<u64, Vec<&Value>>> = BTreeMap::new();
        for r in prog {
            let mode = r["mode"].as_str().unwrap_or("").to_string();
            g.entry((mode_rank(&mode), mode))
                .or_default()
                .entry(r["n"].as_u64().unwrap_or(0))
                .or_default()
                .push(r);
        }
        let mut full: Series = vec![];
        let mut change: Series = vec![];
        for ((_, mode), byn) in &g {
            let line = |key: &str| -> Vec<(f64, f64)> {
                byn.iter()
                    .filter_map(|(n, recs)| {
                        collect(recs, |r| f(&r[key])).map(|s| (*n as f64, s.median))
                    })
                    .collect()
            };
            full.push((mode.clone(), line("full_ms")));
            if mode == "sluice" {
                change.push(("sluice (sluicectl apply)".into(), line("change_cli_ms")));
                change.push(("sluice API call".into(), line("change_api_ms")));
            } else {
                change.push((format!("{mode} full sync"), line("change_full_ms")));
                change.push((format!("{mode} partial"), line("change_partial_ms")));
            }
        }
        let file = format!("{stem}-prog-all.svg");
        line_chart(
            &dir.join(&file),
            "Time to program all N services (log scale)",
            "ms (median)",
            &full,
            true,
            SeriesLabelPosition::UpperLeft,
        )?;
        files.push(file);
        let file = format!("{stem}-prog-change.svg");
        line_chart(
            &dir.join(&file),
            "Time to program one endpoint change at N services (log scale)",
            "ms (median)",
            &change,
            true,
            SeriesLabelPosition::UpperLeft,
        )?;
        files.push(file);
    }
    // CNI bars.
    let cg = cni_groups(res);
    if !cg.is_empty() {
        let mut groups: Vec<String> = vec![];
        let mut bars: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for verb in ["add", "del"] {
            for par in [1u64, 16] {
                groups.push(format!(
                    "{} {}",
                    verb.to_uppercase(),
                    if par == 1 {
                        "sequential".to_string()
                    } else {
                        format!("{par} parallel")
                    }
                ));
                for plugin in ["sluice", "ptp+host-local"] {
                    let (p50, p99) = cg
                        .iter()
                        .find(|(p, v, pa, _)| p == plugin && v == verb && *pa == par)
                        .map(|(_, _, _, recs)| {
                            (
                                collect(recs, |r| samples(r).map(|v| pct_f64(&v, 0.5)))
                                    .map(|s| s.median)
                                    .unwrap_or(0.0),
                                collect(recs, |r| samples(r).map(|v| pct_f64(&v, 0.99)))
                                    .map(|s| s.median)
                                    .unwrap_or(0.0),
                            )
                        })
                        .unwrap_or((0.0, 0.0));
                    bars.entry(plugin.to_string()).or_default().push((p50, p99));
                }
            }
        }
        let mut bars: Vec<(String, Vec<(f64, f64)>)> = bars.into_iter().collect();
        bars.sort_by_key(|(p, _)| p != "sluice");
        let file = format!("{stem}-cni.svg");
        bar_chart(
            &dir.join(&file),
            "CNI ADD/DEL latency through cnitool",
            &groups,
            &bars,
        )?;
        files.push(file);
    }
    Ok(files)
}
