//! The shipped JSON Schema describes every event kind exactly as the gateway encodes it.

use floorgate::device::codec::Value;
use floorgate::event::{payload, AlarmState, Body, DeviceState, Event};
use std::collections::BTreeMap;

fn validator() -> (boon::Schemas, boon::SchemaIndex) {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schema/events.v1.json"
    ))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut schemas = boon::Schemas::new();
    let mut compiler = boon::Compiler::new();
    compiler.add_resource("events.v1.json", json).unwrap();
    let idx = compiler.compile("events.v1.json", &mut schemas).unwrap();
    (schemas, idx)
}

fn every_kind() -> Vec<Event> {
    let mut values = BTreeMap::new();
    values.insert("temperature".to_string(), Value::Float(21.5));
    values.insert("model".to_string(), Value::Str("BAGDISP1".into()));
    values.insert("door_open".to_string(), Value::Bool(false));
    let dev = Some("bags-1");
    let mut events = vec![
        Event::now(
            dev,
            Body::Telemetry {
                values: values.clone(),
            },
        ),
        Event::now(dev, Body::State { values }),
        Event::now(
            dev,
            Body::Counter {
                point: "bags_dispensed".into(),
                delta: 3,
                total: 70,
                reset: false,
            },
        ),
        Event::now(
            dev,
            Body::Counter {
                point: "bags_dispensed".into(),
                delta: 2,
                total: 2,
                reset: true,
            },
        ),
        Event::now(
            dev,
            Body::Alarm {
                alarm: "low_stock".into(),
                state: AlarmState::Raised,
                severity: "warning".into(),
                value: Value::UInt(3),
            },
        ),
        Event::now(
            dev,
            Body::Device {
                state: DeviceState::Offline,
                error: Some("timeout".into()),
            },
        ),
        Event::now(
            dev,
            Body::Device {
                state: DeviceState::Online,
                error: None,
            },
        ),
        Event::now(
            None,
            Body::Gap {
                dropped: 4,
                first_seq: 1,
                last_seq: 9,
            },
        ),
    ];
    let mut unsynced = events[0].clone();
    unsynced.clock_synced = false;
    events.push(unsynced);
    events
}

#[test]
fn every_event_kind_validates_against_the_shipped_schema() {
    let (schemas, idx) = validator();
    for (i, e) in every_kind().iter().enumerate() {
        let body = payload("gw-1", [e.encode(i as u64 + 1).as_slice()]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if let Err(err) = schemas.validate(&v, idx) {
            panic!("{} event does not validate: {err}\n{v}", e.kind());
        }
    }
}

#[test]
fn schema_rejects_an_event_without_seq_or_with_an_unknown_field() {
    let (schemas, idx) = validator();
    let bad = serde_json::json!({"v":1,"gateway":"g","events":[{"ts":1,"kind":"state","device":"d","values":{"a":1}}]});
    assert!(schemas.validate(&bad, idx).is_err());
    let bad = serde_json::json!({"v":1,"gateway":"g","events":[{"seq":1,"ts":1,"kind":"gap","dropped":1,"first_seq":1,"last_seq":1,"extra":true}]});
    assert!(schemas.validate(&bad, idx).is_err());
}
