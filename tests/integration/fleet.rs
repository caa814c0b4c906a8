//! `floorgate fleet keygen|push` against a real mosquitto (mTLS); the tests play the gateways.

use crate::support::broker::{publish, subscribe, Broker, Pki, Subscriber};
use floorgate::uplink::remote::{self, ConfigSet};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

const SITE: &str = "north";
const TOML: &str = "[gateway]\nid = \"gw\"\nsite = \"north\"\n\n[store]\nmax_bytes = \"64MiB\"\n";

async fn floorgate(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A key pair made by `floorgate fleet keygen` and the TOML file to push, in a temp dir.
struct Setup {
    _dir: tempfile::TempDir,
    key: PathBuf,
    public: [u8; 32],
    file: PathBuf,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    let out = floorgate(&["fleet", "keygen", key.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    let public = remote::decode_public_key(
        &std::fs::read_to_string(dir.path().join("fleet.key.pub")).unwrap(),
    )
    .unwrap();
    let file = dir.path().join("floor.toml");
    std::fs::write(&file, TOML).unwrap();
    Setup {
        _dir: dir,
        key,
        public,
        file,
    }
}

/// `fleet push` arguments for `broker` with the test PKI's client certificate.
fn push_args(pki: &Pki, broker: &Broker, s: &Setup, version: u64, target: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "fleet",
        "push",
        "--broker",
        &format!("mqtts://localhost:{}", broker.port),
        "--ca-file",
        pki.ca_cert.to_str().unwrap(),
        "--cert-file",
        pki.client_cert.to_str().unwrap(),
        "--key-file",
        pki.client_key.to_str().unwrap(),
        "--key",
        s.key.to_str().unwrap(),
        "--site",
        SITE,
        "--version",
        &version.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(target.iter().map(|s| s.to_string()));
    v.push(s.file.to_str().unwrap().to_string());
    v
}

async fn push(args: &[String]) -> Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    floorgate(&args).await
}

fn gw_topic(gw: &str, sub: &str) -> String {
    format!("floorgate/{SITE}/{gw}/{sub}")
}

/// Plays one gateway: waits for one `config/set` message, checks its signature with `public`
/// and answers with a retained `config/state` carrying `status`. Returns what it received.
async fn fake_gateway(
    broker: &Broker,
    mut sub: Subscriber,
    gw: &str,
    public: [u8; 32],
    status: &str,
) -> ConfigSet {
    let (topic, payload, _) = sub
        .next(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("{gw}: no config/set received"));
    let set: ConfigSet = serde_json::from_slice(&payload).unwrap();
    remote::verify(&public, set.version, &set.toml, set.sig.as_deref().unwrap())
        .unwrap_or_else(|e| panic!("{gw}: signature on {topic}: {e}"));
    let error = (status != "applied").then(|| format!("{gw}: health gate failed"));
    let answer = json!({"version": set.version, "status": status, "error": error});
    publish(
        broker,
        &gw_topic(gw, "config/state"),
        answer.to_string(),
        true,
    )
    .await;
    set
}

/// Table rows as (gateway, status, error).
fn rows(out: &Output) -> Vec<(String, String, String)> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("GATEWAY") && header.contains("STATUS") && header.contains("ERROR"),
        "{}",
        text(out)
    );
    lines
        .map(|l| {
            let mut parts = l.split_whitespace();
            let gw = parts.next().unwrap().to_string();
            let status = parts.next().unwrap().to_string();
            let error = parts.collect::<Vec<_>>().join(" ");
            (gw, status, error)
        })
        .collect()
}

fn status_of(rows: &[(String, String, String)], gw: &str) -> String {
    rows.iter()
        .find(|r| r.0 == gw)
        .unwrap_or_else(|| panic!("no row for {gw}: {rows:?}"))
        .1
        .clone()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keygen_writes_a_private_key_0600_and_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("fleet.key");
    let out = floorgate(&["fleet", "keygen", key.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mode(&key), 0o600);
    let public_text = std::fs::read_to_string(dir.path().join("fleet.key.pub")).unwrap();
    let public = remote::decode_public_key(&public_text).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("config_public_key = \"{}\"", public_text.trim())),
        "{stdout}"
    );
    // The private key is the base64 seed of that public key.
    let private_text = std::fs::read_to_string(&key).unwrap();
    use base64::Engine as _;
    let seed: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(private_text.trim())
        .unwrap()
        .try_into()
        .unwrap();
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    assert_eq!(signing.verifying_key().to_bytes(), public);

    // No silent overwrite; --force replaces both files.
    let out = floorgate(&["fleet", "keygen", key.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(&key).unwrap(), private_text);
    let out = floorgate(&["fleet", "keygen", "--force", key.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", text(&out));
    assert_ne!(std::fs::read_to_string(&key).unwrap(), private_text);
    assert_eq!(mode(&key), 0o600);

    // A signing key readable by others is refused before anything is sent.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, TOML).unwrap();
    let out = floorgate(&[
        "fleet",
        "push",
        "--broker",
        "mqtts://127.0.0.1:1",
        "--key",
        key.to_str().unwrap(),
        "--site",
        SITE,
        "--gateway",
        "gw-1",
        "--version",
        "1",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_one_gateway_reports_applied() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let s = setup().await;
    // A retained answer of an older version must not be taken for this push's outcome.
    publish(
        &broker,
        &gw_topic("gw-1", "config/state"),
        r#"{"version":6,"status":"applied","error":null}"#,
        true,
    )
    .await;
    let sub = subscribe(&broker, &gw_topic("gw-1", "config/set")).await;
    let args = push_args(&pki, &broker, &s, 7, &["--gateway", "gw-1"]);
    let (out, set) = tokio::join!(
        push(&args),
        fake_gateway(&broker, sub, "gw-1", s.public, "applied")
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(set.version, 7);
    assert_eq!(set.toml, TOML);
    let rows = rows(&out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0], ("gw-1".into(), "applied".into(), "-".into()));

    // The same with --json, for version 8.
    let sub = subscribe(&broker, &gw_topic("gw-1", "config/set")).await;
    let mut args = push_args(&pki, &broker, &s, 8, &["--gateway", "gw-1"]);
    args.insert(2, "--json".into());
    let (out, _) = tokio::join!(
        push(&args),
        fake_gateway(&broker, sub, "gw-1", s.public, "applied")
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["version"], 8);
    assert_eq!(v["results"][0]["gateway"], "gw-1");
    assert_eq!(v["results"][0]["status"], "applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_canary_stops_the_group_push() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let s = setup().await;
    let group_topic = format!("floorgate/{SITE}/groups/floor2/config/set");
    let mut group = subscribe(&broker, &group_topic).await;
    let mut others = subscribe(&broker, &format!("floorgate/{SITE}/+/config/set")).await;
    let gw_a = subscribe(&broker, &gw_topic("gw-a", "config/set")).await;
    let args = push_args(
        &pki,
        &broker,
        &s,
        3,
        &[
            "--group",
            "floor2",
            "--members",
            "gw-a,gw-b,gw-c",
            "--canary",
            "1",
            "--timeout",
            "20s",
        ],
    );
    let (out, set) = tokio::join!(
        push(&args),
        fake_gateway(&broker, gw_a, "gw-a", s.public, "rolled_back")
    );
    assert_eq!(set.version, 3);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let rows = rows(&out);
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(status_of(&rows, "gw-a"), "rolled_back");
    assert!(rows[0].2.contains("health gate failed"), "{rows:?}");
    assert_eq!(status_of(&rows, "gw-b"), "skipped");
    assert_eq!(status_of(&rows, "gw-c"), "skipped");
    // Nothing went to the group topic, and only gw-a's own topic got the config.
    assert_eq!(group.next(Duration::from_millis(500)).await, None);
    let sets = others.topics_within(Duration::from_millis(500)).await;
    assert_eq!(sets, vec![gw_topic("gw-a", "config/set")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_canary_lets_the_group_push_go_on() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let s = setup().await;
    let group_topic = format!("floorgate/{SITE}/groups/floor2/config/set");
    let mut own = subscribe(&broker, &format!("floorgate/{SITE}/+/config/set")).await;
    let gw_a = subscribe(&broker, &gw_topic("gw-a", "config/set")).await;
    let gw_b = subscribe(&broker, &group_topic).await;
    let gw_c = subscribe(&broker, &group_topic).await;
    let mut args = push_args(
        &pki,
        &broker,
        &s,
        4,
        &[
            "--group",
            "floor2",
            "--members",
            "gw-a,gw-b,gw-c",
            "--canary",
            "1",
            "--timeout",
            "20s",
        ],
    );
    args.insert(2, "--json".into());
    let (out, a, b, c) = tokio::join!(
        push(&args),
        fake_gateway(&broker, gw_a, "gw-a", s.public, "applied"),
        fake_gateway(&broker, gw_b, "gw-b", s.public, "applied"),
        fake_gateway(&broker, gw_c, "gw-c", s.public, "rejected"),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!((a.version, b.version, c.version), (4, 4, 4));
    assert_eq!(a.sig, b.sig);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], false);
    let results = v["results"].as_array().unwrap();
    let st: Vec<(&str, &str, bool)> = results
        .iter()
        .map(|r| {
            (
                r["gateway"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
                r["canary"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        st,
        vec![
            ("gw-a", "applied", true),
            ("gw-b", "applied", false),
            ("gw-c", "rejected", false)
        ]
    );
    assert_eq!(results[2]["error"], "gw-c: health gate failed");
    let sets = own.topics_within(Duration::from_millis(500)).await;
    assert_eq!(sets, vec![gw_topic("gw-a", "config/set")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_answering_times_out() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let s = setup().await;
    // A stale retained answer for the same version (an earlier push) is not this push's answer;
    // the retained status tells the operator why nobody answered.
    publish(
        &broker,
        &gw_topic("gw-9", "config/state"),
        r#"{"version":5,"status":"applied","error":null}"#,
        true,
    )
    .await;
    publish(
        &broker,
        &gw_topic("gw-9", "status"),
        r#"{"state":"offline"}"#,
        true,
    )
    .await;
    let mut set = subscribe(&broker, &gw_topic("gw-9", "config/set")).await;
    let args = push_args(
        &pki,
        &broker,
        &s,
        5,
        &["--gateway", "gw-9", "--timeout", "2s"],
    );
    let started = std::time::Instant::now();
    let out = push(&args).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    let rows = rows(&out);
    assert_eq!(rows[0].0, "gw-9");
    assert_eq!(rows[0].1, "timeout", "{rows:?}");
    assert!(rows[0].2.contains("offline"), "{rows:?}");
    // The config was published (not retained) once.
    let (_, payload, retained) = set.next(Duration::from_secs(2)).await.unwrap();
    assert!(!retained);
    let got: ConfigSet = serde_json::from_slice(&payload).unwrap();
    assert_eq!(got.version, 5);

    // A gateway nobody subscribed for cannot answer: the broker says so and push does not wait.
    let args = push_args(
        &pki,
        &broker,
        &s,
        5,
        &["--gateway", "gw-10", "--timeout", "60s"],
    );
    let started = std::time::Instant::now();
    let out = push(&args).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(15));
    let table = self::rows(&out);
    assert_eq!(table[0].1, "timeout", "{table:?}");
    assert!(table[0].2.contains("no client is subscribed"), "{table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_given_while_the_pusher_was_disconnected_is_found_after_reconnecting() {
    let pki = Pki::generate();
    let mut broker = Broker::start_tls(&pki);
    let s = setup().await;
    let mut sub = subscribe(&broker, &gw_topic("gw-r", "config/set")).await;
    let args = push_args(
        &pki,
        &broker,
        &s,
        11,
        &["--gateway", "gw-r", "--timeout", "30s"],
    );
    let gateway = async {
        let (_, payload, _) = sub.next(Duration::from_secs(30)).await.unwrap();
        let set: ConfigSet = serde_json::from_slice(&payload).unwrap();
        set.verify(&s.public).unwrap();
        // The broker goes away under the waiting pusher; the retained answer is published
        // as soon as it is back.
        broker.restart();
        let answer = json!({"version": set.version, "status": "applied", "error": null});
        publish(
            &broker,
            &gw_topic("gw-r", "config/state"),
            answer.to_string(),
            true,
        )
        .await;
    };
    let (out, ()) = tokio::join!(push(&args), gateway);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(self::rows(&out)[0].1, "applied");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connection lost"),
        "{}",
        text(&out)
    );
}
