//! Installer commands against the simulators: `floorgate scan` (units, line settings, profile
//! guess, early stop on garbage, port errors) and `floorgate read` / `floorgate write`.
//!
//! A pseudo-terminal has no baud rate of its own: every setting "works" on a plain PTY. To test
//! the choice of the line setting, [`LineGate`] reads back the baud rate the scanner applied to
//! the PTY (termios2) and garbles the simulator's replies unless it matches the emulated line.
//! Parity cannot be emulated this way: Linux clears PARENB on pseudo-terminals.

use crate::support::gateway::profiles_glob;
use floorgate::sim::{bag, cabinet, serve_rtu_with, Device, Model, Pty, RtuOptions, SimFloor};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Output, Stdio};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

fn bag_at(unit: u8) -> Device {
    let d = Device::new(unit);
    Model::bag_dispenser().init(d.bank());
    d
}

fn cabinet_at(unit: u8) -> Device {
    let d = Device::new(unit);
    Model::charging_cabinet().init(d.bank());
    d
}

/// Serves `devices` as RTU slaves on a new PTY; returns the path for clients.
fn serve_pty(devices: Vec<Device>, stop: &CancellationToken) -> PathBuf {
    let (pty, path) = Pty::open().unwrap();
    let stop = stop.clone();
    tokio::spawn(serve_rtu_with(pty, devices, RtuOptions::default(), stop));
    path
}

/// Runs the floorgate binary with `args`, stdin closed (no terminal).
async fn floorgate(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(args)
        .env_remove("FLOORGATE_CONFIG")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(o),
            stderr(o)
        )
    })
}

/// (unit, profile, identity) of every device found, in scan order.
fn found(doc: &serde_json::Value) -> Vec<(u64, String, String)> {
    doc["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["unit"].as_u64().unwrap(),
                d["profile"].as_str().unwrap_or("unknown").to_string(),
                d["identity"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

/// The PTY end of the simulator, emulating a line at one baud rate: replies go out garbled
/// (every byte XOR 0x5A) unless the scanner's port is set to `baud`.
struct LineGate {
    inner: Pty,
    /// The slave side, opened to read the settings the client applied.
    probe: File,
    baud: u32,
}

impl LineGate {
    fn matches(&self) -> bool {
        // SAFETY: termios2 is plain old data filled by the ioctl; the fd is open.
        let t = unsafe {
            let mut t: libc::termios2 = std::mem::zeroed();
            if libc::ioctl(self.probe.as_raw_fd(), libc::TCGETS2, &mut t) != 0 {
                return false;
            }
            t
        };
        t.c_ospeed == self.baud
    }
}

impl AsyncRead for LineGate {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for LineGate {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.matches() {
            Pin::new(&mut self.inner).poll_write(cx, data)
        } else {
            let garbled: Vec<u8> = data.iter().map(|b| b ^ 0x5A).collect();
            Pin::new(&mut self.inner).poll_write(cx, &garbled)
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `devices` on a PTY that behaves like a line at 19200 baud.
fn serve_line_19200(devices: Vec<Device>, stop: &CancellationToken) -> PathBuf {
    let (pty, path) = Pty::open().unwrap();
    let probe = File::options().read(true).write(true).open(&path).unwrap();
    let gate = LineGate {
        inner: pty,
        probe,
        baud: 19200,
    };
    tokio::spawn(serve_rtu_with(
        gate,
        devices,
        RtuOptions::default(),
        stop.clone(),
    ));
    path
}

/// A configuration with one RTU bus on `port` and the given devices (name, unit, profile).
fn write_config(dir: &Path, port: &Path, devices: &[(&str, u8, &str)]) -> PathBuf {
    let mut text = format!(
        "[gateway]\nid = \"scan-test\"\nstate_dir = \"{}\"\ninclude = [\"{}\"]\n\n\
         [[bus]]\nname = \"rs485\"\nrtu = {{ port = \"{}\", baud = 19200 }}\ntimeout = \"300ms\"\n\n",
        dir.join("state").display(),
        profiles_glob(),
        port.display()
    );
    for (name, unit, profile) in devices {
        text.push_str(&format!(
            "[[device]]\nname = \"{name}\"\nbus = \"rs485\"\nunit = {unit}\nprofile = \"{profile}\"\n\n"
        ));
    }
    let path = dir.join("floorgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_finds_units_at_several_addresses_guesses_profiles_and_keeps_to_units() {
    let stop = CancellationToken::new();
    let outside = bag_at(7);
    let path = serve_pty(
        vec![bag_at(1), cabinet_at(4), bag_at(5), outside.clone()],
        &stop,
    );
    let p = path.to_str().unwrap();
    let started = Instant::now();
    let out = floorgate(&[
        "scan",
        "--port",
        p,
        "--units",
        "1-5",
        "--baud",
        "9600",
        "--parity",
        "none",
        "--timeout",
        "50ms",
        "--json",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let doc = json(&out);
    assert_eq!(
        found(&doc),
        [
            (1, "bag_dispenser".into(), bag::MODEL_NAME.into()),
            (4, "charging_cabinet".into(), cabinet::MODEL_NAME.into()),
            (5, "bag_dispenser".into(), bag::MODEL_NAME.into()),
        ]
    );
    assert_eq!(doc["settings_tried"], 1);
    let dev = &doc["devices"][0];
    assert_eq!(dev["baud"], 9600);
    assert_eq!(dev["parity"], "none");
    assert_eq!(doc["settings"][0]["units_probed"], 5);
    assert_eq!(outside.requests(), 0, "unit 7 is outside --units 1-5");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    // Progress and the per-setting summary go to stderr, not into the JSON.
    assert!(
        stderr(&out).contains("9600 8N1: 3 found"),
        "{}",
        stderr(&out)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_picks_the_line_setting_and_skips_settings_that_answer_garbage() {
    let stop = CancellationToken::new();
    // Units 1-8 answer, so that on a wrong setting the first 8 probes all see garbage.
    let mut devices: Vec<Device> = (1..=5).map(bag_at).collect();
    devices.extend((6..=8).map(cabinet_at));
    let far = cabinet_at(12);
    devices.push(far.clone());
    let path = serve_line_19200(devices, &stop);
    let out = floorgate(&[
        "scan",
        "--port",
        path.to_str().unwrap(),
        "--units",
        "1-12",
        "--baud",
        "9600,19200,38400",
        "--parity",
        "even",
        "--timeout",
        "50ms",
        "--json",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let doc = json(&out);
    assert_eq!(doc["settings_tried"], 3);
    let settings = doc["settings"].as_array().unwrap();
    for s in settings {
        let right = s["baud"] == 19200;
        if right {
            assert_eq!(s["skipped"], false, "{s}");
            assert_eq!(s["units_probed"], 12, "{s}");
            assert_eq!(s["garbage"], 0, "{s}");
        } else {
            assert_eq!(s["skipped"], true, "wrong setting not skipped: {s}");
            assert_eq!(s["units_probed"], 8, "{s}");
            assert_eq!(s["garbage"], 8, "{s}");
        }
    }
    let devs = doc["devices"].as_array().unwrap();
    assert!(devs
        .iter()
        .all(|d| d["baud"] == 19200 && d["parity"] == "even"));
    let mut want: Vec<(u64, String, String)> = (1..=5)
        .map(|u| (u, "bag_dispenser".into(), bag::MODEL_NAME.into()))
        .collect();
    want.extend([6, 7, 8, 12].map(|u| (u, "charging_cabinet".into(), cabinet::MODEL_NAME.into())));
    assert_eq!(found(&doc), want);
    // Unit 12 was never probed on the skipped settings: one presence read, one device
    // identification request, one signature read, all at 19200 baud.
    assert_eq!(far.requests(), 3);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_over_tcp_prints_a_table_of_units_profiles_and_models() {
    let stop = CancellationToken::new();
    let mut floor = SimFloor::new(2, 1);
    floor.models = false;
    let (addr, _devs) = floor
        .start_tcp(([127, 0, 0, 1], 0).into(), stop.clone())
        .await
        .unwrap();
    let addr = addr.to_string();
    let out = floorgate(&["scan", "--tcp", &addr, "--units", "1-5"]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| l.starts_with("tcp "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            ["tcp", "1", "bag_dispenser", "BAGDISP1"],
            ["tcp", "2", "bag_dispenser", "BAGDISP1"],
            ["tcp", "3", "charging_cabinet", "CHGCAB12"],
        ],
        "{text}"
    );
    assert!(
        text.contains("3 device(s) found; 1 setting(s) tried"),
        "{text}"
    );
    // Units 4 and 5 get the gateway exception 0x0B from the simulator: not devices.
    let out = floorgate(&["scan", "--tcp", &addr, "--units", "4-5", "--json"]).await;
    assert_eq!(json(&out)["devices"], serde_json::json!([]));
    // Serial settings make no sense on TCP.
    let out = floorgate(&["scan", "--tcp", &addr, "--baud", "9600"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_errors_are_actionable_and_exit_1() {
    let out = floorgate(&["scan", "--port", "/dev/ttyUSB99", "--units", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("no such port /dev/ttyUSB99; ports present: "),
        "{err}"
    );

    // A port another program holds (serialport locks it exclusively).
    let stop = CancellationToken::new();
    let path = serve_pty(vec![bag_at(1)], &stop);
    let held = tokio_serial::new(path.to_string_lossy(), 9600)
        .open()
        .unwrap();
    let out = floorgate(&["scan", "--port", path.to_str().unwrap(), "--units", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is busy"), "{}", stderr(&out));
    drop(held);

    let out = floorgate(&["scan", "--tcp", "127.0.0.1:1", "--units", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot connect to 127.0.0.1:1"),
        "{}",
        stderr(&out)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_returns_the_simulators_registers_raw_and_by_point() {
    let stop = CancellationToken::new();
    let cab = cabinet_at(4);
    cab.bank().set_u16(cabinet::HR_RENTAL_PRICE_CENTS, 321);
    let bags = bag_at(2);
    bags.bank().set_input(bag::IR_SUPPLY_VOLTAGE, 2450);
    let path = serve_pty(vec![cab.clone(), bags.clone()], &stop);
    let p = path.to_str().unwrap();

    let out = floorgate(&["read", "--port", p, "--unit", "4", "--address", "10"]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    let row = stdout(&out)
        .lines()
        .find(|l| l.trim_start().starts_with("10 "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "));
    assert_eq!(row.as_deref(), Some("10 0x0141 321"), "{}", stdout(&out));

    let out = floorgate(&[
        "read",
        "--port",
        p,
        "--unit",
        "2",
        "--address",
        "40",
        "--count",
        "8",
        "--type",
        "string",
        "--json",
    ])
    .await;
    let doc = json(&out);
    assert_eq!(doc["values"][0]["value"], bag::MODEL_NAME);
    assert_eq!(doc["values"][0]["raw"][0], "0x4241");

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &path,
        &[
            ("cab-1", 4, "charging_cabinet"),
            ("bags-1", 2, "bag_dispenser"),
        ],
    );
    let cfg = cfg.to_str().unwrap();
    let out = floorgate(&[
        "read",
        "--config",
        cfg,
        "--device",
        "bags-1",
        "--point",
        "supply_voltage",
        "--json",
    ])
    .await;
    let doc = json(&out);
    assert_eq!(doc["value"], 24.5);
    assert_eq!(doc["raw"][0], "0x0992");
    let out = floorgate(&[
        "read",
        "--config",
        cfg,
        "--device",
        "cab-1",
        "--point",
        "rental_price_cents",
    ])
    .await;
    assert!(
        stdout(&out).starts_with("cab-1 rental_price_cents = 321"),
        "{}",
        stdout(&out)
    );
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_confirms_or_needs_yes_and_refuses_points_that_are_not_writable() {
    let stop = CancellationToken::new();
    let cab = cabinet_at(2);
    let bags = bag_at(1);
    let path = serve_pty(vec![bags.clone(), cab.clone()], &stop);
    let p = path.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &path,
        &[
            ("bags-1", 1, "bag_dispenser"),
            ("cab-1", 2, "charging_cabinet"),
        ],
    );
    let cfg = cfg.to_str().unwrap();
    let price = || cab.bank().holding(cabinet::HR_RENTAL_PRICE_CENTS);
    let before = price();

    // No terminal and no --yes: refused, nothing written.
    let out = floorgate(&[
        "write",
        "--config",
        cfg,
        "--device",
        "cab-1",
        "--point",
        "rental_price_cents",
        "--value",
        "250",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("write 250 to cab-1 rental_price_cents (holding 10, unit 2)?"),
        "{err}"
    );
    assert!(
        err.contains("use --yes to write without confirmation"),
        "{err}"
    );
    assert_eq!(price(), before);
    assert_eq!(cab.requests(), 0, "nothing was sent to the device");

    // With --yes: written, and read back.
    let out = floorgate(&[
        "write",
        "--config",
        cfg,
        "--device",
        "cab-1",
        "--point",
        "rental_price_cents",
        "--value",
        "250",
        "--yes",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(price(), 250);
    assert!(stdout(&out).contains("read back 250"), "{}", stdout(&out));

    // Raw register and coil writes.
    let out = floorgate(&[
        "write",
        "--port",
        p,
        "--unit",
        "1",
        "--address",
        "10",
        "--value",
        "35",
        "--yes",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(bags.bank().holding(bag::HR_PRICE_CENTS), 35);
    assert!(bags.bank().coil(bag::COIL_ENABLED));
    let out = floorgate(&[
        "write",
        "--port",
        p,
        "--unit",
        "1",
        "--table",
        "coil",
        "--address",
        "0",
        "--value",
        "off",
        "-y",
    ])
    .await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(!bags.bank().coil(bag::COIL_ENABLED));

    // A point the profile does not mark writable: refused before anything is sent.
    let status = cab.bank().holding(cabinet::HR_STATUS);
    let sent = cab.requests();
    let out = floorgate(&[
        "write", "--config", cfg, "--device", "cab-1", "--point", "status", "--value", "3", "--yes",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not writable"), "{}", stderr(&out));
    assert_eq!(cab.bank().holding(cabinet::HR_STATUS), status);
    assert_eq!(cab.requests(), sent);

    // Input registers cannot be written at all.
    let out = floorgate(&[
        "write",
        "--port",
        p,
        "--table",
        "input",
        "--address",
        "0",
        "--value",
        "1",
        "--yes",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    stop.cancel();
}

/// A Modbus TCP device that only knows Read Device Identification (every register read is an
/// illegal-address exception): unit 1 reports the cabinet's model as its product code, unit 2 a
/// product no profile knows.
#[derive(Debug)]
struct IdentifiedDevices;

impl tokio_modbus::server::Service for IdentifiedDevices {
    type Request = tokio_modbus::SlaveRequest<'static>;
    type Response = tokio_modbus::Response;
    type Exception = tokio_modbus::ExceptionCode;
    type Future = std::future::Ready<Result<Self::Response, Self::Exception>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        use tokio_modbus::prelude::*;
        let product: &'static [u8] = match req.slave {
            1 => cabinet::MODEL_NAME.as_bytes(),
            2 => b"XYZ-9",
            _ => return std::future::ready(Err(ExceptionCode::GatewayTargetDevice)),
        };
        std::future::ready(match req.request {
            Request::ReadDeviceIdentification(..) => Ok(Response::ReadDeviceIdentification(
                ReadDeviceIdentificationResponse {
                    read_code: ReadCode::Basic,
                    conformity_level: ConformityLevel::BasicIdentificationStreamOnly,
                    more_follows: false,
                    next_object_id: 0,
                    device_id_objects: vec![
                        DeviceIdObject {
                            id: 0,
                            value: bytes::Bytes::from_static(b"Acme"),
                        },
                        DeviceIdObject {
                            id: 1,
                            value: bytes::Bytes::from_static(product),
                        },
                        DeviceIdObject {
                            id: 2,
                            value: bytes::Bytes::from_static(b"1.0"),
                        },
                    ],
                },
            )),
            _ => Err(ExceptionCode::IllegalDataAddress),
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_identifies_devices_by_read_device_identification() {
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let service = std::sync::Arc::new(IdentifiedDevices);
    let abort = stop.clone().cancelled_owned();
    tokio::spawn(async move {
        let on_connected = move |stream, _addr| {
            let service = service.clone();
            async move { Ok(Some((service, stream))) }
        };
        let _ = tokio_modbus::server::tcp::Server::new(listener)
            .serve_until(&on_connected, |_e| {}, abort)
            .await;
    });
    let out = floorgate(&["scan", "--tcp", &addr, "--units", "1-3", "--json"]).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(
        found(&json(&out)),
        [
            (1, "charging_cabinet".into(), "Acme CHGCAB12 1.0".into()),
            (2, "unknown".into(), "Acme XYZ-9 1.0".into()),
        ]
    );
    stop.cancel();
}
