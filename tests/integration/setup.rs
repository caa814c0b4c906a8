//! `floorgate setup`: scripted end to end into a temporary root, interactively through a
//! pseudo-terminal, and re-run on a configured box.

use crate::support::broker::{Broker, Pki};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn setup(root: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["setup", "--non-interactive", "--root"])
        .arg(root)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_interactive_setup_writes_a_valid_config_tests_the_uplink_and_installs_the_unit() {
    let pki = Pki::generate();
    let broker = Broker::start_tls(&pki);
    let root = tempfile::tempdir().unwrap();
    let url = format!("mqtts://localhost:{}", broker.port);
    let args = [
        "--gateway-id",
        "floor-3",
        "--site",
        "st-mary",
        "--tcp",
        "127.0.0.1:1502",
        "--device",
        "bags-1=1:bag_dispenser",
        "--device",
        "cab-1=2:charging_cabinet",
        "--uplink-url",
        &url,
        "--ca-file",
        pki.ca_cert.to_str().unwrap(),
        "--cert-file",
        pki.client_cert.to_str().unwrap(),
        "--key-file",
        pki.client_key.to_str().unwrap(),
    ];
    let out = setup(root.path(), &args);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("TLS handshake and MQTT connect succeeded")
    );
    let cfg_path = root.path().join("etc/floorgate/floorgate.toml");
    let cfg = floorgate::config::load(&cfg_path).expect("setup writes a valid configuration");
    assert_eq!(cfg.gateway.id, "floor-3");
    assert_eq!(cfg.devices.len(), 2);
    assert_eq!(cfg.devices[1].profile, "charging_cabinet");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cfg_path).unwrap().permissions().mode() & 0o777,
        0o640
    );
    assert!(root
        .path()
        .join("etc/floorgate/profiles/bag_dispenser.toml")
        .exists());
    let unit =
        std::fs::read_to_string(root.path().join("etc/systemd/system/floorgate.service")).unwrap();
    assert!(unit.contains("Type=notify"));

    // Re-running never silently overwrites: without --update it refuses and changes nothing.
    let before = std::fs::read_to_string(&cfg_path).unwrap();
    let out = setup(
        root.path(),
        &[
            "--gateway-id",
            "other",
            "--skip-uplink-test",
            "--no-service",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--update"));
    assert_eq!(std::fs::read_to_string(&cfg_path).unwrap(), before);
    // With --update it edits: existing devices stay, a new one is added, a backup is kept.
    let out = setup(
        root.path(),
        &[
            "--update",
            "--device",
            "bags-2=3:bag_dispenser",
            "--skip-uplink-test",
            "--no-service",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = floorgate::config::load(&cfg_path).unwrap();
    assert_eq!(cfg.gateway.id, "floor-3");
    assert_eq!(
        cfg.devices
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["bags-1", "cab-1", "bags-2"]
    );
    let backups = std::fs::read_dir(root.path().join("etc/floorgate"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".bak.")
        })
        .count();
    assert_eq!(backups, 1);

    // A broker that cannot be reached: nothing is written.
    let other = tempfile::tempdir().unwrap();
    let dead = format!("mqtts://localhost:{}", crate::support::gateway::free_port());
    let mut bad = args.to_vec();
    bad[11] = &dead;
    let out = setup(other.path(), &bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("broker test failed"));
    assert!(!other.path().join("etc/floorgate/floorgate.toml").exists());
}

/// A pseudo-terminal pair: (master, slave).
fn openpty() -> (OwnedFd, OwnedFd) {
    let (mut m, mut s) = (0, 0);
    // SAFETY: openpty fills two fds; null name/termios/winsize are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: both fds were just opened and are owned here.
    unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

#[test]
fn interactive_setup_asks_and_writes_through_a_terminal() {
    let root = tempfile::tempdir().unwrap();
    let (master, slave) = openpty();
    let mut child = Command::new(env!("CARGO_BIN_EXE_floorgate"))
        .args(["setup", "--root"])
        .arg(root.path())
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .unwrap();
    let mut out = std::fs::File::from(master);
    let mut reader = out.try_clone().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<u8>();
    std::thread::spawn(move || {
        let mut b = [0u8; 256];
        while let Ok(n) = reader.read(&mut b) {
            if n == 0 {
                break;
            }
            for &c in &b[..n] {
                let _ = tx.send(c);
            }
        }
    });
    let mut screen = String::new();
    let expect = |needle: &str, screen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !screen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(c) => screen.push(c as char),
                Err(_) => panic!("no prompt {needle:?}; screen so far:\n{screen}"),
            }
        }
        screen.clear();
    };
    let answers = [
        ("Gateway id", "floor-7"),
        ("Site", "st-anne"),
        ("Serial port", "tcp:127.0.0.1:1502"),
        ("Scan the bus", "n"),
        ("Broker URL", ""),
        ("wrote", ""),
        ("Install and start", "n"),
    ];
    for (prompt, answer) in answers {
        expect(prompt, &mut screen);
        if prompt != "wrote" {
            writeln!(out, "{answer}").unwrap();
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success());
    let cfg = floorgate::config::load(&root.path().join("etc/floorgate/floorgate.toml")).unwrap();
    assert_eq!(cfg.gateway.id, "floor-7");
    assert_eq!(cfg.gateway.site, "st-anne");
    assert!(
        matches!(&cfg.buses[0].kind, floorgate::config::BusKind::Tcp { address } if address == "127.0.0.1:1502")
    );
    assert!(cfg.uplink.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_scans_the_bus_and_adds_what_it_finds() {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut floor = floorgate::sim::SimFloor::new(2, 1);
    floor.models = false;
    let (pty, _devs) = floor.start_pty(stop.clone()).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = tokio::task::spawn_blocking({
        let root = root.path().to_path_buf();
        move || {
            setup(
                &root,
                &[
                    "--gateway-id",
                    "floor-9",
                    "--port",
                    pty.to_str().unwrap(),
                    "--baud",
                    "19200",
                    "--parity",
                    "none",
                    "--scan",
                    "--units",
                    "1-4",
                    "--no-service",
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = floorgate::config::load(&root.path().join("etc/floorgate/floorgate.toml")).unwrap();
    let found: Vec<(u8, &str)> = cfg
        .devices
        .iter()
        .map(|d| (d.unit, d.profile.as_str()))
        .collect();
    assert_eq!(
        found,
        vec![
            (1, "bag_dispenser"),
            (2, "bag_dispenser"),
            (3, "charging_cabinet")
        ]
    );
    assert!(matches!(
        &cfg.buses[0].kind,
        floorgate::config::BusKind::Rtu { baud: 19200, .. }
    ));
    stop.cancel();
}
