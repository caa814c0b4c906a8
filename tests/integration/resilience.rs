//! What the gateway survives: kill -9, broker outages, silent and hostile devices.

use crate::pipeline::{
    device, expect_state, receive_until, rtu_bus, still_floor, tcp_bus, two_bags,
};
use crate::support::broker::{subscribe, Broker, Pki};
use crate::support::gateway::{config, uplink_for, uplink_tls, Gateway, Received};
use crate::support::proxy::Proxy;
use floorgate::sim::{bag, Device};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Increments the dispensed counter of `devs` every `every` and flips their status, until stopped.
pub(crate) fn traffic(
    devs: Vec<Device>,
    every: Duration,
    run: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    traffic_flipping(devs, every, run, true)
}

/// As [`traffic`]; the status flips only with `flip`.
fn traffic_flipping(
    devs: Vec<Device>,
    every: Duration,
    run: Arc<AtomicBool>,
    flip: bool,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut n = 0u32;
        while run.load(Ordering::Relaxed) {
            n += 1;
            for d in &devs {
                d.bank().with(|t| {
                    let c = t.get_u32_abcd(bag::HR_BAGS_DISPENSED);
                    t.set_u32_abcd(bag::HR_BAGS_DISPENSED, c + 1);
                    if flip {
                        t.set_u16(bag::HR_STATUS, (n % 2) as u16);
                    }
                    t.set_u16(bag::HR_STOCK, 500 - (n % 400) as u16);
                });
            }
            tokio::time::sleep(every).await;
        }
    })
}

pub(crate) fn counter_of(d: &Device) -> u64 {
    d.bank().with(|t| t.get_u32_abcd(bag::HR_BAGS_DISPENSED)) as u64
}

/// Every counter increment the devices made is in the received deltas, exactly once.
pub(crate) fn assert_counters_complete(
    rx: &Received,
    names: &[&str],
    devs: &[Device],
    start: &[u64],
) {
    for ((name, d), s) in names.iter().zip(devs).zip(start) {
        let want = counter_of(d) - s;
        assert_eq!(
            rx.counter_sum(name, "bags_dispensed"),
            want,
            "{name}: deltas sum to the device's increments"
        );
    }
}

/// Receives until every counter increment of `devs` since `start` arrived (or `within` passed).
pub(crate) async fn receive_all_increments(
    sub: &mut crate::support::broker::Subscriber,
    rx: &mut Received,
    names: &[&str],
    devs: &[Device],
    start: &[u64],
    within: Duration,
) -> bool {
    receive_until(sub, rx, within, |rx| {
        names
            .iter()
            .zip(devs)
            .zip(start)
            .all(|((n, d), s)| rx.counter_sum(n, "bags_dispensed") >= counter_of(d) - s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_counter_increment_and_never_reuses_a_seq() {
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(2, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let start: Vec<u64> = devs.iter().map(counter_of).collect();
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    // The broker flaps too: the gateway reaches it through a proxy that is cut now and then.
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into()).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-k9/events").await;
    let mut gw = Gateway::start(|state, metrics| {
        config(
            "gw-k9",
            state,
            metrics,
            &format!(
                "{}{}{}{}",
                uplink_tls(&pki, proxy.port),
                tcp_bus("lan", tcp),
                device("b1", "lan", 1, "bag_dispenser", "30ms"),
                device("b2", "lan", 2, "bag_dispenser", "30ms")
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b2", &gw).await;
    let run = Arc::new(AtomicBool::new(true));
    // A dispense (counter) and a stock change (telemetry) every 15 ms; the status flips below.
    let t = traffic_flipping(devs.clone(), Duration::from_millis(15), run.clone(), false);
    // FLOORGATE_LONG_FAULTS=1: hundreds of cycles.
    let cycles = if crate::faults::long() { 300 } else { 6 };
    for cycle in 0..cycles {
        let pause = 150 + (cycle * 173) % 400;
        // One status transition per cycle, polled before the next one (the gateway may still
        // be starting): every transition is observable, so none may be lost. One that the
        // kill catches before its commit is derived again from the last snapshot.
        let seen: Vec<u64> = devs.iter().map(|d| d.requests()).collect();
        for d in &devs {
            d.bank().with(|t| {
                let status = t.holding(bag::HR_STATUS);
                t.set_u16(bag::HR_STATUS, 1 - status.min(1));
            });
        }
        let polled = tokio::time::timeout(Duration::from_secs(20), async {
            while devs.iter().zip(&seen).any(|(d, s)| d.requests() < s + 8) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            polled.is_ok(),
            "cycle {cycle}: devices polled after the flip\n{}",
            gw.log()
        );
        // Every third cycle the broker becomes unreachable before the kill, and reachable
        // again half-way through the next cycle: outages span kills and restarts.
        if cycle % 3 == 1 {
            proxy.cut();
        }
        if cycle % 3 == 2 {
            receive_until(&mut sub, &mut rx, Duration::from_millis(pause / 2), |_| {
                false
            })
            .await;
            proxy.restore();
        }
        receive_until(&mut sub, &mut rx, Duration::from_millis(pause), |_| false).await;
        gw.kill9();
        receive_until(&mut sub, &mut rx, Duration::from_millis(100), |_| false).await;
        gw.spawn();
    }
    proxy.restore();
    run.store(false, Ordering::Relaxed);
    t.await.unwrap();
    let names = ["b1", "b2"];
    let done = receive_all_increments(
        &mut sub,
        &mut rx,
        &names,
        &devs,
        &start,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        done,
        "all increments delivered after {cycles} kill -9 cycles\n{}",
        gw.log()
    );
    assert_counters_complete(&rx, &names, &devs, &start);
    rx.assert_seq_identity();
    rx.assert_per_device_order();
    rx.assert_no_seq_hole();
    // Every status transition arrived (the last one's poll may follow the last dispense).
    let flips = cycles;
    let transitions = |rx: &Received, name: &str| {
        let status: Vec<u64> = rx
            .of(name, "state")
            .iter()
            .filter_map(|e| e["values"]["status"].as_u64())
            .collect();
        status.windows(2).filter(|w| w[0] != w[1]).count() as u64
    };
    receive_until(&mut sub, &mut rx, Duration::from_secs(2), |rx| {
        names.iter().all(|n| transitions(rx, n) >= flips)
    })
    .await;
    for name in names {
        assert_eq!(
            transitions(&rx, name),
            flips,
            "{name}: every status transition arrives"
        );
    }
    // The last observed state is the device's state.
    let last_status = rx
        .of("b1", "state")
        .iter()
        .rev()
        .find_map(|e| e["values"]["status"].as_u64());
    assert_eq!(
        last_status,
        Some(devs[0].bank().with(|t| t.holding(bag::HR_STATUS)) as u64)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_buffers_and_then_delivers_everything_in_order() {
    let stop = CancellationToken::new();
    // FLOORGATE_LONG_FAULTS=1: an outage long enough to buffer 100,000 events (16 dispensers
    // polled every 10 ms over four connections), which the store drains leaving tombstones.
    let long = crate::faults::long();
    let (n, buffer, within) = if long {
        (16, 100_000.0, Duration::from_secs(600))
    } else {
        (2, 200.0, Duration::from_secs(10))
    };
    let (tcp, devs) = still_floor(n, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let start: Vec<u64> = devs.iter().map(counter_of).collect();
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let proxy = Proxy::start(([127, 0, 0, 1], broker.port).into()).await;
    let mut sub = subscribe(&broker, "floorgate/test/gw-out/events").await;
    let uplink = uplink_tls(&pki, proxy.port);
    let floor = if long {
        let buses: String = (0..4).map(|i| tcp_bus(&format!("lan{i}"), tcp)).collect();
        let devices: String = (1..=n)
            .map(|u| {
                device(
                    &format!("b{u}"),
                    &format!("lan{}", u % 4),
                    u as u8,
                    "bag_dispenser",
                    "10ms",
                )
            })
            .collect();
        format!("{uplink}{buses}{devices}")
    } else {
        two_bags(&uplink, tcp)
    };
    let gw = Gateway::start(|state, metrics| config("gw-out", state, metrics, &floor));
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "b2", &gw).await;
    let run = Arc::new(AtomicBool::new(true));
    let every = Duration::from_millis(if long { 5 } else { 10 });
    let t = traffic(devs.clone(), every, run.clone());
    proxy.cut();
    let buffered = gw
        .wait_metric("floorgate_store_events", within, |v| v >= buffer)
        .await;
    assert!(
        buffered.is_some(),
        "events buffer in the store during the outage\n{}",
        gw.log()
    );
    // The outage's small commits are packed into larger blocks, which the drain then reads.
    let packed = gw
        .wait_metric(
            "floorgate_store_blocks_packed_total",
            Duration::from_secs(30),
            |v| v > 0.0,
        )
        .await;
    assert!(packed.is_some(), "small blocks packed\n{}", gw.log());
    let during = rx.seqs().len();
    // Seqs from here on were committed after the outage: live events.
    let live_from = gw
        .metric("floorgate_store_next_seq")
        .await
        .expect("next seq") as u64;
    proxy.restore();
    let names: Vec<String> = (1..=n).map(|u| format!("b{u}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    // Live events flow again while the backlog drains (after it, in seq order) and while the
    // devices keep changing.
    let wait = Duration::from_secs(if long { 60 } else { 10 });
    let live = receive_until(&mut sub, &mut rx, wait, |rx| {
        // The last event received (publishes arrive in seq order); cheap with 100,000 events.
        rx.events
            .last()
            .and_then(|e| e["seq"].as_u64())
            .is_some_and(|s| s >= live_from + 100)
    })
    .await;
    assert!(
        live,
        "live events delivered after the backlog, traffic still running\n{}",
        gw.log()
    );
    run.store(false, Ordering::Relaxed);
    t.await.unwrap();
    let done = receive_all_increments(
        &mut sub,
        &mut rx,
        &names,
        &devs,
        &start,
        Duration::from_secs(if long { 120 } else { 20 }),
    )
    .await;
    assert!(done, "everything delivered after the outage\n{}", gw.log());
    assert!(rx.seqs().len() > during + 200);
    assert_counters_complete(&rx, &names, &devs, &start);
    rx.assert_seq_identity();
    rx.assert_per_device_order();
    let seqs = rx.seqs();
    assert_eq!(
        seqs.len() as u64,
        seqs.last().unwrap() - seqs.first().unwrap() + 1,
        "no seq missing"
    );
    assert!(
        gw.wait_metric("floorgate_store_events", Duration::from_secs(10), |v| v
            == 0.0)
            .await
            .is_some(),
        "store drained"
    );
    // The acknowledged blocks were kept (marked) while the backlog drained and are deleted once
    // the uplink caught up; the tombstones a long outage's drain left are swept then too (the
    // short outage's backlog is below the 10,000 events that make tombstones).
    for (metric, what) in [
        ("floorgate_store_bytes", "acknowledged blocks deleted"),
        ("floorgate_store_tombstones", "tombstones swept"),
    ] {
        let gone = gw
            .wait_metric(metric, Duration::from_secs(10), |v| v == 0.0)
            .await;
        assert!(gone.is_some(), "{what} after the drain\n{}", gw.log());
    }
    if long {
        let swept = gw.metric("floorgate_store_tombstones_swept_total").await;
        assert!(
            swept.is_some_and(|v| v > 0.0),
            "the long drain left tombstones: {swept:?}"
        );
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reply_after_a_timeout_is_never_taken_as_another_devices_answer() {
    late_reply_is_never_misattributed(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_tcp_reply_after_a_timeout_is_never_taken_as_another_devices_answer() {
    late_reply_is_never_misattributed(true).await;
}

/// Two bag dispensers on one line, RTU on a pseudo-terminal or Modbus TCP (`tcp`, both units
/// behind one address, as behind a TCP/RTU gateway), with a 100 ms timeout; and the devices.
async fn two_units(tcp: bool, stop: &CancellationToken) -> (String, Vec<Device>) {
    if tcp {
        let (addr, devs) = still_floor(2, 0)
            .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
            .await
            .unwrap();
        let bus = tcp_bus("rs485", addr).replace(
            "timeout = \"300ms\"",
            "timeout = \"100ms\"\nretries = 0\nbackoff_max = \"2s\"",
        );
        (bus, devs)
    } else {
        let (pty, devs) = still_floor(2, 0).start_pty(stop.clone()).unwrap();
        (rtu_bus("rs485", &pty, "100ms"), devs)
    }
}

/// Unit 1 answers 60 ms after the gateway gave up on it, for a while: unit 2's values and unit
/// 1's stay apart, unit 2 stays online.
async fn late_reply_is_never_misattributed(tcp: bool) {
    let stop = CancellationToken::new();
    let (bus, devs) = two_units(tcp, &stop).await;
    devs[0].bank().with(|t| t.set_u16(bag::HR_STOCK, 111));
    devs[1].bank().with(|t| t.set_u16(bag::HR_STOCK, 222));
    // Unit 1 answers 60 ms after the gateway gave up on it.
    devs[0].update_faults(|f| f.delay = Duration::from_millis(160));
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-late/events").await;
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-late",
            state,
            metrics,
            &format!(
                "{}{}{}{}",
                uplink_for(&pki, &broker),
                bus,
                device("slow", "rs485", 1, "bag_dispenser", "50ms"),
                device("fast", "rs485", 2, "bag_dispenser", "50ms")
            ),
        )
    });
    let mut rx = Received::default();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| !rx
            .of("fast", "telemetry")
            .is_empty())
        .await,
        "{}",
        gw.log()
    );
    // Let the slow device be probed several times while the fast one is polled.
    receive_until(&mut sub, &mut rx, Duration::from_secs(4), |_| false).await;
    devs[0].clear_faults();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| !rx
            .of("slow", "telemetry")
            .is_empty())
        .await,
        "{}",
        gw.log()
    );
    receive_until(&mut sub, &mut rx, Duration::from_millis(500), |_| false).await;
    for e in rx.of("fast", "telemetry") {
        assert_ne!(
            e["values"]["stock"], 111,
            "a late reply of unit 1 was taken as unit 2's answer: {e}"
        );
    }
    for e in rx.of("slow", "telemetry") {
        assert_ne!(
            e["values"]["stock"], 222,
            "unit 2's reply was taken as unit 1's: {e}"
        );
    }
    assert_eq!(rx.of("slow", "telemetry")[0]["values"]["stock"], 111);
    assert!(
        rx.of("fast", "device")
            .iter()
            .all(|e| e["state"] == "online"),
        "the fast device never went offline"
    );
    assert!(devs[0].requests() > 0);
    assert_no_panic(&gw);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_silent_device_does_not_slow_the_others_beyond_its_back_off() {
    silent_device_among(3, "200ms", Duration::from_secs(5), 0.9).await;
}

/// Issue 5's figure: one dead device among ten on one RS485 line, the others keep at least 95 %
/// of their poll rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_device_among_ten_leaves_the_others_95_percent_of_their_rate() {
    silent_device_among(10, "250ms", Duration::from_secs(8), 0.95).await;
}

/// `n` bag dispensers on one RTU line polled every `poll`, unit 2 silent: over `window` every
/// other device makes at least `share` of its nominal transactions, the silent one is probed
/// once per back-off period and reported offline.
async fn silent_device_among(n: usize, poll: &str, window: Duration, share: f64) {
    let stop = CancellationToken::new();
    let (pty, devs) = still_floor(n, 0).start_pty(stop.clone()).unwrap();
    devs[1].update_faults(|f| f.silent = true);
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-silent/events").await;
    let gw = Gateway::start(|state, metrics| {
        let mut text = format!(
            "{}{}",
            uplink_for(&pki, &broker),
            rtu_bus("rs485", &pty, "100ms")
        );
        for u in 1..=n {
            let name = if u == 2 {
                "dead".to_string()
            } else {
                format!("d{u}")
            };
            text.push_str(&device(&name, "rs485", u as u8, "bag_dispenser", poll));
        }
        config("gw-silent", state, metrics, &text)
    });
    let mut rx = Received::default();
    let last = format!("d{n}");
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| !rx
            .of(&last, "state")
            .is_empty())
        .await,
        "{}",
        gw.log()
    );
    let before: Vec<u64> = devs.iter().map(|d| d.requests()).collect();
    tokio::time::sleep(window).await;
    let after: Vec<u64> = devs.iter().map(|d| d.requests()).collect();
    // A bag dispenser poll is 5 transactions (holding 0-10, holding 40-47, coils, discretes, inputs).
    let period = humantime::parse_duration(poll).unwrap();
    let expected = window.as_secs_f64() / period.as_secs_f64() * 5.0;
    for i in (0..n).filter(|&i| i != 1) {
        let got = (after[i] - before[i]) as f64;
        assert!(
            got >= share * expected,
            "device {} made {got} transactions, expected about {expected}",
            i + 1
        );
    }
    let dead = (after[1] - before[1]) as f64;
    assert!(
        dead <= window.as_secs_f64(),
        "the silent device is only probed once per back-off period, got {dead} requests in {window:?}"
    );
    let offline = gw.metric("floorgate_device_online{device=\"dead\"}").await;
    assert_eq!(offline, Some(0.0));
    assert_no_panic(&gw);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_crc_errors_truncated_frames_and_exceptions_are_survived() {
    hostile_device_is_survived(false).await;
}

/// On Modbus TCP the frames are checked by TCP itself; what a device (or the TCP/RTU gateway in
/// front of it) can still do wrong is to answer late, not at all, or with an exception.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_missing_and_exception_replies_over_tcp_are_survived() {
    hostile_device_is_survived(true).await;
}

/// Unit 1 goes through four faults in turn (RTU: corrupt CRC, truncated frame, garbage before
/// the reply, exception; TCP: a reply after the timeout, none, an exception, a reply later
/// still), recovering after each: no value of either device is taken for the other's, unit 2
/// never goes offline, no task panics.
async fn hostile_device_is_survived(tcp: bool) {
    let stop = CancellationToken::new();
    let (bus, devs) = two_units(tcp, &stop).await;
    devs[0].bank().with(|t| t.set_u16(bag::HR_STOCK, 123));
    devs[1].bank().with(|t| t.set_u16(bag::HR_STOCK, 456));
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-hostile/events").await;
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-hostile",
            state,
            metrics,
            &format!(
                "{}{}{}{}",
                uplink_for(&pki, &broker),
                bus,
                device("bad", "rs485", 1, "bag_dispenser", "50ms"),
                device("good", "rs485", 2, "bag_dispenser", "50ms")
            ),
        )
    });
    let mut rx = Received::default();
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(15), |rx| !rx
            .of("bad", "telemetry")
            .is_empty()
            && !rx.of("good", "telemetry").is_empty())
        .await,
        "{}",
        gw.log()
    );
    for fault in 0..4 {
        devs[0].update_faults(|f| match (tcp, fault) {
            (false, 0) => f.corrupt_crc = true,
            (false, 1) => f.truncate = true,
            (false, 2) => f.garbage_before = true,
            (true, 0) => f.delay = Duration::from_millis(160),
            (true, 1) => f.silent = true,
            (true, 2) => f.delay = Duration::from_millis(1500),
            _ => f.exception = Some(4),
        });
        let ts = floorgate::event::now_ms();
        // Garbage before a good RTU reply is skipped: the device stays online.
        if tcp || fault != 2 {
            assert!(
                receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
                    .of("bad", "device")
                    .iter()
                    .any(|e| e["state"] == "offline" && e["ts"].as_u64().unwrap() >= ts))
                .await,
                "fault {fault} takes the device offline\n{}",
                gw.log()
            );
        } else {
            receive_until(&mut sub, &mut rx, Duration::from_secs(1), |_| false).await;
        }
        devs[0].clear_faults();
        devs[0]
            .bank()
            .with(|t| t.set_u16(bag::HR_STOCK, 123 + fault + 1));
        assert!(
            receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
                .of("bad", "telemetry")
                .iter()
                .any(|e| e["values"]["stock"] == 123 + fault + 1))
            .await,
            "device recovers after fault {fault}\n{}",
            gw.log()
        );
    }
    let offline = rx
        .of("bad", "device")
        .into_iter()
        .filter(|e| e["state"] == "offline")
        .collect::<Vec<_>>();
    assert!(
        offline
            .iter()
            .any(|e| e["error"].as_str().unwrap_or("").contains("exception 4")),
        "{offline:?}"
    );
    assert!(
        offline.iter().any(|e| e["error"] == "timeout"),
        "{offline:?}"
    );
    assert!(
        rx.of("good", "device")
            .iter()
            .all(|e| e["state"] == "online"),
        "the other device never went offline"
    );
    for e in rx.of("good", "telemetry") {
        assert_eq!(
            e["values"]["stock"], 456,
            "no value of the hostile device leaked into the good one"
        );
    }
    for e in rx.of("bad", "telemetry") {
        let s = e["values"]["stock"].as_u64().unwrap_or(123);
        assert!(
            (123..=127).contains(&s),
            "only the bad device's own values: {e}"
        );
    }
    assert_no_panic(&gw);
    stop.cancel();
}

/// No task of the gateway panicked (a panicking bus task would otherwise only show up as a
/// device that stays offline).
fn assert_no_panic(gw: &Gateway) {
    let log = gw.log();
    assert!(!log.contains("panicked"), "a task panicked:\n{log}");
}
