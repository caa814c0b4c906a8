//! Configuration: the TOML file as written (`raw`) is checked as a whole (`validate`) into a typed
//! [`Config`]; every problem is reported at once as `file:line:col: message`.

mod load;
mod raw;
pub mod units;
mod validate;

pub use load::{load, parse_str};
pub use raw::PointKind;

use crate::device::codec::{DataType, Table, Value, WordOrder};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The default config path of the daemon.
pub const DEFAULT_PATH: &str = "/etc/floorgate/floorgate.toml";

/// A fully checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was loaded from.
    pub source: PathBuf,
    /// `[gateway]`
    pub gateway: Gateway,
    /// `[store]`
    pub store: Store,
    /// `[uplink]`, absent when the gateway only buffers (e.g. during installation).
    pub uplink: Option<Uplink>,
    /// `[metrics]`
    pub metrics: Metrics,
    /// `[[bus]]`
    pub buses: Vec<Bus>,
    /// `[[device]]`
    pub devices: Vec<Device>,
    /// Profiles by name, inline and included.
    pub profiles: BTreeMap<String, Arc<Profile>>,
    /// `[poll]`: poll period by profile name, overriding the devices' own `poll`.
    pub poll_policy: BTreeMap<String, Duration>,
}

/// `[gateway]`
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Gateway id, also the MQTT client id.
    pub id: String,
    /// Site name, used in topics.
    pub site: String,
    /// Where the store and the applied-config history live.
    pub state_dir: PathBuf,
    /// Fleet groups this gateway follows.
    pub groups: Vec<String>,
    /// Path of the local control socket (`floorgate status`).
    pub control_socket: PathBuf,
}

/// `[store]`
#[derive(Debug, Clone)]
pub struct Store {
    /// Bound of the stored event bytes.
    pub max_bytes: u64,
    /// Group-commit interval: events and snapshots become durable at least this often.
    pub commit_interval: Duration,
    /// sled page cache size.
    pub cache_bytes: u64,
    /// Free space kept on the state directory's filesystem: below it the store writes nothing
    /// and holds new events in memory (0: no check).
    pub min_free: u64,
}

/// `[uplink]`
#[derive(Debug, Clone)]
pub struct Uplink {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// TLS (mqtts) or plaintext (mqtt, only with `allow_plaintext`).
    pub tls: bool,
    /// CA bundle; None means the built-in Mozilla roots are not used: a CA file is required for TLS.
    pub ca_file: Option<PathBuf>,
    /// Client certificate for mTLS.
    pub cert_file: Option<PathBuf>,
    /// Client key for mTLS.
    pub key_file: Option<PathBuf>,
    /// MQTT user name.
    pub username: Option<String>,
    /// File holding the MQTT password.
    pub password_file: Option<PathBuf>,
    /// Topic prefix with `{site}` and `{gateway}` resolved.
    pub topic_prefix: String,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Events per publish when draining a backlog.
    pub max_batch: usize,
    /// Publishes awaiting PUBACK at once.
    pub max_inflight: u16,
    /// Upper bound of the reconnect back-off.
    pub reconnect_max: Duration,
    /// Public key (base64) that must sign remote config.
    pub config_public_key: Option<String>,
    /// Health gate of a remotely pushed config: uplink and devices must be back within this.
    pub config_window: Duration,
}

/// `[metrics]`
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Prometheus listen address; None disables the endpoint.
    pub listen: Option<SocketAddr>,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity.
    Even,
    /// Odd parity.
    Odd,
}

/// How a bus is reached.
#[derive(Debug, Clone, PartialEq)]
pub enum BusKind {
    /// Modbus RTU on a serial port.
    Rtu {
        /// Device path, e.g. `/dev/ttyUSB0`.
        port: PathBuf,
        /// Baud rate.
        baud: u32,
        /// Parity.
        parity: Parity,
        /// Data bits (7 or 8).
        data_bits: u8,
        /// Stop bits (1 or 2).
        stop_bits: u8,
    },
    /// Modbus TCP.
    Tcp {
        /// `host:port`.
        address: String,
    },
}

/// `[[bus]]`
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    /// Bus name.
    pub name: String,
    /// Transport.
    pub kind: BusKind,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries after a failed request before the device counts as failed for this poll.
    pub retries: u8,
    /// Extra delay between the end of one transaction and the next request.
    pub turnaround: Duration,
    /// Unused registers/bits a coalesced read may bridge.
    pub max_gap: u16,
    /// Longest back-off for a device that stopped answering.
    pub backoff_max: Duration,
}

/// `[[device]]`
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Device name, unique per gateway.
    pub name: String,
    /// Bus it is on.
    pub bus: String,
    /// Modbus unit id.
    pub unit: u8,
    /// Profile name.
    pub profile: String,
    /// Poll period.
    pub poll: Duration,
}

/// A device profile: points and alarm rules.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Profile name.
    pub name: String,
    /// Human description.
    pub description: String,
    /// Expanded points (repeated blocks already unrolled).
    pub points: Vec<Point>,
    /// Alarm rules.
    pub alarms: Vec<AlarmRule>,
    /// Identification signature for `scan`.
    pub signature: Option<Signature>,
}

/// Identification of a profile: a string register block that holds a known value.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    /// Table.
    pub table: Table,
    /// First address.
    pub address: u16,
    /// Registers.
    pub len: u16,
    /// Expected string.
    pub equals: String,
}

/// One point of a profile.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Name (with the block index resolved).
    pub name: String,
    /// Table.
    pub table: Table,
    /// First address, 0-based.
    pub address: u16,
    /// Data type.
    pub ty: DataType,
    /// Word/byte order.
    pub order: WordOrder,
    /// String length in registers.
    pub len: u16,
    /// One bit of a register.
    pub bit: Option<u8>,
    /// Scale.
    pub scale: f64,
    /// Offset.
    pub offset: f64,
    /// Event kind.
    pub kind: PointKind,
    /// Telemetry deadband (absolute).
    pub deadband: f64,
    /// Publish at least this often.
    pub heartbeat: Option<Duration>,
    /// May be written by cloud commands.
    pub writable: bool,
    /// Lowest value a command may write.
    pub min: Option<f64>,
    /// Highest value a command may write.
    pub max: Option<f64>,
}

impl Point {
    /// Registers (or bits) this point occupies.
    pub fn width(&self) -> u16 {
        if self.table.is_bit() {
            1
        } else {
            self.ty.width(self.len)
        }
    }
}

/// Comparison of an alarm rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// `[[profiles.X.alarms]]`
#[derive(Debug, Clone, PartialEq)]
pub struct AlarmRule {
    /// Alarm name.
    pub name: String,
    /// Point the rule watches.
    pub point: String,
    /// Comparison.
    pub op: Op,
    /// Literal to compare against.
    pub literal: Value,
    /// Debounce: the condition must hold this long.
    pub for_: Duration,
    /// Severity label.
    pub severity: String,
}

/// One configuration problem, located in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// File.
    pub file: PathBuf,
    /// 1-based line (0 when the problem is about the file as a whole).
    pub line: usize,
    /// 1-based column.
    pub col: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )
        }
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Config {
    /// The profile of a device.
    pub fn profile_of(&self, device: &Device) -> Option<&Arc<Profile>> {
        self.profiles.get(&device.profile)
    }

    /// The poll period of a device: the `[poll]` policy of its profile, else its own.
    pub fn poll_of(&self, device: &Device) -> Duration {
        self.poll_policy
            .get(&device.profile)
            .copied()
            .unwrap_or(device.poll)
    }

    /// Applies a fleet overlay (profiles and poll policy only, see [`parse_overlay`]): its profiles
    /// replace same-named ones, its poll policy replaces same-named entries.
    pub fn compose(&self, overlay: &Overlay) -> Config {
        let mut c = self.clone();
        for (name, p) in &overlay.profiles {
            c.profiles.insert(name.clone(), p.clone());
        }
        for (name, d) in &overlay.poll_policy {
            c.poll_policy.insert(name.clone(), *d);
        }
        c
    }
}

/// Shared parts pushed to a fleet group: profiles (points, alarm rules) and poll policy.
#[derive(Debug, Clone, Default)]
pub struct Overlay {
    /// Profiles by name.
    pub profiles: BTreeMap<String, Arc<Profile>>,
    /// Poll period by profile name.
    pub poll_policy: BTreeMap<String, Duration>,
}

/// Parses an overlay: a TOML document with only `[profiles.*]` and `[poll]`. Errors are located
/// as for a configuration file named `path`.
pub fn parse_overlay(text: &str, path: &std::path::Path) -> Result<Overlay, ConfigErrors> {
    // The gateway section goes last so that line numbers stay those of the text.
    let doc = format!("{text}\n[gateway]\nid = \"overlay\"\n");
    let c = load::parse_with(&doc, path, true)?;
    let mut problems = Vec::new();
    if c.uplink.is_some() || !c.buses.is_empty() || !c.devices.is_empty() {
        problems.push("a group configuration holds only [profiles.*] and [poll]; identity, buses, devices and credentials stay the gateway's own");
    }
    if !problems.is_empty() {
        return Err(ConfigErrors(
            problems
                .iter()
                .map(|m| ConfigError {
                    file: path.to_path_buf(),
                    line: 0,
                    col: 0,
                    message: m.to_string(),
                })
                .collect(),
        ));
    }
    Ok(Overlay {
        profiles: c.profiles,
        poll_policy: c.poll_policy,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod fuzz_smoke {
    //! The fuzz targets' properties, run briefly in every test run (cargo-fuzz runs them longer).
    use proptest::prelude::*;
    use std::path::Path;

    const FRAGMENTS: &[&str] = &[
        "[gateway]\n",
        "id = \"g\"\n",
        "[[bus]]\n",
        "name = \"a\"\n",
        "tcp = { address = \"h:1\" }\n",
        "rtu = { port = \"/dev/x\", baud = 9600 }\n",
        "[[device]]\n",
        "bus = \"a\"\n",
        "unit = 1\n",
        "profile = \"p\"\n",
        "[profiles.p]\n",
        "[[profiles.p.points]]\n",
        "table = \"holding\"\n",
        "address = 65535\n",
        "type = \"string\"\n",
        "len = 0\n",
        "count = 300\n",
        "stride = 0\n",
        "[[profiles.p.alarms]]\n",
        "when = \"x >= \"\n",
        "[poll]\n",
        "p = \"0ms\"\n",
        "[store]\n",
        "max_bytes = \"1 GiB\"\n",
        "[uplink]\n",
        "url = \"mqtts://:\"\n",
        "\"",
        "=",
        "[",
        "\n",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]
        #[test]
        fn any_text_yields_a_config_or_located_errors(s in "\\PC{0,300}") {
            if let Err(e) = super::parse_str(&s, Path::new("f.toml")) {
                prop_assert!(!e.0.is_empty());
            }
            let _ = super::parse_overlay(&s, Path::new("f.toml"));
        }

        #[test]
        fn config_shaped_text_never_panics(parts in proptest::collection::vec(0..FRAGMENTS.len(), 0..40)) {
            let text: String = parts.iter().map(|i| FRAGMENTS[*i]).collect();
            if let Err(e) = super::parse_str(&text, Path::new("f.toml")) {
                prop_assert!(e.0.iter().all(|x| x.file == Path::new("f.toml")));
            }
        }

        #[test]
        fn remote_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), n in any::<i64>()) {
            let _ = serde_json::from_slice::<crate::remote::ConfigSet>(&bytes);
            let json = format!("{{\"id\":\"x\",\"device\":\"d\",\"point\":\"x\",\"value\":{n},\"expires\":1}}");
            let cmd: crate::remote::Command = serde_json::from_str(&json).unwrap();
            let cfg = super::parse_str(
                "[gateway]\nid = \"f\"\n[profiles.p]\n[[profiles.p.points]]\nname = \"x\"\ntable = \"holding\"\naddress = 0\ntype = \"i16\"\nscale = 0.5\nwritable = true\n[[bus]]\nname = \"b\"\ntcp = { address = \"127.0.0.1:1\" }\n[[device]]\nname = \"d\"\nbus = \"b\"\nunit = 1\nprofile = \"p\"\n",
                Path::new("f.toml"),
            ).unwrap();
            let r = crate::remote::check_command(&cfg, &cmd);
            // i16 scaled by 0.5 holds -16384..=16383.5; anything else must be refused.
            prop_assert_eq!(r.is_ok(), (-16384..=16383).contains(&n));
        }
    }

    proptest! {
        // Signing and verifying are slow without optimisation: fewer cases.
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The fuzz target's path for pushes of any shape: a configuration push (any version,
        /// config-shaped text, any or no signature) is checked and parsed, and a command with
        /// any device, point and value is checked, without a panic. A push signed with the
        /// gateway's key verifies; the same push with another version does not.
        #[test]
        fn pushes_of_any_shape_are_checked_without_panic(
            parts in proptest::collection::vec(0..FRAGMENTS.len(), 0..40),
            version in any::<u64>(),
            sig in proptest::option::of("\\PC{0,100}"),
            device in prop_oneof![Just("d".to_string()), "\\PC{0,10}"],
            point in prop_oneof![Just("x".to_string()), "\\PC{0,10}"],
            value in prop_oneof![
                any::<f64>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<u64>().prop_map(serde_json::Value::from),
                "\\PC{0,20}".prop_map(serde_json::Value::from),
                any::<bool>().prop_map(serde_json::Value::from),
                Just(serde_json::Value::Null),
            ],
            expires in proptest::option::of(any::<u64>()),
        ) {
            use crate::remote::{Command, ConfigSet};
            let text: String = parts.iter().map(|i| FRAGMENTS[*i]).collect();
            let set = ConfigSet { version, toml: text.clone(), sig };
            let set: ConfigSet = serde_json::from_slice(&serde_json::to_vec(&set).unwrap()).unwrap();
            let _ = crate::remote::verify_signature(&[7u8; 32], &set);
            let _ = super::parse_str(&set.toml, Path::new("/nonexistent/f.toml"));
            let key = ed25519_dalek::SigningKey::from_bytes(&[9u8; 32]);
            let public = key.verifying_key().to_bytes();
            let signed = ConfigSet::signed(&key, version, &text);
            prop_assert!(crate::remote::verify_signature(&public, &signed).is_ok());
            let other = ConfigSet { version: version.wrapping_add(1), ..signed };
            prop_assert!(crate::remote::verify_signature(&public, &other).is_err());
            let json = serde_json::json!({"id": "x", "device": device, "point": point, "value": value, "expires": expires});
            let cmd: Command = serde_json::from_slice(&serde_json::to_vec(&json).unwrap()).unwrap();
            let cfg = super::parse_str(
                "[gateway]\nid = \"f\"\n[profiles.p]\n[[profiles.p.points]]\nname = \"x\"\ntable = \"holding\"\naddress = 0\ntype = \"i32\"\nscale = 0.5\nwritable = true\nmin = -10\nmax = 10\n[[bus]]\nname = \"b\"\ntcp = { address = \"127.0.0.1:1\" }\n[[device]]\nname = \"d\"\nbus = \"b\"\nunit = 1\nprofile = \"p\"\n",
                Path::new("f.toml"),
            ).unwrap();
            let _ = crate::remote::check_command(&cfg, &cmd);
        }
    }
}
