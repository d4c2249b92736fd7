//! `sluice`: the CNI plugin binary. Reads CNI_* and stdin, runs one verb, prints the result or the
//! spec's error JSON on stdout. Logs go to stderr only (SLUICE_LOG=debug for more).

use std::io::{Read, Write};
use std::process::ExitCode;

use sluice_cni::spec::read_env;

fn main() -> ExitCode {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_target(false)
        .init();

    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Err(e) => Err(sluice_cni::error::CniError::from(e)),
        Ok(_) => read_env(|k| std::env::var(k).ok()).and_then(|(command, env)| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(sluice_cni::error::CniError::from)?
                .block_on(sluice_cni::run(command, &env, &stdin))
        }),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(Some(json)) => {
            let _ = writeln!(out, "{json}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code as u32, "{e}");
            let _ = writeln!(out, "{}", e.to_json(&sluice_cni::error_version(&stdin)));
            ExitCode::FAILURE
        }
    }
}
