//! `floorgate setup`: the field installer's wizard. Every question also has a flag, so that
//! `--non-interactive` scripts a whole install. Re-running it edits the existing configuration
//! (a backup is kept), it never silently overwrites it.

use super::Failure;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

const UNIT_FILE: &str = include_str!("../../systemd/floorgate.service");
const BAG_PROFILE: &str = include_str!("../../config/profiles/bag_dispenser.toml");
const CABINET_PROFILE: &str = include_str!("../../config/profiles/charging_cabinet.toml");

/// Arguments of `setup`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Ask nothing; every answer comes from flags (fails when one is missing).
    #[arg(long)]
    non_interactive: bool,
    /// Install below this directory instead of / (for images and tests); systemctl is not run.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Configuration file to write (below --root).
    #[arg(long, default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Edit an existing configuration (a backup is kept) without asking.
    #[arg(long)]
    update: bool,
    /// Gateway id (default: the host name).
    #[arg(long)]
    gateway_id: Option<String>,
    /// Site name.
    #[arg(long)]
    site: Option<String>,
    /// RS485 serial port.
    #[arg(long)]
    port: Option<PathBuf>,
    /// Modbus TCP address instead of a serial port.
    #[arg(long)]
    tcp: Option<String>,
    /// Baud rate of the serial bus (found by --scan when not given).
    #[arg(long)]
    baud: Option<u32>,
    /// Parity of the serial bus: none, even, odd.
    #[arg(long)]
    parity: Option<String>,
    /// Scan the bus and add what is found.
    #[arg(long)]
    scan: bool,
    /// Units to scan, e.g. 1-32.
    #[arg(long, default_value = "1-32")]
    units: String,
    /// A device: NAME=UNIT:PROFILE (repeatable).
    #[arg(long = "device", value_name = "NAME=UNIT:PROFILE")]
    devices: Vec<String>,
    /// Poll period of the devices.
    #[arg(long, default_value = "1s")]
    poll: String,
    /// Broker URL, mqtts://host:port.
    #[arg(long)]
    uplink_url: Option<String>,
    /// CA certificate of the broker.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate (mTLS).
    #[arg(long)]
    cert_file: Option<PathBuf>,
    /// Client key (mTLS); must be mode 0600.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Skip the broker handshake test.
    #[arg(long)]
    skip_uplink_test: bool,
    /// Do not install or start the systemd service.
    #[arg(long)]
    no_service: bool,
}

/// The answers, merged from an existing config, flags and the installer.
#[derive(Debug, Default, Clone)]
struct Plan {
    id: String,
    site: String,
    bus: Option<(String, String)>, // ("rtu"|"tcp", inline table)
    devices: Vec<(String, u8, String)>,
    poll: String,
    url: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    state_dir: PathBuf,
}

struct Ask {
    interactive: bool,
    input: std::io::StdinLock<'static>,
}

impl Ask {
    fn line(&mut self, question: &str, default: Option<&str>) -> Result<String, Failure> {
        if !self.interactive {
            return default.map(str::to_string).ok_or_else(|| {
                Failure::new(format!("--non-interactive: missing answer to {question:?}"))
            });
        }
        match default {
            Some(d) if !d.is_empty() => print!("{question} [{d}]: "),
            _ => print!("{question}: "),
        }
        let _ = std::io::stdout().flush();
        let mut s = String::new();
        self.input.read_line(&mut s).map_err(Failure::new)?;
        let s = s.trim().to_string();
        Ok(if s.is_empty() {
            default.unwrap_or_default().to_string()
        } else {
            s
        })
    }

    fn yes(&mut self, question: &str, default: bool) -> Result<bool, Failure> {
        if !self.interactive {
            return Ok(default);
        }
        let a = self.line(
            &format!("{question} ({})", if default { "Y/n" } else { "y/N" }),
            Some(""),
        )?;
        Ok(match a.to_lowercase().as_str() {
            "" => default,
            s => s.starts_with('y'),
        })
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "floorgate".into())
}

fn serial_ports() -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/dev") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if n.starts_with("ttyUSB") || n.starts_with("ttyACM") || n.starts_with("ttyAMA") {
                out.push(format!("/dev/{n}"));
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/dev/serial/by-id") {
        for e in rd.flatten() {
            out.push(e.path().display().to_string());
        }
    }
    out.sort();
    out
}

fn under(root: &Path, p: &Path) -> PathBuf {
    root.join(p.strip_prefix("/").unwrap_or(p))
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

impl Plan {
    fn from_existing(cfg: &crate::config::Config) -> Plan {
        let bus = cfg.buses.first().map(|b| match &b.kind {
            crate::config::BusKind::Rtu {
                port, baud, parity, ..
            } => (
                "rtu".to_string(),
                format!(
                    "{{ port = {}, baud = {baud}, parity = \"{}\" }}",
                    toml_str(&port.display().to_string()),
                    match parity {
                        crate::config::Parity::None => "none",
                        crate::config::Parity::Even => "even",
                        crate::config::Parity::Odd => "odd",
                    }
                ),
            ),
            crate::config::BusKind::Tcp { address } => (
                "tcp".to_string(),
                format!("{{ address = {} }}", toml_str(address)),
            ),
        });
        let u = cfg.uplink.as_ref();
        Plan {
            id: cfg.gateway.id.clone(),
            site: cfg.gateway.site.clone(),
            bus,
            devices: cfg
                .devices
                .iter()
                .map(|d| (d.name.clone(), d.unit, d.profile.clone()))
                .collect(),
            poll: cfg.devices.first().map_or("1s".into(), |d| {
                humantime::format_duration(d.poll).to_string()
            }),
            url: u.map(|u| {
                format!(
                    "{}://{}:{}",
                    if u.tls { "mqtts" } else { "mqtt" },
                    u.host,
                    u.port
                )
            }),
            ca: u.and_then(|u| u.ca_file.clone()),
            cert: u.and_then(|u| u.cert_file.clone()),
            key: u.and_then(|u| u.key_file.clone()),
            state_dir: cfg.gateway.state_dir.clone(),
        }
    }

    fn render(&self) -> String {
        let mut t = format!(
            "# Written by `floorgate setup`; every key is documented in floorgate.example.toml.\n\n[gateway]\nid = {}\nsite = {}\nstate_dir = {}\ninclude = [\"profiles/*.toml\"]\n",
            toml_str(&self.id),
            toml_str(&self.site),
            toml_str(&self.state_dir.display().to_string())
        );
        if let Some(url) = &self.url {
            t.push_str(&format!("\n[uplink]\nurl = {}\n", toml_str(url)));
            for (k, v) in [
                ("ca_file", &self.ca),
                ("cert_file", &self.cert),
                ("key_file", &self.key),
            ] {
                if let Some(v) = v {
                    t.push_str(&format!("{k} = {}\n", toml_str(&v.display().to_string())));
                }
            }
        }
        if let Some((kind, table)) = &self.bus {
            t.push_str(&format!("\n[[bus]]\nname = \"floor\"\n{kind} = {table}\n"));
            for (name, unit, profile) in &self.devices {
                t.push_str(&format!(
                    "\n[[device]]\nname = {}\nbus = \"floor\"\nunit = {unit}\nprofile = {}\npoll = {}\n",
                    toml_str(name),
                    toml_str(profile),
                    toml_str(&self.poll)
                ));
            }
        }
        t
    }
}

/// Writes `text` to `path` atomically: temp file in the same directory, fsync, rename, fsync dir.
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), Failure> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Failure::new(format!("{}: {e}", dir.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| Failure::new(format!("{}: {e}", tmp.display())))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Failure::new(format!("{}: {e}", tmp.display())))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(Failure::new)?;
    std::fs::rename(&tmp, path).map_err(|e| Failure::new(format!("{}: {e}", path.display())))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn parse_device(s: &str) -> Result<(String, u8, String), Failure> {
    let bad = || {
        Failure::config(format!(
            "--device {s:?}: expected NAME=UNIT:PROFILE, e.g. bags-1=1:bag_dispenser"
        ))
    };
    let (name, rest) = s.split_once('=').ok_or_else(bad)?;
    let (unit, profile) = rest.split_once(':').ok_or_else(bad)?;
    Ok((
        name.to_string(),
        unit.parse().map_err(|_| bad())?,
        profile.to_string(),
    ))
}

async fn scan(bus_args: &[String], units: &str) -> Result<Vec<serde_json::Value>, Failure> {
    let exe = std::env::current_exe().map_err(Failure::new)?;
    let out = tokio::process::Command::new(exe)
        .arg("scan")
        .args(bus_args)
        .args(["--units", units, "--json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .map_err(Failure::new)?;
    if !out.status.success() {
        return Err(Failure::new("the bus scan failed (see above)"));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Failure::new(format!("scan output: {e}")))?;
    Ok(v["devices"].as_array().cloned().unwrap_or_default())
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    let interactive = !a.non_interactive && std::io::stdin().is_terminal();
    if !a.non_interactive && !interactive {
        return Err(Failure::new(
            "no terminal: answer the questions with flags and --non-interactive",
        ));
    }
    let mut ask = Ask {
        interactive,
        input: std::io::stdin().lock(),
    };
    let config_path = under(&a.root, &a.config);
    let etc = config_path
        .parent()
        .unwrap_or(Path::new("/etc/floorgate"))
        .to_path_buf();

    // Start from what is installed: re-running edits.
    let mut plan = if config_path.exists() {
        let cfg = crate::config::load(&config_path).map_err(|e| {
            Failure::config(format!(
                "the existing configuration is invalid; fix it or move it away first:\n{e}"
            ))
        })?;
        let edit = a.update
            || ask.yes(
                &format!(
                    "{} exists; edit it (a backup is kept)?",
                    config_path.display()
                ),
                false,
            )?;
        if !edit {
            return Err(Failure::new(format!(
                "{} exists: pass --update to edit it (a backup is kept)",
                config_path.display()
            )));
        }
        Plan::from_existing(&cfg)
    } else {
        Plan {
            poll: a.poll.clone(),
            state_dir: PathBuf::from("/var/lib/floorgate"),
            ..Plan::default()
        }
    };
    if a.root != Path::new("/") && !config_path.exists() {
        plan.state_dir = under(&a.root, Path::new("/var/lib/floorgate"));
    }
    let default_id = a.gateway_id.clone().unwrap_or(if plan.id.is_empty() {
        hostname()
    } else {
        plan.id.clone()
    });
    plan.id = ask.line("Gateway id", Some(&default_id))?;
    let default_site = a.site.clone().unwrap_or(if plan.site.is_empty() {
        "default".into()
    } else {
        plan.site.clone()
    });
    plan.site = ask.line("Site", Some(&default_site))?;

    // The bus.
    let ports = serial_ports();
    let port = match (&a.port, &a.tcp) {
        (Some(p), _) => Some(p.display().to_string()),
        (None, Some(_)) => None,
        (None, None) if interactive => {
            if !ports.is_empty() {
                println!("Serial ports present: {}", ports.join(", "));
            }
            let p = ask.line(
                "Serial port (or tcp:HOST:PORT, or empty for none)",
                ports.first().map(String::as_str),
            )?;
            (!p.is_empty()).then_some(p)
        }
        _ => None,
    };
    let tcp = a.tcp.clone().or_else(|| {
        port.as_ref()
            .and_then(|p| p.strip_prefix("tcp:").map(str::to_string))
    });
    let port = port.filter(|p| !p.starts_with("tcp:"));
    let mut scan_args: Vec<String> = Vec::new();
    if let Some(t) = &tcp {
        plan.bus = Some(("tcp".into(), format!("{{ address = {} }}", toml_str(t))));
        scan_args = vec!["--tcp".into(), t.clone()];
    } else if let Some(p) = &port {
        scan_args = vec!["--port".into(), p.clone()];
        if let Some(b) = a.baud {
            scan_args.extend(["--baud".into(), b.to_string()]);
        }
        if let Some(par) = &a.parity {
            scan_args.extend(["--parity".into(), par.clone()]);
        }
        plan.bus = Some((
            "rtu".into(),
            format!(
                "{{ port = {}, baud = {}, parity = {} }}",
                toml_str(p),
                a.baud.unwrap_or(9600),
                toml_str(a.parity.as_deref().unwrap_or("none"))
            ),
        ));
    }

    // Devices: flags, then an optional scan.
    for d in &a.devices {
        let d = parse_device(d)?;
        plan.devices.retain(|(n, u, _)| *n != d.0 && *u != d.1);
        plan.devices.push(d);
    }
    let do_scan = !scan_args.is_empty()
        && (a.scan || (interactive && ask.yes("Scan the bus for devices?", true)?));
    if do_scan {
        let found = scan(&scan_args, &a.units).await?;
        if found.is_empty() {
            println!("no device answered");
        }
        for f in found {
            let unit = f["unit"].as_u64().unwrap_or(0) as u8;
            let profile = f["profile"].as_str().unwrap_or("unknown").to_string();
            if let (Some(b), Some(p)) = (f["baud"].as_u64(), f["parity"].as_str()) {
                if let Some(port) = &port {
                    plan.bus = Some((
                        "rtu".into(),
                        format!(
                            "{{ port = {}, baud = {b}, parity = {} }}",
                            toml_str(port),
                            toml_str(p)
                        ),
                    ));
                }
            }
            if profile == "unknown" || plan.devices.iter().any(|d| d.1 == unit) {
                println!("unit {unit}: {profile} (not added)");
                continue;
            }
            let stem = if profile.contains("cabinet") {
                "cabinet"
            } else if profile.contains("bag") {
                "bags"
            } else {
                "device"
            };
            let default = format!("{stem}-{unit}");
            let name =
                if interactive && ask.yes(&format!("Add unit {unit} as a {profile}?"), true)? {
                    ask.line("  name", Some(&default))?
                } else if interactive {
                    continue;
                } else {
                    default
                };
            plan.devices.push((name, unit, profile));
        }
    }

    // The uplink.
    let url_default = a.uplink_url.clone().or(plan.url.clone());
    let url = ask.line(
        "Broker URL (mqtts://host:port, empty for none)",
        Some(url_default.as_deref().unwrap_or("")),
    )?;
    plan.url = (!url.is_empty()).then_some(url);
    if plan.url.is_some() {
        let mut file = |q: &str,
                        flag: &Option<PathBuf>,
                        old: &Option<PathBuf>|
         -> Result<Option<PathBuf>, Failure> {
            let d = flag
                .clone()
                .or(old.clone())
                .map(|p| p.display().to_string());
            let v = ask.line(q, Some(d.as_deref().unwrap_or("")))?;
            Ok((!v.is_empty()).then(|| PathBuf::from(v)))
        };
        plan.ca = file("CA certificate file", &a.ca_file, &plan.ca)?;
        plan.cert = file(
            "Client certificate file (mTLS, empty for none)",
            &a.cert_file,
            &plan.cert,
        )?;
        plan.key = if plan.cert.is_some() {
            file("Client key file", &a.key_file, &plan.key)?
        } else {
            None
        };
    }

    // Check what was assembled exactly as the daemon will, before anything is written.
    let text = plan.render();
    let profiles_dir = etc.join("profiles");
    let check_dir = tempfile::tempdir().map_err(Failure::new)?;
    std::fs::create_dir_all(check_dir.path().join("profiles")).map_err(Failure::new)?;
    for (name, body) in [
        ("bag_dispenser.toml", BAG_PROFILE),
        ("charging_cabinet.toml", CABINET_PROFILE),
    ] {
        let installed = profiles_dir.join(name);
        let body = std::fs::read_to_string(&installed).unwrap_or_else(|_| body.to_string());
        std::fs::write(check_dir.path().join("profiles").join(name), body).map_err(Failure::new)?;
    }
    if let Ok(rd) = std::fs::read_dir(&profiles_dir) {
        for e in rd.flatten() {
            let _ = std::fs::copy(
                e.path(),
                check_dir.path().join("profiles").join(e.file_name()),
            );
        }
    }
    let staged = check_dir.path().join("floorgate.toml");
    std::fs::write(&staged, &text).map_err(Failure::new)?;
    let cfg = crate::config::load(&staged).map_err(|e| {
        Failure::config(e.to_string().replace(
            &staged.display().to_string(),
            &config_path.display().to_string(),
        ))
    })?;

    if cfg.uplink.is_some()
        && !a.skip_uplink_test
        && (!interactive || ask.yes("Test the broker connection now?", true)?)
    {
        let u = cfg
            .uplink
            .clone()
            .ok_or_else(|| Failure::new("no uplink"))?;
        let store_dir = tempfile::tempdir().map_err(Failure::new)?;
        let store =
            crate::store::Store::open(store_dir.path(), 1 << 20, 1 << 20).map_err(Failure::new)?;
        let up = crate::uplink::Uplink::new(
            u,
            &format!("{}-setup", cfg.gateway.id),
            std::sync::Arc::new(store),
            Vec::new(),
            Default::default(),
        );
        match up.probe(Duration::from_secs(10)).await {
            Ok(()) => println!("broker: TLS handshake and MQTT connect succeeded"),
            Err(e) => {
                return Err(Failure::new(format!(
                "broker test failed: {e} (nothing was written; --skip-uplink-test to write anyway)"
            )))
            }
        }
    }

    // Write: profiles (only missing ones), a backup of the old config, then the config itself.
    for (name, body) in [
        ("bag_dispenser.toml", BAG_PROFILE),
        ("charging_cabinet.toml", CABINET_PROFILE),
    ] {
        let p = profiles_dir.join(name);
        if !p.exists() {
            write_atomic(&p, body, 0o644)?;
        }
    }
    if config_path.exists() {
        let stamp = crate::event::now_ms() / 1000;
        let backup = config_path.with_extension(format!("toml.bak.{stamp}"));
        std::fs::copy(&config_path, &backup).map_err(Failure::new)?;
        println!("previous configuration kept as {}", backup.display());
    }
    write_atomic(&config_path, &text, 0o640)?;
    println!(
        "wrote {} ({} devices)",
        config_path.display(),
        cfg.devices.len()
    );

    if !a.no_service
        && (!interactive || ask.yes("Install and start the floorgate service?", true)?)
    {
        let unit = under(&a.root, Path::new("/etc/systemd/system/floorgate.service"));
        let packaged = under(&a.root, Path::new("/lib/systemd/system/floorgate.service"));
        if !packaged.exists() && !unit.exists() {
            write_atomic(&unit, UNIT_FILE, 0o644)?;
            println!("installed {}", unit.display());
        }
        if a.root == Path::new("/") {
            for args in [
                vec!["daemon-reload"],
                vec!["enable", "--now", "floorgate"],
                vec!["reload-or-restart", "floorgate"],
            ] {
                let st = std::process::Command::new("systemctl")
                    .args(&args)
                    .status()
                    .map_err(|e| Failure::new(format!("systemctl: {e}")))?;
                if !st.success() {
                    return Err(Failure::new(format!("systemctl {} failed", args.join(" "))));
                }
            }
            println!("service enabled and started; `floorgate status` shows the floor");
        } else {
            println!("--root given: run `systemctl enable --now floorgate` on the target");
        }
    }
    Ok(())
}
