//! Semantic checks: raw sections → typed [`Config`], every problem recorded with its location.

use super::load::{FileId, RawConfig, Sources};
use super::raw::{PointKind, RawAlarm, RawBus, RawPoint, RawProfile};
use super::{
    AlarmRule, Bus, BusKind, Config, Device, Gateway, Metrics, Op, Parity, Point, Profile,
    Signature, Store, Uplink,
};
use crate::device::codec::{DataType, Value, WordOrder};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

const BAUDS: &[u32] = &[1200, 2400, 4800, 9600, 14400, 19200, 38400, 57600, 115200];

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

pub(crate) fn validate(src: &mut Sources, raw: RawConfig) -> Option<Config> {
    let main = raw.main;
    let source = src.path(main).to_path_buf();
    // Without a usable [gateway] the rest is still checked, against a placeholder.
    let gateway_ok = raw.gateway.is_some();
    let gw = raw
        .gateway
        .map(Spanned::into_inner)
        .unwrap_or_else(|| super::raw::RawGateway {
            id: Spanned::new(0..0, "unknown".into()),
            site: None,
            state_dir: None,
            groups: Vec::new(),
            include: Vec::new(),
            control_socket: None,
        });
    for (what, value) in
        std::iter::once(("gateway id", &gw.id)).chain(gw.site.iter().map(|s| ("site", s)))
    {
        if !valid_id(value.get_ref()) {
            src.error(
                main,
                Some(value.span()),
                format!(
                    "{what} {:?} must be 1-64 characters of letters, digits, '-', '_' or '.'",
                    value.get_ref()
                ),
            );
        }
    }
    for g in &gw.groups {
        if !valid_id(g.get_ref()) {
            src.error(
                main,
                Some(g.span()),
                format!(
                    "group name {:?} must be letters, digits, '-', '_' or '.'",
                    g.get_ref()
                ),
            );
        }
    }
    let state_dir = PathBuf::from(gw.state_dir.unwrap_or_else(|| "/var/lib/floorgate".into()));
    let control_socket = gw
        .control_socket
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir.join("control.sock"));
    let gateway = Gateway {
        id: gw.id.get_ref().clone(),
        site: gw
            .site
            .map(|s| s.into_inner())
            .unwrap_or_else(|| "default".into()),
        state_dir,
        groups: gw.groups.into_iter().map(Spanned::into_inner).collect(),
        control_socket,
    };

    let store = {
        let s = raw.store.unwrap_or_default();
        let max_bytes = s.max_bytes.as_ref().map_or(256 << 20, |v| v.get_ref().0);
        if let Some(v) = &s.max_bytes {
            if max_bytes < 64 << 10 {
                src.error(
                    main,
                    Some(v.span()),
                    "store.max_bytes must be at least 64KiB",
                );
            }
        }
        let commit_interval = s
            .commit_interval
            .as_ref()
            .map_or(Duration::from_millis(50), |v| v.get_ref().0);
        if let Some(v) = &s.commit_interval {
            if commit_interval < Duration::from_millis(1)
                || commit_interval > Duration::from_secs(10)
            {
                src.error(
                    main,
                    Some(v.span()),
                    "store.commit_interval must be between 1ms and 10s",
                );
            }
        }
        Store {
            max_bytes,
            commit_interval,
            cache_bytes: s.cache_bytes.map_or(4 << 20, |v| v.into_inner().0),
            min_free: s
                .min_free
                .map_or(crate::store::DEFAULT_MIN_FREE, |v| v.into_inner().0),
        }
    };

    let uplink = raw.uplink.and_then(|u| uplink(src, main, &gateway, u));
    let metrics = match raw.metrics.and_then(|m| m.listen) {
        None => Metrics {
            listen: Some(([127, 0, 0, 1], 9771).into()),
        },
        Some(l) if l.get_ref().is_empty() || l.get_ref() == "off" => Metrics { listen: None },
        Some(l) => match l.get_ref().parse() {
            Ok(addr) => Metrics { listen: Some(addr) },
            Err(_) => {
                src.error(main, Some(l.span()), format!("metrics.listen {:?} is not an address like \"127.0.0.1:9771\" (or \"off\")", l.get_ref()));
                Metrics { listen: None }
            }
        },
    };

    let mut buses = Vec::new();
    let mut bus_names = HashSet::new();
    for b in raw.buses {
        let span = b.span();
        let b = b.into_inner();
        if !bus_names.insert(b.name.get_ref().clone()) {
            src.error(
                main,
                Some(b.name.span()),
                format!("duplicate bus name {:?}", b.name.get_ref()),
            );
        }
        if let Some(bus) = bus(src, main, span, b) {
            buses.push(bus);
        }
    }

    let mut profiles = BTreeMap::new();
    let mut profile_files: HashMap<String, FileId> = HashMap::new();
    for (file, name, p) in raw.profiles {
        if profile_files.contains_key(name.get_ref()) {
            src.error(
                file,
                Some(name.span()),
                format!("profile {:?} is defined twice", name.get_ref()),
            );
            continue;
        }
        profile_files.insert(name.get_ref().clone(), file);
        if let Some(profile) = profile(src, file, name.get_ref(), p) {
            profiles.insert(profile.name.clone(), Arc::new(profile));
        }
    }

    let mut devices = Vec::new();
    let mut names = HashSet::new();
    let mut units = HashSet::new();
    for d in raw.devices {
        let d = d.into_inner();
        if !valid_id(d.name.get_ref()) {
            src.error(
                main,
                Some(d.name.span()),
                format!(
                    "device name {:?} must be letters, digits, '-', '_' or '.'",
                    d.name.get_ref()
                ),
            );
        }
        if !names.insert(d.name.get_ref().clone()) {
            src.error(
                main,
                Some(d.name.span()),
                format!("duplicate device name {:?}", d.name.get_ref()),
            );
        }
        if !bus_names.contains(d.bus.get_ref()) {
            let known: Vec<&str> = buses.iter().map(|b| b.name.as_str()).collect();
            src.error(
                main,
                Some(d.bus.span()),
                format!(
                    "unknown bus {:?} (buses: {})",
                    d.bus.get_ref(),
                    known.join(", ")
                ),
            );
        }
        if !profile_files.contains_key(d.profile.get_ref()) {
            let known: Vec<&String> = profile_files.keys().collect();
            src.error(main, Some(d.profile.span()), format!("unknown profile {:?} (profiles: {known:?}; add it inline or via gateway.include)", d.profile.get_ref()));
        }
        let unit = u8::try_from(*d.unit.get_ref()).unwrap_or(0);
        if !(1..=247).contains(&unit) {
            src.error(main, Some(d.unit.span()), "unit must be between 1 and 247");
        } else if !units.insert((d.bus.get_ref().clone(), unit)) {
            src.error(
                main,
                Some(d.unit.span()),
                format!("unit {unit} is used twice on bus {:?}", d.bus.get_ref()),
            );
        }
        let poll = d
            .poll
            .as_ref()
            .map_or(Duration::from_secs(1), |p| p.get_ref().0);
        if let Some(p) = &d.poll {
            if poll < Duration::from_millis(10) {
                src.error(main, Some(p.span()), "poll must be at least 10ms");
            }
        }
        devices.push(Device {
            name: d.name.into_inner(),
            bus: d.bus.into_inner(),
            unit,
            profile: d.profile.into_inner(),
            poll,
        });
    }

    let mut poll_policy = BTreeMap::new();
    let overlay = raw.overlay;
    if let Some(poll) = raw.poll {
        for (name, d) in poll.into_inner() {
            if !overlay && !profile_files.contains_key(&name) {
                src.error(
                    main,
                    Some(d.span()),
                    format!("[poll] names unknown profile {name:?}"),
                );
            } else if d.get_ref().0 < Duration::from_millis(10) {
                src.error(main, Some(d.span()), "poll must be at least 10ms");
            }
            poll_policy.insert(name, d.into_inner().0);
        }
    }
    if !gateway_ok {
        return None;
    }
    Some(Config {
        source,
        gateway,
        store,
        uplink,
        metrics,
        buses,
        devices,
        profiles,
        poll_policy,
    })
}

fn uplink(
    src: &mut Sources,
    main: FileId,
    gateway: &Gateway,
    u: Spanned<super::raw::RawUplink>,
) -> Option<Uplink> {
    let u = u.into_inner();
    let url = u.url.get_ref();
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        src.error(
            main,
            Some(u.url.span()),
            format!(
                "uplink.url {url:?} must start with mqtts:// (or mqtt:// with allow_plaintext)"
            ),
        );
        return None;
    };
    if !tls && !u.allow_plaintext {
        src.error(main, Some(u.url.span()), "plaintext mqtt:// is refused: use mqtts://, or set uplink.allow_plaintext = true on a trusted network");
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => match p.parse::<u16>() {
            Ok(p) => (h.trim_matches(|c| c == '[' || c == ']').to_string(), p),
            Err(_) => {
                src.error(
                    main,
                    Some(u.url.span()),
                    format!("bad port in uplink.url {url:?}"),
                );
                return None;
            }
        },
        None => (rest.to_string(), if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        src.error(main, Some(u.url.span()), "uplink.url has no host");
    }
    if u.cert_file.is_some() != u.key_file.is_some() {
        src.error(
            main,
            Some(u.url.span()),
            "uplink.cert_file and uplink.key_file go together (mTLS needs both)",
        );
    }
    let prefix = u
        .topic_prefix
        .as_ref()
        .map_or("floorgate/{site}/{gateway}", |p| p.get_ref().as_str())
        .replace("{site}", &gateway.site)
        .replace("{gateway}", &gateway.id);
    if prefix.is_empty() || prefix.contains('+') || prefix.contains('#') || prefix.ends_with('/') {
        let span = u.topic_prefix.as_ref().map(|p| p.span());
        src.error(
            main,
            span,
            format!("topic_prefix {prefix:?} must be a topic without wildcards or a trailing '/'"),
        );
    }
    let max_batch = u.max_batch.as_ref().map_or(100, |b| *b.get_ref());
    if let Some(b) = &u.max_batch {
        if !(1..=10_000).contains(&max_batch) {
            src.error(
                main,
                Some(b.span()),
                "uplink.max_batch must be between 1 and 10000",
            );
        }
    }
    let keep_alive = u
        .keep_alive
        .as_ref()
        .map_or(Duration::from_secs(30), |k| k.get_ref().0);
    if let Some(k) = &u.keep_alive {
        if keep_alive < Duration::from_secs(5) || keep_alive > Duration::from_secs(65535) {
            src.error(
                main,
                Some(k.span()),
                "uplink.keep_alive must be between 5s and 18h",
            );
        }
    }
    let max_inflight = u.max_inflight.as_ref().map_or(32, |m| *m.get_ref());
    if let Some(m) = &u.max_inflight {
        if max_inflight == 0 {
            src.error(
                main,
                Some(m.span()),
                "uplink.max_inflight must be at least 1",
            );
        }
    }
    if let Some(k) = &u.config_public_key {
        if crate::uplink::remote::decode_public_key(k.get_ref()).is_err() {
            src.error(
                main,
                Some(k.span()),
                "uplink.config_public_key must be the base64 of a 32-byte ed25519 public key",
            );
        }
    }
    Some(Uplink {
        host,
        port,
        tls,
        ca_file: u.ca_file.map(PathBuf::from),
        cert_file: u.cert_file.map(PathBuf::from),
        key_file: u.key_file.map(PathBuf::from),
        username: u.username,
        password_file: u.password_file.map(PathBuf::from),
        topic_prefix: prefix,
        keep_alive,
        max_batch: max_batch as usize,
        max_inflight,
        reconnect_max: u
            .reconnect_max
            .map_or(Duration::from_secs(60), |r| r.into_inner().0),
        config_public_key: u.config_public_key.map(Spanned::into_inner),
        config_window: u
            .config_window
            .map_or(Duration::from_secs(60), |w| w.into_inner().0),
    })
}

fn bus(src: &mut Sources, main: FileId, span: std::ops::Range<usize>, b: RawBus) -> Option<Bus> {
    let kind = match (b.rtu, b.tcp) {
        (Some(rtu), None) => {
            let rtu = rtu.into_inner();
            let baud = rtu.baud.as_ref().map_or(9600, |b| *b.get_ref());
            if let Some(bs) = &rtu.baud {
                if !BAUDS.contains(&baud) {
                    src.error(
                        main,
                        Some(bs.span()),
                        format!("baud {baud} is not one of {BAUDS:?}"),
                    );
                }
            }
            let parity = match rtu.parity.as_ref().map(|p| p.get_ref().as_str()) {
                None | Some("none") => Parity::None,
                Some("even") => Parity::Even,
                Some("odd") => Parity::Odd,
                Some(other) => {
                    let span = rtu.parity.as_ref().map(|p| p.span());
                    src.error(
                        main,
                        span,
                        format!("parity {other:?} must be none, even or odd"),
                    );
                    Parity::None
                }
            };
            let data_bits = rtu.data_bits.as_ref().map_or(8, |d| *d.get_ref());
            if let Some(d) = &rtu.data_bits {
                if !(7..=8).contains(&data_bits) {
                    src.error(main, Some(d.span()), "data_bits must be 7 or 8");
                }
            }
            let stop_bits = rtu.stop_bits.as_ref().map_or(1, |d| *d.get_ref());
            if let Some(s) = &rtu.stop_bits {
                if !(1..=2).contains(&stop_bits) {
                    src.error(main, Some(s.span()), "stop_bits must be 1 or 2");
                }
            }
            BusKind::Rtu {
                port: PathBuf::from(rtu.port),
                baud,
                parity,
                data_bits,
                stop_bits,
            }
        }
        (None, Some(tcp)) => {
            let tcp = tcp.into_inner();
            if !tcp.address.get_ref().contains(':') {
                src.error(
                    main,
                    Some(tcp.address.span()),
                    "tcp.address must be HOST:PORT",
                );
            }
            BusKind::Tcp {
                address: tcp.address.into_inner(),
            }
        }
        _ => {
            src.error(
                main,
                Some(span),
                format!(
                    "bus {:?} needs exactly one of `rtu = {{...}}` or `tcp = {{...}}`",
                    b.name.get_ref()
                ),
            );
            return None;
        }
    };
    let is_tcp = matches!(kind, BusKind::Tcp { .. });
    let timeout = b.timeout.as_ref().map_or(
        Duration::from_millis(if is_tcp { 1000 } else { 300 }),
        |t| t.get_ref().0,
    );
    if let Some(t) = &b.timeout {
        if timeout < Duration::from_millis(5) || timeout > Duration::from_secs(30) {
            src.error(main, Some(t.span()), "timeout must be between 5ms and 30s");
        }
    }
    Some(Bus {
        name: b.name.into_inner(),
        kind,
        timeout,
        retries: b.retries.unwrap_or(1),
        turnaround: b.turnaround.map_or(Duration::ZERO, |t| t.into_inner().0),
        max_gap: b.max_gap.unwrap_or(8),
        backoff_max: b
            .backoff_max
            .map_or(Duration::from_secs(60), |t| t.into_inner().0),
    })
}

fn profile(src: &mut Sources, file: FileId, name: &str, p: RawProfile) -> Option<Profile> {
    let mut points: Vec<Point> = Vec::new();
    let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
    for rp in p.points {
        let span = rp.get_ref().name.span();
        for point in expand_point(src, file, rp.into_inner()) {
            points.push(point);
            spans.push(span.clone());
        }
    }
    let mut seen = HashMap::new();
    for (i, pt) in points.iter().enumerate() {
        if let Some(j) = seen.insert(pt.name.clone(), i) {
            let _ = j;
            src.error(
                file,
                Some(spans[i].clone()),
                format!("point {:?} is defined twice in profile {name:?}", pt.name),
            );
        }
    }
    // Overlaps: two points on the same registers, unless both are distinct bits of one register.
    for i in 0..points.len() {
        for j in 0..i {
            let (a, b) = (&points[i], &points[j]);
            if a.table != b.table {
                continue;
            }
            let (a0, a1) = (a.address as u32, a.address as u32 + a.width() as u32);
            let (b0, b1) = (b.address as u32, b.address as u32 + b.width() as u32);
            if a0 < b1 && b0 < a1 {
                let distinct_bits = matches!((a.bit, b.bit), (Some(x), Some(y)) if x != y && a0 == b0 && a.width() == 1 && b.width() == 1);
                if !distinct_bits {
                    src.error(
                        file,
                        Some(spans[i].clone()),
                        format!(
                            "point {:?} overlaps point {:?} ({} {}..{})",
                            a.name,
                            b.name,
                            a.table.as_str(),
                            b0,
                            b1
                        ),
                    );
                }
            }
        }
    }
    let mut alarms = Vec::new();
    let mut alarm_names = HashSet::new();
    for ra in p.alarms {
        let span = ra.span();
        let ra = ra.into_inner();
        if !alarm_names.insert(ra.name.get_ref().clone()) {
            src.error(
                file,
                Some(ra.name.span()),
                format!("alarm {:?} is defined twice", ra.name.get_ref()),
            );
        }
        if let Some(a) = alarm(src, file, span, ra, &points) {
            alarms.push(a);
        }
    }
    let signature = p.signature.map(|s| Signature {
        table: s.table,
        address: s.address,
        len: s.len,
        equals: s.equals,
    });
    Some(Profile {
        name: name.to_string(),
        description: p.description.unwrap_or_default(),
        points,
        alarms,
        signature,
    })
}

fn expand_point(src: &mut Sources, file: FileId, p: RawPoint) -> Vec<Point> {
    let span = Some(p.name.span());
    let name = p.name.get_ref().clone();
    let mut ok = true;
    let mut fail = |src: &mut Sources, msg: String| {
        src.error(file, span.clone(), format!("point {name:?}: {msg}"));
        ok = false;
    };
    let len = p.len.unwrap_or(0);
    if p.ty == DataType::String && len == 0 {
        fail(src, "type string needs `len` (registers)".into());
    }
    if p.ty != DataType::String && p.len.is_some() {
        fail(src, "`len` is only for type string".into());
    }
    if p.table.is_bit() && p.ty != DataType::Bool {
        fail(
            src,
            format!(
                "table {} holds single bits: type must be bool",
                p.table.as_str()
            ),
        );
    }
    if let Some(bit) = p.bit {
        if p.table.is_bit() || p.ty != DataType::Bool || bit > 15 {
            fail(
                src,
                "`bit` (0-15) picks one bit of a register: only for type bool on holding/input"
                    .into(),
            );
        }
    }
    let width = if p.table.is_bit() { 1 } else { p.ty.width(len) };
    if p.order.is_some()
        && width < 2
        && p.ty != DataType::String
        && p.ty != DataType::U16
        && p.ty != DataType::I16
    {
        fail(src, "`order` only applies to multi-register values".into());
    }
    let kind = p.kind.unwrap_or(match p.ty {
        DataType::Bool | DataType::String => PointKind::State,
        _ => PointKind::Telemetry,
    });
    let scaled = p.scale.is_some_and(|s| s != 1.0) || p.offset.is_some_and(|o| o != 0.0);
    if kind == PointKind::Counter && (!p.ty.is_integer() || scaled) {
        fail(
            src,
            "a counter must be an unscaled integer type (u16 u32 u64 i16 i32 i64)".into(),
        );
    }
    if p.scale == Some(0.0) {
        fail(src, "scale must not be 0".into());
    }
    if p.deadband.is_some_and(|d| d < 0.0 || !d.is_finite()) {
        fail(src, "deadband must be a non-negative number".into());
    }
    if p.writable
        && !matches!(
            p.table,
            crate::device::codec::Table::Holding | crate::device::codec::Table::Coil
        )
    {
        fail(
            src,
            "only holding registers and coils can be writable".into(),
        );
    }
    let count = p.count.unwrap_or(1);
    let stride = p.stride.unwrap_or(width);
    if count == 0 {
        fail(src, "count must be at least 1".into());
    }
    if count > 1 && !name.contains("{i}") {
        fail(
            src,
            "a repeated point (count > 1) needs `{i}` in its name, e.g. \"slot{i}.present\"".into(),
        );
    }
    if count > 1 && stride < width && p.bit.is_none() {
        fail(
            src,
            format!("stride {stride} is smaller than the point's width {width}"),
        );
    }
    let last = p.address as u32 + (count.max(1) as u32 - 1) * stride as u32 + width as u32;
    if last > 65536 {
        fail(src, "the point runs past address 65535".into());
    }
    if !ok {
        return Vec::new();
    }
    (0..count)
        .map(|i| Point {
            name: name.replace("{i}", &(i + 1).to_string()),
            table: p.table,
            address: p.address + i * stride,
            ty: p.ty,
            order: p.order.unwrap_or(WordOrder::ABCD),
            len,
            bit: p.bit,
            scale: p.scale.unwrap_or(1.0),
            offset: p.offset.unwrap_or(0.0),
            kind,
            deadband: p.deadband.unwrap_or(0.0),
            heartbeat: p.heartbeat.map(|h| h.0),
            writable: p.writable,
            min: p.min,
            max: p.max,
        })
        .collect()
}

/// Parses `POINT OP LITERAL`.
pub(crate) fn parse_when(when: &str) -> Result<(String, Op, Value), String> {
    let when = when.trim();
    let (point, rest) = when.split_once(char::is_whitespace).ok_or_else(|| {
        format!("`when` {when:?} must be `POINT OP LITERAL`, e.g. \"stock < 20\"")
    })?;
    let rest = rest.trim_start();
    let ops = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let (op, lit) = ops
        .iter()
        .find_map(|(s, op)| rest.strip_prefix(s).map(|l| (*op, l.trim())))
        .ok_or_else(|| format!("`when` {when:?}: operator must be one of == != < <= > >="))?;
    let literal = if lit == "true" {
        Value::Bool(true)
    } else if lit == "false" {
        Value::Bool(false)
    } else if lit.len() >= 2 && lit.starts_with('"') && lit.ends_with('"') {
        Value::Str(lit[1..lit.len() - 1].to_string())
    } else if let Ok(f) = lit.parse::<f64>() {
        Value::Float(f)
    } else {
        return Err(format!(
            "`when` {when:?}: literal {lit:?} must be a number, true, false or a \"quoted string\""
        ));
    };
    Ok((point.to_string(), op, literal))
}

fn alarm(
    src: &mut Sources,
    file: FileId,
    span: std::ops::Range<usize>,
    a: RawAlarm,
    points: &[Point],
) -> Option<AlarmRule> {
    let (point, op, literal) = match parse_when(a.when.get_ref()) {
        Ok(v) => v,
        Err(e) => {
            src.error(file, Some(a.when.span()), e);
            return None;
        }
    };
    let Some(pt) = points.iter().find(|p| p.name == point) else {
        src.error(
            file,
            Some(a.when.span()),
            format!(
                "alarm {:?} watches unknown point {point:?}",
                a.name.get_ref()
            ),
        );
        return None;
    };
    let compatible = match (&literal, pt.ty) {
        (Value::Bool(_), DataType::Bool) => matches!(op, Op::Eq | Op::Ne),
        (Value::Str(_), DataType::String) => matches!(op, Op::Eq | Op::Ne),
        (Value::Float(_), t) => !matches!(t, DataType::Bool | DataType::String),
        _ => false,
    };
    if !compatible {
        src.error(file, Some(a.when.span()), format!("alarm {:?}: cannot compare {:?} point {point:?} with {literal:?} using that operator", a.name.get_ref(), pt.ty));
        return None;
    }
    let _ = span;
    Some(AlarmRule {
        name: a.name.into_inner(),
        point,
        op,
        literal,
        for_: a.for_.map_or(Duration::ZERO, |d| d.0),
        severity: a.severity.unwrap_or_else(|| "warning".into()),
    })
}
