//! [`SimFloor`]: a shop floor of bag dispensers and charging cabinets with
//! their server and behaviour models started in one call.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::net::TcpListener;
use tokio_serial::SerialPortBuilderExt;
use tokio_util::sync::CancellationToken;

use super::device::Device;
use super::model::{run_model, Model, TimeScale};
use super::pty::Pty;
use super::rtu::{serve_rtu_with, RtuOptions};
use super::tcp::serve_tcp;

/// Configuration of a simulated floor. Units are numbered from 1, bag
/// dispensers first, then charging cabinets.
///
/// The `start_*` methods spawn tokio tasks (server plus one model task per
/// device, unless `models` is false) that run until `shutdown` is cancelled;
/// server errors are logged with `tracing`.
#[derive(Debug, Clone)]
pub struct SimFloor {
    /// Number of bag dispensers (units 1..=n_bag).
    pub n_bag: usize,
    /// Number of charging cabinets (units after the dispensers).
    pub n_cab: usize,
    /// Clock and traffic of the behaviour models.
    pub timescale: TimeScale,
    /// RTU options (PTY and serial port servers).
    pub rtu: RtuOptions,
    /// Whether to run the behaviour models (false: initial values only).
    pub models: bool,
}

impl SimFloor {
    /// `n_bag` dispensers and `n_cab` cabinets in real time, models on.
    pub fn new(n_bag: usize, n_cab: usize) -> Self {
        Self {
            n_bag,
            n_cab,
            timescale: TimeScale::realtime(),
            rtu: RtuOptions::default(),
            models: true,
        }
    }

    /// Builds the devices with initialised banks and their models, without
    /// starting anything. Fails if there are more than 247 devices.
    pub fn build(&self) -> io::Result<Vec<(Device, Model)>> {
        let total = self.n_bag + self.n_cab;
        if total > 247 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{total} devices do not fit in unit ids 1..=247"),
            ));
        }
        Ok((0..total)
            .map(|i| {
                let unit = u8::try_from(i + 1).unwrap_or(u8::MAX);
                let device = Device::new(unit);
                let mut model = if i < self.n_bag {
                    Model::bag_dispenser()
                } else {
                    Model::charging_cabinet()
                };
                model.init(device.bank());
                (device, model)
            })
            .collect())
    }

    fn spawn_models(
        &self,
        built: Vec<(Device, Model)>,
        shutdown: &CancellationToken,
    ) -> Vec<Device> {
        built
            .into_iter()
            .map(|(device, model)| {
                if self.models {
                    tokio::spawn(run_model(
                        device.clone(),
                        model,
                        self.timescale,
                        shutdown.clone(),
                    ));
                }
                device
            })
            .collect()
    }

    /// Serves the floor over Modbus TCP on `addr` (port 0: any free port);
    /// returns the bound address and the devices.
    pub async fn start_tcp(
        &self,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> io::Result<(SocketAddr, Vec<Device>)> {
        let built = self.build()?;
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        let devices = self.spawn_models(built, &shutdown);
        let served = devices.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_tcp(listener, served, shutdown).await {
                tracing::error!(error = %e, "simulated Modbus TCP server failed");
            }
        });
        Ok((local, devices))
    }

    /// Serves the floor as RTU on a new pseudo-terminal; returns the slave path
    /// for clients and the devices.
    pub fn start_pty(&self, shutdown: CancellationToken) -> io::Result<(PathBuf, Vec<Device>)> {
        let built = self.build()?;
        let (pty, path) = Pty::open()?;
        let devices = self.spawn_models(built, &shutdown);
        let served = devices.clone();
        let options = self.rtu;
        tokio::spawn(async move {
            if let Err(e) = serve_rtu_with(pty, served, options, shutdown).await {
                tracing::error!(error = %e, "simulated Modbus RTU (pty) server failed");
            }
        });
        Ok((path, devices))
    }

    /// Serves the floor as RTU on the serial port at `path` (e.g. the far end
    /// of a USB-RS485 adapter loop). The port is opened before returning.
    pub fn start_serial(
        &self,
        path: &Path,
        baud: u32,
        shutdown: CancellationToken,
    ) -> io::Result<Vec<Device>> {
        let built = self.build()?;
        // Open now so that errors reach the caller.
        let port = tokio_serial::new(path.to_string_lossy(), baud)
            .open_native_async()
            .map_err(|e| io::Error::other(format!("opening {}: {e}", path.display())))?;
        let devices = self.spawn_models(built, &shutdown);
        let served = devices.clone();
        let options = self.rtu;
        tokio::spawn(async move {
            if let Err(e) = serve_rtu_with(port, served, options, shutdown).await {
                tracing::error!(error = %e, "simulated Modbus RTU (serial) server failed");
            }
        });
        Ok(devices)
    }

    /// Shortcut: real-time floor over TCP on 127.0.0.1 (free port).
    pub async fn tcp(
        n_bag: usize,
        n_cab: usize,
        shutdown: CancellationToken,
    ) -> io::Result<(SocketAddr, Vec<Device>)> {
        Self::new(n_bag, n_cab)
            .start_tcp(SocketAddr::from(([127, 0, 0, 1], 0)), shutdown)
            .await
    }

    /// Shortcut: real-time floor on a new pseudo-terminal.
    pub fn pty(
        n_bag: usize,
        n_cab: usize,
        shutdown: CancellationToken,
    ) -> io::Result<(PathBuf, Vec<Device>)> {
        Self::new(n_bag, n_cab).start_pty(shutdown)
    }
}
