//! Remote configuration: signed pushes apply, bad ones are rejected with the reason, and a config
//! that breaks the uplink rolls back by itself without losing or duplicating a buffered event.

use crate::pipeline::{device, expect_state, receive_until, still_floor, tcp_bus};
use crate::support::broker::{publish, subscribe, Broker, Pki, Subscriber};
use crate::support::gateway::{config, uplink_for, Gateway, Received};
use crate::support::tls_floor;
use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn signed(key: &SigningKey, version: u64, toml: &str) -> Vec<u8> {
    let sig = key.sign(&floorgate::remote::signing_message(version, toml));
    serde_json::to_vec(
        &serde_json::json!({"version": version, "toml": toml, "sig": b64(&sig.to_bytes())}),
    )
    .unwrap()
}

/// Waits for the retained config/state of `version`.
async fn state_of(sub: &mut Subscriber, version: u64, within: Duration) -> serde_json::Value {
    first_json(sub, within, |topic, v| topic.ends_with("/config/state") && v["version"] == version)
        .await
        .unwrap_or_else(|| serde_json::json!({"status": "none", "error": format!("no config/state for version {version}")}))
}

/// The first JSON message on `sub` for which `pred(topic, message)` holds, within `within`.
async fn first_json(
    sub: &mut Subscriber,
    within: Duration,
    pred: impl Fn(&str, &serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        if let Some((topic, payload, _)) = sub.next(left).await {
            let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
            if pred(&topic, &v) {
                return Some(v);
            }
        }
    }
}

/// What the signed-push tests share: still bag dispensers on Modbus TCP, a TLS broker, a signing
/// key, an `[uplink]` section that requires its signatures with a health gate of `window`, and
/// subscriptions to the gateway's events and config states.
/// It lives as long as the gateway runs: `_pki` owns the certificate files both read.
struct Signed {
    stop: CancellationToken,
    tcp: std::net::SocketAddr,
    devs: Vec<floorgate::sim::Device>,
    _pki: Pki,
    broker: Broker,
    key: SigningKey,
    events: Subscriber,
    states: Subscriber,
    uplink: String,
}

impl Signed {
    async fn start(gateway: &str, bags: usize, seed: u8, window: &str) -> Signed {
        let (stop, tcp, devs, pki, broker) = tls_floor(bags, 0).await;
        let key = SigningKey::from_bytes(&[seed; 32]);
        let public = b64(key.verifying_key().as_bytes());
        let events = subscribe(&broker, &format!("floorgate/test/{gateway}/events")).await;
        let states = subscribe(&broker, &format!("floorgate/test/{gateway}/config/state")).await;
        let uplink = format!(
            "{}config_public_key = \"{public}\"\nconfig_window = \"{window}\"\n",
            uplink_for(&pki, &broker)
        );
        Signed {
            stop,
            tcp,
            devs,
            _pki: pki,
            broker,
            key,
            events,
            states,
            uplink,
        }
    }
}

/// `text` with the uplink pointed at a port nobody listens on instead of `broker`.
fn dead_broker(broker: &Broker, text: &str) -> String {
    let dead_port = crate::support::gateway::free_port();
    let dead = text.replace(
        &format!("localhost:{}", broker.port),
        &format!("localhost:{dead_port}"),
    );
    assert_ne!(dead, text);
    dead
}

/// Asserts that the seqs received run without a hole.
fn assert_no_seq_hole(rx: &Received, what: &str) {
    let seqs = rx.seqs();
    assert_eq!(
        seqs.len() as u64,
        seqs.last().unwrap() - seqs.first().unwrap() + 1,
        "{what}"
    );
}

/// (version, status) of each entry of `floorgate config history --json`.
fn statuses(history: &serde_json::Value) -> Vec<(u64, String)> {
    history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["version"].as_u64().unwrap(),
                e["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_config_applies_bad_ones_are_rejected_and_a_broken_uplink_rolls_back() {
    let mut rig = Signed::start("gw-rc", 2, 42, "4s").await;
    let rest =
        |devices: &str, uplink: &str| format!("{uplink}{}{devices}", tcp_bus("lan", rig.tcp));
    let one = device("b1", "lan", 1, "bag_dispenser", "100ms");
    let two = format!("{one}{}", device("b2", "lan", 2, "bag_dispenser", "100ms"));
    let mut gw =
        Gateway::start(|state, metrics| config("gw-rc", state, metrics, &rest(&one, &rig.uplink)));
    let mut rx = Received::default();
    expect_state(&mut rig.events, &mut rx, "b1", &gw).await;
    gw.expect_log("control link subscribed", Duration::from_secs(10))
        .await;
    let base = std::fs::read_to_string(&gw.config_path).unwrap();
    let with_two = base.replace(&one, &two);
    let topic = "floorgate/test/gw-rc/config/set";

    // A signed config applies and changes what is polled.
    publish(&rig.broker, topic, signed(&rig.key, 5, &with_two), false).await;
    let st = state_of(&mut rig.states, 5, Duration::from_secs(15)).await;
    assert_eq!(st["status"], "applied", "{st}\n{}", gw.log());
    assert!(
        receive_until(&mut rig.events, &mut rx, Duration::from_secs(10), |rx| !rx
            .of("b2", "state")
            .is_empty())
        .await
    );

    // Rejections, each with its reason.
    let mut forged =
        serde_json::from_slice::<serde_json::Value>(&signed(&rig.key, 6, &with_two)).unwrap();
    forged["toml"] = serde_json::Value::String(with_two.replace("100ms", "10ms"));
    publish(
        &rig.broker,
        topic,
        serde_json::to_vec(&forged).unwrap(),
        false,
    )
    .await;
    let st = state_of(&mut rig.states, 6, Duration::from_secs(10)).await;
    assert_eq!(st["status"], "rejected");
    assert!(
        st["error"].as_str().unwrap().contains("bad signature"),
        "{st}"
    );
    let unsigned =
        serde_json::to_vec(&serde_json::json!({"version": 7, "toml": with_two})).unwrap();
    publish(&rig.broker, topic, unsigned, false).await;
    assert!(
        state_of(&mut rig.states, 7, Duration::from_secs(10)).await["error"]
            .as_str()
            .unwrap()
            .contains("unsigned")
    );
    publish(&rig.broker, topic, signed(&rig.key, 4, &with_two), false).await;
    assert!(
        state_of(&mut rig.states, 4, Duration::from_secs(10)).await["error"]
            .as_str()
            .unwrap()
            .contains("not newer")
    );
    publish(
        &rig.broker,
        topic,
        signed(&rig.key, 8, "[gateway\nid = 1"),
        false,
    )
    .await;
    let st = state_of(&mut rig.states, 8, Duration::from_secs(10)).await;
    assert!(
        st["error"].as_str().unwrap().starts_with("config v8:"),
        "{st}"
    );
    publish(
        &rig.broker,
        topic,
        signed(
            &rig.key,
            9,
            &with_two.replace("profile = \"bag_dispenser\"", "profile = \"ghost\""),
        ),
        false,
    )
    .await;
    assert!(
        state_of(&mut rig.states, 9, Duration::from_secs(10)).await["error"]
            .as_str()
            .unwrap()
            .contains("unknown profile \"ghost\"")
    );

    // An old version is refused after a restart too.
    assert_eq!(
        gw.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    let mut status = subscribe(&rig.broker, "floorgate/test/gw-rc/status").await;
    status.drain();
    gw.spawn();
    // The birth message is published after the subscriptions, so once it is seen they are in place.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (_, payload, retain) = status.next(left).await.expect("birth after restart");
        let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        if v["state"] == "online" && !retain {
            assert_eq!(
                v["config_version"], 5,
                "the applied version survives the restart"
            );
            break;
        }
    }
    publish(&rig.broker, topic, signed(&rig.key, 3, &with_two), false).await;
    let st = state_of(&mut rig.states, 3, Duration::from_secs(10)).await;
    assert_eq!(st["status"], "rejected", "{st}");
    assert!(
        st["error"].as_str().unwrap().contains("not newer than 5"),
        "the highest version survives the restart: {st}"
    );

    // A config pointing at a dead broker rolls back by itself; events keep flowing exactly once.
    let dead = dead_broker(&rig.broker, &with_two);
    publish(&rig.broker, topic, signed(&rig.key, 10, &dead), false).await;
    rig.devs[0]
        .bank()
        .with(|t| t.set_u16(floorgate::sim::bag::HR_STOCK, 321));
    let st = state_of(&mut rig.states, 10, Duration::from_secs(20)).await;
    assert_eq!(st["status"], "rolled_back", "{st}\n{}", gw.log());
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("uplink did not reconnect"),
        "{st}"
    );
    assert!(
        receive_until(&mut rig.events, &mut rx, Duration::from_secs(10), |rx| rx
            .of("b1", "telemetry")
            .iter()
            .any(|e| e["values"]["stock"] == 321))
        .await
    );
    rx.assert_seq_identity();
    assert_no_seq_hole(&rx, "apply and rollback lose no seq");
    let h = config_history(&gw.config_path);
    assert_eq!(
        statuses(&h),
        vec![(5, "applied".to_string()), (10, "rolled_back".to_string())]
    );
    assert_eq!(h["current"], 5);
    // By hand: back to the local file; the running daemon reloads at once.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["config", "rollback", "local", "--config"])
        .arg(&gw.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("the daemon is reloading"));
    assert!(
        gw.wait_log(
            "reload requested over the control socket",
            Duration::from_secs(5)
        )
        .await
    );
    let h = config_history(&gw.config_path);
    assert_eq!(h["current"], serde_json::Value::Null);
    rig.stop.cancel();
}

/// A gateway killed while a pushed configuration is in its health gate starts again with the
/// configuration from before, says so on `config/state`, and loses no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_during_the_health_gate_rolls_back_when_it_starts_again() {
    // The gate waits up to a minute for the uplink: long enough to be killed in it.
    let mut rig = Signed::start("gw-kg", 1, 43, "60s").await;
    let one = device("b1", "lan", 1, "bag_dispenser", "100ms");
    let mut gw = Gateway::start(|state, metrics| {
        config(
            "gw-kg",
            state,
            metrics,
            &format!("{}{}{one}", rig.uplink, tcp_bus("lan", rig.tcp)),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut rig.events, &mut rx, "b1", &gw).await;
    gw.expect_log("control link subscribed", Duration::from_secs(10))
        .await;
    let base = std::fs::read_to_string(&gw.config_path).unwrap();
    let dead = dead_broker(&rig.broker, &base);

    // A configuration that cannot reach the broker: its gate would wait out the minute.
    publish(
        &rig.broker,
        "floorgate/test/gw-kg/config/set",
        signed(&rig.key, 5, &dead),
        false,
    )
    .await;
    gw.expect_log("applying pushed configuration", Duration::from_secs(10))
        .await;
    // Stock changes while the gateway buffers for the unreachable broker, then it dies.
    rig.devs[0]
        .bank()
        .with(|t| t.set_u16(floorgate::sim::bag::HR_STOCK, 222));
    tokio::time::sleep(Duration::from_millis(500)).await;
    gw.kill9();
    rig.devs[0]
        .bank()
        .with(|t| t.set_u16(floorgate::sim::bag::HR_STOCK, 333));
    gw.spawn();

    let st = state_of(&mut rig.states, 5, Duration::from_secs(20)).await;
    assert_eq!(st["status"], "rolled_back", "{st}\n{}", gw.log());
    assert_eq!(
        st["error"].as_str(),
        Some(floorgate::remote::INTERRUPTED_TRIAL),
        "{st}"
    );
    // Back on the configuration that reaches the broker: the stock changes arrive, and every
    // seq once with one event.
    assert!(
        receive_until(&mut rig.events, &mut rx, Duration::from_secs(15), |rx| {
            let stock = rx.of("b1", "telemetry");
            [222, 333]
                .iter()
                .all(|v| stock.iter().any(|e| e["values"]["stock"] == *v))
        })
        .await,
        "{}",
        gw.log()
    );
    rx.assert_seq_identity();
    assert_no_seq_hole(&rx, "the kill and the rollback lose no seq");
    let h = config_history(&gw.config_path);
    assert_eq!(h["current"], serde_json::Value::Null, "{h}");
    assert_eq!(statuses(&h), vec![(5, "rolled_back".to_string())]);
    rig.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_write_writable_points_once_and_refuse_the_rest() {
    let (stop, tcp, devs, pki, broker) = tls_floor(1, 1).await;
    let mut results = subscribe(&broker, "floorgate/test/gw-cmd/cmd/result").await;
    let mut events = subscribe(&broker, "floorgate/test/gw-cmd/events").await;
    let mut gw = Gateway::start(|state, metrics| {
        config(
            "gw-cmd",
            state,
            metrics,
            &format!(
                "{}{}{}{}",
                uplink_for(&pki, &broker),
                tcp_bus("lan", tcp),
                device("bags", "lan", 1, "bag_dispenser", "200ms"),
                device("cab", "lan", 2, "charging_cabinet", "200ms")
            ),
        )
    });
    let mut rx = Received::default();
    expect_state(&mut events, &mut rx, "cab", &gw).await;
    gw.expect_log("control link subscribed", Duration::from_secs(10))
        .await;
    let topic = "floorgate/test/gw-cmd/cmd";
    let send = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let later = floorgate::event::now_ms() + 60_000;
    publish(&broker, topic, send(serde_json::json!({"id": "c1", "device": "cab", "point": "rental_price_cents", "value": 250, "expires": later})), false).await;
    assert_eq!(outcome(&mut results, "c1").await["status"], "done");
    assert_eq!(
        devs[1]
            .bank()
            .with(|t| t.holding(floorgate::sim::cabinet::HR_RENTAL_PRICE_CENTS)),
        250
    );
    // The new value is polled right away and reported.
    assert!(
        receive_until(&mut events, &mut rx, Duration::from_secs(5), |rx| rx
            .of("cab", "state")
            .iter()
            .any(|e| e["values"]["rental_price_cents"] == 250))
        .await
    );
    // The same id again: not executed a second time.
    devs[1]
        .bank()
        .with(|t| t.set_u16(floorgate::sim::cabinet::HR_RENTAL_PRICE_CENTS, 111));
    publish(&broker, topic, send(serde_json::json!({"id": "c1", "device": "cab", "point": "rental_price_cents", "value": 250, "expires": later})), false).await;
    assert_eq!(outcome(&mut results, "c1").await["status"], "duplicate");
    assert_eq!(
        devs[1]
            .bank()
            .with(|t| t.holding(floorgate::sim::cabinet::HR_RENTAL_PRICE_CENTS)),
        111
    );
    // Expired: never executed.
    publish(&broker, topic, send(serde_json::json!({"id": "c2", "device": "bags", "point": "price_cents", "value": 99, "expires": 1000})), false).await;
    assert_eq!(outcome(&mut results, "c2").await["status"], "expired");
    // Not writable, out of range, wrong type, unknown device.
    publish(&broker, topic, send(serde_json::json!({"id": "c3", "device": "bags", "point": "stock", "value": 10, "expires": later})), false).await;
    let r = outcome(&mut results, "c3").await;
    assert_eq!(r["status"], "rejected");
    assert!(r["error"].as_str().unwrap().contains("not writable"), "{r}");
    publish(&broker, topic, send(serde_json::json!({"id": "c4", "device": "bags", "point": "price_cents", "value": 70000, "expires": later})), false).await;
    let r = outcome(&mut results, "c4").await;
    assert_eq!(r["status"], "rejected");
    publish(&broker, topic, send(serde_json::json!({"id": "c5", "device": "bags", "point": "enabled", "value": "yes", "expires": later})), false).await;
    assert_eq!(outcome(&mut results, "c5").await["status"], "rejected");
    publish(&broker, topic, send(serde_json::json!({"id": "c6", "device": "ghost", "point": "enabled", "value": true, "expires": later})), false).await;
    assert_eq!(outcome(&mut results, "c6").await["status"], "rejected");
    // A coil write.
    publish(&broker, topic, send(serde_json::json!({"id": "c7", "device": "bags", "point": "enabled", "value": false, "expires": later})), false).await;
    assert_eq!(outcome(&mut results, "c7").await["status"], "done");
    assert!(!devs[0]
        .bank()
        .with(|t| t.coil(floorgate::sim::bag::COIL_ENABLED)));
    assert_eq!(
        devs[0]
            .bank()
            .with(|t| t.holding(floorgate::sim::bag::HR_PRICE_CENTS)),
        floorgate::sim::bag::INITIAL_PRICE_CENTS,
        "rejected commands wrote nothing"
    );
    // A command sent while the gateway is down runs once when it is back (persistent session).
    assert_eq!(
        gw.terminate(Duration::from_secs(10)).and_then(|s| s.code()),
        Some(0)
    );
    publish(&broker, topic, send(serde_json::json!({"id": "c8", "device": "bags", "point": "price_cents", "value": 42, "expires": later})), false).await;
    gw.spawn();
    assert_eq!(
        outcome(&mut results, "c8").await["status"],
        "done",
        "{}",
        gw.log()
    );
    assert_eq!(
        devs[0]
            .bank()
            .with(|t| t.holding(floorgate::sim::bag::HR_PRICE_CENTS)),
        42
    );
    stop.cancel();
}

async fn outcome(results: &mut Subscriber, id: &str) -> serde_json::Value {
    first_json(results, Duration::from_secs(10), |_, v| v["id"] == id)
        .await
        .unwrap_or_else(|| serde_json::json!({"status": "none"}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_push_reaches_every_member_and_composes_with_their_own_config() {
    let stop = CancellationToken::new();
    let (tcp, devs) = still_floor(3, 0)
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    for d in &devs {
        d.bank()
            .with(|t| t.set_u16(floorgate::sim::bag::HR_STOCK, 300));
    }
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let key = SigningKey::from_bytes(&[9u8; 32]);
    let public = b64(key.verifying_key().as_bytes());
    let mut events = subscribe(&broker, "floorgate/test/+/events").await;
    let mut states = subscribe(&broker, "floorgate/test/+/config/state").await;
    let start = |id: &'static str, unit: u8, groups: &'static str| {
        group_member(id, unit, groups, &public, &uplink_for(&pki, &broker), tcp)
    };
    let a = start("gw-a", 1, "\"west\"");
    let b = start("gw-b", 2, "\"west\", \"all\"");
    let c = start("gw-c", 3, "\"east\"");
    let mut rx = Received::default();
    assert!(
        receive_until(&mut events, &mut rx, Duration::from_secs(15), |rx| [
            "gw-a-bags",
            "gw-b-bags",
            "gw-c-bags"
        ]
        .iter()
        .all(|d| !rx.of(d, "state").is_empty()))
        .await,
        "{}",
        a.log()
    );
    for g in [&a, &b, &c] {
        g.expect_log("control link subscribed", Duration::from_secs(10))
            .await;
    }
    // The group sets shared parts: an alarm rule in the bag dispenser profile and its poll policy.
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/profiles/bag_dispenser.toml"
    ))
    .unwrap();
    let overlay = format!(
        "{shipped}\n[[profiles.bag_dispenser.alarms]]\nname = \"stock_below_400\"\nwhen = \"stock < 400\"\nseverity = \"major\"\n\n[poll]\nbag_dispenser = \"200ms\"\n"
    );
    // A whole configuration is not accepted from a group.
    let whole = std::fs::read_to_string(&a.config_path).unwrap();
    publish(
        &broker,
        "floorgate/test/groups/west/config/set",
        signed(&key, 1, &whole),
        false,
    )
    .await;
    let st = state_of(&mut states, 1, Duration::from_secs(10)).await;
    assert_eq!(st["status"], "rejected");
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("only [profiles.*] and [poll]"),
        "{st}"
    );
    publish(
        &broker,
        "floorgate/test/groups/west/config/set",
        signed(&key, 2, &overlay),
        false,
    )
    .await;
    let mut applied = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while applied.len() < 2 && tokio::time::Instant::now() < deadline {
        if let Some((topic, p, _)) = states.next(Duration::from_millis(500)).await {
            let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
            if v["version"] == 2 {
                assert_eq!(v["status"], "applied", "{topic}: {v}");
                applied.insert(topic);
            }
        }
    }
    assert_eq!(
        applied.len(),
        2,
        "both members of west applied: {applied:?}\n{}",
        b.log()
    );
    assert!(
        receive_until(&mut events, &mut rx, Duration::from_secs(10), |rx| [
            "gw-a-bags",
            "gw-b-bags"
        ]
        .iter()
        .all(|d| rx
            .of(d, "alarm")
            .iter()
            .any(|e| e["alarm"] == "stock_below_400")))
        .await,
        "the group's alarm rule is live on its members"
    );
    assert!(
        rx.of("gw-c-bags", "alarm").is_empty(),
        "a gateway outside the group is untouched"
    );
    // Each member keeps its identity, buses and devices.
    let h: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
            .args(["status", "--json", "--config"])
            .arg(&b.config_path)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(h["gateway"], "gw-b");
    assert_eq!(h["config_version"], 2);
    assert!(h["devices"]["gw-b-bags"]["online"] == true);
    drop(c);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_push_with_a_canary_against_real_gateways() {
    let (stop, tcp, _devs, pki, broker) = tls_floor(2, 0).await;
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("fleet.key");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["fleet", "keygen"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = std::fs::read_to_string(key_path.with_extension("key.pub"))
        .unwrap()
        .trim()
        .to_string();
    let mut states = subscribe(&broker, "floorgate/test/+/config/state").await;
    let start = |id: &'static str, unit: u8| {
        group_member(
            id,
            unit,
            "\"west\"",
            &public,
            &uplink_for(&pki, &broker),
            tcp,
        )
    };
    let a = start("gw-a", 1);
    let _b = start("gw-b", 2);
    assert!(
        a.wait_log("control link subscribed", Duration::from_secs(10))
            .await
    );
    assert!(
        _b.wait_log("control link subscribed", Duration::from_secs(10))
            .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let push = |version: &str, file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
            .args([
                "fleet",
                "push",
                "--broker",
                &format!("mqtts://localhost:{}", broker.port),
            ])
            .arg("--ca-file")
            .arg(&pki.ca_cert)
            .arg("--cert-file")
            .arg(&pki.client_cert)
            .arg("--key-file")
            .arg(&pki.client_key)
            .arg("--key")
            .arg(&key_path)
            .args([
                "--group",
                "west",
                "--members",
                "gw-a,gw-b",
                "--site",
                "test",
                "--canary",
                "1",
                "--timeout",
                "20s",
                "--version",
                version,
                "--json",
            ])
            .arg(file)
            .output()
            .unwrap()
    };
    // A policy naming an unknown profile is rejected by the canary: the rest is skipped.
    let bad = keys.path().join("bad.toml");
    std::fs::write(&bad, "[poll]\nghost = \"1s\"\n").unwrap();
    let out = push("3", &bad);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let status = |v: &serde_json::Value, gw: &str| {
        v["results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["gateway"] == gw)
            .map(|r| r["status"].clone())
    };
    assert_eq!(status(&v, "gw-a"), Some("rejected".into()), "{v}");
    assert_eq!(status(&v, "gw-b"), Some("skipped".into()), "{v}");
    // A good policy: canary first, then the group.
    let good = keys.path().join("good.toml");
    std::fs::write(&good, "[poll]\nbag_dispenser = \"250ms\"\n").unwrap();
    let out = push("4", &good);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{v}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        a.log()
    );
    assert_eq!(status(&v, "gw-a"), Some("applied".into()));
    assert_eq!(status(&v, "gw-b"), Some("applied".into()));
    drop(states.drain());
    stop.cancel();
}

/// A gateway `id` in fleet groups `groups` (TOML array items) that trusts `public` for signed
/// configuration, with one bag dispenser (`{id}-bags`, unit `unit`) on the TCP bus at `tcp`.
fn group_member(
    id: &'static str,
    unit: u8,
    groups: &str,
    public: &str,
    uplink: &str,
    tcp: std::net::SocketAddr,
) -> Gateway {
    let uplink = format!("{uplink}config_public_key = \"{public}\"\n");
    let groups = format!("groups = [{groups}]\ninclude = [");
    Gateway::start(move |state, metrics| {
        config(
            id,
            state,
            metrics,
            &format!(
                "{uplink}{}{}",
                tcp_bus("lan", tcp),
                device(&format!("{id}-bags"), "lan", unit, "bag_dispenser", "100ms")
            ),
        )
        .replace("include = [", &groups)
    })
}

/// `floorgate config history --json` for the gateway configured by `config`.
fn config_history(config: &std::path::Path) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["config", "history", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}
