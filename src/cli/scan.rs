//! `floorgate scan`: find the devices on a bus (unit ids × baud rates × parities), with progress,
//! and guess each one's profile from Read Device Identification and the profiles' signatures.
//!
//! A scan only ever sends read requests. Per unit it reads holding register 0: any valid reply,
//! a Modbus exception included, means a device is there (except the gateway exceptions 0x0A and
//! 0x0B on TCP, which a Modbus TCP gateway sends for a unit it cannot reach). A setting whose first
//! [`EARLY_STOP`] units all produce garbage (bytes that are no valid reply, or CRC errors) is the
//! wrong one for this line and is skipped.

use super::Failure;
use crate::bus::link::{Link, TxError};
use crate::config::{Bus, BusKind, Parity, Profile, Signature};
use crate::device::codec::{self, DataType, Table, Value, WordOrder};
use crate::device::plan::ReadSpan;
use crate::device::Raw;
use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A setting is skipped when its first this many units all produce garbage.
pub(super) const EARLY_STOP: usize = 8;

/// Profiles shipped in the binary, used when no `--config` is given.
const BUILTIN_PROFILES: &[(&str, &str)] = &[
    (
        "bag_dispenser.toml",
        include_str!("../../config/profiles/bag_dispenser.toml"),
    ),
    (
        "charging_cabinet.toml",
        include_str!("../../config/profiles/charging_cabinet.toml"),
    ),
];

/// Arguments of `scan`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Serial port of the RS485 bus (e.g. /dev/ttyUSB0).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "tcp",
        required_unless_present = "tcp"
    )]
    port: Option<PathBuf>,
    /// Modbus TCP device or gateway (unit ids only; no baud rate or parity).
    #[arg(long, value_name = "HOST:PORT")]
    tcp: Option<String>,
    /// Baud rates to try (serial only), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [9600u32, 19200, 38400, 115200], conflicts_with = "tcp")]
    baud: Vec<u32>,
    /// Parities to try (serial only): none, even, odd, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_parity, default_values = ["none", "even"], conflicts_with = "tcp")]
    parity: Vec<Parity>,
    /// Unit ids to probe: numbers and ranges, e.g. "1-10,20".
    #[arg(long, default_value = "1-247", value_parser = parse_units)]
    units: Units,
    /// How long to wait for each unit's reply.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Take the profiles to match from this configuration (and its includes) instead of the
    /// profiles shipped with floorgate.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print a JSON document instead of a table.
    #[arg(long)]
    json: bool,
}

/// tokio-modbus logs (through the `log` crate) a warning for every frame it cannot decode: on a
/// scan of a wrong baud rate that is a flood. Unless `FLOORGATE_LOG` asks for more, the
/// installer commands only let its errors through; the scan reports garbage in its summary.
pub(super) fn quiet_codec_warnings() {
    if std::env::var_os("FLOORGATE_LOG").is_none() {
        log::set_max_level(log::LevelFilter::Error);
    }
}

/// A list of unit ids, in the order given, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Units(pub(super) Vec<u8>);

/// Parses `"1-10,20"`: numbers and inclusive ranges of unit ids (0 to 255; the caller checks
/// what the transport allows).
pub(super) fn parse_units(text: &str) -> Result<Units, String> {
    let num = |s: &str| -> Result<u8, String> {
        s.trim()
            .parse::<u8>()
            .map_err(|_| format!("{:?} is not a unit id (0-255)", s.trim()))
    };
    let mut out: Vec<u8> = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("range {part:?} goes backwards"));
        }
        for u in lo..=hi {
            if !out.contains(&u) {
                out.push(u);
            }
        }
    }
    if out.is_empty() {
        return Err("no unit ids given (e.g. \"1-247\" or \"1-10,20\")".into());
    }
    Ok(Units(out))
}

/// Parses a parity name: none, even, odd (or N, E, O).
pub(super) fn parse_parity(text: &str) -> Result<Parity, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "none" | "n" => Ok(Parity::None),
        "even" | "e" => Ok(Parity::Even),
        "odd" | "o" => Ok(Parity::Odd),
        other => Err(format!("parity {other:?} must be none, even or odd")),
    }
}

/// The name of a parity as written on the command line and in JSON.
pub(super) fn parity_name(p: Parity) -> &'static str {
    match p {
        Parity::None => "none",
        Parity::Even => "even",
        Parity::Odd => "odd",
    }
}

/// One line setting tried by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setting {
    Serial { baud: u32, parity: Parity },
    Tcp,
}

/// A serial line setting as installers write it: `19200 8E1`.
pub(super) fn line_label(baud: u32, parity: Parity) -> String {
    let p = match parity {
        Parity::None => 'N',
        Parity::Even => 'E',
        Parity::Odd => 'O',
    };
    format!("{baud} 8{p}1")
}

impl Setting {
    /// Short label: `19200 8E1`, or `tcp`.
    fn label(&self) -> String {
        match self {
            Setting::Serial { baud, parity } => line_label(*baud, *parity),
            Setting::Tcp => "tcp".into(),
        }
    }
}

/// What one unit's probe showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// A valid reply (data or a Modbus exception).
    Found,
    /// Bytes that were no valid reply: CRC error, wrong length, stray bytes, a late reply.
    Garbage,
    /// Nothing within the timeout (or, on TCP, the gateway said the unit is unreachable).
    Silent,
}

/// A device found by the scan.
#[derive(Debug, Clone, serde::Serialize)]
struct Found {
    baud: Option<u32>,
    parity: Option<&'static str>,
    unit: u8,
    profile: Option<String>,
    identity: Option<String>,
    #[serde(skip)]
    setting: String,
}

/// What happened on one setting.
#[derive(Debug, Clone, serde::Serialize)]
struct SettingReport {
    baud: Option<u32>,
    parity: Option<&'static str>,
    units_probed: usize,
    found: usize,
    garbage: usize,
    skipped: bool,
    #[serde(skip)]
    label: String,
}

/// The profiles a scan can recognise: those with a signature.
fn load_profiles(config: Option<&Path>) -> Result<Vec<Arc<Profile>>, Failure> {
    let profiles: BTreeMap<String, Arc<Profile>> = match config {
        Some(path) => crate::config::load(path).map_err(Failure::config)?.profiles,
        None => {
            let mut all = BTreeMap::new();
            for (name, text) in BUILTIN_PROFILES {
                let wrapped = format!("[gateway]\nid = \"scan\"\n\n{text}");
                let cfg = crate::config::parse_str(&wrapped, &Path::new("<built-in>").join(name))
                    .map_err(|e| Failure::new(format!("built-in profile {name}: {e}")))?;
                all.extend(cfg.profiles);
            }
            all
        }
    };
    Ok(profiles
        .into_values()
        .filter(|p| p.signature.is_some())
        .collect())
}

/// Serial ports present on this machine (`/dev/ttyUSB*`, `/dev/ttyACM*`, `/dev/ttyS*`).
pub(super) fn ports_present() -> Vec<String> {
    let mut out = Vec::new();
    for pattern in ["/dev/ttyUSB*", "/dev/ttyACM*", "/dev/ttyS*"] {
        let Ok(paths) = glob::glob(pattern) else {
            continue;
        };
        let mut found: Vec<String> = paths
            .filter_map(Result::ok)
            .map(|p| p.display().to_string())
            .collect();
        // ttyS2 before ttyS10.
        found.sort_by_key(|p| {
            let digits = p.trim_start_matches(|c: char| !c.is_ascii_digit());
            (p.len() - digits.len(), digits.parse::<u32>().unwrap_or(0))
        });
        out.extend(found);
    }
    out
}

/// Opens the serial port once to turn the usual problems into actionable messages (exit 1):
/// missing port, busy port, missing permission.
pub(super) fn check_port(path: &Path, baud: u32) -> Result<(), Failure> {
    if std::fs::symlink_metadata(path).is_err() {
        let present = ports_present();
        let list = if present.is_empty() {
            "none (is the USB-RS485 adapter plugged in?)".to_string()
        } else {
            present.join(", ")
        };
        return Err(Failure::new(format!(
            "no such port {}; ports present: {list}",
            path.display()
        )));
    }
    match tokio_serial::new(path.to_string_lossy(), baud).open() {
        Ok(port) => {
            drop(port);
            Ok(())
        }
        Err(e) => Err(Failure::new(port_error(path, &e))),
    }
}

/// An actionable message for a serial port that cannot be opened.
fn port_error(path: &Path, e: &tokio_serial::Error) -> String {
    let p = path.display();
    match e.kind() {
        tokio_serial::ErrorKind::Io(std::io::ErrorKind::PermissionDenied) => format!(
            "permission denied opening {p}: add your user to the `dialout` group: \
             sudo usermod -aG dialout $USER, then log in again"
        ),
        tokio_serial::ErrorKind::NoDevice => format!(
            "{p} is busy: another program has it open (the floorgate service? stop it with \
             `sudo systemctl stop floorgate`; or `fuser {p}` shows who) ({e})"
        ),
        tokio_serial::ErrorKind::Io(std::io::ErrorKind::NotFound) => {
            format!("no such port {p} ({e})")
        }
        _ => format!("cannot open {p}: {e} (is it a serial port?)"),
    }
}

/// Connects once so that an unreachable address is one clear error instead of a scan of
/// timeouts.
async fn check_tcp(address: &str) -> Result<(), Failure> {
    let connect = tokio::net::TcpStream::connect(address);
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Failure::new(format!(
            "cannot connect to {address}: {e} (is the device or gateway on, and is the address right?)"
        ))),
        Err(_) => Err(Failure::new(format!(
            "cannot connect to {address}: no answer within 3s (wrong address, or a firewall?)"
        ))),
    }
}

/// The bus a scan (or `read`/`write`) talks over: no retries, the given timeout.
pub(super) fn bus_for(kind: BusKind, timeout: Duration) -> Bus {
    Bus {
        name: "scan".into(),
        kind,
        timeout,
        retries: 0,
        turnaround: Duration::ZERO,
        max_gap: 0,
        backoff_max: Duration::from_secs(60),
    }
}

/// A fatal error during the scan: the transport failed (port unplugged, connection lost).
fn fatal(e: &TxError, what: &str) -> Failure {
    Failure::new(format!("{what}: {e}"))
}

/// Probes one unit with a read of holding register 0.
async fn probe(link: &mut Link, unit: u8, tcp: bool, what: &str) -> Result<Probe, Failure> {
    let before = link.bytes_received();
    let span = ReadSpan {
        table: Table::Holding,
        start: 0,
        count: 1,
    };
    Ok(match link.read(unit, span).await {
        Ok(_) => Probe::Found,
        // A Modbus TCP gateway answers for units it cannot reach.
        Err(TxError::Exception { code, .. }) if tcp && (code == 0x0A || code == 0x0B) => {
            Probe::Silent
        }
        Err(TxError::Exception { .. }) => Probe::Found,
        Err(TxError::Invalid(_)) => Probe::Garbage,
        Err(TxError::Timeout) if link.bytes_received() > before => Probe::Garbage,
        Err(TxError::Timeout) => Probe::Silent,
        Err(e @ TxError::Transport(_)) => return Err(fatal(&e, what)),
    })
}

/// Reads a signature's registers as a string (None when the device has no such registers).
async fn read_string(
    link: &mut Link,
    unit: u8,
    sig: &Signature,
    what: &str,
) -> Result<Option<String>, Failure> {
    if sig.table.is_bit() || sig.len == 0 {
        return Ok(None);
    }
    let span = ReadSpan {
        table: sig.table,
        start: sig.address,
        count: sig.len,
    };
    match link.read(unit, span).await {
        Ok(Raw::Registers(regs)) => {
            Ok(
                codec::decode_registers(&regs, DataType::String, WordOrder::ABCD, None)
                    .ok()
                    .and_then(|v| match v {
                        Value::Str(s) => Some(s),
                        _ => None,
                    }),
            )
        }
        Ok(Raw::Bits(_)) => Ok(None),
        Err(e @ TxError::Transport(_)) => Err(fatal(&e, what)),
        Err(_) => Ok(None),
    }
}

fn printable(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() || c == ' ')
}

/// Identifies a device: Read Device Identification first, then the profiles' signatures.
/// Returns (profile name, identity text).
async fn identify(
    link: &mut Link,
    unit: u8,
    profiles: &[Arc<Profile>],
    what: &str,
) -> Result<(Option<String>, Option<String>), Failure> {
    let mut identity = None;
    let mut profile = None;
    match link.read_device_identification(unit).await {
        Ok(objects) => {
            let texts: Vec<&str> = objects
                .iter()
                .map(|(_, t)| t.as_str())
                .filter(|t| !t.is_empty())
                .collect();
            if !texts.is_empty() {
                identity = Some(texts.join(" "));
            }
            profile = profiles
                .iter()
                .find(|p| {
                    p.signature
                        .as_ref()
                        .is_some_and(|s| texts.contains(&s.equals.as_str()))
                })
                .map(|p| p.name.clone());
        }
        Err(e @ TxError::Transport(_)) => return Err(fatal(&e, what)),
        Err(e) => tracing::debug!(unit, error = %e, "no device identification"),
    }
    if profile.is_some() {
        return Ok((profile, identity));
    }
    // One read per distinct signature location.
    let mut read: HashMap<(Table, u16, u16), Option<String>> = HashMap::new();
    let mut first_text = None;
    for p in profiles {
        let Some(sig) = &p.signature else { continue };
        let key = (sig.table, sig.address, sig.len);
        let text = match read.get(&key) {
            Some(t) => t.clone(),
            None => {
                let t = read_string(link, unit, sig, what).await?;
                read.insert(key, t.clone());
                t
            }
        };
        if let Some(t) = text {
            if t == sig.equals.trim_end_matches(['\0', ' ']) {
                return Ok((Some(p.name.clone()), identity.or(Some(t))));
            }
            if first_text.is_none() && printable(&t) {
                first_text = Some(t);
            }
        }
    }
    Ok((None, identity.or(first_text)))
}

/// Progress on stderr: one line rewritten in place on a terminal, occasional lines otherwise.
#[derive(Debug)]
struct Progress {
    tty: bool,
    total: usize,
    done: usize,
    found: usize,
    last_line: Instant,
    dirty: bool,
}

impl Progress {
    fn new(total: usize) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            total,
            done: 0,
            found: 0,
            last_line: Instant::now(),
            dirty: false,
        }
    }

    fn clear(&mut self) {
        if self.tty && self.dirty {
            eprint!("\r\x1b[K");
            self.dirty = false;
        }
    }

    fn line(&mut self, text: &str) {
        self.clear();
        eprintln!("{text}");
        self.last_line = Instant::now();
    }

    fn tick(&mut self, setting: &str, index: usize, settings: usize, unit: u8) {
        let pct = self.done * 100 / self.total.max(1);
        let text = format!(
            "scanning {setting} (setting {index}/{settings}): unit {unit:>3}, {}/{} probes ({pct}%), {} found",
            self.done, self.total, self.found
        );
        if self.tty {
            eprint!("\r\x1b[K{text}");
            let _ = std::io::stderr().flush();
            self.dirty = true;
        } else if self.last_line.elapsed() >= Duration::from_secs(5) {
            self.line(&text);
        }
    }
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    quiet_codec_warnings();
    let profiles = load_profiles(a.config.as_deref())?;
    let units = a.units.0.clone();
    let (settings, target): (Vec<Setting>, String) = match (&a.port, &a.tcp) {
        (Some(port), _) => {
            if let Some(u) = units.iter().find(|u| !(1..=247).contains(*u)) {
                return Err(Failure::new(format!(
                    "unit {u} cannot be scanned on a serial bus: RTU unit ids are 1 to 247"
                )));
            }
            if let Some(b) = a.baud.iter().find(|b| **b == 0) {
                return Err(Failure::new(format!("baud rate {b} is not valid")));
            }
            check_port(port, a.baud.first().copied().unwrap_or(9600))?;
            let mut s = Vec::new();
            for &baud in &a.baud {
                for &parity in &a.parity {
                    let setting = Setting::Serial { baud, parity };
                    if !s.contains(&setting) {
                        s.push(setting);
                    }
                }
            }
            (s, port.display().to_string())
        }
        (None, Some(address)) => {
            check_tcp(address).await?;
            (vec![Setting::Tcp], address.clone())
        }
        (None, None) => {
            return Err(Failure::new(
                "say which bus to scan: --port PATH (RS485) or --tcp HOST:PORT",
            ))
        }
    };
    let mut progress = Progress::new(settings.len() * units.len());
    // A silent unit costs its timeout plus as long again to make sure no late reply follows.
    let worst = a.timeout * 2 * u32::try_from(settings.len() * units.len()).unwrap_or(u32::MAX);
    progress.line(&format!(
        "scanning {target}: {} unit id(s) x {} setting(s), {} timeout each (at most about {}); profiles: {}",
        units.len(),
        settings.len(),
        humantime::format_duration(a.timeout),
        humantime::format_duration(Duration::from_secs(worst.as_secs().max(1))),
        if profiles.is_empty() {
            "none with a signature".to_string()
        } else {
            profiles
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    let mut found: Vec<Found> = Vec::new();
    let mut reports: Vec<SettingReport> = Vec::new();
    for (i, setting) in settings.iter().enumerate() {
        let (kind, baud, parity) = match (setting, &a.port, &a.tcp) {
            (Setting::Serial { baud, parity }, Some(port), _) => (
                BusKind::Rtu {
                    port: port.clone(),
                    baud: *baud,
                    parity: *parity,
                    data_bits: 8,
                    stop_bits: 1,
                },
                Some(*baud),
                Some(parity_name(*parity)),
            ),
            (_, _, Some(address)) => (
                BusKind::Tcp {
                    address: address.clone(),
                },
                None,
                None,
            ),
            _ => continue,
        };
        let label = setting.label();
        let what = format!("{target} at {label}");
        let mut link = Link::new(&bus_for(kind, a.timeout));
        let mut report = SettingReport {
            baud,
            parity,
            units_probed: 0,
            found: 0,
            garbage: 0,
            skipped: false,
            label: label.clone(),
        };
        for &unit in &units {
            progress.tick(&label, i + 1, settings.len(), unit);
            let result = probe(&mut link, unit, *setting == Setting::Tcp, &what).await;
            let result = match result {
                Ok(r) => r,
                Err(f) => {
                    progress.clear();
                    return Err(f);
                }
            };
            progress.done += 1;
            report.units_probed += 1;
            match result {
                Probe::Found => {
                    let (profile, identity) =
                        match identify(&mut link, unit, &profiles, &what).await {
                            Ok(r) => r,
                            Err(f) => {
                                progress.clear();
                                return Err(f);
                            }
                        };
                    tracing::debug!(unit, setting = %label, ?profile, ?identity, "device found");
                    progress.found += 1;
                    report.found += 1;
                    found.push(Found {
                        baud,
                        parity,
                        unit,
                        profile,
                        identity,
                        setting: label.clone(),
                    });
                }
                Probe::Garbage => report.garbage += 1,
                Probe::Silent => {}
            }
            if units.len() > EARLY_STOP
                && report.units_probed == EARLY_STOP
                && report.garbage == EARLY_STOP
            {
                report.skipped = true;
                progress.done += units.len() - EARLY_STOP;
                break;
            }
        }
        link.close();
        let mut summary = format!(
            "{label}: {} found, {} of {} unit(s) answered garbage",
            report.found, report.garbage, report.units_probed
        );
        if report.skipped {
            summary.push_str(&format!(
                "; skipped the rest: the first {EARLY_STOP} units gave garbage, so this is not the line's setting"
            ));
        }
        progress.line(&summary);
        reports.push(report);
    }
    progress.clear();
    if a.json {
        let doc = serde_json::json!({
            "target": target,
            "devices": found,
            "settings_tried": reports.len(),
            "settings": reports,
        });
        println!("{doc}");
    } else {
        print_table(&found, &reports, a.timeout);
    }
    Ok(())
}

fn print_table(found: &[Found], reports: &[SettingReport], timeout: Duration) {
    if found.is_empty() {
        println!("no device answered.");
        let garbage: usize = reports.iter().map(|r| r.garbage).sum();
        if garbage > 0 {
            println!(
                "some units answered garbage: a baud rate/parity not tried yet (--baud, --parity), \
                 swapped A/B wires, a missing termination, or replies slower than {} (try --timeout 300ms)",
                humantime::format_duration(timeout)
            );
        } else {
            println!(
                "check the wiring (A/B, ground), the devices' unit ids (--units) and power; \
                 slow devices need a longer --timeout"
            );
        }
    } else {
        let w_setting = found
            .iter()
            .map(|f| f.setting.len())
            .max()
            .unwrap_or(0)
            .max("SETTING".len());
        let w_profile = found
            .iter()
            .map(|f| f.profile.as_deref().unwrap_or("unknown").len())
            .max()
            .unwrap_or(0)
            .max("PROFILE".len());
        println!(
            "{:<w_setting$}  {:>4}  {:<w_profile$}  MODEL",
            "SETTING", "UNIT", "PROFILE"
        );
        for f in found {
            println!(
                "{:<w_setting$}  {:>4}  {:<w_profile$}  {}",
                f.setting,
                f.unit,
                f.profile.as_deref().unwrap_or("unknown"),
                f.identity.as_deref().unwrap_or("-")
            );
        }
    }
    let skipped: Vec<&str> = reports
        .iter()
        .filter(|r| r.skipped)
        .map(|r| r.label.as_str())
        .collect();
    print!(
        "{} device(s) found; {} setting(s) tried",
        found.len(),
        reports.len()
    );
    if skipped.is_empty() {
        println!();
    } else {
        println!(
            " ({} skipped for garbage: {})",
            skipped.len(),
            skipped.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_accept_lists_and_ranges() {
        assert_eq!(
            parse_units("1-3,7, 5").expect("list"),
            Units(vec![1, 2, 3, 7, 5])
        );
        assert_eq!(parse_units("2,2,1-2").expect("dups"), Units(vec![2, 1]));
        assert_eq!(parse_units("1-247").expect("range").0.len(), 247);
        assert!(parse_units("5-1").is_err());
        assert!(parse_units("1-300").is_err());
        assert!(parse_units("x").is_err());
        assert!(parse_units("").is_err());
    }

    #[test]
    fn parities_parse() {
        assert_eq!(parse_parity("Even"), Ok(Parity::Even));
        assert_eq!(parse_parity("n"), Ok(Parity::None));
        assert!(parse_parity("mark").is_err());
    }

    #[test]
    fn builtin_profiles_load_with_signatures() {
        let p = load_profiles(None).expect("built-in profiles");
        let names: Vec<&str> = p.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bag_dispenser", "charging_cabinet"]);
        assert_eq!(
            p[0].signature.as_ref().map(|s| s.equals.as_str()),
            Some("BAGDISP1")
        );
    }
}
