//! Event derivation: compares each reading with the device's last snapshot and turns differences
//! into telemetry, state, counter, alarm and device events.

use crate::config::{AlarmRule, Op, PointKind, Profile};
use crate::device::codec::Value;
use crate::event::{AlarmState, Body, DeviceState, Event};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// What the events so far tell about a device; committed with them, re-derived from after a crash.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Whether the device was online.
    pub online: bool,
    /// Last published value of every point (telemetry: last value sent).
    pub values: BTreeMap<String, Value>,
    /// Raised alarms.
    pub alarms: BTreeMap<String, bool>,
}

/// Per-device derivation state.
#[derive(Debug)]
pub struct Deriver {
    device: String,
    profile: Arc<Profile>,
    snap: Snapshot,
    last_emit: HashMap<String, Instant>,
    alarm_since: HashMap<String, Instant>,
    started: Instant,
}

fn counter_delta(old: u64, new: u64, bits: u32) -> (u64, bool) {
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let delta = new.wrapping_sub(old) & mask;
    let half = if bits >= 64 {
        1u64 << 63
    } else {
        1u64 << (bits - 1)
    };
    if new < old && delta >= half {
        // Going down by more than half the range is a restart of the device counter, not a wrap.
        (new, true)
    } else {
        (delta, false)
    }
}

fn as_counter(v: &Value, bits: u32) -> Option<u64> {
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    match v {
        Value::UInt(u) => Some(*u & mask),
        Value::Int(i) => Some((*i as u64) & mask),
        _ => None,
    }
}

fn compare(v: &Value, op: Op, lit: &Value) -> bool {
    let ord = match (v, lit) {
        (Value::Bool(a), Value::Bool(b)) => a.partial_cmp(b),
        (Value::Str(a), Value::Str(b)) => a.partial_cmp(b),
        (a, b) => match (a.as_f64(), b.as_f64()) {
            (Some(a), Some(b)) => a.partial_cmp(&b),
            _ => None,
        },
    };
    let Some(ord) = ord else { return false };
    use std::cmp::Ordering::*;
    match op {
        Op::Eq => ord == Equal,
        Op::Ne => ord != Equal,
        Op::Lt => ord == Less,
        Op::Le => ord != Greater,
        Op::Gt => ord == Greater,
        Op::Ge => ord != Less,
    }
}

fn moved(old: Option<&Value>, new: &Value, deadband: f64) -> bool {
    match (old, new) {
        (None, _) => true,
        (Some(o), n) => match (o.as_f64(), n.as_f64()) {
            (Some(a), Some(b)) => (a - b).abs() > deadband || (deadband == 0.0 && a != b),
            _ => o != n,
        },
    }
}

impl Deriver {
    /// Starts from the last committed snapshot (None for a device never seen).
    pub fn new(device: &str, profile: Arc<Profile>, snapshot: Option<Snapshot>) -> Deriver {
        let now = Instant::now();
        let snap = snapshot.unwrap_or_default();
        let last_emit = snap.values.keys().map(|k| (k.clone(), now)).collect();
        Deriver {
            device: device.to_string(),
            profile,
            snap,
            last_emit,
            alarm_since: HashMap::new(),
            started: now,
        }
    }

    /// Whether the last poll succeeded.
    pub fn online(&self) -> bool {
        self.snap.online
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snap
    }

    /// The snapshot as committed bytes.
    pub fn snapshot_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.snap).unwrap_or_default()
    }

    /// Derives events from a successful reading of all points (`values[i]` is point i's value,
    /// None where it could not be decoded).
    pub fn on_values(&mut self, now: Instant, values: &[Option<Value>]) -> Vec<Event> {
        let profile = self.profile.clone();
        let dev = Some(self.device.as_str());
        let mut out = Vec::new();
        let came_online = !self.snap.online;
        if came_online {
            out.push(Event::now(
                dev,
                Body::Device {
                    state: DeviceState::Online,
                    error: None,
                },
            ));
            self.snap.online = true;
        }
        let mut states = BTreeMap::new();
        let mut telemetry = BTreeMap::new();
        let mut counters = Vec::new();
        for (point, value) in profile.points.iter().zip(values) {
            let Some(value) = value else { continue };
            let old = self.snap.values.get(&point.name);
            match point.kind {
                PointKind::State => {
                    if came_online || old != Some(value) {
                        states.insert(point.name.clone(), value.clone());
                    }
                }
                PointKind::Counter => {
                    let bits = point.ty.int_bits().unwrap_or(64);
                    if came_online {
                        states.insert(point.name.clone(), value.clone());
                    }
                    match (
                        old.and_then(|o| as_counter(o, bits)),
                        as_counter(value, bits),
                    ) {
                        (Some(o), Some(n)) if o != n => {
                            let (delta, reset) = counter_delta(o, n, bits);
                            counters.push(Body::Counter {
                                point: point.name.clone(),
                                delta,
                                total: n,
                                reset,
                            });
                        }
                        _ => {}
                    }
                }
                PointKind::Telemetry => {
                    let due = point.heartbeat.is_some_and(|hb| {
                        let last = self
                            .last_emit
                            .get(&point.name)
                            .copied()
                            .unwrap_or(self.started);
                        now.saturating_duration_since(last) >= hb
                    });
                    if came_online || due || moved(old, value, point.deadband) {
                        telemetry.insert(point.name.clone(), value.clone());
                        self.last_emit.insert(point.name.clone(), now);
                    }
                }
            }
        }
        if !states.is_empty() {
            out.push(Event::now(
                dev,
                Body::State {
                    values: states.clone(),
                },
            ));
        }
        for c in counters {
            out.push(Event::now(dev, c));
        }
        if !telemetry.is_empty() {
            out.push(Event::now(
                dev,
                Body::Telemetry {
                    values: telemetry.clone(),
                },
            ));
        }
        for (point, value) in profile.points.iter().zip(values) {
            if let Some(v) = value {
                if point.kind != PointKind::Telemetry || telemetry.contains_key(&point.name) {
                    self.snap.values.insert(point.name.clone(), v.clone());
                }
            }
        }
        for rule in &profile.alarms {
            if let Some(e) = self.alarm(now, rule) {
                out.push(e);
            }
        }
        out
    }

    fn alarm(&mut self, now: Instant, rule: &AlarmRule) -> Option<Event> {
        let value = self.snap.values.get(&rule.point)?.clone();
        let holds = compare(&value, rule.op, &rule.literal);
        let raised = self.snap.alarms.get(&rule.name).copied().unwrap_or(false);
        let state = if holds {
            let since = *self.alarm_since.entry(rule.name.clone()).or_insert(now);
            if raised || now.saturating_duration_since(since) < rule.for_ {
                return None;
            }
            AlarmState::Raised
        } else {
            self.alarm_since.remove(&rule.name);
            if !raised {
                return None;
            }
            AlarmState::Cleared
        };
        self.snap
            .alarms
            .insert(rule.name.clone(), state == AlarmState::Raised);
        Some(Event::now(
            Some(&self.device),
            Body::Alarm {
                alarm: rule.name.clone(),
                state,
                severity: rule.severity.clone(),
                value,
            },
        ))
    }

    /// The device stopped answering: an `offline` event when it was online.
    pub fn on_offline(&mut self, error: &str) -> Vec<Event> {
        if !self.snap.online {
            return Vec::new();
        }
        self.snap.online = false;
        vec![Event::now(
            Some(&self.device),
            Body::Device {
                state: DeviceState::Offline,
                error: Some(error.to_string()),
            },
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_wraps_at_declared_width_and_flags_resets() {
        assert_eq!(counter_delta(65530, 5, 16), (11, false));
        assert_eq!(counter_delta(1000, 3, 16), (3, true));
        assert_eq!(counter_delta(10, 15, 32), (5, false));
        assert_eq!(counter_delta(u32::MAX as u64, 1, 32), (2, false));
        assert_eq!(counter_delta(u64::MAX, 0, 64), (1, false));
    }

    #[test]
    fn comparisons_follow_the_operator() {
        assert!(compare(&Value::UInt(10), Op::Lt, &Value::Float(20.0)));
        assert!(!compare(&Value::UInt(20), Op::Lt, &Value::Float(20.0)));
        assert!(compare(&Value::Bool(true), Op::Eq, &Value::Bool(true)));
        assert!(compare(&Value::Float(45.5), Op::Ge, &Value::Float(45.5)));
        assert!(!compare(
            &Value::Str("a".into()),
            Op::Gt,
            &Value::Float(1.0)
        ));
    }
}
