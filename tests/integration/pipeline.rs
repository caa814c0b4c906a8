//! The whole pipeline: simulators on a PTY and on TCP → `floorgate run` → mosquitto over mTLS.

use crate::support::broker::{subscribe, Broker, Pki, Subscriber};
use crate::support::gateway::{config, uplink_for, Gateway, Received};
use floorgate::sim::{bag, cabinet, Device};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(crate) use crate::support::still_floor;

/// Collects events from `sub` until `done` holds for what was received (or the timeout).
pub(crate) async fn receive_until(
    sub: &mut Subscriber,
    rx: &mut Received,
    within: Duration,
    mut done: impl FnMut(&Received) -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while !done(rx) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        if let Some((topic, payload, _)) = sub.next(left.min(Duration::from_millis(200))).await {
            if topic.ends_with("/events") {
                rx.add_payload(&payload);
            }
        }
    }
    true
}

/// Waits (15 s at most) until a `state` event of `device` arrived; fails with the gateway's log.
pub(crate) async fn expect_state(
    sub: &mut Subscriber,
    rx: &mut Received,
    device: &str,
    gw: &Gateway,
) {
    assert!(
        receive_until(sub, rx, Duration::from_secs(15), |rx| !rx
            .of(device, "state")
            .is_empty())
        .await,
        "{}",
        gw.log()
    );
}

/// The uplink section `uplink`, then two bag dispensers (b1, b2, polled every 30 ms) on a TCP bus.
pub(crate) fn two_bags(uplink: &str, tcp: std::net::SocketAddr) -> String {
    format!(
        "{uplink}{}{}{}",
        tcp_bus("lan", tcp),
        device("b1", "lan", 1, "bag_dispenser", "30ms"),
        device("b2", "lan", 2, "bag_dispenser", "30ms")
    )
}

pub(crate) fn rtu_bus(name: &str, port: &std::path::Path, timeout: &str) -> String {
    format!("[[bus]]\nname = \"{name}\"\nrtu = {{ port = \"{}\", baud = 19200 }}\ntimeout = \"{timeout}\"\nretries = 0\nbackoff_max = \"2s\"\n\n", port.display())
}

pub(crate) fn tcp_bus(name: &str, addr: std::net::SocketAddr) -> String {
    format!("[[bus]]\nname = \"{name}\"\ntcp = {{ address = \"{addr}\" }}\ntimeout = \"300ms\"\n\n")
}

pub(crate) fn device(name: &str, bus: &str, unit: u8, profile: &str, poll: &str) -> String {
    format!("[[device]]\nname = \"{name}\"\nbus = \"{bus}\"\nunit = {unit}\nprofile = \"{profile}\"\npoll = \"{poll}\"\n\n")
}

fn last_values(rx: &Received, device: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    for kind in ["state", "telemetry"] {
        for e in rx.of(device, kind) {
            if let Some(v) = e["values"].as_object() {
                m.extend(v.clone());
            }
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_decode_exactly_as_the_devices_hold_them_over_rtu_and_tcp() {
    let stop = CancellationToken::new();
    let (pty, rtu_devs) = still_floor(1, 1).start_pty(stop.clone()).unwrap();
    let (tcp, tcp_devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let (bagd, cab, tbag): (&Device, &Device, &Device) = (&rtu_devs[0], &rtu_devs[1], &tcp_devs[0]);
    bagd.bank().with(|t| {
        t.set_input_i16(bag::IR_TEMPERATURE, -123);
        t.set_input(bag::IR_SUPPLY_VOLTAGE, 2412);
        t.set_u32_abcd(bag::HR_BAGS_DISPENSED, 70_000);
        t.set_u16(bag::HR_STOCK, 321);
        t.set_discrete(bag::DI_DOOR_OPEN, true);
    });
    cab.bank().with(|t| {
        let base = cabinet::slot_base(3);
        t.set_u16(base, 0b011);
        t.set_u16(base + 1, 42);
        t.set_u32_abcd(base + 2, 0xDEAD_BEEF);
    });
    tbag.bank().with(|t| t.set_u16(bag::HR_STOCK, 17));

    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-dec/events").await;
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-dec",
            state,
            metrics,
            &format!(
                "{}{}{}{}{}{}",
                uplink_for(&pki, &broker),
                rtu_bus("rs485", &pty, "300ms"),
                tcp_bus("lan", tcp),
                device("bags-1", "rs485", 1, "bag_dispenser", "200ms"),
                device("cab-1", "rs485", 2, "charging_cabinet", "200ms"),
                device("bags-2", "lan", 1, "bag_dispenser", "200ms"),
            ),
        )
    });
    let mut rx = Received::default();
    let ok = receive_until(&mut sub, &mut rx, Duration::from_secs(20), |rx| {
        ["bags-1", "cab-1", "bags-2"]
            .iter()
            .all(|d| !rx.of(d, "telemetry").is_empty() && !rx.of(d, "state").is_empty())
    })
    .await;
    assert!(
        ok,
        "snapshots of all devices arrive; got {:?}\nlog:\n{}",
        rx.events,
        gw.log()
    );

    let b = last_values(&rx, "bags-1");
    assert_eq!(
        b["temperature"].as_f64().map(|t| (t * 10.0).round()),
        Some(-123.0)
    );
    assert_eq!(
        b["supply_voltage"].as_f64().map(|v| (v * 100.0).round()),
        Some(2412.0)
    );
    assert_eq!(b["stock"], 321);
    assert_eq!(b["bags_dispensed"], 70_000);
    assert_eq!(b["model"], "BAGDISP1");
    assert_eq!(b["door_open"], true);
    assert_eq!(b["jam"], false);
    let c = last_values(&rx, "cab-1");
    assert_eq!(c["slot3.present"], true);
    assert_eq!(c["slot3.charging"], true);
    assert_eq!(c["slot3.fault"], false);
    assert_eq!(c["slot3.battery"], 42);
    assert_eq!(c["slot3.bank_id"], 0xDEAD_BEEFu64);
    assert_eq!(c["slot9.present"], false);
    assert_eq!(c["model"], "CHGCAB12");
    assert_eq!(last_values(&rx, "bags-2")["stock"], 17);
    for d in ["bags-1", "cab-1", "bags-2"] {
        assert_eq!(
            rx.of(d, "device").first().map(|e| e["state"].clone()),
            Some("online".into()),
            "{d} online first"
        );
    }
    rx.assert_seq_identity();
    rx.assert_per_device_order();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_counters_and_alarms_become_events() {
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(1, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let d = &devs[0];
    d.bank().with(|t| {
        t.set_u32_abcd(bag::HR_BAGS_DISPENSED, 65_530);
        t.set_u16(bag::HR_STOCK, 400);
    });
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-ev/events").await;
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-ev",
            state,
            metrics,
            &format!(
                "{}{}{}",
                uplink_for(&pki, &broker),
                tcp_bus("lan", tcp),
                device("bags", "lan", 1, "bag_dispenser", "100ms")
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut sub, &mut rx, "bags", &gw).await;
    // A counter moving across the u16 boundary is still one u32 counter: +10.
    d.bank()
        .with(|t| t.set_u32_abcd(bag::HR_BAGS_DISPENSED, 65_540));
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
            .counter_sum("bags", "bags_dispensed")
            >= 10)
        .await
    );
    // A device reset (counter back to a small value) is flagged.
    d.bank().with(|t| t.set_u32_abcd(bag::HR_BAGS_DISPENSED, 3));
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
            .of("bags", "counter")
            .iter()
            .any(|e| e["reset"] == true))
        .await
    );
    let reset = rx
        .of("bags", "counter")
        .into_iter()
        .find(|e| e["reset"] == true)
        .unwrap();
    assert_eq!(
        (reset["delta"].clone(), reset["total"].clone()),
        (3.into(), 3.into())
    );
    // A jam lasting beyond the 2 s debounce raises the alarm; clearing it clears the alarm.
    d.bank().with(|t| {
        t.set_discrete(bag::DI_JAM, true);
        t.set_u16(bag::HR_STATUS, bag::STATUS_FAULT);
    });
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
            .of("bags", "alarm")
            .iter()
            .any(|e| e["state"] == "raised"))
        .await
    );
    let raised = rx
        .of("bags", "alarm")
        .into_iter()
        .find(|e| e["state"] == "raised")
        .unwrap();
    assert_eq!(raised["alarm"], "jammed");
    assert_eq!(raised["severity"], "critical");
    let jam_seen = rx
        .of("bags", "state")
        .into_iter()
        .find(|e| e["values"]["jam"] == true)
        .unwrap();
    let raised_ts = raised["ts"].as_u64().unwrap();
    assert!(
        raised_ts >= jam_seen["ts"].as_u64().unwrap() + 1_900,
        "debounce of 2s respected"
    );
    d.bank().with(|t| t.set_discrete(bag::DI_JAM, false));
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
            .of("bags", "alarm")
            .iter()
            .any(|e| e["state"] == "cleared"))
        .await
    );
    // Telemetry below the deadband (1 bag) is not an event; beyond it is.
    let before = rx.of("bags", "telemetry").len();
    d.bank().with(|t| t.set_u16(bag::HR_STOCK, 390));
    assert!(
        receive_until(&mut sub, &mut rx, Duration::from_secs(10), |rx| rx
            .of("bags", "telemetry")
            .iter()
            .any(|e| e["values"]["stock"] == 390))
        .await
    );
    assert_eq!(rx.of("bags", "telemetry").len(), before + 1);
    rx.assert_seq_identity();
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_serves_any_profile_and_the_gateway_decodes_it() {
    let port = crate::support::gateway::free_port();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/floorgate.example.toml");
    let mut sim = std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args([
            "simulate",
            "--profile",
            "door_io",
            "--count",
            "2",
            "--config",
            example,
            "--tcp",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let mut sub = subscribe(&broker, "floorgate/test/gw-any/events").await;
    let example_profiles = format!(
        "{}/config/floorgate.example.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    let profile_text = std::fs::read_to_string(&example_profiles).unwrap();
    let door_io = &profile_text[profile_text.find("[profiles.door_io]").unwrap()..];
    let gw = Gateway::start(|state, metrics| {
        config(
            "gw-any",
            state,
            metrics,
            &format!(
                "{}[[bus]]\nname = \"lan\"\ntcp = {{ address = \"127.0.0.1:{port}\" }}\n\n{}{}{door_io}",
                uplink_for(&pki, &broker),
                device("io-1", "lan", 1, "door_io", "200ms"),
                device("io-2", "lan", 2, "door_io", "200ms"),
            ),
        )
    });
    let mut rx = Received::default();
    let ok = receive_until(&mut sub, &mut rx, Duration::from_secs(20), |rx| {
        ["io-1", "io-2"]
            .iter()
            .all(|d| rx.of(d, "counter").len() >= 2 && !rx.of(d, "telemetry").is_empty())
    })
    .await;
    let _ = sim.kill();
    let _ = sim.wait();
    assert!(ok, "{:?}\n{}", rx.events, gw.log());
    for e in rx.of("io-1", "telemetry") {
        let t = e["values"]["room_temperature"].as_f64().unwrap();
        assert!(
            (15.0..=25.0).contains(&t),
            "f32 CDAB decoded to a plausible value: {t}"
        );
    }
    assert!(rx
        .of("io-2", "counter")
        .iter()
        .all(|e| e["point"] == "openings" && e["delta"].as_u64() >= Some(1)));
}
