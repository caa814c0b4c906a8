//! One Modbus transport (RTU on a serial port, or TCP) with the guards tokio-modbus lacks:
//! a timeout on every request, and a resynchronisation after any timeout or framing error so that
//! a late or stray reply is never taken as the answer to another request.

use crate::config::{Bus, BusKind, Parity};
use crate::device::plan::ReadSpan;
use crate::device::{codec::Table, Raw};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskCx, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::{timeout, Instant};
use tokio_modbus::client::Context;
use tokio_modbus::prelude::*;
use tokio_serial::{SerialPort, SerialPortBuilderExt, SerialStream};

/// Why a transaction failed. Device exceptions are kept apart from transport failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// No (complete, valid) reply within the bus timeout.
    #[error("timeout")]
    Timeout,
    /// The device answered with a Modbus exception.
    #[error("exception {code} ({name})")]
    Exception {
        /// Exception code.
        code: u8,
        /// Its name.
        name: String,
    },
    /// The port or connection failed (open, I/O, connection refused).
    #[error("transport: {0}")]
    Transport(String),
    /// A reply that does not fit the request (wrong length, header mismatch, CRC error).
    #[error("invalid reply: {0}")]
    Invalid(String),
}

impl TxError {
    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            TxError::Timeout => "timeout",
            TxError::Exception { .. } => "exception",
            TxError::Transport(_) => "transport",
            TxError::Invalid(_) => "invalid",
        }
    }
}

/// A serial port shared between the tokio-modbus context and the resync logic, so that the
/// context (and its decoder buffer) can be dropped while the port stays open. Counts the bytes
/// it receives (see [`Link::bytes_received`]).
#[derive(Debug, Clone)]
struct SharedPort(Arc<Mutex<SerialStream>>, Arc<AtomicU64>);

impl SharedPort {
    fn with<R>(&self, f: impl FnOnce(&mut SerialStream) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }
}

impl AsyncRead for SharedPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = self.with(|s| Pin::new(s).poll_read(cx, buf));
        let n = buf.filled().len().saturating_sub(before);
        self.1.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for SharedPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskCx<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|s| Pin::new(s).poll_write(cx, buf))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        self.with(|s| Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskCx<'_>) -> Poll<io::Result<()>> {
        self.with(|s| Pin::new(s).poll_shutdown(cx))
    }
}

#[derive(Debug)]
enum Transport {
    Rtu {
        path: PathBuf,
        baud: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
        port: Option<SharedPort>,
    },
    Tcp {
        address: String,
    },
}

/// A bus connection, owned by the bus task.
pub struct Link {
    transport: Transport,
    ctx: Option<Context>,
    timeout: Duration,
    /// Minimum silence between the end of one transaction and the next request.
    gap: Duration,
    ready_at: Instant,
    /// Waits out `gap` without rounding it up to tokio's millisecond tick.
    timer: crate::timer::PreciseTimer,
    /// Bytes discarded while resynchronising (for metrics).
    pub discarded: u64,
    /// Bytes received on a serial port (replies, garbage, discarded bytes).
    received: Arc<AtomicU64>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("transport", &self.transport)
            .field("connected", &self.ctx.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// RTU inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 baud.
pub fn t35(baud: u32, bits_per_char: u32) -> Duration {
    if baud > 19200 {
        Duration::from_micros(1750)
    } else {
        Duration::from_micros(3_500_000 * bits_per_char as u64 / baud.max(1) as u64)
    }
}

fn exception_name(code: ExceptionCode) -> String {
    format!("{code:?}")
}

fn map_err(e: tokio_modbus::Error) -> TxError {
    match e {
        tokio_modbus::Error::Transport(io) => match io.kind() {
            io::ErrorKind::InvalidData => TxError::Invalid(io.to_string()),
            _ => TxError::Transport(io.to_string()),
        },
        tokio_modbus::Error::Protocol(p) => TxError::Invalid(p.to_string()),
    }
}

fn open_error(path: &std::path::Path, e: tokio_serial::Error) -> TxError {
    let hint = match e.kind() {
        tokio_serial::ErrorKind::NoDevice => {
            " (is the adapter plugged in? `ls /dev/ttyUSB* /dev/ttyACM*`)".to_string()
        }
        tokio_serial::ErrorKind::Io(io::ErrorKind::NotFound) => " (no such port)".to_string(),
        tokio_serial::ErrorKind::Io(io::ErrorKind::PermissionDenied) => {
            " (permission denied: add the service user to the `dialout` group)".to_string()
        }
        _ => String::new(),
    };
    TxError::Transport(format!("cannot open {}: {e}{hint}", path.display()))
}

impl Link {
    /// A link for a configured bus; nothing is opened until the first transaction.
    pub fn new(bus: &Bus) -> Link {
        let (transport, gap) = match &bus.kind {
            BusKind::Rtu {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                let bits =
                    1 + *data_bits as u32 + *stop_bits as u32 + u32::from(*parity != Parity::None);
                (
                    Transport::Rtu {
                        path: port.clone(),
                        baud: *baud,
                        parity: *parity,
                        data_bits: *data_bits,
                        stop_bits: *stop_bits,
                        port: None,
                    },
                    t35(*baud, bits).max(bus.turnaround),
                )
            }
            BusKind::Tcp { address } => (
                Transport::Tcp {
                    address: address.clone(),
                },
                bus.turnaround,
            ),
        };
        Link {
            transport,
            ctx: None,
            timeout: bus.timeout,
            gap,
            ready_at: Instant::now(),
            timer: crate::timer::PreciseTimer::new(),
            discarded: 0,
            received: Arc::new(AtomicU64::new(0)),
        }
    }

    async fn context(&mut self) -> Result<&mut Context, TxError> {
        if self.ctx.is_none() {
            let ctx = match &mut self.transport {
                Transport::Rtu {
                    path,
                    baud,
                    parity,
                    data_bits,
                    stop_bits,
                    port,
                } => {
                    if port.is_none() {
                        let stream = tokio_serial::new(path.to_string_lossy(), *baud)
                            .parity(match parity {
                                Parity::None => tokio_serial::Parity::None,
                                Parity::Even => tokio_serial::Parity::Even,
                                Parity::Odd => tokio_serial::Parity::Odd,
                            })
                            .data_bits(if *data_bits == 7 {
                                tokio_serial::DataBits::Seven
                            } else {
                                tokio_serial::DataBits::Eight
                            })
                            .stop_bits(if *stop_bits == 2 {
                                tokio_serial::StopBits::Two
                            } else {
                                tokio_serial::StopBits::One
                            })
                            .open_native_async()
                            .map_err(|e| open_error(path, e))?;
                        let _ = stream.clear(tokio_serial::ClearBuffer::All);
                        *port = Some(SharedPort(
                            Arc::new(Mutex::new(stream)),
                            self.received.clone(),
                        ));
                    }
                    let shared = port
                        .clone()
                        .ok_or_else(|| TxError::Transport("port not open".into()))?;
                    tokio_modbus::client::rtu::attach(shared)
                }
                Transport::Tcp { address } => {
                    let addr = tokio::net::lookup_host(address.as_str())
                        .await
                        .map_err(|e| TxError::Transport(format!("cannot resolve {address}: {e}")))?
                        .next()
                        .ok_or_else(|| {
                            TxError::Transport(format!("{address} resolves to nothing"))
                        })?;
                    let stream = timeout(
                        self.timeout.max(Duration::from_secs(1)),
                        tokio::net::TcpStream::connect(addr),
                    )
                    .await
                    .map_err(|_| TxError::Timeout)?
                    .map_err(|e| TxError::Transport(format!("cannot connect to {address}: {e}")))?;
                    let _ = stream.set_nodelay(true);
                    tokio_modbus::client::tcp::attach(stream)
                }
            };
            self.ctx = Some(ctx);
        }
        self.ctx
            .as_mut()
            .ok_or_else(|| TxError::Transport("no connection".into()))
    }

    /// After a timeout or a bad frame: forget the decoder state and wait until the line has been
    /// silent for a whole timeout, discarding whatever arrives (a late reply), then flush input.
    /// On TCP the connection is dropped instead: a new connection cannot carry an old reply.
    async fn resync(&mut self) {
        self.ctx = None;
        match &mut self.transport {
            Transport::Tcp { .. } => {}
            Transport::Rtu { port, .. } => {
                let Some(p) = port.clone() else { return };
                let mut p = p;
                let mut buf = [0u8; 256];
                let hard_stop = Instant::now() + self.timeout * 4;
                loop {
                    match timeout(self.timeout, p.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => {
                            self.discarded += n as u64;
                            if Instant::now() > hard_stop {
                                break;
                            }
                        }
                        Ok(Err(_)) | Ok(Ok(_)) => {
                            // The port failed: reopen it on the next transaction.
                            *port = None;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Some(p) = port.as_ref() {
                    p.with(|s| {
                        let _ = s.clear(tokio_serial::ClearBuffer::Input);
                    });
                }
            }
        }
        self.ready_at = Instant::now() + self.gap;
    }

    async fn call<T>(
        &mut self,
        unit: u8,
        f: impl for<'a> FnOnce(
            &'a mut Context,
        ) -> Pin<
            Box<dyn std::future::Future<Output = tokio_modbus::Result<T>> + Send + 'a>,
        >,
    ) -> Result<T, TxError> {
        self.timer.sleep_until(self.ready_at).await;
        let to = self.timeout;
        let ctx = match self.context().await {
            Ok(c) => c,
            Err(e) => {
                self.ctx = None;
                if let Transport::Rtu { port, .. } = &mut self.transport {
                    *port = None;
                }
                self.ready_at = Instant::now() + self.gap;
                return Err(e);
            }
        };
        ctx.set_slave(Slave(unit));
        let r = timeout(to, f(ctx)).await;
        self.ready_at = Instant::now() + self.gap;
        match r {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(code))) => Err(TxError::Exception {
                code: u8::from(code),
                name: exception_name(code),
            }),
            Ok(Err(e)) => {
                let e = map_err(e);
                self.resync().await;
                Err(e)
            }
            Err(_) => {
                self.resync().await;
                Err(TxError::Timeout)
            }
        }
    }

    /// Reads one span of a device.
    pub async fn read(&mut self, unit: u8, span: ReadSpan) -> Result<Raw, TxError> {
        let (start, count) = (span.start, span.count);
        let raw = match span.table {
            Table::Holding => Raw::Registers(
                self.call(unit, move |c| {
                    Box::pin(c.read_holding_registers(start, count))
                })
                .await?,
            ),
            Table::Input => Raw::Registers(
                self.call(unit, move |c| {
                    Box::pin(c.read_input_registers(start, count))
                })
                .await?,
            ),
            Table::Coil => Raw::Bits(
                self.call(unit, move |c| Box::pin(c.read_coils(start, count)))
                    .await?,
            ),
            Table::Discrete => Raw::Bits(
                self.call(unit, move |c| {
                    Box::pin(c.read_discrete_inputs(start, count))
                })
                .await?,
            ),
        };
        let got = match &raw {
            Raw::Registers(r) => r.len(),
            Raw::Bits(b) => b.len(),
        };
        // A reply of another length is an answer to some other request: never use it.
        if got < count as usize || (matches!(raw, Raw::Registers(_)) && got != count as usize) {
            self.resync().await;
            return Err(TxError::Invalid(format!(
                "asked for {count} items at {start}, got {got}"
            )));
        }
        Ok(match raw {
            Raw::Bits(mut b) => {
                b.truncate(count as usize);
                Raw::Bits(b)
            }
            r => r,
        })
    }

    /// Writes holding registers (one register with 0x06, more with 0x10).
    pub async fn write_registers(
        &mut self,
        unit: u8,
        address: u16,
        words: Vec<u16>,
    ) -> Result<(), TxError> {
        if words.len() == 1 {
            let w = words[0];
            self.call(unit, move |c| Box::pin(c.write_single_register(address, w)))
                .await
        } else {
            self.call(unit, move |c| {
                Box::pin(async move { c.write_multiple_registers(address, &words).await })
            })
            .await
        }
    }

    /// Writes one coil.
    pub async fn write_coil(&mut self, unit: u8, address: u16, value: bool) -> Result<(), TxError> {
        self.call(unit, move |c| Box::pin(c.write_single_coil(address, value)))
            .await
    }

    /// Reads the basic device identification objects (function 0x2B / MEI 0x0E, read code 1:
    /// vendor name, product code, revision), as (object id, text) pairs.
    pub async fn read_device_identification(
        &mut self,
        unit: u8,
    ) -> Result<Vec<(u8, String)>, TxError> {
        let r = self
            .call(unit, |c| {
                Box::pin(c.read_device_identification(ReadCode::Basic, 0x00))
            })
            .await?;
        Ok(r.device_id_objects
            .iter()
            .map(|o| (o.id, String::from_utf8_lossy(&o.value).trim().to_string()))
            .collect())
    }

    /// Bytes received so far on a serial port, including bytes of invalid frames and bytes
    /// discarded while resynchronising: a timeout with bytes received means garbage on the line,
    /// not silence. Always 0 on TCP.
    pub fn bytes_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Closes the port or connection (reopened on the next transaction).
    pub fn close(&mut self) {
        self.ctx = None;
        if let Transport::Rtu { port, .. } = &mut self.transport {
            *port = None;
        }
    }
}
