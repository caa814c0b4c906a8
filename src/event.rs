//! Events: what the gateway derives from readings, stores durably and publishes (wire format v1).

use crate::device::codec::Value;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Whether a raised or cleared alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmState {
    /// Condition held for the debounce time.
    Raised,
    /// Condition no longer holds.
    Cleared,
}

/// Device reachability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceState {
    /// Answering.
    Online,
    /// Not answering (backed off).
    Offline,
}

/// The kind-specific part of an event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Body {
    /// Analog values that changed beyond their deadband, or on heartbeat.
    Telemetry {
        /// Point → value.
        values: BTreeMap<String, Value>,
    },
    /// Discrete values that changed.
    State {
        /// Point → value.
        values: BTreeMap<String, Value>,
    },
    /// A counter moved.
    Counter {
        /// Point name.
        point: String,
        /// Increments since the previous counter event.
        delta: u64,
        /// The device's counter value.
        total: u64,
        /// The device counter restarted (power cycle, reset) instead of wrapping.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        reset: bool,
    },
    /// An alarm was raised or cleared.
    Alarm {
        /// Alarm name.
        alarm: String,
        /// Raised or cleared.
        state: AlarmState,
        /// Severity label.
        severity: String,
        /// Value of the watched point.
        value: Value,
    },
    /// A device went online or offline.
    Device {
        /// Online or offline.
        state: DeviceState,
        /// Why it went offline.
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Events were dropped because the store was full (or purged).
    Gap {
        /// How many.
        dropped: u64,
        /// Lowest dropped seq.
        first_seq: u64,
        /// Highest dropped seq.
        last_seq: u64,
    },
}

/// An event before it has a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unix milliseconds when it was derived.
    pub ts: u64,
    /// False while the system clock was not synchronised.
    pub clock_synced: bool,
    /// Device name (None for gateway-level events such as `gap`).
    pub device: Option<String>,
    /// Kind and payload.
    pub body: Body,
}

/// Storage class: telemetry is shed first when the store is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// State, counter, alarm, device and gap events: kept longest.
    Keep,
    /// Telemetry samples: dropped oldest-first when the store is full.
    Telemetry,
}

#[derive(Serialize)]
struct Wire<'a> {
    seq: u64,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    clock: Option<&'static str>,
    #[serde(flatten)]
    body: &'a Body,
}

impl Event {
    /// A new event stamped with the current time.
    pub fn now(device: Option<&str>, body: Body) -> Event {
        Event {
            ts: now_ms(),
            clock_synced: clock_synced(),
            device: device.map(str::to_string),
            body,
        }
    }

    /// Storage class of this event.
    pub fn class(&self) -> Class {
        match self.body {
            Body::Telemetry { .. } => Class::Telemetry,
            _ => Class::Keep,
        }
    }

    /// The `kind` string of the wire format.
    pub fn kind(&self) -> &'static str {
        match self.body {
            Body::Telemetry { .. } => "telemetry",
            Body::State { .. } => "state",
            Body::Counter { .. } => "counter",
            Body::Alarm { .. } => "alarm",
            Body::Device { .. } => "device",
            Body::Gap { .. } => "gap",
        }
    }

    /// JSON of this event as it goes on the wire, with its sequence number.
    pub fn encode(&self, seq: u64) -> Vec<u8> {
        let wire = Wire {
            seq,
            ts: self.ts,
            device: self.device.as_deref(),
            clock: (!self.clock_synced).then_some("unsynced"),
            body: &self.body,
        };
        // Serialising plain maps, numbers and strings cannot fail; NaN floats become null.
        serde_json::to_vec(&wire).unwrap_or_else(|_| b"{}".to_vec())
    }
}

/// Builds the payload `{"v":1,"gateway":ID,"events":[...]}` from encoded events.
pub fn payload<'a>(gateway: &str, events: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"v\":1,\"gateway\":");
    out.extend_from_slice(&serde_json::to_vec(gateway).unwrap_or_default());
    out.extend_from_slice(b",\"events\":[");
    for (i, e) in events.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(e);
    }
    out.extend_from_slice(b"]}");
    out
}

/// Current unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

static CLOCK_SYNCED: AtomicBool = AtomicBool::new(false);
static CLOCK_CHECKED_MS: AtomicU64 = AtomicU64::new(0);

/// Whether the kernel reports the system clock as synchronised (NTP), re-checked every 10 s.
/// Boxes without a real-time clock boot with a wrong time; events then carry `"clock":"unsynced"`.
pub fn clock_synced() -> bool {
    let now = now_ms();
    let checked = CLOCK_CHECKED_MS.load(Ordering::Relaxed);
    if checked == 0 || now.saturating_sub(checked) > 10_000 {
        CLOCK_SYNCED.store(kernel_clock_synced(), Ordering::Relaxed);
        CLOCK_CHECKED_MS.store(now.max(1), Ordering::Relaxed);
    }
    CLOCK_SYNCED.load(Ordering::Relaxed)
}

#[cfg(target_os = "linux")]
fn kernel_clock_synced() -> bool {
    if let Ok(v) = std::env::var("FLOORGATE_ASSUME_CLOCK") {
        return v == "synced";
    }
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into the struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

#[cfg(not(target_os = "linux"))]
fn kernel_clock_synced() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_event_has_the_wire_shape() {
        let e = Event {
            ts: 5,
            clock_synced: true,
            device: Some("d1".into()),
            body: Body::Counter {
                point: "bags".into(),
                delta: 2,
                total: 7,
                reset: false,
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&e.encode(9)).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"seq":9,"ts":5,"device":"d1","kind":"counter","point":"bags","delta":2,"total":7})
        );
    }

    #[test]
    fn unsynced_clock_is_flagged_and_gap_has_no_device() {
        let e = Event {
            ts: 1,
            clock_synced: false,
            device: None,
            body: Body::Gap {
                dropped: 3,
                first_seq: 1,
                last_seq: 4,
            },
        };
        let v: serde_json::Value = serde_json::from_slice(&e.encode(10)).expect("json");
        assert_eq!(v["clock"], "unsynced");
        assert!(v.get("device").is_none());
        let p = payload("gw", [e.encode(10).as_slice(), e.encode(11).as_slice()]);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v["events"].as_array().map(Vec::len), Some(2));
        assert_eq!(v["v"], 1);
    }
}
