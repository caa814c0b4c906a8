//! Operating a gateway: `status`, `buffer` and the metrics endpoint against a running daemon.

use crate::pipeline::{device, expect_state, receive_until, rtu_bus, still_floor, tcp_bus};
use crate::support::broker::{subscribe, Broker, Pki};
use crate::support::gateway::{config, uplink_tls, Gateway, Received};
use crate::support::proxy::Proxy;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs `floorgate ARGS --config` against the gateway's configuration.
pub(crate) fn floorgate(gw: &Gateway, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(args)
        .arg("--config")
        .arg(&gw.config_path)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_buffer_and_metrics_show_what_the_floor_is_doing() {
    let stop = CancellationToken::new();
    let (tcp, tdevs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let (pty, rdevs) = still_floor(2, 0).start_pty(stop.clone()).unwrap();
    rdevs[1].update_faults(|f| f.silent = true);
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into()).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-op/events").await;
    let mut gw = Gateway::start(|state, metrics| {
        config(
            "gw-op",
            state,
            metrics,
            &format!(
                "{}{}{}{}{}{}",
                uplink_tls(&pki, proxy.port),
                tcp_bus("lan", tcp),
                rtu_bus("rs485", &pty, "100ms"),
                device("t1", "lan", 1, "bag_dispenser", "100ms"),
                device("r1", "rs485", 1, "bag_dispenser", "100ms"),
                device("dead", "rs485", 2, "bag_dispenser", "100ms"),
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "r1", &gw).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let st = json(&floorgate(&gw, &["status", "--json"]));
    assert_eq!(st["gateway"], "gw-op");
    assert_eq!(st["devices"]["t1"]["online"], true);
    assert_eq!(st["devices"]["r1"]["online"], true);
    assert_eq!(st["devices"]["dead"]["online"], false);
    assert_eq!(st["devices"]["dead"]["last_error"], "timeout");
    assert!(st["buses"]["rs485"]["timeouts"].as_u64().unwrap() >= 1);
    assert!(st["buses"]["lan"]["transactions"].as_u64().unwrap() >= 5);
    assert_eq!(st["uplink"]["connected"], true);
    assert!(st["uplink"]["last_puback_ms"].as_u64().is_some());
    let table = floorgate(&gw, &["status"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("dead") && text.contains("offline") && text.contains("uplink  connected"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt;
    let sock = gw.dir.path().join("state/control.sock");
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The retained health message gives the cloud the floor at a glance.
    let mut health = subscribe(&broker, "floorgate/test/gw-op/health").await;
    let (_, payload, _) = health
        .next(Duration::from_secs(10))
        .await
        .expect("retained health message");
    let h: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(h["gateway"], "gw-op");
    assert_eq!(h["devices"]["total"], 3);
    assert!(h["backlog"]["events"].is_u64());

    // Metrics an operator needs.
    assert!(gw.metric("floorgate_uplink_publishes_total").await.unwrap() >= 1.0);
    assert!(
        gw.metric("floorgate_bus_errors_total{bus=\"rs485\",device=\"dead\",kind=\"timeout\"}")
            .await
            .unwrap()
            >= 1.0
    );
    assert_eq!(
        gw.metric("floorgate_device_online{device=\"t1\"}").await,
        Some(1.0)
    );

    // Buffer: cut the uplink so events pile up, then inspect, export and purge them.
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tdevs[0]
        .bank()
        .with(|t| t.set_u16(floorgate::sim::bag::HR_STATUS, 3));
    let piled = gw
        .wait_metric("floorgate_store_events", Duration::from_secs(10), |v| {
            v >= 1.0
        })
        .await;
    assert!(piled.is_some(), "{}", gw.log());
    let stats = json(&floorgate(&gw, &["buffer", "stats", "--json"]));
    let n = stats["events"].as_u64().unwrap();
    assert!(n >= 1, "{stats}");
    let export = floorgate(&gw, &["buffer", "export"]);
    assert!(export.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() as u64 >= n);
    assert!(
        lines
            .iter()
            .any(|e| e["device"] == "t1" && e["values"]["status"] == 3),
        "the state change is in the export"
    );
    let refused = floorgate(&gw, &["buffer", "purge"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let purged = json(&floorgate(&gw, &["buffer", "purge", "--yes", "--json"]));
    let count = purged["purged"].as_u64().unwrap();
    assert!(count >= n);
    proxy.restore();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| rx
            .events
            .iter()
            .any(|e| e["kind"] == "gap" && e["dropped"].as_u64() == Some(count)))
        .await,
        "the purge is reported to the cloud as a gap\n{}",
        gw.log()
    );
    // With the daemon stopped, the buffer is read from the store directly.
    assert_eq!(
        gw.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    let stats = json(&floorgate(&gw, &["buffer", "stats", "--json"]));
    assert!(stats["next_seq"].as_u64().unwrap() > 1);
    let down = floorgate(&gw, &["status"]);
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("cannot reach the daemon"));
    stop.cancel();
}
