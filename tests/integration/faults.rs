//! Fault injection: a full store, a misbehaving network, a hung pipeline. Short variants run in
//! CI; `FLOORGATE_LONG_FAULTS=1` makes them longer.

use crate::pipeline::{device, receive_until, still_floor, tcp_bus};
use crate::support::broker::{subscribe, Broker, Pki};
use crate::support::gateway::{config, uplink_tls, Gateway, Received};
use crate::support::proxy::Proxy;
use floorgate::sim::bag;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn long() -> bool {
    std::env::var_os("FLOORGATE_LONG_FAULTS").is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_sheds_telemetry_first_keeps_counters_and_reports_exact_gaps() {
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let start_count = devs[0]
        .bank()
        .with(|t| t.get_u32_abcd(bag::HR_BAGS_DISPENSED)) as u64;
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into()).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-full/events").await;
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-full",
            state,
            metrics,
            &format!(
                "{}{}{}",
                uplink_tls(&pki, proxy.port),
                tcp_bus("lan", tcp),
                device("b", "lan", 1, "bag_dispenser", "10ms")
            ),
        )
        .replace(
            "commit_interval = \"20ms\"",
            "commit_interval = \"20ms\"\nmax_bytes = \"64KiB\"",
        )
    });
    let mut rx = Received::default();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| !rx
            .of("b", "state")
            .is_empty())
        .await,
        "{}",
        gw.log()
    );
    proxy.cut();
    // Mostly telemetry (the stock moves every step), a counter increment every 25th step.
    let steps = if long() { 30_000 } else { 3_000 };
    for i in 0..steps {
        devs[0].bank().with(|t| {
            t.set_u16(bag::HR_STOCK, (i % 2) as u16 * 100 + 50);
            t.set_input_i16(bag::IR_TEMPERATURE, if i % 2 == 0 { 100 } else { 300 });
            if i % 25 == 0 {
                let c = t.get_u32_abcd(bag::HR_BAGS_DISPENSED);
                t.set_u32_abcd(bag::HR_BAGS_DISPENSED, c + 1);
            }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let dropped = gw
        .wait_metric("floorgate_store_dropped", Duration::from_secs(10), |v| {
            v > 0.0
        })
        .await;
    assert!(dropped.is_some(), "the store overflowed\n{}", gw.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
    let want = devs[0]
        .bank()
        .with(|t| t.get_u32_abcd(bag::HR_BAGS_DISPENSED)) as u64
        - start_count;
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(20), |rx| rx
            .counter_sum("b", "bags_dispensed")
            >= want)
        .await,
        "every counter increment survives a full store: got {} of {want}\n{}",
        rx.counter_sum("b", "bags_dispensed"),
        gw.log()
    );
    assert!(gw
        .wait_metric("floorgate_store_events", Duration::from_secs(10), |v| v
            == 0.0)
        .await
        .is_some());
    receive_until(&mut sub, &mut rx, Duration::from_millis(500), |_| false).await;
    assert_eq!(rx.counter_sum("b", "bags_dispensed"), want);
    rx.assert_seq_identity();
    let gaps: Vec<&serde_json::Value> = rx.events.iter().filter(|e| e["kind"] == "gap").collect();
    assert!(!gaps.is_empty(), "drops are reported");
    let seqs = rx.seqs();
    let (lo, hi) = (*seqs.first().unwrap(), *seqs.last().unwrap());
    let missing = (hi - lo + 1) - seqs.len() as u64;
    let mut reported = std::collections::BTreeMap::new();
    for g in &gaps {
        reported.insert(g["seq"].as_u64().unwrap(), g["dropped"].as_u64().unwrap());
    }
    // Every missing seq is inside a reported gap; a dropped event whose PUBACK was lost in the
    // cut may still have reached the broker, so the count can exceed the holes by what was in flight.
    let total: u64 = reported.values().sum();
    assert!(
        total >= missing && total - missing <= 64 * 50,
        "gap events account for every missing seq: {total} reported, {missing} missing"
    );
    let ranges: Vec<(u64, u64)> = gaps
        .iter()
        .map(|g| {
            (
                g["first_seq"].as_u64().unwrap(),
                g["last_seq"].as_u64().unwrap(),
            )
        })
        .collect();
    for s in lo..=hi {
        if !seqs.contains(&s) {
            assert!(
                ranges.iter().any(|(a, b)| (*a..=*b).contains(&s)),
                "seq {s} is missing without a gap event"
            );
        }
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_pipeline_stops_the_watchdog_pings() {
    use std::os::unix::net::UnixDatagram;
    let stop = CancellationToken::new();
    let (tcp, _devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let text = config(
        "gw-wd",
        &dir.path().join("state"),
        crate::support::gateway::free_port(),
        &format!(
            "{}{}",
            tcp_bus("lan", tcp).replace(
                "timeout = \"300ms\"",
                "timeout = \"300ms\"\nbackoff_max = \"1s\""
            ),
            device("b", "lan", 1, "bag_dispenser", "100ms")
        ),
    );
    let path = dir.path().join("f.toml");
    std::fs::write(&path, text).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["run", "--config"])
        .arg(&path)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("FLOORGATE_FAULT_HANG_BUS", "lan")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut msgs: Vec<(std::time::Instant, String)> = Vec::new();
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 256];
    while t0.elapsed() < Duration::from_secs(25) {
        if let Ok(n) = sock.recv(&mut buf) {
            msgs.push((
                std::time::Instant::now(),
                String::from_utf8_lossy(&buf[..n]).to_string(),
            ));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(msgs.iter().any(|(_, m)| m == "READY=1"), "{msgs:?}");
    let pings: Vec<Duration> = msgs
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t - t0)
        .collect();
    assert!(!pings.is_empty(), "pings while the pipeline progressed");
    let last = *pings.last().unwrap();
    assert!(
        last < Duration::from_secs(18),
        "no ping once the bus task hung (last at {last:?})"
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stalling_resetting_network_loses_nothing_and_reconnects_at_a_bounded_rate() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(2, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let start: Vec<u64> = devs
        .iter()
        .map(|d| d.bank().with(|t| t.get_u32_abcd(bag::HR_BAGS_DISPENSED)) as u64)
        .collect();
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into()).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-net/events").await;
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-net",
            state,
            metrics,
            &format!(
                "{}keep_alive = \"5s\"\n{}{}{}",
                uplink_tls(&pki, proxy.port),
                tcp_bus("lan", tcp),
                device("b1", "lan", 1, "bag_dispenser", "30ms"),
                device("b2", "lan", 2, "bag_dispenser", "30ms")
            ),
        )
    });
    let mut rx = Received::default();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| !rx
            .of("b2", "state")
            .is_empty())
        .await,
        "{}",
        gw.log()
    );
    let run = Arc::new(AtomicBool::new(true));
    let traffic = crate::resilience::traffic(devs.clone(), Duration::from_millis(20), run.clone());
    let rounds = if long() { 20 } else { 3 };
    let before = proxy.connections();
    for _ in 0..rounds {
        proxy.set_delay(Duration::from_millis(150));
        receive_until(&mut sub, &mut rx, Duration::from_secs(1), |_| false).await;
        proxy.set_delay(Duration::ZERO);
        proxy.stall(true);
        receive_until(&mut sub, &mut rx, Duration::from_secs(1), |_| false).await;
        proxy.stall(false);
        proxy.cut();
        receive_until(&mut sub, &mut rx, Duration::from_millis(300), |_| false).await;
        proxy.restore();
        receive_until(&mut sub, &mut rx, Duration::from_secs(1), |_| false).await;
    }
    run.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    let names = ["b1", "b2"];
    let done = crate::resilience::receive_all_increments(
        &mut sub,
        &mut rx,
        &names,
        &devs,
        &start,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        done,
        "everything delivered through the faults\n{}",
        gw.log()
    );
    crate::resilience::assert_counters_complete(&rx, &names, &devs, &start);
    rx.assert_seq_identity();
    rx.assert_per_device_order();
    let reconnects = proxy.connections() - before;
    assert!(
        reconnects <= rounds as u64 * 4 + 2,
        "reconnects are bounded by the back-off: {reconnects} for {rounds} resets"
    );
    stop.cancel();
}
