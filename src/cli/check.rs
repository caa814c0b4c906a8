//! `floorgate check`: validate the configuration and the environment, one line per check.

use super::Failure;
use crate::config::{BusKind, Config};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Arguments of `check`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Configuration file.
    #[arg(long, env = "FLOORGATE_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Skip the broker handshake (e.g. during installation without network).
    #[arg(long)]
    offline: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, serde::Serialize)]
struct Check {
    level: Level,
    check: String,
    detail: String,
}

#[derive(Debug, Default)]
struct Report(Vec<Check>);

impl Report {
    fn add(&mut self, level: Level, check: impl Into<String>, detail: impl Into<String>) {
        self.0.push(Check {
            level,
            check: check.into(),
            detail: detail.into(),
        });
    }
}

fn access(path: &Path, mode: i32) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) with a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), mode) == 0 }
}

fn serial_ports(cfg: &Config, r: &mut Report) {
    for bus in &cfg.buses {
        let BusKind::Rtu { port, .. } = &bus.kind else {
            continue;
        };
        let name = format!("serial {}", bus.name);
        if !port.exists() {
            r.add(
                Level::Fail,
                name,
                format!(
                    "{} does not exist (is the USB-RS485 adapter plugged in?)",
                    port.display()
                ),
            );
        } else if !access(port, libc::R_OK | libc::W_OK) {
            r.add(
                Level::Fail,
                name,
                format!(
                    "{}: permission denied; add the service user to the `dialout` group",
                    port.display()
                ),
            );
        } else {
            r.add(Level::Ok, name, format!("{} is accessible", port.display()));
        }
    }
}

fn certificate(path: &Path, what: &str, r: &mut Report) {
    let name = format!("certificate {what}");
    let certs = match crate::uplink::tls::load_certs(path) {
        Ok(c) => c,
        Err(e) => return r.add(Level::Fail, name, e.to_string()),
    };
    let now = crate::event::now_ms() as i64 / 1000;
    for (i, der) in certs.iter().enumerate() {
        let cert = match x509_parser::parse_x509_certificate(der.as_ref()) {
            Ok((_, c)) => c,
            Err(e) => {
                return r.add(
                    Level::Fail,
                    name,
                    format!("{}: certificate {i} cannot be parsed: {e}", path.display()),
                )
            }
        };
        let subject = cert.subject().to_string();
        let not_after = cert.validity().not_after.timestamp();
        let not_before = cert.validity().not_before.timestamp();
        let days = (not_after - now) / 86_400;
        if not_after < now {
            return r.add(
                Level::Fail,
                name,
                format!("{}: {subject} expired {} days ago", path.display(), -days),
            );
        }
        if not_before > now {
            return r.add(
                Level::Fail,
                name,
                format!(
                    "{}: {subject} is not valid yet (is the clock right?)",
                    path.display()
                ),
            );
        }
        if days < 30 {
            return r.add(
                Level::Warn,
                name,
                format!("{}: {subject} expires in {days} days", path.display()),
            );
        }
    }
    r.add(
        Level::Ok,
        name,
        format!("{} valid ({} certificate(s))", path.display(), certs.len()),
    );
}

async fn uplink(cfg: &Config, offline: bool, r: &mut Report) {
    let Some(u) = &cfg.uplink else {
        return r.add(
            Level::Warn,
            "uplink",
            "no [uplink]: events are only buffered",
        );
    };
    if let Some(ca) = &u.ca_file {
        certificate(ca, "CA", r);
    }
    if let Some(cert) = &u.cert_file {
        certificate(cert, "client", r);
    }
    for (what, p) in [("key", &u.key_file), ("password file", &u.password_file)] {
        if let Some(p) = p {
            match crate::uplink::tls::check_secret_permissions(p) {
                Ok(()) => r.add(
                    Level::Ok,
                    what,
                    format!("{} is private (0600)", p.display()),
                ),
                Err(e) => r.add(Level::Fail, what, e.to_string()),
            }
        }
    }
    if offline {
        return r.add(Level::Warn, "broker", "skipped (--offline)");
    }
    // Connect as ID-check so that the running daemon's session is not taken over.
    let mut checked = u.clone();
    checked.topic_prefix = format!("{}/check", u.topic_prefix);
    let store = match tempfile::tempdir()
        .map_err(|e| e.to_string())
        .and_then(|d| {
            crate::store::Store::open(d.path(), 1 << 20, 1 << 20)
                .map(|s| (d, s))
                .map_err(|e| e.to_string())
        }) {
        Ok(s) => s,
        Err(e) => {
            return r.add(
                Level::Fail,
                "broker",
                format!("cannot prepare the check: {e}"),
            )
        }
    };
    let up = crate::uplink::Uplink::new(
        checked,
        &format!("{}-check", cfg.gateway.id),
        std::sync::Arc::new(store.1),
        Vec::new(),
        Default::default(),
    );
    let target = format!("{}:{}", u.host, u.port);
    match up.probe(Duration::from_secs(10)).await {
        Ok(()) => r.add(
            Level::Ok,
            "broker",
            format!("{target}: TLS handshake and MQTT connect succeeded"),
        ),
        Err(e) => r.add(Level::Fail, "broker", format!("{target}: {e}")),
    }
}

fn state_dir(cfg: &Config, r: &mut Report) {
    let dir = &cfg.gateway.state_dir;
    if let Err(e) = std::fs::create_dir_all(dir) {
        return r.add(Level::Fail, "state dir", format!("{}: {e}", dir.display()));
    }
    let probe = dir.join(".floorgate-check");
    if let Err(e) = std::fs::write(&probe, b"x") {
        return r.add(
            Level::Fail,
            "state dir",
            format!("{} is not writable: {e}", dir.display()),
        );
    }
    let _ = std::fs::remove_file(&probe);
    match crate::store::free_bytes(dir).ok() {
        Some(f) if f < cfg.store.min_free => r.add(
            Level::Fail,
            "state dir",
            format!(
                "{}: only {} MiB free, below store.min_free ({} MiB) the store writes nothing",
                dir.display(),
                f >> 20,
                cfg.store.min_free >> 20
            ),
        ),
        Some(f) if f < cfg.store.max_bytes.min(256 << 20) => r.add(
            Level::Warn,
            "state dir",
            format!(
                "{}: only {} MiB free, store.max_bytes is {} MiB",
                dir.display(),
                f >> 20,
                cfg.store.max_bytes >> 20
            ),
        ),
        Some(f) => r.add(
            Level::Ok,
            "state dir",
            format!("{} writable, {} MiB free", dir.display(), f >> 20),
        ),
        None => r.add(
            Level::Warn,
            "state dir",
            format!("{}: free space unknown", dir.display()),
        ),
    }
}

fn clock(r: &mut Report) {
    let now = crate::event::now_ms() / 1000;
    // 2024-01-01: a clock before this is certainly wrong (box without RTC after a power cut).
    if now < 1_704_067_200 {
        r.add(
            Level::Fail,
            "clock",
            "the system clock is before 2024: certificates will look invalid; fix NTP",
        );
    } else if !crate::event::clock_synced() {
        r.add(
            Level::Warn,
            "clock",
            "not synchronised (NTP): events will carry \"clock\":\"unsynced\"",
        );
    } else {
        r.add(Level::Ok, "clock", "synchronised");
    }
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    let mut r = Report::default();
    let cfg = match crate::config::load(&a.config) {
        Ok(c) => c,
        Err(errors) => {
            if a.json {
                println!(
                    "{}",
                    json!({"ok": false, "checks": [{"level": "fail", "check": "config", "detail": errors.to_string()}]})
                );
            } else {
                println!(
                    "fail  config       {}",
                    errors.to_string().replace('\n', "\n                   ")
                );
            }
            return Err(Failure::config("configuration is invalid"));
        }
    };
    r.add(
        Level::Ok,
        "config",
        format!(
            "{}: {} devices on {} buses",
            a.config.display(),
            cfg.devices.len(),
            cfg.buses.len()
        ),
    );
    serial_ports(&cfg, &mut r);
    state_dir(&cfg, &mut r);
    clock(&mut r);
    uplink(&cfg, a.offline, &mut r).await;
    let failed = r.0.iter().filter(|c| c.level == Level::Fail).count();
    if a.json {
        println!("{}", json!({"ok": failed == 0, "checks": r.0}));
    } else {
        for c in &r.0 {
            let level = match c.level {
                Level::Ok => "ok  ",
                Level::Warn => "warn",
                Level::Fail => "FAIL",
            };
            println!("{level}  {:<14} {}", c.check, c.detail);
        }
    }
    if failed > 0 {
        return Err(Failure::new(format!("{failed} check(s) failed")));
    }
    Ok(())
}
