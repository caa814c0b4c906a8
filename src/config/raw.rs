//! The configuration file as written: serde structs that mirror the TOML, unknown keys rejected.

use super::units::{Dur, Size};
use crate::device::codec::{DataType, Table, WordOrder};
use serde::Deserialize;
use toml::Spanned;

/// `[gateway]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawGateway {
    pub(crate) id: Spanned<String>,
    #[serde(default)]
    pub(crate) site: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) state_dir: Option<String>,
    #[serde(default)]
    pub(crate) groups: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) include: Vec<Spanned<String>>,
    #[serde(default)]
    pub(crate) control_socket: Option<String>,
}

/// `[store]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawStore {
    pub(crate) max_bytes: Option<Spanned<Size>>,
    pub(crate) commit_interval: Option<Spanned<Dur>>,
    pub(crate) cache_bytes: Option<Spanned<Size>>,
    pub(crate) min_free: Option<Spanned<Size>>,
}

/// `[uplink]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUplink {
    pub(crate) url: Spanned<String>,
    pub(crate) ca_file: Option<String>,
    pub(crate) cert_file: Option<String>,
    pub(crate) key_file: Option<String>,
    pub(crate) username: Option<String>,
    pub(crate) password_file: Option<String>,
    pub(crate) topic_prefix: Option<Spanned<String>>,
    pub(crate) keep_alive: Option<Spanned<Dur>>,
    pub(crate) max_batch: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) allow_plaintext: bool,
    pub(crate) config_public_key: Option<Spanned<String>>,
    pub(crate) max_inflight: Option<Spanned<u16>>,
    pub(crate) reconnect_max: Option<Spanned<Dur>>,
    pub(crate) config_window: Option<Spanned<Dur>>,
}

/// `[metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub(crate) listen: Option<Spanned<String>>,
}

/// `rtu = { ... }` of a bus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRtu {
    pub(crate) port: String,
    #[serde(default)]
    pub(crate) baud: Option<Spanned<u32>>,
    #[serde(default)]
    pub(crate) parity: Option<Spanned<String>>,
    #[serde(default)]
    pub(crate) data_bits: Option<Spanned<u8>>,
    #[serde(default)]
    pub(crate) stop_bits: Option<Spanned<u8>>,
}

/// `tcp = { ... }` of a bus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcp {
    pub(crate) address: Spanned<String>,
}

/// `[[bus]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBus {
    pub(crate) name: Spanned<String>,
    pub(crate) rtu: Option<Spanned<RawRtu>>,
    pub(crate) tcp: Option<Spanned<RawTcp>>,
    pub(crate) timeout: Option<Spanned<Dur>>,
    pub(crate) retries: Option<u8>,
    pub(crate) turnaround: Option<Spanned<Dur>>,
    pub(crate) max_gap: Option<u16>,
    pub(crate) backoff_max: Option<Spanned<Dur>>,
}

/// `[[device]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevice {
    pub(crate) name: Spanned<String>,
    pub(crate) bus: Spanned<String>,
    pub(crate) unit: Spanned<i64>,
    pub(crate) profile: Spanned<String>,
    pub(crate) poll: Option<Spanned<Dur>>,
}

/// Identification signature of a profile, used by `scan`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSignature {
    pub(crate) table: Table,
    pub(crate) address: u16,
    pub(crate) len: u16,
    pub(crate) equals: String,
}

/// `[profiles.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    #[serde(default)]
    pub(crate) description: Option<String>,
    #[serde(default)]
    pub(crate) signature: Option<RawSignature>,
    #[serde(default)]
    pub(crate) points: Vec<Spanned<RawPoint>>,
    #[serde(default)]
    pub(crate) alarms: Vec<Spanned<RawAlarm>>,
}

/// Kind of event a point produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PointKind {
    /// Analog values: published on change beyond the deadband and on heartbeat.
    Telemetry,
    /// Discrete states: every change is an event.
    State,
    /// Monotonic counters: delta and total.
    Counter,
}

/// One point definition.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPoint {
    pub(crate) name: Spanned<String>,
    pub(crate) table: Table,
    pub(crate) address: u16,
    #[serde(rename = "type")]
    pub(crate) ty: DataType,
    #[serde(default)]
    pub(crate) order: Option<WordOrder>,
    #[serde(default)]
    pub(crate) len: Option<u16>,
    #[serde(default)]
    pub(crate) bit: Option<u8>,
    #[serde(default)]
    pub(crate) scale: Option<f64>,
    #[serde(default)]
    pub(crate) offset: Option<f64>,
    #[serde(default)]
    pub(crate) kind: Option<PointKind>,
    #[serde(default)]
    pub(crate) deadband: Option<f64>,
    #[serde(default)]
    pub(crate) heartbeat: Option<Dur>,
    #[serde(default)]
    pub(crate) writable: bool,
    #[serde(default)]
    pub(crate) min: Option<f64>,
    #[serde(default)]
    pub(crate) max: Option<f64>,
    #[serde(default)]
    pub(crate) count: Option<u16>,
    #[serde(default)]
    pub(crate) stride: Option<u16>,
}

/// One alarm rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAlarm {
    pub(crate) name: Spanned<String>,
    pub(crate) when: Spanned<String>,
    #[serde(default, rename = "for")]
    pub(crate) for_: Option<Dur>,
    #[serde(default)]
    pub(crate) severity: Option<String>,
}
