//! The CNI protocol layer without a kernel: environment, config decoding, version negotiation,
//! every error code, result shapes per version.

use std::collections::HashMap;

use serde_json::{json, Value};
use sluice_cni::error::Code;
use sluice_cni::result::{add_result, expected_from_prev, PodNetwork};
use sluice_cni::spec::{read_env, version_info, Command, NetConf};

fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| m.get(k).cloned()
}

const ADD_ENV: &[(&str, &str)] = &[
    ("CNI_COMMAND", "ADD"),
    ("CNI_CONTAINERID", "abc123"),
    ("CNI_NETNS", "/var/run/netns/cni-1"),
    ("CNI_IFNAME", "eth0"),
    ("CNI_PATH", "/opt/cni/bin"),
    ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u1"),
];

fn with(
    base: &[(&'static str, &'static str)],
    key: &'static str,
    value: Option<&'static str>,
) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = base.iter().copied().filter(|(k, _)| *k != key).collect();
    if let Some(value) = value {
        v.push((key, value));
    }
    v
}

#[test]
fn env_of_a_kubernetes_add_parses_and_keeps_unknown_args() {
    let (cmd, e) = read_env(env(ADD_ENV)).unwrap();
    assert_eq!(cmd, Command::Add);
    assert_eq!(e.container_id, "abc123");
    assert_eq!(e.args["K8S_POD_NAME"], "web-0");
    assert_eq!(e.args["IgnoreUnknown"], "1");
}

#[test]
fn bad_environment_is_code_4() {
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no command", with(ADD_ENV, "CNI_COMMAND", None)),
        (
            "unknown command",
            with(ADD_ENV, "CNI_COMMAND", Some("FROB")),
        ),
        ("no container id", with(ADD_ENV, "CNI_CONTAINERID", None)),
        (
            "bad container id",
            with(ADD_ENV, "CNI_CONTAINERID", Some("-abc")),
        ),
        (
            "slash in container id",
            with(ADD_ENV, "CNI_CONTAINERID", Some("a/b")),
        ),
        ("no ifname", with(ADD_ENV, "CNI_IFNAME", None)),
        (
            "long ifname",
            with(ADD_ENV, "CNI_IFNAME", Some("abcdefghijklmnop")),
        ),
        (
            "ifname with colon",
            with(ADD_ENV, "CNI_IFNAME", Some("eth:0")),
        ),
        ("ifname dot", with(ADD_ENV, "CNI_IFNAME", Some("."))),
        ("no netns on ADD", with(ADD_ENV, "CNI_NETNS", None)),
        (
            "CNI_ARGS without =",
            with(ADD_ENV, "CNI_ARGS", Some("K8S_POD_NAME")),
        ),
    ];
    for (what, e) in cases {
        let err = read_env(env(&e)).expect_err(what);
        assert_eq!(err.code, Code::InvalidEnv, "{what}: {err}");
    }
}

#[test]
fn del_accepts_an_empty_netns_and_version_needs_nothing() {
    let del = with(
        &with(ADD_ENV, "CNI_COMMAND", Some("DEL")),
        "CNI_NETNS",
        Some(""),
    );
    assert_eq!(read_env(env(&del)).unwrap().0, Command::Del);
    assert_eq!(
        read_env(env(&[("CNI_COMMAND", "VERSION")])).unwrap().0,
        Command::Version
    );
    assert_eq!(
        read_env(env(&[("CNI_COMMAND", "STATUS")])).unwrap().0,
        Command::Status
    );
    assert_eq!(
        read_env(env(&[("CNI_COMMAND", "GC")])).unwrap().0,
        Command::Gc
    );
}

#[test]
fn config_defaults_and_known_fields() {
    let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"sluice","type":"sluice","capabilities":{"portMappings":true},"runtimeConfig":{}}"#).unwrap();
    assert_eq!(c.socket, "/run/sluice/sluiced.sock");
    assert_eq!(c.mtu, 1500);
    let c = NetConf::parse(
        br#"{"cniVersion":"1.1.0","name":"n","type":"sluice","socket":"/x.sock","mtu":9000}"#,
    )
    .unwrap();
    assert_eq!((c.socket.as_str(), c.mtu), ("/x.sock", 9000));
}

#[test]
fn decoding_errors_have_the_spec_codes() {
    let cases: &[(&[u8], Code)] = &[
        (b"", Code::Decode),
        (b"{not json", Code::Decode),
        (b"[1,2]", Code::Decode),
        (br#"{"name":"n","type":"sluice"}"#, Code::InvalidConfig),
        (
            br#"{"cniVersion":"1.0.0","type":"sluice"}"#,
            Code::InvalidConfig,
        ),
        (
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice","mtu":"big"}"#,
            Code::InvalidConfig,
        ),
        (
            br#"{"cniVersion":"1.0.0","name":"n","type":"sluice","mtu":10}"#,
            Code::InvalidConfig,
        ),
        (
            br#"{"cniVersion":"1.0.0","name":"","type":"sluice"}"#,
            Code::InvalidConfig,
        ),
        (
            br#"{"cniVersion":"0.3.1","name":"n","type":"sluice"}"#,
            Code::IncompatibleVersion,
        ),
        (
            br#"{"cniVersion":"2.0.0","name":"n","type":"sluice"}"#,
            Code::IncompatibleVersion,
        ),
    ];
    for (stdin, code) in cases {
        let e = NetConf::parse(stdin).expect_err(&String::from_utf8_lossy(stdin));
        assert_eq!(e.code, *code, "{}: {e}", String::from_utf8_lossy(stdin));
    }
}

#[test]
fn status_and_gc_need_1_1_0() {
    let old = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"sluice"}"#).unwrap();
    assert_eq!(
        old.require_at_least_1_1("STATUS").unwrap_err().code,
        Code::IncompatibleVersion
    );
    let new = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"sluice"}"#).unwrap();
    assert!(new.require_at_least_1_1("GC").is_ok());
}

#[test]
fn gc_list_is_read_under_both_keys() {
    let a = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"sluice","cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#).unwrap();
    let b = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"sluice","cni.dev/attachments":[{"containerID":"c1","ifname":"eth0"}]}"#).unwrap();
    let none = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"n","type":"sluice"}"#).unwrap();
    assert_eq!(a.gc_keep_list().unwrap()[0].container_id, "c1");
    assert_eq!(b.gc_keep_list(), a.gc_keep_list());
    assert!(none.gc_keep_list().is_none());
}

#[test]
fn version_echoes_the_request_and_lists_supported_versions() {
    let v: Value =
        serde_json::from_str(&version_info(br#"{"cniVersion":"1.0.0"}"#).unwrap()).unwrap();
    assert_eq!(
        v,
        json!({"cniVersion":"1.0.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]})
    );
    let v: Value = serde_json::from_str(&version_info(b"").unwrap()).unwrap();
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(version_info(b"{").unwrap_err().code, Code::Decode);
}

#[test]
fn error_json_has_code_msg_details() {
    let e = sluice_cni::error::err(Code::TryAgainLater, "daemon down")
        .with_details("connection refused");
    let v: Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
    assert_eq!(
        v,
        json!({"cniVersion":"1.0.0","code":11,"msg":"daemon down","details":"connection refused"})
    );
    assert_eq!(
        sluice_cni::error_version(br#"{"cniVersion":"0.4.0"}"#),
        "0.4.0"
    );
    assert_eq!(sluice_cni::error_version(b"garbage"), "1.1.0");
    assert_eq!(
        sluice_cni::error_version(br#"{"cniVersion":"9.9.9"}"#),
        "1.1.0"
    );
}

fn pod() -> PodNetwork {
    PodNetwork {
        host_ifname: "sl0123456789ab".into(),
        host_mac: "ee:ee:ee:ee:ee:ee".into(),
        ifname: "eth0".into(),
        pod_mac: "02:00:00:00:00:01".into(),
        netns: "/var/run/netns/cni-1".into(),
        mtu: 1500,
        ip: "10.244.0.7".parse().unwrap(),
        gateway: "169.254.1.1".parse().unwrap(),
        default_route: true,
    }
}

#[test]
fn results_per_version() {
    let r04 = add_result("0.4.0", None, &pod());
    assert_eq!(r04["cniVersion"], "0.4.0");
    assert_eq!(
        r04["ips"][0],
        json!({"version":"4","address":"10.244.0.7/32","gateway":"169.254.1.1","interface":1})
    );
    assert!(r04["interfaces"][0].get("mtu").is_none());

    let r10 = add_result("1.0.0", None, &pod());
    assert_eq!(
        r10["ips"][0],
        json!({"address":"10.244.0.7/32","gateway":"169.254.1.1","interface":1})
    );
    assert_eq!(
        r10["routes"],
        json!([{"dst":"0.0.0.0/0","gw":"169.254.1.1"}])
    );
    assert_eq!(r10["interfaces"][1]["sandbox"], "/var/run/netns/cni-1");
    assert_eq!(r10["interfaces"][0]["name"], "sl0123456789ab");

    let r11 = add_result("1.1.0", None, &pod());
    assert_eq!(r11["interfaces"][1]["mtu"], 1500);

    let second = PodNetwork {
        ifname: "net1".into(),
        default_route: false,
        ..pod()
    };
    assert_eq!(
        add_result("1.0.0", None, &second)["routes"],
        json!([]),
        "a second interface adds no default route"
    );
}

#[test]
fn prev_result_passes_through_with_indexes_shifted() {
    let prev = json!({
        "cniVersion":"1.0.0",
        "interfaces":[{"name":"lo0"}],
        "ips":[{"address":"fd00::5/64","interface":0}],
        "routes":[{"dst":"fd00::/8"}],
        "dns":{"nameservers":["10.96.0.10"]}
    });
    let r = add_result("1.0.0", Some(&prev), &pod());
    assert_eq!(r["interfaces"].as_array().unwrap().len(), 3);
    assert_eq!(r["ips"][0]["address"], "fd00::5/64");
    assert_eq!(r["ips"][1]["interface"], 2);
    assert_eq!(r["routes"].as_array().unwrap().len(), 2);
    assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
}

#[test]
fn check_reads_our_interface_from_prev_result() {
    let r = add_result("1.0.0", None, &pod());
    let want = expected_from_prev(&r, "eth0").unwrap();
    assert_eq!(want.mac.as_deref(), Some("02:00:00:00:00:01"));
    assert_eq!(
        want.ips,
        vec![(
            "10.244.0.7".parse().unwrap(),
            32,
            Some("169.254.1.1".parse().unwrap())
        )]
    );
    assert_eq!(
        want.routes,
        vec![(
            "0.0.0.0".parse().unwrap(),
            0,
            Some("169.254.1.1".parse().unwrap())
        )]
    );
    assert_eq!(
        expected_from_prev(&r, "eth9").unwrap_err().code,
        Code::InvalidConfig
    );
}

#[test]
fn host_ifname_is_deterministic_short_and_distinct() {
    use sluice_cni::commands::host_ifname;
    let a = host_ifname("abc", "eth0");
    assert_eq!(a, host_ifname("abc", "eth0"));
    assert_ne!(a, host_ifname("abc", "eth1"));
    assert_ne!(a, host_ifname("abd", "eth0"));
    assert!(a.len() <= 15 && a.starts_with("sl"));
}
