//! `cargo bench --bench pipeline`: the figures of floorgate's performance targets.
//!
//! 1. poll transactions/s over a PTY against the simulator;
//! 2. events/s committed to the store;
//! 3. events/s drained from a 1,000,000-event backlog to mosquitto over mTLS, next to a plain
//!    rumqttc publisher of the same payloads (same broker, TLS, QoS 1 and window) in the same run:
//!    three rounds of a backlog committed 1000 events at a time (the first after reopening the
//!    store, so read from disk), then one of a backlog committed 50 at a time (small blocks, as
//!    a floor's group commits make them);
//! 4. RSS and CPU of `floorgate run` polling 64 simulated devices at 1 s.
//!
//! Results are printed and written to `target/bench/pipeline.json`.
//! `FLOORGATE_BENCH_EVENTS` overrides the backlog size, `FLOORGATE_BENCH_FOOTPRINT_SECS` the (60 s)
//! footprint window. `FLOORGATE_BENCH_ONLY=bus,drain` runs only the named parts (poll, store,
//! drain, footprint, draining, bus, latency) and prints them without writing the JSON file; there
//! `FLOORGATE_BENCH_ROUNDS` sets the drain rounds (and those of `draining`: only the footprint
//! of `floorgate run` draining a stored backlog), `FLOORGATE_BENCH_FILL_BATCH` the events per
//! commit of the backlog (default 1000) and `FLOORGATE_BENCH_REOPEN=1` reopens the store before
//! each drain.
#![allow(
    clippy::unwrap_used,
    unreachable_pub,
    missing_debug_implementations,
    dead_code
)]

#[path = "../tests/integration/support/broker.rs"]
mod broker;
#[path = "../tests/integration/support/metrics.rs"]
mod metrics;

use broker::{mqtt_options_with, tls_client_config, Broker, Pki};
use floorgate::config::{Bus, BusKind, Parity};
use floorgate::device::codec::{Table, Value};
use floorgate::device::plan::ReadSpan;
use floorgate::event::{payload, Body, Event};
use floorgate::sim::SimFloor;
use floorgate::store::Store;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event as MqttEvent};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn poll_rate() -> f64 {
    let stop = CancellationToken::new();
    let mut floor = SimFloor::new(1, 0);
    floor.models = false;
    let (pty, _) = floor.start_pty(stop.clone()).unwrap();
    let bus = Bus {
        name: "bench".into(),
        kind: BusKind::Rtu {
            port: pty,
            baud: 115_200,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
        },
        timeout: Duration::from_millis(500),
        retries: 0,
        turnaround: Duration::ZERO,
        max_gap: 8,
        backoff_max: Duration::from_secs(1),
    };
    let mut link = floorgate::bus::link::Link::new(&bus);
    let span = ReadSpan {
        table: Table::Holding,
        start: 0,
        count: 11,
    };
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(3) {
        link.read(1, span).await.unwrap();
        n += 1;
    }
    stop.cancel();
    n as f64 / t0.elapsed().as_secs_f64()
}

fn event(i: u64) -> Event {
    let mut values = BTreeMap::new();
    values.insert(
        "temperature".to_string(),
        Value::Float(20.0 + (i % 100) as f64 / 10.0),
    );
    values.insert("stock".to_string(), Value::UInt(500 - i % 400));
    let body = if i % 4 == 0 {
        Body::Counter {
            point: "bags_dispensed".into(),
            delta: 1,
            total: i,
            reset: false,
        }
    } else {
        Body::Telemetry { values }
    };
    Event {
        ts: 1_790_000_000_000 + i,
        clock_synced: true,
        device: Some(format!("bags-{}", i % 64)),
        body,
    }
}

fn fill(store: &Store, n: u64, batch: u64) -> f64 {
    let t0 = Instant::now();
    let mut i = 0;
    while i < n {
        let events: Vec<Event> = (i..(i + batch).min(n)).map(event).collect();
        store.commit(&events, &[]).unwrap();
        i += batch;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

/// Opens the store in `dir` again and says how long the open took. sled's I/O threads let go of
/// the directory lock a moment after the previous instance was dropped: until then it retries.
fn reopen(dir: &std::path::Path) -> (Store, f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t0 = Instant::now();
        match Store::open(dir, 4 << 20, 4 << 30) {
            Ok(s) => return (s, t0.elapsed().as_secs_f64() * 1e3),
            Err(e) if Instant::now() > deadline => panic!("reopen: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Events per commit of the second drain measurement (the first commits 1000 at a time).
const SMALL_COMMIT: u64 = 50;

/// CPU seconds this process used so far (all threads), to the microsecond.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// What one drain measured.
struct Drained {
    /// Events/s until every event was acknowledged.
    rate: f64,
    /// Milliseconds after that until the acknowledged blocks were deleted from the store.
    reclaim_ms: f64,
    /// CPU seconds of this process until every event was acknowledged.
    cpu_s: f64,
}

/// Drains the store with floorgate's uplink.
async fn drain(store: Arc<Store>, pki: &Pki, broker: &Broker, n: u64) -> Drained {
    let cfg = format!(
        "[gateway]\nid = \"bench-gw\"\n[uplink]\nurl = \"mqtts://localhost:{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nmax_batch = 100\nmax_inflight = 32\n",
        broker.port,
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let config = floorgate::config::parse_str(&cfg, std::path::Path::new("bench.toml")).unwrap();
    let up = floorgate::uplink::Uplink::new(
        config.uplink.unwrap(),
        "bench-gw",
        store.clone(),
        b"{}".to_vec(),
        Arc::default(),
    );
    let stop = CancellationToken::new();
    let (t0, c0) = (Instant::now(), process_cpu_s());
    let task = tokio::spawn(up.run(stop.clone()));
    while store.stats().events > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    let cpu_s = process_cpu_s() - c0;
    let t1 = Instant::now();
    // Deleted, and the tombstones the drain left swept.
    while store.stats().bytes > 0 || store.stats().tombstones > 0 {
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "the store did not empty after the drain"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let reclaim_ms = t1.elapsed().as_secs_f64() * 1e3;
    stop.cancel();
    let _ = task.await;
    Drained {
        rate,
        reclaim_ms,
        cpu_s,
    }
}

/// The plain publisher: events/s, and the CPU seconds this process used meanwhile.
async fn plain_publisher(payloads: Vec<Vec<u8>>, pki: &Pki, broker: &Broker, n: u64) -> (f64, f64) {
    let tls = tls_client_config(&pki.ca_cert, Some((&pki.client_cert, &pki.client_key)));
    let mut opts = mqtt_options_with(broker, "bench-plain", Some(tls));
    opts.set_outgoing_inflight_upper_limit(32);
    opts.set_max_packet_size(Some(8 << 20));
    let (client, mut el) = AsyncClient::new(opts, 96);
    let total = payloads.len();
    let (t0, c0) = (Instant::now(), process_cpu_s());
    let pump = tokio::spawn(async move {
        let mut acks = 0;
        while acks < total {
            if let Ok(MqttEvent::Incoming(Packet::PubAck(_))) = el.poll().await {
                acks += 1;
            }
        }
    });
    for p in payloads {
        client
            .publish("floorgate/bench/plain/events", QoS::AtLeastOnce, false, p)
            .await
            .unwrap();
    }
    pump.await.unwrap();
    (n as f64 / t0.elapsed().as_secs_f64(), process_cpu_s() - c0)
}

/// `floorgate run` with configuration `text` written to `dir`.
fn run_daemon(dir: &std::path::Path, text: &str) -> std::process::Child {
    let path = dir.join("f.toml");
    std::fs::write(&path, text).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

fn proc_stat(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu_s = (ticks(11) + ticks(12)) / 100.0; // utime + stime, USER_HZ = 100
    (cpu_s, status_mib(pid, "VmRSS:"))
}

/// A size field of `/proc/pid/status` (`VmRSS:`, `VmHWM:`, ...) in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// `floorgate run` polling 64 simulated devices at 1 s: CPU (% of a core) and RSS max (MiB) over
/// `secs`. With `backlog`, the uplink points at a closed port, so everything stays buffered.
async fn footprint(pki: &Pki, broker: &Broker, secs: u64, backlog: bool) -> (f64, f64) {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let port = if backlog { free_port() } else { broker.port };
    let (text, _) = floor_config(dir.path(), pki, port, stop.clone()).await;
    let mut child = run_daemon(dir.path(), &text);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (c0, _) = proc_stat(child.id());
    let t0 = Instant::now();
    let mut rss_max: f64 = 0.0;
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rss_max = rss_max.max(proc_stat(child.id()).1);
    }
    let (c1, _) = proc_stat(child.id());
    let cpu = (c1 - c0) / t0.elapsed().as_secs_f64() * 100.0;
    let _ = child.kill();
    let _ = child.wait();
    stop.cancel();
    (cpu, rss_max)
}

/// The configuration of the footprint runs: 64 simulated devices (32 bag dispensers, 32
/// cabinets) on Modbus TCP polled at 1 s, the uplink at `port`, state in `dir`/state, metrics on
/// the returned port. The simulators run until `stop`.
async fn floor_config(
    dir: &std::path::Path,
    pki: &Pki,
    port: u16,
    stop: CancellationToken,
) -> (String, u16) {
    let (tcp, _devs) = SimFloor::tcp(32, 32, stop).await.unwrap();
    let metrics = free_port();
    let mut text = format!(
        "[gateway]\nid = \"bench-fp\"\nstate_dir = \"{}\"\ninclude = [\"{}/config/profiles/*.toml\"]\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[uplink]\nurl = \"mqtts://localhost:{port}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n[[bus]]\nname = \"lan\"\ntcp = {{ address = \"{tcp}\" }}\n",
        dir.join("state").display(),
        env!("CARGO_MANIFEST_DIR"),
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    for u in 1..=64 {
        let profile = if u <= 32 {
            "bag_dispenser"
        } else {
            "charging_cabinet"
        };
        text.push_str(&format!("[[device]]\nname = \"d{u}\"\nbus = \"lan\"\nunit = {u}\nprofile = \"{profile}\"\npoll = \"1s\"\n"));
    }
    (text, metrics)
}

/// `floorgate run` polling the 64 devices after a restart with a copy of the store `backlog`
/// ([`stored_backlog`]) as its state: seconds until the backlog is drained, CPU (% of a core)
/// and peak RSS (MiB, `VmHWM`) meanwhile, and RSS (MiB) 5 s later, while the devices are
/// polled live.
async fn drain_footprint(pki: &Pki, broker: &Broker, backlog: &Path) -> (f64, f64, f64, f64) {
    let stop = CancellationToken::new();
    let dir = tempfile::tempdir().unwrap();
    let (text, metrics_port) = floor_config(dir.path(), pki, broker.port, stop.clone()).await;
    copy_dir(backlog, &dir.path().join("state"));
    // On disk before the daemon starts, as a restarted gateway's store is: otherwise its first
    // commit would write the copy back.
    {
        use std::os::fd::AsRawFd;
        let d = std::fs::File::open(dir.path()).unwrap();
        // SAFETY: syncfs on a descriptor this block owns.
        assert_eq!(unsafe { libc::syncfs(d.as_raw_fd()) }, 0);
    }
    let mut child = run_daemon(dir.path(), &text);
    let (c0, _) = proc_stat(child.id());
    let t0 = Instant::now();
    let mut drained = f64::NAN;
    while t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Live events keep coming: drained once fewer than a second's worth are stored.
        if metrics::scrape(metrics_port, "floorgate_store_events")
            .await
            .is_some_and(|v| v < 1000.0)
        {
            drained = t0.elapsed().as_secs_f64();
            break;
        }
    }
    let (c1, _) = proc_stat(child.id());
    let cpu = (c1 - c0) / t0.elapsed().as_secs_f64() * 100.0;
    // The kernel's high-water mark: a peak between samples counts too.
    let rss_max = status_mib(child.id(), "VmHWM:");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_after = proc_stat(child.id()).1;
    let _ = child.kill();
    let _ = child.wait();
    stop.cancel();
    (drained, cpu, rss_max, rss_after)
}

/// A store holding `n` events committed [`SMALL_COMMIT`] at a time, closed again.
fn stored_backlog(n: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path(), 4 << 20, 4 << 30).unwrap();
        fill(&store, n, SMALL_COMMIT);
    }
    // sled's I/O threads let go of the directory a moment after the store is dropped.
    drop(reopen(dir.path()).0);
    std::thread::sleep(Duration::from_millis(500));
    dir
}

/// Copies the files of directory `from` (recursively) to `to`.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The reference floor (8 bag dispensers, 4 cabinets on one RS485 line) at `baud`: measured poll
/// cycle against the theoretical wire time of the same transactions, and the coalescing figure.
async fn bus_efficiency(baud: u32) -> serde_json::Value {
    use floorgate::device::ReadPlan;
    let stop = CancellationToken::new();
    let turnaround = Duration::from_millis(2);
    let mut floor = SimFloor::new(8, 4);
    floor.models = false;
    floor.rtu.line = Some(floorgate::sim::LineTiming { baud });
    floor.rtu.turnaround = turnaround;
    let (pty, _) = floor.start_pty(stop.clone()).unwrap();
    let cfg = floorgate::config::parse_str(
        &format!(
            "[gateway]\nid = \"b\"\ninclude = [\"{}/config/profiles/*.toml\"]\n",
            env!("CARGO_MANIFEST_DIR")
        ),
        std::path::Path::new("bench.toml"),
    )
    .unwrap();
    let units: Vec<(u8, ReadPlan)> = (1..=12u8)
        .map(|u| {
            let p = if u <= 8 {
                &cfg.profiles["bag_dispenser"]
            } else {
                &cfg.profiles["charging_cabinet"]
            };
            (u, ReadPlan::new(p, 8).unwrap())
        })
        .collect();
    let points: usize = (1..=12)
        .map(|u| {
            if u <= 8 {
                cfg.profiles["bag_dispenser"].points.len()
            } else {
                cfg.profiles["charging_cabinet"].points.len()
            }
        })
        .sum();
    let transactions: usize = units.iter().map(|(_, p)| p.spans.len()).sum();
    let bus = Bus {
        name: "ref".into(),
        kind: BusKind::Rtu {
            port: pty,
            baud,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
        },
        timeout: Duration::from_millis(1000),
        retries: 0,
        turnaround: Duration::ZERO,
        max_gap: 8,
        backoff_max: Duration::from_secs(1),
    };
    let char_time = 10.0 / baud as f64;
    let t35 = floorgate::bus::link::t35(baud, 10).as_secs_f64();
    // Request 8 bytes; reply 5 + data bytes; device turnaround; the 3.5-character gap before the next.
    let theory: f64 = units
        .iter()
        .flat_map(|(_, p)| p.spans.iter())
        .map(|s| {
            let data = if s.table.is_bit() {
                (s.count as usize).div_ceil(8)
            } else {
                2 * s.count as usize
            };
            (8 + 5 + data) as f64 * char_time + turnaround.as_secs_f64() + t35
        })
        .sum();
    let mut link = floorgate::bus::link::Link::new(&bus);
    let mut cycles = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        for (u, plan) in &units {
            for span in &plan.spans {
                link.read(*u, *span).await.unwrap();
            }
        }
        cycles.push(t0.elapsed().as_secs_f64());
    }
    stop.cancel();
    let best = cycles.iter().copied().fold(f64::MAX, f64::min);
    println!(
        "  reference floor at {baud} baud: cycle {:.0} ms vs theoretical {:.0} ms ({:.0} %); {transactions} transactions per cycle instead of {points} (one per point)",
        best * 1e3,
        theory * 1e3,
        theory / best * 100.0
    );
    json!({"baud": baud, "cycle_ms": best * 1e3, "theoretical_ms": theory * 1e3, "efficiency": theory / best,
           "transactions_per_cycle": transactions, "points": points})
}

/// Device state change → broker, p50/p99, through `floorgate run` (poll 50 ms, default commit).
async fn latency(pki: &Pki, broker: &Broker) -> (f64, f64) {
    let stop = CancellationToken::new();
    let mut floor = SimFloor::new(1, 0);
    floor.models = false;
    let (tcp, devs) = floor
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[gateway]\nid = \"bench-lat\"\nsite = \"b\"\nstate_dir = \"{}\"\ninclude = [\"{}/config/profiles/*.toml\"]\n[metrics]\nlisten = \"off\"\n[uplink]\nurl = \"mqtts://localhost:{}\"\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n[[bus]]\nname = \"lan\"\ntcp = {{ address = \"{tcp}\" }}\n[[device]]\nname = \"d\"\nbus = \"lan\"\nunit = 1\nprofile = \"bag_dispenser\"\npoll = \"50ms\"\n",
        dir.path().join("state").display(),
        env!("CARGO_MANIFEST_DIR"),
        broker.port,
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let mut sub = broker::subscribe(broker, "floorgate/b/bench-lat/events").await;
    let mut child = run_daemon(dir.path(), &text);
    tokio::time::sleep(Duration::from_secs(2)).await;
    while sub.next(Duration::from_millis(200)).await.is_some() {}
    let mut lat = Vec::new();
    for i in 0..60u16 {
        let status = 10 + (i % 2);
        let t0 = Instant::now();
        devs[0]
            .bank()
            .with(|t| t.set_u16(floorgate::sim::bag::HR_STATUS, status));
        let deadline = t0 + Duration::from_secs(3);
        while Instant::now() < deadline {
            let Some((_, p, _)) = sub.next(Duration::from_millis(100)).await else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap_or_default();
            if v["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["values"]["status"] == status))
            {
                lat.push(t0.elapsed().as_secs_f64() * 1e3);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(37)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    stop.cancel();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (pick(0.5), pick(0.99))
}

/// The payloads the uplink sends for the stored backlog, in batches of 100.
fn payloads_of(store: &Store) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    let mut cursor = 0;
    loop {
        let b = store.read_from(cursor, 100).unwrap();
        let Some(last) = b.last() else { break };
        cursor = last.seq() + 1;
        payloads.push(payload("bench-gw", b.iter().map(|s| s.json())));
    }
    payloads
}

/// The parts `FLOORGATE_BENCH_ONLY` names, printed only (for working on one figure).
async fn partial(want: &dyn Fn(&str) -> bool, n: u64) {
    if want("poll") {
        println!("  poll transactions/s over a PTY: {:.0}", poll_rate().await);
    }
    if want("bus") {
        bus_efficiency(9600).await;
        bus_efficiency(19200).await;
    }
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    if want("store") || want("drain") {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Arc::new(Store::open(dir.path(), 4 << 20, 4 << 30).unwrap());
        for _ in 0..env_num("FLOORGATE_BENCH_ROUNDS", 3) {
            let commit = fill(&store, n, env_num("FLOORGATE_BENCH_FILL_BATCH", 1000));
            println!("  events/s committed to the store: {commit:.0}");
            if !want("drain") {
                continue;
            }

            let payloads = payloads_of(&store);
            if env_num("FLOORGATE_BENCH_REOPEN", 0) == 1 {
                // Drain after a restart, as the full run's first round does.
                drop(store);
                store = Arc::new(reopen(dir.path()).0);
            }
            // CPU of this process and of mosquitto in each phase, in cores.
            let mosq = broker.pid().unwrap_or(0);
            let cpu = || {
                (
                    proc_stat(std::process::id()).0,
                    proc_stat(mosq).0,
                    Instant::now(),
                )
            };
            let (a0, m0, t0) = cpu();
            let (plain, plain_cpu) = plain_publisher(payloads, &pki, &broker, n).await;
            let (a1, m1, t1) = cpu();
            let d = drain(store.clone(), &pki, &broker, n).await;
            let (drained, reclaim_ms) = (d.rate, d.reclaim_ms);
            let (a2, m2, t2) = cpu();
            let (w1, w2) = ((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64());
            println!(
                "  cores used, plain: this process {:.2}, mosquitto {:.2}; drain: this process {:.2}, mosquitto {:.2}",
                (a1 - a0) / w1, (m1 - m0) / w1, (a2 - a1) / w2, (m2 - m1) / w2
            );
            println!(
                "  plain {plain:.0} events/s, drain {drained:.0} events/s ({:.2}), blocks deleted {reclaim_ms:.0} ms later; CPU µs/event plain {:.3}, drain {:.3}",
                drained / plain,
                plain_cpu * 1e6 / n as f64,
                d.cpu_s * 1e6 / n as f64
            );
        }
    }
    if want("footprint") {
        let fp_secs = env_num("FLOORGATE_BENCH_FOOTPRINT_SECS", 60);
        let (cpu, rss) = footprint(&pki, &broker, fp_secs, false).await;
        println!("  64 devices at 1 s: CPU {cpu:.2} % of a core, RSS max {rss:.1} MiB");
    }
    if want("footprint") || want("draining") {
        // `draining` alone: only this, FLOORGATE_BENCH_ROUNDS times from one stored backlog.
        let backlog = stored_backlog(n);
        let rounds = if want("footprint") {
            1
        } else {
            env_num("FLOORGATE_BENCH_ROUNDS", 3)
        };
        for _ in 0..rounds {
            let (drain_s, cpu_d, rss_d, rss_a) =
                drain_footprint(&pki, &broker, backlog.path()).await;
            println!("  the same after a restart with {n} events buffered: drained in {drain_s:.1} s, CPU {cpu_d:.0} %, RSS max {rss_d:.1} MiB, 5 s later {rss_a:.1} MiB");
        }
    }
    if want("latency") {
        let (p50, p99) = latency(&pki, &broker).await;
        println!("  latency p50 {p50:.0} ms, p99 {p99:.0} ms");
    }
}

fn main() {
    // The allocator settings of `floorgate run`, so that the in-process drain measures the same.
    floorgate::memory::tune_allocator();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let n = env_num("FLOORGATE_BENCH_EVENTS", 1_000_000);
    let fp_secs = env_num("FLOORGATE_BENCH_FOOTPRINT_SECS", 60);
    println!("floorgate pipeline benchmark ({n} events backlog)");
    let only = std::env::var("FLOORGATE_BENCH_ONLY").ok();
    let want = |part: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|p| p == part))
    };
    if only.is_some() {
        partial(&want, n).await;
        return;
    }
    let tx = poll_rate().await;
    println!("  poll transactions/s over a PTY (11 registers each): {tx:.0}");

    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path(), 4 << 20, 4 << 30).unwrap());
    let commit = fill(&store, n, 1000);
    println!("  events/s committed to the store (batches of 1000, flushed): {commit:.0}");
    // The same payloads the uplink will send, for the plain publisher.
    let payloads = payloads_of(&store);
    // Start-up with the whole backlog stored: reopening reads counters, it does not scan.
    drop(store);
    let (store, open_full_ms) = reopen(dir.path());
    let store = Arc::new(store);
    assert_eq!(store.stats().events, n);
    println!("  store open with {n} events buffered: {open_full_ms:.1} ms");

    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    // Three rounds, alternating, so that both sides see the same machine; best of each.
    let mut plains = Vec::new();
    let mut drains = Vec::new();
    let mut reclaims = Vec::new();
    // CPU µs per event of this process (the publisher's side only; mosquitto not included).
    let (mut plain_cpus, mut drain_cpus) = (Vec::new(), Vec::new());
    for round in 0..3 {
        if round > 0 {
            fill(&store, n, 1000);
        }
        let (plain, plain_cpu) = plain_publisher(payloads.clone(), &pki, &broker, n).await;
        plains.push(plain);
        plain_cpus.push(plain_cpu * 1e6 / n as f64);
        let d = drain(store.clone(), &pki, &broker, n).await;
        drains.push(d.rate);
        reclaims.push(d.reclaim_ms);
        drain_cpus.push(d.cpu_s * 1e6 / n as f64);
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (plain, drained) = (best(&plains), best(&drains));
    println!("  plain rumqttc publisher, same payloads, mTLS QoS 1: {plain:.0} events/s (rounds: {plains:.0?})");
    println!("  floorgate drain of the backlog (store → PUBACK → acknowledged in the store): {drained:.0} events/s ({:.2} of plain; rounds: {drains:.0?})", drained / plain);
    println!("  CPU µs per event of the publishing process: plain {plain_cpus:.3?}, drain {drain_cpus:.3?}");
    println!("  acknowledged blocks deleted from the store after the drain within {:.0} ms (rounds: {reclaims:.0?})", best(&reclaims));
    drop(store);
    let (s, open_ms) = reopen(dir.path());
    drop(s);
    // The same backlog committed the way a floor commits it: small groups (50 events per
    // commit, a busy floor's 50 ms group commit), so blocks of about 25 events per class.
    let small_dir = tempfile::tempdir().unwrap();
    let small = Arc::new(Store::open(small_dir.path(), 4 << 20, 4 << 30).unwrap());
    fill(&small, n, SMALL_COMMIT);
    let small_payloads = payloads_of(&small);
    let (small_plain, _) = plain_publisher(small_payloads, &pki, &broker, n).await;
    let small_drain = drain(small.clone(), &pki, &broker, n).await;
    drop(small);
    println!(
        "  drain of a backlog committed {SMALL_COMMIT} events at a time: {:.0} events/s ({:.2} of plain {small_plain:.0}), CPU {:.3} µs/event, blocks deleted {:.0} ms later",
        small_drain.rate,
        small_drain.rate / small_plain,
        small_drain.cpu_s * 1e6 / n as f64,
        small_drain.reclaim_ms
    );
    let (cpu, rss) = footprint(&pki, &broker, fp_secs, false).await;
    let (cpu_b, rss_b) = footprint(&pki, &broker, fp_secs, true).await;
    println!("  the same while buffering (uplink unreachable): CPU {cpu_b:.2} % of a core, RSS max {rss_b:.1} MiB");
    let backlog = stored_backlog(n);
    let (drain_s, cpu_d, rss_d, rss_a) = drain_footprint(&pki, &broker, backlog.path()).await;
    drop(backlog);
    println!("  the same after a restart with {n} events buffered ({SMALL_COMMIT} per commit): drained in {drain_s:.1} s, CPU {cpu_d:.0} % of a core, RSS max {rss_d:.1} MiB meanwhile, {rss_a:.1} MiB 5 s later");
    let bus9600 = bus_efficiency(9600).await;
    let bus19200 = bus_efficiency(19200).await;
    let (p50, p99) = latency(&pki, &broker).await;
    println!("  state change → broker latency (poll 50 ms, commit 50 ms): p50 {p50:.0} ms, p99 {p99:.0} ms");
    let binary = std::fs::metadata(env!("CARGO_BIN_EXE_floorgate"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "  release binary: {:.1} MiB",
        binary as f64 / (1 << 20) as f64
    );
    println!("  floorgate run, 64 devices polled at 1 s over Modbus TCP: CPU {cpu:.2} % of a core, RSS max {rss:.1} MiB");
    let result = json!({
        "schema": "floorgate-bench/v1",
        "machine": { "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "os": std::env::consts::OS, "arch": std::env::consts::ARCH },
        "poll_transactions_per_s_pty": tx,
        "store_commit_events_per_s": commit,
        "store_open_ms_with_backlog": open_full_ms,
        "store_reopen_ms_after_drain": open_ms,
        "drain_events_per_s": drained,
        "plain_publisher_events_per_s": plain,
        "drain_ratio_to_plain": drained / plain,
        "drain_rounds_events_per_s": drains,
        "drain_blocks_deleted_ms_after": reclaims,
        "plain_rounds_events_per_s": plains,
        "plain_rounds_cpu_us_per_event": plain_cpus,
        "drain_small_commits": {
            "events_per_commit": SMALL_COMMIT,
            "drain_events_per_s": small_drain.rate,
            "plain_publisher_events_per_s": small_plain,
            "drain_ratio_to_plain": small_drain.rate / small_plain,
            "drain_cpu_us_per_event": small_drain.cpu_s * 1e6 / n as f64,
            "blocks_deleted_ms_after": small_drain.reclaim_ms
        },
        "drain_rounds_cpu_us_per_event": drain_cpus,
        "footprint_64_devices": { "cpu_percent": cpu, "rss_max_mib": rss, "window_s": fp_secs },
        "footprint_64_devices_buffering": { "cpu_percent": cpu_b, "rss_max_mib": rss_b, "window_s": fp_secs },
        "footprint_64_devices_draining": { "backlog_events": n, "events_per_commit": SMALL_COMMIT, "drained_s": drain_s, "cpu_percent": cpu_d, "rss_max_mib": rss_d, "rss_after_5s_mib": rss_a },
        "backlog_events": n,
        "bus_efficiency": [bus9600, bus19200],
        "latency_ms": { "p50": p50, "p99": p99 },
        "binary_bytes": binary,
        "targets": { "drain_events_per_s": 100000, "drain_ratio_to_plain": 0.8, "rss_max_mib": 20, "cpu_percent": 2 }
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("pipeline.json"),
        serde_json::to_string_pretty(&result).unwrap(),
    )
    .unwrap();
    println!("  written to target/bench/pipeline.json");
}
