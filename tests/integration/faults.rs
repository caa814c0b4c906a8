//! Fault injection: a full store, a full disk, a misbehaving network, a hung pipeline. Short variants run in
//! CI; `FLOORGATE_LONG_FAULTS=1` makes them longer.

use crate::pipeline::{device, expect_state, receive_until, still_floor, tcp_bus, two_bags};
use crate::support::broker::{subscribe, Broker, Pki};
use crate::support::ext4::Ext4;
use crate::support::gateway::{config, uplink_tls, Gateway, Received};
use crate::support::notify::NotifySocket;
use crate::support::proxy::Proxy;
use crate::support::tls_floor;
use crate::support::tmpfs::Tmpfs;
use floorgate::sim::bag;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// `FLOORGATE_LONG_FAULTS` set (and not `0`): the long variants.
pub(crate) fn long() -> bool {
    std::env::var_os("FLOORGATE_LONG_FAULTS").is_some_and(|v| v != "0")
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
    // The long variant makes ten times the counter events (1200, about 200 KB): the bound is
    // sized so that they fit while telemetry still overflows it many times.
    let max_bytes = if long() { "512KiB" } else { "64KiB" };
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
            &format!("commit_interval = \"20ms\"\nmax_bytes = \"{max_bytes}\""),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b", &gw).await;
    proxy.cut();
    // Mostly telemetry (the stock moves every step), a counter increment every 25th step, and
    // a jam over the middle half (over 3 s: beyond the 2 s debounce of the `jammed` alarm).
    let steps = if long() { 30_000 } else { 3_000 };
    for i in 0..steps {
        devs[0].bank().with(|t| {
            if i == steps / 4 || i == steps * 3 / 4 {
                t.set_discrete(bag::DI_JAM, i == steps / 4);
            }
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
    // The alarm raised and cleared during the overflow is kept, as are the jam's transitions.
    let alarms: Vec<(String, String)> = rx
        .of("b", "alarm")
        .iter()
        .map(|e| (e["alarm"].to_string(), e["state"].to_string()))
        .collect();
    assert_eq!(
        alarms,
        [("\"jammed\"", "\"raised\""), ("\"jammed\"", "\"cleared\"")]
            .map(|(a, s)| (a.to_string(), s.to_string())),
        "alarms kept through a full store\n{}",
        gw.log()
    );
    let jams: Vec<bool> = rx
        .of("b", "state")
        .iter()
        .filter_map(|e| e["values"]["jam"].as_bool())
        .collect();
    assert!(
        jams.ends_with(&[true, false]),
        "jam transitions kept: {jams:?}"
    );
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
    // cut may still have reached the broker, so the count can exceed the holes by what was in
    // flight: at most the window (64 publishes), each of live traffic (fewer than 8 events
    // waiting when it was read). Measured: 1.
    let total: u64 = reported.values().sum();
    assert!(
        total >= missing && total - missing <= 64 * 8,
        "gap events account for every missing seq: {total} reported, {missing} missing"
    );
    // Exact: the gap events report every drop the store made, each once.
    let store_dropped = gw.metric("floorgate_store_dropped").await.expect("dropped");
    assert_eq!(
        total as f64, store_dropped,
        "gap events report exactly the store's drops"
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
async fn a_hung_bus_task_stops_the_watchdog_pings() {
    hung_pipeline_stops_the_watchdog_pings(("FLOORGATE_FAULT_HANG_BUS", "lan"), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_writer_stops_the_watchdog_pings() {
    hung_pipeline_stops_the_watchdog_pings(("FLOORGATE_FAULT_HANG_WRITER", "1"), "").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_uplink_stops_the_watchdog_pings() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let uplink = crate::support::gateway::uplink_for(&pki, &broker);
    hung_pipeline_stops_the_watchdog_pings(("FLOORGATE_FAULT_HANG_UPLINK", "1"), &uplink).await;
}

/// `floorgate run` (with `extra` configuration) under a systemd-like notify socket with the
/// fault `env` injected: READY and watchdog pings first, then no ping once the faulty task
/// stopped making progress.
async fn hung_pipeline_stops_the_watchdog_pings(fault: (&str, &str), extra: &str) {
    let stop = CancellationToken::new();
    let (tcp, _devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind();
    let (notify_key, notify_path) = notify.env();
    let text = config(
        "gw-wd",
        &dir.path().join("state"),
        crate::support::gateway::free_port(),
        &format!(
            "{extra}{}{}",
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
        .env(notify_key, notify_path)
        .env(fault.0, fault.1)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(25) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        notify.messages();
    }
    let msgs = notify.messages();
    let running = child.try_wait().ok().flatten().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        running,
        "the gateway kept running ({}): it hung, not crashed",
        fault.0
    );
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
        "no ping once the task hung ({}, last at {last:?})",
        fault.0
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stalling_resetting_network_loses_nothing_and_reconnects_at_a_bounded_rate() {
    use std::sync::atomic::{AtomicBool, Ordering};
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
            &two_bags(
                &format!("{}keep_alive = \"5s\"\n", uplink_tls(&pki, proxy.port)),
                tcp,
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b2", &gw).await;
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
    // A cut of 6 s: the event session and the control link retry with a jittered back-off
    // from 250 ms doubling up to `reconnect_max` (at least 125, 250, 500 ms, ... apart, then at
    // least half of it), so together about 16 times at most; without a back-off, hundreds.
    let tried = proxy.attempts();
    proxy.cut();
    receive_until(&mut sub, &mut rx, Duration::from_secs(6), |_| false).await;
    let attempts = proxy.attempts() - tried;
    proxy.restore();
    assert!(
        (2..=24).contains(&attempts),
        "connection attempts during a 6 s cut: {attempts}, expected a few (back-off)\n{}",
        gw.log()
    );
    run.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    let within = Duration::from_secs(30);
    every_increment_arrives(&mut sub, &mut rx, &devs, &start, &gw, within).await;
    let reconnects = proxy.connections() - before;
    assert!(
        reconnects <= (rounds as u64 + 1) * 4 + 2,
        "reconnects are bounded by the back-off: {reconnects} for {} resets",
        rounds + 1
    );
    stop.cancel();
}

/// A broker that keeps answering pings but stops acknowledging publishes (a proxy drops its
/// PUBACKs): the gateway gives the session up after twice `keep_alive` without a PUBACK,
/// reconnects, and once PUBACKs come again every increment arrives, no seq reused or missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_answers_pings_but_acknowledges_nothing_is_left_and_nothing_is_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(2, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let start: Vec<u64> = devs.iter().map(crate::resilience::counter_of).collect();
    let broker = Broker::start_plain();
    let proxy = Proxy::start_mqtt(([127, 0, 0, 1], broker.port).into()).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-noack/events").await;
    let uplink = format!(
        "[uplink]\nurl = \"mqtt://127.0.0.1:{}\"\nallow_plaintext = true\nkeep_alive = \"5s\"\nmax_batch = 50\nreconnect_max = \"2s\"\n",
        proxy.port
    );
    let gw = Gateway::start(|state, metrics| {
        config("gw-noack", state, metrics, &two_bags(&uplink, tcp))
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b2", &gw).await;
    let run = Arc::new(AtomicBool::new(true));
    let traffic = crate::resilience::traffic(devs.clone(), Duration::from_millis(50), run.clone());
    let before = proxy.connections();
    proxy.drop_pubacks(true);
    // The broker still routes what it is sent; the gateway must not count that as delivered.
    assert!(
        gw.wait_log("no PUBACK for", Duration::from_secs(20)).await,
        "the session is given up\n{}",
        gw.log()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while proxy.connections() == before && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        proxy.connections() > before,
        "the gateway connected again\n{}",
        gw.log()
    );
    proxy.drop_pubacks(false);
    receive_until(&mut sub, &mut rx, Duration::from_secs(1), |_| false).await;
    run.store(false, Ordering::Relaxed);
    traffic.await.unwrap();
    let within = Duration::from_secs(30);
    every_increment_arrives(&mut sub, &mut rx, &devs, &start, &gw, within).await;
    let stored = gw
        .wait_metric("floorgate_store_events", Duration::from_secs(10), |v| {
            v == 0.0
        })
        .await;
    assert!(
        stored.is_some(),
        "acknowledged at last: nothing stays stored"
    );
    stop.cancel();
}

/// Every increment of the two bag dispensers `b1` and `b2` since `start` arrives (within
/// `within`) once, in order per device, no seq reused or missing.
async fn every_increment_arrives(
    sub: &mut crate::support::broker::Subscriber,
    rx: &mut Received,
    devs: &[floorgate::sim::Device],
    start: &[u64],
    gw: &Gateway,
    within: Duration,
) {
    use crate::resilience::{assert_counters_complete, receive_all_increments};
    let names = ["b1", "b2"];
    let done = receive_all_increments(sub, rx, &names, devs, start, within).await;
    assert!(done, "every increment arrives\n{}", gw.log());
    assert_counters_complete(rx, &names, devs, start);
    rx.assert_seq_identity();
    rx.assert_per_device_order();
    rx.assert_no_seq_hole();
}

/// A small tmpfs to fill, or None (and a note) on a machine where mounting is not permitted.
fn small_disk() -> Option<Tmpfs> {
    match Tmpfs::mount(32) {
        Ok(disk) => Some(disk),
        Err(error) => {
            eprintln!("skipped: needs CAP_SYS_ADMIN to mount tmpfs ({error})");
            None
        }
    }
}

/// One counter increment of device `d`, with the snapshot it leaves (the total), padded with
/// `pad` bytes in the point name to make big groups.
fn reading(total: u64, pad: usize) -> floorgate::store::Derived {
    use floorgate::event::{Body, Event};
    floorgate::store::Derived {
        events: vec![Event::now(
            Some("d"),
            Body::Counter {
                point: format!("c{}", "x".repeat(pad)),
                delta: 1,
                total,
                reset: false,
            },
        )],
        snapshot: Some(("d".into(), total.to_be_bytes().to_vec())),
    }
}

/// Seq i carries increment i, for 1..=n: nothing lost, nothing twice, no seq reused.
fn assert_increments(store: &floorgate::store::Store, n: u64) {
    let seen: Vec<(u64, u64)> = store
        .read_from(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|e| {
            let v: serde_json::Value = serde_json::from_slice(e.json()).unwrap();
            (e.seq(), v["total"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(seen, (1..=n).map(|i| (i, i)).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_full_disk_makes_pollers_wait_and_room_again_commits_every_held_event_once() {
    use floorgate::store::{Store, Writer};
    let Some(disk) = small_disk() else { return };
    let store = Arc::new(Store::open(disk.path(), 1 << 20, 1 << 30).unwrap());
    let (writer, handle) = Writer::new(store.clone(), Duration::from_millis(5));
    let stop = CancellationToken::new();
    let task = tokio::spawn(writer.run(stop.clone()));
    let mut total = 0;
    while total < 100 {
        total += 1;
        assert!(handle.send(reading(total, 0)).await);
    }
    let committed = || store.stats().next_seq - 1;
    assert!(crate::support::wait_until(Duration::from_secs(5), || committed() == 100).await);
    // Less room than store.min_free (8 MiB by default): the store writes nothing.
    disk.fill(2 << 20);
    // The writer takes no more readings once a group is held: a poller's send waits.
    loop {
        match tokio::time::timeout(Duration::from_secs(2), handle.send(reading(total + 1, 0))).await
        {
            Ok(sent) => {
                assert!(sent, "the writer runs on");
                total += 1;
            }
            Err(_) => break, // waiting: not sent (a cancelled send sends nothing)
        }
        assert!(total < 100_000, "a full disk makes pollers wait");
    }
    let unwritable = store.unwritable().expect("the store says so");
    assert!(
        unwritable.error.contains("disk full") && !unwritable.failed,
        "{unwritable:?}"
    );
    assert!(
        unwritable.held_events > 0 && total - committed() <= 1024 + 4096,
        "memory is bounded by the channel and one held group: {} not committed",
        total - committed()
    );
    assert_eq!(committed(), 100, "nothing was written");
    disk.drain();
    assert!(
        crate::support::wait_until(Duration::from_secs(10), || store.unwritable().is_none()
            && committed() == total)
        .await,
        "once there is room, every reading is committed: {:?}, {} of {total}",
        store.unwritable(),
        committed()
    );
    assert_increments(&store, total);
    assert_eq!(
        store.snapshot("d").unwrap(),
        Some(total.to_be_bytes().to_vec())
    );
    stop.cancel();
    task.await.unwrap();
}

/// Runs `f` on a thread; None when it did not return within 5 s.
fn returns<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5)).ok()
}

#[test]
fn after_sled_fails_a_write_the_store_writes_nothing_never_hangs_and_a_restart_finds_every_commit()
{
    use floorgate::store::Store;
    // Small groups make sled keep its first error; a group bigger than its buffers leaves it
    // waiting forever on the next flush (also in its Drop). Both must be survived.
    for pad in [0, 400_000] {
        let Some(disk) = small_disk() else { return };
        let store = Store::open(disk.path(), 1 << 20, 1 << 30)
            .unwrap()
            .with_min_free(0);
        for total in 1..=100 {
            let d = reading(total, 0);
            store
                .commit_group(d.events, vec![d.snapshot.unwrap()])
                .unwrap();
        }
        disk.fill(0);
        let mut total = 100;
        let error = loop {
            let d = reading(total + 1, pad);
            match store.commit_group(d.events, vec![d.snapshot.unwrap()]) {
                Ok(_) => total += 1,
                Err(e) => break e,
            }
            assert!(total < 10_000, "a full disk fails a write");
        };
        assert!(error.to_string().contains("No space left"), "{error}");
        let u = store.unwritable().unwrap();
        assert!(u.failed && !u.restart && u.held_events == 1, "{u:?}");
        assert_eq!(
            store.snapshot("d").unwrap(),
            Some((total + 1).to_be_bytes().to_vec()),
            "pollers continue from the held group"
        );
        assert!(store.recover().is_err());
        assert!(
            !store.unwritable().unwrap().restart,
            "the disk is still full"
        );
        disk.drain();
        let store = Arc::new(store);
        let s = store.clone();
        let (recover, record, flush) = returns(move || {
            (
                s.recover().is_err(),
                s.put_record(b'c', "x", b"y").is_err(),
                s.flush().is_err(),
            )
        })
        .expect("no write waits on sled");
        assert!(recover && record && flush, "a failed store takes no writes");
        assert!(store.unwritable().unwrap().restart, "time to restart");
        assert_increments(&store, total);
        returns(move || drop(store)).expect("dropping a failed store returns");
        // What a restart finds: this process still holds sled's lock, so open a copy.
        let copy = tempfile::tempdir().unwrap();
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(disk.path().join("store"))
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(cp.success());
        let restarted = Store::open(copy.path(), 1 << 20, 1 << 30).unwrap();
        assert_eq!(restarted.stats().next_seq, total + 1, "no seq is reused");
        assert_increments(&restarted, total);
        assert_eq!(
            restarted.snapshot("d").unwrap(),
            Some(total.to_be_bytes().to_vec()),
            "pollers derive the held increment again from the committed snapshot"
        );
    }
}

/// The full-disk floor: two bag dispensers counting and changing status every 200 ms (slower
/// than their polls, so the gateway sees every change), a broker, and a gateway whose state
/// directory is `disk`.
struct DiskFloor {
    stop: CancellationToken,
    devs: Vec<floorgate::sim::Device>,
    start: Vec<u64>,
    _pki: Pki,
    _broker: Broker,
    sub: crate::support::broker::Subscriber,
    /// The retained `health` topic.
    health: crate::support::broker::Subscriber,
    rx: Received,
    gw: Gateway,
    /// What the gateway tells systemd.
    notify: NotifySocket,
    run: Arc<std::sync::atomic::AtomicBool>,
    traffic: tokio::task::JoinHandle<()>,
}

impl DiskFloor {
    async fn start(disk: &Path, store: &str) -> DiskFloor {
        use crate::resilience::{counter_of, traffic};
        let stop = CancellationToken::new();
        let (tcp, devs) = still_floor(2, 0)
            .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
            .await
            .unwrap();
        for d in &devs {
            d.bank().with(|t| t.set_u16(bag::HR_STATUS, 0));
        }
        let start: Vec<u64> = devs.iter().map(counter_of).collect();
        let pki = Pki::generate();
        let broker = Broker::start_tls(&pki);
        let notify = NotifySocket::bind();
        let gw = Gateway::start_with_env(vec![notify.env()], |_, metrics| {
            config(
                "gw-disk",
                disk,
                metrics,
                &two_bags(&uplink_tls(&pki, broker.port), tcp),
            )
            .replace(
                "commit_interval = \"20ms\"",
                &format!("commit_interval = \"20ms\"\n{store}"),
            )
        });
        let mut sub = subscribe(&broker, "floorgate/test/gw-disk/events").await;
        let health = subscribe(&broker, "floorgate/test/gw-disk/health").await;
        let mut rx = Received::default();
        expect_state(&mut sub, &mut rx, "b2", &gw).await;
        let run = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let traffic = traffic(devs.clone(), Duration::from_millis(200), run.clone());
        let mut f = DiskFloor {
            stop,
            devs,
            start,
            _pki: pki,
            _broker: broker,
            sub,
            health,
            rx,
            gw,
            notify,
            run,
            traffic,
        };
        f.receive(Duration::from_secs(1), |_| false).await;
        f
    }

    async fn receive(&mut self, within: Duration, done: impl FnMut(&Received) -> bool) -> bool {
        receive_until(&mut self.sub, &mut self.rx, within, done).await
    }

    /// The next `health` message that satisfies `ok` (at most 10 s).
    async fn health(
        &mut self,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            let (_, payload, _) = self.health.next(left).await?;
            let h: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
            if ok(&h) {
                return Some(h);
            }
        }
        None
    }

    /// The floor says that the store takes writes again: systemd's status and the `health`
    /// message.
    async fn assert_writable_again(&mut self) {
        let running = self
            .notify
            .wait_for(Duration::from_secs(10), |m| m == "STATUS=running")
            .await;
        assert!(running.is_some(), "{:?}", self.notify.messages());
        let health = self.health(|h| h["store"]["writable"] == true).await;
        assert!(
            health.is_some_and(|h| h["store"]["held_events"] == 0),
            "the health message says the store is writable again"
        );
    }

    /// The floor says that the store does not take writes: metrics, log (`log`), `floorgate
    /// status` and systemd's status line (both with `status`), and the retained `health`
    /// message (with the error `cause`, and whether the gateway will restart).
    async fn assert_unwritable(&mut self, log: &str, status: &str, cause: &str, restart: bool) {
        let gw = &self.gw;
        let failing = gw
            .wait_metric("floorgate_store_failing", Duration::from_secs(10), |v| {
                v == 1.0
            })
            .await;
        assert!(failing.is_some(), "the metrics say so\n{}", gw.log());
        assert!(gw
            .wait_metric("floorgate_store_held_events", Duration::from_secs(5), |v| v
                > 0.0)
            .await
            .is_some());
        assert!(gw.log().contains(log), "{}", gw.log());
        let out = crate::operate::floorgate(gw, &["status"]);
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.contains("NOT WRITABLE") && out.contains(status),
            "{out}"
        );
        let systemd = self
            .notify
            .wait_for(Duration::from_secs(10), |m| {
                m.starts_with("STATUS=store not writable")
            })
            .await;
        assert!(
            systemd.as_deref().is_some_and(|m| m.contains(status)),
            "systemd's status line says so: {:?}",
            self.notify.messages()
        );
        let health = self.health(|h| h["store"]["writable"] == false).await;
        assert!(
            health.as_ref().is_some_and(|h| h["store"]["held_events"]
                .as_u64()
                .is_some_and(|n| n > 0)
                && h["store"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains(cause))
                && h["store"]["needs_restart"] == restart),
            "the health message says so: {health:?}"
        );
    }

    /// After a second more of traffic, `fix` makes the state directory writable again: the
    /// gateway exits for systemd to restart it (non-zero, not a configuration error), and once
    /// spawned again its store takes writes.
    async fn restarts_once(&mut self, fix: impl FnOnce()) {
        self.receive(Duration::from_secs(1), |_| false).await;
        fix();
        let exit = self.gw.wait_exit(Duration::from_secs(15)).await;
        assert!(
            exit.is_some_and(|e| !e.success() && e.code() != Some(78)),
            "exits for systemd to restart it: {exit:?}\n{}",
            self.gw.log()
        );
        assert!(self.gw.log().contains("exiting to be restarted"));
        self.gw.spawn(); // what systemd's Restart=on-failure does
        let writable = self
            .gw
            .wait_metric("floorgate_store_failing", Duration::from_secs(10), |v| {
                v == 0.0
            })
            .await;
        assert!(writable.is_some(), "{}", self.gw.log());
    }

    /// Stops the traffic; every increment arrives once, in order per device, no seq reused or
    /// missing.
    async fn assert_everything_arrives(&mut self) {
        self.run.store(false, std::sync::atomic::Ordering::Relaxed);
        (&mut self.traffic).await.unwrap();
        let (sub, rx, gw) = (&mut self.sub, &mut self.rx, &self.gw);
        every_increment_arrives(
            sub,
            rx,
            &self.devs,
            &self.start,
            gw,
            Duration::from_secs(20),
        )
        .await;
    }

    /// The status values of a device's state events, in order.
    fn statuses(&self, name: &str) -> Vec<u64> {
        self.rx
            .of(name, "state")
            .iter()
            .filter_map(|e| e["values"]["status"].as_u64())
            .collect()
    }
}

impl Drop for DiskFloor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_once_there_is_room_every_increment_and_transition_arrives() {
    let Some(disk) = small_disk() else { return };
    let mut f = DiskFloor::start(disk.path(), "").await;
    // Less room than store.min_free (8 MiB by default): the store stops writing.
    disk.fill(2 << 20);
    f.assert_unwritable("store not writable", "disk full", "disk full", false)
        .await;
    f.receive(Duration::from_secs(1), |_| false).await;
    disk.drain();
    let writable =
        f.gw.wait_metric("floorgate_store_failing", Duration::from_secs(10), |v| {
            v == 0.0
        })
        .await;
    assert!(writable.is_some(), "writable again\n{}", f.gw.log());
    assert!(
        f.gw.wait_log("store writable again", Duration::from_secs(2))
            .await
    );
    f.assert_writable_again().await;
    f.receive(Duration::from_secs(1), |_| false).await;
    f.assert_everything_arrives().await;
    // The gateway kept running: each traffic step's status change is a transition.
    for (name, (d, s)) in ["b1", "b2"].iter().zip(f.devs.iter().zip(&f.start)) {
        let status = f.statuses(name);
        let transitions = status.windows(2).filter(|w| w[0] != w[1]).count() as u64;
        assert_eq!(
            transitions,
            crate::resilience::counter_of(d) - s,
            "{name}: every status transition arrives"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_sled_fails_is_reported_then_a_restart_delivers_every_increment() {
    let Some(disk) = small_disk() else { return };
    // No free-space check: sled itself meets the full disk (ENOSPC).
    let mut f = DiskFloor::start(disk.path(), "min_free = \"0B\"").await;
    disk.fill(0);
    f.assert_unwritable(
        "store write failed",
        "restarting once",
        "No space left on device",
        true,
    )
    .await;
    f.restarts_once(|| disk.drain()).await;
    f.assert_everything_arrives().await;
    let last = f.statuses("b1").last().copied();
    let now = f.devs[0].bank().with(|t| t.holding(bag::HR_STATUS)) as u64;
    assert_eq!(last, Some(now), "the last status arrives");
}

/// A small ext4 file system to turn unwritable, or None (and a note) where that is not possible.
fn failing_disk() -> Option<Ext4> {
    match Ext4::mount(64) {
        Ok(disk) => Some(disk),
        Err(error) => {
            eprintln!("skipped: needs root, loop devices and e2fsprogs ({error})");
            None
        }
    }
}

/// The state directory's file system turns unwritable under the running gateway: ext4 records
/// an error and takes no more writes, through files already open too (what an I/O error on the
/// box's flash does with `errors=remount-ro`). The gateway says so and holds what it could not
/// write, and once a checked copy of the file system is mounted in its place, exits for systemd; the restart
/// delivers every increment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_the_kernel_makes_unwritable_is_reported_then_a_restart_delivers_every_increment(
) {
    let Some(mut disk) = failing_disk() else {
        return;
    };
    let mut f = DiskFloor::start(disk.path(), "").await;
    disk.fail();
    f.assert_unwritable(
        "store write failed",
        "restarting once",
        "Read-only file system",
        true,
    )
    .await;
    f.restarts_once(|| disk.replace()).await;
    f.assert_everything_arrives().await;
}

/// The state directory is on a file system mounted read-only when the gateway starts: it exits
/// non-zero at once and says which directory and why (systemd's `Restart=on-failure` tries
/// again); once the file system is writable, the next start runs and delivers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_state_directory_at_start_is_refused_by_name_and_the_start_after_a_remount_runs(
) {
    let Some(disk) = small_disk() else { return };
    disk.remount(true);
    let (stop, tcp, _devs, pki, broker) = tls_floor(2, 0).await;
    let mut gw = Gateway::start(|_, metrics| {
        config(
            "gw-ro",
            disk.path(),
            metrics,
            &two_bags(&uplink_tls(&pki, broker.port), tcp),
        )
    });
    let exit = gw.wait_exit(Duration::from_secs(10)).await;
    assert!(
        exit.is_some_and(|e| !e.success() && e.code() != Some(78)),
        "exits for systemd to try again: {exit:?}\n{}",
        gw.log()
    );
    let said = format!(
        "store directory {}: Read-only file system",
        disk.path().display()
    );
    assert!(gw.log().contains(&said), "{}", gw.log());
    // Subscribed before the start that publishes.
    let mut sub = subscribe(&broker, "floorgate/test/gw-ro/events").await;
    disk.remount(false);
    gw.spawn();
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b2", &gw).await;
    stop.cancel();
}
