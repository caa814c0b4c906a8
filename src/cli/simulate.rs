//! `floorgate simulate`: simulated bag dispensers and charging cabinets on Modbus TCP, a serial
//! port, or a fresh pseudo-terminal, with a day/night traffic curve.

use super::Failure;
use crate::sim::{LineTiming, SimFloor, TimeScale};
use rand::SeedableRng;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Arguments of `simulate`.
#[derive(Debug, clap::Args)]
pub(super) struct Args {
    /// Serve Modbus TCP on this address.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["pty", "port"])]
    tcp: Option<SocketAddr>,
    /// Serve Modbus RTU on a new pseudo-terminal and print its path.
    #[arg(long)]
    pty: bool,
    /// Serve Modbus RTU on this serial port (e.g. the other end of a USB-RS485 pair).
    #[arg(long, value_name = "PATH")]
    port: Option<PathBuf>,
    /// Baud rate of the serial port, and of the emulated line timing with --line-timing.
    #[arg(long, default_value_t = 9600)]
    baud: u32,
    /// Make each transaction take its real wire time at --baud (PTY/serial).
    #[arg(long)]
    line_timing: bool,
    /// Number of bag dispensers (units 1..).
    #[arg(long, default_value_t = 2)]
    bag: usize,
    /// Number of 12-slot charging cabinets (units after the dispensers).
    #[arg(long, default_value_t = 1)]
    cabinet: usize,
    /// Length of one simulated day (e.g. "10m" to see the day/night curve quickly).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    day: Duration,
    /// Traffic multiplier (1.0 = a realistic floor).
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Simulate devices of this profile instead (plausible values for every point).
    #[arg(long, requires = "config")]
    profile: Option<String>,
    /// Configuration file (or a profile file wrapped in one) that defines --profile.
    #[arg(long)]
    config: Option<PathBuf>,
    /// How many devices of --profile (units 1..).
    #[arg(long, default_value_t = 1)]
    count: u8,
}

/// Devices of any profile, updated every second.
async fn generic(
    a: &Args,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<crate::sim::Device>>, Failure> {
    let Some(name) = &a.profile else {
        return Ok(None);
    };
    let path = a.config.clone().unwrap_or_default();
    let cfg = crate::config::load(&path).map_err(Failure::config)?;
    let profile = cfg.profiles.get(name).cloned().ok_or_else(|| {
        Failure::config(format!(
            "{}: no profile {name:?} (have: {:?})",
            path.display(),
            cfg.profiles.keys().collect::<Vec<_>>()
        ))
    })?;
    let devices: Vec<crate::sim::Device> =
        (1..=a.count.max(1)).map(crate::sim::Device::new).collect();
    for d in &devices {
        let (d, p, stop) = (d.clone(), profile.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut round = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                crate::sim::generic::step(&p, d.bank(), round, &mut rng);
                round += 1;
            }
        });
    }
    Ok(Some(devices))
}

pub(super) async fn run(a: Args) -> Result<(), Failure> {
    let shutdown = CancellationToken::new();
    let mut floor = SimFloor::new(a.bag, a.cabinet);
    floor.timescale = if a.day == Duration::from_secs(86_400) {
        TimeScale::realtime().with_rate(a.rate)
    } else {
        TimeScale::compressed(a.day).with_rate(a.rate)
    };
    if a.line_timing {
        floor.rtu.line = Some(LineTiming { baud: a.baud });
    }
    if let Some(devices) = generic(&a, &shutdown).await? {
        let n = devices.len();
        let opts = crate::sim::RtuOptions::default();
        let where_ = if let Some(port) = &a.port {
            let (port, baud, stop) = (port.clone(), a.baud, shutdown.clone());
            let shown = port.display().to_string();
            tokio::spawn(async move {
                crate::sim::serve_rtu_path(&port, baud, devices, opts, stop).await
            });
            format!("Modbus RTU on {shown}")
        } else if a.pty {
            let (pty, path) = crate::sim::Pty::open()
                .map_err(|e| Failure::new(format!("cannot open a pseudo-terminal: {e}")))?;
            tokio::spawn(crate::sim::serve_rtu_with(
                pty,
                devices,
                opts,
                shutdown.clone(),
            ));
            format!("Modbus RTU on pseudo-terminal {}", path.display())
        } else {
            let addr = a.tcp.unwrap_or_else(|| ([127, 0, 0, 1], 1502).into());
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Failure::new(format!("cannot serve on {addr}: {e}")))?;
            let shown = l.local_addr().map_err(Failure::new)?;
            tokio::spawn(crate::sim::serve_tcp(l, devices, shutdown.clone()));
            format!("Modbus TCP on {shown}")
        };
        println!(
            "simulating {where_}: {n} device(s) of profile {}, units 1..={n}; Ctrl-C to stop",
            a.profile.as_deref().unwrap_or("")
        );
        let _ = tokio::signal::ctrl_c().await;
        shutdown.cancel();
        return Ok(());
    }
    let units = |first: usize, n: usize| {
        if n == 0 {
            "-".to_string()
        } else {
            format!("{}..={}", first, first + n - 1)
        }
    };
    let where_ = if let Some(addr) = a.tcp {
        let (addr, _) = floor
            .start_tcp(addr, shutdown.clone())
            .await
            .map_err(|e| Failure::new(format!("cannot serve on {addr}: {e}")))?;
        format!("Modbus TCP on {addr}")
    } else if let Some(port) = &a.port {
        floor
            .start_serial(port, a.baud, shutdown.clone())
            .map_err(|e| Failure::new(format!("cannot open {}: {e}", port.display())))?;
        format!("Modbus RTU on {} at {} baud", port.display(), a.baud)
    } else if a.pty {
        let (path, _) = floor
            .start_pty(shutdown.clone())
            .map_err(|e| Failure::new(format!("cannot open a pseudo-terminal: {e}")))?;
        format!("Modbus RTU on pseudo-terminal {}", path.display())
    } else {
        let addr: SocketAddr = ([127, 0, 0, 1], 1502).into();
        let (addr, _) = floor
            .start_tcp(addr, shutdown.clone())
            .await
            .map_err(|e| Failure::new(format!("cannot serve on {addr}: {e}")))?;
        format!("Modbus TCP on {addr}")
    };
    println!("simulating {where_}");
    println!(
        "  bag dispensers:    units {}  (profile bag_dispenser)",
        units(1, a.bag)
    );
    println!(
        "  charging cabinets: units {}  (profile charging_cabinet)",
        units(1 + a.bag, a.cabinet)
    );
    println!(
        "  one day lasts {}, traffic x{}; Ctrl-C to stop",
        humantime::format_duration(a.day),
        a.rate
    );
    let _ = tokio::signal::ctrl_c().await;
    shutdown.cancel();
    Ok(())
}
