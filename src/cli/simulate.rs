//! `floorgate simulate`: simulated bag dispensers and charging cabinets on Modbus TCP, a serial
//! port, or a fresh pseudo-terminal, with a day/night traffic curve.

use super::Failure;
use crate::sim::{LineTiming, SimFloor, TimeScale};
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
