//! sluice against the conformance suite: every case passes, the daemon-down ones included
//! (sluiced is started and stopped by conformance/hooks/sluiced.sh).

mod common;

#[test]
fn sluice_passes_every_case() {
    let bin = common::sluice_bin_dir();
    let mut args = vec![
        "--cni-path".to_string(),
        format!("{}:/usr/lib/cni", bin.display()),
        "--conflist".into(),
        common::conflist("sluice.conflist").display().to_string(),
    ];
    args.extend(common::sluice_hook_args());
    let run = common::run_suite(
        "sluice",
        &args,
        &[("SLUICE_BIN_DIR", bin.display().to_string())],
    );
    let not_passed: Vec<String> = run
        .with("fail")
        .into_iter()
        .chain(run.with("n/a"))
        .collect();
    assert!(
        not_passed.is_empty(),
        "sluice: cases not passing: {not_passed:?}\n{}",
        run.table
    );
    assert_eq!(run.code, Some(0), "exit code\n{}", run.table);
}
