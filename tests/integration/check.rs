//! `floorgate check`: one line per check, and each failing condition is named.

use crate::support::broker::{Broker, Pki};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

fn check(dir: &Path, uplink: &str, bus: &str) -> (Output, serde_json::Value) {
    let path = dir.join("f.toml");
    std::fs::write(
        &path,
        format!("[gateway]\nid = \"gw-check\"\nstate_dir = \"{}\"\n[metrics]\nlisten = \"off\"\n{uplink}\n{bus}", dir.join("state").display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["check", "--json", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, v)
}

fn level_of<'a>(v: &'a serde_json::Value, name: &str) -> (&'a str, &'a str) {
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {v}"));
    (c["level"].as_str().unwrap(), c["detail"].as_str().unwrap())
}

fn uplink(port: u16, ca: &Path, cert: &Path, key: &Path) -> String {
    format!("[uplink]\nurl = \"mqtts://localhost:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n", ca.display(), cert.display(), key.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_good_setup_and_names_each_failing_condition() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let dir = tempfile::tempdir().unwrap();
    let good = uplink(broker.port, &pki.ca_cert, &pki.client_cert, &pki.client_key);
    let (out, v) = check(dir.path(), &good, "");
    assert!(
        out.status.success(),
        "{v}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(level_of(&v, "broker").0, "ok");
    assert_eq!(level_of(&v, "certificate client").0, "ok");
    assert_eq!(level_of(&v, "state dir").0, "ok");

    // A serial port that does not exist.
    let (out, v) = check(
        dir.path(),
        &good,
        "[[bus]]\nname = \"rs485\"\nrtu = { port = \"/dev/ttyUSB-nope\" }\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let (lvl, detail) = level_of(&v, "serial rs485");
    assert_eq!(lvl, "fail");
    assert!(detail.contains("does not exist"), "{detail}");

    // A world-readable key.
    let key = dir.path().join("open.key");
    std::fs::copy(&pki.client_key, &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (out, v) = check(
        dir.path(),
        &uplink(broker.port, &pki.ca_cert, &pki.client_cert, &key),
        "",
    );
    assert!(!out.status.success());
    let (lvl, detail) = level_of(&v, "key");
    assert_eq!(lvl, "fail");
    assert!(detail.contains("chmod 600"), "{detail}");

    // An expired client certificate, and one that expires soon.
    let (old_cert, old_key) = pki.issue_client(
        "gw-old",
        Some(SystemTime::now() - Duration::from_secs(86_400)),
    );
    let (out, v) = check(
        dir.path(),
        &uplink(broker.port, &pki.ca_cert, &old_cert, &old_key),
        "",
    );
    assert!(!out.status.success());
    let (lvl, detail) = level_of(&v, "certificate client");
    assert_eq!(lvl, "fail");
    assert!(detail.contains("expired"), "{detail}");
    let (soon_cert, soon_key) = pki.issue_client(
        "gw-soon",
        Some(SystemTime::now() + Duration::from_secs(10 * 86_400)),
    );
    let (_, v) = check(
        dir.path(),
        &uplink(broker.port, &pki.ca_cert, &soon_cert, &soon_key),
        "",
    );
    let (lvl, detail) = level_of(&v, "certificate client");
    assert_eq!(lvl, "warn");
    assert!(detail.contains("expires in"), "{detail}");

    // The wrong CA: the broker's certificate is not trusted.
    let (out, v) = check(
        dir.path(),
        &uplink(
            broker.port,
            &pki.other_ca(),
            &pki.client_cert,
            &pki.client_key,
        ),
        "",
    );
    assert!(!out.status.success());
    let (lvl, detail) = level_of(&v, "broker");
    assert_eq!(lvl, "fail");
    assert!(
        detail.contains("UnknownIssuer") || detail.contains("invalid peer certificate"),
        "{detail}"
    );

    // The broker is down.
    let port = crate::support::gateway::free_port();
    let (out, v) = check(
        dir.path(),
        &uplink(port, &pki.ca_cert, &pki.client_cert, &pki.client_key),
        "",
    );
    assert!(!out.status.success());
    let (lvl, detail) = level_of(&v, "broker");
    assert_eq!(lvl, "fail");
    assert!(detail.to_lowercase().contains("refused"), "{detail}");

    // An invalid configuration is exit 78.
    std::fs::write(dir.path().join("bad.toml"), "[gateway]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("bad.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}
