//! `floorgate demo`: a zero-setup showcase. A simulated floor (RS485 on a pseudo-terminal and a
//! Modbus TCP segment), an embedded MQTT broker, the real pipeline and store, a live view of what
//! reaches the broker, and a simulated uplink outage that buffers and then drains.

use super::Failure;
use crate::daemon::{self, Shared};
use crate::sim::broker::DemoBroker;
use crate::sim::{SimFloor, TimeScale};
use crate::store::Store;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const BAG_PROFILE: &str = include_str!("../../config/profiles/bag_dispenser.toml");
const CABINET_PROFILE: &str = include_str!("../../config/profiles/charging_cabinet.toml");

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// When the simulated uplink outage starts.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    outage_after: Duration,
    /// How long the outage lasts.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    outage_for: Duration,
    /// Show only a summary line every few seconds instead of every event.
    #[arg(long)]
    quiet: bool,
}

fn describe(e: &serde_json::Value) -> String {
    let kind = e["kind"].as_str().unwrap_or("?");
    let detail = match kind {
        "counter" => format!(
            "{} +{} (total {}){}",
            e["point"].as_str().unwrap_or(""),
            e["delta"],
            e["total"],
            if e["reset"] == true { " RESET" } else { "" }
        ),
        "alarm" => format!(
            "{} {} [{}] value {}",
            e["alarm"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            e["severity"].as_str().unwrap_or(""),
            e["value"]
        ),
        "device" => format!(
            "{}{}",
            e["state"].as_str().unwrap_or(""),
            e["error"]
                .as_str()
                .map(|x| format!(" ({x})"))
                .unwrap_or_default()
        ),
        "gap" => format!(
            "{} dropped (seq {}..{})",
            e["dropped"], e["first_seq"], e["last_seq"]
        ),
        _ => {
            let v = e["values"].to_string();
            if v.len() > 90 {
                format!(
                    "{}…",
                    &v[..v.char_indices().nth(89).map_or(v.len(), |(i, _)| i)]
                )
            } else {
                v
            }
        }
    };
    format!(
        "{:>7}  {:<12} {:<9} {}",
        e["seq"],
        e["device"].as_str().unwrap_or("-"),
        kind,
        detail
    )
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    let dir = tempfile::Builder::new()
        .prefix("floorgate-demo-")
        .tempdir()
        .map_err(|e| Failure::new(format!("cannot create a temporary directory: {e}")))?;
    // The floor: one RS485 line (pseudo-terminal) and one Modbus TCP segment, a busy day in minutes.
    let ts = TimeScale::compressed(Duration::from_secs(240)).with_rate(3.0);
    let mut rtu_floor = SimFloor::new(2, 1);
    rtu_floor.timescale = ts;
    let (pty, _) = rtu_floor
        .start_pty(shutdown.clone())
        .map_err(|e| Failure::new(format!("cannot open a pseudo-terminal: {e}")))?;
    let mut tcp_floor = SimFloor::new(1, 1);
    tcp_floor.timescale = ts;
    let (tcp, _) = tcp_floor
        .start_tcp(([127, 0, 0, 1], 0).into(), shutdown.clone())
        .await
        .map_err(|e| Failure::new(format!("cannot start the TCP simulator: {e}")))?;
    let (broker, broker_addr) = DemoBroker::start(([127, 0, 0, 1], 0).into(), shutdown.clone())
        .await
        .map_err(|e| Failure::new(format!("cannot start the embedded broker: {e}")))?;
    let profiles = dir.path().join("profiles");
    std::fs::create_dir_all(&profiles).map_err(Failure::new)?;
    std::fs::write(profiles.join("bag_dispenser.toml"), BAG_PROFILE).map_err(Failure::new)?;
    std::fs::write(profiles.join("charging_cabinet.toml"), CABINET_PROFILE)
        .map_err(Failure::new)?;
    let config_text = format!(
        r#"[gateway]
id = "demo-gw"
site = "demo"
state_dir = "{state}"
include = ["profiles/*.toml"]

[store]
commit_interval = "50ms"

[uplink]
# The embedded demo broker listens on loopback only; real deployments use mqtts://.
url = "mqtt://{broker}"
allow_plaintext = true
max_batch = 100

[metrics]
listen = "off"

[[bus]]
name = "rs485"
rtu = {{ port = "{pty}", baud = 19200 }}
timeout = "200ms"

[[bus]]
name = "lan"
tcp = {{ address = "{tcp}" }}

[[device]]
name = "bags-1"
bus = "rs485"
unit = 1
profile = "bag_dispenser"
poll = "500ms"

[[device]]
name = "bags-2"
bus = "rs485"
unit = 2
profile = "bag_dispenser"
poll = "500ms"

[[device]]
name = "cabinet-1"
bus = "rs485"
unit = 3
profile = "charging_cabinet"
poll = "500ms"

[[device]]
name = "bags-3"
bus = "lan"
unit = 1
profile = "bag_dispenser"
poll = "500ms"

[[device]]
name = "cabinet-2"
bus = "lan"
unit = 2
profile = "charging_cabinet"
poll = "500ms"
"#,
        state = dir.path().join("state").display(),
        broker = broker_addr,
        pty = pty.display(),
        tcp = tcp,
    );
    let config_path = dir.path().join("floorgate.toml");
    std::fs::write(&config_path, &config_text).map_err(Failure::new)?;
    let config = crate::config::load(&config_path).map_err(Failure::config)?;
    let store = Arc::new(
        Store::open(
            &config.gateway.state_dir,
            config.store.cache_bytes,
            config.store.max_bytes,
        )
        .map_err(Failure::new)?
        .with_min_free(config.store.min_free),
    );
    let shared = Shared::new(store.clone());
    println!("floorgate demo");
    println!(
        "  floor:  3 devices on RS485 ({}), 2 on Modbus TCP ({tcp})",
        pty.display()
    );
    println!(
        "  broker: embedded MQTT 5 on {broker_addr}; uplink outage at +{}s for {}s",
        a.outage_after.as_secs(),
        a.outage_for.as_secs()
    );
    println!("  store:  {}", config.gateway.state_dir.display());
    println!("  config: {}\n", config_path.display());
    println!("{:>7}  {:<12} {:<9} detail", "seq", "device", "kind");

    let mut feed = broker.feed();
    let stop = CancellationToken::new();
    let stop_pipeline = stop.clone();
    let path = config_path.clone();
    let pipeline = tokio::spawn(async move { daemon::run_with(&path, config, shared, stop).await });
    let started = Instant::now();
    let end = a.duration.map(|d| started + d);
    let outage_start = started + a.outage_after;
    let outage_end = outage_start + a.outage_for;
    let mut in_outage = false;
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut duplicates = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            msg = feed.recv() => {
                let Ok(msg) = msg else { continue };
                if !msg.topic.ends_with("/events") {
                    continue;
                }
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&msg.payload) else { continue };
                let events = v["events"].as_array().cloned().unwrap_or_default();
                if events.len() > 1 {
                    println!("         ── backlog batch of {} events", events.len());
                }
                for e in events {
                    let seq = e["seq"].as_u64().unwrap_or(0);
                    if !seen.insert(seq) {
                        duplicates += 1;
                    }
                    if !a.quiet && (events_len_small(&v) || e["kind"] != "telemetry") {
                        println!("{}", describe(&e));
                    }
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if !in_outage && now >= outage_start && now < outage_end {
                    in_outage = true;
                    broker.set_down(true);
                    println!("\n  ⚡ OUTAGE: the broker is unreachable — events keep being polled and stored\n");
                } else if in_outage && now >= outage_end {
                    in_outage = false;
                    broker.set_down(false);
                    println!("\n  ✔ broker back: {} events buffered; draining in order\n", store.stats().events);
                }
                let st = store.stats();
                let missing = match (seen.first(), seen.last()) {
                    (Some(a), Some(b)) => (b - a + 1) - seen.len() as u64,
                    _ => 0,
                };
                println!(
                    "  [{:>4}s] stored {:>5} | delivered {:>6} (seq {}..{}, missing {}, redelivered {}){}",
                    started.elapsed().as_secs(),
                    st.events,
                    seen.len(),
                    seen.first().copied().unwrap_or(0),
                    seen.last().copied().unwrap_or(0),
                    missing,
                    duplicates,
                    if in_outage { " | OUTAGE" } else { "" }
                );
                if end.is_some_and(|e| now >= e) {
                    break;
                }
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    stop_pipeline.cancel();
    let result = pipeline.await;
    shutdown.cancel();
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(Failure::new(e)),
        Err(e) => return Err(Failure::new(e)),
    }
    println!(
        "\ndemo finished: {} events delivered, {} still stored",
        seen.len(),
        store.stats().events
    );
    Ok(())
}

fn events_len_small(v: &serde_json::Value) -> bool {
    v["events"].as_array().is_some_and(|e| e.len() <= 3)
}
