//! `floorgate read` / `floorgate write`: ad-hoc register access for installers, raw (table,
//! address, type) or by the named point of a configured device, through the same [`Link`] and
//! codec as the daemon. Writes ask for confirmation unless `--yes`.

use super::scan::{bus_for, check_port, line_label, parse_parity, quiet_codec_warnings};
use super::Failure;
use crate::bus::link::{Link, TxError};
use crate::config::{Bus, BusKind, Parity, Point, Profile};
use crate::device::codec::{self, DataType, Table, Value, WordOrder};
use crate::device::plan::ReadSpan;
use crate::device::Raw;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where to talk: a serial port, a TCP address, or a device of the configuration.
#[derive(Debug, clap::Args)]
pub(super) struct Target {
    /// Serial port of an RS485 bus (e.g. /dev/ttyUSB0).
    #[arg(long, value_name = "PATH", conflicts_with_all = ["tcp", "device"], required_unless_present_any = ["tcp", "device"])]
    port: Option<PathBuf>,
    /// Baud rate of --port (default 9600).
    #[arg(long, requires = "port")]
    baud: Option<u32>,
    /// Parity of --port: none, even or odd (default none).
    #[arg(long, requires = "port", value_parser = parse_parity)]
    parity: Option<Parity>,
    /// Modbus TCP device or gateway.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "device")]
    tcp: Option<String>,
    /// Configuration file (for --device).
    #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// A device of the configuration: its bus and unit are used, and its profile for --point.
    #[arg(long, value_name = "NAME")]
    device: Option<String>,
    /// Unit id (default 1; with --device, the device's).
    #[arg(long, conflicts_with = "device")]
    unit: Option<u8>,
    /// Reply timeout (default: the bus's, else 500ms on serial and 1s on TCP).
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

/// Arguments of `read`.
#[derive(Debug, clap::Args)]
pub(super) struct ReadArgs {
    #[command(flatten)]
    target: Target,
    /// Table: holding, input, coil or discrete.
    #[arg(long, value_parser = parse_table, default_value = "holding", conflicts_with = "point")]
    table: Table,
    /// First address (0-based protocol address).
    #[arg(long, required_unless_present = "point", conflicts_with = "point")]
    address: Option<u16>,
    /// Number of values of --type (bits for coil/discrete; for string: its length in registers).
    #[arg(long, default_value_t = 1, conflicts_with = "point")]
    count: u16,
    /// Type of the values: u16 i16 u32 i32 u64 i64 f32 f64 bool string.
    #[arg(long = "type", value_parser = parse_type, default_value = "u16", conflicts_with = "point")]
    ty: DataType,
    /// Word/byte order of multi-register values: ABCD CDAB BADC DCBA.
    #[arg(long, value_parser = parse_order, default_value = "ABCD", conflicts_with = "point")]
    order: WordOrder,
    /// A named point of the device's profile: prints its engineering value.
    #[arg(long, requires = "device")]
    point: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `write`.
#[derive(Debug, clap::Args)]
pub(super) struct WriteArgs {
    #[command(flatten)]
    target: Target,
    /// Table: holding or coil (input registers and discrete inputs are read-only).
    #[arg(long, value_parser = parse_table, default_value = "holding", conflicts_with = "point")]
    table: Table,
    /// Address (0-based protocol address).
    #[arg(long, required_unless_present = "point", conflicts_with = "point")]
    address: Option<u16>,
    /// Type of the value: u16 i16 u32 i32 u64 i64 f32 f64 bool string.
    #[arg(long = "type", value_parser = parse_type, default_value = "u16", conflicts_with = "point")]
    ty: DataType,
    /// Word/byte order of multi-register values: ABCD CDAB BADC DCBA.
    #[arg(long, value_parser = parse_order, default_value = "ABCD", conflicts_with = "point")]
    order: WordOrder,
    /// For --type string: registers to fill (padded with NUL; default: just enough).
    #[arg(long, conflicts_with = "point")]
    len: Option<u16>,
    /// A writable point of the device's profile (the value is in engineering units).
    #[arg(long, requires = "device")]
    point: Option<String>,
    /// The value: a number, true/false, or text for strings.
    #[arg(long, allow_hyphen_values = true)]
    value: String,
    /// Write without asking for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_table(text: &str) -> Result<Table, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "holding" | "hr" => Ok(Table::Holding),
        "input" | "ir" => Ok(Table::Input),
        "coil" | "coils" => Ok(Table::Coil),
        "discrete" | "di" => Ok(Table::Discrete),
        other => Err(format!(
            "table {other:?} must be holding, input, coil or discrete"
        )),
    }
}

/// A name as the configuration spells it (the same serde names), or `must be one of ...`.
fn by_config_name<T: serde::de::DeserializeOwned>(
    what: &str,
    name: &str,
    one_of: &str,
) -> Result<T, String> {
    use serde::de::IntoDeserializer;
    T::deserialize(name.into_deserializer())
        .map_err(|_: serde::de::value::Error| format!("{what} {name:?} must be {one_of}"))
}

fn parse_type(text: &str) -> Result<DataType, String> {
    by_config_name(
        "type",
        &text.trim().to_ascii_lowercase(),
        "one of u16 i16 u32 i32 u64 i64 f32 f64 bool string",
    )
}

fn parse_order(text: &str) -> Result<WordOrder, String> {
    by_config_name(
        "order",
        &text.trim().to_ascii_uppercase(),
        "ABCD, CDAB, BADC or DCBA",
    )
}

/// A resolved target: the bus to open, the unit, how to name it in messages.
struct Resolved {
    bus: Bus,
    unit: u8,
    /// `unit 2 on /dev/ttyUSB0`.
    place: String,
    /// Device name and profile with --device.
    device: Option<(String, Arc<Profile>)>,
    /// Read attempts after the first one.
    retries: u8,
}

fn resolve(t: &Target) -> Result<Resolved, Failure> {
    let (bus, unit, device, retries) = if let Some(name) = &t.device {
        let cfg = crate::config::load(&t.config).map_err(Failure::config)?;
        let dev = cfg
            .devices
            .iter()
            .find(|d| &d.name == name)
            .ok_or_else(|| {
                let known: Vec<&str> = cfg.devices.iter().map(|d| d.name.as_str()).collect();
                Failure::new(format!(
                    "no device {name:?} in {} (devices: {})",
                    cfg.source.display(),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?;
        let mut bus = cfg
            .buses
            .iter()
            .find(|b| b.name == dev.bus)
            .cloned()
            .ok_or_else(|| Failure::config(format!("device {name:?}: no bus {:?}", dev.bus)))?;
        let profile = cfg.profile_of(dev).cloned().ok_or_else(|| {
            Failure::config(format!("device {name:?}: no profile {:?}", dev.profile))
        })?;
        if let Some(to) = t.timeout {
            bus.timeout = to;
        }
        let retries = bus.retries;
        (bus, dev.unit, Some((name.clone(), profile)), retries)
    } else if let Some(port) = &t.port {
        let kind = BusKind::Rtu {
            port: port.clone(),
            baud: t.baud.unwrap_or(9600),
            parity: t.parity.unwrap_or(Parity::None),
            data_bits: 8,
            stop_bits: 1,
        };
        let unit = t.unit.unwrap_or(1);
        if !(1..=247).contains(&unit) {
            return Err(Failure::new(format!(
                "unit {unit}: RTU unit ids are 1 to 247"
            )));
        }
        let timeout = t.timeout.unwrap_or(Duration::from_millis(500));
        (bus_for(kind, timeout), unit, None, 1)
    } else if let Some(address) = &t.tcp {
        let kind = BusKind::Tcp {
            address: address.clone(),
        };
        let timeout = t.timeout.unwrap_or(Duration::from_secs(1));
        (bus_for(kind, timeout), t.unit.unwrap_or(1), None, 1)
    } else {
        return Err(Failure::new(
            "say where: --port PATH, --tcp HOST:PORT, or --device NAME (with --config)",
        ));
    };
    let place = match &bus.kind {
        BusKind::Rtu {
            port, baud, parity, ..
        } => {
            check_port(port, *baud)?;
            format!(
                "unit {unit} on {} at {}",
                port.display(),
                line_label(*baud, *parity)
            )
        }
        BusKind::Tcp { address } => format!("unit {unit} on {address}"),
    };
    Ok(Resolved {
        bus,
        unit,
        place,
        device,
        retries,
    })
}

/// A one-line, actionable cause for a failed transaction.
fn tx_failure(e: &TxError, r: &Resolved, what: &str) -> Failure {
    let hint = match e {
        TxError::Timeout => format!(
            "no reply within {} (check the unit id, wiring and baud/parity; `floorgate scan` finds devices)",
            humantime::format_duration(r.bus.timeout)
        ),
        TxError::Exception { code: 2, .. } => {
            format!("{e}: the device has no such address ({what})")
        }
        TxError::Exception { code: 1, .. } => {
            format!("{e}: the device does not support this function ({what})")
        }
        TxError::Invalid(_) => format!("{e} (wrong baud rate or parity, or noise on the line?)"),
        _ => e.to_string(),
    };
    Failure::new(format!("{what} of {}: {hint}", r.place))
}

async fn read_retry(
    link: &mut Link,
    r: &Resolved,
    span: ReadSpan,
    what: &str,
) -> Result<Raw, Failure> {
    let mut attempt = 0;
    loop {
        match link.read(r.unit, span).await {
            Ok(raw) => return Ok(raw),
            Err(e @ (TxError::Timeout | TxError::Invalid(_))) if attempt < r.retries => {
                tracing::debug!(error = %e, attempt, "read failed, retrying");
                attempt += 1;
            }
            Err(e) => return Err(tx_failure(&e, r, what)),
        }
    }
}

fn hex(words: &[u16]) -> Vec<String> {
    words.iter().map(|w| format!("0x{w:04X}")).collect()
}

/// Decimals needed to show multiples of `x` exactly (at most 10).
fn decimals(x: f64) -> i32 {
    if !x.is_finite() || x == 0.0 {
        return 0;
    }
    (0..=10)
        .find(|d| {
            let m = x.abs() * 10f64.powi(*d);
            (m - m.round()).abs() <= 1e-9 * m.max(1.0)
        })
        .unwrap_or(10)
}

/// The engineering value of a point: decoded, scaled, and for scaled integers rounded to the
/// precision the scale gives (0.1 → one decimal), so that 2400 × 0.01 shows as 24 and not
/// 24.000000000000004.
fn engineering(p: &Point, v: Value) -> Value {
    let scaled = codec::apply_scale(v, p.scale, p.offset);
    match scaled {
        Value::Float(x) if p.ty.is_integer() => {
            let d = decimals(p.scale).max(decimals(p.offset));
            let f = 10f64.powi(d);
            Value::Float((x * f).round() / f)
        }
        other => other,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Str(s) => format!("{s:?}"),
        other => serde_json::to_string(other).unwrap_or_default(),
    }
}

pub(super) async fn read(a: ReadArgs) -> Result<(), Failure> {
    quiet_codec_warnings();
    let r = resolve(&a.target)?;
    let mut link = Link::new(&r.bus);
    let result = match &a.point {
        Some(point) => read_point(&mut link, &r, point, a.json).await,
        None => read_raw(&mut link, &r, &a).await,
    };
    link.close();
    result
}

fn find_point<'a>(r: &'a Resolved, name: &str) -> Result<(&'a str, &'a Point), Failure> {
    let Some((device, profile)) = &r.device else {
        return Err(Failure::new("--point needs --device"));
    };
    let point = profile
        .points
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| {
            let known: Vec<&str> = profile.points.iter().map(|p| p.name.as_str()).collect();
            Failure::new(format!(
                "device {device} (profile {}) has no point {name:?}; points: {}",
                profile.name,
                known.join(", ")
            ))
        })?;
    Ok((device.as_str(), point))
}

async fn read_point(link: &mut Link, r: &Resolved, name: &str, json: bool) -> Result<(), Failure> {
    let (device, p) = find_point(r, name)?;
    let span = ReadSpan {
        table: p.table,
        start: p.address,
        count: p.width(),
    };
    let what = format!("read of {device} {name} ({} {})", p.table, p.address);
    let raw = read_retry(link, r, span, &what).await?;
    let (words, decoded) = match &raw {
        Raw::Registers(regs) => (
            hex(regs),
            codec::decode_registers(regs, p.ty, p.order, p.bit),
        ),
        Raw::Bits(bits) => (
            bits.iter().map(|b| u8::from(*b).to_string()).collect(),
            codec::decode_bit(bits),
        ),
    };
    let value = decoded
        .map(|v| engineering(p, v))
        .map_err(|e| Failure::new(format!("{what}: cannot decode: {e}")))?;
    if json {
        let doc = serde_json::json!({
            "device": device, "point": name, "unit": r.unit, "table": p.table,
            "address": p.address, "type": p.ty, "raw": words, "value": value,
        });
        println!("{doc}");
    } else {
        let bit = p.bit.map(|b| format!(" bit {b}")).unwrap_or_default();
        println!(
            "{device} {name} = {}   ({} {}{bit}, {}, raw {})",
            show(&value),
            p.table,
            p.address,
            r.place,
            words.join(" ")
        );
    }
    Ok(())
}

async fn read_raw(link: &mut Link, r: &Resolved, a: &ReadArgs) -> Result<(), Failure> {
    let address = a.address.unwrap_or(0);
    let count = a.count.max(1);
    let (width, values) = if a.table.is_bit() {
        (1u16, count)
    } else if a.ty == DataType::String {
        (count, 1)
    } else {
        (a.ty.width(0), count)
    };
    let total = u32::from(width) * u32::from(values);
    let limit = if a.table.is_bit() { 2000 } else { 125 };
    if total > limit {
        return Err(Failure::new(format!(
            "{total} {} is more than one Modbus read allows ({limit})",
            if a.table.is_bit() {
                "bits"
            } else {
                "registers"
            }
        )));
    }
    if u32::from(address) + total > 65536 {
        return Err(Failure::new("the read runs past address 65535"));
    }
    let span = ReadSpan {
        table: a.table,
        start: address,
        count: total as u16,
    };
    let what = format!("read of {} {address} (count {total})", a.table);
    let raw = read_retry(link, r, span, &what).await?;
    let mut rows: Vec<(u32, Vec<String>, Value)> = Vec::new();
    match raw {
        Raw::Bits(bits) => {
            for (i, b) in bits.iter().enumerate() {
                rows.push((
                    u32::from(address) + i as u32,
                    vec![u8::from(*b).to_string()],
                    Value::Bool(*b),
                ));
            }
        }
        Raw::Registers(regs) => {
            for (i, chunk) in regs.chunks(usize::from(width)).enumerate() {
                let v = codec::decode_registers(chunk, a.ty, a.order, None)
                    .map_err(|e| Failure::new(format!("{what}: cannot decode: {e}")))?;
                rows.push((
                    u32::from(address) + (i as u32) * u32::from(width),
                    hex(chunk),
                    v,
                ));
            }
        }
    }
    if a.json {
        let values: Vec<serde_json::Value> = rows
            .iter()
            .map(|(addr, raw, v)| serde_json::json!({"address": addr, "raw": raw, "value": v}))
            .collect();
        let doc = serde_json::json!({
            "unit": r.unit, "table": a.table, "address": address,
            "type": if a.table.is_bit() { DataType::Bool } else { a.ty },
            "order": a.order, "values": values,
        });
        println!("{doc}");
    } else {
        let ty = if a.table.is_bit() {
            "bits".to_string()
        } else {
            format!("{} {}", a.ty, a.order)
        };
        println!("{}: {} {address}, {ty}", r.place, a.table);
        let w_raw = rows
            .iter()
            .map(|(_, raw, _)| raw.join(" ").len())
            .max()
            .unwrap_or(0)
            .max(3);
        println!("{:>7}  {:<w_raw$}  VALUE", "ADDRESS", "RAW");
        for (addr, raw, v) in &rows {
            println!("{addr:>7}  {:<w_raw$}  {}", raw.join(" "), show(v));
        }
    }
    Ok(())
}

/// Parses a command-line value for a point of type `ty`.
fn parse_value(text: &str, ty: DataType) -> Result<Value, String> {
    let t = text.trim();
    match ty {
        DataType::String => Ok(Value::Str(text.to_string())),
        DataType::Bool => match t.to_ascii_lowercase().as_str() {
            "true" | "on" | "1" => Ok(Value::Bool(true)),
            "false" | "off" | "0" => Ok(Value::Bool(false)),
            _ => Err(format!(
                "{t:?} is not a boolean: use true/false, on/off or 1/0"
            )),
        },
        _ => {
            if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                return u64::from_str_radix(h, 16)
                    .map(Value::UInt)
                    .map_err(|_| format!("{t:?} is not a hexadecimal number"));
            }
            if let Ok(u) = t.parse::<u64>() {
                Ok(Value::UInt(u))
            } else if let Ok(i) = t.parse::<i64>() {
                Ok(Value::Int(i))
            } else {
                t.parse::<f64>()
                    .map(Value::Float)
                    .map_err(|_| format!("{t:?} is not a number"))
            }
        }
    }
}

/// What a write will do.
enum Action {
    Registers(Vec<u16>),
    Coil(bool),
    /// Read-modify-write of one bit of a holding register.
    Bit(u8, bool),
}

struct Plan {
    table: Table,
    address: u16,
    action: Action,
    /// The point, for reading back.
    point: Option<Point>,
    /// Type and order of a raw write, for reading back.
    raw_type: (DataType, WordOrder),
    /// `cab-1 rental_price_cents (holding 10, unit 2)`.
    subject: String,
}

fn plan_point(r: &Resolved, name: &str, text: &str) -> Result<Plan, Failure> {
    let (device, p) = find_point(r, name)?;
    let profile = r
        .device
        .as_ref()
        .map(|(_, p)| p.name.as_str())
        .unwrap_or("");
    if !p.writable {
        return Err(Failure::new(format!(
            "refusing to write {device} {name}: the point is not writable (profile {profile} does not mark it `writable = true`)"
        )));
    }
    if matches!(p.table, Table::Input | Table::Discrete) {
        return Err(Failure::new(format!(
            "refusing to write {device} {name}: {} is a read-only table",
            p.table
        )));
    }
    let v = parse_value(text, p.ty).map_err(|e| Failure::new(format!("--value: {e}")))?;
    if let Some(x) = v.as_f64() {
        if let Some(min) = p.min.filter(|m| x < *m) {
            return Err(Failure::new(format!(
                "refusing to write {text} to {device} {name}: below its minimum {min}"
            )));
        }
        if let Some(max) = p.max.filter(|m| x > *m) {
            return Err(Failure::new(format!(
                "refusing to write {text} to {device} {name}: above its maximum {max}"
            )));
        }
    }
    let bad = |e: codec::CodecError| Failure::new(format!("cannot write {text} to {name}: {e}"));
    let action = match (p.table, p.bit) {
        (Table::Coil, _) => Action::Coil(codec::encode_bit(&v).map_err(bad)?),
        (_, Some(bit)) => Action::Bit(bit, codec::encode_bit(&v).map_err(bad)?),
        _ => Action::Registers(
            codec::encode_point(&v, p.ty, p.order, p.scale, p.offset, p.len, None).map_err(bad)?,
        ),
    };
    let bit = p.bit.map(|b| format!(" bit {b}")).unwrap_or_default();
    Ok(Plan {
        table: p.table,
        address: p.address,
        action,
        point: Some(p.clone()),
        raw_type: (p.ty, p.order),
        subject: format!(
            "{device} {name} ({} {}{bit}, unit {})",
            p.table, p.address, r.unit
        ),
    })
}

fn plan_raw(r: &Resolved, a: &WriteArgs) -> Result<Plan, Failure> {
    let address = a.address.unwrap_or(0);
    let action = match a.table {
        Table::Input | Table::Discrete => {
            return Err(Failure::new(format!(
                "refusing to write: {} is a read-only table (only holding registers and coils can be written)",
                a.table
            )))
        }
        Table::Coil => {
            let v = parse_value(&a.value, DataType::Bool)
                .map_err(|e| Failure::new(format!("--value: {e}")))?;
            Action::Coil(codec::encode_bit(&v).map_err(|e| Failure::new(e.to_string()))?)
        }
        Table::Holding => {
            let v =
                parse_value(&a.value, a.ty).map_err(|e| Failure::new(format!("--value: {e}")))?;
            let len = a.len.unwrap_or_else(|| {
                u16::try_from(a.value.len().div_ceil(2))
                    .unwrap_or(u16::MAX)
                    .max(1)
            });
            let words = codec::encode_registers(&v, a.ty, a.order, 1.0, 0.0, len)
                .map_err(|e| Failure::new(format!("cannot write {}: {e}", a.value)))?;
            if words.len() > 123 {
                return Err(Failure::new(format!(
                    "{} registers are more than one Modbus write allows (123)",
                    words.len()
                )));
            }
            Action::Registers(words)
        }
    };
    let ty = if a.table == Table::Coil {
        String::new()
    } else {
        format!(" as {}", a.ty)
    };
    Ok(Plan {
        table: a.table,
        address,
        action,
        point: None,
        raw_type: (a.ty, a.order),
        subject: format!("{} {address}{ty}, {}", a.table, r.place),
    })
}

/// Asks on the terminal; without one, refuses.
async fn confirm(question: String) -> Result<bool, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::new(format!(
            "not writing: no terminal to confirm \"{question}\"; use --yes to write without confirmation"
        )));
    }
    let answer = tokio::task::spawn_blocking(move || {
        eprint!("{question} [y/N] ");
        let _ = std::io::stderr().flush();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| Failure::new(format!("confirmation: {e}")))?
    .map_err(|e| Failure::new(format!("confirmation: {e}")))?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

pub(super) async fn write(a: WriteArgs) -> Result<(), Failure> {
    quiet_codec_warnings();
    let r = resolve(&a.target)?;
    let plan = match &a.point {
        Some(point) => plan_point(&r, point, &a.value)?,
        None => plan_raw(&r, &a)?,
    };
    if !a.yes && !confirm(format!("write {} to {}?", a.value, plan.subject)).await? {
        return Err(Failure::new("not written"));
    }
    let mut link = Link::new(&r.bus);
    let result = execute(&mut link, &r, &plan).await;
    link.close();
    let read_back = result?;
    if a.json {
        let raw = match &plan.action {
            Action::Registers(w) => serde_json::json!(hex(w)),
            Action::Coil(b) | Action::Bit(_, b) => serde_json::json!(b),
        };
        let doc = serde_json::json!({
            "written": true, "unit": r.unit, "table": plan.table, "address": plan.address,
            "raw": raw, "read_back": read_back,
        });
        println!("{doc}");
    } else {
        let back = match &read_back {
            Some(v) => format!("; read back {}", show(v)),
            None => String::new(),
        };
        println!("wrote {} to {}{back}", a.value, plan.subject);
    }
    Ok(())
}

/// Writes, then reads the value back (None when the read-back fails: some devices do not allow
/// it, which does not make the write fail).
async fn execute(link: &mut Link, r: &Resolved, plan: &Plan) -> Result<Option<Value>, Failure> {
    let what = format!("write of {} {}", plan.table, plan.address);
    let written = match &plan.action {
        Action::Registers(words) => link
            .write_registers(r.unit, plan.address, words.clone())
            .await
            .map(|()| words.len() as u16),
        Action::Coil(on) => link.write_coil(r.unit, plan.address, *on).await.map(|()| 1),
        Action::Bit(bit, on) => {
            let span = ReadSpan {
                table: Table::Holding,
                start: plan.address,
                count: 1,
            };
            let current = match read_retry(link, r, span, &what).await? {
                Raw::Registers(regs) => regs.first().copied().unwrap_or(0),
                Raw::Bits(_) => 0,
            };
            let next = codec::set_bit(current, *bit, *on)
                .map_err(|e| Failure::new(format!("{what}: {e}")))?;
            link.write_registers(r.unit, plan.address, vec![next])
                .await
                .map(|()| 1)
        }
    }
    .map_err(|e| tx_failure(&e, r, &what))?;
    let span = ReadSpan {
        table: plan.table,
        start: plan.address,
        count: written,
    };
    let back = match link.read(r.unit, span).await {
        Ok(Raw::Registers(regs)) => match &plan.point {
            Some(p) => codec::decode_registers(&regs, p.ty, p.order, p.bit)
                .ok()
                .map(|v| engineering(p, v)),
            None => codec::decode_registers(&regs, plan.raw_type.0, plan.raw_type.1, None).ok(),
        },
        Ok(Raw::Bits(bits)) => bits.first().map(|b| Value::Bool(*b)),
        Err(e) => {
            tracing::debug!(error = %e, "read-back after write failed");
            None
        }
    };
    Ok(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_and_order_names_are_the_configuration_names() {
        assert_eq!(parse_type(" F32 "), Ok(DataType::F32));
        assert_eq!(parse_type("string"), Ok(DataType::String));
        assert_eq!(parse_order("cdab"), Ok(WordOrder::CDAB));
        assert_eq!(
            parse_type("u8"),
            Err("type \"u8\" must be one of u16 i16 u32 i32 u64 i64 f32 f64 bool string".into())
        );
        assert!(parse_order("ABDC").is_err_and(|e| e.contains("ABCD, CDAB, BADC or DCBA")));
    }

    #[test]
    fn values_parse_by_type() {
        assert_eq!(parse_value("250", DataType::U16), Ok(Value::UInt(250)));
        assert_eq!(parse_value("-5", DataType::I16), Ok(Value::Int(-5)));
        assert_eq!(parse_value("22.5", DataType::I16), Ok(Value::Float(22.5)));
        assert_eq!(parse_value("0x00fa", DataType::U16), Ok(Value::UInt(250)));
        assert_eq!(parse_value("on", DataType::Bool), Ok(Value::Bool(true)));
        assert!(parse_value("maybe", DataType::Bool).is_err());
        assert_eq!(
            parse_value("AB C", DataType::String),
            Ok(Value::Str("AB C".into()))
        );
    }

    #[test]
    fn decimals_follow_the_scale() {
        assert_eq!(decimals(1.0), 0);
        assert_eq!(decimals(0.1), 1);
        assert_eq!(decimals(0.01), 2);
        assert_eq!(decimals(0.25), 2);
        assert_eq!(decimals(0.0), 0);
    }
}
