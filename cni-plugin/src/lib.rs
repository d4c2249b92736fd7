//! The sluice CNI plugin: protocol (spec), verbs (commands), netlink, results.
//! `main.rs` reads the environment and stdin and dispatches; this library holds the rest so the
//! protocol layer is unit-tested without a kernel.

pub mod commands;
pub mod error;
pub mod netlink;
pub mod result;
pub mod spec;

use error::Result;
use spec::{Command, Env, NetConf};

/// Runs one invocation. Ok(Some(json)) is printed on stdout; Ok(None) prints nothing.
pub async fn run(command: Command, env: &Env, stdin: &[u8]) -> Result<Option<String>> {
    if command == Command::Version {
        return spec::version_info(stdin).map(Some);
    }
    let conf = NetConf::parse(stdin)?;
    match command {
        Command::Add => commands::add(env, &conf).await.map(|v| Some(v.to_string())),
        Command::Del => commands::del(env, &conf).await.map(|()| None),
        Command::Check => commands::check(env, &conf).await.map(|()| None),
        Command::Status => {
            conf.require_at_least_1_1("STATUS")?;
            commands::status(&conf).await.map(|()| None)
        }
        Command::Gc => {
            conf.require_at_least_1_1("GC")?;
            commands::gc(&conf).await.map(|()| None)
        }
        Command::Version => unreachable!(),
    }
}

/// The cniVersion to put on an error: the config's if stdin has one, else the newest we speak.
pub fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(str::to_string)
        })
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::LATEST.to_string())
}
