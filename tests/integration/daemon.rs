//! The daemon's life: SIGTERM drains and exits 0, restarts continue counters, SIGHUP reloads,
//! and the uplink refuses what is not secure while keeping every event stored.

use crate::pipeline::{device, expect_state, receive_until, still_floor, tcp_bus};
use crate::support::broker::{subscribe, Broker, Pki, CLIENT_CN};
use crate::support::gateway::{config, uplink_for, Gateway, Received};
use crate::support::tls_floor;
use floorgate::sim::bag;
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_0_and_counters_continue_across_a_restart() {
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    devs[0]
        .bank()
        .with(|t| t.set_u32_abcd(bag::HR_BAGS_DISPENSED, 100));
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-term/events").await;
    let mut gw = Gateway::start(|state, metrics| {
        config(
            "gw-term",
            state,
            metrics,
            &format!(
                "{}{}{}",
                uplink_for(&pki, &broker),
                tcp_bus("lan", tcp),
                device("b", "lan", 1, "bag_dispenser", "50ms")
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b", &gw).await;
    let status = gw
        .terminate(Duration::from_secs(10))
        .expect("exits within the drain deadline");
    assert_eq!(status.code(), Some(0), "{}", gw.log());
    assert!(gw.log().contains("stopped"));
    // The device counts while the gateway is down; the restart reports exactly those.
    devs[0]
        .bank()
        .with(|t| t.set_u32_abcd(bag::HR_BAGS_DISPENSED, 107));
    gw.spawn();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| rx
            .counter_sum("b", "bags_dispensed")
            >= 7)
        .await,
        "{}",
        gw.log()
    );
    let c = rx.of("b", "counter");
    assert_eq!(
        (c[0]["delta"].clone(), c[0]["total"].clone()),
        (7.into(), 107.into())
    );
    rx.assert_seq_identity();
    // What was acknowledged before the stop is recorded durably: the restart sends none of it
    // again.
    assert_eq!(rx.events.len(), rx.seqs().len(), "no event delivered twice");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_config_and_keeps_the_running_one_when_invalid() {
    let (stop, tcp, devs, pki, broker) = tls_floor(2, 0).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-hup/events").await;
    let uplink = uplink_for(&pki, &broker);
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-hup",
            state,
            metrics,
            &format!(
                "{uplink}{}{}",
                tcp_bus("lan", tcp),
                device("b1", "lan", 1, "bag_dispenser", "50ms")
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b1", &gw).await;
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    std::fs::write(
        &gw.config_path,
        format!(
            "{original}{}",
            device("b2", "lan", 2, "bag_dispenser", "50ms")
        ),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    expect_state(&mut sub, &mut rx, "b2", &gw).await;
    std::fs::write(
        &gw.config_path,
        format!("{original}[[device]]\nname = \"b3\"\n"),
    )
    .unwrap();
    gw.signal(libc::SIGHUP);
    gw.expect_log("new configuration rejected", Duration::from_secs(5))
        .await;
    // Still polling with the previous configuration.
    devs[1].bank().with(|t| t.set_u16(bag::HR_STOCK, 250));
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
            .of("b2", "telemetry")
            .iter()
            .any(|e| e["values"]["stock"] == 250))
        .await
    );
    rx.assert_seq_identity();
    let seqs = rx.seqs();
    assert_eq!(
        seqs.len() as u64,
        seqs.last().unwrap() - seqs.first().unwrap() + 1,
        "reloads lose no seq"
    );
    stop.cancel();
}

async fn refused_uplink_keeps_events(
    name: &str,
    uplink: String,
    broker: &Broker,
    expect_in_log: &[&str],
) {
    refused(name, uplink, Some(broker), expect_in_log).await;
}

/// The uplink is refused for the reasons in `expect_in_log`; events stay stored. With a broker
/// that test clients can reach, also checks that nothing was delivered.
async fn refused(name: &str, uplink: String, broker: Option<&Broker>, expect_in_log: &[&str]) {
    let stop = CancellationToken::new();
    let (tcp, _devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let mut sub = match broker {
        Some(b) => Some(subscribe(b, &format!("floorgate/test/{name}/events")).await),
        None => None,
    };
    let gw = Gateway::start(|state, metrics| {
        config(
            name,
            state,
            metrics,
            &format!(
                "{uplink}{}{}",
                tcp_bus("lan", tcp),
                device("b", "lan", 1, "bag_dispenser", "100ms")
            ),
        )
    });
    assert!(
        gw.wait_metric("floorgate_store_events", Duration::from_secs(10), |v| v
            > 0.0)
            .await
            .is_some(),
        "events are kept\n{}",
        gw.log()
    );
    for needle in expect_in_log {
        assert!(
            gw.wait_log(needle, Duration::from_secs(10)).await,
            "log names the cause `{needle}`:\n{}",
            gw.log()
        );
    }
    if let Some(sub) = sub.as_mut() {
        assert!(
            sub.next(Duration::from_millis(500)).await.is_none(),
            "nothing was delivered"
        );
    }
    // Every event committed so far is still stored: none was deleted on a refusal. (Seqs
    // start at 1; the events gauge is read second, so it can only be ahead.)
    let next = gw
        .metric("floorgate_store_next_seq")
        .await
        .expect("next seq");
    let stored = gw.metric("floorgate_store_events").await.expect("events");
    assert!(
        stored >= next - 1.0,
        "{stored} events stored of {} committed\n{}",
        next - 1.0,
        gw.log()
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_or_a_missing_client_certificate_is_refused_and_events_stay_stored() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let wrong_ca = format!(
        "[uplink]\nurl = \"mqtts://localhost:{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        broker.port,
        pki.other_ca().display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    refused_uplink_keeps_events(
        "gw-ca",
        wrong_ca,
        &broker,
        &["invalid peer certificate", "UnknownIssuer"],
    )
    .await;
    let no_cert = format!(
        "[uplink]\nurl = \"mqtts://localhost:{}\"\nca_file = \"{}\"\n",
        broker.port,
        pki.ca_cert.display()
    );
    refused_uplink_keeps_events("gw-nocert", no_cert, &broker, &["CertificateRequired"]).await;
    let wrong_name = format!(
        "[uplink]\nurl = \"mqtts://127.0.0.1:{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        broker.port,
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    // 127.0.0.1 is in the server certificate, so this one must connect: the check is not blanket.
    let stop = CancellationToken::new();
    let (tcp, _d) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-ip",
            state,
            metrics,
            &format!(
                "{wrong_name}{}{}",
                tcp_bus("lan", tcp),
                device("b", "lan", 1, "bag_dispenser", "100ms")
            ),
        )
    });
    gw.expect_log("uplink connected", Duration::from_secs(10))
        .await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_denies_publishing_keeps_events_buffered() {
    let pki = Pki::generate();
    let broker = Broker::builder()
        .tls(&pki)
        .deny_publish_for(CLIENT_CN, "floorgate/+/+/events")
        .start();
    let uplink = uplink_for(&pki, &broker);
    refused_uplink_keeps_events(
        "gw-acl",
        uplink,
        &broker,
        &["broker refused a publish", "NotAuthorized"],
    )
    .await;
}

#[test]
fn plaintext_and_exposed_keys_are_refused_at_start_with_exit_78() {
    let pki = Pki::generate();
    let dir = tempfile::tempdir().unwrap();
    let run = |text: String| {
        let path = dir.path().join("f.toml");
        std::fs::write(&path, text).unwrap();
        Command::new(env!("CARGO_BIN_EXE_floorgate"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let base = format!(
        "[gateway]\nid = \"g\"\nstate_dir = \"{}\"\n[metrics]\nlisten = \"off\"\n",
        dir.path().join("s").display()
    );
    let out = run(format!("{base}[uplink]\nurl = \"mqtt://127.0.0.1:1883\"\n"));
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("plaintext mqtt:// is refused"));
    let key = dir.path().join("client.key");
    std::fs::copy(&pki.client_key, &key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = run(format!(
        "{base}[uplink]\nurl = \"mqtts://localhost:1\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        pki.ca_cert.display(),
        pki.client_cert.display(),
        key.display()
    ));
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by group/others") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains("BEGIN"), "no key material in the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_a_wrong_host_name_and_a_plaintext_broker_are_refused() {
    let pki = Pki::generate();
    let uplink = |port: u16| {
        format!(
            "[uplink]\nurl = \"mqtts://localhost:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            pki.ca_cert.display(),
            pki.client_cert.display(),
            pki.client_key.display()
        )
    };
    let (cert, key) = pki.issue_server_expired();
    let expired = Broker::builder().tls(&pki).server_cert(&cert, &key).start();
    refused(
        "gw-exp",
        uplink(expired.port),
        None,
        &["certificate expired"],
    )
    .await;
    let (cert, key) = pki.issue_server(&["other.example"], None, None);
    let misnamed = Broker::builder().tls(&pki).server_cert(&cert, &key).start();
    refused(
        "gw-name",
        uplink(misnamed.port),
        None,
        &["certificate not valid for name"],
    )
    .await;
    let plain = Broker::start_plain();
    refused("gw-plain", uplink(plain.port), None, &["TLS"]).await;
}
