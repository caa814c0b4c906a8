//! Remote configuration pushed by the cloud: signature and version checks, validation against the
//! box, the on-disk history of applied versions, and the health gate that commits or rolls back.
//! The daemon (`daemon.rs`) swaps pipelines; this module decides.
//!
//! Files in `STATE_DIR/config/`: `vN.toml` (every accepted version), `current` (the version in
//! use; absent = the local file), `highest` (the newest version ever accepted: replays are
//! refused, also after a restart), `history.jsonl` (one line per outcome), `trial` (the version in
//! its health gate and the pointers before it; a start that finds it rolls back).

use crate::config::{BusKind, Config};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use crate::uplink::remote::{signing_message, ConfigSet};

/// Outcome of a pushed config, published retained on `config/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// Version concerned (None when the message had none).
    pub version: Option<u64>,
    /// `applied`, `rejected` or `rolled_back`.
    pub status: String,
    /// Why, for rejected and rolled back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ConfigState {
    /// A rejection.
    pub fn rejected(version: Option<u64>, error: impl Into<String>) -> ConfigState {
        ConfigState {
            version,
            status: "rejected".into(),
            error: Some(error.into()),
        }
    }
}

/// Checks the signature of a pushed config against `uplink.config_public_key`.
pub fn verify_signature(public: &[u8; 32], set: &ConfigSet) -> Result<(), String> {
    let sig = set
        .sig
        .as_deref()
        .ok_or("unsigned config refused: uplink.config_public_key is set")?;
    crate::uplink::remote::verify(public, set.version, &set.toml, sig).map_err(|e| {
        format!("bad signature: not signed by the key in uplink.config_public_key ({e})")
    })
}

/// Applied-config files of a gateway.
#[derive(Debug, Clone)]
pub struct History {
    dir: PathBuf,
}

/// One history line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Version.
    pub version: u64,
    /// Outcome.
    pub status: String,
    /// Unix ms.
    pub ts: u64,
    /// Why, if not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(d) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl History {
    /// The history under a state directory.
    pub fn new(state_dir: &Path) -> History {
        History {
            dir: state_dir.join("config"),
        }
    }

    fn read_u64(&self, name: &str) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The newest version ever accepted.
    pub fn highest(&self) -> u64 {
        self.read_u64("highest").unwrap_or(0)
    }

    /// The version in use (None: the local file).
    pub fn current(&self) -> Option<u64> {
        self.read_u64("current")
    }

    /// Text of a stored version.
    pub fn text(&self, version: u64) -> std::io::Result<String> {
        std::fs::read_to_string(self.dir.join(format!("v{version}.toml")))
    }

    /// Stores an accepted version and raises `highest`.
    pub fn store(&self, version: u64, text: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        write_atomic(&self.dir.join(format!("v{version}.toml")), text.as_bytes())?;
        write_atomic(
            &self.dir.join("highest"),
            version.max(self.highest()).to_string().as_bytes(),
        )
    }

    /// The fleet overlay version in use, if any.
    pub fn overlay(&self) -> Option<u64> {
        self.read_u64("overlay")
    }

    /// Makes `version` the fleet overlay in use (None: no overlay).
    pub fn set_overlay(&self, version: Option<u64>) -> std::io::Result<()> {
        self.set_pointer("overlay", version)
    }

    fn set_pointer(&self, name: &str, version: Option<u64>) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        match version {
            Some(v) => write_atomic(&self.dir.join(name), v.to_string().as_bytes()),
            None => match std::fs::remove_file(self.dir.join(name)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        }
    }

    /// Makes `version` (or the local file, for None) the one in use.
    pub fn set_current(&self, version: Option<u64>) -> std::io::Result<()> {
        self.set_pointer("current", version)
    }

    /// The pointers in use.
    pub fn applied(&self) -> Applied {
        Applied {
            full: self.current(),
            overlay: self.overlay(),
        }
    }

    /// Restores both pointers.
    pub fn set_applied(&self, a: Applied) -> std::io::Result<()> {
        self.set_current(a.full)?;
        self.set_overlay(a.overlay)
    }

    /// Notes that `version` is in its health gate, and the pointers to go back to
    /// (`STATE_DIR/config/trial`): a gateway that stops before the gate's verdict rolls back
    /// when it starts again ([`roll_back_interrupted_trial`]).
    pub fn begin_trial(&self, version: u64, previous: Applied) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let text = serde_json::json!({
            "version": version,
            "full": previous.full,
            "overlay": previous.overlay,
        });
        write_atomic(&self.dir.join("trial"), text.to_string().as_bytes())
    }

    /// The version left in its health gate and the pointers before it, if any. A trial file that
    /// does not parse is reported as an error.
    pub fn trial(&self) -> std::io::Result<Option<(u64, Applied)>> {
        let text = match std::fs::read_to_string(self.dir.join("trial")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = || {
            std::io::Error::other(format!(
                "{}: not a trial record: {text:?}",
                self.dir.join("trial").display()
            ))
        };
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|_| bad())?;
        let version = v["version"].as_u64().ok_or_else(bad)?;
        let pointer = |k: &str| match &v[k] {
            serde_json::Value::Null => Ok(None),
            p => p.as_u64().map(Some).ok_or_else(bad),
        };
        Ok(Some((
            version,
            Applied {
                full: pointer("full")?,
                overlay: pointer("overlay")?,
            },
        )))
    }

    /// Ends the health gate's trial: its verdict is recorded, or the pointers were set by hand.
    pub fn end_trial(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.dir.join("trial")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Appends an outcome.
    pub fn record(&self, version: u64, status: &str, error: Option<&str>) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        let e = Entry {
            version,
            status: status.into(),
            ts: crate::event::now_ms(),
            error: error.map(str::to_string),
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("history.jsonl"))?;
        writeln!(f, "{}", serde_json::to_string(&e).unwrap_or_default())?;
        f.sync_all()
    }

    /// All outcomes, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        std::fs::read_to_string(self.dir.join("history.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The last applied version before `version` that is still stored (rollback target).
    pub fn previous_applied(&self, before: u64) -> Option<u64> {
        self.entries()
            .iter()
            .rev()
            .filter(|e| e.status == "applied" && e.version < before)
            .map(|e| e.version)
            .find(|v| self.text(*v).is_ok())
    }
}

/// Which remotely pushed versions are in use: a whole gateway configuration, and a fleet overlay
/// (profiles and poll policy shared by a group) applied on top.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Whole configuration version (None: the local file).
    pub full: Option<u64>,
    /// Overlay version (None: no overlay).
    pub overlay: Option<u64>,
}

impl Applied {
    /// The version reported in `status` (the newest of both).
    pub fn version(&self) -> Option<u64> {
        self.full.max(self.overlay)
    }
}

/// The base configuration for `full`: the stored version, or the local file.
pub fn load_base(local: &Path, history: &History, full: Option<u64>) -> Result<Config, String> {
    match full {
        None => crate::config::load(local).map_err(|e| e.to_string()),
        Some(v) => {
            let t = history.text(v).map_err(|e| format!("version {v}: {e}"))?;
            crate::config::parse_str(&t, local).map_err(|e| e.to_string())
        }
    }
}

/// The overlay for `overlay`.
pub fn load_overlay(
    local: &Path,
    history: &History,
    overlay: Option<u64>,
) -> Result<Option<crate::config::Overlay>, String> {
    let Some(v) = overlay else { return Ok(None) };
    let t = history.text(v).map_err(|e| format!("version {v}: {e}"))?;
    crate::config::parse_overlay(&t, local)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The configuration in effect: the applied remote version (or the local file) with the applied
/// fleet overlay on top. Includes of a remote version resolve relative to the local file's folder.
pub fn load_effective(local: &Path) -> Result<(Config, Applied), crate::config::ConfigErrors> {
    let local_cfg = crate::config::load(local)?;
    let history = History::new(&local_cfg.gateway.state_dir);
    let mut applied = history.applied();
    let base = match load_base(local, &history, applied.full) {
        Ok(b) => b,
        Err(error) => {
            tracing::error!(version = ?applied.full, %error, "applied remote config no longer loads; using the local file");
            applied.full = None;
            local_cfg
        }
    };
    match load_overlay(local, &history, applied.overlay) {
        Ok(Some(o)) => Ok((base.compose(&o), applied)),
        Ok(None) => Ok((base, applied)),
        Err(error) => {
            tracing::error!(version = ?applied.overlay, %error, "applied fleet overlay no longer loads; ignoring it");
            applied.overlay = None;
            Ok((base, applied))
        }
    }
}

/// Why a version left in its health gate was rolled back.
pub const INTERRUPTED_TRIAL: &str =
    "the gateway stopped before the health gate's verdict; rolled back at start";

/// Rolls back a pushed configuration whose health gate a stop, crash or panic interrupted: the
/// pointers under `state_dir` go back to what they were before it, and the outcome is recorded.
/// Returns the state to publish on `config/state`; the effective configuration has to be loaded
/// again then ([`load_effective`]).
pub fn roll_back_interrupted_trial(state_dir: &Path) -> Option<ConfigState> {
    let history = History::new(state_dir);
    let (version, previous) = match history.trial() {
        Ok(Some(t)) => t,
        Ok(None) => return None,
        Err(error) => {
            // Unreadable: the pointers are left as they are, and so is the file, for a person.
            tracing::error!(%error, "cannot read the health gate's trial record");
            return None;
        }
    };
    tracing::error!(
        version,
        "pushed configuration was still in its health gate when the gateway stopped; rolling back"
    );
    if let Err(error) = history.set_applied(previous) {
        // Not rolled back, so not reported as such; the trial stays for the next start.
        tracing::error!(%error, version, "cannot roll back the configuration left in its health gate");
        return None;
    }
    let recorded = history
        .record(version, "rolled_back", Some(INTERRUPTED_TRIAL))
        .and_then(|()| history.end_trial());
    if let Err(error) = recorded {
        tracing::error!(%error, version, "rolled back, but cannot record it in the history");
    }
    Some(ConfigState {
        version: Some(version),
        status: "rolled_back".into(),
        error: Some(INTERRUPTED_TRIAL.into()),
    })
}

/// Checks a pushed config against the box: it keeps the gateway's identity and state directory,
/// its serial ports exist and its certificate files are readable.
pub fn check_against_box(new: &Config, running: &Config) -> Result<(), String> {
    let mut problems = Vec::new();
    if new.gateway.id != running.gateway.id {
        problems.push(format!(
            "gateway.id {:?} differs from this gateway's {:?}",
            new.gateway.id, running.gateway.id
        ));
    }
    if new.gateway.state_dir != running.gateway.state_dir {
        problems.push("gateway.state_dir cannot be changed remotely".to_string());
    }
    for b in &new.buses {
        if let BusKind::Rtu { port, .. } = &b.kind {
            if !port.exists() {
                problems.push(format!(
                    "bus {}: serial port {} does not exist on this box",
                    b.name,
                    port.display()
                ));
            }
        }
    }
    if let Some(u) = &new.uplink {
        for f in [&u.ca_file, &u.cert_file, &u.key_file, &u.password_file]
            .into_iter()
            .flatten()
        {
            if let Err(e) = std::fs::File::open(f) {
                problems.push(format!("{}: {e}", f.display()));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// A `cmd` message: write a writable point.
#[derive(Debug, Clone, Deserialize)]
pub struct Command {
    /// Unique id; each id runs at most once.
    pub id: String,
    /// Device name.
    pub device: String,
    /// Point name.
    pub point: String,
    /// Value in engineering units.
    pub value: serde_json::Value,
    /// Unix ms after which the command must not run.
    #[serde(default)]
    pub expires: Option<u64>,
}

/// Outcome of a command, published on `cmd/result` and kept in the store by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Command id.
    pub id: String,
    /// `done`, `expired`, `rejected`, `failed` or `duplicate`.
    pub status: String,
    /// Why, when not done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl CommandResult {
    /// An outcome.
    pub fn new(id: &str, status: &str, error: Option<String>) -> CommandResult {
        CommandResult {
            id: id.to_string(),
            status: status.to_string(),
            error,
        }
    }
}

/// Checks a command against the configuration: the device and point exist, the point is
/// writable, and the value has the point's type and range. Returns the bus, point and value.
pub fn check_command(
    cfg: &Config,
    cmd: &Command,
) -> Result<(String, crate::config::Point, crate::device::codec::Value), String> {
    use crate::device::codec::{self, DataType, Value};
    let dev = cfg
        .devices
        .iter()
        .find(|d| d.name == cmd.device)
        .ok_or_else(|| format!("unknown device {:?}", cmd.device))?;
    let profile = cfg.profile_of(dev).ok_or("device has no profile")?;
    let point = profile
        .points
        .iter()
        .find(|p| p.name == cmd.point)
        .ok_or_else(|| format!("device {} has no point {:?}", cmd.device, cmd.point))?;
    if !point.writable {
        return Err(format!("point {} is not writable", point.name));
    }
    let value = match (&cmd.value, point.ty) {
        (serde_json::Value::Bool(b), DataType::Bool) => Value::Bool(*b),
        (serde_json::Value::String(s), DataType::String) => Value::Str(s.clone()),
        (serde_json::Value::Number(n), t) if t != DataType::Bool && t != DataType::String => {
            match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => Value::UInt(u),
                (None, Some(i), _) => Value::Int(i),
                (_, _, Some(f)) => Value::Float(f),
                _ => return Err("bad number".into()),
            }
        }
        (v, t) => {
            return Err(format!(
                "value {v} does not fit point {} of type {}",
                point.name,
                t.as_str()
            ))
        }
    };
    if let Some(x) = value.as_f64() {
        if point.min.is_some_and(|m| x < m) || point.max.is_some_and(|m| x > m) {
            return Err(format!(
                "value {x} is outside {}..{} of point {}",
                point.min.unwrap_or(f64::NEG_INFINITY),
                point.max.unwrap_or(f64::INFINITY),
                point.name
            ));
        }
    }
    if point.bit.is_none() && !point.table.is_bit() {
        codec::encode_registers(
            &value,
            point.ty,
            point.order,
            point.scale,
            point.offset,
            point.len,
        )
        .map_err(|e| format!("value {}: {e}", cmd.value))?;
    }
    Ok((dev.bus.clone(), point.clone(), value))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn signature_covers_version_and_text() {
        let key = SigningKey::from_bytes(&[7u8; 32]);
        let public = key.verifying_key().to_bytes();
        let sign = |v: u64, t: &str| {
            base64::engine::general_purpose::STANDARD
                .encode(key.sign(&signing_message(v, t)).to_bytes())
        };
        let set = ConfigSet {
            version: 3,
            toml: "a = 1\n".into(),
            sig: Some(sign(3, "a = 1\n")),
        };
        assert_eq!(verify_signature(&public, &set), Ok(()));
        let other = ConfigSet {
            version: 4,
            ..set.clone()
        };
        assert!(verify_signature(&public, &other).is_err());
        let changed = ConfigSet {
            toml: "a = 2\n".into(),
            ..set.clone()
        };
        assert!(verify_signature(&public, &changed).is_err());
        let unsigned = ConfigSet { sig: None, ..set };
        assert!(verify_signature(&public, &unsigned)
            .unwrap_err()
            .contains("unsigned"));
    }

    #[test]
    fn history_keeps_versions_and_the_highest() {
        let dir = tempfile::tempdir().expect("tmp");
        let h = History::new(dir.path());
        assert_eq!((h.highest(), h.current()), (0, None));
        h.store(5, "x").expect("store");
        h.set_current(Some(5)).expect("current");
        h.record(5, "applied", None).expect("record");
        h.store(6, "y").expect("store");
        h.record(6, "rolled_back", Some("uplink")).expect("record");
        assert_eq!((h.highest(), h.current()), (6, Some(5)));
        assert_eq!(h.previous_applied(6), Some(5));
        assert_eq!(h.entries().len(), 2);
        h.set_current(None).expect("local");
        assert_eq!(h.current(), None);
    }

    #[test]
    fn a_version_left_in_its_health_gate_is_rolled_back_at_start() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path();
        let h = History::new(state);
        let before = Applied {
            full: Some(5),
            overlay: None,
        };
        h.set_applied(before).expect("pointers");
        // Nothing in a gate: nothing to do.
        assert_eq!(roll_back_interrupted_trial(state), None);
        h.begin_trial(10, before).expect("trial");
        h.set_applied(Applied {
            full: Some(5),
            overlay: Some(10),
        })
        .expect("pointers");
        assert_eq!(h.trial().expect("trial"), Some((10, before)));
        let state_msg = roll_back_interrupted_trial(state).expect("rolled back");
        assert_eq!(state_msg.version, Some(10));
        assert_eq!(state_msg.status, "rolled_back");
        assert_eq!(state_msg.error.as_deref(), Some(INTERRUPTED_TRIAL));
        assert_eq!(h.applied(), before);
        let last = h.entries().pop().expect("an entry");
        assert_eq!((last.version, last.status.as_str()), (10, "rolled_back"));
        assert_eq!(h.trial().expect("trial"), None);
        assert_eq!(roll_back_interrupted_trial(state), None, "only once");
    }

    #[test]
    fn a_trial_record_that_does_not_parse_is_an_error_and_touches_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = dir.path();
        let h = History::new(state);
        h.set_current(Some(7)).expect("current");
        std::fs::write(state.join("config").join("trial"), "{\"version\": \"x\"}").expect("write");
        let error = h.trial().expect_err("not a trial record");
        assert!(error.to_string().contains("not a trial record"), "{error}");
        assert_eq!(roll_back_interrupted_trial(state), None);
        assert_eq!(h.current(), Some(7));
        h.end_trial().expect("end");
        assert_eq!(h.trial().expect("trial"), None);
        h.end_trial().expect("ending twice is fine");
    }
}
